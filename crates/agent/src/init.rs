//! PID 1 duties: early mounts, switching into the root disk, basic system
//! setup, supervising the main process, and shutting the VM down.
//!
//! Only run when the agent is PID 1 in the guest; the helpers that are pure
//! functions of their inputs are unit-tested on the host.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{
    console, AgentConfig, ExitKind, MountSpec, PowerAction, Token, CONFIG_PATH, PROTOCOL_VERSION,
};
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

use crate::agent_log;
use crate::main_process::{self, MainSlot, MainWatch, CONSOLE};
use crate::reaper::Reaper;
use crate::server::Server;
use crate::system::LinuxSystem;
use crate::vsock::{VsockListener, VMADDR_CID_ANY};

/// Where the root disk is mounted before the switch.
pub const NEW_ROOT: &str = "/newroot";

/// How long to wait for a block device node to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// Marker logged before giving up on boot.
pub const FATAL_MARKER: &str = "FERRY-AGENT-FATAL";

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Failure of a boot step, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct BootError {
    what: String,
    #[source]
    source: io::Error,
}

fn ctx<T, E: Into<io::Error>>(
    r: Result<T, E>,
    what: impl FnOnce() -> String,
) -> Result<T, BootError> {
    r.map_err(|e| BootError {
        what: what(),
        source: e.into(),
    })
}

/// Runs the agent as PID 1. Never returns: the VM ends in power-off.
pub fn run() -> ! {
    std::panic::set_hook(Box::new(|info| agent_log!("panic: {info}")));
    let result = std::panic::catch_unwind(boot);
    match result {
        Ok(Ok(booted)) => supervise(booted),
        Ok(Err(e)) => {
            agent_log!("{FATAL_MARKER} {e}");
            shutdown(PowerAction::Poweroff, None)
        }
        Err(_) => {
            agent_log!("{FATAL_MARKER} panic during boot");
            shutdown(PowerAction::Poweroff, None)
        }
    }
}

struct Booted {
    reaper: Reaper,
    power_rx: Receiver<PowerAction>,
    main: MainWatch,
}

fn boot() -> Result<Booted, BootError> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    mount_early()?;
    ensure_console_fds();
    agent_log!("starting, protocol {PROTOCOL_VERSION}");

    let raw = ctx(fs::read(CONFIG_PATH), || format!("reading {CONFIG_PATH}"))?;
    // The token lives only in memory from here on.
    let _ = fs::remove_file(CONFIG_PATH);
    let config = ctx(
        AgentConfig::from_json(&raw).map_err(io::Error::other),
        || format!("parsing {CONFIG_PATH}"),
    )?;
    let token = ctx(
        Token::from_hex(&config.token).map_err(io::Error::other),
        || "config token".to_string(),
    )?;

    mount_root(&config)?;
    switch_root(Path::new(NEW_ROOT))?;
    mount_system()?;
    for m in &config.mounts {
        if let Err(e) = mount_extra(m) {
            agent_log!("mount {} on {}: {e}", m.source, m.target);
        }
    }
    if let Err(e) = nix::unistd::sethostname(&config.hostname) {
        agent_log!("sethostname: {e}");
    }
    if let Err(e) = loopback_up() {
        agent_log!("bringing up lo: {e}");
    }
    if let Err(e) = update_hosts(Path::new("/etc/hosts"), &config.hostname) {
        agent_log!("/etc/hosts: {e}");
    }
    if let Some(net) = &config.network {
        match crate::net::configure(net, Path::new("/etc/resolv.conf")) {
            Ok(()) => agent_log!(
                "network: {} {}/{} via {}",
                net.interface,
                net.address,
                net.prefix_len,
                net.gateway
            ),
            Err(e) => agent_log!("network: {e}"),
        }
    }

    let reaper = ctx(Reaper::start(), || "starting the reaper".into())?;
    let (power_tx, power_rx) = mpsc::channel();
    let system = Arc::new(LinuxSystem::new(Some(power_tx)));
    // A main process from the config is started below; otherwise the host
    // may start one later (StartMain), which reaches supervise() over main_rx.
    let (main_tx, main_rx) = mpsc::channel();
    let slot = Arc::new(MainSlot::new(main_tx, config.command.is_some()));
    let server = Arc::new(Server::new(token, reaper.clone(), system).with_main(Arc::clone(&slot)));
    let port = config.vsock_port;
    ctx(
        std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || serve_vsock(&server, port)),
        || "starting the vsock server".into(),
    )?;

    let main = match &config.command {
        None => None,
        Some(c) => {
            let spec = main_process::spec(c);
            match main_process::start(&spec, &reaper, Path::new("/etc"), Path::new(CONSOLE)) {
                Ok(w) => {
                    slot.set_booted(w.signaller());
                    Some(w)
                }
                Err(e) => {
                    // Report it like an exit so the host sees one outcome.
                    agent_log!("main process: {}", e.error);
                    agent_log!("{}", console::main_exit_line(ExitKind::Code(e.exit_code)));
                    shutdown(PowerAction::Poweroff, Some(&reaper));
                }
            }
        }
    };
    Ok(Booted {
        reaper,
        power_rx,
        main: MainWatch::new(main, main_rx),
    })
}

fn serve_vsock(server: &Arc<Server>, port: u32) {
    loop {
        match VsockListener::bind(VMADDR_CID_ANY, port) {
            Ok(l) => {
                agent_log!("{}", console::ready_line());
                server.serve(&l)
            }
            Err(e) => {
                agent_log!("vsock listen on port {port}: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn supervise(mut b: Booted) -> ! {
    loop {
        if let Some(kind) = b.main.poll() {
            agent_log!("{}", console::main_exit_line(kind));
            shutdown(PowerAction::Poweroff, Some(&b.reaper));
        }
        match b.power_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(action) => shutdown(action, Some(&b.reaper)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Stops everything and powers off (or reboots). Never returns.
pub fn shutdown(action: PowerAction, reaper: Option<&Reaper>) -> ! {
    agent_log!("shutting down: {action:?}");
    // pid -1: every process except ourselves.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let wait_children = |limit: Duration| {
        let start = Instant::now();
        while reaper.is_some_and(Reaper::has_children) && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_children(Duration::from_secs(3));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    wait_children(Duration::from_secs(1));
    nix::unistd::sync();
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, ro, None::<&str>) {
        agent_log!("remounting / read-only: {e}");
    }
    nix::unistd::sync();
    // ferry VMs have no ACPI, so RB_POWER_OFF would only halt the CPUs with the
    // VM still "running". ferry's VMM ends a VM when the guest resets, so both
    // actions leave through a reset.
    agent_log!("{action:?}: resetting to end the VM");
    let how = nix::sys::reboot::RebootMode::RB_AUTOBOOT;
    let err = nix::sys::reboot::reboot(how);
    agent_log!("reboot({how:?}) failed: {err:?}");
    // PID 1 must not exit (the kernel would panic); wait to be killed.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    let _ = fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        // Already mounted (e.g. the kernel auto-mounted devtmpfs).
        Err(nix::errno::Errno::EBUSY) => Ok(()),
        r => ctx(r, || format!("mount {fstype} on {target}")),
    }
}

fn mount_early() -> Result<(), BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("proc", "/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
}

/// If the kernel could not give us a console on fds 0-2 (no /dev/console
/// in the initramfs), attach them now that devtmpfs is mounted.
fn ensure_console_fds() {
    if Path::new("/proc/self/fd/2").exists() {
        return;
    }
    if let Ok(c) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        let _ = nix::unistd::dup2_stdin(&c);
        let _ = nix::unistd::dup2_stdout(&c);
        let _ = nix::unistd::dup2_stderr(&c);
    }
}

fn wait_for_path(p: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while !p.exists() {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn mount_root(config: &AgentConfig) -> Result<(), BootError> {
    let root = &config.root;
    if !wait_for_path(Path::new(&root.device), DEVICE_WAIT) {
        return Err(BootError {
            what: format!("root device {}", root.device),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    let mut flags = MsFlags::empty();
    if root.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount_fs(
        &root.device,
        NEW_ROOT,
        &root.fstype,
        flags,
        root.options.as_deref(),
    )
}

/// Moves /dev, /proc and /sys into `new_root`, frees the initramfs, and
/// makes `new_root` the root (`switch_root`: initramfs cannot be
/// pivot_root'ed, so the new root is moved over it and chroot'ed into).
fn switch_root(new_root: &Path) -> Result<(), BootError> {
    for d in ["dev", "proc", "sys"] {
        let target = new_root.join(d);
        let _ = fs::create_dir(&target);
        let src = Path::new("/").join(d);
        ctx(
            mount(
                Some(&src),
                &target,
                None::<&str>,
                MsFlags::MS_MOVE,
                None::<&str>,
            ),
            || format!("moving {} to {}", src.display(), target.display()),
        )?;
    }
    ctx(nix::unistd::chdir(new_root), || {
        format!("chdir {}", new_root.display())
    })?;
    // Only ever delete from an in-memory root: a misconfiguration must never
    // make this erase a disk.
    let fs_type = nix::sys::statfs::statfs("/").map(|s| s.filesystem_type().0);
    if matches!(fs_type, Ok(RAMFS_MAGIC) | Ok(TMPFS_MAGIC)) {
        if let Ok(meta) = fs::symlink_metadata("/") {
            remove_tree_on_device(Path::new("/"), meta.dev());
        }
    }
    ctx(
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
        || "moving the new root to /".into(),
    )?;
    ctx(nix::unistd::chroot("."), || "chroot".into())?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())
}

/// Deletes the contents of `dir` that live on device `dev`, without
/// descending into other filesystems (mount points). Errors are ignored:
/// this only frees memory.
pub fn remove_tree_on_device(dir: &Path, dev: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            remove_tree_on_device(&p, dev);
            let _ = fs::remove_dir(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

/// Mount points listed in a `/proc/self/mountinfo` text.
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .collect()
}

fn is_mount_point(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| mount_points(&t).iter().any(|p| p == path))
        .unwrap_or(false)
}

/// Mounts the runtime filesystems every Linux userland expects.
fn mount_system() -> Result<(), BootError> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let steps: [(&str, &str, &str, MsFlags, &str); 5] = [
        (
            "devpts",
            "/dev/pts",
            "devpts",
            nosuid_noexec,
            "gid=5,mode=0620,ptmxmode=0666",
        ),
        ("shm", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_noexec | MsFlags::MS_NODEV,
            "",
        ),
    ];
    for (src, target, fstype, flags, data) in steps {
        if is_mount_point(target) {
            continue;
        }
        let data = (!data.is_empty()).then_some(data);
        if let Err(e) = mount_fs(src, target, fstype, flags, data) {
            agent_log!("{e}");
        }
    }
    // devtmpfs has no /dev/fd & co.; shells and process substitution need them.
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            let _ = symlink(to, link);
        }
    }
    if fs::symlink_metadata("/dev/ptmx").is_err() {
        let _ = symlink("pts/ptmx", "/dev/ptmx");
    }
    Ok(())
}

fn mount_extra(m: &MountSpec) -> Result<(), BootError> {
    if m.source.starts_with("/dev/") && !wait_for_path(Path::new(&m.source), DEVICE_WAIT) {
        return Err(BootError {
            what: format!("device {}", m.source),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    let flags = if m.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    mount_fs(&m.source, &m.target, &m.fstype, flags, m.options.as_deref())
}

/// Brings the loopback interface up (which also gives it 127.0.0.1/8 and
/// ::1), like `ip link set lo up`, without needing any binary.
pub fn loopback_up() -> io::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut req = ifreq_for("lo");
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
    // `req`, a properly initialised ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the flags of interface `name` (for checks and tests).
pub fn interface_flags(name: &str) -> io::Result<libc::c_short> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut req = ifreq_for(name);
    // SAFETY: see loopback_up.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_flags })
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

/// Returns new /etc/hosts content if `current` lacks a localhost or a
/// hostname entry, or `None` if nothing needs adding.
pub fn hosts_with_entries(current: &str, hostname: &str) -> Option<String> {
    let entries: Vec<(String, Vec<String>)> = current
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = f.next()?.to_string();
            Some((addr, f.map(str::to_string).collect()))
        })
        .collect();
    let has_localhost = entries
        .iter()
        .any(|(a, names)| a == "127.0.0.1" && names.iter().any(|n| n == "localhost"));
    let has_host = entries
        .iter()
        .any(|(_, names)| names.iter().any(|n| n == hostname));
    if has_localhost && has_host {
        return None;
    }
    let mut out = current.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !has_localhost {
        out.push_str("127.0.0.1\tlocalhost\n");
    }
    if !has_host {
        out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    Some(out)
}

/// Ensures `path` has localhost and hostname entries (atomically replaced).
pub fn update_hosts(path: &Path, hostname: &str) -> io::Result<()> {
    let current = match fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let Some(new) = hosts_with_entries(&current, hostname) else {
        return Ok(());
    };
    let tmp: PathBuf = path.with_extension("ferry-tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
    }
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_entries_added_only_when_missing() {
        let debian = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
        let out = hosts_with_entries(debian, "vm1").unwrap();
        assert!(out.starts_with(debian));
        assert!(out.ends_with("127.0.1.1\tvm1\n"));
        assert_eq!(hosts_with_entries(&out, "vm1"), None);
        assert_eq!(
            hosts_with_entries("", "vm1").unwrap(),
            "127.0.0.1\tlocalhost\n127.0.1.1\tvm1\n"
        );
        // A commented-out name does not count; missing final newline is fixed.
        assert_eq!(
            hosts_with_entries("127.0.0.1 localhost # vm1", "vm1").unwrap(),
            "127.0.0.1 localhost # vm1\n127.0.1.1\tvm1\n"
        );
        assert_eq!(
            hosts_with_entries("10.0.0.5 vm1\n127.0.0.1 localhost\n", "vm1"),
            None
        );
    }

    #[test]
    fn update_hosts_writes_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hosts");
        update_hosts(&p, "box").unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "127.0.0.1\tlocalhost\n127.0.1.1\tbox\n"
        );
        let before = fs::metadata(&p).unwrap().modified().unwrap();
        update_hosts(&p, "box").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().modified().unwrap(), before);
    }

    #[test]
    fn mountinfo_parsing() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw\n\
                    30 22 0:30 / /mnt/a\\040b rw - tmpfs tmpfs rw\n";
        assert_eq!(mount_points(text), vec!["/", "/dev", "/mnt/a b"]);
    }

    #[test]
    fn tree_removal_stays_on_one_device() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), "x").unwrap();
        fs::write(root.join("top"), "y").unwrap();
        symlink("/etc/passwd", root.join("link")).unwrap();
        let dev = fs::metadata(root).unwrap().dev();
        // A different device number: nothing may be touched.
        remove_tree_on_device(root, dev.wrapping_add(1));
        assert!(root.join("a/b/f").exists() && root.join("top").exists());
        remove_tree_on_device(root, dev);
        assert_eq!(fs::read_dir(root).unwrap().count(), 0);
        assert!(
            Path::new("/etc/passwd").exists(),
            "symlink target untouched"
        );
    }

    #[test]
    fn loopback_up_in_a_fresh_network_namespace() {
        // Network namespaces are per thread, so this leaves the host alone.
        let r = std::thread::spawn(|| {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                return Err(format!("unshare(CLONE_NEWNET): {e}"));
            }
            let before = interface_flags("lo").map_err(|e| e.to_string())?;
            loopback_up().map_err(|e| e.to_string())?;
            let after = interface_flags("lo").map_err(|e| e.to_string())?;
            Ok((before, after))
        })
        .join()
        .unwrap();
        match r {
            Ok((before, after)) => {
                assert_eq!(before & libc::IFF_UP as libc::c_short, 0);
                assert_ne!(after & libc::IFF_UP as libc::c_short, 0);
            }
            // Without CAP_SYS_ADMIN this cannot be exercised here; the guest
            // tests cover it.
            Err(e) if e.contains("EPERM") => eprintln!("skipped: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
