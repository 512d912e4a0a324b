//! Tests of the stage-1, stage-2 and nested walks over tables from [`builder`].

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod builder;

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use builder::*;

const fn access(read: bool, write: bool, exec: bool, privileged: bool) -> AccessKind {
    AccessKind {
        read,
        write,
        exec,
        privileged,
    }
}

const PROBE: AccessKind = access(false, false, false, false);
const READ: AccessKind = access(true, false, false, false);
const WRITE: AccessKind = access(false, true, false, false);
const EXEC: AccessKind = access(false, false, true, false);
const PRIV_READ: AccessKind = access(true, false, false, true);
const PRIV_WRITE: AccessKind = access(false, true, false, true);
const PRIV_EXEC: AccessKind = access(false, false, true, true);

fn s1_fault(kind: FaultKind) -> WalkFault {
    WalkFault {
        kind,
        stage2: false,
        class: FaultClass::In,
        ipa: 0,
        fetch_addr: 0,
    }
}

fn s2_fault(kind: FaultKind, class: FaultClass, ipa: u64) -> WalkFault {
    WalkFault {
        kind,
        stage2: true,
        class,
        ipa,
        fetch_addr: 0,
    }
}

fn tt(granule: Granule, tsz: u8, ttb: u64) -> TtConfig {
    TtConfig {
        tsz,
        granule,
        ttb,
        epd: false,
        had: false,
    }
}

fn disabled_tt() -> TtConfig {
    TtConfig {
        epd: true,
        ..tt(Granule::G4K, 25, 0)
    }
}

fn s1_config(tt0: TtConfig, tt1: TtConfig) -> Stage1Config {
    Stage1Config {
        tt: [tt0, tt1],
        tbi: [false, false],
        oas_bits: 48,
        affd: false,
    }
}

fn s2_config(granule: Granule, tsz: u8, sl0: u8, ttb: u64) -> Stage2Config {
    Stage2Config {
        tsz,
        sl0,
        granule,
        ttb,
        ps_bits: 48,
        affd: false,
        xnx: true,
    }
}

fn t1(
    mem: &GuestMemoryMmap<()>,
    s1: &Stage1Config,
    iova: u64,
    access: AccessKind,
) -> Result<Mapping, WalkFault> {
    walk_tables(mem, Some(s1), None, iova, access)
}

fn t2(
    mem: &GuestMemoryMmap<()>,
    s2: &Stage2Config,
    ipa: u64,
    access: AccessKind,
) -> Result<Mapping, WalkFault> {
    walk_tables(mem, None, Some(s2), ipa, access)
}

/// A stage-1 input address in a `in_bits` range with its top bit and a mixed pattern set.
fn pattern_addr(in_bits: u32) -> u64 {
    (0x5a5a_a5a5_5a5a_a5a5 & ((1 << in_bits) - 1)) | (1 << (in_bits - 1))
}

// --- Geometry -----------------------------------------------------------------------------

#[test]
fn stage1_geometry_follows_the_architecture() {
    let cases = [
        (Granule::G4K, 16, 0, 9),
        (Granule::G4K, 25, 1, 9),
        (Granule::G4K, 30, 1, 4),
        (Granule::G4K, 34, 2, 9),
        (Granule::G4K, 39, 2, 4),
        (Granule::G16K, 16, 0, 1),
        (Granule::G16K, 17, 1, 11),
        (Granule::G16K, 28, 2, 11),
        (Granule::G16K, 29, 2, 10),
        (Granule::G16K, 39, 3, 11),
        (Granule::G64K, 16, 1, 6),
        (Granule::G64K, 21, 1, 1),
        (Granule::G64K, 22, 2, 13),
        (Granule::G64K, 34, 2, 1),
        (Granule::G64K, 35, 3, 13),
        (Granule::G64K, 39, 3, 9),
    ];
    for (granule, tsz, start_level, start_bits) in cases {
        let g = Geometry::stage1(&tt(granule, tsz, 0), 48).unwrap();
        assert_eq!(
            (g.start_level, g.start_bits, g.in_bits),
            (start_level, start_bits, 64 - u32::from(tsz)),
            "{granule:?} tsz {tsz}"
        );
        assert_eq!(start_level, s1_start_level(granule, 64 - u32::from(tsz)));
    }
    for tsz in [0, 12, 15, 40, 48, 64, 255] {
        for granule in [Granule::G4K, Granule::G16K, Granule::G64K] {
            assert!(Geometry::stage1(&tt(granule, tsz, 0), 48).is_none());
        }
    }
}

#[test]
fn stage2_geometry_and_concatenation_follow_the_architecture() {
    let cases = [
        (Granule::G4K, 24, 1, Some((1, 10))), // 2 concatenated level-1 tables
        (Granule::G4K, 25, 1, Some((1, 9))),
        (Granule::G4K, 21, 1, Some((1, 13))), // 16 tables
        (Granule::G4K, 20, 1, None),          // would need 32 tables
        (Granule::G4K, 33, 1, Some((1, 1))),
        (Granule::G4K, 34, 1, None), // level 1 resolves no bit
        (Granule::G4K, 16, 2, Some((0, 9))),
        (Granule::G4K, 25, 2, None),
        (Granule::G4K, 32, 0, Some((2, 11))), // 4 concatenated level-2 tables
        (Granule::G4K, 39, 0, Some((2, 4))),
        (Granule::G4K, 16, 0, None),
        (Granule::G4K, 25, 3, None),
        (Granule::G16K, 16, 2, Some((1, 12))), // 2 concatenated level-1 tables
        (Granule::G16K, 28, 1, Some((2, 11))),
        (Granule::G16K, 39, 0, Some((3, 11))),
        (Granule::G16K, 16, 3, None),
        (Granule::G64K, 18, 1, Some((2, 17))), // 16 concatenated level-2 tables
        (Granule::G64K, 17, 1, None),
        (Granule::G64K, 16, 2, Some((1, 6))),
        (Granule::G64K, 34, 0, Some((3, 14))), // 2 concatenated level-3 tables
        (Granule::G64K, 22, 3, None),
        (Granule::G4K, 15, 2, None),
        (Granule::G4K, 40, 0, None),
    ];
    for (granule, tsz, sl0, expected) in cases {
        let g = Geometry::stage2(&s2_config(granule, tsz, sl0, 0));
        assert_eq!(
            g.map(|g| (g.start_level, g.start_bits)),
            expected,
            "{granule:?} tsz {tsz} sl0 {sl0}"
        );
    }
}

// --- Stage 1 walks ------------------------------------------------------------------------

/// Maps a pattern address of TxSZ `tsz` at `level` and three neighbours (next block in the
/// same table, a block in a sibling table, the previous block) to distinct outputs, and
/// checks each translates to exactly its own output.
fn check_s1_walk(granule: Granule, tsz: u8, level: u32) {
    let m = mem();
    let mut tables = Tables::s1(&m, granule, tsz, 0x10_0000);
    let size_shift = level_shift(granule, level);
    let size = 1u64 << size_shift;
    let iova = pattern_addr(64 - u32::from(tsz)) | 0xabc;
    let sibling = if level > tables.start_level {
        iova ^ (size << (page_shift(granule) - 3))
    } else {
        iova ^ (size << 1)
    };
    // Keep one address per block, all inside the input range.
    let in_mask = (1u64 << (64 - u32::from(tsz))) - 1;
    let mut addrs: Vec<u64> = [iova, iova ^ size, sibling, iova ^ (size << 1) ^ size]
        .iter()
        .map(|addr| addr & in_mask)
        .collect();
    let mut blocks = Vec::new();
    addrs.retain(|addr| {
        let new = !blocks.contains(&(addr >> size_shift));
        blocks.push(addr >> size_shift);
        new
    });
    let outputs: Vec<u64> = (0..4u64)
        .map(|i| (0x4321_0000_0000 + (i << 36)) & ADDR_MASK & !(size - 1))
        .collect();
    for (addr, out) in addrs.iter().zip(&outputs) {
        tables.map(*addr, level, *out, S1_RW);
    }
    let s1 = s1_config(tt(granule, tsz, tables.root), disabled_tt());
    for (addr, out) in addrs.iter().zip(&outputs) {
        let mapping = t1(&m, &s1, *addr, READ)
            .unwrap_or_else(|f| panic!("{granule:?} tsz {tsz} level {level}: {f:?}"));
        assert_eq!(mapping.size_shift, size_shift);
        assert_eq!(mapping.input_base, addr & !(size - 1));
        assert_eq!(mapping.output_base, *out);
        assert_eq!(mapping.output(*addr), out | (addr & (size - 1)));
        assert_eq!(mapping.s2, None);
        assert!(mapping.s1.is_some());
    }
}

#[test]
fn s1_4k_tsz16_four_levels() {
    check_s1_walk(Granule::G4K, 16, 3);
    check_s1_walk(Granule::G4K, 16, 2);
    check_s1_walk(Granule::G4K, 16, 1);
}

#[test]
fn s1_4k_tsz25_starts_at_level1() {
    check_s1_walk(Granule::G4K, 25, 3);
    check_s1_walk(Granule::G4K, 25, 2);
    check_s1_walk(Granule::G4K, 25, 1);
}

#[test]
fn s1_4k_tsz39_starts_at_level2() {
    check_s1_walk(Granule::G4K, 39, 3);
    check_s1_walk(Granule::G4K, 39, 2);
}

#[test]
fn s1_16k_walks() {
    // tsz 16: 4 levels with a 2-entry level-0 table; tsz 17: 3 levels from level 1.
    for tsz in [16, 17, 28, 29] {
        check_s1_walk(Granule::G16K, tsz, 3);
        check_s1_walk(Granule::G16K, tsz, 2);
    }
    check_s1_walk(Granule::G16K, 39, 3);
}

#[test]
fn s1_64k_walks() {
    // tsz 16 and 21: 3 levels from level 1 (64 and 2 entries); tsz 22: 2 levels from a full
    // level-2 table; tsz 34: 2 levels from a 2-entry level-2 table; tsz 39: one level.
    for tsz in [16, 21, 22, 34] {
        check_s1_walk(Granule::G64K, tsz, 3);
        check_s1_walk(Granule::G64K, tsz, 2);
    }
    check_s1_walk(Granule::G64K, 39, 3);
}

#[test]
fn s1_block_sizes() {
    let m = mem();
    let cases = [
        (Granule::G4K, 16, 1, 30),
        (Granule::G4K, 16, 2, 21),
        (Granule::G16K, 17, 2, 25),
        (Granule::G64K, 22, 2, 29),
    ];
    for (i, (granule, tsz, level, shift)) in cases.into_iter().enumerate() {
        let mut tables = Tables::s1(&m, granule, tsz, 0x80_0000 * (i as u64 + 1));
        let iova = 0x12_3456_789a;
        let out = 0x8000_0000_0000;
        tables.map(iova, level, out, S1_RW);
        let s1 = s1_config(tt(granule, tsz, tables.root), disabled_tt());
        let mapping = t1(&m, &s1, iova, READ).unwrap();
        assert_eq!(mapping.size_shift, shift);
        assert_eq!(mapping.output(iova), out | (iova & ((1 << shift) - 1)));
    }
}

#[test]
fn blocks_where_the_architecture_has_none_are_invalid() {
    // 4K level 0, 16K level 1, 64K level 1.
    let cases = [
        (Granule::G4K, 16, 0),
        (Granule::G16K, 17, 1),
        (Granule::G64K, 16, 1),
    ];
    for (granule, tsz, level) in cases {
        let m = mem();
        let mut tables = Tables::s1(&m, granule, tsz, 0x100_0000);
        let iova = 0x1000_0000;
        tables.set_desc(iova, level, PTE_AF | PTE_TYPE_BLOCK);
        let s1 = s1_config(tt(granule, tsz, tables.root), disabled_tt());
        assert_eq!(
            t1(&m, &s1, iova, PROBE),
            Err(s1_fault(FaultKind::Translation))
        );
    }
}

#[test]
fn invalid_and_reserved_descriptors_fault() {
    let m = mem();
    let mut tables = Tables::s1(&m, Granule::G4K, 25, 0x10_0000);
    let s1 = s1_config(tt(Granule::G4K, 25, tables.root), disabled_tt());
    let iova = 0x4000_1000;
    // Nothing mapped at all.
    assert_eq!(
        t1(&m, &s1, iova, READ),
        Err(s1_fault(FaultKind::Translation))
    );
    // 0b01 at level 3 is reserved.
    tables.set_desc(iova, 3, 0x5000 | PTE_AF | PTE_TYPE_BLOCK);
    assert_eq!(
        t1(&m, &s1, iova, READ),
        Err(s1_fault(FaultKind::Translation))
    );
    // Valid bit clear, everything else set.
    tables.set_desc(iova, 3, 0x5000 | S1_RW | 0b10);
    assert_eq!(
        t1(&m, &s1, iova, READ),
        Err(s1_fault(FaultKind::Translation))
    );
    tables.set_desc(iova, 3, 0x5000 | S1_RW | PTE_TYPE_PAGE);
    assert_eq!(t1(&m, &s1, iova, READ).unwrap().output_base, 0x5000);
}

#[test]
fn high_descriptor_and_table_bits_are_not_address_bits() {
    let m = mem();
    let mut tables = Tables::s1(&m, Granule::G4K, 25, 0x10_0000);
    let iova = 0x4000_1000;
    // Upper attributes and bits [51:48] around the output address: ignored.
    tables.map(
        iova,
        3,
        0xabcd_e000,
        S1_RW | (0xf << 48) | (1 << 58) | (1 << 63),
    );
    // Ignored and hierarchical bits in the table descriptors do not move the next table.
    tables.set_table_bits(iova, 1, (0xf << 48) | (1 << 58) | (1 << 63));
    let s1 = s1_config(tt(Granule::G4K, 25, tables.root), disabled_tt());
    let mapping = t1(&m, &s1, iova, READ).unwrap();
    assert_eq!(mapping.output_base, 0xabcd_e000);
    // A 64K page's bits [15:12] are not address bits without FEAT_LPA.
    let mut tables = Tables::s1(&m, Granule::G64K, 22, 0x100_0000);
    tables.map(iova, 3, 0x7_0000, S1_RW | 0xf000);
    let s1 = s1_config(tt(Granule::G64K, 22, tables.root), disabled_tt());
    assert_eq!(t1(&m, &s1, iova, READ).unwrap().output_base, 0x7_0000);
}

// --- Table selection, TBI, EPD ------------------------------------------------------------

const IOVA0: u64 = 0x0000_0012_3456_7000;
const IOVA1: u64 = 0xffff_ff92_3456_7000;
const OUT0: u64 = 0x0000_0aaa_0000_0000;
const OUT1: u64 = 0x0000_0bbb_0000_0000;

/// TTB0 and TTB1 (4K, TxSZ 25) with IOVA0 → OUT0 and IOVA1 → OUT1.
fn two_ranges(m: &GuestMemoryMmap<()>) -> Stage1Config {
    let mut tables0 = Tables::s1(m, Granule::G4K, 25, 0x10_0000);
    let mut tables1 = Tables::s1(m, Granule::G4K, 25, 0x80_0000);
    tables0.map(IOVA0, 3, OUT0, S1_RW);
    // Both addresses have the same table indexes: only the table tells them apart.
    tables1.map(IOVA1, 3, OUT1, S1_RW);
    s1_config(
        tt(Granule::G4K, 25, tables0.root),
        tt(Granule::G4K, 25, tables1.root),
    )
}

#[test]
fn address_bit_55_selects_ttb0_or_ttb1() {
    let m = mem();
    let s1 = two_ranges(&m);
    let m0 = t1(&m, &s1, IOVA0 | 0x123, READ).unwrap();
    assert_eq!(
        (m0.input_base, m0.output(IOVA0 | 0x123)),
        (IOVA0, OUT0 | 0x123)
    );
    let m1 = t1(&m, &s1, IOVA1 | 0x123, READ).unwrap();
    assert_eq!(
        (m1.input_base, m1.output(IOVA1 | 0x123)),
        (IOVA1, OUT1 | 0x123)
    );
}

#[test]
fn addresses_outside_both_ranges_fault() {
    let m = mem();
    let s1 = two_ranges(&m);
    for iova in [
        1 << 39,               // TTB0 range is 39 bits
        0x0000_8000_0000_0000, // bit 47
        0x0080_0000_0000_0000, // bit 55 alone: TTB1 range needs [63:39] all ones
        0xffff_ff00_0000_0000 ^ (1 << 40),
        0x5a00_0012_3456_7000, // a tag without TBI
        IOVA1 ^ (1 << 63),
    ] {
        assert_eq!(
            t1(&m, &s1, iova, READ),
            Err(s1_fault(FaultKind::Translation)),
            "{iova:#x}"
        );
    }
}

#[test]
fn tbi0_applies_to_the_ttb0_range_only() {
    let m = mem();
    let mut s1 = two_ranges(&m);
    let tagged0 = IOVA0 | (0x5a << 56);
    let tagged1 = (IOVA1 & !(0xff << 56)) | (0x5a << 56);
    s1.tbi = [true, false];
    let mapping = t1(&m, &s1, tagged0 | 0x10, READ).unwrap();
    assert_eq!(mapping.input_base, IOVA0, "tag cleared in input_base");
    assert_eq!(mapping.output(tagged0 | 0x10), OUT0 | 0x10);
    // TBI1 is clear: the tagged TTB1 address is out of range (QEMU's TBI1 bug accepts it).
    assert_eq!(
        t1(&m, &s1, tagged1, READ),
        Err(s1_fault(FaultKind::Translation))
    );
    // Untagged TTB1 addresses still translate, and keep their top byte.
    assert_eq!(t1(&m, &s1, IOVA1, READ).unwrap().input_base, IOVA1);
}

#[test]
fn tbi1_applies_to_the_ttb1_range_only() {
    let m = mem();
    let mut s1 = two_ranges(&m);
    let tagged0 = IOVA0 | (0x5a << 56);
    let tagged1 = (IOVA1 & !(0xff << 56)) | (0x5a << 56);
    s1.tbi = [false, true];
    // QEMU's TBI1 bug (TBI1 read as TBI0) would fault here.
    let mapping = t1(&m, &s1, tagged1 | 0x10, READ).unwrap();
    assert_eq!(
        mapping.input_base, 0x00ff_ff92_3456_7000,
        "top byte cleared"
    );
    assert_eq!(mapping.output(tagged1 | 0x10), OUT1 | 0x10);
    // With TBI1 the untagged address also loses its top byte in input_base.
    assert_eq!(
        t1(&m, &s1, IOVA1, READ).unwrap().input_base,
        0x00ff_ff92_3456_7000
    );
    assert_eq!(
        t1(&m, &s1, tagged0, READ),
        Err(s1_fault(FaultKind::Translation))
    );
    // Still the range check below the top byte.
    assert_eq!(
        t1(&m, &s1, tagged1 ^ (1 << 50), READ),
        Err(s1_fault(FaultKind::Translation))
    );
    s1.tbi = [false, false];
    assert_eq!(
        t1(&m, &s1, tagged1, READ),
        Err(s1_fault(FaultKind::Translation))
    );
    s1.tbi = [true, true];
    assert_eq!(t1(&m, &s1, tagged0, READ).unwrap().output_base, OUT0);
    assert_eq!(t1(&m, &s1, tagged1, READ).unwrap().output_base, OUT1);
}

#[test]
fn epd_disables_one_range() {
    let m = mem();
    let mut s1 = two_ranges(&m);
    s1.tt[0].epd = true;
    assert_eq!(
        t1(&m, &s1, IOVA0, READ),
        Err(s1_fault(FaultKind::Translation))
    );
    assert_eq!(t1(&m, &s1, IOVA1, READ).unwrap().output_base, OUT1);
    s1.tt[0].epd = false;
    s1.tt[1].epd = true;
    assert_eq!(t1(&m, &s1, IOVA0, READ).unwrap().output_base, OUT0);
    assert_eq!(
        t1(&m, &s1, IOVA1, READ),
        Err(s1_fault(FaultKind::Translation))
    );
}

#[test]
fn each_range_uses_its_own_granule_and_size() {
    let m = mem();
    let mut tables0 = Tables::s1(&m, Granule::G64K, 22, 0x10_0000);
    let mut tables1 = Tables::s1(&m, Granule::G16K, 30, 0x100_0000);
    let iova0 = 0x2_1234_5678;
    let iova1 = 0xffff_fffc_1234_5678; // T1SZ 30: bits [63:34] ones
    tables0.map(iova0, 3, 0x10_0000_0000, S1_RW);
    tables1.map(iova1, 3, 0x20_0000_0000, S1_RW);
    let s1 = s1_config(
        tt(Granule::G64K, 22, tables0.root),
        tt(Granule::G16K, 30, tables1.root),
    );
    let m0 = t1(&m, &s1, iova0, READ).unwrap();
    assert_eq!((m0.size_shift, m0.output(iova0)), (16, 0x10_0000_5678));
    let m1 = t1(&m, &s1, iova1, READ).unwrap();
    assert_eq!((m1.size_shift, m1.output(iova1)), (14, 0x20_0000_1678));
    // 0xffff_fff8_... is below the 34-bit TTB1 range.
    assert_eq!(
        t1(&m, &s1, 0xffff_fff8_1234_5678, READ),
        Err(s1_fault(FaultKind::Translation))
    );
}

// --- Stage-1 attributes -------------------------------------------------------------------

/// One 4K page at 0x4000_0000 with leaf attributes `attrs`; returns the config.
fn one_page(m: &GuestMemoryMmap<()>, attrs: u64) -> (Stage1Config, Tables<'_>) {
    let mut tables = Tables::s1(m, Granule::G4K, 25, 0x10_0000);
    tables.map(0x4000_0000, 3, 0x9000_0000, attrs);
    (
        s1_config(tt(Granule::G4K, 25, tables.root), disabled_tt()),
        tables,
    )
}

/// `translate` refuses exactly the accesses `Mapping::refuses` names, as stage `stage2`.
fn assert_refusals(m: &GuestMemoryMmap<()>, s1: &Stage1Config, allowed: &[(AccessKind, bool)]) {
    let mapping = t1(m, s1, 0x4000_0000, PROBE).unwrap();
    for &(access, ok) in allowed {
        let result = t1(m, s1, 0x4000_0000, access);
        if ok {
            assert_eq!(result, Ok(mapping), "{access:?}");
            assert_eq!(mapping.refuses(access), None, "{access:?}");
        } else {
            assert_eq!(result, Err(s1_fault(FaultKind::Permission)), "{access:?}");
            assert_eq!(mapping.refuses(access), Some(false), "{access:?}");
        }
    }
}

#[test]
fn access_flag_and_affd() {
    let m = mem();
    let (mut s1, _tables) = one_page(&m, S1_RW & !PTE_AF);
    assert_eq!(
        t1(&m, &s1, 0x4000_0000, READ),
        Err(s1_fault(FaultKind::Access))
    );
    // Access faults come before permission checks and apply to probes too.
    assert_eq!(
        t1(&m, &s1, 0x4000_0000, PROBE),
        Err(s1_fault(FaultKind::Access))
    );
    s1.affd = true;
    assert_eq!(
        t1(&m, &s1, 0x4000_0000, WRITE).unwrap().output_base,
        0x9000_0000
    );
}

#[test]
fn ap_bits_give_priv_and_unpriv_read_write() {
    // (AP[2:1], priv read, priv write, user read, user write)
    let table = [
        (0b00, true, true, false, false),
        (0b01, true, true, true, true),
        (0b10, true, false, false, false),
        (0b11, true, false, true, false),
    ];
    for (ap, pr, pw, ur, uw) in table {
        let m = mem();
        let (s1, _tables) = one_page(&m, PTE_AF | (ap << 6));
        assert_refusals(
            &m,
            &s1,
            &[
                (PRIV_READ, pr),
                (PRIV_WRITE, pw),
                (READ, ur),
                (WRITE, uw),
                (access(true, true, false, true), pr && pw),
                (access(true, true, false, false), ur && uw),
                (PROBE, true),
            ],
        );
    }
}

#[test]
fn execute_never_bits() {
    let m = mem();
    let (s1, _tables) = one_page(&m, PTE_AF | PTE_AP_UNPRIV | PTE_AP_RDONLY | PTE_XN);
    assert_refusals(&m, &s1, &[(EXEC, false), (PRIV_EXEC, true), (READ, true)]);
    let m = mem();
    let (s1, _tables) = one_page(&m, PTE_AF | PTE_AP_UNPRIV | PTE_AP_RDONLY | PTE_PXN);
    assert_refusals(&m, &s1, &[(EXEC, true), (PRIV_EXEC, false)]);
    // Writable by unprivileged accesses: never executable by privileged ones.
    let m = mem();
    let (s1, _tables) = one_page(&m, PTE_AF | PTE_AP_UNPRIV);
    assert_refusals(&m, &s1, &[(EXEC, true), (PRIV_EXEC, false)]);
    let m = mem();
    let (s1, _tables) = one_page(&m, PTE_AF);
    assert_refusals(&m, &s1, &[(EXEC, true), (PRIV_EXEC, true), (READ, false)]);
}

#[test]
fn hierarchical_attributes_and_had() {
    let cases: [(u64, &[(AccessKind, bool)]); 4] = [
        (
            PTE_APTABLE_NO_EL0,
            &[
                (READ, false),
                (WRITE, false),
                (PRIV_READ, true),
                (PRIV_WRITE, true),
            ],
        ),
        (
            PTE_APTABLE_RDONLY,
            &[
                (READ, true),
                (WRITE, false),
                (PRIV_WRITE, false),
                (PRIV_READ, true),
            ],
        ),
        (
            PTE_UXNTABLE,
            &[(EXEC, false), (PRIV_EXEC, false), (READ, true)],
        ),
        // A read-only table makes the page no longer user-writable: privileged exec is
        // allowed unless PXNTable.
        (PTE_PXNTABLE, &[(PRIV_EXEC, false), (EXEC, true)]),
    ];
    for (bits, allowed) in cases {
        for level in [1, 2] {
            let m = mem();
            let (mut s1, mut tables) = one_page(&m, S1_RW);
            tables.set_table_bits(0x4000_0000, level, bits);
            assert_refusals(&m, &s1, allowed);
            // HAD: the same tables allow everything again (user-writable: no priv exec).
            s1.tt[0].had = true;
            let everything = [
                (READ, true),
                (WRITE, true),
                (EXEC, true),
                (PRIV_WRITE, true),
            ];
            assert_refusals(&m, &s1, &everything);
        }
    }
    // APTable read-only removes unprivileged write, so privileged exec comes back.
    let m = mem();
    let (s1, mut tables) = one_page(&m, S1_RW);
    assert_refusals(&m, &s1, &[(PRIV_EXEC, false)]);
    tables.set_table_bits(0x4000_0000, 2, PTE_APTABLE_RDONLY);
    assert_refusals(&m, &s1, &[(PRIV_EXEC, true)]);
}

// --- Address sizes, external aborts, loops ------------------------------------------------

#[test]
fn stage1_output_beyond_oas_is_an_address_size_fault() {
    let m = mem();
    let mut tables = Tables::s1(&m, Granule::G4K, 25, 0x10_0000);
    tables.map(0x4000_0000, 3, 1 << 40, S1_RW);
    tables.map(0x4000_1000, 3, (1 << 40) - 0x1000, S1_RW);
    tables.map(0x8000_0000, 1, 1 << 40, S1_RW); // 1 GiB block
    let mut s1 = s1_config(tt(Granule::G4K, 25, tables.root), disabled_tt());
    s1.oas_bits = 40;
    let size_fault = Err(s1_fault(FaultKind::AddrSize));
    assert_eq!(t1(&m, &s1, 0x4000_0000, PROBE), size_fault);
    assert_eq!(t1(&m, &s1, 0x8000_0000, PROBE), size_fault);
    assert_eq!(
        t1(&m, &s1, 0x4000_1000, READ).unwrap().output_base,
        (1 << 40) - 0x1000
    );
    s1.oas_bits = 41;
    assert_eq!(t1(&m, &s1, 0x4000_0000, READ).unwrap().output_base, 1 << 40);
    // oas_bits beyond 48 act as 48, and 0 refuses every non-zero address.
    s1.oas_bits = 255;
    assert!(t1(&m, &s1, 0x4000_0000, READ).is_ok());
    s1.oas_bits = 0;
    assert_eq!(t1(&m, &s1, 0x4000_0000, READ), size_fault);
}

#[test]
fn stage1_table_addresses_beyond_oas_are_address_size_faults() {
    let m = mem();
    let mut tables = Tables::s1(&m, Granule::G4K, 25, 0x10_0000);
    tables.map(0x4000_0000, 3, 0x1000, S1_RW);
    let mut s1 = s1_config(tt(Granule::G4K, 25, tables.root), disabled_tt());
    s1.oas_bits = 40;
    // A next-level table at 2^40.
    tables.set_desc(0x4000_0000, 2, (1 << 40) | PTE_TYPE_TABLE);
    assert_eq!(
        t1(&m, &s1, 0x4000_0000, READ),
        Err(s1_fault(FaultKind::AddrSize))
    );
    // The TTB itself.
    let s1 = Stage1Config {
        tt: [tt(Granule::G4K, 25, 1 << 40), disabled_tt()],
        ..s1
    };
    assert_eq!(
        t1(&m, &s1, 0x4000_0000, READ),
        Err(s1_fault(FaultKind::AddrSize))
    );
}

#[test]
fn descriptor_fetch_outside_guest_memory_is_walk_eabt() {
    let m = mem();
    let iova = pattern_addr(48);
    let ttb = 0x1_0000_0000; // 4 GiB: no memory there
    let s1 = s1_config(tt(Granule::G4K, 16, ttb), disabled_tt());
    let l0_index = (iova >> 39) & 0x1ff;
    assert_eq!(
        t1(&m, &s1, iova, READ),
        Err(WalkFault {
            fetch_addr: ttb + 8 * l0_index,
            ..s1_fault(FaultKind::WalkEabt)
        })
    );
    // A next-level table outside memory.
    let mut tables = Tables::s1(&m, Granule::G4K, 16, 0x10_0000);
    tables.set_desc(iova, 0, 0x2_0000_0000 | PTE_TYPE_TABLE);
    let s1 = s1_config(tt(Granule::G4K, 16, tables.root), disabled_tt());
    let l1_index = (iova >> 30) & 0x1ff;
    assert_eq!(
        t1(&m, &s1, iova, READ),
        Err(WalkFault {
            fetch_addr: 0x2_0000_0000 + 8 * l1_index,
            ..s1_fault(FaultKind::WalkEabt)
        })
    );
}

#[test]
fn self_referencing_tables_terminate() {
    let m = mem();
    let root = 0x10_0000;
    let s1 = s1_config(tt(Granule::G4K, 16, root), disabled_tt());
    // Entry 0 of the only table points to the table itself: iova 0 goes round four times
    // and ends with the table read as a page.
    m.write_obj(root | PTE_AF | PTE_TYPE_TABLE, GuestAddress(root))
        .unwrap();
    let mapping = t1(&m, &s1, 0x123, PROBE).unwrap();
    assert_eq!((mapping.output_base, mapping.size_shift), (root, 12));
    // Without AF the last round is an access fault.
    m.write_obj(root | PTE_TYPE_TABLE, GuestAddress(root))
        .unwrap();
    assert_eq!(t1(&m, &s1, 0x123, PROBE), Err(s1_fault(FaultKind::Access)));
    // Stage 2 and nested, with the same loop.
    let s2 = s2_config(Granule::G4K, 16, 2, root);
    let mapping = t2(&m, &s2, 0x456, PROBE);
    assert_eq!(
        mapping,
        Err(s2_fault(FaultKind::Access, FaultClass::In, 0x456))
    );
    m.write_obj(root | PTE_AF | PTE_TYPE_TABLE, GuestAddress(root))
        .unwrap();
    assert_eq!(t2(&m, &s2, 0x456, PROBE).unwrap().output_base, root);
    // Nested: stage 2 needs read permission for stage 1's table, and entry 0x100 of the
    // same table maps IPA `root` for stage 2's last level.
    let desc = root | PTE_AF | PTE_S2AP_READ | PTE_TYPE_TABLE;
    m.write_obj(desc, GuestAddress(root)).unwrap();
    m.write_obj(desc, GuestAddress(root + 8 * 0x100)).unwrap();
    let nested = walk_tables(&m, Some(&s1), Some(&s2), 0x789, PROBE).unwrap();
    assert_eq!((nested.output_base, nested.size_shift), (root, 12));
}

#[test]
fn ttb_bits_below_the_start_table_alignment_are_ignored() {
    let m = mem();
    // A full 4K start-level table is 4K-aligned.
    let mut tables = Tables::s1(&m, Granule::G4K, 25, 0x10_0000);
    tables.map(0x4000_0000, 3, 0x9000_0000, S1_RW);
    let s1 = s1_config(tt(Granule::G4K, 25, tables.root | 0xff0), disabled_tt());
    assert_eq!(
        t1(&m, &s1, 0x4000_0000, READ).unwrap().output_base,
        0x9000_0000
    );
    // A 2-entry 64K start-level table (16 bytes) is 64-byte aligned.
    let mut tables = Tables::s1(&m, Granule::G64K, 34, 0x100_0000);
    tables.map(0x2000_0000, 3, 0xa000_0000, S1_RW);
    let s1 = s1_config(tt(Granule::G64K, 34, tables.root | 0x30), disabled_tt());
    assert_eq!(
        t1(&m, &s1, 0x2000_0000, READ).unwrap().output_base,
        0xa000_0000
    );
    // 16 concatenated 64K stage-2 tables are aligned to their 1 MiB.
    let mut tables = Tables::new(&m, Granule::G64K, 46, 2, 0x200_0000);
    tables.map(0x2000_0001_0000, 3, 0xb000_0000, S2_RW);
    let s2 = s2_config(Granule::G64K, 18, 1, tables.root | 0xf_fff0);
    assert_eq!(
        t2(&m, &s2, 0x2000_0001_0000, READ).unwrap().output_base,
        0xb000_0000
    );
}

// --- Stage 2 alone ------------------------------------------------------------------------

/// Maps `ipas` at `level` through a stage-2 config and checks each translates exactly.
fn check_s2_walk(granule: Granule, tsz: u8, sl0: u8, level: u32, ipas: &[u64]) {
    let m = mem();
    let geometry = Geometry::stage2(&s2_config(granule, tsz, sl0, 0)).unwrap();
    let in_bits = 64 - u32::from(tsz);
    let mut tables = Tables::new(&m, granule, in_bits, geometry.start_level, 0x10_0000);
    let size_shift = level_shift(granule, level);
    let size = 1u64 << size_shift;
    let outputs: Vec<u64> = (0..ipas.len() as u64)
        .map(|i| (0x4321_0000_0000 + (i << 36)) & !(size - 1))
        .collect();
    for (ipa, out) in ipas.iter().zip(&outputs) {
        tables.map(*ipa, level, *out, S2_RW);
    }
    let s2 = s2_config(granule, tsz, sl0, tables.root);
    for (ipa, out) in ipas.iter().zip(&outputs) {
        let mapping = t2(&m, &s2, *ipa, READ).unwrap_or_else(|f| {
            panic!("{granule:?} tsz {tsz} sl0 {sl0} level {level} {ipa:#x}: {f:?}")
        });
        assert_eq!(mapping.size_shift, size_shift);
        assert_eq!(mapping.input_base, ipa & !(size - 1));
        assert_eq!(mapping.output(*ipa), out | (ipa & (size - 1)));
        assert_eq!(mapping.s1, None);
        assert!(mapping.s2.is_some());
    }
}

#[test]
fn s2_4k_concatenated_level1_tables() {
    // S2T0SZ 24 (40-bit IPA), SL0 1: two concatenated level-1 tables, bit 39 picks one.
    let ipas = [
        0x12_3456_7abc,
        0x92_3456_7abc,
        0x92_3456_8abc,
        0xff_ffff_fabc,
    ];
    check_s2_walk(Granule::G4K, 24, 1, 3, &ipas);
    check_s2_walk(Granule::G4K, 24, 1, 2, &ipas[..2]);
    check_s2_walk(Granule::G4K, 24, 1, 1, &ipas[..2]);
    // S2T0SZ 21, SL0 1: 16 concatenated level-1 tables for a 43-bit IPA.
    check_s2_walk(Granule::G4K, 21, 1, 3, &[0x7ff_1234_5000, 0x400_0000_0000]);
}

#[test]
fn s2_4k_other_start_levels() {
    check_s2_walk(Granule::G4K, 16, 2, 3, &[0xfedc_ba98_7000, 0x1000]);
    check_s2_walk(Granule::G4K, 25, 1, 3, &[0x7f_ffff_f000, 0x40_0000_0000]);
    // 32-bit IPA from level 2: 4 concatenated level-2 tables (11 bits).
    check_s2_walk(
        Granule::G4K,
        32,
        0,
        3,
        &[0xffff_f000, 0x8000_0000, 0x4020_1000],
    );
    check_s2_walk(Granule::G4K, 32, 0, 2, &[0xffe0_0000, 0x8000_0000]);
}

#[test]
fn s2_16k_walks() {
    check_s2_walk(
        Granule::G16K,
        16,
        2,
        3,
        &[0xffff_ffff_c000, 0x8000_0000_0000, 0x4000],
    );
    check_s2_walk(
        Granule::G16K,
        16,
        2,
        2,
        &[0xffff_fe00_0000, 0x8000_0000_0000],
    );
    check_s2_walk(Granule::G16K, 28, 1, 3, &[0xf_ffff_c000, 0x8_0000_4000]);
    check_s2_walk(Granule::G16K, 39, 0, 3, &[0x1ff_c000, 0x100_0000]);
}

#[test]
fn s2_64k_walks() {
    // 16 concatenated level-2 tables for a 46-bit IPA.
    check_s2_walk(
        Granule::G64K,
        18,
        1,
        3,
        &[0x3fff_ffff_0000, 0x2000_0001_0000, 0x1_0000],
    );
    check_s2_walk(
        Granule::G64K,
        18,
        1,
        2,
        &[0x3fff_e000_0000, 0x2000_0000_0000],
    );
    check_s2_walk(Granule::G64K, 16, 2, 3, &[0xffff_ffff_0000, 0x4_0000_0000]);
    // Level-3 start with 2 concatenated tables for a 30-bit IPA.
    check_s2_walk(
        Granule::G64K,
        34,
        0,
        3,
        &[0x3fff_0000, 0x2000_0000, 0x1fff_0000],
    );
}

#[test]
fn s2_invalid_configurations_fault_in_stage2() {
    let m = mem();
    let cases = [
        (Granule::G4K, 20, 1), // 32 tables
        (Granule::G4K, 25, 2), // level 0 resolves nothing
        (Granule::G4K, 25, 3),
        (Granule::G16K, 16, 3),
        (Granule::G64K, 22, 3),
        (Granule::G64K, 17, 1),
        (Granule::G4K, 15, 2),
        (Granule::G4K, 40, 0),
        (Granule::G4K, 255, 255),
    ];
    for (granule, tsz, sl0) in cases {
        let s2 = s2_config(granule, tsz, sl0, 0x10_0000);
        assert_eq!(
            t2(&m, &s2, 0x1234, READ),
            Err(s2_fault(FaultKind::Translation, FaultClass::In, 0x1234)),
            "{granule:?} tsz {tsz} sl0 {sl0}"
        );
    }
}

#[test]
fn s2_input_beyond_s2t0sz_is_a_stage2_translation_fault() {
    let m = mem();
    let mut tables = Tables::new(&m, Granule::G4K, 39, 1, 0x10_0000);
    tables.map(0, 3, 0x5000, S2_RW);
    let s2 = s2_config(Granule::G4K, 25, 1, tables.root);
    assert!(t2(&m, &s2, 0x7f_ffff_ffff, PROBE).is_err());
    assert_eq!(t2(&m, &s2, 0x10, READ).unwrap().output(0x10), 0x5010);
    for ipa in [1 << 39, (1 << 39) | 0x10, u64::MAX] {
        assert_eq!(
            t2(&m, &s2, ipa, READ),
            Err(s2_fault(FaultKind::Translation, FaultClass::In, ipa))
        );
    }
}

/// Stage-2 XN\[1:0\] with SMMU_IDR3.XNX (Arm ARM, FEAT_XNX: 0b00 executable at EL1 and
/// EL0, 0b01 not at EL1, 0b10 at neither, 0b11 not at EL0), and without it, where bit 53
/// is ignored and bit 54 forbids execution at both. A privileged transaction is EL1's.
#[test]
fn s2_execute_never_with_and_without_xnx() {
    let m = mem();
    let mut tables = Tables::new(&m, Granule::G4K, 39, 1, 0x10_0000);
    let base = PTE_AF | s2_memattr(0xf) | PTE_S2AP_READ;
    for xn in 0..4u64 {
        tables.map(
            0x1000 * (xn + 1),
            3,
            0x11000 + 0x1000 * xn,
            base | (xn << 53),
        );
    }
    // (XN[1:0], privileged exec allowed, unprivileged exec allowed)
    let with_xnx = [
        (0, true, true),
        (1, false, true),
        (2, false, false),
        (3, true, false),
    ];
    let without = [
        (0, true, true),
        (1, true, true),
        (2, false, false),
        (3, false, false),
    ];
    for (xnx, table) in [(true, with_xnx), (false, without)] {
        let s2 = Stage2Config {
            xnx,
            ..s2_config(Granule::G4K, 25, 1, tables.root)
        };
        for (xn, exec_priv, exec_user) in table {
            let ipa = 0x1000 * (xn + 1) + 0x40;
            for (privileged, allowed) in [(true, exec_priv), (false, exec_user)] {
                let access = AccessKind { privileged, ..EXEC };
                assert_eq!(
                    t2(&m, &s2, ipa, access).is_ok(),
                    allowed,
                    "XNX {xnx}, XN {xn:#b}, privileged {privileged}"
                );
            }
            assert!(t2(&m, &s2, ipa, READ).is_ok(), "reads are not execution");
        }
    }
}

#[test]
fn s2_permissions_xn_and_access_flag() {
    let m = mem();
    let mut tables = Tables::new(&m, Granule::G4K, 39, 1, 0x10_0000);
    let base = PTE_AF | s2_memattr(0xf);
    tables.map(0x1000, 3, 0x11000, base | PTE_S2AP_READ);
    tables.map(0x2000, 3, 0x12000, base | PTE_S2AP_WRITE);
    tables.map(0x3000, 3, 0x13000, base | PTE_S2AP_READ | PTE_XN);
    tables.map(0x4000, 3, 0x14000, (S2_RW & !PTE_AF) | PTE_XN);
    let mut s2 = s2_config(Granule::G4K, 25, 1, tables.root);
    let perm = |ipa| Err(s2_fault(FaultKind::Permission, FaultClass::In, ipa));
    for privileged in [false, true] {
        let acc = |a: AccessKind| AccessKind { privileged, ..a };
        assert!(t2(&m, &s2, 0x1008, acc(READ)).is_ok());
        assert_eq!(t2(&m, &s2, 0x1008, acc(WRITE)), perm(0x1008));
        assert!(t2(&m, &s2, 0x1008, acc(EXEC)).is_ok());
        assert_eq!(t2(&m, &s2, 0x2010, acc(READ)), perm(0x2010));
        assert!(t2(&m, &s2, 0x2010, acc(WRITE)).is_ok());
        assert_eq!(t2(&m, &s2, 0x3018, acc(EXEC)), perm(0x3018));
        assert!(t2(&m, &s2, 0x3018, acc(READ)).is_ok());
    }
    let mapping = t2(&m, &s2, 0x2000, PROBE).unwrap();
    assert_eq!(mapping.refuses(READ), Some(true));
    assert_eq!(mapping.refuses(WRITE), None);
    assert_eq!(
        t2(&m, &s2, 0x4000, PROBE),
        Err(s2_fault(FaultKind::Access, FaultClass::In, 0x4000))
    );
    s2.affd = true;
    assert_eq!(t2(&m, &s2, 0x4000, READ).unwrap().output_base, 0x14000);
}

#[test]
fn s2_output_and_tables_beyond_ps_are_address_size_faults() {
    let m = mem();
    let mut tables = Tables::new(&m, Granule::G4K, 39, 1, 0x10_0000);
    tables.map(0x1000, 3, 1 << 40, S2_RW);
    tables.map(0x2000, 3, (1 << 40) - 0x1000, S2_RW);
    tables.map(0x40_0000, 2, 1 << 40, S2_RW);
    tables.set_desc(0x4000_0000, 1, (1 << 45) | PTE_TYPE_TABLE);
    let mut s2 = s2_config(Granule::G4K, 25, 1, tables.root);
    s2.ps_bits = 40;
    let size = |ipa| Err(s2_fault(FaultKind::AddrSize, FaultClass::In, ipa));
    assert_eq!(t2(&m, &s2, 0x1234, READ), size(0x1234));
    assert_eq!(t2(&m, &s2, 0x40_1234, READ), size(0x40_1234));
    assert_eq!(t2(&m, &s2, 0x4000_0000, READ), size(0x4000_0000));
    assert!(t2(&m, &s2, 0x2234, READ).is_ok());
    s2.ps_bits = 44;
    assert_eq!(
        t2(&m, &s2, 0x1234, READ).unwrap().output(0x1234),
        (1 << 40) | 0x234
    );
    assert_eq!(t2(&m, &s2, 0x4000_0000, READ), size(0x4000_0000));
    s2.ttb = 1 << 44;
    assert_eq!(t2(&m, &s2, 0x1234, READ), size(0x1234));
}

#[test]
fn s2_fetch_outside_guest_memory_is_a_stage2_walk_eabt() {
    let m = mem();
    let ttb = 0x1_0000_0000;
    let s2 = s2_config(Granule::G4K, 24, 1, ttb);
    let ipa = 0x92_3456_7000; // bit 39 set: second concatenated table
    let index = ipa >> 30; // 10 bits
    assert_eq!(
        t2(&m, &s2, ipa, READ),
        Err(WalkFault {
            fetch_addr: ttb + 8 * index,
            ..s2_fault(FaultKind::WalkEabt, FaultClass::In, ipa)
        })
    );
    // walk_stage2 reports the caller's class, e.g. for a CD fetch.
    assert_eq!(
        walk_stage2(&m, &s2, ipa, READ, FaultClass::Cd),
        Err(WalkFault {
            fetch_addr: ttb + 8 * index,
            ..s2_fault(FaultKind::WalkEabt, FaultClass::Cd, ipa)
        })
    );
}

// --- Nested -------------------------------------------------------------------------------

/// Where stage 1's tables live: IPA S1_TABLES_IPA.., at PA S1_TABLES_PA.. through stage 2.
const S1_TABLES_IPA: u64 = 0x80_4000_0000;
const S1_TABLES_PA: u64 = 0x200_0000;
const S1_TABLE_PAGES: u64 = 32;

struct Nested<'m> {
    s1_tables: Tables<'m>,
    s2_tables: Tables<'m>,
}

impl<'m> Nested<'m> {
    /// Stage 1: 4K, TxSZ 25, tables at IPA S1_TABLES_IPA. Stage 2: 4K, S2T0SZ 24, SL0 1
    /// (two concatenated level-1 tables) mapping the stage-1 table pages.
    fn new(m: &'m GuestMemoryMmap<()>) -> Self {
        let s1_tables = Tables::new_at(
            m,
            Granule::G4K,
            39,
            1,
            S1_TABLES_IPA,
            S1_TABLES_PA.wrapping_sub(S1_TABLES_IPA),
        );
        let mut s2_tables = Tables::new(m, Granule::G4K, 40, 1, 0x10_0000);
        for page in 0..S1_TABLE_PAGES {
            let offset = page << 12;
            s2_tables.map(S1_TABLES_IPA + offset, 3, S1_TABLES_PA + offset, S2_RW);
        }
        Nested {
            s1_tables,
            s2_tables,
        }
    }

    fn s1(&self) -> Stage1Config {
        s1_config(tt(Granule::G4K, 25, self.s1_tables.root), disabled_tt())
    }

    fn s2(&self) -> Stage2Config {
        s2_config(Granule::G4K, 24, 1, self.s2_tables.root)
    }

    fn translate(&self, iova: u64, access: AccessKind) -> Result<Mapping, WalkFault> {
        walk_tables(
            self.s1_tables.mem,
            Some(&self.s1()),
            Some(&self.s2()),
            iova,
            access,
        )
    }
}

/// io-pgtable-arm sets nG on every stage-1 mapping of an ASID-tagged domain; a leaf
/// without it is global and matches every ASID.
#[test]
fn global_follows_the_leaf_ng_bit() {
    let m = mem();
    let mut t = Tables::s1(&m, Granule::G4K, 16, 0x10_0000);
    t.map(0x4000_0000, 3, 0x8000_0000, S1_RW | (1 << 11));
    t.map(0x4000_1000, 3, 0x8000_1000, S1_RW);
    let s1 = s1_config(tt(Granule::G4K, 16, t.root), disabled_tt());
    assert!(!t1(&m, &s1, 0x4000_0000, READ).unwrap().global);
    assert!(t1(&m, &s1, 0x4000_1000, READ).unwrap().global);
}

#[test]
fn nested_page_through_non_identity_tables() {
    let m = mem();
    let mut n = Nested::new(&m);
    n.s1_tables.map(0x1234_5000, 3, 0x55_6677_8000, S1_RW);
    n.s2_tables.map(0x55_6677_8000, 3, 0x3_0000_1000, S2_RW);
    let mapping = n.translate(0x1234_5123, READ).unwrap();
    assert_eq!(
        mapping,
        Mapping {
            input_base: 0x1234_5000,
            output_base: 0x3_0000_1000,
            size_shift: 12,
            s1: Some(Permissions::stage1(S1_RW, 0)),
            s2: Some(Permissions::stage2(S2_RW, true)),
            global: true,
        }
    );
    assert_eq!(mapping.output(0x1234_5123), 0x3_0000_1123);
    // The stage-1 tables are not at their IPAs in guest memory: a stage-1-only walk with the
    // same TTB reads zeros there and faults.
    assert!(t1(&m, &n.s1(), 0x1234_5123, READ).is_err());
}

#[test]
fn nested_size_is_the_smaller_block() {
    let m = mem();
    let mut n = Nested::new(&m);
    // Stage 1 2 MiB block onto a stage-2 1 GiB block: 2 MiB.
    n.s1_tables.map(0x4000_0000, 2, 0x20_0000_0000, S1_RW);
    n.s2_tables.map(0x20_0000_0000, 1, 0x40_0000_0000, S2_RW);
    let mapping = n.translate(0x4012_3456, READ).unwrap();
    assert_eq!(
        (mapping.input_base, mapping.output_base, mapping.size_shift),
        (0x4000_0000, 0x40_0000_0000, 21)
    );
    assert_eq!(mapping.output(0x4012_3456), 0x40_0012_3456);
    // Stage 1 1 GiB block onto stage-2 4K pages: 4K, at the right offset in both.
    n.s1_tables.map(0x4_0000_0000, 1, 0x30_0000_0000, S1_RW);
    n.s2_tables.map(0x30_0765_4000, 3, 0x7_7777_7000, S2_RW);
    let mapping = n.translate(0x4_0765_4321, READ).unwrap();
    assert_eq!(
        (mapping.input_base, mapping.output_base, mapping.size_shift),
        (0x4_0765_4000, 0x7_7777_7000, 12)
    );
    // Stage 1 page onto a stage-2 2 MiB block: 4K at the block offset.
    n.s1_tables.map(0x5000_3000, 3, 0x21_0012_3000, S1_RW);
    n.s2_tables.map(0x21_0000_0000, 2, 0x50_0000_0000, S2_RW);
    let mapping = n.translate(0x5000_3abc, READ).unwrap();
    assert_eq!(
        (mapping.input_base, mapping.output_base, mapping.size_shift),
        (0x5000_3000, 0x50_0012_3000, 12)
    );
}

#[test]
fn nested_stage2_fault_fetching_a_stage1_table() {
    let m = mem();
    let mut n = Nested::new(&m);
    let iova = 0x1234_5678;
    n.s1_tables.map(iova, 3, 0x55_0000_0000, S1_RW);
    n.s2_tables.map(0x55_0000_0000, 3, 0x1000, S2_RW);
    assert!(n.translate(iova, READ).is_ok());
    // The level-2 table moves to an IPA stage 2 does not map.
    let hole = 0x80_7000_0000;
    n.s1_tables.set_desc(iova, 1, hole | PTE_TYPE_TABLE);
    let l2_index = (iova >> 21) & 0x1ff;
    assert_eq!(
        n.translate(iova, PROBE),
        Err(s2_fault(
            FaultKind::Translation,
            FaultClass::Tt,
            hole + 8 * l2_index
        ))
    );
    // The TTB itself in a hole.
    let mut s1 = n.s1();
    s1.tt[0].ttb = 0x90_0000_0000;
    let l1_index = (iova >> 30) & 0x1ff;
    assert_eq!(
        walk_tables(&m, Some(&s1), Some(&n.s2()), iova, READ),
        Err(s2_fault(
            FaultKind::Translation,
            FaultClass::Tt,
            0x90_0000_0000 + 8 * l1_index
        ))
    );
}

#[test]
fn nested_stage1_table_fetch_needs_stage2_read() {
    let m = mem();
    let mut n = Nested::new(&m);
    let iova = 0x1234_5678;
    n.s1_tables.map(iova, 3, 0x55_0000_0000, S1_RW);
    n.s2_tables.map(0x55_0000_0000, 3, 0x1000, S2_RW);
    // Stage 2 maps the root table page write-only.
    let root = n.s1_tables.root;
    n.s2_tables
        .map(root, 3, S1_TABLES_PA, PTE_AF | PTE_S2AP_WRITE);
    let l1_index = (iova >> 30) & 0x1ff;
    assert_eq!(
        n.translate(iova, PROBE),
        Err(s2_fault(
            FaultKind::Permission,
            FaultClass::Tt,
            root + 8 * l1_index
        ))
    );
    n.s2_tables.map(root, 3, S1_TABLES_PA, PTE_S2AP_READ);
    assert_eq!(
        n.translate(iova, PROBE),
        Err(s2_fault(
            FaultKind::Access,
            FaultClass::Tt,
            root + 8 * l1_index
        ))
    );
}

#[test]
fn nested_stage2_faults_on_the_output() {
    let m = mem();
    let mut n = Nested::new(&m);
    let iova = 0x1234_5678;
    n.s1_tables.map(iova, 3, 0x55_0000_0000, S1_RW);
    assert_eq!(
        n.translate(iova, READ),
        Err(s2_fault(
            FaultKind::Translation,
            FaultClass::In,
            0x55_0000_0678
        ))
    );
    // Stage 1 output beyond S2T0SZ's 40 bits.
    n.s1_tables.map(iova, 3, 0x155_0000_0000, S1_RW);
    assert_eq!(
        n.translate(iova, READ),
        Err(s2_fault(
            FaultKind::Translation,
            FaultClass::In,
            0x155_0000_0678
        ))
    );
    // Stage 1 output beyond IPS (CD.IPS limits the IPA): a stage-1 address size fault.
    let mut s1 = n.s1();
    s1.oas_bits = 40;
    assert_eq!(
        walk_tables(&m, Some(&s1), Some(&n.s2()), iova, READ),
        Err(s1_fault(FaultKind::AddrSize))
    );
}

#[test]
fn nested_permissions_report_their_stage() {
    let m = mem();
    let mut n = Nested::new(&m);
    let s1_ro = S1_RW | PTE_AP_RDONLY;
    let s2_ro = S2_RW & !PTE_S2AP_WRITE;
    // Stage 1 writable, stage 2 read-only.
    n.s1_tables.map(0x1000, 3, 0x55_0000_1000, S1_RW);
    n.s2_tables.map(0x55_0000_1000, 3, 0x1_1000, s2_ro);
    // Stage 1 read-only, stage 2 read-only.
    n.s1_tables.map(0x2000, 3, 0x55_0000_2000, s1_ro);
    n.s2_tables.map(0x55_0000_2000, 3, 0x1_2000, s2_ro);
    // Stage 1 read-only over a stage-2 hole: stage 1's permission fault comes first.
    n.s1_tables.map(0x3000, 3, 0x56_0000_3000, s1_ro);

    assert_eq!(
        n.translate(0x1010, WRITE),
        Err(s2_fault(
            FaultKind::Permission,
            FaultClass::In,
            0x55_0000_1010
        ))
    );
    assert_eq!(n.translate(0x1010, READ).unwrap().output_base, 0x1_1000);
    assert_eq!(
        n.translate(0x2020, WRITE),
        Err(s1_fault(FaultKind::Permission))
    );
    assert_eq!(
        n.translate(0x3030, WRITE),
        Err(s1_fault(FaultKind::Permission))
    );
    assert_eq!(
        n.translate(0x3030, READ),
        Err(s2_fault(
            FaultKind::Translation,
            FaultClass::In,
            0x56_0000_3030
        ))
    );
    // Mapping::refuses agrees.
    let mapping = n.translate(0x1010, PROBE).unwrap();
    assert_eq!(mapping.refuses(WRITE), Some(true));
    assert_eq!(mapping.refuses(READ), None);
    let mapping = n.translate(0x2020, PROBE).unwrap();
    assert_eq!(mapping.refuses(WRITE), Some(false));
    assert_eq!(mapping.refuses(PRIV_WRITE), Some(false));
    assert_eq!(mapping.refuses(PRIV_READ), None);
}

#[test]
fn nested_walk_eabts() {
    let m = mem();
    let mut n = Nested::new(&m);
    let iova = 0x1234_5678;
    n.s1_tables.map(iova, 3, 0x55_0000_0000, S1_RW);
    n.s2_tables.map(0x55_0000_0000, 3, 0x1000, S2_RW);
    // Stage 2 maps the root stage-1 table to a PA outside guest memory: a stage-1 EABT at
    // that PA.
    let root = n.s1_tables.root;
    n.s2_tables.map(root, 3, 0x1_0000_0000, S2_RW);
    let l1_index = (iova >> 30) & 0x1ff;
    assert_eq!(
        n.translate(iova, READ),
        Err(WalkFault {
            fetch_addr: 0x1_0000_0000 + 8 * l1_index,
            ..s1_fault(FaultKind::WalkEabt)
        })
    );
    // A stage-2 table outside guest memory while translating a stage-1 table's IPA.
    n.s2_tables.map(root, 3, S1_TABLES_PA, S2_RW);
    n.s2_tables
        .set_desc(root, 2, 0x2_0000_0000 | PTE_TYPE_TABLE);
    let desc_ipa = root + 8 * l1_index;
    assert_eq!(
        n.translate(iova, READ),
        Err(WalkFault {
            fetch_addr: 0x2_0000_0000 + 8 * ((desc_ipa >> 12) & 0x1ff),
            ..s2_fault(FaultKind::WalkEabt, FaultClass::Tt, desc_ipa)
        })
    );
}

#[test]
fn no_stage_is_a_translation_fault() {
    let m = mem();
    assert_eq!(
        walk_tables(&m, None, None, 0x1000, READ),
        Err(s1_fault(FaultKind::Translation))
    );
}

// --- Random tables and configurations -----------------------------------------------------

const RANDOM_MEM: u64 = 256 << 10;

/// splitmix64: a small deterministic generator for memory contents.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Guest memory full of descriptors that mostly point back into it: valid tables (pages at
/// level 3) with random attributes, and some blocks, tables without AF, zeros and noise.
fn random_memory(seed: u64) -> GuestMemoryMmap<()> {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RANDOM_MEM as usize)]).unwrap();
    let mut state = seed;
    let mut bytes = Vec::with_capacity(RANDOM_MEM as usize);
    for _ in 0..RANDOM_MEM / 8 {
        let r = next_random(&mut state);
        // Mostly readable at stage 2 (bit 6), which nested table fetches need.
        let readable = if r & 0x30 == 0 { 0 } else { PTE_S2AP_READ };
        let attrs = (next_random(&mut state) & 0xfff8_0000_0000_0ffc) | readable;
        let inside = next_random(&mut state) % RANDOM_MEM;
        let desc = match r & 15 {
            0 => next_random(&mut state),
            1 => 0,
            2 => (inside & !0xfff) | attrs | PTE_TYPE_TABLE,
            3 | 4 => (next_random(&mut state) & 0xffff_ffe0_0000) | attrs | PTE_TYPE_BLOCK,
            _ => (inside & !0xfff) | attrs | PTE_AF | PTE_TYPE_TABLE,
        };
        bytes.extend_from_slice(&desc.to_le_bytes());
    }
    m.write_slice(&bytes, GuestAddress(0)).unwrap();
    m
}

fn arb_granule() -> impl Strategy<Value = Granule> {
    prop_oneof![Just(Granule::G4K), Just(Granule::G16K), Just(Granule::G64K)]
}

// The strategies mostly pick values a walk can succeed with, and sometimes anything.

fn arb_addr() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 0..RANDOM_MEM, 1 => any::<u64>(), 1 => 0..(1u64 << 48)]
}

fn arb_tsz() -> impl Strategy<Value = u8> {
    prop_oneof![6 => TSZ_MIN..=TSZ_MAX, 1 => any::<u8>()]
}

fn arb_size() -> impl Strategy<Value = u8> {
    prop_oneof![6 => 40u8..=48, 1 => any::<u8>()]
}

fn arb_tt() -> impl Strategy<Value = TtConfig> {
    (
        arb_tsz(),
        arb_granule(),
        arb_addr(),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(|(tsz, granule, ttb, epd, had)| TtConfig {
            tsz,
            granule,
            ttb,
            epd,
            had,
        })
}

fn arb_s1() -> impl Strategy<Value = Stage1Config> {
    (
        arb_tt(),
        arb_tt(),
        any::<[bool; 2]>(),
        arb_size(),
        any::<bool>(),
    )
        .prop_map(|(tt0, tt1, tbi, oas_bits, affd)| Stage1Config {
            tt: [tt0, tt1],
            tbi,
            oas_bits,
            affd,
        })
}

/// A stage-2 configuration, usually with an S2SL0 that suits its granule and S2T0SZ.
fn arb_s2() -> impl Strategy<Value = Stage2Config> {
    (
        arb_tsz(),
        prop_oneof![3 => Just(None), 1 => any::<u8>().prop_map(Some)],
        arb_granule(),
        arb_addr(),
        arb_size(),
        any::<bool>(),
    )
        .prop_map(|(tsz, sl0, granule, ttb, ps_bits, affd)| {
            let mut s2 = Stage2Config {
                tsz,
                sl0: sl0.unwrap_or(0),
                granule,
                ttb,
                ps_bits,
                affd,
                xnx: true,
            };
            if sl0.is_none() {
                s2.sl0 = (0..3)
                    .find(|&sl0| Geometry::stage2(&Stage2Config { sl0, ..s2 }).is_some())
                    .unwrap_or(0);
            }
            s2
        })
}

fn arb_iova() -> impl Strategy<Value = u64> {
    // Below 2^25 is inside every TTB0 range, above -2^25 inside every TTB1 range.
    let small = 0..(1u64 << 25);
    prop_oneof![
        4 => small.clone(),
        2 => small.clone().prop_map(|v| v | !((1u64 << 25) - 1)),
        1 => (any::<u8>(), small).prop_map(|(tag, v)| (u64::from(tag) << 56) | v),
        1 => (any::<u8>(), 0..(1u64 << 56)).prop_map(|(tag, v)| (u64::from(tag) << 56) | v),
        1 => any::<u64>(),
    ]
}

fn arb_access() -> impl Strategy<Value = AccessKind> {
    any::<[bool; 4]>().prop_map(|[read, write, exec, privileged]| AccessKind {
        read,
        write,
        exec,
        privileged,
    })
}

/// The invariants of any mapping `translate` returns for `iova`.
fn check_mapping(
    mapping: &Mapping,
    iova: u64,
    s1: Option<&Stage1Config>,
    s2: Option<&Stage2Config>,
) -> Result<(), TestCaseError> {
    let shift = mapping.size_shift;
    prop_assert!((12..=30).contains(&shift), "size_shift {shift}");
    let offset = (1u64 << shift) - 1;
    prop_assert_eq!(mapping.input_base & offset, 0);
    prop_assert_eq!(mapping.output_base & offset, 0);
    let low56 = (1u64 << 56) - 1;
    prop_assert_eq!(mapping.input_base & low56, iova & !offset & low56);
    let top = mapping.input_base >> 56;
    prop_assert!(top == 0 || top == iova >> 56);
    prop_assert_eq!(mapping.output(iova), mapping.output_base | (iova & offset));
    prop_assert_eq!(mapping.s1.is_some(), s1.is_some());
    prop_assert_eq!(mapping.s2.is_some(), s2.is_some());
    let out_bits = match (s1, s2) {
        (_, Some(s2)) => u32::from(s2.ps_bits).min(48),
        (Some(s1), None) => u32::from(s1.oas_bits).min(48),
        (None, None) => 0,
    };
    prop_assert!(mapping.output_base >> out_bits == 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_tables_never_panic_and_mappings_are_consistent(
        seed in any::<u64>(),
        s1 in proptest::option::weighted(0.75, arb_s1()),
        s2 in proptest::option::weighted(0.75, arb_s2()),
        iova in arb_iova(),
        access in arb_access(),
    ) {
        let m = random_memory(seed);
        let (s1, s2) = (s1.as_ref(), s2.as_ref());
        let result = walk_tables(&m, s1, s2, iova, access);
        let probe = walk_tables(&m, s1, s2, iova, PROBE);
        match probe {
            Ok(mapping) => {
                check_mapping(&mapping, iova, s1, s2)?;
                match mapping.refuses(access) {
                    None => prop_assert_eq!(result, Ok(mapping)),
                    Some(stage2) => {
                        let fault = result.unwrap_err();
                        prop_assert_eq!(fault.kind, FaultKind::Permission);
                        prop_assert_eq!(fault.stage2, stage2);
                    }
                }
            }
            Err(fault) => {
                let other = result.unwrap_err();
                if other.kind != FaultKind::Permission || other.stage2 {
                    prop_assert_eq!(other, fault);
                }
            }
        }
    }

    #[test]
    fn random_stage2_translations_never_panic(
        seed in any::<u64>(),
        s2 in arb_s2(),
        ipa in arb_iova(),
        access in arb_access(),
    ) {
        let m = random_memory(seed);
        for class in [FaultClass::Cd, FaultClass::Tt, FaultClass::In] {
            match walk_stage2(&m, &s2, ipa, access, class) {
                Ok(mapping) => check_mapping(&mapping, ipa, None, Some(&s2))?,
                Err(fault) => {
                    prop_assert!(fault.stage2);
                    prop_assert_eq!(fault.class, class);
                    prop_assert_eq!(fault.ipa, ipa);
                }
            }
        }
    }
}
