//! The destination side of a live migration (`ferry receive`).
//!
//! Everything the source sends is checked before use, as a bundle is: the
//! token before anything else, the architecture, CPU features, name, ports
//! and what the VM's record asks of this host before any memory, and every
//! page and cluster against the VM's bounds. Guest memory goes straight into
//! the RAM the new VM will map, while the source still runs. A failure at
//! any point removes whatever was made here, so no VM exists on this host
//! unless it runs.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_vmm::dirty::DIRTY_PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress};

use super::wire::{self, Tag};
use super::MigrateError;
use crate::config::Config;
use crate::error::Coded;
use crate::fsutil::random_hex;
use crate::machine::Machine;
use crate::plan::Launch;
use crate::snapshot::restore::{Refresh, RestoreSpec};
use crate::vm::record::{self, VmRecord};
use crate::vm::Registry;

/// How long the destination waits for the next message of a migration.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the receiving VM gets besides what the source sends.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// Its name here; the source's name when absent.
    pub name: Option<String>,
    /// Host port forwards here; the source's when absent.
    pub ports: Option<Vec<crate::forward::PortForward>>,
    /// A new hostname for the guest.
    pub hostname: Option<String>,
    /// Grant outbound networking if the VM had it.
    pub net: bool,
    /// Host directories confirmed as live mounts.
    pub live_mounts: Vec<PathBuf>,
    /// Grant whatever the VM's record asks for.
    pub trust_config: bool,
}

/// What a receive did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiveReport {
    /// The VM's name here.
    pub name: String,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Guest pages written (all rounds and the last).
    pub pages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Whether the disk base had to be sent.
    pub base_received: bool,
    /// From the last message to the VM answering, in milliseconds.
    pub restore_ms: u64,
    /// Whether the source confirmed it stopped.
    pub source_confirmed: bool,
}

fn fail(code: &str, message: impl std::fmt::Display) -> MigrateError {
    MigrateError::new(code, message)
}

fn link(e: std::io::Error) -> MigrateError {
    fail(
        "MIGRATE_LINK_BROKEN",
        format!("the connection to the source broke: {e}"),
    )
}

/// A TCP listener for migrations with its one-time token.
pub struct Listener {
    listener: TcpListener,
    token: String,
}

impl Listener {
    /// Listens on `addr` (`HOST:PORT`) with a fresh random token.
    pub fn bind(addr: &str) -> std::io::Result<Listener> {
        Ok(Listener {
            listener: TcpListener::bind(addr)?,
            token: random_hex(16)?,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The token a source must present.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Takes connections until one migrates a VM here (or fails after its
    /// token was accepted). A connection with a wrong token is refused and
    /// the next one awaited.
    pub fn receive(
        &self,
        config: &Arc<Config>,
        opts: &ReceiveOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Machine, ReceiveReport), MigrateError> {
        loop {
            let (stream, peer) = self.listener.accept().map_err(link)?;
            progress(&format!("connection from {peer}"));
            let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
            let _ = stream.set_nodelay(true);
            let reader = stream.try_clone().map_err(link)?;
            match receive(config, reader, stream, Some(&self.token), opts, progress) {
                Err(e) if e.code == "MIGRATE_AUTH_FAILED" => {
                    progress(&format!("refused {peer}: {e}"));
                    continue;
                }
                other => return other,
            }
        }
    }
}

/// Whether two tokens are equal, in time that does not depend on where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Receives one migration over `input` and `output`. With `token`, the
/// source must present it first.
pub fn receive(
    config: &Arc<Config>,
    input: impl Read,
    output: impl Write,
    token: Option<&str>,
    opts: &ReceiveOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<(Machine, ReceiveReport), MigrateError> {
    let mut input = Counted {
        inner: BufReader::with_capacity(1 << 20, input),
        bytes: 0,
    };
    let mut output = BufWriter::new(output);
    let result = receive_inner(config, &mut input, &mut output, token, opts, progress);
    if let Err(e) = &result {
        // Tell the source why, if it still listens; it resumes either way.
        let _ = wire::send_json(
            &mut output,
            Tag::Refused,
            &wire::Refusal {
                code: e.code.clone(),
                message: e.message.clone(),
            },
        )
        .and_then(|()| output.flush());
    }
    result.map(|(m, mut r)| {
        r.bytes = input.bytes;
        (m, r)
    })
}

struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

fn next(input: &mut impl Read) -> Result<(Tag, Vec<u8>), MigrateError> {
    match wire::recv(input) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(fail(
            "MIGRATE_LINK_BROKEN",
            "the source closed the connection before the VM was complete",
        )),
        Err(e) => Err(link(e)),
    }
}

fn bad(message: impl std::fmt::Display) -> MigrateError {
    fail("MIGRATE_PROTOCOL", message)
}

fn refused(e: impl Coded + std::fmt::Display) -> MigrateError {
    fail(e.code(), &e)
}

fn receive_inner(
    config: &Arc<Config>,
    input: &mut impl Read,
    output: &mut impl Write,
    token: Option<&str>,
    opts: &ReceiveOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<(Machine, ReceiveReport), MigrateError> {
    let (tag, payload) = next(input)?;
    if tag != Tag::Hello {
        return Err(bad(format!("the source began with {tag:?}")));
    }
    let hello: wire::Hello = wire::json(&payload).map_err(bad)?;
    if hello.version != wire::VERSION {
        return Err(fail(
            "MIGRATE_VERSION",
            format!(
                "the source speaks migration protocol {}, this host {}: use the same ferry version on both",
                hello.version,
                wire::VERSION
            ),
        ));
    }
    if let Some(want) = token {
        if !hello.token.as_deref().is_some_and(|t| same_token(t, want)) {
            return Err(fail(
                "MIGRATE_AUTH_FAILED",
                "the token is not the one this receiver printed",
            ));
        }
    }
    wire::send(output, Tag::Welcome, &[]).map_err(link)?;
    output.flush().map_err(link)?;

    let (tag, payload) = next(input)?;
    if tag != Tag::Begin {
        return Err(bad(format!("expected the VM's description, got {tag:?}")));
    }
    let begin: wire::Begin = wire::json(&payload).map_err(bad)?;
    let mut rec = check_begin(config, &begin, opts)?;
    progress(&format!(
        "receiving {} ({} MiB, {} vCPU)",
        begin.record.name, rec.memory_mib, rec.cpus
    ));
    let ram = ferry_vmm::memory::new_guest_ram(&begin.memory_regions)
        .map_err(|e| fail("MIGRATE_FAILED", format!("allocate guest RAM: {e}")))?;
    let registry = Registry::new(&config.dirs);
    let (dir, owner) = registry.create(&rec).map_err(refused)?;
    rec = record::read_json(&dir.record()).unwrap_or(rec);
    let machine = Machine {
        record: rec,
        dir,
        config: Arc::clone(config),
        owner: Some(Arc::new(owner)),
    };
    let started = (|| {
        let (mut report, state, final_at) =
            fill(config, &machine, &begin, &ram, input, output, progress)?;
        // The RAM is complete: the new VMM maps the same memfd.
        let fd = inheritable(&ram.file)?;
        drop(ram);
        machine
            .spawn_vmm(Launch::Incoming {
                state: Box::new(state),
                ram_fd: fd.as_raw_fd(),
            })
            .map_err(refused)?;
        drop(fd);
        Refresh::new(opts.hostname.as_deref())
            .and_then(|r| r.on_hello(&machine))
            .map_err(refused)?;
        report.restore_ms = final_at.elapsed().as_millis() as u64;
        Ok(report)
    })();
    let mut report = match started {
        Ok(r) => r,
        Err(e) => {
            let _ = machine.clone().remove();
            return Err(e);
        }
    };
    machine.release();
    report.name = machine.record.name.clone();
    progress(&format!("{} runs here", report.name));
    let running = wire::Running {
        name: report.name.clone(),
        restore_ms: report.restore_ms,
    };
    // From here the VM is this host's: a source that does not confirm may
    // have missed this message and resumed, which the report says.
    let confirmed = wire::send_json(output, Tag::Running, &running)
        .and_then(|()| output.flush())
        .is_ok()
        && matches!(wire::recv(input), Ok(Some((Tag::Ack, _))));
    report.source_confirmed = confirmed;
    if !confirmed {
        tracing::warn!(
            "the source did not confirm that it stopped: check that {} does not run there too",
            report.name
        );
    }
    Ok((machine, report))
}

/// Checks the description against this host; returns the record the VM
/// gets here.
fn check_begin(
    config: &Config,
    begin: &wire::Begin,
    opts: &ReceiveOptions,
) -> Result<VmRecord, MigrateError> {
    crate::snapshot::restore::check_cpu(config, &begin.arch, &begin.cpu).map_err(refused)?;
    let mut rec = begin.record.clone();
    let ram = u64::from(rec.memory_mib) << 20;
    let expected: Vec<(u64, u64)> = ferry_vmm::arch::layout::ram_regions(ram)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    if rec.memory_mib == 0 || begin.memory_regions != expected {
        return Err(bad("the guest RAM regions are not those of the VM's size"));
    }
    if begin.disk.cluster_size != ferry_disk::CLUSTER_SIZE || begin.disk.size == 0 {
        return Err(bad("the disk's cluster size or size"));
    }
    let spec = RestoreSpec {
        name: opts.name.clone(),
        ports: opts.ports.clone(),
        hostname: opts.hostname.clone(),
        net: opts.net,
        live_mounts: opts.live_mounts.clone(),
        trust_bundle_config: opts.trust_config,
        ..RestoreSpec::new("")
    };
    let asked = crate::snapshot::restore::unconfirmed(&rec, &spec);
    if !asked.is_empty() {
        return Err(fail(
            "RESTORE_CONFIG_UNCONFIRMED",
            format!(
                "the VM asks for what this host has not granted: {}; pass the matching flags to receive",
                asked.join(", ")
            ),
        ));
    }
    rec.name = opts.name.clone().unwrap_or(rec.name);
    crate::vm::registry::validate_name(&rec.name).map_err(refused)?;
    rec.id = random_hex(8).map_err(|e| fail("MIGRATE_FAILED", e))?;
    rec.created_at = record::now();
    rec.ephemeral = false;
    if let Some(ports) = &opts.ports {
        rec.ports = ports.clone();
    }
    let registry = Registry::new(&config.dirs);
    crate::forward::check_available(&rec.ports, &registry).map_err(|e| fail(e.code(), &e))?;
    Ok(rec)
}

type Filled = (ReceiveReport, ferry_vmm::VmState, Instant);

/// Takes the disk and memory into the VM's directory and `ram` until the
/// source's final message; returns the machine state with its arrival time.
fn fill(
    config: &Config,
    machine: &Machine,
    begin: &wire::Begin,
    ram: &ferry_vmm::memory::GuestRam,
    input: &mut impl Read,
    output: &mut impl Write,
    progress: &mut dyn FnMut(&str),
) -> Result<Filled, MigrateError> {
    let info = begin.disk.info();
    let cache = &config.dirs.cache;
    let found = crate::snapshot::disk::find_base(cache, &info).map_err(refused)?;
    wire::send_json(
        output,
        Tag::Ready,
        &wire::Ready {
            have_base: found.is_some(),
        },
    )
    .map_err(link)?;
    output.flush().map_err(link)?;
    let mut report = ReceiveReport {
        base_received: found.is_none(),
        ..ReceiveReport::default()
    };
    // The encoded base arrives in pieces; it is unpacked (and its content
    // id checked) once complete.
    let mut base_staging: Option<(PathBuf, std::fs::File, u64)> = None;
    let base_limit = info.size.saturating_mul(2).saturating_add(64 << 20);
    let mut disk: Option<ferry_disk::Disk> = None;
    let root = machine.dir.root_disk();
    let zero_page = [0u8; DIRTY_PAGE_SIZE as usize];
    let mut result = || -> Result<(ferry_vmm::VmState, Instant), MigrateError> {
        loop {
            let (tag, payload) = next(input)?;
            match tag {
                Tag::Base if found.is_none() && disk.is_none() => {
                    if base_staging.is_none() {
                        let dir = config.dirs.incoming();
                        std::fs::create_dir_all(&dir).map_err(|e| fail("MIGRATE_FAILED", e))?;
                        let path = dir.join(format!("base-{}.zst", random_hex(6).map_err(link)?));
                        let f =
                            std::fs::File::create(&path).map_err(|e| fail("MIGRATE_FAILED", e))?;
                        base_staging = Some((path, f, 0));
                    }
                    let (_, f, n) = base_staging.as_mut().expect("staging");
                    *n += payload.len() as u64;
                    if *n > base_limit {
                        return Err(bad("the disk base is larger than its disk"));
                    }
                    f.write_all(&payload)
                        .map_err(|e| fail("MIGRATE_FAILED", e))?;
                }
                Tag::BaseEnd if disk.is_none() => {
                    let base = match &found {
                        Some(b) => b.clone(),
                        None => {
                            let Some((path, f, _)) = base_staging.take() else {
                                return Err(bad("the disk base was not sent"));
                            };
                            drop(f);
                            progress("unpacking the disk base");
                            let unpacked = std::fs::File::open(&path)
                                .map_err(|e| fail("MIGRATE_FAILED", e))
                                .and_then(|f| {
                                    crate::snapshot::disk::unpack_base(
                                        cache,
                                        &info,
                                        BufReader::new(f),
                                    )
                                    .map_err(refused)
                                });
                            let _ = std::fs::remove_file(&path);
                            unpacked?
                        }
                    };
                    ferry_disk::create_layer_unsynced(&root, &base, Some(info.size)).map_err(
                        |e| fail("MIGRATE_FAILED", format!("create the root disk: {e}")),
                    )?;
                    disk =
                        Some(ferry_disk::Disk::open(&root, false).map_err(|e| {
                            fail("MIGRATE_FAILED", format!("open the root disk: {e}"))
                        })?);
                }
                Tag::Disk => {
                    let Some(d) = &disk else {
                        return Err(bad("disk clusters before the disk base"));
                    };
                    let cluster = info.cluster_size;
                    for (index, bytes) in wire::decode_blocks(&payload, cluster).map_err(bad)? {
                        let start = index
                            .checked_mul(cluster)
                            .filter(|&s| s < info.size)
                            .ok_or_else(|| bad("a disk cluster past the disk's end"))?;
                        let len = cluster.min(info.size - start) as usize;
                        let zeros;
                        let data = if bytes.is_empty() {
                            zeros = vec![0u8; len];
                            &zeros
                        } else if bytes.len() == len {
                            &bytes
                        } else {
                            return Err(bad("a disk cluster of the wrong length"));
                        };
                        d.write_at(data, start).map_err(|e| {
                            fail("MIGRATE_FAILED", format!("write the root disk: {e}"))
                        })?;
                    }
                }
                Tag::Memory => {
                    for (index, bytes) in
                        wire::decode_blocks(&payload, DIRTY_PAGE_SIZE).map_err(bad)?
                    {
                        let addr = index
                            .checked_mul(DIRTY_PAGE_SIZE)
                            .ok_or_else(|| bad("a page address"))?;
                        let data: &[u8] = match bytes.len() {
                            0 => &zero_page,
                            n if n as u64 == DIRTY_PAGE_SIZE => &bytes,
                            _ => return Err(bad("a guest page of the wrong length")),
                        };
                        // Bounds-checked: a page outside guest RAM is refused.
                        ram.memory
                            .write_slice(data, GuestAddress(addr))
                            .map_err(|_| {
                                bad(format!("a guest page outside guest RAM ({addr:#x})"))
                            })?;
                        report.pages += 1;
                    }
                }
                Tag::RoundEnd => {
                    let r: wire::RoundEnd = wire::json(&payload).map_err(bad)?;
                    report.rounds = r.round + 1;
                    progress(&format!("round {}: {} pages", r.round, r.pages));
                }
                Tag::Final if disk.is_some() => {
                    let at = Instant::now();
                    progress("the source paused; starting the VM here");
                    let fin: wire::Final = wire::json(&payload).map_err(bad)?;
                    let same_layout = fin.state.memory.len() == begin.memory_regions.len()
                        && fin
                            .state
                            .memory
                            .iter()
                            .zip(&begin.memory_regions)
                            .all(|(s, &(a, l))| s.guest_addr == a && s.len == l);
                    if !same_layout {
                        return Err(bad("the VM state's memory layout is not the RAM sent"));
                    }
                    return Ok((fin.state, at));
                }
                Tag::Refused => {
                    let r: wire::Refusal = wire::json(&payload).map_err(bad)?;
                    return Err(fail(&r.code, format!("the source stopped: {}", r.message)));
                }
                other => return Err(bad(format!("unexpected {other:?} message"))),
            }
        }
    };
    let result = result();
    if let Some((path, _, _)) = base_staging.take() {
        let _ = std::fs::remove_file(path);
    }
    let (state, at) = result?;
    if let Some(d) = &disk {
        d.write_back()
            .map_err(|e| fail("MIGRATE_FAILED", format!("write the root disk: {e}")))?;
    }
    Ok((report, state, at))
}

/// A duplicate of `file`'s descriptor that a child process inherits.
fn inheritable(file: &std::fs::File) -> Result<OwnedFd, MigrateError> {
    // SAFETY: F_DUPFD on a descriptor we own returns a new descriptor
    // (without FD_CLOEXEC) or -1.
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD, 3) };
    if fd < 0 {
        return Err(fail("MIGRATE_FAILED", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tmp: &std::path::Path) -> Arc<Config> {
        Arc::new(Config {
            dirs: crate::config::Dirs {
                data: tmp.join("data"),
                cache: tmp.join("cache"),
            },
            vmm: Some(tmp.join("no-such-ferry-vmm")),
            ..Config::default()
        })
    }

    fn hello(token: Option<&str>) -> Vec<u8> {
        let mut b = Vec::new();
        let h = wire::Hello {
            version: wire::VERSION,
            token: token.map(str::to_string),
        };
        wire::send_json(&mut b, Tag::Hello, &h).unwrap();
        b
    }

    fn answers(out: &[u8]) -> Vec<Tag> {
        let mut r = out;
        std::iter::from_fn(|| wire::recv(&mut r).unwrap().map(|(t, _)| t)).collect()
    }

    #[test]
    fn a_wrong_or_missing_token_is_refused_before_anything_else() {
        let tmp = tempfile::tempdir().unwrap();
        let config = config(tmp.path());
        for token in [Some("wrong"), None, Some("right-but-longer")] {
            let mut out = Vec::new();
            let err = receive(
                &config,
                &hello(token)[..],
                &mut out,
                Some("right"),
                &ReceiveOptions::default(),
                &mut |_| {},
            )
            .unwrap_err();
            assert_eq!(err.code, "MIGRATE_AUTH_FAILED", "{err}");
            assert_eq!(
                answers(&out),
                vec![Tag::Refused],
                "no welcome, nothing else"
            );
        }
        assert!(
            !config.dirs.vms().exists()
                || std::fs::read_dir(config.dirs.vms()).unwrap().count() == 0
        );
    }

    #[test]
    fn a_source_that_stops_early_or_sends_garbage_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let config = config(tmp.path());
        // Welcomed, then the stream ends.
        let mut out = Vec::new();
        let err = receive(
            &config,
            &hello(None)[..],
            &mut out,
            None,
            &ReceiveOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert_eq!(err.code, "MIGRATE_LINK_BROKEN", "{err}");
        assert_eq!(answers(&out), vec![Tag::Welcome, Tag::Refused]);
        // Not a hello at all.
        let mut bad = Vec::new();
        wire::send(&mut bad, Tag::Memory, &[1, 2, 3]).unwrap();
        let err = receive(
            &config,
            &bad[..],
            Vec::new(),
            None,
            &ReceiveOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert_eq!(err.code, "MIGRATE_PROTOCOL", "{err}");
        assert!(
            !config.dirs.vms().exists()
                || std::fs::read_dir(config.dirs.vms()).unwrap().count() == 0
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
        assert!(!same_token("", "a"));
    }
}
