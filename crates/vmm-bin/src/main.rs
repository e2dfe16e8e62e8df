//! `ferry-vmm DIR`: the VMM process of one VM. A ferry runtime starts it
//! after writing the VM's record and plan into its state directory `DIR`
//! (see `ferry_runtime::plan`); it runs the VM until it ends. Not for direct use.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (Some(dir), None) if dir != "--help" && dir != "-h" => {
            ferry_runtime::vmm_process::run(&PathBuf::from(dir))
        }
        _ => {
            eprintln!(
                "usage: ferry-vmm DIR\n\nRuns the VM whose state directory is DIR. \
                 ferry starts this itself; use `ferry boot` instead."
            );
            ExitCode::from(2)
        }
    }
}
