//! Removing chunks no pushed VM refers to.

use std::collections::HashSet;

use serde::Serialize;

use crate::manifest::StoreManifest;
use crate::{Remote, StoreError};

/// What a collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreGcReport {
    /// Pushed VMs (manifests) in the store.
    pub manifests: u64,
    /// Chunks in the store before.
    pub chunks: u64,
    /// Chunks removed: no manifest refers to them and they are older than the safety age.
    pub removed: u64,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Chunks no manifest refers to yet, younger than the safety age: a push
    /// in progress may be about to name them.
    pub kept_young: u64,
}

/// Removes every chunk no manifest refers to that was written more than
/// `min_age_secs` ago (`now` in Unix seconds). A manifest that cannot be
/// read stops the collection: its chunks might be taken for garbage.
pub fn collect(remote: &Remote, min_age_secs: u64, now: i64) -> Result<StoreGcReport, StoreError> {
    let manifests = remote.list("manifests/")?;
    let mut referenced = HashSet::new();
    for m in &manifests {
        let Some(digest) = m.name.strip_prefix("manifests/") else {
            continue;
        };
        if !crate::location::is_digest(digest) {
            continue;
        }
        let bytes = remote.get(&m.name)?;
        let manifest = StoreManifest::decode(&bytes, digest)?;
        referenced.extend(manifest.chunks().map(|c| c.sha256.clone()));
    }
    let chunks = remote.list("chunks/")?;
    let mut report = StoreGcReport {
        manifests: manifests.len() as u64,
        chunks: chunks.len() as u64,
        ..StoreGcReport::default()
    };
    let cutoff = now.saturating_sub(i64::try_from(min_age_secs).unwrap_or(i64::MAX));
    let mut doomed = Vec::new();
    for c in chunks {
        let sha = c.name.strip_prefix("chunks/").unwrap_or(&c.name);
        if referenced.contains(sha) {
            continue;
        }
        if c.modified > cutoff {
            report.kept_young += 1;
            continue;
        }
        report.removed += 1;
        report.removed_bytes += c.size;
        doomed.push(c.name);
    }
    remote.delete_all(&doomed)?;
    Ok(report)
}
