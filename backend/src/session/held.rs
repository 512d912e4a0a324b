//! Descriptors the frontend holds for the backend (HOLD_FDS, docs/protocol.md 10.11): the
//! vEVENTQs' fds and the host record, given over the backend channel, returned with
//! RETURN_FDS for a resume, and adopted there.

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, OwnedFd};

use log::{info, warn};
use viommu_protocol::{
    BackendChannel, BackendRequest, ErrorReply, Features, FrontendReply, HeldFds, MAX_HELD_FDS,
    Request, Status,
};

use super::host_objects::{FdKeeper, HostObjects, RECORD_KEY};
use super::host_record::HostRecord;
use super::{Phase, Session, refuse};

/// The frontend as keeper: HOLD_FDS and RELEASE_FDS on the backend channel, each waiting for
/// its acknowledgement (10.11's ordering rules rely on it).
struct ChannelKeeper<'a> {
    channel: Option<&'a BackendChannel>,
    sent: u64,
    broken: Option<String>,
}

impl ChannelKeeper<'_> {
    fn send(&mut self, request: BackendRequest) {
        let Some(channel) = self.channel else {
            return;
        };
        if self.broken.is_some() {
            return;
        }
        self.sent = self.sent.saturating_add(1);
        match channel.call(&request) {
            Ok(_) => {}
            // The frontend refused: what it would have held is not held, which a resume
            // handles as a descriptor that never came back.
            Err(e) if !e.is_fatal() => {
                warn!("{} refused: {}", request.name(), crate::error_chain(&e));
            }
            Err(e) => self.broken = Some(crate::error_chain(&e)),
        }
    }
}

impl FdKeeper for ChannelKeeper<'_> {
    fn hold(&mut self, key: u32, fd: BorrowedFd<'_>) {
        if self.channel.is_none() {
            return;
        }
        match fd.try_clone_to_owned() {
            Ok(fd) => self.send(BackendRequest::HoldFds(HeldFds {
                fds: vec![(key, fd)],
            })),
            Err(e) => warn!("cannot duplicate the fd to hold under key {key}: {e}"),
        }
    }

    fn release(&mut self, key: u32) {
        self.send(BackendRequest::ReleaseFds(vec![key]));
    }
}

impl Session {
    /// Runs `f` on the passthrough objects with the frontend as keeper (when HOLD_FDS is
    /// negotiated and the channel set); a channel that broke meanwhile ends the session after
    /// the current request. `None` without SET_IOMMUFD.
    pub(super) fn with_keeper<T>(
        &mut self,
        f: impl FnOnce(&mut HostObjects, &mut dyn FdKeeper) -> T,
    ) -> Option<T> {
        let holding = self.features.contains(Features::HOLD_FDS);
        let p = self.passthrough.as_mut()?;
        let mut keeper = ChannelKeeper {
            channel: if holding { self.channel.as_ref() } else { None },
            sent: 0,
            broken: None,
        };
        let out = f(p, &mut keeper);
        self.counters.channel_messages = self.counters.channel_messages.saturating_add(keeper.sent);
        if let Some(why) = keeper.broken {
            self.channel_broken = Some(why);
        }
        Some(out)
    }

    /// Before the first passthrough device: with HOLD_FDS, a host record for the frontend to
    /// hold, so that a backend resuming after this one died can adopt the objects.
    pub(super) fn start_host_record(&mut self) {
        let wanted = self.features.contains(Features::HOLD_FDS) && self.channel.is_some();
        if !wanted
            || self
                .passthrough
                .as_ref()
                .is_none_or(|p| p.record().is_some())
        {
            return;
        }
        let record = match HostRecord::create() {
            Ok(record) => record,
            Err(e) => {
                warn!("no host record, passthrough devices will not survive a crash: {e}");
                return;
            }
        };
        self.with_keeper(|p, keeper| {
            keeper.hold(RECORD_KEY, record.fd());
            p.keep_record(record);
        });
    }

    /// RETURN_FDS: kept for the resume that follows.
    pub(super) fn return_fds(&mut self, held: HeldFds) -> Result<FrontendReply, ErrorReply> {
        let name = "RETURN_FDS";
        self.require_feature(Features::HOLD_FDS, name)?;
        if self.phase != Phase::Configured || self.shared.is_some() || self.restored.is_some() {
            return Err(refuse(
                Status::BAD_STATE,
                format!(
                    "{name} is allowed in state CONFIGURED before SET_SHARED_REGION (state {})",
                    self.phase
                ),
            ));
        }
        if let Some(key) = held.keys().find(|k| self.returned.contains_key(k)) {
            return Err(refuse(
                Status::INVALID_ARGUMENT,
                format!("{name}: key {key} was returned already"),
            ));
        }
        let total = self.returned.len().saturating_add(held.fds.len());
        if total > MAX_HELD_FDS {
            return Err(refuse(
                Status::NO_SPACE,
                format!("{name}: {total} descriptors, more than {MAX_HELD_FDS}"),
            ));
        }
        self.returned.extend(held.fds);
        Ok(FrontendReply::Ack)
    }

    /// At a resume (10.10 step 2, 10.11): adopts the objects the returned host record names,
    /// with the returned vEVENTQ fds. Returns whether host events may have been lost, which
    /// the guest must see as an event queue overflow. Descriptors it does not use are closed.
    pub(super) fn adopt_held(&mut self) -> Result<bool, ErrorReply> {
        let mut returned: BTreeMap<u32, OwnedFd> = std::mem::take(&mut self.returned);
        let Some(fd) = returned.remove(&RECORD_KEY) else {
            if !returned.is_empty() {
                warn!(
                    "{} descriptor(s) returned without a host record: closed",
                    returned.len()
                );
            }
            return Ok(false);
        };
        let invalid = |e: String| refuse(Status::INVALID_ARGUMENT, e);
        let record = HostRecord::adopt(fd).map_err(|e| invalid(e.to_string()))?;
        let state = record.read().map_err(|e| invalid(e.to_string()))?;
        let in_hand = record.events_in_hand();
        if self.passthrough.is_none() {
            return Err(refuse(
                Status::BAD_STATE,
                "a host record to resume needs SET_IOMMUFD first",
            ));
        }
        // Before the region's registers are restored, as before a blob's.
        self.settle_idr_auto_from(&state, "the host record")?;
        let Some(p) = self.passthrough.as_mut() else {
            return Err(refuse(
                Status::BAD_STATE,
                "a host record to resume needs SET_IOMMUFD first",
            ));
        };
        let lost = p
            .adopt_resumed(state, &mut returned)
            .map_err(|e| refuse(Status::INCOMPATIBLE, e.to_string()))?;
        p.keep_record(record);
        if !returned.is_empty() {
            warn!(
                "{} returned descriptor(s) the host record does not name: closed",
                returned.len()
            );
        }
        if lost || in_hand {
            warn!(
                "host events may have been lost while no backend was there ({}): the guest sees \
                 an event queue overflow",
                if in_hand {
                    "the previous backend died holding some"
                } else {
                    "a vEVENTQ was never held"
                }
            );
        }
        // What the host queued meanwhile goes to the guest once the session runs (the daemon
        // polls the adopted queues). `events_in_hand` is cleared once the overflow is
        // published (the caller's publication).
        info!("passthrough objects adopted from the host record");
        Ok(lost || in_hand)
    }
}
