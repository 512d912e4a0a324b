//! AArch64 (VMSAv8-64) translation table walks as an SMMUv3 performs them: stage 1, stage 2 and
//! nested, with 4K, 16K and 64K granules.
//!
//! The walker is given already-decoded configuration (from a CD and an STE) and reads
//! descriptors from guest memory. It never panics and never loops: every walk is bounded by the
//! number of levels, whatever the guest put in its tables or configuration.

use super::GuestMemory;

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
pub struct Perm {
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
    pub s1: Option<Perm>,
    /// Stage-2 permissions, if stage 2 took part.
    pub s2: Option<Perm>,
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
    /// For a stage-2 fault: what stage 2 was translating.
    pub class: FaultClass,
    /// For a stage-2 fault: the IPA stage 2 was translating (the event's IPA field).
    pub ipa: u64,
    /// For F_WALK_EABT: the address of the descriptor whose fetch failed.
    pub fetch_addr: u64,
}
