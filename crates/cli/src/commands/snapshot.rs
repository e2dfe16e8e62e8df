//! `ferry snapshot`: freeze a VM into a bundle.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use ferry_runtime::machine::Machine;
use ferry_runtime::vm::control::{self, ControlRequest};
use ferry_runtime::Failure;

/// Arguments of `ferry snapshot`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM.
    pub name: String,
    /// Bundle file to write, or `-` to stream it to stdout.
    pub path: String,
    /// Keep the VM running (by default it stops: a hand-off never leaves two live copies).
    #[arg(long)]
    pub leave_running: bool,
    /// Leave out the disk image the VM booted from (only its content id is kept):
    /// a much smaller bundle that restores only on hosts that have that image.
    #[arg(long)]
    pub thin: bool,
    /// Store guest memory uncompressed (bigger bundle; restore maps it without decoding).
    #[arg(long)]
    pub raw_memory: bool,
}

/// Writes the bundle and prints what it cost.
pub fn run(args: Args, json: bool) -> Result<(), Failure> {
    let machine = Machine::open_running(&args.name)?;
    let to_stdout = args.path == "-";
    let (dest, pump) = if to_stdout {
        let fifo = machine.dir.root.join("snapshot.fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(
            |e| Failure {
                code: "SNAPSHOT_IO".into(),
                message: format!("create stream: {e}"),
                hint: None,
            },
        )?;
        let reader = fifo.clone();
        let pump = std::thread::spawn(move || -> std::io::Result<u64> {
            let mut f = std::fs::File::open(reader)?;
            let mut out = std::io::stdout().lock();
            let n = std::io::copy(&mut f, &mut out)?;
            out.flush()?;
            Ok(n)
        });
        (fifo, Some(pump))
    } else {
        let p = std::path::absolute(PathBuf::from(&args.path)).map_err(|e| Failure {
            code: "SNAPSHOT_IO".into(),
            message: format!("{}: {e}", args.path),
            hint: None,
        })?;
        (p, None)
    };
    let resp = control::request(
        &machine.dir.control(),
        &ControlRequest::Snapshot {
            path: dest.clone(),
            leave_running: args.leave_running,
            thin: args.thin,
            raw_memory: args.raw_memory,
        },
        Duration::from_secs(3600),
    );
    if let Some(pump) = pump {
        if resp.as_ref().is_ok_and(|r| !r.ok) || resp.is_err() {
            // Unblock the reader if the VMM never opened the stream.
            let _ = std::fs::OpenOptions::new().write(true).open(&dest);
        }
        let copied = pump.join().map_err(|_| Failure {
            code: "SNAPSHOT_IO".into(),
            message: "stream copy failed".into(),
            hint: None,
        })?;
        let _ = std::fs::remove_file(&dest);
        if let Err(e) = copied {
            return Err(Failure {
                code: "SNAPSHOT_IO".into(),
                message: format!("writing to stdout: {e}"),
                hint: None,
            });
        }
    }
    // A broken control connection says little by itself: add whether the VMM
    // still runs and how its logs end.
    let resp = resp.map_err(|e| {
        let mut f = Failure::from(e);
        f.hint = Some(machine.post_mortem());
        f
    })?;
    if !resp.ok {
        return Err(Failure {
            code: resp.code.unwrap_or_else(|| "SNAPSHOT_FAILED".into()),
            message: resp.message.unwrap_or_default(),
            hint: None,
        });
    }
    if !args.leave_running {
        // The VM now lives in the bundle; its stopped entry goes away once it has exited.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(
            machine.status(),
            ferry_runtime::vm::VmStatus::Running { .. }
        ) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = machine.clone().remove();
    }
    let info = resp.info.unwrap_or_default();
    if json {
        let line =
            serde_json::json!({ "ok": true, "name": args.name, "path": args.path, "report": info });
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    } else {
        eprintln!(
            "{}: {} bytes{} ({} of guest memory stored in {}), paused {} ms{}",
            args.name,
            info["bytes"],
            if args.thin { ", thin" } else { "" },
            info["memory_bytes"],
            info["memory_stored_bytes"],
            info["paused_ms"],
            if args.leave_running {
                ""
            } else {
                "; VM stopped"
            }
        );
    }
    Ok(())
}
