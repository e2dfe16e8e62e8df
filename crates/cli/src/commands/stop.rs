//! `ferry stop`: stop running VMs.

use std::time::Duration;

use ferry::{Failure, Runtime};

/// Arguments of `ferry stop`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM(s).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Seconds the guest has to power off before the VM is ended.
    #[arg(short, long, default_value_t = 10)]
    pub time: u64,
}

/// Stops each VM; returns once each VMM process has exited.
pub fn run(rt: &Runtime, args: Args) -> Result<(), Failure> {
    for name in &args.names {
        let vm = rt.open(name)?;
        vm.stop(Duration::from_secs(args.time))?;
        // A VM that lives only as long as its session goes away entirely.
        if vm.ephemeral() {
            vm.remove()?;
        }
        println!("{name}");
    }
    Ok(())
}
