//! Reading and writing the KVM state of vCPUs and of the VM.
//!
//! Restore order is fixed by [`restore_vm`], [`restore_vcpu`] and
//! [`restore_clock`]; the functions apply every piece in the one order KVM
//! needs.

use std::time::Instant;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::blob::Blob;
use super::SnapshotError;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// First KVM paravirtual MSR.
pub const MSR_KVM_FIRST: u32 = 0x4b56_4d00;
/// Last KVM paravirtual MSR.
pub const MSR_KVM_LAST: u32 = 0x4b56_4dff;
/// Last paravirtual MSR Linux defines (MSR_KVM_MIGRATION_CONTROL).
const MSR_KVM_DEFINED_LAST: u32 = 0x4b56_4d08;

/// MSRs saved on top of KVM's index list (which leaves out MTRRs and PAT,
/// and may leave out some paravirtual ones). Unreadable ones are dropped.
const EXTRA_MSRS: &[u32] = &[
    0x10,  // IA32_TSC
    0x11,  // MSR_KVM_WALL_CLOCK (old)
    0x12,  // MSR_KVM_SYSTEM_TIME (old)
    0x3b,  // IA32_TSC_ADJUST
    0x174, // SYSENTER_CS
    0x175, // SYSENTER_ESP
    0x176, // SYSENTER_EIP
    0x1a0, // IA32_MISC_ENABLE
    0x277, // IA32_PAT
    0x2ff, // MTRR default type
    0x250,
    0x258,
    0x259, // fixed MTRRs
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,       // fixed MTRRs
    0x6e0,       // IA32_TSC_DEADLINE
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Most MSRs per KVM_GET_MSRS/KVM_SET_MSRS call (KVM refuses 256 or more).
const MSR_BATCH: usize = KVM_MAX_MSR_ENTRIES - 1;

/// Variable-range MTRR base/mask pairs.
const MTRR_VAR_FIRST: u32 = 0x200;
const MTRR_VAR_LAST: u32 = 0x20f;

/// One CPUID entry as set in a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input).
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// FPU/SSE/AVX state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// The `kvm_xsave` area (4096 bytes, more with KVM_GET_XSAVE2).
    Xsave(Blob),
    /// `kvm_fpu`, on hosts without XSAVE.
    Legacy(Blob),
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC id).
    pub index: u8,
    /// CPUID as set in the vCPU (what the guest saw).
    pub cpuid: Vec<CpuidEntry>,
    /// KVM_MP_STATE_* value.
    pub mp_state: u32,
    /// `kvm_regs`.
    pub regs: Blob,
    /// `kvm_sregs`.
    pub sregs: Blob,
    /// FPU or XSAVE area.
    pub fpu: FpuState,
    /// `kvm_xcrs`, if the host has XCRs.
    pub xcrs: Option<Blob>,
    /// `kvm_debugregs`.
    pub debug_regs: Blob,
    /// `kvm_lapic_state`.
    pub lapic: Blob,
    /// MSRs, IA32_TSC first and IA32_TSC_DEADLINE last.
    pub msrs: Vec<MsrEntry>,
    /// `kvm_vcpu_events`.
    pub events: Blob,
    /// TSC frequency the guest ran with, in kHz.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// The general registers.
    pub fn regs(&self) -> Option<kvm_regs> {
        self.regs.decode()
    }

    /// The special registers.
    pub fn sregs(&self) -> Option<kvm_sregs> {
        self.sregs.decode()
    }

    /// The value of MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    /// Size in bytes of the saved XSAVE area (0 for legacy FPU state).
    pub fn xsave_size(&self) -> usize {
        match &self.fpu {
            FpuState::Xsave(b) => b.0.len(),
            FpuState::Legacy(_) => 0,
        }
    }

    /// Checks that every blob decodes, so restore cannot fail half-way on
    /// malformed input.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let bad = |what: &str| Err(format!("vCPU {}: malformed {what}", self.index));
        if self.regs.decode::<kvm_regs>().is_none() {
            return bad("regs");
        }
        if self.sregs.decode::<kvm_sregs>().is_none() {
            return bad("sregs");
        }
        match &self.fpu {
            FpuState::Xsave(b) => {
                let n = b.0.len();
                if n < std::mem::size_of::<kvm_xsave>() || n % 4 != 0 || n > 1 << 20 {
                    return bad("XSAVE area");
                }
            }
            FpuState::Legacy(b) if b.decode::<kvm_fpu>().is_none() => return bad("FPU state"),
            FpuState::Legacy(_) => {}
        }
        if let Some(x) = &self.xcrs {
            match x.decode::<kvm_xcrs>() {
                Some(x) if x.nr_xcrs as usize <= x.xcrs.len() => {}
                _ => return bad("XCRs"),
            }
        }
        if self.debug_regs.decode::<kvm_debugregs>().is_none() {
            return bad("debug registers");
        }
        if self.lapic.decode::<kvm_lapic_state>().is_none() {
            return bad("LAPIC");
        }
        if self.events.decode::<kvm_vcpu_events>().is_none() {
            return bad("vCPU events");
        }
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return bad("CPUID table");
        }
        Ok(())
    }
}

/// VM-wide KVM state: interrupt controllers, PIT and clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmKvmState {
    /// `kvm_irqchip` of the master PIC.
    pub pic_master: Blob,
    /// `kvm_irqchip` of the slave PIC.
    pub pic_slave: Blob,
    /// `kvm_irqchip` of the IOAPIC.
    pub ioapic: Blob,
    /// `kvm_pit_state2`.
    pub pit: Blob,
    /// `kvm_clock_data` (kvmclock).
    pub clock: Blob,
}

impl VmKvmState {
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (what, b) in [
            ("PIC master", &self.pic_master),
            ("PIC slave", &self.pic_slave),
            ("IOAPIC", &self.ioapic),
        ] {
            if b.decode::<kvm_irqchip>().is_none() {
                return Err(format!("malformed {what} state"));
            }
        }
        if self.pit.decode::<kvm_pit_state2>().is_none() {
            return Err("malformed PIT state".into());
        }
        if self.clock.decode::<kvm_clock_data>().is_none() {
            return Err("malformed clock state".into());
        }
        Ok(())
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// The MSRs to try saving: KVM's list (which names the paravirtual MSRs
/// of [`MSR_KVM_FIRST`]..=[`MSR_KVM_LAST`] this KVM implements) plus
/// [`EXTRA_MSRS`], the defined paravirtual ones and the MTRRs; unreadable
/// ones are dropped when read. IA32_TSC first and TSC_DEADLINE last.
///
/// Other MSRs of the paravirtual range are not probed: a hypervisor may
/// implement some there that the host can read but not write back.
pub(crate) fn msr_candidates(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut v: Vec<u32> = listed.as_slice().to_vec();
    v.extend_from_slice(EXTRA_MSRS);
    v.extend(MTRR_VAR_FIRST..=MTRR_VAR_LAST);
    v.extend(MSR_KVM_FIRST..=MSR_KVM_DEFINED_LAST);
    v.sort_unstable();
    v.dedup();
    sort_msrs_for_restore(&mut v, |i| *i);
    Ok(v)
}

/// IA32_TSC first, IA32_TSC_DEADLINE last (KVM interprets the deadline
/// against the guest TSC), the rest in between.
pub(crate) fn sort_msrs_for_restore<T>(v: &mut [T], index: impl Fn(&T) -> u32) {
    v.sort_by_key(|e| match index(e) {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
}

/// Reads the MSRs in `indices` that KVM lets us read.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>, SnapshotError> {
    let mut out = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Internal("MSR batch too large".into()))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let got = &msrs.as_slice()[..n.min(batch.len())];
        out.extend(got.iter().map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
        // KVM stops at the first MSR it cannot read: skip that one.
        let consumed = if n < batch.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// KVM_CAP_XSAVE2 size of the XSAVE area on this host (at least 4096), or
/// `None` without XSAVE support.
pub(crate) fn host_xsave_size(vm: &VmFd) -> Option<usize> {
    if !vm.check_extension(Cap::Xsave) {
        return None;
    }
    let base = std::mem::size_of::<kvm_xsave>();
    let n = vm.check_extension_int(Cap::Xsave2);
    Some(usize::try_from(n).map_or(base, |n| n.max(base)))
}

fn new_xsave(size: usize) -> Result<Xsave, SnapshotError> {
    let extra = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
    Xsave::new(extra).map_err(|_| SnapshotError::Internal("XSAVE area too large".into()))
}

fn read_fpu(fd: &VcpuFd, vm: &VmFd) -> Result<FpuState, SnapshotError> {
    let Some(size) = host_xsave_size(vm) else {
        return Ok(FpuState::Legacy(Blob::of(
            &fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
        )));
    };
    let mut xsave = new_xsave(size)?;
    if vm.check_extension_int(Cap::Xsave2) > 0 {
        // SAFETY: `xsave` was allocated with the size KVM_CAP_XSAVE2 reports,
        // so KVM_GET_XSAVE2 cannot write past it; no XSTATE feature is enabled
        // by this process after the size was read.
        unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
    } else {
        let legacy = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        // SAFETY: only the fixed 4096-byte part is written, which every
        // `Xsave` has.
        unsafe { xsave.as_mut_fam_struct() }.xsave.region = legacy.region;
    }
    let mut bytes = Vec::with_capacity(size);
    for w in xsave.as_fam_struct_ref().xsave.region.iter() {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    for w in xsave.as_slice() {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    Ok(FpuState::Xsave(Blob(bytes)))
}

fn write_fpu(fd: &VcpuFd, vm: &VmFd, fpu: &FpuState) -> Result<(), SnapshotError> {
    match fpu {
        FpuState::Legacy(b) => {
            let f: kvm_fpu = b.decode().ok_or(SnapshotError::Malformed("FPU state"))?;
            fd.set_fpu(&f).map_err(kvm_err("KVM_SET_FPU"))
        }
        FpuState::Xsave(b) => {
            let host = host_xsave_size(vm).ok_or(SnapshotError::XsaveSize {
                saved: b.0.len(),
                host: 0,
            })?;
            if b.0.len() > host {
                return Err(SnapshotError::XsaveSize {
                    saved: b.0.len(),
                    host,
                });
            }
            let mut xsave = new_xsave(host)?;
            let mut words =
                b.0.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            {
                // SAFETY: only the fixed part of the struct is touched; the
                // length field is left alone.
                let fixed = unsafe { xsave.as_mut_fam_struct() };
                for (dst, w) in fixed.xsave.region.iter_mut().zip(&mut words) {
                    *dst = w;
                }
            }
            for (dst, w) in xsave.as_mut_slice().iter_mut().zip(words) {
                *dst = w;
            }
            // SAFETY: `xsave` has the size KVM_CAP_XSAVE2 reports for this
            // host, so KVM reads only memory it owns.
            unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))
        }
    }
}

/// Reads the complete state of a parked vCPU; `cpuid` is the table the
/// vCPU was given.
pub(crate) fn capture_vcpu(
    index: u8,
    fd: &VcpuFd,
    cpuid: &[kvm_cpuid_entry2],
    vm: &VmFd,
    msr_indices: &[u32],
) -> Result<(VcpuState, Instant), SnapshotError> {
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let fpu = read_fpu(fd, vm)?;
    let xcrs = if vm.check_extension(Cap::Xcrs) {
        Some(Blob::of(&fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?))
    } else {
        None
    };
    let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    // IA32_TSC is the first MSR read.
    let tsc_read = Instant::now();
    let msrs = read_msrs(fd, msr_indices)?;
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    let tsc_khz = if vm.check_extension(Cap::GetTscKhz) {
        Some(fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?)
    } else {
        None
    };
    let state = VcpuState {
        index,
        cpuid: cpuid.iter().map(CpuidEntry::from).collect(),
        mp_state: mp_state.mp_state,
        regs: Blob::of(&regs),
        sregs: Blob::of(&sregs),
        fpu,
        xcrs,
        debug_regs: Blob::of(&debug_regs),
        lapic: Blob::of(&lapic),
        msrs,
        events: Blob::of(&events),
        tsc_khz,
    };
    Ok((state, tsc_read))
}

/// TSC frequencies closer than this (parts per million) count as equal.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

fn tsc_khz_differs(a: u32, b: u32) -> bool {
    u64::from(a.abs_diff(b)) * 1_000_000 > u64::from(a) * TSC_KHZ_TOLERANCE_PPM
}

/// Writes a saved state into a fresh vCPU, in the order KVM needs:
/// TSC frequency, CPUID, MP state, REGS, SREGS, XSAVE, XCRS, DEBUGREGS,
/// LAPIC, MSRs (TSC before TSC_DEADLINE), vCPU events, then
/// KVM_KVMCLOCK_CTRL. The state must have passed [`VcpuState::validate`].
/// Returns when the TSC was written, for [`restore_clock`].
pub(crate) fn restore_vcpu(
    fd: &VcpuFd,
    vm: &VmFd,
    s: &VcpuState,
) -> Result<Instant, SnapshotError> {
    if let Some(saved) = s.tsc_khz {
        let now = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        if tsc_khz_differs(saved, now) {
            fd.set_tsc_khz(saved)
                .map_err(|source| SnapshotError::TscFrequency { saved, now, source })?;
        }
    }
    let entries: Vec<kvm_cpuid_entry2> = s.cpuid.iter().map(kvm_cpuid_entry2::from).collect();
    let cpuid = CpuId::from_entries(&entries).map_err(|_| SnapshotError::Malformed("CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    let regs: kvm_regs = s.regs.decode().ok_or(SnapshotError::Malformed("regs"))?;
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    let sregs: kvm_sregs = s.sregs.decode().ok_or(SnapshotError::Malformed("sregs"))?;
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    write_fpu(fd, vm, &s.fpu)?;
    if let Some(x) = &s.xcrs {
        let xcrs: kvm_xcrs = x.decode().ok_or(SnapshotError::Malformed("XCRs"))?;
        fd.set_xcrs(&xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    let dregs: kvm_debugregs = s
        .debug_regs
        .decode()
        .ok_or(SnapshotError::Malformed("debug registers"))?;
    fd.set_debug_regs(&dregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    let lapic: kvm_lapic_state = s.lapic.decode().ok_or(SnapshotError::Malformed("LAPIC"))?;
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    // IA32_TSC is the first MSR written.
    let tsc_written = Instant::now();
    write_msrs(fd, &s.msrs)?;
    let events: kvm_vcpu_events = s
        .events
        .decode()
        .ok_or(SnapshotError::Malformed("vCPU events"))?;
    fd.set_vcpu_events(&events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    // Tells a kvmclock guest it was stopped, so its watchdogs do not fire.
    // EINVAL means the guest never enabled kvmclock: nothing to tell.
    if vm.check_extension(Cap::KvmclockCtrl) {
        match fd.kvmclock_ctrl() {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINVAL => {}
            Err(source) => {
                return Err(SnapshotError::Kvm {
                    what: "KVM_KVMCLOCK_CTRL",
                    source,
                })
            }
        }
    }
    Ok(tsc_written)
}

/// Writes MSRs; KVM accepting fewer than asked is an error naming the
/// first refused MSR.
fn write_msrs(fd: &VcpuFd, saved: &[MsrEntry]) -> Result<(), SnapshotError> {
    let mut msrs: Vec<MsrEntry> = saved.to_vec();
    sort_msrs_for_restore(&mut msrs, |m| m.index);
    for batch in msrs.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Internal("MSR batch too large".into()))?;
        let n = fd.set_msrs(&list).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != batch.len() {
            return Err(SnapshotError::MsrRefused {
                index: batch[n].index,
                set: n,
                wanted: batch.len(),
            });
        }
    }
    Ok(())
}

fn read_irqchip(vm: &VmFd, chip_id: u32) -> Result<Blob, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(Blob::of(&chip))
}

/// `MSR_KVM_SYSTEM_TIME_NEW`: where a vCPU's kvmclock page is.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `MSR_KVM_SYSTEM_TIME`, the same in the old range.
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

/// kvmclock as the guest itself reads it when its TSC is `saved`'s
/// IA32_TSC: from the kvmclock page the vCPU registered, so exactly what
/// the guest would have computed at that TSC. KVM's own reading of the
/// clock (KVM_GET_CLOCK) follows the host's clock, which the guest's
/// TSC-based extrapolation drifts from between KVM's updates of the page;
/// storing that instead would make the guest's clock jump against its TSC
/// on restore. `None` without a registered, consistent page.
pub(crate) fn guest_kvmclock(memory: &crate::GuestMemoryMmap, saved: &VcpuState) -> Option<u64> {
    use vm_memory::{Bytes, GuestAddress};
    let msr = |index: u32| saved.msrs.iter().find(|m| m.index == index).map(|m| m.data);
    let tsc = msr(MSR_IA32_TSC)?;
    let page = msr(MSR_KVM_SYSTEM_TIME_NEW)
        .filter(|v| v & 1 == 1)
        .or_else(|| msr(MSR_KVM_SYSTEM_TIME).filter(|v| v & 1 == 1))?;
    // struct pvclock_vcpu_time_info: version, pad, tsc_timestamp,
    // system_time, tsc_to_system_mul, tsc_shift, flags, pad.
    let info: [u8; 32] = memory.read_obj(GuestAddress(page & !1)).ok()?;
    let u32_at = |o: usize| u32::from_le_bytes(info[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(info[o..o + 8].try_into().unwrap_or_default());
    if u32_at(0) % 2 == 1 {
        return None; // KVM was writing it
    }
    let (stamp, system_time, mul, shift) = (u64_at(8), u64_at(16), u32_at(24), info[28] as i8);
    let delta = tsc.checked_sub(stamp)?;
    let delta = match shift {
        0..=31 => delta.checked_shl(shift as u32)?,
        -31..=-1 => delta >> shift.unsigned_abs(),
        _ => return None,
    };
    let ns = (u128::from(delta) * u128::from(mul)) >> 32;
    system_time.checked_add(u64::try_from(ns).ok()?)
}

/// Reads the VM-wide KVM state, after the vCPUs'. The clock is stored as
/// it stood when the first vCPU's TSC was read: `at_tsc` (the guest's own
/// reading, [`guest_kvmclock`]) if known, else KVM's reading taken back by
/// the time since `tsc_read`. kvmclock and the TSC then agree in the bundle.
pub(crate) fn capture_vm(
    vm: &VmFd,
    tsc_read: Option<Instant>,
    at_tsc: Option<u64>,
) -> Result<VmKvmState, SnapshotError> {
    let pic_master = read_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?;
    let pic_slave = read_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = read_irqchip(vm, KVM_IRQCHIP_IOAPIC)?;
    let pit = Blob::of(&vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?);
    let mut clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    match (at_tsc, tsc_read) {
        (Some(ns), _) => {
            tracing::debug!(
                "snapshot: kvmclock {} ns, as the guest reads it at its TSC {} ns",
                clock.clock,
                ns
            );
            clock.clock = ns;
        }
        (None, Some(at)) => clock.clock = clock.clock.saturating_sub(nanos_since(at)),
        (None, None) => {}
    }
    Ok(VmKvmState {
        pic_master,
        pic_slave,
        ioapic,
        pit,
        clock: Blob::of(&clock),
    })
}

fn nanos_since(at: Instant) -> u64 {
    u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Writes the VM-wide state but the clock: PIT, then irqchips. The state
/// must have passed [`VmKvmState::validate`].
pub(crate) fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), SnapshotError> {
    let pit: kvm_pit_state2 = s.pit.decode().ok_or(SnapshotError::Malformed("PIT"))?;
    vm.set_pit2(&pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    for (chip_id, blob) in [
        (KVM_IRQCHIP_PIC_MASTER, &s.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &s.pic_slave),
        (KVM_IRQCHIP_IOAPIC, &s.ioapic),
    ] {
        let mut chip: kvm_irqchip = blob.decode().ok_or(SnapshotError::Malformed("irqchip"))?;
        // The chip id comes from the slot, not from possibly hostile bytes.
        chip.chip_id = chip_id;
        vm.set_irqchip(&chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Sets kvmclock, once the vCPUs' TSCs are written (the first at
/// `tsc_written`). The clock continues from the saved value (the time the
/// VM spent frozen does not pass for the guest), advanced by the time since
/// the TSC was written: both then run from the same instant. A skew between
/// them makes the guest's clocksource watchdog declare its TSC unstable,
/// and print about it, on every restore.
pub(crate) fn restore_clock(
    vm: &VmFd,
    s: &VmKvmState,
    tsc_written: Option<Instant>,
) -> Result<(), SnapshotError> {
    let saved: kvm_clock_data = s.clock.decode().ok_or(SnapshotError::Malformed("clock"))?;
    let clock = kvm_clock_data {
        clock: saved
            .clock
            .saturating_add(tsc_written.map_or(0, nanos_since)),
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_restore_order() {
        let mut v = vec![0x6e0, 0xc000_0080, 0x10, 0x277, 0x4b56_4d01];
        sort_msrs_for_restore(&mut v, |i| *i);
        assert_eq!(v.first(), Some(&MSR_IA32_TSC));
        assert_eq!(v.last(), Some(&MSR_IA32_TSC_DEADLINE));
        assert_eq!(&v[1..4], &[0xc000_0080, 0x277, 0x4b56_4d01], "stable");
    }

    /// A vCPU whose TSC is `tsc` and whose kvmclock page is at `page` (or none).
    fn clock_vcpu(tsc: u64, page: Option<u64>) -> VcpuState {
        let mut msrs = vec![MsrEntry {
            index: MSR_IA32_TSC,
            data: tsc,
        }];
        if let Some(p) = page {
            msrs.push(MsrEntry {
                index: MSR_KVM_SYSTEM_TIME_NEW,
                data: p | 1,
            });
        }
        VcpuState {
            index: 0,
            cpuid: Vec::new(),
            mp_state: 0,
            regs: Blob(Vec::new()),
            sregs: Blob(Vec::new()),
            fpu: FpuState::Xsave(Blob(Vec::new())),
            xcrs: None,
            debug_regs: Blob(Vec::new()),
            lapic: Blob(Vec::new()),
            msrs,
            events: Blob(Vec::new()),
            tsc_khz: None,
        }
    }

    /// Guest memory with a kvmclock page at 0x2000.
    fn pvclock(
        version: u32,
        stamp: u64,
        system_time: u64,
        mul: u32,
        shift: i8,
    ) -> crate::GuestMemoryMmap {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let mut info = [0u8; 32];
        info[0..4].copy_from_slice(&version.to_le_bytes());
        info[8..16].copy_from_slice(&stamp.to_le_bytes());
        info[16..24].copy_from_slice(&system_time.to_le_bytes());
        info[24..28].copy_from_slice(&mul.to_le_bytes());
        info[28] = shift as u8;
        mem.write_obj(info, GuestAddress(0x2000)).unwrap();
        mem
    }

    #[test]
    fn the_clock_is_read_as_the_guest_reads_it_at_its_tsc() {
        // A 2 GHz TSC: 0.5 ns per cycle is mul 2^31 with shift 0.
        let mem = pvclock(4, 1_000_000, 7_000_000_000, 1 << 31, 0);
        let v = clock_vcpu(1_000_000 + 2_000_000_000, Some(0x2000));
        assert_eq!(guest_kvmclock(&mem, &v), Some(8_000_000_000));
        // The same with a shift: 4 GHz halved before scaling.
        let mem = pvclock(2, 0, 0, 1 << 31, -1);
        assert_eq!(
            guest_kvmclock(&mem, &clock_vcpu(4_000, Some(0x2000))),
            Some(1_000)
        );
        // An update in progress, no page, a TSC before the stamp, a page
        // outside guest RAM, an absurd shift: none.
        let odd = pvclock(5, 0, 0, 1 << 31, 0);
        assert_eq!(guest_kvmclock(&odd, &clock_vcpu(10, Some(0x2000))), None);
        assert_eq!(guest_kvmclock(&mem, &clock_vcpu(10, None)), None);
        let late = pvclock(2, 100, 0, 1 << 31, 0);
        assert_eq!(guest_kvmclock(&late, &clock_vcpu(10, Some(0x2000))), None);
        assert_eq!(guest_kvmclock(&mem, &clock_vcpu(10, Some(0x10_0000))), None);
        let wild = pvclock(2, 0, 0, 1 << 31, 100);
        assert_eq!(guest_kvmclock(&wild, &clock_vcpu(10, Some(0x2000))), None);
    }

    #[test]
    fn tsc_tolerance() {
        assert!(!tsc_khz_differs(2_000_000, 2_000_400));
        assert!(tsc_khz_differs(2_000_000, 2_001_000));
        assert!(tsc_khz_differs(3_000_000, 2_000_000));
    }

    #[test]
    fn validation_catches_bad_blobs() {
        let good = VcpuState {
            index: 0,
            cpuid: vec![CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 1,
                ebx: 0,
                ecx: 0,
                edx: 0,
            }],
            mp_state: 0,
            regs: Blob::of(&kvm_regs::default()),
            sregs: Blob::of(&kvm_sregs::default()),
            fpu: FpuState::Xsave(Blob(vec![0; 4096])),
            xcrs: Some(Blob::of(&kvm_xcrs::default())),
            debug_regs: Blob::of(&kvm_debugregs::default()),
            lapic: Blob::of(&kvm_lapic_state::default()),
            msrs: vec![],
            events: Blob::of(&kvm_vcpu_events::default()),
            tsc_khz: Some(1_000_000),
        };
        assert!(good.validate().is_ok());
        let mut bad = good.clone();
        bad.fpu = FpuState::Xsave(Blob(vec![0; 100]));
        assert!(bad.validate().unwrap_err().contains("XSAVE"));
        let mut bad = good.clone();
        bad.lapic = Blob(vec![1, 2, 3]);
        assert!(bad.validate().unwrap_err().contains("LAPIC"));
        let mut bad = good.clone();
        let x = kvm_xcrs {
            nr_xcrs: 1000,
            ..Default::default()
        };
        bad.xcrs = Some(Blob::of(&x));
        assert!(bad.validate().unwrap_err().contains("XCRs"));
        let mut bad = good;
        bad.cpuid.clear();
        assert!(bad.validate().is_err());
    }
}
