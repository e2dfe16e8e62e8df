//! Child reaping for a process that is PID 1 (or a child subreaper).
//!
//! PID 1 must reap every zombie, including orphans re-parented to it, so
//! one thread waits for *any* child. Threads that started a process must
//! still learn its status, so the reaper dispatches statuses by pid to the
//! [`Watch`] returned from [`Reaper::spawn`].
//!
//! Races are closed with one lock: spawning (fork + registration) and
//! reaping (`waitpid` + dispatch) both happen under it. So a status can
//! never arrive for a pid that is not registered yet, std's own reaping of
//! a child whose `exec` failed is never pre-empted, and a pid is only
//! signalled while it is registered, i.e. before it was reaped and could be
//! reused. The reaper blocks outside the lock with `waitid(WNOWAIT)`, which
//! waits for a zombie without reaping it.
//!
//! Because it reaps any child, a process using a `Reaper` must start all
//! its children through it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ferry_protocol::ExitKind;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::agent_log;

struct Inner {
    table: Mutex<HashMap<i32, Sender<ExitKind>>>,
    wake: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Sender<ExitKind>>> {
        // A panic elsewhere while holding the lock must not stop reaping.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The process-wide child reaper. Cloning shares the same reaper.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<Inner>,
}

impl Reaper {
    /// Starts the reaper thread. Call once per process.
    pub fn start() -> io::Result<Reaper> {
        let inner = Arc::new(Inner {
            table: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
        });
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reap_loop(&thread_inner))?;
        Ok(Reaper { inner })
    }

    /// Spawns `cmd` and registers it; the returned [`Watch`] receives its
    /// exit status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Watch)> {
        let mut child = None;
        let watch = self.spawn_with(|| {
            let c = cmd.spawn()?;
            let pid = c.id() as i32;
            child = Some(c);
            Ok(pid)
        })?;
        Ok((child.expect("set when the spawn succeeded"), watch))
    }

    /// Runs `start`, which starts one child and returns its pid, and
    /// registers that child. `start` runs under the reaper's lock, so it
    /// must not wait for anything but the child's exec.
    pub fn spawn_with(&self, start: impl FnOnce() -> io::Result<i32>) -> io::Result<Watch> {
        let mut table = self.inner.lock();
        let pid = start()?;
        // Opened under the lock: the child cannot have been reaped yet, so
        // the pid still names it. Without a pidfd (old kernel) watchers poll.
        let exit_fd = rustix::process::Pid::from_raw(pid).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        let (tx, rx) = mpsc::channel();
        table.insert(pid, tx);
        drop(table);
        self.inner.wake.notify_all();
        Ok(Watch {
            rx,
            exit_fd,
            group: GroupSignaller {
                pid,
                inner: self.inner.clone(),
            },
        })
    }

    /// Whether any child (registered or orphan) still exists.
    pub fn has_children(&self) -> bool {
        // WNOWAIT|WNOHANG only looks; ECHILD means there is no child at all.
        !matches!(
            waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG
            ),
            Err(Errno::ECHILD)
        )
    }
}

fn reap_loop(inner: &Inner) {
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => reap_ready(inner),
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                // No children: sleep until a spawn, but wake periodically
                // for orphans that get re-parented to us.
                let table = inner.lock();
                // A child spawned since waitid answered must not wait for
                // the next periodic wake-up.
                if table.is_empty() {
                    let _ = inner.wake.wait_timeout(table, Duration::from_millis(100));
                }
            }
            Err(e) => {
                agent_log!("reaper: waitid: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn reap_ready(inner: &Inner) {
    let mut table = inner.lock();
    loop {
        let (pid, kind) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, ExitKind::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitKind::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                agent_log!("reaper: waitpid: {e}");
                return;
            }
        };
        if let Some(tx) = table.remove(&pid.as_raw()) {
            // The watcher may be gone (its connection dropped); fine.
            let _ = tx.send(kind);
        }
    }
}

/// Sends signals to a registered child's process group.
#[derive(Clone)]
pub struct GroupSignaller {
    pid: i32,
    inner: Arc<Inner>,
}

impl GroupSignaller {
    /// Signals the process group led by the child (its pgid is its pid, as
    /// every child calls `setsid`). Does nothing once the child was reaped,
    /// so a reused pid is never hit. Returns whether a signal was sent.
    pub fn signal(&self, sig: Signal) -> bool {
        let table = self.inner.lock();
        if !table.contains_key(&self.pid) {
            return false;
        }
        killpg(Pid::from_raw(self.pid), sig).is_ok()
    }
}

/// Receives the exit status of one spawned child.
pub struct Watch {
    rx: Receiver<ExitKind>,
    /// A pidfd of the child: readable once it has exited.
    exit_fd: Option<OwnedFd>,
    group: GroupSignaller,
}

impl Watch {
    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.group.pid
    }

    /// A handle to signal the child's process group.
    pub fn signaller(&self) -> GroupSignaller {
        self.group.clone()
    }

    /// A descriptor that polls readable once the child has exited (its
    /// status is then available shortly, when the reaper has reaped it).
    /// `None` when the kernel has no pidfds.
    pub fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.exit_fd.as_ref().map(|f| f.as_fd())
    }

    /// The status, if the child has been reaped.
    pub fn try_wait(&self) -> Option<ExitKind> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for the status.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitKind> {
        match self.rx.recv_timeout(timeout) {
            Ok(k) => Some(k),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                // Unreachable while the reaper thread lives; avoid spinning.
                std::thread::sleep(timeout);
                None
            }
        }
    }

    /// Waits for the status.
    pub fn wait(&self) -> ExitKind {
        loop {
            if let Some(k) = self.wait_timeout(Duration::from_secs(3600)) {
                return k;
            }
        }
    }
}
