//! The command queue: consumption, CERROR_ILL for every illegal command, CERROR_ABT, Linux's
//! error recovery, CMD_SYNC completion (SEV, IRQ, MSI), wrap-around and the register rules
//! (IHI 0070 chapter 4, 7.1, 6.3.26-28; digest sections 4 and 5).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use common::*;
use viommu_smmuv3::{BarrierOutcome, CmdqStatus};

fn ste_changed(sid: u32) -> Effect {
    Effect::StreamsChanged(SidRange {
        first: sid,
        last: sid,
    })
}

fn cfgi(sid: u32) -> Command {
    CmdEnt::CfgiSte { sid, leaf: true }.build()
}

/// Issues [CFGI_STE 1, `bad`, CFGI_STE 2] + CMD_SYNC and checks the architected stop: CONS on
/// the bad command with ERR = CERROR_ILL, GERROR.CMDQ_ERR toggled and signalled, later
/// commands not executed and not executed by a new PROD write either. Then Linux's recovery:
/// the bad entry becomes a CMD_SYNC, GERRORN acknowledges, and processing resumes without a
/// PROD write.
#[track_caller]
fn expect_ill(d: &mut Drv, bad: Command, what: &str) {
    d.port.take_effects();
    let gerror = d.read32(ARM_SMMU_GERROR);
    let start = d.cmdq.llq.prod;
    let err = d.issue_raw_with_sync(&[cfgi(1), bad, cfgi(2)]).unwrap_err();
    let q = d.cmdq.llq;
    let bad_at = q.inc(start);
    let expected_cons = bad_at | (CMDQ_ERR_CERROR_ILL_IDX << 24);
    assert_eq!(
        err,
        DriverError::Command {
            cons: expected_cons,
            error: CMDQ_ERR_CERROR_ILL_IDX
        },
        "{what}: {bad:x?}"
    );
    assert_eq!(
        d.read32(ARM_SMMU_GERROR),
        gerror ^ GERROR_CMDQ_ERR,
        "{what}: GERROR toggles"
    );
    assert_eq!(gerror_active(d), GERROR_CMDQ_ERR);
    let fx = effects(d);
    assert!(fx.contains(&ste_changed(1)), "{what}: older command done");
    assert!(
        !fx.contains(&ste_changed(2)),
        "{what}: newer command not executed"
    );
    assert!(fx.contains(&Effect::Irq(IrqLine::Gerror)), "{what}: {fx:?}");
    // Another PROD write does not restart the queue.
    let prod = d.read32(ARM_SMMU_CMDQ_PROD);
    d.write32(ARM_SMMU_CMDQ_PROD, prod);
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), expected_cons);
    assert!(!effects(d).contains(&ste_changed(2)));
    // Linux's arm_smmu_gerror_handler.
    assert_eq!(d.handle_gerror().unwrap(), GERROR_CMDQ_ERR);
    let slot: [u64; 2] = read_qwords(&d.mem, d.cmdq.entry_addr(bad_at).unwrap()).unwrap();
    assert_eq!(slot[0] & 0xff, u64::from(op::CMD_SYNC));
    assert_eq!(gerror_active(d), 0);
    assert_eq!(
        d.read32(ARM_SMMU_CMDQ_CONS) & 0xfffff,
        d.read32(ARM_SMMU_CMDQ_PROD),
        "{what}: resumed"
    );
    assert!(effects(d).contains(&ste_changed(2)), "{what}");
    d.sync().unwrap();
}

/// Opcodes the architecture reserves, and the EL3, EL2 (no IDR0.HYP), Secure, stage-2 (no
/// S2P), ATS (no ATS), PRI (no PRI), stall (STALL_MODEL = 0b01) and MPAM (no MPAM) commands
/// on QEMU's stage-1 vSMMU (4.1.3, 4.2).
#[test]
fn cerror_ill_for_illegal_opcodes() {
    let mut d = boot(features());
    let opcodes: Vec<u8> = [
        0x00u8, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0f, 0x14, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1f, 0x20,
        0x21, 0x22, 0x23, 0x24, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2f, 0x31, 0x3f, 0x40, 0x41, 0x42,
        0x43, 0x44, 0x45, 0x47, 0x4f, 0x50, 0x51, 0x52, 0x53, 0x54, 0x57, 0x58, 0x59, 0x5a, 0x5b,
        0x5f, 0x60, 0x61, 0x6f, 0x71, 0x72, 0x74, 0x7f, 0x90, 0xa5, 0xff,
    ]
    .to_vec();
    for op in opcodes {
        expect_ill(
            &mut d,
            Command::raw(u64::from(op), 0),
            &format!("opcode {op:#x}"),
        );
    }
}

/// SSec = 1 on the Non-secure queue is CERROR_ILL for every command that has it (4.1.6).
#[test]
fn cerror_ill_for_ssec() {
    let mut d = boot(features());
    let cmds = [
        CmdEnt::PrefetchCfg { sid: 1 },
        CmdEnt::CfgiSte { sid: 1, leaf: true },
        CmdEnt::CfgiSteRange { sid: 0, range: 3 },
        CmdEnt::CfgiAll,
        CmdEnt::CfgiCd {
            sid: 1,
            ssid: 0,
            leaf: true,
        },
        CmdEnt::CfgiCdAll { sid: 1 },
    ];
    for cmd in cmds {
        expect_ill(
            &mut d,
            cmd.build().with_ssec(),
            &format!("{cmd:?} with SSec"),
        );
    }
    expect_ill(
        &mut d,
        Command::raw(u64::from(op::PREFETCH_ADDR) | (1 << 10), 0),
        "PREFETCH_ADDR SSec",
    );
}

/// CMD_SYNC with CS = 0b11 (Reserved), and a range TLBI with TG set and NUM = SCALE = TTL = 0
/// (Reserved with IDR3.RIL) (4.7.3, 4.4.1.1).
#[test]
fn cerror_ill_for_reserved_fields() {
    let mut d = boot(features());
    expect_ill(
        &mut d,
        CmdEnt::Sync {
            cs: 3,
            msiaddr: 0,
            msidata: 0,
        }
        .build(),
        "CMD_SYNC CS = 0b11",
    );
    for tg in 1..=3 {
        let t = Tlbi {
            asid: 1,
            addr: 0x10_0000,
            tg,
            ..Tlbi::default()
        };
        expect_ill(
            &mut d,
            CmdEnt::TlbiNhVa(t).build(),
            "TLBI_NH_VA reserved range",
        );
        expect_ill(
            &mut d,
            CmdEnt::TlbiNhVaa(t).build(),
            "TLBI_NH_VAA reserved range",
        );
    }
    // NUM, SCALE or TTL set: legal.
    let t = Tlbi {
        asid: 1,
        addr: 0x10_0000,
        tg: 1,
        ttl: 3,
        ..Tlbi::default()
    };
    d.issue_cmds_with_sync(&[CmdEnt::TlbiNhVa(t)]).unwrap();
}

/// Feature-gated commands: stage-1 commands on a stage-2-only SMMU, a reserved TLBI_S2_IPA
/// range with S2P and RIL; the same commands are legal where the feature exists.
#[test]
fn cerror_ill_for_missing_features() {
    let f = Capabilities {
        s1p: false,
        s2p: true,
        ..features()
    };
    let mut d = boot(f);
    let t = Tlbi {
        asid: 1,
        addr: 0x10_0000,
        ..Tlbi::default()
    };
    for cmd in [
        CmdEnt::CfgiCd {
            sid: 1,
            ssid: 0,
            leaf: true,
        },
        CmdEnt::CfgiCdAll { sid: 1 },
        CmdEnt::TlbiNhAll { vmid: 0 },
        CmdEnt::TlbiNhAsid { vmid: 0, asid: 1 },
        CmdEnt::TlbiNhVa(t),
        CmdEnt::TlbiNhVaa(t),
    ] {
        expect_ill(&mut d, cmd.build(), &format!("{cmd:?} without S1P"));
    }
    let ipa = Tlbi {
        vmid: 1,
        addr: 0x10_0000,
        tg: 1,
        ..Tlbi::default()
    };
    expect_ill(
        &mut d,
        CmdEnt::TlbiS2Ipa(ipa).build(),
        "TLBI_S2_IPA reserved range",
    );
    d.issue_cmds_with_sync(&[
        CmdEnt::TlbiS12Vmall { vmid: 1 },
        CmdEnt::TlbiS2Ipa(Tlbi { num: 1, ..ipa }),
        CmdEnt::TlbiNsnhAll,
    ])
    .unwrap();
}

/// ATC_INV is legal with IDR0.ATS: forwarded to the host while SMMUEN = 1, ignored while 0.
#[test]
fn atc_inv_with_ats() {
    let f = Capabilities {
        ats: true,
        ..features()
    };
    let mut d = boot(f);
    let cmd = CmdEnt::AtcInv {
        sid: 8,
        ssid: Some(5),
        addr: 0,
        size: 52,
        global: true,
    };
    d.issue_cmd_with_sync(cmd).unwrap();
    let c = cmd.build();
    assert_eq!(
        c.0,
        [0x40 | (1 << 9) | (1 << 11) | (5 << 12) | (8 << 32), 52]
    );
    assert_eq!(
        effects(&mut d),
        [Effect::HostInvalidate(RawCommand {
            d0: c.0[0],
            d1: c.0[1]
        })]
    );
    d.write_reg_sync(
        CR0_CMDQEN | CR0_EVTQEN | CR0_ATSCHK,
        ARM_SMMU_CR0,
        ARM_SMMU_CR0ACK,
    )
    .unwrap();
    d.port.take_effects();
    d.issue_cmd_with_sync(cmd).unwrap();
    assert!(
        effects(&mut d).is_empty(),
        "ATC_INV ignored with SMMUEN = 0"
    );
}

/// After one error is acknowledged, the next toggles GERROR.CMDQ_ERR back (an error is
/// active while GERROR != GERRORN).
#[test]
fn cmdq_err_toggles() {
    let mut d = boot(features());
    expect_ill(&mut d, Command::raw(0, 0), "first");
    assert_eq!(d.read32(ARM_SMMU_GERROR) & GERROR_CMDQ_ERR, GERROR_CMDQ_ERR);
    expect_ill(&mut d, Command::raw(0, 0), "second");
    assert_eq!(d.read32(ARM_SMMU_GERROR) & GERROR_CMDQ_ERR, 0);
    assert_eq!(d.read32(ARM_SMMU_GERRORN) & GERROR_CMDQ_ERR, 0);
}

/// CERROR_ABT (7.1): the queue lies outside memory; CONS stays on the entry, ERR = 2. Linux
/// acknowledges and retries: the fetch fails again. Moving the queue back (with CMDQEN = 0)
/// and acknowledging resumes.
#[test]
fn cerror_abt_queue_outside_memory() {
    let mut d = boot(features());
    let enables = CR0_SMMUEN | CR0_EVTQEN;
    d.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.write64(ARM_SMMU_CMDQ_BASE, Q_BASE_RWA | OUTSIDE_RAM | 8);
    d.write32(ARM_SMMU_CMDQ_PROD, 0);
    d.write32(ARM_SMMU_CMDQ_CONS, 0);
    d.write_reg_sync(enables | CR0_CMDQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.port.take_effects();
    d.write32(ARM_SMMU_CMDQ_PROD, 2);
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), CMDQ_ERR_CERROR_ABT_IDX << 24);
    assert_eq!(gerror_active(&mut d), GERROR_CMDQ_ERR);
    assert_eq!(effects(&mut d), [Effect::Irq(IrqLine::Gerror)]);
    assert_eq!(d.handle_gerror().unwrap(), GERROR_CMDQ_ERR);
    assert_eq!(
        gerror_active(&mut d),
        GERROR_CMDQ_ERR,
        "refetch fails again"
    );
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS) & 0xfffff, 0);
    // Back to the driver's queue.
    d.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.write64(ARM_SMMU_CMDQ_BASE, d.cmdq.q_base());
    d.write32(ARM_SMMU_CMDQ_PROD, 0);
    d.write32(ARM_SMMU_CMDQ_CONS, 0);
    d.cmdq.llq.prod = 0;
    d.cmdq.llq.cons = 0;
    d.write_reg_sync(enables | CR0_CMDQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    assert_eq!(
        gerror_active(&mut d),
        GERROR_CMDQ_ERR,
        "CMDQEN does not acknowledge"
    );
    d.handle_gerror().unwrap();
    d.port.take_effects();
    d.issue_cmds_with_sync(&[CmdEnt::CfgiSte { sid: 3, leaf: true }])
        .unwrap();
    assert_eq!(effects(&mut d), [ste_changed(3)]);
}

/// CMD_SYNC completion signals (4.7.3): CS = SIG_IRQ pulses the CMD_SYNC interrupt; SIG_SEV
/// (no IDR0.SEV) and SIG_NONE signal nothing; without IDR0.MSI the MSI fields are IGNORED.
#[test]
fn cmd_sync_completion_without_msi() {
    let mut d = boot(features());
    let scratch = d.alloc_zeroed(64, 64).unwrap();
    write_u64(&d.mem, scratch, u64::MAX).unwrap();
    for (cs, irq) in [(0u8, false), (1, true), (2, false)] {
        d.port.take_effects();
        d.issue_cmds(&[CmdEnt::Sync {
            cs,
            msiaddr: scratch,
            msidata: 0x55,
        }])
        .unwrap();
        assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), d.cmdq.llq.prod, "consumed");
        let fx = effects(&mut d);
        assert_eq!(
            fx.contains(&Effect::Irq(IrqLine::CmdSync)),
            irq,
            "CS {cs}: {fx:?}"
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::MsiWrite { .. })));
    }
    assert_eq!(
        read_u64(&d.mem, scratch).unwrap(),
        u64::MAX,
        "no MSI without IDR0.MSI"
    );
}

/// With IDR0.MSI: Linux's MSIPOLL (the MSI overwrites the CMD_SYNC's first word with
/// MSIData 0), an MSI into another RAM word, an MSI to a doorbell outside RAM
/// (`Effect::MsiWrite`), none of them also pulsing the wired line, and MSIAddress = 0 (no MSI:
/// the wired interrupt).
#[test]
fn cmd_sync_completion_by_msi() {
    let f = Capabilities {
        msi: true,
        ..features()
    };
    let mut d = boot(f);
    d.port.take_effects();
    let at = d.cmdq.llq.prod;
    d.issue_cmds_with_sync(&[CmdEnt::CfgiSte { sid: 1, leaf: true }])
        .unwrap();
    let sync_slot = d.cmdq.entry_addr(d.cmdq.llq.inc(at)).unwrap();
    let slot: [u64; 2] = read_qwords(&d.mem, sync_slot).unwrap();
    assert_eq!(
        slot,
        [0, sync_slot],
        "MSIDATA 0 over the first word, MSIADDR = the slot"
    );
    let word = d.alloc_zeroed(64, 64).unwrap();
    for (msiaddr, data) in [(word, 0x1234_5678u32), (word + 4, 0x9abc_def0)] {
        d.issue_cmds(&[CmdEnt::Sync {
            cs: 1,
            msiaddr,
            msidata: data,
        }])
        .unwrap();
        assert_eq!(read_u32(&d.mem, msiaddr).unwrap(), data);
        assert!(
            !effects(&mut d).contains(&Effect::Irq(IrqLine::CmdSync)),
            "Linux's MSI polling costs no wired interrupt"
        );
    }
    d.port.take_effects();
    d.issue_cmds(&[CmdEnt::Sync {
        cs: 1,
        msiaddr: 0x800_0000_0000,
        msidata: 0xfeed,
    }])
    .unwrap();
    let fx = effects(&mut d);
    assert!(fx.contains(&Effect::MsiWrite {
        address: 0x800_0000_0000,
        data: 0xfeed
    }));
    assert!(
        !fx.contains(&Effect::Irq(IrqLine::CmdSync)),
        "a sync signalled by its MSI does not also pulse the wired line"
    );
    d.issue_cmds(&[CmdEnt::Sync {
        cs: 1,
        msiaddr: 0,
        msidata: 0xfeed,
    }])
    .unwrap();
    let fx = effects(&mut d);
    assert!(!fx.iter().any(|e| matches!(e, Effect::MsiWrite { .. })));
    assert!(
        fx.contains(&Effect::Irq(IrqLine::CmdSync)),
        "MSIAddress 0: the wired interrupt instead"
    );
    // CS = SEV with MSI fields: no MSI.
    write_u64(&d.mem, word, 0).unwrap();
    d.issue_cmds(&[CmdEnt::Sync {
        cs: 2,
        msiaddr: word,
        msidata: 7,
    }])
    .unwrap();
    assert_eq!(read_u64(&d.mem, word).unwrap(), 0);
}

/// An MSI address beyond the OAS is truncated to the OAS (digest 4.2 CMD_SYNC, 3.4.3): the
/// write lands in guest RAM.
#[test]
fn cmd_sync_msi_address_truncated_to_oas() {
    let f = Capabilities {
        msi: true,
        ..features()
    };
    let mut d = boot(f);
    let word = d.alloc_zeroed(64, 64).unwrap();
    d.issue_cmds(&[CmdEnt::Sync {
        cs: 1,
        msiaddr: (1 << 44) | word,
        msidata: 0x4242,
    }])
    .unwrap();
    assert_eq!(read_u32(&d.mem, word).unwrap(), 0x4242);
}

/// A CMD_SYNC waits for the effects of the commands before it: the PROD write stops on it
/// with `SyncBarrier` (CONS on the sync) until the barrier is served.
#[test]
fn cmd_sync_waits_for_effects() {
    let mut d = boot(features());
    let base = d.cmdq.base;
    let p = d.cmdq.llq.prod;
    let q = d.cmdq.llq;
    write_qwords(&d.mem, d.cmdq.entry_addr(p).unwrap(), &cfgi(7).0).unwrap();
    let sync_at = q.inc(p);
    write_qwords(
        &d.mem,
        d.cmdq.entry_addr(sync_at).unwrap(),
        &CmdEnt::linux_sync(0).build().0,
    )
    .unwrap();
    let end = q.inc(sync_at);
    let mem = d.mem.clone();
    let smmu = d.port.smmu_mut();
    assert_eq!(
        smmu.mmio_write(&mem, ARM_SMMU_CMDQ_PROD, 4, u64::from(end)),
        CmdqStatus::SyncBarrier
    );
    assert_eq!(smmu.mmio_read(ARM_SMMU_CMDQ_CONS, 4), u64::from(sync_at));
    assert_eq!(smmu.take_effects(), [ste_changed(7)]);
    assert_eq!(
        smmu.serve_barrier(&mem, BarrierOutcome::Served),
        CmdqStatus::Idle
    );
    assert_eq!(smmu.mmio_read(ARM_SMMU_CMDQ_CONS, 4), u64::from(end));
    d.cmdq.llq.prod = end;
    d.sync().unwrap();
    assert!(base != 0 && d.port.smmu().counters().commands > 0);
}

/// A 128-entry queue wraps: 300 commands in batches, every one executed, PROD and CONS with
/// the wrap bit at bit 7.
#[test]
fn command_queue_wraps() {
    let cfg = DriverConfig {
        cmdq_shift: 7,
        ..DriverConfig::default()
    };
    let mut d = boot_with(features(), cfg);
    assert_eq!(d.read64(ARM_SMMU_CMDQ_BASE) & 0x1f, 7);
    let before = d.port.smmu().counters().commands;
    let cmds: Vec<CmdEnt> = (0..300)
        .map(|sid| CmdEnt::CfgiSte { sid, leaf: true })
        .collect();
    d.issue_cmds_with_sync(&cmds).unwrap();
    let fx = effects(&mut d);
    assert_eq!(fx.len(), 300);
    assert_eq!(fx[299], ste_changed(299));
    // 300 commands, split by the driver into batches of at most 127 with one CMD_SYNC.
    let consumed = d.port.smmu().counters().commands - before;
    assert_eq!(consumed, 301);
    let total = 4 + 301u32; // the reset's four entries first
    let expected = total & 0xff;
    assert_eq!(d.read32(ARM_SMMU_CMDQ_PROD), expected);
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), expected);
}

/// With CMDQEN = 0 commands are not fetched; enabling the queue processes them.
#[test]
fn commands_wait_for_cmdqen() {
    let mut d = boot(features());
    let enables = CR0_SMMUEN | CR0_EVTQEN;
    d.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.port.take_effects();
    let cons = d.read32(ARM_SMMU_CMDQ_CONS);
    d.issue_cmds(&[CmdEnt::CfgiSte { sid: 9, leaf: true }])
        .unwrap();
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), cons);
    assert!(effects(&mut d).is_empty());
    d.write_reg_sync(enables | CR0_CMDQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), d.cmdq.llq.prod);
    assert_eq!(effects(&mut d), [ste_changed(9)]);
}

/// Commands run while SMMUEN = 0 (Linux invalidates before enabling), and PREFETCH_CONFIG
/// never records events or fails, even for a StreamID without a valid STE (4.2).
#[test]
fn prefetch_and_commands_with_smmu_disabled() {
    let mut d = boot(features());
    d.issue_cmds_with_sync(&[
        CmdEnt::PrefetchCfg { sid: 0x1_0000 },
        CmdEnt::PrefetchCfg { sid: 3 },
    ])
    .unwrap();
    assert!(events(&mut d).is_empty());
    d.write_reg_sync(CR0_CMDQEN | CR0_EVTQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.port.take_effects();
    d.issue_cmds_with_sync(&[CmdEnt::CfgiAll, CmdEnt::PrefetchCfg { sid: 0x1234 }])
        .unwrap();
    assert_eq!(effects(&mut d), [Effect::StreamsChanged(SidRange::ALL)]);
    assert_eq!(gerror_active(&mut d), 0);
}

/// CMDQ_CONS.RD bits above the wrap bit (\[19:QS+1\]) are RAZ (6.3.28, digest 5).
#[test]
fn queue_index_bits_above_wrap_are_raz() {
    let mut d = probe_with(features(), DriverConfig::default());
    d.write64(ARM_SMMU_CMDQ_BASE, d.cmdq.q_base());
    d.write64(ARM_SMMU_EVTQ_BASE, d.evtq.q_base());
    d.write32(ARM_SMMU_CMDQ_CONS, 0x300);
    assert_eq!(
        d.read32(ARM_SMMU_CMDQ_CONS),
        0x100,
        "LOG2SIZE 8: bit 9 is RAZ"
    );
    d.write32(ARM_SMMU_EVTQ_PROD, 0x180);
    assert_eq!(
        d.read32(ARM_SMMU_EVTQ_PROD),
        0x80,
        "LOG2SIZE 7: bit 8 is RAZ"
    );
}

/// The queue bases are aligned to the queue size: low address bits are ignored (6.3.26,
/// 6.3.29).
#[test]
fn queue_base_low_bits_ignored() {
    let mut d = boot(features());
    let enables = CR0_SMMUEN | CR0_EVTQEN | CR0_CMDQEN;
    d.write_reg_sync(CR0_SMMUEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    // 256 commands = 4 KiB; 128 events = 4 KiB.
    d.write64(ARM_SMMU_CMDQ_BASE, d.cmdq.q_base() | 0xfe0);
    d.write64(ARM_SMMU_EVTQ_BASE, d.evtq.q_base() | 0xfe0);
    d.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.port.take_effects();
    d.issue_cmds_with_sync(&[CmdEnt::CfgiSte { sid: 4, leaf: true }])
        .unwrap();
    assert_eq!(effects(&mut d), [ste_changed(4)]);
    fault(&mut d, 0x1_0000, None, 0, READ);
    assert_eq!(one_event(&mut d).sid(), 0x1_0000);
}

/// A command error with GERROR_IRQ_CFG0 set (IDR0.MSI) signals the GERROR interrupt by MSI;
/// with the address 0 the wired line is used (6.3.21, 3.18).
#[test]
fn gerror_interrupt_by_msi() {
    let f = Capabilities {
        msi: true,
        ..features()
    };
    let mut d = boot(f);
    let word = d.alloc_zeroed(64, 64).unwrap();
    d.write_reg_sync(0, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .unwrap();
    d.write64(ARM_SMMU_GERROR_IRQ_CFG0, word);
    d.write32(ARM_SMMU_GERROR_IRQ_CFG1, 0x6e6e);
    d.write_reg_sync(
        IRQ_CTRL_GERROR_IRQEN,
        ARM_SMMU_IRQ_CTRL,
        ARM_SMMU_IRQ_CTRLACK,
    )
    .unwrap();
    d.port.take_effects();
    d.issue_raw_with_sync(&[Command::raw(0, 0)]).unwrap_err();
    assert_eq!(read_u32(&d.mem, word).unwrap(), 0x6e6e);
    assert!(!effects(&mut d).contains(&Effect::Irq(IrqLine::Gerror)));
    d.handle_gerror().unwrap();
    d.write_reg_sync(0, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .unwrap();
    d.write64(ARM_SMMU_GERROR_IRQ_CFG0, 0);
    d.write_reg_sync(
        IRQ_CTRL_GERROR_IRQEN,
        ARM_SMMU_IRQ_CTRL,
        ARM_SMMU_IRQ_CTRLACK,
    )
    .unwrap();
    d.port.take_effects();
    d.issue_raw_with_sync(&[Command::raw(0, 0)]).unwrap_err();
    assert!(effects(&mut d).contains(&Effect::Irq(IrqLine::Gerror)));
}

/// Out-of-range StreamIDs and SubstreamIDs in commands are not CERROR_ILL (4.1.7).
#[test]
fn out_of_range_ids_are_not_illegal() {
    let mut d = boot(Capabilities {
        ssid_bits: 4,
        ..features()
    });
    d.issue_cmds_with_sync(&[
        CmdEnt::CfgiSte {
            sid: u32::MAX,
            leaf: true,
        },
        CmdEnt::CfgiCd {
            sid: 0x1_0000,
            ssid: 0xf_ffff,
            leaf: false,
        },
        CmdEnt::CfgiCdAll { sid: u32::MAX },
        CmdEnt::PrefetchCfg { sid: u32::MAX },
        CmdEnt::TlbiNhAsid {
            vmid: 0,
            asid: 0xffff,
        },
    ])
    .unwrap();
    assert_eq!(gerror_active(&mut d), 0);
}

/// With IDR5.DS = 0, TG = 16K with TTL = 0b01 is treated as TTL = 0b00, so NUM = SCALE = 0
/// makes it the Reserved encoding: CERROR_ILL (4.4.1.1, digest 4.2).
#[test]
fn tlbi_range_16k_ttl1_reserved() {
    let mut d = boot(features());
    let t = Tlbi {
        asid: 1,
        addr: 0x10_0000,
        tg: 2,
        ttl: 1,
        ..Tlbi::default()
    };
    expect_ill(&mut d, CmdEnt::TlbiNhVa(t).build(), "TG 16K TTL 1");
}
