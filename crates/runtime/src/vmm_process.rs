//! The body of a VMM process (`ferry vmm-run DIR`): one per VM.
//!
//! It builds the VM from the state directory, records its pid, serves the control
//! socket, and when the VM ends writes `exit.json` and removes its sockets. Errors
//! during start-up are written to `exit.json` with their stable code so the
//! `ferry boot` that spawned this process can report them.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_snapshot::{Bundle, SectionKind};
use ferry_vmm::Vm;
use ferry_vmm::{
    DiskConfig, ExitReason, MemoryLayers, MemorySource, VmConfig, VmHandle, VmState, VsockConfig,
};

use crate::error::Coded;
use crate::snapshot::{capture, fork, restore};
use crate::vm::control::{self, ControlRequest, ControlResponse};
use crate::vm::record::{self, ExitRecord, PidRecord, VmDir, VmRecord};

/// Guest context id; each VM has its own vsock device, so they need not differ.
const GUEST_CID: u64 = 3;

/// Kernel arguments ferry adds for its own guests: quiet boot, no waiting.
/// Not `init_on_free=1`: it zeroes all of guest RAM at boot (every page
/// becomes resident on the host) and saved nothing once memory is compressed.
/// What ferry adds to the guest kernel command line.
pub(crate) const GUEST_CMDLINE: &str = "quiet loglevel=3 rdinit=/init";

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

/// Builds the VM the directory asks for: a fresh boot, a restore from a bundle,
/// or a fork from memory layers inherited from the source's VMM process.
fn build_vm(dir: &VmDir, rec: &VmRecord, net: Option<ferry_vmm::NetConfig>) -> Result<Vm, Failed> {
    let restore_plan = dir.root.join(restore::PLAN_FILE);
    let fork_plan = dir.root.join(fork::PLAN_FILE);
    if let Some(plan) = record::read_json::<restore::RestorePlan>(&restore_plan) {
        let started = std::time::Instant::now();
        let bundle = Bundle::open(&plan.bundle)?;
        let state: VmState = serde_json::from_slice(&bundle.read_section(SectionKind::VmState)?)
            .map_err(|e| failed("RESTORE_STATE_INVALID", e))?;
        let file = std::fs::File::open(&plan.bundle).map_err(|e| failed("BUNDLE_IO", e))?;
        let memory = crate::snapshot::memory::restored_memory(bundle, file)?;
        let source = memory.source;
        tracing::debug!(
            "restore: bundle state read in {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        let vm = Vm::restore(vm_config(dir, rec, None, net.clone()), &state, source)?;
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
        return Ok(vm);
    }
    if let Some(plan) = record::read_json::<fork::ForkPlan>(&fork_plan) {
        // SAFETY: the descriptors named in the plan were inherited from the source
        // VMM process that started us, for this purpose only; nothing else in this
        // process knows or uses them.
        let layers = unsafe { MemoryLayers::from_inherited(&plan.memory) }?;
        let _ = std::fs::remove_file(&fork_plan);
        return Ok(Vm::restore(
            vm_config(dir, rec, None, net.clone()),
            &plan.state,
            MemorySource::Layers(layers),
        )?);
    }
    Ok(Vm::create(vm_config(dir, rec, Some(dir.initramfs()), net))?)
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
    // Host ports are bound before the VM exists: a taken port fails the boot.
    let registry = crate::vm::Registry::at(dir.root.parent().unwrap_or(&dir.root).to_path_buf());
    let forwards = crate::forward::bind_all(&rec.ports, &registry, Some(&rec.name))
        .unwrap_or_else(|e| fail_with_hint(&dir, e.code(), e.to_string(), e.hint()));
    let passt = rec.net.as_ref().map(|n| {
        crate::net::find_passt()
            .and_then(|path| crate::net::Passt::start(&path, n))
            .unwrap_or_else(|e| fail_with_hint(&dir, e.code(), e.to_string(), e.hint()))
    });
    let net = passt.as_ref().map(crate::net::Passt::device_config);
    let _ = std::fs::remove_file(dir.vsock());
    let _ = std::fs::remove_file(dir.control());
    phases.mark("vmm: record, forwards, network");
    let vm = match build_vm(&dir, &rec, net) {
        Ok(vm) => vm,
        Err(Failed(code, detail)) => fail(&dir, &code, detail),
    };
    phases.mark("vmm: build VM");
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
    phases.mark("vmm: start vCPUs");
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
    crate::forward::serve(forwards, Arc::new(move |port| client.forward(port)));
    let snapshotted = Arc::new(AtomicBool::new(false));
    let ctx = Control {
        handle: handle.clone(),
        dir: dir.clone(),
        rec,
        snapshotted: snapshotted.clone(),
    };
    std::thread::spawn(move || {
        control::serve_then(listener, move |req| {
            // A stop, or a snapshot that hands the VM off, ends this process:
            // the VM stops only once the client has its answer.
            let ends_vm = matches!(
                req,
                ControlRequest::Stop
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

/// What the control socket acts on.
struct Control {
    handle: VmHandle,
    dir: VmDir,
    rec: VmRecord,
    snapshotted: Arc<AtomicBool>,
}

impl Control {
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
            } => {
                let opts = capture::CaptureOptions {
                    thin,
                    memory: if raw_memory {
                        ferry_snapshot::MemoryCompression::None
                    } else {
                        capture::CaptureOptions::default().memory
                    },
                };
                self.snapshot(&path, leave_running, opts)
            }
            ControlRequest::Fork { dir } => self.fork(&dir),
        };
        result.unwrap_or_else(|Failed(code, message)| ControlResponse::error(&code, message))
    }

    fn snapshot(
        &self,
        path: &Path,
        leave_running: bool,
        opts: capture::CaptureOptions,
    ) -> Result<ControlResponse, Failed> {
        let mut paused = self.handle.paused()?;
        let report =
            capture::write_to_path(path, &mut paused, &self.rec, &self.dir.root_disk(), opts)?;
        let info = serde_json::to_value(&report).expect("report serializes");
        if leave_running {
            drop(paused);
            return Ok(ControlResponse::done("running", info));
        }
        // A hand-off must never leave two live copies: this one ends here.
        self.snapshotted.store(true, Ordering::SeqCst);
        // Stays paused until the serving loop stops it, after this answer.
        paused.keep_paused();
        Ok(ControlResponse::done("stopping", info))
    }

    fn fork(&self, sibling: &Path) -> Result<ControlResponse, Failed> {
        let started = std::time::Instant::now();
        let at = |what: &str| {
            tracing::debug!(
                "fork: {what} at {:.1} ms",
                started.elapsed().as_secs_f64() * 1000.0
            )
        };
        let paused = self.handle.paused()?;
        at("paused");
        let state = paused.capture()?;
        at("state captured");
        let layers = paused.freeze_for_fork()?;
        at("memory frozen");
        // The disk as it is now becomes a frozen base shared by both VMs.
        let frozen_dir = fork::layers_dir();
        std::fs::create_dir_all(&frozen_dir).map_err(|e| failed("FORK_IO", e))?;
        let frozen = frozen_dir.join(format!("{}-{}.img", self.rec.id, record::now()));
        let root = self.dir.root_disk();
        std::fs::rename(&root, &frozen).map_err(|e| failed("FORK_IO", e))?;
        let sibling_dir = VmDir {
            root: sibling.to_path_buf(),
        };
        ferry_disk::create_layer(&root, &frozen, None)?;
        ferry_disk::create_layer(&sibling_dir.root_disk(), &frozen, None)?;
        paused.replace_disk(0, &root)?;
        at("disk layers");
        let (fds, desc) = layers.to_inheritable()?;
        record::write_runtime_json(
            &sibling.join(fork::PLAN_FILE),
            &fork::ForkPlan {
                state,
                memory: desc,
            },
        )
        .map_err(|e| failed("FORK_IO", e))?;
        // The frozen layers no longer change: the source runs on while its
        // sibling starts.
        let paused_ms = paused.paused_for().as_millis() as u64;
        at("plan written");
        drop(paused);
        spawn_sibling(&sibling_dir)?;
        at("sibling spawned");
        // The sibling holds its own copies of the descriptors now.
        drop(fds);
        let stats = layers.freeze_stats();
        let report = fork::ForkReport {
            source_paused_ms: paused_ms,
            copied_bytes: stats.map(|s| s.copied_bytes).unwrap_or(0),
        };
        Ok(ControlResponse::done(
            "running",
            serde_json::to_value(report).expect("report serializes"),
        ))
    }
}

/// Starts the sibling's VMM process; it inherits the memory layer descriptors.
fn spawn_sibling(dir: &VmDir) -> Result<(), Failed> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| failed("FORK_SPAWN", e))?;
    let log = std::fs::File::create(dir.vmm_log()).map_err(|e| failed("FORK_SPAWN", e))?;
    let log2 = log.try_clone().map_err(|e| failed("FORK_SPAWN", e))?;
    let mut child = std::process::Command::new(exe)
        .arg("vmm-run")
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
