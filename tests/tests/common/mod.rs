//! Helpers shared by the model suites: a booted Linux-style guest on an in-process vSMMU.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub use viommu_smmuv3::spec::cmd::RawCommand;
pub use viommu_smmuv3::walk::AccessKind;
pub use viommu_smmuv3::{Capabilities, Effect, IrqLine, SidRange, Translation, TranslationFault};
pub use viommu_tests::guest::cd::*;
pub use viommu_tests::guest::cmd::*;
pub use viommu_tests::guest::domain::S1Domain;
pub use viommu_tests::guest::entry::{Entry, UpdateKind, plan_update};
pub use viommu_tests::guest::event::{Event, class, id};
pub use viommu_tests::guest::mem::{read_qwords, read_u32, read_u64, write_qwords, write_u64};
pub use viommu_tests::guest::pgtable::{Granule, PageTable, Stage, prot};
pub use viommu_tests::guest::regs::*;
pub use viommu_tests::guest::ste::*;
pub use viommu_tests::guest::{
    BumpAllocator, DirectPort, Driver, DriverConfig, DriverError, SmmuPort,
};
pub use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM: 64 MiB at guest physical address 0.
pub const RAM_SIZE: u64 = 64 << 20;
/// The driver allocates from 1 MiB up; the first MiB is for tests' own structures.
pub const ALLOC_START: u64 = 1 << 20;
/// A guest physical address well inside the OAS (44 bits) but outside RAM.
pub const OUTSIDE_RAM: u64 = 0x100_0000_0000;

pub type Drv = Driver<DirectPort, GuestMemoryMmap<()>>;

pub fn ram() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap()
}

/// QEMU's default vSMMU: stage 1, 16-bit SIDs and SSIDs, RIL, 44-bit OAS.
pub fn features() -> Capabilities {
    Capabilities::qemu_default()
}

/// With stage 2 (nesting).
pub fn s2_features() -> Capabilities {
    Capabilities {
        s2p: true,
        ..Capabilities::qemu_default()
    }
}

/// Probed, structures allocated, SMMU not yet reset.
pub fn probe_with(f: Capabilities, cfg: DriverConfig) -> Drv {
    let mem = ram();
    let port = DirectPort::new(f, mem.clone());
    Driver::probe(port, mem, BumpAllocator::new(ALLOC_START, RAM_SIZE), cfg).unwrap()
}

/// Probed and reset the Linux way; the effects of the reset are discarded.
pub fn boot_with(f: Capabilities, cfg: DriverConfig) -> Drv {
    let mut d = probe_with(f, cfg);
    d.reset().unwrap();
    d.port.take_effects();
    d
}

pub fn boot(f: Capabilities) -> Drv {
    boot_with(f, DriverConfig::default())
}

pub const fn access(read: bool, write: bool, exec: bool, privileged: bool) -> AccessKind {
    AccessKind {
        read,
        write,
        exec,
        privileged,
    }
}

pub const READ: AccessKind = access(true, false, false, false);
pub const WRITE: AccessKind = access(false, true, false, false);
pub const EXEC: AccessKind = access(false, false, true, false);
pub const PRIV_READ: AccessKind = access(true, false, false, true);
pub const PRIV_WRITE: AccessKind = access(false, true, false, true);
pub const PROBE: AccessKind = access(false, false, false, false);

pub fn tr(
    d: &mut Drv,
    sid: u32,
    ssid: Option<u32>,
    iova: u64,
    a: AccessKind,
) -> Result<Translation, TranslationFault> {
    d.port.translate(sid, ssid, iova, a)
}

/// The output address of a successful translation.
#[track_caller]
pub fn out(d: &mut Drv, sid: u32, ssid: Option<u32>, iova: u64, a: AccessKind) -> u64 {
    match tr(d, sid, ssid, iova, a) {
        Ok(t) => t.output(iova),
        Err(e) => panic!("sid {sid} ssid {ssid:?} iova {iova:#x}: {e:?}"),
    }
}

/// The event type a failed translation reports.
#[track_caller]
pub fn fault(d: &mut Drv, sid: u32, ssid: Option<u32>, iova: u64, a: AccessKind) -> Option<u8> {
    match tr(d, sid, ssid, iova, a) {
        Ok(t) => panic!("sid {sid} iova {iova:#x} translated: {t:?}"),
        Err(e) => e.event.map(|id| id.0),
    }
}

/// Drains the event queue as Linux's event thread does.
pub fn events(d: &mut Drv) -> Vec<Event> {
    d.evtq_thread().unwrap().events
}

/// Exactly one event.
#[track_caller]
pub fn one_event(d: &mut Drv) -> Event {
    let evs = events(d);
    assert_eq!(evs.len(), 1, "events: {evs:x?}");
    evs[0]
}

pub fn effects(d: &mut Drv) -> Vec<Effect> {
    d.port.take_effects()
}

pub fn gerror_active(d: &mut Drv) -> u32 {
    d.read32(ARM_SMMU_GERROR) ^ d.read32(ARM_SMMU_GERRORN)
}

/// A stage-1 page table with Linux's geometry (48-bit VA, IAS-bit output).
pub fn s1_pgtable(d: &mut Drv, granule: Granule) -> PageTable {
    d.new_s1_pgtable(granule).unwrap()
}

/// Attaches a new stage-1 domain to `sid` the way `arm_smmu_attach_dev` does: CD first (a
/// single-CD table), then the CD-table STE with S1DSS = SSID0.
pub fn attach_s1(d: &mut Drv, sid: u32, granule: Granule, asid: u16) -> S1Domain {
    let pt = s1_pgtable(d, granule);
    attach_s1_pt(d, sid, pt, asid)
}

pub fn attach_s1_pt(d: &mut Drv, sid: u32, pt: PageTable, asid: u16) -> S1Domain {
    d.attach_s1(sid, pt, asid).unwrap()
}

/// A stage-2 domain: page table and STE fields.
#[derive(Debug)]
pub struct S2Dom {
    pub pt: PageTable,
    pub dom: S2Domain,
}

pub fn s2_domain(d: &mut Drv, granule: Granule, vmid: u16, ias: u32) -> S2Dom {
    let oas = d.info.oas;
    let pt = d.new_pgtable(Stage::S2, granule, ias, oas, 0).unwrap();
    let dom = S2Domain {
        vmid,
        vtcr: pt.vtcr(),
        vttbr: pt.ttbr(),
    };
    S2Dom { pt, dom }
}

/// Attaches a new stage-2 domain to `sid` (`arm_smmu_make_s2_domain_ste`).
pub fn attach_s2(d: &mut Drv, sid: u32, granule: Granule, vmid: u16, ias: u32) -> S2Dom {
    let s2 = s2_domain(d, granule, vmid, ias);
    d.write_ste(sid, &make_s2_domain_ste(&s2.dom, false, false))
        .unwrap();
    s2
}

/// Writes an STE directly in memory (no CFGI): for malformed entries.
pub fn poke_ste(d: &mut Drv, sid: u32, ste: &Entry) {
    let addr = d.ste_addr(sid).unwrap();
    write_qwords(&d.mem, addr, ste).unwrap();
}

/// Writes an STE in memory and invalidates it (CFGI_STE + SYNC), without Linux's update
/// sequence: for entries Linux would never write.
pub fn install_ste(d: &mut Drv, sid: u32, ste: &Entry) {
    poke_ste(d, sid, ste);
    d.issue_cmd_with_sync(CmdEnt::CfgiSte { sid, leaf: true })
        .unwrap();
}

/// Reprograms registers that are only writable with the SMMU (or a queue) off: disables
/// SMMUEN, runs `f`, re-enables.
pub fn with_smmu_disabled(d: &mut Drv, f: impl FnOnce(&mut Drv)) {
    let cr0 = d.read32(ARM_SMMU_CR0);
    d.write_reg_sync(cr0 & !CR0_SMMUEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    f(d);
    d.write_reg_sync(cr0, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
}

pub const MB: u64 = 1 << 20;
pub const GB: u64 = 1 << 30;

/// The IPA of guest RAM in the nested tests: RAM is at IPA = PA + NEST_OFFSET.
pub const NEST_OFFSET: u64 = 0x80_0000_0000;
/// The IPA window nested stage 2 maps onto [`NEST_DATA_PA`] (one 2 MiB block).
pub const NEST_DATA_IPA: u64 = 0x40_0000_0000;
pub const NEST_DATA_PA: u64 = 0x5_0000_0000;

/// A stage-2 domain (4K, 40-bit IPA) mapping guest RAM at IPA = PA + NEST_OFFSET with 2 MiB
/// blocks, and NEST_DATA_IPA onto NEST_DATA_PA.
pub fn nested_s2(d: &mut Drv, vmid: u16) -> S2Dom {
    nested_s2_with(d, Granule::G4K, vmid)
}

/// [`nested_s2`] with another stage-2 granule (the largest blocks that fit).
pub fn nested_s2_with(d: &mut Drv, granule: Granule, vmid: u16) -> S2Dom {
    let s2 = s2_domain(d, granule, vmid, 40);
    d.map_range(&s2.pt, NEST_OFFSET, 0, RAM_SIZE, prot::RW)
        .unwrap();
    d.map_range(&s2.pt, NEST_DATA_IPA, NEST_DATA_PA, 2 * MB, prot::RW)
        .unwrap();
    s2
}

/// Moves the allocator to the next 2 MiB boundary, so that the next structures get a stage-2
/// block of their own.
pub fn next_2m(d: &mut Drv) {
    d.alloc.alloc(0, 2 * MB).unwrap();
}

/// A nested stream: the guest's CD table and stage-1 table each in their own 2 MiB block of
/// IPA space, stage 1 mapping `va` onto NEST_DATA_IPA + `offset`.
#[derive(Debug)]
pub struct Nested {
    pub s2: S2Dom,
    pub pt: PageTable,
    pub table: CdTable,
}

pub fn attach_nested(d: &mut Drv, sid: u32, s2: S2Dom, asid: u16, va: u64, offset: u64) -> Nested {
    next_2m(d);
    let mut table = d.new_cd_table(CdFmt::Linear, 0, NEST_OFFSET).unwrap();
    next_2m(d);
    let pt = d
        .new_pgtable(Stage::S1, Granule::G4K, 48, 40, NEST_OFFSET)
        .unwrap();
    d.map(&pt, va, NEST_DATA_IPA + offset, 0x1000, prot::RW)
        .unwrap();
    next_2m(d);
    d.write_cd(
        &mut table,
        &[sid],
        0,
        &make_s1_cd(&pt.s1_tcr(), asid, false),
    )
    .unwrap();
    let vste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_SSID0, false, false);
    d.write_ste(sid, &make_nested_ste(&vste, &s2.dom, false))
        .unwrap();
    Nested { s2, pt, table }
}
