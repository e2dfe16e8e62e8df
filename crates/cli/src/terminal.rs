//! The user's terminal: raw mode for `-t`, its size, and signals forwarded to
//! the command running in the guest.

use std::os::fd::AsFd;

use ferry_protocol::ExecInput;
use nix::sys::termios::{self, SetArg, Termios};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};

/// Puts stdin in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Enters raw mode on stdin.
    pub fn enter() -> nix::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Rows and columns of the terminal on stdout, if it is one.
pub fn size() -> Option<(u16, u16)> {
    terminal_size::terminal_size().map(|(w, h)| (h.0, w.0))
}

/// Forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to the guest command, and terminal
/// resizes when it runs on a pty.
pub fn forward_signals(input: ExecInput, tty: bool) {
    let Ok(mut signals) =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH])
    else {
        return;
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == SIGWINCH {
                if tty {
                    if let Some((rows, cols)) = size() {
                        let _ = input.resize(rows, cols);
                    }
                }
                continue;
            }
            if input.signal(sig).is_err() {
                break;
            }
        }
    });
}
