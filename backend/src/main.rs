//! The `viommu-backend` daemon's command line; the daemon itself is `viommu_backend::daemon`.
//!
//! Command line per QEMU's backend program conventions (docs/interop/vhost-user.rst, "Backend
//! program conventions"): `--socket-path` or `--fd`, `--print-capabilities`; it never
//! daemonizes and exits promptly on SIGTERM or SIGINT.

use std::ffi::{OsStr, OsString};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{ArgGroup, Parser};
use log::error;
use viommu_backend::daemon;
use viommu_backend::daemon::endpoint::{self, Endpoint};
use viommu_backend::daemon::notify::{self, Notifier};
use viommu_backend::daemon::sandbox::{self, SandboxMode};
use viommu_backend::limits::{ModelFeature, ModelLimits};
use viommu_backend::session::{OFFERED_FEATURES, SessionOptions};

/// Out-of-process virtual ARM SMMUv3 for QEMU, speaking the vIOMMU-user protocol.
///
/// Example: viommu-backend --socket-path /run/viommu/vm1-smmu0.sock
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about,
    after_long_help = "Signals: SIGTERM and SIGINT stop the daemon; a frontend's passthrough \
devices keep translating, and the iommufd objects stay for the next backend to adopt (see \
docs/protocol.md, 4.3). SIGUSR1 logs one status line: the session's state, its devices with \
their mode (emulated address space, or passthrough abort, bypass or nested S1) and the command, \
translation, event and error counters.\n\nEnvironment: RUST_LOG overrides --log-level. \
NOTIFY_SOCKET, set by systemd for a Type=notify service (sd_notify(3)): the daemon tells the \
service manager READY=1 once it accepts frontends, a STATUS= line as frontends come and go, and \
STOPPING=1 when it stops, and removes the variable from its environment. A NOTIFY_SOCKET it \
cannot use is logged and does not stop it from serving.",
    group(ArgGroup::new("socket").args(["socket_path", "fd", "listen_fd"]))
)]
struct Args {
    /// Listen on this Unix socket path and serve one frontend at a time, listening again after
    /// each disconnect. A stale socket file left by a dead backend is replaced; one that a live
    /// process listens on is an error. Example: --socket-path /run/viommu/vm1-smmu0.sock
    #[arg(long, value_name = "PATH")]
    socket_path: Option<PathBuf>,

    /// Serve the already connected Unix stream socket inherited as this file descriptor (one
    /// end of a socketpair made by the management layer, as libvirt does for vhost-user-gpu),
    /// then exit. Example: --fd 3
    #[arg(long, value_name = "FDNUM")]
    fd: Option<RawFd>,

    /// Accept frontends, one at a time, on the already listening Unix socket inherited as this
    /// file descriptor (systemd socket activation passes it as 3). Example: --listen-fd 3
    #[arg(long, value_name = "FDNUM")]
    listen_fd: Option<RawFd>,

    /// Print the backend's capabilities as JSON on stdout and exit: the protocol features it
    /// offers and the model limits the other options set. Example: --print-capabilities
    /// --max-oas-bits 44
    #[arg(long)]
    print_capabilities: bool,

    /// After each message, poll the connection this many microseconds for the next one before
    /// sleeping (0: never). Round trips within a burst of register accesses skip the wake-up.
    /// Example: --busy-poll-us 0
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    busy_poll_us: u64,

    /// With the shared region: the largest window, in microseconds, to watch it for the next
    /// posted write or translation request before sleeping (0: never). The window adapts below
    /// it, as KVM's halt polling does: it grows while work keeps arriving soon after each sleep
    /// and shrinks to nothing when the guest's IOMMU work stops. Example: --ring-poll-us 0
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    ring_poll_us: u64,

    /// Largest output address size a frontend may configure (IDR5.OAS): 32, 36, 40, 42, 44 or
    /// 48. Example: --max-oas-bits 44
    #[arg(long, value_name = "BITS", default_value_t = 48, value_parser = parse_oas)]
    max_oas_bits: u8,

    /// Most substream ID bits a frontend may configure (IDR1.SSIDSIZE), 0 to 20.
    /// Example: --max-ssid-bits 16
    #[arg(long, value_name = "BITS", default_value_t = 20, value_parser = clap::value_parser!(u8).range(0..=20))]
    max_ssid_bits: u8,

    /// Most stream ID bits a frontend may configure (IDR1.SIDSIZE), 1 to 32.
    /// Example: --max-sid-bits 16
    #[arg(long, value_name = "BITS", default_value_t = 32, value_parser = clap::value_parser!(u8).range(1..=32))]
    max_sid_bits: u8,

    /// A model feature frontends may not configure: stage1, stage2, ril, ats or msi. Repeat, or
    /// separate with commas. Example: --disable-feature stage2,ats
    #[arg(long, value_name = "FEATURE", value_delimiter = ',', value_parser = parse_feature)]
    disable_feature: Vec<ModelFeature>,

    /// The sandbox entered before serving: enforce (a system call outside the allowlist kills
    /// the daemon), log (it is allowed and logged by the kernel), or off. Example: --sandbox log
    #[arg(long, value_name = "MODE", default_value = "enforce", value_parser = parse_sandbox)]
    sandbox: SandboxMode,

    /// Enter the sandbox, then try a forbidden system call (socket(AF_INET)) and report; for
    /// tests.
    #[arg(long, hide = true)]
    sandbox_selftest: bool,

    /// Print the man page (roff) and exit; `contrib/man/viommu-backend.8` is its output.
    #[arg(long, hide = true)]
    print_man_page: bool,

    /// Log level: error, warn, info, debug or trace (RUST_LOG, if set, takes precedence).
    /// Example: --log-level debug
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
}

fn main() -> ExitCode {
    let notify_socket = take_notify_socket();
    let args = Args::parse();
    if args.print_man_page {
        let man = clap_mangen::Man::new(<Args as clap::CommandFactory>::command())
            .section("8")
            .manual("System Administration");
        let mut out = Vec::new();
        return match man.render(&mut out) {
            Ok(()) => {
                print!("{}", String::from_utf8_lossy(&out));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("viommu-backend: cannot render the man page: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.print_capabilities {
        println!("{}", capabilities(&limits(&args)));
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .parse_default_env()
        .init();
    match run(&args, notify_socket.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The service manager's `NOTIFY_SOCKET`. It is left in the environment (sd_notify(3)'s
/// `unset_environment` is for programs that start others): the daemon starts no process, and
/// unsetting would take an `unsafe` call outside the modules that need one.
fn take_notify_socket() -> Option<OsString> {
    std::env::var_os(notify::NOTIFY_SOCKET)
}

/// The capabilities document: type and the protocol features this build offers.
fn capabilities(limits: &ModelLimits) -> String {
    let features: Vec<String> = OFFERED_FEATURES
        .iter_names()
        .map(|(name, _)| format!("\"{}\"", name.to_lowercase().replace('_', "-")))
        .collect();
    format!(
        "{{\"type\": \"viommu-smmuv3\", \"features\": [{}], \"model\": {}}}",
        features.join(", "),
        limits.capabilities_json()
    )
}

fn parse_sandbox(value: &str) -> Result<SandboxMode, String> {
    match value {
        "enforce" => Ok(SandboxMode::Enforce),
        "log" => Ok(SandboxMode::Log),
        "off" => Ok(SandboxMode::Off),
        _ => Err(format!(
            "'{value}' is not a sandbox mode (enforce, log or off)"
        )),
    }
}

fn parse_oas(value: &str) -> Result<u8, String> {
    match value.parse::<u8>() {
        Ok(bits @ (32 | 36 | 40 | 42 | 44 | 48)) => Ok(bits),
        _ => Err(format!(
            "'{value}' is not an output address size this model implements (32, 36, 40, 42, 44 or 48)"
        )),
    }
}

fn parse_feature(value: &str) -> Result<ModelFeature, String> {
    ModelFeature::from_name(value).ok_or_else(|| {
        format!("'{value}' is not a model feature (stage1, stage2, ril, ats or msi)")
    })
}

fn limits(args: &Args) -> ModelLimits {
    let mut limits = ModelLimits {
        max_oas_bits: args.max_oas_bits,
        max_ssid_bits: args.max_ssid_bits,
        max_sid_bits: args.max_sid_bits,
        ..ModelLimits::default()
    };
    for &feature in &args.disable_feature {
        limits.disable(feature);
    }
    limits
}

fn run(args: &Args, notify_socket: Option<&OsStr>) -> anyhow::Result<()> {
    let options = daemon::Options {
        busy_poll: std::time::Duration::from_micros(args.busy_poll_us),
        ring_poll: std::time::Duration::from_micros(args.ring_poll_us),
        session: SessionOptions {
            limits: limits(args),
            ..Default::default()
        },
    };
    if args.sandbox_selftest {
        sandbox::enter(args.sandbox, None).context("cannot enter the sandbox")?;
        let outcome = std::net::UdpSocket::bind("127.0.0.1:0");
        println!("sandbox self-test: socket(AF_INET) gave {outcome:?}");
        return Ok(());
    }
    let endpoint = match (&args.socket_path, args.fd, args.listen_fd) {
        (Some(path), None, None) => Endpoint::SocketPath(path.clone()),
        (None, Some(fd), None) => Endpoint::Connection(fd),
        (None, None, Some(fd)) => Endpoint::Listener(fd),
        _ => bail!("one of --socket-path, --fd or --listen-fd is required (see --help)"),
    };
    // Connected now, before the sandbox that would not allow it.
    let notifier = Notifier::from_env_value(notify_socket);
    endpoint::run(&endpoint, args.sandbox, &options, &notifier)?;
    Ok(())
}
