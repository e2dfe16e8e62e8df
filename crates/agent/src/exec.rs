//! Running one exec request over its connection.
//!
//! One thread does all of it, the connection's own: a poll loop over the
//! process's output, its exit (a pidfd), the host's frames (stdin, stdin
//! close, resize, signal) and, while host stdin is pending, the process's
//! stdin. Stdin is written without blocking, so a process that stops
//! reading it never stalls its output, its exit or the connection. When the
//! exec has ended the connection is ready for the next request.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry_protocol::{
    read_frame, write_frame, ErrorCode, ExecRequest, ExitKind, ExitStatus, Message, ProtocolError,
    PtySize, StagedFile, Stream, CHUNK_SIZE,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

use crate::agent_log;
use crate::error::AgentError;
use crate::process::{plan, spawn_error, Plan, ProcessSpec};
use crate::reaper::{Reaper, Watch};

/// How long to keep forwarding output after the process exited, for
/// descendants that still hold its stdout/stderr. Past this, the exec ends
/// even if a background process keeps the pipes open.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(250);

/// Poll interval when the kernel offers no pidfd to wait for the exit on.
const TICK: Duration = Duration::from_millis(20);

/// Host stdin buffered for the process before the agent stops reading the
/// connection (backpressure to the host).
const MAX_PENDING_STDIN: usize = 2 * CHUNK_SIZE;

/// How long the rest of a frame may take once its first bytes arrived.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// The pty byte sent for `StdinClose`: VEOF (Ctrl-D), as a terminal would.
const EOT: u8 = 0x04;

/// A pty pair: the agent keeps the master, the child gets the slave.
struct Pty {
    master: File,
    slave: File,
}

fn open_pty(size: PtySize) -> io::Result<Pty> {
    // CLOEXEC from the start: a concurrent fork must not inherit either side,
    // or the terminal would never hang up.
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(OsStr::from_bytes(name.to_bytes()))?;
    set_winsize(&master, size)?;
    Ok(Pty {
        master: File::from(master),
        slave,
    })
}

fn set_winsize(fd: impl AsFd, size: PtySize) -> io::Result<()> {
    rustix::termios::tcsetwinsize(
        fd,
        Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok(())
}

/// Where host stdin goes.
enum StdinSink {
    /// No stdin was requested (the child has /dev/null).
    None,
    /// The write end of the stdin pipe; dropped to signal EOF.
    Pipe(File),
    /// The pty master; EOF is the EOT character.
    Pty(File),
}

impl StdinSink {
    /// The descriptor stdin is written to, if any.
    fn file(&mut self) -> Option<&mut File> {
        match self {
            StdinSink::None => None,
            StdinSink::Pipe(f) | StdinSink::Pty(f) => Some(f),
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            StdinSink::None => None,
            StdinSink::Pipe(f) | StdinSink::Pty(f) => Some(f.as_fd()),
        }
    }
}

/// Output to forward: the fd and whether it is stderr.
struct OutSource {
    file: File,
    stderr: bool,
}

/// Runs an exec request to completion on `conn` (after the Hello). Returns
/// whether the connection is at a request boundary afterwards (the exec
/// ended with `Exit` or failed to start with an `Error`).
pub fn run(conn: &mut Box<dyn Stream>, req: ExecRequest, reaper: &Reaper, etc_dir: &Path) -> bool {
    run_steps(conn, vec![req], reaper, etc_dir)
}

/// Serves an `ExecBatch`: writes the files, then runs the steps while each
/// exits 0, answering as one exec does (see [`Message::ExecBatch`]).
/// Returns whether the connection is at a request boundary afterwards.
pub fn run_batch(
    conn: &mut Box<dyn Stream>,
    files: Vec<StagedFile>,
    mut steps: Vec<ExecRequest>,
    reaper: &Reaper,
    etc_dir: &Path,
) -> bool {
    for f in &files {
        if let Err(e) = crate::files::write_whole(&f.path, f.mode, &f.data) {
            return write_frame(conn, &Message::error(e.code, e.message)).is_ok();
        }
    }
    for req in &mut steps {
        // Nothing can feed or size a step: the host sends no stdin here.
        req.stdin = false;
        req.pty = None;
    }
    run_steps(conn, steps, reaper, etc_dir)
}

/// Runs `steps` one after another while each exits 0, answered as one exec:
/// `ExecStarted` (the first's pid), their output, and the `Exit` of the last
/// that ran; an `Error` in place of a step that cannot start. Returns
/// whether the connection is at a request boundary afterwards.
fn run_steps(
    conn: &mut Box<dyn Stream>,
    steps: Vec<ExecRequest>,
    reaper: &Reaper,
    etc_dir: &Path,
) -> bool {
    let last = steps.len().saturating_sub(1);
    for (i, req) in steps.into_iter().enumerate() {
        let started = match start(&req, reaper, etc_dir) {
            Ok(s) => s,
            Err(e) => return write_frame(conn, &Message::error(e.code, e.message)).is_ok(),
        };
        if i == 0 {
            let pid = started.watch.pid();
            if write_frame(conn, &Message::ExecStarted { pid: pid as u32 }).is_err() {
                started.watch.signaller().signal(Signal::SIGKILL);
                return false;
            }
        }
        let deadline = req
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        if conn.set_read_timeout_stream(Some(FRAME_TIMEOUT)).is_err() {
            started.watch.signaller().signal(Signal::SIGKILL);
            return false;
        }
        let Some(status) = Exec::new(started, deadline).run(conn) else {
            return false;
        };
        if i == last || !status.success() {
            return write_frame(conn, &Message::Exit(status)).is_ok()
                && conn.set_read_timeout_stream(None).is_ok();
        }
    }
    // An empty batch is refused when it is decoded.
    write_frame(
        conn,
        &Message::error(ErrorCode::Unexpected, "a batch without steps"),
    )
    .is_ok()
}

/// A running exec's state on the agent side.
struct Exec {
    watch: Watch,
    outputs: Vec<OutSource>,
    stdin: StdinSink,
    /// Host stdin not yet taken by the process.
    pending: VecDeque<u8>,
    /// The host closed stdin; close it once `pending` is written.
    close_stdin: bool,
    pty_master: Option<File>,
    deadline: Option<Instant>,
    timed_out: bool,
    exit: Option<(ExitKind, Instant)>,
    buf: Vec<u8>,
}

/// Indices of the descriptors polled in one round; `None` when not polled.
#[derive(Default)]
struct Slots {
    conn: Option<usize>,
    exit: Option<usize>,
    stdin: Option<usize>,
    outputs: usize,
}

impl Exec {
    fn new(started: Started, deadline: Option<Instant>) -> Exec {
        let Started {
            watch,
            stdin,
            outputs,
            pty_master,
        } = started;
        Exec {
            watch,
            outputs,
            stdin,
            pending: VecDeque::new(),
            close_stdin: false,
            pty_master,
            deadline,
            timed_out: false,
            exit: None,
            buf: vec![0u8; 64 * 1024],
        }
    }

    fn kill(&self) {
        self.watch.signaller().signal(Signal::SIGKILL);
    }

    /// Serves the exec until the process has exited and its output is
    /// drained (or the grace period ran out). Returns `None` when the host
    /// went away (the process group is then killed).
    fn run(mut self, conn: &mut Box<dyn Stream>) -> Option<ExitStatus> {
        loop {
            if self.exit.is_none() {
                if let Some(kind) = self.watch.try_wait() {
                    self.exit = Some((kind, Instant::now()));
                }
            }
            if let Some((kind, at)) = self.exit {
                if self.outputs.is_empty() || at.elapsed() >= OUTPUT_GRACE {
                    return Some(ExitStatus {
                        kind,
                        timed_out: self.timed_out,
                    });
                }
            }
            if !self.timed_out && self.exit.is_none() && self.deadline_passed() {
                self.timed_out = true;
                self.kill();
            }

            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(5);
            let mut slots = Slots::default();
            if self.pending.len() < MAX_PENDING_STDIN {
                slots.conn = Some(fds.len());
                fds.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
            }
            let exit_fd = self.watch.exit_fd().filter(|_| self.exit.is_none());
            if let Some(fd) = exit_fd {
                slots.exit = Some(fds.len());
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            if !self.pending.is_empty() {
                if let Some(fd) = self.stdin.fd() {
                    slots.stdin = Some(fds.len());
                    fds.push(PollFd::new(fd, PollFlags::POLLOUT));
                }
            }
            slots.outputs = fds.len();
            for o in &self.outputs {
                fds.push(PollFd::new(o.file.as_fd(), PollFlags::POLLIN));
            }
            let timeout = self.poll_timeout(exit_fd.is_some());
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    agent_log!("exec: poll: {e}");
                    std::thread::sleep(TICK);
                    continue;
                }
            }
            let ready = |i: Option<usize>| {
                i.and_then(|i| fds[i].revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let conn_ready = ready(slots.conn);
            let exit_ready = ready(slots.exit);
            let stdin_ready = ready(slots.stdin);
            let outputs_ready: Vec<bool> =
                (slots.outputs..fds.len()).map(|i| ready(Some(i))).collect();
            drop(fds);

            if outputs_ready.iter().any(|r| *r) && !self.forward_output(conn, &outputs_ready) {
                self.kill();
                return None;
            }
            if conn_ready && !self.host_frame(conn) {
                self.kill();
                return None;
            }
            if stdin_ready || (self.close_stdin && self.pending.is_empty()) {
                self.feed_stdin();
            }
            if exit_ready {
                // The reaper collects the status right after the exit.
                if let Some(kind) = self.watch.wait_timeout(TICK) {
                    self.exit = Some((kind, Instant::now()));
                }
            }
        }
    }

    fn deadline_passed(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// How long one poll round may wait: until the grace period ends after
    /// the exit, until the timeout, or (without a pidfd) one tick.
    fn poll_timeout(&self, exit_polled: bool) -> PollTimeout {
        let mut wait: Option<Duration> = None;
        let mut bound = |d: Duration| wait = Some(wait.map_or(d, |w| w.min(d)));
        if let Some((_, at)) = self.exit {
            bound(OUTPUT_GRACE.saturating_sub(at.elapsed()));
        } else if !exit_polled {
            bound(TICK);
        }
        if let (Some(d), false) = (self.deadline, self.timed_out) {
            bound(d.saturating_duration_since(Instant::now()));
        }
        match wait {
            None => PollTimeout::NONE,
            // Rounded up, so a wake-up is never early.
            Some(d) => PollTimeout::try_from(d.as_millis().saturating_add(1).min(60_000) as i32)
                .unwrap_or(PollTimeout::MAX),
        }
    }

    /// Reads what is ready on the outputs and sends it. Returns `false` when
    /// the host is gone.
    fn forward_output(&mut self, conn: &mut Box<dyn Stream>, ready: &[bool]) -> bool {
        let mut closed = Vec::new();
        for (i, is_ready) in ready.iter().enumerate() {
            if !is_ready {
                continue;
            }
            let src = &mut self.outputs[i];
            match src.file.read(&mut self.buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    let data = self.buf[..n].to_vec();
                    let msg = if src.stderr {
                        Message::Stderr(data)
                    } else {
                        Message::Stdout(data)
                    };
                    if write_frame(conn, &msg).is_err() {
                        return false;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) => {}
                // EIO is how a pty master reports that the slave side closed.
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            self.outputs.remove(i);
        }
        true
    }

    /// Handles one frame from the host. Returns `false` when the host is gone.
    fn host_frame(&mut self, conn: &mut Box<dyn Stream>) -> bool {
        let msg = match read_frame(conn) {
            Ok(m) => m,
            // The frame's length was sound, so the stream is still in sync:
            // skip just this frame.
            Err(e @ (ProtocolError::Malformed(_) | ProtocolError::UnknownType(_))) => {
                agent_log!("exec: ignoring bad frame from host: {e}");
                return true;
            }
            Err(_) => return false,
        };
        match msg {
            Message::Stdin(data) => {
                // After StdinClose, or once the process closed its stdin, or
                // without stdin, input is dropped.
                if !self.close_stdin && self.stdin.file().is_some() {
                    self.pending.extend(data);
                    self.feed_stdin();
                }
            }
            Message::StdinClose => {
                if !self.close_stdin {
                    if let StdinSink::Pty(_) = self.stdin {
                        self.pending.push_back(EOT);
                    }
                    self.close_stdin = true;
                    self.feed_stdin();
                }
            }
            Message::Resize(size) => {
                if let Some(m) = &self.pty_master {
                    if let Err(e) = set_winsize(m, size) {
                        agent_log!("exec: resize: {e}");
                    }
                }
            }
            Message::Signal(n) => match Signal::try_from(n) {
                Ok(sig) => {
                    self.watch.signaller().signal(sig);
                }
                Err(_) => agent_log!("exec: ignoring invalid signal {n}"),
            },
            other => agent_log!("exec: ignoring unexpected {} from host", other.name()),
        }
        true
    }

    /// Writes pending stdin as far as the process takes it without
    /// blocking, and closes stdin once the host closed it and all is written.
    fn feed_stdin(&mut self) {
        while !self.pending.is_empty() {
            let Some(f) = self.stdin.file() else {
                self.pending.clear();
                break;
            };
            let (chunk, _) = self.pending.as_slices();
            match f.write(chunk) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // The process closed its stdin or exited; drop further input.
                    self.stdin = StdinSink::None;
                    self.pending.clear();
                }
            }
        }
        if self.close_stdin {
            self.stdin = StdinSink::None;
        }
    }
}

struct Started {
    watch: Watch,
    stdin: StdinSink,
    outputs: Vec<OutSource>,
    pty_master: Option<File>,
}

fn start(req: &ExecRequest, reaper: &Reaper, etc_dir: &Path) -> Result<Started, AgentError> {
    let mut started = spawn(req, reaper, etc_dir)?;
    if let Some(f) = started.stdin.file() {
        if let Err(e) = set_nonblocking(f) {
            started.watch.signaller().signal(Signal::SIGKILL);
            return Err(AgentError::new(
                ErrorCode::Internal,
                format!("stdin O_NONBLOCK: {e}"),
            ));
        }
    }
    Ok(started)
}

/// Makes writes to `f` fail with `WouldBlock` instead of blocking. On a
/// pty master this applies to every dup of it, so readers must expect
/// `WouldBlock` too.
fn set_nonblocking(f: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_retain(fcntl(f, FcntlArg::F_GETFL)?);
    fcntl(f, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn spawn(req: &ExecRequest, reaper: &Reaper, etc_dir: &Path) -> Result<Started, AgentError> {
    let spec = ProcessSpec {
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        user: req.user.clone(),
        tty: req.pty.is_some(),
    };
    let plan = plan(&spec, etc_dir)?;
    if plan.direct() {
        if let Some(started) = spawn_direct(&plan, req, reaper)? {
            return Ok(started);
        }
    }
    let mut cmd = plan.command()?;
    let internal =
        |what: &str, e: io::Error| AgentError::new(ErrorCode::Internal, format!("{what}: {e}"));
    let arg0 = &req.argv[0];
    match req.pty {
        Some(size) => {
            let pty = open_pty(size).map_err(|e| internal("openpty", e))?;
            let dup = |f: &File| f.try_clone().map_err(|e| internal("dup", e));
            cmd.stdin(Stdio::from(dup(&pty.slave)?))
                .stdout(Stdio::from(dup(&pty.slave)?))
                .stderr(Stdio::from(pty.slave));
            let spawned = reaper.spawn(&mut cmd);
            // The Command still holds slave fds; the master only sees hangup
            // once every slave fd outside the child is closed.
            drop(cmd);
            let (_child, watch) = spawned.map_err(|e| spawn_error(arg0, &e))?;
            let reader = dup(&pty.master)?;
            let stdin = if req.stdin {
                StdinSink::Pty(dup(&pty.master)?)
            } else {
                StdinSink::None
            };
            Ok(Started {
                watch,
                stdin,
                outputs: vec![OutSource {
                    file: reader,
                    stderr: false,
                }],
                pty_master: Some(pty.master),
            })
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            let spawned = reaper.spawn(&mut cmd);
            drop(cmd);
            let (mut child, watch) = spawned.map_err(|e| spawn_error(arg0, &e))?;
            let to_file = |fd: OwnedFd| File::from(fd);
            let stdin = match child.stdin.take() {
                Some(s) => StdinSink::Pipe(to_file(s.into())),
                None => StdinSink::None,
            };
            let mut outputs = Vec::new();
            if let Some(s) = child.stdout.take() {
                outputs.push(OutSource {
                    file: to_file(s.into()),
                    stderr: false,
                });
            }
            if let Some(s) = child.stderr.take() {
                outputs.push(OutSource {
                    file: to_file(s.into()),
                    stderr: true,
                });
            }
            Ok(Started {
                watch,
                stdin,
                outputs,
                pty_master: None,
            })
        }
    }
}

/// Starts a pipe-mode exec with `posix_spawn` (no fork of the agent).
/// `None`: the program is a script without `#!`, which only the `Command`
/// path runs (through `/bin/sh`, as `execvp` does).
fn spawn_direct(
    plan: &Plan,
    req: &ExecRequest,
    reaper: &Reaper,
) -> Result<Option<Started>, AgentError> {
    let internal =
        |what: &str, e: io::Error| AgentError::new(ErrorCode::Internal, format!("{what}: {e}"));
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal("pipe", e.into()));
    let (child_stdin, stdin): (OwnedFd, StdinSink) = if req.stdin {
        let (r, w) = pipe()?;
        (r, StdinSink::Pipe(File::from(w)))
    } else {
        let null = File::open("/dev/null").map_err(|e| internal("/dev/null", e))?;
        (null.into(), StdinSink::None)
    };
    let (stdout, child_stdout) = pipe()?;
    let (stderr, child_stderr) = pipe()?;
    let spawned = reaper.spawn_with(|| {
        plan.spawn_direct([
            child_stdin.as_fd(),
            child_stdout.as_fd(),
            child_stderr.as_fd(),
        ])
    });
    // The child's ends stay open only in the child, so its exit is seen as
    // end of file.
    drop((child_stdin, child_stdout, child_stderr));
    let watch = match spawned {
        Ok(w) => w,
        Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => return Ok(None),
        Err(e) => return Err(spawn_error(&req.argv[0], &e)),
    };
    Ok(Some(Started {
        watch,
        stdin,
        outputs: vec![
            OutSource {
                file: File::from(stdout),
                stderr: false,
            },
            OutSource {
                file: File::from(stderr),
                stderr: true,
            },
        ],
        pty_master: None,
    }))
}
