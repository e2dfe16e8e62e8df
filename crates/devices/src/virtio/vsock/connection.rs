//! One guest<->host stream: its state machine and credit accounting.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    op, PacketHeader, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer the host side offers the guest per connection.
pub const CONN_BUF_SIZE: u32 = 256 << 10;
/// Forwarded bytes after which the guest is told about freed credit unprompted.
/// Below `CONN_BUF_SIZE`, so a guest out of credit always gets an update once
/// the host reader catches up.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Identifies a connection: host-side port and guest-side port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data may flow.
    Established,
}

/// Control packets waiting for an rx buffer.
#[derive(Default)]
struct Pending {
    request: bool,
    response: bool,
    rst: bool,
    credit_update: bool,
    shutdown: u32,
}

/// A vsock stream bridged to a host Unix stream.
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    state: ConnState,
    pending: Pending,
    request_sent: bool,
    /// RST sent or received: the connection is to be dropped.
    closed: bool,

    // Host -> guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host stream may have data (EPOLLIN seen, no EAGAIN since).
    readable: bool,
    host_eof: bool,
    /// The host peer closed both directions; the fd is out of epoll.
    host_hup: bool,

    // Guest -> host.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes to write before guest data (the "OK <port>\n" reply).
    prefix: Vec<u8>,
    tx_buf: VecDeque<u8>,
    peer_shutdown: u32,
    write_shut: bool,

    /// Queued in the muxer's rx list.
    pub in_rx_queue: bool,
    /// Interest currently registered in epoll (`None`: not registered).
    pub registered: Option<EventSet>,
}

impl Connection {
    /// A connection the host asked for; a REQUEST is queued for the guest.
    pub fn new_local(stream: UnixStream, key: ConnKey, guest_cid: u64) -> Self {
        let mut c = Self::new(stream, key, guest_cid, ConnState::LocalInit);
        c.pending.request = true;
        c
    }

    /// A connection the guest asked for and the host accepted; a RESPONSE is queued.
    pub fn new_peer(stream: UnixStream, key: ConnKey, guest_cid: u64, hdr: &PacketHeader) -> Self {
        let mut c = Self::new(stream, key, guest_cid, ConnState::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pending.response = true;
        c
    }

    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: ConnState) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            state,
            pending: Pending::default(),
            request_sent: false,
            closed: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            host_hup: false,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            prefix: Vec::new(),
            tx_buf: VecDeque::new(),
            peer_shutdown: 0,
            write_shut: false,
            in_rx_queue: false,
            registered: None,
        }
    }

    /// The host stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Whether the connection is finished and should be dropped.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether the host peer hung up (the fd must stay out of epoll).
    pub fn is_hup(&self) -> bool {
        self.host_hup
    }

    /// Whether the guest fully shut down and we are still draining to the host.
    pub fn is_draining_after_shutdown(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_BOTH && !self.closed && !self.pending.rst
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read_host(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && !self.pending.rst
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx_work(&self) -> bool {
        let p = &self.pending;
        p.rst
            || p.request
            || p.response
            || p.shutdown != 0
            || p.credit_update
            || (self.readable && self.can_read_host())
    }

    /// The epoll interest the connection needs now.
    pub fn desired_events(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.can_read_host() && !self.readable {
            e |= EventSet::IN;
        }
        if !self.prefix.is_empty() || !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    fn header(&self, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    fn reset(&mut self) {
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
    }

    /// Produces the next packet for the guest, with up to `max_payload` bytes
    /// of data read into `buf`. Returns the header and the payload length.
    pub fn produce_rx(
        &mut self,
        max_payload: usize,
        buf: &mut [u8],
    ) -> Option<(PacketHeader, usize)> {
        let mut hdr = if self.pending.rst {
            self.pending = Pending::default();
            self.closed = true;
            Some(self.header(op::RST))
        } else if self.pending.request {
            self.pending.request = false;
            self.request_sent = true;
            Some(self.header(op::REQUEST))
        } else if self.pending.response {
            self.pending.response = false;
            Some(self.header(op::RESPONSE))
        } else {
            None
        };
        let mut len = 0;
        if hdr.is_none() && self.readable && self.can_read_host() && max_payload > 0 {
            let n = max_payload.min(buf.len()).min(self.peer_credit() as usize);
            match self.stream.read(&mut buf[..n]) {
                Ok(0) => {
                    self.readable = false;
                    self.host_eof = true;
                    // A hung-up host also stops receiving.
                    self.pending.shutdown |= if self.host_hup {
                        SHUTDOWN_BOTH
                    } else {
                        SHUTDOWN_SEND
                    };
                }
                Ok(read) => {
                    len = read;
                    self.rx_cnt += Wrapping(read as u32);
                    let mut h = self.header(op::RW);
                    h.len = read as u32;
                    hdr = Some(h);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock {:?}: host read: {e}", self.key);
                    self.closed = true;
                    hdr = Some(self.header(op::RST));
                }
            }
        }
        if hdr.is_none() && self.pending.shutdown != 0 {
            let mut h = self.header(op::SHUTDOWN);
            h.flags = self.pending.shutdown;
            self.pending.shutdown = 0;
            hdr = Some(h);
        }
        if hdr.is_none() && self.pending.credit_update {
            hdr = Some(self.header(op::CREDIT_UPDATE));
        }
        // Every packet carries fwd_cnt, so any of them answers a credit request.
        if hdr.is_some() {
            self.pending.credit_update = false;
            self.last_fwd_cnt_sent = self.fwd_cnt;
        }
        hdr.map(|h| (h, len))
    }

    /// Applies a packet from the guest.
    pub fn handle_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            op::RESPONSE if self.state == ConnState::LocalInit => {
                tracing::debug!("vsock {:?}: the guest accepted", self.key);
                self.state = ConnState::Established;
                self.prefix = format!("OK {}\n", self.key.local_port).into_bytes();
                self.flush_tx();
            }
            op::RST => self.closed = true,
            op::SHUTDOWN if self.state == ConnState::Established => {
                self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                self.flush_tx();
            }
            op::RW if self.state == ConnState::Established => {
                if self.tx_buf.len() + payload.len() > CONN_BUF_SIZE as usize {
                    tracing::warn!("vsock {:?}: guest exceeded its credit", self.key);
                    self.reset();
                } else {
                    self.send_to_host(payload);
                }
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.pending.credit_update = true,
            other => {
                tracing::debug!("vsock {:?}: unexpected op {other}", self.key);
                self.reset();
            }
        }
    }

    fn send_to_host(&mut self, data: &[u8]) {
        let mut data = data;
        if self.prefix.is_empty() && self.tx_buf.is_empty() {
            while !data.is_empty() {
                match self.stream.write(data) {
                    Ok(n) => {
                        data = &data[n..];
                        self.fwd_cnt += Wrapping(n as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!("vsock {:?}: host write: {e}", self.key);
                        self.reset();
                        return;
                    }
                }
            }
        }
        self.tx_buf.extend(data);
        self.after_write();
    }

    /// Writes buffered bytes to the host stream (on EPOLLOUT or new data).
    pub fn flush_tx(&mut self) {
        while !self.prefix.is_empty() {
            match self.stream.write(&self.prefix) {
                Ok(n) => {
                    self.prefix.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock {:?}: host write: {e}", self.key);
                    self.reset();
                    return;
                }
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock {:?}: host write: {e}", self.key);
                    self.reset();
                    return;
                }
            }
        }
        self.after_write();
    }

    fn after_write(&mut self) {
        if self.pending.rst {
            return;
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
        if !self.prefix.is_empty() || !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            self.write_shut = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                tracing::debug!("vsock {:?}: shutdown: {e}", self.key);
            }
        }
        // The guest closed its socket and waits for our RST to finish.
        if self.peer_shutdown == SHUTDOWN_BOTH {
            self.reset();
        }
    }

    /// The host stream reported readable.
    pub fn on_readable(&mut self) {
        self.readable = true;
    }

    /// The host peer closed the stream. Returns whether a REQUEST already
    /// reached the guest (for connections not yet established).
    pub fn on_hup(&mut self) -> bool {
        self.host_hup = true;
        // Whatever the host wrote before closing is still to be read.
        self.readable = true;
        if self.state == ConnState::LocalInit {
            if self.request_sent {
                self.reset();
            } else {
                self.closed = true;
            }
        }
        self.request_sent
    }

    /// Error on the host stream: reset the guest side.
    pub fn on_error(&mut self) {
        self.host_hup = true;
        if self.request_sent || self.state == ConnState::Established {
            self.reset();
        } else {
            self.closed = true;
        }
    }

    /// Gives up waiting for the host to drain: reset now.
    pub fn force_reset(&mut self) {
        self.reset();
    }
}
