//! `mock-qemu`: plays QEMU against a `viommu-backend`.
//!
//! With no arguments it starts the backend built next to it on a private socket and runs the
//! Linux-like demo session, printing a trace of it; `--socket PATH` talks to a backend that is already listening.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use viommu_tests::{BackendProcess, MockQemu, backend_binary_built, scenario};

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
            // The backend's own log stays quiet unless asked for (RUST_LOG), so the trace reads.
            let backend = BackendProcess::spawn_with(
                &backend_binary_built()?,
                &socket,
                &["--log-level", "warn"],
            )?;
            println!("started viommu-backend on {}", socket.display());
            (socket, Some((backend, dir)))
        }
        _ => anyhow::bail!("usage: mock-qemu [--socket PATH]"),
    };
    let mut qemu = MockQemu::connect(&socket, Duration::from_secs(5))?;
    let mut step = 0u32;
    let report = scenario::linux_session(&mut qemu, &mut |line| {
        step = step.saturating_add(1);
        println!("[{step:2}] {line}");
    });
    let closed = qemu.close();
    if let Some((backend, dir)) = spawned {
        drop(backend);
        let _ = std::fs::remove_dir(dir);
    }
    let report = report.context("the Linux-like session failed")?;
    closed.context("closing the session")?;
    println!(
        "ok: {} STEs installed, {} translations ({} from the frontend's cache), {} IOTLB \
         invalidations, {} address-space changes, {} MSI doorbell write(s), {} event(s) with {} IRQ(s), \
         {} SID confirmations",
        report.stes,
        report.translations.saturating_add(report.cache_hits),
        report.cache_hits,
        report.invalidations,
        report.address_space_changes,
        report.msi_writes,
        report.events.len(),
        report.evtq_irqs,
        report.sid_confirmations
    );
    Ok(())
}
