//! Renders ferry's man pages from the CLI definition (`src/cli/`, which
//! depends on nothing else of the CLI): `ferry.1` and one page per
//! subcommand (`ferry-exec.1`, ...) in `$OUT_DIR/man`, where `cargo xtask
//! install` finds them.

use std::path::PathBuf;

use clap::CommandFactory;

#[allow(dead_code)]
#[path = "src/cli/mod.rs"]
mod cli;

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=src/cli");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("man");
    std::fs::create_dir_all(&out)?;
    clap_mangen::generate_to(cli::Cli::command(), &out)
}
