//! The guest kernel: Debian's `linux-source-6.12` built with ferry's microVM config.
//!
//! Cached under `<cache>/kernel/<key>/` where the key hashes the source package
//! version, the config fragment and this recipe's version, so it builds once per
//! machine and again only when one of those changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::InstallError;
use crate::fsutil;
use crate::host::command::run_logged;
use crate::host::debian;
use crate::progress::{Event, Progress, Step};

/// Debian source package the kernel is built from.
pub const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// ferry's config fragment, merged over `make tinyconfig`.
pub const CONFIG_FRAGMENT: &str = include_str!("../../../../assets/kernel/microvm-x86_64.config");
/// Bumped whenever the build steps change in a way that changes the output.
const RECIPE_VERSION: u32 = 1;
/// Host packages the build needs.
pub const BUILD_PACKAGES: &[&str] = &[
    "make",
    "gcc",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];

/// A built guest kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Uncompressed ELF for direct 64-bit (and PVH) boot.
    pub vmlinux: PathBuf,
    /// Compressed bzImage of the same build.
    pub bzimage: PathBuf,
    /// The full `.config` it was built with.
    pub config: PathBuf,
    /// Source package version.
    pub version: String,
}

impl Kernel {
    fn at(dir: &Path, version: String) -> Kernel {
        Kernel {
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            config: dir.join("config"),
            version,
        }
    }
}

/// Cache key for a kernel built from `version` with `fragment`.
pub fn cache_key(version: &str, fragment: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("{SOURCE_PACKAGE}\0{version}\0{RECIPE_VERSION}\0"));
    h.update(fragment);
    hex::encode(&h.finalize()[..8])
}

/// Returns the cached kernel, building it first if needed.
///
/// When apt cannot name the source version (no package lists, e.g. inside a test
/// host or offline), the newest cached build of the same config is used.
pub fn ensure(cache: &Path, log: &Path, progress: &dyn Progress) -> Result<Kernel, InstallError> {
    let root = cache.join("kernel");
    // Ask apt without refreshing first: a warm machine must not need the network.
    let version = match debian::known_version(SOURCE_PACKAGE) {
        Some(v) => v,
        None => match newest_cached(&root) {
            Some((dir, version)) => {
                progress.event(
                    "kernel",
                    Event::Note(&format!(
                        "cached ({SOURCE_PACKAGE} {version}; apt has no version)"
                    )),
                );
                return Ok(Kernel::at(&dir, version));
            }
            None => debian::candidate_version(SOURCE_PACKAGE, log)?,
        },
    };
    let dir = root.join(cache_key(&version, CONFIG_FRAGMENT));
    if dir.join("vmlinux").is_file() {
        progress.event(
            "kernel",
            Event::Note(&format!("cached ({SOURCE_PACKAGE} {version})")),
        );
        return Ok(Kernel::at(&dir, version));
    }
    std::fs::create_dir_all(&root).map_err(InstallError::io("create kernel cache"))?;
    let _building = super::claim_build(&dir)?;
    if dir.join("vmlinux").is_file() {
        progress.event("kernel", Event::Note("built meanwhile by another ferry"));
        return Ok(Kernel::at(&dir, version));
    }
    fsutil::remove_stale_staging(&root);
    let step = Step::start(
        progress,
        "kernel",
        &format!("building {SOURCE_PACKAGE} {version}"),
    );
    debian::ensure_packages(BUILD_PACKAGES, log)?;

    let staging = fsutil::staging_path(&dir);
    let _ = std::fs::remove_dir_all(&staging);
    let work = staging.join("work");
    std::fs::create_dir_all(&work).map_err(InstallError::io("create kernel build dir"))?;
    let result = build(&work, &staging, &step, log);
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let meta = serde_json::json!({ "version": version, "fragment": fragment_digest() });
    std::fs::write(staging.join("meta.json"), meta.to_string())
        .map_err(InstallError::io("write kernel meta"))?;
    fsutil::fsync_dir_tree(&staging).map_err(InstallError::io("sync kernel"))?;
    fsutil::publish(&staging, &dir).map_err(InstallError::io("publish kernel"))?;
    let size = std::fs::metadata(dir.join("vmlinux"))
        .map(|m| m.len())
        .unwrap_or(0);
    step.finish(&format!("built vmlinux ({} MiB)", size >> 20));
    Ok(Kernel::at(&dir, version))
}

fn fragment_digest() -> String {
    hex::encode(Sha256::digest(format!(
        "{RECIPE_VERSION}\0{CONFIG_FRAGMENT}"
    )))
}

/// The most recently built cached kernel made from the current fragment and recipe.
fn newest_cached(root: &Path) -> Option<(PathBuf, String)> {
    let digest = fragment_digest();
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let dir = e.path();
            let meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
            if meta["fragment"].as_str()? != digest || !dir.join("vmlinux").is_file() {
                return None;
            }
            let built = e.metadata().ok()?.modified().ok()?;
            Some((built, dir, meta["version"].as_str()?.to_string()))
        })
        .max_by_key(|(built, ..)| *built)
        .map(|(_, dir, version)| (dir, version))
}

fn build(work: &Path, out: &Path, step: &Step, log: &Path) -> Result<(), InstallError> {
    step.phase("downloading source");
    let deb = debian::download(SOURCE_PACKAGE, work, log)?;
    step.phase("unpacking source");
    let unpacked = work.join("pkg");
    debian::unpack(&deb, &unpacked, log)?;
    let tarball = std::fs::read_dir(unpacked.join("usr/src"))
        .map_err(InstallError::io("find source tarball"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
        .ok_or_else(|| InstallError::UnknownPackage(format!("{SOURCE_PACKAGE} tarball")))?;
    run_logged(
        "unpack kernel source",
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(work),
        log,
        |_| {},
    )?;
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_file(&deb);
    let src = std::fs::read_dir(work)
        .map_err(InstallError::io("find source tree"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("Makefile").is_file())
        .ok_or_else(|| InstallError::UnknownPackage(format!("{SOURCE_PACKAGE} tree")))?;

    step.phase("configuring");
    let fragment = work.join("ferry.config");
    std::fs::write(&fragment, CONFIG_FRAGMENT).map_err(InstallError::io("write fragment"))?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.current_dir(&src).arg("ARCH=x86_64").args(args);
        c
    };
    run_logged("make tinyconfig", &mut make(&["tinyconfig"]), log, |_| {})?;
    run_logged(
        "merge config fragment",
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .env("ARCH", "x86_64")
            .arg("-m")
            .arg(".config")
            .arg(&fragment),
        log,
        |_| {},
    )?;
    run_logged(
        "make olddefconfig",
        &mut make(&["olddefconfig"]),
        log,
        |_| {},
    )?;
    let config =
        std::fs::read_to_string(src.join(".config")).map_err(InstallError::io("read .config"))?;
    let unmet = unmet_options(CONFIG_FRAGMENT, &config);
    if !unmet.is_empty() {
        return Err(InstallError::KernelConfigMismatch(unmet));
    }

    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    step.phase(&format!("compiling with {jobs} jobs"));
    run_logged(
        "kernel build",
        &mut make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]),
        log,
        |line| step.detail(line.trim()),
    )?;
    for (from, to) in [
        ("vmlinux", "vmlinux"),
        ("arch/x86/boot/bzImage", "bzImage"),
        (".config", "config"),
    ] {
        std::fs::copy(src.join(from), out.join(to))
            .map_err(InstallError::io(format!("copy {from}")))?;
    }
    Ok(())
}

/// Options of `fragment` that the final `config` does not hold as asked.
pub fn unmet_options(fragment: &str, config: &str) -> Vec<String> {
    let have: std::collections::HashMap<&str, &str> = config
        .lines()
        .filter_map(|l| {
            if let Some(rest) = l.strip_prefix("# ") {
                rest.strip_suffix(" is not set").map(|k| (k, "n"))
            } else {
                l.split_once('=')
            }
        })
        .collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, want)| {
            let got = have.get(k).copied().unwrap_or("n");
            got != *want
        })
        .map(|(k, want)| {
            let got = have.get(k).copied().unwrap_or("absent");
            format!("{k}={want} (got {got})")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmet_options_reports_only_differences() {
        let fragment = "# c\nCONFIG_A=y\nCONFIG_B=n\nCONFIG_C=y\nCONFIG_D=n\nCONFIG_E=64\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=y\nCONFIG_E=64\n";
        assert_eq!(
            unmet_options(fragment, config),
            vec![
                "CONFIG_C=y (got absent)".to_string(),
                "CONFIG_D=n (got y)".to_string()
            ]
        );
    }

    #[test]
    fn key_depends_on_version_and_fragment() {
        let a = cache_key("6.12.1", "CONFIG_A=y");
        assert_eq!(a, cache_key("6.12.1", "CONFIG_A=y"));
        assert_ne!(a, cache_key("6.12.2", "CONFIG_A=y"));
        assert_ne!(a, cache_key("6.12.1", "CONFIG_A=n"));
    }

    #[test]
    fn shipped_fragment_builds_a_64bit_modular_free_microvm_kernel() {
        for opt in [
            "CONFIG_64BIT=y",
            "CONFIG_MODULES=n",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_PVH=y",
        ] {
            assert!(CONFIG_FRAGMENT.lines().any(|l| l == opt), "{opt}");
        }
    }
}
