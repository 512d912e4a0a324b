//! The daemon's sandbox, entered after set-up (socket bound or adopted, the service manager's
//! notification socket connected, signal handlers installed, logger ready) and before the first
//! byte of frontend or guest input is read: no_new_privs, capabilities dropped, Landlock with no
//! file-system access (but removing the listening socket's file at exit), and a seccomp
//! allowlist of the system calls serving a frontend takes, with `ioctl` limited to the iommufd
//! and VFIO requests the backend issues and `mmap`/`mprotect` never executable.

use std::collections::BTreeMap;
use std::ffi::c_ulong;
use std::path::Path;

use crate::host::uapi;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// How strictly the sandbox is applied (`--sandbox`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// A system call outside the allowlist kills the process (SIGSYS).
    Enforce,
    /// Outside the allowlist is allowed but logged by the kernel (audit), to find what a new
    /// code path needs. Landlock and the privilege drops apply as in enforce.
    Log,
    /// No sandbox.
    Off,
}

/// Why the sandbox could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// prctl(PR_SET_NO_NEW_PRIVS) or capset failed.
    #[error("dropping privileges")]
    Privileges(#[source] std::io::Error),
    /// Landlock failed (a kernel without it is not an error: the ruleset is best effort).
    #[error("Landlock")]
    Landlock(#[source] landlock::RulesetError),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp")]
    Seccomp(#[source] seccompiler::Error),
    /// The seccomp filter could not be compiled.
    #[error("seccomp filter")]
    SeccompBackend(#[source] seccompiler::BackendError),
}

/// The iommufd and VFIO requests the backend issues (`host::iommufd`), as the uAPI module lists
/// them.
pub const ALLOWED_IOCTLS: &[c_ulong] = uapi::DAEMON_REQUESTS;

/// PROT_EXEC, which no mapping of the daemon may have.
const PROT_EXEC: u64 = 4;

/// The system calls allowed without conditions, each with the code path that needs it.
fn plain_syscalls() -> Vec<(i64, &'static str)> {
    let mut calls = vec![
        (
            libc::SYS_read,
            "eventfd and signal-pipe reads, vEVENTQ records",
        ),
        (
            libc::SYS_write,
            "IRQ eventfd writes, the log on stderr, sd_notify datagrams (daemon::notify)",
        ),
        (libc::SYS_writev, "the log on stderr"),
        (libc::SYS_close, "every fd a session releases"),
        (
            libc::SYS_recvmsg,
            "protocol messages with their fds (SCM_RIGHTS)",
        ),
        (libc::SYS_sendmsg, "replies and backend-channel requests"),
        (libc::SYS_sendto, "std's UnixStream writes"),
        (
            libc::SYS_accept4,
            "the next frontend on the listening socket",
        ),
        (libc::SYS_setsockopt, "per-connection read timeouts"),
        (
            libc::SYS_getsockopt,
            "checking a passed backend-channel socket",
        ),
        (libc::SYS_epoll_create1, "one epoll set per session"),
        (
            libc::SYS_epoll_ctl,
            "watching the sockets, signals and vEVENTQs",
        ),
        (libc::SYS_epoll_pwait, "the event loop"),
        (
            libc::SYS_ppoll,
            "busy-polling the connection between messages",
        ),
        (
            libc::SYS_sched_yield,
            "letting QEMU run while watching the shared region",
        ),
        (
            libc::SYS_fcntl,
            "fd flags and memfd seals of guest RAM regions",
        ),
        (libc::SYS_fstat, "sizing a guest RAM fd before mapping it"),
        (
            libc::SYS_readlinkat,
            "checking that an interrupt fd is an eventfd (/proc/self/fd)",
        ),
        (libc::SYS_newfstatat, "fstat through glibc"),
        (libc::SYS_statx, "fstat through rustix"),
        (libc::SYS_pread64, "SET_STATE blobs"),
        (
            libc::SYS_memfd_create,
            "GET_STATE blobs, the host record (HOLD_FDS)",
        ),
        (libc::SYS_ftruncate, "sizing the host record's memfd"),
        (
            libc::SYS_munmap,
            "unmapping guest RAM regions, the allocator",
        ),
        (libc::SYS_mremap, "the allocator"),
        (libc::SYS_madvise, "the allocator"),
        (libc::SYS_brk, "the allocator"),
        (libc::SYS_futex, "std's locks (the logger)"),
        (libc::SYS_getrandom, "std's hash seeds"),
        (
            libc::SYS_clock_gettime,
            "log timestamps and busy-poll deadlines (vDSO fallback)",
        ),
        (
            libc::SYS_rt_sigreturn,
            "returning from the SIGTERM/SIGINT/SIGUSR1 handlers",
        ),
        (libc::SYS_rt_sigprocmask, "std around signal handling"),
        (libc::SYS_sigaltstack, "std's stack-overflow guard"),
        (libc::SYS_exit, "thread exit"),
        (libc::SYS_exit_group, "process exit"),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        (libc::SYS_epoll_wait, "the event loop (x86_64 glibc)"),
        (libc::SYS_poll, "std's fd checks (x86_64)"),
        (
            libc::SYS_unlink,
            "removing the listening socket's file at exit",
        ),
    ]);
    calls.push((
        libc::SYS_unlinkat,
        "removing the listening socket's file at exit",
    ));
    calls
}

/// The seccomp program for `mode`.
pub fn filter(mode: SandboxMode) -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = plain_syscalls()
        .into_iter()
        .map(|(nr, _why)| (nr, Vec::new()))
        .collect();
    let cond = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
            .map_err(SandboxError::SeccompBackend)
    };
    // ioctl: only the iommufd and VFIO requests of host::iommufd.
    let ioctls = ALLOWED_IOCTLS
        .iter()
        .map(|&request| {
            // `c_ulong` is `u64` on the 64-bit targets the seccomp filter supports; the cast
            // says so.
            #[allow(clippy::unnecessary_cast)]
            let request = request as u64;
            SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, request)?])
                .map_err(SandboxError::SeccompBackend)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctls);
    // mmap and mprotect: guest RAM and the allocator, never executable.
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        let no_exec = SeccompRule::new(vec![cond(2, SeccompCmpOp::MaskedEq(PROT_EXEC), 0)?])
            .map_err(SandboxError::SeccompBackend)?;
        rules.insert(nr, vec![no_exec]);
    }
    let mismatch = match mode {
        SandboxMode::Log => SeccompAction::Log,
        SandboxMode::Enforce | SandboxMode::Off => SeccompAction::KillProcess,
    };
    let arch = if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(SandboxError::SeccompBackend)?;
    filter.try_into().map_err(SandboxError::SeccompBackend)
}

/// How many system calls the allowlist names.
pub fn allowlist_len() -> usize {
    plain_syscalls().len().saturating_add(3)
}

/// Enters the sandbox. `socket_dir` is the directory of a listening socket's file, which the
/// daemon removes at exit (the only file-system access it keeps).
pub fn enter(mode: SandboxMode, socket_dir: Option<&Path>) -> Result<(), SandboxError> {
    if mode == SandboxMode::Off {
        log::warn!("running without a sandbox (--sandbox off)");
        return Ok(());
    }
    rustix::thread::set_no_new_privs(true).map_err(|e| SandboxError::Privileges(e.into()))?;
    let none = rustix::thread::CapabilitySet::empty();
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: none,
            permitted: none,
            inheritable: none,
        },
    )
    .map_err(|e| SandboxError::Privileges(e.into()))?;
    let abi = ABI::V3;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(SandboxError::Landlock)?
        .create()
        .map_err(SandboxError::Landlock)?;
    if let Some(dir) = socket_dir
        && let Ok(fd) = PathFd::new(dir)
    {
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, AccessFs::RemoveFile))
            .map_err(SandboxError::Landlock)?;
    }
    let status = ruleset.restrict_self().map_err(SandboxError::Landlock)?;
    let program = filter(mode)?;
    seccompiler::apply_filter(&program).map_err(SandboxError::Seccomp)?;
    log::info!(
        "sandbox: {mode:?}, {} system calls allowed, ioctl limited to {} requests, Landlock {:?}",
        allowlist_len(),
        ALLOWED_IOCTLS.len(),
        status.ruleset
    );
    Ok(())
}
