//! Every event the model records, with its exact record fields decoded the way Linux's
//! `arm_smmu_decode_event()` reads them (IHI 0070 chapter 7; digest sections 1-3 and 6), plus
//! the event queue's interrupt, overflow and abort behaviour.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use common::*;
use viommu_tests::guest::bits::genmask;

/// Event dword 1 for a fault: RnW (1 = read), PnU, InD, S2, CLASS.
fn dw1(a: AccessKind, s2: bool, class: u8) -> u64 {
    (u64::from(!a.write) << 35)
        | (u64::from(a.privileged) << 33)
        | (u64::from(a.exec && !a.write) << 34)
        | (u64::from(s2) << 39)
        | (u64::from(class) << 40)
}

fn dw0(id: u8, sid: u32, ssid: Option<u32>) -> u64 {
    let ss = ssid.map_or(0, |s| (1 << 11) | (u64::from(s) << 12));
    u64::from(id) | ss | (u64::from(sid) << 32)
}

/// A configuration error record: type, StreamID, SSV/SubstreamID, nothing else.
#[track_caller]
fn assert_config_event(ev: Event, id: u8, sid: u32, ssid: Option<u32>) {
    assert_eq!(ev, Event([dw0(id, sid, ssid), 0, 0, 0]), "{ev:x?}");
}

/// A translation fault record: everything but IPA (UNKNOWN for stage 1).
#[track_caller]
fn assert_s1_fault(ev: Event, id: u8, sid: u32, ssid: Option<u32>, a: AccessKind, iova: u64) {
    assert_eq!(ev.0[0], dw0(id, sid, ssid), "{ev:x?}");
    assert_eq!(ev.0[1], dw1(a, false, class::IN), "{ev:x?}");
    assert_eq!(ev.input_addr(), iova);
}

/// A stage-2 fault record with its IPA.
#[track_caller]
fn assert_s2_fault(ev: Event, id: u8, sid: u32, a: AccessKind, class: u8, iova: u64, ipa: u64) {
    assert_eq!(ev.0[0], dw0(id, sid, None), "{ev:x?}");
    assert_eq!(ev.0[1], dw1(a, true, class), "{ev:x?}");
    assert_eq!(ev.input_addr(), iova);
    assert_eq!(ev.0[3], ipa & genmask(51, 12), "IPA of {ev:x?}");
}

fn set_cr2(d: &mut Drv, cr2: u32) {
    with_smmu_disabled(d, |d| d.write32(ARM_SMMU_CR2, cr2));
}

/// C_BAD_STREAMID (7.3.3, digest 2): a StreamID beyond LOG2SIZE, an invalid L1STD (Span 0,
/// reserved, larger than SPLIT + 1), a StreamID beyond the level-2 span; recorded only with
/// CR2.RECINVSID.
#[test]
fn c_bad_streamid() {
    let mut d = boot(features());
    assert_eq!(
        fault(&mut d, 0x1_0000, None, 0x1000, READ),
        Some(id::C_BAD_STREAMID)
    );
    assert_config_event(one_event(&mut d), id::C_BAD_STREAMID, 0x1_0000, None);
    assert_eq!(
        fault(&mut d, 0xdead_beef, Some(5), 0x1000, WRITE),
        Some(id::C_BAD_STREAMID)
    );
    assert_config_event(one_event(&mut d), id::C_BAD_STREAMID, 0xdead_beef, Some(5));
    // An L1 descriptor never written (Span = 0).
    assert_eq!(
        fault(&mut d, 0x1234, None, 0, READ),
        Some(id::C_BAD_STREAMID)
    );
    assert_config_event(one_event(&mut d), id::C_BAD_STREAMID, 0x1234, None);
    // L1 descriptor 0x20 by hand: Span 3, a level-2 table of 4 STEs.
    let l2 = d.alloc_zeroed(4 * 64, 256).unwrap();
    for i in 0..4 {
        write_qwords(&d.mem, l2 + i * 64, &make_bypass_ste(false)).unwrap();
    }
    let l1 = d.strtab.l1_desc_addr(0x2000).unwrap();
    for (span, ok) in [
        (3u64, true),
        (9, true),
        (10, false),
        (12, false),
        (31, false),
    ] {
        let table = if span == 9 {
            d.alloc_zeroed(256 * 64, 256 * 64).unwrap()
        } else {
            l2
        };
        if span == 9 {
            write_qwords(&d.mem, table + 2 * 64, &make_bypass_ste(false)).unwrap();
        }
        write_u64(&d.mem, l1, table | span).unwrap();
        d.issue_cmd_with_sync(CmdEnt::CfgiSte {
            sid: 0x2002,
            leaf: false,
        })
        .unwrap();
        let r = tr(&mut d, 0x2002, None, 0x3000, READ);
        if ok {
            assert_eq!(r.unwrap().output(0x3000), 0x3000, "Span {span}");
        } else {
            assert_eq!(
                r.unwrap_err().event.map(|e| e.0),
                Some(id::C_BAD_STREAMID),
                "Span {span}"
            );
            assert_config_event(one_event(&mut d), id::C_BAD_STREAMID, 0x2002, None);
        }
    }
    // Span 3 covers StreamIDs 0x2000..=0x2003 only.
    write_u64(&d.mem, l1, l2 | 3).unwrap();
    d.issue_cmd_with_sync(CmdEnt::CfgiAll).unwrap();
    assert_eq!(out(&mut d, 0x2003, None, 0x3000, READ), 0x3000);
    assert_eq!(
        fault(&mut d, 0x2004, None, 0x3000, READ),
        Some(id::C_BAD_STREAMID)
    );
    assert_eq!(
        fault(&mut d, 0x20ff, None, 0x3000, READ),
        Some(id::C_BAD_STREAMID)
    );
    assert_eq!(events(&mut d).len(), 2);
    // Without RECINVSID the transaction still aborts but nothing is recorded.
    set_cr2(&mut d, CR2_PTM);
    assert_eq!(fault(&mut d, 0x1_0000, None, 0x1000, READ), None);
    assert_eq!(fault(&mut d, 0x2004, None, 0x1000, READ), None);
    assert!(events(&mut d).is_empty());
}

/// F_STE_FETCH (7.3.4): an STE read outside memory, FetchAddr = the STE's PA.
#[test]
fn f_ste_fetch() {
    let mut d = boot(features());
    let l1 = d.strtab.l1_desc_addr(0x3000).unwrap();
    write_u64(&d.mem, l1, OUTSIDE_RAM | 9).unwrap();
    assert_eq!(
        fault(&mut d, 0x3005, None, 0x1000, READ),
        Some(id::F_STE_FETCH)
    );
    let ev = one_event(&mut d);
    assert_eq!(ev.0[0], dw0(id::F_STE_FETCH, 0x3005, None));
    assert_eq!(ev.fetch_addr(), OUTSIDE_RAM + 5 * 64);
    assert_eq!(ev.0[3] & 7, 0);
    // With a SubstreamID.
    assert_eq!(
        fault(&mut d, 0x30ff, Some(9), 0x1000, READ),
        Some(id::F_STE_FETCH)
    );
    let ev = one_event(&mut d);
    assert_eq!(ev.0[0], dw0(id::F_STE_FETCH, 0x30ff, Some(9)));
    assert_eq!(ev.fetch_addr(), OUTSIDE_RAM + 0xff * 64);
    // A linear stream table outside memory.
    let f = Capabilities {
        sid_bits: 6,
        ..features()
    };
    let mut d = boot(f);
    with_smmu_disabled(&mut d, |d| d.write64(ARM_SMMU_STRTAB_BASE, OUTSIDE_RAM));
    assert_eq!(fault(&mut d, 3, None, 0x1000, READ), Some(id::F_STE_FETCH));
    assert_eq!(one_event(&mut d).fetch_addr(), OUTSIDE_RAM + 3 * 64);
}

/// Installs `ste` on `sid` and expects C_BAD_STE with the exact record.
#[track_caller]
fn expect_bad_ste(d: &mut Drv, sid: u32, ste: &Entry, what: &str) {
    install_ste(d, sid, ste);
    let r = tr(d, sid, None, 0x1000, READ);
    assert_eq!(
        r.err().and_then(|e| e.event).map(|e| e.0),
        Some(id::C_BAD_STE),
        "{what}"
    );
    let evs = events(d);
    assert_eq!(evs.len(), 1, "{what}: {evs:x?}");
    assert_config_event(evs[0], id::C_BAD_STE, sid, None);
}

fn s1_ste(d: &mut Drv, sid: u32) -> Entry {
    let dom = attach_s1(d, sid, Granule::G4K, sid as u16);
    d.map(&dom.pt, 0x1000, 0x2000, 0x1000, prot::RW).unwrap();
    assert_eq!(out(d, sid, None, 0x1000, READ), 0x2000);
    d.read_ste(sid).unwrap()
}

/// C_BAD_STE on a stage-1 SMMU (5.2.2, digest 1.2): V = 0, stage 2 without S2P,
/// S1ContextPtr beyond the OAS, S1CDMax beyond SSIDSIZE, S1STALLD with STALL_MODEL = 0b01.
#[test]
fn c_bad_ste_stage1() {
    let mut d = boot(features());
    let good = s1_ste(&mut d, 1);
    expect_bad_ste(&mut d, 1, &[0; 8], "all zero");
    expect_bad_ste(
        &mut d,
        1,
        &[good[0] & !1, good[1], good[2], 0, 0, 0, 0, 0],
        "V = 0",
    );
    for cfg in [6u64, 7] {
        let ste = [(good[0] & !0xe) | (cfg << 1), good[1], 0, 0, 0, 0, 0, 0];
        expect_bad_ste(&mut d, 1, &ste, "stage 2 without S2P");
    }
    let ptr = |p: u64| (good[0] & !STRTAB_STE_0_S1CTXPTR_MASK) | p;
    expect_bad_ste(
        &mut d,
        1,
        &[ptr(1 << 44), good[1], 0, 0, 0, 0, 0, 0],
        "S1ContextPtr = 2^OAS",
    );
    let cdmax = |n: u64| (good[0] & !STRTAB_STE_0_S1CDMAX) | (n << 59);
    expect_bad_ste(
        &mut d,
        1,
        &[cdmax(17), good[1], 0, 0, 0, 0, 0, 0],
        "S1CDMax 17 > 16",
    );
    expect_bad_ste(
        &mut d,
        1,
        &[cdmax(31), good[1], 0, 0, 0, 0, 0, 0],
        "S1CDMax 31",
    );
    expect_bad_ste(
        &mut d,
        1,
        &[good[0], good[1] | STRTAB_STE_1_S1STALLD, 0, 0, 0, 0, 0, 0],
        "S1STALLD",
    );
    // The boundaries are legal: S1CDMax = SSIDSIZE, S1ContextPtr just below 2^OAS (which
    // then fails to fetch).
    install_ste(&mut d, 1, &[cdmax(16), good[1] & !3, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        fault(&mut d, 1, None, 0x1000, READ),
        Some(id::F_STREAM_DISABLED)
    );
    install_ste(&mut d, 1, &[ptr((1 << 44) - 64), good[1], 0, 0, 0, 0, 0, 0]);
    assert_eq!(fault(&mut d, 1, None, 0x1000, READ), Some(id::F_CD_FETCH));
    assert_eq!(events(&mut d).len(), 2);
    // A valid STE again.
    install_ste(&mut d, 1, &good);
    assert_eq!(out(&mut d, 1, None, 0x1000, READ), 0x2000);
}

/// EATS (digest 1.2 rule 3): with IDR0.ATS, EATS = 0b10 is ILLEGAL unless Config = nested;
/// without ATS it is IGNORED.
#[test]
fn c_bad_ste_eats() {
    let f = Capabilities {
        ats: true,
        ..features()
    };
    let mut d = boot(f);
    let good = s1_ste(&mut d, 1);
    let eats = |v: u64| (good[1] & !STRTAB_STE_1_EATS) | (v << 28);
    expect_bad_ste(
        &mut d,
        1,
        &[good[0], eats(2), 0, 0, 0, 0, 0, 0],
        "EATS = 0b10, stage 1 only",
    );
    install_ste(&mut d, 1, &[good[0], eats(1), 0, 0, 0, 0, 0, 0]);
    assert_eq!(out(&mut d, 1, None, 0x1000, READ), 0x2000);
    let mut d = boot(features());
    let good = s1_ste(&mut d, 1);
    install_ste(&mut d, 1, &[good[0], eats(2), 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        out(&mut d, 1, None, 0x1000, READ),
        0x2000,
        "EATS ignored without ATS"
    );
}

/// Stage 1 on a stage-2-only SMMU is ILLEGAL (Config = 0b1x1 with S1P = 0).
#[test]
fn c_bad_ste_stage1_without_s1p() {
    let f = Capabilities {
        s1p: false,
        s2p: true,
        ..features()
    };
    let mut d = boot(f);
    assert!(!d.info.trans_s1);
    let ste = make_cdtable_ste(
        &CdTablePtr {
            ptr: 0x10_0000,
            s1fmt: 0,
            s1cdmax: 0,
        },
        0,
        false,
        false,
    );
    expect_bad_ste(&mut d, 1, &ste, "stage 1 without S1P");
}

/// A valid stage-2 STE (4K, 40-bit IPA, start level 1) mapping 0x1000 → 0x2000.
fn s2_ste(d: &mut Drv, sid: u32) -> Entry {
    let s2 = attach_s2(d, sid, Granule::G4K, 1, 40);
    d.map(&s2.pt, 0x1000, 0x2000, 0x1000, prot::RW).unwrap();
    assert_eq!(out(d, sid, None, 0x1000, READ), 0x2000);
    d.read_ste(sid).unwrap()
}

/// C_BAD_STE for stage-2 fields (digest 1.2 rule 6): S2AA64 = 0, S2ENDI on a little-endian
/// SMMU, S2S with STALL_MODEL = 0b01, S2HA/S2HD without HTTU, S2TG reserved, S2T0SZ out of
/// range (v3.1+: 64 - IAS ..= 39), S2SL0 inconsistent with S2T0SZ, S2TTB beyond S2PS.
#[test]
fn c_bad_ste_stage2() {
    let mut d = boot(s2_features());
    let good = s2_ste(&mut d, 2);
    let q2 = |set: u64, clear: u64| {
        [
            good[0],
            good[1],
            (good[2] & !clear) | set,
            good[3],
            0,
            0,
            0,
            0,
        ]
    };
    let vtcr = |field: u64, v: u64| q2(prep(field << 32, v), field << 32);
    use viommu_tests::guest::bits::prep;
    let cases: Vec<(Entry, &str)> = vec![
        (q2(0, STRTAB_STE_2_S2AA64), "S2AA64 = 0"),
        (q2(STRTAB_STE_2_S2ENDI, 0), "S2ENDI"),
        (q2(STRTAB_STE_2_S2S, 0), "S2S"),
        (q2(STRTAB_STE_2_S2HA, 0), "S2HA"),
        (q2(STRTAB_STE_2_S2HD, 0), "S2HD"),
        (vtcr(STRTAB_STE_2_VTCR_S2TG, 3), "S2TG = 0b11"),
        (vtcr(STRTAB_STE_2_VTCR_S2T0SZ, 15), "S2T0SZ 15"),
        (
            vtcr(STRTAB_STE_2_VTCR_S2T0SZ, 19),
            "S2T0SZ 19: 45-bit IPA > IAS 44",
        ),
        (vtcr(STRTAB_STE_2_VTCR_S2T0SZ, 40), "S2T0SZ 40 > 39"),
        (vtcr(STRTAB_STE_2_VTCR_S2T0SZ, 63), "S2T0SZ 63"),
        (
            vtcr(STRTAB_STE_2_VTCR_S2SL0, 0),
            "S2SL0 level 2 for a 40-bit IPA",
        ),
        (vtcr(STRTAB_STE_2_VTCR_S2SL0, 3), "S2SL0 0b11"),
    ];
    for (ste, what) in &cases {
        expect_bad_ste(&mut d, 2, ste, what);
    }
    // S2TTB beyond the effective S2PS (40 bits).
    let ps40 = vtcr(STRTAB_STE_2_VTCR_S2PS, 2);
    expect_bad_ste(
        &mut d,
        2,
        &[ps40[0], ps40[1], ps40[2], 1 << 41, 0, 0, 0, 0],
        "S2TTB 2^41, PS 40",
    );
    // S2PS is never ILLEGAL: reserved 0b111 behaves as the OAS cap (44 bits), so the same
    // S2TTB is legal and its walk aborts outside RAM (F_WALK_EABT, stage 2).
    let ps7 = vtcr(STRTAB_STE_2_VTCR_S2PS, 7);
    install_ste(&mut d, 2, &[ps7[0], ps7[1], ps7[2], 1 << 41, 0, 0, 0, 0]);
    // S2TTB is cached in TLB entries: invalidate the VMID too.
    d.issue_cmd_with_sync(CmdEnt::TlbiS12Vmall { vmid: 1 })
        .unwrap();
    assert_eq!(fault(&mut d, 2, None, 0x1000, READ), Some(id::F_WALK_EABT));
    let ev = one_event(&mut d);
    assert!(ev.s2());
    // The 64K granule with S2SL0 = level 1 needs at least 43 IPA bits.
    let tg64 = vtcr(STRTAB_STE_2_VTCR_S2TG, 1);
    let sl1 = (tg64[2] & !(STRTAB_STE_2_VTCR_S2SL0 << 32)) | (2 << 38);
    expect_bad_ste(
        &mut d,
        2,
        &[tg64[0], tg64[1], sl1, tg64[3], 0, 0, 0, 0],
        "64K SL0 level 1, 40 bits",
    );
    install_ste(&mut d, 2, &good);
    d.issue_cmd_with_sync(CmdEnt::TlbiS12Vmall { vmid: 1 })
        .unwrap();
    assert_eq!(out(&mut d, 2, None, 0x1000, READ), 0x2000);
}

/// Never ILLEGAL (digest 1.1, 1.2): reserved Config 0b001..0b011 abort silently; S1DSS = 0b11
/// behaves as 0b00; S1Fmt = 0b11 behaves as linear; attribute overrides of a bypass STE.
#[test]
fn ste_reserved_values_that_are_not_illegal() {
    let mut d = boot(features());
    for cfg in 1u64..=3 {
        install_ste(
            &mut d,
            1,
            &[1 | (cfg << 1), u64::MAX, u64::MAX, u64::MAX, 0, 0, 0, 0],
        );
        assert_eq!(
            fault(&mut d, 1, None, 0x1000, READ),
            None,
            "Config {cfg:#b}"
        );
    }
    let bypass = make_bypass_ste(false);
    // MemAttr, MTCFG, ALLOCCFG, SHCFG, NSCFG, PRIVCFG, INSTCFG all ones.
    install_ste(&mut d, 1, &[bypass[0], genmask(51, 32), 0, 0, 0, 0, 0, 0]);
    assert_eq!(out(&mut d, 1, None, 0x1000, READ), 0x1000);
    assert!(events(&mut d).is_empty());
    // A 16-CD linear table with S1DSS = 0b11 and S1Fmt = 0b11.
    let pt = s1_pgtable(&mut d, Granule::G4K);
    d.map(&pt, 0x1000, 0x9000, 0x1000, prot::RW).unwrap();
    let mut table = d.new_cd_table(CdFmt::Linear, 4, 0).unwrap();
    d.write_cd(&mut table, &[1], 3, &make_s1_cd(&pt.s1_tcr(), 3, false))
        .unwrap();
    let mut ste = make_cdtable_ste(&table.ste_ptr(), 3, false, false);
    ste[0] |= 3 << 4;
    install_ste(&mut d, 1, &ste);
    assert_eq!(
        fault(&mut d, 1, None, 0x1000, READ),
        Some(id::F_STREAM_DISABLED)
    );
    assert_eq!(out(&mut d, 1, Some(3), 0x1000, READ), 0x9000);
    assert_eq!(events(&mut d).len(), 1);
}

/// F_STREAM_DISABLED (7.3.7): S1CDMax > 0, S1DSS = terminate, no SubstreamID; or S1DSS =
/// SSID0 and SubstreamID 0. The record carries the StreamID only.
#[test]
fn f_stream_disabled() {
    let mut d = boot(features());
    let mut table = d.new_cd_table(CdFmt::Linear, 2, 0).unwrap();
    let pt = s1_pgtable(&mut d, Granule::G4K);
    d.write_cd(&mut table, &[6], 0, &make_s1_cd(&pt.s1_tcr(), 1, false))
        .unwrap();
    d.write_ste(6, &make_cdtable_ste(&table.ste_ptr(), 0, false, false))
        .unwrap();
    assert_eq!(
        fault(&mut d, 6, None, 0x1000, PRIV_WRITE),
        Some(id::F_STREAM_DISABLED)
    );
    assert_config_event(one_event(&mut d), id::F_STREAM_DISABLED, 6, None);
    d.write_ste(6, &make_cdtable_ste(&table.ste_ptr(), 2, false, false))
        .unwrap();
    assert_eq!(
        fault(&mut d, 6, Some(0), 0x1000, READ),
        Some(id::F_STREAM_DISABLED)
    );
    assert_config_event(one_event(&mut d), id::F_STREAM_DISABLED, 6, None);
}

/// C_BAD_SUBSTREAMID (7.3.9, digest 1.3): a SubstreamID with stage 1 off (bypass, stage 2
/// only) or S1CDMax = 0, beyond 2^S1CDMax, or through an invalid L1CD. SubstreamID is always
/// valid in the record (no SSV).
#[test]
fn c_bad_substreamid() {
    let mut d = boot(s2_features());
    d.write_ste(1, &make_bypass_ste(false)).unwrap();
    assert_eq!(
        fault(&mut d, 1, Some(3), 0x1000, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    assert_eq!(
        one_event(&mut d),
        Event([0x08 | (3 << 12) | (1 << 32), 0, 0, 0])
    );
    s2_ste(&mut d, 2);
    assert_eq!(
        fault(&mut d, 2, Some(0xfffff), 0x1000, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    assert_eq!(
        one_event(&mut d),
        Event([0x08 | (0xfffff << 12) | (2 << 32), 0, 0, 0])
    );
    // S1CDMax = 0.
    s1_ste(&mut d, 3);
    assert_eq!(
        fault(&mut d, 3, Some(1), 0x1000, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    assert_eq!(
        one_event(&mut d),
        Event([0x08 | (1 << 12) | (3 << 32), 0, 0, 0])
    );
    // 2-level table (S1CDMax = 11): SubstreamID 2048 beyond it, 1024 through an invalid L1CD,
    // and CD 0 through an invalid L1CD with S1DSS = SSID0: recorded as SubstreamID 0.
    let table = d.new_cd_table(CdFmt::TwoLevel64K, 11, 0).unwrap();
    d.write_ste(4, &make_cdtable_ste(&table.ste_ptr(), 2, false, false))
        .unwrap();
    for (ssid, recorded) in [(Some(2048), 2048u64), (Some(1024), 1024), (None, 0)] {
        assert_eq!(
            fault(&mut d, 4, ssid, 0x1000, READ),
            Some(id::C_BAD_SUBSTREAMID)
        );
        assert_eq!(
            one_event(&mut d),
            Event([0x08 | (recorded << 12) | (4 << 32), 0, 0, 0])
        );
    }
}

/// Without substreams (SSIDSIZE = 0) S1CDMax, S1Fmt and S1DSS are IGNORED: the STE points at
/// one CD, and any SubstreamID is C_BAD_SUBSTREAMID.
#[test]
fn no_substreams_ignores_s1cdmax() {
    let f = Capabilities {
        ssid_bits: 0,
        ..features()
    };
    let mut d = boot(f);
    let pt = s1_pgtable(&mut d, Granule::G4K);
    d.map(&pt, 0x1000, 0x8000, 0x1000, prot::RW).unwrap();
    let mut table = d.new_cd_table(CdFmt::Linear, 0, 0).unwrap();
    d.write_cd(&mut table, &[1], 0, &make_s1_cd(&pt.s1_tcr(), 1, false))
        .unwrap();
    let mut ste = make_cdtable_ste(&table.ste_ptr(), 0, false, false);
    ste[0] |= (20 << 59) | (2 << 4);
    install_ste(&mut d, 1, &ste);
    assert_eq!(out(&mut d, 1, None, 0x1000, READ), 0x8000);
    assert_eq!(
        fault(&mut d, 1, Some(0), 0x1000, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
}

/// F_CD_FETCH (7.3.10): FetchAddr is the PA of the CD, or of the L1CD, that could not be read.
#[test]
fn f_cd_fetch() {
    let mut d = boot(features());
    let cd_ptr = |p: u64, cdmax: u8, fmt: u64| {
        make_cdtable_ste(
            &CdTablePtr {
                ptr: p,
                s1fmt: fmt,
                s1cdmax: cdmax,
            },
            0,
            false,
            false,
        )
    };
    install_ste(&mut d, 1, &cd_ptr(OUTSIDE_RAM, 0, 0));
    assert_eq!(fault(&mut d, 1, None, 0x1000, READ), Some(id::F_CD_FETCH));
    let ev = one_event(&mut d);
    assert_eq!(
        (ev.0[0], ev.fetch_addr()),
        (dw0(id::F_CD_FETCH, 1, None), OUTSIDE_RAM)
    );
    install_ste(&mut d, 1, &cd_ptr(OUTSIDE_RAM, 4, 0));
    assert_eq!(
        fault(&mut d, 1, Some(3), 0x1000, READ),
        Some(id::F_CD_FETCH)
    );
    let ev = one_event(&mut d);
    assert_eq!(
        (ev.0[0], ev.fetch_addr()),
        (dw0(id::F_CD_FETCH, 1, Some(3)), OUTSIDE_RAM + 3 * 64)
    );
    // An L1 table outside RAM: FetchAddr is the L1CD.
    install_ste(&mut d, 1, &cd_ptr(OUTSIDE_RAM, 12, 2));
    assert_eq!(
        fault(&mut d, 1, Some(3000), 0x1000, READ),
        Some(id::F_CD_FETCH)
    );
    assert_eq!(one_event(&mut d).fetch_addr(), OUTSIDE_RAM + 2 * 8);
    // An L1CD pointing outside RAM: FetchAddr is the CD in the level-2 table.
    let table = d.new_cd_table(CdFmt::TwoLevel64K, 12, 0).unwrap();
    write_u64(&d.mem, table.base + 8, OUTSIDE_RAM | 1).unwrap();
    install_ste(&mut d, 1, &cd_ptr(table.base, 12, 2));
    assert_eq!(
        fault(&mut d, 1, Some(1024 + 7), 0x1000, READ),
        Some(id::F_CD_FETCH)
    );
    assert_eq!(one_event(&mut d).fetch_addr(), OUTSIDE_RAM + 7 * 64);
}

/// Writes `cd` as the single CD of a fresh stage-1 stream `sid` and expects C_BAD_CD.
#[track_caller]
fn expect_bad_cd(d: &mut Drv, sid: u32, cd: &Entry, what: &str) {
    let table = d.new_cd_table(CdFmt::Linear, 0, 0).unwrap();
    write_qwords(&d.mem, table.base, cd).unwrap();
    install_ste(d, sid, &make_cdtable_ste(&table.ste_ptr(), 0, false, false));
    let r = tr(d, sid, None, 0x1000, READ);
    assert_eq!(
        r.err().and_then(|e| e.event).map(|e| e.0),
        Some(id::C_BAD_CD),
        "{what}"
    );
    assert_config_event(one_event(d), id::C_BAD_CD, sid, None);
}

/// Writes `cd` as above and expects the CD to be accepted: the transaction either translates
/// or faults later than the CD (never C_BAD_CD).
#[track_caller]
fn expect_legal_cd(
    d: &mut Drv,
    sid: u32,
    cd: &Entry,
    iova: u64,
    what: &str,
) -> Result<Translation, TranslationFault> {
    let table = d.new_cd_table(CdFmt::Linear, 0, 0).unwrap();
    write_qwords(&d.mem, table.base, cd).unwrap();
    install_ste(d, sid, &make_cdtable_ste(&table.ste_ptr(), 0, false, false));
    let r = tr(d, sid, None, iova, READ);
    let ev = r.err().and_then(|e| e.event).map(|e| e.0);
    assert_ne!(ev, Some(id::C_BAD_CD), "{what}");
    events(d);
    r
}

/// C_BAD_CD (5.4.2, digest 3.2): V = 0, AA64 = 0, TxSZ out of 16..=39, TG reserved (both
/// encodings), TTB0 beyond the effective IPS, HA/HD without HTTU, S with STALL_MODEL = 0b01,
/// A = 0 with TERM_MODEL = 1, big-endian tables on a little-endian SMMU.
#[test]
fn c_bad_cd() {
    let mut d = boot(features());
    let pt = s1_pgtable(&mut d, Granule::G4K);
    d.map(&pt, 0x1000, 0x2000, 0x1000, prot::RW).unwrap();
    let good = make_s1_cd(&pt.s1_tcr(), 1, false);
    let with = |set: u64, clear: u64| -> Entry {
        let mut cd = good;
        cd[0] = (cd[0] & !clear) | set;
        cd
    };
    let field = |mask: u64, v: u64| with(viommu_tests::guest::bits::prep(mask, v), mask);
    let cases: Vec<(Entry, &str)> = vec![
        (with(0, CTXDESC_CD_0_V), "V = 0"),
        (with(0, CTXDESC_CD_0_AA64), "AA64 = 0"),
        (field(CTXDESC_CD_0_TCR_T0SZ, 15), "T0SZ 15"),
        (field(CTXDESC_CD_0_TCR_T0SZ, 40), "T0SZ 40"),
        (field(CTXDESC_CD_0_TCR_T0SZ, 0), "T0SZ 0"),
        (field(CTXDESC_CD_0_TCR_TG0, 3), "TG0 = 0b11"),
        (with(CTXDESC_CD_0_TCR_HA, 0), "HA"),
        (with(CTXDESC_CD_0_TCR_HD, 0), "HD"),
        (with(CTXDESC_CD_0_S, 0), "S"),
        (with(0, CTXDESC_CD_0_A), "A = 0"),
        (with(CTXDESC_CD_0_ENDI, 0), "ENDI"),
        // TTB1 enabled with TG1 = 0b00 (Reserved) or T1SZ out of range.
        (with(prep_t1(16, 0), CTXDESC_CD_0_TCR_EPD1), "TG1 = 0b00"),
        (with(prep_t1(12, 2), CTXDESC_CD_0_TCR_EPD1), "T1SZ 12"),
    ];
    for (i, (cd, what)) in cases.iter().enumerate() {
        expect_bad_cd(&mut d, 10 + i as u32, cd, what);
    }
    // TTB0 beyond the effective IPS (IPS = 40 bits).
    let mut cd = field(CTXDESC_CD_0_TCR_IPS, 2);
    cd[1] = 1 << 40;
    expect_bad_cd(&mut d, 40, &cd, "TTB0 = 2^40 with IPS 40");
    // IPS is never ILLEGAL: 0b111 behaves as the 44-bit OAS, so TTB0 = 2^43 is legal and its
    // walk aborts outside RAM.
    let mut cd = field(CTXDESC_CD_0_TCR_IPS, 7);
    cd[1] = 1 << 43;
    let r = expect_legal_cd(&mut d, 41, &cd, 0x1000, "IPS 0b111");
    assert_eq!(r.unwrap_err().event.map(|e| e.0), Some(id::F_WALK_EABT));
    // EPD0 = 1: the TTB0 fields are not checked, and the lower half faults.
    let cd = with(
        CTXDESC_CD_0_TCR_EPD0 | CTXDESC_CD_0_TCR_TG0,
        CTXDESC_CD_0_TCR_T0SZ,
    );
    let r = expect_legal_cd(&mut d, 42, &cd, 0x1000, "EPD0 with garbage TTB0 fields");
    assert_eq!(r.unwrap_err().event.map(|e| e.0), Some(id::F_TRANSLATION));
    // TBI, AFFD, WXN, UWXN, PAN, ASET, R and a reserved MAIR are never ILLEGAL.
    let mut cd = with(genmask(40, 35) | CTXDESC_CD_0_ASET, CTXDESC_CD_0_R);
    cd[3] = 0xf0f0_f0f0_f0f0_f0f0;
    let t = expect_legal_cd(&mut d, 43, &cd, 0x1000, "never-ILLEGAL fields").unwrap();
    assert_eq!(t.output(0x1000), 0x2000);
}

/// T1SZ and TG1 for a TTB1 with EPD1 = 0.
fn prep_t1(t1sz: u64, tg1: u64) -> u64 {
    viommu_tests::guest::bits::prep(CTXDESC_CD_0_TCR_T1SZ, t1sz)
        | viommu_tests::guest::bits::prep(CTXDESC_CD_0_TCR_TG1, tg1)
}

/// F_WALK_EABT (7.3.12): a stage-1 descriptor read outside memory is S2 = 0, CLASS = TT,
/// with FetchAddr = the descriptor's PA and the input transaction's attributes.
#[test]
fn f_walk_eabt_stage1() {
    let mut d = boot(features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    let mut cd = dom.cd;
    cd[1] = OUTSIDE_RAM;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    let iova = 0x1234_5678_9000u64;
    assert_eq!(fault(&mut d, 1, None, iova, READ), Some(id::F_WALK_EABT));
    let ev = one_event(&mut d);
    assert_eq!(ev.0[0], dw0(id::F_WALK_EABT, 1, None));
    assert_eq!(ev.0[1], dw1(READ, false, class::TT));
    assert_eq!(ev.input_addr(), iova);
    assert_eq!(ev.fetch_addr(), OUTSIDE_RAM + ((iova >> 39) & 0x1ff) * 8);
    // A level-1 table outside RAM, reached from a valid level-0 descriptor; a privileged write.
    d.write_cd(&mut dom.table, &[1], 0, &dom.cd).unwrap();
    let l0 = dom.pt.pte_addr(&d.mem, iova, 0).unwrap().unwrap();
    write_u64(&d.mem, l0, OUTSIDE_RAM | 3).unwrap();
    assert_eq!(
        fault(&mut d, 1, None, iova, PRIV_WRITE),
        Some(id::F_WALK_EABT)
    );
    let ev = one_event(&mut d);
    assert_eq!(ev.0[1], dw1(PRIV_WRITE, false, class::TT));
    assert_eq!(ev.fetch_addr(), OUTSIDE_RAM + ((iova >> 30) & 0x1ff) * 8);
}

/// F_WALK_EABT in stage 2: S2 = 1, CLASS = what stage 2 was translating.
#[test]
fn f_walk_eabt_stage2() {
    let mut d = boot(s2_features());
    let good = s2_ste(&mut d, 2);
    install_ste(
        &mut d,
        2,
        &[good[0], good[1], good[2], OUTSIDE_RAM, 0, 0, 0, 0],
    );
    let ipa = 0x12_3456_7000u64;
    assert_eq!(fault(&mut d, 2, None, ipa, WRITE), Some(id::F_WALK_EABT));
    let ev = one_event(&mut d);
    assert_eq!(ev.0[0], dw0(id::F_WALK_EABT, 2, None));
    assert_eq!(ev.0[1], dw1(WRITE, true, class::IN));
    assert_eq!(ev.input_addr(), ipa);
    // Start level 1 with 40 bits: 2 concatenated tables indexed by IPA[39:30].
    assert_eq!(ev.fetch_addr(), OUTSIDE_RAM + ((ipa >> 30) & 0x3ff) * 8);
}

/// F_TRANSLATION, stage 1 (7.3.13): S2 = 0, CLASS = IN, the access's RnW/PnU/InD, InputAddr;
/// with a SubstreamID; for an input beyond T0SZ and in a half disabled by EPD1.
#[test]
fn f_translation_stage1() {
    let mut d = boot(features());
    let dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    for (a, iova) in [
        (READ, 0x5000u64),
        (PRIV_WRITE, 0x6000),
        (EXEC, 0x7123),
        (access(true, false, true, true), 0x8000),
    ] {
        assert_eq!(fault(&mut d, 1, None, iova, a), Some(id::F_TRANSLATION));
        assert_s1_fault(one_event(&mut d), id::F_TRANSLATION, 1, None, a, iova);
    }
    // EPD1: the upper half.
    assert_eq!(
        fault(&mut d, 1, None, u64::MAX - 0xfff, READ),
        Some(id::F_TRANSLATION)
    );
    assert_s1_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        1,
        None,
        READ,
        u64::MAX - 0xfff,
    );
    // T0SZ = 25 (39-bit VAs): 2^39 is out of range.
    let mut table = d.new_cd_table(CdFmt::Linear, 3, 0).unwrap();
    let mut tcr = dom.pt.s1_tcr();
    tcr.tsz = 25;
    let pt39 = d.new_pgtable(Stage::S1, Granule::G4K, 39, 44, 0).unwrap();
    tcr.ttbr = pt39.ttbr();
    d.write_cd(&mut table, &[2], 5, &make_s1_cd(&tcr, 2, false))
        .unwrap();
    d.write_ste(2, &make_cdtable_ste(&table.ste_ptr(), 0, false, false))
        .unwrap();
    d.map(&pt39, (1 << 39) - 0x1000, 0x3000, 0x1000, prot::RW)
        .unwrap();
    assert_eq!(out(&mut d, 2, Some(5), (1 << 39) - 0x1000, READ), 0x3000);
    assert_eq!(
        fault(&mut d, 2, Some(5), 1 << 39, READ),
        Some(id::F_TRANSLATION)
    );
    assert_s1_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        2,
        Some(5),
        READ,
        1 << 39,
    );
}

/// Probes (no access requested) report what the mapping allows and never record.
#[test]
fn probes_record_nothing() {
    let mut d = boot(features());
    attach_s1(&mut d, 1, Granule::G4K, 1);
    assert_eq!(fault(&mut d, 1, None, 0x5000, PROBE), None);
    assert_eq!(fault(&mut d, 0x1_0000, None, 0x5000, PROBE), None);
    assert!(events(&mut d).is_empty());
}

/// F_TRANSLATION, stage 2 only: S2 = 1, CLASS = IN, IPA = the input.
#[test]
fn f_translation_stage2() {
    let mut d = boot(s2_features());
    s2_ste(&mut d, 2);
    assert_eq!(
        fault(&mut d, 2, None, 0x7654_3210, WRITE),
        Some(id::F_TRANSLATION)
    );
    assert_s2_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        2,
        WRITE,
        class::IN,
        0x7654_3210,
        0x7654_3210,
    );
    // Beyond the 40-bit S2T0SZ range but within the IAS.
    assert_eq!(
        fault(&mut d, 2, None, 0x123_4567_8000, READ),
        Some(id::F_TRANSLATION)
    );
    assert_s2_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        2,
        READ,
        class::IN,
        0x123_4567_8000,
        0x123_4567_8000,
    );
}

/// Nested stage-2 faults, each CLASS: the CD's IPA (CLASS = CD), a stage-1 descriptor's IPA
/// (CLASS = TT), the stage-1 output (CLASS = IN).
#[test]
fn f_translation_nested_classes() {
    let mut d = boot(s2_features());
    let s2 = nested_s2(&mut d, 7);
    let va = 0x1000_0000u64;
    let n = attach_nested(&mut d, 0x11, s2, 7, va, 0x3000);
    assert_eq!(out(&mut d, 0x11, None, va + 4, READ), NEST_DATA_PA + 0x3004);
    // CLASS = IN: a VA whose stage-1 output IPA stage 2 does not map.
    d.map(&n.pt, va + 0x1000, 0x41_0000_0000, 0x1000, prot::RW)
        .unwrap();
    assert_eq!(
        fault(&mut d, 0x11, None, va + 0x1010, READ),
        Some(id::F_TRANSLATION)
    );
    assert_s2_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        0x11,
        READ,
        class::IN,
        va + 0x1010,
        0x41_0000_0010,
    );
    // CLASS = TT: stage 2 stops mapping the block holding the stage-1 tables.
    let pgd_ipa = n.pt.ttbr();
    n.s2.pt.unmap(&d.mem, pgd_ipa).unwrap();
    d.issue_cmd_with_sync(CmdEnt::TlbiS12Vmall { vmid: 7 })
        .unwrap();
    let va2 = 0x2000_0000u64;
    assert_eq!(
        fault(&mut d, 0x11, None, va2, PRIV_READ),
        Some(id::F_TRANSLATION)
    );
    let l0_index = (va2 >> 39) & 0x1ff;
    assert_s2_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        0x11,
        PRIV_READ,
        class::TT,
        va2,
        pgd_ipa + l0_index * 8,
    );
    // CLASS = CD: and the block holding the CD table.
    let cd_ipa = n.table.ste_ptr().ptr;
    n.s2.pt.unmap(&d.mem, cd_ipa).unwrap();
    d.issue_cmds_with_sync(&[
        CmdEnt::TlbiS12Vmall { vmid: 7 },
        CmdEnt::CfgiSte {
            sid: 0x11,
            leaf: true,
        },
    ])
    .unwrap();
    assert_eq!(
        fault(&mut d, 0x11, None, va, WRITE),
        Some(id::F_TRANSLATION)
    );
    assert_s2_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        0x11,
        WRITE,
        class::CD,
        va,
        cd_ipa,
    );
}

/// A nested STE whose S1ContextPtr IPA is within the IAS (44 bits) but beyond stage 2's
/// 40-bit input range is not "out of range" (3.4.3): the CD fetch goes to stage 2, which
/// reports a Translation fault with CLASS = CD and the IPA (digest 1.2 rule 5).
#[test]
fn nested_cd_ptr_beyond_s2_range_is_stage2_fault() {
    let mut d = boot(s2_features());
    let s2 = nested_s2(&mut d, 8);
    let _n = attach_nested(&mut d, 0x12, s2, 8, 0x1000_0000, 0);
    let mut ste = d.read_ste(0x12).unwrap();
    let ptr = 0x200_0000_0000u64; // 2^41: < 2^44 (IAS), >= 2^40 (S2 input size)
    ste[0] = (ste[0] & !STRTAB_STE_0_S1CTXPTR_MASK) | ptr;
    install_ste(&mut d, 0x12, &ste);
    assert_eq!(
        fault(&mut d, 0x12, None, 0x1000_0000, READ),
        Some(id::F_TRANSLATION)
    );
    assert_s2_fault(
        one_event(&mut d),
        id::F_TRANSLATION,
        0x12,
        READ,
        class::CD,
        0x1000_0000,
        ptr,
    );
}

/// F_ADDR_SIZE (7.3.14): a stage-1 output or table address above the effective IPS (S2 = 0,
/// CLASS = IN); bypass with an input above the OAS; a stage-2 output above S2PS (S2 = 1).
#[test]
fn f_addr_size() {
    let mut d = boot(s2_features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    d.map(&dom.pt, 0x1000, 0x1_0000_0000, 0x1000, prot::RW)
        .unwrap();
    d.map(&dom.pt, 0x2000, 0xffff_f000, 0x1000, prot::RW)
        .unwrap();
    let mut cd = dom.cd;
    cd[0] &= !CTXDESC_CD_0_TCR_IPS; // IPS = 32 bits
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(out(&mut d, 1, None, 0x2000, READ), 0xffff_f000);
    assert_eq!(fault(&mut d, 1, None, 0x1000, WRITE), Some(id::F_ADDR_SIZE));
    assert_s1_fault(one_event(&mut d), id::F_ADDR_SIZE, 1, None, WRITE, 0x1000);
    // A table descriptor above 2^32.
    let l2 = dom.pt.pte_addr(&d.mem, 0x2000, 2).unwrap().unwrap();
    write_u64(&d.mem, l2, 0x2_0000_0000 | 3).unwrap();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 1 })
        .unwrap();
    assert_eq!(fault(&mut d, 1, None, 0x2000, READ), Some(id::F_ADDR_SIZE));
    assert_s1_fault(one_event(&mut d), id::F_ADDR_SIZE, 1, None, READ, 0x2000);
    // Bypass beyond the OAS.
    d.write_ste(2, &make_bypass_ste(false)).unwrap();
    assert_eq!(fault(&mut d, 2, None, 1 << 44, READ), Some(id::F_ADDR_SIZE));
    assert_s1_fault(one_event(&mut d), id::F_ADDR_SIZE, 2, None, READ, 1 << 44);
    // Stage-2 output above S2PS = 32 bits.
    let mut s2 = s2_domain(&mut d, Granule::G4K, 3, 32);
    s2.dom.vtcr.ps = 0;
    d.map(&s2.pt, 0x4000, 0x2_0000_0000, 0x1000, prot::RW)
        .unwrap();
    d.write_ste(3, &make_s2_domain_ste(&s2.dom, false, false))
        .unwrap();
    assert_eq!(fault(&mut d, 3, None, 0x4000, READ), Some(id::F_ADDR_SIZE));
    assert_s2_fault(
        one_event(&mut d),
        id::F_ADDR_SIZE,
        3,
        READ,
        class::IN,
        0x4000,
        0x4000,
    );
}

/// Stage 1 bypassed by S1DSS = BYPASS: an input beyond the IAS is an F_ADDR_SIZE, always
/// recorded (3.4, 3.12).
#[test]
fn f_addr_size_s1dss_bypass() {
    let mut d = boot(features());
    let table = d.new_cd_table(CdFmt::Linear, 2, 0).unwrap();
    d.write_ste(4, &make_cdtable_ste(&table.ste_ptr(), 1, false, false))
        .unwrap();
    assert_eq!(out(&mut d, 4, None, (1 << 44) - 1, READ), (1 << 44) - 1);
    assert_eq!(fault(&mut d, 4, None, 1 << 44, READ), Some(id::F_ADDR_SIZE));
    assert_s1_fault(one_event(&mut d), id::F_ADDR_SIZE, 4, None, READ, 1 << 44);
}

/// A stage-2-only stream bypasses stage 1, so an input beyond the IAS (44 bits) is a stage-1
/// F_ADDR_SIZE (S2 = 0, CLASS = IN), always recorded, not a stage-2 fault (3.4, digest 6.3).
#[test]
fn f_addr_size_stage2_only_input_beyond_ias() {
    let mut d = boot(s2_features());
    s2_ste(&mut d, 2);
    assert_eq!(fault(&mut d, 2, None, 1 << 44, READ), Some(id::F_ADDR_SIZE));
    assert_s1_fault(one_event(&mut d), id::F_ADDR_SIZE, 2, None, READ, 1 << 44);
}

/// F_ACCESS (7.3.15): AF = 0 in a leaf, unless CD.AFFD / STE.S2AFFD.
#[test]
fn f_access() {
    let mut d = boot(s2_features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    let pte = dom.pt.prot_to_pte(prot::RW) & !(1 << 10);
    dom.pt
        .map_raw(&d.mem, &mut d.alloc, 0x5000, 3, pte | 0x9000 | 3)
        .unwrap();
    assert_eq!(fault(&mut d, 1, None, 0x5000, READ), Some(id::F_ACCESS));
    assert_s1_fault(one_event(&mut d), id::F_ACCESS, 1, None, READ, 0x5000);
    let mut cd = dom.cd;
    cd[0] |= CTXDESC_CD_0_AFFD;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(out(&mut d, 1, None, 0x5000, READ), 0x9000);
    // Stage 2.
    let s2 = attach_s2(&mut d, 2, Granule::G4K, 2, 40);
    let pte = s2.pt.prot_to_pte(prot::RW) & !(1 << 10);
    s2.pt
        .map_raw(&d.mem, &mut d.alloc, 0x6000, 3, pte | 0xa000 | 3)
        .unwrap();
    assert_eq!(fault(&mut d, 2, None, 0x6000, WRITE), Some(id::F_ACCESS));
    assert_s2_fault(
        one_event(&mut d),
        id::F_ACCESS,
        2,
        WRITE,
        class::IN,
        0x6000,
        0x6000,
    );
    let mut ste = d.read_ste(2).unwrap();
    ste[2] |= STRTAB_STE_2_S2AFFD;
    install_ste(&mut d, 2, &ste);
    assert_eq!(out(&mut d, 2, None, 0x6000, WRITE), 0xa000);
}

/// F_PERMISSION (7.3.16): stage 1 (S2 = 0, CLASS = IN); stage 2 only (S2 = 1, IPA = input);
/// nested stage 2 on the output (IPA = stage-1 output); a nested stage-1 permission fault wins
/// over a stage-2 fault on its output.
#[test]
fn f_permission() {
    let mut d = boot(s2_features());
    let dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    d.map(&dom.pt, 0x5000, 0x9000, 0x1000, prot::READ | prot::CACHE)
        .unwrap();
    assert_eq!(
        fault(&mut d, 1, None, 0x5008, PRIV_WRITE),
        Some(id::F_PERMISSION)
    );
    assert_s1_fault(
        one_event(&mut d),
        id::F_PERMISSION,
        1,
        None,
        PRIV_WRITE,
        0x5008,
    );
    let s2 = attach_s2(&mut d, 2, Granule::G4K, 2, 40);
    d.map(&s2.pt, 0x6000, 0xa000, 0x1000, prot::READ | prot::CACHE)
        .unwrap();
    assert_eq!(
        fault(&mut d, 2, None, 0x6010, WRITE),
        Some(id::F_PERMISSION)
    );
    assert_s2_fault(
        one_event(&mut d),
        id::F_PERMISSION,
        2,
        WRITE,
        class::IN,
        0x6010,
        0x6010,
    );
    // Nested: stage 2 maps the data window read-only.
    let s2n = nested_s2(&mut d, 9);
    let ro = NEST_DATA_IPA + 2 * MB;
    d.map(
        &s2n.pt,
        ro,
        NEST_DATA_PA + 2 * MB,
        0x1000,
        prot::READ | prot::CACHE,
    )
    .unwrap();
    let n = attach_nested(&mut d, 3, s2n, 9, 0x7000_0000, 0);
    d.map(&n.pt, 0x7000_1000, ro, 0x1000, prot::RW).unwrap();
    d.map(
        &n.pt,
        0x7000_2000,
        0x41_0000_0000,
        0x1000,
        prot::READ | prot::CACHE,
    )
    .unwrap();
    assert_eq!(
        out(&mut d, 3, None, 0x7000_1000, READ),
        NEST_DATA_PA + 2 * MB
    );
    assert_eq!(
        fault(&mut d, 3, None, 0x7000_1020, WRITE),
        Some(id::F_PERMISSION)
    );
    assert_s2_fault(
        one_event(&mut d),
        id::F_PERMISSION,
        3,
        WRITE,
        class::IN,
        0x7000_1020,
        ro + 0x20,
    );
    // Stage 1 refuses the write before stage 2 sees the (unmapped) output.
    assert_eq!(
        fault(&mut d, 3, None, 0x7000_2000, WRITE),
        Some(id::F_PERMISSION)
    );
    assert_s1_fault(
        one_event(&mut d),
        id::F_PERMISSION,
        3,
        None,
        WRITE,
        0x7000_2000,
    );
}

/// Stage 2 refusing a stage-1 descriptor read: F_PERMISSION with S2 = 1, CLASS = TT, the
/// descriptor's IPA, and TTRnW = 1 (the walk read the descriptor) (7.3.16, digest 6.4).
#[test]
fn f_permission_nested_table_read_ttrnw() {
    let mut d = boot(s2_features());
    let s2 = nested_s2(&mut d, 10);
    let n = attach_nested(&mut d, 4, s2, 10, 0x1000_0000, 0);
    // The block holding the stage-1 tables becomes write-only in stage 2.
    let pgd_ipa = n.pt.ttbr();
    let block = pgd_ipa & !(2 * MB - 1);
    n.s2.pt.unmap(&d.mem, block).unwrap();
    d.map(
        &n.s2.pt,
        block,
        block - NEST_OFFSET,
        2 * MB,
        prot::WRITE | prot::CACHE,
    )
    .unwrap();
    d.issue_cmd_with_sync(CmdEnt::TlbiS12Vmall { vmid: 10 })
        .unwrap();
    let va = 0x1000_0000u64;
    assert_eq!(fault(&mut d, 4, None, va, READ), Some(id::F_PERMISSION));
    let ev = one_event(&mut d);
    assert_eq!(ev.0[0], dw0(id::F_PERMISSION, 4, None));
    assert_eq!(ev.ipa(), pgd_ipa + ((va >> 39) & 0x1ff) * 8);
    assert_eq!(
        ev.0[1],
        dw1(READ, true, class::TT) | (1 << 44),
        "TTRnW = 1: {ev:x?}"
    );
}

/// The event-queue interrupt fires on empty → non-empty only (3.18.2), and only with
/// IRQ_CTRL.EVENTQ_IRQEN.
#[test]
fn evtq_irq_on_empty_to_non_empty() {
    let mut d = boot(features());
    let irqs = |fx: &[Effect]| {
        fx.iter()
            .filter(|e| **e == Effect::Irq(IrqLine::Evtq))
            .count()
    };
    fault(&mut d, 0x1_0000, None, 0, READ);
    assert_eq!(irqs(&effects(&mut d)), 1);
    fault(&mut d, 0x1_0001, None, 0, READ);
    fault(&mut d, 0x1_0002, None, 0, READ);
    assert_eq!(irqs(&effects(&mut d)), 0, "queue not empty");
    assert_eq!(events(&mut d).len(), 3);
    fault(&mut d, 0x1_0003, None, 0, READ);
    assert_eq!(
        irqs(&effects(&mut d)),
        1,
        "empty again after the driver consumed"
    );
    // Without EVENTQ_IRQEN nothing is signalled.
    let cfg = DriverConfig {
        irqs: false,
        ..DriverConfig::default()
    };
    let mut d = boot_with(features(), cfg);
    fault(&mut d, 0x1_0000, None, 0, READ);
    assert_eq!(irqs(&effects(&mut d)), 0);
    assert_eq!(events(&mut d).len(), 1);
}

/// With IDR0.MSI and EVENTQ_IRQ_CFG0 set, the event interrupt is an MSI: written into guest
/// RAM when the address is RAM, handed to the host (`Effect::MsiWrite`) otherwise.
#[test]
fn evtq_irq_as_msi() {
    let f = Capabilities {
        msi: true,
        ..features()
    };
    let mut d = boot(f);
    let doorbell = d.alloc_zeroed(64, 64).unwrap();
    d.write_reg_sync(0, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .unwrap();
    d.write64(ARM_SMMU_EVTQ_IRQ_CFG0, doorbell);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG1, 0xcafe_0001);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG2, 0x3f);
    d.write_reg_sync(IRQ_CTRL_EVTQ_IRQEN, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .unwrap();
    d.port.take_effects();
    fault(&mut d, 0x1_0000, None, 0, READ);
    assert_eq!(read_u32(&d.mem, doorbell).unwrap(), 0xcafe_0001);
    events(&mut d);
    d.write_reg_sync(0, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .unwrap();
    d.write64(ARM_SMMU_EVTQ_IRQ_CFG0, 0x800_0000_0040);
    d.write_reg_sync(IRQ_CTRL_EVTQ_IRQEN, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .unwrap();
    d.port.take_effects();
    fault(&mut d, 0x1_0000, None, 0, READ);
    assert_eq!(
        effects(&mut d),
        [Effect::MsiWrite {
            address: 0x800_0000_0040,
            data: 0xcafe_0001
        }]
    );
}

/// Overflow (7.4): a full queue toggles EVENTQ_PROD.OVFLG once and drops records until the
/// driver acknowledges by copying OVFLG into CONS.OVACKFLG; no GERROR. Linux's event thread
/// reports the overflow and acknowledges it.
#[test]
fn evtq_overflow_toggles_once_until_acknowledged() {
    let cfg = DriverConfig {
        evtq_shift: 2,
        ..DriverConfig::default()
    };
    let mut d = boot_with(features(), cfg);
    for i in 0..6 {
        fault(&mut d, 0x1_0000 + i, None, 0, READ);
    }
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), Q_OVERFLOW_FLAG | 0b100);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_CONS), 0);
    assert_eq!(gerror_active(&mut d), 0);
    assert_eq!(d.port.smmu().counters().events_lost, 2);
    let batch = d.evtq_thread().unwrap();
    assert!(batch.overflow);
    assert_eq!(
        batch.events.iter().map(Event::sid).collect::<Vec<_>>(),
        [0x1_0000, 0x1_0001, 0x1_0002, 0x1_0003]
    );
    assert_eq!(
        d.read32(ARM_SMMU_EVTQ_CONS),
        Q_OVERFLOW_FLAG | 0b100,
        "OVACKFLG = OVFLG"
    );
    // Delivery continues; no new overflow.
    fault(&mut d, 0x1_0010, None, 0, READ);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), Q_OVERFLOW_FLAG | 0b101);
    let batch = d.evtq_thread().unwrap();
    assert!(!batch.overflow);
    assert_eq!(batch.events.len(), 1);
    // Fill again: the second overflow toggles OVFLG back to 0.
    for i in 0..5 {
        fault(&mut d, 0x1_0020 + i, None, 0, READ);
    }
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), 0b001);
    let batch = d.evtq_thread().unwrap();
    assert!(batch.overflow);
    assert_eq!(batch.events.len(), 4);
    assert_eq!(gerror_active(&mut d), 0);
}

/// Records are discarded while EVENTQEN = 0, without an overflow (7.4).
#[test]
fn events_discarded_while_evtq_disabled() {
    let mut d = boot(features());
    d.write_reg_sync(CR0_SMMUEN | CR0_CMDQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    for i in 0..300 {
        fault(&mut d, 0x1_0000 + i, None, 0, READ);
    }
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), 0);
    assert_eq!(gerror_active(&mut d), 0);
}

/// EVENTQ_ABT_ERR (7.2.2): a record write outside memory toggles GERROR.EVENTQ_ABT_ERR once,
/// signals the GERROR interrupt, does not advance PROD, and the queue stays unwritable until
/// the error is acknowledged.
#[test]
fn eventq_abort_error() {
    let mut d = boot(features());
    d.write_reg_sync(CR0_SMMUEN | CR0_CMDQEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.write64(ARM_SMMU_EVTQ_BASE, Q_BASE_RWA | OUTSIDE_RAM | 7);
    d.write_reg_sync(
        CR0_SMMUEN | CR0_CMDQEN | CR0_EVTQEN,
        ARM_SMMU_CR0,
        ARM_SMMU_CR0ACK,
    )
    .unwrap();
    d.port.take_effects();
    fault(&mut d, 0x1_0000, None, 0, READ);
    assert_eq!(d.read32(ARM_SMMU_GERROR), GERROR_EVTQ_ABT_ERR);
    assert_eq!(d.read32(ARM_SMMU_EVTQ_PROD), 0);
    assert_eq!(effects(&mut d), [Effect::Irq(IrqLine::Gerror)]);
    fault(&mut d, 0x1_0001, None, 0, READ);
    assert_eq!(
        d.read32(ARM_SMMU_GERROR),
        GERROR_EVTQ_ABT_ERR,
        "not toggled again while active"
    );
    assert!(effects(&mut d).is_empty());
    assert_eq!(d.handle_gerror().unwrap(), GERROR_EVTQ_ABT_ERR);
    assert_eq!(gerror_active(&mut d), 0);
    fault(&mut d, 0x1_0002, None, 0, READ);
    assert_eq!(d.read32(ARM_SMMU_GERROR), 0, "toggled back: active again");
    assert_eq!(gerror_active(&mut d), GERROR_EVTQ_ABT_ERR);
}

/// Event priority (7.3.22): C_BAD_STE before C_BAD_SUBSTREAMID, C_BAD_SUBSTREAMID before
/// F_ADDR_SIZE and F_CD_FETCH, F_STREAM_DISABLED before F_CD_FETCH; one record each.
#[test]
fn event_priority() {
    let mut d = boot(features());
    d.write_ste(1, &make_bypass_ste(false)).unwrap();
    assert_eq!(
        fault(&mut d, 1, Some(2), 1 << 44, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    let outside = |cdmax: u8| {
        make_cdtable_ste(
            &CdTablePtr {
                ptr: OUTSIDE_RAM,
                s1fmt: 0,
                s1cdmax: cdmax,
            },
            STRTAB_STE_1_S1DSS_TERMINATE,
            false,
            false,
        )
    };
    install_ste(&mut d, 2, &outside(0));
    assert_eq!(
        fault(&mut d, 2, Some(1), 0, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    install_ste(&mut d, 3, &outside(4));
    assert_eq!(fault(&mut d, 3, None, 0, READ), Some(id::F_STREAM_DISABLED));
    assert_eq!(
        fault(&mut d, 3, Some(16), 0, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    install_ste(&mut d, 4, &outside(17));
    assert_eq!(fault(&mut d, 4, Some(1), 0, READ), Some(id::C_BAD_STE));
    assert_eq!(events(&mut d).len(), 5);
}

/// R/S apply only to translation-related faults (5.5, digest 6.3): with CD.R = 0 a stage-1
/// F_WALK_EABT is still recorded; with STE.S2R = 0 stage-2 faults (including a CD fetch's,
/// CLASS = CD) terminate silently while stage 1 still records.
#[test]
fn record_bits_only_for_translation_faults() {
    let mut d = boot(s2_features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    let mut cd = dom.cd;
    cd[0] &= !CTXDESC_CD_0_R;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(
        fault(&mut d, 1, None, 0x1000, READ),
        None,
        "F_TRANSLATION, R = 0"
    );
    cd[1] = OUTSIDE_RAM;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(fault(&mut d, 1, None, 0x1000, READ), Some(id::F_WALK_EABT));
    assert_eq!(one_event(&mut d).id(), id::F_WALK_EABT);
    // Nested with S2R = 0.
    let s2 = nested_s2(&mut d, 5);
    let n = attach_nested(&mut d, 2, s2, 5, 0x1000_0000, 0);
    let mut ste = d.read_ste(2).unwrap();
    ste[2] &= !STRTAB_STE_2_S2R;
    install_ste(&mut d, 2, &ste);
    // Stage 1 unmapped: recorded (CD.R = 1).
    assert_eq!(
        fault(&mut d, 2, None, 0x2000_0000, READ),
        Some(id::F_TRANSLATION)
    );
    assert!(!one_event(&mut d).s2());
    // Stage 1 maps onto an IPA stage 2 does not: silent.
    d.map(&n.pt, 0x3000_0000, 0x41_0000_0000, 0x1000, prot::RW)
        .unwrap();
    assert_eq!(fault(&mut d, 2, None, 0x3000_0000, READ), None);
    // The CD's IPA unmapped in stage 2: silent too.
    n.s2.pt.unmap(&d.mem, n.table.ste_ptr().ptr).unwrap();
    d.issue_cmds_with_sync(&[
        CmdEnt::TlbiS12Vmall { vmid: 5 },
        CmdEnt::CfgiSte { sid: 2, leaf: true },
    ])
    .unwrap();
    assert_eq!(fault(&mut d, 2, None, 0x1000_0000, READ), None);
    assert!(events(&mut d).is_empty());
}

/// CD.ENDI is checked only when a translation table is enabled (digest 3.2).
#[test]
fn cd_endi_ignored_with_both_halves_disabled() {
    let mut d = boot(features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    let mut cd = dom.cd;
    cd[0] |= CTXDESC_CD_0_ENDI | CTXDESC_CD_0_TCR_EPD0 | CTXDESC_CD_0_TCR_EPD1;
    write_qwords(&d.mem, dom.table.base, &cd).unwrap();
    d.issue_cmd_with_sync(CmdEnt::CfgiCdAll { sid: 1 }).unwrap();
    assert_eq!(
        fault(&mut d, 1, None, 0x1000, READ),
        Some(id::F_TRANSLATION)
    );
    cd[0] &= !CTXDESC_CD_0_TCR_EPD0;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(fault(&mut d, 1, None, 0x1000, READ), Some(id::C_BAD_CD));
}
