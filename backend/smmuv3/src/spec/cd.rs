//! Context descriptors (64 bytes) and level-1 CD table descriptors.

use bitfield_struct::bitfield;

/// CD qword 0.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct Cd0 {
    /// \[5:0\] T0SZ.
    #[bits(6)]
    pub t0sz: u8,
    /// \[7:6\] TG0: 0 4K, 1 64K, 2 16K.
    #[bits(2)]
    pub tg0: u8,
    /// \[9:8\] IR0.
    #[bits(2)]
    pub ir0: u8,
    /// \[11:10\] OR0.
    #[bits(2)]
    pub or0: u8,
    /// \[13:12\] SH0.
    #[bits(2)]
    pub sh0: u8,
    /// \[14\] EPD0: walks of TTB0 disabled.
    pub epd0: bool,
    /// \[15\] ENDI: big-endian tables.
    pub endi: bool,
    /// \[21:16\] T1SZ.
    #[bits(6)]
    pub t1sz: u8,
    /// \[23:22\] TG1: 1 16K, 2 4K, 3 64K.
    #[bits(2)]
    pub tg1: u8,
    /// \[25:24\] IR1.
    #[bits(2)]
    pub ir1: u8,
    /// \[27:26\] OR1.
    #[bits(2)]
    pub or1: u8,
    /// \[29:28\] SH1.
    #[bits(2)]
    pub sh1: u8,
    /// \[30\] EPD1: walks of TTB1 disabled.
    pub epd1: bool,
    /// \[31\] V: the CD is valid.
    pub v: bool,
    /// \[34:32\] IPS: intermediate physical address size, encoded as IDR5.OAS.
    #[bits(3)]
    pub ips: u8,
    /// \[35\] AFFD: access flag fault disable.
    pub affd: bool,
    /// \[36\] WXN.
    pub wxn: bool,
    /// \[37\] UWXN.
    pub uwxn: bool,
    /// \[39:38\] TBI\[1:0\]: top byte ignore for TTB1 (bit 39) and TTB0 (bit 38).
    #[bits(2)]
    pub tbi: u8,
    /// \[40\] PAN.
    pub pan: bool,
    /// \[41\] AA64: AArch64 tables (must be 1).
    pub aa64: bool,
    /// \[42\] HD: hardware dirty update.
    pub hd: bool,
    /// \[43\] HA: hardware access flag update.
    pub ha: bool,
    /// \[44\] S: stall faults.
    pub s: bool,
    /// \[45\] R: record faults.
    pub r: bool,
    /// \[46\] A: abort on terminate (1: aborts return an abort, not RAZ/WI).
    pub a: bool,
    /// \[47\] ASET: the ASID is shared with the PE (broadcast TLBI applies).
    pub aset: bool,
    /// \[63:48\] ASID.
    pub asid: u16,
}

/// CD qword 1 (and qword 2 for TTB1, with the same layout).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct CdTtb {
    /// \[0\] NSCFG.
    pub nscfg: bool,
    /// \[1\] HAD: hierarchical attribute disable.
    pub had: bool,
    #[bits(2)]
    __: u8,
    /// \[51:4\] TTB address bits \[51:4\].
    #[bits(48)]
    pub ttb: u64,
    #[bits(12)]
    __: u16,
}

impl CdTtb {
    /// TTB as an address.
    pub fn address(&self) -> u64 {
        self.ttb() << 4
    }
}

/// A context descriptor as read from guest memory: eight little-endian qwords.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Cd {
    /// The raw qwords.
    pub words: [u64; 8],
}

impl Cd {
    /// Size in bytes.
    pub const SIZE: u64 = 64;

    /// Qword 0.
    pub fn q0(&self) -> Cd0 {
        Cd0::from_bits(self.words[0])
    }

    /// Qword 1: TTB0.
    pub fn ttb0(&self) -> CdTtb {
        CdTtb::from_bits(self.words[1])
    }

    /// Qword 2: TTB1.
    pub fn ttb1(&self) -> CdTtb {
        CdTtb::from_bits(self.words[2])
    }

    /// Qword 3: MAIR.
    pub fn mair(&self) -> u64 {
        self.words[3]
    }
}

/// A level-1 CD table descriptor (8 bytes).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct L1Cd {
    /// \[0\] V.
    pub v: bool,
    #[bits(11)]
    __: u16,
    /// \[51:12\] L2Ptr: address bits \[51:12\] of the level-2 CD table.
    #[bits(40)]
    pub l2ptr: u64,
    #[bits(12)]
    __: u16,
}

impl L1Cd {
    /// L2Ptr as an address.
    pub fn l2_address(&self) -> u64 {
        self.l2ptr() << 12
    }
}
