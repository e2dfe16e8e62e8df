//! The module's functions: boot, restore, attach, list (fleet storage's
//! are in `store.rs`).

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
