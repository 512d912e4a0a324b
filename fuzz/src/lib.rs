//! Shared parts of the fuzz targets of viommu-user (see `fuzz/README.md`): structure-aware
//! input types with an exact encoder for seeds, real descriptors, the protocol targets' input
//! format, and the guest world (RAM, stream table, CDs, page tables) the model targets start
//! from.

pub mod cmdq;
pub mod codec;
pub mod fds;
pub mod proto;
pub mod session;
pub mod walk;
pub mod world;
