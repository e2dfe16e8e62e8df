//! `ferry snapshot`: freeze a VM into a bundle.

use std::path::Path;

use ferry::{Failure, Runtime, SnapshotOptions};

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
pub fn run(rt: &Runtime, args: Args, json: bool) -> Result<(), Failure> {
    let vm = rt.open_running(&args.name)?;
    let opts = SnapshotOptions {
        leave_running: args.leave_running,
        thin: args.thin,
        raw_memory: args.raw_memory,
    };
    let to_stdout = args.path == "-";
    let report = if to_stdout {
        let mut out = std::io::stdout();
        vm.snapshot_to_writer(&mut out, &opts)?
    } else {
        vm.snapshot_to_path(Path::new(&args.path), &opts)?
    };
    if json {
        let line = serde_json::json!({
            "ok": true, "name": args.name, "path": args.path, "report": report,
        });
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    } else {
        eprintln!(
            "{}: {} bytes{} ({} of guest memory stored in {}), paused {} ms{}",
            args.name,
            report.bytes,
            if args.thin { ", thin" } else { "" },
            report.memory_bytes,
            report.memory_stored_bytes,
            report.paused_ms,
            if args.leave_running {
                ""
            } else {
                "; VM stopped"
            }
        );
    }
    Ok(())
}
