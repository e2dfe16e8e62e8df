//! `ferry stop`: ask guests to power off, then end their VMs.

use std::time::Duration;

use ferry::{Failure, Runtime};

use crate::cli::stop::Args;
use crate::output::Output;
use crate::progress::Display;

/// Stops each VM; returns once each VMM process has exited.
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<(), Failure> {
    let display = Display::new(out.json);
    super::vms::each(&args.names, out, |name| {
        let vm = rt.open(name)?;
        let _stopping = display.spinner(&format!("stopping {name}"));
        vm.stop(Duration::from_secs(args.time))?;
        // A VM that lives only as long as its session goes away entirely.
        if vm.ephemeral() {
            vm.remove()?;
        }
        Ok(())
    })
}
