//! Event records, decoded with Linux's `EVTQ_*` masks (`arm_smmu_decode_event()`).

use super::bits::{bit, genmask, get};

/// Event types (`EVT_ID_*`, IHI 0070 7.3).
#[allow(missing_docs)]
pub mod id {
    pub const F_UUT: u8 = 0x01;
    pub const C_BAD_STREAMID: u8 = 0x02;
    pub const F_STE_FETCH: u8 = 0x03;
    pub const C_BAD_STE: u8 = 0x04;
    pub const F_BAD_ATS_TREQ: u8 = 0x05;
    pub const F_STREAM_DISABLED: u8 = 0x06;
    pub const F_TRANSL_FORBIDDEN: u8 = 0x07;
    pub const C_BAD_SUBSTREAMID: u8 = 0x08;
    pub const F_CD_FETCH: u8 = 0x09;
    pub const C_BAD_CD: u8 = 0x0a;
    pub const F_WALK_EABT: u8 = 0x0b;
    pub const F_TRANSLATION: u8 = 0x10;
    pub const F_ADDR_SIZE: u8 = 0x11;
    pub const F_ACCESS: u8 = 0x12;
    pub const F_PERMISSION: u8 = 0x13;
    pub const F_TLB_CONFLICT: u8 = 0x20;
    pub const F_CFG_CONFLICT: u8 = 0x21;
    pub const E_PAGE_REQUEST: u8 = 0x24;
    pub const F_VMS_FETCH: u8 = 0x25;

    /// Every event type the architecture defines.
    pub const ALL: [u8; 19] = [
        F_UUT,
        C_BAD_STREAMID,
        F_STE_FETCH,
        C_BAD_STE,
        F_BAD_ATS_TREQ,
        F_STREAM_DISABLED,
        F_TRANSL_FORBIDDEN,
        C_BAD_SUBSTREAMID,
        F_CD_FETCH,
        C_BAD_CD,
        F_WALK_EABT,
        F_TRANSLATION,
        F_ADDR_SIZE,
        F_ACCESS,
        F_PERMISSION,
        F_TLB_CONFLICT,
        F_CFG_CONFLICT,
        E_PAGE_REQUEST,
        F_VMS_FETCH,
    ];
}

/// CLASS values (`EVTQ_1_CLASS`).
#[allow(missing_docs)]
pub mod class {
    pub const CD: u8 = 0;
    pub const TT: u8 = 1;
    pub const IN: u8 = 2;
}

pub const EVTQ_0_ID: u64 = genmask(7, 0);
pub const EVTQ_0_SSV: u64 = bit(11);
pub const EVTQ_0_SSID: u64 = genmask(31, 12);
pub const EVTQ_0_SID: u64 = genmask(63, 32);
pub const EVTQ_1_STAG: u64 = genmask(15, 0);
pub const EVTQ_1_STALL: u64 = bit(31);
pub const EVTQ_1_PNU: u64 = bit(33);
pub const EVTQ_1_IND: u64 = bit(34);
pub const EVTQ_1_RNW: u64 = bit(35);
pub const EVTQ_1_S2: u64 = bit(39);
pub const EVTQ_1_CLASS: u64 = genmask(41, 40);
pub const EVTQ_1_TT_READ: u64 = bit(44);
pub const EVTQ_2_ADDR: u64 = genmask(63, 0);
pub const EVTQ_3_IPA: u64 = genmask(51, 12);
pub const EVTQ_3_FETCH_ADDR: u64 = genmask(51, 3);

/// One 32-byte event record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Event(pub [u64; 4]);

impl Event {
    fn dw(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(0)
    }

    /// `EVTQ_0_ID`.
    pub fn id(&self) -> u8 {
        get(EVTQ_0_ID, self.dw(0)) as u8
    }

    /// `EVTQ_0_SSV`.
    pub fn ssv(&self) -> bool {
        get(EVTQ_0_SSV, self.dw(0)) != 0
    }

    /// `EVTQ_0_SSID`.
    pub fn ssid(&self) -> u32 {
        get(EVTQ_0_SSID, self.dw(0)) as u32
    }

    /// The SubstreamID when SSV says it is valid.
    pub fn substream(&self) -> Option<u32> {
        self.ssv().then(|| self.ssid())
    }

    /// `EVTQ_0_SID`.
    pub fn sid(&self) -> u32 {
        get(EVTQ_0_SID, self.dw(0)) as u32
    }

    /// `EVTQ_1_STAG`.
    pub fn stag(&self) -> u16 {
        get(EVTQ_1_STAG, self.dw(1)) as u16
    }

    /// `EVTQ_1_STALL`.
    pub fn stall(&self) -> bool {
        get(EVTQ_1_STALL, self.dw(1)) != 0
    }

    /// `EVTQ_1_PnU`: 1 = privileged.
    pub fn pnu(&self) -> bool {
        get(EVTQ_1_PNU, self.dw(1)) != 0
    }

    /// `EVTQ_1_InD`: 1 = instruction.
    pub fn ind(&self) -> bool {
        get(EVTQ_1_IND, self.dw(1)) != 0
    }

    /// `EVTQ_1_RnW`: 1 = read.
    pub fn rnw(&self) -> bool {
        get(EVTQ_1_RNW, self.dw(1)) != 0
    }

    /// `EVTQ_1_S2`: the fault is in stage 2.
    pub fn s2(&self) -> bool {
        get(EVTQ_1_S2, self.dw(1)) != 0
    }

    /// `EVTQ_1_CLASS`.
    pub fn class(&self) -> u8 {
        get(EVTQ_1_CLASS, self.dw(1)) as u8
    }

    /// `EVTQ_1_TT_READ` (TTRnW of F_PERMISSION).
    pub fn tt_read(&self) -> bool {
        get(EVTQ_1_TT_READ, self.dw(1)) != 0
    }

    /// `EVTQ_2_ADDR`: InputAddr.
    pub fn input_addr(&self) -> u64 {
        get(EVTQ_2_ADDR, self.dw(2))
    }

    /// `EVTQ_3_IPA` as an address (bits \[51:12\]).
    pub fn ipa(&self) -> u64 {
        self.dw(3) & EVTQ_3_IPA
    }

    /// `EVTQ_3_FETCH_ADDR` as an address (bits \[51:3\]).
    pub fn fetch_addr(&self) -> u64 {
        self.dw(3) & EVTQ_3_FETCH_ADDR
    }

    /// Whether the type is one the architecture defines.
    pub fn has_defined_type(&self) -> bool {
        id::ALL.contains(&self.id())
    }
}
