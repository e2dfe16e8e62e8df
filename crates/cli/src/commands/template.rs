//! `ferry template`: boot templates, saved freshly booted guests that later
//! boots of the same shape restore instead of booting a kernel.

use std::path::PathBuf;

use ferry::{BootOptions, Failure, Runtime};

/// Arguments of `ferry template`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
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

/// Runs a template action.
pub fn run(rt: &Runtime, args: Args, json: bool) -> Result<(), Failure> {
    match args.action {
        Action::Create {
            cpus,
            memory,
            kernel,
            image,
        } => {
            let opts = BootOptions {
                cpus,
                memory_mib: memory,
                kernel,
                image,
                ..BootOptions::default()
            };
            let info = rt.create_template(&opts)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).expect("serializable")
                );
            } else {
                println!(
                    "template {} ({}, {} vCPU, {} MiB): {} bytes",
                    info.id, info.image, info.key.cpus, info.key.memory_mib, info.bytes
                );
            }
            Ok(())
        }
        Action::Ls => {
            let all = rt.templates();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&all).expect("serializable")
                );
                return Ok(());
            }
            println!(
                "{:<26} {:>4} {:>7} {:>10}  IMAGE",
                "ID", "CPUS", "MEMORY", "BYTES"
            );
            for t in all {
                println!(
                    "{:<26} {:>4} {:>6}M {:>10}  {}",
                    t.id, t.key.cpus, t.key.memory_mib, t.bytes, t.image
                );
            }
            Ok(())
        }
        Action::Rm { ids, all } => {
            let ids: Vec<String> = if all {
                rt.templates().into_iter().map(|t| t.id).collect()
            } else {
                ids
            };
            for id in ids {
                rt.remove_template(&id)?;
            }
            Ok(())
        }
    }
}
