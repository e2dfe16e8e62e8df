//! Drives the library API end to end against real VMs and fails loudly on
//! the first thing that is not as documented. The suite runs it in a test
//! host (`tests/testhost/api.sh`); it needs KVM, `ferry install`'s assets,
//! `ferry-vmm` and the agent.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ferry::{
    BootOptions, ChildEvent, Config, ExecOptions, ForkOptions, PortForward, RestoreOptions,
    RestoreSource, Runtime, SnapshotOptions, Vm, VmStatus,
};

type Check = Result<(), String>;

fn ensure(ok: bool, what: impl Into<String>) -> Check {
    if ok {
        Ok(())
    } else {
        Err(what.into())
    }
}

fn e(err: ferry::Error) -> String {
    format!("error[{}]: {}", err.code(), err.message())
}

fn sh(vm: &Vm, script: &str) -> Result<String, String> {
    let out = vm
        .exec(&["sh", "-c", script], &ExecOptions::default())
        .map_err(e)?;
    ensure(
        out.status.success(),
        format!(
            "`{script}` in {} failed: {:?} {}",
            vm.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn step(name: &str, f: impl FnOnce() -> Check) -> Check {
    let t = Instant::now();
    let r = f();
    println!(
        "{} {name} ({:.1}s)",
        if r.is_ok() { "ok  " } else { "FAIL" },
        t.elapsed().as_secs_f64()
    );
    r.map_err(|m| format!("{name}: {m}"))
}

fn exec_and_files(vm: &Vm) -> Check {
    let out = vm
        .exec(
            &["sh", "-c", "echo out; echo err >&2; cat; exit 3"],
            &ExecOptions {
                env: vec![("GREETING".into(), "hi".into())],
                stdin: Some(b"from stdin\n".to_vec()),
                ..ExecOptions::default()
            },
        )
        .map_err(e)?;
    ensure(
        out.exit_code() == Some(3),
        format!("exit code {:?}", out.status),
    )?;
    ensure(out.stdout == b"out\nfrom stdin\n", "stdout")?;
    ensure(out.stderr == b"err\n", "stderr")?;
    let env = vm
        .exec(
            &["sh", "-c", "echo $GREETING; pwd"],
            &ExecOptions {
                env: vec![("GREETING".into(), "hi".into())],
                cwd: Some("/tmp".into()),
                ..ExecOptions::default()
            },
        )
        .map_err(e)?;
    ensure(env.stdout == b"hi\n/tmp\n", "env and cwd")?;
    let slow = vm
        .exec(
            &["sleep", "30"],
            &ExecOptions {
                timeout: Some(Duration::from_millis(500)),
                ..ExecOptions::default()
            },
        )
        .map_err(e)?;
    ensure(slow.status.timed_out, "timeout")?;
    vm.write_file("/root/hello.txt", b"hello file", 0o640)
        .map_err(e)?;
    let (data, mode) = vm.read_file("/root/hello.txt").map_err(e)?;
    ensure(
        data == b"hello file" && mode & 0o777 == 0o640,
        "file round trip",
    )?;
    // A directory tree in and out.
    let tmp = std::env::temp_dir().join(format!("ferry-api-{}", std::process::id()));
    let src = tmp.join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).map_err(|e| e.to_string())?;
    std::fs::write(src.join("a.txt"), "A").map_err(|e| e.to_string())?;
    std::fs::write(src.join("sub/deeper/b.bin"), vec![7u8; 100_000]).map_err(|e| e.to_string())?;
    vm.copy_in(&src, "/root/tree").map_err(e)?;
    ensure(
        sh(
            vm,
            "cat /root/tree/a.txt; wc -c < /root/tree/sub/deeper/b.bin",
        )? == "A100000",
        "tree in",
    )?;
    let back = tmp.join("back");
    vm.copy_out("/root/tree", &back).map_err(e)?;
    ensure(
        std::fs::read(back.join("sub/deeper/b.bin")).map_err(|e| e.to_string())?
            == vec![7u8; 100_000],
        "tree out",
    )?;
    // Progress: a file reports its size; a tree its tar stream, bounded by
    // the estimate going in and open-ended coming out.
    let seen = std::sync::Mutex::new(Vec::new());
    let record = |p: ferry::CopyProgress| seen.lock().unwrap().push(p);
    let file = src.join("sub/deeper/b.bin");
    vm.copy_in_with_progress(&file, "/root/b.bin", &record)
        .map_err(e)?;
    let last = seen.lock().unwrap().pop();
    ensure(
        last.is_some_and(|p| p.bytes == 100_000 && p.total == Some(100_000)),
        format!("file in progress: {last:?}"),
    )?;
    vm.copy_out_with_progress("/root/b.bin", &tmp.join("b.bin"), &record)
        .map_err(e)?;
    let last = seen.lock().unwrap().pop();
    ensure(
        last.is_some_and(|p| p.bytes == 100_000 && p.total == Some(100_000)),
        format!("file out progress: {last:?}"),
    )?;
    seen.lock().unwrap().clear();
    vm.copy_in_with_progress(&src, "/root/tree2", &record)
        .map_err(e)?;
    let last = seen.lock().unwrap().pop();
    ensure(
        last.is_some_and(|p| p.bytes > 100_000 && p.total.is_some_and(|t| p.bytes <= t)),
        format!("tree in progress: {last:?}"),
    )?;
    vm.copy_out_with_progress("/root/tree2", &tmp.join("back2"), &record)
        .map_err(e)?;
    let last = seen.lock().unwrap().pop();
    ensure(
        last.is_some_and(|p| p.bytes > 100_000 && p.total.is_none()),
        format!("tree out progress: {last:?}"),
    )?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn spawn_streams_and_signals(vm: &Vm) -> Check {
    let mut child = vm
        .spawn(
            &["sh", "-c", "trap 'echo got-term; exit 7' TERM; while read l; do echo \"echo:$l\"; done; sleep 60"],
            &ExecOptions {
                stdin: Some(Vec::new()),
                ..ExecOptions::default()
            },
        )
        .map_err(e)?;
    let mut seen = String::new();
    for line in ["one", "two"] {
        child
            .write_stdin(format!("{line}\n").as_bytes())
            .map_err(e)?;
        while !seen.contains(&format!("echo:{line}")) {
            match child.next_event().map_err(e)? {
                ChildEvent::Stdout(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                ChildEvent::Stderr(_) => {}
                ChildEvent::Exit(s) => return Err(format!("exited early: {s:?}")),
            }
        }
    }
    child.close_stdin().map_err(e)?;
    std::thread::sleep(Duration::from_millis(300));
    child.signal(15).map_err(e)?;
    let status = loop {
        match child.next_event().map_err(e)? {
            ChildEvent::Stdout(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            ChildEvent::Stderr(_) => {}
            ChildEvent::Exit(s) => break s,
        }
    };
    ensure(
        seen.contains("got-term"),
        format!("signal not seen: {seen:?}"),
    )?;
    ensure(
        status.code() == Some(7),
        format!("status after signal {status:?}"),
    )
}

fn snapshot_to_writer_and_restore_from_reader(rt: &Runtime, vm: &Vm) -> Result<Vm, String> {
    sh(vm, "echo 41 > /run/count")?;
    let mut bundle = Vec::new();
    vm.snapshot_to_writer(&mut bundle, &SnapshotOptions::default())
        .map_err(e)?;
    ensure(
        bundle.len() > 1 << 20,
        format!("bundle of {} bytes", bundle.len()),
    )?;
    ensure(
        rt.open(vm.name()).is_err(),
        "a hand-off leaves no VM behind",
    )?;
    let restored = rt
        .restore(
            RestoreSource::Reader(Box::new(std::io::Cursor::new(bundle))),
            RestoreOptions::default(),
        )
        .map_err(e)?;
    ensure(
        sh(&restored, "echo $(( $(cat /run/count) + 1 ))")? == "42",
        "memory survived the hand-off",
    )?;
    Ok(restored)
}

fn fork_three(vm: &Vm, paused: bool) -> Check {
    if paused {
        vm.pause().map_err(e)?;
        ensure(vm.is_paused(), "paused")?;
    }
    let (kids, report) = vm
        .fork(&ForkOptions {
            count: Some(3),
            ..ForkOptions::default()
        })
        .map_err(e)?;
    ensure(kids.len() == 3, "three siblings")?;
    if paused {
        ensure(vm.is_paused(), "a paused source stays paused")?;
        vm.resume().map_err(e)?;
    }
    println!("     source paused {} ms", report.source_paused_ms);
    let mut names = BTreeSet::new();
    let mut randoms = BTreeSet::new();
    for k in &kids {
        names.insert(sh(k, "hostname")?);
        randoms.insert(sh(
            k,
            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        )?);
        ensure(sh(k, "cat /run/count")? == "41", "siblings share the past")?;
    }
    ensure(names.len() == 3, format!("hostnames {names:?}"))?;
    ensure(randoms.len() == 3, format!("random bytes {randoms:?}"))?;
    for k in kids {
        k.remove().map_err(e)?;
    }
    Ok(())
}

fn expose_port(vm: &Vm) -> Check {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    sh(
        vm,
        "(while :; do echo served | nc -l -p 8000 -q 1; done) >/dev/null 2>&1 &",
    )?;
    let handle = vm
        .expose_port(PortForward {
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: port,
            guest_port: 8000,
        })
        .map_err(e)?;
    ensure(vm.info().ports.len() == 1, "the forward is recorded")?;
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got.contains("served") && Instant::now() < deadline {
        got.clear();
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read_to_string(&mut got);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure(
        got.contains("served"),
        format!("through the forward: {got:?}"),
    )?;
    handle.close().map_err(e)?;
    ensure(
        vm.info().ports.is_empty(),
        "closed forwards leave the record",
    )?;
    ensure(
        TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "a closed forward frees its port",
    )
}

fn stop_asks_the_guest(vm: &Vm) -> Check {
    // The guest's shutdown syncs and unmounts; a file written just before
    // is on disk afterwards.
    let t = Instant::now();
    vm.stop(Duration::from_secs(20)).map_err(e)?;
    let reason = match vm.status() {
        VmStatus::Stopped { reason } => reason,
        VmStatus::Running { .. } => return Err("still running after stop".into()),
    };
    println!(
        "     stopped ({reason}) in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // A guest that powers itself off ends as `poweroff`, or as `shutdown`
    // where its kernel falls back to a reset; `stopped` means ferry ended it.
    ensure(
        reason == "poweroff" || reason == "shutdown",
        format!("the guest was not asked: {reason}"),
    )
}

fn main() {
    let rt = Runtime::new(Config::default()).expect("runtime");
    let result = (|| -> Check {
        let vm = rt
            .boot(BootOptions {
                name: Some("api".into()),
                ..BootOptions::default()
            })
            .map_err(e)?;
        ensure(rt.list().iter().any(|v| v.name == "api"), "listed")?;
        step("exec, files and trees", || exec_and_files(&vm))?;
        step("spawn: streaming stdin/stdout, a signal", || {
            spawn_streams_and_signals(&vm)
        })?;
        step("pause and resume", || {
            vm.pause().map_err(e)?;
            ensure(vm.is_paused(), "paused")?;
            vm.resume().map_err(e)?;
            ensure(sh(&vm, "echo alive")? == "alive", "resumed")
        })?;
        step("stats", || {
            let s = vm.stats().map_err(e)?;
            ensure(
                s.vmm_rss_bytes > 0 && s.guest_resident_bytes > 0,
                format!("{s:?}"),
            )
        })?;
        let vm = {
            let mut restored = None;
            step("snapshot to a writer, restore from a reader", || {
                restored = Some(snapshot_to_writer_and_restore_from_reader(&rt, &vm)?);
                Ok(())
            })?;
            restored.expect("restored")
        };
        step("fork three from a running source", || {
            fork_three(&vm, false)
        })?;
        step("fork three from a paused source", || fork_three(&vm, true))?;
        step("expose a port at run time, then close it", || {
            expose_port(&vm)
        })?;
        step("stop asks the guest first", || stop_asks_the_guest(&vm))?;
        vm.remove().map_err(e)?;
        ensure(rt.list().is_empty(), "nothing left")
    })();
    if let Err(m) = result {
        eprintln!("FAIL: {m}");
        std::process::exit(1);
    }
    println!("api_check: all passed");
}
