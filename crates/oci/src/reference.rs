//! Image references (`[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`) and which
//! registries are spoken to over plain HTTP.

use crate::error::OciError;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: oci_client::Reference,
    given: String,
}

impl ImageRef {
    /// Parses `text` with the usual defaults (registry and `latest` tag).
    pub fn parse(text: &str) -> Result<Self, OciError> {
        let bad = |why: String| OciError::BadReference {
            reference: text.to_string(),
            why,
        };
        if text.is_empty() || text.len() > 512 || text.chars().any(char::is_whitespace) {
            return Err(bad("empty, too long or containing spaces".into()));
        }
        let inner: oci_client::Reference = text.parse().map_err(|e| bad(format!("{e}")))?;
        Ok(Self {
            inner,
            given: text.to_string(),
        })
    }

    /// Whether `text` looks like an image reference rather than a file path:
    /// callers check for an existing file first.
    pub fn looks_like_reference(text: &str) -> bool {
        !text.starts_with('/')
            && !text.starts_with('.')
            && !text.ends_with(".tar")
            && !text.ends_with(".tar.gz")
            && !text.ends_with(".tar.zst")
            && !text.ends_with(".ext4")
            && Self::parse(text).is_ok()
    }

    /// The full reference, registry and tag or digest included.
    pub fn full(&self) -> String {
        self.inner.whole()
    }

    /// What the user typed.
    pub fn given(&self) -> &str {
        &self.given
    }

    /// Registry host (and port) as written in the reference.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The digest, when the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// The reference with its tag replaced by `digest`.
    pub fn with_digest(&self, digest: &str) -> Self {
        Self {
            inner: self.inner.clone_with_digest(digest.to_string()),
            given: self.given.clone(),
        }
    }

    pub(crate) fn inner(&self) -> &oci_client::Reference {
        &self.inner
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full())
    }
}

/// Whether `registry` (`host[:port]`) is spoken to over plain HTTP: loopback
/// registries always (as Docker does), others only when listed in `insecure`.
pub fn plain_http(registry: &str, insecure: &[String]) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.split(':').next().unwrap_or(registry),
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
        || insecure
            .iter()
            .any(|i| i == registry || (!i.contains(':') && i == host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_defaults_and_keep_ports() {
        let r = ImageRef::parse("localhost:5000/app:1").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.full(), "localhost:5000/app:1");
        let d = format!("127.0.0.1:5000/app@sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&d).unwrap();
        assert_eq!(
            r.digest(),
            Some(format!("sha256:{}", "a".repeat(64)).as_str())
        );
        assert!(ImageRef::parse("busybox")
            .unwrap()
            .full()
            .ends_with("busybox:latest"));
        for bad in ["", "a b", "x:y:z:w", "bad@digest"] {
            assert_eq!(
                ImageRef::parse(bad).unwrap_err().code(),
                "IMAGE_REFERENCE_INVALID",
                "{bad}"
            );
        }
        assert!(!ImageRef::looks_like_reference("./rootfs.tar"));
        assert!(!ImageRef::looks_like_reference("/tmp/x"));
        assert!(ImageRef::looks_like_reference("127.0.0.1:5000/static:1"));
    }

    #[test]
    fn loopback_and_listed_registries_are_plain_http() {
        assert!(plain_http("localhost:5000", &[]));
        assert!(plain_http("127.0.0.1:5001", &[]));
        assert!(plain_http("[::1]:5000", &[]));
        assert!(!plain_http("registry.example:5000", &[]));
        assert!(plain_http(
            "registry.example:5000",
            &["registry.example:5000".into()]
        ));
        assert!(plain_http("registry.example", &["registry.example".into()]));
        assert!(!plain_http(
            "other.example:5000",
            &["registry.example:5000".into()]
        ));
    }
}
