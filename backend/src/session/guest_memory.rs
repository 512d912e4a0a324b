//! Guest RAM as the frontend's memory table describes it: fd-backed regions mapped shared into
//! this process, as a vm-memory `GuestMemoryMmap`.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::fs::{FileType, SealFlags, fcntl_get_seals, fstat};
use viommu_protocol::types::MemRegion;
use viommu_protocol::{ErrorReply, Status};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

use super::ram_guard;
use super::{Session, SessionError, refuse};

/// Guest memory of the model.
pub type GuestRam = GuestMemoryMmap<()>;

/// Why a region cannot be mapped or changed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The fd is not a regular file (a memfd, a hugetlbfs or tmpfs file, a file on disk).
    #[error("region at {gpa:#x}: the descriptor is {kind}, not a regular file or memfd")]
    WrongKind {
        /// The region's guest address.
        gpa: u64,
        /// What the descriptor is.
        kind: &'static str,
    },
    /// The file cannot back the region (smaller than the region says, or unreadable).
    #[error("region at {gpa:#x}: {reason}")]
    BadFile {
        /// The region's guest address.
        gpa: u64,
        /// What is wrong.
        reason: String,
    },
    /// mmap failed.
    #[error("region at {gpa:#x}: mmap failed")]
    Mmap {
        /// The region's guest address.
        gpa: u64,
        /// The error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The region overlaps one already mapped.
    #[error("region at {gpa:#x} size {size:#x} overlaps guest memory already mapped")]
    Overlap {
        /// The region's guest address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// No region with that guest address, size and file offset is mapped.
    #[error("no region at {gpa:#x} size {size:#x} file offset {mmap_offset:#x}")]
    NotFound {
        /// The guest address asked for.
        gpa: u64,
        /// The size asked for.
        size: u64,
        /// The file offset asked for.
        mmap_offset: u64,
    },
    /// The table would hold more regions than the backend maps.
    #[error("more than {max} memory regions")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// The region does not fit this process's address space.
    #[error("region at {gpa:#x} size {size:#x} does not fit this host")]
    TooLarge {
        /// The region's guest address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
}

/// Most regions the backend maps (GET_MAX_MEM_SLOTS).
pub const MAX_MEM_SLOTS: usize = 256;

/// Maps one region from its fd.
///
/// The file must be at least `mmap_offset + size` bytes long now. A file the frontend shrinks
/// later (one not sealed against shrinking) turns accesses to the lost pages into SIGBUS,
/// which [`crate::session::ram_guard`] turns into the end of the session.
pub fn map_region(
    region: &MemRegion,
    fd: OwnedFd,
) -> Result<Arc<GuestRegionMmap<()>>, MemoryError> {
    let bad = |reason: String| MemoryError::BadFile {
        gpa: region.gpa,
        reason,
    };
    let st = fstat(&fd).map_err(|e| bad(format!("fstat failed: {e}")))?;
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => None,
        FileType::Directory => Some("a directory"),
        FileType::CharacterDevice => Some("a character device"),
        FileType::BlockDevice => Some("a block device"),
        FileType::Fifo => Some("a pipe"),
        FileType::Socket => Some("a socket"),
        FileType::Symlink => Some("a symbolic link"),
        // eventfd, epoll, timerfd and other anonymous inodes have no file type.
        FileType::Unknown => Some("an anonymous inode (eventfd, timerfd, ...)"),
    };
    if let Some(kind) = kind {
        return Err(MemoryError::WrongKind {
            gpa: region.gpa,
            kind,
        });
    }
    let end = region
        .mmap_offset
        .checked_add(region.size)
        .ok_or_else(|| bad("offset overflow".into()))?;
    if u64::try_from(st.st_size).unwrap_or(0) < end {
        return Err(bad(format!(
            "file is {} bytes, the region needs {end}",
            st.st_size
        )));
    }
    match fcntl_get_seals(&fd) {
        Ok(seals) if seals.contains(SealFlags::SHRINK) => {}
        _ => log::debug!(
            "memory region at {:#x} is not sealed against shrinking; if the frontend truncates \
             it, the session ends (see ram_guard)",
            region.gpa
        ),
    }
    let size = usize::try_from(region.size).map_err(|_| MemoryError::TooLarge {
        gpa: region.gpa,
        size: region.size,
    })?;
    let file = File::from(fd);
    let mapping = MmapRegion::from_file(FileOffset::new(file, region.mmap_offset), size).map_err(
        |source| MemoryError::Mmap {
            gpa: region.gpa,
            source,
        },
    )?;
    GuestRegionMmap::new(mapping, GuestAddress(region.gpa))
        .map(Arc::new)
        .ok_or(MemoryError::TooLarge {
            gpa: region.gpa,
            size: region.size,
        })
}

/// Builds guest memory from a whole table (SET_MEM_TABLE). Nothing changes on error.
pub fn from_table(regions: Vec<(MemRegion, OwnedFd)>) -> Result<GuestRam, MemoryError> {
    if regions.len() > MAX_MEM_SLOTS {
        return Err(MemoryError::TooMany { max: MAX_MEM_SLOTS });
    }
    let mut mapped = regions
        .into_iter()
        .map(|(region, fd)| map_region(&region, fd))
        .collect::<Result<Vec<_>, _>>()?;
    if mapped.is_empty() {
        return Ok(GuestRam::default());
    }
    mapped.sort_by_key(|r| r.start_addr());
    GuestRam::from_arc_regions(mapped).map_err(|_| MemoryError::Overlap { gpa: 0, size: 0 })
}

/// Adds one region (ADD_MEM_REG). Returns the new memory; the old one is unchanged on error.
pub fn add(ram: &GuestRam, region: &MemRegion, fd: OwnedFd) -> Result<GuestRam, MemoryError> {
    if ram.num_regions() >= MAX_MEM_SLOTS {
        return Err(MemoryError::TooMany { max: MAX_MEM_SLOTS });
    }
    let overlaps = ram.iter().any(|r| {
        let start = r.start_addr().0;
        let last = start.saturating_add(r.len().saturating_sub(1));
        region.gpa <= last && start <= region.last_gpa()
    });
    if overlaps {
        return Err(MemoryError::Overlap {
            gpa: region.gpa,
            size: region.size,
        });
    }
    let mapped = map_region(region, fd)?;
    ram.insert_region(mapped).map_err(|_| MemoryError::Overlap {
        gpa: region.gpa,
        size: region.size,
    })
}

/// Removes the region whose guest address, size and file offset all equal `region`'s
/// (REM_MEM_REG).
pub fn remove(ram: &GuestRam, region: &MemRegion) -> Result<GuestRam, MemoryError> {
    let not_found = || MemoryError::NotFound {
        gpa: region.gpa,
        size: region.size,
        mmap_offset: region.mmap_offset,
    };
    let matches = ram.iter().any(|r| {
        r.start_addr().0 == region.gpa
            && r.len() == region.size
            && r.file_offset().map(FileOffset::start) == Some(region.mmap_offset)
    });
    if !matches {
        return Err(not_found());
    }
    ram.remove_region(GuestAddress(region.gpa), region.size)
        .map(|(ram, _)| ram)
        .map_err(|_| not_found())
}

impl Session {
    /// Puts new guest RAM in force, watched for a frontend that truncates it.
    pub(super) fn set_ram(&mut self, ram: GuestRam) -> Result<(), ErrorReply> {
        let mappings = ram.iter().filter_map(|r| {
            let start = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
            Some((start, usize::try_from(r.len()).ok()?))
        });
        let watch = ram_guard::Watch::new(mappings)
            .map_err(|e| refuse(Status::HOST_ERROR, crate::error_chain(&e)))?;
        self.ram = ram;
        self.ram_watch = watch;
        Ok(())
    }

    /// The guest RAM region the frontend shrank under the backend, if any: the session cannot
    /// go on (what was read there is gone).
    pub(super) fn lost_ram(&self) -> Option<SessionError> {
        let (start, len) = self.ram_watch.lost()?;
        let gpa = self
            .ram
            .iter()
            .find(|r| {
                r.get_host_address(MemoryRegionAddress(0))
                    .is_ok_and(|p| p as usize == start)
            })
            .map_or(0, |r| r.start_addr().0);
        Some(SessionError::GuestRamLost {
            gpa,
            size: len as u64,
        })
    }
}

pub(super) fn memory_refusal(e: MemoryError) -> ErrorReply {
    use MemoryError as M;
    // docs/protocol.md, SET_MEM_TABLE and ADD_MEM_REG: a descriptor of the wrong kind is an
    // invalid message; a file that cannot back the region is a host error.
    let status = match &e {
        M::WrongKind { .. } => Status::INVALID_MESSAGE,
        M::BadFile { .. } | M::TooLarge { .. } | M::Mmap { .. } => Status::HOST_ERROR,
        M::Overlap { .. } => Status::INVALID_ARGUMENT,
        M::NotFound { .. } => Status::NOT_FOUND,
        M::TooMany { .. } => Status::NO_SPACE,
    };
    refuse(status, crate::error_chain(&e))
}
