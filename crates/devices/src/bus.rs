//! Address-range dispatch of guest PIO and MMIO accesses to devices.

use std::sync::{Arc, Mutex, PoisonError};

use crate::Device;

/// Errors of [`Bus`].
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range has zero length or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

struct BusEntry {
    base: u64,
    len: u64,
    /// Added to `addr - base` so one device can sit at several disjoint ranges.
    offset_bias: u64,
    device: Arc<Mutex<Device>>,
}

/// A set of non-overlapping address ranges, each served by a device.
#[derive(Default)]
pub struct Bus {
    entries: Vec<BusEntry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`; accesses reach the device at
    /// offset `addr - base + offset_bias`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        offset_bias: u64,
        device: Arc<Mutex<Device>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            pos,
            BusEntry {
                base,
                len,
                offset_bias,
                device,
            },
        );
        Ok(())
    }

    /// The device covering `[addr, addr + size)` and the offset of `addr` in it.
    pub fn resolve(&self, addr: u64, size: usize) -> Option<(&Arc<Mutex<Device>>, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(idx.checked_sub(1)?)?;
        let offset = addr - entry.base;
        if offset.checked_add(size as u64)? > entry.len {
            return None;
        }
        Some((&entry.device, offset + entry.offset_bias))
    }

    /// Dispatches a read; returns false when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Every distinct device on the bus, in address order.
    pub fn devices(&self) -> Vec<Arc<Mutex<Device>>> {
        let mut out: Vec<Arc<Mutex<Device>>> = Vec::new();
        for e in &self.entries {
            if !out.iter().any(|d| Arc::ptr_eq(d, &e.device)) {
                out.push(Arc::clone(&e.device));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::i8042::I8042;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn i8042() -> Arc<Mutex<Device>> {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        Arc::new(Mutex::new(Device::I8042(I8042::new(evt))))
    }

    #[test]
    fn resolve_respects_bounds_and_bias() {
        let mut bus = Bus::new();
        let dev = i8042();
        bus.insert(0x60, 1, 0, Arc::clone(&dev)).unwrap();
        bus.insert(0x64, 1, 4, Arc::clone(&dev)).unwrap();
        assert_eq!(bus.resolve(0x60, 1).map(|(_, o)| o), Some(0));
        assert_eq!(bus.resolve(0x64, 1).map(|(_, o)| o), Some(4));
        assert!(bus.resolve(0x61, 1).is_none());
        assert!(bus.resolve(0x5f, 1).is_none());
        assert!(
            bus.resolve(0x60, 2).is_none(),
            "access crossing the range end"
        );
        assert_eq!(bus.devices().len(), 1);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, 0, i8042()).unwrap();
        assert!(matches!(
            bus.insert(0x10ff, 0x10, 0, i8042()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xff0, 0x11, 0, i8042()),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x1100, 0x10, 0, i8042()).unwrap();
        assert!(matches!(
            bus.insert(0x2000, 0, 0, i8042()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, 0, i8042()),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn dispatches_to_device() {
        let mut bus = Bus::new();
        bus.insert(0x64, 1, 4, i8042()).unwrap();
        let mut status = [0xffu8];
        assert!(bus.read(0x64, &mut status));
        assert_eq!(status[0] & 0x01, 0, "output buffer empty after creation");
        assert!(bus.write(0x64, &[0xaa]));
        assert!(bus.read(0x64, &mut status));
        assert_eq!(status[0] & 0x01, 1, "self-test result waiting");
        assert!(!bus.read(0x65, &mut status));
    }
}
