//! The `Vm` handle as JavaScript holds it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use napi::bindgen_prelude::{AsyncTask, Buffer};
use napi::JsFunction;
use napi_derive::napi;

use crate::child::{self, NativeChild};
use crate::error::{Fail, Result};
use crate::options::{ExecOpts, ForkOpts, ImageOpts, SnapshotOpts};
use crate::progress::Reporter;
use crate::snapshot_stream::{self, NativeSnapshotStream, SnapshotReportJs};
use crate::store::PushReportJs;
use crate::task::{blocking, Blocking};

/// A finished command.
#[napi(object)]
pub struct ExecResult {
    pub stdout: Buffer,
    pub stderr: Buffer,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

/// Memory use of a VM.
#[napi(object)]
pub struct StatsJs {
    pub vmm_rss_bytes: f64,
    pub vmm_pss_bytes: f64,
    pub guest_resident_bytes: f64,
    pub overhead_bytes: f64,
    pub lazy_pending_bytes: Option<f64>,
}

/// A guest file's bytes and permission bits.
#[napi(object)]
pub struct FileJs {
    pub data: Buffer,
    pub mode: u32,
}

/// A VM as listed.
#[napi(object)]
pub struct VmInfoJs {
    pub name: String,
    /// "running" or "stopped".
    pub status: String,
    /// Why it stopped, when it did and that is known.
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// `HOST_IP:HOST:GUEST` of each forward.
    pub ports: Vec<String>,
    pub image: String,
    pub dir: String,
}

impl From<ferry::VmInfo> for VmInfoJs {
    fn from(i: ferry::VmInfo) -> Self {
        let (status, reason, pid) = match i.status {
            ferry::VmStatus::Running { pid } => ("running", None, Some(pid)),
            ferry::VmStatus::Stopped { reason } => ("stopped", Some(reason), None),
        };
        VmInfoJs {
            name: i.name,
            status: status.into(),
            reason,
            pid,
            cpus: i.cpus,
            memory_mib: i.memory_mib,
            ports: i
                .ports
                .iter()
                .map(|p| format!("{}:{}:{}", p.host_ip, p.host_port, p.guest_port))
                .collect(),
            image: i.image,
            dir: i.dir.display().to_string(),
        }
    }
}

/// A port forward added at run time.
#[napi]
pub struct NativePort {
    handle: Arc<Mutex<Option<ferry::PortHandle>>>,
    forward: ferry::PortForward,
}

#[napi]
impl NativePort {
    /// `HOST_IP:PORT` it listens on.
    #[napi(getter)]
    pub fn local_addr(&self) -> String {
        self.forward.host_addr().to_string()
    }

    /// Stops forwarding and frees the host port.
    #[napi]
    pub fn stop(&self) -> AsyncTask<Blocking<()>> {
        let handle = self.handle.clone();
        blocking(move || {
            let taken = handle.lock().unwrap_or_else(|p| p.into_inner()).take();
            // A second stop has nothing left to do.
            taken.map_or(Ok(()), |h| h.close().map_err(Fail::from))
        })
    }
}

/// A VM on this host.
#[napi]
pub struct NativeVm {
    vm: ferry::Vm,
}

impl NativeVm {
    /// Wraps a handle.
    pub fn new(vm: ferry::Vm) -> NativeVm {
        NativeVm { vm }
    }

    /// Its handle.
    pub fn handle(&self) -> ferry::Vm {
        self.vm.clone()
    }

    fn run<
        T: napi::bindgen_prelude::ToNapiValue + napi::bindgen_prelude::TypeName + Send + 'static,
    >(
        &self,
        work: impl FnOnce(ferry::Vm) -> Result<T> + Send + 'static,
    ) -> AsyncTask<Blocking<T>> {
        let vm = self.vm.clone();
        blocking(move || work(vm))
    }
}

fn exec_result(out: ferry::ExecOutput) -> ExecResult {
    ExecResult {
        exit_code: out.exit_code(),
        signal: out.signal(),
        timed_out: out.status.timed_out,
        stdout: out.stdout.into(),
        stderr: out.stderr.into(),
    }
}

#[napi]
impl NativeVm {
    /// Its name.
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.vm.name().to_string()
    }

    /// What `list()` shows of it.
    #[napi]
    pub fn info(&self) -> AsyncTask<Blocking<VmInfoJs>> {
        self.run(|vm| Ok(vm.info().into()))
    }

    /// Runs `argv` to its end.
    #[napi]
    pub fn exec(
        &self,
        argv: Vec<String>,
        opts: ExecOpts,
    ) -> Result<AsyncTask<Blocking<ExecResult>>> {
        if argv.is_empty() {
            return Err(Fail::invalid("the command is empty"));
        }
        let opts = opts.into_ferry()?;
        Ok(self.run(move |vm| Ok(exec_result(vm.exec(&argv, &opts)?))))
    }

    /// Writes `files`, then runs `steps` while each exits 0, in one round
    /// trip when the files are small.
    #[napi]
    pub fn exec_batch(
        &self,
        files: Vec<crate::options::ExtraFileJs>,
        steps: Vec<Vec<String>>,
        opts: ExecOpts,
    ) -> Result<AsyncTask<Blocking<ExecResult>>> {
        if steps.iter().any(Vec::is_empty) {
            return Err(Fail::invalid("a command is empty"));
        }
        let opts = opts.into_ferry()?;
        let files: Vec<(String, Vec<u8>, u32)> = files
            .into_iter()
            .map(|f| (f.path, f.data.to_vec(), f.mode.unwrap_or(0o644)))
            .collect();
        Ok(self.run(move |vm| Ok(exec_result(vm.exec_batch(&files, &steps, &opts)?))))
    }

    /// Starts `argv`; its output goes to `on_event`.
    #[napi]
    pub fn spawn(
        &self,
        argv: Vec<String>,
        opts: ExecOpts,
        on_event: JsFunction,
    ) -> Result<AsyncTask<Blocking<NativeChild>>> {
        if argv.is_empty() {
            return Err(Fail::invalid("the command is empty"));
        }
        let opts = opts.into_ferry()?;
        let events = child::events(on_event).map_err(napi_fail)?;
        Ok(self.run(move |vm| Ok(child::start(vm.spawn(&argv, &opts)?, events))))
    }

    /// Writes a guest file, making its parent directories.
    #[napi]
    pub fn write_file(&self, path: String, data: Buffer, mode: u32) -> AsyncTask<Blocking<()>> {
        let data = data.to_vec();
        self.run(move |vm| {
            // Parent directories are made, as stageFiles expects.
            vm.client()
                .write_file(&path, mode, true, &data[..])
                .map(|_| ())
                .map_err(|e| Fail::from(ferry::Error::from(e)))
        })
    }

    /// Reads a guest file.
    #[napi]
    pub fn read_file(&self, path: String) -> AsyncTask<Blocking<FileJs>> {
        self.run(move |vm| {
            let (data, mode) = vm.read_file(&path)?;
            Ok(FileJs {
                data: data.into(),
                mode,
            })
        })
    }

    /// Freezes the VM into the bundle file `out`.
    #[napi]
    pub fn snapshot(
        &self,
        out: String,
        opts: SnapshotOpts,
        on_progress: Option<JsFunction>,
    ) -> napi::Result<AsyncTask<Blocking<SnapshotReportJs>>> {
        let mut progress = Reporter::new("snapshot", on_progress)?;
        let opts = opts.into_ferry();
        Ok(self.run(move |vm| {
            progress.started(&format!("snapshot of {} to {out}", vm.name()));
            let report = vm.snapshot_to_path(&PathBuf::from(&out), &opts)?;
            progress.bytes(report.bytes, true);
            progress.finished(&out);
            Ok(report.into())
        }))
    }

    /// Freezes the VM into a bundle sent to `on_chunk`.
    #[napi]
    pub fn snapshot_stream(
        &self,
        opts: SnapshotOpts,
        on_chunk: JsFunction,
        on_progress: Option<JsFunction>,
    ) -> napi::Result<NativeSnapshotStream> {
        let progress = Reporter::new("snapshot", on_progress)?;
        snapshot_stream::snapshot(self.vm.clone(), opts.into_ferry(), on_chunk, progress)
    }

    /// Migrates the VM live to `dest` (`HOST:PORT`, or any with `via`);
    /// resolves to the report as JSON.
    #[napi]
    pub fn migrate(
        &self,
        dest: String,
        opts: crate::options::MigrateOpts,
    ) -> Result<AsyncTask<Blocking<String>>> {
        let (target, opts) = crate::options::migrate_target(dest, opts)?;
        Ok(self.run(move |vm| {
            let report = vm.migrate(&target, &opts)?;
            Ok(serde_json::to_string(&report).expect("report serializes"))
        }))
    }

    /// Pushes the VM to the store `store` (`s3://BUCKET/PREFIX`): a snapshot
    /// of which only the chunks the store lacks are uploaded. The VM keeps
    /// running unless `stop`.
    #[napi]
    pub fn push(
        &self,
        store: String,
        stop: bool,
        on_progress: Option<JsFunction>,
    ) -> napi::Result<AsyncTask<Blocking<PushReportJs>>> {
        crate::store::check_url(&store, false)?;
        let mut progress = Reporter::new("push", on_progress)?;
        Ok(self.run(move |vm| {
            progress.started(&format!("push of {} to {store}", vm.name()));
            let report = vm.push(&store, stop, &mut |s| progress.phase(s))?;
            progress.finished(&report.url);
            Ok(report.into())
        }))
    }

    /// Forks the VM into siblings.
    #[napi]
    pub fn fork(&self, opts: ForkOpts) -> Result<AsyncTask<Blocking<Vec<NativeVm>>>> {
        let opts = opts.into_ferry()?;
        Ok(self.run(move |vm| {
            let (made, _report) = vm.fork(&opts)?;
            Ok(made.into_iter().map(NativeVm::new).collect())
        }))
    }

    /// Stops its vCPUs.
    #[napi]
    pub fn pause(&self) -> AsyncTask<Blocking<()>> {
        self.run(|vm| Ok(vm.pause()?))
    }

    /// Lets it run again.
    #[napi]
    pub fn resume(&self) -> AsyncTask<Blocking<()>> {
        self.run(|vm| Ok(vm.resume()?))
    }

    /// Asks the guest to power off; ends it after `timeout_ms`.
    #[napi]
    pub fn stop(&self, timeout_ms: u32) -> AsyncTask<Blocking<()>> {
        self.run(move |vm| Ok(vm.stop(Duration::from_millis(timeout_ms.into()))?))
    }

    /// Ends it if it runs and deletes its state.
    #[napi]
    pub fn remove(&self) -> AsyncTask<Blocking<()>> {
        self.run(|vm| Ok(vm.remove()?))
    }

    /// Forwards a host port into the guest from now on.
    #[napi]
    pub fn expose_tcp(&self, spec: String) -> Result<AsyncTask<Blocking<NativePort>>> {
        let forward: ferry::PortForward = spec
            .parse()
            .map_err(|e| Fail::from(ferry::Error::from(e)))?;
        Ok(self.run(move |vm| {
            let handle = vm.expose_port(forward)?;
            Ok(NativePort {
                forward: handle.forward(),
                handle: Arc::new(Mutex::new(Some(handle))),
            })
        }))
    }

    /// Signals the VM's main command.
    #[napi]
    pub fn workload_signal(&self, signal: i32) -> AsyncTask<Blocking<()>> {
        self.run(move |vm| Ok(vm.signal_workload(signal)?))
    }

    /// Memory use.
    #[napi]
    pub fn stats(&self) -> AsyncTask<Blocking<StatsJs>> {
        self.run(|vm| {
            let s = vm.stats()?;
            Ok(StatsJs {
                vmm_rss_bytes: s.vmm_rss_bytes as f64,
                vmm_pss_bytes: s.vmm_pss_bytes as f64,
                guest_resident_bytes: s.guest_resident_bytes as f64,
                overhead_bytes: s.overhead_bytes as f64,
                lazy_pending_bytes: s.lazy_pending_bytes.map(|b| b as f64),
            })
        })
    }

    /// Sets the guest's clock from the host's (package managers check
    /// signatures against it).
    #[napi]
    pub fn sync_clock(&self) -> AsyncTask<Blocking<()>> {
        self.run(|vm| {
            vm.client()
                .sync_clock()
                .map(|_| ())
                .map_err(|e| Fail::from(ferry::Error::from(e)))
        })
    }

    /// Writes its root filesystem as an image and removes it (the end of
    /// `provision()`).
    #[napi]
    pub fn bake(
        &self,
        opts: ImageOpts,
        on_progress: Option<JsFunction>,
    ) -> napi::Result<AsyncTask<Blocking<String>>> {
        let mut progress = Reporter::new("provision", on_progress)?;
        let spec = opts.into_ferry();
        Ok(self.run(move |vm| {
            progress.started(&format!("writing {}", spec.out.display()));
            let report = vm.bake(&spec, &mut progress)?;
            progress.finished(&format!("{} bytes", report.bytes));
            Ok(report.out.display().to_string())
        }))
    }
}

fn napi_fail(e: napi::Error) -> Fail {
    Fail::new("SDK_INTERNAL", e.reason)
}
