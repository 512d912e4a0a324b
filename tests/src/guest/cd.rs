//! Context descriptors as Linux's `arm_smmu_make_s1_cd()` builds them, the bits a CD uses
//! (`arm_smmu_get_cd_used()`), and CD tables (linear, or 2-level with 4K or 64K leaves).

use super::alloc::BumpAllocator;
use super::bits::{bit, genmask, prep};
use super::entry::Entry;
use super::mem::{GuestRam, fill, write_u64};
use super::ste::{
    CdTablePtr, STRTAB_STE_0_S1FMT_4K_L2, STRTAB_STE_0_S1FMT_64K_L2, STRTAB_STE_0_S1FMT_LINEAR,
};
use super::{DriverError, Result};

pub const CTXDESC_CD_0_TCR_T0SZ: u64 = genmask(5, 0);
pub const CTXDESC_CD_0_TCR_TG0: u64 = genmask(7, 6);
pub const CTXDESC_CD_0_TCR_IRGN0: u64 = genmask(9, 8);
pub const CTXDESC_CD_0_TCR_ORGN0: u64 = genmask(11, 10);
pub const CTXDESC_CD_0_TCR_SH0: u64 = genmask(13, 12);
pub const CTXDESC_CD_0_TCR_EPD0: u64 = bit(14);
pub const CTXDESC_CD_0_ENDI: u64 = bit(15);
/// T1SZ, TG1, IR1, OR1, SH1 (spec; Linux keeps TTB1 disabled).
pub const CTXDESC_CD_0_TCR_T1SZ: u64 = genmask(21, 16);
pub const CTXDESC_CD_0_TCR_TG1: u64 = genmask(23, 22);
pub const CTXDESC_CD_0_TCR_IRGN1: u64 = genmask(25, 24);
pub const CTXDESC_CD_0_TCR_ORGN1: u64 = genmask(27, 26);
pub const CTXDESC_CD_0_TCR_SH1: u64 = genmask(29, 28);
pub const CTXDESC_CD_0_TCR_EPD1: u64 = bit(30);
pub const CTXDESC_CD_0_V: u64 = bit(31);
pub const CTXDESC_CD_0_TCR_IPS: u64 = genmask(34, 32);
/// AFFD (spec).
pub const CTXDESC_CD_0_AFFD: u64 = bit(35);
pub const CTXDESC_CD_0_TCR_TBI0: u64 = bit(38);
/// TBI1 (spec).
pub const CTXDESC_CD_0_TCR_TBI1: u64 = bit(39);
pub const CTXDESC_CD_0_AA64: u64 = bit(41);
pub const CTXDESC_CD_0_TCR_HD: u64 = bit(42);
pub const CTXDESC_CD_0_TCR_HA: u64 = bit(43);
pub const CTXDESC_CD_0_S: u64 = bit(44);
pub const CTXDESC_CD_0_R: u64 = bit(45);
pub const CTXDESC_CD_0_A: u64 = bit(46);
pub const CTXDESC_CD_0_ASET: u64 = bit(47);
pub const CTXDESC_CD_0_ASID: u64 = genmask(63, 48);
pub const CTXDESC_CD_1_TTB0_MASK: u64 = genmask(51, 4);
pub const CTXDESC_CD_2_TTB1_MASK: u64 = genmask(51, 4);

pub const CTXDESC_L1_DESC_V: u64 = bit(0);
pub const CTXDESC_L1_DESC_L2PTR_MASK: u64 = genmask(51, 12);
/// CDs per 64K leaf table (`CTXDESC_L2_ENTRIES`).
pub const CTXDESC_L2_ENTRIES: u32 = 1024;
/// CD size.
pub const CD_SIZE: u64 = 64;

/// The TCR-like fields of a stage-1 page table (`io_pgtable_cfg.arm_lpae_s1_cfg`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct S1Tcr {
    pub tsz: u8,
    /// TG0 encoding: 0 4K, 1 64K, 2 16K.
    pub tg: u8,
    pub irgn: u8,
    pub orgn: u8,
    pub sh: u8,
    /// IPS encoding (as IDR5.OAS).
    pub ips: u8,
    pub ttbr: u64,
    pub mair: u64,
}

/// `arm_smmu_make_s1_cd`: TTB0 translates, TTB1 disabled (EPD1), AA64, R, A, ASET.
pub fn make_s1_cd(tcr: &S1Tcr, asid: u16, stall: bool) -> Entry {
    let mut cd = [0u64; 8];
    cd[0] = prep(CTXDESC_CD_0_TCR_T0SZ, u64::from(tcr.tsz))
        | prep(CTXDESC_CD_0_TCR_TG0, u64::from(tcr.tg))
        | prep(CTXDESC_CD_0_TCR_IRGN0, u64::from(tcr.irgn))
        | prep(CTXDESC_CD_0_TCR_ORGN0, u64::from(tcr.orgn))
        | prep(CTXDESC_CD_0_TCR_SH0, u64::from(tcr.sh))
        | CTXDESC_CD_0_TCR_EPD1
        | CTXDESC_CD_0_V
        | prep(CTXDESC_CD_0_TCR_IPS, u64::from(tcr.ips))
        | CTXDESC_CD_0_AA64
        | if stall { CTXDESC_CD_0_S } else { 0 }
        | CTXDESC_CD_0_R
        | CTXDESC_CD_0_A
        | CTXDESC_CD_0_ASET
        | prep(CTXDESC_CD_0_ASID, u64::from(asid));
    cd[1] = tcr.ttbr & CTXDESC_CD_1_TTB0_MASK;
    cd[3] = tcr.mair;
    cd
}

/// Turns on TTB1 in a CD with the given table (TG1 uses its own encoding: 1 16K, 2 4K, 3 64K).
pub fn with_ttb1(mut cd: Entry, tcr: &S1Tcr) -> Entry {
    let tg1 = match tcr.tg {
        0 => 2,
        1 => 3,
        _ => 1,
    };
    cd[0] &= !(CTXDESC_CD_0_TCR_EPD1
        | CTXDESC_CD_0_TCR_T1SZ
        | CTXDESC_CD_0_TCR_TG1
        | CTXDESC_CD_0_TCR_IRGN1
        | CTXDESC_CD_0_TCR_ORGN1
        | CTXDESC_CD_0_TCR_SH1);
    cd[0] |= prep(CTXDESC_CD_0_TCR_T1SZ, u64::from(tcr.tsz))
        | prep(CTXDESC_CD_0_TCR_TG1, tg1)
        | prep(CTXDESC_CD_0_TCR_IRGN1, u64::from(tcr.irgn))
        | prep(CTXDESC_CD_0_TCR_ORGN1, u64::from(tcr.orgn))
        | prep(CTXDESC_CD_0_TCR_SH1, u64::from(tcr.sh));
    cd[2] = tcr.ttbr & CTXDESC_CD_2_TTB1_MASK;
    cd
}

/// `arm_smmu_get_cd_used`.
pub fn cd_used(ent: &Entry) -> Entry {
    let mut used = [0u64; 8];
    used[0] = CTXDESC_CD_0_V;
    if ent[0] & CTXDESC_CD_0_V == 0 {
        return used;
    }
    used = [u64::MAX; 8];
    if ent[0] & CTXDESC_CD_0_TCR_EPD0 != 0 {
        used[0] &= !(CTXDESC_CD_0_TCR_T0SZ
            | CTXDESC_CD_0_TCR_TG0
            | CTXDESC_CD_0_TCR_IRGN0
            | CTXDESC_CD_0_TCR_ORGN0
            | CTXDESC_CD_0_TCR_SH0);
        used[1] &= !CTXDESC_CD_1_TTB0_MASK;
    }
    used
}

/// The layout of a CD table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CdFmt {
    /// One table of 2^S1CDMax CDs (or the single CD when S1CDMax = 0).
    Linear,
    /// Level-1 descriptors to 4 KiB leaf tables of 64 CDs (S1Fmt = 0b01).
    TwoLevel4K,
    /// Level-1 descriptors to 64 KiB leaf tables of 1024 CDs (S1Fmt = 0b10, Linux's choice).
    TwoLevel64K,
}

impl CdFmt {
    /// log2 of the CDs in a leaf table.
    fn leaf_bits(self) -> u32 {
        match self {
            CdFmt::Linear => 0,
            CdFmt::TwoLevel4K => 6,
            CdFmt::TwoLevel64K => 10,
        }
    }

    /// The STE.S1Fmt encoding.
    pub fn s1fmt(self) -> u64 {
        match self {
            CdFmt::Linear => STRTAB_STE_0_S1FMT_LINEAR,
            CdFmt::TwoLevel4K => STRTAB_STE_0_S1FMT_4K_L2,
            CdFmt::TwoLevel64K => STRTAB_STE_0_S1FMT_64K_L2,
        }
    }
}

/// A CD table in guest RAM (`arm_smmu_ctx_desc_cfg`).
///
/// The table may be seen by the SMMU through stage 2: `view_offset` is added to every
/// guest-physical address the table hands to the SMMU (the STE's S1ContextPtr and the L1
/// descriptors' L2Ptr are then IPAs).
#[derive(Debug, Clone)]
pub struct CdTable {
    /// Layout.
    pub fmt: CdFmt,
    /// S1CDMax.
    pub s1cdmax: u8,
    /// PA of the linear table or the level-1 table.
    pub base: u64,
    /// PA of each leaf table, by level-1 index.
    pub l2: Vec<Option<u64>>,
    /// Added to PAs to form the addresses the SMMU is given.
    pub view_offset: u64,
}

impl CdTable {
    /// `arm_smmu_alloc_cd_tables`: a table for `2^s1cdmax` contexts, zeroed (every CD and L1
    /// descriptor invalid).
    pub fn new<M: GuestRam>(
        mem: &M,
        alloc: &mut BumpAllocator,
        fmt: CdFmt,
        s1cdmax: u8,
        view_offset: u64,
    ) -> Result<Self> {
        let contexts = 1u64
            .checked_shl(u32::from(s1cdmax))
            .ok_or(DriverError::InvalidArgument("S1CDMax too large"))?;
        let (bytes, l1_entries) = match fmt {
            CdFmt::Linear => (contexts.saturating_mul(CD_SIZE), 0),
            _ => {
                let per_leaf = 1u64 << fmt.leaf_bits();
                let l1 = contexts.div_ceil(per_leaf);
                (l1.saturating_mul(8), l1)
            }
        };
        let base = alloc.alloc(bytes, bytes.next_power_of_two().max(64))?;
        fill(mem, base, bytes, 0)?;
        Ok(Self {
            fmt,
            s1cdmax,
            base,
            l2: vec![None; usize::try_from(l1_entries).map_err(|_| DriverError::Overflow)?],
            view_offset,
        })
    }

    /// How an STE points at this table.
    pub fn ste_ptr(&self) -> CdTablePtr {
        CdTablePtr {
            ptr: self.base.wrapping_add(self.view_offset),
            s1fmt: self.fmt.s1fmt(),
            s1cdmax: self.s1cdmax,
        }
    }

    /// The level-1 descriptor address for `ssid` (2-level tables).
    pub fn l1_desc_addr(&self, ssid: u32) -> Result<u64> {
        let index = u64::from(ssid.checked_shr(self.fmt.leaf_bits()).unwrap_or(0));
        index
            .checked_mul(8)
            .and_then(|off| self.base.checked_add(off))
            .ok_or(DriverError::Overflow)
    }

    /// `arm_smmu_alloc_cd_ptr`: the PA of the CD for `ssid`, allocating its leaf table (and
    /// writing the L1 descriptor) if needed. The bool says whether an L1 descriptor was
    /// written, after which Linux syncs the CD with Leaf = 0.
    pub fn cd_addr<M: GuestRam>(
        &mut self,
        mem: &M,
        alloc: &mut BumpAllocator,
        ssid: u32,
    ) -> Result<(u64, bool)> {
        if self.fmt == CdFmt::Linear {
            let addr = u64::from(ssid)
                .checked_mul(CD_SIZE)
                .and_then(|off| self.base.checked_add(off))
                .ok_or(DriverError::Overflow)?;
            return Ok((addr, false));
        }
        let bits = self.fmt.leaf_bits();
        let index = usize::try_from(ssid.checked_shr(bits).unwrap_or(0))
            .map_err(|_| DriverError::Overflow)?;
        let slot = self
            .l2
            .get_mut(index)
            .ok_or(DriverError::InvalidArgument("SSID beyond the CD table"))?;
        let mut new_l1 = false;
        let leaf = match *slot {
            Some(leaf) => leaf,
            None => {
                let bytes = CD_SIZE << bits;
                let leaf = alloc.alloc(bytes, bytes)?;
                fill(mem, leaf, bytes, 0)?;
                *slot = Some(leaf);
                new_l1 = true;
                leaf
            }
        };
        if new_l1 {
            let desc = (leaf.wrapping_add(self.view_offset) & CTXDESC_L1_DESC_L2PTR_MASK)
                | CTXDESC_L1_DESC_V;
            write_u64(mem, self.l1_desc_addr(ssid)?, desc)?;
        }
        let within = u64::from(ssid) & ((1u64 << bits).wrapping_sub(1));
        let addr = within
            .checked_mul(CD_SIZE)
            .and_then(|off| leaf.checked_add(off))
            .ok_or(DriverError::Overflow)?;
        Ok((addr, new_l1))
    }
}
