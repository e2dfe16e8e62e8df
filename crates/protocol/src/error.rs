//! Error codes shared by the agent and the host, and wire-level errors.

use std::fmt;

/// A stable error code the agent sends in an `Error` frame.
///
/// Both the numeric value (on the wire) and the name (shown to users, e.g.
/// `EXEC_NOT_FOUND`) are stable: new codes may be added, existing ones are
/// never renumbered. A code this build does not know decodes to
/// [`ErrorCode::Unknown`] so an older host can still show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The Hello carried a wrong token.
    AuthFailed,
    /// Host and agent speak different protocol versions.
    ProtocolVersion,
    /// A frame could not be decoded.
    Malformed,
    /// A frame was valid but not expected at this point of the conversation.
    Unexpected,
    /// A frame exceeded the maximum frame size.
    FrameTooLarge,
    /// The executable does not exist (or is not on `PATH`).
    ExecNotFound,
    /// The executable exists but may not be executed.
    ExecPermissionDenied,
    /// The `user` of an exec request could not be resolved.
    ExecUserUnknown,
    /// The working directory of an exec request is unusable.
    ExecBadCwd,
    /// Any other failure to start a process.
    ExecFailed,
    /// The exec request itself is invalid (e.g. empty argv).
    ExecInvalid,
    /// `StartMain` when the VM already has a main process (from its config
    /// at boot or an earlier `StartMain`).
    MainAlreadyRunning,
    /// `SignalMain` when the VM has no main process running.
    MainNotRunning,
    /// A file (or its parent directory) does not exist.
    FileNotFound,
    /// Permission denied on a file operation.
    FilePermissionDenied,
    /// The path names a directory where a file was expected.
    FileIsDirectory,
    /// Any other I/O failure of a file operation.
    FileIo,
    /// `sync()` failed (it practically cannot; kept for completeness).
    SyncFailed,
    /// Setting the wall clock failed.
    ClockFailed,
    /// Crediting entropy to the kernel failed.
    EntropyFailed,
    /// Setting the hostname failed.
    HostnameFailed,
    /// Powering off or rebooting failed or is not allowed here.
    PowerFailed,
    /// Nothing accepts connections on the guest port of a forward.
    ForwardRefused,
    /// Any other failure to connect a forward inside the guest.
    ForwardFailed,
    /// A bug or unforeseen condition in the agent.
    Internal,
    /// A code this build does not know.
    Unknown(u16),
}

impl ErrorCode {
    /// Every known code, for tables and tests.
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::AuthFailed,
        ErrorCode::ProtocolVersion,
        ErrorCode::Malformed,
        ErrorCode::Unexpected,
        ErrorCode::FrameTooLarge,
        ErrorCode::ExecNotFound,
        ErrorCode::ExecPermissionDenied,
        ErrorCode::ExecUserUnknown,
        ErrorCode::ExecBadCwd,
        ErrorCode::ExecFailed,
        ErrorCode::ExecInvalid,
        ErrorCode::MainAlreadyRunning,
        ErrorCode::MainNotRunning,
        ErrorCode::FileNotFound,
        ErrorCode::FilePermissionDenied,
        ErrorCode::FileIsDirectory,
        ErrorCode::FileIo,
        ErrorCode::SyncFailed,
        ErrorCode::ClockFailed,
        ErrorCode::EntropyFailed,
        ErrorCode::HostnameFailed,
        ErrorCode::PowerFailed,
        ErrorCode::ForwardRefused,
        ErrorCode::ForwardFailed,
        ErrorCode::Internal,
    ];

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::AuthFailed => 1,
            ErrorCode::ProtocolVersion => 2,
            ErrorCode::Malformed => 3,
            ErrorCode::Unexpected => 4,
            ErrorCode::FrameTooLarge => 5,
            ErrorCode::ExecNotFound => 100,
            ErrorCode::ExecPermissionDenied => 101,
            ErrorCode::ExecUserUnknown => 102,
            ErrorCode::ExecBadCwd => 103,
            ErrorCode::ExecFailed => 104,
            ErrorCode::ExecInvalid => 105,
            ErrorCode::MainAlreadyRunning => 106,
            ErrorCode::MainNotRunning => 107,
            ErrorCode::FileNotFound => 200,
            ErrorCode::FilePermissionDenied => 201,
            ErrorCode::FileIsDirectory => 202,
            ErrorCode::FileIo => 203,
            ErrorCode::SyncFailed => 300,
            ErrorCode::ClockFailed => 301,
            ErrorCode::EntropyFailed => 302,
            ErrorCode::PowerFailed => 303,
            ErrorCode::HostnameFailed => 304,
            ErrorCode::ForwardRefused => 400,
            ErrorCode::ForwardFailed => 401,
            ErrorCode::Internal => 999,
            ErrorCode::Unknown(v) => v,
        }
    }

    /// Decodes a wire value; unknown values are preserved.
    pub fn from_u16(v: u16) -> Self {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_u16() == v)
            .unwrap_or(ErrorCode::Unknown(v))
    }

    /// The stable, user-facing name, e.g. `AGENT_AUTH_FAILED`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::AuthFailed => "AGENT_AUTH_FAILED",
            ErrorCode::ProtocolVersion => "AGENT_PROTOCOL_VERSION",
            ErrorCode::Malformed => "AGENT_PROTOCOL_MALFORMED",
            ErrorCode::Unexpected => "AGENT_PROTOCOL_UNEXPECTED",
            ErrorCode::FrameTooLarge => "AGENT_FRAME_TOO_LARGE",
            ErrorCode::ExecNotFound => "EXEC_NOT_FOUND",
            ErrorCode::ExecPermissionDenied => "EXEC_PERMISSION_DENIED",
            ErrorCode::ExecUserUnknown => "EXEC_USER_UNKNOWN",
            ErrorCode::ExecBadCwd => "EXEC_BAD_CWD",
            ErrorCode::ExecFailed => "EXEC_FAILED",
            ErrorCode::ExecInvalid => "EXEC_INVALID",
            ErrorCode::MainAlreadyRunning => "MAIN_ALREADY_RUNNING",
            ErrorCode::MainNotRunning => "WORKLOAD_NOT_RUNNING",
            ErrorCode::FileNotFound => "FILE_NOT_FOUND",
            ErrorCode::FilePermissionDenied => "FILE_PERMISSION_DENIED",
            ErrorCode::FileIsDirectory => "FILE_IS_DIRECTORY",
            ErrorCode::FileIo => "FILE_IO",
            ErrorCode::SyncFailed => "AGENT_SYNC_FAILED",
            ErrorCode::ClockFailed => "AGENT_CLOCK_FAILED",
            ErrorCode::EntropyFailed => "AGENT_ENTROPY_FAILED",
            ErrorCode::PowerFailed => "AGENT_POWER_FAILED",
            ErrorCode::HostnameFailed => "AGENT_HOSTNAME_FAILED",
            ErrorCode::ForwardRefused => "FORWARD_REFUSED",
            ErrorCode::ForwardFailed => "FORWARD_FAILED",
            ErrorCode::Internal => "AGENT_INTERNAL",
            ErrorCode::Unknown(_) => "AGENT_UNKNOWN_ERROR",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Unknown(v) => write!(f, "{}({v})", self.name()),
            _ => f.write_str(self.name()),
        }
    }
}

/// Failure to read, write or decode frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the stream where a frame was required.
    #[error("connection closed by peer")]
    Closed,
    /// A frame announced a size over the limit; the stream is unusable after.
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Unknown frame type byte.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// The payload did not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl ProtocolError {
    /// The error code an agent reports for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::Io(_) | ProtocolError::Closed => ErrorCode::Internal,
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::UnknownType(_) | ProtocolError::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c.as_u16()), c);
            assert!(seen.insert(c.as_u16()), "duplicate wire value for {c}");
        }
        assert_eq!(ErrorCode::from_u16(4242), ErrorCode::Unknown(4242));
        assert_eq!(ErrorCode::Unknown(4242).as_u16(), 4242);
        assert_eq!(ErrorCode::AuthFailed.to_string(), "AGENT_AUTH_FAILED");
        assert_eq!(ErrorCode::ExecNotFound.name(), "EXEC_NOT_FOUND");
        let names: std::collections::HashSet<_> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
