//! The mock's side of the shared region (docs/protocol.md, section 10), as QEMU's frontend
//! has it: register reads from the mirror after the posted writes are applied, posted writes
//! with a kick only when the backend sleeps, translation lookups before a translation request,
//! and with SHARED_TRANSLATE those requests in the region, waits ending with the call eventfd.

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd, poll};
use viommu_protocol::shared::{Answer, FrontendSide, Posted, Region, SharedError};
use viommu_protocol::types::TranslateRequest;

/// How long the mock waits for the backend to apply posted writes (QEMU's MMIO_READ timeout).
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a waiting frontend spins before it sleeps (QEMU's `poll-us` default).
pub const SPIN: Duration = Duration::from_micros(50);

fn deadline_from_now() -> Instant {
    let now = Instant::now();
    now.checked_add(APPLY_TIMEOUT).unwrap_or(now)
}

/// Whether mocks use the shared region when the backend offers it:
/// `VIOMMU_MOCK_SHARED=1` turns it on for every suite (off by default, so that the suites
/// also cover a frontend written from sections 1 to 9 alone).
pub fn wanted_by_default() -> bool {
    std::env::var("VIOMMU_MOCK_SHARED").is_ok_and(|v| v == "1")
}

/// The frontend's region, kick and (with SHARED_TRANSLATE) call, shared by the mock and its
/// register port.
#[derive(Debug)]
pub struct SharedFrontend {
    side: RefCell<FrontendSide>,
    kick: OwnedFd,
    call: Option<OwnedFd>,
    spin: Cell<Duration>,
    counters: RefCell<SharedSent>,
}

/// The fds a frontend hands over with SET_SHARED_REGION.
#[derive(Debug)]
pub struct HandOver {
    /// The region.
    pub region: OwnedFd,
    /// The kick.
    pub kick: OwnedFd,
    /// The call, with SHARED_TRANSLATE.
    pub call: Option<OwnedFd>,
}

/// What went through the region instead of messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedSent {
    /// Register reads served by the mirror.
    pub mirror_reads: u64,
    /// Writes posted in the ring.
    pub posted: u64,
    /// Kicks written.
    pub kicks: u64,
    /// Translation requests placed in the region (10.9).
    pub requests: u64,
    /// Waits that went to sleep on the call eventfd.
    pub sleeps: u64,
}

impl SharedFrontend {
    /// A new region and kick, and a call if `with_call` (SHARED_TRANSLATE); returns them with
    /// the fds to send in SET_SHARED_REGION.
    pub fn create(with_call: bool) -> anyhow::Result<(Rc<Self>, HandOver)> {
        let region = Region::create().context("shared region")?;
        let region_fd = region.fd().try_clone_to_owned().context("dup region")?;
        let new_eventfd = || eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK);
        let kick = new_eventfd().context("eventfd")?;
        let theirs = kick.try_clone().context("dup kick")?;
        let call = with_call.then(new_eventfd).transpose().context("eventfd")?;
        let their_call = call
            .as_ref()
            .map(|c| c.try_clone())
            .transpose()
            .context("dup call")?;
        let me = Rc::new(Self {
            side: RefCell::new(FrontendSide::new(region)),
            kick,
            call,
            spin: Cell::new(SPIN),
            counters: RefCell::default(),
        });
        Ok((
            me,
            HandOver {
                region: region_fd,
                kick: theirs,
                call: their_call,
            },
        ))
    }

    /// The fds to hand a resuming backend (docs/protocol.md, 10.10): the same region, kick and
    /// call; the sleep last kicked is forgotten, since a new backend counts its sleeps afresh.
    pub fn hand_over(&self) -> anyhow::Result<HandOver> {
        self.side.borrow_mut().new_backend();
        Ok(HandOver {
            region: self.region_fd()?,
            kick: self.kick.try_clone().context("dup kick")?,
            call: self
                .call
                .as_ref()
                .map(|c| c.try_clone())
                .transpose()
                .context("dup call")?,
        })
    }

    /// Another fd of the region (to corrupt it on purpose, in tests of a hostile frontend).
    pub fn region_fd(&self) -> anyhow::Result<OwnedFd> {
        self.side
            .borrow()
            .region()
            .fd()
            .try_clone_to_owned()
            .context("dup region")
    }

    /// How long a wait spins before it sleeps on the call ([`SPIN`] by default; zero makes
    /// every wait sleep).
    pub fn set_spin(&self, spin: Duration) {
        self.spin.set(spin);
    }

    /// Counters.
    pub fn sent(&self) -> SharedSent {
        *self.counters.borrow()
    }

    fn kick(&self) {
        if let Err(e) = rustix::io::write(&self.kick, &1u64.to_ne_bytes()) {
            log::warn!("kick: {e}");
        }
        let mut c = self.counters.borrow_mut();
        c.kicks = c.kicks.saturating_add(1);
    }

    /// Waits until `done` gives a value, as QEMU does: spinning for [`SPIN`], then, with a
    /// call eventfd, announcing the wait, checking once more and sleeping on the call (10.9);
    /// without one, yielding. `what` names the wait in the timeout's error.
    fn wait_for<T>(
        &self,
        what: &str,
        mut done: impl FnMut(&mut FrontendSide) -> Result<Option<T>, SharedError>,
    ) -> Result<T, SharedError> {
        let start = Instant::now();
        let deadline = deadline_from_now();
        loop {
            let found = done(&mut self.side.borrow_mut())?;
            if let Some(v) = found {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SharedError::Broken(format!("{what} within the timeout")));
            }
            let Some(call) = self
                .call
                .as_ref()
                .filter(|_| now.saturating_duration_since(start) >= self.spin.get())
            else {
                std::thread::yield_now();
                continue;
            };
            self.side.borrow_mut().announce_wait();
            let found = done(&mut self.side.borrow_mut());
            if !matches!(found, Ok(None)) {
                self.side.borrow().end_wait();
            }
            if let Some(v) = found? {
                return Ok(v);
            }
            {
                let mut c = self.counters.borrow_mut();
                c.sleeps = c.sleeps.saturating_add(1);
            }
            let mut fds = [PollFd::new(call, PollFlags::IN)];
            // Only the call ends the sleep before the deadline (a backend that does not call
            // is caught by it); EINTR just goes round again.
            let left =
                Timespec::try_from(deadline.saturating_duration_since(now)).unwrap_or(Timespec {
                    tv_sec: 5,
                    tv_nsec: 0,
                });
            let _ = poll(&mut fds, Some(&left));
            self.side.borrow().end_wait();
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(call, &mut buf);
        }
    }

    /// Waits until every posted write is applied (10.3 step 1).
    pub fn wait_applied(&self) -> Result<(), SharedError> {
        self.wait_for("posted writes not applied", |side| {
            Ok((!side.writes_pending()?).then_some(()))
        })
    }

    /// Whether translations go through the region (SHARED_TRANSLATE).
    pub fn translates(&self) -> bool {
        self.call.is_some()
    }

    /// Places a translation request in the region (10.9) without waiting for its answer (a
    /// frontend whose backend dies before it answers); [`SharedFrontend::answer_now`] looks.
    pub fn post_request(&self, t: &TranslateRequest) {
        if self.side.borrow_mut().request_translation(t) == Posted::Kick {
            self.kick();
        }
        let mut c = self.counters.borrow_mut();
        c.requests = c.requests.saturating_add(1);
    }

    /// The answer to the request outstanding, if the backend gave it.
    pub fn answer_now(&self) -> Result<Option<Answer>, SharedError> {
        self.side.borrow().answer()
    }

    /// Waits for the answer to the request outstanding.
    pub fn wait_answer(&self) -> Result<Answer, SharedError> {
        self.wait_for("no answer to a translation request", |side| side.answer())
    }

    /// A translation request through the region (10.9), and its answer.
    pub fn translate(&self, t: &TranslateRequest) -> Result<Answer, SharedError> {
        self.post_request(t);
        self.wait_answer()
    }

    /// A register read from the mirror, `None` where it is not mirrored.
    pub fn read(&self, offset: u64, size: u32) -> Result<Option<u64>, SharedError> {
        self.wait_applied()?;
        let value = self
            .side
            .borrow()
            .read_register(offset, size, deadline_from_now())?;
        if value.is_some() {
            let mut c = self.counters.borrow_mut();
            c.mirror_reads = c.mirror_reads.saturating_add(1);
        }
        Ok(value)
    }

    /// Posts a write (10.4), kicking when the backend sleeps, and once when the ring is full
    /// before it waits for room.
    pub fn write(&self, offset: u64, size: u32, value: u64) -> Result<(), SharedError> {
        let offset = u32::try_from(offset)
            .map_err(|_| SharedError::Broken(format!("offset {offset:#x}")))?;
        let deadline = deadline_from_now();
        let mut kicked_full = false;
        loop {
            let posted = self.side.borrow_mut().post(offset, size, value)?;
            match posted {
                Posted::Quiet => {}
                Posted::Kick => self.kick(),
                Posted::Full => {
                    if !kicked_full {
                        self.kick();
                        kicked_full = true;
                    }
                    if Instant::now() >= deadline {
                        return Err(SharedError::Broken("the ring stayed full".into()));
                    }
                    std::thread::yield_now();
                    continue;
                }
            }
            let mut c = self.counters.borrow_mut();
            c.posted = c.posted.saturating_add(1);
            return Ok(());
        }
    }

    /// A translation cache lookup (10.6) of an access that reads, writes or both.
    pub fn lookup(
        &self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        read: bool,
        write: bool,
    ) -> Option<u64> {
        let side = self.side.borrow();
        let gpa = match (read, write) {
            (_, true) => side.lookup(sid, ssid, iova, true),
            (true, false) => side.lookup(sid, ssid, iova, false),
            (false, false) => None,
        }?;
        (!(read && write) || side.lookup(sid, ssid, iova, false) == Some(gpa)).then_some(gpa)
    }
}
