//! `viommu-smmuv3`: a model of the ARM SMMUv3 (IHI 0070) for one guest, as a pure library. It
//! reads and writes guest memory through vm-memory and returns effects; it does no socket,
//! file or ioctl I/O, and forbids unsafe_code. It speaks its own types: the daemon converts
//! between them and the wire protocol at its edge.
//!
//! - [`spec`]: the architecture's registers and structures;
//! - [`register_file`]: register semantics (the layouts are [`spec::regs`]); [`queue`]: queue index arithmetic;
//! - [`stream`]: STE and CD lookup and decoding; [`walk`]: page-table walks;
//! - [`tlb`]: the IOTLB and configuration caches;
//! - `cmdq`, `evtq`, `translate`: the command queue, event queue and translation engines,
//!   as methods of [`Smmu`].

#![forbid(unsafe_code)]

pub mod capabilities;
mod cmdq;
mod evtq;
pub mod queue;
pub mod register_file;
pub mod snapshot;
pub mod spec;
pub mod stream;
pub mod tlb;
mod translate;
pub mod walk;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

pub use capabilities::{Capabilities, IdRegisters};
pub use translate::{Translation, TranslationFault};

use register_file::{RegisterAction, Registers};
use spec::cmd::RawCommand;
use spec::event::EventId;
use tlb::{ConfigCache, Iotlb};
use walk::FaultKind;

/// Guest memory as the model reads it: anything vm-memory can read and write objects in.
pub trait GuestMemory: Bytes<GuestAddress, E = GuestMemoryError> {}

impl<T: Bytes<GuestAddress, E = GuestMemoryError>> GuestMemory for T {}

/// The SMMU's four interrupt lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqLine {
    /// Event queue.
    Evtq,
    /// PRI queue.
    Priq,
    /// CMD_SYNC completion.
    CmdSync,
    /// Global error.
    Gerror,
}

/// A range of StreamIDs, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SidRange {
    /// First StreamID.
    pub first: u32,
    /// Last StreamID.
    pub last: u32,
}

impl SidRange {
    /// Every StreamID.
    pub const ALL: SidRange = SidRange {
        first: 0,
        last: u32::MAX,
    };
}

/// What the model asks its host to do. The model has already updated its own state; effects
/// are for the world outside it (interrupt eventfds, the frontend, the host IOMMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Pulse an interrupt line.
    Irq(IrqLine),
    /// Deliver an MSI: a 32-bit write to a guest physical address outside guest RAM (the
    /// interrupt controller's doorbell).
    MsiWrite {
        /// Doorbell address.
        address: u64,
        /// Payload.
        data: u32,
    },
    /// The configuration of these streams may have changed (STE invalidation, SMMUEN or GBPA
    /// change, reset): re-evaluate what each attached device uses (address space, host HWPT).
    StreamsChanged(SidRange),
    /// Translations in `[start, last]` may be stale for every device (the frontend drops its
    /// cached TRANSLATE results). `start == last` comes from a TLBI by address without a
    /// range (TG = 0): every translation that contains that address, whatever its size.
    TranslationsInvalidated {
        /// First input address.
        start: u64,
        /// Last input address, inclusive.
        last: u64,
    },
    /// A guest invalidation command (TLBI_*, ATC_INV, CFGI_CD*) for the host IOMMU to apply to
    /// passthrough devices' nested translations.
    HostInvalidate(RawCommand),
}

/// What governs a stream's transactions right now, for the parts of the backend that mirror it
/// outside the model (the frontend's address space for the device, the host's nested STE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    /// SMMUEN = 0 and GBPA.ABORT = 0: every transaction bypasses.
    GlobalBypass,
    /// SMMUEN = 0 and GBPA.ABORT = 1: every transaction aborts.
    GlobalAbort,
    /// The STE the guest installed, and what it decodes to.
    Ste {
        /// The raw entry.
        ste: spec::ste::Ste,
        /// Its decoding, or why it is ILLEGAL.
        config: Result<stream::StreamConfig, stream::ConfigFault>,
    },
    /// No STE is reachable for the StreamID (out of range, invalid L1 descriptor, fetch
    /// abort).
    Unreachable(stream::ConfigFault),
}

/// Where a register write, or a served barrier, left the command queue.
///
/// The barrier rule is the model's API: [`Smmu::mmio_write`] runs the command queue itself,
/// to quiescence or to the first CMD_SYNC that must wait for the effects produced before it.
/// At a barrier the caller carries those effects out (see [`Smmu::take_effects`]) and answers
/// with [`Smmu::serve_barrier`], which completes (or fails) the sync and runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a SyncBarrier must be answered with Smmu::serve_barrier"]
pub enum CmdqStatus {
    /// Nothing left to do: the queue is empty, disabled, or stopped on an error.
    Idle,
    /// A CMD_SYNC waits for the effects produced before it: carry them out, then call
    /// [`Smmu::serve_barrier`].
    SyncBarrier,
}

/// How the caller carried out the effects before a CMD_SYNC barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierOutcome {
    /// Every effect was carried out: the CMD_SYNC completes.
    Served,
    /// The host IOMMU could not complete the invalidations ([`Effect::HostInvalidate`]): the
    /// sync fails with CERROR_ATC_INV_SYNC, the architecture's error for invalidations that
    /// did not complete, and GERROR.CMDQ_ERR; effects still pending are dropped.
    HostInvalidationFailed,
}

/// Counters for observability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Commands consumed.
    pub commands: u64,
    /// Commands refused with CERROR_ILL or CERROR_ABT.
    pub command_errors: u64,
    /// Events written to the event queue.
    pub events: u64,
    /// Events lost (queue disabled, full, or aborted).
    pub events_lost: u64,
    /// Translations served.
    pub translations: u64,
    /// Translations served from the IOTLB.
    pub iotlb_hits: u64,
}

/// One virtual SMMUv3.
#[derive(Debug)]
pub struct Smmu {
    features: Capabilities,
    regs: Registers,
    iotlb: Iotlb,
    configs: ConfigCache,
    effects: Vec<Effect>,
    actions: Vec<RegisterAction>,
    counters: Counters,
    prefetch: cmdq::Prefetch,
}

/// The event type of a walk fault.
pub fn fault_event_id(kind: FaultKind) -> EventId {
    match kind {
        FaultKind::Translation => EventId::F_TRANSLATION,
        FaultKind::AddrSize => EventId::F_ADDR_SIZE,
        FaultKind::Access => EventId::F_ACCESS,
        FaultKind::Permission => EventId::F_PERMISSION,
        FaultKind::WalkEabt => EventId::F_WALK_EABT,
    }
}

impl Smmu {
    /// An SMMU with these features, in its reset state.
    pub fn new(features: Capabilities) -> Self {
        Self {
            regs: Registers::new(features.id_regs(), features.msi),
            features,
            iotlb: Iotlb::default(),
            configs: ConfigCache::default(),
            effects: Vec::new(),
            actions: Vec::new(),
            counters: Counters::default(),
            prefetch: cmdq::Prefetch::default(),
        }
    }

    /// The features.
    pub fn features(&self) -> &Capabilities {
        &self.features
    }

    /// The ID registers the guest reads.
    pub fn id_regs(&self) -> IdRegisters {
        self.regs.id
    }

    /// The register state (for state save and inspection).
    pub fn registers(&self) -> &Registers {
        &self.regs
    }

    /// Counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Number of IOTLB entries.
    pub fn iotlb_len(&self) -> usize {
        self.iotlb.len()
    }

    /// Back to the reset state: registers, queues and caches. Every stream is re-evaluated.
    pub fn reset(&mut self) {
        self.regs = Registers::new(self.features.id_regs(), self.features.msi);
        self.iotlb.clear();
        self.configs.clear();
        self.prefetch.clear();
        self.effects.push(Effect::StreamsChanged(SidRange::ALL));
    }

    /// Takes the effects produced so far, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Drains the effects produced so far, in order, keeping the buffer for reuse.
    pub fn drain_effects(&mut self) -> std::vec::Drain<'_, Effect> {
        self.effects.drain(..)
    }

    /// Whether effects are waiting.
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }

    /// What governs stream `sid` now (reads the guest's stream table; records no event).
    pub fn stream_state<M: GuestMemory>(&self, mem: &M, sid: u32) -> StreamState {
        if !self.regs.cr0.smmuen() {
            return if self.regs.gbpa.abort() {
                StreamState::GlobalAbort
            } else {
                StreamState::GlobalBypass
            };
        }
        match stream::fetch_ste(mem, &self.regs, &self.features, sid) {
            Ok(ste) => StreamState::Ste {
                ste,
                config: stream::decode_ste(&ste, &self.features),
            },
            Err(fault) => StreamState::Unreachable(fault),
        }
    }

    /// A guest register read.
    pub fn mmio_read(&mut self, offset: u64, size: u32) -> u64 {
        self.regs.read(offset, size)
    }

    /// A guest register write, then the command processing it may start (a CMDQ_PROD write, a
    /// command queue enabled, a GERROR acknowledged): to quiescence or to the first barrier
    /// the caller must serve.
    pub fn mmio_write<M: GuestMemory>(
        &mut self,
        mem: &M,
        offset: u64,
        size: u32,
        value: u64,
    ) -> CmdqStatus {
        let mut actions = std::mem::take(&mut self.actions);
        let cmdq_before = (self.regs.cmdq.base, self.regs.cmdq.cons, self.regs.cr0);
        self.regs.write(offset, size, value, &mut actions);
        if (self.regs.cmdq.base, self.regs.cmdq.cons, self.regs.cr0) != cmdq_before {
            self.prefetch.clear();
        }
        for action in actions.drain(..) {
            self.apply(mem, action);
        }
        self.actions = actions;
        self.run_cmdq(mem)
    }

    /// Answers a [`CmdqStatus::SyncBarrier`]: the CMD_SYNC the queue stopped at completes (or
    /// fails, see [`BarrierOutcome`]) and command processing goes on.
    pub fn serve_barrier<M: GuestMemory>(
        &mut self,
        mem: &M,
        outcome: BarrierOutcome,
    ) -> CmdqStatus {
        if outcome == BarrierOutcome::HostInvalidationFailed {
            self.fail_sync(mem);
        }
        self.run_cmdq(mem)
    }

    fn apply<M: GuestMemory>(&mut self, _mem: &M, action: RegisterAction) {
        match action {
            RegisterAction::Cr0 { old, new } => {
                if old.smmuen() != new.smmuen() {
                    // Translation turns on or off for every stream. The configuration and
                    // TLB caches are not required to be coherent across this; start clean.
                    self.configs.clear();
                    self.iotlb.clear();
                    self.effects.push(Effect::StreamsChanged(SidRange::ALL));
                    self.effects.push(Effect::TranslationsInvalidated {
                        start: 0,
                        last: u64::MAX,
                    });
                }
            }
            RegisterAction::Gbpa { old, new } => {
                if old.abort() != new.abort() && !self.regs.cr0.smmuen() {
                    self.effects.push(Effect::StreamsChanged(SidRange::ALL));
                    self.effects.push(Effect::TranslationsInvalidated {
                        start: 0,
                        last: u64::MAX,
                    });
                }
            }
            // Command processing resumes at the end of mmio_write.
            RegisterAction::CmdqProd | RegisterAction::GerrorAck | RegisterAction::EventqCons => {}
        }
    }

    /// Raises global errors and signals the GERROR interrupt for those that became active.
    fn raise_gerror<M: GuestMemory>(&mut self, mem: &M, errors: u32) {
        let newly = self.regs.raise_errors(errors);
        let signalled = newly
            & !spec::regs::Gerror::new()
                .with_msi_gerror_abt_err(true)
                .into_bits();
        if signalled != 0 && self.regs.irq_ctrl.gerror_irqen() {
            let cfg = self.regs.gerror_irq;
            self.signal(mem, IrqLine::Gerror, cfg);
        }
    }

    /// Signals an interrupt: an MSI when MSIs are implemented and configured, else the wired
    /// line.
    pub(crate) fn signal<M: GuestMemory>(
        &mut self,
        mem: &M,
        line: IrqLine,
        cfg: register_file::IrqCfg,
    ) {
        match cfg
            .msi_address()
            .and_then(|address| self.msi_target(address))
        {
            Some(address) => self.msi_write(mem, address, cfg.cfg1),
            None => self.effects.push(Effect::Irq(line)),
        }
    }

    /// Where an MSI to `address` goes: SMMU-originated accesses use physical addresses
    /// truncated to the OAS (SMMUv3 3.4.3). `None` without IDR0.MSI, or when the truncated
    /// address is 0 (MSIs disabled).
    fn msi_target(&self, address: u64) -> Option<u64> {
        let address = address & self.features.oas_mask();
        (self.features.msi && address != 0).then_some(address)
    }

    /// A 32-bit MSI write: into guest RAM directly, or to the frontend for a doorbell.
    fn msi_write<M: GuestMemory>(&mut self, mem: &M, address: u64, data: u32) {
        if mem
            .write_slice(&data.to_le_bytes(), GuestAddress(address))
            .is_err()
        {
            self.effects.push(Effect::MsiWrite { address, data });
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::spec::regs::offset;
    use super::stream::{ConfigFault, StreamConfig};
    use super::*;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn stream_state_follows_gbpa_smmuen_and_the_stream_table() {
        let mem = mem();
        let mut smmu = Smmu::new(Capabilities::qemu_default());
        assert_eq!(
            smmu.stream_state(&mem, 3),
            StreamState::GlobalBypass,
            "GBPA resets to bypass"
        );
        // GBPA.ABORT with UPDATE.
        assert_eq!(
            smmu.mmio_write(&mem, offset::GBPA, 4, (1 << 31) | (1 << 20)),
            CmdqStatus::Idle
        );
        assert_eq!(
            smmu.mmio_read(offset::GBPA, 4),
            1 << 20,
            "UPDATE reads 0 once done"
        );
        assert_eq!(smmu.stream_state(&mem, 3), StreamState::GlobalAbort);
        let effects = smmu.take_effects();
        assert!(
            effects.contains(&Effect::StreamsChanged(SidRange::ALL)),
            "{effects:?}"
        );
        // A linear table of 16 STEs at 0x8000; STE 3 bypasses.
        mem.write_obj(0x9u64, GuestAddress(0x8000 + 3 * 64))
            .unwrap();
        assert_eq!(
            smmu.mmio_write(&mem, offset::STRTAB_BASE, 8, 0x8000),
            CmdqStatus::Idle
        );
        assert_eq!(
            smmu.mmio_write(&mem, offset::STRTAB_BASE_CFG, 4, 4),
            CmdqStatus::Idle
        );
        assert_eq!(smmu.mmio_write(&mem, offset::CR0, 4, 1), CmdqStatus::Idle);
        match smmu.stream_state(&mem, 3) {
            StreamState::Ste { ste, config } => {
                assert_eq!(ste.words[0], 0x9);
                assert_eq!(config, Ok(StreamConfig::Bypass));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            smmu.stream_state(&mem, 16),
            StreamState::Unreachable(ConfigFault::BadStreamId)
        );
        assert!(matches!(
            smmu.stream_state(&mem, 4),
            StreamState::Ste {
                config: Err(ConfigFault::BadSte),
                ..
            }
        ));
        // The query records nothing.
        assert_eq!(smmu.counters().events, 0);
    }
}
