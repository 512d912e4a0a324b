//! The host record (docs/protocol.md, 10.11): a memfd the frontend holds for the backend, in
//! which the backend keeps the record of its iommufd objects, so that a backend that resumes
//! after the previous one died knows what to adopt.
//!
//! Two slots and a generation: the writer fills the slot the generation does not name, then
//! moves the generation to it with a release store, so a writer that dies mid-write leaves the
//! previous record whole. The reader is a later backend; it treats everything as hostile (the
//! frontend could have written anything into the file).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use viommu_protocol::shared::{check_sealed_memfd, sealed_memfd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};

use super::host_objects::PassthroughState;

/// "VIOMMREC" in memory.
pub const MAGIC: u64 = 0x4345_524d_4d4f_4956;
/// Layout version.
pub const VERSION: u32 = 1;
/// The file's size.
pub const SIZE: usize = 0x4_0000;

/// Field offsets (docs/protocol.md, 10.11).
mod off {
    pub const MAGIC: usize = 0x00;
    pub const VERSION: usize = 0x08;
    pub const SIZE: usize = 0x0c;
    pub const GEN: usize = 0x10;
    pub const EVENTS_IN_HAND: usize = 0x14;
    /// Slot `i` starts at `SLOTS[i]`: its length (u32), then its bytes.
    pub const SLOTS: [usize; 2] = [0x1000, 0x2_0000];

    /// The slot a generation names.
    pub const fn slot(generation: u32) -> usize {
        if generation & 1 == 0 {
            SLOTS[0]
        } else {
            SLOTS[1]
        }
    }
    /// Bytes a slot's record may take.
    pub const SLOT_CAPACITY: usize = 0x1_f000 - 4;
}

/// What can be wrong with a record file or its contents.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file is not a sealed memfd of the record's size.
    #[error("host record file: {0}")]
    File(String),
    /// Its header or slot is not a version 1 record.
    #[error("host record: {0}")]
    Contents(String),
    /// Making or mapping it failed.
    #[error("host record: {0}")]
    Io(String),
}

/// One mapping of the host record.
pub struct HostRecord {
    map: MmapRegion<()>,
    fd: OwnedFd,
}

impl std::fmt::Debug for HostRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRecord")
            .field("gen", &self.u32_at(off::GEN).load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl HostRecord {
    /// A new record, empty (generation 0, slot 0 of length 0 reads as no objects).
    pub fn create() -> Result<Self, RecordError> {
        let fd = sealed_memfd("viommu-host-record", SIZE)
            .map_err(|e| RecordError::Io(format!("making its memfd: {e}")))?;
        let record = Self::map(fd)?;
        record.u64_at(off::MAGIC).store(MAGIC, Ordering::Relaxed);
        record
            .u32_at(off::VERSION)
            .store(VERSION, Ordering::Relaxed);
        record
            .u32_at(off::SIZE)
            .store(SIZE as u32, Ordering::Relaxed);
        Ok(record)
    }

    /// The record a previous backend kept, as the frontend returned it: checked to be a memfd
    /// of the record's size, sealed against shrinking and growing, with version 1's header.
    pub fn adopt(fd: OwnedFd) -> Result<Self, RecordError> {
        check_sealed_memfd(fd.as_fd(), SIZE).map_err(RecordError::File)?;
        let record = Self::map(fd)?;
        let magic = record.u64_at(off::MAGIC).load(Ordering::Relaxed);
        let version = record.u32_at(off::VERSION).load(Ordering::Relaxed);
        let size = record.u32_at(off::SIZE).load(Ordering::Relaxed);
        if magic != MAGIC || version != VERSION || size as usize != SIZE {
            return Err(RecordError::Contents(format!(
                "header magic {magic:#x}, version {version}, size {size:#x} is not version 1's"
            )));
        }
        Ok(record)
    }

    fn map(fd: OwnedFd) -> Result<Self, RecordError> {
        let dup = fd
            .try_clone()
            .map_err(|e| RecordError::Io(format!("dup: {e}")))?;
        let map = MmapRegion::from_file(FileOffset::new(std::fs::File::from(dup), 0), SIZE)
            .map_err(|e| RecordError::Io(format!("mmap: {e}")))?;
        Ok(Self { map, fd })
    }

    /// The memfd, for the frontend to hold.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Offsets used here are constants in bounds and aligned (checked by the tests).
    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        self.map
            .get_atomic_ref::<AtomicU32>(offset)
            .expect("host record offsets are in bounds and aligned")
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        self.map
            .get_atomic_ref::<AtomicU64>(offset)
            .expect("host record offsets are in bounds and aligned")
    }

    /// Writes `state` as the current record: into the other slot, then the generation moves
    /// to it (release), so a death during the write leaves the previous record current.
    pub fn write(&self, state: &PassthroughState) -> Result<(), RecordError> {
        let bytes = serde_json::to_vec(state)
            .map_err(|e| RecordError::Io(format!("encoding the record: {e}")))?;
        if bytes.len() > off::SLOT_CAPACITY {
            return Err(RecordError::Io(format!(
                "the record takes {} bytes, more than a slot's {}",
                bytes.len(),
                off::SLOT_CAPACITY
            )));
        }
        let generation = self.u32_at(off::GEN).load(Ordering::Relaxed);
        let next = generation.wrapping_add(1);
        let slot = off::slot(next);
        let at = slot.saturating_add(4);
        self.map
            .as_volatile_slice()
            .write_slice(&bytes, at)
            .map_err(|e| RecordError::Io(format!("writing the record: {e}")))?;
        self.u32_at(slot)
            .store(bytes.len() as u32, Ordering::Relaxed);
        self.u32_at(off::GEN).store(next, Ordering::Release);
        Ok(())
    }

    /// The current record. An empty slot (a record never written) is no objects.
    pub fn read(&self) -> Result<PassthroughState, RecordError> {
        let generation = self.u32_at(off::GEN).load(Ordering::Acquire);
        let slot = off::slot(generation);
        let len = self.u32_at(slot).load(Ordering::Relaxed) as usize;
        if len == 0 {
            return Ok(PassthroughState::default());
        }
        if len > off::SLOT_CAPACITY {
            return Err(RecordError::Contents(format!(
                "slot {} claims {len} bytes, more than its {}",
                generation & 1,
                off::SLOT_CAPACITY
            )));
        }
        let mut bytes = vec![0u8; len];
        self.map
            .as_volatile_slice()
            .read_slice(&mut bytes, slot.saturating_add(4))
            .map_err(|e| RecordError::Io(format!("reading the record: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RecordError::Contents(format!("slot {}: {e}", generation & 1)))
    }

    /// Sets or clears `events_in_hand`. Set before a vEVENTQ is read (sequentially consistent:
    /// the store precedes the read system call), cleared once the events are published.
    pub fn set_events_in_hand(&self, in_hand: bool) {
        self.u32_at(off::EVENTS_IN_HAND)
            .store(u32::from(in_hand), Ordering::SeqCst);
    }

    /// Whether a previous backend died holding host events it had not published.
    pub fn events_in_hand(&self) -> bool {
        self.u32_at(off::EVENTS_IN_HAND).load(Ordering::SeqCst) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::host_objects::{DeviceState, Target, VIommuState};
    use rustix::fs::MemfdFlags;

    fn state(devices: u32) -> PassthroughState {
        let mut s = PassthroughState::default();
        s.viommus.push(VIommuState {
            id: 5,
            s2_hwpt: 3,
            abort: 6,
            bypass: 7,
            veventq: Some(9),
            veventq_log2: Some(19),
            idr: [1, 2, 3, 4, 5, 6],
        });
        for h in 0..devices {
            s.devices.insert(
                h,
                DeviceState {
                    dev_id: u32::MAX,
                    viommu: 5,
                    vsid: u32::MAX,
                    vdevice: Some(u32::MAX),
                    nested: Some(u32::MAX),
                    target: Some(Target::Translate([u64::MAX, u64::MAX])),
                },
            );
        }
        s
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        // Every field in bounds and naturally aligned, slots inside the file and apart.
        for o in [off::GEN, off::EVENTS_IN_HAND, off::SIZE, off::VERSION] {
            assert_eq!(o % 4, 0);
        }
        assert_eq!(off::SLOTS[0] + 4 + off::SLOT_CAPACITY, 0x2_0000);
        assert!(off::SLOTS[1] + 4 + off::SLOT_CAPACITY <= SIZE);
        let r = HostRecord::create().unwrap();
        let mut head = [0u8; 16];
        r.map.as_volatile_slice().read_slice(&mut head, 0).unwrap();
        assert_eq!(&head[..8], b"VIOMMREC");
        assert_eq!(head[8..12], 1u32.to_le_bytes());
        assert_eq!(head[12..16], 0x4_0000u32.to_le_bytes());
    }

    #[test]
    fn the_largest_session_fits_a_slot() {
        // MAX_DEVICES passthrough devices with every field at its widest.
        let s = state(crate::session::MAX_DEVICES as u32);
        let r = HostRecord::create().unwrap();
        r.write(&s).unwrap();
        assert_eq!(r.read().unwrap(), s);
    }

    #[test]
    fn a_write_torn_by_death_leaves_the_previous_record() {
        let r = HostRecord::create().unwrap();
        assert_eq!(r.read().unwrap(), PassthroughState::default());
        let one = state(1);
        r.write(&one).unwrap();
        // The writer dies in the middle of the next write: garbage in the other slot, the
        // generation not moved yet.
        let other = off::SLOTS[0];
        r.u32_at(other).store(40, Ordering::Relaxed);
        r.map
            .as_volatile_slice()
            .write_slice(&[0xa5; 40], other + 4)
            .unwrap();
        assert_eq!(r.read().unwrap(), one);
        // A completed write after it is read back.
        let two = state(2);
        r.write(&two).unwrap();
        assert_eq!(r.read().unwrap(), two);
    }

    #[test]
    fn hostile_contents_are_errors_not_panics() {
        let r = HostRecord::create().unwrap();
        r.write(&state(1)).unwrap();
        let slot = off::SLOTS[1];
        r.u32_at(slot).store(u32::MAX, Ordering::Relaxed);
        assert!(matches!(r.read(), Err(RecordError::Contents(_))));
        r.u32_at(slot).store(3, Ordering::Relaxed);
        assert!(matches!(r.read(), Err(RecordError::Contents(_))));
        // A header that is not version 1's, and files that are not a record.
        let fd = r.fd().try_clone_to_owned().unwrap();
        r.u32_at(off::VERSION).store(2, Ordering::Relaxed);
        assert!(matches!(
            HostRecord::adopt(fd),
            Err(RecordError::Contents(_))
        ));
        let unsealed = rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, SIZE as u64).unwrap();
        assert!(matches!(
            HostRecord::adopt(unsealed),
            Err(RecordError::File(_))
        ));
        let (pipe, _w) = rustix::pipe::pipe().unwrap();
        assert!(matches!(HostRecord::adopt(pipe), Err(RecordError::File(_))));
    }

    #[test]
    fn events_in_hand_survives_in_the_file() {
        let r = HostRecord::create().unwrap();
        r.set_events_in_hand(true);
        let again = HostRecord::adopt(r.fd().try_clone_to_owned().unwrap()).unwrap();
        assert!(again.events_in_hand());
        r.set_events_in_hand(false);
        assert!(!again.events_in_hand());
    }
}
