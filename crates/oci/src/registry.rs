//! Pulling an image from an OCI or Docker v2 registry: the manifest (the
//! linux/amd64 one of a multi-platform index), the config and every layer,
//! each blob verified against its digest as it streams to disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{ImageIndexEntry, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use sha2::{Digest, Sha256};

use crate::config::ImageSpec;
use crate::error::{io, OciError};
use crate::reference::{plain_http, ImageRef};

/// Most layers an image may have (Docker allows 127).
pub const MAX_LAYERS: usize = 256;

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
}

/// Progress of one layer's download.
#[derive(Debug, Clone, Copy)]
pub struct PullProgress {
    /// Index of the layer, from 0.
    pub layer: usize,
    /// Number of layers.
    pub layers: usize,
    /// Bytes received so far.
    pub received: u64,
    /// The layer's size from the manifest.
    pub size: u64,
}

/// A pulled image: its digest, config and downloaded layer blobs.
#[derive(Debug)]
pub struct Pulled {
    /// The reference, pinned to `digest`.
    pub reference: ImageRef,
    /// Digest of the image manifest (`sha256:...`).
    pub digest: String,
    /// The image config.
    pub spec: ImageSpec,
    /// The layers' blob files, in order (their compression is told by
    /// their first bytes when they are applied).
    pub layers: Vec<PathBuf>,
    /// Sum of the layer blobs' sizes.
    pub size: u64,
}

/// Pulls `reference` into `dir` (which must exist): one file per layer. When
/// `have(manifest_digest)` says the image is already unpacked, no layer is
/// downloaded and [`Pulled::layers`] is empty.
pub fn pull(
    reference: &ImageRef,
    options: &PullOptions,
    dir: &Path,
    have: &dyn Fn(&str) -> bool,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<Pulled, OciError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("start the download runtime"))?;
    runtime.block_on(pull_async(reference, options, dir, have, progress))
}

async fn pull_async(
    reference: &ImageRef,
    options: &PullOptions,
    dir: &Path,
    have: &dyn Fn(&str) -> bool,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<Pulled, OciError> {
    let registry = reference.registry().to_string();
    let platforms: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&platforms);
    let resolver = move |entries: &[ImageIndexEntry]| {
        let mut found = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        found.clear();
        for e in entries {
            let Some(p) = &e.platform else { continue };
            found.push(format!("{}/{}", p.os, p.architecture));
            if p.os == "linux" && p.architecture == "amd64" {
                return Some(e.digest.clone());
            }
        }
        None
    };
    let config = ClientConfig {
        protocol: if plain_http(&registry, &options.insecure_registries) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(resolver)),
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let client = Client::new(config);
    let auth = match crate::auth::credentials_for(&registry) {
        Some(c) => RegistryAuth::Basic(c.username, c.password),
        None => RegistryAuth::Anonymous,
    };
    let fail = |e: OciDistributionError| classify(e, reference, &platforms);
    let (manifest, digest, config) = client
        .pull_manifest_and_config(reference.inner(), &auth)
        .await
        .map_err(fail)?;
    if !digest.starts_with("sha256:") {
        return Err(invalid(reference, format!("manifest digest {digest}")));
    }
    let spec = ImageSpec::parse(config.as_bytes(), &reference.full())?;
    if spec.platform != "linux/amd64" && spec.platform != "/" {
        return Err(OciError::PlatformMissing {
            reference: reference.full(),
            found: Some(spec.platform.clone()),
        });
    }
    if manifest.layers.len() > MAX_LAYERS {
        return Err(invalid(
            reference,
            format!("{} layers", manifest.layers.len()),
        ));
    }
    if !spec.diff_ids.is_empty() && spec.diff_ids.len() != manifest.layers.len() {
        return Err(invalid(
            reference,
            "the config and manifest disagree on the layer count".into(),
        ));
    }
    let pinned = reference.with_digest(&digest);
    let mut layers = Vec::new();
    let mut size = 0;
    let count = manifest.layers.len();
    let wanted = if have(&digest) { 0 } else { count };
    for (i, layer) in manifest.layers.iter().enumerate().take(wanted) {
        check_media_type(reference, &layer.media_type)?;
        let path = dir.join(format!("layer-{i}"));
        size += download(&client, &pinned, layer, &path, i, count, progress)
            .await
            .map_err(|e| match e {
                Fetch::Registry(e) => fail(e),
                Fetch::Other(e) => e,
            })?;
        layers.push(path);
    }
    Ok(Pulled {
        reference: pinned,
        digest,
        spec,
        layers,
        size,
    })
}

enum Fetch {
    Registry(OciDistributionError),
    Other(OciError),
}

async fn download(
    client: &Client,
    image: &ImageRef,
    layer: &OciDescriptor,
    path: &Path,
    index: usize,
    count: usize,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<u64, Fetch> {
    let expected = layer
        .digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Fetch::Other(invalid(image, format!("layer digest {}", layer.digest))))?
        .to_ascii_lowercase();
    let size = u64::try_from(layer.size).unwrap_or(0);
    let mut stream = client
        .pull_blob_stream(image.inner(), layer)
        .await
        .map_err(Fetch::Registry)?;
    let mut file = std::fs::File::create(path)
        .map_err(|e| Fetch::Other(io(format!("create {}", path.display()))(e)))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    progress(PullProgress {
        layer: index,
        layers: count,
        received,
        size,
    });
    while let Some(chunk) = stream.stream.next().await {
        let chunk = chunk.map_err(|e| {
            Fetch::Other(OciError::Unreachable {
                registry: image.registry().to_string(),
                why: format!("download of layer {index} broke off: {e}"),
            })
        })?;
        received += chunk.len() as u64;
        if size > 0 && received > size {
            return Err(Fetch::Other(invalid(
                image,
                format!("layer {index} is longer than its {size} bytes"),
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .map_err(|e| Fetch::Other(io(format!("write {}", path.display()))(e)))?;
        progress(PullProgress {
            layer: index,
            layers: count,
            received,
            size,
        });
    }
    if hex::encode(hasher.finalize()) != expected {
        return Err(Fetch::Other(invalid(
            image,
            format!("layer {index} does not match its digest {}", layer.digest),
        )));
    }
    Ok(received)
}

fn check_media_type(reference: &ImageRef, media_type: &str) -> Result<(), OciError> {
    const TAR: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
    if TAR.contains(&media_type) {
        Ok(())
    } else {
        Err(invalid(
            reference,
            format!("layer media type {media_type:?} is not a filesystem layer"),
        ))
    }
}

fn invalid(reference: &ImageRef, why: String) -> OciError {
    OciError::Invalid {
        reference: reference.full(),
        why,
    }
}

/// Turns the registry client's error into one with a code.
fn classify(
    e: OciDistributionError,
    reference: &ImageRef,
    platforms: &Mutex<Vec<String>>,
) -> OciError {
    let registry = reference.registry().to_string();
    let unauthorized = |why: String| OciError::Unauthorized {
        registry: registry.clone(),
        reference: reference.full(),
        why,
    };
    let not_found = || OciError::NotFound {
        registry: registry.clone(),
        reference: reference.full(),
    };
    match e {
        OciDistributionError::AuthenticationFailure(why) => unauthorized(why),
        OciDistributionError::UnauthorizedError { .. } => unauthorized("401 Unauthorized".into()),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized(envelope.to_string())
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else {
                invalid(reference, envelope.to_string())
            }
        }
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => unauthorized(message),
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::ImageManifestNotFoundError(why) if why.contains("platform") => {
            let found = platforms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .join(", ");
            OciError::PlatformMissing {
                reference: reference.full(),
                found: (!found.is_empty()).then_some(found),
            }
        }
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::RequestError(e) => {
            if e.status()
                .is_some_and(|s| s.as_u16() == 401 || s.as_u16() == 403)
            {
                unauthorized(e.to_string())
            } else if e.status().is_some_and(|s| s.as_u16() == 404) {
                not_found()
            } else {
                OciError::Unreachable {
                    registry,
                    why: error_chain(&e),
                }
            }
        }
        other => invalid(reference, other.to_string()),
    }
}

/// An error and its sources on one line (reqwest's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
