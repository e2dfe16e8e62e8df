//! Options objects as JavaScript passes them (camelCase there), and their
//! conversion into the `ferry` crate's types. The JS layer has already put
//! ports in their `[HOST_IP:]HOST:GUEST` spelling.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use napi::bindgen_prelude::Buffer;
use napi_derive::napi;

use crate::error::{Fail, Result};

/// `boot()` options.
#[napi(object)]
pub struct BootOpts {
    pub image: Option<String>,
    pub name: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub ports: Option<Vec<String>>,
    /// `HOST:GUEST` directories copied in at boot.
    pub mounts: Option<Vec<String>>,
    /// `HOST:GUEST` directories shared live.
    pub live_mounts: Option<Vec<String>>,
    pub net: Option<bool>,
    pub env: Option<HashMap<String, String>>,
    pub workdir: Option<String>,
    pub cmd: Option<Vec<String>>,
    pub cold: Option<bool>,
    /// Remove the VM once it stops (provision's VM).
    pub ephemeral: Option<bool>,
}

/// Parses port specs.
pub fn ports(specs: Option<Vec<String>>) -> Result<Vec<ferry::PortForward>> {
    specs
        .unwrap_or_default()
        .iter()
        .map(|s| s.parse().map_err(|e| Fail::from(ferry::Error::from(e))))
        .collect()
}

impl BootOpts {
    /// The `ferry` crate's boot options.
    pub fn into_ferry(self) -> Result<ferry::BootOptions> {
        let mounts = ferry::parse::mounts(
            &self.mounts.unwrap_or_default(),
            &self.live_mounts.unwrap_or_default(),
        )
        .map_err(|e| Fail::from(ferry::Error::from(e)))?;
        let run_image_command = self.cmd.is_none();
        Ok(ferry::BootOptions {
            image: self.image.map(PathBuf::from),
            name: self.name,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            ports: ports(self.ports)?,
            mounts,
            net: self.net.unwrap_or(false),
            env: self.env.unwrap_or_default().into_iter().collect(),
            workdir: self.workdir,
            cmd: self.cmd,
            run_image_command,
            cold: self.cold.unwrap_or(false),
            ephemeral: self.ephemeral.unwrap_or(false),
            kernel: None,
        })
    }
}

/// `restore()` options.
#[napi(object)]
pub struct RestoreOpts {
    pub name: Option<String>,
    pub ports: Option<Vec<String>>,
    pub net: Option<bool>,
    /// Host directories whose live mounts the bundle may use.
    pub live_mounts: Option<Vec<String>>,
    /// Grant whatever the bundle's record asks for.
    pub trust_bundle_config: Option<bool>,
    /// Where else to look for an incremental bundle's parents.
    pub parents: Option<Vec<String>>,
}

impl RestoreOpts {
    /// The `ferry` crate's restore options.
    pub fn into_ferry(self) -> Result<ferry::RestoreOptions> {
        Ok(ferry::RestoreOptions {
            name: self.name,
            ports: self.ports.map(|p| ports(Some(p))).transpose()?,
            net: self.net.unwrap_or(false),
            live_mounts: self
                .live_mounts
                .unwrap_or_default()
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            trust_bundle_config: self.trust_bundle_config.unwrap_or(false),
            parents: self
                .parents
                .unwrap_or_default()
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            ..ferry::RestoreOptions::default()
        })
    }
}

/// `exec()` and `spawn()` options.
#[napi(object)]
pub struct ExecOpts {
    pub env: Option<HashMap<String, String>>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub stdin: Option<Buffer>,
    pub timeout_ms: Option<u32>,
    /// Run on a pseudo-terminal (spawn).
    pub tty: Option<bool>,
    pub cols: Option<u32>,
    pub rows: Option<u32>,
    /// Keep stdin open (spawn).
    pub open_stdin: Option<bool>,
}

impl ExecOpts {
    /// The `ferry` crate's exec options.
    pub fn into_ferry(self) -> Result<ferry::ExecOptions> {
        let dim = |v: Option<u32>, default: u16, what: &str| -> Result<u16> {
            v.map(|v| {
                u16::try_from(v)
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| Fail::invalid(format!("{what} {v} is out of range")))
            })
            .unwrap_or(Ok(default))
        };
        let tty = if self.tty.unwrap_or(false) {
            Some((dim(self.rows, 24, "rows")?, dim(self.cols, 80, "cols")?))
        } else {
            None
        };
        let mut env: Vec<(String, String)> = self.env.unwrap_or_default().into_iter().collect();
        env.sort();
        let stdin = match (self.stdin, self.open_stdin.unwrap_or(false)) {
            (Some(b), _) => Some(b.to_vec()),
            (None, true) => Some(Vec::new()),
            (None, false) => None,
        };
        Ok(ferry::ExecOptions {
            env,
            cwd: self.cwd,
            user: self.user,
            stdin,
            timeout: self.timeout_ms.map(|ms| Duration::from_millis(ms.into())),
            tty,
        })
    }
}

/// `snapshot()` options.
#[napi(object)]
pub struct SnapshotOpts {
    pub leave_running: Option<bool>,
    pub thin: Option<bool>,
    pub raw_memory: Option<bool>,
    pub compact: Option<bool>,
    /// An incremental bundle: only what changed since this earlier bundle.
    pub since: Option<String>,
}

impl SnapshotOpts {
    /// The `ferry` crate's snapshot options.
    pub fn into_ferry(self) -> ferry::SnapshotOptions {
        ferry::SnapshotOptions {
            leave_running: self.leave_running.unwrap_or(false),
            thin: self.thin.unwrap_or(false),
            raw_memory: self.raw_memory.unwrap_or(false),
            compact: self.compact.unwrap_or(false),
            since: self.since.map(PathBuf::from),
        }
    }
}

/// `fork()` options.
#[napi(object)]
pub struct ForkOpts {
    pub names: Option<Vec<String>>,
    pub count: Option<u32>,
    /// Port specs of each sibling, in order.
    pub ports: Option<Vec<Vec<String>>>,
}

impl ForkOpts {
    /// The `ferry` crate's fork options.
    pub fn into_ferry(self) -> Result<ferry::ForkOptions> {
        Ok(ferry::ForkOptions {
            names: self.names.unwrap_or_default(),
            count: self.count.map(|c| c as usize),
            ports: self
                .ports
                .unwrap_or_default()
                .into_iter()
                .map(|p| ports(Some(p)))
                .collect::<Result<_>>()?,
        })
    }
}

/// The end of `provision()`: the image's defaults and where it goes.
#[napi(object)]
pub struct ImageOpts {
    pub out: String,
    pub cmd: Option<Vec<String>>,
    pub env: Option<HashMap<String, String>>,
    pub workdir: Option<String>,
}

impl ImageOpts {
    /// The bake spec with no steps of its own.
    pub fn into_ferry(self) -> ferry::BakeSpec {
        let mut spec = ferry::BakeSpec::new(self.out);
        spec.cmd = self.cmd;
        spec.env = self.env.unwrap_or_default().into_iter().collect();
        spec.workdir = self.workdir;
        spec
    }
}

/// A file written into a VM: staged before an exec, or before a warmup.
#[napi(object)]
pub struct ExtraFileJs {
    pub path: String,
    pub data: Buffer,
    pub mode: Option<u32>,
}

/// `vm.migrate()` options.
#[napi(object)]
pub struct MigrateOpts {
    /// The token the receiver printed (required over TCP).
    pub token: Option<String>,
    /// The pause the VM may see, in milliseconds.
    pub downtime_ms: Option<u32>,
    /// Bytes per second at most on the link.
    pub bandwidth_limit: Option<f64>,
    /// Run the protocol over this shell command's stdin and stdout.
    pub via: Option<String>,
}

/// Where `dest` and `opts` send the VM, and how.
pub fn migrate_target(
    dest: String,
    opts: MigrateOpts,
) -> Result<(ferry::MigrateTarget, ferry::MigrateOptions)> {
    let target = ferry::MigrateTarget::from_parts(&dest, opts.via)
        .map_err(|e| Fail::new("SDK_INVALID_ARGUMENT", e))?;
    let limit = match opts.bandwidth_limit {
        Some(b) if !(b.is_finite() && b >= 1.0) => {
            return Err(Fail::new(
                "SDK_INVALID_ARGUMENT",
                "bandwidthLimit is bytes per second, at least 1",
            ))
        }
        b => b.map(|b| b as u64),
    };
    Ok((
        target,
        ferry::MigrateOptions {
            downtime_ms: opts
                .downtime_ms
                .map_or(ferry::DEFAULT_DOWNTIME_MS, u64::from),
            bandwidth_limit: limit,
            token: opts.token,
        },
    ))
}
