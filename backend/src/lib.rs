//! `viommu-backend`: an out-of-process virtual ARM SMMUv3 for QEMU. The SMMUv3 model itself
//! is the crate `viommu_smmuv3`; this crate puts it behind the vIOMMU-user protocol.
//!
//! - [`daemon`]: the process around sessions: the event loop that serves frontends one after
//!   another, sockets inherited with `--fd`, and the sandbox;
//! - [`session`]: one frontend connection, the protocol around the model: the phase machine
//!   and dispatch, effects, devices, passthrough, saved state, guest memory;
//! - [`host`]: the host IOMMU (Linux iommufd) of passthrough mode, behind a trait;
//! - [`limits`]: what the operator lets a frontend configure (given on the command line,
//!   checked by the session).

pub mod daemon;
pub mod host;
pub mod limits;
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
