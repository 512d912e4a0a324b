//! Benchmarks of the page-table walker alone (no IOTLB): every call is a full walk from the
//! TTB. For comparison, QEMU's emulated SMMUv3 takes about 750 ns for a translated access that
//! misses its IOTLB with a 4-level 4K walk.
//!
//! Run with `cargo bench -p viommu-backend --bench walk`.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use viommu_smmuv3::walk::{self, AccessKind, Granule, Stage1Config, Stage2Config, TtConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const VALID_TABLE: u64 = 0b11;
const VALID_BLOCK: u64 = 0b01;
const AF: u64 = 1 << 10;
/// Stage 1: read/write for everyone, inner shareable.
const S1_RW: u64 = AF | (3 << 8) | (1 << 6);
/// Stage 2: S2AP read and write, normal memory.
const S2_RW: u64 = AF | (3 << 8) | (0b11 << 6) | (0xf << 2);
/// Pages mapped for the sweep benchmarks: one whole level-3 table.
const SWEEP_PAGES: u64 = 512;

fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
}

/// A 4K-granule table builder: tables allocated from `next` upwards; `pa_offset` turns a table
/// address (an IPA for nested stage 1) into where it lives in guest memory.
struct Builder<'m> {
    mem: &'m Mem,
    next: u64,
    pa_offset: u64,
}

impl Builder<'_> {
    fn alloc(&mut self, bytes: u64) -> u64 {
        let addr = self.next.next_multiple_of(bytes);
        self.next = addr + bytes;
        addr
    }

    fn read(&self, addr: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(addr.wrapping_add(self.pa_offset)))
            .unwrap()
    }

    fn write(&self, addr: u64, desc: u64) {
        self.mem
            .write_obj(desc, GuestAddress(addr.wrapping_add(self.pa_offset)))
            .unwrap();
    }

    /// Maps `addr` at `leaf_level` in the tables at `root` that start at `start_level` with
    /// `start_bits` index bits.
    fn map(
        &mut self,
        root: u64,
        start_level: u32,
        start_bits: u32,
        addr: u64,
        leaf_level: u32,
        desc: u64,
    ) {
        let mut table = root;
        for level in start_level..=leaf_level {
            let shift = 12 + 9 * (3 - level);
            let bits = if level == start_level { start_bits } else { 9 };
            let slot = table + 8 * ((addr >> shift) & ((1 << bits) - 1));
            if level == leaf_level {
                let kind = if level == 3 { VALID_TABLE } else { VALID_BLOCK };
                self.write(slot, desc | kind);
                return;
            }
            let mut next = self.read(slot);
            if next == 0 {
                next = self.alloc(0x1000) | VALID_TABLE;
                self.write(slot, next);
            }
            table = next & 0xffff_ffff_f000;
        }
    }
}

fn tt(tsz: u8, ttb: u64) -> TtConfig {
    TtConfig {
        tsz,
        granule: Granule::G4K,
        ttb,
        epd: false,
        had: false,
    }
}

fn stage1(tsz: u8, ttb: u64) -> Stage1Config {
    Stage1Config {
        tt: [
            tt(tsz, ttb),
            TtConfig {
                epd: true,
                ..tt(tsz, 0)
            },
        ],
        tbi: [false, false],
        oas_bits: 48,
        affd: false,
    }
}

const READ: AccessKind = AccessKind {
    read: true,
    write: false,
    exec: false,
    privileged: false,
};

const IOVA: u64 = 0x7f12_3456_7000;

fn bench_stage1(c: &mut Criterion) {
    let mem = memory();
    let mut b = Builder {
        mem: &mem,
        next: 0x10_0000,
        pa_offset: 0,
    };
    // 4K, T0SZ 16: a 4-level walk.
    let root4 = b.alloc(0x1000);
    for page in 0..SWEEP_PAGES {
        b.map(
            root4,
            0,
            9,
            IOVA + (page << 12),
            3,
            (0x8_0000_0000 + (page << 12)) | S1_RW,
        );
    }
    let s1_4level = stage1(16, root4);
    // 4K, T0SZ 25: 2 MiB block after 2 lookups.
    let root3 = b.alloc(0x1000);
    b.map(root3, 1, 9, 0x4020_0000, 2, 0x9_0000_0000 | S1_RW);
    let s1_block = stage1(25, root3);
    assert!(walk::walk_tables(&mem, Some(&s1_4level), None, IOVA, READ).is_ok());
    assert!(walk::walk_tables(&mem, Some(&s1_block), None, 0x4020_1234, READ).is_ok());

    c.bench_function("walk s1 4K 4-level page", |bench| {
        bench
            .iter(|| walk::walk_tables(&mem, Some(&s1_4level), None, black_box(IOVA + 0x123), READ))
    });
    let mut page = 0;
    c.bench_function("walk s1 4K 4-level page, 512-page sweep", |bench| {
        bench.iter(|| {
            page = (page + 1) % SWEEP_PAGES;
            walk::walk_tables(
                &mem,
                Some(&s1_4level),
                None,
                black_box(IOVA + (page << 12)),
                READ,
            )
        })
    });
    c.bench_function("walk s1 4K 2 MiB block (2 lookups)", |bench| {
        bench.iter(|| walk::walk_tables(&mem, Some(&s1_block), None, black_box(0x4020_1234), READ))
    });
    c.bench_function("walk s1 4K translation fault at level 0", |bench| {
        bench.iter(|| walk::walk_tables(&mem, Some(&s1_4level), None, black_box(0x1000), READ))
    });
}

/// Stage 2: 4K, S2T0SZ 24, S2SL0 1 (two concatenated level-1 tables), 3 lookups.
fn stage2_config(builder: &mut Builder<'_>) -> Stage2Config {
    Stage2Config {
        tsz: 24,
        sl0: 1,
        granule: Granule::G4K,
        ttb: builder.alloc(0x2000),
        ps_bits: 48,
        affd: false,
        xnx: true,
    }
}

fn bench_stage2_and_nested(c: &mut Criterion) {
    let mem = memory();
    let mut s2b = Builder {
        mem: &mem,
        next: 0x10_0000,
        pa_offset: 0,
    };
    let s2 = stage2_config(&mut s2b);
    // Stage-1 tables at IPA 0x80_4000_0000, PA 0x200_0000.
    let s1_tables_ipa = 0x80_4000_0000u64;
    let s1_tables_pa = 0x200_0000u64;
    for page in 0..64 {
        s2b.map(
            s2.ttb,
            1,
            10,
            s1_tables_ipa + (page << 12),
            3,
            (s1_tables_pa + (page << 12)) | S2_RW,
        );
    }
    let mut s1b = Builder {
        mem: &mem,
        next: s1_tables_ipa,
        pa_offset: s1_tables_pa.wrapping_sub(s1_tables_ipa),
    };
    let s1_root = s1b.alloc(0x1000);
    s1b.map(s1_root, 0, 9, IOVA, 3, 0x12_3456_7000 | S1_RW);
    s2b.map(s2.ttb, 1, 10, 0x12_3456_7000, 3, 0x5_0000_0000 | S2_RW);
    let s1 = stage1(16, s1_root);
    assert_eq!(
        walk::walk_tables(&mem, Some(&s1), Some(&s2), IOVA + 0x10, READ)
            .unwrap()
            .output(IOVA + 0x10),
        0x5_0000_0010
    );

    c.bench_function("walk s2 4K 3-level page (concatenated start)", |bench| {
        bench.iter(|| walk::walk_tables(&mem, None, Some(&s2), black_box(0x12_3456_7010), READ))
    });
    c.bench_function("walk nested 4K 4-level s1 over 3-level s2", |bench| {
        bench.iter(|| walk::walk_tables(&mem, Some(&s1), Some(&s2), black_box(IOVA + 0x10), READ))
    });
}

criterion_group!(benches, bench_stage1, bench_stage2_and_nested);
criterion_main!(benches);
