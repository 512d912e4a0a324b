//! The daemon binary as a management layer starts it: options, exit codes, `--fd` and
//! `--socket-path` sessions, and a hostile frontend that must not take the daemon down.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use viommu_protocol::{Error, Features, Frontend, FrontendReply, FrontendRequest, Status};

const BIN: &str = env!("CARGO_BIN_EXE_viommu-backend");

fn connect_retry(path: &std::path::Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

#[test]
fn print_capabilities_prints_json_and_exits_zero() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], "viommu-smmuv3");
    let features = caps["features"].as_array().unwrap();
    assert!(features.contains(&"translate".into()), "{caps}");
    assert_eq!(caps["model"]["max-oas-bits"], 48);
    assert_eq!(caps["model"]["features"].as_array().unwrap().len(), 5);

    // The model options show in the capabilities.
    let out = Command::new(BIN)
        .args([
            "--print-capabilities",
            "--max-oas-bits",
            "44",
            "--disable-feature",
            "stage2",
            "--disable-feature",
            "ats",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["model"]["max-oas-bits"], 44);
    assert_eq!(
        caps["model"]["features"],
        serde_json::json!(["stage1", "ril", "msi"])
    );
}

#[test]
fn bad_invocations_fail_early_with_a_message() {
    let cases: [(&[&str], &str); 4] = [
        (&[], "one of --socket-path, --fd or --listen-fd is required"),
        (&["--fd", "1"], "stdin, stdout and stderr"),
        (&["--fd", "987"], "not an open file descriptor"),
        (
            &["--socket-path", "/nonexistent-dir/x.sock"],
            "cannot listen on /nonexistent-dir/x.sock",
        ),
    ];
    for (args, message) in cases {
        let out = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let out = Command::new(BIN)
        .args(["--socket-path", "a", "--fd", "3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses both");
    let out = Command::new(BIN)
        .args(["--socket-path", "x.sock", "--busy-poll-us", "20000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a busy-poll window past 10 ms");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--busy-poll-us"));
}

/// libvirt's way: one end of a socketpair inherited as `--fd N`.
#[test]
fn serves_an_inherited_connected_socket() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty()).unwrap();
    let fd = theirs.as_raw_fd();
    let mut child = Command::new(BIN)
        .args(["--fd", &fd.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(theirs);
    let frontend = Frontend::new(ours);
    let offer = frontend.call(&FrontendRequest::GetFeatures).unwrap();
    assert!(matches!(offer, FrontendReply::Features(_)));
    frontend
        .call(&FrontendRequest::SetFeatures(Features::empty()))
        .unwrap();
    drop(frontend);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the daemon ends cleanly when its --fd peer hangs up"
    );
}

/// The daemon listening on `socket`, its log discarded.
fn spawn_quiet_on(socket: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .arg("--socket-path")
        .arg(socket)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"))
}

#[test]
fn a_hostile_frontend_does_not_stop_the_daemon() {
    let dir = std::env::temp_dir().join(format!("viommu-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    let mut child = spawn_quiet_on(&socket);

    // Garbage: a header with a bad version. The daemon closes this connection.
    let mut s = connect_retry(&socket);
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0x02, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let frontend = Frontend::new(s);
    assert!(
        frontend
            .call(&FrontendRequest::GetFeatures)
            .unwrap_err()
            .is_fatal()
    );

    // Out of order: SET_CONFIG before SET_FEATURES is BAD_STATE, and the connection goes on.
    let frontend = Frontend::new(connect_retry(&socket));
    let cfg = viommu_protocol::ModelConfig {
        flags: viommu_protocol::types::ConfigFlags::STAGE1,
        oas_bits: 44,
        ssid_bits: 0,
        sid_bits: 16,
        cmdq_log2: 19,
        evtq_log2: 19,
    };
    match frontend.call(&FrontendRequest::SetConfig(cfg)) {
        Err(Error::Remote {
            status, message, ..
        }) => {
            assert_eq!(status, Status::BAD_STATE);
            assert_eq!(message, "SET_CONFIG not allowed in state CONNECTED");
        }
        other => panic!("{other:?}"),
    }
    // Feature bits this protocol version does not define are refused, and the connection
    // goes on.
    let err = frontend
        .call(&FrontendRequest::SetFeatures(Features::from_bits_retain(
            1 << 20,
        )))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Remote {
                status: Status::INVALID_MESSAGE,
                ..
            }
        ),
        "{err:?}"
    );
    frontend
        .call(&FrontendRequest::SetFeatures(Features::empty()))
        .unwrap();
    drop(frontend);

    // A peer that vanishes mid-message.
    let mut s = connect_retry(&socket);
    s.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
    drop(s);

    // The daemon still serves the next frontend.
    let frontend = Frontend::new(connect_retry(&socket));
    assert!(frontend.call(&FrontendRequest::GetFeatures).is_ok());
    assert!(matches!(child.try_wait(), Ok(None)), "daemon still running");
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends SIGTERM to `child` and waits for it to exit, at most `limit` (else fails with `why`).
fn terminate(child: &mut std::process::Child, limit: Duration, why: &str) -> ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(sent.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the daemon") {
            return status;
        }
        assert!(start.elapsed() < limit, "{why}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM ends the daemon promptly and cleanly, with a frontend connected or not, and the
/// socket file goes with it.
#[test]
fn sigterm_ends_the_daemon_promptly_and_cleanly() {
    for connected in [false, true] {
        let dir = std::env::temp_dir().join(format!(
            "viommu-cli-term-{}-{connected}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s.sock");
        let mut child = spawn_quiet_on(&socket);
        let frontend = Frontend::new(connect_retry(&socket));
        frontend.call(&FrontendRequest::GetFeatures).unwrap();
        if !connected {
            drop(frontend);
            // The daemon is listening again once a new connection is answered.
            let again = Frontend::new(connect_retry(&socket));
            again.call(&FrontendRequest::GetFeatures).unwrap();
            drop(again);
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = terminate(
            &mut child,
            Duration::from_secs(5),
            "the daemon ignored SIGTERM",
        );
        assert!(status.success(), "connected {connected}: {status:?}");
        assert!(!socket.exists(), "the socket file is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// SIGTERM takes effect at once even while the daemon waits for a frontend: one that stopped
/// in the middle of a message, and one that does not acknowledge a backend-channel request.
/// Both waits would last the peer timeout (5 s) otherwise (issue 12, defect 6).
#[test]
fn sigterm_cuts_a_wait_for_the_frontend_short() {
    for case in ["mid-message", "backend-channel"] {
        let dir = std::env::temp_dir().join(format!(
            "viommu-cli-term-wait-{}-{case}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s.sock");
        let mut child = spawn_quiet_on(&socket);
        let stream = connect_retry(&socket);
        let frontend = Frontend::new(stream.try_clone().unwrap());
        frontend.call(&FrontendRequest::GetFeatures).unwrap();
        // Kept open: the daemon waits on it without an answer.
        let mut _unanswered = None;
        if case == "mid-message" {
            // Six bytes of a twelve-byte header, then nothing.
            (&stream).write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
        } else {
            frontend
                .call(&FrontendRequest::SetFeatures(
                    Features::BACKEND_CHANNEL | Features::TRANSLATE,
                ))
                .unwrap();
            let (ours, theirs) = UnixStream::pair().unwrap();
            frontend
                .call(&FrontendRequest::SetBackendChannel(theirs))
                .unwrap();
            _unanswered = Some(ours);
            frontend
                .call(&FrontendRequest::SetConfig(viommu_protocol::ModelConfig {
                    flags: viommu_protocol::ConfigFlags::STAGE1,
                    oas_bits: 44,
                    ssid_bits: 16,
                    sid_bits: 16,
                    cmdq_log2: 19,
                    evtq_log2: 19,
                }))
                .unwrap();
            // ATTACH_DEVICE: the daemon announces the device's address space and waits for the
            // acknowledgement that never comes. Sent without waiting for its reply.
            let attach = viommu_protocol::AttachDevice {
                handle: 1,
                sid: 8,
                passthrough: None,
            };
            let waiter = {
                let frontend = Frontend::new(stream.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = frontend.call(&FrontendRequest::AttachDevice(attach));
                })
            };
            std::thread::sleep(Duration::from_millis(300));
            drop(waiter);
        }
        std::thread::sleep(Duration::from_millis(100));
        let status = terminate(
            &mut child,
            Duration::from_secs(4),
            &format!("{case}: SIGTERM waited for the frontend's timeout"),
        );
        assert!(status.success(), "{case}: {status:?}");
        assert!(!socket.exists(), "{case}: the socket file is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// SIGUSR1 logs one status line: the session's state, devices and counters (or that nobody is
/// connected), and the daemon goes on.
#[test]
fn sigusr1_logs_a_status_line() {
    let dir = std::env::temp_dir().join(format!("viommu-cli-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("s.sock");
    let log_path = dir.join("log");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    let wait_log = |needle: &str| {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap();
            if log.contains(needle) {
                return log;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no '{needle}' in {log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let frontend = Frontend::new(connect_retry(&socket));
    frontend
        .call(&FrontendRequest::SetFeatures(Features::TRANSLATE))
        .unwrap();
    signal("-USR1");
    let log = wait_log("status: state NEGOTIATED");
    assert!(log.contains("0 device(s)"), "{log}");
    drop(frontend);
    wait_log("frontend disconnected");
    signal("-USR1");
    wait_log("status: no frontend connected");
    assert!(matches!(child.try_wait(), Ok(None)), "still running");
    signal("-TERM");
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped man page is what the CLI generates (regenerate with
/// `cargo run -p viommu-backend -- --print-man-page > contrib/man/viommu-backend.8`).
#[test]
fn the_man_page_is_current() {
    let out = Command::new(BIN).arg("--print-man-page").output().unwrap();
    assert!(out.status.success());
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/man/viommu-backend.8"
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        shipped,
        "contrib/man/viommu-backend.8 is stale: regenerate it with \
         `cargo run -p viommu-backend -- --print-man-page > contrib/man/viommu-backend.8`"
    );
    assert!(shipped.contains("SIGUSR1"));
}

/// systemd's way: a listening socket inherited as `--listen-fd N` (socket activation). The
/// daemon serves frontends on it one after another; a connected socket there is refused.
#[test]
fn serves_an_inherited_listening_socket() {
    let dir = std::env::temp_dir().join(format!("viommu-cli-listen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).unwrap();
    let fd = listener.as_raw_fd();
    let mut child = Command::new(BIN)
        .args(["--listen-fd", &fd.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    for _ in 0..2 {
        let frontend = Frontend::new(connect_retry(&path));
        assert!(matches!(
            frontend.call(&FrontendRequest::GetFeatures).unwrap(),
            FrontendReply::Features(_)
        ));
    }
    assert!(matches!(child.try_wait(), Ok(None)), "still serving");
    child.kill().unwrap();
    child.wait().unwrap();

    let (_ours, theirs) = UnixStream::pair().unwrap();
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty()).unwrap();
    let out = Command::new(BIN)
        .args(["--listen-fd", &theirs.as_raw_fd().to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a listening socket"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sandbox: under enforce a system call outside the allowlist kills the daemon (SIGSYS);
/// under log and off it goes through. (Every other test runs the daemon under enforce, the
/// default, through whole sessions.)
#[test]
fn the_sandbox_refuses_a_forbidden_system_call() {
    use std::os::unix::process::ExitStatusExt;
    let run = |mode: &str| {
        Command::new(BIN)
            .args(["--sandbox-selftest", "--sandbox", mode])
            .stderr(Stdio::null())
            .output()
            .unwrap()
    };
    let enforced = run("enforce");
    assert_eq!(
        enforced.status.signal(),
        Some(31),
        "killed by SIGSYS: {enforced:?}"
    );
    assert!(
        enforced.stdout.is_empty(),
        "the forbidden call never returned"
    );
    for mode in ["log", "off"] {
        let out = run(mode);
        assert!(out.status.success(), "{mode}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("gave Ok("),
            "{mode}: {out:?}"
        );
    }
    let out = Command::new(BIN)
        .args(["--socket-path", "x.sock", "--sandbox", "strict"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a sandbox mode"));
}
