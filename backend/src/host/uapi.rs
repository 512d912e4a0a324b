//! The Linux iommufd and VFIO uAPI this project calls: request numbers, flags and structs of
//! Linux 7.3 `include/uapi/linux/iommufd.h` and `vfio.h` (linux-iommufd.md §1.0-1.2), written out
//! by hand with their sizes asserted at compile time and their layouts tested against the
//! reference, and the one `ioctl` wrapper both the daemon ([`super::iommufd`]) and the kernel lab's
//! frontend (`tests/src/lab/sys.rs`) issue them through.

use std::ffi::c_ulong;
use std::mem::size_of;
use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use vmm_sys_util::ioctl::{_IOC_NONE, ioctl_expr};

/// `IOMMUFD_TYPE` (`';'`), also `VFIO_TYPE`.
pub const IOMMUFD_TYPE: u32 = 0x3b;

/// `_IO(IOMMUFD_TYPE, nr)`: every iommufd and VFIO request has size 0 and no direction.
const fn io(nr: u32) -> c_ulong {
    ioctl_expr(_IOC_NONE, IOMMUFD_TYPE, nr, 0)
}

pub const IOMMU_DESTROY: c_ulong = io(0x80);
pub const IOMMU_HWPT_ALLOC: c_ulong = io(0x89);
pub const IOMMU_GET_HW_INFO: c_ulong = io(0x8a);
pub const IOMMU_HWPT_INVALIDATE: c_ulong = io(0x8d);
pub const IOMMU_VIOMMU_ALLOC: c_ulong = io(0x90);
pub const IOMMU_VDEVICE_ALLOC: c_ulong = io(0x91);
pub const IOMMU_VEVENTQ_ALLOC: c_ulong = io(0x93);
/// `VFIO_BASE + 19`.
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: c_ulong = io(VFIO_BASE + 19);
/// `VFIO_BASE`.
const VFIO_BASE: u32 = 100;
pub const IOMMU_IOAS_UNMAP: c_ulong = io(0x86);
pub const IOMMU_IOAS_MAP_FILE: c_ulong = io(0x8f);
/// `VFIO_BASE + 8`.
pub const VFIO_DEVICE_GET_REGION_INFO: c_ulong = io(VFIO_BASE + 8);
/// `VFIO_BASE + 18`.
pub const VFIO_DEVICE_BIND_IOMMUFD: c_ulong = io(VFIO_BASE + 18);
/// `VFIO_BASE + 20`.
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: c_ulong = io(VFIO_BASE + 20);

pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;
pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
pub const IOMMU_HWPT_DATA_NONE: u32 = 0;

pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const IOMMU_IOAS_ALLOC: c_ulong = io(0x81);

/// Declares [`DAEMON_REQUESTS`] from the names of its constants, and keeps the names for the test
/// that checks the list against the ioctls `host::iommufd` issues.
macro_rules! daemon_requests {
    ($($name:ident),+ $(,)?) => {
        /// The requests the daemon issues: every ioctl of `host::iommufd`'s `sys` module (a test
        /// there checks both ways), and so the only ones the daemon's seccomp filter allows
        /// (`daemon::sandbox`).
        pub const DAEMON_REQUESTS: &[c_ulong] = &[$($name),+];
        /// The names of [`DAEMON_REQUESTS`], in its order.
        #[cfg(test)]
        pub(crate) const DAEMON_REQUEST_NAMES: &[&str] = &[$(stringify!($name)),+];
    };
}

daemon_requests!(
    IOMMU_DESTROY,
    IOMMU_HWPT_ALLOC,
    IOMMU_GET_HW_INFO,
    IOMMU_HWPT_INVALIDATE,
    IOMMU_VIOMMU_ALLOC,
    IOMMU_VDEVICE_ALLOC,
    IOMMU_VEVENTQ_ALLOC,
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
);

pub const IOMMU_HW_INFO_TYPE_ARM_SMMUV3: u32 = 2;
pub const IOMMU_VIOMMU_TYPE_ARM_SMMUV3: u32 = 1;
pub const IOMMU_HWPT_DATA_ARM_SMMUV3: u32 = 2;
pub const IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3: u32 = 1;
pub const IOMMU_VEVENTQ_TYPE_ARM_SMMUV3: u32 = 1;

/// The size of `T` as the `size`/`argsz`/`data_len`/`entry_len` field wants it.
pub const fn len32<T>() -> u32 {
    assert!(size_of::<T>() <= u32::MAX as usize);
    size_of::<T>() as u32
}

pub const HW_INFO_ARM_SMMUV3_LEN: u32 = len32::<HwInfoArmSmmuv3>();

/// `struct iommu_destroy`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuDestroy {
    pub size: u32,
    pub id: u32,
}
const _: () = assert!(size_of::<IommuDestroy>() == 8);

/// `struct iommu_hw_info`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuHwInfo {
    pub size: u32,
    pub flags: u32,
    pub dev_id: u32,
    pub data_len: u32,
    pub data_uptr: u64,
    /// `in_data_type` / `out_data_type` (a union).
    pub out_data_type: u32,
    pub out_max_pasid_log2: u8,
    pub reserved: [u8; 3],
    pub out_capabilities: u64,
}
const _: () = assert!(size_of::<IommuHwInfo>() == 40);

/// `struct iommu_hw_info_arm_smmuv3`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct HwInfoArmSmmuv3 {
    pub flags: u32,
    pub reserved: u32,
    pub idr: [u32; 6],
    pub iidr: u32,
    pub aidr: u32,
}
const _: () = assert!(size_of::<HwInfoArmSmmuv3>() == 40);

/// `struct iommu_viommu_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuViommuAlloc {
    pub size: u32,
    pub flags: u32,
    pub type_: u32,
    pub dev_id: u32,
    pub hwpt_id: u32,
    pub out_viommu_id: u32,
    pub data_len: u32,
    pub reserved: u32,
    pub data_uptr: u64,
}
const _: () = assert!(size_of::<IommuViommuAlloc>() == 40);

/// `struct iommu_vdevice_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuVdeviceAlloc {
    pub size: u32,
    pub viommu_id: u32,
    pub dev_id: u32,
    pub out_vdevice_id: u32,
    pub virt_id: u64,
}
const _: () = assert!(size_of::<IommuVdeviceAlloc>() == 24);

/// `struct iommu_hwpt_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuHwptAlloc {
    pub size: u32,
    pub flags: u32,
    pub dev_id: u32,
    pub pt_id: u32,
    pub out_hwpt_id: u32,
    pub reserved: u32,
    pub data_type: u32,
    pub data_len: u32,
    pub data_uptr: u64,
    pub fault_id: u32,
    pub reserved2: u32,
}
const _: () = assert!(size_of::<IommuHwptAlloc>() == 48);

/// `struct iommu_hwpt_arm_smmuv3`: the vSTE words, little-endian.
#[repr(C)]
#[derive(Debug, Default)]
pub struct HwptArmSmmuv3 {
    pub ste: [u64; 2],
}
const _: () = assert!(size_of::<HwptArmSmmuv3>() == 16);

/// `struct iommu_hwpt_invalidate`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuHwptInvalidate {
    pub size: u32,
    pub hwpt_id: u32,
    pub data_uptr: u64,
    pub data_type: u32,
    pub entry_len: u32,
    pub entry_num: u32,
    pub reserved: u32,
}
const _: () = assert!(size_of::<IommuHwptInvalidate>() == 32);
/// `struct iommu_viommu_arm_smmuv3_invalidate { __le64 cmd[2]; }`.
const _: () = assert!(size_of::<[u64; 2]>() == 16);

/// `struct iommu_veventq_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuVeventqAlloc {
    pub size: u32,
    pub flags: u32,
    pub viommu_id: u32,
    pub type_: u32,
    pub veventq_depth: u32,
    pub out_veventq_id: u32,
    pub out_veventq_fd: u32,
    pub reserved: u32,
}
const _: () = assert!(size_of::<IommuVeventqAlloc>() == 32);

/// `struct vfio_device_attach_iommufd_pt`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceAttachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
    pub pasid: u32,
}
const _: () = assert!(size_of::<VfioDeviceAttachIommufdPt>() == 16);

/// `struct iommu_ioas_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuIoasAlloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}
const _: () = assert!(size_of::<IommuIoasAlloc>() == 12);

/// `struct iommu_ioas_map_file`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuIoasMapFile {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub fd: i32,
    pub start: u64,
    pub length: u64,
    pub iova: u64,
}
const _: () = assert!(size_of::<IommuIoasMapFile>() == 40);

/// `struct iommu_ioas_unmap`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct IommuIoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}
const _: () = assert!(size_of::<IommuIoasUnmap>() == 24);

/// `struct vfio_device_bind_iommufd`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceBindIommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
    pub token_uuid_ptr: u64,
}
const _: () = assert!(size_of::<VfioDeviceBindIommufd>() == 24);

/// `struct vfio_device_detach_iommufd_pt`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct VfioDeviceDetachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pasid: u32,
}
const _: () = assert!(size_of::<VfioDeviceDetachIommufdPt>() == 12);

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct VfioRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}
const _: () = assert!(size_of::<VfioRegionInfo>() == 32);

/// ioctl(2) with `arg` as the argument.
///
/// # Safety
///
/// `T` must be the `#[repr(C)]` struct that `request` takes, and every user pointer in
/// `arg` must be valid, for the length stated next to it, for the kernel to read (and
/// write, for outputs) during the call. The kernel touches no memory but `arg` and those.
pub unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: c_ulong, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is a live, exclusive, properly sized reference to the struct the request
    // takes, and the pointers inside it are valid (this function's contract). `fd` is a
    // borrowed, open fd. A file of another kind does not know the request (';' is the
    // iommufd/VFIO ioctl type) and fails with ENOTTY without touching memory.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, request, arg) };
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

pub fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use super::*;

    #[test]
    fn request_numbers_match_the_reference() {
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
        assert_eq!(IOMMU_GET_HW_INFO, 0x3b8a);
        assert_eq!(IOMMU_HWPT_INVALIDATE, 0x3b8d);
        assert_eq!(IOMMU_VIOMMU_ALLOC, 0x3b90);
        assert_eq!(IOMMU_VDEVICE_ALLOC, 0x3b91);
        assert_eq!(IOMMU_VEVENTQ_ALLOC, 0x3b93);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
        assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT, 0x3b78);
        // The same through vmm-sys-util's _IO macro.
        vmm_sys_util::ioctl_io_nr!(DESTROY_NR, IOMMUFD_TYPE, 0x80);
        assert_eq!(IOMMU_DESTROY, DESTROY_NR());
        vmm_sys_util::ioctl_io_nr!(GET_REGION_INFO_NR, IOMMUFD_TYPE, 100 + 8);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, GET_REGION_INFO_NR());
    }

    #[test]
    fn struct_layouts_match_the_reference() {
        assert_eq!(size_of::<IommuDestroy>(), 8);
        assert_eq!(offset_of!(IommuDestroy, id), 4);

        assert_eq!(size_of::<IommuHwInfo>(), 40);
        assert_eq!(offset_of!(IommuHwInfo, dev_id), 8);
        assert_eq!(offset_of!(IommuHwInfo, data_len), 12);
        assert_eq!(offset_of!(IommuHwInfo, data_uptr), 16);
        assert_eq!(offset_of!(IommuHwInfo, out_data_type), 24);
        assert_eq!(offset_of!(IommuHwInfo, out_max_pasid_log2), 28);
        assert_eq!(offset_of!(IommuHwInfo, out_capabilities), 32);

        assert_eq!(size_of::<HwInfoArmSmmuv3>(), 40);
        assert_eq!(offset_of!(HwInfoArmSmmuv3, idr), 8);
        assert_eq!(offset_of!(HwInfoArmSmmuv3, iidr), 32);
        assert_eq!(offset_of!(HwInfoArmSmmuv3, aidr), 36);

        assert_eq!(size_of::<IommuViommuAlloc>(), 40);
        assert_eq!(offset_of!(IommuViommuAlloc, type_), 8);
        assert_eq!(offset_of!(IommuViommuAlloc, dev_id), 12);
        assert_eq!(offset_of!(IommuViommuAlloc, hwpt_id), 16);
        assert_eq!(offset_of!(IommuViommuAlloc, out_viommu_id), 20);
        assert_eq!(offset_of!(IommuViommuAlloc, data_len), 24);
        assert_eq!(offset_of!(IommuViommuAlloc, data_uptr), 32);

        assert_eq!(size_of::<IommuVdeviceAlloc>(), 24);
        assert_eq!(offset_of!(IommuVdeviceAlloc, viommu_id), 4);
        assert_eq!(offset_of!(IommuVdeviceAlloc, dev_id), 8);
        assert_eq!(offset_of!(IommuVdeviceAlloc, out_vdevice_id), 12);
        assert_eq!(offset_of!(IommuVdeviceAlloc, virt_id), 16);

        assert_eq!(size_of::<IommuHwptAlloc>(), 48);
        assert_eq!(offset_of!(IommuHwptAlloc, flags), 4);
        assert_eq!(offset_of!(IommuHwptAlloc, dev_id), 8);
        assert_eq!(offset_of!(IommuHwptAlloc, pt_id), 12);
        assert_eq!(offset_of!(IommuHwptAlloc, out_hwpt_id), 16);
        assert_eq!(offset_of!(IommuHwptAlloc, reserved), 20);
        assert_eq!(offset_of!(IommuHwptAlloc, data_type), 24);
        assert_eq!(offset_of!(IommuHwptAlloc, data_len), 28);
        assert_eq!(offset_of!(IommuHwptAlloc, data_uptr), 32);
        assert_eq!(offset_of!(IommuHwptAlloc, fault_id), 40);
        assert_eq!(offset_of!(IommuHwptAlloc, reserved2), 44);
        assert_eq!(size_of::<HwptArmSmmuv3>(), 16);

        assert_eq!(size_of::<IommuHwptInvalidate>(), 32);
        assert_eq!(offset_of!(IommuHwptInvalidate, hwpt_id), 4);
        assert_eq!(offset_of!(IommuHwptInvalidate, data_uptr), 8);
        assert_eq!(offset_of!(IommuHwptInvalidate, data_type), 16);
        assert_eq!(offset_of!(IommuHwptInvalidate, entry_len), 20);
        assert_eq!(offset_of!(IommuHwptInvalidate, entry_num), 24);
        assert_eq!(offset_of!(IommuHwptInvalidate, reserved), 28);

        assert_eq!(size_of::<IommuVeventqAlloc>(), 32);
        assert_eq!(offset_of!(IommuVeventqAlloc, viommu_id), 8);
        assert_eq!(offset_of!(IommuVeventqAlloc, type_), 12);
        assert_eq!(offset_of!(IommuVeventqAlloc, veventq_depth), 16);
        assert_eq!(offset_of!(IommuVeventqAlloc, out_veventq_id), 20);
        assert_eq!(offset_of!(IommuVeventqAlloc, out_veventq_fd), 24);

        assert_eq!(size_of::<VfioDeviceAttachIommufdPt>(), 16);
        assert_eq!(offset_of!(VfioDeviceAttachIommufdPt, flags), 4);
        assert_eq!(offset_of!(VfioDeviceAttachIommufdPt, pt_id), 8);
        assert_eq!(offset_of!(VfioDeviceAttachIommufdPt, pasid), 12);

        assert_eq!(size_of::<IommuIoasAlloc>(), 12);

        assert_eq!(offset_of!(IommuIoasAlloc, out_ioas_id), 8);

        assert_eq!(size_of::<IommuIoasMapFile>(), 40);
        assert_eq!(offset_of!(IommuIoasMapFile, flags), 4);
        assert_eq!(offset_of!(IommuIoasMapFile, ioas_id), 8);
        assert_eq!(offset_of!(IommuIoasMapFile, fd), 12);
        assert_eq!(offset_of!(IommuIoasMapFile, start), 16);
        assert_eq!(offset_of!(IommuIoasMapFile, length), 24);
        assert_eq!(offset_of!(IommuIoasMapFile, iova), 32);

        assert_eq!(size_of::<IommuIoasUnmap>(), 24);
        assert_eq!(offset_of!(IommuIoasUnmap, ioas_id), 4);
        assert_eq!(offset_of!(IommuIoasUnmap, iova), 8);
        assert_eq!(offset_of!(IommuIoasUnmap, length), 16);

        assert_eq!(size_of::<VfioDeviceBindIommufd>(), 24);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, flags), 4);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, iommufd), 8);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, out_devid), 12);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, token_uuid_ptr), 16);

        assert_eq!(size_of::<VfioDeviceDetachIommufdPt>(), 12);
        assert_eq!(offset_of!(VfioDeviceDetachIommufdPt, flags), 4);
        assert_eq!(offset_of!(VfioDeviceDetachIommufdPt, pasid), 8);

        assert_eq!(size_of::<VfioRegionInfo>(), 32);
        assert_eq!(offset_of!(VfioRegionInfo, flags), 4);
        assert_eq!(offset_of!(VfioRegionInfo, index), 8);
        assert_eq!(offset_of!(VfioRegionInfo, cap_offset), 12);
        assert_eq!(offset_of!(VfioRegionInfo, size), 16);
        assert_eq!(offset_of!(VfioRegionInfo, offset), 24);
    }

    #[test]
    fn flag_values_match_the_reference() {
        assert_eq!(
            IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE,
            7
        );
        assert_eq!(IOMMU_HWPT_ALLOC_NEST_PARENT, 1);
        assert_eq!(IOMMU_HWPT_DATA_NONE, 0);
        assert_eq!(VFIO_PCI_CONFIG_REGION_INDEX, 7);
        assert_eq!(VFIO_PCI_BAR0_REGION_INDEX, 0);
        assert_eq!(
            VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP,
            7
        );
    }
}
