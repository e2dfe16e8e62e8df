//! The part of an OCI runtime spec (`config.json`, and the process spec of
//! an exec) that a ferry VM honours: the process (args, env, cwd, user,
//! terminal), the root path and the resources that size the VM.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Kind, Result, ShimError};

/// A container's `config.json`, the fields the shim reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Spec {
    /// The container's init process.
    #[serde(default)]
    pub process: Option<Process>,
    /// Where the root filesystem is, relative to the bundle.
    #[serde(default)]
    pub root: Option<Root>,
    /// Linux-specific settings: resources size the VM.
    #[serde(default)]
    pub linux: Option<Linux>,
}

/// `root` of a spec.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Root {
    /// Path of the root filesystem, relative to the bundle or absolute.
    #[serde(default)]
    pub path: String,
}

/// `linux` of a spec.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Linux {
    /// Resource limits.
    #[serde(default)]
    pub resources: Option<Resources>,
}

/// `linux.resources` of a spec.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resources {
    /// Memory limits.
    #[serde(default)]
    pub memory: Option<Memory>,
    /// CPU limits.
    #[serde(default)]
    pub cpu: Option<Cpu>,
}

/// `linux.resources.memory`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Memory {
    /// Bytes; the VM's memory when set.
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `linux.resources.cpu`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cpu {
    /// CFS quota in microseconds per period.
    #[serde(default)]
    pub quota: Option<i64>,
    /// CFS period in microseconds.
    #[serde(default)]
    pub period: Option<u64>,
}

/// A process: the init process of a spec, or an exec's.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// Whether it runs on a terminal.
    #[serde(default)]
    pub terminal: bool,
    /// Terminal size.
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    /// The user it runs as.
    #[serde(default)]
    pub user: User,
    /// Its command line.
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=value` pairs.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: String,
}

/// `process.consoleSize`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct ConsoleSize {
    /// Rows.
    #[serde(default)]
    pub height: u32,
    /// Columns.
    #[serde(default)]
    pub width: u32,
}

/// `process.user`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// User id.
    #[serde(default)]
    pub uid: u32,
    /// Group id.
    #[serde(default)]
    pub gid: u32,
    /// A user name, where the spec gives one instead of ids.
    #[serde(default)]
    pub username: Option<String>,
}

/// How a ferry VM runs a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Command line.
    pub args: Vec<String>,
    /// Environment, in the spec's order.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// `uid:gid` (or a user name).
    pub user: Option<String>,
    /// Terminal size (rows, columns) when it runs on one.
    pub tty: Option<(u16, u16)>,
}

fn invalid(message: String, hint: &str) -> ShimError {
    ShimError::new(Kind::Invalid, "SHIM_SPEC_INVALID", message, hint)
}

impl Spec {
    /// Reads `config.json` in `bundle`.
    pub fn load(bundle: &Path) -> Result<Spec> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|e| {
            invalid(
                format!("cannot read {}: {e}", path.display()),
                "containerd writes the spec into the bundle; check the container was created by containerd",
            )
        })?;
        Spec::parse(&text)
    }

    /// Parses a spec.
    pub fn parse(text: &[u8]) -> Result<Spec> {
        serde_json::from_slice(text).map_err(|e| {
            invalid(
                format!("the OCI runtime spec does not parse: {e}"),
                "check the container's spec (`ctr container info ID`)",
            )
        })
    }

    /// The VM's memory in MiB: the memory limit, at least 128 MiB.
    pub fn memory_mib(&self) -> Option<u32> {
        let limit = self.resources()?.memory.as_ref()?.limit?;
        (limit > 0).then(|| ((limit as u64 >> 20).max(128)).min(u32::MAX as u64) as u32)
    }

    /// The VM's vCPUs: the CPU quota rounded up to whole CPUs.
    pub fn cpus(&self) -> Option<u32> {
        let cpu = self.resources()?.cpu.as_ref()?;
        let (quota, period) = (cpu.quota?, cpu.period?);
        (quota > 0 && period > 0).then(|| (quota as u64).div_ceil(period).clamp(1, 64) as u32)
    }

    /// The root filesystem's directory: `root.path`, relative to `bundle`
    /// unless absolute (`rootfs` when the spec gives none).
    pub fn root_dir(&self, bundle: &Path) -> std::path::PathBuf {
        match self.root.as_ref().map(|r| r.path.as_str()) {
            Some(p) if p.starts_with('/') => p.into(),
            Some(p) if !p.is_empty() => bundle.join(p),
            _ => bundle.join("rootfs"),
        }
    }

    fn resources(&self) -> Option<&Resources> {
        self.linux.as_ref()?.resources.as_ref()
    }
}

impl Launch {
    /// The `PATH` of its environment, if it sets one.
    pub fn path(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
    }
}

impl Process {
    /// Parses an exec's process spec.
    pub fn parse(text: &[u8]) -> Result<Process> {
        serde_json::from_slice(text).map_err(|e| {
            invalid(
                format!("the exec's process spec does not parse: {e}"),
                "check the arguments of the exec",
            )
        })
    }

    /// How to run it in the VM; an empty command line is an error.
    pub fn launch(&self) -> Result<Launch> {
        if self.args.is_empty() {
            return Err(invalid(
                "the process has no command (process.args is empty)".into(),
                "give a command, or use an image with an entrypoint or command",
            ));
        }
        let env = self
            .env
            .iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        let user = match &self.user.username {
            Some(name) if !name.is_empty() => Some(name.clone()),
            _ => Some(format!("{}:{}", self.user.uid, self.user.gid)),
        };
        let tty = self.terminal.then(|| match self.console_size {
            Some(s) if s.height > 0 && s.width > 0 => (
                s.height.min(u16::MAX as u32) as u16,
                s.width.min(u16::MAX as u32) as u16,
            ),
            _ => (24, 80),
        });
        Ok(Launch {
            args: self.args.clone(),
            env,
            cwd: (!self.cwd.is_empty()).then(|| self.cwd.clone()),
            user,
            tty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": true,
            "consoleSize": {"height": 40, "width": 120},
            "user": {"uid": 1000, "gid": 100, "additionalGids": [10]},
            "args": ["/bin/sh", "-c", "echo hi"],
            "env": ["PATH=/usr/bin:/bin", "EMPTY=", "A=b=c"],
            "cwd": "/work",
            "capabilities": {"bounding": ["CAP_CHOWN"]},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "web",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "resources": {
                "memory": {"limit": 268435456},
                "cpu": {"quota": 150000, "period": 100000}
            },
            "namespaces": [{"type": "pid"}]
        }
    }"#;

    #[test]
    fn a_containerd_spec_becomes_a_launch_and_a_vm_size() {
        let spec = Spec::parse(CONFIG.as_bytes()).unwrap();
        assert_eq!(spec.root_dir(Path::new("/b")), Path::new("/b/rootfs"));
        assert_eq!(spec.memory_mib(), Some(256));
        assert_eq!(spec.cpus(), Some(2));
        let launch = spec.process.unwrap().launch().unwrap();
        assert_eq!(launch.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            launch.env,
            [
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("EMPTY".to_string(), String::new()),
                ("A".to_string(), "b=c".to_string()),
            ]
        );
        assert_eq!(launch.cwd.as_deref(), Some("/work"));
        assert_eq!(launch.path(), Some("/usr/bin:/bin"));
        assert_eq!(launch.user.as_deref(), Some("1000:100"));
        assert_eq!(launch.tty, Some((40, 120)));
    }

    #[test]
    fn small_or_missing_limits_fall_back() {
        let spec = Spec::parse(br#"{"linux":{"resources":{"memory":{"limit":1048576}}}}"#).unwrap();
        assert_eq!(spec.memory_mib(), Some(128));
        assert_eq!(spec.cpus(), None);
        let spec = Spec::parse(b"{}").unwrap();
        assert_eq!(spec.memory_mib(), None);
        assert!(spec.process.is_none());
    }

    #[test]
    fn bad_specs_are_clear_errors() {
        let e = Spec::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, "SHIM_SPEC_INVALID");
        assert_eq!(e.kind, Kind::Invalid);
        let e = Process::default().launch().unwrap_err();
        assert!(e.message.contains("process.args is empty"), "{e}");
        let p = Process::parse(br#"{"args":["ls"],"user":{"uid":0,"gid":0},"cwd":"/"}"#).unwrap();
        let launch = p.launch().unwrap();
        assert_eq!(launch.user.as_deref(), Some("0:0"));
        assert_eq!(launch.tty, None);
        let e = Spec::load(Path::new("/nonexistent-bundle")).unwrap_err();
        assert!(e.message.contains("config.json"), "{e}");
    }
}
