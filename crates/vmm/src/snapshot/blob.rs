//! Byte images of KVM uapi structs, stored as hex strings.
//!
//! The KVM register structs are fixed-layout kernel ABI, so their bytes are
//! a faithful, host-independent encoding. Decoding checks the length and
//! never panics on hostile input.

use std::fmt;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A KVM uapi struct that can be copied to and from bytes.
///
/// # Safety
///
/// Implementors must be plain C structs (integers, arrays and unions of
/// them) without implicit padding, for which every bit pattern is valid.
pub(crate) unsafe trait KvmPod: Copy + Default {}

// SAFETY (all impls below): these are bindgen copies of KVM uapi structs
// made only of fixed-width integers, integer arrays and unions of those,
// with every padding spelled out as a named field (sizes are checked in the
// tests below); any byte pattern is a valid value.
unsafe impl KvmPod for kvm_regs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_sregs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_fpu {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_lapic_state {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_xcrs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_debugregs {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_vcpu_events {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_irqchip {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_pit_state2 {}
// SAFETY: see above.
unsafe impl KvmPod for kvm_clock_data {}

/// Raw bytes, serialized as a lowercase hex string.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Blob(pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Blob {
    /// The bytes of a KVM struct.
    pub(crate) fn of<T: KvmPod>(value: &T) -> Self {
        let size = std::mem::size_of::<T>();
        // SAFETY: `value` is a live, initialized `T`; `KvmPod` guarantees it
        // has no padding, so all `size` bytes are initialized.
        let bytes = unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size) };
        Self(bytes.to_vec())
    }

    /// Decodes a KVM struct; `None` if the length is not exactly its size.
    pub(crate) fn decode<T: KvmPod>(&self) -> Option<T> {
        if self.0.len() != std::mem::size_of::<T>() {
            return None;
        }
        let mut value = T::default();
        // SAFETY: the source has exactly size_of::<T>() bytes, the
        // destination is a distinct local `T`, and `KvmPod` guarantees any
        // byte pattern is a valid `T`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.as_ptr(),
                (&mut value as *mut T).cast::<u8>(),
                self.0.len(),
            );
        }
        Some(value)
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.0.len() * 2);
        for b in &self.0 {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HexVisitor;
        impl Visitor<'_> for HexVisitor {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a hex string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Blob, E> {
                let digit = |c: u8| match c {
                    b'0'..=b'9' => Ok(c - b'0'),
                    b'a'..=b'f' => Ok(c - b'a' + 10),
                    b'A'..=b'F' => Ok(c - b'A' + 10),
                    _ => Err(E::custom("invalid hex digit")),
                };
                let bytes = v.as_bytes();
                if !bytes.len().is_multiple_of(2) {
                    return Err(E::custom("odd-length hex string"));
                }
                bytes
                    .chunks_exact(2)
                    .map(|p| Ok((digit(p[0])? << 4) | digit(p[1])?))
                    .collect::<Result<Vec<u8>, E>>()
                    .map(Blob)
            }
        }
        d.deserialize_str(HexVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn uapi_sizes_have_no_hidden_padding() {
        // The sizes the kernel headers give; a mismatch would mean padding.
        assert_eq!(size_of::<kvm_regs>(), 144);
        assert_eq!(size_of::<kvm_sregs>(), 312);
        assert_eq!(size_of::<kvm_fpu>(), 416);
        assert_eq!(size_of::<kvm_lapic_state>(), 1024);
        assert_eq!(size_of::<kvm_xcrs>(), 392);
        assert_eq!(size_of::<kvm_debugregs>(), 128);
        assert_eq!(size_of::<kvm_vcpu_events>(), 64);
        assert_eq!(size_of::<kvm_irqchip>(), 520);
        assert_eq!(size_of::<kvm_pit_state2>(), 112);
        assert_eq!(size_of::<kvm_clock_data>(), 48);
    }

    #[test]
    fn round_trip_through_hex() {
        let regs = kvm_regs {
            rip: 0x1234_5678_9abc_def0,
            rax: 7,
            rflags: 2,
            ..Default::default()
        };
        let blob = Blob::of(&regs);
        let json = serde_json::to_string(&blob).unwrap();
        assert!(json.starts_with("\"0700000000000000"));
        let back: Blob = serde_json::from_str(&json).unwrap();
        let decoded: kvm_regs = back.decode().unwrap();
        assert_eq!((decoded.rip, decoded.rax, decoded.rflags), (regs.rip, 7, 2));
        // Wrong length or bad text is refused, not a panic.
        assert!(Blob(vec![0; 10]).decode::<kvm_regs>().is_none());
        assert!(serde_json::from_str::<Blob>("\"abc\"").is_err());
        assert!(serde_json::from_str::<Blob>("\"zz\"").is_err());
    }
}
