//! Translating one transaction: global bypass or abort, the STE, the CD, the IOTLB and the
//! walk, with the events the architecture records for each failure.

use super::spec::event::{Event, EventId, class};
use super::stream::{self, ConfigFault, Context, Stage2, StreamConfig};
use super::tlb::TlbTag;
use super::walk::{self, AccessKind, FaultClass, FaultKind, Mapping, WalkFault};
use super::{GuestMemory, Smmu, fault_event_id};

/// A translation the transaction may use: `[input_base, input_base + 2^size_shift)` maps onto
/// `[output_base, ...)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Translation {
    /// First input address of the block.
    pub input_base: u64,
    /// First output address of the block.
    pub output_base: u64,
    /// log2 of the block size, up to 64 (the whole address space, for bypass).
    pub size_shift: u32,
    /// Reads allowed (for the access's privilege).
    pub read: bool,
    /// Writes allowed (for the access's privilege).
    pub write: bool,
}

impl Translation {
    fn identity() -> Self {
        Self {
            input_base: 0,
            output_base: 0,
            size_shift: 64,
            read: true,
            write: true,
        }
    }

    fn from_mapping(m: &Mapping, privileged: bool) -> Self {
        let allows = |read: bool| {
            let stage = |p: &walk::Permissions| match (privileged, read) {
                (true, true) => p.read_priv,
                (true, false) => p.write_priv,
                (false, true) => p.read_user,
                (false, false) => p.write_user,
            };
            m.s1.as_ref().is_none_or(stage) && m.s2.as_ref().is_none_or(stage)
        };
        Self {
            input_base: m.input_base,
            output_base: m.output_base,
            size_shift: m.size_shift,
            read: allows(true),
            write: allows(false),
        }
    }

    /// The output address of `input` (which must lie in the block).
    pub fn output(&self, input: u64) -> u64 {
        let mask = 1u64
            .checked_shl(self.size_shift)
            .map_or(u64::MAX, |s| s.wrapping_sub(1));
        self.output_base | (input & mask)
    }
}

/// A transaction that was refused: aborted, with the event recorded for it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TranslationFault {
    /// The event type written to the event queue, or `None` when none was (abort
    /// configurations, unrecorded faults, probes, lost events).
    pub event: Option<EventId>,
}

/// The address the IOTLB is indexed by: the input with the top byte cleared where stage 1
/// ignores it (TBI for the range that bit 55 selects).
fn tlb_input(context: Option<&Context>, iova: u64) -> u64 {
    match context {
        Some(c) => {
            let ttb1 = iova & (1 << 55) != 0;
            let tbi = if ttb1 { c.walk.tbi[1] } else { c.walk.tbi[0] };
            if tbi {
                iova & 0x00ff_ffff_ffff_ffff
            } else {
                iova
            }
        }
        None => iova,
    }
}

/// What a transaction is, for event records.
#[derive(Debug, Clone, Copy)]
struct Transaction {
    sid: u32,
    ssid: Option<u32>,
    iova: u64,
    access: AccessKind,
}

impl Transaction {
    fn event(&self, id: EventId) -> Event {
        Event::new(id, self.sid)
            .with_ssid(self.ssid)
            .with_access(self.access.write, self.access.privileged, self.access.exec)
            .with_input_addr(self.iova)
    }

    /// A walk fault's record: S2 and CLASS say where it happened (a stage-1 fault is CLASS
    /// IN, except a stage-1 F_WALK_EABT, which is CLASS TT); stage-2 faults carry the IPA,
    /// F_WALK_EABT the descriptor's address. RnW, PnU and InD always describe the transaction;
    /// a stage-2 F_PERMISSION on a stage-1 table access (CLASS = TT) also says in TTRnW what
    /// that table access was.
    fn walk_event(&self, fault: &WalkFault) -> Event {
        let eabt = fault.kind == FaultKind::WalkEabt;
        let class = match (fault.stage2, fault.class) {
            (true, FaultClass::Cd) => class::CD,
            (true, FaultClass::Tt) => class::TT,
            (true, FaultClass::In) => class::IN,
            (false, _) if eabt => class::TT,
            (false, _) => class::IN,
        };
        let mut ev = self
            .event(fault_event_id(fault.kind))
            .with_fault_stage(fault.stage2, class);
        if eabt {
            ev = ev.with_fetch_addr(fault.fetch_addr);
        } else if fault.stage2 {
            ev = ev.with_ipa(fault.ipa);
        }
        if fault.kind == FaultKind::Permission && fault.stage2 && fault.class == FaultClass::Tt {
            // The only table access the walker makes is a descriptor read (no HTTU).
            ev = ev.with_tt_read(walk::TABLE_FETCH.read);
        }
        ev
    }
}

impl Smmu {
    /// Translates a transaction from stream `sid` (substream `ssid`) at `iova`.
    ///
    /// An empty `access` is a probe: it reports what the mapping allows and records nothing.
    pub fn translate<M: GuestMemory>(
        &mut self,
        mem: &M,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        access: AccessKind,
    ) -> Result<Translation, TranslationFault> {
        self.counters.translations = self.counters.translations.saturating_add(1);
        let txn = Transaction {
            sid,
            ssid,
            iova,
            access,
        };
        let oas_limit = 1u64
            .checked_shl(u32::from(self.features.oas_bits))
            .unwrap_or(u64::MAX);
        if !self.regs.cr0.smmuen() {
            // GBPA governs every transaction, with or without SubstreamID; an input beyond
            // the OAS aborts without an event.
            return if self.regs.gbpa.abort() || iova >= oas_limit {
                Err(TranslationFault { event: None })
            } else {
                Ok(Translation::identity())
            };
        }
        let config = match self.configs.stream(sid) {
            Some(config) => *config,
            None => {
                let config = stream::fetch_ste(mem, &self.regs, &self.features, sid)
                    .and_then(|ste| stream::decode_ste(&ste, &self.features))
                    .map_err(|fault| self.config_fault(mem, &txn, fault, None))?;
                self.configs.insert_stream(sid, config);
                config
            }
        };
        let (table, s2, vmid) = match config {
            StreamConfig::Abort => return Err(TranslationFault { event: None }),
            StreamConfig::Bypass => (None, None, None),
            StreamConfig::Translate { s1, s2, vmid } => (s1, s2, vmid),
        };
        // A SubstreamID needs stage 1 (Config 0b1x0, bypass included, refuses it).
        if table.is_none() && ssid.is_some() {
            return Err(self.config_fault(mem, &txn, ConfigFault::BadSubstreamId, s2.as_ref()));
        }
        let context = match table {
            None => None,
            Some(table) => match self.configs.context(sid, ssid) {
                Some(context) => *context,
                None => {
                    let context = stream::fetch_cd(mem, &table, s2.as_ref(), ssid)
                        .and_then(|cd| {
                            cd.map(|cd| stream::decode_cd(&cd, &self.features))
                                .transpose()
                        })
                        .map_err(|fault| self.config_fault(mem, &txn, fault, s2.as_ref()))?;
                    self.configs.insert_context(sid, ssid, context);
                    context
                }
            },
        };
        let tag = TlbTag {
            vmid,
            asid: context.map(|c| c.asid),
        };
        let input = tlb_input(context.as_ref(), iova);
        if let Some(mapping) = self.iotlb.lookup(tag, input) {
            // A hit that refuses the access falls through to a full walk, which reports the
            // fault with every field of its record (the IPA of a stage-2 refusal included).
            if access.is_probe() || mapping.refuses(access).is_none() {
                self.counters.iotlb_hits = self.counters.iotlb_hits.saturating_add(1);
                return Ok(Translation::from_mapping(mapping, access.privileged));
            }
        }
        let s1_walk = context.as_ref().map(|c| &c.walk);
        let s2_walk = s2.as_ref().map(|s| &s.walk);
        // Stage 1 bypassed (Config 0b1x0, or S1DSS bypass): an input beyond the input address
        // size (the OAS here) is a stage-1 F_ADDR_SIZE, always recorded (SMMUv3 3.4).
        if s1_walk.is_none() && iova >= oas_limit {
            if access.is_probe() {
                return Err(TranslationFault { event: None });
            }
            let fault = WalkFault {
                kind: FaultKind::AddrSize,
                stage2: false,
                class: FaultClass::In,
                ipa: 0,
                fetch_addr: 0,
            };
            let event = txn.walk_event(&fault);
            return Err(self.report(mem, true, event));
        }
        if s1_walk.is_none() && s2_walk.is_none() {
            // Both stages bypassed: the input is the output.
            return Ok(Translation::identity());
        }
        match walk::walk_tables(mem, s1_walk, s2_walk, iova, access) {
            Ok(mapping) => {
                self.iotlb.insert(tag, mapping);
                Ok(Translation::from_mapping(&mapping, access.privileged))
            }
            Err(fault) => Err(self.walk_fault(mem, &txn, &fault, context.as_ref(), s2.as_ref())),
        }
    }

    /// Records (where the configuration says so) and reports a walk fault.
    fn walk_fault<M: GuestMemory>(
        &mut self,
        mem: &M,
        txn: &Transaction,
        fault: &WalkFault,
        context: Option<&Context>,
        s2: Option<&Stage2>,
    ) -> TranslationFault {
        let record = !txn.access.is_probe()
            && (fault.kind == FaultKind::WalkEabt
                || if fault.stage2 {
                    s2.is_some_and(|s| s.record)
                } else {
                    context.is_some_and(|c| c.record)
                });
        self.report(mem, record, txn.walk_event(fault))
    }

    /// Records (where the architecture says so) and reports a configuration fault.
    fn config_fault<M: GuestMemory>(
        &mut self,
        mem: &M,
        txn: &Transaction,
        fault: ConfigFault,
        s2: Option<&Stage2>,
    ) -> TranslationFault {
        let (event, record) = match fault {
            ConfigFault::BadStreamId => (
                Event::new(EventId::C_BAD_STREAMID, txn.sid).with_ssid(txn.ssid),
                self.regs.cr2.recinvsid(),
            ),
            ConfigFault::SteFetch(addr) => (
                Event::new(EventId::F_STE_FETCH, txn.sid)
                    .with_ssid(txn.ssid)
                    .with_fetch_addr(addr),
                true,
            ),
            // The SubstreamID field is always valid here, with no SSV qualifier.
            ConfigFault::BadSubstreamId => (
                Event::new(EventId::C_BAD_SUBSTREAMID, txn.sid)
                    .with_substream(txn.ssid.unwrap_or(0)),
                true,
            ),
            // StreamID only.
            ConfigFault::StreamDisabled => (Event::new(EventId::F_STREAM_DISABLED, txn.sid), true),
            ConfigFault::CdFetch(addr) => (
                Event::new(EventId::F_CD_FETCH, txn.sid)
                    .with_ssid(txn.ssid)
                    .with_fetch_addr(addr),
                true,
            ),
            ConfigFault::CdStage2(walk_fault) => (
                txn.walk_event(&walk_fault),
                walk_fault.kind == FaultKind::WalkEabt || s2.is_some_and(|s| s.record),
            ),
            ConfigFault::BadSte | ConfigFault::BadCd => (
                Event::new(fault.event_id(), txn.sid).with_ssid(txn.ssid),
                true,
            ),
        };
        self.report(mem, record && !txn.access.is_probe(), event)
    }

    fn report<M: GuestMemory>(&mut self, mem: &M, record: bool, event: Event) -> TranslationFault {
        if !record {
            return TranslationFault { event: None };
        }
        let before = self.counters.events;
        self.record_event(mem, &event);
        let written = self.counters.events != before;
        TranslationFault {
            event: written.then(|| event.id()),
        }
    }
}
