//! Warm images and pools: where a warm image is cached, and pools of VMs
//! restored from a snapshot. The build itself (boot, files, the warmup,
//! snapshot) is driven from Python, since the warmup is a Python callable
//! (a coroutine function under asyncio).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::calls::{blocking, secs};
use crate::error::Fail;
use crate::runtime::runtime;
use crate::vm::Vm;

/// The cache slot of the warm image of this spec (pulls a registry image
/// to learn its digest): `(key, bundle path, built already)`.
#[pyfunction]
#[pyo3(signature = (image, cpus, memory_mib, cmd, env, extra_files, warmup_tag, guest_port))]
#[allow(clippy::too_many_arguments)]
fn warm_image_slot(
    py: Python<'_>,
    image: Option<String>,
    cpus: Option<u32>,
    memory_mib: Option<u32>,
    cmd: Option<Vec<String>>,
    env: HashMap<String, String>,
    extra_files: Vec<(String, Bound<'_, PyBytes>, u32)>,
    warmup_tag: Option<String>,
    guest_port: Option<u16>,
) -> PyResult<(String, String, bool)> {
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort();
    let spec = ferry::WarmImageSpec {
        image,
        cpus,
        memory_mib,
        cmd,
        env,
        extra_files: extra_files
            .into_iter()
            .map(|(path, data, mode)| ferry::ExtraFile {
                path,
                data: data.as_bytes().to_vec(),
                mode,
            })
            .collect(),
        warmup_tag,
        listener_port: guest_port,
    };
    blocking(py, || {
        let slot = runtime()?.warm_image_slot(&spec)?;
        Ok((
            slot.key,
            slot.bundle.display().to_string(),
            slot.bundle.is_file(),
        ))
    })
}

/// A pool's counts.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct PoolStats {
    /// VMs alive (idle and in use).
    alive: usize,
    /// VMs handed out.
    in_use: usize,
    /// VMs ready to hand out.
    idle: usize,
    /// Callers waiting for a VM.
    waiting: usize,
    /// The pool's floor.
    min: usize,
    /// The pool's ceiling.
    max: usize,
}

#[pymethods]
impl PoolStats {
    fn __repr__(&self) -> String {
        format!(
            "PoolStats(alive={}, in_use={}, idle={}, waiting={}, min={}, max={})",
            self.alive, self.in_use, self.idle, self.waiting, self.min, self.max
        )
    }
}

/// A pool of VMs restored from one snapshot bundle.
#[pyclass(frozen, module = "ferry._native")]
pub struct Pool {
    pool: Arc<ferry::Pool>,
}

#[pymethods]
impl Pool {
    /// Starts a pool of VMs restored from `bundle` (its manifest is checked
    /// now; the VMs are restored in the background). Times in seconds;
    /// None takes the default.
    #[new]
    #[pyo3(signature = (bundle, min, max, acquire_timeout, idle_timeout, restore_on_release))]
    fn new(
        py: Python<'_>,
        bundle: std::path::PathBuf,
        min: Option<usize>,
        max: Option<usize>,
        acquire_timeout: Option<f64>,
        idle_timeout: Option<f64>,
        restore_on_release: Option<bool>,
    ) -> PyResult<Pool> {
        let d = ferry::PoolOptions::default();
        let options = ferry::PoolOptions {
            min: min.unwrap_or(d.min),
            max: max.unwrap_or(d.max),
            acquire_timeout: acquire_timeout
                .map(|s| secs(s, "acquire_timeout"))
                .transpose()?
                .unwrap_or(d.acquire_timeout),
            idle_timeout: idle_timeout
                .map(|s| secs(s, "idle_timeout"))
                .transpose()?
                .unwrap_or(d.idle_timeout),
            restore_on_release: restore_on_release.unwrap_or(d.restore_on_release),
        };
        blocking(py, || {
            let image = runtime()?.warm_image_from_snapshot(&bundle)?;
            Ok(Pool {
                pool: Arc::new(image.pool(options)?),
            })
        })
    }

    /// A VM from the pool (waits up to the acquire timeout).
    fn acquire(&self, py: Python<'_>) -> PyResult<PooledVm> {
        let vm = blocking(py, || Ok(self.pool.acquire()?))?;
        Ok(PooledVm {
            vm: Arc::new(Mutex::new(Some(vm))),
        })
    }

    /// The pool's counts.
    fn stats(&self) -> PoolStats {
        let s = self.pool.stats();
        PoolStats {
            alive: s.alive,
            in_use: s.in_use,
            idle: s.idle,
            waiting: s.waiting,
            min: s.min,
            max: s.max,
        }
    }

    /// Removes idle VMs and stops the pool; VMs in use go when released.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        blocking(py, || {
            self.pool.shutdown();
            Ok(())
        })
    }
}

/// A VM handed out by a pool.
#[pyclass(frozen, module = "ferry._native")]
pub struct PooledVm {
    vm: Arc<Mutex<Option<ferry::PooledVm>>>,
}

#[pymethods]
impl PooledVm {
    /// The VM (for exec, files, ports).
    fn vm(&self) -> PyResult<Vm> {
        let guard = self.vm.lock().unwrap_or_else(|p| p.into_inner());
        let vm = guard
            .as_ref()
            .ok_or_else(|| Fail::new("POOL_VM_RELEASED", "the VM was released to its pool"))?;
        Ok(Vm::new((**vm).clone()))
    }

    /// Gives the VM back to its pool; a second call does nothing.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.vm.clone();
        blocking(py, move || {
            if let Some(v) = vm.lock().unwrap_or_else(|p| p.into_inner()).take() {
                v.release();
            }
            Ok(())
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(warm_image_slot, m)?)?;
    m.add_class::<Pool>()?;
    m.add_class::<PooledVm>()?;
    m.add_class::<PoolStats>()?;
    Ok(())
}
