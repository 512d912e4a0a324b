//! One frontend connection: the protocol's state machine around the SMMUv3 model.
//!
//! The session owns everything the frontend handed over (guest RAM mappings, eventfds, the
//! backend channel) and the model. Dropping it releases all of it. Guest mistakes never become
//! protocol errors: they are the model's business. Protocol errors get the reply the protocol
//! prescribes, and a failure the frontend could not learn of ends the session.

mod devices;
mod effects;
pub mod guest_memory;
pub mod handed_out;
mod held;
pub mod host_objects;
pub mod host_record;
pub mod model_config;
mod passthrough;
pub mod ram_guard;
mod saved_state;
mod shared;

pub use shared::{PREFETCH_PAGES, SharedCounters};

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use log::{debug, info, warn};
use viommu_protocol::types::{ConfigFlags, ModelConfig, TranslateReply, TranslateRequest};
use viommu_protocol::{
    Backend, BackendChannel, Error, ErrorReply, Features, FrontendReply, FrontendRequest, Incoming,
    Request, Status, socket::Patience,
};
use viommu_smmuv3::Smmu;

use crate::host::{HostError, HostIommu};
use crate::limits::ModelLimits;
use devices::AttachedDevice;
use guest_memory::memory_refusal;
use guest_memory::{GuestRam, MAX_MEM_SLOTS};
use handed_out::HandedOut;
use host_objects::HostObjects;

/// Where a session's vSMMU state was restored from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restored {
    /// SET_STATE's blob.
    FromBlob,
    /// The shared region a killed backend left (RESUME).
    FromRegion,
}

/// Features this backend offers.
pub const OFFERED_FEATURES: Features = Features::BACKEND_CHANNEL
    .union(Features::MEM_SLOTS)
    .union(Features::PASSTHROUGH)
    .union(Features::TRANSLATE)
    .union(Features::STATE)
    .union(Features::MSI)
    .union(Features::SHARED_REGION)
    .union(Features::SHARED_TRANSLATE)
    .union(Features::RESUME)
    .union(Features::HOLD_FDS);

/// Most devices attached at once (ATTACH_DEVICE beyond it is NO_SPACE); a GET_DEVICE_SIDS
/// reply can list them all.
pub const MAX_DEVICES: usize = 256;
const _: () = assert!(MAX_DEVICES <= viommu_protocol::MAX_DEVICE_SIDS);

/// How long a peer may take to finish a message it started, or to answer on the backend
/// channel, before the session gives up on it.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes the host IOMMU from the iommufd the frontend handed over (SET_IOMMUFD).
pub type HostFactory =
    std::sync::Arc<dyn Fn(OwnedFd) -> Result<Box<dyn HostIommu>, HostError> + Send + Sync>;

/// The real host: Linux iommufd.
pub fn iommufd_host() -> HostFactory {
    std::sync::Arc::new(|fd| {
        crate::host::iommufd::Iommufd::new(fd).map(|h| Box::new(h) as Box<dyn HostIommu>)
    })
}

/// How a session is set up by the daemon.
#[derive(Clone)]
pub struct SessionOptions {
    /// What frontends may configure.
    pub limits: ModelLimits,
    /// How SET_IOMMUFD makes the host IOMMU.
    pub host: HostFactory,
}

impl std::fmt::Debug for SessionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionOptions")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            limits: ModelLimits::default(),
            host: iommufd_host(),
        }
    }
}

/// Errors that end a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The main connection failed or the frontend broke the framing.
    #[error("connection to the frontend failed")]
    Connection(#[source] Error),
    /// The backend channel failed.
    #[error("backend channel failed")]
    Channel(#[source] Error),
    /// The frontend truncated the file behind a guest RAM region while the backend used it.
    #[error(
        "guest RAM at {gpa:#x} (size {size:#x}) lost pages: the frontend shrank its file; \
         what the session read there is gone"
    )]
    GuestRamLost {
        /// The region's guest address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// A backend-channel request failed or went unanswered, so the frontend may not know what
    /// the backend told it.
    #[error("the backend channel is out of step: {0}")]
    ChannelBroken(String),
    /// The frontend broke the shared region's rules (docs/protocol.md, section 10.7).
    #[error("shared region")]
    Shared(#[source] viommu_protocol::shared::SharedError),
    /// The frontend sent a message it did not wait for an answer to, and it failed, so the
    /// failure cannot be reported on the connection.
    #[error("posted {request} failed: {status}: {message}")]
    PostedFailure {
        /// The request's name.
        request: &'static str,
        /// Why.
        status: Status,
        /// Details.
        message: String,
    },
}

/// Where the connection stands (docs/protocol.md, section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connected,
    Negotiated,
    Configured,
    Running,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The state names of docs/protocol.md, section 4.
        f.write_str(match self {
            Self::Connected => "CONNECTED",
            Self::Negotiated => "NEGOTIATED",
            Self::Configured => "CONFIGURED",
            Self::Running => "RUNNING",
        })
    }
}

/// Counters of a session, for the status line.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionCounters {
    /// Messages handled.
    pub messages: u64,
    /// Messages refused.
    pub refused: u64,
    /// TRANSLATE requests.
    pub translations: u64,
    /// Requests the backend sent on the backend channel.
    pub channel_messages: u64,
}

/// One frontend connection.
pub struct Session {
    conn: Backend,
    phase: Phase,
    features: Features,
    smmu: Option<Smmu>,
    ram: GuestRam,
    irqs: [Option<OwnedFd>; 4],
    channel: Option<BackendChannel>,
    devices: BTreeMap<u32, AttachedDevice>,
    handed_out: HandedOut,
    options: SessionOptions,
    passthrough: Option<HostObjects>,
    /// SET_CONFIG asked for IDR_AUTO and no device has fixed the registers yet.
    idr_auto_pending: bool,
    /// Why the backend channel is unusable, once it is: the session ends.
    channel_broken: Option<String>,
    /// Guest RAM's mappings, watched for a frontend that truncates them.
    ram_watch: ram_guard::Watch,
    /// Ends any wait for the frontend when it becomes readable (a shutdown was asked for).
    cancel: Option<OwnedFd>,
    counters: SessionCounters,
    /// The shared region, once SET_SHARED_REGION set it.
    shared: Option<shared::Shared>,
    shared_counters: SharedCounters,
    /// Where the vSMMU's state came from, if not from its reset: after SET_STATE no resume may
    /// follow, after a resume no SET_STATE.
    restored: Option<Restored>,
    /// Descriptors the frontend returned with RETURN_FDS, by key, for the resume.
    returned: BTreeMap<u32, OwnedFd>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("phase", &self.phase)
            .field("features", &self.features)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

/// The model. It exists from CONFIGURED on, which every caller requires first.
fn model(smmu: &mut Option<Smmu>) -> Result<&mut Smmu, ErrorReply> {
    smmu.as_mut()
        .ok_or_else(|| refuse(Status::BAD_STATE, "no vSMMU"))
}

/// The model, read-only.
fn model_ref(smmu: &Option<Smmu>) -> Result<&Smmu, ErrorReply> {
    smmu.as_ref()
        .ok_or_else(|| refuse(Status::BAD_STATE, "no vSMMU"))
}

fn refuse(status: Status, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(status, message)
}

impl Session {
    /// A session on a connected stream, with the default options.
    pub fn new(stream: UnixStream) -> Self {
        Self::with_options(stream, SessionOptions::default())
    }

    /// A session on a connected stream.
    pub fn with_options(stream: UnixStream, options: SessionOptions) -> Self {
        // A peer that stops in the middle of a message must not hang the backend.
        let mut conn = Backend::new(stream);
        conn.set_patience(Patience {
            timeout: Some(PEER_TIMEOUT),
            cancel: None,
        });
        Self {
            conn,
            phase: Phase::Connected,
            features: Features::empty(),
            smmu: None,
            ram: GuestRam::default(),
            irqs: [None, None, None, None],
            channel: None,
            devices: BTreeMap::new(),
            handed_out: HandedOut::default(),
            options,
            passthrough: None,
            idr_auto_pending: false,
            channel_broken: None,
            ram_watch: ram_guard::Watch::default(),
            cancel: None,
            counters: SessionCounters::default(),
            shared: None,
            shared_counters: SharedCounters::default(),
            restored: None,
            returned: BTreeMap::new(),
        }
    }

    /// Makes every wait for the frontend (the rest of a message, a backend-channel reply) end
    /// as soon as `cancel` becomes readable, as the daemon's shutdown pipe does on SIGTERM.
    pub fn cancel_on(&mut self, cancel: &OwnedFd) -> std::io::Result<()> {
        self.cancel = Some(cancel.try_clone()?);
        let patience = self.patience();
        self.conn.set_patience(patience);
        let patience = self.patience();
        if let Some(channel) = self.channel.as_mut() {
            channel.set_patience(patience);
        }
        Ok(())
    }

    /// How long the frontend may keep the session waiting, and what cuts the wait short.
    fn patience(&self) -> Patience {
        Patience {
            timeout: Some(PEER_TIMEOUT),
            cancel: self.cancel.as_ref().and_then(|fd| match fd.try_clone() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    warn!("cannot duplicate the cancel fd: {e}");
                    None
                }
            }),
        }
    }

    /// The main connection (for polling).
    pub fn connection(&self) -> &UnixStream {
        self.conn.stream()
    }

    /// The backend channel, once set (for polling its hang-up).
    pub fn channel(&self) -> Option<&UnixStream> {
        self.channel.as_ref().map(|c| c.stream())
    }

    /// Counters.
    pub fn counters(&self) -> SessionCounters {
        self.counters
    }

    /// Counters of the shared region.
    pub fn shared_counters(&self) -> SharedCounters {
        self.shared_counters
    }

    /// The model, once configured.
    pub fn smmu(&self) -> Option<&Smmu> {
        self.smmu.as_ref()
    }

    /// One line on what the session is doing: state, devices and their mode, counters.
    pub fn status_line(&self) -> String {
        let devices: Vec<String> = self
            .devices
            .iter()
            .map(|(&handle, d)| {
                let mode = match (&self.passthrough, d.passthrough) {
                    (Some(p), true) => format!("passthrough, {}", p.mode(handle)),
                    _ => format!("emulated, {:?}", d.space).to_lowercase(),
                };
                format!("{handle}@SID {:#x} ({mode})", d.sid)
            })
            .collect();
        let c = self.counters;
        let mut line = format!(
            "state {}, features {:?}, {} device(s) [{}], {} messages ({} refused), {} translations, \
             {} backend-channel messages",
            self.phase,
            self.features,
            self.devices.len(),
            devices.join(", "),
            c.messages,
            c.refused,
            c.translations,
            c.channel_messages
        );
        if let Some(smmu) = self.smmu.as_ref() {
            let m = smmu.counters();
            line.push_str(&format!(
                ", {} commands ({} errors), {} events ({} lost), {} IOTLB hits",
                m.commands, m.command_errors, m.events, m.events_lost, m.iotlb_hits
            ));
        }
        if self.shared.is_some() {
            let s = self.shared_counters;
            line.push_str(&format!(
                ", shared region: {} posted writes, {} translations, {} calls, {} publications, {} cache fills ({} prefetched), {} cleared",
                s.posted_writes,
                s.region_translations,
                s.calls,
                s.publications,
                s.cache_fills,
                s.prefetched,
                s.cache_clears
            ));
        }
        if let Some(p) = self.passthrough.as_ref() {
            let h = p.counters();
            line.push_str(&format!(
                ", host: {} invalidation ioctls for {} commands, {} STEs installed",
                h.invalidate_calls, h.commands_forwarded, h.stes_installed
            ));
        }
        line
    }

    /// The vSMMU's ID registers as the register file holds them (IDR0..5, IIDR, AIDR), once
    /// it is configured.
    pub fn id_registers(&self) -> Option<[u32; 8]> {
        let id = self.smmu.as_ref()?.id_regs();
        Some([
            id.idr[0], id.idr[1], id.idr[2], id.idr[3], id.idr[4], id.idr[5], id.iidr, id.aidr,
        ])
    }

    /// Number of attached devices.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Handles one message from the frontend. `Ok(false)`: the frontend disconnected cleanly.
    pub fn handle_one(&mut self) -> Result<bool, SessionError> {
        let incoming = match self.conn.recv() {
            Ok(incoming) => incoming,
            Err(Error::Disconnected) => return Ok(false),
            Err(err) => {
                let Some(token) = err.reply_token() else {
                    return Err(SessionError::Connection(err));
                };
                self.counters.refused = self.counters.refused.saturating_add(1);
                let text = crate::error_chain(&err);
                if !token.expects_reply {
                    return Err(SessionError::PostedFailure {
                        request: FrontendRequest::name_of(token.request),
                        status: err.reply_status(),
                        message: text,
                    });
                }
                warn!("refused a message: {text}");
                let reply = ErrorReply::new(err.reply_status(), text);
                self.conn
                    .reply_error(token, &reply)
                    .map_err(SessionError::Connection)?;
                return Ok(true);
            }
        };
        self.counters.messages = self.counters.messages.saturating_add(1);
        let Incoming { request, token } = incoming;
        let name = request.name();
        debug!("{name}");
        // Writes posted before this message come first (docs/protocol.md, 10.4).
        self.drain_posted()?;
        // A TRANSLATE changes registers only through its effects, which publish themselves.
        let translate = request.code() == viommu_protocol::frontend::code::TRANSLATE;
        let result = self.dispatch(request);
        if !translate {
            self.publish();
        }
        if let Some(lost) = self.lost_ram() {
            return Err(lost);
        }
        if let Err(err) = &result {
            self.counters.refused = self.counters.refused.saturating_add(1);
            warn!("{name} refused: {}: {}", err.status, err.message);
            if !token.expects_reply {
                return Err(SessionError::PostedFailure {
                    request: name,
                    status: err.status,
                    message: err.message.clone(),
                });
            }
        }
        self.conn
            .reply(token, result)
            .map_err(SessionError::Connection)?;
        self.prefetch();
        if let Some(why) = self.channel_broken.take() {
            return Err(SessionError::ChannelBroken(why));
        }
        Ok(true)
    }

    /// Handles one decoded request as if it had arrived on the main connection, and returns
    /// what would be replied. Nothing is read from or written to the main connection, so a
    /// harness (the fuzz targets) can drive whole sessions without a socket in between.
    pub fn handle_request(
        &mut self,
        request: FrontendRequest,
    ) -> Result<FrontendReply, ErrorReply> {
        self.counters.messages = self.counters.messages.saturating_add(1);
        if let Err(e) = self.drain_posted() {
            return Err(refuse(Status::INTERNAL, crate::error_chain(&e)));
        }
        let result = self.dispatch(request);
        self.publish();
        self.prefetch();
        if let Some(lost) = self.lost_ram() {
            return Err(refuse(Status::INTERNAL, lost.to_string()));
        }
        if result.is_err() {
            self.counters.refused = self.counters.refused.saturating_add(1);
        }
        result
    }

    fn require(&self, phase: Phase, name: &str) -> Result<(), ErrorReply> {
        if self.phase >= phase {
            Ok(())
        } else {
            Err(refuse(
                Status::BAD_STATE,
                format!("{name} not allowed in state {}", self.phase),
            ))
        }
    }

    fn require_feature(&self, feature: Features, name: &str) -> Result<(), ErrorReply> {
        if self.features.contains(feature) {
            Ok(())
        } else {
            Err(refuse(
                Status::NOT_NEGOTIATED,
                format!("{name} needs feature {feature:?}"),
            ))
        }
    }

    /// The guest sees the vSMMU (an ID register, a register access, a DMA): the session enters
    /// RUNNING, after which SET_STATE is refused. The one place RUNNING is entered.
    fn guest_access(&mut self, name: &str) -> Result<(), ErrorReply> {
        self.require(Phase::Configured, name)?;
        self.phase = Phase::Running;
        Ok(())
    }

    /// TRANSLATE, whether it came as a message or through the shared region (10.9).
    pub(super) fn translate(&mut self, t: &TranslateRequest) -> Result<TranslateReply, ErrorReply> {
        let name = "TRANSLATE";
        self.require(Phase::Configured, name)?;
        self.require_feature(Features::TRANSLATE, name)?;
        self.guest_access(name)?;
        self.serve_translate(t)
    }

    fn dispatch(&mut self, request: FrontendRequest) -> Result<FrontendReply, ErrorReply> {
        let name = request.name();
        match request {
            FrontendRequest::GetFeatures => Ok(FrontendReply::Features(OFFERED_FEATURES)),
            FrontendRequest::SetFeatures(wanted) => {
                if self.phase != Phase::Connected {
                    return Err(refuse(Status::BAD_STATE, "SET_FEATURES is accepted once"));
                }
                if !OFFERED_FEATURES.contains(wanted) {
                    let extra = wanted.difference(OFFERED_FEATURES).bits();
                    return Err(refuse(
                        Status::INVALID_ARGUMENT,
                        format!("features {extra:#x} were not offered"),
                    ));
                }
                if wanted.contains(Features::MSI) && !wanted.contains(Features::BACKEND_CHANNEL) {
                    return Err(refuse(
                        Status::INVALID_ARGUMENT,
                        "MSI needs BACKEND_CHANNEL",
                    ));
                }
                if wanted.contains(Features::RESUME) && !wanted.contains(Features::SHARED_REGION) {
                    return Err(refuse(
                        Status::INVALID_ARGUMENT,
                        "RESUME needs SHARED_REGION",
                    ));
                }
                if wanted.contains(Features::HOLD_FDS)
                    && !wanted.contains(Features::RESUME | Features::BACKEND_CHANNEL)
                {
                    return Err(refuse(
                        Status::INVALID_ARGUMENT,
                        "HOLD_FDS needs RESUME and BACKEND_CHANNEL",
                    ));
                }
                if wanted.contains(Features::SHARED_TRANSLATE)
                    && !wanted.contains(Features::SHARED_REGION | Features::TRANSLATE)
                {
                    return Err(refuse(
                        Status::INVALID_ARGUMENT,
                        "SHARED_TRANSLATE needs SHARED_REGION and TRANSLATE",
                    ));
                }
                self.features = wanted;
                self.phase = Phase::Negotiated;
                info!("features negotiated: {wanted:?}");
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::SetConfig(cfg) => self.set_config(&cfg),
            FrontendRequest::GetIdRegs => {
                self.guest_access(name)?;
                let smmu = model(&mut self.smmu)?;
                Ok(FrontendReply::IdRegs(model_config::id_regs(smmu.id_regs())))
            }
            FrontendRequest::SetBackendChannel(stream) => {
                self.require(Phase::Negotiated, name)?;
                self.require_feature(Features::BACKEND_CHANNEL, name)?;
                if self.channel.is_some() {
                    return Err(refuse(
                        Status::BAD_STATE,
                        "the backend channel is already set",
                    ));
                }
                let mut channel = BackendChannel::new(stream);
                channel.set_patience(self.patience());
                self.channel = Some(channel);
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::SetMemTable(regions) => {
                self.require(Phase::Negotiated, name)?;
                let ram = guest_memory::from_table(regions).map_err(memory_refusal)?;
                self.set_ram(ram)?;
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::GetMaxMemSlots => {
                self.require(Phase::Negotiated, name)?;
                self.require_feature(Features::MEM_SLOTS, name)?;
                Ok(FrontendReply::MaxMemSlots(MAX_MEM_SLOTS as u64))
            }
            FrontendRequest::AddMemReg(region, fd) => {
                self.require(Phase::Negotiated, name)?;
                self.require_feature(Features::MEM_SLOTS, name)?;
                let ram = guest_memory::add(&self.ram, &region, fd).map_err(memory_refusal)?;
                self.set_ram(ram)?;
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::RemMemReg(region) => {
                self.require(Phase::Negotiated, name)?;
                self.require_feature(Features::MEM_SLOTS, name)?;
                let ram = guest_memory::remove(&self.ram, &region).map_err(memory_refusal)?;
                self.set_ram(ram)?;
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::SetIrqFd { index, fd } => {
                self.require(Phase::Negotiated, name)?;
                let slot = self.irqs.get_mut(index.index() as usize);
                if let Some(slot) = slot {
                    *slot = fd;
                }
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::MmioRead(access) => {
                self.guest_access(name)?;
                let value = model(&mut self.smmu)?.mmio_read(access.offset, access.size.bytes());
                Ok(FrontendReply::MmioValue(value))
            }
            FrontendRequest::MmioWrite { access, value } => {
                self.guest_access(name)?;
                self.mmio_write(access, value)?;
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::SetIommufd(fd) => {
                self.require(Phase::Negotiated, name)?;
                self.require_feature(Features::PASSTHROUGH, name)?;
                if self.passthrough.is_some() {
                    return Err(refuse(Status::BAD_STATE, "SET_IOMMUFD is accepted once"));
                }
                let host = (self.options.host)(fd).map_err(|e| {
                    refuse(Status::HOST_ERROR, format!("not a usable iommufd: {e}"))
                })?;
                self.passthrough = Some(HostObjects::new(host));
                info!("iommufd received");
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::AttachDevice(dev) => self.attach(dev),
            FrontendRequest::DetachDevice { handle } => {
                self.require(Phase::Configured, name)?;
                match self.devices.remove(&handle) {
                    Some(dev) => {
                        self.handed_out.invalidate_device(handle);
                        if dev.passthrough
                            && let Some(result) =
                                self.with_keeper(|p, keeper| p.detach(handle, keeper))
                        {
                            result.map_err(|e| {
                                refuse(Status::HOST_ERROR, format!("detaching: {e}"))
                            })?;
                        }
                        info!("device {handle} (SID {:#x}) detached", dev.sid);
                        Ok(FrontendReply::Ack)
                    }
                    None => Err(refuse(
                        Status::NOT_FOUND,
                        format!("no device with handle {handle}"),
                    )),
                }
            }
            FrontendRequest::Translate(t) => self.translate(&t).map(FrontendReply::Translate),
            FrontendRequest::Reset => {
                self.require(Phase::Configured, name)?;
                if let Some(smmu) = self.smmu.as_mut() {
                    smmu.reset();
                }
                self.clear_all_translations();
                self.run_effects()?;
                info!("vSMMU reset");
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::GetState => {
                self.require(Phase::Configured, name)?;
                self.require_feature(Features::STATE, name)?;
                self.get_state().map(FrontendReply::State)
            }
            FrontendRequest::SetState(blob) => {
                self.require(Phase::Configured, name)?;
                self.require_feature(Features::STATE, name)?;
                if self.phase == Phase::Running {
                    return Err(refuse(Status::BAD_STATE, "SET_STATE after the guest ran"));
                }
                if self.restored == Some(Restored::FromRegion) {
                    return Err(refuse(
                        Status::BAD_STATE,
                        "SET_STATE after the vSMMU was resumed from the shared region",
                    ));
                }
                // Held descriptors are for a resume only (10.11).
                self.returned.clear();
                self.set_state(blob)?;
                self.restored = Some(Restored::FromBlob);
                self.clear_all_translations();
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::SetSharedRegion {
                region,
                kick,
                call,
                resume,
            } => {
                self.require_feature(Features::SHARED_REGION, name)?;
                if resume {
                    self.require_feature(Features::RESUME, "SET_SHARED_REGION with RESUME")?;
                }
                self.set_shared_region(region, kick, call, resume)
            }
            FrontendRequest::UpdateDevice { handle, sid, flags } => {
                self.require(Phase::Configured, name)?;
                self.require_feature(Features::SHARED_REGION, name)?;
                self.update_device(handle, sid, flags)
            }
            FrontendRequest::ReturnFds(held) => self.return_fds(held),
        }
    }

    fn set_config(&mut self, cfg: &ModelConfig) -> Result<FrontendReply, ErrorReply> {
        if self.phase != Phase::Negotiated {
            return Err(refuse(
                Status::BAD_STATE,
                format!("SET_CONFIG not allowed in state {}", self.phase),
            ));
        }
        if cfg.flags.contains(ConfigFlags::IDR_AUTO) {
            self.require_feature(Features::PASSTHROUGH, "IDR_AUTO")?;
            self.idr_auto_pending = true;
        }
        if cfg.flags.contains(ConfigFlags::MSI) && !self.features.contains(Features::MSI) {
            return Err(refuse(
                Status::NOT_NEGOTIATED,
                "the MSI flag needs feature MSI",
            ));
        }
        self.options
            .limits
            .check(cfg)
            .map_err(|e| refuse(Status::INVALID_ARGUMENT, e.to_string()))?;
        let features = model_config::capabilities(cfg);
        info!("vSMMU configured: {features:?}");
        self.smmu = Some(Smmu::new(features));
        self.phase = Phase::Configured;
        Ok(FrontendReply::Ack)
    }
}
