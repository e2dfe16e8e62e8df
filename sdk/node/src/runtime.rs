//! The module's functions: boot, restore, attach, list, and fleet
//! storage's push and pull of bundle files (their types are in `store.rs`).

use std::path::PathBuf;

use napi::bindgen_prelude::AsyncTask;
use napi::JsFunction;
use napi_derive::napi;

use crate::error::Result;
use crate::options::{BootOpts, RestoreOpts};
use crate::progress::Reporter;
use crate::restore_stream::{self, NativeRestoreStream};
use crate::task::{blocking, Blocking};
use crate::vm::{NativeVm, VmInfoJs};

/// The runtime every call uses ([`ferry::Runtime::shared`]).
pub(crate) fn runtime() -> Result<ferry::Runtime> {
    Ok(ferry::Runtime::shared()?)
}

/// Boots a VM.
#[napi]
pub fn boot(opts: BootOpts) -> Result<AsyncTask<Blocking<NativeVm>>> {
    let opts = opts.into_ferry()?;
    Ok(blocking(move || Ok(NativeVm::new(runtime()?.boot(opts)?))))
}

/// Restores the bundle file `path`, or the VM pushed as `path` when it is
/// an `s3://BUCKET/PREFIX/DIGEST` address.
#[napi]
pub fn restore_path(
    path: String,
    opts: RestoreOpts,
    on_progress: Option<JsFunction>,
) -> napi::Result<AsyncTask<Blocking<NativeVm>>> {
    let mut progress = Reporter::new("restore", on_progress)?;
    let opts = opts.into_ferry()?;
    let source = if ferry::StoreUrl::is_store(&path) {
        // A malformed address fails here, before the host checks a restore
        // makes first.
        crate::store::check_url(&path, true)?;
        ferry::RestoreSource::Store(path.clone())
    } else {
        ferry::RestoreSource::Path(PathBuf::from(&path))
    };
    Ok(blocking(move || {
        progress.started(&format!("restore of {path}"));
        let vm = runtime()?.restore(source, opts)?;
        progress.finished(vm.name());
        Ok(NativeVm::new(vm))
    }))
}

/// Starts a restore reading chunks pushed from JavaScript.
#[napi]
pub fn restore_stream(
    opts: RestoreOpts,
    on_progress: Option<JsFunction>,
) -> napi::Result<NativeRestoreStream> {
    let progress = Reporter::new("restore", on_progress)?;
    let opts = opts.into_ferry()?;
    Ok(restore_stream::restore(runtime()?, opts, progress))
}

/// Opens an existing VM by name.
#[napi]
pub fn attach(name: String) -> AsyncTask<Blocking<NativeVm>> {
    blocking(move || Ok(NativeVm::new(runtime()?.open(&name)?)))
}

/// Every VM, sorted by name.
#[napi]
pub fn list() -> AsyncTask<Blocking<Vec<VmInfoJs>>> {
    blocking(|| Ok(runtime()?.list().into_iter().map(Into::into).collect()))
}

/// Every stable error code with its meaning and what to do.
#[napi]
pub fn error_codes() -> Vec<Vec<String>> {
    ferry::codes()
        .iter()
        .map(|c| {
            vec![
                c.code.to_string(),
                c.meaning.to_string(),
                c.action.to_string(),
            ]
        })
        .collect()
}

/// Pushes the bundle file `path` to the store `store`.
#[napi]
pub fn push_bundle(
    path: String,
    store: String,
    on_progress: Option<JsFunction>,
) -> napi::Result<AsyncTask<Blocking<crate::store::PushReportJs>>> {
    crate::store::check_url(&store, false)?;
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
) -> napi::Result<AsyncTask<Blocking<crate::store::PullReportJs>>> {
    crate::store::check_url(&url, true)?;
    let mut progress = Reporter::new("pull", on_progress)?;
    Ok(blocking(move || {
        progress.started(&format!("pull of {url} to {dest}"));
        let report =
            runtime()?.pull_bundle(&url, &PathBuf::from(&dest), &mut |s| progress.phase(s))?;
        progress.finished(&dest);
        Ok(report.into())
    }))
}
