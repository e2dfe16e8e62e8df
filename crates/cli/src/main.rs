//! `ferry`: boot, freeze, move and fork Linux microVMs.

mod commands;
mod terminal;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::{Failure, Runtime};

/// ferry runs Linux microVMs and hands running ones off between hosts.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    /// Print machine-readable JSON where the command supports it.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare everything ferry needs on this machine: host packages, the guest
    /// kernel and the base root filesystem. Safe to run again; a warm run takes seconds.
    Install(commands::install::Args),
    /// Boot a VM. Attached (default): run the command, stream its output, exit with
    /// its status, and remove the VM. With --detach: keep it running in the background.
    Boot(commands::boot::Args),
    /// Build a rootfs image: boot a VM, copy files in, run steps, export a tarball.
    Bake(commands::bake::Args),
    /// Run a command in a running VM; its exit status becomes ferry's.
    Exec(commands::exec::Args),
    /// Copy a file between the host and a VM (NAME:/path on one side).
    Cp(commands::cp::Args),
    /// List VMs.
    Ls(commands::ls::Args),
    /// Show a VM's console output.
    Logs(commands::logs::Args),
    /// Stop running VMs.
    Stop(commands::stop::Args),
    /// Freeze a running VM into a bundle (a file, or `-` for stdout); the VM stops
    /// unless --leave-running.
    Snapshot(commands::snapshot::Args),
    /// Thaw a bundle (a file, or `-` for stdin) into a running VM.
    Restore(commands::restore::Args),
    /// Clone a running VM; both continue from the same instant, sharing memory
    /// and disk copy-on-write.
    Fork(commands::fork::Args),
    /// Describe a VM or a bundle.
    Inspect(commands::inspect::Args),
    /// Delete VMs and their state.
    Rm(commands::rm::Args),
    /// Remove what interrupted ferry commands and VMs left behind: unfinished
    /// files, stale snapshot streams, fork disk layers no VM uses, received
    /// bundles kept after failed restores. Never touches what a VM uses.
    Gc(commands::gc::Args),
    /// Boot templates: a saved, freshly booted guest that later boots of the same
    /// shape (image, kernel, vCPUs, memory) restore instead of booting a kernel.
    Template(commands::template::Args),
    /// Measure round trips into a VM (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchRtt(commands::bench_rtt::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json = cli.json;
    let rt = match Runtime::new(ferry::Config::default()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{}", Failure::from(e));
            return ExitCode::FAILURE;
        }
    };
    let rt = &rt;
    // What interrupted commands left: a cheap look at every start (`ferry gc`
    // does more, and reports it all).
    if !matches!(cli.command, Command::Gc(_)) {
        let _ = rt.sweep();
    }
    let done = |r: Result<(), Failure>| r.map(|()| 0);
    let result: Result<i32, Failure> = match cli.command {
        Command::Install(args) => done(commands::install::run(rt, args, json)),
        Command::Boot(args) => commands::boot::run(rt, args, json),
        Command::Exec(args) => commands::exec::run(rt, args),
        Command::Bake(args) => commands::bake::run(rt, args, json),
        Command::Cp(args) => done(commands::cp::run(rt, args)),
        Command::Ls(args) => done(commands::ls::run(rt, args, json)),
        Command::Logs(args) => done(commands::logs::run(rt, args)),
        Command::Stop(args) => done(commands::stop::run(rt, args)),
        Command::Rm(args) => done(commands::rm::run(rt, args)),
        Command::Gc(args) => done(commands::gc::run(rt, args, json)),
        Command::Snapshot(args) => done(commands::snapshot::run(rt, args, json)),
        Command::Restore(args) => done(commands::restore::run(rt, args, json)),
        Command::Fork(args) => done(commands::fork::run(rt, args, json)),
        Command::Inspect(args) => done(commands::inspect::run(rt, args, json)),
        Command::Template(args) => done(commands::template::run(rt, args, json)),
        Command::BenchRtt(args) => done(commands::bench_rtt::run(rt, args)),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(failure) => {
            if json {
                println!("{}", serde_json::json!({ "ok": false, "error": failure }));
            } else {
                eprintln!("{failure}");
            }
            ExitCode::FAILURE
        }
    }
}
