//! An in-memory double of Linux iommufd + VFIO for the SMMUv3 nesting flow.
//!
//! [`HostDouble`] implements [`HostIommu`] and enforces the kernel's rules as linux-iommufd.md
//! lists them (1.2, 1.4, 1.7, 1.8), so the test suites can cover every path without a kernel:
//!
//! - one object namespace, IDs handed out like the kernel's xarray (`xa_alloc`, lowest free ID
//!   from 1, so a destroyed ID is reused);
//! - references: a vIOMMU holds its S2 HWPT; nested HWPTs, vDEVICEs and vEVENTQs hold their
//!   vIOMMU; an attached device holds its HWPT; a vEVENTQ's fd holds the vEVENTQ; VFIO holds
//!   every bound device. IOMMU_DESTROY of an object with users is -EBUSY;
//! - IOMMU_HWPT_INVALIDATE validates with [`rules::validate_cmd`], rewrites as the kernel does
//!   (VMID forced, vSID → pSID) and issues in batches of [`INVALIDATE_BATCH`] commands, so a
//!   refusal at index k leaves only the whole batches before k executed;
//! - vEVENTQs keep the kernel's list semantics: a single lost-events header at the tail,
//!   31-bit wrapping sequence numbers.
//!
//! The "frontend" side (devices bound by QEMU, the nesting-parent HWPTs it allocated) is set up
//! with [`HostDouble::add_device`] and [`HostDouble::add_s2_hwpt`]; events are injected with
//! [`HostDouble::inject_event`].
//!
//! The vEVENTQ fd is the read end of a pipe rather than an eventfd: it polls readable while
//! records wait, like the kernel's, and the double can tell when the caller has closed it
//! (the kernel's fd holds a users reference on the vEVENTQ, eventq.c:396-403).

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::pipe::PipeFlags;
use viommu_smmuv3::spec::cmd::RawCommand;
use viommu_smmuv3::spec::event::Event;
use viommu_smmuv3::spec::regs::{Idr0, Idr3};

use super::rules::{self, HostCaps, op, ste_cfg};
use super::{
    Errno, HostDevice, HostError, HostIommu, HwInfo, InvalidateError, ObjectId, RawCmd, VEvent,
    VSte,
};

/// Most entries one IOMMU_HWPT_INVALIDATE takes.
pub const MAX_INVALIDATE_ENTRIES: usize = 1 << 19;

/// Commands the kernel issues per batch: CMDQ_BATCH_ENTRIES (64) less the CMD_SYNC it appends.
pub const INVALIDATE_BATCH: usize = 63;

/// The deepest vEVENTQ.
pub const MAX_VEVENTQ_DEPTH: u32 = 1 << 19;

/// The event IDs the kernel forwards to a vEVENTQ (C_BAD_STE, F_STREAM_DISABLED,
/// C_BAD_SUBSTREAMID, C_BAD_CD, F_TRANSLATION, F_ADDR_SIZE, F_ACCESS, F_PERMISSION).
pub const FORWARDED_EVENTS: [u8; 8] = [0x04, 0x06, 0x08, 0x0a, 0x10, 0x11, 0x12, 0x13];

/// A host SMMU that supports nesting: S1P, S2P, AArch64 tables, COHACC, ATS, 16-bit ASIDs and
/// VMIDs, 2-level tables, 20-bit SSIDs, range invalidation, no stalls, 48-bit OAS.
pub const NESTING_HW: HwInfo = HwInfo {
    flags: 0,
    idr: [
        1 | 1 << 1
            | 2 << 2
            | 1 << 4
            | 1 << 10
            | 1 << 12
            | 1 << 13
            | 1 << 18
            | 1 << 19
            | 2 << 21
            | 1 << 24
            | 1 << 27,
        16 | 20 << 6 | 19 << 16 | 19 << 21,
        0,
        1 << 10,
        0,
        5 | 1 << 4 | 1 << 5 | 1 << 6,
    ],
    iidr: 0,
    aidr: 1,
};

const GET_HW_INFO: &str = "IOMMU_GET_HW_INFO";
const VIOMMU_ALLOC: &str = "IOMMU_VIOMMU_ALLOC";
const VDEVICE_ALLOC: &str = "IOMMU_VDEVICE_ALLOC";
const HWPT_ALLOC: &str = "IOMMU_HWPT_ALLOC";
const ATTACH: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
const INVALIDATE: &str = "IOMMU_HWPT_INVALIDATE";
const VEVENTQ_ALLOC: &str = "IOMMU_VEVENTQ_ALLOC";
const VEVENTQ_READ: &str = "read(vEVENTQ)";
const DESTROY: &str = "IOMMU_DESTROY";
const SETUP: &str = "double setup";

/// `xa_limit_31b`.
const MAX_OBJECT_ID: ObjectId = 0x7fff_ffff;
/// Sequence numbers wrap at INT_MAX.
const SEQUENCE_MASK: u32 = 0x7fff_ffff;
/// Event record StreamID, d0\[63:32\] (the kernel's EVTQ_0_SID).
const EVTQ_0_SID: u64 = 0xffff_ffff << 32;
const EVTQ_1_STALL: u64 = 1 << 31;
const EVTQ_1_S2: u64 = 1 << 39;

fn kernel(op: &'static str, errno: Errno) -> HostError {
    HostError::Kernel { op, errno }
}

/// FEAT_NESTING: IDR0.S1P && IDR0.S2P.
fn has_nesting(hw: &HwInfo) -> bool {
    let [idr0, ..] = hw.idr;
    let idr0 = Idr0::from_bits(idr0);
    idr0.s1p() && idr0.s2p()
}

/// FEAT_S2FWB: IDR3.FWB.
fn has_s2fwb(hw: &HwInfo) -> bool {
    let [_, _, _, idr3, _, _] = hw.idr;
    Idr3::from_bits(idr3).fwb()
}

/// What [`HostDouble::inject_event`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// Queued on the vEVENTQ with this sequence number.
    Queued {
        /// The record's sequence number.
        sequence: u32,
    },
    /// The queue was full: the lost-events header at the tail now carries this sequence number.
    Lost {
        /// The header's sequence number.
        sequence: u32,
    },
    /// Not forwarded (only logged on the host): an unknown device, an event ID or kind the
    /// kernel keeps, no nested attach with a vDEVICE, or no vEVENTQ.
    Dropped,
}

/// A physical SMMU instance.
#[derive(Debug)]
struct PhysicalSmmu {
    hw: HwInfo,
    /// The next S2 domain's VMID (VMID 0 is reserved).
    next_vmid: u16,
}

/// `master->vmaster`: set by a nested attach when the device has a vDEVICE in that vIOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vmaster {
    viommu: ObjectId,
    vsid: u64,
}

#[derive(Debug)]
struct BoundDevice {
    smmu: u32,
    psid: u32,
    canwbs: bool,
    attached: Option<ObjectId>,
    vmaster: Option<Vmaster>,
}

#[derive(Debug)]
struct Paging {
    smmu: u32,
    nest_parent: bool,
    vmid: u16,
}

#[derive(Debug)]
struct Viommu {
    s2: ObjectId,
    smmu: u32,
    vmid: u16,
}

#[derive(Debug)]
struct Vdevice {
    viommu: ObjectId,
    dev: u32,
    virt_id: u64,
}

#[derive(Debug)]
struct Nested {
    viommu: ObjectId,
    smmu: u32,
    ste: VSte,
}

/// A vEVENTQ's delivery list (`iommufd_veventq`): real records count against the depth, the
/// lost-events header does not.
#[derive(Debug)]
struct EventQueue {
    depth: u32,
    num_events: u32,
    sequence: u32,
    deliver: VecDeque<VEvent>,
}

impl EventQueue {
    fn new(depth: u32) -> Self {
        Self {
            depth,
            num_events: 0,
            sequence: 0,
            deliver: VecDeque::new(),
        }
    }

    /// `iommufd_viommu_report_event` + `iommufd_vevent_handler`.
    fn report(&mut self, record: [u64; 4]) -> Injection {
        // The lost-events header, when on the list, is always last: whatever comes next
        // (a record, or the header again with a new sequence number) replaces it.
        if matches!(self.deliver.back(), Some(VEvent::Lost { .. })) {
            self.deliver.pop_back();
        }
        let sequence = self.sequence;
        self.sequence = sequence.wrapping_add(1) & SEQUENCE_MASK;
        if self.num_events >= self.depth {
            self.deliver.push_back(VEvent::Lost { sequence });
            Injection::Lost { sequence }
        } else {
            self.num_events = self.num_events.saturating_add(1);
            self.deliver.push_back(VEvent::Event { sequence, record });
            Injection::Queued { sequence }
        }
    }

    /// One record off the head, as `read()` takes it.
    fn fetch(&mut self) -> Option<VEvent> {
        let event = self.deliver.pop_front()?;
        if matches!(event, VEvent::Event { .. }) {
            self.num_events = self.num_events.saturating_sub(1);
        }
        Some(event)
    }
}

#[derive(Debug)]
struct Veventq {
    viommu: ObjectId,
    queue: EventQueue,
    /// The pipe's write end; the caller holds the read end.
    notify: OwnedFd,
    /// A byte waits in the pipe.
    signalled: bool,
}

impl Veventq {
    /// Whether the caller still holds the read end (the fd's users reference).
    fn fd_open(&self) -> bool {
        let mut fds = [PollFd::new(&self.notify, PollFlags::OUT)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(_) => fds
                .iter()
                .all(|fd| !fd.revents().intersects(PollFlags::ERR | PollFlags::HUP)),
            // Cannot tell: assume the reference is still held.
            Err(_) => true,
        }
    }

    /// Makes the fd readable while records wait.
    fn signal(&mut self) {
        if self.signalled || self.queue.deliver.is_empty() || !self.fd_open() {
            return;
        }
        if rustix::io::write(&self.notify, &[1]).is_ok() {
            self.signalled = true;
        }
    }
}

#[derive(Debug)]
enum Object {
    Device(BoundDevice),
    Paging(Paging),
    Viommu(Viommu),
    Vdevice(Vdevice),
    Nested(Nested),
    Veventq(Veventq),
}

#[derive(Debug, Clone, Copy)]
struct InvalidateFault {
    after: u32,
    errno: Errno,
    /// Calls still to fail, this one included.
    times: u32,
}

/// An in-memory iommufd + VFIO for SMMUv3 nesting that enforces the kernel's rules.
#[derive(Debug)]
pub struct HostDouble {
    smmus: Vec<PhysicalSmmu>,
    objects: BTreeMap<ObjectId, Object>,
    executed: Vec<RawCmd>,
    ioctls: u64,
    invalidates: u64,
    fault: Option<InvalidateFault>,
}

impl HostDouble {
    /// A host whose first physical SMMU (instance 0) has the ID registers `hw`.
    pub fn new(hw: HwInfo) -> Self {
        Self {
            smmus: vec![PhysicalSmmu { hw, next_vmid: 1 }],
            objects: BTreeMap::new(),
            executed: Vec::new(),
            ioctls: 0,
            invalidates: 0,
            fault: None,
        }
    }

    /// Adds another physical SMMU instance (even one with the same ID registers) and returns
    /// its instance ID.
    pub fn add_smmu(&mut self, hw: HwInfo) -> u32 {
        let id = u32::try_from(self.smmus.len()).unwrap_or(u32::MAX);
        self.smmus.push(PhysicalSmmu { hw, next_vmid: 1 });
        id
    }

    /// The ID registers of SMMU instance `smmu`.
    pub fn smmu_hw(&self, smmu: u32) -> Option<HwInfo> {
        self.smmu(smmu).map(|s| s.hw)
    }

    /// Registers a device the frontend bound (VFIO_DEVICE_BIND_IOMMUFD gave it `dev_id`) with
    /// the single StreamID `psid`. With `hw` `None` or equal to an existing SMMU's ID registers
    /// it sits behind that SMMU (instance 0 for `None`); a different `hw` adds a new SMMU
    /// instance. Returns the device's SMMU instance. Devices are CANWBS unless
    /// [`Self::set_canwbs`] says otherwise.
    pub fn add_device(
        &mut self,
        dev_id: u32,
        psid: u32,
        hw: Option<HwInfo>,
    ) -> Result<u32, HostError> {
        let smmu = match hw {
            None => 0,
            Some(hw) => match self.smmus.iter().position(|s| s.hw == hw) {
                Some(i) => u32::try_from(i).map_err(|_| kernel(SETUP, Errno::NOSPC))?,
                None => self.add_smmu(hw),
            },
        };
        self.add_device_on(dev_id, psid, smmu)?;
        Ok(smmu)
    }

    /// Registers a bound device behind SMMU instance `smmu` (see [`Self::add_device`]).
    pub fn add_device_on(&mut self, dev_id: u32, psid: u32, smmu: u32) -> Result<(), HostError> {
        self.smmu(smmu).ok_or(kernel(SETUP, Errno::NOENT))?;
        self.check_new_id(dev_id)?;
        let clash = self
            .objects
            .values()
            .any(|o| matches!(o, Object::Device(d) if d.smmu == smmu && d.psid == psid));
        if clash {
            return Err(kernel(SETUP, Errno::EXIST));
        }
        self.objects.insert(
            dev_id,
            Object::Device(BoundDevice {
                smmu,
                psid,
                canwbs: true,
                attached: None,
                vmaster: None,
            }),
        );
        Ok(())
    }

    /// Sets whether a device is CANWBS (IORT root complex flag). A vIOMMU needs a CANWBS
    /// device or an SMMU with S2FWB.
    pub fn set_canwbs(&mut self, dev_id: u32, canwbs: bool) -> Result<(), HostError> {
        match self.objects.get_mut(&dev_id) {
            Some(Object::Device(d)) => {
                d.canwbs = canwbs;
                Ok(())
            }
            _ => Err(kernel(SETUP, Errno::NOENT)),
        }
    }

    /// Registers a nesting-parent S2 HWPT the frontend allocated as `id` on SMMU `smmu`.
    /// -EOPNOTSUPP if that SMMU has no nesting (the kernel would have refused it).
    pub fn add_s2_hwpt(&mut self, id: ObjectId, smmu: u32) -> Result<(), HostError> {
        self.add_paging(id, smmu, true)
    }

    /// Allocates a nesting-parent S2 HWPT on SMMU `smmu` with the next free ID.
    pub fn alloc_s2_hwpt(&mut self, smmu: u32) -> Result<ObjectId, HostError> {
        let id = self.alloc_id().map_err(|e| kernel(SETUP, e))?;
        self.add_paging(id, smmu, true)?;
        Ok(id)
    }

    /// Registers a plain paging HWPT (not a nesting parent) as `id` on SMMU `smmu`.
    pub fn add_paging_hwpt(&mut self, id: ObjectId, smmu: u32) -> Result<(), HostError> {
        self.add_paging(id, smmu, false)
    }

    /// A [`HostDevice`] for `dev_id` with a placeholder cdev (the double only reads the ID).
    pub fn host_device(dev_id: u32) -> Result<HostDevice, HostError> {
        let cdev = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
            .map_err(|e| kernel(SETUP, e))?;
        Ok(HostDevice { dev_id, cdev })
    }

    /// The HWPT device `dev_id` is attached to.
    pub fn attached(&self, dev_id: u32) -> Option<ObjectId> {
        match self.objects.get(&dev_id) {
            Some(Object::Device(d)) => d.attached,
            _ => None,
        }
    }

    /// The STE a nested HWPT was allocated with, as the kernel stored it (all zeros for V=0).
    pub fn nested_ste(&self, hwpt: ObjectId) -> Option<VSte> {
        match self.objects.get(&hwpt) {
            Some(Object::Nested(n)) => Some(n.ste),
            _ => None,
        }
    }

    /// The VMID of an S2 HWPT or of a vIOMMU (its S2's), which forwarded TLBIs carry.
    pub fn vmid(&self, id: ObjectId) -> Option<u16> {
        match self.objects.get(&id) {
            Some(Object::Paging(p)) => Some(p.vmid),
            Some(Object::Viommu(v)) => Some(v.vmid),
            _ => None,
        }
    }

    /// The vSID of device `dev_id`'s vDEVICE, if it has one.
    pub fn vsid(&self, dev_id: u32) -> Option<u64> {
        self.objects.values().find_map(|o| match o {
            Object::Vdevice(v) if v.dev == dev_id => Some(v.virt_id),
            _ => None,
        })
    }

    /// Whether an object (of any type) has ID `id`.
    pub fn exists(&self, id: ObjectId) -> bool {
        self.objects.contains_key(&id)
    }

    /// Objects allocated through [`HostIommu`] and not destroyed: vIOMMUs, vDEVICEs, nested
    /// HWPTs and vEVENTQs (not the registered devices and paging HWPTs).
    pub fn live_objects(&self) -> usize {
        self.objects
            .values()
            .filter(|o| {
                matches!(
                    o,
                    Object::Viommu(_) | Object::Vdevice(_) | Object::Nested(_) | Object::Veventq(_)
                )
            })
            .count()
    }

    /// How many ioctls [`HostIommu`] calls made (every method but `read_vevents`).
    pub fn ioctl_count(&self) -> u64 {
        self.ioctls
    }

    /// How many IOMMU_HWPT_INVALIDATE calls were made, failed ones included.
    pub fn invalidate_count(&self) -> u64 {
        self.invalidates
    }

    /// The commands the host SMMU executed so far, as the kernel rewrote them (VMID forced,
    /// TLBI_NSNH_ALL turned into TLBI_NH_ALL, vSID replaced by the pSID).
    pub fn executed(&self) -> &[RawCmd] {
        &self.executed
    }

    /// Takes the executed-command log, leaving it empty.
    pub fn take_executed(&mut self) -> Vec<RawCmd> {
        std::mem::take(&mut self.executed)
    }

    /// Makes the next IOMMU_HWPT_INVALIDATE that issues a batch fail with `errno` (e.g.
    /// ETIMEDOUT, an ATC_INV sync timeout) once `after` of its commands have executed: the
    /// batch holding command `after` (or the last batch) fails, and `done` is that batch's last
    /// index, as the kernel reports it. A validation failure earlier in the call wins.
    pub fn fail_next_invalidate(&mut self, after: u32, errno: Errno) {
        self.fail_next_invalidates(1, after, errno);
    }

    /// [`Self::fail_next_invalidate`] for the next `times` calls that issue a batch (a host
    /// that keeps timing out).
    pub fn fail_next_invalidates(&mut self, times: u32, after: u32, errno: Errno) {
        self.fault = (times > 0).then_some(InvalidateFault {
            after,
            errno,
            times,
        });
    }

    /// The SMMU reports event `record` for device `dev_id`: forwarded, as
    /// `arm_smmu_handle_event` does, only for a forwarded event ID, not a stall, not a stage-2
    /// fault (EVTQ_1_S2), for a device whose nested attach found a vDEVICE, to that vIOMMU's
    /// vEVENTQ, with the StreamID field rewritten to the vSID.
    pub fn inject_event(&mut self, dev_id: u32, record: [u64; 4]) -> Injection {
        let [d0, d1, d2, d3] = record;
        let id = Event { words: record }.id().0;
        if !FORWARDED_EVENTS.contains(&id) || d1 & (EVTQ_1_STALL | EVTQ_1_S2) != 0 {
            return Injection::Dropped;
        }
        let vmaster = match self.objects.get(&dev_id) {
            Some(Object::Device(BoundDevice {
                vmaster: Some(vm), ..
            })) => *vm,
            _ => return Injection::Dropped,
        };
        let queue = self.objects.values_mut().find_map(|o| match o {
            Object::Veventq(q) if q.viommu == vmaster.viommu => Some(q),
            _ => None,
        });
        let Some(queue) = queue else {
            return Injection::Dropped;
        };
        let d0 = (d0 & !EVTQ_0_SID) | ((vmaster.vsid << 32) & EVTQ_0_SID);
        let injection = queue.queue.report([d0, d1, d2, d3]);
        queue.signal();
        injection
    }

    /// Records waiting on vEVENTQ `veventq` (the lost-events header included).
    pub fn pending_events(&self, veventq: ObjectId) -> Option<usize> {
        match self.objects.get(&veventq) {
            Some(Object::Veventq(q)) => Some(q.queue.deliver.len()),
            _ => None,
        }
    }

    fn smmu(&self, smmu: u32) -> Option<&PhysicalSmmu> {
        usize::try_from(smmu).ok().and_then(|i| self.smmus.get(i))
    }

    fn count_ioctl(&mut self) {
        self.ioctls = self.ioctls.saturating_add(1);
    }

    /// `xa_alloc` with `XA_FLAGS_ALLOC1` and `xa_limit_31b`: the lowest free ID from 1.
    fn alloc_id(&self) -> Result<ObjectId, Errno> {
        let mut candidate: ObjectId = 1;
        for &id in self.objects.keys() {
            if id > candidate {
                break;
            }
            if id == candidate {
                candidate = candidate.checked_add(1).ok_or(Errno::BUSY)?;
            }
        }
        if candidate > MAX_OBJECT_ID {
            return Err(Errno::BUSY);
        }
        Ok(candidate)
    }

    fn check_new_id(&self, id: ObjectId) -> Result<(), HostError> {
        if id == 0 || id > MAX_OBJECT_ID {
            return Err(kernel(SETUP, Errno::INVAL));
        }
        if self.objects.contains_key(&id) {
            return Err(kernel(SETUP, Errno::EXIST));
        }
        Ok(())
    }

    fn add_paging(&mut self, id: ObjectId, smmu: u32, nest_parent: bool) -> Result<(), HostError> {
        self.check_new_id(id)?;
        let index = usize::try_from(smmu).map_err(|_| kernel(SETUP, Errno::NOENT))?;
        let s = self
            .smmus
            .get_mut(index)
            .ok_or(kernel(SETUP, Errno::NOENT))?;
        if nest_parent && !has_nesting(&s.hw) {
            return Err(kernel(SETUP, Errno::OPNOTSUPP));
        }
        let vmid = s.next_vmid;
        s.next_vmid = vmid.checked_add(1).ok_or(kernel(SETUP, Errno::NOSPC))?;
        self.objects.insert(
            id,
            Object::Paging(Paging {
                smmu,
                nest_parent,
                vmid,
            }),
        );
        Ok(())
    }

    fn device(&self, dev_id: u32, op: &'static str) -> Result<&BoundDevice, HostError> {
        match self.objects.get(&dev_id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(kernel(op, Errno::NOENT)),
        }
    }

    fn viommu(&self, id: ObjectId, op: &'static str) -> Result<&Viommu, HostError> {
        match self.objects.get(&id) {
            Some(Object::Viommu(v)) => Ok(v),
            _ => Err(kernel(op, Errno::NOENT)),
        }
    }

    /// The vSID → pSID table of a vIOMMU (its vDEVICEs).
    fn vsid_table(&self, viommu: ObjectId) -> BTreeMap<u64, u32> {
        let mut table = BTreeMap::new();
        for o in self.objects.values() {
            if let Object::Vdevice(v) = o
                && v.viommu == viommu
                && let Some(Object::Device(d)) = self.objects.get(&v.dev)
            {
                table.insert(v.virt_id, d.psid);
            }
        }
        table
    }

    /// How many references keep object `id` alive.
    fn users(&self, id: ObjectId, object: &Object) -> usize {
        let attached = |o: &Object| matches!(o, Object::Device(d) if d.attached == Some(id));
        match object {
            // VFIO holds a bound device until it unbinds.
            Object::Device(_) => 1,
            Object::Paging(_) => self
                .objects
                .values()
                .filter(|o| attached(o) || matches!(o, Object::Viommu(v) if v.s2 == id))
                .count(),
            Object::Viommu(_) => self
                .objects
                .values()
                .filter(|o| match o {
                    Object::Nested(n) => n.viommu == id,
                    Object::Vdevice(v) => v.viommu == id,
                    Object::Veventq(q) => q.viommu == id,
                    _ => false,
                })
                .count(),
            Object::Nested(_) => self.objects.values().filter(|o| attached(o)).count(),
            Object::Vdevice(_) => 0,
            Object::Veventq(q) => usize::from(q.fd_open()),
        }
    }
}

/// `arm_vsmmu_convert_user_cmd` on a validated command; `None` for an unknown vSID.
fn convert_cmd(cmd: &RawCmd, vmid: u16, vsids: &BTreeMap<u64, u32>) -> Option<RawCmd> {
    let [d0, d1] = *cmd;
    let command = RawCommand { d0, d1 };
    let converted = match command.opcode().0 {
        op::TLBI_NSNH_ALL => RawCommand {
            d0: u64::from(op::TLBI_NH_ALL),
            d1: 0,
        }
        .with_vmid(vmid),
        op::TLBI_NH_ALL | op::TLBI_NH_ASID | op::TLBI_NH_VA | op::TLBI_NH_VAA => {
            command.with_vmid(vmid)
        }
        op::ATC_INV | op::CFGI_CD | op::CFGI_CD_ALL => {
            let psid = vsids.get(&u64::from(command.sid()))?;
            command.with_sid(*psid)
        }
        _ => return None,
    };
    Some([converted.d0, converted.d1])
}

impl HostIommu for HostDouble {
    fn hw_info(&mut self, dev_id: u32) -> Result<HwInfo, HostError> {
        self.count_ioctl();
        let smmu = self.device(dev_id, GET_HW_INFO)?.smmu;
        self.smmu_hw(smmu).ok_or(kernel(GET_HW_INFO, Errno::NOENT))
    }

    fn alloc_viommu(&mut self, dev_id: u32, s2_hwpt: ObjectId) -> Result<ObjectId, HostError> {
        self.count_ioctl();
        let err = |errno| kernel(VIOMMU_ALLOC, errno);
        let dev = self.device(dev_id, VIOMMU_ALLOC)?;
        let hw = self.smmu_hw(dev.smmu).ok_or(err(Errno::NOENT))?;
        // arm_smmu_get_viommu_size() == 0.
        if !has_nesting(&hw) || !(dev.canwbs || has_s2fwb(&hw)) {
            return Err(err(Errno::OPNOTSUPP));
        }
        let s2 = match self.objects.get(&s2_hwpt) {
            Some(Object::Paging(p)) => p,
            _ => return Err(err(Errno::NOENT)),
        };
        if !s2.nest_parent || s2.smmu != dev.smmu {
            return Err(err(Errno::INVAL));
        }
        let viommu = Viommu {
            s2: s2_hwpt,
            smmu: dev.smmu,
            vmid: s2.vmid,
        };
        let id = self.alloc_id().map_err(err)?;
        self.objects.insert(id, Object::Viommu(viommu));
        Ok(id)
    }

    fn alloc_vdevice(
        &mut self,
        viommu: ObjectId,
        dev_id: u32,
        vsid: u64,
    ) -> Result<ObjectId, HostError> {
        self.count_ioctl();
        let err = |errno| kernel(VDEVICE_ALLOC, errno);
        let smmu = self.viommu(viommu, VDEVICE_ALLOC)?.smmu;
        if self.device(dev_id, VDEVICE_ALLOC)?.smmu != smmu {
            return Err(err(Errno::INVAL));
        }
        let taken = self.objects.values().any(|o| {
            matches!(o, Object::Vdevice(v)
                if v.dev == dev_id || (v.viommu == viommu && v.virt_id == vsid))
        });
        if taken {
            return Err(err(Errno::EXIST));
        }
        let id = self.alloc_id().map_err(err)?;
        self.objects.insert(
            id,
            Object::Vdevice(Vdevice {
                viommu,
                dev: dev_id,
                virt_id: vsid,
            }),
        );
        Ok(id)
    }

    fn alloc_nested_hwpt(
        &mut self,
        viommu: ObjectId,
        dev_id: u32,
        ste: VSte,
    ) -> Result<ObjectId, HostError> {
        self.count_ioctl();
        let err = |errno| kernel(HWPT_ALLOC, errno);
        let dev_smmu = self.device(dev_id, HWPT_ALLOC)?.smmu;
        let smmu = match self.objects.get(&viommu) {
            None => return Err(err(Errno::NOENT)),
            Some(Object::Viommu(v)) => v.smmu,
            // The old path (pt_id = the S2): ARM has no domain_alloc_nested.
            Some(Object::Paging(_)) => return Err(err(Errno::OPNOTSUPP)),
            Some(_) => return Err(err(Errno::INVAL)),
        };
        if dev_smmu != smmu {
            return Err(err(Errno::INVAL));
        }
        let ste = rules::validate_vste(ste).map_err(|_| err(Errno::IO))?;
        let id = self.alloc_id().map_err(err)?;
        self.objects
            .insert(id, Object::Nested(Nested { viommu, smmu, ste }));
        Ok(id)
    }

    fn attach(&mut self, dev: &HostDevice, pt_id: ObjectId) -> Result<(), HostError> {
        self.count_ioctl();
        let err = |errno| kernel(ATTACH, errno);
        let dev_id = dev.dev_id;
        let smmu = self.device(dev_id, ATTACH)?.smmu;
        let vmaster = match self.objects.get(&pt_id) {
            None => return Err(err(Errno::NOENT)),
            Some(Object::Paging(p)) => {
                if p.smmu != smmu {
                    return Err(err(Errno::INVAL));
                }
                None
            }
            Some(Object::Nested(n)) => {
                if n.smmu != smmu {
                    return Err(err(Errno::INVAL));
                }
                let [ste0, _] = n.ste;
                let cfg = (ste0 >> 1) & 7;
                let vsid = self.objects.values().find_map(|o| match o {
                    Object::Vdevice(v) if v.dev == dev_id && v.viommu == n.viommu => {
                        Some(v.virt_id)
                    }
                    _ => None,
                });
                match vsid {
                    Some(vsid) => Some(Vmaster {
                        viommu: n.viommu,
                        vsid,
                    }),
                    // GBPA case: abort and bypass attach without a vDEVICE, and report nothing.
                    None if cfg == ste_cfg::ABORT || cfg == ste_cfg::BYPASS => None,
                    None => return Err(err(Errno::NOENT)),
                }
            }
            Some(_) => return Err(err(Errno::INVAL)),
        };
        // An atomic replace: the old HWPT's reference moves to the new one.
        if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
            d.attached = Some(pt_id);
            d.vmaster = vmaster;
        }
        Ok(())
    }

    fn invalidate(&mut self, viommu: ObjectId, cmds: &[RawCmd]) -> Result<(), InvalidateError> {
        self.count_ioctl();
        self.invalidates = self.invalidates.saturating_add(1);
        let fail = |done: usize, errno| InvalidateError {
            done: u32::try_from(done).unwrap_or(u32::MAX),
            error: kernel(INVALIDATE, errno),
        };
        if cmds.len() > MAX_INVALIDATE_ENTRIES {
            return Err(fail(0, Errno::INVAL));
        }
        let (smmu, vmid) = match self.objects.get(&viommu) {
            None => return Err(fail(0, Errno::NOENT)),
            Some(Object::Viommu(v)) => (v.smmu, v.vmid),
            // A nested HWPT has no cache_invalidate_user on ARM.
            Some(Object::Nested(_)) => return Err(fail(0, Errno::OPNOTSUPP)),
            Some(_) => return Err(fail(0, Errno::INVAL)),
        };
        // iommu_copy_struct_from_full_user_array() refuses entry_num 0.
        if cmds.is_empty() {
            return Err(fail(0, Errno::INVAL));
        }
        let hw = self.smmu_hw(smmu).ok_or(fail(0, Errno::NOENT))?;
        let caps = HostCaps::from_hw_info(&hw);
        let vsids = self.vsid_table(viommu);
        let mut batch: Vec<RawCmd> = Vec::with_capacity(INVALIDATE_BATCH.min(cmds.len()));
        let mut last = 0usize;
        for (i, cmd) in cmds.iter().enumerate() {
            let known = |sid: u32| vsids.contains_key(&u64::from(sid));
            let converted = rules::validate_cmd(cmd, &caps, known)
                .ok()
                .and_then(|()| convert_cmd(cmd, vmid, &vsids));
            // Converted but not issued: the commands of this partial batch are dropped.
            let Some(converted) = converted else {
                return Err(fail(i, Errno::IO));
            };
            batch.push(converted);
            let cur = i.saturating_add(1);
            if cur != cmds.len() && cur.saturating_sub(last) != INVALIDATE_BATCH {
                continue;
            }
            if let Some(fault) = self.fault {
                let after = usize::try_from(fault.after).unwrap_or(usize::MAX);
                if after < cur || cur == cmds.len() {
                    let times = fault.times.saturating_sub(1);
                    self.fault = (times > 0).then_some(InvalidateFault { times, ..fault });
                    let issued = after.saturating_sub(last);
                    self.executed.extend(batch.iter().take(issued));
                    return Err(fail(cur.saturating_sub(1), fault.errno));
                }
            }
            self.executed.append(&mut batch);
            last = cur;
        }
        Ok(())
    }

    fn alloc_veventq(
        &mut self,
        viommu: ObjectId,
        depth: u32,
    ) -> Result<(ObjectId, OwnedFd), HostError> {
        self.count_ioctl();
        let err = |errno| kernel(VEVENTQ_ALLOC, errno);
        if depth == 0 || depth > MAX_VEVENTQ_DEPTH {
            return Err(err(Errno::INVAL));
        }
        self.viommu(viommu, VEVENTQ_ALLOC)?;
        let exists = self
            .objects
            .values()
            .any(|o| matches!(o, Object::Veventq(q) if q.viommu == viommu));
        if exists {
            return Err(err(Errno::EXIST));
        }
        let id = self.alloc_id().map_err(err)?;
        let (read, write) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).map_err(err)?;
        self.objects.insert(
            id,
            Object::Veventq(Veventq {
                viommu,
                queue: EventQueue::new(depth),
                notify: write,
                signalled: false,
            }),
        );
        Ok((id, read))
    }

    fn read_vevents(
        &mut self,
        veventq: ObjectId,
        fd: BorrowedFd<'_>,
        out: &mut Vec<VEvent>,
    ) -> Result<usize, HostError> {
        let err = |errno| kernel(VEVENTQ_READ, errno);
        let Some(Object::Veventq(q)) = self.objects.get_mut(&veventq) else {
            return Err(err(Errno::NOENT));
        };
        // The fd must be this queue's: the pipe's two ends share one inode.
        let ours = rustix::fs::fstat(q.notify.as_fd()).map_err(err)?;
        let theirs = rustix::fs::fstat(fd).map_err(err)?;
        if ours.st_dev != theirs.st_dev || ours.st_ino != theirs.st_ino {
            return Err(err(Errno::BADF));
        }
        let mut count = 0usize;
        while let Some(event) = q.queue.fetch() {
            out.push(event);
            count = count.saturating_add(1);
        }
        let mut buf = [0u8; 16];
        while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
        q.signalled = false;
        Ok(count)
    }

    fn destroy(&mut self, id: ObjectId) -> Result<(), HostError> {
        self.count_ioctl();
        let Some(object) = self.objects.get(&id) else {
            return Err(kernel(DESTROY, Errno::NOENT));
        };
        if self.users(id, object) > 0 {
            return Err(kernel(DESTROY, Errno::BUSY));
        }
        self.objects.remove(&id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: u32 = 1;
    const DEV2: u32 = 2;
    const S2: ObjectId = 3;
    const PSID: u32 = 0x100;
    const PSID2: u32 = 0x200;
    const VSID: u64 = 0x8;
    const VSID2: u64 = 0x10;

    const IDR0_S1P: u32 = Idr0::new().with_s1p(true).into_bits();
    const IDR3_FWB: u32 = Idr3::new().with_fwb(true).into_bits();

    const ABORT: VSte = [1, 0];
    const BYPASS: VSte = [1 | 4 << 1, 0];
    const TRANSLATE: VSte = [1 | 5 << 1 | 0x4_0000_0000, 0];

    /// Two devices on SMMU 0, its S2 parent.
    fn host() -> HostDouble {
        let mut h = HostDouble::new(NESTING_HW);
        assert_eq!(h.add_device(DEV, PSID, None), Ok(0));
        assert_eq!(h.add_device(DEV2, PSID2, Some(NESTING_HW)), Ok(0));
        h.add_s2_hwpt(S2, 0).unwrap();
        h
    }

    /// An SMMU instance that differs from [`NESTING_HW`].
    fn other_hw() -> HwInfo {
        HwInfo {
            iidr: 0x43b,
            ..NESTING_HW
        }
    }

    fn dev(id: u32) -> HostDevice {
        HostDouble::host_device(id).unwrap()
    }

    fn errno<T: std::fmt::Debug>(r: Result<T, HostError>) -> Errno {
        r.unwrap_err().errno().unwrap()
    }

    fn readable(fd: &OwnedFd) -> bool {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        rustix::event::poll(&mut fds, Some(&zero)).unwrap() == 1
    }

    /// vIOMMU, vDEVICE for DEV, translate HWPT attached.
    fn nested(h: &mut HostDouble) -> (ObjectId, ObjectId, ObjectId) {
        let viommu = h.alloc_viommu(DEV, S2).unwrap();
        let vdev = h.alloc_vdevice(viommu, DEV, VSID).unwrap();
        let hwpt = h.alloc_nested_hwpt(viommu, DEV, TRANSLATE).unwrap();
        h.attach(&dev(DEV), hwpt).unwrap();
        (viommu, vdev, hwpt)
    }

    #[test]
    fn ids_are_the_lowest_free_like_the_xarray() {
        let mut h = host();
        let viommu = h.alloc_viommu(DEV, S2).unwrap();
        assert_eq!(viommu, 4);
        let a = h.alloc_nested_hwpt(viommu, DEV, ABORT).unwrap();
        let b = h.alloc_nested_hwpt(viommu, DEV, BYPASS).unwrap();
        assert_eq!((a, b), (5, 6));
        h.destroy(a).unwrap();
        assert_eq!(h.alloc_nested_hwpt(viommu, DEV, ABORT), Ok(5));
        assert_eq!(h.alloc_s2_hwpt(0), Ok(7));
        // Registered IDs are in the same namespace.
        assert_eq!(errno(h.add_device(7, 0x300, None)), Errno::EXIST);
        assert_eq!(errno(h.add_device(0, 0x300, None)), Errno::INVAL);
        assert_eq!(errno(h.add_device(9, PSID, None)), Errno::EXIST);
        assert_eq!(h.live_objects(), 3);
    }

    #[test]
    fn hw_info_per_device_and_smmu_instances() {
        let mut h = host();
        assert_eq!(h.hw_info(DEV), Ok(NESTING_HW));
        assert_eq!(h.add_device(10, PSID, Some(other_hw())), Ok(1));
        assert_eq!(h.hw_info(10), Ok(other_hw()));
        // Same registers, another instance.
        let third = h.add_smmu(NESTING_HW);
        h.add_device_on(11, PSID, third).unwrap();
        assert_eq!(h.hw_info(11), Ok(NESTING_HW));
        assert_eq!(errno(h.hw_info(99)), Errno::NOENT);
        assert_eq!(errno(h.hw_info(S2)), Errno::NOENT);
        assert_eq!(h.ioctl_count(), 5);
    }

    #[test]
    fn alloc_viommu_rules() {
        let mut h = host();
        h.add_device(10, PSID, Some(other_hw())).unwrap();
        let other_s2 = h.alloc_s2_hwpt(1).unwrap();
        h.add_paging_hwpt(20, 0).unwrap();
        assert_eq!(errno(h.alloc_viommu(99, S2)), Errno::NOENT);
        assert_eq!(errno(h.alloc_viommu(DEV, 99)), Errno::NOENT);
        // Not a HWPT_PAGING: not found.
        assert_eq!(errno(h.alloc_viommu(DEV, DEV2)), Errno::NOENT);
        assert_eq!(errno(h.alloc_viommu(DEV, 20)), Errno::INVAL);
        assert_eq!(errno(h.alloc_viommu(DEV, other_s2)), Errno::INVAL);
        assert_eq!(errno(h.alloc_viommu(10, S2)), Errno::INVAL);
        assert!(h.alloc_viommu(10, other_s2).is_ok());
        assert!(h.alloc_viommu(DEV, S2).is_ok());
        assert_eq!(h.live_objects(), 2);
    }

    /// The ID-register bits and the command and event rewrites, now taken from the spec, are
    /// what the double spelled out before: the old masks and rewrite, copied verbatim.
    #[test]
    fn spec_fields_equal_the_old_literals() {
        const CMD_OPCODE: u64 = 0xff;
        const CMD_VMID: u64 = 0xffff << 32;
        const LOW_32: u64 = 0xffff_ffff;
        assert_eq!(IDR0_S1P, 1 << 1);
        assert_eq!(IDR3_FWB, 1 << 8);
        assert_eq!(!EVTQ_0_SID, LOW_32);

        fn old_convert(cmd: &RawCmd, vmid: u16, vsids: &BTreeMap<u64, u32>) -> Option<RawCmd> {
            let [d0, d1] = *cmd;
            let vmid = u64::from(vmid) << 32;
            let converted = match (d0 & CMD_OPCODE) as u8 {
                op::TLBI_NSNH_ALL => [u64::from(op::TLBI_NH_ALL) | vmid, 0],
                op::TLBI_NH_ALL | op::TLBI_NH_ASID | op::TLBI_NH_VA | op::TLBI_NH_VAA => {
                    [(d0 & !CMD_VMID) | vmid, d1]
                }
                op::ATC_INV | op::CFGI_CD | op::CFGI_CD_ALL => {
                    let psid = vsids.get(&(d0 >> 32))?;
                    [(d0 & LOW_32) | (u64::from(*psid) << 32), d1]
                }
                _ => return None,
            };
            Some(converted)
        }
        let vsids = BTreeMap::from([(VSID, PSID), (0xffff_ffff, PSID2)]);
        let high = [
            0,
            VSID << 32,
            0xffff_ffff << 32,
            0xa5a5_5a5a << 32,
            0x1234 << 48,
        ];
        let low = [0, 0xffff_ff00, 0x0123_4500, 0x0000_1800];
        for opcode in 0..=0xffu64 {
            for d0 in high
                .iter()
                .flat_map(|h| low.iter().map(move |l| h | l | opcode))
            {
                for d1 in [0, u64::MAX, 0x1234_5000 | (1 << 10) | (3 << 8) | 1] {
                    for vmid in [0, 5, 0xffff] {
                        let cmd = [d0, d1];
                        assert_eq!(
                            convert_cmd(&cmd, vmid, &vsids),
                            old_convert(&cmd, vmid, &vsids),
                            "{cmd:x?} vmid {vmid}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn alloc_viommu_needs_nesting_and_coherency() {
        let no_s1 = HwInfo {
            idr: [NESTING_HW.idr[0] & !IDR0_S1P, 0, 0, 0, 0, 0],
            ..NESTING_HW
        };
        let mut h = HostDouble::new(no_s1);
        h.add_device(DEV, PSID, None).unwrap();
        assert_eq!(errno(h.add_s2_hwpt(S2, 0)), Errno::OPNOTSUPP);
        assert_eq!(errno(h.alloc_viommu(DEV, S2)), Errno::OPNOTSUPP);

        let mut h = host();
        h.set_canwbs(DEV, false).unwrap();
        assert_eq!(errno(h.alloc_viommu(DEV, S2)), Errno::OPNOTSUPP);
        let fwb = HwInfo {
            idr: [NESTING_HW.idr[0], 0, 0, IDR3_FWB, 0, 0],
            ..NESTING_HW
        };
        let smmu = h.add_device(10, PSID, Some(fwb)).unwrap();
        h.set_canwbs(10, false).unwrap();
        let s2 = h.alloc_s2_hwpt(smmu).unwrap();
        assert!(h.alloc_viommu(10, s2).is_ok());
    }

    #[test]
    fn alloc_vdevice_rules() {
        let mut h = host();
        h.add_device(10, PSID, Some(other_hw())).unwrap();
        let viommu = h.alloc_viommu(DEV, S2).unwrap();
        assert_eq!(errno(h.alloc_vdevice(99, DEV, VSID)), Errno::NOENT);
        assert_eq!(errno(h.alloc_vdevice(S2, DEV, VSID)), Errno::NOENT);
        assert_eq!(errno(h.alloc_vdevice(viommu, 99, VSID)), Errno::NOENT);
        assert_eq!(errno(h.alloc_vdevice(viommu, 10, VSID)), Errno::INVAL);
        let vdev = h.alloc_vdevice(viommu, DEV, VSID).unwrap();
        assert_eq!(h.vsid(DEV), Some(VSID));
        // Duplicate vSID in this vIOMMU; a device with a vDEVICE already.
        assert_eq!(errno(h.alloc_vdevice(viommu, DEV2, VSID)), Errno::EXIST);
        assert_eq!(errno(h.alloc_vdevice(viommu, DEV, VSID2)), Errno::EXIST);
        let s2b = h.alloc_s2_hwpt(0).unwrap();
        let viommu2 = h.alloc_viommu(DEV2, s2b).unwrap();
        assert_eq!(errno(h.alloc_vdevice(viommu2, DEV, VSID2)), Errno::EXIST);
        // The same vSID in another vIOMMU is fine.
        assert!(h.alloc_vdevice(viommu2, DEV2, VSID).is_ok());
        h.destroy(vdev).unwrap();
        assert!(h.alloc_vdevice(viommu, DEV, VSID2).is_ok());
    }

    #[test]
    fn alloc_nested_hwpt_rules() {
        let mut h = host();
        h.add_device(10, PSID, Some(other_hw())).unwrap();
        let viommu = h.alloc_viommu(DEV, S2).unwrap();
        assert_eq!(errno(h.alloc_nested_hwpt(99, DEV, ABORT)), Errno::NOENT);
        assert_eq!(errno(h.alloc_nested_hwpt(viommu, 99, ABORT)), Errno::NOENT);
        assert_eq!(errno(h.alloc_nested_hwpt(S2, DEV, ABORT)), Errno::OPNOTSUPP);
        assert_eq!(errno(h.alloc_nested_hwpt(DEV2, DEV, ABORT)), Errno::INVAL);
        assert_eq!(errno(h.alloc_nested_hwpt(viommu, 10, ABORT)), Errno::INVAL);
        // Refused vSTEs: S2 config, SHCFG, EATS=S1CHK.
        for ste in [[1 | 6 << 1, 0], [1, 1 << 44], [1 | 5 << 1, 2 << 28]] {
            assert_eq!(errno(h.alloc_nested_hwpt(viommu, DEV, ste)), Errno::IO);
        }
        let hwpt = h.alloc_nested_hwpt(viommu, DEV, TRANSLATE).unwrap();
        assert_eq!(h.nested_ste(hwpt), Some(TRANSLATE));
        // V=0 is stored as all zeros.
        let v0 = h.alloc_nested_hwpt(viommu, DEV, [0xf0, 0xff]).unwrap();
        assert_eq!(h.nested_ste(v0), Some([0, 0]));
        assert_eq!(h.live_objects(), 3);
    }

    #[test]
    fn attach_rules_and_atomic_replace() {
        let mut h = host();
        h.add_device(10, PSID, Some(other_hw())).unwrap();
        let other_s2 = h.alloc_s2_hwpt(1).unwrap();
        let other_viommu = h.alloc_viommu(10, other_s2).unwrap();
        let other_nested = h.alloc_nested_hwpt(other_viommu, 10, ABORT).unwrap();
        let viommu = h.alloc_viommu(DEV, S2).unwrap();
        let abort = h.alloc_nested_hwpt(viommu, DEV, ABORT).unwrap();
        let bypass = h.alloc_nested_hwpt(viommu, DEV, BYPASS).unwrap();
        let v0 = h.alloc_nested_hwpt(viommu, DEV, [0, 0]).unwrap();
        let translate = h.alloc_nested_hwpt(viommu, DEV, TRANSLATE).unwrap();

        assert_eq!(errno(h.attach(&dev(DEV), 99)), Errno::NOENT);
        assert_eq!(errno(h.attach(&dev(99), S2)), Errno::NOENT);
        assert_eq!(errno(h.attach(&dev(DEV), viommu)), Errno::INVAL);
        assert_eq!(errno(h.attach(&dev(DEV), other_s2)), Errno::INVAL);
        assert_eq!(errno(h.attach(&dev(DEV), other_nested)), Errno::INVAL);
        // S1 translate needs a vDEVICE; abort, bypass and V=0 do not.
        assert_eq!(errno(h.attach(&dev(DEV), translate)), Errno::NOENT);
        assert_eq!(h.attached(DEV), None);
        h.attach(&dev(DEV), S2).unwrap();
        for pt in [abort, bypass, v0] {
            h.attach(&dev(DEV), pt).unwrap();
            assert_eq!(h.attached(DEV), Some(pt));
        }
        // A failed replace leaves the old attachment.
        assert_eq!(errno(h.attach(&dev(DEV), translate)), Errno::NOENT);
        assert_eq!(h.attached(DEV), Some(v0));
        // A vDEVICE in another vIOMMU does not count.
        let s2b = h.alloc_s2_hwpt(0).unwrap();
        let viommu2 = h.alloc_viommu(DEV, s2b).unwrap();
        let vdev2 = h.alloc_vdevice(viommu2, DEV, VSID).unwrap();
        assert_eq!(errno(h.attach(&dev(DEV), translate)), Errno::NOENT);
        h.destroy(vdev2).unwrap();
        h.alloc_vdevice(viommu, DEV, VSID).unwrap();
        h.attach(&dev(DEV), translate).unwrap();
        // The replaced HWPT lost its user, the new one has it.
        h.destroy(v0).unwrap();
        assert_eq!(errno(h.destroy(translate)), Errno::BUSY);
        h.attach(&dev(DEV), S2).unwrap();
        h.destroy(translate).unwrap();
    }

    #[test]
    fn destroy_in_the_reference_order() {
        let mut h = host();
        let (viommu, vdev, hwpt) = nested(&mut h);
        let bypass = h.alloc_nested_hwpt(viommu, DEV, BYPASS).unwrap();
        let (veventq, fd) = h.alloc_veventq(viommu, 8).unwrap();
        assert_eq!(h.live_objects(), 5);

        assert_eq!(errno(h.destroy(99)), Errno::NOENT);
        // Devices are VFIO's; the S2 and vIOMMU have users; the attached HWPT too; the
        // vEVENTQ while its fd is open.
        for id in [DEV, S2, viommu, hwpt, veventq] {
            assert_eq!(errno(h.destroy(id)), Errno::BUSY, "{id}");
        }
        // Detach by replacing with the S2, destroy the nested HWPTs.
        h.attach(&dev(DEV), S2).unwrap();
        h.destroy(hwpt).unwrap();
        h.destroy(bypass).unwrap();
        assert_eq!(errno(h.destroy(viommu)), Errno::BUSY);
        drop(fd);
        h.destroy(veventq).unwrap();
        assert_eq!(errno(h.destroy(viommu)), Errno::BUSY);
        h.destroy(vdev).unwrap();
        assert_eq!(errno(h.destroy(S2)), Errno::BUSY);
        h.destroy(viommu).unwrap();
        assert_eq!(errno(h.destroy(S2)), Errno::BUSY);
        h.attach(&dev(DEV), bypass).unwrap_err();
        // The device is still attached to the S2.
        assert_eq!(h.attached(DEV), Some(S2));
        assert_eq!(h.live_objects(), 0);
        assert_eq!(errno(h.destroy(viommu)), Errno::NOENT);
    }

    fn tlbi_va(asid: u64) -> RawCmd {
        [u64::from(op::TLBI_NH_VA) | asid << 48, 0x1234_5000]
    }

    #[test]
    fn invalidate_rewrites_as_the_kernel() {
        let mut h = host();
        let (viommu, _, _) = nested(&mut h);
        let vmid = h.vmid(viommu).unwrap();
        assert_eq!(h.vmid(S2), Some(vmid));
        let vmid_f = u64::from(vmid) << 32;
        let cmds = [
            [u64::from(op::TLBI_NSNH_ALL), 0],
            [u64::from(op::TLBI_NH_ALL) | 0x77 << 32, 0],
            [u64::from(op::TLBI_NH_ASID) | 5 << 48 | 0x77 << 32, 0],
            [u64::from(op::CFGI_CD) | VSID << 32 | 3 << 12, 1],
            [u64::from(op::CFGI_CD_ALL) | VSID << 32, 0],
            [u64::from(op::ATC_INV) | VSID << 32, 52],
        ];
        h.invalidate(viommu, &cmds).unwrap();
        let psid = u64::from(PSID) << 32;
        assert_eq!(
            h.executed(),
            &[
                [u64::from(op::TLBI_NH_ALL) | vmid_f, 0],
                [u64::from(op::TLBI_NH_ALL) | vmid_f, 0],
                [u64::from(op::TLBI_NH_ASID) | 5 << 48 | vmid_f, 0],
                [u64::from(op::CFGI_CD) | psid | 3 << 12, 1],
                [u64::from(op::CFGI_CD_ALL) | psid, 0],
                [u64::from(op::ATC_INV) | psid, 52],
            ]
        );
        assert_eq!(h.take_executed().len(), 6);
        assert!(h.executed().is_empty());
    }

    #[test]
    fn invalidate_argument_errors() {
        let mut h = host();
        let (viommu, _, hwpt) = nested(&mut h);
        let one = [tlbi_va(1)];
        let fail = |r: Result<(), InvalidateError>| {
            let e = r.unwrap_err();
            (e.done, e.error.errno().unwrap())
        };
        assert_eq!(fail(h.invalidate(viommu, &[])), (0, Errno::INVAL));
        let too_many = vec![tlbi_va(1); MAX_INVALIDATE_ENTRIES + 1];
        assert_eq!(fail(h.invalidate(viommu, &too_many)), (0, Errno::INVAL));
        assert_eq!(fail(h.invalidate(99, &one)), (0, Errno::NOENT));
        assert_eq!(fail(h.invalidate(hwpt, &one)), (0, Errno::OPNOTSUPP));
        assert_eq!(fail(h.invalidate(S2, &one)), (0, Errno::INVAL));
        // Refused commands: CMD_SYNC, CFGI_STE, an unknown vSID.
        for cmd in [
            [0x46, 0],
            [0x03, 0],
            [u64::from(op::CFGI_CD_ALL) | 9 << 32, 0],
        ] {
            assert_eq!(fail(h.invalidate(viommu, &[cmd])), (0, Errno::IO));
        }
        let max = vec![tlbi_va(1); MAX_INVALIDATE_ENTRIES];
        h.invalidate(viommu, &max).unwrap();
        assert_eq!(h.executed().len(), MAX_INVALIDATE_ENTRIES);
        assert_eq!(h.invalidate_count(), 9);
    }

    #[test]
    fn invalid_command_leaves_only_whole_batches_executed() {
        let mut h = host();
        let (viommu, _, _) = nested(&mut h);
        let bad = [0x46, 0];
        for (k, executed) in [(0, 0), (62, 0), (63, 63), (130, 126), (189, 189)] {
            let mut cmds: Vec<RawCmd> = (0..200).map(tlbi_va).collect();
            if let Some(c) = cmds.get_mut(k) {
                *c = bad;
            }
            let e = h.invalidate(viommu, &cmds).unwrap_err();
            assert_eq!(e.done, u32::try_from(k).unwrap());
            assert_eq!(e.error.errno(), Some(Errno::IO));
            let log = h.take_executed();
            assert_eq!(log.len(), executed, "k = {k}");
            // In order, the first `executed` commands.
            assert!(log.iter().zip(0u64..).all(|(c, i)| c[0] >> 48 == i));
        }
    }

    #[test]
    fn injected_fault_fails_part_way() {
        let mut h = host();
        let (viommu, _, _) = nested(&mut h);
        let cmds: Vec<RawCmd> = (0..200).map(tlbi_va).collect();
        h.fail_next_invalidate(70, Errno::TIMEDOUT);
        let e = h.invalidate(viommu, &cmds).unwrap_err();
        // The second batch [63, 126) failed; entry_num is its last index.
        assert_eq!(e.done, 125);
        assert_eq!(e.error.errno(), Some(Errno::TIMEDOUT));
        assert_eq!(h.take_executed().len(), 70);
        // Consumed.
        h.invalidate(viommu, &cmds).unwrap();
        assert_eq!(h.take_executed().len(), 200);
        // Past the end: the last batch fails after all its commands ran.
        h.fail_next_invalidate(1000, Errno::TIMEDOUT);
        let e = h.invalidate(viommu, &cmds[..3]).unwrap_err();
        assert_eq!(e.done, 2);
        assert_eq!(h.take_executed().len(), 3);
        // A validation failure before the faulting batch wins (and keeps the fault armed).
        h.fail_next_invalidate(0, Errno::TIMEDOUT);
        let e = h.invalidate(viommu, &[[0x46, 0]]).unwrap_err();
        assert_eq!(e.error.errno(), Some(Errno::IO));
        let e = h.invalidate(viommu, &cmds[..1]).unwrap_err();
        assert_eq!((e.done, e.error.errno()), (0, Some(Errno::TIMEDOUT)));
        assert!(h.executed().is_empty());
    }

    #[test]
    fn alloc_veventq_rules() {
        let mut h = host();
        let viommu = h.alloc_viommu(DEV, S2).unwrap();
        assert_eq!(errno(h.alloc_veventq(viommu, 0)), Errno::INVAL);
        assert_eq!(
            errno(h.alloc_veventq(viommu, MAX_VEVENTQ_DEPTH + 1)),
            Errno::INVAL
        );
        assert_eq!(errno(h.alloc_veventq(99, 1)), Errno::NOENT);
        assert_eq!(errno(h.alloc_veventq(S2, 1)), Errno::NOENT);
        let (_, _fd) = h.alloc_veventq(viommu, MAX_VEVENTQ_DEPTH).unwrap();
        assert_eq!(errno(h.alloc_veventq(viommu, 1)), Errno::EXIST);
    }

    fn event(id: u8) -> [u64; 4] {
        [
            u64::from(id) | u64::from(PSID) << 32 | 1 << 11,
            1 << 35,
            0xdead_0000,
            0,
        ]
    }

    #[test]
    fn events_are_forwarded_with_the_vsid() {
        let mut h = host();
        let (viommu, _, _) = nested(&mut h);
        // No vEVENTQ yet.
        assert_eq!(h.inject_event(DEV, event(0x10)), Injection::Dropped);
        let (q, fd) = h.alloc_veventq(viommu, 16).unwrap();
        assert!(!readable(&fd));
        for id in FORWARDED_EVENTS {
            assert!(matches!(
                h.inject_event(DEV, event(id)),
                Injection::Queued { .. }
            ));
        }
        // Kept on the host: other IDs, stalls, S2 faults, unknown or non-nested devices.
        let mut stall = event(0x10);
        stall[1] |= EVTQ_1_STALL;
        let mut s2 = event(0x10);
        s2[1] |= EVTQ_1_S2;
        for (d, rec) in [
            (DEV, event(0x0b)),
            (DEV, event(0x02)),
            (DEV, stall),
            (DEV, s2),
            (99, event(0x10)),
            (DEV2, event(0x10)),
        ] {
            assert_eq!(h.inject_event(d, rec), Injection::Dropped, "{rec:x?}");
        }
        assert!(readable(&fd));
        assert_eq!(h.pending_events(q), Some(8));
        let mut out = Vec::new();
        assert_eq!(h.read_vevents(q, fd.as_fd(), &mut out), Ok(8));
        assert!(!readable(&fd));
        let first = out.first().copied().unwrap();
        let [d0, d1, d2, _] = event(0x04);
        assert_eq!(
            first,
            VEvent::Event {
                sequence: 0,
                record: [(d0 & !EVTQ_0_SID) | VSID << 32, d1, d2, 0]
            }
        );
        assert_eq!(h.read_vevents(q, fd.as_fd(), &mut out), Ok(0));
        // Back on the S2: no vmaster, nothing forwarded.
        h.attach(&dev(DEV), S2).unwrap();
        assert_eq!(h.inject_event(DEV, event(0x10)), Injection::Dropped);
        // Another fd is refused.
        let (other, _w) = rustix::pipe::pipe().unwrap();
        assert_eq!(
            errno(h.read_vevents(q, other.as_fd(), &mut out)),
            Errno::BADF
        );
        assert_eq!(
            errno(h.read_vevents(99, fd.as_fd(), &mut out)),
            Errno::NOENT
        );
    }

    #[test]
    fn vmaster_is_taken_at_attach() {
        let mut h = host();
        let viommu = h.alloc_viommu(DEV, S2).unwrap();
        let bypass = h.alloc_nested_hwpt(viommu, DEV, BYPASS).unwrap();
        let (q, fd) = h.alloc_veventq(viommu, 4).unwrap();
        // GBPA: attached without a vDEVICE, nothing reported.
        h.attach(&dev(DEV), bypass).unwrap();
        h.alloc_vdevice(viommu, DEV, VSID).unwrap();
        assert_eq!(h.inject_event(DEV, event(0x04)), Injection::Dropped);
        // Re-attached with the vDEVICE: reported, even on a bypass STE.
        h.attach(&dev(DEV), bypass).unwrap();
        assert_eq!(
            h.inject_event(DEV, event(0x04)),
            Injection::Queued { sequence: 0 }
        );
        let mut out = Vec::new();
        assert_eq!(h.read_vevents(q, fd.as_fd(), &mut out), Ok(1));
    }

    #[test]
    fn overflow_leaves_one_lost_header_at_the_tail() {
        let mut h = host();
        let (viommu, _, _) = nested(&mut h);
        let (q, fd) = h.alloc_veventq(viommu, 2).unwrap();
        let results: Vec<Injection> = (0..4).map(|_| h.inject_event(DEV, event(0x10))).collect();
        assert_eq!(
            results,
            [
                Injection::Queued { sequence: 0 },
                Injection::Queued { sequence: 1 },
                Injection::Lost { sequence: 2 },
                Injection::Lost { sequence: 3 },
            ]
        );
        assert_eq!(h.pending_events(q), Some(3));
        let mut out = Vec::new();
        assert_eq!(h.read_vevents(q, fd.as_fd(), &mut out), Ok(3));
        let sequences: Vec<(bool, u32)> = out
            .iter()
            .map(|e| match *e {
                VEvent::Event { sequence, .. } => (false, sequence),
                VEvent::Lost { sequence } => (true, sequence),
            })
            .collect();
        assert_eq!(sequences, [(false, 0), (false, 1), (true, 3)]);
        assert_eq!(
            h.inject_event(DEV, event(0x10)),
            Injection::Queued { sequence: 4 }
        );
    }

    #[test]
    fn a_record_replaces_the_lost_header() {
        let mut q = EventQueue::new(2);
        let rec = [1, 2, 3, 4];
        q.report(rec);
        q.report(rec);
        assert_eq!(q.report(rec), Injection::Lost { sequence: 2 });
        // A partial read frees one slot; the next record replaces the header.
        assert!(matches!(q.fetch(), Some(VEvent::Event { sequence: 0, .. })));
        assert_eq!(q.report(rec), Injection::Queued { sequence: 3 });
        let rest: Vec<VEvent> = std::iter::from_fn(|| q.fetch()).collect();
        assert_eq!(
            rest,
            [
                VEvent::Event {
                    sequence: 1,
                    record: rec
                },
                VEvent::Event {
                    sequence: 3,
                    record: rec
                },
            ]
        );
        assert_eq!(q.num_events, 0);
    }

    #[test]
    fn sequence_numbers_wrap_at_31_bits() {
        let mut q = EventQueue::new(8);
        q.sequence = 0x7fff_fffe;
        let got: Vec<Injection> = (0..3).map(|_| q.report([0; 4])).collect();
        assert_eq!(
            got,
            [
                Injection::Queued {
                    sequence: 0x7fff_fffe
                },
                Injection::Queued {
                    sequence: 0x7fff_ffff
                },
                Injection::Queued { sequence: 0 },
            ]
        );
    }

    #[test]
    fn ioctls_are_counted() {
        let mut h = host();
        nested(&mut h);
        h.destroy(99).unwrap_err();
        assert_eq!(h.ioctl_count(), 5);
        assert_eq!(h.invalidate_count(), 0);
    }
}
