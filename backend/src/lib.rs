//! `viommu-backend`: an out-of-process virtual ARM SMMUv3 for QEMU.
//!
//! - the SMMUv3 model itself is the crate `viommu_smmuv3`;
//! - [`session`]: one frontend connection, the protocol around the model;
//! - [`memory`]: guest RAM from the frontend's memory table;
//! - [`ram_guard`]: surviving a frontend that truncates guest RAM (SIGBUS);
//! - [`handed_out`]: what the frontend may have cached, so invalidations it need not hear of
//!   cost no round trip;
//! - [`daemon`]: the event loop that serves frontends one after another;
//! - [`inherited`]: adopting a socket passed with `--fd`;
//! - [`limits`]: what the operator lets a frontend configure;
//! - [`sandbox`]: seccomp, Landlock and privilege drops before serving;
//! - [`passthrough`]: VFIO devices' iommufd objects, kept in step with the guest's STEs;
//! - [`host`]: the host IOMMU (Linux iommufd) of passthrough mode, behind a trait.

pub mod daemon;
pub mod handed_out;
pub mod host;
pub mod inherited;
pub mod limits;
pub mod memory;
pub mod model_config;
pub mod passthrough;
pub mod ram_guard;
pub mod sandbox;
pub mod session;

/// An error and its sources, joined for a log line or an error reply.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
