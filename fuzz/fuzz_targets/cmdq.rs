//! The command queue and the registers around it: register writes (CR0/1/2, STRTAB_BASE(_CFG),
//! the queues' BASE/PROD/CONS, GBPA, IRQ_CTRL, GERRORN, the MSI configurations), commands and
//! other guest memory contents, translations that fault into the event queue, resets. Every
//! write is served the way the session serves it, each CMD_SYNC barrier answered with
//! `serve_barrier`.
//!
//! Invariants: no panic; the loop settles and its effects stay proportionate to the commands
//! and events; an idle queue is disabled, stopped or empty; update handshakes complete;
//! SMMU-owned indices stay inside their queues; translations are aligned blocks that contain
//! their input; a snapshot restores to the same registers.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu_fuzz::cmdq::{BaseSel, Input, Op};
use viommu_fuzz::codec::from_bytes;
use viommu_fuzz::world::{Cmd, World, check_registers, check_snapshot};
use viommu_smmuv3::spec::regs::offset;
use viommu_tests::guest::mem::write_u64;
use vm_memory::{Bytes, GuestAddress};

fn step(w: &mut World, op: &Op) {
    match op {
        Op::Write { reg, value } => {
            let (off, size) = reg.offset();
            let value = if size == 4 {
                value & 0xffff_ffff
            } else {
                *value
            };
            w.write(off, size, value);
        }
        Op::WriteRaw {
            offset,
            wide,
            value,
        } => {
            let size = if *wide { 8 } else { 4 };
            let off = (u64::from(*offset) % 0x2_0000) & !u64::from(size - 1);
            let value = if size == 4 {
                value & 0xffff_ffff
            } else {
                *value
            };
            w.write(off, size, value);
        }
        Op::Read { reg } => {
            let (off, size) = reg.offset();
            w.smmu.mmio_read(off, size);
        }
        Op::ReadRaw { offset, wide } => {
            let size = if *wide { 8 } else { 4 };
            let off = (u64::from(*offset) % 0x2_0000) & !u64::from(size - 1);
            let v = w.smmu.mmio_read(off, size);
            if size == 4 {
                assert!(
                    v <= u64::from(u32::MAX),
                    "4-byte read of {off:#x} gave {v:#x}"
                );
            }
        }
        Op::Base { which, addr, log2 } => {
            let rwa = 1u64 << 62;
            let a = addr.resolve();
            match which {
                BaseSel::Cmdq => {
                    w.write(
                        offset::CMDQ_BASE,
                        8,
                        rwa | (a & !0x1f) | u64::from(log2 % 32),
                    );
                }
                BaseSel::Eventq => {
                    w.write(
                        offset::EVENTQ_BASE,
                        8,
                        rwa | (a & !0x1f) | u64::from(log2 % 32),
                    );
                }
                BaseSel::Strtab => {
                    w.write(offset::STRTAB_BASE, 8, rwa | (a & !0x3f));
                    let cfg = u64::from(*log2) | u64::from(log2 >> 6) << 16 | 8 << 6;
                    w.write(offset::STRTAB_BASE_CFG, 4, cfg);
                }
            }
        }
        Op::Cmds { cmds, publish } => {
            let words: Vec<[u64; 2]> = cmds.iter().take(256).map(Cmd::words).collect();
            if *publish {
                w.issue(&words);
            } else {
                // Written but not published: only a later PROD write makes them visible.
                let regs = w.smmu.registers();
                let q = regs.cmdq.geometry(w.features.cmdqs, 16);
                let mut prod = regs.cmdq.prod & q.pointer_mask();
                for cmd in &words {
                    if let Some(a) = q.entry_address(prod) {
                        let _ = write_u64(&w.mem, a, cmd[0]);
                        let _ = write_u64(&w.mem, a.wrapping_add(8), cmd[1]);
                    }
                    prod = q.increment(prod);
                }
            }
        }
        Op::CmdAt { slot, cmd } => {
            let regs = w.smmu.registers();
            let q = regs.cmdq.geometry(w.features.cmdqs, 16);
            if let Some(a) = q.entry_address(slot & q.pointer_mask()) {
                let [d0, d1] = cmd.words();
                let _ = write_u64(&w.mem, a, d0);
                let _ = write_u64(&w.mem, a.wrapping_add(8), d1);
            }
        }
        Op::Mem { addr, words } => {
            let mut a = addr.resolve();
            for word in words.iter().take(64) {
                let _ = write_u64(&w.mem, a, *word);
                a = a.wrapping_add(8);
            }
        }
        Op::Fill { addr, count, cmd } => {
            let [d0, d1] = cmd.words();
            let n = usize::from(count % 1024);
            let mut bytes = Vec::with_capacity(n * 16);
            for _ in 0..n {
                bytes.extend_from_slice(&d0.to_le_bytes());
                bytes.extend_from_slice(&d1.to_le_bytes());
            }
            let _ = w
                .mem
                .write_slice(&bytes, GuestAddress(addr.resolve() & !0xf));
        }
        Op::Translate { txn } => {
            let (sid, ssid, iova, access) = txn.resolve(w);
            let _ = w.smmu.stream_state(&w.mem, sid);
            let _ = w.translate(sid, ssid, iova, access);
        }
        Op::ConsumeEvents => {
            let prod = w.smmu.mmio_read(offset::EVENTQ_PROD, 4);
            w.write(offset::EVENTQ_CONS, 4, prod & 0x800f_ffff);
        }
        Op::AckErrors => {
            let gerror = w.smmu.mmio_read(offset::GERROR, 4);
            w.write(offset::GERRORN, 4, gerror);
        }
        Op::Reset => {
            w.smmu.reset();
            w.drive();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = from_bytes::<Input>(data) else {
        return;
    };
    let mut world = World::build(&input.world);
    check_registers(&mut world.smmu);
    for op in input.ops.iter().take(64) {
        step(&mut world, op);
        check_registers(&mut world.smmu);
    }
    check_snapshot(&world.smmu);
});
