//! Little-endian primitive encoding used inside frame payloads.
//!
//! Every variable-length item is prefixed by its length as a `u32`, so a
//! decoder never has to guess, and every length is checked against the bytes
//! actually present before anything is allocated.

use crate::error::ProtocolError;

/// Appends primitives to a payload buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// A new, empty encoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a bool as one byte (0 or 1).
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Frames are bounded far below 4 GiB, so the cast cannot truncate for
        // anything that can actually be sent.
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends a length-prefixed UTF-8 string.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// Appends a count-prefixed list of strings.
    pub fn strs<S: AsRef<str>>(&mut self, v: &[S]) -> &mut Self {
        self.u32(v.len() as u32);
        for s in v {
            self.str(s.as_ref());
        }
        self
    }

    /// Appends an optional string: a presence byte, then the string.
    pub fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.u8(1).str(s),
            None => self.u8(0),
        }
    }

    /// Appends an optional `u64`.
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(x) => self.u8(1).u64(x),
            None => self.u8(0),
        }
    }

    /// Appends an optional `i32`.
    pub fn opt_i32(&mut self, v: Option<i32>) -> &mut Self {
        match v {
            Some(x) => self.u8(1).i32(x),
            None => self.u8(0),
        }
    }
}

/// Reads primitives back out of a payload, failing cleanly on truncation.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Fails unless every byte was consumed: trailing garbage is malformed.
    pub fn finish(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(format!(
                "{} trailing bytes",
                self.buf.len()
            )))
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Malformed(format!(
                "truncated: need {n} bytes, have {}",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    /// Reads a bool; anything but 0 or 1 is malformed.
    pub fn bool(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(ProtocolError::Malformed(format!("bad bool {v}"))),
        }
    }

    /// Reads a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `i32`.
    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads a length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<Vec<u8>, ProtocolError> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }

    /// Reads a length-prefixed UTF-8 string.
    pub fn str(&mut self) -> Result<String, ProtocolError> {
        String::from_utf8(self.bytes()?)
            .map_err(|_| ProtocolError::Malformed("string is not UTF-8".into()))
    }

    /// Reads a count-prefixed list of strings.
    pub fn strs(&mut self) -> Result<Vec<String>, ProtocolError> {
        let n = self.u32()? as usize;
        // Each string needs at least its 4-byte length, which bounds `n` by
        // the payload size before we reserve anything.
        if n > self.buf.len() / 4 {
            return Err(ProtocolError::Malformed(format!("list of {n} strings")));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.str()?);
        }
        Ok(out)
    }

    /// Reads an optional string.
    pub fn opt_str(&mut self) -> Result<Option<String>, ProtocolError> {
        Ok(if self.bool()? {
            Some(self.str()?)
        } else {
            None
        })
    }

    /// Reads an optional `u64`.
    pub fn opt_u64(&mut self) -> Result<Option<u64>, ProtocolError> {
        Ok(if self.bool()? {
            Some(self.u64()?)
        } else {
            None
        })
    }

    /// Reads an optional `i32`.
    pub fn opt_i32(&mut self) -> Result<Option<i32>, ProtocolError> {
        Ok(if self.bool()? {
            Some(self.i32()?)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip() {
        let mut e = Encoder::new();
        e.u8(7)
            .bool(true)
            .u16(0xbeef)
            .u32(0xdead_beef)
            .i32(-5)
            .u64(u64::MAX - 1)
            .bytes(b"\x00\xff")
            .str("héllo")
            .strs(&["a", "", "c"])
            .opt_str(None)
            .opt_str(Some("x"))
            .opt_u64(Some(9))
            .opt_i32(None);
        let buf = e.finish();
        let mut d = Decoder::new(&buf);
        assert_eq!(d.u8().unwrap(), 7);
        assert!(d.bool().unwrap());
        assert_eq!(d.u16().unwrap(), 0xbeef);
        assert_eq!(d.u32().unwrap(), 0xdead_beef);
        assert_eq!(d.i32().unwrap(), -5);
        assert_eq!(d.u64().unwrap(), u64::MAX - 1);
        assert_eq!(d.bytes().unwrap(), b"\x00\xff");
        assert_eq!(d.str().unwrap(), "héllo");
        assert_eq!(d.strs().unwrap(), vec!["a", "", "c"]);
        assert_eq!(d.opt_str().unwrap(), None);
        assert_eq!(d.opt_str().unwrap().as_deref(), Some("x"));
        assert_eq!(d.opt_u64().unwrap(), Some(9));
        assert_eq!(d.opt_i32().unwrap(), None);
        d.finish().unwrap();
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let mut e = Encoder::new();
        e.bytes(b"abcdef");
        let buf = e.finish();
        assert!(Decoder::new(&buf[..5]).bytes().is_err());
        assert!(Decoder::new(&[2]).bool().is_err());
        assert!(Decoder::new(&[0xff, 0xff, 0xff, 0xff]).strs().is_err());
        assert!(Decoder::new(&[1]).finish().is_err());
        let mut e = Encoder::new();
        e.bytes(&[0xc3, 0x28]);
        assert!(Decoder::new(&e.finish()).str().is_err());
    }
}
