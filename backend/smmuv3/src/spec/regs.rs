//! Register offsets and fields of the SMMUv3 programming interface.
//!
//! The register window is two 64 KiB pages. Page 0 holds everything but the event and PRI queue
//! PROD/CONS registers, which live in page 1.

#![allow(missing_docs)] // the field names are the specification's; each carries its bit range

use bitfield_struct::bitfield;

/// Register offsets (page 0 unless noted).
pub mod offset {
    pub const IDR0: u64 = 0x00;
    pub const IDR1: u64 = 0x04;
    pub const IDR2: u64 = 0x08;
    pub const IDR3: u64 = 0x0c;
    pub const IDR4: u64 = 0x10;
    pub const IDR5: u64 = 0x14;
    pub const IIDR: u64 = 0x18;
    pub const AIDR: u64 = 0x1c;
    pub const CR0: u64 = 0x20;
    pub const CR0ACK: u64 = 0x24;
    pub const CR1: u64 = 0x28;
    pub const CR2: u64 = 0x2c;
    pub const STATUSR: u64 = 0x40;
    pub const GBPA: u64 = 0x44;
    pub const AGBPA: u64 = 0x48;
    pub const IRQ_CTRL: u64 = 0x50;
    pub const IRQ_CTRLACK: u64 = 0x54;
    pub const GERROR: u64 = 0x60;
    pub const GERRORN: u64 = 0x64;
    /// 64-bit.
    pub const GERROR_IRQ_CFG0: u64 = 0x68;
    pub const GERROR_IRQ_CFG1: u64 = 0x70;
    pub const GERROR_IRQ_CFG2: u64 = 0x74;
    /// 64-bit.
    pub const STRTAB_BASE: u64 = 0x80;
    pub const STRTAB_BASE_CFG: u64 = 0x88;
    /// 64-bit.
    pub const CMDQ_BASE: u64 = 0x90;
    pub const CMDQ_PROD: u64 = 0x98;
    pub const CMDQ_CONS: u64 = 0x9c;
    /// 64-bit.
    pub const EVENTQ_BASE: u64 = 0xa0;
    /// 64-bit.
    pub const EVENTQ_IRQ_CFG0: u64 = 0xb0;
    pub const EVENTQ_IRQ_CFG1: u64 = 0xb8;
    pub const EVENTQ_IRQ_CFG2: u64 = 0xbc;
    /// 64-bit.
    pub const PRIQ_BASE: u64 = 0xc0;
    /// 64-bit.
    pub const PRIQ_IRQ_CFG0: u64 = 0xd0;
    pub const PRIQ_IRQ_CFG1: u64 = 0xd8;
    pub const PRIQ_IRQ_CFG2: u64 = 0xdc;
    /// Page 1.
    pub const EVENTQ_PROD: u64 = 0x100a8;
    /// Page 1.
    pub const EVENTQ_CONS: u64 = 0x100ac;
    /// Page 1.
    pub const PRIQ_PROD: u64 = 0x100c8;
    /// Page 1.
    pub const PRIQ_CONS: u64 = 0x100cc;
    /// Start of the CoreSight identification registers (PIDR4..CIDR3), 0xfd0..=0xffc.
    pub const ID_REGS_START: u64 = 0xfd0;
    /// Offset of page 1.
    pub const PAGE1: u64 = 0x10000;
}

/// SMMU_IDR0.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr0 {
    /// \[0\] Stage 2 translation supported.
    pub s2p: bool,
    /// \[1\] Stage 1 translation supported.
    pub s1p: bool,
    /// \[3:2\] Translation table formats: 2 = AArch64.
    #[bits(2)]
    pub ttf: u8,
    /// \[4\] Coherent access to tables and queues.
    pub cohacc: bool,
    /// \[5\] Broadcast TLB maintenance.
    pub btm: bool,
    /// \[7:6\] Hardware translation table update (AF, dirty).
    #[bits(2)]
    pub httu: u8,
    /// \[8\] Dormant hint.
    pub dormhint: bool,
    /// \[9\] Hypervisor stage 1 contexts (EL2).
    pub hyp: bool,
    /// \[10\] PCIe ATS.
    pub ats: bool,
    /// \[11\] Non-secure stage 1 ATS.
    pub ns1ats: bool,
    /// \[12\] 16-bit ASIDs.
    pub asid16: bool,
    /// \[13\] MSIs for CMD_SYNC, events, PRI and GERROR.
    pub msi: bool,
    /// \[14\] WFE wake-up (SEV) on CMD_SYNC and queue events.
    pub sev: bool,
    /// \[15\] Address translation operations.
    pub atos: bool,
    /// \[16\] PCIe PRI.
    pub pri: bool,
    /// \[17\] VMID wildcard matching.
    pub vmw: bool,
    /// \[18\] 16-bit VMIDs.
    pub vmid16: bool,
    /// \[19\] 2-level context descriptor tables.
    pub cd2l: bool,
    /// \[20\] Virtual ATOS.
    pub vatos: bool,
    /// \[22:21\] Translation table endianness: 2 = little-endian.
    #[bits(2)]
    pub ttendian: u8,
    /// \[23\] ATS recoverable error.
    pub atsrecerr: bool,
    /// \[25:24\] Stall model: 0 stall and terminate, 1 terminate only, 2 stall forced.
    #[bits(2)]
    pub stall_model: u8,
    /// \[26\] Terminate model: 1 = a terminated transaction may abort or read-as-zero.
    pub term_model: bool,
    /// \[28:27\] Stream table levels: 0 linear only, 1 linear and 2-level.
    #[bits(2)]
    pub st_level: u8,
    #[bits(3)]
    __: u8,
}

/// SMMU_IDR1.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr1 {
    /// \[5:0\] Stream ID bits.
    #[bits(6)]
    pub sidsize: u8,
    /// \[10:6\] Substream ID bits.
    #[bits(5)]
    pub ssidsize: u8,
    /// \[15:11\] log2 of the largest PRI queue.
    #[bits(5)]
    pub priqs: u8,
    /// \[20:16\] log2 of the largest event queue.
    #[bits(5)]
    pub eventqs: u8,
    /// \[25:21\] log2 of the largest command queue.
    #[bits(5)]
    pub cmdqs: u8,
    /// \[26\] Incoming permission attributes can be overridden.
    pub attr_perms_ovr: bool,
    /// \[27\] Incoming memory type attributes can be overridden.
    pub attr_types_ovr: bool,
    /// \[28\] Table and queue base addresses are relative.
    pub rel: bool,
    /// \[29\] Queue bases are fixed.
    pub queues_preset: bool,
    /// \[30\] Table bases are fixed.
    pub tables_preset: bool,
    /// \[31\] Enhanced command queues.
    pub ecmdq: bool,
}

/// SMMU_IDR3.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr3 {
    #[bits(2)]
    __: u8,
    /// \[2\] Hierarchical attribute disable (CD.HADx).
    pub had: bool,
    /// \[3\] Page-based hardware attributes.
    pub pbha: bool,
    /// \[4\] Stage-2 execute-never extension (XN\[1:0\]).
    pub xnx: bool,
    /// \[5\] PASID-prefixed STE selection.
    pub pps: bool,
    __: bool,
    /// \[7\] Memory partitioning and monitoring.
    pub mpam: bool,
    /// \[8\] Stage-2 forced write-back.
    pub fwb: bool,
    /// \[9\] Small translation tables.
    pub stt: bool,
    /// \[10\] Range invalidation (TLBI ranges with NUM, SCALE, TG).
    pub ril: bool,
    /// \[12:11\] Break-before-make level.
    #[bits(2)]
    pub bbml: u8,
    /// \[13\] E0PD.
    pub e0pd: bool,
    /// \[14\] Page-table walks are not non-cacheable.
    pub ptwnnc: bool,
    /// \[15\] Device permission table.
    pub dpt: bool,
    #[bits(16)]
    __: u16,
}

/// SMMU_IDR5.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Idr5 {
    /// \[2:0\] Output address size: 0 32, 1 36, 2 40, 3 42, 4 44, 5 48, 6 52 bits.
    #[bits(3)]
    pub oas: u8,
    __: bool,
    /// \[4\] 4 KiB granule.
    pub gran4k: bool,
    /// \[5\] 16 KiB granule.
    pub gran16k: bool,
    /// \[6\] 64 KiB granule.
    pub gran64k: bool,
    /// \[7\] 52-bit addresses with 4K/16K granules (LPA2).
    pub ds: bool,
    #[bits(2)]
    __: u8,
    /// \[11:10\] Virtual address extension: 1 = 52-bit VAs with 64K.
    #[bits(2)]
    pub vax: u8,
    #[bits(4)]
    __: u8,
    /// \[31:16\] Most outstanding stalled transactions.
    #[bits(16)]
    pub stall_max: u16,
}

/// The address sizes IDR5.OAS and CD.IPS / STE.S2PS encode, in bits.
pub fn address_size_bits(encoding: u8) -> Option<u8> {
    match encoding {
        0 => Some(32),
        1 => Some(36),
        2 => Some(40),
        3 => Some(42),
        4 => Some(44),
        5 => Some(48),
        6 => Some(52),
        _ => None,
    }
}

/// The IDR5.OAS encoding of an address size in bits.
pub fn address_size_encoding(bits: u8) -> Option<u8> {
    (0..=6).find(|&e| address_size_bits(e) == Some(bits))
}

/// SMMU_CR0 and SMMU_CR0ACK.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Cr0 {
    /// \[0\] Non-secure SMMU enable.
    pub smmuen: bool,
    /// \[1\] PRI queue enable.
    pub priqen: bool,
    /// \[2\] Event queue enable.
    pub eventqen: bool,
    /// \[3\] Command queue enable.
    pub cmdqen: bool,
    /// \[4\] ATS check.
    pub atschk: bool,
    __: bool,
    /// \[8:6\] VMID wildcard.
    #[bits(3)]
    pub vmw: u8,
    #[bits(23)]
    __: u32,
}

/// SMMU_CR1: cacheability and shareability of table and queue accesses.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Cr1 {
    /// \[1:0\] Queue inner cacheability.
    #[bits(2)]
    pub queue_ic: u8,
    /// \[3:2\] Queue outer cacheability.
    #[bits(2)]
    pub queue_oc: u8,
    /// \[5:4\] Queue shareability.
    #[bits(2)]
    pub queue_sh: u8,
    /// \[7:6\] Table inner cacheability.
    #[bits(2)]
    pub table_ic: u8,
    /// \[9:8\] Table outer cacheability.
    #[bits(2)]
    pub table_oc: u8,
    /// \[11:10\] Table shareability.
    #[bits(2)]
    pub table_sh: u8,
    #[bits(20)]
    __: u32,
}

impl Cr1 {
    /// Bits \[11:0\].
    pub const WRITABLE: u32 = 0xfff;
}

/// SMMU_CR2.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Cr2 {
    /// \[0\] EL2-E2H translation regime.
    pub e2h: bool,
    /// \[1\] Record C_BAD_STREAMID for invalid input stream IDs.
    pub recinvsid: bool,
    /// \[2\] Private TLB maintenance (ignore broadcast TLBI).
    pub ptm: bool,
    #[bits(29)]
    __: u32,
}

impl Cr2 {
    /// RECINVSID and PTM (E2H needs IDR0.HYP, which this model does not advertise).
    pub const WRITABLE: u32 = 0x6;
}

/// SMMU_GBPA: global bypass attributes, used while SMMUEN is 0.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Gbpa {
    /// \[3:0\] Memory attributes.
    #[bits(4)]
    pub memattr: u8,
    /// \[4\] Memory type override.
    pub mtcfg: bool,
    #[bits(3)]
    __: u8,
    /// \[11:8\] Allocation hints.
    #[bits(4)]
    pub alloccfg: u8,
    /// \[13:12\] Shareability: 1 = use incoming.
    #[bits(2)]
    pub shcfg: u8,
    #[bits(2)]
    __: u8,
    /// \[17:16\] Privilege.
    #[bits(2)]
    pub privcfg: u8,
    /// \[19:18\] Instruction/data.
    #[bits(2)]
    pub instcfg: u8,
    /// \[20\] Abort all incoming transactions while SMMUEN is 0.
    pub abort: bool,
    #[bits(10)]
    __: u16,
    /// \[31\] Update in progress: written 1 to request an update, cleared when it completes.
    pub update: bool,
}

impl Gbpa {
    /// The attribute fields and ABORT (bits \[20:16\], \[13:8\], \[4:0\]).
    pub const FIELDS: u32 = 0x001f_3f1f;
    /// Reset value: SHCFG = 0b01 (use incoming shareability), bypass.
    pub const RESET: u32 = 0x1000;
}

/// SMMU_IRQ_CTRL and SMMU_IRQ_CTRLACK.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct IrqCtrl {
    /// \[0\] GERROR interrupt enable.
    pub gerror_irqen: bool,
    /// \[1\] PRI queue interrupt enable.
    pub priq_irqen: bool,
    /// \[2\] Event queue interrupt enable.
    pub eventq_irqen: bool,
    #[bits(29)]
    __: u32,
}

/// SMMU_GERROR and SMMU_GERRORN: an error is active while its bits differ.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct Gerror {
    /// \[0\] Command queue error (CMDQ_CONS.ERR says which).
    pub cmdq_err: bool,
    __: bool,
    /// \[2\] Event queue access aborted.
    pub eventq_abt_err: bool,
    /// \[3\] PRI queue access aborted.
    pub priq_abt_err: bool,
    /// \[4\] CMD_SYNC MSI write aborted.
    pub msi_cmdq_abt_err: bool,
    /// \[5\] Event queue MSI write aborted.
    pub msi_eventq_abt_err: bool,
    /// \[6\] PRI queue MSI write aborted.
    pub msi_priq_abt_err: bool,
    /// \[7\] GERROR MSI write aborted.
    pub msi_gerror_abt_err: bool,
    /// \[8\] Service failure mode.
    pub sfm_err: bool,
    #[bits(23)]
    __: u32,
}

impl Gerror {
    /// The defined error bits.
    pub const MASK: u32 = 0x1fd;
}

/// SMMU_STRTAB_BASE (64-bit).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct StrtabBase {
    #[bits(6)]
    __: u8,
    /// \[51:6\] Physical address of the stream table (bits \[51:6\]).
    #[bits(46)]
    pub addr: u64,
    #[bits(10)]
    __: u16,
    /// \[62\] Read-allocate hint.
    pub ra: bool,
    __: bool,
}

impl StrtabBase {
    /// ADDR and RA.
    pub const WRITABLE: u64 = 0x400f_ffff_ffff_ffc0;

    /// The table's address.
    pub fn address(&self) -> u64 {
        self.addr() << 6
    }
}

/// SMMU_STRTAB_BASE_CFG.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct StrtabBaseCfg {
    /// \[5:0\] log2 of the number of STEs the table covers.
    #[bits(6)]
    pub log2size: u8,
    /// \[10:6\] 2-level: the SID bits indexing a level-2 table (6, 8 or 10).
    #[bits(5)]
    pub split: u8,
    #[bits(5)]
    __: u8,
    /// \[17:16\] 0 linear, 1 2-level.
    #[bits(2)]
    pub fmt: u8,
    #[bits(14)]
    __: u16,
}

impl StrtabBaseCfg {
    /// LOG2SIZE, SPLIT, FMT.
    pub const WRITABLE: u32 = 0x0003_07ff;
}

/// SMMU_CMDQ_BASE, SMMU_EVENTQ_BASE, SMMU_PRIQ_BASE (64-bit).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct QueueBase {
    /// \[4:0\] log2 of the number of entries.
    #[bits(5)]
    pub log2size: u8,
    /// \[51:5\] Address bits \[51:5\]; the queue is aligned to its size (at least 32 bytes).
    #[bits(47)]
    pub addr: u64,
    #[bits(10)]
    __: u16,
    /// \[62\] Read- or write-allocate hint.
    pub ra_wa: bool,
    __: bool,
}

impl QueueBase {
    /// LOG2SIZE, ADDR, RA/WA.
    pub const WRITABLE: u64 = 0x400f_ffff_ffff_ffff;

    /// The queue's address as the guest wrote it (bits \[51:5\]).
    pub fn address(&self) -> u64 {
        self.addr() << 5
    }
}

/// Queue producer/consumer index registers: index and wrap bit in \[log2size:0\]; CMDQ_CONS.ERR
/// in \[30:24\]; EVENTQ_PROD.OVFLG / EVENTQ_CONS.OVACKFLG in \[31\].
pub mod queue_reg {
    /// CMDQ_CONS.ERR field shift.
    pub const ERR_SHIFT: u32 = 24;
    /// CMDQ_CONS.ERR field mask (after shifting).
    pub const ERR_MASK: u32 = 0x7f;
    /// EVENTQ_PROD.OVFLG, EVENTQ_CONS.OVACKFLG, PRIQ equivalents.
    pub const OVERFLOW: u32 = 1 << 31;
}

/// CMDQ_CONS.ERR codes.
pub mod cerror {
    /// No error.
    pub const NONE: u32 = 0;
    /// Illegal command.
    pub const ILL: u32 = 1;
    /// Abort on command fetch.
    pub const ABT: u32 = 2;
    /// ATC invalidation completion error.
    pub const ATC_INV_SYNC: u32 = 3;
}

/// SMMU_*_IRQ_CFG0: MSI target address (64-bit).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct IrqCfg0 {
    #[bits(2)]
    __: u8,
    /// \[51:2\] MSI address bits \[51:2\]; 0 disables MSI delivery.
    #[bits(50)]
    pub addr: u64,
    #[bits(12)]
    __: u16,
}

impl IrqCfg0 {
    /// ADDR.
    pub const WRITABLE: u64 = 0x000f_ffff_ffff_fffc;
}

/// SMMU_*_IRQ_CFG2: MSI memory attributes.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct IrqCfg2 {
    /// \[3:0\] Memory attributes.
    #[bits(4)]
    pub memattr: u8,
    /// \[5:4\] Shareability.
    #[bits(2)]
    pub sh: u8,
    #[bits(26)]
    __: u32,
}

impl IrqCfg2 {
    /// MEMATTR and SH.
    pub const WRITABLE: u32 = 0x3f;
}
