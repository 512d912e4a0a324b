//! Helpers shared by the protocol test suites: real fds and raw socket writes.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::{MemfdFlags, memfd_create};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};

/// A memfd holding `contents`.
pub fn memfd(contents: &[u8]) -> OwnedFd {
    let fd = memfd_create("viommu-test", MemfdFlags::CLOEXEC).unwrap();
    let mut written = 0;
    while written < contents.len() {
        written += rustix::io::write(&fd, &contents[written..]).unwrap();
    }
    fd
}

/// A non-blocking eventfd.
pub fn eventfd_new() -> OwnedFd {
    eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
}

/// (device, inode) of an open file: the identity that survives fd passing.
pub fn identity(fd: impl AsFd) -> (u64, u64) {
    let st = rustix::fs::fstat(fd).unwrap();
    (st.st_dev, st.st_ino)
}

/// Whether FD_CLOEXEC is set.
pub fn is_cloexec(fd: impl AsFd) -> bool {
    rustix::io::fcntl_getfd(fd)
        .unwrap()
        .contains(rustix::io::FdFlags::CLOEXEC)
}

/// Reads `len` bytes at offset 0 of a file.
pub fn read_at0(fd: impl AsFd, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = rustix::io::pread(fd, &mut buf, 0).unwrap();
    buf.truncate(n);
    buf
}

/// Writes raw bytes with any number of fds in one sendmsg, bypassing all protocol checks.
pub fn raw_send(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space =
        vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let n = sendmsg(
        stream,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(n, bytes.len());
}

/// A header as raw bytes.
pub fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&request.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v
}

/// A request message (version 1) as raw bytes.
pub fn message(request: u32, need_reply: bool, payload: &[u8]) -> Vec<u8> {
    let mut v = header(
        request,
        if need_reply { 0x9 } else { 0x1 },
        payload.len() as u32,
    );
    v.extend_from_slice(payload);
    v
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
