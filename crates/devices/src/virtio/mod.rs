//! Virtio devices and their MMIO transport.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

#[cfg(test)]
pub(crate) mod testing;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{DeviceKind, GuestMemoryMmap};
use block::{Block, BlockState};
use fs::{Fs, FsState};
use net::{Net, NetState};
use rng::{Rng, RngState};
use vsock::{Vsock, VsockState};

/// Feature bit: the device conforms to virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Default maximum queue size offered by ferry's devices.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Errors raised while processing virtio queues.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Accessing a queue failed.
    #[error("virtqueue access failed")]
    Queue(#[source] virtio_queue::Error),
    /// Raising the interrupt failed.
    #[error("cannot signal the guest")]
    Interrupt(#[source] io::Error),
    /// A queue index outside the device's queues.
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    /// Error of the block device.
    #[error("virtio-blk")]
    Block(#[from] block::BlockError),
    /// Error of the vsock device.
    #[error("virtio-vsock")]
    Vsock(#[from] vsock::VsockError),
}

impl From<virtio_queue::Error> for VirtioError {
    fn from(e: virtio_queue::Error) -> Self {
        VirtioError::Queue(e)
    }
}

/// The interrupt of one virtio-mmio device: the status register the guest
/// reads and acknowledges, and the eventfd wired to the guest's IRQ line.
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// A fresh interrupt with no pending status.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Raises the interrupt with the given status bits.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Tells the guest that a queue has used buffers.
    pub fn signal_used_queue(&self) -> Result<(), VirtioError> {
        self.trigger(INT_VRING).map_err(VirtioError::Interrupt)
    }

    /// Current interrupt status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The eventfd to register as the device's irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Serializable state of one virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// Next available-ring slot the device will read.
    pub next_avail: u16,
    /// Next used-ring slot the device will write.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
}

impl QueueSnapshot {
    /// The guest pages of a ready queue's descriptor table, available ring
    /// and used ring (address, length; 4 KiB aligned, possibly
    /// overlapping): what a device reads first when kicked after a restore.
    pub fn ring_pages(&self) -> Vec<(u64, u64)> {
        const PAGE: u64 = 4096;
        if !self.ready || self.size == 0 {
            return Vec::new();
        }
        let n = u64::from(self.size);
        // Split virtqueue layout: 16-byte descriptors; flags, index, n
        // slots and the event word in each ring (2-byte slots in the
        // available ring, 8-byte ones in the used ring).
        [
            (self.desc_table, 16 * n),
            (self.avail_ring, 6 + 2 * n),
            (self.used_ring, 6 + 8 * n),
        ]
        .into_iter()
        .filter_map(|(addr, len)| {
            let start = addr & !(PAGE - 1);
            let end = addr.checked_add(len)?.checked_next_multiple_of(PAGE)?;
            Some((start, end - start))
        })
        .collect()
    }

    /// Captures a queue's state.
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }

    /// Rebuilds a queue, validating sizes and alignments.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// What a device needs to process its queues.
pub struct QueueContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, in virtio order.
    pub queues: &'a mut [Queue],
    /// The device's interrupt.
    pub interrupt: &'a Interrupt,
}

impl QueueContext<'_> {
    /// The queue at `idx`.
    pub fn queue(&mut self, idx: usize) -> Result<&mut Queue, VirtioError> {
        self.queues
            .get_mut(idx)
            .ok_or(VirtioError::NoSuchQueue(idx))
    }

    /// Interrupts the guest if the queue's notification rules ask for it.
    pub fn notify(&mut self, idx: usize) -> Result<(), VirtioError> {
        let mem = self.mem;
        if self.queue(idx)?.needs_notification(mem)? {
            self.interrupt.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Copies the part of `config` at `offset` into `data`; bytes past the end read as 0.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Every virtio device ferry provides.
pub enum VirtioDevice {
    /// virtio-blk.
    Block(Block),
    /// virtio-vsock.
    Vsock(Vsock),
    /// virtio-rng.
    Rng(Rng),
    /// virtio-fs.
    Fs(Box<Fs>),
    /// virtio-net.
    Net(Net),
}

/// Serializable state of a [`VirtioDevice`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// State of a [`Block`].
    Block(BlockState),
    /// State of a [`Vsock`].
    Vsock(VsockState),
    /// State of a [`Rng`].
    Rng(RngState),
    /// State of a [`Fs`].
    Fs(FsState),
    /// State of a [`Net`].
    Net(NetState),
}

impl VirtioDeviceState {
    /// What kind of device the state is of.
    pub fn kind(&self) -> DeviceKind {
        match self {
            VirtioDeviceState::Block(_) => DeviceKind::Block,
            VirtioDeviceState::Vsock(_) => DeviceKind::Vsock,
            VirtioDeviceState::Rng(_) => DeviceKind::Rng,
            VirtioDeviceState::Fs(_) => DeviceKind::Fs,
            VirtioDeviceState::Net(_) => DeviceKind::Net,
        }
    }

    /// The virtio device id of the saved device.
    pub fn device_type(&self) -> u32 {
        match self {
            VirtioDeviceState::Block(_) => block::DEVICE_TYPE,
            VirtioDeviceState::Vsock(_) => vsock::DEVICE_TYPE,
            VirtioDeviceState::Rng(_) => rng::DEVICE_TYPE,
            VirtioDeviceState::Fs(_) => fs::DEVICE_TYPE,
            VirtioDeviceState::Net(_) => net::DEVICE_TYPE,
        }
    }
}

impl VirtioDevice {
    /// What kind of device this is.
    pub fn kind(&self) -> DeviceKind {
        match self {
            VirtioDevice::Block(_) => DeviceKind::Block,
            VirtioDevice::Vsock(_) => DeviceKind::Vsock,
            VirtioDevice::Rng(_) => DeviceKind::Rng,
            VirtioDevice::Fs(_) => DeviceKind::Fs,
            VirtioDevice::Net(_) => DeviceKind::Net,
        }
    }

    /// A short name for logs: the kind's name.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The virtio device id.
    pub fn device_type(&self) -> u32 {
        match self {
            VirtioDevice::Block(_) => block::DEVICE_TYPE,
            VirtioDevice::Vsock(_) => vsock::DEVICE_TYPE,
            VirtioDevice::Rng(_) => rng::DEVICE_TYPE,
            VirtioDevice::Fs(_) => fs::DEVICE_TYPE,
            VirtioDevice::Net(_) => net::DEVICE_TYPE,
        }
    }

    /// Feature bits the device offers.
    pub fn avail_features(&self) -> u64 {
        match self {
            VirtioDevice::Block(d) => d.avail_features(),
            VirtioDevice::Vsock(d) => d.avail_features(),
            VirtioDevice::Rng(d) => d.avail_features(),
            VirtioDevice::Fs(d) => d.avail_features(),
            VirtioDevice::Net(d) => d.avail_features(),
        }
    }

    /// Maximum size of each queue; the slice's length is the number of queues.
    pub fn queue_max_sizes(&self) -> &'static [u16] {
        match self {
            VirtioDevice::Block(_) => &[QUEUE_MAX_SIZE],
            VirtioDevice::Vsock(_) => &[QUEUE_MAX_SIZE; 3],
            VirtioDevice::Rng(_) => &[QUEUE_MAX_SIZE],
            VirtioDevice::Fs(_) => &[QUEUE_MAX_SIZE; fs::NUM_QUEUES],
            VirtioDevice::Net(_) => &[QUEUE_MAX_SIZE; 2],
        }
    }

    /// Reads the device-specific configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        match self {
            VirtioDevice::Block(d) => read_config_bytes(&d.config_space(), offset, data),
            VirtioDevice::Vsock(d) => read_config_bytes(&d.config_space(), offset, data),
            VirtioDevice::Rng(_) => data.fill(0),
            VirtioDevice::Fs(d) => read_config_bytes(&d.config_space(), offset, data),
            VirtioDevice::Net(d) => read_config_bytes(&d.config_space(), offset, data),
        }
    }

    /// Called once the driver set DRIVER_OK.
    pub fn activate(
        &mut self,
        acked_features: u64,
        ctx: &mut QueueContext,
    ) -> Result<(), VirtioError> {
        match self {
            VirtioDevice::Block(d) => {
                d.activate(acked_features);
                Ok(())
            }
            VirtioDevice::Vsock(d) => d.activate(ctx),
            VirtioDevice::Rng(_) | VirtioDevice::Fs(_) => Ok(()),
            VirtioDevice::Net(d) => d.activate(acked_features, ctx),
        }
    }

    /// Called when the driver resets the device.
    pub fn reset(&mut self) {
        match self {
            VirtioDevice::Block(_) | VirtioDevice::Rng(_) | VirtioDevice::Fs(_) => {}
            VirtioDevice::Vsock(d) => d.reset(),
            VirtioDevice::Net(d) => d.reset(),
        }
    }

    /// Processes the queue at `idx` after a guest notification.
    pub fn process_queue(&mut self, idx: usize, ctx: &mut QueueContext) -> Result<(), VirtioError> {
        match self {
            VirtioDevice::Block(d) => d.process_queue(idx, ctx),
            VirtioDevice::Vsock(d) => d.process_queue(idx, ctx),
            VirtioDevice::Rng(d) => d.process_queue(idx, ctx),
            VirtioDevice::Fs(d) => d.process_queue(idx, ctx),
            VirtioDevice::Net(d) => d.process_queue(idx, ctx),
        }
    }

    /// A file descriptor that becomes readable when the device's backend has
    /// work (sockets, timers), if the device has one.
    pub fn backend_fd(&self) -> Option<RawFd> {
        match self {
            VirtioDevice::Vsock(d) => Some(d.backend_fd()),
            VirtioDevice::Block(_) | VirtioDevice::Rng(_) | VirtioDevice::Fs(_) => None,
            VirtioDevice::Net(d) => Some(d.backend_fd()),
        }
    }

    /// Handles backend activity; `ctx` is `None` while the driver is not ready.
    pub fn process_backend(&mut self, ctx: Option<&mut QueueContext>) -> Result<(), VirtioError> {
        match self {
            VirtioDevice::Vsock(d) => d.process_backend(ctx),
            VirtioDevice::Block(_) | VirtioDevice::Rng(_) | VirtioDevice::Fs(_) => Ok(()),
            VirtioDevice::Net(d) => d.process_backend(ctx),
        }
    }

    /// Captures the device-specific state.
    pub fn save(&self) -> VirtioDeviceState {
        match self {
            VirtioDevice::Block(d) => VirtioDeviceState::Block(d.save()),
            VirtioDevice::Vsock(d) => VirtioDeviceState::Vsock(d.save()),
            VirtioDevice::Rng(d) => VirtioDeviceState::Rng(d.save()),
            VirtioDevice::Fs(d) => VirtioDeviceState::Fs(d.save()),
            VirtioDevice::Net(d) => VirtioDeviceState::Net(d.save()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_pages_cover_the_three_rings_of_a_ready_queue() {
        let q = QueueSnapshot {
            max_size: 256,
            size: 256,
            ready: true,
            desc_table: 0x10_0000,
            avail_ring: 0x10_1000,
            used_ring: 0x10_2ff8,
            ..Default::default()
        };
        assert_eq!(
            q.ring_pages(),
            vec![
                (0x10_0000, 0x1000),
                (0x10_1000, 0x1000),
                (0x10_2000, 0x2000)
            ]
        );
        assert!(QueueSnapshot { ready: false, ..q }.ring_pages().is_empty());
        assert!(QueueSnapshot { size: 0, ..q }.ring_pages().is_empty());
        // A ring the guest placed at the top of the address space: no overflow.
        let top = QueueSnapshot {
            used_ring: u64::MAX - 8,
            ..q
        };
        assert_eq!(top.ring_pages().len(), 2);
    }
}
