//! The manifest: everything a host needs to decide whether and how to restore.

use serde::{Deserialize, Serialize};

use crate::format::SectionKind;

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
    /// Devices, in bus order, by kind.
    pub devices: Vec<String>,
    /// Root disk.
    pub disk: DiskInfo,
    /// Every section.
    pub sections: Vec<SectionEntry>,
}

impl Manifest {
    /// The entry of a section kind, if present.
    pub fn section(&self, kind: SectionKind) -> Option<&SectionEntry> {
        self.sections.iter().find(|s| s.kind == kind)
    }
}
