//! Atomic publication of files and directories: write beside, fsync, rename.

use std::fs::File;
use std::path::{Path, PathBuf};

/// A path next to `dest` for building it before publication, unique to this process.
pub fn staging_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// SHA-256 of a whole file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Flushes a file or directory to stable storage.
pub fn fsync_path(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// Fsyncs every regular file directly inside `dir` and `dir` itself.
pub fn fsync_dir_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fsync_path(&entry.path())?;
        }
    }
    fsync_path(dir)
}

/// Moves a fully written `staging` file or directory to `dest` and makes the rename durable.
pub fn publish(staging: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::rename(staging, dest)?;
    if let Some(parent) = dest.parent() {
        fsync_path(parent)?;
    }
    Ok(())
}

/// What a clean-up removed: how many files or directories, and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Freed {
    /// Files or directories removed.
    pub count: u64,
    /// Bytes they held (allocated on disk).
    pub bytes: u64,
}

impl Freed {
    /// Adds one removed item of `bytes`.
    pub fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }
}

impl std::ops::AddAssign for Freed {
    fn add_assign(&mut self, other: Freed) {
        self.count += other.count;
        self.bytes += other.bytes;
    }
}

/// What wrote a leftover staging entry: a file or directory published by
/// [`publish`] (`.NAME.tmp-PID`), or a bundle being written
/// (`.NAME.partial-PID`, see `ferry_snapshot::writer::FileBundle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staging {
    /// `.NAME.tmp-PID`.
    Publish,
    /// `.NAME.partial-PID`.
    Bundle,
}

/// Whether `name` is a staging entry, which kind, and the pid of its writer.
pub fn staging_owner(name: &str) -> Option<(Staging, u32)> {
    let rest = name.strip_prefix('.')?;
    [(".tmp-", Staging::Publish), (".partial-", Staging::Bundle)]
        .into_iter()
        .find_map(|(marker, kind)| {
            let (stem, pid) = rest.rsplit_once(marker)?;
            let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
            (!stem.is_empty() && digits)
                .then(|| pid.parse().ok().map(|pid| (kind, pid)))
                .flatten()
        })
}

/// Whether a process `pid` exists on this host (as seen from this pid namespace).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Bytes allocated on disk for `path`: a file, or a directory and all it holds
/// (symbolic links are not followed).
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = m.blocks() * 512;
    if !m.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| disk_usage(&e.path()))
        .sum::<u64>()
}

/// Removes a file or a whole directory (a symbolic link itself, never its target).
pub fn remove_any(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Removes leftovers of interrupted builds (`.NAME.tmp-PID`) and bundle
/// writes (`.NAME.partial-PID`) whose process is gone, and says what each
/// kind freed (publish, bundle).
pub fn remove_stale_staging(dir: &Path) -> (Freed, Freed) {
    let (mut publish, mut bundle) = (Freed::default(), Freed::default());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (publish, bundle);
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((kind, pid)) = staging_owner(&name) else {
            continue;
        };
        if process_exists(pid) {
            continue;
        }
        let p = entry.path();
        let bytes = disk_usage(&p);
        if remove_any(&p).is_ok() {
            match kind {
                Staging::Publish => publish.add(bytes),
                Staging::Bundle => bundle.add(bytes),
            }
        }
    }
    (publish, bundle)
}

/// `flock(2)` on `file` with `op`.
fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor `file` owns for the whole call; it
        // touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes a shared lock on `file` (held until it is closed), waiting while
/// someone holds an exclusive one: a file so locked is in use, and clean-ups
/// leave it alone.
pub fn lock_shared(file: &File) -> std::io::Result<()> {
    flock(file, libc::LOCK_SH)
}

/// Takes an exclusive lock on `file` (held until it is closed), waiting
/// while someone else holds one.
pub fn lock_exclusive(file: &File) -> std::io::Result<()> {
    flock(file, libc::LOCK_EX)
}

/// Takes the exclusive lock on the build of `dest` (a file `.NAME.lock`
/// beside it), waiting for another process building it: held while the
/// returned file is open.
pub fn lock_build(dest: &Path) -> std::io::Result<File> {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let file = File::create(dest.with_file_name(format!(".{name}.lock")))?;
    lock_exclusive(&file)?;
    Ok(file)
}

/// Takes an exclusive lock on `file` without waiting: false when someone
/// else holds a lock on it.
pub fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens `path` for appending, creating it readable and writable by this
/// user only (whatever the umask, and even if it existed with wider modes).
pub fn open_private_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Creates (or truncates) `path` for writing, readable and writable by this
/// user only, whatever the umask and even if it existed with wider modes.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Sets a permissive umask (0) for the rest of the test process, so tests
/// of file modes see what the code asks for, not what the umask leaves.
#[cfg(test)]
pub(crate) fn permissive_umask() {
    // SAFETY: umask(2) only changes this process's file creation mask.
    unsafe { libc::umask(0) };
}

/// The permission bits of `path`.
#[cfg(test)]
pub(crate) fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Renames `from` to `to` unless `to` exists (`RENAME_NOREPLACE`): the
/// rename never takes another writer's file.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("path contains a NUL byte"))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call;
    // renameat2 reads them and touches no other memory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `bytes` random bytes from the kernel's generator, as lowercase hex. Fails
/// rather than return anything predictable.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_moves_staging_into_place_and_stale_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("thing");
        let staging = staging_path(&dest);
        std::fs::write(&staging, b"x").unwrap();
        publish(&staging, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"x");
        assert!(!staging.exists());

        // A leftover from a process that no longer exists is cleaned; ours is kept.
        let stale = dir.path().join(".other.tmp-4194399");
        std::fs::create_dir(&stale).unwrap();
        let live = staging_path(&dir.path().join("mine"));
        std::fs::write(&live, b"").unwrap();
        remove_stale_staging(dir.path());
        assert!(!stale.exists());
        assert!(live.exists());
    }

    #[test]
    fn staging_names_are_recognized_and_counted_by_kind() {
        assert_eq!(staging_owner(".a.tmp-12"), Some((Staging::Publish, 12)));
        assert_eq!(
            staging_owner(".t.snap.partial-7"),
            Some((Staging::Bundle, 7))
        );
        for not in [
            "a.tmp-12",
            ".tmp-12",
            ".a.tmp-",
            ".a.tmp-1x",
            "vm.json",
            ".a.partial-",
        ] {
            assert_eq!(staging_owner(not), None, "{not}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".x.tmp-4194399"), vec![1u8; 8192]).unwrap();
        std::fs::write(dir.path().join(".b.snap.partial-4194399"), b"b").unwrap();
        let mine = format!(".c.snap.partial-{}", std::process::id());
        std::fs::write(dir.path().join(&mine), b"c").unwrap();
        let (publish, bundle) = remove_stale_staging(dir.path());
        assert_eq!((publish.count, bundle.count), (1, 1));
        assert!(publish.bytes >= 8192);
        assert!(dir.path().join(mine).exists(), "a live writer's file stays");
    }

    #[test]
    fn private_files_are_0600_whatever_the_umask_and_earlier_modes() {
        use std::os::unix::fs::PermissionsExt;
        permissive_umask();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        drop(create_private(&p).unwrap());
        assert_eq!(mode_of(&p), 0o600);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_private_append(&p).unwrap());
        assert_eq!(mode_of(&p), 0o600);
    }

    #[test]
    fn an_exclusive_lock_fails_while_a_shared_one_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"").unwrap();
        let held = File::open(&p).unwrap();
        lock_shared(&held).unwrap();
        assert!(!try_lock_exclusive(&File::open(&p).unwrap()).unwrap());
        drop(held);
        assert!(try_lock_exclusive(&File::open(&p).unwrap()).unwrap());
    }

    #[test]
    fn rename_noreplace_never_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "b");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "a");
    }

    #[test]
    fn random_hex_is_random() {
        let (x, y) = (random_hex(16).unwrap(), random_hex(16).unwrap());
        assert_eq!(x.len(), 32);
        assert_ne!(x, y);
    }
}
