//! Errors of pulling and unpacking images, each with a stable code.

/// What went wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error("{reference:?} is not an image reference: {why}")]
    BadReference {
        /// What the user gave.
        reference: String,
        /// Why it does not parse.
        why: String,
    },
    /// The registry refused the credentials, or asked for some.
    #[error("{registry} refused access to {reference}: {why}")]
    Unauthorized {
        /// Registry host.
        registry: String,
        /// The image.
        reference: String,
        /// The registry's words.
        why: String,
    },
    /// No such repository, tag or digest.
    #[error("{reference} was not found on {registry}")]
    NotFound {
        /// Registry host.
        registry: String,
        /// The image.
        reference: String,
    },
    /// The image has no linux/amd64 variant.
    #[error("{reference} has no linux/amd64 image{}", found.as_ref().map(|f| format!(" (it has {f})")).unwrap_or_default())]
    PlatformMissing {
        /// The image.
        reference: String,
        /// The platforms it has, if known.
        found: Option<String>,
    },
    /// The registry could not be reached.
    #[error("cannot reach registry {registry}: {why}")]
    Unreachable {
        /// Registry host.
        registry: String,
        /// The connection error.
        why: String,
    },
    /// The registry answered with something that is not a valid image.
    #[error("{reference}: the registry sent an invalid image: {why}")]
    Invalid {
        /// The image.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// A layer could not be applied.
    #[error("layer {layer}: {why}")]
    Layer {
        /// Index of the layer, from 0.
        layer: usize,
        /// What is wrong.
        why: String,
    },
    /// Local filesystem trouble.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    /// Stable code for scripts and SDKs.
    pub fn code(&self) -> &'static str {
        match self {
            OciError::BadReference { .. } => "IMAGE_REFERENCE_INVALID",
            OciError::Unauthorized { .. } => "IMAGE_PULL_UNAUTHORIZED",
            OciError::NotFound { .. } => "IMAGE_NOT_FOUND",
            OciError::PlatformMissing { .. } => "IMAGE_PLATFORM_MISSING",
            OciError::Unreachable { .. } => "REGISTRY_UNREACHABLE",
            OciError::Invalid { .. } => "IMAGE_INVALID",
            OciError::Layer { .. } => "IMAGE_LAYER_INVALID",
            OciError::Io { .. } => "IMAGE_IO",
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            OciError::BadReference { .. } => Some(
                "write [REGISTRY/]REPOSITORY[:TAG|@sha256:DIGEST], e.g. localhost:5000/app:1".into(),
            ),
            OciError::Unauthorized { registry, .. } => Some(format!(
                "add credentials for {registry} to ~/.docker/config.json (`docker login` or an \"auths\" entry with base64 user:password)"
            )),
            OciError::NotFound { .. } => {
                Some("check the repository name and the tag or digest".into())
            }
            OciError::PlatformMissing { .. } => {
                Some("ferry runs linux/amd64 images; pick a tag built for it".into())
            }
            OciError::Unreachable { registry, .. } => Some(format!(
                "check that {registry} is up and reachable; a registry without TLS needs --insecure-registry {registry}"
            )),
            _ => None,
        }
    }
}

/// Maps an I/O error with its context.
pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let context = context.into();
    move |source| OciError::Io { context, source }
}
