//! `s3://BUCKET/PREFIX[/DIGEST]` addresses.

use crate::StoreError;

/// Where a store lives, and optionally one pushed VM in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// The pushed VM: a manifest digest (64 lowercase hex digits).
    pub digest: Option<String>,
}

/// Whether `s` is a SHA-256 in lowercase hex.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl StoreUrl {
    /// Whether `s` is meant as a store address (starts with `s3://`).
    pub fn is_store(s: &str) -> bool {
        s.starts_with("s3://")
    }

    /// Parses `s3://BUCKET[/PREFIX][/DIGEST]`; a last component that is a
    /// digest names a pushed VM.
    pub fn parse(s: &str) -> Result<StoreUrl, StoreError> {
        let bad = |why: &str| StoreError::BadUrl(format!("{s:?} is not a store address: {why}"));
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it must start with s3://"))?;
        let mut parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Err(bad("no bucket"));
        }
        let bucket = parts.remove(0);
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(bad(
                "a bucket name is 3-63 lowercase letters, digits, '-' or '.'",
            ));
        }
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(bad("'.' and '..' are not prefix components"));
        }
        let digest = match parts.last() {
            Some(last) if is_digest(last) => parts.pop().map(str::to_string),
            _ => None,
        };
        Ok(StoreUrl {
            bucket: bucket.to_string(),
            prefix: parts.join("/"),
            digest,
        })
    }

    /// Parses the address of a pushed VM: [`Self::parse`], with a digest.
    pub fn parse_pushed(s: &str) -> Result<StoreUrl, StoreError> {
        let url = Self::parse(s)?;
        url.require_digest()?;
        Ok(url)
    }

    /// The object key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// This store with `digest` as the pushed VM.
    pub fn with_digest(&self, digest: &str) -> StoreUrl {
        StoreUrl {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// The pushed VM this address names, or an error saying one is needed.
    pub fn require_digest(&self) -> Result<&str, StoreError> {
        self.digest.as_deref().ok_or_else(|| {
            StoreError::BadUrl(format!(
                "{self} names a store, not a pushed VM: add the digest `ferry push` printed"
            ))
        })
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        if let Some(d) = &self.digest {
            write!(f, "/{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn addresses_parse_with_and_without_a_digest() {
        let u = StoreUrl::parse("s3://vms/fleet/a").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.prefix.as_str(), u.digest.as_deref()),
            ("vms", "fleet/a", None)
        );
        assert_eq!(u.key("chunks/x"), "fleet/a/chunks/x");
        let u = StoreUrl::parse(&format!("s3://vms/{D}")).unwrap();
        assert_eq!((u.prefix.as_str(), u.digest.as_deref()), ("", Some(D)));
        assert_eq!(u.key("manifests/y"), "manifests/y");
        assert_eq!(u.to_string(), format!("s3://vms/{D}"));
        let u = StoreUrl::parse(&format!("s3://vms/p/{D}/")).unwrap();
        assert_eq!(u.to_string(), format!("s3://vms/p/{D}"));
        assert!(u.require_digest().is_ok());
        assert!(StoreUrl::parse("s3://vms/p")
            .unwrap()
            .require_digest()
            .is_err());
    }

    #[test]
    fn bad_addresses_are_refused_with_a_reason() {
        for s in [
            "vms/p",
            "s3://",
            "s3://A",
            "s3://ab",
            "s3://vms/../x",
            "s3://b_d/x",
        ] {
            let e = StoreUrl::parse(s).unwrap_err();
            assert_eq!(e.code(), "STORE_URL_INVALID", "{s}");
        }
    }
}
