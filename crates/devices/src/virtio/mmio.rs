//! virtio-mmio transport, version 2 ("modern").
//!
//! The transport owns the queues, the interrupt and the negotiation state, so
//! the devices behind it hold only backend state. Queue notifications arrive
//! on one eventfd per queue: KVM writes it directly when it is registered as
//! an ioeventfd, and a trapped write to QueueNotify writes it otherwise.

use std::io;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    Interrupt, QueueContext, QueueSnapshot, VirtioDevice, VirtioDeviceState, VirtioError,
    INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::GuestMemoryMmap;

/// Size of the register window of one device.
pub const MMIO_SIZE: u64 = 0x1000;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor id reported to the guest ("FRRY").
const VENDOR_ID: u32 = 0x5952_5246;

/// Register offsets.
pub mod reg {
    /// Magic value "virt".
    pub const MAGIC: u64 = 0x000;
    /// Transport version.
    pub const VERSION: u64 = 0x004;
    /// Virtio device id.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features, 32 bits selected by DEVICE_FEATURES_SEL.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects the word of DEVICE_FEATURES.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features, 32 bits selected by DRIVER_FEATURES_SEL.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the word of DRIVER_FEATURES.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the QUEUE_* registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Maximum size of the selected queue.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Ready bit of the selected queue.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification (value: queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt bits.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt bits.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low word.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high word.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low word.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high word.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low word.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high word.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region length, low word.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory region length, high word.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Configuration generation counter.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Errors of [`MmioTransport`].
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Creating an eventfd failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] io::Error),
    /// A queue could not be created or restored.
    #[error("invalid queue {index}")]
    Queue {
        /// Queue index.
        index: usize,
        /// The underlying error.
        #[source]
        source: virtio_queue::Error,
    },
    /// The saved state belongs to another kind of device.
    #[error("state is for device type {saved}, device is type {actual}")]
    DeviceMismatch {
        /// Device type in the state.
        saved: u32,
        /// Device type of the live device.
        actual: u32,
    },
    /// The saved state has the wrong number of queues.
    #[error("state has {saved} queues, device has {actual}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        actual: usize,
    },
    /// The operation needs a vsock device.
    #[error("device is not virtio-vsock")]
    NotVsock,
    /// Signalling an eventfd failed.
    #[error("cannot signal an eventfd")]
    Signal(#[source] io::Error),
    /// Flushing the device's backing store failed.
    #[error("cannot flush the device's backing store")]
    Flush(#[source] io::Error),
    /// Processing failed.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// The saved state is not one the transport can be in: unknown status
    /// or interrupt bits, features the device does not offer, queue sizes it
    /// does not offer, more buffers in flight than a queue holds, or a
    /// running device whose rings lie outside guest memory.
    #[error("invalid saved transport state: {0}")]
    InvalidState(String),
}

/// Serializable state of the transport, its queues and its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// DeviceFeaturesSel register.
    pub device_features_sel: u32,
    /// DriverFeaturesSel register.
    pub driver_features_sel: u32,
    /// Features written by the driver.
    pub driver_features: u64,
    /// QueueSel register.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// Configuration generation counter.
    pub config_generation: u32,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
    /// The device behind the transport.
    pub device: VirtioDeviceState,
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: VirtioDevice,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Interrupt,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

fn new_queues(device: &VirtioDevice) -> Result<Vec<Queue>, MmioError> {
    device
        .queue_max_sizes()
        .iter()
        .enumerate()
        .map(|(index, &max)| Queue::new(max).map_err(|source| MmioError::Queue { index, source }))
        .collect()
}

fn new_evts(n: usize) -> Result<Vec<EventFd>, MmioError> {
    (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
        .collect()
}

/// Every status bit a driver or the device may set.
const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

/// Checks that a saved state is one the transport can reach (the queues are
/// already rebuilt, so their sizes and ring alignments were checked): known
/// status and interrupt bits; FEATURES_OK only with offered, modern features
/// and DRIVER_OK only after it; each queue's maximum size the one the device
/// offers, with no more buffers in flight than it holds; and, for a running
/// device, every queue ready with its rings inside guest memory and the
/// event-index setting that was negotiated.
fn check_restored(
    device: &VirtioDevice,
    mem: &GuestMemoryMmap,
    state: &MmioTransportState,
    queues: &[Queue],
) -> Result<(), MmioError> {
    let bad = |why: String| Err(MmioError::InvalidState(why));
    if state.status & !KNOWN_STATUS != 0 {
        return bad(format!("unknown device status bits {:#x}", state.status));
    }
    if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
        return bad(format!(
            "unknown interrupt status bits {:#x}",
            state.interrupt_status
        ));
    }
    let offered = device.avail_features();
    if state.status & status::FEATURES_OK != 0
        && (state.driver_features & !offered != 0
            || state.driver_features & (1 << VIRTIO_F_VERSION_1) == 0)
    {
        return bad(format!(
            "features {:#x} accepted, the device offers {offered:#x}",
            state.driver_features
        ));
    }
    if state.status & status::DRIVER_OK != 0 && state.status & status::FEATURES_OK == 0 {
        return bad("DRIVER_OK without FEATURES_OK".into());
    }
    for (i, (q, &max)) in state
        .queues
        .iter()
        .zip(device.queue_max_sizes())
        .enumerate()
    {
        if q.max_size != max {
            return bad(format!(
                "queue {i} has maximum size {}, the device offers {max}",
                q.max_size
            ));
        }
        let in_flight = q.next_avail.wrapping_sub(q.next_used);
        if in_flight > q.size {
            return bad(format!(
                "queue {i} has {in_flight} buffers in flight, it holds {}",
                q.size
            ));
        }
    }
    let running =
        state.status & status::DRIVER_OK != 0 && state.status & status::DEVICE_NEEDS_RESET == 0;
    if running {
        let event_idx = state.driver_features & offered & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in queues.iter().enumerate() {
            if !q.is_valid(mem) {
                return bad(format!(
                    "queue {i} of a running device is not ready or its rings lie outside guest memory"
                ));
            }
            if q.event_idx_enabled() != event_idx {
                return bad(format!(
                    "queue {i} does not use the negotiated event index setting"
                ));
            }
        }
    }
    Ok(())
}

impl MmioTransport {
    /// Puts `device` behind a fresh transport.
    pub fn new(device: VirtioDevice, mem: GuestMemoryMmap) -> Result<Self, MmioError> {
        let queues = new_queues(&device)?;
        let queue_evts = new_evts(queues.len())?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            interrupt: Interrupt::new().map_err(MmioError::EventFd)?,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// Rebuilds a transport around `device` (itself restored from
    /// `state.device`) with the saved registers and queues. A state the
    /// transport could not have reached is refused
    /// ([`MmioError::InvalidState`]), so a hostile snapshot cannot hand the
    /// device rings outside guest memory or queues larger than it offers.
    pub fn restore(
        device: VirtioDevice,
        mem: GuestMemoryMmap,
        state: &MmioTransportState,
    ) -> Result<Self, MmioError> {
        if device.device_type() != state.device.device_type() {
            return Err(MmioError::DeviceMismatch {
                saved: state.device.device_type(),
                actual: device.device_type(),
            });
        }
        let expected = device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                actual: expected,
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.to_queue()
                    .map_err(|source| MmioError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        check_restored(&device, &mem, state, &queues)?;
        let interrupt = Interrupt::new().map_err(MmioError::EventFd)?;
        interrupt.set_status(state.interrupt_status);
        Ok(Self {
            device,
            mem,
            queue_evts: new_evts(queues.len())?,
            queues,
            interrupt,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            status: state.status,
            config_generation: state.config_generation,
        })
    }

    /// Captures the transport, queue and device state.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            device: self.device.save(),
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &VirtioDevice {
        &self.device
    }

    /// The device behind the transport, for changes while the VM is paused.
    pub fn device_mut(&mut self) -> &mut VirtioDevice {
        &mut self.device
    }

    /// Serves queue notifications that arrived but were not handled yet and
    /// makes completed disk writes durable. Call with the VM paused, before
    /// [`Self::save`], so no request is left half-way in the saved state.
    pub fn quiesce(&mut self) -> Result<(), MmioError> {
        for idx in 0..self.queue_evts.len() {
            self.handle_queue_event(idx);
        }
        if let VirtioDevice::Block(b) = &self.device {
            b.flush_backing().map_err(MmioError::Flush)?;
        }
        Ok(())
    }

    /// After [`Self::restore`]: signals every queue of an active device (the
    /// saved guest may have posted buffers whose notification was consumed
    /// before the save) and re-raises a pending interrupt. Both are harmless
    /// when nothing is pending.
    pub fn kick_after_restore(&self) -> Result<(), MmioError> {
        if self.is_activated() {
            for evt in &self.queue_evts {
                evt.write(1).map_err(MmioError::Signal)?;
            }
        }
        if self.interrupt.status() != 0 {
            self.interrupt
                .eventfd()
                .write(1)
                .map_err(MmioError::Signal)?;
        }
        Ok(())
    }

    /// The interrupt (its eventfd goes to KVM as an irqfd).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// One notification eventfd per queue, in queue order.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Whether the driver completed initialisation.
    pub fn is_activated(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Features acknowledged by the driver (only meaningful after FEATURES_OK).
    pub fn acked_features(&self) -> u64 {
        self.driver_features & self.device.avail_features()
    }

    /// Bumps the configuration generation and tells the guest the
    /// configuration space changed.
    pub fn notify_config_change(&mut self) -> Result<(), MmioError> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt
            .trigger(INT_CONFIG)
            .map_err(|e| MmioError::Virtio(VirtioError::Interrupt(e)))
    }

    fn context(&mut self) -> (&mut VirtioDevice, QueueContext<'_>) {
        (
            &mut self.device,
            QueueContext {
                mem: &self.mem,
                queues: &mut self.queues,
                interrupt: &self.interrupt,
            },
        )
    }

    /// Handles a notification of queue `idx`: consumes its eventfd and lets
    /// the device process the queue.
    pub fn handle_queue_event(&mut self, idx: usize) {
        let Some(evt) = self.queue_evts.get(idx) else {
            return;
        };
        // Nothing to read just means the notification was already consumed.
        let _ = evt.read();
        if !self.is_activated() {
            return;
        }
        let (device, mut ctx) = self.context();
        if let Err(e) = device.process_queue(idx, &mut ctx) {
            tracing::warn!("{}: queue {idx}: {e}", device.name());
        }
    }

    /// Handles activity on the device's backend fd.
    pub fn handle_backend_event(&mut self) {
        let activated = self.is_activated();
        let (device, mut ctx) = self.context();
        let res = if activated {
            device.process_backend(Some(&mut ctx))
        } else {
            device.process_backend(None)
        };
        if let Err(e) = res {
            tracing::warn!("{}: backend: {e}", device.name());
        }
    }

    /// Sends a vsock TRANSPORT_RESET event to the guest and drops all host
    /// connections (needed after a snapshot is restored).
    pub fn send_vsock_transport_reset(&mut self) -> Result<(), MmioError> {
        let activated = self.is_activated();
        let (device, mut ctx) = self.context();
        let VirtioDevice::Vsock(vsock) = device else {
            return Err(MmioError::NotVsock);
        };
        vsock
            .send_transport_reset(activated.then_some(&mut ctx))
            .map_err(MmioError::Virtio)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    /// Guest read from the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        let features = self.device.avail_features();
        let value = match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write to the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // ferry's devices have no writable configuration fields.
            tracing::debug!("virtio-mmio: ignoring config write at {offset:#x}");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & (status::FEATURES_OK | status::DRIVER_OK) == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: queue notify: {e}");
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_reg(offset, v),
            _ => tracing::debug!("virtio-mmio: ignoring write at {offset:#x}"),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_config_allowed() {
            tracing::debug!("virtio-mmio: queue register write outside setup phase");
            return;
        }
        let Some(q) = self.selected_queue() else {
            return;
        };
        match offset {
            reg::QUEUE_NUM => q.set_size(v as u16),
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.set_status(0);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver only ever adds bits (0 resets, handled above), and only
        // bits the specification defines: what it cannot set, a restored
        // state cannot hold either.
        if new & old != old || new & !KNOWN_STATUS != 0 {
            tracing::debug!("virtio-mmio: status {old:#x} -> {new:#x} refused");
            return;
        }
        let added = new & !old;
        let mut new = new;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let valid = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !valid {
                tracing::warn!(
                    "{}: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.device.name(),
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 {
                tracing::warn!("{}: DRIVER_OK before FEATURES_OK", self.device.name());
                return;
            }
            self.status = new;
            self.activate();
            return;
        }
        self.status = new;
    }

    fn activate(&mut self) {
        let acked = self.acked_features();
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mem = self.mem.clone();
        let mut usable = true;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if !q.is_valid(&mem) {
                tracing::warn!("{}: queue {i} is not valid", self.device.name());
                usable = false;
            }
        }
        let result = if usable {
            let (device, mut ctx) = self.context();
            device.activate(acked, &mut ctx)
        } else {
            Err(VirtioError::NoSuchQueue(self.queues.len()))
        };
        if let Err(e) = result {
            tracing::warn!("{}: activation failed: {e}", self.device.name());
            self.status |= status::DEVICE_NEEDS_RESET;
            if let Err(e) = self.notify_config_change() {
                tracing::warn!("{}: {e}", self.device.name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{self, DriverQueue};
    use vm_memory::GuestAddress;

    fn rng_transport() -> MmioTransport {
        rng_transport_on(&testing::memory())
    }

    fn rng_transport_on(mem: &GuestMemoryMmap) -> MmioTransport {
        MmioTransport::new(VirtioDevice::Rng(Rng::new().unwrap()), mem.clone()).unwrap()
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identification_registers() {
        let mut t = rng_transport();
        assert_eq!(r32(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), 4);
        assert_eq!(
            r32(&mut t, reg::QUEUE_NUM_MAX),
            u32::from(crate::virtio::QUEUE_MAX_SIZE)
        );
        w32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_NUM_MAX), 0, "rng has a single queue");
        w32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        let mut short = [0xaau8; 2];
        t.read(reg::MAGIC, &mut short);
        assert_eq!(short, [0, 0]);
    }

    #[test]
    fn features_must_be_offered_and_modern() {
        let mut t = rng_transport();
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // Legacy driver: VERSION_1 not acked.
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);

        // A feature the device does not offer.
        w32(&mut t, reg::STATUS, 0);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, 1 << 3);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);

        // Just VERSION_1: accepted.
        w32(&mut t, reg::STATUS, 0);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert_eq!(t.acked_features(), 1 << VIRTIO_F_VERSION_1);
        // Features are frozen after FEATURES_OK.
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.acked_features(), 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let mut t = rng_transport();
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        assert_eq!(
            r32(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
    }

    #[test]
    fn driver_ok_activates_and_reset_clears() {
        let mem = testing::memory();
        let mut t = rng_transport_on(&mem);
        let mut dq = DriverQueue::new(GuestAddress(0x1000), 16);
        testing::init_device(&mut t, 1 << VIRTIO_F_VERSION_1, &mut [&mut dq]);
        assert!(t.is_activated());
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 1);
        // Queue registers are locked once the driver is running.
        w32(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.save().queues[0].size, 16);

        dq.add_chain(&mem, &[(GuestAddress(0x8000), 64, true)]);
        w32(&mut t, reg::QUEUE_NOTIFY, 0);
        t.handle_queue_event(0);
        assert_eq!(dq.next_used(&mem), Some((0, 64)));
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), crate::virtio::INT_VRING);
        assert!(t.interrupt().eventfd().read().unwrap() >= 1);
        w32(&mut t, reg::INTERRUPT_ACK, crate::virtio::INT_VRING);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);

        w32(&mut t, reg::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.save().driver_features, 0);
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let mut t = rng_transport();
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut t, reg::DRIVER_FEATURES, 1);
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w32(&mut t, reg::QUEUE_SEL, 0);
        w32(&mut t, reg::QUEUE_NUM, 16);
        // Descriptor table far outside guest memory.
        w32(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        w32(&mut t, reg::QUEUE_READY, 1);
        w32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_ne!(r32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!t.is_activated());
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    }

    #[test]
    fn config_generation_changes() {
        let mut t = rng_transport();
        let before = r32(&mut t, reg::CONFIG_GENERATION);
        t.notify_config_change().unwrap();
        assert_eq!(r32(&mut t, reg::CONFIG_GENERATION), before.wrapping_add(1));
        assert_ne!(r32(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    }

    #[test]
    fn state_round_trip_with_queues() {
        let mem = testing::memory();
        let mut t = rng_transport_on(&mem);
        let mut dq = DriverQueue::new(GuestAddress(0x1000), 16);
        testing::init_device(&mut t, 1 << VIRTIO_F_VERSION_1, &mut [&mut dq]);
        for _ in 0..3 {
            dq.add_chain(&mem, &[(GuestAddress(0x8000), 16, true)]);
        }
        t.handle_queue_event(0);
        let saved = t.save();
        assert_eq!(saved.queues[0].next_avail, 3);
        assert_eq!(saved.queues[0].next_used, 3);
        let json = serde_json::to_string(&saved).unwrap();
        let parsed: MmioTransportState = serde_json::from_str(&json).unwrap();
        let VirtioDeviceState::Rng(rng_state) = &parsed.device else {
            panic!("wrong device state");
        };
        let device = VirtioDevice::Rng(Rng::restore(rng_state).unwrap());
        let mut restored = MmioTransport::restore(device, mem.clone(), &parsed).unwrap();
        assert_eq!(restored.save(), saved);
        // The restored queue continues where the old one stopped.
        dq.add_chain(&mem, &[(GuestAddress(0x8000), 16, true)]);
        restored.handle_queue_event(0);
        let mut used = Vec::new();
        while let Some(u) = dq.next_used(&mem) {
            used.push(u);
        }
        assert_eq!(used.len(), 4);
        assert_eq!(restored.save().queues[0].next_used, 4);
    }

    /// A running rng transport's state and its guest memory.
    fn running_state() -> (GuestMemoryMmap, MmioTransportState) {
        let mem = testing::memory();
        let mut t = rng_transport_on(&mem);
        let mut dq = DriverQueue::new(GuestAddress(0x1000), 16);
        testing::init_device(&mut t, 1 << VIRTIO_F_VERSION_1, &mut [&mut dq]);
        assert!(t.is_activated());
        (mem, t.save())
    }

    fn restore_rng(
        mem: &GuestMemoryMmap,
        state: &MmioTransportState,
    ) -> Result<MmioTransport, MmioError> {
        let device = VirtioDevice::Rng(Rng::new().unwrap());
        MmioTransport::restore(device, mem.clone(), state)
    }

    #[test]
    fn undefined_status_bits_are_refused_so_every_saved_state_restores() {
        // Found by fuzzing: a driver wrote status 0xfad37070; the transport
        // kept it, and restore then refused the state it had saved.
        let mem = testing::memory();
        let mut t = rng_transport_on(&mem);
        w32(&mut t, reg::STATUS, 0xfad3_7070);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | 0x10);
        assert_eq!(r32(&mut t, reg::STATUS), status::ACKNOWLEDGE);
        restore_rng(&mem, &t.save()).unwrap();
        // Every defined bit can still be set.
        w32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::FAILED);
        assert_eq!(
            r32(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::FAILED
        );
        restore_rng(&mem, &t.save()).unwrap();
    }

    #[test]
    fn restore_refuses_states_the_transport_cannot_reach() {
        let (mem, good) = running_state();
        assert!(restore_rng(&mem, &good).is_ok());
        type Mutation = Box<dyn Fn(&mut MmioTransportState)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("unknown status bit", Box::new(|s| s.status |= 0x10)),
            (
                "unknown interrupt bit",
                Box::new(|s| s.interrupt_status = 4),
            ),
            (
                "feature not offered",
                Box::new(|s| s.driver_features |= 1 << 3),
            ),
            ("legacy driver", Box::new(|s| s.driver_features = 0)),
            (
                "DRIVER_OK without FEATURES_OK",
                Box::new(|s| s.status &= !status::FEATURES_OK),
            ),
            (
                "larger queue than offered",
                Box::new(|s| s.queues[0].max_size = 1024),
            ),
            (
                "more in flight than the queue holds",
                Box::new(|s| s.queues[0].next_avail = s.queues[0].next_used.wrapping_add(17)),
            ),
            (
                "used ahead of avail",
                Box::new(|s| s.queues[0].next_used = s.queues[0].next_avail.wrapping_add(1)),
            ),
            (
                "rings outside guest memory",
                Box::new(|s| s.queues[0].desc_table = 1 << 40),
            ),
            (
                "used ring past the end of memory",
                Box::new(|s| s.queues[0].used_ring = testing::MEM_SIZE as u64 - 4),
            ),
            (
                "running queue not ready",
                Box::new(|s| s.queues[0].ready = false),
            ),
            (
                "event index not negotiated",
                Box::new(|s| s.queues[0].event_idx_enabled = true),
            ),
        ];
        for (what, mutate) in cases {
            let mut state = good.clone();
            mutate(&mut state);
            match restore_rng(&mem, &state) {
                Err(MmioError::InvalidState(why)) => assert!(!why.is_empty()),
                Err(e) => panic!("{what}: wrong error {e}"),
                Ok(_) => panic!("{what}: restored"),
            }
        }
        // Sizes and alignments are checked as the queue is rebuilt.
        let mut state = good.clone();
        state.queues[0].size = 12;
        assert!(matches!(
            restore_rng(&mem, &state),
            Err(MmioError::Queue { .. })
        ));
        // A device the driver has not started yet may hold any addresses:
        // activation checks them when the driver sets DRIVER_OK.
        let mut state = good.clone();
        state.status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        state.queues[0].desc_table = 1 << 40;
        assert!(restore_rng(&mem, &state).is_ok());
        // So may one that needs a reset (it serves nothing until then).
        let mut state = good;
        state.status |= status::DEVICE_NEEDS_RESET;
        state.queues[0].desc_table = 1 << 40;
        assert!(restore_rng(&mem, &state).is_ok());
    }

    #[test]
    fn restore_rejects_other_device_type() {
        let t = rng_transport();
        let mut state = t.save();
        state.queues.push(QueueSnapshot::default());
        let device = VirtioDevice::Rng(Rng::new().unwrap());
        assert!(matches!(
            MmioTransport::restore(device, testing::memory(), &state),
            Err(MmioError::QueueCount { .. })
        ));
    }
}
