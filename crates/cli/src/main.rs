//! `ferry`: boot, freeze, move and fork Linux microVMs.

mod cli;
mod commands;
mod exit;
mod output;
mod progress;
mod terminal;

use std::process::ExitCode;

use clap::Parser;
use ferry::{Failure, Runtime};

use cli::{Cli, Command};
use output::Output;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return output::usage(e, &args),
    };
    let out = Output { json: cli.json };
    if let Command::Completions(args) = cli.command {
        // Needs no runtime.
        commands::completions::run(args);
        return ExitCode::SUCCESS;
    }
    let rt = match Runtime::new(ferry::Config::default()) {
        Ok(rt) => rt,
        Err(e) => return out.fail(&Failure::from(e)),
    };
    // What interrupted commands left: a cheap look at every start (`ferry gc`
    // does more, and reports it all).
    if !matches!(cli.command, Command::Gc(_)) {
        let _ = rt.sweep();
    }
    match commands::run(&rt, cli.command, &out) {
        Ok(status) => ExitCode::from(status),
        Err(failure) => out.fail(&failure),
    }
}
