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

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

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
}

/// Shared between the handle and the handler thread.
struct Inner {
    uffd: OwnedFd,
    source: Arc<dyn LazySource>,
    /// Where guest RAM is mapped here.
    regions: HostRegions,
    /// Which chunks are in place; the lock also serializes producing them.
    done: Mutex<Vec<bool>>,
    produced_bytes: AtomicU64,
    stop: AtomicBool,
}

impl Inner {
    /// Puts chunk `index` in place unless it already is.
    fn fill(&self, index: usize) -> io::Result<()> {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        if done.get(index).copied().unwrap_or(true) {
            return Ok(());
        }
        let started = std::time::Instant::now();
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
        Ok(())
    }

    /// Produces `chunks` on every core and puts them in place, before the
    /// guest runs (a fault meanwhile is served as usual).
    fn prefill(&self, chunks: &[usize]) -> io::Result<()> {
        let next = AtomicU64::new(0);
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(chunks.len())
            .max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| -> io::Result<()> {
                        while let Some(&index) =
                            chunks.get(next.fetch_add(1, Ordering::Relaxed) as usize)
                        {
                            let chunk = self.source.produce(index)?;
                            let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
                            if !done.get(index).copied().unwrap_or(true) {
                                self.place(&chunk)?;
                                done[index] = true;
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
        tracing::trace!(
            "lazy memory: fault at guest {:#x}",
            self.regions.guest(page).unwrap_or(0)
        );
        match self
            .regions
            .guest(page)
            .and_then(|g| self.source.chunk_of(g))
        {
            Some(index) => {
                self.fill(index)?;
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

    fn serve(&self) {
        let mut file = match self.uffd.try_clone() {
            Ok(fd) => File::from(fd),
            Err(e) => {
                tracing::error!("lazy memory: {e}");
                return;
            }
        };
        let mut msg = [0u8; MSG_LEN];
        while !self.stop.load(Ordering::Relaxed) {
            // The timeout lets the thread notice `stop`.
            if !uffd::poll_in(&self.uffd, 100) {
                continue;
            }
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
            let started = std::time::Instant::now();
            lazy.inner.prefill(&prefetch)?;
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
        if !available() {
            eprintln!("skipped: userfaultfd is not available here");
            return None;
        }
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE as usize)]).unwrap();
        let source = Arc::new(Pattern {
            base: 4 * PAGE_SIZE,
            prefetch,
        });
        let lazy = LazyMemory::start(&mem, source).unwrap();
        Some((mem, lazy))
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
