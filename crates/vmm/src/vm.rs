//! Creating and starting a VM.

use std::fs::File;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::boot::{self, Initramfs};
use crate::arch::layout::{EBDA_ADDR, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::arch::{mptable, regs};
use crate::config::VmConfig;
use crate::control::{ExitReason, Shared, VmCore, VmHandle};
use crate::devices::{create_devices, Devices, MmioSlot};
use crate::error::VmError;
use crate::event_loop::EventLoop;
use crate::kvm::{host_is_pvm, open_kvm};
use crate::memory::{create_guest_ram, map_guest_ram, register_with_kvm, MemoryError};
use crate::snapshot::memory::{private_memory, resident_bytes, source_layers, Backing};
use crate::snapshot::{check_cpu_compatible_on, kvm_state, MemorySource, RestoreStats, VmState};
use crate::vcpu::{install_kick_handler, Vcpu};
use crate::vcpu_loop::run_vcpu;
use crate::GuestMemoryMmap;

/// Set in the environment, a restore counts the guest memory present right
/// after mapping ([`RestoreStats::eager_bytes_read`]).
pub const RESTORE_STATS_ENV: &str = "FERRY_RESTORE_STATS";

/// Set in the environment, steps are timed on stderr as `timing: WHAT: N ms`
/// (the runtime's phases and a restore's own steps).
pub const TIMINGS_ENV: &str = "FERRY_TIMINGS";

/// Host-side I/O a VM is created with that is not part of its config.
#[derive(Default)]
pub struct VmIo {
    /// Receives a copy of the console output (a pipe or terminal).
    pub console_tee: Option<File>,
    /// Where the root disk's missing clusters come from while the guest
    /// runs (a restore from a store); see [`Vm::disk_fill`].
    pub root_disk_fill: Option<Arc<dyn ferry_disk::FillSource>>,
}

/// A created VM, ready to start.
pub struct Vm {
    config: VmConfig,
    vm: VmFd,
    /// Guest memory still produced on first touch (restores only); declared
    /// before `memory` so it stops before the memory is unmapped.
    lazy: Option<crate::snapshot::LazyMemory>,
    memory: GuestMemoryMmap,
    backing: Backing,
    vcpus: Vec<Vcpu>,
    devices: Devices,
    cmdline: String,
    restore_stats: Option<RestoreStats>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

fn cpu_identity(supported: &CpuId) -> (u32, u32) {
    supported
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .map_or((0, 0), |e| (e.eax, e.edx))
}

impl Vm {
    /// Creates the VM described by `config`.
    pub fn create(config: VmConfig) -> Result<Self, VmError> {
        Self::create_with(config, VmIo::default())
    }

    /// Creates the VM with extra host I/O.
    pub fn create_with(config: VmConfig, io: VmIo) -> Result<Self, VmError> {
        config.validate().map_err(VmError::InvalidConfig)?;
        if host_is_pvm() && !config.allow_pvm {
            return Err(VmError::KvmPvmUnsupported);
        }
        let (kvm, vm) = new_kvm_vm(&config)?;

        let mem_size = config.memory_bytes();
        let ram = create_guest_ram(mem_size).map_err(VmError::Memory)?;
        register_with_kvm(&vm, &ram.memory).map_err(VmError::Memory)?;
        let mem = &ram.memory;

        let kernel = boot::load_kernel(mem, &config.kernel).map_err(VmError::KernelLoad)?;
        let initramfs: Option<Initramfs> = match &config.initramfs {
            Some(path) => Some(
                boot::load_initramfs(mem, path, kernel.end, mem_size)
                    .map_err(VmError::InitramfsLoad)?,
            ),
            None => None,
        };

        let devices = create_devices(&vm, mem, &config, io.console_tee, io.root_disk_fill, None)
            .map_err(VmError::Device)?;
        let cmdline = guest_cmdline(&devices, &config)?;
        let cmdline_len = boot::write_cmdline(mem, &cmdline).map_err(VmError::Boot)?;
        let params =
            boot::boot_params_for(cmdline_len, initramfs, mem_size).map_err(VmError::Boot)?;
        boot::write_boot_params(mem, &params).map_err(VmError::Boot)?;
        regs::write_gdt(mem).map_err(|e| VmError::Vcpu {
            index: 0,
            source: e.into(),
        })?;
        regs::write_page_tables(mem).map_err(|e| VmError::Vcpu {
            index: 0,
            source: e.into(),
        })?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let (signature, features) = cpu_identity(&supported);
        mptable::write(mem, EBDA_ADDR, config.cpus, signature, features)
            .map_err(VmError::MpTable)?;

        let vcpus = create_vcpus(&vm, &supported, config.cpus, kernel.entry)?;
        let cmdline = cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        tracing::info!(
            "VM created: {} vCPUs, {} MiB, entry {:#x}, cmdline {cmdline:?}",
            config.cpus,
            config.memory_mib,
            kernel.entry
        );
        Ok(Self {
            config,
            vm,
            memory: ram.memory,
            backing: Backing::Shared(Arc::new(ram.file)),
            vcpus,
            devices,
            cmdline,
            restore_stats: None,
            lazy: None,
        })
    }

    /// Rebuilds a VM saved by [`crate::Paused::capture`]: devices from their
    /// saved states, vCPUs and interrupt controllers from KVM state, memory
    /// mapped lazily from `memory`. [`Self::start`] resumes the guest where
    /// it was. The vsock device sends the guest a TRANSPORT_RESET (host
    /// connections do not survive; guest listeners do).
    ///
    /// `config` must describe the same machine (vCPUs, memory size, device
    /// list); paths (disks, sockets, console) may differ.
    pub fn restore(
        config: VmConfig,
        state: &VmState,
        memory: MemorySource,
    ) -> Result<Self, VmError> {
        Self::restore_with(config, state, memory, VmIo::default())
    }

    /// [`Self::restore`] with extra host I/O.
    pub fn restore_with(
        config: VmConfig,
        state: &VmState,
        memory: MemorySource,
        io: VmIo,
    ) -> Result<Self, VmError> {
        let started = std::time::Instant::now();
        // With FERRY_TIMINGS set, each step's time also goes to stderr (the
        // VMM's log) in the runtime's `timing:` form, for the benchmark.
        let timings = std::env::var_os(TIMINGS_ENV).is_some();
        let last = std::cell::Cell::new(started);
        let mark = |what: &str| {
            let now = std::time::Instant::now();
            tracing::debug!(
                "restore: {what} at {:.1} ms",
                (now - started).as_secs_f64() * 1000.0
            );
            if timings {
                eprintln!(
                    "timing: vmm restore: {what}: {:.1} ms",
                    (now - last.get()).as_secs_f64() * 1000.0
                );
            }
            last.set(now);
        };
        config.validate().map_err(VmError::InvalidConfig)?;
        if host_is_pvm() && !config.allow_pvm {
            return Err(VmError::KvmPvmUnsupported);
        }
        mark("checked host");
        state
            .validate_against(&config)
            .map_err(VmError::RestoreStateInvalid)?;
        // Either whole guest RAM handed over, or layers mapped copy-on-write.
        let (ram, layers, lazy) = match memory {
            MemorySource::Ram(file) => {
                let regions: Vec<(u64, u64)> =
                    state.memory.iter().map(|r| (r.guest_addr, r.len)).collect();
                let ram = map_guest_ram(file, &regions)
                    .map_err(|e| VmError::RestoreMemoryInvalid(format!("{e}")))?;
                (Some(ram), Vec::new(), None)
            }
            other => {
                let (layers, lazy) =
                    source_layers(&state.memory, other).map_err(VmError::RestoreMemoryInvalid)?;
                (None, layers, lazy)
            }
        };
        let (kvm, vm) = new_kvm_vm(&config)?;
        mark("KVM VM created");
        check_cpu_compatible_on(state, &kvm, &vm).map_err(VmError::RestoreCpuIncompatible)?;
        mark("CPU compatibility");
        let (mem, backing) = match ram {
            Some(ram) => (ram.memory, Backing::Shared(Arc::new(ram.file))),
            None => (
                private_memory(&state.memory, &layers)
                    .map_err(|e| VmError::Memory(MemoryError::Restore(e)))?,
                Backing::Private(layers.clone()),
            ),
        };
        register_with_kvm(&vm, &mem).map_err(VmError::Memory)?;
        mark("memory mapped");
        // Before anything touches guest memory: restoring devices and vCPUs does.
        let lazy = lazy
            .map(|source| crate::snapshot::LazyMemory::start(&mem, source))
            .transpose()
            .map_err(|e| VmError::Memory(MemoryError::Restore(format!("lazy memory: {e}"))))?;
        mark("memory placed");
        let devices = create_devices(
            &vm,
            &mem,
            &config,
            io.console_tee,
            io.root_disk_fill,
            Some(&state.devices),
        )
        .map_err(VmError::Device)?;
        mark("devices");
        // Reading the page map of all guest RAM costs time that grows with
        // the RAM, so only where it is asked for.
        let eager_bytes_read = if std::env::var_os(RESTORE_STATS_ENV).is_some() {
            let n = resident_bytes(&mem)
                .map_err(|e| VmError::Memory(MemoryError::Restore(e.to_string())))?;
            mark("residency");
            Some(n)
        } else {
            None
        };

        kvm_state::restore_vm(&vm, &state.kvm).map_err(VmError::Restore)?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        let mut first_tsc_written = None;
        for (i, saved) in state.vcpus.iter().enumerate() {
            let index = u8::try_from(i).map_err(|_| {
                VmError::RestoreStateInvalid(format!("vCPU index {i} out of range"))
            })?;
            let mut vcpu =
                Vcpu::create(&vm, index).map_err(|source| VmError::Vcpu { index, source })?;
            let tsc_written =
                kvm_state::restore_vcpu(vcpu.fd(), &vm, saved).map_err(VmError::Restore)?;
            first_tsc_written.get_or_insert(tsc_written);
            vcpu.set_cpuid_record(saved.cpuid.iter().map(Into::into).collect());
            vcpus.push(vcpu);
        }
        kvm_state::restore_clock(&vm, &state.kvm, first_tsc_written).map_err(VmError::Restore)?;
        mark("KVM and vCPU state");
        // With the interrupt controllers in place, replay what the devices
        // had pending, then tell the guest its vsock connections are gone.
        for dev in &devices.all {
            let guard = dev.lock().unwrap_or_else(PoisonError::into_inner);
            guard.kick_after_restore().map_err(|reason| {
                VmError::Device(crate::devices::DeviceError::Restore {
                    name: guard.name(),
                    reason,
                })
            })?;
        }
        for dev in &devices.virtio {
            let mut guard = dev.lock().unwrap_or_else(PoisonError::into_inner);
            if let ferry_devices::Device::VirtioMmio(t) = &mut *guard {
                if matches!(t.device(), ferry_devices::virtio::VirtioDevice::Vsock(_)) {
                    t.send_vsock_transport_reset().map_err(|e| {
                        VmError::Device(crate::devices::DeviceError::Restore {
                            name: ferry_devices::DeviceKind::Vsock.name(),
                            reason: e.to_string(),
                        })
                    })?;
                }
            }
        }

        let stats = RestoreStats {
            extents: layers.iter().map(|l| l.extents().len()).sum(),
            mapped_bytes: match &backing {
                Backing::Shared(_) => state.memory.iter().map(|r| r.len).sum(),
                Backing::Private(layers) => layers
                    .iter()
                    .flat_map(|l| l.extents().iter().map(|e| e.len))
                    .sum(),
            },
            eager_bytes_read,
        };
        let cmdline = guest_cmdline(&devices, &config)?
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        tracing::info!(
            "VM restored: {} vCPUs, {} MiB, {} extents, {:?} bytes read eagerly",
            config.cpus,
            config.memory_mib,
            stats.extents,
            stats.eager_bytes_read,
        );
        Ok(Self {
            config,
            vm,
            memory: mem,
            backing,
            vcpus,
            devices,
            cmdline,
            restore_stats: Some(stats),
            lazy,
        })
    }

    /// The root disk's fill, when [`VmIo::root_disk_fill`] asked for one:
    /// complete it before anything reads the disk whole.
    pub fn disk_fill(&self) -> Option<Arc<ferry_disk::Filler>> {
        self.devices.disk_fill.clone()
    }

    /// What restoring memory cost, for a VM made by [`Self::restore`].
    pub fn restore_stats(&self) -> Option<RestoreStats> {
        self.restore_stats
    }

    /// The configuration the VM was created from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The kernel command line the guest gets.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Starts the vCPU threads and the device event loop.
    pub fn start(self) -> Result<VmHandle, VmError> {
        install_kick_handler().map_err(|source| VmError::Vcpu { index: 0, source })?;
        let n = self.vcpus.len();
        let shared = Shared::new(n + 1).map_err(VmError::ThreadSpawn)?;
        let event_loop = EventLoop::new(
            self.devices.virtio.clone(),
            self.devices.reset_evt,
            &shared.loop_kick,
        )
        .map_err(VmError::ThreadSpawn)?;
        let core = Arc::new(VmCore {
            shared,
            vcpus: self
                .vcpus
                .into_iter()
                .map(|v| Arc::new(Mutex::new(v)))
                .collect(),
            devices: self.devices.all,
            lazy: self.lazy,
            memory: self.memory,
            vm: self.vm,
            backing: Mutex::new(self.backing),
            last_pause: Mutex::new(None),
        });
        let pio = Arc::new(self.devices.pio);
        let mmio = Arc::new(self.devices.mmio);

        core.shared.reserve_threads(n + 1);
        let spawned = {
            let c = Arc::clone(&core);
            thread::Builder::new()
                .name("ferry-events".into())
                .spawn(move || event_loop.run(c))
        };
        match spawned {
            Ok(h) => core.shared.store_thread(h),
            Err(e) => return Err(abort_start(&core, n + 1, e)),
        }
        let spawned = core.shared.spawn_vcpus(n, |index| {
            let (c, p, m) = (Arc::clone(&core), Arc::clone(&pio), Arc::clone(&mmio));
            thread::Builder::new()
                .name(format!("ferry-vcpu{index}"))
                .spawn(move || run_vcpu(c, index, p, m))
        });
        if let Err((index, e)) = spawned {
            return Err(abort_start(&core, n - index, e));
        }
        Ok(VmHandle { core })
    }

    /// Starts the VM and waits for it to end.
    pub fn run(self) -> Result<ExitReason, VmError> {
        Ok(self.start()?.wait())
    }
}

/// Stops already started threads after a spawn failure; `unspawned`
/// reserved threads never ran.
fn abort_start(core: &Arc<VmCore>, unspawned: usize, e: std::io::Error) -> VmError {
    for _ in 0..unspawned {
        core.shared.thread_done();
    }
    core.shared
        .request_exit(ExitReason::Error(format!("thread spawn failed: {e}")));
    let _ = VmHandle {
        core: Arc::clone(core),
    }
    .wait();
    VmError::ThreadSpawn(e)
}

/// Opens KVM and creates the VM with its TSS, identity map, irqchip and PIT.
fn new_kvm_vm(config: &VmConfig) -> Result<(Kvm, VmFd), VmError> {
    let kvm = open_kvm()?;
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(config.cpus) > max_vcpus {
        return Err(VmError::InvalidConfig(format!(
            "{} vCPUs requested, KVM allows {max_vcpus}",
            config.cpus
        )));
    }
    let vm = kvm.create_vm().map_err(|source| VmError::KvmUnavailable {
        reason: "cannot create a KVM VM".into(),
        source,
    })?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok((kvm, vm))
}

/// The kernel command line for the devices' MMIO slots.
fn guest_cmdline(
    devices: &Devices,
    config: &VmConfig,
) -> Result<linux_loader::cmdline::Cmdline, VmError> {
    let slots: Vec<(u64, u64, u32)> = devices
        .slots
        .iter()
        .map(|s: &MmioSlot| (s.base, s.size, s.irq))
        .collect();
    boot::build_cmdline(&slots, &config.cmdline_extra).map_err(VmError::Boot)
}

fn create_vcpus(vm: &VmFd, supported: &CpuId, n: u8, entry: u64) -> Result<Vec<Vcpu>, VmError> {
    (0..n)
        .map(|index| {
            let mut vcpu =
                Vcpu::create(vm, index).map_err(|source| VmError::Vcpu { index, source })?;
            vcpu.configure(supported, n, (index == 0).then_some(entry))
                .map_err(|source| VmError::Vcpu { index, source })?;
            Ok(vcpu)
        })
        .collect()
}

/// Checks whether this host can run VMs at all (KVM present and usable,
/// not PVM unless allowed). Returns the error [`Vm::create`] would give.
pub fn check_host(allow_pvm: bool) -> Result<(), VmError> {
    if host_is_pvm() && !allow_pvm {
        return Err(VmError::KvmPvmUnsupported);
    }
    open_kvm().map(|_: Kvm| ()).map_err(VmError::from)
}
