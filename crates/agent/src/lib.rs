//! ferry's guest agent.
//!
//! Runs as PID 1 inside each microVM ([`init`]), and serves the
//! [`ferry_protocol`] over vsock ([`server`], one thread per connection).
//! The server works over any [`ferry_protocol::Stream`], so everything but
//! the PID 1 duties is exercised on the host over Unix sockets.
//!
//! # Building
//!
//! The agent is the initramfs `/init`, so it must be fully static. No musl
//! target is needed; glibc's static linking works because the agent never
//! calls into NSS (users and groups are parsed from `/etc/passwd` and
//! `/etc/group` directly):
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
//!     cargo build --release -p ferry-agent --target x86_64-unknown-linux-gnu
//! # -> target/x86_64-unknown-linux-gnu/release/ferry-agent
//! ```
//!
//! The explicit `--target` matters: with it, `RUSTFLAGS` applies only to
//! the agent and not to build scripts and proc-macros, which cannot be
//! static. `cargo xtask` builds `ferry` the same way (no loader, no start-up
//! relocations: fewer page faults each time a VMM or command starts).

#![warn(missing_docs)]

pub mod error;
pub mod exec;
pub mod files;
pub mod forward;
pub mod init;
pub mod log;
pub mod main_process;
pub mod net;
pub mod process;
pub mod reaper;
pub mod server;
pub mod spawn;
pub mod system;
pub mod tools;
pub mod users;
pub mod vsock;

pub use error::AgentError;
pub use server::{Listener, Server};
