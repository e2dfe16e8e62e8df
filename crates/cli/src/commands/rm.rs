//! `ferry rm`: delete a VM and its state.

use ferry_runtime::machine::Machine;
use ferry_runtime::vm::{VmError, VmStatus};
use ferry_runtime::Failure;

/// Arguments of `ferry rm`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM(s).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Stop the VM first if it is running.
    #[arg(short, long)]
    pub force: bool,
}

/// Removes each VM.
pub fn run(args: Args) -> Result<(), Failure> {
    for name in &args.names {
        let machine = Machine::open(name)?;
        if !args.force && matches!(machine.status(), VmStatus::Running { .. }) {
            return Err(VmError::StillRunning(name.clone()).into());
        }
        machine.remove()?;
        println!("{name}");
    }
    Ok(())
}
