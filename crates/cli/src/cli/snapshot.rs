//! `ferry snapshot`.

/// Arguments of `ferry snapshot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VM.
    pub name: String,
    /// Bundle file to write, or `-` to stream it to stdout.
    pub path: String,
    /// Keep the VM running (by default it stops: a hand-off never leaves two live copies).
    #[arg(long)]
    pub leave_running: bool,
    /// Leave out the disk image the VM booted from (only its content id is kept):
    /// a much smaller bundle that restores only on hosts that have that image.
    #[arg(long)]
    pub thin: bool,
    /// Store guest memory uncompressed (bigger bundle; restore maps it without decoding).
    #[arg(long, conflicts_with = "compact")]
    pub raw_memory: bool,
    /// Compress the pages the guest touched last too: the smallest bundle, and
    /// the restore decodes them before the guest runs instead of mapping them.
    #[arg(long)]
    pub compact: bool,
    /// Write an incremental bundle: only the memory pages and disk clusters
    /// changed since PARENT, an earlier snapshot of this running VM taken
    /// with --leave-running. Restoring it needs PARENT (beside it, or --parent).
    #[arg(long, value_name = "PARENT")]
    pub since: Option<std::path::PathBuf>,
}
