//! The two ends of a channel: a [`Requester`] sends requests and waits for replies, a
//! [`Responder`] receives requests and answers them.
//!
//! The main channel has the frontend as requester ([`Frontend`]) and the backend as responder
//! ([`Backend`]); the backend channel has them the other way round ([`BackendChannel`] in the
//! backend, [`FrontendChannel`] in the frontend).

use std::fmt;
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::backend::BackendRequest;
use crate::error::{DecodeError, Error, Result};
use crate::frontend::FrontendRequest;
use crate::header::Header;
use crate::message::{
    ErrorReply, Reply, ReplyPayload, ReplyPolicy, Request, decode_reply_prefix, encode_error_reply,
    encode_ok_reply,
};
use crate::socket::{Patience, RawMessage, recv_message_with, send_message_with};
use crate::status::Status;

/// The frontend's end of the main channel.
pub type Frontend = Requester<FrontendRequest>;
/// The backend's end of the main channel.
pub type Backend = Responder<FrontendRequest>;
/// The backend's end of the backend channel.
pub type BackendChannel = Requester<BackendRequest>;
/// The frontend's end of the backend channel.
pub type FrontendChannel = Responder<BackendRequest>;

/// Sends requests of type `R` and receives their replies.
pub struct Requester<R> {
    stream: UnixStream,
    patience: Patience,
    _request: PhantomData<fn(R)>,
}

impl<R> fmt::Debug for Requester<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Requester")
            .field("stream", &self.stream)
            .finish()
    }
}

impl<R: Request> Requester<R> {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            patience: Patience::default(),
            _request: PhantomData,
        }
    }

    /// Bounds how long the peer may keep this end waiting (see [`Patience`]).
    pub fn set_patience(&mut self, patience: Patience) {
        self.patience = patience;
    }

    /// The underlying stream (for polling).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the stream back.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    fn send(&self, request: &R, need_reply: bool, deadline: Option<Instant>) -> Result<()> {
        let encoded = request.encode();
        let size = u32::try_from(encoded.payload.len()).map_err(|_| Error::Usage {
            name: request.name(),
            reason: "payload too large",
        })?;
        let header = Header::request(request.code(), size, need_reply);
        send_message_with(
            &self.stream,
            &header,
            &encoded.payload,
            &encoded.fds,
            &self.patience,
            deadline,
        )
    }

    /// Sends a request and waits for its reply. A request that is answered only on NEED_REPLY
    /// is sent with NEED_REPLY and answered by an acknowledgement.
    ///
    /// An error reply from the peer is [`Error::Remote`]; the connection stays usable.
    pub fn call(&self, request: &R) -> Result<R::Reply> {
        let code = request.code();
        let policy = R::reply_policy(code).ok_or(Error::Usage {
            name: request.name(),
            reason: "not a request of this channel",
        })?;
        let deadline = self.patience.deadline();
        self.send(request, policy == ReplyPolicy::OnNeedReply, deadline)?;
        self.recv_reply(code, deadline)
    }

    /// Sends a request that has no reply of its own, without NEED_REPLY, and does not wait.
    pub fn post(&self, request: &R) -> Result<()> {
        match R::reply_policy(request.code()) {
            Some(ReplyPolicy::OnNeedReply) => self.send(request, false, self.patience.deadline()),
            Some(ReplyPolicy::Always) => Err(Error::Usage {
                name: request.name(),
                reason: "it always has a reply",
            }),
            None => Err(Error::Usage {
                name: request.name(),
                reason: "not a request of this channel",
            }),
        }
    }

    /// Waits for the reply to request `code`.
    fn recv_reply(&self, code: u32, deadline: Option<Instant>) -> Result<R::Reply> {
        let RawMessage {
            header,
            payload,
            fds,
        } = recv_message_with(&self.stream, &self.patience, deadline)?;
        let name = R::name_of(code);
        if !header.is_reply() || header.need_reply() || header.request != code {
            return Err(Error::UnexpectedReply {
                expected: name,
                request: header.request,
                flags: header.flags,
            });
        }
        let invalid = |source| Error::BadReply {
            request: name,
            source,
        };
        match decode_reply_prefix(&payload).map_err(invalid)? {
            ReplyPayload::Ok(body) => R::Reply::decode(code, body, fds).map_err(invalid),
            ReplyPayload::Err(err) => {
                if !fds.is_empty() {
                    return Err(invalid(DecodeError::FdCount {
                        expected: 0,
                        actual: fds.len(),
                    }));
                }
                Err(Error::Remote {
                    request: name,
                    status: err.status,
                    message: err.message,
                })
            }
        }
    }
}

/// Who a reply goes to: the request code and whether the requester waits for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyToken {
    /// The request code.
    pub request: u32,
    /// Whether the requester waits for a reply (the request always has one, or NEED_REPLY).
    pub expects_reply: bool,
}

/// A request as received, with what is needed to answer it.
#[derive(Debug)]
pub struct Incoming<R> {
    /// The decoded request.
    pub request: R,
    /// Pass it to [`Responder::reply`].
    pub token: ReplyToken,
}

/// Receives requests of type `R` and sends their replies.
pub struct Responder<R> {
    stream: UnixStream,
    patience: Patience,
    _request: PhantomData<fn(R)>,
}

impl<R> fmt::Debug for Responder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("stream", &self.stream)
            .finish()
    }
}

impl<R: Request> Responder<R> {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            patience: Patience::default(),
            _request: PhantomData,
        }
    }

    /// Bounds how long the peer may keep this end waiting (see [`Patience`]).
    pub fn set_patience(&mut self, patience: Patience) {
        self.patience = patience;
    }

    /// The underlying stream (for polling).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the stream back.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Receives and decodes the next request.
    ///
    /// A complete message that cannot be accepted is [`Error::Invalid`], which is not fatal:
    /// answer it with [`Responder::reply_error`] when [`Error::reply_token`] says the peer waits,
    /// otherwise the peer cannot learn of the failure and the connection should be closed.
    pub fn recv(&self) -> Result<Incoming<R>> {
        let RawMessage {
            header,
            payload,
            fds,
        } = recv_message_with(&self.stream, &self.patience, self.patience.deadline())?;
        let code = header.request;
        let policy = R::reply_policy(code);
        let expects_reply = header.need_reply() || policy == Some(ReplyPolicy::Always);
        let token = ReplyToken {
            request: code,
            expects_reply,
        };
        let invalid = |source| Error::Invalid {
            request: code,
            name: R::name_of(code),
            expects_reply,
            source,
        };
        if header.is_reply() {
            return Err(invalid(DecodeError::Flags {
                flags: header.flags,
                reason: "REPLY is set on a request",
            }));
        }
        let request = R::decode(code, &payload, fds).map_err(invalid)?;
        Ok(Incoming { request, token })
    }

    /// Answers a request: sends the reply or the error if the requester waits for one, and
    /// nothing otherwise.
    pub fn reply(
        &self,
        token: ReplyToken,
        result: std::result::Result<R::Reply, ErrorReply>,
    ) -> Result<()> {
        if !token.expects_reply {
            return Ok(());
        }
        match result {
            Ok(reply) => {
                if !reply.answers(token.request) {
                    return Err(Error::Usage {
                        name: R::name_of(token.request),
                        reason: "the reply is not of the kind this request takes",
                    });
                }
                let body = reply.encode();
                let payload = encode_ok_reply(&body.payload);
                self.send_reply(token.request, &payload, &body.fds)
            }
            Err(err) => self.reply_error(token, &err),
        }
    }

    /// Sends an error reply if the requester waits for one.
    pub fn reply_error(&self, token: ReplyToken, err: &ErrorReply) -> Result<()> {
        if !token.expects_reply {
            return Ok(());
        }
        let payload = encode_error_reply(err);
        self.send_reply(token.request, &payload, &[])
    }

    fn send_reply(
        &self,
        request: u32,
        payload: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<()> {
        let size = u32::try_from(payload.len()).map_err(|_| Error::Usage {
            name: R::name_of(request),
            reason: "reply too large",
        })?;
        send_message_with(
            &self.stream,
            &Header::reply(request, size),
            payload,
            fds,
            &self.patience,
            self.patience.deadline(),
        )
    }
}

impl Error {
    /// For an [`Error::Invalid`] request, where its error reply goes.
    pub fn reply_token(&self) -> Option<ReplyToken> {
        match self {
            Error::Invalid {
                request,
                expects_reply,
                ..
            } => Some(ReplyToken {
                request: *request,
                expects_reply: *expects_reply,
            }),
            _ => None,
        }
    }

    /// The status an error reply to this receive error carries.
    pub fn reply_status(&self) -> Status {
        match self {
            Error::Invalid {
                source: DecodeError::UnknownRequest(_),
                ..
            } => Status::UNKNOWN_REQUEST,
            Error::Invalid { .. } => Status::INVALID_MESSAGE,
            Error::Remote { status, .. } => *status,
            _ => Status::INTERNAL,
        }
    }
}
