//! One process of a task, the init process or an exec: its launch, stdio,
//! state, and the thread that carries its output and sees its end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use ferry::{ChildEvent, ExecOptions, Vm};
use ferry_protocol::ExecInput;

use crate::error::{Kind, Result, ShimError};
use crate::spec::Launch;
use crate::stdio::{Sink, StdinFifo, Stdio};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Running in the VM.
    Running,
    /// Ended; its exit status is known.
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// Exit code, 128 + N for signal N.
    pub code: u32,
    /// When.
    pub at: Timestamp,
}

struct State {
    status: Status,
    pid: u32,
    exit: Option<Exit>,
    input: Option<ExecInput>,
    /// The stdin FIFO until the process starts and its pump takes it.
    stdin: Option<StdinFifo>,
}

/// A process of a task.
pub struct Process {
    /// Empty for the init process.
    pub exec_id: String,
    /// What runs.
    pub launch: Launch,
    /// Its stdio.
    pub stdio: Stdio,
    state: Mutex<State>,
    ended: Condvar,
    /// Set once the client closed stdin (`CloseIO`).
    stdin_closed: Arc<AtomicBool>,
    /// Set once the process ended: its stdin pump stops.
    gone: Arc<AtomicBool>,
}

/// What a signal did.
#[derive(Debug, PartialEq)]
pub enum Signalled {
    /// It went to the running process.
    Sent,
    /// The process had not started: it now counts as ended by the signal.
    EndedBeforeStart(Exit),
}

/// An exit status as containerd counts it.
pub fn exit_code(status: &ferry::ExitStatus) -> u32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u32,
        (None, Some(s)) => 128 + s as u32,
        (None, None) => 255,
    }
}

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl Process {
    /// A process not started yet.
    pub fn new(exec_id: &str, launch: Launch, stdio: Stdio) -> Arc<Process> {
        let stdin = StdinFifo::open(&stdio.stdin);
        let stdin_closed = stdin
            .as_ref()
            .map_or_else(|| Arc::new(AtomicBool::new(true)), StdinFifo::closer);
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            launch,
            stdio,
            state: Mutex::new(State {
                status: Status::Created,
                pid: 0,
                exit: None,
                input: None,
                stdin,
            }),
            ended: Condvar::new(),
            stdin_closed,
            gone: Arc::new(AtomicBool::new(false)),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where it is in its life.
    pub fn status(&self) -> Status {
        self.state().status
    }

    /// Its pid in the guest (0 before it started).
    pub fn pid(&self) -> u32 {
        self.state().pid
    }

    /// How it ended, once it has.
    pub fn exit(&self) -> Option<Exit> {
        self.state().exit.clone()
    }

    /// Starts it in `vm`; returns its guest pid. Its output goes to its
    /// stdio on a thread of its own, which calls `ending` with its exit
    /// status once it ended and all of its output was written, while the VM
    /// is still there to ask (no waiter has been woken yet), then `on_exit`
    /// once its end is recorded.
    pub fn start(
        self: &Arc<Self>,
        vm: &Vm,
        ending: impl FnOnce(u32) + Send + 'static,
        on_exit: impl FnOnce(&Process, &Exit) + Send + 'static,
    ) -> Result<u32> {
        if self.status() != Status::Created {
            return Err(ShimError::new(
                Kind::Precondition,
                "SHIM_PROCESS_STARTED",
                "the process was started already",
                "start a process once; exec a new one to run more",
            ));
        }
        let l = &self.launch;
        let opts = ExecOptions {
            env: l.env.clone(),
            cwd: l.cwd.clone(),
            user: l.user.clone(),
            stdin: self.state().stdin.is_some().then(Vec::new),
            timeout: None,
            tty: l.tty,
        };
        let mut child = vm.spawn(&l.args, &opts)?;
        let pid = child.pid();
        let input = child.input();
        let stdin = {
            let mut s = self.state();
            s.status = Status::Running;
            s.pid = pid;
            s.input = Some(input.clone());
            s.stdin.take()
        };
        if let Some(stdin) = stdin {
            stdin.pump(input, Arc::clone(&self.gone));
        }
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let mut out = Sink::open(&me.stdio.stdout);
            let mut err = Sink::open(&me.stdio.stderr);
            let code = loop {
                match child.next_event() {
                    Ok(ChildEvent::Stdout(b)) => out.write(&b),
                    Ok(ChildEvent::Stderr(b)) => err.write(&b),
                    Ok(ChildEvent::Exit(status)) => break exit_code(&status),
                    Err(e) => {
                        // The VM went away under the process: as if killed.
                        log::warn!("process {pid}: {e}");
                        break 128 + libc::SIGKILL as u32;
                    }
                }
            };
            // The readers see the end of the output before the exit.
            drop(out);
            drop(err);
            ending(code);
            let exit = me.finish(code);
            on_exit(&me, &exit);
        });
        Ok(pid)
    }

    /// Records its end and wakes its waiters.
    fn finish(&self, code: u32) -> Exit {
        let exit = Exit { code, at: now() };
        self.gone.store(true, Ordering::Relaxed);
        let mut s = self.state();
        s.status = Status::Stopped;
        s.exit = Some(exit.clone());
        s.input = None;
        self.ended.notify_all();
        exit
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: u32) -> Result<Signalled> {
        let input = {
            let s = self.state();
            match s.status {
                Status::Stopped => {
                    return Err(ShimError::new(
                        Kind::NotFound,
                        "SHIM_PROCESS_FINISHED",
                        "the process has already finished",
                        "nothing to signal; `ctr task ls` shows its state",
                    ))
                }
                Status::Created => None,
                Status::Running => s.input.clone(),
            }
        };
        match input {
            Some(input) => {
                input.signal(signal as i32).map_err(ferry::Error::from)?;
                Ok(Signalled::Sent)
            }
            None => Ok(Signalled::EndedBeforeStart(self.finish(128 + signal))),
        }
    }

    /// Waits for its end.
    pub fn wait(&self) -> Exit {
        let mut s = self.state();
        loop {
            if let Some(exit) = &s.exit {
                return exit.clone();
            }
            s = self.ended.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Closes its stdin once what the client wrote was passed on (the
    /// client closed its end, `CloseIO`); before the start too.
    pub fn close_stdin(&self) {
        self.stdin_closed.store(true, Ordering::Release);
    }

    /// Resizes its terminal; a size of zero (a client whose own terminal
    /// has none) leaves it as it is.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        if let Some(input) = self.state().input.clone() {
            input.resize(rows, cols).map_err(ferry::Error::from)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch() -> Launch {
        Launch {
            args: vec!["sleep".into(), "100".into()],
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
        }
    }

    #[test]
    fn a_process_killed_before_it_started_ends_with_the_signal() {
        let p = Process::new("", launch(), Stdio::default());
        assert_eq!(p.status(), Status::Created);
        let Signalled::EndedBeforeStart(exit) = p.signal(9).unwrap() else {
            panic!("not ended")
        };
        assert_eq!(exit.code, 137);
        assert_eq!(p.status(), Status::Stopped);
        assert_eq!(p.wait().code, 137);
        let again = p.signal(15).unwrap_err();
        assert_eq!(again.code, "SHIM_PROCESS_FINISHED");
        assert_eq!(again.kind, Kind::NotFound);
    }

    #[test]
    fn waiters_wake_when_the_process_ends() {
        let p = Process::new("sh1", launch(), Stdio::default());
        let waiter = {
            let p = Arc::clone(&p);
            std::thread::spawn(move || p.wait().code)
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        p.finish(3);
        assert_eq!(waiter.join().unwrap(), 3);
    }
}
