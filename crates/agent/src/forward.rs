//! The `Forward` operation: connect to a TCP port on the guest's loopback
//! and splice it with the host's connection.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use ferry_protocol::{splice, write_frame, ErrorCode, Message, Stream};

use crate::agent_log;

/// How long connecting to the guest port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `127.0.0.1:port`, answers `Ok` (or an `Error`), then copies
/// bytes both ways until both directions have ended.
pub fn run(mut conn: Box<dyn Stream>, port: u16) {
    let Some(tcp) = connect(&mut conn, SocketAddr::from((Ipv4Addr::LOCALHOST, port))) else {
        return;
    };
    if let Err(e) = splice(conn, Box::new(tcp)) {
        // Resets are how clients and servers often end; only note the odd ones.
        if !matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ) {
            agent_log!("forward to port {port}: {e}");
        }
    }
}

/// Connects to `addr` and sends the reply; returns the connected socket
/// when the host was told `Ok`.
fn connect(conn: &mut Box<dyn Stream>, addr: SocketAddr) -> Option<TcpStream> {
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            write_frame(conn, &Message::Ok).ok()?;
            Some(tcp)
        }
        Err(e) => {
            let _ = write_frame(
                conn,
                &Message::error(error_code(&e), format!("{addr}: {e}")),
            );
            None
        }
    }
}

/// The protocol error for a failed connect.
pub fn error_code(e: &io::Error) -> ErrorCode {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorCode::ForwardRefused,
        _ => ErrorCode::ForwardFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_map_to_codes() {
        assert_eq!(
            error_code(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            ErrorCode::ForwardRefused
        );
        assert_eq!(
            error_code(&io::Error::from(io::ErrorKind::TimedOut)),
            ErrorCode::ForwardFailed
        );
    }
}
