//! Images from OCI and Docker registries: pull, list, remove.

use napi_derive::napi;

use crate::task::{blocking, Blocking};
use napi::bindgen_prelude::AsyncTask;

/// A pulled image.
#[napi(object)]
pub struct ImageInfoJs {
    /// References that were pulled to it.
    pub references: Vec<String>,
    /// Manifest digest (`sha256:...`).
    pub digest: String,
    /// First 12 hex digits of the digest.
    pub id: String,
    /// Bytes of its layers as pulled (compressed).
    pub size: f64,
    /// When it was first pulled (seconds since the epoch).
    pub created: f64,
    /// Entrypoint followed by Cmd.
    pub command: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

impl From<ferry::CachedImage> for ImageInfoJs {
    fn from(i: ferry::CachedImage) -> Self {
        Self {
            id: i.id().to_string(),
            references: i.references,
            digest: i.digest,
            size: i.size as f64,
            created: i.created as f64,
            command: i.spec.command,
            env: i.spec.env,
            workdir: i.spec.workdir,
            user: i.spec.user,
        }
    }
}

/// Pulls `reference` into ferry's image cache.
#[napi]
pub fn pull_image(
    reference: String,
    insecure_registries: Option<Vec<String>>,
) -> AsyncTask<Blocking<ImageInfoJs>> {
    blocking(move || {
        let options = ferry::PullOptions {
            insecure_registries: insecure_registries.unwrap_or_default(),
        };
        let image = crate::runtime::runtime()?.pull_image(&reference, &options, &mut |_| {})?;
        Ok(image.into())
    })
}

/// Every pulled image, oldest first.
#[napi]
pub fn images() -> AsyncTask<Blocking<Vec<ImageInfoJs>>> {
    blocking(|| {
        Ok(crate::runtime::runtime()?
            .images()
            .into_iter()
            .map(Into::into)
            .collect())
    })
}

/// Removes a pulled image, by reference, digest or id.
#[napi]
pub fn remove_image(name: String) -> AsyncTask<Blocking<ImageInfoJs>> {
    blocking(move || Ok(crate::runtime::runtime()?.remove_image(&name)?.into()))
}
