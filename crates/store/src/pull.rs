//! A pushed VM back into a bundle file.

use std::io::Write;
use std::path::Path;

use ferry_snapshot::frames::{self, MemoryCompression};
use ferry_snapshot::memory::{self, RegionView};
use ferry_snapshot::writer::FileBundle;
use ferry_snapshot::SectionKind;
use serde::Serialize;

use crate::chunk;
use crate::manifest::{ChunkRef, StoreManifest};
use crate::{Remote, StoreError};

/// Chunks fetched per batch: bounds what is held at once besides guest memory.
const BATCH: usize = 64;

/// What a pull did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PullReport {
    /// Chunks fetched.
    pub chunks: u64,
    /// Bytes fetched (compressed), the manifest included.
    pub fetched_bytes: u64,
    /// Size of the bundle written.
    pub bundle_bytes: u64,
}

/// Fetches the manifest named `digest` and checks it.
pub fn fetch_manifest(remote: &Remote, digest: &str) -> Result<(StoreManifest, u64), StoreError> {
    let bytes = remote
        .get(&StoreManifest::object_name(digest))
        .map_err(|e| match e {
            StoreError::NotFound(_) => {
                StoreError::NotFound(format!("{} holds no VM pushed as {digest}", remote.url()))
            }
            other => other,
        })?;
    let n = bytes.len() as u64;
    Ok((StoreManifest::decode(&bytes, digest)?, n))
}

/// Fetches `refs` in batches, checking each, and hands each with its bytes to `use_chunk`.
fn fetch_each(
    remote: &Remote,
    refs: &[ChunkRef],
    report: &mut PullReport,
    mut use_chunk: impl FnMut(&ChunkRef, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for batch in refs.chunks(BATCH) {
        let names: Vec<String> = batch
            .iter()
            .map(|c| chunk::object_name(&c.sha256))
            .collect();
        let stored = remote.get_all(&names).map_err(|e| match e {
            StoreError::NotFound(what) => {
                StoreError::Corrupt(format!("a chunk the manifest names is missing: {what}"))
            }
            other => other,
        })?;
        for (c, s) in batch.iter().zip(stored) {
            report.chunks += 1;
            report.fetched_bytes += s.len() as u64;
            use_chunk(c, chunk::decode(&s, &c.sha256, c.len)?)?;
        }
    }
    Ok(())
}

/// Writes the VM pushed as `digest` to the bundle file `dest` (atomically:
/// nothing appears there unless all of it was fetched and checked).
pub fn pull_bundle(
    remote: &Remote,
    digest: &str,
    dest: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PullReport, StoreError> {
    let (m, manifest_bytes) = fetch_manifest(remote, digest)?;
    let mut report = PullReport {
        fetched_bytes: manifest_bytes,
        ..PullReport::default()
    };
    let mut small = Vec::new();
    fetch_each(
        remote,
        &[m.record.clone(), m.state.clone()],
        &mut report,
        |_, b| {
            small.push(b);
            Ok(())
        },
    )?;
    let state = small.pop().expect("state fetched");
    let record = small.pop().expect("record fetched");

    progress(&format!("fetching {} memory chunks", m.memory.len()));
    // Guest RAM as zeroed buffers: pages never written are never touched.
    let mut ram: Vec<(u64, Vec<u8>)> = m
        .bundle
        .memory_regions
        .iter()
        .map(|r| (r.guest_addr, vec![0u8; r.size as usize]))
        .collect();
    fetch_each(remote, &m.memory, &mut report, |c, bytes| {
        let (a, buf) = ram
            .iter_mut()
            .find(|(a, b)| c.at >= *a && c.at + c.len <= *a + b.len() as u64)
            .expect("validated: inside a region");
        let off = (c.at - *a) as usize;
        buf[off..off + bytes.len()].copy_from_slice(&bytes);
        Ok(())
    })?;

    let (guard, mut w) = FileBundle::create(dest)?;
    w.section_bytes(SectionKind::Record, &record)?;
    w.section_bytes(SectionKind::VmState, &state)?;
    let views: Vec<RegionView<'_>> = ram
        .iter()
        .map(|(g, bytes)| {
            let end = g + bytes.len() as u64;
            let candidates = m
                .memory
                .iter()
                .filter(|c| c.at >= *g && c.at < end)
                .map(|c| c.at - g..c.at - g + c.len)
                .collect();
            RegionView {
                guest_addr: *g,
                bytes,
                candidates: Some(candidates),
            }
        })
        .collect();
    let runs = memory::find_runs(&views);
    let compression = if m.memory_compressed {
        MemoryCompression::Zstd(frames::DEFAULT_LEVEL)
    } else {
        MemoryCompression::None
    };
    let written = w.memory_sections(&views, &runs, &m.prefetch, m.prefetch_raw, compression)?;
    drop(views);
    drop(ram);

    progress("fetching the disk");
    if let Some(base) = &m.disk_base {
        let mut failed = None;
        w.section(SectionKind::DiskBase, |out| {
            let r = fetch_each(remote, &base.pieces, &mut report, |_, bytes| {
                out.write_all(&bytes)
                    .map_err(StoreError::io("write the disk image"))
            });
            if let Err(e) = r {
                failed = Some(e);
                return Err(std::io::Error::other("fetching the disk image failed"));
            }
            Ok(())
        })
        .map_err(|e| failed.take().unwrap_or(StoreError::Bundle(e)))?;
    }
    let mut top_clusters = 0u64;
    let mut failed = None;
    w.section(SectionKind::DiskTop, |out| {
        let mut clusters: Vec<(u64, Vec<u8>)> = Vec::new();
        let r = fetch_each(remote, &m.disk_top, &mut report, |c, bytes| {
            parse_records(
                &bytes,
                c.at,
                m.bundle.disk.size,
                m.bundle.disk.cluster_size,
                &mut clusters,
            )
        });
        if let Err(e) = r {
            failed = Some(e);
            return Err(std::io::Error::other("fetching the disk writes failed"));
        }
        let mut it = clusters.into_iter();
        let cs = m.bundle.disk.cluster_size;
        top_clusters = ferry_snapshot::disk::write_clusters(out, || {
            Ok(it.next().map(|(off, b)| (off / cs, b)))
        })?;
        Ok(())
    })
    .map_err(|e| failed.take().unwrap_or(StoreError::Bundle(e)))?;

    let mut manifest = m.bundle.clone();
    manifest.memory_bytes = written.extents.iter().map(|e| e.len).sum();
    manifest.memory_stored_bytes = written.stored_bytes;
    manifest.memory_prefetch_frames = written.prefetch.clone();
    manifest.disk.top_clusters = top_clusters;
    let out = w.finish(manifest)?;
    report.bundle_bytes = out.get_ref().metadata().map(|md| md.len()).unwrap_or(0);
    guard.commit(out)?;
    Ok(report)
}

/// Reads a disk-writes chunk of the window at `window`: its records, each a
/// whole cluster inside that window and the disk, in increasing order.
fn parse_records(
    bytes: &[u8],
    window: u64,
    disk_size: u64,
    cluster_size: u64,
    out: &mut Vec<(u64, Vec<u8>)>,
) -> Result<(), StoreError> {
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
            && off / chunk::CHUNK * chunk::CHUNK == window
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
    Ok(())
}
