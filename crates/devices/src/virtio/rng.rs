//! virtio-rng: fills guest buffers from the host's `/dev/urandom`.

use std::fs::File;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::{QueueContext, VirtioError, VIRTIO_F_VERSION_1};

/// Virtio device id of the entropy device.
pub const DEVICE_TYPE: u32 = 4;

/// Largest request served at once; the guest asks again for more.
const MAX_REQUEST: usize = 64 << 10;

/// virtio-rng has no state beyond its transport and queue; this type exists
/// so the device fits the save/restore scheme like every other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {}

/// The entropy device.
pub struct Rng {
    source: File,
}

impl Rng {
    /// Opens the entropy source.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            source: File::open("/dev/urandom")?,
        })
    }

    /// Rebuilds the device from saved state.
    pub fn restore(_state: &RngState) -> io::Result<Self> {
        Self::new()
    }

    /// Captures the device state.
    pub fn save(&self) -> RngState {
        RngState {}
    }

    pub(crate) fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    pub(crate) fn process_queue(
        &mut self,
        idx: usize,
        ctx: &mut QueueContext,
    ) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let mut buf = vec![0u8; MAX_REQUEST];
        let queue = ctx.queue(idx)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(MAX_REQUEST);
                    match self
                        .source
                        .read_exact(&mut buf[..n])
                        .and_then(|_| w.write_all(&buf[..n]))
                    {
                        Ok(()) => n as u32,
                        Err(e) => {
                            tracing::warn!("virtio-rng: {e}");
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("virtio-rng: bad descriptor chain: {e}");
                    0
                }
            };
            queue.add_used(mem, head, written)?;
        }
        ctx.notify(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::testing::{self, DriverQueue};
    use crate::virtio::{VirtioDevice, VirtioDeviceState};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers() {
        let mem = testing::memory();
        let mut t =
            MmioTransport::new(VirtioDevice::Rng(Rng::new().unwrap()), mem.clone()).unwrap();
        let mut dq = DriverQueue::new(GuestAddress(0x1000), 8);
        testing::init_device(&mut t, 1 << VIRTIO_F_VERSION_1, &mut [&mut dq]);

        let head = dq.add_chain(
            &mem,
            &[
                (GuestAddress(0x10000), 100, true),
                (GuestAddress(0x20000), 156, true),
            ],
        );
        t.handle_queue_event(0);
        assert_eq!(dq.next_used(&mem), Some((head, 256)));
        let mut a = [0u8; 100];
        let mut b = [0u8; 156];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        // 256 zero bytes from urandom would be a 2^-2048 event.
        assert!(a.iter().chain(b.iter()).any(|&x| x != 0));
        assert!(t.interrupt().eventfd().read().is_ok());

        // A read-only buffer gets nothing written.
        let head = dq.add_chain(&mem, &[(GuestAddress(0x30000), 64, false)]);
        t.handle_queue_event(0);
        assert_eq!(dq.next_used(&mem), Some((head, 0)));
        let mut c = [0u8; 64];
        mem.read_slice(&mut c, GuestAddress(0x30000)).unwrap();
        assert_eq!(c, [0u8; 64]);
    }

    #[test]
    fn state_round_trip() {
        let rng = Rng::new().unwrap();
        let saved = rng.save();
        let json = serde_json::to_string(&VirtioDeviceState::Rng(saved.clone())).unwrap();
        let parsed: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        let VirtioDeviceState::Rng(state) = parsed else {
            panic!("wrong variant");
        };
        assert_eq!(Rng::restore(&state).unwrap().save(), saved);
    }
}
