//! Live migration: `vm.migrate()` on the source, `listenForMigration()` on
//! the destination.

use std::sync::Arc;

use napi::bindgen_prelude::AsyncTask;
use napi_derive::napi;

use crate::error::Result;
use crate::options::RestoreOpts;
use crate::runtime::runtime;
use crate::task::{blocking, Blocking};
use crate::vm::NativeVm;

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
