//! Disks in a bundle: a zstd stream of the clusters that are not all zero.
//!
//! Record: u64 cluster index, u32 length (the cluster size, shorter only for the
//! last cluster of the disk), then the bytes. The stream ends with index u64::MAX.
//!
//! A disk image's stream ([`write_clusters_framed`]) is one zstd frame per
//! [`FRAME_SPAN`] of the disk, so each piece can be decoded on its own (a
//! store fetches the image window by window); it reads like any other.

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

/// Bytes of disk each frame of a framed stream covers (2 MiB: the windows a
/// store fetches).
pub const FRAME_SPAN: u64 = 2 << 20;

/// Clusters as `(disk offset, bytes)`.
pub type Clusters = Vec<(u64, Vec<u8>)>;

/// Compression level of every disk stream.
const LEVEL: i32 = 3;

/// [`write_clusters`] as one zstd frame per [`FRAME_SPAN`] of the disk
/// (clusters of `cluster_size` bytes), the end mark in the last frame.
pub fn write_clusters_framed<W: Write>(
    mut out: W,
    cluster_size: u64,
    mut next: impl FnMut() -> std::io::Result<Option<(u64, Vec<u8>)>>,
) -> std::io::Result<u64> {
    let per_frame = (FRAME_SPAN / cluster_size.max(1)).max(1);
    let mut frame: Vec<u8> = Vec::new();
    let mut open: Option<u64> = None;
    let mut stored = 0;
    while let Some((index, bytes)) = next()? {
        if bytes.iter().all(|&b| b == 0) {
            continue;
        }
        let span = index / per_frame;
        if open.is_some_and(|o| o != span) {
            out.write_all(&zstd::bulk::compress(&frame, LEVEL)?)?;
            frame.clear();
        }
        open = Some(span);
        frame.extend_from_slice(&index.to_le_bytes());
        frame.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        frame.extend_from_slice(&bytes);
        stored += 1;
    }
    frame.extend_from_slice(&END.to_le_bytes());
    out.write_all(&zstd::bulk::compress(&frame, LEVEL)?)?;
    out.flush()?;
    Ok(stored)
}

/// Length of the zstd frame at the start of `bytes`; None when `bytes` does
/// not begin with a whole frame.
pub fn frame_len(bytes: &[u8]) -> Option<usize> {
    zstd::zstd_safe::find_frame_compressed_size(bytes)
        .ok()
        .filter(|&n| n > 0 && n <= bytes.len())
}

/// The clusters of one frame of a framed stream, as `(disk offset, bytes)`,
/// and whether the stream's end mark closes it. Checked like a whole stream
/// (each cluster inside the disk, at most `cluster_size`, increasing); the
/// frame decodes to at most one [`FRAME_SPAN`] of clusters and their records.
pub fn read_frame(
    frame: &[u8],
    cluster_size: u64,
    disk_size: u64,
) -> Result<(Clusters, bool), BundleError> {
    let bad = |why: String| BundleError::Corrupt(format!("disk stream frame: {why}"));
    check_cluster_size(cluster_size)?;
    let records = (FRAME_SPAN / cluster_size.max(1)).max(1) + 1;
    let limit = FRAME_SPAN + records * 12 + 8;
    let bytes = zstd::bulk::decompress(frame, limit as usize).map_err(|e| bad(e.to_string()))?;
    let mut out: Clusters = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let word = |r: &[u8], n: usize| -> Result<u64, BundleError> {
            r.get(..n)
                .map(|b| b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x)))
                .ok_or_else(|| bad("a record is cut short".into()))
        };
        let index = word(rest, 8)?;
        rest = &rest[8..];
        if index == END {
            if !rest.is_empty() {
                return Err(bad("bytes follow its end mark".into()));
            }
            return Ok((out, true));
        }
        let len = word(rest, 4)?;
        rest = &rest[4..];
        let at = index.checked_mul(cluster_size);
        let fits = at.is_some_and(|at| {
            at.checked_add(len).is_some_and(|end| end <= disk_size)
                && out.last().is_none_or(|(prev, _)| *prev < at)
        }) && len > 0
            && len <= cluster_size
            && len as usize <= rest.len();
        if !fits {
            return Err(bad(format!("bad cluster record {index}")));
        }
        out.push((index * cluster_size, rest[..len as usize].to_vec()));
        rest = &rest[len as usize..];
    }
    Ok((out, false))
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

fn check_cluster_size(cluster_size: u64) -> Result<(), BundleError> {
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
    {
        return Err(BundleError::BadManifest(format!(
            "disk cluster size {cluster_size} is not a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}"
        )));
    }
    Ok(())
}

fn read(
    input: impl Read,
    cluster_size: u64,
    max_clusters: u64,
    disk_size: Option<u64>,
    mut apply: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, BundleError> {
    let bad = |why: String| BundleError::Corrupt(format!("disk stream: {why}"));
    check_cluster_size(cluster_size)?;
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

    #[test]
    fn a_framed_stream_reads_whole_and_frame_by_frame() {
        let cs = 64 << 10;
        // Clusters in three spans (0, 1 and 5), one of them all zero.
        let clusters: Vec<(u64, Vec<u8>)> = [0u64, 3, 31, 32, 33, 160, 161]
            .iter()
            .map(|&i| (i, vec![(i % 251) as u8 + 1; cs as usize]))
            .chain([(162u64, vec![0u8; cs as usize])])
            .collect();
        let size = 200 * cs;
        let mut it = clusters.clone().into_iter();
        let mut stream = Vec::new();
        assert_eq!(
            write_clusters_framed(&mut stream, cs, || Ok(it.next())).unwrap(),
            7
        );
        let mut whole = Vec::new();
        read_clusters_within(&stream[..], cs, size, |at, b| {
            whole.push((at / cs, b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(whole, clusters[..7].to_vec());
        let mut rest = &stream[..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let n = frame_len(rest).unwrap();
            frames.push(read_frame(&rest[..n], cs, size).unwrap());
            rest = &rest[n..];
        }
        let spans: Vec<Vec<u64>> = frames
            .iter()
            .map(|(c, _)| c.iter().map(|(at, _)| at / FRAME_SPAN).collect())
            .collect();
        assert_eq!(spans, vec![vec![0, 0, 0], vec![1, 1], vec![5, 5]]);
        let ends: Vec<bool> = frames.iter().map(|f| f.1).collect();
        assert_eq!(ends, vec![false, false, true]);
        // A frame cut short, or one of a smaller disk, is refused.
        let n = frame_len(&stream).unwrap();
        assert!(frame_len(&stream[..n - 1]).is_none());
        assert!(read_frame(&stream[..n - 1], cs, size).is_err());
        assert!(read_frame(&stream[..n], cs, 2 * cs).is_err());
        // An empty disk is one frame holding the end mark.
        let mut empty = Vec::new();
        write_clusters_framed(&mut empty, cs, || Ok(None)).unwrap();
        assert_eq!(read_frame(&empty, cs, size).unwrap(), (Vec::new(), true));
    }
}
