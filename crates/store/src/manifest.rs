//! The description of one pushed VM: which chunks make it up.

use serde::{Deserialize, Serialize};

pub use crate::chunk::ChunkRef;
use crate::chunk::{CHUNK, MAX_CHUNK};
use crate::location::is_digest;
use crate::StoreError;

/// Names this format in every manifest.
pub const FORMAT: &str = "ferry-store";
/// Version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest a reader accepts.
pub const MAX_MANIFEST: usize = 64 << 20;

/// The disk image below the VM's writes, as pieces of its encoded stream
/// (kept byte for byte: its SHA-256 is the image's content id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// Length of the encoded stream.
    pub len: u64,
    /// Its pieces, in order.
    pub pieces: Vec<ChunkRef>,
    /// When the stream is one zstd frame per 2 MiB window of the disk and
    /// each piece one frame: the window each piece holds (None: the end mark
    /// alone). A restore then fetches the image window by window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<Option<u64>>>,
}

/// One pushed VM. Its digest (the SHA-256 of its JSON bytes, which include
/// the format and its version) is how it is named and fetched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreManifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// The bundle's own description (its section table empty): CPU, memory
    /// layout, devices, disk.
    pub bundle: ferry_snapshot::Manifest,
    /// The VM's record (name, image, command, ports), one chunk.
    pub record: ChunkRef,
    /// The machine state, one chunk.
    pub state: ChunkRef,
    /// Guest memory, by guest address; absent chunks are all zero.
    pub memory: Vec<ChunkRef>,
    /// Whether the bundle compressed memory (a pulled bundle does too).
    pub memory_compressed: bool,
    /// Guest ranges (address, length) the guest touches first after a restore.
    pub prefetch: Vec<(u64, u64)>,
    /// Whether the bundle kept that set uncompressed.
    pub prefetch_raw: bool,
    /// The disk image, when the bundle carried it (not thin).
    pub disk_base: Option<BaseRef>,
    /// The VM's own disk writes, by 2 MiB window of the disk: each chunk is
    /// its clusters as records (u64 offset, u32 length, bytes; little endian).
    pub disk_top: Vec<ChunkRef>,
}

impl StoreManifest {
    /// The bytes stored and the digest naming them.
    pub fn encode(&self) -> (Vec<u8>, String) {
        let bytes = serde_json::to_vec(self).expect("manifest serializes");
        let digest = crate::chunk::digest(&bytes);
        (bytes, digest)
    }

    /// The object name of the manifest with `digest`.
    pub fn object_name(digest: &str) -> String {
        format!("manifests/{digest}")
    }

    /// Every chunk it refers to.
    pub fn chunks(&self) -> impl Iterator<Item = &ChunkRef> {
        [&self.record, &self.state]
            .into_iter()
            .chain(&self.memory)
            .chain(self.disk_base.iter().flat_map(|b| &b.pieces))
            .chain(&self.disk_top)
    }

    /// Parses fetched bytes, checking they are what `digest` names and that
    /// everything in them is in bounds, before anything else reads them.
    pub fn decode(bytes: &[u8], digest: &str) -> Result<StoreManifest, StoreError> {
        if bytes.len() > MAX_MANIFEST {
            return Err(StoreError::Corrupt(format!(
                "manifest {digest} is {} bytes, more than {MAX_MANIFEST}",
                bytes.len()
            )));
        }
        let found = crate::chunk::digest(bytes);
        if found != digest {
            return Err(StoreError::Corrupt(format!(
                "manifest {digest} holds bytes whose SHA-256 is {found}"
            )));
        }
        let m: StoreManifest = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt(format!("manifest {digest} is not one: {e}")))?;
        if m.format != FORMAT {
            return Err(StoreError::Corrupt(format!(
                "manifest {digest} is not a {FORMAT} manifest"
            )));
        }
        if m.format_version > FORMAT_VERSION {
            return Err(StoreError::Unsupported(format!(
                "manifest {digest} is format version {}, this ferry reads up to {FORMAT_VERSION}: use a newer ferry",
                m.format_version
            )));
        }
        m.validate()
            .map_err(|why| StoreError::Corrupt(format!("manifest {digest}: {why}")))?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        let refs_ok = self
            .chunks()
            .all(|c| is_digest(&c.sha256) && c.len <= MAX_CHUNK);
        if !refs_ok {
            return Err("a chunk reference is malformed or too long".into());
        }
        let regions: Vec<(u64, u64)> = self
            .bundle
            .memory_regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        let ram: u64 = regions.iter().map(|r| r.1).sum();
        if ram > u64::from(self.bundle.memory_mib) << 20 || regions.is_empty() {
            return Err("its memory regions do not match its RAM size".into());
        }
        // Memory chunks: increasing, each inside one region, within one
        // 2 MiB window: no chunk can write outside guest RAM or twice.
        let mut end = 0u64;
        for c in &self.memory {
            let inside = regions
                .iter()
                .any(|&(a, l)| c.at >= a && c.at.checked_add(c.len).is_some_and(|e| e <= a + l));
            let one_window =
                c.len > 0 && c.len <= CHUNK && c.at / CHUNK == (c.at + c.len - 1) / CHUNK;
            if !inside || !one_window || c.at < end || c.at % 4096 != 0 || c.len % 4096 != 0 {
                return Err(format!("memory chunk at {:#x} is out of place", c.at));
            }
            end = c.at + c.len;
        }
        for &(a, l) in &self.prefetch {
            let inside = regions
                .iter()
                .any(|&(ra, rl)| a >= ra && a.checked_add(l).is_some_and(|e| e <= ra + rl));
            if !inside || a % 4096 != 0 || l % 4096 != 0 {
                return Err(format!("prefetch range at {a:#x} is outside guest RAM"));
            }
        }
        let size = self.bundle.disk.size;
        let mut end = 0u64;
        for c in &self.disk_top {
            if c.at % CHUNK != 0 || c.at < end || c.at >= size {
                return Err(format!("disk chunk at {} is out of place", c.at));
            }
            end = c.at + CHUNK;
        }
        if let Some(base) = &self.disk_base {
            let mut at = 0u64;
            for p in &base.pieces {
                if p.at != at || p.len == 0 {
                    return Err("the disk image's pieces do not follow each other".into());
                }
                at += p.len;
            }
            if at != base.len {
                return Err("the disk image's pieces do not add up to it".into());
            }
            if let Some(windows) = &base.windows {
                if windows.len() != base.pieces.len() {
                    return Err("the disk image's windows do not match its pieces".into());
                }
                let mut next = 0u64;
                for (i, w) in windows.iter().enumerate() {
                    let in_place = match w {
                        Some(w) => w % CHUNK == 0 && *w >= next && *w < size,
                        None => i + 1 == windows.len(),
                    };
                    if !in_place {
                        return Err(format!("the disk image's window {i} is out of place"));
                    }
                    next = w.map_or(next, |w| w + CHUNK);
                }
            }
        } else if !self.bundle.disk.thin {
            return Err("a full bundle's disk image is missing".into());
        }
        Ok(())
    }
}
