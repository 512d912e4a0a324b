//! What every message type of a channel provides, and the reply envelope.
//!
//! A channel has a request type (implementing [`Request`]) and a reply type (implementing
//! [`Reply`]). Every reply payload starts with an 8-byte status prefix:
//!
//! | offset | size | field        |
//! |--------|------|--------------|
//! | 0      | 4    | `status`     |
//! | 4      | 4    | `detail_len` |
//!
//! On success `status` and `detail_len` are 0 and the reply body follows (an acknowledgement has
//! no body, so it is 8 zero bytes, the same bytes as vhost-user's REPLY_ACK `u64` 0). On failure
//! `status` is a [`Status`] code and `detail_len` bytes of UTF-8 text follow, nothing else.

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::codec::{Reader, Writer};
use crate::error::DecodeError;
use crate::header::MAX_ERROR_MESSAGE;
use crate::status::Status;

/// When a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyPolicy {
    /// The request always gets a reply; NEED_REPLY is ignored.
    Always,
    /// The request gets an acknowledgement only when NEED_REPLY is set.
    OnNeedReply,
}

/// A message payload ready to be sent: the bytes and the fds that go with them.
#[derive(Debug)]
pub struct Encoded<'a> {
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// File descriptors, in the message's order.
    pub fds: Vec<BorrowedFd<'a>>,
}

impl<'a> Encoded<'a> {
    pub(crate) fn bytes(payload: Vec<u8>) -> Self {
        Self {
            payload,
            fds: Vec::new(),
        }
    }
}

/// A request of one channel.
pub trait Request: Sized {
    /// The reply type of this channel.
    type Reply: Reply;

    /// The request code of this message.
    fn code(&self) -> u32;

    /// The payload and fds of this message.
    fn encode(&self) -> Encoded<'_>;

    /// Decodes a complete message. Owns `fds`: on error they are closed.
    fn decode(code: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Self, DecodeError>;

    /// The channel's requests: code, name and when each is answered (docs/protocol.md).
    const TABLE: &'static [(u32, &'static str, ReplyPolicy)];

    /// The message's name for a request code, "unknown" for codes outside the channel.
    fn name_of(code: u32) -> &'static str {
        Self::TABLE
            .iter()
            .find(|(c, ..)| *c == code)
            .map_or("unknown", |(_, name, _)| name)
    }

    /// When a request code is answered; `None` for codes outside the channel.
    fn reply_policy(code: u32) -> Option<ReplyPolicy> {
        Self::TABLE
            .iter()
            .find(|(c, ..)| *c == code)
            .map(|(.., policy)| *policy)
    }

    /// This message's name.
    fn name(&self) -> &'static str {
        Self::name_of(self.code())
    }
}

/// A successful reply of one channel.
pub trait Reply: Sized {
    /// The acknowledgement with no body.
    fn ack() -> Self;

    /// Whether this reply is the right kind for a request code.
    fn answers(&self, code: u32) -> bool;

    /// The reply body (after the status prefix) and its fds.
    fn encode(&self) -> Encoded<'_>;

    /// Decodes the reply body to a request code. Owns `fds`.
    fn decode(code: u32, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self, DecodeError>;
}

/// The failure a responder reports for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// Why it failed; never [`Status::OK`].
    pub status: Status,
    /// Explanation for a person, at most [`MAX_ERROR_MESSAGE`] bytes (longer text is cut at a
    /// character boundary).
    pub message: String,
}

impl ErrorReply {
    /// Builds an error reply. [`Status::OK`] is not an error: it is sent as [`Status::INTERNAL`]
    /// so that the peer never reads a failure as a success.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        let status = if status == Status::OK {
            Status::INTERNAL
        } else {
            status
        };
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut = cut.saturating_sub(1);
            }
            message.truncate(cut);
        }
        Self { status, message }
    }
}

/// Encodes a successful reply payload: the zero status prefix, then the body.
pub(crate) fn encode_ok_reply(body: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(body.len().saturating_add(8));
    w.u32(Status::OK.0).u32(0).bytes(body);
    w.into_vec()
}

/// Encodes an error reply payload: the status, the text's length, the text.
pub(crate) fn encode_error_reply(err: &ErrorReply) -> Vec<u8> {
    let text = err.message.as_bytes();
    // ErrorReply::new caps the text at MAX_ERROR_MESSAGE; a hand-built one is cut here.
    let text = text.get(..MAX_ERROR_MESSAGE).unwrap_or(text);
    let status = if err.status == Status::OK {
        Status::INTERNAL
    } else {
        err.status
    };
    let mut w = Writer::with_capacity(text.len().saturating_add(8));
    // text.len() <= MAX_ERROR_MESSAGE, which fits u32.
    w.u32(status.0)
        .u32(u32::try_from(text.len()).unwrap_or(0))
        .bytes(text);
    w.into_vec()
}

/// A decoded reply payload: success with its body, or the peer's error.
pub(crate) enum ReplyPayload<'a> {
    Ok(&'a [u8]),
    Err(ErrorReply),
}

pub(crate) fn decode_reply_prefix(payload: &[u8]) -> Result<ReplyPayload<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    let status = Status(r.u32()?);
    let detail_len = r.u32()?;
    if status == Status::OK {
        if detail_len != 0 {
            return Err(DecodeError::Reserved {
                field: "reply.detail_len",
                value: u64::from(detail_len),
            });
        }
        let rest = payload.get(8..).ok_or(DecodeError::Truncated)?;
        return Ok(ReplyPayload::Ok(rest));
    }
    let len = usize::try_from(detail_len).unwrap_or(usize::MAX);
    if len > MAX_ERROR_MESSAGE {
        return Err(DecodeError::Field {
            field: "reply.detail_len",
            value: u64::from(detail_len),
            reason: "longer than 1024 bytes",
        });
    }
    let text = r.bytes(len)?;
    r.finish()?;
    Ok(ReplyPayload::Err(ErrorReply {
        status,
        message: String::from_utf8_lossy(text).into_owned(),
    }))
}

/// Checks that exactly `expected` fds arrived and hands them out in order.
pub(crate) fn exact_fds(fds: Vec<OwnedFd>, expected: usize) -> Result<Vec<OwnedFd>, DecodeError> {
    if fds.len() == expected {
        Ok(fds)
    } else {
        Err(DecodeError::FdCount {
            expected,
            actual: fds.len(),
        })
    }
}

/// Checks the payload size against a fixed layout.
pub(crate) fn exact_size(payload: &[u8], expected: usize) -> Result<Reader<'_>, DecodeError> {
    if payload.len() == expected {
        Ok(Reader::new(payload))
    } else {
        Err(DecodeError::PayloadSize {
            expected,
            actual: payload.len(),
        })
    }
}

/// Takes the single fd of a message that carries one.
pub(crate) fn one_fd(fds: Vec<OwnedFd>) -> Result<OwnedFd, DecodeError> {
    let actual = fds.len();
    let mut it = exact_fds(fds, 1)?.into_iter();
    it.next().ok_or(DecodeError::FdCount {
        expected: 1,
        actual,
    })
}
