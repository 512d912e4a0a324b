//! `viommu-backend`: an out-of-process virtual ARM SMMUv3 for QEMU.
//!
//! This crate holds the daemon's library: today the connection handling of the vIOMMU-user
//! protocol up to feature negotiation ([`session`]). The SMMUv3 model, the iommufd host backend
//! and the full session follow in their own modules.

pub mod inherited;
pub mod session;
pub mod smmuv3;
