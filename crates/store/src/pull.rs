//! A pushed VM back into a bundle file.

use std::io::Write;
use std::path::Path;

use ferry_snapshot::frames::{self, MemoryCompression};
use ferry_snapshot::memory::{self, RegionView};
use ferry_snapshot::writer::FileBundle;
use ferry_snapshot::SectionKind;
use serde::Serialize;

use crate::cache::ChunkCache;
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

/// Fetches the manifest named `digest` and checks it; also its size.
pub fn fetch_manifest(remote: &Remote, digest: &str) -> Result<(StoreManifest, u64), StoreError> {
    let (m, bytes) = fetch_manifest_bytes(remote, digest)?;
    Ok((m, bytes.len() as u64))
}

/// Fetches the manifest named `digest` and checks it; also its bytes.
pub fn fetch_manifest_bytes(
    remote: &Remote,
    digest: &str,
) -> Result<(StoreManifest, Vec<u8>), StoreError> {
    let bytes = remote
        .get(&StoreManifest::object_name(digest))
        .map_err(|e| match e {
            StoreError::NotFound(_) => {
                StoreError::NotFound(format!("{} holds no VM pushed as {digest}", remote.url()))
            }
            other => other,
        })?;
    Ok((StoreManifest::decode(&bytes, digest)?, bytes))
}

/// Fetches `refs` in batches, checking each, and hands each with its bytes
/// to `use_chunk`; through `cache` when given (hits are not fetched, misses
/// are kept there).
fn fetch_each(
    remote: &Remote,
    cache: Option<&ChunkCache>,
    refs: &[ChunkRef],
    report: &mut PullReport,
    mut use_chunk: impl FnMut(&ChunkRef, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for batch in refs.chunks(BATCH) {
        if let Some(cache) = cache {
            let (bytes, fetched) = cache.fetch(remote, batch)?;
            report.fetched_bytes += fetched;
            for (c, b) in batch.iter().zip(bytes) {
                report.chunks += 1;
                use_chunk(c, b)?;
            }
            continue;
        }
        let refs: Vec<&ChunkRef> = batch.iter().collect();
        chunk::fetch_verified(remote, &refs, |i, stored, bytes| {
            report.chunks += 1;
            report.fetched_bytes += stored.len() as u64;
            use_chunk(&batch[i], bytes)
        })?;
    }
    Ok(())
}

/// What of a pushed VM a bundle being built gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// Everything: a bundle like the one pushed.
    Whole,
    /// Everything but guest memory, which a lazy restore fetches on first
    /// touch; the disk image too unless `with_base` is false (the restoring
    /// host has it), which makes the bundle thin; the VM's own disk writes
    /// unless `with_top` is false (the VM fetches them as it reaches them).
    NoMemory {
        /// Whether to fetch the disk image.
        with_base: bool,
        /// Whether to fetch the VM's disk writes.
        with_top: bool,
    },
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
    let mut report = write_bundle(remote, None, &m, Contents::Whole, dest, progress)?;
    report.fetched_bytes += manifest_bytes;
    Ok(report)
}

/// Writes what `contents` asks of the VM `m` describes to the bundle file
/// `dest` (atomically), fetching through `cache` when given.
pub fn write_bundle(
    remote: &Remote,
    cache: Option<&ChunkCache>,
    m: &StoreManifest,
    contents: Contents,
    dest: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PullReport, StoreError> {
    let mut report = PullReport::default();
    let mut small = Vec::new();
    fetch_each(
        remote,
        cache,
        &[m.record.clone(), m.state.clone()],
        &mut report,
        |_, b| {
            small.push(b);
            Ok(())
        },
    )?;
    let state = small.pop().expect("state fetched");
    let record = small.pop().expect("record fetched");

    let (guard, mut w) = FileBundle::create(dest)?;
    w.section_bytes(SectionKind::Record, &record)?;
    w.section_bytes(SectionKind::VmState, &state)?;
    let compression = if m.memory_compressed {
        MemoryCompression::Zstd(frames::DEFAULT_LEVEL)
    } else {
        MemoryCompression::None
    };
    let written = if contents == Contents::Whole {
        progress(&format!("fetching {} memory chunks", m.memory.len()));
        // Guest RAM as zeroed buffers: pages never written are never touched.
        let mut ram: Vec<(u64, Vec<u8>)> = m
            .bundle
            .memory_regions
            .iter()
            .map(|r| (r.guest_addr, vec![0u8; r.size as usize]))
            .collect();
        fetch_each(remote, cache, &m.memory, &mut report, |c, bytes| {
            let (a, buf) = ram
                .iter_mut()
                .find(|(a, b)| c.at >= *a && c.at + c.len <= *a + b.len() as u64)
                .expect("validated: inside a region");
            let off = (c.at - *a) as usize;
            buf[off..off + bytes.len()].copy_from_slice(&bytes);
            Ok(())
        })?;
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
        w.memory_sections(&views, &runs, &m.prefetch, m.prefetch_raw, compression)?
    } else {
        // No pages: the restore fills guest memory from the store.
        w.memory_sections(&[], &[], &[], false, compression)?
    };

    let (with_base, with_top) = match contents {
        Contents::Whole => (true, true),
        Contents::NoMemory {
            with_base,
            with_top,
        } => (with_base, with_top),
    };
    progress("fetching the disk");
    let mut thin = m.bundle.disk.thin;
    match &m.disk_base {
        Some(base) if with_base => {
            let mut failed = None;
            w.section(SectionKind::DiskBase, |out| {
                let r = fetch_each(remote, cache, &base.pieces, &mut report, |_, bytes| {
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
        _ => thin = true,
    }
    let mut top_clusters = 0u64;
    let mut failed = None;
    w.section(SectionKind::DiskTop, |out| {
        let mut clusters: Vec<(u64, Vec<u8>)> = Vec::new();
        let top: &[ChunkRef] = if with_top { &m.disk_top } else { &[] };
        let r = fetch_each(remote, cache, top, &mut report, |c, bytes| {
            clusters.extend(chunk::disk_records(
                &bytes,
                c.at,
                m.bundle.disk.size,
                m.bundle.disk.cluster_size,
            )?);
            Ok(())
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
    manifest.disk.thin = thin;
    let out = w.finish(manifest)?;
    report.bundle_bytes = out.get_ref().metadata().map(|md| md.len()).unwrap_or(0);
    guard.commit(out)?;
    Ok(report)
}
