//! Run control shared by the vCPU threads, the event loop and handles.
//!
//! Every VM thread passes a checkpoint before doing work. To pause, the
//! controller sets the target state and kicks every thread: vCPUs leave
//! KVM_RUN (signal + `immediate_exit`), the event loop wakes from epoll.
//! Each thread then parks at its checkpoint until the target changes. Once
//! all threads are parked nothing touches guest memory or device state, so
//! a snapshot can read both through a [`Paused`] guard.

use std::fs::File;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_devices::virtio::block::BlockConfig;
use ferry_devices::virtio::VirtioDevice;
use ferry_devices::{Device, DeviceState};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::kvm::open_kvm;
use crate::snapshot::memory::{self as snapmem, Backing};
use crate::snapshot::{kvm_state, GuestRegion, MemoryLayers, SnapshotError, VmState, STATE_FORMAT};
use crate::vcpu::{kick_signal, Vcpu};
use crate::GuestMemoryMmap;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest powered off (KVM system event).
    PowerOff,
    /// The guest reset itself: i8042 reset, triple fault or KVM reset event.
    /// ferry VMs end on reset; Linux `reboot` lands here.
    Reset,
    /// The host asked the VM to stop ([`VmHandle::stop`]).
    Stopped,
    /// The VMM hit an error it cannot recover from.
    Error(String),
}

/// What a VM is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStatus {
    /// vCPUs are running.
    Running,
    /// A pause was requested and not every thread is parked yet.
    Pausing,
    /// Every vCPU and the event loop are parked.
    Paused,
    /// The VM is shutting down.
    Stopping,
    /// The VM ended; all its threads finished.
    Exited(ExitReason),
}

/// Errors of [`VmHandle`] operations.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM has ended or is ending.
    #[error("the VM is not running (it exited or is stopping)")]
    NotRunning,
    /// A concurrent resume cancelled the pause.
    #[error("the pause was cancelled by a concurrent resume")]
    Interrupted,
}

impl ControlError {
    /// A stable, machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::NotRunning => "VM_NOT_RUNNING",
            ControlError::Interrupted => "PAUSE_INTERRUPTED",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Run,
    Pause,
    Stop,
}

struct CtlState {
    target: Target,
    /// Threads parked at their checkpoint.
    parked: usize,
    /// Threads that must park for the VM to count as paused.
    participants: usize,
    /// Threads not finished yet.
    live: usize,
    exit: Option<ExitReason>,
}

/// State shared by every VM thread and handle.
pub(crate) struct Shared {
    state: Mutex<CtlState>,
    cond: Condvar,
    /// Wakes the event loop.
    pub(crate) loop_kick: EventFd,
    threads: Mutex<Threads>,
}

#[derive(Default)]
struct Threads {
    vcpus: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How often pause re-kicks threads that have not parked yet.
const REKICK_INTERVAL: Duration = Duration::from_millis(50);

impl Shared {
    pub(crate) fn new(participants: usize) -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(CtlState {
                target: Target::Run,
                parked: 0,
                participants,
                live: 0,
                exit: None,
            }),
            cond: Condvar::new(),
            loop_kick: EventFd::new(EFD_NONBLOCK)?,
            threads: Mutex::new(Threads::default()),
        })
    }

    /// Counts a thread as live before it is spawned, so a waiter cannot see
    /// zero live threads in between.
    pub(crate) fn reserve_threads(&self, n: usize) {
        lock(&self.state).live += n;
    }

    /// Stores the handle of a thread counted by [`Self::reserve_threads`].
    pub(crate) fn store_thread(&self, handle: JoinHandle<()>) {
        lock(&self.threads).others.push(handle);
    }

    /// Spawns `n` vCPU threads with `spawn(index)` and stores their handles,
    /// all under the thread-list lock: a kick sent meanwhile (a guest that
    /// resets in its first instructions) waits until every started vCPU can
    /// be signalled, instead of missing one that then sleeps in HLT forever.
    /// On a spawn failure returns the index that failed and the error.
    pub(crate) fn spawn_vcpus(
        &self,
        n: usize,
        spawn: impl Fn(usize) -> std::io::Result<JoinHandle<()>>,
    ) -> Result<(), (usize, std::io::Error)> {
        let mut t = lock(&self.threads);
        for index in 0..n {
            t.vcpus.push(spawn(index).map_err(|e| (index, e))?);
        }
        Ok(())
    }

    /// A guard that marks the calling thread finished when dropped, and
    /// ends the VM if the thread is unwinding from a panic.
    pub(crate) fn thread_guard(&self) -> ThreadGuard<'_> {
        ThreadGuard(self)
    }

    /// Marks a thread finished.
    pub(crate) fn thread_done(&self) {
        let mut s = lock(&self.state);
        s.live = s.live.saturating_sub(1);
        self.cond.notify_all();
    }

    /// The state threads should move to.
    pub(crate) fn target(&self) -> Target {
        lock(&self.state).target
    }

    /// Parks while paused; returns false once the VM is stopping.
    pub(crate) fn checkpoint(&self) -> bool {
        let mut s = lock(&self.state);
        if s.target == Target::Pause {
            s.parked += 1;
            self.cond.notify_all();
            while s.target == Target::Pause {
                s = self.cond.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.parked -= 1;
        }
        s.target == Target::Run
    }

    /// Ends the VM with `reason` unless it already has an exit reason.
    pub(crate) fn request_exit(&self, reason: ExitReason) {
        {
            let mut s = lock(&self.state);
            if s.exit.is_none() {
                tracing::info!("VM exiting: {reason:?}");
                s.exit = Some(reason);
            }
            s.target = Target::Stop;
            self.cond.notify_all();
        }
        self.kick_all();
    }

    /// Gets every thread out of blocking calls so it reaches its checkpoint.
    fn kick_all(&self) {
        if let Err(e) = self.loop_kick.write(1) {
            tracing::warn!("cannot wake the event loop: {e}");
        }
        let t = lock(&self.threads);
        for h in &t.vcpus {
            // SAFETY: the thread has not been joined (handles are removed
            // from this list, under this lock, before joining), so its
            // pthread_t is valid; the signal has a handler installed.
            let rc = unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            if rc != 0 && rc != libc::ESRCH {
                tracing::warn!("cannot kick a vCPU thread: error {rc}");
            }
        }
    }

    fn pause(&self) -> Result<(), ControlError> {
        {
            let mut s = lock(&self.state);
            match s.target {
                Target::Stop => return Err(ControlError::NotRunning),
                Target::Pause if s.parked == s.participants => return Ok(()),
                _ => s.target = Target::Pause,
            }
        }
        loop {
            self.kick_all();
            let s = lock(&self.state);
            let (s, _) = self
                .cond
                .wait_timeout_while(s, REKICK_INTERVAL, |s| {
                    s.target == Target::Pause && s.parked < s.participants
                })
                .unwrap_or_else(PoisonError::into_inner);
            match s.target {
                Target::Stop => return Err(ControlError::NotRunning),
                Target::Run => return Err(ControlError::Interrupted),
                Target::Pause if s.parked == s.participants => return Ok(()),
                Target::Pause => {}
            }
        }
    }

    fn resume(&self) -> Result<(), ControlError> {
        let mut s = lock(&self.state);
        match s.target {
            Target::Stop => Err(ControlError::NotRunning),
            _ => {
                s.target = Target::Run;
                self.cond.notify_all();
                Ok(())
            }
        }
    }

    fn status(&self) -> VmStatus {
        let s = lock(&self.state);
        match (s.target, &s.exit) {
            (_, Some(reason)) if s.live == 0 => VmStatus::Exited(reason.clone()),
            (Target::Stop, _) => VmStatus::Stopping,
            (Target::Pause, _) if s.parked == s.participants => VmStatus::Paused,
            (Target::Pause, _) => VmStatus::Pausing,
            (Target::Run, _) => VmStatus::Running,
        }
    }

    fn wait(&self) -> ExitReason {
        let reason = {
            let s = lock(&self.state);
            let s = self
                .cond
                .wait_while(s, |s| s.live > 0)
                .unwrap_or_else(PoisonError::into_inner);
            s.exit
                .clone()
                .unwrap_or_else(|| ExitReason::Error("VM threads ended without a reason".into()))
        };
        let threads = std::mem::take(&mut *lock(&self.threads));
        for h in threads.vcpus.into_iter().chain(threads.others) {
            if h.join().is_err() {
                tracing::error!("a VM thread panicked");
            }
        }
        reason
    }
}

/// See [`Shared::thread_guard`].
pub(crate) struct ThreadGuard<'a>(&'a Shared);

impl Drop for ThreadGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .request_exit(ExitReason::Error("a VM thread panicked".into()));
        }
        self.0.thread_done();
    }
}

/// Everything the VM's threads and handles share.
pub(crate) struct VmCore {
    pub(crate) shared: Shared,
    pub(crate) vcpus: Vec<Arc<Mutex<Vcpu>>>,
    pub(crate) devices: Vec<Arc<Mutex<Device>>>,
    /// Declared before `memory` so it stops filling pages before they are unmapped.
    pub(crate) lazy: Option<crate::snapshot::LazyMemory>,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) vm: VmFd,
    /// How guest RAM is backed; changes when the VM is frozen for a fork.
    pub(crate) backing: Mutex<Backing>,
    /// How long the last [`Paused`] guard kept the VM paused.
    pub(crate) last_pause: Mutex<Option<Duration>>,
}

/// A cloneable handle controlling a running VM from any thread.
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) core: Arc<VmCore>,
}

impl VmHandle {
    /// Stops every vCPU and the device event loop; returns once all are
    /// parked. Pausing a paused VM succeeds at once.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.core.shared.pause()
    }

    /// Starts tracking which guest pages change, by the guest or by a
    /// device (see [`crate::dirty`]); [`Self::take_dirty_pages`] reads them.
    pub fn track_dirty_pages(&self) -> Result<(), crate::memory::MemoryError> {
        crate::dirty::start(&self.core.vm, &self.core.memory)
    }

    /// The pages changed since tracking started or since the previous call.
    pub fn take_dirty_pages(&self) -> Result<crate::dirty::DirtyPages, crate::memory::MemoryError> {
        crate::dirty::take(&self.core.vm, &self.core.memory)
    }

    /// Stops tracking changed pages.
    pub fn untrack_dirty_pages(&self) -> Result<(), crate::memory::MemoryError> {
        crate::dirty::stop(&self.core.vm, &self.core.memory)
    }

    /// Copies guest memory at `addr` into `buf` while the VM may run: a
    /// volatile copy, so a page the guest writes meanwhile may come out torn
    /// (the dirty log reports it changed, and it is read again).
    pub fn read_guest(&self, addr: u64, buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        use vm_memory::Bytes;
        self.core
            .memory
            .read_slice(buf, vm_memory::GuestAddress(addr))
    }

    /// Guest RAM regions: (guest address, length), in address order.
    pub fn guest_regions(&self) -> Vec<(u64, u64)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.core
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect()
    }

    /// Host address ranges (start, length) of guest RAM, for memory accounting.
    pub fn guest_ram_ranges(&self) -> Vec<(usize, usize)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.core
            .memory
            .iter()
            .filter_map(|r| {
                let start = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
                Some((start as usize, r.len() as usize))
            })
            .collect()
    }

    /// Bytes of guest memory a lazy restore has filled in so far, and the
    /// bytes it maps in all; `None` unless the VM was restored lazily.
    pub fn lazy_progress(&self) -> Option<(u64, u64)> {
        let lazy = self.core.lazy.as_ref()?;
        Some((lazy.produced_bytes(), lazy.total_bytes()))
    }

    /// What the lazily filled memory did so far, if memory is filled lazily.
    pub fn lazy_stats(&self) -> Option<crate::snapshot::LazyStats> {
        Some(self.core.lazy.as_ref()?.stats())
    }

    /// The guest ranges a lazily restored VM touched first (its source's
    /// prefetch set and the pages it faulted just after the restore): the
    /// prefetch set of its next snapshot. Empty unless memory is lazy.
    pub fn touched_after_restore(&self) -> Vec<(u64, u64)> {
        self.core
            .lazy
            .as_ref()
            .map(|l| l.touched_after_start())
            .unwrap_or_default()
    }

    /// Records which guest pages the running VM touches (see
    /// [`crate::snapshot::touch`]), to store them where a restore reaches
    /// them first. `None` where that cannot be known: a paused VM, or RAM
    /// that is not a shared memfd (restored or forked VMs).
    pub fn record_touched(
        &self,
        limits: crate::snapshot::touch::TouchLimits,
        exercise: Option<crate::snapshot::touch::Exercise>,
    ) -> Option<crate::snapshot::touch::Touched> {
        if matches!(self.status(), VmStatus::Paused)
            || !matches!(&*lock(&self.core.backing), Backing::Shared(_))
        {
            return None;
        }
        match crate::snapshot::touch::record(&self.core.memory, limits, exercise) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!("not recording touched pages: {e}");
                None
            }
        }
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.core.shared.resume()
    }

    /// Pauses the VM and returns a guard giving access to the quiesced
    /// vCPUs, devices and memory; dropping the guard resumes the VM.
    pub fn paused(&self) -> Result<Paused, ControlError> {
        let since = Instant::now();
        self.pause()?;
        Ok(Paused {
            handle: self.clone(),
            resume_on_drop: true,
            since,
        })
    }

    /// How long the VM stayed paused under the last [`Paused`] guard
    /// (from the pause request until the guard was dropped).
    pub fn last_pause_duration(&self) -> Option<Duration> {
        *lock(&self.core.last_pause)
    }

    /// Ends the VM ([`ExitReason::Stopped`] unless it already exited).
    /// Returns at once; use [`Self::wait`] to wait for the threads.
    pub fn stop(&self) {
        self.core.shared.request_exit(ExitReason::Stopped);
    }

    /// What the VM is doing now.
    pub fn status(&self) -> VmStatus {
        self.core.shared.status()
    }

    /// Blocks until every VM thread has finished; returns why the VM ended.
    pub fn wait(&self) -> ExitReason {
        self.core.shared.wait()
    }

    /// Sends the guest a vsock TRANSPORT_RESET event and drops every host
    /// vsock connection; returns false if the VM has no vsock device.
    pub fn vsock_transport_reset(&self) -> Result<bool, ferry_devices::virtio::mmio::MmioError> {
        for dev in &self.core.devices {
            let mut guard = lock(dev);
            if let Device::VirtioMmio(t) = &mut *guard {
                if matches!(t.device(), ferry_devices::virtio::VirtioDevice::Vsock(_)) {
                    t.send_vsock_transport_reset()?;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.core.vcpus.len()
    }
}

/// Proof that a VM is paused; resumes it when dropped (unless
/// [`Paused::keep_paused`] is called).
pub struct Paused {
    handle: VmHandle,
    resume_on_drop: bool,
    since: Instant,
}

/// Devices have finished their pending work: their state can be saved.
struct Quiesced<'a>(&'a Paused);

/// Device states are saved: KVM state can be read.
struct DevicesSaved<'a> {
    paused: &'a Paused,
    devices: Vec<DeviceState>,
}

impl<'a> Quiesced<'a> {
    fn save_devices(self) -> DevicesSaved<'a> {
        DevicesSaved {
            devices: self.0.device_states(),
            paused: self.0,
        }
    }
}

impl DevicesSaved<'_> {
    fn save_kvm(self) -> Result<VmState, SnapshotError> {
        let core = &self.paused.handle.core;
        let kvm = open_kvm().map_err(|e| SnapshotError::Host(e.to_string()))?;
        let msr_indices = kvm_state::msr_candidates(&kvm)?;
        let mut vcpus = Vec::with_capacity(core.vcpus.len());
        let mut first_tsc_read = None;
        for v in &core.vcpus {
            let v = lock(v);
            let (state, tsc_read) =
                kvm_state::capture_vcpu(v.index(), v.fd(), v.cpuid(), &core.vm, &msr_indices)?;
            first_tsc_read.get_or_insert(tsc_read);
            vcpus.push(state);
        }
        // After the vCPUs: the clock is stored as of the first TSC read.
        let at_tsc = vcpus
            .first()
            .and_then(|v| kvm_state::guest_kvmclock(&core.memory, v));
        let vm = kvm_state::capture_vm(&core.vm, first_tsc_read, at_tsc)?;
        Ok(VmState {
            format: STATE_FORMAT,
            vcpus,
            kvm: vm,
            devices: self.devices,
            memory: self.paused.regions(),
        })
    }
}

impl Paused {
    /// The vCPU at `index`, parked outside KVM_RUN.
    pub fn vcpu(&self, index: usize) -> Option<MutexGuard<'_, Vcpu>> {
        self.handle.core.vcpus.get(index).map(|v| lock(v))
    }

    /// Saved state of every device, in bus order (without quiescing; see
    /// [`Self::capture`]).
    pub fn device_states(&self) -> Vec<DeviceState> {
        self.handle
            .core
            .devices
            .iter()
            .map(|d| lock(d).save())
            .collect()
    }

    /// How long the VM has been paused by this guard.
    pub fn paused_for(&self) -> Duration {
        self.since.elapsed()
    }

    /// Lets devices finish pending work: queue notifications the event
    /// loop had not served yet are served and disk writes flushed.
    fn quiesce(&self) -> Result<Quiesced<'_>, SnapshotError> {
        for d in &self.handle.core.devices {
            let mut d = lock(d);
            let name = d.name();
            d.quiesce()
                .map_err(|reason| SnapshotError::Device { name, reason })?;
        }
        Ok(Quiesced(self))
    }

    /// Captures the whole VM state except memory contents: devices are
    /// quiesced first, then their state is saved, then KVM's (VM-wide and
    /// every vCPU). Read memory afterwards through [`Self::memory`].
    pub fn capture(&self) -> Result<VmState, SnapshotError> {
        self.populate_lazy()?;
        self.quiesce()?.save_devices().save_kvm()
    }

    /// Produces all guest memory a restore left to first touch, so memory can
    /// be read as a whole or frozen.
    fn populate_lazy(&self) -> Result<(), SnapshotError> {
        match &self.handle.core.lazy {
            Some(lazy) => lazy.populate_all().map_err(SnapshotError::Memory),
            None => Ok(()),
        }
    }

    /// Guest RAM layout.
    pub fn regions(&self) -> Vec<GuestRegion> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.handle
            .core
            .memory
            .iter()
            .map(|r| GuestRegion {
                guest_addr: r.start_addr().0,
                len: r.len(),
            })
            .collect()
    }

    /// Guest memory (nothing writes it while paused).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.handle.core.memory
    }

    /// Every guest RAM region as (guest address, bytes). Taking `&mut self`
    /// keeps other operations on the guard (which may write guest memory)
    /// from running while the slices are borrowed. Reading a page never
    /// touched before maps it (zero or from a file); use
    /// [`Self::resident_or_nonzero_ranges`] to skip those.
    pub fn memory_slices(&mut self) -> Vec<(u64, &[u8])> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        self.handle
            .core
            .memory
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                let len = usize::try_from(r.len()).ok()?;
                // SAFETY: the region is a live mapping of `len` bytes owned by
                // the VM, which outlives `self`. While this guard exists every
                // vCPU and the event loop are parked, and the exclusive borrow
                // of `self` keeps this process from writing guest memory
                // through the guard, so the bytes do not change under the
                // shared slice.
                let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
                Some((r.start_addr().0, bytes))
            })
            .collect()
    }

    /// Guest ranges (address, length), sorted, that may hold non-zero
    /// bytes. Pages outside them were never written and read as zero;
    /// finding them reads no guest memory.
    pub fn resident_or_nonzero_ranges(&self) -> Result<Vec<(u64, u64)>, SnapshotError> {
        self.populate_lazy()?;
        let backing = lock(&self.handle.core.backing);
        snapmem::nonzero_ranges(&self.handle.core.memory, &backing).map_err(SnapshotError::Memory)
    }

    /// The memfd backing guest memory while it is still mapped shared
    /// (a VM that was never frozen or restored); `None` otherwise.
    pub fn memory_file(&self) -> Option<Arc<File>> {
        match &*lock(&self.handle.core.backing) {
            Backing::Shared(f) => Some(Arc::clone(f)),
            Backing::Private(_) => None,
        }
    }

    /// Makes guest memory copy-on-write without copying it, and returns
    /// layers another VM can restore from (see [`crate::snapshot::memory`]).
    /// Pair it with [`Self::capture`] for the vCPU and device state.
    pub fn freeze_for_fork(&self) -> Result<MemoryLayers, SnapshotError> {
        self.populate_lazy()?;
        let mut backing = lock(&self.handle.core.backing);
        snapmem::freeze(&self.handle.core.memory, &mut backing)
    }

    /// Switches disk `index` (config order) to the image at `path`, which
    /// must have the same size; pending writes to the old image are flushed
    /// first. Used when forking: the frozen disk becomes a shared base and
    /// each VM gets a new top layer over it.
    pub fn replace_disk(&self, index: usize, path: &Path) -> Result<(), SnapshotError> {
        let err = |reason: String| SnapshotError::DiskReplace { index, reason };
        let mut seen = 0;
        for d in &self.handle.core.devices {
            let mut guard = lock(d);
            let Device::VirtioMmio(t) = &mut *guard else {
                continue;
            };
            let VirtioDevice::Block(block) = t.device_mut() else {
                continue;
            };
            if seen == index {
                let config = BlockConfig {
                    path: path.to_path_buf(),
                    read_only: block.save().read_only,
                };
                return block.replace_backing(&config).map_err(|e| {
                    let mut s = e.to_string();
                    let mut cur = std::error::Error::source(&e);
                    while let Some(c) = cur {
                        s.push_str(": ");
                        s.push_str(&c.to_string());
                        cur = c.source();
                    }
                    err(s)
                });
            }
            seen += 1;
        }
        Err(err(format!("the VM has {seen} disks")))
    }

    /// The KVM VM (irqchip, PIT and clock state live there).
    pub fn vm_fd(&self) -> &VmFd {
        &self.handle.core.vm
    }

    /// Leaves the VM paused after the guard is dropped.
    pub fn keep_paused(mut self) {
        self.resume_on_drop = false;
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        *lock(&self.handle.core.last_pause) = Some(self.since.elapsed());
        if self.resume_on_drop {
            // A VM that stopped meanwhile has nothing to resume.
            let _ = self.handle.resume();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Starts `n` worker threads that loop through checkpoints counting work.
    fn workers(shared: &Arc<Shared>, n: usize, work: &Arc<AtomicUsize>) {
        shared.reserve_threads(n);
        for _ in 0..n {
            let (s, w) = (Arc::clone(shared), Arc::clone(work));
            let h = std::thread::spawn(move || {
                let _done = s.thread_guard();
                while s.checkpoint() {
                    w.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            shared.store_thread(h);
        }
    }

    #[test]
    fn pause_parks_everyone_and_resume_continues() {
        let shared = Arc::new(Shared::new(3).unwrap());
        let work = Arc::new(AtomicUsize::new(0));
        workers(&shared, 3, &work);
        shared.pause().unwrap();
        assert_eq!(shared.status(), VmStatus::Paused);
        let frozen = work.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(work.load(Ordering::SeqCst), frozen, "no work while paused");
        // Pausing again is a no-op.
        shared.pause().unwrap();
        shared.resume().unwrap();
        let start = std::time::Instant::now();
        while work.load(Ordering::SeqCst) == frozen {
            assert!(start.elapsed() < Duration::from_secs(5), "work resumed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(shared.status(), VmStatus::Running);
        shared.request_exit(ExitReason::PowerOff);
        // Only the first exit reason counts.
        shared.request_exit(ExitReason::Stopped);
        assert_eq!(shared.wait(), ExitReason::PowerOff);
        assert_eq!(shared.status(), VmStatus::Exited(ExitReason::PowerOff));
        assert!(matches!(shared.pause(), Err(ControlError::NotRunning)));
        assert!(matches!(shared.resume(), Err(ControlError::NotRunning)));
    }

    #[test]
    fn stop_releases_paused_threads() {
        let shared = Arc::new(Shared::new(2).unwrap());
        let work = Arc::new(AtomicUsize::new(0));
        workers(&shared, 2, &work);
        shared.pause().unwrap();
        shared.request_exit(ExitReason::Stopped);
        assert_eq!(shared.wait(), ExitReason::Stopped);
    }

    #[test]
    fn panicking_thread_ends_the_vm() {
        let shared = Arc::new(Shared::new(1).unwrap());
        shared.reserve_threads(1);
        let s = Arc::clone(&shared);
        let h = std::thread::spawn(move || {
            let _done = s.thread_guard();
            panic!("device model bug");
        });
        shared.store_thread(h);
        assert!(matches!(shared.wait(), ExitReason::Error(m) if m.contains("panicked")));
    }
}
