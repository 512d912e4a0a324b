//! AArch64 (VMSAv8-64) translation table walks as an SMMUv3 performs them: stage 1, stage 2 and
//! nested, with 4K, 16K and 64K granules.
//!
//! The walker is given already-decoded configuration (from a CD and an STE) and reads
//! descriptors from guest memory. It never panics and never loops: every walk is bounded by the
//! number of levels, whatever the guest put in its tables or configuration.
//!
//! # What is implemented
//!
//! * Input ranges: TxSZ (CD.T0SZ/T1SZ, STE.S2T0SZ) from 16 to 39, i.e. 25- to 48-bit input
//!   addresses. Anything else faults with F_TRANSLATION (no FEAT_LVA/LPA2 52-bit VAs, no
//!   FEAT_TTST small ranges); the caller is expected to have rejected such a CD/STE already.
//! * Output addresses of at most 48 bits: output and next-level table addresses are descriptor
//!   bits \[47:n\]; bits \[51:48\] (and \[15:12\] with 64K pages) are not part of the address.
//!   `oas_bits`/`ps_bits` above 48 are treated as 48 (no FEAT_LPA, no FEAT_LPA2/DS). Blocks are
//!   therefore only at 4K levels 1 and 2, 16K level 2 and 64K level 2.
//! * Stage-1 permissions AP\[2:1\], PXN, UXN, the hierarchical APTable/PXNTable/UXNTable (unless
//!   CD.HADx), and the rule that memory writable by unprivileged accesses is never executable
//!   by privileged ones. Stage-2 permissions S2AP\[1:0\] and XN (bit 54 only: no FEAT_XNX).
//! * The Access flag without hardware update: AF = 0 is an F_ACCESS fault unless CD.AFFD or
//!   STE.S2AFFD says to ignore it.
//! * Nested walks: each stage-1 descriptor fetch is translated by stage 2 (and needs stage-2 read
//!   permission), then the stage-1 output is translated by stage 2.
//!
//! Not modelled here: memory attributes and shareability, the contiguous hint, DBM/dirty
//! state, CD.WXN/UWXN/PAN (not part of [`Stage1Config`]), and the SMMU IAS check of a
//! stage-2-only input address (see `Smmu::translate`).
//!
//! # Fault priority
//!
//! Within one stage: F_TRANSLATION (range, configuration or descriptor), then F_ADDR_SIZE (table
//! or output address), then F_ACCESS, then F_PERMISSION, as in the Arm ARM's walk. In a nested
//! walk, stage 1 is finished (including its permission check) before its output goes to stage
//! 2, as the Arm ARM's `AArch64.FullTranslate` does: a stage-1 permission fault wins over a
//! stage-2 fault on the output address.

use std::sync::atomic::Ordering;

use vm_memory::GuestAddress;

use super::GuestMemory;
use super::spec::pt;

/// Translation granule (CD.TGx, STE.S2TG after decoding their different encodings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granule {
    /// 4 KiB pages, 9 bits per level.
    G4K,
    /// 16 KiB pages, 11 bits per level.
    G16K,
    /// 64 KiB pages, 13 bits per level.
    G64K,
}

impl Granule {
    /// log2 of the page size: 12, 14 or 16.
    pub fn page_shift(self) -> u32 {
        match self {
            Granule::G4K => 12,
            Granule::G16K => 14,
            Granule::G64K => 16,
        }
    }
}

/// One stage-1 translation table (TTB0 or TTB1) as a context descriptor describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TtConfig {
    /// CD.TxSZ: the table covers an input range of 2^(64 - tsz) bytes.
    pub tsz: u8,
    /// CD.TGx.
    pub granule: Granule,
    /// CD.TTBx\[51:4\]: address of the start-level table (an IPA when nested).
    pub ttb: u64,
    /// CD.EPDx: walks through this table are disabled; an address in its range faults.
    pub epd: bool,
    /// CD.HADx: hierarchical attributes (APTable, PXNTable, UXNTable) are ignored.
    pub had: bool,
}

/// Stage-1 configuration from a context descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stage1Config {
    /// TTB0 (index 0) and TTB1 (index 1).
    pub tt: [TtConfig; 2],
    /// CD.TBI\[1:0\]: top byte ignore for the TTB0 and TTB1 ranges.
    pub tbi: [bool; 2],
    /// Effective output address size in bits: min(CD.IPS, IDR5.OAS).
    pub oas_bits: u8,
    /// CD.AFFD: a descriptor with AF = 0 is used as if AF were 1 instead of faulting.
    pub affd: bool,
}

/// Stage-2 configuration from a stream table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stage2Config {
    /// STE.S2T0SZ: the input (IPA) range is 2^(64 - tsz) bytes.
    pub tsz: u8,
    /// STE.S2SL0: starting level, encoded per granule as in VTCR_EL2.SL0.
    pub sl0: u8,
    /// STE.S2TG.
    pub granule: Granule,
    /// STE.S2TTB\[51:4\]: address of the start-level table (a PA; may be concatenated tables).
    pub ttb: u64,
    /// Effective physical address size in bits: min(STE.S2PS, IDR5.OAS).
    pub ps_bits: u8,
    /// STE.S2AFFD.
    pub affd: bool,
    /// SMMU_IDR3.XNX: the stage-2 execute-never field is XN\[1:0\] (bits 54:53), which tells
    /// privileged from unprivileged execution; without it only bit 54 counts.
    pub xnx: bool,
}

/// The access a transaction makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AccessKind {
    /// A data read.
    pub read: bool,
    /// A write.
    pub write: bool,
    /// An instruction fetch.
    pub exec: bool,
    /// A privileged access.
    pub privileged: bool,
}

impl AccessKind {
    /// True when the access asks for nothing (a probe of what the mapping allows).
    pub fn is_probe(&self) -> bool {
        !self.read && !self.write && !self.exec
    }
}

/// What one stage of a mapping allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions {
    /// Privileged read.
    pub read_priv: bool,
    /// Privileged write.
    pub write_priv: bool,
    /// Privileged instruction fetch.
    pub exec_priv: bool,
    /// Unprivileged read.
    pub read_user: bool,
    /// Unprivileged write.
    pub write_user: bool,
    /// Unprivileged instruction fetch.
    pub exec_user: bool,
}

/// A translation: an aligned block of input addresses onto an aligned block of output addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// First input address of the block (IOVA, with the ignored top byte cleared).
    pub input_base: u64,
    /// First output address of the block (a PA; for stage 1 alone, the stage-1 output).
    pub output_base: u64,
    /// log2 of the block size (12 for a 4 KiB page, 21 for a 2 MiB block, ...); for nested
    /// translations the smaller of the two stages' blocks.
    pub size_shift: u32,
    /// Stage-1 permissions, if stage 1 took part.
    pub s1: Option<Permissions>,
    /// Stage-2 permissions, if stage 2 took part.
    pub s2: Option<Permissions>,
    /// The stage-1 leaf is global (nG, bit 11, is 0): it matches every ASID.
    pub global: bool,
}

/// The kind of a translation fault, as the SMMUv3 event that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// F_TRANSLATION (0x10).
    Translation,
    /// F_ADDR_SIZE (0x11).
    AddrSize,
    /// F_ACCESS (0x12).
    Access,
    /// F_PERMISSION (0x13).
    Permission,
    /// F_WALK_EABT (0x0b): a descriptor fetch failed (outside guest memory).
    WalkEabt,
}

/// For a stage-2 fault: what stage 2 was translating (the event's CLASS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultClass {
    /// The IPA of a context descriptor (the caller's fetch; the walker never reports it).
    Cd,
    /// The IPA of a stage-1 translation table or descriptor.
    Tt,
    /// The IPA that stage 1 produced for the input address (or the input itself, stage 2 only).
    In,
}

/// A failed translation, with what an event record needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalkFault {
    /// Which fault.
    pub kind: FaultKind,
    /// The fault happened in stage 2 (the event's S2 bit).
    pub stage2: bool,
    /// For a stage-2 fault: what stage 2 was translating. [`FaultClass::In`] for stage-1 faults.
    pub class: FaultClass,
    /// For a stage-2 fault: the IPA stage 2 was translating (the event's IPA field). With class
    /// [`FaultClass::Tt`] that is the IPA of the stage-1 descriptor being fetched; with
    /// [`FaultClass::In`] the whole input IPA (not its block base). 0 for stage-1 faults.
    pub ipa: u64,
    /// For F_WALK_EABT: the PA of the descriptor whose fetch failed (a stage-2 descriptor when
    /// `stage2`, else a stage-1 one). 0 for other faults.
    pub fetch_addr: u64,
}

// ---------------------------------------------------------------------------------------------
// Walker constants (the descriptor format itself is in `spec::pt`).

/// Largest output (and table) address size in bits: descriptor address bits are \[47:n\].
const OA_BITS_MAX: u32 = pt::ADDR_BITS;

/// Smallest TxSZ accepted: a 48-bit input range.
const TSZ_MIN: u8 = 16;
/// Largest TxSZ accepted: a 25-bit input range (without FEAT_TTST).
const TSZ_MAX: u8 = 39;
/// The last lookup level.
const LAST_LEVEL: u32 = 3;
/// Up to 2^4 = 16 stage-2 start-level tables may be concatenated.
const MAX_CONCAT_BITS: u32 = 4;
/// A start-level table is aligned to its size, but at least to 64 bytes.
const MIN_TABLE_ALIGN_SHIFT: u32 = 6;

/// Address bit 55 selects the stage-1 table: 0 for TTB0, 1 for TTB1.
const TTB1_SELECT: u64 = 1 << 55;
/// Address bits \[63:56\], ignored for the address range of a table with TBI.
const TOP_BYTE: u64 = 0xff << 56;

/// The access a stage-1 descriptor fetch makes, for stage 2's permission check: an
/// unprivileged data read (no HTTU, so the walker never writes a descriptor).
pub const TABLE_FETCH: AccessKind = AccessKind {
    read: true,
    write: false,
    exec: false,
    privileged: false,
};

// ---------------------------------------------------------------------------------------------
// Public entry points.

/// Translates `iova` for `access` through stage 1, stage 2, or both.
///
/// * `s1` only: `iova` is a VA, the result's output is the stage-1 output address (a PA).
/// * `s2` only: `iova` is an IPA; stage-2 faults have class [`FaultClass::In`]. The SMMU's IAS
///   check (an input address beyond IAS is an F_ADDR_SIZE *stage-1* fault, IHI0070 §3.4, the
///   same check as for STE.Config = bypass) needs SMMU_IDR5.OAS, which is not part of the
///   configuration: the caller makes it before calling. This walk checks the input against
///   STE.S2T0SZ only (F_TRANSLATION, stage 2).
/// * both (nested): stage 1's table addresses and its output are IPAs that stage 2 translates
///   with classes [`FaultClass::Tt`] and [`FaultClass::In`].
/// * neither: not a translation; reported as an F_TRANSLATION stage-1 fault.
///
/// Unless `access` is a probe ([`AccessKind::is_probe`]), the permissions of each stage are
/// checked, each requested kind (read, write, exec) on its own: an instruction fetch that also
/// needs read permission asks for both. A probe returns the mapping with its permissions.
pub fn walk_tables<M: GuestMemory>(
    mem: &M,
    s1: Option<&Stage1Config>,
    s2: Option<&Stage2Config>,
    iova: u64,
    access: AccessKind,
) -> Result<Mapping, WalkFault> {
    match (s1, s2) {
        (Some(s1), None) => {
            let mapping = walk_stage1(s1, iova, |pa| read_desc(mem, pa, FaultCtx::STAGE1))?;
            check_access(mapping.s1, access, FaultCtx::STAGE1)?;
            Ok(mapping)
        }
        (None, Some(s2)) => walk_stage2(mem, s2, iova, access, FaultClass::In),
        (Some(s1), Some(s2)) => translate_nested(mem, s1, s2, iova, access),
        (None, None) => Err(FaultCtx::STAGE1.fault(FaultKind::Translation)),
    }
}

/// Translates the IPA `ipa` through stage 2 alone, for `access` (no permission check for a
/// probe). `class` says what the IPA is (a CD, a stage-1 table or an input address); every
/// fault is reported with `stage2 = true`, that class and `ipa`.
pub fn walk_stage2<M: GuestMemory>(
    mem: &M,
    s2: &Stage2Config,
    ipa: u64,
    access: AccessKind,
    class: FaultClass,
) -> Result<Mapping, WalkFault> {
    let ctx = FaultCtx::stage2(class, ipa);
    let geometry = Geometry::stage2(s2).ok_or(ctx.fault(FaultKind::Translation))?;
    if !fits(ipa, geometry.in_bits) {
        return Err(ctx.fault(FaultKind::Translation));
    }
    let leaf = geometry.walk(s2.ttb, ipa, ctx, |pa| read_desc(mem, pa, ctx))?;
    check_access_flag(leaf.desc, s2.affd, ctx)?;
    let mapping = Mapping::from_leaf(
        ipa,
        &leaf,
        None,
        Some(Permissions::stage2(leaf.desc, s2.xnx)),
    );
    check_access(mapping.s2, access, ctx)?;
    Ok(mapping)
}

impl Mapping {
    /// Which stage (if any) refuses `access`: `None` if allowed (always for a probe),
    /// `Some(false)` if stage 1 does, `Some(true)` if stage 1 allows it and stage 2 does not.
    /// On an IOTLB hit this gives the F_PERMISSION fault's S2 bit.
    pub fn refuses(&self, access: AccessKind) -> Option<bool> {
        let refused = |perm: Option<Permissions>| perm.is_some_and(|perm| !perm.allows(access));
        if refused(self.s1) {
            Some(false)
        } else if refused(self.s2) {
            Some(true)
        } else {
            None
        }
    }

    /// The output address for an input address inside the block: the block's output base
    /// plus the offset of `iova` in the block (only those low bits of `iova` are used, so a
    /// tagged address works too).
    pub fn output(&self, iova: u64) -> u64 {
        self.output_base | (iova & low_mask(self.size_shift))
    }

    /// The mapping of the block or page `leaf` for input address `addr`.
    fn from_leaf(
        addr: u64,
        leaf: &Leaf,
        s1: Option<Permissions>,
        s2: Option<Permissions>,
    ) -> Mapping {
        Mapping {
            input_base: addr & !low_mask(leaf.size_shift),
            output_base: leaf.output_base,
            size_shift: leaf.size_shift,
            s1,
            s2,
            global: false,
        }
    }

    /// Chains this stage-1 mapping of `iova` with `stage2`, the stage-2 mapping of its output:
    /// the result is the smaller of the two blocks around `iova`.
    fn then(self, stage2: Mapping, iova: u64) -> Mapping {
        let size_shift = self.size_shift.min(stage2.size_shift);
        let block = !low_mask(size_shift);
        let input = self.input_base | (iova & low_mask(self.size_shift));
        Mapping {
            input_base: input & block,
            output_base: stage2.output(self.output(iova)) & block,
            size_shift,
            s1: self.s1,
            s2: stage2.s2,
            global: self.global,
        }
    }
}

impl Permissions {
    /// Whether every kind of access `access` asks for (read, write, exec, at its privilege) is
    /// allowed. A probe asks for nothing and is always allowed.
    pub fn allows(&self, access: AccessKind) -> bool {
        let (read, write, exec) = if access.privileged {
            (self.read_priv, self.write_priv, self.exec_priv)
        } else {
            (self.read_user, self.write_user, self.exec_user)
        };
        (read || !access.read) && (write || !access.write) && (exec || !access.exec)
    }

    /// Stage-1 permissions of the leaf descriptor `desc` under the hierarchical attributes
    /// `table` (APTable\[62:61\], UXNTable\[60\] and PXNTable\[59\] collected from the table
    /// descriptors above it; 0 with CD.HADx).
    ///
    /// AP\[2:1\] (bits 7:6): privileged reads always; privileged writes iff AP\[2\] = 0;
    /// unprivileged reads iff AP\[1\] = 1; unprivileged writes iff AP\[2:1\] = 0b01. APTable\[0\]
    /// removes unprivileged access, APTable\[1\] removes writes. PXN (bit 53) and UXN (bit 54)
    /// forbid execution; memory that unprivileged accesses may write is never privileged
    /// executable (Arm ARM stage-1 permission rules).
    fn stage1(desc: u64, table: u64) -> Permissions {
        let read_only = has(desc, pt::AP_RDONLY) || has(table, pt::AP_TABLE_RDONLY);
        let user = has(desc, pt::AP_UNPRIV) && !has(table, pt::AP_TABLE_NO_UNPRIV);
        let write_user = user && !read_only;
        Permissions {
            read_priv: true,
            write_priv: !read_only,
            exec_priv: !has(desc, pt::PXN) && !has(table, pt::PXN_TABLE) && !write_user,
            read_user: user,
            write_user,
            exec_user: !has(desc, pt::UXN) && !has(table, pt::UXN_TABLE),
        }
    }

    /// Stage-2 permissions of the leaf descriptor `desc`: S2AP\[0\] (bit 6) read, S2AP\[1\]
    /// (bit 7) write, the same for privileged and unprivileged; execute-never from XN. With
    /// `xnx` (SMMU_IDR3.XNX, FEAT_XNX) XN\[1:0\] (bits 54:53) reads: 0b00 executable at both
    /// levels, 0b01 not privileged (EL1), 0b10 at neither, 0b11 not unprivileged (EL0). Without
    /// it XN\[1\] alone forbids execution at both and bit 53 is ignored.
    fn stage2(desc: u64, xnx: bool) -> Permissions {
        let read = has(desc, pt::S2AP_READ);
        let write = has(desc, pt::S2AP_WRITE);
        let (exec_priv, exec_user) = match (has(desc, pt::S2_XN1), xnx && has(desc, pt::S2_XN0)) {
            (false, false) => (true, true),
            (false, true) => (false, true),
            (true, false) => (false, false),
            (true, true) => (true, false),
        };
        Permissions {
            read_priv: read,
            write_priv: write,
            exec_priv,
            read_user: read,
            write_user: write,
            exec_user,
        }
    }
}

impl Granule {
    /// Input address bits one lookup level resolves: page_shift - 3 (a table is one page of
    /// 8-byte descriptors).
    fn stride(self) -> u32 {
        self.page_shift().saturating_sub(pt::DESC_SIZE_SHIFT)
    }

    /// log2 of the region one descriptor at `level` (0..=3) maps.
    fn level_shift(self, level: u32) -> u32 {
        let levels_below = LAST_LEVEL.saturating_sub(level);
        self.stride()
            .saturating_mul(levels_below)
            .saturating_add(self.page_shift())
    }

    /// Whether a block descriptor is allowed at `level` (0..=2) with 48-bit output addresses:
    /// 4K levels 1 and 2 (1 GiB, 2 MiB), 16K level 2 (32 MiB), 64K level 2 (512 MiB).
    fn block_allowed(self, level: u32) -> bool {
        match self {
            Granule::G4K => matches!(level, 1 | 2),
            Granule::G16K | Granule::G64K => level == 2,
        }
    }

    /// Start level from a stage-2 S2SL0 value (the VTCR_EL2.SL0 encoding): 4K 0/1/2 → level
    /// 2/1/0; 16K and 64K 0/1/2 → level 3/2/1. Other values are reserved here.
    fn s2_start_level(self, sl0: u8) -> Option<u32> {
        match (self, sl0) {
            (Granule::G4K, 0) => Some(2),
            (Granule::G4K, 1) => Some(1),
            (Granule::G4K, 2) => Some(0),
            (Granule::G16K | Granule::G64K, 0) => Some(3),
            (Granule::G16K | Granule::G64K, 1) => Some(2),
            (Granule::G16K | Granule::G64K, 2) => Some(1),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stage 1 and nesting.

/// Walks stage 1 for `iova`, reading each descriptor through `fetch` (given the descriptor's
/// address in stage 1's output space), and checks the Access flag. The mapping's output is the
/// stage-1 output; permissions are not checked.
fn walk_stage1(
    s1: &Stage1Config,
    iova: u64,
    fetch: impl FnMut(u64) -> Result<u64, WalkFault>,
) -> Result<Mapping, WalkFault> {
    let ctx = FaultCtx::STAGE1;
    let (tt, geometry, addr) = select_table(s1, iova)?;
    let leaf = geometry.walk(tt.ttb, addr, ctx, fetch)?;
    check_access_flag(leaf.desc, s1.affd, ctx)?;
    let table_attrs = if tt.had { 0 } else { leaf.table_attrs };
    let perm = Permissions::stage1(leaf.desc, table_attrs);
    let mapping = Mapping::from_leaf(addr, &leaf, Some(perm), None);
    Ok(Mapping {
        global: !has(leaf.desc, pt::NG),
        ..mapping
    })
}

/// Picks the stage-1 table for `iova` by address bit 55 and checks that `iova` is in its
/// range: bits \[63:64-TxSZ\] (\[55:64-TxSZ\] with TBI for that range) all equal to bit 55, and
/// walks not disabled by EPD. Returns the table, its walk geometry and the address to walk
/// (bits \[63:56\] cleared when ignored).
fn select_table(s1: &Stage1Config, iova: u64) -> Result<(&TtConfig, Geometry, u64), WalkFault> {
    let fault = FaultCtx::STAGE1.fault(FaultKind::Translation);
    let upper = has(iova, TTB1_SELECT);
    let [tt0, tt1] = &s1.tt;
    let [tbi0, tbi1] = s1.tbi;
    let (tt, tbi) = if upper { (tt1, tbi1) } else { (tt0, tbi0) };
    let geometry = Geometry::stage1(tt, s1.oas_bits).ok_or(fault)?;
    let top_bits: u32 = if tbi { 56 } else { 64 };
    let width = top_bits.saturating_sub(geometry.in_bits);
    let range_bits = field(iova, geometry.in_bits, width);
    let expected = if upper { low_mask(width) } else { 0 };
    if range_bits != expected || tt.epd {
        return Err(fault);
    }
    let addr = if tbi { iova & !TOP_BYTE } else { iova };
    Ok((tt, geometry, addr))
}

/// Nested translation: stage 1 with every descriptor fetch translated by stage 2 (class TT,
/// needing stage-2 read permission), then stage 2 on stage 1's output (class IN).
fn translate_nested<M: GuestMemory>(
    mem: &M,
    s1: &Stage1Config,
    s2: &Stage2Config,
    iova: u64,
    access: AccessKind,
) -> Result<Mapping, WalkFault> {
    let fetch_through_s2 = |desc_ipa: u64| {
        let table = walk_stage2(mem, s2, desc_ipa, TABLE_FETCH, FaultClass::Tt)?;
        read_desc(mem, table.output(desc_ipa), FaultCtx::STAGE1)
    };
    let stage1 = walk_stage1(s1, iova, fetch_through_s2)?;
    check_access(stage1.s1, access, FaultCtx::STAGE1)?;
    let stage2 = walk_stage2(mem, s2, stage1.output(iova), access, FaultClass::In)?;
    Ok(stage1.then(stage2, iova))
}

// ---------------------------------------------------------------------------------------------
// The walk shared by both stages.

/// The shape of one stage's walk, from TxSZ, the granule and the start level.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    granule: Granule,
    /// Input address size in bits: 64 - TxSZ (25..=48).
    in_bits: u32,
    /// Level of the first lookup (0..=3).
    start_level: u32,
    /// Input bits the first lookup resolves: up to a table's worth (stride), or up to 4 more
    /// when stage-2 start-level tables are concatenated.
    start_bits: u32,
    /// Output address size: table and output addresses must be below 2^oa_bits (<= 48).
    oa_bits: u32,
}

impl Geometry {
    /// Stage-1 geometry of `tt`: the start level is the deepest one whose table covers the
    /// whole input range. None when TxSZ is out of range.
    fn stage1(tt: &TtConfig, oas_bits: u8) -> Option<Geometry> {
        let in_bits = input_bits(tt.tsz)?;
        let granule = tt.granule;
        let start_level = (0..=LAST_LEVEL).rev().find(|&level| {
            in_bits <= granule.level_shift(level).saturating_add(granule.stride())
        })?;
        Geometry::new(granule, in_bits, start_level, oas_bits)
    }

    /// Stage-2 geometry of `s2`, with its start level from S2SL0. None when S2T0SZ or S2SL0 is
    /// out of range or they are inconsistent (the start level resolves no bit, or more than 16
    /// concatenated tables would be needed).
    fn stage2(s2: &Stage2Config) -> Option<Geometry> {
        let in_bits = input_bits(s2.tsz)?;
        let start_level = s2.granule.s2_start_level(s2.sl0)?;
        Geometry::new(s2.granule, in_bits, start_level, s2.ps_bits)
    }

    /// A geometry whose first lookup at `start_level` resolves between 1 bit and a table's
    /// worth plus 4 (16 concatenated tables) of an `in_bits` input.
    fn new(granule: Granule, in_bits: u32, start_level: u32, oa_bits: u8) -> Option<Geometry> {
        let start_bits = in_bits.checked_sub(granule.level_shift(start_level))?;
        let max_start_bits = granule.stride().saturating_add(MAX_CONCAT_BITS);
        (1..=max_start_bits)
            .contains(&start_bits)
            .then_some(Geometry {
                granule,
                in_bits,
                start_level,
                start_bits,
                oa_bits: u32::from(oa_bits).min(OA_BITS_MAX),
            })
    }

    /// Input bits the lookup at `level` resolves.
    fn index_bits(&self, level: u32) -> u32 {
        if level == self.start_level {
            self.start_bits
        } else {
            self.granule.stride()
        }
    }

    /// Walks the tables from `ttb` for the input address `addr` (already in range), reading each
    /// descriptor through `fetch`. At most 4 lookups: the loop runs once per level and a level-3
    /// descriptor always ends it, so tables that point to themselves terminate.
    fn walk(
        &self,
        ttb: u64,
        addr: u64,
        ctx: FaultCtx,
        mut fetch: impl FnMut(u64) -> Result<u64, WalkFault>,
    ) -> Result<Leaf, WalkFault> {
        if !fits(ttb, self.oa_bits) {
            return Err(ctx.fault(FaultKind::AddrSize));
        }
        let start_align = self
            .start_bits
            .saturating_add(pt::DESC_SIZE_SHIFT)
            .max(MIN_TABLE_ALIGN_SHIFT);
        let mut table = ttb & !low_mask(start_align);
        let mut table_attrs = 0;
        for level in self.start_level..=LAST_LEVEL {
            let shift = self.granule.level_shift(level);
            let index = field(addr, shift, self.index_bits(level));
            let desc = fetch(table | shl(index, pt::DESC_SIZE_SHIFT))?;
            match Entry::decode(desc, level, self.granule) {
                Entry::Invalid => return Err(ctx.fault(FaultKind::Translation)),
                Entry::Table => {
                    table = address_field(desc, self.granule.page_shift());
                    if !fits(table, self.oa_bits) {
                        return Err(ctx.fault(FaultKind::AddrSize));
                    }
                    table_attrs |= desc & pt::TABLE_ATTRS;
                }
                Entry::Leaf => {
                    let output_base = address_field(desc, shift);
                    if !fits(output_base, self.oa_bits) {
                        return Err(ctx.fault(FaultKind::AddrSize));
                    }
                    return Ok(Leaf {
                        desc,
                        size_shift: shift,
                        output_base,
                        table_attrs,
                    });
                }
            }
        }
        // Not reached: level 3 never decodes as a table.
        Err(ctx.fault(FaultKind::Translation))
    }
}

/// What a descriptor is at its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Invalid (bit 0 = 0), reserved (0b01 at level 3), or a block where none is allowed.
    Invalid,
    /// A table descriptor (0b11 at levels 0-2).
    Table,
    /// A block (0b01 at an allowed level) or page (0b11 at level 3) descriptor.
    Leaf,
}

impl Entry {
    /// Decodes descriptor bits \[1:0\] of `desc` at `level`.
    fn decode(desc: u64, level: u32, granule: Granule) -> Entry {
        let table_or_page = has(desc, pt::TABLE_OR_PAGE);
        if !has(desc, pt::VALID) {
            Entry::Invalid
        } else if level >= LAST_LEVEL {
            if table_or_page {
                Entry::Leaf
            } else {
                Entry::Invalid
            }
        } else if table_or_page {
            Entry::Table
        } else if granule.block_allowed(level) {
            Entry::Leaf
        } else {
            Entry::Invalid
        }
    }
}

/// The block or page descriptor a walk ended on.
#[derive(Debug, Clone, Copy)]
struct Leaf {
    desc: u64,
    /// log2 of the block or page size.
    size_shift: u32,
    /// Output address bits \[47:size_shift\] of the descriptor.
    output_base: u64,
    /// The hierarchical attributes (bits \[62:59\]) of the table descriptors walked through,
    /// ORed together.
    table_attrs: u64,
}

/// How a stage reports its faults.
#[derive(Debug, Clone, Copy)]
struct FaultCtx {
    stage2: bool,
    class: FaultClass,
    ipa: u64,
}

impl FaultCtx {
    /// Stage-1 faults: S2 = 0, class IN, no IPA.
    const STAGE1: FaultCtx = FaultCtx {
        stage2: false,
        class: FaultClass::In,
        ipa: 0,
    };

    /// Faults of a stage-2 translation of `ipa` for `class`.
    fn stage2(class: FaultClass, ipa: u64) -> FaultCtx {
        FaultCtx {
            stage2: true,
            class,
            ipa,
        }
    }

    fn fault(self, kind: FaultKind) -> WalkFault {
        self.fault_at(kind, 0)
    }

    fn fault_at(self, kind: FaultKind, fetch_addr: u64) -> WalkFault {
        WalkFault {
            kind,
            stage2: self.stage2,
            class: self.class,
            ipa: self.ipa,
            fetch_addr,
        }
    }
}

/// Reads the little-endian descriptor at `addr` with one single-copy-atomic 64-bit load, as
/// the architecture requires of descriptor fetches; a failed read is F_WALK_EABT at `addr`.
fn read_desc<M: GuestMemory>(mem: &M, addr: u64, ctx: FaultCtx) -> Result<u64, WalkFault> {
    mem.load::<u64>(GuestAddress(addr), Ordering::Relaxed)
        .map(u64::from_le)
        .map_err(|_| ctx.fault_at(FaultKind::WalkEabt, addr))
}

/// F_ACCESS unless the leaf's AF (bit 10) is set or AFFD says to ignore it.
fn check_access_flag(desc: u64, affd: bool, ctx: FaultCtx) -> Result<(), WalkFault> {
    if has(desc, pt::AF) || affd {
        Ok(())
    } else {
        Err(ctx.fault(FaultKind::Access))
    }
}

/// F_PERMISSION if `perm` (when the stage took part) refuses `access`.
fn check_access(
    perm: Option<Permissions>,
    access: AccessKind,
    ctx: FaultCtx,
) -> Result<(), WalkFault> {
    if perm.is_some_and(|perm| !perm.allows(access)) {
        Err(ctx.fault(FaultKind::Permission))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Bit helpers: shifts of any amount, never overflowing.

/// Input address size for TxSZ `tsz`, if it is in the supported range.
fn input_bits(tsz: u8) -> Option<u32> {
    (TSZ_MIN..=TSZ_MAX)
        .contains(&tsz)
        .then(|| 64u32.saturating_sub(u32::from(tsz)))
}

/// Descriptor address bits \[47:low\].
fn address_field(desc: u64, low: u32) -> u64 {
    desc & pt::ADDR_MASK & !low_mask(low)
}

/// Bits \[low + width - 1 : low\] of `value`, shifted down.
fn field(value: u64, low: u32, width: u32) -> u64 {
    shr(value, low) & low_mask(width)
}

/// Whether `addr` is below 2^bits.
fn fits(addr: u64, bits: u32) -> bool {
    shr(addr, bits) == 0
}

/// Whether any of `bits` is set in `value`.
fn has(value: u64, bits: u64) -> bool {
    value & bits != 0
}

/// The low `bits` bits set (all 64 for `bits` >= 64).
fn low_mask(bits: u32) -> u64 {
    shl(1, bits).wrapping_sub(1)
}

/// `value << shift`, 0 when `shift` >= 64.
fn shl(value: u64, shift: u32) -> u64 {
    value.checked_shl(shift).unwrap_or(0)
}

/// `value >> shift`, 0 when `shift` >= 64.
fn shr(value: u64, shift: u32) -> u64 {
    value.checked_shr(shift).unwrap_or(0)
}

#[cfg(test)]
mod tests;
