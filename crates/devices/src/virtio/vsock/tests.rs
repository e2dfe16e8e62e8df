//! Tests driving the vsock device through its MMIO transport, with the test
//! playing the guest driver and real Unix sockets on the host side.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{CONN_BUF_SIZE, CREDIT_UPDATE_THRESHOLD};
use super::packet::{
    op, PacketHeader, HDR_LEN, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::*;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{self, DriverQueue};
use crate::virtio::{VirtioDevice, VirtioDeviceState};
use crate::GuestMemoryMmap;

const CID: u64 = 42;
const QSIZE: u16 = 256;
const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;
const RX_BASE: u64 = 0x20_0000;
const TX_AREA: GuestAddress = GuestAddress(0x40_0000);
const EV_BUF: GuestAddress = GuestAddress(0x9000);
const GUEST_BUF_ALLOC: u32 = 256 << 10;

/// The guest driver's side of a vsock device.
struct Guest {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    t: MmioTransport,
    rxq: DriverQueue,
    txq: DriverQueue,
    evq: DriverQueue,
    rx_addr: HashMap<u16, GuestAddress>,
    next_rx_slot: u64,
    /// Per connection (guest port): bytes the guest app consumed.
    fwd_cnt: HashMap<u32, Wrapping<u32>>,
}

fn hdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mem = testing::memory();
        let vsock = Vsock::new(&VsockConfig {
            guest_cid: CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        let mut t = MmioTransport::new(VirtioDevice::Vsock(vsock), mem.clone()).unwrap();
        let mut rxq = DriverQueue::new(GuestAddress(0x1000), QSIZE);
        let mut txq = DriverQueue::new(GuestAddress(0x4000), QSIZE);
        let mut evq = DriverQueue::new(GuestAddress(0x7000), 4);
        testing::init_device(
            &mut t,
            1 << crate::virtio::VIRTIO_F_VERSION_1,
            &mut [&mut rxq, &mut txq, &mut evq],
        );
        assert!(t.is_activated());
        let mut g = Self {
            _dir: dir,
            uds,
            mem,
            t,
            rxq,
            txq,
            evq,
            rx_addr: HashMap::new(),
            next_rx_slot: 0,
            fwd_cnt: HashMap::new(),
        };
        g.post_rx(64);
        g
    }

    fn vsock(&self) -> &Vsock {
        match self.t.device() {
            VirtioDevice::Vsock(v) => v,
            _ => unreachable!(),
        }
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            // Slots cycle; at most 64 buffers are outstanding out of 256.
            let addr = GuestAddress(RX_BASE + (self.next_rx_slot % 128) * 0x1100);
            self.next_rx_slot += 1;
            let head = self.rxq.add_chain(&self.mem, &[(addr, RX_BUF_LEN, true)]);
            self.rx_addr.insert(head, addr);
        }
        self.t.handle_queue_event(RXQ);
    }

    fn send(&mut self, mut h: PacketHeader, payload: &[u8]) {
        h.len = payload.len() as u32;
        if let Some(f) = self.fwd_cnt.get(&h.src_port) {
            h.fwd_cnt = f.0;
        }
        self.mem.write_slice(&h.to_bytes(), TX_AREA).unwrap();
        let mut bufs = vec![(TX_AREA, HDR_LEN as u32, false)];
        if !payload.is_empty() {
            let data = TX_AREA.unchecked_add(0x100);
            self.mem.write_slice(payload, data).unwrap();
            bufs.push((data, payload.len() as u32, false));
        }
        self.txq.add_chain(&self.mem, &bufs);
        self.t.handle_queue_event(TXQ);
        assert!(
            self.txq.next_used(&self.mem).is_some(),
            "tx buffer returned"
        );
    }

    /// Lets the device look at host sockets.
    fn pump(&mut self) {
        self.t.handle_backend_event();
    }

    /// Collects packets the device put in rx buffers, reposting the buffers.
    fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rxq.next_used(&self.mem) {
            let addr = self.rx_addr.remove(&head).expect("known rx buffer");
            let mut b = [0u8; HDR_LEN];
            self.mem.read_slice(&mut b, addr).unwrap();
            let h = PacketHeader::from_bytes(&b);
            assert_eq!(len as usize, HDR_LEN + h.len as usize);
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, addr.unchecked_add(HDR_LEN as u64))
                .unwrap();
            assert_eq!(
                (h.src_cid, h.dst_cid, h.type_),
                (HOST_CID, CID, TYPE_STREAM)
            );
            out.push((h, payload));
        }
        if !out.is_empty() {
            self.post_rx(out.len());
        }
        out
    }

    fn recv_one(&mut self) -> (PacketHeader, Vec<u8>) {
        let mut p = self.recv();
        assert_eq!(p.len(), 1, "expected one packet, got {p:?}");
        p.remove(0)
    }

    /// Host connects to guest `port`; returns the stream and the host port.
    fn host_connect(&mut self, port: u32, guest_src: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump(); // accept
        self.pump(); // read the line
        let (h, _) = self.recv_one();
        assert_eq!((h.op, h.dst_port), (op::REQUEST, port));
        self.fwd_cnt.insert(guest_src, Wrapping(0));
        let mut r = hdr(op::RESPONSE, guest_src, h.src_port);
        r.src_port = port;
        self.fwd_cnt.insert(port, Wrapping(0));
        self.send(r, &[]);
        let mut line = Vec::new();
        let mut b = [0u8];
        while b[0] != b'\n' {
            s.read_exact(&mut b).unwrap();
            line.push(b[0]);
        }
        assert_eq!(line, format!("OK {}\n", h.src_port).into_bytes());
        (s, h.src_port)
    }
}

#[test]
fn config_space_holds_cid() {
    let mut g = Guest::new();
    let mut b = [0u8; 8];
    g.t.read(0x100, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut id = [0u8; 4];
    g.t.read(0x8, &mut id);
    assert_eq!(u32::from_le_bytes(id), DEVICE_TYPE);
}

#[test]
fn rejects_reserved_cid_and_existing_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    assert!(matches!(
        Vsock::new(&VsockConfig {
            guest_cid: 2,
            uds_path: path.clone()
        }),
        Err(VsockError::InvalidCid(2))
    ));
    let _first = Vsock::new(&VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    })
    .unwrap();
    assert!(matches!(
        Vsock::new(&VsockConfig {
            guest_cid: 3,
            uds_path: path
        }),
        Err(VsockError::Bind { .. })
    ));
}

#[test]
fn socket_file_removed_on_drop() {
    let g = Guest::new();
    let path = g.uds.clone();
    assert!(path.exists());
    drop(g.t);
    assert!(!path.exists());
}

#[test]
fn host_initiated_connection_carries_data() {
    let mut g = Guest::new();
    let (mut s, host_port) = g.host_connect(52, 52);
    assert!(host_port >= 1 << 30);

    s.write_all(b"ping").unwrap();
    g.pump();
    let (h, data) = g.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, host_port, 52));
    assert_eq!(data, b"ping");
    assert_eq!(h.buf_alloc, CONN_BUF_SIZE);

    let mut w = hdr(op::RW, 52, host_port);
    w.fwd_cnt = 4;
    g.send(w, b"pong");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(g.vsock().connection_count(), 1);
}

#[test]
fn bytes_after_connect_line_reach_guest() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 7\nearly").unwrap();
    g.pump();
    g.pump();
    let (h, _) = g.recv_one();
    assert_eq!(h.op, op::REQUEST);
    let mut r = hdr(op::RESPONSE, 7, h.src_port);
    r.buf_alloc = GUEST_BUF_ALLOC;
    g.send(r, &[]);
    g.pump();
    let (d, data) = g.recv_one();
    assert_eq!((d.op, data.as_slice()), (op::RW, &b"early"[..]));
}

#[test]
fn malformed_connect_line_closes_stream() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"HELLO 1\n").unwrap();
    g.pump();
    g.pump();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert!(g.recv().is_empty());
}

#[test]
fn guest_refusal_closes_host_stream() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 9\n").unwrap();
    g.pump();
    g.pump();
    let (h, _) = g.recv_one();
    g.send(hdr(op::RST, 9, h.src_port), &[]);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert_eq!(g.vsock().connection_count(), 0);
}

#[test]
fn guest_initiated_connection_is_forwarded() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
    g.send(hdr(op::REQUEST, 1234, 5000), &[]);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 5000, 1234));
    let (mut s, _) = listener.accept().unwrap();

    g.send(hdr(op::RW, 1234, 5000), b"from guest");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from guest");

    s.write_all(b"from host").unwrap();
    g.pump();
    let (h, data) = g.recv_one();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"from host"[..]));
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut g = Guest::new();
    g.send(hdr(op::REQUEST, 1234, 6000), &[]);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 6000, 1234));
    assert_eq!(g.vsock().connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_are_reset() {
    let mut g = Guest::new();
    g.send(hdr(op::RW, 1, 2), b"x");
    assert_eq!(g.recv_one().0.op, op::RST);
    // An RST for an unknown connection gets no answer.
    g.send(hdr(op::RST, 1, 2), &[]);
    assert!(g.recv().is_empty());
}

#[test]
fn packets_from_wrong_cid_are_dropped() {
    let mut g = Guest::new();
    let mut h = hdr(op::REQUEST, 1, 2);
    h.src_cid = CID + 1;
    g.send(h, &[]);
    assert!(g.recv().is_empty());
}

#[test]
fn credit_request_gets_update() {
    let mut g = Guest::new();
    let (_s, port) = g.host_connect(80, 80);
    g.send(hdr(op::CREDIT_REQUEST, 80, port), &[]);
    let (h, _) = g.recv_one();
    assert_eq!(
        (h.op, h.buf_alloc, h.fwd_cnt),
        (op::CREDIT_UPDATE, CONN_BUF_SIZE, 0)
    );
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut g = Guest::new();
    let (mut s, port) = g.host_connect(81, 81);
    // The guest shrinks its buffer to 6000 bytes.
    let mut u = hdr(op::CREDIT_UPDATE, 81, port);
    u.buf_alloc = 6000;
    g.send(u, &[]);
    s.write_all(&[7u8; 20000]).unwrap();
    g.pump();
    let got: usize = g
        .recv()
        .iter()
        .map(|(h, d)| {
            assert_eq!(h.op, op::RW);
            d.len()
        })
        .sum();
    assert_eq!(got, 6000);
    g.pump();
    assert!(g.recv().is_empty(), "nothing beyond the credit");

    // The guest app reads 6000 bytes and says so.
    let mut u = hdr(op::CREDIT_UPDATE, 81, port);
    u.buf_alloc = 6000;
    u.fwd_cnt = 6000;
    g.fwd_cnt.remove(&81);
    g.send(u, &[]);
    let got: usize = g.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 6000);
}

#[test]
fn guest_to_host_sends_credit_updates() {
    let mut g = Guest::new();
    let (mut s, port) = g.host_connect(82, 82);
    let chunk = vec![1u8; 4096];
    let mut sent = 0u32;
    while sent < CREDIT_UPDATE_THRESHOLD {
        g.send(hdr(op::RW, 82, port), &chunk);
        sent += chunk.len() as u32;
    }
    let updates: Vec<_> = g
        .recv()
        .into_iter()
        .filter(|(h, _)| h.op == op::CREDIT_UPDATE)
        .collect();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].0.fwd_cnt, sent);
    let mut buf = vec![0u8; sent as usize];
    s.read_exact(&mut buf).unwrap();
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut g = Guest::new();
    let (s, port) = g.host_connect(83, 83);
    // Fill the host socket so data stays buffered in the device.
    let chunk = vec![0u8; 60000];
    let mut total = 0usize;
    let mut reset = false;
    for _ in 0..200 {
        g.send(hdr(op::RW, 83, port), &chunk);
        total += chunk.len();
        if g.recv().iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "no reset after {total} bytes without host reads");
    drop(s);
}

#[test]
fn shutdown_handshake() {
    let mut g = Guest::new();
    let (mut s, port) = g.host_connect(84, 84);
    // Host half-closes: the guest learns the host will send no more.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    g.pump();
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    // The host can still receive.
    g.send(hdr(op::RW, 84, port), b"late reply");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"late reply");
    // The guest closes: the host sees EOF and the guest gets its RST.
    let mut sd = hdr(op::SHUTDOWN, 84, port);
    sd.flags = SHUTDOWN_BOTH;
    g.send(sd, &[]);
    assert_eq!(g.recv_one().0.op, op::RST);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert_eq!(g.vsock().connection_count(), 0);
}

#[test]
fn host_close_delivers_pending_data_then_shutdown() {
    let mut g = Guest::new();
    let (mut s, port) = g.host_connect(85, 85);
    s.write_all(b"last words").unwrap();
    drop(s);
    g.pump();
    let pkts = g.recv();
    let ops: Vec<u16> = pkts.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, vec![op::RW, op::SHUTDOWN]);
    assert_eq!(pkts[0].1, b"last words");
    assert_eq!(pkts[1].0.flags, SHUTDOWN_BOTH);
    g.send(hdr(op::RST, 85, port), &[]);
    assert_eq!(g.vsock().connection_count(), 0);
}

#[test]
fn rx_waits_for_buffers_without_spinning() {
    let mut g = Guest::new();
    let (mut s, _) = g.host_connect(86, 86);
    s.set_nonblocking(true).unwrap();
    // Fill every posted rx buffer without reposting any.
    let chunk = [3u8; 4096];
    let mut used = 0;
    for _ in 0..1000 {
        let _ = s.write(&chunk);
        g.pump();
        while g.rxq.next_used(&g.mem).is_some() {
            used += 1;
        }
        if used == 64 {
            break;
        }
    }
    assert_eq!(used, 64);
    // More data with no rx buffers: the stream is no longer polled, so the
    // device's epoll fd must not stay readable.
    let _ = s.write(b"more");
    g.pump();
    let probe = Epoll::new().unwrap();
    let fd = g.vsock().backend_fd();
    probe
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let n = probe.wait(0, &mut [EpollEvent::default(); 1]).unwrap();
    assert_eq!(n, 0, "backend fd readable while nothing can progress");
}

#[test]
fn transport_reset_event() {
    let mut g = Guest::new();
    let (mut s, _) = g.host_connect(87, 87);
    g.evq.add_chain(&g.mem, &[(EV_BUF, 4, true)]);
    g.t.handle_queue_event(EVQ);
    g.mem.write_obj(0xffff_ffffu32, EV_BUF).unwrap();
    g.t.send_vsock_transport_reset().unwrap();
    assert_eq!(g.evq.next_used(&g.mem).map(|u| u.1), Some(4));
    assert_eq!(
        g.mem.read_obj::<u32>(EV_BUF).unwrap(),
        EVENT_TRANSPORT_RESET
    );
    assert_eq!(g.vsock().connection_count(), 0);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert!(!g.vsock().save().reset_pending);
}

#[test]
fn transport_reset_waits_for_event_buffer() {
    let mut g = Guest::new();
    g.t.send_vsock_transport_reset().unwrap();
    assert!(g.vsock().save().reset_pending);
    g.evq.add_chain(&g.mem, &[(EV_BUF, 4, true)]);
    g.t.handle_queue_event(EVQ);
    assert_eq!(g.evq.next_used(&g.mem).map(|u| u.1), Some(4));
    assert!(!g.vsock().save().reset_pending);
}

#[test]
fn host_connections_wait_until_the_guest_handled_the_reset() {
    let mut g = Guest::new();
    g.evq.add_chain(&g.mem, &[(EV_BUF, 4, true)]);
    g.t.handle_queue_event(EVQ);
    g.t.send_vsock_transport_reset().unwrap();
    assert_eq!(g.evq.next_used(&g.mem).map(|u| u.1), Some(4));
    let mut s = UnixStream::connect(&g.uds).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    g.pump();
    g.pump();
    assert!(
        g.recv().is_empty(),
        "connection request sent before the guest handled the reset"
    );
    // The guest handled the event and posts its buffer again.
    g.evq.add_chain(&g.mem, &[(EV_BUF, 4, true)]);
    g.t.handle_queue_event(EVQ);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.dst_port), (op::REQUEST, 1024));
}

#[test]
fn state_round_trip() {
    let g = Guest::new();
    let saved = g.t.save();
    let json = serde_json::to_string(&saved).unwrap();
    let parsed: crate::MmioTransportState = serde_json::from_str(&json).unwrap();
    let VirtioDeviceState::Vsock(vs) = &parsed.device else {
        panic!("wrong device state")
    };
    assert_eq!(vs.guest_cid, CID);
    // The old device still owns the socket path; restore on a new one.
    let config = VsockConfig {
        guest_cid: CID,
        uds_path: g.uds.with_file_name("restored.sock"),
    };
    let dev = VirtioDevice::Vsock(Vsock::restore(&config, vs).unwrap());
    let restored = MmioTransport::restore(dev, g.mem.clone(), &parsed).unwrap();
    assert_eq!(restored.save(), saved);
    let other = VsockConfig {
        guest_cid: CID + 1,
        uds_path: g.uds.with_file_name("other.sock"),
    };
    assert!(matches!(
        Vsock::restore(&other, vs),
        Err(VsockError::CidMismatch { .. })
    ));
}

/// One stream of the bulk test, from the test's point of view.
struct Stream {
    host: UnixStream,
    guest_port: u32,
    host_port: u32,
    to_guest_sent: usize,
    to_guest_got: Vec<u8>,
    to_host_sent: usize,
    to_host_got: Vec<u8>,
    /// Device's receive credit as last advertised to the guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    guest_tx_cnt: Wrapping<u32>,
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

#[test]
fn bulk_transfer_many_streams() {
    const STREAMS: usize = 8;
    const SIZE: usize = 1 << 20;
    let mut g = Guest::new();
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let port = 1000 + i as u32;
        let (s, host_port) = g.host_connect(port, port);
        s.set_nonblocking(true).unwrap();
        streams.push(Stream {
            host: s,
            guest_port: port,
            host_port,
            to_guest_sent: 0,
            to_guest_got: Vec::new(),
            to_host_sent: 0,
            to_host_got: Vec::new(),
            peer_buf_alloc: CONN_BUF_SIZE,
            peer_fwd_cnt: Wrapping(0),
            guest_tx_cnt: Wrapping(0),
        });
    }
    let data: Vec<Vec<u8>> = (0..STREAMS).map(|i| pattern(i, SIZE)).collect();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 20000, "transfer stalled");
        let mut progress = false;
        for (i, st) in streams.iter_mut().enumerate() {
            // Host writes what its socket takes.
            if st.to_guest_sent < SIZE {
                let end = (st.to_guest_sent + 32768).min(SIZE);
                match st.host.write(&data[i][st.to_guest_sent..end]) {
                    Ok(n) => {
                        st.to_guest_sent += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("host write: {e}"),
                }
            }
            // Host reads what arrived.
            let mut buf = [0u8; 65536];
            loop {
                match st.host.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        st.to_host_got.extend_from_slice(&buf[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("host read: {e}"),
                }
            }
        }
        g.pump();
        // Guest consumes rx packets and returns credit.
        for (h, payload) in g.recv() {
            let st = streams
                .iter_mut()
                .find(|s| s.guest_port == h.dst_port)
                .unwrap();
            st.peer_buf_alloc = h.buf_alloc;
            st.peer_fwd_cnt = Wrapping(h.fwd_cnt);
            match h.op {
                op::RW => {
                    st.to_guest_got.extend_from_slice(&payload);
                    *g.fwd_cnt.get_mut(&st.guest_port).unwrap() += Wrapping(payload.len() as u32);
                    progress = true;
                }
                op::CREDIT_UPDATE => progress = true,
                other => panic!("unexpected op {other}"),
            }
        }
        // Guest reports consumption and sends within its credit.
        for (i, st) in streams.iter_mut().enumerate() {
            let port = st.guest_port;
            if g.fwd_cnt[&port].0 % (64 << 10) < 4096 && !st.to_guest_got.is_empty() {
                g.send(hdr(op::CREDIT_UPDATE, port, st.host_port), &[]);
            }
            let credit = st.peer_buf_alloc - (st.guest_tx_cnt - st.peer_fwd_cnt).0;
            let n = (credit as usize)
                .min(SIZE - st.to_host_sent)
                .min(MAX_PKT_PAYLOAD);
            if n > 0 {
                let chunk = data[i][st.to_host_sent..st.to_host_sent + n].to_vec();
                g.send(hdr(op::RW, port, st.host_port), &chunk);
                st.to_host_sent += n;
                st.guest_tx_cnt += Wrapping(n as u32);
                progress = true;
            }
        }
        let done = streams
            .iter()
            .all(|s| s.to_guest_got.len() == SIZE && s.to_host_got.len() == SIZE);
        if done {
            break;
        }
        if !progress {
            // Let the device flush buffered guest data on EPOLLOUT.
            g.pump();
        }
    }
    for (i, st) in streams.iter().enumerate() {
        assert!(
            st.to_guest_got == data[i],
            "stream {i} host->guest corrupted"
        );
        assert!(
            st.to_host_got == data[i],
            "stream {i} guest->host corrupted"
        );
    }
}

#[test]
fn shutdown_with_undrained_data_times_out_to_reset() {
    let mut g = Guest::new();
    let (s, port) = g.host_connect(88, 88);
    // The host never reads: send within credit until the credit runs out,
    // which leaves data buffered in the device once the socket is full.
    let chunk = vec![5u8; 32 << 10];
    let mut sent = 0u32;
    let mut acked = 0u32;
    for _ in 0..1000 {
        for (h, _) in g.recv() {
            assert_eq!(h.op, op::CREDIT_UPDATE);
            acked = h.fwd_cnt;
        }
        let credit = CONN_BUF_SIZE - (sent - acked);
        if credit < chunk.len() as u32 {
            break;
        }
        g.send(hdr(op::RW, 88, port), &chunk);
        sent += chunk.len() as u32;
    }
    assert!(sent > acked, "data left undelivered");
    let mut sd = hdr(op::SHUTDOWN, 88, port);
    sd.flags = SHUTDOWN_BOTH;
    g.send(sd, &[]);
    assert!(
        g.recv().iter().all(|(h, _)| h.op != op::RST),
        "waits for the host to drain"
    );
    std::thread::sleep(std::time::Duration::from_millis(150));
    g.pump();
    let pkts = g.recv();
    assert!(
        pkts.iter().any(|(h, _)| h.op == op::RST),
        "reset after the drain timeout"
    );
    assert_eq!(g.vsock().connection_count(), 0);
    drop(s);
}
