//! The module's functions: boot, restore, attach, list, images (fleet
//! storage's are in `store.rs`).

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::calls::{blocking, ports, secs};
use crate::error::{Fail, Result};
use crate::vm::{Vm, VmInfo};

/// The runtime every call uses ([`ferry::Runtime::shared`]).
pub(crate) fn runtime() -> Result<ferry::Runtime> {
    Ok(ferry::Runtime::shared()?)
}

/// Boots a VM and returns once its guest agent answers.
#[pyfunction]
#[pyo3(signature = (image, name, cpus, memory_mib, ports_, mounts, live_mounts, net, env, workdir, cmd, cold, ephemeral, run_image_command))]
#[allow(clippy::too_many_arguments)]
fn boot(
    py: Python<'_>,
    image: Option<String>,
    name: Option<String>,
    cpus: Option<u32>,
    memory_mib: Option<u32>,
    ports_: Vec<String>,
    mounts: Vec<String>,
    live_mounts: Vec<String>,
    net: bool,
    env: Option<HashMap<String, String>>,
    workdir: Option<String>,
    cmd: Option<Vec<String>>,
    cold: bool,
    ephemeral: bool,
    run_image_command: bool,
) -> PyResult<Vm> {
    let mounts = ferry::parse::mounts(&mounts, &live_mounts)
        .map_err(|e| Fail::from(ferry::Error::from(e)))?;
    let run_image_command = run_image_command && cmd.is_none();
    let opts = ferry::BootOptions {
        image: image.map(PathBuf::from),
        name,
        cpus,
        memory_mib,
        ports: ports(&ports_)?,
        mounts,
        net,
        env: env.unwrap_or_default().into_iter().collect(),
        workdir,
        cmd,
        run_image_command,
        cold,
        ephemeral,
        kernel: None,
    };
    blocking(py, || Ok(Vm::new(runtime()?.boot(opts)?)))
}

pub(crate) fn restore_options(
    name: Option<String>,
    ports_: Option<Vec<String>>,
    net: bool,
    live_mounts: Vec<String>,
    trust_bundle_config: bool,
) -> Result<ferry::RestoreOptions> {
    Ok(ferry::RestoreOptions {
        name,
        ports: ports_.map(|p| ports(&p)).transpose()?,
        net,
        live_mounts: live_mounts.into_iter().map(PathBuf::from).collect(),
        trust_bundle_config,
        ..ferry::RestoreOptions::default()
    })
}

/// Restores the bundle file `path`, or the VM pushed as `path` when it is
/// an `s3://BUCKET/PREFIX/DIGEST` address.
#[pyfunction]
#[pyo3(signature = (path, name, ports_, net, live_mounts, trust_bundle_config))]
fn restore_path(
    py: Python<'_>,
    path: PathBuf,
    name: Option<String>,
    ports_: Option<Vec<String>>,
    net: bool,
    live_mounts: Vec<String>,
    trust_bundle_config: bool,
) -> PyResult<Vm> {
    let opts = restore_options(name, ports_, net, live_mounts, trust_bundle_config)?;
    let source = match path.to_str() {
        Some(url) if ferry::StoreUrl::is_store(url) => {
            // A malformed address fails here, before the host checks a
            // restore makes first.
            crate::store::check_url(url, true)?;
            ferry::RestoreSource::Store(url.to_string())
        }
        _ => ferry::RestoreSource::Path(path),
    };
    blocking(py, || Ok(Vm::new(runtime()?.restore(source, opts)?)))
}

/// Restores a bundle read from the binary file object `reader` (anything
/// with `readinto`, `read` or `recv`).
#[pyfunction]
#[pyo3(signature = (reader, name, ports_, net, live_mounts, trust_bundle_config))]
fn restore_reader(
    py: Python<'_>,
    reader: PyObject,
    name: Option<String>,
    ports_: Option<Vec<String>>,
    net: bool,
    live_mounts: Vec<String>,
    trust_bundle_config: bool,
) -> PyResult<Vm> {
    let opts = restore_options(name, ports_, net, live_mounts, trust_bundle_config)?;
    let reader = crate::io::PyReader::new(py, reader)?;
    blocking(py, || {
        let source = ferry::RestoreSource::Reader(Box::new(reader));
        Ok(Vm::new(runtime()?.restore(source, opts)?))
    })
}

/// Opens an existing VM by name.
#[pyfunction]
fn attach(py: Python<'_>, name: String) -> PyResult<Vm> {
    blocking(py, || Ok(Vm::new(runtime()?.open(&name)?)))
}

/// Every VM, sorted by name.
#[pyfunction]
fn list(py: Python<'_>) -> PyResult<Vec<VmInfo>> {
    blocking(py, || {
        Ok(runtime()?.list().into_iter().map(VmInfo::from).collect())
    })
}

/// Every stable error code as `(code, meaning, action)`.
#[pyfunction]
fn error_codes(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyTuple>>> {
    ferry::codes()
        .iter()
        .map(|c| PyTuple::new(py, [c.code, c.meaning, c.action]))
        .collect()
}

/// A pulled image.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct ImageInfo {
    /// References that were pulled to it.
    references: Vec<String>,
    /// Manifest digest (`sha256:...`).
    digest: String,
    /// First 12 hex digits of the digest.
    id: String,
    /// Bytes of its layers as pulled (compressed).
    size: u64,
    /// When it was first pulled (seconds since the epoch).
    created: u64,
    /// Entrypoint followed by Cmd.
    command: Vec<String>,
    /// `NAME=value` entries.
    env: Vec<String>,
    /// Working directory of its command.
    workdir: Option<String>,
    /// User of its command.
    user: Option<String>,
}

#[pymethods]
impl ImageInfo {
    fn __repr__(&self) -> String {
        format!(
            "ImageInfo(id={:?}, references={:?}, size={})",
            self.id, self.references, self.size
        )
    }
}

impl From<ferry::CachedImage> for ImageInfo {
    fn from(i: ferry::CachedImage) -> Self {
        ImageInfo {
            id: i.id().to_string(),
            references: i.references,
            digest: i.digest,
            size: i.size,
            created: i.created,
            command: i.spec.command,
            env: i.spec.env,
            workdir: i.spec.workdir,
            user: i.spec.user,
        }
    }
}

/// Pulls `reference` into ferry's image cache.
#[pyfunction]
fn pull_image(
    py: Python<'_>,
    reference: String,
    insecure_registries: Vec<String>,
) -> PyResult<ImageInfo> {
    blocking(py, || {
        let options = ferry::PullOptions {
            insecure_registries,
        };
        Ok(runtime()?
            .pull_image(&reference, &options, &mut |_| {})?
            .into())
    })
}

/// Every pulled image, oldest first.
#[pyfunction]
fn images(py: Python<'_>) -> PyResult<Vec<ImageInfo>> {
    blocking(py, || {
        Ok(runtime()?.images().into_iter().map(Into::into).collect())
    })
}

/// Removes a pulled image, by reference, digest or id.
#[pyfunction]
fn remove_image(py: Python<'_>, name: String) -> PyResult<ImageInfo> {
    blocking(py, || Ok(runtime()?.remove_image(&name)?.into()))
}

/// Waits until something listens on guest TCP `port` of the VM `name`.
#[pyfunction]
fn wait_for_listener(py: Python<'_>, name: String, port: u16, timeout: f64) -> PyResult<()> {
    let timeout = secs(timeout, "timeout")?;
    blocking(py, || {
        runtime()?
            .open_running(&name)?
            .wait_for_listener(port, timeout)?;
        Ok(())
    })
}

/// ferry's data directory (VM state, received bundles).
#[pyfunction]
fn data_dir() -> PyResult<PathBuf> {
    Ok(runtime()?.config().dirs.data.clone())
}

/// Pushes the bundle file `path` to the store `store`.
#[pyfunction]
fn push_bundle(py: Python<'_>, path: PathBuf, store: String) -> PyResult<crate::store::PushReport> {
    crate::store::check_url(&store, false)?;
    blocking(py, || {
        Ok(runtime()?.push_bundle(&path, &store, &mut |_| {})?.into())
    })
}

/// Fetches the VM pushed as `url` into the bundle file `dest`.
#[pyfunction]
fn pull_bundle(py: Python<'_>, url: String, dest: PathBuf) -> PyResult<crate::store::PullReport> {
    crate::store::check_url(&url, true)?;
    blocking(py, || {
        Ok(runtime()?.pull_bundle(&url, &dest, &mut |_| {})?.into())
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(boot, m)?)?;
    m.add_function(wrap_pyfunction!(push_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(pull_bundle, m)?)?;
    m.add_function(wrap_pyfunction!(restore_path, m)?)?;
    m.add_function(wrap_pyfunction!(restore_reader, m)?)?;
    m.add_function(wrap_pyfunction!(attach, m)?)?;
    m.add_function(wrap_pyfunction!(list, m)?)?;
    m.add_function(wrap_pyfunction!(error_codes, m)?)?;
    m.add_function(wrap_pyfunction!(pull_image, m)?)?;
    m.add_function(wrap_pyfunction!(images, m)?)?;
    m.add_function(wrap_pyfunction!(remove_image, m)?)?;
    m.add_function(wrap_pyfunction!(wait_for_listener, m)?)?;
    m.add_function(wrap_pyfunction!(data_dir, m)?)?;
    m.add_class::<ImageInfo>()?;
    Ok(())
}
