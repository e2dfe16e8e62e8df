//! End-to-end tests of the agent server and the host client over Unix
//! sockets, in one process that plays both sides.
//!
//! The process is a child subreaper with the agent's reaper running, like
//! the agent in a guest, so it must not spawn processes other than through
//! the server.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_agent::main_process::{MainSlot, MainWatch};
use ferry_agent::reaper::Reaper;
use ferry_agent::server::Server;
use ferry_agent::system::{LinuxSystem, SystemOps};
use ferry_protocol::{
    read_frame, write_frame, Client, ErrorCode, ExecEvent, ExecRequest, ExitKind, MainCommand,
    Message, PowerAction, Token, PROTOCOL_VERSION,
};

fn reaper() -> Reaper {
    static R: OnceLock<Reaper> = OnceLock::new();
    R.get_or_init(|| {
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        Reaper::start().unwrap()
    })
    .clone()
}

#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<String>>,
}

impl SystemOps for Recording {
    fn sync(&self) -> std::io::Result<()> {
        self.calls.lock().unwrap().push("sync".into());
        Ok(())
    }
    fn set_clock(&self, ns: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push(format!("clock {ns}"));
        Ok(())
    }
    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        self.calls.lock().unwrap().push(format!("hostname {name}"));
        Ok(())
    }
    fn add_entropy(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("entropy {}", bytes.len()));
        Ok(())
    }
    fn power(&self, action: PowerAction) -> std::io::Result<()> {
        self.calls.lock().unwrap().push(format!("power {action:?}"));
        Ok(())
    }
}

struct Harness {
    dir: tempfile::TempDir,
    sock: PathBuf,
    token: Token,
}

impl Harness {
    fn start(system: Arc<dyn SystemOps>) -> Harness {
        Self::start_with(system, |s| s)
    }

    /// A server set up further by `configure`.
    fn start_with(system: Arc<dyn SystemOps>, configure: impl FnOnce(Server) -> Server) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let token = Token::generate().unwrap();
        let server = Arc::new(configure(Server::new(token.clone(), reaper(), system)));
        std::thread::spawn(move || server.serve(&listener));
        Harness { dir, sock, token }
    }

    fn new() -> Harness {
        Self::start(Arc::new(Recording::default()))
    }

    fn client(&self) -> Client {
        self.client_with_token(self.token.as_hex())
    }

    fn client_with_token(&self, token: &str) -> Client {
        let sock = self.sock.clone();
        Client::from_connector(token, move || UnixStream::connect(&sock))
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

fn process_gone(pid: i32, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn ping_and_wait_ready() {
    let h = Harness::new();
    let c = h.client();
    assert!(c.ping().unwrap() < Duration::from_secs(5));
    c.wait_ready(Duration::from_secs(5)).unwrap();
}

#[test]
fn stdout_stderr_and_exit_code_are_separate() {
    let h = Harness::new();
    let out = h
        .client()
        .output(sh("echo out; echo err >&2; echo more; exit 3"), None)
        .unwrap();
    assert_eq!(text(&out.stdout), "out\nmore\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));
    assert!(!out.status.timed_out);
}

#[test]
fn env_cwd_and_argv() {
    let h = Harness::new();
    let c = h.client();
    let out = c
        .output(
            ExecRequest::new(["env"])
                .env("FOO", "bar baz")
                .env("PATH", "/usr/bin:/bin"),
            None,
        )
        .unwrap();
    let env = text(&out.stdout);
    assert!(env.lines().any(|l| l == "FOO=bar baz"), "{env}");
    assert!(env.lines().any(|l| l == "PATH=/usr/bin:/bin"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("HOME=")), "{env}");
    assert!(out.status.success());

    let dir = h.dir.path().canonicalize().unwrap();
    let out = c
        .output(ExecRequest::new(["pwd"]).cwd(dir.to_str().unwrap()), None)
        .unwrap();
    assert_eq!(text(&out.stdout).trim_end(), dir.to_str().unwrap());
    let out = c.output(ExecRequest::new(["pwd"]), None).unwrap();
    assert_eq!(text(&out.stdout), "/\n");

    let out = c
        .output(
            ExecRequest::new(["sh", "-c", "printf '%s|' \"$0\" \"$@\"", "zero", "a b", ""]),
            None,
        )
        .unwrap();
    assert_eq!(text(&out.stdout), "zero|a b||");
}

#[test]
fn user_switching() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let h = Harness::new();
    let c = h.client();
    let out = c
        .output(ExecRequest::new(["id", "-u"]).user("nobody"), None)
        .unwrap();
    assert_eq!(text(&out.stdout), "65534\n");
    let out = c
        .output(
            sh("id -u; id -g; id -G; echo $HOME $USER").user("1234:4321"),
            None,
        )
        .unwrap();
    assert_eq!(text(&out.stdout), "1234\n4321\n4321\n/\n");
    let out = c.output(ExecRequest::new(["id", "-u"]), None).unwrap();
    assert_eq!(text(&out.stdout), "0\n");
    let err = c
        .exec(ExecRequest::new(["id"]).user("no-such-user-x"))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ExecUserUnknown));
}

#[test]
fn stdin_round_trip() {
    let h = Harness::new();
    let data = noise(3 * 1024 * 1024 + 17, 7);
    let out = h
        .client()
        .output(ExecRequest::new(["cat"]), Some(&data))
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data);

    // Interactive use: write, read the echo, write more, close.
    let mut handle = h
        .client()
        .exec(ExecRequest::new(["cat"]).with_stdin())
        .unwrap();
    let input = handle.input();
    input.write_stdin(b"ping\n").unwrap();
    assert_eq!(
        handle.next_event().unwrap(),
        ExecEvent::Stdout(b"ping\n".to_vec())
    );
    let mut w = handle.input();
    w.write_all(b"pong\n").unwrap();
    input.close_stdin().unwrap();
    let out = handle.output().unwrap();
    assert_eq!(text(&out.stdout), "pong\n");
    assert!(out.status.success());
}

#[test]
fn no_stdin_means_dev_null() {
    let h = Harness::new();
    let start = Instant::now();
    let out = h.client().output(ExecRequest::new(["cat"]), None).unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn signals_are_reported() {
    let h = Harness::new();
    let c = h.client();
    let out = c.output(sh("kill -TERM $$"), None).unwrap();
    assert_eq!(out.status.kind, ExitKind::Signal(libc::SIGTERM));

    let handle = c.exec(ExecRequest::new(["sleep", "30"])).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    handle.input().signal(libc::SIGINT).unwrap();
    let st = handle.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGINT));
    assert!(!st.timed_out);
}

#[test]
fn commands_start_with_every_signal_at_its_default() {
    // What an agent started from a background shell looks like: SIGINT and
    // SIGQUIT ignored. Its commands must not inherit that.
    // SAFETY: setting a disposition to SIG_IGN has no handler to run.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let h = Harness::new();
    let c = h.client();
    let ignored = |req: ExecRequest| {
        let out = c.output(req, None).unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).replace('\r', "")
    };
    let script = "grep -E '^Sig(Ign|Blk):' /proc/self/status";
    let zero = "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n";
    // posix_spawn path, then the fork path (a pty needs it).
    assert_eq!(ignored(sh(script)), zero);
    assert_eq!(ignored(sh(script).pty(24, 80)), zero);
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let h = Harness::new();
    let start = Instant::now();
    let out = h
        .client()
        .output(
            sh("sleep 30 & echo $!; sleep 30").timeout(Duration::from_millis(300)),
            None,
        )
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    assert!(out.status.timed_out);
    let bg: i32 = text(&out.stdout).trim().parse().unwrap();
    assert!(
        process_gone(bg, Duration::from_secs(5)),
        "background child {bg} survived"
    );
}

#[test]
fn background_output_holders_do_not_block_exit() {
    let h = Harness::new();
    let start = Instant::now();
    let out = h
        .client()
        .output(sh("sleep 3 & echo started"), None)
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(text(&out.stdout), "started\n");
    assert!(out.status.success());
}

#[test]
fn host_disconnect_kills_the_process() {
    let h = Harness::new();
    let mut handle = h.client().exec(sh("echo $$; exec sleep 30")).unwrap();
    let pid = match handle.next_event().unwrap() {
        ExecEvent::Stdout(b) => text(&b).trim().parse::<i32>().unwrap(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(pid as u32, handle.pid());
    drop(handle);
    assert!(process_gone(pid, Duration::from_secs(5)));
}

#[test]
fn exec_errors_have_codes() {
    let h = Harness::new();
    let c = h.client();
    let code = |r: ExecRequest| c.exec(r).unwrap_err().code();
    assert_eq!(
        code(ExecRequest::new(["no-such-binary-xyz"])),
        Some(ErrorCode::ExecNotFound)
    );
    assert_eq!(
        code(ExecRequest::new(["/no/such/path"])),
        Some(ErrorCode::ExecNotFound)
    );
    assert_eq!(
        code(ExecRequest::new(["true"]).cwd("/no/such/dir")),
        Some(ErrorCode::ExecBadCwd)
    );
    assert_eq!(
        code(ExecRequest::new(Vec::<String>::new())),
        Some(ErrorCode::ExecInvalid)
    );
    let not_exec = h.path("plain.txt");
    std::fs::write(&not_exec, "x").unwrap();
    assert_eq!(
        code(ExecRequest::new([not_exec.to_str().unwrap()])),
        Some(ErrorCode::ExecPermissionDenied)
    );
    // A script whose interpreter is missing fails at exec time.
    let script = h.path("bad.sh");
    std::fs::write(&script, "#!/no/such/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        code(ExecRequest::new([script.to_str().unwrap()])),
        Some(ErrorCode::ExecNotFound)
    );
    // The server is still fine.
    assert!(c
        .output(ExecRequest::new(["true"]), None)
        .unwrap()
        .status
        .success());
}

#[test]
fn large_output_is_complete() {
    let h = Harness::new();
    let out = h
        .client()
        .output(
            sh("head -c 5000000 /dev/zero; head -c 3000000 /dev/zero >&2"),
            None,
        )
        .unwrap();
    assert_eq!(out.stdout.len(), 5_000_000);
    assert_eq!(out.stderr.len(), 3_000_000);
    assert!(out.status.success());
}

#[test]
fn pty_mode_with_resize() {
    let h = Harness::new();
    let c = h.client();
    let out = c
        .output(
            sh("tty; stty size; test -t 0 && echo interactive; echo $TERM; echo err >&2")
                .pty(30, 100),
            None,
        )
        .unwrap();
    let o = text(&out.stdout);
    assert!(o.contains("/dev/pts/"), "{o}");
    assert!(o.contains("30 100"), "{o}");
    assert!(o.contains("interactive"), "{o}");
    assert!(o.contains("xterm-256color"), "{o}");
    assert!(o.contains("err"), "stderr goes to the pty: {o}");
    assert!(out.stderr.is_empty());

    let mut handle = c
        .exec(sh("echo ready; read x; stty size").pty(24, 80).with_stdin())
        .unwrap();
    let input = handle.input();
    let mut seen = Vec::new();
    while !text(&seen).contains("ready") {
        match handle.next_event().unwrap() {
            ExecEvent::Stdout(b) => seen.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    input.resize(40, 120).unwrap();
    input.write_stdin(b"go\n").unwrap();
    let out = handle.output().unwrap();
    assert!(
        text(&out.stdout).contains("40 120"),
        "{}",
        text(&out.stdout)
    );
    assert!(out.status.success());
}

#[test]
fn pty_stdin_close_is_eof() {
    let h = Harness::new();
    let handle = h
        .client()
        .exec(ExecRequest::new(["cat"]).pty(24, 80).with_stdin())
        .unwrap();
    let input = handle.input();
    input.write_stdin(b"hello\n").unwrap();
    input.close_stdin().unwrap();
    let out = handle.output().unwrap();
    assert!(out.status.success());
    // The terminal echoes input and cat writes it again, with CRLF.
    assert!(
        text(&out.stdout).matches("hello").count() >= 2,
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn ctrl_c_on_pty_interrupts() {
    let h = Harness::new();
    // cat itself, not a shell: shells defer SIGINT in ways that would make
    // this test about the shell rather than the terminal.
    let mut handle = h
        .client()
        .exec(ExecRequest::new(["cat"]).pty(24, 80).with_stdin())
        .unwrap();
    handle.input().write_stdin(b"x\n").unwrap();
    // Terminal echo plus cat's copy: cat is running and reading.
    let mut seen = Vec::new();
    while text(&seen).matches('x').count() < 2 {
        if let ExecEvent::Stdout(b) = handle.next_event().unwrap() {
            seen.extend_from_slice(&b);
        }
    }
    let start = Instant::now();
    handle.input().write_stdin(&[0x03]).unwrap();
    let st = handle.wait().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGINT));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn concurrent_execs() {
    let h = Harness::new();
    let c = h.client();
    let start = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                let data = noise(100_000, i + 1);
                let out = c
                    .output(sh(&format!("sleep 0.5; cat; echo {i} >&2")), Some(&data))
                    .unwrap();
                assert!(out.stdout == data, "exec {i} stdout mismatch");
                assert_eq!(text(&out.stderr), format!("{i}\n"));
                assert!(out.status.success());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Serially this would take at least 4 s.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

fn no_temp_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().contains(".ferry-"))
}

#[test]
fn file_write_read_20mb() {
    let h = Harness::new();
    let c = h.client();
    let data = noise(20 * 1024 * 1024 + 123, 99);
    let target = h.path("big.bin");
    let t = target.to_str().unwrap();
    assert_eq!(
        c.write_file(t, 0o640, false, &data[..]).unwrap(),
        data.len() as u64
    );
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert!(std::fs::read(&target).unwrap() == data);
    assert!(no_temp_files(h.dir.path()));

    let (back, info) = c.read_file_bytes(t).unwrap();
    assert_eq!(info.mode, 0o640);
    assert_eq!(info.size, data.len() as u64);
    assert!(back == data);

    // Overwrite atomically with different content and mode.
    c.write_file_bytes(t, 0o600, b"small").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"small");
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
        0o600
    );
}

#[test]
fn copy_in_and_out_keep_bytes_and_mode() {
    let h = Harness::new();
    let c = h.client();
    let local = h.path("local.sh");
    let data = noise(1_000_003, 5);
    std::fs::write(&local, &data).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o751)).unwrap();
    let guest = h.path("guest/deep/dir/copy.sh");
    c.copy_in(&local, guest.to_str().unwrap()).unwrap();
    assert!(std::fs::read(&guest).unwrap() == data);
    assert_eq!(
        std::fs::metadata(&guest).unwrap().permissions().mode() & 0o7777,
        0o751
    );

    let back = h.path("back.sh");
    let info = c.copy_out(guest.to_str().unwrap(), &back).unwrap();
    assert_eq!(info.mode, 0o751);
    assert!(std::fs::read(&back).unwrap() == data);
    assert_eq!(
        std::fs::metadata(&back).unwrap().permissions().mode() & 0o7777,
        0o751
    );
    assert!(no_temp_files(h.dir.path()));

    // A failed copy-out leaves nothing behind locally.
    let missing = h.path("never.txt");
    let err = c.copy_out("/no/such/file", &missing).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::FileNotFound));
    assert!(!missing.exists());
    assert!(no_temp_files(h.dir.path()));
}

#[test]
fn file_errors_have_codes() {
    let h = Harness::new();
    let c = h.client();
    let dir = h.dir.path().to_str().unwrap().to_string();
    let wcode = |p: &str, parents: bool| {
        c.write_file(p, 0o644, parents, &b"x"[..])
            .unwrap_err()
            .code()
    };
    assert_eq!(
        wcode(&format!("{dir}/missing/f"), false),
        Some(ErrorCode::FileNotFound)
    );
    assert_eq!(wcode(&dir, false), Some(ErrorCode::FileIsDirectory));
    assert_eq!(wcode("relative/path", false), Some(ErrorCode::FileIo));
    let rcode = |p: &str| c.read_file_bytes(p).unwrap_err().code();
    assert_eq!(
        rcode(&format!("{dir}/missing")),
        Some(ErrorCode::FileNotFound)
    );
    assert_eq!(rcode(&dir), Some(ErrorCode::FileIsDirectory));
    assert!(no_temp_files(h.dir.path()));
}

#[test]
fn interrupted_write_leaves_target_untouched() {
    let h = Harness::new();
    let target = h.path("keep.txt");
    std::fs::write(&target, "original").unwrap();
    let mut s = h.raw();
    write_frame(
        &mut s,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            token: h.token.as_hex().into(),
        },
    )
    .unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::HelloOk { .. }
    ));
    write_frame(
        &mut s,
        &Message::WriteFile {
            path: target.to_str().unwrap().into(),
            mode: 0o644,
            create_parents: false,
        },
    )
    .unwrap();
    assert_eq!(read_frame(&mut s).unwrap(), Message::Ok);
    write_frame(&mut s, &Message::FileData(b"partial".to_vec())).unwrap();
    drop(s);
    let start = Instant::now();
    while !no_temp_files(h.dir.path()) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(no_temp_files(h.dir.path()));
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "original");
}

#[test]
fn system_requests_reach_system_ops() {
    let rec = Arc::new(Recording::default());
    let h = Harness::start(rec.clone());
    let c = h.client();
    c.sync().unwrap();
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
    c.set_clock(t).unwrap();
    c.add_entropy(&[1; 64]).unwrap();
    c.set_hostname("web-1").unwrap();
    c.power(PowerAction::Reboot).unwrap();
    assert_eq!(
        *rec.calls.lock().unwrap(),
        vec![
            "sync".to_string(),
            "clock 1700000000123456789".into(),
            "entropy 64".into(),
            "hostname web-1".into(),
            "power Reboot".into()
        ]
    );
}

#[test]
fn real_system_syncs_and_refuses_power_outside_pid1() {
    let h = Harness::start(Arc::new(LinuxSystem::new(None)));
    let c = h.client();
    c.sync().unwrap();
    let err = c.power(PowerAction::Poweroff).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PowerFailed));
}

#[test]
fn bad_token_is_rejected() {
    let h = Harness::new();
    let wrong = Token::generate().unwrap();
    for t in [wrong.as_hex(), "", "short"] {
        let err = h.client_with_token(t).ping().unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::AuthFailed), "{err}");
        assert!(err.to_string().contains("AGENT_AUTH_FAILED"));
    }
    // Nothing but the Hello is served without a valid token.
    let mut s = h.raw();
    write_frame(
        &mut s,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            token: wrong.as_hex().into(),
        },
    )
    .unwrap();
    // The agent may already have answered and closed: then this fails.
    let _ = write_frame(&mut s, &Message::Exec(ExecRequest::new(["true"])));
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::Error {
            code: ErrorCode::AuthFailed,
            ..
        }
    ));
    assert!(
        read_frame(&mut s).is_err(),
        "connection must be closed after a failed Hello"
    );
    // A request before any Hello is refused too.
    let mut s = h.raw();
    write_frame(&mut s, &Message::Ping { nonce: 1 }).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::Error {
            code: ErrorCode::Unexpected,
            ..
        }
    ));
}

#[test]
fn version_mismatch_is_rejected() {
    let h = Harness::new();
    let mut s = h.raw();
    write_frame(
        &mut s,
        &Message::Hello {
            version: PROTOCOL_VERSION + 1,
            token: h.token.as_hex().into(),
        },
    )
    .unwrap();
    match read_frame(&mut s).unwrap() {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::ProtocolVersion);
            assert!(message.contains(&PROTOCOL_VERSION.to_string()), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // A future Hello may carry different fields after the version; the
    // version error must still come out.
    let mut s = h.raw();
    let mut frame = Vec::new();
    let payload = [99u32.to_le_bytes().as_slice(), b"\xff\xff"].concat();
    frame.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    frame.push(0x01);
    frame.extend_from_slice(&payload);
    s.write_all(&frame).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::Error {
            code: ErrorCode::ProtocolVersion,
            ..
        }
    ));
}

#[test]
fn malformed_frames_are_rejected_without_harm() {
    let h = Harness::new();
    let expect_error = |bytes: &[u8], want: ErrorCode, after_hello: bool| {
        let mut s = h.raw();
        if after_hello {
            write_frame(
                &mut s,
                &Message::Hello {
                    version: PROTOCOL_VERSION,
                    token: h.token.as_hex().into(),
                },
            )
            .unwrap();
            assert!(matches!(
                read_frame(&mut s).unwrap(),
                Message::HelloOk { .. }
            ));
        }
        let _ = s.write_all(bytes);
        match read_frame(&mut s) {
            Ok(Message::Error { code, .. }) => assert_eq!(code, want, "for {bytes:?}"),
            other => panic!("for {bytes:?}: {other:?}"),
        }
    };
    // Oversized length.
    expect_error(&u32::MAX.to_le_bytes(), ErrorCode::FrameTooLarge, false);
    expect_error(&u32::MAX.to_le_bytes(), ErrorCode::FrameTooLarge, true);
    // Zero length.
    expect_error(&[0, 0, 0, 0], ErrorCode::Malformed, false);
    // Hello too short to hold a version.
    expect_error(&[2, 0, 0, 0, 0x01, 7], ErrorCode::Malformed, false);
    // Hello with a bad token encoding (string length beyond payload).
    let bad_token = [
        [9, 0, 0, 0, 0x01].as_slice(),
        &PROTOCOL_VERSION.to_le_bytes(),
        &[200, 0, 0, 0],
    ]
    .concat();
    expect_error(&bad_token, ErrorCode::Malformed, false);
    // Unknown request type after a good Hello.
    expect_error(&[1, 0, 0, 0, 0x7f], ErrorCode::Malformed, true);
    // Known type with garbage payload.
    expect_error(&[3, 0, 0, 0, 0x10, 1, 2], ErrorCode::Malformed, true);
    // A reply type sent as a request.
    let mut s = h.raw();
    write_frame(
        &mut s,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            token: h.token.as_hex().into(),
        },
    )
    .unwrap();
    read_frame(&mut s).unwrap();
    write_frame(&mut s, &Message::Pong { nonce: 1 }).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::Error {
            code: ErrorCode::Unexpected,
            ..
        }
    ));
    // Truncated frame then hang-up: no reply needed, but no harm either.
    let mut s = h.raw();
    s.write_all(&[50, 0, 0, 0, 0x01, 1]).unwrap();
    drop(s);
    // Garbage during a running exec is skipped; the exec completes.
    let mut s = h.raw();
    write_frame(
        &mut s,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            token: h.token.as_hex().into(),
        },
    )
    .unwrap();
    read_frame(&mut s).unwrap();
    write_frame(
        &mut s,
        &Message::Exec(ExecRequest::new(["cat"]).with_stdin()),
    )
    .unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Message::ExecStarted { .. }
    ));
    s.write_all(&[3, 0, 0, 0, 0x12, 9, 9]).unwrap();
    write_frame(&mut s, &Message::Stdin(b"ok".to_vec())).unwrap();
    write_frame(&mut s, &Message::StdinClose).unwrap();
    assert_eq!(read_frame(&mut s).unwrap(), Message::Stdout(b"ok".to_vec()));
    assert!(matches!(read_frame(&mut s).unwrap(), Message::Exit(st) if st.success()));

    // After all that the server is healthy.
    h.client().ping().unwrap();
    assert!(h
        .client()
        .output(ExecRequest::new(["true"]), None)
        .unwrap()
        .status
        .success());
}

#[test]
fn stdin_held_by_a_lingering_descendant_does_not_hang_the_exec() {
    let h = Harness::new();
    let handle = h
        .client()
        // fd 3 keeps the stdin pipe for the background job, which would
        // otherwise get /dev/null.
        .exec(sh("exec 3<&0; sleep 3 0<&3 3<&- & echo bye").with_stdin())
        .unwrap();
    let input = handle.input();
    // Far more than a pipe holds; nobody reads it.
    let feeder = std::thread::spawn(move || input.write_stdin(&vec![b'x'; 4 << 20]));
    let start = Instant::now();
    let out = handle.output().unwrap();
    assert_eq!(text(&out.stdout), "bye\n");
    assert!(out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // The agent closed the connection, so the host's writes fail instead of
    // blocking forever.
    assert!(feeder.join().unwrap().is_err());
}

/// A client whose connections are counted.
fn counting_client(h: &Harness) -> (Client, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let count = Arc::new(AtomicUsize::new(0));
    let sock = h.sock.clone();
    let c = count.clone();
    let client = Client::from_connector(h.token.as_hex(), move || {
        c.fetch_add(1, Ordering::SeqCst);
        UnixStream::connect(&sock)
    });
    (client, count)
}

#[test]
fn a_session_serves_every_kind_of_request_on_one_connection() {
    use std::sync::atomic::Ordering;
    let h = Harness::new();
    let (client, connections) = counting_client(&h);
    let session = client.session().unwrap();
    for i in 0..20 {
        let st = session.exec(ExecRequest::new(["true"])).unwrap().wait();
        assert!(st.unwrap().success(), "exec {i}");
    }
    let out = session
        .output(sh("echo out; echo err >&2; exit 3"), None)
        .unwrap();
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status.code()),
        ("out\n".into(), "err\n".into(), Some(3))
    );
    let data = noise(300_000, 7);
    let out = session
        .output(ExecRequest::new(["cat"]), Some(&data))
        .unwrap();
    assert!(out.stdout == data);
    let out = session
        .output(
            ExecRequest::new(["sh", "-c", "echo $FOO; pwd"])
                .env("FOO", "bar")
                .cwd("/tmp"),
            None,
        )
        .unwrap();
    assert_eq!(text(&out.stdout), "bar\n/tmp\n");
    let out = session
        .output(sh("tty; kill -9 $$").pty(24, 80), None)
        .unwrap();
    assert!(text(&out.stdout).starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(out.status.signal(), Some(9));
    let out = session
        .output(
            ExecRequest::new(["sleep", "5"]).timeout(Duration::from_millis(200)),
            None,
        )
        .unwrap();
    assert!(out.status.timed_out);
    let target = h.path("session.bin");
    let target = target.to_str().unwrap();
    session.write_file_bytes(target, 0o640, &data).unwrap();
    assert_eq!(session.read_file_bytes(target).unwrap().0, data);
    session.sync().unwrap();
    session.ping().unwrap();
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

#[test]
fn errors_in_a_session_leave_it_usable() {
    use std::sync::atomic::Ordering;
    let h = Harness::new();
    let (client, connections) = counting_client(&h);
    let session = client.session().unwrap();
    let codes = [
        session
            .exec(ExecRequest::new(["no-such-program"]))
            .unwrap_err(),
        session
            .exec(ExecRequest::new(["true"]).cwd("/nonexistent"))
            .unwrap_err(),
        session
            .exec(ExecRequest::new(["true"]).user("no-such-user"))
            .unwrap_err(),
        session.read_file_bytes("/nonexistent/file").unwrap_err(),
        session
            .write_file_bytes("/nonexistent/dir/file", 0o600, b"x")
            .unwrap_err(),
    ]
    .map(|e| e.code());
    assert_eq!(
        codes,
        [
            Some(ErrorCode::ExecNotFound),
            Some(ErrorCode::ExecBadCwd),
            Some(ErrorCode::ExecUserUnknown),
            Some(ErrorCode::FileNotFound),
            Some(ErrorCode::FileNotFound),
        ]
    );
    let out = session.output(ExecRequest::new(["echo", "still fine"]), None);
    assert_eq!(text(&out.unwrap().stdout), "still fine\n");
    // Input sent after its exec ended is ignored, not taken as a request.
    let handle = session
        .exec(ExecRequest::new(["true"]).with_stdin())
        .unwrap();
    let input = handle.input();
    assert!(handle.wait().unwrap().success());
    assert!(input.write_stdin(b"late").is_err());
    let mut s = h.raw();
    write_frame(
        &mut s,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            token: h.token.as_hex().into(),
        },
    )
    .unwrap();
    read_frame(&mut s).unwrap();
    write_frame(&mut s, &Message::Stdin(b"late".to_vec())).unwrap();
    write_frame(&mut s, &Message::Signal(9)).unwrap();
    write_frame(&mut s, &Message::Ping { nonce: 5 }).unwrap();
    assert_eq!(read_frame(&mut s).unwrap(), Message::Pong { nonce: 5 });
    session.ping().unwrap();
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    // Abandoning a running exec closes its connection and kills it; the
    // session connects afresh.
    let handle = session.exec(ExecRequest::new(["sleep", "30"])).unwrap();
    let pid = handle.pid() as i32;
    drop(handle);
    assert!(process_gone(pid, Duration::from_secs(5)));
    session.ping().unwrap();
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[test]
fn spawn_paths_agree_on_environment_signals_and_scripts() {
    let h = Harness::new();
    let c = h.client();
    // The same command with and without a pty (two ways of starting a
    // process) sees the same environment, in the same order, and an empty
    // signal mask with SIGPIPE at its default.
    let script = "env; grep -E '^Sig(Blk|Ign)' /proc/self/status";
    let pipe = c
        .output(sh(script).env("ZZ", "1").env("AA", "2"), None)
        .unwrap();
    let pty = c
        .output(sh(script).env("ZZ", "1").env("AA", "2").pty(24, 80), None)
        .unwrap();
    let lines = |b: &[u8]| -> Vec<String> {
        text(b)
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| !l.starts_with("TERM=") && !l.starts_with("PWD="))
            .collect()
    };
    assert_eq!(lines(&pipe.stdout), lines(&pty.stdout));
    assert!(
        text(&pipe.stdout).contains("SigBlk:\t0000000000000000"),
        "{}",
        text(&pipe.stdout)
    );
    // A script without `#!` runs through /bin/sh, as execvp does.
    let script = h.path("no-shebang");
    std::fs::write(&script, "echo from-sh $1\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = c
        .output(ExecRequest::new([script.to_str().unwrap(), "arg"]), None)
        .unwrap();
    assert_eq!(text(&out.stdout), "from-sh arg\n");
    assert!(out.status.success());
}

fn main_command(argv: &[&str]) -> MainCommand {
    MainCommand {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Default::default(),
        workdir: None,
        user: None,
    }
}

/// A server that may start a main process, the supervisor's side of it,
/// and the file standing in for the console.
struct MainHarness {
    h: Harness,
    main: MainWatch,
    console: tempfile::NamedTempFile,
}

fn main_harness(taken: bool) -> MainHarness {
    let (tx, rx) = std::sync::mpsc::channel();
    let console = tempfile::NamedTempFile::new().unwrap();
    let h = Harness::start_with(Arc::new(Recording::default()), |s| {
        s.with_main(Arc::new(
            MainSlot::new(tx, taken).with_output(console.path()),
        ))
    });
    MainHarness {
        h,
        main: MainWatch::new(None, rx),
        console,
    }
}

/// Polls like the PID 1 supervisor until the main process has ended.
fn wait_main_exit(main: &mut MainWatch, within: Duration) -> Option<ExitKind> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(kind) = main.poll() {
            return Some(kind);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn start_main_runs_the_command_and_its_exit_reaches_the_supervisor() {
    let MainHarness {
        h,
        mut main,
        console,
    } = main_harness(false);
    let session = h.client().session().unwrap();
    assert_eq!(main.poll(), None);

    // A command that cannot start is reported and leaves the slot free.
    let err = session
        .start_main(&main_command(&["no-such-program"]))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ExecNotFound), "{err}");
    let mut bad_cwd = main_command(&["true"]);
    bad_cwd.workdir = Some("/nonexistent".into());
    let err = session.start_main(&bad_cwd).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ExecBadCwd), "{err}");
    assert_eq!(main.poll(), None);
    assert_eq!(main.pid(), None);

    let dir = h.dir.path().canonicalize().unwrap();
    let mut cmd = main_command(&["sh", "-c", "echo \"out $WHO $(pwd)\"; echo err >&2; exit 7"]);
    cmd.env.insert("WHO".into(), "main".into());
    cmd.workdir = Some(dir.to_str().unwrap().into());
    session.start_main(&cmd).unwrap();
    let err = session.start_main(&cmd).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MainAlreadyRunning), "{err}");

    assert_eq!(
        wait_main_exit(&mut main, Duration::from_secs(10)),
        Some(ExitKind::Code(7))
    );
    assert_eq!(
        std::fs::read_to_string(console.path()).unwrap(),
        format!("out main {}\nerr\n", dir.display())
    );
    // Still refused once it has ended: by then the VM is powering off.
    let err = h.client().start_main(&main_command(&["true"])).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MainAlreadyRunning), "{err}");
    session.ping().unwrap();
}

#[test]
fn a_main_process_outlives_its_connection_until_killed() {
    let MainHarness {
        h,
        mut main,
        console: _console,
    } = main_harness(false);
    h.client()
        .start_main(&main_command(&["sleep", "30"]))
        .unwrap();
    // Adopted by the supervisor as soon as it polls.
    assert_eq!(main.poll(), None);
    let pid = main.pid().expect("handed to the supervisor");
    assert!(!process_gone(pid, Duration::from_millis(300)));
    let err = h
        .client()
        .start_main(&main_command(&["sleep", "30"]))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MainAlreadyRunning), "{err}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(
        wait_main_exit(&mut main, Duration::from_secs(10)),
        Some(ExitKind::Signal(libc::SIGTERM))
    );
}

#[test]
fn signal_main_reaches_the_main_process_and_only_while_it_runs() {
    let MainHarness {
        h,
        mut main,
        console: _console,
    } = main_harness(false);
    let session = h.client().session().unwrap();
    let err = h.client().signal_main(15).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MainNotRunning), "{err}");
    session.start_main(&main_command(&["sleep", "30"])).unwrap();
    // Let the supervisor take it over, as PID 1's loop does.
    assert_eq!(main.poll(), None);
    let err = h.client().signal_main(12345).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ExecInvalid), "{err}");
    h.client().signal_main(15).unwrap();
    assert_eq!(
        wait_main_exit(&mut main, Duration::from_secs(10)),
        Some(ExitKind::Signal(15))
    );
    // Reaped: never a signal to whatever reuses its pid.
    let err = h.client().signal_main(15).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MainNotRunning), "{err}");
}

#[test]
fn concurrent_start_mains_start_one_process() {
    let MainHarness {
        h,
        mut main,
        console: _console,
    } = main_harness(false);
    let results: Vec<_> = (0..4)
        .map(|_| {
            let c = h.client();
            std::thread::spawn(move || c.start_main(&main_command(&["true"])))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap().map_err(|e| e.code()))
        .collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(results
        .iter()
        .all(|r| r.is_ok() || *r == Err(Some(ErrorCode::MainAlreadyRunning))));
    assert_eq!(
        wait_main_exit(&mut main, Duration::from_secs(10)),
        Some(ExitKind::Code(0))
    );
}

#[test]
fn start_main_is_refused_with_a_boot_time_main_or_outside_pid1() {
    let MainHarness {
        h,
        mut main,
        console: _console,
    } = main_harness(true);
    let err = h.client().start_main(&main_command(&["true"])).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MainAlreadyRunning), "{err}");
    assert_eq!(main.poll(), None);

    let h = Harness::new();
    let err = h.client().start_main(&main_command(&["true"])).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ExecFailed), "{err}");
    assert!(err.to_string().contains("PID 1"), "{err}");
}

#[test]
fn a_batch_stages_files_and_runs_steps_while_they_succeed() {
    use ferry_protocol::StagedFile;
    let h = Harness::new();
    let c = h.client();
    let dir = h.path("batch");
    let script = format!("{}/sub/job.sh", dir.display());
    let staged = vec![StagedFile {
        path: script.clone(),
        mode: 0o755,
        data: b"#!/bin/sh\necho job $1\n".to_vec(),
    }];
    // All steps run while each succeeds; the status is the last one's.
    let out = c
        .batch_output(
            staged.clone(),
            vec![
                ExecRequest::new([script.as_str(), "one"]),
                sh("echo then; exit 4"),
            ],
        )
        .unwrap();
    assert_eq!(text(&out.stdout), "job one\nthen\n");
    assert_eq!(out.status.code(), Some(4));
    let mode = std::fs::metadata(&script).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o755
    );
    // A failing step stops the batch.
    let out = c
        .batch_output(Vec::new(), vec![sh("echo first; exit 2"), sh("echo never")])
        .unwrap();
    assert_eq!(text(&out.stdout), "first\n");
    assert_eq!(out.status.code(), Some(2));
    // A later step that cannot start is an error after the output before it.
    let err = c
        .batch_output(
            Vec::new(),
            vec![sh("true"), ExecRequest::new(["/no/such/program"])],
        )
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(ferry_protocol::ErrorCode::ExecNotFound),
        "{err}"
    );
    // A file that cannot be written is an error and runs nothing.
    let marker = h.path("ran");
    let err = c
        .batch_output(
            vec![StagedFile {
                path: "relative/path".into(),
                mode: 0o644,
                data: Vec::new(),
            }],
            vec![sh(&format!("touch {}", marker.display()))],
        )
        .unwrap_err();
    assert!(err.code().is_some(), "{err}");
    assert!(!marker.exists());
    // The connection stays usable.
    assert!(c.ping().is_ok());
}

#[test]
fn stat_tells_files_from_directories() {
    let h = Harness::new();
    let c = h.client();
    let dir = h.path("stat-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("f");
    std::fs::write(&file, b"12345").unwrap();
    let (_, mode) = c.stat(dir.to_str().unwrap()).unwrap();
    assert_eq!(mode & 0o170000, 0o040000);
    let (size, mode) = c.stat(file.to_str().unwrap()).unwrap();
    assert_eq!((size, mode & 0o170000), (5, 0o100000));
    let err = c.stat(dir.join("missing").to_str().unwrap()).unwrap_err();
    assert_eq!(err.code(), Some(ferry_protocol::ErrorCode::FileNotFound));
}
