//! The backend's half of the shared region's rules (docs/protocol.md, 10.3, 10.4 and 10.6).

use std::collections::BTreeSet;
use std::sync::atomic::fence;

use super::layout::{
    MIRROR_SLOTS, RING_ENTRIES, off, ring_field, slot_field, slot_offset, state_field,
};
use super::tcache::{self, CachedTranslation, TC_ENTRIES, TcEntry, entry_offset, field};
use super::xlate::{self, Answer};
use super::{Ordering, Region, SharedError};
use crate::error::DecodeError;
use crate::types::TranslateRequest;

/// A posted write as the ring holds it, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostedWrite {
    /// The MMIO offset.
    pub offset: u32,
    /// The access size in bytes.
    pub size: u32,
    /// The value.
    pub value: u64,
}

/// The backend's view: it writes the mirror, `write_cons`, `backend_idle` and the cache, and
/// reads only `write_prod` and the ring. Its own counters are the truth for what it wrote.
#[derive(Debug)]
pub struct BackendSide {
    region: Region,
    reg_seq: u32,
    /// `state_seq` as last stored (10.10).
    state_seq: u32,
    mirror: [u32; MIRROR_SLOTS],
    published: bool,
    write_cons: u32,
    /// Times the backend announced a sleep: the value of `backend_idle` while asleep.
    sleeps: u32,
    /// Whether translation requests come through the region (SHARED_TRANSLATE).
    requests: bool,
    /// The `xlate_req.seq` last answered (10.9).
    answered: u32,
    /// The `frontend_wait` value last called for.
    called: u32,
    tc: Vec<TcEntry>,
    /// The entries of `tc` holding a translation, by input base.
    by_base: BTreeSet<(u64, usize)>,
    /// log2 of the largest block entered since the cache was last empty.
    largest: u32,
}

/// The next even sequence count after `seq`, skipping 0 ("never written").
fn next_even(seq: u32) -> u32 {
    match seq.wrapping_add(2) & !1 {
        0 => 2,
        s => s,
    }
}

impl BackendSide {
    /// Takes over an adopted region: the ring is empty (checked by [`Region::adopt`]), and
    /// every cache entry is cleared, since a previous backend may have filled it. With
    /// `requests` (SHARED_TRANSLATE), translation requests are watched for too.
    pub fn new(region: Region, requests: bool) -> Self {
        // A request left from an earlier connection is not answered: its frontend gave up on
        // it when that connection ended.
        let answered = region.u32_at(xlate::req::SEQ).load(Ordering::Acquire);
        Self::take_over(region, requests, answered)
    }

    /// Takes over a region a backend that died left (10.10, [`Region::adopt_to_resume`]): the
    /// ring's writes are still to be applied, and a request not answered yet is answered.
    pub fn resume(region: Region, requests: bool) -> Self {
        let answered = region.u32_at(xlate::resp::SEQ).load(Ordering::Acquire);
        Self::take_over(region, requests, answered)
    }

    fn take_over(region: Region, requests: bool, answered: u32) -> Self {
        let write_cons = region.u32_at(off::WRITE_CONS).load(Ordering::Relaxed);
        let seq = region.u32_at(off::REG_SEQ).load(Ordering::Relaxed);
        let state_seq = region.u32_at(off::STATE_SEQ).load(Ordering::Relaxed);
        let side = Self {
            region,
            // Continue from the count the frontend sees, even, so that a reader mid-section
            // notices the next update.
            reg_seq: seq.wrapping_add(1) & !1,
            state_seq: state_seq.wrapping_add(1) & !1,
            mirror: [0; MIRROR_SLOTS],
            published: false,
            write_cons,
            sleeps: 0,
            requests,
            answered,
            called: 0,
            by_base: BTreeSet::new(),
            largest: 0,
            tc: vec![
                TcEntry {
                    seq: 0,
                    translation: None
                };
                TC_ENTRIES
            ],
        };
        for index in 0..TC_ENTRIES {
            side.u32(entry_offset(index).wrapping_add(field::SEQ))
                .store(0, Ordering::Release);
        }
        side.region
            .u32_at(off::BACKEND_IDLE)
            .store(0, Ordering::Relaxed);
        side
    }

    fn u32(&self, offset: usize) -> &std::sync::atomic::AtomicU32 {
        self.region.u32_at(offset)
    }

    /// Publishes the register file (10.3): `read(offset)` gives the u32 register at an MMIO
    /// offset. Only slots that changed since the last publication are stored, and nothing at
    /// all when none did. Returns whether anything was published.
    pub fn publish(&mut self, mut read: impl FnMut(u64) -> u32) -> bool {
        let mut next = [0u32; MIRROR_SLOTS];
        for (slot, value) in next.iter_mut().enumerate() {
            *value = read(slot_offset(slot));
        }
        if self.published && next == self.mirror {
            return false;
        }
        // The copy a resuming backend reads first (10.10), then the mirror.
        let odd = self.state_seq.wrapping_add(1);
        self.u32(off::STATE_SEQ).store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        for (slot, (&new, &old)) in next.iter().zip(self.mirror.iter()).enumerate() {
            if !self.published || new != old {
                self.region
                    .u32_at(state_field(slot))
                    .store(new, Ordering::Relaxed);
            }
        }
        self.state_seq = odd.wrapping_add(1);
        self.u32(off::STATE_SEQ)
            .store(self.state_seq, Ordering::Release);
        let odd = self.reg_seq.wrapping_add(1);
        self.u32(off::REG_SEQ).store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        for (slot, (&new, old)) in next.iter().zip(self.mirror.iter_mut()).enumerate() {
            if !self.published || new != *old {
                self.region
                    .u32_at(slot_field(slot))
                    .store(new, Ordering::Relaxed);
                *old = new;
            }
        }
        self.reg_seq = odd.wrapping_add(1);
        self.u32(off::REG_SEQ)
            .store(self.reg_seq, Ordering::Release);
        self.published = true;
        true
    }

    /// The register file a backend that died left (10.10): the copy in `state` if its count
    /// is even, else the mirror (the copy was being written, so the mirror was not), as u32
    /// slots, `page0` then `page1`. Read before this side publishes anything.
    pub fn saved_registers(&self) -> [u32; MIRROR_SLOTS] {
        let copy_complete = self.u32(off::STATE_SEQ).load(Ordering::Acquire) & 1 == 0;
        let mut file = [0u32; MIRROR_SLOTS];
        for (slot, value) in file.iter_mut().enumerate() {
            let at = if copy_complete {
                state_field(slot)
            } else {
                slot_field(slot)
            };
            *value = self.region.u32_at(at).load(Ordering::Relaxed);
        }
        file
    }

    /// The next posted write, if the frontend produced one (10.4 step 1 and 2). The caller
    /// validates and applies it, publishes, then calls [`BackendSide::complete_write`].
    pub fn next_write(&self) -> Result<Option<PostedWrite>, SharedError> {
        let prod = self.u32(off::WRITE_PROD).load(Ordering::Acquire);
        let pending = prod.wrapping_sub(self.write_cons);
        if pending > RING_ENTRIES {
            return Err(SharedError::Broken(format!(
                "write_prod {prod} is {pending} entries ahead of write_cons {}",
                self.write_cons
            )));
        }
        if pending == 0 {
            return Ok(None);
        }
        let at = |field| ring_field(self.write_cons, field);
        Ok(Some(PostedWrite {
            offset: self.u32(at(0)).load(Ordering::Relaxed),
            size: self.u32(at(4)).load(Ordering::Relaxed),
            value: self.region.u64_at(at(8)).load(Ordering::Relaxed),
        }))
    }

    /// Posted writes waiting to be applied (at most a ring's worth; for the log).
    pub fn writes_waiting(&self) -> u32 {
        self.u32(off::WRITE_PROD)
            .load(Ordering::Relaxed)
            .wrapping_sub(self.write_cons)
            .min(RING_ENTRIES)
    }

    /// Whether `write_prod` moved past the writes applied (a relaxed load: for polling only;
    /// [`BackendSide::next_write`] orders the entries' loads).
    pub fn writes_posted(&self) -> bool {
        self.u32(off::WRITE_PROD).load(Ordering::Relaxed) != self.write_cons
    }

    /// The write [`BackendSide::next_write`] returned is applied completely.
    pub fn complete_write(&mut self) {
        self.write_cons = self.write_cons.wrapping_add(1);
        self.u32(off::WRITE_CONS)
            .store(self.write_cons, Ordering::Release);
    }

    /// Posted writes applied so far (free-running).
    pub fn write_cons(&self) -> u32 {
        self.write_cons
    }

    /// Before sleeping (10.4 step 3): announces the sleep, then checks once more. `false`
    /// means a write arrived meanwhile: the backend must not sleep, and is marked awake again.
    pub fn prepare_to_sleep(&mut self) -> bool {
        // A new non-zero value for every sleep, so that the frontend kicks once per sleep.
        self.sleeps = match self.sleeps.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        self.u32(off::BACKEND_IDLE)
            .store(self.sleeps, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let prod = self.u32(off::WRITE_PROD).load(Ordering::Relaxed);
        if prod != self.write_cons || self.translation_requested() {
            self.woke();
            return false;
        }
        true
    }

    /// Whether a translation request waits (a relaxed load: for polling only;
    /// [`BackendSide::next_request`] orders the payload's loads).
    pub fn translation_requested(&self) -> bool {
        self.requests && self.u32(xlate::req::SEQ).load(Ordering::Relaxed) != self.answered
    }

    /// The waiting translation request (10.9), decoded as a TRANSLATE payload: its number,
    /// and the request or what is wrong with it. The caller answers it with
    /// [`BackendSide::answer`].
    pub fn next_request(&self) -> Option<(u32, Result<TranslateRequest, DecodeError>)> {
        if !self.requests {
            return None;
        }
        let seq = self.u32(xlate::req::SEQ).load(Ordering::Acquire);
        (seq != self.answered).then(|| (seq, xlate::load_request(&self.region)))
    }

    /// Answers request `seq`: the fields, then `xlate_resp.seq` with release ordering. The
    /// caller then calls the frontend if it waits ([`BackendSide::frontend_waits`]).
    pub fn answer(&mut self, seq: u32, answer: &Answer) {
        xlate::store_answer(&self.region, answer);
        self.u32(xlate::resp::SEQ).store(seq, Ordering::Release);
        self.answered = seq;
    }

    /// After an answer or applied writes: whether the frontend announced a wait it has not
    /// been called for (10.9), in which case the caller writes the call eventfd.
    pub fn frontend_waits(&mut self) -> bool {
        fence(Ordering::SeqCst);
        let wait = self.u32(off::FRONTEND_WAIT).load(Ordering::Relaxed);
        if wait != 0 && wait != self.called {
            self.called = wait;
            return true;
        }
        false
    }

    /// After a wake-up: the frontend need not kick until the next [`prepare_to_sleep`].
    ///
    /// [`prepare_to_sleep`]: BackendSide::prepare_to_sleep
    pub fn woke(&self) {
        self.u32(off::BACKEND_IDLE).store(0, Ordering::Relaxed);
    }

    /// Fills the entry of the page at `page_iova` with `t` (10.6), under the entry's sequence
    /// count.
    pub fn fill(&mut self, page_iova: u64, t: CachedTranslation) {
        let index = tcache::tc_index(t.sid, t.ssid, page_iova);
        let (flags, iova, out) = t.encode();
        self.write_entry(index, flags, t.sid, t.ssid.unwrap_or(0), iova, out);
        if let Some(e) = self.tc.get_mut(index) {
            if let Some(old) = e.translation.replace(t) {
                self.by_base.remove(&(old.base, index));
            }
            self.by_base.insert((t.base, index));
            self.largest = self.largest.max(t.size_log2);
        }
    }

    /// Clears every entry whose translation `stale` says may be stale (a walk over the whole
    /// cache); returns how many. Costs nothing while the cache is empty.
    pub fn clear(&mut self, stale: impl Fn(&CachedTranslation) -> bool) -> usize {
        if self.by_base.is_empty() {
            return 0;
        }
        let hits: Vec<usize> = self
            .by_base
            .iter()
            .filter(|&&(_, index)| {
                self.tc
                    .get(index)
                    .and_then(|e| e.translation.as_ref())
                    .is_some_and(&stale)
            })
            .map(|&(_, index)| index)
            .collect();
        self.clear_entries(&hits)
    }

    /// Clears the entries whose block meets one of the input `ranges` (`[start, last]`, any
    /// stream), finding them by their input base rather than walking the cache: a TLBI of a
    /// page costs a lookup, not 1792 comparisons.
    pub fn clear_ranges(&mut self, ranges: &[(u64, u64)]) -> usize {
        if self.by_base.is_empty() {
            return 0;
        }
        // A block that meets [start, last] starts at most one largest block below start.
        let reach = 1u64
            .checked_shl(self.largest)
            .map_or(u64::MAX, |size| size.wrapping_sub(1));
        let mut hits = Vec::new();
        for &(start, last) in ranges {
            let from = start.saturating_sub(reach);
            for &(base, index) in self.by_base.range((from, 0)..=(last, usize::MAX)) {
                let meets = self
                    .tc
                    .get(index)
                    .and_then(|e| e.translation.as_ref())
                    .is_some_and(|t| t.base <= last && t.base | t.mask() >= start);
                if meets && base <= last {
                    hits.push(index);
                }
            }
        }
        hits.sort_unstable();
        hits.dedup();
        self.clear_entries(&hits)
    }

    fn clear_entries(&mut self, indexes: &[usize]) -> usize {
        for &index in indexes {
            self.write_entry(index, 0, 0, 0, 0, 0);
            if let Some(old) = self.tc.get_mut(index).and_then(|e| e.translation.take()) {
                self.by_base.remove(&(old.base, index));
            }
        }
        if self.by_base.is_empty() {
            self.largest = 0;
        }
        indexes.len()
    }

    /// Entries holding a translation.
    pub fn cached(&self) -> usize {
        self.by_base.len()
    }

    fn write_entry(&mut self, index: usize, flags: u32, sid: u32, ssid: u32, iova: u64, out: u64) {
        let at = |field: usize| entry_offset(index).wrapping_add(field);
        let Some(entry) = self.tc.get_mut(index) else {
            return;
        };
        let odd = entry.seq.wrapping_add(1) | 1;
        let even = next_even(odd);
        entry.seq = even;
        let region = &self.region;
        region.u32_at(at(field::SEQ)).store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        region
            .u32_at(at(field::FLAGS))
            .store(flags, Ordering::Relaxed);
        region.u32_at(at(field::SID)).store(sid, Ordering::Relaxed);
        region
            .u32_at(at(field::SSID))
            .store(ssid, Ordering::Relaxed);
        region
            .u64_at(at(field::IOVA))
            .store(iova, Ordering::Relaxed);
        region.u64_at(at(field::OUT)).store(out, Ordering::Relaxed);
        region.u32_at(at(field::SEQ)).store(even, Ordering::Release);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]
mod tests {
    use proptest::prelude::*;

    use super::{BackendSide, next_even};
    use crate::shared::{CachedTranslation, Region};

    fn side() -> BackendSide {
        let region = Region::create().unwrap();
        let fd = region.fd().try_clone_to_owned().unwrap();
        BackendSide::new(Region::adopt(fd).unwrap(), true)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Clearing by input base finds exactly the entries the walk over the whole cache
        /// finds, for pages, 64 KiB and 2 MiB blocks and any ranges.
        #[test]
        fn clearing_by_base_clears_what_a_full_walk_clears(
            fills in prop::collection::vec((0u64..4096, 0usize..3, 0u32..4), 1..200),
            ranges in prop::collection::vec((0u64..4096, 0u64..600), 1..4),
        ) {
            let (mut by_base, mut walk) = (side(), side());
            for &(page, size, sid) in &fills {
                let size_log2 = [12, 16, 21][size];
                let iova = page << 12;
                let t = CachedTranslation::for_page(sid, None, iova, size_log2, 0x8000_0000, true, true)
                    .unwrap();
                by_base.fill(iova, t);
                walk.fill(iova, t);
            }
            let ranges: Vec<(u64, u64)> = ranges
                .iter()
                .map(|&(page, pages)| (page << 12, ((page + pages) << 12) | 0xfff))
                .collect();
            let n = by_base.clear_ranges(&ranges);
            let m = walk.clear(|t| {
                ranges
                    .iter()
                    .any(|&(start, last)| t.base <= last && t.base | t.mask() >= start)
            });
            prop_assert_eq!(n, m);
            prop_assert_eq!(by_base.cached(), walk.cached());
            let left = |s: &BackendSide| -> Vec<_> {
                s.tc.iter().map(|e| e.translation).collect()
            };
            prop_assert_eq!(left(&by_base), left(&walk));
        }
    }

    /// A backend that dies in the middle of a publication leaves a complete register file
    /// either way (10.10): the copy when it finished it, else the mirror, which it had not
    /// touched yet.
    #[test]
    fn a_publication_torn_by_death_leaves_a_complete_register_file() {
        use crate::shared::layout::{off, state_field};
        use crate::shared::{MIRROR_SLOTS, Ordering};
        let region = Region::create().unwrap();
        let fd = region.fd().try_clone_to_owned().unwrap();
        let mut back = BackendSide::new(Region::adopt(fd).unwrap(), true);
        back.publish(|offset| offset as u32 | 1);
        back.publish(|offset| offset as u32 | 2);
        let resumed = |region: &Region| {
            let fd = region.fd().try_clone_to_owned().unwrap();
            BackendSide::resume(Region::adopt_to_resume(fd).unwrap(), true).saved_registers()
        };
        let second: Vec<u32> = (0..MIRROR_SLOTS)
            .map(|slot| crate::shared::slot_offset(slot) as u32 | 2)
            .collect();
        assert_eq!(resumed(&region).to_vec(), second);
        // Death while copying the third publication: state_seq odd, half the copy new.
        let seq = region.u32_at(off::STATE_SEQ).load(Ordering::Relaxed);
        region
            .u32_at(off::STATE_SEQ)
            .store(seq.wrapping_add(1), Ordering::Relaxed);
        for slot in 0..MIRROR_SLOTS / 2 {
            region
                .u32_at(state_field(slot))
                .store(0xdead, Ordering::Relaxed);
        }
        assert_eq!(resumed(&region).to_vec(), second, "the mirror, untouched");
    }

    #[test]
    fn sequence_counts_skip_zero() {
        assert_eq!(next_even(0), 2);
        assert_eq!(next_even(1), 2);
        assert_eq!(next_even(0xffff_fffd), 0xffff_fffe);
        assert_eq!(next_even(0xffff_ffff), 2);
    }
}
