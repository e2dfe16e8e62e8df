//! The VM's own disk writes of a VM restored from a store, fetched by its
//! VMM: each 2 MiB window before the guest first reads or writes in it, the
//! rest in the background (see [`ferry_disk::fill`]).
//!
//! When the host lacked the disk image too, the image comes the same way:
//! a sparse file in the VM's directory stands below the VM's layer, and each
//! window's piece of the image is written into it before the window's own
//! writes are placed. Once every window is in, the image's stream is checked
//! against its content id, published in the host's cache under it (a hard
//! link: the same file), and the layer pointed at it there: later restores
//! and forks share it, and the VM's directory holds it no longer.
//!
//! What is still to fetch is kept in the VM's directory (`disk-fill.json`)
//! until every window is in place and flushed: a disk whose VMM ended half
//! way says so, and a VMM started on it goes on fetching (placing a window
//! twice is harmless: a cluster the disk holds already is never replaced).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};

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
    /// The disk image, when it comes window by window too.
    #[serde(default)]
    pub image: Option<ImageFill>,
}

/// A disk image fetched window by window into a file of the VM's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFill {
    /// The file it is written into (sparse, the disk's size), below the
    /// VM's layer until the image is whole.
    pub file: PathBuf,
    /// Where it is published then: `bases/<id>.img` in the host's cache.
    pub publish: PathBuf,
    /// Its content id: the SHA-256 of its stream.
    pub id: String,
    /// The VM's layer over it, pointed at the published image.
    pub layer: PathBuf,
    /// The stream's pieces, in order (each one zstd frame).
    pub pieces: Vec<ChunkRef>,
    /// The window of the disk each piece holds (None: the end mark alone).
    pub windows: Vec<Option<u64>>,
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
    /// Whether the disk image came window by window too (the host lacked it).
    #[serde(default)]
    pub image: bool,
}

/// Disk-write windows from the store, through the host's chunk cache.
pub struct StoreDisk {
    fetcher: super::Fetcher,
    plan: DiskFill,
    /// Keeps the windows not yet in place out of the cache's eviction.
    pin: Mutex<Option<Pin>>,
    vm_dir: PathBuf,
    /// The file the image is written into, while it comes.
    image: Option<File>,
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
    fn open(mut plan: DiskFill, vm_dir: &Path) -> Result<StoreDisk, StoreError> {
        let url = StoreUrl::parse(&plan.url)?;
        let cache = ChunkCache::open(&plan.cache, plan.cache_limit)?;
        // A VMM that ended after the image was published (its file goes
        // last) finds the layer on the published image: nothing to write.
        let image = match &plan.image {
            Some(i) => match std::fs::OpenOptions::new().write(true).open(&i.file) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && i.publish.is_file() => {
                    plan.image = None;
                    None
                }
                Err(e) => return Err(fill_io("open the disk image being fetched for")(e)),
            },
            None => None,
        };
        let shas: Vec<String> = plan
            .windows
            .iter()
            .chain(plan.image.iter().flat_map(|i| &i.pieces))
            .map(|c| c.sha256.clone())
            .collect();
        let pin = cache.pin(&shas)?;
        Ok(StoreDisk {
            fetcher: super::Fetcher::new(Remote::open(&url)?, cache),
            plan,
            pin: Mutex::new(Some(pin)),
            vm_dir: vm_dir.to_path_buf(),
            image,
        })
    }

    /// The code and hint of the last failed fetch, for an error the user sees.
    pub fn last_error(&self) -> (String, Option<String>) {
        self.fetcher.last_error()
    }

    /// The disk-writes chunk of the window at `start`, if it has one.
    fn top_at(&self, start: u64) -> Option<&ChunkRef> {
        let i = self.plan.windows.partition_point(|c| c.at < start);
        self.plan.windows.get(i).filter(|c| c.at == start)
    }

    /// The image's piece of the window at `start`, if it has one, with
    /// whether it is the image's last.
    fn image_at(&self, start: u64) -> Option<(&ChunkRef, bool)> {
        let image = self.plan.image.as_ref()?;
        let i = image.windows.iter().position(|w| *w == Some(start))?;
        Some((&image.pieces[i], i + 1 == image.pieces.len()))
    }

    fn fetch_windows(&self, starts: &[u64]) -> std::io::Result<Vec<Clusters>> {
        let mut refs: Vec<ChunkRef> = Vec::new();
        let mut wanted = Vec::with_capacity(starts.len());
        for &s in starts {
            let image = self.image_at(s).map(|(c, last)| {
                refs.push(c.clone());
                (refs.len() - 1, last)
            });
            let top = self.top_at(s).map(|c| {
                refs.push(c.clone());
                refs.len() - 1
            });
            if image.is_none() && top.is_none() {
                return Err(std::io::Error::other(format!("no disk window at {s}")));
            }
            wanted.push((s, image, top));
        }
        let bytes = self.fetcher.fetch(&refs, "disk chunk")?;
        let (size, cluster) = (self.plan.disk_size, self.plan.cluster_size);
        wanted
            .into_iter()
            .map(|(s, image, top)| {
                if let Some((i, last)) = image {
                    self.write_image(s, &bytes[i], last)?;
                }
                match top {
                    Some(i) => chunk::disk_records(&bytes[i], s, size, cluster)
                        .map_err(|e| self.fetcher.failed(e)),
                    None => Ok(Clusters::new()),
                }
            })
            .collect()
    }

    /// Writes the image's piece of the window at `start` into its file,
    /// below the layer: before the window's own writes are placed over it.
    fn write_image(&self, start: u64, piece: &[u8], last: bool) -> std::io::Result<()> {
        let file = self
            .image
            .as_ref()
            .expect("an image piece implies its file");
        let (clusters, ended) = chunk::base_records(
            piece,
            Some(start),
            self.plan.disk_size,
            self.plan.cluster_size,
        )
        .map_err(|e| self.fetcher.failed(e))?;
        if ended != last {
            return Err(self.fetcher.failed(StoreError::Corrupt(format!(
                "the disk image's piece at {start} ends the image out of place"
            ))));
        }
        for (at, bytes) in clusters {
            file.write_all_at(&bytes, at)?;
        }
        Ok(())
    }

    /// The image is whole: durable, checked against its content id,
    /// published under it, and the layer pointed at it.
    fn finish_image(&self, image: &ImageFill, file: &File) -> std::io::Result<()> {
        file.sync_all()?;
        let mut hash = Sha256::new();
        for batch in image.pieces.chunks(16) {
            for piece in self.fetcher.fetch(batch, "disk image piece")? {
                hash.update(&piece);
            }
        }
        let found = hex::encode(hash.finalize());
        if !found.eq_ignore_ascii_case(&image.id) {
            return Err(self.fetcher.failed(StoreError::Corrupt(format!(
                "the disk image's content (sha256 {}) is not the image its manifest names ({})",
                &found[..16],
                &image.id[..image.id.len().min(16)]
            ))));
        }
        if let Some(dir) = image.publish.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::hard_link(&image.file, &image.publish) {
            Ok(()) => crate::fsutil::fsync_path(image.publish.parent().unwrap_or(Path::new("/")))?,
            // Another restore published the same image: checked, so the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
                let staging = crate::fsutil::staging_path(&image.publish);
                let copied = std::fs::copy(&image.file, &staging)
                    .and_then(|_| File::open(&staging)?.sync_all())
                    .and_then(|()| crate::fsutil::publish(&staging, &image.publish));
                if let Err(e) = copied {
                    let _ = std::fs::remove_file(&staging);
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        ferry_disk::rebase_layer(&image.layer, &image.publish).map_err(std::io::Error::other)?;
        // The VMM keeps reading the file it opened; the name goes.
        match std::fs::remove_file(&image.file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }?;
        tracing::info!(
            "restore: disk image published as {}",
            image.publish.display()
        );
        Ok(())
    }
}

impl FillSource for StoreDisk {
    fn window(&self) -> u64 {
        CHUNK
    }

    fn windows(&self) -> Vec<u64> {
        let image = self
            .plan
            .image
            .iter()
            .flat_map(|i| i.windows.iter().flatten());
        let mut all: Vec<u64> = self
            .plan
            .windows
            .iter()
            .map(|c| c.at)
            .chain(image.copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    fn fetch(&self, start: u64) -> std::io::Result<Clusters> {
        Ok(self.fetch_windows(&[start])?.pop().unwrap_or_default())
    }

    fn fetch_many(&self, starts: &[u64]) -> std::io::Result<Vec<Clusters>> {
        self.fetch_windows(starts)
    }

    fn finish(&self) -> std::io::Result<()> {
        match (&self.plan.image, &self.image) {
            (Some(image), Some(file)) => self.finish_image(image, file),
            _ => Ok(()),
        }
    }

    fn report(&self, stats: &FillStats) {
        let report = DiskReport {
            windows: stats.windows,
            demand_windows: stats.demand,
            background_windows: stats.background,
            fetched_bytes: self.fetcher.fetched_bytes(),
            all_in_place: stats.complete,
            image: self.plan.image.is_some(),
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

/// Starts the disk fill of a VM in `vm_dir` (its root disk the layer
/// `layer`) restored lazily from `store`: records what is to fetch in the
/// VM's directory, then returns the source. None when there is nothing to
/// fetch (the VM wrote nothing to its disk, and the host has the image).
pub fn begin(
    store: &StoreMemory,
    vm_dir: &Path,
    layer: &Path,
) -> Result<Option<Arc<StoreDisk>>, StoreError> {
    let url = StoreUrl::parse(&store.url)?;
    let digest = url.require_digest()?.to_string();
    let cache = ChunkCache::open(&store.cache, store.cache_limit)?;
    let m = cache.manifest(&digest)?;
    let image = match (&store.lazy_image, &m.disk_base) {
        (Some(publish), Some(base)) => Some(ImageFill {
            file: store.filling_image(vm_dir).unwrap_or_default(),
            publish: publish.clone(),
            id: m.bundle.disk.base_id.clone(),
            layer: layer.to_path_buf(),
            pieces: base.pieces.clone(),
            windows: base.windows.clone().ok_or_else(|| {
                StoreError::Corrupt("the disk image cannot be fetched window by window".into())
            })?,
        }),
        _ => None,
    };
    if m.disk_top.is_empty() && image.is_none() {
        return Ok(None);
    }
    let plan = DiskFill {
        url: store.url.clone(),
        cache: store.cache.clone(),
        cache_limit: store.cache_limit,
        disk_size: m.bundle.disk.size,
        cluster_size: m.bundle.disk.cluster_size,
        windows: m.disk_top,
        image,
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
    if plan.windows.is_empty() && plan.image.is_none() {
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
            image: None,
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

    /// A store in memory holding a framed image of `clusters`: the fill
    /// plan of a VM whose layer at `dir/root.img` stands on an empty file.
    fn image_store(
        dir: &Path,
        clusters: &[(u64, Vec<u8>)],
        id: Option<&str>,
    ) -> (StoreDisk, PathBuf) {
        use ferry_store::StoreUrl;
        let cs = ferry_disk::CLUSTER_SIZE;
        let size = 8 * CHUNK;
        let mut it = clusters.iter().map(|(at, b)| (at / cs, b.clone()));
        let mut stream = Vec::new();
        ferry_snapshot::disk::write_clusters_framed(&mut stream, cs, || Ok(it.next())).unwrap();
        let url = StoreUrl::parse(&format!("s3://bucket/p/{}", "a".repeat(64))).unwrap();
        let remote =
            Remote::with_object_store(&url, Arc::new(object_store::memory::InMemory::new()))
                .unwrap();
        let (mut pieces, mut windows, mut rest, mut at) = (Vec::new(), Vec::new(), &stream[..], 0);
        let mut objects = Vec::new();
        while !rest.is_empty() {
            let n = ferry_snapshot::disk::frame_len(rest).unwrap();
            let (c, _) = ferry_snapshot::disk::read_frame(&rest[..n], cs, size).unwrap();
            windows.push(c.first().map(|(o, _)| o / CHUNK * CHUNK));
            let sha = chunk::digest(&rest[..n]);
            objects.push((chunk::object_name(&sha), chunk::encode(&rest[..n]).unwrap()));
            pieces.push(ChunkRef {
                at,
                len: n as u64,
                sha256: sha,
            });
            at += n as u64;
            rest = &rest[n..];
        }
        remote.put_all(objects).unwrap();
        let file = dir.join("image-filling.img");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let layer = dir.join("root.img");
        ferry_disk::create_layer(&layer, &file, None).unwrap();
        let publish = dir.join("cache/bases/image.img");
        let image = ImageFill {
            file: file.clone(),
            publish: publish.clone(),
            id: id.map_or_else(|| chunk::digest(&stream), str::to_string),
            layer,
            pieces,
            windows,
        };
        let plan = DiskFill {
            url: url.to_string(),
            cache: dir.join("chunks"),
            cache_limit: 64 << 20,
            disk_size: size,
            cluster_size: cs,
            windows: Vec::new(),
            image: Some(image),
        };
        let cache = ChunkCache::open(&plan.cache, plan.cache_limit).unwrap();
        let disk = StoreDisk {
            fetcher: super::super::Fetcher::new(remote, cache),
            plan,
            pin: Mutex::new(None),
            vm_dir: dir.to_path_buf(),
            image: Some(std::fs::OpenOptions::new().write(true).open(&file).unwrap()),
        };
        (disk, publish)
    }

    fn noise(seed: u8) -> Vec<u8> {
        (0..ferry_disk::CLUSTER_SIZE as usize)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn an_image_arrives_window_by_window_then_is_published_under_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let clusters = vec![
            (0, noise(1)),
            (CHUNK + 65536, noise(2)),
            (5 * CHUNK, noise(3)),
        ];
        let (source, publish) = image_store(dir.path(), &clusters, None);
        assert_eq!(source.windows(), vec![0, CHUNK, 5 * CHUNK]);
        let source = Arc::new(source);
        let disk = Arc::new(ferry_disk::Disk::open(&dir.path().join("root.img"), false).unwrap());
        let fill = ferry_disk::Filler::new(Arc::clone(&disk), source.clone()).unwrap();
        let read = |at: u64| {
            let mut buf = vec![0u8; 65536];
            disk.read_at(&mut buf, at).unwrap();
            buf
        };
        // Before its window arrives the image reads as zeros below the layer;
        // an access places it.
        fill.ensure(CHUNK + 65536, 512).unwrap();
        assert!(read(CHUNK + 65536) == clusters[1].1);
        assert!(read(0).iter().all(|&b| b == 0), "window 0 not yet fetched");
        fill.complete().unwrap();
        assert!(read(0) == clusters[0].1 && read(5 * CHUNK) == clusters[2].1);
        // Published, the layer on it, the VM's file gone.
        assert!(publish.is_file());
        assert!(!dir.path().join("image-filling.img").exists());
        let layer = ferry_disk::Layer::open(&dir.path().join("root.img"), true).unwrap();
        assert_eq!(layer.info().backing, publish);
        let mut whole = vec![0u8; 65536];
        layer.read_at(&mut whole, 5 * CHUNK).unwrap();
        assert!(whole == clusters[2].1);
        let report: DiskReport =
            serde_json::from_slice(&std::fs::read(dir.path().join(REPORT_FILE)).unwrap()).unwrap();
        assert!(
            report.image && report.all_in_place && report.windows == 3,
            "{report:?}"
        );
    }

    #[test]
    fn an_image_that_is_not_its_id_is_never_published() {
        let dir = tempfile::tempdir().unwrap();
        let (source, publish) = image_store(dir.path(), &[(0, noise(7))], Some(&"b".repeat(64)));
        let source = Arc::new(source);
        let disk = Arc::new(ferry_disk::Disk::open(&dir.path().join("root.img"), false).unwrap());
        let fill = ferry_disk::Filler::new(disk, source.clone()).unwrap();
        // The guest's access succeeds (the piece matched its own hash) ...
        fill.ensure(0, 512).unwrap();
        // ... but the fill never completes, and says why.
        assert!(fill.complete().is_err());
        assert!(!fill.is_complete());
        assert_eq!(source.last_error().0, "BUNDLE_CORRUPT");
        assert!(!publish.exists());
        assert!(dir.path().join("image-filling.img").is_file());
    }
}
