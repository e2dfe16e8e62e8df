//! Guest memory filled on first touch, through userfaultfd.
//!
//! A restore whose memory must be produced (decoded) rather than mapped
//! registers those guest ranges as missing. The first touch of a page, by a
//! vCPU, KVM or a device thread, blocks on a fault that a handler thread
//! resolves by asking the [`LazySource`] for the whole chunk holding it and
//! copying every piece of that chunk into place. Nothing is produced up front,
//! and chunks the guest never touches are never produced.
//!
//! Before the VM's memory is read as a whole (snapshot) or frozen (fork),
//! [`LazyMemory::populate_all`] fills what is left, so those paths see
//! ordinary anonymous memory.
//!
//! The pages faulted in the first seconds the guest runs are recorded: with
//! the source's own prefetch set they are what a snapshot of this VM stores
//! as its prefetch set. A source whose chunks come from far away (a store)
//! asks for the rest to be filled in the background once that window ends.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::uffd::{
    self, HostRegions, UffdioCopy, UffdioRange, UffdioRegister, UffdioZeropage, MSG_LEN,
    UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};
use crate::memory::PAGE_SIZE;
use crate::GuestMemoryMmap;

/// One produced chunk: bytes and where their pieces go.
#[derive(Debug, Default)]
pub struct Chunk {
    /// The chunk's bytes.
    pub bytes: Vec<u8>,
    /// (guest address, offset in `bytes`, length), page aligned.
    pub pieces: Vec<(u64, usize, usize)>,
}

/// Produces guest memory on demand, chunk by chunk.
pub trait LazySource: Send + Sync + std::fmt::Debug {
    /// Guest ranges (address, length; page aligned, inside guest RAM, not
    /// overlapping) whose contents come from this source.
    fn ranges(&self) -> Vec<(u64, u64)>;
    /// How many chunks there are.
    fn chunks(&self) -> usize;
    /// The chunk holding guest address `addr`, if any.
    fn chunk_of(&self, addr: u64) -> Option<usize>;
    /// Produces chunk `index`; its pieces must lie inside [`Self::ranges`].
    fn produce(&self, index: usize) -> io::Result<Chunk>;
    /// Chunks to put in place before the guest runs (what it is known to
    /// touch first); none by default.
    fn prefetch(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Guest ranges (page aligned) of the prefetch set, as recorded when the
    /// source was made; none by default.
    fn prefetch_ranges(&self) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// Threads filling the chunks nobody touched once the recording window
    /// is over; 0 (the default) leaves them for first touch.
    fn background(&self) -> usize {
        0
    }
    /// Told what happened: when the recording window ends and when every
    /// chunk is in place.
    fn report(&self, _stats: &LazyStats) {}
    /// Told that a fault could not be served: the process ends right after.
    fn failed(&self, _error: &io::Error) {}
}

/// What a lazily filled memory did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Bytes put in place.
    pub produced_bytes: u64,
    /// Bytes the source covers.
    pub total_bytes: u64,
    /// Page faults served by producing or waiting for a chunk.
    pub faults: u64,
    /// Chunks produced because a fault asked for them.
    pub demand_chunks: u64,
    /// Chunks put in place before the guest ran.
    pub prefetched_chunks: u64,
    /// Chunks put in place by the background fill.
    pub background_chunks: u64,
    /// Whether every chunk is in place.
    pub all_in_place: bool,
}

/// How long after the first fault the faulted pages are recorded.
const RECORD_WINDOW: Duration = Duration::from_secs(2);
/// When the guest faults nothing at all, the window ends this long after start.
const RECORD_IDLE: Duration = Duration::from_secs(5);
/// Most pages recorded (64 MiB of 4 KiB pages).
const RECORD_MAX_PAGES: usize = 16384;

/// Shared between the handle and the handler thread.
struct Inner {
    uffd: OwnedFd,
    source: Arc<dyn LazySource>,
    /// Where guest RAM is mapped here.
    regions: HostRegions,
    /// Which chunks are in place; the lock also serializes producing them.
    done: Mutex<Vec<bool>>,
    produced_bytes: AtomicU64,
    faults: AtomicU64,
    demand_chunks: AtomicU64,
    prefetched_chunks: AtomicU64,
    background_chunks: AtomicU64,
    /// Guest pages faulted while the recording window is open.
    touched: Mutex<Vec<u64>>,
    recording: AtomicBool,
    stop: AtomicBool,
}

impl Inner {
    /// Puts chunk `index` in place unless it already is; whether it did.
    fn fill(&self, index: usize) -> io::Result<bool> {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        if done.get(index).copied().unwrap_or(true) {
            return Ok(false);
        }
        let started = Instant::now();
        let chunk = self.source.produce(index)?;
        let produced = started.elapsed();
        self.place(&chunk)?;
        tracing::debug!(
            "lazy memory: chunk {index}: {} pieces, {} bytes, produced in {} us, in place after {} us",
            chunk.pieces.len(),
            chunk.bytes.len(),
            produced.as_micros(),
            started.elapsed().as_micros()
        );
        done[index] = true;
        Ok(true)
    }

    /// Produces `chunks` on `workers` threads and puts them in place (a
    /// fault meanwhile is served as usual); each placed chunk is counted in
    /// `counter`.
    fn prefill(&self, chunks: &[usize], workers: usize, counter: &AtomicU64) -> io::Result<()> {
        let next = AtomicU64::new(0);
        let workers = workers.min(chunks.len()).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| -> io::Result<()> {
                        while let Some(&index) =
                            chunks.get(next.fetch_add(1, Ordering::Relaxed) as usize)
                        {
                            if self.stop.load(Ordering::Relaxed) {
                                break;
                            }
                            if self.is_done(index) {
                                continue;
                            }
                            let chunk = self.source.produce(index)?;
                            let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
                            if !done.get(index).copied().unwrap_or(true) {
                                self.place(&chunk)?;
                                done[index] = true;
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        })
    }

    fn is_done(&self, index: usize) -> bool {
        let done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        done.get(index).copied().unwrap_or(true)
    }

    fn stats(&self) -> LazyStats {
        let all_in_place = self
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .all(|&d| d);
        LazyStats {
            produced_bytes: self.produced_bytes.load(Ordering::Relaxed),
            total_bytes: self.source.ranges().iter().map(|&(_, len)| len).sum(),
            faults: self.faults.load(Ordering::Relaxed),
            demand_chunks: self.demand_chunks.load(Ordering::Relaxed),
            prefetched_chunks: self.prefetched_chunks.load(Ordering::Relaxed),
            background_chunks: self.background_chunks.load(Ordering::Relaxed),
            all_in_place,
        }
    }

    /// Ends the recording window; starts the background fill the source asks for.
    fn end_recording(self: &Arc<Self>) {
        self.recording.store(false, Ordering::Relaxed);
        self.source.report(&self.stats());
        let workers = self.source.background();
        if workers == 0 {
            return;
        }
        let inner = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("ferry-lazy-fill".into())
            .spawn(move || {
                let started = Instant::now();
                let left: Vec<usize> = (0..inner.source.chunks())
                    .filter(|&i| !inner.is_done(i))
                    .collect();
                match inner.prefill(&left, workers, &inner.background_chunks) {
                    Ok(()) if !inner.stop.load(Ordering::Relaxed) => {
                        tracing::debug!(
                            "lazy memory: {} chunks filled in the background in {} ms",
                            left.len(),
                            started.elapsed().as_millis()
                        );
                        inner.source.report(&inner.stats());
                    }
                    Ok(()) => {}
                    // What is left is produced on first touch, which retries.
                    Err(e) => tracing::warn!("lazy memory: background fill stopped: {e}"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("lazy memory: no background fill: {e}");
        }
    }

    /// Copies a produced chunk's pieces into guest memory.
    fn place(&self, chunk: &Chunk) -> io::Result<()> {
        // Counted before the copies wake a faulting thread.
        self.produced_bytes.fetch_add(
            chunk.pieces.iter().map(|p| p.2 as u64).sum(),
            Ordering::Relaxed,
        );
        for &(guest, offset, len) in &chunk.pieces {
            let src = chunk
                .bytes
                .get(offset..offset + len)
                .ok_or_else(|| io::Error::other("chunk piece outside its bytes"))?;
            let dst = self
                .regions
                .host(guest)
                .filter(|_| {
                    (len as u64).is_multiple_of(PAGE_SIZE) && guest.is_multiple_of(PAGE_SIZE)
                })
                .ok_or_else(|| io::Error::other("chunk piece outside guest RAM"))?;
            self.copy(dst, src)?;
        }
        Ok(())
    }

    /// Copies `src` to host address `dst` page by page where the kernel
    /// reports pages already present (they keep their contents).
    fn copy(&self, dst: u64, src: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < src.len() {
            let mut c = UffdioCopy {
                dst: dst + done as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            match uffd::ioctl(&self.uffd, UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if c.copy > 0 {
                        done += c.copy as usize;
                    } else if c.copy == -(libc::EEXIST as i64) {
                        done += PAGE_SIZE as usize;
                    } else if c.copy == -(libc::EAGAIN as i64) {
                        continue;
                    } else {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Resolves one fault at host address `host`.
    fn resolve(&self, host: u64) -> io::Result<()> {
        let page = host & !(PAGE_SIZE - 1);
        let guest = self.regions.guest(page);
        tracing::trace!("lazy memory: fault at guest {:#x}", guest.unwrap_or(0));
        match guest.and_then(|g| self.source.chunk_of(g).map(|c| (g, c))) {
            Some((guest, index)) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                if self.recording.load(Ordering::Relaxed) {
                    let mut touched = self.touched.lock().unwrap_or_else(PoisonError::into_inner);
                    if touched.len() < RECORD_MAX_PAGES {
                        touched.push(guest);
                    }
                }
                if self.fill(index)? {
                    self.demand_chunks.fetch_add(1, Ordering::Relaxed);
                }
                // The copy woke the faulting thread unless another fill had
                // already put the page in place; waking again is harmless.
                let mut r = UffdioRange {
                    start: page,
                    len: PAGE_SIZE,
                };
                uffd::ioctl(&self.uffd, UFFDIO_WAKE, &mut r)
            }
            None => {
                // Registered but not produced by the source: zero.
                let mut z = UffdioZeropage {
                    range: UffdioRange {
                        start: page,
                        len: PAGE_SIZE,
                    },
                    mode: 0,
                    zeropage: 0,
                };
                match uffd::ioctl(&self.uffd, UFFDIO_ZEROPAGE, &mut z) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                    other => other,
                }
            }
        }
    }

    fn serve(self: &Arc<Self>) {
        let started = Instant::now();
        let mut first_fault: Option<Instant> = None;
        let mut file = match self.uffd.try_clone() {
            Ok(fd) => File::from(fd),
            Err(e) => {
                tracing::error!("lazy memory: {e}");
                return;
            }
        };
        let mut msg = [0u8; MSG_LEN];
        while !self.stop.load(Ordering::Relaxed) {
            if self.recording.load(Ordering::Relaxed) {
                let over = match first_fault {
                    Some(t) => t.elapsed() >= RECORD_WINDOW,
                    None => started.elapsed() >= RECORD_IDLE,
                };
                if over {
                    self.end_recording();
                }
            }
            // The timeout lets the thread notice `stop` and the window's end.
            if !uffd::poll_in(&self.uffd, 100) {
                continue;
            }
            first_fault.get_or_insert_with(Instant::now);
            match file.read(&mut msg) {
                Ok(MSG_LEN) => {}
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("lazy memory: reading faults: {e}");
                    return;
                }
            }
            let Some(host) = uffd::fault_address(&msg) else {
                continue;
            };
            if let Err(e) = self.resolve(host) {
                // The faulting thread would wait forever: the VM cannot go on.
                tracing::error!("lazy memory: filling guest page {host:#x}: {e}");
                self.source.failed(&e);
                std::process::abort();
            }
        }
    }
}

/// Whether this host lets the process use userfaultfd.
pub fn available() -> bool {
    // The descriptor (API handshake done, as a restore needs) is closed at once.
    uffd::open(0).is_ok()
}

/// Guest memory ranges filled on first touch; stops its handler thread when
/// dropped.
pub struct LazyMemory {
    inner: Arc<Inner>,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory")
            .field("produced_bytes", &self.produced_bytes())
            .finish()
    }
}

impl LazyMemory {
    /// Registers `source`'s ranges of `memory` (which must not be populated
    /// there yet), starts the handler thread, and puts the source's
    /// prefetch chunks in place before returning.
    pub fn start(memory: &GuestMemoryMmap, source: Arc<dyn LazySource>) -> io::Result<Self> {
        let uffd = uffd::open(0)?;
        let regions = HostRegions::of(memory)?;
        let chunks = source.chunks();
        let inner = Inner {
            uffd,
            source,
            regions,
            done: Mutex::new(vec![false; chunks]),
            produced_bytes: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            demand_chunks: AtomicU64::new(0),
            prefetched_chunks: AtomicU64::new(0),
            background_chunks: AtomicU64::new(0),
            touched: Mutex::new(Vec::new()),
            recording: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        };
        for (guest, len) in inner.source.ranges() {
            let inside = memory
                .find_region(GuestAddress(guest))
                .is_some_and(|r| guest + len <= r.start_addr().0 + r.len());
            let start = inner
                .regions
                .host(guest)
                .filter(|_| {
                    inside && guest.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE)
                })
                .ok_or_else(|| io::Error::other("lazy range outside guest RAM"))?;
            let mut reg = UffdioRegister {
                range: UffdioRange { start, len },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            uffd::ioctl(&inner.uffd, UFFDIO_REGISTER, &mut reg)?;
        }
        let inner = Arc::new(inner);
        let handler = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("ferry-lazy-mem".into())
                .spawn(move || inner.serve())?
        };
        let lazy = LazyMemory {
            inner,
            handler: Some(handler),
        };
        let prefetch = lazy.inner.source.prefetch();
        if !prefetch.is_empty() {
            let started = Instant::now();
            // Every core: the guest waits for these.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let workers = cores.max(lazy.inner.source.background());
            lazy.inner
                .prefill(&prefetch, workers, &lazy.inner.prefetched_chunks)?;
            tracing::debug!(
                "lazy memory: {} chunks prefetched ({} bytes) in {} us",
                prefetch.len(),
                lazy.produced_bytes(),
                started.elapsed().as_micros()
            );
        }
        Ok(lazy)
    }

    /// Produces every chunk not yet in place. Idempotent.
    pub fn populate_all(&self) -> io::Result<()> {
        for i in 0..self.inner.source.chunks() {
            // Not the guest's demand: the whole memory is about to be read.
            self.inner.fill(i)?;
        }
        Ok(())
    }

    /// Bytes of guest memory produced so far.
    pub fn produced_bytes(&self) -> u64 {
        self.inner.produced_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of guest memory this lazy source covers in all.
    pub fn total_bytes(&self) -> u64 {
        self.inner.source.ranges().iter().map(|&(_, len)| len).sum()
    }

    /// What it did so far.
    pub fn stats(&self) -> LazyStats {
        self.inner.stats()
    }

    /// The guest ranges it knows the guest touches first: the source's
    /// prefetch set and the pages faulted in the recording window, page
    /// aligned, sorted and merged.
    pub fn touched_after_start(&self) -> Vec<(u64, u64)> {
        let pages: Vec<(u64, u64)> = self
            .inner
            .touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|&g| (g, PAGE_SIZE))
            .chain(self.inner.source.prefetch_ranges())
            .collect();
        crate::memory::normalize(pages)
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two chunks of two pages each, filled with their chunk number + 1.
    #[derive(Debug)]
    struct Pattern {
        base: u64,
        prefetch: Vec<usize>,
        background: usize,
        reports: Mutex<Vec<LazyStats>>,
    }

    impl LazySource for Pattern {
        fn ranges(&self) -> Vec<(u64, u64)> {
            vec![(self.base, 4 * PAGE_SIZE)]
        }
        fn chunks(&self) -> usize {
            2
        }
        fn chunk_of(&self, addr: u64) -> Option<usize> {
            let i = (addr.checked_sub(self.base)? / (2 * PAGE_SIZE)) as usize;
            (i < 2).then_some(i)
        }
        fn prefetch(&self) -> Vec<usize> {
            self.prefetch.clone()
        }
        fn prefetch_ranges(&self) -> Vec<(u64, u64)> {
            self.prefetch
                .iter()
                .map(|&c| (self.base + c as u64 * 2 * PAGE_SIZE, 2 * PAGE_SIZE))
                .collect()
        }
        fn background(&self) -> usize {
            self.background
        }
        fn report(&self, stats: &LazyStats) {
            self.reports.lock().unwrap().push(stats.clone());
        }
        fn produce(&self, index: usize) -> io::Result<Chunk> {
            let len = 2 * PAGE_SIZE as usize;
            Ok(Chunk {
                bytes: vec![index as u8 + 1; len],
                pieces: vec![(self.base + index as u64 * 2 * PAGE_SIZE, 0, len)],
            })
        }
    }

    /// 16 pages of guest memory whose pages 4-7 come lazily from [`Pattern`]
    /// with `prefetch`; `None` (and a note) where userfaultfd is unavailable.
    fn start_pattern(prefetch: Vec<usize>) -> Option<(GuestMemoryMmap, LazyMemory)> {
        start_with(prefetch, 0).map(|(m, l, _)| (m, l))
    }

    /// [`start_pattern`] with `background` fill threads; the source too.
    fn start_with(
        prefetch: Vec<usize>,
        background: usize,
    ) -> Option<(GuestMemoryMmap, LazyMemory, Arc<Pattern>)> {
        if !available() {
            eprintln!("skipped: userfaultfd is not available here");
            return None;
        }
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE as usize)]).unwrap();
        let source = Arc::new(Pattern {
            base: 4 * PAGE_SIZE,
            prefetch,
            background,
            reports: Mutex::new(Vec::new()),
        });
        let lazy = LazyMemory::start(&mem, Arc::clone(&source) as Arc<dyn LazySource>).unwrap();
        Some((mem, lazy, source))
    }

    /// Reads guest address `addr` from another thread, as a vCPU would.
    fn read_from_vcpu(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        use vm_memory::Bytes;
        std::thread::scope(|s| {
            s.spawn(|| mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
                .join()
                .unwrap()
        })
    }

    #[test]
    fn faulted_pages_are_recorded_and_the_rest_filled_in_the_background() {
        let Some((mem, lazy, source)) = start_with(vec![], 2) else {
            return;
        };
        assert_eq!(read_from_vcpu(&mem, 5 * PAGE_SIZE + 1), 1);
        let stats = lazy.stats();
        assert_eq!((stats.faults, stats.demand_chunks), (1, 1));
        assert!(!stats.all_in_place);
        // The window closes two seconds after the first fault; then the fill.
        let deadline = Instant::now() + Duration::from_secs(10);
        while source.reports.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stats = lazy.stats();
        assert!(stats.all_in_place, "{stats:?}");
        assert_eq!(stats.background_chunks, 1, "chunk 1 was never touched");
        assert_eq!(stats.produced_bytes, 4 * PAGE_SIZE);
        use vm_memory::Bytes;
        // In place: read from this thread without a fault.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(7 * PAGE_SIZE)).unwrap(), 2);
        assert_eq!(lazy.touched_after_start(), vec![(5 * PAGE_SIZE, PAGE_SIZE)]);
        let reports = source.reports.lock().unwrap().clone();
        assert_eq!(reports.len(), 2, "window end, then all in place");
        assert!(reports[1].all_in_place);
        drop(lazy);
    }

    #[test]
    fn the_prefetch_set_joins_what_a_restored_vm_touched() {
        let Some((mem, lazy, _)) = start_with(vec![1], 0) else {
            return;
        };
        assert_eq!(read_from_vcpu(&mem, 4 * PAGE_SIZE), 1);
        assert_eq!(lazy.stats().prefetched_chunks, 1);
        assert_eq!(
            lazy.touched_after_start(),
            vec![(4 * PAGE_SIZE, PAGE_SIZE), (6 * PAGE_SIZE, 2 * PAGE_SIZE)]
        );
        drop(lazy);
    }

    #[test]
    fn touched_chunks_are_produced_on_demand_and_the_rest_on_populate() {
        let Some((mem, lazy)) = start_pattern(vec![]) else {
            return;
        };
        let read = |addr: u64| {
            use vm_memory::Bytes;
            let mem = &mem;
            // Another thread touches the page, as a vCPU would.
            std::thread::scope(|s| {
                s.spawn(|| mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
                    .join()
                    .unwrap()
            })
        };
        assert_eq!(read(0), 0, "outside the lazy ranges: plain zero memory");
        assert_eq!(read(7 * PAGE_SIZE + 9), 2);
        assert_eq!(
            lazy.produced_bytes(),
            2 * PAGE_SIZE,
            "only the touched chunk"
        );
        lazy.populate_all().unwrap();
        assert_eq!(lazy.produced_bytes(), 4 * PAGE_SIZE);
        assert_eq!(read(4 * PAGE_SIZE), 1);
        drop(lazy);
    }

    #[test]
    fn prefetch_chunks_are_in_place_when_start_returns() {
        let Some((mem, lazy)) = start_pattern(vec![1]) else {
            return;
        };
        assert_eq!(
            lazy.produced_bytes(),
            2 * PAGE_SIZE,
            "chunk 1, before any touch"
        );
        use vm_memory::Bytes;
        // Read from this thread: a prefetched page must not fault at all.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(6 * PAGE_SIZE)).unwrap(), 2);
        assert_eq!(lazy.produced_bytes(), 2 * PAGE_SIZE);
        drop(lazy);
    }
}
