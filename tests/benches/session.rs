//! Round-trip latency of a whole vSMMU session over the real socket, by messages and through
//! the shared region side by side, and the daemon's memory.
//!
//! `cargo bench -p viommu-tests --bench session`. Two daemons run at once, each serving one
//! frontend: `messages` speaks sections 1 to 9 of docs/protocol.md only (MMIO_READ,
//! MMIO_WRITE, TRANSLATE, a translation cache of its own kept by IOTLB_INVALIDATE, SIDs asked
//! for by GET_DEVICE_SIDS); `shared` also uses the shared region of section 10 (registers read
//! from the mirror, writes posted in the ring with kick suppression, the backend's translation
//! cache with prefetch, SIDs pushed). Both drive the same guest: an MMIO register read, a posted
//! register write, a register write acknowledged through its ACK register, a CMDQ_PROD write
//! through to a completed CMD_SYNC for 1 and for 64 commands (Linux's way of waiting: MSI
//! polling with GERROR reads), the TLBI + CMD_SYNC that an unmap issues for a page the device
//! had cached, a CFGI_STE of a SID no device has, a DMA translation that misses (a lone page;
//! a page amid 32 mapped neighbours, which the shared region prefetches), a device streaming
//! over 33 pages just invalidated, a DMA translation that hits, and a TRANSLATE message.
//!
//! The machine is shared and noisy: each workload runs in [`ROUNDS`] rounds that alternate the
//! two frontends (which one goes first alternates too), so that noise hits both alike. Each
//! figure is p50 and p99 per operation after a warm-up; the ratio is shared / messages of the
//! p50s, with the spread of the ratio over the rounds (each round's p50 against the other
//! frontend's p50 of the same round). Messages per operation are counted in the mock: requests
//! on the main connection (MMIO_READ, MMIO_WRITE, TRANSLATE), requests on the backend channel
//! (MSI_WRITE, IOTLB_INVALIDATE, GET_DEVICE_SIDS, ...), and kicks (eventfd writes, not
//! messages). Then the daemons' resident memory with a 1 GiB guest mapped.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use viommu_protocol::{Access, FrontendRequest, IrqIndex, TranslateRequest};
use viommu_tests::guest::cmd::{CmdEnt, Tlbi};
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::guest::regs::{
    ARM_SMMU_GERRORN, ARM_SMMU_IDR0, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK,
};
use viommu_tests::guest::{Driver, SmmuPort};
use viommu_tests::port::SocketPort;
use viommu_tests::scenario::{default_config, probed_guest};
use viommu_tests::{BackendProcess, Dma, MockQemu, build_backend, scenario};
use vm_memory::GuestMemoryMmap;

/// Operations of each frontend before a workload is timed.
const WARMUP: usize = 1_000;
/// Operations of each frontend timed per workload (some workloads take a fraction).
const ITERATIONS: usize = 20_000;
/// Alternations of the two frontends per workload.
const ROUNDS: usize = 20;
/// Operations in one timed sample for the workloads too fast to time one at a time.
const FAST_OPS: u32 = 16;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 0x1000;

/// The emulated device, its SID and its domain's ASID.
const HANDLE: u32 = 1;
const SID: u32 = 8;
const ASID: u16 = 1;
/// A SID no device has.
const UNATTACHED_SID: u32 = 0x100;
/// A page mapped alone (nothing to prefetch around it).
const LONE: u64 = 0x1_0000_0000;
/// A run of mapped pages, as one scatter list maps them; a miss in its middle prefetches 16
/// pages each way.
const RUN: u64 = 0x3_0000_0000;
const RUN_PAGES: u64 = 33;
const RUN_MIDDLE: u64 = RUN + (RUN_PAGES / 2) * PAGE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Messages,
    Shared,
}

impl Mode {
    const BOTH: [Self; 2] = [Self::Messages, Self::Shared];

    fn label(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Shared => "shared",
        }
    }
}

/// What a frontend sent, as counted by the mock.
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    /// Requests on the main connection.
    main: u64,
    /// Requests on the backend channel.
    channel: u64,
    /// Kicks (eventfd writes) of the shared region.
    kicks: u64,
}

impl Traffic {
    fn since(self, before: Self) -> Self {
        Self {
            main: self.main - before.main,
            channel: self.channel - before.channel,
            kicks: self.kicks - before.kicks,
        }
    }

    fn add(&mut self, other: Self) {
        self.main += other.main;
        self.channel += other.channel;
        self.kicks += other.kicks;
    }
}

/// One daemon and the guest session of one frontend.
struct Side {
    mode: Mode,
    daemon: BackendProcess,
    qemu: MockQemu,
    d: Driver<SocketPort, GuestMemoryMmap<()>>,
    /// A second register port, for the register reads (as a vCPU other than the driver's).
    port: SocketPort,
    lone_pa: u64,
    irq_ctrl: u32,
    gerrorn: u32,
    batch: Vec<CmdEnt>,
    /// Requests sent on the main connection other than through the ports and translations.
    direct: u64,
    idle_rss: u64,
}

impl Side {
    fn start(binary: &Path, socket: &Path, args: &[&str], mode: Mode) -> Self {
        let daemon = BackendProcess::spawn_with(binary, socket, args).unwrap();
        let mut qemu = MockQemu::connect(socket, Duration::from_secs(10))
            .unwrap()
            .with_shared_region(mode == Mode::Shared);
        qemu.negotiate().unwrap();
        qemu.start(default_config(), GIB).unwrap();
        assert_eq!(
            qemu.shared().is_some(),
            mode == Mode::Shared,
            "the shared region is used exactly by the `shared` frontend"
        );
        let idle_rss = status_kib(daemon.pid(), "VmRSS:");
        let mut d = probed_guest(&qemu, GIB).unwrap();
        d.reset().unwrap();
        qemu.attach(HANDLE, SID).unwrap();
        let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
        let lone_pa = d.alloc_zeroed(PAGE, PAGE).unwrap();
        d.map(&pt, LONE, lone_pa, PAGE, prot::RW).unwrap();
        let run = d.alloc_zeroed(RUN_PAGES * PAGE, PAGE).unwrap();
        for i in 0..RUN_PAGES {
            d.map(&pt, RUN + i * PAGE, run + i * PAGE, PAGE, prot::RW)
                .unwrap();
        }
        d.attach_s1(SID, pt, ASID).unwrap();
        let irq_ctrl = d.read32(ARM_SMMU_IRQ_CTRL);
        let gerrorn = d.read32(ARM_SMMU_GERRORN);
        // Linux's unmap of 63 pages: TLBI_NH_VA per page, then the sync.
        let batch = (0..63u64)
            .map(|i| tlbi_va(0x2_0000_0000 + (i << 12)))
            .collect();
        let port = qemu.port();
        Self {
            mode,
            daemon,
            qemu,
            d,
            port,
            lone_pa,
            irq_ctrl,
            gerrorn,
            batch,
            direct: 0,
            idle_rss,
        }
    }

    fn traffic(&self) -> Traffic {
        let (reads, writes) = self.port.accesses();
        let (d_reads, d_writes) = self.d.port.accesses();
        let shared = self.qemu.shared().map(|s| s.sent()).unwrap_or_default();
        Traffic {
            main: (reads + d_reads - shared.mirror_reads)
                + (writes + d_writes - shared.posted)
                + (self.qemu.sent().translates - shared.requests)
                + self.direct,
            channel: self.qemu.channel_state().log.len() as u64,
            kicks: shared.kicks,
        }
    }

    fn translate(&mut self, iova: u64) -> Dma {
        self.qemu
            .translate(HANDLE, None, iova, Access::READ)
            .unwrap()
    }

    fn sync(&mut self, cmd: CmdEnt) {
        self.d.issue_cmds_with_sync(&[cmd]).unwrap();
    }

    /// The daemon's memory, a check that nothing failed, and a whole Linux-like session in a
    /// second connection.
    fn finish(mut self, socket: &Path) {
        assert!(self.d.port.take_error().is_none());
        assert!(self.port.take_error().is_none());
        self.qemu.take_irqs(IrqIndex::Evtq);
        let pid = self.daemon.pid();
        let rss = status_kib(pid, "VmRSS:");
        let shmem = status_kib(pid, "RssShmem:");
        let anon = status_kib(pid, "RssAnon:");
        println!(
            "{:<8}: daemon resident memory, 1 GiB guest mapped: VmRSS {rss} KiB (RssAnon {anon} \
             KiB, RssShmem {shmem} KiB = guest pages and shared region the daemon touched); {} \
             KiB before the guest ran",
            self.mode.label(),
            self.idle_rss
        );
        self.qemu.close().unwrap();
        let mut qemu = MockQemu::connect(socket, Duration::from_secs(10))
            .unwrap()
            .with_shared_region(self.mode == Mode::Shared);
        scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
        qemu.close().unwrap();
        drop(self.daemon);
    }
}

fn tlbi_va(addr: u64) -> CmdEnt {
    CmdEnt::TlbiNhVa(Tlbi {
        asid: ASID,
        addr,
        leaf: true,
        ..Tlbi::default()
    })
}

fn tlbi_asid() -> CmdEnt {
    CmdEnt::TlbiNhAsid {
        vmid: 0,
        asid: ASID,
    }
}

/// A workload, run alike by both frontends.
struct Workload {
    name: &'static str,
    /// Operations per frontend, over all rounds.
    iterations: usize,
    /// Operations `op` carries out (one timed sample, divided by this).
    ops: u32,
    /// Once per frontend, before the warm-up.
    prepare: Option<fn(&mut Side)>,
    /// Untimed, before each sample.
    setup: Option<fn(&mut Side)>,
    op: fn(&mut Side),
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "MMIO read (IDR0)",
        iterations: ITERATIONS,
        ops: FAST_OPS,
        prepare: None,
        setup: None,
        op: |s| {
            for _ in 0..FAST_OPS {
                black_box(s.port.read(ARM_SMMU_IDR0, 4));
            }
        },
    },
    Workload {
        name: "MMIO write, posted (GERRORN)",
        iterations: ITERATIONS,
        ops: 1,
        prepare: None,
        setup: None,
        op: |s| s.d.write32(ARM_SMMU_GERRORN, s.gerrorn),
    },
    Workload {
        name: "MMIO write -> ACK read (IRQ_CTRL, write_reg_sync)",
        iterations: ITERATIONS,
        ops: 1,
        prepare: None,
        setup: None,
        op: |s| {
            s.d.write_reg_sync(s.irq_ctrl, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
                .unwrap();
        },
    },
    Workload {
        name: "CMDQ_PROD -> CMD_SYNC done, 1 command (TLBI_NH_ASID)",
        iterations: ITERATIONS,
        ops: 1,
        prepare: None,
        setup: None,
        op: |s| s.sync(tlbi_asid()),
    },
    Workload {
        name: "CMDQ_PROD -> CMD_SYNC done, 64 commands (63 TLBI_NH_VA)",
        iterations: ITERATIONS / 4,
        ops: 1,
        prepare: None,
        setup: None,
        op: |s| s.d.issue_cmds_with_sync(&s.batch).unwrap(),
    },
    // The device cached the page's translation: the TLBI must reach the frontend's cache
    // (IOTLB_INVALIDATE, acknowledged; or the shared cache, cleared) before the sync completes.
    Workload {
        name: "CMDQ_PROD -> CMD_SYNC done, TLBI of a cached page (unmap)",
        iterations: ITERATIONS / 2,
        ops: 1,
        prepare: None,
        setup: Some(|s| {
            s.translate(LONE + 0x10);
        }),
        op: |s| s.sync(tlbi_va(LONE)),
    },
    Workload {
        name: "CMDQ_PROD -> CMD_SYNC done, CFGI_STE of an unattached SID",
        iterations: ITERATIONS,
        ops: 1,
        prepare: None,
        setup: None,
        op: |s| {
            s.sync(CmdEnt::CfgiSte {
                sid: UNATTACHED_SID,
                leaf: true,
            });
        },
    },
    Workload {
        name: "DMA translation miss, lone page",
        iterations: ITERATIONS / 2,
        ops: 1,
        prepare: None,
        setup: Some(|s| s.sync(tlbi_va(LONE))),
        op: |s| {
            let dma = s.translate(LONE + 0x10);
            assert_eq!(
                dma,
                Dma::Address {
                    gpa: s.lone_pa + 0x10,
                    cached: false
                }
            );
        },
    },
    Workload {
        name: "DMA translation miss, page amid 32 mapped (prefetch)",
        iterations: ITERATIONS / 2,
        ops: 1,
        prepare: None,
        setup: Some(|s| s.sync(tlbi_va(RUN_MIDDLE))),
        op: |s| {
            let dma = s.translate(RUN_MIDDLE + 0x10);
            assert!(matches!(dma, Dma::Address { cached: false, .. }));
        },
    },
    // A device reading a 33-page buffer just mapped (its translations invalidated), page by
    // page upwards: per page.
    Workload {
        name: "DMA over 33 pages after TLBI_NH_ASID, per page",
        iterations: ITERATIONS,
        ops: RUN_PAGES as u32,
        prepare: None,
        setup: Some(|s| s.sync(tlbi_asid())),
        op: |s| {
            for i in 0..RUN_PAGES {
                black_box(s.translate(RUN + i * PAGE + 0x10));
            }
        },
    },
    Workload {
        name: "DMA translation hit",
        iterations: ITERATIONS,
        ops: FAST_OPS,
        prepare: Some(|s| {
            s.translate(LONE + 0x10);
        }),
        setup: None,
        op: |s| {
            for _ in 0..FAST_OPS {
                let dma = s.translate(LONE + 0x10);
                assert!(matches!(dma, Dma::Address { cached: true, .. }));
            }
        },
    },
    // The message itself, whichever frontend sends it (with the shared region the backend also
    // fills its cache, and probes the neighbours to prefetch).
    Workload {
        name: "TRANSLATE round trip (IOTLB hit)",
        iterations: ITERATIONS,
        ops: 1,
        prepare: None,
        setup: None,
        op: |s| {
            let request = FrontendRequest::Translate(TranslateRequest {
                sid: SID,
                ssid: None,
                iova: LONE + 0x10,
                access: Access::READ,
            });
            black_box(s.qemu.frontend().call(&request).unwrap());
            s.direct += 1;
        },
    },
];

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q) as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// One workload's figures: per frontend p50 and p99 in microseconds per operation and traffic
/// per operation; the ratio shared / messages of the p50s and its quartiles and extremes over
/// the rounds.
struct Row {
    name: &'static str,
    p50: [f64; 2],
    p99: [f64; 2],
    per_op: [[f64; 3]; 2],
    ratio: f64,
    rounds: [f64; 4],
}

/// Times `w` on both sides, alternating them round by round.
fn compare(w: &Workload, sides: &mut [Side; 2]) -> Row {
    let ops = w.ops as usize;
    let per_round = (w.iterations / ops / ROUNDS).max(1);
    let sample = |s: &mut Side| -> (f64, Traffic) {
        if let Some(setup) = w.setup {
            setup(s);
        }
        let before = s.traffic();
        let start = Instant::now();
        (w.op)(s);
        let elapsed = start.elapsed();
        let traffic = s.traffic().since(before);
        (elapsed.as_secs_f64() * 1e6 / f64::from(w.ops), traffic)
    };
    for s in sides.iter_mut() {
        if let Some(prepare) = w.prepare {
            prepare(s);
        }
        for _ in 0..(WARMUP / ops).max(1) {
            sample(s);
        }
    }
    let mut all: [Vec<f64>; 2] = Default::default();
    let mut medians: [Vec<f64>; 2] = Default::default();
    let mut traffic = [Traffic::default(); 2];
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let mut times = Vec::with_capacity(per_round);
            for _ in 0..per_round {
                let (t, sent) = sample(&mut sides[i]);
                times.push(t);
                traffic[i].add(sent);
            }
            let times = sorted(times);
            medians[i].push(quantile(&times, 0.5));
            all[i].extend(times);
        }
    }
    let all = all.map(sorted);
    let count = (per_round * ROUNDS * ops) as f64;
    let ratios = sorted(
        medians[1]
            .iter()
            .zip(&medians[0])
            .map(|(s, m)| s / m)
            .collect(),
    );
    let row = Row {
        name: w.name,
        p50: [quantile(&all[0], 0.5), quantile(&all[1], 0.5)],
        p99: [quantile(&all[0], 0.99), quantile(&all[1], 0.99)],
        per_op: traffic.map(|t| {
            [
                t.main as f64 / count,
                t.channel as f64 / count,
                t.kicks as f64 / count,
            ]
        }),
        ratio: quantile(&all[1], 0.5) / quantile(&all[0], 0.5),
        rounds: [
            ratios[0],
            quantile(&ratios, 0.25),
            quantile(&ratios, 0.75),
            ratios[ratios.len() - 1],
        ],
    };
    println!("{}", row.name);
    for (i, mode) in Mode::BOTH.iter().enumerate() {
        println!(
            "    {:<8} p50 {:>8.3} us   p99 {:>8.3} us   ({} samples of {}; per op: {:.2} main + \
             {:.2} channel messages, {:.2} kicks)",
            mode.label(),
            row.p50[i],
            row.p99[i],
            all[i].len(),
            w.ops,
            row.per_op[i][0],
            row.per_op[i][1],
            row.per_op[i][2],
        );
    }
    println!(
        "    shared / messages {:.3}   (over {ROUNDS} rounds: IQR {:.3} .. {:.3}, range {:.3} .. \
         {:.3})",
        row.ratio, row.rounds[1], row.rounds[2], row.rounds[0], row.rounds[3]
    );
    row
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
        println!("\n== daemons {label}");
        run(&binary, args);
    }
}

fn run(binary: &Path, args: &[&str]) {
    let dir = std::env::temp_dir().join(format!("viommu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sockets = Mode::BOTH.map(|m| dir.join(format!("{}.sock", m.label())));
    let mut sides = [
        Side::start(binary, &sockets[0], args, Mode::Messages),
        Side::start(binary, &sockets[1], args, Mode::Shared),
    ];
    let rows: Vec<Row> = WORKLOADS.iter().map(|w| compare(w, &mut sides)).collect();

    println!(
        "\n| workload | messages p50 (p99) | shared p50 (p99) | shared / messages | over \
         {ROUNDS} rounds: IQR; range | messages / op: main + channel | shared / op: main + \
         channel (kicks) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.3} us ({:.2}) | {:.3} us ({:.2}) | {:.3} | {:.3}..{:.3}; {:.3}..{:.3} | \
             {:.2} + {:.2} | {:.2} + {:.2} ({:.2}) |",
            r.name,
            r.p50[0],
            r.p99[0],
            r.p50[1],
            r.p99[1],
            r.ratio,
            r.rounds[1],
            r.rounds[2],
            r.rounds[0],
            r.rounds[3],
            r.per_op[0][0],
            r.per_op[0][1],
            r.per_op[1][0],
            r.per_op[1][1],
            r.per_op[1][2],
        );
    }
    println!();
    for (side, socket) in sides.into_iter().zip(&sockets) {
        side.finish(socket);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
