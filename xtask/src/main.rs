//! Developer tasks for ferry: `cargo xtask <task>`.

mod bench;
mod install;
mod suite;
mod testhost;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for ferry")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Test hosts: QEMU VMs with nested KVM where ferry runs.
    Testhost {
        #[command(subcommand)]
        action: TesthostAction,
    },
    /// Run the whole test suite: unit tests, then every test-host test, with a
    /// timing summary. Installs what it needs.
    Test {
        /// Only run tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Skip the unit tests.
        #[arg(long)]
        no_unit: bool,
    },
    /// Set everything up and run the main job in a test host: boot a VM, run a command.
    Demo,
    /// Benchmark ferry against QEMU's microvm machine in one test host (not part
    /// of the test suite).
    Bench {
        /// Runs per metric and side (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Only this group of metrics ("restore": snapshot size, restore and
        /// the ticking-guest restores with their phases; "migrate": the
        /// downtime of a live migration against a frozen hand-off; "s3": a
        /// lazy restore from an S3 store against downloading the bundle).
        #[arg(long, value_parser = ["restore", "migrate", "s3"])]
        only: Option<String>,
    },
    /// Build ferry's release binaries (`ferry`, `ferry-vmm`, `ferry-agent`)
    /// and install them into PREFIX/bin.
    Install {
        /// Installation prefix; the binaries go into PREFIX/bin.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
}

#[derive(Subcommand)]
enum TesthostAction {
    /// Boot test hosts and run one script in each; exits 0 only if all scripts do.
    Run {
        /// Number of hosts (defaults to the number of scripts).
        #[arg(long)]
        hosts: Option<usize>,
        /// Seconds before every host is stopped and the run fails.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// NAME=PATH: the script host NAME (host-a, host-b, ...) runs as root.
        #[arg(long = "script", value_name = "NAME=PATH", required = true)]
        scripts: Vec<String>,
        /// Memory per host in MiB.
        #[arg(long, default_value_t = 3072)]
        memory: u32,
        /// vCPUs per host (more than one risks the emulator stall described
        /// at `testhost::HOST_CPUS`).
        #[arg(long, default_value_t = testhost::HOST_CPUS)]
        cpus: u32,
    },
    /// Build (or refresh) the test host assets without running anything.
    Prepare,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().task {
        Task::Testhost { action } => match action {
            TesthostAction::Prepare => testhost::prepare().map(|_| ()),
            TesthostAction::Run {
                hosts,
                timeout,
                scripts,
                memory,
                cpus,
            } => {
                let specs = parse_scripts(&scripts, hosts)?;
                let prepared = testhost::prepare()?;
                let opts = testhost::RunOptions {
                    hosts: specs,
                    timeout: Duration::from_secs(timeout),
                    memory_mib: memory,
                    cpus,
                    run_dir: testhost::new_run_dir("run"),
                    stream: true,
                };
                let outcomes = testhost::run(&prepared, &opts)?;
                testhost::check(&outcomes)?;
                let _ = std::fs::remove_dir_all(&opts.run_dir);
                Ok(())
            }
        },
        Task::Test { filter, no_unit } => suite::run(filter.as_deref(), !no_unit),
        Task::Demo => suite::demo(),
        Task::Bench { runs, only } => bench::run(runs, only.as_deref()),
        Task::Install { prefix } => install::run(&prefix),
    }
}

/// Turns `NAME=PATH` arguments into host specs ordered host-a, host-b, ...
fn parse_scripts(args: &[String], hosts: Option<usize>) -> Result<Vec<testhost::HostSpec>> {
    let count = hosts.unwrap_or(args.len());
    if count != args.len() {
        bail!(
            "--hosts {count} needs exactly {count} --script NAME=PATH (one per host), got {}",
            args.len()
        );
    }
    let mut specs: Vec<Option<testhost::HostSpec>> = vec![None; count];
    for a in args {
        let (name, path) = a
            .split_once('=')
            .with_context(|| format!("--script {a}: expected NAME=PATH"))?;
        let idx = (0..count)
            .find(|&i| testhost::host_name(i) == name)
            .with_context(|| {
                format!(
                    "--script {a}: NAME must be one of host-a .. {}",
                    testhost::host_name(count - 1)
                )
            })?;
        let script = PathBuf::from(path);
        if !script.is_file() {
            bail!("--script {a}: no such file");
        }
        if specs[idx].is_some() {
            bail!("--script {a}: {name} given twice");
        }
        specs[idx] = Some(testhost::HostSpec {
            name: name.to_string(),
            script: std::fs::canonicalize(script)?,
        });
    }
    Ok(specs
        .into_iter()
        .map(|s| s.expect("all names filled"))
        .collect())
}
