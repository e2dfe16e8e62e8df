//! What a boot asks for, and the files it resolves to.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::Config;
use crate::images;
use crate::machine::BootError;

/// What to boot.
#[derive(Debug, Clone, Default)]
pub struct BootSpec {
    /// VM name; generated when absent.
    pub name: Option<String>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Guest memory in MiB.
    pub memory_mib: Option<u32>,
    /// Guest kernel; the installed one when absent.
    pub kernel: Option<PathBuf>,
    /// Root filesystem image; the base image when absent.
    pub image: Option<PathBuf>,
    /// Main process of the VM (overrides the image's command).
    pub command: Option<Vec<String>>,
    /// Whether the image's own command runs as the main process when `command`
    /// is not given. Attached boots run commands through exec instead.
    pub run_image_command: bool,
    /// Environment for the main process.
    pub env: BTreeMap<String, String>,
    /// Working directory for the main process.
    pub workdir: Option<String>,
    /// Remove the VM when it stops.
    pub ephemeral: bool,
    /// Host paths to copy in or share live (`--mount`, `--live-mount`).
    pub mounts: Vec<crate::mounts::MountRecord>,
    /// Host ports forwarded into the guest (`-p`).
    pub ports: Vec<crate::forward::PortForward>,
    /// Give the VM outbound networking through passt (`--net`).
    pub net: bool,
    /// Boot a kernel even where a boot template matches (see [`crate::template`]).
    pub cold: bool,
}

/// The guest kernel a boot uses: the spec's, the configured one, or the installed one.
pub fn kernel_for(config: &Config, spec: &BootSpec) -> Result<PathBuf, BootError> {
    match spec.kernel.as_ref().or(config.kernel.as_ref()) {
        Some(k) if !k.is_file() => Err(BootError::KernelNotFound(k.clone())),
        Some(k) => Ok(k.clone()),
        None => Ok(images::installed_assets(config)?.0),
    }
}
