//! `ferry pull`, `ferry images` and `ferry rmi`: images from OCI and Docker
//! registries.

/// Arguments of `ferry pull`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// The image: `[REGISTRY/]REPOSITORY[:TAG|@sha256:DIGEST]`.
    pub reference: String,
    /// Speak plain HTTP to this registry (`HOST[:PORT]`); loopback registries
    /// always are. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
}

/// Arguments of `ferry rmi`.
#[derive(clap::Args, Debug)]
pub struct RmiArgs {
    /// Images, by reference, digest or id.
    #[arg(required = true)]
    pub names: Vec<String>,
}
