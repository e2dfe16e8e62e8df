//! The source side of a live migration. Runs inside the VM's VMM process,
//! which has the guest memory mapped, over a stream the runtime relays to
//! the destination.
//!
//! Order: hello and token; a short pause that starts dirty tracking and
//! freezes the disk's top layer under a fresh one; the description; the disk
//! base if the destination lacks it; the frozen layer's clusters; all
//! non-zero guest memory; rounds of the pages dirtied since, until the next
//! round would fit the downtime budget; then the pause: the last dirty pages,
//! the clusters written since the freeze, the machine state. The source
//! stops only once the destination says the VM runs there; any failure
//! before that resumes it where it was.

use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_vmm::dirty::{DirtyPages, DIRTY_PAGE_SIZE};
use ferry_vmm::VmHandle;

use super::wire::{self, Tag};
use super::{MigrateError as SendError, MigrateOptions, MigrateReport, RoundReport};
use crate::vm::record::VmRecord;

/// Pages per memory message (1 MiB before compression).
const PAGES_PER_BATCH: usize = 256;
/// Disk clusters per disk message.
const CLUSTERS_PER_BATCH: usize = 16;
/// Pre-copy rounds at most before the switch, whatever the estimate.
const MAX_ROUNDS: u32 = 30;
/// Rounds in a row without fewer dirty pages before the source gives up
/// converging and switches anyway.
const STALLED_ROUNDS: u32 = 4;
/// How long the destination may take to start the VM once it has everything.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(180);
/// zstd level on the wire: fast, since the link is usually faster than a
/// stronger level could keep up with.
const LEVEL: i32 = 1;

fn err(code: &str, message: impl std::fmt::Display) -> SendError {
    SendError::new(code, message)
}

fn link(e: std::io::Error) -> SendError {
    err(
        "MIGRATE_LINK_BROKEN",
        format!("the connection to the destination broke: {e}"),
    )
}

/// What the source VMM process hands the sender.
pub struct Source<'a> {
    /// The running VM.
    pub handle: &'a VmHandle,
    /// Its record.
    pub record: VmRecord,
    /// Its root disk (the top layer's path).
    pub root_disk: PathBuf,
    /// The runtime's directories (frozen layers, the encoded base cache).
    pub dirs: &'a crate::config::Dirs,
}

/// Counts bytes and keeps to a bandwidth limit.
struct Meter<W: Write> {
    inner: W,
    bytes: u64,
    started: Instant,
    limit: Option<u64>,
}

impl<W: Write> Meter<W> {
    fn send(&mut self, tag: Tag, payload: &[u8]) -> Result<(), SendError> {
        wire::send(&mut self.inner, tag, payload).map_err(link)?;
        self.bytes += 5 + payload.len() as u64;
        if let Some(limit) = self.limit.filter(|&l| l > 0) {
            let due = Duration::from_secs_f64(self.bytes as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SendError> {
        self.inner.flush().map_err(link)
    }
}

/// Runs the migration over `stream`; returns once the destination runs the
/// VM and has been told the source stops, with the VM left paused here. On
/// an error the VM runs on here.
pub fn run(
    src: &Source<'_>,
    stream: UnixStream,
    opts: &MigrateOptions,
) -> Result<MigrateReport, SendError> {
    let started = Instant::now();
    stream
        .set_write_timeout(Some(Duration::from_secs(120)))
        .map_err(link)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(link)?;
    let mut reader = stream.try_clone().map_err(link)?;
    let mut out = Meter {
        inner: BufWriter::with_capacity(1 << 20, stream),
        bytes: 0,
        started,
        limit: opts.bandwidth_limit,
    };
    // The token is checked before anything about the VM is sent.
    let hello = wire::Hello {
        version: wire::VERSION,
        token: opts.token.clone(),
    };
    out.send(Tag::Hello, &serde_json::to_vec(&hello).expect("hello"))?;
    out.flush()?;
    expect(&mut reader, Tag::Welcome)?;

    let result = transfer(src, &mut reader, &mut out, opts, started);
    if result.is_err() {
        // Back to how it ran: dirty logging off (the VM resumed when its
        // pause guard dropped).
        let _ = src.handle.untrack_dirty_pages();
    }
    result
}

/// Reads the next message, which must be `want`; a refusal becomes its error.
fn expect(reader: &mut UnixStream, want: Tag) -> Result<Vec<u8>, SendError> {
    match wire::recv(reader) {
        Ok(Some((tag, payload))) if tag == want => Ok(payload),
        Ok(Some((Tag::Refused, payload))) => {
            let r: wire::Refusal = wire::json(&payload).map_err(link)?;
            Err(err(
                &r.code,
                format!("the destination refused: {}", r.message),
            ))
        }
        Ok(Some((tag, _))) => Err(err(
            "MIGRATE_PROTOCOL",
            format!("the destination sent {tag:?} where {want:?} was due"),
        )),
        Ok(None) => Err(err(
            "MIGRATE_LINK_BROKEN",
            "the destination closed the connection",
        )),
        Err(e) => Err(link(e)),
    }
}

fn transfer<W: Write>(
    src: &Source<'_>,
    reader: &mut UnixStream,
    out: &mut Meter<W>,
    opts: &MigrateOptions,
    started: Instant,
) -> Result<MigrateReport, SendError> {
    let vmm = |e: &dyn std::fmt::Display| err("MIGRATE_FAILED", e);
    // A short pause: every page is either read below or logged dirty after
    // this, and the disk's layer so far stops changing.
    let (ranges, cpuid, frozen) = {
        let paused = src.handle.paused().map_err(|e| vmm(&e))?;
        let ranges = paused.resident_or_nonzero_ranges().map_err(|e| vmm(&e))?;
        let state = paused.capture().map_err(|e| vmm(&e))?;
        src.handle
            .track_dirty_pages()
            .map_err(|e| err("VMM_DIRTY_LOG_FAILED", e))?;
        let frozen = freeze_disk(src, &paused)?;
        let cpuid = state
            .vcpus
            .first()
            .map(|v| v.cpuid.clone())
            .unwrap_or_default();
        (ranges, cpuid, frozen)
    };
    let disk = crate::snapshot::disk::migration_source(&src.dirs.cache, &frozen)
        .map_err(|e| err("MIGRATE_FAILED", format!("read the root disk: {e}")))?;
    let begin = wire::Begin {
        record: src.record.clone(),
        memory_regions: src.handle.guest_regions(),
        arch: std::env::consts::ARCH.to_string(),
        cpu: ferry_snapshot::manifest::CpuInfo {
            vendor: ferry_vmm::snapshot::cpu::vendor(&cpuid),
            features: ferry_vmm::snapshot::cpu::features_of(&cpuid),
        },
        disk: disk.desc.clone(),
    };
    out.send(Tag::Begin, &serde_json::to_vec(&begin).expect("begin"))?;
    out.flush()?;
    let ready: wire::Ready = wire::json(&expect(reader, Tag::Ready)?).map_err(link)?;

    let mut report = MigrateReport {
        destination: src.record.name.clone(),
        ..MigrateReport::default()
    };
    let before = out.bytes;
    if !ready.have_base {
        let mut f = std::fs::File::open(&disk.encoded_base).map_err(|e| vmm(&e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| vmm(&e))?;
            if n == 0 {
                break;
            }
            out.send(Tag::Base, &buf[..n])?;
        }
    }
    out.send(Tag::BaseEnd, &[])?;
    report.disk_base_bytes = out.bytes - before;
    let before = out.bytes;
    let frozen_disk = ferry_disk::Disk::open(&frozen, true)
        .map_err(|e| err("MIGRATE_FAILED", format!("open {}: {e}", frozen.display())))?;
    send_clusters(out, &frozen_disk, &disk.top_clusters)?;
    report.disk_bytes = out.bytes - before;

    // Round 0: every page that may hold data.
    let round_start = Instant::now();
    let before = out.bytes;
    let mut batch = Batch::default();
    let mut pages = 0u64;
    for &(start, len) in &ranges {
        let mut addr = start;
        while addr < start + len {
            pages += batch.add(src.handle, addr, true)? as u64;
            if batch.full() {
                batch.send(out)?;
            }
            addr += DIRTY_PAGE_SIZE;
        }
    }
    batch.send(out)?;
    finish_round(out, &mut report, 0, pages, before, round_start)?;

    // Rounds of what changed, until the rest fits the budget.
    let budget = Duration::from_millis(opts.downtime_ms.max(1));
    let mut pending = src
        .handle
        .take_dirty_pages()
        .map_err(|e| err("VMM_DIRTY_LOG_FAILED", e))?;
    let mut best = u64::MAX;
    let mut stalled = 0;
    let mut round = 1;
    loop {
        let count = pending.count();
        let estimate = estimate(&report, count);
        if estimate <= budget || round > MAX_ROUNDS || stalled >= STALLED_ROUNDS {
            report.estimated_final_ms = estimate.as_millis() as u64;
            break;
        }
        if count < best {
            best = count;
            stalled = 0;
        } else {
            stalled += 1;
        }
        let round_start = Instant::now();
        let before = out.bytes;
        let sent = send_pages(src.handle, out, &pending)?;
        finish_round(out, &mut report, round, sent, before, round_start)?;
        pending = src
            .handle
            .take_dirty_pages()
            .map_err(|e| err("VMM_DIRTY_LOG_FAILED", e))?;
        round += 1;
    }

    // The switch. Devices finish their work first (their writes into guest
    // memory are logged), then the last pages, the disk, the state.
    let paused = src.handle.paused().map_err(|e| vmm(&e))?;
    let paused_at = Instant::now();
    let state = paused.capture().map_err(|e| vmm(&e))?;
    let last = src
        .handle
        .take_dirty_pages()
        .map_err(|e| err("VMM_DIRTY_LOG_FAILED", e))?;
    let before = out.bytes;
    let mut union = pending;
    union.merge(&last);
    let final_pages = send_pages(src.handle, out, &union)?;
    let top = ferry_disk::Disk::open(&src.root_disk, true)
        .map_err(|e| err("MIGRATE_FAILED", format!("open the root disk: {e}")))?;
    let written = match &top {
        ferry_disk::Disk::Layer(l) => l.own_clusters(ferry_disk::CLUSTER_SIZE),
        ferry_disk::Disk::Raw { .. } => Vec::new(),
    };
    let before_disk = out.bytes;
    send_clusters(out, &top, &written)?;
    report.disk_bytes += out.bytes - before_disk;
    out.send(
        Tag::Final,
        &serde_json::to_vec(&wire::Final { state }).expect("state"),
    )?;
    out.flush()?;
    report.final_pages = final_pages;
    report.final_bytes = out.bytes - before;
    let _ = reader.set_read_timeout(Some(SWITCH_TIMEOUT));
    let running: wire::Running = wire::json(&expect(reader, Tag::Running)?).map_err(link)?;
    report.downtime_ms = paused_at.elapsed().as_millis() as u64;
    report.destination = running.name;
    report.destination_restore_ms = running.restore_ms;
    // The destination runs the VM: from here this copy must never run again.
    paused.keep_paused();
    let _ = out.send(Tag::Ack, &[]).and_then(|()| out.flush());
    let _ = std::fs::remove_file(&frozen);
    report.total_ms = started.elapsed().as_millis() as u64;
    report.bytes = out.bytes;
    Ok(report)
}

/// The estimated time to send `pages` at the rate and compression the
/// last round saw.
fn estimate(report: &MigrateReport, pages: u64) -> Duration {
    let Some(last) = report.rounds.last() else {
        return Duration::MAX;
    };
    if pages == 0 {
        return Duration::ZERO;
    }
    let raw = last.pages.max(1) * DIRTY_PAGE_SIZE;
    let ratio = (last.bytes as f64 / raw as f64).clamp(0.01, 1.1);
    let rate = last.bytes as f64 / (last.ms.max(1) as f64 / 1000.0);
    Duration::from_secs_f64(pages as f64 * DIRTY_PAGE_SIZE as f64 * ratio / rate.max(1.0))
}

fn finish_round<W: Write>(
    out: &mut Meter<W>,
    report: &mut MigrateReport,
    round: u32,
    pages: u64,
    before: u64,
    started: Instant,
) -> Result<(), SendError> {
    out.send(
        Tag::RoundEnd,
        &serde_json::to_vec(&wire::RoundEnd { round, pages }).expect("round"),
    )?;
    out.flush()?;
    report.rounds.push(RoundReport {
        pages,
        bytes: out.bytes - before,
        ms: started.elapsed().as_millis() as u64,
    });
    Ok(())
}

/// Sends every page in `dirty`, zero pages as such; returns how many.
fn send_pages<W: Write>(
    handle: &VmHandle,
    out: &mut Meter<W>,
    dirty: &DirtyPages,
) -> Result<u64, SendError> {
    let mut batch = Batch::default();
    let mut n = 0;
    for region in &dirty.regions {
        for addr in region.pages() {
            batch.add(handle, addr, false)?;
            n += 1;
            if batch.full() {
                batch.send(out)?;
            }
        }
    }
    batch.send(out)?;
    Ok(n)
}

/// Pages on their way into one memory message.
#[derive(Default)]
struct Batch {
    blocks: Vec<wire::Block>,
}

impl Batch {
    /// Reads the page at `addr`; a zero page is skipped when `skip_zero`
    /// (nothing to overwrite yet) and sent as empty otherwise. Returns
    /// whether it was added.
    fn add(&mut self, handle: &VmHandle, addr: u64, skip_zero: bool) -> Result<bool, SendError> {
        let mut page = vec![0u8; DIRTY_PAGE_SIZE as usize];
        handle
            .read_guest(addr, &mut page)
            .map_err(|e| err("MIGRATE_FAILED", format!("read guest page {addr:#x}: {e}")))?;
        let zero = page.iter().all(|&b| b == 0);
        if zero && skip_zero {
            return Ok(false);
        }
        if zero {
            page = Vec::new();
        }
        self.blocks.push((addr / DIRTY_PAGE_SIZE, page));
        Ok(true)
    }

    fn full(&self) -> bool {
        self.blocks.len() >= PAGES_PER_BATCH
    }

    fn send<W: Write>(&mut self, out: &mut Meter<W>) -> Result<(), SendError> {
        if self.blocks.is_empty() {
            return Ok(());
        }
        let payload = wire::encode_blocks(&self.blocks, LEVEL).map_err(link)?;
        self.blocks.clear();
        out.send(Tag::Memory, &payload)
    }
}

/// Sends clusters `list` of `disk` (read through its chain).
fn send_clusters<W: Write>(
    out: &mut Meter<W>,
    disk: &ferry_disk::Disk,
    list: &[u64],
) -> Result<(), SendError> {
    let size = disk.size();
    let cluster = ferry_disk::CLUSTER_SIZE;
    for chunk in list.chunks(CLUSTERS_PER_BATCH) {
        let mut blocks = Vec::with_capacity(chunk.len());
        for &c in chunk {
            let start = c * cluster;
            let len = cluster.min(size.saturating_sub(start)) as usize;
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, start)
                .map_err(|e| err("MIGRATE_FAILED", format!("read the root disk: {e}")))?;
            if buf.iter().all(|&b| b == 0) {
                buf = Vec::new();
            }
            blocks.push((c, buf));
        }
        out.send(
            Tag::Disk,
            &wire::encode_blocks(&blocks, LEVEL).map_err(link)?,
        )?;
    }
    Ok(())
}

/// Moves the VM's top disk layer aside, frozen, under a fresh empty layer
/// the VM writes from now on: the frozen one can be sent while the VM runs,
/// and at the switch only the new layer's clusters are left. Returns the
/// frozen layer's path.
fn freeze_disk(src: &Source<'_>, paused: &ferry_vmm::Paused) -> Result<PathBuf, SendError> {
    let io = |e: std::io::Error| err("MIGRATE_FAILED", format!("freeze the root disk: {e}"));
    let root = &src.root_disk;
    let frozen =
        crate::snapshot::disk::move_aside(root, &src.dirs.layers(), &src.record.id).map_err(io)?;
    let layered = ferry_disk::create_layer(root, &frozen, None)
        .map_err(|e| err("MIGRATE_FAILED", e))
        .and_then(|()| {
            paused
                .replace_disk(0, root)
                .map_err(|e| err("MIGRATE_FAILED", e))
        });
    if let Err(e) = layered {
        // Nothing has written to the new layer: put the old one back.
        let _ = std::fs::remove_file(root);
        let _ = std::fs::rename(&frozen, root);
        return Err(e);
    }
    Ok(frozen)
}
