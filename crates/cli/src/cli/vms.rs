//! `ferry kill`, `ferry pause` and `ferry resume`: commands that take VM names only.

/// Arguments of a command that acts on VMs by name.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM(s).
    #[arg(required = true)]
    pub names: Vec<String>,
}
