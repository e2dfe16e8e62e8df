//! Host-side client: one authenticated connection per operation.

use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{ErrorCode, ProtocolError};
use crate::frame::{read_frame, write_frame, CHUNK_SIZE};
use crate::message::{ExecRequest, ExitStatus, Message, PowerAction, PtySize};
use crate::transport::{connect_uds, ConnectError, Stream};
use crate::{AGENT_VSOCK_PORT, PROTOCOL_VERSION};

/// Default bound on the vsock handshake and on waiting for any single reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors seen by the host-side client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the agent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The conversation broke (I/O, bad frame, peer closed).
    #[error("agent protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The agent reported an error.
    #[error("{code}: {message}")]
    Agent {
        /// Stable error code.
        code: ErrorCode,
        /// Detail from the agent.
        message: String,
    },
    /// The agent speaks another protocol version.
    #[error("AGENT_PROTOCOL_VERSION: agent speaks protocol {agent}, host speaks {host}")]
    Version {
        /// Agent's version.
        agent: u32,
        /// Ours.
        host: u32,
    },
    /// The agent sent a message that makes no sense here.
    #[error("agent sent unexpected {got} while waiting for {wanted}")]
    Unexpected {
        /// What arrived.
        got: &'static str,
        /// What was expected.
        wanted: &'static str,
    },
    /// A local file operation (copy in/out) failed.
    #[error("{path}: {source}")]
    LocalIo {
        /// Local path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The agent did not become reachable in time.
    #[error("agent not ready after {0:?}: {1}")]
    NotReady(Duration, Box<ClientError>),
}

impl ClientError {
    /// The stable code, when the failure has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Agent { code, .. } => Some(*code),
            ClientError::Version { .. } => Some(ErrorCode::ProtocolVersion),
            ClientError::NotReady(_, inner) => inner.code(),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Protocol(ProtocolError::Io(e))
    }
}

type Connector = dyn Fn() -> Result<Box<dyn Stream>, ClientError> + Send + Sync;

/// A handle on one VM's agent. Cheap to clone; every operation opens its own
/// connection, so a `Client` can be shared across threads freely.
#[derive(Clone)]
pub struct Client {
    connector: Arc<Connector>,
    token: String,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Metadata of a file read from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Bytes transferred.
    pub size: u64,
    /// Permission bits in the guest.
    pub mode: u32,
}

/// Everything an exec produced, see [`Client::output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// All of stdout (or the pty's output).
    pub stdout: Vec<u8>,
    /// All of stderr (empty in pty mode).
    pub stderr: Vec<u8>,
}

impl Client {
    /// Connects to the agent of the VM whose VMM vsock socket is `uds_path`
    /// and checks reachability and the token with a ping.
    pub fn connect(uds_path: impl AsRef<Path>, token: &str) -> Result<Self, ClientError> {
        let c = Self::new(uds_path, AGENT_VSOCK_PORT, token);
        c.ping()?;
        Ok(c)
    }

    /// A client for `uds_path` and guest `port` that connects lazily. The
    /// vsock handshake is bounded by [`DEFAULT_TIMEOUT`].
    pub fn new(uds_path: impl AsRef<Path>, port: u32, token: &str) -> Self {
        let path = uds_path.as_ref().to_path_buf();
        Client {
            connector: Arc::new(move || {
                let s = connect_uds(&path, port, DEFAULT_TIMEOUT)?;
                Ok(Box::new(s) as Box<dyn Stream>)
            }),
            token: token.to_string(),
            timeout: Some(DEFAULT_TIMEOUT),
        }
    }

    /// A client over any transport: `connect` must return a fresh stream
    /// already connected to the agent (after any VMM handshake).
    pub fn from_connector<F, S>(token: &str, connect: F) -> Self
    where
        F: Fn() -> io::Result<S> + Send + Sync + 'static,
        S: Stream,
    {
        Client {
            connector: Arc::new(move || {
                connect()
                    .map(|s| Box::new(s) as Box<dyn Stream>)
                    .map_err(ClientError::from)
            }),
            token: token.to_string(),
            timeout: Some(DEFAULT_TIMEOUT),
        }
    }

    /// Sets the bound on waiting for any single reply (`None`: wait forever).
    /// Exec output is never subject to it: commands may be silent for long.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Pings until the agent answers or `timeout` passes (useful right after
    /// boot). Authentication and version errors are returned at once.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, ClientError> {
        let start = Instant::now();
        loop {
            match self.ping() {
                Ok(rtt) => return Ok(rtt),
                Err(e) if e.code().is_some() => return Err(e),
                Err(e) if start.elapsed() >= timeout => {
                    return Err(ClientError::NotReady(timeout, Box::new(e)))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Opens a connection and performs the Hello exchange.
    fn open(&self) -> Result<Box<dyn Stream>, ClientError> {
        let mut s = (self.connector)()?;
        s.set_read_timeout_stream(self.timeout)?;
        write_frame(
            &mut s,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                token: self.token.clone(),
            },
        )?;
        match reply(&mut s, "HelloOk")? {
            Message::HelloOk { version, .. } if version == PROTOCOL_VERSION => Ok(s),
            Message::HelloOk { version, .. } => Err(ClientError::Version {
                agent: version,
                host: PROTOCOL_VERSION,
            }),
            other => Err(unexpected(&other, "HelloOk")),
        }
    }

    /// One request, one `Ok` reply.
    fn simple(&self, msg: Message, timeout: Option<Duration>) -> Result<(), ClientError> {
        let mut s = self.open()?;
        s.set_read_timeout_stream(timeout)?;
        write_frame(&mut s, &msg)?;
        match reply(&mut s, "Ok")? {
            Message::Ok => Ok(()),
            other => Err(unexpected(&other, "Ok")),
        }
    }

    /// Round-trips a Ping and returns the round-trip time.
    pub fn ping(&self) -> Result<Duration, ClientError> {
        static NONCE: AtomicU64 = AtomicU64::new(1);
        let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let mut s = self.open()?;
        write_frame(&mut s, &Message::Ping { nonce })?;
        match reply(&mut s, "Pong")? {
            Message::Pong { nonce: n } if n == nonce => Ok(start.elapsed()),
            other => Err(unexpected(&other, "Pong")),
        }
    }

    /// Flushes the guest's filesystems. Not bounded by the reply timeout:
    /// a large amount of dirty data can take long to write back.
    pub fn sync(&self) -> Result<(), ClientError> {
        self.simple(Message::Sync, None)
    }

    /// Sets the guest's wall clock.
    pub fn set_clock(&self, time: SystemTime) -> Result<(), ClientError> {
        let ns = time
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.simple(Message::SetClock { realtime_ns: ns }, self.timeout)
    }

    /// Sets the guest's wall clock to the host's current time.
    pub fn sync_clock(&self) -> Result<(), ClientError> {
        self.set_clock(SystemTime::now())
    }

    /// Mixes `bytes` into the guest kernel RNG, crediting 8 bits each.
    pub fn add_entropy(&self, bytes: &[u8]) -> Result<(), ClientError> {
        for chunk in bytes.chunks(CHUNK_SIZE) {
            self.simple(Message::AddEntropy(chunk.to_vec()), self.timeout)?;
        }
        Ok(())
    }

    /// Asks the guest to power off or reboot. Returns once the agent has
    /// accepted; the VM goes down shortly after.
    pub fn power(&self, action: PowerAction) -> Result<(), ClientError> {
        self.simple(Message::Power(action), self.timeout)
    }

    /// Opens a connection to TCP `127.0.0.1:port` inside the guest. Returns
    /// the raw stream once the agent has connected: bytes written to it
    /// reach the guest socket and its replies can be read back. Shut down
    /// the write direction to pass on an end of file. Fails with
    /// `FORWARD_REFUSED` when nothing listens on the guest port.
    pub fn forward(&self, port: u16) -> Result<Box<dyn Stream>, ClientError> {
        let mut s = self.open()?;
        write_frame(&mut s, &Message::Forward { port })?;
        match reply(&mut s, "Ok")? {
            Message::Ok => {
                s.set_read_timeout_stream(None)?;
                Ok(s)
            }
            other => Err(unexpected(&other, "Ok")),
        }
    }

    /// Starts a process. Returns once it is running (or failed to start:
    /// then the error carries e.g. `EXEC_NOT_FOUND`).
    pub fn exec(&self, req: ExecRequest) -> Result<ExecHandle, ClientError> {
        let mut s = self.open()?;
        write_frame(&mut s, &Message::Exec(req))?;
        let pid = match reply(&mut s, "ExecStarted")? {
            Message::ExecStarted { pid } => pid,
            other => return Err(unexpected(&other, "ExecStarted")),
        };
        s.set_read_timeout_stream(None)?;
        let writer = s.try_clone_stream()?;
        Ok(ExecHandle {
            reader: s,
            input: ExecInput {
                writer: Arc::new(Mutex::new(writer)),
            },
            pid,
            finished: false,
        })
    }

    /// Runs a process to completion, feeding it `stdin` (if any) and
    /// collecting its output.
    pub fn output(
        &self,
        mut req: ExecRequest,
        stdin: Option<&[u8]>,
    ) -> Result<Output, ClientError> {
        req.stdin = stdin.is_some();
        let handle = self.exec(req)?;
        let feeder = stdin.map(|data| {
            let input = handle.input();
            let data = data.to_vec();
            // A separate writer avoids deadlock when the process writes a lot
            // before reading all its input.
            std::thread::spawn(move || -> Result<(), ClientError> {
                input.write_stdin(&data)?;
                input.close_stdin()
            })
        });
        let out = handle.output();
        if let Some(f) = feeder {
            // The process may exit without reading all input; a broken pipe
            // on the feeder is then expected and not an error of the exec.
            let _ = f.join();
        }
        out
    }

    /// Writes a guest file atomically (temp file, fsync, rename) from a
    /// reader of any size. Returns the bytes written.
    pub fn write_file<R: Read>(
        &self,
        path: &str,
        mode: u32,
        create_parents: bool,
        mut data: R,
    ) -> Result<u64, ClientError> {
        let mut s = self.open()?;
        write_frame(
            &mut s,
            &Message::WriteFile {
                path: path.to_string(),
                mode,
                create_parents,
            },
        )?;
        match reply(&mut s, "Ok")? {
            Message::Ok => {}
            other => return Err(unexpected(&other, "Ok")),
        }
        let mut buf = vec![0u8; CHUNK_SIZE];
        let sent = (|| -> Result<(), ClientError> {
            loop {
                let n = match data.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(ClientError::LocalIo {
                            path: PathBuf::from("<input>"),
                            source: e,
                        })
                    }
                };
                write_frame(&mut s, &Message::FileData(buf[..n].to_vec()))?;
            }
            write_frame(&mut s, &Message::FileEnd)?;
            Ok(())
        })();
        if let Err(e) = sent {
            // The agent may have failed first (e.g. disk full) and said why.
            if matches!(e, ClientError::Protocol(_)) {
                if let Err(agent @ ClientError::Agent { .. }) = reply(&mut s, "FileWritten") {
                    return Err(agent);
                }
            }
            // Dropping the connection without FileEnd makes the agent
            // discard its temp file.
            return Err(e);
        }
        // fsync of a large file can take a while; wait without a bound.
        s.set_read_timeout_stream(None)?;
        match reply(&mut s, "FileWritten")? {
            Message::FileWritten { size } => Ok(size),
            other => Err(unexpected(&other, "FileWritten")),
        }
    }

    /// Writes a guest file from bytes, see [`Client::write_file`].
    pub fn write_file_bytes(&self, path: &str, mode: u32, data: &[u8]) -> Result<u64, ClientError> {
        self.write_file(path, mode, false, data)
    }

    /// Streams a guest file into `out`.
    pub fn read_file<W: Write>(&self, path: &str, mut out: W) -> Result<FileInfo, ClientError> {
        let mut s = self.open()?;
        write_frame(
            &mut s,
            &Message::ReadFile {
                path: path.to_string(),
            },
        )?;
        let mode = match reply(&mut s, "FileInfo")? {
            Message::FileInfo { mode, .. } => mode,
            other => return Err(unexpected(&other, "FileInfo")),
        };
        let mut size = 0u64;
        loop {
            match reply(&mut s, "FileData")? {
                Message::FileData(b) => {
                    out.write_all(&b).map_err(|e| ClientError::LocalIo {
                        path: PathBuf::from("<output>"),
                        source: e,
                    })?;
                    size += b.len() as u64;
                }
                Message::FileEnd => return Ok(FileInfo { size, mode }),
                other => return Err(unexpected(&other, "FileData")),
            }
        }
    }

    /// Reads a whole guest file into memory.
    pub fn read_file_bytes(&self, path: &str) -> Result<(Vec<u8>, FileInfo), ClientError> {
        let mut buf = Vec::new();
        let info = self.read_file(path, &mut buf)?;
        Ok((buf, info))
    }

    /// Copies a local file into the guest, keeping its permission bits.
    pub fn copy_in(&self, local: &Path, guest_path: &str) -> Result<u64, ClientError> {
        let local_err = |source| ClientError::LocalIo {
            path: local.to_path_buf(),
            source,
        };
        let f = fs::File::open(local).map_err(local_err)?;
        let mode = f.metadata().map_err(local_err)?.permissions().mode() & 0o7777;
        self.write_file(
            guest_path,
            mode,
            true,
            io::BufReader::with_capacity(CHUNK_SIZE, f),
        )
    }

    /// Copies a guest file to `local`, atomically (temp file in the same
    /// directory, fsync, rename) and with the guest file's permission bits.
    pub fn copy_out(&self, guest_path: &str, local: &Path) -> Result<FileInfo, ClientError> {
        let local_err = |source| ClientError::LocalIo {
            path: local.to_path_buf(),
            source,
        };
        let tmp = temp_sibling(local);
        let result = (|| {
            let f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(local_err)?;
            let mut w = io::BufWriter::with_capacity(CHUNK_SIZE, f);
            let info = self.read_file(guest_path, &mut w)?;
            let f = w.into_inner().map_err(|e| local_err(e.into_error()))?;
            f.set_permissions(fs::Permissions::from_mode(info.mode & 0o7777))
                .map_err(local_err)?;
            f.sync_all().map_err(local_err)?;
            fs::rename(&tmp, local).map_err(local_err)?;
            Ok(info)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.ferry-{}-{}.part",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Reads the next frame, turning agent `Error` frames into errors.
fn reply(s: &mut Box<dyn Stream>, _wanted: &'static str) -> Result<Message, ClientError> {
    match read_frame(s)? {
        Message::Error { code, message } => Err(ClientError::Agent { code, message }),
        m => Ok(m),
    }
}

fn unexpected(got: &Message, wanted: &'static str) -> ClientError {
    ClientError::Unexpected {
        got: got.name(),
        wanted,
    }
}

/// One event of a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Output on stdout (or the pty).
    Stdout(Vec<u8>),
    /// Output on stderr.
    Stderr(Vec<u8>),
    /// The process ended; no events follow.
    Exit(ExitStatus),
}

/// The sending side of a running exec: stdin, resize, signals. Cloneable
/// and usable from any thread while another thread reads output.
#[derive(Clone)]
pub struct ExecInput {
    writer: Arc<Mutex<Box<dyn Stream>>>,
}

impl ExecInput {
    fn send(&self, msg: &Message) -> Result<(), ClientError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, msg)?;
        Ok(())
    }

    /// Sends bytes to the process's stdin (chunked as needed).
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(CHUNK_SIZE) {
            self.send(&Message::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Closes the process's stdin (in pty mode: sends the EOF character).
    pub fn close_stdin(&self) -> Result<(), ClientError> {
        self.send(&Message::StdinClose)
    }

    /// Resizes the pty (ignored for pipe-mode execs).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.send(&Message::Resize(PtySize { rows, cols }))
    }

    /// Sends a signal (e.g. `libc::SIGINT`) to the process group.
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.send(&Message::Signal(signal))
    }
}

impl Write for ExecInput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK_SIZE);
        self.send(&Message::Stdin(buf[..n].to_vec()))
            .map_err(|e| match e {
                ClientError::Protocol(ProtocolError::Io(e)) => e,
                other => io::Error::other(other.to_string()),
            })?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A running exec. Read its output with [`ExecHandle::next_event`],
/// [`ExecHandle::wait_with`] or [`ExecHandle::output`]; feed it through
/// [`ExecHandle::input`]. Dropping the handle before the process exits
/// closes the connection, and the agent then kills the process group.
pub struct ExecHandle {
    reader: Box<dyn Stream>,
    input: ExecInput,
    pid: u32,
    finished: bool,
}

impl std::fmt::Debug for ExecHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHandle")
            .field("pid", &self.pid)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl ExecHandle {
    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The input side (stdin, resize, signal).
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// The next output chunk or the exit status.
    pub fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        if self.finished {
            return Err(ProtocolError::Closed.into());
        }
        match read_frame(&mut self.reader)? {
            Message::Stdout(b) => Ok(ExecEvent::Stdout(b)),
            Message::Stderr(b) => Ok(ExecEvent::Stderr(b)),
            Message::Exit(st) => {
                self.finished = true;
                let _ = self.reader.shutdown_stream(Shutdown::Both);
                Ok(ExecEvent::Exit(st))
            }
            Message::Error { code, message } => {
                self.finished = true;
                Err(ClientError::Agent { code, message })
            }
            other => Err(unexpected(&other, "Stdout/Stderr/Exit")),
        }
    }

    /// Streams output to the callbacks until the process exits.
    pub fn wait_with(
        mut self,
        mut on_stdout: impl FnMut(&[u8]),
        mut on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, ClientError> {
        loop {
            match self.next_event()? {
                ExecEvent::Stdout(b) => on_stdout(&b),
                ExecEvent::Stderr(b) => on_stderr(&b),
                ExecEvent::Exit(st) => return Ok(st),
            }
        }
    }

    /// Waits for exit, discarding output.
    pub fn wait(self) -> Result<ExitStatus, ClientError> {
        self.wait_with(|_| {}, |_| {})
    }

    /// Waits for exit, collecting output.
    pub fn output(self) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let status = self.wait_with(
            |b| stdout.extend_from_slice(b),
            |b| stderr.extend_from_slice(b),
        )?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}
