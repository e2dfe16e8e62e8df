//! The VM description the VMM is started with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use ferry_devices::virtio::block::BlockConfig as DiskConfig;
pub use ferry_devices::virtio::fs::FsConfig;
pub use ferry_devices::virtio::net::{MacAddr, NetBackend, NetConfig};
pub use ferry_devices::virtio::vsock::VsockConfig;

/// Largest vCPU count: APIC ids are 8 bits in the MP table and the I/O APIC
/// takes the id after the last vCPU.
pub const MAX_VCPUS: u8 = 254;
/// Smallest guest RAM ferry accepts.
pub const MIN_MEMORY_MIB: u64 = 32;

/// Everything needed to create a VM. Serializable so it can be stored in
/// the VM's state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub cpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Uncompressed ELF kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Arguments appended to the command line ferry builds.
    #[serde(default)]
    pub cmdline_extra: String,
    /// Initramfs (cpio, optionally compressed).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Disks, in the order the guest sees them (`vda`, `vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// vsock device with its host Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// File receiving the guest's serial console output (appended).
    pub console_log: PathBuf,
    /// Attach a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Shared host directories (virtio-fs), attached after the other devices.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Network device (virtio-net) and its frame backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetConfig>,
    /// Run even on the PVM hypervisor, whose KVM cannot boot a stock kernel.
    /// Meant for ferry's own low-level tests.
    #[serde(default)]
    pub allow_pvm: bool,
}

impl VmConfig {
    /// A config with the given kernel and console log, 1 vCPU, 256 MiB, no devices.
    pub fn new(kernel: impl Into<PathBuf>, console_log: impl Into<PathBuf>) -> Self {
        Self {
            cpus: 1,
            memory_mib: 256,
            kernel: kernel.into(),
            cmdline_extra: String::new(),
            initramfs: None,
            disks: Vec::new(),
            vsock: None,
            console_log: console_log.into(),
            rng: false,
            fs: Vec::new(),
            net: None,
            allow_pvm: false,
        }
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Checks the values that do not need the host to be checked.
    pub fn validate(&self) -> Result<(), String> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(format!("cpus must be 1..={MAX_VCPUS}, got {}", self.cpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(format!(
                "memory must be at least {MIN_MEMORY_MIB} MiB, got {}",
                self.memory_mib
            ));
        }
        // Keeps byte arithmetic far from overflow; 1 TiB is plenty.
        if self.memory_mib > 1 << 20 {
            return Err(format!("memory of {} MiB is too large", self.memory_mib));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_round_trip_and_defaults() {
        let mut c = VmConfig::new("/k/vmlinux", "/s/console.log");
        c.cpus = 2;
        c.disks.push(DiskConfig {
            path: "/d/root.img".into(),
            read_only: true,
        });
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/s/v.sock".into(),
        });
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);

        let minimal: VmConfig =
            serde_json::from_str(r#"{"cpus":1,"memory_mib":128,"kernel":"/k","console_log":"/c"}"#)
                .unwrap();
        assert!(minimal.disks.is_empty() && !minimal.rng && !minimal.allow_pvm);
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k", "/c");
        assert!(c.validate().is_ok());
        c.cpus = 0;
        assert!(c.validate().is_err());
        c.cpus = 255;
        assert!(c.validate().is_err());
        c.cpus = 4;
        c.memory_mib = 16;
        assert!(c.validate().is_err());
    }
}
