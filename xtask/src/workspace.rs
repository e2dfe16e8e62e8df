//! The workspace's own build products: ferry's release binaries and its assets.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ferry_runtime::fsutil;

/// The target ferry and its agent are built for. Naming it keeps the static
/// flags below away from build scripts and proc-macros, which cannot be static.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The binaries are static and position-dependent. The agent must be static
/// (it is the initramfs `/init`); `ferry` starts once per command and once
/// per VMM, and without a dynamic loader or start-up relocations it starts in
/// about a sixth of the time under emulation (10 ms against 55 ms in a test
/// host), because every page the loader touches is a costly fault there. The
/// price is a fixed address for the executable's own image; its heap, stacks,
/// and guest memory mappings stay randomized.
const RUSTFLAGS: &str = "-C target-feature=+crt-static -C relocation-model=static";

/// Release binaries that go into a test host.
pub struct Binaries {
    /// The `ferry` CLI.
    pub ferry: PathBuf,
    /// `ferry-vmm`, the VMM process of each VM.
    pub vmm: PathBuf,
    /// The static guest agent.
    pub agent: PathBuf,
    /// `ferry-exec-floor`, which the benchmark copies into a guest.
    pub exec_floor: PathBuf,
    /// `ferry-churn`, the memory-rewriting guest program of the migration
    /// test and benchmark.
    pub churn: PathBuf,
    /// The `ferry` crate's examples (one of them, `api_check`, is a test).
    pub examples: Vec<PathBuf>,
    /// The man pages the CLI's build script rendered (`ferry.1`, `ferry-exec.1`, ...).
    pub man: PathBuf,
}

/// The `ferry` crate's examples, built static for test hosts.
const EXAMPLES: &[&str] = &[
    "api_check",
    "boot_and_stream",
    "snapshot_restore",
    "fork_three",
    "exec_rtt",
];

impl Binaries {
    /// All binaries, for copying.
    pub fn all(&self) -> Vec<&Path> {
        let mut all = vec![
            self.ferry.as_path(),
            self.vmm.as_path(),
            self.agent.as_path(),
            self.exec_floor.as_path(),
            self.churn.as_path(),
        ];
        all.extend(self.examples.iter().map(PathBuf::as_path));
        all
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

/// Builds ferry, the agent and the benchmark's guest program in release mode, static.
pub fn build_binaries() -> Result<Binaries> {
    // JSON messages on stdout say where build scripts wrote their output;
    // diagnostics still go to the terminal.
    let out = cargo()
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "--release",
            "--package",
            "ferry-cli",
            "--package",
            "ferry-vmm-bin",
            "--package",
            "ferry-agent",
            "--package",
            "ferry-bench-guest",
        ])
        .args(["--target", TARGET])
        .env("RUSTFLAGS", RUSTFLAGS)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo")?;
    if !out.status.success() {
        bail!("building ferry failed");
    }
    let man = cli_out_dir(&out.stdout)
        .context("cargo did not report the ferry CLI's build script output")?
        .join("man");
    let status = cargo()
        .args(["build", "--release", "--package", "ferry", "--examples"])
        .args(["--target", TARGET])
        .env("RUSTFLAGS", RUSTFLAGS)
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("building the ferry crate's examples failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let dir = target.join(TARGET).join("release");
    Ok(Binaries {
        ferry: dir.join("ferry"),
        vmm: dir.join("ferry-vmm"),
        agent: dir.join("ferry-agent"),
        exec_floor: dir.join("ferry-exec-floor"),
        churn: dir.join("ferry-churn"),
        examples: EXAMPLES
            .iter()
            .map(|e| dir.join("examples").join(e))
            .collect(),
        man,
    })
}

/// The files of the `@ferry/runtime` package beside its native addon.
const NODE_PACKAGE_FILES: &[&str] = &[
    "package.json",
    "index.js",
    "index.mjs",
    "index.d.ts",
    "README.md",
];

/// Builds the Node.js addon (`sdk/node`) and packs `@ferry/runtime` with
/// `npm pack`; returns the tarball. The addon is a shared library loaded by
/// `node`, so it is built without the static flags of the binaries above
/// (and into `target/release`, beside no other build of them).
pub fn build_node_package() -> Result<PathBuf> {
    let status = cargo()
        .args(["build", "--release", "--package", "ferry-node"])
        .env_remove("RUSTFLAGS")
        .status()
        .context("run cargo")?;
    if !status.success() {
        bail!("building the Node.js addon failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    // Staged and packed in directories of this run's own, then renamed into
    // place: concurrent runs never see the package missing or half-written.
    let stage = target.join(format!("node-package.{}", std::process::id()));
    let packed_dir = target.join(format!("node-packed.{}", std::process::id()));
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&stage);
        let _ = std::fs::remove_dir_all(&packed_dir);
    };
    cleanup();
    std::fs::create_dir_all(&stage)?;
    std::fs::create_dir_all(&packed_dir)?;
    let result = (|| -> Result<PathBuf> {
        let src = root().join("sdk/node");
        for f in NODE_PACKAGE_FILES {
            std::fs::copy(src.join(f), stage.join(f))
                .with_context(|| format!("copy sdk/node/{f}"))?;
        }
        std::fs::copy(
            target.join("release/libferry_node.so"),
            stage.join("ferry.node"),
        )
        .context("copy the addon")?;
        let out = Command::new("npm")
            .args(["pack", "--json", "--pack-destination"])
            .arg(&packed_dir)
            .current_dir(&stage)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("run npm pack (npm comes with Node.js)")?;
        if !out.status.success() {
            bail!("npm pack failed");
        }
        let packed: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parse npm pack --json")?;
        let file = packed[0]["filename"]
            .as_str()
            .context("npm pack named no tarball")?;
        let tarball = target.join(file);
        std::fs::rename(packed_dir.join(file), &tarball)
            .with_context(|| format!("publish {}", tarball.display()))?;
        Ok(tarball)
    })();
    cleanup();
    result
}

/// maturin, which builds and packs the Python wheel; pinned, so the copy
/// cached under ferry's cache directory is reused.
const MATURIN_VERSION: &str = "1.9.6";

/// The maturin executable: cached, else installed from the Python package
/// registry with pip into the cache (a prebuilt binary, seconds), else
/// built with `cargo install` (minutes) where pip is missing.
fn maturin(log: &Path) -> Result<PathBuf> {
    let dir = ferry_runtime::paths::cache_dir().join(format!("tools/maturin-{MATURIN_VERSION}"));
    let bin = dir.join("bin/maturin");
    if bin.is_file() {
        return Ok(bin);
    }
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.parent().context("cache dir")?)?;
    let pip = |staging: &Path| {
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--no-warn-script-location", "--target"])
            .arg(staging)
            .arg(format!("maturin=={MATURIN_VERSION}"))
            // --target installs nothing into the system's Python, which
            // Debian's pip would otherwise refuse to touch.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut ok = pip(&staging);
    if !ok && ferry_runtime::host::debian::ensure_packages(&["python3-pip"], log).is_ok() {
        let _ = std::fs::remove_dir_all(&staging);
        ok = pip(&staging);
    }
    if !ok {
        let _ = std::fs::remove_dir_all(&staging);
        let status = cargo()
            .args(["install", "--locked", "--quiet", "--root"])
            .arg(&staging)
            .args(["--version", MATURIN_VERSION, "maturin"])
            .env_remove("RUSTFLAGS")
            .status()
            .context("run cargo install maturin")?;
        if !status.success() {
            bail!(
                "could not install maturin {MATURIN_VERSION} (pip and cargo install both failed)"
            );
        }
    }
    if !staging.join("bin/maturin").is_file() {
        bail!("the maturin install has no bin/maturin");
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir)?;
    Ok(bin)
}

/// Garage, the S3-compatible object store test hosts run (`s3-server`);
/// pinned, so the build cached under ferry's cache directory is reused.
const GARAGE_VERSION: &str = "2.5.0";

/// The Garage executable: cached, else built from source with `cargo
/// install` (a cold build took 9 minutes on two cores). LMDB is its only metadata
/// engine here: SQLite, K2V and metrics would only add build time.
/// `bundled-libs` (C libraries built from the crates' own sources) is
/// required unless `system-libs` is chosen. Like the Node.js addon it links
/// the build machine's glibc, which the test hosts share (both are Debian's
/// stable).
pub fn garage() -> Result<PathBuf> {
    let tools = ferry_runtime::paths::cache_dir().join("tools");
    // The name carries the build profile: a build of another profile is another tool.
    let dir = tools.join(format!("garage-{GARAGE_VERSION}-o1"));
    let bin = dir.join("bin/garage");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&tools)?;
    fsutil::remove_stale_staging(&tools);
    let staging = fsutil::staging_path(&dir);
    let _ = std::fs::remove_dir_all(&staging);
    eprintln!("building Garage {GARAGE_VERSION} for the test hosts (once; many minutes)");
    let status = cargo()
        .args(["install", "garage", "--version", GARAGE_VERSION, "--locked"])
        .args([
            "--no-default-features",
            "--features",
            "bundled-libs,lmdb",
            "--root",
        ])
        .arg(&staging)
        .env_remove("RUSTFLAGS")
        // A test server moving tens of MiB: opt-level 1 serves it and builds
        // in far less time than the default 3 (it is rebuilt on every cold CI run).
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .status()
        .context("run cargo install garage")?;
    if !status.success() || !staging.join("bin/garage").is_file() {
        let _ = std::fs::remove_dir_all(&staging);
        bail!("building Garage {GARAGE_VERSION} failed");
    }
    if let Err(e) = fsutil::publish(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        // Another run published its build first.
        if !bin.is_file() {
            return Err(e).with_context(|| format!("publish {}", dir.display()));
        }
    }
    Ok(bin)
}

/// Builds the Python package (`sdk/python`): its native extension and pure
/// Python layer in one abi3 wheel for CPython 3.9 and newer; returns the
/// wheel. Like the Node.js addon, the extension is a shared library, built
/// without the static flags of the binaries.
pub fn build_python_wheel(log: &Path) -> Result<PathBuf> {
    let maturin = maturin(log)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    // maturin writes into a directory of this run's own; the wheel is then
    // renamed over the shared one, so a run that is copying it never sees it
    // missing or half-written while another run rebuilds it.
    let out = target.join(format!("python-wheel.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(&maturin)
        .args(["build", "--release", "--quiet", "--compatibility", "linux"])
        .arg("--manifest-path")
        .arg(root().join("sdk/python/Cargo.toml"))
        .arg("--out")
        .arg(&out)
        .current_dir(root())
        .env_remove("RUSTFLAGS")
        .status()
        .context("run maturin")?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&out);
        bail!("building the Python wheel failed");
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    let [built] = wheels.as_slice() else {
        let _ = std::fs::remove_dir_all(&out);
        bail!("maturin left {} wheels in {}", wheels.len(), out.display());
    };
    let shared = target.join("python-wheel");
    std::fs::create_dir_all(&shared)?;
    let wheel = shared.join(built.file_name().context("a wheel without a name")?);
    std::fs::rename(built, &wheel).with_context(|| format!("publish {}", wheel.display()))?;
    let _ = std::fs::remove_dir_all(&out);
    Ok(wheel)
}

/// The `OUT_DIR` of the ferry CLI's build script, from cargo's JSON messages.
fn cli_out_dir(messages: &[u8]) -> Option<PathBuf> {
    String::from_utf8_lossy(messages)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "build-script-executed")
        .filter(|m| {
            // `path+file:///.../crates/cli#ferry-cli@0.1.0`, or the older
            // `ferry-cli 0.1.0 (path+file:///...)`.
            let id = m["package_id"].as_str().unwrap_or("");
            id.contains("#ferry-cli@") || id.starts_with("ferry-cli ")
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
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

/// Builds the musl fixture the test hosts carry for a musl-based image: a
/// program dynamically linked against musl (`xtask/assets/musl-hello.c`,
/// with Debian's `musl-gcc`) and musl's loader; returns their directory.
pub fn build_musl_fixture() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let out = target.join("musl-fixture");
    std::fs::create_dir_all(&out)?;
    let status = Command::new("musl-gcc")
        .args(["-O2", "-s", "-o"])
        .arg(out.join("hello"))
        .arg(root().join("xtask/assets/musl-hello.c"))
        .status()
        .context("run musl-gcc (Debian's musl-tools)")?;
    if !status.success() {
        bail!("musl-gcc failed with {status}");
    }
    let loader = Path::new("/usr/lib/x86_64-linux-musl/libc.so");
    std::fs::copy(loader, out.join("ld-musl-x86_64.so.1"))
        .with_context(|| format!("copy {}", loader.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_build_script_output_is_found_in_cargo_messages() {
        let messages = br#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/cli#ferry-cli@0.1.0"}
{"reason":"build-script-executed","package_id":"path+file:///w/crates/vmm#ferry-vmm@0.1.0","out_dir":"/t/vmm/out"}
not json
{"reason":"build-script-executed","package_id":"path+file:///w/crates/cli#ferry-cli@0.1.0","out_dir":"/t/cli/out"}
"#;
        assert_eq!(cli_out_dir(messages), Some(PathBuf::from("/t/cli/out")));
        let old = br#"{"reason":"build-script-executed","package_id":"ferry-cli 0.1.0 (path+file:///w/crates/cli)","out_dir":"/t/o"}"#;
        assert_eq!(cli_out_dir(old), Some(PathBuf::from("/t/o")));
        assert_eq!(cli_out_dir(b""), None);
    }
}
