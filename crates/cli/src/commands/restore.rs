//! `ferry restore`: thaw a bundle into a running VM.

use std::path::PathBuf;

use ferry_runtime::machine::Machine;
use ferry_runtime::snapshot::restore::{self, RestoreSpec};
use ferry_runtime::Failure;

/// Arguments of `ferry restore`.
#[derive(clap::Args)]
pub struct Args {
    /// Bundle file, or `-` to read it from stdin.
    pub path: String,
    /// Name of the restored VM (default: the name it had when frozen).
    #[arg(long)]
    pub name: Option<String>,
    /// Return once the VM runs instead of following its console.
    #[arg(short, long)]
    pub detach: bool,
    /// Serve a live mount recorded at host path OLD from NEW instead (repeatable).
    #[arg(long = "remap-mount", value_name = "OLD=NEW")]
    pub remap_mount: Vec<String>,
    /// Forward a host port into the VM: [HOST_IP:]HOST_PORT:GUEST_PORT (repeatable;
    /// replaces the forwards recorded in the bundle; binds 127.0.0.1 unless an
    /// address is given).
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
}

/// Restores and prints the VM's name.
pub fn run(args: Args, json: bool) -> Result<(), Failure> {
    let remap_mounts = args
        .remap_mount
        .iter()
        .map(|s| ferry_runtime::mounts::parse_remap(s))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = if args.publish.is_empty() {
        None
    } else {
        Some(super::parse_ports(&args.publish)?)
    };
    let spec = if args.path == "-" {
        RestoreSpec {
            bundle: restore::receive(std::io::stdin().lock())?,
            owned: true,
            name: args.name.clone(),
            remap_mounts,
            ports: ports.clone(),
            hostname: None,
        }
    } else {
        RestoreSpec {
            bundle: PathBuf::from(&args.path),
            owned: false,
            name: args.name.clone(),
            remap_mounts,
            ports,
            hostname: None,
        }
    };
    let started = std::time::Instant::now();
    let machine = restore::restore(&spec)?;
    report(&machine, started, json);
    if !args.detach {
        super::logs::follow(&machine);
    }
    Ok(())
}

/// Prints the new VM's name (and JSON details).
pub fn report(machine: &Machine, started: std::time::Instant, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "name": machine.name(),
                "ready_ms": started.elapsed().as_millis() as u64,
            })
        );
    } else {
        println!("{}", machine.name());
    }
}
