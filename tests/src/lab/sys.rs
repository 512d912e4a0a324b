//! The uAPI structs and request numbers the lab program uses, and every unsafe line of
//! [`crate::lab`].
//!
//! Linux 7.3 `include/uapi/linux/iommufd.h` and `vfio.h` (linux-iommufd.md §1.0-1.2), written
//! out by hand with their sizes asserted at compile time, as in the daemon's
//! `backend/src/host/iommufd.rs`. The wrappers set every field themselves; none of these structs
//! carries a user pointer, so each call's memory contract is just "`arg` is the right struct".

use std::ffi::c_ulong;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use vmm_sys_util::ioctl::{_IOC_NONE, ioctl_expr};

/// `IOMMUFD_TYPE` (`';'`), also `VFIO_TYPE`.
pub(super) const IOMMUFD_TYPE: u32 = 0x3b;
/// `VFIO_BASE`.
const VFIO_BASE: u32 = 100;

/// `_IO(';', nr)`: every iommufd and VFIO request has size 0 and no direction.
const fn io(nr: u32) -> c_ulong {
    ioctl_expr(_IOC_NONE, IOMMUFD_TYPE, nr, 0)
}

pub(super) const IOMMU_DESTROY: c_ulong = io(0x80);
pub(super) const IOMMU_IOAS_ALLOC: c_ulong = io(0x81);
pub(super) const IOMMU_IOAS_UNMAP: c_ulong = io(0x86);
pub(super) const IOMMU_HWPT_ALLOC: c_ulong = io(0x89);
pub(super) const IOMMU_IOAS_MAP_FILE: c_ulong = io(0x8f);
/// `VFIO_BASE + 8`.
pub(super) const VFIO_DEVICE_GET_REGION_INFO: c_ulong = io(VFIO_BASE + 8);
/// `VFIO_BASE + 18`.
pub(super) const VFIO_DEVICE_BIND_IOMMUFD: c_ulong = io(VFIO_BASE + 18);
/// `VFIO_BASE + 19`.
pub(super) const VFIO_DEVICE_ATTACH_IOMMUFD_PT: c_ulong = io(VFIO_BASE + 19);
/// `VFIO_BASE + 20`.
pub(super) const VFIO_DEVICE_DETACH_IOMMUFD_PT: c_ulong = io(VFIO_BASE + 20);

pub(super) const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub(super) const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub(super) const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;
pub(super) const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
pub(super) const IOMMU_HWPT_DATA_NONE: u32 = 0;

pub(super) const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub(super) const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub(super) const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub(super) const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
pub(super) const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// The size of `T` as the `size`/`argsz` field wants it.
const fn len32<T>() -> u32 {
    assert!(size_of::<T>() <= u32::MAX as usize);
    size_of::<T>() as u32
}

/// `struct iommu_destroy`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct IommuDestroy {
    pub size: u32,
    pub id: u32,
}
const _: () = assert!(size_of::<IommuDestroy>() == 8);

/// `struct iommu_ioas_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct IommuIoasAlloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}
const _: () = assert!(size_of::<IommuIoasAlloc>() == 12);

/// `struct iommu_ioas_map_file`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct IommuIoasMapFile {
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
pub(super) struct IommuIoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}
const _: () = assert!(size_of::<IommuIoasUnmap>() == 24);

/// `struct iommu_hwpt_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct IommuHwptAlloc {
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

/// `struct vfio_device_bind_iommufd`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct VfioDeviceBindIommufd {
    pub argsz: u32,
    pub flags: u32,
    pub iommufd: i32,
    pub out_devid: u32,
    pub token_uuid_ptr: u64,
}
const _: () = assert!(size_of::<VfioDeviceBindIommufd>() == 24);

/// `struct vfio_device_attach_iommufd_pt`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct VfioDeviceAttachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pt_id: u32,
    pub pasid: u32,
}
const _: () = assert!(size_of::<VfioDeviceAttachIommufdPt>() == 16);

/// `struct vfio_device_detach_iommufd_pt`.
#[repr(C)]
#[derive(Debug, Default)]
pub(super) struct VfioDeviceDetachIommufdPt {
    pub argsz: u32,
    pub flags: u32,
    pub pasid: u32,
}
const _: () = assert!(size_of::<VfioDeviceDetachIommufdPt>() == 12);

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct VfioRegionInfo {
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
/// `T` must be the `#[repr(C)]` struct that `request` takes, and every user pointer in `arg`
/// must be valid, for the length stated next to it, for the kernel to read (and write, for
/// outputs) during the call. The kernel touches no memory but `arg` and those.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: c_ulong, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is a live, exclusive, properly sized reference to the struct the request
    // takes, and the pointers inside it are valid (this function's contract). `fd` is a borrowed,
    // open fd. A file of another kind does not know the request (';' is the iommufd/VFIO ioctl
    // type) and fails with ENOTTY without touching memory.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, request, arg) };
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}

/// IOMMU_DESTROY.
pub(super) fn destroy(fd: BorrowedFd<'_>, id: u32) -> Result<(), Errno> {
    let mut cmd = IommuDestroy {
        size: len32::<IommuDestroy>(),
        id,
    };
    // SAFETY: `cmd` is an iommu_destroy, which carries no user pointer.
    unsafe { ioctl(fd, IOMMU_DESTROY, &mut cmd) }
}

/// IOMMU_IOAS_ALLOC.
pub(super) fn ioas_alloc(fd: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut cmd = IommuIoasAlloc {
        size: len32::<IommuIoasAlloc>(),
        ..IommuIoasAlloc::default()
    };
    // SAFETY: `cmd` is an iommu_ioas_alloc, which carries no user pointer.
    unsafe { ioctl(fd, IOMMU_IOAS_ALLOC, &mut cmd) }?;
    Ok(cmd.out_ioas_id)
}

/// IOMMU_IOAS_MAP_FILE of `file` bytes `start..start + length` at `iova`, readable and writeable,
/// at exactly that IOVA.
pub(super) fn ioas_map_file(
    fd: BorrowedFd<'_>,
    ioas_id: u32,
    file: BorrowedFd<'_>,
    start: u64,
    length: u64,
    iova: u64,
) -> Result<(), Errno> {
    let mut cmd = IommuIoasMapFile {
        size: len32::<IommuIoasMapFile>(),
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id,
        fd: file.as_raw_fd(),
        start,
        length,
        iova,
    };
    // SAFETY: `cmd` is an iommu_ioas_map_file, which carries no user pointer; `file` is borrowed
    // (so open) for the call, and the kernel takes its own reference to the file.
    unsafe { ioctl(fd, IOMMU_IOAS_MAP_FILE, &mut cmd) }
}

/// IOMMU_IOAS_UNMAP. Returns the length the kernel reports unmapped.
pub(super) fn ioas_unmap(
    fd: BorrowedFd<'_>,
    ioas_id: u32,
    iova: u64,
    length: u64,
) -> Result<u64, Errno> {
    let mut cmd = IommuIoasUnmap {
        size: len32::<IommuIoasUnmap>(),
        ioas_id,
        iova,
        length,
    };
    // SAFETY: `cmd` is an iommu_ioas_unmap, which carries no user pointer.
    unsafe { ioctl(fd, IOMMU_IOAS_UNMAP, &mut cmd) }?;
    Ok(cmd.length)
}

/// IOMMU_HWPT_ALLOC of a stage-2 nesting parent on an IOAS (no driver data).
pub(super) fn hwpt_alloc_nest_parent(
    fd: BorrowedFd<'_>,
    dev_id: u32,
    ioas_id: u32,
) -> Result<u32, Errno> {
    let mut cmd = IommuHwptAlloc {
        size: len32::<IommuHwptAlloc>(),
        flags: IOMMU_HWPT_ALLOC_NEST_PARENT,
        dev_id,
        pt_id: ioas_id,
        data_type: IOMMU_HWPT_DATA_NONE,
        ..IommuHwptAlloc::default()
    };
    // SAFETY: `cmd` is an iommu_hwpt_alloc with no user pointer (data_len 0, data_uptr 0).
    unsafe { ioctl(fd, IOMMU_HWPT_ALLOC, &mut cmd) }?;
    Ok(cmd.out_hwpt_id)
}

/// VFIO_DEVICE_BIND_IOMMUFD of a VFIO cdev to an iommufd. Returns the device's object ID.
pub(super) fn bind_iommufd(cdev: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut cmd = VfioDeviceBindIommufd {
        argsz: len32::<VfioDeviceBindIommufd>(),
        iommufd: iommufd.as_raw_fd(),
        ..VfioDeviceBindIommufd::default()
    };
    // SAFETY: `cmd` is a vfio_device_bind_iommufd with no user pointer (flags 0, so
    // token_uuid_ptr, which is 0, is not read); `iommufd` is borrowed, so open, for the call.
    unsafe { ioctl(cdev, VFIO_DEVICE_BIND_IOMMUFD, &mut cmd) }?;
    Ok(cmd.out_devid)
}

/// VFIO_DEVICE_ATTACH_IOMMUFD_PT (no PASID).
pub(super) fn attach_pt(cdev: BorrowedFd<'_>, pt_id: u32) -> Result<(), Errno> {
    let mut cmd = VfioDeviceAttachIommufdPt {
        argsz: len32::<VfioDeviceAttachIommufdPt>(),
        pt_id,
        ..VfioDeviceAttachIommufdPt::default()
    };
    // SAFETY: `cmd` is a vfio_device_attach_iommufd_pt, which carries no user pointer.
    unsafe { ioctl(cdev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut cmd) }
}

/// VFIO_DEVICE_DETACH_IOMMUFD_PT (no PASID).
pub(super) fn detach_pt(cdev: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut cmd = VfioDeviceDetachIommufdPt {
        argsz: len32::<VfioDeviceDetachIommufdPt>(),
        ..VfioDeviceDetachIommufdPt::default()
    };
    // SAFETY: `cmd` is a vfio_device_detach_iommufd_pt, which carries no user pointer.
    unsafe { ioctl(cdev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &mut cmd) }
}

/// VFIO_DEVICE_GET_REGION_INFO of region `index`, without capabilities (the kernel then only
/// reports, in `argsz`, how much room they would need).
pub(super) fn region_info(cdev: BorrowedFd<'_>, index: u32) -> Result<VfioRegionInfo, Errno> {
    let mut cmd = VfioRegionInfo {
        argsz: len32::<VfioRegionInfo>(),
        index,
        ..VfioRegionInfo::default()
    };
    // SAFETY: `cmd` is a vfio_region_info whose argsz covers only the struct itself, so the
    // kernel writes no capability chain past it; it carries no user pointer.
    unsafe { ioctl(cdev, VFIO_DEVICE_GET_REGION_INFO, &mut cmd) }?;
    Ok(cmd)
}

/// A register width [`Mapping`] can access: a plain integer, any bit pattern valid.
pub(super) trait Mmio: Copy {}
impl Mmio for u32 {}
impl Mmio for u64 {}

/// A shared, read-write mapping of a file, owned: unmapped on drop.
#[derive(Debug)]
pub(super) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// mmap(MAP_SHARED, PROT_READ | PROT_WRITE) of `len` bytes of `fd` from `offset`.
    pub(super) fn map_shared(fd: BorrowedFd<'_>, len: usize, offset: u64) -> Result<Self, Errno> {
        if len == 0 {
            return Err(Errno::INVAL);
        }
        // SAFETY: with a null hint and no MAP_FIXED the kernel places a new mapping where nothing
        // lives, so no memory Rust knows about is replaced or aliased. The mapping is owned by the
        // returned value alone, which unmaps it exactly once, on drop.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        // mmap never places a mapping at 0 without MAP_FIXED (mmap_min_addr).
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::NOMEM)?;
        Ok(Self { ptr, len })
    }

    /// The mapping's length in bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The address of a `T` at `off`, if it lies wholly inside the mapping and is aligned to
    /// its size (the mapping itself is page-aligned).
    fn at<T: Mmio>(&self, off: u64) -> Option<*mut T> {
        let size = size_of::<T>();
        let off = usize::try_from(off).ok()?;
        let end = off.checked_add(size)?;
        if end > self.len || !off.is_multiple_of(size) {
            return None;
        }
        Some(self.ptr.as_ptr().wrapping_add(off).cast::<T>())
    }

    /// A volatile read of the `T` at `off`; `None` outside the mapping or misaligned.
    pub(super) fn read<T: Mmio>(&self, off: u64) -> Option<T> {
        let ptr = self.at::<T>(off)?;
        // SAFETY: `at` checked that the `T` lies inside the live mapping this value owns and is
        // aligned; any bit pattern is a valid integer. The memory is shared with a device or
        // another mapping, which is why the access is volatile and never through a reference.
        Some(unsafe { ptr.read_volatile() })
    }

    /// A volatile write of `value` at `off`; `None` outside the mapping or misaligned.
    pub(super) fn write<T: Mmio>(&self, off: u64, value: T) -> Option<()> {
        let ptr = self.at::<T>(off)?;
        // SAFETY: `at` checked that the `T` lies inside the live, writable (PROT_WRITE) mapping
        // this value owns and is aligned. No Rust reference covers the mapping, so writing
        // through `&self` aliases nothing.
        unsafe { ptr.write_volatile(value) };
        Some(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is exactly the mapping `map_shared` made, owned by this value
        // alone and unmapped only here; no reference into it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn request_numbers_match_the_reference() {
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
        assert_eq!(VFIO_DEVICE_DETACH_IOMMUFD_PT, 0x3b78);
        // The same through vmm-sys-util's _IO macro.
        vmm_sys_util::ioctl_io_nr!(GET_REGION_INFO_NR, IOMMUFD_TYPE, 100 + 8);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, GET_REGION_INFO_NR());
    }

    #[test]
    fn struct_layouts_match_the_reference() {
        assert_eq!(size_of::<IommuDestroy>(), 8);
        assert_eq!(offset_of!(IommuDestroy, id), 4);

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

        assert_eq!(size_of::<VfioDeviceBindIommufd>(), 24);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, flags), 4);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, iommufd), 8);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, out_devid), 12);
        assert_eq!(offset_of!(VfioDeviceBindIommufd, token_uuid_ptr), 16);

        assert_eq!(size_of::<VfioDeviceAttachIommufdPt>(), 16);
        assert_eq!(offset_of!(VfioDeviceAttachIommufdPt, flags), 4);
        assert_eq!(offset_of!(VfioDeviceAttachIommufdPt, pt_id), 8);
        assert_eq!(offset_of!(VfioDeviceAttachIommufdPt, pasid), 12);

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

    #[test]
    fn a_zero_length_mapping_is_refused() {
        let fd = rustix::fs::memfd_create("viommu-lab-sys", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        use std::os::fd::AsFd;
        assert_eq!(
            Mapping::map_shared(fd.as_fd(), 0, 0).map(|m| m.len()),
            Err(Errno::INVAL)
        );
    }
}
