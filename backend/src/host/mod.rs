//! The host IOMMU: what passthrough mode asks of Linux iommufd, behind a trait.
//!
//! - [`HostIommu`]: the operations, one per iommufd / VFIO ioctl the backend uses;
//! - [`rules`]: the kernel's validation rules for vSTEs and forwarded commands (Linux 7.3,
//!   `arm-smmu-v3-iommufd.c`), used to pre-validate and by the double;
//! - `double` (cargo feature `double`, for tests and fuzzing; not in the release daemon): an
//!   in-memory double that enforces those rules and the object model, so the
//!   test suites cover every path without a kernel;
//! - [`iommufd`]: the real thing, on an iommufd QEMU handed over.
//!
//! Object IDs are the kernel's: one namespace per iommufd file, shared with QEMU, which holds
//! the same file.

#[cfg(feature = "double")]
pub mod double;
pub mod iommufd;
pub mod rules;
pub mod uapi;

use std::os::fd::{BorrowedFd, OwnedFd};

pub use rustix::io::Errno;

/// An iommufd object ID (IOAS, HWPT, vIOMMU, vDEVICE, vEVENTQ).
pub type ObjectId = u32;

/// One SMMUv3 command as IOMMU_HWPT_INVALIDATE takes it
/// (`struct iommu_viommu_arm_smmuv3_invalidate { __le64 cmd[2]; }`).
pub type RawCmd = [u64; 2];

/// The guest's STE words 0 and 1 as IOMMU_HWPT_ALLOC takes them
/// (`struct iommu_hwpt_arm_smmuv3 { __le64 ste[2]; }`).
pub type VSte = [u64; 2];

/// IOMMU_GET_HW_INFO for an SMMUv3 (`struct iommu_hw_info_arm_smmuv3`): raw register reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HwInfo {
    /// Bit 0: IOMMU_HW_INFO_ARM_SMMUV3_ERRATA_REPEAT_TLBI_CFGI.
    pub flags: u32,
    /// SMMU_IDR0..5.
    pub idr: [u32; 6],
    /// SMMU_IIDR.
    pub iidr: u32,
    /// SMMU_AIDR.
    pub aidr: u32,
}

/// A passthrough device: its iommufd device ID and its VFIO cdev, bound to the iommufd by the
/// frontend.
#[derive(Debug)]
pub struct HostDevice {
    /// The iommufd device ID (VFIO_DEVICE_BIND_IOMMUFD's `out_devid`).
    pub dev_id: u32,
    /// The VFIO device cdev.
    pub cdev: OwnedFd,
}

/// One record read from a vEVENTQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VEvent {
    /// An SMMU event record, its StreamID field already the vSID.
    Event {
        /// The header's 31-bit sequence number.
        sequence: u32,
        /// The 32-byte record, as four little-endian qwords.
        record: [u64; 4],
    },
    /// The queue overflowed: events were dropped here (IOMMU_VEVENTQ_FLAG_LOST_EVENTS).
    Lost {
        /// The header's sequence number.
        sequence: u32,
    },
}

/// A failed host operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The kernel (or the double standing in for it) refused.
    #[error("{op}: {errno}")]
    Kernel {
        /// The ioctl.
        op: &'static str,
        /// Why.
        errno: Errno,
    },
    /// What the kernel returned makes no sense (a short record, an unknown type).
    #[error("{op}: {what}")]
    Malformed {
        /// The ioctl.
        op: &'static str,
        /// What was wrong.
        what: String,
    },
}

impl HostError {
    /// The errno, for a kernel refusal.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            Self::Malformed { .. } => None,
        }
    }
}

/// IOMMU_HWPT_INVALIDATE failed part way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error} after {done} of the commands")]
pub struct InvalidateError {
    /// `entry_num` as the kernel wrote it back. On a validation failure (-EIO) it is the index of
    /// the refused command, but commands since the last 64-entry batch boundary before it may
    /// not have been issued (linux-iommufd.md 1.7): treat `[0, done)` as possibly not done.
    pub done: u32,
    /// Why.
    pub error: HostError,
}

/// The operations the backend needs from iommufd and VFIO.
pub trait HostIommu: std::fmt::Debug + Send {
    /// IOMMU_GET_HW_INFO of an SMMUv3 device.
    fn hw_info(&mut self, dev_id: u32) -> Result<HwInfo, HostError>;
    /// IOMMU_VIOMMU_ALLOC of type ARM_SMMUV3 on the nesting parent `s2_hwpt`.
    fn alloc_viommu(&mut self, dev_id: u32, s2_hwpt: ObjectId) -> Result<ObjectId, HostError>;
    /// IOMMU_VDEVICE_ALLOC: `dev_id` is `vsid` to the guest.
    fn alloc_vdevice(
        &mut self,
        viommu: ObjectId,
        dev_id: u32,
        vsid: u64,
    ) -> Result<ObjectId, HostError>;
    /// IOMMU_HWPT_ALLOC of a nested HWPT on `viommu` from the guest's STE words 0 and 1.
    fn alloc_nested_hwpt(
        &mut self,
        viommu: ObjectId,
        dev_id: u32,
        ste: VSte,
    ) -> Result<ObjectId, HostError>;
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT: the device translates through `pt_id` (an atomic
    /// replace when it is attached already).
    fn attach(&mut self, dev: &HostDevice, pt_id: ObjectId) -> Result<(), HostError>;
    /// IOMMU_HWPT_INVALIDATE on the vIOMMU with ARM_SMMUV3 commands, all in one call.
    fn invalidate(&mut self, viommu: ObjectId, cmds: &[RawCmd]) -> Result<(), InvalidateError>;
    /// IOMMU_VEVENTQ_ALLOC of type ARM_SMMUV3 with `depth` records. Returns the queue's ID and
    /// an fd that polls readable while records wait.
    fn alloc_veventq(
        &mut self,
        viommu: ObjectId,
        depth: u32,
    ) -> Result<(ObjectId, OwnedFd), HostError>;
    /// Reads what waits on a vEVENTQ (never blocks), appending to `out`. Returns the count.
    fn read_vevents(
        &mut self,
        veventq: ObjectId,
        fd: BorrowedFd<'_>,
        out: &mut Vec<VEvent>,
    ) -> Result<usize, HostError>;
    /// IOMMU_DESTROY.
    fn destroy(&mut self, id: ObjectId) -> Result<(), HostError>;
}
