//! The VM's main process: the `command` of the agent config, started at
//! boot, or one started later by a `StartMain` request (for a VM restored
//! from a snapshot taken before its main process was chosen). Either way
//! the PID 1 supervisor watches it and powers the VM off when it exits.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;

use ferry_protocol::{ErrorCode, ExitKind, MainCommand};
use nix::sys::signal::Signal;

use crate::agent_log;
use crate::error::AgentError;
use crate::process::{build_command, spawn_error, ProcessSpec};
use crate::reaper::{GroupSignaller, Reaper, Watch};

/// Where the main process's stdout and stderr go in a guest.
pub const CONSOLE: &str = "/dev/console";

/// What to run for `cmd`.
pub fn spec(cmd: &MainCommand) -> ProcessSpec {
    ProcessSpec {
        argv: cmd.argv.clone(),
        env: cmd
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cwd: cmd.workdir.clone(),
        user: cmd.user.clone(),
        tty: false,
    }
}

/// Failure to start the main process.
#[derive(Debug)]
pub struct StartError {
    /// What went wrong, as reported to the host.
    pub error: AgentError,
    /// The shell-style status the console reports when the boot-time main
    /// process cannot start: 127 when the program is missing or could not
    /// be executed, 126 for any other failure.
    pub exit_code: i32,
}

/// Starts a main process with stdin from `/dev/null` and stdout and stderr
/// on `output` (the [`CONSOLE`] in a guest). User, groups, environment and
/// working directory are resolved like an exec's, from `etc_dir`.
pub fn start(
    spec: &ProcessSpec,
    reaper: &Reaper,
    etc_dir: &Path,
    output: &Path,
) -> Result<Watch, StartError> {
    let mut cmd = build_command(spec, etc_dir).map_err(|error| {
        let exit_code = match error.code {
            ErrorCode::ExecNotFound => 127,
            _ => 126,
        };
        StartError { error, exit_code }
    })?;
    let output_err = |e: std::io::Error| StartError {
        error: AgentError::new(ErrorCode::ExecFailed, format!("{}: {e}", output.display())),
        exit_code: 126,
    };
    // One open file description for both, so writes to a regular file
    // (in tests) append rather than overwrite each other.
    let stdout = OpenOptions::new()
        .append(true)
        .open(output)
        .map_err(output_err)?;
    let stderr = stdout.try_clone().map_err(output_err)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    let (_child, watch) = reaper.spawn(&mut cmd).map_err(|e| StartError {
        error: spawn_error(&spec.argv[0], &e),
        exit_code: 127,
    })?;
    agent_log!("main process started: pid {}", watch.pid());
    Ok(watch)
}

/// Whether the VM may still get a main process.
enum SlotState {
    /// Not yet: a started one goes to the supervisor through this sender.
    Free(Sender<Watch>),
    /// It has one (or had one; the VM is then powering off), signalled
    /// through this once known.
    Taken(Option<GroupSignaller>),
}

/// The VM's one main process, as seen by the server: `StartMain` fills the
/// slot at most once and hands the process to the supervisor.
pub struct MainSlot {
    state: Mutex<SlotState>,
    output: PathBuf,
}

impl MainSlot {
    /// A slot whose process is handed to the supervisor over `to_supervisor`.
    /// `taken` when the agent config already names a main process, which
    /// boot starts itself.
    pub fn new(to_supervisor: Sender<Watch>, taken: bool) -> Self {
        MainSlot {
            state: Mutex::new(if taken {
                SlotState::Taken(None)
            } else {
                SlotState::Free(to_supervisor)
            }),
            output: PathBuf::from(CONSOLE),
        }
    }

    /// Sends the process's stdout and stderr to `path` instead of the
    /// console (for tests on a development host).
    pub fn with_output(mut self, path: impl Into<PathBuf>) -> Self {
        self.output = path.into();
        self
    }

    /// Starts `cmd` as the main process, unless there already is one, and
    /// returns its pid. When it cannot start, the slot stays free so the
    /// host can correct the command and try again.
    pub fn start(
        &self,
        cmd: &MainCommand,
        reaper: &Reaper,
        etc_dir: &Path,
    ) -> Result<i32, AgentError> {
        // Held across the spawn, so of two concurrent requests exactly one
        // starts a process.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let SlotState::Free(tx) = &*state else {
            return Err(AgentError::new(
                ErrorCode::MainAlreadyRunning,
                "this VM already has a main process",
            ));
        };
        let watch = start(&spec(cmd), reaper, etc_dir, &self.output).map_err(|e| {
            agent_log!("main process: {}", e.error);
            e.error
        })?;
        let pid = watch.pid();
        let signaller = watch.signaller();
        if let Err(unsent) = tx.send(watch) {
            // Nobody would power the VM off when it exits: do not leave it
            // running unsupervised.
            unsent.0.signaller().signal(Signal::SIGKILL);
            return Err(AgentError::new(
                ErrorCode::Internal,
                "the main process supervisor is gone",
            ));
        }
        *state = SlotState::Taken(Some(signaller));
        Ok(pid)
    }

    /// Records the main process started at boot (from the agent config),
    /// so `SignalMain` reaches it.
    pub fn set_booted(&self, signaller: GroupSignaller) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = SlotState::Taken(Some(signaller));
    }

    /// Sends `signal` to the main process's group. `WORKLOAD_NOT_RUNNING`
    /// when there is no main process, or it was reaped (never a reused pid).
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let sig = Signal::try_from(signal)
            .map_err(|_| AgentError::new(ErrorCode::ExecInvalid, format!("no signal {signal}")))?;
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &*state {
            SlotState::Taken(Some(s)) if s.signal(sig) => Ok(()),
            _ => Err(AgentError::new(
                ErrorCode::MainNotRunning,
                "this VM has no main process running",
            )),
        }
    }
}

/// The supervisor's hold on the main process: the boot-time one, or the
/// one a `StartMain` hands over later.
pub struct MainWatch {
    main: Option<Watch>,
    handed: Receiver<Watch>,
}

impl MainWatch {
    /// Watches `main` (started at boot, if any) and whatever arrives on
    /// `handed` (from [`MainSlot`]) while there is none.
    pub fn new(main: Option<Watch>, handed: Receiver<Watch>) -> Self {
        MainWatch { main, handed }
    }

    /// Takes over a main process handed over since the last call, and
    /// returns how the main process ended once it has. Never blocks.
    pub fn poll(&mut self) -> Option<ExitKind> {
        if self.main.is_none() {
            self.main = self.handed.try_recv().ok();
        }
        self.main.as_ref()?.try_wait()
    }

    /// The main process's pid, once there is one.
    pub fn pid(&self) -> Option<i32> {
        self.main.as_ref().map(Watch::pid)
    }
}
