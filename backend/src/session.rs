//! One frontend connection.
//!
//! This is the skeleton of the session: it negotiates features and refuses everything that
//! needs the vSMMU model, which does not exist yet, with an honest error reply. Malformed
//! messages get the error reply the protocol prescribes, or a closed connection where the
//! frontend could not learn of the failure.

use std::os::unix::net::UnixStream;

use log::{debug, info, warn};
use viommu_protocol::{
    Backend, Error, ErrorReply, Features, FrontendReply, FrontendRequest, Request, Status,
};

/// Features this backend offers. None yet: each comes with the issue that implements it.
pub const OFFERED_FEATURES: Features = Features::empty();

/// Errors that end a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection failed or the frontend broke the framing.
    #[error("connection to the frontend failed")]
    Connection(#[source] Error),
    /// The frontend sent an invalid message it did not wait for an answer to, so the failure
    /// cannot be reported on the connection.
    #[error("invalid posted message from the frontend")]
    InvalidPosted(#[source] Error),
}

/// Where a connection stands in the protocol's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connected,
    Negotiated(Features),
}

/// Serves one frontend until it disconnects. A clean disconnect is `Ok`.
pub fn serve(stream: UnixStream) -> Result<(), SessionError> {
    let conn = Backend::new(stream);
    let mut state = State::Connected;
    loop {
        let incoming = match conn.recv() {
            Ok(incoming) => incoming,
            Err(Error::Disconnected) => {
                info!("frontend disconnected");
                return Ok(());
            }
            Err(err) => match err.reply_token() {
                Some(token) if token.expects_reply => {
                    warn!("refusing a message: {}", error_chain(&err));
                    let reply = ErrorReply::new(err.reply_status(), error_chain(&err));
                    conn.reply_error(token, &reply)
                        .map_err(SessionError::Connection)?;
                    continue;
                }
                Some(_) => return Err(SessionError::InvalidPosted(err)),
                None => return Err(SessionError::Connection(err)),
            },
        };
        let name = incoming.request.name();
        debug!("received {name}");
        let result = handle(&mut state, incoming.request);
        if let Err(err) = &result {
            warn!("{name} refused: {}: {}", err.status, err.message);
            if !incoming.token.expects_reply {
                // A posted message failed: the frontend cannot learn of it.
                return Err(SessionError::InvalidPosted(Error::Remote {
                    request: name,
                    status: err.status,
                    message: err.message.clone(),
                }));
            }
        }
        conn.reply(incoming.token, result)
            .map_err(SessionError::Connection)?;
    }
}

fn handle(state: &mut State, request: FrontendRequest) -> Result<FrontendReply, ErrorReply> {
    match (request, *state) {
        (FrontendRequest::GetFeatures, _) => Ok(FrontendReply::Features(OFFERED_FEATURES)),
        (FrontendRequest::SetFeatures(wanted), State::Connected) => {
            if !OFFERED_FEATURES.contains(wanted) {
                return Err(ErrorReply::new(
                    Status::INVALID_ARGUMENT,
                    format!(
                        "features {:#x} were not offered",
                        wanted.difference(OFFERED_FEATURES).bits()
                    ),
                ));
            }
            *state = State::Negotiated(wanted);
            Ok(FrontendReply::Ack)
        }
        (FrontendRequest::SetFeatures(_), State::Negotiated(_)) => Err(ErrorReply::new(
            Status::BAD_STATE,
            "SET_FEATURES is accepted once per connection",
        )),
        (other, State::Connected) => Err(ErrorReply::new(
            Status::BAD_STATE,
            format!("{} not allowed in state CONNECTED", other.name()),
        )),
        (other, State::Negotiated(_)) => Err(ErrorReply::new(
            Status::INTERNAL,
            format!(
                "{} needs the vSMMU model, which is not implemented yet",
                other.name()
            ),
        )),
    }
}

/// An error and its sources, joined for a log line or an error reply.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
