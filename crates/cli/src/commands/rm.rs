//! `ferry rm`: delete a VM and its state.

use ferry::{Failure, Runtime, VmStatus};

use crate::cli::rm::Args;
use crate::output::Output;

/// Removes each VM.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    super::vms::each(&args.names, out, |name| {
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
        Ok(())
    })
}
