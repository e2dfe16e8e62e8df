//! Initial register state: 64-bit long mode for the boot vCPU, MSRs, FPU
//! and local APIC for every vCPU.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};
use crate::GuestMemoryMmap;

/// Errors of register setup.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    Memory {
        /// The structure.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM register ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some MSRs.
    #[error("KVM set {set} of {wanted} MSRs")]
    PartialMsrs {
        /// MSRs set.
        set: usize,
        /// MSRs requested.
        wanted: usize,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

fn mem(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> RegsError {
    move |source| RegsError::Memory { what, source }
}

// GDT access/flags words: low byte is the access byte (P, DPL, S, type),
// the top nibble holds G, D/B, L, AVL.
const GDT_CODE64: u16 = 0xa09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x808b;

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (GDT_CODE64, 0, 0xfffff),
    (GDT_DATA, 0, 0xfffff),
    (GDT_TSS, 0, 0xfffff),
];
const CODE_SELECTOR_INDEX: u16 = 1;
const DATA_SELECTOR_INDEX: u16 = 2;
const TSS_SELECTOR_INDEX: u16 = 3;

/// Encodes a GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of the GDT descriptor at `index`.
pub fn segment(index: u16, flags: u16, base: u32, limit: u32) -> kvm_segment {
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        s: ((flags >> 4) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        present: ((flags >> 7) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        db: ((flags >> 14) & 1) as u8,
        g: g as u8,
        unusable: 0,
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

/// Writes identity-mapping page tables for the first GiB (2 MiB pages).
pub fn write_page_tables(m: &GuestMemoryMmap) -> Result<(), RegsError> {
    m.write_obj(PDPT_ADDR | PTE_PRESENT_RW, GuestAddress(PML4_ADDR))
        .map_err(mem("PML4"))?;
    m.write_obj(PD_ADDR | PTE_PRESENT_RW, GuestAddress(PDPT_ADDR))
        .map_err(mem("PDPT"))?;
    for i in 0..512u64 {
        m.write_obj(
            (i << 21) | PDE_HUGE | PTE_PRESENT_RW,
            GuestAddress(PD_ADDR + i * 8),
        )
        .map_err(mem("page directory"))?;
    }
    Ok(())
}

/// Writes the boot GDT and an empty IDT.
pub fn write_gdt(m: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, (flags, base, limit)) in BOOT_GDT.iter().enumerate() {
        m.write_obj(
            gdt_entry(*flags, *base, *limit),
            GuestAddress(GDT_ADDR + 8 * i as u64),
        )
        .map_err(mem("GDT"))?;
    }
    m.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem("IDT"))
}

/// Special registers for 64-bit entry, starting from KVM's defaults.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let seg = |i: u16| {
        let (f, b, l) = BOOT_GDT[i as usize];
        segment(i, f, b, l)
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = seg(CODE_SELECTOR_INDEX);
    let data = seg(DATA_SELECTOR_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(TSS_SELECTOR_INDEX);
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET | CR0_PG) & !(CR0_CD | CR0_NW);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers for the Linux 64-bit boot protocol.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_ADDR,
        rbp: BOOT_STACK_ADDR,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// Puts the boot vCPU in long mode at `entry` (tables must be written).
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm("KVM_SET_REGS"))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Writes [`boot_msrs`] to the vCPU.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::PartialMsrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::PartialMsrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as on a PC.
pub fn lint_setup(mut state: kvm_lapic_state) -> kvm_lapic_state {
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(
        &mut state,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(
        &mut state,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    state
}

/// Applies [`lint_setup`] to the vCPU's local APIC.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let state = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    vcpu.set_lapic(&lint_setup(state))
        .map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn gdt_entries_encode() {
        assert_eq!(gdt_entry(0, 0, 0), 0);
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_TSS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(GDT_DATA, 0x1234_5678, 0x9abcd),
            0x12c9_9334_5678_abcd
        );
    }

    #[test]
    fn segments_match_descriptors() {
        let cs = segment(1, GDT_CODE64, 0, 0xfffff);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.present, cs.s),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(2, GDT_DATA, 0, 0xfffff);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (16, 3, 0, 1));
        let tr = segment(3, GDT_TSS, 0, 0xfffff);
        assert_eq!((tr.selector, tr.type_, tr.s), (24, 0xb, 0));
    }

    #[test]
    fn long_mode_registers() {
        let s = long_mode_sregs(kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        });
        assert_eq!(s.cr0, CR0_PE | CR0_ET | CR0_PG);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.gdt.limit, 31);
        let r = boot_regs(0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, ZERO_PAGE_ADDR, BOOT_STACK_ADDR, 2)
        );
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&m).unwrap();
        write_gdt(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pdpt: u64 = m.read_obj(GuestAddress(PDPT_ADDR)).unwrap();
        assert_eq!(pdpt & !0xfff, PD_ADDR);
        // The PDE covering the kernel at 16 MiB maps it 1:1.
        let pde: u64 = m.read_obj(GuestAddress(PD_ADDR + 8 * 8)).unwrap();
        assert_eq!(pde, (8 << 21) | PDE_HUGE | PTE_PRESENT_RW);
        let last: u64 = m.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, (1 << 30) - (2 << 20));
        let code: u64 = m.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, gdt_entry(GDT_CODE64, 0, 0xfffff));
    }

    #[test]
    fn lint_delivery_modes() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0000);
        let out = lint_setup(state);
        assert_eq!(lapic_reg(&out, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&out, APIC_LVT1), 0x400);
    }

    #[test]
    fn msr_list_covers_syscall_and_mtrr() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_LSTAR), Some(0));
    }
}
