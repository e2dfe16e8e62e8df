//! Live migration: `vm.migrate()` on the source, `listenForMigration()` on
//! the destination.

use std::sync::Arc;

use napi::bindgen_prelude::AsyncTask;
use napi_derive::napi;

use crate::error::{Fail, Result};
use crate::options::RestoreOpts;
use crate::runtime::runtime;
use crate::task::{blocking, Blocking};
use crate::vm::NativeVm;

/// `vm.migrate()` options.
#[napi(object)]
pub struct MigrateOpts {
    /// The token the receiver printed (required over TCP).
    pub token: Option<String>,
    /// The pause the VM may see, in milliseconds.
    pub downtime_ms: Option<u32>,
    /// Bytes per second at most on the link.
    pub bandwidth_limit: Option<f64>,
    /// Run the protocol over this shell command's stdin and stdout.
    pub via: Option<String>,
}

/// Where `dest` and `opts` send the VM, and how.
pub fn target(
    dest: String,
    opts: MigrateOpts,
) -> Result<(ferry::MigrateTarget, ferry::MigrateOptions)> {
    let target = ferry::MigrateTarget::from_parts(&dest, opts.via)
        .map_err(|e| Fail::new("SDK_INVALID_ARGUMENT", e))?;
    let limit = match opts.bandwidth_limit {
        Some(b) if !(b.is_finite() && b >= 1.0) => {
            return Err(Fail::new(
                "SDK_INVALID_ARGUMENT",
                "bandwidthLimit is bytes per second, at least 1",
            ))
        }
        b => b.map(|b| b as u64),
    };
    Ok((
        target,
        ferry::MigrateOptions {
            downtime_ms: opts
                .downtime_ms
                .map_or(ferry::DEFAULT_DOWNTIME_MS, u64::from),
            bandwidth_limit: limit,
            token: opts.token,
        },
    ))
}

/// A listener for one VM migrating here.
#[napi]
pub struct NativeReceiver {
    inner: Arc<ferry::Receiver>,
    address: String,
}

#[napi]
impl NativeReceiver {
    /// The one-time token the source must give.
    #[napi(getter)]
    pub fn token(&self) -> String {
        self.inner.token().to_string()
    }

    /// `HOST:PORT` it listens on.
    #[napi(getter)]
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// Waits for the migration; resolves to the VM once it runs here.
    #[napi]
    pub fn receive(&self, opts: RestoreOpts) -> Result<AsyncTask<Blocking<NativeVm>>> {
        let opts: ferry::ReceiveOptions = opts.into_ferry()?.into();
        let inner = Arc::clone(&self.inner);
        Ok(blocking(move || {
            let (vm, _report) = inner.receive(&opts, &mut |_| {})?;
            Ok(NativeVm::new(vm))
        }))
    }
}

/// Listens on `addr` for a VM migrating here.
#[napi]
pub fn listen_for_migration(addr: String) -> AsyncTask<Blocking<NativeReceiver>> {
    blocking(move || {
        let inner = runtime()?.listen_for_migration(&addr)?;
        let address = inner.local_addr()?.to_string();
        Ok(NativeReceiver {
            inner: Arc::new(inner),
            address,
        })
    })
}
