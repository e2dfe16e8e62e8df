//! A container's root filesystem: containerd's snapshot mounts (or the
//! bundle's own `rootfs` directory) turned into the ext4 image the VM
//! boots from. The mounts are needed only while the image is written.

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;

use crate::error::{Kind, Result, ShimError};

/// Where the image of the VM `vm` is written: in ferry's data directory,
/// not in the bundle, which containerd keeps on a tmpfs (`/run`), where it
/// would take the image's size in memory.
pub fn image_path(rt: &ferry::Runtime, vm: &str) -> PathBuf {
    rt.config()
        .dirs
        .data
        .join("containers")
        .join(format!("{vm}.ext4"))
}

/// The smallest image: room for the container's own writes (the file is
/// sparse, so unused room costs nothing).
const MIN_IMAGE_BYTES: u64 = 1 << 30;

fn failed(message: String) -> ShimError {
    ShimError::new(
        Kind::Internal,
        "SHIM_ROOTFS_FAILED",
        message,
        "check the snapshotter's mounts (`ctr snapshots mounts`) and free space under the bundle",
    )
}

/// Writes the VM's image `image` from `mounts` (containerd's; empty when
/// `root_dir` already holds the tree). `check` looks at the tree first
/// (the command must be in it).
pub fn prepare(
    image: &Path,
    root_dir: &Path,
    mounts: &[Mount],
    check: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let mut mounted = false;
    if !mounts.is_empty() {
        std::fs::create_dir_all(root_dir)
            .map_err(|e| failed(format!("create {}: {e}", root_dir.display())))?;
        for m in mounts {
            mount(m, root_dir).map_err(|e| {
                failed(format!(
                    "mount the {} rootfs from {} on {}: {e}",
                    m.type_,
                    m.source,
                    root_dir.display()
                ))
            })?;
            mounted = true;
        }
    }
    if let Some(dir) = image.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(format!("create {}: {e}", dir.display())))?;
    }
    let empty = std::fs::read_dir(root_dir).map_or(true, |mut d| d.next().is_none());
    let made = if empty {
        Err(ShimError::new(
            Kind::Invalid,
            "IMAGE_NOT_ROOTFS",
            format!(
                "the image's root filesystem ({}) is empty",
                root_dir.display()
            ),
            "the image has no root filesystem: check it was unpacked (`ctr image ls`)",
        ))
    } else {
        check(root_dir)
    };
    let made = made.and_then(|()| {
        ferry::image_from_dir(root_dir, image, MIN_IMAGE_BYTES).map_err(|e| {
            let mut e = ShimError::from(e);
            if e.code == "IMAGE_NOT_ROOTFS" || e.code == "IMAGE_NOT_FOUND" {
                e.kind = Kind::Invalid;
                e.hint = Some(
                    "the image has no root filesystem: check it was unpacked (`ctr image ls`)"
                        .into(),
                );
            }
            e
        })
    });
    if mounted {
        unmount(root_dir);
    }
    made
}

/// Mount flags of containerd's mount options; the other options are the
/// filesystem's own (`lowerdir=...` of an overlay).
fn flag_of(option: &str) -> Option<libc::c_ulong> {
    Some(match option {
        "ro" => libc::MS_RDONLY,
        "rw" | "defaults" => 0,
        "bind" => libc::MS_BIND,
        "rbind" => libc::MS_BIND | libc::MS_REC,
        "nosuid" => libc::MS_NOSUID,
        "nodev" => libc::MS_NODEV,
        "noexec" => libc::MS_NOEXEC,
        "noatime" => libc::MS_NOATIME,
        "relatime" => libc::MS_RELATIME,
        _ => return None,
    })
}

/// Mounts one of containerd's mounts on `target`, in this process (the
/// tree is only read, to write the VM's image).
fn mount(m: &Mount, target: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let mut flags = 0;
    let mut data = Vec::new();
    for o in &m.options {
        match flag_of(o) {
            Some(f) => flags |= f,
            None => data.push(o.as_str()),
        }
    }
    let bind = flags & libc::MS_BIND != 0 || m.type_ == "bind";
    if bind {
        flags |= libc::MS_BIND;
        data.clear();
    }
    let cstr = |s: &[u8]| {
        CString::new(s).map_err(|_| std::io::Error::other("a mount argument holds a NUL byte"))
    };
    let source = cstr(m.source.as_bytes())?;
    let target = cstr(target.as_os_str().as_bytes())?;
    let fstype = cstr(if bind { b"none" } else { m.type_.as_bytes() })?;
    let data = cstr(data.join(",").as_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts what [`prepare`] mounted (nothing if it is not mounted).
pub fn unmount(root_dir: &Path) {
    if let Some(dir) = root_dir.to_str() {
        let _ = containerd_shim::mount::umount_recursive(Some(dir), libc::MNT_DETACH);
    }
}

/// The default search path of a process whose environment sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Fails with `SHIM_EXECUTABLE_NOT_FOUND` unless the command `program`
/// exists in the tree at `root` (looked up in `path` when it has no slash),
/// so a wrong command is reported at create, as runc reports it, and not
/// as an exit status.
pub fn check_executable(root: &Path, program: &str, path: Option<&str>) -> Result<()> {
    let exists = |p: &str| {
        let rel = p.trim_start_matches('/');
        resolve_in(root, rel, 0).is_some()
    };
    let found = if program.contains('/') {
        // A relative path is relative to the working directory: not checked.
        !program.starts_with('/') || exists(program)
    } else {
        path.unwrap_or(DEFAULT_PATH)
            .split(':')
            .filter(|d| !d.is_empty())
            .any(|d| exists(&format!("{d}/{program}")))
    };
    if found {
        return Ok(());
    }
    Err(ShimError::new(
        Kind::Invalid,
        "SHIM_EXECUTABLE_NOT_FOUND",
        format!(
            "exec: {program:?}: executable file not found in the image (PATH {})",
            path.unwrap_or(DEFAULT_PATH)
        ),
        "check the command and the image: the command runs inside the image's root filesystem",
    ))
}

/// Resolves `rel` inside `root`, following symlinks as the guest would
/// (absolute targets from `root`); `None` if it does not exist.
fn resolve_in(root: &Path, rel: &str, depth: u32) -> Option<PathBuf> {
    if depth > 16 {
        return None;
    }
    let mut at = PathBuf::new();
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if *part == ".." {
            at.pop();
            continue;
        }
        let candidate = at.join(part);
        let meta = std::fs::symlink_metadata(root.join(&candidate)).ok()?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(root.join(&candidate)).ok()?;
            let target = target.to_string_lossy();
            let rest = parts[i + 1..].join("/");
            let base = if target.starts_with('/') {
                target.trim_start_matches('/').to_string()
            } else {
                format!("{}/{target}", at.display())
            };
            return resolve_in(root, &format!("{base}/{rest}"), depth + 1);
        }
        at = candidate;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_found_through_path_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/busybox"), b"").unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("/bin", root.join("usr-bin")).unwrap();
        assert!(check_executable(root, "sh", None).is_ok());
        assert!(check_executable(root, "/bin/sh", None).is_ok());
        assert!(check_executable(root, "/usr-bin/busybox", None).is_ok());
        assert!(check_executable(root, "./relative", None).is_ok());
        let e = check_executable(root, "nosuchcmd", Some("/bin:/usr/bin")).unwrap_err();
        assert_eq!(e.code, "SHIM_EXECUTABLE_NOT_FOUND");
        assert_eq!(e.kind, Kind::Invalid);
        assert!(e.message.contains("\"nosuchcmd\""), "{e}");
        assert!(check_executable(root, "/bin/nope", None).is_err());
        // A dangling symlink is not an executable.
        std::os::unix::fs::symlink("/missing", root.join("bin/dangling")).unwrap();
        assert!(check_executable(root, "dangling", Some("/bin")).is_err());
    }

    #[test]
    fn an_empty_rootfs_is_an_invalid_image() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let e = prepare(&tmp.path().join("root.ext4"), &root, &[], |_| Ok(())).unwrap_err();
        assert_eq!(e.code, "IMAGE_NOT_ROOTFS");
        assert_eq!(e.kind, Kind::Invalid);
    }
}
