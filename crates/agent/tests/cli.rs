//! The `ferry-agent` binary outside PID 1: `--version` and `serve`.

use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_agent::vsock::VsockStream;
use ferry_protocol::{Client, ExecRequest, Token};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-agent");

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_agent(args: &[&str]) -> Agent {
    Agent(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn version_flag() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.starts_with("ferry-agent "), "{s}");
    assert!(
        s.contains(&format!("protocol {}", ferry_protocol::PROTOCOL_VERSION)),
        "{s}"
    );
}

#[test]
fn bad_usage_exits_2() {
    let out = Command::new(BIN).arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).arg("bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serve_on_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let token = Token::generate().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.as_hex()).unwrap();
    let sock = dir.path().join("a.sock");
    let _agent = spawn_agent(&[
        "serve",
        "--unix",
        sock.to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    let s = sock.clone();
    let client = Client::from_connector(token.as_hex(), move || UnixStream::connect(&s));
    client.wait_ready(Duration::from_secs(10)).unwrap();
    let out = client
        .output(ExecRequest::new(["sh", "-c", "echo hi; echo $PPID"]), None)
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("hi\n"), "{text}");
    assert_eq!(text.lines().nth(1).unwrap(), _agent.0.id().to_string());
}

#[test]
fn serve_on_vsock_loopback_when_available() {
    // Needs the host kernel's vsock loopback transport (CID 1).
    const VMADDR_CID_LOCAL: u32 = 1;
    let port = 40_000 + (std::process::id() % 20_000);
    let dir = tempfile::tempdir().unwrap();
    let token = Token::generate().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token.as_hex()).unwrap();
    let port_s = port.to_string();
    let mut agent = spawn_agent(&[
        "serve",
        "--vsock-port",
        &port_s,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    if let Some(st) = agent.0.try_wait().unwrap() {
        // The agent exits 2 when it cannot listen on vsock at all.
        assert_eq!(st.code(), Some(2));
        eprintln!("skipped: no vsock transport here");
        return;
    }
    if let Err(e) = VsockStream::connect(VMADDR_CID_LOCAL, port) {
        eprintln!("skipped: no vsock loopback here ({e})");
        return;
    }
    let client = Client::from_connector(token.as_hex(), move || {
        VsockStream::connect(VMADDR_CID_LOCAL, port)
    });
    client.ping().unwrap();
    let out = client
        .output(ExecRequest::new(["cat"]), Some(b"over vsock"))
        .unwrap();
    assert_eq!(out.stdout, b"over vsock");
}
