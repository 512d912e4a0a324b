//! Real file descriptors for the inputs that carry them, and a leak check.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};

use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::{MemfdFlags, ftruncate, memfd_create};
use rustix::net::{AddressFamily, SocketType, socket};

/// The kinds of descriptor an input can attach to a message.
pub const FD_KINDS: [&str; 7] = [
    "eventfd",
    "memfd",
    "unix-stream",
    "unix-datagram",
    "pipe",
    "inet-stream",
    "empty-memfd",
];

/// A descriptor made for an input, with whatever keeps its far end alive.
#[derive(Debug)]
pub struct MadeFd {
    /// The descriptor handed to the code under test.
    pub fd: OwnedFd,
    /// The far end of a socket pair or pipe, kept open while the input runs.
    pub peer: Option<OwnedFd>,
}

/// Makes a descriptor of kind `kind % FD_KINDS.len()`.
pub fn make_fd(kind: u8) -> MadeFd {
    let plain = |fd| MadeFd { fd, peer: None };
    let eventfd_now = || eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd");
    match usize::from(kind) % FD_KINDS.len() {
        0 => plain(eventfd_now()),
        1 => {
            let fd = memfd_create("fuzz", MemfdFlags::CLOEXEC).expect("memfd_create");
            ftruncate(&fd, 0x4000).expect("ftruncate");
            plain(fd)
        }
        2 => {
            let (a, b) = UnixStream::pair().expect("socketpair");
            MadeFd {
                fd: a.into(),
                peer: Some(b.into()),
            }
        }
        3 => {
            let (a, b) = UnixDatagram::pair().expect("socketpair");
            MadeFd {
                fd: a.into(),
                peer: Some(b.into()),
            }
        }
        4 => {
            let (r, w) = rustix::pipe::pipe().expect("pipe");
            MadeFd {
                fd: r,
                peer: Some(w),
            }
        }
        5 => match socket(AddressFamily::INET, SocketType::STREAM, None) {
            Ok(fd) => plain(fd),
            Err(_) => plain(eventfd_now()),
        },
        _ => plain(memfd_create("fuzz-empty", MemfdFlags::CLOEXEC).expect("memfd_create")),
    }
}

/// Makes one descriptor per kind byte.
pub fn make_fds(kinds: &[u8]) -> Vec<MadeFd> {
    kinds.iter().map(|&k| make_fd(k)).collect()
}

/// Duplicates descriptors (the code under test takes ownership of its copies).
pub fn dup_all(fds: &[MadeFd]) -> Vec<OwnedFd> {
    fds.iter().map(|m| m.fd.try_clone().expect("dup")).collect()
}

/// Borrows the descriptors.
pub fn borrow_all(fds: &[MadeFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|m| m.fd.as_fd()).collect()
}

/// Which open file a descriptor refers to: (device, inode).
pub fn identity(fd: BorrowedFd<'_>) -> (u64, u64) {
    let st = rustix::fs::fstat(fd).expect("fstat");
    #[allow(clippy::useless_conversion)]
    (u64::from(st.st_dev), u64::from(st.st_ino))
}

/// The lowest free descriptor number: equal before and after an input that leaks nothing
/// (in a process with no other thread opening files).
pub fn lowest_free_fd() -> RawFd {
    let probe = eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd");
    probe.as_raw_fd()
}
