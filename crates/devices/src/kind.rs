//! The kinds of device ferry provides and their names.

use std::fmt;

/// The kind of a device, live or saved.
///
/// [`Self::name`] is the one place device kind names are spelled; snapshot
/// bundles record these names, so they never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// 8250 UART.
    Serial,
    /// i8042 keyboard controller.
    I8042,
    /// virtio-blk.
    Block,
    /// virtio-vsock.
    Vsock,
    /// virtio-rng.
    Rng,
    /// virtio-fs.
    Fs,
    /// virtio-net.
    Net,
}

impl DeviceKind {
    /// Every kind.
    pub const ALL: [DeviceKind; 7] = [
        DeviceKind::Serial,
        DeviceKind::I8042,
        DeviceKind::Block,
        DeviceKind::Vsock,
        DeviceKind::Rng,
        DeviceKind::Fs,
        DeviceKind::Net,
    ];

    /// The kind's stable name, e.g. `virtio-blk`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Serial => "serial",
            DeviceKind::I8042 => "i8042",
            DeviceKind::Block => "virtio-blk",
            DeviceKind::Vsock => "virtio-vsock",
            DeviceKind::Rng => "virtio-rng",
            DeviceKind::Fs => "virtio-fs",
            DeviceKind::Net => "virtio-net",
        }
    }

    /// Whether devices of this kind sit behind a virtio-mmio transport.
    pub fn is_virtio(self) -> bool {
        !matches!(self, DeviceKind::Serial | DeviceKind::I8042)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_ones_bundles_record() {
        let names: Vec<&str> = DeviceKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "serial",
                "i8042",
                "virtio-blk",
                "virtio-vsock",
                "virtio-rng",
                "virtio-fs",
                "virtio-net"
            ]
        );
        assert_eq!(DeviceKind::Fs.to_string(), "virtio-fs");
        let virtio: Vec<bool> = DeviceKind::ALL.iter().map(|k| k.is_virtio()).collect();
        assert_eq!(virtio, [false, false, true, true, true, true, true]);
    }
}
