//! `ferry ls`: list VMs.

use ferry::{Failure, Runtime, VmStatus};

/// Arguments of `ferry ls`.
#[derive(clap::Args)]
pub struct Args {}

/// Prints a table, or JSON.
pub fn run(rt: &Runtime, _args: Args, json: bool) -> Result<(), Failure> {
    let vms = rt.list();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&vms).expect("serializable")
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:>4} {:>7}  {:<8} {:<22} IMAGE",
        "NAME", "STATUS", "CPUS", "MEMORY", "PID", "PORTS"
    );
    for vm in vms {
        let (status, pid) = match &vm.status {
            VmStatus::Running { pid } => ("running".to_string(), pid.to_string()),
            VmStatus::Stopped { reason } => (reason.clone(), "-".into()),
        };
        let ports = vm
            .ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{:<20} {:<10} {:>4} {:>6}M  {:<8} {:<22} {}",
            vm.name,
            status,
            vm.cpus,
            vm.memory_mib,
            pid,
            if ports.is_empty() { "-" } else { &ports },
            vm.image
        );
    }
    Ok(())
}
