//! Images a VM boots from: the base root filesystem, an ext4 image, or a rootfs
//! tarball (converted once to ext4 and cached by content hash).
//!
//! An image may carry its defaults (command, env, workdir) in `/etc/ferry/image.json`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::assets::rootfs;
use crate::config::Config;
use crate::error::Coded;
use crate::fsutil;

/// Where an image keeps its defaults, relative to its root.
pub const IMAGE_CONFIG_PATH: &str = "etc/ferry/image.json";

/// Defaults recorded in an image.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageConfig {
    /// Command run as the VM's main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Environment for that command and for execs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User the command runs as (`name`, `uid`, `name:group`, `uid:gid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ImageConfig {
    /// The defaults `exec` takes from this config.
    pub fn exec_defaults(&self) -> crate::vm::record::ExecDefaults {
        crate::vm::record::ExecDefaults {
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workdir: self.workdir.clone(),
            user: self.user.clone(),
        }
    }

    /// The config of an image pulled from a registry.
    fn from_registry(image: &crate::oci_images::CachedImage) -> ImageConfig {
        ImageConfig {
            cmd: (!image.spec.command.is_empty()).then(|| image.spec.command.clone()),
            env: image.spec.env_pairs().into_iter().collect(),
            workdir: image.spec.workdir.clone(),
            user: image.spec.user.clone(),
        }
    }
}

/// An image ready to boot.
#[derive(Debug, Clone)]
pub struct Image {
    /// ext4 image to copy-on-write for the VM's root disk.
    pub ext4: PathBuf,
    /// What the user named, for display.
    pub description: String,
    /// The image's defaults.
    pub config: ImageConfig,
    /// Whether `ferry exec` takes the image's env, workdir and user as its
    /// defaults, as `docker exec` does (images from registries).
    pub exec_defaults: bool,
}

/// Errors resolving images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No such file.
    #[error("image {0} does not exist")]
    NotFound(PathBuf),
    /// Not a tarball or ext4 image of a root filesystem.
    #[error("{path} is not a root filesystem: {why}")]
    NotRootfs {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `ferry install` has not been run.
    #[error("guest assets are not installed")]
    NotInstalled,
    /// Conversion failed.
    #[error(transparent)]
    Convert(#[from] crate::error::InstallError),
    /// An image from a registry could not be had.
    #[error(transparent)]
    Oci(#[from] crate::oci_images::OciImageError),
    /// Filesystem trouble.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Coded for ImageError {
    fn code(&self) -> &str {
        match self {
            ImageError::NotFound(_) => "IMAGE_NOT_FOUND",
            ImageError::NotRootfs { .. } => "IMAGE_NOT_ROOTFS",
            ImageError::NotInstalled => "ASSETS_NOT_INSTALLED",
            ImageError::Convert(_) => "IMAGE_CONVERT_FAILED",
            ImageError::Io { .. } => "IMAGE_IO",
            ImageError::Oci(e) => e.code(),
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ImageError::NotFound(_) => Some("pass a rootfs tarball (.tar, .tar.gz, .tar.zst) or an ext4 image; omit IMAGE for the base image".into()),
            ImageError::NotRootfs { .. } => Some("a rootfs needs /bin/sh or a ferry image config; `ferry bake` makes one".into()),
            ImageError::NotInstalled => Some("run `ferry install` first".into()),
            ImageError::Convert(e) => e.hint(),
            ImageError::Oci(e) => e.hint(),
            _ => None,
        }
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        context: context.to_string(),
        source,
    }
}

/// The installed guest kernel and base rootfs, without building anything.
pub fn installed_assets(config: &Config) -> Result<(PathBuf, PathBuf), ImageError> {
    let cache = &config.dirs.cache;
    let find = |sub: &str, file: &str| -> Option<PathBuf> {
        let mut hits: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cache.join(sub))
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path().join(file))
            .filter(|p| p.is_file())
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
        hits.sort();
        hits.pop().map(|(_, p)| p)
    };
    let rootfs = cache
        .join("rootfs")
        .join(rootfs::cache_key())
        .join("rootfs.ext4");
    let rootfs = if rootfs.is_file() { Some(rootfs) } else { None };
    let kernel = config.kernel.clone().or_else(|| find("kernel", "vmlinux"));
    let rootfs = config.rootfs.clone().or(rootfs);
    match (kernel, rootfs) {
        (Some(k), Some(r)) => Ok((k, r)),
        _ => Err(ImageError::NotInstalled),
    }
}

/// Resolves what the user asked to boot.
pub fn resolve(config: &Config, image: Option<&Path>) -> Result<Image, ImageError> {
    let Some(path) = image else {
        let (_, base) = installed_assets(config)?;
        return Ok(Image {
            ext4: base,
            description: "base".into(),
            config: ImageConfig::default(),
            exec_defaults: false,
        });
    };
    if !path.is_file() {
        if let Some(text) = path.to_str() {
            if ferry_oci::ImageRef::looks_like_reference(text) {
                let pulled = crate::oci_images::resolve(config, text)?;
                return Ok(Image {
                    ext4: pulled.ext4.clone(),
                    description: text.to_string(),
                    config: ImageConfig::from_registry(&pulled),
                    exec_defaults: true,
                });
            }
        }
        return Err(ImageError::NotFound(path.to_path_buf()));
    }
    if is_ext4(path).map_err(io("read image"))? {
        return Ok(Image {
            ext4: path.to_path_buf(),
            description: path.display().to_string(),
            config: ImageConfig::default(),
            exec_defaults: false,
        });
    }
    convert_tarball(&config.dirs.cache, path)
}

fn is_ext4(path: &Path) -> std::io::Result<bool> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    if f.metadata()?.len() < 1082 {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(1080))?;
    f.read_exact(&mut magic)?;
    Ok(magic == [0x53, 0xef])
}

/// The SHA-256 of a tarball, hashed once per process and file version: a
/// boot resolves its image more than once (the template lookup, then the
/// boot itself), and a large tarball takes seconds to hash.
fn tarball_digest(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    type Identity = (u64, u64, u64, i64, i64);
    static SEEN: std::sync::Mutex<Vec<(Identity, String)>> = std::sync::Mutex::new(Vec::new());
    let m = std::fs::metadata(path)?;
    let id = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, digest)) = seen.iter().find(|(i, _)| *i == id) {
        return Ok(digest.clone());
    }
    let digest = crate::fsutil::sha256_file(path)?;
    seen.push((id, digest.clone()));
    Ok(digest)
}

/// Converts a rootfs tarball to ext4 once; later boots of the same bytes reuse it.
fn convert_tarball(cache: &Path, path: &Path) -> Result<Image, ImageError> {
    let digest = tarball_digest(path).map_err(io("hash image"))?;
    let root = cache.join("images");
    let dest = root.join(&digest[..32]);
    let description = path.display().to_string();
    if dest.join("rootfs.ext4").is_file() {
        let config = crate::vm::record::read_json(&dest.join("image.json")).unwrap_or_default();
        return Ok(Image {
            ext4: dest.join("rootfs.ext4"),
            description,
            config,
            exec_defaults: false,
        });
    }
    std::fs::create_dir_all(&root).map_err(io("create image cache"))?;
    fsutil::remove_stale_staging(&root);
    let staging = fsutil::staging_path(&dest);
    let _ = std::fs::remove_dir_all(&staging);
    let tree = staging.join("tree");
    std::fs::create_dir_all(&tree).map_err(io("create image staging"))?;
    let log = root.join("convert.log");
    let result = (|| {
        // Applied like a registry layer: owners, modes, xattrs and device
        // nodes reach the ext4 without root.
        let mut layer = ferry_oci::layers::Tree::new(&tree, crate::oci_images::MAX_IMAGE_BYTES);
        layer
            .apply_layer(0, path)
            .map_err(|e| ImageError::NotRootfs {
                path: path.to_path_buf(),
                why: format!("not a readable tarball ({e})"),
            })?;
        let config: Option<ImageConfig> = std::fs::read(tree.join(IMAGE_CONFIG_PATH))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // Baked images say what they run; anything else must at least have
        // a shell to be a root filesystem.
        let has_sh = ["bin/sh", "usr/bin/sh"]
            .iter()
            .any(|p| tree.join(p).symlink_metadata().is_ok());
        if !has_sh && config.is_none() {
            return Err(ImageError::NotRootfs {
                path: path.to_path_buf(),
                why: "it has no /bin/sh and no ferry image config".into(),
            });
        }
        let config = config.unwrap_or_default();
        crate::vm::record::write_json(&staging.join("image.json"), &config)
            .map_err(io("write image config"))?;
        crate::oci_images::build_ext4(
            &layer,
            &staging,
            &staging.join("rootfs.ext4"),
            ("ferry-root", 2 << 30),
            &log,
        )?;
        Ok(config)
    })();
    let _ = std::fs::remove_dir_all(&tree);
    let config = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    fsutil::fsync_dir_tree(&staging).map_err(io("sync image"))?;
    fsutil::publish(&staging, &dest).map_err(io("publish image"))?;
    Ok(Image {
        ext4: dest.join("rootfs.ext4"),
        description,
        config,
        exec_defaults: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn missing_and_non_rootfs_images_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope.tar");
        let config = Config::with_dirs(tmp.path().join("data"), tmp.path().join("cache"));
        assert_eq!(
            resolve(&config, Some(&missing)).unwrap_err().code(),
            "IMAGE_NOT_FOUND"
        );
        let junk = tmp.path().join("junk.tar");
        std::fs::write(&junk, b"definitely not a tarball").unwrap();
        assert_eq!(
            resolve(&config, Some(&junk)).unwrap_err().code(),
            "IMAGE_NOT_ROOTFS"
        );

        // A valid tarball without a shell is not a root filesystem either.
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/hello"), b"hi").unwrap();
        // GNU tar of `src` into `name`, with `flags`.
        let tarball = |name: &str, flags: &[&str]| {
            let tar = tmp.path().join(name);
            let status = Command::new("tar")
                .args(flags)
                .arg("-cf")
                .arg(&tar)
                .arg("-C")
                .arg(&src)
                .arg(".")
                .status()
                .unwrap();
            assert!(status.success());
            tar
        };
        let tar = tarball("nosh.tar", &[]);
        let err = resolve(&config, Some(&tar)).unwrap_err();
        assert_eq!(err.code(), "IMAGE_NOT_ROOTFS");
        assert!(err.to_string().contains("/bin/sh"));
        // Nothing half-made is left in the cache.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("cache/images"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().unwrap().is_dir())
            .collect();
        assert!(leftovers.is_empty());

        // With a ferry image config it is one (a baked scratch image), and
        // the owners in the tarball reach the ext4 without root.
        std::fs::create_dir_all(src.join("etc/ferry")).unwrap();
        std::fs::write(
            src.join("etc/ferry/image.json"),
            br#"{"cmd":["/hello"],"user":"1234"}"#,
        )
        .unwrap();
        let tar = tarball(
            "baked.tar",
            &["--numeric-owner", "--owner=1234", "--group=4321"],
        );
        let image = resolve(&config, Some(&tar)).unwrap();
        assert_eq!(image.config.cmd, Some(vec!["/hello".to_string()]));
        assert_eq!(image.config.user.as_deref(), Some("1234"));
        let stat = Command::new("debugfs")
            .args(["-R", "stat /etc/hello"])
            .arg(&image.ext4)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&stat.stdout);
        assert!(
            stat.contains("User:  1234") && stat.contains("Group:  4321"),
            "{stat}"
        );
        let kept: Vec<String> = std::fs::read_dir(image.ext4.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(kept.len(), 2, "only the ext4 and its config: {kept:?}");
    }
}
