//! The driver proper: `arm_smmu_device_hw_probe()`, the structures `arm_smmu_init_structures()`
//! allocates, `arm_smmu_device_reset()`, and the operations the rest of Linux's driver builds
//! on (command submission, STE/CD updates, the event and GERROR handlers).

use super::alloc::BumpAllocator;
use super::bits::{get32, prep32};
use super::cd::{CdFmt, CdTable, cd_used};
use super::cmd::{CMDQ_SYNC_0_CS, CMDQ_SYNC_0_CS_NONE, CmdEnt, Command};
use super::cmdq::{Cmdq, POLL_LIMIT, SyncWait};
use super::entry::{Entry, UpdateKind, plan_update};
use super::evtq::{Evtq, EvtqBatch};
use super::mem::{GuestRam, fill, read_qwords, write_qwords, write_u64};
use super::pgtable::{Granule, PageTable, Stage};
use super::port::SmmuPort;
use super::regs::*;
use super::ste::{make_abort_ste, make_bypass_ste, ste_used};
use super::strtab::StreamTable;
use super::{DriverError, Result};

/// Driver options (module parameters and allocation choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverConfig {
    /// log2 of the command queue entries wanted (capped by IDR1.CMDQS and Linux's maximum).
    pub cmdq_shift: u8,
    /// log2 of the event queue entries wanted (capped likewise).
    pub evtq_shift: u8,
    /// `disable_bypass`: unused STEs abort (true, Linux's default) or bypass.
    pub disable_bypass: bool,
    /// Wait for CMD_SYNC by MSI polling (`Some(true)`), SEV/CONS polling (`Some(false)`), or
    /// Linux's choice: MSI polling when IDR0.MSI and IDR0.COHACC.
    pub msipoll: Option<bool>,
    /// Enable the event queue and GERROR interrupts (IRQ_CTRL).
    pub irqs: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            cmdq_shift: 8,
            evtq_shift: 7,
            disable_bypass: true,
            msipoll: None,
            irqs: true,
        }
    }
}

/// What `arm_smmu_device_hw_probe()` found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmmuInfo {
    /// IDR0..IDR5 as read.
    pub idr: [u32; 6],
    pub iidr: u32,
    pub aidr: u32,
    pub two_lvl_strtab: bool,
    pub two_lvl_cdtab: bool,
    pub pri: bool,
    pub ats: bool,
    pub sev: bool,
    pub msi: bool,
    pub coherent: bool,
    pub hyp: bool,
    pub stalls: bool,
    pub stall_force: bool,
    pub trans_s1: bool,
    pub trans_s2: bool,
    pub nesting: bool,
    pub asid_bits: u32,
    pub vmid_bits: u32,
    pub attr_types_ovr: bool,
    pub cmdq_shift: u8,
    pub evtq_shift: u8,
    pub ssid_bits: u32,
    pub sid_bits: u32,
    pub range_inv: bool,
    pub oas: u32,
    pub ias: u32,
    pub pgsize_bitmap: u64,
}

/// `arm_smmu_device_hw_probe()`.
pub fn hw_probe<P: SmmuPort>(port: &mut P) -> Result<SmmuInfo> {
    let mut info = SmmuInfo::default();
    for (i, idr) in info.idr.iter_mut().enumerate() {
        let off = (i as u64).saturating_mul(4);
        *idr = port.read(ARM_SMMU_IDR0.saturating_add(off), 4) as u32;
    }
    info.iidr = port.read(ARM_SMMU_IIDR, 4) as u32;
    info.aidr = port.read(ARM_SMMU_AIDR, 4) as u32;
    let [idr0, idr1, _, idr3, _, idr5] = info.idr;

    info.two_lvl_strtab = get32(IDR0_ST_LVL, idr0) == IDR0_ST_LVL_2LVL;
    info.two_lvl_cdtab = idr0 & IDR0_CD2L != 0;
    match get32(IDR0_TTENDIAN, idr0) {
        IDR0_TTENDIAN_MIXED | IDR0_TTENDIAN_LE => {}
        _ => return Err(DriverError::Probe("unsupported endianness")),
    }
    info.pri = idr0 & IDR0_PRI != 0;
    info.ats = idr0 & IDR0_ATS != 0;
    info.sev = idr0 & IDR0_SEV != 0;
    info.msi = idr0 & IDR0_MSI != 0;
    info.coherent = idr0 & IDR0_COHACC != 0;
    info.hyp = idr0 & IDR0_HYP != 0;
    match get32(IDR0_STALL_MODEL, idr0) {
        IDR0_STALL_MODEL_FORCE => {
            info.stall_force = true;
            info.stalls = true;
        }
        IDR0_STALL_MODEL_STALL => info.stalls = true,
        _ => {}
    }
    info.trans_s1 = idr0 & IDR0_S1P != 0;
    info.trans_s2 = idr0 & IDR0_S2P != 0;
    if !info.trans_s1 && !info.trans_s2 {
        return Err(DriverError::Probe("no translation support"));
    }
    info.nesting = info.trans_s1 && info.trans_s2;
    match get32(IDR0_TTF, idr0) {
        IDR0_TTF_AARCH32_64 => info.ias = 40,
        IDR0_TTF_AARCH64 => {}
        _ => return Err(DriverError::Probe("AArch64 table format not supported")),
    }
    info.asid_bits = if idr0 & IDR0_ASID16 != 0 { 16 } else { 8 };
    info.vmid_bits = if idr0 & IDR0_VMID16 != 0 { 16 } else { 8 };

    if idr1 & (IDR1_TABLES_PRESET | IDR1_QUEUES_PRESET | IDR1_REL) != 0 {
        return Err(DriverError::Probe("embedded implementation not supported"));
    }
    info.attr_types_ovr = idr1 & IDR1_ATTR_TYPES_OVR != 0;
    info.cmdq_shift = CMDQ_MAX_SZ_SHIFT.min(get32(IDR1_CMDQS, idr1)) as u8;
    if u32::from(info.cmdq_shift) <= CMDQ_BATCH_ENTRIES.ilog2() {
        return Err(DriverError::Probe("command queue too small"));
    }
    info.evtq_shift = EVTQ_MAX_SZ_SHIFT.min(get32(IDR1_EVTQS, idr1)) as u8;
    info.ssid_bits = get32(IDR1_SSIDSIZE, idr1);
    info.sid_bits = get32(IDR1_SIDSIZE, idr1);
    if info.sid_bits <= super::ste::STRTAB_SPLIT {
        info.two_lvl_strtab = false;
    }

    info.range_inv = idr3 & IDR3_RIL != 0;

    if idr5 & IDR5_GRAN64K != 0 {
        info.pgsize_bitmap |= (1 << 16) | (1 << 29);
    }
    if idr5 & IDR5_GRAN16K != 0 {
        info.pgsize_bitmap |= (1 << 14) | (1 << 25);
    }
    if idr5 & IDR5_GRAN4K != 0 {
        info.pgsize_bitmap |= (1 << 12) | (1 << 21) | (1 << 30);
    }
    info.oas = match get32(IDR5_OAS, idr5) {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        6 => {
            info.pgsize_bitmap |= 1 << 42;
            52
        }
        _ => 48,
    };
    info.ias = info.ias.max(info.oas);
    Ok(info)
}

/// The guest driver: an SMMU reached through a port, guest RAM, and the structures Linux
/// keeps for it.
#[derive(Debug)]
pub struct Driver<P: SmmuPort, M: GuestRam> {
    /// The register window.
    pub port: P,
    /// Guest RAM.
    pub mem: M,
    /// RAM for tables and queues.
    pub alloc: BumpAllocator,
    /// Probe results.
    pub info: SmmuInfo,
    /// Options.
    pub config: DriverConfig,
    /// The command queue.
    pub cmdq: Cmdq,
    /// The event queue.
    pub evtq: Evtq,
    /// The stream table.
    pub strtab: StreamTable,
    /// How CMD_SYNC completion is awaited.
    pub sync_wait: SyncWait,
}

impl<P: SmmuPort, M: GuestRam> Driver<P, M> {
    /// Probes the SMMU and allocates the queues and the stream table
    /// (`arm_smmu_device_hw_probe` + `arm_smmu_init_structures`). The SMMU is not touched
    /// beyond reading its ID registers: call [`Driver::reset`] next.
    pub fn probe(
        mut port: P,
        mem: M,
        mut alloc: BumpAllocator,
        config: DriverConfig,
    ) -> Result<Self> {
        let info = hw_probe(&mut port)?;
        let cmdq_shift = config.cmdq_shift.min(info.cmdq_shift);
        let cmdq_bytes = 16u64
            .checked_shl(u32::from(cmdq_shift))
            .ok_or(DriverError::Overflow)?;
        let cmdq_base = alloc.alloc(cmdq_bytes, cmdq_bytes.max(4096))?;
        fill(&mem, cmdq_base, cmdq_bytes, 0)?;
        let evtq_shift = config.evtq_shift.min(info.evtq_shift);
        let evtq_bytes = 32u64
            .checked_shl(u32::from(evtq_shift))
            .ok_or(DriverError::Overflow)?;
        let evtq_base = alloc.alloc(evtq_bytes, evtq_bytes.max(4096))?;
        fill(&mem, evtq_base, evtq_bytes, 0)?;
        let initial = if config.disable_bypass {
            make_abort_ste()
        } else {
            make_bypass_ste(info.attr_types_ovr)
        };
        let strtab = if info.two_lvl_strtab {
            StreamTable::new_2lvl(&mem, &mut alloc, info.sid_bits, initial)?
        } else {
            StreamTable::new_linear(&mem, &mut alloc, info.sid_bits, initial)?
        };
        let sync_wait = match config.msipoll {
            Some(true) => SyncWait::MsiPoll,
            Some(false) => SyncWait::Sev,
            None if info.msi && info.coherent => SyncWait::MsiPoll,
            None => SyncWait::Sev,
        };
        Ok(Self {
            port,
            mem,
            alloc,
            info,
            config,
            cmdq: Cmdq::new(cmdq_base, cmdq_shift),
            evtq: Evtq::new(evtq_base, evtq_shift),
            strtab,
            sync_wait,
        })
    }

    /// A 32-bit register read.
    pub fn read32(&mut self, offset: u64) -> u32 {
        self.port.read(offset, 4) as u32
    }

    /// A 32-bit register write.
    pub fn write32(&mut self, offset: u64, value: u32) {
        self.port.write(offset, 4, u64::from(value));
    }

    /// A 64-bit register read.
    pub fn read64(&mut self, offset: u64) -> u64 {
        self.port.read(offset, 8)
    }

    /// A 64-bit register write.
    pub fn write64(&mut self, offset: u64, value: u64) {
        self.port.write(offset, 8, value);
    }

    /// `arm_smmu_write_reg_sync`: write, then poll the ACK register until it matches.
    pub fn write_reg_sync(&mut self, value: u32, reg: u64, ack: u64) -> Result<()> {
        self.write32(reg, value);
        for _ in 0..POLL_LIMIT {
            if self.read32(ack) == value {
                return Ok(());
            }
        }
        Err(DriverError::Timeout("register update not acknowledged"))
    }

    /// `arm_smmu_update_gbpa`: wait for UPDATE = 0, write with UPDATE, wait again.
    pub fn update_gbpa(&mut self, set: u32, clr: u32) -> Result<()> {
        let mut reg = self.poll_gbpa()?;
        reg &= !clr;
        reg |= set;
        self.write32(ARM_SMMU_GBPA, reg | GBPA_UPDATE);
        self.poll_gbpa().map(|_| ())
    }

    fn poll_gbpa(&mut self) -> Result<u32> {
        for _ in 0..POLL_LIMIT {
            let reg = self.read32(ARM_SMMU_GBPA);
            if reg & GBPA_UPDATE == 0 {
                return Ok(reg);
            }
        }
        Err(DriverError::Timeout("GBPA not responding to update"))
    }

    /// `arm_smmu_device_disable`: CR0 = 0 with acknowledgement.
    pub fn device_disable(&mut self) -> Result<()> {
        self.write_reg_sync(0, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
    }

    /// `arm_smmu_device_reset()`, in Linux's order.
    pub fn reset(&mut self) -> Result<()> {
        if self.read32(ARM_SMMU_CR0) & CR0_SMMUEN != 0 {
            self.update_gbpa(GBPA_ABORT, 0)?;
        }
        self.device_disable()?;

        let cr1 = prep32(CR1_TABLE_SH, ARM_SMMU_SH_ISH as u32)
            | prep32(CR1_TABLE_OC, CR1_CACHE_WB)
            | prep32(CR1_TABLE_IC, CR1_CACHE_WB)
            | prep32(CR1_QUEUE_SH, ARM_SMMU_SH_ISH as u32)
            | prep32(CR1_QUEUE_OC, CR1_CACHE_WB)
            | prep32(CR1_QUEUE_IC, CR1_CACHE_WB);
        self.write32(ARM_SMMU_CR1, cr1);
        let mut cr2 = CR2_PTM | CR2_RECINVSID;
        if self.info.hyp {
            cr2 |= CR2_E2H;
        }
        self.write32(ARM_SMMU_CR2, cr2);

        let (base, cfg) = (self.strtab.base_reg(), self.strtab.cfg_reg());
        self.write64(ARM_SMMU_STRTAB_BASE, base);
        self.write32(ARM_SMMU_STRTAB_BASE_CFG, cfg);

        let q_base = self.cmdq.q_base();
        self.write64(ARM_SMMU_CMDQ_BASE, q_base);
        let (prod, cons) = (self.cmdq.llq.prod, self.cmdq.llq.cons);
        self.write32(ARM_SMMU_CMDQ_PROD, prod);
        self.write32(ARM_SMMU_CMDQ_CONS, cons);
        let mut enables = CR0_CMDQEN;
        self.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)?;

        self.issue_cmd_with_sync(CmdEnt::CfgiAll)?;
        if self.info.hyp {
            self.issue_cmd_with_sync(CmdEnt::TlbiEl2All)?;
        }
        self.issue_cmd_with_sync(CmdEnt::TlbiNsnhAll)?;

        let q_base = self.evtq.q_base();
        self.write64(ARM_SMMU_EVTQ_BASE, q_base);
        let (prod, cons) = (self.evtq.llq.prod, self.evtq.llq.cons);
        self.write32(ARM_SMMU_EVTQ_PROD, prod);
        self.write32(ARM_SMMU_EVTQ_CONS, cons);
        enables |= CR0_EVTQEN;
        self.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)?;

        if self.info.ats {
            enables |= CR0_ATSCHK;
            self.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)?;
        }

        self.setup_irqs()?;

        enables |= CR0_SMMUEN;
        self.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
    }

    /// `arm_smmu_setup_irqs`: interrupts off, MSI addresses cleared, then the event-queue and
    /// GERROR interrupts on.
    pub fn setup_irqs(&mut self) -> Result<()> {
        self.write_reg_sync(0, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)?;
        self.write64(ARM_SMMU_GERROR_IRQ_CFG0, 0);
        self.write64(ARM_SMMU_EVTQ_IRQ_CFG0, 0);
        if self.config.irqs {
            let mut irqen = IRQ_CTRL_EVTQ_IRQEN | IRQ_CTRL_GERROR_IRQEN;
            if self.info.pri {
                irqen |= IRQ_CTRL_PRIQ_IRQEN;
            }
            self.write_reg_sync(irqen, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)?;
        }
        Ok(())
    }

    /// Issues commands without waiting for them.
    pub fn issue_cmds(&mut self, cmds: &[CmdEnt]) -> Result<()> {
        let built: Vec<Command> = cmds.iter().map(CmdEnt::build).collect();
        self.cmdq.issue(&mut self.port, &self.mem, &built, None)
    }

    /// Issues built commands followed by a CMD_SYNC, and waits for it.
    pub fn issue_raw_with_sync(&mut self, cmds: &[Command]) -> Result<()> {
        let wait = self.sync_wait;
        self.cmdq.issue(&mut self.port, &self.mem, cmds, Some(wait))
    }

    /// Issues commands followed by a CMD_SYNC (`arm_smmu_cmdq_batch_submit`).
    pub fn issue_cmds_with_sync(&mut self, cmds: &[CmdEnt]) -> Result<()> {
        let built: Vec<Command> = cmds.iter().map(CmdEnt::build).collect();
        self.issue_raw_with_sync(&built)
    }

    /// `arm_smmu_cmdq_issue_cmd_with_sync`.
    pub fn issue_cmd_with_sync(&mut self, cmd: CmdEnt) -> Result<()> {
        self.issue_cmds_with_sync(&[cmd])
    }

    /// A CMD_SYNC on its own.
    pub fn sync(&mut self) -> Result<()> {
        self.issue_cmds_with_sync(&[])
    }

    /// `arm_smmu_gerror_handler`: reads the active errors, skips a bad command
    /// (`arm_smmu_cmdq_skip_err`: overwrite a CERROR_ILL command with a CMD_SYNC), and
    /// acknowledges everything by writing GERROR into GERRORN. Returns the active errors.
    pub fn handle_gerror(&mut self) -> Result<u32> {
        let gerror = self.read32(ARM_SMMU_GERROR);
        let gerrorn = self.read32(ARM_SMMU_GERRORN);
        let active = (gerror ^ gerrorn) & GERROR_ERR_MASK;
        if active == 0 {
            return Ok(0);
        }
        if active & GERROR_CMDQ_ERR != 0 {
            self.cmdq_skip_err()?;
        }
        self.write32(ARM_SMMU_GERRORN, gerror);
        Ok(active)
    }

    /// `__arm_smmu_cmdq_skip_err`.
    fn cmdq_skip_err(&mut self) -> Result<()> {
        let cons = self.read32(ARM_SMMU_CMDQ_CONS);
        match get32(CMDQ_CONS_ERR, cons) {
            CMDQ_ERR_CERROR_ABT_IDX | CMDQ_ERR_CERROR_NONE_IDX | CMDQ_ERR_CERROR_ATC_INV_IDX => {
                return Ok(());
            }
            _ => {}
        }
        let mut cmd = CmdEnt::linux_sync(0).build();
        if self.sync_wait == SyncWait::None {
            cmd.0[0] = super::bits::replace(cmd.0[0], CMDQ_SYNC_0_CS, CMDQ_SYNC_0_CS_NONE);
        }
        let slot = self.cmdq.entry_addr(cons)?;
        write_qwords(&self.mem, slot, &cmd.0)
    }

    /// `arm_smmu_evtq_thread`.
    pub fn evtq_thread(&mut self) -> Result<EvtqBatch> {
        self.evtq.drain(&mut self.port, &self.mem)
    }

    /// Allocates zeroed guest RAM.
    pub fn alloc_zeroed(&mut self, size: u64, align: u64) -> Result<u64> {
        let addr = self.alloc.alloc(size, align)?;
        fill(&self.mem, addr, size, 0)?;
        Ok(addr)
    }

    /// The PA of `sid`'s STE (allocating its level-2 table on first use).
    pub fn ste_addr(&mut self, sid: u32) -> Result<u64> {
        self.strtab.ste_addr(&self.mem, &mut self.alloc, sid)
    }

    /// The STE of `sid` as it is in memory.
    pub fn read_ste(&mut self, sid: u32) -> Result<Entry> {
        let addr = self.ste_addr(sid)?;
        read_qwords::<M, 8>(&self.mem, addr)
    }

    /// `arm_smmu_write_ste`: `arm_smmu_write_entry` with CFGI_STE (Leaf) + CMD_SYNC after each
    /// step.
    pub fn write_ste(&mut self, sid: u32, target: &Entry) -> Result<UpdateKind> {
        self.write_ste_observed(sid, target, |_, _| {})
    }

    /// [`Driver::write_ste`], calling `observe(driver, step)` after each step's sync.
    pub fn write_ste_observed(
        &mut self,
        sid: u32,
        target: &Entry,
        mut observe: impl FnMut(&mut Self, usize),
    ) -> Result<UpdateKind> {
        let addr = self.ste_addr(sid)?;
        let current = read_qwords::<M, 8>(&self.mem, addr)?;
        let plan = plan_update(&current, target, ste_used);
        for (i, step) in plan.steps.iter().enumerate() {
            for &(q, value) in step {
                let at = (q as u64)
                    .checked_mul(8)
                    .and_then(|off| addr.checked_add(off))
                    .ok_or(DriverError::Overflow)?;
                write_u64(&self.mem, at, value)?;
            }
            self.issue_cmd_with_sync(CmdEnt::CfgiSte { sid, leaf: true })?;
            observe(self, i);
        }
        Ok(plan.kind)
    }

    /// A new CD table for a master.
    pub fn new_cd_table(&mut self, fmt: CdFmt, s1cdmax: u8, view_offset: u64) -> Result<CdTable> {
        CdTable::new(&self.mem, &mut self.alloc, fmt, s1cdmax, view_offset)
    }

    /// `arm_smmu_write_cd_entry`: the CD of `ssid` in `table`, used by the streams `sids`,
    /// updated with CFGI_CD (Leaf) for every StreamID + CMD_SYNC after each step. A new leaf
    /// table is announced first with CFGI_CD (Leaf = 0).
    pub fn write_cd(
        &mut self,
        table: &mut CdTable,
        sids: &[u32],
        ssid: u32,
        target: &Entry,
    ) -> Result<UpdateKind> {
        self.write_cd_observed(table, sids, ssid, target, |_, _| {})
    }

    /// [`Driver::write_cd`], calling `observe(driver, step)` after each step's sync.
    pub fn write_cd_observed(
        &mut self,
        table: &mut CdTable,
        sids: &[u32],
        ssid: u32,
        target: &Entry,
        mut observe: impl FnMut(&mut Self, usize),
    ) -> Result<UpdateKind> {
        let (addr, new_l1) = table.cd_addr(&self.mem, &mut self.alloc, ssid)?;
        if new_l1 {
            let cmds: Vec<CmdEnt> = sids
                .iter()
                .map(|&sid| CmdEnt::CfgiCd {
                    sid,
                    ssid,
                    leaf: false,
                })
                .collect();
            self.issue_cmds_with_sync(&cmds)?;
        }
        let current = read_qwords::<M, 8>(&self.mem, addr)?;
        let plan = plan_update(&current, target, cd_used);
        let cmds: Vec<CmdEnt> = sids
            .iter()
            .map(|&sid| CmdEnt::CfgiCd {
                sid,
                ssid,
                leaf: true,
            })
            .collect();
        for (i, step) in plan.steps.iter().enumerate() {
            for &(q, value) in step {
                let at = (q as u64)
                    .checked_mul(8)
                    .and_then(|off| addr.checked_add(off))
                    .ok_or(DriverError::Overflow)?;
                write_u64(&self.mem, at, value)?;
            }
            self.issue_cmds_with_sync(&cmds)?;
            observe(self, i);
        }
        Ok(plan.kind)
    }

    /// A page table for a domain of this SMMU.
    pub fn new_pgtable(
        &mut self,
        stage: Stage,
        granule: Granule,
        ias: u32,
        oas: u32,
        view_offset: u64,
    ) -> Result<PageTable> {
        PageTable::new(
            &self.mem,
            &mut self.alloc,
            stage,
            granule,
            ias,
            oas,
            view_offset,
        )
    }

    /// `arm_smmu_domain_finalise_s1`-style table: 48-bit VAs, IAS-bit output.
    pub fn new_s1_pgtable(&mut self, granule: Granule) -> Result<PageTable> {
        let oas = self.info.ias;
        self.new_pgtable(Stage::S1, granule, 48, oas, 0)
    }

    /// Maps a page or block.
    pub fn map(
        &mut self,
        pt: &PageTable,
        iova: u64,
        paddr: u64,
        size: u64,
        prot: u32,
    ) -> Result<()> {
        pt.map(&self.mem, &mut self.alloc, iova, paddr, size, prot)
    }

    /// Maps a range with the largest pages and blocks that fit.
    pub fn map_range(
        &mut self,
        pt: &PageTable,
        iova: u64,
        paddr: u64,
        size: u64,
        prot: u32,
    ) -> Result<()> {
        pt.map_range(&self.mem, &mut self.alloc, iova, paddr, size, prot)
    }
}
