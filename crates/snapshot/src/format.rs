//! Fixed parts of the bundle layout.

use serde::{Deserialize, Serialize};

/// First bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"FERRYSNP";
/// First bytes of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"FERRYEND";
/// Format version this build writes; it reads this and every older one.
pub const FORMAT_VERSION: u32 = 3;
/// Alignment of the header and every section payload.
pub const ALIGN: u64 = 4096;
/// Size of the trailer at the end of the file.
pub const TRAILER_LEN: u64 = 64;
/// Largest manifest a reader accepts.
pub const MAX_MANIFEST_LEN: u64 = 16 << 20;

/// What a section holds. Stored by name in the manifest so new kinds can be
/// added without renumbering; readers ignore kinds they do not need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SectionKind {
    /// The VMM's machine state (vCPUs, irqchip, clock, devices), JSON.
    VmState,
    /// Guest memory pages that are not zero: uncompressed and page aligned
    /// (version 1), or frames as described by `MemoryFrames` (version 2).
    MemoryData,
    /// Where each run of `MemoryData` goes in guest memory.
    MemoryExtents,
    /// The disk image below the VM's own writes (zstd cluster stream).
    DiskBase,
    /// The VM's own disk writes (zstd cluster stream).
    DiskTop,
    /// The VM's ferry record (name, image, command, ports), JSON.
    Record,
    /// The frame table of `MemoryData` (see [`crate::frames`]).
    MemoryFrames,
}

/// Rounds up to [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// The file header block.
pub fn header() -> Vec<u8> {
    let mut h = vec![0u8; ALIGN as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// The trailer fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Format version.
    pub version: u32,
    /// Where the manifest starts.
    pub manifest_offset: u64,
    /// Manifest length.
    pub manifest_len: u64,
    /// xxh3 of the manifest bytes.
    pub manifest_checksum: u64,
    /// Total file length, trailer included.
    pub file_len: u64,
}

impl Trailer {
    /// Encodes the trailer.
    pub fn encode(&self) -> [u8; TRAILER_LEN as usize] {
        let mut t = [0u8; TRAILER_LEN as usize];
        t[..8].copy_from_slice(&TRAILER_MAGIC);
        t[8..12].copy_from_slice(&self.version.to_le_bytes());
        t[16..24].copy_from_slice(&self.manifest_offset.to_le_bytes());
        t[24..32].copy_from_slice(&self.manifest_len.to_le_bytes());
        t[32..40].copy_from_slice(&self.manifest_checksum.to_le_bytes());
        t[40..48].copy_from_slice(&self.file_len.to_le_bytes());
        t
    }

    /// Decodes a trailer; None if its magic is wrong.
    pub fn decode(t: &[u8; TRAILER_LEN as usize]) -> Option<Trailer> {
        if t[..8] != TRAILER_MAGIC {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(t[i..i + 8].try_into().expect("8 bytes"));
        Some(Trailer {
            version: u32::from_le_bytes(t[8..12].try_into().expect("4 bytes")),
            manifest_offset: u64_at(16),
            manifest_len: u64_at(24),
            manifest_checksum: u64_at(32),
            file_len: u64_at(40),
        })
    }
}

/// Checksum used for sections and the manifest: fast, for integrity, not secrecy.
pub fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}
