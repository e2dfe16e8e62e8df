//! Filling a layer from elsewhere while its VM runs.
//!
//! A VM restored from a store starts before its own disk writes have
//! arrived: its layer is created empty, and each window of those writes is
//! placed before the guest first reads or writes anywhere in it, the rest in
//! the background. A cluster the layer already holds is never overwritten,
//! so placing a window again (after a crash lost the record of what was
//! placed) is harmless: what the guest wrote since wins.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::Disk;

/// Clusters of one window: `(disk offset, bytes)`, each a whole cluster of
/// the layer inside the window.
pub type Clusters = Vec<(u64, Vec<u8>)>;

/// Where the windows come from.
pub trait FillSource: Send + Sync {
    /// Window size in bytes; windows start at its multiples.
    fn window(&self) -> u64;
    /// Starts of the windows to place.
    fn windows(&self) -> Vec<u64>;
    /// The clusters of the window at `start`, checked before they are
    /// returned (they are written into the disk as they are).
    fn fetch(&self, start: u64) -> io::Result<Clusters>;
    /// The clusters of several windows (the background's batches).
    fn fetch_many(&self, starts: &[u64]) -> io::Result<Vec<Clusters>> {
        starts.iter().map(|&s| self.fetch(s)).collect()
    }
    /// Called once every window is in place and the disk flushed, before
    /// the fill counts as complete: what the source must still do (make
    /// what it wrote below the layer durable, publish it). An error leaves
    /// the fill incomplete; [`Filler::complete`] calls it again.
    fn finish(&self) -> io::Result<()> {
        Ok(())
    }
    /// Called after each window placed, and once more when every window is
    /// in place and durable.
    fn report(&self, _stats: &FillStats) {}
}

/// What a fill has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FillStats {
    /// Windows to place in all.
    pub windows: u64,
    /// Placed because the guest reached them first.
    pub demand: u64,
    /// Placed by the background (or by [`Filler::complete`]).
    pub background: u64,
    /// Every window is in place and the disk flushed.
    pub complete: bool,
}

#[derive(Debug)]
struct State {
    pending: BTreeSet<u64>,
    stats: FillStats,
}

/// A disk being filled from a [`FillSource`]: call [`Filler::ensure`] before
/// each access.
pub struct Filler {
    disk: Arc<Disk>,
    source: Arc<dyn FillSource>,
    window: u64,
    state: Mutex<State>,
    /// Held while a window is placed: a window is placed once, and never
    /// while another placement of it is half done.
    placing: Mutex<()>,
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filler")
            .field("window", &self.window)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Filler {
    /// A fill of `disk` (a writable layer) with `source`'s windows.
    pub fn new(disk: Arc<Disk>, source: Arc<dyn FillSource>) -> io::Result<Arc<Filler>> {
        let window = source.window();
        if !matches!(&*disk, Disk::Layer(_)) || disk.read_only() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only a writable layer can be filled",
            ));
        }
        if window == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a fill's window size is zero",
            ));
        }
        let pending: BTreeSet<u64> = source
            .windows()
            .into_iter()
            .filter(|w| w % window == 0 && *w < disk.size())
            .collect();
        let stats = FillStats {
            windows: pending.len() as u64,
            complete: pending.is_empty(),
            ..FillStats::default()
        };
        Ok(Arc::new(Filler {
            disk,
            source,
            window,
            state: Mutex::new(State { pending, stats }),
            placing: Mutex::new(()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What was done so far.
    pub fn stats(&self) -> FillStats {
        self.state().stats.clone()
    }

    /// Whether every window is in place.
    pub fn is_complete(&self) -> bool {
        self.state().stats.complete
    }

    /// Places every window `[offset, offset + len)` reaches that is not in
    /// place yet. An error leaves those windows pending (a later access
    /// tries again).
    pub fn ensure(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.window * self.window;
        let end = offset.saturating_add(len);
        let wanted: Vec<u64> = {
            let st = self.state();
            if st.pending.is_empty() {
                return Ok(());
            }
            st.pending.range(first..end).copied().collect()
        };
        for w in wanted {
            self.place(w, None, true)?;
        }
        Ok(())
    }

    /// Places window `w` with `fetched` clusters (or fetched now) unless it
    /// is in place already.
    fn place(&self, w: u64, fetched: Option<Clusters>, demand: bool) -> io::Result<()> {
        let _placing = self.placing.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.state().pending.contains(&w) {
            return Ok(());
        }
        let clusters = match fetched {
            Some(c) => c,
            None => self.source.fetch(w)?,
        };
        for (offset, bytes) in &clusters {
            if *offset / self.window * self.window != w {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a cluster at {offset} is outside the window at {w}"),
                ));
            }
            self.disk.fill_cluster(*offset, bytes)?;
        }
        let last = {
            let mut st = self.state();
            st.pending.remove(&w);
            if demand {
                st.stats.demand += 1;
            } else {
                st.stats.background += 1;
            }
            st.pending.is_empty()
        };
        if last {
            // A failed finish must not fail the access that placed the last
            // window: [`Filler::complete`] tries it again and says why.
            if self.finish().is_err() {
                self.source.report(&self.stats());
            }
            return Ok(());
        }
        self.source.report(&self.stats());
        Ok(())
    }

    /// Once every window is placed: flushes the disk, lets the source
    /// finish, and only then counts the fill complete.
    fn finish(&self) -> io::Result<()> {
        // Durable before anyone is told: the record of what is still to
        // fetch is removed on the strength of it.
        self.disk.flush()?;
        self.source.finish()?;
        self.state().stats.complete = true;
        self.source.report(&self.stats());
        Ok(())
    }

    /// Places every window still pending, `batch` at a time, fetched
    /// together. Used before anything reads the disk whole (a snapshot,
    /// a fork, a migration) and by the background.
    pub fn complete(&self) -> io::Result<()> {
        const BATCH: usize = 8;
        loop {
            let next: Vec<u64> = self.state().pending.iter().take(BATCH).copied().collect();
            if next.is_empty() {
                // Placed, but the source may not have finished yet.
                let _placing = self.placing.lock().unwrap_or_else(PoisonError::into_inner);
                return if self.is_complete() {
                    Ok(())
                } else {
                    self.finish()
                };
            }
            let fetched = self.source.fetch_many(&next)?;
            if fetched.len() != next.len() {
                return Err(io::Error::other("the fill's source left windows out"));
            }
            for (w, clusters) in next.into_iter().zip(fetched) {
                self.place(w, Some(clusters), false)?;
            }
        }
    }

    /// Completes the fill on a thread of its own after `delay` (the guest's
    /// first seconds keep the network to themselves). `failed` hears why it
    /// stopped early; the windows left are then placed on first access.
    pub fn spawn_background(
        self: &Arc<Self>,
        delay: Duration,
        failed: impl FnOnce(&io::Error) + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("disk-fill".into())
            .spawn(move || {
                std::thread::sleep(delay);
                if let Err(e) = me.complete() {
                    failed(&e);
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create_layer, CLUSTER_SIZE};
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    const WINDOW: u64 = 4 * CLUSTER_SIZE;

    /// Windows of clusters filled with their own window's number.
    struct Source {
        windows: BTreeMap<u64, Clusters>,
        fetches: AtomicU64,
        fail: bool,
        reports: Mutex<Vec<FillStats>>,
        /// Finishes that fail before one succeeds.
        failing_finishes: AtomicU64,
    }

    impl FillSource for Source {
        fn window(&self) -> u64 {
            WINDOW
        }
        fn windows(&self) -> Vec<u64> {
            self.windows.keys().copied().collect()
        }
        fn fetch(&self, start: u64) -> io::Result<Clusters> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(io::Error::other("store away"));
            }
            Ok(self.windows[&start].clone())
        }
        fn finish(&self) -> io::Result<()> {
            let left = self.failing_finishes.load(Ordering::SeqCst);
            if left > 0 {
                self.failing_finishes.store(left - 1, Ordering::SeqCst);
                return Err(io::Error::other("cannot publish"));
            }
            Ok(())
        }
        fn report(&self, stats: &FillStats) {
            self.reports.lock().unwrap().push(stats.clone());
        }
    }

    fn setup(dir: &Path, fail: bool) -> (Arc<Disk>, Arc<Source>) {
        let base = dir.join("base.img");
        std::fs::write(&base, vec![0xBBu8; (4 * WINDOW) as usize]).unwrap();
        let top = dir.join("top.layer");
        create_layer(&top, Path::new("base.img"), None).unwrap();
        let disk = Arc::new(Disk::open(&top, false).unwrap());
        // Windows 0 and 2 have writes: their first two clusters.
        let mut windows = BTreeMap::new();
        for w in [0u64, 2] {
            let at = w * WINDOW;
            windows.insert(
                at,
                vec![
                    (at, vec![w as u8 + 1; CLUSTER_SIZE as usize]),
                    (at + CLUSTER_SIZE, vec![w as u8 + 1; CLUSTER_SIZE as usize]),
                ],
            );
        }
        let source = Arc::new(Source {
            windows,
            fetches: AtomicU64::new(0),
            fail,
            reports: Mutex::new(Vec::new()),
            failing_finishes: AtomicU64::new(0),
        });
        (disk, source)
    }

    fn read(disk: &Disk, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, at).unwrap();
        buf
    }

    #[test]
    fn a_window_is_placed_on_first_access_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, source) = setup(dir.path(), false);
        let fill = Filler::new(Arc::clone(&disk), source.clone()).unwrap();
        assert_eq!(fill.stats().windows, 2);
        // Window 1 has no writes: nothing fetched.
        fill.ensure(WINDOW, 512).unwrap();
        assert_eq!(source.fetches.load(Ordering::SeqCst), 0);
        fill.ensure(10, 512).unwrap();
        fill.ensure(CLUSTER_SIZE, 512).unwrap();
        assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(read(&disk, 0, 4), vec![1; 4]);
        assert_eq!(read(&disk, 2 * CLUSTER_SIZE, 4), vec![0xBB; 4], "below");
        let s = fill.stats();
        assert_eq!((s.demand, s.background, s.complete), (1, 0, false));
    }

    #[test]
    fn what_the_guest_wrote_after_a_window_arrived_survives_placing_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, source) = setup(dir.path(), false);
        let fill = Filler::new(Arc::clone(&disk), source.clone()).unwrap();
        fill.ensure(0, 512).unwrap();
        disk.write_at(&[9u8; 512], 0).unwrap();
        // A new fill (as after the VMM restarted) places window 0 again.
        let again = Filler::new(Arc::clone(&disk), source.clone()).unwrap();
        again.complete().unwrap();
        assert_eq!(read(&disk, 0, 512), vec![9; 512]);
        assert_eq!(read(&disk, 512, 4), vec![1; 4]);
        assert_eq!(read(&disk, 2 * WINDOW, 4), vec![3; 4]);
        assert!(again.is_complete());
        let last = source.reports.lock().unwrap().last().cloned().unwrap();
        assert!(last.complete && last.background == 2);
    }

    #[test]
    fn a_failed_fetch_leaves_the_window_pending_and_the_disk_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, source) = setup(dir.path(), true);
        let fill = Filler::new(Arc::clone(&disk), source).unwrap();
        assert!(fill.ensure(0, 512).is_err());
        assert!(fill.ensure(0, 512).is_err(), "tried again");
        assert_eq!(read(&disk, 0, 4), vec![0xBB; 4]);
        assert!(!fill.is_complete());
    }

    #[test]
    fn the_background_completes_the_fill_and_flushes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, source) = setup(dir.path(), false);
        let fill = Filler::new(Arc::clone(&disk), source).unwrap();
        fill.spawn_background(Duration::ZERO, |e| panic!("{e}"))
            .unwrap()
            .join()
            .unwrap();
        assert!(fill.is_complete());
        drop(fill);
        drop(disk);
        // Reopened: the bitmap was written with the data.
        let disk = Disk::open(&dir.path().join("top.layer"), true).unwrap();
        assert_eq!(read(&disk, 2 * WINDOW + CLUSTER_SIZE, 4), vec![3; 4]);
    }

    #[test]
    fn a_failed_finish_keeps_the_fill_incomplete_until_it_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, source) = setup(dir.path(), false);
        source.failing_finishes.store(1, Ordering::SeqCst);
        let fill = Filler::new(Arc::clone(&disk), source.clone()).unwrap();
        fill.ensure(0, 512).unwrap();
        // The last window's access succeeds though its finish failed.
        fill.ensure(2 * WINDOW, 512).unwrap();
        assert_eq!(read(&disk, 2 * WINDOW, 4), vec![3; 4]);
        assert!(!fill.is_complete());
        assert!(!source.reports.lock().unwrap().last().unwrap().complete);
        fill.complete().unwrap();
        assert!(fill.is_complete());
        assert!(source.reports.lock().unwrap().last().unwrap().complete);
        assert_eq!(
            source.fetches.load(Ordering::SeqCst),
            2,
            "nothing fetched again"
        );
    }

    #[test]
    fn clusters_out_of_place_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = setup(dir.path(), false);
        assert!(disk.fill_cluster(10, &[1; 10]).is_err(), "unaligned");
        assert!(
            disk.fill_cluster(0, &[1; 10]).is_err(),
            "short, not at the end"
        );
        assert!(disk
            .fill_cluster(4 * WINDOW, &[1; CLUSTER_SIZE as usize])
            .is_err());
        let raw = Disk::open(&dir.path().join("base.img"), false).unwrap();
        assert!(raw.fill_cluster(0, &[1; CLUSTER_SIZE as usize]).is_err());
    }
}
