//! Guest memory from a bundle, for a restoring VMM process. Raw frames are
//! mapped straight from the bundle file (read on first touch); compressed
//! frames are decoded up front, in parallel, into a sealed memfd that is
//! mapped the same way, copy-on-write.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ferry_snapshot::frames::{self, FrameEncoding, MemoryFrame};
use ferry_snapshot::reader::MemoryImage;
use ferry_snapshot::{Bundle, BundleError};
use ferry_vmm::snapshot::{LayerDesc, MemoryLayersDesc};
use ferry_vmm::{Extent, MemoryLayers, MemorySource};

/// Where a restored VM's memory comes from, and what preparing it cost.
#[derive(Debug)]
pub struct RestoredMemory {
    /// Hand to the VMM.
    pub source: MemorySource,
    /// Bytes decoded before the guest ran.
    pub decoded_bytes: u64,
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
/// bundle file, pieces in compressed frames into the decoded stream (file
/// offset = logical offset).
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
                FrameEncoding::Zstd => push(
                    &mut decoded,
                    Extent {
                        guest_addr,
                        len,
                        file_offset: at,
                    },
                ),
            }
            at = piece_end;
        }
    }
    Ok((raw, decoded))
}

/// Decodes `frames` into `out` at their logical offsets, on every core.
fn decode_all(
    bundle: &Bundle,
    image: &MemoryImage,
    frames: &[&MemoryFrame],
    out: &File,
) -> Result<(), BundleError> {
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(frames.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<(), BundleError> {
                    let mut buf = Vec::new();
                    while let Some(f) = frames.get(next.fetch_add(1, Ordering::Relaxed)) {
                        buf.resize(f.len as usize, 0);
                        bundle.read_frame(image, f, &mut buf)?;
                        out.write_all_at(&buf, f.offset)
                            .map_err(BundleError::io("write decoded memory"))?;
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
/// maps from).
pub fn restored_memory(bundle: &Bundle, file: File) -> Result<RestoredMemory, BundleError> {
    let image = bundle.memory_image()?;
    let (raw, decoded) = split(&image)?;
    let compressed: Vec<&MemoryFrame> = image
        .frames
        .iter()
        .filter(|f| f.encoding != FrameEncoding::Raw)
        .collect();
    if compressed.is_empty() {
        return Ok(RestoredMemory {
            source: MemorySource::Extents { file, extents: raw },
            decoded_bytes: 0,
            decode_ms: 0,
        });
    }
    let t = Instant::now();
    let io = BundleError::io("prepare decoded memory");
    let memfd = ferry_vmm::snapshot::new_sealable_memfd("ferry-restored-memory").map_err(io)?;
    let logical = image.frames.last().map_or(0, |f| f.offset + f.len);
    memfd
        .set_len(logical)
        .map_err(BundleError::io("size decoded memory"))?;
    decode_all(bundle, &image, &compressed, &memfd)?;
    // Immutable from here on, like every other memory layer (forks share it).
    ferry_vmm::snapshot::seal(&memfd).map_err(BundleError::io("seal decoded memory"))?;
    let desc = MemoryLayersDesc {
        layers: vec![
            LayerDesc {
                fd: -1,
                extents: raw,
            },
            LayerDesc {
                fd: -1,
                extents: decoded,
            },
        ],
    };
    let layers = MemoryLayers::from_files(vec![file, memfd], &desc)
        .map_err(|e| BundleError::Corrupt(format!("memory layers: {e}")))?;
    Ok(RestoredMemory {
        source: MemorySource::Layers(layers),
        decoded_bytes: compressed.iter().map(|f| f.len).sum(),
        decode_ms: t.elapsed().as_millis() as u64,
    })
}
