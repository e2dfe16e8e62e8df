//! Test hosts: QEMU VMs under TCG with an emulated AMD SVM CPU, running Debian's
//! cloud kernel with `kvm_amd`, so ferry runs on real (emulated) KVM inside them.
//!
//! Each host gets three disks (its root, ferry's cached assets, and a payload with
//! ferry's binaries and the script), a user-mode NIC for the package mirror, and a
//! NIC on a loopback hub shared with the other hosts. The script's exit status comes
//! back on a second serial port.

pub mod assets;
pub mod hub;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_runtime::assets::rootfs;
use ferry_runtime::fsutil;
use ferry_runtime::host::command::run_logged;

use crate::workspace::{self, Binaries};

/// vCPUs per test host. One: with two, QEMU's multi-threaded TCG (7.2) has been
/// seen to keep running a stale translation of kernel text the test host had
/// just patched (a jump label's `int3`, rewritten to a `jmp` in memory), both
/// vCPUs looping through the breakpoint handler with interrupts off and the
/// whole test host stopped for good. One vCPU never patches text under another.
pub const HOST_CPUS: u32 = 1;

/// An AMD CPU with SVM and nested paging, minus the features TCG cannot emulate
/// (so QEMU has nothing to warn about and the guest sees a stable CPU).
const CPU_MODEL: &str = "EPYC-v3,+svm,+npt,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-perfctr-core,-clzero,-xsaveerptr,-ibpb,-nrip-save,-xsavec,-xsaves,-rdseed";

/// One host and the script it runs.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// `host-a`, `host-b`, ...
    pub name: String,
    /// Script file, run as root with bash.
    pub script: PathBuf,
}

/// How to run a set of test hosts.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Hosts in order; host i is `host-<a+i>` at 10.77.0.<i+1>.
    pub hosts: Vec<HostSpec>,
    /// Whole-run limit.
    pub timeout: Duration,
    /// Memory per host.
    pub memory_mib: u32,
    /// vCPUs per host.
    pub cpus: u32,
    /// Where to keep logs; a fresh directory per run.
    pub run_dir: PathBuf,
    /// Whether to echo host output to our stdout.
    pub stream: bool,
}

/// What happened to one host.
#[derive(Debug)]
pub struct HostOutcome {
    /// Host name.
    pub name: String,
    /// The script's exit status, if the host reported one.
    pub status: Option<i32>,
    /// Whether the run timed out before this host finished.
    pub timed_out: bool,
    /// Console log.
    pub console: PathBuf,
    /// Full QEMU command line.
    pub cmdline: PathBuf,
}

impl HostOutcome {
    /// True when the script exited 0.
    pub fn ok(&self) -> bool {
        self.status == Some(0)
    }
}

/// Host name for position `i` (0-based).
pub fn host_name(i: usize) -> String {
    format!("host-{}", (b'a' + i as u8) as char)
}

/// Everything a run needs that does not change between runs.
pub struct Prepared {
    host: assets::HostAssets,
    ferry_assets: PathBuf,
    binaries: Binaries,
    node_package: PathBuf,
    python_wheel: PathBuf,
    musl_fixture: PathBuf,
    garage: PathBuf,
}

/// `s3-server`, which test scripts call to run Garage (bin/garage).
const S3_SERVER: &str = include_str!("../../assets/s3-server.sh");

/// Builds (or finds cached) test host assets, ferry's binaries and ferry's assets disk.
pub fn prepare() -> Result<Prepared> {
    let cache = ferry_runtime::paths::cache_dir();
    let log = cache.join("logs/testhost.log");
    std::fs::create_dir_all(log.parent().unwrap())?;
    ferry_runtime::host::debian::ensure_packages(assets::HOST_PACKAGES, &log)?;
    if which("npm").is_none() {
        // The machine's own Node.js brings npm; without one, Debian's.
        ferry_runtime::host::debian::ensure_packages(&["npm"], &log)?;
    }
    let binaries = workspace::build_binaries()?;
    let node_package = workspace::build_node_package()?;
    let python_wheel = workspace::build_python_wheel(&log)?;
    let musl_fixture = workspace::build_musl_fixture()?;
    let garage = workspace::garage()?;
    let installed = workspace::ferry_install(&binaries)?;
    let ferry_assets = ferry_assets_disk(&cache, &installed, &log)?;
    let host = assets::ensure(&cache, &log)?;
    Ok(Prepared {
        host,
        ferry_assets,
        binaries,
        node_package,
        python_wheel,
        musl_fixture,
        garage,
    })
}

/// The path of `program` on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Packs ferry's installed assets into an ext4 image laid out like ferry's cache,
/// so `ferry` inside a host finds them warm. Cached by the assets' directories.
fn ferry_assets_disk(cache: &Path, dirs: &[PathBuf], log: &Path) -> Result<PathBuf> {
    let key = dirs
        .iter()
        .map(|d| d.strip_prefix(cache).unwrap_or(d).display().to_string())
        .collect::<Vec<_>>()
        .join("+")
        .replace('/', "-");
    let dest = cache.join(format!("testhost/ferry-assets-{key}.ext4"));
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(dest.parent().unwrap())?;
    let tree = fsutil::staging_path(&cache.join("testhost/ferry-assets-tree"));
    let _ = std::fs::remove_dir_all(&tree);
    for dir in dirs {
        let rel = dir.strip_prefix(cache).context("asset outside the cache")?;
        let target = tree.join(rel);
        std::fs::create_dir_all(&target)?;
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            std::fs::hard_link(e.path(), target.join(e.file_name()))
                .or_else(|_| std::fs::copy(e.path(), target.join(e.file_name())).map(|_| ()))?;
        }
    }
    let staging = fsutil::staging_path(&dest);
    let made = rootfs::make_ext4(&tree, &staging, "ferry-assets", 16 << 30, log);
    let _ = std::fs::remove_dir_all(&tree);
    made?;
    fsutil::publish(&staging, &dest)?;
    Ok(dest)
}

/// Boots every host, runs the scripts concurrently, and returns each host's outcome.
pub fn run(prepared: &Prepared, opts: &RunOptions) -> Result<Vec<HostOutcome>> {
    std::fs::create_dir_all(&opts.run_dir)?;
    let hub = hub::Hub::start().context("start the loopback hub")?;
    let log = opts.run_dir.join("harness.log");
    let count = opts.hosts.len();
    let mut children: Vec<(Child, std::thread::JoinHandle<()>)> = Vec::new();
    let mut outcomes = Vec::new();
    let out_lock = Arc::new(Mutex::new(()));
    for (i, spec) in opts.hosts.iter().enumerate() {
        let payload = opts.run_dir.join(format!("{}.payload.ext4", spec.name));
        make_payload(prepared, &spec.script, &payload, &log)?;
        let status_file = opts.run_dir.join(format!("{}.status", spec.name));
        let console = opts.run_dir.join(format!("{}.console.log", spec.name));
        let cmdline = opts.run_dir.join(format!("{}.cmdline", spec.name));
        let mut cmd = qemu_command(prepared, opts, i, count, &payload, &status_file, hub.port);
        std::fs::write(&cmdline, format!("{cmd:?}\n"))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start qemu-system-x86_64")?;
        let reader = pump(
            spec.name.clone(),
            child.stdout.take().unwrap(),
            child.stderr.take().unwrap(),
            &console,
            opts.stream,
            out_lock.clone(),
        )?;
        children.push((child, reader));
        outcomes.push(HostOutcome {
            name: spec.name.clone(),
            status: None,
            timed_out: false,
            console,
            cmdline,
        });
    }
    let deadline = Instant::now() + opts.timeout;
    let mut done = vec![false; count];
    while done.iter().any(|d| !d) {
        for (i, (child, _)) in children.iter_mut().enumerate() {
            if !done[i] && child.try_wait()?.is_some() {
                done[i] = true;
            }
        }
        if Instant::now() > deadline {
            for (i, (child, _)) in children.iter_mut().enumerate() {
                if !done[i] {
                    let _ = child.kill();
                    let _ = child.wait();
                    outcomes[i].timed_out = true;
                    done[i] = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, (_, reader)) in children.into_iter().enumerate() {
        let _ = reader.join();
        let status_file = opts.run_dir.join(format!("{}.status", outcomes[i].name));
        outcomes[i].status = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let _ = std::fs::remove_file(
            opts.run_dir
                .join(format!("{}.payload.ext4", outcomes[i].name)),
        );
    }
    Ok(outcomes)
}

fn qemu_command(
    prepared: &Prepared,
    opts: &RunOptions,
    i: usize,
    count: usize,
    payload: &Path,
    status_file: &Path,
    hub_port: u16,
) -> Command {
    let name = host_name(i);
    let h = &prepared.host;
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "q35", "-accel", "tcg,thread=multi,tb-size=256"])
        .args(["-cpu", CPU_MODEL])
        .args(["-smp", &opts.cpus.to_string(), "-m", &opts.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&h.vmlinuz)
        .arg("-initrd")
        .arg(&h.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable testhost.name={name} testhost.index={} testhost.count={count}",
            i + 1
        ))
        .args(["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"])
        .arg("-chardev")
        .arg(format!("file,id=status,path={}", status_file.display()))
        .args(["-serial", "chardev:status"]);
    // A human monitor beside the logs, to look into a test host that stops
    // making progress (`info registers -a`, `info cpus`); left out where the
    // path is too long for a Unix socket.
    let monitor = status_file.with_extension("monitor");
    if monitor.as_os_str().len() < 100 {
        c.arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    }
    let disks = [
        (&h.root, "testhost-root", true),
        (&prepared.ferry_assets, "ferry-assets", true),
        (&payload.to_path_buf(), "ferry-payload", false),
    ];
    for (n, (file, serial, snapshot)) in disks.iter().enumerate() {
        c.arg("-drive").arg(format!(
            "if=none,id=d{n},file={},format=raw,cache=unsafe{}",
            file.display(),
            if *snapshot { ",snapshot=on" } else { "" }
        ));
        c.arg("-device")
            .arg(format!("virtio-blk-pci,drive=d{n},serial={serial}"));
    }
    c.args(["-netdev", "user,id=wan"])
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=wan,mac=52:54:00:12:00:{:02x}",
            i + 1
        ));
    c.arg("-netdev")
        .arg(format!("socket,id=lan,connect=127.0.0.1:{hub_port}"))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=lan,mac=52:54:00:77:00:{:02x}",
            i + 1
        ));
    c
}

/// Writes the payload disk: ferry's binaries under bin/, the `@ferry/runtime`
/// tarball under node/ and the Python wheel under python/ (the host's init
/// installs both), Garage and `s3-server` under bin/, and the script.
fn make_payload(prepared: &Prepared, script: &Path, dest: &Path, log: &Path) -> Result<()> {
    let tree = fsutil::staging_path(&dest.with_extension("tree"));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::create_dir_all(tree.join("node"))?;
    std::fs::copy(&prepared.node_package, tree.join("node/ferry-runtime.tgz"))
        .context("copy the @ferry/runtime package")?;
    std::fs::create_dir_all(tree.join("python"))?;
    let wheel_name = prepared
        .python_wheel
        .file_name()
        .context("the wheel has no file name")?;
    std::fs::copy(&prepared.python_wheel, tree.join("python").join(wheel_name))
        .context("copy the Python wheel")?;
    std::fs::create_dir_all(tree.join("musl"))?;
    for f in ["hello", "ld-musl-x86_64.so.1"] {
        std::fs::copy(prepared.musl_fixture.join(f), tree.join("musl").join(f))
            .with_context(|| format!("copy the musl fixture's {f}"))?;
    }
    for bin in prepared.binaries.all() {
        std::fs::copy(bin, tree.join("bin").join(bin.file_name().unwrap()))
            .with_context(|| format!("copy {}", bin.display()))?;
    }
    std::fs::copy(&prepared.garage, tree.join("bin/garage")).context("copy garage")?;
    let s3_server = tree.join("bin/s3-server");
    std::fs::write(&s3_server, S3_SERVER)?;
    std::fs::set_permissions(&s3_server, std::fs::Permissions::from_mode(0o755))?;
    let text =
        std::fs::read(script).with_context(|| format!("read script {}", script.display()))?;
    std::fs::write(tree.join("script.sh"), text)?;
    let result = run_logged(
        "mke2fs payload",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "ferry-payload", "-d"])
            .arg(&tree)
            .arg(dest)
            .arg("1G"),
        log,
        |_| {},
    );
    let _ = std::fs::remove_dir_all(&tree);
    Ok(result?)
}

/// Copies a host's console to its log file and (optionally) to stdout, each line
/// prefixed with the host name.
fn pump(
    name: String,
    stdout: impl std::io::Read + Send + 'static,
    stderr: impl std::io::Read + Send + 'static,
    console: &Path,
    stream: bool,
    out_lock: Arc<Mutex<()>>,
) -> Result<std::thread::JoinHandle<()>> {
    let log = Arc::new(Mutex::new(std::fs::File::create(console)?));
    let err_log = log.clone();
    let err_name = name.clone();
    let err_lock = out_lock.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(err_log.lock().unwrap(), "[qemu] {line}");
            if stream {
                let _g = err_lock.lock().unwrap();
                println!("{err_name} ! {line}");
            }
        }
    });
    Ok(std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\r');
            let _ = writeln!(log.lock().unwrap(), "{line}");
            if stream {
                let _g = out_lock.lock().unwrap();
                println!("{name} | {line}");
            }
        }
    }))
}

/// A fresh run directory under `target/testhost/`.
pub fn new_run_dir(label: &str) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    workspace::root()
        .join("target/testhost")
        .join(format!("{stamp}-{}-{label}", std::process::id()))
}

/// Prints where to look after a failed run.
pub fn report_failures(outcomes: &[HostOutcome]) {
    for o in outcomes.iter().filter(|o| !o.ok()) {
        let why = if o.timed_out {
            "timed out".to_string()
        } else {
            match o.status {
                Some(s) => format!("script exited {s}"),
                None => "no exit status (host crashed or script never ran)".into(),
            }
        };
        eprintln!("{}: {why}", o.name);
        eprintln!("  console: {}", o.console.display());
        eprintln!("  command: {}", o.cmdline.display());
    }
}

/// Fails unless every host's script exited 0.
pub fn check(outcomes: &[HostOutcome]) -> Result<()> {
    if outcomes.iter().all(HostOutcome::ok) {
        return Ok(());
    }
    report_failures(outcomes);
    bail!("test host run failed")
}
