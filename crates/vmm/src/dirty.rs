//! Which guest pages changed since a point in time: KVM's dirty log holds
//! the pages the guest wrote, the guest memory bitmaps the pages the VMM's
//! devices wrote (KVM does not see those). A live migration's rounds and an
//! incremental snapshot read the union of both.

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::memory::MemoryError;
use crate::GuestMemoryMmap;

/// Guest pages are tracked at this size (x86 base pages).
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// The pages of one guest RAM region that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Guest physical address of the region's first page.
    pub guest_addr: u64,
    /// Length of the region in bytes.
    pub len: u64,
    /// One bit per page, page `i` at bit `i % 64` of word `i / 64`.
    pub bits: Vec<u64>,
}

impl DirtyRegion {
    /// Guest addresses of the changed pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let pages = self.len / DIRTY_PAGE_SIZE;
        self.bits.iter().enumerate().flat_map(move |(w, word)| {
            (0..64u64).filter_map(move |b| {
                let page = w as u64 * 64 + b;
                (page < pages && word & (1 << b) != 0)
                    .then_some(self.guest_addr + page * DIRTY_PAGE_SIZE)
            })
        })
    }
}

/// Changed pages of all guest RAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// One entry per RAM region, in guest address order.
    pub regions: Vec<DirtyRegion>,
}

impl DirtyPages {
    /// No pages, over the same regions.
    pub fn empty_like(&self) -> DirtyPages {
        DirtyPages {
            regions: self
                .regions
                .iter()
                .map(|r| DirtyRegion {
                    guest_addr: r.guest_addr,
                    len: r.len,
                    bits: vec![0; r.bits.len()],
                })
                .collect(),
        }
    }

    /// Adds the pages of `other` (same regions).
    pub fn merge(&mut self, other: &DirtyPages) {
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            for (wa, wb) in a.bits.iter_mut().zip(&b.bits) {
                *wa |= wb;
            }
        }
    }

    /// Guest addresses of every changed page, in order.
    pub fn addresses(&self) -> Vec<u64> {
        self.regions.iter().flat_map(DirtyRegion::pages).collect()
    }

    /// How many pages changed.
    pub fn count(&self) -> u64 {
        let mut n = 0u64;
        for r in &self.regions {
            let pages = r.len / DIRTY_PAGE_SIZE;
            for (w, word) in r.bits.iter().enumerate() {
                // Bits past the region's end never count.
                let valid = pages.saturating_sub(w as u64 * 64).min(64);
                let mask = if valid == 64 {
                    u64::MAX
                } else {
                    (1u64 << valid) - 1
                };
                n += u64::from((word & mask).count_ones());
            }
        }
        n
    }
}

/// The bitmap of the pages devices wrote in `region`.
fn written_by_devices(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    MmapRegion::bitmap(region)
}

/// Sets or clears KVM's dirty logging on every RAM slot.
fn set_logging(vm: &VmFd, memory: &GuestMemoryMmap, on: bool) -> Result<(), MemoryError> {
    crate::memory::set_slots(vm, memory, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
}

/// Starts tracking: from now on [`take`] returns the pages changed since
/// the previous call (the first time: since this one).
pub fn start(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    set_logging(vm, memory, true)?;
    // Devices marked pages since the VM started; only what follows counts.
    for region in memory.iter() {
        written_by_devices(region).reset();
    }
    Ok(())
}

/// The pages changed since [`start`] or the previous call, by the guest
/// or by a device; both records start over.
pub fn take(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<DirtyPages, MemoryError> {
    let mut regions = Vec::new();
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let len = region.len();
        let mut bits = vm
            .get_dirty_log(slot, len as usize)
            .map_err(|source| MemoryError::Slot { slot, source })?;
        let by_devices = written_by_devices(region).get_and_reset();
        for (word, dev) in bits.iter_mut().zip(by_devices) {
            *word |= dev;
        }
        regions.push(DirtyRegion {
            guest_addr: region.start_addr().0,
            len,
            bits,
        });
    }
    Ok(DirtyPages { regions })
}

/// Stops tracking: the guest's writes no longer fault to be logged.
pub fn stop(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    set_logging(vm, memory, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_count_ignore_bits_past_the_region() {
        let r = DirtyRegion {
            guest_addr: 0x10_0000,
            len: 3 * DIRTY_PAGE_SIZE,
            bits: vec![0b1111_0101],
        };
        assert_eq!(
            r.pages().collect::<Vec<_>>(),
            vec![0x10_0000, 0x10_0000 + 2 * DIRTY_PAGE_SIZE]
        );
        let all = DirtyPages {
            regions: vec![
                r,
                DirtyRegion {
                    guest_addr: 0x1_0000_0000,
                    len: 64 * DIRTY_PAGE_SIZE,
                    bits: vec![u64::MAX],
                },
            ],
        };
        assert_eq!(all.count(), 2 + 64);
    }

    /// A device's write through guest memory marks its page; a read does not.
    #[test]
    fn device_writes_mark_the_bitmap() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * DIRTY_PAGE_SIZE as usize)])
            .unwrap();
        let region = mem.iter().next().unwrap();
        written_by_devices(region).reset();
        mem.write_obj(7u64, GuestAddress(5 * DIRTY_PAGE_SIZE + 8))
            .unwrap();
        let _: u64 = mem.read_obj(GuestAddress(9 * DIRTY_PAGE_SIZE)).unwrap();
        let words = written_by_devices(region).get_and_reset();
        assert_eq!(words[0], 1 << 5);
        assert_eq!(
            written_by_devices(region).get_and_reset()[0],
            0,
            "taking resets"
        );
    }
}
