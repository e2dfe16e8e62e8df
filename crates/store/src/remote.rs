//! The S3 bucket behind a store: a blocking face over `object_store`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

use crate::credentials::Access;
use crate::{StoreError, StoreUrl};

/// Requests in flight at once for batches (uploads, existence checks, fetches).
pub const PARALLEL: usize = 16;

/// One object listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key, relative to the store's prefix.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Seconds since the Unix epoch of its last write.
    pub modified: i64,
}

/// A bucket (and prefix) to read and write, with the runtime its requests run on.
pub struct Remote {
    url: StoreUrl,
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

fn map_err(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { path, .. } => {
            StoreError::NotFound(format!("{path} is not in the store"))
        }
        e @ (object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }) => StoreError::Denied(e.to_string()),
        // A refused connection, a timeout, a 5xx after the retries: the
        // same call may work once the server is back.
        other => StoreError::Unreachable(other.to_string()),
    }
}

impl Remote {
    /// Opens the store at `url` with access from the environment and the AWS files.
    pub fn open(url: &StoreUrl) -> Result<Remote, StoreError> {
        Self::with_access(url, &crate::credentials::from_env()?)
    }

    /// Opens the store at `url` with `access`.
    pub fn with_access(url: &StoreUrl, access: &Access) -> Result<Remote, StoreError> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&url.bucket)
            .with_region(&access.region)
            .with_access_key_id(&access.key_id)
            .with_secret_access_key(&access.secret)
            // A server that is down fails the call within seconds, not the
            // library's default of minutes of retries.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(token) = &access.token {
            b = b.with_token(token);
        }
        if let Some(endpoint) = &access.endpoint {
            // Self-hosted servers are addressed by path, not by bucket host name.
            b = b
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = b
            .build()
            .map_err(|e| StoreError::Credentials(format!("cannot configure the S3 client: {e}")))?;
        Self::with_object_store(url, Arc::new(store))
    }

    /// A store served by `store` (any `object_store` backend, e.g. one in
    /// memory for tests) at `url`'s prefix.
    pub fn with_object_store(
        url: &StoreUrl,
        store: Arc<dyn ObjectStore>,
    ) -> Result<Remote, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(StoreError::io("start the S3 client's runtime"))?;
        Ok(Remote {
            url: url.clone(),
            store,
            rt,
        })
    }

    /// The store's address.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn path(&self, name: &str) -> ObjectPath {
        ObjectPath::from(self.url.key(name))
    }

    /// The bytes of object `name`.
    pub fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(name);
        self.rt.block_on(async {
            let r = self.store.get(&path).await.map_err(map_err)?;
            Ok(r.bytes().await.map_err(map_err)?.to_vec())
        })
    }

    /// Writes object `name`.
    pub fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let path = self.path(name);
        self.rt.block_on(async {
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map(drop)
                .map_err(map_err)
        })
    }

    /// Which of `names` exist, in order.
    pub fn exist(&self, names: &[String]) -> Result<Vec<bool>, StoreError> {
        self.rt.block_on(async {
            futures_util::stream::iter(names.iter().map(|n| {
                let path = self.path(n);
                async move {
                    match self.store.head(&path).await {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::NotFound { .. }) => Ok(false),
                        Err(e) => Err(map_err(e)),
                    }
                }
            }))
            .buffered(PARALLEL)
            .try_collect()
            .await
        })
    }

    /// Writes every (name, bytes), [`PARALLEL`] at a time.
    pub fn put_all(&self, objects: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        self.rt.block_on(async {
            futures_util::stream::iter(objects.into_iter().map(|(n, bytes)| {
                let path = self.path(&n);
                async move {
                    self.store
                        .put(&path, PutPayload::from(bytes))
                        .await
                        .map(drop)
                        .map_err(map_err)
                }
            }))
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
        })
    }

    /// Fetches every name, [`PARALLEL`] at a time, in order.
    pub fn get_all(&self, names: &[String]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.rt.block_on(async {
            futures_util::stream::iter(names.iter().map(|n| {
                let path = self.path(n);
                async move {
                    let r = self.store.get(&path).await.map_err(map_err)?;
                    Ok::<_, StoreError>(r.bytes().await.map_err(map_err)?.to_vec())
                }
            }))
            .buffered(PARALLEL)
            .try_collect()
            .await
        })
    }

    /// Every object under `dir` (relative to the prefix).
    pub fn list(&self, dir: &str) -> Result<Vec<Listed>, StoreError> {
        let base = self.url.key("");
        let path = self.path(dir);
        self.rt.block_on(async {
            let metas: Vec<object_store::ObjectMeta> = self
                .store
                .list(Some(&path))
                .try_collect()
                .await
                .map_err(map_err)?;
            Ok(metas
                .into_iter()
                .map(|m| Listed {
                    name: m
                        .location
                        .as_ref()
                        .strip_prefix(base.as_str())
                        .unwrap_or(m.location.as_ref())
                        .to_string(),
                    size: m.size,
                    modified: m.last_modified.timestamp(),
                })
                .collect())
        })
    }

    /// Deletes every name, [`PARALLEL`] at a time.
    pub fn delete_all(&self, names: &[String]) -> Result<(), StoreError> {
        self.rt.block_on(async {
            futures_util::stream::iter(names.iter().map(|n| {
                let path = self.path(n);
                async move {
                    match self.store.delete(&path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(map_err(e)),
                    }
                }
            }))
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
        })
    }
}
