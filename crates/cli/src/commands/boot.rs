//! `ferry boot`: create and start a VM.

use std::io::IsTerminal;
use std::path::PathBuf;

use ferry::{BootOptions, Failure, Runtime};

use super::exec::{run_in, ExecOptions};

/// Arguments of `ferry boot`.
#[derive(clap::Args)]
pub struct Args {
    /// Name of the VM (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// Guest kernel (vmlinux); default: the one `ferry install` built.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Start the VM in the background and print its name.
    #[arg(short, long)]
    pub detach: bool,
    /// Set an environment variable for the command (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory of the command.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Forward a host TCP port to a guest port (repeatable). The host side
    /// listens on 127.0.0.1 unless HOST_IP is given; the guest side is
    /// 127.0.0.1:GUEST_PORT inside the VM. Needs no guest network.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
    /// Give the VM outbound networking (user-mode, through passt): eth0 with
    /// 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3.
    #[arg(long)]
    pub net: bool,
    /// Boot the kernel even if a boot template of this shape exists
    /// (see `ferry template`).
    #[arg(long)]
    pub cold: bool,
    /// Root filesystem: a rootfs tarball (.tar, .tar.gz, .tar.zst) or an ext4
    /// image; default: the base Debian image.
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Copy a host directory or file into the VM's disk at boot:
    /// HOST:GUEST, or HOST:GUEST:ro for a read-only copy (repeatable).
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro]")]
    pub mount: Vec<String>,
    /// Share a host directory live through virtio-fs: HOST:GUEST[:ro|rw],
    /// read-write by default (repeatable).
    #[arg(long = "live-mount", value_name = "HOST:GUEST[:ro|rw]")]
    pub live_mount: Vec<String>,
    /// Command to run (default: the image's command).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Boots; attached boots return the command's exit code.
pub fn run(rt: &Runtime, args: Args, json: bool) -> Result<i32, Failure> {
    let command = (!args.command.is_empty()).then(|| args.command.clone());
    let mounts = ferry::parse::mounts(&args.mount, &args.live_mount)?;
    let ports = super::parse_ports(&args.publish)?;
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
    let machine = rt.boot(opts)?;
    if args.detach {
        if json {
            println!(
                "{}",
                serde_json::json!({ "ok": true, "name": machine.name(), "dir": machine.dir() })
            );
        } else {
            println!("{}", machine.name());
        }
        return Ok(0);
    }
    let interactive = std::io::stdin().is_terminal();
    // Attached commands run through exec: give them the image's env and workdir
    // as a detached main process gets them (flags win).
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
        user: None,
        timeout: None,
    };
    let result = run_in(&machine, argv, &opts);
    let _ = machine.remove();
    result
}
