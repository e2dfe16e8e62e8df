//! Test host assets: Debian's cloud kernel, a tiny initramfs that finds the root
//! disk, and a Debian userland with QEMU, built once per machine and cached.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ferry_runtime::assets::rootfs;
use ferry_runtime::fsutil;
use ferry_runtime::host::command::run_logged;
use ferry_runtime::host::debian;
use ferry_runtime::progress::Step;
use sha2::{Digest, Sha256};

/// Meta-package naming the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";
/// The test host's userland on top of minbase.
const PACKAGES: &[&str] = &[
    "bash",
    "ca-certificates",
    "curl",
    "netcat-openbsd",
    "python3",
    "iproute2",
    "iputils-ping",
    "procps",
    "kmod",
    "busybox-static",
    "e2fsprogs",
    "qemu-system-x86",
    "zstd",
    "xz-utils",
    "strace",
    "jq",
    // User-mode networking backend of ferry VMs (`ferry boot --net`).
    "passt",
    // Runs the tests of the Node.js package, @ferry/runtime.
    "nodejs",
    // Runs the tests of the Python package (tests/testhost/python-*).
    "python3-pytest",
    // A real OCI/Docker v2 registry (Debian's package of distribution), for
    // `ferry pull` and booting OCI images (tests/testhost/oci-images.sh).
    "docker-registry",
    // Pushes the OCI image layouts the tests build to that registry.
    "skopeo",
    // Provides container-network-stack, which skopeo's containers-common
    // needs: debootstrap does not choose a provider of a virtual package.
    "netavark",
    // htpasswd, for a registry with basic auth (bcrypt: `htpasswd -Bbn user pass`).
    "apache2-utils",
    // containerd and Docker, which run containers as ferry VMs through
    // containerd-shim-ferry-v2 (tests/testhost/containerd.sh).
    "containerd",
    "docker.io",
];
/// Modules the initramfs loads to reach the root disk, in dependency order.
const ROOT_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];
const INITRAMFS_INIT: &str = include_str!("../../assets/initramfs-init.sh");
const TESTHOST_INIT: &str = include_str!("../../assets/testhost-init.sh");
const RECIPE_VERSION: u32 = 1;
/// Host packages needed to build and run test hosts.
pub const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "debootstrap",
    "busybox-static",
    "kmod",
    "cpio",
    "e2fsprogs",
    "zstd",
    // musl-gcc, for the musl-based image the OCI tests build.
    "musl-tools",
    // Building Garage (`s3-server`) compiles C: LMDB and zstd with the C
    // compiler, libsodium with its own configure script and make.
    "gcc",
    "libc6-dev",
    "make",
];

/// Built test host assets.
#[derive(Debug, Clone)]
pub struct HostAssets {
    /// The cloud kernel.
    pub vmlinuz: PathBuf,
    /// Early userspace that mounts the root disk.
    pub initrd: PathBuf,
    /// The test host's root filesystem (ext4, used read-only with a throwaway overlay).
    pub root: PathBuf,
}

impl HostAssets {
    fn at(dir: &Path) -> HostAssets {
        HostAssets {
            vmlinuz: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
            root: dir.join("root.ext4"),
        }
    }
}

/// Returns the cached test host assets, building them if needed.
pub fn ensure(cache: &Path, log: &Path) -> Result<HostAssets> {
    let kernel_pkg = debian::dependency_with_prefix(KERNEL_META, "linux-image-")
        .or_else(|| {
            debian::apt_update(log).ok()?;
            debian::dependency_with_prefix(KERNEL_META, "linux-image-")
        })
        .with_context(|| format!("apt cannot resolve {KERNEL_META}"))?;
    let version = debian::candidate_version(&kernel_pkg, log)?;
    let mut h = Sha256::new();
    h.update(format!(
        "{RECIPE_VERSION}\0{kernel_pkg}\0{version}\0{}\0{}\0",
        PACKAGES.join(","),
        ROOT_MODULES.join(",")
    ));
    h.update(INITRAMFS_INIT);
    h.update(TESTHOST_INIT);
    let root = cache.join("testhost");
    let dir = root.join(hex::encode(&h.finalize()[..8]));
    if dir.join("root.ext4").is_file() {
        return Ok(HostAssets::at(&dir));
    }
    std::fs::create_dir_all(&root)?;
    // One build per image on this machine: a second run waits, then finds it.
    let _building = fsutil::lock_build(&dir)?;
    if dir.join("root.ext4").is_file() {
        return Ok(HostAssets::at(&dir));
    }
    fsutil::remove_stale_staging(&root);
    let terminal = ferry_runtime::progress::Terminal::new();
    let step = Step::start(
        &terminal,
        "testhost",
        &format!("building test host ({kernel_pkg})"),
    );
    let staging = fsutil::staging_path(&dir);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let result = build(&kernel_pkg, &staging, &step, log);
    for scratch in ["kpkg", "tree", "initrd"] {
        let _ = std::fs::remove_dir_all(staging.join(scratch));
    }
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    fsutil::fsync_dir_tree(&staging)?;
    fsutil::publish(&staging, &dir)?;
    step.finish("test host assets ready");
    Ok(HostAssets::at(&dir))
}

fn build(kernel_pkg: &str, out: &Path, step: &Step, log: &Path) -> Result<()> {
    step.phase("downloading the cloud kernel");
    let kpkg = out.join("kpkg");
    std::fs::create_dir_all(&kpkg)?;
    let deb = debian::download(kernel_pkg, out, log)?;
    debian::unpack(&deb, &kpkg, log)?;
    std::fs::remove_file(&deb)?;
    let kver = kernel_pkg.trim_start_matches("linux-image-");
    std::fs::copy(
        kpkg.join(format!("boot/vmlinuz-{kver}")),
        out.join("vmlinuz"),
    )
    .context("cloud kernel image")?;
    let modules = kpkg.join("lib/modules").join(kver);

    step.phase("bootstrapping the test host userland");
    let tree = out.join("tree");
    let mirror = debian::mirror()?;
    rootfs::bootstrap(&tree, rootfs::SUITE, PACKAGES, &mirror, step, log)?;
    run_logged(
        "copy kernel modules",
        Command::new("cp")
            .arg("-a")
            .arg(kpkg.join("lib/modules"))
            .arg(tree.join("lib/")),
        log,
        |_| {},
    )?;
    run_logged(
        "depmod",
        Command::new("depmod").arg("-b").arg(&tree).arg(kver),
        log,
        |_| {},
    )?;
    write_exec(&tree.join("sbin/ferry-testhost-init"), TESTHOST_INIT)?;
    std::fs::create_dir_all(tree.join("opt/ferry"))?;
    step.phase("writing the root disk");
    rootfs::make_ext4(&tree, &out.join("root.ext4"), "testhost-root", 8 << 30, log)?;

    step.phase("writing the initramfs");
    let initrd = out.join("initrd");
    std::fs::create_dir_all(initrd.join("bin"))?;
    std::fs::create_dir_all(initrd.join("modules"))?;
    std::fs::copy("/bin/busybox", initrd.join("bin/busybox")).context("busybox-static")?;
    write_exec(&initrd.join("init"), INITRAMFS_INIT)?;
    let mut order = String::new();
    for m in ROOT_MODULES {
        let Some(path) = find_module(&modules, m) else {
            continue; // built into this kernel
        };
        let file = format!("{m}.ko");
        std::fs::copy(&path, initrd.join("modules").join(&file))?;
        order.push_str(&file);
        order.push('\n');
    }
    std::fs::write(initrd.join("modules.order"), order)?;
    let cpio = out.join("initrd.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet > \"$0\"")
        .arg(&cpio)
        .current_dir(&initrd)
        .status()?;
    if !status.success() {
        bail!("cpio failed: {status}");
    }
    Ok(())
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    let want = format!("{name}.ko");
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_str() == Some(want.as_str()) {
                return Some(p);
            }
        }
    }
    None
}
