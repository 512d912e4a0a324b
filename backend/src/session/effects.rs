//! Carrying out what the model asks (interrupts, backend-channel messages, host
//! invalidations), and the guest's accesses that produce it: MMIO writes served barrier by
//! barrier, and TRANSLATE.

use log::warn;
use viommu_protocol::types::{
    Access, IotlbInvalidate, IrqIndex, MmioAccess, MsiWrite, Perm, TranslateReply, TranslateRequest,
};
use viommu_protocol::{BackendRequest, Error, ErrorReply, Request, Status};
use viommu_smmuv3::walk::AccessKind;
use viommu_smmuv3::{BarrierOutcome, CmdqStatus, Effect, IrqLine, SidRange};

use super::handed_out;
use super::{Session, model, refuse};
use crate::host::RawCmd;

impl Session {
    pub(super) fn mmio_write(&mut self, access: MmioAccess, value: u64) -> Result<(), ErrorReply> {
        let ram = &self.ram;
        let smmu = model(&mut self.smmu)?;
        let mut status = smmu.mmio_write(ram, access.offset, access.size.bytes(), value);
        loop {
            // Effects before a CMD_SYNC are carried out (and acknowledged on the backend
            // channel) before the sync completes.
            let outcome = self.run_effects()?;
            let Some(smmu) = self
                .smmu
                .as_mut()
                .filter(|_| status == CmdqStatus::SyncBarrier)
            else {
                if self.passthrough.is_some() {
                    self.follow_eventq();
                }
                return Ok(());
            };
            status = smmu.serve_barrier(&self.ram, outcome);
        }
    }

    pub(super) fn serve_translate(
        &mut self,
        t: &TranslateRequest,
    ) -> Result<TranslateReply, ErrorReply> {
        self.counters.translations = self.counters.translations.saturating_add(1);
        let access = AccessKind {
            read: t.access.contains(Access::READ),
            write: t.access.contains(Access::WRITE),
            exec: t.access.contains(Access::EXEC),
            privileged: t.access.contains(Access::PRIV),
        };
        let ram = &self.ram;
        let smmu = model(&mut self.smmu)?;
        let result = smmu.translate(ram, t.sid, t.ssid, t.iova, access);
        self.run_effects()?;
        Ok(match result {
            Ok(tr) => {
                let mask = 1u64
                    .checked_shl(tr.size_shift)
                    .map_or(u64::MAX, |s| s.wrapping_sub(1));
                let mut perm = Perm::empty();
                perm.set(Perm::READ, tr.read);
                perm.set(Perm::WRITE, tr.write);
                if perm.is_empty() {
                    // Reachable only for probes of a mapping that allows nothing.
                    TranslateReply::Fault { event: 0 }
                } else {
                    let start = t.iova & !mask;
                    let device = self.devices.iter().find(|(_, d)| d.sid == t.sid);
                    let handle = device.map(|(&h, _)| h);
                    // With the shared region, the frontend holds translations elsewhere only
                    // for the devices that said so (docs/protocol.md, 10.6).
                    let notify = device.is_some_and(|(_, d)| d.unmap_notify);
                    if self.shared.is_none() || notify {
                        self.handed_out.record(handle, start, start | mask);
                    } else {
                        // A device with UNMAP_NOTIFY never uses the cache (10.6).
                        self.fill_translation(t.sid, t.ssid, t.iova, access, &tr);
                    }
                    TranslateReply::Translated {
                        addr: tr.output_base,
                        addr_mask: mask,
                        perm,
                    }
                }
            }
            Err(fault) => TranslateReply::Fault {
                event: fault.event.map_or(0, |e| e.0),
            },
        })
    }

    /// Carries out the model's effects: interrupt eventfds, and the backend-channel messages
    /// the frontend must have processed before the guest can observe completion (the last one
    /// is sent with NEED_REPLY and waited for). Returns how the CMD_SYNC barrier these effects
    /// precede, if any, was served: whether every host invalidation went through.
    pub(super) fn run_effects(&mut self) -> Result<BarrierOutcome, ErrorReply> {
        let effects: Vec<Effect> = match self.smmu.as_mut() {
            Some(smmu) if smmu.has_effects() => smmu.take_effects(),
            _ => return Ok(BarrierOutcome::Served),
        };
        // The guest may read the registers as soon as an interrupt or MSI below reports a
        // change: publish first (a sync's MSI into RAM needs nothing, 10.3 orders it).
        if effects
            .iter()
            .any(|e| matches!(e, Effect::Irq(_) | Effect::MsiWrite { .. }))
        {
            self.publish();
        }
        let mut outcome = BarrierOutcome::Served;
        let mut outgoing = Vec::new();
        let mut stale = Vec::new();
        let mut host_cmds: Vec<RawCmd> = Vec::new();
        let mut changed: Vec<SidRange> = Vec::new();
        let mut cache_stale = Vec::new();
        for effect in effects {
            match effect {
                Effect::Irq(line) => self.pulse(line),
                Effect::MsiWrite { address, data } => {
                    outgoing.push(BackendRequest::MsiWrite(MsiWrite { address, data }));
                }
                Effect::StreamsChanged(range) => changed.push(range),
                // One address (a TLBI without a range): the translations containing it, of
                // whatever size they were handed out.
                Effect::TranslationsInvalidated { start, last } if start == last => {
                    cache_stale.push((start, last));
                    stale.push(self.handed_out.containing(start));
                }
                Effect::TranslationsInvalidated { start, last } => {
                    cache_stale.push((start, last));
                    stale.push((start, last));
                }
                Effect::HostInvalidate(cmd) => host_cmds.push([cmd.d0, cmd.d1]),
            }
        }
        // The shared translation cache is cleaned in one pass for the whole batch, before the
        // CMD_SYNC completes (docs/protocol.md, 10.6).
        self.clear_cached(handed_out::coalesce(cache_stale), &changed);
        // The streams of the whole batch are re-evaluated together, after one confirmation of
        // the devices' SIDs.
        self.update_spaces(&changed, &mut outgoing)?;
        // Every invalidation before the CMD_SYNC reaches the host in one call per vIOMMU.
        if !host_cmds.is_empty()
            && let Some(p) = self.passthrough.as_mut()
            && let Err(e) = p.invalidate(&host_cmds)
        {
            warn!("host invalidation failed: {e}");
            outcome = BarrierOutcome::HostInvalidationFailed;
        }
        // One message per run of adjacent ranges, and none for what the frontend cannot
        // have cached.
        for (start, last) in handed_out::coalesce(stale) {
            if self.handed_out.invalidate_all(start, last) {
                outgoing.push(BackendRequest::IotlbInvalidate(IotlbInvalidate {
                    handle: None,
                    ssid: None,
                    start,
                    last,
                }));
            }
        }
        self.send_backend(outgoing)?;
        Ok(outcome)
    }

    /// Sends backend-channel requests in order: all posted but the last, which is
    /// acknowledged, so that the frontend has processed all of them on return.
    pub(super) fn send_backend(&mut self, requests: Vec<BackendRequest>) -> Result<(), ErrorReply> {
        let Some(channel) = self.channel.as_ref() else {
            return Ok(());
        };
        let count = requests.len();
        self.counters.channel_messages =
            self.counters.channel_messages.saturating_add(count as u64);
        for (i, request) in requests.into_iter().enumerate() {
            let last = i.saturating_add(1) == count;
            let result = if last {
                channel.call(&request).map(drop)
            } else {
                channel.post(&request)
            };
            match result {
                Ok(()) => {}
                Err(e) if !e.is_fatal() => {
                    warn!("{} failed: {}", request.name(), crate::error_chain(&e))
                }
                Err(e) => return Err(self.channel_failed(&e)),
            }
        }
        Ok(())
    }

    /// The backend channel broke, or a reply on it did not come in time: the frontend may
    /// have missed what the backend told it, and the channel is out of step. The request in
    /// progress fails with INTERNAL and the session ends after its reply (docs/protocol.md,
    /// section 5).
    pub(super) fn channel_failed(&mut self, e: &Error) -> ErrorReply {
        let text = crate::error_chain(e);
        self.channel_broken = Some(text.clone());
        refuse(Status::INTERNAL, format!("backend channel failed: {text}"))
    }

    pub(super) fn pulse(&self, line: IrqLine) {
        let index = match line {
            IrqLine::Evtq => IrqIndex::Evtq,
            IrqLine::Priq => IrqIndex::Priq,
            IrqLine::CmdSync => IrqIndex::CmdSync,
            IrqLine::Gerror => IrqIndex::Gerror,
        };
        if let Some(Some(fd)) = self.irqs.get(index.index() as usize)
            && let Err(e) = rustix::io::write(fd, &1u64.to_ne_bytes())
        {
            warn!("signalling {line:?} failed: {e}");
        }
    }
}
