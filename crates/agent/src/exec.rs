//! Running one exec request over its connection.
//!
//! Threads per exec: the connection's own thread polls the process's output
//! and watches for exit and timeout; an input thread reads host frames
//! (stdin, stdin close, resize, signal) and notices the host going away.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::{
    read_frame, write_frame, ErrorCode, ExecRequest, ExitKind, ExitStatus, Message, ProtocolError,
    PtySize, Stream,
};
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::Signal;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

use crate::agent_log;
use crate::error::AgentError;
use crate::process::{build_command, spawn_error, ProcessSpec};
use crate::reaper::{GroupSignaller, Reaper};

/// How long to keep forwarding output after the process exited, for
/// descendants that still hold its stdout/stderr. Past this, the exec ends
/// even if a background process keeps the pipes open.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(250);

/// Poll interval while output is open, bounding how late an exit whose
/// pipes stay open (held by a descendant) is noticed.
const TICK: Duration = Duration::from_millis(20);

/// The pty byte sent for `StdinClose`: VEOF (Ctrl-D), as a terminal would.
const EOT: u8 = 0x04;

type SharedWriter = Arc<Mutex<Box<dyn Stream>>>;

fn send(w: &SharedWriter, msg: &Message) -> Result<(), ProtocolError> {
    let mut g = w.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *g, msg)
}

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

/// Output to forward: the fd and whether it is stderr.
struct OutSource {
    file: File,
    stderr: bool,
}

/// Runs an exec request to completion on `conn` (after the Hello).
pub fn run(conn: Box<dyn Stream>, req: ExecRequest, reaper: &Reaper, etc_dir: &Path) {
    let writer: SharedWriter = match conn.try_clone_stream() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            agent_log!("exec: cannot clone connection: {e}");
            return;
        }
    };
    let started = match start(&req, reaper, etc_dir) {
        Ok(s) => s,
        Err(e) => {
            let _ = send(&writer, &Message::error(e.code, e.message));
            return;
        }
    };
    let Started {
        watch,
        stdin,
        outputs,
        pty_master,
    } = started;
    let pid = watch.pid();
    if send(&writer, &Message::ExecStarted { pid: pid as u32 }).is_err() {
        watch.signaller().signal(Signal::SIGKILL);
        return;
    }

    let input_conn = match conn.try_clone_stream() {
        Ok(c) => c,
        Err(e) => {
            agent_log!("exec: cannot clone connection: {e}");
            watch.signaller().signal(Signal::SIGKILL);
            return;
        }
    };
    let signaller = watch.signaller();
    let input = std::thread::Builder::new()
        .name(format!("exec-in-{pid}"))
        .spawn(move || input_loop(input_conn, stdin, pty_master, signaller));
    let input = match input {
        Ok(h) => Some(h),
        Err(e) => {
            agent_log!("exec: cannot start input thread: {e}");
            watch.signaller().signal(Signal::SIGKILL);
            None
        }
    };

    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let status = output_loop(&writer, outputs, &watch, deadline);
    if let Some(status) = status {
        let _ = send(&writer, &Message::Exit(status));
    }
    // Unblocks the input thread's read.
    let _ = conn.shutdown_stream(Shutdown::Both);
    if let Some(h) = input {
        // It can still be stuck writing stdin into a pipe that a lingering
        // descendant holds but never reads; don't let that pin this thread.
        let start = Instant::now();
        while !h.is_finished() && start.elapsed() < INPUT_JOIN_WAIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            agent_log!("exec {pid}: stdin writer still blocked; detaching it");
        }
    }
}

/// How long to wait for the input thread after the exec ended.
const INPUT_JOIN_WAIT: Duration = Duration::from_secs(1);

struct Started {
    watch: crate::reaper::Watch,
    stdin: StdinSink,
    outputs: Vec<OutSource>,
    pty_master: Option<File>,
}

fn start(req: &ExecRequest, reaper: &Reaper, etc_dir: &Path) -> Result<Started, AgentError> {
    let spec = ProcessSpec {
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        user: req.user.clone(),
        tty: req.pty.is_some(),
    };
    let mut cmd = build_command(&spec, etc_dir)?;
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

/// Forwards output until the process has exited and its output is drained
/// (or the grace period ran out). Returns `None` when the host went away.
fn output_loop(
    writer: &SharedWriter,
    mut outputs: Vec<OutSource>,
    watch: &crate::reaper::Watch,
    deadline: Option<Instant>,
) -> Option<ExitStatus> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut exit: Option<(ExitKind, Instant)> = None;
    let mut timed_out = false;
    loop {
        if exit.is_none() {
            if let Some(kind) = watch.try_wait() {
                exit = Some((kind, Instant::now()));
            }
        }
        if let Some((kind, at)) = exit {
            if outputs.is_empty() || at.elapsed() >= OUTPUT_GRACE {
                return Some(ExitStatus { kind, timed_out });
            }
        }
        if !timed_out && exit.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            watch.signaller().signal(Signal::SIGKILL);
        }
        if outputs.is_empty() {
            // Only the exit is outstanding: block on it, waking for the
            // timeout.
            let wait = deadline
                .filter(|_| !timed_out)
                .map_or(Duration::from_secs(3600), |d| {
                    d.saturating_duration_since(Instant::now())
                });
            if let Some(kind) = watch.wait_timeout(wait) {
                exit = Some((kind, Instant::now()));
            }
            continue;
        }
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = outputs
                .iter()
                .map(|o| PollFd::new(o.file.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, TICK.as_millis() as u16) {
                Ok(_) => fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    agent_log!("exec: poll: {e}");
                    std::thread::sleep(TICK);
                    continue;
                }
            }
        };
        let mut closed = Vec::new();
        for (i, is_ready) in ready.into_iter().enumerate() {
            if !is_ready {
                continue;
            }
            let src = &mut outputs[i];
            match src.file.read(&mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let msg = if src.stderr {
                        Message::Stderr(data)
                    } else {
                        Message::Stdout(data)
                    };
                    if send(writer, &msg).is_err() {
                        // The host is gone; nobody wants the process.
                        watch.signaller().signal(Signal::SIGKILL);
                        return None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO is how a pty master reports that the slave side closed.
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            outputs.remove(i);
        }
    }
}

/// Reads host frames for a running exec until the connection ends.
fn input_loop(
    mut conn: Box<dyn Stream>,
    mut stdin: StdinSink,
    pty_master: Option<File>,
    group: GroupSignaller,
) {
    loop {
        let msg = match read_frame(&mut conn) {
            Ok(m) => m,
            // The frame's length was sound, so the stream is still in sync:
            // skip just this frame.
            Err(e @ (ProtocolError::Malformed(_) | ProtocolError::UnknownType(_))) => {
                agent_log!("exec: ignoring bad frame from host: {e}");
                continue;
            }
            Err(_) => {
                // Host closed the connection (or we did after exit): a no-op
                // if the process is already reaped.
                group.signal(Signal::SIGKILL);
                return;
            }
        };
        match msg {
            Message::Stdin(data) => {
                let res = match &mut stdin {
                    StdinSink::Pipe(f) | StdinSink::Pty(f) => f.write_all(&data),
                    StdinSink::None => Ok(()),
                };
                if res.is_err() {
                    // The process closed its stdin or exited; drop further input.
                    stdin = StdinSink::None;
                }
            }
            Message::StdinClose => {
                if let StdinSink::Pty(f) = &mut stdin {
                    let _ = f.write_all(&[EOT]);
                }
                stdin = StdinSink::None;
            }
            Message::Resize(size) => {
                if let Some(m) = &pty_master {
                    if let Err(e) = set_winsize(m, size) {
                        agent_log!("exec: resize: {e}");
                    }
                }
            }
            Message::Signal(n) => match Signal::try_from(n) {
                Ok(sig) => {
                    group.signal(sig);
                }
                Err(_) => agent_log!("exec: ignoring invalid signal {n}"),
            },
            other => agent_log!("exec: ignoring unexpected {} from host", other.name()),
        }
    }
}
