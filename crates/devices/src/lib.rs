//! Emulated devices of the ferry VMM.
//!
//! Every device keeps its live resources (files, sockets, eventfds) apart from
//! a plain serializable `XxxState` struct: `save()` produces the state and
//! `restore(args, &state)` rebuilds a live device from it. The set of devices
//! is closed: [`Device`] and [`DeviceState`] list them all.

#![warn(missing_docs)]

pub mod bus;
pub mod kind;
pub mod legacy;
pub mod virtio;

use serde::{Deserialize, Serialize};

pub use bus::{Bus, BusError};
pub use kind::DeviceKind;
pub use legacy::i8042::{I8042State, I8042};
pub use legacy::serial::{ConsoleSink, Serial, SerialState};
pub use virtio::mmio::{MmioTransport, MmioTransportState};

/// Guest memory type used by all devices. Every write the host makes
/// through it (a device filling a buffer, a used ring) marks its page in the
/// region's bitmap: KVM's dirty log sees only the guest's own writes, and a
/// live migration or an incremental snapshot needs both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// The slice of a region's bitmap that a view into [`GuestMemoryMmap`]
/// carries, so writes through the view mark their pages.
pub(crate) type DirtySlice<'a> = vm_memory::bitmap::MS<'a, GuestMemoryMmap>;

/// Every device the VMM can attach to a bus.
pub enum Device {
    /// 8250 UART.
    Serial(Serial),
    /// i8042 keyboard controller (reset line only).
    I8042(I8042),
    /// A virtio device behind its MMIO transport.
    VirtioMmio(Box<MmioTransport>),
}

/// Serializable state of a [`Device`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// State of a [`Serial`].
    Serial(SerialState),
    /// State of an [`I8042`].
    I8042(I8042State),
    /// State of a [`MmioTransport`] and the device behind it.
    VirtioMmio(MmioTransportState),
}

impl Device {
    /// Handles a guest read of `data.len()` bytes at `offset` into the device's range.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self {
            Device::Serial(d) => d.read(offset, data),
            Device::I8042(d) => d.read(offset, data),
            Device::VirtioMmio(d) => d.read(offset, data),
        }
    }

    /// Handles a guest write of `data` at `offset` into the device's range.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match self {
            Device::Serial(d) => d.write(offset, data),
            Device::I8042(d) => d.write(offset, data),
            Device::VirtioMmio(d) => d.write(offset, data),
        }
    }

    /// Captures the device's state.
    pub fn save(&self) -> DeviceState {
        match self {
            Device::Serial(d) => DeviceState::Serial(d.save()),
            Device::I8042(d) => DeviceState::I8042(d.save()),
            Device::VirtioMmio(d) => DeviceState::VirtioMmio(d.save()),
        }
    }

    /// Finishes work the device has pending (queued requests, disk
    /// flushes) so [`Self::save`] captures a complete state. The VM must be
    /// paused.
    pub fn quiesce(&mut self) -> Result<(), String> {
        match self {
            Device::Serial(_) | Device::I8042(_) => Ok(()),
            Device::VirtioMmio(t) => t.quiesce().map_err(|e| e.to_string()),
        }
    }

    /// After a restore, re-raises interrupts and queue notifications the
    /// saved device had pending.
    pub fn kick_after_restore(&self) -> Result<(), String> {
        match self {
            Device::Serial(d) => d.resignal_pending_interrupt().map_err(|e| e.to_string()),
            Device::I8042(_) => Ok(()),
            Device::VirtioMmio(t) => t.kick_after_restore().map_err(|e| e.to_string()),
        }
    }

    /// What kind of device this is.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Device::Serial(_) => DeviceKind::Serial,
            Device::I8042(_) => DeviceKind::I8042,
            Device::VirtioMmio(d) => d.device().kind(),
        }
    }

    /// A short name for logs: the kind's name.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

impl DeviceState {
    /// What kind of device the state is of.
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceState::Serial(_) => DeviceKind::Serial,
            DeviceState::I8042(_) => DeviceKind::I8042,
            DeviceState::VirtioMmio(t) => t.device.kind(),
        }
    }

    /// The guest pages of the device's ready virtqueues (see
    /// [`virtio::QueueSnapshot::ring_pages`]); none for other devices.
    pub fn ring_pages(&self) -> Vec<(u64, u64)> {
        match self {
            DeviceState::VirtioMmio(t) => t.queues.iter().flat_map(|q| q.ring_pages()).collect(),
            _ => Vec::new(),
        }
    }
}
