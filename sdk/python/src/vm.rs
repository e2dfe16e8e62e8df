//! The `Vm` handle as Python holds it, and what its calls return.

use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::calls::{blocking, ports, secs};
use crate::child::Child;
use crate::error::{Fail, Result};

/// A finished command.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct ExecResult {
    /// All of its stdout (or its pty's output).
    stdout: Py<PyBytes>,
    /// All of its stderr.
    stderr: Py<PyBytes>,
    /// Its exit code, if it exited.
    exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    signal: Option<i32>,
    /// Whether it was killed for running past its timeout.
    timed_out: bool,
}

impl ExecResult {
    fn new(py: Python<'_>, out: ferry::ExecOutput) -> ExecResult {
        ExecResult {
            exit_code: out.exit_code(),
            signal: out.signal(),
            timed_out: out.status.timed_out,
            stdout: PyBytes::new(py, &out.stdout).unbind(),
            stderr: PyBytes::new(py, &out.stderr).unbind(),
        }
    }
}

#[pymethods]
impl ExecResult {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "ExecResult(exit_code={:?}, signal={:?}, timed_out={}, stdout={} bytes, stderr={} bytes)",
            self.exit_code,
            self.signal,
            self.timed_out,
            self.stdout.bind(py).as_bytes().len(),
            self.stderr.bind(py).as_bytes().len()
        )
    }
}

/// Memory use of a VM.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct Stats {
    /// Resident bytes of the VMM process, guest RAM included.
    vmm_rss_bytes: u64,
    /// Proportional set size of the VMM process.
    vmm_pss_bytes: u64,
    /// Resident bytes of guest RAM.
    guest_resident_bytes: u64,
    /// Resident bytes that are not guest RAM.
    overhead_bytes: u64,
    /// Bytes of a lazily restored guest not yet brought in.
    lazy_pending_bytes: Option<u64>,
}

#[pymethods]
impl Stats {
    fn __repr__(&self) -> String {
        format!(
            "Stats(vmm_rss_bytes={}, guest_resident_bytes={}, overhead_bytes={})",
            self.vmm_rss_bytes, self.guest_resident_bytes, self.overhead_bytes
        )
    }
}

/// What a snapshot wrote.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct SnapshotReport {
    /// Bundle bytes.
    bytes: u64,
    /// Guest memory bytes.
    memory_bytes: u64,
    /// Bytes of memory as stored (compressed or sparse).
    memory_stored_bytes: u64,
    /// Pages a restore brings in first.
    prefetch_pages: u64,
    /// Whether the bundle leaves out the base disk image.
    thin: bool,
    /// How long the guest was paused.
    paused_ms: u64,
}

#[pymethods]
impl SnapshotReport {
    fn __repr__(&self) -> String {
        format!(
            "SnapshotReport(bytes={}, thin={}, paused_ms={})",
            self.bytes, self.thin, self.paused_ms
        )
    }
}

impl From<ferry::SnapshotReport> for SnapshotReport {
    fn from(r: ferry::SnapshotReport) -> Self {
        SnapshotReport {
            bytes: r.bytes,
            memory_bytes: r.memory_bytes,
            memory_stored_bytes: r.memory_stored_bytes,
            prefetch_pages: r.prefetch_pages,
            thin: r.thin,
            paused_ms: r.paused_ms,
        }
    }
}

/// A VM as listed.
#[pyclass(frozen, get_all, module = "ferry._native")]
pub struct VmInfo {
    /// Its name.
    name: String,
    /// "running" or "stopped".
    status: String,
    /// Why it stopped, when it did and that is known.
    reason: Option<String>,
    /// Its VMM's process id while it runs.
    pid: Option<u32>,
    /// vCPUs.
    cpus: u32,
    /// Guest memory in MiB.
    memory_mib: u32,
    /// `HOST_IP:HOST:GUEST` of each forward.
    ports: Vec<String>,
    /// What its disk was made from.
    image: String,
    /// Its state directory.
    dir: String,
}

#[pymethods]
impl VmInfo {
    fn __repr__(&self) -> String {
        format!(
            "VmInfo(name={:?}, status={:?}, cpus={}, memory_mib={}, ports={:?}, image={:?})",
            self.name, self.status, self.cpus, self.memory_mib, self.ports, self.image
        )
    }
}

impl From<ferry::VmInfo> for VmInfo {
    fn from(i: ferry::VmInfo) -> Self {
        let (status, reason, pid) = match i.status {
            ferry::VmStatus::Running { pid } => ("running", None, Some(pid)),
            ferry::VmStatus::Stopped { reason } => ("stopped", Some(reason), None),
        };
        VmInfo {
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
#[pyclass(frozen, module = "ferry._native")]
pub struct Port {
    handle: Arc<Mutex<Option<ferry::PortHandle>>>,
    forward: ferry::PortForward,
}

#[pymethods]
impl Port {
    /// `HOST_IP:PORT` it listens on.
    #[getter]
    fn local_addr(&self) -> String {
        self.forward.host_addr().to_string()
    }

    /// Stops forwarding and frees the host port; a second call does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self.handle.clone();
        blocking(py, move || {
            let taken = handle.lock().unwrap_or_else(|p| p.into_inner()).take();
            taken.map_or(Ok(()), |h| h.close().map_err(Fail::from))
        })
    }
}

/// How to run a command, as the Python layer passes it.
#[derive(FromPyObject)]
pub struct ExecArgs {
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: Option<String>,
    timeout: Option<f64>,
    /// (rows, cols) of a pty.
    tty: Option<(u16, u16)>,
}

impl ExecArgs {
    fn into_ferry(self, stdin: Option<Vec<u8>>) -> Result<ferry::ExecOptions> {
        if matches!(self.tty, Some((0, _) | (_, 0))) {
            return Err(Fail::invalid("a tty needs at least one row and column"));
        }
        Ok(ferry::ExecOptions {
            env: self.env,
            cwd: self.cwd,
            user: self.user,
            stdin,
            timeout: self.timeout.map(|t| secs(t, "timeout")).transpose()?,
            tty: self.tty,
        })
    }
}

/// A VM on this host. VMs live in their own processes: dropping the handle
/// leaves the VM running.
#[pyclass(frozen, module = "ferry._native")]
pub struct Vm {
    vm: ferry::Vm,
}

impl Vm {
    /// Wraps a handle.
    pub fn new(vm: ferry::Vm) -> Vm {
        Vm { vm }
    }

    /// Its handle.
    pub fn handle(&self) -> ferry::Vm {
        self.vm.clone()
    }
}

#[pymethods]
impl Vm {
    /// Its name.
    #[getter]
    fn name(&self) -> &str {
        self.vm.name()
    }

    /// "running" or "stopped", read now.
    fn status(&self, py: Python<'_>) -> PyResult<&'static str> {
        blocking(py, || {
            Ok(match self.vm.status() {
                ferry::VmStatus::Running { .. } => "running",
                ferry::VmStatus::Stopped { .. } => "stopped",
            })
        })
    }

    /// Whether its vCPUs are paused.
    fn is_paused(&self, py: Python<'_>) -> PyResult<bool> {
        blocking(py, || Ok(self.vm.is_paused()))
    }

    /// What `list()` shows of it.
    fn info(&self, py: Python<'_>) -> PyResult<VmInfo> {
        blocking(py, || Ok(self.vm.info().into()))
    }

    /// Runs `argv` to its end; `stdin` is written and closed.
    #[pyo3(signature = (argv, args, stdin=None))]
    fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        args: ExecArgs,
        stdin: Option<&[u8]>,
    ) -> PyResult<ExecResult> {
        if argv.is_empty() {
            return Err(Fail::invalid("the command is empty").into());
        }
        let opts = args.into_ferry(stdin.map(<[u8]>::to_vec))?;
        let out = blocking(py, || Ok(self.vm.exec(&argv, &opts)?))?;
        Ok(ExecResult::new(py, out))
    }

    /// Writes `files` (path, data, mode), then runs `steps` while each
    /// exits 0, in one round trip when the files are small.
    fn exec_batch(
        &self,
        py: Python<'_>,
        files: Vec<(String, Bound<'_, PyBytes>, u32)>,
        steps: Vec<Vec<String>>,
        args: ExecArgs,
    ) -> PyResult<ExecResult> {
        let files: Vec<(String, Vec<u8>, u32)> = files
            .into_iter()
            .map(|(path, data, mode)| (path, data.as_bytes().to_vec(), mode))
            .collect();
        if steps.iter().any(Vec::is_empty) {
            return Err(Fail::invalid("a command is empty").into());
        }
        let opts = args.into_ferry(None)?;
        let out = blocking(py, || Ok(self.vm.exec_batch(&files, &steps, &opts)?))?;
        Ok(ExecResult::new(py, out))
    }

    /// Starts `argv` and returns at once; its stdin stays open.
    fn spawn(&self, py: Python<'_>, argv: Vec<String>, args: ExecArgs) -> PyResult<Child> {
        if argv.is_empty() {
            return Err(Fail::invalid("the command is empty").into());
        }
        let opts = args.into_ferry(Some(Vec::new()))?;
        let child = blocking(py, || Ok(self.vm.spawn(&argv, &opts)?))?;
        Ok(Child::start(child))
    }

    /// Writes a guest file, making its parent directories.
    fn write_file(&self, py: Python<'_>, path: String, data: &[u8], mode: u32) -> PyResult<()> {
        blocking(py, || {
            self.vm
                .client()
                .write_file(&path, mode, true, data)
                .map(|_| ())
                .map_err(Fail::from)
        })
    }

    /// Reads a guest file: its bytes and permission bits.
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        path: String,
    ) -> PyResult<(Bound<'py, PyBytes>, u32)> {
        let (data, mode) = blocking(py, || Ok(self.vm.read_file(&path)?))?;
        Ok((PyBytes::new(py, &data), mode))
    }

    /// Freezes the VM into the bundle file `out` (only what changed since
    /// the bundle `since`, if given).
    #[pyo3(signature = (out, leave_running, thin, raw_memory, since=None))]
    fn snapshot_path(
        &self,
        py: Python<'_>,
        out: PathBuf,
        leave_running: bool,
        thin: bool,
        raw_memory: bool,
        since: Option<PathBuf>,
    ) -> PyResult<SnapshotReport> {
        let opts = ferry::SnapshotOptions {
            leave_running,
            thin,
            raw_memory,
            since,
            ..ferry::SnapshotOptions::default()
        };
        blocking(py, || Ok(self.vm.snapshot_to_path(&out, &opts)?.into()))
    }

    /// Freezes the VM into a bundle written to the binary file object
    /// `writer`. If writing fails before the end, the VM runs on.
    #[pyo3(signature = (writer, leave_running, thin, raw_memory, since=None))]
    fn snapshot_writer(
        &self,
        py: Python<'_>,
        writer: PyObject,
        leave_running: bool,
        thin: bool,
        raw_memory: bool,
        since: Option<PathBuf>,
    ) -> PyResult<SnapshotReport> {
        let opts = ferry::SnapshotOptions {
            leave_running,
            thin,
            raw_memory,
            since,
            ..ferry::SnapshotOptions::default()
        };
        // The snapshot writes in pieces of a few KiB: gather them, so
        // Python is called once per MiB.
        let mut out = BufWriter::with_capacity(1 << 20, crate::io::PyWriter::new(py, writer)?);
        blocking(py, || {
            Ok(self.vm.snapshot_to_writer(&mut out, &opts)?.into())
        })
    }

    /// Migrates the VM live; returns the report as JSON.
    #[pyo3(signature = (dest, token, downtime_ms, bandwidth_limit, via))]
    fn migrate(
        &self,
        py: Python<'_>,
        dest: String,
        token: Option<String>,
        downtime_ms: Option<u64>,
        bandwidth_limit: Option<u64>,
        via: Option<String>,
    ) -> PyResult<String> {
        let (target, opts) =
            crate::calls::migrate_target(dest, token, downtime_ms, bandwidth_limit, via)?;
        blocking(py, || {
            let report = self.vm.migrate(&target, &opts)?;
            Ok(serde_json::to_string(&report).expect("report serializes"))
        })
    }

    /// Pushes the VM to the store `store` (`s3://BUCKET/PREFIX`): a snapshot
    /// of which only the chunks the store lacks are uploaded. The VM keeps
    /// running unless `stop`.
    fn push(
        &self,
        py: Python<'_>,
        store: String,
        stop: bool,
    ) -> PyResult<crate::store::PushReport> {
        crate::store::check_url(&store, false)?;
        blocking(py, || Ok(self.vm.push(&store, stop, &mut |_| {})?.into()))
    }

    /// Forks the VM into siblings.
    fn fork(
        &self,
        py: Python<'_>,
        names: Vec<String>,
        count: Option<usize>,
        ports_: Vec<Vec<String>>,
    ) -> PyResult<Vec<Vm>> {
        let opts = ferry::ForkOptions {
            names,
            count,
            ports: ports_.iter().map(|p| ports(p)).collect::<Result<_>>()?,
        };
        blocking(py, || {
            let (made, _report) = self.vm.fork(&opts)?;
            Ok(made.into_iter().map(Vm::new).collect())
        })
    }

    /// Stops its vCPUs.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        blocking(py, || Ok(self.vm.pause()?))
    }

    /// Lets it run again.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        blocking(py, || Ok(self.vm.resume()?))
    }

    /// Asks the guest to power off; ends it after `timeout` seconds.
    fn stop(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let timeout = secs(timeout, "timeout")?;
        blocking(py, || Ok(self.vm.stop(timeout)?))
    }

    /// Ends it at once, without asking the guest.
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        blocking(py, || Ok(self.vm.kill()?))
    }

    /// Ends it if it runs and deletes its state.
    fn remove(&self, py: Python<'_>) -> PyResult<()> {
        blocking(py, || Ok(self.vm.remove()?))
    }

    /// Forwards a host port (`[HOST_IP:]HOST:GUEST`) into the guest.
    fn expose_tcp(&self, py: Python<'_>, spec: String) -> PyResult<Port> {
        let forward: ferry::PortForward = spec
            .parse()
            .map_err(|e| Fail::from(ferry::Error::from(e)))?;
        blocking(py, || {
            let handle = self.vm.expose_port(forward)?;
            Ok(Port {
                forward: handle.forward(),
                handle: Arc::new(Mutex::new(Some(handle))),
            })
        })
    }

    /// Signals the VM's main command.
    fn workload_signal(&self, py: Python<'_>, signal: i32) -> PyResult<()> {
        blocking(py, || Ok(self.vm.signal_workload(signal)?))
    }

    /// Memory use.
    fn stats(&self, py: Python<'_>) -> PyResult<Stats> {
        blocking(py, || {
            let s = self.vm.stats()?;
            Ok(Stats {
                vmm_rss_bytes: s.vmm_rss_bytes,
                vmm_pss_bytes: s.vmm_pss_bytes,
                guest_resident_bytes: s.guest_resident_bytes,
                overhead_bytes: s.overhead_bytes,
                lazy_pending_bytes: s.lazy_pending_bytes,
            })
        })
    }

    /// The guest's serial console so far.
    fn logs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let log = blocking(py, || Ok(self.vm.logs()?))?;
        Ok(PyBytes::new(py, &log))
    }

    /// Sets the guest's clock from the host's (package managers check
    /// signatures against it).
    fn sync_clock(&self, py: Python<'_>) -> PyResult<()> {
        blocking(py, || {
            self.vm
                .client()
                .sync_clock()
                .map(|_| ())
                .map_err(Fail::from)
        })
    }

    /// Writes its root filesystem as an image (`out`) with these defaults
    /// and removes the VM (the end of `provision()`). Returns the path.
    fn bake(
        &self,
        py: Python<'_>,
        out: String,
        cmd: Option<Vec<String>>,
        env: Vec<(String, String)>,
        workdir: Option<String>,
    ) -> PyResult<String> {
        let mut spec = ferry::BakeSpec::new(out);
        spec.cmd = cmd;
        spec.env = env.into_iter().collect();
        spec.workdir = workdir;
        blocking(py, || {
            let report = self.vm.clone().bake(&spec, &mut ferry::bake::Silent)?;
            Ok(report.out.display().to_string())
        })
    }

    fn __repr__(&self) -> String {
        format!("Vm(name={:?})", self.vm.name())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Vm>()?;
    m.add_class::<VmInfo>()?;
    m.add_class::<ExecResult>()?;
    m.add_class::<Stats>()?;
    m.add_class::<SnapshotReport>()?;
    m.add_class::<Port>()?;
    Ok(())
}
