//! The uAPI structs and request numbers the lab program uses, and every unsafe line of
//! [`crate::lab`].
//!
//! The uAPI (Linux 7.3 `include/uapi/linux/iommufd.h` and `vfio.h`) and its `ioctl` wrapper are
//! the daemon's, `viommu_backend::host::uapi`, and so are the wrappers of the calls the daemon
//! has too (IOMMU_DESTROY, VFIO_DEVICE_ATTACH_IOMMUFD_PT and IOMMU_IOAS_ALLOC, in
//! `viommu_backend::host::iommufd`). The wrappers here, of the calls only the lab makes, set
//! every field themselves; none of the structs they pass carries a user pointer, so each call's
//! memory contract is just "`arg` is the right struct".

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

pub(super) use viommu_backend::host::iommufd::outside_sandbox::ioas_alloc;
pub(super) use viommu_backend::host::iommufd::sys::{attach_pt, destroy};
pub(super) use viommu_backend::host::uapi::*;

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
    use super::*;

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
