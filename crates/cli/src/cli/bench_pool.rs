//! `ferry bench-pool`.

/// Arguments of the hidden `bench-pool` command.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The snapshot bundle the pools restore.
    pub bundle: std::path::PathBuf,
    /// Samples of acquire and of release + acquire.
    #[arg(long, default_value_t = 30)]
    pub count: usize,
    /// Idle pooled VMs whose memory is measured (0: skip).
    #[arg(long, default_value_t = 20)]
    pub idle_vms: usize,
    /// Seconds the idle VMs settle before their memory is read.
    #[arg(long, default_value_t = 30)]
    pub settle_secs: u64,
}
