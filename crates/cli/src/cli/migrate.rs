//! `ferry migrate` and `ferry receive`.

/// Arguments of `ferry migrate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The running VM.
    pub name: String,
    /// `HOST:PORT` of a `ferry receive --listen`, or `-` with --via.
    pub dest: String,
    /// The pause the VM may see, in milliseconds: memory is copied in rounds
    /// while it runs until the last round is estimated to fit.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Bytes per second at most on the link (suffixes K, M, G: powers of 1024).
    #[arg(long, value_name = "RATE")]
    pub bandwidth_limit: Option<String>,
    /// The token `ferry receive` printed (or FERRY_MIGRATE_TOKEN).
    #[arg(long, env = "FERRY_MIGRATE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Run the protocol over this command's standard input and output
    /// instead of TCP (DEST is `-`), e.g. 'ssh host-b ferry receive --stdio'.
    #[arg(long, value_name = "CMD")]
    pub via: Option<String>,
}

/// Arguments of `ferry receive`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["listen", "stdio"])))]
pub struct ReceiveArgs {
    /// Listen on ADDR:PORT for one migrating VM; prints the one-time token
    /// the source must give.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Speak the protocol on standard input and output (for `--via`).
    #[arg(long)]
    pub stdio: bool,
    /// Name of the VM here (default: its name on the source).
    #[arg(long)]
    pub name: Option<String>,
    /// What the VM may have of this host.
    #[command(flatten)]
    pub grants: super::restore::Grants,
}
