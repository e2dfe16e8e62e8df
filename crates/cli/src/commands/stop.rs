//! `ferry stop`: stop a running VM.

use ferry_runtime::machine::Machine;
use ferry_runtime::Failure;

/// Arguments of `ferry stop`.
#[derive(clap::Args)]
pub struct Args {
    /// The VM(s).
    #[arg(required = true)]
    pub names: Vec<String>,
}

/// Stops each VM.
pub fn run(args: Args) -> Result<(), Failure> {
    for name in &args.names {
        let machine = Machine::open(name)?;
        if machine.record.ephemeral {
            machine.remove()?;
        } else {
            machine.stop()?;
        }
        println!("{name}");
    }
    Ok(())
}
