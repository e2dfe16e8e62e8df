//! virtio-mmio transport state from a snapshot, restored over guest memory
//! the input fills, then driven: queue notifications, register reads and
//! writes, the post-restore kick. Restore must refuse what the transport
//! cannot reach (sizes not powers of two, queues larger than offered, more
//! buffers in flight than a queue holds, rings outside guest memory) and
//! nothing may panic; an accepted state must save back unchanged.

#![no_main]

use arbitrary::Arbitrary;
use ferry_devices::virtio::mmio::{MmioTransport, MmioTransportState};
use ferry_devices::virtio::rng::{Rng, RngState};
use ferry_devices::virtio::{QueueSnapshot, VirtioDevice, VirtioDeviceState};
use ferry_devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of the harness.
const MEM: u64 = 256 << 10;

#[derive(Arbitrary, Debug)]
struct Input {
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// Mostly small: the known status bits.
    status: u8,
    raw_status: Option<u32>,
    interrupt_status: u8,
    config_generation: u32,
    queues: Vec<Queue>,
    /// (address, bytes) written into guest memory before the restore.
    memory: Vec<(u16, Vec<u8>)>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
struct Queue {
    max_size: u16,
    size: u16,
    ready: bool,
    /// Ring addresses: in units of 16 bytes inside guest memory, or raw.
    desc: Addr,
    avail: Addr,
    used: Addr,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
}

#[derive(Arbitrary, Debug)]
enum Addr {
    Near(u16),
    Raw(u64),
}

impl Addr {
    fn get(&self) -> u64 {
        match self {
            Addr::Near(n) => u64::from(*n) * 16 % MEM,
            Addr::Raw(a) => *a,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Notify(u8),
    Read(u16),
    Write(u16, u32),
    Poke(u16, Vec<u8>),
    Kick,
    Save,
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    for (at, bytes) in input.memory.iter().take(16) {
        let _ = mem.write_slice(&bytes[..bytes.len().min(4096)], GuestAddress(u64::from(*at) * 4));
    }
    let state = MmioTransportState {
        device_features_sel: input.device_features_sel,
        driver_features_sel: input.driver_features_sel,
        driver_features: input.driver_features,
        queue_sel: input.queue_sel,
        status: input.raw_status.unwrap_or(u32::from(input.status)),
        interrupt_status: u32::from(input.interrupt_status),
        config_generation: input.config_generation,
        queues: input
            .queues
            .iter()
            .take(4)
            .map(|q| QueueSnapshot {
                max_size: q.max_size,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc.get(),
                avail_ring: q.avail.get(),
                used_ring: q.used.get(),
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx_enabled,
            })
            .collect(),
        device: VirtioDeviceState::Rng(RngState {}),
    };
    let device = VirtioDevice::Rng(Rng::new().expect("open /dev/urandom"));
    let Ok(mut t) = MmioTransport::restore(device, mem.clone(), &state) else {
        return;
    };
    assert_eq!(t.save(), state, "an accepted state saves back unchanged");
    for q in &state.queues {
        assert!(q.size.is_power_of_two() && q.size <= q.max_size);
        assert!(q.next_avail.wrapping_sub(q.next_used) <= q.size);
    }
    for op in input.ops.iter().take(32) {
        match op {
            Op::Notify(i) => t.handle_queue_event(usize::from(*i % 4)),
            Op::Read(off) => {
                let mut b = [0u8; 4];
                t.read(u64::from(*off % 0x200), &mut b);
            }
            Op::Write(off, v) => t.write(u64::from(*off % 0x200), &v.to_le_bytes()),
            Op::Poke(at, bytes) => {
                let _ = mem.write_slice(
                    &bytes[..bytes.len().min(512)],
                    GuestAddress(u64::from(*at) * 4),
                );
            }
            Op::Kick => {
                let _ = t.kick_after_restore();
            }
            Op::Save => {
                // What a running transport saves, it restores.
                let saved = t.save();
                let device = VirtioDevice::Rng(Rng::new().unwrap());
                let again = MmioTransport::restore(device, mem.clone(), &saved);
                assert!(again.is_ok(), "a saved state restores: {:?}", again.err());
            }
        }
    }
});
