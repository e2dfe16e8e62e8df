//! virtio-vsock (device type 19) with a Unix-socket host side.
//!
//! Host protocol, per VM:
//! - A host process connects to `uds_path`, writes `CONNECT <port>\n`, and
//!   reads back `OK <host_port>\n` once the guest accepted; the stream is
//!   then the connection to guest port `<port>`. If the guest refuses, the
//!   stream is closed.
//! - A guest connection to host port `P` is forwarded to a Unix socket at
//!   `<uds_path>_<P>`; with nothing listening there, the guest gets a reset.
//!
//! Flow control follows the virtio credit scheme in both directions, see
//! [`connection`].

pub mod connection;
pub mod muxer;
pub mod packet;

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;

use super::{QueueContext, VirtioError, VIRTIO_F_VERSION_1};
use muxer::Muxer;
use packet::{PacketHeader, HDR_LEN};

/// Virtio device id of vsock.
pub const DEVICE_TYPE: u32 = 19;

/// Queue indices.
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 << 10;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// How long host packets wait for the guest to handle a TRANSPORT_RESET
/// before they are sent anyway (a guest that never refills its event queue).
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Binding the host Unix socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Configuring a socket failed.
    #[error("socket setup failed")]
    Socket(#[source] io::Error),
    /// An epoll operation failed.
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
    /// Creating the timer failed.
    #[error("timerfd failed")]
    Timer(#[source] io::Error),
    /// The guest CID is reserved or too large.
    #[error("invalid guest CID {0} (must be 3..=0xfffffffe)")]
    InvalidCid(u64),
    /// The saved state is for another guest CID.
    #[error("saved guest CID {saved} differs from configured {actual}")]
    CidMismatch {
        /// CID in the saved state.
        saved: u64,
        /// Configured CID.
        actual: u64,
    },
}

/// How to attach a vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// Host Unix socket; must not exist yet.
    pub uds_path: PathBuf,
}

/// Serializable vsock state. Connections are not part of it: after a
/// restore the guest gets a TRANSPORT_RESET and reconnects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u64,
    /// A TRANSPORT_RESET event waits for an event-queue buffer.
    pub reset_pending: bool,
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Box<Muxer>,
    reset_pending: bool,
    /// A delivered TRANSPORT_RESET the guest has not handled yet: the event
    /// queue's available index when it went out, and when. The guest handles
    /// events and received packets in separate work items, so a connection
    /// request sent now could be handled first and then killed by the reset.
    reset_unacked: Option<(u16, Instant)>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

impl Vsock {
    /// Creates the device and starts listening on `config.uds_path`.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < 3 || config.guest_cid > 0xffff_fffe {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        Ok(Self {
            guest_cid: config.guest_cid,
            muxer: Box::new(Muxer::new(config.guest_cid, &config.uds_path)?),
            reset_pending: false,
            reset_unacked: None,
            rx_buf: vec![0u8; MAX_PKT_PAYLOAD],
            tx_buf: vec![0u8; MAX_PKT_PAYLOAD],
        })
    }

    /// Recreates the device for a restored guest. Host connections do not
    /// survive; call [`crate::MmioTransport::send_vsock_transport_reset`] so
    /// the guest drops its side of them.
    pub fn restore(config: &VsockConfig, state: &VsockState) -> Result<Self, VsockError> {
        if config.guest_cid != state.guest_cid {
            return Err(VsockError::CidMismatch {
                saved: state.guest_cid,
                actual: config.guest_cid,
            });
        }
        let mut v = Self::new(config)?;
        v.reset_pending = state.reset_pending;
        Ok(v)
    }

    /// Captures the device state.
    pub fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            reset_pending: self.reset_pending,
        }
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    pub(crate) fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    pub(crate) fn config_space(&self) -> [u8; 8] {
        self.guest_cid.to_le_bytes()
    }

    pub(crate) fn backend_fd(&self) -> RawFd {
        self.muxer.epoll_fd()
    }

    pub(crate) fn activate(&mut self, ctx: &mut QueueContext) -> Result<(), VirtioError> {
        self.process_rx(ctx)?;
        self.deliver_events(ctx)
    }

    pub(crate) fn reset(&mut self) {
        self.muxer.reset_all();
    }

    pub(crate) fn process_queue(
        &mut self,
        idx: usize,
        ctx: &mut QueueContext,
    ) -> Result<(), VirtioError> {
        match idx {
            RXQ => self.process_rx(ctx),
            TXQ => {
                self.process_tx(ctx)?;
                // Guest packets often make replies (RESPONSE, RST, credit).
                self.process_rx(ctx)
            }
            EVQ => {
                self.deliver_events(ctx)?;
                // A refilled event buffer may be the reset's acknowledgement.
                self.process_rx(ctx)
            }
            other => Err(VirtioError::NoSuchQueue(other)),
        }
    }

    pub(crate) fn process_backend(
        &mut self,
        ctx: Option<&mut QueueContext>,
    ) -> Result<(), VirtioError> {
        self.muxer.process_events()?;
        match ctx {
            Some(ctx) => self.process_rx(ctx),
            None => Ok(()),
        }
    }

    /// Drops all connections and queues a TRANSPORT_RESET event, delivered
    /// now if the driver is ready and has an event buffer posted.
    pub fn send_transport_reset(
        &mut self,
        ctx: Option<&mut QueueContext>,
    ) -> Result<(), VirtioError> {
        self.muxer.reset_all();
        self.reset_pending = true;
        match ctx {
            Some(ctx) => self.deliver_events(ctx),
            None => Ok(()),
        }
    }

    fn deliver_events(&mut self, ctx: &mut QueueContext) -> Result<(), VirtioError> {
        if !self.reset_pending {
            return Ok(());
        }
        let mem = ctx.mem;
        let queue = ctx.queue(EVQ)?;
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(());
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) => match w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => 4,
                Err(e) => {
                    tracing::warn!("vsock: event buffer too small: {e}");
                    0
                }
            },
            Err(e) => {
                tracing::warn!("vsock: unusable event buffer: {e}");
                0
            }
        };
        queue.add_used(mem, head, written)?;
        if written > 0 {
            self.reset_pending = false;
            let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
            self.reset_unacked = Some((avail, Instant::now()));
        }
        ctx.notify(EVQ)
    }

    fn process_tx(&mut self, ctx: &mut QueueContext) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let queue = ctx.queue(TXQ)?;
        let mut any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            any = true;
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => {
                    let mut hdr_bytes = [0u8; HDR_LEN];
                    if reader.read_exact(&mut hdr_bytes).is_ok() {
                        let hdr = PacketHeader::from_bytes(&hdr_bytes);
                        let len = hdr.len as usize;
                        if len > MAX_PKT_PAYLOAD || reader.available_bytes() < len {
                            tracing::warn!("vsock: tx packet with bad length {len}");
                        } else if reader.read_exact(&mut self.tx_buf[..len]).is_ok() {
                            self.muxer.handle_guest_packet(&hdr, &self.tx_buf[..len]);
                        }
                    } else {
                        tracing::warn!("vsock: short tx packet");
                    }
                }
                Err(e) => tracing::warn!("vsock: bad tx chain: {e}"),
            }
            queue.add_used(mem, head, 0)?;
        }
        if any {
            ctx.notify(TXQ)?;
        }
        Ok(())
    }

    /// Whether a delivered TRANSPORT_RESET is still unhandled. The guest
    /// posts a fresh event buffer once it handled one, which moves the event
    /// queue's available index.
    fn reset_in_flight(&mut self, ctx: &mut QueueContext) -> Result<bool, VirtioError> {
        let Some((avail_then, since)) = self.reset_unacked else {
            return Ok(false);
        };
        let mem = ctx.mem;
        let avail_now = ctx.queue(EVQ)?.avail_idx(mem, Ordering::Acquire)?.0;
        if avail_now != avail_then {
            tracing::debug!(
                "vsock: the guest handled the transport reset after {} ms",
                since.elapsed().as_millis()
            );
            self.reset_unacked = None;
            return Ok(false);
        }
        if since.elapsed() > RESET_ACK_TIMEOUT {
            tracing::warn!("vsock: the guest did not acknowledge the transport reset");
            self.reset_unacked = None;
            return Ok(false);
        }
        Ok(true)
    }

    fn process_rx(&mut self, ctx: &mut QueueContext) -> Result<(), VirtioError> {
        if self.muxer.has_rx() && self.reset_in_flight(ctx)? {
            tracing::debug!("vsock: holding host packets until the guest handled the reset");
            return Ok(());
        }
        let mem = ctx.mem;
        let queue = ctx.queue(RXQ)?;
        let mut any = false;
        while self.muxer.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    tracing::warn!("vsock: unusable rx buffer");
                    queue.add_used(mem, head, 0)?;
                    any = true;
                    continue;
                }
            };
            let max_payload = writer.available_bytes() - HDR_LEN;
            let Some((hdr, len)) = self.muxer.next_rx_packet(max_payload, &mut self.rx_buf) else {
                // Nothing to send after all: hand the buffer back to the ring.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                break;
            };
            let ok = writer.write_all(&hdr.to_bytes()).is_ok()
                && writer.write_all(&self.rx_buf[..len]).is_ok();
            if !ok {
                tracing::warn!("vsock: writing rx packet failed");
            }
            queue.add_used(mem, head, (HDR_LEN + len) as u32)?;
            any = true;
        }
        if any {
            ctx.notify(RXQ)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
