//! The body of a VMM process (`ferry-vmm DIR`): one per VM.
//!
//! It builds the VM its state directory describes (the record and the
//! [`Plan`]: nothing else, see [`crate::plan`]), records its pid, serves the
//! control socket, and when the VM ends writes `exit.json` and removes its
//! sockets. Errors during start-up are written to `exit.json` with their
//! stable code so the runtime that started this process can report them.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferry_snapshot::{Bundle, SectionKind};
use ferry_vmm::Vm;
use ferry_vmm::{
    DiskConfig, ExitReason, MemoryLayers, MemorySource, VmConfig, VmHandle, VmState, VsockConfig,
};

use crate::config::Dirs;
use crate::error::Coded;
use crate::forward::{PortForward, Served};
use crate::plan::{ForkReport, Launch, Plan};
use crate::snapshot::capture;
use crate::snapshot::chain::ParentDisk;
use crate::vm::control::{self, ControlRequest, ControlResponse};
use crate::vm::record::{self, ExitRecord, PidRecord, VmDir, VmRecord};

/// Sorts page ranges (address, length) and merges those that overlap or touch.
/// The first ranges of `ranges` (sorted) holding at most `max_bytes`.
fn bounded_ranges(ranges: Vec<(u64, u64)>, max_bytes: u64) -> Vec<(u64, u64)> {
    let mut left = max_bytes;
    let mut out = Vec::new();
    for (start, len) in ranges {
        if left == 0 {
            break;
        }
        let take = len.min(left) & !(ferry_snapshot::memory::PAGE - 1);
        if take > 0 {
            out.push((start, take));
        }
        left = left.saturating_sub(len);
    }
    out
}

fn merge_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = ranges.into_iter().filter(|r| r.1 > 0).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (start, len) in all {
        let end = start.saturating_add(len);
        match out.last_mut() {
            Some((s, l)) if start <= *s + *l => *l = (*l).max(end - *s),
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// Guest context id; each VM has its own vsock device, so they need not differ.
const GUEST_CID: u64 = 3;

use crate::plan::GUEST_CMDLINE;

use crate::error::kvm_hint;

fn fail(dir: &VmDir, code: &str, detail: String) -> ! {
    fail_with_hint(dir, code, detail, kvm_hint(code))
}

fn fail_with_hint(dir: &VmDir, code: &str, detail: String, hint: Option<String>) -> ! {
    let _ = record::write_json(
        &dir.exit(),
        &ExitRecord {
            reason: "error".into(),
            detail: Some(detail.clone()),
            code: Some(code.to_string()),
            hint,
            at: record::now(),
        },
    );
    eprintln!("error[{code}]: {detail}");
    std::process::exit(1);
}

/// A failure with a stable code, reported in `exit.json` or a control response.
struct Failed(String, String);

impl<E: crate::error::Coded + std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Failed {
        Failed(e.code().to_string(), e.to_string())
    }
}

fn failed(code: &str, detail: impl std::fmt::Display) -> Failed {
    Failed(code.to_string(), detail.to_string())
}

impl crate::error::Coded for ferry_vmm::VmError {
    fn code(&self) -> &str {
        ferry_vmm::VmError::code(self)
    }
}

impl crate::error::Coded for ferry_vmm::SnapshotError {
    fn code(&self) -> &str {
        ferry_vmm::SnapshotError::code(self)
    }
}

impl crate::error::Coded for ferry_vmm::ControlError {
    fn code(&self) -> &str {
        ferry_vmm::ControlError::code(self)
    }
}

impl crate::error::Coded for ferry_snapshot::BundleError {
    fn code(&self) -> &str {
        ferry_snapshot::BundleError::code(self)
    }
}

impl crate::error::Coded for ferry_disk::DiskError {
    fn code(&self) -> &str {
        "DISK_ERROR"
    }
}

fn vm_config(
    dir: &VmDir,
    rec: &VmRecord,
    initramfs: Option<PathBuf>,
    net: Option<ferry_vmm::NetConfig>,
) -> VmConfig {
    VmConfig {
        cpus: u8::try_from(rec.cpus).unwrap_or(u8::MAX),
        memory_mib: u64::from(rec.memory_mib),
        kernel: rec.kernel.clone(),
        cmdline_extra: GUEST_CMDLINE.to_string(),
        initramfs,
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
        fs: crate::mounts::fs_devices(&rec.mounts),
        net,
        allow_pvm: false,
    }
}

/// Builds the VM the plan asks for: a fresh boot, a restore from a bundle,
/// or a fork from memory layers inherited from the source's VMM process.
fn build_vm(
    dir: &VmDir,
    rec: &VmRecord,
    launch: Launch,
    net: Option<ferry_vmm::NetConfig>,
    disk_fill: Option<Arc<dyn ferry_disk::FillSource>>,
) -> Result<Vm, Failed> {
    let io = ferry_vmm::VmIo {
        console_tee: None,
        root_disk_fill: disk_fill,
    };
    match launch {
        Launch::Restore {
            bundle: path,
            parents,
            store,
        } => {
            let started = std::time::Instant::now();
            let bundle = Bundle::open(&path)?;
            // Bundle::open checked the manifest against itself. Before any
            // guest memory is prepared, its memory regions must also be the
            // RAM this VM is configured with (the record's) and the layout
            // the VM state restores.
            bundle.check_memory_layout(u64::from(rec.memory_mib) << 20)?;
            let state: VmState =
                serde_json::from_slice(&bundle.read_section(SectionKind::VmState)?)
                    .map_err(|e| failed("RESTORE_STATE_INVALID", e))?;
            let regions = &bundle.manifest().memory_regions;
            let same_layout = regions.len() == state.memory.len()
                && regions
                    .iter()
                    .zip(&state.memory)
                    .all(|(b, s)| b.guest_addr == s.guest_addr && b.size == s.len);
            if !same_layout {
                return Err(ferry_snapshot::BundleError::BadManifest(
                    "the VM state's guest memory layout is not the bundle's memory regions".into(),
                )
                .into());
            }
            let memory = if let Some(store) = &store {
                let file = std::fs::File::open(&path).map_err(|e| failed("BUNDLE_IO", e))?;
                let lazy = crate::store::memory::source(store, &dir.root)?;
                crate::snapshot::memory::RestoredMemory {
                    lazy_bytes: lazy.ranges().iter().map(|r| r.1).sum(),
                    source: MemorySource::Lazy {
                        file,
                        extents: Vec::new(),
                        lazy,
                    },
                    decoded_bytes: 0,
                    decode_ms: 0,
                }
            } else if parents.is_empty() {
                let file = std::fs::File::open(&path).map_err(|e| failed("BUNDLE_IO", e))?;
                crate::snapshot::memory::restored_memory(bundle, file)?
            } else {
                // An incremental bundle: its parents' memory first (the
                // runtime checked their digests), decoded up front.
                let mut chain = parents
                    .iter()
                    .map(|p| Bundle::open(p))
                    .collect::<Result<Vec<_>, _>>()?;
                chain.push(bundle);
                crate::snapshot::memory::restored_chain_memory(&chain)?
            };
            let source = memory.source;
            tracing::debug!(
                "restore: bundle state read in {:.1} ms",
                started.elapsed().as_secs_f64() * 1000.0
            );
            let vm = Vm::restore_with(vm_config(dir, rec, None, net), &state, source, io)?;
            if let Some(stats) = vm.restore_stats() {
                let _ = record::write_runtime_json(
                    &dir.root.join("restore-stats.json"),
                    &serde_json::json!({
                        "extents": stats.extents,
                        "mapped_bytes": stats.mapped_bytes,
                        "eager_bytes_read": stats.eager_bytes_read,
                        "decoded_bytes": memory.decoded_bytes,
                        "lazy_bytes": memory.lazy_bytes,
                        "decode_ms": memory.decode_ms,
                    }),
                );
            }
            Ok(vm)
        }
        Launch::Fork { state, memory } => {
            // SAFETY: the descriptors named in the plan were inherited from the source
            // VMM process that started us, for this purpose only; nothing else in this
            // process knows or uses them.
            let layers = unsafe { MemoryLayers::from_inherited(&memory) }?;
            Ok(Vm::restore_with(
                vm_config(dir, rec, None, net),
                &state,
                MemorySource::Layers(layers),
                io,
            )?)
        }
        Launch::Incoming { state, ram_fd } => {
            // SAFETY: F_GETFD only inspects the descriptor table.
            if ram_fd < 3 || unsafe { libc::fcntl(ram_fd, libc::F_GETFD) } < 0 {
                return Err(failed(
                    "VMM_BAD_STATE",
                    format!("guest RAM descriptor {ram_fd} is not open"),
                ));
            }
            // SAFETY: the descriptor named in the plan was inherited from the
            // `ferry receive` process that started us, for this purpose only,
            // and was checked above to be open; nothing else here uses it.
            let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(ram_fd) };
            // SAFETY: plain fcntl on a descriptor we now own.
            unsafe { libc::fcntl(ram_fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok(Vm::restore_with(
                vm_config(dir, rec, None, net),
                &state,
                MemorySource::Ram(file),
                io,
            )?)
        }
        Launch::Boot { initramfs } => Ok(Vm::create_with(
            vm_config(dir, rec, Some(initramfs), net),
            io,
        )?),
    }
}

/// Runs the VM in `dir` until it ends. Never returns.
pub fn run(dir: &Path) -> ! {
    let mut phases = crate::progress::Phases::from_env();
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
    let Some(plan) = record::read_json::<Plan>(&Plan::path(&dir.root)) else {
        fail(
            &dir,
            "VMM_BAD_STATE",
            format!("cannot read {}", Plan::path(&dir.root).display()),
        );
    };
    // A fork's plan names descriptors valid only in this process: used once.
    if matches!(plan.launch, Launch::Fork { .. } | Launch::Incoming { .. }) {
        let _ = std::fs::remove_file(Plan::path(&dir.root));
    }
    let dirs = plan.dirs.clone();
    // Host ports are bound before the VM exists: a taken port fails the boot.
    let registry = crate::vm::Registry::at(dirs.vms());
    let forwards = crate::forward::bind_all(&rec.ports, &registry, Some(&rec.name))
        .unwrap_or_else(|e| fail_with_hint(&dir, e.code(), e.to_string(), e.hint()));
    let passt = rec.net.as_ref().map(|n| {
        crate::net::find_passt()
            .and_then(|path| crate::net::Passt::start(&dirs.cache, &path, n))
            .unwrap_or_else(|e| fail_with_hint(&dir, e.code(), e.to_string(), e.hint()))
    });
    let net = passt.as_ref().map(crate::net::Passt::device_config);
    let _ = std::fs::remove_file(dir.vsock());
    let _ = std::fs::remove_file(dir.control());
    phases.mark("vmm: record, forwards, network");
    // A VM restored from a store fetches its disk writes as it reaches
    // them; a VMM started on a disk still short of some goes on fetching.
    let (disk_source, background) = match &plan.launch {
        Launch::Restore {
            store: Some(store), ..
        } if store.lazy_disk => (
            crate::store::disk::begin(store, &dir.root, &dir.root_disk()),
            store.background,
        ),
        Launch::Restore {
            store: Some(store), ..
        } => (crate::store::disk::resume(&dir.root), store.background),
        _ => (crate::store::disk::resume(&dir.root), true),
    };
    let disk_source =
        disk_source.unwrap_or_else(|e| fail_with_hint(&dir, e.code(), e.to_string(), e.hint()));
    let fill_source = disk_source
        .clone()
        .map(|s| s as Arc<dyn ferry_disk::FillSource>);
    let vm = match build_vm(&dir, &rec, plan.launch, net, fill_source) {
        Ok(vm) => vm,
        Err(Failed(code, detail)) => fail(&dir, &code, detail),
    };
    let disk_fill = vm.disk_fill().zip(disk_source);
    phases.mark("vmm: build VM");
    let listener = match UnixListener::bind(dir.control()) {
        Ok(l) => l,
        Err(e) => fail(
            &dir,
            "VMM_CONTROL_SOCKET",
            format!("bind control socket: {e}"),
        ),
    };
    // Sockets are made 0777 less the umask; the directory is private
    // already, and the sockets are too: read and write for this user only
    // (a mode of 0600 also keeps execute bits off them).
    for socket in [dir.control(), dir.vsock()] {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                fail(
                    &dir,
                    "VMM_BAD_STATE",
                    format!("make {} private: {e}", socket.display()),
                );
            }
        }
    }
    let handle = match vm.start() {
        Ok(h) => h,
        Err(e) => fail(&dir, e.code(), e.chain()),
    };
    phases.mark("vmm: start vCPUs");
    if let Some((fill, _)) = disk_fill.as_ref().filter(|_| background) {
        let started = fill.spawn_background(crate::store::disk::BACKGROUND_DELAY, |e| {
            tracing::warn!(
                "disk fetch in the background stopped: {e}; the rest comes on first access"
            )
        });
        if let Err(e) = started {
            tracing::warn!("cannot start the disk fetch in the background: {e}");
        }
    }
    match PidRecord::current() {
        Some(pid) => {
            if let Err(e) = record::write_runtime_json(&dir.pid(), &pid) {
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
    phases.mark("vmm: pid file");
    let client =
        ferry_protocol::Client::new(dir.vsock(), ferry_protocol::AGENT_VSOCK_PORT, &rec.token);
    let connect: Arc<crate::forward::GuestConnector> = Arc::new(move |port| client.forward(port));
    let served = crate::forward::serve(forwards, Arc::clone(&connect));
    let snapshotted = Arc::new(AtomicBool::new(false));
    let guest_ram = vm_guest_ranges(&handle);
    let ctx = Control {
        handle: handle.clone(),
        dir: dir.clone(),
        rec: Mutex::new(rec),
        dirs,
        registry,
        connect,
        served: Mutex::new(served),
        guest_ram,
        snapshotted: snapshotted.clone(),
        tracking: Mutex::new(Vec::new()),
        disk_fill,
    };
    std::thread::spawn(move || {
        control::serve_then(listener, move |req| {
            // A stop, or a snapshot that hands the VM off, ends this process:
            // the VM stops only once the client has its answer.
            let ends_vm = matches!(
                req,
                ControlRequest::Stop
                    | ControlRequest::Migrate { .. }
                    | ControlRequest::Snapshot {
                        leave_running: false,
                        ..
                    }
            );
            let resp = ctx.handle(req);
            let stop = (ends_vm && resp.ok).then(|| {
                let handle = ctx.handle.clone();
                move || handle.stop()
            });
            (resp, stop)
        })
    });
    signal_ready();
    let exit = handle.wait();
    if let Some(p) = &passt {
        p.stop();
    }
    let (reason, detail) = match exit {
        ExitReason::PowerOff => ("poweroff", None),
        ExitReason::Reset => ("shutdown", None),
        ExitReason::Stopped if snapshotted.load(Ordering::SeqCst) => ("snapshotted", None),
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

/// Tells the process that started this one that the VM runs and its control
/// socket answers. [`crate::machine::Machine`] starts the VMM with the write
/// end of a pipe as its standard input and reads one byte from it instead of
/// polling; started any other way (a fork's sibling: /dev/null), nothing is
/// written.
fn signal_ready() {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return;
    };
    let mut pipe = std::fs::File::from(fd);
    if pipe.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        let _ = pipe.write_all(b"R");
    }
}

/// What the control socket acts on.
struct Control {
    handle: VmHandle,
    dir: VmDir,
    /// The record; its forwards change when ports are exposed at run time.
    rec: Mutex<VmRecord>,
    dirs: Dirs,
    registry: crate::vm::Registry,
    connect: Arc<crate::forward::GuestConnector>,
    served: Mutex<Vec<Served>>,
    /// Host address ranges of guest RAM, for memory statistics.
    guest_ram: Vec<(usize, usize)>,
    snapshotted: Arc<AtomicBool>,
    /// Snapshots taken with `--leave-running` (by the SHA-256 of their
    /// file), each with the guest pages changed since: the parents an
    /// incremental snapshot can name. Newest last.
    tracking: Mutex<Vec<(String, ferry_vmm::dirty::DirtyPages)>>,
    /// The root disk's fill from a store, while one may still run.
    disk_fill: Option<(Arc<ferry_disk::Filler>, Arc<crate::store::disk::StoreDisk>)>,
}

/// Snapshots whose changed pages are tracked, at most.
const MAX_TRACKED: usize = 8;

/// Host addresses of guest RAM: (start, length) per region.
fn vm_guest_ranges(handle: &VmHandle) -> Vec<(usize, usize)> {
    handle.guest_ram_ranges()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    /// Fetches what the root disk still lacks from the store: before
    /// anything reads the disk whole (a snapshot, a fork, a migration).
    fn complete_disk_fill(&self) -> Result<(), Failed> {
        let Some((fill, source)) = &self.disk_fill else {
            return Ok(());
        };
        fill.complete().map_err(|e| {
            let (code, _) = source.last_error();
            failed(
                &code,
                format!("the VM's disk is still arriving from the store, and fetching the rest failed: {e}"),
            )
        })
    }

    fn state(&self) -> &'static str {
        use ferry_vmm::VmStatus as S;
        match self.handle.status() {
            S::Paused | S::Pausing => "paused",
            S::Running => "running",
            S::Stopping | S::Exited(_) => "stopping",
        }
    }

    fn handle(&self, req: ControlRequest) -> ControlResponse {
        let result = match req {
            ControlRequest::Status => return ControlResponse::state(self.state()),
            ControlRequest::Pause => self
                .handle
                .pause()
                .map(|()| ControlResponse::state("paused"))
                .map_err(Failed::from),
            ControlRequest::Resume => self
                .handle
                .resume()
                .map(|()| ControlResponse::state("running"))
                .map_err(Failed::from),
            // The serving loop stops the VM once this answer is out.
            ControlRequest::Stop => return ControlResponse::state("stopping"),
            ControlRequest::Snapshot {
                path,
                leave_running,
                thin,
                raw_memory,
                compact,
                since,
            } => {
                let opts = capture::CaptureOptions {
                    thin,
                    memory: if raw_memory {
                        ferry_snapshot::MemoryCompression::None
                    } else {
                        capture::CaptureOptions::default().memory
                    },
                    prefetch: Vec::new(),
                    compact,
                    since: None,
                };
                self.snapshot(&path, leave_running, opts, since.as_deref())
            }
            ControlRequest::Fork { dirs } => self.fork(&dirs),
            ControlRequest::Expose { forward } => self.expose(forward),
            ControlRequest::Unexpose { forward } => self.unexpose(forward),
            ControlRequest::DirtyPages { action } => self.dirty_pages(action),
            ControlRequest::Migrate { socket, options } => self.migrate(&socket, &options),
            ControlRequest::Stats => Ok(ControlResponse::done(
                self.state(),
                serde_json::to_value(crate::stats::of_process(
                    &self.guest_ram,
                    self.handle.lazy_progress(),
                ))
                .expect("stats serialize"),
            )),
        };
        result.unwrap_or_else(|Failed(code, message)| ControlResponse::error(&code, message))
    }

    /// Migrates the VM live; once the destination runs it, this VM ends
    /// (the serving loop stops it after this answer). On failure it runs on.
    fn migrate(
        &self,
        socket: &Path,
        options: &crate::migrate::MigrateOptions,
    ) -> Result<ControlResponse, Failed> {
        if self.is_paused() {
            return Err(failed(
                "MIGRATE_FAILED",
                "the VM is paused: resume it before migrating (a migration copies memory while the VM runs)",
            ));
        }
        self.complete_disk_fill()?;
        let stream = std::os::unix::net::UnixStream::connect(socket)
            .map_err(|e| failed("MIGRATE_LINK_BROKEN", e))?;
        // The migration owns the dirty log from here: snapshots taken
        // before it can no longer be parents of incremental ones.
        lock(&self.tracking).clear();
        let source = crate::migrate::send::Source {
            handle: &self.handle,
            record: lock(&self.rec).clone(),
            root_disk: self.dir.root_disk(),
            dirs: &self.dirs,
        };
        let report = crate::migrate::send::run(&source, stream, options)?;
        self.snapshotted.store(true, Ordering::SeqCst);
        Ok(ControlResponse::done(
            "stopping",
            serde_json::to_value(report).expect("report serializes"),
        ))
    }

    /// Starts, reads or stops the record of changed guest pages.
    fn dirty_pages(
        &self,
        action: crate::vm::control::DirtyAction,
    ) -> Result<ControlResponse, Failed> {
        use crate::vm::control::DirtyAction;
        let fail = |e: ferry_vmm::memory::MemoryError| failed("VMM_DIRTY_LOG_FAILED", e);
        let pages = match action {
            DirtyAction::Start => self.handle.track_dirty_pages().map_err(fail).map(|()| 0)?,
            DirtyAction::Take => self.handle.take_dirty_pages().map_err(fail)?.count(),
            DirtyAction::Stop => self
                .handle
                .untrack_dirty_pages()
                .map_err(fail)
                .map(|()| 0)?,
        };
        Ok(ControlResponse::done(
            self.state(),
            serde_json::json!({ "pages": pages }),
        ))
    }

    /// The parent of an incremental snapshot, checked before the VM pauses:
    /// a snapshot this VM took with `--leave-running` (its changed pages
    /// have been tracked since), on the disk base the VM still stands on.
    fn parent_of(&self, parent: &Path) -> Result<(String, String, ParentDisk), Failed> {
        use crate::snapshot::chain;
        let missing = |e: &dyn std::fmt::Display| {
            failed(
                "SNAPSHOT_PARENT_MISSING",
                format!("the parent bundle {}: {e}", parent.display()),
            )
        };
        let digest = chain::file_digest(parent).map_err(|e| missing(&e))?;
        if !lock(&self.tracking).iter().any(|(d, _)| d == &digest) {
            return Err(failed(
                "SNAPSHOT_PARENT_MISMATCH",
                format!(
                    "{} is not a snapshot this VM took with --leave-running since it started (or since its last migration attempt); take a full snapshot with --leave-running and use that as the parent",
                    parent.display()
                ),
            ));
        }
        let bundle = ferry_snapshot::Bundle::open(parent)?;
        let older = chain::ancestors(parent, &bundle, &[])?;
        let mut whole: Vec<&ferry_snapshot::Bundle> = older.iter().map(|(_, b)| b).collect();
        whole.push(&bundle);
        let disk = chain::parent_disk(&whole)?;
        let current = crate::snapshot::disk::base_id(&self.dirs.cache, &self.dir.root_disk())
            .map_err(|e| failed("SNAPSHOT_DISK_FAILED", e))?;
        if current != disk.base_id {
            return Err(failed(
                "SNAPSHOT_PARENT_MISMATCH",
                "the VM's disk was layered anew since the parent (a fork or a migration attempt); take a full snapshot",
            ));
        }
        let file_name = parent
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok((digest, file_name, disk))
    }

    /// Starts tracking changed pages if nothing was, or adds the pages
    /// changed since the last look to every tracked snapshot. Called paused.
    fn catch_up_tracking(&self, start: bool) -> Result<(), Failed> {
        let mut tracking = lock(&self.tracking);
        if tracking.is_empty() {
            if start {
                self.handle
                    .track_dirty_pages()
                    .map_err(|e| failed("VMM_DIRTY_LOG_FAILED", e))?;
            }
            return Ok(());
        }
        let taken = self
            .handle
            .take_dirty_pages()
            .map_err(|e| failed("VMM_DIRTY_LOG_FAILED", e))?;
        for (_, pages) in tracking.iter_mut() {
            pages.merge(&taken);
        }
        Ok(())
    }

    fn snapshot(
        &self,
        path: &Path,
        leave_running: bool,
        mut opts: capture::CaptureOptions,
        since: Option<&Path>,
    ) -> Result<ControlResponse, Failed> {
        self.complete_disk_fill()?;
        let was_paused = self.is_paused();
        let parent = since.map(|p| self.parent_of(p)).transpose()?;
        // What the guest touches now is what it touches first when restored:
        // found while it still runs, stored where a restore maps it at once.
        // Only a compressed, non-incremental bundle has a prefetch set.
        let with_prefetch =
            parent.is_none() && matches!(opts.memory, ferry_snapshot::MemoryCompression::Zstd(_));
        let hot = if with_prefetch {
            // Stored raw, so bounded: a sixteenth of guest RAM at most.
            let defaults = ferry_vmm::snapshot::touch::TouchLimits::default();
            let ram = u64::from(lock(&self.rec).memory_mib) << 20;
            let limits = ferry_vmm::snapshot::touch::TouchLimits {
                max_bytes: defaults.max_bytes.min(ram / 16),
                ..defaults
            };
            self.handle
                .record_touched(limits, Some(self.rehearse_refresh()))
        } else {
            None
        };
        if let Some(t) = hot {
            tracing::debug!(
                "snapshot: {} pages touched in {} ms",
                t.pages,
                t.elapsed.as_millis()
            );
            opts.prefetch = t.ranges;
        } else if with_prefetch {
            // A restored VM's RAM cannot be recorded that way; what it
            // touched just after its own restore stands in.
            let ram = u64::from(lock(&self.rec).memory_mib) << 20;
            opts.prefetch = bounded_ranges(self.handle.touched_after_restore(), ram / 16);
        }
        let mut paused = self.handle.paused()?;
        // Captured first: quiescing the devices may still write guest
        // memory, and those pages belong in the tracked set read next.
        let state = paused.capture()?;
        if with_prefetch {
            // A restore kicks every queue, so each device reads its rings
            // before the guest runs: they join the prefetch set even when the
            // guest left them alone while it was recorded.
            let rings = state.devices.iter().flat_map(|d| d.ring_pages());
            opts.prefetch =
                merge_ranges(std::mem::take(&mut opts.prefetch).into_iter().chain(rings));
        }
        // Pages changed up to now, for the snapshots being tracked.
        self.catch_up_tracking(false)?;
        if let Some((digest, file_name, disk)) = parent {
            let pages = lock(&self.tracking)
                .iter()
                .find(|(d, _)| *d == digest)
                .map(|(_, p)| p.addresses())
                .unwrap_or_default();
            opts.since = Some(capture::Since {
                parent: ferry_snapshot::manifest::ParentRef { digest, file_name },
                pages,
                disk,
            });
        }
        let rec = lock(&self.rec).clone();
        let mut report = capture::write_to_path(
            &self.dirs,
            path,
            &mut paused,
            &state,
            &rec,
            &self.dir.root_disk(),
            opts,
        )?;
        if leave_running {
            // From this pause on, the pages the VM changes are tracked, so
            // the bundle can be the parent of an incremental one.
            let tracked = self.catch_up_tracking(true);
            let state = if was_paused {
                paused.keep_paused();
                "paused"
            } else {
                drop(paused);
                "running"
            };
            if report.digest.is_none() && path.is_file() {
                report.digest = crate::snapshot::chain::file_digest(path).ok();
            }
            match (tracked, &report.digest) {
                (Ok(()), Some(digest)) => match self.handle.take_dirty_pages() {
                    Ok(since_pause) => {
                        // What changed since the pause belongs to every
                        // tracked snapshot, this one included.
                        let mut tracking = lock(&self.tracking);
                        for (_, pages) in tracking.iter_mut() {
                            pages.merge(&since_pause);
                        }
                        tracking.push((digest.clone(), since_pause));
                        if tracking.len() > MAX_TRACKED {
                            tracking.remove(0);
                        }
                    }
                    Err(e) => tracing::warn!("no incremental snapshots: {e}"),
                },
                (Err(Failed(_, e)), _) => tracing::warn!("no incremental snapshots: {e}"),
                (Ok(()), None) => {}
            }
            let info = serde_json::to_value(&report).expect("report serializes");
            return Ok(ControlResponse::done(state, info));
        }
        let info = serde_json::to_value(&report).expect("report serializes");
        // A hand-off must never leave two live copies: this one ends here.
        self.snapshotted.store(true, Ordering::SeqCst);
        // Stays paused until the serving loop stops it, after this answer.
        paused.keep_paused();
        Ok(ControlResponse::done("stopping", info))
    }

    /// What a restore asks of the guest once it runs (a session, clock,
    /// entropy), done now so the pages it needs are recorded with the rest.
    fn rehearse_refresh(&self) -> ferry_vmm::snapshot::touch::Exercise {
        let token = lock(&self.rec).token.clone();
        let client =
            ferry_protocol::Client::new(self.dir.vsock(), ferry_protocol::AGENT_VSOCK_PORT, &token)
                .with_timeout(Some(std::time::Duration::from_secs(2)));
        Box::new(move || {
            // As a restore does it: the requests ride on the Hello.
            if let Ok(refresh) = crate::snapshot::restore::Refresh::new(None) {
                let _ = client.session_with(&mut || refresh.requests());
            }
        })
    }

    fn is_paused(&self) -> bool {
        matches!(self.handle.status(), ferry_vmm::VmStatus::Paused)
    }

    /// Forks into every directory of `siblings` from one pause.
    fn fork(&self, siblings: &[PathBuf]) -> Result<ControlResponse, Failed> {
        let started = std::time::Instant::now();
        let at = |what: &str| {
            tracing::debug!(
                "fork: {what} at {:.1} ms",
                started.elapsed().as_secs_f64() * 1000.0
            )
        };
        if siblings.is_empty() {
            return Err(failed("FORK_FAILED", "no sibling to fork into"));
        }
        self.complete_disk_fill()?;
        let was_paused = self.is_paused();
        let paused = self.handle.paused()?;
        at("paused");
        let state = paused.capture()?;
        at("state captured");
        let layers = paused.freeze_for_fork()?;
        at("memory frozen");
        // The disk as it is now becomes a frozen base shared by all the VMs.
        // Its name is random and published without replacing anything, so
        // concurrent forks of one VM never take each other's layer.
        let root = self.dir.root_disk();
        let rec_id = lock(&self.rec).id.clone();
        let frozen = crate::snapshot::disk::move_aside(&root, &self.dirs.layers(), &rec_id)
            .map_err(|e| failed("FORK_IO", e))?;
        let sibling_dirs: Vec<VmDir> = siblings
            .iter()
            .map(|s| VmDir {
                root: s.to_path_buf(),
            })
            .collect();
        let layered = (|| -> Result<(), Failed> {
            ferry_disk::create_layer(&root, &frozen, None)?;
            for sibling in &sibling_dirs {
                ferry_disk::create_layer(&sibling.root_disk(), &frozen, None)?;
            }
            paused.replace_disk(0, &root)?;
            Ok(())
        })();
        if let Err(e) = layered {
            // Put the source's disk back as it was: nothing has written to it.
            let _ = std::fs::remove_file(&root);
            let _ = std::fs::rename(&frozen, &root);
            return Err(e);
        }
        at("disk layers");
        let (fds, desc) = layers.to_inheritable()?;
        for sibling in &sibling_dirs {
            record::write_runtime_json(
                &Plan::path(&sibling.root),
                &Plan {
                    dirs: self.dirs.clone(),
                    launch: Launch::Fork {
                        state: Box::new(state.clone()),
                        memory: desc.clone(),
                    },
                },
            )
            .map_err(|e| failed("FORK_IO", e))?;
        }
        // The frozen layers no longer change: the source runs on while its
        // siblings start.
        let paused_ms = paused.paused_for().as_millis() as u64;
        at("plans written");
        if was_paused {
            paused.keep_paused();
        } else {
            drop(paused);
        }
        for sibling in &sibling_dirs {
            spawn_sibling(sibling)?;
        }
        at("siblings spawned");
        // The siblings hold their own copies of the descriptors now.
        drop(fds);
        let stats = layers.freeze_stats();
        let report = ForkReport {
            source_paused_ms: paused_ms,
            copied_bytes: stats.map(|s| s.copied_bytes).unwrap_or(0),
        };
        Ok(ControlResponse::done(
            self.state(),
            serde_json::to_value(report).expect("report serializes"),
        ))
    }

    /// Binds and serves one more forward, and records it.
    fn expose(&self, forward: PortForward) -> Result<ControlResponse, Failed> {
        let mut rec = lock(&self.rec);
        if rec.ports.iter().any(|p| p.overlaps(&forward)) {
            return Err(Failed::from(crate::forward::ForwardError::Duplicate(
                forward.host_addr(),
            )));
        }
        let listeners = crate::forward::bind_all(&[forward], &self.registry, Some(&rec.name))?;
        let served = crate::forward::serve(listeners, Arc::clone(&self.connect));
        lock(&self.served).extend(served);
        rec.ports.push(forward);
        record::write_json(&self.dir.record(), &*rec).map_err(|e| failed("VM_IO", e))?;
        Ok(ControlResponse::state(self.state()))
    }

    /// Closes a forward and drops it from the record.
    fn unexpose(&self, forward: PortForward) -> Result<ControlResponse, Failed> {
        let mut rec = lock(&self.rec);
        let mut served = lock(&self.served);
        let Some(i) = served.iter().position(|s| s.forward() == forward) else {
            return Err(failed(
                "FORWARD_NOT_FOUND",
                format!("the VM does not forward {forward}"),
            ));
        };
        served.swap_remove(i).close();
        rec.ports.retain(|p| *p != forward);
        record::write_json(&self.dir.record(), &*rec).map_err(|e| failed("VM_IO", e))?;
        Ok(ControlResponse::state(self.state()))
    }
}

/// Starts the sibling's VMM process; it inherits the memory layer descriptors.
fn spawn_sibling(dir: &VmDir) -> Result<(), Failed> {
    use std::os::unix::process::CommandExt;
    // This very executable is `ferry-vmm`.
    let exe = std::env::current_exe().map_err(|e| failed("FORK_SPAWN", e))?;
    let log = std::fs::File::create(dir.vmm_log()).map_err(|e| failed("FORK_SPAWN", e))?;
    let log2 = log.try_clone().map_err(|e| failed("FORK_SPAWN", e))?;
    let mut child = std::process::Command::new(exe)
        .arg(&dir.root)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| failed("FORK_SPAWN", e))?;
    std::thread::spawn(move || child.wait());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{bounded_ranges, merge_ranges};

    #[test]
    fn a_restored_vms_prefetch_set_keeps_its_first_ranges_up_to_the_bound() {
        let ranges = vec![(0x1000, 0x3000), (0x10000, 0x2000), (0x20000, 0x1000)];
        assert_eq!(bounded_ranges(ranges.clone(), 1 << 20), ranges);
        assert_eq!(
            bounded_ranges(ranges.clone(), 0x4000),
            vec![(0x1000, 0x3000), (0x10000, 0x1000)]
        );
        // Never a piece of a page.
        assert_eq!(bounded_ranges(ranges, 0x3800), vec![(0x1000, 0x3000)]);
    }

    #[test]
    fn ranges_are_sorted_and_merged_where_they_overlap_or_touch() {
        let got = merge_ranges([
            (0x5000, 0x1000),
            (0x1000, 0x2000),
            (0x2000, 0x1000),
            (0x3000, 0x1000),
            (0x9000, 0),
            (0x8000, 0x1000),
        ]);
        assert_eq!(
            got,
            vec![(0x1000, 0x3000), (0x5000, 0x1000), (0x8000, 0x1000)]
        );
    }
}
