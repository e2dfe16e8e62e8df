//! The userfaultfd ABI the lazy restore ([`super::lazy`]) and the touch
//! recorder ([`super::touch`]) use (include/uapi/linux/userfaultfd.h), and
//! the map between the guest addresses they think in and the host
//! addresses faults are reported at.
//!
//! Hand-written rather than taken from a userfaultfd crate: both users need
//! the raw descriptor in their own poll loops, `UFFDIO_COPY`'s partial-copy
//! results, and minor-fault registration over shared memory, which the
//! crates expose only partly or behind kernel-version features.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::GuestMemoryMmap;

pub(crate) const UFFD_API: u64 = 0xAA;
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults on shared memory (Linux 5.14).
pub(crate) const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
pub(crate) const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub(crate) const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
pub(crate) const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
pub(crate) const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
pub(crate) const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
pub(crate) const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
pub(crate) const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
pub(crate) const UFFDIO_CONTINUE: libc::c_ulong = 0xc020_aa07;
/// Bytes of one `uffd_msg`.
pub(crate) const MSG_LEN: usize = 32;

#[repr(C)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
pub(crate) struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

#[repr(C)]
pub(crate) struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

#[repr(C)]
pub(crate) struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    pub mapped: i64,
}

/// ioctl on the userfaultfd with a pointer argument.
pub(crate) fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is a userfaultfd and `arg` points to the structure the
    // kernel expects for `request` (layouts above match the uapi header);
    // the kernel reads and writes only that structure, and memory it copies
    // from or to is named by addresses the kernel itself validates.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new non-blocking userfaultfd with the API handshake done, asking for
/// `features`.
pub(crate) fn open(features: u64) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall creating a new descriptor (or failing).
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bad descriptor"))?;
    // SAFETY: the syscall just returned this descriptor; nothing else owns it.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(&uffd, UFFDIO_API, &mut api)?;
    if api.features & features != features {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "userfaultfd lacks a needed feature",
        ));
    }
    Ok(uffd)
}

/// Waits up to `timeout_ms` for the descriptor to be readable; true if it is.
pub(crate) fn poll_in(fd: &OwnedFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

/// The faulting address of a page-fault message, or `None` for other events.
pub(crate) fn fault_address(msg: &[u8; MSG_LEN]) -> Option<u64> {
    (msg[0] == UFFD_EVENT_PAGEFAULT)
        .then(|| u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes")))
}

/// Where each guest RAM region is mapped in this process.
#[derive(Debug)]
pub(crate) struct HostRegions(Vec<(u64, u64, u64)>);

impl HostRegions {
    /// The regions of `memory`.
    pub fn of(memory: &GuestMemoryMmap) -> io::Result<Self> {
        let mut regions = Vec::new();
        for r in memory.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| io::Error::other("guest region not mapped"))?;
            regions.push((r.start_addr().0, r.len(), host as u64));
        }
        Ok(HostRegions(regions))
    }

    /// (guest start, length, host start) of each region.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.0.iter().copied()
    }

    /// The host address of guest address `guest`.
    pub fn host(&self, guest: u64) -> Option<u64> {
        self.iter()
            .find(|&(g, len, _)| guest >= g && guest < g + len)
            .map(|(g, _, h)| h + (guest - g))
    }

    /// The guest address of host address `host`.
    pub fn guest(&self, host: u64) -> Option<u64> {
        self.iter()
            .find(|&(_, len, h)| host >= h && host < h + len)
            .map(|(g, _, h)| g + (host - h))
    }
}
