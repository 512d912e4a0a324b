//! `load`: a load test of `viommu-backend` (issue 12).
//!
//! Starts `--daemons N` daemons (default 8), each driven in parallel by its own mock frontend
//! on a thread of this process. Each frontend sets its vSMMU up as Linux does (probe, enable,
//! a stage-1 domain for each of three emulated devices with a few pages mapped), then pushes
//! `--commands N` guest commands (default 10^6) through it: command-queue entries (TLBI_NH_VA
//! per page and by range, TLBI_NH_ASID, TLBI_NSNH_ALL, CFGI_CD, CFGI_STE and CMD_SYNC),
//! published the way Linux batches them (up to 64 commands per CMDQ_PROD write, a CMD_SYNC
//! ending each batch), interleaved with device DMA translated through TRANSLATE and the
//! frontend's cache, some of it faulting.
//!
//! Checks, per daemon: every CMD_SYNC completed (the MSI completion word, or CONS, each time;
//! CMDQ_CONS = PROD and no CMDQ_CONS.ERR or GERROR at the end); no wired CMD_SYNC interrupt
//! (an MSI-signalled sync has its MSI only); every translation lands where the guest mapped it and every fault reaches
//! the guest's event queue with its interrupt; the daemon's counters (its SIGUSR1 status line)
//! moved by exactly what was sent; no warning or error in its log; a clean exit on SIGTERM; and
//! its peak resident memory (VmHWM) within `--max-hwm-mib` (default 32).
//!
//! Prints one row per daemon and `N passed, M failed`; exits non-zero on any failure.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use viommu_protocol::{Access, IrqIndex};
use viommu_tests::channel::Notification;
use viommu_tests::guest::bits::get32;
use viommu_tests::guest::cmd::{CmdEnt, Tlbi, tlb_inv_range};
use viommu_tests::guest::event::id;
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::guest::regs::{
    ARM_SMMU_CMDQ_CONS, ARM_SMMU_GERROR, ARM_SMMU_GERRORN, CMDQ_CONS_ERR, GERROR_ERR_MASK,
};
use viommu_tests::guest::{BumpAllocator, Driver, DriverConfig, SmmuPort};
use viommu_tests::port::SocketPort;
use viommu_tests::scenario::{ALLOC_START, DEVICES, RAM_SIZE, default_config};
use viommu_tests::{Dma, MockQemu, backend_binary_built};

const USAGE: &str = "usage: load [--daemons N] [--commands N] [--backend PATH] [--sync msi|sev] \
[--busy-poll-us N] [--max-hwm-mib N] [--seed N] [--keep-logs]";

/// Pages mapped per device, from the start of its IOVA window.
const MAPPED_PAGES: u64 = 16;
/// Pages of each device's IOVA window that invalidations and DMA aim at (the rest unmapped).
const WINDOW_PAGES: u64 = 64;
/// Linux's CMDQ_BATCH_ENTRIES: commands per CMDQ_PROD write before a batch is submitted.
const BATCH: usize = 64;
/// A stream ID with no device behind it (00:03.0): its CFGI_STE changes no device's STE, but
/// the daemon still confirms where the devices are (GET_DEVICE_SIDS) before it re-evaluates.
const EMPTY_SID: u32 = 0x18;
/// CONS, CONS.ERR and GERROR are read back every this many CMDQ_PROD writes.
const CHECK_EVERY: u64 = 512;
/// How long the daemon has to log its status line after SIGUSR1.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("load: {err:#}");
            ExitCode::from(2)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncMode {
    /// CS = IRQ with MSIADDR = the sync's own slot, polled in memory (Linux with MSIs and
    /// coherent queues, the default of `default_config`).
    Msi,
    /// CS = SEV, CONS polled over MMIO.
    Sev,
}

#[derive(Debug)]
struct Options {
    daemons: usize,
    commands: u64,
    backend: Option<PathBuf>,
    sync: SyncMode,
    busy_poll_us: Option<u64>,
    max_hwm_kib: u64,
    seed: u64,
    keep_logs: bool,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut opts = Options {
        daemons: 8,
        commands: 1_000_000,
        backend: None,
        sync: SyncMode::Msi,
        busy_poll_us: None,
        max_hwm_kib: 32 << 10,
        seed: 0x5eed_1234,
        keep_logs: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--daemons" => opts.daemons = value()?.parse().context("--daemons")?,
            "--commands" => opts.commands = value()?.parse().context("--commands")?,
            "--backend" => opts.backend = Some(PathBuf::from(value()?)),
            "--sync" => {
                opts.sync = match value()?.as_str() {
                    "msi" => SyncMode::Msi,
                    "sev" => SyncMode::Sev,
                    other => bail!("--sync {other}: msi or sev\n{USAGE}"),
                }
            }
            "--busy-poll-us" => {
                opts.busy_poll_us = Some(value()?.parse().context("--busy-poll-us")?)
            }
            "--max-hwm-mib" => {
                let mib: u64 = value()?.parse().context("--max-hwm-mib")?;
                opts.max_hwm_kib = mib.saturating_mul(1024);
            }
            "--seed" => opts.seed = value()?.parse().context("--seed")?,
            "--keep-logs" => opts.keep_logs = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    ensure!(opts.daemons >= 1, "--daemons must be at least 1");
    ensure!(opts.commands >= 1, "--commands must be at least 1");
    Ok(opts)
}

/// What the threads share with the main thread: progress, and the daemons' PIDs for the
/// resident-memory sampler.
#[derive(Debug)]
struct Shared {
    progress: Vec<AtomicU64>,
    pids: Vec<AtomicU32>,
    rss_max_kib: Vec<AtomicU64>,
    finished: AtomicUsize,
}

fn run() -> anyhow::Result<bool> {
    let opts = parse_args()?;
    let binary = match opts.backend.clone() {
        Some(path) => path,
        None => backend_binary_built()?,
    };
    ensure!(
        binary.exists(),
        "{} does not exist (--backend PATH)",
        binary.display()
    );
    let dir = std::env::temp_dir().join(format!("viommu-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!(
        "load: {} daemon(s) x {} guest commands, CMD_SYNC by {}, busy-poll {}, VmHWM bound {} MiB",
        opts.daemons,
        opts.commands,
        match opts.sync {
            SyncMode::Msi => "MSI (polled in memory)",
            SyncMode::Sev => "SEV (CONS polled)",
        },
        opts.busy_poll_us
            .map_or_else(|| "daemon default".to_owned(), |us| format!("{us} us")),
        opts.max_hwm_kib >> 10
    );
    println!("daemon: {}; logs in {}", binary.display(), dir.display());

    let shared = Shared {
        progress: (0..opts.daemons).map(|_| AtomicU64::new(0)).collect(),
        pids: (0..opts.daemons).map(|_| AtomicU32::new(0)).collect(),
        rss_max_kib: (0..opts.daemons).map(|_| AtomicU64::new(0)).collect(),
        finished: AtomicUsize::new(0),
    };
    let start = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..opts.daemons)
            .map(|index| {
                let (opts, binary, dir, shared) = (&opts, &binary, &dir, &shared);
                scope.spawn(move || {
                    let outcome = run_daemon(index, opts, binary, dir, shared);
                    shared.finished.fetch_add(1, Ordering::SeqCst);
                    outcome
                })
            })
            .collect();
        monitor(&opts, &shared, start);
        handles
            .into_iter()
            .enumerate()
            .map(|(index, h)| {
                h.join().unwrap_or_else(|_| {
                    let mut o = Outcome::new(index, dir.join(format!("daemon-{index}.log")));
                    o.failures.push("the frontend thread panicked".into());
                    o
                })
            })
            .collect()
    });
    let wall = start.elapsed();

    print_table(&opts, &outcomes);
    let failed = outcomes.iter().filter(|o| !o.failures.is_empty()).count();
    let passed = outcomes.len().saturating_sub(failed);
    for o in outcomes.iter().filter(|o| !o.failures.is_empty()) {
        println!("daemon {} FAILED (log {}):", o.index, o.log.display());
        for f in &o.failures {
            println!("  - {f}");
        }
    }
    println!("wall time {:.1} s", wall.as_secs_f64());
    if failed == 0 && !opts.keep_logs {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("logs kept in {}", dir.display());
    }
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0)
}

/// Samples each daemon's VmRSS every 100 ms and prints progress every 30 s, until every
/// frontend thread has finished.
fn monitor(opts: &Options, shared: &Shared, start: Instant) {
    let mut next_report = Duration::from_secs(30);
    while shared.finished.load(Ordering::SeqCst) < opts.daemons {
        for (pid, max) in shared.pids.iter().zip(&shared.rss_max_kib) {
            let pid = pid.load(Ordering::SeqCst);
            if pid != 0
                && let Some(kib) = status_kib(pid, "VmRSS:")
            {
                max.fetch_max(kib, Ordering::SeqCst);
            }
        }
        let elapsed = start.elapsed();
        if elapsed >= next_report {
            let done: Vec<String> = shared
                .progress
                .iter()
                .map(|p| {
                    let n = p.load(Ordering::SeqCst);
                    format!("{:.0}%", n as f64 * 100.0 / opts.commands as f64)
                })
                .collect();
            println!(
                "[{:5.0} s] progress: {}",
                elapsed.as_secs_f64(),
                done.join(" ")
            );
            next_report = next_report.saturating_add(Duration::from_secs(30));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// What was sent to one daemon.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Command-queue entries written, CMD_SYNCs included.
    entries: u64,
    syncs: u64,
    tlbi_va: u64,
    tlbi_asid: u64,
    tlbi_all: u64,
    cfgi_ste: u64,
    cfgi_ste_empty: u64,
    cfgi_cd: u64,
    /// CMDQ_PROD writes.
    prod_writes: u64,
    /// Device DMA translations (the frontend's cache, or TRANSLATE).
    dma: u64,
    /// TRANSLATE requests sent.
    translates: u64,
    cache_hits: u64,
    faults: u64,
    /// Event records the guest read.
    events: u64,
    /// IOTLB_INVALIDATE and GET_DEVICE_SIDS messages the frontend handled.
    invalidations: u64,
    confirmations: u64,
    /// Other backend-channel requests (stream-ID questions).

    /// CMD_SYNC batches with a CFGI_STE.
    ste_batches: u64,
}

impl Tally {
    fn guest_commands(&self) -> u64 {
        self.entries.saturating_add(self.dma)
    }
}

/// The counters of the daemon's status line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Status {
    messages: u64,
    refused: u64,
    translations: u64,
    commands: u64,
    command_errors: u64,
    events: u64,
    events_lost: u64,
}

impl Status {
    fn parse(line: &str) -> anyhow::Result<Self> {
        let field = |suffix: &str| {
            number_before(line, suffix)
                .with_context(|| format!("no \"N{suffix}\" in the status line: {line}"))
        };
        Ok(Self {
            messages: field(" messages (")?,
            refused: field(" refused)")?,
            translations: field(" translations")?,
            commands: field(" commands (")?,
            command_errors: field(" errors)")?,
            events: field(" events (")?,
            events_lost: field(" lost)")?,
        })
    }
}

/// The decimal number that ends just before the first `suffix` in `line`.
fn number_before(line: &str, suffix: &str) -> Option<u64> {
    let head = line.get(..line.find(suffix)?)?;
    head.rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|digits| digits.parse().ok())
}

/// How one daemon's run went.
#[derive(Debug)]
struct Outcome {
    index: usize,
    pid: u32,
    log: PathBuf,
    tally: Tally,
    elapsed: Duration,
    rss_setup_kib: u64,
    rss_max_kib: u64,
    hwm_kib: u64,
    failures: Vec<String>,
}

impl Outcome {
    fn new(index: usize, log: PathBuf) -> Self {
        Self {
            index,
            pid: 0,
            log,
            tally: Tally::default(),
            elapsed: Duration::ZERO,
            rss_setup_kib: 0,
            rss_max_kib: 0,
            hwm_kib: 0,
            failures: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(what());
        }
    }
}

/// A `viommu-backend` process with its log in a file; killed on drop if still running.
#[derive(Debug)]
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    reaped: bool,
}

impl Daemon {
    fn spawn(
        binary: &Path,
        socket: PathBuf,
        log: PathBuf,
        busy_poll_us: Option<u64>,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(binary);
        // Info shows the SIGUSR1 status line; RUST_LOG would override --log-level.
        cmd.arg("--socket-path")
            .arg(&socket)
            .args(["--log-level", "info"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        if let Some(us) = busy_poll_us {
            cmd.arg("--busy-poll-us").arg(us.to_string());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self {
            child,
            socket,
            log,
            reaped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .context("cannot run kill(1)")?;
        ensure!(
            status.success(),
            "kill -s {signal} {} failed: {status}",
            self.pid()
        );
        Ok(())
    }

    fn status_lines(&self) -> anyhow::Result<Vec<String>> {
        let text = std::fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read {}", self.log.display()))?;
        Ok(text
            .lines()
            .filter(|l| l.contains("] status: "))
            .map(str::to_owned)
            .collect())
    }

    /// SIGUSR1, then the status line it logs. The frontend must be idle (its last request
    /// answered), so that the counters are final.
    fn status(&self) -> anyhow::Result<Status> {
        let before = self.status_lines()?.len();
        self.signal("USR1")?;
        let start = Instant::now();
        loop {
            let lines = self.status_lines()?;
            if lines.len() > before
                && let Some(line) = lines.last()
            {
                return Status::parse(line);
            }
            ensure!(
                start.elapsed() < STATUS_TIMEOUT,
                "no status line {STATUS_TIMEOUT:?} after SIGUSR1"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, and its exit status (SIGKILL after 10 s).
    fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal("TERM")?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the daemon")? {
                self.reaped = true;
                return Ok(status);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.reaped = true;
                bail!("the daemon did not exit within 10 s of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn run_daemon(index: usize, opts: &Options, binary: &Path, dir: &Path, shared: &Shared) -> Outcome {
    let log = dir.join(format!("daemon-{index}.log"));
    let mut out = Outcome::new(index, log.clone());
    let socket = dir.join(format!("daemon-{index}.sock"));
    let mut daemon = match Daemon::spawn(binary, socket, log, opts.busy_poll_us) {
        Ok(d) => d,
        Err(e) => {
            out.failures.push(format!("{e:#}"));
            return out;
        }
    };
    out.pid = daemon.pid();
    if let Some(slot) = shared.pids.get(index) {
        slot.store(out.pid, Ordering::SeqCst);
    }
    if let Err(e) = session(index, opts, &daemon, shared, &mut out) {
        out.failures.push(format!("{e:#}"));
    }
    // Peak and current resident memory, while the daemon still runs.
    out.hwm_kib = status_kib(out.pid, "VmHWM:").unwrap_or(0);
    let rss_end = status_kib(out.pid, "VmRSS:").unwrap_or(0);
    if let Some(slot) = shared.pids.get(index) {
        slot.store(0, Ordering::SeqCst);
    }
    let sampled = shared
        .rss_max_kib
        .get(index)
        .map_or(0, |m| m.load(Ordering::SeqCst));
    out.rss_max_kib = sampled.max(rss_end).max(out.rss_setup_kib);
    // VmRSS is read from approximate per-CPU counters and may exceed VmHWM a little: the peak
    // is the larger of the two.
    let (hwm, bound) = (out.hwm_kib, opts.max_hwm_kib);
    let peak = hwm.max(out.rss_max_kib);
    out.check(hwm != 0, || "cannot read the daemon's VmHWM".into());
    out.check(peak <= bound, || {
        format!(
            "peak resident memory {peak} KiB (VmHWM {hwm} KiB) exceeds the bound of {bound} KiB"
        )
    });
    match daemon.stop() {
        Ok(status) => out.check(status.success(), || {
            format!("the daemon exited with {status} on SIGTERM")
        }),
        Err(e) => out.failures.push(format!("{e:#}")),
    }
    // Nothing the daemon logged may be a warning or an error.
    match std::fs::read_to_string(&daemon.log) {
        Ok(text) => {
            let bad: Vec<&str> = text
                .lines()
                .filter(|l| {
                    matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR"))
                        || l.contains("panicked")
                })
                .collect();
            let n = bad.len();
            out.check(bad.is_empty(), || {
                format!(
                    "{n} warning/error line(s) in the daemon's log, first: {}",
                    bad.first().copied().unwrap_or_default()
                )
            });
        }
        Err(e) => out
            .failures
            .push(format!("cannot read the daemon's log: {e}")),
    }
    out
}

type Guest = Driver<SocketPort, vm_memory::GuestMemoryMmap<()>>;

/// One emulated device with its stage-1 domain.
#[derive(Debug, Clone, Copy)]
struct Dev {
    handle: u32,
    sid: u32,
    asid: u16,
    granule: Granule,
    iova: u64,
    /// Where its mapped pages are, contiguous from `iova`.
    buffer: u64,
}

impl Dev {
    fn page_iova(&self, page: u64) -> u64 {
        self.iova
            .wrapping_add(page.wrapping_mul(self.granule.size()))
    }
}

/// A fault the guest should read from its event queue.
#[derive(Debug, Clone, Copy)]
struct Fault {
    sid: u32,
    iova: u64,
    write: bool,
}

/// xorshift64*: a deterministic stream of choices.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, never 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 for n = 0).
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 11).checked_rem(n).unwrap_or(0)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        let i = usize::try_from(self.below(items.len() as u64)).ok()?;
        items.get(i)
    }
}

/// The frontend and guest of one daemon, and what they sent.
struct Load<'a> {
    qemu: MockQemu,
    d: Guest,
    devs: Vec<Dev>,
    rng: Rng,
    tally: Tally,
    pending: VecDeque<Fault>,
    out: &'a mut Outcome,
    sync: SyncMode,
}

fn session(
    index: usize,
    opts: &Options,
    daemon: &Daemon,
    shared: &Shared,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let mut qemu = MockQemu::connect(&daemon.socket, Duration::from_secs(30))?;
    qemu.negotiate().context("feature negotiation")?;
    qemu.start(default_config(), RAM_SIZE)
        .context("configuring the vSMMU")?;
    for dev in DEVICES {
        qemu.attach(dev.handle, dev.sid)?;
    }
    let mem = qemu.mem()?.clone();
    let config = DriverConfig {
        msipoll: Some(opts.sync == SyncMode::Msi),
        ..DriverConfig::default()
    };
    let mut d: Guest = Driver::probe(
        qemu.port(),
        mem,
        BumpAllocator::new(ALLOC_START, RAM_SIZE),
        config,
    )
    .context("probe")?;
    d.reset().context("reset")?;
    let mut devs = Vec::new();
    for dev in DEVICES {
        let pt = d.new_s1_pgtable(dev.granule).context("page table")?;
        let size = dev.granule.size();
        let bytes = size.saturating_mul(MAPPED_PAGES);
        let buffer = d.alloc_zeroed(bytes, size).context("DMA buffer")?;
        let mut page = 0;
        while page < MAPPED_PAGES {
            let off = page.saturating_mul(size);
            d.map(
                &pt,
                dev.iova.saturating_add(off),
                buffer.saturating_add(off),
                size,
                prot::RW,
            )
            .context("map")?;
            page = page.saturating_add(1);
        }
        d.attach_s1(dev.sid, pt, dev.asid)
            .context("attaching a stage-1 domain")?;
        devs.push(Dev {
            handle: dev.handle,
            sid: dev.sid,
            asid: dev.asid,
            granule: dev.granule,
            iova: dev.iova,
            buffer,
        });
    }
    if let Some(e) = d.port.take_error() {
        return Err(e).context("a register access failed during setup");
    }
    out.rss_setup_kib = status_kib(daemon.pid(), "VmRSS:").unwrap_or(0);

    // The baseline: counters, interrupt counts and channel log after the setup.
    let before = daemon.status().context("status before the load")?;
    qemu.take_irqs(IrqIndex::CmdSync);
    qemu.take_irqs(IrqIndex::Evtq);
    qemu.channel_state().log.clear();
    let sent_before = qemu.sent();
    let (reads_before, writes_before) = d.port.accesses();
    let seed = opts
        .seed
        .wrapping_add((index as u64).wrapping_mul(0x1_0000_0001));
    let progress = shared.progress.get(index);

    let mut load = Load {
        qemu,
        d,
        devs,
        rng: Rng::new(seed),
        tally: Tally::default(),
        pending: VecDeque::new(),
        out,
        sync: opts.sync,
    };
    let start = Instant::now();
    let result = load.run(opts.commands, progress);
    load.out.elapsed = start.elapsed();
    load.out.tally = load.tally;
    result?;

    // Every CMD_SYNC completed: CONS reached PROD, no error. No wired CMD_SYNC interrupt: an
    // MSI sync is signalled by its MSI alone (docs/protocol.md, 7.3), an SEV sync by nothing.
    load.check_queue()?;
    let t = load.tally;
    let sync_irqs = load.qemu.take_irqs(IrqIndex::CmdSync);
    load.out.check(sync_irqs == 0, || {
        format!(
            "{sync_irqs} wired CMD_SYNC interrupts for {} syncs ({:?}; expected none)",
            t.syncs, load.sync
        )
    });
    load.drain_channel_log()?;
    load.out.tally = load.tally;
    let t = load.tally;
    load.out.check(t.confirmations == t.ste_batches, || {
        format!(
            "{} GET_DEVICE_SIDS for {} batches with a CFGI_STE (one each)",
            t.confirmations, t.ste_batches
        )
    });
    load.out.check(t.events == t.faults, || {
        format!("the guest read {} events for {} faults", t.events, t.faults)
    });
    let sent = load.qemu.sent();
    let translates = sent.translates.saturating_sub(sent_before.translates);
    let cache_hits = sent.cache_hits.saturating_sub(sent_before.cache_hits);
    load.out.check(
        translates == t.translates && cache_hits == t.cache_hits,
        || {
            format!(
                "the mock counted {translates} TRANSLATE + {cache_hits} cache hits, the load {} + {}",
                t.translates, t.cache_hits
            )
        },
    );
    let (reads, writes) = load.d.port.accesses();
    let mmio = reads
        .saturating_sub(reads_before)
        .saturating_add(writes.saturating_sub(writes_before));

    // The daemon's counters moved by exactly what was sent.
    let after = daemon.status().context("status after the load")?;
    let delta = |a: u64, b: u64| a.saturating_sub(b);
    let got = Status {
        messages: delta(after.messages, before.messages),
        refused: delta(after.refused, before.refused),
        translations: delta(after.translations, before.translations),
        commands: delta(after.commands, before.commands),
        command_errors: delta(after.command_errors, before.command_errors),
        events: delta(after.events, before.events),
        events_lost: delta(after.events_lost, before.events_lost),
    };
    let want = Status {
        messages: mmio.saturating_add(t.translates),
        refused: 0,
        translations: t.translates,
        commands: t.entries,
        command_errors: 0,
        events: t.faults,
        events_lost: 0,
    };
    load.out.check(got == want, || {
        format!("daemon counters moved by {got:?}, expected {want:?}")
    });
    load.qemu.close().context("closing the session")?;
    Ok(())
}

impl Load<'_> {
    fn run(&mut self, total: u64, progress: Option<&AtomicU64>) -> anyhow::Result<()> {
        let mut last_check = 0u64;
        loop {
            let done = self.tally.guest_commands();
            if let Some(p) = progress {
                p.store(done, Ordering::Relaxed);
            }
            let remaining = total.saturating_sub(done);
            if remaining == 0 {
                return Ok(());
            }
            self.step(remaining)?;
            if let Some(e) = self.d.port.take_error() {
                return Err(e).context("a register access failed");
            }
            if self.tally.prod_writes.saturating_sub(last_check) >= CHECK_EVERY {
                last_check = self.tally.prod_writes;
                self.check_queue()?;
                self.drain_channel_log()?;
            }
        }
    }

    fn dev(&mut self) -> anyhow::Result<Dev> {
        self.rng.pick(&self.devs).copied().context("no device")
    }

    /// One guest operation, using at most `remaining` guest commands.
    fn step(&mut self, remaining: u64) -> anyhow::Result<()> {
        let dev = self.dev()?;
        let ril = self.d.info.range_inv;
        let size = dev.granule.size();
        let shift = dev.granule.shift();
        let template = CmdEnt::TlbiNhVa(Tlbi {
            asid: dev.asid,
            ..Tlbi::default()
        });
        match self.rng.below(100) {
            // An unmap of a run of pages, one TLBI_NH_VA each (dma_unmap of scattered pages, an
            // iommu_unmap without range invalidation): often 1, sometimes long.
            0..=39 => {
                let max = if self.rng.below(4) == 0 { 200 } else { 8 };
                let pages = self.rng.below(max).saturating_add(1);
                let first = self.rng.below(WINDOW_PAGES);
                let mut cmds = Vec::new();
                let mut i = 0;
                while i < pages {
                    let page = first
                        .saturating_add(i)
                        .checked_rem(WINDOW_PAGES)
                        .unwrap_or(0);
                    cmds.extend(tlb_inv_range(
                        template,
                        dev.page_iova(page),
                        size,
                        size,
                        true,
                        shift,
                        ril,
                    ));
                    i = i.saturating_add(1);
                }
                self.submit(cmds, remaining)
            }
            // An unmap of a range, with range invalidation when the SMMU has it.
            40..=49 => {
                let first = self.rng.below(WINDOW_PAGES);
                let pages = self
                    .rng
                    .below(WINDOW_PAGES.saturating_sub(first))
                    .saturating_add(1);
                let cmds = tlb_inv_range(
                    template,
                    dev.page_iova(first),
                    pages.saturating_mul(size),
                    size,
                    true,
                    shift,
                    ril,
                );
                self.submit(cmds, remaining)
            }
            // A domain flush (arm_smmu_tlb_inv_context).
            50..=57 => self.submit(
                vec![CmdEnt::TlbiNhAsid {
                    vmid: 0,
                    asid: dev.asid,
                }],
                remaining,
            ),
            // Everything (the boot-time flush).
            58..=59 => self.submit(vec![CmdEnt::TlbiNsnhAll], remaining),
            // A configuration update step of arm_smmu_write_entry: the CD, then the STE (the
            // entries do not change, so the device stays translated); now and then an STE
            // with no device behind it.
            60..=67 => {
                let mut cmds = vec![
                    CmdEnt::CfgiCd {
                        sid: dev.sid,
                        ssid: 0,
                        leaf: true,
                    },
                    CmdEnt::CfgiSte {
                        sid: dev.sid,
                        leaf: true,
                    },
                ];
                if self.rng.below(8) == 0 {
                    cmds.push(CmdEnt::CfgiSte {
                        sid: EMPTY_SID,
                        leaf: true,
                    });
                }
                self.submit(cmds, remaining)
            }
            // A CMD_SYNC on its own.
            68..=69 => self.submit(Vec::new(), remaining),
            // Device DMA: a few accesses, a quarter of them to unmapped pages.
            _ => {
                let n = self.rng.below(16).saturating_add(1).min(remaining);
                self.dma(n)
            }
        }
    }

    /// Issues `cmds` as Linux's arm_smmu_cmdq_batch does: a CMDQ_PROD write per 64 commands,
    /// the last with a CMD_SYNC, which is waited for. Trimmed to `remaining` entries.
    fn submit(&mut self, mut cmds: Vec<CmdEnt>, remaining: u64) -> anyhow::Result<()> {
        let room = usize::try_from(remaining.saturating_sub(1)).unwrap_or(usize::MAX);
        cmds.truncate(room);
        for cmd in &cmds {
            let t = &mut self.tally;
            let counter = match cmd {
                CmdEnt::TlbiNhVa(_) => &mut t.tlbi_va,
                CmdEnt::TlbiNhAsid { .. } => &mut t.tlbi_asid,
                CmdEnt::TlbiNsnhAll => &mut t.tlbi_all,
                CmdEnt::CfgiSte { sid, .. } => {
                    if *sid == EMPTY_SID {
                        t.cfgi_ste_empty = t.cfgi_ste_empty.saturating_add(1);
                    }
                    &mut t.cfgi_ste
                }
                CmdEnt::CfgiCd { .. } => &mut t.cfgi_cd,
                other => bail!("unexpected command {other:?}"),
            };
            *counter = counter.saturating_add(1);
        }
        if cmds.iter().any(|c| matches!(c, CmdEnt::CfgiSte { .. })) {
            self.tally.ste_batches = self.tally.ste_batches.saturating_add(1);
        }
        let mut chunks: Vec<&[CmdEnt]> = cmds.chunks(BATCH).collect();
        let last = chunks.pop().unwrap_or(&[]);
        for chunk in chunks {
            self.d
                .issue_cmds(chunk)
                .context("issuing a batch of commands")?;
            self.count_entries(chunk.len(), false);
        }
        self.d
            .issue_cmds_with_sync(last)
            .with_context(|| format!("CMD_SYNC number {}", self.tally.syncs.saturating_add(1)))?;
        self.count_entries(last.len(), true);
        Ok(())
    }

    fn count_entries(&mut self, cmds: usize, sync: bool) {
        let t = &mut self.tally;
        let n = (cmds as u64).saturating_add(u64::from(sync));
        t.entries = t.entries.saturating_add(n);
        t.syncs = t.syncs.saturating_add(u64::from(sync));
        t.prod_writes = t.prod_writes.saturating_add(1);
    }

    /// `n` device accesses through the frontend's cache or TRANSLATE; the faults' events are
    /// then read from the event queue, as the event interrupt makes Linux do.
    fn dma(&mut self, n: u64) -> anyhow::Result<()> {
        let mut i = 0;
        while i < n {
            i = i.saturating_add(1);
            let dev = self.dev()?;
            let size = dev.granule.size();
            let mapped = self.rng.below(4) != 0;
            let page = if mapped {
                self.rng.below(MAPPED_PAGES)
            } else {
                MAPPED_PAGES
                    .saturating_add(self.rng.below(WINDOW_PAGES.saturating_sub(MAPPED_PAGES)))
            };
            let offset = self.rng.below(size) & !7;
            let iova = dev.page_iova(page).wrapping_add(offset);
            let write = self.rng.below(2) == 0;
            let access = if write { Access::WRITE } else { Access::READ };
            let dma = self
                .qemu
                .translate(dev.handle, None, iova, access)
                .with_context(|| format!("TRANSLATE of {iova:#x} for device {}", dev.handle))?;
            let t = &mut self.tally;
            t.dma = t.dma.saturating_add(1);
            match dma {
                Dma::Address { gpa, cached } => {
                    if cached {
                        t.cache_hits = t.cache_hits.saturating_add(1);
                    } else {
                        t.translates = t.translates.saturating_add(1);
                    }
                    let want = dev
                        .buffer
                        .wrapping_add(page.wrapping_mul(size))
                        .wrapping_add(offset);
                    ensure!(
                        mapped && gpa == want,
                        "device {} {} at IOVA {iova:#x} went to {gpa:#x} ({}), expected {}",
                        dev.handle,
                        if write { "write" } else { "read" },
                        if cached { "cached" } else { "TRANSLATE" },
                        if mapped {
                            format!("{want:#x}")
                        } else {
                            "a fault".to_owned()
                        }
                    );
                }
                Dma::Fault { event } => {
                    t.translates = t.translates.saturating_add(1);
                    t.faults = t.faults.saturating_add(1);
                    ensure!(
                        !mapped && event == id::F_TRANSLATION,
                        "device {} DMA at IOVA {iova:#x} faulted with event {event:#x}{}",
                        dev.handle,
                        if mapped { " (the page is mapped)" } else { "" }
                    );
                    self.pending.push_back(Fault {
                        sid: dev.sid,
                        iova,
                        write,
                    });
                }
            }
        }
        if !self.pending.is_empty() {
            self.read_events()?;
        }
        Ok(())
    }

    /// The event interrupt came: arm_smmu_evtq_thread reads the records, which must be the
    /// faults, in order.
    fn read_events(&mut self) -> anyhow::Result<()> {
        let irqs = self.qemu.take_irqs(IrqIndex::Evtq);
        ensure!(
            irqs >= 1,
            "{} fault(s) and no event-queue interrupt",
            self.pending.len()
        );
        let batch = self.d.evtq_thread().context("reading the event queue")?;
        ensure!(!batch.overflow, "the event queue overflowed");
        for event in batch.events {
            self.tally.events = self.tally.events.saturating_add(1);
            let fault = self
                .pending
                .pop_front()
                .with_context(|| format!("an event with no fault: {event:x?}"))?;
            ensure!(
                event.id() == id::F_TRANSLATION
                    && event.sid() == fault.sid
                    && event.input_addr() == fault.iova
                    && event.rnw() != fault.write,
                "event {event:x?} for the fault {fault:x?}"
            );
        }
        ensure!(
            self.pending.is_empty(),
            "{} fault(s) with no event: {:x?}",
            self.pending.len(),
            self.pending.front()
        );
        Ok(())
    }

    /// CMDQ_CONS equals the producer's PROD (every command consumed, every sync passed), with
    /// no CMDQ_CONS.ERR and no active GERROR. The reads also make sure every posted write was
    /// handled.
    fn check_queue(&mut self) -> anyhow::Result<()> {
        let cons = self.d.port.read(ARM_SMMU_CMDQ_CONS, 4) as u32;
        let gerror = self.d.port.read(ARM_SMMU_GERROR, 4) as u32;
        let gerrorn = self.d.port.read(ARM_SMMU_GERRORN, 4) as u32;
        let prod = self.d.cmdq.llq.prod;
        let err = get32(CMDQ_CONS_ERR, cons);
        let active = (gerror ^ gerrorn) & GERROR_ERR_MASK;
        ensure!(
            cons & !CMDQ_CONS_ERR == prod && err == 0 && active == 0,
            "after {} CMD_SYNCs: CMDQ_CONS {cons:#x} (ERR {err}), PROD {prod:#x}, active GERROR {active:#x}",
            self.tally.syncs
        );
        if let Some(e) = self.d.port.take_error() {
            return Err(e).context("reading CMDQ_CONS");
        }
        Ok(())
    }

    /// Counts what the backend channel brought since the last call, and forgets it (the mock
    /// logs every message). The STEs never change: no SET_ADDRESS_SPACE may come.
    fn drain_channel_log(&mut self) -> anyhow::Result<()> {
        let log = std::mem::take(&mut self.qemu.channel_state().log);
        for n in log {
            match n {
                Notification::Invalidate { .. } => {
                    self.tally.invalidations = self.tally.invalidations.saturating_add(1);
                }
                Notification::DeviceSids { count } => {
                    ensure!(
                        count == DEVICES.len(),
                        "GET_DEVICE_SIDS answered with {count} devices"
                    );
                    self.tally.confirmations = self.tally.confirmations.saturating_add(1);
                }
                Notification::ResolveSid { sid, .. } => {
                    bail!("RESOLVE_SID {sid:#x}: the backend confirms SIDs with GET_DEVICE_SIDS")
                }
                Notification::AddressSpace { handle, space, .. } => {
                    bail!("SET_ADDRESS_SPACE {space:?} for device {handle} though no STE changed")
                }
                Notification::MsiWrite { address, data, .. } => {
                    bail!("MSI_WRITE {data:#x} to {address:#x}: no MSI should leave guest RAM")
                }
                Notification::Hold { key } | Notification::Release { key } => {
                    bail!("HOLD_FDS or RELEASE_FDS (key {key}) though no device is passed through")
                }
            }
        }
        Ok(())
    }
}

fn print_table(opts: &Options, outcomes: &[Outcome]) {
    println!();
    println!(
        "{:>6} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>9} {:>10} {:>9} {:>9} {:>9}  result",
        "daemon",
        "pid",
        "commands",
        "syncs",
        "prod wr",
        "transl",
        "TRANSL",
        "faults",
        "inval",
        "elapsed",
        "cmds/s",
        "RSS setup",
        "RSS max",
        "VmHWM"
    );
    for o in outcomes {
        let t = &o.tally;
        let secs = o.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            t.guest_commands() as f64 / secs
        } else {
            0.0
        };
        println!(
            "{:>6} {:>8} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8.1}s {:>10.0} {:>6} KiB {:>5} KiB {:>5} KiB  {}",
            o.index,
            o.pid,
            t.entries,
            t.syncs,
            t.prod_writes,
            t.dma,
            t.translates,
            t.faults,
            t.invalidations,
            secs,
            rate,
            o.rss_setup_kib,
            o.rss_max_kib,
            o.hwm_kib,
            if o.failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
    let sum = |f: fn(&Tally) -> u64| {
        outcomes
            .iter()
            .map(|o| f(&o.tally))
            .fold(0u64, u64::saturating_add)
    };
    println!(
        "commands = command-queue entries (CMD_SYNCs included); transl = device DMA translations \
         (TRANSL of them sent as TRANSLATE, the rest cache hits); commands + transl = {} per \
         daemon; inval = IOTLB_INVALIDATE received; cmds/s = (commands + transl) / elapsed",
        opts.commands
    );
    println!(
        "mix, all daemons: {} TLBI_NH_VA, {} TLBI_NH_ASID, {} TLBI_NSNH_ALL, {} CFGI_CD, {} \
         CFGI_STE ({} of an empty SID, in {} batches; {} GET_DEVICE_SIDS), {} CMD_SYNC; \
         {} translations ({} TRANSLATE, {} faults, {} events read)",
        sum(|t| t.tlbi_va),
        sum(|t| t.tlbi_asid),
        sum(|t| t.tlbi_all),
        sum(|t| t.cfgi_cd),
        sum(|t| t.cfgi_ste),
        sum(|t| t.cfgi_ste_empty),
        sum(|t| t.ste_batches),
        sum(|t| t.confirmations),
        sum(|t| t.syncs),
        sum(|t| t.dma),
        sum(|t| t.translates),
        sum(|t| t.faults),
        sum(|t| t.events),
    );
}
