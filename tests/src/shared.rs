//! The mock's side of the shared region (docs/protocol.md, section 10), as QEMU's frontend
//! has it: register reads from the mirror after the posted writes are applied, posted writes
//! with a kick only when the backend sleeps, and translation lookups before TRANSLATE.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::event::{EventfdFlags, eventfd};
use viommu_protocol::shared::{FrontendSide, Posted, Region, SharedError};

/// How long the mock waits for the backend to apply posted writes (QEMU's MMIO_READ timeout).
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The frontend's region and kick, shared by the mock and its register port.
#[derive(Debug)]
pub struct SharedFrontend {
    side: RefCell<FrontendSide>,
    kick: OwnedFd,
    counters: RefCell<SharedSent>,
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
}

impl SharedFrontend {
    /// A new region and kick; returns them with the fds to send in SET_SHARED_REGION.
    pub fn create() -> anyhow::Result<(Rc<Self>, OwnedFd, OwnedFd)> {
        let region = Region::create().context("shared region")?;
        let region_fd = region.fd().try_clone_to_owned().context("dup region")?;
        let kick = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).context("eventfd")?;
        let theirs = kick.try_clone().context("dup kick")?;
        let me = Rc::new(Self {
            side: RefCell::new(FrontendSide::new(region)),
            kick,
            counters: RefCell::default(),
        });
        Ok((me, region_fd, theirs))
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

    /// Waits until every posted write is applied (10.3 step 1).
    pub fn wait_applied(&self) -> Result<(), SharedError> {
        let deadline = deadline_from_now();
        while self.side.borrow_mut().writes_pending()? {
            if Instant::now() >= deadline {
                return Err(SharedError::Broken(
                    "posted writes not applied within the timeout".into(),
                ));
            }
            std::thread::yield_now();
        }
        Ok(())
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
