//! The workspace's own build products: ferry's release binaries and its assets.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The target the guest agent is built for (statically linked).
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Release binaries that go into a test host.
pub struct Binaries {
    /// The `ferry` CLI.
    pub ferry: PathBuf,
    /// The static guest agent.
    pub agent: PathBuf,
}

impl Binaries {
    /// All binaries, for copying.
    pub fn all(&self) -> [&Path; 2] {
        [&self.ferry, &self.agent]
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds ferry and the static agent in release mode.
pub fn build_binaries() -> Result<Binaries> {
    let status = cargo()
        .args(["build", "--release", "--package", "ferry-cli"])
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("building ferry failed");
    }
    // --target keeps the static flags away from build scripts and host artifacts.
    let status = cargo()
        .args([
            "build",
            "--release",
            "--package",
            "ferry-agent",
            "--target",
            AGENT_TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("building ferry-agent failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(Binaries {
        ferry: target.join("release/ferry"),
        agent: target.join(AGENT_TARGET).join("release/ferry-agent"),
    })
}

/// Runs `ferry install` and returns the cache directories of the assets it reports.
pub fn ferry_install(binaries: &Binaries) -> Result<Vec<PathBuf>> {
    let out = Command::new(&binaries.ferry)
        .args(["install", "--json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run ferry install")?;
    if !out.status.success() {
        bail!("ferry install failed");
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse ferry install --json")?;
    let dir_of = |p: &serde_json::Value| -> Result<PathBuf> {
        let p = p.as_str().context("asset path missing")?;
        Ok(Path::new(p).parent().context("asset path")?.to_path_buf())
    };
    Ok(vec![
        dir_of(&v["kernel"]["vmlinux"])?,
        dir_of(&v["rootfs"]["ext4"])?,
    ])
}
