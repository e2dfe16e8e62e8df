//! `ferry restore`: thaw a bundle into a running VM.

use std::path::PathBuf;

use ferry::{Failure, RestoreOptions, RestoreSource, Runtime, Vm};

use crate::cli::restore::Args;
use crate::output::Output;
use crate::progress::Display;

/// Restores and prints the VM's name.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    let remap_mounts = args
        .remap_mount
        .iter()
        .map(|s| ferry::parse::remap(s))
        .collect::<Result<Vec<_>, _>>()?;
    let (ports, live_mounts) = granted(&args.grants)?;
    let opts = RestoreOptions {
        name: args.name.clone(),
        ports,
        remap_mounts,
        live_mounts,
        net: args.grants.net,
        trust_bundle_config: args.grants.trust_bundle_config,
        parents: args.parent.clone(),
    };
    let display = Display::new(out.json);
    let started = std::time::Instant::now();
    let vm = if args.path == "-" {
        let bar = display.bytes("receiving the bundle", None);
        let stdin = bar.reader(std::io::stdin(), "starting the VM");
        rt.restore(RestoreSource::Reader(Box::new(stdin)), opts)?
    } else if ferry::StoreUrl::is_store(&args.path) {
        let _restoring = display.spinner(&format!("fetching and restoring {}", args.path));
        rt.restore(RestoreSource::Store(args.path.clone()), opts)?
    } else {
        let _restoring = display.spinner(&format!("restoring {}", args.path));
        rt.restore(RestoreSource::Path(PathBuf::from(&args.path)), opts)?
    };
    report(&vm, started, out.json);
    if !args.detach {
        super::logs::follow(&vm);
    }
    Ok(())
}

/// The forwards (the VM's own when none are given) and live mount
/// directories the flags grant.
pub fn granted(
    g: &crate::cli::restore::Grants,
) -> Result<(Option<Vec<ferry::PortForward>>, Vec<PathBuf>), Failure> {
    let ports = if g.publish.is_empty() {
        None
    } else {
        Some(super::parse_ports(&g.publish)?)
    };
    let live_mounts = g
        .live_mount
        .iter()
        .map(|s| PathBuf::from(s.split(':').next().unwrap_or(s)))
        .collect();
    Ok((ports, live_mounts))
}

/// Prints the new VM's name (and JSON details).
pub fn report(vm: &Vm, started: std::time::Instant, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "name": vm.name(),
                "ready_ms": started.elapsed().as_millis() as u64,
            })
        );
    } else {
        println!("{}", vm.name());
    }
}
