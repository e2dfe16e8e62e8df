//! Clean-up of what killed `ferry` and `ferry-vmm` processes leave behind.
//!
//! Every kind of leftover is recognized by how it is made, and nothing a
//! live process (a running VM, a restore, a snapshot stream) uses is removed:
//!
//! - **staging** (`.NAME.tmp-PID`, see [`crate::fsutil::publish`]) and
//!   **partial bundles** (`.NAME.partial-PID`, a bundle writer's file) whose
//!   process is gone, in every directory where ferry makes files;
//! - **snapshot FIFOs** (`snapshot-*.fifo`) in VM directories whose lock no
//!   operation holds (for a VM without a lock file: older than a grace
//!   period, and its VM not running or, in a thorough pass, the FIFO open
//!   nowhere);
//! - **abandoned VM directories**: no `vm.json`, no live VMM, older than the
//!   registry's creation grace period, not locked;
//! - **fork layers** in `<data>/layers` that no VM's disk chain (running or
//!   stopped) names and no process has open, unless named after a VM that
//!   has no root disk (a fork cut short); none while any VM is locked by an
//!   operation (a fork moves disks around);
//! - **received bundles** in `<data>/incoming`, kept after a failed restore
//!   for a retry: removed only by a thorough pass, and never while a restore
//!   holds its lock on one or any process has it open or mapped.
//!
//! The cheap pass (`thorough = false`) reads directories only, never a disk
//! header or `/proc` beyond the pid checks: staging leftovers, partial
//! bundles and FIFOs of VMs that are not running. `ferry` runs it at every
//! start; `ferry gc` runs the thorough one.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::Dirs;
use crate::fsutil::{self, Freed};
use crate::vm::record::{self, PidRecord, VmDir};
use crate::vm::registry::{self, try_op_lock, OpLock};

/// What a leftover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GcKind {
    /// A file or directory being built for publication whose process is gone.
    Staging,
    /// A bundle being written whose writer is gone.
    PartialBundles,
    /// A snapshot stream's FIFO left in a VM directory.
    Fifos,
    /// A VM directory whose creation was interrupted.
    AbandonedVms,
    /// A frozen fork layer no VM's disk uses.
    Layers,
    /// A received bundle kept after a failed restore.
    Incoming,
}

impl GcKind {
    /// Every kind, in report order.
    pub const ALL: [GcKind; 6] = [
        GcKind::Staging,
        GcKind::PartialBundles,
        GcKind::Fifos,
        GcKind::AbandonedVms,
        GcKind::Layers,
        GcKind::Incoming,
    ];

    /// What one of this kind is called, for people.
    pub fn describe(self) -> &'static str {
        match self {
            GcKind::Staging => "unfinished files of interrupted work",
            GcKind::PartialBundles => "partial bundles of interrupted snapshots",
            GcKind::Fifos => "snapshot stream FIFOs",
            GcKind::AbandonedVms => "half-created VM directories",
            GcKind::Layers => "fork disk layers no VM uses",
            GcKind::Incoming => "received bundles kept after failed restores",
        }
    }
}

/// What a clean-up removed, per kind, and what it kept on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Count and bytes removed, for every kind (zero when none).
    pub removed: BTreeMap<GcKind, Freed>,
    /// Leftovers kept because something may still use them, and why.
    pub kept: Vec<String>,
}

impl Default for GcReport {
    fn default() -> Self {
        GcReport {
            removed: GcKind::ALL.iter().map(|k| (*k, Freed::default())).collect(),
            kept: Vec::new(),
        }
    }
}

impl GcReport {
    /// What was removed of `kind`.
    pub fn of(&self, kind: GcKind) -> Freed {
        self.removed.get(&kind).copied().unwrap_or_default()
    }

    /// Everything removed.
    pub fn total(&self) -> Freed {
        let mut t = Freed::default();
        for f in self.removed.values() {
            t += *f;
        }
        t
    }

    fn add(&mut self, kind: GcKind, bytes: u64) {
        self.removed.entry(kind).or_default().add(bytes);
    }

    fn add_all(&mut self, kind: GcKind, freed: Freed) {
        *self.removed.entry(kind).or_default() += freed;
    }
}

/// Removes what killed ferry and VMM processes left in the runtime's
/// directories `dirs` (see the module documentation). Never fails: what
/// cannot be read or removed is left as it is.
pub fn collect(dirs: &Dirs, thorough: bool) -> GcReport {
    collect_with(dirs, thorough, registry::CREATION_GRACE)
}

/// [`collect`], where leftovers that may belong to work just started (VM
/// directories, FIFOs of VMs without a lock file) are kept while younger
/// than `grace`.
fn collect_with(dirs: &Dirs, thorough: bool, grace: Duration) -> GcReport {
    let mut report = GcReport::default();
    for dir in runtime_dirs(dirs) {
        let (publish, bundle) = fsutil::remove_stale_staging(&dir);
        report.add_all(GcKind::Staging, publish);
        report.add_all(GcKind::PartialBundles, bundle);
    }
    // Beside paths users chose (snapshots, baked images).
    report.add_all(GcKind::PartialBundles, crate::journal::sweep(&dirs.data));
    // Who has which file open: read once, and only by a thorough pass.
    orphans(dirs, &mut report);
    let mut open = thorough.then(OpenFiles::scan);
    fifos(dirs, grace, open.as_mut(), &mut report);
    if let Some(open) = open.as_mut() {
        abandoned_vms(dirs, grace, &mut report);
        layers(dirs, open, &mut report);
        incoming(dirs, open, &mut report);
    }
    report
}

/// The subdirectories of `dir` (no symbolic links, no staging directories).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| fsutil::staging_owner(&e.file_name().to_string_lossy()).is_none())
        .map(|e| e.path())
        .collect()
}

/// Where ferry builds and publishes files, under the data directory and
/// under the cache directory. Only these are swept (and each VM directory):
/// the data or cache directory may have been pointed at a directory that
/// holds other things too.
const DATA_SUBDIRS: [&str; 5] = ["vms", "layers", "incoming", "verified", "journal"];
const CACHE_SUBDIRS: [&str; 8] = [
    "templates",
    "bases",
    "encoded-bases",
    "images",
    "kernel",
    "rootfs",
    "passt",
    "logs",
];

/// Every directory where ferry builds and publishes files.
fn runtime_dirs(dirs: &Dirs) -> BTreeSet<PathBuf> {
    let mut out: BTreeSet<PathBuf> = DATA_SUBDIRS
        .iter()
        .map(|d| dirs.data.join(d))
        .chain(CACHE_SUBDIRS.iter().map(|d| dirs.cache.join(d)))
        .collect();
    out.extend(subdirs(&dirs.vms()));
    out
}

/// Whether `m` (its contents or its inode) changed less than `grace` ago.
/// A time in the future counts as now.
fn younger_than(m: &std::fs::Metadata, grace: Duration) -> bool {
    let at = |secs: i64, nsecs: i64| {
        SystemTime::UNIX_EPOCH
            + Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32)
    };
    let last = at(m.mtime(), m.mtime_nsec()).max(at(m.ctime(), m.ctime_nsec()));
    last.elapsed().map_or(true, |age| age < grace)
}

/// Whether the VMM process of the VM in `dir` is alive.
fn vm_running(dir: &VmDir) -> bool {
    record::read_json::<PidRecord>(&dir.pid()).is_some_and(|p| p.alive())
}

/// Snapshot FIFOs: a stream's reader (a ferry process) makes one in the VM
/// directory, holding the VM's lock until it has removed it again, and the
/// VMM writes into it. With the lock free, every one is left over. A VM
/// without a lock file gives no such certainty: there, one is removed once
/// older than `grace` and its VM is not running, or (a thorough pass, with
/// `open`) no process has it open.
fn fifos(dirs: &Dirs, grace: Duration, mut open: Option<&mut OpenFiles>, report: &mut GcReport) {
    for root in subdirs(&dirs.vms()) {
        let dir = VmDir { root };
        let found: Vec<(PathBuf, std::fs::Metadata)> = std::fs::read_dir(&dir.root)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("snapshot-") && name.ends_with(".fifo")
            })
            .filter_map(|e| Some((e.path(), std::fs::symlink_metadata(e.path()).ok()?)))
            .filter(|(_, m)| m.file_type().is_fifo())
            .collect();
        if found.is_empty() {
            continue;
        }
        let lock = try_op_lock(&dir);
        if let OpLock::Busy = lock {
            continue;
        }
        let running = vm_running(&dir);
        for (path, m) in found {
            let stale = match (&lock, open.as_deref_mut()) {
                (OpLock::Held { .. }, _) => true,
                _ if younger_than(&m, grace) => false,
                _ if !running => true,
                (_, Some(open)) => !open.contains(&m),
                (_, None) => false,
            };
            if stale && std::fs::remove_file(&path).is_ok() {
                report.add(GcKind::Fifos, 0);
            }
        }
        drop(lock);
    }
}

/// VMs whose owner died: a creation cut short, or an ephemeral VM whose
/// process is gone (see [`registry::Owner`]). Cheap: one `open` per VM that
/// has an owner file, which only VMs being created or ephemeral ones have.
fn orphans(dirs: &Dirs, report: &mut GcReport) {
    for root in subdirs(&dirs.vms()) {
        if let Some(bytes) = registry::remove_orphan(&VmDir { root }) {
            report.add(GcKind::AbandonedVms, bytes);
        }
    }
}

/// VM directories whose creation was interrupted (see [`registry::is_abandoned`]).
fn abandoned_vms(dirs: &Dirs, grace: Duration, report: &mut GcReport) {
    for root in subdirs(&dirs.vms()) {
        let named = root
            .file_name()
            .is_some_and(|n| registry::validate_name(&n.to_string_lossy()).is_ok());
        let dir = VmDir { root };
        if !named || !registry::is_abandoned(&dir, grace) {
            continue;
        }
        let lock = try_op_lock(&dir);
        if let OpLock::Busy = lock {
            continue;
        }
        let bytes = fsutil::disk_usage(&dir.root);
        if std::fs::remove_dir_all(&dir.root).is_ok() {
            report.add(GcKind::AbandonedVms, bytes);
        }
        drop(lock);
    }
}

/// (device, inode) of a file.
type FileId = (u64, u64);

fn id_of(m: &std::fs::Metadata) -> FileId {
    (m.dev(), m.ino())
}

/// Every file in the disk chain of `root` (the root disk of a VM), from the
/// root disk down to the raw image at the bottom.
fn disk_chain(root: &Path) -> Result<Vec<FileId>, ferry_disk::DiskError> {
    use ferry_disk::Disk;
    let disk = Disk::open(root, true)?;
    let mut chain = Vec::new();
    let mut d = &disk;
    loop {
        match d {
            Disk::Layer(l) => {
                chain.push(id_of(&std::fs::metadata(l.path())?));
                d = l.backing();
            }
            Disk::Raw { file, .. } => {
                chain.push(id_of(&file.metadata()?));
                return Ok(chain);
            }
        }
    }
}

/// The part of a VM record the clean-up reads.
#[derive(serde::Deserialize)]
struct RecordId {
    id: String,
}

/// Frozen fork layers no VM's disk chain names and no process has open. A
/// fork renames its source's root disk to `<data>/layers/ID-RANDOM.img`
/// (ID: the source's record id) and then makes a new root disk over it: a
/// layer named after a VM that has no root disk may be that VM's disk, left
/// so by a fork that was cut short, and stays. If any VM's chain cannot be
/// read, or any VM is busy with an operation (a fork moves disks around),
/// every layer stays.
fn layers(dirs: &Dirs, open: &mut OpenFiles, report: &mut GcReport) {
    let candidates: Vec<(PathBuf, std::fs::Metadata)> = std::fs::read_dir(dirs.layers())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.path(), std::fs::symlink_metadata(e.path()).ok()?)))
        .filter(|(_, m)| m.is_file())
        .collect();
    if candidates.is_empty() {
        return;
    }
    let mut used: HashSet<FileId> = HashSet::new();
    // Ids of VMs without a root disk, with their directories.
    let mut diskless: Vec<(String, PathBuf)> = Vec::new();
    for root in subdirs(&dirs.vms()) {
        let dir = VmDir { root };
        if let OpLock::Busy = try_op_lock(&dir) {
            report.kept.push(format!(
                "every fork layer in {}: VM {} is busy with an operation",
                dirs.layers().display(),
                dir.root.display()
            ));
            return;
        }
        let disk = dir.root_disk();
        if std::fs::symlink_metadata(&disk).is_err() {
            if let Some(rec) = record::read_json::<RecordId>(&dir.record()) {
                diskless.push((rec.id, dir.root));
            }
            continue;
        }
        match disk_chain(&disk) {
            Ok(chain) => used.extend(chain),
            Err(e) => {
                report.kept.push(format!(
                    "every fork layer in {}: the disk chain of {} cannot be read ({e})",
                    dirs.layers().display(),
                    disk.display()
                ));
                return;
            }
        }
    }
    for (path, m) in candidates {
        if used.contains(&id_of(&m)) || open.contains(&m) {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let owner = diskless.iter().find(|(id, _)| {
            !id.is_empty()
                && name
                    .strip_prefix(id.as_str())
                    .is_some_and(|rest| rest.starts_with('-'))
        });
        if let Some((_, vm)) = owner {
            report.kept.push(format!(
                "{}: it may be the disk of {}, which has no root disk",
                path.display(),
                vm.display()
            ));
            continue;
        }
        let bytes = fsutil::disk_usage(&path);
        if std::fs::remove_file(&path).is_ok() {
            report.add(GcKind::Layers, bytes);
        }
    }
}

/// Received bundles kept for a retry. One a restore holds locked (see
/// [`crate::snapshot::restore::restore_stream`]), or that any process has
/// open or mapped (a retry restoring from it, a VM whose memory it is), stays.
fn incoming(dirs: &Dirs, open: &mut OpenFiles, report: &mut GcReport) {
    let entries: Vec<PathBuf> = std::fs::read_dir(dirs.incoming())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    for path in entries {
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let Ok(m) = file.metadata() else { continue };
        match fsutil::try_lock_exclusive(&file) {
            Ok(true) if !open.contains(&m) => {}
            Ok(_) => {
                report
                    .kept
                    .push(format!("{}: in use by a restore", path.display()));
                continue;
            }
            Err(_) => continue,
        }
        let bytes = fsutil::disk_usage(&path);
        // Removed while the lock is held: no restore can have taken it since.
        if std::fs::remove_file(&path).is_ok() {
            report.add(GcKind::Incoming, bytes);
        }
        drop(file);
    }
}

/// The files processes have open or mapped, as far as `/proc` shows them to
/// this user (this user's processes, which are the ones that can open its
/// 0600 files, root's aside). This process counts too: a program embedding
/// the runtime may be streaming a snapshot or restoring while it collects.
/// Descriptors are read before the clean-up opens anything itself.
struct OpenFiles {
    /// Open descriptors of every visible process.
    fds: HashSet<FileId>,
    /// Mapped files, read only when first needed: it is the larger read.
    maps: Option<HashSet<FileId>>,
}

impl OpenFiles {
    fn scan() -> OpenFiles {
        let mut fds = HashSet::new();
        for pid in pids() {
            let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                // Follows the descriptor's link to the open file itself.
                if let Ok(m) = std::fs::metadata(e.path()) {
                    fds.insert(id_of(&m));
                }
            }
        }
        OpenFiles { fds, maps: None }
    }

    fn contains(&mut self, m: &std::fs::Metadata) -> bool {
        let id = id_of(m);
        self.fds.contains(&id) || self.maps.get_or_insert_with(mapped_files).contains(&id)
    }
}

/// Every process.
fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Files mapped into any process (`/proc/PID/maps`: device as
/// `major:minor` in hex, then the inode).
fn mapped_files() -> HashSet<FileId> {
    let mut out = HashSet::new();
    for pid in pids() {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        for line in maps.lines() {
            let mut f = line.split_whitespace().skip(3);
            let (Some(dev), Some(ino)) = (f.next(), f.next()) else {
                continue;
            };
            let Some((major, minor)) = dev.split_once(':') else {
                continue;
            };
            let (Ok(major), Ok(minor), Ok(ino)) = (
                u64::from_str_radix(major, 16),
                u64::from_str_radix(minor, 16),
                ino.parse::<u64>(),
            ) else {
                continue;
            };
            if ino != 0 {
                out.insert((makedev(major, minor), ino));
            }
        }
    }
    out
}

/// A device number from its major and minor parts, as Linux's `makedev`.
fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::record::write_json;

    const DEAD: u32 = 4_194_399; // above any pid_max: never a process

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn file(path: &Path, bytes: usize) -> PathBuf {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![7u8; bytes]).unwrap();
        path.to_path_buf()
    }

    /// A VM directory with a record; `running` gives it this process as its VMM.
    fn vm(dirs: &Dirs, name: &str, running: bool) -> VmDir {
        let dir = VmDir::new(&dirs.vms(), name);
        std::fs::create_dir_all(&dir.root).unwrap();
        let id = format!("{name}0id");
        write_json(
            &dir.record(),
            &serde_json::json!({ "name": name, "id": id }),
        )
        .unwrap();
        if running {
            write_json(&dir.pid(), &PidRecord::current().unwrap()).unwrap();
        }
        dir
    }

    /// Every path under `root`, relative to it.
    fn tree(root: &Path) -> BTreeSet<String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
                let p = e.path();
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(root, &p, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(root, root, &mut out);
        out
    }

    struct Fake {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        dirs: Dirs,
        /// Leftovers only a thorough pass removes.
        thorough_only: Vec<PathBuf>,
        /// Leftovers every pass removes.
        cheap: Vec<PathBuf>,
        /// Held open or locked while the pass runs.
        _held: Vec<std::fs::File>,
    }

    /// A data and a cache directory with each kind of leftover, a running
    /// VM, a stopped one, and what they use.
    fn fake() -> Fake {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let dirs = Dirs {
            data: root.join("data"),
            cache: root.join("cache"),
        };
        let mut cheap = Vec::new();
        let mut thorough_only = Vec::new();
        let mut held = Vec::new();
        let me = std::process::id();

        // Disks: an image, three frozen layers in a chain and one alone.
        let image = file(&dirs.cache.join("images/abc/rootfs.ext4"), 1 << 16);
        let layers = dirs.layers();
        std::fs::create_dir_all(&layers).unwrap();
        let l0 = layers.join("src-0.img");
        ferry_disk::create_layer(&l0, &image, None).unwrap();
        let l1 = layers.join("src-1.img");
        ferry_disk::create_layer(&l1, &l0, None).unwrap();
        let l2 = layers.join("other-2.img");
        ferry_disk::create_layer(&l2, &image, None).unwrap();
        let unused = layers.join("gone-3.img");
        ferry_disk::create_layer(&unused, &l0, None).unwrap();
        thorough_only.push(unused);

        // A running VM over l1 (so l0 too), with its live files.
        let live = vm(&dirs, "live", true);
        ferry_disk::create_layer(&live.root_disk(), &l1, None).unwrap();
        file(&live.vmm_log(), 10);
        // Its socket file outlives the listener.
        drop(std::os::unix::net::UnixListener::bind(live.control()).unwrap());
        file(&live.root.join(format!(".pid.json.tmp-{me}")), 3);
        cheap.push(file(&live.root.join(format!(".vm.json.tmp-{DEAD}")), 3));
        // A stream still being read (held open), and one nobody reads.
        let streaming = live.root.join("snapshot-aaaa.fifo");
        mkfifo(&streaming);
        held.push(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&streaming)
                .unwrap(),
        );
        let forgotten = live.root.join("snapshot-bbbb.fifo");
        mkfifo(&forgotten);
        thorough_only.push(forgotten);

        // A stopped VM over l2, with a FIFO its dead stream left.
        let stopped = vm(&dirs, "stopped", false);
        ferry_disk::create_layer(&stopped.root_disk(), &l2, None).unwrap();
        let stale_fifo = stopped.root.join("snapshot-cccc.fifo");
        mkfifo(&stale_fifo);
        cheap.push(stale_fifo);

        // A VM directory whose creation was interrupted.
        let half = dirs.vms().join("half");
        file(&half.join("console.log"), 100);
        thorough_only.push(half);

        // Received bundles: one kept after a failed restore, one a restore
        // holds, and a receive that was killed.
        let incoming = dirs.incoming();
        thorough_only.push(file(&incoming.join("1-aa.snap"), 5000));
        let restoring = file(&incoming.join("2-bb.snap"), 5000);
        let lock = std::fs::File::open(&restoring).unwrap();
        fsutil::lock_shared(&lock).unwrap();
        held.push(lock);
        cheap.push(file(&incoming.join(format!(".3-cc.snap.tmp-{DEAD}")), 5000));

        // Templates: a partial bundle of a dead VMM, and one being written.
        let templates = dirs.templates();
        cheap.push(file(
            &templates.join(format!(".ab.snap.partial-{DEAD}")),
            9000,
        ));
        file(&templates.join(format!(".cd.snap.partial-{me}")), 10);
        file(&templates.join("ef.snap"), 10);
        file(&templates.join("ef.json"), 10);
        // Interrupted builds in the caches, a file and a directory.
        let staged_dir = dirs.cache.join(format!("images/.def.tmp-{DEAD}"));
        file(&staged_dir.join("tree/bin/sh"), 100);
        cheap.push(staged_dir);
        cheap.push(file(
            &dirs.cache.join(format!("encoded-bases/.k.zst.tmp-{DEAD}")),
            100,
        ));
        cheap.push(file(
            &dirs.data.join(format!("layers/.x.img.tmp-{DEAD}")),
            100,
        ));
        // Named like staging, but where ferry never puts any: not its own.
        file(&dirs.data.join(format!(".notes.tmp-{DEAD}")), 10);
        file(&dirs.cache.join(format!("other/.x.tmp-{DEAD}")), 10);

        Fake {
            _tmp: tmp,
            root,
            dirs,
            thorough_only,
            cheap,
            _held: held,
        }
    }

    fn rel(f: &Fake, paths: &[PathBuf]) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for p in paths {
            out.insert(p.strip_prefix(&f.root).unwrap().display().to_string());
            if p.is_dir() {
                for sub in tree(p) {
                    out.insert(format!(
                        "{}/{sub}",
                        p.strip_prefix(&f.root).unwrap().display()
                    ));
                }
            }
        }
        out
    }

    #[test]
    fn the_cheap_pass_removes_staging_partial_bundles_and_dead_streams_only() {
        let f = fake();
        let before = tree(&f.root);
        let expected = rel(&f, &f.cheap);
        let report = collect_with(&f.dirs, false, Duration::ZERO);
        let gone: BTreeSet<String> = before.difference(&tree(&f.root)).cloned().collect();
        assert_eq!(gone, expected);
        assert_eq!(report.of(GcKind::Staging).count, 5);
        assert_eq!(report.of(GcKind::PartialBundles).count, 1);
        assert!(report.of(GcKind::PartialBundles).bytes >= 9000);
        assert_eq!(report.of(GcKind::Fifos).count, 1);
        for kind in [GcKind::AbandonedVms, GcKind::Layers, GcKind::Incoming] {
            assert_eq!(report.of(kind), Freed::default(), "{kind:?}");
        }
    }

    #[test]
    fn the_thorough_pass_removes_exactly_the_leftovers() {
        let f = fake();
        let before = tree(&f.root);
        let all: Vec<PathBuf> = f.cheap.iter().chain(&f.thorough_only).cloned().collect();
        let expected = rel(&f, &all);
        let report = collect_with(&f.dirs, true, Duration::ZERO);
        let gone: BTreeSet<String> = before.difference(&tree(&f.root)).cloned().collect();
        assert_eq!(gone, expected);
        assert_eq!(report.of(GcKind::Fifos).count, 2);
        assert_eq!(report.of(GcKind::AbandonedVms).count, 1);
        assert_eq!(report.of(GcKind::Layers).count, 1);
        assert_eq!(report.of(GcKind::Incoming).count, 1);
        assert!(report.of(GcKind::Incoming).bytes >= 5000);
        assert!(
            report.kept.iter().any(|k| k.contains("2-bb.snap")),
            "{:?}",
            report.kept
        );
        assert_eq!(report.total().count, 11);
        // A second pass finds nothing more.
        assert_eq!(collect_with(&f.dirs, true, Duration::ZERO).total().count, 0);
    }

    #[test]
    fn young_leftovers_that_may_belong_to_work_in_progress_stay() {
        let f = fake();
        let report = collect(&f.dirs, true);
        // Pid-checked staging goes at once, and so do layers no VM uses;
        // FIFOs of VMs without a lock file and VM directories wait out the
        // grace period.
        assert_eq!(report.of(GcKind::Staging).count, 5);
        assert_eq!(report.of(GcKind::Layers).count, 1);
        assert_eq!(report.of(GcKind::Fifos).count, 0);
        assert_eq!(report.of(GcKind::AbandonedVms).count, 0);
        assert!(f.dirs.vms().join("live/snapshot-bbbb.fifo").exists());
        assert!(f.dirs.vms().join("half").exists());
    }

    #[test]
    fn with_the_vm_lock_free_its_stream_fifos_are_all_left_over() {
        let f = fake();
        // The lock file an operation leaves; nobody holds it now.
        let live = VmDir::new(&f.dirs.vms(), "live");
        std::fs::write(live.lock(), b"").unwrap();
        let report = collect(&f.dirs, false);
        assert!(!live.root.join("snapshot-aaaa.fifo").exists());
        assert!(!live.root.join("snapshot-bbbb.fifo").exists());
        assert_eq!(report.of(GcKind::Fifos).count, 2);
        assert!(live.lock().exists());
    }

    #[test]
    fn a_layer_named_after_a_vm_without_a_root_disk_stays() {
        let f = fake();
        // A fork cut short between moving the source's disk into the layers
        // and making its new root disk over it.
        let cut = vm(&f.dirs, "cut", false);
        let id = "cut0id";
        let moved = f.dirs.layers().join(format!("{id}-0123456789abcdef.img"));
        let image = f.dirs.cache.join("images/abc/rootfs.ext4");
        ferry_disk::create_layer(&moved, &image, None).unwrap();
        let report = collect_with(&f.dirs, true, Duration::ZERO);
        assert!(moved.exists());
        assert!(
            report
                .kept
                .iter()
                .any(|k| k.contains(id) && k.contains("cut")),
            "{:?}",
            report.kept
        );
        assert_eq!(report.of(GcKind::Layers).count, 1, "gone-3.img only");
        assert!(cut.record().exists());
    }

    #[test]
    fn an_unreadable_disk_chain_keeps_every_layer() {
        let f = fake();
        // The stopped VM's disk now names a layer that is not there.
        let stopped = VmDir::new(&f.dirs.vms(), "stopped");
        std::fs::remove_file(stopped.root_disk()).unwrap();
        let missing = f.dirs.layers().join("missing.img");
        ferry_disk::create_layer(&missing, &f.dirs.layers().join("other-2.img"), None).unwrap();
        ferry_disk::create_layer(&stopped.root_disk(), &missing, None).unwrap();
        std::fs::remove_file(&missing).unwrap();
        let report = collect_with(&f.dirs, true, Duration::ZERO);
        assert_eq!(report.of(GcKind::Layers).count, 0);
        assert!(report.kept.iter().any(|k| k.contains("stopped")));
        assert!(f.dirs.layers().join("gone-3.img").exists());
    }

    #[test]
    fn a_busy_vm_keeps_its_streams_and_every_layer() {
        let f = fake();
        let stopped = VmDir::new(&f.dirs.vms(), "stopped");
        let lock = std::fs::File::create(stopped.lock()).unwrap();
        assert!(fsutil::try_lock_exclusive(&lock).unwrap());
        let report = collect_with(&f.dirs, true, Duration::ZERO);
        assert!(stopped.root.join("snapshot-cccc.fifo").exists());
        assert_eq!(report.of(GcKind::Layers).count, 0);
        assert!(
            report.kept.iter().any(|k| k.contains("busy")),
            "{:?}",
            report.kept
        );
        drop(lock);
        let report = collect_with(&f.dirs, true, Duration::ZERO);
        assert_eq!(report.of(GcKind::Layers).count, 1);
        assert!(!stopped.root.join("snapshot-cccc.fifo").exists());
    }

    #[test]
    fn the_report_serializes_every_kind() {
        let v = serde_json::to_value(GcReport::default()).unwrap();
        for kind in [
            "staging",
            "partial_bundles",
            "fifos",
            "abandoned_vms",
            "layers",
            "incoming",
        ] {
            assert_eq!(v["removed"][kind]["count"], 0, "{kind}");
            assert_eq!(v["removed"][kind]["bytes"], 0, "{kind}");
        }
    }

    #[test]
    fn device_numbers_match_the_kernel() {
        let m = std::fs::metadata("/proc/self/exe").unwrap();
        let dev = m.dev();
        // major and minor as glibc splits them.
        let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
        let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
        assert_eq!(makedev(major, minor), dev);
    }
}
