//! The body of a VMM process (`ferry vmm-run DIR`): one per VM.
//!
//! It builds the VM from the state directory, records its pid, serves the control
//! socket, and when the VM ends writes `exit.json` and removes its sockets. Errors
//! during start-up are written to `exit.json` with their stable code so the
//! `ferry boot` that spawned this process can report them.

use std::os::unix::net::UnixListener;
use std::path::Path;

use ferry_vmm::{DiskConfig, ExitReason, Vm, VmConfig, VsockConfig};

use crate::vm::control::{self, ControlRequest, ControlResponse};
use crate::vm::record::{self, ExitRecord, PidRecord, VmDir, VmRecord};

/// Guest context id; each VM has its own vsock device, so they need not differ.
const GUEST_CID: u64 = 3;

/// Kernel arguments ferry adds for its own guests: quiet boot, no waiting.
const GUEST_CMDLINE: &str = "quiet loglevel=3 rdinit=/init";

/// Hint for a KVM failure code.
pub fn kvm_hint(code: &str) -> Option<String> {
    match code {
        "KVM_UNAVAILABLE" => Some(
            "load kvm_intel or kvm_amd and make sure you can open /dev/kvm (the kvm group); \
             without usable KVM, run ferry inside a test host: cargo xtask testhost run --script host-a=SCRIPT"
                .into(),
        ),
        "KVM_PVM_UNSUPPORTED" => Some(
            "this host's /dev/kvm is the PVM hypervisor, which cannot run a stock guest kernel; \
             pass a PVM-capable kernel with --kernel, or run ferry inside a test host: \
             cargo xtask testhost run --script host-a=SCRIPT"
                .into(),
        ),
        "KERNEL_LOAD_FAILED" => Some("--kernel must be an uncompressed x86_64 vmlinux (ELF)".into()),
        _ => None,
    }
}

fn fail(dir: &VmDir, code: &str, detail: String) -> ! {
    let _ = record::write_json(
        &dir.exit(),
        &ExitRecord {
            reason: "error".into(),
            detail: Some(detail.clone()),
            code: Some(code.to_string()),
            hint: kvm_hint(code),
            at: record::now(),
        },
    );
    eprintln!("error[{code}]: {detail}");
    std::process::exit(1);
}

/// Runs the VM in `dir` until it ends. Never returns.
pub fn run(dir: &Path) -> ! {
    let dir = VmDir {
        root: dir.to_path_buf(),
    };
    let Some(rec) = record::read_json::<VmRecord>(&dir.record()) else {
        fail(
            &dir,
            "VMM_BAD_STATE",
            format!("cannot read {}", dir.record().display()),
        );
    };
    let config = VmConfig {
        cpus: u8::try_from(rec.cpus).unwrap_or(u8::MAX),
        memory_mib: u64::from(rec.memory_mib),
        kernel: rec.kernel.clone(),
        cmdline_extra: GUEST_CMDLINE.to_string(),
        initramfs: Some(dir.initramfs()),
        disks: vec![DiskConfig {
            path: dir.root_disk(),
            read_only: false,
        }],
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.vsock(),
        }),
        console_log: dir.console(),
        rng: true,
        allow_pvm: false,
    };
    let _ = std::fs::remove_file(dir.vsock());
    let _ = std::fs::remove_file(dir.control());
    let vm = match Vm::create(config) {
        Ok(vm) => vm,
        Err(e) => fail(&dir, e.code(), e.chain()),
    };
    let listener = match UnixListener::bind(dir.control()) {
        Ok(l) => l,
        Err(e) => fail(
            &dir,
            "VMM_CONTROL_SOCKET",
            format!("bind control socket: {e}"),
        ),
    };
    let handle = match vm.start() {
        Ok(h) => h,
        Err(e) => fail(&dir, e.code(), e.chain()),
    };
    match PidRecord::current() {
        Some(pid) => {
            if let Err(e) = record::write_json(&dir.pid(), &pid) {
                handle.stop();
                fail(&dir, "VMM_BAD_STATE", format!("write pid file: {e}"));
            }
        }
        None => fail(
            &dir,
            "VMM_BAD_STATE",
            "cannot read own process start time".into(),
        ),
    }
    let control_handle = handle.clone();
    std::thread::spawn(move || {
        control::serve(listener, move |req| {
            use ferry_vmm::VmStatus as S;
            let state = |h: &ferry_vmm::VmHandle| match h.status() {
                S::Paused | S::Pausing => "paused",
                S::Running => "running",
                S::Stopping | S::Exited(_) => "stopping",
            };
            match req {
                ControlRequest::Status => ControlResponse::state(state(&control_handle)),
                ControlRequest::Pause => match control_handle.pause() {
                    Ok(()) => ControlResponse::state("paused"),
                    Err(e) => ControlResponse::error(e.code(), e.to_string()),
                },
                ControlRequest::Resume => match control_handle.resume() {
                    Ok(()) => ControlResponse::state("running"),
                    Err(e) => ControlResponse::error(e.code(), e.to_string()),
                },
                ControlRequest::Stop => {
                    control_handle.stop();
                    ControlResponse::state("stopping")
                }
            }
        })
    });
    let exit = handle.wait();
    let (reason, detail) = match exit {
        ExitReason::PowerOff => ("poweroff", None),
        ExitReason::Reset => ("shutdown", None),
        ExitReason::Stopped => ("stopped", None),
        ExitReason::Error(e) => ("error", Some(e)),
    };
    let _ = record::write_json(
        &dir.exit(),
        &ExitRecord {
            reason: reason.into(),
            detail,
            code: (reason == "error").then(|| "VMM_RUNTIME_ERROR".to_string()),
            hint: None,
            at: record::now(),
        },
    );
    for f in [dir.control(), dir.vsock(), dir.pid()] {
        let _ = std::fs::remove_file(f);
    }
    std::process::exit(0);
}
