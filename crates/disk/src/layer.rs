//! Copy-on-write layers.
//!
//! A layer file holds a 4 KiB header, an allocation bitmap (one bit per cluster),
//! and a sparse data area where cluster `i` lives at `data_offset + i * cluster`.
//! Clusters whose bit is clear read from the backing disk. A partial write to an
//! unallocated cluster first copies the cluster up from the backing disk.
//!
//! Durability: data is written first; the bitmap is written (and both synced) on
//! [`Layer::flush`] and when the layer is dropped. A crash before a flush can lose
//! writes the guest was never told were durable, never corrupt older data.
//!
//! Header (little-endian): magic `FERRYCOW`, u32 version, u32 cluster size, u64
//! virtual size, u64 bitmap offset, u64 bitmap length, u64 data offset, u32
//! backing path length, then at byte 64 the backing path (relative paths are
//! relative to the layer file's directory).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{Disk, DiskError};

/// Bytes per cluster: the unit of copy-up and of allocation.
pub const CLUSTER_SIZE: u64 = 64 * 1024;
/// Longest backing chain accepted.
pub const MAX_CHAIN: usize = 64;
const MAGIC: &[u8; 8] = b"FERRYCOW";
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 4096;
const PATH_OFFSET: usize = 64;
/// The data area starts on a 1 MiB boundary after the bitmap.
const DATA_ALIGN: u64 = 1 << 20;

/// What a layer says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Size the guest sees.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Clusters stored in this layer.
    pub allocated_clusters: u64,
    /// The disk below, as written in the header.
    pub backing: PathBuf,
}

/// An open copy-on-write layer.
#[derive(Debug)]
pub struct Layer {
    file: File,
    path: PathBuf,
    size: u64,
    cluster: u64,
    bitmap_offset: u64,
    data_offset: u64,
    backing_raw: PathBuf,
    backing: Box<Disk>,
    read_only: bool,
    state: Mutex<Bitmap>,
}

#[derive(Debug)]
struct Bitmap {
    bits: Vec<u8>,
    dirty: bool,
}

impl Bitmap {
    fn get(&self, i: u64) -> bool {
        self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }
    fn set(&mut self, i: u64) {
        self.bits[(i / 8) as usize] |= 1 << (i % 8);
        self.dirty = true;
    }
}

pub(crate) fn is_layer(file: &File) -> std::io::Result<bool> {
    let mut magic = [0u8; 8];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(&magic == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn u32_at(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(h: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"))
}

fn bitmap_len(size: u64, cluster: u64) -> u64 {
    size.div_ceil(cluster).div_ceil(8)
}

fn resolve_backing(layer: &Path, backing: &Path) -> PathBuf {
    if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        layer
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(backing)
    }
}

/// Creates a new, empty layer at `path` over `backing` (raw or layer), written
/// atomically and durably. `size` defaults to the backing disk's size.
pub fn create_layer(path: &Path, backing: &Path, size: Option<u64>) -> Result<(), DiskError> {
    create(path, backing, size, true)
}

/// [`create_layer`] without waiting for the device: for a layer that
/// matters only once its VM runs (a restore's), where a host crash before
/// then would lose the VM's memory anyway.
pub fn create_layer_unsynced(
    path: &Path,
    backing: &Path,
    size: Option<u64>,
) -> Result<(), DiskError> {
    create(path, backing, size, false)
}

/// Writes `backing` as the backing path of the header of the layer at `path`.
fn set_backing(header: &mut [u8], path: &Path, backing: &Path) -> Result<(), DiskError> {
    let raw = backing.as_os_str().as_encoded_bytes();
    if raw.len() > (HEADER_SIZE as usize - PATH_OFFSET) {
        return Err(DiskError::BadLayer {
            path: path.to_path_buf(),
            why: "backing path too long".into(),
        });
    }
    header[48..52].copy_from_slice(&(raw.len() as u32).to_le_bytes());
    header[PATH_OFFSET..].fill(0);
    header[PATH_OFFSET..PATH_OFFSET + raw.len()].copy_from_slice(raw);
    Ok(())
}

/// Points the layer at `path` at `backing` instead of the disk below it
/// now, durably: for a disk that moved (its new name a hard link to the
/// same file, or a copy). The new one must open and have the old one's size;
/// that its content is the same is the caller's promise. A VMM that has the
/// layer open keeps reading the file it opened.
pub fn rebase_layer(path: &Path, backing: &Path) -> Result<(), DiskError> {
    let old = Layer::open(path, true)?;
    let below = Disk::open(&resolve_backing(path, backing), true)?;
    if below.size() != old.backing().size() {
        return Err(DiskError::BadLayer {
            path: path.to_path_buf(),
            why: format!("{} is not the size of the disk below", backing.display()),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut header = vec![0u8; HEADER_SIZE as usize];
    file.read_exact_at(&mut header, 0)?;
    set_backing(&mut header, path, backing)?;
    // One write of the whole header: the length and the path change together.
    file.write_all_at(&header, 0)?;
    file.sync_all()?;
    Ok(())
}

fn create(path: &Path, backing: &Path, size: Option<u64>, durable: bool) -> Result<(), DiskError> {
    let below = Disk::open(&resolve_backing(path, backing), true)?;
    let size = size.unwrap_or_else(|| below.size());
    let blen = bitmap_len(size, CLUSTER_SIZE);
    let data_offset = (HEADER_SIZE + blen).div_ceil(DATA_ALIGN) * DATA_ALIGN;
    let mut header = vec![0u8; HEADER_SIZE as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(CLUSTER_SIZE as u32).to_le_bytes());
    header[16..24].copy_from_slice(&size.to_le_bytes());
    header[24..32].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    header[32..40].copy_from_slice(&blen.to_le_bytes());
    header[40..48].copy_from_slice(&data_offset.to_le_bytes());
    set_backing(&mut header, path, backing)?;

    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let f = File::create(&tmp)?;
        f.write_all_at(&header, 0)?;
        // The bitmap starts all clear; extending the file leaves it as zeros.
        f.set_len(data_offset + size.div_ceil(CLUSTER_SIZE) * CLUSTER_SIZE)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let (true, Some(dir)) = (durable, path.parent()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DiskError::Io(e)
    })
}

impl Layer {
    /// Opens the layer at `path`.
    pub fn open(path: &Path, read_only: bool) -> Result<Layer, DiskError> {
        match Disk::open(path, read_only)? {
            Disk::Layer(l) => Ok(l),
            Disk::Raw { .. } => Err(DiskError::BadLayer {
                path: path.to_path_buf(),
                why: "not a ferry layer".into(),
            }),
        }
    }

    pub(crate) fn open_file(
        path: &Path,
        file: File,
        read_only: bool,
        depth: usize,
    ) -> Result<Layer, DiskError> {
        let bad = |why: &str| DiskError::BadLayer {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let mut h = vec![0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| bad("truncated header"))?;
        let version = u32_at(&h, 8);
        if version != VERSION {
            return Err(bad(&format!("unsupported layer version {version}")));
        }
        let cluster = u32_at(&h, 12) as u64;
        let size = u64_at(&h, 16);
        let bitmap_offset = u64_at(&h, 24);
        let blen = u64_at(&h, 32);
        let data_offset = u64_at(&h, 40);
        let plen = u32_at(&h, 48) as usize;
        if !cluster.is_power_of_two()
            || cluster < 512
            || blen != bitmap_len(size, cluster)
            || bitmap_offset < HEADER_SIZE
            || data_offset < bitmap_offset + blen
            || plen > h.len() - PATH_OFFSET
        {
            return Err(bad("inconsistent header"));
        }
        let backing_raw = PathBuf::from(
            String::from_utf8_lossy(&h[PATH_OFFSET..PATH_OFFSET + plen]).into_owned(),
        );
        let mut bits = vec![0u8; blen as usize];
        file.read_exact_at(&mut bits, bitmap_offset)
            .map_err(|_| bad("truncated bitmap"))?;
        let backing = Disk::open_depth(&resolve_backing(path, &backing_raw), true, depth + 1)?;
        Ok(Layer {
            file,
            path: path.to_path_buf(),
            size,
            cluster,
            bitmap_offset,
            data_offset,
            backing_raw,
            backing: Box::new(backing),
            read_only,
            state: Mutex::new(Bitmap { bits, dirty: false }),
        })
    }

    /// Size the guest sees.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The layer file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk below this layer.
    pub fn backing(&self) -> &Disk {
        &self.backing
    }

    /// Indexes of the `cluster`-sized clusters this layer stores (not those below).
    pub fn own_clusters(&self, cluster: u64) -> Vec<u64> {
        let st = self.state.lock().expect("bitmap lock");
        let mut out = Vec::new();
        for i in 0..self.size.div_ceil(self.cluster) {
            if st.get(i) {
                let (first, last) = (
                    i * self.cluster / cluster,
                    ((i + 1) * self.cluster).div_ceil(cluster),
                );
                for c in first..last {
                    if out.last() != Some(&c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    /// Facts about this layer.
    pub fn info(&self) -> LayerInfo {
        let st = self.state.lock().expect("bitmap lock");
        LayerInfo {
            size: self.size,
            cluster_size: self.cluster,
            allocated_clusters: st.bits.iter().map(|b| b.count_ones() as u64).sum(),
            backing: self.backing_raw.clone(),
        }
    }

    /// Calls `f` for each `(offset, len)` chunk of `[offset, offset+len)` split at
    /// cluster boundaries and clipped to the disk size, with the cluster index.
    fn chunks(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, u64, usize, usize) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let idx = pos / self.cluster;
            let within = pos % self.cluster;
            let n = ((self.cluster - within) as usize).min(len - done);
            f(idx, pos, done, n)?;
            done += n;
        }
        Ok(())
    }

    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        let st = self.state.lock().expect("bitmap lock");
        self.chunks(offset, inside.len(), |idx, pos, at, n| {
            let dst = &mut inside[at..at + n];
            if st.get(idx) {
                self.file.read_exact_at(dst, self.data_offset + pos)
            } else {
                self.backing.read_at(dst, pos)
            }
        })
    }

    /// Writes `buf` at `offset`, copying partially written clusters up first.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "write past the end of the disk",
            ));
        }
        let mut st = self.state.lock().expect("bitmap lock");
        let mut cluster_buf = Vec::new();
        self.chunks(offset, buf.len(), |idx, pos, at, n| {
            let src = &buf[at..at + n];
            if st.get(idx) || n as u64 == self.cluster {
                self.file.write_all_at(src, self.data_offset + pos)?;
            } else {
                let start = idx * self.cluster;
                cluster_buf.resize(self.cluster as usize, 0);
                self.backing.read_at(&mut cluster_buf, start)?;
                let within = (pos - start) as usize;
                cluster_buf[within..within + n].copy_from_slice(src);
                self.file
                    .write_all_at(&cluster_buf, self.data_offset + start)?;
            }
            st.set(idx);
            Ok(())
        })
    }

    /// Places a whole cluster that arrived from elsewhere (a layer filled
    /// from a store) unless this layer holds that cluster already: what the
    /// guest wrote since wins. True if placed.
    pub fn fill_cluster(&self, offset: u64, bytes: &[u8]) -> std::io::Result<bool> {
        let len = bytes.len() as u64;
        let whole = offset.is_multiple_of(self.cluster)
            && offset < self.size
            && len > 0
            && (len == self.cluster || offset + len == self.size);
        if !whole {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{len} bytes at {offset} are not a whole cluster of the disk"),
            ));
        }
        if self.read_only {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        let mut st = self.state.lock().expect("bitmap lock");
        let idx = offset / self.cluster;
        if st.get(idx) {
            return Ok(false);
        }
        self.file.write_all_at(bytes, self.data_offset + offset)?;
        st.set(idx);
        Ok(true)
    }

    /// Writes the bitmap into the file without waiting for the device: what
    /// was written is visible to the next opener (through the page cache) but
    /// not yet durable. For a layer nothing depends on surviving a host crash.
    pub fn write_back(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().expect("bitmap lock");
        if st.dirty {
            self.file.write_all_at(&st.bits, self.bitmap_offset)?;
            st.dirty = false;
        }
        Ok(())
    }

    /// Makes written data and the bitmap durable.
    pub fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().expect("bitmap lock");
        if !st.dirty {
            return Ok(());
        }
        // Data before the bitmap that points at it.
        self.file.sync_data()?;
        self.file.write_all_at(&st.bits, self.bitmap_offset)?;
        self.file.sync_data()?;
        st.dirty = false;
        Ok(())
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path, len: usize) -> PathBuf {
        let p = dir.join("base.img");
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn reads_fall_through_and_writes_stay_in_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 300_000);
        let before = std::fs::read(&b).unwrap();
        let top = dir.path().join("top.layer");
        create_layer(&top, Path::new("base.img"), None).unwrap();
        let d = Disk::open(&top, false).unwrap();
        assert_eq!(d.size(), 300_000);

        // A write straddling a cluster boundary, partial on both sides.
        let off = CLUSTER_SIZE - 10;
        d.write_at(&[0xAB; 30], off).unwrap();
        let mut got = vec![0u8; 300_000];
        d.read_at(&mut got, 0).unwrap();
        let mut want = before.clone();
        want[off as usize..off as usize + 30].fill(0xAB);
        assert_eq!(got, want);
        d.flush().unwrap();
        drop(d);

        // The base is untouched; the layer persists across reopen.
        assert_eq!(std::fs::read(&b).unwrap(), before);
        let d = Disk::open(&top, true).unwrap();
        let mut again = vec![0u8; 300_000];
        d.read_at(&mut again, 0).unwrap();
        assert_eq!(again, want);
        let Disk::Layer(l) = &d else {
            panic!("not a layer")
        };
        assert_eq!(l.info().allocated_clusters, 2);
    }

    #[test]
    fn a_layer_rebased_onto_a_link_of_its_disk_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 3 * CLUSTER_SIZE as usize);
        let top = dir.path().join("top.layer");
        create_layer(&top, &b, None).unwrap();
        Disk::open(&top, false)
            .unwrap()
            .write_at(b"mine", 10)
            .unwrap();
        let moved = dir.path().join("published.img");
        std::fs::hard_link(&b, &moved).unwrap();
        rebase_layer(&top, &moved).unwrap();
        std::fs::remove_file(&b).unwrap();
        let d = Disk::open(&top, true).unwrap();
        let mut got = vec![0u8; 3 * CLUSTER_SIZE as usize];
        d.read_at(&mut got, 0).unwrap();
        let mut want: Vec<u8> = (0..got.len()).map(|i| (i % 251) as u8).collect();
        want[10..14].copy_from_slice(b"mine");
        assert!(got == want);
        let Disk::Layer(l) = &d else {
            panic!("not a layer")
        };
        assert_eq!(l.info().backing, moved);
        // A disk of another size is refused and the layer left as it was.
        let small = dir.path().join("small.img");
        std::fs::write(&small, [1u8; 512]).unwrap();
        assert!(rebase_layer(&top, &small).is_err());
        assert_eq!(Layer::open(&top, true).unwrap().info().backing, moved);
    }

    #[test]
    fn sibling_layers_on_one_base_never_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        base(dir.path(), 4 * CLUSTER_SIZE as usize);
        let (a, b) = (dir.path().join("a.layer"), dir.path().join("b.layer"));
        create_layer(&a, Path::new("base.img"), None).unwrap();
        create_layer(&b, Path::new("base.img"), None).unwrap();
        let (da, db) = (
            Disk::open(&a, false).unwrap(),
            Disk::open(&b, false).unwrap(),
        );
        da.write_at(b"from a", 100).unwrap();
        db.write_at(b"from b", 100).unwrap();
        let mut buf = [0u8; 6];
        da.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"from a");
        db.read_at(&mut buf, 100).unwrap();
        assert_eq!(&buf, b"from b");
    }

    #[test]
    fn chains_of_layers_read_through_every_level() {
        let dir = tempfile::tempdir().unwrap();
        base(dir.path(), 2 * CLUSTER_SIZE as usize);
        let mid = dir.path().join("mid.layer");
        create_layer(&mid, Path::new("base.img"), None).unwrap();
        {
            let d = Disk::open(&mid, false).unwrap();
            d.write_at(b"middle", 0).unwrap();
        } // dropped: bitmap persisted without an explicit flush
        let top = dir.path().join("top.layer");
        create_layer(&top, &mid, None).unwrap();
        let d = Disk::open(&top, false).unwrap();
        d.write_at(b"TOP", CLUSTER_SIZE).unwrap();
        let mut buf = [0u8; 6];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"middle");
        let mut buf = [0u8; 4];
        d.read_at(&mut buf, CLUSTER_SIZE).unwrap();
        assert_eq!(&buf[..3], b"TOP");
        assert_eq!(buf[3], ((CLUSTER_SIZE + 3) % 251) as u8);
    }

    #[test]
    fn damaged_headers_and_loops_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        base(dir.path(), 1000);
        let top = dir.path().join("top.layer");
        create_layer(&top, Path::new("base.img"), None).unwrap();
        let mut bytes = std::fs::read(&top).unwrap();
        bytes[8] = 99; // version
        let bad = dir.path().join("bad.layer");
        std::fs::write(&bad, &bytes).unwrap();
        assert!(matches!(
            Disk::open(&bad, true),
            Err(DiskError::BadLayer { .. })
        ));
        std::fs::write(&bad, &bytes[..100]).unwrap();
        assert!(Disk::open(&bad, true).is_err());

        // A layer whose backing is itself.
        let looped = dir.path().join("loop.layer");
        create_layer(&looped, Path::new("base.img"), None).unwrap();
        let mut bytes = std::fs::read(&looped).unwrap();
        let name = b"loop.layer";
        bytes[48..52].copy_from_slice(&(name.len() as u32).to_le_bytes());
        bytes[PATH_OFFSET..PATH_OFFSET + name.len()].copy_from_slice(name);
        std::fs::write(&looped, &bytes).unwrap();
        assert!(matches!(
            Disk::open(&looped, true),
            Err(DiskError::ChainTooDeep(_))
        ));
    }

    #[test]
    fn clusters_with_data_skip_holes_and_cover_every_level() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let f = File::create(&base).unwrap();
        f.set_len(16 * CLUSTER_SIZE).unwrap();
        f.write_all_at(b"data", 3 * CLUSTER_SIZE + 10).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let top = dir.path().join("top.layer");
        create_layer(&top, Path::new("base.img"), None).unwrap();
        let d = Disk::open(&top, false).unwrap();
        d.write_at(b"x", 9 * CLUSTER_SIZE).unwrap();
        let Disk::Layer(l) = &d else { panic!() };
        assert_eq!(l.own_clusters(CLUSTER_SIZE), vec![9]);
        let all = d.clusters_with_data(CLUSTER_SIZE).unwrap();
        // The filesystem may report a larger data extent than written, never a smaller one.
        assert!(all.contains(&3) && all.contains(&9), "{all:?}");
        assert!(all.len() < 16, "holes must be skipped: {all:?}");
    }

    #[test]
    fn writes_past_the_end_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        base(dir.path(), 1000);
        let top = dir.path().join("top.layer");
        create_layer(&top, Path::new("base.img"), None).unwrap();
        let d = Disk::open(&top, false).unwrap();
        assert!(d.write_at(&[1; 10], 995).is_err());
    }
}
