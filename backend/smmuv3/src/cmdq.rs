//! The command queue: fetching, executing and completing commands, and command errors.

use vm_memory::GuestAddress;

use super::queue::QueueGeometry;
use super::spec::cmd::{Opcode, RawCommand, sync_cs};
use super::spec::regs::{Gerror, Idr5, cerror, queue_reg};
use super::tlb::{TlbTag, overlaps};
use super::{CmdqStatus, Effect, GuestMemory, IrqLine, SidRange, Smmu};

/// Most commands fetched with one guest memory read.
const FETCH_BATCH: usize = 128;

/// Commands fetched ahead of CONS, as a hardware prefetch buffer holds them. Entries between
/// CONS and PROD belong to the SMMU until consumed, so they stay valid until then; any write
/// that moves the queue (base, CONS, enables, reset) clears the buffer.
#[derive(Debug)]
pub(super) struct Prefetch {
    /// The CONS value of `cmds[next]`.
    cons: u32,
    cmds: [RawCommand; FETCH_BATCH],
    len: usize,
    next: usize,
}

impl Default for Prefetch {
    fn default() -> Self {
        Self {
            cons: 0,
            cmds: [RawCommand::default(); FETCH_BATCH],
            len: 0,
            next: 0,
        }
    }
}

impl Prefetch {
    /// Drops every fetched command.
    pub(super) fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
    }

    /// The fetched command at `cons`, if the buffer holds it.
    fn take(&self, cons: u32) -> Option<RawCommand> {
        if self.next < self.len && self.cons == cons {
            self.cmds.get(self.next).copied()
        } else {
            None
        }
    }

    /// The command at `cons` was consumed; the buffer moves on to `new_cons`.
    fn advance(&mut self, new_cons: u32) {
        if self.next < self.len {
            self.next = self.next.saturating_add(1);
            self.cons = new_cons;
        }
    }

    /// Fetches a run of contiguous entries from `cons` towards `prod` (up to the end of the
    /// queue) with one read and returns the first. A run that cannot be read is fetched entry
    /// by entry, so that the caller's CERROR_ABT names the exact entry.
    fn fill<M: GuestMemory>(
        &mut self,
        mem: &M,
        q: &QueueGeometry,
        prod: u32,
        cons: u32,
    ) -> Option<RawCommand> {
        self.clear();
        let size = 1u32 << q.log2size;
        let (rd, wr) = (q.index(cons), q.index(prod));
        let pending = if wr > rd {
            wr.wrapping_sub(rd)
        } else {
            size.saturating_sub(rd)
        };
        let run = usize::try_from(pending)
            .unwrap_or(FETCH_BATCH)
            .clamp(1, FETCH_BATCH);
        let addr = q.entry_address(cons)?;
        let mut buf = [0u8; FETCH_BATCH * 16];
        let bytes = buf.get_mut(..run.saturating_mul(16))?;
        if mem.read_slice(bytes, GuestAddress(addr)).is_err() {
            return read_command(mem, addr);
        }
        for (slot, raw) in self.cmds.iter_mut().zip(bytes.chunks_exact(16)) {
            let (d0, d1) = raw.split_at(8);
            *slot = RawCommand {
                d0: u64::from_le_bytes(d0.try_into().unwrap_or_default()),
                d1: u64::from_le_bytes(d1.try_into().unwrap_or_default()),
            };
        }
        self.len = run;
        self.cons = cons;
        self.cmds.first().copied()
    }
}

/// A command that CERROR_ILL refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Illegal;

/// What executing one command led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Consumed.
    Done,
    /// A CMD_SYNC that must wait for pending effects.
    Barrier,
}

impl Smmu {
    /// Processes the command queue until it is empty, disabled or stopped by an error, or until
    /// a CMD_SYNC must wait for effects to be carried out ([`CmdqStatus::SyncBarrier`]).
    ///
    /// Commands are fetched in runs of up to [`FETCH_BATCH`] contiguous entries with one guest
    /// memory read; a run that cannot be read is fetched entry by entry, so that CERROR_ABT
    /// names the exact entry.
    pub(crate) fn run_cmdq<M: GuestMemory>(&mut self, mem: &M) -> CmdqStatus {
        loop {
            if !self.regs.cr0.cmdqen() || self.regs.active_errors().cmdq_err() {
                return CmdqStatus::Idle;
            }
            let q = self
                .regs
                .cmdq
                .geometry(self.features.cmdqs, RawCommand::SIZE);
            let cons = self.regs.cmdq.cons;
            if q.is_empty(self.regs.cmdq.prod, cons) {
                return CmdqStatus::Idle;
            }
            let cmd = match self.prefetch.take(cons) {
                Some(cmd) => Some(cmd),
                None => self.prefetch.fill(mem, &q, self.regs.cmdq.prod, cons),
            };
            let Some(cmd) = cmd else {
                self.command_error(mem, cerror::ABT);
                return CmdqStatus::Idle;
            };
            match self.execute(mem, &cmd) {
                Ok(Outcome::Done) => {
                    self.counters.commands = self.counters.commands.saturating_add(1);
                    self.regs.cmdq.cons = q.increment(cons);
                    self.prefetch.advance(self.regs.cmdq.cons);
                }
                Ok(Outcome::Barrier) => return CmdqStatus::SyncBarrier,
                Err(Illegal) => {
                    self.prefetch.clear();
                    self.command_error(mem, cerror::ILL);
                    return CmdqStatus::Idle;
                }
            }
        }
    }

    /// The host could not complete the invalidations before the CMD_SYNC the queue stopped
    /// at: the sync fails with CERROR_ATC_INV_SYNC and the effects still pending are dropped.
    pub(super) fn fail_sync<M: GuestMemory>(&mut self, mem: &M) {
        self.effects
            .retain(|e| !matches!(e, Effect::HostInvalidate(_)));
        self.command_error(mem, cerror::ATC_INV_SYNC);
    }

    /// Stops the queue on the command at CONS: CMDQ_CONS.ERR and GERROR.CMDQ_ERR.
    pub(super) fn command_error<M: GuestMemory>(&mut self, mem: &M, error: u32) {
        self.counters.command_errors = self.counters.command_errors.saturating_add(1);
        let field = queue_reg::ERR_MASK << queue_reg::ERR_SHIFT;
        self.regs.cmdq.cons = (self.regs.cmdq.cons & !field) | (error << queue_reg::ERR_SHIFT);
        self.raise_gerror(mem, Gerror::new().with_cmdq_err(true).into_bits());
    }

    fn execute<M: GuestMemory>(&mut self, mem: &M, cmd: &RawCommand) -> Result<Outcome, Illegal> {
        let f = self.features;
        match cmd.opcode() {
            Opcode::PREFETCH_CONFIG | Opcode::PREFETCH_ADDR => no_ssec(cmd)?,
            Opcode::CFGI_STE => {
                no_ssec(cmd)?;
                self.invalidate_streams(SidRange {
                    first: cmd.sid(),
                    last: cmd.sid(),
                });
            }
            Opcode::CFGI_STE_RANGE => {
                no_ssec(cmd)?;
                self.invalidate_streams(ste_range(cmd.sid(), cmd.range()));
            }
            Opcode::CFGI_CD => {
                no_ssec(cmd)?;
                require(f.s1p)?;
                self.configs
                    .invalidate_contexts(cmd.sid(), Some(cmd.ssid()));
                self.effects.push(Effect::HostInvalidate(*cmd));
            }
            Opcode::CFGI_CD_ALL => {
                no_ssec(cmd)?;
                require(f.s1p)?;
                self.configs.invalidate_contexts(cmd.sid(), None);
                self.effects.push(Effect::HostInvalidate(*cmd));
            }
            Opcode::TLBI_NH_ALL => {
                require(f.s1p)?;
                let vmid = self.vmid_scope(cmd);
                self.invalidate_tlb(cmd, 0, u64::MAX, |tag, _| tag.asid.is_some() && vmid(tag));
            }
            Opcode::TLBI_NH_ASID => {
                require(f.s1p)?;
                let vmid = self.vmid_scope(cmd);
                let asid = cmd.asid();
                self.invalidate_tlb(cmd, 0, u64::MAX, |tag, _| {
                    tag.asid == Some(asid) && vmid(tag)
                });
            }
            Opcode::TLBI_NH_VA => {
                require(f.s1p)?;
                self.valid_range(cmd)?;
                let (start, last) = self.tlbi_range(cmd, cmd.address());
                // Entries of the ASID (in the VMID), and global entries of the VMID.
                let tag = TlbTag {
                    vmid: f.s2p.then(|| cmd.vmid()),
                    asid: Some(cmd.asid()),
                };
                if self.iotlb.has_global() || !self.iotlb.remove_range(tag, start, last) {
                    let vmid = self.vmid_scope(cmd);
                    self.iotlb.invalidate(|t, m| {
                        t.asid.is_some()
                            && vmid(t)
                            && (t.asid == tag.asid || m.global)
                            && overlaps(m, start, last)
                    });
                }
                self.translations_stale(cmd, start, last);
            }
            Opcode::TLBI_NH_VAA => {
                require(f.s1p)?;
                self.valid_range(cmd)?;
                let vmid = self.vmid_scope(cmd);
                let (start, last) = self.tlbi_range(cmd, cmd.address());
                self.invalidate_tlb(cmd, start, last, |tag, m| {
                    tag.asid.is_some() && vmid(tag) && overlaps(m, start, last)
                });
            }
            Opcode::TLBI_S12_VMALL => {
                require(f.s2p)?;
                let vmid = cmd.vmid();
                self.invalidate_tlb(cmd, 0, u64::MAX, |tag, _| tag.vmid == Some(vmid));
            }
            Opcode::TLBI_S2_IPA => {
                require(f.s2p)?;
                self.valid_range(cmd)?;
                let vmid = cmd.vmid();
                let (start, last) = self.tlbi_range(cmd, cmd.ipa());
                // Stage-2-only entries are indexed by IPA. Nested entries do not keep the IPA
                // they went through, so every nested entry of the VMID goes.
                self.invalidate_tlb(cmd, 0, u64::MAX, |tag, m| {
                    tag.vmid == Some(vmid)
                        && m.s2.is_some()
                        && (tag.asid.is_some() || overlaps(m, start, last))
                });
            }
            Opcode::TLBI_NSNH_ALL => {
                self.iotlb.clear();
                self.effects.push(Effect::TranslationsInvalidated {
                    start: 0,
                    last: u64::MAX,
                });
                self.effects.push(Effect::HostInvalidate(*cmd));
            }
            Opcode::ATC_INV => {
                require(f.ats)?;
                // Ignored while translation is off.
                if self.regs.cr0.smmuen() {
                    self.effects.push(Effect::HostInvalidate(*cmd));
                }
            }
            Opcode::CMD_SYNC => {
                if cmd.sync_cs() > sync_cs::SIG_SEV {
                    return Err(Illegal);
                }
                if self.has_effects() {
                    return Ok(Outcome::Barrier);
                }
                self.complete_sync(mem, cmd);
            }
            // EL2 and EL3 TLB maintenance (no IDR0.HYP, no Secure state), PRI responses (no
            // IDR0.PRI), RESUME and STALL_TERM (STALL_MODEL = 1: no stalls), CFGI_VMS_PIDM,
            // and every opcode the architecture does not define.
            _ => return Err(Illegal),
        }
        Ok(Outcome::Done)
    }

    /// Signals a CMD_SYNC's completion (SMMUv3 4.7.3). CS = SIG_IRQ: an MSI write of MSIData
    /// when the SMMU has MSIs and MSIAddress is not zero, to MSIAddress truncated to the OAS
    /// (3.4.3); otherwise the wired CMD_SYNC interrupt. CS = none, or SEV without IDR0.SEV:
    /// nothing.
    fn complete_sync<M: GuestMemory>(&mut self, mem: &M, cmd: &RawCommand) {
        if cmd.sync_cs() != sync_cs::SIG_IRQ {
            return;
        }
        // Like the queues' and GERROR's: the MSI when one is configured, else the wired line
        // (an MSI address of 0 is what lets a wired interrupt be used, IHI 0070 3.18).
        match self.msi_target(cmd.sync_msiaddr()) {
            Some(address) => self.msi_write(mem, address, cmd.sync_msidata()),
            None => self.effects.push(Effect::Irq(IrqLine::CmdSync)),
        }
    }

    /// A range invalidation with TG set but NUM, SCALE and TTL all zero is Reserved
    /// (SMMUv3 4.4.1.1), TTL taken as [`Smmu::effective_ttl`]. Without IDR3.RIL the range
    /// fields are RES0 and ignored.
    fn valid_range(&self, cmd: &RawCommand) -> Result<(), Illegal> {
        let reserved =
            cmd.tg() != 0 && cmd.num() == 0 && cmd.scale() == 0 && self.effective_ttl(cmd) == 0;
        if self.features.ril && reserved {
            Err(Illegal)
        } else {
            Ok(())
        }
    }

    /// A TLBI's TTL \[73:72\] as the SMMU uses it. With TG = 16K (0b10), TTL = 0b01 (level 1)
    /// is reserved unless IDR5.DS (52-bit addresses with 16K) is set, and is treated as 0b00
    /// (SMMUv3 4.4.1.1, as for the PE's TLBI TTL).
    fn effective_ttl(&self, cmd: &RawCommand) -> u8 {
        let ds = Idr5::from_bits(self.regs.id.idr[5]).ds();
        match (cmd.tg(), cmd.ttl()) {
            (2, 1) if !ds => 0,
            (_, ttl) => ttl,
        }
    }

    /// STE invalidation: drop cached STEs and CDs and have the streams re-evaluated.
    fn invalidate_streams(&mut self, range: SidRange) {
        self.configs.invalidate_streams(range.first, range.last);
        self.effects.push(Effect::StreamsChanged(range));
    }

    /// A predicate on an entry's VMID for TLBI_NH_*: with stage 2 implemented, entries of the
    /// command's VMID; without, every entry.
    fn vmid_scope(&self, cmd: &RawCommand) -> impl Fn(&TlbTag) -> bool + use<> {
        let vmid = self.features.s2p.then(|| cmd.vmid());
        move |tag: &TlbTag| vmid.is_none() || tag.vmid == vmid
    }

    /// Drops IOTLB entries, tells the frontend which input range went stale, and forwards the
    /// command to the host.
    fn invalidate_tlb(
        &mut self,
        cmd: &RawCommand,
        start: u64,
        last: u64,
        stale: impl FnMut(&TlbTag, &super::walk::Mapping) -> bool,
    ) {
        self.iotlb.invalidate(stale);
        self.translations_stale(cmd, start, last);
    }

    /// Tells the frontend which input range went stale and forwards the command to the host.
    fn translations_stale(&mut self, cmd: &RawCommand, start: u64, last: u64) {
        self.effects
            .push(Effect::TranslationsInvalidated { start, last });
        self.effects.push(Effect::HostInvalidate(*cmd));
    }

    /// The input range a TLBI by address covers. Without range invalidation (IDR3.RIL = 0 or
    /// TG = 0) it is the one address: every entry containing it goes. With TG set it is
    /// (NUM + 1) << SCALE granules of TG's size from the address.
    fn tlbi_range(&self, cmd: &RawCommand, address: u64) -> (u64, u64) {
        let tg = cmd.tg();
        if !self.features.ril || tg == 0 {
            return (address, address);
        }
        let granule_shift: u32 = match tg {
            1 => 12,
            2 => 14,
            _ => 16,
        };
        let granule = 1u64 << granule_shift;
        let start = address & !granule.wrapping_sub(1);
        let length = u64::from(cmd.num())
            .saturating_add(1)
            .checked_mul(1u64 << cmd.scale().min(63))
            .and_then(|pages| pages.checked_mul(granule));
        let last = length.map_or(u64::MAX, |len| start.saturating_add(len.wrapping_sub(1)));
        (start, last)
    }
}

/// Commands with an SSec field are illegal with SSec = 1 on the Non-secure queue.
fn no_ssec(cmd: &RawCommand) -> Result<(), Illegal> {
    if cmd.ssec() { Err(Illegal) } else { Ok(()) }
}

/// A command that needs a feature this SMMU lacks is illegal.
fn require(feature: bool) -> Result<(), Illegal> {
    if feature { Ok(()) } else { Err(Illegal) }
}

/// The StreamIDs CFGI_STE_RANGE covers: 2^(Range + 1) STEs aligned to that size, or all of
/// them for Range = 31 (CFGI_ALL).
fn ste_range(sid: u32, range: u8) -> SidRange {
    if range >= 31 {
        return SidRange::ALL;
    }
    let span_mask = (1u32 << range.saturating_add(1)).wrapping_sub(1);
    let first = sid & !span_mask;
    SidRange {
        first,
        last: first | span_mask,
    }
}

fn read_command<M: GuestMemory>(mem: &M, addr: u64) -> Option<RawCommand> {
    let d0 = mem.read_obj::<u64>(GuestAddress(addr)).ok()?;
    let d1 = mem
        .read_obj::<u64>(GuestAddress(addr.checked_add(8)?))
        .ok()?;
    Some(RawCommand {
        d0: u64::from_le(d0),
        d1: u64::from_le(d1),
    })
}
