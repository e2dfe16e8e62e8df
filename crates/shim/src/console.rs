//! A terminal for a process run through ferry-runc: a pty pair on this
//! host, whose master goes to the container engine over the console socket
//! it names (as runc sends it), and whose slave the keeper copies to and
//! from the pty of the process in the VM.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Opens a pty pair, sends its master to the engine listening on `socket`
/// and returns its slave, raw (the guest's pty does the line discipline).
pub fn send_master(socket: &Path) -> io::Result<File> {
    let (mut m, mut s): (RawFd, RawFd) = (-1, -1);
    // SAFETY: openpty stores the two descriptors it opened; no name
    // buffer, terminal attributes or size are passed.
    let rc = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and nothing else owns them.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    make_raw(&slave)?;
    let name = pty_name(&master);
    let stream = UnixStream::connect(socket)?;
    send_fd(&stream, master.as_raw_fd(), name.as_bytes())?;
    Ok(File::from(slave))
}

fn make_raw(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal
    // this process holds, cfmakeraw edits it, tcsetattr applies it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd.as_raw_fd(), &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The slave's path (`/dev/pts/N`), which runc sends with the master.
fn pty_name(master: &OwnedFd) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: ptsname_r writes at most buf.len() bytes, NUL-terminated.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "pty".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The terminal's size (rows, columns), if it has one.
pub fn size(tty: &File) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it for the terminal
    // `tty` holds.
    let ws = unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) != 0 {
            return None;
        }
        ws
    };
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Sends `fd` over `stream` (SCM_RIGHTS) with `payload` as the message.
fn send_fd(stream: &UnixStream, fd: RawFd, payload: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let fd_len = std::mem::size_of::<RawFd>() as u32;
    // SAFETY: CMSG_SPACE is arithmetic on a length.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below points into
    // `iov`, `payload` or `control`, which outlive sendmsg, and the one
    // control message written fits the CMSG_SPACE bytes of `control`.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(stream.as_raw_fd(), &msg, 0)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    /// Receives one descriptor and the message sent with it.
    fn recv_fd(stream: &UnixStream) -> (OwnedFd, String) {
        let mut buf = [0u8; 256];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u8; 64];
        // SAFETY: a test mirror of send_fd: pointers into live buffers.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, 0);
            assert!(n > 0);
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
            (
                OwnedFd::from_raw_fd(fd),
                String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
            )
        }
    }

    #[test]
    fn the_master_reaches_the_console_socket_and_bytes_cross_the_pair() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("console.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let mut slave = send_master(&sock).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let (master, name) = recv_fd(&conn);
        assert!(name.starts_with("/dev/pts/"), "{name}");
        let mut master = File::from(master);
        // Raw: what the engine writes arrives unchanged, no echo.
        master.write_all(b"hi\r").unwrap();
        let mut got = [0u8; 3];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi\r");
        slave.write_all(b"out").unwrap();
        let mut back = [0u8; 3];
        master.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"out");
        assert_eq!(size(&slave), None, "a fresh pty has no size");
    }
}
