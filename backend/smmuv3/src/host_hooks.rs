//! What the host IOMMU layer feeds back into the model in passthrough mode: events the host
//! SMMU recorded for a guest's stream, vSTEs the kernel refused, and host invalidations that
//! failed before a CMD_SYNC could complete.

use super::spec::event::{Event, EventId};
use super::spec::regs::{cerror, queue_reg};
use super::{GuestMemory, Smmu};

impl Smmu {
    /// Records an event the host SMMU reported through the vEVENTQ (its StreamID already the
    /// guest's), in the guest's event queue with the architectural overflow behaviour.
    pub fn record_host_event<M: GuestMemory>(&mut self, mem: &M, record: [u64; 4]) {
        self.record_event(mem, &Event { words: record });
    }

    /// The host dropped events (the vEVENTQ overflowed): the guest's queue overflows too,
    /// EVENTQ_PROD.OVFLG toggling unless an overflow is already unacknowledged (SMMUv3 7.4).
    pub fn record_host_events_lost(&mut self) {
        self.counters.events_lost = self.counters.events_lost.saturating_add(1);
        let (prod, cons) = (self.regs.eventq.prod, self.regs.eventq.cons);
        if self.regs.cr0.eventqen() && (prod ^ cons) & queue_reg::OVERFLOW == 0 {
            self.regs.eventq.prod ^= queue_reg::OVERFLOW;
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

    /// The host could not complete the invalidations before the CMD_SYNC the command queue
    /// stopped at ([`super::CmdqStatus::SyncBarrier`]): the sync fails with CERROR_ATC_INV_SYNC, the
    /// architecture's error for invalidations that did not complete, and GERROR.CMDQ_ERR. The
    /// effects still pending are dropped.
    pub fn fail_sync<M: GuestMemory>(&mut self, mem: &M) {
        self.effects
            .retain(|e| !matches!(e, super::Effect::HostInvalidate(_)));
        self.command_error(mem, cerror::ATC_INV_SYNC);
    }
}
