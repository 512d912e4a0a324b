//! Guest RAM as QEMU's memfd memory backend provides it: a sealed memfd, mapped shared here and
//! handed to the backend by fd.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use anyhow::Context;
use rustix::fs::{MemfdFlags, SealFlags, fcntl_add_seals, ftruncate, memfd_create};
use viommu_backend::session::guest_memory::map_region;
use viommu_protocol::MemRegion;
use vm_memory::GuestMemoryMmap;

/// One memfd RAM region, mapped in this process.
#[derive(Debug)]
pub struct MemfdRam {
    file: File,
    region: MemRegion,
    mem: GuestMemoryMmap<()>,
}

impl MemfdRam {
    /// `size` bytes of zeroed RAM at guest physical address `gpa`, sealed against shrinking and
    /// growing as QEMU's `memory-backend-memfd` seals it.
    pub fn new(gpa: u64, size: u64) -> anyhow::Result<Self> {
        let fd = memfd_create(
            "mock-qemu-ram",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .context("memfd_create")?;
        ftruncate(&fd, size).context("sizing the guest RAM memfd")?;
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .context("sealing the guest RAM memfd")?;
        Self::mapped(fd, gpa, size)
    }

    /// `size` bytes of RAM that the frontend can still shrink (as hugetlbfs and disk files
    /// are: they cannot be sealed).
    pub fn unsealed(gpa: u64, size: u64) -> anyhow::Result<Self> {
        let fd = memfd_create("mock-qemu-ram", MemfdFlags::CLOEXEC).context("memfd_create")?;
        ftruncate(&fd, size).context("sizing the guest RAM memfd")?;
        Self::mapped(fd, gpa, size)
    }

    /// Maps the sized memfd `fd` here, as the RAM at `gpa`.
    fn mapped(fd: OwnedFd, gpa: u64, size: u64) -> anyhow::Result<Self> {
        let region = MemRegion {
            gpa,
            size,
            mmap_offset: 0,
        };
        let file = File::from(fd);
        let mapped = map_region(&region, file.try_clone()?.into())
            .context("mapping guest RAM in the mock peer")?;
        let mem = GuestMemoryMmap::from_arc_regions(vec![mapped])
            .context("building the guest memory map")?;
        Ok(Self { file, region, mem })
    }

    /// The region as a memory-table entry.
    pub fn region(&self) -> MemRegion {
        self.region
    }

    /// A new fd of the memfd, to hand over.
    pub fn fd(&self) -> anyhow::Result<OwnedFd> {
        self.file
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the guest RAM fd")
    }

    /// The guest memory as this process sees it (shares the pages with the backend).
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }
}
