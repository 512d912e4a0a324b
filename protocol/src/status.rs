//! Status codes of error replies.

use std::fmt;

/// The status of a reply: zero for success, otherwise why a request failed.
///
/// An open enum: a peer may send a code this side does not know, which is kept as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u32);

impl Status {
    /// The request succeeded.
    pub const OK: Status = Status(0);
    /// The message is malformed: layout, size, reserved bits or fd count.
    pub const INVALID_MESSAGE: Status = Status(1);
    /// The request code is not known to the receiver.
    pub const UNKNOWN_REQUEST: Status = Status(2);
    /// The message is not allowed in the connection's current state.
    pub const BAD_STATE: Status = Status(3);
    /// The message needs a feature that was not negotiated.
    pub const NOT_NEGOTIATED: Status = Status(4);
    /// A value inside the range the protocol defines that this backend does not support (a value
    /// outside the protocol's range is INVALID_MESSAGE).
    pub const INVALID_ARGUMENT: Status = Status(5);
    /// A resource limit was reached (memory slots, devices, state size).
    pub const NO_SPACE: Status = Status(6);
    /// The object already exists (a device handle already attached).
    pub const EXISTS: Status = Status(7);
    /// The object does not exist (an unknown device handle or memory region).
    pub const NOT_FOUND: Status = Status(8);
    /// The device or state does not fit this vSMMU (for example host SMMU features that differ
    /// from the frozen ID registers).
    pub const INCOMPATIBLE: Status = Status(9);
    /// A host operation failed (mmap, an iommufd or VFIO ioctl).
    pub const HOST_ERROR: Status = Status(10);
    /// The responder failed in a way it has no better code for.
    pub const INTERNAL: Status = Status(11);

    /// The name of a known code, as in `docs/protocol.md`.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Status::OK => "OK",
            Status::INVALID_MESSAGE => "INVALID_MESSAGE",
            Status::UNKNOWN_REQUEST => "UNKNOWN_REQUEST",
            Status::BAD_STATE => "BAD_STATE",
            Status::NOT_NEGOTIATED => "NOT_NEGOTIATED",
            Status::INVALID_ARGUMENT => "INVALID_ARGUMENT",
            Status::NO_SPACE => "NO_SPACE",
            Status::EXISTS => "EXISTS",
            Status::NOT_FOUND => "NOT_FOUND",
            Status::INCOMPATIBLE => "INCOMPATIBLE",
            Status::HOST_ERROR => "HOST_ERROR",
            Status::INTERNAL => "INTERNAL",
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "status {}", self.0),
        }
    }
}
