//! Serving the protocol: accept loop, Hello, and the requests of each
//! connection, one after another.

use std::io;
use std::os::unix::net::UnixListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::{
    read_frame, read_raw_frame, write_frame, ErrorCode, Message, ProtocolError, Stream, Token,
    PROTOCOL_VERSION,
};

use crate::agent_log;
use crate::error::AgentError;
use crate::main_process::MainSlot;
use crate::reaper::Reaper;
use crate::system::SystemOps;

/// Frame type byte of `Hello` (frozen across protocol versions).
const HELLO_TYPE: u8 = 0x01;

/// How long a fresh connection may take to send its Hello and request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest silence tolerated from the host in the middle of a file transfer.
pub const TRANSFER_STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Connections served at once; more are refused so a runaway host cannot
/// exhaust the guest's threads.
pub const MAX_CONNECTIONS: usize = 1024;

/// A source of incoming connections.
pub trait Listener: Send {
    /// Waits for the next connection.
    fn accept_stream(&self) -> io::Result<Box<dyn Stream>>;
}

impl Listener for UnixListener {
    fn accept_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.accept()?.0))
    }
}

/// The agent's protocol server.
pub struct Server {
    token: Token,
    reaper: Reaper,
    system: Arc<dyn SystemOps>,
    etc_dir: PathBuf,
    /// Where `StartMain` puts the VM's main process; `None` outside PID 1,
    /// where nothing would supervise it.
    main: Option<Arc<MainSlot>>,
    active: AtomicUsize,
}

impl Server {
    /// A server accepting `token`, spawning through `reaper`.
    pub fn new(token: Token, reaper: Reaper, system: Arc<dyn SystemOps>) -> Self {
        Server {
            token,
            reaper,
            system,
            etc_dir: PathBuf::from("/etc"),
            main: None,
            active: AtomicUsize::new(0),
        }
    }

    /// Lets `StartMain` requests start the VM's main process into `slot`.
    /// Without one they are refused.
    pub fn with_main(mut self, slot: Arc<MainSlot>) -> Self {
        self.main = Some(slot);
        self
    }

    /// Where `passwd` and `group` are read from (default `/etc`).
    pub fn with_etc_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.etc_dir = dir.into();
        self
    }

    /// Accepts connections forever, one thread each. Accept errors (e.g.
    /// out of file descriptors) are logged and retried.
    pub fn serve(self: &Arc<Self>, listener: &dyn Listener) -> ! {
        loop {
            match listener.accept_stream() {
                Ok(conn) => self.spawn_handler(conn),
                Err(e) => {
                    agent_log!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Handles `conn` on a new thread.
    pub fn spawn_handler(self: &Arc<Self>, mut conn: Box<dyn Stream>) {
        if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.active.fetch_sub(1, Ordering::SeqCst);
            let _ = write_frame(
                &mut conn,
                &Message::error(ErrorCode::Internal, "too many connections"),
            );
            return;
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                this.handle(conn);
                this.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            agent_log!("cannot start connection thread: {e}");
        }
    }

    /// Serves one connection to completion. Never panics: a bug in an
    /// operation is logged and ends only that connection.
    pub fn handle(&self, conn: Box<dyn Stream>) {
        let res = catch_unwind(AssertUnwindSafe(|| self.handle_inner(conn)));
        if res.is_err() {
            agent_log!("connection handler panicked; connection dropped");
        }
    }

    fn handle_inner(&self, mut conn: Box<dyn Stream>) {
        if conn
            .set_read_timeout_stream(Some(HANDSHAKE_TIMEOUT))
            .is_err()
        {
            return;
        }
        if let Err((code, msg)) = self.hello(&mut conn) {
            let _ = write_frame(&mut conn, &Message::error(code, msg));
            return;
        }
        // Only the first request is due within the handshake timeout; a
        // session may then sit idle between requests for as long as it likes.
        let mut first = true;
        loop {
            let request = match read_frame(&mut conn) {
                Ok(m) => m,
                Err(ProtocolError::Closed) => return,
                // The frame's length was sound, so the stream is still in
                // sync: refuse this frame and go on.
                Err(e @ (ProtocolError::Malformed(_) | ProtocolError::UnknownType(_))) => {
                    if write_frame(&mut conn, &Message::error(e.code(), e.to_string())).is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    let _ = write_frame(&mut conn, &Message::error(e.code(), e.to_string()));
                    return;
                }
            };
            if first {
                first = false;
                if conn.set_read_timeout_stream(None).is_err() {
                    return;
                }
            }
            if let Message::Forward { port } = request {
                // From here on the connection carries raw bytes.
                return crate::forward::run(conn, port);
            }
            match self.dispatch(&mut conn, request) {
                Next::Request => {}
                Next::Close => return,
            }
        }
    }

    /// Validates the Hello. The version is checked before anything else in
    /// the payload, so a future Hello with other fields is still answered
    /// with a clear version error.
    fn hello(&self, conn: &mut Box<dyn Stream>) -> Result<(), (ErrorCode, String)> {
        let (t, payload) = read_raw_frame(conn).map_err(|e| (e.code(), e.to_string()))?;
        if t != HELLO_TYPE {
            return Err((
                ErrorCode::Unexpected,
                format!("expected Hello, got frame type {t:#04x}"),
            ));
        }
        let version = payload
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or((ErrorCode::Malformed, "short Hello".to_string()))?;
        if version != PROTOCOL_VERSION {
            return Err((
                ErrorCode::ProtocolVersion,
                format!("agent speaks protocol {PROTOCOL_VERSION}, host sent {version}"),
            ));
        }
        let token = match Message::decode(t, &payload) {
            Ok(Message::Hello { token, .. }) => token,
            Ok(_) => unreachable!("type byte checked above"),
            Err(e) => return Err((ErrorCode::Malformed, e.to_string())),
        };
        if !self.token.verify(&token) {
            agent_log!("rejected a connection with a wrong token");
            return Err((ErrorCode::AuthFailed, "bad token".to_string()));
        }
        write_frame(
            conn,
            &Message::HelloOk {
                version: PROTOCOL_VERSION,
                agent: env!("CARGO_PKG_VERSION").to_string(),
            },
        )
        .map_err(|e| (ErrorCode::Internal, e.to_string()))
    }

    /// Serves one request. Returns whether the connection is at a request
    /// boundary, so the next request may follow on it.
    fn dispatch(&self, conn: &mut Box<dyn Stream>, request: Message) -> Next {
        let reply = |conn: &mut Box<dyn Stream>, r: io::Result<()>, code: ErrorCode| {
            let msg = match r {
                Ok(()) => Message::Ok,
                Err(e) => Message::error(code, e.to_string()),
            };
            Next::after(write_frame(conn, &msg))
        };
        match request {
            Message::Ping { nonce } => Next::after(write_frame(conn, &Message::Pong { nonce })),
            Message::Exec(req) => {
                Next::from_bool(crate::exec::run(conn, req, &self.reaper, &self.etc_dir))
            }
            Message::ExecBatch { files, steps } => Next::from_bool(crate::exec::run_batch(
                conn,
                files,
                steps,
                &self.reaper,
                &self.etc_dir,
            )),
            Message::WriteFile {
                path,
                mode,
                create_parents,
            } => {
                let _ = conn.set_read_timeout_stream(Some(TRANSFER_STALL_TIMEOUT));
                let next = Next::from_bool(crate::files::write(conn, &path, mode, create_parents));
                match conn.set_read_timeout_stream(None) {
                    Ok(()) => next,
                    Err(_) => Next::Close,
                }
            }
            Message::ReadFile { path } => Next::from_bool(crate::files::read(conn, &path)),
            Message::Stat { path } => Next::from_bool(crate::files::stat(conn, &path)),
            Message::Sync => {
                let r = self.system.sync();
                reply(conn, r, ErrorCode::SyncFailed)
            }
            Message::SetClock { realtime_ns } => {
                let r = self.system.set_clock(realtime_ns);
                reply(conn, r, ErrorCode::ClockFailed)
            }
            Message::AddEntropy(bytes) => {
                let r = self.system.add_entropy(&bytes);
                reply(conn, r, ErrorCode::EntropyFailed)
            }
            Message::SetHostname(name) => {
                let r = self.system.set_hostname(&name);
                reply(conn, r, ErrorCode::HostnameFailed)
            }
            Message::StartMain(cmd) => {
                let msg = match self.start_main(&cmd) {
                    Ok(()) => Message::Ok,
                    Err(e) => Message::error(e.code, e.message),
                };
                Next::after(write_frame(conn, &msg))
            }
            Message::SignalMain(signal) => {
                let r = match &self.main {
                    Some(slot) => slot.signal(signal),
                    None => Err(AgentError::new(
                        ErrorCode::MainNotRunning,
                        "only an agent that is PID 1 has a main process",
                    )),
                };
                let msg = match r {
                    Ok(()) => Message::Ok,
                    Err(e) => Message::error(e.code, e.message),
                };
                Next::after(write_frame(conn, &msg))
            }
            Message::Forward { .. } => unreachable!("handled by the caller"),
            Message::Power(action) => {
                agent_log!("host requested {action:?}");
                let r = self.system.power(action);
                reply(conn, r, ErrorCode::PowerFailed)
            }
            // Input for an exec that has already ended: the host may send it
            // before it learns of the exit.
            Message::Stdin(_) | Message::StdinClose | Message::Resize(_) | Message::Signal(_) => {
                Next::Request
            }
            other => Next::after(write_frame(
                conn,
                &Message::error(
                    ErrorCode::Unexpected,
                    format!("{} is not a request", other.name()),
                ),
            )),
        }
    }

    /// Starts the VM's main process for a `StartMain` request.
    fn start_main(&self, cmd: &ferry_protocol::MainCommand) -> Result<(), AgentError> {
        let slot = self.main.as_ref().ok_or_else(|| {
            AgentError::new(
                ErrorCode::ExecFailed,
                "a main process can only be started when the agent is PID 1",
            )
        })?;
        slot.start(cmd, &self.reaper, &self.etc_dir).map(|_pid| ())
    }
}

/// What a connection does after a request.
enum Next {
    /// Wait for the next request.
    Request,
    /// Close the connection.
    Close,
}

impl Next {
    fn from_bool(in_sync: bool) -> Next {
        if in_sync {
            Next::Request
        } else {
            Next::Close
        }
    }

    /// Next request unless the reply could not be sent.
    fn after(sent: Result<(), ProtocolError>) -> Next {
        Next::from_bool(sent.is_ok())
    }
}
