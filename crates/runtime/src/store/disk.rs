//! The VM's own disk writes of a VM restored from a store, fetched by its
//! VMM: each 2 MiB window before the guest first reads or writes in it, the
//! rest in the background (see [`ferry_disk::fill`]).
//!
//! What is still to fetch is kept in the VM's directory (`disk-fill.json`)
//! until every window is in place and flushed: a disk whose VMM ended half
//! way says so, and a VMM started on it goes on fetching (placing a window
//! twice is harmless: a cluster the disk holds already is never replaced).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_disk::fill::{Clusters, FillSource, FillStats};
use ferry_store::cache::{ChunkCache, Pin};
use ferry_store::chunk::{self, CHUNK};
use ferry_store::manifest::ChunkRef;
use ferry_store::{Remote, StoreError, StoreUrl};
use serde::{Deserialize, Serialize};

use super::memory::StoreMemory;
use crate::vm::record;

/// In the VM's directory while windows are still to fetch.
pub const FILL_FILE: &str = "disk-fill.json";
/// In the VM's directory: what the fill did ([`DiskReport`]).
pub const REPORT_FILE: &str = "disk-stats.json";
/// How long after the VM starts the background fetch begins: the guest's
/// first seconds have the network to themselves.
pub const BACKGROUND_DELAY: Duration = Duration::from_secs(2);

/// What is still to fetch: `disk-fill.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFill {
    /// `s3://BUCKET/PREFIX/DIGEST`.
    pub url: String,
    /// The host's chunk cache.
    pub cache: PathBuf,
    /// Its size limit in bytes.
    pub cache_limit: u64,
    /// The disk's size.
    pub disk_size: u64,
    /// Its cluster size.
    pub cluster_size: u64,
    /// The windows of disk writes, by disk offset.
    pub windows: Vec<ChunkRef>,
}

/// What a fill did: `disk-stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    /// 2 MiB windows of disk writes to fetch in all.
    pub windows: u64,
    /// Fetched because the guest reached them.
    pub demand_windows: u64,
    /// Fetched in the background (or before a snapshot, fork or migration).
    pub background_windows: u64,
    /// Stored (compressed) bytes this VMM fetched for them.
    pub fetched_bytes: u64,
    /// Whether the whole disk is in place (the store is no longer needed).
    pub all_in_place: bool,
}

/// Disk-write windows from the store, through the host's chunk cache.
pub struct StoreDisk {
    fetcher: super::Fetcher,
    plan: DiskFill,
    /// Keeps the windows not yet in place out of the cache's eviction.
    pin: Mutex<Option<Pin>>,
    vm_dir: PathBuf,
}

impl std::fmt::Debug for StoreDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreDisk")
            .field("fetcher", &self.fetcher)
            .field("windows", &self.plan.windows.len())
            .finish()
    }
}

impl StoreDisk {
    fn open(plan: DiskFill, vm_dir: &Path) -> Result<StoreDisk, StoreError> {
        let url = StoreUrl::parse(&plan.url)?;
        let cache = ChunkCache::open(&plan.cache, plan.cache_limit)?;
        let shas: Vec<String> = plan.windows.iter().map(|c| c.sha256.clone()).collect();
        let pin = cache.pin(&shas)?;
        Ok(StoreDisk {
            fetcher: super::Fetcher::new(Remote::open(&url)?, cache),
            plan,
            pin: Mutex::new(Some(pin)),
            vm_dir: vm_dir.to_path_buf(),
        })
    }

    /// The code and hint of the last failed fetch, for an error the user sees.
    pub fn last_error(&self) -> (String, Option<String>) {
        self.fetcher.last_error()
    }

    fn windows_at(&self, starts: &[u64]) -> std::io::Result<Vec<&ChunkRef>> {
        starts
            .iter()
            .map(|&s| {
                let i = self.plan.windows.partition_point(|c| c.at < s);
                self.plan
                    .windows
                    .get(i)
                    .filter(|c| c.at == s)
                    .ok_or_else(|| std::io::Error::other(format!("no disk window at {s}")))
            })
            .collect()
    }

    fn fetch_windows(&self, starts: &[u64]) -> std::io::Result<Vec<Clusters>> {
        let refs: Vec<ChunkRef> = self.windows_at(starts)?.into_iter().cloned().collect();
        let bytes = self.fetcher.fetch(&refs, "disk chunk")?;
        refs.iter()
            .zip(bytes)
            .map(|(c, b)| {
                chunk::disk_records(&b, c.at, self.plan.disk_size, self.plan.cluster_size)
                    .map_err(|e| self.fetcher.failed(e))
            })
            .collect()
    }
}

impl FillSource for StoreDisk {
    fn window(&self) -> u64 {
        CHUNK
    }

    fn windows(&self) -> Vec<u64> {
        self.plan.windows.iter().map(|c| c.at).collect()
    }

    fn fetch(&self, start: u64) -> std::io::Result<Clusters> {
        Ok(self.fetch_windows(&[start])?.pop().unwrap_or_default())
    }

    fn fetch_many(&self, starts: &[u64]) -> std::io::Result<Vec<Clusters>> {
        self.fetch_windows(starts)
    }

    fn report(&self, stats: &FillStats) {
        let report = DiskReport {
            windows: stats.windows,
            demand_windows: stats.demand,
            background_windows: stats.background,
            fetched_bytes: self.fetcher.fetched_bytes(),
            all_in_place: stats.complete,
        };
        let _ = record::write_runtime_json(&self.vm_dir.join(REPORT_FILE), &report);
        if stats.complete {
            // The disk is whole and flushed: nothing is left to fetch, and
            // the cache may let the windows go.
            let _ = std::fs::remove_file(self.vm_dir.join(FILL_FILE));
            self.pin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            tracing::info!("restore: all of the disk fetched from the store");
        }
    }
}

/// Starts the disk fill of a VM in `vm_dir` restored lazily from `store`:
/// records what is to fetch in the VM's directory, then returns the source.
/// None when the VM wrote nothing to its disk.
pub fn begin(store: &StoreMemory, vm_dir: &Path) -> Result<Option<Arc<StoreDisk>>, StoreError> {
    let url = StoreUrl::parse(&store.url)?;
    let digest = url.require_digest()?.to_string();
    let cache = ChunkCache::open(&store.cache, store.cache_limit)?;
    let m = cache.manifest(&digest)?;
    if m.disk_top.is_empty() {
        return Ok(None);
    }
    let plan = DiskFill {
        url: store.url.clone(),
        cache: store.cache.clone(),
        cache_limit: store.cache_limit,
        disk_size: m.bundle.disk.size,
        cluster_size: m.bundle.disk.cluster_size,
        windows: m.disk_top,
    };
    record::write_json(&vm_dir.join(FILL_FILE), &plan).map_err(fill_io("record"))?;
    Ok(Some(Arc::new(StoreDisk::open(plan, vm_dir)?)))
}

/// Goes on with a fill a previous VMM of the VM in `vm_dir` left unfinished;
/// None when there is none.
pub fn resume(vm_dir: &Path) -> Result<Option<Arc<StoreDisk>>, StoreError> {
    let path = vm_dir.join(FILL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fill_io("read")(e)),
    };
    let plan: DiskFill = serde_json::from_slice(&bytes).map_err(|e| {
        StoreError::Corrupt(format!("{} is not a disk fill record: {e}", path.display()))
    })?;
    if plan.windows.is_empty() {
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    }
    Ok(Some(Arc::new(StoreDisk::open(plan, vm_dir)?)))
}

/// An I/O error on the fill record, naming it.
fn fill_io(what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io {
        context: format!("{what} the disk's fill record ({FILL_FILE})"),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_record_means_no_fill_and_an_empty_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resume(dir.path()).unwrap().is_none());
        let plan = DiskFill {
            url: "s3://b/p/".to_string() + &"a".repeat(64),
            cache: dir.path().join("cache"),
            cache_limit: 1 << 30,
            disk_size: 1 << 30,
            cluster_size: 64 << 10,
            windows: Vec::new(),
        };
        record::write_json(&dir.path().join(FILL_FILE), &plan).unwrap();
        assert!(resume(dir.path()).unwrap().is_none());
        assert!(!dir.path().join(FILL_FILE).exists());
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILL_FILE), b"{nope").unwrap();
        let e = resume(dir.path()).unwrap_err();
        assert_eq!(e.code(), "BUNDLE_CORRUPT");
        assert!(e.to_string().contains(FILL_FILE), "{e}");
    }
}
