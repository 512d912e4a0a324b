//! The vSMMU's register window reached over the main connection, as QEMU's MMIO trap handlers
//! reach it: reads are MMIO_READ (answered), writes are MMIO_WRITE (posted, ordered before the
//! next read); with the shared region, reads of mirrored registers come from the mirror and
//! writes go into its ring.

use std::rc::Rc;

use crate::shared::SharedFrontend;

use viommu_protocol::{AccessSize, Error, Frontend, FrontendReply, FrontendRequest, MmioAccess};

use crate::guest::SmmuPort;

/// [`SmmuPort`] over the protocol. A failed access reads as all ones, like a bus error, and
/// the first failure is kept for [`SocketPort::take_error`].
#[derive(Debug)]
pub struct SocketPort {
    main: Rc<Frontend>,
    shared: Option<Rc<SharedFrontend>>,
    error: Option<Error>,
    reads: u64,
    writes: u64,
}

impl SocketPort {
    /// A port on `main`.
    pub fn new(main: Rc<Frontend>, shared: Option<Rc<SharedFrontend>>) -> Self {
        Self {
            main,
            shared,
            error: None,
            reads: 0,
            writes: 0,
        }
    }

    /// The first access that failed since the last call.
    pub fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    /// MMIO reads and writes sent.
    pub fn accesses(&self) -> (u64, u64) {
        (self.reads, self.writes)
    }

    fn fail(&mut self, e: Error) {
        log::warn!("MMIO access failed: {e}");
        self.error.get_or_insert(e);
    }
}

fn access(offset: u64, size: u32) -> MmioAccess {
    MmioAccess {
        offset,
        size: if size == 8 {
            AccessSize::Qword
        } else {
            AccessSize::Dword
        },
    }
}

impl SmmuPort for SocketPort {
    fn read(&mut self, offset: u64, size: u32) -> u64 {
        self.reads = self.reads.saturating_add(1);
        let all_ones = if size == 8 {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        if let Some(shared) = self.shared.as_ref() {
            match shared.read(offset, size) {
                Ok(Some(v)) => return v,
                Ok(None) => {}
                Err(e) => {
                    log::warn!("shared region: {e}");
                    self.fail(Error::Io(std::io::Error::other(e.to_string())));
                    return all_ones;
                }
            }
        }
        match self
            .main
            .call(&FrontendRequest::MmioRead(access(offset, size)))
        {
            Ok(FrontendReply::MmioValue(v)) => v,
            Ok(other) => {
                log::warn!("MMIO_READ answered with {other:?}");
                all_ones
            }
            Err(e) => {
                self.fail(e);
                all_ones
            }
        }
    }

    fn write(&mut self, offset: u64, size: u32, value: u64) {
        self.writes = self.writes.saturating_add(1);
        if let Some(shared) = self.shared.as_ref() {
            if let Err(e) = shared.write(offset, size, value) {
                log::warn!("shared region: {e}");
                self.fail(Error::Io(std::io::Error::other(e.to_string())));
            }
            return;
        }
        if let Err(e) = self.main.post(&FrontendRequest::MmioWrite {
            access: access(offset, size),
            value,
        }) {
            self.fail(e);
        }
    }
}
