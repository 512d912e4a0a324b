//! SMMUv3 architecture definitions (Arm IHI 0070): registers, stream table entries, context
//! descriptors, commands and event records.
//!
//! Names follow the specification; every field documents its bit range. Values the guest
//! writes are kept as raw bits in bitfield structs and decoded into open enums where a field
//! can hold values the architecture does not define.

pub mod cd;
pub mod cmd;
pub mod event;
pub mod regs;
pub mod ste;
