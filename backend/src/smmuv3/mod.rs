//! The SMMUv3 model: a pure library. It reads and writes guest memory through vm-memory and
//! returns effects; it does no socket or ioctl I/O.

pub mod spec;
pub mod walk;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

/// Guest memory as the model reads it: anything vm-memory can read and write objects in.
pub trait GuestMemory: Bytes<GuestAddress, E = GuestMemoryError> {}

impl<T: Bytes<GuestAddress, E = GuestMemoryError>> GuestMemory for T {}
