//! Builds the VM's devices, puts them on the buses and wires their
//! interrupts (irqfd) and queue notifications (ioeventfd) into KVM.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_devices::bus::BusError;
use ferry_devices::legacy::i8042::{COMMAND_OFFSET, DATA_OFFSET};
use ferry_devices::legacy::serial::{SerialError, SERIAL_PORT_LEN};
use ferry_devices::virtio::block::{Block, BlockError};
use ferry_devices::virtio::fs::{Fs, FsError};
use ferry_devices::virtio::mmio::{reg, MmioError, MMIO_SIZE};
use ferry_devices::virtio::net::{Net, NetError};
use ferry_devices::virtio::rng::Rng;
use ferry_devices::virtio::vsock::{Vsock, VsockError};
use ferry_devices::virtio::{VirtioDevice, VirtioDeviceState};
use ferry_devices::{Bus, ConsoleSink, Device, DeviceState, MmioTransport, Serial, I8042};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{FIRST_VIRTIO_IRQ, LAST_IRQ, SERIAL_IRQ, VIRTIO_MMIO_BASE};
use crate::config::VmConfig;
use crate::GuestMemoryMmap;

/// COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// i8042 data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// i8042 status/command port.
pub const I8042_COMMAND_PORT: u64 = 0x64;

/// Errors of device setup.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The console log could not be opened.
    #[error("cannot open the console log")]
    Console(#[source] SerialError),
    /// A disk image could not be opened.
    #[error("cannot open disk {index} ({path})")]
    Disk {
        /// Position in the config.
        index: usize,
        /// Image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: BlockError,
    },
    /// The vsock device could not be created.
    #[error("cannot set up vsock")]
    Vsock(#[source] VsockError),
    /// The network device could not be created (its backend is unusable).
    #[error("cannot set up the network device")]
    Net(#[source] NetError),
    /// The entropy source could not be opened.
    #[error("cannot open the entropy source")]
    Rng(#[source] io::Error),
    /// A shared directory could not be opened.
    #[error("cannot share a host directory")]
    Fs(#[source] FsError),
    /// A virtio transport could not be created.
    #[error("cannot create a virtio-mmio transport")]
    Transport(#[source] MmioError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// KVM_IRQFD failed.
    #[error("cannot register irqfd for IRQ {irq}")]
    Irqfd {
        /// The IRQ.
        irq: u32,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IOEVENTFD failed.
    #[error("cannot register ioeventfd at {addr:#x}")]
    Ioeventfd {
        /// The address.
        addr: u64,
        /// The underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A device range clashes on a bus.
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    /// A device could not be rebuilt from its saved state.
    #[error("cannot restore {name}: {reason}")]
    Restore {
        /// Device name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// More virtio devices than IRQs.
    #[error("{count} virtio devices requested, at most {max} fit")]
    TooManyDevices {
        /// Requested.
        count: usize,
        /// Possible.
        max: usize,
    },
}

impl DeviceError {
    /// A stable, machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            DeviceError::Console(_) => "CONSOLE_LOG_FAILED",
            DeviceError::Disk { .. } => "DISK_OPEN_FAILED",
            DeviceError::Vsock(_) => "VSOCK_SETUP_FAILED",
            DeviceError::Fs(_) => "FS_SHARE_FAILED",
            DeviceError::Net(_) => "NET_SETUP_FAILED",
            DeviceError::TooManyDevices { .. } => "INVALID_CONFIG",
            DeviceError::Restore { .. } => "RESTORE_DEVICE_FAILED",
            _ => "DEVICE_SETUP_FAILED",
        }
    }
}

/// One virtio-mmio slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base address of the register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// IRQ line.
    pub irq: u32,
}

/// The devices of a VM.
pub(crate) struct Devices {
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    /// Virtio transports, in slot order.
    pub(crate) virtio: Vec<Arc<Mutex<Device>>>,
    pub(crate) slots: Vec<MmioSlot>,
    /// Written by the i8042 when the guest resets.
    pub(crate) reset_evt: EventFd,
    /// Every device, legacy first.
    pub(crate) all: Vec<Arc<Mutex<Device>>>,
}

/// The slot of the `index`-th virtio device.
pub fn mmio_slot(index: usize) -> Option<MmioSlot> {
    let irq = FIRST_VIRTIO_IRQ.checked_add(u32::try_from(index).ok()?)?;
    (irq <= LAST_IRQ).then(|| MmioSlot {
        base: VIRTIO_MMIO_BASE + index as u64 * MMIO_SIZE,
        size: MMIO_SIZE,
        irq,
    })
}

fn virtio_devices(config: &VmConfig) -> Result<Vec<VirtioDevice>, DeviceError> {
    let mut out = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let block = Block::new(disk).map_err(|source| DeviceError::Disk {
            index,
            path: disk.path.clone(),
            source,
        })?;
        out.push(VirtioDevice::Block(block));
    }
    if let Some(v) = &config.vsock {
        out.push(VirtioDevice::Vsock(
            Vsock::new(v).map_err(DeviceError::Vsock)?,
        ));
    }
    if config.rng {
        out.push(VirtioDevice::Rng(Rng::new().map_err(DeviceError::Rng)?));
    }
    for fs in &config.fs {
        out.push(VirtioDevice::Fs(Box::new(
            Fs::new(fs).map_err(DeviceError::Fs)?,
        )));
    }
    if let Some(n) = &config.net {
        out.push(VirtioDevice::Net(Net::new(n).map_err(DeviceError::Net)?));
    }
    Ok(out)
}

fn restore_err(name: &'static str, e: impl std::error::Error) -> DeviceError {
    let mut reason = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        reason.push_str(": ");
        reason.push_str(&c.to_string());
        cur = c.source();
    }
    DeviceError::Restore { name, reason }
}

fn mismatch(name: &'static str) -> DeviceError {
    DeviceError::Restore {
        name,
        reason: "saved state is for another kind of device".into(),
    }
}

/// Rebuilds the virtio devices of `config` from `saved` (one per device, in
/// config order).
fn restored_virtio_devices(
    config: &VmConfig,
    saved: &[DeviceState],
) -> Result<Vec<VirtioDevice>, DeviceError> {
    let mut states = saved.iter().map(|s| match s {
        DeviceState::VirtioMmio(t) => Some(&t.device),
        _ => None,
    });
    let mut out = Vec::new();
    for disk in &config.disks {
        let Some(Some(VirtioDeviceState::Block(s))) = states.next() else {
            return Err(mismatch("virtio-blk"));
        };
        out.push(VirtioDevice::Block(
            Block::restore(disk, s).map_err(|e| restore_err("virtio-blk", e))?,
        ));
    }
    if let Some(v) = &config.vsock {
        let Some(Some(VirtioDeviceState::Vsock(s))) = states.next() else {
            return Err(mismatch("virtio-vsock"));
        };
        out.push(VirtioDevice::Vsock(
            Vsock::restore(v, s).map_err(|e| restore_err("virtio-vsock", e))?,
        ));
    }
    if config.rng {
        let Some(Some(VirtioDeviceState::Rng(s))) = states.next() else {
            return Err(mismatch("virtio-rng"));
        };
        out.push(VirtioDevice::Rng(
            Rng::restore(s).map_err(|e| restore_err("virtio-rng", e))?,
        ));
    }
    for fs in &config.fs {
        let Some(Some(VirtioDeviceState::Fs(s))) = states.next() else {
            return Err(mismatch("virtio-fs"));
        };
        out.push(VirtioDevice::Fs(Box::new(
            Fs::restore(fs, s).map_err(|e| restore_err("virtio-fs", e))?,
        )));
    }
    if let Some(n) = &config.net {
        let Some(Some(VirtioDeviceState::Net(s))) = states.next() else {
            return Err(mismatch("virtio-net"));
        };
        out.push(VirtioDevice::Net(
            Net::restore(n, s).map_err(|e| restore_err("virtio-net", e))?,
        ));
    }
    if states.next().is_some() {
        return Err(DeviceError::Restore {
            name: "virtio",
            reason: "more saved devices than the config describes".into(),
        });
    }
    Ok(out)
}

/// Creates the devices described by `config`, fresh or, with `saved`
/// (every device's state in bus order), restored.
pub(crate) fn create_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    console_tee: Option<File>,
    saved: Option<&[DeviceState]>,
) -> Result<Devices, DeviceError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut all = Vec::new();

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|source| DeviceError::Irqfd {
            irq: SERIAL_IRQ,
            source,
        })?;
    let sink = ConsoleSink::open(&config.console_log, console_tee).map_err(DeviceError::Console)?;
    let serial = match saved.map(|s| s.first()) {
        None => Serial::new(serial_irq, sink),
        Some(Some(DeviceState::Serial(state))) => {
            Serial::restore(serial_irq, sink, state).map_err(|e| restore_err("serial", e))?
        }
        Some(_) => return Err(mismatch("serial")),
    };
    let serial = Arc::new(Mutex::new(Device::Serial(serial)));
    pio.insert(SERIAL_PORT, SERIAL_PORT_LEN, 0, Arc::clone(&serial))
        .map_err(DeviceError::Bus)?;
    all.push(serial);

    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    let i8042_evt = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
    let i8042 = match saved.map(|s| s.get(1)) {
        None => I8042::new(i8042_evt),
        Some(Some(DeviceState::I8042(state))) => I8042::restore(i8042_evt, state),
        Some(_) => return Err(mismatch("i8042")),
    };
    let i8042 = Arc::new(Mutex::new(Device::I8042(i8042)));
    pio.insert(I8042_DATA_PORT, 1, DATA_OFFSET, Arc::clone(&i8042))
        .map_err(DeviceError::Bus)?;
    pio.insert(I8042_COMMAND_PORT, 1, COMMAND_OFFSET, Arc::clone(&i8042))
        .map_err(DeviceError::Bus)?;
    all.push(i8042);

    let devices = match saved {
        None => virtio_devices(config)?,
        Some(s) => restored_virtio_devices(config, s.get(2..).unwrap_or_default())?,
    };
    let transport_states: Vec<_> = saved
        .unwrap_or_default()
        .iter()
        .filter_map(|s| match s {
            DeviceState::VirtioMmio(t) => Some(t),
            _ => None,
        })
        .collect();
    let max = (LAST_IRQ - FIRST_VIRTIO_IRQ + 1) as usize;
    if devices.len() > max {
        return Err(DeviceError::TooManyDevices {
            count: devices.len(),
            max,
        });
    }
    let mut virtio = Vec::new();
    let mut slots = Vec::new();
    for (index, device) in devices.into_iter().enumerate() {
        let slot = mmio_slot(index).ok_or(DeviceError::TooManyDevices {
            count: index + 1,
            max,
        })?;
        let transport = match transport_states.get(index) {
            None => MmioTransport::new(device, mem.clone()).map_err(DeviceError::Transport)?,
            Some(state) => MmioTransport::restore(device, mem.clone(), state)
                .map_err(|e| restore_err("virtio-mmio", e))?,
        };
        vm.register_irqfd(transport.interrupt().eventfd(), slot.irq)
            .map_err(|source| DeviceError::Irqfd {
                irq: slot.irq,
                source,
            })?;
        let notify = slot.base + reg::QUEUE_NOTIFY;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(notify), q as u32)
                .map_err(|source| DeviceError::Ioeventfd {
                    addr: notify,
                    source,
                })?;
        }
        let dev = Arc::new(Mutex::new(Device::VirtioMmio(Box::new(transport))));
        mmio.insert(slot.base, slot.size, 0, Arc::clone(&dev))
            .map_err(DeviceError::Bus)?;
        all.push(Arc::clone(&dev));
        virtio.push(dev);
        slots.push(slot);
    }
    Ok(Devices {
        pio,
        mmio,
        virtio,
        slots,
        reset_evt,
        all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_4k_apart_with_consecutive_irqs() {
        assert_eq!(
            mmio_slot(0),
            Some(MmioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5
            })
        );
        assert_eq!(
            mmio_slot(2).map(|s| (s.base, s.irq)),
            Some((0xd000_2000, 7))
        );
        assert_eq!(mmio_slot(18).map(|s| s.irq), Some(23));
        assert_eq!(mmio_slot(19), None);
    }

    #[test]
    fn device_order_is_disks_vsock_rng_net() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let mut config = VmConfig::new("/k", dir.path().join("c.log"));
        config.disks = vec![
            crate::DiskConfig {
                path: img.clone(),
                read_only: false,
            },
            crate::DiskConfig {
                path: img,
                read_only: true,
            },
        ];
        config.vsock = Some(crate::VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("v.sock"),
        });
        config.rng = true;
        let (backend, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        config.net = Some(crate::config::NetConfig {
            mac: crate::config::MacAddr([2, 0, 0, 0, 0, 1]),
            backend: crate::config::NetBackend::Fd(std::os::fd::AsRawFd::as_raw_fd(&backend)),
        });
        let kinds: Vec<u32> = virtio_devices(&config)
            .unwrap()
            .iter()
            .map(|d| d.device_type())
            .collect();
        assert_eq!(kinds, vec![2, 2, 19, 4, 1]);

        config.net.as_mut().unwrap().backend =
            crate::config::NetBackend::Unix(dir.path().join("no-backend.sock"));
        let err = virtio_devices(&config)
            .err()
            .expect("missing backend fails");
        assert_eq!(err.code(), "NET_SETUP_FAILED");
        config.net = None;

        config.disks[0].path = dir.path().join("missing.img");
        let err = virtio_devices(&config).err().expect("missing disk fails");
        assert_eq!(err.code(), "DISK_OPEN_FAILED");
    }
}
