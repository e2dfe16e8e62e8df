//! Reading bundles: every offset and length is checked before use.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{self, Trailer, ALIGN, FORMAT_VERSION, MAGIC, MAX_MANIFEST_LEN, TRAILER_LEN};
use crate::frames::{self, FrameEncoding, MemoryFrame};
use crate::manifest::{Manifest, SectionEntry};
use crate::memory::{self, MemoryExtent};
use crate::{BundleError, SectionKind};

/// Largest non-memory, non-disk section read into memory.
const MAX_SMALL_SECTION: u64 = 256 << 20;

/// Guest memory as a bundle stores it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImage {
    /// File offset of the `MemoryData` payload.
    pub data_offset: u64,
    /// Where each run of the logical stream goes in guest memory.
    pub extents: Vec<MemoryExtent>,
    /// The frames of the logical stream. A version 1 bundle has one raw frame
    /// covering the whole payload.
    pub frames: Vec<MemoryFrame>,
    /// Indexes into `frames` of the prefetch set (increasing), see
    /// [`crate::Manifest::memory_prefetch_frames`].
    pub prefetch: Vec<usize>,
}

impl MemoryImage {
    /// Whether any frame must be decoded (not just mapped).
    pub fn is_compressed(&self) -> bool {
        self.frames.iter().any(|f| f.encoding != FrameEncoding::Raw)
    }
}

/// An opened, structurally valid bundle.
#[derive(Debug)]
pub struct Bundle {
    file: File,
    path: PathBuf,
    len: u64,
    manifest: Manifest,
}

impl Bundle {
    /// Opens `path` and checks header, trailer, manifest and section bounds.
    /// Section contents are checked by [`Bundle::verify`].
    pub fn open(path: &Path) -> Result<Bundle, BundleError> {
        let mut file =
            File::open(path).map_err(BundleError::io(format!("open {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(BundleError::io("stat bundle"))?
            .len();
        let mut head = [0u8; 12];
        if len < 12 {
            return Err(if len == 0 {
                BundleError::Truncated("empty file".into())
            } else {
                BundleError::NotABundle
            });
        }
        file.read_exact(&mut head)
            .map_err(BundleError::io("read header"))?;
        if head[..8] != MAGIC {
            return Err(BundleError::NotABundle);
        }
        let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        if version > FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if len < ALIGN + TRAILER_LEN {
            return Err(BundleError::Truncated(format!("only {len} bytes")));
        }
        let mut t = [0u8; TRAILER_LEN as usize];
        file.seek(SeekFrom::Start(len - TRAILER_LEN))
            .and_then(|_| file.read_exact(&mut t))
            .map_err(BundleError::io("read trailer"))?;
        let trailer = Trailer::decode(&t)
            .ok_or_else(|| BundleError::Truncated("the end-of-bundle marker is missing".into()))?;
        if trailer.file_len != len {
            return Err(if trailer.file_len > len {
                BundleError::Truncated(format!("{} of {} bytes", len, trailer.file_len))
            } else {
                BundleError::Corrupt(format!(
                    "trailer says {} bytes, file has {len}",
                    trailer.file_len
                ))
            });
        }
        if trailer.version != version {
            return Err(BundleError::Corrupt(
                "header and trailer versions differ".into(),
            ));
        }
        let end = trailer
            .manifest_offset
            .checked_add(trailer.manifest_len)
            .filter(|&e| e == len - TRAILER_LEN)
            .ok_or_else(|| BundleError::Corrupt("manifest position".into()))?;
        if trailer.manifest_len > MAX_MANIFEST_LEN || trailer.manifest_offset < ALIGN {
            return Err(BundleError::Corrupt("manifest size".into()));
        }
        let mut json = vec![0u8; (end - trailer.manifest_offset) as usize];
        file.read_exact_at(&mut json, trailer.manifest_offset)
            .map_err(BundleError::io("read manifest"))?;
        if format::checksum(&json) != trailer.manifest_checksum {
            return Err(BundleError::Corrupt("manifest checksum mismatch".into()));
        }
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|e| BundleError::BadManifest(e.to_string()))?;
        if manifest.format_version > FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion {
                found: manifest.format_version,
                supported: FORMAT_VERSION,
            });
        }
        check_sections(&manifest.sections, trailer.manifest_offset)?;
        manifest.validate()?;
        Ok(Bundle {
            file,
            path: path.to_path_buf(),
            len,
            manifest,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The bundle file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for mapping memory).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Total size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a valid bundle has at least a header and trailer.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The section of `kind`, or a manifest error if missing.
    pub fn entry(&self, kind: SectionKind) -> Result<&SectionEntry, BundleError> {
        self.manifest
            .section(kind)
            .ok_or_else(|| BundleError::BadManifest(format!("no {kind:?} section")))
    }

    /// Reads a small section whole.
    pub fn read_section(&self, kind: SectionKind) -> Result<Vec<u8>, BundleError> {
        let e = self.entry(kind)?;
        if e.length > MAX_SMALL_SECTION {
            return Err(BundleError::BadManifest(format!(
                "{kind:?} section too large"
            )));
        }
        let mut buf = vec![0u8; e.length as usize];
        self.file
            .read_exact_at(&mut buf, e.offset)
            .map_err(BundleError::io(format!("read {kind:?}")))?;
        if format::checksum(&buf) != e.checksum {
            return Err(BundleError::Corrupt(format!("{kind:?} checksum mismatch")));
        }
        Ok(buf)
    }

    /// Checks the manifest's memory layout against the guest RAM size the VM
    /// state gives (`VmState::memory_bytes()` on the restore path): the
    /// regions must add up to exactly `guest_ram_bytes`. [`Bundle::open`]
    /// already checked them against the manifest's own `memory_mib`; this
    /// catches a VM state that disagrees with its manifest, before any guest
    /// memory is prepared.
    pub fn check_memory_layout(&self, guest_ram_bytes: u64) -> Result<(), BundleError> {
        crate::manifest::check_regions(&self.manifest.memory_regions, guest_ram_bytes)
    }

    /// The guest memory layout: extents and frames, checked against the
    /// manifest's memory regions and the payload. Nothing is decoded here; the
    /// frames returned decode to at most [`frames::MAX_FRAME_LEN`] bytes each
    /// and, together, to no more than the guest's RAM.
    pub fn memory_image(&self) -> Result<MemoryImage, BundleError> {
        let data = self.entry(SectionKind::MemoryData)?;
        let regions: Vec<(u64, u64)> = self
            .manifest
            .memory_regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        let ram = self.manifest.ram_bytes();
        let raw_extents = self.read_section(SectionKind::MemoryExtents)?;
        let (extents, frames) = match self.manifest.section(SectionKind::MemoryFrames) {
            Some(_) => {
                // Extents point into the decoded stream, whose length the frames
                // give; the extents lie in disjoint regions of guest RAM, so that
                // stream is never longer than the RAM.
                let extents = memory::decode_extents(&raw_extents, &regions, ram)?;
                let logical = extents.last().map_or(0, |e| e.data_offset + e.len);
                if logical > ram {
                    return Err(BundleError::BadManifest(format!(
                        "memory extents hold {logical} bytes, the guest has {ram}"
                    )));
                }
                let table = self.read_section(SectionKind::MemoryFrames)?;
                let frames = frames::decode_frames(&table, data.length, logical)?;
                (extents, frames)
            }
            None => {
                let extents = memory::decode_extents(&raw_extents, &regions, data.length)?;
                let whole = MemoryFrame {
                    offset: 0,
                    len: data.length,
                    stored_offset: 0,
                    stored_len: data.length,
                    encoding: FrameEncoding::Raw,
                    checksum: data.checksum,
                };
                (
                    extents,
                    (data.length > 0).then_some(whole).into_iter().collect(),
                )
            }
        };
        let prefetch = &self.manifest.memory_prefetch_frames;
        frames::check_prefetch(prefetch, frames.len())?;
        Ok(MemoryImage {
            data_offset: data.offset,
            extents,
            prefetch: prefetch.iter().map(|&i| i as usize).collect(),
            frames,
        })
    }

    /// Reads and decodes one frame into `out` (`frame.len` bytes), checking
    /// its checksum: random access to guest memory without reading the rest.
    ///
    /// The frame's shape is checked before anything is allocated or read: its
    /// decoded length at most [`frames::MAX_FRAME_LEN`] and equal to
    /// `out.len()`, its stored bytes no more than that length can compress to
    /// and inside the `MemoryData` section.
    pub fn read_frame(
        &self,
        image: &MemoryImage,
        frame: &MemoryFrame,
        out: &mut [u8],
    ) -> Result<(), BundleError> {
        frames::check_frame(frame)?;
        let data = self.entry(SectionKind::MemoryData)?;
        let inside = frame
            .stored_offset
            .checked_add(frame.stored_len)
            .is_some_and(|end| end <= data.length)
            && image.data_offset == data.offset;
        if !inside || out.len() as u64 != frame.len {
            return Err(BundleError::BadManifest(format!(
                "memory frame at offset {} lies outside the memory data or does not fit its buffer",
                frame.offset
            )));
        }
        let mut stored = vec![0u8; frame.stored_len as usize];
        self.file
            .read_exact_at(&mut stored, data.offset + frame.stored_offset)
            .map_err(BundleError::io("read memory frame"))?;
        frames::decode_frame(frame, &stored, out)
    }

    /// Reads the disk stream of `kind` ([`SectionKind::DiskBase`] or
    /// [`SectionKind::DiskTop`]), calling `apply(byte offset in the disk,
    /// bytes)` for each stored cluster. Every cluster is checked to lie inside
    /// the manifest's `disk.size` before `apply` sees it, and the number of
    /// clusters must be the one the manifest records. Returns that number.
    ///
    /// The section's checksum is checked by [`Bundle::verify`], not here.
    pub fn read_disk(
        &self,
        kind: SectionKind,
        apply: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> Result<u64, BundleError> {
        let info = &self.manifest.disk;
        let expected = match kind {
            SectionKind::DiskBase => info.base_clusters,
            SectionKind::DiskTop => info.top_clusters,
            other => {
                return Err(BundleError::BadManifest(format!(
                    "{other:?} is not a disk section"
                )))
            }
        };
        let n = crate::disk::read_clusters_within(
            self.section_reader(kind)?,
            info.cluster_size,
            info.size,
            apply,
        )?;
        if n != expected {
            return Err(BundleError::Corrupt(format!(
                "{kind:?} holds {n} clusters, the manifest says {expected}"
            )));
        }
        Ok(n)
    }

    /// A reader over a section's payload (checked by [`Bundle::verify`], not here).
    pub fn section_reader(&self, kind: SectionKind) -> Result<impl Read + '_, BundleError> {
        let e = self.entry(kind)?;
        Ok(SectionReader {
            file: &self.file,
            pos: e.offset,
            end: e.offset + e.length,
        })
    }

    /// Checks every section's checksum. Reads the whole file once (page cache, not
    /// guest memory).
    pub fn verify(&self) -> Result<(), BundleError> {
        let mut buf = vec![0u8; 1 << 20];
        for e in &self.manifest.sections {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            let mut pos = e.offset;
            let end = e.offset + e.length;
            while pos < end {
                let n = ((end - pos) as usize).min(buf.len());
                self.file
                    .read_exact_at(&mut buf[..n], pos)
                    .map_err(BundleError::io("read section"))?;
                h.update(&buf[..n]);
                pos += n as u64;
            }
            if h.digest() != e.checksum {
                return Err(BundleError::Corrupt(format!(
                    "{:?} checksum mismatch",
                    e.kind
                )));
            }
        }
        Ok(())
    }
}

struct SectionReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SectionReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = ((self.end - self.pos) as usize).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn check_sections(sections: &[SectionEntry], limit: u64) -> Result<(), BundleError> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for s in sections {
        let end = s
            .offset
            .checked_add(s.length)
            .ok_or_else(|| BundleError::Corrupt(format!("{:?} length overflows", s.kind)))?;
        if !s.offset.is_multiple_of(ALIGN) || s.offset < ALIGN || end > limit {
            return Err(BundleError::Corrupt(format!(
                "{:?} lies outside the bundle",
                s.kind
            )));
        }
        spans.push((s.offset, end));
    }
    spans.sort();
    if spans.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(BundleError::Corrupt("sections overlap".into()));
    }
    Ok(())
}
