//! Tests driving the network device through its MMIO transport, with the
//! test playing the guest driver and the backend (a socketpair standing in
//! for passt).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mmio::{reg, MmioTransport};
use crate::virtio::testing::{self, DriverQueue};
use crate::virtio::{VirtioDevice, VirtioDeviceState};

const MAC: MacAddr = MacAddr([0x02, 0x46, 0x52, 0x59, 0x00, 0x01]);
const RX_BUFS: GuestAddress = GuestAddress(0x10_0000);
const TX_BUFS: GuestAddress = GuestAddress(0x40_0000);

struct Guest {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    rxq: DriverQueue,
    txq: DriverQueue,
    /// Guest address of each posted rx buffer, by head index.
    rx_addr: std::collections::HashMap<u16, (GuestAddress, u32)>,
    next_rx: u64,
    next_tx: u64,
    /// The backend's end of the socketpair.
    peer: UnixStream,
}

fn features(mergeable: bool) -> u64 {
    let mut f = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS;
    if mergeable {
        f |= 1 << VIRTIO_NET_F_MRG_RXBUF;
    }
    f
}

fn net_over_socketpair() -> (Net, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    let net = Net::new(&NetConfig {
        mac: MAC,
        backend: NetBackend::Fd(ours.as_raw_fd()),
    })
    .unwrap();
    // The device holds its own duplicate.
    drop(ours);
    (net, peer)
}

impl Guest {
    fn new(mergeable: bool) -> Self {
        let (net, peer) = net_over_socketpair();
        let mem = testing::memory();
        let mut t = MmioTransport::new(VirtioDevice::Net(net), mem.clone()).unwrap();
        let mut rxq = DriverQueue::new(GuestAddress(0x1000), 256);
        let mut txq = DriverQueue::new(GuestAddress(0x4000), 256);
        testing::init_device(&mut t, features(mergeable), &mut [&mut rxq, &mut txq]);
        assert!(t.is_activated());
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Guest {
            mem,
            t,
            rxq,
            txq,
            rx_addr: Default::default(),
            next_rx: 0,
            next_tx: 0,
            peer,
        }
    }

    fn post_rx(&mut self, len: u32) {
        let addr = GuestAddress(RX_BUFS.0 + self.next_rx * 0x1_0000);
        self.next_rx += 1;
        let head = self.rxq.add_chain(&self.mem, &[(addr, len, true)]);
        self.rx_addr.insert(head, (addr, len));
        self.t.handle_queue_event(RXQ);
    }

    /// The guest sends `frame` as header + data descriptors.
    fn send(&mut self, frame: &[u8]) -> u16 {
        let base = GuestAddress(TX_BUFS.0 + (self.next_tx % 32) * 0x1_0000);
        self.next_tx += 1;
        self.mem.write_slice(&[0u8; NET_HDR_LEN], base).unwrap();
        let data = GuestAddress(base.0 + NET_HDR_LEN as u64);
        self.mem.write_slice(frame, data).unwrap();
        let head = self.txq.add_chain(
            &self.mem,
            &[
                (base, NET_HDR_LEN as u32, false),
                (data, frame.len() as u32, false),
            ],
        );
        self.t.handle_queue_event(TXQ);
        head
    }

    /// Reads one frame from the backend side.
    fn backend_recv(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.peer.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        self.peer.read_exact(&mut frame).unwrap();
        frame
    }

    fn backend_send(&mut self, frame: &[u8]) {
        let mut out = Vec::new();
        encode_frame(frame, &mut out);
        self.peer.write_all(&out).unwrap();
    }

    /// Used rx buffers as (header, payload bytes) per buffer.
    fn received(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rxq.next_used(&self.mem) {
            let (addr, _) = self.rx_addr[&head];
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, addr).unwrap();
            out.push(b);
        }
        out
    }

    fn net(&self) -> &Net {
        match self.t.device() {
            VirtioDevice::Net(n) => n,
            _ => unreachable!(),
        }
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn num_buffers(buf: &[u8]) -> u16 {
    u16::from_le_bytes([buf[10], buf[11]])
}

#[test]
fn identification_and_config_space() {
    let g = Guest::new(false);
    let mut t = g.t;
    let mut b = [0u8; 4];
    t.read(reg::DEVICE_ID, &mut b);
    assert_eq!(u32::from_le_bytes(b), DEVICE_TYPE);
    let mut mac = [0u8; 6];
    t.read(reg::CONFIG, &mut mac);
    assert_eq!(MacAddr(mac), MAC);
    let mut status = [0u8; 2];
    t.read(reg::CONFIG + 6, &mut status);
    assert_eq!(u16::from_le_bytes(status), 1, "link up");
    assert_eq!(t.acked_features(), features(false));
}

#[test]
fn tx_frames_reach_the_backend_in_stream_format() {
    let mut g = Guest::new(false);
    let a = frame(60, 1);
    let b = frame(1514, 2);
    let ha = g.send(&a);
    let hb = g.send(&b);
    assert_eq!(g.backend_recv(), a);
    assert_eq!(g.backend_recv(), b);
    assert_eq!(g.txq.next_used(&g.mem), Some((ha, 0)));
    assert_eq!(g.txq.next_used(&g.mem), Some((hb, 0)));
}

#[test]
fn rx_waits_for_buffers_then_delivers_in_order() {
    let mut g = Guest::new(false);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i * 400, i as u8)).collect();
    for f in &frames {
        g.backend_send(f);
    }
    // No buffers yet: nothing delivered, nothing lost.
    g.t.handle_backend_event();
    assert!(g.received().is_empty());
    for _ in 0..3 {
        g.post_rx(1526);
    }
    let got = g.received();
    assert_eq!(got.len(), 3);
    for (buf, f) in got.iter().zip(&frames) {
        assert_eq!(num_buffers(buf), 1);
        assert_eq!(&buf[..10], &[0u8; 10], "no offloads in the header");
        assert_eq!(&buf[NET_HDR_LEN..], &f[..]);
    }
    // A frame arriving while buffers are posted goes straight through.
    g.post_rx(1526);
    let late = frame(300, 9);
    g.backend_send(&late);
    g.t.handle_backend_event();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][NET_HDR_LEN..], &late[..]);
}

#[test]
fn mergeable_buffers_carry_large_frames() {
    let mut g = Guest::new(true);
    for _ in 0..4 {
        g.post_rx(1536);
    }
    let big = frame(4000, 7);
    g.backend_send(&big);
    g.t.handle_backend_event();
    let got = g.received();
    // 12 + 4000 bytes over 1536-byte buffers: 3 buffers.
    assert_eq!(got.len(), 3);
    assert_eq!(num_buffers(&got[0]), 3);
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), NET_HDR_LEN + 4000);
    let joined: Vec<u8> = got.concat();
    assert_eq!(&joined[NET_HDR_LEN..], &big[..]);
}

#[test]
fn mergeable_frame_waits_until_enough_buffers_are_posted() {
    let mut g = Guest::new(true);
    g.post_rx(1536);
    let big = frame(3000, 3);
    g.backend_send(&big);
    g.t.handle_backend_event();
    assert!(g.received().is_empty(), "one buffer is not enough");
    g.post_rx(1536);
    let joined = g.received().concat();
    assert_eq!(num_buffers(&joined), 2);
    assert_eq!(&joined[NET_HDR_LEN..], &big[..]);
}

#[test]
fn oversized_frame_without_merging_is_dropped_and_the_next_delivered() {
    let mut g = Guest::new(false);
    g.post_rx(1526);
    let big = frame(3000, 1);
    let small = frame(64, 2);
    g.backend_send(&big);
    g.backend_send(&small);
    g.t.handle_backend_event();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][NET_HDR_LEN..], &small[..]);
}

#[test]
fn tx_backpressure_then_resume() {
    let mut g = Guest::new(false);
    // Frames far beyond what the socket buffers: the device must stop
    // taking them instead of spinning or dropping.
    let f = frame(60_000, 5);
    let n = 200;
    for _ in 0..n {
        let base = TX_BUFS;
        g.mem.write_slice(&[0u8; NET_HDR_LEN], base).unwrap();
        let data = GuestAddress(base.0 + NET_HDR_LEN as u64);
        g.mem.write_slice(&f, data).unwrap();
        g.txq.add_chain(
            &g.mem,
            &[
                (base, NET_HDR_LEN as u32, false),
                (data, f.len() as u32, false),
            ],
        );
    }
    g.t.handle_queue_event(TXQ);
    let mut used = 0;
    while g.txq.next_used(&g.mem).is_some() {
        used += 1;
    }
    assert!(used < n, "all {n} frames taken although the socket is full");
    // The backend drains; backend events let the device continue.
    let mut peer = g.peer.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut count = 0;
        let mut len = [0u8; 4];
        let mut buf = vec![0u8; 60_000];
        while count < n {
            peer.read_exact(&mut len).unwrap();
            assert_eq!(u32::from_be_bytes(len), 60_000);
            peer.read_exact(&mut buf).unwrap();
            count += 1;
        }
        count
    });
    // Pumped until the reader has every frame, not only until every chain is
    // used: the device returns a chain once it holds the frame, and the last
    // ones may still wait in its buffer for the socket to drain.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (used < n || !reader.is_finished()) && Instant::now() < deadline {
        g.t.handle_backend_event();
        while g.txq.next_used(&g.mem).is_some() {
            used += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(used, n);
    assert_eq!(reader.join().unwrap(), n);
}

#[test]
fn backend_hangup_is_survived() {
    let mut g = Guest::new(false);
    g.post_rx(1526);
    let f = frame(80, 4);
    g.backend_send(&f);
    drop(std::mem::replace(
        &mut g.peer,
        UnixStream::pair().unwrap().0,
    ));
    g.t.handle_backend_event();
    // The frame sent before the hang-up still arrives.
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][NET_HDR_LEN..], &f[..]);
    assert!(!g.net().backend_connected());
    // Transmits are still consumed (and dropped), so the guest never stalls.
    let head = g.send(&frame(60, 1));
    assert_eq!(g.txq.next_used(&g.mem), Some((head, 0)));
}

#[test]
fn unix_socket_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let net = Net::new(&NetConfig {
        mac: MAC,
        backend: NetBackend::Unix(path.clone()),
    })
    .unwrap();
    assert!(l.accept().is_ok());
    assert!(net.backend_connected());
    let missing = Net::new(&NetConfig {
        mac: MAC,
        backend: NetBackend::Unix(dir.path().join("nothing.sock")),
    });
    assert!(matches!(missing, Err(NetError::Connect { .. })));
}

#[test]
fn bad_backends_and_macs_are_refused() {
    let file = tempfile::tempfile().unwrap();
    let r = Net::new(&NetConfig {
        mac: MAC,
        backend: NetBackend::Fd(file.as_raw_fd()),
    });
    assert!(matches!(r, Err(NetError::Fd { .. })), "a regular file");
    let r = Net::new(&NetConfig {
        mac: MAC,
        backend: NetBackend::Fd(1 << 20),
    });
    assert!(matches!(r, Err(NetError::Fd { .. })), "a closed descriptor");
    let (a, _b) = UnixStream::pair().unwrap();
    let r = Net::new(&NetConfig {
        mac: MacAddr([0x03, 0, 0, 0, 0, 1]),
        backend: NetBackend::Fd(a.as_raw_fd()),
    });
    assert!(matches!(r, Err(NetError::MulticastMac(_))));
}

#[test]
fn frame_decoder_handles_split_reads_and_rejects_garbage() {
    let mut stream = Vec::new();
    let frames: Vec<Vec<u8>> = (0..50)
        .map(|i| frame(1 + i * 997 % 9000, i as u8))
        .collect();
    for (i, f) in frames.iter().enumerate() {
        encode_frame(f, &mut stream);
        if i == 25 {
            // An empty frame in the middle is skipped.
            encode_frame(&[], &mut stream);
        }
    }
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    // Feed in awkward 7-byte pieces.
    for piece in stream.chunks(7) {
        let mut r = piece;
        d.fill(&mut r).unwrap();
        while let Some(f) = d.frame().unwrap() {
            got.push(f.to_vec());
            d.consume_frame();
        }
    }
    assert_eq!(got, frames);
    assert_eq!(d.buffered(), 0);

    let mut z = Vec::new();
    encode_frame(&[], &mut z);
    encode_frame(b"x", &mut z);
    let mut d = FrameDecoder::new();
    d.fill(&mut &z[..]).unwrap();
    assert_eq!(d.frame().unwrap(), Some(&b"x"[..]));

    let mut d = FrameDecoder::new();
    d.fill(&mut &[0u8, 2, 0, 0, 1][..]).unwrap();
    assert_eq!(d.frame(), Err(FrameTooLong(0x20000)));
}

#[test]
fn frame_decoder_compacts_across_a_full_buffer() {
    let mut stream = Vec::new();
    let frames: Vec<Vec<u8>> = (0..20).map(|i| frame(MAX_FRAME_LEN - i, i as u8)).collect();
    for f in &frames {
        encode_frame(f, &mut stream);
    }
    let mut d = FrameDecoder::new();
    let mut r = &stream[..];
    let mut got = Vec::new();
    loop {
        match d.frame().unwrap() {
            Some(f) => {
                got.push(f.to_vec());
                d.consume_frame();
            }
            None => {
                if d.fill(&mut r).unwrap() == 0 {
                    break;
                }
            }
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn mac_addresses_parse_and_print() {
    let m: MacAddr = "02:46:52:59:00:01".parse().unwrap();
    assert_eq!(m, MAC);
    assert_eq!(m.to_string(), "02:46:52:59:00:01");
    assert!(m.is_unicast() && m.is_local());
    for bad in [
        "",
        "02:46:52:59:00",
        "02:46:52:59:00:01:02",
        "2:46:52:59:00:01",
        "zz:46:52:59:00:01",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
    assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:46:52:59:00:01\"");
    assert_eq!(
        serde_json::from_str::<MacAddr>("\"02:46:52:59:00:01\"").unwrap(),
        m
    );
}

#[test]
fn state_round_trip_with_a_new_backend_and_mac() {
    let mut g = Guest::new(true);
    g.post_rx(1536);
    let saved = g.t.save();
    let json = serde_json::to_string(&saved).unwrap();
    let parsed: crate::MmioTransportState = serde_json::from_str(&json).unwrap();
    let VirtioDeviceState::Net(state) = &parsed.device else {
        panic!("wrong device state");
    };
    assert_eq!(
        *state,
        NetState {
            mac: MAC,
            status: 1,
            active_features: features(true),
        }
    );
    // A restored (or forked) VM gets a fresh backend and possibly a new MAC.
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let new_mac = MacAddr([0x02, 0, 0, 0, 0, 0x42]);
    let net = Net::restore(
        &NetConfig {
            mac: new_mac,
            backend: NetBackend::Fd(ours.as_raw_fd()),
        },
        state,
    )
    .unwrap();
    drop(ours);
    let mut t = MmioTransport::restore(VirtioDevice::Net(net), g.mem.clone(), &parsed).unwrap();
    assert!(t.is_activated());
    assert_eq!(t.acked_features(), features(true));
    let mut mac = [0u8; 6];
    t.read(reg::CONFIG, &mut mac);
    assert_eq!(MacAddr(mac), new_mac);
    // The restored device picks up where the queues were: the buffer posted
    // before the save receives the next frame.
    let f = frame(90, 6);
    let mut out = Vec::new();
    encode_frame(&f, &mut out);
    peer.write_all(&out).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        t.handle_backend_event();
        while let Some((head, len)) = g.rxq.next_used(&g.mem) {
            let (addr, _) = g.rx_addr[&head];
            let mut b = vec![0u8; len as usize];
            g.mem.read_slice(&mut b, addr).unwrap();
            got.push(b);
        }
    }
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][NET_HDR_LEN..], &f[..]);
}
