//! Images made from a root filesystem directory, such as the rootfs a
//! container runtime unpacked: written once into an ext4 file that a VM then
//! boots from ([`crate::BootOptions::image`]), its owners and modes kept.

use std::path::Path;

use ferry_runtime::images::ImageError;

use crate::error::{Error, Result};

/// Writes the directory tree `dir` into the ext4 image `dest` (replacing
/// it), sized at twice the tree with a floor of `min_bytes` (the file is
/// sparse, so the room costs nothing until the guest writes). `dir` must be
/// a non-empty directory (`IMAGE_NOT_FOUND`, `IMAGE_NOT_ROOTFS`
/// otherwise); a failed conversion is `IMAGE_CONVERT_FAILED`, and its
/// `mke2fs` output is kept beside `dest` with the extension `.log`.
pub fn image_from_dir(dir: &Path, dest: &Path, min_bytes: u64) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|_| ImageError::NotFound(dir.to_path_buf()))?;
    let empty = meta.is_dir()
        && std::fs::read_dir(dir)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(true);
    if !meta.is_dir() || empty {
        return Err(Error::from(ImageError::NotRootfs {
            path: dir.to_path_buf(),
            why: if empty {
                "the directory is empty".into()
            } else {
                "not a directory".into()
            },
        }));
    }
    let log = dest.with_extension("log");
    let _ = std::fs::remove_file(dest);
    ferry_runtime::assets::rootfs::make_ext4(dir, dest, "ferry-root", min_bytes, &log)
        .map_err(|e| Error::from(ImageError::Convert(e)))?;
    let _ = std::fs::remove_file(&log);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_becomes_an_ext4_image_and_bad_ones_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("root.ext4");
        let missing = image_from_dir(&tmp.path().join("nope"), &dest, 16 << 20).unwrap_err();
        assert_eq!(missing.code(), "IMAGE_NOT_FOUND");
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = image_from_dir(&empty, &dest, 16 << 20).unwrap_err();
        assert_eq!(e.code(), "IMAGE_NOT_ROOTFS");
        assert!(e.message().contains("empty"), "{}", e.message());

        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        if image_from_dir(&tree, &dest, 16 << 20).is_err() {
            // No mke2fs on this machine: nothing more to check here.
            assert!(std::process::Command::new("mke2fs")
                .arg("-V")
                .output()
                .is_err());
            return;
        }
        let image = std::fs::read(&dest).unwrap();
        assert_eq!(&image[1080..1082], &[0x53, 0xef], "ext4 magic");
        assert!(!dest.with_extension("log").exists());
    }
}
