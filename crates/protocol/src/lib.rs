//! Wire protocol spoken between ferry and its guest agent over vsock.
//!
//! # Wire format
//!
//! Every message is one frame: a `u32` little-endian length (of what
//! follows), a type byte, and a payload in a compact hand-written
//! little-endian encoding ([`codec`]). Frames over [`MAX_FRAME_LEN`] are
//! refused, so neither side ever allocates on a peer's say-so beyond that.
//!
//! # Conversation
//!
//! The host opens a connection, sends [`Message::Hello`] with
//! [`PROTOCOL_VERSION`] and the per-VM [`Token`]; the agent compares the token
//! in constant time and answers `HelloOk` or an `Error` with
//! [`ErrorCode::AuthFailed`] / [`ErrorCode::ProtocolVersion`]. The host then
//! sends requests one after another: each runs to its end (a final reply
//! such as `Ok`, `Exit`, `FileWritten`, `FileEnd` or an `Error`) before the
//! next request is sent, and an `Error` ends only the operation it answers.
//! A host may close the connection after any operation; `Forward` turns the
//! connection into a raw byte stream, so it is always the last request.
//! Exec input (`Stdin`, `StdinClose`, `Resize`, `Signal`) that arrives after
//! its exec ended is ignored. Version 1 served one request per connection.
//!
//! Operations that run at the same time use separate connections rather
//! than being multiplexed over one. That keeps both ends simple and robust:
//! concurrent execs need no channel ids or per-channel flow control (each
//! stream has the kernel's own backpressure), a slow reader of one exec
//! cannot stall another, cancelling an operation is just closing its
//! connection, and a malformed frame only ever tears down the connection it
//! arrived on. Reusing a connection for consecutive operations
//! ([`Session`]) saves the vsock handshake and the Hello round trip, which
//! dominate short operations.
//!
//! # Host side
//!
//! [`Client`] is a synchronous client that opens a connection per
//! operation; [`Client::session`] gives a [`Session`] with the same
//! operations over one persistent connection. For example:
//!
//! ```no_run
//! use ferry_protocol::{Client, ExecRequest};
//! # fn main() -> Result<(), ferry_protocol::ClientError> {
//! let client = Client::connect("/run/ferry/vm1/vsock.sock", "<64 hex chars>")?;
//! let handle = client.exec(ExecRequest::new(["sh", "-c", "cat; echo done >&2"]).with_stdin())?;
//! let input = handle.input();
//! input.write_stdin(b"hello\n")?;
//! input.close_stdin()?;
//! let status = handle.wait_with(
//!     |out| print!("{}", String::from_utf8_lossy(out)),
//!     |err| eprint!("{}", String::from_utf8_lossy(err)),
//! )?;
//! assert!(status.success());
//! client.copy_in("local.txt".as_ref(), "/root/remote.txt")?;
//! client.copy_out("/etc/os-release", "os-release".as_ref())?;
//! let session = client.session()?;
//! for _ in 0..100 {
//!     assert!(session.exec(ExecRequest::new(["true"]))?.wait()?.success());
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod codec;
pub mod config;
pub mod console;
pub mod error;
pub mod frame;
pub mod message;
pub mod splice;
pub mod tools;
pub mod transport;

pub use auth::{constant_time_eq, Token, TOKEN_BYTES};
pub use client::{
    Client, ClientError, ExecEvent, ExecHandle, ExecInput, FileInfo, Output, Session,
};
pub use config::{AgentConfig, MainCommand, MountSpec, NetworkConfig, RootConfig, CONFIG_PATH};
pub use error::{ErrorCode, ProtocolError};
pub use frame::{read_frame, read_raw_frame, write_frame, CHUNK_SIZE, MAX_FRAME_LEN};
pub use message::{
    ExecRequest, ExitKind, ExitStatus, Message, PowerAction, PtySize, StagedFile, MAX_BATCH_FILES,
    MAX_BATCH_STEPS,
};
pub use splice::{splice, Spliced};
pub use transport::{connect_uds, ConnectError, Stream};

/// Version of this protocol. Bumped on any incompatible change; host and
/// agent must agree exactly. Version 2: many requests per connection.
pub const PROTOCOL_VERSION: u32 = 2;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
