//! `ferry stop`.

/// Arguments of `ferry stop`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM(s).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Seconds the guest has to power off before the VM is ended.
    #[arg(
        short,
        long,
        visible_alias = "timeout",
        value_name = "SECS",
        default_value_t = 10
    )]
    pub time: u64,
}
