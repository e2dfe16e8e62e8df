//! VMs on this host: their state directories, the VMM process behind each, and
//! the control socket that drives it.

pub mod control;
pub mod record;
pub mod registry;

pub use record::{VmDir, VmRecord};
pub use registry::{Owner, Registry, VmInfo, VmStatus};

use crate::error::Coded;

/// Errors about VMs users see.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The name is not acceptable.
    #[error("invalid VM name {0:?}")]
    InvalidName(String),
    /// Another VM has the name.
    #[error("a VM named {name} already exists{}", if *running { " and is running" } else { "" })]
    NameTaken {
        /// The name.
        name: String,
        /// Whether that VM is running.
        running: bool,
    },
    /// No such VM.
    #[error("no VM named {0}")]
    NotFound(String),
    /// The VM exists but is not running.
    #[error("VM {name} is not running ({reason})")]
    NotRunning {
        /// The name.
        name: String,
        /// Why it stopped.
        reason: String,
    },
    /// The VM must be stopped first.
    #[error("VM {0} is running")]
    StillRunning(String),
    /// The control socket answered with nonsense.
    #[error("control socket: {0}")]
    Control(String),
    /// The VMM process refused a control request.
    #[error("{message}")]
    Refused {
        /// The VMM's stable code.
        code: String,
        /// What went wrong.
        message: String,
    },
    /// The VMM process did not exit when stopped and killed.
    #[error("the VMM process of {0} did not exit")]
    StopTimeout(String),
    /// Another control operation on the VM holds its lock and did not finish
    /// within [`crate::machine::LOCK_WAIT`].
    #[error("VM {0} is busy with another operation")]
    Busy(String),
    /// Filesystem or socket trouble.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| VmError::Io { context, source }
    }
}

impl Coded for VmError {
    fn code(&self) -> &str {
        match self {
            VmError::Refused { code, .. } => code,
            VmError::StopTimeout(_) => "VM_STOP_TIMEOUT",
            VmError::Busy(_) => "VM_BUSY",
            VmError::InvalidName(_) => "VM_NAME_INVALID",
            VmError::NameTaken { .. } => "VM_NAME_TAKEN",
            VmError::NotFound(_) => "VM_NOT_FOUND",
            VmError::NotRunning { .. } => "VM_NOT_RUNNING",
            VmError::StillRunning(_) => "VM_STILL_RUNNING",
            VmError::Control(_) => "VM_CONTROL_FAILED",
            VmError::Io { .. } => "VM_IO",
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            VmError::InvalidName(_) => Some(
                "use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit".into(),
            ),
            VmError::NameTaken {
                name,
                running: true,
            } => Some(format!(
                "pick another --name, or `ferry stop {name} && ferry rm {name}`"
            )),
            VmError::NameTaken {
                name,
                running: false,
            } => Some(format!("pick another --name, or `ferry rm {name}`")),
            VmError::NotFound(_) => Some("`ferry ls` lists the VMs".into()),
            VmError::NotRunning { name, .. } => Some(format!(
                "`ferry logs {name}` shows its console; boot a new VM with `ferry boot`"
            )),
            VmError::StillRunning(name) => Some(format!("`ferry stop {name}` first")),
            VmError::StopTimeout(_) => {
                Some("the process may be stuck in the kernel; see `ps` and the VM's vmm.log".into())
            }
            VmError::Busy(name) => Some(format!(
                "another ferry command is snapshotting, forking or stopping {name}; retry when it is done"
            )),
            _ => None,
        }
    }
}
