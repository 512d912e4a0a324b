//! The `viommu-backend` daemon.
//!
//! Command line per QEMU's backend program conventions (docs/interop/vhost-user.rst, "Backend
//! program conventions"): `--socket-path` or `--fd`, `--print-capabilities`; it never
//! daemonizes and exits promptly on SIGTERM.

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{ArgGroup, Parser};
use log::{error, info};
use viommu_backend::inherited;
use viommu_backend::session::{self, OFFERED_FEATURES};

/// Out-of-process virtual ARM SMMUv3 for QEMU, speaking the vIOMMU-user protocol.
#[derive(Debug, Parser)]
#[command(version, about, group(ArgGroup::new("socket").args(["socket_path", "fd"])))]
struct Args {
    /// Listen on this Unix socket path and serve one frontend at a time, listening again after
    /// each disconnect. Example: --socket-path /run/viommu/vm1-smmu0.sock
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,

    /// Serve the already connected Unix stream socket inherited as this file descriptor (one
    /// end of a socketpair made by the management layer), then exit. Example: --fd 3
    #[arg(long, value_name = "FDNUM")]
    fd: Option<RawFd>,

    /// Print the backend's capabilities as JSON on stdout and exit.
    #[arg(long)]
    print_capabilities: bool,

    /// Log level: error, warn, info, debug or trace (RUST_LOG, if set, takes precedence).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_capabilities {
        println!("{}", capabilities());
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_default_env()
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The capabilities document: type and the protocol features this build offers.
fn capabilities() -> String {
    let features: Vec<String> = OFFERED_FEATURES
        .iter_names()
        .map(|(name, _)| format!("\"{}\"", name.to_lowercase()))
        .collect();
    format!(
        "{{\"type\": \"viommu-smmuv3\", \"features\": [{}]}}",
        features.join(", ")
    )
}

fn run(args: &Args) -> anyhow::Result<()> {
    match (&args.socket_path, args.fd) {
        (Some(path), None) => listen(path),
        (None, Some(fd)) => {
            let stream = inherited::unix_stream(fd)?;
            session::serve(stream).context("session failed")
        }
        _ => bail!("one of --socket-path or --fd is required (see --help)"),
    }
}

fn listen(path: &PathBuf) -> anyhow::Result<()> {
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    info!("listening on {}", path.display());
    loop {
        let (stream, _) = listener.accept().context("accept failed")?;
        info!("frontend connected");
        if let Err(err) = session::serve(stream) {
            error!("session ended: {}", session::error_chain(&err));
        }
    }
}
