//! The event queue: writing event records, overflow, and its interrupt; and the events the
//! host IOMMU reports for a passthrough device's stream (relayed from the vEVENTQ), which go
//! the same way.

use vm_memory::GuestAddress;

use super::spec::event::{Event, EventId};
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
            self.overflow_eventq();
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

    pub(crate) fn signal_eventq<M: GuestMemory>(&mut self, mem: &M) {
        if self.regs.irq_ctrl.eventq_irqen() {
            let cfg = self.regs.eventq_irq;
            self.signal(mem, IrqLine::Evtq, cfg);
        }
    }

    /// An event was lost to a full queue: EVENTQ_PROD.OVFLG toggles unless an overflow is
    /// already unacknowledged (OVFLG != OVACKFLG, SMMUv3 7.4).
    fn overflow_eventq(&mut self) {
        self.counters.events_lost = self.counters.events_lost.saturating_add(1);
        let (prod, cons) = (self.regs.eventq.prod, self.regs.eventq.cons);
        if (prod ^ cons) & queue_reg::OVERFLOW == 0 {
            self.regs.eventq.prod ^= queue_reg::OVERFLOW;
        }
    }

    /// Records an event the host SMMU reported through the vEVENTQ (its StreamID already the
    /// guest's), in the guest's event queue with the architectural overflow behaviour.
    pub fn record_host_event<M: GuestMemory>(&mut self, mem: &M, record: [u64; 4]) {
        self.record_event(mem, &Event { words: record });
    }

    /// The host dropped events (the vEVENTQ overflowed): the guest's queue overflows too.
    pub fn record_host_events_lost(&mut self) {
        if self.regs.cr0.eventqen() {
            self.overflow_eventq();
        } else {
            self.counters.events_lost = self.counters.events_lost.saturating_add(1);
        }
    }

    /// The host refused the guest's STE for `sid` as ILLEGAL: C_BAD_STE, as the SMMU reports an
    /// ILLEGAL STE.
    pub fn record_bad_ste<M: GuestMemory>(&mut self, mem: &M, sid: u32) {
        self.record_event(mem, &Event::new(EventId::C_BAD_STE, sid));
    }

    /// The log2 of the guest's event queue entries while it is enabled (to size the host's
    /// vEVENTQ), capped at IDR1.EVENTQS.
    pub fn eventq_log2size(&self) -> Option<u8> {
        self.regs.cr0.eventqen().then(|| {
            self.regs
                .eventq
                .geometry(self.features.eventqs, Event::SIZE)
                .log2size
        })
    }
}
