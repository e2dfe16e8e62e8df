//! Live migration: `Vm.migrate` on the source, `listen_for_migration` on
//! the destination.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::calls::blocking;
use crate::runtime::runtime;
use crate::vm::Vm;

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
