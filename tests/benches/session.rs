//! Round-trip latency of a whole vSMMU session over the real socket, and the daemon's memory.
//!
//! `cargo bench -p viommu-tests --bench session`. Each figure is p50 and p99 over many
//! iterations after a warm-up: an MMIO register read, a CMDQ_PROD write through to a completed
//! CMD_SYNC for 1 and for 64 commands (Linux's way of waiting: MSI polling with GERROR reads),
//! and a TRANSLATE; then the daemon's resident memory with a 1 GiB guest mapped.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::{Duration, Instant};

use viommu_protocol::{Access, FrontendRequest, IrqIndex};
use viommu_tests::guest::cmd::{CmdEnt, Tlbi};
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::guest::regs::ARM_SMMU_IDR0;
use viommu_tests::guest::{BumpAllocator, Driver, DriverConfig, SmmuPort};
use viommu_tests::scenario::{ALLOC_START, default_config};
use viommu_tests::{BackendProcess, MockQemu, build_backend, scenario};

const WARMUP: usize = 1_000;
const ITERATIONS: usize = 20_000;
const GIB: u64 = 1 << 30;

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    println!(
        "{name:<56} p50 {:>8.2} us   p99 {:>8.2} us   ({} samples)",
        at(0.50).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

fn measure(name: &str, iterations: usize, mut f: impl FnMut()) {
    for _ in 0..WARMUP {
        f();
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        f();
        samples.push(start.elapsed());
    }
    percentiles(name, samples);
}

/// Like [`measure`], with an untimed `setup` before each timed `f`.
fn measure_with_setup(name: &str, iterations: usize, mut setup: impl FnMut(), mut f: impl FnMut()) {
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..WARMUP + iterations {
        setup();
        let start = Instant::now();
        f();
        if i >= WARMUP {
            samples.push(start.elapsed());
        }
    }
    percentiles(name, samples);
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing useful: run only
    // when asked to benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("session benchmark: run with `cargo bench -p viommu-tests --bench session`");
        return;
    }
    // Always current: a stale daemon would measure old code.
    let binary = build_backend().unwrap();
    println!("daemon: {}", binary.display());
    for (label, args) in [
        ("default (busy-poll 50 us)", &["--log-level", "error"][..]),
        (
            "--busy-poll-us 0",
            &["--log-level", "error", "--busy-poll-us", "0"][..],
        ),
    ] {
        println!("\n== daemon {label}");
        run(&binary, args);
    }
}

fn run(binary: &std::path::Path, args: &[&str]) {
    let dir = std::env::temp_dir().join(format!("viommu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vsmmu.sock");
    let daemon = BackendProcess::spawn_with(binary, &socket, args).unwrap();
    let pid = daemon.pid();

    let mut qemu = MockQemu::connect(&socket, Duration::from_secs(10)).unwrap();
    qemu.negotiate().unwrap();
    qemu.start(default_config(), GIB).unwrap();
    let idle_rss = status_kib(pid, "VmRSS:");
    let mem = qemu.mem().unwrap().clone();
    let mut d = Driver::probe(
        qemu.port(),
        mem,
        BumpAllocator::new(ALLOC_START, GIB),
        DriverConfig::default(),
    )
    .unwrap();
    d.reset().unwrap();
    qemu.attach(1, 8).unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    let buf = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    d.map(&pt, 0x1_0000_0000, buf, 0x1000, prot::RW).unwrap();
    d.attach_s1(8, pt, 1).unwrap();

    let mut port = qemu.port();
    measure("MMIO_READ round trip (IDR0)", ITERATIONS, || {
        std::hint::black_box(port.read(ARM_SMMU_IDR0, 4));
    });
    measure(
        "CMDQ_PROD -> CMD_SYNC done, 1 command (TLBI_NH_ASID)",
        ITERATIONS,
        || {
            d.issue_cmds_with_sync(&[CmdEnt::TlbiNhAsid { vmid: 0, asid: 1 }])
                .unwrap();
        },
    );
    // Linux's unmap of 63 pages: TLBI_NH_VA per page, then the sync.
    let batch: Vec<CmdEnt> = (0..63u64)
        .map(|i| {
            CmdEnt::TlbiNhVa(Tlbi {
                asid: 1,
                addr: 0x2_0000_0000 + (i << 12),
                leaf: true,
                ..Tlbi::default()
            })
        })
        .collect();
    measure(
        "CMDQ_PROD -> CMD_SYNC done, 64 commands (63 TLBI_NH_VA)",
        ITERATIONS / 4,
        || {
            d.issue_cmds_with_sync(&batch).unwrap();
        },
    );
    // The frontend cached the page's translation: the TLBI must reach it (IOTLB_INVALIDATE,
    // acknowledged) before the sync completes.
    let cached = std::cell::RefCell::new(&mut qemu);
    let tlbi_page = CmdEnt::TlbiNhVa(Tlbi {
        asid: 1,
        addr: 0x1_0000_0000,
        leaf: true,
        ..Tlbi::default()
    });
    measure_with_setup(
        "CMDQ_PROD -> CMD_SYNC done, TLBI of a cached page",
        ITERATIONS / 2,
        || {
            cached
                .borrow_mut()
                .translate(1, None, 0x1_0000_0010, Access::READ)
                .unwrap();
        },
        || {
            d.issue_cmds_with_sync(&[tlbi_page]).unwrap();
        },
    );
    let main = qemu.frontend();
    let request = FrontendRequest::Translate(viommu_protocol::TranslateRequest {
        sid: 8,
        ssid: None,
        iova: 0x1_0000_0010,
        access: Access::READ,
    });
    measure("TRANSLATE round trip (IOTLB hit)", ITERATIONS, || {
        std::hint::black_box(main.call(&request).unwrap());
    });
    assert!(d.port.take_error().is_none());
    qemu.take_irqs(IrqIndex::Evtq);

    // Memory: a 1 GiB guest mapped, the session above run, and then a whole Linux-like session
    // in a second connection with 64 MiB.
    let rss = status_kib(pid, "VmRSS:");
    let shmem = status_kib(pid, "RssShmem:");
    let anon = status_kib(pid, "RssAnon:");
    println!(
        "daemon resident memory, 1 GiB guest mapped: VmRSS {rss} KiB (RssAnon {anon} KiB, \
         RssShmem {shmem} KiB = guest pages the daemon touched); {idle_rss} KiB before the guest ran"
    );
    qemu.close().unwrap();
    let mut qemu = MockQemu::connect(&socket, Duration::from_secs(10)).unwrap();
    scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
    qemu.close().unwrap();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
