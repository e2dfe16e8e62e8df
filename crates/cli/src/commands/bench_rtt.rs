//! `ferry bench-rtt NAME`: round-trip times into a running VM, for `cargo xtask bench`.
//!
//! Measures one `exec` of `true` through the Rust API over an open session, and a
//! raw vsock echo round trip to a guest echo server on `--echo-port` (the floor any
//! protocol pays).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ferry::{Failure, Runtime};
use ferry_protocol::ExecRequest;

use crate::cli::bench_rtt::Args;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn fail(code: &str, e: impl std::fmt::Display) -> Failure {
    Failure {
        code: code.into(),
        message: e.to_string(),
        hint: None,
    }
}

/// Median seconds of `count` runs of `exec` (after one warm-up run).
fn time_execs(
    count: usize,
    mut exec: impl FnMut() -> Result<ferry_protocol::ExitStatus, Failure>,
) -> Result<f64, Failure> {
    exec()?;
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let st = exec()?;
        samples.push(t.elapsed().as_secs_f64());
        if !st.success() {
            return Err(fail("BENCH_FAILED", "`true` failed in the guest"));
        }
    }
    Ok(median(samples))
}

/// Prints `exec_rtt`, `echo_rtt` and the comparisons (`ping_rtt`,
/// `user_exec_rtt`, `new_connection_exec_rtt`), medians in seconds, as JSON.
pub fn run(rt: &Runtime, args: Args) -> Result<(), Failure> {
    if args.count == 0 {
        return Err(fail("BENCH_FAILED", "--count must be at least 1"));
    }
    let machine = rt.open_running(&args.name)?;
    let session = machine.client().session()?;
    let exec = time_execs(args.count, || {
        Ok(session.exec(ExecRequest::new(["true"]))?.wait()?)
    })?;
    // For comparison, side by side in the same VM: the protocol's own round
    // trip on the session (the transport without the exec), an exec with a
    // user switch (the agent then forks instead of using posix_spawn), and
    // an exec on a new connection (what a plain Client pays).
    let mut ping = Vec::with_capacity(args.count);
    session.ping()?;
    for _ in 0..args.count {
        ping.push(session.ping()?.as_secs_f64());
    }
    let as_root = || ExecRequest::new(["true"]).user("root");
    let user_exec = time_execs(args.count, || Ok(session.exec(as_root())?.wait()?))?;
    let client = machine.client();
    let new_connection = time_execs(args.count, || {
        Ok(client.exec(ExecRequest::new(["true"]))?.wait()?)
    })?;
    let echo = match args.echo_port {
        None => None,
        Some(port) => {
            let mut s = ferry_protocol::transport::connect_uds(
                &machine.dir().join("vsock.sock"),
                port,
                Duration::from_secs(10),
            )
            .map_err(|e| fail("BENCH_FAILED", e))?;
            let mut samples = Vec::with_capacity(args.count);
            let mut b = [0u8; 1];
            for i in 0..=args.count {
                let t = Instant::now();
                s.write_all(b"x").map_err(|e| fail("BENCH_FAILED", e))?;
                s.read_exact(&mut b).map_err(|e| fail("BENCH_FAILED", e))?;
                if i > 0 {
                    samples.push(t.elapsed().as_secs_f64());
                }
            }
            Some(median(samples))
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "exec_rtt": exec,
            "ping_rtt": median(ping),
            "user_exec_rtt": user_exec,
            "new_connection_exec_rtt": new_connection,
            "echo_rtt": echo,
            "count": args.count,
        })
    );
    Ok(())
}
