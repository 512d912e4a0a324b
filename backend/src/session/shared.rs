//! The shared region (docs/protocol.md, section 10): adopting it, applying the writes the
//! frontend posts there, publishing the register file, and keeping the translation cache:
//! filled (with prefetch) when a TRANSLATE is answered, cleaned before a CMD_SYNC completes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use log::{info, warn};
use viommu_protocol::shared::{BackendSide, CachedTranslation, Region, SharedError};
use viommu_protocol::types::{AccessSize, MmioAccess};
use viommu_protocol::{ErrorReply, FrontendReply, Status};
use viommu_smmuv3::walk::AccessKind;
use viommu_smmuv3::{SidRange, Translation};

use super::{Phase, Session, SessionError, refuse};

/// Pages probed on each side of a translation miss (section 10.6, prefetch).
pub const PREFETCH_PAGES: u64 = 16;

/// The session's shared region and its kick.
#[derive(Debug)]
pub(super) struct Shared {
    side: BackendSide,
    kick: OwnedFd,
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
    ) -> Result<FrontendReply, ErrorReply> {
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
        let region =
            Region::adopt(region).map_err(|e| refuse(Status::INVALID_ARGUMENT, e.to_string()))?;
        self.shared = Some(Shared {
            side: BackendSide::new(region),
            kick,
        });
        self.publish();
        info!("shared region set");
        Ok(FrontendReply::Ack)
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

    /// After any wake-up: the frontend need not kick (10.4 step 3).
    pub fn awake(&self) {
        if let Some(shared) = self.shared.as_ref() {
            shared.side.woke();
        }
    }

    /// Applies every posted write, each completely and published before `write_cons` moves
    /// past it (10.4 step 2). A broken ring ends the session after the writes before it.
    pub fn drain_posted(&mut self) -> Result<(), SessionError> {
        loop {
            let Some(shared) = self.shared.as_ref() else {
                return Ok(());
            };
            let Some(write) = shared.side.next_write().map_err(SessionError::Shared)? else {
                return Ok(());
            };
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

    /// Clears the cache entries an invalidation of `[start, last]` (input addresses, any
    /// stream) may have made stale.
    pub(super) fn clear_translations(&mut self, start: u64, last: u64) {
        if let Some(shared) = self.shared.as_mut() {
            let n = shared
                .side
                .clear(|t| t.base <= last && t.base | t.mask() >= start);
            self.shared_counters.cache_clears =
                self.shared_counters.cache_clears.saturating_add(n as u64);
        }
    }

    /// Clears the cache entries of the streams in `range`.
    pub(super) fn clear_streams(&mut self, range: SidRange) {
        if let Some(shared) = self.shared.as_mut() {
            let n = shared
                .side
                .clear(|t| (range.first..=range.last).contains(&t.sid));
            self.shared_counters.cache_clears =
                self.shared_counters.cache_clears.saturating_add(n as u64);
        }
    }

    /// Fills the cache with a TRANSLATE answer, then prefetches the neighbouring pages that
    /// translate (probes: no event is recorded), stopping in each direction at the first that
    /// does not (10.6).
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
        let probe = AccessKind {
            read: false,
            write: false,
            exec: false,
            privileged: false,
        };
        let page = iova & !0xfff;
        for up in [true, false] {
            for k in 1..=PREFETCH_PAGES {
                let delta = k << 12;
                let next = if up {
                    page.checked_add(delta)
                } else {
                    page.checked_sub(delta)
                };
                let Some(next) = next else { break };
                let (Some(smmu), ram) = (self.smmu.as_mut(), &self.ram) else {
                    return;
                };
                match smmu.translate(ram, sid, ssid, next, probe) {
                    Ok(t) if t.read || t.write => self.fill_one(sid, ssid, next, &t, true),
                    _ => break,
                }
            }
        }
        // A probe records nothing; drop whatever bookkeeping effects it left.
        if let Some(smmu) = self.smmu.as_mut()
            && smmu.has_effects()
        {
            warn!("a prefetch probe produced effects; they are carried out");
        }
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
        self.clear_translations(0, u64::MAX);
    }
}
