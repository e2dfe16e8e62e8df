//! Where one runtime keeps its files and finds its executables.
//!
//! Nothing here is process-wide: every operation takes the [`Config`] of the
//! runtime it belongs to, so two runtimes with different directories in one
//! process never see each other's VMs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Coded;

/// The directories of one runtime. Also handed to each VMM process (in its
/// plan), which keeps fork layers and encoded disk bases there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirs {
    /// VM state, fork layers, received bundles.
    pub data: PathBuf,
    /// Rebuildable assets: kernels, root filesystems, converted images, templates.
    pub cache: PathBuf,
}

impl Dirs {
    /// The directories ferry uses when told nothing else: `$FERRY_DATA_DIR`
    /// and `$FERRY_CACHE_DIR`, else the XDG directories (see [`crate::paths`]).
    pub fn from_env() -> Dirs {
        Dirs {
            data: crate::paths::data_dir(),
            cache: crate::paths::cache_dir(),
        }
    }

    /// One VM state directory per VM.
    pub fn vms(&self) -> PathBuf {
        self.data.join("vms")
    }

    /// Frozen disk layers shared by forks.
    pub fn layers(&self) -> PathBuf {
        self.data.join("layers")
    }

    /// Bundles received from streams, until a VM owns them.
    pub fn incoming(&self) -> PathBuf {
        self.data.join("incoming")
    }

    /// Markers of bundles whose checksums were verified.
    pub fn verified(&self) -> PathBuf {
        self.data.join("verified")
    }

    /// Boot templates.
    pub fn templates(&self) -> PathBuf {
        self.cache.join("templates")
    }
}

/// How a runtime is set up. `Config::default()` is what the `ferry` CLI uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where VMs and caches live.
    pub dirs: Dirs,
    /// The `ferry-vmm` executable; found as [`locate_vmm`] says when absent.
    pub vmm: Option<PathBuf>,
    /// The static guest agent; found as [`locate_agent`] says when absent.
    pub agent: Option<PathBuf>,
    /// The guest kernel (vmlinux); the installed one when absent.
    pub kernel: Option<PathBuf>,
    /// The base root filesystem (ext4); the installed one when absent.
    pub rootfs: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dirs: Dirs::from_env(),
            vmm: None,
            agent: None,
            kernel: None,
            rootfs: None,
        }
    }
}

impl Config {
    /// A configuration keeping VM state under `data` and caches under `cache`.
    pub fn with_dirs(data: impl Into<PathBuf>, cache: impl Into<PathBuf>) -> Config {
        Config {
            dirs: Dirs {
                data: data.into(),
                cache: cache.into(),
            },
            ..Config::default()
        }
    }
}

/// Environment variable naming the `ferry-vmm` executable.
pub const VMM_ENV: &str = "FERRY_VMM";
/// Environment variable naming the guest agent.
pub const AGENT_ENV: &str = "FERRY_AGENT";
/// File name of the VMM executable.
pub const VMM_NAME: &str = "ferry-vmm";
/// File name of the guest agent.
pub const AGENT_NAME: &str = "ferry-agent";

/// An executable ferry needs could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LocateError {
    /// Not found anywhere ferry looks.
    #[error("{name} not found (tried: {})", tried.join(", "))]
    NotFound {
        /// The executable's file name.
        name: &'static str,
        /// Every path tried, in order.
        tried: Vec<String>,
    },
    /// The guest agent is dynamically linked: the guest has no loader for it.
    #[error("the guest agent {0} is dynamically linked; the guest runs it as its init, before any loader or libc exists")]
    AgentNotStatic(PathBuf),
}

impl Coded for LocateError {
    fn code(&self) -> &str {
        match self {
            LocateError::NotFound { name, .. } if *name == VMM_NAME => "VMM_NOT_FOUND",
            // The code the agent has always had.
            LocateError::NotFound { .. } => "BOOT_AGENT_NOT_FOUND",
            LocateError::AgentNotStatic(_) => "AGENT_NOT_STATIC",
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            LocateError::NotFound { name, .. } if *name == VMM_NAME => format!(
                "install ferry with `cargo xtask install`, or set {VMM_ENV} to the {VMM_NAME} executable"
            ),
            LocateError::NotFound { .. } => format!(
                "install ferry with `cargo xtask install`, or set {AGENT_ENV} to the static {AGENT_NAME}"
            ),
            LocateError::AgentNotStatic(_) => {
                "build it static: `cargo xtask install` does (crt-static, target x86_64-unknown-linux-gnu)"
                    .into()
            }
        })
    }
}

/// Where to look for an executable named `name`, in order: the configured
/// path, the environment variable, beside the running executable (and, for a
/// checkout, its static build output), then each `PATH` directory.
fn candidates(configured: Option<&Path>, env: &str, name: &str) -> Vec<PathBuf> {
    candidates_on(
        configured,
        std::env::var_os(env).as_deref(),
        std::env::var_os("PATH").as_deref(),
        name,
    )
}

/// [`candidates`] with the environment variable's value and `PATH` given.
fn candidates_on(
    configured: Option<&Path>,
    env_value: Option<&std::ffi::OsStr>,
    path: Option<&std::ffi::OsStr>,
    name: &str,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = configured {
        out.push(p.to_path_buf());
        // An explicit path is the only candidate: falling back would hide a typo.
        return out;
    }
    if let Some(p) = env_value.filter(|v| !v.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(name));
        // `cargo test` binaries live in target/<profile>/deps; the static
        // builds `cargo xtask` makes in target/x86_64-unknown-linux-gnu/release.
        for up in ["..", "../.."] {
            out.push(
                dir.join(up)
                    .join("x86_64-unknown-linux-gnu/release")
                    .join(name),
            );
        }
    }
    if let Some(path) = path {
        out.extend(std::env::split_paths(path).map(|d| d.join(name)));
    }
    out
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn locate(
    configured: Option<&Path>,
    env: &str,
    name: &'static str,
) -> Result<PathBuf, LocateError> {
    let tried = candidates(configured, env, name);
    match tried.iter().find(|p| is_executable_file(p)) {
        Some(p) => Ok(p.clone()),
        None => Err(LocateError::NotFound {
            name,
            tried: tried.iter().map(|p| p.display().to_string()).collect(),
        }),
    }
}

/// Finds `ferry-vmm`: the configured path, `$FERRY_VMM`, beside the running
/// executable, then `PATH`.
pub fn locate_vmm(config: &Config) -> Result<PathBuf, LocateError> {
    locate(config.vmm.as_deref(), VMM_ENV, VMM_NAME)
}

/// Finds the guest agent the same way as [`locate_vmm`], passing over any
/// that is not statically linked (a plain `cargo build` makes one): the
/// first static one wins. A configured agent is the only candidate; when
/// every agent found is dynamic, the first is refused with
/// [`LocateError::AgentNotStatic`].
pub fn locate_agent(config: &Config) -> Result<PathBuf, LocateError> {
    first_static_agent(candidates(config.agent.as_deref(), AGENT_ENV, AGENT_NAME))
}

/// The first statically linked executable of `tried`.
fn first_static_agent(tried: Vec<PathBuf>) -> Result<PathBuf, LocateError> {
    let mut dynamic = None;
    for p in tried.iter().filter(|p| is_executable_file(p)) {
        if is_static_elf(p).unwrap_or(false) {
            return Ok(p.clone());
        }
        dynamic.get_or_insert_with(|| p.clone());
    }
    match dynamic {
        Some(p) => Err(LocateError::AgentNotStatic(p)),
        None => Err(LocateError::NotFound {
            name: AGENT_NAME,
            tried: tried.iter().map(|p| p.display().to_string()).collect(),
        }),
    }
}

/// Whether `path` is a 64-bit little-endian ELF with no program interpreter
/// (`PT_INTERP`), i.e. one the kernel can start without a dynamic loader.
/// Hand-read: only two header fields and the program header types are
/// needed, which does not justify an object-file parser dependency.
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let mut f = std::fs::File::open(path)?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh)?;
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(false);
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().expect("8 bytes"));
    let phentsize = u64::from(u16::from_le_bytes([eh[54], eh[55]]));
    let phnum = u64::from(u16::from_le_bytes([eh[56], eh[57]]));
    if phentsize < 4 || phnum > 4096 {
        return Ok(false);
    }
    for i in 0..phnum {
        f.seek(SeekFrom::Start(phoff + i * phentsize))?;
        let mut ty = [0u8; 4];
        f.read_exact(&mut ty)?;
        if u32::from_le_bytes(ty) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executable(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn a_configured_vmm_is_used_and_a_missing_one_lists_what_was_tried() {
        let tmp = tempfile::tempdir().unwrap();
        let vmm = executable(tmp.path(), "my-vmm", b"#!/bin/sh\n");
        let config = Config {
            vmm: Some(vmm.clone()),
            ..Config::with_dirs(tmp.path().join("d"), tmp.path().join("c"))
        };
        assert_eq!(locate_vmm(&config).unwrap(), vmm);

        let missing = tmp.path().join("nowhere/ferry-vmm");
        let config = Config {
            vmm: Some(missing.clone()),
            ..config
        };
        let err = locate_vmm(&config).unwrap_err();
        assert_eq!(err.code(), "VMM_NOT_FOUND");
        assert!(err.to_string().contains(&missing.display().to_string()));
        assert!(err.hint().unwrap().contains("FERRY_VMM"));
    }

    #[test]
    fn unconfigured_lookup_tries_env_beside_the_executable_then_path() {
        let tried = candidates(None, "FERRY_TEST_UNSET_VARIABLE", "ferry-vmm");
        let exe_dir = std::env::current_exe().unwrap();
        let exe_dir = exe_dir.parent().unwrap();
        assert_eq!(tried[0], exe_dir.join("ferry-vmm"));
        let path_dirs: Vec<PathBuf> =
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
        if let Some(first) = path_dirs.first() {
            assert!(tried.contains(&first.join("ferry-vmm")));
            let beside = tried.iter().position(|p| p == &exe_dir.join("ferry-vmm"));
            let on_path = tried.iter().position(|p| p == &first.join("ferry-vmm"));
            assert!(beside < on_path, "beside the executable comes before PATH");
        }
    }

    #[test]
    fn a_dynamically_linked_agent_is_refused() {
        // /bin/sh on any Debian host is dynamically linked.
        let config = Config {
            agent: Some(PathBuf::from("/bin/sh")),
            ..Config::with_dirs("/nonexistent/d", "/nonexistent/c")
        };
        let err = locate_agent(&config).unwrap_err();
        assert_eq!(err.code(), "AGENT_NOT_STATIC");
        // A file that is not ELF at all is no agent either.
        let tmp = tempfile::tempdir().unwrap();
        let script = executable(tmp.path(), "ferry-agent", b"#!/bin/sh\n");
        let config = Config {
            agent: Some(script),
            ..config
        };
        assert_eq!(
            locate_agent(&config).unwrap_err().code(),
            "AGENT_NOT_STATIC"
        );
    }

    #[test]
    fn a_dynamic_agent_is_passed_over_for_a_static_one_further_on() {
        let tmp = tempfile::tempdir().unwrap();
        let dynamic = tmp.path().join("first");
        let stat = tmp.path().join("second");
        std::fs::create_dir_all(&dynamic).unwrap();
        std::fs::create_dir_all(&stat).unwrap();
        std::fs::copy("/bin/sh", dynamic.join("ferry-agent")).unwrap();
        executable(&stat, "ferry-agent", &minimal_static_elf());
        let (dynamic, stat) = (dynamic.join("ferry-agent"), stat.join("ferry-agent"));
        let missing = tmp.path().join("missing/ferry-agent");
        let tried = vec![missing.clone(), dynamic.clone(), stat.clone()];
        assert_eq!(first_static_agent(tried).unwrap(), stat);
        // Only dynamic ones: the first is named.
        let err = first_static_agent(vec![missing, dynamic.clone()]).unwrap_err();
        assert_eq!(err.code(), "AGENT_NOT_STATIC");
        assert!(err.to_string().contains(&dynamic.display().to_string()));
    }

    /// A minimal ELF64 header with one PT_LOAD program header.
    fn minimal_static_elf() -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        elf
    }

    #[test]
    fn a_static_elf_is_accepted() {
        let elf = minimal_static_elf();
        let tmp = tempfile::tempdir().unwrap();
        let agent = executable(tmp.path(), "ferry-agent", &elf);
        assert!(is_static_elf(&agent).unwrap());
        let mut dynamic = elf.clone();
        dynamic[64..68].copy_from_slice(&3u32.to_le_bytes());
        let agent = executable(tmp.path(), "dyn-agent", &dynamic);
        assert!(!is_static_elf(&agent).unwrap());
    }
}
