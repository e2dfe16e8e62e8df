//! Test helpers playing the guest driver's side of virtqueues.

use vm_memory::{Address, Bytes, GuestAddress};

use super::mmio::{reg, status, MmioTransport};
use crate::GuestMemoryMmap;

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 8 << 20;

/// Fresh zeroed guest memory at address 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// A split virtqueue as a driver lays it out in guest memory.
pub struct DriverQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries whose rings start at `base` (needs about
    /// `size * 26 + 64` bytes).
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc.unchecked_add(16 * n);
        // Used ring must be 4-byte aligned.
        let used = GuestAddress((avail.0 + 6 + 2 * n + 3) & !3);
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Programs the queue into the transport's registers for queue `index`.
    pub fn attach(&self, t: &mut MmioTransport, index: u32) {
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        w(t, reg::QUEUE_SEL, index);
        w(t, reg::QUEUE_NUM, u32::from(self.size));
        w(t, reg::QUEUE_DESC_LOW, self.desc.0 as u32);
        w(t, reg::QUEUE_DESC_HIGH, (self.desc.0 >> 32) as u32);
        w(t, reg::QUEUE_AVAIL_LOW, self.avail.0 as u32);
        w(t, reg::QUEUE_AVAIL_HIGH, (self.avail.0 >> 32) as u32);
        w(t, reg::QUEUE_USED_LOW, self.used.0 as u32);
        w(t, reg::QUEUE_USED_HIGH, (self.used.0 >> 32) as u32);
        w(t, reg::QUEUE_READY, 1);
    }

    /// Publishes a chain of `(addr, len, device_writable)` buffers; returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(GuestAddress, u32, bool)]) -> u16 {
        assert!(!bufs.is_empty());
        let head = self.next_desc;
        for (i, (addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let next = (idx + 1) % self.size;
            let mut flags = if *writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let d = self.desc.unchecked_add(16 * u64::from(idx));
            mem.write_obj(addr.0, d).unwrap();
            mem.write_obj(*len, d.unchecked_add(8)).unwrap();
            mem.write_obj(flags, d.unchecked_add(12)).unwrap();
            mem.write_obj(next, d.unchecked_add(14)).unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        let slot = self.avail_idx % self.size;
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// The next used element `(head, len)` the device published, if any.
    pub fn next_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let slot = self.used_seen % self.size;
        let e = self.used.unchecked_add(4 + 8 * u64::from(slot));
        let id: u32 = mem.read_obj(e).unwrap();
        let len: u32 = mem.read_obj(e.unchecked_add(4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Sets `used_event` (the used index after which the driver wants an interrupt).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        let addr = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        mem.write_obj(v, addr).unwrap();
    }
}

/// Runs the driver initialisation sequence with `features` and the given queues.
pub fn init_device(t: &mut MmioTransport, features: u64, queues: &mut [&mut DriverQueue]) {
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(t, reg::STATUS, 0);
    w(t, reg::STATUS, status::ACKNOWLEDGE);
    w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, features as u32);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    w(t, reg::STATUS, s);
    let mut b = [0u8; 4];
    t.read(reg::STATUS, &mut b);
    assert_eq!(
        u32::from_le_bytes(b) & status::FEATURES_OK,
        status::FEATURES_OK
    );
    for (i, q) in queues.iter().enumerate() {
        q.attach(t, i as u32);
    }
    w(t, reg::STATUS, s | status::DRIVER_OK);
}
