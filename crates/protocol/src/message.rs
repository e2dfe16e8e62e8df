//! The messages of the protocol and their binary encoding.

use crate::codec::{Decoder, Encoder};
use crate::config::MainCommand;
use crate::error::{ErrorCode, ProtocolError};

/// Terminal size for pty-mode execs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtySize {
    /// Rows (lines).
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl Default for PtySize {
    fn default() -> Self {
        PtySize { rows: 24, cols: 80 }
    }
}

/// A file an [`Message::ExecBatch`] writes before its steps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StagedFile {
    /// Absolute guest path; missing parents are made (mode 0755).
    pub path: String,
    /// Its mode.
    pub mode: u32,
    /// Its contents.
    pub data: Vec<u8>,
}

/// Most files and steps in one [`Message::ExecBatch`].
pub const MAX_BATCH_FILES: usize = 64;
/// See [`MAX_BATCH_FILES`].
pub const MAX_BATCH_STEPS: usize = 8;

/// A request to run a process in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up on the `PATH` of `env`
    /// (or the default `PATH`) when it contains no `/`.
    pub argv: Vec<String>,
    /// Environment variables added to (and overriding) the agent's defaults
    /// (`PATH`, `HOME`, `USER`, `LOGNAME`, and `TERM` in pty mode).
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when unset.
    pub cwd: Option<String>,
    /// `name`, `uid`, `name:group` or `uid:gid`; the agent's own identity
    /// (root) when unset. Names are resolved from the guest's `/etc/passwd`
    /// and `/etc/group`.
    pub user: Option<String>,
    /// Whether the host will stream stdin. When false the process gets
    /// `/dev/null` as stdin.
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size instead of pipes. stdout and
    /// stderr are then one stream, delivered as stdout.
    pub pty: Option<PtySize>,
    /// Kill the whole process group after this long (milliseconds).
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    /// A request running `argv` with no stdin, pipes, and no timeout.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Sets the user (`name`, `uid`, `name:group`, `uid:gid`).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Declares that stdin will be streamed.
    pub fn with_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// Runs on a pty of the given size.
    pub fn pty(mut self, rows: u16, cols: u16) -> Self {
        self.pty = Some(PtySize { rows, cols });
        self
    }

    /// Sets a timeout after which the process group is killed.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

/// How an exec'd process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Exited normally with this code.
    Code(i32),
    /// Was killed by this signal.
    Signal(i32),
}

/// Final status of an exec'd process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code or signal.
    pub kind: ExitKind,
    /// Whether the agent killed it because its timeout expired.
    pub timed_out: bool,
}

impl ExitStatus {
    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        match self.kind {
            ExitKind::Code(c) => Some(c),
            ExitKind::Signal(_) => None,
        }
    }

    /// The terminating signal, if it was killed.
    pub fn signal(&self) -> Option<i32> {
        match self.kind {
            ExitKind::Signal(s) => Some(s),
            ExitKind::Code(_) => None,
        }
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.kind == ExitKind::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ExitKind::Code(c) => write!(f, "exit code {c}")?,
            ExitKind::Signal(s) => write!(f, "killed by signal {s}")?,
        }
        if self.timed_out {
            f.write_str(" (timed out)")?;
        }
        Ok(())
    }
}

/// What a power request asks the guest to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PowerAction {
    /// `reboot(RB_POWER_OFF)`.
    #[default]
    Poweroff,
    /// `reboot(RB_AUTOBOOT)`; on a microVM this usually ends the VM too.
    Reboot,
}

/// One protocol message. Each is carried in exactly one frame.
///
/// Conversation shape (after the Hello, requests follow one another on a
/// connection, see the crate docs):
///
/// ```text
/// host                                agent
/// Hello{version, token}        ->
///                              <-     HelloOk{version, agent} | Error
/// Exec(req)                    ->
///                              <-     ExecStarted{pid} | Error
/// Stdin*, StdinClose, Resize*, Signal*  ->
///                              <-     Stdout*, Stderr*, Exit
/// ExecBatch{files, steps}      ->
///                              <-     ExecStarted{pid}, Stdout*, Stderr*, Exit | Error
/// WriteFile{..}                ->
///                              <-     Ok (temp file created) | Error
/// FileData*, FileEnd           ->
///                              <-     FileWritten{size} | Error
/// ReadFile{path}               ->
///                              <-     FileInfo{..}, FileData*, FileEnd | Error
/// Stat{path}                   ->
///                              <-     FileInfo{..} (mode with its type) | Error
/// Ping{n}                      ->     <- Pong{n}
/// Sync | SetClock | AddEntropy | SetHostname | Power  -> <- Ok | Error
/// StartMain(cmd)               ->     <- Ok (running) | Error
/// SignalMain(sig)              ->     <- Ok (sent) | Error
/// Forward{port}                ->
///                              <-     Ok | Error
/// raw bytes, both ways, until each side shuts down its direction
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame from the host. Its type byte and the leading `version`
    /// field are frozen across protocol versions so a mismatch is always
    /// detected and reported.
    Hello {
        /// The host's protocol version.
        version: u32,
        /// The per-VM token, hex.
        token: String,
    },
    /// The agent accepted the Hello.
    HelloOk {
        /// The agent's protocol version (equal to the host's).
        version: u32,
        /// The agent's build version, for diagnostics.
        agent: String,
    },
    /// The operation failed. Ends that operation only; the agent closes the
    /// connection after it only when the Hello failed or the stream can no
    /// longer be parsed.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Generic success reply to Sync, SetClock, AddEntropy, SetHostname,
    /// Power and StartMain, and the go-ahead for the data of a WriteFile.
    Ok,
    /// Liveness probe.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Reply to Ping.
    Pong {
        /// The Ping's nonce.
        nonce: u64,
    },
    /// Start a process.
    Exec(ExecRequest),
    /// The process was started.
    ExecStarted {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// Close the process's stdin (in pty mode: send the EOF character).
    StdinClose,
    /// Bytes the process wrote to stdout (or to the pty).
    Stdout(Vec<u8>),
    /// Bytes the process wrote to stderr.
    Stderr(Vec<u8>),
    /// Resize the pty.
    Resize(PtySize),
    /// Send a signal to the process group.
    Signal(i32),
    /// The process ended; last frame of an exec.
    Exit(ExitStatus),
    /// Begin an atomic file write.
    WriteFile {
        /// Absolute guest path.
        path: String,
        /// Permission bits (e.g. 0o644).
        mode: u32,
        /// Create missing parent directories (mode 0755).
        create_parents: bool,
    },
    /// A chunk of file contents (either direction).
    FileData(Vec<u8>),
    /// End of file contents (either direction).
    FileEnd,
    /// The file was written, synced and renamed into place.
    FileWritten {
        /// Bytes written.
        size: u64,
    },
    /// Read a file.
    ReadFile {
        /// Absolute guest path.
        path: String,
    },
    /// Write `files` (each atomically, as `WriteFile` does), then run
    /// `steps` one after another while each exits 0, without stdin or a
    /// pty: a sandbox's "stage, run, and run this next if it worked" in one
    /// round trip. Answered as an `Exec` is: `ExecStarted` (the first
    /// step's pid), the output of every step that ran, and the `Exit` of the
    /// last one that ran. A file that cannot be written, or a step that
    /// cannot start, is answered with an `Error` in place of what would
    /// have come next.
    ExecBatch {
        /// Written first, in order.
        files: Vec<StagedFile>,
        /// At least one.
        steps: Vec<ExecRequest>,
    },
    /// Describe a path (not following a final symlink), answered with a
    /// `FileInfo` whose mode includes the file type bits. Lets the host
    /// tell files from directories without any tool in the guest.
    Stat {
        /// Absolute guest path.
        path: String,
    },
    /// Metadata preceding the data of a read file.
    FileInfo {
        /// Size in bytes at open time.
        size: u64,
        /// Permission bits.
        mode: u32,
    },
    /// Flush all filesystems (`sync()`).
    Sync,
    /// Set the guest's wall clock (`CLOCK_REALTIME`).
    SetClock {
        /// Nanoseconds since the Unix epoch.
        realtime_ns: u64,
    },
    /// Mix these bytes into the kernel RNG and credit them as entropy.
    AddEntropy(Vec<u8>),
    /// Set the kernel hostname and write it to `/etc/hostname`.
    SetHostname(String),
    /// Power off or reboot the guest. The agent replies Ok first.
    Power(PowerAction),
    /// Start the VM's main process now, as if it had been the `command` of
    /// the agent config at boot: its output goes to the console, and the VM
    /// powers off when it exits. For VMs restored from a snapshot taken
    /// before any main process was chosen. `Ok` once it runs; an `Error`
    /// with `MAIN_ALREADY_RUNNING` if the VM already has one, or an `EXEC_*`
    /// code if it cannot start (the VM then keeps running without one).
    StartMain(MainCommand),
    /// Send a signal to the VM's main process (its process group). `Ok`
    /// once sent; an `Error` with `WORKLOAD_NOT_RUNNING` when the VM has
    /// none (never had one, or it ended).
    SignalMain(i32),
    /// Connect to TCP `127.0.0.1:port` inside the guest. The agent answers
    /// `Ok` once connected (or an `Error` with `FORWARD_REFUSED` /
    /// `FORWARD_FAILED`); after `Ok` the connection stops carrying frames
    /// and carries the TCP stream's bytes in both directions. Each side
    /// shuts down its write direction when its source reaches end of file,
    /// so half-closed TCP conversations work.
    Forward {
        /// Guest TCP port on the loopback address.
        port: u16,
    },
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_OK: u8 = 0x02;
    pub const ERROR: u8 = 0x03;
    pub const OK: u8 = 0x04;
    pub const PING: u8 = 0x05;
    pub const PONG: u8 = 0x06;
    pub const EXEC: u8 = 0x10;
    pub const EXEC_STARTED: u8 = 0x11;
    pub const STDIN: u8 = 0x12;
    pub const STDIN_CLOSE: u8 = 0x13;
    pub const STDOUT: u8 = 0x14;
    pub const STDERR: u8 = 0x15;
    pub const RESIZE: u8 = 0x16;
    pub const SIGNAL: u8 = 0x17;
    pub const EXIT: u8 = 0x18;
    pub const START_MAIN: u8 = 0x19;
    pub const SIGNAL_MAIN: u8 = 0x1a;
    pub const EXEC_BATCH: u8 = 0x1b;
    pub const WRITE_FILE: u8 = 0x20;
    pub const FILE_DATA: u8 = 0x21;
    pub const FILE_END: u8 = 0x22;
    pub const FILE_WRITTEN: u8 = 0x23;
    pub const READ_FILE: u8 = 0x24;
    pub const FILE_INFO: u8 = 0x25;
    pub const STAT: u8 = 0x26;
    pub const SYNC: u8 = 0x30;
    pub const SET_CLOCK: u8 = 0x31;
    pub const ADD_ENTROPY: u8 = 0x32;
    pub const POWER: u8 = 0x33;
    pub const SET_HOSTNAME: u8 = 0x34;
    pub const FORWARD: u8 = 0x40;
}

impl Message {
    /// A short name for logs and "unexpected message" errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloOk { .. } => "HelloOk",
            Message::Error { .. } => "Error",
            Message::Ok => "Ok",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Exec(_) => "Exec",
            Message::ExecBatch { .. } => "ExecBatch",
            Message::ExecStarted { .. } => "ExecStarted",
            Message::Stdin(_) => "Stdin",
            Message::StdinClose => "StdinClose",
            Message::Stdout(_) => "Stdout",
            Message::Stderr(_) => "Stderr",
            Message::Resize(_) => "Resize",
            Message::Signal(_) => "Signal",
            Message::Exit(_) => "Exit",
            Message::WriteFile { .. } => "WriteFile",
            Message::FileData(_) => "FileData",
            Message::FileEnd => "FileEnd",
            Message::FileWritten { .. } => "FileWritten",
            Message::ReadFile { .. } => "ReadFile",
            Message::FileInfo { .. } => "FileInfo",
            Message::Stat { .. } => "Stat",
            Message::Sync => "Sync",
            Message::SetClock { .. } => "SetClock",
            Message::AddEntropy(_) => "AddEntropy",
            Message::SetHostname(_) => "SetHostname",
            Message::Power(_) => "Power",
            Message::StartMain(_) => "StartMain",
            Message::SignalMain(_) => "SignalMain",
            Message::Forward { .. } => "Forward",
        }
    }

    /// Builds an Error message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Message::Error {
            code,
            message: message.into(),
        }
    }

    /// The frame type byte and the encoded payload.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut e = Encoder::new();
        let t = match self {
            Message::Hello { version, token } => {
                e.u32(*version).str(token);
                ty::HELLO
            }
            Message::HelloOk { version, agent } => {
                e.u32(*version).str(agent);
                ty::HELLO_OK
            }
            Message::Error { code, message } => {
                e.u16(code.as_u16()).str(message);
                ty::ERROR
            }
            Message::Ok => ty::OK,
            Message::Ping { nonce } => {
                e.u64(*nonce);
                ty::PING
            }
            Message::Pong { nonce } => {
                e.u64(*nonce);
                ty::PONG
            }
            Message::Exec(r) => {
                encode_exec(&mut e, r);
                ty::EXEC
            }
            Message::ExecBatch { files, steps } => {
                e.u32(files.len() as u32);
                for f in files {
                    e.str(&f.path).u32(f.mode).bytes(&f.data);
                }
                e.u32(steps.len() as u32);
                for r in steps {
                    encode_exec(&mut e, r);
                }
                ty::EXEC_BATCH
            }
            Message::ExecStarted { pid } => {
                e.u32(*pid);
                ty::EXEC_STARTED
            }
            Message::Stdin(b) => {
                e.bytes(b);
                ty::STDIN
            }
            Message::StdinClose => ty::STDIN_CLOSE,
            Message::Stdout(b) => {
                e.bytes(b);
                ty::STDOUT
            }
            Message::Stderr(b) => {
                e.bytes(b);
                ty::STDERR
            }
            Message::Resize(p) => {
                e.u16(p.rows).u16(p.cols);
                ty::RESIZE
            }
            Message::Signal(s) => {
                e.i32(*s);
                ty::SIGNAL
            }
            Message::Exit(s) => {
                match s.kind {
                    ExitKind::Code(c) => e.u8(0).i32(c),
                    ExitKind::Signal(sig) => e.u8(1).i32(sig),
                };
                e.bool(s.timed_out);
                ty::EXIT
            }
            Message::WriteFile {
                path,
                mode,
                create_parents,
            } => {
                e.str(path).u32(*mode).bool(*create_parents);
                ty::WRITE_FILE
            }
            Message::FileData(b) => {
                e.bytes(b);
                ty::FILE_DATA
            }
            Message::FileEnd => ty::FILE_END,
            Message::FileWritten { size } => {
                e.u64(*size);
                ty::FILE_WRITTEN
            }
            Message::ReadFile { path } => {
                e.str(path);
                ty::READ_FILE
            }
            Message::FileInfo { size, mode } => {
                e.u64(*size).u32(*mode);
                ty::FILE_INFO
            }
            Message::Stat { path } => {
                e.str(path);
                ty::STAT
            }
            Message::Sync => ty::SYNC,
            Message::SetClock { realtime_ns } => {
                e.u64(*realtime_ns);
                ty::SET_CLOCK
            }
            Message::AddEntropy(b) => {
                e.bytes(b);
                ty::ADD_ENTROPY
            }
            Message::SetHostname(name) => {
                e.str(name);
                ty::SET_HOSTNAME
            }
            Message::Power(a) => {
                e.u8(match a {
                    PowerAction::Poweroff => 0,
                    PowerAction::Reboot => 1,
                });
                ty::POWER
            }
            Message::Forward { port } => {
                e.u16(*port);
                ty::FORWARD
            }
            // Laid out like an Exec's argv, env, cwd and user.
            Message::StartMain(c) => {
                e.strs(&c.argv);
                encode_env(&mut e, c.env.iter());
                e.opt_str(c.workdir.as_deref()).opt_str(c.user.as_deref());
                ty::START_MAIN
            }
            Message::SignalMain(s) => {
                e.i32(*s);
                ty::SIGNAL_MAIN
            }
        };
        (t, e.finish())
    }

    /// Decodes a frame's type byte and payload.
    pub fn decode(t: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut d = Decoder::new(payload);
        let msg = match t {
            ty::HELLO => Message::Hello {
                version: d.u32()?,
                token: d.str()?,
            },
            ty::HELLO_OK => Message::HelloOk {
                version: d.u32()?,
                agent: d.str()?,
            },
            ty::ERROR => Message::Error {
                code: ErrorCode::from_u16(d.u16()?),
                message: d.str()?,
            },
            ty::OK => Message::Ok,
            ty::PING => Message::Ping { nonce: d.u64()? },
            ty::PONG => Message::Pong { nonce: d.u64()? },
            ty::EXEC => Message::Exec(decode_exec(&mut d, payload.len())?),
            ty::EXEC_BATCH => {
                let n = d.u32()? as usize;
                if n > MAX_BATCH_FILES {
                    return Err(ProtocolError::Malformed(format!("a batch of {n} files")));
                }
                let mut files = Vec::with_capacity(n);
                for _ in 0..n {
                    files.push(StagedFile {
                        path: d.str()?,
                        mode: d.u32()?,
                        data: d.bytes()?,
                    });
                }
                let n = d.u32()? as usize;
                if n == 0 || n > MAX_BATCH_STEPS {
                    return Err(ProtocolError::Malformed(format!("a batch of {n} steps")));
                }
                let mut steps = Vec::with_capacity(n);
                for _ in 0..n {
                    steps.push(decode_exec(&mut d, payload.len())?);
                }
                Message::ExecBatch { files, steps }
            }
            ty::EXEC_STARTED => Message::ExecStarted { pid: d.u32()? },
            ty::STDIN => Message::Stdin(d.bytes()?),
            ty::STDIN_CLOSE => Message::StdinClose,
            ty::STDOUT => Message::Stdout(d.bytes()?),
            ty::STDERR => Message::Stderr(d.bytes()?),
            ty::RESIZE => Message::Resize(PtySize {
                rows: d.u16()?,
                cols: d.u16()?,
            }),
            ty::SIGNAL => Message::Signal(d.i32()?),
            ty::SIGNAL_MAIN => Message::SignalMain(d.i32()?),
            ty::EXIT => {
                let kind = match d.u8()? {
                    0 => ExitKind::Code(d.i32()?),
                    1 => ExitKind::Signal(d.i32()?),
                    k => return Err(ProtocolError::Malformed(format!("bad exit kind {k}"))),
                };
                Message::Exit(ExitStatus {
                    kind,
                    timed_out: d.bool()?,
                })
            }
            ty::WRITE_FILE => Message::WriteFile {
                path: d.str()?,
                mode: d.u32()?,
                create_parents: d.bool()?,
            },
            ty::FILE_DATA => Message::FileData(d.bytes()?),
            ty::FILE_END => Message::FileEnd,
            ty::FILE_WRITTEN => Message::FileWritten { size: d.u64()? },
            ty::READ_FILE => Message::ReadFile { path: d.str()? },
            ty::STAT => Message::Stat { path: d.str()? },
            ty::FILE_INFO => Message::FileInfo {
                size: d.u64()?,
                mode: d.u32()?,
            },
            ty::SYNC => Message::Sync,
            ty::SET_CLOCK => Message::SetClock {
                realtime_ns: d.u64()?,
            },
            ty::ADD_ENTROPY => Message::AddEntropy(d.bytes()?),
            ty::SET_HOSTNAME => Message::SetHostname(d.str()?),
            ty::POWER => Message::Power(match d.u8()? {
                0 => PowerAction::Poweroff,
                1 => PowerAction::Reboot,
                a => return Err(ProtocolError::Malformed(format!("bad power action {a}"))),
            }),
            ty::FORWARD => Message::Forward { port: d.u16()? },
            ty::START_MAIN => {
                let argv = d.strs()?;
                let env = decode_env(&mut d, payload.len())?.into_iter().collect();
                Message::StartMain(MainCommand {
                    argv,
                    env,
                    workdir: d.opt_str()?,
                    user: d.opt_str()?,
                })
            }
            other => return Err(ProtocolError::UnknownType(other)),
        };
        d.finish()?;
        Ok(msg)
    }
}

/// An `ExecRequest`'s fields, as `Exec` and `ExecBatch` carry them.
fn encode_exec(e: &mut Encoder, r: &ExecRequest) {
    e.strs(&r.argv);
    encode_env(e, r.env.iter().map(|(k, v)| (k, v)));
    e.opt_str(r.cwd.as_deref())
        .opt_str(r.user.as_deref())
        .bool(r.stdin);
    match r.pty {
        Some(p) => e.u8(1).u16(p.rows).u16(p.cols),
        None => e.u8(0),
    };
    e.opt_u64(r.timeout_ms);
}

/// The inverse of [`encode_exec`].
fn decode_exec(d: &mut Decoder, payload_len: usize) -> Result<ExecRequest, ProtocolError> {
    let argv = d.strs()?;
    let env = decode_env(d, payload_len)?;
    let cwd = d.opt_str()?;
    let user = d.opt_str()?;
    let stdin = d.bool()?;
    let pty = if d.bool()? {
        Some(PtySize {
            rows: d.u16()?,
            cols: d.u16()?,
        })
    } else {
        None
    };
    let timeout_ms = d.opt_u64()?;
    Ok(ExecRequest {
        argv,
        env,
        cwd,
        user,
        stdin,
        pty,
        timeout_ms,
    })
}

/// Appends environment variables: a count, then name and value of each.
fn encode_env<'a>(e: &mut Encoder, vars: impl ExactSizeIterator<Item = (&'a String, &'a String)>) {
    e.u32(vars.len() as u32);
    for (k, v) in vars {
        e.str(k).str(v);
    }
}

/// Reads what [`encode_env`] wrote.
fn decode_env(
    d: &mut Decoder<'_>,
    payload_len: usize,
) -> Result<Vec<(String, String)>, ProtocolError> {
    let n = d.u32()? as usize;
    // Each variable takes at least 8 bytes, which bounds the reservation.
    let mut env = Vec::with_capacity(n.min(payload_len / 8));
    for _ in 0..n {
        env.push((d.str()?, d.str()?));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    pub(crate) fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                version: 1,
                token: "ab".repeat(32),
            },
            Message::HelloOk {
                version: 1,
                agent: "0.1.0".into(),
            },
            Message::error(ErrorCode::ExecNotFound, "no such program: foo"),
            Message::error(ErrorCode::Unknown(777), ""),
            Message::Ok,
            Message::Ping { nonce: 42 },
            Message::Pong { nonce: u64::MAX },
            Message::Exec(ExecRequest::new(["sh", "-c", "echo hi"])),
            Message::ExecBatch {
                files: vec![StagedFile {
                    path: "/work/main.py".into(),
                    mode: 0o755,
                    data: b"print(1)".to_vec(),
                }],
                steps: vec![
                    ExecRequest::new(["python3", "/work/main.py"]).cwd("/work"),
                    ExecRequest::new(["true"]).timeout(std::time::Duration::from_secs(3)),
                ],
            },
            Message::Exec(
                ExecRequest::new(["/bin/cat"])
                    .env("A", "1")
                    .env("B", "x=y")
                    .cwd("/tmp")
                    .user("nobody:nogroup")
                    .with_stdin()
                    .pty(50, 132)
                    .timeout(std::time::Duration::from_millis(1500)),
            ),
            Message::ExecStarted { pid: 1234 },
            Message::Stdin(b"input".to_vec()),
            Message::StdinClose,
            Message::Stdout(vec![0, 1, 2, 255]),
            Message::Stderr(Vec::new()),
            Message::Resize(PtySize { rows: 1, cols: 2 }),
            Message::Signal(15),
            Message::SignalMain(10),
            Message::Exit(ExitStatus {
                kind: ExitKind::Code(3),
                timed_out: false,
            }),
            Message::Exit(ExitStatus {
                kind: ExitKind::Signal(9),
                timed_out: true,
            }),
            Message::WriteFile {
                path: "/etc/x".into(),
                mode: 0o600,
                create_parents: true,
            },
            Message::FileData(vec![7; 1000]),
            Message::FileEnd,
            Message::FileWritten { size: 99 },
            Message::ReadFile {
                path: "/etc/hostname".into(),
            },
            Message::Stat {
                path: "/work".into(),
            },
            Message::FileInfo {
                size: 5,
                mode: 0o644,
            },
            Message::Sync,
            Message::SetClock {
                realtime_ns: 1_700_000_000_000_000_000,
            },
            Message::AddEntropy(vec![9; 64]),
            Message::SetHostname("web-1".into()),
            Message::Power(PowerAction::Poweroff),
            Message::Power(PowerAction::Reboot),
            Message::Forward { port: 8080 },
            Message::StartMain(MainCommand {
                argv: vec!["/srv/app".into(), "--port".into(), "80".into()],
                env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x=y".into())]),
                workdir: Some("/srv".into()),
                user: Some("app:app".into()),
            }),
            Message::StartMain(MainCommand {
                argv: vec!["sleep".into()],
                env: BTreeMap::new(),
                workdir: None,
                user: None,
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let (t, p) = m.encode();
            assert_eq!(Message::decode(t, &p).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn truncated_or_extended_payloads_are_rejected() {
        for m in samples() {
            let (t, p) = m.encode();
            if !p.is_empty() {
                assert!(
                    Message::decode(t, &p[..p.len() - 1]).is_err(),
                    "{}",
                    m.name()
                );
            }
            let mut longer = p.clone();
            longer.push(0);
            assert!(Message::decode(t, &longer).is_err(), "{}", m.name());
        }
        assert!(matches!(
            Message::decode(0xee, &[]),
            Err(ProtocolError::UnknownType(0xee))
        ));
    }

    #[test]
    fn batches_without_steps_or_with_too_many_parts_are_refused() {
        let batch = |files: usize, steps: usize| Message::ExecBatch {
            files: vec![StagedFile::default(); files],
            steps: vec![ExecRequest::new(["true"]); steps],
        };
        for (files, steps) in [(0, 0), (MAX_BATCH_FILES + 1, 1), (0, MAX_BATCH_STEPS + 1)] {
            let (t, p) = batch(files, steps).encode();
            assert!(
                matches!(Message::decode(t, &p), Err(ProtocolError::Malformed(_))),
                "{files} files, {steps} steps"
            );
        }
        let (t, p) = batch(MAX_BATCH_FILES, MAX_BATCH_STEPS).encode();
        assert!(Message::decode(t, &p).is_ok());
    }

    #[test]
    fn hello_version_is_the_leading_field() {
        let (t, p) = Message::Hello {
            version: 0x0102_0304,
            token: "t".into(),
        }
        .encode();
        assert_eq!(t, 0x01);
        assert_eq!(&p[..4], &[4, 3, 2, 1]);
    }

    #[test]
    fn exit_status_accessors() {
        let s = ExitStatus {
            kind: ExitKind::Signal(9),
            timed_out: true,
        };
        assert_eq!(s.signal(), Some(9));
        assert_eq!(s.code(), None);
        assert!(!s.success());
        assert_eq!(s.to_string(), "killed by signal 9 (timed out)");
        let ok = ExitStatus {
            kind: ExitKind::Code(0),
            timed_out: false,
        };
        assert!(ok.success());
        assert_eq!(ok.code(), Some(0));
    }
}
