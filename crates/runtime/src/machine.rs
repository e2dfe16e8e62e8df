//! The handle of one VM on this host: starting its VMM process, reaching its
//! guest agent, and controlling it (pause, snapshot, fork, forwards, stop).
//!
//! Each VM runs in its own `ferry-vmm` process, detached from the program that
//! started it; the two share only the contract in [`crate::plan`]. The guest
//! agent is reached over the VM's vsock socket with the per-VM token. What to
//! boot (a template or a kernel) is decided above this, in [`crate::boot`].

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{Client, ClientError, Session};

use crate::config::{Config, LocateError};
use crate::error::Coded;
use crate::images::ImageError;
use crate::plan::{Launch, Plan};
use crate::vm::control::{self, ControlRequest, ControlResponse};
use crate::vm::record::{self, ExitRecord, PidRecord, VmDir, VmRecord};
use crate::vm::{Registry, VmError, VmStatus};

/// How long the VMM process may take to come up.
const VMM_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest may take to boot to its agent.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Default vCPUs and memory.
pub const DEFAULT_CPUS: u32 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// How long a control operation on a VM (snapshot, fork, stop, pause,
/// resume, kill, remove, expose, unexpose) waits for another one on the same
/// VM to finish before it fails with `VM_BUSY`. Pauses, forks and stops end
/// well within it; a snapshot of a large VM may not, and whoever waits is
/// told to retry rather than blocked for as long.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Errors booting a VM.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Bad image or assets missing.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Name taken, bad name, I/O on the state directory.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest kernel file is missing.
    #[error("guest kernel {0} does not exist")]
    KernelNotFound(PathBuf),
    /// `ferry-vmm` or the guest agent is missing or unusable.
    #[error(transparent)]
    Locate(#[from] LocateError),
    /// The VMM process reported an error (KVM missing, PVM host, bad kernel...).
    #[error("{message}")]
    Vmm {
        /// Its stable code.
        code: String,
        /// What went wrong.
        message: String,
        /// What to do.
        hint: Option<String>,
    },
    /// The guest never answered.
    #[error("the guest agent did not answer within {0:?}")]
    AgentTimeout(Duration, String),
    /// Something else failed while preparing the VM.
    #[error("{0}")]
    Prepare(String),
    /// A `--mount` or `--live-mount` could not be set up.
    #[error(transparent)]
    Mount(#[from] crate::mounts::MountError),
    /// A port forward is invalid or its host port is taken.
    #[error(transparent)]
    Forward(#[from] crate::forward::ForwardError),
    /// Networking was asked for but cannot be provided.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// A restored or forked guest's RNG could not be reseeded: handing it
    /// out would let it share random streams with its source.
    #[error("reseeding the guest's RNG failed: {0}")]
    ReseedFailed(String),
}

impl Coded for BootError {
    fn code(&self) -> &str {
        match self {
            BootError::Image(e) => e.code(),
            BootError::Vm(e) => e.code(),
            BootError::KernelNotFound(_) => "BOOT_KERNEL_NOT_FOUND",
            BootError::Locate(e) => e.code(),
            BootError::Vmm { code, .. } => code,
            BootError::AgentTimeout(..) => "BOOT_AGENT_TIMEOUT",
            BootError::Prepare(_) => "BOOT_PREPARE_FAILED",
            BootError::Mount(e) => e.code(),
            BootError::Forward(e) => e.code(),
            BootError::Net(e) => e.code(),
            BootError::ReseedFailed(_) => "GUEST_RESEED_FAILED",
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            BootError::Image(e) => e.hint(),
            BootError::Vm(e) => e.hint(),
            BootError::KernelNotFound(_) => {
                Some("omit --kernel to use the installed one (`ferry install`)".into())
            }
            BootError::Locate(e) => e.hint(),
            BootError::Vmm { hint, .. } => hint.clone(),
            BootError::AgentTimeout(_, console) => {
                Some(format!("the guest console ends with:\n{console}"))
            }
            BootError::Prepare(_) => None,
            BootError::Mount(e) => e.hint(),
            BootError::Forward(e) => e.hint(),
            BootError::Net(e) => e.hint(),
            BootError::ReseedFailed(_) => {
                Some("the VM was removed; check the host's random source and retry".into())
            }
        }
    }
}

/// The lock that serializes control operations on one VM, held until dropped.
///
/// An `flock(2)` on `DIR/lock` (created 0600): it belongs to the open file,
/// so it serializes threads of one process as well as processes, and is let
/// go when its holder exits, however that happens. The file is opened
/// close-on-exec, so a VMM process started meanwhile never inherits it.
#[derive(Debug)]
pub struct VmLock {
    _file: std::fs::File,
}

impl VmLock {
    /// Takes the lock of the VM `name` whose state directory is `dir`,
    /// waiting up to `wait` for whoever holds it: [`VmError::Busy`] after
    /// that, [`VmError::NotFound`] when the VM is gone (before or while
    /// waiting).
    pub fn acquire(dir: &VmDir, name: &str, wait: Duration) -> Result<VmLock, VmError> {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let path = dir.lock();
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmError::NotFound(name.to_string()))
            }
            Err(e) => return Err(VmError::io(format!("open {}", path.display()))(e)),
        };
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK)
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                return Err(VmError::io(format!("lock {}", path.display()))(e));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Busy(name.to_string()));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        // Removing a VM deletes its directory, lock file and all, under the
        // lock: a file no longer at its path means the VM we waited for is gone.
        let held = file.metadata().map_err(VmError::io("stat the VM's lock"))?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => Ok(VmLock { _file: file }),
            _ => Err(VmError::NotFound(name.to_string())),
        }
    }
}

/// How long [`Machine::lock`] waits: [`LOCK_WAIT`].
#[cfg(not(test))]
fn lock_wait() -> Duration {
    LOCK_WAIT
}

/// How long [`Machine::lock`] waits: [`LOCK_WAIT`], unless the calling test
/// thread asked for less.
#[cfg(test)]
fn lock_wait() -> Duration {
    tests::LOCK_WAIT_HERE
        .with(std::cell::Cell::get)
        .unwrap_or(LOCK_WAIT)
}

/// A VM that exists on this host.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Its record.
    pub record: VmRecord,
    /// Its state directory.
    pub dir: VmDir,
    /// The runtime it belongs to.
    pub config: Arc<Config>,
    /// This process's hold on the VM, if it made the VM and has not let it
    /// go (see [`crate::vm::Owner`]): a VM being created, or an ephemeral one.
    pub owner: Option<Arc<crate::vm::Owner>>,
}

/// Random lowercase hex of `bytes` bytes (names and ids).
pub(crate) fn random_hex(bytes: usize) -> Result<String, VmError> {
    crate::fsutil::random_hex(bytes).map_err(VmError::io("read random bytes"))
}

impl Machine {
    /// Opens an existing VM by name.
    pub fn open(config: &Arc<Config>, name: &str) -> Result<Machine, VmError> {
        let registry = Registry::new(&config.dirs);
        let info = registry.get(name)?;
        Ok(Machine {
            record: info.record,
            dir: registry.dir(name),
            config: Arc::clone(config),
            owner: None,
        })
    }

    /// Opens a VM that must be running.
    pub fn open_running(config: &Arc<Config>, name: &str) -> Result<Machine, VmError> {
        let registry = Registry::new(&config.dirs);
        let (info, _) = registry.get_running(name)?;
        Ok(Machine {
            record: info.record,
            dir: registry.dir(name),
            config: Arc::clone(config),
            owner: None,
        })
    }

    /// Lets the VM outlive this process (see [`crate::vm::Owner`]): it is
    /// complete and is no one's to end but its users'.
    pub fn release(&self) {
        if let Some(owner) = &self.owner {
            owner.release();
        }
    }

    /// Takes this VM's lock, which every control operation (snapshot, fork,
    /// stop, pause, resume, kill, remove, expose, unexpose) holds while it
    /// runs, waiting up to [`LOCK_WAIT`] for another one to finish; fails
    /// with `VM_BUSY` after that. Operations that end the VM hold it until
    /// the VMM process has exited.
    pub fn lock(&self) -> Result<VmLock, VmError> {
        VmLock::acquire(&self.dir, self.name(), lock_wait())
    }

    /// The registry this VM is in.
    pub fn registry(&self) -> Registry {
        Registry::new(&self.config.dirs)
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// A client for the VM's guest agent. Each of its operations opens a
    /// connection of its own.
    pub fn client(&self) -> Client {
        Client::new(
            self.dir.vsock(),
            ferry_protocol::AGENT_VSOCK_PORT,
            &self.record.token,
        )
    }

    /// A session with the VM's guest agent: one connection, opened and
    /// authenticated now, over which operations run one after another. Use
    /// it for many short operations (say, a loop of execs), where opening a
    /// connection each time would dominate.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), ferry_runtime::Failure> {
    /// use ferry_protocol::ExecRequest;
    /// use ferry_runtime::machine::Machine;
    ///
    /// let config = std::sync::Arc::new(ferry_runtime::Config::default());
    /// let session = Machine::open_running(&config, "web")?.session()?;
    /// for n in 0..10 {
    ///     let out = session.output(ExecRequest::new(["echo", &n.to_string()]), None)?;
    ///     print!("{}", String::from_utf8_lossy(&out.stdout));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn session(&self) -> Result<Session, ClientError> {
        self.client().session()
    }

    /// Whether the VMM process is alive.
    pub fn status(&self) -> VmStatus {
        self.registry().status(&self.dir)
    }

    /// Writes the plan and starts this VM's `ferry-vmm` process, returning
    /// once it answers on its control socket.
    pub(crate) fn spawn_vmm(&self, launch: Launch) -> Result<(), BootError> {
        use std::os::unix::process::CommandExt;
        let exe = crate::config::locate_vmm(&self.config)?;
        record::write_runtime_json(
            &Plan::path(&self.dir.root),
            &Plan {
                dirs: self.config.dirs.clone(),
                launch,
            },
        )
        .map_err(|e| BootError::Prepare(format!("write the VMM plan: {e}")))?;
        let log = std::fs::File::create(self.dir.vmm_log())
            .map_err(|e| BootError::Prepare(format!("vmm log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| BootError::Prepare(format!("vmm log: {e}")))?;
        // The VMM writes one byte into this pipe, its standard input, once
        // it is up: no polling, and its end (a failed start) is seen at once.
        let (ready_rx, ready_tx) = std::io::pipe()
            .map_err(|e| BootError::Prepare(format!("start the VMM process: {e}")))?;
        let mut child = Command::new(exe)
            .arg(&self.dir.root)
            .stdin(ready_tx)
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C aimed at the CLI must not kill the VM.
            .process_group(0)
            .spawn()
            .map_err(|e| BootError::Prepare(format!("start the VMM process: {e}")))?;
        let ready = self.wait_for_vmm_signal(ready_rx);
        if ready.is_err() {
            let _ = child.kill();
        }
        // The VMM outlives us; reap it in a thread so it never lingers as a zombie
        // while this process is alive.
        std::thread::spawn(move || child.wait());
        ready
    }

    /// Waits for the byte a VMM started by [`Self::spawn_vmm`] writes once
    /// it is up; the pipe's end without it means the process ended.
    fn wait_for_vmm_signal(&self, mut ready: std::io::PipeReader) -> Result<(), BootError> {
        let (tx, rx) = std::sync::mpsc::channel();
        // A thread, so the wait has a deadline; it ends with the pipe, which
        // the caller's kill closes on a timeout.
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let _ = tx.send(std::io::Read::read_exact(&mut ready, &mut byte).is_ok());
        });
        match rx.recv_timeout(VMM_READY_TIMEOUT) {
            Ok(true) => Ok(()),
            Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.vmm_failure())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(BootError::Prepare(format!(
                "the VMM process did not come up within {VMM_READY_TIMEOUT:?}; see {}",
                self.dir.vmm_log().display()
            ))),
        }
    }

    /// Waits for a VMM process started by someone else (a fork's, started by its
    /// source) to come up.
    pub(crate) fn wait_for_vmm_started(&self) -> Result<(), BootError> {
        self.wait_for_vmm(|| record::read_json::<ExitRecord>(&self.dir.exit()).is_some())
    }

    /// Polls until the VMM has written its pid and answers on its control socket,
    /// failing early once `ended` says the process is gone.
    fn wait_for_vmm(&self, mut ended: impl FnMut() -> bool) -> Result<(), BootError> {
        let deadline = Instant::now() + VMM_READY_TIMEOUT;
        loop {
            if ended() {
                return Err(self.vmm_failure());
            }
            if record::read_json::<PidRecord>(&self.dir.pid()).is_some()
                && control::request(
                    &self.dir.control(),
                    &ControlRequest::Status,
                    Duration::from_secs(2),
                )
                .is_ok_and(|r| r.ok)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BootError::Prepare(format!(
                    "the VMM process did not come up within {VMM_READY_TIMEOUT:?}; see {}",
                    self.dir.vmm_log().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The error a VMM process left behind when it failed to start.
    fn vmm_failure(&self) -> BootError {
        match record::read_json::<ExitRecord>(&self.dir.exit()) {
            Some(ExitRecord {
                code: Some(code),
                detail,
                hint,
                ..
            }) => BootError::Vmm {
                code,
                message: detail.unwrap_or_else(|| "the VMM failed".into()),
                hint,
            },
            _ => BootError::Vmm {
                code: "VMM_CRASHED".into(),
                message: "the VMM process exited during start-up".into(),
                hint: Some(format!(
                    "its log ends with:\n{}",
                    crate::host::command::tail(&self.dir.vmm_log(), 15)
                )),
            },
        }
    }

    /// What is known about the VM after a connection to it broke: whether its
    /// VMM still runs (or why it ended) and the ends of its console and VMM
    /// log, for error hints.
    pub fn post_mortem(&self) -> String {
        let state = match self.status() {
            VmStatus::Running { pid } => format!("the VM is still running (VMM pid {pid})"),
            VmStatus::Stopped { reason } => {
                match record::read_json::<ExitRecord>(&self.dir.exit()) {
                    Some(ExitRecord {
                        detail: Some(d), ..
                    }) => format!("the VM has stopped ({reason}: {d})"),
                    _ => format!("the VM has stopped ({reason})"),
                }
            }
        };
        format!(
            "{state}\nthe guest console ends with:\n{}\nthe VMM log ends with:\n{}",
            crate::host::command::tail(&self.dir.console(), 10),
            crate::host::command::tail(&self.dir.vmm_log(), 10)
        )
    }

    /// Waits until the guest agent accepts a session, and returns it: the
    /// caller's next requests go over the connection that proved the agent
    /// up instead of opening another.
    pub(crate) fn wait_for_agent(&self) -> Result<Session, BootError> {
        self.wait_for_agent_with(&mut Vec::new)
            .map(|(session, _)| session)
    }

    /// Waits until the guest agent accepts a session that carries the
    /// requests `make` returns, and returns it with their results.
    pub(crate) fn wait_for_agent_with(
        &self,
        make: &mut dyn FnMut() -> Vec<ferry_protocol::Message>,
    ) -> Result<(Session, Vec<Result<(), ferry_protocol::ClientError>>), BootError> {
        let client = self.client();
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if !matches!(self.status(), VmStatus::Running { .. }) {
                let console = crate::host::command::tail(&self.dir.console(), 15);
                return Err(match record::read_json::<ExitRecord>(&self.dir.exit()) {
                    Some(e) if e.code.is_some() => self.vmm_failure(),
                    Some(e) => BootError::Vmm {
                        code: "BOOT_GUEST_EXITED".into(),
                        message: format!("the guest stopped during boot ({})", e.reason),
                        hint: Some(format!("the guest console ends with:\n{console}")),
                    },
                    None => self.vmm_failure(),
                });
            }
            match client.session_with(make) {
                Ok(answered) => return Ok(answered),
                Err(e) => tracing::debug!("agent not answering yet: {e}"),
            }
            if Instant::now() > deadline {
                return Err(BootError::AgentTimeout(
                    AGENT_READY_TIMEOUT,
                    crate::host::command::tail(&self.dir.console(), 15),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one control request to the VMM process; a refusal becomes an
    /// error with the VMM's code.
    pub(crate) fn control(
        &self,
        req: &ControlRequest,
        timeout: Duration,
    ) -> Result<ControlResponse, VmError> {
        let resp = match control::request(&self.dir.control(), req, timeout) {
            Ok(resp) => resp,
            // The VMM died before or while answering (killed, crashed): say
            // that, not how its socket broke.
            Err(e) if self.wait_exited(Duration::from_secs(1)) => {
                let reason = match self.status() {
                    VmStatus::Stopped { reason } => reason,
                    VmStatus::Running { .. } => return Err(e),
                };
                return Err(VmError::NotRunning {
                    name: self.record.name.clone(),
                    reason,
                });
            }
            Err(e) => return Err(e),
        };
        if resp.ok {
            Ok(resp)
        } else {
            Err(VmError::Refused {
                code: resp.code.unwrap_or_else(|| "VM_CONTROL_FAILED".into()),
                message: resp.message.unwrap_or_default(),
            })
        }
    }

    pub(crate) fn require_running(&self) -> Result<(), VmError> {
        match self.status() {
            VmStatus::Running { .. } => Ok(()),
            VmStatus::Stopped { reason } => Err(VmError::NotRunning {
                name: self.record.name.clone(),
                reason,
            }),
        }
    }

    /// Stops the vCPUs; the VM keeps its memory, devices and forwards.
    pub fn pause(&self) -> Result<(), VmError> {
        let _lock = self.lock()?;
        self.require_running()?;
        self.control(&ControlRequest::Pause, Duration::from_secs(30))
            .map(drop)
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<(), VmError> {
        let _lock = self.lock()?;
        self.require_running()?;
        self.control(&ControlRequest::Resume, Duration::from_secs(30))
            .map(drop)
    }

    /// Whether the VM's vCPUs are paused (false when it is not running).
    pub fn is_paused(&self) -> bool {
        control::request(
            &self.dir.control(),
            &ControlRequest::Status,
            Duration::from_secs(5),
        )
        .is_ok_and(|r| r.state.as_deref() == Some("paused"))
    }

    /// Stops the VM: asks the guest to power off (its programs end and its
    /// disks are synced), and after `timeout` ends the VMM; kills it if even
    /// that fails. Returns once the VMM process has exited, so its ports,
    /// sockets and files are released.
    pub fn stop(&self, timeout: Duration) -> Result<(), VmError> {
        // Held until the VMM process has exited.
        let lock = self.lock()?;
        let VmStatus::Running { .. } = self.status() else {
            return Err(VmError::NotRunning {
                name: self.record.name.clone(),
                reason: "already stopped".into(),
            });
        };
        // Read before asking: an exiting VMM removes its pid file before the
        // process (and its host ports) is gone.
        let pid = record::read_json::<PidRecord>(&self.dir.pid());
        // A paused guest cannot power itself off.
        let asked = !self.is_paused()
            && self
                .client()
                .with_timeout(Some(Duration::from_secs(5)))
                .power(ferry_protocol::PowerAction::Poweroff)
                .is_ok();
        if asked && self.wait_gone(pid, timeout) {
            return Ok(());
        }
        let _ = control::request(
            &self.dir.control(),
            &ControlRequest::Stop,
            Duration::from_secs(5),
        );
        if self.wait_gone(pid, Duration::from_secs(10)) {
            return Ok(());
        }
        self.kill_locked(&lock)
    }

    /// Waits up to `timeout` for the VMM process to exit; true if it has.
    pub(crate) fn wait_exited(&self, timeout: Duration) -> bool {
        self.wait_gone(record::read_json::<PidRecord>(&self.dir.pid()), timeout)
    }

    /// [`Self::wait_exited`] for the VMM process `pid` (read before it was
    /// asked to exit), so that its return means the process is gone and its
    /// host ports are free.
    fn wait_gone(&self, pid: Option<PidRecord>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let gone = match pid {
                Some(p) => !p.alive(),
                None => !matches!(self.status(), VmStatus::Running { .. }),
            };
            if gone {
                // Its exit record and socket cleanup come with the status read.
                let _ = self.status();
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the VMM process outright and waits until it is gone.
    pub fn kill(&self) -> Result<(), VmError> {
        let lock = self.lock()?;
        self.kill_locked(&lock)
    }

    /// [`Machine::kill`], for a caller that holds the VM's lock.
    fn kill_locked(&self, _held: &VmLock) -> Result<(), VmError> {
        if let Some(pid) = record::read_json::<PidRecord>(&self.dir.pid()) {
            if pid.alive() {
                // SAFETY: plain kill(2) on a pid we verified is our VMM (start time matches).
                unsafe { libc::kill(pid.pid as i32, libc::SIGKILL) };
                if !self.wait_exited(Duration::from_secs(10)) {
                    return Err(VmError::StopTimeout(self.record.name.clone()));
                }
            }
        }
        let _ = self.status();
        Ok(())
    }

    /// Stops the VM if needed (without asking the guest) and deletes its state.
    pub fn remove(self) -> Result<(), VmError> {
        let lock = self.lock()?;
        self.remove_locked(&lock)
    }

    /// [`Machine::remove`], for a caller that holds the VM's lock (which
    /// goes with the directory).
    pub(crate) fn remove_locked(&self, held: &VmLock) -> Result<(), VmError> {
        if matches!(self.status(), VmStatus::Running { .. }) {
            let pid = record::read_json::<PidRecord>(&self.dir.pid());
            let _ = control::request(
                &self.dir.control(),
                &ControlRequest::Stop,
                Duration::from_secs(5),
            );
            if !self.wait_gone(pid, Duration::from_secs(10)) {
                self.kill_locked(held)?;
            }
        }
        std::fs::remove_dir_all(&self.dir.root).map_err(VmError::io("remove VM directory"))
    }

    /// Starts forwarding `forward` into the guest now; the VM's record keeps it.
    pub fn expose(&self, forward: crate::forward::PortForward) -> Result<(), VmError> {
        let _lock = self.lock()?;
        self.require_running()?;
        self.control(&ControlRequest::Expose { forward }, Duration::from_secs(10))
            .map(drop)
    }

    /// Stops forwarding `forward` and releases its host port.
    pub fn unexpose(&self, forward: crate::forward::PortForward) -> Result<(), VmError> {
        let _lock = self.lock()?;
        self.require_running()?;
        self.control(
            &ControlRequest::Unexpose { forward },
            Duration::from_secs(10),
        )
        .map(drop)
    }

    /// Memory use of the VM's VMM process and guest.
    pub fn stats(&self) -> Result<crate::stats::Stats, VmError> {
        self.require_running()?;
        let resp = self.control(&ControlRequest::Stats, Duration::from_secs(10))?;
        resp.info
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| VmError::Control("statistics missing from the answer".into()))
    }

    /// Starts, reads or stops the record of guest pages changed by the
    /// guest or its devices; returns the pages changed since the start or
    /// the previous [`DirtyAction::Take`] (0 for the other actions).
    ///
    /// [`DirtyAction::Take`]: crate::vm::control::DirtyAction::Take
    pub fn dirty_pages(&self, action: crate::vm::control::DirtyAction) -> Result<u64, VmError> {
        self.require_running()?;
        let resp = self.control(
            &ControlRequest::DirtyPages { action },
            Duration::from_secs(30),
        )?;
        resp.info
            .as_ref()
            .and_then(|v| v.get("pages"))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| VmError::Control("page count missing from the answer".into()))
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> Result<Vec<u8>, VmError> {
        match std::fs::read(self.dir.console()) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(VmError::io("read console log")(e)),
        }
    }
}

/// How to write a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Keep the VM running (by default it stops: a hand-off never leaves two
    /// live copies). A paused VM stays paused.
    pub leave_running: bool,
    /// Leave out the disk image the VM booted from (only its content id is kept).
    pub thin: bool,
    /// Store guest memory uncompressed.
    pub raw_memory: bool,
    /// Compress the pages the guest touched last too (a smaller bundle; the
    /// restore decodes them before the guest runs instead of mapping them).
    pub compact: bool,
    /// Write an incremental bundle: only the memory pages and disk clusters
    /// changed since this earlier snapshot, taken of the same running VM
    /// with `leave_running` (`SNAPSHOT_PARENT_MISMATCH` otherwise).
    pub since: Option<PathBuf>,
}

/// What a snapshot wrote.
pub type SnapshotReport = crate::snapshot::capture::CaptureReport;

impl Machine {
    fn snapshot_request(&self, path: PathBuf, opts: &SnapshotOptions) -> ControlRequest {
        ControlRequest::Snapshot {
            path,
            leave_running: opts.leave_running,
            thin: opts.thin,
            raw_memory: opts.raw_memory,
            compact: opts.compact,
            since: opts.since.clone(),
        }
    }

    /// The report of a successful snapshot answer; a hand-off removes the VM,
    /// which now lives in the bundle, once its VMM process has exited. The
    /// caller holds the VM's lock until this returns.
    fn snapshot_done(
        &self,
        resp: ControlResponse,
        opts: &SnapshotOptions,
        held: &VmLock,
    ) -> Result<SnapshotReport, VmError> {
        let report = resp
            .info
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        if !opts.leave_running {
            self.wait_exited(Duration::from_secs(30));
            let _ = self.remove_locked(held);
        }
        Ok(report)
    }

    /// A broken control connection says little by itself: add whether the
    /// VMM still runs and how its logs end.
    fn with_post_mortem(&self, e: VmError) -> VmError {
        match e {
            VmError::Io { context, source } => VmError::Io {
                context: format!("{context}\n{}", self.post_mortem()),
                source,
            },
            other => other,
        }
    }

    /// Freezes the VM into a bundle file at `path` (written atomically).
    /// Blocks until the bundle is complete.
    pub fn snapshot_to_path(
        &self,
        path: &std::path::Path,
        opts: &SnapshotOptions,
    ) -> Result<SnapshotReport, VmError> {
        // Held until the bundle is written and, for a hand-off, the VMM has exited.
        let lock = self.lock()?;
        self.require_running()?;
        let path = std::path::absolute(path).map_err(VmError::io("resolve bundle path"))?;
        let resp = self
            .control(
                &self.snapshot_request(path, opts),
                Duration::from_secs(3600),
            )
            .map_err(|e| self.with_post_mortem(e))?;
        self.snapshot_done(resp, opts, &lock)
    }

    /// Freezes the VM into a bundle streamed to `out` (a pipe, a socket, a
    /// file). If `out` fails before the bundle is complete, the VM is not
    /// handed off: it runs on (or stays paused) and the error says so.
    /// Blocks until the bundle is complete.
    pub fn snapshot_to_writer(
        &self,
        out: &mut (dyn std::io::Write + Send),
        opts: &SnapshotOptions,
    ) -> Result<SnapshotReport, VmError> {
        // Held until the bundle is written and, for a hand-off, the VMM has exited.
        let lock = self.lock()?;
        self.require_running()?;
        let fifo = self
            .dir
            .root
            .join(format!("snapshot-{}.fifo", random_hex(4)?));
        nix_mkfifo(&fifo).map_err(VmError::io("create the snapshot stream"))?;
        let req = self.snapshot_request(fifo.clone(), opts);
        let (resp, pumped) = std::thread::scope(|scope| {
            let pump = scope.spawn(|| -> std::io::Result<u64> {
                let mut f = std::fs::File::open(&fifo)?;
                let n = std::io::copy(&mut f, out)?;
                out.flush()?;
                Ok(n)
            });
            let resp = self.control(&req, Duration::from_secs(3600));
            if resp.is_err() {
                // The VMM may never have opened the stream: open its write end
                // without blocking so the reader sees its end. Fails harmlessly
                // (ENXIO) when the reader is already gone.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo);
            }
            let pumped = pump
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("stream thread panicked")));
            (resp, pumped)
        });
        let _ = std::fs::remove_file(&fifo);
        match (resp, pumped) {
            (Ok(resp), Ok(_)) => self.snapshot_done(resp, opts, &lock),
            (_, Err(e)) => Err(VmError::Refused {
                code: "SNAPSHOT_STREAM_BROKEN".into(),
                message: format!(
                    "the bundle stream broke before its end ({e}); {} was not handed off and {}",
                    self.record.name,
                    if matches!(self.status(), VmStatus::Running { .. }) {
                        "is still running"
                    } else {
                        "has stopped"
                    }
                ),
            }),
            (Err(e), Ok(_)) => Err(self.with_post_mortem(e)),
        }
    }
}

/// mkfifo(3) with mode 0600.
fn nix_mkfifo(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path contains a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    thread_local! {
        /// What [`lock_wait`] gives on this test thread, when set.
        pub(super) static LOCK_WAIT_HERE: Cell<Option<Duration>> = const { Cell::new(None) };
    }

    /// A VM that exists (its directory and record) but does not run.
    fn machine(root: &Path, name: &str) -> Machine {
        let config = Arc::new(Config {
            dirs: crate::config::Dirs {
                data: root.join("data"),
                cache: root.join("cache"),
            },
            ..Config::default()
        });
        let record: VmRecord = serde_json::from_value(serde_json::json!({
            "name": name,
            "id": "0123456789abcdef",
            "created_at": 1,
            "cpus": 1,
            "memory_mib": 64,
            "kernel": "/nonexistent/vmlinux",
            "image": "test",
            "token": "t",
        }))
        .unwrap();
        let (dir, owner) = Registry::new(&config.dirs).create(&record).unwrap();
        owner.release();
        Machine {
            record,
            dir,
            config,
            owner: None,
        }
    }

    #[test]
    fn control_operations_fail_busy_while_another_holds_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let m = machine(tmp.path(), "held");
        let held = VmLock::acquire(&m.dir, m.name(), Duration::ZERO).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(m.dir.lock()).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
        let wait = Duration::from_millis(150);
        LOCK_WAIT_HERE.with(|w| w.set(Some(wait)));
        let forward: crate::forward::PortForward = "127.0.0.1:1:2".parse().unwrap();
        let bundle = tmp.path().join("never.snap");
        type Op<'a> = Box<dyn Fn() -> Result<(), VmError> + 'a>;
        let ops: Vec<(&str, Op)> = vec![
            ("pause", Box::new(|| m.pause())),
            ("resume", Box::new(|| m.resume())),
            ("stop", Box::new(|| m.stop(Duration::ZERO))),
            ("kill", Box::new(|| m.kill())),
            ("expose", Box::new(|| m.expose(forward))),
            ("unexpose", Box::new(|| m.unexpose(forward))),
            (
                "snapshot",
                Box::new(|| {
                    m.snapshot_to_path(&bundle, &SnapshotOptions::default())
                        .map(drop)
                }),
            ),
            (
                "snapshot to a writer",
                Box::new(|| {
                    m.snapshot_to_writer(&mut std::io::sink(), &SnapshotOptions::default())
                        .map(drop)
                }),
            ),
            ("remove", Box::new(|| m.clone().remove())),
        ];
        for (what, op) in ops {
            let started = Instant::now();
            let err = op().unwrap_err();
            assert_eq!(err.code(), "VM_BUSY", "{what}: {err}");
            assert!(started.elapsed() >= wait, "{what} gave up before the wait");
            assert!(err.hint().unwrap().contains("held"), "{what}: {err:?}");
        }
        let sibling = crate::snapshot::fork::Sibling {
            name: "held-sibling".into(),
            ports: vec![],
        };
        let err = crate::snapshot::fork::fork(&m, &[sibling]).unwrap_err();
        assert_eq!(err.code(), "VM_BUSY", "fork: {err}");
        assert!(!m.registry().dir("held-sibling").root.exists());
        assert!(m.dir.record().exists(), "nothing was removed");

        // Once let go, the operations run (and find the VM stopped).
        drop(held);
        assert_eq!(m.pause().unwrap_err().code(), "VM_NOT_RUNNING");
        m.clone().remove().unwrap();
        assert!(!m.dir.root.exists());
        let err = VmLock::acquire(&m.dir, m.name(), Duration::ZERO).unwrap_err();
        assert_eq!(err.code(), "VM_NOT_FOUND");
    }

    #[test]
    fn lock_takers_run_one_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let m = machine(tmp.path(), "shared");
        let inside = AtomicUsize::new(0);
        let entered = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        let _lock = m.lock().unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        std::thread::sleep(Duration::from_millis(3));
                        inside.fetch_sub(1, Ordering::SeqCst);
                        entered.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(entered.load(Ordering::SeqCst), 20);
    }

    #[test]
    fn a_waiter_gets_the_lock_when_it_is_let_go_or_learns_the_vm_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let m = machine(tmp.path(), "waited");
        let held = m.lock().unwrap();
        // Timed from before the waiter exists: a thread started late under
        // load still cannot get the lock before it is let go.
        let started = Instant::now();
        let got = std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                VmLock::acquire(&m.dir, m.name(), Duration::from_secs(5)).map(|_| started.elapsed())
            });
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
            waiter.join().unwrap()
        });
        assert!(got.unwrap() >= Duration::from_millis(100));

        // Removed under the lock while another waits: that one hears the VM is gone.
        let held = m.lock().unwrap();
        let got = std::thread::scope(|s| {
            let waiter = s.spawn(|| VmLock::acquire(&m.dir, m.name(), Duration::from_secs(5)));
            std::thread::sleep(Duration::from_millis(100));
            m.remove_locked(&held).unwrap();
            drop(held);
            waiter.join().unwrap()
        });
        assert_eq!(got.unwrap_err().code(), "VM_NOT_FOUND");
    }
}
