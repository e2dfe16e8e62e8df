//! End-to-end checks on /dev/kvm with tiny hand-assembled 64-bit guests
//! packed as ELF "kernels". They exercise the real boot path (memory, ELF
//! load, long-mode registers, CPUID, MSRs, LAPIC, MP table) and the exit
//! loop, but not Linux. Skipped, with the reason printed, where KVM is
//! unusable.

use std::time::{Duration, Instant};

use ferry_devices::DeviceState;
use ferry_vmm::{ExitReason, Vm, VmStatus};

mod common;
use common::{guest, kvm_ready, wait_for, ENTRY};

/// `mov dx, 0x3f8; mov al, 'O'; out dx, al; mov al, 'K'; out dx, al;
/// mov al, '\n'; out dx, al; hlt; jmp hlt`
const PRINT_OK_AND_HALT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee, 0xf4, 0xeb, 0xfd,
];
/// Offset of the `hlt` in [`PRINT_OK_AND_HALT`].
const HLT_OFFSET: u64 = 13;

/// `mov al, 0xfe; out 0x64, al; hlt; jmp hlt` (i8042 reset).
const I8042_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// `ud2` with an empty IDT: triple fault.
const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

#[test]
fn serial_output_pause_resume_stop() {
    if !kvm_ready() {
        return;
    }
    let g = guest(PRINT_OK_AND_HALT, 2);
    let vm = Vm::create(g.config.clone()).unwrap();
    assert!(vm.cmdline().starts_with("console=ttyS0 reboot=k panic=1"));
    let handle = vm.start().unwrap();
    let text = wait_for(&g.console, Duration::from_secs(60), |t| t.contains("OK\n"));
    assert_eq!(text, "OK\n");
    assert_eq!(handle.status(), VmStatus::Running);

    {
        let paused = handle.paused().unwrap();
        assert_eq!(handle.status(), VmStatus::Paused);
        let bsp = paused.vcpu(0).unwrap();
        let regs = bsp.fd().get_regs().unwrap();
        // Halted on the hlt (RIP past it) or about to run it.
        assert!(
            regs.rip == ENTRY + HLT_OFFSET || regs.rip == ENTRY + HLT_OFFSET + 1,
            "rip {:#x}",
            regs.rip
        );
        let sregs = bsp.fd().get_sregs().unwrap();
        assert_eq!(sregs.efer & 0x500, 0x500, "long mode active");
        drop(bsp);
        let ap = paused.vcpu(1).unwrap();
        assert_eq!(
            ap.fd().get_mp_state().unwrap().mp_state,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            "AP waits for INIT/SIPI"
        );
        drop(ap);
        let states = paused.device_states();
        assert!(matches!(states.first(), Some(DeviceState::Serial(_))));
        assert!(matches!(states.get(1), Some(DeviceState::I8042(_))));
    }
    assert_eq!(handle.status(), VmStatus::Running);

    // Explicit pause/resume as the control socket will use them.
    handle.pause().unwrap();
    handle.pause().unwrap();
    assert_eq!(handle.status(), VmStatus::Paused);
    handle.resume().unwrap();

    handle.stop();
    assert_eq!(handle.wait(), ExitReason::Stopped);
    assert_eq!(handle.status(), VmStatus::Exited(ExitReason::Stopped));
    assert!(handle.pause().is_err());
}

#[test]
fn i8042_reset_ends_the_vm() {
    if !kvm_ready() {
        return;
    }
    // The reset comes in the guest's first instructions, often before
    // start() has returned: the race a missed kick once lost. Many rounds.
    for _ in 0..50 {
        let g = guest(I8042_RESET, 1);
        let handle = Vm::create(g.config.clone()).unwrap().start().unwrap();
        assert_eq!(exit_within(&handle, "reset"), ExitReason::Reset);
    }
}

#[test]
fn triple_fault_ends_the_vm() {
    if !kvm_ready() {
        return;
    }
    let g = guest(TRIPLE_FAULT, 1);
    let handle = Vm::create(g.config.clone()).unwrap().start().unwrap();
    assert_eq!(exit_within(&handle, "triple-fault"), ExitReason::Reset);
}

/// Waits up to 60 s for the VM to end by itself; stops it and fails if not.
fn exit_within(handle: &ferry_vmm::VmHandle, what: &str) -> ExitReason {
    let start = Instant::now();
    while !matches!(handle.status(), VmStatus::Exited(_)) {
        if start.elapsed() > Duration::from_secs(60) {
            handle.stop();
            panic!("guest did not {what} in time");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    handle.wait()
}

#[test]
fn pvm_host_is_refused_without_override() {
    if !ferry_vmm::host_is_pvm() {
        eprintln!("skipping: host KVM is not PVM");
        return;
    }
    let mut g = guest(PRINT_OK_AND_HALT, 1);
    g.config.allow_pvm = false;
    let err = Vm::create(g.config.clone()).err().expect("PVM refused");
    assert_eq!(err.code(), "KVM_PVM_UNSUPPORTED");
    assert!(err.to_string().contains("PVM hypervisor"));
    assert!(!g.console.exists(), "nothing set up before the check");
}

#[test]
fn bad_kernel_reports_code() {
    if !kvm_ready() {
        return;
    }
    let g = guest(PRINT_OK_AND_HALT, 1);
    let mut config = g.config.clone();
    config.kernel = g.console.with_file_name("missing-kernel");
    let err = Vm::create(config).err().expect("missing kernel");
    assert_eq!(err.code(), "KERNEL_LOAD_FAILED");
}

#[test]
fn virtio_devices_are_wired() {
    use ferry_devices::virtio::VirtioDeviceState;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    if !kvm_ready() {
        return;
    }
    let mut g = guest(PRINT_OK_AND_HALT, 1);
    let dir = g.console.parent().unwrap().to_path_buf();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.join("vsock.sock");
    g.config.disks.push(ferry_vmm::DiskConfig {
        path: disk,
        read_only: true,
    });
    g.config.vsock = Some(ferry_vmm::VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    });
    g.config.rng = true;
    g.config.cmdline_extra = "quiet".into();

    let vm = Vm::create(g.config.clone()).unwrap();
    assert!(vm.cmdline().ends_with(
        "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
         virtio_mmio.device=4K@0xd0002000:7 quiet"
    ));
    let handle = vm.start().unwrap();
    assert_eq!(
        wait_for(&g.console, Duration::from_secs(60), |t| t.contains("OK\n")),
        "OK\n"
    );

    // The event loop serves the vsock socket while the guest runs.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();

    let states = handle.paused().unwrap().device_states();
    let virtio: Vec<&VirtioDeviceState> = states
        .iter()
        .filter_map(|s| match s {
            DeviceState::VirtioMmio(t) => Some(&t.device),
            _ => None,
        })
        .collect();
    assert!(
        matches!(virtio[..], [VirtioDeviceState::Block(b), VirtioDeviceState::Vsock(v), VirtioDeviceState::Rng(_)]
        if b.read_only && b.capacity_sectors == 2048 && v.guest_cid == 3)
    );

    // The guest driver never came up, so the event waits in the device.
    assert!(handle.vsock_transport_reset().unwrap());
    let states = handle.paused().unwrap().device_states();
    assert!(states.iter().any(|s| matches!(s,
        DeviceState::VirtioMmio(t) if matches!(&t.device, VirtioDeviceState::Vsock(v) if v.reset_pending))));

    handle.stop();
    assert_eq!(handle.wait(), ExitReason::Stopped);
    drop(handle);
    assert!(!uds.exists(), "vsock socket removed with the VM");
}
