//! The attached devices: ATTACH_DEVICE, which address space each device uses (re-evaluated
//! when its stream changes, at a SID the frontend confirmed), and what the frontend is told.

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use viommu_protocol::types::{AddressSpace, DeviceFlags, IotlbInvalidate};
use viommu_protocol::{
    AttachDevice, BackendReply, BackendRequest, ErrorReply, Features, FrontendReply, Status,
};
use viommu_smmuv3::stream::StreamConfig;
use viommu_smmuv3::{SidRange, StreamState};

use super::host_objects::{self, Applied};
use super::{MAX_DEVICES, Phase, Session, refuse};

/// An attached device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct AttachedDevice {
    /// Its stream ID as the frontend last confirmed it.
    pub(super) sid: u32,
    /// Whether `sid` is confirmed: told at ATTACH_DEVICE or in the last GET_DEVICE_SIDS
    /// answer. A device is bypassed or translated only by the STE of a confirmed SID.
    #[serde(skip)]
    pub(super) confirmed: bool,
    /// A VFIO device with nested translation (otherwise emulated).
    #[serde(skip)]
    pub(super) passthrough: bool,
    /// The address space the frontend was last told.
    #[serde(skip, default = "translated")]
    pub(super) space: AddressSpace,
    /// The SID it was told for.
    #[serde(skip)]
    pub(super) space_sid: u32,
    /// The frontend wants IOTLB_INVALIDATE for it (UPDATE_DEVICE's UNMAP_NOTIFY).
    #[serde(skip)]
    pub(super) unmap_notify: bool,
}

pub(super) fn translated() -> AddressSpace {
    AddressSpace::Translated
}

/// What a device's transactions go through, from what governs its stream.
pub(super) fn address_space(state: StreamState) -> AddressSpace {
    match state {
        StreamState::GlobalBypass
        | StreamState::Ste {
            config: Ok(StreamConfig::Bypass),
            ..
        } => AddressSpace::System,
        _ => AddressSpace::Translated,
    }
}

impl Session {
    pub(super) fn attach(&mut self, dev: AttachDevice) -> Result<FrontendReply, ErrorReply> {
        self.require(Phase::Configured, "ATTACH_DEVICE")?;
        if self.devices.contains_key(&dev.handle) {
            return Err(refuse(
                Status::EXISTS,
                format!("handle {} is attached", dev.handle),
            ));
        }
        if self.devices.len() >= MAX_DEVICES {
            return Err(refuse(
                Status::NO_SPACE,
                format!("{MAX_DEVICES} devices are attached, the most this backend serves"),
            ));
        }
        if dev.passthrough.is_some() {
            return self.attach_passthrough(dev);
        }
        self.require_feature(Features::TRANSLATE, "an emulated device")?;
        self.devices.insert(
            dev.handle,
            AttachedDevice {
                sid: dev.sid,
                confirmed: true,
                passthrough: false,
                space: AddressSpace::Translated,
                space_sid: dev.sid,
                unmap_notify: false,
            },
        );
        // Tell the frontend the device's address space before the reply; a failed ATTACH_DEVICE
        // leaves nothing behind.
        if let Err(e) = self.announce(dev.handle) {
            self.forget(dev.handle);
            return Err(e);
        }
        info!("device {} attached at SID {:#x}", dev.handle, dev.sid);
        Ok(FrontendReply::Ack)
    }

    /// Evaluates a device just attached at the SID the frontend gave (the frontend just said
    /// where it is) and tells the frontend its address space.
    pub(super) fn announce(&mut self, handle: u32) -> Result<(), ErrorReply> {
        let mut out = Vec::new();
        self.evaluate(&[handle], &mut out);
        self.send_backend(out)?;
        // Outside a CMD_SYNC there is no sync for a failed host invalidation to fail; it was
        // logged.
        self.run_effects()?;
        Ok(())
    }

    /// UPDATE_DEVICE: the frontend pushes a device's SID and flags (docs/protocol.md, 10.8).
    /// A device that moved is re-evaluated at its new SID, and what was cached for the old one
    /// is cleared.
    pub(super) fn update_device(
        &mut self,
        handle: u32,
        sid: u32,
        flags: DeviceFlags,
    ) -> Result<FrontendReply, ErrorReply> {
        let sid_bits = self.smmu.as_ref().map_or(0, |s| s.features().sid_bits);
        if u64::from(sid) >> sid_bits != 0 {
            return Err(refuse(
                Status::INVALID_ARGUMENT,
                format!("SID {sid:#x} is beyond the configured {sid_bits} SID bits"),
            ));
        }
        let Some(dev) = self.devices.get_mut(&handle) else {
            return Err(refuse(
                Status::NOT_FOUND,
                format!("no device with handle {handle}"),
            ));
        };
        let notify = flags.contains(DeviceFlags::UNMAP_NOTIFY);
        if notify != dev.unmap_notify {
            info!(
                "device {handle}: unmap notifications {}",
                if notify { "on" } else { "off" }
            );
        }
        dev.unmap_notify = notify;
        let old = dev.sid;
        let moved = old != sid || !dev.confirmed;
        dev.sid = sid;
        dev.confirmed = true;
        if !moved {
            return Ok(FrontendReply::Ack);
        }
        info!("device {handle} is now at SID {sid:#x} (was {old:#x})");
        let passthrough = dev.passthrough;
        if passthrough
            && let Some(p) = self.passthrough.as_mut()
            && let Err(e) = p.set_vsid(handle, sid)
        {
            warn!("device {handle}: new vSID {sid:#x}: {e}");
        }
        self.clear_cached(
            Vec::new(),
            &[SidRange {
                first: old,
                last: old,
            }],
        );
        let mut out = Vec::new();
        self.evaluate(&[handle], &mut out);
        self.send_backend(out)?;
        self.run_effects()?;
        Ok(FrontendReply::Ack)
    }

    /// Undoes an attach that failed half way: the device and anything made for it go.
    pub(super) fn forget(&mut self, handle: u32) {
        if let Some(dev) = self.devices.remove(&handle) {
            self.handed_out.invalidate_device(handle);
            if dev.passthrough
                && let Some(Err(e)) = self.with_keeper(|p, keeper| p.detach(handle, keeper))
            {
                warn!("device {handle}: undoing the attach: {e}");
            }
        }
    }

    /// Re-evaluates the devices whose streams changed (`ranges`), queueing in `out` (for the
    /// caller to send) SET_ADDRESS_SPACE
    /// for those whose address space changed and IOTLB_INVALIDATE for all of them (their
    /// configuration changed), and bringing passthrough devices in line.
    ///
    /// A device is evaluated only at a stream ID the frontend confirmed is its own: the
    /// frontend is asked for every device's current SID first, since the
    /// guest may have renumbered its buses since the last answer (docs/protocol.md, section
    /// 8.3, GET_DEVICE_SIDS). A device that moved is re-evaluated wherever it is now; one whose
    /// SID cannot be confirmed is never bypassed or translated (TRANSLATED, and a passthrough
    /// device aborts).
    pub(super) fn update_spaces(
        &mut self,
        ranges: &[SidRange],
        out: &mut Vec<BackendRequest>,
    ) -> Result<(), ErrorReply> {
        if ranges.is_empty() || self.devices.is_empty() {
            return Ok(());
        }
        // Pushed SIDs (UPDATE_DEVICE) are current: nothing to ask.
        let moved = if self.sids_pushed() {
            Vec::new()
        } else {
            self.confirm_sids()?
        };
        let chosen: Vec<u32> = self
            .devices
            .iter()
            .filter(|&(handle, dev)| {
                moved.contains(handle)
                    || ranges.iter().any(|r| (r.first..=r.last).contains(&dev.sid))
            })
            .map(|(&handle, _)| handle)
            .collect();
        self.evaluate(&chosen, out);
        Ok(())
    }

    /// Asks the frontend where every device is now and records the answer. Returns the
    /// devices whose SID changed or could not be confirmed.
    pub(super) fn confirm_sids(&mut self) -> Result<Vec<u32>, ErrorReply> {
        if self.channel.is_some() {
            self.counters.channel_messages = self.counters.channel_messages.saturating_add(1);
        }
        let answer = match self.channel.as_ref() {
            None => None,
            Some(channel) => match channel.call(&BackendRequest::GetDeviceSids) {
                Ok(BackendReply::DeviceSids(list)) => Some(list),
                Ok(other) => {
                    return Err(refuse(
                        Status::INTERNAL,
                        format!("GET_DEVICE_SIDS answered with {other:?}"),
                    ));
                }
                Err(e) if !e.is_fatal() => {
                    warn!(
                        "GET_DEVICE_SIDS failed: {}; no device's stream ID can be confirmed",
                        crate::error_chain(&e)
                    );
                    None
                }
                Err(e) => return Err(self.channel_failed(&e)),
            },
        };
        let mut moved = Vec::new();
        for (&handle, dev) in self.devices.iter_mut() {
            let now = answer
                .as_ref()
                .and_then(|list| list.iter().find(|d| d.handle == handle))
                .map(|d| d.sid);
            match now {
                Some(sid) if dev.confirmed && sid == dev.sid => {}
                Some(sid) => {
                    if sid != dev.sid {
                        info!(
                            "device {handle} is now at SID {sid:#x} (was {:#x})",
                            dev.sid
                        );
                    }
                    dev.sid = sid;
                    dev.confirmed = true;
                    moved.push(handle);
                    if dev.passthrough
                        && let Some(p) = self.passthrough.as_mut()
                        && let Err(e) = p.set_vsid(handle, sid)
                    {
                        warn!("device {handle}: new vSID {sid:#x}: {e}");
                    }
                }
                None => {
                    if dev.confirmed {
                        warn!(
                            "device {handle}: the frontend did not confirm its stream ID; it is \
                             neither bypassed nor translated until it does"
                        );
                    }
                    dev.confirmed = false;
                    moved.push(handle);
                }
            }
        }
        Ok(moved)
    }

    /// Evaluates each device of `handles` at its confirmed SID.
    pub(super) fn evaluate(&mut self, handles: &[u32], out: &mut Vec<BackendRequest>) {
        let Some(smmu) = self.smmu.as_ref() else {
            return;
        };
        let sid_matters = smmu.registers().cr0.smmuen();
        let mut refused = Vec::new();
        for &handle in handles {
            let Some(dev) = self.devices.get_mut(&handle) else {
                continue;
            };
            // Unconfirmed: what no STE can make less safe than it is.
            let state = if dev.confirmed || !sid_matters {
                Some(smmu.stream_state(&self.ram, dev.sid))
            } else {
                None
            };
            if dev.passthrough
                && let Some(p) = self.passthrough.as_mut()
            {
                let target = state
                    .as_ref()
                    .map_or(host_objects::Target::Abort, host_objects::target_for);
                match p.apply(handle, target) {
                    Ok(Applied::Done) => {}
                    Ok(Applied::Refused(_)) => refused.push(dev.sid),
                    Err(e) => warn!("device {handle}: {e}"),
                }
            }
            let space = state.map_or(AddressSpace::Translated, address_space);
            // SYSTEM holds for one SID: a device that bypasses at a new SID is told again.
            if space != dev.space || (space == AddressSpace::System && dev.space_sid != dev.sid) {
                dev.space = space;
                dev.space_sid = dev.sid;
                debug!(
                    "device {handle}: address space {space:?} at SID {:#x}",
                    dev.sid
                );
                out.push(BackendRequest::SetAddressSpace {
                    handle,
                    space,
                    sid: dev.sid,
                });
            }
            if self.handed_out.invalidate_device(handle) {
                out.push(BackendRequest::IotlbInvalidate(IotlbInvalidate {
                    handle: Some(handle),
                    ssid: None,
                    start: 0,
                    last: u64::MAX,
                }));
            }
        }
        if let Some(smmu) = self.smmu.as_mut() {
            for sid in refused {
                smmu.record_bad_ste(&self.ram, sid);
            }
        }
    }
}
