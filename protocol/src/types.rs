//! Payload structures of the vIOMMU-user protocol.
//!
//! Each structure documents its wire layout (little-endian, offsets in bytes) and has a strict
//! `decode` that checks the exact size, every reserved field and every defined range, and an
//! `encode` that produces exactly that layout. The layouts are specified in `docs/protocol.md`.

use bitflags::bitflags;

use crate::codec::{Reader, Writer};
use crate::error::DecodeError;

/// Size of the vSMMU's MMIO window: register page 0 and page 1, 64 KiB each.
pub const MMIO_REGION_SIZE: u64 = 0x2_0000;
/// Granule that memory regions are aligned to.
pub const MEM_REGION_ALIGN: u64 = 0x1000;
/// Most regions one SET_MEM_TABLE carries (one fd each).
pub const MAX_MEM_TABLE_REGIONS: usize = 8;
/// Largest device state blob GET_STATE / SET_STATE may carry.
pub const MAX_STATE_SIZE: u64 = 16 << 20;
/// Largest SSID the architecture defines (IDR1.SSIDSIZE <= 20).
pub const MAX_SSID_BITS: u8 = 20;

bitflags! {
    /// Feature bits, negotiated with GET_FEATURES / SET_FEATURES.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// Bit 0: the backend channel (SET_BACKEND_CHANNEL, SET_ADDRESS_SPACE, IOTLB_INVALIDATE,
        /// RESOLVE_SID).
        const BACKEND_CHANNEL = 1 << 0;
        /// Bit 1: memory slots (GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG).
        const MEM_SLOTS = 1 << 1;
        /// Bit 2: passthrough devices through iommufd (SET_IOMMUFD, ATTACH_DEVICE with
        /// PASSTHROUGH, the IDR_AUTO configuration).
        const PASSTHROUGH = 1 << 2;
        /// Bit 3: TRANSLATE for emulated devices and MSI addresses.
        const TRANSLATE = 1 << 3;
        /// Bit 4: GET_STATE / SET_STATE.
        const STATE = 1 << 4;
        /// Bit 5: MSI writes from the backend (MSI_WRITE on the backend channel; the vSMMU may
        /// advertise IDR0.MSI). Needs BACKEND_CHANNEL.
        const MSI = 1 << 5;
        /// Bit 6: the shared region (SET_SHARED_REGION, UPDATE_DEVICE; docs/protocol.md,
        /// section 10).
        const SHARED_REGION = 1 << 6;
        /// Bit 7: translation requests through the shared region, and the call eventfd
        /// (docs/protocol.md, 10.9). Needs SHARED_REGION and TRANSLATE.
        const SHARED_TRANSLATE = 1 << 7;
        /// Bit 8: SET_SHARED_REGION's RESUME flag, a new backend resuming from the region a
        /// backend that died left (docs/protocol.md, 10.10). Needs SHARED_REGION.
        const RESUME = 1 << 8;
        /// Bit 9: HOLD_FDS and RELEASE_FDS on the backend channel, RETURN_FDS on the main
        /// channel: the frontend holds descriptors for the backend (docs/protocol.md, 10.11).
        /// Needs RESUME and BACKEND_CHANNEL.
        const HOLD_FDS = 1 << 9;
    }
}

bitflags! {
    /// `UPDATE_DEVICE.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DeviceFlags: u32 {
        /// Bit 0: the frontend keeps this device's translations where the backend cannot
        /// clear them (IOMMU notifiers), and wants IOTLB_INVALIDATE for it.
        const UNMAP_NOTIFY = 1 << 0;
    }
}

impl Features {
    /// Encodes as the 8-byte payload of GET_FEATURES' reply and SET_FEATURES.
    pub(crate) fn encode(self, w: &mut Writer) {
        w.u64(self.bits());
    }

    /// Decodes strictly: every bit must be known to this side.
    pub(crate) fn decode_known(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let bits = r.u64()?;
        Features::from_bits(bits).ok_or(DecodeError::Field {
            field: "features",
            value: bits,
            reason: "unknown feature bits",
        })
    }

    /// Decodes an offer: bits unknown to this side are kept, so that the caller can mask them.
    pub(crate) fn decode_offer(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Features::from_bits_retain(r.u64()?))
    }
}

bitflags! {
    /// `ModelConfig.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ConfigFlags: u32 {
        /// Bit 0: derive the ID registers from the host SMMU of the first passthrough device.
        const IDR_AUTO = 1 << 0;
        /// Bit 1: stage 1 translation (IDR0.S1P).
        const STAGE1 = 1 << 1;
        /// Bit 2: stage 2 translation (IDR0.S2P).
        const STAGE2 = 1 << 2;
        /// Bit 3: range invalidation (IDR3.RIL).
        const RIL = 1 << 3;
        /// Bit 4: ATS (IDR0.ATS).
        const ATS = 1 << 4;
        /// Bit 5: MSI-based completion and IRQs (IDR0.MSI).
        const MSI = 1 << 5;
    }
}

/// The vSMMU model configuration carried by SET_CONFIG (16 bytes).
///
/// | offset | size | field       |
/// |--------|------|-------------|
/// | 0      | 4    | `flags`     |
/// | 4      | 1    | `oas_bits`  |
/// | 5      | 1    | `ssid_bits` |
/// | 6      | 1    | `sid_bits`  |
/// | 7      | 1    | reserved    |
/// | 8      | 1    | `cmdq_log2` |
/// | 9      | 1    | `evtq_log2` |
/// | 10     | 2    | reserved    |
/// | 12     | 4    | reserved    |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelConfig {
    /// Feature flags of the model.
    pub flags: ConfigFlags,
    /// Output address size in bits (IDR5.OAS): 32, 36, 40, 42, 44, 48 or 52; 0 with IDR_AUTO.
    pub oas_bits: u8,
    /// Substream ID bits (IDR1.SSIDSIZE), 0..=20; 0 with IDR_AUTO.
    pub ssid_bits: u8,
    /// Stream ID bits (IDR1.SIDSIZE), 1..=32.
    pub sid_bits: u8,
    /// log2 of the most command queue entries (IDR1.CMDQS), 1..=19.
    pub cmdq_log2: u8,
    /// log2 of the most event queue entries (IDR1.EVENTQS), 1..=19.
    pub evtq_log2: u8,
}

/// Output address sizes IDR5.OAS can encode.
pub const VALID_OAS_BITS: [u8; 7] = [32, 36, 40, 42, 44, 48, 52];

impl ModelConfig {
    /// Wire size.
    pub const SIZE: usize = 16;

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u32(self.flags.bits())
            .u8(self.oas_bits)
            .u8(self.ssid_bits)
            .u8(self.sid_bits)
            .u8(0)
            .u8(self.cmdq_log2)
            .u8(self.evtq_log2)
            .u16(0)
            .u32(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let raw_flags = r.u32()?;
        let flags = ConfigFlags::from_bits(raw_flags).ok_or(DecodeError::Reserved {
            field: "config.flags",
            value: u64::from(raw_flags & !ConfigFlags::all().bits()),
        })?;
        let oas_bits = r.u8()?;
        let ssid_bits = r.u8()?;
        let sid_bits = r.u8()?;
        r.reserved_u8("config.reserved7")?;
        let cmdq_log2 = r.u8()?;
        let evtq_log2 = r.u8()?;
        r.reserved_u16("config.reserved10")?;
        r.reserved_u32("config.reserved12")?;
        let cfg = Self {
            flags,
            oas_bits,
            ssid_bits,
            sid_bits,
            cmdq_log2,
            evtq_log2,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), DecodeError> {
        let field = |field, value: u8, reason| DecodeError::Field {
            field,
            value: u64::from(value),
            reason,
        };
        if self.flags.contains(ConfigFlags::IDR_AUTO) {
            let host_derived = ConfigFlags::STAGE2 | ConfigFlags::RIL | ConfigFlags::ATS;
            if !self.flags.contains(ConfigFlags::STAGE1) || self.flags.intersects(host_derived) {
                return Err(DecodeError::Field {
                    field: "config.flags",
                    value: u64::from(self.flags.bits()),
                    reason: "IDR_AUTO takes STAGE1 and leaves STAGE2, RIL and ATS to the host",
                });
            }
            if self.oas_bits != 0 {
                return Err(field(
                    "config.oas_bits",
                    self.oas_bits,
                    "must be 0 with IDR_AUTO",
                ));
            }
            if self.ssid_bits != 0 {
                return Err(field(
                    "config.ssid_bits",
                    self.ssid_bits,
                    "must be 0 with IDR_AUTO",
                ));
            }
        } else {
            if !self
                .flags
                .intersects(ConfigFlags::STAGE1 | ConfigFlags::STAGE2)
            {
                return Err(DecodeError::Field {
                    field: "config.flags",
                    value: u64::from(self.flags.bits()),
                    reason: "at least one of STAGE1 and STAGE2 is needed",
                });
            }
            if !VALID_OAS_BITS.contains(&self.oas_bits) {
                return Err(field(
                    "config.oas_bits",
                    self.oas_bits,
                    "not one of 32, 36, 40, 42, 44, 48, 52",
                ));
            }
            if self.ssid_bits > MAX_SSID_BITS {
                return Err(field("config.ssid_bits", self.ssid_bits, "more than 20"));
            }
        }
        if !(1..=32).contains(&self.sid_bits) {
            return Err(field("config.sid_bits", self.sid_bits, "not in 1..=32"));
        }
        if !(1..=19).contains(&self.cmdq_log2) {
            return Err(field("config.cmdq_log2", self.cmdq_log2, "not in 1..=19"));
        }
        if !(1..=19).contains(&self.evtq_log2) {
            return Err(field("config.evtq_log2", self.evtq_log2, "not in 1..=19"));
        }
        Ok(())
    }
}

/// The vSMMU's identification registers, as the guest will read them (32 bytes): IDR0..IDR5,
/// IIDR, AIDR, each a u32 in that order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IdRegs {
    /// SMMU_IDR0..SMMU_IDR5.
    pub idr: [u32; 6],
    /// SMMU_IIDR.
    pub iidr: u32,
    /// SMMU_AIDR.
    pub aidr: u32,
}

impl IdRegs {
    /// Wire size.
    pub const SIZE: usize = 32;

    pub(crate) fn encode(&self, w: &mut Writer) {
        for v in self.idr {
            w.u32(v);
        }
        w.u32(self.iidr).u32(self.aidr);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut idr = [0u32; 6];
        for v in &mut idr {
            *v = r.u32()?;
        }
        Ok(Self {
            idr,
            iidr: r.u32()?,
            aidr: r.u32()?,
        })
    }
}

/// One guest RAM region (32 bytes): `gpa` u64, `size` u64, `mmap_offset` u64, `flags` u64
/// (reserved, zero). The fd that backs it travels with the message.
///
/// All three values are multiples of 4 KiB, `size` is not zero, and neither `gpa + size` nor
/// `mmap_offset + size` overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemRegion {
    /// Guest physical address of the region's first byte.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the fd.
    pub mmap_offset: u64,
}

impl MemRegion {
    /// Wire size.
    pub const SIZE: usize = 32;

    /// The last guest physical address of the region (inclusive).
    pub fn last_gpa(&self) -> u64 {
        // validate() guarantees size >= 1 and no overflow; saturate for unvalidated values.
        self.gpa.saturating_add(self.size.saturating_sub(1))
    }

    /// Whether two regions share a guest physical address.
    pub fn overlaps(&self, other: &MemRegion) -> bool {
        self.gpa <= other.last_gpa() && other.gpa <= self.last_gpa()
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u64(self.gpa).u64(self.size).u64(self.mmap_offset).u64(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let region = Self {
            gpa: r.u64()?,
            size: r.u64()?,
            mmap_offset: r.u64()?,
        };
        r.reserved_u64("region.flags")?;
        region.validate()?;
        Ok(region)
    }

    fn validate(&self) -> Result<(), DecodeError> {
        let field = |field, value, reason| DecodeError::Field {
            field,
            value,
            reason,
        };
        if self.size == 0 {
            return Err(field("region.size", 0, "empty region"));
        }
        for (name, value) in [
            ("region.gpa", self.gpa),
            ("region.size", self.size),
            ("region.mmap_offset", self.mmap_offset),
        ] {
            if !value.is_multiple_of(MEM_REGION_ALIGN) {
                return Err(field(name, value, "not a multiple of 4 KiB"));
            }
        }
        if self.gpa.checked_add(self.size).is_none() {
            return Err(field("region.size", self.size, "gpa + size overflows"));
        }
        if self.mmap_offset.checked_add(self.size).is_none() {
            return Err(field(
                "region.size",
                self.size,
                "mmap_offset + size overflows",
            ));
        }
        Ok(())
    }
}

/// The four interrupt lines of an SMMUv3, in the order of QEMU's sysbus IRQs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqIndex {
    /// 0: event queue.
    Evtq,
    /// 1: PRI queue.
    Priq,
    /// 2: CMD_SYNC completion.
    CmdSync,
    /// 3: global error.
    Gerror,
}

impl IrqIndex {
    /// All lines, by index.
    pub const ALL: [IrqIndex; 4] = [
        IrqIndex::Evtq,
        IrqIndex::Priq,
        IrqIndex::CmdSync,
        IrqIndex::Gerror,
    ];

    /// The wire value.
    pub fn index(self) -> u32 {
        match self {
            IrqIndex::Evtq => 0,
            IrqIndex::Priq => 1,
            IrqIndex::CmdSync => 2,
            IrqIndex::Gerror => 3,
        }
    }

    pub(crate) fn from_index(v: u32) -> Result<Self, DecodeError> {
        usize::try_from(v)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or(DecodeError::Field {
                field: "irq.index",
                value: u64::from(v),
                reason: "not 0..=3",
            })
    }
}

/// Width of an MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessSize {
    /// 4 bytes.
    Dword,
    /// 8 bytes.
    Qword,
}

impl AccessSize {
    /// Size in bytes.
    pub fn bytes(self) -> u32 {
        match self {
            AccessSize::Dword => 4,
            AccessSize::Qword => 8,
        }
    }

    fn from_bytes(v: u32) -> Result<Self, DecodeError> {
        match v {
            4 => Ok(AccessSize::Dword),
            8 => Ok(AccessSize::Qword),
            _ => Err(DecodeError::Field {
                field: "mmio.size",
                value: u64::from(v),
                reason: "not 4 or 8",
            }),
        }
    }
}

/// An MMIO access (16 bytes): `offset` u64, `size` u32, reserved u32.
///
/// `offset` is below [`MMIO_REGION_SIZE`] and a multiple of `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmioAccess {
    /// Offset from the start of the vSMMU's register window.
    pub offset: u64,
    /// Access width.
    pub size: AccessSize,
}

impl MmioAccess {
    /// Wire size.
    pub const SIZE: usize = 16;

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u64(self.offset).u32(self.size.bytes()).u32(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let offset = r.u64()?;
        let bytes = r.u32()?;
        r.reserved_u32("mmio.reserved")?;
        Self::checked(offset, bytes)
    }

    /// An access of `bytes` at `offset`, checked as MMIO_READ and MMIO_WRITE payloads are
    /// (also used for writes posted in the shared region).
    pub fn checked(offset: u64, bytes: u32) -> Result<Self, DecodeError> {
        let size = AccessSize::from_bytes(bytes)?;
        if offset >= MMIO_REGION_SIZE {
            return Err(DecodeError::Field {
                field: "mmio.offset",
                value: offset,
                reason: "outside the 128 KiB register window",
            });
        }
        if !offset.is_multiple_of(u64::from(size.bytes())) {
            return Err(DecodeError::Field {
                field: "mmio.offset",
                value: offset,
                reason: "not aligned to the access size",
            });
        }
        Ok(Self { offset, size })
    }
}

bitflags! {
    /// `ATTACH_DEVICE.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub(crate) struct AttachFlags: u32 {
        /// Bit 0: a VFIO device with iommufd nesting; one fd (the VFIO cdev) comes along.
        const PASSTHROUGH = 1 << 0;
    }
}

/// iommufd identities of a passthrough device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PassthroughIds {
    /// The device's iommufd device id (from VFIO_DEVICE_BIND_IOMMUFD).
    pub devid: u32,
    /// The id of the stage-2 nesting-parent HWPT the frontend allocated for it.
    pub s2_hwpt_id: u32,
}

/// ATTACH_DEVICE's fixed part (24 bytes): `handle` u32, `sid` u32, `flags` u32, `devid` u32,
/// `s2_hwpt_id` u32, reserved u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// The frontend's name for the device, unique within the connection.
    pub handle: u32,
    /// The device's stream ID as the frontend sees it now (it may change when the guest
    /// renumbers buses; RESOLVE_SID asks again).
    pub sid: u32,
    /// Present for passthrough devices.
    pub passthrough: Option<PassthroughIds>,
}

impl DeviceInfo {
    /// Wire size.
    pub const SIZE: usize = 24;

    pub(crate) fn encode(&self, w: &mut Writer) {
        let (flags, ids) = match self.passthrough {
            Some(ids) => (AttachFlags::PASSTHROUGH, ids),
            None => (
                AttachFlags::empty(),
                PassthroughIds {
                    devid: 0,
                    s2_hwpt_id: 0,
                },
            ),
        };
        w.u32(self.handle)
            .u32(self.sid)
            .u32(flags.bits())
            .u32(ids.devid)
            .u32(ids.s2_hwpt_id)
            .u32(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let handle = r.u32()?;
        let sid = r.u32()?;
        let raw = r.u32()?;
        let flags = AttachFlags::from_bits(raw).ok_or(DecodeError::Reserved {
            field: "attach.flags",
            value: u64::from(raw & !AttachFlags::all().bits()),
        })?;
        let devid = r.u32()?;
        let s2_hwpt_id = r.u32()?;
        r.reserved_u32("attach.reserved")?;
        let passthrough = if flags.contains(AttachFlags::PASSTHROUGH) {
            Some(PassthroughIds { devid, s2_hwpt_id })
        } else {
            if devid != 0 {
                return Err(DecodeError::Reserved {
                    field: "attach.devid",
                    value: u64::from(devid),
                });
            }
            if s2_hwpt_id != 0 {
                return Err(DecodeError::Reserved {
                    field: "attach.s2_hwpt_id",
                    value: u64::from(s2_hwpt_id),
                });
            }
            None
        };
        Ok(Self {
            handle,
            sid,
            passthrough,
        })
    }
}

bitflags! {
    /// The access a translation is requested for (`TRANSLATE.flags` bits 0-3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Access: u32 {
        /// Bit 0: read.
        const READ = 1 << 0;
        /// Bit 1: write.
        const WRITE = 1 << 1;
        /// Bit 2: instruction fetch.
        const EXEC = 1 << 2;
        /// Bit 3: privileged.
        const PRIV = 1 << 3;
    }
}

const TRANSLATE_SSID_VALID: u32 = 1 << 4;

/// TRANSLATE's request (24 bytes): `sid` u32, `ssid` u32, `iova` u64, `flags` u32 (bits 0-3
/// [`Access`], bit 4 SSID_VALID), reserved u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TranslateRequest {
    /// Stream ID of the requester.
    pub sid: u32,
    /// Substream ID, if the transaction carries one (below 2^20).
    pub ssid: Option<u32>,
    /// The input address.
    pub iova: u64,
    /// The access. Empty asks what the mapping allows, without a fault record.
    pub access: Access,
}

impl TranslateRequest {
    /// Wire size.
    pub const SIZE: usize = 24;

    pub(crate) fn encode(&self, w: &mut Writer) {
        let flags = self.access.bits()
            | if self.ssid.is_some() {
                TRANSLATE_SSID_VALID
            } else {
                0
            };
        w.u32(self.sid)
            .u32(self.ssid.unwrap_or(0))
            .u64(self.iova)
            .u32(flags)
            .u32(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let sid = r.u32()?;
        let raw_ssid = r.u32()?;
        let iova = r.u64()?;
        let flags = r.u32()?;
        r.reserved_u32("translate.reserved")?;
        let known = Access::all().bits() | TRANSLATE_SSID_VALID;
        if flags & !known != 0 {
            return Err(DecodeError::Reserved {
                field: "translate.flags",
                value: u64::from(flags & !known),
            });
        }
        let ssid = if flags & TRANSLATE_SSID_VALID != 0 {
            if raw_ssid >= 1 << MAX_SSID_BITS {
                return Err(DecodeError::Field {
                    field: "translate.ssid",
                    value: u64::from(raw_ssid),
                    reason: "wider than 20 bits",
                });
            }
            Some(raw_ssid)
        } else if raw_ssid != 0 {
            return Err(DecodeError::Reserved {
                field: "translate.ssid",
                value: u64::from(raw_ssid),
            });
        } else {
            None
        };
        Ok(Self {
            sid,
            ssid,
            iova,
            access: Access::from_bits_retain(flags & Access::all().bits()),
        })
    }
}

bitflags! {
    /// Permissions of a translation (`TRANSLATE` reply `perm`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Perm: u32 {
        /// Bit 0: reads allowed.
        const READ = 1 << 0;
        /// Bit 1: writes allowed.
        const WRITE = 1 << 1;
    }
}

/// TRANSLATE's reply body (32 bytes): `addr` u64, `addr_mask` u64, `perm` u32, `result` u32
/// (0 TRANSLATED, 1 FAULT), `event` u32, reserved u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TranslateReply {
    /// The access may proceed: output address `addr | (iova & addr_mask)`.
    Translated {
        /// Output base address, aligned to `addr_mask + 1`.
        addr: u64,
        /// Size of the translation minus one: `2^n - 1`.
        addr_mask: u64,
        /// What the mapping allows (not empty).
        perm: Perm,
    },
    /// The access is refused (abort).
    Fault {
        /// The SMMU event type the backend recorded in the guest's event queue (for example
        /// 0x10 F_TRANSLATION), or 0 when none was recorded.
        event: u8,
    },
}

impl TranslateReply {
    /// Wire size.
    pub const SIZE: usize = 32;

    pub(crate) fn encode(&self, w: &mut Writer) {
        match *self {
            TranslateReply::Translated {
                addr,
                addr_mask,
                perm,
            } => {
                w.u64(addr)
                    .u64(addr_mask)
                    .u32(perm.bits())
                    .u32(0)
                    .u32(0)
                    .u32(0);
            }
            TranslateReply::Fault { event } => {
                w.u64(0).u64(0).u32(0).u32(1).u32(u32::from(event)).u32(0);
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let addr = r.u64()?;
        let addr_mask = r.u64()?;
        let raw_perm = r.u32()?;
        let result = r.u32()?;
        let event = r.u32()?;
        r.reserved_u32("translate_reply.reserved")?;
        match result {
            0 => {
                let perm = Perm::from_bits(raw_perm).ok_or(DecodeError::Reserved {
                    field: "translate_reply.perm",
                    value: u64::from(raw_perm),
                })?;
                if perm.is_empty() {
                    return Err(DecodeError::Field {
                        field: "translate_reply.perm",
                        value: 0,
                        reason: "a translation grants at least one permission",
                    });
                }
                if addr_mask & addr_mask.wrapping_add(1) != 0 {
                    return Err(DecodeError::Field {
                        field: "translate_reply.addr_mask",
                        value: addr_mask,
                        reason: "not of the form 2^n - 1",
                    });
                }
                if addr & addr_mask != 0 {
                    return Err(DecodeError::Field {
                        field: "translate_reply.addr",
                        value: addr,
                        reason: "not aligned to addr_mask + 1",
                    });
                }
                if event != 0 {
                    return Err(DecodeError::Reserved {
                        field: "translate_reply.event",
                        value: u64::from(event),
                    });
                }
                Ok(TranslateReply::Translated {
                    addr,
                    addr_mask,
                    perm,
                })
            }
            1 => {
                for (field, value) in [
                    ("translate_reply.addr", addr),
                    ("translate_reply.addr_mask", addr_mask),
                    ("translate_reply.perm", u64::from(raw_perm)),
                ] {
                    if value != 0 {
                        return Err(DecodeError::Reserved { field, value });
                    }
                }
                let event = u8::try_from(event).map_err(|_| DecodeError::Field {
                    field: "translate_reply.event",
                    value: u64::from(event),
                    reason: "SMMU event types are 8 bits",
                })?;
                Ok(TranslateReply::Fault { event })
            }
            other => Err(DecodeError::Field {
                field: "translate_reply.result",
                value: u64::from(other),
                reason: "not 0 (TRANSLATED) or 1 (FAULT)",
            }),
        }
    }
}

/// Which address space a device's DMA and MSIs go through in the frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// 0: guest physical addresses, untranslated (the device bypasses the vSMMU, or only the
    /// host's stage 2 applies).
    System,
    /// 1: addresses go through TRANSLATE (the guest's stage 1 is in force, or the STE aborts).
    Translated,
}

impl AddressSpace {
    pub(crate) fn wire(self) -> u32 {
        match self {
            AddressSpace::System => 0,
            AddressSpace::Translated => 1,
        }
    }

    pub(crate) fn from_wire(v: u32) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(AddressSpace::System),
            1 => Ok(AddressSpace::Translated),
            _ => Err(DecodeError::Field {
                field: "address_space.space",
                value: u64::from(v),
                reason: "not 0 (SYSTEM) or 1 (TRANSLATED)",
            }),
        }
    }
}

/// IOTLB_INVALIDATE's body (32 bytes): `handle` u32, `ssid` u32, `flags` u32 (bit 0
/// HANDLE_VALID, bit 1 SSID_VALID), reserved u32, `start` u64, `last` u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IotlbInvalidate {
    /// The device whose translations are stale; `None` for every device.
    pub handle: Option<u32>,
    /// The substream; `None` for every substream (and for translations without one).
    pub ssid: Option<u32>,
    /// First input address of the range.
    pub start: u64,
    /// Last input address of the range, inclusive; `start <= last`.
    pub last: u64,
}

const INV_HANDLE_VALID: u32 = 1 << 0;
const INV_SSID_VALID: u32 = 1 << 1;

impl IotlbInvalidate {
    /// Wire size.
    pub const SIZE: usize = 32;

    pub(crate) fn encode(&self, w: &mut Writer) {
        let flags = if self.handle.is_some() {
            INV_HANDLE_VALID
        } else {
            0
        } | if self.ssid.is_some() {
            INV_SSID_VALID
        } else {
            0
        };
        w.u32(self.handle.unwrap_or(0))
            .u32(self.ssid.unwrap_or(0))
            .u32(flags)
            .u32(0)
            .u64(self.start)
            .u64(self.last);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let raw_handle = r.u32()?;
        let raw_ssid = r.u32()?;
        let flags = r.u32()?;
        r.reserved_u32("invalidate.reserved")?;
        let start = r.u64()?;
        let last = r.u64()?;
        let known = INV_HANDLE_VALID | INV_SSID_VALID;
        if flags & !known != 0 {
            return Err(DecodeError::Reserved {
                field: "invalidate.flags",
                value: u64::from(flags & !known),
            });
        }
        let handle = optional(
            flags & INV_HANDLE_VALID != 0,
            raw_handle,
            "invalidate.handle",
        )?;
        let ssid = optional(flags & INV_SSID_VALID != 0, raw_ssid, "invalidate.ssid")?;
        if let Some(ssid) = ssid
            && ssid >= 1 << MAX_SSID_BITS
        {
            return Err(DecodeError::Field {
                field: "invalidate.ssid",
                value: u64::from(ssid),
                reason: "wider than 20 bits",
            });
        }
        if start > last {
            return Err(DecodeError::Field {
                field: "invalidate.last",
                value: last,
                reason: "below start",
            });
        }
        Ok(Self {
            handle,
            ssid,
            start,
            last,
        })
    }
}

fn optional(valid: bool, value: u32, field: &'static str) -> Result<Option<u32>, DecodeError> {
    match (valid, value) {
        (true, v) => Ok(Some(v)),
        (false, 0) => Ok(None),
        (false, v) => Err(DecodeError::Reserved {
            field,
            value: u64::from(v),
        }),
    }
}

/// MSI_WRITE's body (16 bytes): `address` u64, `data` u32, reserved u32. `address` is 4-byte
/// aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsiWrite {
    /// Guest physical address of the doorbell.
    pub address: u64,
    /// The 32-bit payload.
    pub data: u32,
}

impl MsiWrite {
    /// Wire size.
    pub const SIZE: usize = 16;

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u64(self.address).u32(self.data).u32(0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let address = r.u64()?;
        let data = r.u32()?;
        r.reserved_u32("msi.reserved")?;
        if !address.is_multiple_of(4) {
            return Err(DecodeError::Field {
                field: "msi.address",
                value: address,
                reason: "not 4-byte aligned",
            });
        }
        Ok(Self { address, data })
    }
}
