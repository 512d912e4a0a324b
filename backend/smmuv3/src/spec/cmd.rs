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

/// Bits `[hi:lo]` set (constants only: `lo <= hi <= 63`).
const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> 63u32.wrapping_sub(hi)) & (u64::MAX << lo)
}

/// The in-place masks of a command's fields, named as the [`RawCommand`] accessors that read
/// them. Each lives in d0 (command bits \[63:0\]) or d1 (bits \[127:64\]), as its
/// documentation says; a field's meaning depends on the opcode.
pub mod mask {
    use super::bits;

    /// d0\[7:0\] Opcode.
    pub const OPCODE: u64 = bits(7, 0);
    /// d0\[9\] Global (ATC_INV).
    pub const GLOBAL: u64 = bits(9, 9);
    /// d0\[10\] SSec.
    pub const SSEC: u64 = bits(10, 10);
    /// d0\[11\] SSV.
    pub const SSV: u64 = bits(11, 11);
    /// d0\[31:12\] SubstreamID.
    pub const SSID: u64 = bits(31, 12);
    /// d0\[63:32\] StreamID.
    pub const SID: u64 = bits(63, 32);
    /// d0\[47:32\] VMID (TLBI commands).
    pub const VMID: u64 = bits(47, 32);
    /// d0\[63:48\] ASID (TLBI commands).
    pub const ASID: u64 = bits(63, 48);
    /// d0\[16:12\] NUM (range invalidation).
    pub const NUM: u64 = bits(16, 12);
    /// d0\[25:20\] SCALE (range invalidation).
    pub const SCALE: u64 = bits(25, 20);
    /// d0\[13:12\] CS (CMD_SYNC).
    pub const SYNC_CS: u64 = bits(13, 12);
    /// d0\[23:22\] MSH (CMD_SYNC).
    pub const SYNC_MSH: u64 = bits(23, 22);
    /// d0\[27:24\] MSIAttr (CMD_SYNC).
    pub const SYNC_MSIATTR: u64 = bits(27, 24);
    /// d0\[63:32\] MSIData (CMD_SYNC).
    pub const SYNC_MSIDATA: u64 = bits(63, 32);
    /// d1\[0\] Leaf.
    pub const LEAF: u64 = bits(0, 0);
    /// d1\[9:8\] TTL.
    pub const TTL: u64 = bits(9, 8);
    /// d1\[11:10\] TG.
    pub const TG: u64 = bits(11, 10);
    /// d1\[63:12\] Address bits \[63:12\].
    pub const ADDRESS: u64 = bits(63, 12);
    /// d1\[51:12\] IPA bits \[51:12\] (TLBI_S2_IPA).
    pub const IPA: u64 = bits(51, 12);
    /// d1\[4:0\] Range (CFGI_STE_RANGE).
    pub const RANGE: u64 = bits(4, 0);
    /// d1\[5:0\] Size (ATC_INV).
    pub const ATC_SIZE: u64 = bits(5, 0);
    /// d1\[51:2\] MSIAddress bits \[51:2\] (CMD_SYNC).
    pub const SYNC_MSIADDR: u64 = bits(51, 2);
}

/// Reads the field `mask` of `d`.
const fn get(d: u64, mask: u64) -> u64 {
    (d & mask) >> mask.trailing_zeros()
}

/// Writes `value` into the field `mask` of `d` (bits of `value` beyond the field are dropped).
const fn set(d: u64, mask: u64, value: u64) -> u64 {
    (d & !mask) | ((value << mask.trailing_zeros()) & mask)
}

impl RawCommand {
    /// Size in bytes.
    pub const SIZE: u64 = 16;

    /// \[7:0\] Opcode.
    pub fn opcode(&self) -> Opcode {
        Opcode(get(self.d0, mask::OPCODE) as u8)
    }

    /// \[10\] SSec: the command came from the Secure queue (illegal on the Non-secure one).
    pub fn ssec(&self) -> bool {
        get(self.d0, mask::SSEC) != 0
    }

    /// \[11\] SSV: SubstreamID valid.
    pub fn ssv(&self) -> bool {
        get(self.d0, mask::SSV) != 0
    }

    /// \[31:12\] SubstreamID.
    pub fn ssid(&self) -> u32 {
        get(self.d0, mask::SSID) as u32
    }

    /// \[63:32\] StreamID.
    pub fn sid(&self) -> u32 {
        get(self.d0, mask::SID) as u32
    }

    /// The command with StreamID `sid`.
    pub fn with_sid(self, sid: u32) -> Self {
        Self {
            d0: set(self.d0, mask::SID, u64::from(sid)),
            ..self
        }
    }

    /// \[47:32\] VMID (TLBI commands).
    pub fn vmid(&self) -> u16 {
        get(self.d0, mask::VMID) as u16
    }

    /// The command with VMID `vmid`.
    pub fn with_vmid(self, vmid: u16) -> Self {
        Self {
            d0: set(self.d0, mask::VMID, u64::from(vmid)),
            ..self
        }
    }

    /// \[63:48\] ASID (TLBI commands).
    pub fn asid(&self) -> u16 {
        get(self.d0, mask::ASID) as u16
    }

    /// \[16:12\] NUM: range invalidation, number of units minus one.
    pub fn num(&self) -> u8 {
        get(self.d0, mask::NUM) as u8
    }

    /// \[25:20\] SCALE: range invalidation, units are 2^SCALE pages.
    pub fn scale(&self) -> u8 {
        get(self.d0, mask::SCALE) as u8
    }

    /// \[64\] Leaf (d1\[0\]): only leaf entries need invalidating.
    pub fn leaf(&self) -> bool {
        get(self.d1, mask::LEAF) != 0
    }

    /// \[73:72\] TTL (d1\[9:8\]): the level of the leaf entries, 0 if unknown.
    pub fn ttl(&self) -> u8 {
        get(self.d1, mask::TTL) as u8
    }

    /// \[75:74\] TG (d1\[11:10\]): range granule, 0 for a non-range invalidation, 1 4K,
    /// 2 16K, 3 64K.
    pub fn tg(&self) -> u8 {
        get(self.d1, mask::TG) as u8
    }

    /// \[127:76\] Address bits \[63:12\] (TLBI_NH_VA/VAA, ATC_INV, PREFETCH_ADDR).
    pub fn address(&self) -> u64 {
        self.d1 & mask::ADDRESS
    }

    /// \[115:76\] IPA bits \[51:12\] (TLBI_S2_IPA).
    pub fn ipa(&self) -> u64 {
        self.d1 & mask::IPA
    }

    /// \[68:64\] Range (CFGI_STE_RANGE): the STEs \[SID & !(2^(Range+1)-1), +2^(Range+1)) are
    /// invalidated; 31 invalidates all.
    pub fn range(&self) -> u8 {
        get(self.d1, mask::RANGE) as u8
    }

    /// \[69:64\] Size (ATC_INV): log2 of the number of 4 KiB pages.
    pub fn atc_size(&self) -> u8 {
        get(self.d1, mask::ATC_SIZE) as u8
    }

    /// \[9\] Global (ATC_INV).
    pub fn global(&self) -> bool {
        get(self.d0, mask::GLOBAL) != 0
    }

    /// \[13:12\] CS (CMD_SYNC): completion signal, 0 none, 1 IRQ/MSI, 2 SEV.
    pub fn sync_cs(&self) -> u8 {
        get(self.d0, mask::SYNC_CS) as u8
    }

    /// \[23:22\] MSH (CMD_SYNC): MSI shareability.
    pub fn sync_msh(&self) -> u8 {
        get(self.d0, mask::SYNC_MSH) as u8
    }

    /// \[27:24\] MSIAttr (CMD_SYNC).
    pub fn sync_msiattr(&self) -> u8 {
        get(self.d0, mask::SYNC_MSIATTR) as u8
    }

    /// \[63:32\] MSIData (CMD_SYNC).
    pub fn sync_msidata(&self) -> u32 {
        get(self.d0, mask::SYNC_MSIDATA) as u32
    }

    /// \[115:66\] MSIAddress bits \[51:2\] (CMD_SYNC).
    pub fn sync_msiaddr(&self) -> u64 {
        self.d1 & mask::SYNC_MSIADDR
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

    /// The accessors read the bit ranges they read before the masks existed: the old
    /// extraction, `field(d, hi, lo)` and the old literals, copied here.
    #[test]
    fn masks_read_the_documented_ranges() {
        const fn field(d: u64, hi: u32, lo: u32) -> u64 {
            (d >> lo) & (u64::MAX >> 63u32.wrapping_sub(hi).wrapping_add(lo))
        }
        let words = [
            0,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0xa5a5_a5a5_5a5a_5a5a,
            1 << 63 | 1,
        ];
        for d0 in words {
            for d1 in words {
                let c = RawCommand { d0, d1 };
                assert_eq!(u64::from(c.opcode().0), field(d0, 7, 0));
                assert_eq!(u64::from(c.ssec()), field(d0, 10, 10));
                assert_eq!(u64::from(c.ssv()), field(d0, 11, 11));
                assert_eq!(u64::from(c.ssid()), field(d0, 31, 12));
                assert_eq!(u64::from(c.sid()), field(d0, 63, 32));
                assert_eq!(u64::from(c.vmid()), field(d0, 47, 32));
                assert_eq!(u64::from(c.asid()), field(d0, 63, 48));
                assert_eq!(u64::from(c.num()), field(d0, 16, 12));
                assert_eq!(u64::from(c.scale()), field(d0, 25, 20));
                assert_eq!(u64::from(c.leaf()), field(d1, 0, 0));
                assert_eq!(u64::from(c.ttl()), field(d1, 9, 8));
                assert_eq!(u64::from(c.tg()), field(d1, 11, 10));
                assert_eq!(c.address(), d1 & !0xfff);
                assert_eq!(c.ipa(), d1 & 0x000f_ffff_ffff_f000);
                assert_eq!(u64::from(c.range()), field(d1, 4, 0));
                assert_eq!(u64::from(c.atc_size()), field(d1, 5, 0));
                assert_eq!(u64::from(c.global()), field(d0, 9, 9));
                assert_eq!(u64::from(c.sync_cs()), field(d0, 13, 12));
                assert_eq!(u64::from(c.sync_msh()), field(d0, 23, 22));
                assert_eq!(u64::from(c.sync_msiattr()), field(d0, 27, 24));
                assert_eq!(u64::from(c.sync_msidata()), field(d0, 63, 32));
                assert_eq!(c.sync_msiaddr(), d1 & 0x000f_ffff_ffff_fffc);
            }
        }
    }

    /// The setters replace one field and keep every other bit.
    #[test]
    fn setters_replace_one_field() {
        let c = RawCommand {
            d0: 0x1234_5678_9abc_def0,
            d1: 0x1111,
        };
        assert_eq!(
            c.with_vmid(0xbeef),
            RawCommand {
                d0: 0x1234_beef_9abc_def0,
                d1: 0x1111
            }
        );
        assert_eq!(
            c.with_sid(0xcafe_f00d),
            RawCommand {
                d0: 0xcafe_f00d_9abc_def0,
                d1: 0x1111
            }
        );
        assert_eq!(c.with_vmid(7).vmid(), 7);
        assert_eq!(c.with_sid(7).sid(), 7);
    }
}
