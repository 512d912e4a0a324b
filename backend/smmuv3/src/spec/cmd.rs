//! Commands (16 bytes) of the command queue.

use open_enum::open_enum;

/// The opcode in bits \[7:0\] of a command. Guest-written: any value may appear.
#[open_enum]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    PREFETCH_CONFIG = 0x01,
    PREFETCH_ADDR = 0x02,
    CFGI_STE = 0x03,
    /// Also CFGI_ALL, with Range = 31.
    CFGI_STE_RANGE = 0x04,
    CFGI_CD = 0x05,
    CFGI_CD_ALL = 0x06,
    CFGI_VMS_PIDM = 0x07,
    TLBI_NH_ALL = 0x10,
    TLBI_NH_ASID = 0x11,
    TLBI_NH_VA = 0x12,
    TLBI_NH_VAA = 0x13,
    TLBI_EL3_ALL = 0x18,
    TLBI_EL3_VA = 0x1a,
    TLBI_EL2_ALL = 0x20,
    TLBI_EL2_ASID = 0x21,
    TLBI_EL2_VA = 0x22,
    TLBI_EL2_VAA = 0x23,
    TLBI_S12_VMALL = 0x28,
    TLBI_S2_IPA = 0x2a,
    TLBI_NSNH_ALL = 0x30,
    ATC_INV = 0x40,
    PRI_RESP = 0x41,
    RESUME = 0x44,
    STALL_TERM = 0x45,
    CMD_SYNC = 0x46,
}

/// A raw command: two little-endian qwords.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RawCommand {
    /// Bits \[63:0\].
    pub d0: u64,
    /// Bits \[127:64\].
    pub d1: u64,
}

/// Extracts `d[hi:lo]`.
const fn field(d: u64, hi: u32, lo: u32) -> u64 {
    (d >> lo) & (u64::MAX >> 63u32.wrapping_sub(hi).wrapping_add(lo))
}

impl RawCommand {
    /// Size in bytes.
    pub const SIZE: u64 = 16;

    /// \[7:0\] Opcode.
    pub fn opcode(&self) -> Opcode {
        Opcode(field(self.d0, 7, 0) as u8)
    }

    /// \[10\] SSec: the command came from the Secure queue (illegal on the Non-secure one).
    pub fn ssec(&self) -> bool {
        field(self.d0, 10, 10) != 0
    }

    /// \[11\] SSV: SubstreamID valid.
    pub fn ssv(&self) -> bool {
        field(self.d0, 11, 11) != 0
    }

    /// \[31:12\] SubstreamID.
    pub fn ssid(&self) -> u32 {
        field(self.d0, 31, 12) as u32
    }

    /// \[63:32\] StreamID.
    pub fn sid(&self) -> u32 {
        field(self.d0, 63, 32) as u32
    }

    /// \[47:32\] VMID (TLBI commands).
    pub fn vmid(&self) -> u16 {
        field(self.d0, 47, 32) as u16
    }

    /// \[63:48\] ASID (TLBI commands).
    pub fn asid(&self) -> u16 {
        field(self.d0, 63, 48) as u16
    }

    /// \[16:12\] NUM: range invalidation, number of units minus one.
    pub fn num(&self) -> u8 {
        field(self.d0, 16, 12) as u8
    }

    /// \[25:20\] SCALE: range invalidation, units are 2^SCALE pages.
    pub fn scale(&self) -> u8 {
        field(self.d0, 25, 20) as u8
    }

    /// \[64\] Leaf (d1\[0\]): only leaf entries need invalidating.
    pub fn leaf(&self) -> bool {
        field(self.d1, 0, 0) != 0
    }

    /// \[73:72\] TTL (d1\[9:8\]): the level of the leaf entries, 0 if unknown.
    pub fn ttl(&self) -> u8 {
        field(self.d1, 9, 8) as u8
    }

    /// \[75:74\] TG (d1\[11:10\]): range granule, 0 for a non-range invalidation, 1 4K,
    /// 2 16K, 3 64K.
    pub fn tg(&self) -> u8 {
        field(self.d1, 11, 10) as u8
    }

    /// \[127:76\] Address bits \[63:12\] (TLBI_NH_VA/VAA, ATC_INV, PREFETCH_ADDR).
    pub fn address(&self) -> u64 {
        self.d1 & !0xfff
    }

    /// \[115:76\] IPA bits \[51:12\] (TLBI_S2_IPA).
    pub fn ipa(&self) -> u64 {
        self.d1 & 0x000f_ffff_ffff_f000
    }

    /// \[68:64\] Range (CFGI_STE_RANGE): the STEs \[SID & !(2^(Range+1)-1), +2^(Range+1)) are
    /// invalidated; 31 invalidates all.
    pub fn range(&self) -> u8 {
        field(self.d1, 4, 0) as u8
    }

    /// \[69:64\] Size (ATC_INV): log2 of the number of 4 KiB pages.
    pub fn atc_size(&self) -> u8 {
        field(self.d1, 5, 0) as u8
    }

    /// \[9\] Global (ATC_INV).
    pub fn global(&self) -> bool {
        field(self.d0, 9, 9) != 0
    }

    /// \[13:12\] CS (CMD_SYNC): completion signal, 0 none, 1 IRQ/MSI, 2 SEV.
    pub fn sync_cs(&self) -> u8 {
        field(self.d0, 13, 12) as u8
    }

    /// \[23:22\] MSH (CMD_SYNC): MSI shareability.
    pub fn sync_msh(&self) -> u8 {
        field(self.d0, 23, 22) as u8
    }

    /// \[27:24\] MSIAttr (CMD_SYNC).
    pub fn sync_msiattr(&self) -> u8 {
        field(self.d0, 27, 24) as u8
    }

    /// \[63:32\] MSIData (CMD_SYNC).
    pub fn sync_msidata(&self) -> u32 {
        field(self.d0, 63, 32) as u32
    }

    /// \[115:66\] MSIAddress bits \[51:2\] (CMD_SYNC).
    pub fn sync_msiaddr(&self) -> u64 {
        self.d1 & 0x000f_ffff_ffff_fffc
    }
}

/// CMD_SYNC.CS values.
pub mod sync_cs {
    /// No signal.
    pub const NONE: u8 = 0;
    /// Signal by interrupt (an MSI when MSIAddress is set and IDR0.MSI).
    pub const SIG_IRQ: u8 = 1;
    /// Signal by SEV.
    pub const SIG_SEV: u8 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodings as Linux's arm_smmu_cmdq_build_cmd() produces them (arm-smmu-v3.h field
    /// definitions): the accessors read back what the driver put in.
    #[test]
    fn decodes_linux_command_encodings() {
        // CMDQ_OP_TLBI_NH_VA, ASID 0x1234, VMID 0, NUM 3, SCALE 1, TG 1 (4K), TTL 3, leaf,
        // address 0x7fff_0000_2000.
        let cmd = RawCommand {
            d0: 0x12 | (3 << 12) | (1 << 20) | (0x1234 << 48),
            d1: 1 | (3 << 8) | (1 << 10) | 0x7fff_0000_2000,
        };
        assert_eq!(cmd.opcode(), Opcode::TLBI_NH_VA);
        assert_eq!(
            (cmd.asid(), cmd.vmid(), cmd.num(), cmd.scale()),
            (0x1234, 0, 3, 1)
        );
        assert_eq!((cmd.leaf(), cmd.ttl(), cmd.tg()), (true, 3, 1));
        assert_eq!(cmd.address(), 0x7fff_0000_2000);

        // CMDQ_OP_CFGI_STE, SID 0x0010, leaf.
        let cmd = RawCommand {
            d0: 0x03 | (0x10 << 32),
            d1: 1,
        };
        assert_eq!(
            (cmd.opcode(), cmd.sid(), cmd.leaf()),
            (Opcode::CFGI_STE, 0x10, true)
        );

        // CMDQ_OP_CFGI_ALL: CFGI_STE_RANGE with range 31.
        let cmd = RawCommand { d0: 0x04, d1: 31 };
        assert_eq!((cmd.opcode(), cmd.range()), (Opcode::CFGI_STE_RANGE, 31));

        // CMD_SYNC with MSIPOLL: CS=IRQ, MSH=ISH (3), MSIATTR=OIWB (0xf), MSIADDR.
        let cmd = RawCommand {
            d0: 0x46 | (1 << 12) | (3 << 22) | (0xf << 24),
            d1: 0x8000_1230,
        };
        assert_eq!(
            (cmd.sync_cs(), cmd.sync_msh(), cmd.sync_msiattr()),
            (1, 3, 0xf)
        );
        assert_eq!((cmd.sync_msidata(), cmd.sync_msiaddr()), (0, 0x8000_1230));

        // CMDQ_OP_ATC_INV: SID 8, SSV, SSID 5, size 52 (all), global.
        let cmd = RawCommand {
            d0: 0x40 | (1 << 9) | (1 << 11) | (5 << 12) | (8 << 32),
            d1: 52,
        };
        assert_eq!(
            (
                cmd.ssv(),
                cmd.ssid(),
                cmd.sid(),
                cmd.atc_size(),
                cmd.global()
            ),
            (true, 5, 8, 52, true)
        );

        // An opcode the architecture does not define stays representable.
        assert_eq!(RawCommand { d0: 0xff, d1: 0 }.opcode(), Opcode(0xff));
    }
}
