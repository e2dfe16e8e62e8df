//! `ferry install`: build and cache the guest assets.

use ferry::{Failure, Runtime};

use crate::cli::install::Args;

/// Prepares all assets and prints where they are.
pub fn run(rt: &Runtime, _args: Args, json: bool) -> Result<(), Failure> {
    let a = rt.install(&ferry::Terminal::new())?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": true,
                "kernel": { "vmlinux": a.kernel.vmlinux, "bzimage": a.kernel.bzimage, "version": a.kernel.version },
                "rootfs": { "tarball": a.rootfs.tarball, "ext4": a.rootfs.ext4 },
            })
        );
    } else {
        println!("kernel  {}", a.kernel.vmlinux.display());
        println!("rootfs  {}", a.rootfs.ext4.display());
        println!("ready");
    }
    Ok(())
}
