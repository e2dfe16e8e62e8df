//! CPU compatibility between the host a VM was saved on and this one.
//!
//! A saved guest keeps using the CPUID it booted with. Restoring it where
//! KVM cannot offer one of those features would let the guest execute
//! instructions the host faults on, so restore refuses it by name.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};

use super::kvm_state::{host_xsave_size, CpuidEntry};
use super::{SnapshotError, VmState};
use crate::kvm::open_kvm;

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// (leaf, sub-leaf, register, bit, name), names as in /proc/cpuinfo.
const FEATURES: &[(u32, u32, Reg, u32, &str)] = &[
    (1, 0, Reg::Edx, 0, "fpu"),
    (1, 0, Reg::Edx, 4, "tsc"),
    (1, 0, Reg::Edx, 5, "msr"),
    (1, 0, Reg::Edx, 6, "pae"),
    (1, 0, Reg::Edx, 8, "cx8"),
    (1, 0, Reg::Edx, 9, "apic"),
    (1, 0, Reg::Edx, 11, "sep"),
    (1, 0, Reg::Edx, 12, "mtrr"),
    (1, 0, Reg::Edx, 13, "pge"),
    (1, 0, Reg::Edx, 15, "cmov"),
    (1, 0, Reg::Edx, 16, "pat"),
    (1, 0, Reg::Edx, 19, "clflush"),
    (1, 0, Reg::Edx, 23, "mmx"),
    (1, 0, Reg::Edx, 24, "fxsr"),
    (1, 0, Reg::Edx, 25, "sse"),
    (1, 0, Reg::Edx, 26, "sse2"),
    (1, 0, Reg::Ecx, 0, "pni"),
    (1, 0, Reg::Ecx, 1, "pclmulqdq"),
    (1, 0, Reg::Ecx, 9, "ssse3"),
    (1, 0, Reg::Ecx, 12, "fma"),
    (1, 0, Reg::Ecx, 13, "cx16"),
    (1, 0, Reg::Ecx, 17, "pcid"),
    (1, 0, Reg::Ecx, 19, "sse4_1"),
    (1, 0, Reg::Ecx, 20, "sse4_2"),
    (1, 0, Reg::Ecx, 21, "x2apic"),
    (1, 0, Reg::Ecx, 22, "movbe"),
    (1, 0, Reg::Ecx, 23, "popcnt"),
    (1, 0, Reg::Ecx, 24, "tsc_deadline_timer"),
    (1, 0, Reg::Ecx, 25, "aes"),
    (1, 0, Reg::Ecx, 26, "xsave"),
    (1, 0, Reg::Ecx, 28, "avx"),
    (1, 0, Reg::Ecx, 29, "f16c"),
    (1, 0, Reg::Ecx, 30, "rdrand"),
    (7, 0, Reg::Ebx, 0, "fsgsbase"),
    (7, 0, Reg::Ebx, 3, "bmi1"),
    (7, 0, Reg::Ebx, 4, "hle"),
    (7, 0, Reg::Ebx, 5, "avx2"),
    (7, 0, Reg::Ebx, 7, "smep"),
    (7, 0, Reg::Ebx, 8, "bmi2"),
    (7, 0, Reg::Ebx, 9, "erms"),
    (7, 0, Reg::Ebx, 10, "invpcid"),
    (7, 0, Reg::Ebx, 11, "rtm"),
    (7, 0, Reg::Ebx, 16, "avx512f"),
    (7, 0, Reg::Ebx, 17, "avx512dq"),
    (7, 0, Reg::Ebx, 18, "rdseed"),
    (7, 0, Reg::Ebx, 19, "adx"),
    (7, 0, Reg::Ebx, 20, "smap"),
    (7, 0, Reg::Ebx, 21, "avx512ifma"),
    (7, 0, Reg::Ebx, 23, "clflushopt"),
    (7, 0, Reg::Ebx, 24, "clwb"),
    (7, 0, Reg::Ebx, 28, "avx512cd"),
    (7, 0, Reg::Ebx, 29, "sha_ni"),
    (7, 0, Reg::Ebx, 30, "avx512bw"),
    (7, 0, Reg::Ebx, 31, "avx512vl"),
    (7, 0, Reg::Ecx, 1, "avx512vbmi"),
    (7, 0, Reg::Ecx, 2, "umip"),
    (7, 0, Reg::Ecx, 3, "pku"),
    (7, 0, Reg::Ecx, 5, "waitpkg"),
    (7, 0, Reg::Ecx, 6, "avx512_vbmi2"),
    (7, 0, Reg::Ecx, 8, "gfni"),
    (7, 0, Reg::Ecx, 9, "vaes"),
    (7, 0, Reg::Ecx, 10, "vpclmulqdq"),
    (7, 0, Reg::Ecx, 11, "avx512_vnni"),
    (7, 0, Reg::Ecx, 12, "avx512_bitalg"),
    (7, 0, Reg::Ecx, 14, "avx512_vpopcntdq"),
    (7, 0, Reg::Ecx, 16, "la57"),
    (7, 0, Reg::Ecx, 22, "rdpid"),
    (7, 0, Reg::Ecx, 27, "movdiri"),
    (7, 0, Reg::Ecx, 28, "movdir64b"),
    (7, 0, Reg::Edx, 4, "fsrm"),
    (7, 0, Reg::Edx, 8, "avx512_vp2intersect"),
    (7, 0, Reg::Edx, 14, "serialize"),
    (7, 0, Reg::Edx, 22, "amx_bf16"),
    (7, 0, Reg::Edx, 23, "avx512_fp16"),
    (7, 0, Reg::Edx, 24, "amx_tile"),
    (7, 0, Reg::Edx, 25, "amx_int8"),
    (7, 1, Reg::Eax, 4, "avx_vnni"),
    (7, 1, Reg::Eax, 5, "avx512_bf16"),
    (0xd, 1, Reg::Eax, 0, "xsaveopt"),
    (0xd, 1, Reg::Eax, 1, "xsavec"),
    (0xd, 1, Reg::Eax, 2, "xgetbv1"),
    (0xd, 1, Reg::Eax, 3, "xsaves"),
    (0x8000_0001, 0, Reg::Ecx, 0, "lahf_lm"),
    (0x8000_0001, 0, Reg::Ecx, 5, "abm"),
    (0x8000_0001, 0, Reg::Ecx, 6, "sse4a"),
    (0x8000_0001, 0, Reg::Ecx, 7, "misalignsse"),
    (0x8000_0001, 0, Reg::Ecx, 8, "3dnowprefetch"),
    (0x8000_0001, 0, Reg::Ecx, 11, "xop"),
    (0x8000_0001, 0, Reg::Ecx, 16, "fma4"),
    (0x8000_0001, 0, Reg::Ecx, 21, "tbm"),
    (0x8000_0001, 0, Reg::Edx, 11, "syscall"),
    (0x8000_0001, 0, Reg::Edx, 20, "nx"),
    (0x8000_0001, 0, Reg::Edx, 22, "mmxext"),
    (0x8000_0001, 0, Reg::Edx, 26, "pdpe1gb"),
    (0x8000_0001, 0, Reg::Edx, 27, "rdtscp"),
    (0x8000_0001, 0, Reg::Edx, 29, "lm"),
    (0x8000_0008, 0, Reg::Ebx, 0, "clzero"),
    (0x8000_0008, 0, Reg::Ebx, 9, "wbnoinvd"),
];

fn lookup(entries: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn has(entries: &[CpuidEntry], (f, i, reg, bit): (u32, u32, Reg, u32)) -> bool {
    lookup(entries, f, i).is_some_and(|e| {
        let v = match reg {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        };
        v & (1 << bit) != 0
    })
}

/// The CPU vendor string of a CPUID table ("GenuineIntel", "AuthenticAMD").
pub fn vendor(entries: &[CpuidEntry]) -> String {
    let Some(e) = lookup(entries, 0, 0) else {
        return String::new();
    };
    let mut bytes = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string()
}

/// Names of the known features a CPUID table has.
pub fn features_of(entries: &[CpuidEntry]) -> Vec<String> {
    FEATURES
        .iter()
        .filter(|(f, i, r, b, _)| has(entries, (*f, *i, *r, *b)))
        .map(|(.., name)| (*name).to_string())
        .collect()
}

/// Features the saved guest saw (from vCPU 0's CPUID).
pub fn cpu_features(state: &VmState) -> Vec<String> {
    state
        .vcpus
        .first()
        .map(|v| features_of(&v.cpuid))
        .unwrap_or_default()
}

/// What KVM on this host supports (KVM_GET_SUPPORTED_CPUID).
pub fn host_cpuid() -> Result<Vec<CpuidEntry>, SnapshotError> {
    let kvm = open_kvm().map_err(|e| SnapshotError::Host(e.to_string()))?;
    // Asked with a VM in existence, as VM creation does: some KVM flavours
    // (PVM) only report the full set once their VM support is loaded.
    let _vm = kvm.create_vm().map_err(|source| SnapshotError::Kvm {
        what: "KVM_CREATE_VM",
        source,
    })?;
    offered_cpuid(&kvm).map_err(|source| SnapshotError::Kvm {
        what: "KVM_GET_SUPPORTED_CPUID",
        source,
    })
}

/// KVM's supported CPUID plus what every ferry VMM offers on top of it
/// (see [`crate::arch::cpuid::vcpu_cpuid`]): what a guest here can rely on.
fn offered_cpuid(kvm: &Kvm) -> Result<Vec<CpuidEntry>, kvm_ioctls::Error> {
    let mut host: Vec<CpuidEntry> = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?
        .as_slice()
        .iter()
        .map(CpuidEntry::from)
        .collect();
    for e in host.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= crate::arch::cpuid::ECX_TSC_DEADLINE;
    }
    Ok(host)
}

/// Named features KVM on this host can give a guest.
pub fn host_cpu_features() -> Result<Vec<String>, SnapshotError> {
    Ok(features_of(&host_cpuid()?))
}

/// What a guest with CPUID `saved` needs that a host offering `host` lacks:
/// feature names, plus a `vendor:` entry if the vendors differ.
pub fn missing_features(saved: &[CpuidEntry], host: &[CpuidEntry]) -> Vec<String> {
    let mut out: Vec<String> = FEATURES
        .iter()
        .filter(|(f, i, r, b, _)| has(saved, (*f, *i, *r, *b)) && !has(host, (*f, *i, *r, *b)))
        .map(|(.., name)| (*name).to_string())
        .collect();
    let (sv, hv) = (vendor(saved), vendor(host));
    if sv != hv {
        out.push(format!("vendor:{sv} (host {hv})"));
    }
    out
}

/// Checks that this host can run the saved guest: every named feature of
/// its CPUID is supported by KVM here, the vendor matches, and the XSAVE
/// area fits. Returns the problems by name.
pub fn check_cpu_compatible(state: &VmState) -> Result<(), Vec<String>> {
    let kvm = open_kvm().map_err(|e| vec![format!("cannot open KVM: {e}")])?;
    let vm = kvm
        .create_vm()
        .map_err(|e| vec![format!("cannot create a KVM VM: {e}")])?;
    check_cpu_compatible_on(state, &kvm, &vm)
}

/// [`check_cpu_compatible`] with a KVM VM already created on this host, which
/// spares creating another (expensive under nested virtualization).
pub fn check_cpu_compatible_on(state: &VmState, kvm: &Kvm, vm: &VmFd) -> Result<(), Vec<String>> {
    let host = offered_cpuid(kvm).map_err(|e| vec![format!("cannot query host CPU: {e}")])?;
    let mut problems = Vec::new();
    if let Some(v) = state.vcpus.first() {
        problems = missing_features(&v.cpuid, &host);
    }
    let host_xsave = host_xsave_size(vm).unwrap_or(0);
    let saved_xsave = state
        .vcpus
        .iter()
        .map(|v| v.xsave_size())
        .max()
        .unwrap_or(0);
    if saved_xsave > host_xsave {
        problems.push(format!(
            "xsave_size:{saved_xsave} (host {host_xsave} bytes)"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    const INTEL: (u32, u32, u32) = (0x756e_6547, 0x6c65_746e, 0x4965_6e69);

    fn intel(leaf1_ecx: u32, leaf7_ebx: u32) -> Vec<CpuidEntry> {
        vec![
            e(0, 0, 0xd, INTEL.0, INTEL.1, INTEL.2),
            e(1, 0, 0, 0, leaf1_ecx, 1 << 26),
            e(7, 0, 0, leaf7_ebx, 0, 0),
        ]
    }

    #[test]
    fn names_and_vendor() {
        let t = intel((1 << 20) | (1 << 26), 1 << 5);
        assert_eq!(vendor(&t), "GenuineIntel");
        let f = features_of(&t);
        for want in ["sse2", "sse4_2", "xsave", "avx2"] {
            assert!(f.iter().any(|n| n == want), "{want} in {f:?}");
        }
        assert!(!f.iter().any(|n| n == "avx"));
    }

    #[test]
    fn missing_features_are_listed() {
        let saved = intel((1 << 20) | (1 << 26), (1 << 5) | (1 << 16));
        let host = intel(1 << 26, 1 << 5);
        assert_eq!(missing_features(&saved, &host), vec!["sse4_2", "avx512f"]);
        assert!(missing_features(&host, &saved).is_empty(), "subset is fine");

        let mut amd = host.clone();
        amd[0] = e(0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65);
        assert_eq!(vendor(&amd), "AuthenticAMD");
        let m = missing_features(&host, &amd);
        assert_eq!(m, vec!["vendor:GenuineIntel (host AuthenticAMD)"]);
    }
}
