//! Images pulled from OCI and Docker registries, unpacked once into an ext4
//! image and cached by manifest digest under `CACHE/oci/images/HEX/`
//! (`rootfs.ext4` and `image.json`: the references that name it, its config
//! and size). A pull is built in a staging directory and published by one
//! rename, so the cache never holds a half-made image.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_oci::{ImageRef, ImageSpec, OciError, PullOptions, PullProgress};

/// The pull types of the OCI crate, for the runtime's users.
pub mod ferry_oci_types {
    pub use ferry_oci::{PullOptions, PullProgress};
}
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::Coded;
use crate::fsutil;
use crate::host::command::run_logged;

/// Largest unpacked image (file data), as a bound on what a registry can make
/// this host write.
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedImage {
    /// References that were pulled to it, newest last.
    pub references: Vec<String>,
    /// Manifest digest (`sha256:...`).
    pub digest: String,
    /// The image config ferry honours.
    pub spec: ImageSpec,
    /// Bytes of the layers as pulled (compressed).
    pub size: u64,
    /// When it was first pulled (seconds since the epoch).
    pub created: u64,
    /// Where its ext4 image is (not stored: derived from the cache).
    #[serde(skip)]
    pub ext4: PathBuf,
}

impl CachedImage {
    /// Short id: the first 12 hex digits of the digest.
    pub fn id(&self) -> &str {
        let hex = self.digest.trim_start_matches("sha256:");
        &hex[..12.min(hex.len())]
    }
}

/// Errors of the image cache: a registry's or layer's error, or the cache's.
#[derive(Debug, thiserror::Error)]
pub enum OciImageError {
    /// Pulling or unpacking failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// No cached image has that reference or id.
    #[error("no pulled image is named {0}")]
    NotCached(String),
    /// Building the ext4 image failed.
    #[error("cannot build the image's root filesystem: {0}")]
    Build(String),
    /// Cache trouble.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Coded for OciImageError {
    fn code(&self) -> &str {
        match self {
            OciImageError::Oci(e) => e.code(),
            OciImageError::NotCached(_) => "IMAGE_NOT_CACHED",
            OciImageError::Build(_) => "IMAGE_CONVERT_FAILED",
            OciImageError::Io { .. } => "IMAGE_IO",
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            OciImageError::Oci(e) => e.hint(),
            OciImageError::NotCached(_) => Some("`ferry images` lists pulled images".into()),
            OciImageError::Build(_) => Some("the log is CACHE/oci/build.log".into()),
            OciImageError::Io { .. } => None,
        }
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> OciImageError + '_ {
    move |source| OciImageError::Io {
        context: context.to_string(),
        source,
    }
}

/// Registries spoken to over plain HTTP by every pull, from
/// `$XDG_CONFIG_HOME/ferry/registries.json` (`{"insecure": ["host:port"]}`).
pub fn configured_insecure_registries() -> Vec<String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        insecure: Vec<String>,
    }
    let dir = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    dir.and_then(|d| std::fs::read(d.join("ferry/registries.json")).ok())
        .and_then(|b| serde_json::from_slice::<File>(&b).ok())
        .map(|f| f.insecure)
        .unwrap_or_default()
}

fn images_dir(config: &Config) -> PathBuf {
    config.dirs.cache.join("oci/images")
}

fn read_image(dir: &Path) -> Option<CachedImage> {
    let mut image: CachedImage = crate::vm::record::read_json(&dir.join("image.json"))?;
    image.ext4 = dir.join("rootfs.ext4");
    image.ext4.is_file().then_some(image)
}

/// Every cached image, oldest first.
pub fn list(config: &Config) -> Vec<CachedImage> {
    let mut out: Vec<CachedImage> = std::fs::read_dir(images_dir(config))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| fsutil::staging_owner(&e.file_name().to_string_lossy()).is_none())
        .filter_map(|e| read_image(&e.path()))
        .collect();
    out.sort_by_key(|i| i.created);
    out
}

/// The cached image `name` names: a reference as pulled (or its full form),
/// a digest, or an id prefix of at least 4 digits.
pub fn find(config: &Config, name: &str) -> Option<CachedImage> {
    let full = ImageRef::parse(name).ok().map(|r| r.full());
    let images = list(config);
    let by_ref = images.iter().rev().find(|i| {
        i.references
            .iter()
            .any(|r| r == name || Some(r) == full.as_ref())
    });
    if let Some(i) = by_ref {
        return Some(i.clone());
    }
    let hex = name.trim_start_matches("sha256:");
    if let Some(digest) = full.as_deref().and_then(|f| f.split('@').nth(1)) {
        return images.into_iter().find(|i| i.digest == digest);
    }
    if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut hits = images.into_iter().filter(|i| {
            i.id().starts_with(hex) || i.digest.trim_start_matches("sha256:").starts_with(hex)
        });
        let first = hits.next()?;
        return hits.next().is_none().then_some(first);
    }
    None
}

/// Pulls `reference` (contacting the registry even when cached, to resolve
/// a tag), unpacking it unless its manifest digest is cached already.
pub fn pull(
    config: &Config,
    reference: &str,
    options: &PullOptions,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<CachedImage, OciImageError> {
    let image_ref = ImageRef::parse(reference)?;
    let root = images_dir(config);
    std::fs::create_dir_all(&root).map_err(io("create the image cache"))?;
    fsutil::remove_stale_staging(&root);
    // One staging directory per pull: pulls may run side by side in one process.
    let tag = fsutil::random_hex(4).map_err(io("name a staging directory"))?;
    let staging = fsutil::staging_path(&root.join(format!("pull-{tag}")));
    std::fs::create_dir_all(staging.join("blobs")).map_err(io("create a staging directory"))?;
    let have = |digest: &str| read_image(&root.join(digest_hex(digest))).is_some();
    let result = (|| {
        let pulled = ferry_oci::pull(&image_ref, options, &staging.join("blobs"), &have, progress)?;
        let dest = root.join(digest_hex(&pulled.digest));
        if let Some(mut cached) = read_image(&dest) {
            remember(&mut cached, &dest, &image_ref)?;
            return Ok(cached);
        }
        let mut tree = ferry_oci::layers::Tree::new(&staging.join("tree"), MAX_IMAGE_BYTES);
        std::fs::create_dir(&tree.root).map_err(io("create the image tree"))?;
        for (i, blob) in pulled.layers.iter().enumerate() {
            tree.apply_layer(i, blob)?;
            let _ = std::fs::remove_file(blob);
        }
        let image_dir = staging.join("image");
        std::fs::create_dir(&image_dir).map_err(io("create the image directory"))?;
        build_ext4(
            &tree,
            &staging,
            &image_dir.join("rootfs.ext4"),
            ("ferry-oci", 256 << 20),
            &config.dirs.cache.join("oci/build.log"),
        )?;
        let _ = std::fs::remove_dir_all(&tree.root);
        let image = CachedImage {
            references: vec![image_ref.given().to_string()],
            digest: pulled.digest.clone(),
            spec: pulled.spec.clone(),
            size: pulled.size,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            ext4: dest.join("rootfs.ext4"),
        };
        crate::vm::record::write_json(&image_dir.join("image.json"), &image)
            .map_err(io("write image.json"))?;
        fsutil::fsync_dir_tree(&image_dir).map_err(io("sync the image"))?;
        match fsutil::publish(&image_dir, &dest) {
            Ok(()) => Ok(image),
            // Another pull of the same image won the race: use it.
            Err(_) if read_image(&dest).is_some() => {
                let mut cached = read_image(&dest).expect("checked");
                remember(&mut cached, &dest, &image_ref)?;
                Ok(cached)
            }
            Err(e) => Err(io("publish the image")(e)),
        }
    })();
    let _ = fsutil::remove_any(&staging);
    result
}

/// Adds `reference` to a cached image's names.
fn remember(
    image: &mut CachedImage,
    dir: &Path,
    reference: &ImageRef,
) -> Result<(), OciImageError> {
    let given = reference.given().to_string();
    if !image.references.contains(&given) {
        image.references.push(given);
        crate::vm::record::write_json(&dir.join("image.json"), image)
            .map_err(io("update image.json"))?;
    }
    Ok(())
}

fn digest_hex(digest: &str) -> String {
    digest
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect()
}

/// `mke2fs -d` of the tree, then the ownership, modes, xattrs and device
/// nodes the layers asked for, written by debugfs.
/// Used for rootfs tarballs too (see [`crate::images`]): no root needed.
pub(crate) fn build_ext4(
    tree: &ferry_oci::layers::Tree,
    staging: &Path,
    dest: &Path,
    (label, min_bytes): (&str, u64),
    log: &Path,
) -> Result<(), OciImageError> {
    let build = |e: crate::error::InstallError| OciImageError::Build(e.to_string());
    crate::assets::rootfs::make_ext4(&tree.root, dest, label, min_bytes, log).map_err(build)?;
    let scratch = staging.join("xattrs");
    std::fs::create_dir_all(&scratch).map_err(io("create a scratch directory"))?;
    let script_path = staging.join("fixups.debugfs");
    let result = (|| {
        let script = ferry_oci::fixups::debugfs_script(tree, &scratch)?;
        if script.is_empty() {
            return Ok(());
        }
        std::fs::write(&script_path, script).map_err(io("write the debugfs script"))?;
        run_logged(
            "debugfs",
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&script_path)
                .arg(dest),
            log,
            |_| {},
        )
        .map_err(build)
    })();
    // Only the ext4 is kept.
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_file(&script_path);
    result
}

/// Removes the cached image `name` names; returns it.
pub fn remove(config: &Config, name: &str) -> Result<CachedImage, OciImageError> {
    let image = find(config, name).ok_or_else(|| OciImageError::NotCached(name.to_string()))?;
    let dir = images_dir(config).join(digest_hex(&image.digest));
    // Renamed away first, so a reader never sees half an image.
    let doomed = fsutil::staging_path(&dir);
    std::fs::rename(&dir, &doomed).map_err(io("remove the image"))?;
    fsutil::remove_any(&doomed).map_err(io("remove the image"))?;
    Ok(image)
}

/// The image a boot of `reference` uses: the cached one, else pulled now.
pub fn resolve(config: &Config, reference: &str) -> Result<CachedImage, OciImageError> {
    match find(config, reference) {
        Some(i) => Ok(i),
        None => pull(
            config,
            reference,
            &PullOptions {
                insecure_registries: configured_insecure_registries(),
            },
            &mut |_| {},
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(config: &Config, hex: &str, references: &[&str]) {
        let dir = images_dir(config).join(hex);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rootfs.ext4"), b"ext4").unwrap();
        let image = CachedImage {
            references: references.iter().map(|r| r.to_string()).collect(),
            digest: format!("sha256:{hex}"),
            spec: ImageSpec::default(),
            size: 1,
            created: hex.len() as u64,
            ext4: PathBuf::new(),
        };
        crate::vm::record::write_json(&dir.join("image.json"), &image).unwrap();
    }

    #[test]
    fn images_are_found_by_reference_digest_or_id_and_removed_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::with_dirs(tmp.path().join("data"), tmp.path().join("cache"));
        let a = "a".repeat(64);
        let b = format!("ab{}", "b".repeat(62));
        cached(
            &config,
            &a,
            &["localhost:5000/app:1", "localhost:5000/app:latest"],
        );
        cached(&config, &b, &["localhost:5000/other:2"]);
        // A half-made pull is not an image.
        std::fs::create_dir_all(
            images_dir(&config).join(format!(".pull-x.tmp-{}", std::process::id())),
        )
        .unwrap();
        assert_eq!(list(&config).len(), 2);

        let by_ref = find(&config, "localhost:5000/app:1").unwrap();
        assert_eq!(by_ref.digest, format!("sha256:{a}"));
        assert!(by_ref.ext4.ends_with("rootfs.ext4"));
        assert_eq!(
            find(&config, &format!("localhost:5000/app@sha256:{a}"))
                .unwrap()
                .digest,
            by_ref.digest
        );
        assert_eq!(find(&config, "aaaaaaaa").unwrap().digest, by_ref.digest);
        assert!(find(&config, "a").is_none(), "too short an id");
        assert!(find(&config, "localhost:5000/app:2").is_none());
        // Ids are matched by prefix.
        assert!(find(&config, "abbb").is_some());

        let removed = remove(&config, "localhost:5000/app:latest").unwrap();
        assert_eq!(removed.references.len(), 2);
        assert!(find(&config, "localhost:5000/app:1").is_none());
        assert_eq!(list(&config).len(), 1);
        assert!(!images_dir(&config).join(&a).exists());
        assert_eq!(
            remove(&config, "localhost:5000/app:1").unwrap_err().code(),
            "IMAGE_NOT_CACHED"
        );
    }

    #[test]
    fn an_unreachable_registry_is_a_coded_error_and_leaves_no_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::with_dirs(tmp.path().join("data"), tmp.path().join("cache"));
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = pull(
            &config,
            &format!("127.0.0.1:{port}/app:1"),
            &PullOptions::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert_eq!(err.code(), "REGISTRY_UNREACHABLE", "{err}");
        let left: Vec<_> = std::fs::read_dir(images_dir(&config))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(
            pull(
                &config,
                "Not A Reference",
                &PullOptions::default(),
                &mut |_| {}
            )
            .unwrap_err()
            .code(),
            "IMAGE_REFERENCE_INVALID"
        );
    }
}
