//! Boot: Linux's probe and reset sequence, and the register file's architectural rules
//! (IHI 0070 chapter 6; digest section 7).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use common::*;

/// `arm_smmu_device_hw_probe` decodes QEMU's default configuration.
#[test]
fn linux_probe_decodes_id_registers() {
    let d = probe_with(features(), DriverConfig::default());
    let i = d.info;
    assert!(i.trans_s1 && !i.trans_s2 && !i.nesting);
    assert!(
        i.two_lvl_strtab,
        "ST_LEVEL = 2-level and SIDSIZE 16 > SPLIT 8"
    );
    assert!(i.two_lvl_cdtab);
    assert!(i.coherent);
    assert!(!i.msi && !i.ats && !i.pri && !i.sev && !i.hyp);
    assert!(!i.stalls, "STALL_MODEL = 0b01: terminate only");
    assert_eq!((i.asid_bits, i.vmid_bits), (16, 16));
    assert_eq!((i.sid_bits, i.ssid_bits), (16, 16));
    // min(CMDQ_MAX_SZ_SHIFT = 18, CMDQS = 19), min(EVTQ_MAX_SZ_SHIFT = 17, EVTQS = 19).
    assert_eq!((i.cmdq_shift, i.evtq_shift), (18, 17));
    assert!(i.range_inv);
    assert_eq!((i.oas, i.ias), (44, 44));
    let sizes = (1 << 12) | (1 << 21) | (1 << 30) | (1 << 14) | (1 << 25) | (1 << 16) | (1 << 29);
    assert_eq!(i.pgsize_bitmap, sizes);
    // SMMUv3: ArchMajorRev 0, ArchMinorRev 0..=4.
    assert_eq!(i.aidr & !0xf, 0);
    assert!(i.aidr & 0xf <= 4);
}

/// Linux refuses an SMMU with a command queue of 64 entries or fewer.
#[test]
fn linux_probe_refuses_tiny_command_queue() {
    let mem = ram();
    let f = Capabilities {
        cmdqs: 6,
        ..features()
    };
    let port = DirectPort::new(f, mem.clone());
    let err = Driver::probe(
        port,
        mem,
        BumpAllocator::new(ALLOC_START, RAM_SIZE),
        DriverConfig::default(),
    )
    .unwrap_err();
    assert_eq!(err, DriverError::Probe("command queue too small"));
}

/// Few StreamID bits: Linux uses a linear stream table of 2^SIDSIZE STEs.
#[test]
fn small_sid_space_uses_linear_stream_table() {
    let f = Capabilities {
        sid_bits: 6,
        ..features()
    };
    let mut d = boot(f);
    assert!(!d.info.two_lvl_strtab);
    assert_eq!(
        d.read32(ARM_SMMU_STRTAB_BASE_CFG),
        6,
        "FMT linear, LOG2SIZE 6"
    );
    d.write_ste(63, &make_bypass_ste(false)).unwrap();
    assert_eq!(out(&mut d, 63, None, 0xabc_d000, READ), 0xabc_d000);
}

/// The whole `arm_smmu_device_reset` sequence, register by register.
#[test]
fn linux_reset_sequence() {
    let mut d = probe_with(features(), DriverConfig::default());
    d.reset().unwrap();
    let enabled = CR0_SMMUEN | CR0_EVTQEN | CR0_CMDQEN;
    assert_eq!(d.read32(ARM_SMMU_CR0), enabled);
    assert_eq!(d.read32(ARM_SMMU_CR0ACK), enabled);
    // TABLE_SH = ISH, TABLE_OC/IC = WB, QUEUE_SH = ISH, QUEUE_OC/IC = WB.
    assert_eq!(d.read32(ARM_SMMU_CR1), 0xd75);
    assert_eq!(d.read32(ARM_SMMU_CR2), CR2_PTM | CR2_RECINVSID);
    assert_eq!(
        d.read64(ARM_SMMU_STRTAB_BASE),
        d.strtab.base | STRTAB_BASE_RA
    );
    // FMT 2-level, SPLIT 8, LOG2SIZE 16.
    assert_eq!(
        d.read32(ARM_SMMU_STRTAB_BASE_CFG),
        (1 << 16) | (8 << 6) | 16
    );
    assert_eq!(d.read64(ARM_SMMU_CMDQ_BASE), Q_BASE_RWA | d.cmdq.base | 8);
    assert_eq!(d.read64(ARM_SMMU_EVTQ_BASE), Q_BASE_RWA | d.evtq.base | 7);
    // CFGI_ALL, SYNC, TLBI_NSNH_ALL, SYNC: all four consumed.
    assert_eq!(d.read32(ARM_SMMU_CMDQ_PROD), 4);
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), 4);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), 0);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_CONS), 0);
    assert_eq!(
        d.read32(ARM_SMMU_IRQ_CTRL),
        IRQ_CTRL_EVTQ_IRQEN | IRQ_CTRL_GERROR_IRQEN
    );
    assert_eq!(
        d.read32(ARM_SMMU_IRQ_CTRLACK),
        IRQ_CTRL_EVTQ_IRQEN | IRQ_CTRL_GERROR_IRQEN
    );
    assert_eq!(gerror_active(&mut d), 0);
    // The commands as Linux encoded them.
    let q: [u64; 8] = read_qwords(&d.mem, d.cmdq.base).unwrap();
    let sync_sev = 0x46 | (2 << 12) | (3 << 22) | (0xf << 24);
    assert_eq!(q, [0x04, 31, sync_sev, 0, 0x30, 0, sync_sev, 0]);
    assert_eq!(d.port.smmu().counters().commands, 4);
    let fx = effects(&mut d);
    let all = Effect::StreamsChanged(SidRange::ALL);
    let flush = Effect::TranslationsInvalidated {
        start: 0,
        last: u64::MAX,
    };
    let nsnh = Effect::HostInvalidate(RawCommand { d0: 0x30, d1: 0 });
    let pos = |e: &Effect| {
        fx.iter()
            .position(|x| x == e)
            .unwrap_or_else(|| panic!("{e:?} in {fx:?}"))
    };
    assert!(
        pos(&all) < pos(&nsnh),
        "CFGI_ALL before TLBI_NSNH_ALL: {fx:?}"
    );
    assert!(fx.contains(&flush));
    // Unused StreamIDs abort silently (disable_bypass): the L2 table was never allocated.
    assert_eq!(
        fault(&mut d, 0x1234, None, 0, READ),
        Some(id::C_BAD_STREAMID)
    );
}

/// With IDR0.MSI (and coherency) Linux polls CMD_SYNC completion through an MSI written over
/// the CMD_SYNC itself: after the reset both syncs read back as zero with MSIADDR kept.
#[test]
fn linux_reset_with_msipoll() {
    let f = Capabilities {
        msi: true,
        ..features()
    };
    let mut d = boot(f);
    assert!(d.info.msi);
    let q: [u64; 8] = read_qwords(&d.mem, d.cmdq.base).unwrap();
    let slot1 = d.cmdq.base + 16;
    let slot3 = d.cmdq.base + 48;
    assert_eq!(q[2] & 0xffff_ffff, 0, "MSIDATA 0 written over the sync");
    assert_eq!(q[3], slot1, "MSIADDR = the sync's own slot");
    assert_eq!(q[6] & 0xffff_ffff, 0);
    assert_eq!(q[7], slot3);
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), 4);
}

/// CR0ACK follows every CR0 write (CR0 update handshake, 6.3.9).
#[test]
fn cr0ack_follows_cr0() {
    let mut d = probe_with(features(), DriverConfig::default());
    d.write64(ARM_SMMU_CMDQ_BASE, d.cmdq.q_base());
    d.write64(ARM_SMMU_EVTQ_BASE, d.evtq.q_base());
    for v in [
        CR0_CMDQEN,
        CR0_CMDQEN | CR0_EVTQEN,
        CR0_CMDQEN | CR0_EVTQEN | CR0_SMMUEN,
        CR0_EVTQEN,
        0,
    ] {
        d.write32(ARM_SMMU_CR0, v);
        assert_eq!(d.read32(ARM_SMMU_CR0ACK), v, "after CR0 = {v:#x}");
        assert_eq!(d.read32(ARM_SMMU_CR0), v);
    }
}

/// PRIQEN (no IDR0.PRI), ATSCHK (no IDR0.ATS) and VMW (no IDR0.VMW) are RES0 on this SMMU:
/// CR0ACK does not reflect them (digest 7.2: "reserved CR0 bits are not reflected").
#[test]
fn cr0ack_ignores_unimplemented_bits() {
    let mut d = probe_with(features(), DriverConfig::default());
    d.write64(ARM_SMMU_CMDQ_BASE, d.cmdq.q_base());
    d.write32(ARM_SMMU_CR0, CR0_CMDQEN | CR0_PRIQEN | CR0_ATSCHK | CR0_VMW);
    assert_eq!(d.read32(ARM_SMMU_CR0ACK), CR0_CMDQEN);
}

/// IRQ_CTRLACK follows IRQ_CTRL (6.3.16/17).
#[test]
fn irq_ctrlack_follows_irq_ctrl() {
    let mut d = probe_with(features(), DriverConfig::default());
    for v in [
        IRQ_CTRL_GERROR_IRQEN,
        IRQ_CTRL_EVTQ_IRQEN | IRQ_CTRL_GERROR_IRQEN,
        0,
    ] {
        d.write_reg_sync(v, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
            .unwrap();
        assert_eq!(d.read32(ARM_SMMU_IRQ_CTRL), v);
    }
}

/// PRIQ_IRQEN without IDR0.PRI: "ACK bits are RAZ if the matching IRQ_CTRL bit is reserved"
/// (digest 7.4).
#[test]
fn irq_ctrlack_priq_raz_without_pri() {
    let mut d = probe_with(features(), DriverConfig::default());
    d.write32(ARM_SMMU_IRQ_CTRL, IRQ_CTRL_PRIQ_IRQEN | IRQ_CTRL_EVTQ_IRQEN);
    assert_eq!(d.read32(ARM_SMMU_IRQ_CTRLACK), IRQ_CTRL_EVTQ_IRQEN);
}

/// GBPA (6.3.14, digest 7.3): the UPDATE handshake, ABORT taking effect while SMMUEN = 0 (for
/// transactions with and without SubstreamID, no event), writes without UPDATE ignored
/// (v3.2+), and bypass once ABORT is cleared, with inputs beyond the OAS aborted silently.
#[test]
fn gbpa_update_handshake_and_abort() {
    let mut d = probe_with(features(), DriverConfig::default());
    assert_eq!(
        d.read32(ARM_SMMU_GBPA) & GBPA_UPDATE,
        0,
        "UPDATE resets to 0"
    );
    d.update_gbpa(GBPA_ABORT, 0).unwrap();
    let gbpa = d.read32(ARM_SMMU_GBPA);
    assert_eq!(gbpa & (GBPA_UPDATE | GBPA_ABORT), GBPA_ABORT);
    assert!(effects(&mut d).contains(&Effect::StreamsChanged(SidRange::ALL)));
    for (sid, ssid) in [(0, None), (7, Some(3)), (0xffff, None)] {
        let e = tr(&mut d, sid, ssid, 0x1000, READ).unwrap_err();
        assert_eq!(e.event, None, "GBPA abort records nothing");
    }
    // A write without UPDATE is ignored.
    d.write32(ARM_SMMU_GBPA, gbpa & !GBPA_ABORT);
    assert_eq!(d.read32(ARM_SMMU_GBPA), gbpa);
    assert!(tr(&mut d, 0, None, 0x1000, READ).is_err());
    // Clear ABORT: every transaction bypasses.
    d.update_gbpa(0, GBPA_ABORT).unwrap();
    assert_eq!(d.read32(ARM_SMMU_GBPA) & (GBPA_UPDATE | GBPA_ABORT), 0);
    for (sid, ssid, iova) in [
        (0, None, 0x1234_5678),
        (9, Some(1), 0xfff_ffff_f000),
        (0xffff_ffff, None, 0),
    ] {
        let t = tr(&mut d, sid, ssid, iova, WRITE).unwrap();
        assert_eq!(t.output(iova), iova);
        assert!(t.read && t.write);
    }
    // Input beyond the 44-bit OAS: abort without event.
    assert_eq!(tr(&mut d, 0, None, 1 << 44, READ).unwrap_err().event, None);
    assert_eq!(d.port.smmu().counters().events, 0);
}

/// With SMMUEN = 1 the STEs govern and GBPA is ignored; Linux's disable path (GBPA abort,
/// then CR0 = 0) leaves every stream aborting, and a new reset brings the tables back.
#[test]
fn gbpa_abort_applies_only_when_disabled() {
    let mut d = boot(features());
    d.write_ste(1, &make_bypass_ste(false)).unwrap();
    d.update_gbpa(GBPA_ABORT, 0).unwrap();
    assert_eq!(out(&mut d, 1, None, 0x4000, READ), 0x4000);
    d.device_disable().unwrap();
    assert_eq!(tr(&mut d, 1, None, 0x4000, READ).unwrap_err().event, None);
    // Re-reset (Linux's arm_smmu_device_reset with the SMMU enabled aborts first).
    d.reset().unwrap();
    assert_eq!(d.read32(ARM_SMMU_GBPA) & GBPA_ABORT, GBPA_ABORT);
    assert_eq!(out(&mut d, 1, None, 0x4000, READ), 0x4000);
    assert!(events(&mut d).is_empty());
}

/// EVTQ_PROD and EVTQ_CONS live in page 1 (0x100a8/0x100ac): PROD is writable only while the
/// event queue is disabled, CONS always (6.3.95/96). The base goes first: PROD bits above the
/// wrap bit of EVENTQ_BASE.LOG2SIZE are RAZ (6.3.30).
#[test]
fn evtq_page1_prod_cons() {
    let mut d = probe_with(features(), DriverConfig::default());
    d.write64(ARM_SMMU_EVTQ_BASE, d.evtq.q_base());
    d.write32(ARM_SMMU_EVTQ_PROD, 5);
    d.write32(ARM_SMMU_EVTQ_CONS, 3);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), 5);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_CONS), 3);
    d.write_reg_sync(CR0_EVTQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.write32(ARM_SMMU_EVTQ_PROD, 7);
    assert_eq!(
        d.read32(ARM_SMMU_EVTQ_PROD),
        5,
        "PROD is read-only while EVENTQEN = 1"
    );
    d.write32(ARM_SMMU_EVTQ_CONS, 5);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_CONS), 5);
}

/// 64-bit registers take aligned 64-bit accesses and 32-bit accesses to either half (6.2).
#[test]
fn sixty_four_bit_registers_by_halves() {
    let mut d = probe_with(features(), DriverConfig::default());
    for (reg, a, b) in [
        (
            ARM_SMMU_STRTAB_BASE,
            0x4000_0000_0012_3440u64,
            0x0000_0001_0045_6780u64,
        ),
        (
            ARM_SMMU_CMDQ_BASE,
            0x4000_0000_0008_0007,
            0x0000_0002_0010_0020 | 9,
        ),
        (
            ARM_SMMU_EVTQ_BASE,
            0x4000_0000_0004_0005,
            0x0000_0003_0020_0040 | 2,
        ),
    ] {
        d.write64(reg, a);
        assert_eq!(d.read64(reg), a, "{reg:#x}");
        assert_eq!(d.read32(reg), a as u32);
        assert_eq!(d.read32(reg + 4), (a >> 32) as u32);
        d.write32(reg, b as u32);
        d.write32(reg + 4, (b >> 32) as u32);
        assert_eq!(d.read64(reg), b, "{reg:#x} by halves");
    }
}

/// The MSI configuration registers exist with IDR0.MSI (64-bit CFG0, 32-bit CFG1/CFG2) and
/// are guarded by their IRQEN (v3.2+: writes ignored while enabled).
#[test]
fn msi_config_registers() {
    let f = Capabilities {
        msi: true,
        ..features()
    };
    let mut d = probe_with(f, DriverConfig::default());
    d.write64(ARM_SMMU_EVTQ_IRQ_CFG0, 0x8000_0040);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG1, 0x1234);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG2, 0x31);
    d.write32(ARM_SMMU_GERROR_IRQ_CFG0, 0x9000_0000);
    d.write32(ARM_SMMU_GERROR_IRQ_CFG0 + 4, 0x1);
    assert_eq!(d.read64(ARM_SMMU_EVTQ_IRQ_CFG0), 0x8000_0040);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_IRQ_CFG1), 0x1234);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_IRQ_CFG2), 0x31);
    assert_eq!(d.read64(ARM_SMMU_GERROR_IRQ_CFG0), 0x1_9000_0000);
    d.write_reg_sync(
        IRQ_CTRL_EVTQ_IRQEN | IRQ_CTRL_GERROR_IRQEN,
        ARM_SMMU_IRQ_CTRL,
        ARM_SMMU_IRQ_CTRLACK,
    )
    .unwrap();
    d.write64(ARM_SMMU_EVTQ_IRQ_CFG0, 0);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG1, 0);
    d.write64(ARM_SMMU_GERROR_IRQ_CFG0, 0);
    assert_eq!(d.read64(ARM_SMMU_EVTQ_IRQ_CFG0), 0x8000_0040);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_IRQ_CFG1), 0x1234);
    assert_eq!(d.read64(ARM_SMMU_GERROR_IRQ_CFG0), 0x1_9000_0000);
    // Without IDR0.MSI they are RES0.
    let mut d = probe_with(features(), DriverConfig::default());
    d.write64(ARM_SMMU_EVTQ_IRQ_CFG0, 0x8000_0040);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG1, 0x1234);
    assert_eq!(d.read64(ARM_SMMU_EVTQ_IRQ_CFG0), 0);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_IRQ_CFG1), 0);
}

/// Registers guarded by SMMUEN, CMDQEN and EVENTQEN ignore writes while enabled (v3.2+), and
/// the SMMU keeps using the old values.
#[test]
fn guarded_registers_ignored_while_enabled() {
    let mut d = boot(features());
    d.write_ste(2, &make_bypass_ste(false)).unwrap();
    let regs64 = [ARM_SMMU_STRTAB_BASE, ARM_SMMU_CMDQ_BASE, ARM_SMMU_EVTQ_BASE];
    let regs32 = [
        ARM_SMMU_STRTAB_BASE_CFG,
        ARM_SMMU_CR2,
        ARM_SMMU_CMDQ_CONS,
        ARM_SMMU_EVTQ_PROD,
    ];
    let before64: Vec<u64> = regs64.iter().map(|&r| d.read64(r)).collect();
    let before32: Vec<u32> = regs32.iter().map(|&r| d.read32(r)).collect();
    for &r in &regs64 {
        d.write64(r, 0x0000_0000_0020_0000);
        d.write32(r + 4, 0x1);
    }
    for &r in &regs32 {
        d.write32(r, 0x3);
    }
    let after64: Vec<u64> = regs64.iter().map(|&r| d.read64(r)).collect();
    let after32: Vec<u32> = regs32.iter().map(|&r| d.read32(r)).collect();
    assert_eq!(after64, before64);
    assert_eq!(after32, before32);
    // Still the old stream table and queues.
    assert_eq!(out(&mut d, 2, None, 0x1000, READ), 0x1000);
    d.sync().unwrap();
}

/// CR1.TABLE_* is guarded by SMMUEN and CR1.QUEUE_* by the queue enables: v3.2+ ignores
/// writes while enabled (digest 7.1).
#[test]
fn cr1_guarded_while_enabled() {
    let mut d = boot(features());
    let before = d.read32(ARM_SMMU_CR1);
    d.write32(ARM_SMMU_CR1, 0);
    assert_eq!(d.read32(ARM_SMMU_CR1), before);
}

/// CMDQ_BASE.LOG2SIZE above IDR1.CMDQS reads back as written but is used as CMDQS (6.3.26):
/// with CMDQS = 7 the queue wraps after 128 entries.
#[test]
fn cmdq_log2size_capped_at_cmdqs() {
    let f = Capabilities {
        cmdqs: 7,
        ..features()
    };
    let mut d = probe_with(f, DriverConfig::default());
    let base = d.alloc_zeroed(1024 * 16, 1024 * 16).unwrap();
    d.write64(ARM_SMMU_CMDQ_BASE, base | 10);
    assert_eq!(
        d.read64(ARM_SMMU_CMDQ_BASE) & 0x1f,
        10,
        "readback unaffected"
    );
    // One command at index 127, the next at index 0 after the wrap (PROD = wrap | 1).
    write_qwords(
        &d.mem,
        base + 127 * 16,
        &CmdEnt::CfgiSte { sid: 1, leaf: true }.build().0,
    )
    .unwrap();
    write_qwords(
        &d.mem,
        base,
        &CmdEnt::CfgiSte { sid: 2, leaf: true }.build().0,
    )
    .unwrap();
    // Index 128 would only be used by a 1024-entry queue: an illegal command.
    write_qwords(&d.mem, base + 128 * 16, &[0, 0]).unwrap();
    d.write32(ARM_SMMU_CMDQ_CONS, 127);
    d.write32(ARM_SMMU_CMDQ_PROD, 127);
    d.write_reg_sync(CR0_CMDQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.port.take_effects();
    d.write32(ARM_SMMU_CMDQ_PROD, 0x80 | 1);
    assert_eq!(d.read32(ARM_SMMU_CMDQ_CONS), 0x81);
    assert_eq!(gerror_active(&mut d), 0);
    assert_eq!(
        effects(&mut d),
        [
            Effect::StreamsChanged(SidRange { first: 1, last: 1 }),
            Effect::StreamsChanged(SidRange { first: 2, last: 2 })
        ]
    );
}

/// EVENTQ_BASE.LOG2SIZE above IDR1.EVENTQS is capped: a 4-entry queue overflows on the
/// fifth record.
#[test]
fn evtq_log2size_capped_at_eventqs() {
    let f = Capabilities {
        eventqs: 2,
        ..features()
    };
    let mut d = boot(f);
    let base = d.alloc_zeroed(32 * 32, 1024).unwrap();
    d.write_reg_sync(CR0_SMMUEN | CR0_CMDQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.write64(ARM_SMMU_EVTQ_BASE, base | 5);
    d.write32(ARM_SMMU_EVTQ_PROD, 0);
    d.write32(ARM_SMMU_EVTQ_CONS, 0);
    d.write_reg_sync(
        CR0_SMMUEN | CR0_CMDQEN | CR0_EVTQEN,
        ARM_SMMU_CR0,
        ARM_SMMU_CR0ACK,
    )
    .unwrap();
    assert_eq!(d.read64(ARM_SMMU_EVTQ_BASE) & 0x1f, 5);
    for i in 0..5 {
        // StreamIDs beyond SIDSIZE: C_BAD_STREAMID (CR2.RECINVSID).
        fault(&mut d, 0x10000 + i, None, 0, READ);
    }
    // Four records, the wrap bit of a 4-entry queue, and the overflow flag.
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), Q_OVERFLOW_FLAG | 0b100);
    let rec: [u64; 4] = read_qwords(&d.mem, base + 3 * 32).unwrap();
    assert_eq!(Event(rec).sid(), 0x10003);
    let rec: [u64; 4] = read_qwords(&d.mem, base + 4 * 32).unwrap();
    assert_eq!(rec, [0; 4], "nothing written past the capped size");
}

/// STRTAB_BASE_CFG.LOG2SIZE above SIDSIZE: MIN(LOG2SIZE, SIDSIZE) bounds the StreamIDs
/// (6.3.25), the register reads back as written.
#[test]
fn strtab_log2size_capped_at_sidsize() {
    let f = Capabilities {
        sid_bits: 6,
        ..features()
    };
    let mut d = boot(f);
    let table = d.alloc_zeroed(1024 * 64, 1024 * 64).unwrap();
    for sid in [5u64, 63, 64, 100] {
        write_qwords(&d.mem, table + sid * 64, &make_bypass_ste(false)).unwrap();
    }
    with_smmu_disabled(&mut d, |d| {
        d.write64(ARM_SMMU_STRTAB_BASE, table | STRTAB_BASE_RA);
        d.write32(ARM_SMMU_STRTAB_BASE_CFG, 10);
    });
    d.issue_cmd_with_sync(CmdEnt::CfgiAll).unwrap();
    assert_eq!(d.read32(ARM_SMMU_STRTAB_BASE_CFG), 10);
    assert_eq!(out(&mut d, 63, None, 0x5000, READ), 0x5000);
    assert_eq!(
        fault(&mut d, 64, None, 0x5000, READ),
        Some(id::C_BAD_STREAMID)
    );
    assert_eq!(
        fault(&mut d, 100, None, 0x5000, READ),
        Some(id::C_BAD_STREAMID)
    );
    let evs = events(&mut d);
    assert_eq!(evs.iter().map(Event::sid).collect::<Vec<_>>(), [64, 100]);
}

/// Reserved and unimplemented offsets are RAZ/WI; ID registers, CR0ACK, IRQ_CTRLACK and
/// GERROR are read-only; the CoreSight component IDs are the standard preamble (6.2, 6.3.170).
#[test]
fn raz_wi_and_read_only_offsets() {
    let mut d = boot(features());
    fn snapshot(d: &mut Drv) -> Vec<u64> {
        let mut v: Vec<u64> = [
            ARM_SMMU_CR0,
            ARM_SMMU_CR1,
            ARM_SMMU_CR2,
            ARM_SMMU_GBPA,
            ARM_SMMU_IRQ_CTRL,
            ARM_SMMU_GERRORN,
            ARM_SMMU_STRTAB_BASE_CFG,
            ARM_SMMU_CMDQ_PROD,
            ARM_SMMU_CMDQ_CONS,
            ARM_SMMU_EVTQ_PROD,
            ARM_SMMU_EVTQ_CONS,
        ]
        .iter()
        .map(|&r| u64::from(d.read32(r)))
        .collect();
        for r in [ARM_SMMU_STRTAB_BASE, ARM_SMMU_CMDQ_BASE, ARM_SMMU_EVTQ_BASE] {
            v.push(d.read64(r));
        }
        v
    }
    let before = snapshot(&mut d);
    let raz = [
        0x30u64,
        0x34,
        0x3c,
        ARM_SMMU_STATUSR,
        ARM_SMMU_AGBPA,
        0x4c,
        0x58,
        0x5c,
        0x78,
        0x7c,
        ARM_SMMU_PRIQ_BASE,
        ARM_SMMU_PRIQ_BASE + 4,
        ARM_SMMU_PRIQ_IRQ_CFG0,
        ARM_SMMU_PRIQ_IRQ_CFG1,
        ARM_SMMU_PRIQ_IRQ_CFG2,
        ARM_SMMU_EVTQ_IRQ_CFG0,
        ARM_SMMU_GERROR_IRQ_CFG1,
        0x100,
        0x118,
        0x200,
        0xe00,
        0xefc,
        0xfd4,
        0xfd8,
        0xfdc,
        0x1000,
        0x3ffc,
        0x8000,
        0x8020,
        0x8c00,
        ARM_SMMU_PRIQ_PROD,
        ARM_SMMU_PRIQ_CONS,
    ];
    for off in raz {
        d.write32(off, 0xffff_ffff);
        assert_eq!(d.read32(off), 0, "offset {off:#x}");
    }
    let idrs: Vec<u32> = (0..8).map(|i| d.read32(i * 4)).collect();
    for i in 0..8 {
        d.write32(i * 4, 0x5a5a_5a5a);
    }
    assert_eq!((0..8).map(|i| d.read32(i * 4)).collect::<Vec<_>>(), idrs);
    d.write32(ARM_SMMU_CR0ACK, 0);
    d.write32(ARM_SMMU_IRQ_CTRLACK, 0);
    d.write32(ARM_SMMU_GERROR, GERROR_CMDQ_ERR);
    assert_eq!(
        d.read32(ARM_SMMU_CR0ACK),
        CR0_SMMUEN | CR0_EVTQEN | CR0_CMDQEN
    );
    assert_eq!(
        d.read32(ARM_SMMU_IRQ_CTRLACK),
        IRQ_CTRL_EVTQ_IRQEN | IRQ_CTRL_GERROR_IRQEN
    );
    assert_eq!(d.read32(ARM_SMMU_GERROR), 0);
    assert_eq!(snapshot(&mut d), before);
    let cidr: Vec<u32> = (0..4).map(|i| d.read32(ARM_SMMU_CIDR0 + 4 * i)).collect();
    assert_eq!(cidr, [0x0d, 0xf0, 0x05, 0xb1]);
    assert_eq!(
        d.read32(ARM_SMMU_PIDR4) & 0xf0,
        0,
        "PIDR4.SIZE = 0: one 4 KiB block"
    );
}

/// GERRORN reads back what software wrote; an error is active while the bits differ.
#[test]
fn gerrorn_reads_back() {
    let mut d = probe_with(features(), DriverConfig::default());
    assert_eq!(d.read32(ARM_SMMU_GERROR), 0);
    d.write32(ARM_SMMU_GERRORN, GERROR_EVTQ_ABT_ERR);
    assert_eq!(d.read32(ARM_SMMU_GERRORN), GERROR_EVTQ_ABT_ERR);
    d.write32(ARM_SMMU_GERRORN, 0);
    assert_eq!(d.read32(ARM_SMMU_GERRORN), 0);
}
