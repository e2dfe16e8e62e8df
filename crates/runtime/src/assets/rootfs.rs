//! The base root filesystem: Debian bookworm minbase with a small useful set of
//! tools, kept both as a rootfs tarball and as an ext4 image made with `mke2fs -d`.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::InstallError;
use crate::fsutil;
use crate::host::command::{is_root, output, run_logged};
use crate::host::debian;
use crate::progress::{Event, Progress, Step};

/// Debian release of the base image.
pub const SUITE: &str = "bookworm";
/// Packages added to minbase.
pub const INCLUDE: &[&str] = &[
    "ca-certificates",
    "curl",
    "procps",
    "iproute2",
    "netcat-openbsd",
];
/// Bumped whenever the recipe changes its output.
const RECIPE_VERSION: u32 = 1;
/// Host packages the build needs.
pub const BUILD_PACKAGES: &[&str] = &["debootstrap", "e2fsprogs", "zstd", "tar"];
/// Smallest ext4 image made; the file is sparse, so free space costs nothing.
const MIN_IMAGE_BYTES: u64 = 2 << 30;

/// A built base root filesystem.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// zstd-compressed tarball of the tree.
    pub tarball: PathBuf,
    /// ext4 image of the same tree.
    pub ext4: PathBuf,
}

impl Rootfs {
    fn at(dir: &Path) -> Rootfs {
        Rootfs {
            tarball: dir.join("rootfs.tar.zst"),
            ext4: dir.join("rootfs.ext4"),
        }
    }
}

/// Cache key of the base rootfs recipe.
pub fn cache_key() -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "{SUITE}\0minbase\0{RECIPE_VERSION}\0{}",
        INCLUDE.join(",")
    ));
    hex::encode(&h.finalize()[..8])
}

/// Returns the cached base rootfs, building it first if needed.
pub fn ensure(cache: &Path, log: &Path, progress: &dyn Progress) -> Result<Rootfs, InstallError> {
    let root = cache.join("rootfs");
    let dir = root.join(cache_key());
    if dir.join("rootfs.ext4").is_file() {
        progress.event(
            "rootfs",
            Event::Note(&format!("cached (Debian {SUITE} minbase)")),
        );
        return Ok(Rootfs::at(&dir));
    }
    if !is_root() {
        return Err(InstallError::NeedsRoot {
            step: "building the base root filesystem (debootstrap)".into(),
        });
    }
    std::fs::create_dir_all(&root).map_err(InstallError::io("create rootfs cache"))?;
    let _building = super::claim_build(&dir)?;
    if dir.join("rootfs.ext4").is_file() {
        progress.event("rootfs", Event::Note("built meanwhile by another ferry"));
        return Ok(Rootfs::at(&dir));
    }
    fsutil::remove_stale_staging(&root);
    let step = Step::start(progress, "rootfs", &format!("bootstrapping Debian {SUITE}"));
    debian::ensure_packages(BUILD_PACKAGES, log)?;
    let staging = fsutil::staging_path(&dir);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(InstallError::io("create rootfs staging"))?;
    let tree = staging.join("tree");
    let result = build(&tree, &staging, &step, log);
    let _ = std::fs::remove_dir_all(&tree);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    fsutil::fsync_dir_tree(&staging).map_err(InstallError::io("sync rootfs"))?;
    fsutil::publish(&staging, &dir).map_err(InstallError::io("publish rootfs"))?;
    step.finish("built rootfs tarball and ext4 image");
    Ok(Rootfs::at(&dir))
}

fn build(tree: &Path, out: &Path, step: &Step, log: &Path) -> Result<(), InstallError> {
    let mirror = debian::mirror()?;
    bootstrap(tree, SUITE, INCLUDE, &mirror, step, log)?;
    step.phase("configuring");
    std::fs::write(tree.join("etc/hostname"), "ferry\n")
        .map_err(InstallError::io("write hostname"))?;
    step.phase("writing tarball");
    write_tarball(tree, &out.join("rootfs.tar.zst"), log)?;
    step.phase("writing ext4 image");
    make_ext4(
        tree,
        &out.join("rootfs.ext4"),
        "ferry-root",
        MIN_IMAGE_BYTES,
        log,
    )?;
    Ok(())
}

/// Runs debootstrap (minbase) into `tree` and trims caches that only cost space.
pub fn bootstrap(
    tree: &Path,
    suite: &str,
    include: &[&str],
    mirror: &str,
    step: &Step,
    log: &Path,
) -> Result<(), InstallError> {
    run_logged(
        "debootstrap",
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", include.join(",")))
            .arg(suite)
            .arg(tree)
            .arg(mirror),
        log,
        |line| step.detail(line.trim()),
    )?;
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let d = tree.join(dir);
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(())
}

/// Writes a zstd tarball of `tree` (numeric owners, so it unpacks identically anywhere).
pub fn write_tarball(tree: &Path, dest: &Path, log: &Path) -> Result<(), InstallError> {
    run_logged(
        "tar",
        Command::new("tar")
            .args(["--zstd", "--numeric-owner", "--xattrs", "-cf"])
            .arg(dest)
            .arg("-C")
            .arg(tree)
            .arg("."),
        log,
        |_| {},
    )
}

/// Makes an ext4 image of `tree` with `mke2fs -d` (no loop mount, no root needed
/// beyond reading the tree). Sized to twice the content, at least `min_bytes`; the
/// file is sparse, so unused space costs nothing.
pub fn make_ext4(
    tree: &Path,
    dest: &Path,
    label: &str,
    min_bytes: u64,
    log: &Path,
) -> Result<(), InstallError> {
    let used: u64 = output(Command::new("du").arg("-sb").arg(tree))
        .and_then(|o| o.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let size_mib = (used * 2).max(min_bytes).div_ceil(1 << 20);
    run_logged(
        "mke2fs",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-d"])
            .arg(tree)
            .arg(dest)
            .arg(format!("{size_mib}M")),
        log,
        |_| {},
    )
}
