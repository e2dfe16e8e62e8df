//! `ferry`: boot, freeze, move and fork Linux microVMs.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_runtime::Failure;

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
    let result: Result<(), Failure> = match cli.command {
        Command::Install(args) => commands::install::run(args, cli.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if cli.json {
                println!("{}", serde_json::json!({ "ok": false, "error": failure }));
            } else {
                eprintln!("{failure}");
            }
            ExitCode::FAILURE
        }
    }
}
