//! A VM handle and what runs in it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::{ExecEvent, ExecHandle, ExecInput, ExecRequest, ExitStatus};
use ferry_runtime::forward::PortForward;
use ferry_runtime::machine::{Machine, SnapshotOptions, SnapshotReport};
use ferry_runtime::plan::ForkReport;
use ferry_runtime::snapshot::fork::Sibling;
use ferry_runtime::stats::Stats;
use ferry_runtime::vm::control::DirtyAction;
use ferry_runtime::vm::VmStatus;

use crate::files::CopyProgress;

use crate::error::{Error, Result};
use crate::VmInfo;

/// A VM on this host. Cheap to clone; `Send + Sync`. The VM lives in its own
/// process: dropping the handle leaves it running.
#[derive(Debug, Clone)]
pub struct Vm {
    machine: Arc<Machine>,
}

/// How to run a command.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    pub cwd: Option<String>,
    /// Guest user (name, uid, name:group or uid:gid).
    pub user: Option<String>,
    /// Bytes written to the command's stdin, which is then closed
    /// ([`Vm::exec`]); for [`Vm::spawn`], whether stdin is open at all is
    /// `stdin.is_some()` and these bytes are written first.
    pub stdin: Option<Vec<u8>>,
    /// Kill the command after this long.
    pub timeout: Option<Duration>,
    /// Run on a pseudo-terminal of (rows, columns).
    pub tty: Option<(u16, u16)>,
}

impl ExecOptions {
    /// The request for `cmd`; what these options leave unset comes from
    /// the VM's exec defaults (an OCI image's Env, WorkingDir and User).
    fn request<S: AsRef<str>>(
        &self,
        cmd: &[S],
        defaults: Option<&ferry_runtime::vm::record::ExecDefaults>,
    ) -> ExecRequest {
        let mut req = ExecRequest::new(cmd.iter().map(|s| s.as_ref().to_string()));
        if let Some(d) = defaults {
            for (k, v) in &d.env {
                if !self.env.iter().any(|(name, _)| name == k) {
                    req = req.env(k, v);
                }
            }
        }
        for (k, v) in &self.env {
            req = req.env(k, v);
        }
        if let Some(c) = self
            .cwd
            .as_ref()
            .or(defaults.and_then(|d| d.workdir.as_ref()))
        {
            req = req.cwd(c);
        }
        if let Some(u) = self
            .user
            .as_ref()
            .or(defaults.and_then(|d| d.user.as_ref()))
        {
            req = req.user(u);
        }
        if let Some(t) = self.timeout {
            req = req.timeout(t);
        }
        if let Some((rows, cols)) = self.tty {
            req = req.pty(rows, cols);
        }
        if self.stdin.is_some() {
            req = req.with_stdin();
        }
        req
    }
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// All of its stdout (or its pty's output).
    pub stdout: Vec<u8>,
    /// All of its stderr.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Its exit code, if it exited.
    pub fn exit_code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The signal that ended it, if one did.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }
}

/// Output or the end of a [`Child`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildEvent {
    /// Bytes on stdout (or the pty).
    Stdout(Vec<u8>),
    /// Bytes on stderr.
    Stderr(Vec<u8>),
    /// It ended; no events follow.
    Exit(ExitStatus),
}

/// A running command: write its stdin, signal it, resize its pty, read its
/// output as it comes. [`Child::input`] gives a handle for another thread.
pub struct Child {
    handle: ExecHandle,
    input: ExecInput,
}

impl Child {
    /// Its process id in the guest.
    pub fn pid(&self) -> u32 {
        self.handle.pid()
    }

    /// A cloneable handle to its stdin, signals and pty size, for other threads.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// Writes to its stdin.
    pub fn write_stdin(&self, data: &[u8]) -> Result<()> {
        Ok(self.input.write_stdin(data)?)
    }

    /// Closes its stdin (end of file).
    pub fn close_stdin(&self) -> Result<()> {
        Ok(self.input.close_stdin()?)
    }

    /// Sends it a signal (`libc::SIGTERM` and the like).
    pub fn signal(&self, signal: i32) -> Result<()> {
        Ok(self.input.signal(signal)?)
    }

    /// Resizes its pty.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        Ok(self.input.resize(rows, cols)?)
    }

    /// The next output, or its end. Blocks.
    pub fn next_event(&mut self) -> Result<ChildEvent> {
        Ok(match self.handle.next_event()? {
            ExecEvent::Stdout(b) => ChildEvent::Stdout(b),
            ExecEvent::Stderr(b) => ChildEvent::Stderr(b),
            ExecEvent::Exit(s) => ChildEvent::Exit(s),
        })
    }

    /// Waits for it to end, discarding output not read yet. Blocks.
    pub fn wait(self) -> Result<ExitStatus> {
        Ok(self.handle.wait()?)
    }
}

/// Which siblings a fork makes.
#[derive(Debug, Clone, Default)]
pub struct ForkOptions {
    /// Their names; when empty, `count` siblings get generated names.
    pub names: Vec<String>,
    /// How many siblings, when no names are given (1 when absent).
    pub count: Option<usize>,
    /// Host port forwards of each sibling, in order (none when absent: the
    /// source's are never inherited).
    pub ports: Vec<Vec<PortForward>>,
}

/// A port forward added at run time; [`PortHandle::close`] removes it.
#[derive(Debug)]
pub struct PortHandle {
    vm: Vm,
    forward: PortForward,
}

impl PortHandle {
    /// The forward.
    pub fn forward(&self) -> PortForward {
        self.forward
    }

    /// Stops forwarding and releases the host port.
    pub fn close(self) -> Result<()> {
        Ok(self.vm.machine.unexpose(self.forward)?)
    }
}

impl Vm {
    pub(crate) fn new(machine: Machine) -> Vm {
        Vm {
            machine: Arc::new(machine),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.machine.name()
    }

    /// Its state directory (console log, sockets, disk layer).
    pub fn dir(&self) -> &Path {
        &self.machine.dir.root
    }

    /// Running (with its VMM's pid) or stopped (and why).
    pub fn status(&self) -> VmStatus {
        self.machine.status()
    }

    /// Whether it goes away once it stops (an attached `ferry boot`'s VM).
    pub fn ephemeral(&self) -> bool {
        self.machine.record.ephemeral
    }

    /// Whether its vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.machine.is_paused()
    }

    /// What `Runtime::list` shows of it.
    pub fn info(&self) -> VmInfo {
        let r = &self.machine.record;
        VmInfo {
            name: r.name.clone(),
            status: self.status(),
            cpus: r.cpus,
            memory_mib: r.memory_mib,
            ports: ferry_runtime::vm::record::read_json::<ferry_runtime::vm::VmRecord>(
                &self.machine.dir.record(),
            )
            .map(|r| r.ports)
            .unwrap_or_else(|| r.ports.clone()),
            image: r.image.clone(),
            dir: self.machine.dir.root.clone(),
        }
    }

    /// The guest agent's client, for streaming use beyond [`Vm::spawn`]
    /// (each operation opens its own connection).
    pub fn client(&self) -> ferry_protocol::Client {
        self.machine.client()
    }

    /// What is known after a connection to the VM broke: whether its VMM
    /// runs, and the ends of its console and VMM log.
    pub fn post_mortem(&self) -> String {
        self.machine.post_mortem()
    }

    /// Runs `cmd` to its end and collects its output. Blocks.
    pub fn exec<S: AsRef<str>>(&self, cmd: &[S], opts: &ExecOptions) -> Result<ExecOutput> {
        let out = self.machine.client().output(
            opts.request(cmd, self.machine.record.exec_defaults.as_ref()),
            opts.stdin.as_deref(),
        )?;
        Ok(ExecOutput {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// Writes `files` (path, contents, mode), then runs `steps` one after
    /// another while each exits 0, all with `opts` (stdin and tty aside):
    /// one round trip when the files are small enough to travel with the
    /// steps (together under 768 KiB), else the files first, one by one.
    /// Returns the output of every step that ran and the status of the
    /// last one. Blocks.
    pub fn exec_batch<S: AsRef<str>>(
        &self,
        files: &[(String, Vec<u8>, u32)],
        steps: &[Vec<S>],
        opts: &ExecOptions,
    ) -> Result<ExecOutput> {
        const INLINE_BYTES: usize = 768 << 10;
        if steps.is_empty() || steps.len() > ferry_protocol::MAX_BATCH_STEPS {
            return Err(crate::Error::new(
                "EXEC_BATCH_INVALID",
                format!(
                    "a batch runs 1 to {} commands, not {}",
                    ferry_protocol::MAX_BATCH_STEPS,
                    steps.len()
                ),
                None,
            ));
        }
        let client = self.machine.client();
        let small = files.len() <= ferry_protocol::MAX_BATCH_FILES
            && files
                .iter()
                .map(|(p, d, _)| p.len() + d.len())
                .sum::<usize>()
                <= INLINE_BYTES;
        let staged = if small {
            files
                .iter()
                .map(|(path, data, mode)| ferry_protocol::StagedFile {
                    path: path.clone(),
                    mode: *mode,
                    data: data.clone(),
                })
                .collect()
        } else {
            for (path, data, mode) in files {
                client.write_file_bytes(path, *mode, data)?;
            }
            Vec::new()
        };
        let defaults = self.machine.record.exec_defaults.as_ref();
        let requests: Vec<_> = steps
            .iter()
            .map(|cmd| opts.request(cmd, defaults))
            .collect();
        match client.batch_output(staged.clone(), requests.clone()) {
            Ok(out) => Ok(ExecOutput {
                status: out.status,
                stdout: out.stdout,
                stderr: out.stderr,
            }),
            // An agent from before batches refuses the frame: the same, one
            // request at a time.
            Err(ferry_protocol::ClientError::Agent {
                code: ferry_protocol::ErrorCode::Malformed,
                ..
            }) => {
                for f in &staged {
                    client.write_file_bytes(&f.path, f.mode, &f.data)?;
                }
                let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
                let mut status = None;
                for req in requests {
                    let out = client.output(req, None)?;
                    stdout.extend(out.stdout);
                    stderr.extend(out.stderr);
                    let ok = out.status.success();
                    status = Some(out.status);
                    if !ok {
                        break;
                    }
                }
                Ok(ExecOutput {
                    status: status.expect("at least one step ran"),
                    stdout,
                    stderr,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts `cmd` and returns at once with a handle to it.
    pub fn spawn<S: AsRef<str>>(&self, cmd: &[S], opts: &ExecOptions) -> Result<Child> {
        let handle = self
            .machine
            .client()
            .exec(opts.request(cmd, self.machine.record.exec_defaults.as_ref()))?;
        let input = handle.input();
        if let Some(data) = opts.stdin.as_deref().filter(|d| !d.is_empty()) {
            input.write_stdin(data)?;
        }
        Ok(Child { handle, input })
    }

    /// Writes `data` to the guest file `path` with permission bits `mode`.
    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.machine.client().write_file_bytes(path, mode, data)?;
        Ok(())
    }

    /// Reads the guest file `path`: its bytes and permission bits.
    pub fn read_file(&self, path: &str) -> Result<(Vec<u8>, u32)> {
        let (data, info) = self.machine.client().read_file_bytes(path)?;
        Ok((data, info.mode))
    }

    /// Copies a host file or directory tree to `guest` (a tree needs `tar`
    /// in the guest). Returns the bytes of file data copied.
    pub fn copy_in(&self, local: &Path, guest: &str) -> Result<u64> {
        self.copy_in_with_progress(local, guest, &|_| {})
    }

    /// [`Vm::copy_in`], calling `progress` as the data goes out.
    pub fn copy_in_with_progress(
        &self,
        local: &Path,
        guest: &str,
        progress: &(dyn Fn(CopyProgress) + Sync),
    ) -> Result<u64> {
        if local.is_dir() {
            crate::files::tree_in(&self.machine.client(), local, guest, progress)
        } else {
            Ok(self
                .machine
                .client()
                .copy_in_with_progress(local, guest, &mut |bytes, total| {
                    progress(CopyProgress {
                        bytes,
                        total: Some(total),
                    })
                })?)
        }
    }

    /// Copies a guest file or directory tree to `local` (a tree needs `tar`
    /// in the guest). Returns the bytes of file data copied.
    pub fn copy_out(&self, guest: &str, local: &Path) -> Result<u64> {
        self.copy_out_with_progress(guest, local, &|_| {})
    }

    /// [`Vm::copy_out`], calling `progress` as the data arrives.
    pub fn copy_out_with_progress(
        &self,
        guest: &str,
        local: &Path,
        progress: &(dyn Fn(CopyProgress) + Sync),
    ) -> Result<u64> {
        if self.is_dir(guest)? {
            crate::files::tree_out(&self.machine.client(), guest, local, progress)
        } else {
            Ok(self
                .machine
                .client()
                .copy_out_with_progress(guest, local, &mut |bytes, total| {
                    progress(CopyProgress {
                        bytes,
                        total: Some(total),
                    })
                })?
                .size)
        }
    }

    /// Whether `path` is a directory in the guest (following symlinks).
    pub fn is_dir(&self, path: &str) -> Result<bool> {
        crate::files::guest_is_dir(&self.machine.client(), path)
    }

    /// Freezes the VM into a bundle file. Unless `leave_running`, the VM is
    /// handed off: it stops and now lives in the bundle. Blocks.
    pub fn snapshot_to_path(&self, path: &Path, opts: &SnapshotOptions) -> Result<SnapshotReport> {
        Ok(self.machine.snapshot_to_path(path, opts)?)
    }

    /// [`Vm::snapshot_to_path`], calling `progress` with the bytes written so
    /// far about five times a second while the bundle is being written.
    pub fn snapshot_to_path_with_progress(
        &self,
        path: &Path,
        opts: &SnapshotOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<SnapshotReport> {
        // The VMM process writes the bundle under a temporary name, so its
        // size is what has been written.
        let partial = match (std::path::absolute(path), self.status()) {
            (Ok(dest), VmStatus::Running { pid }) => {
                Some(ferry_snapshot::writer::partial_path(&dest, pid))
            }
            _ => None,
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            if let Some(partial) = partial.as_deref() {
                let done = &done;
                scope.spawn(move || {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(meta) = std::fs::metadata(partial) {
                            progress(meta.len());
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                });
            }
            let result = self.snapshot_to_path(path, opts);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            result
        })
    }

    /// Freezes the VM into a bundle written to `out`. If `out` fails before
    /// the end, the VM is not handed off and runs on. Blocks.
    pub fn snapshot_to_writer(
        &self,
        out: &mut (dyn std::io::Write + Send),
        opts: &SnapshotOptions,
    ) -> Result<SnapshotReport> {
        Ok(self.machine.snapshot_to_writer(out, opts)?)
    }

    /// Pushes the VM to the store at `store` (`s3://BUCKET/PREFIX`): a
    /// snapshot cut into content-addressed chunks, of which only those the
    /// store lacks are uploaded (pushing again after a small change sends
    /// little). The VM keeps running unless `stop`. The report's `url`
    /// restores it anywhere ([`crate::RestoreSource::Store`]).
    pub fn push(
        &self,
        store: &str,
        stop: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<crate::PushReport> {
        let url = crate::StoreUrl::parse(store)?;
        Ok(ferry_runtime::store::push_machine(
            &self.machine.config,
            &self.machine,
            &url,
            stop,
            progress,
        )?)
    }

    /// Migrates the running VM live to `target`: memory is copied while it
    /// runs, then it pauses for the last changed pages and its state, and
    /// runs on the destination. This VM is gone once the destination
    /// confirms; on any failure before that it runs on here. Blocks.
    pub fn migrate(
        &self,
        target: &crate::MigrateTarget,
        opts: &crate::MigrateOptions,
    ) -> Result<crate::MigrateReport> {
        let link = ferry_runtime::migrate::open_link(target, opts)?;
        Ok(self.machine.migrate(link, opts)?)
    }

    /// Forks the VM (running or paused) into siblings, all from one pause;
    /// each has its own name, hostname, RNG state and copy-on-write memory
    /// and disk. A paused source stays paused. Blocks.
    pub fn fork(&self, opts: &ForkOptions) -> Result<(Vec<Vm>, ForkReport)> {
        let names: Vec<String> = if opts.names.is_empty() {
            let n = opts.count.unwrap_or(1);
            (0..n)
                .map(|_| {
                    ferry_runtime::fsutil::random_hex(3)
                        .map(|h| format!("{}-{h}", self.name()))
                        .map_err(|e| Error::new("VM_IO", format!("random name: {e}"), None))
                })
                .collect::<Result<_>>()?
        } else {
            opts.names.clone()
        };
        let siblings: Vec<Sibling> = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| Sibling {
                name,
                ports: opts.ports.get(i).cloned().unwrap_or_default(),
            })
            .collect();
        let (made, report) = ferry_runtime::snapshot::fork::fork(&self.machine, &siblings)?;
        Ok((made.into_iter().map(Vm::new).collect(), report))
    }

    /// Stops the vCPUs; memory, devices and forwards stay.
    pub fn pause(&self) -> Result<()> {
        Ok(self.machine.pause()?)
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<()> {
        Ok(self.machine.resume()?)
    }

    /// Asks the guest to power off and, after `timeout`, ends the VM; returns
    /// once its VMM process has exited (its ports are free). Blocks.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        Ok(self.machine.stop(timeout)?)
    }

    /// Ends the VM at once, without asking the guest.
    pub fn kill(&self) -> Result<()> {
        Ok(self.machine.kill()?)
    }

    /// Ends the VM if it runs and deletes its state.
    pub fn remove(&self) -> Result<()> {
        Ok(Machine::clone(&self.machine).remove()?)
    }

    /// Forwards `forward` into the guest from now on; the returned handle
    /// closes it.
    pub fn expose_port(&self, forward: PortForward) -> Result<PortHandle> {
        self.machine.expose(forward)?;
        Ok(PortHandle {
            vm: self.clone(),
            forward,
        })
    }

    /// Sends `signal` to the VM's main command (the one that ends the VM
    /// when it exits) and its process group, through the guest agent, which
    /// supervises it; `WORKLOAD_NOT_RUNNING` when there is none running.
    pub fn signal_workload(&self, signal: i32) -> Result<()> {
        Ok(self.machine.client().signal_main(signal)?)
    }

    /// Writes the VM's root filesystem as an image (`spec.out`) with the
    /// spec's defaults (command, environment, workdir), after running the
    /// spec's steps: the end of a bake whose other steps the caller ran
    /// itself against this VM. The VM is removed afterwards, whatever
    /// happens. Blocks.
    pub fn bake(
        self,
        spec: &crate::BakeSpec,
        progress: &mut dyn crate::BakeProgress,
    ) -> Result<crate::BakeReport> {
        let machine = Machine::clone(&self.machine);
        Ok(ferry_runtime::bake::bake_running(machine, spec, progress)?)
    }

    /// Memory use of the VMM process and the guest.
    pub fn stats(&self) -> Result<Stats> {
        Ok(self.machine.stats()?)
    }

    /// Starts, reads or stops the record of the guest pages the guest or
    /// its devices changed: `Take` returns the pages changed since `Start`
    /// or the previous `Take` (what a live migration's next round or an
    /// incremental snapshot would carry); the other actions return 0.
    #[doc(hidden)]
    pub fn dirty_pages(&self, action: DirtyAction) -> Result<u64> {
        Ok(self.machine.dirty_pages(action)?)
    }

    /// The guest's serial console so far.
    pub fn logs(&self) -> Result<Vec<u8>> {
        Ok(self.machine.console()?)
    }
}
