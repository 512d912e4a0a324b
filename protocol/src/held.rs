//! Descriptors the frontend holds for the backend (feature HOLD_FDS, docs/protocol.md 10.11):
//! the key lists of HOLD_FDS, RELEASE_FDS and RETURN_FDS.
//!
//! All three payloads are `count` (u32), a reserved u32 and `count` keys (u32); HOLD_FDS and
//! RETURN_FDS carry one fd per key, in the keys' order.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::codec::{Reader, Writer};
use crate::error::DecodeError;
use crate::message::exact_fds;

/// Most descriptors one HOLD_FDS or RETURN_FDS carries (a message's fd limit).
pub const MAX_FDS_PER_MESSAGE: usize = 8;
/// Most keys one RELEASE_FDS names, and most descriptors a frontend holds.
pub const MAX_HELD_FDS: usize = 64;

/// Descriptors under keys: the body of HOLD_FDS and RETURN_FDS.
#[derive(Debug)]
pub struct HeldFds {
    /// Each descriptor with its key; no key twice.
    pub fds: Vec<(u32, OwnedFd)>,
}

impl HeldFds {
    /// The keys, in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.fds.iter().map(|(k, _)| *k)
    }

    pub(crate) fn encode<'a>(&'a self, w: &mut Writer, fds: &mut Vec<BorrowedFd<'a>>) {
        encode_keys(w, self.keys());
        fds.extend(self.fds.iter().map(|(_, fd)| fd.as_fd()));
    }

    pub(crate) fn decode(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Self, DecodeError> {
        let keys = decode_keys(payload, MAX_FDS_PER_MESSAGE)?;
        let fds = exact_fds(fds, keys.len())?;
        Ok(Self {
            fds: keys.into_iter().zip(fds).collect(),
        })
    }
}

pub(crate) fn encode_keys(w: &mut Writer, keys: impl ExactSizeIterator<Item = u32>) {
    // Callers hold at most MAX_HELD_FDS keys; a longer list is refused by the peer.
    w.u32(u32::try_from(keys.len()).unwrap_or(u32::MAX)).u32(0);
    for key in keys {
        w.u32(key);
    }
}

/// `count`, reserved, `count` distinct keys, with `1 <= count <= max`.
pub(crate) fn decode_keys(payload: &[u8], max: usize) -> Result<Vec<u32>, DecodeError> {
    let mut r = Reader::new(payload);
    let count = r.u32()?;
    r.reserved_u32("held.reserved")?;
    let n = usize::try_from(count).unwrap_or(usize::MAX);
    if n == 0 || n > max {
        return Err(DecodeError::Field {
            field: "held.count",
            value: u64::from(count),
            reason: if n == 0 {
                "no keys"
            } else {
                "more keys than one message may carry"
            },
        });
    }
    // n <= MAX_HELD_FDS, so this cannot overflow.
    let expected = 8usize.saturating_add(n.saturating_mul(4));
    if payload.len() != expected {
        return Err(DecodeError::PayloadSize {
            expected,
            actual: payload.len(),
        });
    }
    let mut keys: Vec<u32> = Vec::with_capacity(n);
    for _ in 0..n {
        let key = r.u32()?;
        if keys.contains(&key) {
            return Err(DecodeError::Field {
                field: "held.keys",
                value: u64::from(key),
                reason: "a key twice",
            });
        }
        keys.push(key);
    }
    r.finish()?;
    Ok(keys)
}
