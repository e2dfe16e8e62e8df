//! Live migration: `Vm.migrate` on the source, `listen_for_migration` on
//! the destination.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::calls::blocking;
use crate::error::Fail;
use crate::runtime::runtime;
use crate::vm::Vm;

/// Where and how `Vm.migrate` sends the VM.
pub(crate) fn target(
    dest: String,
    token: Option<String>,
    downtime_ms: Option<u64>,
    bandwidth_limit: Option<u64>,
    via: Option<String>,
) -> Result<(ferry::MigrateTarget, ferry::MigrateOptions), Fail> {
    let target = ferry::MigrateTarget::from_parts(&dest, via)
        .map_err(|e| Fail::new("SDK_INVALID_ARGUMENT", e))?;
    if bandwidth_limit == Some(0) {
        return Err(Fail::new(
            "SDK_INVALID_ARGUMENT",
            "bandwidth_limit is bytes per second, at least 1",
        ));
    }
    Ok((
        target,
        ferry::MigrateOptions {
            downtime_ms: downtime_ms.unwrap_or(ferry::DEFAULT_DOWNTIME_MS),
            bandwidth_limit,
            token,
        },
    ))
}

/// A listener for one VM migrating here.
#[pyclass(module = "ferry._native", frozen)]
pub struct Receiver {
    inner: Arc<ferry::Receiver>,
    #[pyo3(get)]
    address: String,
}

#[pymethods]
impl Receiver {
    /// The one-time token the source must give.
    #[getter]
    fn token(&self) -> String {
        self.inner.token().to_string()
    }

    /// Waits for the migration; returns the VM once it runs here.
    #[pyo3(signature = (name, ports_, net, live_mounts, trust_bundle_config))]
    fn receive(
        &self,
        py: Python<'_>,
        name: Option<String>,
        ports_: Option<Vec<String>>,
        net: bool,
        live_mounts: Vec<String>,
        trust_bundle_config: bool,
    ) -> PyResult<Vm> {
        let opts: ferry::ReceiveOptions =
            crate::runtime::restore_options(name, ports_, net, live_mounts, trust_bundle_config)?
                .into();
        let inner = Arc::clone(&self.inner);
        blocking(py, move || {
            let (vm, _report) = inner.receive(&opts, &mut |_| {})?;
            Ok(Vm::new(vm))
        })
    }
}

/// Listens on `addr` (`HOST:PORT`) for a VM migrating here.
#[pyfunction]
fn listen_for_migration(py: Python<'_>, addr: String) -> PyResult<Receiver> {
    blocking(py, move || {
        let inner = runtime()?.listen_for_migration(&addr)?;
        let address = inner.local_addr()?.to_string();
        Ok(Receiver {
            inner: Arc::new(inner),
            address,
        })
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(listen_for_migration, m)?)?;
    m.add_class::<Receiver>()?;
    Ok(())
}
