//! SMMUv3 architecture definitions (Arm IHI 0070): registers, stream table entries, context
//! descriptors, commands and event records, and the translation table descriptors (Arm ARM
//! VMSAv8-64) the SMMU walks.
//!
//! Names follow the specification; every field documents its bit range. Values the guest
//! writes are kept as raw bits in bitfield structs and decoded into open enums where a field
//! can hold values the architecture does not define.

pub mod cd;
pub mod cmd;
pub mod event;
pub mod pt;
pub mod regs;
pub mod ste;
