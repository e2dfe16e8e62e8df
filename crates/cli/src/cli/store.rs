//! `ferry push` and `ferry pull-bundle`.

/// Arguments of `ferry push`.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// A running VM's name, or a bundle file.
    pub source: String,
    /// The store: s3://BUCKET/PREFIX.
    pub store: String,
    /// Stop the VM after its snapshot (a hand-off); by default it keeps running.
    #[arg(long)]
    pub stop: bool,
}

/// Arguments of `ferry pull-bundle`.
#[derive(clap::Args, Debug)]
pub struct PullBundleArgs {
    /// The pushed VM: s3://BUCKET/PREFIX/DIGEST, as `ferry push` printed it.
    pub url: String,
    /// Where to write the bundle.
    pub path: std::path::PathBuf,
}
