//! `ferry-vmm DIR`: the VMM process of one VM. A ferry runtime starts it
//! after writing the VM's record and plan into its state directory `DIR`
//! (see `ferry_runtime::plan`); it runs the VM until it ends. Not for direct use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use ferry_runtime::logfile::{RotatingLog, VMM_LOG_LIMIT};

fn main() -> ExitCode {
    // Before anything is created: its sockets (control, vsock and the
    // vsock ports'), logs, bundles and fork layers are this user's alone.
    // SAFETY: umask(2) only sets this process's file creation mask; it takes
    // no pointers and cannot fail.
    unsafe { libc::umask(0o077) };
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (Some(dir), None) if dir != "--help" && dir != "-h" => {
            let dir = PathBuf::from(dir);
            init_logging(Some(&dir.join("vmm.log")));
            ferry_runtime::vmm_process::run(&dir)
        }
        _ => {
            init_logging(None);
            eprintln!(
                "usage: ferry-vmm DIR\n\nRuns the VM whose state directory is DIR. \
                 ferry starts this itself; use `ferry boot` instead."
            );
            ExitCode::from(2)
        }
    }
}

/// Logs at `FERRY_LOG` (default `warn`) into `log`, rotated to `log.1` at
/// [`VMM_LOG_LIMIT`], or onto stderr when there is no log (or it cannot be
/// opened). The runtime makes `DIR/vmm.log` this process's stdout and
/// stderr; the rotating log takes them over, so the few lines written there
/// directly (a start-up failure, a panic) land in the current file too.
/// Everything else this process says goes through tracing, so capping what
/// tracing writes caps the log: nothing else can make it grow without bound.
fn init_logging(log: Option<&Path>) {
    // A log file, not a terminal: no colour escapes.
    let builder = tracing_subscriber::fmt().with_ansi(false).with_env_filter(
        tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    );
    let rotating =
        log.map(|p| RotatingLog::open(p, VMM_LOG_LIMIT).and_then(RotatingLog::with_stdio));
    match rotating {
        Some(Ok(log)) => builder.with_writer(Mutex::new(log)).init(),
        Some(Err(e)) => {
            builder.with_writer(std::io::stderr).init();
            tracing::warn!("vmm.log cannot be rotated, logging to stderr: {e}");
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
}
