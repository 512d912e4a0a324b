//! The daemon as a `Type=notify` service sees it: the test plays the service manager with a
//! datagram socket named in `NOTIFY_SOCKET` (a path or an abstract `@name`), starts the real
//! binary (sandboxed, as always), and checks what arrives: `READY=1` once frontends can connect,
//! `STATUS=` lines as frontends come and go, `STOPPING=1` on SIGTERM, every datagram sent by the
//! daemon's own process (systemd's `NotifyAccess=main` drops the others). A `NOTIFY_SOCKET` the
//! daemon cannot use is logged and does not stop it from serving.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg, sockopt};
use viommu_protocol::{Frontend, FrontendReply, FrontendRequest};

const BIN: &str = env!("CARGO_BIN_EXE_viommu-backend");

/// A private directory for one test's sockets and logs, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("viommu-notify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The service manager's end: a datagram socket that records who sent each notification.
struct Manager {
    socket: UnixDatagram,
}

/// One notification: its sender's pid and its `KEY=value` lines.
#[derive(Debug)]
struct Notification {
    pid: i32,
    lines: Vec<String>,
}

impl Notification {
    fn has(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }

    fn status(&self) -> Option<&str> {
        self.lines.iter().find_map(|l| l.strip_prefix("STATUS="))
    }
}

impl Manager {
    fn bound_to(addr: &SocketAddr) -> Self {
        let socket = UnixDatagram::bind_addr(addr).expect("binding the manager's socket");
        // The kernel attaches the sender's credentials to every datagram, as systemd's
        // notification socket asks.
        sockopt::set_socket_passcred(&socket, true).expect("SO_PASSCRED");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        Self { socket }
    }

    fn at_path(path: &Path) -> Self {
        Self::bound_to(&SocketAddr::from_pathname(path).expect("a socket path"))
    }

    fn abstract_named(name: &str) -> Self {
        Self::bound_to(&SocketAddr::from_abstract_name(name.as_bytes()).expect("an abstract name"))
    }

    /// The next notification (fails after 10 s without one).
    fn next(&self) -> Notification {
        let mut buf = [0u8; 4096];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = recvmsg(
            &self.socket,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::empty(),
        )
        .unwrap_or_else(|e| panic!("no notification from the daemon within 10 s: {e}"));
        let pid = control
            .drain()
            .find_map(|message| match message {
                RecvAncillaryMessage::ScmCredentials(cred) => Some(cred.pid.as_raw_nonzero().get()),
                _ => None,
            })
            .expect("the sender's credentials");
        let bytes = buf.get(..received.bytes).expect("within the buffer");
        let text = std::str::from_utf8(bytes).expect("a UTF-8 notification");
        assert!(text.ends_with('\n'), "{text:?}");
        Notification {
            pid,
            lines: text.lines().map(str::to_owned).collect(),
        }
    }

    /// The next notification, which `child` must have sent.
    fn next_from(&self, child: &Child) -> Notification {
        let notification = self.next();
        assert_eq!(
            u32::try_from(notification.pid).ok(),
            Some(child.id()),
            "{notification:?} came from another process than the daemon"
        );
        notification
    }

    /// Asserts nothing arrives for a while.
    fn assert_quiet(&self, within: Duration) {
        self.socket
            .set_read_timeout(Some(within))
            .expect("a read timeout");
        let mut buf = [0u8; 4096];
        let got = self.socket.recv(&mut buf);
        self.socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a read timeout");
        if let Ok(n) = got {
            panic!(
                "unexpected notification {:?}",
                String::from_utf8_lossy(buf.get(..n).unwrap_or_default())
            );
        }
    }
}

fn spawn(args: &[&str], notify_socket: &str, log: &Path) -> Child {
    Command::new(BIN)
        .args(args)
        .env("NOTIFY_SOCKET", notify_socket)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(log).expect("the log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"))
}

/// Sends SIGTERM to `child` and waits at most 5 s for it to exit successfully.
fn terminate(child: &mut Child, log: &Path) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(sent.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the daemon") {
            assert!(status.success(), "{status:?}: {}", read(log));
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// A frontend speaking the protocol: GET_FEATURES is answered.
fn assert_serves(socket: &Path) {
    let frontend = Frontend::new(UnixStream::connect(socket).expect("connecting"));
    assert!(matches!(
        frontend.call(&FrontendRequest::GetFeatures),
        Ok(FrontendReply::Features(_))
    ));
}

/// `--socket-path` with `NOTIFY_SOCKET` a path: READY=1 comes once the socket takes
/// connections, the status follows frontends, and SIGTERM brings STOPPING=1.
#[test]
fn ready_status_and_stopping_over_a_notify_socket_path() {
    let dir = TempDir::new("path");
    let manager = Manager::at_path(&dir.path("notify"));
    let socket = dir.path("backend.sock");
    let log = dir.path("log");
    let mut child = spawn(
        &["--socket-path", socket.to_str().unwrap()],
        dir.path("notify").to_str().unwrap(),
        &log,
    );

    let ready = manager.next_from(&child);
    assert!(ready.has("READY=1"), "{ready:?}");
    assert_eq!(
        ready.status(),
        Some(format!("listening on {}", socket.display()).as_str()),
        "{ready:?}"
    );
    // Ready means ready: the first connection needs no retry.
    let frontend = Frontend::new(UnixStream::connect(&socket).unwrap());
    let serving = manager.next_from(&child);
    assert_eq!(
        serving.status(),
        Some("serving a frontend (connection 1)"),
        "{serving:?}"
    );
    assert!(!serving.has("READY=1"), "READY=1 is sent once: {serving:?}");
    frontend.call(&FrontendRequest::GetFeatures).unwrap();
    drop(frontend);
    let listening = manager.next_from(&child);
    assert_eq!(
        listening.status(),
        Some("listening; 1 frontend(s) served"),
        "{listening:?}"
    );

    assert_serves(&socket);
    assert_eq!(
        manager.next_from(&child).status(),
        Some("serving a frontend (connection 2)")
    );
    assert_eq!(
        manager.next_from(&child).status(),
        Some("listening; 2 frontend(s) served")
    );

    terminate(&mut child, &log);
    let stopping = manager.next_from(&child);
    assert!(stopping.has("STOPPING=1"), "{stopping:?}");
    assert_eq!(stopping.status(), Some("shutting down"));
    manager.assert_quiet(Duration::from_millis(100));
    assert!(!read(&log).contains("WARN"), "{}", read(&log));
}

/// systemd's way: the listening socket inherited (`--listen-fd`), `NOTIFY_SOCKET` an abstract
/// socket (`@name`). A bare connection, with no message sent yet, changes the status, and
/// SIGTERM with a frontend connected brings STOPPING=1.
#[test]
fn an_abstract_notify_socket_with_an_inherited_listener() {
    let dir = TempDir::new("abstract");
    let name = format!("viommu-notify-test-{}", std::process::id());
    let manager = Manager::abstract_named(&name);
    let path = dir.path("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).unwrap();
    let fd = listener.as_raw_fd().to_string();
    let log = dir.path("log");
    let mut child = spawn(&["--listen-fd", &fd], &format!("@{name}"), &log);
    drop(listener);

    let ready = manager.next_from(&child);
    assert!(ready.has("READY=1"), "{ready:?}");
    assert_eq!(
        ready.status(),
        Some(format!("listening on inherited fd {fd}").as_str())
    );
    let _connected = UnixStream::connect(&path).unwrap();
    assert_eq!(
        manager.next_from(&child).status(),
        Some("serving a frontend (connection 1)")
    );

    terminate(&mut child, &log);
    let stopping = manager.next_from(&child);
    assert!(stopping.has("STOPPING=1"), "{stopping:?}");
    manager.assert_quiet(Duration::from_millis(100));
}

/// libvirt's way (`--fd`): READY=1 at once, and STOPPING=1 when the one frontend leaves.
#[test]
fn an_inherited_connection_is_ready_at_once_and_stops_when_it_ends() {
    let dir = TempDir::new("fd");
    let manager = Manager::at_path(&dir.path("notify"));
    let (ours, theirs) = UnixStream::pair().unwrap();
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty()).unwrap();
    let log = dir.path("log");
    let mut child = spawn(
        &["--fd", &theirs.as_raw_fd().to_string()],
        dir.path("notify").to_str().unwrap(),
        &log,
    );
    drop(theirs);
    let ready = manager.next_from(&child);
    assert!(ready.has("READY=1"), "{ready:?}");
    assert_eq!(ready.status(), Some("serving the inherited connection"));
    let frontend = Frontend::new(ours);
    frontend.call(&FrontendRequest::GetFeatures).unwrap();
    drop(frontend);
    let stopping = manager.next_from(&child);
    assert!(stopping.has("STOPPING=1"), "{stopping:?}");
    assert_eq!(stopping.status(), Some("the frontend left; exiting"));
    assert!(child.wait().unwrap().success(), "{}", read(&log));
}

/// A `NOTIFY_SOCKET` nobody listens on, or that is no address at all, is a warning in the log;
/// the daemon serves frontends and stops on SIGTERM as without it.
#[test]
fn an_unusable_notify_socket_does_not_stop_the_daemon() {
    let dir = TempDir::new("bogus");
    for (case, value) in [
        ("missing", "/nonexistent-dir/notify"),
        ("nobody", dir.path("nobody-listens").to_str().unwrap()),
        ("relative", "run/notify"),
    ] {
        if case == "nobody" {
            // A socket file whose listener is gone: connecting is refused.
            drop(UnixDatagram::bind(dir.path("nobody-listens")).unwrap());
        }
        let socket = dir.path(&format!("{case}.sock"));
        let log = dir.path(&format!("{case}.log"));
        let mut child = spawn(&["--socket-path", socket.to_str().unwrap()], value, &log);
        let start = Instant::now();
        while !read(&log).contains("listening on") {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{case}: the daemon did not start: {}",
                read(&log)
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "{case}: the daemon exited: {}",
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = read(&log);
        assert!(
            text.contains("WARN") && text.contains("not notifying the service manager"),
            "{case}: {text}"
        );
        assert!(
            text.contains(value),
            "{case}: the warning names the address: {text}"
        );
        assert_serves(&socket);
        assert_serves(&socket);
        terminate(&mut child, &log);
    }
}

/// Without `NOTIFY_SOCKET` the daemon notifies nobody and says nothing about it.
#[test]
fn without_a_notify_socket_nothing_is_said() {
    let dir = TempDir::new("none");
    let socket = dir.path("backend.sock");
    let log = dir.path("log");
    let mut child = Command::new(BIN)
        .args(["--socket-path", socket.to_str().unwrap()])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !read(&log).contains("listening on") {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", read(&log));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_serves(&socket);
    terminate(&mut child, &log);
    let text = read(&log);
    assert!(!text.contains("service manager"), "{text}");
}
