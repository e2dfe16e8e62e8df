//! Which guest pages a running VM touches: the prefetch set of a snapshot.
//!
//! A restored guest goes on exactly where it was frozen, so the pages it
//! touched just before the freeze are the pages it touches first after a
//! restore. [`record`] finds them on a VM whose RAM is a shared memfd: it
//! registers the RAM for userfaultfd minor faults and drops the VMM's page
//! table entries (the memfd keeps every byte, KVM drops its mappings with
//! them), so the next touch of each page, by a vCPU, KVM or a device thread,
//! stops once in the handler here, which notes the page and maps it back
//! (`UFFDIO_CONTINUE`, no copy). Recording ends when the guest has touched
//! nothing new for a while, after a time limit, or at a size limit; the
//! registration is then dropped and the VM runs as before.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::uffd::{
    self, HostRegions, UffdioContinue, UffdioRange, UffdioRegister, MSG_LEN, UFFDIO_CONTINUE,
    UFFDIO_REGISTER, UFFDIO_REGISTER_MODE_MINOR, UFFDIO_UNREGISTER, UFFDIO_WAKE,
    UFFD_FEATURE_MINOR_SHMEM,
};
use crate::memory::PAGE_SIZE;
use crate::GuestMemoryMmap;

/// When a recording ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TouchLimits {
    /// Ends once no new page was touched for this long.
    pub quiet: Duration,
    /// Ends after this long in any case.
    pub max_time: Duration,
    /// Ends once this many bytes were touched.
    pub max_bytes: u64,
}

impl Default for TouchLimits {
    fn default() -> Self {
        TouchLimits {
            quiet: Duration::from_millis(150),
            max_time: Duration::from_millis(2000),
            max_bytes: 64 << 20,
        }
    }
}

/// Untouched pages between two touched ones that still join them into one range.
const MAX_GAP_PAGES: u64 = 2;
/// Most ranges a recording reports.
pub const MAX_RANGES: usize = 8192;

/// What a recording found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    /// Guest ranges touched, page aligned, sorted, merged across gaps of up
    /// to two pages, at most [`MAX_RANGES`] of them.
    pub ranges: Vec<(u64, u64)>,
    /// Pages touched.
    pub pages: u64,
    /// How long the recording ran.
    pub elapsed: Duration,
}

/// Registered guest RAM: unregistered when dropped, which also wakes any
/// thread still waiting on a fault there.
struct Registration<'a> {
    uffd: &'a OwnedFd,
    ranges: Vec<UffdioRange>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        for r in &mut self.ranges {
            if let Err(e) = uffd::ioctl(self.uffd, UFFDIO_UNREGISTER, r) {
                tracing::warn!("touch recording: unregistering guest RAM: {e}");
            }
        }
    }
}

/// Work run on its own thread while recording, e.g. what a restore will ask
/// of the guest; recording goes on at least until it returns (or the time
/// limit). It must not wait for the recording to end.
pub type Exercise = Box<dyn FnOnce() + Send + 'static>;

/// Records the pages of `memory` (a shared mapping of a memfd, as a booted
/// VM's RAM is) touched until `limits` end the recording, with `exercise`
/// run meanwhile. The caller's thread serves the faults, so it must not
/// touch guest memory meanwhile.
pub fn record(
    memory: &GuestMemoryMmap,
    limits: TouchLimits,
    exercise: Option<Exercise>,
) -> io::Result<Touched> {
    let started = Instant::now();
    let uffd = uffd::open(UFFD_FEATURE_MINOR_SHMEM)?;
    let regions = HostRegions::of(memory)?;
    let mut reg = Registration {
        uffd: &uffd,
        ranges: Vec::new(),
    };
    for (_, len, host) in regions.iter() {
        let range = UffdioRange { start: host, len };
        let mut r = UffdioRegister {
            range,
            mode: UFFDIO_REGISTER_MODE_MINOR,
            ioctls: 0,
        };
        uffd::ioctl(&uffd, UFFDIO_REGISTER, &mut r)?;
        reg.ranges.push(range);
    }
    for (_, len, host) in regions.iter() {
        // SAFETY: the range is guest RAM this process mapped shared from a
        // memfd; dropping its page table entries loses no data (the memfd
        // holds it) and the next touch maps the same page again.
        let r =
            unsafe { libc::madvise(host as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let exercised = Arc::new(AtomicBool::new(exercise.is_none()));
    if let Some(work) = exercise {
        let done = Arc::clone(&exercised);
        // Not joined: should the work hang, the recording still ends on time.
        std::thread::Builder::new()
            .name("ferry-touch-exercise".into())
            .spawn(move || {
                work();
                done.store(true, Ordering::SeqCst);
            })?;
    }
    let mut seen = std::collections::HashSet::new();
    let mut file = File::from(uffd.try_clone()?);
    let mut msg = [0u8; MSG_LEN];
    let mut last_new = Instant::now();
    let quiet_ms = i32::try_from(limits.quiet.as_millis())
        .unwrap_or(i32::MAX)
        .max(1);
    loop {
        if started.elapsed() >= limits.max_time
            || (last_new.elapsed() >= limits.quiet && exercised.load(Ordering::SeqCst))
            || seen.len() as u64 * PAGE_SIZE >= limits.max_bytes
        {
            break;
        }
        if !uffd::poll_in(&uffd, quiet_ms) {
            continue;
        }
        match file.read(&mut msg) {
            Ok(MSG_LEN) => {}
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
        let Some(host) = uffd::fault_address(&msg) else {
            continue;
        };
        let page = host & !(PAGE_SIZE - 1);
        if let Some(g) = regions.guest(page) {
            if seen.insert(g) {
                last_new = Instant::now();
            }
        }
        let range = UffdioRange {
            start: page,
            len: PAGE_SIZE,
        };
        let mut c = UffdioContinue {
            range,
            mode: 0,
            mapped: 0,
        };
        match uffd::ioctl(&uffd, UFFDIO_CONTINUE, &mut c) {
            Ok(()) => {}
            // Mapped already by a concurrent fault: wake whoever waits.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let mut w = range;
                uffd::ioctl(&uffd, UFFDIO_WAKE, &mut w)?;
            }
            Err(e) => return Err(e),
        }
    }
    drop(reg);
    let pages = seen.len() as u64;
    Ok(Touched {
        ranges: ranges_of(seen.into_iter().collect()),
        pages,
        elapsed: started.elapsed(),
    })
}

/// Sorted ranges covering the guest pages `pages`.
fn ranges_of(mut pages: Vec<u64>) -> Vec<(u64, u64)> {
    pages.sort_unstable();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for g in pages {
        match ranges.last_mut() {
            // Small gaps are closed: each range becomes a mapping on restore,
            // and a neighbour of touched pages is likely touched soon.
            Some((s, l)) if g <= *s + *l + MAX_GAP_PAGES * PAGE_SIZE => *l = g + PAGE_SIZE - *s,
            _ => ranges.push((g, PAGE_SIZE)),
        }
    }
    // A hint, so bounded: a restore maps each range on its own.
    ranges.truncate(MAX_RANGES);
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn touched_pages_become_few_ranges() {
        let p = |n: u64| n * PAGE_SIZE;
        assert_eq!(
            ranges_of(vec![p(9), p(1), p(3), p(4), p(20)]),
            vec![(p(1), p(4)), (p(9), p(1)), (p(20), p(1))],
            "gaps of up to two pages are closed"
        );
        let scattered: Vec<u64> = (0..3 * MAX_RANGES as u64).map(|i| p(i * 4)).collect();
        assert_eq!(ranges_of(scattered).len(), MAX_RANGES);
    }

    #[test]
    fn pages_touched_while_recording_are_found_and_memory_keeps_its_contents() {
        if !super::super::lazy::available() {
            eprintln!("skipped: userfaultfd is not available here");
            return;
        }
        let ram = crate::memory::new_guest_ram(&[(0, 64 * PAGE_SIZE)]).unwrap();
        let mem = &ram.memory;
        for i in 0..64u64 {
            mem.write_obj(i as u8 + 1, GuestAddress(i * PAGE_SIZE))
                .unwrap();
        }
        let stop = AtomicBool::new(false);
        let touched = std::thread::scope(|s| {
            // A "guest" reading pages 3, 4 and 10 and writing page 20 over and over.
            let guest = s.spawn(|| {
                let mut reads = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for p in [3u64, 4, 10] {
                        reads.push(mem.read_obj::<u8>(GuestAddress(p * PAGE_SIZE)).unwrap());
                    }
                    mem.write_obj(99u8, GuestAddress(20 * PAGE_SIZE + 1))
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                reads
            });
            std::thread::sleep(Duration::from_millis(20));
            // The exercise touches nothing itself; it only holds the
            // recording open a little longer than quiet alone would.
            let exercise: Exercise = Box::new(|| std::thread::sleep(Duration::from_millis(200)));
            let touched = match record(mem, TouchLimits::default(), Some(exercise)) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    stop.store(true, Ordering::Relaxed);
                    eprintln!("skipped: no minor faults on shared memory here");
                    return None;
                }
                Err(e) => panic!("{e}"),
            };
            stop.store(true, Ordering::Relaxed);
            let reads = guest.join().unwrap();
            assert!(
                reads.chunks(3).all(|r| r == [4, 5, 11]),
                "reads saw other bytes"
            );
            Some(touched)
        });
        let Some(touched) = touched else { return };
        assert_eq!(
            touched.ranges,
            vec![
                (3 * PAGE_SIZE, 2 * PAGE_SIZE),
                (10 * PAGE_SIZE, PAGE_SIZE),
                (20 * PAGE_SIZE, PAGE_SIZE)
            ]
        );
        assert_eq!(touched.pages, 4);
        for i in 0..64u64 {
            let want = if i == 20 { 21 } else { i as u8 + 1 };
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(i * PAGE_SIZE)).unwrap(),
                want
            );
        }
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(20 * PAGE_SIZE + 1))
                .unwrap(),
            99
        );
    }
}
