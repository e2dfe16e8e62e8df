//! The error type of agent operations: a stable code plus detail.

use std::io;

use ferry_protocol::ErrorCode;

/// An operation failed; reported to the host as an `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct AgentError {
    /// Stable code sent to the host.
    pub code: ErrorCode,
    /// Detail for humans.
    pub message: String,
}

impl AgentError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AgentError {
            code,
            message: message.into(),
        }
    }

    /// Maps an I/O error from a file operation on `path` to a file code.
    pub fn file(path: &str, e: &io::Error) -> Self {
        let code = match e.kind() {
            io::ErrorKind::NotFound => ErrorCode::FileNotFound,
            io::ErrorKind::PermissionDenied => ErrorCode::FilePermissionDenied,
            _ if e.raw_os_error() == Some(libc::EISDIR) => ErrorCode::FileIsDirectory,
            _ => ErrorCode::FileIo,
        };
        AgentError::new(code, format!("{path}: {e}"))
    }
}
