//! Opening KVM and checking the host can run ferry guests.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// KVM cannot be used on this host: what is missing, and the failing call.
/// (Its own type, not [`crate::VmError`], so that modules below the VM
/// builder can open KVM without depending on it.)
#[derive(Debug, thiserror::Error)]
#[error("KVM is not available: {reason}")]
pub struct KvmUnavailable {
    /// What is missing.
    pub reason: String,
    /// The failing call.
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Present when the host's KVM is the PVM hypervisor.
pub const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// KVM capabilities the VMM relies on.
const REQUIRED_CAPS: [(Cap, &str); 8] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory slots"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::ExtCpuid, "CPUID2"),
    (Cap::ImmediateExit, "immediate_exit"),
];

/// Whether the host's KVM is the PVM hypervisor, which cannot run a stock
/// guest kernel.
pub fn host_is_pvm() -> bool {
    Path::new(PVM_MODULE_PATH).exists()
}

/// Opens `/dev/kvm` and checks the capabilities ferry needs.
pub fn open_kvm() -> Result<Kvm, KvmUnavailable> {
    let kvm = Kvm::new().map_err(|source| KvmUnavailable {
        reason: match source.errno() {
            libc::ENOENT => "/dev/kvm does not exist (is KVM enabled on this host?)".to_string(),
            libc::EACCES | libc::EPERM => {
                "no permission to open /dev/kvm (add the user to the kvm group)".to_string()
            }
            _ => "cannot open /dev/kvm".to_string(),
        },
        source,
    })?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmUnavailable {
            reason: format!("unsupported KVM API version {version}"),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmUnavailable {
                reason: format!("KVM lacks {name} support"),
                source: kvm_ioctls::Error::new(libc::ENOTSUP),
            });
        }
    }
    Ok(kvm)
}

/// Why a VM cannot be created on this host, or `None` if KVM is usable.
/// PVM counts as usable here; [`crate::Vm::create`] refuses it separately.
pub fn kvm_unavailable_reason() -> Option<String> {
    open_kvm().err().map(|e| e.to_string())
}
