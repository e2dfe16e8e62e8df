//! `ferry restore`: thaw a bundle into a running VM.

use std::path::PathBuf;

use ferry::{Failure, RestoreOptions, RestoreSource, Runtime, Vm};

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
    /// Confirm a live mount the bundle records, by its host directory
    /// (HOST or HOST:GUEST[:ro|rw]; repeatable).
    #[arg(long = "live-mount", value_name = "HOST")]
    pub live_mount: Vec<String>,
    /// Confirm the bundle's outbound networking.
    #[arg(long)]
    pub net: bool,
    /// Grant whatever the bundle's record asks for (live mounts, networking,
    /// forwards on any address): only for bundles you trust.
    #[arg(long)]
    pub trust_bundle_config: bool,
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
pub fn run(rt: &Runtime, args: Args, json: bool) -> Result<(), Failure> {
    let remap_mounts = args
        .remap_mount
        .iter()
        .map(|s| ferry::parse::remap(s))
        .collect::<Result<Vec<_>, _>>()?;
    let ports = if args.publish.is_empty() {
        None
    } else {
        Some(super::parse_ports(&args.publish)?)
    };
    let live_mounts = args
        .live_mount
        .iter()
        .map(|s| PathBuf::from(s.split(':').next().unwrap_or(s)))
        .collect();
    let opts = RestoreOptions {
        name: args.name.clone(),
        ports,
        remap_mounts,
        live_mounts,
        net: args.net,
        trust_bundle_config: args.trust_bundle_config,
    };
    let source = if args.path == "-" {
        RestoreSource::Reader(Box::new(std::io::stdin()))
    } else {
        RestoreSource::Path(PathBuf::from(&args.path))
    };
    let started = std::time::Instant::now();
    let vm = rt.restore(source, opts)?;
    report(&vm, started, json);
    if !args.detach {
        super::logs::follow(&vm);
    }
    Ok(())
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
