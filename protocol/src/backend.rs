//! The backend channel: requests from the backend to the frontend, and their replies.

use std::os::fd::OwnedFd;

use crate::codec::Writer;
use crate::error::DecodeError;
use crate::held::{HeldFds, MAX_HELD_FDS, decode_keys, encode_keys};
use crate::message::{Encoded, Reply, ReplyPolicy, Request, exact_fds, exact_size};
use crate::types::{AddressSpace, IotlbInvalidate, MsiWrite};

/// Request codes of the backend channel.
pub mod code {
    /// SET_ADDRESS_SPACE.
    pub const SET_ADDRESS_SPACE: u32 = 1;
    /// IOTLB_INVALIDATE.
    pub const IOTLB_INVALIDATE: u32 = 2;
    /// RESOLVE_SID.
    pub const RESOLVE_SID: u32 = 3;
    /// MSI_WRITE.
    pub const MSI_WRITE: u32 = 4;
    /// GET_DEVICE_SIDS.
    pub const GET_DEVICE_SIDS: u32 = 5;
    /// HOLD_FDS.
    pub const HOLD_FDS: u32 = 6;
    /// RELEASE_FDS.
    pub const RELEASE_FDS: u32 = 7;
}

/// Most devices a GET_DEVICE_SIDS reply can list: its body (8 bytes and 8 per device) must fit
/// a reply's payload with the status prefix.
pub const MAX_DEVICE_SIDS: usize = 510;

const TABLE: [(u32, &str, ReplyPolicy); 7] = [
    (
        code::SET_ADDRESS_SPACE,
        "SET_ADDRESS_SPACE",
        ReplyPolicy::OnNeedReply,
    ),
    (
        code::IOTLB_INVALIDATE,
        "IOTLB_INVALIDATE",
        ReplyPolicy::OnNeedReply,
    ),
    (code::RESOLVE_SID, "RESOLVE_SID", ReplyPolicy::Always),
    (code::MSI_WRITE, "MSI_WRITE", ReplyPolicy::OnNeedReply),
    (
        code::GET_DEVICE_SIDS,
        "GET_DEVICE_SIDS",
        ReplyPolicy::Always,
    ),
    (code::HOLD_FDS, "HOLD_FDS", ReplyPolicy::Always),
    (code::RELEASE_FDS, "RELEASE_FDS", ReplyPolicy::Always),
];

/// A request on the backend channel.
#[derive(Debug)]
pub enum BackendRequest {
    /// SET_ADDRESS_SPACE: the device's DMA and MSIs now go through this address space.
    SetAddressSpace {
        /// The device's handle.
        handle: u32,
        /// The address space.
        space: AddressSpace,
        /// The stream ID the backend decided for: SYSTEM holds only while the device's
        /// requester ID is this one.
        sid: u32,
    },
    /// IOTLB_INVALIDATE: translations the frontend cached from TRANSLATE are stale.
    IotlbInvalidate(IotlbInvalidate),
    /// RESOLVE_SID: which device has this stream ID now?
    ResolveSid {
        /// The stream ID the guest used.
        sid: u32,
    },
    /// MSI_WRITE: write `data` to guest physical `address` as an MSI from the vSMMU.
    MsiWrite(MsiWrite),
    /// GET_DEVICE_SIDS: the current stream ID of every attached device.
    GetDeviceSids,
    /// HOLD_FDS: hold these descriptors under their keys (docs/protocol.md, 10.11).
    HoldFds(HeldFds),
    /// RELEASE_FDS: close the descriptors held under these keys.
    ReleaseFds(Vec<u32>),
}

impl Request for BackendRequest {
    type Reply = BackendReply;
    const TABLE: &'static [(u32, &'static str, ReplyPolicy)] = &TABLE;

    fn code(&self) -> u32 {
        match self {
            BackendRequest::SetAddressSpace { .. } => code::SET_ADDRESS_SPACE,
            BackendRequest::IotlbInvalidate(_) => code::IOTLB_INVALIDATE,
            BackendRequest::ResolveSid { .. } => code::RESOLVE_SID,
            BackendRequest::MsiWrite(_) => code::MSI_WRITE,
            BackendRequest::GetDeviceSids => code::GET_DEVICE_SIDS,
            BackendRequest::HoldFds(_) => code::HOLD_FDS,
            BackendRequest::ReleaseFds(_) => code::RELEASE_FDS,
        }
    }

    fn encode(&self) -> Encoded<'_> {
        let mut w = Writer::with_capacity(24);
        let mut fds = Vec::new();
        match self {
            BackendRequest::SetAddressSpace { handle, space, sid } => {
                w.u32(*handle).u32(space.wire()).u32(*sid).u32(0);
            }
            BackendRequest::IotlbInvalidate(inv) => inv.encode(&mut w),
            BackendRequest::ResolveSid { sid } => {
                w.u32(*sid).u32(0);
            }
            BackendRequest::MsiWrite(msi) => msi.encode(&mut w),
            BackendRequest::GetDeviceSids => {}
            BackendRequest::HoldFds(held) => held.encode(&mut w, &mut fds),
            BackendRequest::ReleaseFds(keys) => encode_keys(&mut w, keys.iter().copied()),
        }
        Encoded {
            payload: w.into_vec(),
            fds,
        }
    }

    fn decode(code: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Self, DecodeError> {
        let req = match code {
            code::SET_ADDRESS_SPACE => {
                let mut r = exact_size(payload, 16)?;
                exact_fds(fds, 0)?;
                let handle = r.u32()?;
                let space = AddressSpace::from_wire(r.u32()?)?;
                let sid = r.u32()?;
                r.reserved_u32("set_address_space.reserved")?;
                BackendRequest::SetAddressSpace { handle, space, sid }
            }
            code::IOTLB_INVALIDATE => {
                let mut r = exact_size(payload, IotlbInvalidate::SIZE)?;
                exact_fds(fds, 0)?;
                BackendRequest::IotlbInvalidate(IotlbInvalidate::decode(&mut r)?)
            }
            code::RESOLVE_SID => {
                let mut r = exact_size(payload, 8)?;
                exact_fds(fds, 0)?;
                let sid = r.u32()?;
                r.reserved_u32("resolve_sid.reserved")?;
                BackendRequest::ResolveSid { sid }
            }
            code::MSI_WRITE => {
                let mut r = exact_size(payload, MsiWrite::SIZE)?;
                exact_fds(fds, 0)?;
                BackendRequest::MsiWrite(MsiWrite::decode(&mut r)?)
            }
            code::GET_DEVICE_SIDS => {
                exact_size(payload, 0)?;
                exact_fds(fds, 0)?;
                BackendRequest::GetDeviceSids
            }
            code::HOLD_FDS => BackendRequest::HoldFds(HeldFds::decode(payload, fds)?),
            code::RELEASE_FDS => {
                exact_fds(fds, 0)?;
                BackendRequest::ReleaseFds(decode_keys(payload, MAX_HELD_FDS)?)
            }
            other => return Err(DecodeError::UnknownRequest(other)),
        };
        Ok(req)
    }
}

const RESOLVE_FOUND: u32 = 1;

/// One device in a GET_DEVICE_SIDS reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceSid {
    /// The device's handle.
    pub handle: u32,
    /// Its requester ID now, `bus << 8 | devfn`.
    pub sid: u32,
}

/// A successful reply on the backend channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendReply {
    /// Acknowledgement without a body.
    Ack,
    /// RESOLVE_SID (8 bytes: `handle` u32, `flags` u32 with bit 0 FOUND): the device now at
    /// that SID, or `None` when no device has it.
    ResolveSid(Option<u32>),
    /// GET_DEVICE_SIDS (`count` u32, reserved u32, then `count` pairs of `handle` u32 and
    /// `sid` u32): every attached device the frontend knows, each handle once.
    DeviceSids(Vec<DeviceSid>),
}

impl Reply for BackendReply {
    fn ack() -> Self {
        BackendReply::Ack
    }

    fn answers(&self, request: u32) -> bool {
        match self {
            BackendReply::Ack => {
                request != code::RESOLVE_SID
                    && request != code::GET_DEVICE_SIDS
                    && BackendRequest::reply_policy(request).is_some()
            }
            BackendReply::ResolveSid(_) => request == code::RESOLVE_SID,
            BackendReply::DeviceSids(_) => request == code::GET_DEVICE_SIDS,
        }
    }

    fn encode(&self) -> Encoded<'_> {
        let mut w = Writer::with_capacity(8);
        match self {
            BackendReply::Ack => {}
            BackendReply::ResolveSid(Some(handle)) => {
                w.u32(*handle).u32(RESOLVE_FOUND);
            }
            BackendReply::ResolveSid(None) => {
                w.u32(0).u32(0);
            }
            BackendReply::DeviceSids(devices) => {
                // More than MAX_DEVICE_SIDS cannot be sent; the count says what follows.
                let devices = devices.get(..MAX_DEVICE_SIDS).unwrap_or(devices);
                w.u32(u32::try_from(devices.len()).unwrap_or(u32::MAX))
                    .u32(0);
                for d in devices {
                    w.u32(d.handle).u32(d.sid);
                }
            }
        }
        Encoded::bytes(w.into_vec())
    }

    fn decode(request: u32, body: &[u8], fds: Vec<OwnedFd>) -> Result<Self, DecodeError> {
        exact_fds(fds, 0)?;
        match request {
            code::RESOLVE_SID => {
                let mut r = exact_size(body, 8)?;
                let handle = r.u32()?;
                let flags = r.u32()?;
                match flags {
                    RESOLVE_FOUND => Ok(BackendReply::ResolveSid(Some(handle))),
                    0 if handle == 0 => Ok(BackendReply::ResolveSid(None)),
                    0 => Err(DecodeError::Reserved {
                        field: "resolve_sid_reply.handle",
                        value: u64::from(handle),
                    }),
                    _ => Err(DecodeError::Reserved {
                        field: "resolve_sid_reply.flags",
                        value: u64::from(flags & !RESOLVE_FOUND),
                    }),
                }
            }
            code::GET_DEVICE_SIDS => decode_device_sids(body),
            other if BackendRequest::reply_policy(other).is_some() => {
                exact_size(body, 0)?;
                Ok(BackendReply::Ack)
            }
            other => Err(DecodeError::UnknownRequest(other)),
        }
    }
}

fn decode_device_sids(body: &[u8]) -> Result<BackendReply, DecodeError> {
    let mut r = crate::codec::Reader::new(body);
    let count = r.u32()?;
    r.reserved_u32("device_sids.reserved")?;
    let n = usize::try_from(count).unwrap_or(usize::MAX);
    if n > MAX_DEVICE_SIDS {
        return Err(DecodeError::Field {
            field: "device_sids.count",
            value: u64::from(count),
            reason: "more devices than a reply can hold",
        });
    }
    // n <= MAX_DEVICE_SIDS, so this cannot overflow.
    let expected = 8usize.saturating_add(n.saturating_mul(8));
    if body.len() != expected {
        return Err(DecodeError::PayloadSize {
            expected,
            actual: body.len(),
        });
    }
    let mut devices: Vec<DeviceSid> = Vec::with_capacity(n);
    for _ in 0..n {
        let device = DeviceSid {
            handle: r.u32()?,
            sid: r.u32()?,
        };
        if devices.iter().any(|d| d.handle == device.handle) {
            return Err(DecodeError::Field {
                field: "device_sids.handle",
                value: u64::from(device.handle),
                reason: "listed twice",
            });
        }
        devices.push(device);
    }
    r.finish()?;
    Ok(BackendReply::DeviceSids(devices))
}
