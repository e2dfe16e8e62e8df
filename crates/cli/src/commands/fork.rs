//! `ferry fork`: clone a running VM; all continue from the same instant.

use ferry::{Failure, ForkOptions, Runtime};

/// Arguments of `ferry fork`.
#[derive(clap::Args)]
pub struct Args {
    /// The running (or paused) VM to fork.
    pub name: String,
    /// Name of the new VM (repeatable: one fork, several siblings).
    #[arg(long, required = true)]
    pub new_name: Vec<String>,
    /// Return once the fork runs instead of following its console.
    #[arg(short, long)]
    pub detach: bool,
    /// Forward a host port into the (first) new VM: [HOST_IP:]HOST_PORT:GUEST_PORT
    /// (repeatable; the source's forwards are never inherited; binds 127.0.0.1
    /// unless an address is given).
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
}

/// Forks and prints the new VMs' names and what the source paid.
pub fn run(rt: &Runtime, args: Args, json: bool) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let ports = super::parse_ports(&args.publish)?;
    let source = rt.open_running(&args.name)?;
    let (vms, report) = source.fork(&ForkOptions {
        names: args.new_name.clone(),
        count: None,
        ports: vec![ports],
    })?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "name": vms[0].name(),
                "names": vms.iter().map(|v| v.name()).collect::<Vec<_>>(),
                "ready_ms": started.elapsed().as_millis() as u64,
                "source_paused_ms": report.source_paused_ms,
                "copied_bytes": report.copied_bytes,
            })
        );
    } else {
        for vm in &vms {
            println!("{}", vm.name());
        }
        eprintln!(
            "{} paused {} ms; {} bytes of memory copied",
            args.name, report.source_paused_ms, report.copied_bytes
        );
    }
    if !args.detach {
        super::logs::follow(&vms[0]);
    }
    Ok(())
}
