//! vCPU creation and configuration, and the signal that kicks a vCPU
//! thread out of KVM_RUN (the thread itself is [`crate::vcpu_loop`]).

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::Once;

use kvm_bindings::{kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::cpuid::vcpu_cpuid;
use crate::arch::regs::{self, RegsError};

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

    /// The KVM vCPU, for running it.
    pub(crate) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }
}

thread_local! {
    /// `immediate_exit` of the vCPU this thread runs, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Points this thread's kick handler at `vcpu`'s `immediate_exit`: called
/// by the thread that runs `vcpu`, before its first KVM_RUN.
pub(crate) fn arm_kick(vcpu: &mut Vcpu) {
    let ptr: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|p| p.set(ptr));
}

/// Stops this thread's kick handler from touching its vCPU: called before
/// the thread ends (and the vCPU's kvm_run mapping may go).
pub(crate) fn disarm_kick() {
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
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
