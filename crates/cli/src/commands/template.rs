//! `ferry template`: boot templates, saved freshly booted guests that later
//! boots of the same shape restore instead of booting a kernel.

use ferry::{BootOptions, Failure, Runtime};

use crate::cli::template::{Action, Args};
use crate::progress::Display;

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
            let display = Display::new(json);
            if let Some(image) = &opts.image {
                rt.prepare_image(image, &display.steps())?;
            }
            let info = {
                let _creating = display.spinner("creating the template: booting, then saving");
                rt.create_template(&opts)?
            };
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
