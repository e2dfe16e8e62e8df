//! `ferry ps` and `ferry ls`.

/// Arguments of `ferry ps` and `ferry ls`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Include stopped VMs (`ferry ls` always does).
    #[arg(short, long)]
    pub all: bool,
    /// Print only the names, one per line.
    #[arg(short, long)]
    pub quiet: bool,
}
