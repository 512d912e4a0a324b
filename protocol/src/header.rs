//! The 12-byte message header and the protocol's limits.
//!
//! Byte layout (little-endian), the same as vhost-user's:
//!
//! | offset | size | field     |
//! |--------|------|-----------|
//! | 0      | 4    | `request` |
//! | 4      | 4    | `flags`   |
//! | 8      | 4    | `size`    |
//!
//! `flags`: bits \[1:0\] version (must be 1), bit 2 `REPLY`, bit 3 `NEED_REPLY`, bits \[31:4\]
//! reserved (zero).

use crate::error::Error;

/// Size of the header on the wire.
pub const HEADER_SIZE: usize = 12;
/// Largest payload a message may carry. The largest message defined today, SET_MEM_TABLE with
/// 8 regions, takes 264 bytes; error replies carry up to [`MAX_ERROR_MESSAGE`] bytes of text.
pub const MAX_PAYLOAD_SIZE: usize = 4096;
/// Most file descriptors one message may carry (SET_MEM_TABLE with 8 regions).
pub const MAX_FDS: usize = 8;
/// The protocol version carried in `flags[1:0]`.
pub const VERSION: u32 = 0x1;
/// Longest explanation text in an error reply.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Mask of the version field in `flags`.
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// `flags` bit 2: this message is a reply.
pub const FLAG_REPLY: u32 = 1 << 2;
/// `flags` bit 3: the sender wants an acknowledgement of a message that has no reply of its own.
pub const FLAG_NEED_REPLY: u32 = 1 << 3;
const FLAG_RESERVED_MASK: u32 = !(FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY);

/// A decoded and validated message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The request code (`request`, bytes 0-3).
    pub request: u32,
    /// The flags (`flags`, bytes 4-7), version included.
    pub flags: u32,
    /// The payload size in bytes (`size`, bytes 8-11).
    pub size: u32,
}

impl Header {
    /// A request header of version 1.
    pub fn request(request: u32, size: u32, need_reply: bool) -> Self {
        let flags = VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        Self {
            request,
            flags,
            size,
        }
    }

    /// A reply header of version 1.
    pub fn reply(request: u32, size: u32) -> Self {
        Self {
            request,
            flags: VERSION | FLAG_REPLY,
            size,
        }
    }

    /// Whether `REPLY` is set.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Whether `NEED_REPLY` is set.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        let (request, rest) = out.split_at_mut(4);
        let (flags, size) = rest.split_at_mut(4);
        request.copy_from_slice(&self.request.to_le_bytes());
        flags.copy_from_slice(&self.flags.to_le_bytes());
        size.copy_from_slice(&self.size.to_le_bytes());
        out
    }

    /// Decodes and validates a header: version 1, no reserved flag bits, payload within
    /// [`MAX_PAYLOAD_SIZE`]. Every failure here is fatal to the connection, because the
    /// message boundary cannot be trusted.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Result<Self, Error> {
        let [r0, r1, r2, r3, f0, f1, f2, f3, s0, s1, s2, s3] = *bytes;
        let header = Self {
            request: u32::from_le_bytes([r0, r1, r2, r3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
            size: u32::from_le_bytes([s0, s1, s2, s3]),
        };
        let version = header.flags & FLAG_VERSION_MASK;
        if version != VERSION {
            return Err(Error::BadVersion(version));
        }
        if header.flags & FLAG_RESERVED_MASK != 0 {
            return Err(Error::ReservedFlags(header.flags & FLAG_RESERVED_MASK));
        }
        if header.size as usize > MAX_PAYLOAD_SIZE {
            return Err(Error::Oversize {
                size: header.size,
                max: MAX_PAYLOAD_SIZE,
            });
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_user_compatible_layout() {
        // GET_FEATURES request as a vhost-user frontend writes its header: request 1,
        // version 1, no payload.
        let bytes = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        let h = Header::from_bytes(&bytes).expect("valid header");
        assert_eq!(h, Header::request(1, 0, false));
        assert_eq!(h.to_bytes(), bytes);
        // A reply with an 8-byte payload: flags 0x5 (version 1 | REPLY).
        let reply = Header::reply(1, 8).to_bytes();
        assert_eq!(reply, [1, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0]);
        // NEED_REPLY is 0x8.
        assert_eq!(Header::request(2, 8, true).to_bytes()[4], 0x9);
    }

    #[test]
    fn rejects_bad_version_reserved_flags_and_oversize() {
        let mut bytes = Header::request(1, 0, false).to_bytes();
        bytes[4] = 0x2;
        assert!(matches!(
            Header::from_bytes(&bytes),
            Err(Error::BadVersion(2))
        ));
        bytes[4] = 0x0;
        assert!(matches!(
            Header::from_bytes(&bytes),
            Err(Error::BadVersion(0))
        ));
        bytes[4] = 0x11;
        assert!(matches!(
            Header::from_bytes(&bytes),
            Err(Error::ReservedFlags(0x10))
        ));
        let bytes = Header::request(1, 4097, false).to_bytes();
        assert!(matches!(
            Header::from_bytes(&bytes),
            Err(Error::Oversize { size: 4097, .. })
        ));
        let bytes = Header::request(1, 4096, false).to_bytes();
        assert!(Header::from_bytes(&bytes).is_ok());
    }
}
