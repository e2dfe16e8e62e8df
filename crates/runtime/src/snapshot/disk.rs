//! The root disk in a bundle: the image below the VM (base) and the VM's own
//! writes (top), each a compressed stream of the clusters holding data.
//!
//! On restore the base is unpacked once per host into the cache under its
//! content id, so several restores of one bundle (or bundles sharing a base)
//! share it; each VM gets a fresh copy-on-write layer on top.
//!
//! A thin bundle carries no base, only its content id: the restoring host
//! must already have it, unpacked from an earlier bundle or as the image a VM
//! on this host was snapshotted over (every encoded base records the file it
//! came from).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_disk::{Disk, CLUSTER_SIZE};
use ferry_snapshot::manifest::DiskInfo;
use ferry_snapshot::{disk as stream, Bundle, BundleError, BundleWriter, SectionKind};
use sha2::{Digest, Sha256};

use crate::fsutil;

/// Passes bytes through while hashing them.
pub(crate) struct Hashing<W> {
    pub(crate) inner: W,
    pub(crate) hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn cluster_source<'a>(
    disk: &'a Disk,
    clusters: Vec<u64>,
) -> impl FnMut() -> std::io::Result<Option<(u64, Vec<u8>)>> + 'a {
    let size = disk.size();
    let mut it = clusters.into_iter();
    move || {
        let Some(c) = it.next() else { return Ok(None) };
        let start = c * CLUSTER_SIZE;
        let len = CLUSTER_SIZE.min(size.saturating_sub(start)) as usize;
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, start)?;
        Ok(Some((c, buf)))
    }
}

/// An encoded base stream kept on the source host: bases are immutable, so
/// later snapshots of VMs on the same base copy it instead of recompressing.
#[derive(serde::Serialize, serde::Deserialize)]
struct EncodedBase {
    sha256: String,
    clusters: u64,
    /// The base disk itself (top of its chain), so a thin bundle's restore on
    /// this host finds it by content id.
    #[serde(default)]
    path: Option<PathBuf>,
}

/// Identity of an immutable disk chain: each file's device, inode, size and mtime.
fn chain_key(base: &Disk, bottom: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    let mut d = base;
    while let Disk::Layer(l) = d {
        files.push(l.path().to_path_buf());
        d = l.backing();
    }
    files.push(bottom.to_path_buf());
    let mut h = Sha256::new();
    // Names the encoding too: bases encoded before streams were framed by
    // window are encoded again.
    h.update(b"framed;");
    for f in files {
        let m = std::fs::metadata(&f)?;
        h.update(format!(
            "{}:{}:{}:{}.{};",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        ));
    }
    Ok(hex::encode(h.finalize()))
}

fn encoded_base_paths(cache: &Path, key: &str) -> (PathBuf, PathBuf) {
    let dir = cache.join("encoded-bases");
    (
        dir.join(format!("{key}.zst")),
        dir.join(format!("{key}.json")),
    )
}

/// Returns the cached encoding of `base` (root layer's backing chain), making it
/// first if needed. `base_path` names the base (top of its chain), `base_file`
/// the raw file at the bottom of the chain.
fn encoded_base(
    cache: &Path,
    base: &Disk,
    base_path: &Path,
    base_file: &Path,
) -> std::io::Result<(PathBuf, EncodedBase)> {
    let key = chain_key(base, base_file)?;
    let (data, meta) = encoded_base_paths(cache, &key);
    if let Some(mut e) = crate::vm::record::read_json::<EncodedBase>(&meta) {
        if data.is_file() {
            if e.path.is_none() {
                e.path = Some(base_path.to_path_buf());
                crate::vm::record::write_json(&meta, &e)?;
            }
            return Ok((data, e));
        }
    }
    std::fs::create_dir_all(data.parent().expect("has parent"))?;
    let staging = fsutil::staging_path(&data);
    let result = (|| {
        let list = base.clusters_with_data(CLUSTER_SIZE)?;
        let mut h = Hashing {
            inner: std::io::BufWriter::new(File::create(&staging)?),
            hash: Sha256::new(),
        };
        let clusters =
            stream::write_clusters_framed(&mut h, CLUSTER_SIZE, cluster_source(base, list))?;
        let file = h.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let e = EncodedBase {
            sha256: hex::encode(h.hash.finalize()),
            clusters,
            path: Some(base_path.to_path_buf()),
        };
        fsutil::publish(&staging, &data)?;
        crate::vm::record::write_json(&meta, &e)?;
        Ok(e)
    })();
    match result {
        Ok(e) => Ok((data, e)),
        Err(err) => {
            let _ = std::fs::remove_file(&staging);
            Err(err)
        }
    }
}

/// The raw file at the bottom of a disk chain.
fn bottom_file(disk: &Disk, path: &Path) -> PathBuf {
    let mut d = disk;
    let mut p = path.to_path_buf();
    while let Disk::Layer(l) = d {
        d = l.backing();
        p = resolve(l.path(), &l.info().backing);
    }
    p
}

fn resolve(layer: &Path, backing: &Path) -> PathBuf {
    if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        layer.parent().unwrap_or(Path::new(".")).join(backing)
    }
}

/// Writes the `DiskBase` and `DiskTop` sections for a VM root disk that is a
/// layer over its image (a raw disk is carried entirely as base). A thin
/// bundle gets no `DiskBase`: only the base's content id is recorded.
pub fn write_sections<W: Write>(
    cache: &Path,
    w: &mut BundleWriter<W>,
    root: &Path,
    thin: bool,
) -> Result<DiskInfo, BundleError> {
    let disk = Disk::open(root, true)
        .map_err(|e| BundleError::io("open root disk")(std::io::Error::other(e)))?;
    let (base, top_clusters): (&Disk, Vec<u64>) = match &disk {
        Disk::Layer(l) => (l.backing(), l.own_clusters(CLUSTER_SIZE)),
        raw => (raw, Vec::new()),
    };
    // A raw root disk is written to by its VM: it cannot be cached as a base.
    let cached = match &disk {
        Disk::Layer(l) => Some(
            encoded_base(
                cache,
                base,
                &resolve(l.path(), &l.info().backing),
                &bottom_file(&disk, root),
            )
            .map_err(BundleError::io("encode disk base"))?,
        ),
        Disk::Raw { .. } => None,
    };
    let base_cache_path = match &disk {
        Disk::Layer(l) => cache_relative(cache, &resolve(l.path(), &l.info().backing)),
        Disk::Raw { .. } => None,
    };
    let (base_clusters, digest) = match cached {
        Some((_, e)) if thin => (e.clusters, e.sha256),
        None if thin => {
            return Err(BundleError::io("thin snapshot")(std::io::Error::other(
                "the root disk has no image below it to leave out",
            )))
        }
        Some((data, e)) => {
            w.section(SectionKind::DiskBase, |out| {
                std::io::copy(&mut File::open(&data)?, out)?;
                Ok(())
            })?;
            (e.clusters, e.sha256)
        }
        None => {
            let base_list = base
                .clusters_with_data(CLUSTER_SIZE)
                .map_err(BundleError::io("list base clusters"))?;
            w.section(SectionKind::DiskBase, |out| {
                let mut h = Hashing {
                    inner: out,
                    hash: Sha256::new(),
                };
                let n = stream::write_clusters_framed(
                    &mut h,
                    CLUSTER_SIZE,
                    cluster_source(base, base_list),
                )?;
                Ok((n, hex::encode(h.hash.finalize())))
            })?
        }
    };
    let top = w.section(SectionKind::DiskTop, |out| {
        stream::write_clusters(out, cluster_source(&disk, top_clusters))
    })?;
    Ok(DiskInfo {
        size: disk.size(),
        cluster_size: CLUSTER_SIZE,
        base_id: digest,
        base_clusters,
        top_clusters: top,
        thin,
        base_image: None,
        base_cache_path,
    })
}

/// The root disk as a migration sends it: `frozen` is the VM's top layer,
/// no longer written; below it lies the base the destination may hold.
pub struct MigrationDisk {
    /// What the destination is told.
    pub desc: crate::migrate::wire::DiskDesc,
    /// The encoded base stream (its SHA-256 is `desc.base_id`).
    pub encoded_base: PathBuf,
    /// Clusters the frozen layer holds itself.
    pub top_clusters: Vec<u64>,
}

/// Describes the frozen top layer `frozen` and its base for a migration,
/// encoding the base into the cache if it was not yet (as a snapshot does).
pub fn migration_source(cache: &Path, frozen: &Path) -> std::io::Result<MigrationDisk> {
    let disk = Disk::open(frozen, true).map_err(std::io::Error::other)?;
    let Disk::Layer(l) = &disk else {
        return Err(std::io::Error::other(
            "the root disk has no image below it (a raw disk cannot migrate)",
        ));
    };
    let base_path = resolve(l.path(), &l.info().backing);
    let (encoded, e) = encoded_base(cache, l.backing(), &base_path, &bottom_file(&disk, frozen))?;
    Ok(MigrationDisk {
        desc: crate::migrate::wire::DiskDesc {
            size: disk.size(),
            cluster_size: CLUSTER_SIZE,
            base_id: e.sha256,
            base_clusters: e.clusters,
            base_image: None,
            base_cache_path: cache_relative(cache, &base_path),
        },
        encoded_base: encoded,
        top_clusters: l.own_clusters(CLUSTER_SIZE),
    })
}

/// Renames the disk layer `root` to a new random name in `dir` (made if
/// missing), never replacing a file; returns the new path.
pub fn move_aside(root: &Path, dir: &Path, id: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    loop {
        let candidate = dir.join(format!("{id}-{}.img", fsutil::random_hex(8)?));
        match fsutil::rename_noreplace(root, &candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The content id of the base below the VM's own layer `root` (encoding
/// the base into the cache if it was not yet).
pub fn base_id(cache: &Path, root: &Path) -> std::io::Result<String> {
    let disk = Disk::open(root, true).map_err(std::io::Error::other)?;
    let Disk::Layer(l) = &disk else {
        return Err(std::io::Error::other("the root disk has no image below it"));
    };
    let base_path = resolve(l.path(), &l.info().backing);
    let (_, e) = encoded_base(cache, l.backing(), &base_path, &bottom_file(&disk, root))?;
    Ok(e.sha256)
}

/// Writes the `DiskTop` section of an incremental bundle: the clusters of
/// the VM's own layer whose content is not what `parent` holds there. The
/// caller has checked that the VM still stands on `parent.base_id`.
pub fn write_changed<W: Write>(
    cache: &Path,
    w: &mut BundleWriter<W>,
    root: &Path,
    parent: &super::chain::ParentDisk,
) -> Result<DiskInfo, BundleError> {
    let disk = Disk::open(root, true)
        .map_err(|e| BundleError::io("open root disk")(std::io::Error::other(e)))?;
    let Disk::Layer(l) = &disk else {
        return Err(BundleError::io("incremental snapshot")(
            std::io::Error::other("the root disk has no image below it"),
        ));
    };
    let size = disk.size();
    let mut changed = Vec::new();
    let mut buf = vec![0u8; CLUSTER_SIZE as usize];
    for c in l.own_clusters(CLUSTER_SIZE) {
        let start = c * CLUSTER_SIZE;
        let len = CLUSTER_SIZE.min(size.saturating_sub(start)) as usize;
        disk.read_at(&mut buf[..len], start)
            .map_err(BundleError::io("read root disk"))?;
        if parent.clusters.get(&c) != Some(&super::chain::cluster_hash(&buf[..len])) {
            changed.push(c);
        }
    }
    let top = w.section(SectionKind::DiskTop, |out| {
        stream::write_clusters(out, cluster_source(&disk, changed))
    })?;
    Ok(DiskInfo {
        size,
        cluster_size: CLUSTER_SIZE,
        base_id: parent.base_id.clone(),
        base_clusters: 0,
        top_clusters: top,
        thin: true,
        base_image: None,
        base_cache_path: cache_relative(cache, &resolve(l.path(), &l.info().backing)),
    })
}

/// Creates the VM's root disk at `root` for a chain of bundles (oldest
/// first, all on the base at `base`): a new layer holding each bundle's top
/// clusters in turn, the newest last.
pub fn restore_root_chain(chain: &[&Bundle], base: &Path, root: &Path) -> Result<(), BundleError> {
    let Some((newest, older)) = chain.split_last() else {
        return Err(BundleError::BadManifest("no bundle to restore".into()));
    };
    let Some(oldest) = older.first() else {
        return restore_root(newest, &newest.manifest().disk, base, root);
    };
    restore_root(oldest, &oldest.manifest().disk, base, root)?;
    let disk = Disk::open(root, false)
        .map_err(|e| BundleError::io("open root layer")(std::io::Error::other(e)))?;
    for b in older.iter().skip(1).chain(std::iter::once(newest)) {
        b.read_disk(SectionKind::DiskTop, |at, data| disk.write_at(data, at))?;
    }
    disk.write_back()
        .map_err(BundleError::io("write root layer"))?;
    Ok(())
}

/// `path` relative to this host's cache directory, if it lies inside it.
fn cache_relative(cache: &Path, path: &Path) -> Option<String> {
    let cache = std::fs::canonicalize(cache).ok()?;
    let path = std::fs::canonicalize(path).ok()?;
    Some(path.strip_prefix(cache).ok()?.to_str()?.to_string())
}

/// Finds a thin bundle's base on this host by content id: unpacked from an
/// earlier bundle, recorded when a snapshot on this host encoded it (and
/// unchanged since), or the cached image the writing host named, if its
/// content matches. None when this host does not have it.
pub fn find_base(cache: &Path, info: &DiskInfo) -> Result<Option<PathBuf>, BundleError> {
    if !valid_id(&info.base_id) || info.cluster_size != CLUSTER_SIZE {
        return Err(BundleError::BadManifest(
            "disk base id or cluster size".into(),
        ));
    }
    // Trusted by name: only a base whose content was hashed and found to be
    // its id while it was unpacked is ever published there (see ensure_base).
    let unpacked = base_path(cache, &info.base_id);
    if unpacked.is_file() {
        return Ok(Some(unpacked));
    }
    let dir = cache.join("encoded-bases");
    let recorded = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"));
    for meta in recorded {
        let Some(e) = crate::vm::record::read_json::<EncodedBase>(&meta) else {
            continue;
        };
        let (Some(path), true) = (e.path, e.sha256 == info.base_id) else {
            continue;
        };
        // The record is keyed by the chain's identity: a changed file no longer matches.
        let key = meta.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if let Ok(disk) = Disk::open(&path, true) {
            if chain_key(&disk, &bottom_file(&disk, &path)).is_ok_and(|k| k == key) {
                return Ok(Some(path));
            }
        }
    }
    // The same image file in this host's cache: its content decides.
    let named = info
        .base_cache_path
        .as_deref()
        .map(Path::new)
        .filter(|p| {
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .map(|p| cache.join(p))
        .filter(|p| p.is_file());
    if let Some(path) = named {
        if let Ok(disk) = Disk::open(&path, true) {
            let bottom = bottom_file(&disk, &path);
            if let Ok((_, e)) = encoded_base(cache, &disk, &path, &bottom) {
                if e.sha256 == info.base_id {
                    return Ok(Some(path));
                }
            }
        }
    }
    Ok(None)
}

/// Where this host keeps unpacked bases.
pub(crate) fn base_path(cache: &Path, id: &str) -> PathBuf {
    cache.join("bases").join(format!("{id}.img"))
}

fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Makes sure the bundle's base is unpacked on this host and returns its path.
///
/// The base is published under its content id, where later restores (and
/// [`find_base`]) take it by name: so its content is checked against that id
/// first. The section's bytes are hashed as they are unpacked, and a base
/// whose hash is not `info.base_id` is refused (`BUNDLE_CORRUPT`) and never
/// published. The bundle's checksums cannot vouch for this: a bundle written
/// with another base's id has valid checksums.
pub fn ensure_base(cache: &Path, bundle: &Bundle, info: &DiskInfo) -> Result<PathBuf, BundleError> {
    unpack_base(cache, info, bundle.section_reader(SectionKind::DiskBase)?)
}

/// Unpacks the encoded base stream `input` into the cache under its content
/// id, refusing (`BUNDLE_CORRUPT`) a stream whose SHA-256 is not
/// `info.base_id` or whose cluster count is not `info.base_clusters`.
pub fn unpack_base(
    cache: &Path,
    info: &DiskInfo,
    input: impl Read,
) -> Result<PathBuf, BundleError> {
    if !valid_id(&info.base_id) || info.cluster_size != CLUSTER_SIZE {
        return Err(BundleError::BadManifest(
            "disk base id or cluster size".into(),
        ));
    }
    // Trusted by name: only verified bases are published there (below).
    let dest = base_path(cache, &info.base_id);
    if dest.is_file() {
        return Ok(dest);
    }
    // One unpacking at a time in this process: threads share the staging
    // name (it carries the pid), and the second finds the base published.
    static UNPACKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = UNPACKING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = dest.parent().expect("base path has a parent");
    std::fs::create_dir_all(dir).map_err(BundleError::io("create base cache"))?;
    fsutil::remove_stale_staging(dir);
    let staging = fsutil::staging_path(&dest);
    let result = (|| {
        let file = File::create(&staging).map_err(BundleError::io("create base"))?;
        file.set_len(info.size)
            .map_err(BundleError::io("size base"))?;
        let mut section = Hashing {
            inner: input,
            hash: Sha256::new(),
        };
        let n = stream::read_clusters_within(&mut section, CLUSTER_SIZE, info.size, |at, data| {
            file.write_all_at(data, at)
        })?;
        if n != info.base_clusters {
            return Err(BundleError::Corrupt(format!(
                "the disk base holds {n} clusters, the manifest says {}",
                info.base_clusters
            )));
        }
        // The id covers the whole section, past the end of the cluster stream.
        std::io::copy(&mut section, &mut std::io::sink())
            .map_err(BundleError::io("read disk base"))?;
        let digest = hex::encode(section.hash.finalize());
        if !digest.eq_ignore_ascii_case(&info.base_id) {
            return Err(BundleError::Corrupt(format!(
                "the disk base's content (sha256 {}) is not the base it names ({})",
                &digest[..16],
                &info.base_id[..16]
            )));
        }
        file.sync_all().map_err(BundleError::io("sync base"))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    // Another restore may have published the same base meanwhile: either copy is fine.
    fsutil::publish(&staging, &dest).map_err(BundleError::io("publish base"))?;
    Ok(dest)
}

/// Creates the VM's root disk at `root`: a new layer over the base holding the
/// bundle's top clusters. `info` is the bundle's disk (its manifest's).
pub fn restore_root(
    bundle: &Bundle,
    info: &DiskInfo,
    base: &Path,
    root: &Path,
) -> Result<(), BundleError> {
    if *info != bundle.manifest().disk {
        return Err(BundleError::BadManifest(
            "the disk to restore is not the one the bundle describes".into(),
        ));
    }
    ferry_disk::create_layer_unsynced(root, base, Some(info.size))
        .map_err(|e| BundleError::io("create root layer")(std::io::Error::other(e)))?;
    let disk = Disk::open(root, false)
        .map_err(|e| BundleError::io("open root layer")(std::io::Error::other(e)))?;
    // Every cluster inside the disk's size, as many as the manifest records.
    bundle.read_disk(SectionKind::DiskTop, |at, data| disk.write_at(data, at))?;
    // Not synced: the layer belongs to a VM that exists only once this
    // restore succeeds, and a host crash would lose that VM's memory anyway.
    // The VMM opens the file next, through the same page cache, and syncs
    // it whenever the guest flushes its disk.
    disk.write_back()
        .map_err(BundleError::io("write root layer"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_snapshot::manifest::{CpuInfo, MemoryRegion};
    use ferry_snapshot::Manifest;

    fn manifest(disk: DiskInfo) -> Manifest {
        Manifest {
            format_version: 0,
            ferry_version: "t".into(),
            created_at: 0,
            arch: "x86_64".into(),
            cpu: CpuInfo::default(),
            vm_name: "d".into(),
            cpus: 1,
            memory_mib: 1,
            memory_regions: vec![MemoryRegion {
                guest_addr: 0,
                size: 1 << 20,
            }],
            memory_bytes: 0,
            memory_stored_bytes: 0,
            memory_prefetch_frames: Vec::new(),
            devices: vec![],
            disk,
            sections: vec![],
            parent: None,
        }
    }

    #[test]
    fn a_layered_disk_travels_and_comes_back_identical() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let base = tmp.path().join("base.img");
        let f = File::create(&base).unwrap();
        f.set_len(40 * CLUSTER_SIZE).unwrap();
        f.write_all_at(&[5u8; 1000], 2 * CLUSTER_SIZE).unwrap();
        f.write_all_at(&[6u8; 10], 30 * CLUSTER_SIZE + 7).unwrap();
        drop(f);
        let top = tmp.path().join("root.img");
        ferry_disk::create_layer(&top, &base, None).unwrap();
        {
            let d = Disk::open(&top, false).unwrap();
            d.write_at(b"written by the VM", 2 * CLUSTER_SIZE + 500)
                .unwrap();
            d.write_at(&[9u8; 3], 39 * CLUSTER_SIZE).unwrap();
        }
        let bundle_path = tmp.path().join("b.snap");
        let (guard, mut w) = ferry_snapshot::writer::FileBundle::create(&bundle_path).unwrap();
        let info = write_sections(&cache, &mut w, &top, false).unwrap();
        assert_eq!(info.top_clusters, 2);
        let out = w.finish(manifest(info.clone())).unwrap();
        guard.commit(out).unwrap();

        let bundle = Bundle::open(&bundle_path).unwrap();
        bundle.verify().unwrap();
        let got_base = ensure_base(&cache, &bundle, &info).unwrap();
        // A second restore reuses the unpacked base.
        assert_eq!(ensure_base(&cache, &bundle, &info).unwrap(), got_base);
        let restored = tmp.path().join("restored.img");
        restore_root(&bundle, &info, &got_base, &restored).unwrap();
        let (a, b) = (
            Disk::open(&top, true).unwrap(),
            Disk::open(&restored, true).unwrap(),
        );
        let mut x = vec![0u8; (40 * CLUSTER_SIZE) as usize];
        let mut y = x.clone();
        a.read_at(&mut x, 0).unwrap();
        b.read_at(&mut y, 0).unwrap();
        assert!(x == y, "restored disk differs");
    }

    /// A base cluster stream of `byte`s: its bytes, its content id, its clusters.
    fn base_stream(byte: u8) -> (Vec<u8>, String, u64) {
        let mut clusters = vec![
            (0u64, vec![byte; CLUSTER_SIZE as usize]),
            (3, vec![byte; 100]),
        ]
        .into_iter();
        let mut out = Vec::new();
        let n = stream::write_clusters(&mut out, || Ok(clusters.next())).unwrap();
        let id = hex::encode(Sha256::digest(&out));
        (out, id, n)
    }

    /// A bundle (every checksum right) whose disk base section is `base` and
    /// whose manifest names the base `id`.
    fn bundle_with_base(path: &Path, base: &[u8], id: &str, clusters: u64) -> DiskInfo {
        let (guard, mut w) = ferry_snapshot::writer::FileBundle::create(path).unwrap();
        w.section_bytes(SectionKind::DiskBase, base).unwrap();
        let top = w
            .section(SectionKind::DiskTop, |out| {
                stream::write_clusters(out, || Ok(None))
            })
            .unwrap();
        let info = DiskInfo {
            size: 4 * CLUSTER_SIZE,
            cluster_size: CLUSTER_SIZE,
            base_id: id.to_string(),
            base_clusters: clusters,
            top_clusters: top,
            thin: false,
            base_image: None,
            base_cache_path: None,
        };
        let out = w.finish(manifest(info.clone())).unwrap();
        guard.commit(out).unwrap();
        info
    }

    #[test]
    fn a_base_that_is_not_the_content_its_id_names_is_refused_and_not_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let bases = cache.join("bases");
        let (honest, id, n) = base_stream(1);
        let (other, other_id, other_n) = base_stream(2);
        assert_ne!(id, other_id);
        assert_eq!(n, other_n);
        let entries = || std::fs::read_dir(&bases).map_or(0, |d| d.count());

        // Another base's valid cluster stream under this base's id: the
        // bundle's own checksums are all right.
        let forged_path = tmp.path().join("forged.snap");
        let info = bundle_with_base(&forged_path, &other, &id, n);
        let forged = Bundle::open(&forged_path).unwrap();
        forged.verify().unwrap();
        let err = ensure_base(&cache, &forged, &info).unwrap_err();
        assert_eq!(err.code(), "BUNDLE_CORRUPT", "{err}");
        assert_eq!(entries(), 0, "nothing is left under bases/");
        assert_eq!(find_base(&cache, &info).unwrap(), None);

        // The honest bundle unpacks, and its base is then found by id.
        let honest_path = tmp.path().join("honest.snap");
        let info = bundle_with_base(&honest_path, &honest, &id, n);
        let bundle = Bundle::open(&honest_path).unwrap();
        let base = ensure_base(&cache, &bundle, &info).unwrap();
        assert_eq!(base, base_path(&cache, &id));
        assert_eq!(entries(), 1);
        let mut got = vec![0u8; 4 * CLUSTER_SIZE as usize];
        Disk::open(&base, true)
            .unwrap()
            .read_at(&mut got, 0)
            .unwrap();
        assert!(got[..CLUSTER_SIZE as usize].iter().all(|&b| b == 1));
        assert!(got[3 * CLUSTER_SIZE as usize..][..100]
            .iter()
            .all(|&b| b == 1));
        assert_eq!(find_base(&cache, &info).unwrap(), Some(base));
    }

    #[test]
    fn a_thin_bundle_carries_no_base_and_finds_it_by_content_id() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let image = cache.join("images/abc/rootfs.ext4");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        let f = File::create(&image).unwrap();
        f.set_len(8 * CLUSTER_SIZE).unwrap();
        f.write_all_at(&[3u8; 4096], CLUSTER_SIZE).unwrap();
        drop(f);
        let top = tmp.path().join("root.img");
        ferry_disk::create_layer(&top, &image, None).unwrap();
        Disk::open(&top, false)
            .unwrap()
            .write_at(b"mine", 5 * CLUSTER_SIZE)
            .unwrap();
        let write = |thin: bool| {
            let mut w = BundleWriter::new(Vec::new()).unwrap();
            let info = write_sections(&cache, &mut w, &top, thin).unwrap();
            let has_base = w.sections().iter().any(|s| s.kind == SectionKind::DiskBase);
            (info, has_base)
        };
        let (full, full_has_base) = write(false);
        let (thin, thin_has_base) = write(true);
        assert!(full_has_base && !thin_has_base);
        assert!(thin.thin && !full.thin);
        assert_eq!(thin.base_id, full.base_id, "one content id either way");
        assert_eq!(thin.top_clusters, 1);
        assert_eq!(
            thin.base_cache_path.as_deref(),
            Some("images/abc/rootfs.ext4")
        );
        // This host encoded the base: found where it lies.
        assert_eq!(find_base(&cache, &thin).unwrap(), Some(image.clone()));
        // Without the record, the named cached image is checked by content.
        std::fs::remove_dir_all(cache.join("encoded-bases")).unwrap();
        assert_eq!(find_base(&cache, &thin).unwrap(), Some(image.clone()));
        // A different file at that name is not the base.
        std::fs::remove_dir_all(cache.join("encoded-bases")).unwrap();
        std::fs::write(&image, b"another image").unwrap();
        assert_eq!(find_base(&cache, &thin).unwrap(), None);
        // Another host's empty cache has nothing.
        assert_eq!(
            find_base(&tmp.path().join("elsewhere"), &thin).unwrap(),
            None
        );
    }
}
