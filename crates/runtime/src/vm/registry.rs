//! The VMs on this host: one state directory each under `<data>/vms/`, unique
//! names, and detection of VMs whose VMM process died without saying so.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::record::{self, ExitRecord, PidRecord, VmDir, VmRecord};
use super::VmError;

/// A directory younger than this without `vm.json` may still be being created.
pub(crate) const CREATION_GRACE: Duration = Duration::from_secs(60);

/// Whether a VM is running.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum VmStatus {
    /// Its VMM process is alive.
    Running {
        /// VMM process id.
        pid: u32,
    },
    /// Its VMM process has ended.
    Stopped {
        /// Why, if known.
        reason: String,
    },
}

/// One VM as the registry knows it. Not serializable: its record holds the
/// agent token, which is never shown (`ferry ls` and `ferry inspect` show
/// `ferry::VmInfo`, which has no token).
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// The VM's record.
    pub record: VmRecord,
    /// Running or not.
    pub status: VmStatus,
    /// Its state directory.
    pub dir: PathBuf,
}

/// All VMs of this user.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// Checks a VM name: 1-63 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(VmError::InvalidName(name.to_string()))
    }
}

impl Registry {
    /// The registry of the runtime whose directories are `dirs`.
    pub fn new(dirs: &crate::config::Dirs) -> Registry {
        Registry::at(dirs.vms())
    }

    /// A registry rooted at `root`.
    pub fn at(root: PathBuf) -> Registry {
        Registry { root }
    }

    /// The state directory a VM named `name` has (or would have).
    pub fn dir(&self, name: &str) -> VmDir {
        VmDir::new(&self.root, name)
    }

    /// Claims `name` for a new VM and writes its record. Fails if the name is taken
    /// by a VM that exists (running or stopped). The VM's directory is 0700
    /// (and so is the registry's, when this creates it): it holds the VM's
    /// sockets, disk and the record with its agent token.
    ///
    /// The directory is built under a staging name with its record and
    /// owner lock, then published whole (`RENAME_NOREPLACE`): a creator
    /// killed at any point leaves either a staging directory of a dead
    /// process or a complete VM directory whose owner is gone, both of which
    /// the next clean-up removes. The returned [`Owner`] is the caller's
    /// hold on the new VM until it calls [`Owner::release`].
    pub fn create(&self, record: &VmRecord) -> Result<(VmDir, Owner), VmError> {
        use std::os::unix::fs::DirBuilderExt;
        validate_name(&record.name)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(VmError::io("create VM directory"))?;
        let dir = self.dir(&record.name);
        let taken = |running| VmError::NameTaken {
            name: record.name.clone(),
            running,
        };
        let staging = crate::fsutil::staging_path(&dir.root);
        match std::fs::DirBuilder::new().mode(0o700).create(&staging) {
            Ok(()) => {}
            // Another thread of this process is creating a VM of that name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(taken(false)),
            Err(e) => return Err(VmError::io("create VM directory")(e)),
        }
        let built = (|| -> std::io::Result<std::fs::File> {
            let owner = crate::fsutil::create_private(&staging.join(OWNER_FILE))?;
            crate::fsutil::lock_exclusive(&owner)?;
            record::write_json(&staging.join("vm.json"), record)?;
            Ok(owner)
        })();
        let file = match built {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(VmError::io("create VM directory")(e));
            }
        };
        let mut retried = false;
        loop {
            match crate::fsutil::rename_noreplace(&staging, &dir.root) {
                Ok(()) => break,
                Err(e)
                    if !retried
                        && matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY))
                        && self.remove_if_abandoned(&dir) =>
                {
                    retried = true;
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(
                        if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) {
                            taken(matches!(self.status(&dir), VmStatus::Running { .. }))
                        } else {
                            VmError::io("publish VM directory")(e)
                        },
                    );
                }
            }
        }
        Ok((
            dir.clone(),
            Owner {
                _file: file,
                path: dir.root.join(OWNER_FILE),
            },
        ))
    }

    /// Looks a VM up by name.
    pub fn get(&self, name: &str) -> Result<VmInfo, VmError> {
        validate_name(name)?;
        let dir = self.dir(name);
        if self.remove_if_orphaned(&dir) {
            return Err(VmError::NotFound(name.to_string()));
        }
        let record: VmRecord =
            record::read_json(&dir.record()).ok_or_else(|| VmError::NotFound(name.to_string()))?;
        let status = self.status(&dir);
        Ok(VmInfo {
            record,
            status,
            dir: dir.root,
        })
    }

    /// Looks a VM up and requires it to be running.
    pub fn get_running(&self, name: &str) -> Result<(VmInfo, u32), VmError> {
        let info = self.get(name)?;
        match info.status {
            VmStatus::Running { pid } => Ok((info, pid)),
            VmStatus::Stopped { ref reason } => Err(VmError::NotRunning {
                name: name.to_string(),
                reason: reason.clone(),
            }),
        }
    }

    /// Every VM, sorted by name. Abandoned half-created directories are removed.
    pub fn list(&self) -> Vec<VmInfo> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| validate_name(n).is_ok())
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| {
                let dir = self.dir(&n);
                if self.remove_if_abandoned(&dir) {
                    return None;
                }
                self.get(&n).ok()
            })
            .collect()
    }

    /// Whether the VM's VMM process is alive. A VMM that vanished without writing
    /// its exit record (killed, crashed, host rebooted) is recorded as `lost` and its
    /// stale pid file and sockets are removed.
    pub fn status(&self, dir: &VmDir) -> VmStatus {
        if let Some(pid) = record::read_json::<PidRecord>(&dir.pid()) {
            if pid.alive() {
                return VmStatus::Running { pid: pid.pid };
            }
            if record::read_json::<ExitRecord>(&dir.exit()).is_none() {
                let _ = record::write_json(
                    &dir.exit(),
                    &ExitRecord {
                        reason: "lost".into(),
                        detail: Some(format!("VMM process {} ended without a word", pid.pid)),
                        code: None,
                        hint: None,
                        at: record::now(),
                    },
                );
            }
            for stale in [dir.pid(), dir.control(), dir.vsock()] {
                let _ = std::fs::remove_file(stale);
            }
        }
        let reason = record::read_json::<ExitRecord>(&dir.exit())
            .map(|e| e.reason)
            .unwrap_or_else(|| "created".into());
        VmStatus::Stopped { reason }
    }

    /// Deletes a stopped VM's directory.
    pub fn remove(&self, name: &str) -> Result<(), VmError> {
        let info = self.get(name)?;
        if let VmStatus::Running { .. } = info.status {
            return Err(VmError::StillRunning(name.to_string()));
        }
        std::fs::remove_dir_all(&info.dir).map_err(VmError::io("remove VM directory"))
    }

    /// Removes `dir` if its creation was interrupted: no `vm.json` and older
    /// than the grace period (a directory of an older ferry), or its owner
    /// died (see [`remove_orphan`]). Returns true if it was removed.
    fn remove_if_abandoned(&self, dir: &VmDir) -> bool {
        (is_abandoned(dir, CREATION_GRACE) && std::fs::remove_dir_all(&dir.root).is_ok())
            || self.remove_if_orphaned(dir)
    }

    fn remove_if_orphaned(&self, dir: &VmDir) -> bool {
        remove_orphan(dir).is_some()
    }
}

/// The file in a VM directory whose `flock` the VM's owner holds: the
/// process creating it, or, for an ephemeral VM, the process it lives for.
const OWNER_FILE: &str = "owner.lock";

/// A process's hold on a VM: the VM is being created by this process, or
/// (an ephemeral VM) lives only as long as it. Once the process dies
/// without [`Owner::release`], the VM is an orphan: the next look at it
/// (`ferry gc`, the sweep at every `ferry` start, a lookup of its name)
/// stops its VMM and removes it. A fork or restore killed before the guest
/// was refreshed, or a bake killed midway, so leaves nothing running.
#[derive(Debug)]
pub struct Owner {
    /// Holds the `flock` while alive.
    _file: std::fs::File,
    path: PathBuf,
}

impl Owner {
    /// Makes the VM independent of this process: it is complete, and stays
    /// when the process ends. (The file goes before its lock: whoever then
    /// takes the lock of a file still in place knows the owner died.)
    pub fn release(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// If `dir`'s owner died without releasing it, stops its VMM, removes the
/// directory and says how many bytes that freed. Never touches a VM whose
/// owner lives, a released VM, or one a control operation holds locked.
pub(crate) fn remove_orphan(dir: &VmDir) -> Option<u64> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = dir.root.join(OWNER_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .ok()?;
    if !crate::fsutil::try_lock_exclusive(&file).ok()? {
        return None;
    }
    // Still the file at that path: its owner did not release it, and is gone.
    let held = file.metadata().ok()?;
    let now = std::fs::symlink_metadata(&path).ok()?;
    if (held.dev(), held.ino()) != (now.dev(), now.ino()) {
        return None;
    }
    // An operation (a `ferry rm` of it, say) may be under way.
    let lock = try_op_lock(dir);
    if let OpLock::Busy = lock {
        return None;
    }
    kill_vmm(dir);
    let bytes = crate::fsutil::disk_usage(&dir.root);
    std::fs::remove_dir_all(&dir.root).ok()?;
    Some(bytes)
}

/// What [`try_op_lock`] found.
pub(crate) enum OpLock {
    /// Taken by this clean-up, until dropped: no operation is in progress.
    Held {
        /// Holds the lock while alive.
        _lock: std::fs::File,
    },
    /// The VM has no lock file: nothing says whether an operation runs.
    Absent,
    /// An operation holds it (or it cannot be read): the VM is busy.
    Busy,
}

/// Takes the lock of the VM in `dir` ([`VmDir::lock`]) without waiting, if
/// it has a lock file: for clean-ups, which never wait for an operation.
pub(crate) fn try_op_lock(dir: &VmDir) -> OpLock {
    let path = dir.lock();
    match std::fs::File::open(&path) {
        Ok(f) => match crate::fsutil::try_lock_exclusive(&f) {
            Ok(true) => OpLock::Held { _lock: f },
            _ => OpLock::Busy,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpLock::Absent,
        Err(_) => OpLock::Busy,
    }
}

/// Kills the VM's VMM process, if it runs, and waits (up to 10 s) until it
/// is gone, so that its ports and files are free.
fn kill_vmm(dir: &VmDir) {
    let Some(pid) = record::read_json::<PidRecord>(&dir.pid()) else {
        return;
    };
    if !pid.alive() {
        return;
    }
    // SAFETY: plain kill(2) of a pid whose start time says it is this VM's VMM.
    unsafe { libc::kill(pid.pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pid.alive() && !record::is_zombie(pid.pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `dir` is a VM directory whose creation was interrupted: no
/// `vm.json`, no live VMM process, and unchanged for longer than `grace`.
pub(crate) fn is_abandoned(dir: &VmDir, grace: Duration) -> bool {
    if dir.record().exists()
        || record::read_json::<PidRecord>(&dir.pid()).is_some_and(|p| p.alive())
    {
        return false;
    }
    std::fs::metadata(&dir.root)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= grace)
}

impl Registry {
    /// The directory all VM directories are in.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            id: "id".into(),
            created_at: 0,
            cpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            image: "base".into(),
            command: None,
            token: "t".into(),
            ephemeral: false,
            mounts: Vec::new(),
            ports: Vec::new(),
            net: None,
            exec_defaults: None,
        }
    }

    #[test]
    fn names_are_unique_and_validated() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        reg.create(&rec("web-1")).unwrap().1.release();
        match reg.create(&rec("web-1")) {
            Err(VmError::NameTaken { running, .. }) => assert!(!running),
            other => panic!("expected NameTaken, got {other:?}"),
        }
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(64)] {
            assert!(matches!(
                reg.create(&rec(bad)),
                Err(VmError::InvalidName(_))
            ));
        }
        assert_eq!(reg.list().len(), 1);
    }

    #[test]
    fn vm_directories_are_0700_and_records_0600_whatever_the_umask() {
        use crate::fsutil::{mode_of, permissive_umask};
        permissive_umask();
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("data/vms"));
        let (dir, _owner) = reg.create(&rec("private")).unwrap();
        assert_eq!(mode_of(&dir.root), 0o700);
        assert_eq!(mode_of(reg.root()), 0o700);
        assert_eq!(mode_of(&dir.record()), 0o600);
    }

    #[test]
    fn dead_vmm_is_detected_and_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let (dir, owner) = reg.create(&rec("gone")).unwrap();
        owner.release();
        // A pid record whose start time does not match: the pid was reused.
        let me = PidRecord::current().unwrap();
        record::write_json(
            &dir.pid(),
            &PidRecord {
                start_time: me.start_time + 7,
                ..me
            },
        )
        .unwrap();
        std::fs::write(dir.control(), b"").unwrap();
        let info = reg.get("gone").unwrap();
        assert_eq!(
            info.status,
            VmStatus::Stopped {
                reason: "lost".into()
            }
        );
        assert!(!dir.pid().exists() && !dir.control().exists());
        reg.remove("gone").unwrap();
        assert!(matches!(reg.get("gone"), Err(VmError::NotFound(_))));

        // Our own live process counts as running and cannot be removed.
        let (dir, owner) = reg.create(&rec("alive")).unwrap();
        owner.release();
        record::write_json(&dir.pid(), &me).unwrap();
        assert_eq!(
            reg.get("alive").unwrap().status,
            VmStatus::Running { pid: me.pid }
        );
        assert!(matches!(reg.remove("alive"), Err(VmError::StillRunning(_))));
    }

    #[test]
    fn a_vm_whose_owner_is_gone_is_stopped_and_removed_at_the_next_look() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        // Owned: a lookup sees it, and a creation of its name is refused.
        let (dir, owner) = reg.create(&rec("making")).unwrap();
        assert!(reg.get("making").is_ok());
        assert!(matches!(
            reg.create(&rec("making")),
            Err(VmError::NameTaken { .. })
        ));
        // Its "VMM" is a child process; the owner goes without releasing
        // it (as a killed ferry's lock does).
        let mut vmm = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = PidRecord {
            pid: vmm.id(),
            start_time: record::process_start_time(vmm.id()).unwrap(),
        };
        record::write_json(&dir.pid(), &pid).unwrap();
        drop(owner);
        assert!(matches!(reg.get("making"), Err(VmError::NotFound(_))));
        assert!(!dir.root.exists());
        let status = vmm.wait().unwrap();
        assert!(!status.success(), "the orphan's VMM was killed");
        // The name is free again; a released VM outlives its owner.
        let (_, owner) = reg.create(&rec("making")).unwrap();
        owner.release();
        drop(owner);
        assert!(reg.get("making").is_ok());
        assert_eq!(reg.list().len(), 1);
    }

    #[test]
    fn a_creation_cut_short_before_publication_leaves_only_a_staging_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        std::fs::create_dir_all(reg.root()).unwrap();
        // What a creator killed before its rename leaves (pid beyond pid_max).
        let staging = reg.root().join(".web.tmp-999999999");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("vm.json"), b"{").unwrap();
        assert!(reg.list().is_empty());
        assert!(matches!(reg.get("web"), Err(VmError::NotFound(_))));
        reg.create(&rec("web")).unwrap().1.release();
        crate::fsutil::remove_stale_staging(reg.root());
        assert!(!staging.exists());
        assert_eq!(reg.list().len(), 1);
    }
}
