//! The shipped units (contrib/systemd) under a real systemd: socket activation, `Type=notify`
//! readiness and status, and the daemon coming back by itself on the same listening socket after
//! `systemctl kill -s KILL` (`Restart=on-failure`; the socket unit keeps the socket).
//!
//! It runs where a service manager answers: the system manager when this is root on a machine
//! booted with systemd, else the calling user's manager (`systemctl --user`). Elsewhere it says
//! `SKIPPED:` and passes, unless `VIOMMU_REQUIRE_SYSTEMD=1`, which makes that a failure
//! (contrib/check.sh starts a private user manager and sets it). `VIOMMU_SYSTEMD_SCOPE=system`
//! or `user` picks the manager.
//!
//! The units are installed as a renamed copy for this run only (`viommu-backend-t<pid>@`), with
//! the binary just built (copied where a sandboxed service can execute it), the socket in a
//! private directory and no `SocketUser` (the test connects as itself). A user manager can
//! neither switch users nor reach its notification socket under `$XDG_RUNTIME_DIR` through
//! `ProtectHome`/`PrivateTmp`, so for it a drop-in turns `DynamicUser`, `ProtectHome` and
//! `PrivateTmp` off; every other directive is the shipped one.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use viommu_protocol::{Frontend, FrontendReply, FrontendRequest};

const BIN: &str = env!("CARGO_BIN_EXE_viommu-backend");
const CONTRIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/systemd");
const INSTANCE: &str = "vm1-smmu0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    System,
    User,
}

impl Scope {
    fn systemctl(self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("systemctl");
        if self == Scope::User {
            cmd.arg("--user");
        }
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run systemctl: {e}"))
    }

    /// Runs systemctl and fails the test if it fails.
    fn must(self, args: &[&str]) {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether this manager answers.
    fn usable(self) -> bool {
        let out = match Command::new("systemctl")
            .args((self == Scope::User).then_some("--user"))
            .args(["show", "--property=Version", "--value"])
            .output()
        {
            Ok(out) => out,
            Err(_) => return false,
        };
        out.status.success() && !out.stdout.trim_ascii().is_empty()
    }

    /// One property of a unit.
    fn property(self, unit: &str, name: &str) -> String {
        let out = self.systemctl(&["show", &format!("--property={name}"), "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `systemctl status` of the units, for a failure message.
    fn status(self, units: &[&str]) -> String {
        let mut args = vec!["status", "--no-pager", "--full", "--lines=20"];
        args.extend(units);
        let out = self.systemctl(&args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The manager to run the units under, or why there is none.
fn manager() -> Result<Scope, String> {
    match std::env::var("VIOMMU_SYSTEMD_SCOPE").as_deref() {
        Ok("system") => return Ok(Scope::System),
        Ok("user") => return Ok(Scope::User),
        _ => {}
    }
    if Path::new("/run/systemd/system").exists() && is_root() && Scope::System.usable() {
        return Ok(Scope::System);
    }
    if Scope::User.usable() {
        return Ok(Scope::User);
    }
    if Path::new("/run/systemd/system").exists() {
        Err("not root, and no user manager answers `systemctl --user`".to_owned())
    } else {
        Err(
            "this machine was not booted with systemd (no /run/systemd/system), and no user \
             manager answers `systemctl --user`"
                .to_owned(),
        )
    }
}

/// The renamed units of this run, installed; removed again on drop.
struct Installed {
    scope: Scope,
    prefix: String,
    unit_dir: PathBuf,
    work: PathBuf,
}

impl Installed {
    fn new(scope: Scope) -> Self {
        let prefix = format!("viommu-backend-t{}", std::process::id());
        let (unit_dir, runtime) = match scope {
            Scope::System => (PathBuf::from("/run/systemd/system"), PathBuf::from("/run")),
            Scope::User => {
                let runtime = PathBuf::from(
                    std::env::var_os("XDG_RUNTIME_DIR")
                        .expect("XDG_RUNTIME_DIR for a user manager"),
                );
                (runtime.join("systemd/user"), runtime)
            }
        };
        let work = runtime.join(&prefix);
        let installed = Self {
            scope,
            prefix,
            unit_dir,
            work,
        };
        installed.install().expect("installing the units");
        installed
    }

    fn service(&self) -> String {
        format!("{}@{INSTANCE}.service", self.prefix)
    }

    fn socket_unit(&self) -> String {
        format!("{}@{INSTANCE}.socket", self.prefix)
    }

    fn socket_path(&self) -> PathBuf {
        self.work.join(format!("{INSTANCE}.sock"))
    }

    fn install(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.work)?;
        std::fs::set_permissions(&self.work, std::fs::Permissions::from_mode(0o755))?;
        // A copy the service can execute wherever the build tree is (ProtectHome, DynamicUser).
        let binary = self.work.join("viommu-backend");
        std::fs::copy(BIN, &binary)?;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
        std::fs::create_dir_all(&self.unit_dir)?;

        let read = |name: &str| std::fs::read_to_string(Path::new(CONTRIB).join(name));
        let rename = |text: String| text.replace("viommu-backend@", &format!("{}@", self.prefix));
        let service = rename(read("viommu-backend@.service")?).replace(
            "ExecStart=/usr/bin/viommu-backend ",
            &format!("ExecStart={} ", binary.display()),
        );
        assert!(service.contains(&format!("ExecStart={} ", binary.display())));
        let socket: String = rename(read("viommu-backend@.socket")?)
            .lines()
            .filter(|l| !l.starts_with("SocketUser=") && !l.starts_with("SocketGroup="))
            .map(|l| {
                if l.starts_with("ListenStream=") {
                    format!("ListenStream={}/%i.sock\n", self.work.display())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(
            self.unit_dir.join(format!("{}@.service", self.prefix)),
            service,
        )?;
        std::fs::write(
            self.unit_dir.join(format!("{}@.socket", self.prefix)),
            socket,
        )?;
        if self.scope == Scope::User {
            let dropins = self.unit_dir.join(format!("{}@.service.d", self.prefix));
            std::fs::create_dir_all(&dropins)?;
            std::fs::write(
                dropins.join("user-manager.conf"),
                "# A user manager cannot switch users, and its notification socket lives under\n\
                 # $XDG_RUNTIME_DIR, which ProtectHome (/run/user) or PrivateTmp may hide.\n\
                 [Service]\nDynamicUser=no\nProtectHome=no\nPrivateTmp=no\n",
            )?;
        }
        self.scope.must(&["daemon-reload"]);
        Ok(())
    }

    /// Waits until `done` holds for the service, at most `limit`.
    fn wait_service(&self, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}:\n{}",
                self.scope.status(&[&self.service(), &self.socket_unit()])
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn service_property(&self, name: &str) -> String {
        self.scope.property(&self.service(), name)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let (service, socket) = (self.service(), self.socket_unit());
        let _ = self.scope.systemctl(&["stop", &service, &socket]);
        let _ = self.scope.systemctl(&["reset-failed", &service, &socket]);
        for name in ["@.service", "@.socket"] {
            let _ = std::fs::remove_file(self.unit_dir.join(format!("{}{name}", self.prefix)));
        }
        let _ = std::fs::remove_dir_all(self.unit_dir.join(format!("{}@.service.d", self.prefix)));
        let _ = self.scope.systemctl(&["daemon-reload"]);
        // The template's slice, which the manager keeps after its last instance.
        let slice = format!(
            "{}-{}.slice",
            if self.scope == Scope::User {
                "app"
            } else {
                "system"
            },
            self.prefix.replace('-', "\\x2d")
        );
        let _ = self.scope.systemctl(&["stop", &slice]);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// A frontend's GET_FEATURES over a new connection (the first one starts the service).
fn get_features(units: &Installed) -> Frontend {
    let socket = units.socket_path();
    let status = || {
        units
            .scope
            .status(&[&units.service(), &units.socket_unit()])
    };
    let stream = UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}\n{}", socket.display(), status()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let frontend = Frontend::new(stream);
    match frontend.call(&FrontendRequest::GetFeatures) {
        Ok(FrontendReply::Features(_)) => frontend,
        other => panic!("GET_FEATURES: {other:?}\n{}", status()),
    }
}

#[test]
fn a_killed_daemon_comes_back_on_the_same_socket() {
    let scope = match manager() {
        Ok(scope) => scope,
        Err(why) => {
            let required = std::env::var("VIOMMU_REQUIRE_SYSTEMD").is_ok_and(|v| v == "1");
            assert!(!required, "VIOMMU_REQUIRE_SYSTEMD=1, but {why}");
            eprintln!("SKIPPED: the units under a real systemd: {why}");
            println!("SKIPPED: the units under a real systemd: {why}");
            return;
        }
    };
    println!("running the units under the {scope:?} manager");
    let units = Installed::new(scope);
    let (service, socket_unit) = (units.service(), units.socket_unit());
    let socket = units.socket_path();

    // The socket unit creates the socket; nothing runs yet.
    scope.must(&["start", &socket_unit]);
    assert!(socket.exists(), "{}", scope.status(&[&socket_unit]));
    assert_eq!(units.service_property("ActiveState"), "inactive");
    let listening = std::fs::metadata(&socket).unwrap().ino();

    // The first connection starts the daemon, which is active once it said READY=1, and says
    // what it does.
    let frontend = get_features(&units);
    assert_eq!(units.service_property("Type"), "notify");
    assert_eq!(units.service_property("NotifyAccess"), "main");
    units.wait_service(Duration::from_secs(10), "active and serving", |u| {
        u.service_property("ActiveState") == "active"
            && u.service_property("StatusText") == "serving a frontend (connection 1)"
    });
    let first = units.service_property("MainPID");
    assert_ne!(first, "0");

    // kill -9: the connection dies, the service comes back by itself with a new process on
    // the same listening socket, which the socket unit kept open.
    scope.must(&["kill", "--signal=KILL", &service]);
    assert!(
        frontend.call(&FrontendRequest::GetFeatures).is_err(),
        "the killed daemon's connection is gone"
    );
    drop(frontend);
    units.wait_service(Duration::from_secs(10), "restarted", |u| {
        u.service_property("ActiveState") == "active"
            && !matches!(u.service_property("MainPID").as_str(), "0" | "")
            && u.service_property("MainPID") != first
    });
    assert_eq!(units.service_property("NRestarts"), "1");
    assert_eq!(
        units.service_property("StatusText"),
        "listening on inherited fd 3"
    );
    assert_eq!(scope.property(&socket_unit, "ActiveState"), "active");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().ino(),
        listening,
        "the same socket file"
    );

    // QEMU's reconnect: the new daemon serves it.
    let again = get_features(&units);
    units.wait_service(Duration::from_secs(10), "serving again", |u| {
        u.service_property("StatusText") == "serving a frontend (connection 1)"
    });
    drop(again);
    units.wait_service(Duration::from_secs(10), "listening again", |u| {
        u.service_property("StatusText") == "listening; 1 frontend(s) served"
    });

    // systemctl stop: SIGTERM, STOPPING=1, a clean exit (no failure, no restart), and the
    // socket goes with its unit.
    scope.must(&["stop", &service, &socket_unit]);
    assert_eq!(units.service_property("ActiveState"), "inactive");
    assert_eq!(units.service_property("Result"), "success");
    assert!(!socket.exists(), "RemoveOnStop removes the socket");
}
