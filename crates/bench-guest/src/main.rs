//! `ferry-exec-floor`: what starting a process costs inside the guest itself.
//!
//! Run inside a ferry guest by `cargo xtask bench` (built static, copied in with
//! `ferry cp`, started with `ferry exec`). It times, in a loop, `posix_spawn`
//! plus `waitpid` of a program (`/bin/true` by default) and prints one JSON line:
//!
//! ```text
//! {"spawn_s":0.027,"min_s":0.025,"max_s":0.031,"count":30,"program":"/bin/true"}
//! ```
//!
//! `spawn_s` is the median seconds per iteration. No agent, vsock or protocol is
//! involved: with one vsock round trip added, it is the floor of an `exec`.
//!
//! Usage: `ferry-exec-floor [--count N] [--program PATH]`.

use std::ffi::CString;
use std::io;
use std::time::Instant;

/// Iterations timed when `--count` is not given.
const DEFAULT_COUNT: usize = 30;
/// Program started when `--program` is not given.
const DEFAULT_PROGRAM: &str = "/bin/true";

/// What to run and how often.
struct Options {
    /// Timed iterations (one untimed warm-up run comes first).
    count: usize,
    /// Absolute path of the program to start.
    program: String,
}

/// Parses `--count N` and `--program PATH`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        count: DEFAULT_COUNT,
        program: DEFAULT_PROGRAM.to_string(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--count" => {
                opts.count = value()?.parse().map_err(|e| format!("--count: {e}"))?;
            }
            "--program" => opts.program = value()?,
            "-h" | "--help" => {
                return Err("usage: ferry-exec-floor [--count N] [--program PATH]".into())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if opts.count == 0 {
        return Err("--count must be at least 1".into());
    }
    Ok(opts)
}

/// Starts `program` with `posix_spawn` (no arguments beyond `argv[0]`, an empty
/// environment, the caller's stdio) and waits for it. Fails unless it exits 0.
fn spawn_and_wait(program: &CString) -> io::Result<()> {
    let argv: [*mut libc::c_char; 2] = [program.as_ptr().cast_mut(), std::ptr::null_mut()];
    let envp: [*mut libc::c_char; 1] = [std::ptr::null_mut()];
    let mut pid: libc::pid_t = 0;
    // SAFETY: `program` is a NUL-terminated string that outlives the call;
    // `argv` and `envp` are NULL-terminated arrays of such strings (posix_spawn
    // does not write through them despite the `*mut` type); null file actions
    // and attributes mean "inherit everything"; `pid` is a valid out pointer.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `pid` is our own child, not yet reaped; `status` is a valid
        // out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} ended with wait status {status:#x}",
            program.to_string_lossy()
        )))
    }
}

/// Escapes `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Times the spawns and prints the JSON line.
fn run(opts: &Options) -> Result<(), String> {
    let program = CString::new(opts.program.as_str()).map_err(|e| format!("--program: {e}"))?;
    let fail = |e: io::Error| format!("start {}: {e}", opts.program);
    // Warm-up: the program's pages come into the page cache.
    spawn_and_wait(&program).map_err(fail)?;
    let mut samples = Vec::with_capacity(opts.count);
    for _ in 0..opts.count {
        let t = Instant::now();
        spawn_and_wait(&program).map_err(fail)?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "{{\"spawn_s\":{},\"min_s\":{},\"max_s\":{},\"count\":{},\"program\":{}}}",
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1],
        opts.count,
        json_string(&opts.program),
    );
    Ok(())
}

fn main() {
    let result = parse_args(std::env::args().skip(1)).and_then(|opts| run(&opts));
    if let Err(message) = result {
        eprintln!("ferry-exec-floor: {message}");
        std::process::exit(1);
    }
}
