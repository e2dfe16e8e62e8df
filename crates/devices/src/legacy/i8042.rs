//! Minimal i8042 keyboard controller.
//!
//! It answers the controller commands Linux may issue while probing and
//! turns the "pulse reset line" command (`reboot=k`) into an event the VMM
//! treats as a guest reset. No keyboard or mouse input is emulated.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Offset of the data port (0x60) in the device.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (0x64) in the device.
pub const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;

const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;

/// Bytes the controller may hold for the guest; more are dropped.
const OUTPUT_CAPACITY: usize = 16;

/// Serializable controller state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller configuration byte.
    pub control: u8,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// Command waiting for its data byte on port 0x60.
    pub pending_command: Option<u8>,
    /// Bytes waiting to be read from port 0x60.
    pub output: Vec<u8>,
}

/// The i8042 controller.
pub struct I8042 {
    reset_evt: EventFd,
    control: u8,
    last_was_command: bool,
    pending_command: Option<u8>,
    output: VecDeque<u8>,
}

impl I8042 {
    /// A controller that writes `reset_evt` when the guest asks for a reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            control: CTR_AUX_DISABLED,
            last_was_command: false,
            pending_command: None,
            output: VecDeque::new(),
        }
    }

    /// Rebuilds a controller from saved state.
    pub fn restore(reset_evt: EventFd, state: &I8042State) -> Self {
        let mut output: VecDeque<u8> = state.output.iter().copied().collect();
        output.truncate(OUTPUT_CAPACITY);
        Self {
            reset_evt,
            control: state.control,
            last_was_command: state.last_was_command,
            pending_command: state.pending_command,
            output,
        }
    }

    /// Captures the controller state.
    pub fn save(&self) -> I8042State {
        I8042State {
            control: self.control,
            last_was_command: self.last_was_command,
            pending_command: self.pending_command,
            output: self.output.iter().copied().collect(),
        }
    }

    /// The eventfd written on a guest reset request.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM_FLAG;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        s
    }

    /// Guest read of port 0x60 (offset 0) or 0x64 (offset 4).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
    }

    /// Guest write of port 0x60 (offset 0) or 0x64 (offset 4).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(data[0]);
            }
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(data[0]);
            }
            _ => {}
        }
    }

    fn command(&mut self, cmd: u8) {
        self.pending_command = None;
        match cmd {
            CMD_READ_CTR => self.push_output(self.control),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUT
            | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => self.pending_command = Some(cmd),
            CMD_AUX_DISABLE => self.control |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.control &= !CTR_AUX_DISABLED,
            CMD_AUX_TEST | CMD_KBD_TEST => self.push_output(0x00),
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_KBD_DISABLE => self.control |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CTR_KBD_DISABLED,
            // Output port: A20 enabled, reset line not asserted.
            CMD_READ_OUTPUT_PORT => self.push_output(0x03),
            // 0xf0..=0xff pulse output lines low for each clear bit in the low
            // nibble; bit 0 is the CPU reset line.
            c if c & 0xf0 == 0xf0 && c & 0x01 == 0 => self.request_reset(),
            other => tracing::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.control = byte,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                // Clearing bit 0 of the output port asserts CPU reset.
                if byte & 0x01 == 0 {
                    self.request_reset();
                }
            }
            Some(CMD_WRITE_KBD_OUT) | Some(CMD_WRITE_AUX_OUT) => self.push_output(byte),
            // No mouse: bytes sent to it vanish.
            Some(CMD_WRITE_AUX) => {}
            Some(other) => tracing::debug!("i8042: data for unknown command {other:#x}"),
            // A keyboard command: acknowledge, and answer a reset with BAT OK.
            None => {
                self.push_output(KBD_ACK);
                if byte == 0xff {
                    self.push_output(KBD_RESET_OK);
                }
            }
        }
    }

    fn request_reset(&mut self) {
        if let Err(e) = self.reset_evt.write(1) {
            tracing::error!("i8042: cannot signal reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> (I8042, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    fn inb(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_signals_event() {
        let (mut d, evt) = dev();
        assert!(evt.read().is_err());
        d.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        // Pulsing other lines is not a reset.
        d.write(COMMAND_OFFSET, &[0xff]);
        assert!(evt.read().is_err());
    }

    #[test]
    fn output_port_reset_bit() {
        let (mut d, evt) = dev();
        d.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA_OFFSET, &[0x02]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn probing_commands_answer() {
        let (mut d, _evt) = dev();
        // Linux's kb_wait polls until the input buffer is empty (bit 1 clear).
        assert_eq!(inb(&mut d, COMMAND_OFFSET) & 0x02, 0);
        d.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(inb(&mut d, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(inb(&mut d, DATA_OFFSET), SELF_TEST_OK);
        assert_eq!(inb(&mut d, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);

        d.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        d.write(DATA_OFFSET, &[0x47]);
        d.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut d, DATA_OFFSET), 0x47);

        d.write(DATA_OFFSET, &[0xff]);
        assert_eq!(inb(&mut d, DATA_OFFSET), KBD_ACK);
        assert_eq!(inb(&mut d, DATA_OFFSET), KBD_RESET_OK);
    }

    #[test]
    fn output_is_bounded() {
        let (mut d, _evt) = dev();
        for _ in 0..100 {
            d.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }
        assert_eq!(d.save().output.len(), OUTPUT_CAPACITY);
    }

    #[test]
    fn state_round_trip() {
        let (mut d, _evt) = dev();
        d.write(COMMAND_OFFSET, &[CMD_KBD_DISABLE]);
        d.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        d.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        let saved = d.save();
        assert_eq!(saved.pending_command, Some(CMD_WRITE_CTR));
        assert_eq!(saved.output, vec![CTR_AUX_DISABLED | CTR_KBD_DISABLED]);
        let json = serde_json::to_string(&saved).unwrap();
        let parsed: I8042State = serde_json::from_str(&json).unwrap();
        let mut restored = I8042::restore(EventFd::new(EFD_NONBLOCK).unwrap(), &parsed);
        assert_eq!(restored.save(), saved);
        // The pending command survives: the next data byte sets the CTR.
        restored.write(DATA_OFFSET, &[0x01]);
        assert_eq!(restored.save().control, 0x01);
    }
}
