//! The event loop: serve frontends one after another until SIGTERM or SIGINT.

pub mod endpoint;
pub mod inherited;
pub mod notify;
pub mod poll;
pub mod sandbox;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::pipe::{PipeFlags, pipe_with};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::session::{Session, SessionError, SessionOptions};
use poll::AdaptivePoll;

/// Errors of the event loop itself (a session's errors end only that session).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Setting up signal handling failed.
    #[error("cannot install the signal handlers")]
    Signals(#[source] io::Error),
    /// epoll failed.
    #[error("epoll failed")]
    Epoll(#[source] io::Error),
    /// accept failed.
    #[error("accept failed")]
    Accept(#[source] io::Error),
}

/// The signals the daemon reacts to: the read end of a pipe that SIGTERM and SIGINT write to
/// (stop), and of one that SIGUSR1 writes to (log a status line).
#[derive(Debug)]
pub struct Shutdown {
    read: OwnedFd,
    status: Option<OwnedFd>,
}

impl Shutdown {
    /// Installs the handlers: each signal writes a byte to the pipe (async-signal-safe), which
    /// the event loop watches.
    pub fn install() -> Result<Self, DaemonError> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(|e| DaemonError::Signals(e.into()))?;
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let write = write.try_clone().map_err(DaemonError::Signals)?;
            signal_hook::low_level::pipe::register(signal, write).map_err(DaemonError::Signals)?;
        }
        let (status, status_write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(|e| DaemonError::Signals(e.into()))?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGUSR1, status_write)
            .map_err(DaemonError::Signals)?;
        Ok(Self {
            read,
            status: Some(status),
        })
    }

    /// A shutdown that no signal triggers: writing a byte to the returned fd does (for a
    /// daemon loop embedded in a test or another program).
    pub fn manual() -> Result<(Self, OwnedFd), DaemonError> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(|e| DaemonError::Signals(e.into()))?;
        Ok((Self { read, status: None }, write))
    }

    /// The fd to poll.
    pub fn fd(&self) -> &OwnedFd {
        &self.read
    }
}

/// How the event loop serves a frontend.
#[derive(Debug, Clone)]
pub struct Options {
    /// After each message, keep polling the connection this long before sleeping in epoll
    /// (zero: never). A guest's register accesses come in bursts a few microseconds apart, and
    /// waking a sleeping process costs tens of microseconds on a small VM host; like KVM's
    /// `halt_poll_ns` and QEMU's `poll-max-ns`, a short poll window trades a little CPU during a
    /// burst for round trips that skip the wake-up.
    pub busy_poll: Duration,
    /// With the shared region, the largest window to watch it (and the connection) before
    /// sleeping (zero: never); the window adapts below it ([`poll::AdaptivePoll`]). Replaces
    /// `busy_poll` for sessions with a shared region.
    pub ring_poll: Duration,
    /// What each session is allowed and how it reaches the host IOMMU.
    pub session: SessionOptions,
}

/// The default busy-poll window.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

/// The default largest window to watch the shared region, KVM's default `halt_poll_ns` on x86
/// (200 us). Linux unmaps a virtio request's pages one by one, each with a TLBI and a CMD_SYNC
/// it waits for, a few microseconds apart, and a device's translation misses follow each other
/// as closely: watching the region that long turns each doorbell or miss after the first into
/// no wake-up at all, and the window shrinks to nothing when the guest's IOMMU work stops.
pub const DEFAULT_RING_POLL: Duration = Duration::from_micros(200);

impl Default for Options {
    fn default() -> Self {
        Self {
            busy_poll: DEFAULT_BUSY_POLL,
            ring_poll: DEFAULT_RING_POLL,
            session: SessionOptions::default(),
        }
    }
}

/// Whether `stream` has data (or a hang-up) to read now, without blocking.
fn readable_now(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

/// What arrived while the daemon spun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// A message on the main connection.
    Message,
    /// Writes posted or a translation request in the shared region.
    Posted,
    /// Nothing within the window.
    Quiet,
    /// A message, if the connection is readable now.
    IfReadable,
}

/// Spins until a message, a posted write or a translation request arrives, or `window` has
/// passed. The region is checked with memory loads; the connection with a poll, a system call,
/// so with a region (where messages are rare) only every 64th turn.
fn poll_for_next(session: &Session, window: Duration) -> Next {
    if window.is_zero() {
        return Next::Quiet;
    }
    let every = if session.kick().is_some() { 64u32 } else { 1 };
    let start = Instant::now();
    let mut turn = 0u32;
    loop {
        if session.region_has_work() {
            return Next::Posted;
        }
        if turn.is_multiple_of(every) {
            if readable_now(session.connection()) {
                return Next::Message;
            }
            if start.elapsed() >= window {
                return Next::Quiet;
            }
            if every > 1 {
                // Let a task that shares this CPU run (QEMU itself, on a small host).
                std::thread::yield_now();
            }
        }
        turn = turn.wrapping_add(1);
        std::hint::spin_loop();
    }
}

/// The poll window between bursts: fixed (`busy_poll`) on the message path, adaptive with a
/// shared region.
#[derive(Debug)]
struct Poller {
    adaptive: AdaptivePoll,
    /// When the last burst's final watch began, if the daemon went to sleep after it.
    idle_since: Option<Instant>,
}

impl Poller {
    fn new(options: &Options) -> Self {
        Self {
            adaptive: AdaptivePoll::new(options.ring_poll),
            idle_since: None,
        }
    }

    /// Watches for the next piece of work; notes when the watch began if none came.
    fn next(&mut self, session: &Session, options: &Options) -> Next {
        let window = if session.kick().is_some() {
            self.adaptive.window()
        } else {
            options.busy_poll
        };
        let start = Instant::now();
        let next = poll_for_next(session, window);
        if next == Next::Quiet {
            self.idle_since = Some(start);
        }
        next
    }

    /// The frontend woke the daemon: adapt the window to how long it was idle.
    fn woken(&mut self) {
        if let Some(since) = self.idle_since.take() {
            self.adaptive.idle_ended(since.elapsed());
        }
    }
}

/// How serving one frontend ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The frontend went away (or the session failed; logged).
    Ended,
    /// A shutdown signal arrived.
    Shutdown,
}

const TOKEN_MAIN: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_CHANNEL: u64 = 2;
const TOKEN_LISTENER: u64 = 3;
const TOKEN_HOST_EVENTS: u64 = 4;
const TOKEN_STATUS: u64 = 5;
const TOKEN_KICK: u64 = 6;

/// Empties the status pipe; returns whether SIGUSR1 came.
fn take_status_request(shutdown: &Shutdown) -> bool {
    let Some(fd) = shutdown.status.as_ref() else {
        return false;
    };
    let mut buf = [0u8; 16];
    let mut any = false;
    while let Ok(n) = rustix::io::read(fd, &mut buf) {
        if n == 0 {
            break;
        }
        any = true;
    }
    any
}

/// Watches the session's vEVENTQ fds, which come and go with the guest's event queue. A
/// closed fd leaves the epoll set by itself; a number reused for a new queue is added again.
fn sync_host_queues(
    epoll: &Epoll,
    session: &Session,
    watched: &mut Vec<(u32, RawFd)>,
) -> Result<(), DaemonError> {
    let now = session.event_fds();
    if now == *watched {
        return Ok(());
    }
    for &(_, fd) in watched.iter() {
        // Already gone when its queue was closed: ENOENT or EBADF is expected.
        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
    for &(_, fd) in &now {
        let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_HOST_EVENTS),
            )
            .map_err(DaemonError::Epoll)?;
    }
    *watched = now;
    Ok(())
}

fn watch(epoll: &Epoll, fd: &impl AsRawFd, token: u64) -> Result<(), DaemonError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(DaemonError::Epoll)
}

/// Serves one connected frontend until it disconnects or a shutdown signal arrives. Every
/// resource of the session is released on return.
pub fn serve_connection(
    stream: UnixStream,
    shutdown: &Shutdown,
    options: &Options,
) -> Result<Served, DaemonError> {
    let epoll = Epoll::new().map_err(DaemonError::Epoll)?;
    let mut session = Session::with_options(stream, options.session.clone());
    // A shutdown ends any wait for this frontend at once, mid-message or mid-exchange.
    session
        .cancel_on(shutdown.fd())
        .map_err(DaemonError::Signals)?;
    watch(&epoll, session.connection(), TOKEN_MAIN)?;
    watch(&epoll, &shutdown.fd().as_fd(), TOKEN_SIGNAL)?;
    if let Some(status) = shutdown.status.as_ref() {
        watch(&epoll, status, TOKEN_STATUS)?;
    }
    let mut channel_watched = false;
    let mut kick_watched = false;
    let mut host_queues: Vec<(u32, RawFd)> = Vec::new();
    let mut events = [EpollEvent::default(); 8];
    let mut poller = Poller::new(options);
    loop {
        if !channel_watched && let Some(channel) = session.channel() {
            watch(&epoll, channel, TOKEN_CHANNEL)?;
            channel_watched = true;
        }
        if !kick_watched && let Some(kick) = session.kick() {
            watch(&epoll, &kick, TOKEN_KICK)?;
            kick_watched = true;
        }
        sync_host_queues(&epoll, &session, &mut host_queues)?;
        // Writes posted while the backend decided to sleep are applied first (10.4 step 3).
        if !session.prepare_to_sleep() {
            if let Err(err) = session.drain_posted() {
                error!("session ended: {}", crate::error_chain(&err));
                log_end(&session);
                return Ok(Served::Ended);
            }
            continue;
        }
        let n = epoll.wait(-1, &mut events);
        session.awake();
        let n = match n {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DaemonError::Epoll(e)),
        };
        for event in events.iter().take(n) {
            match event.data() {
                TOKEN_SIGNAL => {
                    info!("shutting down");
                    session.leave_host_objects();
                    return Ok(Served::Shutdown);
                }
                TOKEN_STATUS => {
                    if take_status_request(shutdown) {
                        info!("status: {}", session.status_line());
                    }
                }
                TOKEN_KICK => {
                    // The posted writes, then what follows within the poll window.
                    poller.woken();
                    let served = session.handle_kick().and_then(|()| {
                        let next = poller.next(&session, options);
                        handle_burst(&mut session, options, &mut poller, next)
                    });
                    if let Some(end) = burst_end(&session, served) {
                        return Ok(end);
                    }
                }
                TOKEN_HOST_EVENTS => {
                    if let Err(err) = session.handle_host_events() {
                        error!("session ended: {}", crate::error_chain(&err));
                        log_end(&session);
                        return Ok(Served::Ended);
                    }
                }
                TOKEN_CHANNEL => {
                    // The frontend sends nothing unasked on the backend channel: this is a
                    // hang-up (or a protocol violation), which ends the session.
                    warn!(
                        "the backend channel was closed or sent unrequested data; ending the session"
                    );
                    log_end(&session);
                    return Ok(Served::Ended);
                }
                // A kick's ring-poll window earlier in this batch of events may have served
                // the message this event announced: look again rather than block in recv.
                _ => {
                    poller.woken();
                    let served = handle_burst(&mut session, options, &mut poller, Next::IfReadable);
                    if let Some(end) = burst_end(&session, served) {
                        return Ok(end);
                    }
                }
            }
        }
    }
}

/// Handles what woke the loop (a message, or work posted in the shared region), then
/// whatever follows within the poll window.
fn handle_burst(
    session: &mut Session,
    options: &Options,
    poller: &mut Poller,
    mut next: Next,
) -> Result<bool, SessionError> {
    loop {
        match next {
            Next::Message => {
                if !session.handle_one()? {
                    return Ok(false);
                }
            }
            Next::Posted => session.drain_posted()?,
            Next::IfReadable if readable_now(session.connection()) => {
                if !session.handle_one()? {
                    return Ok(false);
                }
            }
            Next::Quiet | Next::IfReadable => return Ok(true),
        }
        next = poller.next(session, options);
    }
}

/// What a burst's outcome means for the connection: `None` while the frontend is still there.
fn burst_end(session: &Session, served: Result<bool, SessionError>) -> Option<Served> {
    match served {
        Ok(true) => return None,
        Ok(false) => info!("frontend disconnected"),
        Err(err) => error!("session ended: {}", crate::error_chain(&err)),
    }
    log_end(session);
    Some(Served::Ended)
}

fn log_end(session: &Session) {
    let c = session.counters();
    info!(
        "session statistics: {} messages, {} refused, {} translations",
        c.messages, c.refused, c.translations
    );
}

/// Accepts frontends on `listener` one at a time until a shutdown signal arrives, telling the
/// service manager (`notifier`) whether one is being served.
pub fn serve_listener(
    listener: &UnixListener,
    shutdown: &Shutdown,
    options: &Options,
    notifier: &notify::Notifier,
) -> Result<(), DaemonError> {
    let epoll = Epoll::new().map_err(DaemonError::Epoll)?;
    watch(&epoll, listener, TOKEN_LISTENER)?;
    watch(&epoll, &shutdown.fd().as_fd(), TOKEN_SIGNAL)?;
    if let Some(status) = shutdown.status.as_ref() {
        watch(&epoll, status, TOKEN_STATUS)?;
    }
    let mut events = [EpollEvent::default(); 4];
    let mut frontends = 0u64;
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DaemonError::Epoll(e)),
        };
        for event in events.iter().take(n) {
            if event.data() == TOKEN_SIGNAL {
                info!("shutting down");
                return Ok(());
            }
            if event.data() == TOKEN_STATUS {
                if take_status_request(shutdown) {
                    info!("status: no frontend connected; listening");
                }
                continue;
            }
            let (stream, _) = listener.accept().map_err(DaemonError::Accept)?;
            info!("frontend connected");
            frontends = frontends.saturating_add(1);
            notifier.status(&format!("serving a frontend (connection {frontends})"));
            if serve_connection(stream, shutdown, options)? == Served::Shutdown {
                return Ok(());
            }
            info!("listening again");
            notifier.status(&format!("listening; {frontends} frontend(s) served"));
        }
    }
}

/// Keeps the session error type reachable for callers that serve a session themselves.
pub type ConnectionError = SessionError;
