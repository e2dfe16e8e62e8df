//! `ferry vmm-run DIR`: the VMM process of one VM (spawned by `ferry boot`).

use std::path::PathBuf;

use ferry_runtime::Failure;

/// Arguments of the hidden `vmm-run` command.
#[derive(clap::Args)]
pub struct Args {
    /// The VM's state directory.
    pub dir: PathBuf,
}

/// Runs the VM; exits the process when it ends.
pub fn run(args: Args) -> Result<(), Failure> {
    ferry_runtime::vmm_process::run(&args.dir)
}
