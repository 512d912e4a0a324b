//! Invalidation: every TLBI and CFGI scope (IHI 0070 4.3, 4.4; digest 4.2). Each test first
//! shows that a translation is cached (the page table changes without invalidation and the old
//! output is still served), then invalidates and sees the new output, and checks that entries
//! outside the scope are still served stale. The effects the model reports for the frontend
//! and the host are checked too.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use common::*;

/// The PA a test maps first, and the one it remaps to.
fn old_pa(sid: u32, iova: u64) -> u64 {
    0x100_0000 + (u64::from(sid) << 24) + iova
}

fn new_pa(sid: u32, iova: u64) -> u64 {
    0x800_0000_0000 | old_pa(sid, iova)
}

/// A stage-1 domain on `sid` mapping each of `iovas` (4K pages).
fn s1_with(d: &mut Drv, sid: u32, asid: u16, iovas: &[u64]) -> S1Domain {
    let dom = attach_s1(d, sid, Granule::G4K, asid);
    for &iova in iovas {
        d.map(&dom.pt, iova, old_pa(sid, iova), 0x1000, prot::RW)
            .unwrap();
    }
    dom
}

/// Translates each (sid, iova) once so that it is cached, then rewrites the PTEs to the new
/// PA without invalidating, and checks the old translations are still served.
fn prime_and_remap(d: &mut Drv, maps: &[(u32, &PageTable, u64)]) {
    for &(sid, _, iova) in maps {
        assert_eq!(out(d, sid, None, iova, READ), old_pa(sid, iova));
    }
    for &(sid, pt, iova) in maps {
        pt.remap(&d.mem, iova, new_pa(sid, iova)).unwrap();
    }
    for &(sid, _, iova) in maps {
        assert_eq!(
            out(d, sid, None, iova, READ),
            old_pa(sid, iova),
            "cached: sid {sid} {iova:#x}"
        );
    }
    d.port.take_effects();
}

#[track_caller]
fn assert_new(d: &mut Drv, sid: u32, iova: u64) {
    assert_eq!(
        out(d, sid, None, iova, READ),
        new_pa(sid, iova),
        "sid {sid} {iova:#x} invalidated"
    );
}

#[track_caller]
fn assert_stale(d: &mut Drv, sid: u32, iova: u64) {
    assert_eq!(
        out(d, sid, None, iova, READ),
        old_pa(sid, iova),
        "sid {sid} {iova:#x} kept"
    );
}

const A: u64 = 0x10_0000;
const B: u64 = 0x20_0000;

fn raw(cmd: CmdEnt) -> RawCommand {
    let c = cmd.build();
    RawCommand {
        d0: c.0[0],
        d1: c.0[1],
    }
}

fn flush_all() -> Effect {
    Effect::TranslationsInvalidated {
        start: 0,
        last: u64::MAX,
    }
}

/// TLBI_NH_ASID: the ASID's entries go; another ASID's survive.
#[test]
fn tlbi_nh_asid() {
    let mut d = boot(features());
    let a = s1_with(&mut d, 1, 1, &[A, B]);
    let b = s1_with(&mut d, 2, 2, &[A]);
    prime_and_remap(&mut d, &[(1, &a.pt, A), (1, &a.pt, B), (2, &b.pt, A)]);
    let cmd = CmdEnt::TlbiNhAsid { vmid: 0, asid: 1 };
    assert_eq!(cmd.build().0, [0x11 | (1 << 48), 0]);
    d.issue_cmd_with_sync(cmd).unwrap();
    assert_eq!(
        effects(&mut d),
        [flush_all(), Effect::HostInvalidate(raw(cmd))]
    );
    assert_new(&mut d, 1, A);
    assert_new(&mut d, 1, B);
    assert_stale(&mut d, 2, A);
}

/// TLBI_NH_VA without range: the entry holding the address goes (a whole 2 MiB block for an
/// address inside it); other addresses of the ASID survive.
#[test]
fn tlbi_nh_va_single_address() {
    let mut d = boot(features());
    let a = s1_with(&mut d, 1, 1, &[A, B]);
    let blk = 0x4000_0000u64;
    d.map(&a.pt, blk, old_pa(1, blk), 2 * MB, prot::RW).unwrap();
    prime_and_remap(&mut d, &[(1, &a.pt, A), (1, &a.pt, B), (1, &a.pt, blk)]);
    let cmd = CmdEnt::TlbiNhVa(Tlbi {
        asid: 1,
        addr: A,
        leaf: true,
        ..Tlbi::default()
    });
    d.issue_cmd_with_sync(cmd).unwrap();
    let fx = effects(&mut d);
    assert_eq!(fx.len(), 2, "{fx:?}");
    let Effect::TranslationsInvalidated { start, last } = fx[0] else {
        panic!("{fx:?}")
    };
    assert!(
        start <= A && (A..B).contains(&last),
        "{start:#x}..={last:#x}"
    );
    assert_eq!(fx[1], Effect::HostInvalidate(raw(cmd)));
    assert_new(&mut d, 1, A);
    assert_stale(&mut d, 1, B);
    assert_stale(&mut d, 1, blk);
    d.issue_cmd_with_sync(CmdEnt::TlbiNhVa(Tlbi {
        asid: 1,
        addr: blk + MB + 0x3000,
        leaf: true,
        ..Tlbi::default()
    }))
    .unwrap();
    assert_new(&mut d, 1, blk);
    assert_eq!(
        out(&mut d, 1, None, blk + 0x1f_f000, READ),
        new_pa(1, blk) + 0x1f_f000
    );
    assert_stale(&mut d, 1, B);
}

/// TLBI_NH_VA with range (IDR3.RIL, 4.4.1.1): Linux's `__arm_smmu_tlb_inv_range` for four 4K
/// pages is one command with NUM = 0, SCALE = 2, TG = 4K, TTL = 3; exactly those pages go.
#[test]
fn tlbi_nh_va_range_4k() {
    let mut d = boot(features());
    let pages: Vec<u64> = (0..6).map(|i| 0x30_0000 + i * 0x1000).collect();
    let a = s1_with(&mut d, 1, 1, &pages);
    let maps: Vec<(u32, &PageTable, u64)> = pages.iter().map(|&p| (1, &a.pt, p)).collect();
    prime_and_remap(&mut d, &maps);
    let tmpl = CmdEnt::TlbiNhVa(Tlbi {
        asid: 1,
        ..Tlbi::default()
    });
    let cmds = tlb_inv_range(tmpl, pages[1], 4 * 0x1000, 0x1000, true, 12, true);
    assert_eq!(cmds.len(), 1);
    let c = cmds[0].build();
    assert_eq!(
        c.0[0],
        0x12 | (2 << 20) | (1 << 48),
        "NUM 0, SCALE 2, ASID 1"
    );
    assert_eq!(
        c.0[1],
        pages[1] | (1 << 10) | (3 << 8) | 1,
        "TG 4K, TTL 3, leaf"
    );
    d.issue_cmds_with_sync(&cmds).unwrap();
    assert_eq!(
        effects(&mut d)[0],
        Effect::TranslationsInvalidated {
            start: pages[1],
            last: pages[5] - 1
        }
    );
    assert_stale(&mut d, 1, pages[0]);
    for &p in &pages[1..5] {
        assert_new(&mut d, 1, p);
    }
    assert_stale(&mut d, 1, pages[5]);
}

/// A range of three 16K pages: NUM = 2, SCALE = 0, TG = 16K.
#[test]
fn tlbi_nh_va_range_16k_num() {
    let mut d = boot(features());
    let dom = attach_s1(&mut d, 1, Granule::G16K, 1);
    let pages: Vec<u64> = (0..5).map(|i| 0x100_0000 + i * 0x4000).collect();
    for &p in &pages {
        d.map(&dom.pt, p, old_pa(1, p), 0x4000, prot::RW).unwrap();
    }
    let maps: Vec<(u32, &PageTable, u64)> = pages.iter().map(|&p| (1, &dom.pt, p)).collect();
    prime_and_remap(&mut d, &maps);
    let tmpl = CmdEnt::TlbiNhVa(Tlbi {
        asid: 1,
        ..Tlbi::default()
    });
    let cmds = tlb_inv_range(tmpl, pages[1], 3 * 0x4000, 0x4000, true, 14, true);
    assert_eq!(cmds.len(), 1);
    let CmdEnt::TlbiNhVa(t) = cmds[0] else {
        panic!()
    };
    assert_eq!((t.num, t.scale, t.tg, t.ttl), (2, 0, 2, 3));
    d.issue_cmds_with_sync(&cmds).unwrap();
    assert_stale(&mut d, 1, pages[0]);
    for &p in &pages[1..4] {
        assert_new(&mut d, 1, p);
    }
    assert_stale(&mut d, 1, pages[4]);
}

/// TLBI_NH_VAA: the address for every ASID; other addresses survive.
#[test]
fn tlbi_nh_vaa() {
    let mut d = boot(features());
    let a = s1_with(&mut d, 1, 1, &[A, B]);
    let b = s1_with(&mut d, 2, 2, &[A, B]);
    prime_and_remap(
        &mut d,
        &[(1, &a.pt, A), (1, &a.pt, B), (2, &b.pt, A), (2, &b.pt, B)],
    );
    let cmd = CmdEnt::TlbiNhVaa(Tlbi {
        addr: A,
        ..Tlbi::default()
    });
    assert_eq!(cmd.build().0, [0x13, A]);
    d.issue_cmd_with_sync(cmd).unwrap();
    assert_new(&mut d, 1, A);
    assert_new(&mut d, 2, A);
    assert_stale(&mut d, 1, B);
    assert_stale(&mut d, 2, B);
    assert!(effects(&mut d).contains(&Effect::HostInvalidate(raw(cmd))));
}

/// TLBI_NH_ALL on a stage-1-only SMMU: every stage-1 entry.
#[test]
fn tlbi_nh_all() {
    let mut d = boot(features());
    let a = s1_with(&mut d, 1, 1, &[A]);
    let b = s1_with(&mut d, 2, 2, &[B]);
    prime_and_remap(&mut d, &[(1, &a.pt, A), (2, &b.pt, B)]);
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAll { vmid: 0 })
        .unwrap();
    assert_new(&mut d, 1, A);
    assert_new(&mut d, 2, B);
    assert_eq!(
        effects(&mut d),
        [
            flush_all(),
            Effect::HostInvalidate(RawCommand { d0: 0x10, d1: 0 })
        ]
    );
}

/// With stage 2 implemented, stage-1-only translations are tagged with STE.S2VMID (5.2
/// S2VMID, 3.17): TLBI_NH_* match it. Two streams share ASID 1 under VMIDs 1 and 2.
#[test]
fn tlbi_nh_scoped_by_s2vmid() {
    let mut d = boot(s2_features());
    let mut doms = Vec::new();
    for (sid, vmid) in [(1u32, 1u64), (2, 2)] {
        let dom = s1_with(&mut d, sid, 1, &[A]);
        let mut ste = d.read_ste(sid).unwrap();
        ste[2] |= vmid;
        d.write_ste(sid, &ste).unwrap();
        doms.push(dom);
    }
    assert_eq!(out(&mut d, 1, None, A, READ), old_pa(1, A));
    assert_eq!(out(&mut d, 2, None, A, READ), old_pa(2, A));
    prime_and_remap(&mut d, &[(1, &doms[0].pt, A), (2, &doms[1].pt, A)]);
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 1, asid: 1 })
        .unwrap();
    assert_new(&mut d, 1, A);
    assert_stale(&mut d, 2, A);
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAll { vmid: 2 })
        .unwrap();
    assert_new(&mut d, 2, A);
}

/// Stage-2 domains on streams 3 (VMID 3) and 4 (VMID 4), each mapping A and B.
fn two_s2(d: &mut Drv) -> (S2Dom, S2Dom) {
    let s3 = attach_s2(d, 3, Granule::G4K, 3, 40);
    let s4 = attach_s2(d, 4, Granule::G4K, 4, 40);
    for (sid, s) in [(3, &s3), (4, &s4)] {
        for iova in [A, B] {
            d.map(&s.pt, iova, old_pa(sid, iova), 0x1000, prot::RW)
                .unwrap();
        }
    }
    (s3, s4)
}

/// TLBI_S12_VMALL: every entry of the VMID, stage-2-only and stage-1-only (tagged with
/// S2VMID) alike; other VMIDs survive.
#[test]
fn tlbi_s12_vmall() {
    let mut d = boot(s2_features());
    let (s3, s4) = two_s2(&mut d);
    let s1 = s1_with(&mut d, 5, 9, &[A]);
    let mut ste = d.read_ste(5).unwrap();
    ste[2] |= 3;
    d.write_ste(5, &ste).unwrap();
    prime_and_remap(
        &mut d,
        &[
            (3, &s3.pt, A),
            (3, &s3.pt, B),
            (4, &s4.pt, A),
            (5, &s1.pt, A),
        ],
    );
    let cmd = CmdEnt::TlbiS12Vmall { vmid: 3 };
    assert_eq!(cmd.build().0, [0x28 | (3 << 32), 0]);
    d.issue_cmd_with_sync(cmd).unwrap();
    assert_eq!(
        effects(&mut d),
        [flush_all(), Effect::HostInvalidate(raw(cmd))]
    );
    assert_new(&mut d, 3, A);
    assert_new(&mut d, 3, B);
    assert_new(&mut d, 5, A);
    assert_stale(&mut d, 4, A);
}

/// TLBI_S2_IPA: the IPA's stage-2 entry in that VMID; other IPAs and VMIDs survive.
#[test]
fn tlbi_s2_ipa() {
    let mut d = boot(s2_features());
    let (s3, s4) = two_s2(&mut d);
    prime_and_remap(&mut d, &[(3, &s3.pt, A), (3, &s3.pt, B), (4, &s4.pt, A)]);
    let cmd = CmdEnt::TlbiS2Ipa(Tlbi {
        vmid: 3,
        addr: A,
        leaf: true,
        ..Tlbi::default()
    });
    assert_eq!(cmd.build().0, [0x2a | (3 << 32), A | 1]);
    d.issue_cmd_with_sync(cmd).unwrap();
    assert!(effects(&mut d).contains(&Effect::HostInvalidate(raw(cmd))));
    assert_new(&mut d, 3, A);
    assert_stale(&mut d, 3, B);
    assert_stale(&mut d, 4, A);
    // A range of two pages from A covers B only if B is within it: it is not (B = A + 1 MiB).
    let cmds = tlb_inv_range(
        CmdEnt::TlbiS2Ipa(Tlbi {
            vmid: 3,
            ..Tlbi::default()
        }),
        B - 0x1000,
        0x2000,
        0x1000,
        true,
        12,
        true,
    );
    d.issue_cmds_with_sync(&cmds).unwrap();
    assert_new(&mut d, 3, B);
    assert_stale(&mut d, 4, A);
}

/// TLBI_NSNH_ALL: everything, every stage.
#[test]
fn tlbi_nsnh_all() {
    let mut d = boot(s2_features());
    let (s3, s4) = two_s2(&mut d);
    let s1 = s1_with(&mut d, 5, 9, &[A]);
    prime_and_remap(&mut d, &[(3, &s3.pt, A), (4, &s4.pt, B), (5, &s1.pt, A)]);
    d.issue_cmd_with_sync(CmdEnt::TlbiNsnhAll).unwrap();
    assert_eq!(
        effects(&mut d),
        [
            flush_all(),
            Effect::HostInvalidate(RawCommand { d0: 0x30, d1: 0 })
        ]
    );
    assert_new(&mut d, 3, A);
    assert_new(&mut d, 4, B);
    assert_new(&mut d, 5, A);
}

/// CFGI_STE: the STE is re-read; other streams' cached STEs are not.
#[test]
fn cfgi_ste() {
    let mut d = boot(features());
    s1_with(&mut d, 1, 1, &[A]);
    s1_with(&mut d, 2, 2, &[A]);
    assert_eq!(out(&mut d, 1, None, A, READ), old_pa(1, A));
    assert_eq!(out(&mut d, 2, None, A, READ), old_pa(2, A));
    poke_ste(&mut d, 1, &make_bypass_ste(false));
    poke_ste(&mut d, 2, &make_bypass_ste(false));
    assert_eq!(out(&mut d, 1, None, A, READ), old_pa(1, A), "STE cached");
    d.port.take_effects();
    d.issue_cmd_with_sync(CmdEnt::CfgiSte { sid: 1, leaf: true })
        .unwrap();
    assert_eq!(
        effects(&mut d),
        [Effect::StreamsChanged(SidRange { first: 1, last: 1 })]
    );
    assert_eq!(out(&mut d, 1, None, A, READ), A);
    assert_eq!(out(&mut d, 2, None, A, READ), old_pa(2, A));
}

/// CFGI_STE_RANGE: 2^(Range+1) aligned STEs; the StreamID's low Range+1 bits are ignored.
#[test]
fn cfgi_ste_range() {
    let mut d = boot(features());
    for sid in 14..=21 {
        d.write_ste(sid, &make_bypass_ste(false)).unwrap();
        assert_eq!(out(&mut d, sid, None, A, READ), A);
        poke_ste(&mut d, sid, &make_abort_ste());
    }
    d.port.take_effects();
    let cmd = CmdEnt::CfgiSteRange { sid: 17, range: 1 };
    assert_eq!(cmd.build().0, [0x04 | (17 << 32), 1]);
    d.issue_cmd_with_sync(cmd).unwrap();
    assert_eq!(
        effects(&mut d),
        [Effect::StreamsChanged(SidRange {
            first: 16,
            last: 19
        })]
    );
    for sid in 14..=21 {
        let aborted = (16..=19).contains(&sid);
        assert_eq!(
            tr(&mut d, sid, None, A, READ).is_err(),
            aborted,
            "sid {sid}"
        );
    }
    d.issue_cmd_with_sync(CmdEnt::CfgiSteRange { sid: 21, range: 0 })
        .unwrap();
    assert!(tr(&mut d, 20, None, A, READ).is_err());
    assert!(tr(&mut d, 21, None, A, READ).is_err());
    assert!(tr(&mut d, 14, None, A, READ).is_ok());
}

/// CFGI_ALL (CFGI_STE_RANGE with Range = 31): every STE.
#[test]
fn cfgi_all() {
    let mut d = boot(features());
    let sids = [0u32, 0x101, 0xfffe];
    for &sid in &sids {
        d.write_ste(sid, &make_bypass_ste(false)).unwrap();
        assert!(tr(&mut d, sid, None, A, READ).is_ok());
        poke_ste(&mut d, sid, &make_abort_ste());
    }
    d.port.take_effects();
    d.issue_cmd_with_sync(CmdEnt::CfgiAll).unwrap();
    assert_eq!(effects(&mut d), [Effect::StreamsChanged(SidRange::ALL)]);
    for &sid in &sids {
        assert!(tr(&mut d, sid, None, A, READ).is_err());
    }
}

/// Four CDs on stream 10 (S1CDMax = 2) and one on stream 11, each with its own page table.
struct CdSetup {
    t10: CdTable,
    t11: CdTable,
    other: PageTable,
}

fn cd_setup(d: &mut Drv) -> CdSetup {
    let mut t10 = d.new_cd_table(CdFmt::Linear, 2, 0).unwrap();
    let mut t11 = d.new_cd_table(CdFmt::Linear, 2, 0).unwrap();
    for (sid, ssid) in [(10u32, 1u32), (10, 2), (11, 1)] {
        let pt = s1_pgtable(d, Granule::G4K);
        d.map(
            &pt,
            A,
            old_pa(sid, A) + (u64::from(ssid) << 16),
            0x1000,
            prot::RW,
        )
        .unwrap();
        let cd = make_s1_cd(&pt.s1_tcr(), (sid * 4 + ssid) as u16, false);
        let table = if sid == 10 { &mut t10 } else { &mut t11 };
        d.write_cd(table, &[sid], ssid, &cd).unwrap();
    }
    for (sid, t) in [(10, &t10), (11, &t11)] {
        let ste = make_cdtable_ste(&t.ste_ptr(), STRTAB_STE_1_S1DSS_BYPASS, false, false);
        d.write_ste(sid, &ste).unwrap();
    }
    let other = s1_pgtable(d, Granule::G4K);
    d.map(&other, A, 0x7700_0000, 0x1000, prot::RW).unwrap();
    CdSetup { t10, t11, other }
}

fn old_cd_pa(sid: u32, ssid: u32) -> u64 {
    old_pa(sid, A) + (u64::from(ssid) << 16)
}

/// Rewrites the CD in memory (no CFGI) to use `pt` with a fresh ASID.
fn poke_cd(d: &mut Drv, t: &CdTable, ssid: u32, pt: &PageTable, asid: u16) {
    let cd = make_s1_cd(&pt.s1_tcr(), asid, false);
    write_qwords(&d.mem, t.base + u64::from(ssid) * 64, &cd).unwrap();
}

/// CFGI_CD: that SubstreamID's CD is re-read; other CDs stay cached.
#[test]
fn cfgi_cd() {
    let mut d = boot(features());
    let s = cd_setup(&mut d);
    for (sid, ssid) in [(10, 1), (10, 2), (11, 1)] {
        assert_eq!(out(&mut d, sid, Some(ssid), A, READ), old_cd_pa(sid, ssid));
    }
    poke_cd(&mut d, &s.t10, 1, &s.other, 100);
    poke_cd(&mut d, &s.t10, 2, &s.other, 101);
    poke_cd(&mut d, &s.t11, 1, &s.other, 102);
    assert_eq!(
        out(&mut d, 10, Some(1), A, READ),
        old_cd_pa(10, 1),
        "CD cached"
    );
    d.port.take_effects();
    let cmd = CmdEnt::CfgiCd {
        sid: 10,
        ssid: 1,
        leaf: true,
    };
    assert_eq!(cmd.build().0, [0x05 | (1 << 12) | (10 << 32), 1]);
    d.issue_cmd_with_sync(cmd).unwrap();
    assert_eq!(effects(&mut d), [Effect::HostInvalidate(raw(cmd))]);
    assert_eq!(out(&mut d, 10, Some(1), A, READ), 0x7700_0000);
    assert_eq!(out(&mut d, 10, Some(2), A, READ), old_cd_pa(10, 2));
    assert_eq!(out(&mut d, 11, Some(1), A, READ), old_cd_pa(11, 1));
}

/// CFGI_CD_ALL: every CD of that StreamID; another stream's CDs stay cached.
#[test]
fn cfgi_cd_all() {
    let mut d = boot(features());
    let s = cd_setup(&mut d);
    for (sid, ssid) in [(10, 1), (10, 2), (11, 1)] {
        assert_eq!(out(&mut d, sid, Some(ssid), A, READ), old_cd_pa(sid, ssid));
    }
    poke_cd(&mut d, &s.t10, 1, &s.other, 100);
    poke_cd(&mut d, &s.t10, 2, &s.other, 101);
    poke_cd(&mut d, &s.t11, 1, &s.other, 102);
    d.port.take_effects();
    let cmd = CmdEnt::CfgiCdAll { sid: 10 };
    d.issue_cmd_with_sync(cmd).unwrap();
    assert_eq!(effects(&mut d), [Effect::HostInvalidate(raw(cmd))]);
    assert_eq!(out(&mut d, 10, Some(1), A, READ), 0x7700_0000);
    assert_eq!(out(&mut d, 10, Some(2), A, READ), 0x7700_0000);
    assert_eq!(out(&mut d, 11, Some(1), A, READ), old_cd_pa(11, 1));
}

/// "Invalidation of an STE also implicitly invalidates cached CDs fetched through the STE"
/// (5.2.1, 4.3.1).
#[test]
fn cfgi_ste_invalidates_its_cds() {
    let mut d = boot(features());
    let s = cd_setup(&mut d);
    assert_eq!(out(&mut d, 10, Some(2), A, READ), old_cd_pa(10, 2));
    assert_eq!(out(&mut d, 11, Some(1), A, READ), old_cd_pa(11, 1));
    poke_cd(&mut d, &s.t10, 2, &s.other, 101);
    poke_cd(&mut d, &s.t11, 1, &s.other, 102);
    d.issue_cmd_with_sync(CmdEnt::CfgiSte {
        sid: 10,
        leaf: true,
    })
    .unwrap();
    assert_eq!(out(&mut d, 10, Some(2), A, READ), 0x7700_0000);
    assert_eq!(out(&mut d, 11, Some(1), A, READ), old_cd_pa(11, 1));
}

/// With S1DSS = SSID0, transactions without a SubstreamID use CD 0, and CFGI_CD for
/// SubstreamID 0 invalidates it (4.3.3).
#[test]
fn cfgi_cd_ssid0_covers_transactions_without_substream() {
    let mut d = boot(features());
    let pt = s1_pgtable(&mut d, Granule::G4K);
    d.map(&pt, A, old_pa(1, A), 0x1000, prot::RW).unwrap();
    let other = s1_pgtable(&mut d, Granule::G4K);
    d.map(&other, A, 0x7700_0000, 0x1000, prot::RW).unwrap();
    let mut table = d.new_cd_table(CdFmt::Linear, 3, 0).unwrap();
    d.write_cd(&mut table, &[1], 0, &make_s1_cd(&pt.s1_tcr(), 1, false))
        .unwrap();
    let ste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_SSID0, false, false);
    d.write_ste(1, &ste).unwrap();
    assert_eq!(out(&mut d, 1, None, A, READ), old_pa(1, A));
    poke_cd(&mut d, &table, 0, &other, 50);
    assert_eq!(out(&mut d, 1, None, A, READ), old_pa(1, A), "CD 0 cached");
    d.issue_cmd_with_sync(CmdEnt::CfgiCd {
        sid: 1,
        ssid: 0,
        leaf: true,
    })
    .unwrap();
    assert_eq!(out(&mut d, 1, None, A, READ), 0x7700_0000);
}

/// CFGI_STE_RANGE also drops the CDs cached through the StreamIDs it covers (4.3.2).
#[test]
fn cfgi_ste_range_invalidates_cds() {
    let mut d = boot(features());
    let s = cd_setup(&mut d);
    assert_eq!(out(&mut d, 10, Some(1), A, READ), old_cd_pa(10, 1));
    assert_eq!(out(&mut d, 11, Some(1), A, READ), old_cd_pa(11, 1));
    poke_cd(&mut d, &s.t10, 1, &s.other, 100);
    poke_cd(&mut d, &s.t11, 1, &s.other, 102);
    // StreamIDs 8..=11.
    d.issue_cmd_with_sync(CmdEnt::CfgiSteRange { sid: 9, range: 1 })
        .unwrap();
    assert_eq!(out(&mut d, 10, Some(1), A, READ), 0x7700_0000);
    assert_eq!(out(&mut d, 11, Some(1), A, READ), 0x7700_0000);
}

/// Linux's unmap path: clear a 2 MiB block, then `arm_smmu_tlb_inv_range_asid` with the
/// block as the leaf granule (one range command: NUM 0, SCALE 9, TG 4K, TTL 2) + CMD_SYNC;
/// the address then faults, a neighbouring block is still served.
#[test]
fn unmap_block_then_range_invalidate() {
    let mut d = boot(features());
    let dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    d.map_range(&dom.pt, 0x4000_0000, 0x8000_0000, 4 * MB, prot::RW)
        .unwrap();
    assert_eq!(out(&mut d, 1, None, 0x4000_1234, READ), 0x8000_1234);
    assert_eq!(out(&mut d, 1, None, 0x4020_1234, READ), 0x8020_1234);
    assert_eq!(dom.pt.unmap(&d.mem, 0x4000_0000).unwrap(), Some(2 * MB));
    assert_eq!(
        out(&mut d, 1, None, 0x4000_1234, READ),
        0x8000_1234,
        "cached"
    );
    let tmpl = CmdEnt::TlbiNhVa(Tlbi {
        asid: 1,
        ..Tlbi::default()
    });
    let cmds = tlb_inv_range(tmpl, 0x4000_0000, 2 * MB, 2 * MB, true, 12, true);
    assert_eq!(cmds.len(), 1);
    let CmdEnt::TlbiNhVa(t) = cmds[0] else {
        panic!()
    };
    assert_eq!((t.num, t.scale, t.tg, t.ttl, t.leaf), (0, 9, 1, 2, true));
    d.issue_cmds_with_sync(&cmds).unwrap();
    assert_eq!(
        fault(&mut d, 1, None, 0x4000_1234, READ),
        Some(id::F_TRANSLATION)
    );
    assert_eq!(out(&mut d, 1, None, 0x4020_1234, READ), 0x8020_1234);
}
