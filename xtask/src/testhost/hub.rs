//! A loopback Ethernet hub joining test hosts.
//!
//! Each QEMU connects with `-netdev socket,connect=127.0.0.1:PORT`; frames arrive as
//! a 4-byte big-endian length followed by the frame. The hub repeats every frame to
//! every other host, which is all a handful of hosts on one segment need.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// Largest frame accepted (jumbo frames are not used).
const MAX_FRAME: usize = 65_536;

/// A running hub; it lives until the process exits.
pub struct Hub {
    /// The loopback port hosts connect to.
    pub port: u16,
}

type Peers = Arc<Mutex<Vec<(usize, TcpStream)>>>;

impl Hub {
    /// Starts a hub on an ephemeral loopback port.
    pub fn start() -> std::io::Result<Hub> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let peers: Peers = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn(move || {
            for (id, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_nodelay(true);
                let Ok(writer) = stream.try_clone() else {
                    continue;
                };
                peers.lock().expect("hub lock").push((id, writer));
                let peers = peers.clone();
                std::thread::spawn(move || forward(id, stream, peers));
            }
        });
        Ok(Hub { port })
    }
}

fn forward(id: usize, mut stream: TcpStream, peers: Peers) {
    let mut len = [0u8; 4];
    let mut frame = vec![0u8; MAX_FRAME];
    loop {
        if stream.read_exact(&mut len).is_err() {
            break;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME || stream.read_exact(&mut frame[..n]).is_err() {
            break;
        }
        let mut peers = peers.lock().expect("hub lock");
        // A peer that cannot take a frame has gone away: drop it.
        peers.retain_mut(|(pid, w)| {
            *pid == id || (w.write_all(&len).is_ok() && w.write_all(&frame[..n]).is_ok())
        });
    }
    peers
        .lock()
        .expect("hub lock")
        .retain(|(pid, _)| *pid != id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(s: &mut TcpStream, payload: &[u8]) {
        s.write_all(&(payload.len() as u32).to_be_bytes()).unwrap();
        s.write_all(payload).unwrap();
    }

    fn recv(s: &mut TcpStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn frames_reach_every_other_host_but_not_the_sender() {
        let hub = Hub::start().unwrap();
        let connect = || TcpStream::connect(("127.0.0.1", hub.port)).unwrap();
        let (mut a, mut b, mut c) = (connect(), connect(), connect());
        // Wait until all three are registered.
        std::thread::sleep(std::time::Duration::from_millis(200));
        send(&mut a, b"from-a");
        assert_eq!(recv(&mut b), b"from-a");
        assert_eq!(recv(&mut c), b"from-a");
        send(&mut b, b"from-b");
        assert_eq!(recv(&mut a), b"from-b");
        assert_eq!(recv(&mut c), b"from-b");
        a.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert!(
            a.read(&mut byte).is_err(),
            "sender must not get its own frame"
        );
    }
}
