//! Host-side client. A [`Client`] opens one authenticated connection per
//! operation; a [`Session`] keeps one open and runs operations over it one
//! after another, saving the vsock handshake and the Hello round trip.

use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::MainCommand;
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

/// An authenticated connection and whether its conversation is at a
/// request boundary (so the next request may follow on it).
struct Conn {
    stream: Box<dyn Stream>,
    in_sync: bool,
}

impl Conn {
    /// Sends the request that starts an operation.
    fn request(&mut self, msg: &Message) -> Result<(), ClientError> {
        self.in_sync = false;
        write_frame(&mut self.stream, msg)?;
        Ok(())
    }

    /// Sends a frame within the current operation.
    fn send(&mut self, msg: &Message) -> Result<(), ClientError> {
        write_frame(&mut self.stream, msg)?;
        Ok(())
    }

    /// Reads the next frame. An `Error` frame always ends the operation
    /// (the agent then waits for the next request), so it leaves the
    /// connection in sync.
    fn reply(&mut self) -> Result<Message, ClientError> {
        match read_frame(&mut self.stream)? {
            Message::Error { code, message } => {
                self.in_sync = true;
                Err(ClientError::Agent { code, message })
            }
            m => Ok(m),
        }
    }

    /// Reads the answers of `n` pipelined requests, each `Ok` or an agent
    /// error of its own; anything else breaks the connection.
    fn ok_replies(&mut self, n: usize) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        let mut results = Vec::with_capacity(n);
        for _ in 0..n {
            results.push(match self.reply() {
                Ok(Message::Ok) => Ok(()),
                Ok(other) => return Err(unexpected(&other, "Ok")),
                Err(e @ ClientError::Agent { .. }) => Err(e),
                Err(e) => return Err(e),
            });
        }
        self.in_sync = true;
        Ok(results)
    }

    /// Reads the reply that ends an operation.
    fn last_reply(&mut self) -> Result<Message, ClientError> {
        let m = self.reply()?;
        self.in_sync = true;
        Ok(m)
    }

    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout_stream(timeout)?;
        Ok(())
    }
}

/// Where a [`Session`] keeps its idle connection.
type Slot = Arc<Mutex<Option<Conn>>>;

fn lock_slot(slot: &Slot) -> std::sync::MutexGuard<'_, Option<Conn>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

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

    /// Opens a connection that stays open across operations, see
    /// [`Session`]. Connects and authenticates now, so an unreachable agent,
    /// a wrong token or a protocol version mismatch is reported here.
    pub fn session(&self) -> Result<Session, ClientError> {
        self.session_with(&mut Vec::new).map(|(session, _)| session)
    }

    /// [`Self::session`] with the requests `make` returns (each answered by
    /// `Ok` or an error, like [`Session::pipeline`]'s) sent in the same
    /// burst as the Hello: the handshake and all of them in one round trip.
    /// `make` runs once the connection to the guest is up. The outer error
    /// is the connection's; each request has its own result.
    pub fn session_with(
        &self,
        make: &mut dyn FnMut() -> Vec<Message>,
    ) -> Result<(Session, Vec<Result<(), ClientError>>), ClientError> {
        let (conn, results) = self.open_with(make)?;
        Ok((
            Session {
                client: self.clone(),
                idle: Arc::new(Mutex::new(Some(conn))),
            },
            results,
        ))
    }

    /// A connection for one operation: the session's idle one when there
    /// is one, else a new one.
    fn acquire(&self, via: Option<&Slot>) -> Result<Conn, ClientError> {
        if let Some(conn) = via.and_then(|slot| lock_slot(slot).take()) {
            return Ok(conn);
        }
        self.open()
    }

    /// Ends an operation's use of `conn`: it goes back to the session if the
    /// conversation reached a request boundary and the session has no idle
    /// connection yet; otherwise it is closed.
    fn release(via: Option<&Slot>, conn: Conn) {
        if let (Some(slot), true) = (via, conn.in_sync) {
            let mut idle = lock_slot(slot);
            if idle.is_none() {
                *idle = Some(conn);
            }
        }
    }

    /// Runs one operation on a connection from [`Client::acquire`].
    fn run<T>(
        &self,
        via: Option<&Slot>,
        op: impl FnOnce(&mut Conn) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut conn = self.acquire(via)?;
        let result = op(&mut conn);
        Self::release(via, conn);
        result
    }

    /// Opens a connection and performs the Hello exchange.
    fn open(&self) -> Result<Conn, ClientError> {
        self.open_with(&mut Vec::new).map(|(conn, _)| conn)
    }

    /// Opens a connection with the requests `make` returns (each answered
    /// by `Ok` or an error) written in the same burst as the Hello, and
    /// reads all the answers: one round trip for the handshake and the
    /// requests. `make` runs once the connection is up, so a request that
    /// carries the time carries it then. The agent reads nothing after a
    /// Hello it refuses (it answers the error and closes), so none of them
    /// is ever served unauthenticated.
    fn open_with(
        &self,
        make: &mut dyn FnMut() -> Vec<Message>,
    ) -> Result<(Conn, Vec<Result<(), ClientError>>), ClientError> {
        let mut s = (self.connector)()?;
        s.set_read_timeout_stream(self.timeout)?;
        let requests = make();
        let mut burst = Vec::new();
        write_frame(
            &mut burst,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                token: self.token.clone(),
            },
        )?;
        for m in &requests {
            write_frame(&mut burst, m)?;
        }
        s.write_all(&burst).map_err(ProtocolError::from)?;
        let mut conn = match reply(&mut s, "HelloOk")? {
            Message::HelloOk { version, .. } if version == PROTOCOL_VERSION => Conn {
                stream: s,
                in_sync: requests.is_empty(),
            },
            Message::HelloOk { version, .. } => {
                return Err(ClientError::Version {
                    agent: version,
                    host: PROTOCOL_VERSION,
                })
            }
            other => return Err(unexpected(&other, "HelloOk")),
        };
        let results = conn.ok_replies(requests.len())?;
        Ok((conn, results))
    }

    /// One request, one `Ok` reply.
    fn simple(
        &self,
        via: Option<&Slot>,
        msg: Message,
        timeout: Option<Duration>,
    ) -> Result<(), ClientError> {
        self.run(via, |c| {
            c.set_timeout(timeout)?;
            c.request(&msg)?;
            match c.last_reply()? {
                Message::Ok => Ok(()),
                other => Err(unexpected(&other, "Ok")),
            }
        })
    }

    /// Round-trips a Ping and returns the round-trip time (including
    /// opening the connection).
    pub fn ping(&self) -> Result<Duration, ClientError> {
        self.ping_via(None)
    }

    fn ping_via(&self, via: Option<&Slot>) -> Result<Duration, ClientError> {
        static NONCE: AtomicU64 = AtomicU64::new(1);
        let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        self.run(via, |c| {
            c.set_timeout(self.timeout)?;
            c.request(&Message::Ping { nonce })?;
            match c.last_reply()? {
                Message::Pong { nonce: n } if n == nonce => Ok(start.elapsed()),
                other => Err(unexpected(&other, "Pong")),
            }
        })
    }

    /// Flushes the guest's filesystems. Not bounded by the reply timeout:
    /// a large amount of dirty data can take long to write back.
    pub fn sync(&self) -> Result<(), ClientError> {
        self.simple(None, Message::Sync, None)
    }

    /// Sets the guest's wall clock.
    pub fn set_clock(&self, time: SystemTime) -> Result<(), ClientError> {
        self.simple(None, set_clock_message(time), self.timeout)
    }

    /// Sets the guest's wall clock to the host's current time.
    pub fn sync_clock(&self) -> Result<(), ClientError> {
        self.set_clock(SystemTime::now())
    }

    /// Mixes `bytes` into the guest kernel RNG, crediting 8 bits each.
    pub fn add_entropy(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.add_entropy_via(None, bytes)
    }

    fn add_entropy_via(&self, via: Option<&Slot>, bytes: &[u8]) -> Result<(), ClientError> {
        for chunk in bytes.chunks(CHUNK_SIZE) {
            self.simple(via, Message::AddEntropy(chunk.to_vec()), self.timeout)?;
        }
        Ok(())
    }

    /// Sets the guest's hostname (kernel and `/etc/hostname`).
    pub fn set_hostname(&self, name: &str) -> Result<(), ClientError> {
        self.simple(None, Message::SetHostname(name.to_string()), self.timeout)
    }

    /// Starts the VM's main process, as if it had been the `command` of the
    /// agent config at boot: its output goes to the guest console and the VM
    /// powers off when it exits. Returns once it runs. Fails with
    /// `MAIN_ALREADY_RUNNING` if the VM has one already, or with an `EXEC_*`
    /// code (e.g. `EXEC_NOT_FOUND`) if it cannot start; the VM then stays up
    /// without a main process, and another may be tried.
    pub fn start_main(&self, cmd: &MainCommand) -> Result<(), ClientError> {
        self.simple(None, Message::StartMain(cmd.clone()), self.timeout)
    }

    /// Sends `signal` to the VM's main process (the `command` of its agent
    /// config or of a `start_main`) and its process group. Fails with
    /// `WORKLOAD_NOT_RUNNING` when there is none running.
    pub fn signal_main(&self, signal: i32) -> Result<(), ClientError> {
        self.simple(None, Message::SignalMain(signal), self.timeout)
    }

    /// Asks the guest to power off or reboot. Returns once the agent has
    /// accepted; the VM goes down shortly after.
    pub fn power(&self, action: PowerAction) -> Result<(), ClientError> {
        self.simple(None, Message::Power(action), self.timeout)
    }

    /// Opens a connection to TCP `127.0.0.1:port` inside the guest. Returns
    /// the raw stream once the agent has connected: bytes written to it
    /// reach the guest socket and its replies can be read back. Shut down
    /// the write direction to pass on an end of file. Fails with
    /// `FORWARD_REFUSED` when nothing listens on the guest port.
    pub fn forward(&self, port: u16) -> Result<Box<dyn Stream>, ClientError> {
        let mut c = self.open()?;
        c.request(&Message::Forward { port })?;
        match c.reply()? {
            Message::Ok => {
                c.set_timeout(None)?;
                Ok(c.stream)
            }
            other => Err(unexpected(&other, "Ok")),
        }
    }

    /// Starts a process. Returns once it is running (or failed to start:
    /// then the error carries e.g. `EXEC_NOT_FOUND`).
    pub fn exec(&self, req: ExecRequest) -> Result<ExecHandle, ClientError> {
        self.exec_via(None, req)
    }

    fn exec_via(&self, via: Option<&Slot>, req: ExecRequest) -> Result<ExecHandle, ClientError> {
        self.start_via(via, Message::Exec(req))
    }

    /// Writes `files`, then runs `steps` one after another while each exits
    /// 0, in one round trip ([`Message::ExecBatch`]); returns the output of
    /// every step that ran and the status of the last one. Agents older than
    /// the message answer with an error.
    pub fn batch_output(
        &self,
        files: Vec<crate::StagedFile>,
        steps: Vec<ExecRequest>,
    ) -> Result<Output, ClientError> {
        self.start_via(None, Message::ExecBatch { files, steps })?
            .output()
    }

    /// Sends `Exec` or `ExecBatch` and waits for `ExecStarted`.
    fn start_via(&self, via: Option<&Slot>, request: Message) -> Result<ExecHandle, ClientError> {
        let mut c = self.acquire(via)?;
        let started = (|| {
            c.set_timeout(self.timeout)?;
            c.request(&request)?;
            match c.reply()? {
                Message::ExecStarted { pid } => Ok(pid),
                other => Err(unexpected(&other, "ExecStarted")),
            }
        })();
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                Self::release(via, c);
                return Err(e);
            }
        };
        c.set_timeout(None)?;
        let writer = c.stream.try_clone_stream()?;
        Ok(ExecHandle {
            conn: Some(c),
            home: via.cloned(),
            input: ExecInput {
                writer: Arc::new(Mutex::new(Some(writer))),
            },
            pid,
            finished: false,
        })
    }

    /// Runs a process to completion, feeding it `stdin` (if any) and
    /// collecting its output.
    pub fn output(&self, req: ExecRequest, stdin: Option<&[u8]>) -> Result<Output, ClientError> {
        self.output_via(None, req, stdin)
    }

    fn output_via(
        &self,
        via: Option<&Slot>,
        mut req: ExecRequest,
        stdin: Option<&[u8]>,
    ) -> Result<Output, ClientError> {
        req.stdin = stdin.is_some();
        let handle = self.exec_via(via, req)?;
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
        data: R,
    ) -> Result<u64, ClientError> {
        self.write_file_via(None, path, mode, create_parents, data)
    }

    fn write_file_via<R: Read>(
        &self,
        via: Option<&Slot>,
        path: &str,
        mode: u32,
        create_parents: bool,
        mut data: R,
    ) -> Result<u64, ClientError> {
        self.run(via, |c| {
            c.set_timeout(self.timeout)?;
            c.request(&Message::WriteFile {
                path: path.to_string(),
                mode,
                create_parents,
            })?;
            match c.reply()? {
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
                    c.send(&Message::FileData(buf[..n].to_vec()))?;
                }
                c.send(&Message::FileEnd)?;
                Ok(())
            })();
            if let Err(e) = sent {
                // The agent may have failed first (e.g. disk full) and said why.
                if matches!(e, ClientError::Protocol(_)) {
                    if let Err(agent @ ClientError::Agent { .. }) = c.reply() {
                        c.in_sync = false;
                        return Err(agent);
                    }
                }
                // Closing the connection without FileEnd makes the agent
                // discard its temp file.
                c.in_sync = false;
                return Err(e);
            }
            // fsync of a large file can take a while; wait without a bound.
            c.set_timeout(None)?;
            match c.last_reply()? {
                Message::FileWritten { size } => Ok(size),
                other => Err(unexpected(&other, "FileWritten")),
            }
        })
    }

    /// Writes a guest file from bytes, see [`Client::write_file`].
    pub fn write_file_bytes(&self, path: &str, mode: u32, data: &[u8]) -> Result<u64, ClientError> {
        self.write_file(path, mode, false, data)
    }

    /// The size and full mode (file type bits included) of a guest path,
    /// not following a final symlink. Agents older than this message
    /// answer with an error.
    pub fn stat(&self, path: &str) -> Result<(u64, u32), ClientError> {
        self.run(None, |c| {
            c.set_timeout(self.timeout)?;
            c.request(&Message::Stat {
                path: path.to_string(),
            })?;
            match c.last_reply()? {
                Message::FileInfo { size, mode } => Ok((size, mode)),
                other => Err(unexpected(&other, "FileInfo")),
            }
        })
    }

    /// Streams a guest file into `out`.
    pub fn read_file<W: Write>(&self, path: &str, out: W) -> Result<FileInfo, ClientError> {
        self.read_file_via(None, path, out, &mut |_, _| {})
    }

    /// `progress(bytes so far, file size)` is called after each chunk.
    fn read_file_via<W: Write>(
        &self,
        via: Option<&Slot>,
        path: &str,
        mut out: W,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FileInfo, ClientError> {
        self.run(via, |c| {
            c.set_timeout(self.timeout)?;
            c.request(&Message::ReadFile {
                path: path.to_string(),
            })?;
            let (mode, total) = match c.reply()? {
                Message::FileInfo { mode, size } => (mode, size),
                other => return Err(unexpected(&other, "FileInfo")),
            };
            let mut size = 0u64;
            loop {
                match c.reply()? {
                    Message::FileData(b) => {
                        // On a local failure the rest of the file is still on
                        // its way, so the connection is not reused.
                        out.write_all(&b).map_err(|e| ClientError::LocalIo {
                            path: PathBuf::from("<output>"),
                            source: e,
                        })?;
                        size += b.len() as u64;
                        progress(size, total);
                    }
                    Message::FileEnd => {
                        c.in_sync = true;
                        return Ok(FileInfo { size, mode });
                    }
                    other => return Err(unexpected(&other, "FileData")),
                }
            }
        })
    }

    /// Reads a whole guest file into memory.
    pub fn read_file_bytes(&self, path: &str) -> Result<(Vec<u8>, FileInfo), ClientError> {
        let mut buf = Vec::new();
        let info = self.read_file(path, &mut buf)?;
        Ok((buf, info))
    }

    /// Copies a local file into the guest, keeping its permission bits.
    pub fn copy_in(&self, local: &Path, guest_path: &str) -> Result<u64, ClientError> {
        self.copy_in_via(None, local, guest_path, &mut |_, _| {})
    }

    /// [`Client::copy_in`], calling `progress(bytes sent, file size)` as the
    /// file's data goes out (for a progress display).
    pub fn copy_in_with_progress(
        &self,
        local: &Path,
        guest_path: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        self.copy_in_via(None, local, guest_path, progress)
    }

    fn copy_in_via(
        &self,
        via: Option<&Slot>,
        local: &Path,
        guest_path: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, ClientError> {
        let local_err = |source| ClientError::LocalIo {
            path: local.to_path_buf(),
            source,
        };
        let f = fs::File::open(local).map_err(local_err)?;
        let meta = f.metadata().map_err(local_err)?;
        let mode = meta.permissions().mode() & 0o7777;
        let counted = Counted {
            inner: f,
            done: 0,
            total: meta.len(),
            progress,
        };
        self.write_file_via(
            via,
            guest_path,
            mode,
            true,
            io::BufReader::with_capacity(CHUNK_SIZE, counted),
        )
    }

    /// Copies a guest file to `local`, atomically (temp file in the same
    /// directory, fsync, rename) and with the guest file's permission bits.
    pub fn copy_out(&self, guest_path: &str, local: &Path) -> Result<FileInfo, ClientError> {
        self.copy_out_via(None, guest_path, local, &mut |_, _| {})
    }

    /// [`Client::copy_out`], calling `progress(bytes received, file size)` as
    /// the file's data arrives (for a progress display).
    pub fn copy_out_with_progress(
        &self,
        guest_path: &str,
        local: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FileInfo, ClientError> {
        self.copy_out_via(None, guest_path, local, progress)
    }

    fn copy_out_via(
        &self,
        via: Option<&Slot>,
        guest_path: &str,
        local: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FileInfo, ClientError> {
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
            let info = self.read_file_via(via, guest_path, &mut w, progress)?;
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

/// A reader that reports how much of `total` it has read.
struct Counted<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.done, self.total);
        Ok(n)
    }
}

fn set_clock_message(time: SystemTime) -> Message {
    let ns = time
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Message::SetClock { realtime_ns: ns }
}

/// A persistent, authenticated connection to one VM's agent, made with
/// [`Client::session`]. Operations run over it one after another, so each
/// costs only its own round trips: no vsock handshake, no Hello.
///
/// The methods mirror [`Client`]'s. An operation started while another one
/// holds the connection (say, a second exec while an [`ExecHandle`] is still
/// running) gets a connection of its own, so nothing waits on anything else;
/// when both are done, one connection stays open. Errors the agent reports
/// (a missing program, a missing file) end only their operation and the
/// connection is reused; any other failure closes it and the next operation
/// connects afresh. A session shares its connection among clones and
/// threads.
#[derive(Clone)]
pub struct Session {
    client: Client,
    idle: Slot,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client", &self.client)
            .field("idle", &lock_slot(&self.idle).is_some())
            .finish()
    }
}

impl Session {
    fn via(&self) -> Option<&Slot> {
        Some(&self.idle)
    }

    /// The client this session was made from (one connection per operation).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Round-trips a Ping over the session and returns the round-trip time.
    pub fn ping(&self) -> Result<Duration, ClientError> {
        self.client.ping_via(self.via())
    }

    /// Starts a process, see [`Client::exec`]. The connection returns to
    /// the session once the handle has seen the process exit; dropping the
    /// handle earlier closes it (and the agent kills the process group).
    pub fn exec(&self, req: ExecRequest) -> Result<ExecHandle, ClientError> {
        self.client.exec_via(self.via(), req)
    }

    /// Runs a process to completion, see [`Client::output`].
    pub fn output(&self, req: ExecRequest, stdin: Option<&[u8]>) -> Result<Output, ClientError> {
        self.client.output_via(self.via(), req, stdin)
    }

    /// Flushes the guest's filesystems, see [`Client::sync`].
    pub fn sync(&self) -> Result<(), ClientError> {
        self.client.simple(self.via(), Message::Sync, None)
    }

    /// Sets the guest's wall clock.
    pub fn set_clock(&self, time: SystemTime) -> Result<(), ClientError> {
        self.client
            .simple(self.via(), set_clock_message(time), self.client.timeout)
    }

    /// Sends `requests` (each answered by `Ok` or an error) back to back and
    /// then reads their answers: one round trip for all of them. The outer
    /// error is the connection's; each request has its own result.
    pub fn pipeline(
        &self,
        requests: &[Message],
    ) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        self.client.run(self.via(), |c| {
            c.set_timeout(self.client.timeout)?;
            for m in requests {
                c.request(m)?;
            }
            c.ok_replies(requests.len())
        })
    }

    /// The `SetClock` request for `time`, for [`Self::pipeline`].
    pub fn set_clock_request(time: SystemTime) -> Message {
        set_clock_message(time)
    }

    /// Mixes `bytes` into the guest kernel RNG, see [`Client::add_entropy`].
    pub fn add_entropy(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.client.add_entropy_via(self.via(), bytes)
    }

    /// Sets the guest's hostname, see [`Client::set_hostname`].
    pub fn set_hostname(&self, name: &str) -> Result<(), ClientError> {
        self.client.simple(
            self.via(),
            Message::SetHostname(name.to_string()),
            self.client.timeout,
        )
    }

    /// Starts the VM's main process, see [`Client::start_main`].
    pub fn start_main(&self, cmd: &MainCommand) -> Result<(), ClientError> {
        self.client.simple(
            self.via(),
            Message::StartMain(cmd.clone()),
            self.client.timeout,
        )
    }

    /// Asks the guest to power off or reboot, see [`Client::power`].
    pub fn power(&self, action: PowerAction) -> Result<(), ClientError> {
        self.client
            .simple(self.via(), Message::Power(action), self.client.timeout)
    }

    /// Writes a guest file atomically, see [`Client::write_file`].
    pub fn write_file<R: Read>(
        &self,
        path: &str,
        mode: u32,
        create_parents: bool,
        data: R,
    ) -> Result<u64, ClientError> {
        self.client
            .write_file_via(self.via(), path, mode, create_parents, data)
    }

    /// Writes a guest file from bytes, see [`Client::write_file`].
    pub fn write_file_bytes(&self, path: &str, mode: u32, data: &[u8]) -> Result<u64, ClientError> {
        self.write_file(path, mode, false, data)
    }

    /// Streams a guest file into `out`, see [`Client::read_file`].
    pub fn read_file<W: Write>(&self, path: &str, out: W) -> Result<FileInfo, ClientError> {
        self.client
            .read_file_via(self.via(), path, out, &mut |_, _| {})
    }

    /// Reads a whole guest file into memory.
    pub fn read_file_bytes(&self, path: &str) -> Result<(Vec<u8>, FileInfo), ClientError> {
        let mut buf = Vec::new();
        let info = self.read_file(path, &mut buf)?;
        Ok((buf, info))
    }

    /// Copies a local file into the guest, see [`Client::copy_in`].
    pub fn copy_in(&self, local: &Path, guest_path: &str) -> Result<u64, ClientError> {
        self.client
            .copy_in_via(self.via(), local, guest_path, &mut |_, _| {})
    }

    /// Copies a guest file to `local`, see [`Client::copy_out`].
    pub fn copy_out(&self, guest_path: &str, local: &Path) -> Result<FileInfo, ClientError> {
        self.client
            .copy_out_via(self.via(), guest_path, local, &mut |_, _| {})
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
/// and usable from any thread while another thread reads output. Once the
/// exec has ended, sending fails (a session's connection carries other
/// operations by then).
#[derive(Clone)]
pub struct ExecInput {
    writer: Arc<Mutex<Option<Box<dyn Stream>>>>,
}

impl ExecInput {
    fn send(&self, msg: &Message) -> Result<(), ClientError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let w = w.as_mut().ok_or(ProtocolError::Closed)?;
        write_frame(&mut **w, msg)?;
        Ok(())
    }

    /// Stops all further sends; waits for a send in progress to finish.
    fn close(&self) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        *w = None;
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
                ClientError::Protocol(ProtocolError::Closed) => {
                    io::Error::new(io::ErrorKind::BrokenPipe, "the exec has ended")
                }
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
    /// `None` once the exec has ended.
    conn: Option<Conn>,
    /// The session the connection returns to.
    home: Option<Slot>,
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

    /// Ends the exec on this side. A connection at a request boundary goes
    /// back to its session; any other is shut down, which also fails sends
    /// blocked on it.
    fn end(&mut self) {
        self.finished = true;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.home.is_none() || !conn.in_sync {
            let _ = conn.stream.shutdown_stream(Shutdown::Both);
        }
        // After this no stale input can follow the next request.
        self.input.close();
        Client::release(self.home.as_ref(), conn);
    }

    /// The next output chunk or the exit status.
    pub fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        let Some(conn) = self.conn.as_mut().filter(|_| !self.finished) else {
            return Err(ProtocolError::Closed.into());
        };
        let event = match conn.reply() {
            Ok(Message::Stdout(b)) => return Ok(ExecEvent::Stdout(b)),
            Ok(Message::Stderr(b)) => return Ok(ExecEvent::Stderr(b)),
            Ok(Message::Exit(st)) => {
                conn.in_sync = true;
                Ok(ExecEvent::Exit(st))
            }
            Ok(other) => Err(unexpected(&other, "Stdout/Stderr/Exit")),
            Err(e) => Err(e),
        };
        self.end();
        event
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

impl Drop for ExecHandle {
    fn drop(&mut self) {
        // An unfinished exec is out of sync: end() shuts the connection
        // down, which tells the agent to kill the process group even while
        // clones of the input are still around.
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ExitKind;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::AtomicUsize;

    /// How the fake agent answers the Hello.
    #[derive(Clone, Copy)]
    enum Hello {
        Ok,
        /// `HelloOk` with another version (an older agent).
        OldVersion,
        /// A version `Error` (the agent refusing our version).
        Refuse,
    }

    /// A scripted agent on a Unix socket that serves requests one after
    /// another per connection, counting connections.
    struct FakeAgent {
        _dir: tempfile::TempDir,
        sock: PathBuf,
        connections: Arc<AtomicUsize>,
    }

    impl FakeAgent {
        fn start(hello: Hello) -> FakeAgent {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("agent.sock");
            let listener = UnixListener::bind(&sock).unwrap();
            let connections = Arc::new(AtomicUsize::new(0));
            let count = connections.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    count.fetch_add(1, Ordering::SeqCst);
                    let conn = conn.unwrap();
                    std::thread::spawn(move || serve(conn, hello));
                }
            });
            FakeAgent {
                _dir: dir,
                sock,
                connections,
            }
        }

        fn client(&self) -> Client {
            let sock = self.sock.clone();
            Client::from_connector("token", move || UnixStream::connect(&sock))
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    fn serve(mut s: UnixStream, hello: Hello) {
        let Ok(Message::Hello { .. }) = read_frame(&mut s) else {
            return;
        };
        let reply = match hello {
            Hello::Ok => Message::HelloOk {
                version: PROTOCOL_VERSION,
                agent: "fake".into(),
            },
            Hello::OldVersion => Message::HelloOk {
                version: 1,
                agent: "old".into(),
            },
            Hello::Refuse => Message::error(ErrorCode::ProtocolVersion, "agent speaks 3"),
        };
        write_frame(&mut s, &reply).unwrap();
        if !matches!(hello, Hello::Ok) {
            return;
        }
        let exit = |code| {
            Message::Exit(ExitStatus {
                kind: ExitKind::Code(code),
                timed_out: false,
            })
        };
        loop {
            let replies = match read_frame(&mut s) {
                Ok(Message::Ping { nonce }) => vec![Message::Pong { nonce }],
                Ok(Message::Exec(req)) => match req.argv[0].as_str() {
                    "missing" => vec![Message::error(ErrorCode::ExecNotFound, "missing: no")],
                    "echo" => vec![
                        Message::ExecStarted { pid: 7 },
                        Message::Stdout(req.argv[1..].join(" ").into_bytes()),
                        exit(0),
                    ],
                    "exit" => vec![
                        Message::ExecStarted { pid: 8 },
                        exit(req.argv[1].parse().unwrap()),
                    ],
                    // Starts, then the connection breaks.
                    "crash" => {
                        let _ = write_frame(&mut s, &Message::ExecStarted { pid: 9 });
                        return;
                    }
                    // Runs until the host goes away.
                    "hang" => vec![Message::ExecStarted { pid: 10 }],
                    other => panic!("fake agent cannot run {other}"),
                },
                Ok(Message::ReadFile { path }) if path == "/missing" => {
                    vec![Message::error(ErrorCode::FileNotFound, "/missing: no")]
                }
                Ok(Message::ReadFile { path }) => vec![
                    Message::FileInfo {
                        size: path.len() as u64,
                        mode: 0o644,
                    },
                    Message::FileData(path.into_bytes()),
                    Message::FileEnd,
                ],
                Ok(Message::StartMain(cmd)) if cmd.argv[0] == "missing" => {
                    vec![Message::error(ErrorCode::ExecNotFound, "missing: no")]
                }
                Ok(Message::StartMain(_)) => vec![Message::Ok],
                // Late input for an ended exec.
                Ok(Message::Stdin(_) | Message::StdinClose | Message::Signal(_)) => vec![],
                Ok(other) => panic!("fake agent got {}", other.name()),
                Err(_) => return,
            };
            for r in &replies {
                if write_frame(&mut s, r).is_err() {
                    return;
                }
            }
        }
    }

    #[test]
    fn a_session_runs_many_requests_on_one_connection() {
        let agent = FakeAgent::start(Hello::Ok);
        let session = agent.client().session().unwrap();
        for i in 0..5 {
            session.ping().unwrap();
            let out = session
                .output(ExecRequest::new(["echo", "round", &i.to_string()]), None)
                .unwrap();
            assert_eq!(out.stdout, format!("round {i}").into_bytes());
            assert!(out.status.success());
            let st = session
                .exec(ExecRequest::new(["exit", "3"]))
                .unwrap()
                .wait();
            assert_eq!(st.unwrap().code(), Some(3));
            let (data, info) = session.read_file_bytes("/etc/hostname").unwrap();
            assert_eq!(data, b"/etc/hostname");
            assert_eq!(info.mode, 0o644);
        }
        assert_eq!(agent.connections(), 1);
        // A plain client still opens one connection per operation.
        agent.client().ping().unwrap();
        agent.client().ping().unwrap();
        assert_eq!(agent.connections(), 3);
    }

    #[test]
    fn an_agent_error_does_not_poison_the_next_request() {
        let agent = FakeAgent::start(Hello::Ok);
        let session = agent.client().session().unwrap();
        let err = session.exec(ExecRequest::new(["missing"])).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ExecNotFound), "{err}");
        let out = session.output(ExecRequest::new(["echo", "after"]), None);
        assert_eq!(out.unwrap().stdout, b"after");
        let err = session.read_file_bytes("/missing").unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::FileNotFound), "{err}");
        session.ping().unwrap();
        assert_eq!(agent.connections(), 1);
    }

    #[test]
    fn a_broken_connection_is_replaced_for_the_next_request() {
        let agent = FakeAgent::start(Hello::Ok);
        let session = agent.client().session().unwrap();
        let err = session
            .exec(ExecRequest::new(["crash"]))
            .unwrap()
            .wait()
            .unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err}");
        session.ping().unwrap();
        assert_eq!(agent.connections(), 2);
        // Dropping a running exec closes its connection, too.
        drop(session.exec(ExecRequest::new(["hang"])).unwrap());
        session.ping().unwrap();
        assert_eq!(agent.connections(), 3);
    }

    #[test]
    fn concurrent_operations_on_a_session_use_extra_connections() {
        let agent = FakeAgent::start(Hello::Ok);
        let session = agent.client().session().unwrap();
        let running = session.exec(ExecRequest::new(["echo", "a"])).unwrap();
        // The session's connection is busy: this one gets its own.
        session.ping().unwrap();
        assert_eq!(running.output().unwrap().stdout, b"a");
        assert_eq!(agent.connections(), 2);
        // One connection stays idle; later requests use it.
        for _ in 0..3 {
            session.ping().unwrap();
        }
        assert_eq!(agent.connections(), 2);
    }

    #[test]
    fn input_after_the_exit_is_refused() {
        let agent = FakeAgent::start(Hello::Ok);
        let session = agent.client().session().unwrap();
        let handle = session.exec(ExecRequest::new(["echo", "x"])).unwrap();
        let input = handle.input();
        assert!(handle.wait().unwrap().success());
        assert!(matches!(
            input.write_stdin(b"late"),
            Err(ClientError::Protocol(ProtocolError::Closed))
        ));
        // Nothing stale reached the connection.
        session.ping().unwrap();
        assert_eq!(agent.connections(), 1);
    }

    #[test]
    fn start_main_is_answered_on_the_session_connection() {
        let agent = FakeAgent::start(Hello::Ok);
        let session = agent.client().session().unwrap();
        let cmd = |arg0: &str| MainCommand {
            argv: vec![arg0.into()],
            env: Default::default(),
            workdir: None,
            user: None,
        };
        let err = session.start_main(&cmd("missing")).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ExecNotFound), "{err}");
        session.start_main(&cmd("server")).unwrap();
        assert_eq!(agent.connections(), 1);
        agent.client().start_main(&cmd("server")).unwrap();
        assert_eq!(agent.connections(), 2);
    }

    #[test]
    fn a_protocol_version_mismatch_is_a_clear_error() {
        let agent = FakeAgent::start(Hello::OldVersion);
        let err = agent.client().session().unwrap_err();
        assert!(
            matches!(err, ClientError::Version { agent: 1, host } if host == PROTOCOL_VERSION),
            "{err}"
        );
        assert_eq!(err.code(), Some(ErrorCode::ProtocolVersion));
        assert!(err.to_string().contains("AGENT_PROTOCOL_VERSION"), "{err}");

        let agent = FakeAgent::start(Hello::Refuse);
        let err = agent.client().session().unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ProtocolVersion), "{err}");
    }

    /// The requests of `session_with` go out right behind the Hello, before
    /// its answer, and come back answered; a refused Hello fails the whole
    /// call with the agent's code (the agent reads nothing after it).
    #[test]
    fn requests_ride_on_the_hello() {
        use std::io::Read as _;
        use std::os::unix::net::UnixStream;
        for accept in [true, false] {
            let (host, mut agent) = UnixStream::pair().unwrap();
            let fake = std::thread::spawn(move || {
                let hello = read_frame(&mut agent).unwrap();
                assert!(matches!(hello, Message::Hello { .. }));
                // The first request is here before any answer went out.
                agent
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let first = read_frame(&mut agent).unwrap();
                assert!(matches!(first, Message::SetHostname(_)), "{first:?}");
                let queued = 1;
                if !accept {
                    write_frame(
                        &mut agent,
                        &Message::error(ErrorCode::AuthFailed, "bad token"),
                    )
                    .unwrap();
                    return (queued, 0);
                }
                write_frame(
                    &mut agent,
                    &Message::HelloOk {
                        version: PROTOCOL_VERSION,
                        agent: "fake".into(),
                    },
                )
                .unwrap();
                let mut served = 0;
                for i in 0..2 {
                    if i > 0 {
                        let next = read_frame(&mut agent).unwrap();
                        assert!(matches!(next, Message::SetHostname(_)), "{next:?}");
                    }
                    served += 1;
                    write_frame(&mut agent, &Message::Ok).unwrap();
                }
                let mut rest = Vec::new();
                agent
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                let _ = agent.read_to_end(&mut rest);
                (queued, served)
            });
            let conn = Mutex::new(Some(host));
            let client = Client::from_connector("t", move || {
                conn.lock()
                    .unwrap()
                    .take()
                    .ok_or_else(|| io::Error::other("one connection only"))
            });
            let mut made = 0;
            let got = client.session_with(&mut || {
                made += 1;
                vec![
                    Message::SetHostname("a".into()),
                    Message::SetHostname("b".into()),
                ]
            });
            let (queued, served) = fake.join().unwrap();
            assert_eq!(made, 1);
            assert_eq!(queued, 1, "the requests came with the Hello");
            if accept {
                let (_session, results) = got.unwrap();
                assert_eq!(results.len(), 2);
                assert!(results.iter().all(Result::is_ok));
                assert_eq!(served, 2);
            } else {
                let err = got.map(|_| ()).unwrap_err();
                assert_eq!(err.code(), Some(ErrorCode::AuthFailed), "{err}");
                assert_eq!(served, 0);
            }
        }
    }
}
