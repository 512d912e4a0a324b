//! Little-endian field codec for message payloads.
//!
//! Payloads are decoded field by field from a byte slice with exact bounds: a [`Reader`] never
//! indexes out of range and reports a truncated payload as an error, and [`Reader::finish`]
//! insists that every byte was consumed. No transmutes of wire bytes (the crate forbids unsafe_code).

use crate::error::DecodeError;

/// Sequential little-endian reader over a payload.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated)?;
        self.rest = tail;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.take::<1>()?))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take::<2>()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take::<4>()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take::<8>()?))
    }

    /// Reads a field that the protocol reserves: it must be zero.
    pub(crate) fn reserved_u8(&mut self, field: &'static str) -> Result<(), DecodeError> {
        reserved_zero(field, u64::from(self.u8()?))
    }

    pub(crate) fn reserved_u16(&mut self, field: &'static str) -> Result<(), DecodeError> {
        reserved_zero(field, u64::from(self.u16()?))
    }

    pub(crate) fn reserved_u32(&mut self, field: &'static str) -> Result<(), DecodeError> {
        reserved_zero(field, u64::from(self.u32()?))
    }

    pub(crate) fn reserved_u64(&mut self, field: &'static str) -> Result<(), DecodeError> {
        reserved_zero(field, self.u64()?)
    }

    /// Takes `len` raw bytes.
    pub(crate) fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.rest.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    /// Ends decoding: trailing bytes are an error.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.rest.len()))
        }
    }
}

fn reserved_zero(field: &'static str, value: u64) -> Result<(), DecodeError> {
    if value == 0 {
        Ok(())
    } else {
        Err(DecodeError::Reserved { field, value })
    }
}

/// Little-endian payload writer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_and_rejects_truncation() {
        let bytes = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u32(), Ok(0x0403_0201));
        assert_eq!(r.u32(), Ok(0x0807_0605));
        assert_eq!(r.u32(), Err(DecodeError::Truncated));
    }

    #[test]
    fn finish_rejects_trailing_bytes() {
        let bytes = [0u8; 5];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u32(), Ok(0));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn reserved_fields_must_be_zero() {
        let bytes = [0, 0, 0, 0, 0x10, 0, 0, 0];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.reserved_u32("a"), Ok(()));
        assert_eq!(
            r.reserved_u32("b"),
            Err(DecodeError::Reserved {
                field: "b",
                value: 0x10
            })
        );
    }
}
