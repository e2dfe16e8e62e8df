//! `ferry gc`.

/// Arguments of `ferry gc`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Collect an S3 store (s3://BUCKET/PREFIX) instead of this host: remove
    /// the chunks no pushed VM refers to.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// With --store: only chunks written more than this many seconds ago
    /// (a push still uploading has not named its chunks yet).
    #[arg(long, value_name = "SECS", default_value_t = 3600, requires = "store")]
    pub min_age: u64,
}
