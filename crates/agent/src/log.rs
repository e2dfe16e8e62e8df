//! Console logging. In the guest, stderr is `/dev/console`.

use std::fmt;
use std::io::Write;

/// Writes one line to stderr, prefixed so it stands out among kernel and
/// service messages. Failures to log are ignored: there is nowhere else to go.
pub fn write_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "ferry-agent: {args}");
}

/// Logs a formatted line to the console.
#[macro_export]
macro_rules! agent_log {
    ($($arg:tt)*) => {
        $crate::log::write_line(format_args!($($arg)*))
    };
}
