//! One error type for everything the library does.

use ferry_runtime::Coded;

pub use ferry_runtime::codes::CodeDoc;

/// A result with ferry's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every stable error code ferry reports, with what it means and what to
/// do (the table in `docs/errors.md`).
pub fn codes() -> &'static [CodeDoc] {
    ferry_runtime::codes::all()
}

/// A failure: a stable [`code`](Error::code) programs match on, a message
/// for people, a hint on what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    code: String,
    message: String,
    hint: Option<String>,
}

/// Whether a failure with `code` may pass by itself, so that trying again
/// later can succeed (e.g. `VM_BUSY`); for codes carried by other types,
/// such as a CLI's own failures.
pub fn retryable(code: &str) -> bool {
    RETRYABLE.contains(&code)
}

/// Codes whose cause may pass by itself: trying again later can succeed.
const RETRYABLE: &[&str] = &[
    "VM_BUSY",
    "AGENT_UNREACHABLE",
    "AGENT_NOT_READY",
    "BOOT_AGENT_TIMEOUT",
    "BOOT_PORT_FORWARD_IN_USE",
    "SNAPSHOT_STREAM_BROKEN",
    "VM_CONTROL_FAILED",
    "STORE_UNREACHABLE",
];

impl Error {
    pub(crate) fn new(code: &str, message: impl Into<String>, hint: Option<String>) -> Error {
        Error {
            code: code.to_string(),
            message: message.into(),
            hint,
        }
    }

    pub(crate) fn from_bundle(e: ferry_snapshot::BundleError) -> Error {
        Error::new(e.code(), e.to_string(), None)
    }

    /// The stable code, e.g. `VM_NAME_TAKEN` (see [`codes`]).
    pub fn code(&self) -> &str {
        &self.code
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What to do about it, when there is something to say.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// Whether the same call may succeed if tried again later.
    pub fn retryable(&self) -> bool {
        retryable(&self.code)
    }
}

impl<E: Coded + std::fmt::Display> From<E> for Error {
    fn from(e: E) -> Error {
        Error {
            code: e.code().to_string(),
            message: e.to_string(),
            hint: e.hint(),
        }
    }
}

impl From<Error> for ferry_runtime::Failure {
    fn from(e: Error) -> Self {
        ferry_runtime::Failure {
            code: e.code,
            message: e.message,
            hint: e.hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_retryable_code_is_documented() {
        for code in RETRYABLE {
            assert!(
                ferry_runtime::codes::lookup(code).is_some(),
                "{code} is not in docs/errors.md"
            );
        }
        assert!(!codes().is_empty());
    }

    #[test]
    fn errors_keep_code_message_and_hint() {
        let e = Error::from(ferry_runtime::vm::VmError::NotFound("web".into()));
        assert_eq!(e.code(), "VM_NOT_FOUND");
        assert!(e.message().contains("web"));
        assert!(e.hint().is_some());
        assert!(!e.retryable());
    }
}
