//! The event queue consumer, as Linux's `arm_smmu_evtq_thread()` drains it.

use super::event::Event;
use super::mem::{GuestRam, read_qwords};
use super::port::SmmuPort;
use super::queue::LlQueue;
use super::regs::{ARM_SMMU_EVTQ_CONS, ARM_SMMU_EVTQ_PROD, EVTQ_ENT_DWORDS};
use super::{DriverError, Result};

/// The event queue as the driver tracks it.
#[derive(Debug, Clone)]
pub struct Evtq {
    /// Guest physical address of entry 0.
    pub base: u64,
    /// Shadow PROD/CONS (`q->llq`).
    pub llq: LlQueue,
}

/// What one run of the event-queue thread found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvtqBatch {
    /// The records, oldest first.
    pub events: Vec<Event>,
    /// PROD.OVFLG changed: events were lost ("EVTQ overflow detected").
    pub overflow: bool,
}

impl Evtq {
    /// A queue of `2^shift` 32-byte records at `base`.
    pub fn new(base: u64, shift: u8) -> Self {
        Self {
            base,
            llq: LlQueue::new(shift),
        }
    }

    /// The EVTQ_BASE value Linux writes (`q->q_base`).
    pub fn q_base(&self) -> u64 {
        self.llq.q_base(self.base)
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.llq.bytes(EVTQ_ENT_DWORDS)
    }

    /// Address of the record a CONS value points at.
    pub fn entry_addr(&self, p: u32) -> Result<u64> {
        self.llq
            .entry_addr(self.base, p, EVTQ_ENT_DWORDS)
            .ok_or(DriverError::Overflow)
    }

    /// `queue_sync_prod_in`: reads PROD; true when its overflow flag changed.
    fn sync_prod_in<P: SmmuPort>(&mut self, port: &mut P) -> bool {
        let prod = port.read(ARM_SMMU_EVTQ_PROD, 4) as u32;
        let overflow = LlQueue::ovf(prod) != LlQueue::ovf(self.llq.prod);
        self.llq.prod = prod;
        overflow
    }

    /// `arm_smmu_evtq_thread()`: reads every record, writing CONS after each
    /// (`queue_remove_raw`), re-reads PROD until the queue is empty, and finally acknowledges
    /// an overflow by copying OVFLG into CONS.OVACKFLG (`queue_sync_cons_ovf`).
    pub fn drain<P: SmmuPort, M: GuestRam>(&mut self, port: &mut P, mem: &M) -> Result<EvtqBatch> {
        let mut batch = EvtqBatch::default();
        // The thread runs on an interrupt: start from the current PROD.
        batch.overflow |= self.sync_prod_in(port);
        let mut guard = 0u32;
        loop {
            while !self.llq.empty() {
                let raw = read_qwords::<M, 4>(mem, self.entry_addr(self.llq.cons)?)?;
                batch.events.push(Event(raw));
                self.llq.cons = self.llq.inc(self.llq.cons);
                port.write(ARM_SMMU_EVTQ_CONS, 4, u64::from(self.llq.cons));
                guard = guard.saturating_add(1);
                if guard > self.llq.entries().saturating_mul(4).max(64) {
                    return Err(DriverError::Timeout("event queue never drains"));
                }
            }
            batch.overflow |= self.sync_prod_in(port);
            if self.llq.empty() {
                break;
            }
        }
        let cons =
            LlQueue::ovf(self.llq.prod) | self.llq.wrp(self.llq.cons) | self.llq.idx(self.llq.cons);
        self.llq.cons = cons;
        port.write(ARM_SMMU_EVTQ_CONS, 4, u64::from(cons));
        Ok(batch)
    }
}
