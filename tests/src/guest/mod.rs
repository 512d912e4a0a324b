//! A guest driver for the vSMMU that programs it the way Linux's arm-smmu-v3 driver does.
//!
//! It reaches the SMMU's registers through an [`SmmuPort`] (in-process: [`DirectPort`]; later
//! the mock QEMU peer's socket) and guest RAM through `vm_memory::Bytes<GuestAddress>`.
//!
//! - [`bits`], [`regs`]: field helpers and register definitions (Linux's names);
//! - [`alloc`], [`mem`]: guest RAM allocation and little-endian accesses;
//! - [`queue`], [`cmd`], [`cmdq`]: queue arithmetic, command encodings, the command producer;
//! - [`event`], [`evtq`]: event decoding and the event-queue consumer;
//! - [`ste`], [`cd`], [`entry`], [`strtab`]: STE/CD builders, the hitless update, tables;
//! - [`pgtable`]: io-pgtable-arm style page tables;
//! - [`driver`]: probe, reset and the operations built on them;
//! - [`domain`]: attaching domains the way `arm_smmu_attach_dev` does.

pub mod alloc;
pub mod bits;
pub mod cd;
pub mod cmd;
pub mod cmdq;
pub mod domain;
pub mod driver;
pub mod entry;
pub mod event;
pub mod evtq;
pub mod mem;
pub mod pgtable;
pub mod port;
pub mod queue;
pub mod regs;
pub mod ste;
pub mod strtab;

use std::fmt;

pub use alloc::BumpAllocator;
pub use driver::{Driver, DriverConfig, SmmuInfo};
pub use mem::GuestRam;
pub use port::{DirectPort, SmmuPort};

/// Why a driver operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverError {
    /// The allocator has no room.
    OutOfMemory {
        /// Bytes asked for.
        size: u64,
        /// Alignment asked for.
        align: u64,
    },
    /// A guest RAM access failed.
    Memory {
        /// The address.
        addr: u64,
    },
    /// An address computation overflowed.
    Overflow,
    /// A poll loop gave up.
    Timeout(&'static str),
    /// The command queue stopped on an error (GERROR.CMDQ_ERR active).
    Command {
        /// CMDQ_CONS, pointing at the failed command.
        cons: u32,
        /// CMDQ_CONS.ERR.
        error: u32,
    },
    /// The probe refused the SMMU.
    Probe(&'static str),
    /// A caller error.
    InvalidArgument(&'static str),
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::OutOfMemory { size, align } => {
                write!(
                    f,
                    "out of guest RAM for {size:#x} bytes aligned to {align:#x}"
                )
            }
            DriverError::Memory { addr } => write!(f, "guest RAM access at {addr:#x} failed"),
            DriverError::Overflow => write!(f, "address overflow"),
            DriverError::Timeout(what) => write!(f, "timeout: {what}"),
            DriverError::Command { cons, error } => {
                write!(f, "command queue error {error} at CONS {cons:#x}")
            }
            DriverError::Probe(what) => write!(f, "probe failed: {what}"),
            DriverError::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
        }
    }
}

impl std::error::Error for DriverError {}

/// Driver results.
pub type Result<T> = std::result::Result<T, DriverError>;
