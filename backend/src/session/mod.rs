//! One frontend connection: the protocol's state machine around the SMMUv3 model.
//!
//! The session owns everything the frontend handed over (guest RAM mappings, eventfds, the
//! backend channel) and the model. Dropping it releases all of it. Guest mistakes never become
//! protocol errors: they are the model's business. Protocol errors get the reply the protocol
//! prescribes, and a failure the frontend could not learn of ends the session.

pub mod guest_memory;
pub mod handed_out;
pub mod host_objects;
pub mod model_config;
pub mod ram_guard;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use log::{debug, info, warn};
use rustix::fs::{MemfdFlags, SealFlags, fcntl_add_seals, memfd_create};
use serde::{Deserialize, Serialize};
use viommu_protocol::types::{
    Access, AddressSpace, ConfigFlags, IotlbInvalidate, IrqIndex, MmioAccess, ModelConfig,
    MsiWrite, Perm, TranslateReply, TranslateRequest,
};
use viommu_protocol::{
    AttachDevice, Backend, BackendChannel, BackendReply, BackendRequest, Error, ErrorReply,
    Features, FrontendReply, FrontendRequest, Incoming, Request, StateBlob, Status,
    socket::Patience,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use handed_out::HandedOut;
use crate::host::{HostDevice, HostError, HostIommu, RawCmd, VEvent};
use crate::limits::ModelLimits;
use guest_memory::{GuestRam, MAX_MEM_SLOTS};
use host_objects::{Applied, Passthrough, PassthroughState};
use viommu_smmuv3::snapshot::SmmuSnapshot;
use viommu_smmuv3::stream::StreamConfig;
use viommu_smmuv3::walk::AccessKind;
use viommu_smmuv3::{BarrierOutcome, CmdqStatus, Effect, IrqLine, SidRange, Smmu, StreamState};

/// Features this backend offers.
pub const OFFERED_FEATURES: Features = Features::BACKEND_CHANNEL
    .union(Features::MEM_SLOTS)
    .union(Features::PASSTHROUGH)
    .union(Features::TRANSLATE)
    .union(Features::STATE)
    .union(Features::MSI);

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

/// An attached device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Device {
    /// Its stream ID as the frontend last confirmed it.
    sid: u32,
    /// Whether `sid` is confirmed: told at ATTACH_DEVICE or in the last GET_DEVICE_SIDS
    /// answer. A device is bypassed or translated only by the STE of a confirmed SID.
    #[serde(skip)]
    confirmed: bool,
    /// A VFIO device with nested translation (otherwise emulated).
    #[serde(skip)]
    passthrough: bool,
    /// The address space the frontend was last told.
    #[serde(skip, default = "translated")]
    space: AddressSpace,
    /// The SID it was told for.
    #[serde(skip)]
    space_sid: u32,
}

fn translated() -> AddressSpace {
    AddressSpace::Translated
}

/// The GET_STATE blob.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionState {
    /// Format version.
    version: u32,
    /// The model's registers.
    smmu: SmmuSnapshot,
    /// Attached devices by handle, for a consistency check on restore.
    devices: BTreeMap<u32, u32>,
    /// The host objects of passthrough devices, for a restarted backend to adopt.
    #[serde(default)]
    passthrough: Option<PassthroughState>,
}

const STATE_VERSION: u32 = 1;

/// Counters of a session, for the status line.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionCounters {
    /// Messages handled.
    pub messages: u64,
    /// Messages refused.
    pub refused: u64,
    /// TRANSLATE requests.
    pub translations: u64,
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
    devices: BTreeMap<u32, Device>,
    handed_out: HandedOut,
    options: SessionOptions,
    passthrough: Option<Passthrough>,
    /// SET_CONFIG asked for IDR_AUTO and no device has fixed the registers yet.
    idr_auto_pending: bool,
    /// A host invalidation failed since the last CMD_SYNC barrier.
    host_invalidate_failed: bool,
    /// Why the backend channel is unusable, once it is: the session ends.
    channel_broken: Option<String>,
    /// Guest RAM's mappings, watched for a frontend that truncates them.
    ram_watch: ram_guard::Watch,
    /// Ends any wait for the frontend when it becomes readable (a shutdown was asked for).
    cancel: Option<OwnedFd>,
    counters: SessionCounters,
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
            host_invalidate_failed: false,
            channel_broken: None,
            ram_watch: ram_guard::Watch::default(),
            cancel: None,
            counters: SessionCounters::default(),
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
            "state {}, features {:?}, {} device(s) [{}], {} messages ({} refused), {} translations",
            self.phase,
            self.features,
            self.devices.len(),
            devices.join(", "),
            c.messages,
            c.refused,
            c.translations
        );
        if let Some(smmu) = self.smmu.as_ref() {
            let m = smmu.counters();
            line.push_str(&format!(
                ", {} commands ({} errors), {} events ({} lost), {} IOTLB hits",
                m.commands, m.command_errors, m.events, m.events_lost, m.iotlb_hits
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
        let result = self.dispatch(request);
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
        let result = self.dispatch(request);
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

    /// The model, entering RUNNING: the guest may now see it.
    fn running(&mut self) -> &mut Smmu {
        self.phase = Phase::Running;
        // require(Configured) ran first, so the model exists.
        self.smmu
            .get_or_insert_with(|| Smmu::new(viommu_smmuv3::Capabilities::qemu_default()))
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
                self.features = wanted;
                self.phase = Phase::Negotiated;
                info!("features negotiated: {wanted:?}");
                Ok(FrontendReply::Ack)
            }
            FrontendRequest::SetConfig(cfg) => self.set_config(&cfg),
            FrontendRequest::GetIdRegs => {
                self.require(Phase::Configured, name)?;
                Ok(FrontendReply::IdRegs(model_config::id_regs(
                    self.running().id_regs(),
                )))
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
                self.require(Phase::Configured, name)?;
                let value = self.running().mmio_read(access.offset, access.size.bytes());
                Ok(FrontendReply::MmioValue(value))
            }
            FrontendRequest::MmioWrite { access, value } => {
                self.require(Phase::Configured, name)?;
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
                self.passthrough = Some(Passthrough::new(host));
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
                            && let Some(p) = self.passthrough.as_mut()
                        {
                            p.detach(handle).map_err(|e| {
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
            FrontendRequest::Translate(t) => {
                self.require(Phase::Configured, name)?;
                self.require_feature(Features::TRANSLATE, name)?;
                self.translate(&t).map(FrontendReply::Translate)
            }
            FrontendRequest::Reset => {
                self.require(Phase::Configured, name)?;
                if let Some(smmu) = self.smmu.as_mut() {
                    smmu.reset();
                }
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
                self.set_state(blob)?;
                Ok(FrontendReply::Ack)
            }
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

    fn attach(&mut self, dev: AttachDevice) -> Result<FrontendReply, ErrorReply> {
        self.require(Phase::Configured, "ATTACH_DEVICE")?;
        if self.devices.contains_key(&dev.handle) {
            return Err(refuse(
                Status::EXISTS,
                format!("handle {} is attached", dev.handle),
            ));
        }
        if self.devices.len() >= MAX_DEVICES {
            return Err(refuse(
                Status::NO_SPACE,
                format!("{MAX_DEVICES} devices are attached, the most this backend serves"),
            ));
        }
        if dev.passthrough.is_some() {
            return self.attach_passthrough(dev);
        }
        self.require_feature(Features::TRANSLATE, "an emulated device")?;
        self.devices.insert(
            dev.handle,
            Device {
                sid: dev.sid,
                confirmed: true,
                passthrough: false,
                space: AddressSpace::Translated,
                space_sid: dev.sid,
            },
        );
        // Tell the frontend the device's address space before the reply; a failed ATTACH_DEVICE
        // leaves nothing behind.
        if let Err(e) = self.announce(dev.handle) {
            self.forget(dev.handle);
            return Err(e);
        }
        info!("device {} attached at SID {:#x}", dev.handle, dev.sid);
        Ok(FrontendReply::Ack)
    }

    /// Evaluates a device just attached at the SID the frontend gave (the frontend just said
    /// where it is) and tells the frontend its address space.
    fn announce(&mut self, handle: u32) -> Result<(), ErrorReply> {
        let mut out = Vec::new();
        self.evaluate(&[handle], &mut out);
        self.send_backend(out)?;
        self.run_effects()
    }

    /// Undoes an attach that failed half way: the device and anything made for it go.
    fn forget(&mut self, handle: u32) {
        if let Some(dev) = self.devices.remove(&handle) {
            self.handed_out.invalidate_device(handle);
            if dev.passthrough
                && let Some(p) = self.passthrough.as_mut()
                && let Err(e) = p.detach(handle)
            {
                warn!("device {handle}: undoing the attach: {e}");
            }
        }
    }

    fn attach_passthrough(&mut self, dev: AttachDevice) -> Result<FrontendReply, ErrorReply> {
        self.require_feature(Features::PASSTHROUGH, "a passthrough device")?;
        let Some(pt) = dev.passthrough else {
            return Err(refuse(Status::INTERNAL, "not a passthrough device"));
        };
        let Some(p) = self.passthrough.as_mut() else {
            return Err(refuse(
                Status::BAD_STATE,
                "a passthrough device before SET_IOMMUFD",
            ));
        };
        let host = |e: HostError| refuse(Status::HOST_ERROR, format!("device {}: {e}", dev.handle));
        let hw = p.hw_info(pt.ids.devid).map_err(host)?;
        let Some(smmu) = self.smmu.as_ref() else {
            return Err(refuse(Status::BAD_STATE, "no vSMMU"));
        };
        if self.idr_auto_pending && self.phase == Phase::Configured {
            // The first device fixes the ID registers before the guest can read them.
            let features = host_objects::auto_features(&hw, smmu.features());
            info!(
                "ID registers derived from device {}'s host SMMU: {features:?}",
                dev.handle
            );
            self.smmu = Some(Smmu::new(features));
            self.idr_auto_pending = false;
        }
        let Some(smmu) = self.smmu.as_ref() else {
            return Err(refuse(Status::BAD_STATE, "no vSMMU"));
        };
        host_objects::check_fit(&hw, smmu.features()).map_err(|reason| {
            refuse(
                Status::INCOMPATIBLE,
                format!(
                    "device {} (iommufd device {}): {reason}",
                    dev.handle, pt.ids.devid
                ),
            )
        })?;
        let target = host_objects::target_for(&smmu.stream_state(&self.ram, dev.sid));
        let applied = p
            .attach(
                dev.handle,
                dev.sid,
                HostDevice {
                    dev_id: pt.ids.devid,
                    cdev: pt.cdev,
                },
                pt.ids.s2_hwpt_id,
                target,
            )
            .map_err(|e| refuse(Status::HOST_ERROR, format!("device {}: {e}", dev.handle)))?;
        if let (Applied::Refused(_), Some(smmu)) = (&applied, self.smmu.as_mut()) {
            smmu.record_bad_ste(&self.ram, dev.sid);
        }
        self.devices.insert(
            dev.handle,
            Device {
                sid: dev.sid,
                confirmed: true,
                passthrough: true,
                space: AddressSpace::Translated,
                space_sid: dev.sid,
            },
        );
        self.follow_eventq();
        if let Err(e) = self.announce(dev.handle) {
            self.forget(dev.handle);
            return Err(e);
        }
        Ok(FrontendReply::Ack)
    }

    /// Keeps the host's vEVENTQs the size of the guest's event queue.
    fn follow_eventq(&mut self) {
        let log2 = self.smmu.as_ref().and_then(Smmu::eventq_log2size);
        if let Some(p) = self.passthrough.as_mut()
            && let Err(e) = p.follow_eventq(log2)
        {
            warn!("vEVENTQ: {e}");
        }
    }

    /// The host's event queues to poll: their object IDs (which tell a new queue from an old
    /// one that had the same fd number) and fds.
    pub fn event_fds(&self) -> Vec<(u32, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        self.passthrough
            .as_ref()
            .map(|p| {
                p.veventq_fds()
                    .iter()
                    .map(|(id, fd)| (*id, fd.as_raw_fd()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The backend is stopping, not the VM: passthrough devices keep their nested translation
    /// and the host objects stay in the frontend's iommufd for the next backend to adopt.
    pub fn leave_host_objects(&mut self) {
        if let Some(p) = self.passthrough.as_mut() {
            p.leave();
        }
    }

    /// Moves what the host SMMU reported into the guest's event queue.
    pub fn handle_host_events(&mut self) -> Result<(), SessionError> {
        let Some(p) = self.passthrough.as_mut() else {
            return Ok(());
        };
        let mut events = Vec::new();
        if let Err(e) = p.drain_events(&mut events) {
            warn!("reading the vEVENTQ: {e}");
        }
        if let Some(smmu) = self.smmu.as_mut() {
            for event in events {
                match event {
                    VEvent::Event { record, .. } => smmu.record_host_event(&self.ram, record),
                    VEvent::Lost { .. } => smmu.record_host_events_lost(),
                }
            }
        }
        let result = self.run_effects();
        if let Some(lost) = self.lost_ram() {
            return Err(lost);
        }
        result.map_err(|e| SessionError::PostedFailure {
            request: "vEVENTQ",
            status: e.status,
            message: e.message,
        })
    }

    fn mmio_write(&mut self, access: MmioAccess, value: u64) -> Result<(), ErrorReply> {
        let ram = &self.ram;
        self.phase = Phase::Running;
        let Some(smmu) = self.smmu.as_mut() else {
            return Err(refuse(Status::BAD_STATE, "no vSMMU"));
        };
        let mut status = smmu.mmio_write(ram, access.offset, access.size.bytes(), value);
        loop {
            // Effects before a CMD_SYNC are carried out (and acknowledged on the backend
            // channel) before the sync completes.
            self.run_effects()?;
            let failed = std::mem::take(&mut self.host_invalidate_failed);
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
            status = smmu.serve_barrier(
                &self.ram,
                if failed {
                    BarrierOutcome::HostInvalidationFailed
                } else {
                    BarrierOutcome::Served
                },
            );
        }
    }

    fn translate(&mut self, t: &TranslateRequest) -> Result<TranslateReply, ErrorReply> {
        self.counters.translations = self.counters.translations.saturating_add(1);
        let access = AccessKind {
            read: t.access.contains(Access::READ),
            write: t.access.contains(Access::WRITE),
            exec: t.access.contains(Access::EXEC),
            privileged: t.access.contains(Access::PRIV),
        };
        let ram = &self.ram;
        self.phase = Phase::Running;
        let Some(smmu) = self.smmu.as_mut() else {
            return Err(refuse(Status::BAD_STATE, "no vSMMU"));
        };
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
                    let handle = self
                        .devices
                        .iter()
                        .find(|(_, d)| d.sid == t.sid)
                        .map(|(&h, _)| h);
                    self.handed_out.record(handle, start, start | mask);
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
    /// is sent with NEED_REPLY and waited for).
    fn run_effects(&mut self) -> Result<(), ErrorReply> {
        let effects: Vec<Effect> = match self.smmu.as_mut() {
            Some(smmu) if smmu.has_effects() => smmu.take_effects(),
            _ => return Ok(()),
        };
        let mut outgoing = Vec::new();
        let mut stale = Vec::new();
        let mut host_cmds: Vec<RawCmd> = Vec::new();
        let mut changed: Vec<SidRange> = Vec::new();
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
                    stale.push(self.handed_out.containing(start));
                }
                Effect::TranslationsInvalidated { start, last } => stale.push((start, last)),
                Effect::HostInvalidate(cmd) => host_cmds.push([cmd.d0, cmd.d1]),
            }
        }
        // The streams of the whole batch are re-evaluated together, after one confirmation of
        // the devices' SIDs.
        self.update_spaces(&changed, &mut outgoing)?;
        // Every invalidation before the CMD_SYNC reaches the host in one call per vIOMMU.
        if !host_cmds.is_empty()
            && let Some(p) = self.passthrough.as_mut()
            && let Err(e) = p.invalidate(&host_cmds)
        {
            warn!("host invalidation failed: {e}");
            self.host_invalidate_failed = true;
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
        self.send_backend(outgoing)
    }

    /// Re-evaluates the devices whose streams changed (`ranges`), queueing in `out` (for the
    /// caller to send) SET_ADDRESS_SPACE
    /// for those whose address space changed and IOTLB_INVALIDATE for all of them (their
    /// configuration changed), and bringing passthrough devices in line.
    ///
    /// A device is evaluated only at a stream ID the frontend confirmed is its own: the
    /// frontend is asked for every device's current SID first, since the
    /// guest may have renumbered its buses since the last answer (docs/protocol.md, section
    /// 8.3, GET_DEVICE_SIDS). A device that moved is re-evaluated wherever it is now; one whose
    /// SID cannot be confirmed is never bypassed or translated (TRANSLATED, and a passthrough
    /// device aborts).
    fn update_spaces(
        &mut self,
        ranges: &[SidRange],
        out: &mut Vec<BackendRequest>,
    ) -> Result<(), ErrorReply> {
        if ranges.is_empty() || self.devices.is_empty() {
            return Ok(());
        }
        let moved = self.confirm_sids()?;
        let chosen: Vec<u32> = self
            .devices
            .iter()
            .filter(|&(handle, dev)| {
                moved.contains(handle)
                    || ranges.iter().any(|r| (r.first..=r.last).contains(&dev.sid))
            })
            .map(|(&handle, _)| handle)
            .collect();
        self.evaluate(&chosen, out);
        Ok(())
    }

    /// Asks the frontend where every device is now and records the answer. Returns the
    /// devices whose SID changed or could not be confirmed.
    fn confirm_sids(&mut self) -> Result<Vec<u32>, ErrorReply> {
        let answer = match self.channel.as_ref() {
            None => None,
            Some(channel) => match channel.call(&BackendRequest::GetDeviceSids) {
                Ok(BackendReply::DeviceSids(list)) => Some(list),
                Ok(other) => {
                    return Err(refuse(
                        Status::INTERNAL,
                        format!("GET_DEVICE_SIDS answered with {other:?}"),
                    ));
                }
                Err(e) if !e.is_fatal() => {
                    warn!(
                        "GET_DEVICE_SIDS failed: {}; no device's stream ID can be confirmed",
                        crate::error_chain(&e)
                    );
                    None
                }
                Err(e) => return Err(self.channel_failed(&e)),
            },
        };
        let mut moved = Vec::new();
        for (&handle, dev) in self.devices.iter_mut() {
            let now = answer
                .as_ref()
                .and_then(|list| list.iter().find(|d| d.handle == handle))
                .map(|d| d.sid);
            match now {
                Some(sid) if dev.confirmed && sid == dev.sid => {}
                Some(sid) => {
                    if sid != dev.sid {
                        info!(
                            "device {handle} is now at SID {sid:#x} (was {:#x})",
                            dev.sid
                        );
                    }
                    dev.sid = sid;
                    dev.confirmed = true;
                    moved.push(handle);
                    if dev.passthrough
                        && let Some(p) = self.passthrough.as_mut()
                        && let Err(e) = p.set_vsid(handle, sid)
                    {
                        warn!("device {handle}: new vSID {sid:#x}: {e}");
                    }
                }
                None => {
                    if dev.confirmed {
                        warn!(
                            "device {handle}: the frontend did not confirm its stream ID; it is \
                             neither bypassed nor translated until it does"
                        );
                    }
                    dev.confirmed = false;
                    moved.push(handle);
                }
            }
        }
        Ok(moved)
    }

    /// Evaluates each device of `handles` at its confirmed SID.
    fn evaluate(&mut self, handles: &[u32], out: &mut Vec<BackendRequest>) {
        let Some(smmu) = self.smmu.as_ref() else {
            return;
        };
        let sid_matters = smmu.registers().cr0.smmuen();
        let mut refused = Vec::new();
        for &handle in handles {
            let Some(dev) = self.devices.get_mut(&handle) else {
                continue;
            };
            // Unconfirmed: what no STE can make less safe than it is.
            let state = if dev.confirmed || !sid_matters {
                Some(smmu.stream_state(&self.ram, dev.sid))
            } else {
                None
            };
            if dev.passthrough
                && let Some(p) = self.passthrough.as_mut()
            {
                let target = state
                    .as_ref()
                    .map_or(host_objects::Target::Abort, host_objects::target_for);
                match p.apply(handle, target) {
                    Ok(Applied::Done) => {}
                    Ok(Applied::Refused(_)) => refused.push(dev.sid),
                    Err(e) => warn!("device {handle}: {e}"),
                }
            }
            let space = state.map_or(AddressSpace::Translated, address_space);
            // SYSTEM holds for one SID: a device that bypasses at a new SID is told again.
            if space != dev.space || (space == AddressSpace::System && dev.space_sid != dev.sid) {
                dev.space = space;
                dev.space_sid = dev.sid;
                debug!(
                    "device {handle}: address space {space:?} at SID {:#x}",
                    dev.sid
                );
                out.push(BackendRequest::SetAddressSpace {
                    handle,
                    space,
                    sid: dev.sid,
                });
            }
            if self.handed_out.invalidate_device(handle) {
                out.push(BackendRequest::IotlbInvalidate(IotlbInvalidate {
                    handle: Some(handle),
                    ssid: None,
                    start: 0,
                    last: u64::MAX,
                }));
            }
        }
        if let Some(smmu) = self.smmu.as_mut() {
            for sid in refused {
                smmu.record_bad_ste(&self.ram, sid);
            }
        }
    }

    /// Sends backend-channel requests in order: all posted but the last, which is
    /// acknowledged, so that the frontend has processed all of them on return.
    fn send_backend(&mut self, requests: Vec<BackendRequest>) -> Result<(), ErrorReply> {
        let Some(channel) = self.channel.as_ref() else {
            return Ok(());
        };
        let count = requests.len();
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

    /// Puts new guest RAM in force, watched for a frontend that truncates it.
    fn set_ram(&mut self, ram: GuestRam) -> Result<(), ErrorReply> {
        let mappings = ram.iter().filter_map(|r| {
            let start = r.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
            Some((start, usize::try_from(r.len()).ok()?))
        });
        let watch = ram_guard::Watch::new(mappings)
            .map_err(|e| refuse(Status::HOST_ERROR, crate::error_chain(&e)))?;
        self.ram = ram;
        self.ram_watch = watch;
        Ok(())
    }

    /// The guest RAM region the frontend shrank under the backend, if any: the session cannot
    /// go on (what was read there is gone).
    fn lost_ram(&self) -> Option<SessionError> {
        let (start, len) = self.ram_watch.lost()?;
        let gpa = self
            .ram
            .iter()
            .find(|r| {
                r.get_host_address(MemoryRegionAddress(0))
                    .is_ok_and(|p| p as usize == start)
            })
            .map_or(0, |r| r.start_addr().0);
        Some(SessionError::GuestRamLost {
            gpa,
            size: len as u64,
        })
    }

    /// The backend channel broke, or a reply on it did not come in time: the frontend may
    /// have missed what the backend told it, and the channel is out of step. The request in
    /// progress fails with INTERNAL and the session ends after its reply (docs/protocol.md,
    /// section 5).
    fn channel_failed(&mut self, e: &Error) -> ErrorReply {
        let text = crate::error_chain(e);
        self.channel_broken = Some(text.clone());
        refuse(Status::INTERNAL, format!("backend channel failed: {text}"))
    }

    fn pulse(&self, line: IrqLine) {
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

    fn get_state(&self) -> Result<StateBlob, ErrorReply> {
        let Some(smmu) = self.smmu.as_ref() else {
            return Err(refuse(Status::BAD_STATE, "no vSMMU"));
        };
        let state = SessionState {
            version: STATE_VERSION,
            smmu: smmu.snapshot(),
            devices: self.devices.iter().map(|(&h, d)| (h, d.sid)).collect(),
            passthrough: self.passthrough.as_ref().map(Passthrough::snapshot),
        };
        let json = serde_json::to_vec(&state)
            .map_err(|e| refuse(Status::INTERNAL, format!("cannot encode the state: {e}")))?;
        let host =
            |what: &str, e: std::io::Error| refuse(Status::HOST_ERROR, format!("{what}: {e}"));
        let fd = memfd_create(
            "viommu-state",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| host("memfd_create", e.into()))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&json)
            .map_err(|e| host("writing the state", e))?;
        fcntl_add_seals(
            &file,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )
        .map_err(|e| host("sealing the state", e.into()))?;
        Ok(StateBlob {
            size: json.len() as u64,
            fd: file.into(),
        })
    }

    fn set_state(&mut self, blob: StateBlob) -> Result<(), ErrorReply> {
        let size = usize::try_from(blob.size).unwrap_or(usize::MAX);
        let mut json = vec![0u8; size];
        let read = rustix::io::pread(blob.fd.as_fd(), &mut json, 0).map_err(|e| {
            refuse(
                Status::INVALID_ARGUMENT,
                format!("cannot read the state: {e}"),
            )
        })?;
        if read != size {
            return Err(refuse(
                Status::INVALID_ARGUMENT,
                format!("state is {read} bytes, not {size}"),
            ));
        }
        let state: SessionState = serde_json::from_slice(&json).map_err(|e| {
            refuse(
                Status::INVALID_ARGUMENT,
                format!("cannot parse the state: {e}"),
            )
        })?;
        if state.version != STATE_VERSION {
            return Err(refuse(
                Status::INCOMPATIBLE,
                format!("state version {}", state.version),
            ));
        }
        // Passthrough devices of the state are adopted when the frontend attaches them again,
        // after SET_STATE; every other device must be attached as it was.
        let host_state = state.passthrough.unwrap_or_default();
        // Devices match by handle: a SID is a hint (the guest may have renumbered its buses
        // since the state was taken), and every device's SID is confirmed again before the
        // restored STEs are applied to it.
        let expected: Vec<u32> = state
            .devices
            .keys()
            .filter(|h| !host_state.devices.contains_key(h))
            .copied()
            .collect();
        let attached: Vec<u32> = self.devices.keys().copied().collect();
        if expected != attached {
            return Err(refuse(
                Status::INCOMPATIBLE,
                format!(
                    "state has devices {expected:?} (besides passthrough ones to adopt), \
                     attached are {attached:?}"
                ),
            ));
        }
        let adopting = !host_state.viommus.is_empty() || !host_state.devices.is_empty();
        if adopting && self.passthrough.is_none() {
            return Err(refuse(
                Status::BAD_STATE,
                "the state has passthrough devices: SET_IOMMUFD first",
            ));
        }
        // An IDR_AUTO model takes the registers the saved devices' host SMMU gave it.
        if self.idr_auto_pending
            && let Some(v) = host_state.viommus.first()
            && let Some(smmu) = self.smmu.as_ref()
        {
            let hw = crate::host::HwInfo {
                idr: v.idr,
                ..Default::default()
            };
            let features = host_objects::auto_features(&hw, smmu.features());
            self.smmu = Some(Smmu::new(features));
            self.idr_auto_pending = false;
        }
        let Some(smmu) = self.smmu.as_mut() else {
            return Err(refuse(Status::BAD_STATE, "no vSMMU"));
        };
        smmu.restore(&state.smmu)
            .map_err(|e| refuse(Status::INCOMPATIBLE, e.to_string()))?;
        if adopting && let Some(p) = self.passthrough.as_mut() {
            p.adopt(host_state)
                .map_err(|e| refuse(Status::INCOMPATIBLE, e.to_string()))?;
        }
        info!("state restored");
        self.run_effects()
    }
}

/// What a device's transactions go through, from what governs its stream.
fn address_space(state: StreamState) -> AddressSpace {
    match state {
        StreamState::GlobalBypass
        | StreamState::Ste {
            config: Ok(StreamConfig::Bypass),
            ..
        } => AddressSpace::System,
        _ => AddressSpace::Translated,
    }
}

fn memory_refusal(e: guest_memory::MemoryError) -> ErrorReply {
    use guest_memory::MemoryError as M;
    // docs/protocol.md, SET_MEM_TABLE and ADD_MEM_REG: a descriptor of the wrong kind is an
    // invalid message; a file that cannot back the region is a host error.
    let status = match &e {
        M::WrongKind { .. } => Status::INVALID_MESSAGE,
        M::BadFile { .. } | M::TooLarge { .. } | M::Mmap { .. } => Status::HOST_ERROR,
        M::Overlap { .. } => Status::INVALID_ARGUMENT,
        M::NotFound { .. } => Status::NOT_FOUND,
        M::TooMany { .. } => Status::NO_SPACE,
    };
    refuse(status, crate::error_chain(&e))
}
