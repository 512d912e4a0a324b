//! Translation caches: the IOTLB, and the STE and CD configuration caches.
//!
//! Both are bounded: a cache that reaches its capacity is emptied (as QEMU's IOTLB is), which
//! costs re-walks but never correctness. Invalidation is exact in its scope (VMID, ASID,
//! address range); where the cache does not keep enough to decide (the intermediate IPA of a
//! nested translation), it invalidates more, never less.

use rustc_hash::FxHashMap;

use super::stream::{Context, StreamConfig};
use super::walk::Mapping;

/// Most IOTLB entries kept.
pub const IOTLB_CAPACITY: usize = 8192;
/// Most STE and most CD configurations kept.
pub const CONFIG_CAPACITY: usize = 4096;

/// Which translation regime an IOTLB entry belongs to: its tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TlbTag {
    /// VMID, for entries with stage 2.
    pub vmid: Option<u16>,
    /// ASID, for entries with stage 1.
    pub asid: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TlbKey {
    tag: TlbTag,
    /// Input address >> size_shift.
    frame: u64,
    size_shift: u8,
}

/// Most (frame, block size) lookups an address invalidation does one by one before it scans
/// the whole cache instead.
const DIRECT_REMOVAL_LIMIT: u64 = 64;

/// The IOTLB.
#[derive(Debug, Default)]
pub struct Iotlb {
    entries: FxHashMap<TlbKey, Mapping>,
    /// Bit n set: some entry has size_shift n.
    shifts: u64,
    /// Some entry may be global (a stage-1 leaf with nG = 0).
    has_global: bool,
}

impl Iotlb {
    /// The cached mapping of `input` (an IOVA, top byte already cleared where ignored).
    pub fn lookup(&self, tag: TlbTag, input: u64) -> Option<&Mapping> {
        let mut shifts = self.shifts;
        while shifts != 0 {
            let shift = shifts.trailing_zeros();
            shifts &= shifts.wrapping_sub(1);
            let key = TlbKey {
                tag,
                frame: input.checked_shr(shift).unwrap_or(0),
                size_shift: shift as u8,
            };
            if let Some(m) = self.entries.get(&key) {
                return Some(m);
            }
        }
        None
    }

    /// Caches a mapping.
    pub fn insert(&mut self, tag: TlbTag, mapping: Mapping) {
        if mapping.size_shift >= 64 {
            return;
        }
        if self.entries.len() >= IOTLB_CAPACITY {
            self.clear();
        }
        let key = TlbKey {
            tag,
            frame: mapping.input_base >> mapping.size_shift,
            size_shift: mapping.size_shift as u8,
        };
        self.shifts |= 1u64 << mapping.size_shift;
        self.has_global |= mapping.global;
        self.entries.insert(key, mapping);
    }

    /// Whether some entry may be global (matching every ASID).
    pub fn has_global(&self) -> bool {
        self.has_global
    }

    /// Drops the entries tagged `tag` whose block contains an address in `[start, last]`, by
    /// direct lookups. Returns false, dropping nothing, when the range spans too many blocks
    /// for that; the caller then scans with [`Iotlb::invalidate`].
    pub fn remove_range(&mut self, tag: TlbTag, start: u64, last: u64) -> bool {
        let mut lookups = 0u64;
        let mut shifts = self.shifts;
        while shifts != 0 {
            let shift = shifts.trailing_zeros();
            shifts &= shifts.wrapping_sub(1);
            let frames = (last >> shift).wrapping_sub(start >> shift);
            lookups = lookups.saturating_add(frames).saturating_add(1);
        }
        if lookups > DIRECT_REMOVAL_LIMIT {
            return false;
        }
        let mut shifts = self.shifts;
        while shifts != 0 {
            let shift = shifts.trailing_zeros();
            shifts &= shifts.wrapping_sub(1);
            for frame in (start >> shift)..=(last >> shift) {
                self.entries.remove(&TlbKey {
                    tag,
                    frame,
                    size_shift: shift as u8,
                });
            }
        }
        true
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.shifts = 0;
        self.has_global = false;
    }

    /// Drops the entries for which `stale(tag, mapping)` holds.
    pub fn invalidate(&mut self, mut stale: impl FnMut(&TlbTag, &Mapping) -> bool) {
        let mut has_global = false;
        self.entries.retain(|key, mapping| {
            let keep = !stale(&key.tag, mapping);
            has_global |= keep && mapping.global;
            keep
        });
        self.has_global = has_global;
        if self.entries.is_empty() {
            self.shifts = 0;
        }
    }
}

/// Whether a mapping's input block overlaps `[start, last]`.
pub fn overlaps(mapping: &Mapping, start: u64, last: u64) -> bool {
    let size = 1u64.checked_shl(mapping.size_shift).unwrap_or(0);
    let block_last = mapping.input_base.saturating_add(size.saturating_sub(1));
    mapping.input_base <= last && start <= block_last
}

/// Decoded configurations by StreamID, and CDs by (StreamID, SubstreamID).
#[derive(Debug, Default)]
pub struct ConfigCache {
    streams: FxHashMap<u32, StreamConfig>,
    contexts: FxHashMap<(u32, Option<u32>), Option<Context>>,
}

impl ConfigCache {
    /// A cached stream configuration.
    pub fn stream(&self, sid: u32) -> Option<&StreamConfig> {
        self.streams.get(&sid)
    }

    /// Caches a stream configuration.
    pub fn insert_stream(&mut self, sid: u32, config: StreamConfig) {
        if self.streams.len() >= CONFIG_CAPACITY {
            self.streams.clear();
        }
        self.streams.insert(sid, config);
    }

    /// A cached context (`Some(None)`: stage 1 bypassed for that substream).
    pub fn context(&self, sid: u32, ssid: Option<u32>) -> Option<&Option<Context>> {
        self.contexts.get(&(sid, ssid))
    }

    /// Caches a context.
    pub fn insert_context(&mut self, sid: u32, ssid: Option<u32>, context: Option<Context>) {
        if self.contexts.len() >= CONFIG_CAPACITY {
            self.contexts.clear();
        }
        self.contexts.insert((sid, ssid), context);
    }

    /// Invalidates the STEs (and their CDs) of StreamIDs in `[first, last]`.
    pub fn invalidate_streams(&mut self, first: u32, last: u32) {
        self.streams.retain(|sid, _| !(first..=last).contains(sid));
        self.contexts
            .retain(|(sid, _), _| !(first..=last).contains(sid));
    }

    /// Invalidates the CDs of one stream: all of them, or one substream's. A transaction
    /// without SubstreamID that uses CD 0 (S1DSS = SUBSTREAM0) is cached under `None`, so
    /// invalidating SubstreamID 0 drops that entry too.
    pub fn invalidate_contexts(&mut self, sid: u32, ssid: Option<u32>) {
        match ssid {
            None => self.contexts.retain(|(s, _), _| *s != sid),
            Some(0) => self
                .contexts
                .retain(|key, _| *key != (sid, Some(0)) && *key != (sid, None)),
            Some(n) => {
                self.contexts.remove(&(sid, Some(n)));
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.streams.clear();
        self.contexts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walk::Permissions;

    fn mapping(input_base: u64, size_shift: u32, global: bool) -> Mapping {
        Mapping {
            input_base,
            output_base: input_base ^ 0x1_0000_0000,
            size_shift,
            s1: Some(Permissions::default()),
            s2: None,
            global,
        }
    }

    const A: TlbTag = TlbTag {
        vmid: None,
        asid: Some(1),
    };
    const B: TlbTag = TlbTag {
        vmid: None,
        asid: Some(2),
    };

    #[test]
    fn lookup_finds_pages_and_blocks() {
        let mut tlb = Iotlb::default();
        tlb.insert(A, mapping(0x4000_0000, 21, false));
        tlb.insert(A, mapping(0x8000_1000, 12, false));
        assert_eq!(tlb.lookup(A, 0x401f_ffff).map(|m| m.size_shift), Some(21));
        assert_eq!(tlb.lookup(A, 0x8000_1fff).map(|m| m.size_shift), Some(12));
        assert!(tlb.lookup(A, 0x8000_2000).is_none());
        assert!(
            tlb.lookup(B, 0x4000_0000).is_none(),
            "tags keep ASIDs apart"
        );
    }

    #[test]
    fn direct_range_removal_is_exact_in_tag_and_range() {
        let mut tlb = Iotlb::default();
        for page in 0..8u64 {
            tlb.insert(A, mapping(0x1000 * page, 12, false));
            tlb.insert(B, mapping(0x1000 * page, 12, false));
        }
        tlb.insert(A, mapping(0x20_0000, 21, false));
        assert!(tlb.remove_range(A, 0x2000, 0x4fff));
        for page in 0..8u64 {
            let gone = (2..=4).contains(&page);
            assert_eq!(tlb.lookup(A, 0x1000 * page).is_none(), gone, "page {page}");
            assert!(
                tlb.lookup(B, 0x1000 * page).is_some(),
                "other ASID untouched"
            );
        }
        assert!(
            tlb.lookup(A, 0x20_0000).is_some(),
            "block outside the range kept"
        );
        // A range spanning a block's interior removes the block.
        assert!(tlb.remove_range(A, 0x21_0000, 0x21_0000));
        assert!(tlb.lookup(A, 0x20_0000).is_none());
        // Too many frames: refused, nothing dropped.
        assert!(!tlb.remove_range(B, 0, 0xfff_ffff));
        assert_eq!(tlb.len(), 5 + 8);
    }

    #[test]
    fn global_entries_are_tracked_until_dropped() {
        let mut tlb = Iotlb::default();
        tlb.insert(A, mapping(0x1000, 12, false));
        assert!(!tlb.has_global());
        tlb.insert(A, mapping(0x2000, 12, true));
        assert!(tlb.has_global());
        tlb.invalidate(|_, m| m.global);
        assert!(!tlb.has_global());
        assert_eq!(tlb.len(), 1);
    }

    #[test]
    fn capacity_bounds_the_cache() {
        let mut tlb = Iotlb::default();
        for i in 0..(IOTLB_CAPACITY as u64 + 10) {
            tlb.insert(A, mapping(i << 12, 12, false));
        }
        assert!(tlb.len() <= IOTLB_CAPACITY);
        assert!(
            tlb.lookup(A, (IOTLB_CAPACITY as u64 + 9) << 12).is_some(),
            "newest kept"
        );
    }
}
