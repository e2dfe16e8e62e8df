//! `ferry boot`.

use std::path::PathBuf;

/// Arguments of `ferry boot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Name of the VM (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// Guest kernel (vmlinux); default: the one `ferry install` built.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Start the VM in the background and print its name.
    #[arg(short, long)]
    pub detach: bool,
    /// Set an environment variable for the command (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory of the command.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Forward a host TCP port to a guest port (repeatable). The host side
    /// listens on 127.0.0.1 unless HOST_IP is given; the guest side is
    /// 127.0.0.1:GUEST_PORT inside the VM. Needs no guest network.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
    /// Give the VM outbound networking (user-mode, through passt): eth0 with
    /// 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3.
    #[arg(long)]
    pub net: bool,
    /// Boot the kernel even if a boot template of this shape exists
    /// (see `ferry template`).
    #[arg(long)]
    pub cold: bool,
    /// Root filesystem: a rootfs tarball (.tar, .tar.gz, .tar.zst), an ext4
    /// image, or an OCI/Docker image reference (pulled when not cached);
    /// default: the base Debian image.
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Copy a host directory or file into the VM's disk at boot:
    /// HOST:GUEST, or HOST:GUEST:ro for a read-only copy (repeatable).
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro]")]
    pub mount: Vec<String>,
    /// Share a host directory live through virtio-fs: HOST:GUEST[:ro|rw],
    /// read-write by default (repeatable).
    #[arg(long = "live-mount", value_name = "HOST:GUEST[:ro|rw]")]
    pub live_mount: Vec<String>,
    /// Command to run (default: the image's command).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}
