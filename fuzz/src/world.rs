//! The guest world the model targets start from: guest RAM with a hole, a model configuration,
//! and a *valid* stream table, CD tables and page tables built with the guest driver's
//! builders (`viommu_tests::guest`), which the fuzzer then mutates. Also the shared pieces of
//! the model targets' inputs: addresses, commands, transactions, register names.

use viommu_backend::limits::ModelLimits;
use viommu_protocol::types::{ConfigFlags, ModelConfig};
use viommu_smmuv3::spec::regs::offset;
use viommu_smmuv3::walk::AccessKind;
use viommu_smmuv3::{BarrierOutcome, CmdqStatus, Effect, Smmu, Translation, TranslationFault};
use viommu_tests::guest::alloc::BumpAllocator;
use viommu_tests::guest::bits::low_mask;
use viommu_tests::guest::cd::{CTXDESC_CD_0_TCR_TBI0, CdFmt, CdTable, make_s1_cd, with_ttb1};
use viommu_tests::guest::cmd::{CmdEnt, Tlbi};
use viommu_tests::guest::entry::Entry;
use viommu_tests::guest::mem::{write_qwords, write_u64};
use viommu_tests::guest::pgtable::{Granule, PageTable, Stage, prot};
use viommu_tests::guest::ste::{
    S2Domain, make_abort_ste, make_bypass_ste, make_cdtable_ste, make_nested_ste,
    make_s2_domain_ste,
};
use viommu_tests::guest::strtab::StreamTable;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::{fuzz_enum, fuzz_struct};

/// Guest RAM: 8 MiB at 0, a hole, 1 MiB at 256 MiB. Nothing else is RAM.
pub const RAM0: (u64, u64) = (0, 8 << 20);
/// The second RAM region (base, size).
pub const RAM1: (u64, u64) = (0x1000_0000, 1 << 20);
/// Where the builders allocate tables and queues.
pub const ALLOC: (u64, u64) = (0x1_0000, 6 << 20);
/// Where mappings point (the top of RAM0).
pub const DATA: u64 = 6 << 20;
/// The IOVA of the mappings every stage-1 table has: a page there, and a level-2 block after
/// the first block-sized range.
pub const BASE_IOVA: u64 = 0x4000_0000;
/// Most StreamID bits the stream table covers (bigger tables cost more than they find).
pub const MAX_STRTAB_BITS: u32 = 14;
/// Most StreamID bits a linear stream table covers.
pub const MAX_LINEAR_BITS: u32 = 7;
/// Most streams a world builds.
pub const MAX_STREAMS: usize = 12;
/// Most contexts a CD table gets.
pub const MAX_CONTEXTS: usize = 6;
/// Output address sizes a configuration can ask for (52 is beyond the implemented limit).
pub const OAS: [u8; 6] = [32, 36, 40, 42, 44, 48];

/// Fresh guest RAM (anonymous, lazily zeroed).
pub fn new_ram() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(RAM0.0), RAM0.1 as usize),
        (GuestAddress(RAM1.0), RAM1.1 as usize),
    ])
    .expect("guest RAM")
}

fuzz_enum! {
    /// A guest physical address: mostly in RAM, sometimes anywhere.
    pub enum Addr {
        Ram0 { off: u32 },
        Ram1 { off: u32 },
        Raw { addr: u64 },
    }
}

impl Addr {
    /// The address.
    pub fn resolve(&self) -> u64 {
        match *self {
            Addr::Ram0 { off } => u64::from(off) % RAM0.1,
            Addr::Ram1 { off } => RAM1.0 + u64::from(off) % RAM1.1,
            Addr::Raw { addr } => addr,
        }
    }
}

fuzz_struct! {
    /// The model configuration (a SET_CONFIG within the default limits).
    pub struct ModelSel {
        stage1: bool,
        stage2: bool,
        ril: bool,
        ats: bool,
        msi: bool,
        oas: u8,
        sid_bits: u8,
        ssid_bits: u8,
        cmdq_log2: u8,
        evtq_log2: u8,
    }
}

impl ModelSel {
    /// The SET_CONFIG.
    pub fn config(&self) -> ModelConfig {
        let mut flags = ConfigFlags::empty();
        flags.set(ConfigFlags::STAGE1, self.stage1 || !self.stage2);
        flags.set(ConfigFlags::STAGE2, self.stage2);
        flags.set(ConfigFlags::RIL, self.ril);
        flags.set(ConfigFlags::ATS, self.ats);
        flags.set(ConfigFlags::MSI, self.msi);
        ModelConfig {
            flags,
            oas_bits: OAS[usize::from(self.oas) % OAS.len()],
            ssid_bits: self.ssid_bits % 21,
            sid_bits: 1 + self.sid_bits % 32,
            cmdq_log2: 1 + self.cmdq_log2 % 19,
            evtq_log2: 1 + self.evtq_log2 % 19,
        }
    }

    /// The model's features, as SET_CONFIG makes them.
    pub fn features(&self) -> viommu_smmuv3::Capabilities {
        let cfg = self.config();
        ModelLimits::default()
            .check(&cfg)
            .expect("a configuration within the limits");
        viommu_backend::session::model_config::capabilities(&cfg)
    }
}

fuzz_enum! {
    /// A translation granule.
    pub enum GranuleSel { G4K, G16K, G64K }
}

impl GranuleSel {
    /// The granule.
    pub fn granule(&self) -> Granule {
        match self {
            GranuleSel::G4K => Granule::G4K,
            GranuleSel::G16K => Granule::G16K,
            GranuleSel::G64K => Granule::G64K,
        }
    }
}

fuzz_struct! {
    /// A page table's shape.
    pub struct TableSel {
        granule: GranuleSel,
        /// Input address bits: 32 + ias % 17.
        ias: u8,
    }
}

fuzz_enum! {
    /// A CD table layout.
    pub enum CdFmtSel { Linear, TwoLevel4K, TwoLevel64K }
}

fuzz_struct! {
    /// Stage-1 fields of an STE and its CD table.
    pub struct S1Sel {
        fmt: CdFmtSel,
        s1cdmax: u8,
        s1dss: u8,
        /// Substreams that get a CD besides 0.
        ssids: Vec<u32>,
        ttb1: bool,
        tbi: bool,
    }
}

fuzz_enum! {
    /// What a stream's STE is.
    pub enum StreamKind {
        Abort,
        Bypass,
        S1 { s1: S1Sel },
        S2,
        Nested { s1: S1Sel },
        Raw { words: [u64; 8] },
    }
}

fuzz_struct! {
    /// One stream.
    pub struct StreamSpec {
        sid: u32,
        kind: StreamKind,
    }
}

fuzz_struct! {
    /// One mapping besides the base ones.
    pub struct MapSpec {
        stage2: bool,
        /// Index of the block or page (in units of its size).
        index: u32,
        /// 0: page, 1: level-2 block, 2: level-1 block.
        level: u8,
        /// Output block index (in units of its size).
        out: u16,
        prot: u8,
    }
}

fuzz_struct! {
    /// A world: configuration, tables, streams and mappings.
    pub struct WorldSpec {
        model: ModelSel,
        s1: TableSel,
        s2: TableSel,
        two_level: bool,
        streams: Vec<StreamSpec>,
        maps: Vec<MapSpec>,
    }
}

/// A stream as built.
#[derive(Debug, Clone)]
pub struct Built {
    /// Its StreamID.
    pub sid: u32,
    /// Where its STE is.
    pub ste_addr: u64,
    /// Its CD table.
    pub cd_table: Option<CdTable>,
    /// (SubstreamID, CD address) of each context.
    pub contexts: Vec<(u32, u64)>,
}

/// A built world: RAM, the model, and where everything is.
#[derive(Debug)]
pub struct World {
    /// Guest RAM.
    pub mem: GuestMemoryMmap<()>,
    /// The model.
    pub smmu: Smmu,
    /// Its features.
    pub features: viommu_smmuv3::Capabilities,
    /// The allocator the tables came from.
    pub alloc: BumpAllocator,
    /// The stream table.
    pub strtab: StreamTable,
    /// The stage-1 table.
    pub s1: Option<PageTable>,
    /// The stage-2 table (identity over RAM).
    pub s2: Option<PageTable>,
    /// The streams.
    pub streams: Vec<Built>,
    /// (stage 2, IOVA, size) of every mapping.
    pub maps: Vec<(bool, u64, u64)>,
    /// Command queue base and log2 size.
    pub cmdq: (u64, u8),
    /// Event queue base and log2 size.
    pub evtq: (u64, u8),
    /// A Raw STE or similar makes cached results legitimately differ from fresh walks.
    pub hostile: bool,
}

fn cd_fmt(sel: &CdFmtSel) -> CdFmt {
    match sel {
        CdFmtSel::Linear => CdFmt::Linear,
        CdFmtSel::TwoLevel4K => CdFmt::TwoLevel4K,
        CdFmtSel::TwoLevel64K => CdFmt::TwoLevel64K,
    }
}

/// Bounds for what the session-like loops may see.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriveStats {
    /// Command-queue runs (the write's, then one per barrier served).
    pub rounds: u64,
    /// Effects taken.
    pub effects: u64,
}

/// The contexts of a CD table: (SSID, address of its CD).
pub type Contexts = Vec<(u32, u64)>;

impl World {
    /// Builds a world in fresh RAM and programs the model; a spec the builders cannot honour
    /// is built in part (what fails is left out), so every input runs.
    pub fn build(spec: &WorldSpec) -> World {
        let mut world = Self::build_in(new_ram(), spec);
        for (off, size, value) in world.register_writes() {
            world.write(off, size, value);
        }
        world
    }

    /// Builds the tables in `mem` (laid out as [`RAM0`] / [`RAM1`]), without touching the
    /// model: [`World::register_writes`] says how a guest would enable it.
    pub fn build_in(mem: GuestMemoryMmap<()>, spec: &WorldSpec) -> World {
        let features = spec.model.features();
        let mut alloc = BumpAllocator::new(ALLOC.0, ALLOC.1);
        // The table covers the low StreamIDs only when the model has many; the others are
        // out of range (C_BAD_STREAMID), which the fuzzer reaches with raw SIDs.
        let sid_bits = u32::from(features.sid_bits);
        let initial = make_abort_ste();
        let (strtab, sid_bits) = if !spec.two_level && sid_bits <= MAX_LINEAR_BITS {
            (
                StreamTable::new_linear(&mem, &mut alloc, sid_bits, initial),
                sid_bits,
            )
        } else {
            let bits = sid_bits.min(MAX_STRTAB_BITS);
            (StreamTable::new_2lvl(&mem, &mut alloc, bits, initial), bits)
        };
        let strtab = strtab.expect("stream table");
        let oas = u32::from(features.oas_bits).min(48);
        let mut maps = Vec::new();
        let s1 = {
            let ias = 32 + u32::from(spec.s1.ias) % 17;
            PageTable::new(
                &mem,
                &mut alloc,
                Stage::S1,
                spec.s1.granule.granule(),
                ias,
                oas,
                0,
            )
            .ok()
        };
        if let Some(pt) = &s1 {
            let page = pt.granule.size();
            if pt
                .map(&mem, &mut alloc, BASE_IOVA, DATA, page, prot::RW)
                .is_ok()
            {
                maps.push((false, BASE_IOVA, page));
            }
            let block = 1u64 << pt.granule.level_shift(2);
            let iova = BASE_IOVA + block;
            if pt
                .map(&mem, &mut alloc, iova, DATA & !(block - 1), block, prot::RW)
                .is_ok()
            {
                maps.push((false, iova, block));
            }
        }
        let s2 = {
            let ias = (32 + u32::from(spec.s2.ias) % 17).min(oas);
            PageTable::new(
                &mem,
                &mut alloc,
                Stage::S2,
                spec.s2.granule.granule(),
                ias,
                oas,
                0,
            )
            .ok()
        };
        if let Some(pt) = &s2 {
            // Identity over RAM with the largest blocks the table has (the hole and beyond
            // are mapped too: outputs outside RAM are the walker's business).
            for (base, _) in [RAM0, RAM1] {
                for level in [1, 2, 3] {
                    if level < pt.start_level || (level < 3 && !pt.granule.block_level(level)) {
                        continue;
                    }
                    let size = 1u64 << pt.granule.level_shift(level);
                    let at = base & !(size - 1);
                    if maps
                        .iter()
                        .any(|&(s2, b, sz)| s2 && b <= base && base < b + sz)
                    {
                        break;
                    }
                    if pt.map(&mem, &mut alloc, at, at, size, prot::RW).is_ok() {
                        maps.push((true, at, size));
                        break;
                    }
                }
            }
        }
        for m in spec.maps.iter().take(16) {
            let Some(pt) = (if m.stage2 { &s2 } else { &s1 }) else {
                continue;
            };
            let g = pt.granule;
            let level = match m.level % 3 {
                1 if g.block_level(2) => 2,
                2 if g.block_level(1) => 1,
                _ => 3,
            };
            if level < pt.start_level {
                continue;
            }
            let size = 1u64 << g.level_shift(level);
            let iova = (u64::from(m.index).wrapping_mul(size)) & low_mask(pt.ias);
            let out = u64::from(m.out).wrapping_mul(size) & low_mask(oas);
            let p = u32::from(m.prot) & (prot::READ | prot::WRITE | prot::PRIV | prot::NOEXEC);
            if pt.map(&mem, &mut alloc, iova, out, size, p).is_ok() {
                maps.push((m.stage2, iova, size));
            }
        }
        let mut world = World {
            mem,
            smmu: Smmu::new(features),
            features,
            alloc,
            strtab,
            s1,
            s2,
            streams: Vec::new(),
            maps,
            cmdq: (0, 0),
            evtq: (0, 0),
            hostile: false,
        };
        let mut asid = 0u16;
        let mut vmid = 0u16;
        for s in spec.streams.iter().take(MAX_STREAMS) {
            let sid = (u64::from(s.sid) & low_mask(sid_bits)) as u32;
            if world.streams.iter().any(|b| b.sid == sid) {
                continue;
            }
            world.add_stream(sid, &s.kind, &mut asid, &mut vmid);
        }
        world
    }

    fn s2_domain(&self, vmid: u16) -> Option<S2Domain> {
        self.s2.as_ref().map(|pt| S2Domain {
            vmid,
            vtcr: pt.vtcr(),
            vttbr: pt.ttbr(),
        })
    }

    /// A CD table with contexts for `s1`; returns the table, its contexts and the STE
    /// pointing at it.
    fn cd_table(&mut self, s1: &S1Sel, asid: &mut u16) -> Option<(CdTable, Contexts, Entry)> {
        let pt = self.s1.as_ref()?;
        let fmt = cd_fmt(&s1.fmt);
        let ssid_bits = self.features.ssid_bits;
        let cap = if fmt == CdFmt::Linear {
            ssid_bits.min(8)
        } else {
            ssid_bits.min(12)
        };
        let s1cdmax = s1.s1cdmax % (cap + 1);
        let mut table = CdTable::new(&self.mem, &mut self.alloc, fmt, s1cdmax, 0).ok()?;
        let mut tcr = pt.s1_tcr();
        let mut contexts = Vec::new();
        let ssids = std::iter::once(0).chain(s1.ssids.iter().copied());
        for ssid in ssids.take(MAX_CONTEXTS) {
            let ssid = (u64::from(ssid) & low_mask(u32::from(s1cdmax))) as u32;
            if contexts.iter().any(|(s, _)| *s == ssid) {
                continue;
            }
            *asid = asid.wrapping_add(1);
            tcr.ttbr = pt.ttbr();
            let mut cd = make_s1_cd(&tcr, *asid, false);
            if s1.ttb1 {
                cd = with_ttb1(cd, &tcr);
            }
            if s1.tbi {
                cd[0] |= CTXDESC_CD_0_TCR_TBI0;
            }
            let Ok((addr, _)) = table.cd_addr(&self.mem, &mut self.alloc, ssid) else {
                continue;
            };
            if write_qwords(&self.mem, addr, &cd).is_ok() {
                contexts.push((ssid, addr));
            }
        }
        let ste = make_cdtable_ste(&table.ste_ptr(), u64::from(s1.s1dss % 3), false, false);
        Some((table, contexts, ste))
    }

    fn add_stream(&mut self, sid: u32, kind: &StreamKind, asid: &mut u16, vmid: &mut u16) {
        let mut cd_table = None;
        let mut contexts = Vec::new();
        let ste = match kind {
            StreamKind::Abort => make_abort_ste(),
            StreamKind::Bypass => make_bypass_ste(false),
            StreamKind::S1 { s1 } => match self.cd_table(s1, asid) {
                Some((t, c, ste)) => {
                    cd_table = Some(t);
                    contexts = c;
                    ste
                }
                None => return,
            },
            StreamKind::S2 => {
                *vmid = vmid.wrapping_add(1);
                match self.s2_domain(*vmid) {
                    Some(d) => make_s2_domain_ste(&d, false, false),
                    None => return,
                }
            }
            StreamKind::Nested { s1 } => {
                *vmid = vmid.wrapping_add(1);
                let Some(d) = self.s2_domain(*vmid) else {
                    return;
                };
                match self.cd_table(s1, asid) {
                    Some((t, c, vste)) => {
                        cd_table = Some(t);
                        contexts = c;
                        make_nested_ste(&vste, &d, false)
                    }
                    None => return,
                }
            }
            StreamKind::Raw { words } => {
                self.hostile = true;
                *words
            }
        };
        let Ok(ste_addr) = self.strtab.ste_addr(&self.mem, &mut self.alloc, sid) else {
            return;
        };
        if write_qwords(&self.mem, ste_addr, &ste).is_ok() {
            self.streams.push(Built {
                sid,
                ste_addr,
                cd_table,
                contexts,
            });
        }
    }

    /// Allocates the queues and returns the register writes (offset, size, value) with which
    /// Linux's reset would program this world, everything enabled.
    pub fn register_writes(&mut self) -> Vec<(u64, u32, u64)> {
        let cq_log2 = self.features.cmdqs.min(8);
        let eq_log2 = self.features.eventqs.min(7);
        let cq_bytes = 16u64 << cq_log2;
        let eq_bytes = 32u64 << eq_log2;
        let cq = self.alloc.alloc(cq_bytes, cq_bytes.max(32)).unwrap_or(0);
        let eq = self.alloc.alloc(eq_bytes, eq_bytes.max(32)).unwrap_or(0);
        self.cmdq = (cq, cq_log2);
        self.evtq = (eq, eq_log2);
        let rwa = 1u64 << 62;
        let writes: [(u64, u32, u64); 10] = [
            (offset::STRTAB_BASE, 8, self.strtab.base_reg()),
            (offset::STRTAB_BASE_CFG, 4, u64::from(self.strtab.cfg_reg())),
            (offset::CMDQ_BASE, 8, rwa | cq | u64::from(cq_log2)),
            (offset::CMDQ_PROD, 4, 0),
            (offset::CMDQ_CONS, 4, 0),
            (offset::EVENTQ_BASE, 8, rwa | eq | u64::from(eq_log2)),
            (offset::EVENTQ_PROD, 4, 0),
            (offset::EVENTQ_CONS, 4, 0),
            (offset::IRQ_CTRL, 4, 0b101),
            (offset::CR0, 4, 0b1101),
        ];
        writes.to_vec()
    }

    /// Takes the effects of something other than a register write (a reset, a build) and
    /// checks that the command queue is idle.
    pub fn drive(&mut self) -> DriveStats {
        drive(&mut self.smmu, &self.mem, |_, _| CmdqStatus::Idle)
    }

    /// A register write, served the way `Session::mmio_write` serves it (see [`drive`]).
    pub fn write(&mut self, offset: u64, size: u32, value: u64) -> DriveStats {
        drive(&mut self.smmu, &self.mem, |smmu, mem| {
            smmu.mmio_write(mem, offset, size, value)
        })
    }

    /// Writes commands at CMDQ_PROD (as the guest's producer would) and publishes them.
    pub fn issue(&mut self, cmds: &[[u64; 2]]) -> DriveStats {
        let regs = self.smmu.registers();
        let q = regs.cmdq.geometry(self.features.cmdqs, 16);
        let mut prod = regs.cmdq.prod & q.pointer_mask();
        for cmd in cmds {
            if let Some(addr) = q.entry_address(prod) {
                let _ = write_u64(&self.mem, addr, cmd[0]);
                let _ = write_u64(&self.mem, addr.wrapping_add(8), cmd[1]);
            }
            prod = q.increment(prod);
        }
        self.write(offset::CMDQ_PROD, 4, u64::from(prod))
    }

    /// Translates, checking what a translation must satisfy.
    pub fn translate(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        access: AccessKind,
    ) -> Result<Translation, TranslationFault> {
        let r = self.smmu.translate(&self.mem, sid, ssid, iova, access);
        let effects = self.smmu.take_effects();
        assert!(effects.len() <= 4, "a translation produced {effects:?}");
        if let Ok(t) = &r {
            check_translation(t, iova, self.features.oas_mask());
        }
        r
    }
}

/// Runs `first` (a register write) and serves every barrier it leads to, the way
/// `Session::mmio_write` does. Checks that this terminates and that the effects stay
/// proportionate to the commands consumed.
pub fn drive<M: viommu_smmuv3::GuestMemory>(
    smmu: &mut Smmu,
    mem: &M,
    first: impl FnOnce(&mut Smmu, &M) -> CmdqStatus,
) -> DriveStats {
    let mut stats = DriveStats::default();
    // Each round but the last completes at least one command; the queue holds at most
    // 2^19 of them, and a barrier takes one more round.
    let limit = (2u64 << smmu.features().cmdqs) + 8;
    let mut first = Some(first);
    loop {
        let before = smmu.counters();
        let status = match first.take() {
            Some(write) => write(smmu, mem),
            None => smmu.serve_barrier(mem, BarrierOutcome::Served),
        };
        let after = smmu.counters();
        stats.rounds += 1;
        let effects: Vec<Effect> = smmu.take_effects();
        stats.effects += effects.len() as u64;
        let consumed =
            (after.commands - before.commands) + (after.command_errors - before.command_errors);
        let events = after.events - before.events + after.events_lost - before.events_lost;
        assert!(
            effects.len() as u64 <= 8 + 4 * (consumed + events),
            "{} effects for {consumed} commands: {:?}",
            effects.len(),
            &effects[..effects.len().min(16)]
        );
        assert!(stats.rounds <= limit, "the command queue does not settle");
        if status == CmdqStatus::Idle {
            check_idle(smmu);
            return stats;
        }
    }
}

/// Once the command queue is `Idle`, the queue is disabled, stopped on an error, or empty.
pub fn check_idle(smmu: &Smmu) {
    let regs = smmu.registers();
    if !regs.cr0.cmdqen() || regs.active_errors().cmdq_err() {
        return;
    }
    let q = regs.cmdq.geometry(smmu.features().cmdqs, 16);
    let mask = q.pointer_mask();
    assert_eq!(
        regs.cmdq.prod & mask,
        regs.cmdq.cons & mask,
        "idle with commands left (base {:#x})",
        regs.cmdq.base
    );
}

/// A translation describes an aligned block containing the input, inside the OAS.
pub fn check_translation(t: &Translation, iova: u64, oas_mask: u64) {
    assert!(t.size_shift <= 64, "{t:?}");
    if t.size_shift >= 64 {
        return;
    }
    let mask = (1u64 << t.size_shift) - 1;
    assert_eq!(t.input_base & mask, 0, "unaligned input base {t:?}");
    assert_eq!(t.output_base & mask, 0, "unaligned output base {t:?}");
    let untagged = iova & 0x00ff_ffff_ffff_ffff;
    let sign_extended = if iova & (1 << 55) != 0 {
        iova | 0xff00_0000_0000_0000
    } else {
        untagged
    };
    assert!(
        [iova, untagged, sign_extended]
            .iter()
            .any(|a| a & !mask == t.input_base),
        "{t:?} does not contain {iova:#x}"
    );
    assert!(t.output_base <= oas_mask, "{t:?} beyond the OAS");
}

/// After any register write, what every SMMU register file must satisfy.
pub fn check_registers(smmu: &mut Smmu) {
    let cr0 = smmu.mmio_read(offset::CR0, 4);
    assert_eq!(smmu.mmio_read(offset::CR0ACK, 4), cr0, "CR0ACK lags CR0");
    let irq = smmu.mmio_read(offset::IRQ_CTRL, 4);
    assert_eq!(
        smmu.mmio_read(offset::IRQ_CTRLACK, 4),
        irq,
        "IRQ_CTRLACK lags"
    );
    assert_eq!(
        smmu.mmio_read(offset::GBPA, 4) >> 31,
        0,
        "GBPA.UPDATE stuck"
    );
    let features = *smmu.features();
    let regs = smmu.registers().clone();
    let eq_mask = regs.eventq.pointer_mask(features.eventqs);
    let prod = smmu.mmio_read(offset::EVENTQ_PROD, 4) as u32;
    assert_eq!(
        prod & !eq_mask & !(1 << 31),
        0,
        "EVENTQ_PROD beyond the queue: {prod:#x}"
    );
    let cq_mask = regs.cmdq.pointer_mask(features.cmdqs);
    let cons = smmu.mmio_read(offset::CMDQ_CONS, 4) as u32;
    assert_eq!(
        cons & !cq_mask & !(0x7f << 24),
        0,
        "CMDQ_CONS beyond the queue: {cons:#x}"
    );
}

/// A snapshot restores to the same registers, also through JSON.
pub fn check_snapshot(smmu: &Smmu) {
    let snap = smmu.snapshot();
    let json = serde_json_roundtrip(&snap);
    let mut other = Smmu::new(*smmu.features());
    other.restore(&json).expect("restoring our own snapshot");
    assert_eq!(other.registers(), smmu.registers(), "restore differs");
}

fn serde_json_roundtrip(
    snap: &viommu_smmuv3::snapshot::SmmuSnapshot,
) -> viommu_smmuv3::snapshot::SmmuSnapshot {
    let text = serde_json::to_string(snap).expect("snapshot to JSON");
    serde_json::from_str(&text).expect("snapshot from JSON")
}

fuzz_struct! {
    /// The fields of an address-based TLBI.
    pub struct TlbiSel {
        vmid: u16,
        asid: u16,
        addr: u64,
        leaf: bool,
        num: u8,
        scale: u8,
        ttl: u8,
        tg: u8,
    }
}

impl TlbiSel {
    fn tlbi(&self) -> Tlbi {
        Tlbi {
            vmid: self.vmid,
            asid: self.asid,
            addr: self.addr,
            leaf: self.leaf,
            num: self.num % 32,
            scale: self.scale % 32,
            ttl: self.ttl % 4,
            tg: self.tg % 4,
        }
    }
}

fuzz_enum! {
    /// A command: one Linux would build, or raw words.
    pub enum Cmd {
        PrefetchCfg { sid: u32 },
        CfgiSte { sid: u32, leaf: bool },
        CfgiSteRange { sid: u32, range: u8 },
        CfgiAll,
        CfgiCd { sid: u32, ssid: u32, leaf: bool },
        CfgiCdAll { sid: u32 },
        TlbiNhAll { vmid: u16 },
        TlbiNhAsid { vmid: u16, asid: u16 },
        TlbiNhVa { t: TlbiSel },
        TlbiNhVaa { t: TlbiSel },
        TlbiS2Ipa { t: TlbiSel },
        TlbiS12Vmall { vmid: u16 },
        TlbiNsnhAll,
        TlbiEl2All,
        AtcInv { sid: u32, ssid: Option<u32>, addr: u64, size: u8, global: bool },
        PriResp { sid: u32, ssid: Option<u32>, grpid: u16, resp: u8 },
        Resume { sid: u32, stag: u16, resp: u8 },
        Sync { cs: u8, msiaddr: Addr, msidata: u32 },
        Raw { d0: u64, d1: u64 },
        Ssec { cmd: u8, d1: u64 },
    }
}

impl Cmd {
    /// The command's two words.
    pub fn words(&self) -> [u64; 2] {
        let ent = match self {
            Cmd::PrefetchCfg { sid } => CmdEnt::PrefetchCfg { sid: *sid },
            Cmd::CfgiSte { sid, leaf } => CmdEnt::CfgiSte {
                sid: *sid,
                leaf: *leaf,
            },
            Cmd::CfgiSteRange { sid, range } => CmdEnt::CfgiSteRange {
                sid: *sid,
                range: range % 32,
            },
            Cmd::CfgiAll => CmdEnt::CfgiAll,
            Cmd::CfgiCd { sid, ssid, leaf } => CmdEnt::CfgiCd {
                sid: *sid,
                ssid: ssid & 0xf_ffff,
                leaf: *leaf,
            },
            Cmd::CfgiCdAll { sid } => CmdEnt::CfgiCdAll { sid: *sid },
            Cmd::TlbiNhAll { vmid } => CmdEnt::TlbiNhAll { vmid: *vmid },
            Cmd::TlbiNhAsid { vmid, asid } => CmdEnt::TlbiNhAsid {
                vmid: *vmid,
                asid: *asid,
            },
            Cmd::TlbiNhVa { t } => CmdEnt::TlbiNhVa(t.tlbi()),
            Cmd::TlbiNhVaa { t } => CmdEnt::TlbiNhVaa(t.tlbi()),
            Cmd::TlbiS2Ipa { t } => CmdEnt::TlbiS2Ipa(t.tlbi()),
            Cmd::TlbiS12Vmall { vmid } => CmdEnt::TlbiS12Vmall { vmid: *vmid },
            Cmd::TlbiNsnhAll => CmdEnt::TlbiNsnhAll,
            Cmd::TlbiEl2All => CmdEnt::TlbiEl2All,
            Cmd::AtcInv {
                sid,
                ssid,
                addr,
                size,
                global,
            } => CmdEnt::AtcInv {
                sid: *sid,
                ssid: ssid.map(|s| s & 0xf_ffff),
                addr: *addr,
                size: size % 64,
                global: *global,
            },
            Cmd::PriResp {
                sid,
                ssid,
                grpid,
                resp,
            } => CmdEnt::PriResp {
                sid: *sid,
                ssid: ssid.map(|s| s & 0xf_ffff),
                grpid: grpid & 0x1ff,
                resp: resp % 4,
            },
            Cmd::Resume { sid, stag, resp } => CmdEnt::Resume {
                sid: *sid,
                stag: *stag,
                resp: resp % 4,
            },
            Cmd::Sync {
                cs,
                msiaddr,
                msidata,
            } => CmdEnt::Sync {
                cs: cs % 4,
                msiaddr: msiaddr.resolve(),
                msidata: *msidata,
            },
            Cmd::Raw { d0, d1 } => return [*d0, *d1],
            Cmd::Ssec { cmd, d1 } => {
                return [u64::from(*cmd) | 1 << 10, *d1];
            }
        };
        ent.build().0
    }
}

fuzz_enum! {
    /// Which substream a transaction names.
    pub enum SsidSel {
        None,
        Context { index: u8 },
        Raw { ssid: u32 },
    }
}

fuzz_enum! {
    /// Which address a transaction uses.
    pub enum IovaSel {
        /// Inside a mapping of the world.
        Mapped { index: u8, offset: u32 },
        /// Anywhere.
        Raw { iova: u64 },
    }
}

fuzz_struct! {
    /// A transaction.
    pub struct Txn {
        /// A world stream by index, or `raw_sid` when there is none.
        stream: u8,
        raw_sid: Option<u32>,
        ssid: SsidSel,
        iova: IovaSel,
        /// Bits: read, write, exec, privileged.
        access: u8,
    }
}

impl Txn {
    /// (sid, ssid, iova, access) in `world`.
    pub fn resolve(&self, world: &World) -> (u32, Option<u32>, u64, AccessKind) {
        let stream = if world.streams.is_empty() {
            None
        } else {
            world
                .streams
                .get(usize::from(self.stream) % world.streams.len())
        };
        let sid = match (self.raw_sid, stream) {
            (Some(sid), _) => sid,
            (None, Some(s)) => s.sid,
            (None, None) => 0,
        };
        let ssid = match &self.ssid {
            SsidSel::None => None,
            SsidSel::Context { index } => stream.and_then(|s| {
                (!s.contexts.is_empty())
                    .then(|| s.contexts[usize::from(*index) % s.contexts.len()].0)
            }),
            SsidSel::Raw { ssid } => Some(ssid & 0xf_ffff),
        };
        let iova = match &self.iova {
            IovaSel::Mapped { index, offset } => {
                if world.maps.is_empty() {
                    u64::from(*offset)
                } else {
                    let (_, base, size) = world.maps[usize::from(*index) % world.maps.len()];
                    base.wrapping_add(u64::from(*offset) % size)
                }
            }
            IovaSel::Raw { iova } => *iova,
        };
        let access = AccessKind {
            read: self.access & 1 != 0,
            write: self.access & 2 != 0,
            exec: self.access & 4 != 0,
            privileged: self.access & 8 != 0,
        };
        (sid, ssid, iova, access)
    }
}

fuzz_enum! {
    /// A register the guest programs.
    pub enum Reg {
        Cr0, Cr1, Cr2, Gbpa, IrqCtrl, Gerrorn,
        GerrorIrqCfg0, GerrorIrqCfg1, GerrorIrqCfg2,
        StrtabBase, StrtabBaseCfg,
        CmdqBase, CmdqProd, CmdqCons,
        EventqBase, EventqProd, EventqCons,
        EventqIrqCfg0, EventqIrqCfg1, EventqIrqCfg2,
        PriqBase, PriqProd, PriqCons,
    }
}

impl Reg {
    /// Offset and natural width.
    pub fn offset(&self) -> (u64, u32) {
        match self {
            Reg::Cr0 => (offset::CR0, 4),
            Reg::Cr1 => (offset::CR1, 4),
            Reg::Cr2 => (offset::CR2, 4),
            Reg::Gbpa => (offset::GBPA, 4),
            Reg::IrqCtrl => (offset::IRQ_CTRL, 4),
            Reg::Gerrorn => (offset::GERRORN, 4),
            Reg::GerrorIrqCfg0 => (offset::GERROR_IRQ_CFG0, 8),
            Reg::GerrorIrqCfg1 => (offset::GERROR_IRQ_CFG1, 4),
            Reg::GerrorIrqCfg2 => (offset::GERROR_IRQ_CFG2, 4),
            Reg::StrtabBase => (offset::STRTAB_BASE, 8),
            Reg::StrtabBaseCfg => (offset::STRTAB_BASE_CFG, 4),
            Reg::CmdqBase => (offset::CMDQ_BASE, 8),
            Reg::CmdqProd => (offset::CMDQ_PROD, 4),
            Reg::CmdqCons => (offset::CMDQ_CONS, 4),
            Reg::EventqBase => (offset::EVENTQ_BASE, 8),
            Reg::EventqProd => (offset::EVENTQ_PROD, 4),
            Reg::EventqCons => (offset::EVENTQ_CONS, 4),
            Reg::EventqIrqCfg0 => (offset::EVENTQ_IRQ_CFG0, 8),
            Reg::EventqIrqCfg1 => (offset::EVENTQ_IRQ_CFG1, 4),
            Reg::EventqIrqCfg2 => (offset::EVENTQ_IRQ_CFG2, 4),
            Reg::PriqBase => (offset::PRIQ_BASE, 8),
            Reg::PriqProd => (offset::PRIQ_PROD, 4),
            Reg::PriqCons => (offset::PRIQ_CONS, 4),
        }
    }
}
