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
use ferry_devices::{
    Bus, ConsoleSink, Device, DeviceKind, DeviceState, MmioTransport, Serial, I8042,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{FIRST_VIRTIO_IRQ, LAST_IRQ, SERIAL_IRQ, VIRTIO_MMIO_BASE};
use crate::config::{DiskConfig, FsConfig, NetConfig, VmConfig, VsockConfig};
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
    /// The root disk cannot be filled from elsewhere (it is not a writable layer).
    #[error("cannot fill disk 0 ({path}) as the guest reaches it")]
    DiskFill {
        /// Image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
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
    /// The root disk's fill from elsewhere, while one runs.
    pub(crate) disk_fill: Option<Arc<ferry_disk::Filler>>,
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

/// One device of a VM: its kind and the piece of the config it is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSlot<'a> {
    /// The serial console.
    Serial,
    /// The i8042 (its reset line).
    I8042,
    /// A disk.
    Block(&'a DiskConfig),
    /// The vsock device.
    Vsock(&'a VsockConfig),
    /// The entropy device.
    Rng,
    /// A shared host directory.
    Fs(&'a FsConfig),
    /// The network device.
    Net(&'a NetConfig),
}

impl DeviceSlot<'_> {
    /// The kind of device the slot holds.
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceSlot::Serial => DeviceKind::Serial,
            DeviceSlot::I8042 => DeviceKind::I8042,
            DeviceSlot::Block(_) => DeviceKind::Block,
            DeviceSlot::Vsock(_) => DeviceKind::Vsock,
            DeviceSlot::Rng => DeviceKind::Rng,
            DeviceSlot::Fs(_) => DeviceKind::Fs,
            DeviceSlot::Net(_) => DeviceKind::Net,
        }
    }
}

/// The devices of a VM built from `config`, in bus order: serial, i8042,
/// then the virtio devices in MMIO slot order (disks in config order, vsock,
/// rng, shared directories in config order, net).
///
/// This is the one list of a VM's devices: booting creates them in this
/// order, a saved state lists them in this order, and restoring and
/// validating a saved state check it against this list.
pub fn device_plan(config: &VmConfig) -> Vec<DeviceSlot<'_>> {
    let mut plan = vec![DeviceSlot::Serial, DeviceSlot::I8042];
    plan.extend(config.disks.iter().map(DeviceSlot::Block));
    plan.extend(config.vsock.iter().map(DeviceSlot::Vsock));
    if config.rng {
        plan.push(DeviceSlot::Rng);
    }
    plan.extend(config.fs.iter().map(DeviceSlot::Fs));
    plan.extend(config.net.iter().map(DeviceSlot::Net));
    plan
}

fn restore_err(kind: DeviceKind, e: impl std::error::Error) -> DeviceError {
    let mut reason = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        reason.push_str(": ");
        reason.push_str(&c.to_string());
        cur = c.source();
    }
    DeviceError::Restore {
        name: kind.name(),
        reason,
    }
}

/// The saved state at `position` is of `saved`, the plan wants `want` there.
fn mismatch(position: usize, want: DeviceKind, saved: DeviceKind) -> DeviceError {
    DeviceError::Restore {
        name: want.name(),
        reason: format!("saved device {position} is {saved}, the config has {want} there"),
    }
}

/// Checks that `saved` holds one state per slot of `plan`, each of the
/// slot's kind.
fn check_saved(plan: &[DeviceSlot<'_>], saved: &[DeviceState]) -> Result<(), DeviceError> {
    for (position, (slot, state)) in plan.iter().zip(saved).enumerate() {
        if slot.kind() != state.kind() {
            return Err(mismatch(position, slot.kind(), state.kind()));
        }
    }
    if saved.len() != plan.len() {
        // Named after the first device one list has and the other lacks.
        let name = match saved.get(plan.len()) {
            Some(extra) => extra.kind().name(),
            None => plan[saved.len()].kind().name(),
        };
        return Err(DeviceError::Restore {
            name,
            reason: format!(
                "the saved state has {} devices, the config describes {}",
                saved.len(),
                plan.len()
            ),
        });
    }
    Ok(())
}

/// Opens the virtio device of `slot` (the `disk`-th disk for a block slot),
/// fresh or from its saved state.
fn virtio_device(
    slot: DeviceSlot<'_>,
    disk: usize,
    saved: Option<&VirtioDeviceState>,
) -> Result<VirtioDevice, DeviceError> {
    use VirtioDeviceState as S;
    let kind = slot.kind();
    Ok(match (slot, saved) {
        (DeviceSlot::Block(config), None) => {
            VirtioDevice::Block(Block::new(config).map_err(|source| DeviceError::Disk {
                index: disk,
                path: config.path.clone(),
                source,
            })?)
        }
        (DeviceSlot::Block(config), Some(S::Block(s))) => {
            VirtioDevice::Block(Block::restore(config, s).map_err(|e| restore_err(kind, e))?)
        }
        (DeviceSlot::Vsock(config), None) => {
            VirtioDevice::Vsock(Vsock::new(config).map_err(DeviceError::Vsock)?)
        }
        (DeviceSlot::Vsock(config), Some(S::Vsock(s))) => {
            VirtioDevice::Vsock(Vsock::restore(config, s).map_err(|e| restore_err(kind, e))?)
        }
        (DeviceSlot::Rng, None) => VirtioDevice::Rng(Rng::new().map_err(DeviceError::Rng)?),
        (DeviceSlot::Rng, Some(S::Rng(s))) => {
            VirtioDevice::Rng(Rng::restore(s).map_err(|e| restore_err(kind, e))?)
        }
        (DeviceSlot::Fs(config), None) => {
            VirtioDevice::Fs(Box::new(Fs::new(config).map_err(DeviceError::Fs)?))
        }
        (DeviceSlot::Fs(config), Some(S::Fs(s))) => VirtioDevice::Fs(Box::new(
            Fs::restore(config, s).map_err(|e| restore_err(kind, e))?,
        )),
        (DeviceSlot::Net(config), None) => {
            VirtioDevice::Net(Net::new(config).map_err(DeviceError::Net)?)
        }
        (DeviceSlot::Net(config), Some(S::Net(s))) => {
            VirtioDevice::Net(Net::restore(config, s).map_err(|e| restore_err(kind, e))?)
        }
        (_, saved) => {
            return Err(DeviceError::Restore {
                name: kind.name(),
                reason: match saved {
                    Some(s) => format!("saved state is of {}", s.kind()),
                    None => "not a virtio device".into(),
                },
            })
        }
    })
}

/// The virtio devices of a fresh VM built from `config`, in bus order.
#[cfg(test)]
fn virtio_devices(config: &VmConfig) -> Result<Vec<VirtioDevice>, DeviceError> {
    let mut disks = 0;
    let mut out = Vec::new();
    for slot in device_plan(config) {
        if slot.kind().is_virtio() {
            out.push(virtio_device(slot, disks, None)?);
        }
        if matches!(slot, DeviceSlot::Block(_)) {
            disks += 1;
        }
    }
    Ok(out)
}

/// Creates the devices described by `config`, in [`device_plan`] order,
/// fresh or, with `saved` (every device's state in that order), restored.
pub(crate) fn create_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    mut console_tee: Option<File>,
    mut disk_fill: Option<Arc<dyn ferry_disk::FillSource>>,
    saved: Option<&[DeviceState]>,
) -> Result<Devices, DeviceError> {
    let plan = device_plan(config);
    if let Some(saved) = saved {
        check_saved(&plan, saved)?;
    }
    let max = (LAST_IRQ - FIRST_VIRTIO_IRQ + 1) as usize;
    let count = plan.iter().filter(|s| s.kind().is_virtio()).count();
    if count > max {
        return Err(DeviceError::TooManyDevices { count, max });
    }

    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut all = Vec::new();
    let mut virtio = Vec::new();
    let mut slots = Vec::new();
    let mut disks = 0;
    let mut filler = None;
    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;

    for (position, &slot) in plan.iter().enumerate() {
        let kind = slot.kind();
        let state = saved.and_then(|s| s.get(position));
        let wrong = |s: &DeviceState| mismatch(position, kind, s.kind());
        match slot {
            DeviceSlot::Serial => {
                let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
                vm.register_irqfd(&serial_irq, SERIAL_IRQ)
                    .map_err(|source| DeviceError::Irqfd {
                        irq: SERIAL_IRQ,
                        source,
                    })?;
                let sink = ConsoleSink::open(&config.console_log, console_tee.take())
                    .map_err(DeviceError::Console)?;
                let serial = match state {
                    None => Serial::new(serial_irq, sink),
                    Some(DeviceState::Serial(s)) => {
                        Serial::restore(serial_irq, sink, s).map_err(|e| restore_err(kind, e))?
                    }
                    Some(other) => return Err(wrong(other)),
                };
                let serial = Arc::new(Mutex::new(Device::Serial(serial)));
                pio.insert(SERIAL_PORT, SERIAL_PORT_LEN, 0, Arc::clone(&serial))
                    .map_err(DeviceError::Bus)?;
                all.push(serial);
            }
            DeviceSlot::I8042 => {
                let i8042_evt = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
                let i8042 = match state {
                    None => I8042::new(i8042_evt),
                    Some(DeviceState::I8042(s)) => I8042::restore(i8042_evt, s),
                    Some(other) => return Err(wrong(other)),
                };
                let i8042 = Arc::new(Mutex::new(Device::I8042(i8042)));
                pio.insert(I8042_DATA_PORT, 1, DATA_OFFSET, Arc::clone(&i8042))
                    .map_err(DeviceError::Bus)?;
                pio.insert(I8042_COMMAND_PORT, 1, COMMAND_OFFSET, Arc::clone(&i8042))
                    .map_err(DeviceError::Bus)?;
                all.push(i8042);
            }
            _ => {
                let transport_state = match state {
                    None => None,
                    Some(DeviceState::VirtioMmio(t)) => Some(t),
                    Some(other) => return Err(wrong(other)),
                };
                let mut device = virtio_device(slot, disks, transport_state.map(|t| &t.device))?;
                if let (VirtioDevice::Block(block), DeviceSlot::Block(config)) = (&mut device, slot)
                {
                    if disks == 0 {
                        if let Some(source) = disk_fill.take() {
                            filler = Some(block.fill_from(source).map_err(|source| {
                                DeviceError::DiskFill {
                                    path: config.path.clone(),
                                    source,
                                }
                            })?);
                        }
                    }
                    disks += 1;
                }
                let index = virtio.len();
                let mmio_slot = mmio_slot(index).ok_or(DeviceError::TooManyDevices {
                    count: index + 1,
                    max,
                })?;
                let transport = match transport_state {
                    None => {
                        MmioTransport::new(device, mem.clone()).map_err(DeviceError::Transport)?
                    }
                    Some(t) => MmioTransport::restore(device, mem.clone(), t)
                        .map_err(|e| restore_err(kind, e))?,
                };
                let dev = attach_virtio(vm, &mut mmio, transport, mmio_slot)?;
                all.push(Arc::clone(&dev));
                virtio.push(dev);
                slots.push(mmio_slot);
            }
        }
    }
    Ok(Devices {
        pio,
        mmio,
        virtio,
        slots,
        reset_evt,
        all,
        disk_fill: filler,
    })
}

/// Wires a virtio transport's interrupt and queue notifications into KVM
/// and puts it on the MMIO bus at `slot`.
fn attach_virtio(
    vm: &VmFd,
    mmio: &mut Bus,
    transport: MmioTransport,
    slot: MmioSlot,
) -> Result<Arc<Mutex<Device>>, DeviceError> {
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
    Ok(dev)
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

    /// A config with every kind of device (two disks, two shared
    /// directories), whose backends exist under `dir`.
    fn full_config(dir: &std::path::Path, backend: &std::os::unix::net::UnixStream) -> VmConfig {
        let img = dir.join("d.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let mut config = VmConfig::new("/k", dir.join("c.log"));
        config.disks = vec![
            DiskConfig {
                path: img.clone(),
                read_only: false,
            },
            DiskConfig {
                path: img,
                read_only: true,
            },
        ];
        config.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
        });
        config.rng = true;
        config.fs = ["a", "b"]
            .into_iter()
            .map(|tag| FsConfig {
                tag: tag.into(),
                shared_dir: dir.to_path_buf(),
                read_only: tag == "b",
            })
            .collect();
        config.net = Some(NetConfig {
            mac: crate::config::MacAddr([2, 0, 0, 0, 0, 1]),
            backend: crate::config::NetBackend::Fd(std::os::fd::AsRawFd::as_raw_fd(backend)),
        });
        config
    }

    /// The saved state of every device of a fresh VM built from `config`.
    fn fresh_states(config: &VmConfig) -> Vec<DeviceState> {
        let mut states = vec![
            DeviceState::Serial(ferry_devices::SerialState::default()),
            DeviceState::I8042(ferry_devices::I8042State {
                control: 0,
                last_was_command: false,
                pending_command: None,
                output: vec![],
            }),
        ];
        states.extend(virtio_devices(config).unwrap().iter().map(|d| {
            DeviceState::VirtioMmio(ferry_devices::MmioTransportState {
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                status: 0,
                interrupt_status: 0,
                config_generation: 0,
                queues: vec![],
                device: d.save(),
            })
        }));
        states
    }

    #[test]
    fn plan_lists_every_device_in_bus_order() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let config = full_config(dir.path(), &backend);
        let plan = device_plan(&config);
        assert_eq!(
            plan,
            vec![
                DeviceSlot::Serial,
                DeviceSlot::I8042,
                DeviceSlot::Block(&config.disks[0]),
                DeviceSlot::Block(&config.disks[1]),
                DeviceSlot::Vsock(config.vsock.as_ref().unwrap()),
                DeviceSlot::Rng,
                DeviceSlot::Fs(&config.fs[0]),
                DeviceSlot::Fs(&config.fs[1]),
                DeviceSlot::Net(config.net.as_ref().unwrap()),
            ]
        );
        let names: Vec<&str> = plan.iter().map(|s| s.kind().name()).collect();
        assert_eq!(
            names,
            [
                "serial",
                "i8042",
                "virtio-blk",
                "virtio-blk",
                "virtio-vsock",
                "virtio-rng",
                "virtio-fs",
                "virtio-fs",
                "virtio-net"
            ]
        );
        // The virtio devices take the MMIO slots in plan order.
        let opened: Vec<DeviceKind> = virtio_devices(&config)
            .unwrap()
            .iter()
            .map(|d| d.kind())
            .collect();
        let planned: Vec<DeviceKind> = plan
            .iter()
            .map(|s| s.kind())
            .filter(|k| k.is_virtio())
            .collect();
        assert_eq!(opened, planned);
        // The saved state of those devices fits the plan, kind for kind.
        let states = fresh_states(&config);
        let saved: Vec<DeviceKind> = states.iter().map(|s| s.kind()).collect();
        let want: Vec<DeviceKind> = plan.iter().map(|s| s.kind()).collect();
        assert_eq!(saved, want);
        check_saved(&plan, &states).unwrap();

        let minimal = VmConfig::new("/k", "/c");
        assert_eq!(
            device_plan(&minimal),
            vec![DeviceSlot::Serial, DeviceSlot::I8042]
        );
    }

    #[test]
    fn saved_states_must_follow_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let config = full_config(dir.path(), &backend);
        let plan = device_plan(&config);
        let states = fresh_states(&config);
        let refused = |states: &[DeviceState]| {
            let err = check_saved(&plan, states).expect_err("refused");
            assert_eq!(err.code(), "RESTORE_DEVICE_FAILED");
            err.to_string()
        };

        // vsock and rng swapped
        let mut swapped = states.clone();
        swapped.swap(4, 5);
        let msg = refused(&swapped);
        assert!(
            msg.contains("virtio-vsock") && msg.contains("virtio-rng"),
            "{msg}"
        );
        let mut swapped = states.clone();
        swapped.swap(0, 1);
        let msg = refused(&swapped);
        assert!(msg.contains("serial") && msg.contains("i8042"), "{msg}");

        let msg = refused(&states[..states.len() - 1]);
        assert!(
            msg.contains("virtio-net") && msg.contains("8 devices"),
            "{msg}"
        );
        let mut extra = states.clone();
        extra.push(states[5].clone());
        let msg = refused(&extra);
        assert!(
            msg.contains("virtio-rng") && msg.contains("10 devices"),
            "{msg}"
        );
        let msg = refused(&[]);
        assert!(msg.contains("0 devices"), "{msg}");
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
