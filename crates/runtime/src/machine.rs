//! Booting, reaching and stopping VMs: the operations behind `ferry boot`, `exec`,
//! `cp`, `stop` and `rm`.
//!
//! Each VM runs in its own VMM process (`ferry vmm-run DIR`, see [`crate::vmm_process`]),
//! detached from the terminal that started it. The guest agent is reached over the
//! VM's vsock socket with the per-VM token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_protocol::config::{AgentConfig, MainCommand};
use ferry_protocol::{Client, ClientError, Session, Token};

use crate::error::Coded;
use crate::images::{self, ImageError};
use crate::vm::control::{self, ControlRequest};
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

/// What to boot.
#[derive(Debug, Clone, Default)]
pub struct BootSpec {
    /// VM name; generated when absent.
    pub name: Option<String>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Guest memory in MiB.
    pub memory_mib: Option<u32>,
    /// Guest kernel; the installed one when absent.
    pub kernel: Option<PathBuf>,
    /// Root filesystem image; the base image when absent.
    pub image: Option<PathBuf>,
    /// Main process of the VM (overrides the image's command).
    pub command: Option<Vec<String>>,
    /// Whether the image's own command runs as the main process when `command`
    /// is not given. Attached boots run commands through exec instead.
    pub run_image_command: bool,
    /// Environment for the main process.
    pub env: BTreeMap<String, String>,
    /// Working directory for the main process.
    pub workdir: Option<String>,
    /// Remove the VM when it stops.
    pub ephemeral: bool,
    /// Host paths to copy in or share live (`--mount`, `--live-mount`).
    pub mounts: Vec<crate::mounts::MountRecord>,
    /// Host ports forwarded into the guest (`-p`).
    pub ports: Vec<crate::forward::PortForward>,
    /// Give the VM outbound networking through passt (`--net`).
    pub net: bool,
    /// Boot a kernel even where a boot template matches (see [`crate::template`]).
    pub cold: bool,
}

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
    /// The guest agent binary is missing.
    #[error("guest agent binary not found (looked in {0})")]
    AgentNotFound(String),
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
}

impl Coded for BootError {
    fn code(&self) -> &str {
        match self {
            BootError::Image(e) => e.code(),
            BootError::Vm(e) => e.code(),
            BootError::KernelNotFound(_) => "BOOT_KERNEL_NOT_FOUND",
            BootError::AgentNotFound(_) => "BOOT_AGENT_NOT_FOUND",
            BootError::Vmm { code, .. } => code,
            BootError::AgentTimeout(..) => "BOOT_AGENT_TIMEOUT",
            BootError::Prepare(_) => "BOOT_PREPARE_FAILED",
            BootError::Mount(e) => e.code(),
            BootError::Forward(e) => e.code(),
            BootError::Net(e) => e.code(),
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            BootError::Image(e) => e.hint(),
            BootError::Vm(e) => e.hint(),
            BootError::KernelNotFound(_) => {
                Some("omit --kernel to use the installed one (`ferry install`)".into())
            }
            BootError::AgentNotFound(_) => Some(
                "install ferry-agent next to the ferry binary, or set FERRY_AGENT to its path"
                    .into(),
            ),
            BootError::Vmm { hint, .. } => hint.clone(),
            BootError::AgentTimeout(_, console) => {
                Some(format!("the guest console ends with:\n{console}"))
            }
            BootError::Prepare(_) => None,
            BootError::Mount(e) => e.hint(),
            BootError::Forward(e) => e.hint(),
            BootError::Net(e) => e.hint(),
        }
    }
}

/// A VM that exists on this host.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Its record.
    pub record: VmRecord,
    /// Its state directory.
    pub dir: VmDir,
}

/// Finds the guest agent binary: `$FERRY_AGENT`, next to this executable, or in
/// the workspace's static build output.
pub fn agent_binary() -> Result<PathBuf, BootError> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("FERRY_AGENT").map(PathBuf::from) {
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p);
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        for candidate in [
            dir.join("ferry-agent"),
            dir.join("../x86_64-unknown-linux-gnu/release/ferry-agent"),
        ] {
            if candidate.is_file() {
                return Ok(candidate);
            }
            tried.push(candidate);
        }
    }
    Err(BootError::AgentNotFound(
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

/// Random lowercase hex of `bytes` bytes.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    hex::encode(buf)
}

impl Machine {
    /// Creates and starts a VM, returning once its guest agent answers.
    pub fn boot(spec: &BootSpec) -> Result<Machine, BootError> {
        if crate::template::ineligible(spec).is_none() && crate::template::any() {
            if let Some(m) = Self::boot_from_template(spec)? {
                return Ok(m);
            }
        }
        Self::boot_cold(spec)
    }

    /// Restores the boot template matching `spec`, if there is one and the
    /// boot has no main command. A template that fails to restore is deleted
    /// and `None` returned, so the caller boots a kernel instead.
    fn boot_from_template(spec: &BootSpec) -> Result<Option<Machine>, BootError> {
        let mut phases = crate::progress::Phases::from_env();
        let (key, image) = crate::template::key_for(spec)?;
        let Some(template) = crate::template::find(&key) else {
            return Ok(None);
        };
        let command = spec.command.clone().or_else(|| {
            spec.run_image_command
                .then(|| image.config.cmd.clone())
                .flatten()
        });
        let mounts = crate::mounts::prepare(&spec.mounts)?;
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("vm-{}", random_hex(3)));
        phases.mark("template found");
        let rs = crate::snapshot::restore::RestoreSpec {
            bundle: template.path.clone(),
            owned: false,
            name: Some(name.clone()),
            remap_mounts: Vec::new(),
            ports: Some(spec.ports.clone()),
            hostname: Some(name.clone()),
        };
        let restored = crate::snapshot::restore::restore_as(&rs, |rec| {
            rec.image = image.description.clone();
            rec.ephemeral = spec.ephemeral;
            rec.mounts = mounts.clone();
            rec.command = command.clone();
        });
        let machine = match restored {
            Ok(m) => m,
            Err(crate::snapshot::restore::RestoreError::Boot(e))
                if matches!(e.code(), "VM_NAME_TAKEN" | "BOOT_PORT_FORWARD_IN_USE") =>
            {
                return Err(e)
            }
            Err(e) => {
                tracing::warn!(
                    "boot template {} does not restore ({}: {e}); deleting it and booting the kernel",
                    template.id,
                    e.code()
                );
                crate::template::remove(&template.id);
                return Ok(None);
            }
        };
        phases.mark("restored from template");
        let started = (|| -> Result<(), BootError> {
            let client = machine.client();
            crate::mounts::copy_in(&client, &mounts)?;
            // Last, as a kernel boot starts it: once everything else is in place.
            if let Some(argv) = command {
                let mut env = image.config.env.clone();
                env.extend(spec.env.clone());
                let main = MainCommand {
                    argv,
                    env,
                    workdir: spec.workdir.clone().or(image.config.workdir.clone()),
                    user: None,
                };
                client.start_main(&main).map_err(|e| BootError::Vmm {
                    code: "BOOT_MAIN_FAILED".into(),
                    message: format!("the main command did not start: {e}"),
                    hint: Some("check the command and its working directory in the image".into()),
                })?;
            }
            Ok(())
        })();
        if let Err(e) = started {
            let _ = machine.kill();
            let _ = std::fs::remove_dir_all(&machine.dir.root);
            return Err(e);
        }
        phases.mark("mounts and main command");
        Ok(Some(machine))
    }

    /// Boots a kernel: [`Self::boot`] without templates.
    fn boot_cold(spec: &BootSpec) -> Result<Machine, BootError> {
        let mut phases = crate::progress::Phases::from_env();
        let image = images::resolve(spec.image.as_deref())?;
        let kernel = match &spec.kernel {
            Some(k) if !k.is_file() => return Err(BootError::KernelNotFound(k.clone())),
            Some(k) => k.clone(),
            None => images::installed_assets()?.0,
        };
        let agent = agent_binary()?;
        let mounts = crate::mounts::prepare(&spec.mounts)?;
        if spec.net {
            crate::net::find_passt()?;
        }
        let registry = Registry::default();
        // A taken host port fails the boot before anything is created; the
        // VMM binds for real and reports the same error if it loses a race.
        crate::forward::check_available(&spec.ports, &registry)?;
        let token = Token::generate().map_err(|e| BootError::Prepare(format!("token: {e}")))?;
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("vm-{}", random_hex(3)));
        let command = spec.command.clone().or_else(|| {
            spec.run_image_command
                .then(|| image.config.cmd.clone())
                .flatten()
        });
        let idle = command.is_none();
        let id = random_hex(8);
        let record = VmRecord {
            net: spec.net.then(|| crate::net::NetSettings::for_vm(&id)),
            ports: spec.ports.clone(),
            name: name.clone(),
            id,
            created_at: record::now(),
            cpus: spec.cpus.unwrap_or(DEFAULT_CPUS),
            memory_mib: spec.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            kernel,
            image: image.description.clone(),
            command: command.clone(),
            token: token.as_hex().to_string(),
            ephemeral: spec.ephemeral,
            mounts: mounts.clone(),
        };
        let dir = registry.create(&record)?;
        let machine = Machine { record, dir };
        let started = (|| {
            ferry_disk::create_layer(&machine.dir.root_disk(), &image.ext4, None)
                .map_err(|e| BootError::Prepare(format!("root disk: {e}")))?;
            let mut env = image.config.env.clone();
            env.extend(spec.env.clone());
            let config = AgentConfig {
                command: command.map(|argv| MainCommand {
                    argv,
                    env,
                    workdir: spec.workdir.clone().or(image.config.workdir.clone()),
                    user: None,
                }),
                hostname: name.clone(),
                mounts: crate::mounts::agent_mounts(&mounts),
                network: machine
                    .record
                    .net
                    .as_ref()
                    .map(crate::net::NetSettings::agent_config),
                ..AgentConfig::new(&token)
            };
            crate::initramfs::write_initramfs(&agent, &config, &machine.dir.initramfs())
                .map_err(|e| BootError::Prepare(format!("initramfs: {e}")))?;
            phases.mark("prepare (image, disk layer, initramfs)");
            machine.spawn_vmm()?;
            phases.mark("VMM up");
            let r = machine.wait_for_agent();
            phases.mark("agent answers");
            let session = r?;
            crate::mounts::copy_in(&machine.client(), &mounts)?;
            if idle {
                warm_page_cache(&session);
                phases.mark("page cache warmed");
            }
            Ok(())
        })();
        if let Err(e) = started {
            let _ = machine.kill();
            let _ = std::fs::remove_dir_all(&machine.dir.root);
            return Err(e);
        }
        Ok(machine)
    }

    /// Opens an existing VM by name.
    pub fn open(name: &str) -> Result<Machine, VmError> {
        let registry = Registry::default();
        let info = registry.get(name)?;
        Ok(Machine {
            record: info.record,
            dir: registry.dir(name),
        })
    }

    /// Opens a VM that must be running.
    pub fn open_running(name: &str) -> Result<Machine, VmError> {
        let registry = Registry::default();
        let (info, _) = registry.get_running(name)?;
        Ok(Machine {
            record: info.record,
            dir: registry.dir(name),
        })
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
    /// let session = Machine::open_running("web")?.session()?;
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
        Registry::default().status(&self.dir)
    }

    pub(crate) fn spawn_vmm(&self) -> Result<(), BootError> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()
            .map_err(|e| BootError::Prepare(format!("cannot find the ferry executable: {e}")))?;
        let log = std::fs::File::create(self.dir.vmm_log())
            .map_err(|e| BootError::Prepare(format!("vmm log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| BootError::Prepare(format!("vmm log: {e}")))?;
        let mut child = Command::new(exe)
            .arg("vmm-run")
            .arg(&self.dir.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C aimed at the CLI must not kill the VM.
            .process_group(0)
            .spawn()
            .map_err(|e| BootError::Prepare(format!("start the VMM process: {e}")))?;
        let ready = self.wait_for_vmm(|| matches!(child.try_wait(), Ok(Some(_))));
        if ready.is_err() {
            let _ = child.kill();
        }
        // The VMM outlives us; reap it in a thread so it never lingers as a zombie
        // while this process is alive.
        std::thread::spawn(move || child.wait());
        ready
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
            match client.session() {
                Ok(session) => return Ok(session),
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

    /// Stops the VM: asks its VMM to end, then waits; kills it if it does not.
    pub fn stop(&self) -> Result<(), VmError> {
        let VmStatus::Running { .. } = self.status() else {
            return Err(VmError::NotRunning {
                name: self.record.name.clone(),
                reason: "already stopped".into(),
            });
        };
        let _ = control::request(
            &self.dir.control(),
            &ControlRequest::Stop,
            Duration::from_secs(5),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.status(), VmStatus::Running { .. }) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }

    /// Kills the VMM process outright.
    fn kill(&self) -> Result<(), VmError> {
        if let Some(pid) = record::read_json::<PidRecord>(&self.dir.pid()) {
            if pid.alive() {
                // SAFETY: plain kill(2) on a pid we verified is our VMM (start time matches).
                unsafe { libc::kill(pid.pid as i32, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid.alive() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = self.status();
        Ok(())
    }

    /// Stops the VM if needed and deletes its state.
    pub fn remove(self) -> Result<(), VmError> {
        if matches!(self.status(), VmStatus::Running { .. }) {
            self.stop()?;
        }
        std::fs::remove_dir_all(&self.dir.root).map_err(VmError::io("remove VM directory"))
    }
}

/// Runs one short dynamically linked command in a VM that booted without a
/// command, so that its first command, and the first command of every fork,
/// snapshot and template made of it, finds the loader, libc and the shell in
/// the guest's page cache instead of reading them from disk (about half of a
/// first `exec` after a fork under emulation). Best effort: an image without
/// a shell boots all the same.
fn warm_page_cache(session: &Session) {
    let req = ferry_protocol::ExecRequest::new(["/bin/sh", "-c", ":"]);
    if let Err(e) = session.output(req, None) {
        tracing::debug!("warming the guest's page cache: {e}");
    }
}
