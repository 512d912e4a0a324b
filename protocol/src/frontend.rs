//! The main channel: requests from the frontend (QEMU) to the backend, and their replies.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::net::{AddressFamily, SocketType, sockopt};

use crate::codec::Writer;
use crate::error::DecodeError;
use crate::held::HeldFds;
use crate::message::{Encoded, Reply, ReplyPolicy, Request, exact_fds, exact_size, one_fd};
use crate::types::{
    DeviceFlags, DeviceInfo, Features, IdRegs, IrqIndex, MAX_MEM_TABLE_REGIONS, MAX_STATE_SIZE,
    MemRegion, MmioAccess, ModelConfig, PassthroughIds, TranslateReply, TranslateRequest,
};

/// Request codes of the main channel.
pub mod code {
    /// GET_FEATURES.
    pub const GET_FEATURES: u32 = 1;
    /// SET_FEATURES.
    pub const SET_FEATURES: u32 = 2;
    /// SET_CONFIG.
    pub const SET_CONFIG: u32 = 3;
    /// GET_ID_REGS.
    pub const GET_ID_REGS: u32 = 4;
    /// SET_BACKEND_CHANNEL.
    pub const SET_BACKEND_CHANNEL: u32 = 5;
    /// SET_MEM_TABLE.
    pub const SET_MEM_TABLE: u32 = 6;
    /// GET_MAX_MEM_SLOTS.
    pub const GET_MAX_MEM_SLOTS: u32 = 7;
    /// ADD_MEM_REG.
    pub const ADD_MEM_REG: u32 = 8;
    /// REM_MEM_REG.
    pub const REM_MEM_REG: u32 = 9;
    /// SET_IRQ_FD.
    pub const SET_IRQ_FD: u32 = 10;
    /// MMIO_READ.
    pub const MMIO_READ: u32 = 11;
    /// MMIO_WRITE.
    pub const MMIO_WRITE: u32 = 12;
    /// SET_IOMMUFD.
    pub const SET_IOMMUFD: u32 = 13;
    /// ATTACH_DEVICE.
    pub const ATTACH_DEVICE: u32 = 14;
    /// DETACH_DEVICE.
    pub const DETACH_DEVICE: u32 = 15;
    /// TRANSLATE.
    pub const TRANSLATE: u32 = 16;
    /// RESET.
    pub const RESET: u32 = 17;
    /// GET_STATE.
    pub const GET_STATE: u32 = 18;
    /// SET_STATE.
    pub const SET_STATE: u32 = 19;
    /// SET_SHARED_REGION.
    pub const SET_SHARED_REGION: u32 = 20;
    /// UPDATE_DEVICE.
    pub const UPDATE_DEVICE: u32 = 21;
    /// RETURN_FDS.
    pub const RETURN_FDS: u32 = 22;
}

const TABLE: [(u32, &str, ReplyPolicy); 22] = [
    (code::GET_FEATURES, "GET_FEATURES", ReplyPolicy::Always),
    (code::SET_FEATURES, "SET_FEATURES", ReplyPolicy::OnNeedReply),
    (code::SET_CONFIG, "SET_CONFIG", ReplyPolicy::Always),
    (code::GET_ID_REGS, "GET_ID_REGS", ReplyPolicy::Always),
    (
        code::SET_BACKEND_CHANNEL,
        "SET_BACKEND_CHANNEL",
        ReplyPolicy::OnNeedReply,
    ),
    (
        code::SET_MEM_TABLE,
        "SET_MEM_TABLE",
        ReplyPolicy::OnNeedReply,
    ),
    (
        code::GET_MAX_MEM_SLOTS,
        "GET_MAX_MEM_SLOTS",
        ReplyPolicy::Always,
    ),
    (code::ADD_MEM_REG, "ADD_MEM_REG", ReplyPolicy::OnNeedReply),
    (code::REM_MEM_REG, "REM_MEM_REG", ReplyPolicy::OnNeedReply),
    (code::SET_IRQ_FD, "SET_IRQ_FD", ReplyPolicy::OnNeedReply),
    (code::MMIO_READ, "MMIO_READ", ReplyPolicy::Always),
    (code::MMIO_WRITE, "MMIO_WRITE", ReplyPolicy::OnNeedReply),
    (code::SET_IOMMUFD, "SET_IOMMUFD", ReplyPolicy::OnNeedReply),
    (code::ATTACH_DEVICE, "ATTACH_DEVICE", ReplyPolicy::Always),
    (code::DETACH_DEVICE, "DETACH_DEVICE", ReplyPolicy::Always),
    (code::TRANSLATE, "TRANSLATE", ReplyPolicy::Always),
    (code::RESET, "RESET", ReplyPolicy::Always),
    (code::GET_STATE, "GET_STATE", ReplyPolicy::Always),
    (code::SET_STATE, "SET_STATE", ReplyPolicy::Always),
    (
        code::SET_SHARED_REGION,
        "SET_SHARED_REGION",
        ReplyPolicy::Always,
    ),
    (code::UPDATE_DEVICE, "UPDATE_DEVICE", ReplyPolicy::Always),
    (code::RETURN_FDS, "RETURN_FDS", ReplyPolicy::Always),
];

/// A passthrough device's iommufd identities and its VFIO cdev.
#[derive(Debug)]
pub struct Passthrough {
    /// iommufd device id and stage-2 parent HWPT id.
    pub ids: PassthroughIds,
    /// The VFIO device cdev, bound to the iommufd by the frontend.
    pub cdev: OwnedFd,
}

/// ATTACH_DEVICE: a device behind the vSMMU.
#[derive(Debug)]
pub struct AttachDevice {
    /// The frontend's name for the device, unique within the connection.
    pub handle: u32,
    /// The device's stream ID as the frontend sees it now.
    pub sid: u32,
    /// Present for a VFIO device with iommufd nesting; absent for an emulated device.
    pub passthrough: Option<Passthrough>,
}

/// A device state blob: `size` bytes at the start of a memfd.
#[derive(Debug)]
pub struct StateBlob {
    /// Bytes of state, at most [`MAX_STATE_SIZE`].
    pub size: u64,
    /// The file holding them (a memfd, read from offset 0).
    pub fd: OwnedFd,
}

/// A request on the main channel. File descriptors are owned: dropping the request closes them.
#[derive(Debug)]
pub enum FrontendRequest {
    /// GET_FEATURES: which feature bits the backend offers.
    GetFeatures,
    /// SET_FEATURES: the features the frontend takes, a subset of the offer.
    SetFeatures(Features),
    /// SET_CONFIG: the vSMMU model parameters.
    SetConfig(ModelConfig),
    /// GET_ID_REGS: the ID registers the guest will see (freezes them).
    GetIdRegs,
    /// SET_BACKEND_CHANNEL: the socket for backend-initiated messages.
    SetBackendChannel(UnixStream),
    /// SET_MEM_TABLE: replaces all of guest RAM (0..=8 regions, one fd each).
    SetMemTable(Vec<(MemRegion, OwnedFd)>),
    /// GET_MAX_MEM_SLOTS: how many regions the backend can hold.
    GetMaxMemSlots,
    /// ADD_MEM_REG: adds one region.
    AddMemReg(MemRegion, OwnedFd),
    /// REM_MEM_REG: removes the region with this gpa and size.
    RemMemReg(MemRegion),
    /// SET_IRQ_FD: the eventfd for one interrupt line, or none to stop signalling it.
    SetIrqFd {
        /// The interrupt line.
        index: IrqIndex,
        /// The eventfd; `None` clears it (flag NOFD).
        fd: Option<OwnedFd>,
    },
    /// MMIO_READ: a guest register read.
    MmioRead(MmioAccess),
    /// MMIO_WRITE: a guest register write (posted).
    MmioWrite {
        /// Where and how wide.
        access: MmioAccess,
        /// The value; for 4-byte writes the upper 32 bits are zero.
        value: u64,
    },
    /// SET_IOMMUFD: the frontend's iommufd.
    SetIommufd(OwnedFd),
    /// ATTACH_DEVICE: a device behind the vSMMU.
    AttachDevice(AttachDevice),
    /// DETACH_DEVICE: the device with this handle goes away.
    DetachDevice {
        /// The handle given at ATTACH_DEVICE.
        handle: u32,
    },
    /// TRANSLATE: a DMA or MSI address to translate.
    Translate(TranslateRequest),
    /// RESET: the vSMMU goes to its reset state.
    Reset,
    /// GET_STATE: the backend's state as a blob.
    GetState,
    /// SET_STATE: restore a blob from GET_STATE.
    SetState(StateBlob),
    /// SET_SHARED_REGION: the shared region (a sealed memfd of
    /// [`crate::shared::REGION_SIZE`] bytes, version 1), the kick eventfd, and with
    /// SHARED_TRANSLATE the call eventfd.
    SetSharedRegion {
        /// The region's memfd.
        region: OwnedFd,
        /// The eventfd the frontend writes when the backend may be asleep.
        kick: OwnedFd,
        /// The eventfd the backend writes when the frontend may be asleep (SHARED_TRANSLATE).
        call: Option<OwnedFd>,
        /// `flags` bit 0 RESUME (feature RESUME): take the vSMMU's state from the region a
        /// backend that died left (docs/protocol.md, 10.10).
        resume: bool,
    },
    /// UPDATE_DEVICE: an attached device's SID and flags now.
    UpdateDevice {
        /// The handle given at ATTACH_DEVICE.
        handle: u32,
        /// The device's requester ID now.
        sid: u32,
        /// Its flags.
        flags: DeviceFlags,
    },
    /// RETURN_FDS: descriptors the frontend held for a backend that died, for the resume
    /// (docs/protocol.md, 10.11).
    ReturnFds(HeldFds),
}

fn flag_nofd() -> u32 {
    1
}

impl Request for FrontendRequest {
    type Reply = FrontendReply;
    const TABLE: &'static [(u32, &'static str, ReplyPolicy)] = &TABLE;

    fn code(&self) -> u32 {
        match self {
            FrontendRequest::GetFeatures => code::GET_FEATURES,
            FrontendRequest::SetFeatures(_) => code::SET_FEATURES,
            FrontendRequest::SetConfig(_) => code::SET_CONFIG,
            FrontendRequest::GetIdRegs => code::GET_ID_REGS,
            FrontendRequest::SetBackendChannel(_) => code::SET_BACKEND_CHANNEL,
            FrontendRequest::SetMemTable(_) => code::SET_MEM_TABLE,
            FrontendRequest::GetMaxMemSlots => code::GET_MAX_MEM_SLOTS,
            FrontendRequest::AddMemReg(..) => code::ADD_MEM_REG,
            FrontendRequest::RemMemReg(_) => code::REM_MEM_REG,
            FrontendRequest::SetIrqFd { .. } => code::SET_IRQ_FD,
            FrontendRequest::MmioRead(_) => code::MMIO_READ,
            FrontendRequest::MmioWrite { .. } => code::MMIO_WRITE,
            FrontendRequest::SetIommufd(_) => code::SET_IOMMUFD,
            FrontendRequest::AttachDevice(_) => code::ATTACH_DEVICE,
            FrontendRequest::DetachDevice { .. } => code::DETACH_DEVICE,
            FrontendRequest::Translate(_) => code::TRANSLATE,
            FrontendRequest::Reset => code::RESET,
            FrontendRequest::GetState => code::GET_STATE,
            FrontendRequest::SetState(_) => code::SET_STATE,
            FrontendRequest::SetSharedRegion { .. } => code::SET_SHARED_REGION,
            FrontendRequest::UpdateDevice { .. } => code::UPDATE_DEVICE,
            FrontendRequest::ReturnFds(_) => code::RETURN_FDS,
        }
    }

    fn encode(&self) -> Encoded<'_> {
        let mut w = Writer::with_capacity(64);
        let mut fds = Vec::new();
        match self {
            FrontendRequest::GetFeatures
            | FrontendRequest::GetIdRegs
            | FrontendRequest::GetMaxMemSlots
            | FrontendRequest::Reset
            | FrontendRequest::GetState => {}
            FrontendRequest::SetFeatures(f) => f.encode(&mut w),
            FrontendRequest::SetConfig(c) => c.encode(&mut w),
            FrontendRequest::SetBackendChannel(s) => fds.push(s.as_fd()),
            FrontendRequest::SetMemTable(regions) => {
                // At most MAX_MEM_TABLE_REGIONS regions are valid; the socket layer refuses a
                // message with more fds than the protocol allows.
                w.u32(u32::try_from(regions.len()).unwrap_or(u32::MAX))
                    .u32(0);
                for (region, fd) in regions {
                    region.encode(&mut w);
                    fds.push(fd.as_fd());
                }
            }
            FrontendRequest::AddMemReg(region, fd) => {
                region.encode(&mut w);
                fds.push(fd.as_fd());
            }
            FrontendRequest::RemMemReg(region) => region.encode(&mut w),
            FrontendRequest::SetIrqFd { index, fd } => {
                w.u32(index.index())
                    .u32(if fd.is_some() { 0 } else { flag_nofd() });
                if let Some(fd) = fd {
                    fds.push(fd.as_fd());
                }
            }
            FrontendRequest::MmioRead(a) => a.encode(&mut w),
            FrontendRequest::MmioWrite { access, value } => {
                access.encode(&mut w);
                w.u64(*value);
            }
            FrontendRequest::SetIommufd(fd) => fds.push(fd.as_fd()),
            FrontendRequest::AttachDevice(dev) => {
                let info = DeviceInfo {
                    handle: dev.handle,
                    sid: dev.sid,
                    passthrough: dev.passthrough.as_ref().map(|p| p.ids),
                };
                info.encode(&mut w);
                if let Some(p) = &dev.passthrough {
                    fds.push(p.cdev.as_fd());
                }
            }
            FrontendRequest::DetachDevice { handle } => {
                w.u32(*handle).u32(0);
            }
            FrontendRequest::Translate(t) => t.encode(&mut w),
            FrontendRequest::SetState(blob) => {
                w.u64(blob.size);
                fds.push(blob.fd.as_fd());
            }
            FrontendRequest::SetSharedRegion {
                region,
                kick,
                call,
                resume,
            } => {
                w.u64(crate::shared::REGION_SIZE as u64)
                    .u32(crate::shared::VERSION)
                    .u32(u32::from(*resume));
                fds.push(region.as_fd());
                fds.push(kick.as_fd());
                if let Some(call) = call {
                    fds.push(call.as_fd());
                }
            }
            FrontendRequest::UpdateDevice { handle, sid, flags } => {
                w.u32(*handle).u32(*sid).u32(flags.bits()).u32(0);
            }
            FrontendRequest::ReturnFds(held) => held.encode(&mut w, &mut fds),
        }
        Encoded {
            payload: w.into_vec(),
            fds,
        }
    }

    fn decode(code: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Self, DecodeError> {
        let no_payload = |fds: Vec<OwnedFd>| -> Result<(), DecodeError> {
            exact_size(payload, 0)?;
            exact_fds(fds, 0)?;
            Ok(())
        };
        let req = match code {
            code::GET_FEATURES => {
                no_payload(fds)?;
                FrontendRequest::GetFeatures
            }
            code::SET_FEATURES => {
                let mut r = exact_size(payload, 8)?;
                exact_fds(fds, 0)?;
                FrontendRequest::SetFeatures(Features::decode_known(&mut r)?)
            }
            code::SET_CONFIG => {
                let mut r = exact_size(payload, ModelConfig::SIZE)?;
                exact_fds(fds, 0)?;
                FrontendRequest::SetConfig(ModelConfig::decode(&mut r)?)
            }
            code::GET_ID_REGS => {
                no_payload(fds)?;
                FrontendRequest::GetIdRegs
            }
            code::SET_BACKEND_CHANNEL => {
                exact_size(payload, 0)?;
                FrontendRequest::SetBackendChannel(unix_stream(one_fd(fds)?)?)
            }
            code::SET_MEM_TABLE => decode_mem_table(payload, fds)?,
            code::GET_MAX_MEM_SLOTS => {
                no_payload(fds)?;
                FrontendRequest::GetMaxMemSlots
            }
            code::ADD_MEM_REG => {
                let mut r = exact_size(payload, MemRegion::SIZE)?;
                let region = MemRegion::decode(&mut r)?;
                FrontendRequest::AddMemReg(region, one_fd(fds)?)
            }
            code::REM_MEM_REG => {
                let mut r = exact_size(payload, MemRegion::SIZE)?;
                exact_fds(fds, 0)?;
                FrontendRequest::RemMemReg(MemRegion::decode(&mut r)?)
            }
            code::SET_IRQ_FD => {
                let mut r = exact_size(payload, 8)?;
                let index = IrqIndex::from_index(r.u32()?)?;
                let flags = r.u32()?;
                if flags & !flag_nofd() != 0 {
                    return Err(DecodeError::Reserved {
                        field: "irq.flags",
                        value: u64::from(flags & !flag_nofd()),
                    });
                }
                let fd = if flags & flag_nofd() != 0 {
                    exact_fds(fds, 0)?;
                    None
                } else {
                    Some(eventfd(one_fd(fds)?)?)
                };
                FrontendRequest::SetIrqFd { index, fd }
            }
            code::MMIO_READ => {
                let mut r = exact_size(payload, MmioAccess::SIZE)?;
                exact_fds(fds, 0)?;
                FrontendRequest::MmioRead(MmioAccess::decode(&mut r)?)
            }
            code::MMIO_WRITE => {
                let mut r = exact_size(payload, MmioAccess::SIZE + 8)?;
                exact_fds(fds, 0)?;
                let access = MmioAccess::decode(&mut r)?;
                let value = r.u64()?;
                if access.size.bytes() == 4 && value > u64::from(u32::MAX) {
                    return Err(DecodeError::Reserved {
                        field: "mmio.value[63:32]",
                        value: value >> 32,
                    });
                }
                FrontendRequest::MmioWrite { access, value }
            }
            code::SET_IOMMUFD => {
                exact_size(payload, 0)?;
                FrontendRequest::SetIommufd(one_fd(fds)?)
            }
            code::ATTACH_DEVICE => {
                let mut r = exact_size(payload, DeviceInfo::SIZE)?;
                let info = DeviceInfo::decode(&mut r)?;
                let passthrough = match info.passthrough {
                    Some(ids) => Some(Passthrough {
                        ids,
                        cdev: one_fd(fds)?,
                    }),
                    None => {
                        exact_fds(fds, 0)?;
                        None
                    }
                };
                FrontendRequest::AttachDevice(AttachDevice {
                    handle: info.handle,
                    sid: info.sid,
                    passthrough,
                })
            }
            code::DETACH_DEVICE => {
                let mut r = exact_size(payload, 8)?;
                exact_fds(fds, 0)?;
                let handle = r.u32()?;
                r.reserved_u32("detach.reserved")?;
                FrontendRequest::DetachDevice { handle }
            }
            code::TRANSLATE => {
                let mut r = exact_size(payload, TranslateRequest::SIZE)?;
                exact_fds(fds, 0)?;
                FrontendRequest::Translate(TranslateRequest::decode(&mut r)?)
            }
            code::RESET => {
                no_payload(fds)?;
                FrontendRequest::Reset
            }
            code::GET_STATE => {
                no_payload(fds)?;
                FrontendRequest::GetState
            }
            code::SET_STATE => {
                let mut r = exact_size(payload, 8)?;
                let size = state_size(r.u64()?)?;
                FrontendRequest::SetState(StateBlob {
                    size,
                    fd: one_fd(fds)?,
                })
            }
            code::SET_SHARED_REGION => {
                let mut r = exact_size(payload, 16)?;
                let size = r.u64()?;
                if size != crate::shared::REGION_SIZE as u64 {
                    return Err(DecodeError::Field {
                        field: "shared.size",
                        value: size,
                        reason: "version 1's region is 0x10000 bytes",
                    });
                }
                let version = r.u32()?;
                if version != crate::shared::VERSION {
                    return Err(DecodeError::Field {
                        field: "shared.version",
                        value: u64::from(version),
                        reason: "only version 1 is defined",
                    });
                }
                let flags = r.u32()?;
                if flags & !1 != 0 {
                    return Err(DecodeError::Reserved {
                        field: "shared.flags",
                        value: u64::from(flags & !1),
                    });
                }
                // The region and the kick, and with SHARED_TRANSLATE the call (the session
                // checks that the count matches the features).
                let actual = fds.len();
                let mut fds = fds.into_iter();
                let (Some(region), Some(kick), call, None) =
                    (fds.next(), fds.next(), fds.next(), fds.next())
                else {
                    return Err(DecodeError::FdCount {
                        expected: if actual > 3 { 3 } else { 2 },
                        actual,
                    });
                };
                FrontendRequest::SetSharedRegion {
                    region,
                    kick: eventfd(kick)?,
                    call: call.map(eventfd).transpose()?,
                    resume: flags & 1 != 0,
                }
            }
            code::UPDATE_DEVICE => {
                let mut r = exact_size(payload, 16)?;
                exact_fds(fds, 0)?;
                let handle = r.u32()?;
                let sid = r.u32()?;
                let raw = r.u32()?;
                let flags = DeviceFlags::from_bits(raw).ok_or(DecodeError::Reserved {
                    field: "update.flags",
                    value: u64::from(raw & !DeviceFlags::all().bits()),
                })?;
                r.reserved_u32("update.reserved")?;
                FrontendRequest::UpdateDevice { handle, sid, flags }
            }
            code::RETURN_FDS => FrontendRequest::ReturnFds(HeldFds::decode(payload, fds)?),
            other => return Err(DecodeError::UnknownRequest(other)),
        };
        Ok(req)
    }
}

fn decode_mem_table(payload: &[u8], fds: Vec<OwnedFd>) -> Result<FrontendRequest, DecodeError> {
    let mut r = crate::codec::Reader::new(payload);
    let count = r.u32()?;
    r.reserved_u32("mem_table.reserved")?;
    let n = usize::try_from(count).unwrap_or(usize::MAX);
    if n > MAX_MEM_TABLE_REGIONS {
        return Err(DecodeError::Field {
            field: "mem_table.nregions",
            value: u64::from(count),
            reason: "more than 8 regions",
        });
    }
    // n <= 8, so this cannot overflow.
    let expected = 8usize.saturating_add(n.saturating_mul(MemRegion::SIZE));
    if payload.len() != expected {
        return Err(DecodeError::PayloadSize {
            expected,
            actual: payload.len(),
        });
    }
    let fds = exact_fds(fds, n)?;
    let mut regions: Vec<(MemRegion, OwnedFd)> = Vec::with_capacity(n);
    for fd in fds {
        let region = MemRegion::decode(&mut r)?;
        if regions.iter().any(|(other, _)| other.overlaps(&region)) {
            return Err(DecodeError::Field {
                field: "region.gpa",
                value: region.gpa,
                reason: "overlaps another region of the table",
            });
        }
        regions.push((region, fd));
    }
    r.finish()?;
    Ok(FrontendRequest::SetMemTable(regions))
}

fn state_size(size: u64) -> Result<u64, DecodeError> {
    if size > MAX_STATE_SIZE {
        Err(DecodeError::Field {
            field: "state.size",
            value: size,
            reason: "more than 16 MiB",
        })
    } else {
        Ok(size)
    }
}

/// Accepts an fd only if it is an eventfd.
///
/// Linux names what an fd is in `/proc/self/fd`; an eventfd reads as `anon_inode:[eventfd]`.
/// Where `/proc` cannot be read, an fd that has a file type (a regular file or memfd, a pipe, a
/// socket, a device) is refused, and an anonymous inode is taken on trust.
fn eventfd(fd: OwnedFd) -> Result<OwnedFd, DecodeError> {
    use std::os::fd::AsRawFd;
    let wrong = |reason| DecodeError::Field {
        field: "irq.fd",
        value: 0,
        reason,
    };
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match rustix::fs::readlink(link.as_str(), Vec::new()) {
        Ok(target) if target.as_bytes() == b"anon_inode:[eventfd]" => Ok(fd),
        Ok(_) => Err(wrong("not an eventfd")),
        Err(_) => {
            let st = rustix::fs::fstat(&fd).map_err(|_| wrong("cannot be examined"))?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Unknown {
                Ok(fd)
            } else {
                Err(wrong("not an eventfd"))
            }
        }
    }
}

/// Accepts an fd only if it is a connected Unix stream socket.
fn unix_stream(fd: OwnedFd) -> Result<UnixStream, DecodeError> {
    let not_socket = |reason| DecodeError::Field {
        field: "backend_channel.fd",
        value: 0,
        reason,
    };
    let kind = sockopt::socket_type(&fd).map_err(|_| not_socket("not a socket"))?;
    let domain = sockopt::socket_domain(&fd).map_err(|_| not_socket("not a socket"))?;
    if kind != SocketType::STREAM || domain != AddressFamily::UNIX {
        return Err(not_socket("not a Unix stream socket"));
    }
    Ok(UnixStream::from(fd))
}

/// A successful reply on the main channel.
#[derive(Debug)]
pub enum FrontendReply {
    /// Acknowledgement without a body.
    Ack,
    /// GET_FEATURES: the offered feature bits (unknown bits kept).
    Features(Features),
    /// GET_ID_REGS.
    IdRegs(IdRegs),
    /// GET_MAX_MEM_SLOTS.
    MaxMemSlots(u64),
    /// MMIO_READ: the register value (upper 32 bits zero for a 4-byte read).
    MmioValue(u64),
    /// TRANSLATE.
    Translate(TranslateReply),
    /// GET_STATE.
    State(StateBlob),
}

impl Reply for FrontendReply {
    fn ack() -> Self {
        FrontendReply::Ack
    }

    fn answers(&self, request: u32) -> bool {
        match self {
            FrontendReply::Ack => {
                !matches!(
                    request,
                    code::GET_FEATURES
                        | code::GET_ID_REGS
                        | code::GET_MAX_MEM_SLOTS
                        | code::MMIO_READ
                        | code::TRANSLATE
                        | code::GET_STATE
                ) && FrontendRequest::reply_policy(request).is_some()
            }
            FrontendReply::Features(_) => request == code::GET_FEATURES,
            FrontendReply::IdRegs(_) => request == code::GET_ID_REGS,
            FrontendReply::MaxMemSlots(_) => request == code::GET_MAX_MEM_SLOTS,
            FrontendReply::MmioValue(_) => request == code::MMIO_READ,
            FrontendReply::Translate(_) => request == code::TRANSLATE,
            FrontendReply::State(_) => request == code::GET_STATE,
        }
    }

    fn encode(&self) -> Encoded<'_> {
        let mut w = Writer::with_capacity(32);
        let mut fds = Vec::new();
        match self {
            FrontendReply::Ack => {}
            FrontendReply::Features(f) => f.encode(&mut w),
            FrontendReply::IdRegs(regs) => regs.encode(&mut w),
            FrontendReply::MaxMemSlots(v) | FrontendReply::MmioValue(v) => {
                w.u64(*v);
            }
            FrontendReply::Translate(t) => t.encode(&mut w),
            FrontendReply::State(blob) => {
                w.u64(blob.size);
                fds.push(blob.fd.as_fd());
            }
        }
        Encoded {
            payload: w.into_vec(),
            fds,
        }
    }

    fn decode(request: u32, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self, DecodeError> {
        let reply = match request {
            code::GET_FEATURES => {
                let mut r = exact_size(body, 8)?;
                exact_fds(fds, 0)?;
                FrontendReply::Features(Features::decode_offer(&mut r)?)
            }
            code::GET_ID_REGS => {
                let mut r = exact_size(body, IdRegs::SIZE)?;
                exact_fds(fds, 0)?;
                FrontendReply::IdRegs(IdRegs::decode(&mut r)?)
            }
            code::GET_MAX_MEM_SLOTS => {
                let mut r = exact_size(body, 8)?;
                exact_fds(fds, 0)?;
                FrontendReply::MaxMemSlots(r.u64()?)
            }
            code::MMIO_READ => {
                let mut r = exact_size(body, 8)?;
                exact_fds(fds, 0)?;
                FrontendReply::MmioValue(r.u64()?)
            }
            code::TRANSLATE => {
                let mut r = exact_size(body, TranslateReply::SIZE)?;
                exact_fds(fds, 0)?;
                FrontendReply::Translate(TranslateReply::decode(&mut r)?)
            }
            code::GET_STATE => {
                let mut r = exact_size(body, 8)?;
                let size = state_size(r.u64()?)?;
                FrontendReply::State(StateBlob {
                    size,
                    fd: one_fd(fds)?,
                })
            }
            other if FrontendRequest::reply_policy(other).is_some() => {
                exact_size(body, 0)?;
                exact_fds(fds, 0)?;
                FrontendReply::Ack
            }
            other => return Err(DecodeError::UnknownRequest(other)),
        };
        Ok(reply)
    }
}
