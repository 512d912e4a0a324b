//! The input of the protocol decoder targets: raw message bytes, as they come off the socket,
//! plus which descriptors arrive with them.
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0 | 1 | mode: bit 0 decode as a reply, bit 1 also send it through a real socket pair |
//! | 1 | 1 | `n`, the descriptor count (at most [`MAX_INPUT_FDS`]; more is cut) |
//! | 2 | n | one kind byte per descriptor (see [`crate::fds::FD_KINDS`]) |
//! | 2+n | 12 | the message header (request, flags, size) |
//! | 14+n | rest | the payload |

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};

/// Most descriptors an input attaches (more than the protocol's 8, to reach the fd cap).
pub const MAX_INPUT_FDS: usize = 12;

/// Mode bit: decode as a reply to the header's request code.
pub const MODE_REPLY: u8 = 1;
/// Mode bit: also send the message through a socket pair and receive it with the library.
pub const MODE_SOCKET: u8 = 2;

/// A parsed input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoInput<'a> {
    /// Mode bits.
    pub mode: u8,
    /// Descriptor kinds.
    pub fds: &'a [u8],
    /// The header bytes.
    pub header: [u8; 12],
    /// The payload bytes.
    pub payload: &'a [u8],
}

impl<'a> ProtoInput<'a> {
    /// Parses an input; `None` when it is too short.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (&mode, rest) = data.split_first()?;
        let (&n, rest) = rest.split_first()?;
        let n = usize::from(n).min(MAX_INPUT_FDS);
        let fds = rest.get(..n)?;
        let rest = rest.get(n..)?;
        let (header, payload) = rest.split_first_chunk::<12>()?;
        Some(Self {
            mode,
            fds,
            header: *header,
            payload,
        })
    }

    /// The request code in the header.
    pub fn code(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    /// Whether to decode as a reply.
    pub fn is_reply(&self) -> bool {
        self.mode & MODE_REPLY != 0
    }

    /// Whether to go through a socket too.
    pub fn via_socket(&self) -> bool {
        self.mode & MODE_SOCKET != 0
    }
}

/// Writes an input.
pub fn encode_input(mode: u8, fds: &[u8], message: &[u8]) -> Vec<u8> {
    let mut out = vec![mode, u8::try_from(fds.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(fds);
    out.extend_from_slice(message);
    out
}

/// A whole message: header with `size` = payload length, then the payload.
pub fn message(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + payload.len());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(payload);
    out
}

/// Sends bytes as one message with descriptors attached (no validation: hostile peers do
/// not validate), then shuts the write side so that a short message reads as torn, not as a
/// hang.
pub fn raw_send(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>], shut: bool) {
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_INPUT_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let mut sent = 0;
    while sent < bytes.len() || (sent == 0 && bytes.is_empty()) {
        let iov = [IoSlice::new(&bytes[sent..])];
        let n = if sent == 0 {
            sendmsg(stream, &iov, &mut control, SendFlags::NOSIGNAL)
        } else {
            sendmsg(
                stream,
                &iov,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )
        }
        .expect("sendmsg");
        if bytes.is_empty() {
            break;
        }
        sent += n;
    }
    if shut {
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    }
}
