//! Fleet storage: VMs and bundles to and from an S3 store
//! (`s3://BUCKET/PREFIX`), as content-addressed chunks.

use pyo3::prelude::*;

use crate::error::{Fail, Result};

/// What a push did.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct PushReport {
    /// Where the VM is now: `s3://BUCKET/PREFIX/DIGEST`.
    url: String,
    /// The manifest's digest.
    digest: String,
    /// Chunks the VM is made of (distinct).
    chunks: u64,
    /// Of those, the ones the store lacked and got.
    uploaded_chunks: u64,
    /// Bytes sent for them (compressed), plus the manifest.
    uploaded_bytes: u64,
    /// Bytes all its chunks take in the store (compressed).
    stored_bytes: u64,
    /// Guest memory chunks (not all zero).
    memory_chunks: u64,
}

#[pymethods]
impl PushReport {
    fn __repr__(&self) -> String {
        format!(
            "PushReport(url={:?}, chunks={}, uploaded_chunks={}, uploaded_bytes={})",
            self.url, self.chunks, self.uploaded_chunks, self.uploaded_bytes
        )
    }
}

impl From<ferry::PushReport> for PushReport {
    fn from(r: ferry::PushReport) -> Self {
        PushReport {
            url: r.url,
            digest: r.digest,
            chunks: r.chunks,
            uploaded_chunks: r.uploaded_chunks,
            uploaded_bytes: r.uploaded_bytes,
            stored_bytes: r.stored_bytes,
            memory_chunks: r.memory_chunks,
        }
    }
}

/// What a pull did.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct PullReport {
    /// Chunks fetched.
    chunks: u64,
    /// Bytes fetched (compressed), the manifest included.
    fetched_bytes: u64,
    /// Size of the bundle written.
    bundle_bytes: u64,
}

#[pymethods]
impl PullReport {
    fn __repr__(&self) -> String {
        format!(
            "PullReport(chunks={}, fetched_bytes={}, bundle_bytes={})",
            self.chunks, self.fetched_bytes, self.bundle_bytes
        )
    }
}

impl From<ferry::PullReport> for PullReport {
    fn from(r: ferry::PullReport) -> Self {
        PullReport {
            chunks: r.chunks,
            fetched_bytes: r.fetched_bytes,
            bundle_bytes: r.bundle_bytes,
        }
    }
}

/// Checks a store address before any work starts, so a typo fails with
/// STORE_URL_INVALID at once; `vm` says whether it must name a pushed VM
/// (`s3://BUCKET/PREFIX/DIGEST`).
pub(crate) fn check_url(url: &str, vm: bool) -> Result<()> {
    ferry::Runtime::check_store_url(url, vm).map_err(Fail::from)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PushReport>()?;
    m.add_class::<PullReport>()?;
    Ok(())
}
