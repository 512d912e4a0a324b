//! Error types of the protocol crate.
//!
//! Two layers: [`DecodeError`] says what is wrong with the payload or the fds of one message
//! whose framing was intact; [`Error`] is what a connection operation returns. An [`Error`]
//! either leaves the stream in sync (the message boundary is known and the peer may get an
//! error reply) or not; [`Error::is_fatal`] tells the two apart.

use std::io;

use crate::status::Status;

/// What is wrong with one message whose header and payload were read completely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The request code is not one of this channel's messages.
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    /// The payload is shorter than the message's layout.
    #[error("payload is truncated")]
    Truncated,
    /// The payload has bytes after the message's layout.
    #[error("payload has {0} trailing bytes")]
    TrailingBytes(usize),
    /// The payload size does not match the message's layout.
    #[error("payload is {actual} bytes, the message takes {expected}")]
    PayloadSize {
        /// The size the layout prescribes.
        expected: usize,
        /// The size in the header.
        actual: usize,
    },
    /// The number of attached file descriptors does not match the message.
    #[error("{actual} file descriptors attached, the message takes {expected}")]
    FdCount {
        /// The number of fds the message takes.
        expected: usize,
        /// The number of fds that arrived with it.
        actual: usize,
    },
    /// A reserved field or reserved bits of a field are not zero.
    #[error("reserved field {field} is {value:#x}, must be zero")]
    Reserved {
        /// The field's name in `docs/protocol.md`.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A field holds a value outside its defined range.
    #[error("field {field} = {value:#x}: {reason}")]
    Field {
        /// The field's name in `docs/protocol.md`.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Why the value is not acceptable.
        reason: &'static str,
    },
    /// The message is only valid as a request, or only as a reply, and came as the other.
    #[error("flags {flags:#x} are not valid on this message: {reason}")]
    Flags {
        /// The header flags.
        flags: u32,
        /// What is wrong with them.
        reason: &'static str,
    },
}

/// Errors of connection operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed.
    #[error("socket I/O failed")]
    Io(#[source] io::Error),
    /// The peer did not finish a message, or answer a request, within the time allowed.
    #[error("the peer made no progress for {timeout:?}")]
    TimedOut {
        /// The time allowed.
        timeout: std::time::Duration,
    },
    /// Waiting for the peer was cut short: this side is shutting down.
    #[error("waiting for the peer was cancelled (shutting down)")]
    Cancelled,
    /// The peer closed the connection between two messages.
    #[error("peer closed the connection")]
    Disconnected,
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the connection after {received} of {expected} bytes of a message")]
    PartialMessage {
        /// Bytes the message needed (header, or header plus payload).
        expected: usize,
        /// Bytes that arrived.
        received: usize,
    },
    /// The version in the header flags is not the one this crate speaks.
    #[error("header carries protocol version {0}, this side speaks version 1")]
    BadVersion(u32),
    /// Header flag bits that the protocol reserves are set.
    #[error("reserved header flag bits {0:#x} are set")]
    ReservedFlags(u32),
    /// The header announces a payload larger than the protocol allows.
    #[error("payload size {size} exceeds the maximum of {max} bytes")]
    Oversize {
        /// The size in the header.
        size: u32,
        /// The protocol's limit.
        max: usize,
    },
    /// More file descriptors arrived with one message than the protocol allows.
    #[error("more than {max} file descriptors arrived with one message")]
    TooManyFds {
        /// The protocol's limit.
        max: usize,
    },
    /// A complete, well-framed message that cannot be accepted.
    #[error("invalid {name} message (request {request})")]
    Invalid {
        /// The request code from the header.
        request: u32,
        /// The message's name, or "unknown".
        name: &'static str,
        /// Whether the sender waits for a reply, so that an error reply keeps the stream in step.
        expects_reply: bool,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// The peer sent something other than the reply we wait for.
    #[error("expected the reply to {expected}, got request {request} with flags {flags:#x}")]
    UnexpectedReply {
        /// The name of the request whose reply we wait for.
        expected: &'static str,
        /// The request code that arrived.
        request: u32,
        /// Its header flags.
        flags: u32,
    },
    /// A reply with the right header whose payload does not decode: the outcome of the request
    /// is unknown, so the connection cannot go on.
    #[error("undecodable reply to {request}")]
    BadReply {
        /// The name of the request the reply answers.
        request: &'static str,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// The peer answered a request with an error status.
    #[error("{request} failed on the peer: {status}: {message}")]
    Remote {
        /// The name of the request that failed.
        request: &'static str,
        /// The status code of the error reply.
        status: Status,
        /// The peer's explanation.
        message: String,
    },
    /// The caller asked for something the message cannot do (for example posting a request that
    /// always has a reply, or a payload over the limit).
    #[error("cannot send {name}: {reason}")]
    Usage {
        /// The message's name.
        name: &'static str,
        /// Why not.
        reason: &'static str,
    },
}

impl Error {
    /// True when the byte stream is no longer in step with the peer, or the peer is gone, so the
    /// connection must be closed. False when one message was refused and the connection can go on.
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::Invalid { .. } | Error::Remote { .. } | Error::Usage { .. } => false,
            Error::Io(_)
            | Error::TimedOut { .. }
            | Error::Cancelled
            | Error::Disconnected
            | Error::PartialMessage { .. }
            | Error::BadVersion(_)
            | Error::ReservedFlags(_)
            | Error::Oversize { .. }
            | Error::TooManyFds { .. }
            | Error::UnexpectedReply { .. }
            | Error::BadReply { .. } => true,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
