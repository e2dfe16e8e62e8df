//! ferry's exit statuses, as Docker's: 125 when ferry itself failed, 126
//! when the command cannot be executed, 127 when it is not found, and
//! otherwise the command's own status (128+N when signal N ended it).

use ferry::ExitStatus;

/// ferry itself failed (bad usage included); nothing ran, or what ran is unknown.
pub const FERRY_FAILED: u8 = 125;
/// The command exists but cannot be executed.
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;

/// The status that reports how a guest command ended: its exit code, or
/// 128+N when signal N ended it.
pub fn of(status: &ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        // Exit codes are 0-255 on Linux; anything else is kept in range.
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => FERRY_FAILED,
    }
}

/// The status for an error code the guest agent gave instead of starting
/// a command, if it is one of the command's own failures (not ferry's).
pub fn of_start_failure(code: &str) -> Option<u8> {
    match code {
        "EXEC_NOT_FOUND" => Some(NOT_FOUND),
        // The file is not executable, or exec(2) refused it (ENOEXEC and the like).
        "EXEC_PERMISSION_DENIED" | "EXEC_FAILED" => Some(CANNOT_EXECUTE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::ExitKind;

    fn status(kind: ExitKind) -> ExitStatus {
        ExitStatus {
            kind,
            timed_out: false,
        }
    }

    #[test]
    fn statuses_map_as_dockers_do() {
        assert_eq!(of(&status(ExitKind::Code(0))), 0);
        assert_eq!(of(&status(ExitKind::Code(7))), 7);
        assert_eq!(of(&status(ExitKind::Signal(9))), 137);
        assert_eq!(of(&status(ExitKind::Signal(2))), 130);
        assert_eq!(of_start_failure("EXEC_NOT_FOUND"), Some(127));
        assert_eq!(of_start_failure("EXEC_PERMISSION_DENIED"), Some(126));
        assert_eq!(of_start_failure("VM_NOT_FOUND"), None);
    }
}
