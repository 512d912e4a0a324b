//! The service manager's notification protocol (sd_notify(3)): started by systemd with
//! `Type=notify`, the daemon finds `NOTIFY_SOCKET` in its environment and tells the manager
//! `READY=1` once it accepts frontends, a one-line `STATUS=` as frontends come and go, and
//! `STOPPING=1` when it shuts down.
//!
//! The socket is connected once, before the sandbox is entered (connecting takes `socket` and
//! `connect`, which the seccomp allowlist does not have), and kept: each notification after
//! that is one datagram on the connected socket, which std sends with `write(2)`, a system call
//! the allowlist has anyway. It is non-blocking, so a manager that does not read can cost a
//! status line but never stall the event loop. A `NOTIFY_SOCKET` that cannot be used is logged
//! and otherwise ignored: the daemon serves frontends all the same.

use std::cell::Cell;
use std::ffi::{OsStr, OsString};
use std::io;
#[cfg(target_os = "linux")]
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use log::{debug, warn};

/// The environment variable the manager names its socket in.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why the notification socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Neither an absolute path nor `@` and an abstract socket name.
    #[error(
        "{NOTIFY_SOCKET}={0:?} is neither an absolute path nor an abstract socket name (@NAME)"
    )]
    Address(OsString),
    /// The address is well-formed but cannot be reached.
    #[error("cannot connect to {NOTIFY_SOCKET}={address:?}")]
    Connect {
        /// The address.
        address: OsString,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The connection to the service manager, or none (no `NOTIFY_SOCKET`, or an unusable one).
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<UnixDatagram>,
    /// Whether a failed send was logged as a warning already (later ones go to debug).
    warned: Cell<bool>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Connects to the manager's socket: an absolute path, or `@NAME` for an abstract one.
    pub fn connect(address: &OsStr) -> Result<Self, NotifyError> {
        let bytes = address.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(address),
            #[cfg(target_os = "linux")]
            Some(b'@') => SocketAddr::from_abstract_name(bytes.get(1..).unwrap_or_default()),
            _ => return Err(NotifyError::Address(address.to_owned())),
        };
        let connect_error = |source| NotifyError::Connect {
            address: address.to_owned(),
            source,
        };
        let addr = addr.map_err(connect_error)?;
        let socket = UnixDatagram::unbound().map_err(connect_error)?;
        socket.connect_addr(&addr).map_err(connect_error)?;
        socket.set_nonblocking(true).map_err(connect_error)?;
        Ok(Self {
            socket: Some(socket),
            warned: Cell::new(false),
        })
    }

    /// The notifier for the `NOTIFY_SOCKET` value the daemon started with: none without one,
    /// and none (with a warning) for one that cannot be used.
    pub fn from_env_value(value: Option<&OsStr>) -> Self {
        let Some(address) = value else {
            return Self::disabled();
        };
        match Self::connect(address) {
            Ok(notifier) => notifier,
            Err(err) => {
                warn!(
                    "not notifying the service manager: {}",
                    crate::error_chain(&err)
                );
                Self::disabled()
            }
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_connected(&self) -> bool {
        self.socket.is_some()
    }

    /// `READY=1` with the status line: the daemon accepts frontends.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// A new status line.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}\n", one_line(status)));
    }

    /// `STOPPING=1` with the status line: the daemon is shutting down.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
    }

    /// Sends one notification datagram. A failure is logged (the first as a warning), never
    /// returned: the manager's bookkeeping must not stop the daemon from serving.
    fn send(&self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        match socket.send(message.as_bytes()) {
            Ok(n) if n == message.len() => {}
            Ok(n) => self.failed(&format!("{n} of {} bytes sent", message.len())),
            Err(err) => self.failed(&err.to_string()),
        }
    }

    fn failed(&self, why: &str) {
        if self.warned.replace(true) {
            debug!("cannot notify the service manager: {why}");
        } else {
            warn!("cannot notify the service manager: {why}");
        }
    }
}

/// `text` as one line of at most 200 characters (a status is one `KEY=value` line).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        for bad in ["", "relative/notify", "vsock:2:1234"] {
            assert!(
                matches!(
                    Notifier::connect(OsStr::new(bad)),
                    Err(NotifyError::Address(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Notifier::connect(OsStr::new("/nonexistent-dir/notify")),
            Err(NotifyError::Connect { .. })
        ));
        assert!(!Notifier::from_env_value(Some(OsStr::new("nowhere"))).is_connected());
        assert!(!Notifier::from_env_value(None).is_connected());
    }

    #[test]
    fn notifications_are_datagrams_of_key_value_lines() {
        let name = format!("viommu-notify-unit-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let manager = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::connect(OsStr::new(&format!("@{name}"))).unwrap();
        assert!(notifier.is_connected());
        let mut buf = [0u8; 512];
        let mut next = || {
            let n = manager.recv(&mut buf).unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        };
        notifier.ready("listening");
        assert_eq!(next(), "READY=1\nSTATUS=listening\n");
        notifier.status("two\nlines");
        assert_eq!(next(), "STATUS=two lines\n");
        notifier.stopping("shutting down");
        assert_eq!(next(), "STOPPING=1\nSTATUS=shutting down\n");
        // The manager going away costs nothing but a log line.
        drop(manager);
        notifier.status("nobody listens");
        notifier.status("still nobody");
    }
}
