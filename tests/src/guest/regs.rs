//! Register offsets and fields, named as in Linux's `arm-smmu-v3.h` (values from the SMMUv3
//! architecture, IHI 0070, chapter 6). The driver uses these, never the model's own definitions.

#![allow(missing_docs)] // the names are Linux's; each group cites its register

use super::bits::{bit32, genmask, genmask32};

// Page 0.
pub const ARM_SMMU_IDR0: u64 = 0x0;
pub const ARM_SMMU_IDR1: u64 = 0x4;
pub const ARM_SMMU_IDR2: u64 = 0x8;
pub const ARM_SMMU_IDR3: u64 = 0xc;
pub const ARM_SMMU_IDR4: u64 = 0x10;
pub const ARM_SMMU_IDR5: u64 = 0x14;
pub const ARM_SMMU_IIDR: u64 = 0x18;
pub const ARM_SMMU_AIDR: u64 = 0x1c;
pub const ARM_SMMU_CR0: u64 = 0x20;
pub const ARM_SMMU_CR0ACK: u64 = 0x24;
pub const ARM_SMMU_CR1: u64 = 0x28;
pub const ARM_SMMU_CR2: u64 = 0x2c;
pub const ARM_SMMU_STATUSR: u64 = 0x40;
pub const ARM_SMMU_GBPA: u64 = 0x44;
pub const ARM_SMMU_AGBPA: u64 = 0x48;
pub const ARM_SMMU_IRQ_CTRL: u64 = 0x50;
pub const ARM_SMMU_IRQ_CTRLACK: u64 = 0x54;
pub const ARM_SMMU_GERROR: u64 = 0x60;
pub const ARM_SMMU_GERRORN: u64 = 0x64;
pub const ARM_SMMU_GERROR_IRQ_CFG0: u64 = 0x68;
pub const ARM_SMMU_GERROR_IRQ_CFG1: u64 = 0x70;
pub const ARM_SMMU_GERROR_IRQ_CFG2: u64 = 0x74;
pub const ARM_SMMU_STRTAB_BASE: u64 = 0x80;
pub const ARM_SMMU_STRTAB_BASE_CFG: u64 = 0x88;
pub const ARM_SMMU_CMDQ_BASE: u64 = 0x90;
pub const ARM_SMMU_CMDQ_PROD: u64 = 0x98;
pub const ARM_SMMU_CMDQ_CONS: u64 = 0x9c;
pub const ARM_SMMU_EVTQ_BASE: u64 = 0xa0;
pub const ARM_SMMU_EVTQ_IRQ_CFG0: u64 = 0xb0;
pub const ARM_SMMU_EVTQ_IRQ_CFG1: u64 = 0xb8;
pub const ARM_SMMU_EVTQ_IRQ_CFG2: u64 = 0xbc;
pub const ARM_SMMU_PRIQ_BASE: u64 = 0xc0;
pub const ARM_SMMU_PRIQ_IRQ_CFG0: u64 = 0xd0;
pub const ARM_SMMU_PRIQ_IRQ_CFG1: u64 = 0xd8;
pub const ARM_SMMU_PRIQ_IRQ_CFG2: u64 = 0xdc;
/// Page 1 lives 64 KiB above page 0.
pub const ARM_SMMU_PAGE1: u64 = 0x10000;
/// Page 1.
pub const ARM_SMMU_EVTQ_PROD: u64 = ARM_SMMU_PAGE1 + 0xa8;
/// Page 1.
pub const ARM_SMMU_EVTQ_CONS: u64 = ARM_SMMU_PAGE1 + 0xac;
/// Page 1.
pub const ARM_SMMU_PRIQ_PROD: u64 = ARM_SMMU_PAGE1 + 0xc8;
/// Page 1.
pub const ARM_SMMU_PRIQ_CONS: u64 = ARM_SMMU_PAGE1 + 0xcc;
/// CoreSight component ID registers CIDR0..CIDR3.
pub const ARM_SMMU_CIDR0: u64 = 0xff0;
pub const ARM_SMMU_PIDR4: u64 = 0xfd0;

// IDR0.
pub const IDR0_ST_LVL: u32 = genmask32(28, 27);
pub const IDR0_ST_LVL_2LVL: u32 = 1;
pub const IDR0_TERM_MODEL: u32 = bit32(26);
pub const IDR0_STALL_MODEL: u32 = genmask32(25, 24);
pub const IDR0_STALL_MODEL_STALL: u32 = 0;
pub const IDR0_STALL_MODEL_NONE: u32 = 1;
pub const IDR0_STALL_MODEL_FORCE: u32 = 2;
pub const IDR0_TTENDIAN: u32 = genmask32(22, 21);
pub const IDR0_TTENDIAN_MIXED: u32 = 0;
pub const IDR0_TTENDIAN_LE: u32 = 2;
pub const IDR0_TTENDIAN_BE: u32 = 3;
pub const IDR0_CD2L: u32 = bit32(19);
pub const IDR0_VMID16: u32 = bit32(18);
pub const IDR0_VMW: u32 = bit32(17);
pub const IDR0_PRI: u32 = bit32(16);
pub const IDR0_SEV: u32 = bit32(14);
pub const IDR0_MSI: u32 = bit32(13);
pub const IDR0_ASID16: u32 = bit32(12);
pub const IDR0_ATS: u32 = bit32(10);
pub const IDR0_HYP: u32 = bit32(9);
pub const IDR0_HTTU: u32 = genmask32(7, 6);
pub const IDR0_BTM: u32 = bit32(5);
pub const IDR0_COHACC: u32 = bit32(4);
pub const IDR0_TTF: u32 = genmask32(3, 2);
pub const IDR0_TTF_AARCH64: u32 = 2;
pub const IDR0_TTF_AARCH32_64: u32 = 3;
pub const IDR0_S1P: u32 = bit32(1);
pub const IDR0_S2P: u32 = bit32(0);

// IDR1.
pub const IDR1_TABLES_PRESET: u32 = bit32(30);
pub const IDR1_QUEUES_PRESET: u32 = bit32(29);
pub const IDR1_REL: u32 = bit32(28);
pub const IDR1_ATTR_TYPES_OVR: u32 = bit32(27);
pub const IDR1_CMDQS: u32 = genmask32(25, 21);
pub const IDR1_EVTQS: u32 = genmask32(20, 16);
pub const IDR1_PRIQS: u32 = genmask32(15, 11);
pub const IDR1_SSIDSIZE: u32 = genmask32(10, 6);
pub const IDR1_SIDSIZE: u32 = genmask32(5, 0);

// IDR3.
pub const IDR3_BBML: u32 = genmask32(12, 11);
pub const IDR3_RIL: u32 = bit32(10);
pub const IDR3_FWB: u32 = bit32(8);

// IDR5.
pub const IDR5_STALL_MAX: u32 = genmask32(31, 16);
pub const IDR5_VAX: u32 = genmask32(11, 10);
pub const IDR5_GRAN64K: u32 = bit32(6);
pub const IDR5_GRAN16K: u32 = bit32(5);
pub const IDR5_GRAN4K: u32 = bit32(4);
pub const IDR5_OAS: u32 = genmask32(2, 0);

// CR0 / CR0ACK.
pub const CR0_ATSCHK: u32 = bit32(4);
pub const CR0_CMDQEN: u32 = bit32(3);
pub const CR0_EVTQEN: u32 = bit32(2);
pub const CR0_PRIQEN: u32 = bit32(1);
pub const CR0_SMMUEN: u32 = bit32(0);
/// CR0.VMW[8:6] (spec; Linux never sets it).
pub const CR0_VMW: u32 = genmask32(8, 6);

// CR1.
pub const CR1_TABLE_SH: u32 = genmask32(11, 10);
pub const CR1_TABLE_OC: u32 = genmask32(9, 8);
pub const CR1_TABLE_IC: u32 = genmask32(7, 6);
pub const CR1_QUEUE_SH: u32 = genmask32(5, 4);
pub const CR1_QUEUE_OC: u32 = genmask32(3, 2);
pub const CR1_QUEUE_IC: u32 = genmask32(1, 0);
pub const CR1_CACHE_NC: u32 = 0;
pub const CR1_CACHE_WB: u32 = 1;
pub const CR1_CACHE_WT: u32 = 2;

// CR2.
pub const CR2_PTM: u32 = bit32(2);
pub const CR2_RECINVSID: u32 = bit32(1);
pub const CR2_E2H: u32 = bit32(0);

// GBPA.
pub const GBPA_UPDATE: u32 = bit32(31);
pub const GBPA_ABORT: u32 = bit32(20);

// IRQ_CTRL / IRQ_CTRLACK.
pub const IRQ_CTRL_EVTQ_IRQEN: u32 = bit32(2);
pub const IRQ_CTRL_PRIQ_IRQEN: u32 = bit32(1);
pub const IRQ_CTRL_GERROR_IRQEN: u32 = bit32(0);

// GERROR / GERRORN.
pub const GERROR_SFM_ERR: u32 = bit32(8);
pub const GERROR_MSI_GERROR_ABT_ERR: u32 = bit32(7);
pub const GERROR_MSI_PRIQ_ABT_ERR: u32 = bit32(6);
pub const GERROR_MSI_EVTQ_ABT_ERR: u32 = bit32(5);
pub const GERROR_MSI_CMDQ_ABT_ERR: u32 = bit32(4);
pub const GERROR_PRIQ_ABT_ERR: u32 = bit32(3);
pub const GERROR_EVTQ_ABT_ERR: u32 = bit32(2);
pub const GERROR_CMDQ_ERR: u32 = bit32(0);
pub const GERROR_ERR_MASK: u32 = 0x1fd;

// STRTAB_BASE / STRTAB_BASE_CFG.
pub const STRTAB_BASE_RA: u64 = 1 << 62;
pub const STRTAB_BASE_ADDR_MASK: u64 = genmask(51, 6);
pub const STRTAB_BASE_CFG_FMT: u32 = genmask32(17, 16);
pub const STRTAB_BASE_CFG_FMT_LINEAR: u32 = 0;
pub const STRTAB_BASE_CFG_FMT_2LVL: u32 = 1;
pub const STRTAB_BASE_CFG_SPLIT: u32 = genmask32(10, 6);
pub const STRTAB_BASE_CFG_LOG2SIZE: u32 = genmask32(5, 0);

// Queue registers (*_BASE, *_PROD, *_CONS).
pub const Q_BASE_RWA: u64 = 1 << 62;
pub const Q_BASE_ADDR_MASK: u64 = genmask(51, 5);
pub const Q_BASE_LOG2SIZE: u64 = genmask(4, 0);
pub const Q_OVERFLOW_FLAG: u32 = bit32(31);
pub const CMDQ_CONS_ERR: u32 = genmask32(30, 24);
pub const CMDQ_ERR_CERROR_NONE_IDX: u32 = 0;
pub const CMDQ_ERR_CERROR_ILL_IDX: u32 = 1;
pub const CMDQ_ERR_CERROR_ABT_IDX: u32 = 2;
pub const CMDQ_ERR_CERROR_ATC_INV_IDX: u32 = 3;

// *_IRQ_CFG0..2.
pub const MSI_CFG0_ADDR_MASK: u64 = genmask(51, 2);
pub const MSI_CFG2_SH: u32 = genmask32(5, 4);
pub const MSI_CFG2_MEMATTR: u32 = genmask32(3, 0);

/// Shareability encodings (SH fields).
pub const ARM_SMMU_SH_NSH: u64 = 0;
pub const ARM_SMMU_SH_OSH: u64 = 2;
pub const ARM_SMMU_SH_ISH: u64 = 3;
/// Memory attribute encodings.
pub const ARM_SMMU_MEMATTR_DEVICE_NGNRE: u64 = 0x1;
pub const ARM_SMMU_MEMATTR_OIWB: u64 = 0xf;

/// Largest queue Linux allocates: `PAGE_SHIFT + MAX_PAGE_ORDER` bytes (4 KiB pages).
pub const Q_MAX_SZ_SHIFT: u32 = 12 + 10;
/// Command queue entries are 16 bytes (2 dwords).
pub const CMDQ_ENT_SZ_SHIFT: u32 = 4;
pub const CMDQ_ENT_DWORDS: u64 = 2;
pub const CMDQ_MAX_SZ_SHIFT: u32 = Q_MAX_SZ_SHIFT - CMDQ_ENT_SZ_SHIFT;
/// Event queue entries are 32 bytes (4 dwords).
pub const EVTQ_ENT_SZ_SHIFT: u32 = 5;
pub const EVTQ_ENT_DWORDS: u64 = 4;
pub const EVTQ_MAX_SZ_SHIFT: u32 = Q_MAX_SZ_SHIFT - EVTQ_ENT_SZ_SHIFT;
/// `CMDQ_BATCH_ENTRIES`: Linux refuses a command queue of this many entries or fewer.
pub const CMDQ_BATCH_ENTRIES: u32 = 64;
