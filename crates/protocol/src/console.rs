//! Recognisable lines the agent prints on the guest console.
//!
//! The host reads the serial console; these markers let it tell when the
//! agent is serving and how the main process ended without speaking vsock.

use crate::message::ExitKind;

/// Printed once the agent listens on vsock: `FERRY-AGENT-READY version=<v>`.
pub const READY_MARKER: &str = "FERRY-AGENT-READY";

/// Printed when the main process ends, right before power-off:
/// `FERRY-MAIN-EXIT code=<n>` or `FERRY-MAIN-EXIT signal=<n>`.
pub const MAIN_EXIT_MARKER: &str = "FERRY-MAIN-EXIT";

/// The ready line for this protocol version.
pub fn ready_line() -> String {
    format!("{READY_MARKER} version={}", crate::PROTOCOL_VERSION)
}

/// The console line reporting the main process's end.
pub fn main_exit_line(kind: ExitKind) -> String {
    match kind {
        ExitKind::Code(c) => format!("{MAIN_EXIT_MARKER} code={c}"),
        ExitKind::Signal(s) => format!("{MAIN_EXIT_MARKER} signal={s}"),
    }
}

/// Finds a main-exit line in console output (one line, possibly with a
/// kernel timestamp or other prefix) and returns how the process ended.
pub fn parse_main_exit(line: &str) -> Option<ExitKind> {
    let rest = &line[line.find(MAIN_EXIT_MARKER)? + MAIN_EXIT_MARKER.len()..];
    let field = rest.split_whitespace().next()?;
    if let Some(c) = field.strip_prefix("code=") {
        return c.parse().ok().map(ExitKind::Code);
    }
    field
        .strip_prefix("signal=")
        .and_then(|s| s.parse().ok())
        .map(ExitKind::Signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_lines_round_trip() {
        for k in [
            ExitKind::Code(0),
            ExitKind::Code(-1),
            ExitKind::Code(255),
            ExitKind::Signal(9),
        ] {
            assert_eq!(parse_main_exit(&main_exit_line(k)), Some(k));
            let prefixed = format!("[    1.234] ferry-agent: {}\r", main_exit_line(k));
            assert_eq!(parse_main_exit(&prefixed), Some(k));
        }
        assert_eq!(parse_main_exit("FERRY-MAIN-EXIT bogus"), None);
        assert_eq!(parse_main_exit("unrelated"), None);
        assert!(ready_line().starts_with(READY_MARKER));
    }
}
