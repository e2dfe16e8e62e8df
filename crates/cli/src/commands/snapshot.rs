//! `ferry snapshot`: freeze a VM into a bundle.

use std::path::Path;

use ferry::{Failure, Runtime, SnapshotOptions};

use crate::cli::snapshot::Args;
use crate::output::Output;
use crate::progress::Display;

/// Writes the bundle and prints what it cost.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    let vm = rt.open_running(&args.name)?;
    let opts = SnapshotOptions {
        leave_running: args.leave_running,
        thin: args.thin,
        raw_memory: args.raw_memory,
        compact: args.compact,
        since: args.since.clone(),
    };
    let to_stdout = args.path == "-";
    let report = {
        let bar = Display::new(out.json).bytes(&format!("writing {}", args.path), None);
        if to_stdout {
            let mut stdout = bar.writer(std::io::stdout());
            vm.snapshot_to_writer(&mut stdout, &opts)?
        } else {
            vm.snapshot_to_path_with_progress(Path::new(&args.path), &opts, &|n| bar.set(n, None))?
        }
    };
    if out.json {
        let line = serde_json::json!({
            "ok": true, "name": args.name, "path": args.path, "report": report,
        });
        // The bundle itself is on stdout.
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
