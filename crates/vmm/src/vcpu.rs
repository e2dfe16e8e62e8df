//! vCPU creation, configuration and the KVM_RUN loop.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Once, PoisonError};

use ferry_devices::Bus;
use kvm_bindings::{
    kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::cpuid::vcpu_cpuid;
use crate::arch::regs::{self, RegsError};
use crate::control::{ExitReason, VmCore};

/// Errors of vCPU setup.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU")]
    Create(#[source] kvm_ioctls::Error),
    /// The CPUID table could not be built.
    #[error("cannot build the CPUID table")]
    CpuidTable,
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2 failed")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// Register, MSR, FPU or LAPIC setup failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// KVM_SET_MP_STATE failed.
    #[error("KVM_SET_MP_STATE failed")]
    MpState(#[source] kvm_ioctls::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// One virtual CPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    /// The CPUID table set with KVM_SET_CPUID2 (what the guest sees).
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

impl Vcpu {
    /// Creates vCPU `index` (also its APIC id).
    pub(crate) fn create(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(VcpuError::Create)?;
        Ok(Self {
            index,
            fd,
            cpuid: Vec::new(),
        })
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; the boot vCPU also gets long-mode
    /// registers at `boot_entry`, the others wait for INIT/SIPI.
    pub(crate) fn configure(
        &mut self,
        supported: &CpuId,
        n_vcpus: u8,
        boot_entry: Option<u64>,
    ) -> Result<(), VcpuError> {
        let entries = vcpu_cpuid(supported.as_slice(), self.index, n_vcpus);
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::CpuidTable)?;
        self.fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;
        self.cpuid = entries;
        regs::setup_msrs(&self.fd)?;
        regs::setup_fpu(&self.fd)?;
        regs::setup_lapic(&self.fd)?;
        let mp_state = match boot_entry {
            Some(entry) => {
                regs::setup_boot_vcpu(&self.fd, entry)?;
                KVM_MP_STATE_RUNNABLE
            }
            None => KVM_MP_STATE_UNINITIALIZED,
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(VcpuError::MpState)
    }

    /// Index (and APIC id) of the vCPU.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The CPUID table the vCPU was given (KVM_GET_CPUID2 is not reliable
    /// on every KVM flavour, so the VMM keeps its own copy).
    pub fn cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// Records the CPUID table a restore wrote with KVM_SET_CPUID2.
    pub(crate) fn set_cpuid_record(&mut self, entries: Vec<kvm_bindings::kvm_cpuid_entry2>) {
        self.cpuid = entries;
    }

    /// The KVM vCPU, for reading or writing its state while paused.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }
}

thread_local! {
    /// `immediate_exit` of the vCPU this thread runs, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick vCPU threads out of KVM_RUN.
pub(crate) fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    // Setting immediate_exit closes the race where the signal lands just
    // before the thread enters KVM_RUN: the next KVM_RUN returns at once.
    IMMEDIATE_EXIT.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer was set by this thread to the
            // `immediate_exit` byte of its vCPU's kvm_run mapping, which stays
            // mapped until the thread clears the pointer before exiting.
            unsafe { ptr.write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal);
    });
    result
}

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
        let ptr: *mut u8 = &mut v.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(ptr));
    }
    let shared = &core.shared;
    let _done = shared.thread_guard();
    'outer: while shared.checkpoint() {
        let mut v = vcpu.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // Reset before checking the target: a kick after the check sets
            // it again and makes KVM_RUN return at once.
            v.fd.set_kvm_immediate_exit(0);
            if shared.target() != crate::control::Target::Run {
                break;
            }
            match v.fd.run() {
                Ok(exit) => match handle_exit(exit, &pio, &mmio) {
                    Step::Continue => {}
                    Step::Exit(reason) => {
                        let reason = match reason {
                            ExitReason::Error(msg) => ExitReason::Error(format!(
                                "vCPU {index}: {msg}{}",
                                rip_suffix(&v.fd)
                            )),
                            other => other,
                        };
                        tracing::debug!("vCPU {index}: {reason:?}");
                        shared.request_exit(reason);
                        break 'outer;
                    }
                    Step::InternalError => {
                        let detail = internal_error_detail(&mut v.fd);
                        shared.request_exit(ExitReason::Error(format!(
                            "vCPU {index}: KVM internal error ({detail}){}",
                            rip_suffix(&v.fd)
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
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
}
