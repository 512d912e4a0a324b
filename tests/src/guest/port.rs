//! How the driver reaches the SMMU's registers: [`SmmuPort`], and [`DirectPort`], which calls
//! the model in-process.

use viommu_smmuv3::walk::AccessKind;
use viommu_smmuv3::{
    BarrierOutcome, Capabilities, CmdqStatus, Effect, GuestMemory, Smmu, Translation,
    TranslationFault,
};
use vm_memory::GuestMemoryMmap;

/// The SMMU's MMIO window as a guest CPU sees it.
pub trait SmmuPort {
    /// A `size`-byte (4 or 8) read at `offset` in the 128 KiB register window.
    fn read(&mut self, offset: u64, size: u32) -> u64;
    /// A `size`-byte (4 or 8) write at `offset`.
    fn write(&mut self, offset: u64, size: u32, value: u64);
}

impl<P: SmmuPort + ?Sized> SmmuPort for &mut P {
    fn read(&mut self, offset: u64, size: u32) -> u64 {
        (**self).read(offset, size)
    }

    fn write(&mut self, offset: u64, size: u32, value: u64) {
        (**self).write(offset, size, value);
    }
}

/// Most barriers one register write may serve.
const MAX_ROUNDS: usize = 1 << 22;

/// The model in-process: every write is followed by command processing up to `Idle`, and every
/// effect the model produces is kept for the test to inspect.
#[derive(Debug)]
pub struct DirectPort<M: GuestMemory = GuestMemoryMmap<()>> {
    smmu: Smmu,
    mem: M,
    effects: Vec<Effect>,
}

impl<M: GuestMemory> DirectPort<M> {
    /// A new SMMU with `features`, reading and writing `mem`.
    pub fn new(features: Capabilities, mem: M) -> Self {
        Self {
            smmu: Smmu::new(features),
            mem,
            effects: Vec::new(),
        }
    }

    /// The model.
    pub fn smmu(&self) -> &Smmu {
        &self.smmu
    }

    /// The model, for `translate` and inspection.
    pub fn smmu_mut(&mut self) -> &mut Smmu {
        &mut self.smmu
    }

    /// The guest memory the model uses.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Moves the model's pending effects into the log.
    pub fn collect(&mut self) {
        let effects = self.smmu.take_effects();
        self.effects.extend(effects);
    }

    /// Every effect logged so far.
    pub fn effects(&self) -> &[Effect] {
        &self.effects
    }

    /// Takes the logged effects.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        self.collect();
        std::mem::take(&mut self.effects)
    }

    /// Serves barriers until the command queue is idle, keeping each barrier's effects.
    pub fn run(&mut self, mut status: CmdqStatus) {
        for _ in 0..MAX_ROUNDS {
            self.collect();
            if status == CmdqStatus::Idle {
                return;
            }
            status = self.smmu.serve_barrier(&self.mem, BarrierOutcome::Served);
        }
    }

    /// A transaction: `Smmu::translate`, keeping the effects it produced (interrupts).
    pub fn translate(
        &mut self,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        access: AccessKind,
    ) -> Result<Translation, TranslationFault> {
        let result = self.smmu.translate(&self.mem, sid, ssid, iova, access);
        self.collect();
        result
    }
}

impl<M: GuestMemory> SmmuPort for DirectPort<M> {
    fn read(&mut self, offset: u64, size: u32) -> u64 {
        self.smmu.mmio_read(offset, size)
    }

    fn write(&mut self, offset: u64, size: u32, value: u64) {
        let status = self.smmu.mmio_write(&self.mem, offset, size, value);
        self.run(status);
    }
}
