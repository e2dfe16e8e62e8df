//! A VM's state directory and the records in it.
//!
//! `<data>/vms/<name>/` holds:
//! - `vm.json`: what the VM is (the [`VmRecord`]), written once at creation;
//! - `pid.json`: the VMM process (pid and its start time, to tell a reused pid);
//! - `exit.json`: how the VMM process ended, written by it on the way out;
//! - `console.log`, `vmm.log`, `control.sock`, `vsock.sock`, `initramfs.cpio`, disks.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The static description of a VM, written at creation. Its `Debug` leaves
/// the agent token out.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// User-visible unique name.
    pub name: String,
    /// Random id, unique across re-creations of the same name.
    pub id: String,
    /// Unix seconds at creation.
    pub created_at: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// What the root disk was made from, for display.
    pub image: String,
    /// The image's default command run as the VM's main process, if any.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Token the guest agent expects.
    pub token: String,
    /// Whether the VM goes away when its attached session ends.
    #[serde(default)]
    pub ephemeral: bool,
    /// Host directories copied in at boot or shared live (see [`crate::mounts`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<crate::mounts::MountRecord>,
    /// Host ports forwarded into the guest (`-p`). Configuration: a restored
    /// VM listens on them again.
    #[serde(default)]
    pub ports: Vec<crate::forward::PortForward>,
    /// Outbound network settings, when the VM has a network (`--net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::NetSettings>,
    /// Env, workdir and user `exec` uses when the caller gives none: the
    /// image's, for images from registries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_defaults: Option<ExecDefaults>,
}

/// What `exec` uses when its caller says nothing: an image's Env,
/// WorkingDir and User.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    /// Environment, overridden name by name by the caller's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User (`name`, `uid`, `name:group`, `uid:gid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl std::fmt::Debug for VmRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Exhaustive, so a new field is not left out of `Debug` unnoticed.
        let VmRecord {
            name,
            id,
            created_at,
            cpus,
            memory_mib,
            kernel,
            image,
            command,
            token: _,
            ephemeral,
            mounts,
            ports,
            net,
            exec_defaults,
        } = self;
        f.debug_struct("VmRecord")
            .field("name", name)
            .field("id", id)
            .field("created_at", created_at)
            .field("cpus", cpus)
            .field("memory_mib", memory_mib)
            .field("kernel", kernel)
            .field("image", image)
            .field("command", command)
            .field("token", &"<redacted>")
            .field("ephemeral", ephemeral)
            .field("mounts", mounts)
            .field("ports", ports)
            .field("net", net)
            .field("exec_defaults", exec_defaults)
            .finish()
    }
}

/// The VMM process of a running VM.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PidRecord {
    /// Process id.
    pub pid: u32,
    /// Start time of that process in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

/// How a VMM process ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitRecord {
    /// `poweroff`, `reset`, `stopped`, `error`, or `lost` (process vanished).
    pub reason: String,
    /// Detail for errors.
    #[serde(default)]
    pub detail: Option<String>,
    /// Stable error code, for errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What to do about the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Unix seconds.
    pub at: u64,
}

/// Paths inside one VM's state directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    /// The directory itself.
    pub root: PathBuf,
}

impl VmDir {
    /// The directory for `name` under `vms_root`.
    pub fn new(vms_root: &Path, name: &str) -> VmDir {
        VmDir {
            root: vms_root.join(name),
        }
    }
    /// `vm.json`.
    pub fn record(&self) -> PathBuf {
        self.root.join("vm.json")
    }
    /// `pid.json`.
    pub fn pid(&self) -> PathBuf {
        self.root.join("pid.json")
    }
    /// The file whose `flock` every control operation on the VM (snapshot,
    /// fork, stop, removal) holds while it runs.
    pub fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
    /// `exit.json`.
    pub fn exit(&self) -> PathBuf {
        self.root.join("exit.json")
    }
    /// Serial console output.
    pub fn console(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// The VMM process's own log.
    pub fn vmm_log(&self) -> PathBuf {
        self.root.join("vmm.log")
    }
    /// Control socket of the VMM process.
    pub fn control(&self) -> PathBuf {
        self.root.join("control.sock")
    }
    /// Host side of the guest's vsock.
    pub fn vsock(&self) -> PathBuf {
        self.root.join("vsock.sock")
    }
    /// The initramfs holding the agent and its config.
    pub fn initramfs(&self) -> PathBuf {
        self.root.join("initramfs.cpio")
    }
    /// The VM's writable root disk.
    pub fn root_disk(&self) -> PathBuf {
        self.root.join("root.img")
    }
}

/// Writes `value` as JSON to `path` atomically and durably, readable and
/// writable by this user only (`vm.json` holds the agent token).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_beside(path, true, |w| serde_json::to_writer_pretty(w, value))
}

/// Writes JSON to `path` atomically (write beside, rename) but without
/// `fsync`: for files that only describe a live process or hand state to one
/// starting now (pid file, restore and fork plans, restore statistics), which
/// mean nothing after a host crash. Mode 0600, like [`write_json`]. Under emulation an `fsync` costs tens to
/// hundreds of milliseconds, on the path of every restore and fork.
pub fn write_runtime_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_beside(path, false, |w| serde_json::to_writer(w, value))
}

/// Writes a file beside `path` with `write`, fsyncs it if `durable`, and
/// renames it over `path`. The file is 0600 from its creation on, so no
/// other user can open it in between.
fn write_beside(
    path: &Path,
    durable: bool,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> serde_json::Result<()>,
) -> std::io::Result<()> {
    let tmp = crate::fsutil::staging_path(path);
    let mut w = std::io::BufWriter::new(crate::fsutil::create_private(&tmp)?);
    write(&mut w)?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Reads JSON from `path`; None if missing or unreadable.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Start time of a live process, or None if it does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 19)?.parse().ok()
}

/// Field `n` (from 0) of `/proc/PID/stat` after the command name: 0 is the
/// state, 19 the start time.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n).map(str::to_string)
}

/// Whether process `pid` has exited and awaits its parent's `wait` (a
/// zombie holds no files, sockets or memory any more).
pub fn is_zombie(pid: u32) -> bool {
    stat_field(pid, 0).is_some_and(|state| state == "Z")
}

impl PidRecord {
    /// The record for the calling process.
    pub fn current() -> Option<PidRecord> {
        let pid = std::process::id();
        Some(PidRecord {
            pid,
            start_time: process_start_time(pid)?,
        })
    }

    /// True if this exact process (not a reuse of its pid) is still alive.
    pub fn alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_different_start_time_is_not() {
        let me = PidRecord::current().unwrap();
        assert!(me.alive());
        let reused = PidRecord {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive());
    }

    #[test]
    fn json_round_trip_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_json(
            &p,
            &PidRecord {
                pid: 1,
                start_time: 2,
            },
        )
        .unwrap();
        let back: PidRecord = read_json(&p).unwrap();
        assert_eq!(
            back,
            PidRecord {
                pid: 1,
                start_time: 2
            }
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn records_are_written_0600_whatever_the_umask() {
        use crate::fsutil::mode_of;
        use std::os::unix::fs::PermissionsExt;
        crate::fsutil::permissive_umask();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
        write_json(&a, &1).unwrap();
        write_runtime_json(&b, &2).unwrap();
        assert_eq!((mode_of(&a), mode_of(&b)), (0o600, 0o600));
        // A staging file left with wider modes by an earlier process of this pid.
        let stale = crate::fsutil::staging_path(&a);
        std::fs::write(&stale, b"").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_json(&a, &3).unwrap();
        assert_eq!(mode_of(&a), 0o600);
        assert_eq!(read_json::<i32>(&a), Some(3));
    }

    #[test]
    fn debug_of_a_record_leaves_the_token_out() {
        let rec = VmRecord {
            name: "web".into(),
            id: "id".into(),
            created_at: 0,
            cpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            image: "base".into(),
            command: None,
            token: "5ec2e75ec2e7".into(),
            ephemeral: false,
            mounts: Vec::new(),
            ports: Vec::new(),
            net: None,
            exec_defaults: None,
        };
        for text in [format!("{rec:?}"), format!("{rec:#?}")] {
            assert!(!text.contains("5ec2e75ec2e7"), "{text}");
            assert!(
                text.contains("web") && text.contains("<redacted>"),
                "{text}"
            );
        }
        // The record on disk keeps it: the VMM needs it.
        assert!(serde_json::to_string(&rec)
            .unwrap()
            .contains("5ec2e75ec2e7"));
    }
}
