//! Disks in a bundle: a zstd stream of the clusters that are not all zero.
//!
//! Record: u64 cluster index, u32 length (the cluster size, shorter only for the
//! last cluster of the disk), then the bytes. The stream ends with index u64::MAX.

use std::io::{Read, Write};

use crate::manifest::{MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE};
use crate::BundleError;

const END: u64 = u64::MAX;

/// Writes clusters produced by `next` (index, bytes) as a compressed stream,
/// skipping all-zero ones. Returns how many were stored.
pub fn write_clusters<W: Write>(
    out: W,
    mut next: impl FnMut() -> std::io::Result<Option<(u64, Vec<u8>)>>,
) -> std::io::Result<u64> {
    let mut enc = zstd::stream::write::Encoder::new(out, 3)?;
    let mut stored = 0;
    while let Some((index, bytes)) = next()? {
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        enc.write_all(&index.to_le_bytes())?;
        enc.write_all(&(bytes.len() as u32).to_le_bytes())?;
        enc.write_all(&bytes)?;
        stored += 1;
    }
    enc.write_all(&END.to_le_bytes())?;
    enc.finish()?;
    Ok(stored)
}

/// Reads a cluster stream, calling `apply(index, bytes)` for each cluster after
/// checking its index is below `max_clusters`, its length at most `cluster_size`,
/// and that indexes increase. `cluster_size` must be a power of two from
/// [`MIN_CLUSTER_SIZE`] to [`MAX_CLUSTER_SIZE`] (it sizes the buffer).
///
/// [`read_clusters_within`] also keeps every cluster inside the disk's size.
pub fn read_clusters(
    input: impl Read,
    cluster_size: u64,
    max_clusters: u64,
    apply: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, BundleError> {
    read(input, cluster_size, max_clusters, None, apply)
}

/// Reads the cluster stream of a disk of `disk_size` bytes, calling
/// `apply(byte offset, bytes)` for each cluster after checking it lies wholly
/// inside the disk (a short cluster only at its end), its length is at most
/// `cluster_size`, and that indexes increase. Returns how many were read.
pub fn read_clusters_within(
    input: impl Read,
    cluster_size: u64,
    disk_size: u64,
    mut apply: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, BundleError> {
    let max = disk_size.div_ceil(cluster_size.max(1));
    read(input, cluster_size, max, Some(disk_size), |index, bytes| {
        apply(index * cluster_size, bytes)
    })
}

fn read(
    input: impl Read,
    cluster_size: u64,
    max_clusters: u64,
    disk_size: Option<u64>,
    mut apply: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, BundleError> {
    let bad = |why: String| BundleError::Corrupt(format!("disk stream: {why}"));
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
    {
        return Err(BundleError::BadManifest(format!(
            "disk cluster size {cluster_size} is not a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}"
        )));
    }
    let mut dec = zstd::stream::read::Decoder::new(input).map_err(|e| bad(e.to_string()))?;
    let mut buf = vec![0u8; cluster_size as usize];
    let mut count = 0;
    let mut last: Option<u64> = None;
    loop {
        let mut word = [0u8; 8];
        dec.read_exact(&mut word).map_err(|e| bad(e.to_string()))?;
        let index = u64::from_le_bytes(word);
        if index == END {
            return Ok(count);
        }
        let mut len = [0u8; 4];
        dec.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
        let len = u32::from_le_bytes(len) as u64;
        // index < max_clusters <= 2^64 / MIN_CLUSTER_SIZE for a bounded disk,
        // so the byte offset cannot overflow there.
        let past_end = disk_size.is_some_and(|size| {
            index
                .checked_mul(cluster_size)
                .and_then(|at| at.checked_add(len))
                .is_none_or(|end| end > size)
        });
        if index >= max_clusters
            || len == 0
            || len > cluster_size
            || past_end
            || last.is_some_and(|l| index <= l)
        {
            return Err(bad(format!("bad cluster record {index}")));
        }
        dec.read_exact(&mut buf[..len as usize])
            .map_err(|e| bad(e.to_string()))?;
        apply(index, &buf[..len as usize]).map_err(BundleError::io("write disk cluster"))?;
        last = Some(index);
        count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_clusters_are_skipped_and_the_rest_round_trip() {
        let clusters = vec![
            (0u64, vec![1u8; 512]),
            (1, vec![0u8; 512]),
            (7, vec![7u8; 100]),
        ];
        let mut it = clusters.clone().into_iter();
        let mut stream = Vec::new();
        let stored = write_clusters(&mut stream, || Ok(it.next())).unwrap();
        assert_eq!(stored, 2);
        let mut got = Vec::new();
        read_clusters(&stream[..], 512, 8, |i, b| {
            got.push((i, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![clusters[0].clone(), clusters[2].clone()]);
        // Indexes beyond the disk are refused.
        assert!(read_clusters(&stream[..], 512, 5, |_, _| Ok(())).is_err());
        // A cut stream is an error, not a hang or a panic.
        assert!(read_clusters(&stream[..stream.len() / 2], 512, 8, |_, _| Ok(())).is_err());
    }
}
