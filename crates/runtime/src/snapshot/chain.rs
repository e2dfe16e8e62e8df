//! Chains of incremental bundles: a bundle made with `--since PARENT` holds
//! only what changed since PARENT and names it by the SHA-256 of its file.
//! A restore finds every ancestor (beside the bundle, or among paths the
//! user gives), checks each digest, and puts guest memory and the disk
//! together from the oldest to the newest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferry_disk::CLUSTER_SIZE;
use ferry_snapshot::{Bundle, BundleError, SectionKind};
use sha2::{Digest, Sha256};

/// Longest chain a restore follows.
pub const MAX_CHAIN: usize = 64;

/// SHA-256 of a whole file, lowercase hex: a bundle's digest.
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    crate::fsutil::sha256_file(path)
}

/// An ancestor that is not where it was looked for.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// No file with the parent's digest was found.
    #[error(
        "the parent bundle {file_name} (sha256 {}...) of {child} was not found{}",
        &digest[..16.min(digest.len())],
        looked(looked_at)
    )]
    ParentMissing {
        /// The bundle naming it.
        child: String,
        /// The parent's recorded file name.
        file_name: String,
        /// Its digest.
        digest: String,
        /// Paths tried, with why each did not match.
        looked_at: Vec<String>,
    },
    /// The chain is longer than [`MAX_CHAIN`] or loops.
    #[error("the chain of parent bundles is longer than {MAX_CHAIN} or loops")]
    TooLong,
    /// A bundle in the chain is not of the same VM shape as its child.
    #[error("{0} is not a parent of the same VM (its memory or disk differs)")]
    NotSameVm(String),
    /// Reading or checking a bundle failed.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

fn looked(paths: &[String]) -> String {
    if paths.is_empty() {
        String::new()
    } else {
        format!(" (looked at {})", paths.join(", "))
    }
}

impl crate::error::Coded for ChainError {
    fn code(&self) -> &str {
        match self {
            ChainError::ParentMissing { .. } | ChainError::TooLong => "SNAPSHOT_PARENT_MISSING",
            ChainError::NotSameVm(_) => "SNAPSHOT_PARENT_MISMATCH",
            ChainError::Bundle(e) => e.code(),
        }
    }
}

/// The bundles `leaf` stands on, oldest first (empty for a full bundle):
/// each parent is looked for beside its child, then among `extra`, and
/// taken only if its file's SHA-256 is the recorded digest.
pub fn ancestors(
    leaf_path: &Path,
    leaf: &Bundle,
    extra: &[PathBuf],
) -> Result<Vec<(PathBuf, Bundle)>, ChainError> {
    let mut chain: Vec<(PathBuf, Bundle)> = Vec::new();
    let mut digests: HashMap<PathBuf, String> = HashMap::new();
    loop {
        let (child_path, child) = match chain.last() {
            Some((p, b)) => (p.as_path(), b),
            None => (leaf_path, leaf),
        };
        let Some(parent) = child.manifest().parent.clone() else {
            break;
        };
        if chain.len() > MAX_CHAIN {
            return Err(ChainError::TooLong);
        }
        let beside = child_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&parent.file_name);
        let mut looked_at = Vec::new();
        let mut found = None;
        for candidate in std::iter::once(beside).chain(extra.iter().cloned()) {
            if !candidate.is_file() {
                looked_at.push(format!("{} (absent)", candidate.display()));
                continue;
            }
            let digest = match digests.get(&candidate) {
                Some(d) => d.clone(),
                None => {
                    let d = file_digest(&candidate)
                        .map_err(BundleError::io(format!("read {}", candidate.display())))?;
                    digests.insert(candidate.clone(), d.clone());
                    d
                }
            };
            if digest.eq_ignore_ascii_case(&parent.digest) {
                found = Some(candidate);
                break;
            }
            looked_at.push(format!("{} (other content)", candidate.display()));
        }
        let Some(path) = found else {
            return Err(ChainError::ParentMissing {
                child: child_path.display().to_string(),
                file_name: parent.file_name,
                digest: parent.digest,
                looked_at,
            });
        };
        if path == leaf_path || chain.iter().any(|(p, _)| p == &path) {
            return Err(ChainError::TooLong);
        }
        let bundle = Bundle::open(&path)?;
        let (c, p) = (child.manifest(), bundle.manifest());
        if c.memory_regions != p.memory_regions
            || c.memory_mib != p.memory_mib
            || c.disk.size != p.disk.size
            || c.disk.cluster_size != p.disk.cluster_size
            || c.disk.base_id != p.disk.base_id
        {
            return Err(ChainError::NotSameVm(path.display().to_string()));
        }
        chain.push((path, bundle));
    }
    chain.reverse();
    Ok(chain)
}

/// What an incremental snapshot compares the VM's disk with: the base its
/// parent stands on and a hash of every cluster the chain's top layers hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentDisk {
    /// Content id of the base below the VM's own layer.
    pub base_id: String,
    /// SHA-256 of each cluster above the base, by cluster index.
    pub clusters: HashMap<u64, [u8; 32]>,
}

/// The disk of a chain (oldest first), as it is after its newest bundle.
pub fn parent_disk(chain: &[&Bundle]) -> Result<ParentDisk, BundleError> {
    let mut out = ParentDisk {
        base_id: chain
            .first()
            .map(|b| b.manifest().disk.base_id.clone())
            .unwrap_or_default(),
        clusters: HashMap::new(),
    };
    for b in chain {
        b.read_disk(SectionKind::DiskTop, |at, data| {
            out.clusters
                .insert(at / CLUSTER_SIZE, Sha256::digest(data).into());
            Ok(())
        })?;
    }
    Ok(out)
}

/// SHA-256 of one cluster's bytes, as [`ParentDisk`] holds them.
pub fn cluster_hash(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// One ancestor of a bundle as `ferry inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    /// The recorded file name.
    pub file_name: String,
    /// The recorded SHA-256.
    pub digest: String,
    /// Where it was found (its digest checked), if it was.
    pub found: Option<PathBuf>,
}

/// The ancestors of the bundle at `path`, newest first: those found with
/// their paths, then the first one missing (if any) without.
pub fn describe(path: &Path, bundle: &Bundle) -> Vec<Link> {
    if let Ok(list) = ancestors(path, bundle, &[]) {
        return list
            .iter()
            .rev()
            .zip(parent_refs(bundle, &list))
            .map(|((p, _), r)| Link {
                file_name: r.file_name,
                digest: r.digest,
                found: Some(p.clone()),
            })
            .collect();
    }
    // Walk as far as the files go.
    let mut out = Vec::new();
    let mut current: Option<(PathBuf, Bundle)> = None;
    loop {
        let (child_path, parent) = match &current {
            Some((p, b)) => (p.clone(), b.manifest().parent.clone()),
            None => (path.to_path_buf(), bundle.manifest().parent.clone()),
        };
        let Some(parent) = parent else { break };
        let beside = child_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&parent.file_name);
        let ok = file_digest(&beside).is_ok_and(|d| d.eq_ignore_ascii_case(&parent.digest));
        let opened = ok.then(|| Bundle::open(&beside).ok()).flatten();
        out.push(Link {
            file_name: parent.file_name,
            digest: parent.digest,
            found: opened.as_ref().map(|_| beside.clone()),
        });
        match opened {
            Some(b) if out.len() <= MAX_CHAIN => current = Some((beside, b)),
            _ => break,
        }
    }
    out
}

/// The parent references along a resolved chain, newest first.
fn parent_refs(
    leaf: &Bundle,
    ancestors: &[(PathBuf, Bundle)],
) -> Vec<ferry_snapshot::manifest::ParentRef> {
    std::iter::once(leaf)
        .chain(ancestors.iter().rev().map(|(_, b)| b))
        .filter_map(|b| b.manifest().parent.clone())
        .collect()
}
