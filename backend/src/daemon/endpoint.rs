//! Where the daemon gets its frontends (a socket path it binds, an inherited listening socket,
//! or one inherited connection), and the start-up order around them: the socket first, then
//! the signal handlers and the guest-RAM guard, then the sandbox, then readiness for the
//! service manager (`READY=1`), then serving, then `STOPPING=1`.

use std::io::ErrorKind;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::info;

use super::inherited::{self, InheritedFdError};
use super::notify::Notifier;
use super::sandbox::{self, SandboxError, SandboxMode};
use super::{DaemonError, Options, Served, Shutdown};
use crate::session::ram_guard;

/// Where frontends come from, as the command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `--socket-path`: bind this path and serve one frontend at a time.
    SocketPath(PathBuf),
    /// `--fd`: serve the one connected socket inherited as this descriptor.
    Connection(RawFd),
    /// `--listen-fd`: accept frontends on the listening socket inherited as this descriptor.
    Listener(RawFd),
}

/// Why the daemon could not start, or stopped on an error of its own.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Binding the socket path failed.
    #[error("cannot listen on {}", .path.display())]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path exists and is something else than a socket.
    #[error("cannot listen on {}: the path exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// A live process listens on the path.
    #[error("cannot listen on {}: another process is listening on it", .0.display())]
    InUse(PathBuf),
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale socket {}", .path.display())]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An inherited descriptor is not what its option says.
    #[error(transparent)]
    Inherited(#[from] InheritedFdError),
    /// The SIGBUS handler of the guest-RAM guard could not be installed.
    #[error("cannot install the SIGBUS handler")]
    RamGuard(#[source] std::io::Error),
    /// The sandbox could not be entered.
    #[error("cannot enter the sandbox")]
    Sandbox(#[from] SandboxError),
    /// The event loop failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// The opened endpoint.
enum Frontends<'a> {
    /// A socket the daemon bound itself (removed at exit).
    Bound(&'a Path, UnixListener),
    /// An inherited listening socket.
    Inherited(RawFd, UnixListener),
    /// One inherited connection.
    Connection(UnixStream),
}

/// Opens `endpoint`, prepares the process (signals, guest-RAM guard, sandbox) and serves
/// frontends until a signal asks the daemon to stop (or, for [`Endpoint::Connection`], until
/// the one frontend leaves). `notifier`, connected before the sandbox by the caller, hears
/// `READY=1` once frontends can be served, their comings and goings, and `STOPPING=1`.
pub fn run(
    endpoint: &Endpoint,
    sandbox: SandboxMode,
    options: &Options,
    notifier: &Notifier,
) -> Result<(), StartError> {
    // The socket exists before the sandbox is entered.
    let frontends = match endpoint {
        Endpoint::SocketPath(path) => Frontends::Bound(path, listen(path)?),
        Endpoint::Connection(fd) => Frontends::Connection(inherited::unix_stream(*fd)?),
        Endpoint::Listener(fd) => Frontends::Inherited(*fd, inherited::unix_listener(*fd)?),
    };
    let shutdown = Shutdown::install()?;
    // A frontend that truncates guest RAM under us ends its session, not the daemon; the
    // handler goes in before the sandbox, which does not allow installing it.
    ram_guard::install().map_err(StartError::RamGuard)?;
    // The only file the daemon touches after this is its own socket file, removed at exit.
    let socket_dir = match &frontends {
        Frontends::Bound(path, _) => path.parent(),
        Frontends::Inherited(..) | Frontends::Connection(_) => None,
    };
    sandbox::enter(sandbox, socket_dir)?;
    let result = match frontends {
        Frontends::Bound(path, listener) => {
            info!("listening on {}", path.display());
            notifier.ready(&format!("listening on {}", path.display()));
            let result = super::serve_listener(&listener, &shutdown, options, notifier);
            stopping(notifier, &result);
            let _ = std::fs::remove_file(path);
            result
        }
        Frontends::Inherited(fd, listener) => {
            info!("accepting frontends on inherited fd {fd}");
            notifier.ready(&format!("listening on inherited fd {fd}"));
            let result = super::serve_listener(&listener, &shutdown, options, notifier);
            stopping(notifier, &result);
            result
        }
        Frontends::Connection(stream) => {
            notifier.ready("serving the inherited connection");
            let result = super::serve_connection(stream, &shutdown, options);
            match result {
                Ok(Served::Ended) => notifier.stopping("the frontend left; exiting"),
                _ => stopping(notifier, &result),
            }
            result.map(|_| ())
        }
    };
    Ok(result?)
}

/// Tells the service manager that the daemon is on its way out, and why.
fn stopping<T>(notifier: &Notifier, result: &Result<T, DaemonError>) {
    match result {
        Ok(_) => notifier.stopping("shutting down"),
        Err(err) => notifier.stopping(&format!("failed: {}", crate::error_chain(err))),
    }
}

/// Binds the listening socket, replacing a stale socket file nobody listens on.
fn listen(path: &Path) -> Result<UnixListener, StartError> {
    let listen_error = |source| StartError::Listen {
        path: path.to_owned(),
        source,
    };
    match UnixListener::bind(path) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket {
                return Err(StartError::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(StartError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| StartError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
            UnixListener::bind(path).map_err(listen_error)
        }
        Err(e) => Err(listen_error(e)),
    }
}
