//! The stream table: linear (`arm_smmu_init_strtab_linear`) or 2-level with SPLIT = 8 and
//! level-2 tables allocated on first use (`arm_smmu_init_strtab_2lvl`, `arm_smmu_init_l2_strtab`).

use super::alloc::BumpAllocator;
use super::bits::prep32;
use super::entry::Entry;
use super::mem::{GuestRam, write_u64};
use super::regs::{
    STRTAB_BASE_ADDR_MASK, STRTAB_BASE_CFG_FMT, STRTAB_BASE_CFG_FMT_2LVL,
    STRTAB_BASE_CFG_FMT_LINEAR, STRTAB_BASE_CFG_LOG2SIZE, STRTAB_BASE_CFG_SPLIT, STRTAB_BASE_RA,
};
use super::ste::{STRTAB_MAX_L1_ENTRIES, STRTAB_NUM_L2_STES, STRTAB_SPLIT, l1_desc};
use super::{DriverError, Result};

/// STE size.
pub const STE_SIZE: u64 = 64;

/// The stream table's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrtabLayout {
    /// 2^log2size STEs in one table.
    Linear {
        /// STRTAB_BASE_CFG.LOG2SIZE (= SIDSIZE).
        log2size: u32,
    },
    /// Level-1 descriptors to level-2 tables of 2^8 STEs.
    TwoLevel {
        /// Number of L1 descriptors.
        l1_entries: u32,
        /// PA of each level-2 table, by L1 index.
        l2: Vec<Option<u64>>,
    },
}

/// The stream table in guest RAM.
#[derive(Debug, Clone)]
pub struct StreamTable {
    /// PA of the linear table or the L1 table.
    pub base: u64,
    /// Layout.
    pub layout: StrtabLayout,
    /// The STE every new slot gets (`arm_smmu_init_initial_stes`: abort, or bypass when
    /// `disable_bypass` is off).
    pub initial: Entry,
}

fn write_initial<M: GuestRam>(mem: &M, addr: u64, count: u32, ste: &Entry) -> Result<()> {
    let one: Vec<u8> = ste.iter().flat_map(|w| w.to_le_bytes()).collect();
    let table = one.repeat(usize::try_from(count).map_err(|_| DriverError::Overflow)?);
    mem.write_slice(&table, vm_memory::GuestAddress(addr))
        .map_err(|_| DriverError::Memory { addr })
}

impl StreamTable {
    /// A linear table of `2^sid_bits` STEs, each set to `initial`.
    pub fn new_linear<M: GuestRam>(
        mem: &M,
        alloc: &mut BumpAllocator,
        sid_bits: u32,
        initial: Entry,
    ) -> Result<Self> {
        let count = 1u32
            .checked_shl(sid_bits)
            .ok_or(DriverError::InvalidArgument(
                "SIDSIZE too large for a linear table",
            ))?;
        let bytes = u64::from(count).saturating_mul(STE_SIZE);
        let base = alloc.alloc(bytes, bytes.max(4096))?;
        write_initial(mem, base, count, &initial)?;
        Ok(Self {
            base,
            layout: StrtabLayout::Linear { log2size: sid_bits },
            initial,
        })
    }

    /// A 2-level table covering `sid_bits` (capped at `STRTAB_MAX_L1_ENTRIES` descriptors),
    /// every L1 descriptor invalid.
    pub fn new_2lvl<M: GuestRam>(
        mem: &M,
        alloc: &mut BumpAllocator,
        sid_bits: u32,
        initial: Entry,
    ) -> Result<Self> {
        let last_sid = 1u64
            .checked_shl(sid_bits)
            .map_or(u64::from(u32::MAX), |v| v.wrapping_sub(1));
        let last_l1 = last_sid.checked_shr(STRTAB_SPLIT).unwrap_or(0);
        let l1_entries = u32::try_from(last_l1.saturating_add(1))
            .unwrap_or(u32::MAX)
            .min(STRTAB_MAX_L1_ENTRIES);
        let bytes = u64::from(l1_entries).saturating_mul(8);
        let base = alloc.alloc(bytes, bytes.max(4096))?;
        super::mem::fill(mem, base, bytes, 0)?;
        Ok(Self {
            base,
            layout: StrtabLayout::TwoLevel {
                l1_entries,
                l2: vec![None; usize::try_from(l1_entries).map_err(|_| DriverError::Overflow)?],
            },
            initial,
        })
    }

    /// The STRTAB_BASE value Linux writes.
    pub fn base_reg(&self) -> u64 {
        (self.base & STRTAB_BASE_ADDR_MASK) | STRTAB_BASE_RA
    }

    /// The STRTAB_BASE_CFG value Linux writes.
    pub fn cfg_reg(&self) -> u32 {
        match &self.layout {
            StrtabLayout::Linear { log2size } => {
                prep32(STRTAB_BASE_CFG_FMT, STRTAB_BASE_CFG_FMT_LINEAR)
                    | prep32(STRTAB_BASE_CFG_LOG2SIZE, *log2size)
            }
            StrtabLayout::TwoLevel { l1_entries, .. } => {
                prep32(STRTAB_BASE_CFG_FMT, STRTAB_BASE_CFG_FMT_2LVL)
                    | prep32(
                        STRTAB_BASE_CFG_LOG2SIZE,
                        l1_entries.ilog2().saturating_add(STRTAB_SPLIT),
                    )
                    | prep32(STRTAB_BASE_CFG_SPLIT, STRTAB_SPLIT)
            }
        }
    }

    /// The L1 descriptor address of `sid` (2-level tables).
    pub fn l1_desc_addr(&self, sid: u32) -> Result<u64> {
        u64::from(sid.checked_shr(STRTAB_SPLIT).unwrap_or(0))
            .checked_mul(8)
            .and_then(|off| self.base.checked_add(off))
            .ok_or(DriverError::Overflow)
    }

    /// The PA of `sid`'s STE, allocating its level-2 table (filled with the initial STE, then
    /// the L1 descriptor with Span = SPLIT + 1) on first use (`arm_smmu_init_l2_strtab`).
    pub fn ste_addr<M: GuestRam>(
        &mut self,
        mem: &M,
        alloc: &mut BumpAllocator,
        sid: u32,
    ) -> Result<u64> {
        let l1_addr = self.l1_desc_addr(sid)?;
        match &mut self.layout {
            StrtabLayout::Linear { log2size } => {
                if u64::from(sid).checked_shr(*log2size).unwrap_or(0) != 0 {
                    return Err(DriverError::InvalidArgument("StreamID beyond SIDSIZE"));
                }
                u64::from(sid)
                    .checked_mul(STE_SIZE)
                    .and_then(|off| self.base.checked_add(off))
                    .ok_or(DriverError::Overflow)
            }
            StrtabLayout::TwoLevel { l2, .. } => {
                let index = usize::try_from(sid.checked_shr(STRTAB_SPLIT).unwrap_or(0))
                    .map_err(|_| DriverError::Overflow)?;
                let slot = l2.get_mut(index).ok_or(DriverError::InvalidArgument(
                    "StreamID beyond the stream table",
                ))?;
                let table = match *slot {
                    Some(table) => table,
                    None => {
                        let bytes = u64::from(STRTAB_NUM_L2_STES).saturating_mul(STE_SIZE);
                        let table = alloc.alloc(bytes, bytes)?;
                        write_initial(mem, table, STRTAB_NUM_L2_STES, &self.initial)?;
                        write_u64(mem, l1_addr, l1_desc(table))?;
                        *slot = Some(table);
                        table
                    }
                };
                let within = u64::from(sid & STRTAB_NUM_L2_STES.wrapping_sub(1));
                within
                    .checked_mul(STE_SIZE)
                    .and_then(|off| table.checked_add(off))
                    .ok_or(DriverError::Overflow)
            }
        }
    }
}
