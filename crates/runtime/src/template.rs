//! Boot templates: a saved, freshly booted and idle guest of one shape (kernel,
//! image, agent, vCPUs, memory), from which later boots of that shape are
//! restored instead of booting a kernel.
//!
//! `ferry template create` boots a VM with nothing to run, waits for its agent
//! and writes it as a thin bundle under the cache directory. [`crate::boot::boot`]
//! then restores a matching template: each VM gets its own name and hostname, a
//! fresh kernel RNG seed, the host's wall clock, and its own copy-on-write disk
//! layer over the image. The key covers everything the guest booted with
//! (ferry's version, the kernel, image and agent files, vCPUs, memory, kernel
//! command line), so a changed file never matches a stale template. Boots that
//! add devices (live mounts, guest networking) or ask for `--cold` boot a kernel.
//!
//! VMs made from one template share its agent token, as forks of one VM do: the
//! token guards each VM's vsock socket against other users, and every one of
//! these VMs belongs to the same user.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::boot::spec::{kernel_for, BootSpec};
use crate::config::{Config, Dirs};
use crate::machine::BootError;
use crate::vm::record;

/// What a template was booted with; equal keys mean interchangeable guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateKey {
    /// ferry's version (the agent protocol and the VMM's devices follow it).
    pub ferry_version: String,
    /// The kernel file's identity.
    pub kernel: String,
    /// The root image file's identity.
    pub image: String,
    /// The agent binary's identity.
    pub agent: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The guest kernel command line ferry adds.
    pub cmdline: String,
}

impl TemplateKey {
    /// The key of a boot with these files and sizes.
    pub fn new(
        kernel: &Path,
        image: &Path,
        agent: &Path,
        cpus: u32,
        memory_mib: u32,
    ) -> std::io::Result<TemplateKey> {
        Ok(TemplateKey {
            ferry_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel: file_identity(kernel)?,
            image: file_identity(image)?,
            agent: file_identity(agent)?,
            cpus,
            memory_mib,
            cmdline: crate::plan::GUEST_CMDLINE.to_string(),
        })
    }

    /// A short, stable name for the key.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).expect("key serializes");
        hex::encode(&Sha256::digest(json)[..12])
    }
}

/// Path, size, modification time and inode: a file replaced or rewritten in
/// place gets a new identity without hashing its contents.
fn file_identity(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let path = std::fs::canonicalize(path)?;
    let m = std::fs::metadata(&path)?;
    Ok(format!(
        "{}:{}:{}.{}:{}",
        path.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ino()
    ))
}

/// A template on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// [`TemplateKey::id`].
    pub id: String,
    /// What it was booted with.
    pub key: TemplateKey,
    /// The image as the user named it.
    pub image: String,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// Size of the bundle in bytes.
    pub bytes: u64,
    /// The bundle.
    pub path: PathBuf,
}

/// Whether `id` has the shape of a template id (hex), so that it can name
/// no file outside the templates directory.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn bundle_path(dirs: &Dirs, id: &str) -> PathBuf {
    dirs.templates().join(format!("{id}.snap"))
}

pub(crate) fn info_path(dirs: &Dirs, id: &str) -> PathBuf {
    dirs.templates().join(format!("{id}.json"))
}

/// The template for `key`, if one was made and its bundle is still there.
pub fn find(dirs: &Dirs, key: &TemplateKey) -> Option<TemplateInfo> {
    let info: TemplateInfo = record::read_json(&info_path(dirs, &key.id()))?;
    (info.key == *key && info.path.is_file()).then_some(info)
}

/// Whether any template exists (cheap: spares resolving a boot's files when
/// there is nothing to match them against).
pub fn any(dirs: &Dirs) -> bool {
    std::fs::read_dir(dirs.templates())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .any(|e| e.path().extension().is_some_and(|x| x == "json"))
}

/// Every template, newest first.
pub fn list(dirs: &Dirs) -> Vec<TemplateInfo> {
    let mut out: Vec<TemplateInfo> = std::fs::read_dir(dirs.templates())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| record::read_json(&p))
        .collect();
    out.sort_by_key(|t: &TemplateInfo| std::cmp::Reverse(t.created_at));
    out
}

/// Deletes the template `id`; false if there was none (or `id` is not an id).
pub fn remove(dirs: &Dirs, id: &str) -> bool {
    if !valid_id(id) {
        return false;
    }
    let had = info_path(dirs, id).exists() || bundle_path(dirs, id).exists();
    // The record first: a template without it is never used.
    let _ = std::fs::remove_file(info_path(dirs, id));
    let _ = std::fs::remove_file(bundle_path(dirs, id));
    had
}

/// Why a boot cannot use a template, or `None` if it can.
pub fn ineligible(spec: &BootSpec) -> Option<&'static str> {
    if spec.cold {
        return Some("--cold");
    }
    if spec.net {
        return Some("guest networking adds a device");
    }
    if spec
        .mounts
        .iter()
        .any(|m| m.kind == crate::mounts::MountKind::Live)
    {
        return Some("live mounts add a device");
    }
    None
}

/// The key of a boot of `spec`, resolving the same files [`crate::boot::boot`] does.
pub fn key_for(
    config: &Config,
    spec: &BootSpec,
) -> Result<(TemplateKey, crate::images::Image), BootError> {
    let image = crate::images::resolve(config, spec.image.as_deref())?;
    let kernel = kernel_for(config, spec)?;
    let agent = crate::config::locate_agent(config)?;
    let key = TemplateKey::new(
        &kernel,
        &image.ext4,
        &agent,
        spec.cpus.unwrap_or(crate::machine::DEFAULT_CPUS),
        spec.memory_mib
            .unwrap_or(crate::machine::DEFAULT_MEMORY_MIB),
    )
    .map_err(|e| BootError::Prepare(format!("template key: {e}")))?;
    Ok((key, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_input() {
        let tmp = tempfile::tempdir().unwrap();
        let f = |name: &str, body: &str| {
            let p = tmp.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let (k, i, a) = (f("k", "kernel"), f("i", "image"), f("a", "agent"));
        let base = TemplateKey::new(&k, &i, &a, 1, 512).unwrap();
        assert_eq!(
            base.id(),
            TemplateKey::new(&k, &i, &a, 1, 512).unwrap().id()
        );
        assert_ne!(
            base.id(),
            TemplateKey::new(&k, &i, &a, 2, 512).unwrap().id()
        );
        assert_ne!(
            base.id(),
            TemplateKey::new(&k, &i, &a, 1, 1024).unwrap().id()
        );
        assert_ne!(
            base.id(),
            TemplateKey::new(&i, &k, &a, 1, 512).unwrap().id()
        );
        // A rewritten image is another image, even at the same path.
        std::fs::write(&i, "image, changed").unwrap();
        assert_ne!(
            base.id(),
            TemplateKey::new(&k, &i, &a, 1, 512).unwrap().id()
        );
        assert!(TemplateKey::new(&tmp.path().join("missing"), &i, &a, 1, 512).is_err());
    }

    #[test]
    fn plain_boots_are_eligible_and_extra_devices_are_not() {
        let plain = BootSpec::default();
        assert_eq!(ineligible(&plain), None);
        assert!(ineligible(&BootSpec {
            net: true,
            ..BootSpec::default()
        })
        .is_some());
        assert!(ineligible(&BootSpec {
            cold: true,
            ..BootSpec::default()
        })
        .is_some());
    }
}
