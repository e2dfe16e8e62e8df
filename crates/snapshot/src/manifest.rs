//! The manifest: everything a host needs to decide whether and how to restore.

use serde::{Deserialize, Serialize};

use crate::format::SectionKind;
use crate::memory::PAGE;
use crate::BundleError;

/// Largest virtual disk a bundle may describe (16 TiB). A restore creates the
/// disk at this size before unpacking it, so a larger `disk.size` is refused
/// when the bundle is opened.
pub const MAX_DISK_SIZE: u64 = 16 << 40;
/// Smallest disk cluster size a bundle may use.
pub const MIN_CLUSTER_SIZE: u64 = 512;
/// Largest disk cluster size a bundle may use (bounds the reader's buffer).
pub const MAX_CLUSTER_SIZE: u64 = 2 << 20;
/// Most guest memory regions a bundle may describe.
pub const MAX_MEMORY_REGIONS: usize = 64;
/// Bytes in a MiB (`memory_mib` unit).
const MIB: u64 = 1 << 20;

/// One section of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    /// What it holds.
    pub kind: SectionKind,
    /// Payload offset in the file (4 KiB aligned).
    pub offset: u64,
    /// Payload length in bytes (padding excluded).
    pub length: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
}

/// The CPU the guest ran on, for compatibility checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// CPUID vendor string, e.g. `AuthenticAMD`.
    pub vendor: String,
    /// Feature names the guest was shown.
    pub features: Vec<String>,
}

/// A guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// How the root disk is carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Size the guest sees.
    pub size: u64,
    /// Cluster size of the streams.
    pub cluster_size: u64,
    /// Content identity of the base (so a host that has it may skip unpacking).
    pub base_id: String,
    /// Clusters in the base stream.
    pub base_clusters: u64,
    /// Clusters in the top stream.
    pub top_clusters: u64,
    /// A thin bundle leaves the base out: the restoring host must already
    /// have it (found by `base_id`).
    #[serde(default)]
    pub thin: bool,
    /// What the VM booted from, as shown to people (e.g. `base`, a tarball path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<String>,
    /// Where the writing host kept the base, relative to its cache directory,
    /// when it was a cached image: a host with the same file there may use it
    /// once its content id matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_cache_path: Option<String>,
}

/// The bundle's table of contents and description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bundle format version.
    pub format_version: u32,
    /// ferry version that wrote it.
    pub ferry_version: String,
    /// Unix seconds at capture.
    pub created_at: u64,
    /// `x86_64`.
    pub arch: String,
    /// The guest's CPU.
    pub cpu: CpuInfo,
    /// Name the VM had.
    pub vm_name: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Guest memory layout.
    pub memory_regions: Vec<MemoryRegion>,
    /// Bytes of guest memory stored (non-zero pages), before compression.
    pub memory_bytes: u64,
    /// Bytes the memory takes in the bundle (compressed frames, raw frames,
    /// padding). 0 in bundles older than format version 2.
    #[serde(default)]
    pub memory_stored_bytes: u64,
    /// Memory frames (indexes into the frame table, increasing) holding the
    /// pages the guest touched just before the snapshot: a restore decodes
    /// them before the guest runs. Readers that do not know it ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_prefetch_frames: Vec<u64>,
    /// Devices, in bus order, by kind.
    pub devices: Vec<String>,
    /// Root disk.
    pub disk: DiskInfo,
    /// Every section.
    pub sections: Vec<SectionEntry>,
    /// The bundle this one builds on: an incremental bundle holds only the
    /// memory pages and disk clusters that changed since its parent (format
    /// version 3). Absent in a full bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

/// The parent of an incremental bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// SHA-256 of the whole parent bundle file (lowercase hex).
    pub digest: String,
    /// Its file name when this bundle was written: where a restore looks
    /// for it first, beside this bundle.
    pub file_name: String,
}

impl ParentRef {
    /// Checks the reference's shape (a digest, a plain file name).
    pub fn validate(&self) -> Result<(), BundleError> {
        let digest_ok =
            self.digest.len() == 64 && self.digest.bytes().all(|b| b.is_ascii_hexdigit());
        let name_ok = !self.file_name.is_empty()
            && self.file_name.len() <= 255
            && !self.file_name.contains('/')
            && self.file_name != "."
            && self.file_name != ".."
            && !self.file_name.contains('\0');
        if digest_ok && name_ok {
            Ok(())
        } else {
            Err(BundleError::BadManifest("the parent reference".into()))
        }
    }
}

impl Manifest {
    /// The entry of a section kind, if present.
    pub fn section(&self, kind: SectionKind) -> Option<&SectionEntry> {
        self.sections.iter().find(|s| s.kind == kind)
    }

    /// Guest RAM in bytes, as `memory_mib` states it.
    pub fn ram_bytes(&self) -> u64 {
        u64::from(self.memory_mib) * MIB
    }

    /// Checks what the manifest describes, before anything is read, decoded or
    /// created from it: each section kind appears once; the memory regions are
    /// page aligned, non-empty, sorted, do not overlap, and add up to
    /// `memory_mib`; the disk's cluster size is a power of two between
    /// [`MIN_CLUSTER_SIZE`] and [`MAX_CLUSTER_SIZE`], its size is at most
    /// [`MAX_DISK_SIZE`], and its cluster counts fit in it.
    ///
    /// Errors are [`BundleError::BadManifest`] (`BUNDLE_MANIFEST_INVALID`).
    /// [`crate::Bundle::open`] calls this; section positions are checked there.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |why: String| BundleError::BadManifest(why);
        let mut kinds: Vec<SectionKind> = Vec::with_capacity(self.sections.len());
        for s in &self.sections {
            if kinds.contains(&s.kind) {
                return Err(bad(format!("the {:?} section is listed twice", s.kind)));
            }
            kinds.push(s.kind);
        }
        check_regions(&self.memory_regions, self.ram_bytes())?;
        if let Some(p) = &self.parent {
            p.validate()?;
            if self.format_version < 3 {
                return Err(bad("a parent in a bundle older than format 3".into()));
            }
        }
        self.disk.validate()
    }
}

/// Checks guest memory regions: at most [`MAX_MEMORY_REGIONS`], each non-empty
/// and page aligned, sorted by address without overlaps or overflow, and
/// `ram_bytes` in all.
pub fn check_regions(regions: &[MemoryRegion], ram_bytes: u64) -> Result<(), BundleError> {
    let bad = |why: String| BundleError::BadManifest(format!("memory regions: {why}"));
    if regions.is_empty() || regions.len() > MAX_MEMORY_REGIONS {
        return Err(bad(format!(
            "{} regions, expected 1 to {MAX_MEMORY_REGIONS}",
            regions.len()
        )));
    }
    let mut total = 0u64;
    let mut prev_end = 0u64;
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0 || !r.guest_addr.is_multiple_of(PAGE) || !r.size.is_multiple_of(PAGE) {
            return Err(bad(format!(
                "region {i} ({:#x}, {} bytes) is empty or not page aligned",
                r.guest_addr, r.size
            )));
        }
        let end = r
            .guest_addr
            .checked_add(r.size)
            .ok_or_else(|| bad(format!("region {i} ends past the address space")))?;
        if i > 0 && r.guest_addr < prev_end {
            return Err(bad(format!(
                "region {i} at {:#x} overlaps or precedes the one before it",
                r.guest_addr
            )));
        }
        prev_end = end;
        total += r.size; // Cannot overflow: the regions are disjoint below 2^64.
    }
    if total != ram_bytes {
        return Err(bad(format!(
            "they hold {total} bytes, the guest has {ram_bytes} bytes of RAM"
        )));
    }
    Ok(())
}

impl DiskInfo {
    /// Checks the disk description: cluster size, size limit, and that the
    /// stored cluster counts fit in the disk.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |why: String| BundleError::BadManifest(format!("disk: {why}"));
        if !self.cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&self.cluster_size)
        {
            return Err(bad(format!(
                "cluster size {} is not a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}",
                self.cluster_size
            )));
        }
        if self.size > MAX_DISK_SIZE {
            return Err(bad(format!(
                "size {} is over the {MAX_DISK_SIZE}-byte (16 TiB) limit",
                self.size
            )));
        }
        let capacity = self.capacity_clusters();
        for (what, n) in [("base", self.base_clusters), ("top", self.top_clusters)] {
            if n > capacity {
                return Err(bad(format!(
                    "{n} {what} clusters stored, a {}-byte disk has {capacity}",
                    self.size
                )));
            }
        }
        Ok(())
    }

    /// Clusters a disk of this size has (the last one may be partial).
    pub fn capacity_clusters(&self) -> u64 {
        self.size.div_ceil(self.cluster_size.max(1))
    }
}
