//! Snapshot, restore and fork on /dev/kvm with a tiny guest that counts.
//!
//! The guest keeps a counter in memory at 0x200000 and a copy in r12; each
//! round it increments both, checks they agree (printing `X` and halting if
//! not) and prints the counter as 8 hex digits on the serial port, then
//! spins a while. A restored or forked guest that continues the sequence
//! had its memory and registers carried over exactly. (SSE is left out:
//! the PVM hypervisor of some test machines cannot run it in these guests.)

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::{guest, kvm_ready, wait_for};
use ferry_vmm::snapshot::{Extent, MemoryLayers, MemoryLayersDesc, MemorySource, VmState};
use ferry_vmm::{ExitReason, Vm, VmConfig, VmHandle};
use vm_memory::{Bytes, GuestAddress};

/// See the module docs (assembled from a 35-line listing).
const COUNTER_GUEST: &[u8] = &[
    0xbf, 0x00, 0x00, 0x20, 0x00, 0x45, 0x31, 0xe4, 0x48, 0xff, 0x07, 0x49, 0xff, 0xc4, 0x4c, 0x3b,
    0x27, 0x75, 0x34, 0x48, 0x8b, 0x07, 0xb9, 0x08, 0x00, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xc1,
    0xc0, 0x04, 0x89, 0xc3, 0x83, 0xe3, 0x0f, 0x83, 0xc3, 0x30, 0x83, 0xfb, 0x39, 0x76, 0x03, 0x83,
    0xc3, 0x07, 0x93, 0xee, 0x93, 0xff, 0xc9, 0x75, 0xe6, 0xb0, 0x0a, 0xee, 0xb9, 0x00, 0x20, 0x00,
    0x00, 0xff, 0xc9, 0x75, 0xfc, 0xeb, 0xc1, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x58, 0xee, 0xf4, 0xeb,
    0xfd,
];
const COUNTER_ADDR: u64 = 0x20_0000;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Counter values printed so far (complete lines of 8 hex digits). A
/// restored guest may have been saved in the middle of printing a line: the
/// first line of its console is then the rest of that line, and is skipped.
fn counts(text: &str) -> Vec<u64> {
    assert!(!text.contains('X'), "guest state diverged: {text:?}");
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .enumerate()
        .filter(|(i, l)| *i > 0 || l.trim().len() == 8)
        .map(|(_, l)| u64::from_str_radix(l.trim(), 16).expect("hex line"))
        .collect()
}

fn wait_counts(console: &Path, n: usize) -> Vec<u64> {
    let text = wait_for(console, TIMEOUT, |t| {
        t.contains('X') || counts(t).len() >= n
    });
    let c = counts(&text);
    assert!(c.len() >= n, "only {} lines: {text:?}", c.len());
    c
}

/// Checks the lines count up by one from `from` (or `from + 1` if the
/// guest was saved between incrementing and printing).
fn assert_continues(c: &[u64], from: u64) {
    assert!(
        c[0] == from || c[0] == from + 1,
        "first value {:#x} does not continue {from:#x}",
        c[0]
    );
    for w in c.windows(2) {
        assert_eq!(w[1], w[0] + 1, "consecutive values: {c:x?}");
    }
}

fn counter(handle: &VmHandle) -> (VmState, u64, ferry_vmm::Paused) {
    let paused = handle.paused().unwrap();
    let state = paused.capture().unwrap();
    let c: u64 = paused
        .memory()
        .read_obj(GuestAddress(COUNTER_ADDR))
        .unwrap();
    (state, c, paused)
}

fn with_console(config: &VmConfig, console: &Path) -> VmConfig {
    let mut c = config.clone();
    c.console_log = console.to_path_buf();
    c
}

/// Writes the possibly non-zero memory of a paused VM into `file`, as a
/// bundle writer would; returns the extents.
fn write_memory(paused: &mut ferry_vmm::Paused, file: &File) -> Vec<Extent> {
    let ranges = paused.resident_or_nonzero_ranges().unwrap();
    let slices = paused.memory_slices();
    let mut extents = Vec::new();
    let mut offset = 0;
    for (addr, len) in ranges {
        let (base, bytes) = slices
            .iter()
            .find(|(b, s)| addr >= *b && addr + len <= b + s.len() as u64)
            .unwrap();
        let start = (addr - base) as usize;
        file.write_all_at(&bytes[start..start + len as usize], offset)
            .unwrap();
        extents.push(Extent {
            guest_addr: addr,
            len,
            file_offset: offset,
        });
        offset += len;
    }
    extents
}

#[test]
fn snapshot_restore_continues_counting() {
    if !kvm_ready() {
        return;
    }
    let g = guest(COUNTER_GUEST, 2);
    let handle = Vm::create(g.config.clone()).unwrap().start().unwrap();
    let before = wait_counts(&g.console, 5);
    assert_continues(&before, 1);

    let (state, c0, mut paused) = counter(&handle);
    assert_eq!(state.vcpu_count(), 2);
    assert!(state.vcpus[0].msr(0x10).is_some(), "IA32_TSC saved");
    assert!(state.vcpus[0].xsave_size() >= 4096 || state.vcpus[0].xsave_size() == 0);
    let mem_file = tempfile::tempfile().unwrap();
    let extents = write_memory(&mut paused, &mem_file);
    let saved_bytes: u64 = extents.iter().map(|e| e.len).sum();
    assert!(
        saved_bytes < 8 << 20,
        "only touched memory is saved ({saved_bytes} of 64 MiB)"
    );
    paused.keep_paused();
    handle.stop();
    assert_eq!(handle.wait(), ExitReason::Stopped);

    // Through JSON, as a bundle would store it.
    let json = serde_json::to_string(&state).unwrap();
    let state: VmState = serde_json::from_str(&json).unwrap();

    let console = g.dir.path().join("restored.log");
    std::env::set_var(ferry_vmm::vm::RESTORE_STATS_ENV, "1");
    let vm = Vm::restore(
        with_console(&g.config, &console),
        &state,
        MemorySource::Extents {
            file: mem_file,
            extents,
        },
    )
    .unwrap();
    let stats = vm.restore_stats().unwrap();
    assert_eq!(stats.eager_bytes_read, Some(0), "memory is mapped lazily");
    assert_eq!(stats.mapped_bytes, saved_bytes);
    let handle = vm.start().unwrap();
    let after = wait_counts(&console, 5);
    assert_continues(&after, c0);
    handle.stop();
    assert_eq!(handle.wait(), ExitReason::Stopped);
}

#[test]
fn fork_in_process_diverges() {
    if !kvm_ready() {
        return;
    }
    let g = guest(COUNTER_GUEST, 1);
    let source = Vm::create(g.config.clone()).unwrap().start().unwrap();
    wait_counts(&g.console, 3);

    let (state, c0, paused) = counter(&source);
    let layers = paused.freeze_for_fork().unwrap();
    assert_eq!(layers.freeze_stats().unwrap().copied_bytes, 0);
    assert!(paused.memory_file().is_none(), "memory is private now");
    drop(paused);
    assert!(source.last_pause_duration().unwrap() < Duration::from_secs(5));

    let child_console = g.dir.path().join("child.log");
    let child = Vm::restore(
        with_console(&g.config, &child_console),
        &state,
        MemorySource::Layers(layers),
    )
    .unwrap()
    .start()
    .unwrap();
    assert_continues(&wait_counts(&child_console, 5), c0);
    // The source kept counting on its own.
    let src_lines = wait_counts(
        &g.console,
        counts(&std::fs::read_to_string(&g.console).unwrap()).len() + 3,
    );
    assert!(*src_lines.last().unwrap() > c0 + 1);

    // A second fork of the source copies only its dirty pages.
    let (state2, c1, paused) = counter(&source);
    assert!(c1 > c0);
    let layers2 = paused.freeze_for_fork().unwrap();
    let stats = layers2.freeze_stats().unwrap();
    assert_eq!(layers2.layers().len(), 2);
    assert!(
        stats.copied_bytes > 0 && stats.copied_bytes < 4 << 20,
        "{stats:?}"
    );
    drop(paused);
    let gc_console = g.dir.path().join("grandchild.log");
    let grandchild = Vm::restore(
        with_console(&g.config, &gc_console),
        &state2,
        MemorySource::Layers(layers2),
    )
    .unwrap()
    .start()
    .unwrap();
    assert_continues(&wait_counts(&gc_console, 5), c1);

    // The child is unaffected by the source's second freeze.
    let child_lines = wait_counts(&child_console, 8);
    assert_continues(&child_lines, c0);
    for h in [source, child, grandchild] {
        h.stop();
        assert_eq!(h.wait(), ExitReason::Stopped);
    }
}

const CHILD_ENV: &str = "FERRY_TEST_FORK_CHILD";

/// The child half of `fork_across_processes`; does nothing unless that
/// test runs this binary with its environment.
#[test]
#[ignore = "run by fork_across_processes in a child process"]
fn fork_child_process_entry() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let state: VmState = serde_json::from_str(&read("state.json")).unwrap();
    let desc: MemoryLayersDesc = serde_json::from_str(&read("layers.json")).unwrap();
    let config: VmConfig = serde_json::from_str(&read("config.json")).unwrap();
    let c0: u64 = read("counter").trim().parse().unwrap();
    // SAFETY: the parent passed these descriptors to this process only.
    let layers = unsafe { MemoryLayers::from_inherited(&desc) }.unwrap();
    let handle = Vm::restore(config.clone(), &state, MemorySource::Layers(layers))
        .unwrap()
        .start()
        .unwrap();
    assert_continues(&wait_counts(&config.console_log, 5), c0);
    handle.stop();
    assert_eq!(handle.wait(), ExitReason::Stopped);
}

#[test]
fn fork_across_processes() {
    if !kvm_ready() {
        return;
    }
    let g = guest(COUNTER_GUEST, 1);
    let source = Vm::create(g.config.clone()).unwrap().start().unwrap();
    wait_counts(&g.console, 3);
    let (state, c0, paused) = counter(&source);
    let layers = paused.freeze_for_fork().unwrap();
    drop(paused);

    let (fds, desc) = layers.to_inheritable().unwrap();
    let dir = g.dir.path().join("child");
    std::fs::create_dir(&dir).unwrap();
    let child_console = dir.join("console.log");
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write("state.json", serde_json::to_string(&state).unwrap());
    write("layers.json", serde_json::to_string(&desc).unwrap());
    write(
        "config.json",
        serde_json::to_string(&with_console(&g.config, &child_console)).unwrap(),
    );
    write("counter", c0.to_string());
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "fork_child_process_entry",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, &dir)
        .status()
        .unwrap();
    drop(fds);
    assert!(status.success(), "child failed: {status}");
    let child = counts(&std::fs::read_to_string(&child_console).unwrap());
    assert!(child.len() >= 5, "child ran: {child:x?}");
    assert_continues(&child, c0);
    source.stop();
    assert_eq!(source.wait(), ExitReason::Stopped);
    // The source still owns its layers; the duplicates were closed.
    assert_eq!(layers.describe().layers.len(), 1);
}

#[test]
fn restore_rejects_inconsistent_state() {
    if !kvm_ready() {
        return;
    }
    let g = guest(COUNTER_GUEST, 1);
    let handle = Vm::create(g.config.clone()).unwrap().start().unwrap();
    wait_counts(&g.console, 2);
    let (state, _, paused) = counter(&handle);
    drop(paused);
    handle.stop();
    handle.wait();

    let page = 4096;
    let file = || {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * page).unwrap();
        f
    };
    let ok_extents = vec![Extent {
        guest_addr: 0,
        len: page,
        file_offset: 0,
    }];
    let restore = |config: VmConfig, state: &VmState, extents: Vec<Extent>| {
        Vm::restore(
            config,
            state,
            MemorySource::Extents {
                file: file(),
                extents,
            },
        )
        .err()
        .expect("restore refused")
        .code()
    };
    let cfg = |f: &dyn Fn(&mut VmConfig)| {
        let mut c = with_console(&g.config, &g.dir.path().join("r.log"));
        f(&mut c);
        c
    };

    assert_eq!(
        restore(cfg(&|c| c.cpus = 2), &state, ok_extents.clone()),
        "RESTORE_STATE_INVALID"
    );
    assert_eq!(
        restore(cfg(&|c| c.memory_mib = 128), &state, ok_extents.clone()),
        "RESTORE_STATE_INVALID"
    );
    assert_eq!(
        restore(cfg(&|c| c.rng = true), &state, ok_extents.clone()),
        "RESTORE_STATE_INVALID"
    );
    let mut bad = state.clone();
    bad.vcpus[0].regs.0.truncate(10);
    assert_eq!(
        restore(cfg(&|_| {}), &bad, ok_extents.clone()),
        "RESTORE_STATE_INVALID"
    );
    let mut bad = state.clone();
    bad.format += 1;
    assert_eq!(
        restore(cfg(&|_| {}), &bad, ok_extents.clone()),
        "RESTORE_STATE_INVALID"
    );
    let mut bad = state.clone();
    bad.vcpus[0].cpuid[0].ebx ^= 1; // another vendor string
    assert_eq!(
        restore(cfg(&|_| {}), &bad, ok_extents.clone()),
        "SNAPSHOT_CPU_INCOMPATIBLE"
    );

    let ext = |guest_addr, len, file_offset| Extent {
        guest_addr,
        len,
        file_offset,
    };
    for extents in [
        vec![ext(64 << 20, page, 0)],                  // past guest RAM
        vec![ext(0, page, 0), ext(0, 2 * page, page)], // overlapping
        vec![ext(0, page, 8 * page)],                  // past the file
        vec![ext(100, page, 0)],                       // unaligned
    ] {
        assert_eq!(
            restore(cfg(&|_| {}), &state, extents),
            "RESTORE_MEMORY_INVALID"
        );
    }
    // Garbage instead of a state does not deserialize.
    assert!(serde_json::from_str::<VmState>("{\"format\":1}").is_err());

    // The untouched state still restores.
    let vm = Vm::restore(
        cfg(&|_| {}),
        &state,
        MemorySource::Extents {
            file: file(),
            extents: ok_extents,
        },
    )
    .unwrap();
    drop(vm);
}

#[test]
fn restore_resets_vsock_and_disks_can_be_swapped() {
    use ferry_devices::virtio::VirtioDeviceState;
    use ferry_devices::DeviceState;

    if !kvm_ready() {
        return;
    }
    let mut g = guest(COUNTER_GUEST, 1);
    let dir = g.dir.path().to_path_buf();
    let disk = |name: &str, size: usize| {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; size]).unwrap();
        p
    };
    g.config.disks.push(ferry_vmm::DiskConfig {
        path: disk("a.img", 1 << 20),
        read_only: false,
    });
    g.config.vsock = Some(ferry_vmm::VsockConfig {
        guest_cid: 3,
        uds_path: dir.join("a.sock"),
    });
    let handle = Vm::create(g.config.clone()).unwrap().start().unwrap();
    wait_counts(&g.console, 2);
    let (state, c0, paused) = counter(&handle);
    let vsock_pending = |s: &VmState| {
        s.devices.iter().any(|d| {
            matches!(d, DeviceState::VirtioMmio(t)
                if matches!(&t.device, VirtioDeviceState::Vsock(v) if v.reset_pending))
        })
    };
    assert!(!vsock_pending(&state));

    // Disk swap: same size works, another size or index does not.
    paused.replace_disk(0, &disk("b.img", 1 << 20)).unwrap();
    let err = paused.replace_disk(0, &disk("c.img", 4096)).unwrap_err();
    assert_eq!(err.code(), "SNAPSHOT_DISK_REPLACE_FAILED");
    assert!(err.to_string().contains("sectors"), "{err}");
    let err = paused.replace_disk(1, &dir.join("b.img")).unwrap_err();
    assert!(err.to_string().contains("1 disks"), "{err}");
    let layers = paused.freeze_for_fork().unwrap();
    drop(paused);

    let mut cfg = with_console(&g.config, &dir.join("child.log"));
    cfg.disks[0].path = disk("child.img", 1 << 20);
    cfg.vsock.as_mut().unwrap().uds_path = dir.join("child.sock");
    let child = Vm::restore(cfg.clone(), &state, MemorySource::Layers(layers))
        .unwrap()
        .start()
        .unwrap();
    assert_continues(&wait_counts(&cfg.console_log, 3), c0);
    // The guest has no vsock driver, so the reset waits in the device.
    let after = child.paused().unwrap().capture().unwrap();
    assert!(vsock_pending(&after), "restore queued a TRANSPORT_RESET");
    for h in [handle, child] {
        h.stop();
        assert_eq!(h.wait(), ExitReason::Stopped);
    }
}
