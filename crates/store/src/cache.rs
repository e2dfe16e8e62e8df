//! A host-wide cache of verified chunks, shared by every VM and every ferry
//! process, so restoring a VM whose chunks another restore already fetched
//! costs no transfer.
//!
//! # Layout under its directory
//!
//! ```text
//! chunks/SHA256   a chunk as stored in the bucket (zstd); its mtime is when
//!                 it was last used
//! pins/PID-TAG    one SHA-256 a line: chunks process PID still needs
//! lock            flock'd: exclusively while evicting, shared while pinning
//! ```
//!
//! Every read is checked against the chunk's name, so a file damaged on disk
//! (or torn by a crash: nothing is fsync'd) is dropped, never handed out.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::chunk;
use crate::location::is_digest;
use crate::manifest::{ChunkRef, StoreManifest};
use crate::{Remote, StoreError};

/// Default size limit, 4 GiB.
pub const DEFAULT_LIMIT: u64 = 4 << 30;

/// Temp files older than this are left over from a crash and removed.
const STALE_TEMP: Duration = Duration::from_secs(3600);

const TEMP_PREFIX: &str = ".tmp-";

/// Tells apart the pins of one process.
static PIN_TAG: AtomicU64 = AtomicU64::new(0);

/// A directory of verified chunks with a size limit, evicting the least
/// recently used chunks that no running process has pinned.
#[derive(Debug, Clone)]
pub struct ChunkCache {
    dir: PathBuf,
    limit: u64,
}

/// Chunks one process needs kept; unpinned when dropped.
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
}

/// One chunk file found on disk.
struct Cached {
    name: String,
    size: u64,
    used: SystemTime,
}

fn check_digest(sha: &str) -> Result<(), StoreError> {
    if is_digest(sha) {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!("{sha:?} is not a chunk name")))
    }
}

fn make_dir(path: &Path) -> Result<(), StoreError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(StoreError::io(format!("create {}", path.display())))
}

/// Takes the cache's lock (`op` is `LOCK_EX` or `LOCK_SH`), held until the
/// returned file is closed.
fn lock(dir: &Path, op: libc::c_int) -> Result<File, StoreError> {
    let path = dir.join("lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(StoreError::io(format!("open {}", path.display())))?;
    loop {
        // SAFETY: flock takes a descriptor by value and touches no memory;
        // `f` owns it and keeps it open across the call.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(f);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(StoreError::io(format!("lock {}", path.display()))(e));
        }
    }
}

/// Whether process `pid` is still running (seen from this pid namespace, as
/// the runtime's own process checks see it).
fn alive(pid: libc::pid_t) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes `path` if it is a temp file left over from a crash.
fn remove_if_stale_temp(path: &Path, name: &str, md: &fs::Metadata) {
    let old = md
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age > STALE_TEMP);
    if name.starts_with(TEMP_PREFIX) && old {
        let _ = fs::remove_file(path);
    }
}

/// Writes `bytes` to `dest` through a temp file in its directory, so readers
/// see all of it or none.
fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = dest.parent().expect("cache files are in a directory");
    let ctx = || format!("write {}", dest.display());
    // tempfile creates it 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(StoreError::io(ctx()))?;
    tmp.write_all(bytes).map_err(StoreError::io(ctx()))?;
    tmp.persist(dest)
        .map_err(|e| StoreError::io(ctx())(e.error))?;
    Ok(())
}

impl ChunkCache {
    /// Opens (creating) the cache at `dir` holding at most `limit` bytes of chunks
    /// (beyond that only by chunks that running VMs still need).
    pub fn open(dir: &Path, limit: u64) -> Result<ChunkCache, StoreError> {
        make_dir(dir)?;
        make_dir(&dir.join("chunks"))?;
        make_dir(&dir.join("pins"))?;
        Ok(ChunkCache {
            dir: dir.to_path_buf(),
            limit,
        })
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Keeps the manifest `bytes` named `digest`, for a restoring VMM to read back.
    pub fn put_manifest(&self, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check_digest(digest)?;
        make_dir(&self.dir.join("manifests"))?;
        write_atomically(&self.dir.join("manifests").join(digest), bytes)
    }

    /// The manifest named `digest` kept here, checked against its name like
    /// one fetched.
    pub fn manifest(&self, digest: &str) -> Result<StoreManifest, StoreError> {
        check_digest(digest)?;
        let path = self.dir.join("manifests").join(digest);
        let bytes = fs::read(&path).map_err(StoreError::io(format!("read {}", path.display())))?;
        StoreManifest::decode(&bytes, digest)
    }

    fn chunk_path(&self, sha: &str) -> PathBuf {
        self.dir.join("chunks").join(sha)
    }

    /// The decoded bytes of chunk `r` if the cache holds it (verified on every read by chunk::decode;
    /// a cached file that fails verification is deleted and None returned, never handed out). Marks it used.
    pub fn get(&self, r: &ChunkRef) -> Option<Vec<u8>> {
        if !is_digest(&r.sha256) {
            return None;
        }
        let path = self.chunk_path(&r.sha256);
        let mut f = File::open(&path).ok()?;
        let mut stored = Vec::new();
        f.read_to_end(&mut stored).ok()?;
        match chunk::decode(&stored, &r.sha256, r.len) {
            Ok(bytes) => {
                // Best effort: a chunk we cannot mark is merely evicted sooner.
                let _ = f.set_modified(SystemTime::now());
                Some(bytes)
            }
            Err(e) => {
                tracing::warn!("dropping a damaged cached chunk: {e}");
                // Only the file we read: another process may have just
                // replaced it with a good one.
                let same = match (f.metadata(), fs::symlink_metadata(&path)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    _ => false,
                };
                if same {
                    let _ = fs::remove_file(&path);
                }
                None
            }
        }
    }

    /// Writes chunk `sha` without evicting.
    fn write(&self, sha: &str, stored: &[u8]) -> Result<(), StoreError> {
        check_digest(sha)?;
        write_atomically(&self.chunk_path(sha), stored)
    }

    /// Stores the stored (zstd) form `stored` of chunk `sha` (caller has
    /// verified it) if the limit leaves room once unpinned chunks are
    /// evicted, least recently used first; returns whether it was stored.
    pub fn put(&self, sha: &str, stored: &[u8]) -> Result<bool, StoreError> {
        Ok(self.put_all(&[(sha, stored)])?[0])
    }

    /// [`Self::put`] for several chunks, in order, with one look at the
    /// cache. The room is made and each chunk written under the eviction
    /// lock, so the cache never holds more than its limit, whoever writes
    /// to it.
    fn put_all(&self, chunks: &[(&str, &[u8])]) -> Result<Vec<bool>, StoreError> {
        for (sha, _) in chunks {
            check_digest(sha)?;
        }
        let _lock = lock(&self.dir, libc::LOCK_EX)?;
        let mut shelf = self.shelf()?;
        let mut kept = Vec::with_capacity(chunks.len());
        for &(sha, stored) in chunks {
            if shelf.names.contains(sha) {
                kept.push(true);
                continue;
            }
            let len = stored.len() as u64;
            // Room only if evicting every unpinned chunk would make it.
            let room = self
                .limit
                .checked_sub(len)
                .filter(|&target| shelf.total - shelf.evictable_bytes <= target);
            let Some(target) = room else {
                kept.push(false);
                continue;
            };
            self.evict_from(&mut shelf, target)?;
            self.write(sha, stored)?;
            shelf.add(sha, len);
            kept.push(true);
        }
        Ok(kept)
    }

    /// The decoded bytes of every chunk in `refs`, in order: cache hits read locally,
    /// the misses fetched from `remote` in one parallel batch (Remote::get_all), each verified
    /// with chunk::decode before it is cached or returned (a chunk the store lacks is
    /// StoreError::Corrupt "a chunk the manifest names is missing: ..." as in pull.rs).
    /// Returns also how many stored bytes were fetched from the remote (0 when all hit).
    ///
    /// A chunk named twice is read or fetched once. Failing to write the cache
    /// does not fail the fetch: the bytes are good, only the next fetch is slower.
    pub fn fetch(
        &self,
        remote: &Remote,
        refs: &[ChunkRef],
    ) -> Result<(Vec<Vec<u8>>, u64), StoreError> {
        for r in refs {
            check_digest(&r.sha256)?;
        }
        let mut out: Vec<Option<Vec<u8>>> = vec![None; refs.len()];
        // Where each (sha, len) first appears; repeats are copied from there.
        let mut first: HashMap<(&str, u64), usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize)> = Vec::new();
        let mut misses: Vec<usize> = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            match first.entry((r.sha256.as_str(), r.len)) {
                Entry::Occupied(e) => repeats.push((i, *e.get())),
                Entry::Vacant(e) => {
                    e.insert(i);
                    match self.get(r) {
                        Some(bytes) => out[i] = Some(bytes),
                        None => misses.push(i),
                    }
                }
            }
        }

        let mut fetched = 0;
        if !misses.is_empty() {
            let wanted: Vec<&ChunkRef> = misses.iter().map(|&i| &refs[i]).collect();
            let mut stored: Vec<Vec<u8>> = Vec::with_capacity(wanted.len());
            // All verified before any is cached.
            chunk::fetch_verified(remote, &wanted, |k, s, bytes| {
                fetched += s.len() as u64;
                stored.push(s);
                out[misses[k]] = Some(bytes);
                Ok(())
            })?;
            let new: Vec<(&str, &[u8])> = wanted
                .iter()
                .zip(&stored)
                .map(|(r, s)| (r.sha256.as_str(), s.as_slice()))
                .collect();
            match self.put_all(&new) {
                Ok(kept) if kept.iter().all(|&k| k) => {}
                Ok(_) => {
                    tracing::debug!("some chunks not cached: the cache is full of pinned chunks")
                }
                Err(e) => tracing::warn!("cannot cache fetched chunks: {e}"),
            }
        }
        for (i, f) in repeats {
            out[i] = out[f].clone();
        }
        let out = out
            .into_iter()
            .map(|b| b.expect("every chunk read or fetched"))
            .collect();
        Ok((out, fetched))
    }

    /// Pins `shas` for this process until the returned Pin is dropped (or the process dies).
    pub fn pin(&self, shas: &[String]) -> Result<Pin, StoreError> {
        let tag = PIN_TAG.fetch_add(1, Ordering::Relaxed);
        let pin = Pin {
            path: self
                .dir
                .join("pins")
                .join(format!("{}-{tag}", std::process::id())),
        };
        pin.set(shas)?;
        Ok(pin)
    }

    /// Every chunk file, with temp files from crashes removed on the way.
    fn scan(&self) -> Result<Vec<Cached>, StoreError> {
        let dir = self.dir.join("chunks");
        let ctx = || format!("read {}", dir.display());
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(ctx()))? {
            let entry = entry.map_err(StoreError::io(ctx()))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let md = match entry.metadata() {
                Ok(md) => md,
                // Evicted or replaced meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(ctx())(e)),
            };
            if !is_digest(&name) {
                remove_if_stale_temp(&entry.path(), &name, &md);
                continue;
            }
            if md.is_file() {
                found.push(Cached {
                    name,
                    size: md.len(),
                    used: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(found)
    }

    /// The chunks live processes have pinned; deletes the pins of dead ones.
    fn live_pins(&self) -> Result<HashSet<String>, StoreError> {
        let dir = self.dir.join("pins");
        let ctx = || format!("read {}", dir.display());
        let mut pinned = HashSet::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(ctx()))? {
            let entry = entry.map_err(StoreError::io(ctx()))?;
            let path = entry.path();
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let pid = name
                .split_once('-')
                .and_then(|(pid, _)| pid.parse::<libc::pid_t>().ok())
                // 0 and negative pids name process groups, not a process.
                .filter(|&pid| pid > 0);
            let Some(pid) = pid else {
                if let Ok(md) = entry.metadata() {
                    remove_if_stale_temp(&path, &name, &md);
                }
                continue;
            };
            if !alive(pid) {
                let _ = fs::remove_file(&path);
                continue;
            }
            match fs::read_to_string(&path) {
                Ok(text) => pinned.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| is_digest(l))
                        .map(str::to_string),
                ),
                // Unpinned meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("read {}", path.display()))(e)),
            }
        }
        Ok(pinned)
    }

    /// Total bytes of chunk files now.
    pub fn size(&self) -> Result<u64, StoreError> {
        Ok(self.scan()?.iter().map(|c| c.size).sum())
    }

    /// Removes the least recently used chunks no live pin names until the total is at most the limit;
    /// returns (removed count, bytes left). Public for `ferry gc`-like callers and tests.
    pub fn evict(&self) -> Result<(u64, u64), StoreError> {
        // Exclusive: pins written meanwhile wait, so none is missed.
        let _lock = lock(&self.dir, libc::LOCK_EX)?;
        let mut shelf = self.shelf()?;
        let removed = self.evict_from(&mut shelf, self.limit)?;
        Ok((removed, shelf.total))
    }

    /// The chunks on disk as eviction sees them. The caller holds the
    /// eviction lock.
    fn shelf(&self) -> Result<Shelf, StoreError> {
        let mut chunks = self.scan()?;
        chunks.sort_by(|a, b| (a.used, &a.name).cmp(&(b.used, &b.name)));
        let mut shelf = Shelf {
            pinned: self.live_pins()?,
            ..Shelf::default()
        };
        for c in chunks {
            shelf.total += c.size;
            shelf.names.insert(c.name.clone());
            if !shelf.pinned.contains(&c.name) {
                shelf.evictable_bytes += c.size;
                shelf.evictable.push_back(c);
            }
        }
        Ok(shelf)
    }

    /// Removes least recently used unpinned chunks of `shelf` until at most
    /// `target` bytes are left (or only pinned ones); returns how many.
    fn evict_from(&self, shelf: &mut Shelf, target: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        while shelf.total > target {
            let Some(c) = shelf.evictable.pop_front() else {
                break;
            };
            // Readers that have it open keep reading it: unlinking is safe.
            match fs::remove_file(self.chunk_path(&c.name)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::io(format!("evict chunk {}", c.name))(e));
                }
            }
            shelf.total -= c.size;
            shelf.evictable_bytes -= c.size;
            shelf.names.remove(&c.name);
        }
        Ok(removed)
    }
}

/// The chunks of a cache as an eviction sees them.
#[derive(Default)]
struct Shelf {
    /// Bytes of all chunk files.
    total: u64,
    /// Every chunk there.
    names: HashSet<String>,
    /// The chunks live processes have pinned (there or still to come).
    pinned: HashSet<String>,
    /// The unpinned ones, least recently used first.
    evictable: VecDeque<Cached>,
    /// Their bytes.
    evictable_bytes: u64,
}

impl Shelf {
    /// A chunk just written: the most recently used.
    fn add(&mut self, sha: &str, size: u64) {
        self.total += size;
        self.names.insert(sha.to_string());
        if self.pinned.contains(sha) {
            return;
        }
        self.evictable_bytes += size;
        self.evictable.push_back(Cached {
            name: sha.to_string(),
            size,
            used: SystemTime::now(),
        });
    }
}

impl Pin {
    /// Replaces the pinned set (e.g. fewer chunks once they are in place).
    pub fn set(&self, shas: &[String]) -> Result<(), StoreError> {
        for sha in shas {
            check_digest(sha)?;
        }
        let mut text = String::with_capacity(shas.len() * 65);
        for sha in shas {
            text.push_str(sha);
            text.push('\n');
        }
        let pins = self.path.parent().expect("a pin is in pins/");
        let dir = pins.parent().expect("pins/ is in the cache");
        // Shared: pins may be written together, but not while an eviction
        // that has already read them is removing chunks.
        let _lock = lock(dir, libc::LOCK_SH)?;
        write_atomically(&self.path, text.as_bytes())
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;
    use crate::StoreUrl;

    fn noise(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect()
    }

    /// A chunk: its ref, decoded bytes and stored form.
    fn chunk_of(seed: u32) -> (ChunkRef, Vec<u8>, Vec<u8>) {
        let bytes = noise(seed, 10_000);
        let r = ChunkRef {
            at: 0,
            len: bytes.len() as u64,
            sha256: chunk::digest(&bytes),
        };
        let stored = chunk::encode(&bytes).unwrap();
        (r, bytes, stored)
    }

    fn set_used(cache: &ChunkCache, sha: &str, t: SystemTime) {
        File::options()
            .write(true)
            .open(cache.chunk_path(sha))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    fn long_ago(secs: u64) -> SystemTime {
        SystemTime::now() - Duration::from_secs(10_000) + Duration::from_secs(secs)
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_put_chunk_reads_back_and_a_damaged_one_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(tmp.path(), DEFAULT_LIMIT).unwrap();
        let (r, bytes, stored) = chunk_of(1);
        assert_eq!(cache.get(&r), None);
        cache.put(&r.sha256, &stored).unwrap();
        assert_eq!(cache.get(&r).unwrap(), bytes);
        assert_eq!(cache.size().unwrap(), stored.len() as u64);

        // Wrong length asked: refused, not handed out.
        let short = ChunkRef {
            len: 10,
            ..r.clone()
        };
        assert_eq!(cache.get(&short), None);

        cache.put(&r.sha256, &stored).unwrap();
        let (_, _, other) = chunk_of(2);
        fs::write(cache.chunk_path(&r.sha256), &other).unwrap();
        assert_eq!(cache.get(&r), None);
        assert!(!cache.chunk_path(&r.sha256).exists());

        assert_eq!(
            cache.put("../escape", &stored).unwrap_err().code(),
            "BUNDLE_CORRUPT"
        );
        let bad = ChunkRef {
            sha256: "../lock".into(),
            ..r
        };
        assert_eq!(cache.get(&bad), None);
    }

    #[test]
    fn eviction_keeps_the_most_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let c: Vec<_> = (0..5).map(chunk_of).collect();
        let s = c[0].2.len() as u64;
        assert!(c.iter().all(|(_, _, st)| st.len() as u64 == s));
        let cache = ChunkCache::open(tmp.path(), 3 * s).unwrap();
        for (i, (r, _, st)) in c.iter().enumerate().take(3) {
            cache.put(&r.sha256, st).unwrap();
            set_used(&cache, &r.sha256, long_ago(i as u64 * 10));
        }
        // c0 was put first but is used now.
        assert!(cache.get(&c[0].0).is_some());
        cache.put(&c[3].0.sha256, &c[3].2).unwrap();
        assert_eq!(cache.size().unwrap(), 3 * s);
        assert_eq!(cache.get(&c[1].0), None, "the least recently used goes");
        set_used(&cache, &c[3].0.sha256, long_ago(100));
        cache.put(&c[4].0.sha256, &c[4].2).unwrap();

        assert!(cache.size().unwrap() <= cache.limit());
        assert_eq!(cache.get(&c[2].0), None);
        for i in [0, 3, 4] {
            assert_eq!(cache.get(&c[i].0).unwrap(), c[i].1, "chunk {i}");
        }
        assert_eq!(cache.evict().unwrap(), (0, 3 * s));

        // Ties go by name.
        for (r, _, _) in &c {
            if cache.chunk_path(&r.sha256).exists() {
                set_used(&cache, &r.sha256, long_ago(0));
            }
        }
        let mut kept: Vec<&str> = [0, 3, 4].iter().map(|&i| c[i].0.sha256.as_str()).collect();
        kept.sort();
        let small = ChunkCache::open(tmp.path(), s).unwrap();
        assert_eq!(small.evict().unwrap(), (2, s));
        assert!(small.chunk_path(kept[2]).exists());
    }

    #[test]
    fn pinned_chunks_survive_eviction_until_unpinned() {
        let tmp = tempfile::tempdir().unwrap();
        let c: Vec<_> = (10..13).map(chunk_of).collect();
        let s = c[0].2.len() as u64;
        let cache = ChunkCache::open(tmp.path(), 2 * s).unwrap();
        let pin = cache.pin(&[c[0].0.sha256.clone()]).unwrap();
        assert_eq!(
            fs::read_to_string(&pin.path).unwrap(),
            format!("{}\n", c[0].0.sha256)
        );
        cache.put(&c[0].0.sha256, &c[0].2).unwrap();
        set_used(&cache, &c[0].0.sha256, long_ago(0));
        cache.put(&c[1].0.sha256, &c[1].2).unwrap();
        set_used(&cache, &c[1].0.sha256, long_ago(10));
        cache.put(&c[2].0.sha256, &c[2].2).unwrap();
        assert!(cache.get(&c[0].0).is_some(), "pinned, though oldest");
        assert_eq!(cache.get(&c[1].0), None);
        set_used(&cache, &c[0].0.sha256, long_ago(0));

        // Beyond the limit only by what is pinned.
        let tight = ChunkCache::open(tmp.path(), 0).unwrap();
        assert_eq!(tight.evict().unwrap(), (1, s));
        assert!(tight.get(&c[0].0).is_some());
        set_used(&cache, &c[0].0.sha256, long_ago(0));

        let pin_path = pin.path.clone();
        drop(pin);
        assert!(!pin_path.exists());
        assert_eq!(tight.evict().unwrap(), (1, 0));
        assert_eq!(tight.get(&c[0].0), None);

        // A narrowed pin keeps only what it still names.
        cache.put(&c[0].0.sha256, &c[0].2).unwrap();
        cache.put(&c[1].0.sha256, &c[1].2).unwrap();
        let pin = cache
            .pin(&[c[0].0.sha256.clone(), c[1].0.sha256.clone()])
            .unwrap();
        pin.set(std::slice::from_ref(&c[1].0.sha256)).unwrap();
        assert_eq!(tight.evict().unwrap(), (1, s));
        assert!(tight.get(&c[1].0).is_some());
        assert!(pin.set(&["nope".into()]).is_err());
    }

    #[test]
    fn a_cache_full_of_pinned_chunks_takes_no_more() {
        let tmp = tempfile::tempdir().unwrap();
        let c: Vec<_> = (20..23).map(chunk_of).collect();
        let s = c[0].2.len() as u64;
        let cache = ChunkCache::open(tmp.path(), 2 * s + s / 2).unwrap();
        let _pin = cache
            .pin(&[c[0].0.sha256.clone(), c[1].0.sha256.clone()])
            .unwrap();
        assert!(cache.put(&c[0].0.sha256, &c[0].2).unwrap());
        assert!(cache.put(&c[1].0.sha256, &c[1].2).unwrap());
        assert!(
            !cache.put(&c[2].0.sha256, &c[2].2).unwrap(),
            "no room without evicting a pinned chunk"
        );
        assert!(cache.size().unwrap() <= cache.limit());
        assert!(cache.get(&c[0].0).is_some() && cache.get(&c[1].0).is_some());
        assert_eq!(cache.get(&c[2].0), None);
    }

    #[test]
    fn a_chunk_written_in_a_batch_stays_pinned_for_the_rest_of_it() {
        let tmp = tempfile::tempdir().unwrap();
        let c: Vec<_> = (30..32).map(chunk_of).collect();
        let s = c[0].2.len().max(c[1].2.len()) as u64;
        let cache = ChunkCache::open(tmp.path(), s + s / 2).unwrap();
        // Pinned before it is here, as a restoring VMM pins its memory.
        let _pin = cache.pin(std::slice::from_ref(&c[0].0.sha256)).unwrap();
        let kept = cache
            .put_all(&[(&c[0].0.sha256, &c[0].2), (&c[1].0.sha256, &c[1].2)])
            .unwrap();
        assert_eq!(kept, vec![true, false], "no room beside the pinned chunk");
        assert!(cache.get(&c[0].0).is_some());
        assert!(cache.size().unwrap() <= cache.limit());
    }

    #[test]
    fn pins_of_dead_processes_are_ignored_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(tmp.path(), 0).unwrap();
        let (r, _, stored) = chunk_of(20);
        cache.write(&r.sha256, &stored).unwrap();

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let exited = child.id();
        child.wait().unwrap();
        let pins = tmp.path().join("pins");
        let dead = [pins.join("999999999-0"), pins.join(format!("{exited}-3"))];
        for p in &dead {
            fs::write(p, format!("{}\n", r.sha256)).unwrap();
        }
        // Not a pin at all: names no process, and pins nothing.
        fs::write(pins.join("0-1"), format!("{}\n", r.sha256)).unwrap();

        assert_eq!(cache.evict().unwrap(), (1, 0));
        assert_eq!(cache.get(&r), None);
        for p in &dead {
            assert!(!p.exists(), "{} is left", p.display());
        }
    }

    #[test]
    fn stale_temp_files_go_and_do_not_count() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(tmp.path(), DEFAULT_LIMIT).unwrap();
        let chunks = tmp.path().join("chunks");
        let old = chunks.join(".tmp-old");
        let new = chunks.join(".tmp-new");
        fs::write(&old, b"partial").unwrap();
        fs::write(&new, b"partial").unwrap();
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        assert_eq!(cache.size().unwrap(), 0);
        assert!(!old.exists());
        assert!(new.exists(), "may still be being written");
    }

    #[test]
    fn fetch_uses_the_cache_and_refuses_what_does_not_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(tmp.path(), DEFAULT_LIMIT).unwrap();
        let url = StoreUrl::parse("s3://fleet/vms").unwrap();
        let remote = Remote::with_object_store(&url, Arc::new(InMemory::new())).unwrap();
        let (a, a_bytes, a_stored) = chunk_of(30);
        let (b, b_bytes, b_stored) = chunk_of(31);
        remote
            .put(&chunk::object_name(&a.sha256), a_stored.clone())
            .unwrap();
        remote
            .put(&chunk::object_name(&b.sha256), b_stored.clone())
            .unwrap();

        let refs = [a.clone(), b.clone(), a.clone()];
        let want = vec![a_bytes.clone(), b_bytes.clone(), a_bytes.clone()];
        let (got, fetched) = cache.fetch(&remote, &refs).unwrap();
        assert_eq!(got, want);
        assert_eq!(fetched, (a_stored.len() + b_stored.len()) as u64);
        assert_eq!(fs::read(cache.chunk_path(&a.sha256)).unwrap(), a_stored);

        let (got, fetched) = cache.fetch(&remote, &refs).unwrap();
        assert_eq!(got, want);
        assert_eq!(fetched, 0);
        assert_eq!(cache.fetch(&remote, &[]).unwrap(), (vec![], 0));

        // Stored under c's name: bytes that are not c.
        let (c, _, _) = chunk_of(32);
        remote
            .put(&chunk::object_name(&c.sha256), b_stored.clone())
            .unwrap();
        let e = cache.fetch(&remote, &[a.clone(), c.clone()]).unwrap_err();
        assert_eq!(e.code(), "BUNDLE_CORRUPT");
        assert!(!cache.chunk_path(&c.sha256).exists());

        let (d, _, _) = chunk_of(33);
        let e = cache.fetch(&remote, &[d.clone(), b]).unwrap_err();
        assert_eq!(e.code(), "BUNDLE_CORRUPT");
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!cache.chunk_path(&d.sha256).exists());
    }

    #[test]
    fn the_cache_is_private_to_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/cache");
        let cache = ChunkCache::open(&dir, DEFAULT_LIMIT).unwrap();
        let (r, _, stored) = chunk_of(40);
        cache.put(&r.sha256, &stored).unwrap();
        let pin = cache.pin(std::slice::from_ref(&r.sha256)).unwrap();
        for d in [
            tmp.path().join("a"),
            dir.clone(),
            dir.join("chunks"),
            dir.join("pins"),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        for f in [
            cache.chunk_path(&r.sha256),
            pin.path.clone(),
            dir.join("lock"),
        ] {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        assert_eq!(cache.dir(), dir);
    }
}
