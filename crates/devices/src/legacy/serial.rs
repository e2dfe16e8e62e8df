//! 8250/16550 UART on top of `vm-superio`, writing guest output to a console log.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Number of registers of the UART.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Size at which the console log is rotated: the guest decides how much it
/// prints, so without a limit a chatty guest could fill the host's disk.
/// At most this much is kept in the log plus as much in its `.1` file.
pub const CONSOLE_LOG_LIMIT: u64 = 8 << 20;

/// Errors of [`Serial`].
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved state could not be loaded into a UART.
    #[error("invalid serial state: {0}")]
    InvalidState(String),
    /// Opening the console log failed.
    #[error("cannot open console log {path}")]
    ConsoleLog {
        /// The log's path.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Interrupt line of the UART: an eventfd registered as a KVM irqfd.
pub struct IrqEvent(EventFd);

impl Trigger for IrqEvent {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest console output goes: an append-only log file, plus optionally
/// a second file (a pipe or terminal given by the caller).
///
/// The log keeps its name: once it would grow past its limit it is renamed
/// to `<name>.1` (replacing an older one) and a new log is started, so
/// readers always find the latest output under the same path.
pub struct ConsoleSink {
    log: File,
    path: PathBuf,
    /// Bytes in the current log.
    len: u64,
    limit: u64,
    tee: Option<File>,
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl ConsoleSink {
    /// Opens (creating if needed) `path` for appending; `tee` receives a copy.
    /// The log rotates at [`CONSOLE_LOG_LIMIT`].
    pub fn open(path: &Path, tee: Option<File>) -> Result<Self, SerialError> {
        Self::with_limit(path, tee, CONSOLE_LOG_LIMIT)
    }

    /// As [`Self::open`], rotating the log at `limit` bytes.
    pub fn with_limit(path: &Path, tee: Option<File>, limit: u64) -> Result<Self, SerialError> {
        let open = || -> io::Result<(File, u64)> {
            let log = open_log(path)?;
            // A log reopened (after a restore) keeps counting from its size.
            let len = log.metadata()?.len();
            Ok((log, len))
        };
        let (log, len) = open().map_err(|source| SerialError::ConsoleLog {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            log,
            path: path.to_path_buf(),
            len,
            limit,
            tee,
        })
    }

    /// Moves the full log to `<name>.1` and starts a new one.
    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.log = open_log(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len > 0 && self.len + buf.len() as u64 > self.limit {
            if let Err(e) = self.rotate() {
                // Keep the disk bounded all the same: lose the old output.
                tracing::warn!("cannot rotate the console log: {e}; truncating it");
                self.log.set_len(0)?;
                self.len = 0;
            }
        }
        self.log.write_all(buf)?;
        self.len += buf.len() as u64;
        if let Some(tee) = self.tee.as_mut() {
            // A reader that went away must not stop the console log.
            if let Err(e) = tee.write_all(buf) {
                tracing::warn!("console copy closed: {e}");
                self.tee = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}

/// Serializable UART registers and receive FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The guest's console UART.
pub struct Serial {
    inner: vm_superio::Serial<IrqEvent, NoEvents, ConsoleSink>,
}

impl Serial {
    /// A UART raising `irq` and writing transmitted bytes to `out`.
    pub fn new(irq: EventFd, out: ConsoleSink) -> Self {
        Self {
            inner: vm_superio::Serial::new(IrqEvent(irq), out),
        }
    }

    /// Rebuilds a UART from saved registers.
    pub fn restore(
        irq: EventFd,
        out: ConsoleSink,
        state: &SerialState,
    ) -> Result<Self, SerialError> {
        let inner = vm_superio::Serial::from_state(&state.into(), IrqEvent(irq), NoEvents, out)
            .map_err(|e| SerialError::InvalidState(format!("{e:?}")))?;
        Ok(Self { inner })
    }

    /// Captures the UART's registers.
    pub fn save(&self) -> SerialState {
        self.inner.state().into()
    }

    /// Raises the interrupt again if the UART has one pending (IIR bit 0
    /// clear); used after a restore, when an edge sent before the save may
    /// not have reached the saved interrupt controller.
    pub fn resignal_pending_interrupt(&self) -> std::io::Result<()> {
        if self.inner.state().interrupt_identification & 1 == 0 {
            self.irq_evt().write(1)?;
        }
        Ok(())
    }

    /// The interrupt eventfd (to register as an irqfd).
    pub fn irq_evt(&self) -> &EventFd {
        &self.inner.interrupt_evt().0
    }

    /// Guest read of a UART register.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) if offset < SERIAL_PORT_LEN => data[0] = self.inner.read(off),
            _ => data.fill(0xff),
        }
    }

    /// Guest write of a UART register.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if offset < SERIAL_PORT_LEN {
                if let Err(e) = self.inner.write(off, data[0]) {
                    tracing::warn!("serial write failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const SCR: u64 = 7;

    fn serial(dir: &Path, tee: Option<File>) -> (Serial, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::open(&dir.join("console.log"), tee).unwrap();
        (Serial::new(evt.try_clone().unwrap(), sink), evt)
    }

    #[test]
    fn output_goes_to_log_and_tee() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let tee = File::from(std::os::fd::OwnedFd::from(writer));
        let (mut s, _evt) = serial(dir.path(), Some(tee));
        for b in b"hi\n" {
            s.write(THR, &[*b]);
        }
        let log = std::fs::read(dir.path().join("console.log")).unwrap();
        assert_eq!(log, b"hi\n");
        let mut copy = [0u8; 3];
        reader.read_exact(&mut copy).unwrap();
        assert_eq!(&copy, b"hi\n");
        // The tee's reader leaving must not affect the log.
        drop(reader);
        s.write(THR, b"x");
        let log = std::fs::read(dir.path().join("console.log")).unwrap();
        assert_eq!(log, b"hi\nx");
    }

    #[test]
    fn the_log_rotates_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let old = dir.path().join("console.log.1");
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::with_limit(&log, None, 8).unwrap();
        let mut s = Serial::new(evt, sink);
        let mut put = |bytes: &[u8]| bytes.iter().for_each(|b| s.write(THR, &[*b]));
        put(b"01234567");
        assert_eq!(std::fs::read(&log).unwrap(), b"01234567");
        assert!(!old.exists());
        put(b"89");
        assert_eq!(std::fs::read(&old).unwrap(), b"01234567");
        assert_eq!(std::fs::read(&log).unwrap(), b"89");
        // The next rotation replaces the older `.1`.
        put(b"abcdefgh");
        assert_eq!(std::fs::read(&old).unwrap(), b"89abcdef");
        assert_eq!(std::fs::read(&log).unwrap(), b"gh");

        // A log reopened (as on a restore) counts what it already holds.
        let mut sink = ConsoleSink::with_limit(&log, None, 8).unwrap();
        sink.write_all(b"1234567").unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"gh");
        assert_eq!(std::fs::read(&log).unwrap(), b"1234567");
        // A single write longer than the limit still lands whole.
        sink.write_all(b"0123456789").unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"1234567");
        assert_eq!(std::fs::read(&log).unwrap(), b"0123456789");
        assert_eq!(CONSOLE_LOG_LIMIT, 8 << 20);
    }

    #[test]
    fn a_log_that_cannot_rotate_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        // `.1` taken by a non-empty directory: the rename fails.
        std::fs::create_dir_all(dir.path().join("console.log.1/x")).unwrap();
        let mut sink = ConsoleSink::with_limit(&log, None, 4).unwrap();
        sink.write_all(b"abcd").unwrap();
        sink.write_all(b"ef").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"ef");
    }

    #[test]
    fn transmit_interrupt_fires_when_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, evt) = serial(dir.path(), None);
        assert!(evt.read().is_err(), "no interrupt before IER is set");
        s.write(IER, &[0x02]); // THR empty interrupt
        s.write(THR, b"a");
        assert!(evt.read().unwrap() >= 1);
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _evt) = serial(dir.path(), None);
        s.write(SCR, &[0x5a]);
        let mut wide = [0u8; 2];
        s.read(SCR, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut b = [0u8];
        s.read(SCR, &mut b);
        assert_eq!(b[0], 0x5a);
        s.read(SERIAL_PORT_LEN, &mut b);
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _evt) = serial(dir.path(), None);
        s.write(LCR, &[0x80]); // DLAB on
        s.write(0, &[0x0c]);
        s.write(1, &[0x00]);
        s.write(LCR, &[0x03]); // 8N1
        s.write(IER, &[0x01]);
        s.write(SCR, &[0x42]);
        let saved = s.save();
        assert_eq!(saved.baud_divisor_low, 0x0c);
        assert_eq!(saved.scratch, 0x42);
        let json = serde_json::to_string(&saved).unwrap();
        let parsed: SerialState = serde_json::from_str(&json).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::open(&dir.path().join("console2.log"), None).unwrap();
        let restored = Serial::restore(evt, sink, &parsed).unwrap();
        assert_eq!(restored.save(), saved);
    }
}
