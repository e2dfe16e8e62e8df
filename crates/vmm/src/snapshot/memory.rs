//! Guest memory for snapshots, restores and forks.
//!
//! A fresh VM's RAM is one memfd mapped shared. A restored or forked VM's
//! RAM is an anonymous, zero-filled private mapping with files mapped
//! privately over parts of it ("layers", later ones on top): pages are
//! read from a file only when the guest touches them, and guest writes go
//! to anonymous copy-on-write pages, never to the files.
//!
//! Forking makes the memory copy-on-write without copying it: a fresh VM's
//! memfd is remapped privately at the same host address (KVM's MMU
//! notifiers drop its stale translations) and becomes an immutable layer;
//! a VM that already runs on layers has only its dirty (anonymous) pages
//! copied into a new sealed memfd layer.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{GuestRegion, SnapshotError};
use crate::memory::normalize;
use crate::GuestMemoryMmap;

pub use crate::memory::PAGE_SIZE;
/// Most extents accepted for one VM, over all layers: each is a mapping and
/// Linux allows about 65530 per process by default. Writers should merge
/// runs separated by small gaps (copying the zeros) to stay far below.
pub const MAX_EXTENTS: usize = 60_000;
/// Clean pages between dirty runs copied along to save mappings.
const MERGE_GAP_PAGES: u64 = 16;

/// A page-aligned range of a file that holds guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the first byte in the file.
    pub file_offset: u64,
}

/// One file mapped privately over guest memory.
#[derive(Clone, Debug)]
pub struct Layer {
    file: Arc<File>,
    extents: Vec<Extent>,
}

impl Layer {
    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where its pieces go in guest memory.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
}

/// How long a fork freeze took and what it copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreezeStats {
    /// Bytes of guest memory copied into a new layer (0 on a first fork).
    pub copied_bytes: u64,
    /// Mappings the new layer added.
    pub new_extents: usize,
    /// Time spent converting memory, with the VM paused.
    pub took: Duration,
}

/// Guest memory as a stack of files mapped privately over zeros, as
/// produced by [`crate::Paused::freeze_for_fork`]. Hand it to
/// [`crate::Vm::restore`] as [`MemorySource::Layers`], in this process or
/// (see [`MemoryLayers::to_inheritable`]) in a child.
#[derive(Debug)]
pub struct MemoryLayers {
    layers: Vec<Layer>,
    stats: Option<FreezeStats>,
}

/// Serializable description of [`MemoryLayers`]: each layer names the file
/// descriptor that holds it in the receiving process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayersDesc {
    /// Bottom layer first.
    pub layers: Vec<LayerDesc>,
}

/// One layer of a [`MemoryLayersDesc`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    /// File descriptor number of the layer's file.
    pub fd: RawFd,
    /// Where its pieces go in guest memory.
    pub extents: Vec<Extent>,
}

/// Where a restored VM's memory comes from.
#[derive(Debug)]
pub enum MemorySource {
    /// Pieces of one file (a bundle's memory image) over zeros. Guest
    /// addresses, lengths and file offsets must be page aligned.
    Extents {
        /// The file, opened read-only is enough.
        file: File,
        /// The pieces; the rest of guest memory is zero.
        extents: Vec<Extent>,
    },
    /// A fork's memory layers.
    Layers(MemoryLayers),
    /// All of guest RAM, already filled in: a memfd holding the regions back
    /// to back, made by [`crate::memory::new_guest_ram`]. The VM maps it
    /// shared in 2 MiB pages and owns it from then on, exactly like a booted
    /// VM's RAM, so nothing is faulted in lazily or copied on write.
    Ram(File),
    /// Pieces of one file, like [`MemorySource::Extents`], plus ranges
    /// produced on first touch by `lazy` (see [`super::lazy`]).
    Lazy {
        /// The file.
        file: File,
        /// Its pieces.
        extents: Vec<Extent>,
        /// Produces the rest of the stored memory on demand; its ranges must
        /// not overlap `extents`.
        lazy: Arc<dyn super::lazy::LazySource>,
    },
}

impl MemoryLayers {
    /// The layers, bottom first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Statistics of the freeze that produced these layers, if this process
    /// froze them.
    pub fn freeze_stats(&self) -> Option<FreezeStats> {
        self.stats
    }

    /// Describes the layers with this process's descriptor numbers.
    pub fn describe(&self) -> MemoryLayersDesc {
        MemoryLayersDesc {
            layers: self
                .layers
                .iter()
                .map(|l| LayerDesc {
                    fd: l.file.as_raw_fd(),
                    extents: l.extents.clone(),
                })
                .collect(),
        }
    }

    /// Duplicates every layer's descriptor without close-on-exec, for a
    /// child process to inherit. Keep the returned descriptors open until
    /// the child is spawned, then drop them; the description names them.
    pub fn to_inheritable(&self) -> Result<(Vec<OwnedFd>, MemoryLayersDesc), SnapshotError> {
        let mut fds = Vec::with_capacity(self.layers.len());
        let mut desc = MemoryLayersDesc { layers: Vec::new() };
        for l in &self.layers {
            // SAFETY: F_DUPFD on a descriptor we own returns a new descriptor
            // (without FD_CLOEXEC) or -1.
            let fd = unsafe { libc::fcntl(l.file.as_raw_fd(), libc::F_DUPFD, 3) };
            if fd < 0 {
                return Err(SnapshotError::Memory(io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just created and is owned by nobody else.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            desc.layers.push(LayerDesc {
                fd,
                extents: l.extents.clone(),
            });
            fds.push(owned);
        }
        Ok((fds, desc))
    }

    /// Rebuilds layers from open files, `files[i]` holding `desc.layers[i]`
    /// (the `fd` fields are ignored).
    pub fn from_files(files: Vec<File>, desc: &MemoryLayersDesc) -> Result<Self, SnapshotError> {
        if files.len() != desc.layers.len() {
            return Err(SnapshotError::InvalidLayers(format!(
                "{} files for {} layers",
                files.len(),
                desc.layers.len()
            )));
        }
        let layers = files
            .into_iter()
            .zip(&desc.layers)
            .map(|(f, d)| Layer {
                file: Arc::new(f),
                extents: d.extents.clone(),
            })
            .collect();
        Ok(Self {
            layers,
            stats: None,
        })
    }

    /// Rebuilds layers in a child from descriptors it inherited, as named by
    /// the description [`Self::to_inheritable`] produced. Takes ownership of
    /// the descriptors and marks them close-on-exec again.
    ///
    /// # Safety
    ///
    /// Every `fd` in `desc` must be an open descriptor that nothing else in
    /// this process owns or will close.
    pub unsafe fn from_inherited(desc: &MemoryLayersDesc) -> Result<Self, SnapshotError> {
        let mut seen = std::collections::HashSet::new();
        for l in &desc.layers {
            if l.fd < 0 || !seen.insert(l.fd) {
                return Err(SnapshotError::InvalidLayers(format!(
                    "invalid or repeated descriptor {}",
                    l.fd
                )));
            }
            // SAFETY: F_GETFD only inspects the descriptor table.
            if unsafe { libc::fcntl(l.fd, libc::F_GETFD) } < 0 {
                return Err(SnapshotError::InvalidLayers(format!(
                    "descriptor {} is not open",
                    l.fd
                )));
            }
        }
        let mut files = Vec::with_capacity(desc.layers.len());
        for l in &desc.layers {
            // SAFETY: the caller guarantees the descriptor is open and ours
            // alone; it was checked above to be open and not repeated.
            let f = unsafe { File::from_raw_fd(l.fd) };
            // SAFETY: plain fcntl on a descriptor we now own.
            unsafe { libc::fcntl(l.fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            files.push(f);
        }
        Self::from_files(files, desc)
    }
}

/// What restoring memory cost before the guest ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Mappings placed over the zero base.
    pub extents: usize,
    /// Bytes of guest memory backed by files.
    pub mapped_bytes: u64,
    /// Bytes of guest memory the VMM read while mapping memory and
    /// rebuilding devices (pages present in its page tables then): 0 means
    /// everything is loaded lazily. Counted only when
    /// [`crate::vm::RESTORE_STATS_ENV`] is set.
    pub eager_bytes_read: Option<u64>,
}

/// How a VM's guest RAM is backed right now.
pub(crate) enum Backing {
    /// The memfd, mapped shared; regions lie back to back in it.
    Shared(Arc<File>),
    /// Private mappings of these layers over anonymous zero pages.
    Private(Vec<Layer>),
}

fn page_aligned(v: u64) -> bool {
    v.is_multiple_of(PAGE_SIZE)
}

/// Checks extents of one file against guest RAM and the file's size:
/// page-aligned, non-empty, each inside one region, no overlaps.
pub(crate) fn validate_extents(
    regions: &[GuestRegion],
    extents: &[Extent],
    file_len: u64,
) -> Result<(), String> {
    if extents.len() > MAX_EXTENTS {
        return Err(format!("{} extents, at most {MAX_EXTENTS}", extents.len()));
    }
    for e in extents {
        if e.len == 0
            || !page_aligned(e.guest_addr)
            || !page_aligned(e.len)
            || !page_aligned(e.file_offset)
        {
            return Err(format!("extent {e:?} is empty or not page aligned"));
        }
        let end = e
            .guest_addr
            .checked_add(e.len)
            .ok_or_else(|| format!("extent {e:?} wraps around"))?;
        let inside = regions
            .iter()
            .any(|r| e.guest_addr >= r.guest_addr && end <= r.guest_addr.saturating_add(r.len));
        if !inside {
            return Err(format!("extent {e:?} lies outside guest memory"));
        }
        let file_end = e
            .file_offset
            .checked_add(e.len)
            .ok_or_else(|| format!("extent {e:?} wraps around in the file"))?;
        if file_end > file_len {
            return Err(format!(
                "extent {e:?} reaches past the end of the file ({file_len} bytes)"
            ));
        }
    }
    let mut sorted: Vec<&Extent> = extents.iter().collect();
    sorted.sort_by_key(|e| e.guest_addr);
    for w in sorted.windows(2) {
        if w[0].guest_addr + w[0].len > w[1].guest_addr {
            return Err(format!("extents {:?} and {:?} overlap", w[0], w[1]));
        }
    }
    Ok(())
}

fn file_len(file: &File) -> Result<u64, String> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| format!("cannot stat a memory file: {e}"))
}

/// Guest memory produced on first touch.
pub(crate) type LazyRanges = Option<Arc<dyn super::lazy::LazySource>>;

/// Validates `source` against guest RAM and turns it into layers (and the
/// lazily produced part, if any).
pub(crate) fn source_layers(
    regions: &[GuestRegion],
    source: MemorySource,
) -> Result<(Vec<Layer>, LazyRanges), String> {
    let (layers, lazy) = match source {
        MemorySource::Extents { file, extents } => (
            vec![Layer {
                file: Arc::new(file),
                extents,
            }],
            None,
        ),
        MemorySource::Layers(l) => (l.layers, None),
        MemorySource::Ram(_) => {
            return Err("guest RAM files are mapped whole, not as layers".into());
        }
        MemorySource::Lazy {
            file,
            extents,
            lazy,
        } => (
            vec![Layer {
                file: Arc::new(file),
                extents,
            }],
            Some(lazy),
        ),
    };
    if let Some(lazy) = &lazy {
        // Lazy ranges live in the anonymous base, never under a file piece.
        let as_extents: Vec<Extent> = lazy
            .ranges()
            .into_iter()
            .map(|(guest_addr, len)| Extent {
                guest_addr,
                len,
                file_offset: 0,
            })
            .chain(layers.iter().flat_map(|l| l.extents.iter().copied()))
            .collect();
        validate_extents(regions, &as_extents, u64::MAX)?;
    }
    let total: usize = layers.iter().map(|l| l.extents.len()).sum();
    if total > MAX_EXTENTS {
        return Err(format!("{total} extents in all, at most {MAX_EXTENTS}"));
    }
    for l in &layers {
        validate_extents(regions, &l.extents, file_len(&l.file)?)?;
    }
    Ok((layers, lazy))
}

/// Host address of guest `addr`, which must lie with `len` bytes in one
/// region of `memory`.
fn host_range(memory: &GuestMemoryMmap, addr: u64, len: u64) -> io::Result<*mut u8> {
    let region = memory
        .find_region(GuestAddress(addr))
        .filter(|r| addr + len <= r.start_addr().0 + r.len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range outside guest RAM"))?;
    region
        .get_host_address(MemoryRegionAddress(addr - region.start_addr().0))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range not mapped"))
}

/// Maps `len` bytes of `file` at `offset` privately over guest `addr`.
fn map_private(
    memory: &GuestMemoryMmap,
    addr: u64,
    len: u64,
    file: &File,
    offset: u64,
) -> io::Result<()> {
    let host = host_range(memory, addr, len)?;
    let len_usize = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `host..host+len` lies inside a mapping owned by `memory` (checked
    // by `host_range`), so MAP_FIXED replaces only guest RAM pages, never
    // other memory of this process. The new pages have the same size and
    // protection; the region's owner unmaps the whole range when dropped.
    let p = unsafe {
        libc::mmap(
            host.cast(),
            len_usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps every layer, bottom first, over anonymous guest RAM.
pub(crate) fn map_layers(memory: &GuestMemoryMmap, layers: &[Layer]) -> io::Result<()> {
    for l in layers {
        for e in &l.extents {
            map_private(memory, e.guest_addr, e.len, &l.file, e.file_offset)?;
        }
    }
    Ok(())
}

/// Anonymous zero-filled guest RAM with the layers mapped over it.
pub(crate) fn private_memory(
    regions: &[GuestRegion],
    layers: &[Layer],
) -> Result<GuestMemoryMmap, String> {
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|r| {
            Ok((
                GuestAddress(r.guest_addr),
                usize::try_from(r.len).map_err(|_| "region too large")?,
            ))
        })
        .collect::<Result<_, &str>>()?;
    let memory =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| format!("cannot map guest RAM: {e}"))?;
    map_layers(&memory, layers).map_err(|e| format!("cannot map a memory layer: {e}"))?;
    Ok(memory)
}

// /proc/self/pagemap entry bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Pagemap entries of `pages` pages from host address `host`.
fn pagemap(host: *const u8, pages: usize) -> io::Result<Vec<u64>> {
    let f = File::open("/proc/self/pagemap")?;
    let mut out = vec![0u64; pages];
    let first = host as u64 / PAGE_SIZE;
    const CHUNK: usize = 1 << 16;
    let mut buf = vec![0u8; CHUNK * 8];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(CHUNK);
        f.read_exact_at(&mut buf[..n * 8], (first + done as u64) * 8)?;
        for (i, c) in buf[..n * 8].chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            out[done + i] = u64::from_le_bytes(w);
        }
        done += n;
    }
    Ok(out)
}

/// Calls `f(guest_addr, pagemap entry)` for every page of guest RAM.
fn for_each_page(memory: &GuestMemoryMmap, mut f: impl FnMut(u64, u64)) -> io::Result<()> {
    for region in memory.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
        let pages = usize::try_from(region.len() / PAGE_SIZE)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let entries = pagemap(host, pages)?;
        let base = region.start_addr().0;
        for (i, e) in entries.into_iter().enumerate() {
            f(base + i as u64 * PAGE_SIZE, e);
        }
    }
    Ok(())
}

/// Bytes of guest RAM present in this process's page tables.
pub(crate) fn resident_bytes(memory: &GuestMemoryMmap) -> io::Result<u64> {
    let mut n = 0;
    for_each_page(memory, |_, e| {
        if e & (PM_PRESENT | PM_SWAP) != 0 {
            n += PAGE_SIZE;
        }
    })?;
    Ok(n)
}

/// Appends `[addr, addr + len)` to sorted `ranges`, merging with the last
/// range when they touch.
fn push_range(ranges: &mut Vec<(u64, u64)>, addr: u64, len: u64) {
    if let Some(last) = ranges.last_mut() {
        if last.0 + last.1 == addr {
            last.1 += len;
            return;
        }
    }
    ranges.push((addr, len));
}

/// Data (non-hole) ranges of `file` inside `[start, end)`, page aligned.
fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let off =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only moves this descriptor's offset (nobody reads it).
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // No data after `pos`.
            }
            if e.raw_os_error() == Some(libc::EINVAL) {
                // Not supported: treat everything as data.
                out.push((pos, end - pos));
                break;
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        let a = data / PAGE_SIZE * PAGE_SIZE;
        let b = hole.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        out.push((a, b.min(end) - a));
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// Guest ranges that may hold non-zero bytes: pages present or swapped in
/// this process, plus file data mapped under them. Everything else is
/// guaranteed zero and costs nothing to skip.
pub(crate) fn nonzero_ranges(
    memory: &GuestMemoryMmap,
    backing: &Backing,
) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    match backing {
        Backing::Shared(memfd) => {
            // Every write lands in the memfd, so its data ranges are exact.
            let mut offset = 0;
            for region in memory.iter() {
                let (base, len) = (region.start_addr().0, region.len());
                for (a, l) in data_ranges(memfd, offset, offset + len)? {
                    ranges.push((base + a - offset, l));
                }
                offset += len;
            }
        }
        Backing::Private(layers) => {
            for_each_page(memory, |addr, e| {
                if e & (PM_PRESENT | PM_SWAP) != 0 {
                    push_range(&mut ranges, addr, PAGE_SIZE);
                }
            })?;
            for l in layers {
                for x in &l.extents {
                    for (a, len) in data_ranges(&l.file, x.file_offset, x.file_offset + x.len)? {
                        ranges.push((x.guest_addr + a - x.file_offset, len));
                    }
                }
            }
        }
    }
    Ok(normalize(ranges))
}

/// A new, empty memfd that [`seal`] can make immutable, e.g. to hold a
/// memory layer built outside the VMM.
pub fn new_sealable_memfd(name: &str) -> io::Result<File> {
    let name = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `name` is NUL-terminated; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Makes a memfd immutable: no writes, no size changes, no seal changes.
/// Fails if it is still mapped shared and writable anywhere.
pub fn seal(file: &File) -> io::Result<()> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl with F_ADD_SEALS on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Guest ranges covered by some layer, sorted and merged.
fn covered_ranges(layers: &[Layer]) -> Vec<(u64, u64)> {
    normalize(
        layers
            .iter()
            .flat_map(|l| l.extents.iter().map(|e| (e.guest_addr, e.len)))
            .collect(),
    )
}

fn is_covered(covered: &[(u64, u64)], addr: u64) -> bool {
    let i = covered.partition_point(|&(a, _)| a <= addr);
    i > 0 && addr < covered[i - 1].0 + covered[i - 1].1
}

/// Copies `len` bytes of guest RAM at `addr` into `file` at `offset`.
fn copy_out(
    memory: &GuestMemoryMmap,
    addr: u64,
    len: u64,
    file: &File,
    offset: u64,
) -> io::Result<()> {
    let host = host_range(memory, addr, len)?;
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the range lies in guest RAM owned by `memory` (checked by
    // `host_range`); the VM is paused, so nothing writes it meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
    file.write_all_at(bytes, offset)
}

/// Converts guest memory to copy-on-write layers; see the module docs.
/// The VM must be paused. Updates `backing` to the new layers.
pub(crate) fn freeze(
    memory: &GuestMemoryMmap,
    backing: &mut Backing,
) -> Result<MemoryLayers, SnapshotError> {
    let start = Instant::now();
    let (layers, copied_bytes, new_extents) = match backing {
        Backing::Shared(memfd) => {
            let memfd = Arc::clone(memfd);
            let mut extents = Vec::new();
            let mut offset = 0;
            for region in memory.iter() {
                extents.push(Extent {
                    guest_addr: region.start_addr().0,
                    len: region.len(),
                    file_offset: offset,
                });
                offset += region.len();
            }
            for e in &extents {
                map_private(memory, e.guest_addr, e.len, &memfd, e.file_offset)
                    .map_err(SnapshotError::Memory)?;
            }
            let n = extents.len();
            let layers = vec![Layer {
                file: Arc::clone(&memfd),
                extents,
            }];
            *backing = Backing::Private(layers.clone());
            // Nothing maps the memfd shared any more: make that permanent.
            seal(&memfd).map_err(SnapshotError::Memory)?;
            (layers, 0, n)
        }
        Backing::Private(layers) => {
            let covered = covered_ranges(layers);
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut dirty_pages = Vec::new();
            for_each_page(memory, |addr, e| {
                // Anonymous pages (present without the file bit, or swapped)
                // are the guest's writes since the last freeze or restore.
                let anon = (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAP != 0;
                if anon {
                    dirty_pages.push(addr);
                }
            })
            .map_err(SnapshotError::Memory)?;
            let mut zero = vec![0u8; PAGE_SIZE as usize];
            for addr in dirty_pages {
                // A zero page over the zero base (e.g. one the guest only
                // read) needs no copy.
                if !is_covered(&covered, addr) {
                    let host =
                        host_range(memory, addr, PAGE_SIZE).map_err(SnapshotError::Memory)?;
                    // SAFETY: one page of paused guest RAM owned by `memory`.
                    let page = unsafe {
                        std::slice::from_raw_parts(host.cast_const(), PAGE_SIZE as usize)
                    };
                    zero.fill(0);
                    if page == zero.as_slice() {
                        continue;
                    }
                }
                match runs.last_mut() {
                    Some(last)
                        if addr >= last.0 + last.1
                            && addr - (last.0 + last.1) <= MERGE_GAP_PAGES * PAGE_SIZE
                            && memory
                                .find_region(GuestAddress(last.0))
                                .is_some_and(|r| addr < r.start_addr().0 + r.len()) =>
                    {
                        last.1 = addr + PAGE_SIZE - last.0;
                    }
                    _ => runs.push((addr, PAGE_SIZE)),
                }
            }
            if runs.is_empty() {
                (layers.clone(), 0, 0)
            } else {
                let file = new_sealable_memfd("ferry-fork-layer").map_err(SnapshotError::Memory)?;
                let mut extents = Vec::with_capacity(runs.len());
                let mut offset = 0;
                for &(addr, len) in &runs {
                    copy_out(memory, addr, len, &file, offset).map_err(SnapshotError::Memory)?;
                    extents.push(Extent {
                        guest_addr: addr,
                        len,
                        file_offset: offset,
                    });
                    offset += len;
                }
                seal(&file).map_err(SnapshotError::Memory)?;
                let file = Arc::new(file);
                for e in &extents {
                    map_private(memory, e.guest_addr, e.len, &file, e.file_offset)
                        .map_err(SnapshotError::Memory)?;
                }
                let n = extents.len();
                layers.push(Layer { file, extents });
                (layers.clone(), offset, n)
            }
        }
    };
    let stats = FreezeStats {
        copied_bytes,
        new_extents,
        took: start.elapsed(),
    };
    tracing::info!("memory frozen for fork: {stats:?}");
    Ok(MemoryLayers {
        layers,
        stats: Some(stats),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn regions() -> Vec<GuestRegion> {
        vec![
            GuestRegion {
                guest_addr: 0,
                len: 1 << 20,
            },
            GuestRegion {
                guest_addr: 1 << 32,
                len: 1 << 20,
            },
        ]
    }

    fn file_with(pages: &[(u64, u8)], len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        for &(page, byte) in pages {
            f.write_all_at(&[byte; PAGE_SIZE as usize], page * PAGE_SIZE)
                .unwrap();
        }
        f
    }

    fn ext(guest_addr: u64, len: u64, file_offset: u64) -> Extent {
        Extent {
            guest_addr,
            len,
            file_offset,
        }
    }

    #[test]
    fn extent_validation() {
        let r = regions();
        let ok = [ext(0, 8192, 0), ext(1 << 32, 4096, 8192)];
        assert!(validate_extents(&r, &ok, 3 * 4096).is_ok());
        let cases: &[(&[Extent], &str)] = &[
            (&[ext(100, 4096, 0)], "aligned"),
            (&[ext(0, 0, 0)], "empty"),
            (&[ext(1 << 20, 4096, 0)], "outside"),
            (&[ext((1 << 20) - 4096, 8192, 0)], "outside"),
            (&[ext(0, 8192, 0), ext(4096, 4096, 0)], "overlap"),
            (&[ext(0, 4096, 1 << 30)], "past the end"),
            (&[ext(u64::MAX - 4095, 4096, 0)], "wraps"),
        ];
        for (extents, want) in cases {
            let err = validate_extents(&r, extents, 1 << 20).unwrap_err();
            assert!(err.contains(want), "{extents:?}: {err}");
        }
    }

    #[test]
    fn extents_map_lazily_and_privately() {
        let r = regions();
        let file = file_with(&[(0, 0xaa), (1, 0xbb), (2, 0xcc)], 3 * PAGE_SIZE);
        let layers = source_layers(
            &r,
            MemorySource::Extents {
                file: file.try_clone().unwrap(),
                extents: vec![
                    ext(0x10000, 2 * PAGE_SIZE, 0),
                    ext((1 << 32) + 0x3000, PAGE_SIZE, 2 * PAGE_SIZE),
                ],
            },
        )
        .unwrap()
        .0;
        let mem = private_memory(&r, &layers).unwrap();
        assert_eq!(resident_bytes(&mem).unwrap(), 0, "nothing read eagerly");
        let b: u8 = mem.read_obj(GuestAddress(0x10000)).unwrap();
        let c: u8 = mem.read_obj(GuestAddress(0x11fff)).unwrap();
        let d: u8 = mem.read_obj(GuestAddress((1 << 32) + 0x3000)).unwrap();
        let z: u8 = mem.read_obj(GuestAddress(0x20000)).unwrap();
        assert_eq!((b, c, d, z), (0xaa, 0xbb, 0xcc, 0));
        // Writes stay private; the file is unchanged.
        mem.write_obj(0x11u8, GuestAddress(0x10000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10000)).unwrap(), 0x11);
        let mut buf = [0u8; 1];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], 0xaa);

        let backing = Backing::Private(layers);
        let ranges = nonzero_ranges(&mem, &backing).unwrap();
        assert!(ranges.contains(&(0x10000, 2 * PAGE_SIZE)), "{ranges:x?}");
        assert!(
            ranges.iter().any(|&(a, l)| a <= 0x20000 && 0x20000 < a + l),
            "touched zero page listed"
        );
        assert!(
            !ranges.iter().any(|&(a, l)| a <= 0x80000 && 0x80000 < a + l),
            "untouched page skipped"
        );
    }

    fn shared_ram(regions: &[GuestRegion]) -> (GuestMemoryMmap, Arc<File>) {
        let total: u64 = regions.iter().map(|r| r.len).sum();
        let file = new_sealable_memfd("test-ram").unwrap();
        file.set_len(total).unwrap();
        let mut off = 0;
        let mut ranges = Vec::new();
        for r in regions {
            ranges.push((
                GuestAddress(r.guest_addr),
                r.len as usize,
                Some(vm_memory::FileOffset::new(file.try_clone().unwrap(), off)),
            ));
            off += r.len;
        }
        (
            GuestMemoryMmap::from_ranges_with_files(ranges).unwrap(),
            Arc::new(file),
        )
    }

    #[test]
    fn fork_layers_diverge_without_copying() {
        let r = regions();
        let (mem, memfd) = shared_ram(&r);
        mem.write_obj(0x1234_5678u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x99u8, GuestAddress((1 << 32) + 0x100))
            .unwrap();
        let mut backing = Backing::Shared(Arc::clone(&memfd));
        let nz = nonzero_ranges(&mem, &backing).unwrap();
        assert_eq!(nz, vec![(0x5000, PAGE_SIZE), ((1 << 32), PAGE_SIZE)]);

        let first = freeze(&mem, &mut backing).unwrap();
        assert_eq!(first.freeze_stats().unwrap().copied_bytes, 0);
        assert_eq!(first.layers().len(), 1);
        // The memfd is sealed: nobody can change the base any more.
        assert!(memfd.write_all_at(b"x", 0).is_err());

        // A "child" built from the same layers.
        let (_fds, desc) = first.to_inheritable().unwrap();
        let child_layers =
            MemoryLayers::from_files(vec![memfd.try_clone().unwrap()], &desc).unwrap();
        let child_layers = source_layers(&r, MemorySource::Layers(child_layers))
            .unwrap()
            .0;
        let child = private_memory(&r, &child_layers).unwrap();
        assert_eq!(
            child.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1234_5678
        );

        // Both write: each sees only its own change, the base stays.
        mem.write_obj(1u32, GuestAddress(0x5000)).unwrap();
        child.write_obj(2u32, GuestAddress(0x5000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 1);
        assert_eq!(child.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 2);
        let mut buf = [0u8; 4];
        memfd.read_exact_at(&mut buf, 0x5000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);

        // Second freeze of the source copies only its dirty page.
        mem.write_obj(7u8, GuestAddress(0x9000)).unwrap();
        let _: u8 = mem.read_obj(GuestAddress(0x7000)).unwrap(); // read only
        let second = freeze(&mem, &mut backing).unwrap();
        let stats = second.freeze_stats().unwrap();
        assert_eq!(second.layers().len(), 2);
        assert!(
            stats.copied_bytes >= 2 * PAGE_SIZE && stats.copied_bytes <= 6 * PAGE_SIZE,
            "{stats:?}"
        );
        let top = &second.layers()[1];
        assert_eq!(top.extents()[0].guest_addr, 0x5000);
        // The source still reads its own values, now from the new layer.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 7);
        // A grandchild sees the source's state at the second freeze.
        let files = second
            .layers()
            .iter()
            .map(|l| l.file().try_clone().unwrap())
            .collect();
        let g = MemoryLayers::from_files(files, &second.describe()).unwrap();
        let g = private_memory(&r, &source_layers(&r, MemorySource::Layers(g)).unwrap().0).unwrap();
        assert_eq!(g.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 1);
        assert_eq!(g.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 7);
        assert_eq!(
            g.read_obj::<u8>(GuestAddress((1 << 32) + 0x100)).unwrap(),
            0x99
        );
        // Nothing changed since: a third freeze copies nothing.
        let third = freeze(&mem, &mut backing).unwrap();
        assert_eq!(third.freeze_stats().unwrap().copied_bytes, 0);
        assert_eq!(third.layers().len(), 2);
    }

    #[test]
    fn inherited_descriptors_are_checked() {
        let desc = MemoryLayersDesc {
            layers: vec![LayerDesc {
                fd: 10_000,
                extents: vec![],
            }],
        };
        // SAFETY: fd 10000 is not open in the test process.
        let err = unsafe { MemoryLayers::from_inherited(&desc) }.unwrap_err();
        assert!(err.to_string().contains("not open"), "{err}");
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let desc = MemoryLayersDesc {
            layers: vec![
                LayerDesc {
                    fd,
                    extents: vec![],
                },
                LayerDesc {
                    fd,
                    extents: vec![],
                },
            ],
        };
        // SAFETY: refused before taking ownership (repeated descriptor).
        let err = unsafe { MemoryLayers::from_inherited(&desc) }.unwrap_err();
        assert!(err.to_string().contains("repeated"), "{err}");
        assert!(MemoryLayers::from_files(vec![], &desc).is_err());
    }
}
