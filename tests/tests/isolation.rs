//! DMA isolation across bus renumbering (issue 12, defect 0): a device attached before the guest
//! numbered its bus reports a stale SID. Whatever the guest enables and however it invalidates,
//! the device's DMA must be governed by the STE of the SID it has *now*, never by another
//! device's.
//!
//! QEMU cold-plugs a device behind a PCIe root port before the guest has numbered the port's
//! secondary bus, so it attaches at SID 0x0000; the guest then numbers the bus 1 and the
//! device's requester ID becomes 0x0100. The guest writes STE(0x0000) and STE(0x0100), each
//! bypass, abort or translating (to different buffers), and turns them on in every way the
//! architecture offers: SMMU_CR0.SMMUEN, CFGI_ALL, CFGI_STE_RANGE, CFGI_STE of the old and of
//! the new SID, and SMMU_GBPA with the SMMU disabled. The expected outcome is what an SMMUv3
//! does with a transaction of StreamID 0x0100, and what QEMU's in-process SMMUv3 does.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use viommu_protocol::{Access, AddressSpace};
use viommu_tests::guest::cmd::CmdEnt;
use viommu_tests::guest::entry::Entry;
use viommu_tests::guest::mem::write_qwords;
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::guest::regs::{
    ARM_SMMU_CR0, ARM_SMMU_CR0ACK, CR0_CMDQEN, CR0_EVTQEN, CR0_SMMUEN, GBPA_ABORT,
};
use viommu_tests::guest::ste::{make_abort_ste, make_bypass_ste};
use viommu_tests::scenario::{MockGuest, RAM_SIZE, default_config, probed_guest};
use viommu_tests::{Dma, MockQemu, PrivateDaemon};

/// The device's SID at cold plug (its bus not yet numbered) and after enumeration.
const OLD_SID: u32 = 0x0000;
const NEW_SID: u32 = 0x0100;
const HANDLE: u32 = 1;
/// Where the device DMAs.
const IOVA: u64 = 0x4000_0000;

/// What the guest puts in an STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SteKind {
    Bypass,
    Abort,
    /// Stage 1 through a page table that maps IOVA to a buffer of this STE's own.
    Translate,
}

/// How the guest makes the SMMU take its STEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// SMMUEN 0 -> 1 with the STEs in place.
    SmmuEn,
    /// CFGI_ALL with the SMMU enabled.
    CfgiAll,
    /// CFGI_STE_RANGE over SIDs 0x000-0x1ff.
    CfgiSteRange,
    /// CFGI_STE of the SID the device had at attach.
    CfgiSteOld,
    /// CFGI_STE of the device's SID now.
    CfgiSteNew,
    /// SMMUEN = 0, GBPA.ABORT 1 -> 0: every stream bypasses.
    Gbpa,
}

type Guest = MockGuest;

/// A booted guest with the device attached at its cold-plug SID, SMMUEN = 1 with every STE
/// invalid, and two translating STEs ready to copy (each mapping IOVA to its own buffer).
struct Rig {
    qemu: MockQemu,
    guest: Guest,
    translate_ste: [(Entry, u64); 2],
}

fn boot(daemon: &PrivateDaemon) -> Rig {
    let mut qemu = daemon.connect().unwrap();
    qemu.negotiate().unwrap();
    qemu.start(default_config(), RAM_SIZE).unwrap();
    qemu.attach(HANDLE, OLD_SID).unwrap();
    let mut guest = probed_guest(&qemu, RAM_SIZE).unwrap();
    guest.reset().unwrap();
    // Two stage-1 domains built on scratch SIDs; their STEs are copied where a case wants them.
    let mut translate_ste = Vec::new();
    for (i, scratch_sid) in [0x0300u32, 0x0301].into_iter().enumerate() {
        let pt = guest.new_s1_pgtable(Granule::G4K).unwrap();
        let buffer = guest.alloc_zeroed(0x1000, 0x1000).unwrap();
        guest.map(&pt, IOVA, buffer, 0x1000, prot::RW).unwrap();
        guest
            .attach_s1(scratch_sid, pt, u16::try_from(i + 1).unwrap())
            .unwrap();
        translate_ste.push((guest.read_ste(scratch_sid).unwrap(), buffer));
    }
    Rig {
        qemu,
        guest,
        translate_ste: [translate_ste[0], translate_ste[1]],
    }
}

impl Rig {
    fn entry(&self, kind: SteKind, which: usize) -> Entry {
        match kind {
            SteKind::Bypass => make_bypass_ste(false),
            SteKind::Abort => make_abort_ste(),
            SteKind::Translate => self.translate_ste[which].0,
        }
    }

    /// Writes an STE into guest memory the way a guest that does not invalidate it does.
    fn put_ste(&mut self, sid: u32, entry: &Entry) {
        let addr = self.guest.ste_addr(sid).unwrap();
        write_qwords(self.qemu.mem().unwrap(), addr, entry).unwrap();
    }

    fn cr0(&mut self, value: u32) {
        self.guest
            .write_reg_sync(value, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
            .unwrap();
    }

    fn dma(&mut self) -> Dma {
        self.qemu
            .translate(HANDLE, None, IOVA | 0x10, Access::READ)
            .unwrap()
    }

    fn space(&self) -> (Option<AddressSpace>, Option<u32>) {
        let state = self.qemu.channel_state();
        (
            state.spaces.get(&HANDLE).copied(),
            state.space_sids.get(&HANDLE).copied(),
        )
    }
}

/// What the device's DMA to IOVA must do: the STE of NEW_SID decides.
fn expected(rig: &Rig, way: Way, new: SteKind) -> Option<u64> {
    if way == Way::Gbpa {
        return Some(IOVA | 0x10);
    }
    match new {
        SteKind::Bypass => Some(IOVA | 0x10),
        SteKind::Abort => None,
        SteKind::Translate => Some(rig.translate_ste[1].1 | 0x10),
    }
}

fn run_case(daemon: &PrivateDaemon, way: Way, old: SteKind, new: SteKind) {
    let case = format!("{way:?}, STE({OLD_SID:#x}) {old:?}, STE({NEW_SID:#x}) {new:?}");
    let mut rig = boot(daemon);
    // The guest numbers the root port's secondary bus: the device is at NEW_SID from now on.
    rig.qemu.set_sid(HANDLE, NEW_SID);
    let (old_entry, new_entry) = (rig.entry(old, 0), rig.entry(new, 1));
    let queues = CR0_CMDQEN | CR0_EVTQEN;
    match way {
        Way::SmmuEn => {
            rig.cr0(queues);
            rig.put_ste(OLD_SID, &old_entry);
            rig.put_ste(NEW_SID, &new_entry);
            rig.cr0(queues | CR0_SMMUEN);
        }
        Way::CfgiAll | Way::CfgiSteRange | Way::CfgiSteOld | Way::CfgiSteNew => {
            rig.put_ste(OLD_SID, &old_entry);
            rig.put_ste(NEW_SID, &new_entry);
            let cmd = match way {
                Way::CfgiAll => CmdEnt::CfgiAll,
                Way::CfgiSteRange => CmdEnt::CfgiSteRange { sid: 0, range: 8 },
                Way::CfgiSteOld => CmdEnt::CfgiSte {
                    sid: OLD_SID,
                    leaf: true,
                },
                _ => CmdEnt::CfgiSte {
                    sid: NEW_SID,
                    leaf: true,
                },
            };
            rig.guest.issue_cmd_with_sync(cmd).unwrap();
        }
        Way::Gbpa => {
            rig.guest.update_gbpa(GBPA_ABORT, 0).unwrap();
            rig.cr0(queues);
            rig.put_ste(OLD_SID, &old_entry);
            rig.put_ste(NEW_SID, &new_entry);
            assert_eq!(rig.dma(), Dma::Fault { event: 0 }, "{case}: GBPA.ABORT");
            rig.guest.update_gbpa(0, GBPA_ABORT).unwrap();
        }
    }
    let want = expected(&rig, way, new);
    let got = rig.dma();
    match (want, got) {
        (Some(gpa), Dma::Address { gpa: landed, .. }) => {
            assert_eq!(landed, gpa, "{case}: DMA went to the wrong place")
        }
        (None, Dma::Fault { .. }) => {}
        _ => panic!("{case}: expected {want:x?}, the device's DMA gave {got:?}"),
    }
    // The backend itself never declares the device bypassed by an STE that is not its own.
    let (space, sid) = rig.space();
    let bypassing = want == Some(IOVA | 0x10);
    if space == Some(AddressSpace::System) {
        assert!(
            bypassing,
            "{case}: SYSTEM announced for a device that must not bypass"
        );
        if way != Way::Gbpa {
            assert_eq!(sid, Some(NEW_SID), "{case}: SYSTEM decided for another SID");
        }
    }
    // With pushed SIDs (the shared region), the backend evaluated the device at NEW_SID when
    // it moved, before the guest wrote that STE; a CFGI_STE of the old SID does not invalidate
    // the new one, so the architecture lets the backend keep what it had (TRANSLATED, the safe
    // side). Pulled SIDs are re-checked on every CFGI, which finds the new STE.
    let pushed_and_not_invalidated = rig.qemu.shared().is_some() && way == Way::CfgiSteOld;
    if way != Way::Gbpa && new == SteKind::Bypass && !pushed_and_not_invalidated {
        assert_eq!(
            (space, sid),
            (Some(AddressSpace::System), Some(NEW_SID)),
            "{case}: a bypassing device at a confirmed SID goes SYSTEM"
        );
    }
    rig.qemu.close().unwrap();
}

fn all_cases(way: Way) {
    let daemon = PrivateDaemon::start(&format!("isolation-{way:?}")).unwrap();
    for old in [SteKind::Bypass, SteKind::Abort, SteKind::Translate] {
        for new in [SteKind::Bypass, SteKind::Abort, SteKind::Translate] {
            run_case(&daemon, way, old, new);
        }
    }
}

#[test]
fn renumbered_device_follows_its_own_ste_when_smmuen_is_set() {
    all_cases(Way::SmmuEn);
}

#[test]
fn renumbered_device_follows_its_own_ste_after_cfgi_all() {
    all_cases(Way::CfgiAll);
}

#[test]
fn renumbered_device_follows_its_own_ste_after_cfgi_ste_range() {
    all_cases(Way::CfgiSteRange);
}

#[test]
fn renumbered_device_follows_its_own_ste_after_cfgi_ste_of_its_old_sid() {
    all_cases(Way::CfgiSteOld);
}

#[test]
fn renumbered_device_follows_its_own_ste_after_cfgi_ste_of_its_new_sid() {
    all_cases(Way::CfgiSteNew);
}

#[test]
fn renumbered_device_bypasses_with_gbpa_when_the_smmu_is_disabled() {
    all_cases(Way::Gbpa);
}

/// The frontend's SYSTEM fast path holds only while the device keeps the SID it was decided
/// for: a renumbering with no SMMU command at all sends the device's next DMA through
/// TRANSLATE, at its new SID, where the STE aborts.
#[test]
fn system_fast_path_ends_when_the_device_moves() {
    let daemon = PrivateDaemon::start("isolation-fast-path").unwrap();
    let mut rig = boot(&daemon);
    let (bypass, abort) = (make_bypass_ste(false), make_abort_ste());
    rig.put_ste(OLD_SID, &bypass);
    rig.put_ste(NEW_SID, &abort);
    rig.guest
        .issue_cmd_with_sync(CmdEnt::CfgiSte {
            sid: OLD_SID,
            leaf: true,
        })
        .unwrap();
    assert_eq!(
        rig.space(),
        (Some(AddressSpace::System), Some(OLD_SID)),
        "the device at its cold-plug SID bypasses"
    );
    let before = rig.qemu.sent();
    assert_eq!(
        rig.dma(),
        Dma::Address {
            gpa: IOVA | 0x10,
            cached: true
        }
    );
    assert_eq!(rig.qemu.sent().system, before.system + 1, "fast path taken");
    rig.qemu.set_sid(HANDLE, NEW_SID);
    assert!(
        matches!(rig.dma(), Dma::Fault { .. }),
        "after the move STE({NEW_SID:#x}) aborts the device's DMA"
    );
    assert_eq!(
        rig.qemu.sent().translates,
        before.translates + 1,
        "the DMA went through TRANSLATE at the new SID"
    );
    rig.qemu.close().unwrap();
}
