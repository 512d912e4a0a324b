//! The event queue: writing event records, overflow, and its interrupt.

use vm_memory::GuestAddress;

use super::spec::event::Event;
use super::spec::regs::{Gerror, queue_reg};
use super::{GuestMemory, IrqLine, Smmu};

impl Smmu {
    /// Records an event in the guest's event queue.
    ///
    /// An event is lost when the queue is disabled, when an earlier write aborted
    /// (GERROR.EVENTQ_ABT_ERR active), or when the queue is full; a full queue toggles the
    /// overflow flag EVENTQ_PROD.OVFLG unless an overflow is already unacknowledged (SMMUv3
    /// 7.4). A write outside guest memory raises GERROR.EVENTQ_ABT_ERR.
    pub(super) fn record_event<M: GuestMemory>(&mut self, mem: &M, event: &Event) {
        if !self.regs.cr0.eventqen() || self.regs.active_errors().eventq_abt_err() {
            self.counters.events_lost = self.counters.events_lost.saturating_add(1);
            return;
        }
        let q = self
            .regs
            .eventq
            .geometry(self.features.eventqs, Event::SIZE);
        let prod = self.regs.eventq.prod;
        let cons = self.regs.eventq.cons;
        if q.is_full(prod, cons) {
            self.counters.events_lost = self.counters.events_lost.saturating_add(1);
            // Toggle OVFLG unless an overflow is already unacknowledged (OVFLG != OVACKFLG).
            if (prod ^ cons) & queue_reg::OVERFLOW == 0 {
                self.regs.eventq.prod ^= queue_reg::OVERFLOW;
            }
            return;
        }
        let written = q
            .entry_address(prod)
            .is_some_and(|addr| mem.write_slice(&event.bytes(), GuestAddress(addr)).is_ok());
        if !written {
            self.counters.events_lost = self.counters.events_lost.saturating_add(1);
            self.raise_gerror(mem, Gerror::new().with_eventq_abt_err(true).into_bits());
            return;
        }
        self.counters.events = self.counters.events.saturating_add(1);
        self.regs.eventq.prod = q.increment(prod);
        // The interrupt source is the queue becoming non-empty (SMMUv3 3.18.2).
        if q.is_empty(prod, cons) {
            self.signal_eventq(mem);
        }
    }

    fn signal_eventq<M: GuestMemory>(&mut self, mem: &M) {
        if self.regs.irq_ctrl.eventq_irqen() {
            let cfg = self.regs.eventq_irq;
            self.signal(mem, IrqLine::Evtq, cfg);
        }
    }
}
