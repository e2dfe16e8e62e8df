//! Baking images: boot a VM from a base image, copy files in, run build steps,
//! record the image's defaults, and export its root filesystem as a tarball that
//! `ferry boot` accepts.
//!
//! ```no_run
//! use ferry_runtime::bake::{bake, BakeSpec, Silent};
//!
//! let config = std::sync::Arc::new(ferry_runtime::Config::default());
//! let spec = BakeSpec::provision(&["jq"], &["jq", "--version"], "jq.tar.gz");
//! let report = bake(&config, &spec, &mut Silent)?;
//! println!("{} bytes in {}", report.bytes, report.out.display());
//! # Ok::<(), ferry_runtime::bake::BakeError>(())
//! ```
//!
//! The work happens in a detached, ephemeral VM named `bake-<random>`, removed at
//! the end whatever happens. The output is written to a temporary file in the
//! destination directory and renamed into place only once complete, so a failed
//! or interrupted bake never leaves a partial image behind.
//!
//! Everything that touches the VM goes through [`BakeGuest`] so the sequencing,
//! error handling and cleanup can be tested without one.

mod output;
pub mod recipe;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{Client, ClientError, ErrorCode, ExecEvent, ExecRequest, ExitStatus};

use crate::boot::BootSpec;
use crate::config::Config;
use crate::error::Coded;
use crate::images::{ImageConfig, IMAGE_CONFIG_PATH};
use crate::machine::{BootError, Machine};
use crate::vm::VmError;

pub use output::{AtomicOutput, Compression};
pub use recipe::Recipe;

/// Directory contents left out of the exported root filesystem: kernel and
/// runtime filesystems and scratch space (the directories themselves are kept).
pub const EXPORT_EXCLUDES: &[&str] = &["./proc/*", "./sys/*", "./dev/*", "./run/*", "./tmp/*"];

/// Environment set for run steps unless the spec sets it: package installs must
/// never wait for answers nobody can give.
const STEP_DEFAULT_ENV: &[(&str, &str)] = &[("DEBIAN_FRONTEND", "noninteractive")];

/// One build step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Copy a host file or directory into the guest. A file goes to `to` (or into
    /// it when `to` ends with `/`); a directory's contents go into directory `to`.
    /// Relative guest paths are taken from the workdir (or `/`).
    Copy {
        /// Host path.
        from: PathBuf,
        /// Guest path.
        to: String,
    },
    /// Run a shell command line with `/bin/sh -c`.
    Run(String),
}

impl Step {
    /// A one-line description for progress output, at most about 100 characters.
    pub fn summary(&self) -> String {
        match self {
            Step::Copy { from, to } => format!("copy {} -> {to}", from.display()),
            Step::Run(cmd) => {
                let mut lines = cmd.lines().map(str::trim).filter(|l| !l.is_empty());
                let first = lines.next().unwrap_or("");
                let first = first.split_whitespace().collect::<Vec<_>>().join(" ");
                let more = lines.next().is_some();
                if first.chars().count() > 100 {
                    format!("{}…", first.chars().take(99).collect::<String>())
                } else if more {
                    format!("{first} …")
                } else {
                    first
                }
            }
        }
    }
}

/// The header shown before a step runs, e.g. `step 2/3: apt-get install -y nodejs`.
pub fn step_header(number: usize, total: usize, step: &Step) -> String {
    format!("step {number}/{total}: {}", step.summary())
}

/// What to bake.
#[derive(Debug, Clone, Default)]
pub struct BakeSpec {
    /// Image to start from (rootfs tarball or ext4 image); the base image when absent.
    pub from: Option<PathBuf>,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Environment recorded in the image (merged over the base image's), also
    /// set for run steps.
    pub env: BTreeMap<String, String>,
    /// Working directory recorded in the image; created first and used by run steps.
    pub workdir: Option<String>,
    /// Default command recorded in the image (replaces the base image's).
    pub cmd: Option<Vec<String>>,
    /// Output tarball: `.tar`, `.tar.gz`/`.tgz` or `.tar.zst`.
    pub out: PathBuf,
    /// vCPUs of the bake VM.
    pub cpus: Option<u32>,
    /// Memory of the bake VM in MiB.
    pub memory_mib: Option<u32>,
    /// Guest kernel; the installed one when absent.
    pub kernel: Option<PathBuf>,
    /// Set to stop the bake early (e.g. from a Ctrl-C handler): the VM is
    /// stopped, nothing is written, and [`bake`] returns [`BakeError::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
}

impl BakeSpec {
    /// An empty spec writing to `out`, starting from the base image.
    pub fn new(out: impl Into<PathBuf>) -> BakeSpec {
        BakeSpec {
            out: out.into(),
            ..BakeSpec::default()
        }
    }

    /// A spec that installs Debian `packages` (one `apt-get update && apt-get
    /// install -y ...` step that also drops apt's caches and lists, so they do not
    /// end up in the image) and records `cmd` (if not empty) as the default command.
    pub fn provision(packages: &[&str], cmd: &[&str], out: impl Into<PathBuf>) -> BakeSpec {
        let mut spec = BakeSpec::new(out);
        if !packages.is_empty() {
            let names: Vec<String> = packages.iter().map(|p| shell_quote(p)).collect();
            spec.steps.push(Step::Run(format!(
                "apt-get update && apt-get install -y --no-install-recommends {} \
                 && apt-get clean && rm -rf /var/lib/apt/lists/*",
                names.join(" ")
            )));
        }
        if !cmd.is_empty() {
            spec.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
        }
        spec
    }

    /// Starts from `image` instead of the base image.
    pub fn from_image(mut self, image: impl Into<PathBuf>) -> Self {
        self.from = Some(image.into());
        self
    }

    /// Adds a copy step.
    pub fn copy(mut self, from: impl Into<PathBuf>, to: impl Into<String>) -> Self {
        self.steps.push(Step::Copy {
            from: from.into(),
            to: to.into(),
        });
        self
    }

    /// Adds a run step.
    pub fn run(mut self, command: impl Into<String>) -> Self {
        self.steps.push(Step::Run(command.into()));
        self
    }

    /// Sets an environment variable of the image.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the image's working directory.
    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// Sets the image's default command.
    pub fn cmd<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> Self {
        self.cmd = Some(argv.into_iter().map(Into::into).collect());
        self
    }

    /// Checks everything that can be checked without a VM: config values and
    /// that every copy source exists.
    pub fn validate(&self) -> Result<(), BakeError> {
        check_config(&self.env, self.workdir.as_deref()).map_err(BakeError::SpecInvalid)?;
        if matches!(&self.cmd, Some(c) if c.is_empty()) {
            return Err(BakeError::SpecInvalid(
                "the command is an empty list".into(),
            ));
        }
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Copy { from, to } => {
                    if to.is_empty() {
                        return Err(BakeError::SpecInvalid(format!(
                            "step {}: the guest path is empty",
                            i + 1
                        )));
                    }
                    if std::fs::symlink_metadata(from).is_err() || !from.exists() {
                        return Err(BakeError::CopySourceMissing {
                            step: i + 1,
                            path: from.clone(),
                        });
                    }
                }
                Step::Run(cmd) if cmd.trim().is_empty() => {
                    return Err(BakeError::SpecInvalid(format!(
                        "step {}: the command is empty",
                        i + 1
                    )))
                }
                Step::Run(_) => {}
            }
        }
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }
}

/// Checks env names and the workdir.
pub(crate) fn check_config(
    env: &BTreeMap<String, String>,
    workdir: Option<&str>,
) -> Result<(), String> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("environment variable name {k:?} is not valid"));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k} contains a NUL byte"));
        }
    }
    if let Some(w) = workdir {
        if !w.starts_with('/') {
            return Err(format!("workdir {w:?} must be an absolute path"));
        }
    }
    Ok(())
}

/// Quotes `s` for `/bin/sh` when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:=+@%,".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What a finished bake produced.
#[derive(Debug, Clone)]
pub struct BakeReport {
    /// The tarball.
    pub out: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Size of the uncompressed tar stream.
    pub tar_bytes: u64,
    /// How it is compressed.
    pub compression: Compression,
    /// Steps run.
    pub steps: usize,
    /// Name the bake VM had.
    pub vm: String,
    /// The defaults recorded in the image.
    pub config: ImageConfig,
    /// Wall time of the whole bake.
    pub elapsed: Duration,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Receives progress of a bake. Every method has an empty default.
pub trait BakeProgress {
    /// The bake VM is being booted.
    fn booting(&mut self, _vm: &str, _image: &str) {}
    /// The bake VM answers.
    fn booted(&mut self, _vm: &str, _elapsed: Duration) {}
    /// Step `number` of `total` starts.
    fn step_started(&mut self, _number: usize, _total: usize, _step: &Step) {}
    /// Output of the running step, as it arrives.
    fn step_output(&mut self, _stream: OutputStream, _data: &[u8]) {}
    /// Step `number` of `total` succeeded.
    fn step_finished(&mut self, _number: usize, _total: usize, _elapsed: Duration) {}
    /// The root filesystem export starts.
    fn exporting(&mut self) {}
    /// Bytes of tar stream received and bytes written to the file so far.
    fn export_progress(&mut self, _tar_bytes: u64, _file_bytes: u64) {}
    /// Something worth telling that is not an error.
    fn note(&mut self, _message: &str) {}
}

/// Progress that shows nothing.
pub struct Silent;

impl BakeProgress for Silent {}

/// Errors baking an image.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// A copy source does not exist on the host.
    #[error("step {step}: copy source {} does not exist", path.display())]
    CopySourceMissing {
        /// Step number (1-based).
        step: usize,
        /// The missing path.
        path: PathBuf,
    },
    /// The output cannot be written.
    #[error("cannot write the image to {}: {why}", path.display())]
    OutputUnwritable {
        /// Requested output.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The output name says no tarball format.
    #[error("{} does not name a tarball (.tar, .tar.gz, .tgz, .tar.zst)", path.display())]
    OutputFormat {
        /// Requested output.
        path: PathBuf,
    },
    /// The recipe file cannot be read.
    #[error("cannot read recipe {}: {why}", path.display())]
    RecipeUnreadable {
        /// Recipe path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The recipe is not valid.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    RecipeInvalid {
        /// Recipe path.
        path: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The spec is not valid (bad env name, relative workdir, empty command...).
    #[error("{0}")]
    SpecInvalid(String),
    /// A run step exited unsuccessfully.
    #[error("step {number}/{total} failed ({status}): {command}")]
    StepFailed {
        /// Step number (1-based).
        number: usize,
        /// Number of steps.
        total: usize,
        /// The command line.
        command: String,
        /// How it ended, e.g. `exit status 3`.
        status: String,
        /// Its exit code, if it exited normally.
        code: Option<i32>,
    },
    /// A copy step failed.
    #[error("step {number}/{total} (copy {} -> {to}) failed: {why}", from.display())]
    CopyFailed {
        /// Step number (1-based).
        number: usize,
        /// Number of steps.
        total: usize,
        /// Host path.
        from: PathBuf,
        /// Guest path.
        to: String,
        /// Why.
        why: String,
    },
    /// Preparing the guest (workdir, image config) failed.
    #[error("{0}")]
    Setup(String),
    /// Exporting the root filesystem failed.
    #[error("exporting the root filesystem failed: {why}")]
    ExportFailed {
        /// Why.
        why: String,
        /// The end of tar's error output.
        stderr: String,
    },
    /// The bake was cancelled.
    #[error("the bake was cancelled; nothing was written")]
    Cancelled,
    /// The bake VM could not be booted.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Removing the bake VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Talking to the guest agent failed.
    #[error("{context}: {source}")]
    Guest {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: ClientError,
        /// The VM's state and log tails when the connection itself broke.
        diagnosis: Option<String>,
    },
    /// Host I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Coded for BakeError {
    fn code(&self) -> &str {
        match self {
            BakeError::CopySourceMissing { .. } => "BAKE_COPY_SOURCE_MISSING",
            BakeError::OutputUnwritable { .. } => "BAKE_OUTPUT_UNWRITABLE",
            BakeError::OutputFormat { .. } => "BAKE_OUTPUT_FORMAT",
            BakeError::RecipeUnreadable { .. } => "BAKE_RECIPE_UNREADABLE",
            BakeError::RecipeInvalid { .. } => "BAKE_RECIPE_INVALID",
            BakeError::SpecInvalid(_) => "BAKE_SPEC_INVALID",
            BakeError::StepFailed { .. } => "BAKE_STEP_FAILED",
            BakeError::CopyFailed { .. } => "BAKE_COPY_FAILED",
            BakeError::Setup(_) => "BAKE_SETUP_FAILED",
            BakeError::ExportFailed { .. } => "BAKE_EXPORT_FAILED",
            BakeError::Cancelled => "BAKE_CANCELLED",
            BakeError::Boot(e) => e.code(),
            BakeError::Vm(e) => e.code(),
            BakeError::Guest { source, .. } => Coded::code(source),
            BakeError::Io { .. } => "BAKE_IO",
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            BakeError::CopySourceMissing { .. } => Some(
                "copy sources are host paths; in a recipe they are relative to the recipe file"
                    .into(),
            ),
            BakeError::OutputUnwritable { .. } => {
                Some("choose an output in an existing directory you can write to".into())
            }
            BakeError::OutputFormat { .. } => {
                Some("name the output OUT.tar, OUT.tar.gz or OUT.tar.zst".into())
            }
            BakeError::RecipeUnreadable { .. } => {
                Some("pass the path of a TOML recipe with -f (format: docs/bake.md)".into())
            }
            BakeError::SpecInvalid(_) => Some(
                "env names need no `=`, the workdir an absolute path, the command at least a program"
                    .into(),
            ),
            BakeError::CopyFailed { .. } => Some(
                "check the guest path (is a parent a file?) and that the host path is readable"
                    .into(),
            ),
            BakeError::RecipeInvalid { .. } => Some(
                "a recipe has top-level from, output, env, workdir, cmd, cpus, memory and \
                 [[step]] tables each with one of `run = \"...\"` or `copy = { from, to }`"
                    .into(),
            ),
            BakeError::StepFailed { .. } => Some(
                "the step's output is above; fix the step and bake again (no image was written, \
                 the bake VM is gone)"
                    .into(),
            ),
            BakeError::ExportFailed { stderr, .. } if !stderr.is_empty() => {
                Some(format!("tar said:\n{stderr}"))
            }
            BakeError::Boot(e) => e.hint(),
            BakeError::Vm(e) => e.hint(),
            BakeError::Guest {
                source, diagnosis, ..
            } => match (Coded::hint(source), diagnosis) {
                (Some(h), Some(d)) => Some(format!("{h}\n{d}")),
                (h, d) => h.or(d.clone()),
            },
            _ => None,
        }
    }
}

fn guest_err(context: impl Into<String>) -> impl FnOnce(ClientError) -> BakeError {
    let context = context.into();
    move |source| BakeError::Guest {
        context,
        source,
        diagnosis: None,
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCommand {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
}

impl GuestCommand {
    fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> GuestCommand {
        GuestCommand {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
        }
    }
}

/// Callback receiving a command's output; an error aborts the command.
pub type OutputSink<'a> = dyn FnMut(OutputStream, &[u8]) -> io::Result<()> + 'a;

/// The guest a bake runs in.
pub trait BakeGuest {
    /// The guest's name (its hostname).
    fn name(&self) -> &str;
    /// Copies a host file to `guest_path`, creating parent directories, keeping
    /// its permission bits.
    fn copy_file(&mut self, local: &Path, guest_path: &str) -> Result<u64, BakeError>;
    /// Runs a command to completion, feeding it `stdin` if given and passing
    /// its output to `sink` as it arrives.
    fn exec(
        &mut self,
        cmd: &GuestCommand,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut OutputSink<'_>,
    ) -> Result<ExitStatus, BakeError>;
    /// Reads a guest file; `None` if it does not exist.
    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, BakeError>;
    /// Writes a guest file atomically, creating parent directories.
    fn write_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), BakeError>;
    /// Removes the guest. Called once at the end of every bake that launched it.
    fn remove(&mut self) -> Result<(), BakeError>;
    /// Whether the guest's agent has its own tools
    /// ([`ferry_protocol::tools`]): then directories are made, trees copied
    /// and the root filesystem exported without the image's shell or `tar`.
    fn agent_tools(&mut self) -> bool {
        false
    }
    /// Defaults the image carries outside its filesystem (an image from a
    /// registry keeps them in its config), under the spec's.
    fn image_defaults(&self) -> Option<ImageConfig> {
        None
    }
    /// What is known about the guest after its connection broke (state, log
    /// tails), for the error's hint.
    fn diagnose(&self) -> Option<String> {
        None
    }
}

/// Starts guests for bakes.
pub trait GuestLauncher {
    /// Boots guest `name` for `spec`.
    fn launch(&mut self, spec: &BakeSpec, name: &str) -> Result<Box<dyn BakeGuest>, BakeError>;
    /// A function that, called from another thread, makes guest `name` stop so
    /// that whatever the bake waits on (boot, a step, the export) ends. It may
    /// be called before the guest exists and more than once.
    fn interrupter(&self, name: &str) -> Arc<dyn Fn() + Send + Sync>;
    /// The data directory whose journal records the output's temporary
    /// file (see [`crate::journal`]), if any.
    fn data_dir(&self) -> Option<PathBuf> {
        None
    }
}

/// Bakes `spec` in a VM. See the module documentation.
pub fn bake(
    config: &Arc<Config>,
    spec: &BakeSpec,
    progress: &mut dyn BakeProgress,
) -> Result<BakeReport, BakeError> {
    bake_with(
        spec,
        &mut VmLauncher {
            config: Arc::clone(config),
        },
        progress,
    )
}

/// Bakes `spec` in `machine`, a VM its owner already booted and prepared
/// (a program that ran its own steps against it): the spec's steps run, then
/// the image's defaults are written and the root filesystem is exported, as
/// in [`bake`]. `spec.from`, `cpus`, `memory_mib` and `kernel` are not used.
/// The VM is removed at the end whatever happens.
pub fn bake_running(
    machine: Machine,
    spec: &BakeSpec,
    progress: &mut dyn BakeProgress,
) -> Result<BakeReport, BakeError> {
    bake_with(
        spec,
        &mut RunningLauncher {
            machine: Some(machine),
        },
        progress,
    )
}

/// Bakes `spec` in a guest from `launcher`.
pub fn bake_with(
    spec: &BakeSpec,
    launcher: &mut dyn GuestLauncher,
    progress: &mut dyn BakeProgress,
) -> Result<BakeReport, BakeError> {
    let started = Instant::now();
    spec.validate()?;
    // Creating the temporary output first proves the destination is writable
    // before a VM is booted.
    let mut out = AtomicOutput::create(&spec.out, launcher.data_dir().as_deref())?;
    let compression = Compression::for_path(&spec.out).unwrap_or(Compression::None);
    if spec.cancelled() {
        return Err(BakeError::Cancelled);
    }
    let name = format!("bake-{}", crate::machine::random_hex(3)?);
    let image = spec
        .from
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "base".into());
    progress.booting(&name, &image);

    let done = Arc::new(AtomicBool::new(false));
    let watcher = spec.cancel.clone().map(|cancel| {
        let interrupt = launcher.interrupter(&name);
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if cancel.load(Ordering::SeqCst) {
                    interrupt();
                    std::thread::sleep(Duration::from_millis(400));
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
    });
    let finish_watcher = |watcher: Option<std::thread::JoinHandle<()>>| {
        done.store(true, Ordering::SeqCst);
        if let Some(w) = watcher {
            let _ = w.join();
        }
    };

    let mut guest = match launcher.launch(spec, &name) {
        Ok(g) => g,
        Err(e) => {
            finish_watcher(watcher);
            return Err(if spec.cancelled() {
                BakeError::Cancelled
            } else {
                e
            });
        }
    };
    progress.booted(&name, started.elapsed());
    let result = if spec.cancelled() {
        Err(BakeError::Cancelled)
    } else {
        run_in_guest(spec, guest.as_mut(), &mut out, progress)
    };
    finish_watcher(watcher);
    // A broken connection says little by itself; what the VM was doing then
    // is gone once it is removed.
    let result = result.map_err(|e| match e {
        BakeError::Guest {
            context,
            source: source @ (ClientError::Protocol(_) | ClientError::Connect(_)),
            diagnosis: None,
        } => BakeError::Guest {
            context,
            source,
            diagnosis: guest.diagnose(),
        },
        e => e,
    });
    let removed = guest.remove();
    let config = match result {
        Ok(c) if !spec.cancelled() => c,
        Ok(_) => return Err(BakeError::Cancelled),
        Err(_) if spec.cancelled() => return Err(BakeError::Cancelled),
        // `out` is dropped here: the temporary file goes with it.
        Err(e) => return Err(e),
    };
    if let Err(e) = removed {
        progress.note(&format!("could not remove the bake VM {name}: {e}"));
    }
    let tar_bytes = out.raw_bytes();
    let bytes = out.commit().map_err(|source| BakeError::Io {
        context: format!("write {}", spec.out.display()),
        source,
    })?;
    Ok(BakeReport {
        out: spec.out.clone(),
        bytes,
        tar_bytes,
        compression,
        steps: spec.steps.len(),
        vm: name,
        config,
        elapsed: started.elapsed(),
    })
}

/// Describes how a process ended, e.g. `exit status 3`.
pub fn describe_status(status: &ExitStatus) -> String {
    let base = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".to_string(),
    };
    if status.timed_out {
        format!("{base}, timed out")
    } else {
        base
    }
}

fn run_in_guest(
    spec: &BakeSpec,
    guest: &mut dyn BakeGuest,
    out: &mut AtomicOutput,
    progress: &mut dyn BakeProgress,
) -> Result<ImageConfig, BakeError> {
    // Steps see the image as it will be: the base image's defaults with the
    // spec's over them.
    let (config, base_had_config) = image_config(spec, guest, progress)?;
    let tools = guest.agent_tools();
    if let Some(dir) = &config.workdir {
        let argv = if tools {
            ferry_protocol::tools::mkdir(dir)
        } else {
            ["mkdir", "-p", "--", dir.as_str()]
                .map(String::from)
                .to_vec()
        };
        let status = guest.exec(&GuestCommand::new(argv), None, &mut |s, d| {
            progress.step_output(s, d);
            Ok(())
        })?;
        if !status.success() {
            return Err(BakeError::Setup(format!(
                "could not create the workdir {dir} ({})",
                describe_status(&status)
            )));
        }
    }
    let total = spec.steps.len();
    for (i, step) in spec.steps.iter().enumerate() {
        let number = i + 1;
        progress.step_started(number, total, step);
        let t0 = Instant::now();
        match step {
            Step::Copy { from, to } => {
                let to = guest_path(config.workdir.as_deref(), to);
                copy_step(guest, tools, number, total, from, &to)?
            }
            Step::Run(command) => {
                let mut cmd = GuestCommand::new(["/bin/sh", "-c", command.as_str()]);
                for (k, v) in STEP_DEFAULT_ENV {
                    if !config.env.contains_key(*k) {
                        cmd.env.push((k.to_string(), v.to_string()));
                    }
                }
                cmd.env
                    .extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                cmd.cwd = config.workdir.clone();
                let status = guest.exec(&cmd, None, &mut |s, d| {
                    progress.step_output(s, d);
                    Ok(())
                })?;
                if !status.success() {
                    return Err(BakeError::StepFailed {
                        number,
                        total,
                        command: command.clone(),
                        status: describe_status(&status),
                        code: status.code(),
                    });
                }
            }
        }
        progress.step_finished(number, total, t0.elapsed());
    }
    if base_had_config || config != ImageConfig::default() {
        let mut json = serde_json::to_vec_pretty(&config)
            .map_err(|e| BakeError::Setup(format!("image config: {e}")))?;
        json.push(b'\n');
        guest.write_file(&format!("/{IMAGE_CONFIG_PATH}"), 0o644, &json)?;
    }
    forget_hostname(guest)?;
    export(guest, tools, out, progress)?;
    Ok(config)
}

/// A guest path for a copy: relative paths are taken from the workdir.
fn guest_path(workdir: Option<&str>, to: &str) -> String {
    if to.starts_with('/') {
        to.to_string()
    } else {
        let base = workdir.unwrap_or("/").trim_end_matches('/');
        format!("{base}/{to}")
    }
}

fn copy_step(
    guest: &mut dyn BakeGuest,
    tools: bool,
    number: usize,
    total: usize,
    from: &Path,
    to: &str,
) -> Result<(), BakeError> {
    let to = to.to_string();
    let failed = |why: String| BakeError::CopyFailed {
        number,
        total,
        from: from.to_path_buf(),
        to: to.clone(),
        why,
    };
    if !from.is_dir() {
        let target = if to.ends_with('/') {
            let name = from
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{to}{name}")
        } else {
            to.clone()
        };
        return guest
            .copy_file(from, &target)
            .map(|_| ())
            .map_err(|e| match e {
                BakeError::Guest { source, .. } => failed(source.to_string()),
                other => other,
            });
    }
    // A directory: stream a tar of its contents into `tar -x` in the guest.
    // Files belong to root in the image, like any file the agent writes.
    let mut tar = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(from)
        .args(["-cf", "-", "."])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run tar on the host: {e}")))?;
    let stdout = tar.stdout.take().expect("piped stdout");
    let stderr = tar.stderr.take().expect("piped stderr");
    let host_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = io::BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let mut guest_err = Vec::new();
    let argv = if tools {
        ferry_protocol::tools::tar_extract(&to)
    } else {
        let script = r#"mkdir -p -- "$1" && exec tar --no-same-owner -xf - -C "$1""#;
        ["/bin/sh", "-c", script, "sh", to.as_str()]
            .map(String::from)
            .to_vec()
    };
    let status = guest.exec(
        &GuestCommand::new(argv),
        Some(Box::new(stdout)),
        &mut |_, d| {
            guest_err.extend_from_slice(d);
            Ok(())
        },
    );
    let host_status = tar.wait();
    let host_err = host_err.join().unwrap_or_default();
    let status = status?;
    match host_status {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(failed(format!("tar on the host: {s}: {}", host_err.trim()))),
        Err(e) => return Err(failed(format!("tar on the host: {e}"))),
    }
    if !status.success() {
        return Err(failed(format!(
            "tar in the guest: {}: {}",
            describe_status(&status),
            String::from_utf8_lossy(&guest_err).trim()
        )));
    }
    Ok(())
}

/// The image's defaults: those already in the image (`/etc/ferry/image.json`)
/// with the spec's merged over them (env merged, workdir and cmd replaced), and
/// whether the image had any.
fn image_config(
    spec: &BakeSpec,
    guest: &mut dyn BakeGuest,
    progress: &mut dyn BakeProgress,
) -> Result<(ImageConfig, bool), BakeError> {
    let path = format!("/{IMAGE_CONFIG_PATH}");
    let existing = guest.read_file(&path)?;
    let defaults = guest.image_defaults();
    let base_had_config = existing.is_some() || defaults.is_some();
    let mut config = match &existing {
        None => defaults.unwrap_or_default(),
        Some(bytes) => serde_json::from_slice(bytes).unwrap_or_else(|e| {
            progress.note(&format!(
                "ignoring the unreadable {path} of the base image: {e}"
            ));
            ImageConfig::default()
        }),
    };
    config
        .env
        .extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    if spec.workdir.is_some() {
        config.workdir = spec.workdir.clone();
    }
    if spec.cmd.is_some() {
        config.cmd = spec.cmd.clone();
    }
    Ok((config, base_had_config))
}

/// Removes the `/etc/hosts` line the agent added for the bake VM's name, so the
/// image does not carry it.
fn forget_hostname(guest: &mut dyn BakeGuest) -> Result<(), BakeError> {
    let Some(hosts) = guest.read_file("/etc/hosts")? else {
        return Ok(());
    };
    let hosts = String::from_utf8_lossy(&hosts);
    let ours = format!("127.0.1.1\t{}", guest.name());
    if !hosts.lines().any(|l| l == ours) {
        return Ok(());
    }
    let kept: String = hosts
        .lines()
        .filter(|l| *l != ours)
        .map(|l| format!("{l}\n"))
        .collect();
    guest.write_file("/etc/hosts", 0o644, kept.as_bytes())
}

/// The command that streams the guest's root filesystem as a tar: the
/// agent's own tool when it has one (`tools`), else the guest's GNU tar.
pub fn export_command(tools: bool) -> Vec<String> {
    if tools {
        let skip: Vec<&str> = EXPORT_EXCLUDES
            .iter()
            .map(|e| e.trim_end_matches("/*"))
            .collect();
        return ferry_protocol::tools::tar_create("/", true, &skip);
    }
    let mut argv: Vec<String> = [
        "tar",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--one-file-system",
        "-C",
        "/",
        "-cf",
        "-",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(EXPORT_EXCLUDES.iter().map(|e| format!("--exclude={e}")));
    argv.push(".".into());
    argv
}

fn export(
    guest: &mut dyn BakeGuest,
    tools: bool,
    out: &mut AtomicOutput,
    progress: &mut dyn BakeProgress,
) -> Result<(), BakeError> {
    progress.exporting();
    let mut stderr = Vec::new();
    let status = guest.exec(
        &GuestCommand::new(export_command(tools)),
        None,
        &mut |stream, data| match stream {
            OutputStream::Stdout => {
                out.write_all(data)?;
                progress.export_progress(out.raw_bytes(), out.written_bytes());
                Ok(())
            }
            OutputStream::Stderr => {
                stderr.extend_from_slice(data);
                Ok(())
            }
        },
    )?;
    let stderr = String::from_utf8_lossy(&stderr);
    let tail: String = {
        let lines: Vec<&str> = stderr.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    match status.code() {
        Some(0) => {}
        // GNU tar and the agent's tool: "some files differ" (changed while
        // being read) — the archive is complete; say so and keep it.
        Some(1) => {
            // The excluded mount points themselves (sysfs, devtmpfs...) change
            // under tar all the time; only other files are worth a word.
            let mounts: Vec<String> = EXPORT_EXCLUDES
                .iter()
                .map(|e| format!("tar: {}: ", e.trim_end_matches("/*")))
                .collect();
            let changed: Vec<&str> = tail
                .lines()
                .filter(|l| !mounts.iter().any(|m| l.starts_with(m.as_str())))
                .collect();
            if !changed.is_empty() {
                progress.note(&format!(
                    "tar reported files changing while they were read:\n{}",
                    changed.join("\n")
                ));
            }
        }
        _ => {
            return Err(BakeError::ExportFailed {
                why: format!("tar in the guest: {}", describe_status(&status)),
                stderr: tail,
            })
        }
    }
    if out.raw_bytes() == 0 {
        return Err(BakeError::ExportFailed {
            why: "tar produced no output".into(),
            stderr: tail,
        });
    }
    Ok(())
}

/// Boots real VMs.
struct VmLauncher {
    config: Arc<Config>,
}

impl GuestLauncher for VmLauncher {
    fn data_dir(&self) -> Option<PathBuf> {
        Some(self.config.dirs.data.clone())
    }

    fn launch(&mut self, spec: &BakeSpec, name: &str) -> Result<Box<dyn BakeGuest>, BakeError> {
        let boot = BootSpec {
            name: Some(name.to_string()),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            kernel: spec.kernel.clone(),
            image: spec.from.clone(),
            ephemeral: true,
            // Steps need the network (package installs).
            net: true,
            ..BootSpec::default()
        };
        // A registry image keeps its defaults in its config, not in its files.
        let defaults = match crate::images::resolve(&self.config, spec.from.as_deref()) {
            Ok(image) if image.exec_defaults => Some(image.config),
            _ => None,
        };
        let machine = crate::boot::boot(&self.config, &boot)?;
        let client = machine.client().with_timeout(Some(Duration::from_secs(60)));
        // Package managers check signatures against the wall clock.
        let _ = client.sync_clock();
        Ok(Box::new(VmGuest {
            machine: Some(machine),
            client,
            tools: None,
            defaults,
        }))
    }

    fn interrupter(&self, name: &str) -> Arc<dyn Fn() + Send + Sync> {
        let name = name.to_string();
        let config = Arc::clone(&self.config);
        Arc::new(move || {
            if let Ok(m) = Machine::open(&config, &name) {
                let _ = m.kill();
            }
        })
    }
}

/// Hands out a VM that is already running ([`bake_running`]).
struct RunningLauncher {
    machine: Option<Machine>,
}

impl GuestLauncher for RunningLauncher {
    fn launch(&mut self, _spec: &BakeSpec, _name: &str) -> Result<Box<dyn BakeGuest>, BakeError> {
        let machine = self
            .machine
            .take()
            .ok_or_else(|| BakeError::Setup("the VM was already handed out".into()))?;
        let client = machine.client().with_timeout(Some(Duration::from_secs(60)));
        Ok(Box::new(VmGuest {
            machine: Some(machine),
            client,
            tools: None,
            defaults: None,
        }))
    }

    fn interrupter(&self, _name: &str) -> Arc<dyn Fn() + Send + Sync> {
        let machine = self.machine.clone();
        Arc::new(move || {
            if let Some(m) = &machine {
                let _ = m.kill();
            }
        })
    }
}

/// A booted bake VM. Removed on [`BakeGuest::remove`], or when dropped.
struct VmGuest {
    machine: Option<Machine>,
    client: Client,
    /// Whether the agent has its tools, once asked.
    tools: Option<bool>,
    /// The image's defaults from outside its filesystem.
    defaults: Option<ImageConfig>,
}

impl BakeGuest for VmGuest {
    fn name(&self) -> &str {
        self.machine.as_ref().map(Machine::name).unwrap_or("")
    }

    fn copy_file(&mut self, local: &Path, guest_path: &str) -> Result<u64, BakeError> {
        self.client
            .copy_in(local, guest_path)
            .map_err(guest_err(format!(
                "copy {} to {guest_path}",
                local.display()
            )))
    }

    fn exec(
        &mut self,
        cmd: &GuestCommand,
        stdin: Option<Box<dyn Read + Send>>,
        sink: &mut OutputSink<'_>,
    ) -> Result<ExitStatus, BakeError> {
        let mut req = ExecRequest::new(cmd.argv.clone());
        for (k, v) in &cmd.env {
            req = req.env(k, v);
        }
        if let Some(cwd) = &cmd.cwd {
            req = req.cwd(cwd);
        }
        if stdin.is_some() {
            req = req.with_stdin();
        }
        let what = cmd.argv.first().cloned().unwrap_or_default();
        let mut handle = self
            .client
            .exec(req)
            .map_err(guest_err(format!("start {what}")))?;
        let feeder = stdin.map(|mut input_data| {
            let input = handle.input();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; ferry_protocol::CHUNK_SIZE];
                loop {
                    match input_data.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if input.write_stdin(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                let _ = input.close_stdin();
            })
        });
        let status = loop {
            let event = handle
                .next_event()
                .map_err(guest_err(format!("run {what}")))?;
            let sent = match event {
                ExecEvent::Stdout(b) => sink(OutputStream::Stdout, &b),
                ExecEvent::Stderr(b) => sink(OutputStream::Stderr, &b),
                ExecEvent::Exit(st) => break st,
            };
            // Returning drops the handle, which makes the agent kill the process.
            sent.map_err(|source| BakeError::Io {
                context: format!("output of {what}"),
                source,
            })?;
        };
        if let Some(f) = feeder {
            let _ = f.join();
        }
        Ok(status)
    }

    fn agent_tools(&mut self) -> bool {
        let client = &self.client;
        *self
            .tools
            .get_or_insert_with(|| ferry_protocol::tools::available(client))
    }

    fn image_defaults(&self) -> Option<ImageConfig> {
        self.defaults.clone()
    }

    fn read_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, BakeError> {
        match self.client.read_file_bytes(path) {
            Ok((bytes, _)) => Ok(Some(bytes)),
            Err(e) if e.code() == Some(ErrorCode::FileNotFound) => Ok(None),
            Err(e) => Err(guest_err(format!("read {path}"))(e)),
        }
    }

    fn write_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), BakeError> {
        self.client
            .write_file(path, mode, true, data)
            .map(|_| ())
            .map_err(guest_err(format!("write {path}")))
    }

    fn diagnose(&self) -> Option<String> {
        self.machine.as_ref().map(Machine::post_mortem)
    }

    fn remove(&mut self) -> Result<(), BakeError> {
        match self.machine.take() {
            Some(m) => m.remove().map_err(BakeError::from),
            None => Ok(()),
        }
    }
}

impl Drop for VmGuest {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests;
