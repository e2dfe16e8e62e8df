//! Errors users see: each carries a stable code and a hint on what to do.

use std::path::PathBuf;

/// A failure with a stable, machine-readable code.
///
/// Codes never change meaning once published; scripts match on them.
pub trait Coded {
    /// Stable code such as `INSTALL_NEEDS_ROOT`.
    fn code(&self) -> &str;
    /// What the user can do about it, if there is something to say.
    fn hint(&self) -> Option<String> {
        None
    }
}

/// Errors from preparing guest assets and host tools.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Host packages are missing and we may not install them.
    #[error("missing host packages: {}", .0.join(" "))]
    MissingPackages(Vec<String>),
    /// A step needs root (debootstrap, apt-get).
    #[error("{step} needs root privileges")]
    NeedsRoot {
        /// What needed root.
        step: String,
    },
    /// A tool we ran failed.
    #[error("{what} failed ({status}); log: {}", log.display())]
    CommandFailed {
        /// Human description of the step.
        what: String,
        /// Exit status text.
        status: String,
        /// Full log of the command.
        log: PathBuf,
        /// The last lines of the log, shown to the user.
        tail: String,
    },
    /// Could not find a Debian package or its version.
    #[error("Debian package {0} is not known to apt")]
    UnknownPackage(String),
    /// No Debian mirror configured on this host.
    #[error("no Debian mirror found in /etc/apt/sources.list or /etc/apt/sources.list.d")]
    NoMirror,
    /// The kernel config did not take an option we asked for.
    #[error("kernel config option(s) did not apply: {}", .0.join(", "))]
    KernelConfigMismatch(Vec<String>),
    /// Filesystem trouble.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl InstallError {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| InstallError::Io { context, source }
    }
}

impl Coded for InstallError {
    fn code(&self) -> &'static str {
        match self {
            InstallError::MissingPackages(_) => "INSTALL_MISSING_PACKAGES",
            InstallError::NeedsRoot { .. } => "INSTALL_NEEDS_ROOT",
            InstallError::CommandFailed { .. } => "INSTALL_STEP_FAILED",
            InstallError::UnknownPackage(_) => "INSTALL_UNKNOWN_PACKAGE",
            InstallError::NoMirror => "INSTALL_NO_MIRROR",
            InstallError::KernelConfigMismatch(_) => "INSTALL_KERNEL_CONFIG",
            InstallError::Io { .. } => "INSTALL_IO",
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            InstallError::MissingPackages(p) => Some(format!(
                "run as root so ferry can install them, or: apt-get install -y {}",
                p.join(" ")
            )),
            InstallError::NeedsRoot { .. } => Some("run `sudo ferry install` once".into()),
            InstallError::CommandFailed { tail, .. } => Some(format!("last lines:\n{tail}")),
            InstallError::NoMirror => Some(
                "set FERRY_DEBIAN_MIRROR to a Debian mirror URL reachable from this host".into(),
            ),
            InstallError::KernelConfigMismatch(_) => Some(
                "the kernel source no longer accepts these options; adjust assets/kernel/*.config"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// What to do about a KVM or guest-kernel failure code of a VMM process.
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

/// Any coded error, flattened for display at the edge (CLI, JSON output).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// Stable code.
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl<E: Coded + std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure {
            code: e.code().to_string(),
            message: e.to_string(),
            hint: e.hint(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error[{}]: {}", self.code, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {}", hint.replace('\n', "\n    "))?;
        }
        Ok(())
    }
}

impl Coded for ferry_protocol::ClientError {
    fn code(&self) -> &str {
        use ferry_protocol::ClientError as E;
        match self {
            E::Agent { code, .. } => code.name(),
            E::Version { .. } => "AGENT_PROTOCOL_VERSION",
            E::Connect(_) => "AGENT_UNREACHABLE",
            E::NotReady(..) => "AGENT_NOT_READY",
            E::LocalIo { .. } => "LOCAL_IO",
            E::Protocol(_) | E::Unexpected { .. } => "AGENT_PROTOCOL",
        }
    }

    fn hint(&self) -> Option<String> {
        use ferry_protocol::ClientError as E;
        match self {
            E::Connect(_) | E::NotReady(..) => {
                Some("is the VM running? `ferry ls` shows it, `ferry logs NAME` its console".into())
            }
            E::Version { .. } => Some("boot the VM with this ferry version's agent".into()),
            _ => None,
        }
    }
}
