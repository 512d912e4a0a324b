//! Stream table entries, built as Linux's `arm_smmu_make_*_ste()` build them, and the bits an
//! STE uses (`arm_smmu_get_ste_used()`).

use super::bits::{bit, genmask, get, prep};
use super::entry::Entry;
use super::regs::ARM_SMMU_SH_ISH;

pub const STRTAB_L1_DESC_SPAN: u64 = genmask(4, 0);
pub const STRTAB_L1_DESC_L2PTR_MASK: u64 = genmask(51, 6);
/// `STRTAB_SPLIT`: Linux's level-2 tables hold 2^8 STEs.
pub const STRTAB_SPLIT: u32 = 8;
pub const STRTAB_NUM_L2_STES: u32 = 1 << STRTAB_SPLIT;
pub const STRTAB_MAX_L1_ENTRIES: u32 = 1 << 17;

pub const STRTAB_STE_0_V: u64 = bit(0);
pub const STRTAB_STE_0_CFG: u64 = genmask(3, 1);
pub const STRTAB_STE_0_CFG_ABORT: u64 = 0;
pub const STRTAB_STE_0_CFG_BYPASS: u64 = 4;
pub const STRTAB_STE_0_CFG_S1_TRANS: u64 = 5;
pub const STRTAB_STE_0_CFG_S2_TRANS: u64 = 6;
pub const STRTAB_STE_0_CFG_NESTED: u64 = 7;
pub const STRTAB_STE_0_S1FMT: u64 = genmask(5, 4);
pub const STRTAB_STE_0_S1FMT_LINEAR: u64 = 0;
pub const STRTAB_STE_0_S1FMT_4K_L2: u64 = 1;
pub const STRTAB_STE_0_S1FMT_64K_L2: u64 = 2;
pub const STRTAB_STE_0_S1CTXPTR_MASK: u64 = genmask(51, 6);
pub const STRTAB_STE_0_S1CDMAX: u64 = genmask(63, 59);

pub const STRTAB_STE_1_S1DSS: u64 = genmask(1, 0);
pub const STRTAB_STE_1_S1DSS_TERMINATE: u64 = 0;
pub const STRTAB_STE_1_S1DSS_BYPASS: u64 = 1;
pub const STRTAB_STE_1_S1DSS_SSID0: u64 = 2;
pub const STRTAB_STE_1_S1C_CACHE_NC: u64 = 0;
pub const STRTAB_STE_1_S1C_CACHE_WBRA: u64 = 1;
pub const STRTAB_STE_1_S1C_CACHE_WT: u64 = 2;
pub const STRTAB_STE_1_S1C_CACHE_WB: u64 = 3;
pub const STRTAB_STE_1_S1CIR: u64 = genmask(3, 2);
pub const STRTAB_STE_1_S1COR: u64 = genmask(5, 4);
pub const STRTAB_STE_1_S1CSH: u64 = genmask(7, 6);
pub const STRTAB_STE_1_MEV: u64 = bit(19);
pub const STRTAB_STE_1_S2FWB: u64 = bit(25);
pub const STRTAB_STE_1_S1STALLD: u64 = bit(27);
pub const STRTAB_STE_1_EATS: u64 = genmask(29, 28);
pub const STRTAB_STE_1_EATS_ABT: u64 = 0;
pub const STRTAB_STE_1_EATS_TRANS: u64 = 1;
pub const STRTAB_STE_1_EATS_S1CHK: u64 = 2;
pub const STRTAB_STE_1_STRW: u64 = genmask(31, 30);
pub const STRTAB_STE_1_STRW_NSEL1: u64 = 0;
pub const STRTAB_STE_1_STRW_EL2: u64 = 2;
pub const STRTAB_STE_1_SHCFG: u64 = genmask(45, 44);
pub const STRTAB_STE_1_SHCFG_INCOMING: u64 = 1;

pub const STRTAB_STE_2_S2VMID: u64 = genmask(15, 0);
pub const STRTAB_STE_2_VTCR: u64 = genmask(50, 32);
pub const STRTAB_STE_2_VTCR_S2T0SZ: u64 = genmask(5, 0);
pub const STRTAB_STE_2_VTCR_S2SL0: u64 = genmask(7, 6);
pub const STRTAB_STE_2_VTCR_S2IR0: u64 = genmask(9, 8);
pub const STRTAB_STE_2_VTCR_S2OR0: u64 = genmask(11, 10);
pub const STRTAB_STE_2_VTCR_S2SH0: u64 = genmask(13, 12);
pub const STRTAB_STE_2_VTCR_S2TG: u64 = genmask(15, 14);
pub const STRTAB_STE_2_VTCR_S2PS: u64 = genmask(18, 16);
pub const STRTAB_STE_2_S2AA64: u64 = bit(51);
pub const STRTAB_STE_2_S2ENDI: u64 = bit(52);
/// S2AFFD (spec; QEMU names it, Linux does not set it).
pub const STRTAB_STE_2_S2AFFD: u64 = bit(53);
pub const STRTAB_STE_2_S2PTW: u64 = bit(54);
pub const STRTAB_STE_2_S2HD: u64 = bit(55);
pub const STRTAB_STE_2_S2HA: u64 = bit(56);
pub const STRTAB_STE_2_S2S: u64 = bit(57);
pub const STRTAB_STE_2_S2R: u64 = bit(58);

pub const STRTAB_STE_3_S2TTB_MASK: u64 = genmask(51, 4);

/// The L1 stream table descriptor Linux writes (`arm_smmu_write_strtab_l1_desc`).
pub fn l1_desc(l2ptr: u64) -> u64 {
    (l2ptr & STRTAB_L1_DESC_L2PTR_MASK)
        | prep(STRTAB_L1_DESC_SPAN, u64::from(STRTAB_SPLIT).wrapping_add(1))
}

/// `arm_smmu_make_abort_ste`.
pub fn make_abort_ste() -> Entry {
    let mut ste = [0u64; 8];
    ste[0] = STRTAB_STE_0_V | prep(STRTAB_STE_0_CFG, STRTAB_STE_0_CFG_ABORT);
    ste
}

/// `arm_smmu_make_bypass_ste` (SHCFG = incoming when IDR1.ATTR_TYPES_OVR).
pub fn make_bypass_ste(attr_types_ovr: bool) -> Entry {
    let mut ste = [0u64; 8];
    ste[0] = STRTAB_STE_0_V | prep(STRTAB_STE_0_CFG, STRTAB_STE_0_CFG_BYPASS);
    if attr_types_ovr {
        ste[1] = prep(STRTAB_STE_1_SHCFG, STRTAB_STE_1_SHCFG_INCOMING);
    }
    ste
}

/// Where a stream's CDs are, as an STE points at them (`arm_smmu_ctx_desc_cfg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdTablePtr {
    /// S1ContextPtr (an IPA for nested streams).
    pub ptr: u64,
    /// S1Fmt.
    pub s1fmt: u64,
    /// S1CDMax.
    pub s1cdmax: u8,
}

/// `arm_smmu_make_cdtable_ste`: stage 1 through a CD table, NS-EL1, S2VMID 0.
///
/// `stalls` is `ARM_SMMU_FEAT_STALLS` (S1STALLD set for a master without stalls).
pub fn make_cdtable_ste(cd: &CdTablePtr, s1dss: u64, ats: bool, stalls: bool) -> Entry {
    let mut ste = [0u64; 8];
    ste[0] = STRTAB_STE_0_V
        | prep(STRTAB_STE_0_CFG, STRTAB_STE_0_CFG_S1_TRANS)
        | prep(STRTAB_STE_0_S1FMT, cd.s1fmt)
        | (cd.ptr & STRTAB_STE_0_S1CTXPTR_MASK)
        | prep(STRTAB_STE_0_S1CDMAX, u64::from(cd.s1cdmax));
    ste[1] = prep(STRTAB_STE_1_S1DSS, s1dss)
        | prep(STRTAB_STE_1_S1CIR, STRTAB_STE_1_S1C_CACHE_WBRA)
        | prep(STRTAB_STE_1_S1COR, STRTAB_STE_1_S1C_CACHE_WBRA)
        | prep(STRTAB_STE_1_S1CSH, ARM_SMMU_SH_ISH)
        | if stalls { STRTAB_STE_1_S1STALLD } else { 0 }
        | prep(
            STRTAB_STE_1_EATS,
            if ats { STRTAB_STE_1_EATS_TRANS } else { 0 },
        )
        | prep(STRTAB_STE_1_STRW, STRTAB_STE_1_STRW_NSEL1);
    ste[2] = prep(STRTAB_STE_2_S2VMID, 0);
    ste
}

/// The VTCR fields of a stage-2 STE (`io_pgtable_cfg.arm_lpae_s2_cfg.vtcr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vtcr {
    pub tsz: u8,
    pub sl: u8,
    pub irgn: u8,
    pub orgn: u8,
    pub sh: u8,
    pub tg: u8,
    pub ps: u8,
}

impl Vtcr {
    /// The 19-bit VTCR field of STE qword 2.
    pub fn bits(&self) -> u64 {
        prep(STRTAB_STE_2_VTCR_S2T0SZ, u64::from(self.tsz))
            | prep(STRTAB_STE_2_VTCR_S2SL0, u64::from(self.sl))
            | prep(STRTAB_STE_2_VTCR_S2IR0, u64::from(self.irgn))
            | prep(STRTAB_STE_2_VTCR_S2OR0, u64::from(self.orgn))
            | prep(STRTAB_STE_2_VTCR_S2SH0, u64::from(self.sh))
            | prep(STRTAB_STE_2_VTCR_S2TG, u64::from(self.tg))
            | prep(STRTAB_STE_2_VTCR_S2PS, u64::from(self.ps))
    }
}

/// A stage-2 domain (`arm_smmu_s2_cfg` plus its page table's VTCR and VTTBR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S2Domain {
    pub vmid: u16,
    pub vtcr: Vtcr,
    pub vttbr: u64,
}

/// `arm_smmu_make_s2_domain_ste`: stage 2 only, S2AA64, S2PTW, S2R.
pub fn make_s2_domain_ste(s2: &S2Domain, ats: bool, stall: bool) -> Entry {
    let mut ste = [0u64; 8];
    ste[0] = STRTAB_STE_0_V | prep(STRTAB_STE_0_CFG, STRTAB_STE_0_CFG_S2_TRANS);
    ste[1] = prep(
        STRTAB_STE_1_EATS,
        if ats { STRTAB_STE_1_EATS_TRANS } else { 0 },
    );
    ste[2] = prep(STRTAB_STE_2_S2VMID, u64::from(s2.vmid))
        | prep(STRTAB_STE_2_VTCR, s2.vtcr.bits())
        | STRTAB_STE_2_S2AA64
        | STRTAB_STE_2_S2PTW
        | if stall { STRTAB_STE_2_S2S } else { 0 }
        | STRTAB_STE_2_S2R;
    ste[3] = s2.vttbr & STRTAB_STE_3_S2TTB_MASK;
    ste
}

/// `arm_smmu_make_nested_cd_table_ste`: the S2 domain's STE with Config = nested and the
/// guest's stage-1 fields (`vste`, a CD-table STE in the guest's IPA space) merged in, MEV set.
pub fn make_nested_ste(vste: &Entry, s2: &S2Domain, ats: bool) -> Entry {
    let mut ste = make_s2_domain_ste(s2, ats, false);
    ste[0] = STRTAB_STE_0_V | prep(STRTAB_STE_0_CFG, STRTAB_STE_0_CFG_NESTED);
    ste[0] |= vste[0] & !STRTAB_STE_0_CFG;
    ste[1] |= vste[1];
    ste[1] |= STRTAB_STE_1_MEV;
    ste
}

/// `arm_smmu_get_ste_used`.
pub fn ste_used(ent: &Entry) -> Entry {
    let mut used = [0u64; 8];
    let cfg = get(STRTAB_STE_0_CFG, ent[0]);
    used[0] = STRTAB_STE_0_V;
    if ent[0] & STRTAB_STE_0_V == 0 {
        return used;
    }
    used[0] |= STRTAB_STE_0_CFG;
    if cfg & 1 != 0 {
        used[0] |= STRTAB_STE_0_S1FMT | STRTAB_STE_0_S1CTXPTR_MASK | STRTAB_STE_0_S1CDMAX;
        used[1] |= STRTAB_STE_1_S1DSS
            | STRTAB_STE_1_S1CIR
            | STRTAB_STE_1_S1COR
            | STRTAB_STE_1_S1CSH
            | STRTAB_STE_1_S1STALLD
            | STRTAB_STE_1_STRW
            | STRTAB_STE_1_EATS
            | STRTAB_STE_1_MEV;
        used[2] |= STRTAB_STE_2_S2VMID;
        if get(STRTAB_STE_1_S1DSS, ent[1]) == STRTAB_STE_1_S1DSS_BYPASS {
            used[1] |= STRTAB_STE_1_SHCFG;
        }
    }
    if cfg & 2 != 0 {
        used[1] |= STRTAB_STE_1_S2FWB | STRTAB_STE_1_EATS | STRTAB_STE_1_SHCFG | STRTAB_STE_1_MEV;
        used[2] |= STRTAB_STE_2_S2VMID
            | STRTAB_STE_2_VTCR
            | STRTAB_STE_2_S2AA64
            | STRTAB_STE_2_S2ENDI
            | STRTAB_STE_2_S2PTW
            | STRTAB_STE_2_S2S
            | STRTAB_STE_2_S2R;
        used[3] |= STRTAB_STE_3_S2TTB_MASK;
    }
    if cfg == STRTAB_STE_0_CFG_BYPASS {
        used[1] |= STRTAB_STE_1_SHCFG;
    }
    used
}
