//! The error type of VM creation, with stable codes for users.

use std::io;

use crate::arch::boot::BootError;
use crate::arch::mptable::MpTableError;
use crate::devices::DeviceError;
use crate::memory::MemoryError;
use crate::snapshot::SnapshotError;
use crate::vcpu::VcpuError;

/// Message of [`VmError::KvmPvmUnsupported`].
pub const PVM_MESSAGE: &str = "the host's KVM is the PVM hypervisor, a stock guest kernel cannot run on it; \
                               use a PVM-capable guest kernel via --kernel, or run inside a test host";

/// Why a VM could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// KVM cannot be used on this host.
    #[error("KVM is not available: {reason}")]
    KvmUnavailable {
        /// What is missing.
        reason: String,
        /// The failing call.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host runs the PVM hypervisor.
    #[error("{PVM_MESSAGE}")]
    KvmPvmUnsupported,
    /// A KVM VM-level ioctl failed.
    #[error("KVM setup failed: {what}")]
    KvmSetup {
        /// The operation.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be set up.
    #[error("guest memory setup failed")]
    Memory(#[source] MemoryError),
    /// The kernel could not be loaded.
    #[error("cannot load the kernel")]
    KernelLoad(#[source] BootError),
    /// The initramfs could not be loaded.
    #[error("cannot load the initramfs")]
    InitramfsLoad(#[source] BootError),
    /// Writing boot structures failed.
    #[error("boot setup failed")]
    Boot(#[source] BootError),
    /// Writing the MP table failed.
    #[error("boot setup failed")]
    MpTable(#[source] MpTableError),
    /// A device could not be created.
    #[error("device setup failed")]
    Device(#[source] DeviceError),
    /// A vCPU could not be created or configured.
    #[error("vCPU {index} setup failed")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// The underlying error.
        #[source]
        source: VcpuError,
    },
    /// A VM thread could not be started.
    #[error("cannot start VM threads")]
    ThreadSpawn(#[source] io::Error),
    /// The saved state is malformed or does not fit the config.
    #[error("saved VM state is unusable: {0}")]
    RestoreStateInvalid(String),
    /// The memory source does not fit guest memory or its files.
    #[error("saved VM memory is unusable: {0}")]
    RestoreMemoryInvalid(String),
    /// This host cannot run the saved guest's CPU model.
    #[error("this host's CPU lacks what the saved guest uses: {}", .0.join(", "))]
    RestoreCpuIncompatible(Vec<String>),
    /// Writing the saved state into KVM failed.
    #[error("cannot restore the VM state")]
    Restore(#[source] SnapshotError),
}

impl VmError {
    /// A stable, machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            VmError::InvalidConfig(_) => "INVALID_CONFIG",
            VmError::KvmUnavailable { .. } => "KVM_UNAVAILABLE",
            VmError::KvmPvmUnsupported => "KVM_PVM_UNSUPPORTED",
            VmError::KvmSetup { .. } => "KVM_SETUP_FAILED",
            VmError::Memory(_) => "MEMORY_SETUP_FAILED",
            VmError::KernelLoad(_) => "KERNEL_LOAD_FAILED",
            VmError::InitramfsLoad(_) => "INITRAMFS_LOAD_FAILED",
            VmError::Boot(_) | VmError::MpTable(_) => "BOOT_SETUP_FAILED",
            VmError::Device(e) => e.code(),
            VmError::Vcpu { .. } => "VCPU_SETUP_FAILED",
            VmError::ThreadSpawn(_) => "THREAD_SPAWN_FAILED",
            VmError::RestoreStateInvalid(_) => "RESTORE_STATE_INVALID",
            VmError::RestoreMemoryInvalid(_) => "RESTORE_MEMORY_INVALID",
            VmError::RestoreCpuIncompatible(_) => "SNAPSHOT_CPU_INCOMPATIBLE",
            VmError::Restore(e) => match e {
                SnapshotError::Kvm { .. } | SnapshotError::MsrRefused { .. } => {
                    "RESTORE_KVM_FAILED"
                }
                other => other.code(),
            },
        }
    }

    /// The message with every cause appended, for logs and users.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}

impl From<crate::kvm::KvmUnavailable> for VmError {
    fn from(e: crate::kvm::KvmUnavailable) -> Self {
        VmError::KvmUnavailable {
            reason: e.reason,
            source: e.source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        assert_eq!(VmError::KvmPvmUnsupported.code(), "KVM_PVM_UNSUPPORTED");
        assert!(VmError::KvmPvmUnsupported
            .to_string()
            .contains("PVM hypervisor"));
        let e = VmError::KvmUnavailable {
            reason: "no permission to open /dev/kvm".into(),
            source: kvm_ioctls::Error::new(libc::EACCES),
        };
        assert_eq!(e.code(), "KVM_UNAVAILABLE");
        assert!(e.chain().contains("no permission"));
        let e = VmError::KernelLoad(BootError::KernelLoad {
            path: "/k".into(),
            reason: "bad magic".into(),
        });
        assert_eq!(e.code(), "KERNEL_LOAD_FAILED");
        assert_eq!(
            e.chain(),
            "cannot load the kernel: cannot load kernel /k: bad magic"
        );
    }
}
