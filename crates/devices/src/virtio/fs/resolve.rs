//! Containment: every host path the virtio-fs server touches is resolved
//! relative to the shared directory's file descriptor with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`, and the last component is never
//! followed if it is a symlink (`O_NOFOLLOW`). Names coming from the guest are
//! single components: no `/`, no NUL, never `.` or `..`.
//!
//! Symlinks inside the shared tree are not interpreted by the host at all: the
//! guest reads them with READLINK and resolves them itself, inside its own
//! mount. The kernel refuses (`EXDEV`) any resolution that would leave the
//! starting directory, including through absolute symlinks or `..`, and
//! checks this atomically, so renames racing with a lookup cannot lead out
//! either.
//!
//! Syscalls that have no "no follow" form (chmod, truncate, utimes, link
//! sources, reopening with other flags) go through `/proc/self/fd/N` of an
//! `O_PATH` descriptor that was itself resolved beneath the root: the magic
//! link designates that exact inode, never a path that could be swapped.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Longest name component Linux accepts.
pub const NAME_MAX: usize = 255;

/// Last OS error as a positive errno.
pub fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Converts a syscall's `-1` return into the errno.
fn check(ret: libc::c_int) -> Result<libc::c_int, i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// Checks a name the guest sent is one harmless path component and returns
/// it as a C string.
pub fn validate_name(name: &[u8]) -> Result<CString, i32> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(libc::EINVAL);
    }
    if name.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    if name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    CString::new(name).map_err(|_| libc::EINVAL)
}

/// Opens the shared directory itself (the user chose it, so symlinks in
/// its own path are followed).
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain open(2) of a NUL-terminated path; the result is checked
    // and owned right away.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat2(dirfd, path, flags | O_NOFOLLOW | O_CLOEXEC, mode)` confined
/// beneath `dirfd`, with magic links refused.
pub fn open_beneath(dirfd: RawFd, path: &CStr, flags: i32, mode: u32) -> Result<OwnedFd, i32> {
    // SAFETY: `open_how` is plain old data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
        how.mode = u64::from(mode & 0o7777);
    }
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // RESOLVE_BENEATH answers EAGAIN when a concurrent rename could have
    // fooled the check; retrying is what the kernel asks for.
    for _ in 0..16 {
        // SAFETY: openat2 reads `how` (of the size passed) and the path;
        // both outlive the call. The result is checked below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &mut how as *mut libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = errno();
        if e != libc::EAGAIN && e != libc::EINTR {
            return Err(e);
        }
    }
    Err(libc::EAGAIN)
}

/// `fstat` of any descriptor, `O_PATH` ones included.
pub fn fstat(fd: RawFd) -> Result<libc::stat, i32> {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which lives across the call.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
pub fn stat_at_nofollow(dirfd: RawFd, name: &CStr) -> Result<libc::stat, i32> {
    // SAFETY: as in `fstat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the name is NUL-terminated and `st` outlives the call.
    check(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// The `/proc/self/fd/N` path of a descriptor.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// Opens the inode an `O_PATH` descriptor designates with real access
/// `flags`, through its magic link (the caller made sure it is no symlink).
pub fn reopen(fd: RawFd, flags: i32) -> Result<OwnedFd, i32> {
    let p = proc_path(fd);
    let flags = (flags & !(libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL)) | libc::O_CLOEXEC;
    // SAFETY: open(2) of a NUL-terminated path; the result is checked and owned.
    let nfd = unsafe { libc::open(p.as_ptr(), flags) };
    if nfd < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

/// Runs a syscall returning `-1`/errno and maps the result.
pub fn sys(ret: libc::c_int) -> Result<(), i32> {
    check(ret).map(|_| ())
}

/// A descriptor's raw number (helper for readability at call sites).
pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

/// The process umask, read without changing it.
pub fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn names_are_single_harmless_components() {
        assert!(validate_name(b"file.txt").is_ok());
        assert!(validate_name(b"..hidden").is_ok());
        assert_eq!(validate_name(b""), Err(libc::EINVAL));
        assert_eq!(validate_name(b"."), Err(libc::EINVAL));
        assert_eq!(validate_name(b".."), Err(libc::EINVAL));
        assert_eq!(validate_name(b"a/b"), Err(libc::EINVAL));
        assert_eq!(validate_name(b"/etc"), Err(libc::EINVAL));
        assert_eq!(validate_name(b"a\0b"), Err(libc::EINVAL));
        assert_eq!(validate_name(&[b'x'; 256]), Err(libc::ENAMETOOLONG));
    }

    #[test]
    fn resolution_stays_beneath_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host secret").unwrap();
        let shared = tempfile::tempdir().unwrap();
        let root = open_root(shared.path()).unwrap();
        let r = raw(&root);
        std::fs::create_dir(shared.path().join("sub")).unwrap();
        std::fs::write(shared.path().join("sub/inside"), "ok").unwrap();
        symlink("/etc/passwd", shared.path().join("passwd")).unwrap();
        symlink("/", shared.path().join("hostroot")).unwrap();
        symlink(outside.path(), shared.path().join("out")).unwrap();
        symlink("../..", shared.path().join("sub/up")).unwrap();
        symlink("inside", shared.path().join("sub/rel")).unwrap();

        // Plain paths inside work.
        let fd = open_beneath(r, &c("sub/inside"), libc::O_RDONLY, 0).unwrap();
        assert_eq!(fstat(fd.as_raw_fd()).unwrap().st_size, 2);
        // `..` escapes are refused.
        assert_eq!(
            open_beneath(r, &c("../etc/passwd"), libc::O_RDONLY, 0).err(),
            Some(libc::EXDEV)
        );
        assert_eq!(
            open_beneath(r, &c("sub/../../etc/hostname"), libc::O_RDONLY, 0).err(),
            Some(libc::EXDEV)
        );
        // Absolute paths are refused.
        assert_eq!(
            open_beneath(r, &c("/etc/passwd"), libc::O_RDONLY, 0).err(),
            Some(libc::EXDEV)
        );
        // A symlink as last component is never followed: opening it for
        // reading fails, and O_PATH gives the link itself.
        assert_eq!(
            open_beneath(r, &c("passwd"), libc::O_RDONLY, 0).err(),
            Some(libc::ELOOP)
        );
        let l = open_beneath(r, &c("passwd"), libc::O_PATH, 0).unwrap();
        assert_eq!(
            fstat(l.as_raw_fd()).unwrap().st_mode & libc::S_IFMT,
            libc::S_IFLNK
        );
        // Symlinks in the middle that lead out are refused.
        for p in ["hostroot/etc/passwd", "out/secret", "sub/up/etc/passwd"] {
            assert_eq!(
                open_beneath(r, &c(p), libc::O_RDONLY, 0).err(),
                Some(libc::EXDEV),
                "{p}"
            );
        }
        // O_CREAT through a dangling symlink does not create outside.
        symlink(outside.path().join("planted"), shared.path().join("trap")).unwrap();
        assert!(open_beneath(r, &c("trap"), libc::O_CREAT | libc::O_WRONLY, 0o644).is_err());
        assert!(!outside.path().join("planted").exists());
        // Magic links are refused even when inside.
        assert!(open_beneath(r, &c("/proc/self/root"), libc::O_PATH, 0).is_err());
    }

    #[test]
    fn reopen_designates_the_same_inode() {
        let shared = tempfile::tempdir().unwrap();
        std::fs::write(shared.path().join("f"), "data").unwrap();
        let root = open_root(shared.path()).unwrap();
        let p = open_beneath(raw(&root), &c("f"), libc::O_PATH, 0).unwrap();
        let w = reopen(p.as_raw_fd(), libc::O_WRONLY | libc::O_TRUNC).unwrap();
        assert_eq!(
            fstat(w.as_raw_fd()).unwrap().st_ino,
            fstat(p.as_raw_fd()).unwrap().st_ino
        );
        assert_eq!(std::fs::read(shared.path().join("f")).unwrap(), b"");
    }
}
