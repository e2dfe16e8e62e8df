//! `ferry bake`.

use std::path::PathBuf;

/// Arguments of `ferry bake`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Recipe file (TOML); paths in it are relative to it. Flags override its fields;
    /// --copy and --run steps run after its steps.
    #[arg(short = 'f', long = "file", value_name = "RECIPE")]
    pub file: Option<PathBuf>,
    /// Output tarball: OUT.tar, OUT.tar.gz (or .tgz) or OUT.tar.zst.
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Image to start from: a rootfs tarball, an ext4 image or an OCI/Docker
    /// image reference (pulled when not cached); `base` (default) for the base
    /// image.
    #[arg(long, value_name = "IMAGE")]
    pub from: Option<PathBuf>,
    /// Copy a host file or directory into the image (repeatable; before the --run steps).
    #[arg(long, value_name = "HOST:GUEST", value_parser = parse_copy)]
    pub copy: Vec<(PathBuf, String)>,
    /// Run a shell command line in the image with /bin/sh -c (repeatable, in order).
    #[arg(long, value_name = "SHELL")]
    pub run: Vec<String>,
    /// Environment variable recorded in the image and set for the steps (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = super::parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory recorded in the image; created, and used by the steps.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Default command of the image; takes every argument after it, so put it last
    /// (or give the command after `--`).
    #[arg(long, value_name = "ARGS", num_args = 1.., allow_hyphen_values = true)]
    pub cmd: Option<Vec<String>>,
    /// Guest memory of the bake VM in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// vCPUs of the bake VM.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Guest kernel (vmlinux); default: the one `ferry install` built.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Default command of the image (same as --cmd).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Parses `HOST:GUEST`; the guest path is what follows the last `:`.
pub fn parse_copy(s: &str) -> Result<(PathBuf, String), String> {
    match s.rsplit_once(':') {
        Some((host, guest)) if !host.is_empty() && !guest.is_empty() => {
            Ok((PathBuf::from(host), guest.to_string()))
        }
        _ => Err(format!("expected HOST:GUEST, got {s:?}")),
    }
}
