//! `ferry rm`.

/// Arguments of `ferry rm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM(s).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Stop the VM first if it is running.
    #[arg(short, long)]
    pub force: bool,
}
