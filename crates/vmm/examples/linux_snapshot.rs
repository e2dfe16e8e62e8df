//! Proof on a real Linux guest: boot it, snapshot it while a program runs,
//! restore it into a new VM from lazily mapped memory, then fork the
//! restored VM and check that every copy keeps running the same program.
//!
//! ```text
//! linux_snapshot <vmlinux>
//! ```
//!
//! The guest program is this binary itself (built statically), packed as
//! `/init` of an initramfs: as PID 1 it keeps a heap array, an open file and
//! a monotonic timer, and prints one `tick N ...` line every 200 ms after
//! checking that the heap and the file still hold what it wrote. The host
//! side checks that the tick numbers continue across restore and fork.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_vmm::snapshot::{Extent, MemorySource, VmState};
use ferry_vmm::{DiskConfig, Paused, Vm, VmConfig, VmHandle, VsockConfig};

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        guest_init();
    }
    let kernel = std::env::args()
        .nth(1)
        .expect("usage: linux_snapshot <vmlinux>");
    if let Err(e) = host(Path::new(&kernel)) {
        eprintln!("FAIL: {e}");
        std::process::exit(1);
    }
    println!("PASS");
}

/// The guest workload, run as PID 1.
fn guest_init() -> ! {
    let start = Instant::now();
    let mut heap: Vec<u64> = (0..1_000_000).collect();
    let mut file = File::create("/ticks.log").expect("create /ticks.log");
    let mut written = 0u64;
    for tick in 1u64.. {
        let i = (tick as usize * 7919) % heap.len();
        heap[i] += 1_000_000;
        let sum: u64 = heap.iter().sum();
        let expect = (heap.len() as u64 - 1) * heap.len() as u64 / 2 + tick * 1_000_000;
        let line = format!("tick {tick}\n");
        file.write_all(line.as_bytes()).expect("write");
        written += line.len() as u64;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let ok = sum == expect && len == written;
        println!(
            "tick {tick} t={:.1}s heap={} file={}",
            start.elapsed().as_secs_f64(),
            if sum == expect { "ok" } else { "BAD" },
            if len == written { "ok" } else { "BAD" },
        );
        if !ok {
            println!("GUEST STATE CORRUPTED");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    unreachable!()
}

/// A newc cpio archive with /dev/console and this binary as /init.
fn write_initramfs(path: &Path) -> std::io::Result<()> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let me = std::fs::read(std::env::current_exe()?)?;
    let mut out = Vec::new();
    entry(&mut out, 1, "dev", 0o040755, (0, 0), &[]);
    entry(&mut out, 2, "dev/console", 0o020600, (5, 1), &[]);
    entry(&mut out, 3, "init", 0o100755, (0, 0), &me);
    entry(&mut out, 4, "TRAILER!!!", 0, (0, 0), &[]);
    std::fs::write(path, out)
}

/// Tick numbers printed on a console log.
fn ticks(console: &Path) -> Vec<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.split(' ').next()?.parse().ok())
        .collect()
}

fn wait_ticks(console: &Path, at_least: u64, timeout: Duration) -> Result<Vec<u64>, String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains("CORRUPTED") || text.contains("Kernel panic") {
            return Err(format!("guest failed:\n{text}"));
        }
        let t = ticks(console);
        if t.last().is_some_and(|&l| l >= at_least) {
            return Ok(t);
        }
        if start.elapsed() > timeout {
            let tail: String = text
                .chars()
                .rev()
                .take(3000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(format!(
                "no tick {at_least} within {timeout:?}; console tail:\n{tail}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks ticks on `console` start right after `last_before` and count up.
fn check_continues(console: &Path, last_before: u64, what: &str) -> Result<(), String> {
    let t = wait_ticks(console, last_before + 10, Duration::from_secs(180))?;
    let first = t[0];
    if first != last_before + 1 && first != last_before {
        return Err(format!(
            "{what}: first tick {first}, expected {}",
            last_before + 1
        ));
    }
    if t.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(format!("{what}: ticks not consecutive: {t:?}"));
    }
    println!(
        "{what}: continued at tick {first} (saved at {last_before}), now at {}",
        t.last().unwrap()
    );
    Ok(())
}

fn config(dir: &Path, kernel: &Path, initramfs: &Path, disk: &Path, name: &str) -> VmConfig {
    let mut c = VmConfig::new(kernel, dir.join(format!("{name}.console")));
    c.cpus = 2;
    c.memory_mib = 256;
    c.initramfs = Some(initramfs.to_path_buf());
    c.cmdline_extra = "quiet".into();
    c.disks = vec![DiskConfig {
        path: disk.to_path_buf(),
        read_only: true,
    }];
    c.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.join(format!("{name}.vsock")),
    });
    c.rng = true;
    c
}

/// Captures the paused VM and writes its non-zero memory to `mem`.
fn snapshot(paused: &mut Paused, mem: &File) -> Result<(VmState, Vec<Extent>), String> {
    let t0 = Instant::now();
    let state = paused.capture().map_err(|e| format!("capture: {e}"))?;
    let ranges = paused
        .resident_or_nonzero_ranges()
        .map_err(|e| e.to_string())?;
    let slices = paused.memory_slices();
    let mut extents = Vec::new();
    let mut offset = 0;
    for (addr, len) in ranges {
        let (base, bytes) = slices
            .iter()
            .find(|(b, s)| addr >= *b && addr + len <= b + s.len() as u64)
            .ok_or("range outside RAM")?;
        let start = (addr - base) as usize;
        mem.write_all_at(&bytes[start..start + len as usize], offset)
            .map_err(|e| e.to_string())?;
        extents.push(Extent {
            guest_addr: addr,
            len,
            file_offset: offset,
        });
        offset += len;
    }
    let msrs = state.vcpus[0].msrs.len();
    println!(
        "snapshot: {} vCPUs, {msrs} MSRs each, XSAVE {} bytes, {} of {} MiB memory written in {} extents, took {:?}",
        state.vcpu_count(),
        state.vcpus[0].xsave_size(),
        offset >> 20,
        state.memory_bytes() >> 20,
        extents.len(),
        t0.elapsed()
    );
    Ok((state, extents))
}

fn last_tick(console: &Path) -> u64 {
    ticks(console).last().copied().unwrap_or(0)
}

fn stop(h: VmHandle) {
    h.stop();
    h.wait();
}

static STAGE: std::sync::Mutex<(&str, Option<Instant>)> = std::sync::Mutex::new(("start", None));

fn stage(name: &'static str) {
    *STAGE.lock().unwrap() = (name, Some(Instant::now()));
}

/// Prints what every thread is blocked in when a stage takes too long.
fn watchdog() {
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_secs(20));
        let (name, since) = *STAGE.lock().unwrap();
        if since.is_some_and(|t| t.elapsed() > Duration::from_secs(20)) {
            eprintln!(
                "watchdog: stage {name:?} running for {:?}",
                since.unwrap().elapsed()
            );
            for task in std::fs::read_dir("/proc/self/task")
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = task.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                eprintln!(
                    "  task {:?} {} wchan={} syscall={}\n{}",
                    task.file_name(),
                    read("comm").trim(),
                    read("wchan"),
                    read("syscall").trim(),
                    read("stack")
                );
            }
        }
    });
}

fn host(kernel: &Path) -> Result<(), String> {
    watchdog();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = dir.path();
    let initramfs = dir.join("initramfs.cpio");
    write_initramfs(&initramfs).map_err(|e| e.to_string())?;
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
    let cfg = |name| config(dir, kernel, &initramfs, &disk, name);

    stage("boot");
    // 1. Boot and let the program run.
    let boot = cfg("boot");
    let source = Vm::create(boot.clone())
        .map_err(|e| e.chain())?
        .start()
        .map_err(|e| e.chain())?;
    wait_ticks(&boot.console_log, 5, Duration::from_secs(300))?;

    stage("snapshot");
    // 2. Snapshot: state + memory file; the source stops.
    let mem = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut paused = source.paused().map_err(|e| e.to_string())?;
    let (state, extents) = snapshot(&mut paused, &mem)?;
    let saved_tick = last_tick(&boot.console_log);
    println!("paused for {:?}", paused.paused_for());
    paused.keep_paused();
    stage("stop source");
    stop(source);
    stage("serde");
    let json = serde_json::to_string(&state).map_err(|e| e.to_string())?;
    println!("state: {} bytes of JSON", json.len());
    let state: VmState = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    stage("cpu check");
    if let Err(missing) = ferry_vmm::check_cpu_compatible(&state) {
        return Err(format!("CPU check failed on the same host: {missing:?}"));
    }

    stage("restore");
    // 3. Restore into a new VM, memory mapped lazily.
    let restored_cfg = cfg("restored");
    let t0 = Instant::now();
    std::env::set_var(ferry_vmm::vm::RESTORE_STATS_ENV, "1");
    let vm = Vm::restore(
        restored_cfg.clone(),
        &state,
        MemorySource::Extents { file: mem, extents },
    )
    .map_err(|e| format!("{}: {}", e.code(), e.chain()))?;
    println!("restore: {:?} in {:?}", vm.restore_stats(), t0.elapsed());
    if vm.restore_stats().and_then(|s| s.eager_bytes_read) != Some(0) {
        return Err("memory was read eagerly".into());
    }
    stage("run restored");
    let restored = vm.start().map_err(|e| e.chain())?;
    check_continues(&restored_cfg.console_log, saved_tick, "restored VM")?;

    stage("fork");
    // 4. Fork the restored VM: its dirty pages go to a new layer.
    let paused = restored.paused().map_err(|e| e.to_string())?;
    let fork_state = paused.capture().map_err(|e| e.to_string())?;
    let layers = paused.freeze_for_fork().map_err(|e| e.to_string())?;
    let fork_tick = last_tick(&restored_cfg.console_log);
    println!(
        "fork: {} layers, {:?}, source paused {:?}",
        layers.layers().len(),
        layers.freeze_stats(),
        paused.paused_for()
    );
    drop(paused);
    stage("run child");
    let child_cfg = cfg("child");
    let child = Vm::restore(child_cfg.clone(), &fork_state, MemorySource::Layers(layers))
        .map_err(|e| format!("{}: {}", e.code(), e.chain()))?
        .start()
        .map_err(|e| e.chain())?;
    check_continues(&child_cfg.console_log, fork_tick, "forked child")?;
    let parent_now = wait_ticks(
        &restored_cfg.console_log,
        fork_tick + 10,
        Duration::from_secs(120),
    )?;
    println!(
        "fork parent kept running: tick {}",
        parent_now.last().unwrap()
    );
    stop(child);
    stop(restored);
    Ok(())
}
