//! The shared region (docs/protocol.md, section 10): memory both sides map, with the register
//! mirror, the ring of posted writes and the translation cache.
//!
//! [`Region`] is the mapping and its layout. Each side's rules live in its own type, which keeps
//! that side's private counters (never re-read from the region, which the peer may scribble on):
//!
//! - [`BackendSide`]: publishes registers, drains posted writes, fills and clears the cache;
//! - [`FrontendSide`]: reads registers, posts writes, looks translations up.
//!
//! Every access to the region is an atomic load or store of the field's own width, through
//! vm-memory's checked atomic references, so neither side can cause undefined behaviour in the
//! other whatever it writes; the orderings are the ones section 10 specifies.

mod backend_side;
mod frontend_side;
mod layout;
mod tcache;
mod xlate;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

use rustix::fs::{MemfdFlags, SealFlags};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

pub use backend_side::{BackendSide, PostedWrite};
pub use frontend_side::{FrontendSide, Posted};
pub use layout::*;
pub use tcache::{CachedTranslation, TC_ENTRIES, TcEntry, tc_index};
pub use xlate::Answer;

/// What can be wrong with a region handed over at SET_SHARED_REGION, or with its contents.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The file is not a memfd of the right size with the right seals.
    #[error("shared region file: {0}")]
    File(String),
    /// The header is not version 1's.
    #[error("shared region header: {0}")]
    Header(String),
    /// Mapping it failed.
    #[error("mapping the shared region failed: {0}")]
    Map(String),
    /// Creating it failed (frontend).
    #[error("creating the shared region failed: {0}")]
    Create(#[source] rustix::io::Errno),
    /// The peer broke the region's rules (section 10.7).
    #[error("the peer broke the shared region's rules: {0}")]
    Broken(String),
}

/// A memfd of `size` bytes sealed against shrinking and growing: the shared region, and a
/// backend's host record (docs/protocol.md 10.11).
pub fn sealed_memfd(name: &str, size: usize) -> Result<OwnedFd, rustix::io::Errno> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)?;
    Ok(fd)
}

/// Checks that a file handed over is what [`sealed_memfd`] makes: a regular file of exactly
/// `size` bytes, sealed against shrinking and growing and not against writes. The error says
/// what is wrong.
pub fn check_sealed_memfd(fd: BorrowedFd<'_>, size: usize) -> Result<(), String> {
    let stat = rustix::fs::fstat(fd).map_err(|e| format!("fstat: {e}"))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err("not a regular file".into());
    }
    if u64::try_from(stat.st_size).ok() != Some(size as u64) {
        return Err(format!("size {:#x}, not {size:#x}", stat.st_size));
    }
    let seals =
        rustix::fs::fcntl_get_seals(fd).map_err(|e| format!("not a sealable memfd: {e}"))?;
    if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
        return Err("not sealed against shrinking and growing".into());
    }
    if seals.contains(SealFlags::WRITE) || seals.contains(SealFlags::FUTURE_WRITE) {
        return Err("sealed against writes".into());
    }
    Ok(())
}

/// One mapping of the shared region.
pub struct Region {
    map: MmapRegion<()>,
    fd: OwnedFd,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("size", &REGION_SIZE)
            .finish_non_exhaustive()
    }
}

impl Region {
    /// Frontend: a new region, a sealed memfd with the header written and everything else
    /// zero (section 10.1).
    pub fn create() -> Result<Self, SharedError> {
        let fd = sealed_memfd("viommu-shared-region", REGION_SIZE).map_err(SharedError::Create)?;
        let region = Self::map(fd)?;
        region.u64_at(off::MAGIC).store(MAGIC, Ordering::Relaxed);
        region
            .u32_at(off::VERSION)
            .store(VERSION, Ordering::Relaxed);
        region
            .u32_at(off::SIZE)
            .store(REGION_SIZE as u32, Ordering::Relaxed);
        Ok(region)
    }

    /// Backend: checks and maps the file the frontend handed over: a memfd of exactly
    /// [`REGION_SIZE`] bytes that can neither shrink nor grow, with version 1's header and an
    /// empty ring.
    pub fn adopt(fd: OwnedFd) -> Result<Self, SharedError> {
        Self::adopt_with(fd, false)
    }

    /// Backend: [`Region::adopt`] for a resume (10.10): the ring may hold writes the previous
    /// backend did not apply, up to a full ring.
    pub fn adopt_to_resume(fd: OwnedFd) -> Result<Self, SharedError> {
        Self::adopt_with(fd, true)
    }

    fn adopt_with(fd: OwnedFd, resume: bool) -> Result<Self, SharedError> {
        check_sealed_memfd(fd.as_fd(), REGION_SIZE).map_err(SharedError::File)?;
        let region = Self::map(fd)?;
        let magic = region.u64_at(off::MAGIC).load(Ordering::Relaxed);
        let version = region.u32_at(off::VERSION).load(Ordering::Relaxed);
        let size = region.u32_at(off::SIZE).load(Ordering::Relaxed);
        if magic != MAGIC {
            return Err(SharedError::Header(format!("magic {magic:#x}")));
        }
        if version != VERSION {
            return Err(SharedError::Header(format!("version {version}")));
        }
        if size as usize != REGION_SIZE {
            return Err(SharedError::Header(format!("size {size:#x}")));
        }
        let prod = region.u32_at(off::WRITE_PROD).load(Ordering::Acquire);
        let cons = region.u32_at(off::WRITE_CONS).load(Ordering::Relaxed);
        if !resume && prod != cons {
            return Err(SharedError::Header(format!(
                "write_prod {prod} != write_cons {cons}: the ring is not empty"
            )));
        }
        if prod.wrapping_sub(cons) > RING_ENTRIES {
            return Err(SharedError::Header(format!(
                "write_prod {prod} is more than a ring ahead of write_cons {cons}"
            )));
        }
        Ok(region)
    }

    fn map(fd: OwnedFd) -> Result<Self, SharedError> {
        let file = std::fs::File::from(
            fd.try_clone()
                .map_err(|e| SharedError::Map(format!("dup: {e}")))?,
        );
        let map = MmapRegion::from_file(FileOffset::new(file, 0), REGION_SIZE)
            .map_err(|e| SharedError::Map(e.to_string()))?;
        Ok(Self { map, fd })
    }

    /// The memfd, to hand over with SET_SHARED_REGION.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The u32 field at `offset`. Every offset this module uses is in bounds and aligned
    /// (checked by the layout's tests), so the lookup cannot fail.
    pub(crate) fn u32_at(&self, offset: usize) -> &AtomicU32 {
        self.map
            .get_atomic_ref::<AtomicU32>(offset)
            .expect("shared region offsets are in bounds and aligned")
    }

    /// The u64 field at `offset`.
    pub(crate) fn u64_at(&self, offset: usize) -> &AtomicU64 {
        self.map
            .get_atomic_ref::<AtomicU64>(offset)
            .expect("shared region offsets are in bounds and aligned")
    }
}

pub(crate) use std::sync::atomic::Ordering;
