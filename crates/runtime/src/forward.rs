//! Port forwarding from host TCP ports into a VM (`ferry boot -p`).
//!
//! The listeners live in the VM's VMM process, bound before the VM starts, so
//! forwards last exactly as long as the VM and do not depend on the CLI that
//! booted it. Each accepted connection opens its own connection to the guest
//! agent (a [`ferry_protocol::Message::Forward`] request over vsock) and the
//! agent connects to `127.0.0.1:GUEST_PORT` inside the guest; bytes are then
//! spliced both ways. No guest network device is needed.
//!
//! Forwards are part of the VM's record ([`crate::vm::VmRecord::ports`]), so
//! they are configuration: a restored or forked VM is given its list and
//! binds it again with [`bind_all`] and [`serve`].

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{splice, ClientError, Stream};
use serde::{Deserialize, Serialize};

use crate::error::Coded;
use crate::vm::{Registry, VmStatus};

/// How long a connection accepted while the guest is still booting waits for
/// the agent.
const AGENT_WAIT: Duration = Duration::from_secs(60);

/// One forwarded port: connections to `host_ip:host_port` on the host reach
/// `127.0.0.1:guest_port` in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    /// Host address to listen on (127.0.0.1 unless given).
    pub host_ip: IpAddr,
    /// Host TCP port.
    pub host_port: u16,
    /// Guest TCP port (on the guest's loopback).
    pub guest_port: u16,
}

impl PortForward {
    /// The host socket address.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }

    /// Whether two forwards would compete for the same host socket.
    pub fn overlaps(&self, other: &PortForward) -> bool {
        self.host_port == other.host_port
            && (self.host_ip == other.host_ip
                || self.host_ip.is_unspecified()
                || other.host_ip.is_unspecified())
    }
}

impl fmt::Display for PortForward {
    /// The `-p` syntax: `127.0.0.1:8080:80`, `[::1]:8080:80`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}:{}", self.host_port, self.guest_port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}:{}", self.host_port, self.guest_port),
        }
    }
}

fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err(format!("{what} must be 1-65535, got 0")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{what} {s:?} is not a port number (1-65535)")),
    }
}

impl FromStr for PortForward {
    type Err = ForwardError;

    /// Parses `[HOST_IP:]HOST_PORT:GUEST_PORT`; an IPv6 host address goes in
    /// brackets (`[::1]:8080:80`).
    fn from_str(spec: &str) -> Result<Self, ForwardError> {
        let invalid = |reason: String| ForwardError::Invalid {
            spec: spec.to_string(),
            reason,
        };
        let (ip_part, ports) = if let Some(rest) = spec.strip_prefix('[') {
            let (ip, rest) = rest
                .split_once("]:")
                .ok_or_else(|| invalid("expected [IPV6]:HOST_PORT:GUEST_PORT".into()))?;
            (Some(ip), rest)
        } else {
            match spec.matches(':').count() {
                1 => (None, spec),
                2 => {
                    let (ip, rest) = spec.split_once(':').expect("two colons");
                    (Some(ip), rest)
                }
                _ => return Err(invalid("expected [HOST_IP:]HOST_PORT:GUEST_PORT".into())),
            }
        };
        let host_ip = match ip_part {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(ip) => ip
                .parse::<IpAddr>()
                .map_err(|_| invalid(format!("{ip:?} is not an IP address")))?,
        };
        let (host, guest) = ports
            .split_once(':')
            .ok_or_else(|| invalid("expected HOST_PORT:GUEST_PORT".into()))?;
        Ok(PortForward {
            host_ip,
            host_port: parse_port(host, "host port").map_err(invalid)?,
            guest_port: parse_port(guest, "guest port").map_err(invalid)?,
        })
    }
}

/// Why forwards could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The `-p` value does not parse.
    #[error("invalid port forward {spec:?}: {reason}")]
    Invalid {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two forwards of one VM want the same host socket.
    #[error("host port {0} is forwarded twice")]
    Duplicate(SocketAddr),
    /// A running ferry VM forwards this host port.
    #[error("host port {addr} is already in use by ferry VM {vm}")]
    InUseByVm {
        /// The host address.
        addr: SocketAddr,
        /// The VM holding it.
        vm: String,
    },
    /// Some other process listens on the host port.
    #[error("host port {addr} is already in use by another process (not a ferry VM)")]
    InUse {
        /// The host address.
        addr: SocketAddr,
    },
    /// Listening failed for another reason.
    #[error("cannot listen on host port {addr}: {source}")]
    Bind {
        /// The host address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl Coded for ForwardError {
    fn code(&self) -> &'static str {
        match self {
            ForwardError::Invalid { .. } | ForwardError::Duplicate(_) => {
                "BOOT_PORT_FORWARD_INVALID"
            }
            ForwardError::InUseByVm { .. } | ForwardError::InUse { .. } => {
                "BOOT_PORT_FORWARD_IN_USE"
            }
            ForwardError::Bind { .. } => "BOOT_PORT_FORWARD_FAILED",
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            ForwardError::Invalid { .. } | ForwardError::Duplicate(_) => {
                "use -p [HOST_IP:]HOST_PORT:GUEST_PORT, e.g. -p 8080:80 or -p 127.0.0.1:8080:80; \
                 each host port once"
                    .into()
            }
            ForwardError::InUseByVm { addr, vm } => format!(
                "pick another host port (-p OTHER:GUEST_PORT), or free it with `ferry stop {vm}`; \
                 `ferry ls --json` lists each VM's ports (port {})",
                addr.port()
            ),
            ForwardError::InUse { addr } => format!(
                "pick another host port (-p OTHER:GUEST_PORT); `ss -ltnp 'sport = :{}'` shows \
                 which process holds it",
                addr.port()
            ),
            ForwardError::Bind { addr, source } => {
                if source.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
                    "ports below 1024 need root; pick a higher host port".into()
                } else {
                    "check that the host address belongs to this machine".into()
                }
            }
        })
    }
}

/// The ferry VM (other than `me`) that forwards a host port overlapping
/// `forward`: running, or still booting (created, VMM not yet up).
pub fn holder(forward: &PortForward, registry: &Registry, me: Option<&str>) -> Option<String> {
    registry
        .list()
        .into_iter()
        .filter(|vm| Some(vm.record.name.as_str()) != me)
        .filter(|vm| match &vm.status {
            VmStatus::Running { .. } => true,
            VmStatus::Stopped { reason } => reason == "created",
        })
        .find(|vm| vm.record.ports.iter().any(|p| p.overlaps(forward)))
        .map(|vm| vm.record.name)
}

/// Listens on every forward's host address, in order. Fails on the first
/// that cannot be bound, naming the ferry VM that holds it when there is
/// one (looked up in `registry`, ignoring the VM named `me`).
pub fn bind_all(
    forwards: &[PortForward],
    registry: &Registry,
    me: Option<&str>,
) -> Result<Vec<(PortForward, TcpListener)>, ForwardError> {
    for (i, f) in forwards.iter().enumerate() {
        if forwards[..i].iter().any(|g| g.overlaps(f)) {
            return Err(ForwardError::Duplicate(f.host_addr()));
        }
    }
    forwards
        .iter()
        .map(|f| {
            let addr = f.host_addr();
            match TcpListener::bind(addr) {
                Ok(l) => Ok((*f, l)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    Err(match holder(f, registry, me) {
                        Some(vm) => ForwardError::InUseByVm { addr, vm },
                        None => ForwardError::InUse { addr },
                    })
                }
                Err(source) => Err(ForwardError::Bind { addr, source }),
            }
        })
        .collect()
}

/// Checks that every forward's host port can be listened on now (binding
/// and releasing it), so a taken port fails a boot before any VM starts.
/// The VMM process binds for real and reports the same errors if it lost a
/// race for the port.
pub fn check_available(forwards: &[PortForward], registry: &Registry) -> Result<(), ForwardError> {
    bind_all(forwards, registry, None).map(drop)
}

/// Opens a stream to a guest port (normally [`ferry_protocol::Client::forward`]).
pub type GuestConnector = dyn Fn(u16) -> Result<Box<dyn Stream>, ClientError> + Send + Sync;

/// Connections one forwarded port carries at a time; more are closed as
/// they arrive, so a flood of connections cannot exhaust the VMM's threads.
pub const MAX_CONNECTIONS_PER_PORT: usize = 256;

/// A forward being served. Dropping it leaves it served for the life of the
/// process; [`Served::close`] stops it and releases its host port.
pub struct Served {
    forward: PortForward,
    bound: Option<SocketAddr>,
    closed: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    /// The forward.
    pub fn forward(&self) -> PortForward {
        self.forward
    }

    /// Stops accepting and closes the listener (connections already spliced
    /// run to their end).
    pub fn close(mut self) {
        self.closed.store(true, Ordering::SeqCst);
        // accept(2) has no timeout: one connection of our own wakes it.
        let mut wake = self.bound.unwrap_or_else(|| self.forward.host_addr());
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(2));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves every listener on its own thread: each accepted connection gets a
/// thread that connects to the guest and splices.
pub fn serve(
    listeners: Vec<(PortForward, TcpListener)>,
    connect: Arc<GuestConnector>,
) -> Vec<Served> {
    let mut served = Vec::new();
    for (forward, listener) in listeners {
        let connect = Arc::clone(&connect);
        let bound = listener.local_addr().ok();
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        let spawned = std::thread::Builder::new()
            .name(format!("forward-{}", forward.host_port))
            .spawn(move || accept_loop(forward, listener, connect, &flag));
        match spawned {
            Ok(thread) => served.push(Served {
                forward,
                bound,
                closed,
                thread: Some(thread),
            }),
            Err(e) => tracing::error!("port forward {forward}: cannot start its thread: {e}"),
        }
    }
    served
}

/// Decrements a connection count when a spliced connection ends.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    forward: PortForward,
    listener: TcpListener,
    connect: Arc<GuestConnector>,
    closed: &AtomicBool,
) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if closed.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((tcp, peer)) => {
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS_PER_PORT {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(
                        "port forward {forward}: connection from {peer} refused: {MAX_CONNECTIONS_PER_PORT} already open"
                    );
                    continue;
                }
                let guard = Active(Arc::clone(&active));
                let connect = Arc::clone(&connect);
                let spawned = std::thread::Builder::new()
                    .name("forward-conn".into())
                    .spawn(move || {
                        let _guard = guard;
                        forward_one(forward, tcp, &*connect)
                    });
                if let Err(e) = spawned {
                    tracing::warn!("port forward {forward}: connection from {peer} dropped: {e}");
                }
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("port forward {forward}: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connects one host connection to the guest port and splices until both
/// sides are done. While the guest is still booting, waits for its agent.
fn forward_one(forward: PortForward, tcp: TcpStream, connect: &GuestConnector) {
    let _ = tcp.set_nodelay(true);
    let start = Instant::now();
    let guest = loop {
        match connect(forward.guest_port) {
            Ok(s) => break s,
            // No stable code: the agent is not reachable (yet).
            Err(e) if e.code().is_none() && start.elapsed() < AGENT_WAIT => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                tracing::info!("port forward {forward}: {e}");
                // Closing the accepted connection tells the client.
                return;
            }
        }
    };
    if let Err(e) = splice(Box::new(tcp), guest) {
        tracing::debug!("port forward {forward}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    fn pf(ip: &str, host: u16, guest: u16) -> PortForward {
        PortForward {
            host_ip: ip.parse().unwrap(),
            host_port: host,
            guest_port: guest,
        }
    }

    #[test]
    fn specs_parse() {
        assert_eq!(
            "3000:3000".parse::<PortForward>().unwrap(),
            pf("127.0.0.1", 3000, 3000)
        );
        assert_eq!(
            "127.0.0.1:8080:80".parse::<PortForward>().unwrap(),
            pf("127.0.0.1", 8080, 80)
        );
        assert_eq!(
            "0.0.0.0:8080:80".parse::<PortForward>().unwrap(),
            pf("0.0.0.0", 8080, 80)
        );
        assert_eq!(
            "[::1]:8443:443".parse::<PortForward>().unwrap(),
            pf("::1", 8443, 443)
        );
        for f in [pf("127.0.0.1", 1, 65535), pf("::1", 8443, 443)] {
            assert_eq!(f.to_string().parse::<PortForward>().unwrap(), f);
        }
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        for (spec, why) in [
            ("8080", "expected"),
            ("", "expected"),
            ("a:b", "not a port"),
            ("0:80", "1-65535"),
            ("8080:0", "1-65535"),
            ("70000:80", "not a port"),
            ("localhost:8080:80", "not an IP"),
            ("1.2.3:8080:80", "not an IP"),
            ("::1:8080:80", "expected"),
            ("[::1:8080:80", "expected"),
            ("1:2:3:4", "expected"),
            ("8080:80:", "not an IP"),
        ] {
            match spec.parse::<PortForward>() {
                Err(e @ ForwardError::Invalid { .. }) => {
                    assert!(e.to_string().contains(why), "{spec}: {e}");
                    assert_eq!(e.code(), "BOOT_PORT_FORWARD_INVALID");
                    assert!(e.hint().unwrap().contains("-p"));
                }
                other => panic!("{spec}: {other:?}"),
            }
        }
    }

    #[test]
    fn overlap_rules() {
        assert!(pf("127.0.0.1", 80, 1).overlaps(&pf("127.0.0.1", 80, 2)));
        assert!(pf("0.0.0.0", 80, 1).overlaps(&pf("127.0.0.1", 80, 2)));
        assert!(!pf("127.0.0.1", 80, 1).overlaps(&pf("127.0.0.2", 80, 1)));
        assert!(!pf("127.0.0.1", 80, 1).overlaps(&pf("127.0.0.1", 81, 1)));
    }

    fn record(name: &str, ports: Vec<PortForward>) -> crate::vm::VmRecord {
        crate::vm::VmRecord {
            name: name.into(),
            id: "id".into(),
            created_at: 0,
            cpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            image: "base".into(),
            command: None,
            token: "t".into(),
            ephemeral: false,
            ports,
            net: None,
            exec_defaults: None,
            mounts: Vec::new(),
        }
    }

    fn registry_with_holder(port: u16) -> (tempfile::TempDir, Registry) {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let rec = record("web", vec![pf("127.0.0.1", port, 80)]);
        let (dir, owner) = reg.create(&rec).unwrap();
        owner.release();
        // Running: its "VMM" is this test process.
        crate::vm::record::write_json(
            &dir.pid(),
            &crate::vm::record::PidRecord::current().unwrap(),
        )
        .unwrap();
        let other = record("stopped", vec![pf("127.0.0.1", port, 80)]);
        let (dir, owner) = reg.create(&other).unwrap();
        owner.release();
        crate::vm::record::write_json(
            &dir.exit(),
            &crate::vm::record::ExitRecord {
                reason: "stopped".into(),
                detail: None,
                code: None,
                hint: None,
                at: 0,
            },
        )
        .unwrap();
        (tmp, reg)
    }

    #[test]
    fn port_in_use_names_the_ferry_vm_holding_it() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let (_tmp, reg) = registry_with_holder(port);
        let err = check_available(&[pf("127.0.0.1", port, 3000)], &reg).unwrap_err();
        assert_eq!(err.code(), "BOOT_PORT_FORWARD_IN_USE");
        assert!(
            err.to_string().contains("ferry VM web"),
            "the stopped VM must not be named: {err}"
        );
        assert!(err.hint().unwrap().contains("ferry stop web"));
        // The VM itself (re-binding after a restore) does not blame itself.
        let err = bind_all(&[pf("127.0.0.1", port, 3000)], &reg, Some("web")).unwrap_err();
        assert!(matches!(err, ForwardError::InUse { .. }), "{err}");
    }

    #[test]
    fn port_in_use_by_another_process() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let err = check_available(&[pf("127.0.0.1", port, 80)], &reg).unwrap_err();
        assert_eq!(err.code(), "BOOT_PORT_FORWARD_IN_USE");
        assert!(err.to_string().contains("another process"), "{err}");
        assert!(err.hint().unwrap().contains(&format!("sport = :{port}")));
    }

    #[test]
    fn free_ports_bind_and_duplicates_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let l = bind_all(&[pf("127.0.0.1", port, 80)], &reg, None).unwrap();
        assert_eq!(l[0].1.local_addr().unwrap().port(), port);
        drop(l);
        let err = check_available(&[pf("127.0.0.1", port, 80), pf("0.0.0.0", port, 81)], &reg)
            .unwrap_err();
        assert!(matches!(err, ForwardError::Duplicate(_)), "{err}");
    }

    /// The VMM side end to end, with a fake guest: each connector call gets
    /// one end of a socketpair whose other end upper-cases what it reads.
    #[test]
    fn serve_splices_connections_to_the_guest() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let l = bind_all(&[pf("127.0.0.1", 0, 9)], &reg, None);
        // Port 0 is refused by the parser but not by bind_all; use the
        // kernel's pick to avoid clashes.
        let l = l.unwrap();
        let port = l[0].1.local_addr().unwrap().port();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let asked2 = Arc::clone(&asked);
        let connect: Arc<GuestConnector> = Arc::new(move |guest_port| {
            asked2.lock().unwrap().push(guest_port);
            let (host_side, mut guest_side) = UnixStream::pair().unwrap();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                guest_side.read_to_end(&mut req).unwrap();
                guest_side.write_all(&req.to_ascii_uppercase()).unwrap();
            });
            Ok(Box::new(host_side) as Box<dyn Stream>)
        });
        serve(l, connect);
        let clients: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                    let msg = format!("hello {i} ").repeat(5000);
                    c.write_all(msg.as_bytes()).unwrap();
                    c.shutdown(Shutdown::Write).unwrap();
                    let mut back = String::new();
                    c.read_to_string(&mut back).unwrap();
                    assert_eq!(back, msg.to_uppercase());
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        assert_eq!(*asked.lock().unwrap(), vec![9; 8]);
    }

    #[test]
    fn connections_beyond_the_cap_are_closed_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let l = bind_all(&[pf("127.0.0.1", 0, 9)], &reg, None).unwrap();
        let addr = l[0].1.local_addr().unwrap();
        // A guest that never answers: every forwarded connection stays open.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(std::sync::Mutex::new(released));
        let connect: Arc<GuestConnector> = Arc::new(move |_| {
            let _ = released.lock().unwrap().recv();
            Err(ClientError::Agent {
                code: ferry_protocol::ErrorCode::ForwardRefused,
                message: "released".into(),
            })
        });
        let _served = serve(l, connect);
        let held: Vec<TcpStream> = (0..MAX_CONNECTIONS_PER_PORT)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // Let the accept loop take them all before the one too many.
        std::thread::sleep(Duration::from_millis(500));
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1];
        match extra.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "closed, not served"),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "the connection over the cap must be closed at once: {e}"
            ),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        for _ in 0..MAX_CONNECTIONS_PER_PORT {
            let _ = release.send(());
        }
        drop(held);
    }

    #[test]
    fn a_closed_forward_releases_its_port() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let l = bind_all(&[pf("127.0.0.1", 0, 9)], &reg, None).unwrap();
        let addr = l[0].1.local_addr().unwrap();
        let connect: Arc<GuestConnector> = Arc::new(|_| {
            Err(ClientError::Agent {
                code: ferry_protocol::ErrorCode::ForwardRefused,
                message: "refused".into(),
            })
        });
        let mut served = serve(l, connect);
        assert!(
            TcpListener::bind(addr).is_err(),
            "served: the port is taken"
        );
        served.pop().unwrap().close();
        TcpListener::bind(addr).expect("closed: the port is free again");
    }

    #[test]
    fn a_refused_guest_port_closes_the_host_connection() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::at(tmp.path().join("vms"));
        let l = bind_all(&[pf("127.0.0.1", 0, 9)], &reg, None).unwrap();
        let port = l[0].1.local_addr().unwrap().port();
        let connect: Arc<GuestConnector> = Arc::new(|_| {
            Err(ClientError::Agent {
                code: ferry_protocol::ErrorCode::ForwardRefused,
                message: "127.0.0.1:9: connection refused".into(),
            })
        });
        serve(l, connect);
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        // End of file (or a reset), promptly: not a hang.
        match c.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "the host connection was left hanging"
            ),
        }
    }
}
