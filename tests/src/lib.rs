//! The mock QEMU peer: the frontend side of the vIOMMU-user protocol as QEMU would drive it.
//!
//! Today it connects and negotiates features; the scripted guest, guest RAM, IRQ eventfds and
//! the backend channel come with the daemon issue.

pub mod guest;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use viommu_protocol::{Features, Frontend, FrontendReply, FrontendRequest};

/// Features the mock frontend knows how to use.
pub const FRONTEND_FEATURES: Features = Features::all();

/// A frontend connection as QEMU's `viommu-user` object holds it.
#[derive(Debug)]
pub struct MockQemu {
    main: Frontend,
    features: Features,
}

impl MockQemu {
    /// Connects to a backend listening on `path`, retrying until `timeout` (QEMU's
    /// `reconnect-ms` behaviour for a backend that is still starting).
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(Self::from_stream(stream)),
                Err(e) if start.elapsed() < timeout => {
                    log::debug!("connect {}: {e}; retrying", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot connect to {}", path.display()));
                }
            }
        }
    }

    /// Uses an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        Self {
            main: Frontend::new(stream),
            features: Features::empty(),
        }
    }

    /// The main-channel connection.
    pub fn frontend(&self) -> &Frontend {
        &self.main
    }

    /// GET_FEATURES then SET_FEATURES with what both sides know. Returns the negotiated set.
    pub fn negotiate(&mut self) -> anyhow::Result<Features> {
        let offer = match self.main.call(&FrontendRequest::GetFeatures)? {
            FrontendReply::Features(f) => f,
            other => bail!("GET_FEATURES answered with {other:?}"),
        };
        let wanted = offer & FRONTEND_FEATURES;
        self.main.call(&FrontendRequest::SetFeatures(wanted))?;
        self.features = wanted;
        Ok(wanted)
    }
}

/// A `viommu-backend` process started for a test or the demo, killed on drop.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    socket: PathBuf,
}

impl BackendProcess {
    /// Starts `binary --socket-path socket`.
    pub fn spawn(binary: &Path, socket: &Path) -> anyhow::Result<Self> {
        let child = Command::new(binary)
            .arg("--socket-path")
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self {
            child,
            socket: socket.to_owned(),
        })
    }

    /// The socket the backend listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The `viommu-backend` binary next to the running executable (both live in cargo's target
/// directory), or `$VIOMMU_BACKEND`.
pub fn backend_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("VIOMMU_BACKEND") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_owned();
    // Test binaries run from target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join("viommu-backend");
    if candidate.exists() {
        Ok(candidate)
    } else {
        bail!(
            "{} not found: build it with `cargo build -p viommu-backend` or set VIOMMU_BACKEND",
            candidate.display()
        )
    }
}
