//! Restoring a bundle on this host: every check before anything is created,
//! then a VMM process that maps guest memory from the bundle lazily.
//!
//! A bundle travels between hosts and people, so what its record asks of this
//! host (live mounts of host directories, a network, listeners on addresses
//! other than loopback) is granted only when the user confirms it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_protocol::Session;
use ferry_snapshot::{Bundle, BundleError, SectionKind};

use crate::config::Config;
use crate::error::Coded;
use crate::fsutil;
use crate::machine::{random_hex, BootError, Machine};
use crate::plan::Launch;
use crate::vm::record::{self, VmRecord};
use crate::vm::{Registry, VmError};

/// Errors restoring a bundle.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The bundle is damaged, truncated, too new, or not a bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Made on another architecture.
    #[error("the bundle was made on {bundle}; this host is {host}")]
    ArchMismatch {
        /// Bundle's architecture.
        bundle: String,
        /// Ours.
        host: String,
    },
    /// The guest used CPU features this host lacks.
    #[error("this host's CPU lacks what the frozen guest was using: {}", .0.join(", "))]
    CpuIncompatible(Vec<String>),
    /// Could not create or start the VM.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A live mount's host directory is missing, or a remap is wrong.
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    /// The bundle's record asks for host access the user did not confirm.
    #[error("the bundle asks for host access that was not confirmed: {}", .0.join("; "))]
    ConfigUnconfirmed(Vec<String>),
    /// A restore of a received stream failed; the bundle is kept for a retry.
    #[error("{inner}\nthe received bundle is kept at {}", path.display())]
    Received {
        /// Where the received bundle is.
        path: PathBuf,
        /// Why the restore failed.
        inner: Box<RestoreError>,
    },
    /// An incremental bundle's chain of parents is incomplete or wrong.
    #[error(transparent)]
    Chain(#[from] super::chain::ChainError),
    /// A thin bundle's disk base is not on this host.
    #[error(
        "this thin bundle leaves out the disk image the VM booted from ({}, content id {}), and this host does not have it",
        .image.as_deref().unwrap_or("unknown image"),
        &.base_id[..base_id.len().min(16)]
    )]
    BaseMissing {
        /// Content id of the missing base.
        base_id: String,
        /// What the VM booted from, as recorded in the bundle.
        image: Option<String>,
    },
    /// Fetching the VM from a store failed.
    #[error(transparent)]
    Store(Box<ferry_store::StoreError>),
}

impl From<VmError> for RestoreError {
    fn from(e: VmError) -> Self {
        RestoreError::Boot(BootError::Vm(e))
    }
}

impl Coded for RestoreError {
    fn code(&self) -> &str {
        match self {
            RestoreError::Bundle(e) => e.code(),
            RestoreError::ArchMismatch { .. } => "RESTORE_ARCH_MISMATCH",
            RestoreError::CpuIncompatible(_) => "SNAPSHOT_CPU_INCOMPATIBLE",
            RestoreError::Boot(e) => e.code(),
            RestoreError::Mount(e) => e.code(),
            RestoreError::BaseMissing { .. } => "RESTORE_BASE_MISSING",
            RestoreError::ConfigUnconfirmed(_) => "RESTORE_CONFIG_UNCONFIRMED",
            RestoreError::Received { inner, .. } => inner.code(),
            RestoreError::Chain(e) => e.code(),
            RestoreError::Store(e) => e.code(),
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RestoreError::Bundle(BundleError::Truncated(_)) => {
                Some("the copy is incomplete; transfer the bundle again".into())
            }
            RestoreError::Bundle(BundleError::Corrupt(_)) => {
                Some("the bundle was damaged in storage or transit; transfer it again".into())
            }
            RestoreError::Bundle(BundleError::UnsupportedVersion { .. }) => {
                Some("upgrade ferry on this host".into())
            }
            RestoreError::Bundle(BundleError::NotABundle) => {
                Some("pass a file written by `ferry snapshot`".into())
            }
            RestoreError::Bundle(BundleError::BadManifest(_)) => {
                Some("the bundle was written by an incompatible tool; take a new snapshot".into())
            }
            RestoreError::ArchMismatch { .. } => {
                Some("restore on a host of the same architecture".into())
            }
            RestoreError::CpuIncompatible(_) => Some(
                "restore on a host whose CPU has these features (or a newer CPU of the same vendor)"
                    .into(),
            ),
            RestoreError::Boot(e) => e.hint(),
            RestoreError::Mount(e) => e.hint(),
            RestoreError::BaseMissing { .. } => Some(
                "restore it on a host that has that image (one that snapshotted or restored VMs over it), \
                 or take a full bundle (`ferry snapshot` without --thin), which restores anywhere"
                    .into(),
            ),
            RestoreError::ConfigUnconfirmed(_) => Some(
                "repeat what you trust: --live-mount HOST:GUEST or --remap-mount OLD=NEW for a mount, \
                 --net for networking, -p for forwards; or pass --trust-bundle-config if you trust \
                 whoever made the bundle"
                    .into(),
            ),
            RestoreError::Received { path, inner } => Some(format!(
                "{}retry with `ferry restore {}`",
                inner.hint().map(|h| format!("{h}; ")).unwrap_or_default(),
                path.display()
            )),
            RestoreError::Chain(super::chain::ChainError::ParentMissing { .. }) => Some(
                "put the parent bundle beside this one under its recorded name, or name it with --parent PATH"
                    .into(),
            ),
            RestoreError::Store(e) => e.hint(),
            RestoreError::Chain(_) | RestoreError::Bundle(_) => None,
        }
    }
}

/// Checks a bundle can run here without touching anything: structure, format
/// version, architecture, CPU features, then every checksum.
pub fn check(config: &Config, bundle: &Bundle) -> Result<(), RestoreError> {
    check_compatible(config, bundle)?.remember();
    verify_once(config, bundle, true)
}

/// Checks, before a stream is read, what can be checked without the bundle:
/// the name is free and valid, the ports can be bound, KVM is usable.
pub fn precheck(config: &Config, spec: &RestoreSpec) -> Result<(), RestoreError> {
    let registry = Registry::new(&config.dirs);
    if let Some(name) = &spec.name {
        crate::vm::registry::validate_name(name)?;
        if let Ok(info) = registry.get(name) {
            return Err(VmError::NameTaken {
                name: name.clone(),
                running: matches!(info.status, crate::vm::VmStatus::Running { .. }),
            }
            .into());
        }
    }
    if let Some(ports) = &spec.ports {
        crate::forward::check_available(ports, &registry).map_err(BootError::from)?;
    }
    // KVM answers here (or answered on this boot before).
    HostCpu::features(config)?;
    crate::config::locate_vmm(config).map_err(BootError::from)?;
    Ok(())
}

/// The architecture and CPU features a bundle needs, against this host.
/// Returns what KVM was asked, if it was (for [`HostCpu::remember`]).
fn check_compatible(config: &Config, bundle: &Bundle) -> Result<HostCpu, RestoreError> {
    let m = bundle.manifest();
    check_cpu(config, &m.arch, &m.cpu)
}

/// A VM made on `arch` and shown `cpu` against this host (a bundle's, or a
/// migrating VM's).
pub(crate) fn check_cpu(
    config: &Config,
    arch: &str,
    cpu: &ferry_snapshot::manifest::CpuInfo,
) -> Result<HostCpu, RestoreError> {
    if arch != std::env::consts::ARCH {
        return Err(RestoreError::ArchMismatch {
            bundle: arch.to_string(),
            host: std::env::consts::ARCH.into(),
        });
    }
    let host = HostCpu::features(config)?;
    let missing: Vec<String> = cpu
        .features
        .iter()
        .filter(|f| !host.list.contains(f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(RestoreError::CpuIncompatible(missing));
    }
    Ok(host)
}

/// The CPU features KVM offers here. Asking KVM takes tens of milliseconds
/// on a nested host and the answer changes only when KVM is loaded again,
/// so a restore that succeeds keeps it per boot and per /dev/kvm node (made
/// anew on each load). The VMM still compares the saved CPUID with KVM's
/// own before the guest runs; this list only lets a restore refuse early,
/// with names.
pub(crate) struct HostCpu {
    list: Vec<String>,
    /// Where the list is kept, if it was asked of KVM now.
    unsaved: Option<PathBuf>,
}

impl HostCpu {
    fn features(config: &Config) -> Result<Self, RestoreError> {
        use std::os::unix::fs::MetadataExt;
        let key = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .zip(std::fs::metadata("/dev/kvm").ok())
            .map(|(boot, kvm)| {
                format!(
                    "{}-{}.{}-{:x}",
                    boot.trim(),
                    kvm.ctime(),
                    kvm.ctime_nsec(),
                    kvm.rdev()
                )
            })
            .filter(|k| {
                k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            });
        let file = key.map(|k| config.dirs.cache.join("host-cpu").join(format!("{k}.json")));
        if let Some(list) = file.as_deref().and_then(record::read_json::<Vec<String>>) {
            return Ok(Self {
                list,
                unsaved: None,
            });
        }
        let list = ferry_vmm::snapshot::host_cpu_features().map_err(|e| {
            RestoreError::Boot(BootError::Vmm {
                code: e.code().into(),
                message: e.to_string(),
                hint: crate::error::kvm_hint(e.code()),
            })
        })?;
        Ok(Self {
            list,
            unsaved: file,
        })
    }

    /// Keeps a list just asked of KVM, replacing earlier boots' lists; a
    /// failed write only costs the next restore the question.
    fn remember(&self) {
        let Some(file) = &self.unsaved else { return };
        let Some(dir) = file.parent() else { return };
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::create_dir_all(dir);
        let _ = record::write_runtime_json(file, &self.list);
    }
}

/// Checks every section checksum, unless this very file was already verified
/// on this host. With `remember`, the file's identity (device, inode, size,
/// modification and change times) is kept when they pass, so restoring one
/// bundle many times (clones, boot templates) reads it once; any change to the
/// file, even one that keeps its size and modification time, changes its
/// change time. A bundle received from a stream is used once: nothing to keep.
fn verify_once(config: &Config, bundle: &Bundle, remember: bool) -> Result<(), RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let marker = std::fs::metadata(bundle.path()).ok().map(|m| {
        let identity = format!(
            "{}:{}:{}:{}.{}:{}.{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        );
        use sha2::Digest;
        let key = hex::encode(sha2::Sha256::digest(identity.as_bytes()));
        config.dirs.verified().join(&key[..32])
    });
    if marker.as_ref().is_some_and(|m| m.exists()) {
        return Ok(());
    }
    bundle.verify()?;
    if let Some(marker) = marker.filter(|_| remember) {
        remember_verified(&marker);
    }
    Ok(())
}

/// Leaves the marker of a verified bundle, pruning markers older than a week.
fn remember_verified(marker: &Path) {
    let Some(dir) = marker.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let week = std::time::Duration::from_secs(7 * 24 * 3600);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > week);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::write(marker, b"");
}

/// Copies a bundle arriving on `input` into a file under the data directory.
pub fn receive(config: &Config, input: impl Read) -> Result<PathBuf, RestoreError> {
    receive_held(config, input).map(|(path, _)| path)
}

/// [`receive`], returning the received file too, with a shared lock on it
/// taken before it appeared under its name: while the lock is held, `ferry
/// gc` leaves it alone.
fn receive_held(
    config: &Config,
    mut input: impl Read,
) -> Result<(PathBuf, std::fs::File), RestoreError> {
    let dir = config.dirs.incoming();
    std::fs::create_dir_all(&dir).map_err(VmError::io("create incoming directory"))?;
    fsutil::remove_stale_staging(&dir);
    let dest = dir.join(format!("{}-{}.snap", record::now(), random_hex(6)?));
    let staging = fsutil::staging_path(&dest);
    let copy = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        // Guest memory: readable by this user only.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging)?;
        std::io::copy(&mut input, &mut f)?;
        f.sync_all()?;
        fsutil::lock_shared(&f)?;
        fsutil::publish(&staging, &dest)?;
        Ok(f)
    })();
    match copy {
        Ok(f) => Ok((dest, f)),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            Err(VmError::io("receive bundle")(e).into())
        }
    }
}

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// The bundle file.
    pub bundle: PathBuf,
    /// Whether ferry owns the file (received from a stream) and moves it into the VM.
    pub owned: bool,
    /// New name; the frozen VM's name when absent.
    pub name: Option<String>,
    /// `--remap-mount OLD=NEW`: live mounts recorded at OLD are served from NEW.
    pub remap_mounts: Vec<(PathBuf, PathBuf)>,
    /// Host port forwards; the ones recorded in the bundle when absent.
    pub ports: Option<Vec<crate::forward::PortForward>>,
    /// A new hostname for the guest; it keeps its own when absent (a hand-off
    /// moves the same machine).
    pub hostname: Option<String>,
    /// The user confirms the bundle's networking (`--net`).
    pub net: bool,
    /// Host directories the user confirms as live mounts (`--live-mount`).
    pub live_mounts: Vec<PathBuf>,
    /// Grant whatever the bundle's record asks for (`--trust-bundle-config`).
    pub trust_bundle_config: bool,
    /// Where else to look for the parents of an incremental bundle
    /// (`--parent`); they are looked for beside it first.
    pub parents: Vec<PathBuf>,
}

impl RestoreSpec {
    /// Restoring the bundle file at `bundle` with everything else as recorded.
    pub fn new(bundle: impl Into<PathBuf>) -> RestoreSpec {
        RestoreSpec {
            bundle: bundle.into(),
            owned: false,
            name: None,
            remap_mounts: Vec::new(),
            ports: None,
            hostname: None,
            net: false,
            live_mounts: Vec::new(),
            trust_bundle_config: false,
            parents: Vec::new(),
        }
    }
}

/// What a bundle's record asks of this host that `spec` does not confirm.
pub(crate) fn unconfirmed(rec: &VmRecord, spec: &RestoreSpec) -> Vec<String> {
    if spec.trust_bundle_config {
        return Vec::new();
    }
    let mut out = Vec::new();
    for m in rec
        .mounts
        .iter()
        .filter(|m| m.kind == crate::mounts::MountKind::Live)
    {
        let remapped = spec
            .remap_mounts
            .iter()
            .any(|(old, _)| m.host.starts_with(old));
        let repeated = spec
            .live_mounts
            .iter()
            .any(|h| h == &m.host || std::fs::canonicalize(h).is_ok_and(|c| c == m.host));
        if !remapped && !repeated {
            out.push(format!(
                "live mount of host directory {} at {} ({})",
                m.host.display(),
                m.guest,
                if m.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            ));
        }
    }
    if rec.net.is_some() && !spec.net {
        out.push("outbound networking (--net)".into());
    }
    if spec.ports.is_none() {
        for p in rec.ports.iter().filter(|p| !p.host_ip.is_loopback()) {
            out.push(format!("port forward listening on {}", p.host_addr()));
        }
    }
    out
}

/// Restores a bundle into a new running VM and returns it once its agent answers,
/// with the guest's wall clock and RNG refreshed. A failed restore leaves
/// no VM behind; a bundle received from a stream ([`RestoreSpec::owned`]) is
/// kept, and the error says where.
pub fn restore(config: &Arc<Config>, spec: &RestoreSpec) -> Result<Machine, RestoreError> {
    restore_as(config, spec, |_| {})
}

/// Receives a bundle from `input` and restores it, after checking what can
/// be checked before reading (name, ports, KVM). On a failure after the
/// stream was read, the received bundle is kept and the error names it.
pub fn restore_stream(
    config: &Arc<Config>,
    input: impl Read,
    spec: &RestoreSpec,
) -> Result<Machine, RestoreError> {
    precheck(config, spec)?;
    // Locked until the restore is over: `ferry gc` removes received bundles.
    let (path, _lock) = receive_held(config, input)?;
    let spec = RestoreSpec {
        bundle: path,
        owned: true,
        ..spec.clone()
    };
    restore(config, &spec)
}

/// [`restore`], with `adjust` applied to the VM's record before the VM is
/// created (a boot from a template records the image and mounts it was asked for).
pub(crate) fn restore_as(
    config: &Arc<Config>,
    spec: &RestoreSpec,
    adjust: impl FnOnce(&mut VmRecord),
) -> Result<Machine, RestoreError> {
    restore_with(config, spec, adjust, None)
}

/// [`restore_as`], with guest memory from `store` rather than the bundle.
pub(crate) fn restore_with(
    config: &Arc<Config>,
    spec: &RestoreSpec,
    adjust: impl FnOnce(&mut VmRecord),
    store: Option<&crate::store::memory::StoreMemory>,
) -> Result<Machine, RestoreError> {
    match restore_inner(config, spec, adjust, store) {
        Err(e) if spec.owned && spec.bundle.exists() => Err(RestoreError::Received {
            path: spec.bundle.clone(),
            inner: Box::new(e),
        }),
        other => other,
    }
}

fn restore_inner(
    config: &Arc<Config>,
    spec: &RestoreSpec,
    adjust: impl FnOnce(&mut VmRecord),
    store: Option<&crate::store::memory::StoreMemory>,
) -> Result<Machine, RestoreError> {
    let mut phases = crate::progress::Phases::from_env();
    let bundle = Bundle::open(&spec.bundle)?;
    phases.mark("open");
    // Bundle::open checked the manifest against itself; the frozen VM's
    // record must agree with it too, before anything else: the VM is built
    // with the record's RAM size, which must be what the memory regions hold.
    let mut rec: VmRecord = serde_json::from_slice(&bundle.read_section(SectionKind::Record)?)
        .map_err(|e| BundleError::BadManifest(format!("record: {e}")))?;
    bundle.check_memory_layout(u64::from(rec.memory_mib) << 20)?;
    phases.mark("check: record");
    let host_cpu = check_compatible(config, &bundle)?;
    phases.mark("check: arch and CPU");
    // An incremental bundle: every parent found and its digest checked
    // before anything is created.
    let ancestors = super::chain::ancestors(&spec.bundle, &bundle, &spec.parents)?;
    if !ancestors.is_empty() {
        phases.mark("check: parents");
    }
    // The disk base is the oldest bundle's.
    let info = &ancestors
        .first()
        .map_or(&bundle, |(_, b)| b)
        .manifest()
        .disk;
    // A thin bundle's base must be here before anything is created or read in
    // full: a host without it refuses at once and keeps nothing.
    // A VM restored from a store may fetch the image after it starts.
    let image_comes = store.is_some_and(|s| s.lazy_image.is_some());
    let thin_base = if info.thin {
        let found = super::disk::find_base(&config.dirs.cache, info)?;
        if found.is_none() && !image_comes {
            return Err(RestoreError::BaseMissing {
                base_id: info.base_id.clone(),
                image: info.base_image.clone(),
            });
        }
        phases.mark("find thin base");
        found
    } else {
        None
    };
    verify_once(config, &bundle, !spec.owned)?;
    for (_, b) in &ancestors {
        verify_once(config, b, true)?;
    }
    phases.mark("check: checksums");
    // The memory tables (extents and frames) are bounded and consistent
    // before any VM directory exists; the VMM process maps memory by them.
    bundle.memory_image()?;
    for (_, b) in &ancestors {
        b.memory_image()?;
    }
    phases.mark("check: memory tables");
    let asked = unconfirmed(&rec, spec);
    if !asked.is_empty() {
        return Err(RestoreError::ConfigUnconfirmed(asked));
    }
    rec.name = spec.name.clone().unwrap_or(rec.name);
    rec.id = random_hex(8)?;
    rec.created_at = record::now();
    rec.ephemeral = false;
    rec.image = format!("restored from {}", spec.bundle.display());
    crate::mounts::remap_for_restore(&mut rec.mounts, &spec.remap_mounts)?;
    if let Some(ports) = &spec.ports {
        rec.ports = ports.clone();
    }
    adjust(&mut rec);
    let registry = Registry::new(&config.dirs);
    crate::forward::check_available(&rec.ports, &registry).map_err(BootError::from)?;
    let (dir, owner) = registry.create(&rec)?;
    let machine = Machine {
        record: rec,
        dir,
        config: Arc::clone(config),
        owner: Some(Arc::new(owner)),
    };
    let started = (|| -> Result<(), RestoreError> {
        let bundle_path = if spec.owned {
            // Kept where it was received until the VM runs: a failed restore
            // leaves it for a retry.
            spec.bundle.clone()
        } else {
            std::fs::canonicalize(&spec.bundle).map_err(VmError::io("resolve bundle path"))?
        };
        phases.mark("VM directory");
        let oldest = ancestors.first().map_or(&bundle, |(_, b)| b);
        let filling = store.and_then(|s| s.filling_image(&machine.dir.root));
        let base = match (&thin_base, filling) {
            (Some(found), _) => found.clone(),
            // Empty until the VMM writes the image in, window by window.
            (None, Some(file)) if info.thin => {
                std::fs::File::create(&file)
                    .and_then(|f| f.set_len(info.size))
                    .map_err(BundleError::io("create the disk image's file"))?;
                file
            }
            (None, _) => super::disk::ensure_base(&config.dirs.cache, oldest, info)?,
        };
        phases.mark("disk base");
        let mut tops: Vec<&Bundle> = ancestors.iter().map(|(_, b)| b).collect();
        tops.push(&bundle);
        super::disk::restore_root_chain(&tops, &base, &machine.dir.root_disk())?;
        phases.mark("disk top");
        let parents = ancestors
            .iter()
            .map(|(p, _)| std::fs::canonicalize(p).map_err(VmError::io("resolve parent path")))
            .collect::<Result<Vec<_>, _>>()?;
        machine.spawn_vmm(Launch::Restore {
            bundle: bundle_path,
            parents,
            store: store.cloned(),
        })?;
        phases.mark("VMM up");
        // The refresh rides on the Hello that finds the agent answering.
        Refresh::new(spec.hostname.as_deref())?.on_hello(&machine)?;
        phases.mark("agent answers; clock, RNG and name");
        Ok(())
    })();
    if let Err(e) = started {
        let _ = machine.clone().remove();
        return Err(e);
    }
    if spec.owned {
        // The VM runs: the received bundle now belongs to it (its memory is
        // mapped from the file) and goes away with it.
        let inside = machine.dir.root.join("bundle.snap");
        if std::fs::rename(&spec.bundle, &inside).is_err() {
            tracing::warn!("received bundle stays at {}", spec.bundle.display());
        }
    }
    host_cpu.remember();
    if !machine.record.ephemeral {
        machine.release();
    }
    Ok(machine)
}

/// After a restore or fork: the guest's wall clock jumps to now, its kernel
/// RNG gets fresh host entropy (so siblings never share random streams) and,
/// if given, it takes a new hostname. A guest that cannot be reseeded is not
/// handed out: it would share its random streams with its source.
pub struct Refresh {
    seed: [u8; 64],
    hostname: Option<String>,
}

impl Refresh {
    /// Fresh host entropy, and `hostname` if given.
    pub fn new(hostname: Option<&str>) -> Result<Self, BootError> {
        let mut seed = [0u8; 64];
        getrandom::fill(&mut seed).map_err(|e| BootError::ReseedFailed(e.to_string()))?;
        Ok(Self {
            seed,
            hostname: hostname.map(str::to_string),
        })
    }

    /// The requests, with the clock read now: made when the connection
    /// that carries them is up.
    pub fn requests(&self) -> Vec<ferry_protocol::Message> {
        use ferry_protocol::Message;
        let mut requests = vec![
            Session::set_clock_request(std::time::SystemTime::now()),
            Message::AddEntropy(self.seed.to_vec()),
        ];
        if let Some(name) = &self.hostname {
            requests.push(Message::SetHostname(name.clone()));
        }
        requests
    }

    /// Waits for `machine`'s agent and refreshes the guest in the same burst
    /// as the Hello that finds it, so the refresh costs no round trip of its
    /// own.
    pub fn on_hello(&self, machine: &Machine) -> Result<(), BootError> {
        let (_session, results) = machine.wait_for_agent_with(&mut || self.requests())?;
        Self::check(&results)
    }

    /// What the agent answered: only a refused reseed fails the refresh.
    pub fn check(results: &[Result<(), ferry_protocol::ClientError>]) -> Result<(), BootError> {
        if let Some(Err(e)) = results.first() {
            tracing::warn!("setting the guest clock: {e}");
        }
        if let Some(Err(e)) = results.get(1) {
            return Err(BootError::ReseedFailed(e.to_string()));
        }
        if let Some(Err(e)) = results.get(2) {
            tracing::warn!("setting the guest's hostname: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest agent that accepts the session and the clock but refuses the
    /// entropy: the guest must not be handed out.
    #[test]
    fn a_guest_that_cannot_be_reseeded_is_refused() {
        use ferry_protocol::{read_frame, write_frame, ErrorCode, Message};
        use std::os::unix::net::UnixStream;
        let (host, mut agent) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let mut requests = 0;
            while let Ok(msg) = read_frame(&mut agent) {
                requests += 1;
                let reply = match msg {
                    Message::Hello { version, .. } => Message::HelloOk {
                        version,
                        agent: "fake".into(),
                    },
                    Message::AddEntropy { .. } => Message::Error {
                        code: ErrorCode::EntropyFailed,
                        message: "RNDADDENTROPY: operation not permitted".into(),
                    },
                    _ => Message::Ok,
                };
                if write_frame(&mut agent, &reply).is_err() {
                    break;
                }
            }
            requests
        });
        let conn = std::sync::Mutex::new(Some(host));
        let client = ferry_protocol::Client::from_connector("00", move || {
            conn.lock()
                .unwrap()
                .take()
                .ok_or_else(|| std::io::Error::other("one connection only"))
        });
        // As a restore sends it: riding on the Hello.
        let refresh = Refresh::new(Some("sibling")).unwrap();
        let (session, results) = client.session_with(&mut || refresh.requests()).unwrap();
        let err = Refresh::check(&results).unwrap_err();
        assert_eq!(err.code(), "GUEST_RESEED_FAILED");
        assert!(err.to_string().contains("operation not permitted"), "{err}");
        drop(session);
        drop(client);
        assert!(
            fake.join().unwrap() >= 3,
            "hello, clock and entropy reached the agent"
        );
    }
    use ferry_snapshot::manifest::{CpuInfo, DiskInfo, MemoryRegion};
    use ferry_snapshot::{disk, BundleWriter, Manifest};
    use sha2::Digest;

    /// A bundle whose checksums are all right, with a complete disk, whose
    /// manifest holds 1 MiB of guest memory and whose record asks for
    /// `record_mib` MiB.
    fn bundle(dir: &Path, record_mib: u32) -> PathBuf {
        let cluster = ferry_disk::CLUSTER_SIZE;
        let mut empty = Vec::new();
        let clusters = disk::write_clusters(&mut empty, || Ok(None)).unwrap();
        let record = serde_json::json!({
            "name": "frozen",
            "id": "0123456789abcdef",
            "created_at": 1,
            "cpus": 1,
            "memory_mib": record_mib,
            "kernel": "/nonexistent/vmlinux",
            "image": "test",
            "token": "t",
        });
        let mut w = BundleWriter::new(Vec::new()).unwrap();
        w.section_bytes(SectionKind::Record, record.to_string().as_bytes())
            .unwrap();
        w.section_bytes(SectionKind::VmState, b"{}").unwrap();
        w.section_bytes(SectionKind::DiskBase, &empty).unwrap();
        w.section_bytes(SectionKind::DiskTop, &empty).unwrap();
        let m = Manifest {
            format_version: 0,
            ferry_version: "test".into(),
            created_at: 1,
            arch: std::env::consts::ARCH.into(),
            cpu: CpuInfo::default(),
            vm_name: "frozen".into(),
            cpus: 1,
            memory_mib: 1,
            memory_regions: vec![MemoryRegion {
                guest_addr: 0,
                size: 1 << 20,
            }],
            memory_bytes: 0,
            memory_stored_bytes: 0,
            memory_prefetch_frames: Vec::new(),
            devices: vec![],
            disk: DiskInfo {
                size: 4 * cluster,
                cluster_size: cluster,
                base_id: hex::encode(sha2::Sha256::digest(&empty)),
                base_clusters: clusters,
                top_clusters: clusters,
                thin: false,
                base_image: None,
                base_cache_path: None,
            },
            sections: vec![],
            parent: None,
        };
        let path = dir.join(format!("record-{record_mib}.snap"));
        std::fs::write(&path, w.finish(m).unwrap()).unwrap();
        path
    }

    #[test]
    fn a_record_asking_for_other_ram_than_the_bundle_holds_is_refused_before_any_vm_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Arc::new(Config {
            dirs: crate::config::Dirs {
                data: tmp.path().join("data"),
                cache: tmp.path().join("cache"),
            },
            // Were the VM ever started, this would fail it otherwise.
            vmm: Some(tmp.path().join("no-such-ferry-vmm")),
            ..Config::default()
        });
        let path = bundle(tmp.path(), 512);
        let opened = Bundle::open(&path).unwrap();
        opened.verify().unwrap();
        let spec = RestoreSpec {
            name: Some("hostile".into()),
            trust_bundle_config: true,
            ..RestoreSpec::new(&path)
        };
        let err = restore(&config, &spec).unwrap_err();
        assert_eq!(err.code(), "BUNDLE_MANIFEST_INVALID", "{err}");
        assert!(err.to_string().contains("memory regions"), "{err}");
        let vms = std::fs::read_dir(config.dirs.vms()).map_or(0, |d| d.count());
        assert_eq!(vms, 0, "no VM directory was created");
        assert!(
            !config.dirs.cache.join("bases").exists(),
            "no disk base was unpacked"
        );
    }
}
