//! Fleet storage: VMs and bundles to and from an S3 store
//! (`s3://BUCKET/PREFIX`), as content-addressed chunks.

use napi_derive::napi;

use crate::error::{Fail, Result};

/// What a push did.
#[napi(object)]
pub struct PushReportJs {
    /// Where the VM is now: `s3://BUCKET/PREFIX/DIGEST`.
    pub url: String,
    /// The manifest's digest.
    pub digest: String,
    /// Chunks the VM is made of (distinct).
    pub chunks: f64,
    /// Of those, the ones the store lacked and got.
    pub uploaded_chunks: f64,
    /// Bytes sent for them (compressed), plus the manifest.
    pub uploaded_bytes: f64,
    /// Bytes all its chunks take in the store (compressed).
    pub stored_bytes: f64,
    /// Guest memory chunks (not all zero).
    pub memory_chunks: f64,
}

impl From<ferry::PushReport> for PushReportJs {
    fn from(r: ferry::PushReport) -> Self {
        PushReportJs {
            url: r.url,
            digest: r.digest,
            chunks: r.chunks as f64,
            uploaded_chunks: r.uploaded_chunks as f64,
            uploaded_bytes: r.uploaded_bytes as f64,
            stored_bytes: r.stored_bytes as f64,
            memory_chunks: r.memory_chunks as f64,
        }
    }
}

/// What a pull did.
#[napi(object)]
pub struct PullReportJs {
    /// Chunks fetched.
    pub chunks: f64,
    /// Bytes fetched (compressed), the manifest included.
    pub fetched_bytes: f64,
    /// Size of the bundle written.
    pub bundle_bytes: f64,
}

impl From<ferry::PullReport> for PullReportJs {
    fn from(r: ferry::PullReport) -> Self {
        PullReportJs {
            chunks: r.chunks as f64,
            fetched_bytes: r.fetched_bytes as f64,
            bundle_bytes: r.bundle_bytes as f64,
        }
    }
}

/// Checks a store address before any work starts, so a typo fails with
/// STORE_URL_INVALID at once; `vm` says whether it must name a pushed VM
/// (`s3://BUCKET/PREFIX/DIGEST`).
pub(crate) fn check_url(url: &str, vm: bool) -> Result<()> {
    ferry::Runtime::check_store_url(url, vm).map_err(Fail::from)
}
