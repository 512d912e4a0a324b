//! Page tables in the style of Linux's io-pgtable-arm (`ARM_64_LPAE_S1` / `ARM_64_LPAE_S2`):
//! 4K, 16K and 64K granules, pages and blocks, the start level io-pgtable picks for an input
//! size (with stage-2 concatenation at level 1), and the descriptor bits it writes.

use super::alloc::BumpAllocator;
use super::bits::{bit, genmask, low_mask};
use super::cd::S1Tcr;
use super::mem::{GuestRam, fill, read_u64, write_u64};
use super::ste::Vtcr;
use super::{DriverError, Result};

/// `IOMMU_*` protection flags.
#[allow(missing_docs)]
pub mod prot {
    pub const READ: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const CACHE: u32 = 1 << 2;
    pub const NOEXEC: u32 = 1 << 3;
    pub const MMIO: u32 = 1 << 4;
    pub const PRIV: u32 = 1 << 5;
    /// Read/write cacheable memory, what DMA mappings use.
    pub const RW: u32 = READ | WRITE | CACHE;
}

pub const ARM_LPAE_PTE_TYPE_MASK: u64 = 3;
pub const ARM_LPAE_PTE_TYPE_BLOCK: u64 = 1;
pub const ARM_LPAE_PTE_TYPE_TABLE: u64 = 3;
pub const ARM_LPAE_PTE_TYPE_PAGE: u64 = 3;
pub const ARM_LPAE_PTE_NSTABLE: u64 = bit(63);
/// UXN | PXN (stage 1); XN (stage 2 bit 54, bit 53 ignored without FEAT_XNX).
pub const ARM_LPAE_PTE_XN: u64 = 3 << 53;
pub const ARM_LPAE_PTE_DBM: u64 = bit(51);
pub const ARM_LPAE_PTE_AF: u64 = bit(10);
pub const ARM_LPAE_PTE_SH_NS: u64 = 0;
pub const ARM_LPAE_PTE_SH_OS: u64 = 2 << 8;
pub const ARM_LPAE_PTE_SH_IS: u64 = 3 << 8;
pub const ARM_LPAE_PTE_NS: u64 = bit(5);
pub const ARM_LPAE_PTE_VALID: u64 = bit(0);
pub const ARM_LPAE_PTE_NG: u64 = bit(11);
pub const ARM_LPAE_PTE_AP_UNPRIV: u64 = 1 << 6;
pub const ARM_LPAE_PTE_AP_RDONLY: u64 = 2 << 6;
pub const ARM_LPAE_PTE_ATTRINDX_SHIFT: u32 = 2;
pub const ARM_LPAE_PTE_HAP_FAULT: u64 = 0;
pub const ARM_LPAE_PTE_HAP_READ: u64 = 1 << 6;
pub const ARM_LPAE_PTE_HAP_WRITE: u64 = 2 << 6;
pub const ARM_LPAE_PTE_MEMATTR_OIWB: u64 = 0xf << 2;
pub const ARM_LPAE_PTE_MEMATTR_NC: u64 = 0x5 << 2;
pub const ARM_LPAE_PTE_MEMATTR_DEV: u64 = 0x1 << 2;
/// Stage-1 table descriptor hierarchical attributes (APTable, UXNTable, PXNTable).
pub const ARM_LPAE_PTE_APTABLE_RDONLY: u64 = bit(62);
pub const ARM_LPAE_PTE_APTABLE_NO_EL0: u64 = bit(61);
pub const ARM_LPAE_PTE_UXNTABLE: u64 = bit(60);
pub const ARM_LPAE_PTE_PXNTABLE: u64 = bit(59);
/// Output and table address bits of a descriptor (48-bit PAs).
pub const ARM_LPAE_PTE_ADDR_MASK: u64 = genmask(47, 12);

pub const ARM_LPAE_MAIR_ATTR_IDX_NC: u64 = 0;
pub const ARM_LPAE_MAIR_ATTR_IDX_CACHE: u64 = 1;
pub const ARM_LPAE_MAIR_ATTR_IDX_DEV: u64 = 2;
pub const ARM_LPAE_MAIR_ATTR_IDX_INC_OCACHE: u64 = 3;
/// MAIR: NC (0x44), WBRWA (0xff), Device-nGnRE (0x04), inner NC outer WBRWA (0xf4).
pub const ARM_LPAE_MAIR: u64 = 0x44 | (0xff << 8) | (0x04 << 16) | (0xf4 << 24);

pub const ARM_LPAE_TCR_SH_IS: u8 = 3;
pub const ARM_LPAE_TCR_RGN_WBWA: u8 = 1;
/// Most stage-2 start-level tables io-pgtable concatenates.
pub const ARM_LPAE_S2_MAX_CONCAT_PAGES: u32 = 16;

/// Translation granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB.
    G4K,
    /// 16 KiB.
    G16K,
    /// 64 KiB.
    G64K,
}

impl Granule {
    /// Every granule.
    pub const ALL: [Granule; 3] = [Granule::G4K, Granule::G16K, Granule::G64K];

    /// log2 of the page size.
    pub fn shift(self) -> u32 {
        match self {
            Granule::G4K => 12,
            Granule::G16K => 14,
            Granule::G64K => 16,
        }
    }

    /// Page size.
    pub fn size(self) -> u64 {
        1u64.checked_shl(self.shift()).unwrap_or(0)
    }

    /// Address bits per level.
    pub fn bits_per_level(self) -> u32 {
        self.shift().saturating_sub(3)
    }

    /// TG0 / S2TG encoding: 0 4K, 1 64K, 2 16K.
    pub fn tg0(self) -> u8 {
        match self {
            Granule::G4K => 0,
            Granule::G64K => 1,
            Granule::G16K => 2,
        }
    }

    /// TLBI TG encoding: 1 4K, 2 16K, 3 64K.
    pub fn tlbi_tg(self) -> u8 {
        match self {
            Granule::G4K => 1,
            Granule::G16K => 2,
            Granule::G64K => 3,
        }
    }

    /// log2 of what one descriptor at `level` maps.
    pub fn level_shift(self, level: u32) -> u32 {
        self.bits_per_level()
            .saturating_mul(3u32.saturating_sub(level))
            .saturating_add(self.shift())
    }

    /// Levels at which io-pgtable maps blocks (48-bit PAs): 4K levels 1 and 2, 16K and 64K
    /// level 2.
    pub fn block_level(self, level: u32) -> bool {
        match self {
            Granule::G4K => level == 1 || level == 2,
            Granule::G16K | Granule::G64K => level == 2,
        }
    }

    /// The page and block sizes (`pgsize_bitmap`) for this granule.
    pub fn pgsizes(self) -> u64 {
        let mut bitmap = self.size();
        for level in 1..3 {
            if self.block_level(level) {
                bitmap |= 1u64.checked_shl(self.level_shift(level)).unwrap_or(0);
            }
        }
        bitmap
    }
}

/// Which stage a table is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `ARM_64_LPAE_S1`.
    S1,
    /// `ARM_64_LPAE_S2`.
    S2,
}

/// The IDR5.OAS / CD.IPS / STE.S2PS encoding of an address size.
pub fn pa_size_encoding(bits: u32) -> u8 {
    match bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        45..=48 => 5,
        _ => 6,
    }
}

/// A page table in guest RAM.
///
/// Tables live at guest physical addresses but may be reached through stage 2:
/// `view_offset` is added to every table address written into a descriptor or handed out as
/// TTBR (the tables are then at IPA = PA + `view_offset`).
#[derive(Debug, Clone)]
pub struct PageTable {
    /// Stage.
    pub stage: Stage,
    /// Granule.
    pub granule: Granule,
    /// Input address bits.
    pub ias: u32,
    /// Output address bits.
    pub oas: u32,
    /// First lookup level.
    pub start_level: u32,
    /// Input bits the first level resolves (more than a table's worth when concatenated).
    pub pgd_bits: u32,
    /// PA of the first-level table.
    pub pgd: u64,
    /// Added to table PAs to form the addresses the walker sees.
    pub view_offset: u64,
}

/// A leaf found by [`PageTable::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Level of the descriptor.
    pub level: u32,
    /// PA of the descriptor.
    pub pte_addr: u64,
    /// The descriptor.
    pub pte: u64,
}

impl PageTable {
    /// `arm_64_lpae_alloc_pgtable_s1/s2`: a table for `ias`-bit inputs and `oas`-bit outputs.
    pub fn new<M: GuestRam>(
        mem: &M,
        alloc: &mut BumpAllocator,
        stage: Stage,
        granule: Granule,
        ias: u32,
        oas: u32,
        view_offset: u64,
    ) -> Result<Self> {
        let pg_shift = granule.shift();
        let bpl = granule.bits_per_level();
        let va_bits = ias
            .checked_sub(pg_shift)
            .filter(|&v| v > 0 && ias <= 48)
            .ok_or(DriverError::InvalidArgument("input size"))?;
        let levels = va_bits.div_ceil(bpl);
        let mut start_level = 4u32
            .checked_sub(levels)
            .ok_or(DriverError::InvalidArgument("input size"))?;
        let mut pgd_bits = va_bits.saturating_sub(bpl.saturating_mul(levels.saturating_sub(1)));
        if stage == Stage::S2
            && start_level == 0
            && 1u32.checked_shl(pgd_bits).unwrap_or(u32::MAX) <= ARM_LPAE_S2_MAX_CONCAT_PAGES
        {
            pgd_bits = pgd_bits.saturating_add(bpl);
            start_level = 1;
        }
        let pgd_size = 8u64.checked_shl(pgd_bits).ok_or(DriverError::Overflow)?;
        let pgd = alloc.alloc(pgd_size, pgd_size.max(64))?;
        fill(mem, pgd, pgd_size, 0)?;
        Ok(Self {
            stage,
            granule,
            ias,
            oas,
            start_level,
            pgd_bits,
            pgd,
            view_offset,
        })
    }

    /// The table address the SMMU is given (TTB0 / S2TTB).
    pub fn ttbr(&self) -> u64 {
        self.pgd.wrapping_add(self.view_offset)
    }

    /// The CD fields for this table (stage 1): TxSZ, TG, WBWA inner/outer, inner shareable,
    /// IPS from the output size, Linux's MAIR.
    pub fn s1_tcr(&self) -> S1Tcr {
        S1Tcr {
            tsz: 64u32.saturating_sub(self.ias) as u8,
            tg: self.granule.tg0(),
            irgn: ARM_LPAE_TCR_RGN_WBWA,
            orgn: ARM_LPAE_TCR_RGN_WBWA,
            sh: ARM_LPAE_TCR_SH_IS,
            ips: pa_size_encoding(self.oas),
            ttbr: self.ttbr(),
            mair: ARM_LPAE_MAIR,
        }
    }

    /// The STE VTCR fields for this table (stage 2), with S2SL0 from the start level.
    pub fn vtcr(&self) -> Vtcr {
        let mut sl = self.start_level;
        if self.granule == Granule::G4K {
            sl = sl.saturating_add(1);
        }
        Vtcr {
            tsz: 64u32.saturating_sub(self.ias) as u8,
            sl: (!sl & 3) as u8,
            irgn: ARM_LPAE_TCR_RGN_WBWA,
            orgn: ARM_LPAE_TCR_RGN_WBWA,
            sh: ARM_LPAE_TCR_SH_IS,
            tg: self.granule.tg0(),
            ps: pa_size_encoding(self.oas),
        }
    }

    /// Input bits resolved at `level`.
    fn level_bits(&self, level: u32) -> u32 {
        if level == self.start_level {
            self.pgd_bits
        } else {
            self.granule.bits_per_level()
        }
    }

    /// The descriptor slot for `iova` in the table at `table` (a PA) at `level`.
    fn slot(&self, table: u64, iova: u64, level: u32) -> Result<u64> {
        let shift = self.granule.level_shift(level);
        let index = iova.checked_shr(shift).unwrap_or(0) & low_mask(self.level_bits(level));
        index
            .checked_mul(8)
            .and_then(|off| table.checked_add(off))
            .ok_or(DriverError::Overflow)
    }

    /// `arm_lpae_prot_to_pte` (without the type bits).
    pub fn prot_to_pte(&self, prot: u32) -> u64 {
        let mut pte = match self.stage {
            Stage::S1 => {
                let mut pte = ARM_LPAE_PTE_NG;
                if prot & prot::WRITE == 0 && prot & prot::READ != 0 {
                    pte |= ARM_LPAE_PTE_AP_RDONLY;
                }
                if prot & prot::PRIV == 0 {
                    pte |= ARM_LPAE_PTE_AP_UNPRIV;
                }
                pte
            }
            Stage::S2 => {
                let mut pte = ARM_LPAE_PTE_HAP_FAULT;
                if prot & prot::READ != 0 {
                    pte |= ARM_LPAE_PTE_HAP_READ;
                }
                if prot & prot::WRITE != 0 {
                    pte |= ARM_LPAE_PTE_HAP_WRITE;
                }
                pte
            }
        };
        match self.stage {
            Stage::S2 => {
                pte |= if prot & prot::MMIO != 0 {
                    ARM_LPAE_PTE_MEMATTR_DEV
                } else if prot & prot::CACHE != 0 {
                    ARM_LPAE_PTE_MEMATTR_OIWB
                } else {
                    ARM_LPAE_PTE_MEMATTR_NC
                };
            }
            Stage::S1 => {
                let idx = if prot & prot::MMIO != 0 {
                    ARM_LPAE_MAIR_ATTR_IDX_DEV
                } else if prot & prot::CACHE != 0 {
                    ARM_LPAE_MAIR_ATTR_IDX_CACHE
                } else {
                    ARM_LPAE_MAIR_ATTR_IDX_NC
                };
                pte |= idx.checked_shl(ARM_LPAE_PTE_ATTRINDX_SHIFT).unwrap_or(0);
            }
        }
        pte |= if prot & prot::CACHE != 0 {
            ARM_LPAE_PTE_SH_IS
        } else {
            ARM_LPAE_PTE_SH_OS
        };
        if prot & prot::NOEXEC != 0 {
            pte |= ARM_LPAE_PTE_XN;
        }
        pte | ARM_LPAE_PTE_AF
    }

    /// The level whose descriptors map `size` bytes, if io-pgtable maps that size.
    pub fn level_for_size(&self, size: u64) -> Option<u32> {
        (self.start_level..=3).find(|&level| {
            1u64.checked_shl(self.granule.level_shift(level)) == Some(size)
                && (level == 3 || self.granule.block_level(level))
        })
    }

    /// The PA a table descriptor points at.
    fn table_pa(&self, desc: u64) -> u64 {
        (desc & ARM_LPAE_PTE_ADDR_MASK & !low_mask(self.granule.shift()))
            .wrapping_sub(self.view_offset)
    }

    /// Walks to the slot for `iova` at `target` level, allocating missing tables when
    /// `alloc` is given. `None` when a table is missing (and not allocated) or a leaf sits
    /// above `target`.
    fn walk_to<M: GuestRam>(
        &self,
        mem: &M,
        mut alloc: Option<&mut BumpAllocator>,
        iova: u64,
        target: u32,
    ) -> Result<Option<u64>> {
        let mut table = self.pgd;
        for level in self.start_level..target {
            let slot = self.slot(table, iova, level)?;
            let desc = read_u64(mem, slot)?;
            if desc & ARM_LPAE_PTE_TYPE_MASK == ARM_LPAE_PTE_TYPE_TABLE {
                table = self.table_pa(desc);
                continue;
            }
            if desc != 0 {
                return Ok(None);
            }
            let Some(alloc) = alloc.as_deref_mut() else {
                return Ok(None);
            };
            let size = self.granule.size();
            let next = alloc.alloc(size, size)?;
            fill(mem, next, size, 0)?;
            write_u64(
                mem,
                slot,
                (next.wrapping_add(self.view_offset) & ARM_LPAE_PTE_ADDR_MASK)
                    | ARM_LPAE_PTE_TYPE_TABLE,
            )?;
            table = next;
        }
        self.slot(table, iova, target).map(Some)
    }

    /// Maps one page or block (`size` must be a page or block size, `iova` and `paddr`
    /// aligned to it) with `prot` (`__arm_lpae_map` / `arm_lpae_init_pte`).
    pub fn map<M: GuestRam>(
        &self,
        mem: &M,
        alloc: &mut BumpAllocator,
        iova: u64,
        paddr: u64,
        size: u64,
        prot: u32,
    ) -> Result<()> {
        let level = self
            .level_for_size(size)
            .ok_or(DriverError::InvalidArgument("not a page or block size"))?;
        if (iova | paddr) & size.wrapping_sub(1) != 0 {
            return Err(DriverError::InvalidArgument("unaligned mapping"));
        }
        let desc = self.prot_to_pte(prot)
            | (paddr & ARM_LPAE_PTE_ADDR_MASK)
            | if level == 3 {
                ARM_LPAE_PTE_TYPE_PAGE
            } else {
                ARM_LPAE_PTE_TYPE_BLOCK
            };
        self.map_raw(mem, alloc, iova, level, desc)
    }

    /// Writes descriptor `desc` as is for `iova` at `level`, allocating the tables above it.
    pub fn map_raw<M: GuestRam>(
        &self,
        mem: &M,
        alloc: &mut BumpAllocator,
        iova: u64,
        level: u32,
        desc: u64,
    ) -> Result<()> {
        let slot =
            self.walk_to(mem, Some(alloc), iova, level)?
                .ok_or(DriverError::InvalidArgument(
                    "a block already maps this range",
                ))?;
        if read_u64(mem, slot)? != 0 {
            return Err(DriverError::InvalidArgument("already mapped"));
        }
        write_u64(mem, slot, desc)
    }

    /// `arm_lpae_map_pages` for a range: the largest page or block that fits at each step.
    pub fn map_range<M: GuestRam>(
        &self,
        mem: &M,
        alloc: &mut BumpAllocator,
        iova: u64,
        paddr: u64,
        size: u64,
        prot: u32,
    ) -> Result<()> {
        let sizes = self.granule.pgsizes();
        let mut done = 0u64;
        while done < size {
            let (va, pa) = (
                iova.checked_add(done).ok_or(DriverError::Overflow)?,
                paddr.checked_add(done).ok_or(DriverError::Overflow)?,
            );
            let left = size.wrapping_sub(done);
            let pgsize = (0..64u32)
                .rev()
                .filter_map(|s| 1u64.checked_shl(s))
                .find(|&s| sizes & s != 0 && s <= left && (va | pa) & s.wrapping_sub(1) == 0)
                .ok_or(DriverError::InvalidArgument("unaligned range"))?;
            self.map(mem, alloc, va, pa, pgsize, prot)?;
            done = done.saturating_add(pgsize);
        }
        Ok(())
    }

    /// Finds the leaf (page or block descriptor) that maps `iova`.
    pub fn lookup<M: GuestRam>(&self, mem: &M, iova: u64) -> Result<Option<Leaf>> {
        let mut table = self.pgd;
        for level in self.start_level..=3 {
            let slot = self.slot(table, iova, level)?;
            let pte = read_u64(mem, slot)?;
            if pte & ARM_LPAE_PTE_VALID == 0 {
                return Ok(None);
            }
            if level < 3 && pte & ARM_LPAE_PTE_TYPE_MASK == ARM_LPAE_PTE_TYPE_TABLE {
                table = self.table_pa(pte);
                continue;
            }
            return Ok(Some(Leaf {
                level,
                pte_addr: slot,
                pte,
            }));
        }
        Ok(None)
    }

    /// The PA of the descriptor for `iova` at `level`, if the tables above it exist.
    pub fn pte_addr<M: GuestRam>(&self, mem: &M, iova: u64, level: u32) -> Result<Option<u64>> {
        self.walk_to(mem, None, iova, level)
    }

    /// Clears the leaf that maps `iova` (`__arm_lpae_unmap`, without freeing tables). Returns
    /// the size it mapped.
    pub fn unmap<M: GuestRam>(&self, mem: &M, iova: u64) -> Result<Option<u64>> {
        let Some(leaf) = self.lookup(mem, iova)? else {
            return Ok(None);
        };
        write_u64(mem, leaf.pte_addr, 0)?;
        Ok(1u64.checked_shl(self.granule.level_shift(leaf.level)))
    }

    /// Rewrites the output address of the leaf mapping `iova`, keeping its attributes (a PTE
    /// change the SMMU will only see after invalidation).
    pub fn remap<M: GuestRam>(&self, mem: &M, iova: u64, new_paddr: u64) -> Result<Leaf> {
        let leaf = self
            .lookup(mem, iova)?
            .ok_or(DriverError::InvalidArgument("not mapped"))?;
        let pte = (leaf.pte & !ARM_LPAE_PTE_ADDR_MASK) | (new_paddr & ARM_LPAE_PTE_ADDR_MASK);
        write_u64(mem, leaf.pte_addr, pte)?;
        Ok(Leaf { pte, ..leaf })
    }
}
