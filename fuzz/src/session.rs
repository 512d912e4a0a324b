//! The `session` target's input and harness: whole sessions fed structure-aware message
//! sequences through `Session::handle_request`, with real memfd guest RAM, eventfds, a
//! backend channel answered by a mock frontend thread (or with its peer closed), and the
//! in-memory host double behind SET_IOMMUFD.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rustix::fs::{MemfdFlags, ftruncate, memfd_create};
use viommu_backend::host::double::{HostDouble, NESTING_HW};
use viommu_backend::host::{
    HostDevice, HostError, HostIommu, HwInfo, InvalidateError, ObjectId, RawCmd, VEvent, VSte,
};
use viommu_backend::session::{Session, SessionOptions};
use viommu_protocol::message::{Reply, Request};
use viommu_protocol::types::{
    Access, AccessSize, ConfigFlags, Features, IrqIndex, MemRegion, MmioAccess, PassthroughIds,
    TranslateRequest,
};
use viommu_protocol::{
    AttachDevice, BackendReply, BackendRequest, DeviceSid, ErrorReply, FrontendChannel,
    FrontendReply, FrontendRequest, Incoming, Passthrough, StateBlob, Status,
};
use viommu_smmuv3::spec::regs::offset;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::world::{Addr, Cmd, ModelSel, Reg, World, WorldSpec};
use crate::{fuzz_enum, fuzz_struct};

/// Sizes of the memfds an input can map (slot 0 holds the world's RAM0 layout).
pub const MEMFD_SIZES: [u64; 3] = [8 << 20, 1 << 20, 64 << 10];
/// Devices the host double knows (iommufd device IDs).
pub const HOST_DEVICES: [u32; 2] = [100, 101];

fuzz_enum! {
    /// Where a region is.
    pub enum GpaSel {
        /// Slot 0 at guest address 0, all of it (RAM0 of the world).
        Ram0,
        /// Slot 1 at RAM1's address.
        Ram1,
        /// Anywhere, any size.
        Raw { slot: u8, gpa_page: u32, pages: u16, offset_page: u16 },
    }
}

impl GpaSel {
    /// The region and which memfd backs it.
    pub fn region(&self) -> (usize, MemRegion) {
        match *self {
            GpaSel::Ram0 => (
                0,
                MemRegion {
                    gpa: 0,
                    size: MEMFD_SIZES[0],
                    mmap_offset: 0,
                },
            ),
            GpaSel::Ram1 => (
                1,
                MemRegion {
                    gpa: crate::world::RAM1.0,
                    size: MEMFD_SIZES[1],
                    mmap_offset: 0,
                },
            ),
            GpaSel::Raw {
                slot,
                gpa_page,
                pages,
                offset_page,
            } => (
                usize::from(slot) % MEMFD_SIZES.len(),
                MemRegion {
                    gpa: u64::from(gpa_page) << 12,
                    size: u64::from(pages) << 12,
                    mmap_offset: u64::from(offset_page) << 12,
                },
            ),
        }
    }
}

fuzz_enum! {
    /// How SET_BACKEND_CHANNEL's socket behaves.
    pub enum ChannelMode {
        /// A mock frontend answers every request.
        Answered { fail_every: u8 },
        /// Its peer is closed: every call fails at once.
        Closed,
    }
}

fuzz_enum! {
    /// Where SET_STATE's blob comes from.
    pub enum StateSrc {
        /// The last GET_STATE blob, with bytes changed.
        Last { edits: Vec<[u16; 2]>, cut: u16 },
        /// Arbitrary bytes.
        Raw { bytes: Vec<u8> },
    }
}

fuzz_enum! {
    /// Where RETURN_FDS's host record comes from (docs/protocol.md 10.11).
    pub enum RecordSrc {
        /// The one the backend gave to hold (HOLD_FDS key 0), with bytes changed in place as
        /// a hostile frontend could: [offset, byte].
        Held { edits: Vec<[u32; 2]> },
        /// A fresh record file with raw `bytes` in the slot `generation` names.
        Raw { bytes: Vec<u8>, generation: u8, in_hand: bool },
    }
}

fuzz_enum! {
    /// One step of the frontend (or of the guest behind it).
    pub enum Msg {
        GetFeatures,
        SetFeatures { bits: u8 },
        SetConfig { model: ModelSel, idr_auto: bool },
        GetIdRegs,
        SetBackendChannel { mode: ChannelMode },
        SetMemTable { regions: Vec<GpaSel> },
        GetMaxMemSlots,
        AddMemReg { region: GpaSel },
        RemMemReg { region: GpaSel },
        SetIrqFd { index: u8, fd: Option<u8> },
        MmioRead { reg: Reg },
        MmioReadRaw { offset: u32, wide: bool },
        MmioWrite { reg: Reg, value: u64 },
        MmioWriteRaw { offset: u32, wide: bool, value: u64 },
        SetIommufd,
        Attach { handle: u8, sid: u32, passthrough: Option<[u8; 2]> },
        Detach { handle: u8 },
        Translate { sid: u32, ssid: Option<u32>, iova: u64, access: u8 },
        Reset,
        GetState,
        SetState { src: StateSrc },
        /// The guest builds a world in RAM and enables the vSMMU on it (MMIO writes).
        Guest { world: WorldSpec },
        /// The guest writes words to RAM.
        Mem { addr: Addr, words: Vec<u64> },
        /// The guest queues commands at CMDQ_PROD and publishes them.
        Cmds { cmds: Vec<Cmd> },
        /// The guest consumes its events (EVENTQ_CONS = EVENTQ_PROD).
        ConsumeEvents,
        /// The guest renumbers a bus: the frontend's view of a device's SID changes.
        Renumber { handle: u8, sid: u32 },
        /// The host SMMU reports an event for a passthrough device.
        HostEvent { device: u8, record: [u64; 4] },
        /// SET_SHARED_REGION with a fresh region and kick.
        SetSharedRegion,
        /// Raw entries written into the shared ring (offset in bits 31:0 of the first word,
        /// size in bits 39:32, the value in the second), `write_prod` moved by their number
        /// plus `extra`, then the backend applies them as after a kick.
        Posted { entries: Vec<[u64; 2]>, extra: u16 },
        /// UPDATE_DEVICE.
        UpdateDevice { handle: u8, sid: u32, flags: u8 },
        /// A raw translation request in the shared region (docs/protocol.md, 10.9), then the
        /// backend serves the region as after a kick.
        RegionTranslate { sid: u32, ssid: u32, iova: u64, flags: u32, reserved: u32 },
        /// SET_SHARED_REGION with RESUME (docs/protocol.md, 10.10; negotiated when `SetFeatures`
        /// had bit 7 set, which here also asks for RESUME) of a region whose register file is
        /// this session's IDs and the raw `regs` ([slot, value]) over zeros, in the copy
        /// (`torn`: only in the mirror, the copy's count odd), with `pending` raw posted
        /// writes in the ring.
        ResumeRegion { regs: Vec<[u32; 2]>, torn: bool, pending: Vec<[u64; 2]> },
        /// RETURN_FDS (docs/protocol.md 10.11; HOLD_FDS is negotiated with RESUME when the
        /// channel is too): the host record under key 0, what else was held, and memfds
        /// under the `extra` keys.
        ReturnFds { record: Option<RecordSrc>, extra: Vec<u16> },
    }
}

fuzz_struct! {
    /// A session.
    pub struct Input {
        msgs: Vec<Msg>,
    }
}

/// The host double, shared between the harness and the session.
#[derive(Debug, Clone)]
pub struct Shared(pub Arc<Mutex<HostDouble>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HostDouble> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A double with [`HOST_DEVICES`] and a nesting-parent S2 HWPT; returns it and the HWPT.
    pub fn new() -> (Self, ObjectId) {
        let mut d = HostDouble::new(NESTING_HW);
        for (i, dev) in HOST_DEVICES.iter().enumerate() {
            d.add_device(*dev, 0x500 + i as u32, None)
                .expect("host device");
        }
        let s2 = d.alloc_s2_hwpt(0).expect("S2 HWPT");
        (Self(Arc::new(Mutex::new(d))), s2)
    }
}

impl HostIommu for Shared {
    fn hw_info(&mut self, dev_id: u32) -> Result<HwInfo, HostError> {
        self.lock().hw_info(dev_id)
    }
    fn alloc_viommu(&mut self, dev_id: u32, s2: ObjectId) -> Result<ObjectId, HostError> {
        self.lock().alloc_viommu(dev_id, s2)
    }
    fn alloc_vdevice(&mut self, v: ObjectId, dev: u32, vsid: u64) -> Result<ObjectId, HostError> {
        self.lock().alloc_vdevice(v, dev, vsid)
    }
    fn alloc_nested_hwpt(
        &mut self,
        v: ObjectId,
        dev: u32,
        ste: VSte,
    ) -> Result<ObjectId, HostError> {
        self.lock().alloc_nested_hwpt(v, dev, ste)
    }
    fn attach(&mut self, dev: &HostDevice, pt: ObjectId) -> Result<(), HostError> {
        self.lock().attach(dev, pt)
    }
    fn invalidate(&mut self, v: ObjectId, cmds: &[RawCmd]) -> Result<(), InvalidateError> {
        self.lock().invalidate(v, cmds)
    }
    fn alloc_veventq(&mut self, v: ObjectId, depth: u32) -> Result<(ObjectId, OwnedFd), HostError> {
        self.lock().alloc_veventq(v, depth)
    }
    fn read_vevents(
        &mut self,
        q: ObjectId,
        fd: std::os::fd::BorrowedFd<'_>,
        out: &mut Vec<VEvent>,
    ) -> Result<usize, HostError> {
        self.lock().read_vevents(q, fd, out)
    }
    fn destroy(&mut self, id: ObjectId) -> Result<(), HostError> {
        self.lock().destroy(id)
    }
}

/// What the mock frontend knows: where each attached device is now.
#[derive(Debug, Default)]
pub struct FrontState {
    /// handle -> SID.
    pub devices: BTreeMap<u32, u32>,
    /// Answer every n-th request with an error (0: never).
    pub fail_every: u8,
    /// Requests answered.
    pub answered: u64,
    /// Descriptors held for the backend (HOLD_FDS), by key.
    pub held: BTreeMap<u32, OwnedFd>,
}

type Job = (UnixStream, Arc<Mutex<FrontState>>, Sender<()>);

/// The one thread that plays the frontend's end of every backend channel, one channel at a
/// time (a session's channel ends when the session is dropped).
fn responder() -> &'static Mutex<Sender<Job>> {
    static TX: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        std::thread::spawn(move || {
            for (stream, state, done) in rx {
                serve(FrontendChannel::new(stream), &state);
                let _ = done.send(());
            }
        });
        Mutex::new(tx)
    })
}

fn serve(chan: FrontendChannel, state: &Mutex<FrontState>) {
    loop {
        let Incoming { request, token } = match chan.recv() {
            Ok(incoming) => incoming,
            Err(e) => {
                if let Some(token) = e.reply_token() {
                    let _ = chan.reply_error(token, &ErrorReply::new(e.reply_status(), "bad"));
                    continue;
                }
                return;
            }
        };
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.answered += 1;
        let fail = st.fail_every != 0 && st.answered.is_multiple_of(u64::from(st.fail_every));
        let reply = if fail {
            Err(ErrorReply::new(
                Status::INTERNAL,
                "the mock frontend refuses",
            ))
        } else {
            Ok(match request {
                BackendRequest::ResolveSid { sid } => BackendReply::ResolveSid(
                    st.devices.iter().find(|(_, s)| **s == sid).map(|(h, _)| *h),
                ),
                BackendRequest::GetDeviceSids => BackendReply::DeviceSids(
                    st.devices
                        .iter()
                        .map(|(&handle, &sid)| DeviceSid { handle, sid })
                        .collect(),
                ),
                BackendRequest::HoldFds(held) => {
                    st.held.extend(held.fds);
                    BackendReply::Ack
                }
                BackendRequest::ReleaseFds(keys) => {
                    for key in keys {
                        st.held.remove(&key);
                    }
                    BackendReply::Ack
                }
                _ => BackendReply::Ack,
            })
        };
        drop(st);
        if chan.reply(token, reply).is_err() {
            return;
        }
    }
}

/// One input's run: the session, its descriptors and what the frontend knows.
pub struct Harness {
    session: Session,
    _peer: UnixStream,
    memfds: Vec<OwnedFd>,
    table: Vec<(usize, MemRegion)>,
    front: Arc<Mutex<FrontState>>,
    served: Vec<Receiver<()>>,
    host: Shared,
    s2_hwpt: ObjectId,
    last_state: Vec<u8>,
    features: viommu_smmuv3::Capabilities,
    /// A second mapping of the shared region, to write into it as a hostile frontend would.
    shared: Option<vm_memory::mmap::MmapRegion<()>>,
    /// The features the last accepted SET_FEATURES took.
    negotiated: Features,
    /// The session ended (a broken shared ring): later messages are not sent.
    ended: bool,
    /// Requests the protocol could not carry (skipped).
    pub undecodable: u64,
    /// Print every request and its result (for looking at an input by hand).
    pub trace: bool,
}

fn memfd(size: u64) -> OwnedFd {
    let fd = memfd_create("fuzz-ram", MemfdFlags::CLOEXEC).expect("memfd_create");
    ftruncate(&fd, size).expect("ftruncate");
    fd
}

/// Writes raw entries into a region's ring at its `write_prod` (offset in bits 31:0 of the
/// first word, size in bits 39:32, the value in the second; at most 300), then moves
/// `write_prod` by their number plus `extra`.
fn write_ring(map: &vm_memory::mmap::MmapRegion<()>, entries: &[[u64; 2]], extra: u16) {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use vm_memory::VolatileMemory;
    let u32_at = |off: usize| map.get_atomic_ref::<AtomicU32>(off).expect("region field");
    let prod = u32_at(0x40);
    let mut at = prod.load(Ordering::Relaxed);
    for &[word, value] in entries.iter().take(300) {
        let entry = 0x1000 + (at % 256) as usize * 16;
        u32_at(entry).store(word as u32, Ordering::Relaxed);
        u32_at(entry + 4).store((word >> 32) as u8 as u32, Ordering::Relaxed);
        map.get_atomic_ref::<AtomicU64>(entry + 8)
            .expect("ring entry")
            .store(value, Ordering::Relaxed);
        at = at.wrapping_add(1);
    }
    prod.store(at.wrapping_add(u32::from(extra)), Ordering::Release);
}

/// The backend serves the region as after a kick; a broken region ends the session
/// (`ended`). Returns whether the session goes on.
fn serve_region(session: &mut Session, trace: bool, ended: &mut bool, what: &str) -> bool {
    if let Err(e) = session.drain_posted() {
        if trace {
            eprintln!("{what}: the session ends: {e}");
        }
        *ended = true;
    }
    !*ended
}

fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).expect("eventfd")
}

impl Harness {
    /// A fresh session.
    pub fn new() -> Self {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        let (host, s2_hwpt) = Shared::new();
        let factory_host = host.clone();
        let options = SessionOptions {
            host: Arc::new(move |_fd| Ok(Box::new(factory_host.clone()) as Box<dyn HostIommu>)),
            ..SessionOptions::default()
        };
        Self {
            session: Session::with_options(ours, options),
            _peer: peer,
            memfds: MEMFD_SIZES.iter().map(|&s| memfd(s)).collect(),
            table: Vec::new(),
            front: Arc::new(Mutex::new(FrontState::default())),
            served: Vec::new(),
            host,
            s2_hwpt,
            last_state: Vec::new(),
            features: viommu_smmuv3::Capabilities::qemu_default(),
            shared: None,
            negotiated: Features::empty(),
            ended: false,
            undecodable: 0,
            trace: std::env::var_os("VIOMMU_FUZZ_TRACE").is_some(),
        }
    }

    /// Sends a request the way it would cross the socket: encoded, decoded (with duplicated
    /// descriptors), handled. Checks that a successful reply is the kind the request takes
    /// and survives the codec too.
    pub fn send(&mut self, req: FrontendRequest) -> Option<Result<FrontendReply, ErrorReply>> {
        let code = req.code();
        let enc = req.encode();
        let fds: Vec<OwnedFd> = enc
            .fds
            .iter()
            .map(|f| f.try_clone_to_owned().expect("dup"))
            .collect();
        let Ok(decoded) = FrontendRequest::decode(code, &enc.payload, fds) else {
            self.undecodable += 1;
            if self.trace {
                eprintln!("{}: not decodable", req.name());
            }
            return None;
        };
        let name = req.name();
        drop(enc);
        drop(req);
        let result = self.session.handle_request(decoded);
        if self.trace {
            eprintln!("{name}: {result:?}");
        }
        match &result {
            Ok(reply) => {
                assert!(reply.answers(code), "{reply:?} answers request {code}");
                let enc = reply.encode();
                let fds = enc
                    .fds
                    .iter()
                    .map(|f| f.try_clone_to_owned().expect("dup"))
                    .collect();
                FrontendReply::decode(code, &enc.payload, fds)
                    .expect("the session's reply does not decode");
            }
            Err(e) => {
                assert_ne!(e.status, Status::OK, "an error reply with status OK");
                assert!(e.message.len() <= 1024);
            }
        }
        Some(result)
    }

    fn mmio_read(&mut self, off: u64, size: u32) -> u64 {
        let access = MmioAccess {
            offset: off,
            size: if size == 8 {
                AccessSize::Qword
            } else {
                AccessSize::Dword
            },
        };
        match self.send(FrontendRequest::MmioRead(access)) {
            Some(Ok(FrontendReply::MmioValue(v))) => v,
            _ => 0,
        }
    }

    fn mmio_write(&mut self, off: u64, size: u32, value: u64) {
        let access = MmioAccess {
            offset: off,
            size: if size == 8 {
                AccessSize::Qword
            } else {
                AccessSize::Dword
            },
        };
        let value = if size == 4 {
            value & 0xffff_ffff
        } else {
            value
        };
        self.send(FrontendRequest::MmioWrite { access, value });
    }

    /// The guest's view of RAM: the accepted memory table, mapped again.
    fn view(&self) -> Option<GuestMemoryMmap<()>> {
        let mut regions = Vec::new();
        for (slot, r) in &self.table {
            let fd = self.memfds[*slot].try_clone().ok()?;
            regions.push(viommu_backend::session::guest_memory::map_region(r, fd).ok()?);
        }
        GuestMemoryMmap::from_arc_regions(regions).ok()
    }

    fn region_fd(&self, slot: usize) -> OwnedFd {
        self.memfds[slot].try_clone().expect("dup")
    }

    /// Runs one step.
    pub fn step(&mut self, msg: &Msg) {
        if self.ended {
            return;
        }
        match msg {
            Msg::GetFeatures => {
                self.send(FrontendRequest::GetFeatures);
            }
            Msg::SetFeatures { bits } => {
                let mut f = Features::from_bits_truncate(u64::from(*bits));
                // Bit 8 does not fit the u8: RESUME comes with SHARED_TRANSLATE.
                if f.contains(Features::SHARED_TRANSLATE) {
                    f |= Features::RESUME;
                    if f.contains(Features::BACKEND_CHANNEL) {
                        f |= Features::HOLD_FDS;
                    }
                }
                if let Some(Ok(_)) = self.send(FrontendRequest::SetFeatures(f)) {
                    self.negotiated = f;
                }
            }
            Msg::SetConfig { model, idr_auto } => {
                let mut cfg = model.config();
                if *idr_auto {
                    cfg.flags = ConfigFlags::IDR_AUTO
                        | ConfigFlags::STAGE1
                        | (cfg.flags & ConfigFlags::MSI);
                    cfg.oas_bits = 0;
                    cfg.ssid_bits = 0;
                }
                if let Some(Ok(_)) = self.send(FrontendRequest::SetConfig(cfg)) {
                    self.features = viommu_backend::session::model_config::capabilities(&cfg);
                }
            }
            Msg::GetIdRegs => {
                self.send(FrontendRequest::GetIdRegs);
            }
            Msg::SetBackendChannel { mode } => {
                let (ours, theirs) = UnixStream::pair().expect("socketpair");
                let (done_tx, done_rx) = channel();
                let answered = match mode {
                    ChannelMode::Answered { fail_every } => {
                        self.front
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .fail_every = *fail_every;
                        true
                    }
                    ChannelMode::Closed => false,
                };
                let accepted = matches!(
                    self.send(FrontendRequest::SetBackendChannel(ours)),
                    Some(Ok(_))
                );
                if answered && accepted {
                    responder()
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .send((theirs, self.front.clone(), done_tx))
                        .expect("responder thread");
                    self.served.push(done_rx);
                }
            }
            Msg::SetMemTable { regions } => {
                let table: Vec<(usize, MemRegion)> =
                    regions.iter().take(9).map(GpaSel::region).collect();
                let req = table
                    .iter()
                    .map(|(s, r)| (*r, self.region_fd(*s)))
                    .collect();
                if let Some(Ok(_)) = self.send(FrontendRequest::SetMemTable(req)) {
                    self.table = table;
                }
            }
            Msg::GetMaxMemSlots => {
                self.send(FrontendRequest::GetMaxMemSlots);
            }
            Msg::AddMemReg { region } => {
                let (slot, r) = region.region();
                let fd = self.region_fd(slot);
                if let Some(Ok(_)) = self.send(FrontendRequest::AddMemReg(r, fd)) {
                    self.table.push((slot, r));
                }
            }
            Msg::RemMemReg { region } => {
                let (slot, r) = region.region();
                if let Some(Ok(_)) = self.send(FrontendRequest::RemMemReg(r)) {
                    self.table
                        .retain(|(s, t)| !(*s == slot && t.gpa == r.gpa && t.size == r.size));
                }
            }
            Msg::SetIrqFd { index, fd } => {
                let index = IrqIndex::ALL[usize::from(*index) % 4];
                let fd = fd.map(|k| crate::fds::make_fd(k).fd);
                self.send(FrontendRequest::SetIrqFd { index, fd });
            }
            Msg::MmioRead { reg } => {
                let (off, size) = reg.offset();
                self.mmio_read(off, size);
            }
            Msg::MmioReadRaw { offset, wide } => {
                let size = if *wide { 8 } else { 4 };
                self.mmio_read((u64::from(*offset) % 0x2_0000) & !u64::from(size - 1), size);
            }
            Msg::MmioWrite { reg, value } => {
                let (off, size) = reg.offset();
                self.mmio_write(off, size, *value);
            }
            Msg::MmioWriteRaw {
                offset,
                wide,
                value,
            } => {
                let size = if *wide { 8 } else { 4 };
                let off = (u64::from(*offset) % 0x2_0000) & !u64::from(size - 1);
                self.mmio_write(off, size, *value);
            }
            Msg::SetIommufd => {
                self.send(FrontendRequest::SetIommufd(eventfd()));
            }
            Msg::Attach {
                handle,
                sid,
                passthrough,
            } => {
                let handle = u32::from(*handle % 8);
                let passthrough = passthrough.map(|[dev, hwpt]| Passthrough {
                    ids: PassthroughIds {
                        devid: HOST_DEVICES
                            .get(usize::from(dev % 3))
                            .copied()
                            .unwrap_or(u32::from(dev)),
                        s2_hwpt_id: if hwpt == 0 {
                            self.s2_hwpt
                        } else {
                            u32::from(hwpt)
                        },
                    },
                    cdev: eventfd(),
                });
                let req = FrontendRequest::AttachDevice(AttachDevice {
                    handle,
                    sid: *sid,
                    passthrough,
                });
                // The frontend knows the device before the backend's announcements.
                let before = self.front_lock().devices.insert(handle, *sid);
                if !matches!(self.send(req), Some(Ok(_))) {
                    let mut front = self.front_lock();
                    match before {
                        Some(old) => front.devices.insert(handle, old),
                        None => front.devices.remove(&handle),
                    };
                }
            }
            Msg::Detach { handle } => {
                let handle = u32::from(*handle % 8);
                if let Some(Ok(_)) = self.send(FrontendRequest::DetachDevice { handle }) {
                    self.front_lock().devices.remove(&handle);
                }
            }
            Msg::Translate {
                sid,
                ssid,
                iova,
                access,
            } => {
                self.send(FrontendRequest::Translate(TranslateRequest {
                    sid: *sid,
                    ssid: ssid.map(|s| s & 0xf_ffff),
                    iova: *iova,
                    access: Access::from_bits_truncate(u32::from(*access)),
                }));
            }
            Msg::Reset => {
                self.send(FrontendRequest::Reset);
            }
            Msg::GetState => {
                if let Some(Ok(FrontendReply::State(blob))) = self.send(FrontendRequest::GetState) {
                    let mut buf = vec![0u8; usize::try_from(blob.size).unwrap_or(0)];
                    let n = rustix::io::pread(blob.fd.as_fd(), &mut buf, 0).unwrap_or(0);
                    buf.truncate(n);
                    self.last_state = buf;
                }
            }
            Msg::SetState { src } => {
                let bytes = match src {
                    StateSrc::Last { edits, cut } => {
                        let mut b = self.last_state.clone();
                        for [pos, val] in edits.iter().take(16) {
                            if !b.is_empty() {
                                let i = usize::from(*pos) % b.len();
                                b[i] = *val as u8;
                            }
                        }
                        let keep = b.len().saturating_sub(usize::from(*cut % 4));
                        b.truncate(keep);
                        b
                    }
                    StateSrc::Raw { bytes } => bytes.clone(),
                };
                let fd = memfd(0);
                let _ = rustix::io::pwrite(&fd, &bytes, 0);
                self.send(FrontendRequest::SetState(StateBlob {
                    size: bytes.len() as u64,
                    fd,
                }));
            }
            Msg::Guest { world } => {
                // The builders allocate from the world's layout: RAM0 must be there.
                let Some(view) = self.view().filter(|v| {
                    v.check_range(
                        GuestAddress(0),
                        crate::world::RAM0.1 as usize,
                        vm_memory::Permissions::ReadWrite,
                    )
                }) else {
                    return;
                };
                let mut spec = world.clone();
                spec.model = sel_of(&self.features);
                let mut w = World::build_in(view, &spec);
                for (off, size, value) in w.register_writes() {
                    self.mmio_write(off, size, value);
                }
            }
            Msg::Mem { addr, words } => {
                let Some(view) = self.view() else {
                    return;
                };
                let mut a = addr.resolve();
                for word in words.iter().take(64) {
                    let _ = view.write_obj(*word, GuestAddress(a));
                    a = a.wrapping_add(8);
                }
            }
            Msg::Cmds { cmds } => {
                let Some(view) = self.view() else {
                    return;
                };
                let base = self.mmio_read(offset::CMDQ_BASE, 8);
                let mut prod = self.mmio_read(offset::CMDQ_PROD, 4) as u32;
                let log2 = (base & 0x1f).min(u64::from(self.features.cmdqs)) as u32;
                let addr = base & 0x000f_ffff_ffff_ffe0 & !((16u64 << log2) - 1).max(31);
                let mask = (2u32 << log2) - 1;
                for cmd in cmds.iter().take(64) {
                    let idx = u64::from(prod & ((1 << log2) - 1));
                    let [d0, d1] = cmd.words();
                    let _ = view.write_obj(d0, GuestAddress(addr + idx * 16));
                    let _ = view.write_obj(d1, GuestAddress(addr + idx * 16 + 8));
                    prod = (prod & !mask) | (prod.wrapping_add(1) & mask);
                }
                self.mmio_write(offset::CMDQ_PROD, 4, u64::from(prod));
            }
            Msg::ConsumeEvents => {
                let prod = self.mmio_read(offset::EVENTQ_PROD, 4);
                self.mmio_write(offset::EVENTQ_CONS, 4, prod & 0x800f_ffff);
            }
            Msg::Renumber { handle, sid } => {
                let handle = u32::from(*handle % 8);
                if let Some(s) = self.front_lock().devices.get_mut(&handle) {
                    *s = *sid;
                }
            }
            Msg::HostEvent { device, record } => {
                let dev = HOST_DEVICES[usize::from(*device) % HOST_DEVICES.len()];
                let _ = self.host.lock().inject_event(dev, *record);
                let _ = self.session.handle_host_events();
            }
            Msg::SetSharedRegion => {
                let region = viommu_protocol::shared::Region::create().expect("shared region");
                let fd = region.fd().try_clone_to_owned().expect("dup");
                let file = std::fs::File::from(fd);
                let map = vm_memory::mmap::MmapRegion::from_file(
                    vm_memory::FileOffset::new(file, 0),
                    viommu_protocol::shared::REGION_SIZE,
                )
                .ok();
                let fd = region.fd().try_clone_to_owned().expect("dup");
                let call = self
                    .negotiated
                    .contains(Features::SHARED_TRANSLATE)
                    .then(eventfd);
                // The region the backend took, if it took this one.
                if let Some(Ok(_)) = self.send(FrontendRequest::SetSharedRegion {
                    region: fd,
                    kick: eventfd(),
                    call,
                    resume: false,
                }) {
                    self.shared = map;
                }
            }
            Msg::Posted { entries, extra } => self.post_raw(entries, *extra),
            Msg::RegionTranslate {
                sid,
                ssid,
                iova,
                flags,
                reserved,
            } => self.translate_raw([*sid, *ssid, *flags, *reserved], *iova),
            Msg::ResumeRegion {
                regs,
                torn,
                pending,
            } => self.resume_raw(regs, *torn, pending),
            Msg::ReturnFds { record, extra } => self.return_fds(record.as_ref(), extra),
            Msg::UpdateDevice { handle, sid, flags } => {
                self.send(FrontendRequest::UpdateDevice {
                    handle: u32::from(*handle % 8),
                    sid: *sid,
                    flags: viommu_protocol::types::DeviceFlags::from_bits_truncate(u32::from(
                        *flags,
                    )),
                });
            }
        }
    }

    /// Writes raw entries into the shared ring and lets the backend apply them. A broken ring
    /// ends the session (as the daemon would drop it); nothing else may go wrong.
    fn post_raw(&mut self, entries: &[[u64; 2]], extra: u16) {
        let Some(map) = self.shared.as_ref() else {
            return;
        };
        write_ring(map, entries, extra);
        serve_region(
            &mut self.session,
            self.trace,
            &mut self.ended,
            "posted writes",
        );
    }

    /// A region as a backend that died would leave it, with hostile contents, resumed with
    /// SET_SHARED_REGION RESUME; then its ring is applied as after a kick.
    fn resume_raw(&mut self, regs: &[[u32; 2]], torn: bool, pending: &[[u64; 2]]) {
        use std::sync::atomic::{AtomicU32, Ordering};
        use vm_memory::VolatileMemory;
        let region = viommu_protocol::shared::Region::create().expect("shared region");
        let file = std::fs::File::from(region.fd().try_clone_to_owned().expect("dup"));
        let Ok(map) = vm_memory::mmap::MmapRegion::<()>::from_file(
            vm_memory::FileOffset::new(file, 0),
            viommu_protocol::shared::REGION_SIZE,
        ) else {
            return;
        };
        let u32_at = |off: usize| map.get_atomic_ref::<AtomicU32>(off).expect("region field");
        // This session's ID registers (when it has a vSMMU), so that the restore gets past
        // the ID check, then the raw values.
        let mut file = [0u32; viommu_protocol::shared::MIRROR_SLOTS];
        if let Some(id) = self.session.id_registers() {
            file[..8].copy_from_slice(&id);
        }
        for &[slot, value] in regs.iter().take(64) {
            if let Some(v) = usize::try_from(slot).ok().and_then(|s| file.get_mut(s)) {
                *v = value;
            }
        }
        let (copy, mirror) = (0x500usize, |slot: usize| {
            if slot < 128 {
                0x100 + 4 * slot
            } else {
                0x300 + 4 * (slot - 128)
            }
        });
        for (slot, &value) in file.iter().enumerate() {
            u32_at(mirror(slot)).store(value, Ordering::Relaxed);
            if !torn {
                u32_at(copy + 4 * slot).store(value, Ordering::Relaxed);
            }
        }
        u32_at(0x480).store(if torn { 3 } else { 2 }, Ordering::Release);
        write_ring(&map, pending, 0);
        let call = self
            .negotiated
            .contains(Features::SHARED_TRANSLATE)
            .then(eventfd);
        if let Some(Ok(_)) = self.send(FrontendRequest::SetSharedRegion {
            region: region.fd().try_clone_to_owned().expect("dup"),
            kick: eventfd(),
            call,
            resume: true,
        }) {
            self.shared = Some(map);
            serve_region(
                &mut self.session,
                self.trace,
                &mut self.ended,
                "resumed ring",
            );
        }
    }

    /// RETURN_FDS of the held descriptors (key 0 replaced as `record` says), and memfds under
    /// the `extra` keys, in messages of up to 8.
    fn return_fds(&mut self, record: Option<&RecordSrc>, extra: &[u16]) {
        let mut fds: BTreeMap<u32, OwnedFd> = {
            let st = self.front.lock().unwrap_or_else(|e| e.into_inner());
            st.held
                .iter()
                .filter_map(|(&k, fd)| fd.try_clone().ok().map(|fd| (k, fd)))
                .collect()
        };
        match record {
            Some(RecordSrc::Held { edits }) => {
                if let Some(fd) = fds.get(&0) {
                    for &[offset, byte] in edits.iter().take(32) {
                        let at = u64::from(offset) % (0x4_0000 + 16);
                        let _ = rustix::io::pwrite(fd, &[byte as u8], at);
                    }
                }
            }
            Some(RecordSrc::Raw {
                bytes,
                generation,
                in_hand,
            }) => {
                let fd = memfd_create("record", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
                    .expect("memfd");
                let _ = ftruncate(&fd, 0x4_0000);
                let _ = rustix::fs::fcntl_add_seals(
                    &fd,
                    rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW,
                );
                let mut head = Vec::new();
                head.extend(0x4345_524d_4d4f_4956u64.to_le_bytes());
                head.extend(1u32.to_le_bytes());
                head.extend(0x4_0000u32.to_le_bytes());
                head.extend(u32::from(*generation).to_le_bytes());
                head.extend(u32::from(*in_hand).to_le_bytes());
                let _ = rustix::io::pwrite(&fd, &head, 0);
                let slot = if generation & 1 == 0 {
                    0x1000
                } else {
                    0x2_0000
                };
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                let _ = rustix::io::pwrite(&fd, &len.to_le_bytes(), slot);
                let _ = rustix::io::pwrite(&fd, bytes, slot + 4);
                fds.insert(0, fd);
            }
            None => {}
        }
        for &key in extra.iter().take(16) {
            fds.insert(
                u32::from(key),
                memfd_create("extra", MemfdFlags::CLOEXEC).expect("memfd"),
            );
        }
        let all: Vec<(u32, OwnedFd)> = fds.into_iter().collect();
        let mut it = all.into_iter().peekable();
        while it.peek().is_some() {
            let chunk: Vec<(u32, OwnedFd)> = it.by_ref().take(8).collect();
            self.send(FrontendRequest::ReturnFds(viommu_protocol::HeldFds {
                fds: chunk,
            }));
        }
    }

    /// Writes a raw translation request into the shared region and lets the backend answer
    /// it; the answer must be well-formed whatever the request (10.9).
    fn translate_raw(&mut self, [sid, ssid, flags, reserved]: [u32; 4], iova: u64) {
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        use vm_memory::VolatileMemory;
        let Some(map) = self.shared.as_ref() else {
            return;
        };
        let u32_at = |off: usize| map.get_atomic_ref::<AtomicU32>(off).expect("xlate_req");
        u32_at(0x408).store(sid, Ordering::Relaxed);
        u32_at(0x40c).store(ssid, Ordering::Relaxed);
        map.get_atomic_ref::<AtomicU64>(0x410)
            .expect("xlate_req")
            .store(iova, Ordering::Relaxed);
        u32_at(0x418).store(flags, Ordering::Relaxed);
        u32_at(0x41c).store(reserved, Ordering::Relaxed);
        let seq = u32_at(0x400).load(Ordering::Relaxed).wrapping_add(1);
        u32_at(0x400).store(seq, Ordering::Release);
        let trace = self.trace;
        if !serve_region(
            &mut self.session,
            trace,
            &mut self.ended,
            "translation request",
        ) {
            return;
        }
        let answered = u32_at(0x440).load(Ordering::Acquire);
        let status = u32_at(0x444).load(Ordering::Relaxed);
        let result = u32_at(0x45c).load(Ordering::Relaxed);
        // Without SHARED_TRANSLATE the backend does not look; with it, every request is
        // answered, with a status of section 2.7 and a result of 0 or 1.
        if self.negotiated.contains(Features::SHARED_TRANSLATE) {
            assert_eq!(answered, seq, "request {seq} unanswered");
            assert!(status <= 11, "answer status {status}");
            assert!(status != 0 || result <= 1, "answer result {result}");
        }
        if self.trace {
            eprintln!(
                "translation request {seq}: answered {answered}, status {status}, result {result}"
            );
        }
    }

    fn front_lock(&self) -> MutexGuard<'_, FrontState> {
        self.front.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the session and waits until the mock frontend has let go of its channels.
    pub fn finish(self) {
        let Harness {
            session, served, ..
        } = self;
        let _ = session.status_line();
        drop(session);
        for done in served {
            let _ = done.recv();
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// The model selection that gives `f` (for worlds built for a configured session).
fn sel_of(f: &viommu_smmuv3::Capabilities) -> ModelSel {
    let oas = crate::world::OAS
        .iter()
        .position(|&o| o == f.oas_bits)
        .unwrap_or(4) as u8;
    ModelSel {
        stage1: f.s1p,
        stage2: f.s2p,
        ril: f.ril,
        ats: f.ats,
        msi: f.msi,
        oas,
        sid_bits: f.sid_bits.saturating_sub(1),
        ssid_bits: f.ssid_bits,
        cmdq_log2: f.cmdqs.saturating_sub(1),
        evtq_log2: f.eventqs.saturating_sub(1),
    }
}
