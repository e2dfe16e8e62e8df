//! Guest memory from a bundle, for a restoring VMM process.
//!
//! By default memory is mapped, not read: raw frames straight from the bundle
//! file (shared through the page cache by every VM restored from it),
//! compressed frames decoded on first touch, a frame at a time, through
//! userfaultfd. Where userfaultfd is unavailable, or `FERRY_RESTORE_MEMORY=eager`
//! asks for it, everything is decoded up front, in parallel, into fresh guest
//! RAM that the VM maps shared like a booted VM's; the bundle is not needed
//! after that.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ferry_snapshot::frames::{self, FrameEncoding};
use ferry_snapshot::reader::MemoryImage;
use ferry_snapshot::{Bundle, BundleError};
use ferry_vmm::snapshot::{Chunk, LazySource};
use ferry_vmm::{Extent, MemorySource};

/// Where a restored VM's memory comes from, and what preparing it cost.
#[derive(Debug)]
pub struct RestoredMemory {
    /// Hand to the VMM.
    pub source: MemorySource,
    /// Bytes decoded before the guest ran.
    pub decoded_bytes: u64,
    /// Bytes left to decode on first touch.
    pub lazy_bytes: u64,
    /// Time spent decoding, in milliseconds.
    pub decode_ms: u64,
}

/// Appends an extent, merging it into the last one when both are contiguous.
fn push(list: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = list.last_mut() {
        if last.guest_addr + last.len == e.guest_addr
            && last.file_offset + last.len == e.file_offset
        {
            last.len += e.len;
            return;
        }
    }
    list.push(e);
}

/// Splits the extents at frame boundaries: pieces in raw frames point into the
/// bundle file (merged where contiguous), pieces in compressed frames into the
/// decoded stream (file offset = logical offset; one piece never spans frames).
fn split(image: &MemoryImage) -> Result<(Vec<Extent>, Vec<Extent>), BundleError> {
    let (mut raw, mut decoded) = (Vec::new(), Vec::new());
    for e in &image.extents {
        let mut at = e.data_offset;
        let end = e.data_offset + e.len;
        while at < end {
            let f = frames::frame_at(&image.frames, at)
                .ok_or_else(|| BundleError::Corrupt("memory extent beyond the frames".into()))?;
            let piece_end = end.min(f.offset + f.len);
            let guest_addr = e.guest_addr + (at - e.data_offset);
            let len = piece_end - at;
            match f.encoding {
                FrameEncoding::Raw => push(
                    &mut raw,
                    Extent {
                        guest_addr,
                        len,
                        file_offset: image.data_offset + f.stored_offset + (at - f.offset),
                    },
                ),
                FrameEncoding::Zstd => decoded.push(Extent {
                    guest_addr,
                    len,
                    file_offset: at,
                }),
            }
            at = piece_end;
        }
    }
    Ok((raw, decoded))
}

/// Compressed frames of a bundle, decoded when the guest first touches them.
#[derive(Debug)]
struct FrameSource {
    bundle: Bundle,
    image: MemoryImage,
    /// Indexes into `image.frames` of the compressed frames (the chunks).
    frames: Vec<usize>,
    /// Per chunk: (guest address, offset in the frame, length).
    pieces: Vec<Vec<(u64, usize, usize)>>,
    /// (guest address, length, chunk), sorted by address.
    by_addr: Vec<(u64, u64, usize)>,
}

impl FrameSource {
    fn new(bundle: Bundle, image: MemoryImage, decoded: &[Extent]) -> Result<Self, BundleError> {
        let frames: Vec<usize> = (0..image.frames.len())
            .filter(|&i| image.frames[i].encoding != FrameEncoding::Raw)
            .collect();
        let mut pieces = vec![Vec::new(); frames.len()];
        let mut by_addr = Vec::new();
        for e in decoded {
            // Decoded extents never straddle frames (split cuts them there).
            let chunk = frames
                .iter()
                .position(|&i| {
                    let f = &image.frames[i];
                    e.file_offset >= f.offset && e.file_offset + e.len <= f.offset + f.len
                })
                .ok_or_else(|| BundleError::Corrupt("memory piece outside its frame".into()))?;
            let f = &image.frames[frames[chunk]];
            pieces[chunk].push((
                e.guest_addr,
                (e.file_offset - f.offset) as usize,
                e.len as usize,
            ));
            by_addr.push((e.guest_addr, e.len, chunk));
        }
        by_addr.sort_unstable();
        Ok(FrameSource {
            bundle,
            image,
            frames,
            pieces,
            by_addr,
        })
    }
}

impl LazySource for FrameSource {
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(g, len, _) in &self.by_addr {
            match out.last_mut() {
                Some((s, l)) if *s + *l == g => *l += len,
                _ => out.push((g, len)),
            }
        }
        out
    }

    fn chunks(&self) -> usize {
        self.frames.len()
    }

    fn chunk_of(&self, addr: u64) -> Option<usize> {
        let i = self.by_addr.partition_point(|&(g, len, _)| g + len <= addr);
        self.by_addr
            .get(i)
            .filter(|&&(g, _, _)| g <= addr)
            .map(|&(_, _, c)| c)
    }

    fn prefetch(&self) -> Vec<usize> {
        // Raw frames of the set are mapped, not chunks: only the decoded ones.
        self.image
            .prefetch
            .iter()
            .filter_map(|i| self.frames.binary_search(i).ok())
            .collect()
    }

    fn prefetch_ranges(&self) -> Vec<(u64, u64)> {
        // The prefetch frames hold exactly the recorded pages.
        LazySource::prefetch(self)
            .into_iter()
            .flat_map(|c| self.pieces[c].iter().map(|&(g, _, len)| (g, len as u64)))
            .collect()
    }

    fn produce(&self, index: usize) -> std::io::Result<Chunk> {
        let f = &self.image.frames[self.frames[index]];
        let mut bytes = vec![0u8; f.len as usize];
        self.bundle
            .read_frame(&self.image, f, &mut bytes)
            .map_err(std::io::Error::other)?;
        Ok(Chunk {
            bytes,
            pieces: self.pieces[index].clone(),
        })
    }
}

/// How a restore brings back guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryPolicy {
    /// Decode everything into guest RAM before the guest runs.
    Eager,
    /// Map the bundle; decode compressed frames on first touch.
    Lazy,
}

impl MemoryPolicy {
    /// `FERRY_RESTORE_MEMORY=eager` if set, else lazy where userfaultfd is
    /// available and eager where it is not.
    pub fn choose() -> MemoryPolicy {
        let lazy_ok = ferry_vmm::snapshot::lazy::available();
        match std::env::var("FERRY_RESTORE_MEMORY").ok().as_deref() {
            Some("eager") => MemoryPolicy::Eager,
            _ if lazy_ok => MemoryPolicy::Lazy,
            _ => MemoryPolicy::Eager,
        }
    }
}

/// A piece of guest memory inside a decoded frame: (guest address, offset in
/// the frame, length).
type Piece = (u64, usize, usize);

/// Per frame of `image`: the pieces of guest memory it holds.
fn pieces_by_frame(image: &MemoryImage) -> Result<Vec<Vec<Piece>>, BundleError> {
    let mut out = vec![Vec::new(); image.frames.len()];
    for e in &image.extents {
        let mut at = e.data_offset;
        let end = e.data_offset + e.len;
        while at < end {
            let i = image.frames.partition_point(|f| f.offset + f.len <= at);
            let f = image
                .frames
                .get(i)
                .filter(|f| f.offset <= at)
                .ok_or_else(|| BundleError::Corrupt("memory extent beyond the frames".into()))?;
            let piece_end = end.min(f.offset + f.len);
            out[i].push((
                e.guest_addr + (at - e.data_offset),
                (at - f.offset) as usize,
                (piece_end - at) as usize,
            ));
            at = piece_end;
        }
    }
    Ok(out)
}

/// Fresh guest RAM laid out as `bundle`'s memory regions.
fn new_ram(bundle: &Bundle) -> Result<ferry_vmm::memory::GuestRam, BundleError> {
    let regions: Vec<(u64, u64)> = bundle
        .manifest()
        .memory_regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    ferry_vmm::memory::new_guest_ram(&regions)
        .map_err(|e| BundleError::io("prepare guest RAM")(std::io::Error::other(e)))
}

/// Decodes every frame of `image` into fresh guest RAM, on every core.
fn decode_into_ram(bundle: &Bundle, image: &MemoryImage) -> Result<std::fs::File, BundleError> {
    let ram = new_ram(bundle)?;
    decode_into(&ram, bundle, image)?;
    Ok(ram.file)
}

/// The guest memory of a chain of bundles (oldest first, the same RAM
/// layout): each one's pages laid over the older ones', decoded up front.
pub fn restored_chain_memory(chain: &[Bundle]) -> Result<RestoredMemory, BundleError> {
    let first = chain
        .first()
        .ok_or_else(|| BundleError::BadManifest("no bundle to restore".into()))?;
    let t = Instant::now();
    let ram = new_ram(first)?;
    let mut stored = 0;
    for b in chain {
        if b.manifest().memory_regions != first.manifest().memory_regions {
            return Err(BundleError::BadManifest(
                "the bundles of the chain lay out guest memory differently".into(),
            ));
        }
        let image = b.memory_image()?;
        stored += image.extents.iter().map(|e| e.len).sum::<u64>();
        decode_into(&ram, b, &image)?;
    }
    Ok(RestoredMemory {
        source: MemorySource::Ram(ram.file),
        decoded_bytes: stored,
        lazy_bytes: 0,
        decode_ms: t.elapsed().as_millis() as u64,
    })
}

/// Decodes every frame of `image` into `ram`, on every core.
fn decode_into(
    ram: &ferry_vmm::memory::GuestRam,
    bundle: &Bundle,
    image: &MemoryImage,
) -> Result<(), BundleError> {
    use vm_memory::{Bytes, GuestAddress};
    let pieces = pieces_by_frame(image)?;
    let work: Vec<usize> = (0..image.frames.len())
        .filter(|&i| !pieces[i].is_empty())
        .collect();
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(work.len())
        .max(1);
    let memory = &ram.memory;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<(), BundleError> {
                    let mut buf = Vec::new();
                    while let Some(&i) = work.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let f = &image.frames[i];
                        buf.resize(f.len as usize, 0);
                        bundle.read_frame(image, f, &mut buf)?;
                        for &(guest, off, len) in &pieces[i] {
                            memory
                                .write_slice(&buf[off..off + len], GuestAddress(guest))
                                .map_err(|e| {
                                    BundleError::Corrupt(format!(
                                        "memory piece at {guest:#x} outside guest RAM: {e}"
                                    ))
                                })?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

/// Prepares the guest memory of `bundle` (opened from `file`, which the VM
/// maps from when memory is restored lazily).
pub fn restored_memory(bundle: Bundle, file: File) -> Result<RestoredMemory, BundleError> {
    let image = bundle.memory_image()?;
    if MemoryPolicy::choose() == MemoryPolicy::Eager {
        let stored = image.extents.iter().map(|e| e.len).sum();
        let t = Instant::now();
        let ram = decode_into_ram(&bundle, &image)?;
        return Ok(RestoredMemory {
            source: MemorySource::Ram(ram),
            decoded_bytes: stored,
            lazy_bytes: 0,
            decode_ms: t.elapsed().as_millis() as u64,
        });
    }
    let (raw, decoded) = split(&image)?;
    if decoded.is_empty() {
        return Ok(RestoredMemory {
            source: MemorySource::Extents { file, extents: raw },
            decoded_bytes: 0,
            lazy_bytes: 0,
            decode_ms: 0,
        });
    }
    let lazy_bytes = decoded.iter().map(|e| e.len).sum();
    let source = FrameSource::new(bundle, image, &decoded)?;
    Ok(RestoredMemory {
        source: MemorySource::Lazy {
            file,
            extents: raw,
            lazy: std::sync::Arc::new(source),
        },
        decoded_bytes: 0,
        lazy_bytes,
        decode_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_snapshot::frames::MemoryCompression;
    use ferry_snapshot::manifest::{CpuInfo, DiskInfo, MemoryRegion};
    use ferry_snapshot::memory::{self as runs, RegionView};
    use ferry_snapshot::writer::FileBundle;
    use ferry_snapshot::{Manifest, SectionKind};

    /// Guest memory (text, noise, zeros) and a bundle holding it.
    fn bundle(dir: &std::path::Path) -> (Vec<u8>, std::path::PathBuf) {
        bundle_with(dir, &[])
    }

    /// [`bundle`], with `hot` as the prefetch set.
    fn bundle_with(dir: &std::path::Path, hot: &[(u64, u64)]) -> (Vec<u8>, std::path::PathBuf) {
        let mut mem = vec![0u8; 6 << 20];
        for (i, b) in mem[4096..(5 << 20) / 2].iter_mut().enumerate() {
            *b = b"restored memory "[i % 16];
        }
        let mut x = 1u32;
        for b in &mut mem[(3 << 20)..(4 << 20) + 12288] {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        mem[(5 << 20) + 100] = 7;
        let regions = [RegionView {
            guest_addr: 0,
            bytes: &mem,
            candidates: None,
        }];
        let found = runs::find_runs(&regions);
        let path = dir.join("m.snap");
        write_memory_bundle(&path, &mem, &found, hot, None);
        (mem, path)
    }

    /// Writes the `found` runs of `mem` into a bundle at `path` naming `parent`.
    fn write_memory_bundle(
        path: &std::path::Path,
        mem: &[u8],
        found: &[(u64, u64)],
        hot: &[(u64, u64)],
        parent: Option<ferry_snapshot::manifest::ParentRef>,
    ) {
        let regions = [RegionView {
            guest_addr: 0,
            bytes: mem,
            candidates: None,
        }];
        let (guard, mut w) = FileBundle::create(path).unwrap();
        let written = w
            .section(SectionKind::MemoryData, |s| {
                frames::write_frames(&regions, found, hot, false, s, MemoryCompression::Zstd(3))
            })
            .unwrap();
        w.section_bytes(
            SectionKind::MemoryExtents,
            &runs::encode_extents(&written.extents),
        )
        .unwrap();
        w.section_bytes(
            SectionKind::MemoryFrames,
            &frames::encode_frames(&written.frames),
        )
        .unwrap();
        let m = Manifest {
            format_version: 0,
            ferry_version: "t".into(),
            created_at: 0,
            arch: "x86_64".into(),
            cpu: CpuInfo::default(),
            vm_name: "m".into(),
            cpus: 1,
            memory_mib: 6,
            memory_regions: vec![MemoryRegion {
                guest_addr: 0,
                size: mem.len() as u64,
            }],
            memory_bytes: 0,
            memory_stored_bytes: written.stored_bytes,
            memory_prefetch_frames: written.prefetch.clone(),
            devices: vec![],
            disk: DiskInfo {
                size: 0,
                cluster_size: 65536,
                base_id: "0".repeat(64),
                base_clusters: 0,
                top_clusters: 0,
                thin: false,
                base_image: None,
                base_cache_path: None,
            },
            sections: vec![],
            parent,
        };
        let out = w.finish(m).unwrap();
        guard.commit(out).unwrap();
    }

    #[test]
    fn an_incremental_chain_lays_each_bundles_pages_over_its_parents() {
        use super::super::chain;
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let (mem, parent_path) = bundle(tmp.path());
        // Since the parent: a page rewritten, a page zeroed, a new page.
        let mut next = mem.clone();
        next[4096..8192].fill(0xAB);
        next[3 << 20..(3 << 20) + 4096].fill(0);
        next[(5 << 20) + 4096] = 9;
        let changed = runs::runs_of_pages(&[4096, 3 << 20, (5 << 20) + 4096]);
        let child = tmp.path().join("c.snap");
        let parent = ferry_snapshot::manifest::ParentRef {
            digest: chain::file_digest(&parent_path).unwrap(),
            file_name: "m.snap".into(),
        };
        write_memory_bundle(&child, &next, &changed, &[], Some(parent));
        let leaf = Bundle::open(&child).unwrap();
        let older = chain::ancestors(&child, &leaf, &[]).unwrap();
        assert_eq!(older.len(), 1);
        assert_eq!(older[0].0, parent_path);
        let stored_in_child = leaf
            .memory_image()
            .unwrap()
            .extents
            .iter()
            .map(|e| e.len)
            .sum::<u64>();
        assert_eq!(stored_in_child, 3 * 4096, "only the changed pages");
        let chain_bundles = vec![Bundle::open(&parent_path).unwrap(), leaf];
        let restored = restored_chain_memory(&chain_bundles).unwrap();
        let MemorySource::Ram(ram) = restored.source else {
            panic!("a chain is decoded into RAM");
        };
        let mut back = vec![0u8; next.len()];
        ram.read_exact_at(&mut back, 0).unwrap();
        assert!(back == next, "the chain's memory is not the newest state");

        // The parent moved away: missing, unless named.
        let moved = tmp.path().join("elsewhere.snap");
        std::fs::rename(&parent_path, &moved).unwrap();
        let leaf = Bundle::open(&child).unwrap();
        let err = chain::ancestors(&child, &leaf, &[]).unwrap_err();
        assert_eq!(crate::error::Coded::code(&err), "SNAPSHOT_PARENT_MISSING");
        assert_eq!(
            chain::ancestors(&child, &leaf, std::slice::from_ref(&moved))
                .unwrap()
                .len(),
            1
        );
        // Another file under the parent's name is not taken for it.
        std::fs::copy(&child, &parent_path).unwrap();
        let err = chain::ancestors(&child, &leaf, &[]).unwrap_err();
        assert!(err.to_string().contains("other content"), "{err}");
        let links = chain::describe(&child, &leaf);
        assert_eq!(links.len(), 1);
        assert!(links[0].found.is_none());
    }

    #[test]
    fn raw_pieces_and_lazily_decoded_chunks_rebuild_guest_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let (mem, path) = bundle(tmp.path());
        let b = Bundle::open(&path).unwrap();
        let image = b.memory_image().unwrap();
        assert!(image.is_compressed());
        let (raw, decoded) = split(&image).unwrap();
        assert!(!raw.is_empty(), "the noise is stored raw");
        let file_bytes = std::fs::read(&path).unwrap();
        let mut back = vec![0u8; mem.len()];
        for e in &raw {
            let (g, f) = (e.guest_addr as usize, e.file_offset as usize);
            back[g..g + e.len as usize].copy_from_slice(&file_bytes[f..f + e.len as usize]);
        }
        let source = FrameSource::new(b, image, &decoded).unwrap();
        // Every decoded page is found in its chunk, and chunks rebuild the rest.
        for e in &decoded {
            let c = source.chunk_of(e.guest_addr + e.len - 1).unwrap();
            assert!(source.pieces[c]
                .iter()
                .any(|&(g, _, l)| g <= e.guest_addr && e.guest_addr < g + l as u64));
        }
        assert_eq!(source.chunk_of(0), None, "a zero page belongs to no chunk");
        for c in 0..source.chunks() {
            let chunk = source.produce(c).unwrap();
            for &(g, off, len) in &chunk.pieces {
                back[g as usize..g as usize + len].copy_from_slice(&chunk.bytes[off..off + len]);
            }
        }
        assert!(back == mem, "rebuilt guest memory differs");
        let covered: u64 = source.ranges().iter().map(|r| r.1).sum();
        assert_eq!(covered, decoded.iter().map(|e| e.len).sum::<u64>());
    }

    #[test]
    fn the_prefetch_set_is_decoded_first_and_only_it() {
        let tmp = tempfile::tempdir().unwrap();
        // Two text pages and one noise page (stored raw: mapped, not decoded).
        let hot = [(8 * 4096, 2 * 4096), (3 << 20, 4096)];
        let (mem, path) = bundle_with(tmp.path(), &hot);
        let b = Bundle::open(&path).unwrap();
        let image = b.memory_image().unwrap();
        assert_eq!(image.prefetch.len(), 2, "{:?}", image.prefetch);
        let (_, decoded) = split(&image).unwrap();
        let source = FrameSource::new(b, image, &decoded).unwrap();
        let chunks = source.prefetch();
        assert_eq!(chunks.len(), 1, "the raw noise frame is no chunk");
        let chunk = source.produce(chunks[0]).unwrap();
        assert_eq!(chunk.pieces, vec![(8 * 4096, 0, 2 * 4096)]);
        assert_eq!(chunk.bytes, mem[8 * 4096..10 * 4096]);
    }

    #[test]
    fn eager_restore_decodes_every_frame_into_guest_ram() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let (mem, path) = bundle(tmp.path());
        let b = Bundle::open(&path).unwrap();
        let image = b.memory_image().unwrap();
        let ram = decode_into_ram(&b, &image).unwrap();
        assert_eq!(ram.metadata().unwrap().len(), mem.len() as u64);
        let mut back = vec![0u8; mem.len()];
        ram.read_exact_at(&mut back, 0).unwrap();
        assert!(back == mem, "decoded guest RAM differs");
    }

    #[test]
    fn memory_is_restored_lazily_where_userfaultfd_works() {
        if std::env::var_os("FERRY_RESTORE_MEMORY").is_some() {
            return;
        }
        let expected = if ferry_vmm::snapshot::lazy::available() {
            MemoryPolicy::Lazy
        } else {
            MemoryPolicy::Eager
        };
        assert_eq!(MemoryPolicy::choose(), expected);
    }
}
