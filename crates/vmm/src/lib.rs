//! The ferry virtual machine monitor.
//!
//! ```no_run
//! use ferry_vmm::{Vm, VmConfig};
//!
//! let mut config = VmConfig::new("/path/vmlinux", "/tmp/console.log");
//! config.initramfs = Some("/path/initramfs.cpio".into());
//! let handle = Vm::create(config)?.start()?;
//! // From any thread: handle.pause(), handle.resume(), handle.stop().
//! let reason = handle.wait();
//! println!("guest ended: {reason:?}");
//! # Ok::<(), ferry_vmm::VmError>(())
//! ```
//!
//! Snapshots, restores and forks work on a paused VM; see [`snapshot`]:
//!
//! ```no_run
//! # fn demo(handle: ferry_vmm::VmHandle, config: ferry_vmm::VmConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use ferry_vmm::{MemorySource, Vm};
//!
//! let paused = handle.paused()?;
//! let state = paused.capture()?; // serde: vCPUs, KVM, devices, layout
//! let layers = paused.freeze_for_fork()?; // memory becomes copy-on-write
//! drop(paused); // the source runs on
//! let sibling = Vm::restore(config, &state, MemorySource::Layers(layers))?.start()?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod arch;
pub mod config;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod error;
pub mod kvm;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
mod vcpu_loop;
pub mod vm;

mod event_loop;

pub use config::{DiskConfig, FsConfig, MacAddr, NetBackend, NetConfig, VmConfig, VsockConfig};
pub use control::{ControlError, ExitReason, Paused, VmHandle, VmStatus};
pub use error::VmError;
pub use kvm::{host_is_pvm, kvm_unavailable_reason};
pub use snapshot::{
    check_cpu_compatible, cpu_features, host_cpu_features, Extent, MemoryLayers, MemoryLayersDesc,
    MemorySource, RestoreStats, SnapshotError, VmState,
};
pub use vcpu::Vcpu;
pub use vm::{check_host, Vm, VmIo};

/// Guest memory type used throughout the VMM.
pub type GuestMemoryMmap = ferry_devices::GuestMemoryMmap;
