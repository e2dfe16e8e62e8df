//! `ferry cp`.

/// Arguments of `ferry cp`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Copy directory trees (modes and symlinks kept). Directories are copied
    /// whole with or without it, as `docker cp` does.
    #[arg(short, long)]
    pub recursive: bool,
    /// Source: a host path, or NAME:/path in a VM.
    pub src: String,
    /// Destination: a host path, or NAME:/path in a VM. An existing directory
    /// receives the source under its own name.
    pub dst: String,
}
