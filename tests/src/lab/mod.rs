//! What the lab program needs to play QEMU on a real host IOMMU: an iommufd on `/dev/iommu`
//! ([`LabIommufd`]), a VFIO device cdev bound to it ([`VfioCdev`]), the device's BAR0 mapped
//! ([`Bar`]) and QEMU's `edu` test device driven through it ([`Edu`]).
//!
//! The same calls as `lab/nesttest.c` (linux-iommufd.md §1.2, steps 1-7 and 11-12), safe: every
//! fd and mapping is owned and released on drop, and the unsafe code (ioctls, mmap, volatile
//! accesses) lives in the private `sys` module. Failures are [`io::Error`]s whose payload is a
//! [`LabError`] naming the call and carrying the kernel's errno ([`errno_of`] gets it back).

mod sys;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
pub use rustix::io::Errno;

/// Where the iommufd character device lives.
pub const DEV_IOMMU: &str = "/dev/iommu";

/// What failed, and the kernel's errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabError {
    /// The call (an ioctl's name, or what was opened or accessed).
    pub op: String,
    /// The errno.
    pub errno: Errno,
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, io::Error::from(self.errno))
    }
}

impl std::error::Error for LabError {}

impl From<LabError> for io::Error {
    fn from(err: LabError) -> Self {
        io::Error::new(io::Error::from(err.errno).kind(), err)
    }
}

/// The errno behind an error of this module (or any OS error).
pub fn errno_of(err: &io::Error) -> Option<Errno> {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<LabError>())
        .map(|lab| lab.errno)
        .or_else(|| err.raw_os_error().map(Errno::from_raw_os_error))
}

/// An [`io::Error`] for `op` failing with `errno`.
fn lab_error(op: impl Into<String>, errno: Errno) -> io::Error {
    LabError {
        op: op.into(),
        errno,
    }
    .into()
}

/// Maps an errno to an [`io::Error`] naming `op`.
fn fail(op: &'static str) -> impl FnOnce(Errno) -> io::Error {
    move |errno| lab_error(op, errno)
}

fn open_rdwr(path: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|errno| lab_error(format!("open {}", path.display()), errno))
}

/// An iommufd: `/dev/iommu` opened read-write. Closing it (on drop) destroys every object
/// still allocated in it.
#[derive(Debug)]
pub struct LabIommufd {
    fd: OwnedFd,
}

impl LabIommufd {
    /// Opens `/dev/iommu` (O_RDWR | O_CLOEXEC).
    pub fn open() -> io::Result<Self> {
        Self::open_path(Path::new(DEV_IOMMU))
    }

    /// Opens an iommufd device at `path`.
    pub(crate) fn open_path(path: &Path) -> io::Result<Self> {
        Ok(Self {
            fd: open_rdwr(path)?,
        })
    }

    /// The iommufd.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A duplicate of the iommufd (close-on-exec), e.g. to hand to the backend with SET_IOMMUFD.
    /// It is the same open file: object IDs are shared.
    pub fn dup(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// IOMMU_IOAS_ALLOC: a new, empty IO address space. Returns its ID.
    pub fn ioas_alloc(&self) -> io::Result<u32> {
        sys::ioas_alloc(self.as_fd()).map_err(fail("IOMMU_IOAS_ALLOC"))
    }

    /// IOMMU_IOAS_MAP_FILE with FIXED_IOVA | READABLE | WRITEABLE: bytes `start..start + length`
    /// of `memfd` (a memfd or hugetlbfs file) at `iova..iova + length` of the IOAS.
    pub fn ioas_map_file(
        &self,
        ioas: u32,
        memfd: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: u64,
    ) -> io::Result<()> {
        sys::ioas_map_file(self.as_fd(), ioas, memfd, start, length, iova)
            .map_err(fail("IOMMU_IOAS_MAP_FILE"))
    }

    /// IOMMU_IOAS_UNMAP of `iova..iova + length`, which must cover whole mapped areas
    /// (`0, u64::MAX` unmaps everything).
    pub fn ioas_unmap(&self, ioas: u32, iova: u64, length: u64) -> io::Result<()> {
        sys::ioas_unmap(self.as_fd(), ioas, iova, length)
            .map(drop)
            .map_err(fail("IOMMU_IOAS_UNMAP"))
    }

    /// IOMMU_HWPT_ALLOC of a stage-2 nesting parent (flags NEST_PARENT, data type NONE) on
    /// `ioas`, for the device `dev_id`. Returns the HWPT's ID.
    pub fn hwpt_alloc_nest_parent(&self, dev_id: u32, ioas: u32) -> io::Result<u32> {
        sys::hwpt_alloc_nest_parent(self.as_fd(), dev_id, ioas)
            .map_err(fail("IOMMU_HWPT_ALLOC(NEST_PARENT)"))
    }

    /// IOMMU_DESTROY of an object.
    pub fn destroy(&self, id: u32) -> io::Result<()> {
        self.destroy_result(id).map_err(fail("IOMMU_DESTROY"))
    }

    /// IOMMU_DESTROY with the bare errno, for checks that expect a failure (EBUSY while in use,
    /// ENOENT for an unknown ID).
    pub fn destroy_result(&self, id: u32) -> Result<(), Errno> {
        sys::destroy(self.as_fd(), id)
    }
}

impl AsFd for LabIommufd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What VFIO_DEVICE_GET_REGION_INFO says about a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`: READ 1, WRITE 2, MMAP 4, CAPS 8.
    pub flags: u32,
    /// The region's size in bytes.
    pub size: u64,
    /// Its offset in the device fd (for pread/pwrite and mmap).
    pub offset: u64,
}

/// The PCI command register's offset in config space.
const PCI_COMMAND: u64 = 4;
/// PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER.
const PCI_COMMAND_MEMORY_MASTER: u16 = 0x2 | 0x4;

/// A VFIO device cdev (`/dev/vfio/devices/vfioN`). Closing it (on drop) detaches and unbinds
/// the device.
#[derive(Debug)]
pub struct VfioCdev {
    fd: OwnedFd,
}

impl VfioCdev {
    /// Opens the cdev at `path` (O_RDWR | O_CLOEXEC). A cdev can be open only once at a time.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self {
            fd: open_rdwr(path.as_ref())?,
        })
    }

    /// The cdev.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A duplicate of the cdev (close-on-exec), e.g. for ATTACH_DEVICE to the backend. It is the
    /// same open file: the bind is shared.
    pub fn dup(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// VFIO_DEVICE_BIND_IOMMUFD to `iommufd`. Returns the device's object ID (`dev_id`).
    /// Device DMA is blocked from now until an attach.
    pub fn bind(&self, iommufd: &LabIommufd) -> io::Result<u32> {
        sys::bind_iommufd(self.as_fd(), iommufd.as_fd()).map_err(fail("VFIO_DEVICE_BIND_IOMMUFD"))
    }

    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT to an IOAS or HWPT (a second attach replaces the first).
    pub fn attach(&self, pt_id: u32) -> io::Result<()> {
        sys::attach_pt(self.as_fd(), pt_id).map_err(fail("VFIO_DEVICE_ATTACH_IOMMUFD_PT"))
    }

    /// VFIO_DEVICE_DETACH_IOMMUFD_PT: device DMA is blocked again.
    pub fn detach(&self) -> io::Result<()> {
        sys::detach_pt(self.as_fd()).map_err(fail("VFIO_DEVICE_DETACH_IOMMUFD_PT"))
    }

    /// VFIO_DEVICE_GET_REGION_INFO of region `index` (BAR0 is 0, PCI config space 7).
    pub fn region_info(&self, index: u32) -> io::Result<RegionInfo> {
        let info = sys::region_info(self.as_fd(), index)
            .map_err(|errno| lab_error(format!("VFIO_DEVICE_GET_REGION_INFO({index})"), errno))?;
        Ok(RegionInfo {
            index,
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    /// Sets Memory Space and Bus Master in the PCI command register (config space offset 4,
    /// through the config region), so BAR0 decodes and the device may DMA.
    pub fn enable_memory_and_bus_master(&self) -> io::Result<()> {
        let config = self.region_info(sys::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let rw = sys::VFIO_REGION_INFO_FLAG_READ | sys::VFIO_REGION_INFO_FLAG_WRITE;
        if config.flags & rw != rw || config.size < PCI_COMMAND.saturating_add(2) {
            return Err(lab_error(
                format!(
                    "PCI config region (flags {:#x}, {} bytes) is not a read-write config space",
                    config.flags, config.size
                ),
                Errno::NODEV,
            ));
        }
        let at = config
            .offset
            .checked_add(PCI_COMMAND)
            .ok_or_else(|| lab_error("PCI config region offset", Errno::OVERFLOW))?;
        let mut command = [0u8; 2];
        let read =
            rustix::io::pread(&self.fd, &mut command, at).map_err(fail("pread(PCI_COMMAND)"))?;
        if read != command.len() {
            return Err(lab_error(
                format!("pread(PCI_COMMAND) returned {read} bytes"),
                Errno::IO,
            ));
        }
        let value = u16::from_le_bytes(command) | PCI_COMMAND_MEMORY_MASTER;
        let written = rustix::io::pwrite(&self.fd, &value.to_le_bytes(), at)
            .map_err(fail("pwrite(PCI_COMMAND)"))?;
        if written != command.len() {
            return Err(lab_error(
                format!("pwrite(PCI_COMMAND) wrote {written} bytes"),
                Errno::IO,
            ));
        }
        Ok(())
    }

    /// Maps BAR0 (region 0) from the cdev, read-write, all of it.
    pub fn map_bar0(&self) -> io::Result<Bar> {
        let bar = self.region_info(sys::VFIO_PCI_BAR0_REGION_INDEX)?;
        if bar.flags & sys::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size == 0 {
            return Err(lab_error(
                format!(
                    "BAR0 (flags {:#x}, {} bytes) cannot be mmapped",
                    bar.flags, bar.size
                ),
                Errno::NODEV,
            ));
        }
        Bar::map(self.as_fd(), bar.offset, bar.size)
    }
}

impl AsFd for VfioCdev {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A mapped device BAR (or any shared file mapping), unmapped on drop. Accesses are volatile,
/// of exactly their width, and checked: outside the BAR or misaligned they fail with EINVAL
/// and touch nothing.
#[derive(Debug)]
pub struct Bar {
    map: sys::Mapping,
}

impl Bar {
    /// Maps `size` bytes of `fd` from `offset`, shared and read-write. The mapping keeps the file
    /// referenced, so it outlives `fd`.
    pub(crate) fn map(fd: BorrowedFd<'_>, offset: u64, size: u64) -> io::Result<Self> {
        let len = usize::try_from(size)
            .map_err(|_| lab_error(format!("BAR of {size:#x} bytes"), Errno::OVERFLOW))?;
        let map = sys::Mapping::map_shared(fd, len, offset)
            .map_err(|errno| lab_error(format!("mmap({size:#x} bytes at {offset:#x})"), errno))?;
        Ok(Self { map })
    }

    /// The BAR's size in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether the BAR is empty (never: an empty mapping cannot be made).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn out_of_range(&self, access: &str, off: u64) -> io::Error {
        lab_error(
            format!(
                "{access} at {off:#x}: outside the {:#x}-byte BAR or misaligned",
                self.map.len()
            ),
            Errno::INVAL,
        )
    }

    /// A 32-bit read at `off` (4-byte aligned).
    pub fn read32(&self, off: u64) -> io::Result<u32> {
        self.map
            .read::<u32>(off)
            .ok_or_else(|| self.out_of_range("read32", off))
    }

    /// A 64-bit read at `off` (8-byte aligned).
    pub fn read64(&self, off: u64) -> io::Result<u64> {
        self.map
            .read::<u64>(off)
            .ok_or_else(|| self.out_of_range("read64", off))
    }

    /// A 32-bit write at `off` (4-byte aligned).
    pub fn write32(&self, off: u64, value: u32) -> io::Result<()> {
        self.map
            .write::<u32>(off, value)
            .ok_or_else(|| self.out_of_range("write32", off))
    }

    /// A 64-bit write at `off` (8-byte aligned).
    pub fn write64(&self, off: u64, value: u64) -> io::Result<()> {
        self.map
            .write::<u64>(off, value)
            .ok_or_else(|| self.out_of_range("write64", off))
    }
}

/// The `edu` identification register's value (version 1.0, device 0xed).
pub const EDU_ID: u32 = 0x0100_00ed;
/// The device address of edu's internal DMA buffer.
pub const EDU_BUFFER: u64 = 0x4_0000;
/// The size of edu's internal DMA buffer.
pub const EDU_BUFFER_LEN: u64 = 0x1000;
/// The device's DMA mask: 28 bits (QEMU clamps wider addresses, silently).
pub const EDU_DMA_MASK: u64 = (1 << 28) - 1;
/// How long [`Edu::dma`] waits for a transfer (QEMU runs it from a 100 ms timer).
pub const EDU_DMA_TIMEOUT: Duration = Duration::from_secs(2);

const EDU_REG_ID: u64 = 0x00;
const EDU_REG_DMA_SRC: u64 = 0x80;
const EDU_REG_DMA_DST: u64 = 0x88;
const EDU_REG_DMA_COUNT: u64 = 0x90;
const EDU_REG_DMA_CMD: u64 = 0x98;
const EDU_DMA_START: u64 = 1 << 0;
const EDU_DMA_TO_RAM: u64 = 1 << 1;

/// QEMU's `edu` PCI test device, through its BAR0.
#[derive(Debug, Clone, Copy)]
pub struct Edu<'a>(pub &'a Bar);

impl<'a> Edu<'a> {
    /// The device behind `bar`.
    pub fn new(bar: &'a Bar) -> Self {
        Self(bar)
    }

    /// The identification register ([`EDU_ID`] for edu); all-ones, as a PCI read of nothing,
    /// if the BAR is too small to hold it.
    pub fn id(&self) -> u32 {
        self.0.read32(EDU_REG_ID).unwrap_or(u32::MAX)
    }

    /// One DMA transfer of `count` bytes, waited for: from RAM at `src` into edu's buffer at
    /// `dst` (`to_ram` false), or from edu's buffer at `src` to RAM at `dst` (`to_ram` true).
    /// RAM addresses are IOVAs, below 2^28. Fails with EINVAL for a transfer the device would
    /// refuse (QEMU aborts on an edu-buffer range outside [`EDU_BUFFER`], [`EDU_BUFFER_LEN`]),
    /// EBUSY if a transfer is running, and ETIMEDOUT if it does not finish in 2 s.
    pub fn dma(&self, src: u64, dst: u64, count: u64, to_ram: bool) -> io::Result<()> {
        self.dma_within(src, dst, count, to_ram, EDU_DMA_TIMEOUT)
    }

    fn dma_within(
        &self,
        src: u64,
        dst: u64,
        count: u64,
        to_ram: bool,
        timeout: Duration,
    ) -> io::Result<()> {
        let (buffer, ram) = if to_ram { (src, dst) } else { (dst, src) };
        let what = || {
            format!(
                "edu DMA of {count:#x} bytes {src:#x} -> {dst:#x} ({})",
                if to_ram { "to RAM" } else { "from RAM" }
            )
        };
        let buffer_end = EDU_BUFFER.saturating_add(EDU_BUFFER_LEN);
        let fits = |start: u64, lo: u64, hi: u64| {
            start >= lo && count != 0 && start.checked_add(count).is_some_and(|end| end <= hi)
        };
        if !fits(buffer, EDU_BUFFER, buffer_end) {
            return Err(lab_error(
                format!(
                    "{}: the edu side must lie in {EDU_BUFFER:#x}..{buffer_end:#x}",
                    what()
                ),
                Errno::INVAL,
            ));
        }
        if !fits(ram, 0, EDU_DMA_MASK.saturating_add(1)) {
            return Err(lab_error(
                format!("{}: the RAM side must lie below 2^28", what()),
                Errno::INVAL,
            ));
        }
        let bar = self.0;
        if bar.read64(EDU_REG_DMA_CMD)? & EDU_DMA_START != 0 {
            return Err(lab_error(
                format!("{}: a transfer is already running", what()),
                Errno::BUSY,
            ));
        }
        // Whatever the CPU wrote to the source buffer must be visible before the doorbell.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        bar.write64(EDU_REG_DMA_SRC, src)?;
        bar.write64(EDU_REG_DMA_DST, dst)?;
        bar.write64(EDU_REG_DMA_COUNT, count)?;
        let cmd = EDU_DMA_START | if to_ram { EDU_DMA_TO_RAM } else { 0 };
        bar.write64(EDU_REG_DMA_CMD, cmd)?;
        let start = Instant::now();
        loop {
            let now = bar.read64(EDU_REG_DMA_CMD)?;
            if now & EDU_DMA_START == 0 {
                // The CPU must not read the destination before it saw the transfer end.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(lab_error(
                    format!("{}: still running after {timeout:?} (cmd {now:#x})", what()),
                    Errno::TIMEDOUT,
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn memfd(size: u64) -> OwnedFd {
        let fd = rustix::fs::memfd_create("viommu-lab-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        rustix::fs::ftruncate(&fd, size).expect("ftruncate");
        fd
    }

    fn pread_u64(fd: &OwnedFd, off: u64) -> u64 {
        let mut bytes = [0u8; 8];
        assert_eq!(rustix::io::pread(fd, &mut bytes, off).expect("pread"), 8);
        u64::from_ne_bytes(bytes)
    }

    fn assert_errno<T: fmt::Debug>(result: io::Result<T>, errno: Errno, op: &str) {
        let err = result.expect_err(op);
        assert_eq!(errno_of(&err), Some(errno), "{err}");
        assert!(err.to_string().contains(op), "{err} should name {op}");
    }

    #[test]
    fn open_fails_cleanly_without_the_device() {
        let missing = Path::new("/nonexistent/viommu-lab/iommu");
        let err = LabIommufd::open_path(missing).expect_err("no such device");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(errno_of(&err), Some(Errno::NOENT));
        assert!(
            err.to_string()
                .contains("open /nonexistent/viommu-lab/iommu"),
            "{err}"
        );

        let err = VfioCdev::open(missing).expect_err("no such device");
        assert_eq!(errno_of(&err), Some(Errno::NOENT));

        if !Path::new(DEV_IOMMU).exists() {
            let err = LabIommufd::open().expect_err("no /dev/iommu here");
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
            assert!(err.to_string().starts_with("open /dev/iommu: "), "{err}");
        }
    }

    #[test]
    fn ioctls_on_a_file_of_another_kind_fail_with_enotty_naming_the_ioctl() {
        let iommufd = LabIommufd { fd: memfd(PAGE) };
        let ram = memfd(PAGE);
        assert_errno(iommufd.ioas_alloc(), Errno::NOTTY, "IOMMU_IOAS_ALLOC");
        assert_errno(
            iommufd.ioas_map_file(1, ram.as_fd(), 0, PAGE, 0x4000_0000),
            Errno::NOTTY,
            "IOMMU_IOAS_MAP_FILE",
        );
        assert_errno(
            iommufd.ioas_unmap(1, 0x4000_0000, PAGE),
            Errno::NOTTY,
            "IOMMU_IOAS_UNMAP",
        );
        assert_errno(
            iommufd.hwpt_alloc_nest_parent(1, 2),
            Errno::NOTTY,
            "IOMMU_HWPT_ALLOC",
        );
        assert_errno(iommufd.destroy(3), Errno::NOTTY, "IOMMU_DESTROY");
        assert_eq!(iommufd.destroy_result(3), Err(Errno::NOTTY));

        let cdev = VfioCdev { fd: memfd(PAGE) };
        assert_errno(
            cdev.bind(&iommufd),
            Errno::NOTTY,
            "VFIO_DEVICE_BIND_IOMMUFD",
        );
        assert_errno(
            cdev.attach(4),
            Errno::NOTTY,
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        );
        assert_errno(cdev.detach(), Errno::NOTTY, "VFIO_DEVICE_DETACH_IOMMUFD_PT");
        assert_errno(
            cdev.enable_memory_and_bus_master(),
            Errno::NOTTY,
            "VFIO_DEVICE_GET_REGION_INFO(7)",
        );
        assert_errno(
            cdev.map_bar0(),
            Errno::NOTTY,
            "VFIO_DEVICE_GET_REGION_INFO(0)",
        );

        // dup() is the same file.
        let dup = cdev.dup().expect("dup");
        rustix::io::pwrite(&dup, &7u64.to_ne_bytes(), 0).expect("pwrite");
        assert_eq!(pread_u64(&cdev.fd, 0), 7);
        let dup = iommufd.dup().expect("dup");
        assert_eq!(
            rustix::fs::fstat(&dup).expect("fstat").st_ino,
            rustix::fs::fstat(&iommufd).expect("fstat").st_ino
        );
    }

    #[test]
    fn bar_accesses_are_checked_and_reach_the_file() {
        let fd = memfd(PAGE);
        let bar = Bar::map(fd.as_fd(), 0, PAGE).expect("map");
        assert_eq!(bar.len(), PAGE);
        assert!(!bar.is_empty());

        bar.write64(0x98, 0x1122_3344_5566_7788).expect("in range");
        assert_eq!(bar.read64(0x98).expect("in range"), 0x1122_3344_5566_7788);
        assert_eq!(pread_u64(&fd, 0x98), 0x1122_3344_5566_7788);
        let low = if cfg!(target_endian = "little") {
            0x5566_7788
        } else {
            0x1122_3344
        };
        assert_eq!(bar.read32(0x98).expect("in range"), low);
        bar.write32(0x9c, 0xdead_beef).expect("in range");
        bar.write64(PAGE - 8, u64::MAX).expect("the last word");
        assert_eq!(bar.read32(PAGE - 4).expect("the last word"), u32::MAX);

        for off in [PAGE, PAGE - 2, PAGE + 4, u64::MAX - 3, u64::MAX] {
            assert_errno(bar.read32(off), Errno::INVAL, "read32");
        }
        for off in [PAGE, PAGE - 4, u64::MAX - 7, 2, 4] {
            assert_errno(bar.read64(off), Errno::INVAL, "read64");
            assert_errno(bar.write64(off, 1), Errno::INVAL, "write64");
        }
        assert_errno(bar.read32(2), Errno::INVAL, "read32");
        assert_errno(bar.write32(PAGE, 1), Errno::INVAL, "write32");
        // Nothing was written by the refused accesses.
        assert_eq!(pread_u64(&fd, PAGE - 8), u64::MAX);
        assert_eq!(pread_u64(&fd, 0), 0);

        // A mapping at an offset, outliving its fd.
        let bar = Bar::map(memfd(2 * PAGE).as_fd(), PAGE, PAGE).expect("map");
        bar.write64(0, 5).expect("in range");
        assert_eq!(bar.read64(0).expect("in range"), 5);

        assert_errno(Bar::map(fd.as_fd(), 0, 0), Errno::INVAL, "mmap");
    }

    #[test]
    fn edu_refuses_transfers_the_device_would_not_do() {
        let fd = memfd(PAGE);
        let bar = Bar::map(fd.as_fd(), 0, PAGE).expect("map");
        bar.write32(0, EDU_ID).expect("id");
        let edu = Edu::new(&bar);
        assert_eq!(edu.id(), EDU_ID);

        let refused = [
            (0x1000, EDU_BUFFER, 0, false),
            (0x1000, EDU_BUFFER - 1, 8, false),
            (0x1000, EDU_BUFFER + EDU_BUFFER_LEN - 4, 8, false),
            (EDU_BUFFER + EDU_BUFFER_LEN, 0x1000, 1, true),
            (EDU_BUFFER, 1 << 28, 64, true),
            (EDU_BUFFER, (1 << 28) - 32, 64, true),
            (u64::MAX, EDU_BUFFER, 64, false),
        ];
        for (src, dst, count, to_ram) in refused {
            assert_errno(edu.dma(src, dst, count, to_ram), Errno::INVAL, "edu DMA");
        }
        // Nothing reached the registers.
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_CMD), 0);

        // A running transfer is not disturbed.
        bar.write64(EDU_REG_DMA_CMD, EDU_DMA_START).expect("cmd");
        assert_errno(
            edu.dma(0x1000, EDU_BUFFER, 64, false),
            Errno::BUSY,
            "edu DMA",
        );
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_SRC), 0);

        // Too small a BAR reads as all-ones.
        let tiny = Bar::map(fd.as_fd(), 0, 2).expect("map");
        assert_eq!(Edu(&tiny).id(), u32::MAX);
    }

    #[test]
    fn edu_dma_times_out_when_the_device_never_finishes() {
        let fd = memfd(PAGE);
        let bar = Bar::map(fd.as_fd(), 0, PAGE).expect("map");
        let edu = Edu::new(&bar);
        let err = edu
            .dma_within(EDU_BUFFER, 0x10_1000, 64, true, Duration::from_millis(20))
            .expect_err("nobody clears START");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(errno_of(&err), Some(Errno::TIMEDOUT));
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_SRC), EDU_BUFFER);
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_DST), 0x10_1000);
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_COUNT), 64);
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_CMD), 3);
    }

    #[test]
    fn edu_dma_waits_for_the_device() {
        let fd = memfd(PAGE);
        let device = fd.try_clone().expect("dup");
        // The "device": another mapping of the same file that completes the transfer.
        let done = std::thread::spawn(move || {
            let bar = Bar::map(device.as_fd(), 0, PAGE).expect("map");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                let cmd = bar.read64(EDU_REG_DMA_CMD).expect("cmd");
                if cmd & EDU_DMA_START != 0 {
                    std::thread::sleep(Duration::from_millis(5));
                    bar.write64(EDU_REG_DMA_CMD, cmd & !EDU_DMA_START)
                        .expect("cmd");
                    return Some(cmd);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        });
        let bar = Bar::map(fd.as_fd(), 0, PAGE).expect("map");
        Edu(&bar)
            .dma(0x10_0000, EDU_BUFFER, 64, false)
            .expect("completed");
        assert_eq!(done.join().expect("device thread"), Some(EDU_DMA_START));
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_SRC), 0x10_0000);
        assert_eq!(pread_u64(&fd, EDU_REG_DMA_DST), EDU_BUFFER);
    }
}
