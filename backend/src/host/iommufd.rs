//! [`HostIommu`] on a real iommufd: the file QEMU opened on `/dev/iommu` and handed over, plus
//! the VFIO cdev of each passthrough device (for VFIO_DEVICE_ATTACH_IOMMUFD_PT).
//!
//! The uAPI structs are written out by hand in [`super::uapi`] (Linux 7.3
//! `include/uapi/linux/iommufd.h` and `vfio.h`; linux-iommufd.md §1.0-1.8), each with its size
//! asserted at compile time, and all the unsafe code (the ioctls and adopting the vEVENTQ fd)
//! lives in [`sys`] behind safe wrappers that set every user pointer themselves. The requests
//! [`sys`] issues are exactly [`super::uapi::DAEMON_REQUESTS`], which the daemon's sandbox
//! allows (a test below checks); [`outside_sandbox`] has the ones the daemon never issues. Errors
//! keep the ioctl's name and the kernel's errno.

use std::borrow::Cow;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{
    Errno, HostDevice, HostError, HostIommu, HwInfo, InvalidateError, ObjectId, RawCmd, VEvent,
    VSte,
};

/// `IOMMU_VEVENTQ_FLAG_LOST_EVENTS`: a header with no payload, standing for dropped events.
const VEVENTQ_FLAG_LOST_EVENTS: u32 = 1;
/// `struct iommufd_vevent_header`: `{u32 flags; u32 sequence}`.
const VEVENT_HEADER_LEN: usize = 8;
/// `struct iommu_vevent_arm_smmuv3`: `{__le64 evt[4]}`.
const VEVENT_ARM_SMMUV3_LEN: usize = 32;
/// One whole event record, header and payload.
const VEVENT_RECORD_LEN: usize = VEVENT_HEADER_LEN + VEVENT_ARM_SMMUV3_LEN;
/// Records per read(): the kernel returns only whole records, so a whole number of them.
const READ_RECORDS: usize = 102;
/// Reads per [`HostIommu::read_vevents`] call, so a queue refilled as fast as it drains cannot
/// hold the caller forever; what is left keeps the fd readable for the next poll.
const MAX_READS: usize = 64;

const OP_GET_HW_INFO: &str = "IOMMU_GET_HW_INFO";
const OP_VIOMMU_ALLOC: &str = "IOMMU_VIOMMU_ALLOC";
const OP_VDEVICE_ALLOC: &str = "IOMMU_VDEVICE_ALLOC";
const OP_HWPT_ALLOC: &str = "IOMMU_HWPT_ALLOC";
const OP_ATTACH: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
const OP_INVALIDATE: &str = "IOMMU_HWPT_INVALIDATE";
const OP_VEVENTQ_ALLOC: &str = "IOMMU_VEVENTQ_ALLOC";
const OP_READ_VEVENTQ: &str = "read(vEVENTQ)";
const OP_DESTROY: &str = "IOMMU_DESTROY";
const OP_PROBE: &str = "IOMMU_DESTROY(0) probe";

/// The host IOMMU through an iommufd file.
#[derive(Debug)]
pub struct Iommufd {
    fd: OwnedFd,
}

impl Iommufd {
    /// Adopts an iommufd file (normally QEMU's, received over the socket), after checking that
    /// it is one: IOMMU_DESTROY of ID 0, which the kernel never allocates, must fail with ENOENT
    /// (any other file says ENOTTY). On error the file is closed.
    pub fn new(fd: OwnedFd) -> Result<Self, HostError> {
        match sys::destroy(fd.as_fd(), 0) {
            Ok(()) | Err(Errno::NOENT) => Ok(Self { fd }),
            Err(errno) => Err(HostError::Kernel {
                op: OP_PROBE,
                errno,
            }),
        }
    }
}

impl AsFd for Iommufd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn kernel(op: &'static str) -> impl FnOnce(Errno) -> HostError {
    move |errno| HostError::Kernel { op, errno }
}

fn malformed(op: &'static str, what: String) -> HostError {
    HostError::Malformed { op, what }
}

impl HostIommu for Iommufd {
    fn hw_info(&mut self, dev_id: u32) -> Result<HwInfo, HostError> {
        let mut data = sys::HwInfoArmSmmuv3::default();
        let reply =
            sys::get_hw_info(self.fd.as_fd(), dev_id, &mut data).map_err(kernel(OP_GET_HW_INFO))?;
        if reply.out_data_type != sys::IOMMU_HW_INFO_TYPE_ARM_SMMUV3 {
            return Err(malformed(
                OP_GET_HW_INFO,
                format!(
                    "device {dev_id}: hw info type {}, not ARM_SMMUV3 ({})",
                    reply.out_data_type,
                    sys::IOMMU_HW_INFO_TYPE_ARM_SMMUV3
                ),
            ));
        }
        if reply.data_len < sys::HW_INFO_ARM_SMMUV3_LEN {
            return Err(malformed(
                OP_GET_HW_INFO,
                format!(
                    "device {dev_id}: ARM_SMMUV3 hw info of {} bytes, expected {}",
                    reply.data_len,
                    sys::HW_INFO_ARM_SMMUV3_LEN
                ),
            ));
        }
        Ok(HwInfo {
            flags: data.flags,
            idr: data.idr,
            iidr: data.iidr,
            aidr: data.aidr,
        })
    }

    fn alloc_viommu(&mut self, dev_id: u32, s2_hwpt: ObjectId) -> Result<ObjectId, HostError> {
        sys::viommu_alloc(self.fd.as_fd(), dev_id, s2_hwpt).map_err(kernel(OP_VIOMMU_ALLOC))
    }

    fn alloc_vdevice(
        &mut self,
        viommu: ObjectId,
        dev_id: u32,
        vsid: u64,
    ) -> Result<ObjectId, HostError> {
        sys::vdevice_alloc(self.fd.as_fd(), viommu, dev_id, vsid).map_err(kernel(OP_VDEVICE_ALLOC))
    }

    fn alloc_nested_hwpt(
        &mut self,
        viommu: ObjectId,
        dev_id: u32,
        ste: VSte,
    ) -> Result<ObjectId, HostError> {
        let data = sys::HwptArmSmmuv3 {
            ste: ste.map(u64::to_le),
        };
        sys::hwpt_alloc_nested(self.fd.as_fd(), viommu, dev_id, &data)
            .map_err(kernel(OP_HWPT_ALLOC))
    }

    fn attach(&mut self, dev: &HostDevice, pt_id: ObjectId) -> Result<(), HostError> {
        sys::attach_pt(dev.cdev.as_fd(), pt_id).map_err(kernel(OP_ATTACH))
    }

    fn invalidate(&mut self, viommu: ObjectId, cmds: &[RawCmd]) -> Result<(), InvalidateError> {
        if cmds.is_empty() {
            // ARM refuses entry_num 0 with -EINVAL (linux-iommufd.md §1.7); nothing to do.
            return Ok(());
        }
        let entries: Cow<'_, [RawCmd]> = if cfg!(target_endian = "little") {
            Cow::Borrowed(cmds)
        } else {
            Cow::Owned(cmds.iter().map(|cmd| cmd.map(u64::to_le)).collect())
        };
        let (entry_num, result) = sys::hwpt_invalidate(self.fd.as_fd(), viommu, &entries);
        result.map_err(|errno| {
            // ENOTTY and E2BIG come before the handler runs, so entry_num was not written back
            // and still holds our count; otherwise the handler wrote back how far it got.
            let written_back = !matches!(errno, Errno::NOTTY | Errno::TOOBIG);
            let total = u32::try_from(cmds.len()).unwrap_or(u32::MAX);
            InvalidateError {
                done: if written_back {
                    entry_num.min(total)
                } else {
                    0
                },
                error: HostError::Kernel {
                    op: OP_INVALIDATE,
                    errno,
                },
            }
        })
    }

    fn alloc_veventq(
        &mut self,
        viommu: ObjectId,
        depth: u32,
    ) -> Result<(ObjectId, OwnedFd), HostError> {
        match sys::veventq_alloc(self.fd.as_fd(), viommu, depth) {
            Ok(sys::VeventqAlloc::Ok { id, fd }) => Ok((id, fd)),
            Ok(sys::VeventqAlloc::BadFd { id, fd }) => {
                // Unreachable with a sane kernel; do not leave the queue behind.
                let _ = sys::destroy(self.fd.as_fd(), id);
                Err(malformed(
                    OP_VEVENTQ_ALLOC,
                    format!("vEVENTQ {id}: fd {fd} is not a file descriptor"),
                ))
            }
            Err(errno) => Err(kernel(OP_VEVENTQ_ALLOC)(errno)),
        }
    }

    fn read_vevents(
        &mut self,
        veventq: ObjectId,
        fd: BorrowedFd<'_>,
        out: &mut Vec<VEvent>,
    ) -> Result<usize, HostError> {
        let start = out.len();
        let mut buf = [0u8; READ_RECORDS * VEVENT_RECORD_LEN];
        for _ in 0..MAX_READS {
            let n = match rustix::io::read(fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(kernel(OP_READ_VEVENTQ)(errno)),
            };
            let got = buf.get(..n).unwrap_or(&buf);
            parse_vevents(got, out)
                .map_err(|what| malformed(OP_READ_VEVENTQ, format!("vEVENTQ {veventq}: {what}")))?;
        }
        Ok(out.len().saturating_sub(start))
    }

    fn destroy(&mut self, id: ObjectId) -> Result<(), HostError> {
        sys::destroy(self.fd.as_fd(), id).map_err(kernel(OP_DESTROY))
    }
}

/// Parses whole vEVENTQ records of type ARM_SMMUV3 from what one read() returned, appending
/// them to `out`. The kernel returns only whole records, so a short tail is an error; the
/// records before it are appended all the same.
fn parse_vevents(mut buf: &[u8], out: &mut Vec<VEvent>) -> Result<(), String> {
    while !buf.is_empty() {
        let Some((header, rest)) = buf.split_first_chunk::<VEVENT_HEADER_LEN>() else {
            return Err(format!(
                "{} trailing bytes, shorter than a record header",
                buf.len()
            ));
        };
        let [f0, f1, f2, f3, s0, s1, s2, s3] = *header;
        let flags = u32::from_ne_bytes([f0, f1, f2, f3]);
        let sequence = u32::from_ne_bytes([s0, s1, s2, s3]);
        if flags & VEVENTQ_FLAG_LOST_EVENTS != 0 {
            out.push(VEvent::Lost { sequence });
            buf = rest;
            continue;
        }
        let Some((payload, rest)) = rest.split_first_chunk::<VEVENT_ARM_SMMUV3_LEN>() else {
            return Err(format!(
                "event {sequence}: {} payload bytes, expected {VEVENT_ARM_SMMUV3_LEN}",
                rest.len()
            ));
        };
        let mut record = [0u64; 4];
        for (word, bytes) in record.iter_mut().zip(payload.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(bytes);
            *word = u64::from_le_bytes(le);
        }
        out.push(VEvent::Event { sequence, record });
        buf = rest;
    }
    Ok(())
}

/// The calls of this module, and every unsafe line of it; the uAPI is in [`super::uapi`]. Every
/// request issued here is in [`super::uapi::DAEMON_REQUESTS`]. [`destroy`](sys::destroy) and
/// [`attach_pt`](sys::attach_pt) are also the kernel lab's (`tests/src/lab`).
pub mod sys {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

    pub(super) use crate::host::uapi::*;

    use super::Errno;

    /// A user pointer field.
    fn uptr<T: ?Sized>(p: *const T) -> u64 {
        p.cast::<u8>() as usize as u64
    }

    /// IOMMU_GET_HW_INFO into `data`. Returns the struct as the kernel wrote it back.
    pub(super) fn get_hw_info(
        fd: BorrowedFd<'_>,
        dev_id: u32,
        data: &mut HwInfoArmSmmuv3,
    ) -> Result<IommuHwInfo, Errno> {
        let mut cmd = IommuHwInfo {
            size: len32::<IommuHwInfo>(),
            dev_id,
            data_len: len32::<HwInfoArmSmmuv3>(),
            data_uptr: uptr(std::ptr::from_mut(data)),
            ..IommuHwInfo::default()
        };
        // SAFETY: `cmd` is an iommu_hw_info; data_uptr points at `data`, exclusively borrowed
        // for this call and `data_len` bytes long.
        unsafe { ioctl(fd, IOMMU_GET_HW_INFO, &mut cmd) }?;
        Ok(cmd)
    }

    /// IOMMU_VIOMMU_ALLOC of type ARM_SMMUV3 (no driver data).
    pub(super) fn viommu_alloc(
        fd: BorrowedFd<'_>,
        dev_id: u32,
        hwpt_id: u32,
    ) -> Result<u32, Errno> {
        let mut cmd = IommuViommuAlloc {
            size: len32::<IommuViommuAlloc>(),
            type_: IOMMU_VIOMMU_TYPE_ARM_SMMUV3,
            dev_id,
            hwpt_id,
            ..IommuViommuAlloc::default()
        };
        // SAFETY: `cmd` is an iommu_viommu_alloc with no user pointer (data_len 0, uptr 0).
        unsafe { ioctl(fd, IOMMU_VIOMMU_ALLOC, &mut cmd) }?;
        Ok(cmd.out_viommu_id)
    }

    /// IOMMU_VDEVICE_ALLOC.
    pub(super) fn vdevice_alloc(
        fd: BorrowedFd<'_>,
        viommu_id: u32,
        dev_id: u32,
        virt_id: u64,
    ) -> Result<u32, Errno> {
        let mut cmd = IommuVdeviceAlloc {
            size: len32::<IommuVdeviceAlloc>(),
            viommu_id,
            dev_id,
            out_vdevice_id: 0,
            virt_id,
        };
        // SAFETY: `cmd` is an iommu_vdevice_alloc, which carries no user pointer.
        unsafe { ioctl(fd, IOMMU_VDEVICE_ALLOC, &mut cmd) }?;
        Ok(cmd.out_vdevice_id)
    }

    /// IOMMU_HWPT_ALLOC of a nested HWPT on a vIOMMU from an ARM_SMMUV3 vSTE.
    pub(super) fn hwpt_alloc_nested(
        fd: BorrowedFd<'_>,
        viommu_id: u32,
        dev_id: u32,
        data: &HwptArmSmmuv3,
    ) -> Result<u32, Errno> {
        let mut cmd = IommuHwptAlloc {
            size: len32::<IommuHwptAlloc>(),
            dev_id,
            pt_id: viommu_id,
            data_type: IOMMU_HWPT_DATA_ARM_SMMUV3,
            data_len: len32::<HwptArmSmmuv3>(),
            data_uptr: uptr(std::ptr::from_ref(data)),
            ..IommuHwptAlloc::default()
        };
        // SAFETY: `cmd` is an iommu_hwpt_alloc; data_uptr points at `data`, borrowed for this
        // call and `data_len` bytes long, which the kernel only reads.
        unsafe { ioctl(fd, IOMMU_HWPT_ALLOC, &mut cmd) }?;
        Ok(cmd.out_hwpt_id)
    }

    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT on a VFIO cdev (no PASID).
    pub fn attach_pt(cdev: BorrowedFd<'_>, pt_id: u32) -> Result<(), Errno> {
        let mut cmd = VfioDeviceAttachIommufdPt {
            argsz: len32::<VfioDeviceAttachIommufdPt>(),
            flags: 0,
            pt_id,
            pasid: 0,
        };
        // SAFETY: `cmd` is a vfio_device_attach_iommufd_pt, which carries no user pointer.
        unsafe { ioctl(cdev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut cmd) }
    }

    /// IOMMU_HWPT_INVALIDATE of `entries` (raw little-endian commands) on a vIOMMU, in one call.
    /// Returns `entry_num` as it stands after the call, and the outcome.
    pub(super) fn hwpt_invalidate(
        fd: BorrowedFd<'_>,
        viommu_id: u32,
        entries: &[[u64; 2]],
    ) -> (u32, Result<(), Errno>) {
        let Ok(entry_num) = u32::try_from(entries.len()) else {
            // The kernel takes at most 1 << 19.
            return (0, Err(Errno::INVAL));
        };
        let mut cmd = IommuHwptInvalidate {
            size: len32::<IommuHwptInvalidate>(),
            hwpt_id: viommu_id,
            data_uptr: uptr(entries.as_ptr()),
            data_type: IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
            entry_len: len32::<[u64; 2]>(),
            entry_num,
            reserved: 0,
        };
        // SAFETY: `cmd` is an iommu_hwpt_invalidate; data_uptr points at `entries`, borrowed for
        // this call and exactly entry_num * entry_len bytes long, which the kernel only reads.
        let result = unsafe { ioctl(fd, IOMMU_HWPT_INVALIDATE, &mut cmd) };
        (cmd.entry_num, result)
    }

    /// What IOMMU_VEVENTQ_ALLOC gave back.
    #[derive(Debug)]
    pub(super) enum VeventqAlloc {
        /// The queue and its fd, now owned.
        Ok { id: u32, fd: OwnedFd },
        /// The queue exists but `out_veventq_fd` is no fd number (never seen from a kernel).
        BadFd { id: u32, fd: u32 },
    }

    /// IOMMU_VEVENTQ_ALLOC of type ARM_SMMUV3.
    pub(super) fn veventq_alloc(
        fd: BorrowedFd<'_>,
        viommu_id: u32,
        depth: u32,
    ) -> Result<VeventqAlloc, Errno> {
        let mut cmd = IommuVeventqAlloc {
            size: len32::<IommuVeventqAlloc>(),
            viommu_id,
            type_: IOMMU_VEVENTQ_TYPE_ARM_SMMUV3,
            veventq_depth: depth,
            ..IommuVeventqAlloc::default()
        };
        // SAFETY: `cmd` is an iommu_veventq_alloc, which carries no user pointer.
        unsafe { ioctl(fd, IOMMU_VEVENTQ_ALLOC, &mut cmd) }?;
        let id = cmd.out_veventq_id;
        match i32::try_from(cmd.out_veventq_fd) {
            Ok(raw) if raw >= 0 => {
                // SAFETY: on success the kernel installed a new file at `raw` in this process's
                // fd table for us alone (eventq.c, fd_install after a successful alloc); nothing
                // else owns it, so the OwnedFd is its only owner and closes it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                Ok(VeventqAlloc::Ok { id, fd })
            }
            _ => Ok(VeventqAlloc::BadFd {
                id,
                fd: cmd.out_veventq_fd,
            }),
        }
    }

    /// IOMMU_DESTROY.
    pub fn destroy(fd: BorrowedFd<'_>, id: u32) -> Result<(), Errno> {
        let mut cmd = IommuDestroy {
            size: len32::<IommuDestroy>(),
            id,
        };
        // SAFETY: `cmd` is an iommu_destroy, which carries no user pointer.
        unsafe { ioctl(fd, IOMMU_DESTROY, &mut cmd) }
    }
}

/// Calls the daemon never makes, so its sandbox does not allow them: for the kernel lab
/// (`tests/src/lab`) and the smoke test on `/dev/iommu`.
pub mod outside_sandbox {
    use std::os::fd::BorrowedFd;

    use super::Errno;
    use crate::host::uapi::{IOMMU_IOAS_ALLOC, IommuIoasAlloc, ioctl, len32};

    /// IOMMU_IOAS_ALLOC.
    pub fn ioas_alloc(fd: BorrowedFd<'_>) -> Result<u32, Errno> {
        let mut cmd = IommuIoasAlloc {
            size: len32::<IommuIoasAlloc>(),
            ..IommuIoasAlloc::default()
        };
        // SAFETY: `cmd` is an iommu_ioas_alloc, which carries no user pointer.
        unsafe { ioctl(fd, IOMMU_IOAS_ALLOC, &mut cmd) }?;
        Ok(cmd.out_ioas_id)
    }
}

#[cfg(test)]
mod tests {
    use super::outside_sandbox::ioas_alloc;
    use super::*;

    fn memfd() -> OwnedFd {
        rustix::fs::memfd_create("viommu-iommufd-test", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create")
    }

    fn header(flags: u32, sequence: u32) -> Vec<u8> {
        let mut bytes = flags.to_ne_bytes().to_vec();
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes
    }

    fn event(sequence: u32, record: [u64; 4]) -> Vec<u8> {
        let mut bytes = header(0, sequence);
        for word in record {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    const RECORD: [u64; 4] = [0x0000_0042_0000_0010, 0x1234, 0xdead_b000, 0x8000_0000];

    #[test]
    fn a_vevent_record_is_a_header_and_an_arm_smmuv3_event() {
        // struct iommufd_vevent_header (8 bytes) and struct iommu_vevent_arm_smmuv3 (32).
        assert_eq!(VEVENT_RECORD_LEN, 40);
    }

    #[test]
    fn parses_events_and_lost_headers() {
        let mut buf = event(7, RECORD);
        buf.extend(header(VEVENTQ_FLAG_LOST_EVENTS, 8));
        buf.extend(event(11, [1, 2, 3, 4]));
        let mut out = vec![VEvent::Lost { sequence: 99 }];
        parse_vevents(&buf, &mut out).expect("whole records");
        assert_eq!(
            out,
            [
                VEvent::Lost { sequence: 99 },
                VEvent::Event {
                    sequence: 7,
                    record: RECORD
                },
                VEvent::Lost { sequence: 8 },
                VEvent::Event {
                    sequence: 11,
                    record: [1, 2, 3, 4]
                },
            ]
        );
        let mut none = Vec::new();
        parse_vevents(&[], &mut none).expect("empty");
        assert!(none.is_empty());
    }

    #[test]
    fn a_truncated_record_is_an_error_after_the_whole_ones() {
        let whole = event(1, RECORD);
        for cut in [
            1,
            4,
            VEVENT_HEADER_LEN,
            VEVENT_HEADER_LEN + 1,
            VEVENT_RECORD_LEN - 1,
        ] {
            let mut buf = whole.clone();
            buf.extend_from_slice(whole.get(..cut).expect("cut within a record"));
            let mut out = Vec::new();
            let err = parse_vevents(&buf, &mut out).expect_err("a short tail");
            assert!(!err.is_empty());
            assert_eq!(
                out,
                [VEvent::Event {
                    sequence: 1,
                    record: RECORD
                }]
            );
        }
    }

    #[test]
    fn read_vevents_drains_until_empty() {
        let fd = memfd();
        let mut buf = event(3, RECORD);
        buf.extend(event(4, [5, 6, 7, 8]));
        rustix::io::write(&fd, &buf).expect("write");
        rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0)).expect("seek");
        let mut iommu = Iommufd { fd: memfd() };
        let mut out = Vec::new();
        let n = iommu.read_vevents(5, fd.as_fd(), &mut out).expect("read");
        assert_eq!(n, 2);
        assert_eq!(
            out.last(),
            Some(&VEvent::Event {
                sequence: 4,
                record: [5, 6, 7, 8]
            })
        );
        assert_eq!(iommu.read_vevents(5, fd.as_fd(), &mut out), Ok(0));

        // A short tail is Malformed, naming the queue.
        let fd = memfd();
        rustix::io::write(&fd, &header(0, 9)).expect("write");
        rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0)).expect("seek");
        let err = iommu
            .read_vevents(5, fd.as_fd(), &mut out)
            .expect_err("short");
        assert!(
            matches!(&err, HostError::Malformed { op: OP_READ_VEVENTQ, what } if what.contains("vEVENTQ 5")),
            "{err:?}"
        );
    }

    /// The second argument of every `ioctl(` call in `src`: the request constant's name.
    fn ioctl_requests(src: &str) -> Vec<&str> {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut pieces = src.split("ioctl(");
        let mut before = pieces.next().unwrap_or_default();
        let mut requests = Vec::new();
        for args in pieces {
            // Not the tail of a longer name.
            if !before.ends_with(ident) {
                let request = args.split(',').nth(1).expect("a second argument").trim();
                let request = request.strip_prefix("uapi::").unwrap_or(request);
                let end = request.find(|c| !ident(c)).unwrap_or(request.len());
                requests.push(&request[..end]);
            }
            before = args;
        }
        requests
    }

    /// The daemon's sandbox allows exactly `uapi::DAEMON_REQUESTS`: every request [`sys`]
    /// issues must be in it (or the daemon dies of SIGSYS), and everything in it must be issued
    /// (or the sandbox allows more than it needs). The rest of this file issues none.
    #[test]
    fn daemon_requests_are_exactly_the_ioctls_of_sys() {
        let src = include_str!("iommufd.rs");
        let (code, _tests) = src
            .split_once("\n#[cfg(test)]\nmod tests {")
            .expect("the tests module");
        let (before_sys, sys_and_rest) = code.split_once("\npub mod sys {").expect("mod sys");
        let (sys, outside) = sys_and_rest
            .split_once("\npub mod outside_sandbox {")
            .expect("mod outside_sandbox");
        assert_eq!(ioctl_requests(before_sys), Vec::<&str>::new());
        assert!(
            !before_sys.contains("outside_sandbox::"),
            "Iommufd calls outside_sandbox, which the sandbox refuses"
        );

        let issued: std::collections::BTreeSet<&str> = ioctl_requests(sys).into_iter().collect();
        let allowed: std::collections::BTreeSet<&str> = crate::host::uapi::DAEMON_REQUEST_NAMES
            .iter()
            .copied()
            .collect();
        assert_eq!(issued, allowed);
        assert_eq!(
            crate::host::uapi::DAEMON_REQUESTS.len(),
            allowed.len(),
            "a request listed twice"
        );
        // The parser sees the calls of `outside_sandbox` too, which are not the daemon's.
        let extra = ioctl_requests(outside);
        assert_eq!(extra, ["IOMMU_IOAS_ALLOC"]);
        assert!(extra.iter().all(|name| !allowed.contains(name)));
    }

    fn assert_enotty<T: std::fmt::Debug>(op: &'static str, result: Result<T, HostError>) {
        match result {
            Err(HostError::Kernel { op: got, errno }) => {
                assert_eq!(got, op);
                assert_eq!(errno, Errno::NOTTY, "{op}");
            }
            other => panic!("{op}: expected ENOTTY, got {other:?}"),
        }
    }

    #[test]
    fn ioctls_on_a_file_that_is_not_an_iommufd_fail_with_enotty() {
        let mut iommu = Iommufd { fd: memfd() };
        assert_enotty(OP_GET_HW_INFO, iommu.hw_info(1));
        assert_enotty(OP_VIOMMU_ALLOC, iommu.alloc_viommu(1, 2));
        assert_enotty(OP_VDEVICE_ALLOC, iommu.alloc_vdevice(3, 1, 0x100));
        assert_enotty(OP_HWPT_ALLOC, iommu.alloc_nested_hwpt(3, 1, [1, 0]));
        assert_enotty(OP_VEVENTQ_ALLOC, iommu.alloc_veventq(3, 64));
        assert_enotty(OP_DESTROY, iommu.destroy(3));
        let dev = HostDevice {
            dev_id: 1,
            cdev: memfd(),
        };
        assert_enotty(OP_ATTACH, iommu.attach(&dev, 4));

        let err = iommu
            .invalidate(3, &[[0x10, 0], [0x11, 0]])
            .expect_err("not an iommufd");
        assert_eq!(err.done, 0);
        assert_eq!(
            err.error,
            HostError::Kernel {
                op: OP_INVALIDATE,
                errno: Errno::NOTTY
            }
        );
        // No commands, no ioctl.
        assert_eq!(iommu.invalidate(3, &[]), Ok(()));

        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut iommu = Iommufd { fd: null.into() };
        assert_enotty(OP_DESTROY, iommu.destroy(1));
    }

    #[test]
    fn new_refuses_a_file_that_is_not_an_iommufd() {
        assert_enotty(OP_PROBE, Iommufd::new(memfd()));
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        assert_enotty(OP_PROBE, Iommufd::new(null.into()));
    }

    /// On a kernel with iommufd, run with `VIOMMU_TEST_IOMMUFD=1`: checks that every request
    /// reaches its handler with a struct it accepts (ENOENT for the never-allocated ID 0, not
    /// ENOTTY, E2BIG or EINVAL) and that IOMMU_DESTROY works.
    #[test]
    fn smoke_on_dev_iommu() {
        let dev_iommu = std::path::Path::new("/dev/iommu");
        if !dev_iommu.exists() || std::env::var_os("VIOMMU_TEST_IOMMUFD").is_none() {
            println!("skipping: needs /dev/iommu and VIOMMU_TEST_IOMMUFD set");
            return;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev_iommu)
            .expect("open /dev/iommu");
        let mut iommu = Iommufd::new(file.into()).expect("an iommufd");
        let enoent = |result: Result<(), HostError>| {
            assert_eq!(result.map_err(|e| e.errno()), Err(Some(Errno::NOENT)));
        };
        enoent(iommu.hw_info(0).map(drop));
        enoent(iommu.alloc_viommu(0, 0).map(drop));
        enoent(iommu.alloc_vdevice(0, 0, 0).map(drop));
        enoent(iommu.alloc_nested_hwpt(0, 0, [1, 0]).map(drop));
        enoent(iommu.alloc_veventq(0, 64).map(drop));
        enoent(iommu.destroy(0));
        let err = iommu.invalidate(0, &[[0x10, 0]]).expect_err("no vIOMMU 0");
        assert_eq!((err.done, err.error.errno()), (0, Some(Errno::NOENT)));

        let ioas = ioas_alloc(iommu.as_fd()).expect("IOMMU_IOAS_ALLOC");
        iommu.destroy(ioas).expect("destroy the IOAS");
        enoent(iommu.destroy(ioas));
        println!("iommufd smoke test passed");
    }
}
