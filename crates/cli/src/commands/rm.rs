//! `ferry rm`: delete a VM and its state.

use ferry::{Failure, Runtime, VmStatus};

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
pub fn run(rt: &Runtime, args: Args) -> Result<(), Failure> {
    for name in &args.names {
        let vm = rt.open(name)?;
        if !args.force && matches!(vm.status(), VmStatus::Running { .. }) {
            return Err(Failure {
                code: "VM_STILL_RUNNING".into(),
                message: format!("VM {name} is running"),
                hint: Some(format!(
                    "`ferry stop {name}` first, or `ferry rm -f {name}`"
                )),
            });
        }
        vm.remove()?;
        println!("{name}");
    }
    Ok(())
}
