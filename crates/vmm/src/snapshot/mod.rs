//! Saving a paused VM's state, restoring it, and forking it.
//!
//! - [`crate::Paused::capture`] quiesces the devices and returns a
//!   [`VmState`]: everything but memory contents, serializable.
//! - Memory is read while paused through [`crate::Paused::memory`] or
//!   [`crate::Paused::memory_slices`], guided by
//!   [`crate::Paused::resident_or_nonzero_ranges`].
//! - [`crate::Vm::restore`] builds a VM from a [`VmState`] and a
//!   [`MemorySource`], mapping memory lazily.
//! - [`crate::Paused::freeze_for_fork`] makes memory copy-on-write and
//!   returns [`MemoryLayers`] another VM (in this or a child process) can
//!   restore from.

pub mod blob;
pub mod cpu;
pub mod kvm_state;
pub mod lazy;
pub mod memory;
pub mod touch;
mod uffd;

use std::io;

use ferry_devices::DeviceState;
use serde::{Deserialize, Serialize};

pub use blob::Blob;
pub use cpu::{
    check_cpu_compatible, check_cpu_compatible_on, cpu_features, host_cpu_features,
    missing_features,
};
pub use kvm_state::{CpuidEntry, FpuState, MsrEntry, VcpuState, VmKvmState};
pub use lazy::{Chunk, LazyMemory, LazySource, LazyStats};
pub use memory::{
    new_sealable_memfd, seal, Extent, FreezeStats, Layer, LayerDesc, MemoryLayers,
    MemoryLayersDesc, MemorySource, RestoreStats,
};

use crate::arch::layout::ram_regions;
use crate::config::VmConfig;
use crate::devices::device_plan;

/// Version of the [`VmState`] layout; restore refuses other versions.
pub const STATE_FORMAT: u32 = 1;

/// One range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The complete state of a paused VM except its memory contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// [`STATE_FORMAT`] of the writer.
    pub format: u32,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub kvm: VmKvmState,
    /// Every device, in bus order: the order of
    /// [`crate::devices::device_plan`].
    pub devices: Vec<DeviceState>,
    /// Guest RAM layout.
    pub memory: Vec<GuestRegion>,
}

impl VmState {
    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Total guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.iter().map(|r| r.len).sum()
    }

    /// Checks that the state is well-formed and fits `config`: same format,
    /// vCPU count, memory layout and device list, every KVM blob decodes.
    pub fn validate_against(&self, config: &VmConfig) -> Result<(), String> {
        if self.format != STATE_FORMAT {
            return Err(format!(
                "state format {} is not supported (expected {STATE_FORMAT})",
                self.format
            ));
        }
        if self.vcpus.len() != usize::from(config.cpus) {
            return Err(format!(
                "state has {} vCPUs, config asks for {}",
                self.vcpus.len(),
                config.cpus
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != i {
                return Err(format!("vCPU {i} is saved with index {}", v.index));
            }
            v.validate()?;
        }
        let expected: Vec<GuestRegion> = ram_regions(config.memory_bytes())
            .into_iter()
            .map(|(addr, len)| GuestRegion {
                guest_addr: addr.0,
                len,
            })
            .collect();
        if self.memory != expected {
            return Err(format!(
                "state has {} bytes of guest memory in {} regions, config asks for {} MiB",
                self.memory_bytes(),
                self.memory.len(),
                config.memory_mib
            ));
        }
        self.kvm.validate()?;
        let want = expected_devices(config);
        let have: Vec<&str> = self.devices.iter().map(|d| d.kind().name()).collect();
        if want != have {
            return Err(format!(
                "state has devices [{}], config describes [{}]",
                have.join(", "),
                want.join(", ")
            ));
        }
        Ok(())
    }
}

/// Device kinds a VM built from `config` has, in bus order.
fn expected_devices(config: &VmConfig) -> Vec<&'static str> {
    device_plan(config)
        .iter()
        .map(|s| s.kind().name())
        .collect()
}

/// Errors of capture, fork and disk replacement.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took only part of the saved MSRs.
    #[error("KVM refused MSR {index:#x} (set {set} of {wanted})")]
    MsrRefused {
        /// The first MSR KVM did not accept.
        index: u32,
        /// MSRs set.
        set: usize,
        /// MSRs in the batch.
        wanted: usize,
    },
    /// The saved XSAVE area does not fit this host's.
    #[error("saved XSAVE area is {saved} bytes, this host's is {host}")]
    XsaveSize {
        /// Saved size.
        saved: usize,
        /// Host size (0: no XSAVE).
        host: usize,
    },
    /// The guest's TSC frequency cannot be reproduced here.
    #[error("cannot set the TSC to {saved} kHz (host runs at {now} kHz)")]
    TscFrequency {
        /// Saved frequency.
        saved: u32,
        /// This host's.
        now: u32,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host lacks CPU features the saved guest uses.
    #[error("this host's CPU lacks what the saved guest uses: {}", .0.join(", "))]
    CpuIncompatible(Vec<String>),
    /// A piece of saved KVM state does not decode.
    #[error("malformed saved {0}")]
    Malformed(&'static str),
    /// Quiescing or saving a device failed.
    #[error("device {name}: {reason}")]
    Device {
        /// Device name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Replacing a disk's backing file failed.
    #[error("cannot replace disk {index}: {reason}")]
    DiskReplace {
        /// Disk position in the config.
        index: usize,
        /// What went wrong.
        reason: String,
    },
    /// Remapping or copying guest memory failed.
    #[error("guest memory operation failed")]
    Memory(#[source] io::Error),
    /// A memory layer description is unusable.
    #[error("invalid memory layers: {0}")]
    InvalidLayers(String),
    /// The host cannot be queried.
    #[error("{0}")]
    Host(String),
    /// An internal limit was hit.
    #[error("{0}")]
    Internal(String),
}

impl SnapshotError {
    /// A stable, machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            SnapshotError::Kvm { .. } | SnapshotError::MsrRefused { .. } => "SNAPSHOT_KVM_FAILED",
            SnapshotError::XsaveSize { .. } | SnapshotError::CpuIncompatible(_) => {
                "SNAPSHOT_CPU_INCOMPATIBLE"
            }
            SnapshotError::TscFrequency { .. } => "SNAPSHOT_TSC_INCOMPATIBLE",
            SnapshotError::Malformed(_) => "RESTORE_STATE_INVALID",
            SnapshotError::Device { .. } => "SNAPSHOT_DEVICE_FAILED",
            SnapshotError::DiskReplace { .. } => "SNAPSHOT_DISK_REPLACE_FAILED",
            SnapshotError::Memory(_) => "SNAPSHOT_MEMORY_FAILED",
            SnapshotError::InvalidLayers(_) => "RESTORE_MEMORY_INVALID",
            SnapshotError::Host(_) => "KVM_UNAVAILABLE",
            SnapshotError::Internal(_) => "SNAPSHOT_INTERNAL",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_devices::{I8042State, SerialState};
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_pit_state2, kvm_regs,
        kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    };

    fn vcpu(index: u8) -> VcpuState {
        VcpuState {
            index,
            cpuid: vec![CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0xd,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
            }],
            mp_state: 0,
            regs: Blob::of(&kvm_regs {
                rip: 0x100_0000 + u64::from(index),
                ..Default::default()
            }),
            sregs: Blob::of(&kvm_sregs::default()),
            fpu: FpuState::Xsave(Blob(vec![0; 4096])),
            xcrs: Some(Blob::of(&kvm_xcrs::default())),
            debug_regs: Blob::of(&kvm_debugregs::default()),
            lapic: Blob::of(&kvm_lapic_state::default()),
            msrs: vec![
                MsrEntry {
                    index: 0x10,
                    data: 12345,
                },
                MsrEntry {
                    index: 0x6e0,
                    data: 0,
                },
            ],
            events: Blob::of(&kvm_vcpu_events::default()),
            tsc_khz: Some(2_000_000),
        }
    }

    fn state(config: &VmConfig) -> VmState {
        VmState {
            format: STATE_FORMAT,
            vcpus: (0..config.cpus).map(vcpu).collect(),
            kvm: VmKvmState {
                pic_master: Blob::of(&kvm_irqchip::default()),
                pic_slave: Blob::of(&kvm_irqchip::default()),
                ioapic: Blob::of(&kvm_irqchip::default()),
                pit: Blob::of(&kvm_pit_state2::default()),
                clock: Blob::of(&kvm_clock_data::default()),
            },
            devices: vec![
                DeviceState::Serial(SerialState::default()),
                DeviceState::I8042(I8042State {
                    control: 0,
                    last_was_command: false,
                    pending_command: None,
                    output: vec![],
                }),
            ],
            memory: ram_regions(config.memory_bytes())
                .into_iter()
                .map(|(a, len)| GuestRegion {
                    guest_addr: a.0,
                    len,
                })
                .collect(),
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut config = VmConfig::new("/k", "/c");
        config.cpus = 2;
        let s = state(&config);
        let json = serde_json::to_string(&s).unwrap();
        let back: VmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.vcpus[1].regs().unwrap().rip, 0x100_0001);
        assert_eq!(back.vcpus[0].msr(0x10), Some(12345));
        assert_eq!(back.memory_bytes(), 256 << 20);
        assert!(back.validate_against(&config).is_ok());
    }

    #[test]
    fn validation_names_the_mismatch() {
        let config = VmConfig::new("/k", "/c");
        let s = state(&config);
        let check = |f: &dyn Fn(&mut VmConfig, &mut VmState), want: &str| {
            let (mut c, mut st) = (config.clone(), s.clone());
            f(&mut c, &mut st);
            let err = st.validate_against(&c).unwrap_err();
            assert!(err.contains(want), "{err} should mention {want}");
        };
        check(&|c, _| c.cpus = 2, "vCPUs");
        check(&|c, _| c.memory_mib = 512, "guest memory");
        check(&|_, s| s.memory[0].len -= 4096, "guest memory");
        check(&|c, _| c.rng = true, "virtio-rng");
        check(&|_, s| s.devices.swap(0, 1), "devices");
        check(&|_, s| s.format = 99, "format");
        check(&|_, s| s.vcpus[0].index = 5, "index");
        check(&|_, s| s.vcpus[0].sregs = Blob(vec![0; 3]), "sregs");
        check(&|_, s| s.kvm.ioapic = Blob(vec![]), "IOAPIC");
        check(&|_, s| s.kvm.clock = Blob(vec![1; 47]), "clock");
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(
            SnapshotError::CpuIncompatible(vec!["avx2".into()]).code(),
            "SNAPSHOT_CPU_INCOMPATIBLE"
        );
        assert_eq!(
            SnapshotError::MsrRefused {
                index: 0x10,
                set: 0,
                wanted: 1
            }
            .code(),
            "SNAPSHOT_KVM_FAILED"
        );
        assert_eq!(
            SnapshotError::InvalidLayers(String::new()).code(),
            "RESTORE_MEMORY_INVALID"
        );
        let e = crate::VmError::Restore(SnapshotError::MsrRefused {
            index: 0x10,
            set: 0,
            wanted: 1,
        });
        assert_eq!(e.code(), "RESTORE_KVM_FAILED");
        assert!(e.chain().contains("MSR 0x10"));
    }
}
