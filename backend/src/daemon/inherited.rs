//! Adopting a file descriptor inherited from the process that started us: a connected socket
//! (`--fd N`, libvirt's way) or a listening one (`--listen-fd N`, systemd socket activation).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use rustix::net::{AddressFamily, SocketType, sockopt};

/// Why an inherited fd cannot serve as the frontend connection.
#[derive(Debug, thiserror::Error)]
pub enum InheritedFdError {
    /// 0, 1 and 2 are the standard streams.
    #[error("--fd {0}: file descriptors 0, 1 and 2 are stdin, stdout and stderr")]
    StandardStream(RawFd),
    /// Nothing is open under that number.
    #[error("--fd {0}: not an open file descriptor")]
    NotOpen(RawFd),
    /// It is open but not a Unix stream socket.
    #[error("--fd {0}: not a Unix stream socket")]
    NotUnixStream(RawFd),
    /// It is a listening socket, not a connection.
    #[error("--fd {0}: a listening socket; pass one end of a connected socketpair")]
    Listening(RawFd),
    /// It is a connection, not a listening socket.
    #[error("--listen-fd {0}: not a listening socket")]
    NotListening(RawFd),
}

/// Takes ownership of inherited fd `fd` as the connection to the frontend.
pub fn unix_stream(fd: RawFd) -> Result<UnixStream, InheritedFdError> {
    let owned = unix_socket(fd)?;
    if sockopt::socket_acceptconn(&owned).unwrap_or(false) {
        return Err(InheritedFdError::Listening(fd));
    }
    Ok(UnixStream::from(owned))
}

/// Takes ownership of inherited fd `fd` as the socket to accept frontends on.
pub fn unix_listener(fd: RawFd) -> Result<UnixListener, InheritedFdError> {
    let owned = unix_socket(fd)?;
    if !sockopt::socket_acceptconn(&owned).unwrap_or(false) {
        return Err(InheritedFdError::NotListening(fd));
    }
    Ok(UnixListener::from(owned))
}

/// Takes ownership of inherited fd `fd`, which must be a Unix stream socket.
fn unix_socket(fd: RawFd) -> Result<OwnedFd, InheritedFdError> {
    if (0..3).contains(&fd) {
        return Err(InheritedFdError::StandardStream(fd));
    }
    if fd < 0 || rustix::io::fcntl_getfd(probe(fd)).is_err() {
        return Err(InheritedFdError::NotOpen(fd));
    }
    // SAFETY: `fd` is open (fcntl succeeded above) and was handed to this process by whoever
    // started it for us to use; nothing else in the process owns it, so taking ownership here
    // (and closing it on every error path below) is sound.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_unix_stream = matches!(
        (sockopt::socket_type(&owned), sockopt::socket_domain(&owned)),
        (Ok(SocketType::STREAM), Ok(AddressFamily::UNIX))
    );
    if !is_unix_stream {
        return Err(InheritedFdError::NotUnixStream(fd));
    }
    Ok(owned)
}

/// Borrows a raw fd number for a check that is harmless on any number.
fn probe(fd: RawFd) -> rustix::fd::BorrowedFd<'static> {
    // SAFETY: the borrowed fd is only passed to fcntl(F_GETFD), which reports EBADF for a
    // number that is not open and has no effect on one that is.
    unsafe { rustix::fd::BorrowedFd::borrow_raw(fd) }
}
