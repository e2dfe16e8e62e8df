//! `ferry fork`: clone a running VM; both continue from the same instant.

use ferry_runtime::snapshot::fork;
use ferry_runtime::Failure;

/// Arguments of `ferry fork`.
#[derive(clap::Args)]
pub struct Args {
    /// The running VM to fork.
    pub name: String,
    /// Name of the new VM.
    #[arg(long)]
    pub new_name: String,
    /// Return once the fork runs instead of following its console.
    #[arg(short, long)]
    pub detach: bool,
    /// Forward a host port into the VM: [HOST_IP:]HOST_PORT:GUEST_PORT (repeatable; the source's forwards are never inherited;
    /// binds 127.0.0.1 unless an address is given).
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
}

/// Forks and prints the new VM's name and what the source paid.
pub fn run(args: Args, json: bool) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let ports = super::parse_ports(&args.publish)?;
    let (machine, report) = fork::fork(&args.name, &args.new_name, ports)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "name": machine.name(),
                "ready_ms": started.elapsed().as_millis() as u64,
                "source_paused_ms": report.source_paused_ms,
                "copied_bytes": report.copied_bytes,
            })
        );
    } else {
        println!("{}", machine.name());
        eprintln!(
            "{} paused {} ms; {} bytes of memory copied",
            args.name, report.source_paused_ms, report.copied_bytes
        );
    }
    if !args.detach {
        super::logs::follow(&machine);
    }
    Ok(())
}
