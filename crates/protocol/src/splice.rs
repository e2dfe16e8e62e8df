//! Copying bytes both ways between two streams: the data phase of a
//! [`Message::Forward`](crate::Message::Forward) connection, on the host and
//! in the guest.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use crate::transport::Stream;

/// Buffer size of each direction.
const BUF_SIZE: usize = 64 << 10;

/// Bytes moved by [`splice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spliced {
    /// From the first stream to the second.
    pub a_to_b: u64,
    /// From the second stream to the first.
    pub b_to_a: u64,
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended, one
/// thread per direction (this one and a helper), with blocking I/O.
///
/// End of file is passed on as a shutdown of the other stream's write side,
/// so a half-closed conversation (a client that sends its request and shuts
/// down its side, then reads the answer) works. An error in either direction
/// shuts both streams down completely so the other direction ends too, and
/// is returned.
pub fn splice(a: Box<dyn Stream>, b: Box<dyn Stream>) -> io::Result<Spliced> {
    let a2 = a.try_clone_stream()?;
    let b2 = b.try_clone_stream()?;
    let helper = std::thread::Builder::new()
        .name("splice".into())
        .spawn(move || pump(a2, b2))?;
    let back = pump(b, a);
    let forth = helper
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("splice thread panicked")));
    Ok(Spliced {
        a_to_b: forth?,
        b_to_a: back?,
    })
}

/// Copies `from` into `to` until end of file, then shuts down `to`'s write
/// side. On error, shuts both streams down in both directions.
fn pump(mut from: Box<dyn Stream>, mut to: Box<dyn Stream>) -> io::Result<u64> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    let result = loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            break Err(e);
        }
        total += n as u64;
    };
    match result {
        Ok(total) => {
            // The peer may already be gone; that is the other direction's business.
            let _ = to.shutdown_stream(Shutdown::Write);
            Ok(total)
        }
        Err(e) => {
            let _ = from.shutdown_stream(Shutdown::Both);
            let _ = to.shutdown_stream(Shutdown::Both);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn boxed(s: UnixStream) -> Box<dyn Stream> {
        Box::new(s)
    }

    #[test]
    fn copies_both_ways_with_half_close() {
        // client <-> [a | splice | b] <-> server
        let (mut client, a) = UnixStream::pair().unwrap();
        let (b, mut server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || splice(boxed(a), boxed(b)).unwrap());
        let request = vec![7u8; 300_000];
        let sent = request.clone();
        let writer = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).unwrap();
            answer
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, request, "request arrives whole, then end of file");
        // The server answers after the client's half-close.
        server.write_all(b"answer").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        assert_eq!(writer.join().unwrap(), b"answer");
        assert_eq!(
            t.join().unwrap(),
            Spliced {
                a_to_b: 300_000,
                b_to_a: 6
            }
        );
    }

    #[test]
    fn an_error_on_one_side_ends_both_directions() {
        let (client, a) = UnixStream::pair().unwrap();
        let (b, server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || splice(boxed(a), boxed(b)));
        // The server vanishes while the client keeps its side open: writing
        // to it fails, and the client must see its connection end.
        drop(server);
        let mut c = client;
        let _ = c.write_all(&[1u8; 1 << 20]);
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        let r = t.join().unwrap();
        assert!(
            r.is_err(),
            "writing to the vanished server must fail: {r:?}"
        );
    }
}
