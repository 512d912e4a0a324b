//! `mock-qemu`: plays QEMU against a `viommu-backend`.
//!
//! With no arguments it starts the backend built next to it on a private socket and runs the
//! demo session; `--socket PATH` talks to a backend that is already listening.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use viommu_protocol::{FrontendRequest, ModelConfig, types::ConfigFlags};
use viommu_tests::{BackendProcess, MockQemu, backend_binary};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mock-qemu: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (socket, spawned) = match (args.next().as_deref(), args.next()) {
        (Some("--socket"), Some(path)) => (PathBuf::from(path), None),
        (None, _) => {
            let dir = std::env::temp_dir().join(format!("mock-qemu-{}", std::process::id()));
            std::fs::create_dir_all(&dir).context("cannot create a socket directory")?;
            let socket = dir.join("viommu.sock");
            let backend = BackendProcess::spawn(&backend_binary()?, &socket)?;
            println!("started viommu-backend on {}", socket.display());
            (socket, Some((backend, dir)))
        }
        _ => anyhow::bail!("usage: mock-qemu [--socket PATH]"),
    };
    let mut qemu = MockQemu::connect(&socket, Duration::from_secs(5))?;
    let features = qemu.negotiate().context("feature negotiation failed")?;
    println!("negotiated features: {features:?}");
    let config = ModelConfig {
        flags: ConfigFlags::STAGE1 | ConfigFlags::RIL,
        oas_bits: 44,
        ssid_bits: 16,
        sid_bits: 16,
        cmdq_log2: 19,
        evtq_log2: 19,
    };
    match qemu.frontend().call(&FrontendRequest::SetConfig(config)) {
        Ok(_) => println!("SET_CONFIG accepted"),
        Err(err) => println!("SET_CONFIG: {err}"),
    }
    if let Some((backend, dir)) = spawned {
        drop(backend);
        let _ = std::fs::remove_dir(dir);
    }
    println!(
        "not implemented yet: the vSMMU session (scripted guest, translations, events) comes \
         with the daemon issue; this run shows connection set-up and feature negotiation only"
    );
    Ok(())
}
