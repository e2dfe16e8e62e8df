//! A passthrough FUSE server over one shared host directory.
//!
//! Nodes are remembered by *name*, not by open descriptor: each node knows
//! its parent node and its name in it, and every operation re-resolves the
//! node's path from the shared root with [`resolve::open_beneath`]. The
//! host inode found must be the one the node was created for (device and
//! inode number), otherwise the guest gets `ESTALE` and looks the name up
//! again. This keeps the server's state plain data (it survives snapshots:
//! see [`ServerState`]) and means no descriptor ever points at a directory
//! that was moved out of the shared tree.
//!
//! Open files and directories do hold descriptors (opened through the
//! node's verified `O_PATH` descriptor), like any process's open files.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::protocol::{
    self as p, encode_attr_out, encode_open_out, fattr, init_flags, op, ArgReader, Attr, EntryOut,
    InHeader, InitIn, InitOut, Put, SetattrIn, Validity, ROOT_ID,
};
use super::resolve::{self, open_beneath, raw, reopen, sys, validate_name};

/// Largest READ/WRITE payload the guest may send or ask for.
pub const MAX_IO: u32 = 1 << 20;
/// `max_pages` granted at INIT (`MAX_IO` in 4 KiB pages).
const MAX_PAGES: u16 = (MAX_IO / 4096) as u16;
/// How long the guest may cache names and attributes: host-side changes
/// become visible to the guest within this time.
const CACHE_TTL: Validity = Validity { secs: 1, nsecs: 0 };
/// Deepest node chain followed when building a path.
const MAX_DEPTH: usize = 2048;
/// Most files and directories the guest may hold open on one mount at once
/// (OPEN, OPENDIR and CREATE answer `EMFILE` beyond it, RELEASE makes room).
/// Every handle is a host descriptor of the VMM process: without a cap a
/// guest could open files until the VMM has none left for its own work.
pub const MAX_HANDLES: usize = 4096;

/// FUSE_INIT flags the server accepts if the guest offers them.
const SUPPORTED_INIT_FLAGS: u32 = init_flags::ASYNC_READ
    | init_flags::ATOMIC_O_TRUNC
    | init_flags::BIG_WRITES
    | init_flags::AUTO_INVAL_DATA
    | init_flags::DO_READDIRPLUS
    | init_flags::READDIRPLUS_AUTO
    | init_flags::PARALLEL_DIROPS
    | init_flags::MAX_PAGES;

#[derive(Clone, Debug)]
struct Node {
    parent: u64,
    name: Vec<u8>,
    /// (st_dev, st_ino) of the host inode, unknown right after a restore
    /// until the node is resolved again.
    id: Option<(u64, u64)>,
    /// `S_IFMT` bits.
    kind: u32,
    nlookup: u64,
}

struct Handle {
    node: u64,
    flags: u32,
    dir: bool,
    /// None when a restore could not reopen the file.
    fd: Option<OwnedFd>,
}

/// A node as saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNode {
    /// Node id the guest knows.
    pub id: u64,
    /// Parent node id.
    pub parent: u64,
    /// Name in the parent.
    pub name: Vec<u8>,
    /// `S_IFMT` bits.
    pub kind: u32,
    /// Lookups the guest has not forgotten.
    pub nlookup: u64,
}

/// An open file or directory as saved in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHandle {
    /// Handle id the guest knows.
    pub fh: u64,
    /// Node it was opened on.
    pub node: u64,
    /// Open flags.
    pub flags: u32,
    /// An OPENDIR handle.
    pub dir: bool,
}

/// The server's state in a snapshot: the names of every node and handle the
/// guest holds, so they can be resolved again from the (possibly remapped)
/// shared directory after a restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    /// INIT was answered.
    pub initialized: bool,
    /// Negotiated minor version.
    pub minor: u32,
    /// Nodes other than the root.
    pub nodes: Vec<SavedNode>,
    /// Open handles.
    pub handles: Vec<SavedHandle>,
    /// Next node id to hand out.
    pub next_node: u64,
    /// Next handle id to hand out.
    pub next_handle: u64,
}

/// The FUSE server of one shared directory.
pub struct Server {
    root: OwnedFd,
    read_only: bool,
    nodes: HashMap<u64, Node>,
    by_id: HashMap<(u64, u64), u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    initialized: bool,
    minor: u32,
    host_umask: u32,
    /// The VMM runs as root: created files get the guest caller's owner,
    /// and the server clears set-ID bits on writes itself (root's
    /// `CAP_FSETID` keeps the kernel from doing it).
    as_root: bool,
}

fn key(st: &libc::stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn kind(st: &libc::stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

/// Whether an inode of type `kind` may be opened for the guest: only
/// regular files and directories.
///
/// A guest kernel serves FIFOs, sockets and device nodes of a FUSE mount
/// itself and never sends OPEN for them, so refusing loses nothing a
/// well-behaved guest does. Opening them on the host instead would block
/// the device thread (a FIFO nobody writes to) or hand the guest a host
/// device (a node the shared directory holds), which `O_NONBLOCK` would not
/// prevent.
fn openable(kind: u32) -> Result<(), i32> {
    match kind {
        libc::S_IFREG | libc::S_IFDIR => Ok(()),
        libc::S_IFLNK => Err(libc::ELOOP),
        // What open(2) answers on a `nodev` mount.
        libc::S_IFCHR | libc::S_IFBLK => Err(libc::EACCES),
        // What open(2) answers for a socket; FIFOs get the same.
        _ => Err(libc::ENXIO),
    }
}

/// `mode` without the set-user-ID and set-group-ID bits. Every mode the
/// guest asks for (CREATE, MKNOD, MKDIR, SETATTR) goes through this: a
/// set-ID file the guest made would run as its owner (any user, root
/// included, when the VMM is root) for whichever host user executes it.
pub fn without_setid(mode: u32) -> u32 {
    mode & !(libc::S_ISUID | libc::S_ISGID)
}

/// The set-ID bits that changing a file of `mode` clears, as the kernel
/// does for writers without `CAP_FSETID`: set-user-ID, and set-group-ID
/// when group-execute is set (without it, the bit marks mandatory locking).
pub fn setid_cleared_by_write(mode: u32) -> u32 {
    let gid = if mode & libc::S_IXGRP != 0 {
        libc::S_ISGID
    } else {
        0
    };
    mode & (libc::S_ISUID | gid)
}

/// The ESTALE family: the name a node stood for no longer leads to it.
fn stale(e: i32) -> i32 {
    match e {
        libc::ENOENT | libc::ENOTDIR | libc::ELOOP => libc::ESTALE,
        e => e,
    }
}

type OpResult = Result<Vec<u8>, i32>;

impl Server {
    /// Serves `shared_dir`; `read_only` refuses every change with `EROFS`.
    pub fn new(shared_dir: &Path, read_only: bool) -> std::io::Result<Self> {
        let root = resolve::open_root(shared_dir)?;
        let st = resolve::fstat(root.as_raw_fd()).map_err(std::io::Error::from_raw_os_error)?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_ID,
            Node {
                parent: 0,
                name: Vec::new(),
                id: Some(key(&st)),
                kind: libc::S_IFDIR,
                nlookup: 1,
            },
        );
        Ok(Self {
            root,
            read_only,
            nodes,
            by_id: HashMap::from([(key(&st), ROOT_ID)]),
            next_node: ROOT_ID + 1,
            handles: HashMap::new(),
            next_handle: 1,
            initialized: false,
            minor: 0,
            host_umask: resolve::current_umask(),
            // SAFETY: geteuid has no preconditions.
            as_root: unsafe { libc::geteuid() } == 0,
        })
    }

    /// Serves `shared_dir` with the nodes and handles of a saved server:
    /// each node is looked up again by name, each handle reopened. Names
    /// that no longer resolve stay known and answer `ESTALE`.
    pub fn restore(
        shared_dir: &Path,
        read_only: bool,
        state: &ServerState,
    ) -> std::io::Result<Self> {
        let mut s = Self::new(shared_dir, read_only)?;
        s.initialized = state.initialized;
        s.minor = state.minor;
        s.next_node = state.next_node.max(ROOT_ID + 1);
        s.next_handle = state.next_handle.max(1);
        for n in &state.nodes {
            if n.id == ROOT_ID {
                continue;
            }
            s.nodes.insert(
                n.id,
                Node {
                    parent: n.parent,
                    name: n.name.clone(),
                    id: None,
                    kind: n.kind,
                    nlookup: n.nlookup,
                },
            );
        }
        let mut ids: Vec<u64> = s.nodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Err(e) = s.resolve(id) {
                tracing::debug!("virtio-fs: node {id} is stale after restore: {e}");
            }
        }
        for h in &state.handles {
            let fd = s
                .resolve(h.node)
                .and_then(|(fd, st)| {
                    openable(kind(&st))?;
                    let flags = h.flags as i32 & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL);
                    reopen(fd.as_raw_fd(), flags)
                })
                .map_err(|e| tracing::debug!("virtio-fs: handle {} not reopened: {e}", h.fh))
                .ok();
            s.handles.insert(
                h.fh,
                Handle {
                    node: h.node,
                    flags: h.flags,
                    dir: h.dir,
                    fd,
                },
            );
        }
        Ok(s)
    }

    /// Captures the node and handle tables.
    pub fn save(&self) -> ServerState {
        let mut nodes: Vec<SavedNode> = self
            .nodes
            .iter()
            .filter(|(&id, _)| id != ROOT_ID)
            .map(|(&id, n)| SavedNode {
                id,
                parent: n.parent,
                name: n.name.clone(),
                kind: n.kind,
                nlookup: n.nlookup,
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        let mut handles: Vec<SavedHandle> = self
            .handles
            .iter()
            .map(|(&fh, h)| SavedHandle {
                fh,
                node: h.node,
                flags: h.flags,
                dir: h.dir,
            })
            .collect();
        handles.sort_by_key(|h| h.fh);
        ServerState {
            initialized: self.initialized,
            minor: self.minor,
            nodes,
            handles,
            next_node: self.next_node,
            next_handle: self.next_handle,
        }
    }

    /// Number of nodes known (root included).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of open handles.
    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// Serves one request; returns the reply, or None for requests that get
    /// none (FORGET, BATCH_FORGET, INTERRUPT, malformed headers).
    pub fn handle(&mut self, req: &[u8]) -> Option<Vec<u8>> {
        let mut r = ArgReader::new(req);
        let h = InHeader::decode(&mut r).ok()?;
        let end = (h.len as usize).clamp(p::IN_HEADER_LEN, req.len());
        let mut args = ArgReader::new(&req[p::IN_HEADER_LEN..end]);
        match h.opcode {
            op::FORGET => {
                if let Ok(n) = args.u64() {
                    self.forget(h.nodeid, n);
                }
                return None;
            }
            op::BATCH_FORGET => {
                let count = args.u32().unwrap_or(0);
                let _ = args.u32();
                for _ in 0..count {
                    let (Ok(id), Ok(n)) = (args.u64(), args.u64()) else {
                        break;
                    };
                    self.forget(id, n);
                }
                return None;
            }
            op::INTERRUPT => return None,
            _ => {}
        }
        let result = if h.opcode != op::INIT && !self.initialized {
            Err(libc::EIO)
        } else {
            self.dispatch(&h, &mut args)
        };
        Some(match result {
            Ok(payload) => p::reply(h.unique, &payload),
            Err(e) => p::reply_error(h.unique, e),
        })
    }

    fn dispatch(&mut self, h: &InHeader, a: &mut ArgReader) -> OpResult {
        let modifying = matches!(
            h.opcode,
            op::SETATTR
                | op::SYMLINK
                | op::MKNOD
                | op::MKDIR
                | op::UNLINK
                | op::RMDIR
                | op::RENAME
                | op::RENAME2
                | op::LINK
                | op::CREATE
                | op::WRITE
                | op::FALLOCATE
        );
        if modifying && self.read_only {
            return Err(libc::EROFS);
        }
        match h.opcode {
            op::INIT => self.init(a),
            op::DESTROY => {
                self.handles.clear();
                self.nodes.retain(|&id, _| id == ROOT_ID);
                self.by_id.retain(|_, &mut id| id == ROOT_ID);
                Ok(Vec::new())
            }
            op::LOOKUP => {
                let name = validate_name(a.cstr()?)?;
                let dir = self.resolve_dir(h.nodeid)?;
                self.lookup_at(h.nodeid, dir.as_raw_fd(), &name)
                    .map(|e| encode_entry(&e))
            }
            op::GETATTR => self.getattr(h.nodeid, a),
            op::SETATTR => self.setattr(h.nodeid, a),
            op::READLINK => self.readlink(h.nodeid),
            op::SYMLINK => {
                let name = validate_name(a.cstr()?)?;
                let target = CString::new(a.cstr()?).map_err(|_| libc::EINVAL)?;
                let dir = self.resolve_dir(h.nodeid)?;
                // SAFETY: both strings are NUL-terminated and live across the call.
                sys(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
                self.finish_create(h, dir.as_raw_fd(), &name, None)
            }
            op::MKNOD => {
                let mode = without_setid(a.u32()?);
                let _rdev = a.u32()?;
                let _umask = a.u32()?;
                let _ = a.u32()?;
                let name = validate_name(a.cstr()?)?;
                // Device nodes on the host would hand the guest host devices.
                let t = mode & libc::S_IFMT;
                if t != libc::S_IFREG && t != libc::S_IFIFO && t != libc::S_IFSOCK {
                    return Err(libc::EPERM);
                }
                let dir = self.resolve_dir(h.nodeid)?;
                // SAFETY: NUL-terminated name; no device number is passed.
                sys(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })?;
                self.finish_create(h, dir.as_raw_fd(), &name, Some(mode & 0o7777))
            }
            op::MKDIR => {
                let mode = without_setid(a.u32()?);
                let _umask = a.u32()?;
                let name = validate_name(a.cstr()?)?;
                let dir = self.resolve_dir(h.nodeid)?;
                // SAFETY: NUL-terminated name.
                sys(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777) })?;
                self.finish_create(h, dir.as_raw_fd(), &name, Some(mode & 0o7777))
            }
            op::UNLINK | op::RMDIR => {
                let name = validate_name(a.cstr()?)?;
                let dir = self.resolve_dir(h.nodeid)?;
                let flags = if h.opcode == op::RMDIR {
                    libc::AT_REMOVEDIR
                } else {
                    0
                };
                // SAFETY: NUL-terminated name.
                sys(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
                Ok(Vec::new())
            }
            op::RENAME => {
                let newdir = a.u64()?;
                self.rename(h.nodeid, newdir, 0, a)
            }
            op::RENAME2 => {
                let newdir = a.u64()?;
                let flags = a.u32()?;
                let _ = a.u32()?;
                self.rename(h.nodeid, newdir, flags, a)
            }
            op::LINK => {
                let old = a.u64()?;
                let name = validate_name(a.cstr()?)?;
                let (src, st) = self.resolve(old)?;
                if kind(&st) == libc::S_IFDIR {
                    return Err(libc::EPERM);
                }
                let dir = self.resolve_dir(h.nodeid)?;
                let from = resolve::proc_path(src.as_raw_fd());
                // SAFETY: NUL-terminated paths; the source is the magic link of
                // a descriptor resolved beneath the root.
                sys(unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        from.as_ptr(),
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                })?;
                self.lookup_at(h.nodeid, dir.as_raw_fd(), &name)
                    .map(|e| encode_entry(&e))
            }
            op::OPEN | op::OPENDIR => {
                let flags = a.u32()?;
                self.open(h.nodeid, flags, h.opcode == op::OPENDIR)
            }
            op::READ => self.read(a),
            op::WRITE => self.write(a),
            op::STATFS => {
                let (fd, _) = self.resolve(h.nodeid)?;
                // SAFETY: `statvfs` is plain old data.
                let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
                // SAFETY: fstatvfs writes into `st`, which outlives the call.
                sys(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) })?;
                Ok(p::encode_statfs(&st))
            }
            op::RELEASE | op::RELEASEDIR => {
                let fh = a.u64()?;
                self.handles.remove(&fh);
                Ok(Vec::new())
            }
            op::FLUSH => {
                let fh = a.u64()?;
                self.handle_fd(fh)?;
                Ok(Vec::new())
            }
            op::FSYNC | op::FSYNCDIR => {
                let fh = a.u64()?;
                let flags = a.u32()?;
                let fd = self.handle_fd(fh)?;
                // SAFETY: plain fsync/fdatasync on an open descriptor.
                sys(unsafe {
                    if flags & p::FSYNC_FDATASYNC != 0 {
                        libc::fdatasync(fd)
                    } else {
                        libc::fsync(fd)
                    }
                })?;
                Ok(Vec::new())
            }
            op::ACCESS => {
                let mask = a.u32()? as i32;
                self.access(h, mask)
            }
            op::CREATE => self.create(h, a),
            op::FALLOCATE => {
                let fh = a.u64()?;
                let offset = a.u64()?;
                let length = a.u64()?;
                let mode = a.u32()?;
                let fd = self.handle_fd(fh)?;
                self.clear_setid_before_change(fd)?;
                // SAFETY: plain fallocate on an open descriptor.
                sys(unsafe {
                    libc::fallocate(
                        fd,
                        mode as i32,
                        offset as libc::off_t,
                        length as libc::off_t,
                    )
                })?;
                Ok(Vec::new())
            }
            op::READDIR | op::READDIRPLUS => self.readdir(a, h.opcode == op::READDIRPLUS),
            _ => Err(libc::ENOSYS),
        }
    }

    fn init(&mut self, a: &mut ArgReader) -> OpResult {
        let init = InitIn::decode(a)?;
        if init.major < p::KERNEL_VERSION {
            return Err(libc::EPROTO);
        }
        if init.major > p::KERNEL_VERSION {
            // The guest retries with our major version.
            return Ok(InitOut {
                major: p::KERNEL_VERSION,
                minor: p::KERNEL_MINOR_VERSION,
                ..InitOut::default()
            }
            .encode());
        }
        if init.minor < p::MIN_MINOR_VERSION {
            return Err(libc::EPROTO);
        }
        self.minor = init.minor.min(p::KERNEL_MINOR_VERSION);
        self.initialized = true;
        Ok(InitOut {
            major: p::KERNEL_VERSION,
            minor: self.minor,
            max_readahead: init.max_readahead,
            flags: init.flags & SUPPORTED_INIT_FLAGS,
            max_background: 64,
            congestion_threshold: 48,
            max_write: MAX_IO,
            time_gran: 1,
            max_pages: MAX_PAGES,
        }
        .encode())
    }

    fn forget(&mut self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        node.nlookup = node.nlookup.saturating_sub(n);
        if node.nlookup == 0 {
            if let Some(k) = node.id {
                if self.by_id.get(&k) == Some(&id) {
                    self.by_id.remove(&k);
                }
            }
            self.nodes.remove(&id);
        }
    }

    /// The node's path relative to the root (`.` for the root).
    fn path_of(&self, id: u64) -> Result<CString, i32> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = id;
        while cur != ROOT_ID {
            let n = self.nodes.get(&cur).ok_or(libc::ESTALE)?;
            parts.push(&n.name);
            if parts.len() > MAX_DEPTH {
                return Err(libc::ELOOP);
            }
            cur = n.parent;
        }
        if parts.is_empty() {
            return Ok(CString::new(".").expect("no NUL"));
        }
        let mut path = Vec::new();
        for (i, part) in parts.iter().rev().enumerate() {
            if i > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(part);
        }
        if path.len() >= libc::PATH_MAX as usize {
            return Err(libc::ENAMETOOLONG);
        }
        CString::new(path).map_err(|_| libc::EINVAL)
    }

    /// An `O_PATH` descriptor of the node, checked to still be the same
    /// host inode.
    fn resolve(&mut self, id: u64) -> Result<(OwnedFd, libc::stat), i32> {
        let path = self.path_of(id)?;
        let fd = open_beneath(raw(&self.root), &path, libc::O_PATH, 0).map_err(stale)?;
        let st = resolve::fstat(fd.as_raw_fd())?;
        let node = self.nodes.get_mut(&id).ok_or(libc::ESTALE)?;
        match node.id {
            Some(k) if k == key(&st) && node.kind == kind(&st) => {}
            Some(_) => return Err(libc::ESTALE),
            None if node.kind != kind(&st) => return Err(libc::ESTALE),
            None => {
                // First resolution after a restore: adopt the inode found.
                node.id = Some(key(&st));
                self.by_id.entry(key(&st)).or_insert(id);
            }
        }
        Ok((fd, st))
    }

    fn resolve_dir(&mut self, id: u64) -> Result<OwnedFd, i32> {
        let (fd, st) = self.resolve(id)?;
        if kind(&st) != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        Ok(fd)
    }

    /// Registers one more guest reference to the inode `st` found as `name`
    /// in `parent`; returns its node id.
    fn intern(&mut self, parent: u64, name: &[u8], st: &libc::stat) -> u64 {
        let k = key(st);
        if let Some(&id) = self.by_id.get(&k) {
            if id == ROOT_ID {
                return ROOT_ID;
            }
            if let Some(n) = self.nodes.get_mut(&id) {
                if n.kind == kind(st) {
                    // The latest name wins (renames on the host, hard links).
                    n.parent = parent;
                    n.name = name.to_vec();
                    n.nlookup += 1;
                    return id;
                }
            }
        }
        let id = self.next_node;
        self.next_node += 1;
        self.nodes.insert(
            id,
            Node {
                parent,
                name: name.to_vec(),
                id: Some(k),
                kind: kind(st),
                nlookup: 1,
            },
        );
        self.by_id.insert(k, id);
        id
    }

    fn entry(id: u64, st: &libc::stat) -> EntryOut {
        EntryOut {
            nodeid: id,
            generation: 0,
            entry_valid: CACHE_TTL,
            attr_valid: CACHE_TTL,
            attr: Attr::from_stat(st),
        }
    }

    fn lookup_at(&mut self, parent: u64, dirfd: RawFd, name: &CString) -> Result<EntryOut, i32> {
        let fd = open_beneath(dirfd, name, libc::O_PATH, 0)?;
        let st = resolve::fstat(fd.as_raw_fd())?;
        let id = self.intern(parent, name.as_bytes(), &st);
        Ok(Self::entry(id, &st))
    }

    /// After a node was created as `name` in `dirfd`: gives it the caller's
    /// owner (when running as root) and the exact mode asked for (the host
    /// umask must not strip bits the guest kept), then looks it up.
    fn finish_create(
        &mut self,
        h: &InHeader,
        dirfd: RawFd,
        name: &CString,
        mode: Option<u32>,
    ) -> OpResult {
        if self.as_root {
            // SAFETY: NUL-terminated name; never follows a symlink.
            let _ = sys(unsafe {
                libc::fchownat(
                    dirfd,
                    name.as_ptr(),
                    h.uid,
                    h.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            });
        }
        if let Some(mode) = mode.filter(|m| m & self.host_umask != 0) {
            let fd = open_beneath(dirfd, name, libc::O_PATH, 0)?;
            let path = resolve::proc_path(fd.as_raw_fd());
            // SAFETY: the magic link of a descriptor resolved beneath the root.
            let _ = sys(unsafe { libc::chmod(path.as_ptr(), mode) });
        }
        self.lookup_at(h.nodeid, dirfd, name)
            .map(|e| encode_entry(&e))
    }

    /// Refuses a new handle once the mount holds [`MAX_HANDLES`].
    fn room_for_handle(&self) -> Result<(), i32> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(libc::EMFILE);
        }
        Ok(())
    }

    /// Before the guest changes a file's contents through `fd`: clears the
    /// set-ID bits the kernel would clear for an unprivileged writer, so a
    /// guest cannot rewrite a set-user-ID host program and keep its bit.
    /// Only needed as root; the kernel does it for anyone else.
    fn clear_setid_before_change(&self, fd: RawFd) -> Result<(), i32> {
        if !self.as_root {
            return Ok(());
        }
        let st = resolve::fstat(fd)?;
        let clear = setid_cleared_by_write(st.st_mode);
        if clear != 0 && kind(&st) == libc::S_IFREG {
            // SAFETY: plain fchmod on an open descriptor.
            sys(unsafe { libc::fchmod(fd, st.st_mode & 0o7777 & !clear) })?;
        }
        Ok(())
    }

    fn handle_fd(&self, fh: u64) -> Result<RawFd, i32> {
        let h = self.handles.get(&fh).ok_or(libc::EBADF)?;
        h.fd.as_ref().map(|f| f.as_raw_fd()).ok_or(libc::ESTALE)
    }

    fn getattr(&mut self, id: u64, a: &mut ArgReader) -> OpResult {
        let flags = a.u32().unwrap_or(0);
        let _ = a.u32();
        let fh = a.u64().unwrap_or(0);
        let st = match (flags & p::GETATTR_FH != 0)
            .then(|| self.handle_fd(fh).ok())
            .flatten()
        {
            Some(fd) => resolve::fstat(fd)?,
            None => self.resolve(id)?.1,
        };
        Ok(encode_attr_out(CACHE_TTL, &Attr::from_stat(&st)))
    }

    fn setattr(&mut self, id: u64, a: &mut ArgReader) -> OpResult {
        let s = SetattrIn::decode(a)?;
        let (fd, st) = self.resolve(id)?;
        let t = kind(&st);
        let path = resolve::proc_path(fd.as_raw_fd());
        let open_fd = if s.valid & fattr::FH != 0 {
            self.handle_fd(s.fh).ok()
        } else {
            None
        };
        if s.valid & fattr::MODE != 0 && t != libc::S_IFLNK {
            // SAFETY: the magic link of a descriptor resolved beneath the root.
            sys(unsafe { libc::chmod(path.as_ptr(), without_setid(s.mode & 0o7777)) })?;
        }
        if s.valid & (fattr::UID | fattr::GID) != 0 {
            let uid = if s.valid & fattr::UID != 0 {
                s.uid
            } else {
                u32::MAX
            };
            let gid = if s.valid & fattr::GID != 0 {
                s.gid
            } else {
                u32::MAX
            };
            // SAFETY: empty path on an O_PATH descriptor: acts on that inode.
            sys(unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if s.valid & fattr::SIZE != 0 {
            let size = s.size as libc::off_t;
            match open_fd {
                Some(f) => {
                    self.clear_setid_before_change(f)?;
                    // SAFETY: plain ftruncate on an open descriptor.
                    sys(unsafe { libc::ftruncate(f, size) })?;
                }
                None => {
                    if t != libc::S_IFREG {
                        return Err(if t == libc::S_IFDIR {
                            libc::EISDIR
                        } else {
                            libc::EINVAL
                        });
                    }
                    let w = reopen(fd.as_raw_fd(), libc::O_WRONLY)?;
                    self.clear_setid_before_change(w.as_raw_fd())?;
                    // SAFETY: plain ftruncate on an open descriptor.
                    sys(unsafe { libc::ftruncate(w.as_raw_fd(), size) })?;
                }
            }
        }
        if s.valid & (fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW) != 0 {
            let ts = |set: bool, now: bool, sec: u64, nsec: u32| libc::timespec {
                tv_sec: sec as libc::time_t,
                tv_nsec: if now {
                    libc::UTIME_NOW
                } else if set {
                    i64::from(nsec)
                } else {
                    libc::UTIME_OMIT
                },
            };
            let times = [
                ts(
                    s.valid & fattr::ATIME != 0,
                    s.valid & fattr::ATIME_NOW != 0,
                    s.atime,
                    s.atimensec,
                ),
                ts(
                    s.valid & fattr::MTIME != 0,
                    s.valid & fattr::MTIME_NOW != 0,
                    s.mtime,
                    s.mtimensec,
                ),
            ];
            if t == libc::S_IFLNK {
                let node = self.nodes.get(&id).ok_or(libc::ESTALE)?.clone();
                let dir = self.resolve_dir(node.parent)?;
                let name = validate_name(&node.name)?;
                // SAFETY: NUL-terminated name, two timespecs, never follows.
                sys(unsafe {
                    libc::utimensat(
                        dir.as_raw_fd(),
                        name.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            } else {
                // SAFETY: the magic link of a descriptor resolved beneath the root.
                sys(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) })?;
            }
        }
        let st = resolve::fstat(fd.as_raw_fd())?;
        Ok(encode_attr_out(CACHE_TTL, &Attr::from_stat(&st)))
    }

    fn readlink(&mut self, id: u64) -> OpResult {
        let (fd, st) = self.resolve(id)?;
        if kind(&st) != libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: empty path on an O_PATH descriptor of a symlink reads that
        // link; the buffer is as long as passed.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(resolve::errno());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn rename(&mut self, olddir: u64, newdir: u64, flags: u32, a: &mut ArgReader) -> OpResult {
        let old = validate_name(a.cstr()?)?;
        let new = validate_name(a.cstr()?)?;
        let allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !allowed != 0 {
            return Err(libc::EINVAL);
        }
        let from = self.resolve_dir(olddir)?;
        let to = self.resolve_dir(newdir)?;
        // SAFETY: NUL-terminated names relative to directories resolved
        // beneath the root; renameat2 never follows symlinks.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                from.as_raw_fd(),
                old.as_ptr(),
                to.as_raw_fd(),
                new.as_ptr(),
                flags,
            )
        };
        if ret < 0 {
            return Err(resolve::errno());
        }
        // Keep the moved nodes' names current.
        let mut moved = vec![(to.as_raw_fd(), newdir, &new)];
        if flags & libc::RENAME_EXCHANGE != 0 {
            moved.push((from.as_raw_fd(), olddir, &old));
        }
        for (dirfd, parent, name) in moved {
            if let Ok(st) = resolve::stat_at_nofollow(dirfd, name) {
                if let Some(&id) = self.by_id.get(&key(&st)) {
                    if let Some(n) = self.nodes.get_mut(&id).filter(|_| id != ROOT_ID) {
                        n.parent = parent;
                        n.name = name.as_bytes().to_vec();
                    }
                }
            }
        }
        Ok(Vec::new())
    }

    fn new_handle(&mut self, node: u64, flags: u32, dir: bool, fd: OwnedFd) -> u64 {
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(
            fh,
            Handle {
                node,
                flags,
                dir,
                fd: Some(fd),
            },
        );
        fh
    }

    fn open(&mut self, id: u64, flags: u32, dir: bool) -> OpResult {
        let flags = flags as i32;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes && self.read_only {
            return Err(libc::EROFS);
        }
        self.room_for_handle()?;
        let (fd, st) = self.resolve(id)?;
        let t = kind(&st);
        openable(t)?;
        let flags = if dir {
            if t != libc::S_IFDIR {
                return Err(libc::ENOTDIR);
            }
            libc::O_RDONLY | libc::O_DIRECTORY
        } else {
            if t == libc::S_IFDIR && writes {
                return Err(libc::EISDIR);
            }
            flags & !(libc::O_NOCTTY | libc::O_DIRECT | libc::O_CREAT | libc::O_EXCL)
        };
        let file = reopen(fd.as_raw_fd(), flags)?;
        if flags & libc::O_TRUNC != 0 {
            self.clear_setid_before_change(file.as_raw_fd())?;
        }
        let fh = self.new_handle(id, flags as u32, dir, file);
        Ok(encode_open_out(fh, 0))
    }

    fn create(&mut self, h: &InHeader, a: &mut ArgReader) -> OpResult {
        let flags = a.u32()? as i32;
        let mode = without_setid(a.u32()? & 0o7777);
        let _umask = a.u32()?;
        let _open_flags = a.u32()?;
        let name = validate_name(a.cstr()?)?;
        // Checked first, so a refused CREATE leaves no file behind.
        self.room_for_handle()?;
        let dir = self.resolve_dir(h.nodeid)?;
        let base = flags & !(libc::O_NOCTTY | libc::O_DIRECT | libc::O_CREAT | libc::O_EXCL);
        // Create exclusively first, so ownership and mode are only ever set on
        // a file this request made.
        let (file, created) = match open_beneath(
            dir.as_raw_fd(),
            &name,
            base | libc::O_CREAT | libc::O_EXCL,
            mode,
        ) {
            Ok(f) => (f, true),
            Err(libc::EEXIST) if flags & libc::O_EXCL == 0 => {
                // The existing name may be anything: see what it is before
                // opening it for real (through that very inode).
                let path = open_beneath(dir.as_raw_fd(), &name, libc::O_PATH, 0)?;
                let t = kind(&resolve::fstat(path.as_raw_fd())?);
                openable(t)?;
                if t == libc::S_IFDIR {
                    return Err(libc::EISDIR);
                }
                let file = reopen(path.as_raw_fd(), base)?;
                if base & libc::O_TRUNC != 0 {
                    self.clear_setid_before_change(file.as_raw_fd())?;
                }
                (file, false)
            }
            Err(e) => return Err(e),
        };
        if created {
            if self.as_root {
                // SAFETY: plain fchown on the descriptor just created.
                let _ = sys(unsafe { libc::fchown(file.as_raw_fd(), h.uid, h.gid) });
            }
            if mode & self.host_umask != 0 {
                // SAFETY: plain fchmod on the descriptor just created.
                let _ = sys(unsafe { libc::fchmod(file.as_raw_fd(), mode) });
            }
        }
        let st = resolve::fstat(file.as_raw_fd())?;
        let id = self.intern(h.nodeid, name.as_bytes(), &st);
        let fh = self.new_handle(id, base as u32, false, file);
        let mut out = encode_entry(&Self::entry(id, &st));
        out.extend_from_slice(&encode_open_out(fh, 0));
        Ok(out)
    }

    fn read(&mut self, a: &mut ArgReader) -> OpResult {
        let fh = a.u64()?;
        let offset = a.u64()?;
        let size = a.u32()?.min(MAX_IO) as usize;
        let fd = self.handle_fd(fh)?;
        let mut buf = vec![0u8; size];
        let mut done = 0;
        while done < size {
            // SAFETY: writes at most `size - done` bytes into `buf[done..]`.
            let n = unsafe {
                libc::pread(
                    fd,
                    buf[done..].as_mut_ptr().cast(),
                    size - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = resolve::errno();
                if e == libc::EINTR {
                    continue;
                }
                if done == 0 {
                    return Err(e);
                }
                break;
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn write(&mut self, a: &mut ArgReader) -> OpResult {
        let fh = a.u64()?;
        let offset = a.u64()?;
        let size = a.u32()? as usize;
        let _write_flags = a.u32()?;
        let _lock_owner = a.u64()?;
        let _flags = a.u32()?;
        let _ = a.u32()?;
        if size > MAX_IO as usize {
            return Err(libc::EINVAL);
        }
        let data = a.bytes(size)?;
        let fd = self.handle_fd(fh)?;
        self.clear_setid_before_change(fd)?;
        let mut done = 0;
        while done < size {
            // SAFETY: reads `size - done` bytes from `data[done..]`.
            let n = unsafe {
                libc::pwrite(
                    fd,
                    data[done..].as_ptr().cast(),
                    size - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = resolve::errno();
                if e == libc::EINTR {
                    continue;
                }
                if done == 0 {
                    return Err(e);
                }
                break;
            }
            done += n as usize;
        }
        let mut out = Vec::with_capacity(8);
        out.put32(done as u32);
        out.put32(0);
        Ok(out)
    }

    fn access(&mut self, h: &InHeader, mask: i32) -> OpResult {
        let (_, st) = self.resolve(h.nodeid)?;
        if mask & libc::W_OK != 0 && self.read_only {
            return Err(libc::EROFS);
        }
        if mask == libc::F_OK {
            return Ok(Vec::new());
        }
        let mode = st.st_mode;
        let ok = if h.uid == 0 {
            // root: everything but executing a file nobody may execute.
            mask & libc::X_OK == 0 || kind(&st) == libc::S_IFDIR || mode & 0o111 != 0
        } else {
            let bits = if h.uid == st.st_uid {
                (mode >> 6) & 7
            } else if h.gid == st.st_gid {
                (mode >> 3) & 7
            } else {
                mode & 7
            };
            (mask as u32) & !bits & 7 == 0
        };
        if ok {
            Ok(Vec::new())
        } else {
            Err(libc::EACCES)
        }
    }

    fn readdir(&mut self, a: &mut ArgReader, plus: bool) -> OpResult {
        let fh = a.u64()?;
        let offset = a.u64()?;
        let size = a.u32()?.min(MAX_IO) as usize;
        let handle = self.handles.get(&fh).ok_or(libc::EBADF)?;
        if !handle.dir {
            return Err(libc::ENOTDIR);
        }
        let parent = handle.node;
        let fd = self.handle_fd(fh)?;
        // SAFETY: plain lseek on an open directory descriptor.
        if unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(resolve::errno());
        }
        let mut out = Vec::with_capacity(size.min(64 << 10));
        let mut buf = vec![0u8; 32 << 10];
        'outer: loop {
            // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    fd,
                    buf.as_mut_ptr(),
                    buf.len() as libc::c_uint,
                )
            };
            if n < 0 {
                if out.is_empty() {
                    return Err(resolve::errno());
                }
                break;
            }
            if n == 0 {
                break;
            }
            let mut pos = 0usize;
            while pos < n as usize {
                // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name.
                let rec = &buf[pos..n as usize];
                if rec.len() < 19 {
                    break 'outer;
                }
                let ino = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
                let off = u64::from_ne_bytes(rec[8..16].try_into().expect("8 bytes"));
                let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
                let typ = u32::from(rec[18]);
                if reclen < 19 || reclen > rec.len() {
                    break 'outer;
                }
                let name_field = &rec[19..reclen];
                let name_len = name_field
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_field.len());
                let name = &name_field[..name_len];
                pos += reclen;
                let need = p::dirent_size(name.len()) + if plus { p::ENTRY_OUT_LEN } else { 0 };
                if out.len() + need > size {
                    break 'outer;
                }
                if plus {
                    let entry = if name == b"." || name == b".." {
                        None
                    } else {
                        validate_name(name)
                            .ok()
                            .and_then(|c| self.lookup_at(parent, fd, &c).ok())
                    };
                    match entry {
                        Some(e) => e.encode(&mut out),
                        None => out.resize(out.len() + p::ENTRY_OUT_LEN, 0),
                    }
                }
                p::encode_dirent(&mut out, ino, off, typ, name);
            }
        }
        Ok(out)
    }
}

fn encode_entry(e: &EntryOut) -> Vec<u8> {
    let mut out = Vec::with_capacity(p::ENTRY_OUT_LEN);
    e.encode(&mut out);
    out
}
