//! STE, CD and page-table walks over hostile tables. A valid world (linear or 2-level stream
//! table; stage-1, stage-2 and nested streams; linear and 2-level CD tables; 4K, 16K and 64K
//! granules) is built with the guest driver's builders, then the fuzzer rewrites words of it:
//! STE and CD fields, level-1 descriptors, page-table entries, with arbitrary values or
//! pointers to other tables and to themselves (loops), interleaved with translations and
//! invalidations.
//!
//! Invariants: no panic and no hang (walks of looping tables end); a translation is an
//! aligned block that contains its input and lies inside the OAS; a cached translation is the
//! one the tables give (the same request twice, and a fresh model, agree while the tables are
//! unmodified); translations produce a bounded number of effects.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu_fuzz::codec::from_bytes;
use viommu_fuzz::walk::{Input, MutOp, Step, Target};
use viommu_fuzz::world::{Addr, Cmd, World, check_translation};
use viommu_smmuv3::Smmu;
use viommu_tests::guest::mem::{read_u64, write_u64};

/// The address of a target word, if the world has it.
fn address(w: &World, t: &Target) -> Option<u64> {
    let stream =
        |i: u8| (!w.streams.is_empty()).then(|| &w.streams[usize::from(i) % w.streams.len()]);
    match t {
        Target::Ste { stream: s, word } => stream(*s).map(|b| b.ste_addr + 8 * u64::from(word % 8)),
        Target::Cd {
            stream: s,
            context,
            word,
        } => {
            let b = stream(*s)?;
            let (_, addr) = b
                .contexts
                .get(usize::from(*context) % b.contexts.len().max(1))?;
            Some(addr + 8 * u64::from(word % 8))
        }
        Target::Pte {
            stage2,
            map,
            offset,
            level,
        } => {
            let pt = if *stage2 {
                w.s2.as_ref()?
            } else {
                w.s1.as_ref()?
            };
            let maps: Vec<_> = w.maps.iter().filter(|m| m.0 == *stage2).collect();
            let iova = match maps.get(usize::from(*map) % maps.len().max(1)) {
                Some((_, base, size)) => base + u64::from(*offset) % size,
                None => u64::from(*offset),
            };
            let levels = 4 - pt.start_level;
            let level = pt.start_level + u32::from(*level) % levels;
            pt.pte_addr(&w.mem, iova, level).ok().flatten()
        }
        Target::StrtabL1 { stream: s } => {
            let b = stream(*s)?;
            match w.strtab.layout {
                viommu_tests::guest::strtab::StrtabLayout::TwoLevel { .. } => {
                    w.strtab.l1_desc_addr(b.sid).ok()
                }
                _ => None,
            }
        }
        Target::CdL1 { stream: s, context } => {
            let b = stream(*s)?;
            let table = b.cd_table.as_ref()?;
            if table.l2.is_empty() {
                return None;
            }
            let (ssid, _) = b
                .contexts
                .get(usize::from(*context) % b.contexts.len().max(1))?;
            table.l1_desc_addr(*ssid).ok()
        }
        Target::Raw { addr } => Some(addr.resolve() & !7),
    }
}

fn mutate(w: &World, target: &Target, op: &MutOp) {
    let Some(addr) = address(w, target) else {
        return;
    };
    let Ok(old) = read_u64(&w.mem, addr) else {
        return;
    };
    let new = match op {
        MutOp::Set { value } => *value,
        MutOp::Xor { value } => old ^ value,
        MutOp::FlipBit { bit } => old ^ (1u64 << (bit % 64)),
        MutOp::PointTo { target, fine } => {
            let Some(to) = address(w, target) else {
                return;
            };
            let field = if *fine {
                0x000f_ffff_ffff_fff0
            } else {
                0x000f_ffff_ffff_f000
            };
            (old & !field) | (to & field)
        }
    };
    let _ = write_u64(&w.mem, addr, new);
}

fn invalidate_all(w: &mut World) {
    let cmds = [
        Cmd::CfgiAll.words(),
        Cmd::TlbiNsnhAll.words(),
        Cmd::TlbiEl2All.words(),
        Cmd::Sync {
            cs: 0,
            msiaddr: Addr::Raw { addr: 0 },
            msidata: 0,
        }
        .words(),
    ];
    w.issue(&cmds);
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = from_bytes::<Input>(data) else {
        return;
    };
    let mut w = World::build(&input.world);
    // While nothing was rewritten, cached results must be what a fresh walk gives.
    let mut pristine = !w.hostile;
    for step in input.steps.iter().take(48) {
        match step {
            Step::Mutate { target, op } => {
                mutate(&w, target, op);
                pristine = false;
            }
            Step::Translate { txn } => {
                let (sid, ssid, iova, access) = txn.resolve(&w);
                let _ = w.smmu.stream_state(&w.mem, sid);
                let first = w.translate(sid, ssid, iova, access);
                if let Ok(t) = first {
                    let again = w.translate(sid, ssid, iova, access);
                    assert_eq!(again, Ok(t), "a cached translation differs");
                    if pristine {
                        let mut fresh = Smmu::new(w.features);
                        fresh.restore(&w.smmu.snapshot()).expect("restore");
                        let r = fresh.translate(&w.mem, sid, ssid, iova, access);
                        if let Ok(f) = &r {
                            check_translation(f, iova, w.features.oas_mask());
                        }
                        assert_eq!(r, Ok(t), "the IOTLB disagrees with the tables");
                    }
                }
            }
            Step::Invalidate => invalidate_all(&mut w),
            Step::InvalidateStream { stream } => {
                if w.streams.is_empty() {
                    continue;
                }
                let sid = w.streams[usize::from(*stream) % w.streams.len()].sid;
                let cmds = [
                    Cmd::CfgiSte { sid, leaf: true }.words(),
                    Cmd::CfgiCdAll { sid }.words(),
                    Cmd::Sync {
                        cs: 0,
                        msiaddr: Addr::Raw { addr: 0 },
                        msidata: 0,
                    }
                    .words(),
                ];
                w.issue(&cmds);
            }
        }
    }
});
