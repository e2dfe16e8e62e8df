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
//! sends exactly one request and the connection serves only that operation.
//!
//! One connection per operation (rather than multiplexing) was chosen
//! because vsock connections are cheap to open, and because it keeps both
//! ends simple and robust: concurrent execs need no channel ids or
//! per-channel flow control (each stream has the kernel's own backpressure),
//! a slow reader of one exec cannot stall another, cancelling an operation
//! is just closing its connection, and a malformed frame only ever tears
//! down the one operation it belongs to.
//!
//! # Host side
//!
//! [`Client`] is a synchronous client. For example:
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
pub mod transport;

pub use auth::{constant_time_eq, Token, TOKEN_BYTES};
pub use client::{Client, ClientError, ExecEvent, ExecHandle, ExecInput, FileInfo, Output};
pub use config::{AgentConfig, MainCommand, MountSpec, NetworkConfig, RootConfig, CONFIG_PATH};
pub use error::{ErrorCode, ProtocolError};
pub use frame::{read_frame, read_raw_frame, write_frame, CHUNK_SIZE, MAX_FRAME_LEN};
pub use message::{ExecRequest, ExitKind, ExitStatus, Message, PowerAction, PtySize};
pub use splice::{splice, Spliced};
pub use transport::{connect_uds, ConnectError, Stream};

/// Version of this protocol. Bumped on any incompatible change; host and
/// agent must agree exactly.
pub const PROTOCOL_VERSION: u32 = 1;

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;
