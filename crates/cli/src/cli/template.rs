//! `ferry template`.

use std::path::PathBuf;

/// Arguments of `ferry template`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub action: Action,
}

/// What `ferry template` does.
#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Boot a VM of this shape once and save it as the template for later boots
    /// (replaces an older template of the same shape).
    Create {
        /// Number of vCPUs.
        #[arg(long, value_name = "N")]
        cpus: Option<u32>,
        /// Guest memory in MiB.
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// Guest kernel (vmlinux); default: the one `ferry install` built.
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// Root filesystem image; default: the base Debian image.
        #[arg(value_name = "IMAGE")]
        image: Option<PathBuf>,
    },
    /// List templates.
    Ls,
    /// Delete templates by id, or all of them.
    Rm {
        /// Template ids (from `ferry template ls`).
        ids: Vec<String>,
        /// Delete every template.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}
