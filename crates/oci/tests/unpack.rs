//! Layers applied to a tree, then written to a real ext4 image with
//! `mke2fs -d` and the debugfs fix-ups, checked with debugfs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_oci::layers::{Special, Tree};

/// One tar entry of a test layer.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32, u32, u32),
    Link(&'a str, &'a str),
    Symlink(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Xattr(&'a str, &'a str, &'a [u8]),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, data, mode, uid, gid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(u64::from(*uid));
                h.set_gid(u64::from(*gid));
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Char(p, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::Xattr(p, name, value) => {
                b.append_pax_extensions([(format!("SCHILY.xattr.{name}").as_str(), *value)])
                    .unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(3);
                b.append_data(&mut h, p, &b"xa\n"[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn have_e2fsprogs() -> bool {
    Command::new("debugfs").arg("-V").output().is_ok()
}

fn debugfs(img: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn layers_apply_with_whiteouts_and_the_image_keeps_their_ownership() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    let mut tree = Tree::new(&root, 1 << 30);

    let l0 = layer(&[
        E::Dir("data", 0o755),
        E::File("data/keep", b"keep\n", 0o644, 0, 0),
        E::File("data/gone", b"gone\n", 0o644, 0, 0),
        E::File("opq/old", b"old\n", 0o644, 0, 0),
        E::Dir("ro", 0o555),
        E::File("ro/inside", b"x", 0o444, 0, 0),
        E::Symlink("lib", "usr/lib"),
        E::Dir("usr/lib", 0o755),
    ]);
    let l1 = layer(&[
        E::File("usr/local/bin/suid", b"#!/bin/sh\n", 0o4755, 0, 0),
        E::File("home/owned", b"mine\n", 0o640, 1500, 1600),
        E::Link("data/hard", "data/keep"),
        E::Symlink("data/link", "keep"),
        E::Char("dev/null", 1, 3),
        E::Xattr("data/xattr", "user.ferry", b"yes"),
        // Written through the symlink /lib -> usr/lib.
        E::File("lib/through", b"t\n", 0o644, 0, 0),
    ]);
    let l2 = layer(&[
        E::File("data/.wh.gone", b"", 0o644, 0, 0),
        E::File("opq/.wh..wh..opq", b"", 0o644, 0, 0),
        E::File("opq/new", b"new\n", 0o644, 0, 0),
        E::File("ro/.wh.inside", b"", 0o644, 0, 0),
    ]);
    let blobs = [
        write(tmp.path(), "l0", &gzip(&l0)),
        write(tmp.path(), "l1", &zstd::encode_all(&l1[..], 1).unwrap()),
        write(tmp.path(), "l2", &l2),
    ];
    for (i, b) in blobs.iter().enumerate() {
        tree.apply_layer(i, b).unwrap();
    }

    assert!(root.join("data/keep").is_file());
    assert!(!root.join("data/gone").exists(), "whiteout");
    assert!(!root.join("opq/old").exists(), "opaque directory");
    assert!(root.join("opq/new").is_file());
    assert!(
        !root.join("ro/inside").exists(),
        "whiteout in a read-only directory"
    );
    assert!(
        root.join("usr/lib/through").is_file(),
        "written through a symlink"
    );
    assert!(!tree.meta.contains_key(Path::new("data/gone")));
    let owned = &tree.meta[Path::new("home/owned")];
    assert_eq!((owned.uid, owned.gid, owned.perm), (1500, 1600, 0o640));
    assert_eq!(tree.meta[Path::new("usr/local/bin/suid")].perm, 0o4755);
    assert_eq!(
        tree.meta[Path::new("dev/null")].special,
        Some(Special::Char(1, 3))
    );
    assert_eq!(
        tree.meta[Path::new("data/xattr")].xattrs,
        [("user.ferry".to_string(), b"yes".to_vec())]
    );
    assert_eq!(tree.meta[Path::new("ro")].perm, 0o555);

    if !have_e2fsprogs() {
        eprintln!("skipping the ext4 part: no debugfs");
        return;
    }
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let script = ferry_oci::fixups::debugfs_script(&tree, &scratch).unwrap();
    let img = tmp.path().join("img.ext4");
    assert!(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap()
        .success());
    let script_path = write(tmp.path(), "fix.debugfs", script.as_bytes());
    assert!(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(&img)
        .output()
        .unwrap()
        .status
        .success());

    let stat = debugfs(&img, "stat /home/owned");
    assert!(
        stat.contains("User:  1500") && stat.contains("Group:  1600"),
        "{stat}"
    );
    assert!(stat.contains("Mode:  0640"), "{stat}");
    let stat = debugfs(&img, "stat /usr/local/bin/suid");
    assert!(
        stat.contains("Mode:  04755") && stat.contains("User:     0"),
        "{stat}"
    );
    let stat = debugfs(&img, "stat /ro");
    assert!(stat.contains("Mode:  0555"), "{stat}");
    let stat = debugfs(&img, "stat /dev/null");
    assert!(stat.contains("Type: character special"), "{stat}");
    assert!(stat.contains("Mode:  0666"), "{stat}");
    let keep = debugfs(&img, "stat /data/keep");
    assert!(keep.contains("Links: 2"), "hard link kept: {keep}");
    let xattr = debugfs(&img, "ea_get /data/xattr user.ferry");
    assert!(xattr.contains("yes"), "{xattr}");
    assert!(debugfs(&img, "ls -l /data").contains("link"));
}

#[test]
fn no_entry_writes_outside_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let mut tree = Tree::new(&root, 1 << 30);
    let abs = outside.to_str().unwrap().to_string();
    let l0 = layer(&[
        E::Symlink("abs", &abs),
        E::Symlink("up", "../../../../.."),
        E::Symlink("loop", "loop"),
    ]);
    let mut evil = tar::Builder::new(Vec::new());
    for name in ["abs/escaped", "up/escaped2"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(1);
        evil.append_data(&mut h, name, &b"x"[..]).unwrap();
    }
    // A raw `..` path, written into the header by hand (the builder refuses it).
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../../dotdot-esc");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(1);
    h.set_cksum();
    evil.append(&h, &b"x"[..]).unwrap();
    let l1 = evil.into_inner().unwrap();
    tree.apply_layer(0, &write(tmp.path(), "l0", &l0)).unwrap();
    tree.apply_layer(1, &write(tmp.path(), "l1", &l1)).unwrap();
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing outside"
    );
    assert!(!tmp.path().join("dotdot-esc").exists());
    assert!(root
        .join(abs.trim_start_matches('/'))
        .join("escaped")
        .is_file());
    assert!(root.join("escaped2").is_file(), "`..` stops at the root");
    assert!(root.join("dotdot-esc").is_file());

    // A symlink loop is an error, not a hang.
    let l2 = layer(&[E::File("loop/x", b"x", 0o644, 0, 0)]);
    let err = tree
        .apply_layer(2, &write(tmp.path(), "l2", &l2))
        .unwrap_err();
    assert_eq!(err.code(), "IMAGE_LAYER_INVALID");
}

#[test]
fn broken_layers_and_the_size_limit_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    let mut tree = Tree::new(&root, 10);
    let big = layer(&[E::File("big", &[7u8; 64], 0o644, 0, 0)]);
    let err = tree
        .apply_layer(0, &write(tmp.path(), "big", &big))
        .unwrap_err();
    assert_eq!(err.code(), "IMAGE_LAYER_INVALID");
    let dangling = layer(&[E::Link("a", "nothing")]);
    let err = tree
        .apply_layer(1, &write(tmp.path(), "d", &dangling))
        .unwrap_err();
    assert!(err.to_string().contains("not a file"), "{err}");
    let truncated = &gzip(&layer(&[E::File("f", &[1u8; 4096], 0o644, 0, 0)]))[..40];
    let mut t2 = Tree::new(&root, 1 << 20);
    assert!(t2
        .apply_layer(2, &write(tmp.path(), "t", truncated))
        .is_err());
}
