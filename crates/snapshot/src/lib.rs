//! ferry's snapshot bundle: one self-describing file holding a frozen VM.
//!
//! This crate reads and writes bundles without linking the VMM, so tools and
//! tests can inspect them anywhere.
//!
//! # Layout
//!
//! ```text
//! 0      file header (4 KiB): "FERRYSNP", u32 format version, zero padding
//! 4096   section payloads, each starting on a 4 KiB boundary, zero-padded
//! ...    manifest (JSON), the table of every section with offset, length, checksum
//! end-64 trailer: "FERRYEND", u32 version, u32 0, u64 manifest offset,
//!        u64 manifest length, u64 manifest checksum, u64 file length, 16 bytes zero
//! ```
//!
//! Sections are written in one pass, so a bundle can be streamed (`-`); the
//! manifest and trailer come last. A reader trusts nothing before checking the
//! trailer, the manifest's checksum, and that every section lies inside the file.
//! Guest memory is stored in independently decodable frames, zstd-compressed
//! where that pays and raw (page aligned, mappable lazily) where it does not;
//! disks are zstd-compressed cluster streams. A thin bundle leaves out the disk
//! image the VM booted from and names it by content id instead.

pub mod disk;
pub mod format;
pub mod frames;
pub mod manifest;
pub mod memory;
pub mod reader;
pub mod writer;

pub use format::{SectionKind, FORMAT_VERSION};
pub use frames::{MemoryCompression, MemoryFrame};
pub use manifest::{Manifest, SectionEntry};
pub use memory::MemoryExtent;
pub use reader::Bundle;
pub use writer::BundleWriter;

/// Errors reading or writing bundles. Each has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a ferry bundle at all.
    #[error("not a ferry snapshot bundle (bad magic)")]
    NotABundle,
    /// The file ends early: an interrupted write or transfer.
    #[error("the bundle is truncated ({0})")]
    Truncated(String),
    /// A checksum does not match: damaged in storage or transit.
    #[error("the bundle is corrupt: {0}")]
    Corrupt(String),
    /// Written by a newer ferry.
    #[error("bundle format version {found} is newer than this ferry supports ({supported})")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Newest this build reads.
        supported: u32,
    },
    /// The manifest, or a table it leads to (memory extents, memory frames),
    /// is not what it must be: missing or duplicated sections, overlapping or
    /// misaligned memory, sizes past a limit or past what the bundle holds.
    /// Checksums may all match: the bundle was written wrong, or forged.
    #[error("the bundle manifest is invalid: {0}")]
    BadManifest(String),
    /// I/O.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl BundleError {
    /// Stable code for users and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            BundleError::NotABundle => "BUNDLE_NOT_A_BUNDLE",
            BundleError::Truncated(_) => "BUNDLE_TRUNCATED",
            BundleError::Corrupt(_) => "BUNDLE_CORRUPT",
            BundleError::UnsupportedVersion { .. } => "BUNDLE_VERSION_UNSUPPORTED",
            BundleError::BadManifest(_) => "BUNDLE_MANIFEST_INVALID",
            BundleError::Io { .. } => "BUNDLE_IO",
        }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| BundleError::Io { context, source }
    }
}
