//! Intel MultiProcessor Specification 1.4 table, so a guest without ACPI
//! finds every vCPU, the I/O APIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR, LAST_IRQ};
use crate::GuestMemoryMmap;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
const SPEC_REVISION: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conforms to bus" (ISA: active high, edge).
const INT_FLAGS_DEFAULT: u16 = 0;

const ISA_BUS_ID: u8 = 0;

/// Errors of MP table setup.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than APIC ids available.
    #[error("{0} vCPUs do not fit the MP table")]
    TooManyCpus(u8),
    /// Writing the table failed.
    #[error("cannot write the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

fn local_interrupt(int_type: u8, lint: u8) -> [u8; ENTRY_LEN] {
    let f = INT_FLAGS_DEFAULT.to_le_bytes();
    // Destination 0xff: every local APIC.
    [
        ENTRY_LOCAL_INTERRUPT,
        int_type,
        f[0],
        f[1],
        ISA_BUS_ID,
        0,
        0xff,
        lint,
    ]
}

/// Builds the floating pointer followed by the configuration table, for a
/// table placed at guest address `base`.
pub fn build(
    base: u64,
    num_cpus: u8,
    cpu_signature: u32,
    cpu_features: u32,
) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus == 255 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let mut p = [0u8; PROCESSOR_LEN];
        p[0] = ENTRY_PROCESSOR;
        p[1] = cpu;
        p[2] = LAPIC_VERSION;
        p[3] = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        p[4..8].copy_from_slice(&cpu_signature.to_le_bytes());
        p[8..12].copy_from_slice(&cpu_features.to_le_bytes());
        entries.extend_from_slice(&p);
        count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;

    let mut io = [
        ENTRY_IOAPIC,
        ioapic_id,
        IOAPIC_VERSION,
        IOAPIC_ENABLED,
        0,
        0,
        0,
        0,
    ];
    io[4..8].copy_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;

    let f = INT_FLAGS_DEFAULT.to_le_bytes();
    for irq in 0..=LAST_IRQ as u8 {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            f[0],
            f[1],
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&local_interrupt(INT_TYPE_EXTINT, 0));
    entries.extend_from_slice(&local_interrupt(INT_TYPE_NMI, 1));
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = SPEC_REVISION;
    header[8..16].copy_from_slice(b"FERRY   ");
    header[16..28].copy_from_slice(b"MICROVM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&((base + FLOATING_LEN as u64) as u32).to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = SPEC_REVISION;
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table at `base`.
pub fn write(
    mem: &GuestMemoryMmap,
    base: u64,
    num_cpus: u8,
    cpu_signature: u32,
    cpu_features: u32,
) -> Result<(), MpTableError> {
    let bytes = build(base, num_cpus, cpu_signature, cpu_features)?;
    mem.write_slice(&bytes, GuestAddress(base))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers() {
        let base = 0x9fc00;
        let t = build(base, 4, 0x906ea, 0x178bfbff).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
        assert_eq!(ptr, base + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn lists_every_cpu_and_irq() {
        let n = 3;
        let t = build(0, n, 0x1, 0x2).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        let mut off = HEADER_LEN;
        let mut cpus = Vec::new();
        let mut irqs = Vec::new();
        let mut ioapic = None;
        let mut lints = Vec::new();
        for _ in 0..count {
            match table[off] {
                ENTRY_PROCESSOR => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += PROCESSOR_LEN;
                    continue;
                }
                ENTRY_IOAPIC => ioapic = Some(table[off + 1]),
                ENTRY_IO_INTERRUPT => irqs.push((table[off + 5], table[off + 7], table[off + 6])),
                ENTRY_LOCAL_INTERRUPT => lints.push((table[off + 1], table[off + 7])),
                ENTRY_BUS => assert_eq!(&table[off + 2..off + 8], b"ISA   "),
                other => panic!("unknown entry {other}"),
            }
            off += ENTRY_LEN;
        }
        assert_eq!(off, table.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1)]);
        assert_eq!(ioapic, Some(n));
        assert_eq!(irqs.len(), 24);
        assert!(irqs.iter().all(|&(src, pin, apic)| src == pin && apic == n));
        assert_eq!(lints, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert!(build(0, 0, 0, 0).is_err());
        assert!(build(0, 255, 0, 0).is_err());
        assert!(build(0, 254, 0, 0).is_ok());
    }
}
