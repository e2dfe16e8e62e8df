//! VMs in an S3 bucket (see [`ferry_store`]): push a VM or a bundle, fetch one
//! back as a bundle, restore one on this host with its memory fetched lazily.

pub mod disk;
pub mod memory;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use ferry_store::{PullReport, PushReport, StoreError, StoreGcReport, StoreUrl};

use crate::config::Config;
use crate::error::Coded;
use crate::fsutil;
use crate::machine::{Machine, SnapshotOptions};
use crate::snapshot::restore::{self, RestoreError, RestoreSpec};
use crate::vm::record;

impl Coded for StoreError {
    fn code(&self) -> &str {
        StoreError::code(self)
    }
    fn hint(&self) -> Option<String> {
        StoreError::hint(self)
    }
}

/// Errors of pushing a running VM: its snapshot, or the store.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The snapshot the push is made from failed.
    #[error(transparent)]
    Snapshot(#[from] crate::vm::VmError),
    /// Talking to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Coded for PushError {
    fn code(&self) -> &str {
        match self {
            PushError::Snapshot(e) => e.code(),
            PushError::Store(e) => Coded::code(e),
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            PushError::Snapshot(e) => e.hint(),
            PushError::Store(e) => Coded::hint(e),
        }
    }
}

/// A file under the data directory's `incoming/` named for this process,
/// removed when dropped unless kept.
struct Scratch(PathBuf);

impl Scratch {
    fn new(config: &Config, what: &str) -> Result<Scratch, StoreError> {
        let dir = config.dirs.incoming();
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Io {
            context: format!("create {}", dir.display()),
            source: e,
        })?;
        let tag = fsutil::random_hex(6).map_err(|e| StoreError::Io {
            context: "name a temporary bundle".into(),
            source: e,
        })?;
        Ok(Scratch(
            dir.join(format!("{}-{what}-{tag}.snap", record::now())),
        ))
    }

    fn keep(self) -> PathBuf {
        let p = self.0.clone();
        std::mem::forget(self);
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Pushes the bundle file at `bundle` to the store at `url`.
pub fn push_bundle(
    url: &StoreUrl,
    bundle: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PushReport, StoreError> {
    let remote = ferry_store::Remote::open(url)?;
    ferry_store::push_bundle(&remote, bundle, progress)
}

/// Snapshots `machine` (it keeps running unless `stop`) into a temporary
/// bundle and pushes that; the temporary bundle is gone afterwards.
pub fn push_machine(
    config: &Config,
    machine: &Machine,
    url: &StoreUrl,
    stop: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<PushReport, PushError> {
    // The store is checked first: a wrong address or missing key fails
    // before the VM is paused, let alone stopped.
    let remote = ferry_store::Remote::open(url)?;
    let scratch = Scratch::new(config, "push")?;
    progress(&format!("snapshotting {}", machine.name()));
    machine.snapshot_to_path(
        &scratch.0,
        &SnapshotOptions {
            leave_running: !stop,
            ..SnapshotOptions::default()
        },
    )?;
    Ok(ferry_store::push_bundle(&remote, &scratch.0, progress)?)
}

/// Fetches the VM `url` names into the bundle file `dest`.
pub fn pull_bundle(
    url: &StoreUrl,
    dest: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PullReport, StoreError> {
    let digest = url.require_digest()?;
    let remote = ferry_store::Remote::open(url)?;
    ferry_store::pull_bundle(&remote, digest, dest, progress)
}

/// The host's chunk cache: `store/` under the cache directory, limited to
/// `FERRY_CHUNK_CACHE_MIB` MiB (default 4 GiB).
pub fn chunk_cache(config: &Config) -> Result<ferry_store::ChunkCache, StoreError> {
    let limit = match std::env::var("FERRY_CHUNK_CACHE_MIB") {
        Err(_) => ferry_store::cache::DEFAULT_LIMIT,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(mib) if mib <= u64::MAX >> 20 => mib << 20,
            _ => {
                tracing::warn!(
                    "FERRY_CHUNK_CACHE_MIB={v:?} is not a size in MiB; using {} MiB",
                    ferry_store::cache::DEFAULT_LIMIT >> 20
                );
                ferry_store::cache::DEFAULT_LIMIT
            }
        },
    };
    ferry_store::ChunkCache::open(&config.dirs.cache.join("store"), limit)
}

/// Restores the VM `url` names. Fetched first, in parallel: the manifest,
/// then the VM's state and the memory chunks of its prefetch list (into the
/// host's chunk cache); the VMM fetches the rest of guest memory on first
/// touch, and the VM's own disk writes on first access, each also in the
/// background, and the disk image the same way when this host lacks it
/// (one pushed as a single stream by an older ferry, before the start). Names, ports and
/// KVM are checked before anything is fetched; a failed fetch leaves nothing
/// behind. `FERRY_STORE_PREFETCH=off` skips the prefetch list (to measure
/// what it saves); `FERRY_STORE_BACKGROUND=off` fetches nothing in the
/// background (what the guest never reaches arrives before a snapshot,
/// fork or migration).
pub fn restore(
    config: &Arc<Config>,
    url: &StoreUrl,
    spec: &RestoreSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<Machine, RestoreError> {
    restore::precheck(config, spec)?;
    let store = |e: StoreError| RestoreError::Store(Box::new(e));
    let digest = url.require_digest().map_err(store)?;
    let remote = ferry_store::Remote::open(url).map_err(store)?;
    let cache = chunk_cache(config).map_err(store)?;
    let (m, manifest_bytes) =
        ferry_store::pull::fetch_manifest_bytes(&remote, digest).map_err(store)?;
    cache.put_manifest(digest, &manifest_bytes).map_err(store)?;
    let mut fetched = manifest_bytes.len() as u64;
    let prefetch = std::env::var("FERRY_STORE_PREFETCH").map_or(true, |v| v != "off");
    let background = std::env::var("FERRY_STORE_BACKGROUND").map_or(true, |v| v != "off");
    if prefetch {
        let hot: Vec<_> = memory::prefetch_chunks(&m)
            .into_iter()
            .map(|i| m.memory[i].clone())
            .collect();
        progress(&format!("fetching {} prefetch chunks", hot.len()));
        fetched += cache.fetch(&remote, &hot).map_err(store)?.1;
    }
    // The disk image only when this host lacks it: images are shared by
    // content. One framed by window comes like the VM's own writes, after
    // the start; one written as a single stream, before.
    let found = match &m.disk_base {
        Some(_) => crate::snapshot::disk::find_base(&config.dirs.cache, &m.bundle.disk)?,
        None => None,
    };
    let whole_layers = m.bundle.disk.cluster_size == ferry_disk::CLUSTER_SIZE;
    let lazy_image = whole_layers
        && found.is_none()
        && m.disk_base.as_ref().is_some_and(|b| b.windows.is_some());
    let with_base = m.disk_base.is_some() && found.is_none() && !lazy_image;
    // The VM's own disk writes arrive as the guest reaches them, when the
    // layer they go into has their cluster size (it always has, for bundles
    // this version wrote).
    let lazy_disk = whole_layers && (!m.disk_top.is_empty() || lazy_image);
    let scratch = Scratch::new(config, "pulled").map_err(store)?;
    fetched += ferry_store::pull::write_bundle(
        &remote,
        Some(&cache),
        &m,
        ferry_store::pull::Contents::NoMemory {
            with_base,
            with_top: !lazy_disk,
        },
        &scratch.0,
        progress,
    )
    .map_err(store)?
    .fetched_bytes;
    // Held until the restore is over: `ferry gc` leaves a locked bundle alone.
    let held = std::fs::File::open(&scratch.0)
        .and_then(|f| fsutil::lock_shared(&f).map(|()| f))
        .map_err(|e| {
            store(StoreError::Io {
                context: "open the fetched bundle".into(),
                source: e,
            })
        })?;
    let spec = RestoreSpec {
        bundle: scratch.keep(),
        owned: true,
        ..spec.clone()
    };
    let lazy = memory::StoreMemory {
        url: url.to_string(),
        cache: cache.dir().to_path_buf(),
        cache_limit: cache.limit(),
        prefetch,
        fetched_before_start: fetched,
        lazy_disk,
        background,
        lazy_image: lazy_image
            .then(|| crate::snapshot::disk::base_path(&config.dirs.cache, &m.bundle.disk.base_id)),
    };
    let shown = url.to_string();
    let result = restore::restore_with(
        config,
        &spec,
        |rec| rec.image = format!("restored from {shown}"),
        Some(&lazy),
    );
    drop(held);
    if result.is_err() {
        // Fetched again in seconds; a kept copy would only take space.
        let _ = std::fs::remove_file(&spec.bundle);
    }
    result.map_err(|e| match e {
        RestoreError::Received { inner, .. } => *inner,
        other => other,
    })
}

/// How long a running VM's fetch keeps retrying an unreachable store before
/// it gives up: the guest waits that long on the page or disk block.
const FETCH_PATIENCE: Duration = Duration::from_secs(120);

/// Chunks for a running VM (its memory, its disk), through the host's chunk
/// cache: counts the stored bytes it fetched and keeps why its last fetch
/// failed, for the error the user then sees.
#[derive(Debug)]
struct Fetcher {
    remote: ferry_store::Remote,
    cache: ferry_store::ChunkCache,
    fetched_bytes: std::sync::atomic::AtomicU64,
    last_error: std::sync::Mutex<Option<StoreError>>,
}

impl Fetcher {
    fn new(remote: ferry_store::Remote, cache: ferry_store::ChunkCache) -> Fetcher {
        Fetcher {
            remote,
            cache,
            fetched_bytes: Default::default(),
            last_error: Default::default(),
        }
    }

    /// Chunks `refs`, decoded and checked, from the cache or the store,
    /// retrying an unreachable store for a while: a running VM waits
    /// rather than fails when the network blinks.
    fn fetch(
        &self,
        refs: &[ferry_store::manifest::ChunkRef],
        what: &str,
    ) -> std::io::Result<Vec<Vec<u8>>> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(200);
        loop {
            match self.cache.fetch(&self.remote, refs) {
                Ok((bytes, fetched)) => {
                    self.fetched_bytes
                        .fetch_add(fetched, std::sync::atomic::Ordering::Relaxed);
                    return Ok(bytes);
                }
                Err(e) if e.is_retryable() && started.elapsed() < FETCH_PATIENCE => {
                    let first = refs.first().map_or("", |c| c.sha256.as_str());
                    tracing::warn!("{what} {first}: {e}; trying again");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
    }

    /// Keeps `e` as the last failure and turns it into the I/O error the
    /// VMM's device or fault handler reports.
    fn failed(&self, e: StoreError) -> std::io::Error {
        let failure = std::io::Error::other(e.to_string());
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
        failure
    }

    /// Stored bytes fetched from the store so far.
    fn fetched_bytes(&self) -> u64 {
        self.fetched_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The code and hint of the last failure (`STORE_IO` if none was kept).
    fn last_error(&self) -> (String, Option<String>) {
        match &*self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            Some(e) => (e.code().to_string(), e.hint()),
            None => ("STORE_IO".to_string(), None),
        }
    }
}

/// Removes the chunks of the store at `url` that no pushed VM refers to and
/// that were written more than `min_age_secs` ago (a push still uploading
/// has not named its chunks yet).
pub fn gc(url: &StoreUrl, min_age_secs: u64) -> Result<StoreGcReport, StoreError> {
    let remote = ferry_store::Remote::open(url)?;
    ferry_store::gc::collect(&remote, min_age_secs, record::now() as i64)
}
