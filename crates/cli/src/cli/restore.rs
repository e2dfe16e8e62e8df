//! `ferry restore`.

/// Arguments of `ferry restore`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Bundle file, `-` to read it from stdin, or a pushed VM
    /// (s3://BUCKET/PREFIX/DIGEST, as `ferry push` printed it).
    pub path: String,
    /// Name of the restored VM (default: the name it had when frozen).
    #[arg(long)]
    pub name: Option<String>,
    /// Return once the VM runs instead of following its console.
    #[arg(short, long)]
    pub detach: bool,
    /// Serve a live mount recorded at host path OLD from NEW instead (repeatable).
    #[arg(long = "remap-mount", value_name = "OLD=NEW")]
    pub remap_mount: Vec<String>,
    /// What the VM may have of this host.
    #[command(flatten)]
    pub grants: Grants,
    /// Where else to look for the parents of an incremental bundle
    /// (repeatable; they are looked for beside it first).
    #[arg(long = "parent", value_name = "PATH")]
    pub parent: Vec<std::path::PathBuf>,
}

/// What a VM arriving on this host (restored or migrated) may have of it:
/// its record asks, these flags grant.
#[derive(clap::Args, Debug)]
pub struct Grants {
    /// Confirm a live mount the VM records, by its host directory
    /// (HOST or HOST:GUEST[:ro|rw]; repeatable).
    #[arg(long = "live-mount", value_name = "HOST")]
    pub live_mount: Vec<String>,
    /// Confirm the VM's outbound networking.
    #[arg(long)]
    pub net: bool,
    /// Grant whatever the VM's record asks for (live mounts, networking,
    /// forwards on any address): only for bundles and sources you trust.
    #[arg(long)]
    pub trust_bundle_config: bool,
    /// Forward a host port into the VM: [HOST_IP:]HOST_PORT:GUEST_PORT (repeatable;
    /// replaces the forwards the VM records; binds 127.0.0.1 unless an
    /// address is given).
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
}
