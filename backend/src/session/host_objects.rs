//! Passthrough devices: the iommufd objects that give a VFIO device nested translation, kept
//! in step with the guest's view of its stream.
//!
//! One vIOMMU per stage-2 parent HWPT (the frontend allocates one per physical SMMU), with an
//! abort and a bypass nested HWPT made up front; per device a vDEVICE carrying the guest's
//! StreamID, and a stage-1 nested HWPT for each guest STE that translates. Changes are
//! make-before-break: the device is attached to the new HWPT before the old one is destroyed.
//! Teardown reverses creation in the order the kernel requires (linux-iommufd.md 1.2, step 14).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use super::host_record::HostRecord;
use crate::host::rules::{self, HostCaps};
use crate::host::{HostDevice, HostError, HostIommu, HwInfo, ObjectId, RawCmd, VEvent, VSte};
use viommu_smmuv3::StreamState;
use viommu_smmuv3::spec::ste::{Ste0, SteConfig};
use viommu_smmuv3::stream::StreamConfig;

/// The vSTE of the abort nested HWPT: V = 1, Config = abort.
pub const ABORT_VSTE: VSte = valid_vste(SteConfig::ABORT);
/// The vSTE of the bypass nested HWPT: V = 1, Config = bypass (0b100).
pub const BYPASS_VSTE: VSte = valid_vste(SteConfig::BYPASS);

/// A valid vSTE with only a Config.
const fn valid_vste(config: SteConfig) -> VSte {
    [
        Ste0::new().with_v(true).with_config(config.0).into_bits(),
        0,
    ]
}

/// Largest host command batch: the kernel takes up to 2^19 entries per call.
pub const MAX_BATCH: usize = 1 << 19;

/// What a passthrough device's DMA should go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Abort every transaction (STE abort, invalid or ILLEGAL, or the vSMMU disabled with
    /// GBPA.ABORT).
    Abort,
    /// Untranslated: only the host's stage 2 applies.
    Bypass,
    /// The guest's stage 1 over the host's stage 2: the guest STE words 0 and 1, masked.
    Translate(VSte),
}

/// Why a passthrough operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassthroughError {
    /// A host ioctl failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The device does not fit the vSMMU.
    #[error("device {dev_id} does not fit this vSMMU: {reason}")]
    Incompatible {
        /// The iommufd device ID.
        dev_id: u32,
        /// Why.
        reason: String,
    },
    /// No such device.
    #[error("no passthrough device with handle {0}")]
    NotFound(u32),
}

/// A vIOMMU and what hangs off it.
#[derive(Debug)]
struct VIommu {
    id: ObjectId,
    s2_hwpt: ObjectId,
    abort: ObjectId,
    bypass: ObjectId,
    caps: HostCaps,
    idr: [u32; 6],
    veventq: Option<VEventQ>,
}

#[derive(Debug)]
struct VEventQ {
    id: ObjectId,
    fd: OwnedFd,
    log2size: u8,
}

/// A passthrough device.
#[derive(Debug)]
struct DeviceObjects {
    host: HostDevice,
    viommu: ObjectId,
    vsid: u32,
    vdevice: Option<ObjectId>,
    /// The stage-1 nested HWPT made for the device's current STE, if it translates.
    nested: Option<ObjectId>,
    /// What the device uses now; `None` while it is still on the frontend's stage-2 HWPT.
    target: Option<Target>,
}

/// What happened to a device's STE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The device now uses the target.
    Done,
    /// The kernel refused the guest's STE; the device aborts.
    Refused(HostError),
}

/// A vIOMMU's objects, in a saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VIommuState {
    /// The vIOMMU.
    pub id: ObjectId,
    /// Its stage-2 parent.
    pub s2_hwpt: ObjectId,
    /// The abort nested HWPT.
    pub abort: ObjectId,
    /// The bypass nested HWPT.
    pub bypass: ObjectId,
    /// The vEVENTQ. Its fd survives the backend only where the frontend holds it (HOLD_FDS);
    /// otherwise a new queue is made.
    pub veventq: Option<ObjectId>,
    /// The vEVENTQ's size (log2 of its depth).
    #[serde(default)]
    pub veventq_log2: Option<u8>,
    /// The host's ID registers (for command validation).
    pub idr: [u32; 6],
}

/// A device's objects, in a saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// The iommufd device ID.
    pub dev_id: u32,
    /// The vIOMMU it belongs to.
    pub viommu: ObjectId,
    /// The guest's StreamID.
    pub vsid: u32,
    /// Its vDEVICE.
    pub vdevice: Option<ObjectId>,
    /// The nested HWPT made for its STE.
    pub nested: Option<ObjectId>,
    /// What it is attached to.
    pub target: Option<Target>,
}

/// The host objects of a session, by device handle: what a restarted backend adopts, so the
/// VM's DMA goes on through the restart (the objects belong to the frontend's iommufd file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughState {
    /// The vIOMMUs.
    pub viommus: Vec<VIommuState>,
    /// The devices, by handle.
    pub devices: BTreeMap<u32, DeviceState>,
}

/// Where the frontend holds descriptors for the backend (HOLD_FDS, docs/protocol.md 10.11).
/// Each call returns once the frontend has done it (or it failed, which the keeper reports).
pub trait FdKeeper {
    /// The frontend holds a duplicate of `fd` under `key`.
    fn hold(&mut self, key: u32, fd: BorrowedFd<'_>);
    /// The frontend closes what it holds under `key`.
    fn release(&mut self, key: u32);
}

/// No frontend holds anything: HOLD_FDS is not negotiated, or the session is over.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKeeper;

impl FdKeeper for NoKeeper {
    fn hold(&mut self, _key: u32, _fd: BorrowedFd<'_>) {}
    fn release(&mut self, _key: u32) {}
}

/// The host record's key among the descriptors the frontend holds; a vEVENTQ's is its ID.
pub const RECORD_KEY: u32 = 0;

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassthroughCounters {
    /// IOMMU_HWPT_INVALIDATE calls.
    pub invalidate_calls: u64,
    /// Commands forwarded in them.
    pub commands_forwarded: u64,
    /// Nested HWPTs allocated for guest STEs.
    pub stes_installed: u64,
}

/// The passthrough devices of one session, and the host objects made for them.
#[derive(Debug)]
pub struct HostObjects {
    host: Box<dyn HostIommu>,
    viommus: Vec<VIommu>,
    devices: BTreeMap<u32, DeviceObjects>,
    /// Devices of an adopted state whose ATTACH_DEVICE has not come yet.
    adopting: BTreeMap<u32, DeviceState>,
    counters: PassthroughCounters,
    /// Where the objects are recorded for a backend that resumes after this one died.
    record: Option<HostRecord>,
}

impl HostObjects {
    /// Serves passthrough devices through `host`.
    pub fn new(host: Box<dyn HostIommu>) -> Self {
        Self {
            host,
            viommus: Vec::new(),
            devices: BTreeMap::new(),
            adopting: BTreeMap::new(),
            counters: PassthroughCounters::default(),
            record: None,
        }
    }

    /// Keeps the objects' record in `record` from now on (the frontend holds it).
    pub fn keep_record(&mut self, record: HostRecord) {
        self.record = Some(record);
        self.save();
    }

    /// The record, if one is kept.
    pub fn record(&self) -> Option<&HostRecord> {
        self.record.as_ref()
    }

    /// Writes the record after a change to the objects (docs/protocol.md 10.11: made before
    /// recorded, destroyed before removed from it).
    fn save(&self) {
        if let Some(record) = &self.record
            && let Err(e) = record.write(&self.snapshot())
        {
            warn!("the host record is stale: {e}");
        }
    }

    /// Sets or clears the record's `events_in_hand`.
    fn events_in_hand(&self, in_hand: bool) {
        if let Some(record) = &self.record {
            record.set_events_in_hand(in_hand);
        }
    }

    /// Counters.
    pub fn counters(&self) -> PassthroughCounters {
        self.counters
    }

    /// IOMMU_GET_HW_INFO of a device the frontend bound.
    pub fn hw_info(&mut self, dev_id: u32) -> Result<HwInfo, HostError> {
        self.host.hw_info(dev_id)
    }

    /// What a passthrough device's DMA goes through now, for the status line.
    pub fn mode(&self, handle: u32) -> &'static str {
        match self.devices.get(&handle).map(|d| d.target) {
            Some(Some(Target::Abort)) => "abort",
            Some(Some(Target::Bypass)) => "bypass",
            Some(Some(Target::Translate(_))) => "nested S1",
            Some(None) => "stage 2",
            None => "unknown",
        }
    }

    /// Whether `handle` is a passthrough device.
    pub fn contains(&self, handle: u32) -> bool {
        self.devices.contains_key(&handle)
    }

    /// The handles and guest StreamIDs of the devices.
    pub fn streams(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.devices.iter().map(|(&h, d)| (h, d.vsid))
    }

    /// Takes a device the frontend bound and attached to `s2_hwpt`: finds or makes the vIOMMU
    /// for that stage-2 parent, makes the device's vDEVICE, and applies `target`. Nothing is
    /// left behind on failure.
    pub fn attach(
        &mut self,
        handle: u32,
        vsid: u32,
        host: HostDevice,
        s2_hwpt: ObjectId,
        target: Target,
        keeper: &mut dyn FdKeeper,
    ) -> Result<Applied, PassthroughError> {
        let dev_id = host.dev_id;
        if let Some(saved) = self.adopting.remove(&handle) {
            if saved.dev_id != dev_id || saved.vsid != vsid {
                return Err(PassthroughError::Incompatible {
                    dev_id,
                    reason: format!(
                        "the adopted state has device {} at vSID {:#x} for this handle",
                        saved.dev_id, saved.vsid
                    ),
                });
            }
            info!(
                "passthrough device {handle}: adopted (vDEVICE {:?}, HWPT {:?})",
                saved.vdevice, saved.nested
            );
            self.devices.insert(
                handle,
                DeviceObjects {
                    host,
                    viommu: saved.viommu,
                    vsid,
                    vdevice: saved.vdevice,
                    nested: saved.nested,
                    target: saved.target,
                },
            );
            self.save();
            return self.apply(handle, target);
        }
        let info = self.host.hw_info(dev_id)?;
        let made_viommu = !self.viommus.iter().any(|v| v.s2_hwpt == s2_hwpt);
        if made_viommu {
            self.make_viommu(dev_id, s2_hwpt, &info)?;
        }
        let Some(viommu) = self.viommus.iter().find(|v| v.s2_hwpt == s2_hwpt) else {
            return Err(PassthroughError::Incompatible {
                dev_id,
                reason: "no vIOMMU for its stage-2 HWPT".into(),
            });
        };
        let viommu_id = viommu.id;
        let vdevice = match self.host.alloc_vdevice(viommu_id, dev_id, u64::from(vsid)) {
            Ok(id) => id,
            Err(e) => {
                if made_viommu {
                    self.drop_viommu(viommu_id, keeper);
                }
                return Err(e.into());
            }
        };
        info!(
            "passthrough device {handle}: iommufd device {dev_id}, vSID {vsid:#x}, vIOMMU {viommu_id}"
        );
        self.devices.insert(
            handle,
            DeviceObjects {
                host,
                viommu: viommu_id,
                vsid,
                vdevice: Some(vdevice),
                nested: None,
                target: None,
            },
        );
        match self.apply(handle, target) {
            Ok(applied) => Ok(applied),
            Err(e) => {
                let _ = self.detach(handle, keeper);
                Err(e)
            }
        }
    }

    fn make_viommu(
        &mut self,
        dev_id: u32,
        s2_hwpt: ObjectId,
        info: &HwInfo,
    ) -> Result<(), PassthroughError> {
        let id = self.host.alloc_viommu(dev_id, s2_hwpt)?;
        let abort = match self.host.alloc_nested_hwpt(id, dev_id, ABORT_VSTE) {
            Ok(hwpt) => hwpt,
            Err(e) => {
                let _ = self.host.destroy(id);
                return Err(e.into());
            }
        };
        let bypass = match self.host.alloc_nested_hwpt(id, dev_id, BYPASS_VSTE) {
            Ok(hwpt) => hwpt,
            Err(e) => {
                let _ = self.host.destroy(abort);
                let _ = self.host.destroy(id);
                return Err(e.into());
            }
        };
        info!("vIOMMU {id} on stage-2 HWPT {s2_hwpt} (abort HWPT {abort}, bypass HWPT {bypass})");
        self.viommus.push(VIommu {
            id,
            s2_hwpt,
            abort,
            bypass,
            caps: HostCaps::from_hw_info(info),
            idr: info.idr,
            veventq: None,
        });
        self.save();
        Ok(())
    }

    /// Destroys a vIOMMU with no devices left, and what hangs off it.
    fn drop_viommu(&mut self, id: ObjectId, keeper: &mut dyn FdKeeper) {
        let Some(pos) = self.viommus.iter().position(|v| v.id == id) else {
            return;
        };
        let v = self.viommus.swap_remove(pos);
        let mut order = Vec::new();
        if let Some(q) = v.veventq {
            // Every fd holds a reference: the frontend's and ours closed before the destroy.
            keeper.release(q.id);
            drop(q.fd);
            order.push(q.id);
        }
        order.extend([v.abort, v.bypass, v.id]);
        for object in order {
            if let Err(e) = self.host.destroy(object) {
                warn!("destroying iommufd object {object}: {e}");
            }
        }
        info!("vIOMMU {id} destroyed");
        self.save();
    }

    /// Moves a device to `target`, make-before-break. A vSTE the kernel refuses leaves the
    /// device aborting and is reported as [`Applied::Refused`].
    pub fn apply(&mut self, handle: u32, target: Target) -> Result<Applied, PassthroughError> {
        let Some(dev) = self.devices.get(&handle) else {
            return Err(PassthroughError::NotFound(handle));
        };
        if dev.target == Some(target) {
            return Ok(Applied::Done);
        }
        let Some(viommu) = self.viommus.iter().find(|v| v.id == dev.viommu) else {
            return Err(PassthroughError::NotFound(handle));
        };
        let (abort, bypass, viommu_id) = (viommu.abort, viommu.bypass, viommu.id);
        let dev_id = dev.host.dev_id;
        let old_nested = dev.nested;
        let (hwpt, nested, result) = match target {
            Target::Abort => (abort, None, Applied::Done),
            Target::Bypass => (bypass, None, Applied::Done),
            Target::Translate(vste) => match self.host.alloc_nested_hwpt(viommu_id, dev_id, vste) {
                Ok(id) => {
                    self.counters.stes_installed = self.counters.stes_installed.saturating_add(1);
                    (id, Some(id), Applied::Done)
                }
                Err(e) => {
                    warn!("device {handle}: the kernel refused the guest STE {vste:x?}: {e}");
                    (abort, None, Applied::Refused(e))
                }
            },
        };
        let Some(dev) = self.devices.get_mut(&handle) else {
            return Err(PassthroughError::NotFound(handle));
        };
        if let Err(e) = self.host.attach(&dev.host, hwpt) {
            if let Some(id) = nested {
                let _ = self.host.destroy(id);
            }
            return Err(e.into());
        }
        dev.nested = nested;
        dev.target = Some(match result {
            Applied::Done => target,
            Applied::Refused(_) => Target::Abort,
        });
        debug!(
            "device {handle}: attached to HWPT {hwpt} ({:?})",
            dev.target
        );
        self.save();
        if let Some(old) = old_nested
            && let Err(e) = self.host.destroy(old)
        {
            warn!("destroying nested HWPT {old}: {e}");
        }
        Ok(result)
    }

    /// The guest renumbered the device: its vDEVICE is remade with the new StreamID.
    pub fn set_vsid(&mut self, handle: u32, vsid: u32) -> Result<(), PassthroughError> {
        let Some(dev) = self.devices.get_mut(&handle) else {
            return Err(PassthroughError::NotFound(handle));
        };
        if dev.vsid == vsid {
            return Ok(());
        }
        // A translating nested HWPT needs the vDEVICE: park the device on abort meanwhile.
        let viommu = dev.viommu;
        let target = dev.target.unwrap_or(Target::Abort);
        self.apply(handle, Target::Abort)?;
        let Some(dev) = self.devices.get_mut(&handle) else {
            return Err(PassthroughError::NotFound(handle));
        };
        if let Some(old) = dev.vdevice.take() {
            self.host.destroy(old)?;
        }
        dev.vdevice = Some(
            self.host
                .alloc_vdevice(viommu, dev.host.dev_id, u64::from(vsid))?,
        );
        dev.vsid = vsid;
        self.save();
        self.apply(handle, target).map(drop)
    }

    /// Forgets a device: back on its stage-2 HWPT, its nested HWPT and vDEVICE destroyed, its
    /// cdev duplicate closed, and the vIOMMU destroyed with its last device.
    pub fn detach(
        &mut self,
        handle: u32,
        keeper: &mut dyn FdKeeper,
    ) -> Result<(), PassthroughError> {
        let Some(dev) = self.devices.remove(&handle) else {
            return Err(PassthroughError::NotFound(handle));
        };
        let s2 = self
            .viommus
            .iter()
            .find(|v| v.id == dev.viommu)
            .map(|v| v.s2_hwpt);
        if let Some(s2) = s2
            && let Err(e) = self.host.attach(&dev.host, s2)
        {
            warn!("device {handle}: re-attaching its stage-2 HWPT {s2}: {e}");
        }
        for object in dev.nested.into_iter().chain(dev.vdevice) {
            if let Err(e) = self.host.destroy(object) {
                warn!("destroying iommufd object {object}: {e}");
            }
        }
        info!("passthrough device {handle} detached");
        self.save();
        if !self.devices.values().any(|d| d.viommu == dev.viommu) {
            self.drop_viommu(dev.viommu, keeper);
        }
        Ok(())
    }

    /// Forwards guest invalidation commands, in order, one IOMMU_HWPT_INVALIDATE per vIOMMU
    /// (split only at the kernel's entry limit). Commands the kernel would refuse, or that
    /// concern no device of a vIOMMU, are left out with a log line: they cannot affect the
    /// host's caches for the guest.
    pub fn invalidate(&mut self, cmds: &[RawCmd]) -> Result<(), HostError> {
        let Self {
            host,
            viommus,
            devices,
            counters,
            ..
        } = self;
        for v in viommus.iter() {
            let known = |sid: u32| {
                devices
                    .values()
                    .any(|d| d.viommu == v.id && d.vsid == sid && d.vdevice.is_some())
            };
            let batch: Vec<RawCmd> = cmds
                .iter()
                .filter(|cmd| match rules::validate_cmd(cmd, &v.caps, known) {
                    Ok(()) => true,
                    Err(rules::CmdError::UnknownSid(_)) => false,
                    Err(e) => {
                        warn!("vIOMMU {}: not forwarding {cmd:x?}: {e}", v.id);
                        false
                    }
                })
                .copied()
                .collect();
            for chunk in batch.chunks(MAX_BATCH) {
                counters.invalidate_calls = counters.invalidate_calls.saturating_add(1);
                counters.commands_forwarded = counters
                    .commands_forwarded
                    .saturating_add(chunk.len() as u64);
                debug!(
                    "vIOMMU {}: {} command(s) in one IOMMU_HWPT_INVALIDATE",
                    v.id,
                    chunk.len()
                );
                if let Err(e) = host.invalidate(v.id, chunk) {
                    // Invalidations are idempotent: issue the batch once more, since the kernel
                    // may not have issued the commands before the failure (entry_num).
                    warn!("vIOMMU {}: {e}; retrying the batch", v.id);
                    counters.invalidate_calls = counters.invalidate_calls.saturating_add(1);
                    host.invalidate(v.id, chunk).map_err(|retry| retry.error)?;
                }
            }
        }
        Ok(())
    }

    /// Makes, moves or removes the vEVENTQs to follow the guest's event queue: `log2size` is
    /// its size while enabled. A queue whose size changed is replaced.
    ///
    /// With a keeper, a queue is released before it is destroyed, and a new one is recorded,
    /// then held (docs/protocol.md 10.11).
    pub fn follow_eventq(
        &mut self,
        log2size: Option<u8>,
        keeper: &mut dyn FdKeeper,
    ) -> Result<(), HostError> {
        for i in 0..self.viommus.len() {
            let Some(v) = self.viommus.get_mut(i) else {
                break;
            };
            let keep = matches!((&v.veventq, log2size), (Some(q), Some(l)) if q.log2size == l);
            if keep {
                continue;
            }
            let viommu = v.id;
            if let Some(q) = v.veventq.take() {
                keeper.release(q.id);
                drop(q.fd);
                let destroyed = self.host.destroy(q.id);
                self.save();
                destroyed?;
            }
            if let Some(l) = log2size {
                let depth = 1u32.checked_shl(u32::from(l.min(19))).unwrap_or(1 << 19);
                let (id, fd) = self.host.alloc_veventq(viommu, depth)?;
                info!("vEVENTQ {id} of depth {depth} on vIOMMU {viommu}");
                if let Some(v) = self.viommus.get_mut(i) {
                    v.veventq = Some(VEventQ {
                        id,
                        fd,
                        log2size: l,
                    });
                }
                self.save();
                if let Some(q) = self.viommus.get(i).and_then(|v| v.veventq.as_ref()) {
                    keeper.hold(q.id, q.fd.as_fd());
                }
            }
        }
        Ok(())
    }

    /// The vEVENTQs' IDs and fds, to poll.
    pub fn veventq_fds(&self) -> Vec<(ObjectId, BorrowedFd<'_>)> {
        self.viommus
            .iter()
            .filter_map(|v| v.veventq.as_ref().map(|q| (q.id, q.fd.as_fd())))
            .collect()
    }

    /// Reads every record waiting on every vEVENTQ.
    ///
    /// The record's `events_in_hand` is set first; the caller clears it with
    /// [`HostObjects::events_published`] once the events are in the guest's queue and the
    /// registers that show them are published.
    pub fn drain_events(&mut self, out: &mut Vec<VEvent>) -> Result<usize, HostError> {
        if self.viommus.iter().any(|v| v.veventq.is_some()) {
            self.events_in_hand(true);
        }
        let Self { host, viommus, .. } = self;
        let mut total = 0usize;
        for v in viommus.iter() {
            if let Some(q) = &v.veventq {
                total = total.saturating_add(host.read_vevents(q.id, q.fd.as_fd(), out)?);
            }
        }
        Ok(total)
    }

    /// The events read by [`HostObjects::drain_events`] are published in the guest's queue.
    pub fn events_published(&self) {
        self.events_in_hand(false);
    }

    /// The host objects, to save.
    pub fn snapshot(&self) -> PassthroughState {
        PassthroughState {
            viommus: self
                .viommus
                .iter()
                .map(|v| VIommuState {
                    id: v.id,
                    s2_hwpt: v.s2_hwpt,
                    abort: v.abort,
                    bypass: v.bypass,
                    veventq: v.veventq.as_ref().map(|q| q.id),
                    veventq_log2: v.veventq.as_ref().map(|q| q.log2size),
                    idr: v.idr,
                })
                .collect(),
            // Devices still to be adopted are ours too: a backend that dies before their
            // ATTACH_DEVICE leaves them to the next.
            devices: self
                .adopting
                .iter()
                .map(|(&h, d)| (h, d.clone()))
                .chain(self.devices.iter().map(|(&h, d)| {
                    (
                        h,
                        DeviceState {
                            dev_id: d.host.dev_id,
                            viommu: d.viommu,
                            vsid: d.vsid,
                            vdevice: d.vdevice,
                            nested: d.nested,
                            target: d.target,
                        },
                    )
                }))
                .collect(),
        }
    }

    /// Takes over the objects a previous backend left in the frontend's iommufd. Devices are
    /// adopted when the frontend attaches them again; vEVENTQs are remade (their fds died with
    /// the previous backend).
    pub fn adopt(&mut self, state: PassthroughState) -> Result<(), PassthroughError> {
        self.adopt_resumed(state, &mut BTreeMap::new()).map(drop)
    }

    /// [`HostObjects::adopt`] after the previous backend died (RESUME with HOLD_FDS, 10.11): a
    /// vEVENTQ whose fd the frontend returned (in `returned`, by key) is adopted with it, so
    /// what the host queued meanwhile is read; one without is destroyed and remade. Returns
    /// whether host events may have been lost that way (the guest must see an overflow).
    pub fn adopt_resumed(
        &mut self,
        state: PassthroughState,
        returned: &mut BTreeMap<u32, OwnedFd>,
    ) -> Result<bool, PassthroughError> {
        if !self.devices.is_empty() || !self.viommus.is_empty() {
            return Err(PassthroughError::Incompatible {
                dev_id: 0,
                reason: "passthrough devices are attached already".into(),
            });
        }
        let mut lost = false;
        for v in state.viommus {
            let mut veventq = None;
            if let Some(q) = v.veventq {
                match (returned.remove(&q), v.veventq_log2) {
                    (Some(fd), Some(log2size)) if q != RECORD_KEY => {
                        info!("vEVENTQ {q} adopted with the fd the frontend held");
                        veventq = Some(VEventQ {
                            id: q,
                            fd,
                            log2size,
                        });
                    }
                    (fd, _) => {
                        // Never held (or the record is damaged): nobody can read what it
                        // queued, so it goes, and its events count as lost.
                        drop(fd);
                        lost = true;
                        if let Err(e) = self.host.destroy(q) {
                            warn!("destroying the previous backend's vEVENTQ {q}: {e}");
                        }
                    }
                }
            }
            let hw = HwInfo {
                idr: v.idr,
                ..HwInfo::default()
            };
            self.viommus.push(VIommu {
                id: v.id,
                s2_hwpt: v.s2_hwpt,
                abort: v.abort,
                bypass: v.bypass,
                caps: HostCaps::from_hw_info(&hw),
                idr: v.idr,
                veventq,
            });
        }
        info!(
            "adopted {} vIOMMU(s); {} device(s) to adopt at ATTACH_DEVICE",
            self.viommus.len(),
            state.devices.len()
        );
        self.adopting = state.devices;
        Ok(lost)
    }

    /// Lets go of every object without destroying it (the backend is stopping, and a new one
    /// will adopt them): the devices keep translating.
    pub fn leave(&mut self) {
        let devices = std::mem::take(&mut self.devices);
        let viommus = std::mem::take(&mut self.viommus);
        info!(
            "leaving {} passthrough device(s) on {} vIOMMU(s) for the next backend",
            devices.len(),
            viommus.len()
        );
    }

    /// Detaches every device and destroys every object (end of session).
    pub fn teardown(&mut self) {
        let handles: Vec<u32> = self.devices.keys().copied().collect();
        for handle in handles {
            let _ = self.detach(handle, &mut NoKeeper);
        }
        let ids: Vec<ObjectId> = self.viommus.iter().map(|v| v.id).collect();
        for id in ids {
            self.drop_viommu(id, &mut NoKeeper);
        }
    }
}

/// What a passthrough device's DMA should go through while its stream is in `state`. A guest
/// STE the model finds ILLEGAL, or a stream with no reachable STE, aborts (the host would report
/// C_BAD_STE or a fetch fault for the device's first transaction; the device stays safe).
pub fn target_for(state: &StreamState) -> Target {
    match state {
        StreamState::GlobalBypass => Target::Bypass,
        StreamState::GlobalAbort | StreamState::Unreachable(_) => Target::Abort,
        StreamState::Ste { ste, config } => match config {
            Ok(StreamConfig::Bypass) => Target::Bypass,
            Ok(StreamConfig::Translate {
                s1: Some(_),
                s2: None,
                ..
            }) => Target::Translate(rules::mask_vste([ste.words[0], ste.words[1]])),
            // Abort, and a guest stage 2 (the host owns stage 2 of a passthrough device).
            Ok(_) | Err(_) => Target::Abort,
        },
    }
}

impl Drop for HostObjects {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's pre-allocated nested HWPTs (linux-iommufd.md): abort `{ste0 = V}` and bypass
    /// `{ste0 = V | Cfg = 4 << 1}`.
    #[test]
    fn abort_and_bypass_vstes_are_qemus() {
        assert_eq!(ABORT_VSTE, [0x1, 0]);
        assert_eq!(BYPASS_VSTE, [0x9, 0]);
    }
}
