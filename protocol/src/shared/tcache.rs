//! The translation cache's entries (docs/protocol.md, section 10.6): where an entry lives and
//! what a valid one says.

/// Entries in the cache.
pub const TC_ENTRIES: usize = 1792;
/// Bytes per entry.
pub(crate) const TC_ENTRY_SIZE: usize = 32;

/// Entry field offsets.
pub(crate) mod field {
    pub const SEQ: usize = 0x00;
    pub const FLAGS: usize = 0x04;
    pub const SID: usize = 0x08;
    pub const SSID: usize = 0x0c;
    pub const IOVA: usize = 0x10;
    pub const OUT: usize = 0x18;
}

/// `flags` bit 0: the entry holds a translation.
pub(crate) const VALID: u32 = 1 << 0;
/// `flags` bit 1: the translation is of a substream.
pub(crate) const SSID_VALID: u32 = 1 << 1;
/// `flags` bit 2: reads are allowed.
pub(crate) const READ: u32 = 1 << 2;
/// `flags` bit 3: writes are allowed.
pub(crate) const WRITE: u32 = 1 << 3;
const KNOWN_FLAGS: u32 = VALID | SSID_VALID | READ | WRITE;

/// Smallest and largest block, as log2 of bytes.
pub(crate) const MIN_SIZE_LOG2: u32 = 12;
pub(crate) const MAX_SIZE_LOG2: u32 = 63;
/// An identity translation (larger than any block) is entered as a block of this size.
pub(crate) const IDENTITY_SIZE_LOG2: u32 = 39;

/// The offset mask of a block of `2^size_log2` bytes.
fn block_mask(size_log2: u32) -> u64 {
    1u64.checked_shl(size_log2)
        .map_or(u64::MAX, |size| size.wrapping_sub(1))
}

/// The index of the entry for (`sid`, `ssid`, the page of `iova`).
pub fn tc_index(sid: u32, ssid: Option<u32>, iova: u64) -> usize {
    let page = (iova >> 12) as u32;
    let h = sid.wrapping_mul(0x9e37_79b1) ^ ssid.unwrap_or(0).wrapping_mul(0x85eb_ca6b) ^ page;
    const ENTRIES: u32 = TC_ENTRIES as u32;
    (h % ENTRIES) as usize
}

/// The region offset of entry `index`.
pub(crate) fn entry_offset(index: usize) -> usize {
    super::off::TC.wrapping_add((index % TC_ENTRIES).wrapping_mul(TC_ENTRY_SIZE))
}

/// A translation as the cache holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedTranslation {
    /// The stream.
    pub sid: u32,
    /// The substream, if any.
    pub ssid: Option<u32>,
    /// The input base, aligned to the block size.
    pub base: u64,
    /// log2 of the block size, 12 to 63.
    pub size_log2: u32,
    /// The output base, aligned to the block size.
    pub out: u64,
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl CachedTranslation {
    /// The block's offset mask.
    pub fn mask(&self) -> u64 {
        block_mask(self.size_log2)
    }

    /// The output address of `iova`, if the block covers it.
    pub fn output(&self, iova: u64) -> Option<u64> {
        (iova & !self.mask() == self.base).then(|| self.out | (iova & self.mask()))
    }

    /// The translation of the page at `iova` from a block of `2^size_log2` bytes (64 for
    /// everything: an identity) whose output base is `out`, as the cache can hold it: a block
    /// beyond 2^63 bytes shrinks to the 2^39-byte block around `iova`. `None` if the block is
    /// smaller than a page.
    pub fn for_page(
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        size_log2: u32,
        out: u64,
        read: bool,
        write: bool,
    ) -> Option<Self> {
        if size_log2 < MIN_SIZE_LOG2 {
            return None;
        }
        let block_base = 1u64
            .checked_shl(size_log2)
            .map_or(0, |size| iova & !size.wrapping_sub(1));
        let size_log2 = if size_log2 > MAX_SIZE_LOG2 {
            IDENTITY_SIZE_LOG2
        } else {
            size_log2
        };
        let mask = block_mask(size_log2);
        let base = iova & !mask;
        Some(Self {
            sid,
            ssid,
            base,
            size_log2,
            out: out.wrapping_add(base.wrapping_sub(block_base)) & !mask,
            read,
            write,
        })
    }

    /// The raw `flags`, `iova` and `out` words.
    pub(crate) fn encode(&self) -> (u32, u64, u64) {
        let mut flags = VALID;
        if self.ssid.is_some() {
            flags |= SSID_VALID;
        }
        if self.read {
            flags |= READ;
        }
        if self.write {
            flags |= WRITE;
        }
        (flags, self.base | u64::from(self.size_log2), self.out)
    }

    /// Checks raw words read from the region (hostile): `None` unless they are a valid entry.
    pub(crate) fn decode(flags: u32, sid: u32, ssid: u32, iova: u64, out: u64) -> Option<Self> {
        if flags & VALID == 0 || flags & !KNOWN_FLAGS != 0 {
            return None;
        }
        let size_log2 = (iova & 0x3f) as u32;
        if !(MIN_SIZE_LOG2..=MAX_SIZE_LOG2).contains(&size_log2) || iova & 0xfc0 != 0 {
            return None;
        }
        let mask = block_mask(size_log2);
        let base = iova & !0xfff;
        if base & mask != 0 || out & mask != 0 {
            return None;
        }
        let ssid = if flags & SSID_VALID != 0 {
            Some(ssid)
        } else if ssid != 0 {
            return None;
        } else {
            None
        };
        Some(Self {
            sid,
            ssid,
            base,
            size_log2,
            out,
            read: flags & READ != 0,
            write: flags & WRITE != 0,
        })
    }
}

/// What the backend remembers of an entry it wrote (it never reads the region back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcEntry {
    /// The entry's sequence count as the backend last stored it.
    pub seq: u32,
    /// What it holds, if valid.
    pub translation: Option<CachedTranslation>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_the_specified_hash() {
        // (sid * 0x9e3779b1 ^ ssid * 0x85ebca6b ^ page) mod 1792, wrapping u32.
        assert_eq!(tc_index(0, None, 0), 0);
        assert_eq!(tc_index(0, None, 0x1000), 1);
        assert_eq!(tc_index(0, None, 1792 << 12), 0);
        assert_eq!(tc_index(1, None, 0), (0x9e37_79b1u32 % 1792) as usize);
        assert_eq!(
            tc_index(8, Some(3), 0xffff_f000),
            ((8u32.wrapping_mul(0x9e37_79b1) ^ 3u32.wrapping_mul(0x85eb_ca6b) ^ 0xfffff) % 1792)
                as usize
        );
        // Only the low 32 bits of the page number count.
        assert_eq!(tc_index(5, None, 1 << 44), tc_index(5, None, 0));
    }

    #[test]
    fn entries_round_trip_and_hostile_words_are_refused() {
        let t = CachedTranslation::for_page(8, None, 0xffff_3123, 21, 0x4020_0000, true, false)
            .unwrap();
        assert_eq!(t.base, 0xffe0_0000);
        assert_eq!(t.out, 0x4020_0000);
        assert_eq!(t.output(0xffff_3123), Some(0x403f_3123));
        assert_eq!(t.output(0x1_0000_0000), None);
        let (flags, iova, out) = t.encode();
        assert_eq!(flags, VALID | READ);
        assert_eq!(iova, 0xffe0_0000 | 21);
        assert_eq!(CachedTranslation::decode(flags, 8, 0, iova, out), Some(t));
        // An SSID without SSID_VALID, unknown flags, bad sizes, misaligned bases or outputs.
        assert_eq!(CachedTranslation::decode(flags, 8, 1, iova, out), None);
        assert_eq!(
            CachedTranslation::decode(flags | 1 << 4, 8, 0, iova, out),
            None
        );
        assert_eq!(
            CachedTranslation::decode(flags & !VALID, 8, 0, iova, out),
            None
        );
        assert_eq!(
            CachedTranslation::decode(flags, 8, 0, 0xffe0_0000 | 11, out),
            None
        );
        assert_eq!(
            CachedTranslation::decode(flags, 8, 0, 0xffe0_0000 | 64, out),
            None
        );
        assert_eq!(
            CachedTranslation::decode(flags, 8, 0, 0xffe0_1000 | 21, out),
            None
        );
        assert_eq!(
            CachedTranslation::decode(flags, 8, 0, iova, out | 0x1000),
            None
        );
        assert_eq!(
            CachedTranslation::decode(flags, 8, 0, iova | 0x40, out),
            None
        );
        // A 4 KiB page with an SSID.
        let p =
            CachedTranslation::for_page(1, Some(7), 0x1234_5678, 12, 0x9000, true, true).unwrap();
        let (flags, iova, out) = p.encode();
        assert_eq!(CachedTranslation::decode(flags, 1, 7, iova, out), Some(p));
        assert_eq!(p.output(0x1234_5fff), Some(0x9fff));
    }

    #[test]
    fn an_identity_is_entered_as_the_512_gib_block_around_the_page() {
        let t = CachedTranslation::for_page(0, None, 0x85_4321_0000, 64, 0, true, true).unwrap();
        assert_eq!(t.size_log2, 39);
        assert_eq!(t.base, 0x80_0000_0000);
        assert_eq!(t.out, 0x80_0000_0000);
        assert_eq!(t.output(0x85_4321_0abc), Some(0x85_4321_0abc));
        assert_eq!(
            CachedTranslation::for_page(0, None, 0, 11, 0, true, true),
            None
        );
    }
}
