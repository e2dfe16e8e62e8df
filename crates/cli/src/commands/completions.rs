//! `ferry completions`: shell completion scripts, from the CLI definition.

use clap::CommandFactory;

use crate::cli::completions::{Args, Shell};
use crate::cli::Cli;

/// Prints the completion script for the shell on stdout.
pub fn run(args: Args) {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
}
