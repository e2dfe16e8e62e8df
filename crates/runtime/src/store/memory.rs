//! Guest memory of a VM restored from a store, fetched by its VMM process:
//! the prefetch chunks (already in the host's chunk cache, fetched by the
//! restoring command) before the guest runs, any other chunk on first touch,
//! and the rest in the background once the guest's first seconds are over.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_store::cache::{ChunkCache, Pin};
use ferry_store::manifest::ChunkRef;
use ferry_store::{Remote, StoreError, StoreManifest, StoreUrl};
use ferry_vmm::snapshot::{Chunk, LazySource, LazyStats};
use serde::{Deserialize, Serialize};

use crate::vm::record;

/// Threads fetching the chunks nobody touched.
const BACKGROUND_FETCHES: usize = 4;

/// Where a restoring VMM finds the memory of a VM restored from a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMemory {
    /// `s3://BUCKET/PREFIX/DIGEST`.
    pub url: String,
    /// The host's chunk cache (the manifest is there too).
    pub cache: PathBuf,
    /// Its size limit in bytes.
    pub cache_limit: u64,
    /// Whether the manifest's prefetch list is placed before the guest runs.
    pub prefetch: bool,
    /// Stored bytes the restoring command fetched before the VMM started
    /// (manifest, state, prefetch chunks, disk).
    #[serde(default)]
    pub fetched_before_start: u64,
    /// Whether the VM's disk writes were left out of the restored bundle,
    /// for the VMM to fetch as the guest reaches them ([`super::disk`]).
    #[serde(default)]
    pub lazy_disk: bool,
    /// Whether what the guest has not touched is fetched in the background
    /// (off, it arrives only on first touch, or before a snapshot).
    #[serde(default = "yes")]
    pub background: bool,
    /// Where the disk image goes once whole (`bases/<id>.img` in the host's
    /// cache), when the host lacked it and the VMM fetches it window by
    /// window like the VM's own writes ([`super::disk`]).
    #[serde(default)]
    pub lazy_image: Option<PathBuf>,
}

/// The file in a VM's directory its disk image is fetched into.
const IMAGE_FILE: &str = "image-filling.img";

impl StoreMemory {
    /// The file in `vm_dir` the disk image is fetched into, when it is.
    pub fn filling_image(&self, vm_dir: &Path) -> Option<PathBuf> {
        self.lazy_image.as_ref().map(|_| vm_dir.join(IMAGE_FILE))
    }
}

fn yes() -> bool {
    true
}

/// Memory chunks of `m` its prefetch list touches, by index.
pub fn prefetch_chunks(m: &StoreManifest) -> Vec<usize> {
    chunks_touched(&m.memory, &m.prefetch)
}

/// Indexes of `memory` (sorted by address) that `ranges` overlap.
fn chunks_touched(memory: &[ChunkRef], ranges: &[(u64, u64)]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for &(start, len) in ranges {
        let first = memory.partition_point(|c| c.at + c.len <= start);
        for (i, c) in memory.iter().enumerate().skip(first) {
            if c.at >= start + len {
                break;
            }
            if out.last() != Some(&i) {
                out.push(i);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// What a lazily restored VM's memory did: `lazy-stats.json` in its directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyReport {
    /// Page faults the guest took on chunks not yet in place.
    pub faults: u64,
    /// Chunks fetched because the guest touched them.
    pub demand_chunks: u64,
    /// Chunks placed before the guest ran.
    pub prefetched_chunks: u64,
    /// Chunks placed by the background fetch.
    pub background_chunks: u64,
    /// Stored (compressed) bytes the restoring command fetched before the
    /// VMM started: manifest, state, prefetch chunks, disk.
    pub restore_fetched_bytes: u64,
    /// Stored (compressed) bytes this VMM fetched from the store since.
    pub fetched_bytes: u64,
    /// Whether all of guest memory is in place (the store is no longer needed).
    pub all_in_place: bool,
}

/// Guest memory chunks from the store, through the host's chunk cache.
struct StoreSource {
    fetcher: super::Fetcher,
    chunks: Vec<ChunkRef>,
    prefetch: Vec<usize>,
    prefetch_ranges: Vec<(u64, u64)>,
    /// Keeps the chunks not yet in place out of the cache's eviction.
    pin: Mutex<Option<Pin>>,
    fetched_before_start: u64,
    background: bool,
    vm_dir: PathBuf,
}

impl std::fmt::Debug for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSource")
            .field("fetcher", &self.fetcher)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl StoreSource {
    /// Chunk `c`, from the cache or the store (see [`super::fetch_patiently`]).
    fn fetch(&self, c: &ChunkRef) -> std::io::Result<Vec<u8>> {
        self.fetcher
            .fetch(std::slice::from_ref(c), "memory chunk")?
            .pop()
            .ok_or_else(|| std::io::Error::other("no chunk fetched"))
    }
}

impl LazySource for StoreSource {
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for c in &self.chunks {
            match out.last_mut() {
                Some((s, l)) if *s + *l == c.at => *l += c.len,
                _ => out.push((c.at, c.len)),
            }
        }
        out
    }

    fn chunks(&self) -> usize {
        self.chunks.len()
    }

    fn chunk_of(&self, addr: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.at + c.len <= addr);
        self.chunks.get(i).filter(|c| c.at <= addr).map(|_| i)
    }

    fn produce(&self, index: usize) -> std::io::Result<Chunk> {
        let c = &self.chunks[index];
        let bytes = self.fetch(c)?;
        Ok(Chunk {
            pieces: vec![(c.at, 0, bytes.len())],
            bytes,
        })
    }

    fn prefetch(&self) -> Vec<usize> {
        self.prefetch.clone()
    }

    fn prefetch_ranges(&self) -> Vec<(u64, u64)> {
        self.prefetch_ranges.clone()
    }

    fn background(&self) -> usize {
        if self.background {
            BACKGROUND_FETCHES
        } else {
            0
        }
    }

    fn report(&self, stats: &LazyStats) {
        let report = LazyReport {
            faults: stats.faults,
            demand_chunks: stats.demand_chunks,
            prefetched_chunks: stats.prefetched_chunks,
            background_chunks: stats.background_chunks,
            restore_fetched_bytes: self.fetched_before_start,
            fetched_bytes: self.fetcher.fetched_bytes(),
            all_in_place: stats.all_in_place,
        };
        let _ = record::write_runtime_json(&self.vm_dir.join("lazy-stats.json"), &report);
        if stats.all_in_place {
            // Every chunk is in guest memory: the cache may let them go.
            self.pin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            tracing::info!("restore: all guest memory fetched from the store");
        }
    }

    fn failed(&self, error: &std::io::Error) {
        // The VMM ends: what `ferry ls` and the SDKs show is why.
        let (code, hint) = self.fetcher.last_error();
        let _ = record::write_json(
            &self.vm_dir.join("exit.json"),
            &record::ExitRecord {
                reason: "error".into(),
                detail: Some(format!(
                    "guest memory could not be fetched from the store: {error}"
                )),
                code: Some(code),
                hint,
                at: record::now(),
            },
        );
    }
}

/// The lazy memory source of a VM in `vm_dir` restored from `store`.
pub fn source(store: &StoreMemory, vm_dir: &Path) -> Result<Arc<dyn LazySource>, StoreError> {
    let url = StoreUrl::parse(&store.url)?;
    let digest = url.require_digest()?.to_string();
    let cache = ChunkCache::open(&store.cache, store.cache_limit)?;
    // Read back from the host's cache and checked again against its name.
    let m = cache.manifest(&digest)?;
    let shas: Vec<String> = m.memory.iter().map(|c| c.sha256.clone()).collect();
    let pin = cache.pin(&shas)?;
    let prefetch = if store.prefetch {
        prefetch_chunks(&m)
    } else {
        Vec::new()
    };
    Ok(Arc::new(StoreSource {
        fetcher: super::Fetcher::new(Remote::open(&url)?, cache),
        prefetch,
        prefetch_ranges: m.prefetch.clone(),
        chunks: m.memory,
        pin: Mutex::new(Some(pin)),
        fetched_before_start: store.fetched_before_start,
        background: store.background,
        vm_dir: vm_dir.to_path_buf(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(at: u64) -> ChunkRef {
        ChunkRef {
            at,
            len: 2 << 20,
            sha256: "0".repeat(64),
        }
    }

    #[test]
    fn the_prefetch_list_names_the_chunks_it_overlaps() {
        let memory = vec![chunk(0), chunk(2 << 20), chunk(8 << 20)];
        let ranges = [(4096, 4096), ((2 << 20) - 4096, 8192), (8 << 20, 4096)];
        assert_eq!(chunks_touched(&memory, &ranges), vec![0, 1, 2]);
        assert_eq!(chunks_touched(&memory, &[(4096, 4096)]), vec![0]);
        assert!(
            chunks_touched(&memory, &[(4 << 20, 4096)]).is_empty(),
            "a zero window has no chunk"
        );
    }
}
