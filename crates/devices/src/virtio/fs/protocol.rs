//! The FUSE wire format (the subset ferry's virtio-fs server speaks): request
//! and reply structures, little-endian, as `include/uapi/linux/fuse.h`
//! defines them for protocol 7.31.
//!
//! Requests are parsed with [`ArgReader`], which fails with `EINVAL` on short
//! input instead of panicking; replies are built into plain byte vectors.

/// Protocol major version.
pub const KERNEL_VERSION: u32 = 7;
/// Highest minor version this server implements.
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// Oldest minor version accepted from the guest.
pub const MIN_MINOR_VERSION: u32 = 27;

/// Node id of the root of the shared directory.
pub const ROOT_ID: u64 = 1;

/// Size of [`InHeader`] on the wire.
pub const IN_HEADER_LEN: usize = 40;
/// Size of [`OutHeader`] on the wire.
pub const OUT_HEADER_LEN: usize = 16;
/// Size of `fuse_attr`.
pub const ATTR_LEN: usize = 88;
/// Size of `fuse_entry_out`.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// Size of a `fuse_dirent` header (before the name).
pub const DIRENT_LEN: usize = 24;

/// Opcodes.
#[allow(missing_docs)]
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const SYNCFS: u32 = 50;
}

/// `FUSE_INIT` flags.
#[allow(missing_docs)]
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `fuse_setattr_in.valid` bits.
#[allow(missing_docs)]
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1;
/// `fuse_fsync_in.fsync_flags`: data only.
pub const FSYNC_FDATASYNC: u32 = 1;

/// Parses request arguments; every shortfall is `EINVAL`.
#[derive(Debug)]
pub struct ArgReader<'a> {
    buf: &'a [u8],
}

impl<'a> ArgReader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], i32> {
        if self.buf.len() < n {
            return Err(libc::EINVAL);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> Result<u16, i32> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, i32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, i32> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A NUL-terminated string (without the NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], i32> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// `fuse_in_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InHeader {
    /// Total request length, header included.
    pub len: u32,
    /// Operation.
    pub opcode: u32,
    /// Request id, echoed in the reply.
    pub unique: u64,
    /// Node the operation applies to.
    pub nodeid: u64,
    /// Caller's uid.
    pub uid: u32,
    /// Caller's gid.
    pub gid: u32,
    /// Caller's pid.
    pub pid: u32,
}

impl InHeader {
    /// Parses the header from the start of a request.
    pub fn decode(r: &mut ArgReader) -> Result<Self, i32> {
        let h = InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
        };
        // total_extlen and padding.
        r.u32()?;
        Ok(h)
    }

    /// Serializes (for tests and tools playing the driver).
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.len, self.opcode] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.unique.to_le_bytes());
        out.extend_from_slice(&self.nodeid.to_le_bytes());
        for v in [self.uid, self.gid, self.pid, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// `fuse_out_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutHeader {
    /// Total reply length, header included.
    pub len: u32,
    /// 0 or a negated errno.
    pub error: i32,
    /// Request id being answered.
    pub unique: u64,
}

impl OutHeader {
    /// Parses a reply header.
    pub fn decode(r: &mut ArgReader) -> Result<Self, i32> {
        Ok(OutHeader {
            len: r.u32()?,
            error: r.u32()? as i32,
            unique: r.u64()?,
        })
    }
}

/// Builds a complete reply: header plus `payload`.
pub fn reply(unique: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER_LEN + payload.len());
    out.extend_from_slice(&((OUT_HEADER_LEN + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Builds an error reply (`errno` positive).
pub fn reply_error(unique: u64, errno: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER_LEN);
    out.extend_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(-errno).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out
}

/// Little-endian append helpers.
pub trait Put {
    /// Appends a u16.
    fn put16(&mut self, v: u16);
    /// Appends a u32.
    fn put32(&mut self, v: u32);
    /// Appends a u64.
    fn put64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

/// `fuse_attr`, filled from a host `stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    /// Access time, seconds.
    pub atime: u64,
    /// Modification time, seconds.
    pub mtime: u64,
    /// Change time, seconds.
    pub ctime: u64,
    /// Access time, nanoseconds.
    pub atimensec: u32,
    /// Modification time, nanoseconds.
    pub mtimensec: u32,
    /// Change time, nanoseconds.
    pub ctimensec: u32,
    /// Type and permission bits.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device files.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

impl Attr {
    /// From a host `stat`.
    pub fn from_stat(st: &libc::stat) -> Self {
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime as u64,
            mtime: st.st_mtime as u64,
            ctime: st.st_ctime as u64,
            atimensec: st.st_atime_nsec as u32,
            mtimensec: st.st_mtime_nsec as u32,
            ctimensec: st.st_ctime_nsec as u32,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }

    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.ino,
            self.size,
            self.blocks,
            self.atime,
            self.mtime,
            self.ctime,
        ] {
            out.put64(v);
        }
        for v in [
            self.atimensec,
            self.mtimensec,
            self.ctimensec,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.blksize,
            0, // flags
        ] {
            out.put32(v);
        }
    }

    /// Parses the wire form.
    pub fn decode(r: &mut ArgReader) -> Result<Self, i32> {
        let a = Attr {
            ino: r.u64()?,
            size: r.u64()?,
            blocks: r.u64()?,
            atime: r.u64()?,
            mtime: r.u64()?,
            ctime: r.u64()?,
            atimensec: r.u32()?,
            mtimensec: r.u32()?,
            ctimensec: r.u32()?,
            mode: r.u32()?,
            nlink: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            rdev: r.u32()?,
            blksize: r.u32()?,
        };
        r.u32()?;
        Ok(a)
    }
}

/// Cache lifetime of entries and attributes handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Seconds.
    pub secs: u64,
    /// Nanoseconds.
    pub nsecs: u32,
}

/// `fuse_entry_out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryOut {
    /// Node id (0: negative entry).
    pub nodeid: u64,
    /// Inode generation.
    pub generation: u64,
    /// How long the name stays valid.
    pub entry_valid: Validity,
    /// How long the attributes stay valid.
    pub attr_valid: Validity,
    /// Attributes.
    pub attr: Attr,
}

impl EntryOut {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.put64(self.nodeid);
        out.put64(self.generation);
        out.put64(self.entry_valid.secs);
        out.put64(self.attr_valid.secs);
        out.put32(self.entry_valid.nsecs);
        out.put32(self.attr_valid.nsecs);
        self.attr.encode(out);
    }

    /// Parses the wire form.
    pub fn decode(r: &mut ArgReader) -> Result<Self, i32> {
        let nodeid = r.u64()?;
        let generation = r.u64()?;
        let es = r.u64()?;
        let a_s = r.u64()?;
        let en = r.u32()?;
        let an = r.u32()?;
        Ok(EntryOut {
            nodeid,
            generation,
            entry_valid: Validity {
                secs: es,
                nsecs: en,
            },
            attr_valid: Validity {
                secs: a_s,
                nsecs: an,
            },
            attr: Attr::decode(r)?,
        })
    }
}

/// `fuse_attr_out`.
pub fn encode_attr_out(valid: Validity, attr: &Attr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + ATTR_LEN);
    out.put64(valid.secs);
    out.put32(valid.nsecs);
    out.put32(0);
    attr.encode(&mut out);
    out
}

/// `fuse_open_out`.
pub fn encode_open_out(fh: u64, open_flags: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.put64(fh);
    out.put32(open_flags);
    out.put32(0);
    out
}

/// `fuse_init_in` (the fields ferry uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitIn {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Largest readahead.
    pub max_readahead: u32,
    /// Capability flags.
    pub flags: u32,
}

impl InitIn {
    /// Parses the request body.
    pub fn decode(r: &mut ArgReader) -> Result<Self, i32> {
        Ok(InitIn {
            major: r.u32()?,
            minor: r.u32()?,
            max_readahead: r.u32()?,
            flags: r.u32()?,
        })
    }
}

/// `fuse_init_out`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitOut {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Largest readahead.
    pub max_readahead: u32,
    /// Capability flags.
    pub flags: u32,
    /// Background requests.
    pub max_background: u16,
    /// Congestion threshold.
    pub congestion_threshold: u16,
    /// Largest write.
    pub max_write: u32,
    /// Timestamp granularity in nanoseconds.
    pub time_gran: u32,
    /// Largest request in pages (with `MAX_PAGES`).
    pub max_pages: u16,
}

impl InitOut {
    /// The 64-byte wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.put32(self.major);
        out.put32(self.minor);
        out.put32(self.max_readahead);
        out.put32(self.flags);
        out.put16(self.max_background);
        out.put16(self.congestion_threshold);
        out.put32(self.max_write);
        out.put32(self.time_gran);
        out.put16(self.max_pages);
        out.put16(0); // map_alignment
        out.put32(0); // flags2
        out.resize(64, 0);
        out
    }
}

/// `fuse_setattr_in`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetattrIn {
    /// Which fields are set (`fattr::*`).
    pub valid: u32,
    /// Open handle, with `fattr::FH`.
    pub fh: u64,
    /// New size.
    pub size: u64,
    /// New access time.
    pub atime: u64,
    /// New modification time.
    pub mtime: u64,
    /// Access time nanoseconds.
    pub atimensec: u32,
    /// Modification time nanoseconds.
    pub mtimensec: u32,
    /// New mode.
    pub mode: u32,
    /// New owner.
    pub uid: u32,
    /// New group.
    pub gid: u32,
}

impl SetattrIn {
    /// Parses the request body.
    pub fn decode(r: &mut ArgReader) -> Result<Self, i32> {
        let valid = r.u32()?;
        r.u32()?;
        let fh = r.u64()?;
        let size = r.u64()?;
        r.u64()?; // lock_owner
        let atime = r.u64()?;
        let mtime = r.u64()?;
        r.u64()?; // ctime
        let atimensec = r.u32()?;
        let mtimensec = r.u32()?;
        r.u32()?; // ctimensec
        let mode = r.u32()?;
        r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        Ok(SetattrIn {
            valid,
            fh,
            size,
            atime,
            mtime,
            atimensec,
            mtimensec,
            mode,
            uid,
            gid,
        })
    }

    /// The wire form (88 bytes), for tests playing the driver.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(88);
        out.put32(self.valid);
        out.put32(0);
        out.put64(self.fh);
        out.put64(self.size);
        out.put64(0);
        out.put64(self.atime);
        out.put64(self.mtime);
        out.put64(0);
        out.put32(self.atimensec);
        out.put32(self.mtimensec);
        out.put32(0);
        out.put32(self.mode);
        out.put32(0);
        out.put32(self.uid);
        out.put32(self.gid);
        out.put32(0);
        out
    }
}

/// `fuse_kstatfs` as `fuse_statfs_out`, from a host `statvfs`.
pub fn encode_statfs(st: &libc::statvfs) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    out.put64(st.f_blocks);
    out.put64(st.f_bfree);
    out.put64(st.f_bavail);
    out.put64(st.f_files);
    out.put64(st.f_ffree);
    out.put32(st.f_bsize as u32);
    out.put32(st.f_namemax as u32);
    out.put32(st.f_frsize as u32);
    out.resize(80, 0);
    out
}

/// Wire size of a `fuse_dirent` with a `namelen`-byte name, padded to 8.
pub fn dirent_size(namelen: usize) -> usize {
    (DIRENT_LEN + namelen + 7) & !7
}

/// Appends a `fuse_dirent`.
pub fn encode_dirent(out: &mut Vec<u8>, ino: u64, off: u64, typ: u32, name: &[u8]) {
    let start = out.len();
    out.put64(ino);
    out.put64(off);
    out.put32(name.len() as u32);
    out.put32(typ);
    out.extend_from_slice(name);
    out.resize(start + dirent_size(name.len()), 0);
}

/// One parsed `fuse_dirent`, for tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirent {
    /// Inode number.
    pub ino: u64,
    /// Offset of the next entry.
    pub off: u64,
    /// `DT_*` type.
    pub typ: u32,
    /// Name.
    pub name: Vec<u8>,
}

/// Parses a `fuse_dirent` (and its padding).
pub fn decode_dirent(r: &mut ArgReader) -> Result<Dirent, i32> {
    let ino = r.u64()?;
    let off = r.u64()?;
    let namelen = r.u32()? as usize;
    let typ = r.u32()?;
    let name = r.bytes(namelen)?.to_vec();
    let pad = dirent_size(namelen) - DIRENT_LEN - namelen;
    r.bytes(pad)?;
    Ok(Dirent {
        ino,
        off,
        typ,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_short_input() {
        let h = InHeader {
            len: 48,
            opcode: op::LOOKUP,
            unique: 0x1122_3344_5566_7788,
            nodeid: 9,
            uid: 1000,
            gid: 100,
            pid: 42,
        };
        let mut buf = Vec::new();
        h.encode(&mut buf);
        assert_eq!(buf.len(), IN_HEADER_LEN);
        assert_eq!(InHeader::decode(&mut ArgReader::new(&buf)).unwrap(), h);
        assert_eq!(
            InHeader::decode(&mut ArgReader::new(&buf[..39])),
            Err(libc::EINVAL)
        );
    }

    #[test]
    fn replies_carry_length_error_and_unique() {
        let r = reply(7, &[1, 2, 3]);
        let mut a = ArgReader::new(&r);
        let h = OutHeader::decode(&mut a).unwrap();
        assert_eq!(
            h,
            OutHeader {
                len: 19,
                error: 0,
                unique: 7
            }
        );
        assert_eq!(a.rest(), &[1, 2, 3]);
        let e = reply_error(8, libc::ENOENT);
        let h = OutHeader::decode(&mut ArgReader::new(&e)).unwrap();
        assert_eq!((h.len, h.error, h.unique), (16, -libc::ENOENT, 8));
    }

    #[test]
    fn entry_and_attr_sizes_match_the_kernel() {
        let attr = Attr {
            ino: 5,
            size: 10,
            mode: libc::S_IFREG | 0o644,
            nlink: 1,
            ..Attr::default()
        };
        let e = EntryOut {
            nodeid: 3,
            generation: 0,
            entry_valid: Validity { secs: 1, nsecs: 0 },
            attr_valid: Validity { secs: 2, nsecs: 5 },
            attr,
        };
        let mut buf = Vec::new();
        e.encode(&mut buf);
        assert_eq!(buf.len(), ENTRY_OUT_LEN);
        assert_eq!(EntryOut::decode(&mut ArgReader::new(&buf)).unwrap(), e);
        assert_eq!(
            encode_attr_out(Validity { secs: 1, nsecs: 0 }, &attr).len(),
            104
        );
        assert_eq!(encode_open_out(1, 0).len(), 16);
        assert_eq!(InitOut::default().encode().len(), 64);
        assert_eq!(SetattrIn::default().encode().len(), 88);
    }

    #[test]
    fn setattr_round_trip() {
        let s = SetattrIn {
            valid: fattr::MODE | fattr::SIZE,
            fh: 4,
            size: 100,
            atime: 1,
            mtime: 2,
            atimensec: 3,
            mtimensec: 4,
            mode: 0o600,
            uid: 5,
            gid: 6,
        };
        assert_eq!(
            SetattrIn::decode(&mut ArgReader::new(&s.encode())).unwrap(),
            s
        );
    }

    #[test]
    fn dirents_are_padded_to_8_bytes() {
        let mut buf = Vec::new();
        encode_dirent(&mut buf, 1, 2, libc::DT_REG as u32, b"abc");
        encode_dirent(&mut buf, 3, 4, libc::DT_DIR as u32, b"12345678");
        assert_eq!(buf.len(), 32 + 32);
        let mut r = ArgReader::new(&buf);
        let a = decode_dirent(&mut r).unwrap();
        let b = decode_dirent(&mut r).unwrap();
        assert_eq!((a.ino, a.off, a.name.as_slice()), (1, 2, &b"abc"[..]));
        assert_eq!((b.ino, b.typ, b.name.as_slice()), (3, 4, &b"12345678"[..]));
        assert!(r.rest().is_empty());
    }

    #[test]
    fn cstr_needs_a_terminator() {
        let mut r = ArgReader::new(b"old\0new\0");
        assert_eq!(r.cstr().unwrap(), b"old");
        assert_eq!(r.cstr().unwrap(), b"new");
        assert_eq!(ArgReader::new(b"noterm").cstr(), Err(libc::EINVAL));
    }
}
