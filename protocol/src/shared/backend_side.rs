//! The backend's half of the shared region's rules (docs/protocol.md, 10.3, 10.4 and 10.6).

use std::sync::atomic::fence;

use super::layout::{MIRROR_SLOTS, RING_ENTRIES, off, ring_field, slot_field, slot_offset};
use super::tcache::{self, CachedTranslation, TC_ENTRIES, TcEntry, entry_offset, field};
use super::{Ordering, Region, SharedError};

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
    mirror: [u32; MIRROR_SLOTS],
    published: bool,
    write_cons: u32,
    /// Times the backend announced a sleep: the value of `backend_idle` while asleep.
    sleeps: u32,
    tc: Vec<TcEntry>,
    /// Entries of `tc` holding a translation.
    live: usize,
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
    /// every cache entry is cleared, since a previous backend may have filled it.
    pub fn new(region: Region) -> Self {
        let write_cons = region.u32_at(off::WRITE_CONS).load(Ordering::Relaxed);
        let seq = region.u32_at(off::REG_SEQ).load(Ordering::Relaxed);
        let side = Self {
            region,
            // Continue from the count the frontend sees, even, so that a reader mid-section
            // notices the next update.
            reg_seq: seq.wrapping_add(1) & !1,
            mirror: [0; MIRROR_SLOTS],
            published: false,
            write_cons,
            sleeps: 0,
            live: 0,
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
        if prod != self.write_cons {
            self.woke();
            return false;
        }
        true
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
        if let Some(e) = self.tc.get_mut(index)
            && e.translation.replace(t).is_none()
        {
            self.live = self.live.saturating_add(1);
        }
    }

    /// Clears every entry whose translation `stale` says may be stale; returns how many. Costs
    /// nothing while the cache is empty.
    pub fn clear(&mut self, stale: impl Fn(&CachedTranslation) -> bool) -> usize {
        if self.live == 0 {
            return 0;
        }
        let mut cleared: usize = 0;
        for index in 0..TC_ENTRIES {
            let hit = self
                .tc
                .get(index)
                .and_then(|e| e.translation.as_ref())
                .is_some_and(&stale);
            if hit {
                self.write_entry(index, 0, 0, 0, 0, 0);
                if let Some(e) = self.tc.get_mut(index) {
                    e.translation = None;
                }
                cleared = cleared.saturating_add(1);
            }
        }
        self.live = self.live.saturating_sub(cleared);
        cleared
    }

    /// Entries holding a translation.
    pub fn cached(&self) -> usize {
        self.live
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
mod tests {
    use super::next_even;

    #[test]
    fn sequence_counts_skip_zero() {
        assert_eq!(next_even(0), 2);
        assert_eq!(next_even(1), 2);
        assert_eq!(next_even(0xffff_fffd), 0xffff_fffe);
        assert_eq!(next_even(0xffff_ffff), 2);
    }
}
