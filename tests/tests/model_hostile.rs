//! A hostile guest: random memory as stream tables, CDs and page tables, random register
//! programming and commands, queue indices at and past every limit, self-referencing page
//! tables, and STE/CD fields at every value. The model must never panic, never read or write
//! outside what the architecture allows, keep its queues consistent, and record only defined
//! event types; where the digest gives a rule (ILLEGAL ranges), the outcome is checked against
//! an oracle written from the digest and the Arm ARM, not from the model.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use common::*;
use proptest::prelude::*;
use viommu_tests::guest::bits::{genmask, prep};
use vm_memory::Bytes;

/// Small RAM for the random cases: 2 MiB.
const SMALL_RAM: u64 = 2 << 20;

fn small_ram() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SMALL_RAM as usize)]).unwrap()
}

/// Fills `[start, start + len)` with xorshift64 bytes from `seed`.
fn fill_random(mem: &GuestMemoryMmap<()>, start: u64, len: u64, seed: u64) {
    let mut s = seed | 1;
    let mut buf = vec![0u8; len as usize];
    for chunk in buf.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        chunk.copy_from_slice(&s.to_le_bytes()[..chunk.len()]);
    }
    mem.write_slice(&buf, GuestAddress(start)).unwrap();
}

fn snapshot(mem: &GuestMemoryMmap<()>) -> Vec<u8> {
    let mut buf = vec![0u8; SMALL_RAM as usize];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    buf
}

fn features_strategy() -> impl Strategy<Value = Capabilities> {
    (
        any::<(bool, bool, bool, bool, bool)>(),
        0u8..=20,
        0u8..=20,
        prop::sample::select(vec![32u8, 36, 40, 42, 44, 48, 52]),
        0u8..=19,
        0u8..=19,
    )
        .prop_map(
            |((s1p, s2p, ril, ats, msi), sid_bits, ssid_bits, oas_bits, cmdqs, eventqs)| {
                Capabilities {
                    s1p: s1p || !s2p,
                    s2p,
                    ril,
                    ats,
                    msi,
                    sid_bits,
                    ssid_bits,
                    oas_bits,
                    cmdqs,
                    eventqs,
                }
            },
        )
}

/// Every register offset, page 0 and page 1.
const OFFSETS: [u64; 34] = [
    0x20, 0x24, 0x28, 0x2c, 0x40, 0x44, 0x48, 0x50, 0x54, 0x60, 0x64, 0x68, 0x6c, 0x70, 0x74, 0x80,
    0x84, 0x88, 0x90, 0x94, 0x98, 0x9c, 0xa0, 0xa4, 0xa8, 0xac, 0xb0, 0xb8, 0xbc, 0xc0, 0x100a8,
    0x100ac, 0x100c8, 0x100cc,
];

#[derive(Debug, Clone)]
enum Op {
    Reg {
        off: u64,
        size: u32,
        val: u64,
    },
    Translate {
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        access: u8,
    },
    Poke {
        addr: u64,
        val: u64,
    },
    /// Commands written at CMDQ_PROD, then PROD moved past them (as a driver would).
    Commands(Vec<[u64; 2]>),
}

/// Plausible commands with random fields (Linux's encodings, any values), and raw dwords.
fn command_strategy() -> impl Strategy<Value = [u64; 2]> {
    let tlbi = any::<(u16, u16, u64, bool, u8, u8, u8, u8)>().prop_map(
        |(vmid, asid, addr, leaf, num, scale, ttl, tg)| Tlbi {
            vmid,
            asid,
            addr,
            leaf,
            num: num & 31,
            scale: scale & 31,
            ttl: ttl & 3,
            tg: tg & 3,
        },
    );
    prop_oneof![
        (any::<u32>(), any::<bool>())
            .prop_map(|(sid, leaf)| CmdEnt::CfgiSte { sid, leaf }.build().0),
        (any::<u32>(), 0u8..32)
            .prop_map(|(sid, range)| CmdEnt::CfgiSteRange { sid, range }.build().0),
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(sid, ssid, leaf)| CmdEnt::CfgiCd {
            sid,
            ssid: ssid & 0xf_ffff,
            leaf
        }
        .build()
        .0),
        any::<u32>().prop_map(|sid| CmdEnt::CfgiCdAll { sid }.build().0),
        tlbi.clone().prop_map(|t| CmdEnt::TlbiNhVa(t).build().0),
        tlbi.clone().prop_map(|t| CmdEnt::TlbiNhVaa(t).build().0),
        tlbi.prop_map(|t| CmdEnt::TlbiS2Ipa(t).build().0),
        any::<(u16, u16)>().prop_map(|(vmid, asid)| CmdEnt::TlbiNhAsid { vmid, asid }.build().0),
        any::<u16>().prop_map(|vmid| CmdEnt::TlbiS12Vmall { vmid }.build().0),
        Just(CmdEnt::TlbiNsnhAll.build().0),
        (0u8..4, 0..SMALL_RAM + 0x1000, any::<u32>()).prop_map(|(cs, msiaddr, msidata)| {
            CmdEnt::Sync {
                cs,
                msiaddr,
                msidata,
            }
            .build()
            .0
        }),
        any::<[u64; 2]>(),
    ]
}

/// Values that look like guest addresses (in or near RAM) with random low fields.
fn value_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0..SMALL_RAM, 0u64..64).prop_map(|(a, low)| (a & !0x3f) | low),
        (0u64..0x40).prop_map(|v| v),
        Just(0x1_ffff),
        Just(u64::MAX),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            prop_oneof![prop::sample::select(OFFSETS.to_vec()), (0u64..0x4_0000).prop_map(|o| o & !3)],
            prop::sample::select(vec![4u32, 8]),
            value_strategy()
        )
            .prop_map(|(off, size, val)| Op::Reg { off, size, val }),
        4 => (
            prop_oneof![0u32..300, any::<u32>()],
            prop::option::of(prop_oneof![0u32..70, any::<u32>()]),
            prop_oneof![0u64..0x100_0000, any::<u64>()],
            0u8..16
        )
            .prop_map(|(sid, ssid, iova, access)| Op::Translate {
                sid,
                ssid,
                iova,
                access
            }),
        1 => (0..SMALL_RAM / 8, value_strategy()).prop_map(|(q, val)| Op::Poke { addr: q * 8, val }),
        2 => prop::collection::vec(command_strategy(), 1..8).prop_map(Op::Commands),
    ]
}

/// The queue's pointer mask: index and wrap bits for the effective LOG2SIZE.
fn pointer_mask(base: u64, max: u8) -> u32 {
    let log2 = (base & 0x1f).min(u64::from(max)) as u32;
    (1u32 << (log2 + 1)) - 1
}

/// Guest-visible invariants after every step.
fn check_invariants(port: &mut DirectPort, f: &Capabilities) -> Result<(), TestCaseError> {
    let cr0 = port.read(ARM_SMMU_CR0, 4) as u32;
    let active = (port.read(ARM_SMMU_GERROR, 4) ^ port.read(ARM_SMMU_GERRORN, 4)) as u32;
    let cons = port.read(ARM_SMMU_CMDQ_CONS, 4) as u32;
    let prod = port.read(ARM_SMMU_CMDQ_PROD, 4) as u32;
    if active & GERROR_CMDQ_ERR != 0 {
        let err = (cons >> 24) & 0x7f;
        // CONS.ERR is UNKNOWN while inactive, and the guest may activate the error itself by
        // toggling GERRORN; an SMMU-raised error is ILL or ABT (no ATS invalidation here).
        prop_assert!(err <= 3, "CONS.ERR {err}");
    } else if cr0 & CR0_CMDQEN != 0 {
        let pm = pointer_mask(port.read(ARM_SMMU_CMDQ_BASE, 8), f.cmdqs);
        prop_assert_eq!(
            cons & pm,
            prod & pm,
            "an enabled, error-free queue is drained"
        );
    }
    for e in port.take_effects() {
        match e {
            Effect::StreamsChanged(r) => prop_assert!(r.first <= r.last, "{:?}", r),
            Effect::TranslationsInvalidated { start, last } => prop_assert!(start <= last),
            _ => {}
        }
    }
    Ok(())
}

fn access_of(bits: u8) -> AccessKind {
    access(bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0)
}

/// A translation's internal consistency.
fn check_translation(
    t: &Result<Translation, TranslationFault>,
    iova: u64,
) -> Result<(), TestCaseError> {
    match t {
        Ok(t) => {
            prop_assert!(t.size_shift <= 64);
            if t.size_shift < 64 {
                let mask = (1u64 << t.size_shift) - 1;
                prop_assert_eq!(t.input_base & mask, 0);
                prop_assert_eq!(t.output_base & mask, 0);
                prop_assert_eq!(t.output(iova) & mask, iova & mask);
            }
        }
        Err(e) => {
            if let Some(id) = e.event {
                prop_assert!(id::ALL.contains(&id.0), "undefined event type {:#x}", id.0);
            }
        }
    }
    Ok(())
}

/// The event record a translation reported is the one written at the old PROD.
fn check_record(
    port: &mut DirectPort,
    mem: &GuestMemoryMmap<()>,
    f: &Capabilities,
    before: (u64, u32, u64),
    t: &Result<Translation, TranslationFault>,
) -> Result<(), TestCaseError> {
    let (events_before, prod, base) = before;
    if port.smmu().counters().events == events_before {
        return Ok(());
    }
    prop_assert_eq!(port.smmu().counters().events, events_before + 1);
    let id = t.as_ref().err().and_then(|e| e.event);
    prop_assert!(id.is_some(), "an event was written but not reported");
    let log2 = (base & 0x1f).min(u64::from(f.eventqs));
    let bytes = (32u64 << log2).max(32);
    let addr = (base & genmask(51, 5) & !(bytes - 1)) + u64::from(prod & ((1u32 << log2) - 1)) * 32;
    let mut ty = [0u8; 1];
    mem.read_slice(&mut ty, GuestAddress(addr)).unwrap();
    prop_assert_eq!(ty[0], id.unwrap().0);
    prop_assert!(id::ALL.contains(&ty[0]));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random memory under a Linux-booted SMMU, then random register writes, memory pokes and
    /// transactions.
    #[test]
    fn random_guest_never_breaks_the_model(
        f in features_strategy(),
        seed in any::<u64>(),
        ops in prop::collection::vec(op_strategy(), 1..60),
    ) {
        let mem = small_ram();
        let port = DirectPort::new(f, mem.clone());
        let cfg = DriverConfig { cmdq_shift: 7, evtq_shift: 4, ..DriverConfig::default() };
        let mut port = match Driver::probe(port, mem.clone(), BumpAllocator::new(0x1000, SMALL_RAM), cfg) {
            Ok(mut d) => {
                // Linux boots it (the reset may fail on a degenerate configuration).
                let _ = d.reset();
                d.port
            }
            Err(_) => DirectPort::new(f, mem.clone()),
        };
        fill_random(&mem, 0, SMALL_RAM, seed);
        check_invariants(&mut port, &f)?;
        for op in ops {
            match op {
                Op::Reg { off, size, val } => port.write(off, size, val),
                Op::Poke { addr, val } => {
                    mem.write_slice(&val.to_le_bytes(), GuestAddress(addr)).unwrap();
                }
                Op::Commands(cmds) => {
                    let base = port.read(ARM_SMMU_CMDQ_BASE, 8);
                    let log2 = (base & 0x1f).min(u64::from(f.cmdqs)) as u32;
                    let qbase = base & genmask(51, 5) & !((16u64 << log2).max(32) - 1);
                    let pm = (1u32 << (log2 + 1)) - 1;
                    let mut prod = port.read(ARM_SMMU_CMDQ_PROD, 4) as u32;
                    for cmd in cmds {
                        let at = qbase + u64::from(prod & (pm >> 1)) * 16;
                        // A queue outside RAM: the commands go nowhere (CERROR_ABT later).
                        let _ = write_qwords(&mem, at, &cmd);
                        prod = (prod & !pm) | (prod.wrapping_add(1) & pm);
                    }
                    port.write(ARM_SMMU_CMDQ_PROD, 4, u64::from(prod));
                }
                Op::Translate { sid, ssid, iova, access } => {
                    let before = (
                        port.smmu().counters().events,
                        port.read(ARM_SMMU_EVTQ_PROD, 4) as u32,
                        port.read(ARM_SMMU_EVTQ_BASE, 8),
                    );
                    let t = port.translate(sid, ssid, iova, access_of(access));
                    check_translation(&t, iova)?;
                    check_record(&mut port, &mem, &f, before, &t)?;
                }
            }
            check_invariants(&mut port, &f)?;
        }
    }

    /// The command queue with any LOG2SIZE (0..=31, capped at any CMDQS), any PROD and CONS
    /// values, and random or partly valid commands: processing ends, drains the queue or stops
    /// on an error with CONS inside the queue, and never writes guest memory (no MSIs).
    #[test]
    fn command_queue_indices_at_any_value(
        cmdqs in 0u8..=19,
        log2 in 0u64..32,
        base in prop_oneof![0..SMALL_RAM, Just(SMALL_RAM - 32), Just(OUTSIDE_RAM)].prop_map(|b| b & !0x1f),
        cons in prop_oneof![any::<u32>(), 0u32..0x10_0000],
        prod in prop_oneof![any::<u32>(), 0u32..0x10_0000],
        valid in 0u64..64,
        seed in any::<u64>(),
    ) {
        let f = Capabilities { cmdqs, ..features() };
        let mem = small_ram();
        fill_random(&mem, 0, SMALL_RAM, seed);
        // Some valid commands at the start of the queue's memory.
        let start = base & genmask(51, 5);
        for i in 0..valid {
            let cmd = if i % 3 == 2 { CmdEnt::linux_sync(0) } else { CmdEnt::CfgiSte { sid: i as u32, leaf: true } };
            let _ = write_qwords(&mem, start + i * 16, &cmd.build().0);
        }
        let image = snapshot(&mem);
        let mut port = DirectPort::new(f, mem.clone());
        port.write(ARM_SMMU_CMDQ_BASE, 8, base | log2);
        port.write(ARM_SMMU_CMDQ_CONS, 4, u64::from(cons));
        port.write(ARM_SMMU_CMDQ_PROD, 4, u64::from(cons));
        port.write(ARM_SMMU_CR0, 4, u64::from(CR0_CMDQEN));
        port.write(ARM_SMMU_CMDQ_PROD, 4, u64::from(prod));
        let pm = pointer_mask(base | log2, cmdqs);
        let c = port.read(ARM_SMMU_CMDQ_CONS, 4) as u32;
        let p = port.read(ARM_SMMU_CMDQ_PROD, 4) as u32;
        let active = (port.read(ARM_SMMU_GERROR, 4) ^ port.read(ARM_SMMU_GERRORN, 4)) as u32;
        if active & GERROR_CMDQ_ERR != 0 {
            let err = (c >> 24) & 0x7f;
            prop_assert!(err == CMDQ_ERR_CERROR_ILL_IDX || err == CMDQ_ERR_CERROR_ABT_IDX, "ERR {}", err);
            if base >= SMALL_RAM {
                prop_assert_eq!(err, CMDQ_ERR_CERROR_ABT_IDX);
            }
        } else {
            prop_assert_eq!(c & pm, p & pm);
        }
        prop_assert!(snapshot(&mem) == image, "the command queue wrote guest memory");
        for e in port.take_effects() {
            match e {
                Effect::StreamsChanged(r) => prop_assert!(r.first <= r.last),
                Effect::TranslationsInvalidated { start, last } => prop_assert!(start <= last),
                Effect::MsiWrite { .. } => prop_assert!(false, "MSI without IDR0.MSI: {:?}", e),
                _ => {}
            }
        }
    }

    /// The event queue with any LOG2SIZE, any base, any PROD and CONS: records land inside the
    /// queue (never elsewhere in memory), and every record has a defined type.
    #[test]
    fn event_queue_indices_at_any_value(
        eventqs in 0u8..=19,
        log2 in 0u64..32,
        base in prop_oneof![0..SMALL_RAM, Just(SMALL_RAM - 32), Just(OUTSIDE_RAM)].prop_map(|b| b & !0x1f),
        prod in any::<u32>(),
        cons in any::<u32>(),
        faults in 1u32..40,
        seed in any::<u64>(),
    ) {
        let f = Capabilities { eventqs, sid_bits: 4, ..features() };
        let mem = small_ram();
        fill_random(&mem, 0, SMALL_RAM, seed);
        let image = snapshot(&mem);
        let mut port = DirectPort::new(f, mem.clone());
        port.write(ARM_SMMU_CR2, 4, u64::from(CR2_RECINVSID));
        port.write(ARM_SMMU_STRTAB_BASE_CFG, 4, 0);
        port.write(ARM_SMMU_EVTQ_BASE, 8, base | log2);
        port.write(ARM_SMMU_EVTQ_PROD, 4, u64::from(prod));
        port.write(ARM_SMMU_EVTQ_CONS, 4, u64::from(cons));
        port.write(ARM_SMMU_CR0, 4, u64::from(CR0_SMMUEN | CR0_EVTQEN));
        for i in 0..faults {
            // LOG2SIZE 0: every StreamID but 0 is C_BAD_STREAMID.
            let t = port.translate(1 + i, None, 0, READ);
            prop_assert!(t.is_err());
        }
        let eff = log2.min(u64::from(eventqs));
        let bytes = 32u64 << eff;
        let qbase = base & genmask(51, 5) & !(bytes - 1);
        let after = snapshot(&mem);
        for (chunk, (a, b)) in image.chunks(4096).zip(after.chunks(4096)).enumerate() {
            if a == b {
                continue;
            }
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                let addr = (chunk * 4096 + i) as u64;
                if x != y {
                    prop_assert!(addr >= qbase && addr < qbase + bytes, "write at {:#x} outside the queue {:#x}+{:#x}", addr, qbase, bytes);
                }
            }
        }
        // Every record in the queue region that changed is a C_BAD_STREAMID.
        for rec in 0..(bytes / 32).min(SMALL_RAM / 32) {
            let at = (qbase + rec * 32) as usize;
            if at >= SMALL_RAM as usize {
                break;
            }
            if at + 32 <= SMALL_RAM as usize && after[at..at + 32] != image[at..at + 32] {
                prop_assert_eq!(after[at], id::C_BAD_STREAMID);
            }
        }
        let c = port.smmu().counters();
        prop_assert_eq!(c.events + c.events_lost, u64::from(faults));
    }
}

/// Queue pointers at the exact limits: LOG2SIZE 0 (one entry), CMDQS, CMDQS + 1 and the field
/// maximum 31; PROD/CONS at 0, the last index, the wrap bit, and all ones. The queue sits at
/// address 0 and RAM (2^17 entries) is full of CMD_SYNC (CS = NONE).
#[test]
fn command_queue_at_every_limit() {
    let mem = small_ram();
    for i in 0..SMALL_RAM / 16 {
        write_qwords(&mem, i * 16, &[0x46, 0]).unwrap();
    }
    for cmdqs in [0u8, 1, 7, 19] {
        for log2 in [0u64, 1, u64::from(cmdqs), u64::from(cmdqs) + 1, 19, 31] {
            let eff = log2.min(u64::from(cmdqs)) as u32;
            let wrap = 1u32 << eff;
            for (cons, prod) in [
                (0, 1),
                (0, wrap),
                (wrap - 1, wrap),
                (wrap - 1, 0),
                (0, 0xf_ffff),
                (0xf_ffff, 0),
                (u32::MAX, u32::MAX),
                (0, u32::MAX),
            ] {
                let f = Capabilities {
                    cmdqs,
                    ..features()
                };
                let mut port = DirectPort::new(f, mem.clone());
                let base = 0u64;
                port.write(ARM_SMMU_CMDQ_BASE, 8, base | log2);
                port.write(ARM_SMMU_CMDQ_CONS, 4, u64::from(cons));
                port.write(ARM_SMMU_CR0, 4, u64::from(CR0_CMDQEN));
                port.write(ARM_SMMU_CMDQ_PROD, 4, u64::from(prod));
                let pm = (wrap << 1) - 1;
                let c = port.read(ARM_SMMU_CMDQ_CONS, 4) as u32;
                let active = port.read(ARM_SMMU_GERROR, 4) ^ port.read(ARM_SMMU_GERRORN, 4);
                if eff <= 17 {
                    assert_eq!(
                        active, 0,
                        "cmdqs {cmdqs} log2 {log2} cons {cons:#x} prod {prod:#x}"
                    );
                    assert_eq!(
                        c & pm,
                        prod & pm,
                        "cmdqs {cmdqs} log2 {log2} cons {cons:#x} prod {prod:#x}"
                    );
                } else {
                    // Beyond 2 MiB: drained, or stopped by an abort on an entry outside RAM.
                    let abt = (c >> 24) == CMDQ_ERR_CERROR_ABT_IDX;
                    let outside = u64::from(c & (wrap - 1)) * 16 >= SMALL_RAM;
                    assert!(c & pm == prod & pm || (abt && outside), "{c:#x}");
                }
            }
        }
    }
}

/// A 4K-granule table (at `table`) whose 512 entries all point back at itself: every level
/// of the walk reads the same table and the level-3 "table" descriptor is a page of it.
fn self_loop(d: &mut Drv, table: u64, extra: u64) {
    for i in 0..512 {
        write_u64(&d.mem, table + i * 8, table | 3 | extra).unwrap();
    }
}

/// Page tables that point back at themselves terminate: after level 3 the walk stops. With
/// AF = 0 in the looping entries the final (page) descriptor faults F_ACCESS; with AF = 1 and
/// AP = unprivileged read/write, the walk translates to the table page itself.
#[test]
fn self_referencing_stage1_tables() {
    let mut d = boot(features());
    let mut dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    let table = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    self_loop(&mut d, table, 0);
    let mut cd = dom.cd;
    cd[1] = table;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    for iova in [0u64, 0x1234_5678_9abc, (1 << 48) - 1] {
        assert_eq!(
            fault(&mut d, 1, None, iova, READ),
            Some(id::F_ACCESS),
            "{iova:#x}"
        );
    }
    assert_eq!(events(&mut d).len(), 3);
    self_loop(&mut d, table, (1 << 10) | (1 << 6));
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 1 })
        .unwrap();
    let t = tr(&mut d, 1, None, 0x1234_5678_9abc, READ).unwrap();
    assert_eq!(
        (t.output(0x1234_5678_9abc), t.size_shift),
        (table + 0xabc, 12)
    );
    assert_eq!(
        out(&mut d, 1, None, 0x7fff_ffff_f008, PRIV_WRITE),
        table + 8
    );
    // Two tables pointing at each other: A → B → A → B, the page is A.
    let a = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    let b = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    for i in 0..512 {
        write_u64(&d.mem, a + i * 8, b | 3).unwrap();
        write_u64(&d.mem, b + i * 8, a | 3 | (1 << 10) | (1 << 6)).unwrap();
    }
    cd[1] = a;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 1 })
        .unwrap();
    assert_eq!(out(&mut d, 1, None, 0x10_0123, READ), a + 0x123);
}

/// The same for a 64K stage-1 table (3 levels from level 1) and a stage-2 table.
#[test]
fn self_referencing_64k_and_stage2_tables() {
    let mut d = boot(s2_features());
    let mut dom = attach_s1(&mut d, 1, Granule::G64K, 1);
    let table = d.alloc_zeroed(0x1_0000, 0x1_0000).unwrap();
    for i in 0..8192u64 {
        write_u64(&d.mem, table + i * 8, table | 3 | (1 << 10) | (1 << 6)).unwrap();
    }
    let mut cd = dom.cd;
    cd[1] = table;
    d.write_cd(&mut dom.table, &[1], 0, &cd).unwrap();
    assert_eq!(out(&mut d, 1, None, 0xabcd_1234_5678, READ), table + 0x5678);
    // Stage 2, 4K, 40-bit IPA starting at level 1 with two concatenated tables.
    let s2 = attach_s2(&mut d, 2, Granule::G4K, 2, 40);
    let pgd = s2.pt.pgd;
    let loop_table = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    for i in 0..1024u64 {
        write_u64(&d.mem, pgd + i * 8, loop_table | 3).unwrap();
    }
    // S2AP = RW, AF.
    self_loop(&mut d, loop_table, (1 << 10) | (3 << 6));
    assert_eq!(
        out(&mut d, 2, None, 0x12_3456_7abc, WRITE),
        loop_table + 0xabc
    );
}

/// S1CDMax at every value: ILLEGAL above SSIDSIZE, IGNORED without substreams (digest 1.2).
#[test]
fn s1cdmax_at_every_value() {
    for ssid_bits in [0u8, 5, 16, 20] {
        let mut d = boot(Capabilities {
            ssid_bits,
            ..features()
        });
        let pt = s1_pgtable(&mut d, Granule::G4K);
        d.map(&pt, 0x1000, 0x7000, 0x1000, prot::RW).unwrap();
        let mut table = d.new_cd_table(CdFmt::Linear, 0, 0).unwrap();
        d.write_cd(&mut table, &[1], 0, &make_s1_cd(&pt.s1_tcr(), 1, false))
            .unwrap();
        for cdmax in 0u64..32 {
            let mut ste =
                make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_BYPASS, false, false);
            ste[0] |= cdmax << 59;
            install_ste(&mut d, 1, &ste);
            let r = tr(&mut d, 1, None, 0x1000, READ);
            let what = format!("SSIDSIZE {ssid_bits} S1CDMax {cdmax}");
            if ssid_bits != 0 && cdmax > u64::from(ssid_bits) {
                assert_eq!(
                    r.unwrap_err().event.map(|e| e.0),
                    Some(id::C_BAD_STE),
                    "{what}"
                );
            } else if ssid_bits == 0 || cdmax == 0 {
                assert_eq!(r.unwrap().output(0x1000), 0x7000, "{what}: the single CD");
            } else {
                assert_eq!(r.unwrap().output(0x1000), 0x1000, "{what}: S1DSS bypass");
                // The last SubstreamID is in range (its CD is not valid), the next is not.
                let last = (1u32 << cdmax) - 1;
                let ev = tr(&mut d, 1, Some(last), 0x1000, READ)
                    .unwrap_err()
                    .event
                    .map(|e| e.0);
                assert_ne!(ev, Some(id::C_BAD_SUBSTREAMID), "{what}");
                let ev = tr(&mut d, 1, Some(last + 1), 0x1000, READ)
                    .unwrap_err()
                    .event
                    .map(|e| e.0);
                assert_eq!(ev, Some(id::C_BAD_SUBSTREAMID), "{what}");
            }
            events(&mut d);
        }
    }
}

/// The digest's CD TxSZ/TGx rules (3.2): checked only when EPDx = 0; TxSZ 16..=39 and a
/// granule the SMMU has (TG0: 0 4K, 1 64K, 2 16K; TG1: 1 16K, 2 4K, 3 64K).
fn cd_tt_legal(epd: bool, tsz: u64, tg: u64, ttb1: bool) -> bool {
    let granule_ok = if ttb1 { tg != 0 } else { tg != 3 };
    epd || (granule_ok && (16..=39).contains(&tsz))
}

/// Every T0SZ, TG0 and EPD0 (and every T1SZ, TG1 with EPD1 = 0): ILLEGAL exactly where the
/// digest says; a legal CD walks its (empty) table and faults F_TRANSLATION.
#[test]
fn cd_txsz_and_tg_at_every_value() {
    let mut d = boot(features());
    let dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    let table = d.new_cd_table(CdFmt::Linear, 0, 0).unwrap();
    d.write_ste(2, &make_cdtable_ste(&table.ste_ptr(), 0, false, false))
        .unwrap();
    let (base_cd, ttb) = (dom.cd, d.alloc_zeroed(0x1_0000, 0x1_0000).unwrap());
    for ttb1 in [false, true] {
        for epd in [false, true] {
            for tg in 0u64..4 {
                for tsz in 0u64..64 {
                    let mut cd = base_cd;
                    let (tsz_f, tg_f, epd_f) = if ttb1 {
                        (
                            CTXDESC_CD_0_TCR_T1SZ,
                            CTXDESC_CD_0_TCR_TG1,
                            CTXDESC_CD_0_TCR_EPD1,
                        )
                    } else {
                        (
                            CTXDESC_CD_0_TCR_T0SZ,
                            CTXDESC_CD_0_TCR_TG0,
                            CTXDESC_CD_0_TCR_EPD0,
                        )
                    };
                    cd[0] &= !(tsz_f | tg_f | epd_f);
                    cd[0] |= prep(tsz_f, tsz) | prep(tg_f, tg) | if epd { epd_f } else { 0 };
                    cd[1] = ttb;
                    cd[2] = ttb;
                    write_qwords(&d.mem, table.base, &cd).unwrap();
                    d.issue_cmd_with_sync(CmdEnt::CfgiCd {
                        sid: 2,
                        ssid: 0,
                        leaf: true,
                    })
                    .unwrap();
                    let iova = if ttb1 { u64::MAX - 0xfff } else { 0 };
                    let ev = tr(&mut d, 2, None, iova, READ)
                        .unwrap_err()
                        .event
                        .map(|e| e.0);
                    events(&mut d);
                    let what = format!("ttb1 {ttb1} epd {epd} tg {tg} tsz {tsz}");
                    if cd_tt_legal(epd, tsz, tg, ttb1) {
                        assert_eq!(ev, Some(id::F_TRANSLATION), "{what}");
                    } else {
                        assert_eq!(ev, Some(id::C_BAD_CD), "{what}");
                    }
                }
            }
        }
    }
}

/// The Arm ARM's stage-2 start-level check (`AArch64.S2InconsistentSL`) and the SMMU's S2T0SZ
/// range (v3.1+: MAX(16, 64 - IAS) ..= 39 without STT), for S2TG `tg` and S2SL0 `sl0`.
fn s2_geometry_legal(tg: u64, tsz: u64, sl0: u64, ias: u64) -> bool {
    let granule_bits = match tg {
        0 => 12,
        1 => 16,
        2 => 14,
        _ => return false,
    };
    if tsz > 39 || tsz < 16.max(64 - ias) {
        return false;
    }
    let start_level = match (granule_bits, sl0) {
        (12, 0) => 2,
        (12, 1) => 1,
        (12, 2) => 0,
        (14 | 16, 0) => 3,
        (14 | 16, 1) => 2,
        (14 | 16, 2) => 1,
        _ => return false,
    };
    let levels = 3 - start_level;
    let stride = granule_bits - 3;
    let min = levels * stride + granule_bits + 1;
    let max = min + (stride - 1) + 4;
    let iasize = 64 - tsz;
    (min..=max).contains(&iasize)
}

/// Every S2T0SZ × S2SL0 × S2TG: C_BAD_STE exactly where the oracle says; a legal STE walks
/// its (empty, concatenation-sized) table and faults F_TRANSLATION in stage 2.
#[test]
fn s2_t0sz_sl0_tg_at_every_value() {
    let mut d = boot(s2_features());
    let ttb = d.alloc_zeroed(16 * 0x1_0000, 16 * 0x1_0000).unwrap();
    let mut legal = 0;
    for tg in 0u64..4 {
        for sl0 in 0u64..4 {
            for tsz in 0u64..64 {
                let dom = S2Domain {
                    vmid: 1,
                    vtcr: Vtcr {
                        tsz: tsz as u8,
                        sl: sl0 as u8,
                        irgn: 1,
                        orgn: 1,
                        sh: 3,
                        tg: tg as u8,
                        ps: 4,
                    },
                    vttbr: ttb,
                };
                install_ste(&mut d, 1, &make_s2_domain_ste(&dom, false, false));
                let ev = tr(&mut d, 1, None, 0x1000, READ)
                    .unwrap_err()
                    .event
                    .map(|e| e.0);
                let what = format!("S2TG {tg} S2SL0 {sl0} S2T0SZ {tsz}");
                if s2_geometry_legal(tg, tsz, sl0, 44) {
                    legal += 1;
                    assert_eq!(ev, Some(id::F_TRANSLATION), "{what}");
                    assert!(one_event(&mut d).s2(), "{what}");
                } else {
                    assert_eq!(ev, Some(id::C_BAD_STE), "{what}");
                    events(&mut d);
                }
            }
        }
    }
    // 4K: L2 25..=34, L1 31..=43 (44 capped), L0 40..=44 bits; 16K: L3 25..=29, L2 26..=40,
    // L1 37..=44; 64K: L3 25..=33, L2 30..=44, L1 43..=44.
    assert_eq!(legal, 10 + 13 + 5 + 5 + 15 + 8 + 9 + 15 + 2);
}

/// CD.IPS at every value against TTB0 at every height: ILLEGAL iff TTB0 lies beyond
/// MIN(IPS, OAS) (IPS itself is never ILLEGAL), and STE.S2PS likewise for S2TTB.
#[test]
fn ips_and_s2ps_at_every_value() {
    let bits = |enc: u64| -> u32 {
        match enc {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            6 => 52,
            _ => 64,
        }
    };
    let mut d = boot(s2_features());
    let dom = attach_s1(&mut d, 1, Granule::G4K, 1);
    let table = d.new_cd_table(CdFmt::Linear, 0, 0).unwrap();
    d.write_ste(2, &make_cdtable_ste(&table.ste_ptr(), 0, false, false))
        .unwrap();
    for ips in 0u64..8 {
        for k in 30u32..47 {
            let mut cd = dom.cd;
            cd[0] = (cd[0] & !CTXDESC_CD_0_TCR_IPS) | (ips << 32);
            cd[1] = 1 << k;
            write_qwords(&d.mem, table.base, &cd).unwrap();
            d.issue_cmd_with_sync(CmdEnt::CfgiCd {
                sid: 2,
                ssid: 0,
                leaf: true,
            })
            .unwrap();
            let ev = tr(&mut d, 2, None, 0x1000, READ)
                .unwrap_err()
                .event
                .map(|e| e.0);
            let eff = bits(ips).min(44);
            let expect = if k >= eff {
                id::C_BAD_CD
            } else if (1u64 << k) < RAM_SIZE {
                id::F_TRANSLATION
            } else {
                id::F_WALK_EABT
            };
            assert_eq!(ev, Some(expect), "IPS {ips} TTB0 2^{k}");
            events(&mut d);
        }
    }
    let s2 = s2_domain(&mut d, Granule::G4K, 3, 40);
    for ps in 0u64..8 {
        for k in 30u32..47 {
            let mut dom = s2.dom;
            dom.vtcr.ps = ps as u8;
            dom.vttbr = 1 << k;
            install_ste(&mut d, 3, &make_s2_domain_ste(&dom, false, false));
            let ev = tr(&mut d, 3, None, 0x1000, READ)
                .unwrap_err()
                .event
                .map(|e| e.0);
            let eff = bits(ps).min(44);
            let expect = if k >= eff {
                id::C_BAD_STE
            } else if (1u64 << k) < RAM_SIZE {
                id::F_TRANSLATION
            } else {
                id::F_WALK_EABT
            };
            assert_eq!(ev, Some(expect), "S2PS {ps} S2TTB 2^{k}");
            events(&mut d);
        }
    }
}

/// StreamIDs, SubstreamIDs and addresses at their limits.
#[test]
fn ids_and_addresses_at_the_limits() {
    let mut d = boot(features());
    let dom = attach_s1(&mut d, 0xffff, Granule::G4K, 1);
    d.map(&dom.pt, (1 << 48) - 0x1000, 0x5000, 0x1000, prot::RW)
        .unwrap();
    assert_eq!(out(&mut d, 0xffff, None, (1 << 48) - 1, READ), 0x5fff);
    assert_eq!(
        fault(&mut d, 0xffff, None, 1 << 48, READ),
        Some(id::F_TRANSLATION)
    );
    assert_eq!(
        fault(&mut d, 0xffff, None, u64::MAX, READ),
        Some(id::F_TRANSLATION)
    );
    assert_eq!(
        fault(&mut d, 0x1_0000, None, 0, READ),
        Some(id::C_BAD_STREAMID)
    );
    assert_eq!(
        fault(&mut d, u32::MAX, Some(u32::MAX), 0, READ),
        Some(id::C_BAD_STREAMID)
    );
    assert_eq!(
        fault(&mut d, 0xffff, Some(0x10_0000), 0, READ),
        Some(id::C_BAD_SUBSTREAMID)
    );
    let evs = events(&mut d);
    assert_eq!(evs.len(), 5);
    assert!(evs.iter().all(Event::has_defined_type));
    // The C_BAD_STREAMID for SubstreamID 0xffff_ffff keeps its 20 bits.
    assert_eq!((evs[3].sid(), evs[3].ssid()), (u32::MAX, 0xf_ffff));
}

/// Reserved STE qwords 4..=7 and reserved bits in qwords 0..=3: an implementation either
/// ignores them or makes the STE ILLEGAL (IHI 0070 5, digest 0) — never anything else.
#[test]
fn reserved_ste_fields_are_ignored_or_illegal() {
    let mut d = boot(features());
    let mut ste = make_bypass_ste(false);
    ste[0] |= genmask(58, 52);
    ste[1] |= genmask(63, 52) | genmask(43, 41);
    ste[4..].copy_from_slice(&[u64::MAX; 4]);
    install_ste(&mut d, 1, &ste);
    match tr(&mut d, 1, None, 0x4000, READ) {
        Ok(t) => assert_eq!(t.output(0x4000), 0x4000),
        Err(e) => assert_eq!(e.event.map(|e| e.0), Some(id::C_BAD_STE)),
    }
}
