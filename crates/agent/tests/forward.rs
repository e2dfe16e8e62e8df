//! The `Forward` operation end to end over a Unix socket: the host client
//! asks the agent server for a guest TCP port and talks through the
//! returned stream.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::reaper::Reaper;
use ferry_agent::server::Server;
use ferry_agent::system::LinuxSystem;
use ferry_protocol::{Client, ClientError, ErrorCode, Token};

struct Harness {
    _dir: tempfile::TempDir,
    client: Client,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let token = Token::generate().unwrap();
    let server = Arc::new(Server::new(
        token.clone(),
        Reaper::start().unwrap(),
        Arc::new(LinuxSystem::new(None)),
    ));
    std::thread::spawn(move || server.serve(&listener));
    let client = Client::from_connector(token.as_hex(), move || UnixStream::connect(&sock));
    Harness { _dir: dir, client }
}

/// A guest-side server that reads a request to end of file, then answers
/// with it upper-cased and closes.
fn upper_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                c.read_to_end(&mut req).unwrap();
                c.write_all(&req.to_ascii_uppercase()).unwrap();
            });
        }
    });
    port
}

#[test]
fn request_half_close_response() {
    let h = harness();
    let port = upper_server();
    let mut s = h.client.forward(port).unwrap();
    let req: Vec<u8> = b"hello forward ".repeat(20_000);
    s.write_all(&req).unwrap();
    s.shutdown_stream(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, req.to_ascii_uppercase());
}

#[test]
fn many_concurrent_connections() {
    let h = harness();
    let port = upper_server();
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let c = h.client.clone();
            std::thread::spawn(move || {
                let mut s = c.forward(port).unwrap();
                let req = format!("conn-{i}-").repeat(1000 + i);
                s.write_all(req.as_bytes()).unwrap();
                s.shutdown_stream(Shutdown::Write).unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).unwrap();
                assert_eq!(answer, req.to_uppercase());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn server_closing_first_ends_the_stream() {
    let h = harness();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"banner\n").unwrap();
        // Close without reading: the host side must see end of file even
        // though it never shut down its own side.
    });
    let mut s = h.client.forward(port).unwrap();
    s.set_read_timeout_stream(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"banner\n");
    server.join().unwrap();
}

#[test]
fn closed_guest_port_is_refused() {
    let h = harness();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    match h.client.forward(port) {
        Err(ClientError::Agent { code, message }) => {
            assert_eq!(code, ErrorCode::ForwardRefused);
            assert!(message.contains(&port.to_string()), "{message}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("forward to a closed port succeeded"),
    }
}
