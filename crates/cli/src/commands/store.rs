//! `ferry push` and `ferry pull-bundle`: VMs in an S3 bucket.

use std::path::Path;

use ferry::{Failure, Runtime};

use crate::cli::store::{PullBundleArgs, PushArgs};
use crate::output::Output;
use crate::progress::Display;

/// Pushes a running VM or a bundle file and prints where it went.
pub fn push(rt: &Runtime, args: PushArgs, out: &Output) -> Result<(), Failure> {
    let display = Display::new(out.json);
    let spinner = display.spinner(&format!("pushing {}", args.source));
    let mut progress = |what: &str| spinner.message(what);
    // A file that exists is a bundle; anything else names a VM.
    let report = if Path::new(&args.source).is_file() {
        rt.push_bundle(Path::new(&args.source), &args.store, &mut progress)?
    } else {
        rt.open_running(&args.source)?
            .push(&args.store, args.stop, &mut progress)?
    };
    drop(spinner);
    if out.json {
        println!("{}", serde_json::json!({ "ok": true, "report": report }));
    } else {
        println!("{}", report.url);
        eprintln!(
            "{}: {} chunks, {} uploaded ({} bytes); {} bytes in the store",
            args.source,
            report.chunks,
            report.uploaded_chunks,
            report.uploaded_bytes,
            report.stored_bytes
        );
    }
    Ok(())
}

/// Fetches a pushed VM into a bundle file.
pub fn pull_bundle(rt: &Runtime, args: PullBundleArgs, out: &Output) -> Result<(), Failure> {
    let display = Display::new(out.json);
    let spinner = display.spinner(&format!("fetching {}", args.url));
    let report = rt.pull_bundle(&args.url, &args.path, &mut |what| spinner.message(what))?;
    drop(spinner);
    if out.json {
        println!(
            "{}",
            serde_json::json!({ "ok": true, "path": args.path, "report": report })
        );
    } else {
        eprintln!(
            "{}: {} bytes ({} chunks, {} bytes fetched)",
            args.path.display(),
            report.bundle_bytes,
            report.chunks,
            report.fetched_bytes
        );
    }
    Ok(())
}
