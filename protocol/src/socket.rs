//! Message framing over a Unix stream socket, with file descriptors as SCM_RIGHTS.
//!
//! A message is sent as one `sendmsg` of header and payload, with its fds attached to the first
//! byte. Received fds are close-on-exec from the moment they exist (`MSG_CMSG_CLOEXEC`) and are
//! owned at once, so every error path closes them by dropping.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

use crate::error::{Error, Result};
use crate::header::{HEADER_SIZE, Header, MAX_FDS, MAX_PAYLOAD_SIZE};

/// A complete message as it came off the socket: header validated, payload and fds not yet.
#[derive(Debug)]
pub struct RawMessage {
    /// The validated header.
    pub header: Header,
    /// Exactly `header.size` bytes.
    pub payload: Vec<u8>,
    /// Every fd that arrived while the message was read.
    pub fds: Vec<OwnedFd>,
}

/// Sends one message: header, payload and fds.
pub fn send_message(
    stream: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    if payload.len() > MAX_PAYLOAD_SIZE || header.size as usize != payload.len() {
        return Err(Error::Usage {
            name: "message",
            reason: "payload size does not fit the header",
        });
    }
    if fds.len() > MAX_FDS {
        return Err(Error::Usage {
            name: "message",
            reason: "more than 8 file descriptors",
        });
    }
    let head = header.to_bytes();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::Usage {
            name: "message",
            reason: "fds do not fit the control buffer",
        });
    }
    let total = HEADER_SIZE.saturating_add(payload.len());
    let mut sent = 0usize;
    while sent < total {
        let (head_rest, body_rest) = if sent < HEADER_SIZE {
            (head.get(sent..).unwrap_or_default(), payload)
        } else {
            (
                &[][..],
                payload
                    .get(sent.saturating_sub(HEADER_SIZE)..)
                    .unwrap_or_default(),
            )
        };
        let iov = [IoSlice::new(head_rest), IoSlice::new(body_rest)];
        // The fds ride on the first sendmsg only; later calls send the rest of the bytes.
        let result = if sent == 0 {
            sendmsg(stream, &iov, &mut control, SendFlags::NOSIGNAL)
        } else {
            sendmsg(
                stream,
                &iov,
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            )
        };
        match result {
            Ok(0) => return Err(Error::Io(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => sent = sent.saturating_add(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes, collecting any fds that arrive with them into `fds`.
///
/// Returns how many bytes arrived before the peer hung up (less than `buf.len()` only then).
fn recv_exact(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize> {
    let mut got = 0usize;
    while got < buf.len() {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let rest = buf.get_mut(got..).unwrap_or_default();
        let mut iov = [IoSliceMut::new(rest)];
        let msg = match recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(msg) => msg,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        };
        // Take ownership of every fd before looking at anything else, so that each is closed
        // on every path below.
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_FDS {
            return Err(Error::TooManyFds { max: MAX_FDS });
        }
        if msg.bytes == 0 {
            return Ok(got);
        }
        got = got.saturating_add(msg.bytes);
    }
    Ok(got)
}

/// Receives one message. Fails on a closed connection, a torn message, an invalid header or
/// too many fds; the returned payload and fds are not yet checked against the request code.
pub fn recv_message(stream: &UnixStream) -> Result<RawMessage> {
    let mut fds = Vec::new();
    let mut head = [0u8; HEADER_SIZE];
    let got = recv_exact(stream, &mut head, &mut fds)?;
    if got == 0 {
        return Err(Error::Disconnected);
    }
    if got < HEADER_SIZE {
        return Err(Error::PartialMessage {
            expected: HEADER_SIZE,
            received: got,
        });
    }
    let header = Header::from_bytes(&head)?;
    // header.size <= MAX_PAYLOAD_SIZE after from_bytes.
    let mut payload = vec![0u8; header.size as usize];
    let got = recv_exact(stream, &mut payload, &mut fds)?;
    if got < payload.len() {
        return Err(Error::PartialMessage {
            expected: HEADER_SIZE.saturating_add(payload.len()),
            received: HEADER_SIZE.saturating_add(got),
        });
    }
    Ok(RawMessage {
        header,
        payload,
        fds,
    })
}
