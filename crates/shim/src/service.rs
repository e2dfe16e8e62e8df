//! The task service: containerd's task API over ferry VMs, one VM per
//! container. The container's processes run in the VM through its guest
//! agent; the VM lives from create to delete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::api;
use containerd_shim::event::Event;
use containerd_shim::protos::cgroups::metrics::{MemoryEntry, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
    TaskOOM, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task as TaskApi, TtrpcContext, TtrpcResult};
use ferry::{BootOptions, Runtime, SnapshotOptions, Vm, VmStatus};

use crate::error::{Kind, Result, ShimError};
use crate::process::{Exit, Process, Signalled, Status};
use crate::rootfs;
use crate::spec::{Process as ProcessSpec, Spec};
use crate::stdio::Stdio;

/// The name of a bundle's VM: `ctr-NAMESPACE-ID`, made a valid VM name
/// (shortened with a hash of the whole when too long).
pub fn vm_name(namespace: &str, id: &str) -> String {
    let raw = format!("ctr-{namespace}-{id}");
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.len() <= 63 && clean == raw {
        return clean;
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = raw.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let keep: String = clean.chars().take(63 - 17).collect();
    format!("{keep}-{hash:016x}")
}

/// One container: its VM and processes.
struct Task {
    bundle: PathBuf,
    root_dir: PathBuf,
    image: PathBuf,
    vm: Vm,
    /// The VMM's host pid: the task's pid as containerd sees it.
    pid: u32,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    paused: bool,
    /// The guest's OOM kills already reported.
    oom_kills: Arc<AtomicU64>,
}

/// How many processes the guest kernel's OOM killer has killed
/// (`oom_kill` of `/proc/vmstat`, read through the agent).
fn oom_kills(vm: &Vm) -> Option<u64> {
    let (vmstat, _) = vm.read_file("/proc/vmstat").ok()?;
    parse_oom_kills(&String::from_utf8_lossy(&vmstat))
}

fn parse_oom_kills(vmstat: &str) -> Option<u64> {
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

impl Task {
    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        self.execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::not_found(id, exec_id))
    }

    /// The pid containerd knows a process by: the VMM's for the init
    /// process, the guest's for an exec.
    fn pid_of(&self, p: &Process) -> u32 {
        if p.exec_id.is_empty() {
            self.pid
        } else {
            p.pid()
        }
    }
}

/// The shim's task service.
pub struct Service {
    namespace: String,
    runtime: Runtime,
    publisher: Arc<RemotePublisher>,
    tasks: Arc<Mutex<HashMap<String, Task>>>,
    exit: Arc<ExitSignal>,
}

/// Sends events to containerd; failures are logged (containerd also asks
/// for state, so a lost event is not a lost exit).
#[derive(Clone)]
struct Events {
    namespace: String,
    publisher: Arc<RemotePublisher>,
}

impl Events {
    fn send(&self, event: impl Event + 'static) {
        let topic = event.topic();
        if let Err(e) =
            self.publisher
                .publish(Context::default(), &topic, &self.namespace, Box::new(event))
        {
            log::warn!("publish {topic}: {e}");
        }
    }
}

fn ok<T>(r: Result<T>) -> TtrpcResult<T> {
    r.map_err(|e| {
        log::warn!("{e}");
        e.into()
    })
}

fn timestamp(
    exit: &Option<Exit>,
) -> MessageField<containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp> {
    MessageField::from_option(exit.as_ref().map(|e| e.at.clone()))
}

impl Service {
    /// A service publishing events of `namespace` through `publisher`;
    /// `exit` is signalled once containerd shuts the shim down.
    pub fn new(
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Result<Service> {
        let runtime = Runtime::new(ferry::Config::default())?;
        Ok(Service {
            namespace: namespace.to_string(),
            runtime,
            publisher: Arc::new(publisher),
            tasks: Arc::new(Mutex::new(HashMap::new())),
            exit,
        })
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<String, Task>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn events(&self) -> Events {
        Events {
            namespace: self.namespace.clone(),
            publisher: Arc::clone(&self.publisher),
        }
    }

    /// Runs `f` on task `id`.
    fn with_task<T>(&self, id: &str, f: impl FnOnce(&mut Task) -> Result<T>) -> Result<T> {
        let mut tasks = self.tasks();
        let task = tasks
            .get_mut(id)
            .ok_or_else(|| ShimError::not_found(id, ""))?;
        f(task)
    }

    fn do_create(&self, req: &api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(ShimError::new(
                Kind::Invalid,
                "SHIM_RESTORE_UNSUPPORTED",
                "creating a task from a checkpoint is not supported",
                "restore the checkpoint's ferry bundle with `ferry restore`",
            ));
        }
        if self.tasks().contains_key(&req.id) {
            return Err(ShimError::new(
                Kind::Precondition,
                "SHIM_TASK_EXISTS",
                format!("task {:?} exists already", req.id),
                "delete it first (`ctr task delete`)",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(&bundle)?;
        let launch = spec
            .process
            .as_ref()
            .ok_or_else(|| {
                ShimError::new(
                    Kind::Invalid,
                    "SHIM_SPEC_INVALID",
                    "the spec has no process",
                    "give the container a command",
                )
            })?
            .launch()?;
        let root_dir = spec.root_dir(&bundle);
        let name = vm_name(&self.namespace, &req.id);
        let image = rootfs::image_path(&self.runtime, &name);
        rootfs::prepare(&image, &root_dir, &req.rootfs, |root| {
            rootfs::check_executable(root, &launch.args[0], launch.path())
        })?;
        // A VM left by a shim of the same task that died.
        if let Ok(old) = self.runtime.open(&name) {
            let _ = old.remove();
        }
        let vm = self
            .runtime
            .boot(BootOptions {
                image: Some(image.clone()),
                name: Some(name),
                cpus: spec.cpus(),
                memory_mib: spec.memory_mib(),
                ephemeral: true,
                ..BootOptions::default()
            })
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&image);
            })?;
        let pid = match vm.status() {
            VmStatus::Running { pid } => pid,
            _ => 0,
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new("", launch, stdio);
        self.tasks().insert(
            req.id.clone(),
            Task {
                bundle: bundle.clone(),
                root_dir,
                image,
                vm,
                pid,
                init,
                execs: HashMap::new(),
                paused: false,
                oom_kills: Arc::new(AtomicU64::new(0)),
            },
        );
        self.events().send(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn do_start(&self, req: &api::StartRequest) -> Result<api::StartResponse> {
        let (vm, process, task_pid, seen) = self.with_task(&req.id, |t| {
            let p = t.process(&req.id, &req.exec_id)?;
            if !p.exec_id.is_empty() && t.init.status() == Status::Stopped {
                return Err(stopped_task(&req.id));
            }
            Ok((t.vm.clone(), p, t.pid, Arc::clone(&t.oom_kills)))
        })?;
        let events = self.events();
        let id = req.id.clone();
        // The guest kernel's OOM killer ends processes with SIGKILL and
        // counts its kills: a new one is the container's (the VM is its
        // own). Asked before the exit is recorded, so before containerd,
        // woken by it, can delete the task and its VM.
        let oom = {
            let (events, id, vm) = (self.events(), req.id.clone(), vm.clone());
            move |code: u32| {
                if code != 128 + libc::SIGKILL as u32 {
                    return;
                }
                let kills = oom_kills(&vm).unwrap_or(0);
                if kills > seen.fetch_max(kills, Ordering::SeqCst) {
                    events.send(TaskOOM {
                        container_id: id,
                        ..Default::default()
                    });
                }
            }
        };
        let guest_pid = process.start(&vm, oom, move |p, exit| {
            let is_init = p.exec_id.is_empty();
            events.send(TaskExit {
                container_id: id.clone(),
                id: if is_init {
                    id.clone()
                } else {
                    p.exec_id.clone()
                },
                pid: if is_init { task_pid } else { p.pid() },
                exit_status: exit.code,
                exited_at: MessageField::some(exit.at.clone()),
                ..Default::default()
            });
        })?;
        let pid = if process.exec_id.is_empty() {
            task_pid
        } else {
            guest_pid
        };
        if process.exec_id.is_empty() {
            self.events().send(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            });
        } else {
            self.events().send(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            });
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        if !req.exec_id.is_empty() {
            let (p, _) = self.with_task(&req.id, |t| {
                let p = t.process(&req.id, &req.exec_id)?;
                if p.status() == Status::Running {
                    return Err(running(&req.exec_id));
                }
                t.execs.remove(&req.exec_id);
                Ok((p, ()))
            })?;
            let exit = p.exit();
            return Ok(api::DeleteResponse {
                pid: p.pid(),
                exit_status: exit.as_ref().map_or(0, |e| e.code),
                exited_at: timestamp(&exit),
                ..Default::default()
            });
        }
        let task = {
            let mut tasks = self.tasks();
            let t = tasks
                .get(&req.id)
                .ok_or_else(|| ShimError::not_found(&req.id, ""))?;
            if t.init.status() == Status::Running {
                return Err(running(&req.id));
            }
            tasks.remove(&req.id).expect("looked up above")
        };
        let exit = task.init.exit();
        task.vm.remove()?;
        rootfs::unmount(&task.root_dir);
        let _ = std::fs::remove_file(&task.image);
        self.events().send(TaskDelete {
            container_id: req.id.clone(),
            pid: task.pid,
            exit_status: exit.as_ref().map_or(0, |e| e.code),
            exited_at: timestamp(&exit),
            ..Default::default()
        });
        log::info!(
            "task {} deleted, VM removed ({})",
            req.id,
            task.bundle.display()
        );
        Ok(api::DeleteResponse {
            pid: task.pid,
            exit_status: exit.as_ref().map_or(0, |e| e.code),
            exited_at: timestamp(&exit),
            ..Default::default()
        })
    }

    fn do_exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let spec = ProcessSpec::parse(&req.spec.value)?;
        let launch = spec.launch()?;
        self.with_task(&req.id, |t| {
            if t.init.status() == Status::Stopped {
                return Err(stopped_task(&req.id));
            }
            if t.execs.contains_key(&req.exec_id) {
                return Err(ShimError::new(
                    Kind::Precondition,
                    "SHIM_EXEC_EXISTS",
                    format!("task {:?} has a process {:?} already", req.id, req.exec_id),
                    "use another exec id",
                ));
            }
            let stdio = Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            t.execs.insert(
                req.exec_id.clone(),
                Process::new(&req.exec_id, launch, stdio),
            );
            Ok(())
        })?;
        self.events().send(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    fn do_state(&self, req: &api::StateRequest) -> Result<api::StateResponse> {
        self.with_task(&req.id, |t| {
            let p = t.process(&req.id, &req.exec_id)?;
            let status = match p.status() {
                Status::Created => api::Status::CREATED,
                Status::Running if t.paused => api::Status::PAUSED,
                Status::Running => api::Status::RUNNING,
                Status::Stopped => api::Status::STOPPED,
            };
            let exit = p.exit();
            Ok(api::StateResponse {
                id: if p.exec_id.is_empty() {
                    req.id.clone()
                } else {
                    p.exec_id.clone()
                },
                bundle: t.bundle.display().to_string(),
                pid: t.pid_of(&p),
                status: status.into(),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: exit.as_ref().map_or(0, |e| e.code),
                exited_at: timestamp(&exit),
                exec_id: p.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    fn do_kill(&self, req: &api::KillRequest) -> Result<()> {
        let (p, pid) = self.with_task(&req.id, |t| {
            let p = t.process(&req.id, &req.exec_id)?;
            let pid = t.pid_of(&p);
            Ok((p, pid))
        })?;
        if let Signalled::EndedBeforeStart(exit) = p.signal(req.signal)? {
            self.events().send(TaskExit {
                container_id: req.id.clone(),
                id: if p.exec_id.is_empty() {
                    req.id.clone()
                } else {
                    p.exec_id.clone()
                },
                pid,
                exit_status: exit.code,
                exited_at: MessageField::some(exit.at),
                ..Default::default()
            });
        }
        Ok(())
    }

    fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let vm = self.with_task(id, |t| Ok(t.vm.clone()))?;
        if pause {
            vm.pause()?;
        } else if vm.is_paused() {
            vm.resume()?;
        }
        self.with_task(id, |t| {
            t.paused = pause;
            Ok(())
        })?;
        if pause {
            self.events().send(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            });
        } else {
            self.events().send(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            });
        }
        Ok(())
    }

    fn do_checkpoint(&self, req: &api::CheckpointTaskRequest) -> Result<()> {
        let vm = self.with_task(&req.id, |t| Ok(t.vm.clone()))?;
        let dir = Path::new(&req.path);
        std::fs::create_dir_all(dir).map_err(|e| {
            ShimError::new(
                Kind::Internal,
                "SHIM_CHECKPOINT_FAILED",
                format!("create {}: {e}", dir.display()),
                "check the checkpoint directory is writable",
            )
        })?;
        let bundle = dir.join(CHECKPOINT_FILE);
        vm.snapshot_to_path(
            &bundle,
            &SnapshotOptions {
                leave_running: true,
                ..SnapshotOptions::default()
            },
        )?;
        self.events().send(TaskCheckpointed {
            container_id: req.id.clone(),
            checkpoint: bundle.display().to_string(),
            ..Default::default()
        });
        Ok(())
    }

    fn do_stats(&self, req: &api::StatsRequest) -> Result<api::StatsResponse> {
        let (vm, processes) = self.with_task(&req.id, |t| {
            let running = t
                .execs
                .values()
                .filter(|p| p.status() == Status::Running)
                .count()
                + usize::from(t.init.status() == Status::Running);
            Ok((t.vm.clone(), running as u64))
        })?;
        let stats = vm.stats()?;
        let limit = u64::from(vm.info().memory_mib) << 20;
        let metrics = Metrics {
            memory: MessageField::some(MemoryStat {
                rss: stats.vmm_rss_bytes,
                usage: MessageField::some(MemoryEntry {
                    usage: stats.guest_resident_bytes,
                    limit,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: processes,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = metrics.write_to_bytes().map_err(|e| {
            ShimError::new(
                Kind::Internal,
                "SHIM_STATS_FAILED",
                e.to_string(),
                "retry; report it if it persists",
            )
        })?;
        Ok(api::StatsResponse {
            // The bare message name, as containerd's own shims write it.
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v1.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// The file a checkpoint writes into containerd's checkpoint directory.
pub const CHECKPOINT_FILE: &str = "ferry.snap";

fn running(id: &str) -> ShimError {
    ShimError::new(
        Kind::Precondition,
        "SHIM_TASK_RUNNING",
        format!("{id:?} is still running"),
        "kill it first (`ctr task kill`), or wait for it to exit",
    )
}

fn stopped_task(id: &str) -> ShimError {
    ShimError::new(
        Kind::Precondition,
        "SHIM_TASK_STOPPED",
        format!("task {id:?} has exited"),
        "start a new container; a task whose init process exited runs nothing more",
    )
}

impl TaskApi for Service {
    fn state(&self, _: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        ok(self.do_state(&req))
    }

    fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        log::info!("create {} in {}", req.id, req.bundle);
        ok(self.do_create(&req))
    }

    fn start(&self, _: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        ok(self.do_start(&req))
    }

    fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        ok(self.do_delete(&req))
    }

    fn pids(&self, _: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        ok(self.with_task(&req.id, |t| {
            let mut processes = vec![ProcessInfo {
                pid: t.pid,
                ..Default::default()
            }];
            processes.extend(
                t.execs
                    .values()
                    .filter(|p| p.status() == Status::Running)
                    .map(|p| ProcessInfo {
                        pid: p.pid(),
                        ..Default::default()
                    }),
            );
            Ok(api::PidsResponse {
                processes,
                ..Default::default()
            })
        }))
    }

    fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        ok(self.do_pause(&req.id, true).map(|_| api::Empty::new()))
    }

    fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        ok(self.do_pause(&req.id, false).map(|_| api::Empty::new()))
    }

    fn checkpoint(
        &self,
        _: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        ok(self.do_checkpoint(&req).map(|_| api::Empty::new()))
    }

    fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        ok(self.do_kill(&req).map(|_| api::Empty::new()))
    }

    fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        ok(self.do_exec(&req).map(|_| api::Empty::new()))
    }

    fn resize_pty(&self, _: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        ok(self
            .with_task(&req.id, |t| t.process(&req.id, &req.exec_id))
            .and_then(|p| {
                p.resize(
                    req.height.min(u16::MAX as u32) as u16,
                    req.width.min(u16::MAX as u32) as u16,
                )
            })
            .map(|_| api::Empty::new()))
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        ok(self
            .with_task(&req.id, |t| t.process(&req.id, &req.exec_id))
            .map(|p| {
                if req.stdin {
                    p.close_stdin();
                }
                api::Empty::new()
            }))
    }

    fn wait(&self, _: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let p = ok(self.with_task(&req.id, |t| t.process(&req.id, &req.exec_id)))?;
        let exit = p.wait();
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    fn stats(&self, _: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        ok(self.do_stats(&req))
    }

    fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.tasks().get(&req.id).map_or(0, |t| t.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.tasks().is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_vmstat() {
        let vmstat = "pgfault 1234\noom_kill 2\nnr_free_pages 9\n";
        assert_eq!(parse_oom_kills(vmstat), Some(2));
        assert_eq!(parse_oom_kills("pgfault 1\n"), None);
    }

    #[test]
    fn vm_names_are_valid_and_stable() {
        assert_eq!(vm_name("default", "web"), "ctr-default-web");
        let long = vm_name("k8s.io", &"a".repeat(64));
        assert_eq!(long.len(), 63);
        assert_eq!(long, vm_name("k8s.io", &"a".repeat(64)));
        assert_ne!(long, vm_name("k8s.io", &"a".repeat(65)));
        let odd = vm_name("moby", "x/y:z");
        assert!(odd.starts_with("ctr-moby-x-y-z-"), "{odd}");
        assert!(ferry::parse::vm_name(&odd).is_ok());
        assert!(ferry::parse::vm_name(&long).is_ok());
    }

    /// A service whose events go to a socket nobody answers (they are
    /// only logged as lost), with ferry's directories in `tmp`.
    fn service(tmp: &Path) -> (Service, std::os::unix::net::UnixListener) {
        let sock = tmp.join("events.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let publisher = RemotePublisher::new(format!("unix://{}", sock.display())).unwrap();
        let mut s = Service::new("test", publisher, Arc::new(ExitSignal::default())).unwrap();
        s.runtime = Runtime::new(ferry::Config::with_dirs(
            tmp.join("data"),
            tmp.join("cache"),
        ))
        .unwrap();
        (s, listener)
    }

    #[test]
    fn requests_for_unknown_tasks_and_bad_bundles_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let (svc, _events) = service(tmp.path());
        let e = svc
            .do_state(&api::StateRequest {
                id: "nope".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.kind),
            ("SHIM_TASK_NOT_FOUND", Kind::NotFound)
        );

        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        let create = |id: &str| api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            ..Default::default()
        };
        // No config.json.
        let e = svc.do_create(&create("a")).unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.kind),
            ("SHIM_SPEC_INVALID", Kind::Invalid)
        );
        // A command the rootfs does not have.
        std::fs::write(
            bundle.join("config.json"),
            br#"{"process":{"args":["/bin/app"],"cwd":"/"},"root":{"path":"rootfs"}}"#,
        )
        .unwrap();
        let e = svc.do_create(&create("b")).unwrap_err();
        assert_eq!(e.code, "SHIM_EXECUTABLE_NOT_FOUND");
        assert!(svc.tasks().is_empty(), "a failed create keeps nothing");
        // A checkpoint to restore from is refused before anything is made.
        let mut req = create("c");
        req.checkpoint = "/some/checkpoint".into();
        assert_eq!(
            svc.do_create(&req).unwrap_err().code,
            "SHIM_RESTORE_UNSUPPORTED"
        );
        assert!(!tmp.path().join("data/containers/ctr-test-b.ext4").exists());
    }
}
