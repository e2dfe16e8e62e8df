//! Fleet storage: snapshot bundles kept in an S3 bucket as content-addressed
//! chunks, so a VM can be pushed from one host and restored on any other, and
//! pushing it again uploads only what changed.
//!
//! # Layout under `s3://BUCKET/PREFIX`
//!
//! ```text
//! PREFIX/chunks/SHA256     one chunk: zstd of its bytes, named by the SHA-256
//!                          of those (decoded) bytes
//! PREFIX/manifests/DIGEST  one pushed VM: JSON (see [`manifest::StoreManifest`]),
//!                          named by the SHA-256 of its own bytes
//! ```
//!
//! Guest memory is cut at fixed 2 MiB guest addresses (huge-page aligned), so a
//! page the guest changes changes one chunk; all-zero chunks are not stored.
//! The VM's own disk writes are cut at 2 MiB disk offsets, the disk image below
//! them (shared by every VM made from it) into 2 MiB pieces of its encoded
//! stream, and the machine state and record are a chunk each. Everything
//! fetched is checked against its name before use.

pub mod cache;
pub mod chunk;
pub mod credentials;
pub mod gc;
pub mod location;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod remote;

pub use cache::ChunkCache;
pub use gc::StoreGcReport;
pub use location::StoreUrl;
pub use manifest::StoreManifest;
pub use pull::{pull_bundle, PullReport};
pub use push::{push_bundle, PushReport};
pub use remote::Remote;

/// What went wrong talking to a store. Each has a stable code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not an `s3://BUCKET/PREFIX[/DIGEST]` address.
    #[error("{0}")]
    BadUrl(String),
    /// No credentials or endpoint could be found.
    #[error("{0}")]
    Credentials(String),
    /// The server could not be reached or failed; trying again may work.
    #[error("the store is unreachable: {0}")]
    Unreachable(String),
    /// The server refused the credentials or the access.
    #[error("the store refused access: {0}")]
    Denied(String),
    /// No such pushed VM or chunk.
    #[error("{0}")]
    NotFound(String),
    /// Something fetched does not match its name: damaged or forged.
    #[error("the store holds a corrupt object: {0}")]
    Corrupt(String),
    /// The bundle cannot be stored as it is.
    #[error("{0}")]
    Unsupported(String),
    /// Reading or writing a local bundle.
    #[error(transparent)]
    Bundle(#[from] ferry_snapshot::BundleError),
    /// Local I/O.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Stable code for users and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::BadUrl(_) => "STORE_URL_INVALID",
            StoreError::Credentials(_) => "STORE_CREDENTIALS",
            StoreError::Unreachable(_) => "STORE_UNREACHABLE",
            StoreError::Denied(_) => "STORE_DENIED",
            StoreError::NotFound(_) => "STORE_NOT_FOUND",
            StoreError::Corrupt(_) => "BUNDLE_CORRUPT",
            StoreError::Unsupported(_) => "STORE_UNSUPPORTED",
            StoreError::Bundle(e) => e.code(),
            StoreError::Io { .. } => "STORE_IO",
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            StoreError::BadUrl(_) => Some("write it as s3://BUCKET/PREFIX (push) or s3://BUCKET/PREFIX/DIGEST (restore, pull-bundle)".into()),
            StoreError::Credentials(_) => Some(
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a self-hosted server), or a profile in ~/.aws/credentials".into(),
            ),
            StoreError::Unreachable(_) => Some("check the endpoint and the network, then run the same command again: nothing was left half done".into()),
            StoreError::Denied(_) => Some("check the key and that it may read and write the bucket".into()),
            StoreError::Corrupt(_) => Some("push the VM again from a host that has it; `ferry gc --store` removes what no push refers to".into()),
            _ => None,
        }
    }

    /// Whether the same call may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unreachable(_))
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}
