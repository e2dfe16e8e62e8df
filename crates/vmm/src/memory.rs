//! Guest RAM: one memfd mapped shared, so its pages can later be saved or
//! shared copy-on-write with a forked VM.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::arch::layout::ram_regions;
use crate::GuestMemoryMmap;

/// Page size of guest memory mappings.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of guest memory setup.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create memfd for guest RAM")]
    Memfd(#[source] io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size guest RAM to {size} bytes")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map guest RAM")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// Restored guest RAM could not be mapped.
    #[error("cannot map restored guest RAM: {0}")]
    Restore(String),
    /// A region has no host mapping.
    #[error("guest RAM region at {0:#x} is not mapped")]
    HostAddress(u64),
    /// KVM refused a memory slot.
    #[error("cannot register guest RAM slot {slot} with KVM")]
    Slot {
        /// Slot number.
        slot: u32,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
    /// The memfd holding every region back to back.
    pub file: File,
}

/// Creates `size` bytes of guest RAM laid out per [`ram_regions`].
pub fn create_guest_ram(size: u64) -> Result<GuestRam, MemoryError> {
    let regions: Vec<(u64, u64)> = ram_regions(size)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    new_guest_ram(&regions)
}

/// A new, empty memfd for guest RAM. Sealing lets a fork freeze it once it is
/// no longer mapped shared.
fn new_ram_memfd() -> Result<File, MemoryError> {
    let name = CString::new("ferry-guest-ram").map_err(|e| MemoryError::Memfd(e.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Zeroed guest RAM with the given regions (guest address, length), to be
/// filled by the caller before a VM is restored over it (see
/// [`crate::MemorySource::Ram`]). Backed and mapped like a booted VM's RAM.
pub fn new_guest_ram(regions: &[(u64, u64)]) -> Result<GuestRam, MemoryError> {
    let file = new_ram_memfd()?;
    let size = regions.iter().map(|r| r.1).sum();
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    map_guest_ram(file, regions)
}

/// Maps `file` shared as guest RAM: `regions` (guest address, length) lie
/// back to back in it. The file must be exactly as long as the regions.
pub fn map_guest_ram(file: File, regions: &[(u64, u64)]) -> Result<GuestRam, MemoryError> {
    let size: u64 = regions.iter().map(|r| r.1).sum();
    let len = file.metadata().map_err(MemoryError::Memfd)?.len();
    if len != size {
        return Err(MemoryError::Restore(format!(
            "guest RAM file holds {len} bytes, the regions {size}"
        )));
    }
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for &(addr, len) in regions {
        let f = file.try_clone().map_err(MemoryError::Memfd)?;
        let len_usize = usize::try_from(len)
            .map_err(|_| MemoryError::Restore(format!("region of {len} bytes")))?;
        ranges.push((
            GuestAddress(addr),
            len_usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += len;
    }
    let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)?;
    advise_huge_pages(&memory);
    Ok(GuestRam { memory, file })
}

/// Asks for 2 MiB pages behind guest RAM: KVM then maps guest memory in 2 MiB
/// pieces, so booting touches far fewer pages through nested page faults.
/// The host grants them for shared memory only if its `shmem_enabled`
/// setting allows (`ferry install` sets `advise`); otherwise this is a no-op.
pub fn advise_huge_pages(memory: &GuestMemoryMmap) {
    for region in memory.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: madvise on a mapping `memory` owns; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents.
        let r = unsafe {
            libc::madvise(
                host.cast::<libc::c_void>(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if r != 0 {
            tracing::debug!(
                "madvise(MADV_HUGEPAGE) on guest RAM: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Registers every region of `memory` as a KVM memory slot.
pub fn register_with_kvm(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    set_slots(vm, memory, 0)
}

/// Sets each region of `memory` as the KVM memory slot numbered by its
/// index, with `flags`: a first registration, or the same mapping with new
/// flags (dirty logging on or off).
pub(crate) fn set_slots(
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    flags: u32,
) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::HostAddress(region.start_addr().0))?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // VM keeps for as long as the KVM VM exists.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Slot { slot, source })?;
    }
    Ok(())
}

/// Sorts and merges overlapping or touching ranges.
pub(crate) fn normalize(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, l) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.0 + last.1 => {
                last.1 = last.1.max(a + l - last.0);
            }
            _ => out.push((a, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_backed_by_the_memfd() {
        let ram = create_guest_ram(64 << 20).unwrap();
        assert_eq!(ram.file.metadata().unwrap().len(), 64 << 20);
        ram.memory
            .write_slice(b"ferry", GuestAddress(0x12345))
            .unwrap();
        let mut buf = [0u8; 5];
        ram.file.read_exact_at(&mut buf, 0x12345).unwrap();
        assert_eq!(&buf, b"ferry");
        // And the other way round: the mapping is shared.
        ram.file.write_all_at(b"back", 0x2000).unwrap();
        let mut buf = [0u8; 4];
        ram.memory
            .read_slice(&mut buf, GuestAddress(0x2000))
            .unwrap();
        assert_eq!(&buf, b"back");
    }

    #[test]
    fn high_region_follows_low_in_the_file() {
        use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};
        // Sparse: only touched pages use host memory.
        let size = MMIO_GAP_START + (16 << 20);
        let ram = create_guest_ram(size).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        ram.memory
            .write_slice(b"high", GuestAddress(MMIO_GAP_END + 8))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.file
            .read_exact_at(&mut buf, MMIO_GAP_START + 8)
            .unwrap();
        assert_eq!(&buf, b"high");
        assert!(ram
            .memory
            .read_slice(&mut buf, GuestAddress(MMIO_GAP_START))
            .is_err());
    }
}
