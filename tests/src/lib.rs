//! The mock QEMU peer: the frontend side of the vIOMMU-user protocol as QEMU would drive it.
//!
//! - [`MockQemu`]: the main connection with what QEMU hands the backend: memfd guest RAM
//!   ([`ram`]), IRQ eventfds, the backend channel ([`channel`]) and its translation cache;
//! - [`port`]: the vSMMU's registers reached over MMIO_READ / MMIO_WRITE;
//! - [`guest`]: a guest driver that programs the vSMMU the way Linux does;
//! - [`lab`]: the lab program's safe wrappers over a real `/dev/iommu`, a VFIO cdev and the
//!   `edu` device's BAR0, for playing QEMU on a real host IOMMU;
//! - [`scenario`]: the scripted Linux-like session of the demo and the integration tests.

pub mod channel;
pub mod guest;
pub mod lab;
pub mod port;
pub mod ram;
pub mod scenario;
pub mod shared;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use viommu_protocol::{
    Access, AddressSpace, AttachDevice, Features, Frontend, FrontendReply, FrontendRequest, IdRegs,
    IrqIndex, ModelConfig, StateBlob, TranslateReply, TranslateRequest,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::channel::{CachedTranslation, ChannelServer, ChannelState, lock};
use crate::port::SocketPort;
use crate::ram::MemfdRam;

/// Features the mock frontend knows how to use.
pub const FRONTEND_FEATURES: Features = Features::PASSTHROUGH
    .union(Features::BACKEND_CHANNEL)
    .union(Features::MEM_SLOTS)
    .union(Features::TRANSLATE)
    .union(Features::STATE)
    .union(Features::MSI)
    .union(Features::SHARED_REGION)
    .union(Features::SHARED_TRANSLATE)
    .union(Features::RESUME)
    .union(Features::HOLD_FDS);

/// The outcome of a DMA translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dma {
    /// The access goes to this guest physical address.
    Address {
        /// The output address.
        gpa: u64,
        /// Whether the frontend's cache answered (no TRANSLATE was sent).
        cached: bool,
    },
    /// The vSMMU refused the access; `event` is the event type it recorded (0 for none).
    Fault {
        /// The SMMU event type.
        event: u8,
    },
}

/// Counters of what the mock sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// TRANSLATE requests.
    pub translates: u64,
    /// Translations answered from the cache.
    pub cache_hits: u64,
    /// Accesses that went straight to guest memory (the device in SYSTEM).
    pub system: u64,
}

/// A frontend connection as QEMU's `viommu-user` object holds it, with the resources QEMU
/// hands over.
#[derive(Debug)]
pub struct MockQemu {
    main: Rc<Frontend>,
    features: Features,
    ram: Option<MemfdRam>,
    irqs: Vec<(IrqIndex, OwnedFd)>,
    channel: Option<ChannelServer>,
    state: Arc<Mutex<ChannelState>>,
    devices: BTreeMap<u32, u32>,
    /// Devices whose UNMAP_NOTIFY the backend was told of (shared region).
    notified: BTreeSet<u32>,
    sent: Sent,
    /// Whether to set up the shared region when it is negotiated.
    use_shared: bool,
    /// The features [`MockQemu::negotiate`] may take.
    usable: Features,
    shared: Option<Rc<shared::SharedFrontend>>,
    /// The configuration [`MockQemu::start`] sent, for a resume to send again.
    config: Option<ModelConfig>,
    /// The iommufd given with SET_IOMMUFD, for a resume to give again.
    iommufd: Option<OwnedFd>,
    /// Handles of the passthrough devices among `devices` (a resume leaves them to the
    /// caller, who attaches them after it).
    passthrough: BTreeSet<u32>,
}

impl MockQemu {
    /// Connects to a backend listening on `path`, retrying until `timeout` (QEMU's
    /// `reconnect-ms` behaviour for a backend that is still starting).
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => return Ok(Self::from_stream(stream)),
                Err(e) if start.elapsed() < timeout => {
                    log::debug!("connect {}: {e}; retrying", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot connect to {}", path.display()));
                }
            }
        }
    }

    /// Uses an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        Self {
            main: Rc::new(Frontend::new(stream)),
            features: Features::empty(),
            ram: None,
            irqs: Vec::new(),
            channel: None,
            state: Arc::default(),
            devices: BTreeMap::new(),
            notified: BTreeSet::new(),
            sent: Sent::default(),
            use_shared: shared::wanted_by_default(),
            usable: FRONTEND_FEATURES,
            shared: None,
            config: None,
            iommufd: None,
            passthrough: BTreeSet::new(),
        }
    }

    /// Whether to take the shared region (feature SHARED_REGION) at negotiation; the default
    /// comes from `VIOMMU_MOCK_SHARED`.
    pub fn with_shared_region(mut self, on: bool) -> Self {
        self.use_shared = on;
        self
    }

    /// Restricts the features [`MockQemu::negotiate`] takes to `usable` (a frontend without
    /// some of them).
    pub fn with_usable_features(mut self, usable: Features) -> Self {
        self.usable = usable;
        self
    }

    /// The shared region, once set up.
    pub fn shared(&self) -> Option<&Rc<shared::SharedFrontend>> {
        self.shared.as_ref()
    }

    /// The main-channel connection.
    pub fn frontend(&self) -> &Frontend {
        &self.main
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// GET_FEATURES then SET_FEATURES with what both sides know. Returns the negotiated set.
    pub fn negotiate(&mut self) -> anyhow::Result<Features> {
        self.negotiate_within(self.usable)
    }

    /// [`MockQemu::negotiate`], taking only features in `usable` (a frontend without some).
    pub fn negotiate_within(&mut self, usable: Features) -> anyhow::Result<Features> {
        let offer = match self.main.call(&FrontendRequest::GetFeatures)? {
            FrontendReply::Features(f) => f,
            other => bail!("GET_FEATURES answered with {other:?}"),
        };
        let mut wanted = offer & usable;
        if !self.use_shared {
            wanted.remove(Features::SHARED_REGION);
        }
        if !wanted.contains(Features::SHARED_REGION | Features::TRANSLATE) {
            wanted.remove(Features::SHARED_TRANSLATE);
        }
        if !wanted.contains(Features::SHARED_REGION) {
            wanted.remove(Features::RESUME);
        }
        if !wanted.contains(Features::RESUME | Features::BACKEND_CHANNEL) {
            wanted.remove(Features::HOLD_FDS);
        }
        self.main.call(&FrontendRequest::SetFeatures(wanted))?;
        self.features = wanted;
        Ok(wanted)
    }

    /// Hands over what QEMU hands over before the machine starts: guest RAM (`ram_size` bytes
    /// of memfd at guest physical 0, by SET_MEM_TABLE), an eventfd per interrupt line, and the
    /// backend channel. Then SET_CONFIG.
    pub fn start(&mut self, config: ModelConfig, ram_size: u64) -> anyhow::Result<()> {
        self.start_on(config, MemfdRam::new(0, ram_size)?)
    }

    /// [`MockQemu::start`] with RAM that already exists (a reconnect, or a migration target,
    /// hands the backend the same guest RAM again).
    pub fn start_on(&mut self, config: ModelConfig, ram: MemfdRam) -> anyhow::Result<()> {
        self.start_parts(config, ram, true)
    }

    /// [`MockQemu::start`] without setting up the shared region even when it was negotiated (a
    /// frontend about to resume one, docs/protocol.md 10.10).
    pub fn start_leaving_region(
        &mut self,
        config: ModelConfig,
        ram_size: u64,
    ) -> anyhow::Result<()> {
        self.start_parts(config, MemfdRam::new(0, ram_size)?, false)
    }

    /// [`MockQemu::start_on`]; with `new_region` false the shared region is left for a resume.
    fn start_parts(
        &mut self,
        config: ModelConfig,
        ram: MemfdRam,
        new_region: bool,
    ) -> anyhow::Result<()> {
        self.main.call(&FrontendRequest::SetMemTable(vec![(
            ram.region(),
            ram.fd()?,
        )]))?;
        for index in [
            IrqIndex::Evtq,
            IrqIndex::Priq,
            IrqIndex::CmdSync,
            IrqIndex::Gerror,
        ] {
            let fd = rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .context("eventfd")?;
            let theirs = fd.try_clone().context("eventfd dup")?;
            self.main.call(&FrontendRequest::SetIrqFd {
                index,
                fd: Some(theirs),
            })?;
            self.irqs.push((index, fd));
        }
        if self.features.contains(Features::BACKEND_CHANNEL) {
            let (ours, theirs) = UnixStream::pair().context("socketpair")?;
            self.main
                .call(&FrontendRequest::SetBackendChannel(theirs))?;
            self.channel = Some(ChannelServer::spawn(
                ours,
                ram.mem().clone(),
                Arc::clone(&self.state),
            )?);
        }
        if new_region && self.features.contains(Features::SHARED_REGION) {
            let with_call = self.features.contains(Features::SHARED_TRANSLATE);
            let (shared, fds) = shared::SharedFrontend::create(with_call)?;
            self.main
                .call(&FrontendRequest::SetSharedRegion {
                    region: fds.region,
                    kick: fds.kick,
                    call: fds.call,
                    resume: false,
                })
                .context("SET_SHARED_REGION")?;
            self.shared = Some(shared);
        }
        self.main.call(&FrontendRequest::SetConfig(config))?;
        self.config = Some(config);
        self.ram = Some(ram);
        Ok(())
    }

    /// After the backend of this session died (SIGKILL): a new session on `path` resumes the
    /// vSMMU from the shared region (docs/protocol.md, 10.10), as QEMU does with
    /// `reconnect-ms`: the set-up replayed (features, RAM, interrupts, channel, configuration,
    /// the emulated devices at their SIDs), then SET_SHARED_REGION with RESUME and the same
    /// region, kick and call. Returns the new session; the guest's RAM, interrupt eventfds and
    /// region carry over (the interrupt eventfds are new ones), and what was posted into the
    /// ring meanwhile is applied by the new backend.
    pub fn resume_on(self, path: &Path) -> anyhow::Result<MockQemu> {
        let next = MockQemu::connect(path, Duration::from_secs(10))?;
        self.resume_into(next)
    }

    /// [`MockQemu::resume_on`] over a connection made already. With HOLD_FDS the descriptors
    /// held for the dead backend are returned (RETURN_FDS, docs/protocol.md 10.11) before the
    /// resume, and held on; without it they are closed.
    pub fn resume_into(mut self, next: MockQemu) -> anyhow::Result<MockQemu> {
        let shared = self
            .shared
            .take()
            .context("no shared region to resume from")?;
        let ram = self.ram.take().context("no guest RAM")?;
        let config = self.config.context("not started")?;
        if let Some(channel) = self.channel.take() {
            // The dead backend's end is closed: the channel thread ends.
            let _ = channel.stop();
        }
        let held = std::mem::take(&mut lock(&self.state).held);
        let mut next = next
            .with_shared_region(true)
            .with_usable_features(self.usable);
        next.negotiate()?;
        if !next.features.contains(Features::RESUME) {
            bail!("the new backend does not offer RESUME");
        }
        next.start_parts(config, ram, false)?;
        if let Some(iommufd) = self.iommufd.take() {
            next.set_iommufd(iommufd)?;
        }
        for (&handle, &sid) in &self.devices {
            if !self.passthrough.contains(&handle) {
                next.attach(handle, sid)?;
            }
        }
        if next.features.contains(Features::HOLD_FDS) {
            let all: Vec<(&u32, &OwnedFd)> = held.iter().collect();
            for chunk in all.chunks(viommu_protocol::MAX_FDS_PER_MESSAGE) {
                let fds = chunk
                    .iter()
                    .map(|(k, fd)| Ok((**k, fd.try_clone()?)))
                    .collect::<std::io::Result<Vec<_>>>()?;
                next.main
                    .call(&FrontendRequest::ReturnFds(viommu_protocol::HeldFds {
                        fds,
                    }))
                    .context("RETURN_FDS")?;
            }
            lock(&next.state).held = held;
        }
        let fds = shared.hand_over().context("the region's fds")?;
        next.main
            .call(&FrontendRequest::SetSharedRegion {
                region: fds.region,
                kick: fds.kick,
                call: fds.call,
                resume: true,
            })
            .context("SET_SHARED_REGION with RESUME")?;
        next.shared = Some(shared);
        Ok(next)
    }

    /// Guest RAM (after [`MockQemu::start`]).
    pub fn mem(&self) -> anyhow::Result<&GuestMemoryMmap<()>> {
        self.ram
            .as_ref()
            .map(MemfdRam::mem)
            .context("no guest RAM yet")
    }

    /// Takes the guest RAM back (to hand it to the next session).
    pub fn take_ram(&mut self) -> Option<MemfdRam> {
        self.ram.take()
    }

    /// The vSMMU's register window, for a guest driver.
    pub fn port(&self) -> SocketPort {
        SocketPort::new(Rc::clone(&self.main), self.shared.clone())
    }

    /// GET_ID_REGS.
    pub fn id_regs(&self) -> anyhow::Result<IdRegs> {
        match self.main.call(&FrontendRequest::GetIdRegs)? {
            FrontendReply::IdRegs(regs) => Ok(regs),
            other => bail!("GET_ID_REGS answered with {other:?}"),
        }
    }

    /// ATTACH_DEVICE of an emulated device; the backend channel will answer RESOLVE_SID for
    /// `sid` with `handle` from now on.
    pub fn attach(&mut self, handle: u32, sid: u32) -> anyhow::Result<()> {
        self.attach_device(AttachDevice {
            handle,
            sid,
            passthrough: None,
        })
        .with_context(|| format!("ATTACH_DEVICE {handle}"))
    }

    /// ATTACH_DEVICE. The channel answers for the device while the backend attaches it; a
    /// refused attach leaves what the mock knew (an attached handle keeps its SID).
    fn attach_device(&mut self, attach: AttachDevice) -> anyhow::Result<()> {
        let handle = attach.handle;
        let before = self.record_sid(handle, Some(attach.sid));
        match self.main.call(&FrontendRequest::AttachDevice(attach)) {
            Ok(_) => {
                // UNMAP_NOTIFY starts clear on every attachment (docs/protocol.md, 10.8).
                self.notified.remove(&handle);
                Ok(())
            }
            Err(e) => {
                self.record_sid(handle, before);
                Err(e.into())
            }
        }
    }

    /// SET_IOMMUFD: the frontend's iommufd (any fd, for a backend with a host double).
    /// SET_IOMMUFD. The frontend keeps the iommufd (a resume hands it to the next backend).
    pub fn set_iommufd(&mut self, fd: OwnedFd) -> anyhow::Result<()> {
        let theirs = fd.try_clone().context("dup of the iommufd")?;
        self.main
            .call(&FrontendRequest::SetIommufd(theirs))
            .context("SET_IOMMUFD")?;
        self.iommufd = Some(fd);
        Ok(())
    }

    /// ATTACH_DEVICE of a VFIO device bound to the iommufd as `devid`, attached by the
    /// frontend to the stage-2 parent `s2_hwpt_id`, with (a duplicate of) its cdev.
    pub fn attach_passthrough(
        &mut self,
        handle: u32,
        sid: u32,
        devid: u32,
        s2_hwpt_id: u32,
        cdev: OwnedFd,
    ) -> anyhow::Result<()> {
        self.attach_device(AttachDevice {
            handle,
            sid,
            passthrough: Some(viommu_protocol::Passthrough {
                ids: viommu_protocol::PassthroughIds { devid, s2_hwpt_id },
                cdev,
            }),
        })
        .with_context(|| format!("ATTACH_DEVICE {handle} (passthrough)"))?;
        self.passthrough.insert(handle);
        Ok(())
    }

    /// The guest renumbered a bus: the device is at `sid` now (QEMU computes this from the
    /// PCI topology and answers GET_DEVICE_SIDS and RESOLVE_SID with it).
    ///
    /// With the shared region the SID is pushed (UPDATE_DEVICE) at once, before any later
    /// register write, as QEMU pushes it before it posts the next one.
    pub fn set_sid(&mut self, handle: u32, sid: u32) {
        let moved = self
            .record_sid(handle, Some(sid))
            .is_some_and(|old| old != sid);
        let mut flags = viommu_protocol::types::DeviceFlags::empty();
        flags.set(
            viommu_protocol::types::DeviceFlags::UNMAP_NOTIFY,
            self.notified.contains(&handle),
        );
        if moved
            && self.shared.is_some()
            && let Err(e) = self.update_device(handle, flags)
        {
            log::warn!("UPDATE_DEVICE {handle}: {e:#}");
        }
    }

    /// Where the mock (and its channel) puts the device now: at `sid`, or nowhere. Returns the
    /// SID it had.
    fn record_sid(&mut self, handle: u32, sid: Option<u32>) -> Option<u32> {
        let mut state = self.channel_state();
        state.sids.retain(|_, &mut h| h != handle);
        if let Some(sid) = sid {
            state.sids.insert(sid, handle);
        }
        drop(state);
        match sid {
            Some(sid) => self.devices.insert(handle, sid),
            None => self.devices.remove(&handle),
        }
    }

    /// UPDATE_DEVICE: pushes a device's SID as the mock knows it, with `flags`. With
    /// UNMAP_NOTIFY the device's translations go to a notifier's consumer that keeps them
    /// (vhost's device IOTLB): see [`MockQemu::translate`].
    pub fn update_device(
        &mut self,
        handle: u32,
        flags: viommu_protocol::types::DeviceFlags,
    ) -> anyhow::Result<()> {
        let sid = *self
            .devices
            .get(&handle)
            .with_context(|| format!("no device {handle}"))?;
        self.main
            .call(&FrontendRequest::UpdateDevice { handle, sid, flags })
            .with_context(|| format!("UPDATE_DEVICE {handle}"))?;
        if flags.contains(viommu_protocol::types::DeviceFlags::UNMAP_NOTIFY) {
            self.notified.insert(handle);
        } else if self.notified.remove(&handle) {
            // The consumer is gone, and the backend stops invalidating what it kept.
            self.forget_translations(handle);
        }
        Ok(())
    }

    /// Drops what the mock's own cache holds for `handle`.
    fn forget_translations(&self, handle: u32) {
        self.channel_state()
            .cache
            .invalidate(&viommu_protocol::IotlbInvalidate {
                handle: Some(handle),
                ssid: None,
                start: 0,
                last: u64::MAX,
            });
    }

    /// DETACH_DEVICE.
    pub fn detach(&mut self, handle: u32) -> anyhow::Result<()> {
        self.main
            .call(&FrontendRequest::DetachDevice { handle })
            .with_context(|| format!("DETACH_DEVICE {handle}"))?;
        self.record_sid(handle, None);
        self.notified.remove(&handle);
        self.forget_translations(handle);
        Ok(())
    }

    /// What the backend channel has told the frontend.
    pub fn channel_state(&self) -> MutexGuard<'_, ChannelState> {
        lock(&self.state)
    }

    /// Counters of requests sent.
    pub fn sent(&self) -> Sent {
        self.sent
    }

    /// A DMA translation as QEMU's `address_space_*` does it through the vSMMU's IOMMU
    /// memory region: the cache first, then TRANSLATE; the result is cached.
    ///
    /// With the shared region the cache is the backend's (docs/protocol.md, 10.6), except for
    /// a device with UNMAP_NOTIFY: its translations go to a notifier's consumer that keeps
    /// them (vhost's device IOTLB), which the mock's own cache stands for. That consumer takes
    /// only TRANSLATE answers, the ones the backend invalidates by message (section 8.3).
    pub fn translate(
        &mut self,
        handle: u32,
        ssid: Option<u32>,
        iova: u64,
        access: Access,
    ) -> anyhow::Result<Dma> {
        let sid = *self
            .devices
            .get(&handle)
            .with_context(|| format!("no device {handle}"))?;
        // SYSTEM, as QEMU's fast path has it: only while the device is at the SID the backend
        // decided for.
        let system = {
            let state = self.channel_state();
            state.spaces.get(&handle) == Some(&AddressSpace::System)
                && state.space_sids.get(&handle) == Some(&sid)
        };
        if system {
            self.sent.system = self.sent.system.saturating_add(1);
            return Ok(Dma::Address {
                gpa: iova,
                cached: true,
            });
        }
        if let Some(gpa) = self.lookup_cached(handle, sid, ssid, iova, access) {
            self.sent.cache_hits = self.sent.cache_hits.saturating_add(1);
            return Ok(Dma::Address { gpa, cached: true });
        }
        self.sent.translates = self.sent.translates.saturating_add(1);
        let request = TranslateRequest {
            sid,
            ssid,
            iova,
            access,
        };
        let reply = match self.shared.as_ref().filter(|s| s.translates()) {
            // Through the region (10.9): the same request, the same answer.
            Some(shared) => match shared.translate(&request)? {
                Ok(reply) => FrontendReply::Translate(reply),
                Err(status) => bail!("a translation request refused with {status}"),
            },
            None => self.main.call(&FrontendRequest::Translate(request))?,
        };
        match reply {
            FrontendReply::Translate(TranslateReply::Translated {
                addr,
                addr_mask,
                perm,
            }) => {
                let start = iova & !addr_mask;
                if !self.keeps_own(handle) {
                    return Ok(Dma::Address {
                        gpa: addr | (iova & addr_mask),
                        cached: false,
                    });
                }
                self.channel_state().cache.insert(
                    handle,
                    ssid,
                    start,
                    CachedTranslation {
                        sid,
                        last: start | addr_mask,
                        addr,
                        perm,
                    },
                );
                Ok(Dma::Address {
                    gpa: addr | (iova & addr_mask),
                    cached: false,
                })
            }
            FrontendReply::Translate(TranslateReply::Fault { event }) => Ok(Dma::Fault { event }),
            other => bail!("TRANSLATE answered with {other:?}"),
        }
    }

    /// Whether the frontend keeps `handle`'s translations itself: without the shared region,
    /// or for a device with UNMAP_NOTIFY.
    fn keeps_own(&self, handle: u32) -> bool {
        self.shared.is_none() || self.notified.contains(&handle)
    }

    /// Where `access` at `iova` goes if a cache answers it without a message (see
    /// [`MockQemu::translate`]).
    fn lookup_cached(
        &self,
        handle: u32,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        access: Access,
    ) -> Option<u64> {
        let needs = perm_for(access);
        if self.keeps_own(handle) {
            let (start, hit) = self.channel_state().cache.lookup(handle, ssid, iova)?;
            return (hit.perm.contains(needs) && hit.sid == sid)
                .then_some(hit.addr | iova.wrapping_sub(start));
        }
        if access.intersects(Access::PRIV | Access::EXEC) {
            return None;
        }
        self.shared.as_ref()?.lookup(
            sid,
            ssid,
            iova,
            needs.contains(viommu_protocol::Perm::READ),
            needs.contains(viommu_protocol::Perm::WRITE),
        )
    }

    /// Whether [`MockQemu::translate`] would answer `access` at `iova` from a cache now, without
    /// a message (the SYSTEM fast path aside). Asks nothing.
    pub fn holds_translation(
        &self,
        handle: u32,
        ssid: Option<u32>,
        iova: u64,
        access: Access,
    ) -> bool {
        self.devices.get(&handle).is_some_and(|&sid| {
            self.lookup_cached(handle, sid, ssid, iova, access)
                .is_some()
        })
    }

    /// A device's DMA write of `data` at `iova` (within one page). Returns where it landed.
    pub fn dma_write(
        &mut self,
        handle: u32,
        ssid: Option<u32>,
        iova: u64,
        data: &[u8],
    ) -> anyhow::Result<Dma> {
        let dma = self.translate(handle, ssid, iova, Access::WRITE)?;
        if let Dma::Address { gpa, .. } = dma {
            self.mem()?
                .write_slice(data, GuestAddress(gpa))
                .with_context(|| format!("DMA write to {gpa:#x}"))?;
        }
        Ok(dma)
    }

    /// A device's DMA read of `buf.len()` bytes at `iova` (within one page).
    pub fn dma_read(
        &mut self,
        handle: u32,
        ssid: Option<u32>,
        iova: u64,
        buf: &mut [u8],
    ) -> anyhow::Result<Dma> {
        let dma = self.translate(handle, ssid, iova, Access::READ)?;
        if let Dma::Address { gpa, .. } = dma {
            self.mem()?
                .read_slice(buf, GuestAddress(gpa))
                .with_context(|| format!("DMA read from {gpa:#x}"))?;
        }
        Ok(dma)
    }

    /// How many times the backend signalled an interrupt line since the last call.
    pub fn take_irqs(&self, index: IrqIndex) -> u64 {
        self.irqs
            .iter()
            .find(|(i, _)| *i == index)
            .and_then(|(_, fd)| {
                let mut count = [0u8; 8];
                match rustix::io::read(fd, &mut count) {
                    Ok(8) => Some(u64::from_ne_bytes(count)),
                    _ => None,
                }
            })
            .unwrap_or(0)
    }

    /// RESET (system reset).
    pub fn reset(&mut self) -> anyhow::Result<()> {
        self.main.call(&FrontendRequest::Reset)?;
        self.channel_state().cache = channel::TranslationCache::default();
        Ok(())
    }

    /// GET_STATE: the state blob, as its bytes.
    pub fn get_state(&self) -> anyhow::Result<Vec<u8>> {
        let blob = match self.main.call(&FrontendRequest::GetState)? {
            FrontendReply::State(blob) => blob,
            other => bail!("GET_STATE answered with {other:?}"),
        };
        let size = usize::try_from(blob.size).context("state size")?;
        let mut bytes = vec![0u8; size];
        let read = rustix::io::pread(&blob.fd, &mut bytes, 0).context("reading the state")?;
        if read != size {
            bail!("state memfd holds {read} bytes, not {size}");
        }
        Ok(bytes)
    }

    /// SET_STATE with `bytes` in a new memfd.
    pub fn set_state(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let fd = rustix::fs::memfd_create("mock-qemu-state", rustix::fs::MemfdFlags::CLOEXEC)
            .context("memfd_create")?;
        rustix::io::write(&fd, bytes).context("writing the state")?;
        self.main.call(&FrontendRequest::SetState(StateBlob {
            size: bytes.len() as u64,
            fd,
        }))?;
        Ok(())
    }

    /// Ends the session: closes what it held for the backend (docs/protocol.md 10.11), then
    /// the main connection and the backend channel.
    pub fn close(mut self) -> anyhow::Result<()> {
        lock(&self.state).held.clear();
        let _ = self.main.stream().shutdown(std::net::Shutdown::Both);
        match self.channel.take() {
            Some(channel) => channel.stop(),
            None => Ok(()),
        }
    }

    /// The raw fd of the main connection (for tests that corrupt the stream).
    pub fn raw_fd(&self) -> i32 {
        self.main.stream().as_raw_fd()
    }
}

fn perm_for(access: Access) -> viommu_protocol::Perm {
    let mut perm = viommu_protocol::Perm::empty();
    perm.set(viommu_protocol::Perm::READ, access.contains(Access::READ));
    perm.set(viommu_protocol::Perm::WRITE, access.contains(Access::WRITE));
    perm
}

/// A daemon of the built `viommu-backend` listening on a socket in a private directory (under
/// its default sandbox, logging errors only), serving one frontend after another; killed and
/// its directory removed on drop. What the whole-session suites start.
#[derive(Debug)]
pub struct PrivateDaemon {
    process: Option<BackendProcess>,
    dir: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
}

impl PrivateDaemon {
    /// Starts one; `name` tells its directory from other tests' of this process.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with(name, &[])
    }

    /// [`PrivateDaemon::start`] with further command-line arguments.
    pub fn start_with(name: &str, args: &[&str]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("viommu-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).context("creating the daemon's directory")?;
        let socket = dir.join("vsmmu.sock");
        let args: Vec<&str> = ["--log-level", "error"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        let process = BackendProcess::spawn_with(&backend_binary_built()?, &socket, &args)?;
        Ok(Self {
            process: Some(process),
            dir,
            socket,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        })
    }

    /// Kills the daemon with SIGKILL (no clean-up of any kind) and starts a new one on the same
    /// socket, as systemd's `Restart=on-failure` would.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        drop(self.process.take());
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.process = Some(BackendProcess::spawn_with(
            &backend_binary_built()?,
            &self.socket,
            &args,
        )?);
        Ok(())
    }

    /// A mock QEMU connected to it (waiting for it to listen).
    pub fn connect(&self) -> anyhow::Result<MockQemu> {
        MockQemu::connect(&self.socket, Duration::from_secs(10))
    }

    /// A plain connection, once the daemon listens (after a first [`PrivateDaemon::connect`]).
    pub fn raw(&self) -> anyhow::Result<UnixStream> {
        UnixStream::connect(&self.socket).context("connecting to the daemon")
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process.
    pub fn process(&mut self) -> Option<&mut BackendProcess> {
        self.process.as_mut()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(BackendProcess::is_running)
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `viommu-backend` process started for a test or the demo, killed on drop.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    socket: PathBuf,
}

impl BackendProcess {
    /// Starts `binary --socket-path socket`.
    pub fn spawn(binary: &Path, socket: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(binary, socket, &[])
    }

    /// Starts `binary --socket-path socket ARGS...`.
    pub fn spawn_with(binary: &Path, socket: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_logging(binary, socket, args, None)
    }

    /// [`BackendProcess::spawn_with`], its log (stderr) going to `log` when given.
    pub fn spawn_logging(
        binary: &Path,
        socket: &Path,
        args: &[&str],
        log: Option<std::fs::File>,
    ) -> anyhow::Result<Self> {
        let stderr = log.map_or_else(Stdio::inherit, Stdio::from);
        let child = Command::new(binary)
            .arg("--socket-path")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self {
            child,
            socket: socket.to_owned(),
        })
    }

    /// The socket the backend listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The `viommu-backend` binary to test, built once per process when cargo runs this program:
/// `cargo test -p viommu-tests` does not build another package's binaries, and a stale daemon
/// would test old code. Uses the `cargo` that runs the tests.
pub fn backend_binary_built() -> anyhow::Result<PathBuf> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(path) = built.as_ref() {
        return Ok(path.clone());
    }
    // Under cargo (CARGO is set), make sure the binary is current: `cargo test -p viommu-tests`
    // alone would otherwise run a stale daemon. Elsewhere, use what is there.
    let path = if std::env::var_os("CARGO").is_some() || backend_binary().is_err() {
        build_backend()?
    } else {
        backend_binary()?
    };
    *built = Some(path.clone());
    Ok(path)
}

/// Builds `viommu-backend` with the `cargo` that runs this program (an up-to-date binary is
/// left alone), in the profile this program was built with, and returns its path.
pub fn build_backend() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "viommu-backend", "--bin", "viommu-backend"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build
        .status()
        .context("cannot run cargo to build viommu-backend")?;
    if !status.success() {
        bail!("building viommu-backend failed: {status}");
    }
    backend_binary()
}

/// The `viommu-backend` binary next to the running executable (both live in cargo's target
/// directory), or `$VIOMMU_BACKEND`.
pub fn backend_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("VIOMMU_BACKEND") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_owned();
    // Test binaries run from target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join("viommu-backend");
    if candidate.exists() {
        Ok(candidate)
    } else {
        bail!(
            "{} not found: build it with `cargo build -p viommu-backend` or set VIOMMU_BACKEND",
            candidate.display()
        )
    }
}
