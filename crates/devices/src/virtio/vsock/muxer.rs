//! Host side of vsock: the Unix listener, host streams and their mapping to
//! guest connections.
//!
//! All host fds sit in one epoll instance owned by the muxer; the VMM's event
//! loop watches that epoll fd and calls [`Muxer::process_events`] when it
//! becomes readable. Interest is level-triggered and recomputed after every
//! change, so a connection that cannot make progress (no guest credit, no rx
//! buffers) is not polled.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnKey, Connection};
use super::packet::{op, PacketHeader, HOST_CID, TYPE_STREAM};
use super::VsockError;

/// First host port handed out for host-initiated connections.
const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Longest accepted "CONNECT <port>\n" line.
const MAX_CONNECT_LINE: usize = 32;
/// Resets for unknown connections waiting for rx buffers; more are dropped.
const MAX_ORPHAN_RSTS: usize = 1024;
/// How long a fully shut-down guest connection may wait for the host to drain.
const DRAIN_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(5)
};

/// A host client that connected to the Unix socket but has not sent its
/// CONNECT line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock connection multiplexer.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    pending_host: HashMap<RawFd, PendingHost>,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    rx_queue: VecDeque<ConnKey>,
    orphan_rsts: VecDeque<PacketHeader>,
    deadlines: HashMap<ConnKey, Instant>,
    next_local_port: u32,
}

fn epoll_err(e: io::Error) -> VsockError {
    VsockError::Epoll(e)
}

impl Muxer {
    /// Listens on `uds_path` for host clients of the guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        listener.set_nonblocking(true).map_err(VsockError::Socket)?;
        let epoll = Epoll::new().map_err(epoll_err)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        let m = Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            timer,
            pending_host: HashMap::new(),
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            rx_queue: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            deadlines: HashMap::new(),
            next_local_port: LOCAL_PORT_BASE,
        };
        for fd in [m.listener.as_raw_fd(), m.timer.as_raw_fd()] {
            m.epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(epoll_err)?;
        }
        Ok(m)
    }

    /// The epoll fd to watch for host activity.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets are waiting for guest rx buffers.
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rx_queue.is_empty()
    }

    /// Drops every connection (device reset or transport reset).
    pub fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.rx_queue.clear();
        self.orphan_rsts.clear();
        self.deadlines.clear();
    }

    /// Handles whatever the host side has ready, without blocking.
    pub fn process_events(&mut self) -> Result<(), VsockError> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(epoll_err(e)),
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            if fd == self.listener.as_raw_fd() {
                self.accept_all();
            } else if fd == self.timer.as_raw_fd() {
                self.expire_deadlines();
            } else if self.pending_host.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.fd_keys.get(&fd) {
                self.conn_event(key, set);
            }
        }
        Ok(())
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let ev = EpollEvent::new(EventSet::IN, fd as u64);
                    if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
                        tracing::warn!("vsock: epoll add: {e}");
                        continue;
                    }
                    self.pending_host.insert(
                        fd,
                        PendingHost {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the CONNECT line one byte at a time so bytes the client sends
    /// right after it stay in the socket for the guest.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending_host.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT".to_string()),
                Ok(_) if byte[0] == b'\n' => break Ok(Some(std::mem::take(&mut p.line))),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => {
                    break Err("CONNECT line too long".into())
                }
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let line = match outcome {
            Ok(None) => return,
            Ok(Some(line)) => line,
            Err(reason) => {
                tracing::debug!("vsock: dropping host client: {reason}");
                self.drop_pending_host(fd);
                return;
            }
        };
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            tracing::debug!("vsock: malformed CONNECT line");
            self.drop_pending_host(fd);
            return;
        };
        let Some(p) = self.pending_host.remove(&fd) else {
            return;
        };
        tracing::debug!("vsock: host client connects to port {peer_port}");
        let local_port = self.alloc_local_port(peer_port);
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let mut conn = Connection::new_local(p.stream, key, self.guest_cid);
        // Still registered for IN from the pending stage.
        conn.registered = Some(EventSet::IN);
        self.fd_keys.insert(fd, key);
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn drop_pending_host(&mut self, fd: RawFd) {
        if let Some(p) = self.pending_host.remove(&fd) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(p) if p != u32::MAX => p,
                _ => LOCAL_PORT_BASE,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            conn.on_error();
        } else {
            if set.contains(EventSet::IN) {
                conn.on_readable();
            }
            if set.contains(EventSet::OUT) {
                conn.flush_tx();
            }
            if set.contains(EventSet::HANG_UP) {
                conn.on_hup();
            }
        }
        self.refresh(key);
    }

    /// Applies a packet the guest sent.
    pub fn handle_guest_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!("vsock: dropping packet {}->{}", hdr.src_cid, hdr.dst_cid);
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.queue_orphan_rst(hdr);
            }
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.handle_guest_packet(hdr, payload);
                self.refresh(key);
            }
            None => match hdr.op {
                op::REQUEST => self.connect_to_host(key, hdr),
                op::RST => {}
                _ => self.queue_orphan_rst(hdr),
            },
        }
    }

    fn connect_to_host(&mut self, key: ConnKey, hdr: &PacketHeader) {
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        let stream =
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("vsock: guest connect to {path}: {e}");
                    self.queue_orphan_rst(hdr);
                    return;
                }
            };
        self.fd_keys.insert(stream.as_raw_fd(), key);
        self.conns
            .insert(key, Connection::new_peer(stream, key, self.guest_cid, hdr));
        self.refresh(key);
    }

    fn queue_orphan_rst(&mut self, hdr: &PacketHeader) {
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            tracing::warn!("vsock: too many pending resets, dropping one");
            return;
        }
        self.orphan_rsts.push_back(PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Brings a connection's scheduling, epoll interest and deadline in line
    /// with its state, dropping it if it is finished.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_closed() {
            self.remove(key);
            return;
        }
        if conn.has_rx_work() && !conn.in_rx_queue {
            conn.in_rx_queue = true;
            self.rx_queue.push_back(key);
        }
        let fd = conn.stream().as_raw_fd();
        if conn.is_hup() {
            // A hung-up socket reports HUP forever: keep it out of epoll.
            if conn.registered.take().is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        } else {
            let want = conn.desired_events();
            let res = match conn.registered {
                Some(have) if have == want => Ok(()),
                Some(_) => self.epoll.ctl(
                    ControlOperation::Modify,
                    fd,
                    EpollEvent::new(want, fd as u64),
                ),
                None => self
                    .epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(want, fd as u64)),
            };
            match res {
                Ok(()) => conn.registered = Some(want),
                Err(e) => tracing::warn!("vsock {key:?}: epoll: {e}"),
            }
        }
        let draining = conn.is_draining_after_shutdown();
        if draining && !self.deadlines.contains_key(&key) {
            self.deadlines.insert(key, Instant::now() + DRAIN_TIMEOUT);
            self.arm_timer();
        } else if !draining {
            self.deadlines.remove(&key);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream().as_raw_fd();
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.fd_keys.remove(&fd);
        }
        self.deadlines.remove(&key);
    }

    fn arm_timer(&mut self) {
        let Some(next) = self.deadlines.values().min().copied() else {
            return;
        };
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if let Err(e) = self.timer.reset(wait, None) {
            tracing::warn!("vsock: timer: {e}");
        }
    }

    fn expire_deadlines(&mut self) {
        // Only clears the expiration count; the deadlines say what expired.
        let _ = self.timer.clear();
        let now = Instant::now();
        let expired: Vec<ConnKey> = self
            .deadlines
            .iter()
            .filter(|(_, &d)| d <= now)
            .map(|(&k, _)| k)
            .collect();
        for key in expired {
            self.deadlines.remove(&key);
            if let Some(conn) = self.conns.get_mut(&key) {
                tracing::debug!("vsock {key:?}: host did not drain in time");
                conn.force_reset();
            }
            self.refresh(key);
        }
        self.arm_timer();
    }

    /// Produces the next packet for the guest into `buf` (payload at most
    /// `max_payload` bytes). Returns the header and payload length.
    pub fn next_rx_packet(
        &mut self,
        max_payload: usize,
        buf: &mut [u8],
    ) -> Option<(PacketHeader, usize)> {
        if let Some(h) = self.orphan_rsts.pop_front() {
            return Some((h, 0));
        }
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_queue = false;
            let out = conn.produce_rx(max_payload, buf);
            self.refresh(key);
            if out.is_some() {
                return out;
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours; leave no stale path behind.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            tracing::debug!("vsock: removing {}: {e}", self.uds_path.display());
        }
    }
}
