//! Where everything is (docs/protocol.md, section 10.2).

/// The region's size in version 1.
pub const REGION_SIZE: usize = 0x10000;
/// The layout version.
pub const VERSION: u32 = 1;
/// `magic`: "VIOMMSHR" in memory, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VIOMMSHR");
/// Entries in the ring of posted writes.
pub const RING_ENTRIES: u32 = 256;

/// Field offsets.
pub mod off {
    /// `magic`, u64.
    pub const MAGIC: usize = 0x0000;
    /// `version`, u32.
    pub const VERSION: usize = 0x0008;
    /// `size`, u32.
    pub const SIZE: usize = 0x000c;
    /// `write_prod`, u32: frontend writes.
    pub const WRITE_PROD: usize = 0x0040;
    /// `frontend_wait`, u32: frontend writes (SHARED_TRANSLATE).
    pub const FRONTEND_WAIT: usize = 0x0044;
    /// `write_cons`, u32: backend writes.
    pub const WRITE_CONS: usize = 0x0080;
    /// `backend_idle`, u32: backend writes.
    pub const BACKEND_IDLE: usize = 0x0084;
    /// `reg_seq`, u32: backend writes.
    pub const REG_SEQ: usize = 0x00c0;
    /// `page0[128]`: registers 0x000..0x200.
    pub const PAGE0: usize = 0x0100;
    /// `page1[12]`: registers 0x100a0..0x100d0.
    pub const PAGE1: usize = 0x0300;
    /// `xlate_req`: frontend writes (SHARED_TRANSLATE, section 10.9).
    pub const XLATE_REQ: usize = 0x0400;
    /// `xlate_resp`: backend writes.
    pub const XLATE_RESP: usize = 0x0440;
    /// `state_seq`: backend writes (10.10).
    pub const STATE_SEQ: usize = 0x0480;
    /// `state[140]`: a copy of the register file, backend writes (10.10).
    pub const STATE: usize = 0x0500;
    /// `ring[256]`, 16 bytes each.
    pub const RING: usize = 0x1000;
    /// `tc[1792]`, 32 bytes each.
    pub const TC: usize = 0x2000;
}

/// The mirrored MMIO window of page 0: `[start, end)`.
pub const PAGE0_WINDOW: (u64, u64) = (0x000, 0x200);
/// The mirrored MMIO window of page 1: `[start, end)`.
pub const PAGE1_WINDOW: (u64, u64) = (0x100a0, 0x100d0);
/// Mirrored u32 slots: 128 of page 0, then 12 of page 1.
pub const MIRROR_SLOTS: usize = 128 + 12;

/// The mirror slot of the u32 register at MMIO offset `offset`, if it is mirrored.
pub fn mirror_slot(offset: u64) -> Option<usize> {
    let slot = |(start, end): (u64, u64), base: usize| {
        (start..end)
            .contains(&offset)
            .then(|| base.wrapping_add((offset.wrapping_sub(start) / 4) as usize))
    };
    slot(PAGE0_WINDOW, 0).or_else(|| slot(PAGE1_WINDOW, 128))
}

/// The MMIO offset of mirror slot `slot` (`slot` < [`MIRROR_SLOTS`]).
pub fn slot_offset(slot: usize) -> u64 {
    // Both windows are far below 2^32: nothing wraps for any slot < MIRROR_SLOTS.
    if slot < 128 {
        PAGE0_WINDOW.0.wrapping_add(4u64.wrapping_mul(slot as u64))
    } else {
        PAGE1_WINDOW
            .0
            .wrapping_add(4u64.wrapping_mul(slot.wrapping_sub(128) as u64))
    }
}

/// The region offset of mirror slot `slot`.
pub(crate) fn slot_field(slot: usize) -> usize {
    if slot < 128 {
        off::PAGE0.wrapping_add(4usize.wrapping_mul(slot))
    } else {
        off::PAGE1.wrapping_add(4usize.wrapping_mul(slot.wrapping_sub(128)))
    }
}

/// The region offset of slot `slot` of the register file's copy (`state`, 10.10).
pub(crate) fn state_field(slot: usize) -> usize {
    off::STATE.wrapping_add(4usize.wrapping_mul(slot))
}

/// The region offset of ring entry `index % RING_ENTRIES`, plus `field` (0, 4 or 8).
pub(crate) fn ring_field(index: u32, field: usize) -> usize {
    off::RING
        .wrapping_add(((index % RING_ENTRIES) as usize).wrapping_mul(16))
        .wrapping_add(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::assertions_on_constants)]
    fn fields_do_not_overlap_and_each_side_has_its_own_lines() {
        // Frontend-written: write_prod (line 1) and the ring; backend-written: write_cons and
        // backend_idle (line 2), reg_seq (line 3), the mirror and the cache.
        assert_eq!(off::WRITE_PROD / 64, 1);
        assert_eq!(off::FRONTEND_WAIT / 64, 1);
        assert_eq!(off::XLATE_REQ % 64, 0);
        assert_eq!(off::XLATE_RESP, off::XLATE_REQ + 64);
        assert!(off::PAGE1 + 12 * 4 <= off::XLATE_REQ);
        assert!(off::XLATE_RESP + 0x28 <= off::STATE_SEQ);
        assert_eq!(off::STATE_SEQ % 64, 0);
        assert_eq!(off::STATE % 64, 0);
        assert!(off::STATE + MIRROR_SLOTS * 4 <= off::RING);
        assert_eq!(off::WRITE_CONS / 64, 2);
        assert_eq!(off::BACKEND_IDLE / 64, 2);
        assert_eq!(off::REG_SEQ / 64, 3);
        assert_eq!(off::PAGE0, 0x100);
        assert_eq!(off::PAGE1, off::PAGE0 + 0x200);
        assert!(off::PAGE1 + 12 * 4 <= off::RING);
        assert_eq!(off::RING + RING_ENTRIES as usize * 16, off::TC);
        assert_eq!(off::TC + 1792 * 32, REGION_SIZE);
    }

    #[test]
    fn mirror_windows_are_the_specified_registers() {
        assert_eq!(mirror_slot(0x000), Some(0)); // SMMU_IDR0
        assert_eq!(mirror_slot(0x020), Some(8)); // SMMU_CR0
        assert_eq!(mirror_slot(0x09c), Some(39)); // SMMU_CMDQ_CONS
        assert_eq!(mirror_slot(0x1fc), Some(127));
        assert_eq!(mirror_slot(0x200), None);
        assert_eq!(mirror_slot(0x100a0), Some(128)); // page 1 starts its window here
        assert_eq!(mirror_slot(0x100a8), Some(130)); // SMMU_EVENTQ_PROD
        assert_eq!(mirror_slot(0x100cc), Some(139)); // SMMU_PRIQ_CONS
        assert_eq!(mirror_slot(0x100d0), None);
        assert_eq!(mirror_slot(0xfd0), None); // SMMU_PIDR4: not mirrored
        for slot in 0..MIRROR_SLOTS {
            assert_eq!(mirror_slot(slot_offset(slot)), Some(slot));
        }
        assert_eq!(MAGIC.to_le_bytes(), *b"VIOMMSHR");
        assert_eq!(MAGIC, 0x5248_534d_4d4f_4956);
    }
}
