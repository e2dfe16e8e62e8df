//! `ferry ps` and `ferry ls`: list VMs.

use ferry::{Failure, Runtime, VmInfo, VmStatus};

use crate::cli::ls::Args;
use crate::output::Output;

/// Which VMs a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Running ones (`ferry ps`, as `docker ps`).
    Running,
    /// All of them (`ferry ps -a`, `ferry ls`).
    All,
}

/// Prints a table, the names (`-q`), or JSON: an array of VMs, or of names
/// with `-q`.
pub fn run(rt: &Runtime, args: Args, scope: Scope, out: &Output) -> Result<(), Failure> {
    let scope = if args.all { Scope::All } else { scope };
    let vms: Vec<(VmInfo, bool)> = rt
        .list()
        .into_iter()
        .filter(|vm| scope == Scope::All || matches!(vm.status, VmStatus::Running { .. }))
        .map(|vm| {
            let paused = matches!(vm.status, VmStatus::Running { .. })
                && rt.open(&vm.name).is_ok_and(|v| v.is_paused());
            (vm, paused)
        })
        .collect();
    if args.quiet {
        if out.json {
            let names: Vec<&str> = vms.iter().map(|(vm, _)| vm.name.as_str()).collect();
            out.json(&serde_json::json!(names));
        } else {
            for (vm, _) in &vms {
                println!("{}", vm.name);
            }
        }
        return Ok(());
    }
    if out.json {
        let list: Vec<serde_json::Value> = vms
            .iter()
            .map(|(vm, paused)| {
                let mut v = serde_json::to_value(vm).expect("serializable");
                v["paused"] = serde_json::Value::Bool(*paused);
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).expect("serializable")
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:>4} {:>7}  {:<8} {:<22} IMAGE",
        "NAME", "STATUS", "CPUS", "MEMORY", "PID", "PORTS"
    );
    for (vm, paused) in vms {
        let (status, pid) = match &vm.status {
            VmStatus::Running { pid } if paused => ("paused".to_string(), pid.to_string()),
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
