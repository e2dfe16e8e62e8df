//! What users can type: the `ferry` command line, its subcommands and their
//! arguments. Nothing here runs anything (`commands` does), and nothing here
//! depends on the rest of the CLI, so `build.rs` includes this module to
//! render the man pages from the same definition.

pub mod bake;
pub mod bench_dirty;
pub mod bench_pool;
pub mod bench_rtt;
pub mod boot;
pub mod completions;
pub mod cp;
pub mod exec;
pub mod fork;
pub mod gc;
pub mod images;
pub mod inspect;
pub mod install;
pub mod logs;
pub mod ls;
pub mod migrate;
pub mod restore;
pub mod rm;
pub mod snapshot;
pub mod stop;
pub mod store;
pub mod template;
pub mod vms;

use clap::{Parser, Subcommand};

/// ferry runs Linux microVMs and hands running ones off between hosts.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, long_about = None, after_long_help = EXIT_STATUS)]
pub struct Cli {
    /// Print machine-readable JSON: results on stdout, an error as one JSON
    /// object {code, message, hint, retryable} on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The exit statuses, as Docker's.
const EXIT_STATUS: &str = "Exit status: 0 on success; for `exec` and attached `boot`, \
the command's own status (128+N if signal N ended it), 126 if it cannot be executed, \
127 if it is not found; 125 when ferry itself failed (usage errors included). \
With --json, errors are one JSON object {code, message, hint, retryable} on stderr.";

/// Every subcommand.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Prepare everything ferry needs on this machine: host packages, the guest
    /// kernel and the base root filesystem. Safe to run again; a warm run takes seconds.
    Install(install::Args),
    /// Boot a VM. Attached (default): run the command, stream its output, exit with
    /// its status, and remove the VM. With --detach: keep it running in the background.
    Boot(boot::Args),
    /// Pull an image from an OCI or Docker registry into ferry's image cache.
    Pull(images::PullArgs),
    /// List pulled images.
    Images,
    /// Remove pulled images.
    Rmi(images::RmiArgs),
    /// Build a rootfs image: boot a VM, copy files in, run steps, export a tarball.
    Bake(bake::Args),
    /// Run a command in a running VM.
    ///
    /// `ferry exec [OPTIONS] NAME CMD [ARGS...]`: options go before NAME, and
    /// everything from CMD on is the command's (`ferry exec -it web sh`,
    /// `ferry exec web ls -la`). Exits with the command's status (128+N if
    /// signal N ended it), 126 if it cannot be executed, 127 if it is not
    /// found, 125 if ferry itself failed.
    Exec(exec::Args),
    /// Copy files or directory trees between the host and a VM (NAME:/path on one side).
    Cp(cp::Args),
    /// List running VMs (-a: stopped ones too, -q: names only).
    Ps(ls::Args),
    /// List all VMs, stopped ones too (-q: names only).
    Ls(ls::Args),
    /// Show a VM's console output.
    Logs(logs::Args),
    /// Stop VMs: ask each guest to power off, and end the VM after --time seconds.
    Stop(stop::Args),
    /// End VMs at once, without asking their guests.
    Kill(vms::Args),
    /// Freeze VMs' vCPUs; memory, devices and port forwards stay.
    Pause(vms::Args),
    /// Let paused VMs run again.
    Resume(vms::Args),
    /// Freeze a running VM into a bundle (a file, or `-` for stdout); the VM stops
    /// unless --leave-running.
    ///
    /// Before it pauses a running VM, ferry notes which pages the guest touches
    /// (until it is quiet, at most 2 s) and stores them where a restore maps them
    /// at once: the restored VM runs again without waiting on decompression.
    Snapshot(snapshot::Args),
    /// Thaw a bundle (a file, `-` for stdin, or a pushed VM's
    /// s3://BUCKET/PREFIX/DIGEST) into a running VM.
    Restore(restore::Args),
    /// Push a running VM (it keeps running unless --stop) or a bundle file to
    /// an S3 store (s3://BUCKET/PREFIX) as content-addressed chunks: only the
    /// chunks the store lacks are uploaded. Prints the pushed VM's address.
    /// Credentials and endpoint come from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL or ~/.aws.
    Push(store::PushArgs),
    /// Fetch a pushed VM (s3://BUCKET/PREFIX/DIGEST) into a bundle file.
    PullBundle(store::PullBundleArgs),
    /// Move a running VM to another host while it runs: memory is copied in
    /// rounds, then the VM pauses for the last changes and runs on there.
    Migrate(migrate::Args),
    /// Take in a VM migrating from another host (`ferry migrate`).
    Receive(migrate::ReceiveArgs),
    /// Clone a running VM; all copies continue from the same instant, sharing
    /// memory and disk copy-on-write.
    Fork(fork::Args),
    /// Describe a VM or a bundle.
    Inspect(inspect::Args),
    /// Delete VMs and their state.
    Rm(rm::Args),
    /// Remove what interrupted ferry commands and VMs left behind: unfinished
    /// files, stale snapshot streams, fork disk layers no VM uses, received
    /// bundles kept after failed restores. Never touches what a VM uses.
    Gc(gc::Args),
    /// Boot templates: a saved, freshly booted guest that later boots of the same
    /// shape (image, kernel, vCPUs, memory) restore instead of booting a kernel.
    Template(template::Args),
    /// Print a shell completion script: `source <(ferry completions bash)`.
    Completions(completions::Args),
    /// Measure round trips into a VM (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchRtt(bench_rtt::Args),
    /// Pool figures for `cargo xtask bench`: acquire, release + acquire, idle PSS.
    #[command(hide = true)]
    BenchPool(bench_pool::Args),
    /// Guest pages a running VM changed, for the tests and `cargo xtask bench`.
    #[command(hide = true)]
    BenchDirty(bench_dirty::Args),
}

#[cfg(test)]
mod tests;

/// Parses `K=V`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}
