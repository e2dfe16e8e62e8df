//! Per-vCPU CPUID derived from what KVM supports.
//!
//! ferry describes a single socket with one core per vCPU, marks the CPU as
//! running under a hypervisor, and hides features it does not emulate (PMU,
//! nested virtualisation, thermal and debug-store facilities).

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;
const LEAF_EXT_PERFMON_V2: u32 = 0x8000_0022;

// Leaf 1 ECX.
const ECX_DTES64: u32 = 1 << 2;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_DS_CPL: u32 = 1 << 4;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_XTPR: u32 = 1 << 14;
const ECX_PDCM: u32 = 1 << 15;
/// The LAPIC timer's TSC-deadline mode. KVM emulates it with its in-kernel
/// LAPIC (which ferry always uses) but leaves it out of
/// KVM_GET_SUPPORTED_CPUID: the VMM must offer it.
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX.
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI: u32 = 1 << 22;
const EDX_HTT: u32 = 1 << 28;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
// Leaf 0x8000_0001 ECX (AMD).
const EXT_ECX_SVM: u32 = 1 << 2;
const EXT_ECX_PERFCTR_CORE: u32 = 1 << 23;
const EXT_ECX_PERFCTR_NB: u32 = 1 << 24;
const EXT_ECX_PERFCTR_LLC: u32 = 1 << 28;

/// Topology level types of leaves 0xB/0x1F.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vendor {
    Intel,
    Amd,
    Other,
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match entries.iter().find(|e| e.function == LEAF_VENDOR) {
        Some(e) if [e.ebx, e.edx, e.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e] => {
            Vendor::Intel
        }
        Some(e) if [e.ebx, e.edx, e.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163] => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` items.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_entry(function: u32, index: u32, apic_id: u32, n_vcpus: u32) -> kvm_cpuid_entry2 {
    let (eax, ebx, ecx) = match index {
        0 => (0, 1, LEVEL_SMT << 8),
        1 => (id_bits(n_vcpus), n_vcpus, (LEVEL_CORE << 8) | 1),
        i => (0, 0, i),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

/// CPUID for the vCPU with APIC id `apic_id` out of `n_vcpus`, from the
/// entries KVM_GET_SUPPORTED_CPUID returned.
pub fn vcpu_cpuid(
    supported: &[kvm_cpuid_entry2],
    apic_id: u8,
    n_vcpus: u8,
) -> Vec<kvm_cpuid_entry2> {
    let apic = u32::from(apic_id);
    let n = u32::from(n_vcpus);
    let vendor = vendor(supported);
    let max_basic = supported
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax);
    let had_v2 = supported.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);

    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    for e in &mut out {
        match e.function {
            LEAF_FEATURES => {
                // Brand index stays; CLFLUSH line size 8 qwords.
                e.ebx = (apic << 24) | ((n & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
                // Without TSC-deadline the guest's timer ends up on the PIT:
                // several port I/O exits for every timer it arms, and it arms
                // one each time it goes idle.
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                e.ecx &= !(ECX_DTES64
                    | ECX_MONITOR
                    | ECX_DS_CPL
                    | ECX_VMX
                    | ECX_SMX
                    | ECX_EST
                    | ECX_TM2
                    | ECX_XTPR
                    | ECX_PDCM);
                e.edx &= !(EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE);
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let level = (e.eax >> 5) & 0x7;
                e.eax &= !((0x3f << 26) | (0xfff << 14));
                e.eax |= ((n - 1) & 0x3f) << 26;
                // L3 is shared by the whole socket, lower levels per core.
                if level == 3 {
                    e.eax |= ((n - 1) & 0xfff) << 14;
                }
            }
            LEAF_PERFMON | LEAF_EXT_PERFMON_V2 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_HYPERVISOR => {
                e.eax = e.eax.max(LEAF_HYPERVISOR + 1);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            LEAF_EXT_FEATURES => {
                e.ecx &= !(EXT_ECX_SVM
                    | EXT_ECX_PERFCTR_CORE
                    | EXT_ECX_PERFCTR_NB
                    | EXT_ECX_PERFCTR_LLC);
            }
            LEAF_EXT_ADDR_SIZES if vendor == Vendor::Amd => {
                e.ecx = (id_bits(n) << 12) | ((n - 1) & 0xff);
            }
            LEAF_EXT_APIC_ID if vendor == Vendor::Amd => {
                // One thread per core, one node.
                e.eax = apic;
                e.ebx = apic & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    if max_basic >= LEAF_TOPOLOGY {
        for index in 0..3 {
            out.push(topology_entry(LEAF_TOPOLOGY, index, apic, n));
        }
    }
    if had_v2 && max_basic >= LEAF_TOPOLOGY_V2 {
        for index in 0..3 {
            out.push(topology_entry(LEAF_TOPOLOGY_V2, index, apic, n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn intel_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(
                1,
                0,
                0x906ea,
                0x0010_0800,
                ECX_VMX | ECX_PDCM | 1,
                EDX_ACPI | 1,
            ),
            entry(4, 0, (1 << 5) | 0x121, 0, 0, 0),
            entry(4, 3, (3 << 5) | 0x163, 0, 0, 0),
            entry(0xa, 0, 0x0703_0104, 0xff, 0, 0x603),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0x1f, 0, 1, 2, 0x100, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, EXT_ECX_PERFCTR_CORE | 1, 0),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let out = vcpu_cpuid(&intel_host(), 3, 4);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(
            l1.ecx & ECX_TSC_DEADLINE,
            0,
            "the guest's timer needs TSC-deadline"
        );
        assert_eq!(l1.ecx & (ECX_VMX | ECX_PDCM), 0);
        assert_eq!(l1.ecx & 1, 1, "unrelated features kept");
        assert_eq!(l1.edx & EDX_ACPI, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(
            vcpu_cpuid(&intel_host(), 0, 1)
                .iter()
                .find(|e| e.function == 1)
                .unwrap()
                .edx
                & EDX_HTT,
            0
        );
    }

    #[test]
    fn topology_leaves_describe_one_socket() {
        let out = vcpu_cpuid(&intel_host(), 5, 6);
        for leaf in [0xb, 0x1f] {
            let entries: Vec<_> = out.iter().filter(|e| e.function == leaf).collect();
            assert_eq!(entries.len(), 3, "leaf {leaf:#x}");
            assert!(entries
                .iter()
                .all(|e| e.edx == 5 && e.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX));
            let smt = find(&out, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff), (0, 1, LEVEL_SMT));
            let core = find(&out, leaf, 1);
            assert_eq!(
                (core.eax, core.ebx, (core.ecx >> 8) & 0xff),
                (3, 6, LEVEL_CORE)
            );
            assert_eq!((find(&out, leaf, 2).ecx >> 8) & 0xff, 0, "end of levels");
        }
        let l1 = find(&out, 4, 0);
        let l3 = find(&out, 4, 3);
        assert_eq!(l1.eax >> 26, 5);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 5);
        assert_eq!(
            l1.eax & 0x3fff,
            (1 << 5) | 0x121,
            "cache type and level kept"
        );
    }

    #[test]
    fn pmu_hidden_and_kvm_signature() {
        let out = vcpu_cpuid(&intel_host(), 0, 1);
        let pm = find(&out, 0xa, 0);
        assert_eq!((pm.eax, pm.ebx, pm.ecx, pm.edx), (0, 0, 0, 0));
        let hv = find(&out, 0x4000_0000, 0);
        let mut sig = Vec::new();
        for r in [hv.ebx, hv.ecx, hv.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(find(&out, 0x8000_0001, 0).ecx, 1);
    }

    #[test]
    fn amd_core_count() {
        let host = vec![
            entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(1, 0, 0x00a2_0f10, 0, 0, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0x7003, 0),
            entry(0x8000_001e, 0, 9, 0x100, 0x300, 0),
        ];
        let out = vcpu_cpuid(&host, 2, 3);
        let sizes = find(&out, 0x8000_0008, 0);
        assert_eq!((sizes.ecx & 0xff, (sizes.ecx >> 12) & 0xf), (2, 2));
        assert_eq!(sizes.eax, 0x3030);
        let ext = find(&out, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (2, 2, 0));
        assert_eq!(out.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(out.iter().all(|e| e.function != 0x1f));
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(
            [
                id_bits(1),
                id_bits(2),
                id_bits(3),
                id_bits(4),
                id_bits(5),
                id_bits(254)
            ],
            [0, 1, 2, 2, 3, 8]
        );
    }
}
