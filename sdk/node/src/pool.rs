//! Warm images and pools: where a warm image is cached, waiting for a
//! guest listener, and pools of VMs restored from a snapshot. The build
//! itself (boot, files, the JavaScript warmup, snapshot) is driven from
//! JavaScript, since the warmup is an async JavaScript function.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use napi::bindgen_prelude::AsyncTask;
use napi::{Env, JsObject};
use napi_derive::napi;

use crate::options::ExtraFileJs;
use crate::runtime::runtime;
use crate::task::{blocking, Blocking};
use crate::vm::NativeVm;

/// What a warm image is made of (every field is part of its cache key).
#[napi(object)]
pub struct WarmSpecJs {
    pub image: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub cmd: Option<Vec<String>>,
    pub env: Option<HashMap<String, String>>,
    pub extra_files: Option<Vec<ExtraFileJs>>,
    pub warmup_tag: Option<String>,
    pub guest_port: Option<u32>,
}

/// Where a warm image is cached.
#[napi(object)]
pub struct WarmSlotJs {
    pub key: String,
    pub bundle: String,
    /// Whether it is built already.
    pub ready: bool,
}

impl WarmSpecJs {
    fn into_ferry(self) -> ferry::WarmImageSpec {
        let mut env: Vec<(String, String)> = self.env.unwrap_or_default().into_iter().collect();
        env.sort();
        ferry::WarmImageSpec {
            image: self.image,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            cmd: self.cmd,
            env,
            extra_files: self
                .extra_files
                .unwrap_or_default()
                .into_iter()
                .map(|f| ferry::ExtraFile {
                    path: f.path,
                    data: f.data.to_vec(),
                    mode: f.mode.unwrap_or(0o644),
                })
                .collect(),
            warmup_tag: self.warmup_tag,
            listener_port: self.guest_port.and_then(|p| u16::try_from(p).ok()),
        }
    }
}

/// The cache slot of a warm image (pulls a registry image to learn its digest).
#[napi]
pub fn warm_image_slot(spec: WarmSpecJs) -> AsyncTask<Blocking<WarmSlotJs>> {
    let spec = spec.into_ferry();
    blocking(move || {
        let slot = runtime()?.warm_image_slot(&spec)?;
        Ok(WarmSlotJs {
            key: slot.key,
            ready: slot.bundle.is_file(),
            bundle: slot.bundle.display().to_string(),
        })
    })
}

/// Waits until something listens on guest TCP `port` of VM `name`.
#[napi]
pub fn wait_for_listener(name: String, port: u32, timeout_ms: u32) -> AsyncTask<Blocking<()>> {
    blocking(move || {
        let port = u16::try_from(port).map_err(|_| {
            crate::error::Fail::invalid(format!("guest port {port} is out of range"))
        })?;
        runtime()?
            .open_running(&name)?
            .wait_for_listener(port, Duration::from_millis(u64::from(timeout_ms)))?;
        Ok(())
    })
}

/// How a pool behaves.
#[napi(object)]
pub struct PoolOptsJs {
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub acquire_timeout_ms: Option<u32>,
    pub idle_timeout_ms: Option<u32>,
    pub restore_on_release: Option<bool>,
}

/// A pool's counts.
#[napi(object)]
pub struct PoolStatsJs {
    pub alive: u32,
    pub in_use: u32,
    pub idle: u32,
    pub waiting: u32,
    pub min: u32,
    pub max: u32,
}

/// A pool of VMs restored from one snapshot bundle.
#[napi]
pub struct NativePool {
    pool: Arc<ferry::Pool>,
}

/// Starts a pool of VMs restored from `bundle` (its manifest is checked
/// now; the VMs are restored in the background).
#[napi]
pub fn create_pool(bundle: String, opts: PoolOptsJs) -> napi::Result<NativePool> {
    let defaults = ferry::PoolOptions::default();
    let ms = |v: Option<u32>, d: Duration| v.map_or(d, |v| Duration::from_millis(u64::from(v)));
    let options = ferry::PoolOptions {
        min: opts.min.map_or(defaults.min, |v| v as usize),
        max: opts.max.map_or(defaults.max, |v| v as usize),
        acquire_timeout: ms(opts.acquire_timeout_ms, defaults.acquire_timeout),
        idle_timeout: ms(opts.idle_timeout_ms, defaults.idle_timeout),
        restore_on_release: opts
            .restore_on_release
            .unwrap_or(defaults.restore_on_release),
    };
    let rt = runtime()?;
    let image = rt
        .warm_image_from_snapshot(std::path::Path::new(&bundle))
        .map_err(crate::error::Fail::from)?;
    let pool = image.pool(options).map_err(crate::error::Fail::from)?;
    Ok(NativePool {
        pool: Arc::new(pool),
    })
}

#[napi]
impl NativePool {
    /// A VM from the pool (waits up to acquireTimeoutMs). The wait runs on
    /// a thread of its own, not on libuv's pool: callers waiting for a
    /// release must not take the threads the holders' execs need.
    #[napi(ts_return_type = "Promise<NativePooledVm>")]
    pub fn acquire(&self, env: Env) -> napi::Result<JsObject> {
        let (deferred, promise) = env.create_deferred()?;
        let pool = Arc::clone(&self.pool);
        std::thread::Builder::new()
            .name("ferry-acquire".into())
            .spawn(move || match pool.acquire() {
                Ok(vm) => deferred.resolve(move |_| {
                    Ok(NativePooledVm {
                        vm: Arc::new(Mutex::new(Some(vm))),
                    })
                }),
                Err(e) => deferred.reject(crate::error::Fail::from(e).into_napi()),
            })
            .map_err(|e| napi::Error::from_reason(format!("cannot start a thread: {e}")))?;
        Ok(promise)
    }

    /// The pool's counts.
    #[napi]
    pub fn stats(&self) -> PoolStatsJs {
        let s = self.pool.stats();
        PoolStatsJs {
            alive: s.alive as u32,
            in_use: s.in_use as u32,
            idle: s.idle as u32,
            waiting: s.waiting as u32,
            min: s.min as u32,
            max: s.max as u32,
        }
    }

    /// Removes idle VMs and stops the pool; VMs in use go when released.
    #[napi]
    pub fn shutdown(&self) -> AsyncTask<Blocking<()>> {
        let pool = Arc::clone(&self.pool);
        blocking(move || {
            pool.shutdown();
            Ok(())
        })
    }
}

/// A VM handed out by a pool.
#[napi]
pub struct NativePooledVm {
    vm: Arc<Mutex<Option<ferry::PooledVm>>>,
}

#[napi]
impl NativePooledVm {
    /// The VM (for exec, files, ports).
    #[napi]
    pub fn vm(&self) -> napi::Result<NativeVm> {
        let guard = self.vm.lock().unwrap_or_else(|p| p.into_inner());
        let vm = guard.as_ref().ok_or_else(|| {
            crate::error::Fail::new("POOL_VM_RELEASED", "the VM was released to its pool")
        })?;
        Ok(NativeVm::new((**vm).clone()))
    }

    /// Gives the VM back to its pool.
    #[napi]
    pub fn release(&self) -> AsyncTask<Blocking<()>> {
        let vm = Arc::clone(&self.vm);
        blocking(move || {
            if let Some(v) = vm.lock().unwrap_or_else(|p| p.into_inner()).take() {
                v.release();
            }
            Ok(())
        })
    }
}
