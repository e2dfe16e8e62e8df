//! Chunks: bytes named by their SHA-256, stored zstd-compressed.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Remote, StoreError};

/// Guest memory and disks are cut at multiples of this (2 MiB: a huge page).
pub const CHUNK: u64 = 2 << 20;

/// Largest chunk a reader accepts, whatever a manifest says.
pub const MAX_CHUNK: u64 = 4 << 20;

/// A chunk and where its bytes go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Guest address (memory), disk offset (disk writes) or stream offset
    /// (disk base) of its first byte.
    pub at: u64,
    /// Its length once decoded.
    pub len: u64,
    /// SHA-256 of its decoded bytes: its name.
    pub sha256: String,
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The object name of the chunk with digest `sha`.
pub fn object_name(sha: &str) -> String {
    format!("chunks/{sha}")
}

/// What is uploaded for `bytes`.
pub fn encode(bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    zstd::bulk::compress(bytes, 3).map_err(StoreError::io("compress a chunk"))
}

/// Decodes a fetched chunk, refusing it unless it is exactly `len` bytes
/// whose SHA-256 is `sha`: nothing unchecked reaches a VM.
pub fn decode(stored: &[u8], sha: &str, len: u64) -> Result<Vec<u8>, StoreError> {
    if len > MAX_CHUNK {
        return Err(StoreError::Corrupt(format!(
            "chunk {sha} claims {len} bytes, more than {MAX_CHUNK}"
        )));
    }
    let bytes = zstd::bulk::decompress(stored, len as usize)
        .map_err(|e| StoreError::Corrupt(format!("chunk {sha} does not decode: {e}")))?;
    if bytes.len() as u64 != len {
        return Err(StoreError::Corrupt(format!(
            "chunk {sha} holds {} bytes, {len} expected",
            bytes.len()
        )));
    }
    let found = digest(&bytes);
    if found != sha {
        return Err(StoreError::Corrupt(format!(
            "chunk {sha} holds bytes whose SHA-256 is {found}"
        )));
    }
    Ok(bytes)
}

/// Fetches the chunks `refs` from `remote` in one parallel batch and checks
/// each, in order, before handing it to `each` with its index in `refs`, its
/// stored bytes and its decoded bytes. A chunk the store lacks is corrupt: a
/// manifest named it.
pub(crate) fn fetch_verified(
    remote: &Remote,
    refs: &[&ChunkRef],
    mut each: impl FnMut(usize, Vec<u8>, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let names: Vec<String> = refs.iter().map(|c| object_name(&c.sha256)).collect();
    let stored = remote.get_all(&names).map_err(|e| match e {
        StoreError::NotFound(what) => {
            StoreError::Corrupt(format!("a chunk the manifest names is missing: {what}"))
        }
        other => other,
    })?;
    for (i, (c, s)) in refs.iter().zip(stored).enumerate() {
        let bytes = decode(&s, &c.sha256, c.len)?;
        each(i, s, bytes)?;
    }
    Ok(())
}

/// Reads a disk-writes chunk of the window at `window`: its records (u64
/// offset, u32 length, bytes; little endian), each a whole cluster inside
/// that window and the disk, in increasing order; anything else is corrupt.
pub fn disk_records(
    bytes: &[u8],
    window: u64,
    disk_size: u64,
    cluster_size: u64,
) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let bad = |why: &str| StoreError::Corrupt(format!("disk chunk at {window}: {why}"));
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(bad("a record is cut short"));
        }
        let off = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let len = u64::from(u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")));
        rest = &rest[12..];
        let fits = off % cluster_size.max(1) == 0
            && off / CHUNK * CHUNK == window
            && len > 0
            && len <= cluster_size
            && off + len <= disk_size
            && len as usize <= rest.len()
            && out.last().is_none_or(|(prev, _)| *prev < off);
        if !fits {
            return Err(bad("a cluster is out of place"));
        }
        out.push((off, rest[..len as usize].to_vec()));
        rest = &rest[len as usize..];
    }
    Ok(out)
}

/// The window of the disk that the clusters of one piece of a framed image
/// all lie in (None: it holds none, only the image's end mark); None when
/// they span windows, or an empty piece does not end the image.
pub(crate) fn piece_window(
    clusters: &ferry_snapshot::disk::Clusters,
    ended: bool,
) -> Option<Option<u64>> {
    let window = clusters.first().map(|(at, _)| at / CHUNK * CHUNK);
    let one = clusters
        .iter()
        .all(|(at, _)| Some(at / CHUNK * CHUNK) == window);
    (one && (window.is_some() || ended)).then_some(window)
}

/// Reads a piece of a disk image framed by window: exactly one zstd frame,
/// whose clusters all lie in the window at `window` (none when `window` is
/// None) and inside the disk. Returns them, and whether the image ends there.
pub fn base_records(
    bytes: &[u8],
    window: Option<u64>,
    disk_size: u64,
    cluster_size: u64,
) -> Result<(ferry_snapshot::disk::Clusters, bool), StoreError> {
    let bad = |why: String| StoreError::Corrupt(format!("disk image piece: {why}"));
    if ferry_snapshot::disk::frame_len(bytes) != Some(bytes.len()) {
        return Err(bad("not one whole frame".into()));
    }
    let (clusters, ended) = ferry_snapshot::disk::read_frame(bytes, cluster_size, disk_size)
        .map_err(|e| bad(e.to_string()))?;
    if piece_window(&clusters, ended) != Some(window) {
        return Err(bad(format!(
            "its clusters are not those of the window at {window:?}"
        )));
    }
    Ok((clusters, ended))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_decodes_only_to_the_bytes_it_is_named_after() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sha = digest(&bytes);
        let stored = encode(&bytes).unwrap();
        assert!(stored.len() < bytes.len());
        assert_eq!(decode(&stored, &sha, bytes.len() as u64).unwrap(), bytes);
        let other = encode(&bytes[1..]).unwrap();
        assert_eq!(
            decode(&other, &sha, bytes.len() as u64 - 1)
                .unwrap_err()
                .code(),
            "BUNDLE_CORRUPT"
        );
        assert_eq!(
            decode(&stored, &sha, 10).unwrap_err().code(),
            "BUNDLE_CORRUPT"
        );
        assert_eq!(
            decode(b"garbage", &sha, 10).unwrap_err().code(),
            "BUNDLE_CORRUPT"
        );
        assert_eq!(
            decode(&stored, &sha, MAX_CHUNK + 1).unwrap_err().code(),
            "BUNDLE_CORRUPT"
        );
    }
}
