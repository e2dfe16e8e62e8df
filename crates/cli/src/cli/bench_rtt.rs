//! `ferry bench-rtt`.

/// Arguments of the hidden `bench-rtt` command.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM.
    pub name: String,
    /// Samples of each measurement.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// Guest vsock port of an echo server; skipped when absent.
    #[arg(long)]
    pub echo_port: Option<u32>,
}
