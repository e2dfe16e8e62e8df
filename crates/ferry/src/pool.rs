//! Warm images and pools: a VM booted once, warmed up and saved as a
//! snapshot ([`WarmImage`]), and a pool of VMs restored from it that hands
//! them out in a queue pop ([`Pool::acquire`]) and takes them back
//! ([`PooledVm::release`]), replacing each with a fresh restore when asked so
//! no state passes from one user to the next.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{
    BootOptions, Error, RestoreOptions, RestoreSource, Result, Runtime, SnapshotOptions, Vm,
};

/// A file put into the VM before its warmup.
#[derive(Debug, Clone)]
pub struct ExtraFile {
    /// Absolute path in the guest.
    pub path: String,
    /// Its contents.
    pub data: Vec<u8>,
    /// Its mode.
    pub mode: u32,
}

/// What a warm image is made of; every field is part of its cache key.
#[derive(Debug, Clone, Default)]
pub struct WarmImageSpec {
    /// Image: an OCI reference, a rootfs tarball or ext4 image; the base
    /// image when absent.
    pub image: Option<String>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u32>,
    /// Main command (e.g. a server); the VM idles when absent.
    pub cmd: Option<Vec<String>>,
    /// Environment of the main command.
    pub env: Vec<(String, String)>,
    /// Files written before the warmup.
    pub extra_files: Vec<ExtraFile>,
    /// Names a warmup: change it when the warmup changes.
    pub warmup_tag: Option<String>,
    /// Wait until something listens on this guest TCP port before saving.
    pub listener_port: Option<u16>,
}

/// A snapshot that pools restore from.
#[derive(Debug, Clone)]
pub struct WarmImage {
    rt: Runtime,
    bundle: PathBuf,
    key: String,
}

/// How long a build waits for the listener.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(120);

impl WarmImage {
    /// The snapshot bundle.
    pub fn bundle(&self) -> &Path {
        &self.bundle
    }

    /// The cache key (a hex digest of the inputs; the bundle path's digest
    /// for [`Runtime::warm_image_from_snapshot`]).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Starts a pool of VMs restored from this image.
    pub fn pool(&self, opts: PoolOptions) -> Result<Pool> {
        Pool::start(self.clone(), opts)
    }
}

impl Runtime {
    /// Builds (or finds in the cache) a warm image: boots `spec`, writes its
    /// files, runs `warmup`, waits for the listener when asked, and saves a
    /// snapshot. Same inputs, same image: a second call returns at once.
    pub fn build_warm_image(
        &self,
        spec: &WarmImageSpec,
        warmup: &mut dyn FnMut(&Vm) -> Result<()>,
    ) -> Result<WarmImage> {
        let slot = self.warm_image_slot(spec)?;
        let (key, bundle) = (slot.key, slot.bundle);
        let dir = bundle.parent().unwrap_or(Path::new(".")).to_path_buf();
        if bundle.is_file() {
            return Ok(WarmImage {
                rt: self.clone(),
                bundle,
                key,
            });
        }
        let vm = self.boot(BootOptions {
            image: spec.image.as_ref().map(PathBuf::from),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            cmd: spec.cmd.clone(),
            env: spec.env.iter().cloned().collect(),
            run_image_command: spec.cmd.is_none(),
            ephemeral: true,
            ..BootOptions::default()
        })?;
        let made = (|| {
            for f in &spec.extra_files {
                vm.write_file(&f.path, &f.data, f.mode)?;
            }
            warmup(&vm)?;
            if let Some(port) = spec.listener_port {
                vm.wait_for_listener(port, LISTENER_TIMEOUT)?;
            }
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::new("IMAGE_IO", format!("create {}: {e}", dir.display()), None)
            })?;
            let staging = dir.join(format!(".vm.bundle.{}.partial", std::process::id()));
            // Raw memory: restored VMs map pages they have not written from
            // the bundle's page cache, one copy for the whole pool.
            let raw = SnapshotOptions {
                raw_memory: true,
                ..SnapshotOptions::default()
            };
            vm.snapshot_to_path(&staging, &raw)?;
            std::fs::rename(&staging, &bundle).map_err(|e| {
                let _ = std::fs::remove_file(&staging);
                Error::new(
                    "IMAGE_IO",
                    format!("publish {}: {e}", bundle.display()),
                    None,
                )
            })
        })();
        let _ = vm.remove();
        made?;
        Ok(WarmImage {
            rt: self.clone(),
            bundle,
            key,
        })
    }

    /// A warm image from any snapshot bundle (which must stay in place).
    pub fn warm_image_from_snapshot(&self, bundle: &Path) -> Result<WarmImage> {
        self.inspect_bundle(bundle)?;
        let bundle = std::fs::canonicalize(bundle).map_err(|e| {
            Error::new(
                "IMAGE_NOT_FOUND",
                format!("{}: {e}", bundle.display()),
                None,
            )
        })?;
        let key = hex::encode(Sha256::digest(bundle.to_string_lossy().as_bytes()));
        Ok(WarmImage {
            rt: self.clone(),
            bundle,
            key,
        })
    }

    /// Where the warm image of `spec` is cached (its cache key, pulling a
    /// registry image to learn its digest); `bundle` exists once built.
    pub fn warm_image_slot(&self, spec: &WarmImageSpec) -> Result<WarmSlot> {
        let key = self.warm_key(spec)?;
        let bundle = self
            .config()
            .dirs
            .cache
            .join("warm")
            .join(&key)
            .join("vm.bundle");
        Ok(WarmSlot { key, bundle })
    }

    fn warm_key(&self, spec: &WarmImageSpec) -> Result<String> {
        let image = match &spec.image {
            Some(text) if !Path::new(text).exists() => {
                // A registry reference: its digest, pulled now if need be.
                let cached = match ferry_runtime::oci_images::find(self.config(), text) {
                    Some(c) => c,
                    None => self.pull_image(text, &Default::default(), &mut |_| {})?,
                };
                cached.digest
            }
            Some(path) => file_identity(Path::new(path)),
            None => "base".into(),
        };
        let files: Vec<_> = spec
            .extra_files
            .iter()
            .map(|f| (f.path.clone(), f.mode, hex::encode(Sha256::digest(&f.data))))
            .collect();
        let inputs = serde_json::json!({
            "image": image,
            "cpus": spec.cpus,
            "memory_mib": spec.memory_mib,
            "cmd": spec.cmd,
            "env": spec.env,
            "files": files,
            "warmup_tag": spec.warmup_tag,
            "listener_port": spec.listener_port,
        });
        Ok(hex::encode(Sha256::digest(inputs.to_string().as_bytes()))[..32].to_string())
    }
}

/// A local image file's identity: its path, size and modification time.
fn file_identity(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    format!(
        "{}:{}:{:?}",
        std::fs::canonicalize(path)
            .unwrap_or(path.to_path_buf())
            .display(),
        meta.as_ref().map_or(0, |m| m.len()),
        meta.and_then(|m| m.modified().ok())
    )
}

/// Where a warm image is cached.
#[derive(Debug, Clone)]
pub struct WarmSlot {
    /// The cache key.
    pub key: String,
    /// The bundle's path (present once built).
    pub bundle: PathBuf,
}

impl Vm {
    /// Waits until something in the guest accepts TCP connections on
    /// `port` (probed through the agent, so no port is forwarded).
    pub fn wait_for_listener(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.client().forward(port).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    "POOL_LISTENER_TIMEOUT",
                    format!(
                        "nothing listened on guest port {port} within {} s",
                        timeout.as_secs()
                    ),
                    Some("check that the image's command starts its server on that port".into()),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How a pool behaves.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Idle VMs kept ready.
    pub min: usize,
    /// Most VMs alive at once (idle, in use and starting).
    pub max: usize,
    /// How long [`Pool::acquire`] waits when `max` VMs are in use.
    pub acquire_timeout: Duration,
    /// Idle VMs beyond `min` are removed after this long unused.
    pub idle_timeout: Duration,
    /// A released VM is removed and replaced by a fresh restore (no state
    /// passes between users); otherwise it goes back to the pool as it is.
    pub restore_on_release: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            min: 1,
            max: 4,
            acquire_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            restore_on_release: true,
        }
    }
}

/// A pool's counts at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// VMs alive: idle, in use and being restored.
    pub alive: usize,
    /// VMs handed out.
    pub in_use: usize,
    /// VMs ready in the pool.
    pub idle: usize,
    /// Callers waiting in `acquire`.
    pub waiting: usize,
    /// The pool's `min`.
    pub min: usize,
    /// The pool's `max`.
    pub max: usize,
}

#[derive(Default)]
struct State {
    idle: VecDeque<(Vm, Instant)>,
    in_use: usize,
    starting: usize,
    waiting: usize,
    /// Released VMs to remove (restore_on_release, or shutdown).
    doomed: Vec<Vm>,
    shut: bool,
    /// The last restore failure, reported to waiters.
    failure: Option<Error>,
}

struct Shared {
    image: WarmImage,
    opts: PoolOptions,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn alive(s: &State) -> usize {
        s.idle.len() + s.in_use + s.starting
    }

    fn restore_one(&self) -> Result<Vm> {
        let name = format!(
            "pool-{}",
            ferry_runtime::fsutil::random_hex(6).map_err(|e| {
                Error::new("POOL_RESTORE_FAILED", format!("random name: {e}"), None)
            })?
        );
        self.image.rt.restore(
            RestoreSource::Path(self.image.bundle.clone()),
            RestoreOptions {
                name: Some(name),
                trust_bundle_config: true,
                ..RestoreOptions::default()
            },
        )
    }
}

/// VMs restored from a [`WarmImage`], handed out and taken back.
pub struct Pool {
    shared: Arc<Shared>,
    keeper: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Pool {
    fn start(image: WarmImage, opts: PoolOptions) -> Result<Pool> {
        if opts.max == 0 || opts.min > opts.max {
            return Err(Error::new(
                "POOL_OPTIONS_INVALID",
                format!(
                    "min {} and max {}: need 0 <= min <= max and max >= 1",
                    opts.min, opts.max
                ),
                None,
            ));
        }
        let shared = Arc::new(Shared {
            image,
            opts,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let keeper = std::thread::Builder::new()
            .name("ferry-pool".into())
            .spawn(move || keep(&s))
            .map_err(|e| Error::new("POOL_RESTORE_FAILED", format!("pool thread: {e}"), None))?;
        Ok(Pool {
            shared,
            keeper: Mutex::new(Some(keeper)),
        })
    }

    /// A VM from the pool: an idle one at once, else a new restore while
    /// fewer than `max` are alive, else the first released within
    /// `acquire_timeout` (then `POOL_EXHAUSTED`).
    pub fn acquire(&self) -> Result<PooledVm> {
        let sh = &self.shared;
        let deadline = Instant::now() + sh.opts.acquire_timeout;
        let mut s = sh.lock();
        s.waiting += 1;
        let got = loop {
            if s.shut {
                break Err(Error::new("POOL_SHUT_DOWN", "the pool was shut down", None));
            }
            if let Some((vm, _)) = s.idle.pop_front() {
                s.in_use += 1;
                break Ok(vm);
            }
            if Shared::alive(&s) < sh.opts.max {
                s.starting += 1;
                drop(s);
                let made = sh.restore_one();
                s = sh.lock();
                s.starting -= 1;
                match made {
                    Ok(vm) => {
                        s.in_use += 1;
                        break Ok(vm);
                    }
                    Err(e) => break Err(e),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Error::new(
                    "POOL_EXHAUSTED",
                    format!(
                        "all {} VMs of the pool stayed in use for {} ms",
                        sh.opts.max,
                        sh.opts.acquire_timeout.as_millis()
                    ),
                    Some("release VMs sooner, raise max, or wait longer (acquireTimeoutMs)".into()),
                ));
            }
            s = sh
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        s.waiting -= 1;
        sh.changed.notify_all();
        drop(s);
        got.map(|vm| PooledVm {
            vm: Some(vm),
            shared: Arc::clone(sh),
        })
    }

    /// The pool's counts.
    pub fn stats(&self) -> PoolStats {
        let s = self.shared.lock();
        PoolStats {
            alive: Shared::alive(&s),
            in_use: s.in_use,
            idle: s.idle.len(),
            waiting: s.waiting,
            min: self.shared.opts.min,
            max: self.shared.opts.max,
        }
    }

    /// Removes every idle VM and stops keeping the pool warm; VMs in use
    /// are removed when released. Waiters get `POOL_SHUT_DOWN`.
    pub fn shutdown(&self) {
        {
            let mut s = self.shared.lock();
            s.shut = true;
            let idle: Vec<Vm> = s.idle.drain(..).map(|(vm, _)| vm).collect();
            s.doomed.extend(idle);
            self.shared.changed.notify_all();
        }
        let keeper = self
            .keeper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(k) = keeper {
            let _ = k.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Keeps `min` idle VMs (within `max`), removes released and long-idle ones.
fn keep(sh: &Shared) {
    loop {
        let mut s = sh.lock();
        let doomed = std::mem::take(&mut s.doomed);
        if !doomed.is_empty() {
            drop(s);
            for vm in doomed {
                let _ = vm.remove();
            }
            continue;
        }
        if s.shut {
            return;
        }
        // Idle VMs beyond min, unused for idle_timeout.
        let now = Instant::now();
        while s.idle.len() > sh.opts.min
            && s.idle
                .back()
                .is_some_and(|(_, since)| now.duration_since(*since) >= sh.opts.idle_timeout)
        {
            if let Some((vm, _)) = s.idle.pop_back() {
                s.doomed.push(vm);
            }
        }
        if !s.doomed.is_empty() {
            continue;
        }
        let want = s.idle.len() + s.starting < sh.opts.min && Shared::alive(&s) < sh.opts.max;
        if want && s.failure.is_none() {
            s.starting += 1;
            drop(s);
            let made = sh.restore_one();
            let mut s = sh.lock();
            s.starting -= 1;
            match made {
                Ok(vm) if !s.shut => s.idle.push_back((vm, Instant::now())),
                Ok(vm) => s.doomed.push(vm),
                Err(e) => {
                    tracing::warn!("pool restore failed: {e}");
                    s.failure = Some(e);
                }
            }
            sh.changed.notify_all();
            continue;
        }
        // A failed restore is retried after a pause, not in a tight loop.
        let pause = if s.failure.take().is_some() {
            Duration::from_secs(1)
        } else {
            sh.opts.idle_timeout.min(Duration::from_secs(1))
        };
        let _ = sh
            .changed
            .wait_timeout(s, pause)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// A VM handed out by a [`Pool`]; derefs to [`Vm`]. Dropping it releases it.
pub struct PooledVm {
    vm: Option<Vm>,
    shared: Arc<Shared>,
}

impl PooledVm {
    /// Gives the VM back: replaced by a fresh restore with
    /// `restore_on_release`, else idle again as it is.
    pub fn release(mut self) {
        self.give_back();
    }

    fn give_back(&mut self) {
        let Some(vm) = self.vm.take() else { return };
        let mut s = self.shared.lock();
        s.in_use -= 1;
        self.shared.changed.notify_all();
        if s.shut {
            // No keeper any more: removed here.
            drop(s);
            let _ = vm.remove();
            return;
        }
        let running = matches!(vm.status(), crate::VmStatus::Running { .. });
        if self.shared.opts.restore_on_release || !running {
            s.doomed.push(vm);
        } else {
            s.idle.push_front((vm, Instant::now()));
        }
        self.shared.changed.notify_all();
    }
}

impl std::ops::Deref for PooledVm {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.vm
            .as_ref()
            .expect("a pooled VM is held until released")
    }
}

impl Drop for PooledVm {
    fn drop(&mut self) {
        self.give_back();
    }
}
