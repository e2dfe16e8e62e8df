//! virtio-net (device type 1) with a user-mode backend.
//!
//! The backend is a connected stream socket carrying Ethernet frames, each
//! preceded by its length as a 4-byte big-endian integer: the format of
//! QEMU's `-netdev stream` and of passt's socket ([`FrameDecoder`],
//! [`encode_frame`]). ferry runs passt on the other end, so the guest gets
//! outbound TCP, UDP and ICMP through ordinary host sockets, with no TAP
//! device and no root.
//!
//! The device offers `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS` and
//! `VIRTIO_NET_F_MRG_RXBUF`; no offloads, so frames are at most one MTU
//! plus header and checksums are the guest's business.
//!
//! Flow control, both ways, without busy loops: the backend socket sits in
//! the device's own epoll set whose interest follows what can make
//! progress. It is read only while the guest has receive buffers posted,
//! and watched for writability only while transmitted frames wait for
//! socket space; while they wait, the transmit queue is not drained, so the
//! guest sees backpressure.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{QueueContext, VirtioError, VIRTIO_F_VERSION_1};
use crate::GuestMemoryMmap;

/// Virtio device id of network devices.
pub const DEVICE_TYPE: u32 = 1;

const RXQ: usize = 0;
const TXQ: usize = 1;

/// Feature bit: the device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature bit: the driver can merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// Feature bit: the config space has a link status field.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// Link status: up.
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Length of `struct virtio_net_hdr_v1` (with VERSION_1, `num_buffers`
/// is always present).
pub const NET_HDR_LEN: usize = 12;
/// Largest Ethernet frame accepted from either side (passt's default MTU
/// of 65520 plus the Ethernet header fits).
pub const MAX_FRAME_LEN: usize = 65_536;
/// Length prefix of a frame on the backend socket.
const LEN_PREFIX: usize = 4;
/// Receive buffer of the backend socket: room for several frames.
const RX_BUF_LEN: usize = 4 * (MAX_FRAME_LEN + LEN_PREFIX);
/// Transmitted bytes gathered before a write to the backend.
const TX_BATCH: usize = 64 << 10;

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Connecting to the backend's Unix socket failed.
    #[error("cannot connect to the network backend at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The backend descriptor is unusable.
    #[error("network backend descriptor {fd} is unusable")]
    Fd {
        /// The descriptor number.
        fd: RawFd,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Configuring the socket failed.
    #[error("network backend socket setup failed")]
    Socket(#[source] io::Error),
    /// An epoll operation failed.
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
    /// The MAC address is not a unicast address.
    #[error("MAC address {0} is multicast; a NIC needs a unicast address")]
    MulticastMac(MacAddr),
}

/// A 48-bit Ethernet address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether the address is unicast (bit 0 of the first octet clear).
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }

    /// Whether the locally administered bit is set.
    pub fn is_local(&self) -> bool {
        self.0[0] & 2 != 0
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid MAC address {s:?} (expected six hex octets like 02:00:00:aa:bb:cc)")
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where the device's frames go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetBackend {
    /// Connect to a Unix stream socket at this path (e.g. one passt listens
    /// on with `--socket PATH`).
    Unix(PathBuf),
    /// A connected stream socket this process already holds, by descriptor
    /// number (e.g. one end of a socketpair whose other end was handed to
    /// `passt --fd`). The device works on a duplicate; the caller keeps, and
    /// eventually closes, the original. Meaningful only inside the process
    /// that holds it: a restored VM is given a fresh one.
    Fd(RawFd),
}

/// How to attach a network device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The guest's MAC address (per VM; a forked VM gets a new one).
    pub mac: MacAddr,
    /// The frame backend.
    pub backend: NetBackend,
}

/// Serializable state of a network device: its config space and the
/// features it was activated with. Queue state lives in the transport's
/// state; the backend connection is not saved (a restored VM gets a new
/// one) and neither are frames in flight (the guest's TCP retransmits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC address the guest was given.
    pub mac: MacAddr,
    /// Link status bits of the config space.
    pub status: u16,
    /// Features the driver activated the device with; 0 while inactive.
    #[serde(default)]
    pub active_features: u64,
}

/// Appends `frame` to `out` in the backend's format.
pub fn encode_frame(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// The backend announced a frame longer than [`MAX_FRAME_LEN`]: the stream
/// is out of step and cannot be trusted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("backend frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
pub struct FrameTooLong(pub usize);

/// Splits the backend's byte stream into frames.
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; RX_BUF_LEN],
            start: 0,
            end: 0,
        }
    }

    /// The next complete frame, if one is buffered. Empty frames are
    /// skipped.
    pub fn frame(&mut self) -> Result<Option<&[u8]>, FrameTooLong> {
        loop {
            let avail = &self.buf[self.start..self.end];
            let Some(prefix) = avail.get(..LEN_PREFIX) else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if len > MAX_FRAME_LEN {
                return Err(FrameTooLong(len));
            }
            if len == 0 {
                self.start += LEN_PREFIX;
                continue;
            }
            if avail.len() < LEN_PREFIX + len {
                return Ok(None);
            }
            let s = self.start + LEN_PREFIX;
            return Ok(Some(&self.buf[s..s + len]));
        }
    }

    /// Drops the frame [`FrameDecoder::frame`] returned.
    pub fn consume_frame(&mut self) {
        if let Ok(Some(f)) = self.frame() {
            let n = f.len();
            self.start += LEN_PREFIX + n;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
        }
    }

    /// Reads once from `r` into free space. `Ok(0)` means end of file.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.end == self.buf.len() {
            // Make room: move the partial frame to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Buffered bytes not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Forgets everything buffered.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
}

/// What became of a frame offered to the guest.
enum RxOutcome {
    Delivered,
    /// Unusable or too small buffers: the frame was dropped.
    Dropped,
    /// No receive buffer is posted; try again when the guest adds some.
    NoBuffers,
}

/// The network device.
pub struct Net {
    mac: MacAddr,
    status: u16,
    backend: Option<UnixStream>,
    epoll: Epoll,
    interest: EventSet,
    /// Features of the running driver; 0 while the device is inactive.
    active_features: u64,
    /// The guest had no receive buffer for the next frame.
    rx_blocked: bool,
    rx: FrameDecoder,
    tx_pending: Vec<u8>,
    tx_written: usize,
    tx_frame: Vec<u8>,
}

fn open_backend(backend: &NetBackend) -> Result<UnixStream, NetError> {
    match backend {
        NetBackend::Unix(path) => UnixStream::connect(path).map_err(|source| NetError::Connect {
            path: path.clone(),
            source,
        }),
        NetBackend::Fd(fd) => {
            let fd = *fd;
            let err = |source| NetError::Fd { fd, source };
            // SAFETY: F_DUPFD_CLOEXEC takes no pointers; on a descriptor that
            // is not open it fails with EBADF, which is reported.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(err(io::Error::last_os_error()));
            }
            // SAFETY: fcntl just created `dup`; nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(dup) };
            let file = std::fs::File::from(owned);
            let is_socket = file.metadata().map_err(err)?.file_type().is_socket();
            if !is_socket {
                return Err(err(io::Error::other("not a socket")));
            }
            Ok(UnixStream::from(OwnedFd::from(file)))
        }
    }
}

impl Net {
    /// Creates the device and connects its backend.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        if !config.mac.is_unicast() {
            return Err(NetError::MulticastMac(config.mac));
        }
        let backend = open_backend(&config.backend)?;
        backend.set_nonblocking(true).map_err(NetError::Socket)?;
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        let fd = backend.as_raw_fd();
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::empty(), fd as u64),
            )
            .map_err(NetError::Epoll)?;
        Ok(Self {
            mac: config.mac,
            status: VIRTIO_NET_S_LINK_UP,
            backend: Some(backend),
            epoll,
            interest: EventSet::empty(),
            active_features: 0,
            rx_blocked: false,
            rx: FrameDecoder::new(),
            tx_pending: Vec::with_capacity(TX_BATCH + MAX_FRAME_LEN + LEN_PREFIX),
            tx_written: 0,
            tx_frame: vec![0u8; MAX_FRAME_LEN],
        })
    }

    /// Recreates the device for a restored guest with a new backend. The
    /// MAC address comes from `config`: a fork passes a new one (the guest
    /// keeps using the address its driver read at probe time until told
    /// otherwise).
    pub fn restore(config: &NetConfig, state: &NetState) -> Result<Self, NetError> {
        let mut n = Self::new(config)?;
        n.status = state.status;
        n.active_features = state.active_features;
        n.update_interest();
        Ok(n)
    }

    /// Captures the device state.
    pub fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            status: self.status,
            active_features: self.active_features,
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Whether the backend is still connected.
    pub fn backend_connected(&self) -> bool {
        self.backend.is_some()
    }

    pub(crate) fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
    }

    /// `struct virtio_net_config` up to `status`.
    pub(crate) fn config_space(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&self.status.to_le_bytes());
        c
    }

    pub(crate) fn backend_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub(crate) fn activate(
        &mut self,
        acked_features: u64,
        ctx: &mut QueueContext,
    ) -> Result<(), VirtioError> {
        // VERSION_1 is always acked, so an active device never has 0 here.
        self.active_features = acked_features | 1 << VIRTIO_F_VERSION_1;
        self.rx_blocked = false;
        self.process_rx(ctx)?;
        self.process_tx(ctx)
    }

    fn active(&self) -> bool {
        self.active_features != 0
    }

    fn mergeable(&self) -> bool {
        self.active_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    pub(crate) fn reset(&mut self) {
        self.active_features = 0;
        self.rx_blocked = false;
        self.update_interest();
    }

    pub(crate) fn process_queue(
        &mut self,
        idx: usize,
        ctx: &mut QueueContext,
    ) -> Result<(), VirtioError> {
        match idx {
            RXQ => {
                self.rx_blocked = false;
                self.process_rx(ctx)
            }
            TXQ => self.process_tx(ctx),
            other => Err(VirtioError::NoSuchQueue(other)),
        }
    }

    pub(crate) fn process_backend(
        &mut self,
        ctx: Option<&mut QueueContext>,
    ) -> Result<(), VirtioError> {
        let mut events = [EpollEvent::default(); 1];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                tracing::warn!("virtio-net: epoll: {e}");
                0
            }
        };
        let hangup = events[..n].iter().any(|e| {
            e.event_set()
                .intersects(EventSet::HANG_UP | EventSet::ERROR)
        });
        match ctx {
            Some(ctx) if self.active() => {
                self.process_rx(ctx)?;
                // A hung-up backend is not read while the guest has no
                // buffers; drop it now rather than be woken for it forever.
                if hangup && self.rx_blocked {
                    self.close_backend("hung up");
                }
                self.process_tx(ctx)
            }
            _ => {
                if hangup {
                    self.close_backend("hung up");
                }
                self.update_interest();
                Ok(())
            }
        }
    }

    fn close_backend(&mut self, why: &str) {
        if let Some(s) = self.backend.take() {
            tracing::warn!("virtio-net: backend {why}; the guest's network is down");
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                s.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tx_pending.clear();
        self.tx_written = 0;
        self.interest = EventSet::empty();
    }

    /// Watches the backend for what can make progress now.
    fn update_interest(&mut self) {
        let Some(s) = &self.backend else {
            return;
        };
        let mut want = EventSet::empty();
        if self.active() && !self.rx_blocked {
            want |= EventSet::IN;
        }
        if self.tx_written < self.tx_pending.len() {
            want |= EventSet::OUT;
        }
        if want != self.interest {
            let fd = s.as_raw_fd();
            match self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, fd as u64),
            ) {
                Ok(()) => {
                    tracing::debug!("virtio-net: backend interest {want:?}");
                    self.interest = want
                }
                Err(e) => tracing::warn!("virtio-net: epoll: {e}"),
            }
        }
    }

    /// Writes pending transmitted bytes; true when none are left.
    fn flush_tx(&mut self) -> bool {
        while self.tx_written < self.tx_pending.len() {
            let Some(s) = self.backend.as_mut() else {
                self.tx_pending.clear();
                self.tx_written = 0;
                return true;
            };
            match s.write(&self.tx_pending[self.tx_written..]) {
                Ok(n) => self.tx_written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    self.close_backend(&format!("write failed ({e})"));
                    return true;
                }
            }
        }
        self.tx_pending.clear();
        self.tx_written = 0;
        true
    }

    fn process_tx(&mut self, ctx: &mut QueueContext) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let mut any = false;
        if self.flush_tx() {
            let queue = ctx.queue(TXQ)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                any = true;
                match chain.reader(mem) {
                    Ok(mut r) => {
                        let total = r.available_bytes();
                        let mut hdr = [0u8; NET_HDR_LEN];
                        let len = total.saturating_sub(NET_HDR_LEN);
                        if total < NET_HDR_LEN || len > MAX_FRAME_LEN {
                            tracing::warn!("virtio-net: tx chain of {total} bytes dropped");
                        } else if r.read_exact(&mut hdr).is_ok()
                            && r.read_exact(&mut self.tx_frame[..len]).is_ok()
                        {
                            if self.backend.is_some() {
                                tracing::trace!("virtio-net: tx frame of {len} bytes");
                                encode_frame(&self.tx_frame[..len], &mut self.tx_pending);
                            }
                        } else {
                            tracing::warn!("virtio-net: unreadable tx chain");
                        }
                    }
                    Err(e) => tracing::warn!("virtio-net: bad tx chain: {e}"),
                }
                queue.add_used(mem, head, 0)?;
                // Hand full batches to the backend; stop taking frames while
                // it cannot keep up.
                if self.tx_pending.len() >= TX_BATCH && !self.flush_tx() {
                    break;
                }
            }
            self.flush_tx();
        }
        if any {
            ctx.notify(TXQ)?;
        }
        self.update_interest();
        Ok(())
    }

    fn process_rx(&mut self, ctx: &mut QueueContext) -> Result<(), VirtioError> {
        let mem = ctx.mem;
        let mut any = false;
        if self.active() {
            let mergeable = self.mergeable();
            loop {
                match self.rx.frame() {
                    Err(e) => {
                        tracing::warn!("virtio-net: {e}");
                        self.rx.clear();
                        self.close_backend("out of step");
                        break;
                    }
                    Ok(Some(frame)) => {
                        let queue = ctx.queue(RXQ)?;
                        let len = frame.len();
                        match deliver(queue, mem, frame, mergeable)? {
                            RxOutcome::Delivered => {
                                tracing::trace!("virtio-net: rx frame of {len} bytes");
                                any = true
                            }
                            RxOutcome::Dropped => {}
                            RxOutcome::NoBuffers => {
                                self.rx_blocked = true;
                                break;
                            }
                        }
                        self.rx.consume_frame();
                    }
                    Ok(None) => {
                        let Some(s) = self.backend.as_mut() else {
                            break;
                        };
                        match self.rx.fill(s) {
                            Ok(0) => {
                                self.close_backend("closed the connection");
                                break;
                            }
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                self.close_backend(&format!("read failed ({e})"));
                                break;
                            }
                        }
                    }
                }
            }
        }
        if any {
            ctx.notify(RXQ)?;
        }
        self.update_interest();
        Ok(())
    }
}

/// Writes one frame with its virtio-net header into the guest's receive
/// buffers: one buffer, or as many as needed when buffers may be merged.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &[u8],
    mergeable: bool,
) -> Result<RxOutcome, VirtioError> {
    let needed = NET_HDR_LEN + frame.len();
    let mut chains: Vec<(u16, Writer<'_, crate::DirtySlice<'_>>)> = Vec::new();
    let mut capacity = 0;
    while capacity < needed {
        if !chains.is_empty() && !mergeable {
            // One buffer is all a driver without MRG_RXBUF gives; this frame
            // does not fit. Hand the buffer back for the next frame.
            queue.set_next_avail(queue.next_avail().wrapping_sub(1));
            tracing::debug!(
                "virtio-net: {}-byte frame too large for rx buffer",
                frame.len()
            );
            return Ok(RxOutcome::Dropped);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            queue.set_next_avail(queue.next_avail().wrapping_sub(chains.len() as u16));
            return Ok(RxOutcome::NoBuffers);
        };
        let head = chain.head_index();
        match chain.writer(mem) {
            Ok(w) => {
                capacity += w.available_bytes();
                chains.push((head, w));
            }
            Err(e) => {
                tracing::warn!("virtio-net: bad rx chain: {e}");
                queue.add_used(mem, head, 0)?;
                for (h, _) in chains {
                    queue.add_used(mem, h, 0)?;
                }
                return Ok(RxOutcome::Dropped);
            }
        }
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    let mut offset = 0;
    for (head, mut w) in chains {
        let mut written = 0;
        while offset < needed && w.available_bytes() > 0 {
            let piece = if offset < NET_HDR_LEN {
                &hdr[offset..]
            } else {
                &frame[offset - NET_HDR_LEN..]
            };
            let n = piece.len().min(w.available_bytes());
            if let Err(e) = w.write_all(&piece[..n]) {
                tracing::warn!("virtio-net: writing rx buffer: {e}");
                break;
            }
            offset += n;
            written += n;
        }
        queue.add_used(mem, head, written as u32)?;
    }
    Ok(RxOutcome::Delivered)
}

#[cfg(test)]
mod tests;
