//! The model's architectural state as a versioned, serializable snapshot (GET_STATE /
//! SET_STATE). Caches are not part of it: they are rebuilt from guest memory.

use serde::{Deserialize, Serialize};

use super::register_file::{IrqCfg, QueueRegs, Registers};
use super::spec::regs::{
    Cr0, Cr1, Cr2, Gbpa, Gerror, IrqCfg0, IrqCfg2, IrqCtrl, QueueBase, StrtabBase, StrtabBaseCfg,
    queue_reg,
};
use super::{Capabilities, Effect, SidRange, Smmu};

/// The snapshot format's version.
pub const SNAPSHOT_VERSION: u32 = 1;

/// A queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// *_BASE.
    pub base: u64,
    /// *_PROD.
    pub prod: u32,
    /// *_CONS.
    pub cons: u32,
}

/// An interrupt's MSI configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrqState {
    /// *_IRQ_CFG0.
    pub cfg0: u64,
    /// *_IRQ_CFG1.
    pub cfg1: u32,
    /// *_IRQ_CFG2.
    pub cfg2: u32,
}

/// Every register that holds state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmmuSnapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The ID registers the guest saw (IDR0..5, IIDR, AIDR): a restore must match them.
    pub id: [u32; 8],
    pub cr0: u32,
    pub cr1: u32,
    pub cr2: u32,
    pub gbpa: u32,
    pub irq_ctrl: u32,
    pub gerror: u32,
    pub gerrorn: u32,
    pub gerror_irq: IrqState,
    pub strtab_base: u64,
    pub strtab_base_cfg: u32,
    pub cmdq: QueueState,
    pub eventq: QueueState,
    pub eventq_irq: IrqState,
}

/// Why a snapshot cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// Another format version.
    #[error("snapshot version {0}, this backend reads version {SNAPSHOT_VERSION}")]
    Version(u32),
    /// The guest saw other ID registers than this vSMMU has.
    #[error("snapshot ID registers {found:x?} differ from this vSMMU's {expected:x?}")]
    IdRegisters {
        /// This vSMMU's.
        expected: [u32; 8],
        /// The snapshot's.
        found: [u32; 8],
    },
}

impl SmmuSnapshot {
    /// The snapshot a register file holds: `read(offset)` gives the u32 register at an MMIO
    /// offset, as an MMIO read returns it (a copy of the mirror a backend publishes, from which
    /// a backend that replaces a dead one resumes; docs/protocol.md 10.10). Every register that
    /// holds state is readable, so the register file is the whole architectural state.
    pub fn from_registers(read: impl Fn(u64) -> u32) -> Self {
        use crate::spec::regs::offset;
        let r64 = |o: u64| u64::from(read(o)) | u64::from(read(o.wrapping_add(4))) << 32;
        let irq = |cfg0: u64, cfg1: u64, cfg2: u64| IrqState {
            cfg0: r64(cfg0),
            cfg1: read(cfg1),
            cfg2: read(cfg2),
        };
        Self {
            version: SNAPSHOT_VERSION,
            id: [
                read(offset::IDR0),
                read(offset::IDR1),
                read(offset::IDR2),
                read(offset::IDR3),
                read(offset::IDR4),
                read(offset::IDR5),
                read(offset::IIDR),
                read(offset::AIDR),
            ],
            cr0: read(offset::CR0),
            cr1: read(offset::CR1),
            cr2: read(offset::CR2),
            gbpa: read(offset::GBPA),
            irq_ctrl: read(offset::IRQ_CTRL),
            gerror: read(offset::GERROR),
            gerrorn: read(offset::GERRORN),
            gerror_irq: irq(
                offset::GERROR_IRQ_CFG0,
                offset::GERROR_IRQ_CFG1,
                offset::GERROR_IRQ_CFG2,
            ),
            strtab_base: r64(offset::STRTAB_BASE),
            strtab_base_cfg: read(offset::STRTAB_BASE_CFG),
            cmdq: QueueState {
                base: r64(offset::CMDQ_BASE),
                prod: read(offset::CMDQ_PROD),
                cons: read(offset::CMDQ_CONS),
            },
            eventq: QueueState {
                base: r64(offset::EVENTQ_BASE),
                prod: read(offset::EVENTQ_PROD),
                cons: read(offset::EVENTQ_CONS),
            },
            eventq_irq: irq(
                offset::EVENTQ_IRQ_CFG0,
                offset::EVENTQ_IRQ_CFG1,
                offset::EVENTQ_IRQ_CFG2,
            ),
        }
    }
}

fn id_array(features: &Capabilities) -> [u32; 8] {
    let id = features.id_regs();
    [
        id.idr[0], id.idr[1], id.idr[2], id.idr[3], id.idr[4], id.idr[5], id.iidr, id.aidr,
    ]
}

impl Smmu {
    /// The architectural state.
    pub fn snapshot(&self) -> SmmuSnapshot {
        let r = &self.regs;
        let q = |q: &QueueRegs| QueueState {
            base: q.base,
            prod: q.prod,
            cons: q.cons,
        };
        let irq = |c: &IrqCfg| IrqState {
            cfg0: c.cfg0,
            cfg1: c.cfg1,
            cfg2: c.cfg2,
        };
        SmmuSnapshot {
            version: SNAPSHOT_VERSION,
            id: id_array(&self.features),
            cr0: r.cr0.into_bits(),
            cr1: r.cr1.into_bits(),
            cr2: r.cr2.into_bits(),
            gbpa: r.gbpa.into_bits(),
            irq_ctrl: r.irq_ctrl.into_bits(),
            gerror: r.gerror,
            gerrorn: r.gerrorn,
            gerror_irq: irq(&r.gerror_irq),
            strtab_base: r.strtab_base.into_bits(),
            strtab_base_cfg: r.strtab_base_cfg.into_bits(),
            cmdq: q(&r.cmdq),
            eventq: q(&r.eventq),
            eventq_irq: irq(&r.eventq_irq),
        }
    }

    /// Restores a snapshot taken from a vSMMU with the same ID registers. Every value is
    /// masked to what its register can hold, as if the guest had written it; caches start
    /// empty and every stream is re-evaluated.
    pub fn restore(&mut self, s: &SmmuSnapshot) -> Result<(), RestoreError> {
        if s.version != SNAPSHOT_VERSION {
            return Err(RestoreError::Version(s.version));
        }
        let expected = id_array(&self.features);
        if s.id != expected {
            return Err(RestoreError::IdRegisters {
                expected,
                found: s.id,
            });
        }
        let msi = self.features.msi;
        let pointer = 0x000f_ffff;
        let q = |q: &QueueState, prod_extra: u32, cons_extra: u32| QueueRegs {
            base: q.base & QueueBase::WRITABLE,
            prod: q.prod & (pointer | prod_extra),
            cons: q.cons & (pointer | cons_extra),
        };
        let irq = |c: &IrqState| {
            if msi {
                IrqCfg {
                    cfg0: c.cfg0 & IrqCfg0::WRITABLE,
                    cfg1: c.cfg1,
                    cfg2: c.cfg2 & IrqCfg2::WRITABLE,
                }
            } else {
                IrqCfg::default()
            }
        };
        let err_field = queue_reg::ERR_MASK << queue_reg::ERR_SHIFT;
        let mut regs = Registers::new(self.features.id_regs(), msi);
        regs.cr0 = Cr0::from_bits(s.cr0 & regs.cr0_writable());
        regs.cr1 = Cr1::from_bits(s.cr1 & Cr1::WRITABLE);
        regs.cr2 = Cr2::from_bits(s.cr2 & Cr2::WRITABLE);
        regs.gbpa = Gbpa::from_bits(s.gbpa & Gbpa::FIELDS);
        regs.irq_ctrl = IrqCtrl::from_bits(s.irq_ctrl & regs.irq_ctrl_writable());
        regs.gerror = s.gerror & Gerror::MASK;
        regs.gerrorn = s.gerrorn & Gerror::MASK;
        regs.gerror_irq = irq(&s.gerror_irq);
        regs.strtab_base = StrtabBase::from_bits(s.strtab_base & StrtabBase::WRITABLE);
        regs.strtab_base_cfg =
            StrtabBaseCfg::from_bits(s.strtab_base_cfg & StrtabBaseCfg::WRITABLE);
        regs.cmdq = q(&s.cmdq, 0, err_field);
        regs.eventq = q(&s.eventq, queue_reg::OVERFLOW, queue_reg::OVERFLOW);
        regs.eventq_irq = irq(&s.eventq_irq);
        self.regs = regs;
        self.iotlb.clear();
        self.configs.clear();
        self.prefetch.clear();
        self.effects.push(Effect::StreamsChanged(SidRange::ALL));
        Ok(())
    }

    /// Signals every enabled interrupt whose condition holds now: the event queue not empty,
    /// global errors not acknowledged (GERROR != GERRORN). For a backend that resumes a vSMMU
    /// whose previous backend may have died between a change and its interrupt; a spurious
    /// edge only makes the driver look.
    pub fn signal_pending<M: vm_memory::GuestMemory>(&mut self, mem: &M) {
        let q = self
            .regs
            .eventq
            .geometry(self.features.eventqs, crate::spec::event::Event::SIZE);
        let (prod, cons) = (self.regs.eventq.prod, self.regs.eventq.cons);
        let overflowed = (prod ^ cons) & queue_reg::OVERFLOW != 0;
        if self.regs.cr0.eventqen() && (!q.is_empty(prod, cons) || overflowed) {
            self.signal_eventq(mem);
        }
        if self.regs.gerror ^ self.regs.gerrorn != 0 && self.regs.irq_ctrl.gerror_irqen() {
            let cfg = self.regs.gerror_irq;
            self.signal(mem, crate::IrqLine::Gerror, cfg);
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::spec::regs::offset;

    /// The register file an MMIO reader sees holds the whole architectural state: a snapshot
    /// taken from it is the model's own, for Linux's probe-time values (the register values
    /// arm-smmu-v3 writes for a 2^8-entry linear stream table and 2^8-entry queues).
    #[test]
    fn the_register_file_is_the_whole_state() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut a = Smmu::new(Capabilities::qemu_default());
        for (off, size, value) in [
            (offset::STRTAB_BASE, 8, 0x4000_0000_0008_0000),
            (offset::STRTAB_BASE_CFG, 4, 0x8),
            (offset::CMDQ_BASE, 8, 0x4000_0000_0009_0008),
            (offset::EVENTQ_BASE, 8, 0x4000_0000_000a_0008),
            (offset::EVENTQ_CONS, 4, 0x8000_0000),
            (offset::GERRORN, 4, 0),
            (offset::IRQ_CTRL, 4, 0x5),
            (offset::CR1, 4, 0xd75),
            (offset::CR2, 4, 0x4),
            (offset::CR0, 4, 0xd),
        ] {
            assert_eq!(
                a.mmio_write(&mem, off, size, value),
                crate::CmdqStatus::Idle
            );
        }
        let file: std::collections::BTreeMap<u64, u32> = (0..0x200u64)
            .step_by(4)
            .chain((0x100a0..0x100d0).step_by(4))
            .map(|o| (o, a.mmio_read(o, 4) as u32))
            .collect();
        let read = |o: u64| file.get(&o).copied().unwrap_or(0);
        assert_eq!(SmmuSnapshot::from_registers(read), a.snapshot());
        let mut b = Smmu::new(Capabilities::qemu_default());
        b.restore(&SmmuSnapshot::from_registers(read)).unwrap();
        assert_eq!(b.snapshot(), a.snapshot());
    }

    /// A resumed vSMMU signals what may not have been signalled: an enabled event queue with
    /// entries, unacknowledged global errors; nothing when there is nothing to signal.
    #[test]
    fn pending_interrupts_are_signalled_again() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut s = Smmu::new(Capabilities::qemu_default());
        for (off, size, value) in [
            (offset::EVENTQ_BASE, 8, 0x3_0000 | 7),
            (offset::IRQ_CTRL, 4, 0x5),
            (offset::CR0, 4, 0x4),
        ] {
            assert_eq!(
                s.mmio_write(&mem, off, size, value),
                crate::CmdqStatus::Idle
            );
        }
        s.take_effects();
        s.signal_pending(&mem);
        assert!(s.take_effects().is_empty(), "an empty queue, no errors");
        let mut snap = s.snapshot();
        snap.eventq.prod = 2;
        snap.gerror = 1;
        s.restore(&snap).unwrap();
        s.take_effects();
        s.signal_pending(&mem);
        let irqs: Vec<_> = s
            .take_effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Irq(line) => Some(line),
                _ => None,
            })
            .collect();
        assert_eq!(irqs, [crate::IrqLine::Evtq, crate::IrqLine::Gerror]);
    }

    #[test]
    fn snapshot_round_trips_through_json_and_restores_registers() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut a = Smmu::new(Capabilities::qemu_default());
        for (off, size, value) in [
            (offset::STRTAB_BASE, 8, 0x8000),
            (offset::STRTAB_BASE_CFG, 4, 0x1_0208),
            (offset::CMDQ_BASE, 8, 0x2_0000 | 8),
            (offset::EVENTQ_BASE, 8, 0x3_0000 | 7),
            (offset::EVENTQ_CONS, 4, 0x8000_0003),
            (offset::IRQ_CTRL, 4, 5),
            (offset::CR0, 4, 0xd),
        ] {
            assert_eq!(
                a.mmio_write(&mem, off, size, value),
                crate::CmdqStatus::Idle
            );
        }
        let json = serde_json::to_string(&a.snapshot()).unwrap();
        let snap: SmmuSnapshot = serde_json::from_str(&json).unwrap();
        let mut b = Smmu::new(Capabilities::qemu_default());
        b.restore(&snap).unwrap();
        for off in [offset::STRTAB_BASE, offset::CMDQ_BASE, offset::EVENTQ_BASE] {
            assert_eq!(b.mmio_read(off, 8), a.mmio_read(off, 8), "offset {off:#x}");
        }
        for off in [
            offset::CR0,
            offset::CR0ACK,
            offset::STRTAB_BASE_CFG,
            offset::EVENTQ_CONS,
            offset::IRQ_CTRL,
            offset::GBPA,
        ] {
            assert_eq!(b.mmio_read(off, 4), a.mmio_read(off, 4), "offset {off:#x}");
        }
        // A snapshot of another configuration is refused.
        let other = Capabilities {
            ssid_bits: 8,
            ..Capabilities::qemu_default()
        };
        assert!(matches!(
            Smmu::new(other).restore(&snap),
            Err(RestoreError::IdRegisters { .. })
        ));
        let mut old = snap.clone();
        old.version = 0;
        assert_eq!(b.restore(&old), Err(RestoreError::Version(0)));
        // Unknown fields are refused.
        assert!(
            serde_json::from_str::<SmmuSnapshot>(&json.replace("\"cr1\"", "\"cr9\":0,\"cr1\""))
                .is_err()
        );
    }
}
