//! The `cmdq` target's input.

use crate::world::{Addr, Cmd, Reg, Txn, WorldSpec};
use crate::{fuzz_enum, fuzz_struct};

fuzz_enum! {
    /// Which queue or table a base write moves.
    pub enum BaseSel { Cmdq, Eventq, Strtab }
}

fuzz_enum! {
    /// One step of the guest.
    pub enum Op {
        Write { reg: Reg, value: u64 },
        WriteRaw { offset: u32, wide: bool, value: u64 },
        Read { reg: Reg },
        ReadRaw { offset: u32, wide: bool },
        Base { which: BaseSel, addr: Addr, log2: u8 },
        Cmds { cmds: Vec<Cmd>, publish: bool },
        CmdAt { slot: u32, cmd: Cmd },
        Mem { addr: Addr, words: Vec<u64> },
        Fill { addr: Addr, count: u16, cmd: Cmd },
        Translate { txn: Txn },
        ConsumeEvents,
        AckErrors,
        Reset,
    }
}

fuzz_struct! {
    /// A world, then a sequence of steps.
    pub struct Input {
        world: WorldSpec,
        ops: Vec<Op>,
    }
}
