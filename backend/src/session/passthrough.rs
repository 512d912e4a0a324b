//! VFIO devices in passthrough mode, from the session's side: attaching one to its nested
//! HWPT, the IDR_AUTO policy, and the host's vEVENTQ events relayed to the guest.

use log::{info, warn};
use viommu_protocol::types::AddressSpace;
use viommu_protocol::{AttachDevice, ErrorReply, Features, FrontendReply, Status};
use viommu_smmuv3::spec::regs::{Idr0, Idr1, Idr3, Idr5, address_size_bits};
use viommu_smmuv3::{Capabilities, Smmu};

use super::devices::AttachedDevice;
use super::host_objects::{self, Applied};
use super::{Phase, Session, SessionError, model_ref, refuse};
use crate::host::{HostDevice, HostError, HwInfo, VEvent};
use crate::limits::IMPLEMENTED_MAX_OAS_BITS;

impl Session {
    pub(super) fn attach_passthrough(
        &mut self,
        dev: AttachDevice,
    ) -> Result<FrontendReply, ErrorReply> {
        self.require_feature(Features::PASSTHROUGH, "a passthrough device")?;
        let Some(pt) = dev.passthrough else {
            return Err(refuse(Status::INTERNAL, "not a passthrough device"));
        };
        let no_iommufd = || refuse(Status::BAD_STATE, "a passthrough device before SET_IOMMUFD");
        let host = |e: HostError| refuse(Status::HOST_ERROR, format!("device {}: {e}", dev.handle));
        let hw = self
            .passthrough
            .as_mut()
            .ok_or_else(no_iommufd)?
            .hw_info(pt.ids.devid)
            .map_err(host)?;
        self.settle_idr_auto(&hw, &format!("device {}", dev.handle))?;
        let smmu = model_ref(&self.smmu)?;
        check_fit(&hw, smmu.features()).map_err(|reason| {
            refuse(
                Status::INCOMPATIBLE,
                format!(
                    "device {} (iommufd device {}): {reason}",
                    dev.handle, pt.ids.devid
                ),
            )
        })?;
        let target = host_objects::target_for(&smmu.stream_state(&self.ram, dev.sid));
        self.start_host_record();
        let host_device = HostDevice {
            dev_id: pt.ids.devid,
            cdev: pt.cdev,
        };
        let applied = self
            .with_keeper(|p, keeper| {
                p.attach(
                    dev.handle,
                    dev.sid,
                    host_device,
                    pt.ids.s2_hwpt_id,
                    target,
                    keeper,
                )
            })
            .ok_or_else(no_iommufd)?
            .map_err(|e| refuse(Status::HOST_ERROR, format!("device {}: {e}", dev.handle)))?;
        if let (Applied::Refused(_), Some(smmu)) = (&applied, self.smmu.as_mut()) {
            smmu.record_bad_ste(&self.ram, dev.sid);
        }
        self.devices.insert(
            dev.handle,
            AttachedDevice {
                sid: dev.sid,
                confirmed: true,
                passthrough: true,
                space: AddressSpace::Translated,
                space_sid: dev.sid,
                unmap_notify: false,
            },
        );
        self.follow_eventq();
        if let Err(e) = self.announce(dev.handle) {
            self.forget(dev.handle);
            return Err(e);
        }
        Ok(FrontendReply::Ack)
    }

    /// IDR_AUTO: the first host SMMU the session learns of (`source`'s: a passthrough device's,
    /// or a saved state's) fixes the ID registers, before the guest can read them.
    pub(super) fn settle_idr_auto(
        &mut self,
        host: &HwInfo,
        source: &str,
    ) -> Result<(), ErrorReply> {
        if !self.idr_auto_pending || self.phase != Phase::Configured {
            return Ok(());
        }
        let capabilities = idr_auto_capabilities(host, model_ref(&self.smmu)?.features());
        info!("ID registers derived from {source}'s host SMMU: {capabilities:?}");
        self.smmu = Some(Smmu::new(capabilities));
        self.idr_auto_pending = false;
        Ok(())
    }

    /// IDR_AUTO from saved host objects (a GET_STATE blob's, or a host record's): the
    /// registers their first vIOMMU's host SMMU gave the model.
    pub(super) fn settle_idr_auto_from(
        &mut self,
        state: &host_objects::PassthroughState,
        source: &str,
    ) -> Result<(), ErrorReply> {
        match state.viommus.first() {
            Some(v) => {
                let hw = HwInfo {
                    idr: v.idr,
                    ..HwInfo::default()
                };
                self.settle_idr_auto(&hw, source)
            }
            None => Ok(()),
        }
    }

    /// Keeps the host's vEVENTQs the size of the guest's event queue.
    pub(super) fn follow_eventq(&mut self) {
        let log2 = self.smmu.as_ref().and_then(Smmu::eventq_log2size);
        if let Some(Err(e)) = self.with_keeper(|p, keeper| p.follow_eventq(log2, keeper)) {
            warn!("vEVENTQ: {e}");
        }
    }

    /// The host's event queues to poll: their object IDs (which tell a new queue from an old
    /// one that had the same fd number) and fds.
    pub fn event_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        self.passthrough
            .as_ref()
            .map(|p| {
                p.veventq_fds()
                    .iter()
                    .map(|(id, fd)| (*id, fd.as_raw_fd()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The backend is stopping, not the VM: passthrough devices keep their nested translation
    /// and the host objects stay in the frontend's iommufd for the next backend to adopt.
    pub fn leave_host_objects(&mut self) {
        if let Some(p) = self.passthrough.as_mut() {
            p.leave();
        }
    }

    /// Moves what the host SMMU reported into the guest's event queue.
    pub fn handle_host_events(&mut self) -> Result<(), SessionError> {
        let Some(p) = self.passthrough.as_mut() else {
            return Ok(());
        };
        let mut events = Vec::new();
        if let Err(e) = p.drain_events(&mut events) {
            warn!("reading the vEVENTQ: {e}");
        }
        if let Some(smmu) = self.smmu.as_mut() {
            for event in events {
                match event {
                    VEvent::Event { record, .. } => smmu.record_host_event(&self.ram, record),
                    VEvent::Lost { .. } => smmu.record_host_events_lost(),
                }
            }
        }
        let result = self.run_effects();
        // The events are in the guest's queue once the registers that show them are.
        self.publish();
        if let Some(p) = self.passthrough.as_ref() {
            p.events_published();
        }
        if let Some(lost) = self.lost_ram() {
            return Err(lost);
        }
        result.map(drop).map_err(|e| SessionError::PostedFailure {
            request: "vEVENTQ",
            status: e.status,
            message: e.message,
        })
    }
}

/// The vSMMU's capabilities for an IDR_AUTO configuration: stage 1 only, with the host's range
/// invalidation, substream and output address sizes (capped at what the model implements),
/// and the configuration's StreamID size, queue sizes and MSI (linux-iommufd.md 1.5).
pub fn idr_auto_capabilities(host: &HwInfo, cfg: &Capabilities) -> Capabilities {
    let [_, idr1, _, idr3, _, _] = host.idr;
    Capabilities {
        s1p: true,
        s2p: false,
        ril: Idr3::from_bits(idr3).ril(),
        ats: false,
        ssid_bits: Idr1::from_bits(idr1).ssidsize().min(20),
        oas_bits: host_oas_bits(host),
        ..*cfg
    }
}

/// The host SMMU's output address size (IDR5.OAS) as far as the model implements it: capped at
/// [`IMPLEMENTED_MAX_OAS_BITS`], which reserved encodings read as.
fn host_oas_bits(host: &HwInfo) -> u8 {
    address_size_bits(Idr5::from_bits(host.idr[5]).oas()).map_or(IMPLEMENTED_MAX_OAS_BITS, |bits| {
        bits.min(IMPLEMENTED_MAX_OAS_BITS)
    })
}

/// Whether a device on a host SMMU with `host` registers can serve a guest that sees the
/// vSMMU described by `vsmmu` (QEMU's `smmuv3_accel_check_hw_compatible`, linux-iommufd.md
/// 1.5): nesting, AArch64 tables, 16-bit ASIDs, every advertised granule, and at least the
/// advertised range invalidation, ATS, substream and output address sizes.
pub fn check_fit(host: &HwInfo, vsmmu: &Capabilities) -> Result<(), String> {
    let idr0 = Idr0::from_bits(host.idr[0]);
    let idr1 = Idr1::from_bits(host.idr[1]);
    let idr3 = Idr3::from_bits(host.idr[3]);
    let idr5 = Idr5::from_bits(host.idr[5]);
    let mut missing = Vec::new();
    if !(idr0.s1p() && idr0.s2p()) {
        missing.push("nesting (IDR0.S1P and S2P)".to_owned());
    }
    // IDR0.TTF bit 1: AArch64 translation tables.
    if idr0.ttf() & 2 == 0 {
        missing.push("AArch64 tables (IDR0.TTF)".to_owned());
    }
    if !idr0.asid16() {
        missing.push("16-bit ASIDs (IDR0.ASID16)".to_owned());
    }
    for (present, name) in [
        (idr5.gran4k(), "4K"),
        (idr5.gran16k(), "16K"),
        (idr5.gran64k(), "64K"),
    ] {
        if !present {
            missing.push(format!("the {name} granule (IDR5)"));
        }
    }
    if vsmmu.ril && !idr3.ril() {
        missing.push("range invalidation (IDR3.RIL)".to_owned());
    }
    if vsmmu.ats && !idr0.ats() {
        missing.push("ATS (IDR0.ATS)".to_owned());
    }
    let host_ssid = idr1.ssidsize();
    if vsmmu.ssid_bits > host_ssid {
        missing.push(format!(
            "{} substream ID bits (host has {host_ssid})",
            vsmmu.ssid_bits
        ));
    }
    let host_oas = host_oas_bits(host);
    if vsmmu.oas_bits > host_oas {
        missing.push(format!(
            "a {}-bit output address size (host has {host_oas})",
            vsmmu.oas_bits
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("its host SMMU lacks {}", missing.join(", ")))
    }
}
