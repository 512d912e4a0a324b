//! The vIOMMU-user protocol between QEMU (the frontend) and `viommu-backend`.
//!
//! The protocol is specified in `docs/protocol.md`. This crate implements both ends:
//!
//! - [`header`]: the 12-byte header and the protocol's limits;
//! - [`types`]: payload structures with strict decoding;
//! - [`frontend`] and [`backend`]: the requests of the main channel and of the backend channel,
//!   and their replies;
//! - [`socket`]: framing with SCM_RIGHTS fd passing;
//! - [`connection`]: requester and responder ends of a channel, for both roles;
//! - [`held`]: descriptors the frontend holds for the backend (HOLD_FDS);
//! - [`shared`]: the shared region (registers, posted writes, the translation cache).
//!
//! Decoding never panics: every byte sequence and fd set either decodes to a typed message or
//! gives a precise error, and fds that arrive with a bad message are closed.

#![forbid(unsafe_code)]

pub mod backend;
mod codec;
pub mod connection;
pub mod error;
pub mod frontend;
pub mod header;
pub mod held;
pub mod message;
pub mod shared;
pub mod socket;
pub mod status;
pub mod types;

pub use backend::{BackendReply, BackendRequest, DeviceSid, MAX_DEVICE_SIDS};
pub use connection::{
    Backend, BackendChannel, Frontend, FrontendChannel, Incoming, ReplyToken, Requester, Responder,
};
pub use error::{DecodeError, Error, Result};
pub use frontend::{AttachDevice, FrontendReply, FrontendRequest, Passthrough, StateBlob};
pub use header::{Header, MAX_FDS, MAX_PAYLOAD_SIZE};
pub use held::{HeldFds, MAX_FDS_PER_MESSAGE, MAX_HELD_FDS};
pub use message::{ErrorReply, Reply, ReplyPolicy, Request};
pub use status::Status;
pub use types::*;
