//! ferry as a library: boot Linux microVMs, run commands in them, freeze them
//! into bundles, thaw them anywhere, fork them, from Rust.
//!
//! ```no_run
//! use ferry::{BootOptions, ExecOptions, Runtime};
//!
//! # fn main() -> Result<(), ferry::Error> {
//! let rt = Runtime::new(ferry::Config::default())?;
//! let vm = rt.boot(BootOptions::default())?;
//! let out = vm.exec(&["uname", "-a"], &ExecOptions::default())?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! vm.remove()?;
//! # Ok(())
//! # }
//! ```
//!
//! Every VM runs in its own `ferry-vmm` process, so VMs outlive the program
//! that made them, and any program using the same directories sees them
//! ([`Runtime::open`], [`Runtime::list`]). Handles are `Send + Sync` and cheap
//! to clone. Every call **blocks** the calling thread until its work is done
//! (a boot until the guest answers, a snapshot until the bundle is written):
//! call them from a worker thread in event-loop programs. Nothing is printed:
//! long work reports to a [`Progress`] ([`Terminal`] shows it on stderr).

#![warn(missing_docs)]

mod dir_image;
mod error;
mod files;
mod pool;
mod vm;

pub use dir_image::image_from_dir;
pub use error::{codes, retryable, CodeDoc, Error, Result};
pub use files::CopyProgress;
pub use pool::{
    ExtraFile, Pool, PoolOptions, PoolStats, PooledVm, WarmImage, WarmImageSpec, WarmSlot,
};
pub use vm::{Child, ChildEvent, ExecOptions, ExecOutput, ForkOptions, PortHandle, Vm};

pub use ferry_protocol::{ExitStatus, PowerAction};
pub use ferry_runtime::assets::{
    Assets as Installed, Kernel as InstalledKernel, Rootfs as InstalledRootfs,
};
pub use ferry_runtime::bake::{BakeProgress, BakeReport, BakeSpec};
pub use ferry_runtime::config::{Config, Dirs};
pub use ferry_runtime::forward::PortForward;
pub use ferry_runtime::fsutil::Freed;
pub use ferry_runtime::gc::{GcKind, GcReport};
pub use ferry_runtime::images::ImageConfig;
pub use ferry_runtime::machine::{
    SnapshotOptions, SnapshotReport, DEFAULT_CPUS, DEFAULT_MEMORY_MIB,
};
pub use ferry_runtime::migrate::link::Target as MigrateTarget;
pub use ferry_runtime::migrate::receive::{ReceiveOptions, ReceiveReport};
pub use ferry_runtime::migrate::{MigrateOptions, MigrateReport, RoundReport, DEFAULT_DOWNTIME_MS};
pub use ferry_runtime::mounts::{MountKind, MountRecord as Mount};
pub use ferry_runtime::oci_images::ferry_oci_types::{PullOptions, PullProgress};
pub use ferry_runtime::oci_images::CachedImage;
pub use ferry_runtime::plan::ForkReport;
pub use ferry_runtime::progress::{Event as ProgressEvent, Progress, Silent, Terminal};
pub use ferry_runtime::snapshot::chain::Link as ChainLink;
pub use ferry_runtime::stats::Stats;
pub use ferry_runtime::store::{PullReport, PushReport, StoreGcReport, StoreUrl};
pub use ferry_runtime::template::TemplateInfo;
#[doc(hidden)]
pub use ferry_runtime::vm::control::DirtyAction;
pub use ferry_runtime::vm::VmStatus;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_runtime::boot::BootSpec;
use ferry_runtime::machine::Machine;
use ferry_runtime::snapshot::restore::{self, RestoreSpec};
use ferry_runtime::vm::Registry;

/// A ferry runtime: one set of directories and executables. Two runtimes
/// with different directories never see each other's VMs.
#[derive(Clone, Debug)]
pub struct Runtime {
    config: Arc<Config>,
}

/// What to boot. `BootOptions::default()` boots the base image with one
/// vCPU and 512 MiB, nothing to run, no forwards.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// A rootfs tarball or ext4 image; the base Debian image when absent.
    pub image: Option<PathBuf>,
    /// VM name; generated when absent.
    pub name: Option<String>,
    /// vCPUs ([`DEFAULT_CPUS`] when absent).
    pub cpus: Option<u32>,
    /// Guest memory in MiB ([`DEFAULT_MEMORY_MIB`] when absent).
    pub memory_mib: Option<u32>,
    /// Host ports forwarded into the guest.
    pub ports: Vec<PortForward>,
    /// Host paths copied in at boot ([`MountKind::Copy`]) or shared live
    /// ([`MountKind::Live`]); see [`Mount`].
    pub mounts: Vec<Mount>,
    /// Outbound networking for the guest.
    pub net: bool,
    /// Environment of the main command.
    pub env: BTreeMap<String, String>,
    /// Working directory of the main command.
    pub workdir: Option<String>,
    /// The VM's main command; when it exits, the VM ends. None: the image's
    /// command if `run_image_command`, else nothing (the VM idles).
    pub cmd: Option<Vec<String>>,
    /// Run the image's own command when `cmd` is absent.
    pub run_image_command: bool,
    /// Boot the kernel even where a boot template matches.
    pub cold: bool,
    /// Remove the VM once it stops, and tie it to this process: once the
    /// returned [`Vm`] (and every clone of it) is dropped or the process
    /// dies, the VM is stopped and removed at the next look at it (a lookup
    /// of its name, `ferry ls`, `ferry gc`).
    pub ephemeral: bool,
    /// Guest kernel; the runtime's when absent.
    pub kernel: Option<PathBuf>,
}

/// Where a bundle comes from.
pub enum RestoreSource {
    /// A bundle file; memory is mapped from it, so it must stay in place
    /// while the VM runs.
    Path(PathBuf),
    /// A stream (a pipe, a socket): received into the data directory first.
    Reader(Box<dyn Read + Send>),
    /// A VM pushed to a store, `s3://BUCKET/PREFIX/DIGEST` (see
    /// [`Vm::push`]): fetched into the data directory first, every chunk
    /// checked against its hash. A [`RestoreSource::Path`] spelled that way
    /// is taken as this too.
    Store(String),
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// New name; the frozen VM's when absent.
    pub name: Option<String>,
    /// Host port forwards, replacing the recorded ones when given.
    pub ports: Option<Vec<PortForward>>,
    /// Serve a live mount recorded at host path `.0` from `.1`.
    pub remap_mounts: Vec<(PathBuf, PathBuf)>,
    /// Confirms the bundle's live mounts of these host directories.
    pub live_mounts: Vec<PathBuf>,
    /// Confirms the bundle's networking.
    pub net: bool,
    /// Grants whatever the bundle's record asks for (mounts, network,
    /// listeners on any address): only for bundles you trust.
    pub trust_bundle_config: bool,
    /// Where else to look for the parents of an incremental bundle (they
    /// are looked for beside it first, by their recorded file names).
    pub parents: Vec<PathBuf>,
}

/// A listener for VMs migrating to this host ([`Runtime::listen_for_migration`]).
pub struct Receiver {
    listener: ferry_runtime::migrate::receive::Listener,
    config: Arc<Config>,
}

impl Receiver {
    /// The token a source must present (`ferry migrate --token`).
    pub fn token(&self) -> &str {
        self.listener.token()
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::new("MIGRATE_FAILED", e.to_string(), None))
    }

    /// Waits for a migration and returns the VM once it runs here.
    /// Connections with a wrong token are refused and the wait goes on.
    pub fn receive(
        &self,
        opts: &ReceiveOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Vm, ReceiveReport)> {
        let (m, r) = self.listener.receive(&self.config, opts, progress)?;
        Ok((Vm::new(m), r))
    }
}

/// A VM migrating here may have of this host what a restored one may.
impl From<RestoreOptions> for ReceiveOptions {
    fn from(o: RestoreOptions) -> ReceiveOptions {
        ReceiveOptions {
            name: o.name,
            ports: o.ports,
            hostname: None,
            net: o.net,
            live_mounts: o.live_mounts,
            trust_config: o.trust_bundle_config,
        }
    }
}

/// One VM as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmInfo {
    /// Its name.
    pub name: String,
    /// Running or stopped (and why).
    pub status: VmStatus,
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Host port forwards.
    pub ports: Vec<PortForward>,
    /// What its disk was made from.
    pub image: String,
    /// Its state directory.
    pub dir: PathBuf,
}

/// What a bundle file holds, read without restoring it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BundleInfo {
    /// Bundle size in bytes.
    pub bytes: u64,
    /// Whether it leaves out the disk image the VM booted from.
    pub thin: bool,
    /// Whether guest memory is compressed.
    pub memory_compressed: bool,
    /// An incremental bundle's parents, newest first: where each was found
    /// (its digest checked), or the first missing one.
    pub chain: Vec<ChainLink>,
    /// The manifest.
    pub manifest: ferry_snapshot::Manifest,
}

impl Runtime {
    /// A runtime with `config`. Checks nothing yet: a missing `ferry-vmm`
    /// or guest agent is reported by the first boot or restore.
    pub fn new(config: Config) -> Result<Runtime> {
        Ok(Runtime {
            config: Arc::new(config),
        })
    }

    /// The runtime of this process with ferry's default directories
    /// (`FERRY_DATA_DIR`, `FERRY_CACHE_DIR` or the XDG ones, as the CLI's),
    /// made on first use: what the SDKs' top-level calls stand on.
    pub fn shared() -> Result<Runtime> {
        static SHARED: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
        if let Some(rt) = SHARED.get() {
            return Ok(rt.clone());
        }
        let rt = Runtime::new(Config::default())?;
        Ok(SHARED.get_or_init(|| rt).clone())
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Boots a VM and returns once its guest agent answers. Blocks.
    pub fn boot(&self, opts: BootOptions) -> Result<Vm> {
        let mounts = ferry_runtime::mounts::prepare(&opts.mounts).map_err(Error::from)?;
        let spec = BootSpec {
            name: opts.name,
            cpus: opts.cpus,
            memory_mib: opts.memory_mib,
            kernel: opts.kernel,
            image: opts.image,
            command: opts.cmd,
            run_image_command: opts.run_image_command,
            env: opts.env,
            workdir: opts.workdir,
            ephemeral: opts.ephemeral,
            mounts,
            ports: opts.ports,
            net: opts.net,
            cold: opts.cold,
        };
        Ok(Vm::new(ferry_runtime::boot::boot(&self.config, &spec)?))
    }

    /// Thaws a bundle into a running VM and returns once its guest agent
    /// answers, with the guest's clock and RNG refreshed. From a stream,
    /// the name, ports and KVM are checked before it is read, and a
    /// failure after it was read keeps the received bundle (the error says
    /// where). Blocks.
    pub fn restore(&self, source: RestoreSource, opts: RestoreOptions) -> Result<Vm> {
        let spec = |bundle: PathBuf| RestoreSpec {
            name: opts.name.clone(),
            remap_mounts: opts.remap_mounts.clone(),
            ports: opts.ports.clone(),
            net: opts.net,
            live_mounts: opts.live_mounts.clone(),
            trust_bundle_config: opts.trust_bundle_config,
            parents: opts.parents.clone(),
            ..RestoreSpec::new(bundle)
        };
        let machine = match source {
            RestoreSource::Path(p) if p.to_str().is_some_and(StoreUrl::is_store) => {
                let url = StoreUrl::parse(p.to_str().unwrap_or_default())?;
                ferry_runtime::store::restore(
                    &self.config,
                    &url,
                    &spec(PathBuf::new()),
                    &mut |_| {},
                )?
            }
            RestoreSource::Store(url) => {
                let url = StoreUrl::parse(&url)?;
                ferry_runtime::store::restore(
                    &self.config,
                    &url,
                    &spec(PathBuf::new()),
                    &mut |_| {},
                )?
            }
            RestoreSource::Path(p) => restore::restore(&self.config, &spec(p))?,
            RestoreSource::Reader(r) => {
                restore::restore_stream(&self.config, r, &spec(PathBuf::new()))?
            }
        };
        Ok(Vm::new(machine))
    }

    /// Pushes the bundle file `bundle` to the store at `store`
    /// (`s3://BUCKET/PREFIX`): only the chunks the store lacks are uploaded.
    /// Credentials and endpoint come from the AWS environment variables and
    /// files. The report's `url` names the pushed VM for [`RestoreSource::Store`].
    pub fn push_bundle(
        &self,
        bundle: &Path,
        store: &str,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PushReport> {
        let url = StoreUrl::parse(store)?;
        Ok(ferry_runtime::store::push_bundle(&url, bundle, progress)?)
    }

    /// Removes the chunks of the store at `store` (`s3://BUCKET/PREFIX`) that
    /// no pushed VM refers to and that are older than `min_age_secs`.
    pub fn gc_store(&self, store: &str, min_age_secs: u64) -> Result<StoreGcReport> {
        let url = StoreUrl::parse(store)?;
        Ok(ferry_runtime::store::gc(&url, min_age_secs)?)
    }

    /// Checks a store address before any work starts: `s3://BUCKET/PREFIX`,
    /// or with `pushed` a pushed VM's `s3://BUCKET/PREFIX/DIGEST`
    /// (`STORE_URL_INVALID` otherwise).
    pub fn check_store_url(url: &str, pushed: bool) -> Result<()> {
        let parsed = if pushed {
            StoreUrl::parse_pushed(url)
        } else {
            StoreUrl::parse(url)
        };
        Ok(parsed.map(drop)?)
    }

    /// Fetches the VM pushed as `url` (`s3://BUCKET/PREFIX/DIGEST`) into the
    /// bundle file `dest`, written atomically.
    pub fn pull_bundle(
        &self,
        url: &str,
        dest: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PullReport> {
        let url = StoreUrl::parse(url)?;
        Ok(ferry_runtime::store::pull_bundle(&url, dest, progress)?)
    }

    /// Listens on `addr` (`HOST:PORT`; port 0 picks one) for a VM migrating
    /// here, with a fresh one-time token the source must present.
    pub fn listen_for_migration(&self, addr: &str) -> Result<Receiver> {
        let listener = ferry_runtime::migrate::receive::Listener::bind(addr)
            .map_err(|e| Error::new("MIGRATE_FAILED", format!("listen on {addr}: {e}"), None))?;
        Ok(Receiver {
            listener,
            config: Arc::clone(&self.config),
        })
    }

    /// Receives a VM migrating here over `input` and `output` (a pipe the
    /// caller trusts: no token is asked). Returns once it runs here.
    pub fn receive_migration(
        &self,
        input: impl Read,
        output: impl std::io::Write,
        opts: &ReceiveOptions,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Vm, ReceiveReport)> {
        let (m, r) = ferry_runtime::migrate::receive::receive(
            &self.config,
            input,
            output,
            None,
            opts,
            progress,
        )?;
        Ok((Vm::new(m), r))
    }

    /// Opens an existing VM by name (running or not).
    pub fn open(&self, name: &str) -> Result<Vm> {
        Ok(Vm::new(Machine::open(&self.config, name)?))
    }

    /// Opens a VM that must be running (`VM_NOT_RUNNING` otherwise).
    pub fn open_running(&self, name: &str) -> Result<Vm> {
        Ok(Vm::new(Machine::open_running(&self.config, name)?))
    }

    /// Every VM of this runtime, sorted by name.
    pub fn list(&self) -> Vec<VmInfo> {
        Registry::new(&self.config.dirs)
            .list()
            .into_iter()
            .map(|i| VmInfo {
                name: i.record.name,
                status: i.status,
                cpus: i.record.cpus,
                memory_mib: i.record.memory_mib,
                ports: i.record.ports,
                image: i.record.image,
                dir: i.dir,
            })
            .collect()
    }

    /// Builds (or finds cached) the guest kernel and base root filesystem
    /// in this runtime's cache directory; returns their paths. Reports to
    /// `progress`. Blocks for minutes the first time.
    pub fn install(&self, progress: &dyn Progress) -> Result<Installed> {
        Ok(ferry_runtime::assets::ensure_all(
            &self.config.dirs.cache,
            progress,
        )?)
    }

    /// Bakes an image: boots a VM, copies files in, runs the steps, writes a
    /// rootfs tarball. Blocks.
    pub fn bake(&self, spec: &BakeSpec, progress: &mut dyn BakeProgress) -> Result<BakeReport> {
        Ok(ferry_runtime::bake::bake(&self.config, spec, progress)?)
    }

    /// Gets the image `image` ready to boot now, reporting the work to
    /// `progress` as the step "image": a rootfs tarball is converted to ext4
    /// once and cached by content, which a first boot would otherwise do
    /// silently. Quick for an ext4 image or a tarball converted before.
    /// Returns the image's configuration (command, environment, workdir).
    /// Blocks.
    pub fn prepare_image(&self, image: &Path, progress: &dyn Progress) -> Result<ImageConfig> {
        let step =
            progress::Step::start(progress, "image", &format!("preparing {}", image.display()));
        let resolved = ferry_runtime::images::resolve(&self.config, Some(image))?;
        step.finish(&format!("{} is ready", image.display()));
        Ok(resolved.config)
    }

    /// Makes the boot template for boots shaped like `opts` (image, kernel,
    /// vCPUs, memory). Blocks.
    pub fn create_template(&self, opts: &BootOptions) -> Result<TemplateInfo> {
        let spec = BootSpec {
            cpus: opts.cpus,
            memory_mib: opts.memory_mib,
            kernel: opts.kernel.clone(),
            image: opts.image.clone(),
            ..BootSpec::default()
        };
        Ok(ferry_runtime::boot::create_template(&self.config, &spec)?)
    }

    /// Pulls an OCI or Docker image (`[REGISTRY/]REPOSITORY[:TAG|@DIGEST]`)
    /// and unpacks it into ferry's image cache, where boots find it by the
    /// same reference. Loopback registries and those in
    /// `options.insecure_registries` (or `~/.config/ferry/registries.json`)
    /// are spoken to over plain HTTP; credentials come from Docker's
    /// `config.json`. `progress` hears of every layer's download. Blocks.
    pub fn pull_image(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &mut dyn FnMut(PullProgress),
    ) -> Result<CachedImage> {
        let mut options = options.clone();
        options
            .insecure_registries
            .extend(ferry_runtime::oci_images::configured_insecure_registries());
        Ok(ferry_runtime::oci_images::pull(
            &self.config,
            reference,
            &options,
            progress,
        )?)
    }

    /// Every pulled image, oldest first.
    pub fn images(&self) -> Vec<CachedImage> {
        ferry_runtime::oci_images::list(&self.config)
    }

    /// Removes a pulled image, named by reference, digest or id.
    pub fn remove_image(&self, name: &str) -> Result<CachedImage> {
        Ok(ferry_runtime::oci_images::remove(&self.config, name)?)
    }

    /// Every boot template, newest first.
    pub fn templates(&self) -> Vec<TemplateInfo> {
        ferry_runtime::template::list(&self.config.dirs)
    }

    /// Deletes the template `id`.
    pub fn remove_template(&self, id: &str) -> Result<()> {
        if ferry_runtime::template::remove(&self.config.dirs, id) {
            Ok(())
        } else {
            Err(Error::new(
                "TEMPLATE_NOT_FOUND",
                format!("no template {id:?}"),
                Some("`ferry template ls` lists them".into()),
            ))
        }
    }

    /// Removes what killed ferry and VMM processes left behind in this
    /// runtime's directories: unfinished files and bundles, stale snapshot
    /// streams, half-created VM directories, fork disk layers no VM uses,
    /// and received bundles kept after failed restores. Nothing a running
    /// VM, a restore or a snapshot in progress uses is touched. Reports what
    /// was removed, per kind. Blocks while it reads every VM's disk chain.
    pub fn gc(&self) -> Result<GcReport> {
        Ok(ferry_runtime::gc::collect(&self.config.dirs, true))
    }

    /// The cheap part of [`Runtime::gc`]: unfinished files and bundles whose
    /// process is gone, and snapshot streams of VMs that are not running.
    /// Reads directories only (no disk headers); received bundles are kept.
    /// The `ferry` CLI runs it at every start.
    pub fn sweep(&self) -> GcReport {
        ferry_runtime::gc::collect(&self.config.dirs, false)
    }

    /// Describes a bundle file without restoring it.
    pub fn inspect_bundle(&self, path: &Path) -> Result<BundleInfo> {
        let bundle = ferry_snapshot::Bundle::open(path).map_err(Error::from_bundle)?;
        Ok(BundleInfo {
            bytes: bundle.len(),
            thin: bundle.manifest().disk.thin,
            memory_compressed: bundle.memory_image().is_ok_and(|i| i.is_compressed()),
            chain: ferry_runtime::snapshot::chain::describe(path, &bundle),
            manifest: bundle.manifest().clone(),
        })
    }
}

/// Baking images: the recipe, its steps and the progress observer.
pub mod bake {
    pub use ferry_runtime::bake::*;
}

/// Parsers for the command-line spellings of mounts, remaps and names.
pub mod parse {
    pub use ferry_runtime::mounts::{parse_all as mounts, parse_remap as remap};
    pub use ferry_runtime::vm::registry::validate_name as vm_name;
}

/// Steps of long work reported to a [`Progress`].
pub mod progress {
    pub use ferry_runtime::progress::Step;
}

pub use ferry_runtime::Failure;

impl Vm {
    /// The configuration (command, environment, working directory) of the
    /// image the VM booted from; empty for the base image or a restored VM.
    pub fn image_config(&self, rt: &Runtime) -> ImageConfig {
        let image = self.info().image;
        if image == "base" {
            return ImageConfig::default();
        }
        ferry_runtime::images::resolve(&rt.config, Some(Path::new(&image)))
            .map(|i| i.config)
            .unwrap_or_default()
    }
}
