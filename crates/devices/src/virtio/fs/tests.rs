//! Tests of the FUSE server through its wire protocol, and of the device
//! behind a virtio-mmio transport.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use super::protocol::{self as p, fattr, op, ArgReader, EntryOut, InHeader, OutHeader, Put};
use super::server::{Server, MAX_HANDLES, MAX_IO};
use super::*;

/// Plays the guest kernel's side of the FUSE protocol.
struct Driver {
    server: Server,
    unique: u64,
}

fn body_with_name(prefix: &[u8], names: &[&str]) -> Vec<u8> {
    let mut b = prefix.to_vec();
    for n in names {
        b.extend_from_slice(n.as_bytes());
        b.push(0);
    }
    b
}

impl Driver {
    fn new(dir: &Path, read_only: bool) -> Self {
        let mut d = Driver {
            server: Server::new(dir, read_only).unwrap(),
            unique: 0,
        };
        d.init();
        d
    }

    fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Option<Vec<u8>> {
        self.unique += 1;
        let mut req = Vec::new();
        InHeader {
            len: (p::IN_HEADER_LEN + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
        }
        .encode(&mut req);
        req.extend_from_slice(body);
        self.server.handle(&req)
    }

    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
        let reply = self
            .request(opcode, nodeid, body)
            .expect("request gets a reply");
        let mut r = ArgReader::new(&reply);
        let h = OutHeader::decode(&mut r).unwrap();
        assert_eq!(h.unique, self.unique);
        assert_eq!(h.len as usize, reply.len());
        if h.error != 0 {
            assert!(h.error < 0);
            return Err(-h.error);
        }
        Ok(r.rest().to_vec())
    }

    fn init(&mut self) {
        let mut b = Vec::new();
        for v in [7u32, 41, 1 << 17, u32::MAX] {
            b.put32(v);
        }
        let out = self.call(op::INIT, 0, &b).unwrap();
        let mut r = ArgReader::new(&out);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), p::KERNEL_MINOR_VERSION);
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let out = self.call(op::LOOKUP, parent, &body_with_name(&[], &[name]))?;
        Ok(EntryOut::decode(&mut ArgReader::new(&out)).unwrap())
    }

    fn getattr(&mut self, node: u64) -> Result<p::Attr, i32> {
        let out = self.call(op::GETATTR, node, &[0u8; 16])?;
        let mut r = ArgReader::new(&out);
        r.bytes(16).unwrap();
        Ok(p::Attr::decode(&mut r).unwrap())
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let mut b = Vec::new();
        b.put32(flags as u32);
        b.put32(0);
        let out = self.call(op::OPEN, node, &b)?;
        Ok(ArgReader::new(&out).u64().unwrap())
    }

    fn opendir(&mut self, node: u64) -> Result<u64, i32> {
        let out = self.call(op::OPENDIR, node, &[0u8; 8])?;
        Ok(ArgReader::new(&out).u64().unwrap())
    }

    fn read(&mut self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        self.call(op::READ, 0, &io_in(fh, offset, size))
    }

    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let mut b = io_in(fh, offset, data.len() as u32);
        b.extend_from_slice(data);
        let out = self.call(op::WRITE, 0, &b)?;
        Ok(ArgReader::new(&out).u32().unwrap())
    }

    fn create(&mut self, parent: u64, name: &str, mode: u32) -> Result<(EntryOut, u64), i32> {
        self.create_with(parent, name, mode, libc::O_RDWR | libc::O_CREAT)
    }

    fn create_with(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: i32,
    ) -> Result<(EntryOut, u64), i32> {
        let mut b = Vec::new();
        for v in [flags as u32, mode, 0o022, 0] {
            b.put32(v);
        }
        let out = self.call(op::CREATE, parent, &body_with_name(&b, &[name]))?;
        let mut r = ArgReader::new(&out);
        let e = EntryOut::decode(&mut r).unwrap();
        Ok((e, r.u64().unwrap()))
    }

    fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let mut b = Vec::new();
        b.put32(mode);
        b.put32(0);
        let out = self.call(op::MKDIR, parent, &body_with_name(&b, &[name]))?;
        Ok(EntryOut::decode(&mut ArgReader::new(&out)).unwrap())
    }

    fn release(&mut self, fh: u64, dir: bool) {
        let mut b = Vec::new();
        b.put64(fh);
        b.extend_from_slice(&[0u8; 16]);
        let opcode = if dir { op::RELEASEDIR } else { op::RELEASE };
        self.call(opcode, 0, &b).unwrap();
    }

    fn readdir(&mut self, fh: u64, plus: bool) -> Vec<(p::Dirent, Option<EntryOut>)> {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let opcode = if plus { op::READDIRPLUS } else { op::READDIR };
            // Small buffers force several rounds.
            let out = self.call(opcode, 0, &io_in(fh, offset, 400)).unwrap();
            if out.is_empty() {
                return all;
            }
            let mut r = ArgReader::new(&out);
            loop {
                let e = if plus {
                    let Ok(e) = EntryOut::decode(&mut r) else {
                        break;
                    };
                    Some(e)
                } else {
                    None
                };
                let Ok(d) = p::decode_dirent(&mut r) else {
                    break;
                };
                offset = d.off;
                all.push((d, e));
            }
        }
    }

    fn setattr(&mut self, node: u64, s: p::SetattrIn) -> Result<p::Attr, i32> {
        let out = self.call(op::SETATTR, node, &s.encode())?;
        let mut r = ArgReader::new(&out);
        r.bytes(16).unwrap();
        Ok(p::Attr::decode(&mut r).unwrap())
    }
}

fn io_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.put64(fh);
    b.put64(offset);
    b.put32(size);
    b.put32(0);
    b.put64(0);
    b.put32(0);
    b.put32(0);
    b
}

fn is_link(e: &EntryOut) -> bool {
    e.attr.mode & libc::S_IFMT == libc::S_IFLNK
}

#[test]
fn requests_before_init_fail_and_forget_gets_no_reply() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver {
        server: Server::new(dir.path(), false).unwrap(),
        unique: 0,
    };
    assert_eq!(d.call(op::GETATTR, 1, &[0u8; 16]), Err(libc::EIO));
    d.init();
    assert!(d.getattr(1).is_ok());
    assert_eq!(d.request(op::FORGET, 1, &8u64.to_le_bytes()), None);
    // FUSE_IOCTL is not implemented.
    assert_eq!(d.call(39, 1, &[]), Err(libc::ENOSYS));
}

#[test]
fn lookup_read_and_readdir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/hello.txt"), "hello world").unwrap();
    for i in 0..30 {
        std::fs::write(dir.path().join(format!("f{i:02}")), "x").unwrap();
    }
    let mut d = Driver::new(dir.path(), false);
    let sub = d.lookup(1, "sub").unwrap();
    assert_eq!(sub.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let f = d.lookup(sub.nodeid, "hello.txt").unwrap();
    assert_eq!(f.attr.size, 11);
    assert_eq!(
        f.attr.ino,
        std::fs::metadata(dir.path().join("sub/hello.txt"))
            .unwrap()
            .ino()
    );
    // The same inode looked up again keeps its node id.
    assert_eq!(d.lookup(sub.nodeid, "hello.txt").unwrap().nodeid, f.nodeid);
    assert_eq!(d.lookup(1, "missing").err(), Some(libc::ENOENT));
    let fh = d.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(fh, 6, 100).unwrap(), b"world");
    assert_eq!(d.read(fh, 100, 10).unwrap(), b"");
    let mut rel = Vec::new();
    rel.put64(fh);
    rel.extend_from_slice(&[0u8; 16]);
    assert_eq!(d.call(op::RELEASE, f.nodeid, &rel), Ok(vec![]));
    assert_eq!(d.read(fh, 0, 1), Err(libc::EBADF));

    for plus in [false, true] {
        let dh = d.opendir(1).unwrap();
        let entries = d.readdir(dh, plus);
        let mut names: Vec<String> = entries
            .iter()
            .map(|(e, _)| String::from_utf8(e.name.clone()).unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 33, "{names:?}");
        assert_eq!(&names[..3], &[".", "..", "f00"]);
        assert!(names.contains(&"sub".to_string()));
        if plus {
            for (de, e) in &entries {
                let e = e.unwrap();
                if de.name == b"." || de.name == b".." {
                    assert_eq!(e.nodeid, 0);
                } else {
                    assert_ne!(e.nodeid, 0);
                    assert_eq!(e.attr.ino, de.ino);
                }
            }
            let sub_entry = entries.iter().find(|(de, _)| de.name == b"sub").unwrap();
            assert_eq!(sub_entry.1.unwrap().nodeid, sub.nodeid);
        }
        let mut rel = Vec::new();
        rel.put64(dh);
        rel.extend_from_slice(&[0u8; 16]);
        d.call(op::RELEASEDIR, 1, &rel).unwrap();
    }
    // STATFS answers something sensible.
    let st = d.call(op::STATFS, 1, &[]).unwrap();
    assert_eq!(st.len(), 80);
}

#[test]
fn names_that_are_not_single_components_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mut d = Driver::new(dir.path(), false);
    let sub = d.lookup(1, "sub").unwrap();
    for bad in ["..", ".", "../..", "sub/..", "/etc", "a/b"] {
        assert_eq!(d.lookup(sub.nodeid, bad).err(), Some(libc::EINVAL), "{bad}");
        assert!(d.mkdir(1, bad, 0o755).is_err(), "{bad}");
    }
}

#[test]
fn symlinks_never_lead_out_of_the_shared_directory() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "host secret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    symlink("/", dir.path().join("root")).unwrap();
    symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
    symlink("../../../../../../etc", dir.path().join("up")).unwrap();
    symlink(outside.path(), dir.path().join("out")).unwrap();
    let mut d = Driver::new(dir.path(), false);

    // Symlinks are nodes of their own; the host never follows them.
    for name in ["root", "passwd", "up", "out"] {
        let e = d.lookup(1, name).unwrap();
        assert!(is_link(&e), "{name}");
        assert_eq!(d.open(e.nodeid, libc::O_RDONLY), Err(libc::ELOOP));
        assert_eq!(d.opendir(e.nodeid), Err(libc::ELOOP));
        // Looking up inside a symlink is not possible: it is no directory.
        assert_eq!(d.lookup(e.nodeid, "etc").err(), Some(libc::ENOTDIR));
        assert_eq!(d.lookup(e.nodeid, "secret").err(), Some(libc::ENOTDIR));
        // Creating through it fails as well.
        assert!(d.create(e.nodeid, "planted", 0o644).is_err());
    }
    assert!(!outside.path().join("planted").exists());
    // READLINK hands the guest the text, which the guest resolves in its own
    // namespace.
    let e = d.lookup(1, "passwd").unwrap();
    assert_eq!(d.call(op::READLINK, e.nodeid, &[]).unwrap(), b"/etc/passwd");
    // The attributes are the link's, not /etc/passwd's.
    let host = std::fs::metadata("/etc/passwd").unwrap();
    assert_ne!(e.attr.ino, host.ino());

    // A symlink the guest creates may point anywhere: it is only text.
    let mut b = Vec::new();
    b.extend_from_slice(b"esc\0/etc/shadow\0");
    let out = d.call(op::SYMLINK, 1, &b).unwrap();
    let esc = EntryOut::decode(&mut ArgReader::new(&out)).unwrap();
    assert!(is_link(&esc));
    assert_eq!(d.open(esc.nodeid, libc::O_RDONLY), Err(libc::ELOOP));
    // A guest-made symlink as CREATE target with O_CREAT does not write outside.
    symlink(outside.path().join("new"), dir.path().join("dangling")).unwrap();
    assert!(d.create(1, "dangling", 0o644).is_err());
    assert!(!outside.path().join("new").exists());
}

#[test]
fn a_directory_swapped_for_a_symlink_goes_stale() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "host secret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/secret"), "inside").unwrap();
    let mut d = Driver::new(dir.path(), false);
    let node = d.lookup(1, "d").unwrap();
    // The host replaces the directory by a symlink pointing out.
    std::fs::rename(dir.path().join("d"), dir.path().join("d.old")).unwrap();
    symlink(outside.path(), dir.path().join("d")).unwrap();
    assert_eq!(d.lookup(node.nodeid, "secret").err(), Some(libc::ESTALE));
    assert_eq!(d.getattr(node.nodeid).err(), Some(libc::ESTALE));
    assert_eq!(d.opendir(node.nodeid).err(), Some(libc::ESTALE));
    // A fresh lookup finds the symlink, which leads nowhere.
    let again = d.lookup(1, "d").unwrap();
    assert!(is_link(&again));
    assert_eq!(d.lookup(again.nodeid, "secret").err(), Some(libc::ENOTDIR));
    // The moved directory is reachable under its new name only.
    let old = d.lookup(1, "d.old").unwrap();
    assert_eq!(old.nodeid, node.nodeid, "same inode, same node");
    assert!(d.lookup(old.nodeid, "secret").is_ok());
}

#[test]
fn changes_reach_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::new(dir.path(), false);
    let sub = d.mkdir(1, "sub", 0o775).unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o775,
        "the host umask does not strip bits"
    );
    let (f, fh) = d.create(sub.nodeid, "a.txt", 0o640).unwrap();
    assert_eq!(d.write(fh, 0, b"hello").unwrap(), 5);
    assert_eq!(d.write(fh, 5, b" there").unwrap(), 6);
    let mut fs = Vec::new();
    fs.put64(fh);
    fs.put32(0);
    fs.put32(0);
    d.call(op::FSYNC, f.nodeid, &fs).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sub/a.txt")).unwrap(),
        "hello there"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("sub/a.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    // Truncate and chmod through SETATTR.
    let a = d
        .setattr(
            f.nodeid,
            p::SetattrIn {
                valid: fattr::SIZE | fattr::MODE,
                size: 2,
                mode: 0o600,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((a.size, a.mode & 0o777), (2, 0o600));
    assert_eq!(std::fs::read(dir.path().join("sub/a.txt")).unwrap(), b"he");
    let a = d
        .setattr(
            f.nodeid,
            p::SetattrIn {
                valid: fattr::MTIME,
                mtime: 1_000_000,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.mtime, 1_000_000);

    // Rename keeps the node, which then resolves under its new name.
    let mut b = Vec::new();
    b.put64(1);
    let b = body_with_name(&b, &["a.txt", "b.txt"]);
    d.call(op::RENAME, sub.nodeid, &b).unwrap();
    assert!(dir.path().join("b.txt").exists());
    assert_eq!(d.getattr(f.nodeid).unwrap().size, 2);
    // Hard link and unlink.
    let mut b = Vec::new();
    b.put64(f.nodeid);
    let out = d
        .call(op::LINK, sub.nodeid, &body_with_name(&b, &["c.txt"]))
        .unwrap();
    let l = EntryOut::decode(&mut ArgReader::new(&out)).unwrap();
    assert_eq!(l.nodeid, f.nodeid);
    assert_eq!(l.attr.nlink, 2);
    d.call(op::UNLINK, 1, &body_with_name(&[], &["b.txt"]))
        .unwrap();
    assert_eq!(std::fs::read(dir.path().join("sub/c.txt")).unwrap(), b"he");
    // Open with O_TRUNC.
    let fh2 = d.open(l.nodeid, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    assert_eq!(d.write(fh2, 0, b"new").unwrap(), 3);
    assert_eq!(std::fs::read(dir.path().join("sub/c.txt")).unwrap(), b"new");
    // Device nodes are never created on the host.
    let mut b = Vec::new();
    for v in [libc::S_IFCHR | 0o666, 0x0103, 0, 0] {
        b.put32(v);
    }
    assert_eq!(
        d.call(op::MKNOD, 1, &body_with_name(&b, &["null"])),
        Err(libc::EPERM)
    );
    // rmdir of a non-empty directory fails, then works.
    assert_eq!(
        d.call(op::RMDIR, 1, &body_with_name(&[], &["sub"])),
        Err(libc::ENOTEMPTY)
    );
    d.call(op::UNLINK, sub.nodeid, &body_with_name(&[], &["c.txt"]))
        .unwrap();
    d.call(op::RMDIR, 1, &body_with_name(&[], &["sub"]))
        .unwrap();
    assert!(!dir.path().join("sub").exists());
    // Large writes and reads up to MAX_IO.
    let (big, fh) = d.create(1, "big", 0o644).unwrap();
    let data: Vec<u8> = (0..MAX_IO).map(|i| (i % 251) as u8).collect();
    assert_eq!(d.write(fh, 0, &data).unwrap(), MAX_IO);
    assert_eq!(d.read(fh, 0, MAX_IO).unwrap(), data);
    assert_eq!(d.getattr(big.nodeid).unwrap().size, u64::from(MAX_IO));
}

#[test]
fn read_only_refuses_every_change() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("f"), "keep").unwrap();
    let mut d = Driver::new(dir.path(), true);
    let f = d.lookup(1, "f").unwrap();
    let sub = d.lookup(1, "sub").unwrap();
    // Reading works.
    let fh = d.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(fh, 0, 10).unwrap(), b"keep");
    // Every modifying operation answers EROFS.
    let rofs = Err::<(), i32>(libc::EROFS);
    assert_eq!(d.open(f.nodeid, libc::O_WRONLY).map(|_| ()), rofs);
    assert_eq!(d.open(f.nodeid, libc::O_RDWR).map(|_| ()), rofs);
    assert_eq!(
        d.open(f.nodeid, libc::O_RDONLY | libc::O_TRUNC).map(|_| ()),
        rofs
    );
    assert_eq!(d.write(fh, 0, b"x").map(|_| ()), rofs);
    assert_eq!(d.create(1, "new", 0o644).map(|_| ()), rofs);
    assert_eq!(d.mkdir(1, "newdir", 0o755).map(|_| ()), rofs);
    let ops: Vec<(u32, u64, Vec<u8>)> = vec![
        (op::UNLINK, 1, body_with_name(&[], &["f"])),
        (op::RMDIR, 1, body_with_name(&[], &["sub"])),
        (op::SYMLINK, 1, body_with_name(&[], &["l", "f"])),
        (
            op::RENAME,
            1,
            body_with_name(&1u64.to_le_bytes(), &["f", "g"]),
        ),
        (
            op::RENAME2,
            1,
            body_with_name(
                &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &["f", "g"],
            ),
        ),
        (
            op::LINK,
            sub.nodeid,
            body_with_name(&f.nodeid.to_le_bytes(), &["h"]),
        ),
        (
            op::SETATTR,
            f.nodeid,
            p::SetattrIn {
                valid: fattr::SIZE,
                ..Default::default()
            }
            .encode(),
        ),
        (op::MKNOD, 1, body_with_name(&[0u8; 16], &["fifo"])),
        (op::FALLOCATE, 1, vec![0u8; 32]),
    ];
    for (opcode, node, body) in ops {
        assert_eq!(
            d.call(opcode, node, &body).map(|_| ()),
            rofs,
            "opcode {opcode}"
        );
    }
    let mut acc = Vec::new();
    acc.put32(libc::W_OK as u32);
    acc.put32(0);
    assert_eq!(d.call(op::ACCESS, f.nodeid, &acc).map(|_| ()), rofs);
    // Nothing changed on the host.
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"keep");
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["f", "sub"]);
}

#[test]
fn forget_drops_nodes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    let mut d = Driver::new(dir.path(), false);
    let f = d.lookup(1, "f").unwrap();
    d.lookup(1, "f").unwrap();
    assert_eq!(d.server.node_count(), 2);
    assert_eq!(d.request(op::FORGET, f.nodeid, &1u64.to_le_bytes()), None);
    assert_eq!(d.server.node_count(), 2, "one lookup left");
    let mut b = Vec::new();
    b.put32(1);
    b.put32(0);
    b.put64(f.nodeid);
    b.put64(1);
    assert_eq!(d.request(op::BATCH_FORGET, 0, &b), None);
    assert_eq!(d.server.node_count(), 1);
    assert_eq!(d.getattr(f.nodeid).err(), Some(libc::ESTALE));
}

#[test]
fn state_round_trip_reopens_nodes_and_handles_in_a_moved_directory() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("shared");
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    std::fs::write(dir.join("a/b/file"), "contents").unwrap();
    std::fs::write(dir.join("gone"), "soon removed").unwrap();
    let config = FsConfig {
        tag: "work".into(),
        shared_dir: dir.clone(),
        read_only: false,
    };
    let mut dev = Fs::new(&config).unwrap();
    let mut d = Driver {
        server: std::mem::replace(&mut dev.server, Server::new(&dir, false).unwrap()),
        unique: 0,
    };
    d.init();
    let a = d.lookup(1, "a").unwrap();
    let b = d.lookup(a.nodeid, "b").unwrap();
    let f = d.lookup(b.nodeid, "file").unwrap();
    let gone = d.lookup(1, "gone").unwrap();
    let fh = d.open(f.nodeid, libc::O_RDWR).unwrap();
    dev.server = d.server;
    let saved = dev.save();
    assert_eq!(saved.server.nodes.len(), 4);
    assert_eq!(saved.server.handles.len(), 1);

    let json = serde_json::to_string(&VirtioDeviceState::Fs(saved.clone())).unwrap();
    let VirtioDeviceState::Fs(parsed) = serde_json::from_str(&json).unwrap() else {
        panic!("wrong variant");
    };
    assert_eq!(parsed, saved);

    // The host directory moves (as with --remap-mount) and loses a file.
    let moved = parent.path().join("elsewhere");
    std::fs::rename(&dir, &moved).unwrap();
    std::fs::remove_file(moved.join("gone")).unwrap();
    let restored = Fs::restore(
        &FsConfig {
            shared_dir: moved.clone(),
            ..config.clone()
        },
        &parsed,
    )
    .unwrap();
    assert_eq!(restored.save(), saved, "tables survive as they were");
    let mut d = Driver {
        server: restored.server,
        unique: 100,
    };
    // No INIT again: the guest's mount continues.
    assert_eq!(d.getattr(f.nodeid).unwrap().size, 8);
    assert_eq!(d.read(fh, 0, 100).unwrap(), b"contents");
    assert_eq!(d.write(fh, 0, b"C").unwrap(), 1);
    assert_eq!(std::fs::read(moved.join("a/b/file")).unwrap(), b"Contents");
    assert_eq!(d.getattr(gone.nodeid).err(), Some(libc::ESTALE));
    assert_eq!(d.lookup(b.nodeid, "file").unwrap().nodeid, f.nodeid);

    // Another tag is refused.
    assert!(matches!(
        Fs::restore(
            &FsConfig {
                tag: "other".into(),
                shared_dir: moved,
                read_only: false
            },
            &parsed
        ),
        Err(FsError::TagMismatch { .. })
    ));
}

#[test]
fn device_serves_requests_through_its_queues() {
    use crate::virtio::mmio::{reg, MmioTransport};
    use crate::virtio::testing::{self, DriverQueue};
    use vm_memory::{Bytes, GuestAddress};

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "queued").unwrap();
    let mem = testing::memory();
    let fs = Fs::new(&FsConfig {
        tag: "share0".into(),
        shared_dir: dir.path().to_path_buf(),
        read_only: false,
    })
    .unwrap();
    let mut t = MmioTransport::new(VirtioDevice::Fs(Box::new(fs)), mem.clone()).unwrap();
    let mut b = [0u8; 4];
    t.read(reg::DEVICE_ID, &mut b);
    assert_eq!(u32::from_le_bytes(b), DEVICE_TYPE);
    let mut tag = [0u8; 8];
    t.read(reg::CONFIG, &mut tag);
    assert_eq!(&tag, b"share0\0\0");
    t.read(reg::CONFIG + TAG_MAX as u64, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1, "one request queue");

    let mut hiprio = DriverQueue::new(GuestAddress(0x1000), 16);
    let mut requests = DriverQueue::new(GuestAddress(0x2000), 16);
    testing::init_device(
        &mut t,
        1 << VIRTIO_F_VERSION_1,
        &mut [&mut hiprio, &mut requests],
    );

    let send = |t: &mut MmioTransport, dq: &mut DriverQueue, q: usize, req: &[u8]| {
        mem.write_slice(req, GuestAddress(0x10000)).unwrap();
        mem.write_slice(&[0u8; 256], GuestAddress(0x20000)).unwrap();
        let head = dq.add_chain(
            &mem,
            &[
                (GuestAddress(0x10000), req.len() as u32, false),
                (GuestAddress(0x20000), 256, true),
            ],
        );
        t.handle_queue_event(q);
        let (h, len) = dq.next_used(&mem).unwrap();
        assert_eq!(h, head);
        let mut out = vec![0u8; len as usize];
        mem.read_slice(&mut out, GuestAddress(0x20000)).unwrap();
        out
    };
    let header = |opcode: u32, unique: u64, nodeid: u64, body: &[u8]| {
        let mut r = Vec::new();
        InHeader {
            len: (p::IN_HEADER_LEN + body.len()) as u32,
            opcode,
            unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
        }
        .encode(&mut r);
        r.extend_from_slice(body);
        r
    };
    let mut init = Vec::new();
    for v in [7u32, 41, 0, 0] {
        init.put32(v);
    }
    let out = send(&mut t, &mut requests, 1, &header(op::INIT, 1, 0, &init));
    let h = OutHeader::decode(&mut ArgReader::new(&out)).unwrap();
    assert_eq!((h.error, h.unique, h.len as usize), (0, 1, 16 + 64));
    let out = send(&mut t, &mut requests, 1, &header(op::LOOKUP, 2, 1, b"f\0"));
    let mut r = ArgReader::new(&out);
    assert_eq!(OutHeader::decode(&mut r).unwrap().error, 0);
    let e = EntryOut::decode(&mut r).unwrap();
    assert_eq!(e.attr.size, 6);
    // FORGET on the hiprio queue: consumed, nothing written.
    let out = send(
        &mut t,
        &mut hiprio,
        0,
        &header(op::FORGET, 3, e.nodeid, &1u64.to_le_bytes()),
    );
    assert!(out.is_empty());
    let VirtioDeviceState::Fs(state) = t.save().device else {
        panic!("wrong state");
    };
    assert!(state.server.nodes.is_empty());
    assert!(state.server.initialized);
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn host_mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn c_path(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap()
}

#[test]
fn fifos_sockets_and_device_nodes_are_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = c_path(&dir.path().join("fifo"));
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
    let root = running_as_root();
    if root {
        // A device node the host directory holds: the host's /dev/null.
        let null = c_path(&dir.path().join("null"));
        let mode = libc::S_IFCHR | 0o666;
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(
            unsafe { libc::mknod(null.as_ptr(), mode, libc::makedev(1, 3)) },
            0
        );
    }
    let mut d = Driver::new(dir.path(), false);
    // The device thread must answer every one of these at once: opening a
    // FIFO nobody writes to would block it (and the whole device) forever.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut results = Vec::new();
        let mut names = vec!["fifo", "sock"];
        if root {
            names.push("null");
        }
        for name in names {
            let e = d.lookup(1, name).unwrap();
            for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
                results.push((name, "open", d.open(e.nodeid, flags).map(|_| ())));
            }
            results.push((name, "opendir", d.opendir(e.nodeid).map(|_| ())));
            // CREATE without O_EXCL opens an existing name.
            for flags in [libc::O_RDONLY, libc::O_WRONLY] {
                let r = d.create_with(1, name, 0o644, flags | libc::O_CREAT);
                results.push((name, "create", r.map(|_| ())));
            }
        }
        assert_eq!(d.server.handle_count(), 0);
        tx.send(results).unwrap();
    });
    let results = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the server answered without blocking");
    for (name, what, r) in results {
        let want = if name == "null" {
            libc::EACCES
        } else {
            libc::ENXIO
        };
        assert_eq!(r, Err(want), "{what} {name}");
    }
}

/// Raises the soft descriptor limit so a test can hold `n` more descriptors.
fn allow_descriptors(n: u64) {
    // SAFETY: `rlimit` is plain old data.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into `lim`, which outlives the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let want = (n + 1024).min(lim.rlim_max);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads `lim`, which outlives the call.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
}

#[test]
fn open_handles_per_mount_are_capped() {
    allow_descriptors(MAX_HANDLES as u64 + 64);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    let mut d = Driver::new(dir.path(), false);
    let f = d.lookup(1, "f").unwrap();
    let mut handles = Vec::new();
    // Files and directories count alike.
    while handles.len() < MAX_HANDLES {
        let h = if handles.len() % 2 == 0 {
            (d.open(f.nodeid, libc::O_RDONLY).unwrap(), false)
        } else {
            (d.opendir(1).unwrap(), true)
        };
        handles.push(h);
    }
    assert_eq!(d.server.handle_count(), MAX_HANDLES);
    assert_eq!(d.open(f.nodeid, libc::O_RDONLY), Err(libc::EMFILE));
    assert_eq!(d.opendir(1), Err(libc::EMFILE));
    assert_eq!(d.create(1, "new", 0o644).map(|_| ()), Err(libc::EMFILE));
    assert!(
        !dir.path().join("new").exists(),
        "a refused CREATE leaves nothing behind"
    );
    // Releasing one makes room for one.
    let (fh, is_dir) = handles.pop().unwrap();
    d.release(fh, is_dir);
    let (_, fh) = d.create(1, "new", 0o644).unwrap();
    assert_eq!(d.opendir(1), Err(libc::EMFILE));
    d.release(fh, false);
    for (fh, is_dir) in handles {
        d.release(fh, is_dir);
    }
    assert_eq!(d.server.handle_count(), 0);
    assert!(d.opendir(1).is_ok());
}

#[test]
fn setid_bits_are_stripped_from_guest_modes() {
    use super::server::{setid_cleared_by_write, without_setid};
    assert_eq!(without_setid(0o4755), 0o755);
    assert_eq!(without_setid(0o2755), 0o755);
    assert_eq!(without_setid(0o7777), 0o1777, "the sticky bit stays");
    assert_eq!(without_setid(libc::S_IFREG | 0o6644), libc::S_IFREG | 0o644);
    // A write clears set-user-ID, and set-group-ID only with group-execute
    // (without it the bit marks mandatory locking), as the kernel does.
    assert_eq!(setid_cleared_by_write(0o4755), libc::S_ISUID);
    assert_eq!(
        setid_cleared_by_write(0o6711),
        libc::S_ISUID | libc::S_ISGID
    );
    assert_eq!(setid_cleared_by_write(0o2755), libc::S_ISGID);
    assert_eq!(setid_cleared_by_write(0o2745), 0);
    assert_eq!(setid_cleared_by_write(0o1777), 0);
}

#[test]
fn the_guest_never_makes_setid_files_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let mut d = Driver::new(p, false);
    let (f, fh) = d.create(1, "created", 0o6755).unwrap();
    assert_eq!(host_mode(&p.join("created")), 0o755);
    assert_eq!(f.attr.mode & 0o7777, 0o755);
    let sub = d.mkdir(1, "dir", 0o2775).unwrap();
    assert_eq!(host_mode(&p.join("dir")), 0o775);
    assert_eq!(sub.attr.mode & 0o7777, 0o775);
    let mut b = Vec::new();
    for v in [libc::S_IFREG | 0o4755, 0, 0, 0] {
        b.put32(v);
    }
    d.call(op::MKNOD, 1, &body_with_name(&b, &["made"]))
        .unwrap();
    assert_eq!(host_mode(&p.join("made")), 0o755);
    let a = d
        .setattr(
            f.nodeid,
            p::SetattrIn {
                valid: fattr::MODE,
                mode: 0o6750,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.mode & 0o7777, 0o750);
    assert_eq!(host_mode(&p.join("created")), 0o750);
    // Other bits still go through.
    d.setattr(
        sub.nodeid,
        p::SetattrIn {
            valid: fattr::MODE,
            mode: 0o1777,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(host_mode(&p.join("dir")), 0o1777);
    d.release(fh, false);
}

#[test]
fn guest_writes_clear_setid_bits_of_host_files() {
    if !running_as_root() {
        // Without CAP_FSETID the kernel clears them itself.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2755), ("lock", 0o2644)] {
        std::fs::write(p.join(name), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(p.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(p.join("trunc"), "data").unwrap();
    std::fs::set_permissions(p.join("trunc"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(p.join("opentrunc"), "data").unwrap();
    std::fs::set_permissions(p.join("opentrunc"), std::fs::Permissions::from_mode(0o6755)).unwrap();
    let mut d = Driver::new(p, false);
    for (name, after) in [("suid", 0o755), ("sgid", 0o755), ("lock", 0o2644)] {
        let e = d.lookup(1, name).unwrap();
        let fh = d.open(e.nodeid, libc::O_WRONLY).unwrap();
        assert_eq!(
            host_mode(&p.join(name)),
            e.attr.mode & 0o7777,
            "open alone keeps them"
        );
        assert_eq!(d.write(fh, 0, b"#!/bin/true").unwrap(), 11);
        assert_eq!(host_mode(&p.join(name)), after, "{name}");
        d.release(fh, false);
    }
    // Truncation changes the contents too.
    let e = d.lookup(1, "trunc").unwrap();
    d.setattr(
        e.nodeid,
        p::SetattrIn {
            valid: fattr::SIZE,
            size: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(host_mode(&p.join("trunc")), 0o755);
    let e = d.lookup(1, "opentrunc").unwrap();
    let fh = d.open(e.nodeid, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    assert_eq!(host_mode(&p.join("opentrunc")), 0o755);
    d.release(fh, false);
}

use super::super::VirtioDeviceState;
use crate::virtio::VirtioDevice;
