//! Fleet storage: VMs and bundles to and from an S3 store
//! (`s3://BUCKET/PREFIX`), as content-addressed chunks.

use std::path::PathBuf;

use napi::bindgen_prelude::AsyncTask;
use napi::JsFunction;
use napi_derive::napi;

use crate::error::{Fail, Result};
use crate::progress::Reporter;
use crate::runtime::runtime;
use crate::task::{blocking, Blocking};

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
    let parsed = if vm {
        ferry::StoreUrl::parse_pushed(url)
    } else {
        ferry::StoreUrl::parse(url)
    };
    parsed
        .map(drop)
        .map_err(|e| Fail::from(ferry::Error::from(e)))
}

/// Pushes the bundle file `path` to the store `store`.
#[napi]
pub fn push_bundle(
    path: String,
    store: String,
    on_progress: Option<JsFunction>,
) -> napi::Result<AsyncTask<Blocking<PushReportJs>>> {
    check_url(&store, false)?;
    let mut progress = Reporter::new("push", on_progress)?;
    Ok(blocking(move || {
        progress.started(&format!("push of {path} to {store}"));
        let report =
            runtime()?.push_bundle(&PathBuf::from(&path), &store, &mut |s| progress.phase(s))?;
        progress.finished(&report.url);
        Ok(report.into())
    }))
}

/// Fetches the VM pushed as `url` into the bundle file `dest`.
#[napi]
pub fn pull_bundle(
    url: String,
    dest: String,
    on_progress: Option<JsFunction>,
) -> napi::Result<AsyncTask<Blocking<PullReportJs>>> {
    check_url(&url, true)?;
    let mut progress = Reporter::new("pull", on_progress)?;
    Ok(blocking(move || {
        progress.started(&format!("pull of {url} to {dest}"));
        let report =
            runtime()?.pull_bundle(&url, &PathBuf::from(&dest), &mut |s| progress.phase(s))?;
        progress.finished(&dest);
        Ok(report.into())
    }))
}
