//! The virtio-fs FUSE server fed what a hostile guest can send: arbitrary
//! requests, after a proper INIT or not, against a fresh shared directory
//! per run, on a server that is new or restored from arbitrary saved state.
//!
//! Beyond not panicking, the guest must stay inside the shared directory: a
//! canary file beside it, and a symlink to it inside, must come out
//! untouched, and nothing may appear next to the shared directory. Every
//! reply must be a well-formed FUSE reply to the request it answers.
//!
//! Files are capped at 16 MiB (RLIMIT_FSIZE; SIGXFSZ ignored) and the shared
//! directory is removed after each run, so a run cannot fill the disk.

#![no_main]

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use ferry_devices::virtio::fs::protocol::{self as p, op, InHeader};
use ferry_devices::virtio::fs::server::{SavedHandle, SavedNode, Server, ServerState};
use libfuzzer_sys::fuzz_target;

const OPS: [u32; 33] = [
    op::LOOKUP,
    op::FORGET,
    op::GETATTR,
    op::SETATTR,
    op::READLINK,
    op::SYMLINK,
    op::MKNOD,
    op::MKDIR,
    op::UNLINK,
    op::RMDIR,
    op::RENAME,
    op::LINK,
    op::OPEN,
    op::READ,
    op::WRITE,
    op::STATFS,
    op::RELEASE,
    op::FSYNC,
    op::FLUSH,
    op::INIT,
    op::OPENDIR,
    op::READDIR,
    op::RELEASEDIR,
    op::FSYNCDIR,
    op::ACCESS,
    op::CREATE,
    op::INTERRUPT,
    op::DESTROY,
    op::BATCH_FORGET,
    op::FALLOCATE,
    op::READDIRPLUS,
    op::RENAME2,
    op::SYNCFS,
];

/// Names the guest may use; anything else comes from the input.
const NAMES: [&[u8]; 10] = [
    b"a", b"d", b"b", b"up", b"abs", b"loop", b"new", b"..", b".", b"",
];

#[derive(Arbitrary, Debug)]
struct Req {
    /// Index into OPS; past its end, the raw opcode.
    opcode: u8,
    raw_opcode: u32,
    /// Node ids are small numbers handed out in order; 255 picks `raw_node`.
    node: u8,
    raw_node: u64,
    uid: u8,
    body: Body,
    /// Lie in the header's length field.
    len_lie: Option<u32>,
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    /// Fixed-size arguments followed by NUL-terminated names.
    Named {
        prefix: Vec<u8>,
        names: Vec<(u8, Vec<u8>)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    init: bool,
    restore: Option<Saved>,
    reqs: Vec<Req>,
}

#[derive(Arbitrary, Debug)]
struct Saved {
    initialized: bool,
    minor: u32,
    nodes: Vec<(u8, u8, u8, u32, u8)>,
    handles: Vec<(u8, u8, u32, bool)>,
    next_node: u64,
    next_handle: u64,
}

struct Place {
    base: PathBuf,
    share: PathBuf,
    canary: PathBuf,
}

const CANARY: &[u8] = b"outside the shared directory";

fn base_dir() -> PathBuf {
    std::env::temp_dir().join(format!("ferry-fuzz-fs-{}", std::process::id()))
}

extern "C" fn remove_base() {
    let _ = fs::remove_dir_all(base_dir());
}

fn place() -> &'static Place {
    static PLACE: OnceLock<Place> = OnceLock::new();
    PLACE.get_or_init(|| {
        // SAFETY: plain libc calls with valid arguments, once, before any
        // file is written; `remove_base` may run at any exit.
        unsafe {
            libc::atexit(remove_base);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 16 << 20,
                rlim_max: 16 << 20,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
        }
        let base = base_dir();
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("outside")).unwrap();
        let canary = base.join("outside/canary");
        fs::write(&canary, CANARY).unwrap();
        Place {
            share: base.join("share"),
            canary,
            base,
        }
    })
}

fn fresh_share(pl: &Place) {
    let s = &pl.share;
    let _ = fs::remove_dir_all(s);
    fs::create_dir(s).unwrap();
    fs::write(s.join("a"), b"hello").unwrap();
    fs::create_dir(s.join("d")).unwrap();
    fs::write(s.join("d/b"), b"inner").unwrap();
    symlink("../outside/canary", s.join("up")).unwrap();
    symlink(&pl.canary, s.join("abs")).unwrap();
    symlink("loop", s.join("loop")).unwrap();
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The world outside the shared directory is as the harness left it.
fn check_contained(pl: &Place, canary_meta: &(u32, u32, u32, u64, i64, u64)) {
    assert_eq!(names_in(&pl.base), ["outside", "share"], "escaped: new entry beside the share");
    assert_eq!(names_in(&pl.base.join("outside")), ["canary"], "escaped: new entry outside");
    let m = fs::symlink_metadata(&pl.canary).expect("canary still there");
    assert_eq!(
        (m.mode(), m.uid(), m.gid(), m.nlink(), m.mtime(), m.size()),
        *canary_meta,
        "escaped: the canary changed"
    );
    assert_eq!(fs::read(&pl.canary).unwrap(), CANARY, "escaped: canary rewritten");
}

fn encode(req: &Req, unique: u64) -> Vec<u8> {
    let opcode = OPS
        .get(usize::from(req.opcode))
        .copied()
        .unwrap_or(req.raw_opcode);
    let nodeid = if req.node == 255 {
        req.raw_node
    } else {
        u64::from(req.node % 16)
    };
    let mut body = match &req.body {
        Body::Raw(b) => b.clone(),
        Body::Named { prefix, names } => {
            let mut b = prefix.clone();
            for (pick, raw) in names.iter().take(2) {
                match NAMES.get(usize::from(*pick)) {
                    Some(n) => b.extend_from_slice(n),
                    None => b.extend_from_slice(raw),
                }
                b.push(0);
            }
            b
        }
    };
    body.truncate(64 << 10);
    let mut out = Vec::with_capacity(p::IN_HEADER_LEN + body.len());
    InHeader {
        len: req
            .len_lie
            .unwrap_or((p::IN_HEADER_LEN + body.len()) as u32),
        opcode,
        unique,
        nodeid,
        uid: u32::from(req.uid % 2) * 1000,
        gid: u32::from(req.uid % 2) * 1000,
        pid: 1,
    }
    .encode(&mut out);
    out.extend_from_slice(&body);
    out
}

/// A reply is one whole FUSE reply to request `unique`.
fn check_reply(reply: &[u8], unique: u64) {
    let mut r = p::ArgReader::new(reply);
    let h = p::OutHeader::decode(&mut r).expect("reply has a header");
    assert_eq!(h.len as usize, reply.len(), "reply length field");
    assert_eq!(h.unique, unique, "reply answers its request");
    assert!(h.error <= 0 && h.error > -4096, "error is a negated errno");
    if h.error != 0 {
        assert_eq!(reply.len(), p::OUT_HEADER_LEN, "an error carries no payload");
    }
}

fn restored_state(s: &Saved) -> ServerState {
    ServerState {
        initialized: s.initialized,
        minor: s.minor,
        nodes: s
            .nodes
            .iter()
            .take(16)
            .map(|&(id, parent, name, kind, nlookup)| SavedNode {
                id: u64::from(id),
                parent: u64::from(parent),
                name: NAMES
                    .get(usize::from(name))
                    .map_or_else(|| vec![name; 3], |n| n.to_vec()),
                kind: kind & libc::S_IFMT,
                nlookup: u64::from(nlookup),
            })
            .collect(),
        handles: s
            .handles
            .iter()
            .take(16)
            .map(|&(fh, node, flags, dir)| SavedHandle {
                fh: u64::from(fh),
                node: u64::from(node),
                flags,
                dir,
            })
            .collect(),
        next_node: s.next_node,
        next_handle: s.next_handle,
    }
}

fuzz_target!(|input: Input| {
    let pl = place();
    fresh_share(pl);
    let cm = fs::symlink_metadata(&pl.canary).unwrap();
    let canary_meta = (
        cm.mode(),
        cm.uid(),
        cm.gid(),
        cm.nlink(),
        cm.mtime(),
        cm.size(),
    );
    {
        let mut server = match &input.restore {
            None => Server::new(&pl.share, input.read_only).unwrap(),
            Some(s) => match Server::restore(&pl.share, input.read_only, &restored_state(s)) {
                Ok(server) => server,
                Err(_) => return,
            },
        };
        let mut unique = 0u64;
        if input.init {
            let mut b = Vec::new();
            for v in [7u32, 31, 1 << 17, u32::MAX] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            unique += 1;
            let req = encode(
                &Req {
                    opcode: 19, // INIT
                    raw_opcode: 0,
                    node: 0,
                    raw_node: 0,
                    uid: 0,
                    body: Body::Raw(b),
                    len_lie: None,
                },
                unique,
            );
            let reply = server.handle(&req).expect("INIT is answered");
            check_reply(&reply, unique);
        }
        for req in input.reqs.iter().take(64) {
            unique += 1;
            let bytes = encode(req, unique);
            if let Some(reply) = server.handle(&bytes) {
                check_reply(&reply, unique);
            }
        }
        assert!(server.handle_count() <= ferry_devices::virtio::fs::server::MAX_HANDLES);
    }
    check_contained(pl, &canary_meta);
});
