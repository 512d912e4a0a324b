//! The register file: architectural read and write semantics of every register, with no
//! knowledge of guest memory. Writes that need the rest of the model (command processing,
//! stream re-evaluation, error acknowledgement) are reported as [`RegisterAction`]s.

use super::capabilities::IdRegisters;
use super::queue::QueueGeometry;
use super::spec::regs::{
    Cr0, Cr1, Cr2, Gbpa, Gerror, Idr0, Idr1, IrqCfg0, IrqCfg2, IrqCtrl, QueueBase, StrtabBase,
    StrtabBaseCfg, offset, queue_reg,
};

/// PROD and CONS hold index and wrap bits for queues of up to 2^19 entries: bits \[19:0\].
const POINTER_BITS: u32 = 0x000f_ffff;

/// CoreSight component and peripheral ID registers at 0xfd0..=0xffc: PIDR4-7, PIDR0-3, CIDR0-3.
/// The component IDs are the standard preamble; the peripheral IDs name no product.
const CORESIGHT_IDS: [u32; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0x0d, 0xf0, 0x05, 0xb1];

/// A side effect of a register write that the model acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterAction {
    /// CR0 changed.
    Cr0 {
        /// The value before the write.
        old: Cr0,
        /// The value after it.
        new: Cr0,
    },
    /// A GBPA update completed.
    Gbpa {
        /// The value before the update.
        old: Gbpa,
        /// The value after it.
        new: Gbpa,
    },
    /// CMDQ_PROD was written.
    CmdqProd,
    /// GERRORN was written (errors may have been acknowledged).
    GerrorAck,
    /// EVENTQ_CONS was written (space may have been freed, an overflow acknowledged).
    EventqCons,
}

/// A queue's three registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueRegs {
    /// *_BASE.
    pub base: u64,
    /// *_PROD.
    pub prod: u32,
    /// *_CONS.
    pub cons: u32,
}

impl QueueRegs {
    /// The queue's geometry, with LOG2SIZE capped at the advertised maximum.
    pub fn geometry(&self, max_log2: u8, entry_size: u64) -> QueueGeometry {
        let base = QueueBase::from_bits(self.base);
        let log2size = base.log2size().min(max_log2);
        // The queue is aligned to its size (and at least 32 bytes): low address bits are
        // treated as zero.
        let bytes = entry_size
            .checked_shl(u32::from(log2size))
            .unwrap_or(0)
            .max(32);
        let align_mask = !bytes.wrapping_sub(1);
        QueueGeometry {
            base: base.address() & align_mask,
            log2size,
            entry_size,
        }
    }

    /// Mask of the PROD/CONS bits that hold index and wrap flag, \[QS:0\] with QS = LOG2SIZE
    /// capped at `max_log2`. Bits \[19:QS+1\] of the SMMU-owned index (CMDQ_CONS.RD,
    /// EVENTQ_PROD.WR) are RAZ (SMMUv3 6.3.28, 6.3.30).
    pub fn pointer_mask(&self, max_log2: u8) -> u32 {
        self.geometry(max_log2, 1).pointer_mask()
    }
}

/// An interrupt's MSI configuration (*_IRQ_CFG0/1/2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqCfg {
    /// CFG0: address.
    pub cfg0: u64,
    /// CFG1: data.
    pub cfg1: u32,
    /// CFG2: attributes.
    pub cfg2: u32,
}

impl IrqCfg {
    /// The MSI target address, or `None` when MSIs are disabled (address 0).
    pub fn msi_address(&self) -> Option<u64> {
        let addr = IrqCfg0::from_bits(self.cfg0).addr() << 2;
        (addr != 0).then_some(addr)
    }
}

/// Every register's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registers {
    /// IDR0-5, IIDR, AIDR.
    pub id: IdRegisters,
    /// Whether the *_IRQ_CFG registers exist (IDR0.MSI).
    pub msi: bool,
    pub cr0: Cr0,
    pub cr1: Cr1,
    pub cr2: Cr2,
    pub gbpa: Gbpa,
    pub irq_ctrl: IrqCtrl,
    pub gerror: u32,
    pub gerrorn: u32,
    pub gerror_irq: IrqCfg,
    pub strtab_base: StrtabBase,
    pub strtab_base_cfg: StrtabBaseCfg,
    pub cmdq: QueueRegs,
    pub eventq: QueueRegs,
    pub eventq_irq: IrqCfg,
}

impl Registers {
    /// Registers in their reset state.
    pub fn new(id: IdRegisters, msi: bool) -> Self {
        Self {
            id,
            msi,
            cr0: Cr0::new(),
            cr1: Cr1::new(),
            cr2: Cr2::new(),
            gbpa: Gbpa::from_bits(Gbpa::RESET),
            irq_ctrl: IrqCtrl::new(),
            gerror: 0,
            gerrorn: 0,
            gerror_irq: IrqCfg::default(),
            strtab_base: StrtabBase::new(),
            strtab_base_cfg: StrtabBaseCfg::new(),
            cmdq: QueueRegs::default(),
            eventq: QueueRegs::default(),
            eventq_irq: IrqCfg::default(),
        }
    }

    /// IDR0, which says which optional control bits exist.
    fn idr0(&self) -> Idr0 {
        Idr0::from_bits(self.id.idr[0])
    }

    /// IDR1, which caps the queue sizes.
    fn idr1(&self) -> Idr1 {
        Idr1::from_bits(self.id.idr[1])
    }

    /// The CR0 bits this SMMU implements: SMMUEN \[0\], EVENTQEN \[2\] and CMDQEN \[3\]; PRIQEN
    /// \[1\] with IDR0.PRI, ATSCHK \[4\] with IDR0.ATS, VMW \[8:6\] with IDR0.VMW. The others are
    /// RES0, kept at zero so that CR0ACK never reflects them (SMMUv3 6.3.9, 6.3.10).
    pub fn cr0_writable(&self) -> u32 {
        let idr0 = self.idr0();
        Cr0::new()
            .with_smmuen(true)
            .with_priqen(idr0.pri())
            .with_eventqen(true)
            .with_cmdqen(true)
            .with_atschk(idr0.ats())
            .with_vmw(if idr0.vmw() { 0b111 } else { 0 })
            .into_bits()
    }

    /// The IRQ_CTRL bits this SMMU implements: GERROR_IRQEN \[0\] and EVENTQ_IRQEN \[2\];
    /// PRIQ_IRQEN \[1\] with IDR0.PRI. A reserved enable reads 0 in IRQ_CTRLACK too
    /// (SMMUv3 6.3.16, 6.3.17).
    pub fn irq_ctrl_writable(&self) -> u32 {
        IrqCtrl::new()
            .with_gerror_irqen(true)
            .with_priq_irqen(self.idr0().pri())
            .with_eventq_irqen(true)
            .into_bits()
    }

    /// A CR1 write: TABLE_* \[11:6\] change only while SMMUEN = 0, QUEUE_* \[5:0\] only while
    /// every queue is disabled; SMMUv3.2 and later ignore the guarded fields' writes otherwise
    /// (SMMUv3 6.3.11). CR0ACK equals CR0 in this model, so CR0 stands for both.
    fn write_cr1(&mut self, v: u32) {
        let new = Cr1::from_bits(v & Cr1::WRITABLE);
        let mut cr1 = self.cr1;
        if !self.cr0.smmuen() {
            cr1 = cr1
                .with_table_ic(new.table_ic())
                .with_table_oc(new.table_oc())
                .with_table_sh(new.table_sh());
        }
        if !(self.cr0.cmdqen() || self.cr0.eventqen() || self.cr0.priqen()) {
            cr1 = cr1
                .with_queue_ic(new.queue_ic())
                .with_queue_oc(new.queue_oc())
                .with_queue_sh(new.queue_sh());
        }
        self.cr1 = cr1;
    }

    /// CMDQ_CONS as read: ERR \[30:24\] and RD \[QS:0\]; RD bits above the wrap flag are RAZ
    /// (SMMUv3 6.3.28).
    fn cmdq_cons(&self) -> u32 {
        let err = queue_reg::ERR_MASK << queue_reg::ERR_SHIFT;
        self.cmdq.cons & (err | self.cmdq.pointer_mask(self.idr1().cmdqs()))
    }

    /// EVENTQ_PROD as read: OVFLG \[31\] and WR \[QS:0\]; WR bits above the wrap flag are RAZ
    /// (SMMUv3 6.3.30).
    fn eventq_prod(&self) -> u32 {
        self.eventq.prod & (queue_reg::OVERFLOW | self.eventq.pointer_mask(self.idr1().eventqs()))
    }

    /// Errors that are active: GERROR bits that differ from GERRORN.
    pub fn active_errors(&self) -> Gerror {
        Gerror::from_bits((self.gerror ^ self.gerrorn) & Gerror::MASK)
    }

    /// Raises global errors: toggles each bit of `errors` that is not already active. Returns
    /// the bits that became active.
    pub fn raise_errors(&mut self, errors: u32) -> u32 {
        let newly = errors & Gerror::MASK & !self.active_errors().into_bits();
        self.gerror ^= newly;
        newly
    }

    /// Reads a 32-bit register (`offset` 4-byte aligned, page 1 included).
    fn read32(&self, off: u64) -> u32 {
        let id = &self.id;
        match off {
            offset::IDR0..=offset::IDR5 => {
                let i = usize::try_from(off.wrapping_sub(offset::IDR0) / 4).unwrap_or(usize::MAX);
                id.idr.get(i).copied().unwrap_or(0)
            }
            offset::IIDR => id.iidr,
            offset::AIDR => id.aidr,
            offset::CR0 | offset::CR0ACK => self.cr0.into_bits(),
            offset::CR1 => self.cr1.into_bits(),
            offset::CR2 => self.cr2.into_bits(),
            offset::GBPA => self.gbpa.into_bits(),
            offset::IRQ_CTRL | offset::IRQ_CTRLACK => self.irq_ctrl.into_bits(),
            offset::GERROR => self.gerror,
            offset::GERRORN => self.gerrorn,
            offset::GERROR_IRQ_CFG1 if self.msi => self.gerror_irq.cfg1,
            offset::GERROR_IRQ_CFG2 if self.msi => self.gerror_irq.cfg2,
            offset::STRTAB_BASE_CFG => self.strtab_base_cfg.into_bits(),
            offset::CMDQ_PROD => self.cmdq.prod,
            offset::CMDQ_CONS => self.cmdq_cons(),
            offset::EVENTQ_PROD => self.eventq_prod(),
            offset::EVENTQ_CONS => self.eventq.cons,
            offset::EVENTQ_IRQ_CFG1 if self.msi => self.eventq_irq.cfg1,
            offset::EVENTQ_IRQ_CFG2 if self.msi => self.eventq_irq.cfg2,
            o if (offset::ID_REGS_START..0x1000).contains(&o) => {
                let i = usize::try_from(o.wrapping_sub(offset::ID_REGS_START) / 4)
                    .unwrap_or(usize::MAX);
                CORESIGHT_IDS.get(i).copied().unwrap_or(0)
            }
            // STATUSR, AGBPA, the PRI queue (IDR0.PRI = 0), and every unimplemented or
            // reserved offset: RAZ.
            _ => 0,
        }
    }

    /// The 64-bit register at `off`, if there is one.
    fn reg64(&self, off: u64) -> Option<u64> {
        Some(match off {
            offset::GERROR_IRQ_CFG0 if self.msi => self.gerror_irq.cfg0,
            offset::STRTAB_BASE => self.strtab_base.into_bits(),
            offset::CMDQ_BASE => self.cmdq.base,
            offset::EVENTQ_BASE => self.eventq.base,
            offset::EVENTQ_IRQ_CFG0 if self.msi => self.eventq_irq.cfg0,
            _ => return None,
        })
    }

    /// Normalises an offset: the page-0 copies of the page-1 queue registers, which some
    /// implementations provide and QEMU's model uses, reach the same registers.
    fn canonical(off: u64) -> u64 {
        match off {
            0xa8 | 0xac | 0xc8 | 0xcc => off | offset::PAGE1,
            _ => off,
        }
    }

    /// An MMIO read of `size` (4 or 8) bytes at `off` (aligned).
    pub fn read(&self, off: u64, size: u32) -> u64 {
        let off = Self::canonical(off);
        if size == 8 {
            if let Some(v) = self.reg64(off) {
                return v;
            }
            // A 64-bit access to a pair of 32-bit registers reads both.
            let hi = self.read32(off.wrapping_add(4));
            return u64::from(self.read32(off)) | (u64::from(hi) << 32);
        }
        if let Some(v) = self.reg64(off) {
            return v & 0xffff_ffff;
        }
        if let Some(v) = off.checked_sub(4).and_then(|low| self.reg64(low)) {
            return v >> 32;
        }
        u64::from(self.read32(off))
    }

    /// An MMIO write of `size` (4 or 8) bytes at `off` (aligned). Returns the actions the
    /// model must take, in order.
    pub fn write(&mut self, off: u64, size: u32, value: u64, actions: &mut Vec<RegisterAction>) {
        let off = Self::canonical(off);
        if size == 8 {
            if self.reg64(off).is_some() {
                self.write64(off, value);
            } else {
                self.write32(off, value as u32, actions);
                self.write32(off.wrapping_add(4), (value >> 32) as u32, actions);
            }
            return;
        }
        let v = value as u32;
        if let Some(old) = self.reg64(off) {
            self.write64(off, (old & !0xffff_ffff) | u64::from(v));
        } else if let Some(old) = off.checked_sub(4).and_then(|low| self.reg64(low)) {
            self.write64(
                off.wrapping_sub(4),
                (old & 0xffff_ffff) | (u64::from(v) << 32),
            );
        } else {
            self.write32(off, v, actions);
        }
    }

    fn write64(&mut self, off: u64, v: u64) {
        match off {
            // An interrupt's MSI configuration may change only while it is disabled.
            offset::GERROR_IRQ_CFG0 if self.msi && !self.irq_ctrl.gerror_irqen() => {
                self.gerror_irq.cfg0 = v & IrqCfg0::WRITABLE;
            }
            offset::EVENTQ_IRQ_CFG0 if self.msi && !self.irq_ctrl.eventq_irqen() => {
                self.eventq_irq.cfg0 = v & IrqCfg0::WRITABLE;
            }
            // The stream table base may change only while translation is off.
            offset::STRTAB_BASE if !self.cr0.smmuen() => {
                self.strtab_base = StrtabBase::from_bits(v & StrtabBase::WRITABLE);
            }
            // Queue bases may change only while their queue is disabled.
            offset::CMDQ_BASE if !self.cr0.cmdqen() => self.cmdq.base = v & QueueBase::WRITABLE,
            offset::EVENTQ_BASE if !self.cr0.eventqen() => {
                self.eventq.base = v & QueueBase::WRITABLE;
            }
            _ => {}
        }
    }

    fn write32(&mut self, off: u64, v: u32, actions: &mut Vec<RegisterAction>) {
        match off {
            offset::CR0 => {
                let old = self.cr0;
                self.cr0 = Cr0::from_bits(v & self.cr0_writable());
                if old != self.cr0 {
                    actions.push(RegisterAction::Cr0 { old, new: self.cr0 });
                }
            }
            offset::CR1 => self.write_cr1(v),
            offset::CR2 if !self.cr0.smmuen() => self.cr2 = Cr2::from_bits(v & Cr2::WRITABLE),
            // The attributes change only with UPDATE = 1 (a write without it is ignored); the
            // update completes at once, so UPDATE always reads 0.
            offset::GBPA if Gbpa::from_bits(v).update() => {
                let old = self.gbpa;
                self.gbpa = Gbpa::from_bits(v & Gbpa::FIELDS);
                actions.push(RegisterAction::Gbpa {
                    old,
                    new: self.gbpa,
                });
            }
            offset::IRQ_CTRL => self.irq_ctrl = IrqCtrl::from_bits(v & self.irq_ctrl_writable()),
            offset::GERRORN => {
                self.gerrorn = v & Gerror::MASK;
                actions.push(RegisterAction::GerrorAck);
            }
            offset::GERROR_IRQ_CFG1 if self.msi && !self.irq_ctrl.gerror_irqen() => {
                self.gerror_irq.cfg1 = v;
            }
            offset::GERROR_IRQ_CFG2 if self.msi && !self.irq_ctrl.gerror_irqen() => {
                self.gerror_irq.cfg2 = v & IrqCfg2::WRITABLE;
            }
            offset::STRTAB_BASE_CFG if !self.cr0.smmuen() => {
                self.strtab_base_cfg = StrtabBaseCfg::from_bits(v & StrtabBaseCfg::WRITABLE);
            }
            offset::CMDQ_PROD => {
                self.cmdq.prod = v & POINTER_BITS;
                actions.push(RegisterAction::CmdqProd);
            }
            // CONS is the SMMU's while the queue runs; software may set it while disabled.
            offset::CMDQ_CONS if !self.cr0.cmdqen() => self.cmdq.cons = v & POINTER_BITS,
            offset::EVENTQ_PROD if !self.cr0.eventqen() => {
                self.eventq.prod = v & (POINTER_BITS | queue_reg::OVERFLOW);
            }
            offset::EVENTQ_CONS => {
                self.eventq.cons = v & (POINTER_BITS | queue_reg::OVERFLOW);
                actions.push(RegisterAction::EventqCons);
            }
            offset::EVENTQ_IRQ_CFG1 if self.msi && !self.irq_ctrl.eventq_irqen() => {
                self.eventq_irq.cfg1 = v;
            }
            offset::EVENTQ_IRQ_CFG2 if self.msi && !self.irq_ctrl.eventq_irqen() => {
                self.eventq_irq.cfg2 = v & IrqCfg2::WRITABLE;
            }
            // ID registers, CR0ACK, IRQ_CTRLACK, GERROR, STATUSR are read-only; AGBPA, the PRI
            // queue and unimplemented offsets ignore writes.
            _ => {}
        }
    }
}
