//! The frontend's half of the shared region's rules (docs/protocol.md, 10.3, 10.4 and 10.6).

use std::sync::atomic::fence;
use std::time::Instant;

use super::layout::{RING_ENTRIES, mirror_slot, off, ring_field, slot_field};
use super::tcache::{CachedTranslation, entry_offset, field, tc_index};
use super::xlate::{self, Answer};
use super::{Ordering, Region, SharedError};
use crate::types::TranslateRequest;

/// What posting a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Posted; the backend is awake and will see it.
    Quiet,
    /// Posted; the backend may be asleep: write the kick eventfd.
    Kick,
    /// Not posted: the ring is full. Kick (always), wait for room, and post again.
    Full,
}

/// The frontend's view: it writes `write_prod` and the ring, and reads everything else.
#[derive(Debug)]
pub struct FrontendSide {
    region: Region,
    write_prod: u32,
    seen_cons: u32,
    /// The `backend_idle` value of the sleep this frontend last kicked.
    kicked: u32,
    /// The last translation request's number (10.9).
    request: u32,
    /// Waits announced in `frontend_wait`.
    waits: u32,
}

impl FrontendSide {
    /// Uses a region this frontend created (or re-uses after a reconnection: its ring is
    /// empty then, `write_prod` == `write_cons`).
    pub fn new(region: Region) -> Self {
        let write_prod = region.u32_at(off::WRITE_PROD).load(Ordering::Relaxed);
        let request = region.u32_at(xlate::req::SEQ).load(Ordering::Relaxed);
        region
            .u32_at(off::FRONTEND_WAIT)
            .store(0, Ordering::Relaxed);
        Self {
            region,
            write_prod,
            seen_cons: write_prod,
            kicked: 0,
            request,
            waits: 0,
        }
    }

    /// The region is handed to a new backend (SET_SHARED_REGION with RESUME, 10.10): it counts
    /// its sleeps afresh, so the sleep this frontend last kicked says nothing about its sleeps.
    pub fn new_backend(&mut self) {
        self.kicked = 0;
    }

    /// The region, to hand its fd over.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Whether posted writes are still unapplied. A `write_cons` that moved backwards or
    /// passed `write_prod` is a broken backend (10.7).
    pub fn writes_pending(&mut self) -> Result<bool, SharedError> {
        let cons = self.region.u32_at(off::WRITE_CONS).load(Ordering::Acquire);
        let advanced = cons.wrapping_sub(self.seen_cons);
        let outstanding = self.write_prod.wrapping_sub(self.seen_cons);
        if advanced > outstanding {
            return Err(SharedError::Broken(format!(
                "write_cons moved from {} to {cons}, write_prod is {}",
                self.seen_cons, self.write_prod
            )));
        }
        self.seen_cons = cons;
        Ok(cons != self.write_prod)
    }

    /// Posts a write (10.4 steps 1 to 4). The caller has checked `offset` and `size` as for an
    /// MMIO_WRITE.
    pub fn post(&mut self, offset: u32, size: u32, value: u64) -> Result<Posted, SharedError> {
        self.writes_pending()?;
        if self.write_prod.wrapping_sub(self.seen_cons) >= RING_ENTRIES {
            return Ok(Posted::Full);
        }
        let at = |field| ring_field(self.write_prod, field);
        self.region.u32_at(at(0)).store(offset, Ordering::Relaxed);
        self.region.u32_at(at(4)).store(size, Ordering::Relaxed);
        self.region.u64_at(at(8)).store(value, Ordering::Relaxed);
        self.write_prod = self.write_prod.wrapping_add(1);
        self.region
            .u32_at(off::WRITE_PROD)
            .store(self.write_prod, Ordering::Release);
        Ok(self.after_producing())
    }

    /// 10.4 step 4: a sequentially consistent fence, then a kick if the backend announced a
    /// sleep this frontend has not kicked yet.
    fn after_producing(&mut self) -> Posted {
        fence(Ordering::SeqCst);
        let idle = self
            .region
            .u32_at(off::BACKEND_IDLE)
            .load(Ordering::Relaxed);
        if idle != 0 && idle != self.kicked {
            self.kicked = idle;
            Posted::Kick
        } else {
            Posted::Quiet
        }
    }

    /// Sends a translation request through the region (10.9 steps 1 and 2); at most one is
    /// outstanding. Returns whether to kick ([`Posted::Kick`]) or not ([`Posted::Quiet`]).
    pub fn request_translation(&mut self, t: &TranslateRequest) -> Posted {
        xlate::store_request(&self.region, t);
        self.request = self.request.wrapping_add(1);
        self.region
            .u32_at(xlate::req::SEQ)
            .store(self.request, Ordering::Release);
        self.after_producing()
    }

    /// The answer to the outstanding request, once the backend stored it (10.9 step 3),
    /// checked as a TRANSLATE reply: `Ok(None)` while it has not.
    pub fn answer(&self) -> Result<Option<Answer>, SharedError> {
        let seq = self.region.u32_at(xlate::resp::SEQ).load(Ordering::Acquire);
        if seq != self.request {
            return Ok(None);
        }
        xlate::load_answer(&self.region)
            .map(Some)
            .map_err(|e| SharedError::Broken(format!("translation answer: {e}")))
    }

    /// Before sleeping on the call eventfd (10.9): announces the wait. The caller then checks
    /// once more what it waits for, and sleeps only if it still has to.
    pub fn announce_wait(&mut self) {
        self.waits = match self.waits.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        self.region
            .u32_at(off::FRONTEND_WAIT)
            .store(self.waits, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// After a wait: the backend need not call until the next [`FrontendSide::announce_wait`].
    pub fn end_wait(&self) {
        self.region
            .u32_at(off::FRONTEND_WAIT)
            .store(0, Ordering::Relaxed);
    }

    /// Reads the mirrored register at `offset` of `size` (4 or 8) bytes (10.3 steps 2 to 4).
    /// `None` if the offset is not mirrored. The caller first waits until
    /// [`FrontendSide::writes_pending`] is false. A `reg_seq` that stays odd or keeps moving
    /// until `deadline` is a broken backend.
    pub fn read_register(
        &self,
        offset: u64,
        size: u32,
        deadline: Instant,
    ) -> Result<Option<u64>, SharedError> {
        let Some(lo) = mirror_slot(offset) else {
            return Ok(None);
        };
        let hi = match size {
            4 => None,
            8 => match mirror_slot(offset.wrapping_add(4)) {
                Some(hi) => Some(hi),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let seq = self.region.u32_at(off::REG_SEQ);
        let mut spins = 0u32;
        loop {
            let s1 = seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let low = self.region.u32_at(slot_field(lo)).load(Ordering::Relaxed);
                let high = hi.map_or(0, |hi| {
                    self.region.u32_at(slot_field(hi)).load(Ordering::Relaxed)
                });
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) == s1 {
                    return Ok(Some(u64::from(low) | u64::from(high) << 32));
                }
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && Instant::now() >= deadline {
                return Err(SharedError::Broken(
                    "reg_seq stayed odd or kept moving past the read timeout".into(),
                ));
            }
            std::hint::spin_loop();
        }
    }

    /// Looks up an unprivileged data access (10.6): the output address on a hit.
    pub fn lookup(&self, sid: u32, ssid: Option<u32>, iova: u64, write: bool) -> Option<u64> {
        let base = entry_offset(tc_index(sid, ssid, iova));
        let at = |field: usize| base.wrapping_add(field);
        let seq = self.region.u32_at(at(field::SEQ));
        let s1 = seq.load(Ordering::Acquire);
        if s1 == 0 || s1 & 1 != 0 {
            return None;
        }
        let flags = self.region.u32_at(at(field::FLAGS)).load(Ordering::Relaxed);
        let e_sid = self.region.u32_at(at(field::SID)).load(Ordering::Relaxed);
        let e_ssid = self.region.u32_at(at(field::SSID)).load(Ordering::Relaxed);
        let e_iova = self.region.u64_at(at(field::IOVA)).load(Ordering::Relaxed);
        let out = self.region.u64_at(at(field::OUT)).load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) != s1 {
            return None;
        }
        let t = CachedTranslation::decode(flags, e_sid, e_ssid, e_iova, out)?;
        let allowed = if write { t.write } else { t.read };
        (t.sid == sid && t.ssid == ssid && allowed)
            .then(|| t.output(iova))
            .flatten()
    }
}
