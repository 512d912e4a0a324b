//! What the frontend may have cached: the input-address ranges of the TRANSLATE answers given
//! to each device since they were last invalidated.
//!
//! IOTLB_INVALIDATE is a round trip on the backend channel that a CMD_SYNC must wait for. Most
//! of the guest's invalidations concern translations the frontend never asked for (devices
//! behind iommufd, mappings not yet used, Linux's boot-time CFGI_ALL and TLBI_NSNH_ALL): those
//! need no message. The record is conservative: it may claim more than the frontend holds
//! (then a message is sent that was not needed), never less.

use std::collections::BTreeMap;

/// Most disjoint ranges kept per device; past that they merge into their hull.
pub const MAX_RANGES: usize = 1024;

/// Disjoint inclusive ranges `start..=last`, keyed by `start`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ranges {
    map: BTreeMap<u64, u64>,
}

impl Ranges {
    fn insert(&mut self, start: u64, last: u64) {
        let (mut start, mut last) = (start.min(last), start.max(last));
        // Absorb every range that overlaps or touches [start, last].
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=last.saturating_add(1))
            .rev()
            .take_while(|&(_, &l)| l.saturating_add(1) >= start)
            .map(|(&s, &l)| (s, l))
            .collect();
        for (s, l) in touching {
            self.map.remove(&s);
            start = start.min(s);
            last = last.max(l);
        }
        self.map.insert(start, last);
        if self.map.len() > MAX_RANGES {
            let first = self.map.keys().next().copied().unwrap_or(start);
            let end = self.map.values().max().copied().unwrap_or(last);
            self.map.clear();
            self.map.insert(first, end);
        }
    }

    fn intersects(&self, start: u64, last: u64) -> bool {
        self.map
            .range(..=last)
            .next_back()
            .is_some_and(|(_, &l)| l >= start)
    }

    /// Removes `[start, last]`; returns whether anything was there.
    fn remove(&mut self, start: u64, last: u64) -> bool {
        let hit: Vec<(u64, u64)> = self
            .map
            .range(..=last)
            .rev()
            .take_while(|&(_, &l)| l >= start)
            .map(|(&s, &l)| (s, l))
            .collect();
        for &(s, l) in &hit {
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, start.saturating_sub(1));
            }
            if l > last {
                self.map.insert(last.saturating_add(1), l);
            }
        }
        !hit.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The ranges per device handle, and for answers given for a stream no attached device had
/// (the frontend caches those under a device the backend does not know).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HandedOut {
    devices: BTreeMap<u32, Ranges>,
    unattributed: Ranges,
    /// Size minus one of the largest translation handed out (translations are naturally
    /// aligned powers of two).
    largest_mask: u64,
}

impl HandedOut {
    /// A TRANSLATE answer for `[start, last]` went to `handle` (`None`: unknown device).
    pub fn record(&mut self, handle: Option<u32>, start: u64, last: u64) {
        self.largest_mask = self.largest_mask.max(last.saturating_sub(start));
        match handle {
            Some(h) => self.devices.entry(h).or_default().insert(start, last),
            None => self.unattributed.insert(start, last),
        }
    }

    /// Translations of `[start, last]` went stale for every device. Returns whether the
    /// frontend may hold any (and forgets them).
    pub fn invalidate_all(&mut self, start: u64, last: u64) -> bool {
        let mut any = self.unattributed.remove(start, last);
        for ranges in self.devices.values_mut() {
            any |= ranges.remove(start, last);
        }
        self.devices.retain(|_, r| !r.is_empty());
        any
    }

    /// Every translation of `handle` went stale. Returns whether the frontend may hold any.
    /// Unattributed answers may belong to this device too, so they count (and are kept).
    pub fn invalidate_device(&mut self, handle: u32) -> bool {
        let had = self.devices.remove(&handle).is_some();
        had || !self.unattributed.is_empty()
    }

    /// Whether anything may be cached for `[start, last]`.
    pub fn may_hold(&self, start: u64, last: u64) -> bool {
        self.unattributed.intersects(start, last)
            || self.devices.values().any(|r| r.intersects(start, last))
    }

    /// The input range of every translation handed out that can contain `address`: what a
    /// TLBI by address without a range (TG = 0) invalidates, the translation containing the
    /// address, whatever its size. Every translation handed out is a naturally aligned block
    /// no larger than the largest one, so the aligned block of that size around `address`
    /// covers it.
    pub fn containing(&self, address: u64) -> (u64, u64) {
        let mask = self.largest_mask.max(PAGE_MASK);
        (address & !mask, address | mask)
    }

    /// Forgets everything (the frontend dropped its whole cache).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The smallest translation granule, 4 KiB, as a mask.
const PAGE_MASK: u64 = 0xfff;

/// Ranges closer than this merge (the smallest translation granule): a TLBI by address names
/// one address of each page, and Linux unmaps runs of pages.
pub const MERGE_GAP: u64 = 0x1000;

/// Sorts and merges inclusive ranges that overlap or lie less than [`MERGE_GAP`] apart.
/// Merging only widens an invalidation, which is always allowed: the frontend drops a little
/// more of its cache and asks again.
pub fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, last) in ranges {
        match out.last_mut() {
            Some(prev) if start <= prev.1.saturating_add(MERGE_GAP) => prev.1 = prev.1.max(last),
            _ => out.push((start, last)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_split_and_intersect() {
        let mut r = Ranges::default();
        r.insert(0x1000, 0x1fff);
        r.insert(0x3000, 0x3fff);
        r.insert(0x2000, 0x2fff); // touches both: one range
        assert_eq!(r.map.len(), 1);
        assert!(r.intersects(0x2800, 0x2800));
        assert!(!r.intersects(0x4000, 0x5000));
        assert!(r.remove(0x2000, 0x2fff));
        assert_eq!(
            r.map.iter().map(|(&s, &l)| (s, l)).collect::<Vec<_>>(),
            vec![(0x1000, 0x1fff), (0x3000, 0x3fff)]
        );
        assert!(!r.remove(0x2000, 0x2fff), "nothing left there");
        assert!(r.remove(0, u64::MAX));
        assert!(r.is_empty());
    }

    #[test]
    fn ranges_at_the_top_of_the_address_space() {
        let mut r = Ranges::default();
        r.insert(u64::MAX - 0xfff, u64::MAX);
        r.insert(0, 0xfff);
        assert!(r.intersects(u64::MAX, u64::MAX));
        assert!(r.remove(u64::MAX - 0x7ff, u64::MAX));
        assert!(r.intersects(u64::MAX - 0xfff, u64::MAX - 0x800));
        assert!(!r.intersects(u64::MAX - 0x7ff, u64::MAX));
    }

    #[test]
    fn too_many_ranges_collapse_to_a_superset() {
        let mut r = Ranges::default();
        for i in 0..(MAX_RANGES as u64 + 10) {
            r.insert(i * 0x2000, i * 0x2000 + 0xfff);
        }
        assert!(r.map.len() <= MAX_RANGES);
        // Every page ever recorded still counts as possibly cached.
        for i in 0..(MAX_RANGES as u64 + 10) {
            assert!(r.intersects(i * 0x2000, i * 0x2000), "page {i}");
        }
    }

    #[test]
    fn handed_out_per_device_and_unattributed() {
        let mut h = HandedOut::default();
        assert!(!h.invalidate_all(0, u64::MAX), "nothing handed out yet");
        h.record(Some(1), 0x1000, 0x1fff);
        assert!(!h.invalidate_all(0x5000, 0x5fff));
        assert!(h.invalidate_all(0x1800, 0x1800));
        assert!(!h.may_hold(0x1800, 0x1800));
        assert!(h.may_hold(0x1000, 0x17ff), "the rest of the page is kept");
        assert!(h.invalidate_device(1));
        assert!(!h.invalidate_device(1));
        h.record(None, 0x4000, 0x4fff);
        assert!(
            h.invalidate_device(7),
            "unknown answers may be any device's"
        );
        assert!(h.invalidate_all(0, u64::MAX));
        assert!(!h.invalidate_device(7));
    }

    #[test]
    fn a_single_address_stands_for_the_translations_that_contain_it() {
        let mut h = HandedOut::default();
        assert_eq!(h.containing(0x1234), (0x1000, 0x1fff), "at least a page");
        h.record(Some(1), 0x1_0000, 0x1_ffff); // a 64 KiB translation
        assert_eq!(h.containing(0x1_2345), (0x1_0000, 0x1_ffff));
        h.record(Some(2), 0x20_0000, 0x3f_ffff); // a 2 MiB block
        assert_eq!(h.containing(0x21_2345), (0x20_0000, 0x3f_ffff));
        h.record(None, 0, u64::MAX); // an identity answer of a bypassing stream
        assert_eq!(h.containing(0x21_2345), (0, u64::MAX));
    }

    #[test]
    fn coalesce_merges_tlbi_addresses_of_consecutive_pages() {
        // 63 TLBI_NH_VA of consecutive 4K pages: one range from the first to the last address.
        let points: Vec<(u64, u64)> = (0..63u64)
            .map(|i| (0x10_0000 + i * 0x1000, 0x10_0000 + i * 0x1000))
            .collect();
        assert_eq!(coalesce(points), vec![(0x10_0000, 0x13_e000)]);
        // Pages two apart stay separate.
        assert_eq!(
            coalesce(vec![(0x1000, 0x1000), (0x3000, 0x3000)]),
            vec![(0x1000, 0x1000), (0x3000, 0x3000)]
        );
    }

    #[test]
    fn coalesce_merges_adjacent_pages() {
        let pages: Vec<(u64, u64)> = (0..63u64)
            .rev()
            .map(|i| (0x10_0000 + i * 0x1000, 0x10_0000 + i * 0x1000 + 0xfff))
            .collect();
        assert_eq!(coalesce(pages), vec![(0x10_0000, 0x13_efff)]);
        assert_eq!(
            coalesce(vec![
                (0x10_000, 0x10_fff),
                (0, 0xfff),
                (0x1000, 0x1fff),
                (0x20_000, 0x20_fff)
            ]),
            vec![(0, 0x1fff), (0x10_000, 0x10_fff), (0x20_000, 0x20_fff)]
        );
        assert_eq!(coalesce(vec![(0, u64::MAX), (5, 5)]), vec![(0, u64::MAX)]);
    }
}
