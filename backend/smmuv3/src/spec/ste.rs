//! Stream table entries (64 bytes) and level-1 stream table descriptors.

use bitfield_struct::bitfield;
use open_enum::open_enum;

/// STE.Config: what the SMMU does with a stream's transactions.
#[open_enum]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SteConfig {
    /// 0b000: abort, no event.
    ABORT = 0b000,
    /// 0b100: bypass both stages.
    BYPASS = 0b100,
    /// 0b101: stage 1 translate, stage 2 bypass.
    S1_TRANS = 0b101,
    /// 0b110: stage 1 bypass, stage 2 translate.
    S2_TRANS = 0b110,
    /// 0b111: both stages (nested).
    NESTED = 0b111,
}

/// STE.S1Fmt: the layout of the CD table.
#[open_enum]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum S1Fmt {
    /// 0b00: linear table of 2^S1CDMax CDs.
    LINEAR = 0,
    /// 0b01: 2-level, level-2 tables of 64 CDs (4 KiB): SSID\[5:0\] indexes level 2.
    L2_4K = 1,
    /// 0b10: 2-level, level-2 tables of 1024 CDs (64 KiB): SSID\[9:0\] indexes level 2.
    L2_64K = 2,
}

/// STE.S1DSS: what happens to transactions without a substream ID when S1CDMax > 0.
#[open_enum]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum S1Dss {
    /// 0b00: terminate non-substream transactions (F_STREAM_DISABLED).
    TERMINATE = 0,
    /// 0b01: bypass stage 1.
    BYPASS = 1,
    /// 0b10: use CD 0 (and substream 0 is then not usable with a substream ID).
    SUBSTREAM0 = 2,
}

/// STE qword 0.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct Ste0 {
    /// \[0\] V: the entry is valid.
    pub v: bool,
    /// \[3:1\] Config ([`SteConfig`]).
    #[bits(3)]
    pub config: u8,
    /// \[5:4\] S1Fmt ([`S1Fmt`]).
    #[bits(2)]
    pub s1fmt: u8,
    /// \[51:6\] S1ContextPtr: address bits \[51:6\] of the CD or CD table (an IPA if nested).
    #[bits(46)]
    pub s1contextptr: u64,
    #[bits(7)]
    __: u8,
    /// \[63:59\] S1CDMax: log2 of the number of CDs (0: one CD, no substreams).
    #[bits(5)]
    pub s1cdmax: u8,
}

/// The mask of a field `bits` wide at bit `offset`, from the `*_BITS` and `*_OFFSET` constants
/// bitfield-struct generates for each field. Used in constants only, where a field that is
/// empty or wider than 64 bits, or starts past bit 63, fails to compile.
const fn field_mask(bits: usize, offset: usize) -> u64 {
    let Some(clear) = (u64::BITS as usize).checked_sub(bits) else {
        panic!("field wider than 64 bits");
    };
    (u64::MAX >> clear) << offset
}

/// The in-place masks of the fields of [`Ste0`].
impl Ste0 {
    /// \[0\] V.
    pub const V_MASK: u64 = field_mask(Self::V_BITS, Self::V_OFFSET);
    /// \[3:1\] Config.
    pub const CONFIG_MASK: u64 = field_mask(Self::CONFIG_BITS, Self::CONFIG_OFFSET);
    /// \[5:4\] S1Fmt.
    pub const S1FMT_MASK: u64 = field_mask(Self::S1FMT_BITS, Self::S1FMT_OFFSET);
    /// \[51:6\] S1ContextPtr.
    pub const S1CONTEXTPTR_MASK: u64 =
        field_mask(Self::S1CONTEXTPTR_BITS, Self::S1CONTEXTPTR_OFFSET);
    /// \[63:59\] S1CDMax.
    pub const S1CDMAX_MASK: u64 = field_mask(Self::S1CDMAX_BITS, Self::S1CDMAX_OFFSET);
}

/// STE qword 1.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct Ste1 {
    /// \[1:0\] S1DSS ([`S1Dss`]).
    #[bits(2)]
    pub s1dss: u8,
    /// \[3:2\] S1CIR: CD and stage-1 table inner cacheability.
    #[bits(2)]
    pub s1cir: u8,
    /// \[5:4\] S1COR: outer cacheability.
    #[bits(2)]
    pub s1cor: u8,
    /// \[7:6\] S1CSH: shareability.
    #[bits(2)]
    pub s1csh: u8,
    #[bits(11)]
    __: u16,
    /// \[19\] MEV: merge events arising from the same fault.
    pub mev: bool,
    #[bits(5)]
    __: u8,
    /// \[25\] S2FWB: stage-2 forced write-back.
    pub s2fwb: bool,
    __: bool,
    /// \[27\] S1STALLD: stage-1 stall disable.
    pub s1stalld: bool,
    /// \[29:28\] EATS: ATS behaviour (0 abort ATS requests, 1 full ATS, 2 split-stage).
    #[bits(2)]
    pub eats: u8,
    /// \[31:30\] STRW: translation regime (0 NS-EL1, 2 EL2).
    #[bits(2)]
    pub strw: u8,
    /// \[35:32\] MemAttr override.
    #[bits(4)]
    pub memattr: u8,
    /// \[36\] MTCFG.
    pub mtcfg: bool,
    /// \[40:37\] ALLOCCFG.
    #[bits(4)]
    pub alloccfg: u8,
    #[bits(3)]
    __: u8,
    /// \[45:44\] SHCFG: shareability (1 = incoming).
    #[bits(2)]
    pub shcfg: u8,
    /// \[47:46\] NSCFG.
    #[bits(2)]
    pub nscfg: u8,
    /// \[49:48\] PRIVCFG: 0/1 use incoming, 2 unprivileged, 3 privileged.
    #[bits(2)]
    pub privcfg: u8,
    /// \[51:50\] INSTCFG: 0/1 use incoming, 2 data, 3 instruction.
    #[bits(2)]
    pub instcfg: u8,
    #[bits(12)]
    __: u16,
}

/// The in-place masks of the stage-1 fields of [`Ste1`] (the ones a nested vSTE carries).
impl Ste1 {
    /// \[1:0\] S1DSS.
    pub const S1DSS_MASK: u64 = field_mask(Self::S1DSS_BITS, Self::S1DSS_OFFSET);
    /// \[3:2\] S1CIR.
    pub const S1CIR_MASK: u64 = field_mask(Self::S1CIR_BITS, Self::S1CIR_OFFSET);
    /// \[5:4\] S1COR.
    pub const S1COR_MASK: u64 = field_mask(Self::S1COR_BITS, Self::S1COR_OFFSET);
    /// \[7:6\] S1CSH.
    pub const S1CSH_MASK: u64 = field_mask(Self::S1CSH_BITS, Self::S1CSH_OFFSET);
    /// \[27\] S1STALLD.
    pub const S1STALLD_MASK: u64 = field_mask(Self::S1STALLD_BITS, Self::S1STALLD_OFFSET);
    /// \[29:28\] EATS.
    pub const EATS_MASK: u64 = field_mask(Self::EATS_BITS, Self::EATS_OFFSET);
}

/// STE qword 2: stage-2 configuration.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct Ste2 {
    /// \[15:0\] S2VMID.
    pub s2vmid: u16,
    #[bits(16)]
    __: u16,
    /// \[37:32\] S2T0SZ: IPA size is 2^(64 - S2T0SZ).
    #[bits(6)]
    pub s2t0sz: u8,
    /// \[39:38\] S2SL0: starting level.
    #[bits(2)]
    pub s2sl0: u8,
    /// \[41:40\] S2IR0.
    #[bits(2)]
    pub s2ir0: u8,
    /// \[43:42\] S2OR0.
    #[bits(2)]
    pub s2or0: u8,
    /// \[45:44\] S2SH0.
    #[bits(2)]
    pub s2sh0: u8,
    /// \[47:46\] S2TG: 0 4K, 1 64K, 2 16K.
    #[bits(2)]
    pub s2tg: u8,
    /// \[50:48\] S2PS: physical address size, encoded as IDR5.OAS.
    #[bits(3)]
    pub s2ps: u8,
    /// \[51\] S2AA64: AArch64 tables (must be 1).
    pub s2aa64: bool,
    /// \[52\] S2ENDI: big-endian tables.
    pub s2endi: bool,
    /// \[53\] S2AFFD: access flag fault disable.
    pub s2affd: bool,
    /// \[54\] S2PTW: protected table walk.
    pub s2ptw: bool,
    /// \[55\] S2HD: hardware dirty update.
    pub s2hd: bool,
    /// \[56\] S2HA: hardware access flag update.
    pub s2ha: bool,
    /// \[57\] S2S: stage-2 stall.
    pub s2s: bool,
    /// \[58\] S2R: record stage-2 faults.
    pub s2r: bool,
    #[bits(5)]
    __: u8,
}

/// STE qword 3.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct Ste3 {
    #[bits(4)]
    __: u8,
    /// \[51:4\] S2TTB: stage-2 table address bits \[51:4\].
    #[bits(48)]
    pub s2ttb: u64,
    #[bits(12)]
    __: u16,
}

/// A stream table entry as read from guest memory: eight little-endian qwords.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Ste {
    /// The raw qwords.
    pub words: [u64; 8],
}

impl Ste {
    /// Size in bytes.
    pub const SIZE: u64 = 64;

    /// Qword 0.
    pub fn q0(&self) -> Ste0 {
        Ste0::from_bits(self.words[0])
    }

    /// Qword 1.
    pub fn q1(&self) -> Ste1 {
        Ste1::from_bits(self.words[1])
    }

    /// Qword 2.
    pub fn q2(&self) -> Ste2 {
        Ste2::from_bits(self.words[2])
    }

    /// Qword 3.
    pub fn q3(&self) -> Ste3 {
        Ste3::from_bits(self.words[3])
    }

    /// STE.Config.
    pub fn config(&self) -> SteConfig {
        SteConfig(self.q0().config())
    }

    /// S1ContextPtr as an address.
    pub fn s1_context_ptr(&self) -> u64 {
        self.q0().s1contextptr() << 6
    }

    /// S2TTB as an address.
    pub fn s2_ttb(&self) -> u64 {
        self.q3().s2ttb() << 4
    }
}

/// A level-1 stream table descriptor (8 bytes).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct L1Std {
    /// \[4:0\] Span: the level-2 table holds 2^(Span - 1) STEs; 0 means invalid.
    #[bits(5)]
    pub span: u8,
    #[bits(1)]
    __: u8,
    /// \[51:6\] L2Ptr: address bits \[51:6\] of the level-2 table.
    #[bits(46)]
    pub l2ptr: u64,
    #[bits(12)]
    __: u16,
}

impl L1Std {
    /// L2Ptr as an address.
    pub fn l2_address(&self) -> u64 {
        self.l2ptr() << 6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masks cover exactly the bit ranges the field documentation gives.
    #[test]
    fn field_masks_match_documented_ranges() {
        assert_eq!(Ste0::V_MASK, 0x1);
        assert_eq!(Ste0::CONFIG_MASK, 0xe);
        assert_eq!(Ste0::S1FMT_MASK, 0x30);
        assert_eq!(Ste0::S1CONTEXTPTR_MASK, 0x000f_ffff_ffff_ffc0);
        assert_eq!(Ste0::S1CDMAX_MASK, 0xf800_0000_0000_0000);
        assert_eq!(Ste1::S1DSS_MASK, 0x3);
        assert_eq!(Ste1::S1CIR_MASK, 0xc);
        assert_eq!(Ste1::S1COR_MASK, 0x30);
        assert_eq!(Ste1::S1CSH_MASK, 0xc0);
        assert_eq!(Ste1::S1STALLD_MASK, 1 << 27);
        assert_eq!(Ste1::EATS_MASK, 3 << 28);
        // A mask is the field set to all ones.
        assert_eq!(
            Ste0::S1CONTEXTPTR_MASK,
            Ste0::new().with_s1contextptr((1 << 46) - 1).into_bits()
        );
        assert_eq!(Ste1::EATS_MASK, Ste1::new().with_eats(3).into_bits());
    }
}
