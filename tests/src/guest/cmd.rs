//! Commands, encoded as Linux's `arm_smmu_cmdq_build_cmd()` encodes them.

use super::bits::{bit, genmask, prep};
use super::regs::{ARM_SMMU_MEMATTR_OIWB, ARM_SMMU_SH_ISH};

/// Opcodes (`CMDQ_OP_*`, plus the spec's opcodes Linux does not use).
#[allow(missing_docs)]
pub mod op {
    pub const PREFETCH_CFG: u8 = 0x1;
    pub const PREFETCH_ADDR: u8 = 0x2;
    pub const CFGI_STE: u8 = 0x3;
    pub const CFGI_ALL: u8 = 0x4;
    pub const CFGI_STE_RANGE: u8 = 0x4;
    pub const CFGI_CD: u8 = 0x5;
    pub const CFGI_CD_ALL: u8 = 0x6;
    pub const CFGI_VMS_PIDM: u8 = 0x7;
    pub const TLBI_NH_ALL: u8 = 0x10;
    pub const TLBI_NH_ASID: u8 = 0x11;
    pub const TLBI_NH_VA: u8 = 0x12;
    pub const TLBI_NH_VAA: u8 = 0x13;
    pub const TLBI_EL3_ALL: u8 = 0x18;
    pub const TLBI_EL3_VA: u8 = 0x1a;
    pub const TLBI_EL2_ALL: u8 = 0x20;
    pub const TLBI_EL2_ASID: u8 = 0x21;
    pub const TLBI_EL2_VA: u8 = 0x22;
    pub const TLBI_EL2_VAA: u8 = 0x23;
    pub const TLBI_S12_VMALL: u8 = 0x28;
    pub const TLBI_S2_IPA: u8 = 0x2a;
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    pub const ATC_INV: u8 = 0x40;
    pub const PRI_RESP: u8 = 0x41;
    pub const RESUME: u8 = 0x44;
    pub const STALL_TERM: u8 = 0x45;
    pub const CMD_SYNC: u8 = 0x46;
}

/// `CMDQ_0_OP`.
pub const CMDQ_0_OP: u64 = genmask(7, 0);
/// `CMDQ_0_SSV`.
pub const CMDQ_0_SSV: u64 = bit(11);
/// SSec (spec 4.1.6; Linux never sets it).
pub const CMDQ_0_SSEC: u64 = bit(10);
pub const CMDQ_PREFETCH_0_SID: u64 = genmask(63, 32);
pub const CMDQ_PREFETCH_1_SIZE: u64 = genmask(4, 0);
pub const CMDQ_PREFETCH_1_ADDR_MASK: u64 = genmask(63, 12);
pub const CMDQ_CFGI_0_SSID: u64 = genmask(31, 12);
pub const CMDQ_CFGI_0_SID: u64 = genmask(63, 32);
pub const CMDQ_CFGI_1_LEAF: u64 = bit(0);
pub const CMDQ_CFGI_1_RANGE: u64 = genmask(4, 0);
pub const CMDQ_TLBI_0_NUM: u64 = genmask(16, 12);
pub const CMDQ_TLBI_RANGE_NUM_MAX: u64 = 31;
pub const CMDQ_TLBI_0_SCALE: u64 = genmask(24, 20);
pub const CMDQ_TLBI_0_VMID: u64 = genmask(47, 32);
pub const CMDQ_TLBI_0_ASID: u64 = genmask(63, 48);
pub const CMDQ_TLBI_1_LEAF: u64 = bit(0);
pub const CMDQ_TLBI_1_TTL: u64 = genmask(9, 8);
pub const CMDQ_TLBI_1_TG: u64 = genmask(11, 10);
pub const CMDQ_TLBI_1_VA_MASK: u64 = genmask(63, 12);
pub const CMDQ_TLBI_1_IPA_MASK: u64 = genmask(51, 12);
pub const CMDQ_ATC_0_SSID: u64 = genmask(31, 12);
pub const CMDQ_ATC_0_SID: u64 = genmask(63, 32);
pub const CMDQ_ATC_0_GLOBAL: u64 = bit(9);
pub const CMDQ_ATC_1_SIZE: u64 = genmask(5, 0);
pub const CMDQ_ATC_1_ADDR_MASK: u64 = genmask(63, 12);
pub const CMDQ_PRI_0_SSID: u64 = genmask(31, 12);
pub const CMDQ_PRI_0_SID: u64 = genmask(63, 32);
pub const CMDQ_PRI_1_GRPID: u64 = genmask(8, 0);
pub const CMDQ_PRI_1_RESP: u64 = genmask(13, 12);
pub const CMDQ_RESUME_0_RESP: u64 = genmask(13, 12);
pub const CMDQ_RESUME_0_SID: u64 = genmask(63, 32);
pub const CMDQ_RESUME_1_STAG: u64 = genmask(15, 0);
pub const CMDQ_SYNC_0_CS: u64 = genmask(13, 12);
pub const CMDQ_SYNC_0_CS_NONE: u64 = 0;
pub const CMDQ_SYNC_0_CS_IRQ: u64 = 1;
pub const CMDQ_SYNC_0_CS_SEV: u64 = 2;
pub const CMDQ_SYNC_0_MSH: u64 = genmask(23, 22);
pub const CMDQ_SYNC_0_MSIATTR: u64 = genmask(27, 24);
pub const CMDQ_SYNC_0_MSIDATA: u64 = genmask(63, 32);
pub const CMDQ_SYNC_1_MSIADDR_MASK: u64 = genmask(51, 2);

/// A built command: two little-endian dwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Command(pub [u64; 2]);

impl Command {
    /// A command from raw dwords.
    pub const fn raw(d0: u64, d1: u64) -> Self {
        Self([d0, d1])
    }

    /// Dword 0.
    pub fn d0(&self) -> u64 {
        self.0[0]
    }

    /// Dword 1.
    pub fn d1(&self) -> u64 {
        self.0[1]
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        (self.0[0] & CMDQ_0_OP) as u8
    }

    /// The same command with SSec = 1 (illegal on the Non-secure queue).
    pub fn with_ssec(self) -> Self {
        Self([self.0[0] | CMDQ_0_SSEC, self.0[1]])
    }
}

/// The fields of an address-based TLBI (`arm_smmu_cmdq_ent.tlbi`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tlbi {
    pub vmid: u16,
    pub asid: u16,
    pub addr: u64,
    pub leaf: bool,
    pub num: u8,
    pub scale: u8,
    pub ttl: u8,
    pub tg: u8,
}

impl Tlbi {
    fn range_d0(&self) -> u64 {
        prep(CMDQ_TLBI_0_NUM, u64::from(self.num)) | prep(CMDQ_TLBI_0_SCALE, u64::from(self.scale))
    }

    fn d1(&self, addr_mask: u64) -> u64 {
        prep(CMDQ_TLBI_1_LEAF, u64::from(self.leaf))
            | prep(CMDQ_TLBI_1_TTL, u64::from(self.ttl))
            | prep(CMDQ_TLBI_1_TG, u64::from(self.tg))
            | (self.addr & addr_mask)
    }
}

/// `arm_smmu_cmdq_ent`: a command before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum CmdEnt {
    PrefetchCfg {
        sid: u32,
    },
    CfgiSte {
        sid: u32,
        leaf: bool,
    },
    /// CFGI_STE_RANGE: 2^(range + 1) STEs around `sid`.
    CfgiSteRange {
        sid: u32,
        range: u8,
    },
    /// CFGI_ALL: CFGI_STE_RANGE with Range = 31.
    CfgiAll,
    CfgiCd {
        sid: u32,
        ssid: u32,
        leaf: bool,
    },
    CfgiCdAll {
        sid: u32,
    },
    TlbiNhAll {
        vmid: u16,
    },
    TlbiNhAsid {
        vmid: u16,
        asid: u16,
    },
    TlbiNhVa(Tlbi),
    /// TLBI_NH_VAA: like NH_VA without the ASID (Linux does not use it).
    TlbiNhVaa(Tlbi),
    TlbiS2Ipa(Tlbi),
    TlbiS12Vmall {
        vmid: u16,
    },
    TlbiNsnhAll,
    TlbiEl2All,
    AtcInv {
        sid: u32,
        ssid: Option<u32>,
        addr: u64,
        size: u8,
        global: bool,
    },
    PriResp {
        sid: u32,
        ssid: Option<u32>,
        grpid: u16,
        resp: u8,
    },
    Resume {
        sid: u32,
        stag: u16,
        resp: u8,
    },
    /// CMD_SYNC with explicit fields (`cs` may be any 2-bit value, for tests).
    Sync {
        cs: u8,
        msiaddr: u64,
        msidata: u32,
    },
}

impl CmdEnt {
    /// Linux's CMD_SYNC: CS = IRQ with MSIADDR when it polls an MSI, SEV otherwise.
    pub fn linux_sync(msiaddr: u64) -> Self {
        let cs = if msiaddr != 0 {
            CMDQ_SYNC_0_CS_IRQ
        } else {
            CMDQ_SYNC_0_CS_SEV
        };
        CmdEnt::Sync {
            cs: cs as u8,
            msiaddr,
            msidata: 0,
        }
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        match self {
            CmdEnt::PrefetchCfg { .. } => op::PREFETCH_CFG,
            CmdEnt::CfgiSte { .. } => op::CFGI_STE,
            CmdEnt::CfgiSteRange { .. } | CmdEnt::CfgiAll => op::CFGI_ALL,
            CmdEnt::CfgiCd { .. } => op::CFGI_CD,
            CmdEnt::CfgiCdAll { .. } => op::CFGI_CD_ALL,
            CmdEnt::TlbiNhAll { .. } => op::TLBI_NH_ALL,
            CmdEnt::TlbiNhAsid { .. } => op::TLBI_NH_ASID,
            CmdEnt::TlbiNhVa(_) => op::TLBI_NH_VA,
            CmdEnt::TlbiNhVaa(_) => op::TLBI_NH_VAA,
            CmdEnt::TlbiS2Ipa(_) => op::TLBI_S2_IPA,
            CmdEnt::TlbiS12Vmall { .. } => op::TLBI_S12_VMALL,
            CmdEnt::TlbiNsnhAll => op::TLBI_NSNH_ALL,
            CmdEnt::TlbiEl2All => op::TLBI_EL2_ALL,
            CmdEnt::AtcInv { .. } => op::ATC_INV,
            CmdEnt::PriResp { .. } => op::PRI_RESP,
            CmdEnt::Resume { .. } => op::RESUME,
            CmdEnt::Sync { .. } => op::CMD_SYNC,
        }
    }

    /// `arm_smmu_cmdq_build_cmd()`.
    pub fn build(&self) -> Command {
        let mut d0 = prep(CMDQ_0_OP, u64::from(self.opcode()));
        let mut d1 = 0u64;
        match *self {
            CmdEnt::TlbiNsnhAll | CmdEnt::TlbiEl2All => {}
            CmdEnt::PrefetchCfg { sid } => d0 |= prep(CMDQ_PREFETCH_0_SID, u64::from(sid)),
            CmdEnt::CfgiCd { sid, ssid, leaf } => {
                d0 |= prep(CMDQ_CFGI_0_SSID, u64::from(ssid));
                d0 |= prep(CMDQ_CFGI_0_SID, u64::from(sid));
                d1 |= prep(CMDQ_CFGI_1_LEAF, u64::from(leaf));
            }
            CmdEnt::CfgiSte { sid, leaf } => {
                d0 |= prep(CMDQ_CFGI_0_SID, u64::from(sid));
                d1 |= prep(CMDQ_CFGI_1_LEAF, u64::from(leaf));
            }
            CmdEnt::CfgiCdAll { sid } => d0 |= prep(CMDQ_CFGI_0_SID, u64::from(sid)),
            CmdEnt::CfgiAll => d1 |= prep(CMDQ_CFGI_1_RANGE, 31),
            CmdEnt::CfgiSteRange { sid, range } => {
                d0 |= prep(CMDQ_CFGI_0_SID, u64::from(sid));
                d1 |= prep(CMDQ_CFGI_1_RANGE, u64::from(range));
            }
            CmdEnt::TlbiNhVa(t) => {
                d0 |= prep(CMDQ_TLBI_0_VMID, u64::from(t.vmid));
                d0 |= t.range_d0() | prep(CMDQ_TLBI_0_ASID, u64::from(t.asid));
                d1 |= t.d1(CMDQ_TLBI_1_VA_MASK);
            }
            CmdEnt::TlbiNhVaa(t) => {
                d0 |= prep(CMDQ_TLBI_0_VMID, u64::from(t.vmid)) | t.range_d0();
                d1 |= t.d1(CMDQ_TLBI_1_VA_MASK);
            }
            CmdEnt::TlbiS2Ipa(t) => {
                d0 |= t.range_d0() | prep(CMDQ_TLBI_0_VMID, u64::from(t.vmid));
                d1 |= t.d1(CMDQ_TLBI_1_IPA_MASK);
            }
            CmdEnt::TlbiNhAsid { vmid, asid } => {
                d0 |= prep(CMDQ_TLBI_0_ASID, u64::from(asid));
                d0 |= prep(CMDQ_TLBI_0_VMID, u64::from(vmid));
            }
            CmdEnt::TlbiNhAll { vmid } | CmdEnt::TlbiS12Vmall { vmid } => {
                d0 |= prep(CMDQ_TLBI_0_VMID, u64::from(vmid));
            }
            CmdEnt::AtcInv {
                sid,
                ssid,
                addr,
                size,
                global,
            } => {
                d0 |= prep(CMDQ_0_SSV, u64::from(ssid.is_some()));
                d0 |= prep(CMDQ_ATC_0_GLOBAL, u64::from(global));
                d0 |= prep(CMDQ_ATC_0_SSID, u64::from(ssid.unwrap_or(0)));
                d0 |= prep(CMDQ_ATC_0_SID, u64::from(sid));
                d1 |= prep(CMDQ_ATC_1_SIZE, u64::from(size));
                d1 |= addr & CMDQ_ATC_1_ADDR_MASK;
            }
            CmdEnt::PriResp {
                sid,
                ssid,
                grpid,
                resp,
            } => {
                d0 |= prep(CMDQ_0_SSV, u64::from(ssid.is_some()));
                d0 |= prep(CMDQ_PRI_0_SSID, u64::from(ssid.unwrap_or(0)));
                d0 |= prep(CMDQ_PRI_0_SID, u64::from(sid));
                d1 |= prep(CMDQ_PRI_1_GRPID, u64::from(grpid));
                d1 |= prep(CMDQ_PRI_1_RESP, u64::from(resp));
            }
            CmdEnt::Resume { sid, stag, resp } => {
                d0 |= prep(CMDQ_RESUME_0_SID, u64::from(sid));
                d0 |= prep(CMDQ_RESUME_0_RESP, u64::from(resp));
                d1 |= prep(CMDQ_RESUME_1_STAG, u64::from(stag));
            }
            CmdEnt::Sync {
                cs,
                msiaddr,
                msidata,
            } => {
                d0 |= prep(CMDQ_SYNC_0_CS, u64::from(cs));
                d0 |= prep(CMDQ_SYNC_0_MSIDATA, u64::from(msidata));
                d1 |= msiaddr & CMDQ_SYNC_1_MSIADDR_MASK;
                d0 |= prep(CMDQ_SYNC_0_MSH, ARM_SMMU_SH_ISH);
                d0 |= prep(CMDQ_SYNC_0_MSIATTR, ARM_SMMU_MEMATTR_OIWB);
            }
        }
        Command([d0, d1])
    }
}

/// The TLBI commands `__arm_smmu_tlb_inv_range()` issues for `[iova, iova + size)`.
///
/// `template` selects the command and its VMID/ASID (its address and range fields are
/// overwritten). `granule` is the size of the entries being invalidated (the leaf size when
/// `leaf`), `pgsize_shift` the smallest page size of the domain (`__ffs(pgsize_bitmap)`), and
/// `ril` whether the SMMU has range invalidation (IDR3.RIL).
pub fn tlb_inv_range(
    template: CmdEnt,
    iova: u64,
    size: u64,
    granule: u64,
    leaf: bool,
    pgsize_shift: u32,
    ril: bool,
) -> Vec<CmdEnt> {
    let with = |t: Tlbi| match template {
        CmdEnt::TlbiNhVaa(_) => CmdEnt::TlbiNhVaa(t),
        CmdEnt::TlbiS2Ipa(_) => CmdEnt::TlbiS2Ipa(t),
        _ => CmdEnt::TlbiNhVa(t),
    };
    let mut base = match template {
        CmdEnt::TlbiNhVa(t) | CmdEnt::TlbiNhVaa(t) | CmdEnt::TlbiS2Ipa(t) => t,
        _ => Tlbi::default(),
    };
    base.leaf = leaf;
    let mut out = Vec::new();
    let end = iova.saturating_add(size);
    let mut num_pages = size.checked_shr(pgsize_shift).unwrap_or(0);
    let mut inv_range = granule;
    if ril {
        base.tg = (pgsize_shift.saturating_sub(10) / 2) as u8;
        if leaf {
            // TTL = 4 - ((ilog2(granule) - 3) / (tg - 3)).
            let lg = granule.max(1).ilog2();
            let per = pgsize_shift.saturating_sub(3).max(1);
            base.ttl =
                4u32.saturating_sub(lg.saturating_sub(3).checked_div(per).unwrap_or(0)) as u8;
        } else if num_pages & CMDQ_TLBI_RANGE_NUM_MAX == 1 {
            num_pages = num_pages.saturating_add(1);
        }
    }
    let mut addr = iova;
    while addr < end {
        let mut cmd = base;
        if ril {
            if num_pages == 0 {
                break;
            }
            let scale = num_pages.trailing_zeros();
            let num = num_pages.checked_shr(scale).unwrap_or(0) & CMDQ_TLBI_RANGE_NUM_MAX;
            cmd.scale = scale as u8;
            cmd.num = num.saturating_sub(1) as u8;
            inv_range = num
                .checked_shl(scale.saturating_add(pgsize_shift))
                .unwrap_or(u64::MAX);
            num_pages = num_pages.saturating_sub(num.checked_shl(scale).unwrap_or(u64::MAX));
        }
        cmd.addr = addr;
        out.push(with(cmd));
        addr = addr.saturating_add(inv_range.max(1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_encodings() {
        assert_eq!(CmdEnt::CfgiAll.build(), Command([0x04, 31]));
        assert_eq!(
            CmdEnt::CfgiSte {
                sid: 0x10,
                leaf: true
            }
            .build(),
            Command([0x03 | (0x10 << 32), 1])
        );
        let sync = CmdEnt::linux_sync(0).build();
        assert_eq!(
            sync,
            Command([0x46 | (2 << 12) | (3 << 22) | (0xf << 24), 0])
        );
        let t = Tlbi {
            asid: 0x1234,
            addr: 0x7fff_0000_2000,
            leaf: true,
            num: 3,
            scale: 1,
            ttl: 3,
            tg: 1,
            ..Tlbi::default()
        };
        assert_eq!(
            CmdEnt::TlbiNhVa(t).build(),
            Command([
                0x12 | (3 << 12) | (1 << 20) | (0x1234 << 48),
                1 | (3 << 8) | (1 << 10) | 0x7fff_0000_2000
            ])
        );
    }

    #[test]
    fn range_invalidation_split() {
        // 33 4K pages: 1 range of 1 page (scale 0, num 0) then 32 pages (scale 5, num 0).
        let cmds = tlb_inv_range(
            CmdEnt::TlbiNhVa(Tlbi::default()),
            0x10_0000,
            33 << 12,
            0x1000,
            true,
            12,
            true,
        );
        assert_eq!(cmds.len(), 2);
        let CmdEnt::TlbiNhVa(a) = cmds[0] else {
            panic!()
        };
        let CmdEnt::TlbiNhVa(b) = cmds[1] else {
            panic!()
        };
        assert_eq!(
            (a.addr, a.num, a.scale, a.tg, a.ttl),
            (0x10_0000, 0, 0, 1, 3)
        );
        assert_eq!((b.addr, b.num, b.scale), (0x10_1000, 0, 5));
        // Without RIL: one command per granule.
        let cmds = tlb_inv_range(
            CmdEnt::TlbiNhVa(Tlbi::default()),
            0x10_0000,
            3 << 12,
            0x1000,
            true,
            12,
            false,
        );
        assert_eq!(cmds.len(), 3);
    }
}
