//! A vCPU's thread: KVM_RUN, dispatch of its exits to the buses, and the
//! run-control checkpoints between runs.

use std::sync::{Arc, PoisonError};

use ferry_devices::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::control::{ExitReason, VmCore};

enum Step {
    Continue,
    Exit(ExitReason),
    /// KVM_EXIT_INTERNAL_ERROR: details are read from kvm_run afterwards.
    InternalError,
}

fn handle_exit(exit: VcpuExit, pio: &Bus, mmio: &Bus) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                // Nothing there: the bus floats high.
                data.fill(0xff);
            }
            Step::Continue
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                tracing::debug!("unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                tracing::debug!("unhandled MMIO write at {addr:#x}");
            }
            Step::Continue
        }
        // With the in-kernel LAPIC, HLT only exits here when nothing can
        // wake the vCPU again.
        VcpuExit::Hlt => Step::Exit(ExitReason::PowerOff),
        VcpuExit::Shutdown => Step::Exit(ExitReason::Reset),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => Step::Exit(ExitReason::PowerOff),
            KVM_SYSTEM_EVENT_RESET => Step::Exit(ExitReason::Reset),
            KVM_SYSTEM_EVENT_CRASH => Step::Exit(ExitReason::Error("guest crashed".into())),
            other => Step::Exit(ExitReason::Error(format!("unknown system event {other}"))),
        },
        VcpuExit::FailEntry(reason, cpu) => Step::Exit(ExitReason::Error(format!(
            "KVM entry failed: hardware reason {reason:#x} on CPU {cpu}"
        ))),
        VcpuExit::InternalError => Step::InternalError,
        VcpuExit::Intr => Step::Continue,
        other => Step::Exit(ExitReason::Error(format!("unexpected vCPU exit {other:?}"))),
    }
}

/// Describes a KVM_EXIT_INTERNAL_ERROR from the kvm_run area.
fn internal_error_detail(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: only called right after KVM_RUN reported
    // KVM_EXIT_INTERNAL_ERROR, for which `internal` is the union member KVM
    // filled in; the struct is plain integers.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    format!(
        "suberror {}, data {:x?}",
        internal.suberror,
        &internal.data[..n]
    )
}

/// " at rip 0x..." for error messages, if the registers can be read.
fn rip_suffix(fd: &VcpuFd) -> String {
    fd.get_regs()
        .map(|r| format!(" at rip {:#x}", r.rip))
        .unwrap_or_default()
}

/// Body of a vCPU thread.
pub(crate) fn run_vcpu(core: Arc<VmCore>, index: usize, pio: Arc<Bus>, mmio: Arc<Bus>) {
    let vcpu = Arc::clone(&core.vcpus[index]);
    {
        let mut v = vcpu.lock().unwrap_or_else(PoisonError::into_inner);
        crate::vcpu::arm_kick(&mut v);
    }
    let shared = &core.shared;
    let _done = shared.thread_guard();
    'outer: while shared.checkpoint() {
        let mut v = vcpu.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // Reset before checking the target: a kick after the check sets
            // it again and makes KVM_RUN return at once.
            v.fd_mut().set_kvm_immediate_exit(0);
            if shared.target() != crate::control::Target::Run {
                break;
            }
            match v.fd_mut().run() {
                Ok(exit) => match handle_exit(exit, &pio, &mmio) {
                    Step::Continue => {}
                    Step::Exit(reason) => {
                        let reason = match reason {
                            ExitReason::Error(msg) => ExitReason::Error(format!(
                                "vCPU {index}: {msg}{}",
                                rip_suffix(v.fd())
                            )),
                            other => other,
                        };
                        tracing::debug!("vCPU {index}: {reason:?}");
                        shared.request_exit(reason);
                        break 'outer;
                    }
                    Step::InternalError => {
                        let detail = internal_error_detail(v.fd_mut());
                        shared.request_exit(ExitReason::Error(format!(
                            "vCPU {index}: KVM internal error ({detail}){}",
                            rip_suffix(v.fd())
                        )));
                        break 'outer;
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    shared.request_exit(ExitReason::Error(format!(
                        "vCPU {index}: KVM_RUN failed: {e}"
                    )));
                    break 'outer;
                }
            }
        }
    }
    crate::vcpu::disarm_kick();
}
