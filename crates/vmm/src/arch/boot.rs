//! Linux boot: kernel and initramfs loading, command line, zero page.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{self, CMDLINE_ADDR, CMDLINE_MAX_LEN, HIMEM_START, ZERO_PAGE_ADDR};
use crate::GuestMemoryMmap;

/// The command line every ferry guest gets, before device and caller arguments.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule 8250.nr_uarts=1 \
                                i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 4096;

/// Errors of the boot setup.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        /// Kernel path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel is not a loadable ELF image.
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad {
        /// Kernel path.
        path: PathBuf,
        /// What the loader reported.
        reason: String,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {path}")]
    InitramfsRead {
        /// Initramfs path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory")]
    InitramfsTooLarge {
        /// Initramfs path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("cannot copy initramfs into guest memory")]
    InitramfsCopy(#[source] vm_memory::GuestMemoryError),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing the zero page failed.
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

/// Where the kernel landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelImage {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
}

/// Loads an ELF `vmlinux` at its physical addresses.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<KernelImage, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_path_buf(),
        source,
    })?;
    let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::KernelLoad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok(KernelImage {
        entry: res.kernel_load.0,
        end: res.kernel_end,
    })
}

/// Where the initramfs landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initramfs {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Where an initramfs of `size` bytes goes: page-aligned at the top of low
/// RAM, above the kernel.
pub fn initramfs_addr(size: u64, kernel_end: u64, mem_size: u64) -> Option<u64> {
    let top = layout::low_ram_end(mem_size);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Copies the initramfs at `path` to the top of low RAM.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    mem_size: u64,
) -> Result<Initramfs, BootError> {
    let read_err = |source| BootError::InitramfsRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr =
        initramfs_addr(size, kernel_end, mem_size).ok_or_else(|| BootError::InitramfsTooLarge {
            path: path.to_path_buf(),
            size,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::InitramfsCopy)?;
    Ok(Initramfs { addr, size })
}

/// The full command line: [`BASE_CMDLINE`], one `virtio_mmio.device=` per
/// `(base, size, irq)` device, then `extra`.
pub fn build_cmdline(
    virtio_devices: &[(u64, u64, u32)],
    extra: &str,
) -> Result<Cmdline, BootError> {
    let err = |e: linux_loader::cmdline::Error| BootError::Cmdline(e.to_string());
    let mut cmdline = Cmdline::new(CMDLINE_MAX_LEN).map_err(err)?;
    cmdline.insert_str(BASE_CMDLINE).map_err(err)?;
    for &(base, size, irq) in virtio_devices {
        cmdline
            .add_virtio_mmio_device(size, GuestAddress(base), irq, None)
            .map_err(err)?;
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline.insert_str(extra).map_err(err)?;
    }
    Ok(cmdline)
}

/// Writes the command line at [`CMDLINE_ADDR`]; returns its length with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let s = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(s.as_bytes_with_nul().len())
}

/// The zero page for a kernel entered at its 64-bit entry point.
pub fn boot_params_for(
    cmdline_len: usize,
    initramfs: Option<Initramfs>,
    mem_size: u64,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = layout::e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::BootParams("too many E820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    let bp = BootParams::new(params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))
}

/// Reads back the zero page (for tests and diagnostics).
pub fn read_boot_params(mem: &GuestMemoryMmap) -> Result<boot_params, vm_memory::GuestMemoryError> {
    mem.read_obj(GuestAddress(ZERO_PAGE_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_lists_devices_then_extra() {
        let c = build_cmdline(
            &[(0xd000_0000, 0x1000, 5), (0xd000_1000, 0x1000, 6)],
            "  quiet init=/init ",
        )
        .unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            format!(
                "{BASE_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 quiet init=/init"
            )
        );
        let bare = build_cmdline(&[], "").unwrap();
        assert_eq!(bare.as_cstring().unwrap().to_str().unwrap(), BASE_CMDLINE);
        assert!(build_cmdline(&[], &"x".repeat(CMDLINE_MAX_LEN)).is_err());
    }

    #[test]
    fn initramfs_goes_to_top_of_low_ram() {
        let mem = 256u64 << 20;
        assert_eq!(initramfs_addr(0x1800, 0x200_0000, mem), Some(mem - 0x2000));
        assert_eq!(initramfs_addr(mem, 0x200_0000, mem), None);
        // Above the gap, the initramfs stays below it.
        let big = 8u64 << 30;
        assert_eq!(
            initramfs_addr(0x1000, 0x200_0000, big),
            Some(layout::MMIO_GAP_START - 0x1000)
        );
    }

    #[test]
    fn zero_page_contents() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let initrd = Initramfs {
            addr: 0x800_0000,
            size: 12345,
        };
        let p = boot_params_for(100, Some(initrd), 512 << 20).unwrap();
        write_boot_params(&mem, &p).unwrap();
        let back = read_boot_params(&mem).unwrap();
        assert_eq!({ back.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ back.hdr.header }, HDR_MAGIC);
        assert_eq!({ back.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ back.hdr.cmdline_size }, 100);
        assert_eq!(
            ({ back.hdr.ramdisk_image }, { back.hdr.ramdisk_size }),
            (0x800_0000, 12345)
        );
        assert_eq!(back.e820_entries, 3);
        let last = back.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (HIMEM_START, (512 << 20) - HIMEM_START, 1)
        );
    }

    #[test]
    fn kernel_load_errors_are_reported() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            load_kernel(&mem, &missing),
            Err(BootError::KernelOpen { .. })
        ));
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not an elf file at all, just bytes........").unwrap();
        assert!(matches!(
            load_kernel(&mem, &junk),
            Err(BootError::KernelLoad { .. })
        ));
    }
}
