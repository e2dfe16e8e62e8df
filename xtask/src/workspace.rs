//! The workspace's own build products: ferry's release binaries and its assets.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ferry_runtime::fsutil;

/// The target ferry and its agent are built for. Naming it keeps the static
/// flags below away from build scripts and proc-macros, which cannot be static.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

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
    /// `containerd-shim-ferry-v2`, the containerd runtime.
    pub shim: PathBuf,
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
            self.shim.as_path(),
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

/// `cargo` of the toolchain running this task, or (`+nightly`) the rustup
/// proxy with that toolchain: only the proxy understands `+TOOLCHAIN`.
pub fn cargo_of(toolchain: &[&str]) -> Command {
    if toolchain.is_empty() {
        return cargo();
    }
    let mut c = Command::new("cargo");
    c.args(toolchain).current_dir(root());
    c
}

/// The cargo target directory of the builds below: `CARGO_TARGET_DIR` if
/// set, else `cargo/target` in ferry's cache directory, which every
/// checkout on this machine shares, so a fresh clone compiles only the
/// workspace's own crates again, not its dependencies. [`claim_target`]
/// guards it.
pub fn cargo_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| ferry_runtime::paths::cache_dir().join("cargo/target"))
}

/// This checkout's own build products (binaries copied out of the shared
/// target directory, the packed SDKs, the musl fixture): `target/suite`.
pub fn outputs() -> PathBuf {
    root().join("target/suite")
}

/// Past this size a shared target directory is emptied before a build:
/// cargo never removes what older toolchains and dependency versions left.
const TARGET_LIMIT: u64 = 40 << 30;

/// The exclusive lock of a shared target directory, held while this run
/// builds in it and copies its products out (or runs the tests it built).
pub struct TargetLock {
    _file: File,
}

/// Locks the shared target directory `dir` for this checkout's release
/// build for `target` (`None`: the host); see [`claim_target_of`].
pub fn claim_target(dir: &Path, target: Option<&str>) -> Result<TargetLock> {
    claim_target_of(dir, &root().join("Cargo.toml"), &[], target)
}

/// Locks the shared target directory `dir` (waiting for another run that
/// holds it) and makes its release build for `target` (`None`: the host)
/// safe for this checkout's sources. Cargo takes a workspace crate as
/// fresh when its sources are older than its outputs; in a directory that
/// several checkouts share, the outputs may come from another checkout's
/// sources, newer than this checkout's files yet not the same. So each
/// build directory records which checkout built in it last (its path, and
/// when its directory was made, which tells a new clone at the same path
/// apart); when that was another one, the local crates of the workspace at
/// `manifest` are cleaned there first and rebuilt from these sources. The
/// registry's crates stay compiled. `toolchain` goes first to cargo
/// (`+nightly`).
pub fn claim_target_of(
    dir: &Path,
    manifest: &Path,
    toolchain: &[&str],
    target: Option<&str>,
) -> Result<TargetLock> {
    let lock_path = dir.with_extension("lock");
    std::fs::create_dir_all(lock_path.parent().context("target dir")?)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    if !fsutil::try_lock_exclusive(&file)? {
        eprintln!(
            "waiting for another run building in {} to finish",
            dir.display()
        );
        fsutil::lock_exclusive(&file)?;
    }
    let lock = TargetLock { _file: file };
    if fsutil::disk_usage(dir) > TARGET_LIMIT {
        eprintln!(
            "{} is past {} GiB: emptied",
            dir.display(),
            TARGET_LIMIT >> 30
        );
        std::fs::remove_dir_all(dir).with_context(|| format!("empty {}", dir.display()))?;
    }
    let checkout = manifest.parent().context("manifest path")?;
    let made = std::fs::metadata(checkout)?
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let stamp = format!("{}\n{made}\n", checkout.display());
    let build_dir = match target {
        Some(t) => dir.join(t).join("release"),
        None => dir.join("release"),
    };
    let stamp_path = build_dir.join(".ferry-checkout");
    if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(lock);
    }
    let mut clean = cargo_of(toolchain);
    clean
        .args(["clean", "--quiet", "--release", "--manifest-path"])
        .arg(manifest)
        .env("CARGO_TARGET_DIR", dir);
    if let Some(t) = target {
        clean.args(["--target", t]);
    }
    for p in local_packages(manifest, toolchain)? {
        clean.args(["-p", &p]);
    }
    if !clean.status().context("run cargo clean")?.success() {
        bail!("cargo clean in {} failed", build_dir.display());
    }
    std::fs::create_dir_all(&build_dir)?;
    std::fs::write(&stamp_path, stamp)?;
    Ok(lock)
}

/// The names of the packages of the workspace at `manifest` that come from
/// paths (its members and their path dependencies), from `cargo metadata`.
fn local_packages(manifest: &Path, toolchain: &[&str]) -> Result<Vec<String>> {
    let out = cargo_of(toolchain)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(manifest)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata for {} failed", manifest.display());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse cargo metadata")?;
    Ok(v["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["source"].is_null())
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect())
}

/// The binaries [`build_binaries`] builds, by target name.
const BINARIES: &[&str] = &[
    "ferry",
    "ferry-vmm",
    "ferry-agent",
    "ferry-exec-floor",
    "ferry-churn",
    "containerd-shim-ferry-v2",
];

/// A cargo command for the static build of [`TARGET`] (see [`RUSTFLAGS`]):
/// `cargo SUBCOMMAND --release --workspace --target TARGET` in the shared
/// target directory. The binaries and the unit tests both build this way, so
/// they share every compiled dependency: the same profile, flags and
/// workspace-wide features. (Selecting only some packages would unify the
/// dependencies' features differently and compile many of them again.)
/// Doc tests get the flags too: they link against the same static,
/// position-dependent libraries.
pub fn static_cargo(subcommand: &str) -> Command {
    let mut c = cargo();
    c.args([subcommand, "--release", "--workspace", "--target", TARGET])
        .env("RUSTFLAGS", RUSTFLAGS)
        .env("RUSTDOCFLAGS", RUSTFLAGS)
        .env("CARGO_TARGET_DIR", cargo_target());
    c
}

/// Builds ferry, the agent, the benchmark's guest programs and the `ferry`
/// crate's examples in release mode, static, and copies them with the man
/// pages out of the shared target directory into this checkout's
/// [`outputs`].
pub fn build_binaries() -> Result<Binaries> {
    let target = cargo_target();
    let _lock = claim_target(&target, Some(TARGET))?;
    // JSON messages on stdout say where build scripts wrote their output;
    // diagnostics still go to the terminal.
    let mut build = static_cargo("build");
    build.arg("--message-format=json-render-diagnostics");
    for bin in BINARIES {
        build.args(["--bin", bin]);
    }
    for example in EXAMPLES {
        build.args(["--example", example]);
    }
    let out = build
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("run cargo")?;
    if !out.status.success() {
        bail!("building ferry failed");
    }
    let man = cli_out_dir(&out.stdout)
        .context("cargo did not report the ferry CLI's build script output")?
        .join("man");
    let built = target.join(TARGET).join("release");
    let dir = outputs().join("bin");
    std::fs::create_dir_all(dir.join("examples"))?;
    for bin in BINARIES {
        copy_replacing(&built.join(bin), &dir.join(bin))?;
    }
    for example in EXAMPLES {
        let rel = Path::new("examples").join(example);
        copy_replacing(&built.join(&rel), &dir.join(&rel))?;
    }
    let man_copy = outputs().join("man");
    let staging = fsutil::staging_path(&man_copy);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    for page in std::fs::read_dir(&man).with_context(|| format!("read {}", man.display()))? {
        let page = page?;
        std::fs::copy(page.path(), staging.join(page.file_name()))?;
    }
    let _ = std::fs::remove_dir_all(&man_copy);
    std::fs::rename(&staging, &man_copy)
        .with_context(|| format!("publish {}", man_copy.display()))?;
    Ok(Binaries {
        ferry: dir.join("ferry"),
        vmm: dir.join("ferry-vmm"),
        agent: dir.join("ferry-agent"),
        exec_floor: dir.join("ferry-exec-floor"),
        churn: dir.join("ferry-churn"),
        shim: dir.join("containerd-shim-ferry-v2"),
        examples: EXAMPLES
            .iter()
            .map(|e| dir.join("examples").join(e))
            .collect(),
        man: man_copy,
    })
}

/// Copies `from` over `to` by renaming a full copy into place: a reader
/// that has `to` open (a test copying it into a test host) keeps reading
/// the old file whole.
fn copy_replacing(from: &Path, to: &Path) -> Result<()> {
    let staging = fsutil::staging_path(to);
    std::fs::copy(from, &staging).with_context(|| format!("copy {}", from.display()))?;
    std::fs::rename(&staging, to).with_context(|| format!("publish {}", to.display()))?;
    Ok(())
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
/// (and into `release` of the shared target directory, beside no other
/// build of them).
pub fn build_node_package() -> Result<PathBuf> {
    let outputs = outputs();
    // Staged and packed in directories of this run's own, then renamed into
    // place: concurrent runs never see the package missing or half-written.
    let stage = outputs.join(format!("node-package.{}", std::process::id()));
    let packed_dir = outputs.join(format!("node-packed.{}", std::process::id()));
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&stage);
        let _ = std::fs::remove_dir_all(&packed_dir);
    };
    cleanup();
    std::fs::create_dir_all(&stage)?;
    std::fs::create_dir_all(&packed_dir)?;
    let result = (|| -> Result<PathBuf> {
        let target = cargo_target();
        {
            let _lock = claim_target(&target, None)?;
            let status = cargo()
                .args(["build", "--release", "--package", "ferry-node"])
                .env_remove("RUSTFLAGS")
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .context("run cargo")?;
            if !status.success() {
                bail!("building the Node.js addon failed");
            }
            std::fs::copy(
                target.join("release/libferry_node.so"),
                stage.join("ferry.node"),
            )
            .context("copy the addon")?;
        }
        let src = root().join("sdk/node");
        for f in NODE_PACKAGE_FILES {
            std::fs::copy(src.join(f), stage.join(f))
                .with_context(|| format!("copy sdk/node/{f}"))?;
        }
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
        let tarball = outputs.join(file);
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
    // Per process: two runs installing at once must not share one.
    let staging = dir.with_extension(format!("partial-{}", std::process::id()));
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
        let _ = std::fs::remove_dir_all(&staging);
        bail!("the maturin install has no bin/maturin");
    }
    if bin.is_file() {
        // Another run installed it meanwhile.
        let _ = std::fs::remove_dir_all(&staging);
        return Ok(bin);
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
    let outputs = outputs();
    // maturin writes into a directory of this run's own; the wheel is then
    // renamed over this checkout's, so a run that is copying it never sees it
    // missing or half-written while another run rebuilds it.
    let out = outputs.join(format!("python-wheel.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let target = cargo_target();
    let lock = claim_target(&target, None)?;
    let status = Command::new(&maturin)
        .args(["build", "--release", "--quiet", "--compatibility", "linux"])
        .arg("--manifest-path")
        .arg(root().join("sdk/python/Cargo.toml"))
        .arg("--out")
        .arg(&out)
        .current_dir(root())
        .env_remove("RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .context("run maturin")?;
    drop(lock);
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
    let shared = outputs.join("python-wheel");
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
    let out = outputs().join("musl-fixture");
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
