//! Restoring a bundle on this host: every check before anything is created,
//! then a VMM process that maps guest memory from the bundle lazily.

use std::io::Read;
use std::path::{Path, PathBuf};

use ferry_protocol::Session;
use ferry_snapshot::{Bundle, BundleError, SectionKind};
use serde::{Deserialize, Serialize};

use crate::error::Coded;
use crate::fsutil;
use crate::machine::{BootError, Machine};
use crate::vm::record::{self, VmRecord};
use crate::vm::{Registry, VmError};

/// Written into a VM's directory so its VMM process restores instead of booting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestorePlan {
    /// The bundle to map memory from.
    pub bundle: PathBuf,
}

/// File name of the plan in the VM directory.
pub const PLAN_FILE: &str = "restore.json";

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
            RestoreError::Bundle(BundleError::Io { .. }) => None,
        }
    }
}

/// Checks a bundle can run here without touching anything: structure, format
/// version, architecture, CPU features, then every checksum.
pub fn check(bundle: &Bundle) -> Result<(), RestoreError> {
    check_compatible(bundle)?;
    verify_once(bundle, true)
}

/// The architecture and CPU features a bundle needs, against this host.
fn check_compatible(bundle: &Bundle) -> Result<(), RestoreError> {
    let m = bundle.manifest();
    if m.arch != std::env::consts::ARCH {
        return Err(RestoreError::ArchMismatch {
            bundle: m.arch.clone(),
            host: std::env::consts::ARCH.into(),
        });
    }
    let host = ferry_vmm::snapshot::host_cpu_features().map_err(|e| {
        RestoreError::Boot(BootError::Vmm {
            code: e.code().into(),
            message: e.to_string(),
            hint: crate::vmm_process::kvm_hint("KVM_UNAVAILABLE"),
        })
    })?;
    let missing: Vec<String> = m
        .cpu
        .features
        .iter()
        .filter(|f| !host.contains(f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(RestoreError::CpuIncompatible(missing));
    }
    Ok(())
}

/// Checks every section checksum, unless this very file was already verified
/// on this host. With `remember`, the file's identity (device, inode, size,
/// modification and change times) is kept when they pass, so restoring one
/// bundle many times (clones, boot templates) reads it once; any change to the
/// file, even one that keeps its size and modification time, changes its
/// change time. A bundle received from a stream is used once: nothing to keep.
fn verify_once(bundle: &Bundle, remember: bool) -> Result<(), RestoreError> {
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
        crate::paths::data_dir().join("verified").join(&key[..32])
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
pub fn receive(mut input: impl Read) -> Result<PathBuf, RestoreError> {
    let dir = crate::paths::data_dir().join("incoming");
    std::fs::create_dir_all(&dir).map_err(VmError::io("create incoming directory"))?;
    fsutil::remove_stale_staging(&dir);
    let dest = dir.join(format!("{}-{}.snap", record::now(), std::process::id()));
    let staging = fsutil::staging_path(&dest);
    let copy = (|| {
        let mut f = std::fs::File::create(&staging)?;
        std::io::copy(&mut input, &mut f)?;
        f.sync_all()?;
        fsutil::publish(&staging, &dest)
    })();
    if let Err(e) = copy {
        let _ = std::fs::remove_file(&staging);
        return Err(VmError::io("receive bundle")(e).into());
    }
    Ok(dest)
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
}

/// Restores a bundle into a new running VM and returns it once its agent answers,
/// with the guest's wall clock and RNG refreshed. A failed restore leaves
/// nothing behind, not even a bundle received from a stream.
pub fn restore(spec: &RestoreSpec) -> Result<Machine, RestoreError> {
    restore_as(spec, |_| {})
}

/// [`restore`], with `adjust` applied to the VM's record before the VM is
/// created (a boot from a template records the image and mounts it was asked for).
pub(crate) fn restore_as(
    spec: &RestoreSpec,
    adjust: impl FnOnce(&mut VmRecord),
) -> Result<Machine, RestoreError> {
    let result = restore_inner(spec, adjust);
    if result.is_err() && spec.owned && spec.bundle.exists() {
        let _ = std::fs::remove_file(&spec.bundle);
    }
    result
}

fn restore_inner(
    spec: &RestoreSpec,
    adjust: impl FnOnce(&mut VmRecord),
) -> Result<Machine, RestoreError> {
    let mut phases = crate::progress::Phases::from_env();
    let bundle = Bundle::open(&spec.bundle)?;
    phases.mark("open");
    check_compatible(&bundle)?;
    let info = &bundle.manifest().disk;
    // A thin bundle's base must be here before anything is created or read in
    // full: a host without it refuses at once and keeps nothing.
    let thin_base = if info.thin {
        let found = super::disk::find_base(info)?.ok_or_else(|| RestoreError::BaseMissing {
            base_id: info.base_id.clone(),
            image: info.base_image.clone(),
        })?;
        phases.mark("find thin base");
        Some(found)
    } else {
        None
    };
    verify_once(&bundle, !spec.owned)?;
    phases.mark("check (arch, CPU, checksums)");
    let mut rec: VmRecord = serde_json::from_slice(&bundle.read_section(SectionKind::Record)?)
        .map_err(|e| BundleError::BadManifest(format!("record: {e}")))?;
    rec.name = spec.name.clone().unwrap_or(rec.name);
    rec.id = crate::machine::random_hex(8);
    rec.created_at = record::now();
    rec.ephemeral = false;
    rec.image = format!("restored from {}", spec.bundle.display());
    crate::mounts::remap_for_restore(&mut rec.mounts, &spec.remap_mounts)?;
    if let Some(ports) = &spec.ports {
        rec.ports = ports.clone();
    }
    adjust(&mut rec);
    let registry = Registry::default();
    crate::forward::check_available(&rec.ports, &registry).map_err(BootError::from)?;
    let dir = registry.create(&rec)?;
    let machine = Machine { record: rec, dir };
    let started = (|| -> Result<(), RestoreError> {
        let bundle_path = if spec.owned {
            let inside = machine.dir.root.join("bundle.snap");
            std::fs::rename(&spec.bundle, &inside).map_err(VmError::io("keep bundle"))?;
            inside
        } else {
            std::fs::canonicalize(&spec.bundle).map_err(VmError::io("resolve bundle path"))?
        };
        let base = match &thin_base {
            Some(found) => found.clone(),
            None => super::disk::ensure_base(&bundle, info)?,
        };
        phases.mark("disk base");
        super::disk::restore_root(&bundle, info, &base, &machine.dir.root_disk())?;
        phases.mark("disk top");
        record::write_runtime_json(
            &machine.dir.root.join(PLAN_FILE),
            &RestorePlan {
                bundle: bundle_path,
            },
        )
        .map_err(VmError::io("write restore plan"))?;
        machine.spawn_vmm()?;
        phases.mark("VMM up");
        let session = machine.wait_for_agent()?;
        phases.mark("agent answers");
        refresh_guest(&session, spec.hostname.as_deref());
        phases.mark("clock, RNG and name");
        Ok(())
    })();
    if let Err(e) = started {
        let _ = machine.clone().remove();
        return Err(e);
    }
    Ok(machine)
}

/// After a restore or fork: the guest's wall clock jumps to now, its kernel
/// RNG gets fresh host entropy (so siblings never share random streams) and,
/// if given, it takes a new hostname. All of it goes over `session`, the one
/// that found the agent answering.
pub fn refresh_guest(session: &Session, hostname: Option<&str>) {
    if let Err(e) = session.set_clock(std::time::SystemTime::now()) {
        tracing::warn!("setting the guest clock: {e}");
    }
    let mut seed = [0u8; 64];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut seed);
    }
    if let Err(e) = session.add_entropy(&seed) {
        tracing::warn!("reseeding the guest RNG: {e}");
    }
    if let Some(name) = hostname {
        if let Err(e) = session.set_hostname(name) {
            tracing::warn!("setting the guest's hostname: {e}");
        }
    }
}

/// Absolute paths inside `dir` (helper for plan files).
pub fn plan_path(dir: &Path) -> PathBuf {
    dir.join(PLAN_FILE)
}
