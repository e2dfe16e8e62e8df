//! Outbound guest networking (`ferry boot --net`) with passt.
//!
//! The VM gets a virtio-net device whose frames go to a passt process over
//! one end of a socketpair (`passt --fd`, the framing of QEMU's
//! `-netdev stream`). passt is a user-mode network stack: it terminates the
//! guest's TCP, UDP and ICMP and re-originates them from ordinary sockets of
//! the host, so it needs no root, no TAP device and no bridge, and the VM's
//! traffic leaves with the host's own address.
//!
//! The guest side is static: the agent configures `eth0` with
//! [`GUEST_ADDRESS`]/[`GUEST_PREFIX_LEN`], a default route via
//! [`GUEST_GATEWAY`], and `/etc/resolv.conf`. passt is told the same
//! addresses, so both ends agree without DHCP (passt still answers DHCP for
//! guests that ask). Name servers: the guest uses the host's own (from the
//! host's `/etc/resolv.conf`) when they are reachable addresses; when the
//! host only has a loopback resolver (e.g. systemd-resolved's 127.0.0.53),
//! the guest uses [`GUEST_DNS`] and passt forwards queries sent there to the
//! host's resolver (`--dns-forward`).
//!
//! ferry runs passt's baseline build, not the AVX2 variant the `passt`
//! binary re-executes itself into when the CPU has AVX2: the variant crashes
//! on its first checksum under CPU emulation (as in ferry's TCG test hosts).
//! The baseline build is copied once into ferry's cache, where passt finds
//! no `.avx2` sibling ([`baseline_passt`]).
//!
//! passt runs as a child of the VMM process with only loopback-safe
//! options: no inbound port forwarding (`-t none -u none`), and the gateway
//! address is not mapped to the host's loopback (`--no-map-gw`), so the
//! guest cannot reach services listening on the host's 127.0.0.1. It ends
//! with the VM: the VMM kills it on the way out, and passt exits on its own
//! when its socket closes (the VMM died).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_protocol::NetworkConfig;
use ferry_vmm::{MacAddr, NetBackend, NetConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Coded, InstallError};

/// Debian packages the host needs for VM networking.
pub const HOST_PACKAGES: &[&str] = &["passt"];
/// The guest's address.
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Prefix length of the guest's network.
pub const GUEST_PREFIX_LEN: u8 = 24;
/// The guest's default gateway (passt).
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The name server the guest uses; passt forwards its queries to the host's.
pub const GUEST_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// A VM's network settings, kept in its record so a restored VM gets the
/// same ones (a fork would change `mac`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSettings {
    /// The guest NIC's MAC address.
    pub mac: MacAddr,
    /// The guest's address.
    pub address: Ipv4Addr,
    /// Prefix length of the guest's network.
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// Name servers the guest uses.
    pub dns: Vec<Ipv4Addr>,
    /// When set, the host's resolver is loopback-only: passt forwards DNS
    /// queries the guest sends to `dns[0]` to this address on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_forward_to: Option<Ipv4Addr>,
}

impl NetSettings {
    /// The default settings for the VM with id `vm_id`, with name servers
    /// from this host's `/etc/resolv.conf`.
    pub fn for_vm(vm_id: &str) -> Self {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Self::with_host_resolvers(vm_id, &host_nameservers(&text))
    }

    /// The default settings given the host's IPv4 name servers.
    pub fn with_host_resolvers(vm_id: &str, host: &[Ipv4Addr]) -> Self {
        let reachable: Vec<Ipv4Addr> = host
            .iter()
            .copied()
            .filter(|a| !a.is_loopback() && !a.is_unspecified())
            .collect();
        let (dns, dns_forward_to) = if reachable.is_empty() {
            // Loopback-only (or no) resolver: the guest cannot reach it, so
            // passt relays. Without any, passt falls back to its defaults.
            (
                vec![GUEST_DNS],
                Some(host.first().copied().unwrap_or(GUEST_DNS)),
            )
        } else {
            (reachable, None)
        };
        NetSettings {
            mac: mac_for_id(vm_id),
            address: GUEST_ADDRESS,
            prefix_len: GUEST_PREFIX_LEN,
            gateway: GUEST_GATEWAY,
            dns,
            dns_forward_to,
        }
    }

    /// What the guest agent applies at boot.
    pub fn agent_config(&self) -> NetworkConfig {
        NetworkConfig {
            interface: "eth0".into(),
            address: self.address,
            prefix_len: self.prefix_len,
            gateway: self.gateway,
            dns: self.dns.clone(),
        }
    }

    /// passt's command-line options for these settings, besides `--fd`.
    pub fn passt_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--foreground",
            "--quiet",
            // Nothing from outside into the guest: ferry forwards ports itself.
            "--tcp-ports",
            "none",
            "--udp-ports",
            "none",
            // The guest must not reach the host's loopback services.
            "--no-map-gw",
            "--ipv4-only",
        ]
        .map(String::from)
        .to_vec();
        let mut opts = vec![
            ("--address", self.address.to_string()),
            ("--netmask", self.prefix_len.to_string()),
            ("--gateway", self.gateway.to_string()),
        ];
        match (self.dns_forward_to, self.dns.first()) {
            (Some(target), Some(local)) => {
                opts.push(("--dns-forward", local.to_string()));
                opts.push(("--dns", target.to_string()));
            }
            _ => opts.extend(self.dns.iter().map(|d| ("--dns", d.to_string()))),
        }
        for (opt, val) in opts {
            args.push(opt.into());
            args.push(val);
        }
        args
    }
}

/// IPv4 `nameserver` entries of a `resolv.conf` text, in order.
pub fn host_nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A stable, locally administered unicast MAC address derived from a VM id.
pub fn mac_for_id(vm_id: &str) -> MacAddr {
    let h = Sha256::digest(format!("ferry-mac\0{vm_id}").as_bytes());
    let mut b = [0u8; 6];
    b.copy_from_slice(&h[..6]);
    b[0] = (b[0] & 0xfc) | 0x02;
    MacAddr(b)
}

/// Errors of VM networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// passt is not installed.
    #[error("VM networking needs passt, which is not installed (looked for {0})")]
    PasstMissing(String),
    /// passt could not be started.
    #[error("cannot start passt ({path}): {source}")]
    Spawn {
        /// The passt binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socketpair to passt could not be created.
    #[error("cannot create the socket to passt: {0}")]
    Socket(#[source] io::Error),
}

impl Coded for NetError {
    fn code(&self) -> &'static str {
        match self {
            NetError::PasstMissing(_) => "BOOT_NET_UNAVAILABLE",
            NetError::Spawn { .. } | NetError::Socket(_) => "BOOT_NET_FAILED",
        }
    }

    fn hint(&self) -> Option<String> {
        Some(match self {
            NetError::PasstMissing(_) => {
                "install it with `sudo ferry install` or `apt-get install passt`, or boot without --net"
                    .into()
            }
            _ => "see the VM's vmm.log; boot without --net to run without a network".into(),
        })
    }
}

/// Finds the passt binary: `$FERRY_PASST`, else `passt` on `PATH`, else
/// `/usr/bin/passt`.
pub fn find_passt() -> Result<PathBuf, NetError> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("FERRY_PASST").map(PathBuf::from) {
        if is_executable(&p) {
            return Ok(p);
        }
        tried.push(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path)
        .map(|d| d.join("passt"))
        .chain([
            PathBuf::from("/usr/bin/passt"),
            PathBuf::from("/usr/sbin/passt"),
        ]);
    for c in candidates {
        if is_executable(&c) {
            return Ok(c);
        }
        tried.push(c);
    }
    Err(NetError::PasstMissing(
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

/// The passt binary to run: `passt` itself when it has no AVX2 variant next
/// to it, else a copy of the baseline build in ferry's cache (made once),
/// so passt does not re-execute itself into the AVX2 variant.
pub fn baseline_passt(cache: &Path, passt: &Path) -> io::Result<PathBuf> {
    let mut avx2 = passt.as_os_str().to_owned();
    avx2.push(".avx2");
    if !Path::new(&avx2).exists() {
        return Ok(passt.to_path_buf());
    }
    let meta = std::fs::metadata(passt)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let dest = cache
        .join("passt")
        .join(format!("passt-{}-{mtime}", meta.len()));
    if !is_executable(&dest) {
        std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
        let staging = crate::fsutil::staging_path(&dest);
        std::fs::copy(passt, &staging)?;
        crate::fsutil::publish(&staging, &dest)?;
    }
    Ok(dest)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes sure the host has the packages VM networking needs (`ferry install`).
pub fn ensure_host_packages(log: &Path) -> Result<(), InstallError> {
    crate::host::debian::ensure_packages(HOST_PACKAGES, log).map(drop)
}

/// A running passt serving one VM.
pub struct Passt {
    child: Arc<Mutex<Child>>,
    vmm_end: UnixStream,
    settings: NetSettings,
}

impl Passt {
    /// Starts passt (its baseline build, see [`baseline_passt`]) for
    /// `settings`. Its output goes to this process's stderr.
    pub fn start(cache: &Path, passt: &Path, settings: &NetSettings) -> Result<Passt, NetError> {
        let passt = &baseline_passt(cache, passt).map_err(|source| NetError::Spawn {
            path: passt.to_path_buf(),
            source,
        })?;
        let (vmm_end, passt_end) = UnixStream::pair().map_err(NetError::Socket)?;
        let fd = passt_end.as_raw_fd();
        let mut cmd = Command::new(passt);
        cmd.arg("--fd")
            .arg(fd.to_string())
            .args(settings.passt_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl(2), which is async-signal-safe, on a descriptor the
        // child inherited.
        unsafe {
            cmd.pre_exec(move || {
                // Let passt inherit its end of the socketpair.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| NetError::Spawn {
            path: passt.to_path_buf(),
            source,
        })?;
        drop(passt_end);
        tracing::info!("passt started (pid {}) for {}", child.id(), settings.mac);
        let child = Arc::new(Mutex::new(child));
        let watched = Arc::clone(&child);
        // Supervision: say so if passt ends while the VM runs.
        let _ = std::thread::Builder::new()
            .name("passt-watch".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(500));
                let mut c = watched.lock().unwrap_or_else(|p| p.into_inner());
                match c.try_wait() {
                    Ok(None) => {}
                    Ok(Some(status)) => {
                        eprintln!("ferry: passt exited ({status}); the VM's network is down");
                        return;
                    }
                    Err(_) => return,
                }
            });
        Ok(Passt {
            child,
            vmm_end,
            settings: settings.clone(),
        })
    }

    /// The device configuration using this passt as backend. The
    /// descriptor stays valid as long as `self` lives.
    pub fn device_config(&self) -> NetConfig {
        NetConfig {
            mac: self.settings.mac,
            backend: NetBackend::Fd(self.vmm_end.as_raw_fd()),
        }
    }

    /// passt's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }

    /// Stops passt and reaps it.
    pub fn stop(&self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn macs_are_stable_local_unicast_and_differ_per_vm() {
        let a = mac_for_id("0123456789abcdef");
        assert_eq!(a, mac_for_id("0123456789abcdef"));
        assert_ne!(a, mac_for_id("0123456789abcdee"));
        assert!(a.is_unicast() && a.is_local());
    }

    #[test]
    fn passt_options_are_loopback_safe_and_match_the_guest() {
        let ns = Ipv4Addr::new(192, 0, 2, 53);
        let s = NetSettings::with_host_resolvers("x", &[ns, Ipv4Addr::new(127, 0, 0, 1)]);
        let args = s.passt_args().join(" ");
        for want in [
            "--tcp-ports none",
            "--udp-ports none",
            "--no-map-gw",
            "--address 10.0.2.15",
            "--netmask 24",
            "--gateway 10.0.2.2",
            "--dns 192.0.2.53",
        ] {
            assert!(args.contains(want), "{want} missing from {args}");
        }
        assert!(!args.contains("--dns-forward"), "{args}");
        let agent = s.agent_config();
        assert_eq!(agent.address, s.address);
        assert_eq!(agent.gateway, s.gateway);
        assert_eq!(
            agent.dns,
            vec![ns],
            "loopback resolvers are not given to the guest"
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<NetSettings>(&json).unwrap(), s);
    }

    #[test]
    fn a_loopback_only_host_resolver_is_relayed_by_passt() {
        let stub = Ipv4Addr::new(127, 0, 0, 53);
        let s = NetSettings::with_host_resolvers("x", &[stub]);
        assert_eq!(s.dns, vec![GUEST_DNS]);
        let args = s.passt_args().join(" ");
        assert!(
            args.contains("--dns-forward 10.0.2.3 --dns 127.0.0.53"),
            "{args}"
        );
        assert_eq!(
            NetSettings::with_host_resolvers("x", &[]).dns_forward_to,
            Some(GUEST_DNS)
        );
    }

    #[test]
    fn resolv_conf_parsing() {
        let text = "# x\nsearch example\nnameserver 10.0.2.3\nnameserver ::1\n nameserver 192.0.2.1 # c\noptions edns0\n";
        assert_eq!(
            host_nameservers(text),
            vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(192, 0, 2, 1)]
        );
    }

    #[test]
    fn missing_passt_is_a_coded_error() {
        let e = NetError::PasstMissing("/nowhere/passt".into());
        assert_eq!(e.code(), "BOOT_NET_UNAVAILABLE");
        assert!(e.hint().unwrap().contains("apt-get install passt"));
    }

    /// Talks to a real passt when it is installed: an ARP request for the
    /// gateway gets passt's answer, in the stream framing.
    #[test]
    fn real_passt_answers_arp_for_the_gateway() {
        let Ok(path) = find_passt() else {
            eprintln!("skipped: passt is not installed");
            return;
        };
        let settings = NetSettings::for_vm("arp-test");
        let cache = tempfile::tempdir().unwrap();
        let passt = Passt::start(cache.path(), &path, &settings).unwrap();
        assert!(matches!(passt.device_config().backend, NetBackend::Fd(_)));
        let mut s = passt.vmm_end.try_clone().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mac = settings.mac.0;
        let mut arp = Vec::new();
        arp.extend_from_slice(&[0xff; 6]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&settings.address.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&settings.gateway.octets());
        let mut framed = (arp.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&arp);
        s.write_all(&framed).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..6], &mac, "addressed to the guest");
        assert_eq!(&reply[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&reply[20..22], &[0, 2], "a reply");
        assert_eq!(
            &reply[28..32],
            &settings.gateway.octets(),
            "for the gateway"
        );
        let pid = passt.pid();
        drop(passt);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "passt must be gone (and reaped) once stopped"
        );
    }
}
