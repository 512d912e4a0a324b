//! The shared region (docs/protocol.md, section 10): adopting it, applying the writes the
//! frontend posts there, answering the translation requests it places there, publishing the
//! register file, and keeping the translation cache: filled (with prefetch) when a TRANSLATE
//! is answered, cleaned before a CMD_SYNC completes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use log::{info, warn};
use viommu_protocol::shared::{
    Answer, BackendSide, CachedTranslation, Region, SharedError, mirror_slot,
};
use viommu_protocol::types::{AccessSize, Features, MmioAccess};
use viommu_protocol::{ErrorReply, FrontendReply, Status};
use viommu_smmuv3::snapshot::SmmuSnapshot;
use viommu_smmuv3::walk::AccessKind;
use viommu_smmuv3::{SidRange, Translation};

use super::{Phase, Restored, Session, SessionError, model, refuse};

/// Pages probed on each side of a translation miss (section 10.6, prefetch).
pub const PREFETCH_PAGES: u64 = 64;
/// Of those above the miss, the ones filled before the reply: a device reads on upwards at
/// once, faster than the backend could prefetch after replying.
pub const PREFETCH_BEFORE_REPLY: u64 = 64;

/// The session's shared region, its kick, and with SHARED_TRANSLATE its call.
#[derive(Debug)]
pub(super) struct Shared {
    side: BackendSide,
    kick: OwnedFd,
    call: Option<OwnedFd>,
    /// The miss whose neighbours are prefetched once its reply is sent.
    prefetch: Option<Miss>,
}

/// A TRANSLATE miss to prefetch around.
#[derive(Debug, Clone, Copy)]
struct Miss {
    sid: u32,
    ssid: Option<u32>,
    iova: u64,
    /// Whether the pages above the ones filled before the reply may be mapped too.
    more_above: bool,
}

/// Counters of the shared region, for the status line.
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedCounters {
    /// Posted writes applied.
    pub posted_writes: u64,
    /// Register-file publications.
    pub publications: u64,
    /// Translation cache entries filled (prefetched ones included).
    pub cache_fills: u64,
    /// Of which prefetched.
    pub prefetched: u64,
    /// Entries cleared by invalidations.
    pub cache_clears: u64,
    /// Translation requests answered through the region (10.9).
    pub region_translations: u64,
    /// Calls: writes of the call eventfd to wake a waiting frontend.
    pub calls: u64,
}

/// A posted write, checked as an MMIO_WRITE payload is (10.4 step 2).
fn check_posted(offset: u32, size: u32, value: u64) -> Result<MmioAccess, SharedError> {
    let access = MmioAccess::checked(u64::from(offset), size)
        .map_err(|e| SharedError::Broken(format!("posted write: {e}")))?;
    if access.size == AccessSize::Dword && value > u64::from(u32::MAX) {
        return Err(SharedError::Broken(format!(
            "posted 4-byte write of {value:#x} at {offset:#x}"
        )));
    }
    Ok(access)
}

impl Session {
    /// SET_SHARED_REGION.
    pub(super) fn set_shared_region(
        &mut self,
        region: OwnedFd,
        kick: OwnedFd,
        call: Option<OwnedFd>,
        resume: bool,
    ) -> Result<FrontendReply, ErrorReply> {
        if resume {
            return self.resume_from_region(region, kick, call);
        }
        // Held descriptors are for a resume only (10.11).
        self.returned.clear();
        if !matches!(self.phase, Phase::Negotiated | Phase::Configured) {
            return Err(refuse(
                Status::BAD_STATE,
                format!("SET_SHARED_REGION not allowed in state {}", self.phase),
            ));
        }
        if self.shared.is_some() {
            return Err(refuse(
                Status::BAD_STATE,
                "the shared region is already set",
            ));
        }
        self.check_call(call.as_ref())?;
        let with_call = call.is_some();
        let region =
            Region::adopt(region).map_err(|e| refuse(Status::INVALID_ARGUMENT, e.to_string()))?;
        self.shared = Some(Shared {
            side: BackendSide::new(region, with_call),
            kick,
            call,
            prefetch: None,
        });
        self.publish();
        info!("shared region set");
        Ok(FrontendReply::Ack)
    }

    /// SET_SHARED_REGION with RESUME (10.10): the vSMMU's state from the region a backend that
    /// died left, in place of SET_STATE.
    fn resume_from_region(
        &mut self,
        region: OwnedFd,
        kick: OwnedFd,
        call: Option<OwnedFd>,
    ) -> Result<FrontendReply, ErrorReply> {
        if self.phase != Phase::Configured || self.restored.is_some() || self.shared.is_some() {
            return Err(refuse(
                Status::BAD_STATE,
                format!(
                    "SET_SHARED_REGION with RESUME is allowed once, in state CONFIGURED before \
                     the guest ran and without SET_STATE (state {}{}{})",
                    self.phase,
                    if self.restored.is_some() {
                        ", state restored"
                    } else {
                        ""
                    },
                    if self.shared.is_some() {
                        ", a region set"
                    } else {
                        ""
                    },
                ),
            ));
        }
        self.check_call(call.as_ref())?;
        let with_call = call.is_some();
        let region = Region::adopt_to_resume(region)
            .map_err(|e| refuse(Status::INVALID_ARGUMENT, e.to_string()))?;
        let side = BackendSide::resume(region, with_call);
        // The host objects first: a record that is refused leaves the vSMMU untouched.
        let events_lost = self.adopt_held()?;
        let file = side.saved_registers();
        let snapshot = SmmuSnapshot::from_registers(|offset| {
            mirror_slot(offset)
                .and_then(|slot| file.get(slot))
                .copied()
                .unwrap_or(0)
        });
        let smmu = model(&mut self.smmu)?;
        smmu.restore(&snapshot)
            .map_err(|e| refuse(Status::INCOMPATIBLE, e.to_string()))?;
        smmu.signal_pending(&self.ram);
        if events_lost {
            smmu.record_host_events_lost();
        }
        self.shared = Some(Shared {
            side,
            kick,
            call,
            prefetch: None,
        });
        self.restored = Some(Restored::FromRegion);
        // The devices' translations re-evaluated, the interrupts signalled, then the registers
        // published (10.3: before the interrupts' edges reach the guest, which they do only
        // once the effects run).
        self.run_effects()?;
        self.publish();
        if let Some(p) = self.passthrough.as_ref() {
            p.events_published();
        }
        let pending = self.shared.as_ref().map_or(0, |s| s.side.writes_waiting());
        info!("vSMMU resumed from the shared region, {pending} posted write(s) to apply");
        Ok(FrontendReply::Ack)
    }

    /// The call fd must come exactly with SHARED_TRANSLATE.
    fn check_call(&self, call: Option<&OwnedFd>) -> Result<(), ErrorReply> {
        let with_call = self.features.contains(Features::SHARED_TRANSLATE);
        if call.is_some() != with_call {
            return Err(refuse(
                Status::INVALID_MESSAGE,
                format!(
                    "SET_SHARED_REGION carries {} fds; {} with SHARED_TRANSLATE{}",
                    if call.is_some() { 3 } else { 2 },
                    if with_call { 3 } else { 2 },
                    if with_call { "" } else { " not negotiated" },
                ),
            ));
        }
        Ok(())
    }

    /// The kick eventfd, once the region is set (for polling).
    pub fn kick(&self) -> Option<BorrowedFd<'_>> {
        self.shared.as_ref().map(|s| s.kick.as_fd())
    }

    /// Whether the frontend pushes SIDs (UPDATE_DEVICE) instead of the backend pulling them.
    pub(super) fn sids_pushed(&self) -> bool {
        self.shared.is_some()
    }

    /// The kick fired: reads it to zero and applies what was posted.
    pub fn handle_kick(&mut self) -> Result<(), SessionError> {
        if let Some(shared) = self.shared.as_ref() {
            let mut buf = [0u8; 8];
            // Non-blocking or not, one read takes the whole count; EAGAIN means a spurious wake.
            let _ = rustix::io::read(&shared.kick, &mut buf);
            shared.side.woke();
        }
        self.drain_posted()
    }

    /// Before the daemon sleeps (10.4 step 3): `false` if writes arrived and it must not.
    pub fn prepare_to_sleep(&mut self) -> bool {
        match self.shared.as_mut() {
            Some(shared) => shared.side.prepare_to_sleep(),
            None => true,
        }
    }

    /// Whether the frontend posted writes not applied yet, or a translation request (memory
    /// loads, for busy-polling).
    pub fn region_has_work(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.side.writes_posted() || s.side.translation_requested())
    }

    /// After any wake-up: the frontend need not kick (10.4 step 3).
    pub fn awake(&self) {
        if let Some(shared) = self.shared.as_ref() {
            shared.side.woke();
        }
    }

    /// Applies every posted write (10.4 step 2), then answers a translation request waiting
    /// behind them (10.9), then calls the frontend if it sleeps waiting for either.
    pub fn drain_posted(&mut self) -> Result<(), SessionError> {
        let applied = self.apply_posted_writes()?;
        let answered = self.answer_request()?;
        if applied || answered {
            self.call_if_waiting();
        }
        Ok(())
    }

    /// Applies every posted write, each completely and published before `write_cons` moves
    /// past it (10.4 step 2). A broken ring ends the session after the writes before it.
    /// Returns whether there was any.
    fn apply_posted_writes(&mut self) -> Result<bool, SessionError> {
        let mut applied = false;
        loop {
            let Some(shared) = self.shared.as_ref() else {
                return Ok(applied);
            };
            let Some(write) = shared.side.next_write().map_err(SessionError::Shared)? else {
                return Ok(applied);
            };
            applied = true;
            let access = check_posted(write.offset, write.size, write.value)
                .map_err(SessionError::Shared)?;
            self.shared_counters.posted_writes =
                self.shared_counters.posted_writes.saturating_add(1);
            let result = self
                .guest_access("a posted write")
                .and_then(|()| self.mmio_write(access, write.value));
            if let Err(e) = result {
                return Err(SessionError::PostedFailure {
                    request: "posted MMIO write",
                    status: e.status,
                    message: e.message,
                });
            }
            self.publish();
            if let Some(shared) = self.shared.as_mut() {
                shared.side.complete_write();
            }
            if let Some(why) = self.channel_broken.take() {
                return Err(SessionError::ChannelBroken(why));
            }
        }
    }

    /// Answers the translation request waiting in the region, if there is one (10.9): as the
    /// TRANSLATE message would be answered, with the cache filled and prefetched the same way.
    /// Returns whether there was one.
    fn answer_request(&mut self) -> Result<bool, SessionError> {
        let Some((seq, request)) = self.shared.as_ref().and_then(|s| s.side.next_request()) else {
            return Ok(false);
        };
        let answer: Answer = match request {
            Ok(t) => self.translate(&t).map_err(|e| {
                warn!("a translation request refused: {}: {}", e.status, e.message);
                e.status
            }),
            Err(e) => {
                warn!("a malformed translation request refused: {e}");
                Err(Status::INVALID_MESSAGE)
            }
        };
        if answer.is_err() {
            self.counters.refused = self.counters.refused.saturating_add(1);
        }
        if let Some(lost) = self.lost_ram() {
            return Err(lost);
        }
        if let Some(shared) = self.shared.as_mut() {
            shared.side.answer(seq, &answer);
        }
        self.shared_counters.region_translations =
            self.shared_counters.region_translations.saturating_add(1);
        self.prefetch();
        if let Some(why) = self.channel_broken.take() {
            return Err(SessionError::ChannelBroken(why));
        }
        Ok(true)
    }

    /// Writes the call eventfd if the frontend announced a wait it was not called for (10.9).
    fn call_if_waiting(&mut self) {
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        if shared.call.is_some() && shared.side.frontend_waits() {
            if let Some(call) = shared.call.as_ref() {
                // A full eventfd counter (EAGAIN) still wakes the frontend.
                let _ = rustix::io::write(call, &1u64.to_ne_bytes());
            }
            self.shared_counters.calls = self.shared_counters.calls.saturating_add(1);
        }
    }

    /// Publishes the register file, if the region is set and the vSMMU exists (10.3).
    pub(super) fn publish(&mut self) {
        let (Some(shared), Some(smmu)) = (self.shared.as_mut(), self.smmu.as_mut()) else {
            return;
        };
        if shared
            .side
            .publish(|offset| smmu.mmio_read(offset, 4) as u32)
        {
            self.shared_counters.publications = self.shared_counters.publications.saturating_add(1);
        }
    }

    /// Clears, in one pass, the cache entries that invalidations of the input `ranges` (any
    /// stream) or of the `streams` may have made stale.
    pub(super) fn clear_cached(&mut self, ranges: Vec<(u64, u64)>, streams: &[SidRange]) {
        if ranges.is_empty() && streams.is_empty() {
            return;
        }
        if let Some(shared) = self.shared.as_mut() {
            let mut n = shared.side.clear_ranges(&ranges);
            if !streams.is_empty() {
                n = n.saturating_add(
                    shared
                        .side
                        .clear(|t| streams.iter().any(|r| (r.first..=r.last).contains(&t.sid))),
                );
            }
            self.shared_counters.cache_clears =
                self.shared_counters.cache_clears.saturating_add(n as u64);
        }
    }

    /// Fills the cache with a TRANSLATE answer (before the reply) and notes the miss, so that
    /// [`Session::prefetch`] fills its neighbours once the reply is sent (10.6).
    pub(super) fn fill_translation(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        access: AccessKind,
        tr: &Translation,
    ) {
        if self.shared.is_none() || access.privileged || access.exec {
            return;
        }
        self.fill_one(sid, ssid, iova, tr, false);
        let miss = Miss {
            sid,
            ssid,
            iova,
            more_above: false,
        };
        let done = self.probe_and_fill(miss, true, 1, PREFETCH_BEFORE_REPLY);
        if let Some(shared) = self.shared.as_mut() {
            shared.prefetch = Some(Miss {
                more_above: done == Some(PREFETCH_BEFORE_REPLY),
                ..miss
            });
        }
    }

    /// Probes pages `first..=last` above (or below) `miss` and fills those that translate,
    /// stopping at the first that does not. Returns the last page filled (`None`: none).
    fn probe_and_fill(&mut self, miss: Miss, up: bool, first: u64, last: u64) -> Option<u64> {
        let probe = AccessKind {
            read: false,
            write: false,
            exec: false,
            privileged: false,
        };
        let page = miss.iova & !0xfff;
        let mut done = None;
        for k in first..=last {
            let delta = k << 12;
            let next = if up {
                page.checked_add(delta)
            } else {
                page.checked_sub(delta)
            };
            let Some(next) = next else { break };
            let (Some(smmu), ram) = (self.smmu.as_mut(), &self.ram) else {
                break;
            };
            match smmu.translate(ram, miss.sid, miss.ssid, next, probe) {
                Ok(t) if t.read || t.write => {
                    self.fill_one(miss.sid, miss.ssid, next, &t, true);
                    done = Some(k);
                }
                _ => break,
            }
        }
        done
    }

    /// Prefetch (10.6): after the reply to a miss, fills the entries of the neighbouring pages
    /// that translate, probing them (no event is recorded) up to [`PREFETCH_PAGES`] above and
    /// below, and stopping in each direction at the first that does not. The frontend waits
    /// for none of it.
    pub fn prefetch(&mut self) {
        let Some(miss) = self.shared.as_mut().and_then(|s| s.prefetch.take()) else {
            return;
        };
        if miss.more_above {
            self.probe_and_fill(miss, true, PREFETCH_BEFORE_REPLY + 1, PREFETCH_PAGES);
        }
        self.probe_and_fill(miss, false, 1, PREFETCH_PAGES);
    }

    fn fill_one(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        tr: &Translation,
        prefetched: bool,
    ) {
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        let Some(t) = CachedTranslation::for_page(
            sid,
            ssid,
            iova,
            tr.size_shift,
            tr.output_base,
            tr.read,
            tr.write,
        ) else {
            return;
        };
        shared.side.fill(iova, t);
        let c = &mut self.shared_counters;
        c.cache_fills = c.cache_fills.saturating_add(1);
        if prefetched {
            c.prefetched = c.prefetched.saturating_add(1);
        }
    }

    /// Clears every cache entry (RESET, SET_STATE).
    pub(super) fn clear_all_translations(&mut self) {
        self.clear_cached(vec![(0, u64::MAX)], &[]);
    }
}
