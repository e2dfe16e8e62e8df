//! AF_VSOCK listener and stream.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use ferry_protocol::Stream;
use nix::sys::socket::{
    accept4, bind, listen, setsockopt, shutdown, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, VsockAddr,
};
use nix::sys::time::TimeVal;

use crate::server::Listener;

/// `VMADDR_CID_ANY`: accept connections addressed to any of our CIDs.
pub const VMADDR_CID_ANY: u32 = u32::MAX;

/// A listening vsock socket.
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds `cid:port` and listens.
    pub fn bind(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
        listen(&fd, Backlog::new(128)?)?;
        Ok(VsockListener { fd })
    }

    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<VsockStream> {
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(VsockStream { fd })
    }
}

impl Listener for VsockListener {
    fn accept_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.accept()?))
    }
}

/// A connected vsock socket.
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    /// Connects to `cid:port` (used by tests over the loopback transport).
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        nix::sys::socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
        Ok(VsockStream { fd })
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(&self.fd, buf)?)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // send with MSG_NOSIGNAL: a vanished peer must be an error, not SIGPIPE.
        Ok(nix::sys::socket::send(
            self.fd.as_raw_fd(),
            buf,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        )?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Stream for VsockStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
        Ok(Box::new(VsockStream {
            fd: self.fd.as_fd().try_clone_to_owned()?,
        }))
    }

    fn shutdown_stream(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => nix::sys::socket::Shutdown::Read,
            Shutdown::Write => nix::sys::socket::Shutdown::Write,
            Shutdown::Both => nix::sys::socket::Shutdown::Both,
        };
        shutdown(self.fd.as_raw_fd(), how)?;
        Ok(())
    }

    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(d) => TimeVal::new(
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                i64::from(d.subsec_micros()),
            ),
            None => TimeVal::new(0, 0),
        };
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }
}
