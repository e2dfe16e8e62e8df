//! Guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT             0x0000_9000  PML4, then PDPT, PD
//! 0x0000_0520  IDT             0x0002_0000  kernel command line
//! 0x0000_7000  zero page       0x0009_fc00  MP table (EBDA, reserved)
//! 0x0000_8ff0  boot stack top  0x0010_0000  high memory (kernel at 16 MiB)
//! 0xd000_0000  MMIO gap: virtio-mmio slots, then I/O APIC and LAPIC
//! 0x1_0000_0000  RAM above the gap
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty).
pub const IDT_ADDR: u64 = 0x520;
/// Linux boot parameters ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Page map level 4 of the boot page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (2 MiB pages identity-mapping the first GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line Linux x86 accepts, including the NUL.
pub const CMDLINE_MAX_LEN: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_ADDR: u64 = 0x9fc00;
/// First byte of high memory; kernels load above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// I/O APIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Three pages KVM needs for the real-mode TSS (must not be RAM).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// One page KVM needs for the real-mode identity map, right below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy IRQ of the serial port.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio devices.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last I/O APIC pin.
pub const LAST_IRQ: u32 = 23;

// The boot stack grows down between the zero page and the page tables, and
// KVM's identity map and TSS pages sit together above the LAPIC.
const _: () = assert!(BOOT_STACK_ADDR < PML4_ADDR && BOOT_STACK_ADDR > ZERO_PAGE_ADDR + 4096);
const _: () = assert!(KVM_IDENTITY_MAP_ADDR + 4096 == KVM_TSS_ADDR && KVM_TSS_ADDR > LAPIC_ADDR);

/// E820 memory types.
pub const E820_RAM: u32 = 1;
/// E820 reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The RAM regions for `size` bytes of guest memory: below the MMIO gap,
/// and the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// End of RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// One entry of the guest's E820 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The E820 map for `size` bytes of RAM: low memory up to the EBDA, the
/// EBDA reserved, high memory up to the gap, and RAM above 4 GiB.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_ADDR,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_ADDR,
            size: 0xa0000 - EBDA_ADDR,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_regions(size) {
        let start = start.0.max(HIMEM_START);
        let end = if start >= MMIO_GAP_END {
            start + len
        } else {
            low_ram_end(size)
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let map = e820_map(256 << 20);
        assert_eq!(
            map.last(),
            Some(&E820Entry {
                addr: HIMEM_START,
                size: (256 << 20) - HIMEM_START,
                kind: E820_RAM
            })
        );
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn large_memory_skips_the_gap() {
        let size = 4u64 << 30;
        let regions = ram_regions(size);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(regions[1], (GuestAddress(1 << 32), size - MMIO_GAP_START));
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, size);

        let map = e820_map(size);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3].addr, MMIO_GAP_END);
        assert_eq!(map[3].size, size - MMIO_GAP_START);
        // Nothing the guest may use overlaps the gap's devices.
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
    }

    #[test]
    fn fixed_addresses_do_not_overlap() {
        let ranges = [
            (GDT_ADDR, 4 * 8),
            (IDT_ADDR, 8),
            (ZERO_PAGE_ADDR, 4096),
            (PML4_ADDR, 4096),
            (PDPT_ADDR, 4096),
            (PD_ADDR, 4096),
            (CMDLINE_ADDR, CMDLINE_MAX_LEN as u64),
        ];
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
            assert!(a.0 + a.1 <= EBDA_ADDR);
        }
    }
}
