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

/// Removes leftovers of interrupted builds (`.NAME.tmp-PID`) whose process is gone.
pub fn remove_stale_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let p = entry.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
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
