//! Writing a paused VM into a bundle. Runs inside the VM's VMM process, which
//! has the guest memory mapped.

use std::io::Write;
use std::path::Path;

use ferry_snapshot::frames::{self, MemoryCompression};
use ferry_snapshot::manifest::{CpuInfo, MemoryRegion};
use ferry_snapshot::memory::{self, RegionView};
use ferry_snapshot::writer::FileBundle;
use ferry_snapshot::{BundleError, BundleWriter, Manifest, SectionKind};
use ferry_vmm::Paused;

use crate::vm::record::{self, VmRecord};

/// What a capture produced.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CaptureReport {
    /// Bytes written.
    pub bytes: u64,
    /// Guest memory bytes stored, before compression.
    pub memory_bytes: u64,
    /// Bytes the guest memory takes in the bundle.
    pub memory_stored_bytes: u64,
    /// Whether the bundle leaves out the disk base.
    pub thin: bool,
    /// Runs of memory pages.
    pub memory_extents: usize,
    /// Disk clusters stored (base + top).
    pub disk_clusters: u64,
    /// How long the VM was paused when the bundle was complete, in milliseconds.
    pub paused_ms: u64,
    /// Pages the prefetch set covers (what the guest touched just before
    /// the snapshot, small gaps joined): stored raw for a restore to map
    /// unless `compact`.
    #[serde(default)]
    pub prefetch_pages: u64,
    /// SHA-256 of the whole bundle, when known (what an incremental bundle
    /// made later names its parent by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The parent's digest, for an incremental bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// How to write a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    /// Leave out the root disk's base (the image the VM booted from); the
    /// restoring host must have it.
    pub thin: bool,
    /// How guest memory is stored.
    pub memory: MemoryCompression,
    /// Guest ranges (sorted, merged) the guest touched last: in frames of
    /// their own, named in the manifest; stored raw, where a restore maps
    /// them at once, unless `compact`.
    pub prefetch: Vec<(u64, u64)>,
    /// Compress the prefetch frames like the rest (the restore decodes them
    /// before the guest runs).
    pub compact: bool,
    /// Write an incremental bundle: only what changed since this parent.
    pub since: Option<Since>,
}

/// What an incremental bundle is written against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The parent, as the new bundle names it.
    pub parent: ferry_snapshot::manifest::ParentRef,
    /// Guest addresses of the pages changed since the parent, sorted.
    pub pages: Vec<u64>,
    /// The parent's disk, to compare the VM's with.
    pub disk: super::chain::ParentDisk,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            thin: false,
            memory: MemoryCompression::Zstd(frames::DEFAULT_LEVEL),
            prefetch: Vec::new(),
            compact: false,
            since: None,
        }
    }
}

fn vmm_err(e: impl std::fmt::Display) -> BundleError {
    BundleError::io("capture VM state")(std::io::Error::other(e.to_string()))
}

/// Writes the whole VM (`state`, captured by the caller while `paused`;
/// memory; root disk; record) into a started bundle.
pub fn write_bundle<W: Write>(
    cache: &Path,
    mut w: BundleWriter<W>,
    paused: &mut Paused,
    state: &ferry_vmm::VmState,
    rec: &VmRecord,
    root_disk: &Path,
    opts: CaptureOptions,
) -> Result<(W, CaptureReport), BundleError> {
    let record_json = serde_json::to_vec(rec).expect("record serializes");
    w.section_bytes(SectionKind::Record, &record_json)?;
    let state_json = serde_json::to_vec(&state).expect("state serializes");
    w.section_bytes(SectionKind::VmState, &state_json)?;

    let ranges = paused.resident_or_nonzero_ranges().map_err(vmm_err)?;
    let slices = paused.memory_slices();
    let views: Vec<RegionView<'_>> = slices
        .iter()
        .map(|&(g, bytes)| {
            let end = g + bytes.len() as u64;
            let candidates = ranges
                .iter()
                .filter(|&&(s, l)| s < end && s + l > g)
                .map(|&(s, l)| s.max(g) - g..(s + l).min(end) - g)
                .collect();
            RegionView {
                guest_addr: g,
                bytes,
                candidates: Some(candidates),
            }
        })
        .collect();
    // An incremental bundle stores exactly the changed pages, zero pages
    // too (they overwrite the parent's); it has no prefetch set, since its
    // chain is decoded whole before the guest runs.
    let (runs, prefetch) = match &opts.since {
        Some(since) => (memory::runs_of_pages(&since.pages), &[][..]),
        None => (memory::find_runs(&views), &opts.prefetch[..]),
    };
    let written = w.memory_sections(&views, &runs, prefetch, !opts.compact, opts.memory)?;
    let memory_bytes: u64 = written.extents.iter().map(|e| e.len).sum();
    drop(views);

    let mut disk = match &opts.since {
        Some(since) => super::disk::write_changed(cache, &mut w, root_disk, &since.disk)?,
        None => super::disk::write_sections(cache, &mut w, root_disk, opts.thin)?,
    };
    disk.base_image = Some(rec.image.clone());
    let cpuid = state
        .vcpus
        .first()
        .map(|v| v.cpuid.clone())
        .unwrap_or_default();
    let manifest = Manifest {
        format_version: 0,
        ferry_version: env!("CARGO_PKG_VERSION").to_string(),
        created_at: record::now(),
        arch: std::env::consts::ARCH.to_string(),
        cpu: CpuInfo {
            vendor: ferry_vmm::snapshot::cpu::vendor(&cpuid),
            features: ferry_vmm::snapshot::cpu::features_of(&cpuid),
        },
        vm_name: rec.name.clone(),
        cpus: rec.cpus,
        memory_mib: rec.memory_mib,
        memory_regions: state
            .memory
            .iter()
            .map(|r| MemoryRegion {
                guest_addr: r.guest_addr,
                size: r.len,
            })
            .collect(),
        memory_bytes,
        memory_stored_bytes: written.stored_bytes,
        memory_prefetch_frames: written.prefetch.clone(),
        devices: state
            .devices
            .iter()
            .map(|d| d.kind().name().to_string())
            .collect(),
        disk: disk.clone(),
        sections: Vec::new(),
        parent: opts.since.as_ref().map(|s| s.parent.clone()),
    };
    let bytes_before_manifest = w.position();
    let out = w.finish(manifest)?;
    Ok((
        out,
        CaptureReport {
            bytes: bytes_before_manifest,
            memory_bytes,
            memory_stored_bytes: written.stored_bytes,
            thin: opts.thin,
            memory_extents: written.extents.len(),
            disk_clusters: disk.base_clusters + disk.top_clusters,
            paused_ms: paused.paused_for().as_millis() as u64,
            prefetch_pages: prefetch.iter().map(|&(_, len)| len / memory::PAGE).sum(),
            digest: None,
            parent: opts.since.as_ref().map(|s| s.parent.digest.clone()),
        },
    ))
}

/// Writes the bundle to `dest`: atomically for a regular path; a FIFO (how
/// `ferry snapshot NAME -` streams) is written straight through. The
/// temporary file of a regular path is recorded in the journal under the
/// data directory.
pub fn write_to_path(
    dirs: &crate::config::Dirs,
    dest: &Path,
    paused: &mut Paused,
    state: &ferry_vmm::VmState,
    rec: &VmRecord,
    root_disk: &Path,
    opts: CaptureOptions,
) -> Result<CaptureReport, BundleError> {
    use std::os::unix::fs::FileTypeExt;
    let is_fifo = std::fs::metadata(dest).is_ok_and(|m| m.file_type().is_fifo());
    if is_fifo {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dest)
            .map_err(BundleError::io("open stream"))?;
        let writer = BundleWriter::new(super::disk::Hashing {
            inner: std::io::BufWriter::with_capacity(1 << 20, f),
            hash: sha2::Sha256::default(),
        })?;
        let (mut out, mut report) =
            write_bundle(&dirs.cache, writer, paused, state, rec, root_disk, opts)?;
        out.flush().map_err(BundleError::io("flush stream"))?;
        use sha2::Digest;
        report.digest = Some(hex::encode(out.hash.finalize()));
        return Ok(report);
    }
    // Recorded before it exists, dropped after it is published or removed.
    let _journal = crate::journal::Entry::record(&dirs.data, &FileBundle::staging_path(dest))
        .map_err(BundleError::io("record the bundle's temporary file"))?;
    let (guard, writer) = FileBundle::create(dest)?;
    let (out, report) = write_bundle(&dirs.cache, writer, paused, state, rec, root_disk, opts)?;
    guard.commit(out)?;
    Ok(report)
}
