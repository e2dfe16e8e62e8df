//! Whole-guest operations: sync, wall clock, entropy, power.
//!
//! Behind a trait so the server can be exercised on a development host
//! without changing that host's clock or powering it off.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use ferry_protocol::PowerAction;
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

/// Operations on the guest as a whole.
pub trait SystemOps: Send + Sync {
    /// Flushes all filesystems.
    fn sync(&self) -> io::Result<()>;
    /// Sets `CLOCK_REALTIME` to `ns` since the epoch.
    fn set_clock(&self, ns: u64) -> io::Result<()>;
    /// Mixes `bytes` into the kernel RNG and credits them as entropy.
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()>;
    /// Sets the kernel hostname and records it in `/etc/hostname`.
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Starts powering off or rebooting; returns once the request is
    /// accepted (the reply to the host goes out before the VM stops).
    fn power(&self, action: PowerAction) -> io::Result<()>;
}

/// The real operations, for the agent running as PID 1 in a guest.
pub struct LinuxSystem {
    /// Where power requests go: the PID 1 main loop, which shuts down
    /// cleanly. `None` outside PID 1, where powering off is refused.
    power_tx: Option<Mutex<Sender<PowerAction>>>,
}

impl LinuxSystem {
    /// Real operations; `power_tx` receives accepted power requests.
    pub fn new(power_tx: Option<Sender<PowerAction>>) -> Self {
        LinuxSystem {
            power_tx: power_tx.map(Mutex::new),
        }
    }
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
pub const RNDADDENTROPY: libc::Ioctl =
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()) as libc::Ioctl;

/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`: reseed the kernel CRNG from its input pool now.
pub const RNDRESEEDCRNG: libc::Ioctl = nix::request_code_none!(b'R', 0x07) as libc::Ioctl;

/// `struct rand_pool_info` header for RNDADDENTROPY: entropy bits, then
/// buffer size in bytes, then the buffer.
pub fn rand_pool_info(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + bytes.len());
    let bits = i32::try_from(bytes.len().saturating_mul(8)).unwrap_or(i32::MAX);
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    v.extend_from_slice(&bits.to_ne_bytes());
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(bytes);
    // The kernel reads the buffer as __u32 words; pad to a whole word.
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

impl SystemOps for LinuxSystem {
    fn sync(&self) -> io::Result<()> {
        nix::unistd::sync();
        Ok(())
    }

    fn set_clock(&self, ns: u64) -> io::Result<()> {
        let ts = TimeSpec::new(
            i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
            (ns % 1_000_000_000) as i64,
        );
        clock_settime(ClockId::CLOCK_REALTIME, ts)?;
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name).map_err(io::Error::from)?;
        // Not synced: like `hostname` plus a shell redirect, the file
        // reaches the disk with the guest's next writeback.
        std::fs::write("/etc/hostname", format!("{name}\n"))
    }

    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let f = OpenOptions::new().write(true).open("/dev/random")?;
        let info = rand_pool_info(bytes);
        // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` whose
        // `buf_size` field (bytes.len()) does not exceed the buffer that
        // follows the 8-byte header in `info`, which outlives the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // Mixing alone leaves the CRNG on its old key until its next scheduled
        // reseed; after a restore or fork that key is shared with siblings.
        // SAFETY: RNDRESEEDCRNG takes no argument.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn power(&self, action: PowerAction) -> io::Result<()> {
        match &self.power_tx {
            Some(tx) => tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(action)
                .map_err(|_| io::Error::other("init loop is gone")),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "power control is only available when the agent is PID 1",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rndaddentropy_request_code() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn pool_info_layout() {
        let v = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(&v[..4], &40i32.to_ne_bytes());
        assert_eq!(&v[4..8], &5i32.to_ne_bytes());
        assert_eq!(&v[8..13], &[1, 2, 3, 4, 5]);
        assert_eq!(v.len(), 16);
    }

    #[test]
    fn power_outside_pid1_is_refused_and_inside_is_forwarded() {
        assert_eq!(
            LinuxSystem::new(None)
                .power(PowerAction::Poweroff)
                .unwrap_err()
                .kind(),
            io::ErrorKind::Unsupported
        );
        let (tx, rx) = std::sync::mpsc::channel();
        LinuxSystem::new(Some(tx))
            .power(PowerAction::Reboot)
            .unwrap();
        assert_eq!(rx.recv().unwrap(), PowerAction::Reboot);
    }
}
