//! Message framing over a Unix stream socket, with file descriptors as SCM_RIGHTS.
//!
//! A message is sent as one `sendmsg` of header and payload, with its fds attached to the first
//! byte. Received fds are close-on-exec from the moment they exist (`MSG_CMSG_CLOEXEC`) and are
//! owned at once, so every error path closes them by dropping.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
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

/// How long a peer may keep this side waiting, and what else ends the wait.
///
/// The default waits as the socket does (for ever, unless the socket has a timeout of its
/// own). With a timeout or a cancel fd, sends and receives never block in the kernel: they
/// poll the socket together with the cancel fd, and give up when the deadline passes
/// ([`Error::TimedOut`]) or the cancel fd becomes readable ([`Error::Cancelled`]). The deadline
/// runs from the start of the message (for a request that waits for its reply, from the start
/// of the request to the end of the reply).
#[derive(Debug, Default)]
pub struct Patience {
    /// The longest a peer may take to finish a message or to answer a request.
    pub timeout: Option<Duration>,
    /// A descriptor that becomes readable when waiting must stop (a shutdown was asked for).
    pub cancel: Option<OwnedFd>,
}

impl Patience {
    /// Whether sends and receives poll rather than block.
    fn polls(&self) -> bool {
        self.timeout.is_some() || self.cancel.is_some()
    }

    /// The deadline of an exchange that starts now.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.timeout.and_then(|t| Instant::now().checked_add(t))
    }

    /// Waits until `stream` is ready for `events`, the deadline passes or the cancel fd fires.
    fn wait(
        &self,
        stream: &UnixStream,
        events: PollFlags,
        deadline: Option<Instant>,
    ) -> Result<()> {
        loop {
            let left = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::TimedOut {
                            timeout: self.timeout.unwrap_or_default(),
                        });
                    }
                    Some(Timespec {
                        tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                        tv_nsec: i64::from(left.subsec_nanos()),
                    })
                }
                None => None,
            };
            let mut fds = Vec::with_capacity(2);
            fds.push(PollFd::new(stream, events));
            if let Some(cancel) = self.cancel.as_ref() {
                fds.push(PollFd::new(cancel, PollFlags::IN));
            }
            match poll(&mut fds, left.as_ref()) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(Error::Io(e.into())),
            }
            if fds.get(1).is_some_and(|c| !c.revents().is_empty()) {
                return Err(Error::Cancelled);
            }
            if fds.first().is_some_and(|s| !s.revents().is_empty()) {
                return Ok(());
            }
        }
    }
}

/// Sends one message: header, payload and fds.
pub fn send_message(
    stream: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    send_message_with(stream, header, payload, fds, &Patience::default(), None)
}

/// [`send_message`], waiting for room in the socket no longer than `patience` allows.
pub fn send_message_with(
    stream: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
    patience: &Patience,
    deadline: Option<Instant>,
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
        let flags = if patience.polls() {
            SendFlags::NOSIGNAL | SendFlags::DONTWAIT
        } else {
            SendFlags::NOSIGNAL
        };
        // The fds ride on the first sendmsg only; later calls send the rest of the bytes.
        let result = if sent == 0 {
            sendmsg(stream, &iov, &mut control, flags)
        } else {
            sendmsg(stream, &iov, &mut SendAncillaryBuffer::default(), flags)
        };
        match result {
            Ok(0) => return Err(Error::Io(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => sent = sent.saturating_add(n),
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) if patience.polls() => {
                patience.wait(stream, PollFlags::OUT, deadline)?;
            }
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes, collecting any fds that arrive with them into `fds`.
///
/// Returns how many bytes arrived before the peer hung up (less than `buf.len()` only then).
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    patience: &Patience,
    deadline: Option<Instant>,
) -> Result<usize> {
    let flags = if patience.polls() {
        RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT
    } else {
        RecvFlags::CMSG_CLOEXEC
    };
    let mut got = 0usize;
    while got < buf.len() {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let rest = buf.get_mut(got..).unwrap_or_default();
        let mut iov = [IoSliceMut::new(rest)];
        let msg = match recvmsg(stream, &mut iov, &mut control, flags) {
            Ok(msg) => msg,
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) if patience.polls() => {
                patience.wait(stream, PollFlags::IN, deadline)?;
                continue;
            }
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
    recv_message_with(stream, &Patience::default(), None)
}

/// [`recv_message`], waiting no longer than `patience` allows.
pub fn recv_message_with(
    stream: &UnixStream,
    patience: &Patience,
    deadline: Option<Instant>,
) -> Result<RawMessage> {
    let mut fds = Vec::new();
    let mut head = [0u8; HEADER_SIZE];
    let got = recv_exact(stream, &mut head, &mut fds, patience, deadline)?;
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
    let got = recv_exact(stream, &mut payload, &mut fds, patience, deadline)?;
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
