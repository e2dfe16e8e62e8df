//! Byte streams the protocol runs over, and the host-side vsock handshake.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A bidirectional byte stream that can be split into a reader and a writer
/// and shut down from another thread. It is a socket, so it can be polled.
///
/// Implemented for [`UnixStream`] (host side, tests) and by the agent for
/// its vsock connections.
pub trait Stream: Read + Write + AsFd + Send + 'static {
    /// A second handle on the same stream (e.g. via `dup`).
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    /// Shuts down one or both directions; unblocks readers on other handles.
    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()>;
    /// Sets (or clears) the read timeout.
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }

    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl Stream for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }

    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// Failure to reach the guest through the VMM's vsock Unix socket.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Connecting to or talking over the Unix socket failed.
    #[error("vsock socket {path}: {source}")]
    Io {
        /// The Unix socket path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The VMM did not answer `OK` (typically: nothing listens on the port
    /// yet, so the VMM closed the connection).
    #[error("vsock handshake for port {port} refused: {reply:?}")]
    Refused {
        /// Guest port.
        port: u32,
        /// What the VMM sent instead of `OK <n>` (possibly empty).
        reply: String,
    },
    /// No reply within the timeout.
    #[error("vsock handshake for port {port} timed out")]
    Timeout {
        /// Guest port.
        port: u32,
    },
}

/// Connects to guest vsock `port` through a Firecracker-style VMM socket:
/// writes `CONNECT <port>\n`, expects `OK <n>\n`. After that the stream
/// carries the guest connection's bytes.
///
/// The reply is read byte by byte so no guest data is consumed past the
/// newline. `timeout` bounds the handshake; it is cleared afterwards.
pub fn connect_uds(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ConnectError> {
    let io_err = |source| ConnectError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io_err)?;
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    s.set_write_timeout(Some(timeout)).map_err(io_err)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                reply.push(byte[0]);
                // A sane reply is "OK <u32>"; anything long is not one.
                if reply.len() > 64 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnectError::Timeout { port })
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(ConnectError::Refused { port, reply: text });
    }
    s.set_read_timeout(None).map_err(io_err)?;
    s.set_write_timeout(None).map_err(io_err)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn fake_vmm(
        reply: &'static [u8],
        then: &'static [u8],
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut w = s;
            if reply.is_empty() {
                // Like a VMM with no guest listener: close without a reply.
                return;
            }
            w.write_all(reply).unwrap();
            w.write_all(then).unwrap();
            // Keep the socket open until the client is done.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        (dir, path)
    }

    #[test]
    fn handshake_ok_leaves_following_bytes_unread() {
        let (_d, p) = fake_vmm(b"OK 1073741824\n", b"guest-bytes");
        let mut s = connect_uds(&p, 1024, Duration::from_secs(5)).unwrap();
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"guest-bytes");
    }

    #[test]
    fn handshake_refused() {
        let (_d, p) = fake_vmm(b"", b"");
        match connect_uds(&p, 1024, Duration::from_secs(5)) {
            Err(ConnectError::Refused { port: 1024, reply }) => assert_eq!(reply, ""),
            other => panic!("unexpected: {other:?}"),
        }
        let (_d, p) = fake_vmm(b"NO\n", b"");
        assert!(matches!(
            connect_uds(&p, 1024, Duration::from_secs(5)),
            Err(ConnectError::Refused { .. })
        ));
    }

    #[test]
    fn handshake_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(s);
        });
        let start = std::time::Instant::now();
        assert!(matches!(
            connect_uds(&path, 1024, Duration::from_millis(100)),
            Err(ConnectError::Timeout { port: 1024 })
        ));
        assert!(start.elapsed() < Duration::from_millis(450));
        t.join().unwrap();
    }

    #[test]
    fn missing_socket_is_io_error() {
        assert!(matches!(
            connect_uds(
                Path::new("/nonexistent/ferry.sock"),
                1,
                Duration::from_secs(1)
            ),
            Err(ConnectError::Io { .. })
        ));
    }
}
