//! Guest networking: static IPv4 configuration of the VM's interface, the
//! default route, and `/etc/resolv.conf`, done with plain ioctls so no
//! userland tool (`ip`, a DHCP client) is needed in the image.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_protocol::NetworkConfig;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// How long to wait for the interface to appear.
const INTERFACE_WAIT: Duration = Duration::from_secs(10);

/// Errors of network setup.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The interface never appeared.
    #[error("network interface {0} not found")]
    NoInterface(String),
    /// An ioctl or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The prefix length is over 32.
    #[error("invalid prefix length {0}")]
    BadPrefix(u8),
}

fn step(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Io { what, source }
}

/// Applies `config`: address, netmask, link up, default route, and
/// `resolv_conf` (normally `/etc/resolv.conf`) when name servers are given.
pub fn configure(config: &NetworkConfig, resolv_conf: &Path) -> Result<(), NetError> {
    let mask = netmask(config.prefix_len).ok_or(NetError::BadPrefix(config.prefix_len))?;
    let name = &config.interface;
    let start = Instant::now();
    while !interface_exists(name) {
        if start.elapsed() > INTERFACE_WAIT {
            return Err(NetError::NoInterface(name.clone()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = inet_socket().map_err(step("socket"))?;
    set_addr(&sock, name, libc::SIOCSIFADDR, config.address)
        .map_err(step(format!("set address {} on {name}", config.address)))?;
    set_addr(&sock, name, libc::SIOCSIFNETMASK, mask)
        .map_err(step(format!("set netmask {mask} on {name}")))?;
    set_up(&sock, name).map_err(step(format!("bring {name} up")))?;
    add_default_route(&sock, name, config.gateway)
        .map_err(step(format!("default route via {}", config.gateway)))?;
    if !config.dns.is_empty() {
        write_resolv_conf(resolv_conf, &config.dns)
            .map_err(step(format!("write {}", resolv_conf.display())))?;
    }
    Ok(())
}

/// The netmask of a prefix length, or None if it is over 32.
pub fn netmask(prefix_len: u8) -> Option<Ipv4Addr> {
    match prefix_len {
        0 => Some(Ipv4Addr::UNSPECIFIED),
        1..=32 => Some(Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix_len)))),
        _ => None,
    }
}

/// The text of a `resolv.conf` naming `servers`.
pub fn resolv_conf_text(servers: &[Ipv4Addr]) -> String {
    let mut s = String::from("# written by ferry-agent\n");
    for ns in servers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s
}

/// Replaces `path` (a file or a dangling symlink, e.g. to systemd-resolved's
/// stub) atomically with a file naming `servers`.
pub fn write_resolv_conf(path: &Path, servers: &[Ipv4Addr]) -> io::Result<()> {
    let tmp = path.with_extension("ferry-tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(resolv_conf_text(servers).as_bytes())?;
        f.sync_all()?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path)
}

fn interface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
        || inet_socket()
            .and_then(|s| interface_flags(&s, name))
            .is_ok()
}

fn inet_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn ifreq_for(name: &str) -> libc::ifreq {
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    libc::ifreq {
        ifr_name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: 0 },
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain bytes; this is how the socket API passes addresses.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn sockaddr_to_ipv4(sa: &libc::sockaddr) -> Ipv4Addr {
    // SAFETY: as in sockaddr_in; the kernel filled an AF_INET address.
    let sin = unsafe { std::mem::transmute::<libc::sockaddr, libc::sockaddr_in>(*sa) };
    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
}

fn set_addr(sock: &OwnedFd, name: &str, request: libc::Ioctl, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: SIOCSIFADDR/SIOCSIFNETMASK only read `req`, a properly
    // initialised ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads an address of `name` (SIOCGIFADDR or SIOCGIFNETMASK).
pub fn interface_addr(name: &str, request: libc::Ioctl) -> io::Result<Ipv4Addr> {
    let sock = inet_socket()?;
    let mut req = ifreq_for(name);
    // SAFETY: the ioctl reads the name from and writes an address into
    // `req`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl filled the address member of the union.
    Ok(sockaddr_to_ipv4(unsafe { &req.ifr_ifru.ifru_addr }))
}

fn interface_flags(sock: &OwnedFd, name: &str) -> io::Result<libc::c_short> {
    let mut req = ifreq_for(name);
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
    // `req`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_flags })
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let flags = interface_flags(sock, name)?;
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS only reads `req`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_default_route(sock: &OwnedFd, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    let mut dev: Vec<libc::c_char> = name.bytes().map(|b| b as libc::c_char).collect();
    dev.push(0);
    // SAFETY: rtentry is a plain C struct for which all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    rt.rt_dev = dev.as_mut_ptr();
    // SAFETY: SIOCADDRT reads `rt` and the NUL-terminated device name it
    // points to; both outlive the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) } < 0 {
        let e = io::Error::last_os_error();
        // Already there (e.g. the agent configured it before a restore).
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(netmask(32), Some(Ipv4Addr::BROADCAST));
        assert_eq!(netmask(0), Some(Ipv4Addr::UNSPECIFIED));
        assert_eq!(netmask(20), Some(Ipv4Addr::new(255, 255, 240, 0)));
        assert_eq!(netmask(33), None);
    }

    #[test]
    fn resolv_conf_replaces_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("resolv.conf");
        std::os::unix::fs::symlink("/run/systemd/resolve/stub-resolv.conf", &p).unwrap();
        write_resolv_conf(&p, &[Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)]).unwrap();
        assert!(!fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "# written by ferry-agent\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn configures_an_interface_in_a_fresh_network_namespace() {
        let d = tempfile::tempdir().unwrap();
        let resolv = d.path().join("resolv.conf");
        let r = std::thread::spawn(move || {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                return Err(format!("unshare(CLONE_NEWNET): {e}"));
            }
            // The only interface of a fresh namespace is lo; configure it
            // like a guest's eth0.
            let config = NetworkConfig {
                interface: "lo".into(),
                address: Ipv4Addr::new(10, 9, 0, 2),
                prefix_len: 24,
                gateway: Ipv4Addr::new(10, 9, 0, 1),
                dns: vec![Ipv4Addr::new(10, 9, 0, 3)],
            };
            configure(&config, &resolv).map_err(|e| e.to_string())?;
            // Applying it twice (e.g. after a restore) is fine.
            configure(&config, &resolv).map_err(|e| e.to_string())?;
            let addr = interface_addr("lo", libc::SIOCGIFADDR).map_err(|e| e.to_string())?;
            let mask = interface_addr("lo", libc::SIOCGIFNETMASK).map_err(|e| e.to_string())?;
            let routes =
                fs::read_to_string("/proc/thread-self/net/route").map_err(|e| e.to_string())?;
            Ok((addr, mask, routes, fs::read_to_string(&resolv).unwrap()))
        })
        .join()
        .unwrap();
        match r {
            Ok((addr, mask, routes, resolv)) => {
                assert_eq!(addr, Ipv4Addr::new(10, 9, 0, 2));
                assert_eq!(mask, Ipv4Addr::new(255, 255, 255, 0));
                // Default route: destination 0, gateway 10.9.0.1 (little-endian hex).
                assert!(
                    routes.lines().any(|l| l
                        .split_whitespace()
                        .take(3)
                        .eq(["lo", "00000000", "0100090A"])),
                    "{routes}"
                );
                assert!(resolv.contains("nameserver 10.9.0.3\n"));
            }
            // Without CAP_SYS_ADMIN this cannot be exercised here; the
            // test-host test covers it in a guest.
            Err(e) if e.contains("EPERM") => eprintln!("skipped: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
