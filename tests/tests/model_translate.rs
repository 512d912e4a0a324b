//! STE installs for emulated devices and translations through them: abort, bypass, stage 1
//! with linear and 2-level CD tables, Linux's hitless STE/CD updates, stage 2 and nested,
//! for every granule, pages and blocks (IHI 0070 chapter 3 and 5; digest sections 1-3).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use common::*;

/// `iova` translates to `pa` through a block of `1 << shift` bytes.
#[track_caller]
fn assert_maps(d: &mut Drv, sid: u32, ssid: Option<u32>, iova: u64, pa: u64, shift: u32) {
    let t = tr(d, sid, ssid, iova, READ).unwrap_or_else(|e| panic!("{iova:#x}: {e:?}"));
    assert_eq!(t.output(iova), pa, "sid {sid} ssid {ssid:?} iova {iova:#x}");
    assert_eq!(t.size_shift, shift, "block size of {iova:#x}");
    assert_eq!(t.input_base, iova & !((1u64 << shift) - 1));
}

fn no_interrupts(fx: &[Effect]) -> bool {
    !fx.iter()
        .any(|e| matches!(e, Effect::Irq(_) | Effect::MsiWrite { .. }))
}

/// STE.Config = abort: the transaction aborts and nothing is recorded (5.2, digest 1.1).
#[test]
fn abort_ste_is_silent() {
    let mut d = boot(features());
    d.write_ste(3, &make_bypass_ste(false)).unwrap();
    assert_eq!(out(&mut d, 3, None, 0x1000, READ), 0x1000);
    assert_eq!(
        d.write_ste(3, &make_abort_ste()).unwrap(),
        UpdateKind::Hitless { critical: 0 }
    );
    for a in [READ, WRITE, PRIV_READ, EXEC] {
        assert_eq!(fault(&mut d, 3, None, 0x1000, a), None);
    }
    // A SubstreamID does not change that.
    assert_eq!(fault(&mut d, 3, Some(1), 0x1000, READ), None);
    assert!(events(&mut d).is_empty());
    assert!(no_interrupts(&effects(&mut d)));
    assert_eq!(d.port.smmu().counters().events, 0);
}

/// STE.Config = bypass: identity for the whole output range, read and write.
#[test]
fn bypass_ste_is_identity() {
    let mut d = boot(features());
    d.write_ste(4, &make_bypass_ste(false)).unwrap();
    for iova in [0, 0x1234_5678, 0xabc_def0_1234, (1 << 44) - 1] {
        let t = tr(&mut d, 4, None, iova, WRITE).unwrap();
        assert_eq!(t.output(iova), iova);
        assert!(t.read && t.write);
    }
    // The rest of its level-2 table holds Linux's initial abort STEs (disable_bypass).
    assert_eq!(fault(&mut d, 5, None, 0x1000, READ), None);
    assert_eq!(fault(&mut d, 255, None, 0x1000, READ), None);
}

/// With `disable_bypass` off, Linux fills new level-2 tables with bypass STEs.
#[test]
fn initial_bypass_stes() {
    let cfg = DriverConfig {
        disable_bypass: false,
        ..DriverConfig::default()
    };
    let mut d = boot_with(features(), cfg);
    d.ste_addr(0x300).unwrap();
    d.issue_cmd_with_sync(CmdEnt::CfgiAll).unwrap();
    assert_eq!(out(&mut d, 0x3ff, None, 0x7000, READ), 0x7000);
}

/// Stage 1 through a single CD, for each granule: pages and every block size io-pgtable
/// uses, non-identity, at both ends of the 48-bit VA range.
#[test]
fn stage1_pages_and_blocks_every_granule() {
    let mut d = boot(features());
    for (i, g) in Granule::ALL.into_iter().enumerate() {
        let sid = 0x10 + i as u32;
        let dom = attach_s1(&mut d, sid, g, 1 + i as u16);
        let page = g.size();
        let block = 1u64 << g.level_shift(2);
        let (iova, pa) = (0x1234_0000u64, 0x8_7654_0000u64);
        d.map(&dom.pt, iova, pa, page, prot::RW).unwrap();
        let (biova, bpa) = (0x40_0000_0000u64, 0x2_0000_0000u64);
        d.map(&dom.pt, biova, bpa, block, prot::RW).unwrap();
        let top = (1u64 << 48) - page;
        d.map(&dom.pt, top, 0x7000_0000, page, prot::RW).unwrap();
        assert_maps(&mut d, sid, None, iova + 0x123, pa + 0x123, g.shift());
        assert_maps(&mut d, sid, None, iova + page - 8, pa + page - 8, g.shift());
        let mid = block / 2 + 0x10;
        assert_maps(&mut d, sid, None, biova + mid, bpa + mid, g.level_shift(2));
        assert_maps(&mut d, sid, None, top + 0x40, 0x7000_0040, g.shift());
        // The neighbours are not mapped.
        assert_eq!(
            fault(&mut d, sid, None, iova + page, READ),
            Some(id::F_TRANSLATION)
        );
        assert_eq!(
            fault(&mut d, sid, None, biova + block, READ),
            Some(id::F_TRANSLATION)
        );
        assert_eq!(events(&mut d).len(), 2);
    }
    // 4K also has 1 GiB blocks at level 1.
    let dom = attach_s1(&mut d, 0x20, Granule::G4K, 9);
    d.map(&dom.pt, 0x80_0000_0000, 0x40_0000_0000, GB, prot::RW)
        .unwrap();
    assert_maps(&mut d, 0x20, None, 0x80_1234_5678, 0x40_1234_5678, 30);
}

/// io-pgtable permissions: read-only (AP_RDONLY), privileged-only (no AP_UNPRIV), no-exec
/// (UXN|PXN), and unprivileged-writable memory never privileged-executable.
#[test]
fn stage1_permissions() {
    let mut d = boot(features());
    let dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    d.map(&dom.pt, 0x1000, 0x10_1000, 0x1000, prot::READ | prot::CACHE)
        .unwrap();
    d.map(&dom.pt, 0x2000, 0x10_2000, 0x1000, prot::RW | prot::PRIV)
        .unwrap();
    d.map(&dom.pt, 0x3000, 0x10_3000, 0x1000, prot::RW | prot::NOEXEC)
        .unwrap();
    d.map(&dom.pt, 0x4000, 0x10_4000, 0x1000, prot::RW).unwrap();
    let t = tr(&mut d, 1, None, 0x1000, READ).unwrap();
    assert!(t.read && !t.write);
    assert_eq!(
        fault(&mut d, 1, None, 0x1008, WRITE),
        Some(id::F_PERMISSION)
    );
    assert_eq!(
        fault(&mut d, 1, None, 0x1008, PRIV_WRITE),
        Some(id::F_PERMISSION)
    );
    assert_eq!(fault(&mut d, 1, None, 0x2000, READ), Some(id::F_PERMISSION));
    assert_eq!(out(&mut d, 1, None, 0x2010, PRIV_WRITE), 0x10_2010);
    assert_eq!(fault(&mut d, 1, None, 0x3000, EXEC), Some(id::F_PERMISSION));
    assert_eq!(out(&mut d, 1, None, 0x3000, WRITE), 0x10_3000);
    assert_eq!(out(&mut d, 1, None, 0x4000, EXEC), 0x10_4000);
    assert_eq!(
        fault(&mut d, 1, None, 0x4000, access(false, false, true, true)),
        Some(id::F_PERMISSION),
        "writable at EL0 means not executable at EL1"
    );
    assert_eq!(events(&mut d).len(), 5);
}

/// CD.R = 0: stage-1 faults terminate silently; CD.R = 1 (Linux) records them (5.4, 3.12).
#[test]
fn read_only_page_refuses_writes_silently_without_cd_r() {
    let mut d = boot(features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    d.map(&dom.pt, 0x5000, 0x20_5000, 0x1000, prot::READ | prot::CACHE)
        .unwrap();
    assert_eq!(out(&mut d, 1, None, 0x5000, READ), 0x20_5000);
    assert_eq!(
        fault(&mut d, 1, None, 0x5000, WRITE),
        Some(id::F_PERMISSION)
    );
    assert_eq!(one_event(&mut d).id(), id::F_PERMISSION);
    let mut cd = dom.cd;
    cd[0] &= !CTXDESC_CD_0_R;
    assert_eq!(
        d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap(),
        UpdateKind::Hitless { critical: 0 }
    );
    assert_eq!(fault(&mut d, 1, None, 0x5000, WRITE), None);
    assert_eq!(out(&mut d, 1, None, 0x5000, READ), 0x20_5000);
    assert!(events(&mut d).is_empty());
}

/// TTB1 (bit 55 selects it, TG1 with its own encoding) and TBI0/TBI1 (top byte ignored per
/// half), with EPD1 = 1 making the upper half fault (5.4.1).
#[test]
fn ttb1_and_top_byte_ignore() {
    let mut d = boot(features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    d.map(&dom.pt, 0x1000_0000, 0x5000_0000, 0x1000, prot::RW)
        .unwrap();
    let hi = 0xffff_ffff_ffe0_0000u64;
    // Linux's CD: EPD1 = 1, the upper half faults.
    assert_eq!(fault(&mut d, 1, None, hi, READ), Some(id::F_TRANSLATION));
    let pt1 = s1_pgtable(&mut d, Granule::G16K);
    d.map(&pt1, hi & !0x3fff, 0x6000_0000, 0x4000, prot::RW)
        .unwrap();
    let cd = with_ttb1(dom.cd, &pt1.s1_tcr());
    assert_eq!(cd[0] & CTXDESC_CD_0_TCR_TG1, 1 << 22, "TG1 = 0b01 for 16K");
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(out(&mut d, 1, None, hi + 0x123, READ), 0x6000_0123);
    assert_eq!(out(&mut d, 1, None, 0x1000_0040, READ), 0x5000_0040);
    // Without TBI the top byte must match bit 55.
    assert_eq!(
        fault(&mut d, 1, None, 0x12ff_ffff_ffe0_0123, READ),
        Some(id::F_TRANSLATION)
    );
    assert_eq!(
        fault(&mut d, 1, None, 0x5a00_0000_1000_0040, READ),
        Some(id::F_TRANSLATION)
    );
    // TBI0 and TBI1 (both cached in TLB entries: invalidate the ASID too).
    let cd = [
        cd[0] | CTXDESC_CD_0_TCR_TBI0 | CTXDESC_CD_0_TCR_TBI1,
        cd[1],
        cd[2],
        cd[3],
        0,
        0,
        0,
        0,
    ];
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 1 })
        .unwrap();
    assert_eq!(
        out(&mut d, 1, None, 0x12ff_ffff_ffe0_0123, READ),
        0x6000_0123
    );
    assert_eq!(
        out(&mut d, 1, None, 0x5a00_0000_1000_0040, READ),
        0x5000_0040
    );
    // Bit 55 set, bits [54:48] not all ones: outside the TTB1 range even with TBI.
    assert_eq!(
        fault(&mut d, 1, None, 0x0080_0000_1000_0000, READ),
        Some(id::F_TRANSLATION)
    );
    // The recorded InputAddr is the full address, tag included.
    let evs = events(&mut d);
    assert_eq!(evs.last().unwrap().input_addr(), 0x0080_0000_1000_0000);
    assert_eq!(evs[1].input_addr(), 0x12ff_ffff_ffe0_0123);
}

/// Three page tables mapping the same IOVA differently, one per CD.
fn three_tables(d: &mut Drv, iova: u64) -> [PageTable; 3] {
    let pts = [0, 1, 2].map(|_| s1_pgtable(d, Granule::G4K));
    for (i, pt) in pts.iter().enumerate() {
        d.map(pt, iova, 0x0a00_0000 + ((i as u64) << 24), 0x1000, prot::RW)
            .unwrap();
    }
    pts
}

/// SubstreamIDs through Linux's 2-level CD table (64K leaves, S1CDMax = 12) with every
/// S1DSS: SSID0 uses CD 0 without a SubstreamID and refuses SubstreamID 0, BYPASS skips stage
/// 1, TERMINATE refuses transactions without a SubstreamID (5.2, digest 1.3).
#[test]
fn two_level_cd_table_and_s1dss() {
    let mut d = boot(features());
    let sid = 0x40;
    let x = 0x10_0000u64;
    let [p0, pa, pb] = three_tables(&mut d, x);
    let mut table = d.new_cd_table(CdFmt::TwoLevel64K, 12, 0).unwrap();
    for (ssid, pt, asid) in [(0u32, &p0, 10u16), (5, &pa, 11), (1029, &pb, 12)] {
        let cd = make_s1_cd(&pt.s1_tcr(), asid, false);
        d.write_cd(&mut table, &[sid], ssid, &cd).unwrap();
    }
    assert_eq!(table.l2.iter().filter(|l| l.is_some()).count(), 2);
    let ste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_SSID0, false, false);
    assert_eq!(ste[0] >> 59, 12, "S1CDMax");
    assert_eq!((ste[0] >> 4) & 3, 2, "S1Fmt = 64K leaves");
    d.write_ste(sid, &ste).unwrap();
    assert_eq!(out(&mut d, sid, None, x, READ), 0x0a00_0000);
    assert_eq!(out(&mut d, sid, Some(5), x + 4, READ), 0x0b00_0004);
    assert_eq!(out(&mut d, sid, Some(1029), x + 8, READ), 0x0c00_0008);
    assert_eq!(
        fault(&mut d, sid, Some(0), x, READ),
        Some(id::F_STREAM_DISABLED)
    );
    assert_eq!(fault(&mut d, sid, Some(6), x, READ), Some(id::C_BAD_CD));
    assert_eq!(
        fault(&mut d, sid, Some(2048), x, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    assert_eq!(
        fault(&mut d, sid, Some(4096), x, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    // S1DSS = BYPASS: a hitless change of qword 1.
    let bypass = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_BYPASS, false, false);
    assert_eq!(
        d.write_ste(sid, &bypass).unwrap(),
        UpdateKind::Hitless { critical: 1 }
    );
    assert_eq!(out(&mut d, sid, None, x + 0x20, READ), x + 0x20);
    assert_eq!(out(&mut d, sid, Some(5), x, READ), 0x0b00_0000);
    // S1DSS = TERMINATE.
    let term = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_TERMINATE, false, false);
    d.write_ste(sid, &term).unwrap();
    assert_eq!(
        fault(&mut d, sid, None, x, READ),
        Some(id::F_STREAM_DISABLED)
    );
    assert_eq!(out(&mut d, sid, Some(1029), x, READ), 0x0c00_0000);
}

/// S1Fmt = 0b01: 4 KiB leaf tables of 64 CDs, SSID[5:0] indexing the leaf.
#[test]
fn two_level_cd_table_4k_leaves() {
    let mut d = boot(features());
    let x = 0x20_0000u64;
    let [_, pa, pb] = three_tables(&mut d, x);
    let mut table = d.new_cd_table(CdFmt::TwoLevel4K, 8, 0).unwrap();
    d.write_cd(&mut table, &[7], 3, &make_s1_cd(&pa.s1_tcr(), 3, false))
        .unwrap();
    d.write_cd(&mut table, &[7], 70, &make_s1_cd(&pb.s1_tcr(), 70, false))
        .unwrap();
    // L1 descriptor 1 points at the second leaf; CD 70 is its seventh entry.
    let l1 = read_u64(&d.mem, table.base + 8).unwrap();
    assert_eq!(l1, table.l2[1].unwrap() | 1);
    let cd70: [u64; 8] = read_qwords(&d.mem, table.l2[1].unwrap() + 6 * 64).unwrap();
    assert_eq!(cd70[0] >> 48, 70);
    let ste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_TERMINATE, false, false);
    d.write_ste(7, &ste).unwrap();
    assert_eq!(out(&mut d, 7, Some(3), x, READ), 0x0b00_0000);
    assert_eq!(out(&mut d, 7, Some(70), x, READ), 0x0c00_0000);
    assert_eq!(fault(&mut d, 7, Some(64), x, READ), Some(id::C_BAD_CD));
    assert_eq!(
        fault(&mut d, 7, Some(128), x, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
}

/// A linear table of 16 CDs (S1CDMax = 4).
#[test]
fn linear_cd_table_with_substreams() {
    let mut d = boot(features());
    let x = 0x30_0000u64;
    let [_, pa, pb] = three_tables(&mut d, x);
    let mut table = d.new_cd_table(CdFmt::Linear, 4, 0).unwrap();
    d.write_cd(&mut table, &[9], 1, &make_s1_cd(&pa.s1_tcr(), 21, false))
        .unwrap();
    d.write_cd(&mut table, &[9], 15, &make_s1_cd(&pb.s1_tcr(), 22, false))
        .unwrap();
    let ste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_BYPASS, false, false);
    d.write_ste(9, &ste).unwrap();
    assert_eq!(out(&mut d, 9, Some(1), x, READ), 0x0b00_0000);
    assert_eq!(out(&mut d, 9, Some(15), x, READ), 0x0c00_0000);
    assert_eq!(out(&mut d, 9, None, x, READ), x);
    assert_eq!(
        fault(&mut d, 9, Some(16), x, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    assert_eq!(fault(&mut d, 9, Some(2), x, READ), Some(id::C_BAD_CD));
}

/// bypass → stage 1: Linux writes qword 1 (unused by bypass), syncs, then switches qword 0.
/// The stream sees bypass, then stage 1, never a broken STE.
#[test]
fn hitless_bypass_to_stage1() {
    let mut d = boot(features());
    let sid = 0x21;
    d.write_ste(sid, &make_bypass_ste(false)).unwrap();
    let pt = s1_pgtable(&mut d, Granule::G4K);
    d.map(&pt, 0x7000, 0x9_9000, 0x1000, prot::RW).unwrap();
    let mut table = d.new_cd_table(CdFmt::Linear, 0, 0).unwrap();
    d.write_cd(&mut table, &[sid], 0, &make_s1_cd(&pt.s1_tcr(), 4, false))
        .unwrap();
    let target = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_SSID0, false, false);
    let current = d.read_ste(sid).unwrap();
    let plan = plan_update(&current, &target, ste_used);
    assert_eq!(plan.kind, UpdateKind::Hitless { critical: 0 });
    assert_eq!(plan.steps, vec![vec![(1, target[1])], vec![(0, target[0])]]);
    let mut seen = Vec::new();
    let kind = d
        .write_ste_observed(sid, &target, |d, _| {
            seen.push(out(d, sid, None, 0x7008, READ))
        })
        .unwrap();
    assert_eq!(kind, UpdateKind::Hitless { critical: 0 });
    assert_eq!(seen, [0x7008, 0x9_9008]);
    assert!(events(&mut d).is_empty());
}

/// A CD's ASID change is hitless (qword 0 only), and the new ASID takes effect after the
/// CFGI_CD + SYNC: a PTE change not yet invalidated for the old ASID is visible to the new
/// one.
#[test]
fn hitless_asid_change() {
    let mut d = boot(features());
    let mut dom = attach_s1(&mut d, 2, Granule::G4K, 1);
    d.map(&dom.pt, 0x8000, 0x1_8000, 0x1000, prot::RW).unwrap();
    assert_eq!(out(&mut d, 2, None, 0x8000, READ), 0x1_8000);
    dom.pt.remap(&d.mem, 0x8000, 0x2_8000).unwrap();
    assert_eq!(
        out(&mut d, 2, None, 0x8000, READ),
        0x1_8000,
        "ASID 1 still cached"
    );
    let new = make_s1_cd(&dom.pt.s1_tcr(), 2, false);
    let mut seen = Vec::new();
    let kind = d
        .write_cd_observed(&mut dom.table, &[2], 0, &new, |d, _| {
            seen.push(out(d, 2, None, 0x8010, READ));
        })
        .unwrap();
    assert_eq!(kind, UpdateKind::Hitless { critical: 0 });
    assert_eq!(seen, [0x2_8010]);
}

/// stage 1 → abort: qword 0 first (hitless), then the stage-1 fields are cleared. Each step
/// aborts silently.
#[test]
fn hitless_stage1_to_abort() {
    let mut d = boot(features());
    let dom = attach_s1(&mut d, 3, Granule::G4K, 3);
    d.map(&dom.pt, 0x9000, 0x3_9000, 0x1000, prot::RW).unwrap();
    assert_eq!(out(&mut d, 3, None, 0x9000, READ), 0x3_9000);
    let current = d.read_ste(3).unwrap();
    let plan = plan_update(&current, &make_abort_ste(), ste_used);
    assert_eq!(plan.steps.len(), 2);
    assert_eq!(plan.steps[0], vec![(0, STRTAB_STE_0_V)]);
    let mut seen = Vec::new();
    let kind = d
        .write_ste_observed(3, &make_abort_ste(), |d, _| {
            seen.push(tr(d, 3, None, 0x9000, READ))
        })
        .unwrap();
    assert_eq!(kind, UpdateKind::Hitless { critical: 0 });
    assert_eq!(seen, [Err(TranslationFault { event: None }); 2]);
    assert_eq!(d.read_ste(3).unwrap(), make_abort_ste());
    assert!(events(&mut d).is_empty());
}

/// stage 1 → stage 2 changes several qwords' used bits: Linux clears V first. While V = 0 the
/// stream reports C_BAD_STE (5.2: V = 0 → C_BAD_STE).
#[test]
fn breaking_stage1_to_stage2() {
    let mut d = boot(s2_features());
    let dom = attach_s1(&mut d, 5, Granule::G4K, 5);
    d.map(&dom.pt, 0xa000, 0x4_a000, 0x1000, prot::RW).unwrap();
    assert_eq!(out(&mut d, 5, None, 0xa000, READ), 0x4_a000);
    let s2 = s2_domain(&mut d, Granule::G4K, 5, 40);
    d.map(&s2.pt, 0xa000, 0x5_a000, 0x1000, prot::RW).unwrap();
    let mut seen = Vec::new();
    let kind = d
        .write_ste_observed(5, &make_s2_domain_ste(&s2.dom, false, false), |d, _| {
            seen.push(tr(d, 5, None, 0xa000, READ).map(|t| t.output(0xa000)));
        })
        .unwrap();
    assert_eq!(kind, UpdateKind::Breaking);
    let bad = Err(TranslationFault {
        event: Some(viommu_smmuv3::spec::event::EventId::C_BAD_STE),
    });
    assert_eq!(seen, [bad, bad, Ok(0x5_a000)]);
    let evs = events(&mut d);
    assert_eq!(evs.len(), 2);
    assert!(evs.iter().all(|e| e.id() == id::C_BAD_STE && e.sid() == 5));
}

/// Stage 2 only, each granule, pages and blocks, with io-pgtable's start level and S2SL0
/// (including level-1 concatenation for 4K at 40 bits, and level 0 at 44 bits).
#[test]
fn stage2_pages_and_blocks_every_granule() {
    let mut d = boot(s2_features());
    for (i, g) in Granule::ALL.into_iter().enumerate() {
        let sid = 0x50 + i as u32;
        let s2 = attach_s2(&mut d, sid, g, 10 + i as u16, 40);
        let (expect_sl0, expect_start) = match g {
            Granule::G4K => (1, 1),
            Granule::G16K => (2, 1),
            Granule::G64K => (1, 2),
        };
        assert_eq!(
            (s2.dom.vtcr.sl, s2.pt.start_level),
            (expect_sl0, expect_start)
        );
        assert_eq!(s2.dom.vtcr.tsz, 24);
        let page = g.size();
        let block = 1u64 << g.level_shift(2);
        d.map(&s2.pt, 0x1234_0000, 0x3_4560_0000, page, prot::RW)
            .unwrap();
        d.map(&s2.pt, 0x40_0000_0000, 0x6_0000_0000, block, prot::RW)
            .unwrap();
        assert_maps(&mut d, sid, None, 0x1234_0010, 0x3_4560_0010, g.shift());
        assert_maps(
            &mut d,
            sid,
            None,
            0x40_0000_0000 + block - 4,
            0x6_0000_0000 + block - 4,
            g.level_shift(2),
        );
        // Outside the 40-bit IPA space.
        assert!(tr(&mut d, sid, None, 1 << 40, READ).is_err());
    }
    // 4K at 44 bits: 32 start-level entries are too many to concatenate: start at level 0.
    let s2 = attach_s2(&mut d, 0x60, Granule::G4K, 20, 44);
    assert_eq!(
        (s2.dom.vtcr.sl, s2.pt.start_level, s2.dom.vtcr.tsz),
        (2, 0, 20)
    );
    d.map(&s2.pt, 0xabc_0000_0000, 0x1_0000_0000, GB, prot::RW)
        .unwrap();
    assert_maps(&mut d, 0x60, None, 0xabc_1234_5678, 0x1_1234_5678, 30);
}

/// Stage-2 permissions: S2AP read-only and write-only.
#[test]
fn stage2_permissions() {
    let mut d = boot(s2_features());
    let s2 = attach_s2(&mut d, 1, Granule::G4K, 1, 40);
    d.map(&s2.pt, 0x1000, 0x10_1000, 0x1000, prot::READ | prot::CACHE)
        .unwrap();
    d.map(&s2.pt, 0x2000, 0x10_2000, 0x1000, prot::WRITE | prot::CACHE)
        .unwrap();
    let t = tr(&mut d, 1, None, 0x1000, READ).unwrap();
    assert!(t.read && !t.write);
    assert_eq!(
        fault(&mut d, 1, None, 0x1000, WRITE),
        Some(id::F_PERMISSION)
    );
    assert_eq!(out(&mut d, 1, None, 0x2000, WRITE), 0x10_2000);
    assert_eq!(fault(&mut d, 1, None, 0x2000, READ), Some(id::F_PERMISSION));
}

/// Nested translation: stage-1 tables and CDs live in the guest's IPA space, every stage-1
/// fetch goes through stage 2, and the output is stage 2 of stage 1 (3.3, 3.4).
#[test]
fn nested_every_stage1_granule() {
    let mut d = boot(s2_features());
    let s2 = nested_s2(&mut d, 3);
    for (i, g) in Granule::ALL.into_iter().enumerate() {
        let sid = 0x70 + i as u32;
        let pt = d.new_pgtable(Stage::S1, g, 48, 40, NEST_OFFSET).unwrap();
        assert!(pt.ttbr() >= NEST_OFFSET);
        let va = 0x1000_0000u64;
        let ipa = 0x40_0000_0000 + ((i as u64) << 16);
        d.map(&pt, va, ipa, g.size(), prot::RW).unwrap();
        let mut table = d.new_cd_table(CdFmt::Linear, 0, NEST_OFFSET).unwrap();
        d.write_cd(
            &mut table,
            &[sid],
            0,
            &make_s1_cd(&pt.s1_tcr(), 7 + i as u16, false),
        )
        .unwrap();
        let vste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_SSID0, false, false);
        let ste = make_nested_ste(&vste, &s2.dom, false);
        assert_eq!((ste[0] >> 1) & 7, 7, "Config = nested");
        assert_eq!(
            ste[0] & STRTAB_STE_0_S1CTXPTR_MASK,
            table.base + NEST_OFFSET
        );
        d.write_ste(sid, &ste).unwrap();
        let pa = 0x5_0000_0000 + ((i as u64) << 16);
        assert_maps(&mut d, sid, None, va + 0x234, pa + 0x234, g.shift());
    }
}

/// Nested with a 2-level CD table (L1CD.L2Ptr is an IPA too) and S1DSS = BYPASS: a
/// transaction without SubstreamID skips stage 1 and is translated as an IPA by stage 2.
#[test]
fn nested_two_level_cd_and_s1dss_bypass() {
    let mut d = boot(s2_features());
    let s2 = nested_s2(&mut d, 4);
    let pt = d
        .new_pgtable(Stage::S1, Granule::G4K, 48, 40, NEST_OFFSET)
        .unwrap();
    d.map(&pt, 0x2000_0000, 0x40_0010_0000, 0x1000, prot::RW)
        .unwrap();
    let mut table = d.new_cd_table(CdFmt::TwoLevel64K, 11, NEST_OFFSET).unwrap();
    d.write_cd(
        &mut table,
        &[0x80],
        1500,
        &make_s1_cd(&pt.s1_tcr(), 9, false),
    )
    .unwrap();
    let l1 = read_u64(&d.mem, table.base + 8).unwrap();
    assert_eq!(
        l1,
        (table.l2[1].unwrap() + NEST_OFFSET) | 1,
        "L2Ptr is an IPA"
    );
    let vste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_BYPASS, false, false);
    d.write_ste(0x80, &make_nested_ste(&vste, &s2.dom, false))
        .unwrap();
    assert_eq!(
        out(&mut d, 0x80, Some(1500), 0x2000_0040, READ),
        0x5_0010_0040
    );
    assert_eq!(out(&mut d, 0x80, None, 0x40_0000_3000, READ), 0x5_0000_3000);
    assert!(
        tr(&mut d, 0x80, None, 0x41_0000_0000, READ).is_err(),
        "IPA not mapped by stage 2"
    );
}

/// Stream table layout rules (6.3.24/25, digest 2): a linear table's base is aligned using the
/// literal LOG2SIZE (its low bits are treated as zero, not an error), reserved FMT values
/// behave as linear, and a reserved SPLIT behaves as 6.
#[test]
fn stream_table_alignment_and_reserved_layouts() {
    let f = Capabilities {
        sid_bits: 6,
        ..features()
    };
    let mut d = boot(f);
    // 2^10 STEs (literal LOG2SIZE 10 > SIDSIZE 6): 64 KiB alignment.
    let table = d.alloc_zeroed(64 * 1024, 64 * 1024).unwrap();
    write_qwords(&d.mem, table + 5 * 64, &make_bypass_ste(false)).unwrap();
    write_qwords(&d.mem, table + 0x1000 + 5 * 64, &make_abort_ste()).unwrap();
    for (base, cfg) in [
        (table + 0x1000, 10u32),
        (table, 6),
        (table, (2 << 16) | 6),
        (table, (3 << 16) | 6),
    ] {
        with_smmu_disabled(&mut d, |d| {
            d.write64(ARM_SMMU_STRTAB_BASE, base | STRTAB_BASE_RA);
            d.write32(ARM_SMMU_STRTAB_BASE_CFG, cfg);
        });
        d.issue_cmd_with_sync(CmdEnt::CfgiAll).unwrap();
        assert_eq!(
            out(&mut d, 5, None, 0x8000, READ),
            0x8000,
            "base {base:#x} cfg {cfg:#x}"
        );
    }
    // 2-level with the reserved SPLIT 7 (behaves as 6): StreamID 0x40 is L1 index 1.
    let f = Capabilities {
        sid_bits: 8,
        ..features()
    };
    let mut d = boot(f);
    let l1 = d.alloc_zeroed(64, 64).unwrap();
    let l2a = d.alloc_zeroed(64 * 64, 64 * 64).unwrap();
    let l2b = d.alloc_zeroed(64 * 64, 64 * 64).unwrap();
    write_qwords(&d.mem, l2a, &make_abort_ste()).unwrap();
    write_qwords(&d.mem, l2b, &make_bypass_ste(false)).unwrap();
    write_u64(&d.mem, l1, l2a | 7).unwrap();
    write_u64(&d.mem, l1 + 8, l2b | 7).unwrap();
    with_smmu_disabled(&mut d, |d| {
        d.write64(ARM_SMMU_STRTAB_BASE, l1 | STRTAB_BASE_RA);
        d.write32(ARM_SMMU_STRTAB_BASE_CFG, (1 << 16) | (7 << 6) | 8);
    });
    d.issue_cmd_with_sync(CmdEnt::CfgiAll).unwrap();
    assert_eq!(out(&mut d, 0x40, None, 0x8000, READ), 0x8000);
    assert_eq!(fault(&mut d, 0x00, None, 0x8000, READ), None);
}

/// Table base bits below the table's alignment are treated as zero (CD.TTB0, STE.S2TTB).
#[test]
fn table_base_low_bits_treated_as_zero() {
    let mut d = boot(s2_features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    d.map(&dom.pt, 0x3000, 0x7_3000, 0x1000, prot::RW).unwrap();
    let mut cd = dom.cd;
    cd[1] |= 0x10; // TTB0[51:4]: a 4K level-0 table with 512 entries is 4K aligned
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(out(&mut d, 1, None, 0x3000, READ), 0x7_3000);
    let mut s2 = s2_domain(&mut d, Granule::G4K, 2, 40);
    d.map(&s2.pt, 0x3000, 0x8_3000, 0x1000, prot::RW).unwrap();
    s2.dom.vttbr |= 0x1ff0; // two concatenated level-1 tables: 8 KiB aligned
    d.write_ste(2, &make_s2_domain_ste(&s2.dom, false, false))
        .unwrap();
    assert_eq!(out(&mut d, 2, None, 0x3000, READ), 0x8_3000);
}

/// Blocks exist only where the granule has them (48-bit PAs): a block descriptor at 4K level
/// 0, 16K level 1 or 64K level 1, or 0b01 at level 3, is invalid: F_TRANSLATION.
#[test]
fn block_descriptors_only_at_block_levels() {
    let mut d = boot(features());
    for (i, (g, level)) in [
        (Granule::G4K, 0u32),
        (Granule::G16K, 1),
        (Granule::G64K, 1),
        (Granule::G4K, 3),
        (Granule::G16K, 3),
        (Granule::G64K, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let sid = 0x30 + i as u32;
        let dom = attach_s1(&mut d, sid, g, 0x30 + i as u16);
        let block = dom.pt.prot_to_pte(prot::RW) | 1; // 0b01
        dom.pt
            .map_raw(&d.mem, &mut d.alloc, 0, level, block)
            .unwrap();
        assert_eq!(
            fault(&mut d, sid, None, 0x10, READ),
            Some(id::F_TRANSLATION),
            "{g:?} level {level}"
        );
        // The same descriptor as a page (0b11) at level 3 translates.
        if level == 3 {
            let leaf = dom.pt.lookup(&d.mem, 0).unwrap().unwrap();
            write_u64(&d.mem, leaf.pte_addr, block | 2).unwrap();
            assert_eq!(out(&mut d, sid, None, 0x10, READ), 0x10);
        }
    }
    assert_eq!(events(&mut d).len(), 6);
}

/// Nested over 16K and 64K stage-2 tables (64K stage 1): the smaller of the two stages'
/// blocks is the translation's size.
#[test]
fn nested_every_stage2_granule() {
    let mut d = boot(s2_features());
    for (i, g) in [Granule::G16K, Granule::G64K].into_iter().enumerate() {
        let sid = 0x90 + i as u32;
        let s2 = nested_s2_with(&mut d, g, 20 + i as u16);
        let pt = d
            .new_pgtable(Stage::S1, Granule::G64K, 48, 40, NEST_OFFSET)
            .unwrap();
        d.map(
            &pt,
            0x4000_0000,
            NEST_DATA_IPA + 0x10_0000,
            0x1_0000,
            prot::RW,
        )
        .unwrap();
        let mut table = d.new_cd_table(CdFmt::Linear, 0, NEST_OFFSET).unwrap();
        d.write_cd(
            &mut table,
            &[sid],
            0,
            &make_s1_cd(&pt.s1_tcr(), 30 + i as u16, false),
        )
        .unwrap();
        let vste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_SSID0, false, false);
        d.write_ste(sid, &make_nested_ste(&vste, &s2.dom, false))
            .unwrap();
        // Stage 1 maps 64K, stage 2 maps the window with 16K or 64K pages.
        assert_maps(
            &mut d,
            sid,
            None,
            0x4000_ff00,
            NEST_DATA_PA + 0x10_ff00,
            g.shift(),
        );
    }
}
