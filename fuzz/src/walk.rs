//! The `walk` target's input.

use crate::world::{Addr, Txn, WorldSpec};
use crate::{fuzz_enum, fuzz_struct};

fuzz_enum! {
    /// A descriptor word of the world.
    pub enum Target {
        Ste { stream: u8, word: u8 },
        Cd { stream: u8, context: u8, word: u8 },
        Pte { stage2: bool, map: u8, offset: u32, level: u8 },
        StrtabL1 { stream: u8 },
        CdL1 { stream: u8, context: u8 },
        Raw { addr: Addr },
    }
}

fuzz_enum! {
    /// How a word changes.
    pub enum MutOp {
        Set { value: u64 },
        Xor { value: u64 },
        FlipBit { bit: u8 },
        /// The word's address field (bits [51:12], or [51:4] when `fine`) now points at
        /// another descriptor: a table pointing at itself, at its parent, at an STE...
        PointTo { target: Target, fine: bool },
    }
}

fuzz_enum! {
    /// One step.
    pub enum Step {
        Mutate { target: Target, op: MutOp },
        Translate { txn: Txn },
        Invalidate,
        InvalidateStream { stream: u8 },
    }
}

fuzz_struct! {
    /// A world, then steps.
    pub struct Input {
        world: WorldSpec,
        steps: Vec<Step>,
    }
}
