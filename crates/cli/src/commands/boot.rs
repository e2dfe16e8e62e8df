//! `ferry boot`: create and start a VM.

use std::io::IsTerminal;

use ferry::{BootOptions, Failure, Runtime};

use super::exec::{run_in, ExecOptions};
use crate::cli::boot::Args;
use crate::output::Output;
use crate::progress::Display;

/// Boots; an attached boot gives the command's exit status (see [`crate::exit`]).
pub fn run(rt: &Runtime, args: Args, out: &Output) -> Result<u8, Failure> {
    let command = (!args.command.is_empty()).then(|| args.command.clone());
    let mounts = ferry::parse::mounts(&args.mount, &args.live_mount)?;
    let ports = super::parse_ports(&args.publish)?;
    let display = Display::new(out.json);
    if let Some(image) = &args.image {
        // A tarball's first boot converts it: seconds to minutes.
        rt.prepare_image(image, &display.steps())?;
    }
    let opts = BootOptions {
        name: args.name.clone(),
        cpus: args.cpus,
        memory_mib: args.memory,
        kernel: args.kernel.clone(),
        image: args.image.clone(),
        // Detached: the command is the VM's main process. Attached: it runs
        // through exec so its output and exit status come back here.
        cmd: if args.detach { command.clone() } else { None },
        run_image_command: args.detach,
        env: args.env.iter().cloned().collect(),
        workdir: args.workdir.clone(),
        ephemeral: !args.detach,
        mounts,
        ports,
        net: args.net,
        cold: args.cold,
    };
    let machine = {
        let _booting = display.spinner(&match &args.name {
            Some(name) => format!("booting {name}"),
            None => "booting".to_string(),
        });
        rt.boot(opts)?
    };
    if args.detach {
        if out.json {
            out.json(
                &serde_json::json!({ "ok": true, "name": machine.name(), "dir": machine.dir() }),
            );
        } else {
            println!("{}", machine.name());
        }
        return Ok(0);
    }
    let interactive = std::io::stdin().is_terminal();
    // Attached commands run through exec: give them the image's env, workdir
    // and user as a detached main process gets them (flags win).
    let image = machine.image_config(rt);
    let (argv, tty) = match command.or_else(|| image.cmd.clone()) {
        Some(argv) => (argv, false),
        None if interactive => (vec!["/bin/bash".to_string(), "-l".to_string()], true),
        None => {
            let _ = machine.remove();
            return Err(Failure {
                code: "BOOT_NO_COMMAND".into(),
                message: "nothing to run: no command given and the image has none".into(),
                hint: Some("add `-- CMD ARGS...`, or use --detach to keep the VM running".into()),
            });
        }
    };
    let opts = ExecOptions {
        interactive: tty,
        tty,
        env: image.env.into_iter().chain(args.env).collect(),
        workdir: args.workdir.or(image.workdir),
        user: image.user,
        timeout: None,
    };
    let result = run_in(&machine, argv, &opts, out);
    let _ = machine.remove();
    result
}
