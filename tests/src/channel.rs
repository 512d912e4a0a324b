//! The frontend's end of the backend channel: what QEMU does with SET_ADDRESS_SPACE,
//! IOTLB_INVALIDATE, RESOLVE_SID, MSI_WRITE, HOLD_FDS and RELEASE_FDS, served on a thread of
//! its own (the backend sends these while the main channel waits for a reply).

use std::collections::BTreeMap;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use anyhow::Context;
use viommu_protocol::{
    AddressSpace, BackendReply, BackendRequest, DeviceSid, Error, ErrorReply, FrontendChannel,
    IotlbInvalidate, MAX_HELD_FDS, Perm, Status,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One translation the frontend cached from a TRANSLATE reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedTranslation {
    /// The stream ID the translation was made for: it serves the device only while it is
    /// still at that SID (the guest may renumber its buses).
    pub sid: u32,
    /// Last input address covered.
    pub last: u64,
    /// Output address of the first input address covered.
    pub addr: u64,
    /// What the mapping allows.
    pub perm: Perm,
}

/// The frontend's translation cache, as QEMU's IOMMU memory region users keep one: keyed by
/// device handle and substream, then by the first input address of each translation.
#[derive(Debug, Default)]
pub struct TranslationCache {
    entries: BTreeMap<(u32, Option<u32>), BTreeMap<u64, CachedTranslation>>,
}

impl TranslationCache {
    /// The cached translation covering `iova`, if any.
    pub fn lookup(
        &self,
        handle: u32,
        ssid: Option<u32>,
        iova: u64,
    ) -> Option<(u64, CachedTranslation)> {
        let map = self.entries.get(&(handle, ssid))?;
        let (&start, entry) = map.range(..=iova).next_back()?;
        (iova <= entry.last).then_some((start, *entry))
    }

    /// Caches a translation of `[start, start + mask]`.
    pub fn insert(&mut self, handle: u32, ssid: Option<u32>, start: u64, entry: CachedTranslation) {
        self.entries
            .entry((handle, ssid))
            .or_default()
            .insert(start, entry);
    }

    /// Drops what an IOTLB_INVALIDATE covers. Returns how many translations went.
    pub fn invalidate(&mut self, inv: &IotlbInvalidate) -> usize {
        let mut removed = 0usize;
        for (&(handle, ssid), map) in self.entries.iter_mut() {
            if inv.handle.is_some_and(|h| h != handle) || (inv.ssid.is_some() && inv.ssid != ssid) {
                continue;
            }
            let before = map.len();
            map.retain(|&start, e| e.last < inv.start || start > inv.last);
            removed = removed.saturating_add(before.saturating_sub(map.len()));
        }
        self.entries.retain(|_, map| !map.is_empty());
        removed
    }

    /// Number of cached translations.
    pub fn len(&self) -> usize {
        self.entries.values().map(BTreeMap::len).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A backend-channel message as the frontend handled it, for traces and assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification {
    /// SET_ADDRESS_SPACE.
    AddressSpace {
        /// The device.
        handle: u32,
        /// Its new address space.
        space: AddressSpace,
        /// The stream ID the backend decided for.
        sid: u32,
    },
    /// GET_DEVICE_SIDS, with the number of devices listed in the answer.
    DeviceSids {
        /// Devices listed.
        count: usize,
    },
    /// IOTLB_INVALIDATE, with the number of cached translations it removed.
    Invalidate {
        /// The message.
        inv: IotlbInvalidate,
        /// Cached translations dropped.
        dropped: usize,
    },
    /// RESOLVE_SID and the answer.
    ResolveSid {
        /// The stream ID asked about.
        sid: u32,
        /// The device found there.
        handle: Option<u32>,
    },
    /// A descriptor held under a key (one per key of a HOLD_FDS).
    Hold {
        /// The key.
        key: u32,
    },
    /// A key released (one per key of a RELEASE_FDS).
    Release {
        /// The key.
        key: u32,
    },
    /// MSI_WRITE, and whether it landed in guest RAM.
    MsiWrite {
        /// Doorbell address.
        address: u64,
        /// Payload.
        data: u32,
        /// Whether the address was guest RAM (otherwise it is an interrupt controller
        /// doorbell, which the mock only records).
        in_ram: bool,
    },
}

/// What the frontend knows from the backend channel.
#[derive(Debug, Default)]
pub struct ChannelState {
    /// Each device's address space as last announced.
    pub spaces: BTreeMap<u32, AddressSpace>,
    /// The stream ID each device's address space was announced for: SYSTEM holds only while
    /// the device is still there.
    pub space_sids: BTreeMap<u32, u32>,
    /// Which device is at which stream ID (the answer to RESOLVE_SID).
    pub sids: BTreeMap<u32, u32>,
    /// Cached translations.
    pub cache: TranslationCache,
    /// Every message handled, in order.
    pub log: Vec<Notification>,
    /// Descriptors held for the backend (HOLD_FDS), by key: kept when the backend dies, for
    /// the next one's resume (docs/protocol.md 10.11).
    pub held: BTreeMap<u32, OwnedFd>,
}

/// IOTLB_INVALIDATE messages in `log`.
pub fn invalidations(log: &[Notification]) -> usize {
    log.iter()
        .filter(|n| matches!(n, Notification::Invalidate { .. }))
        .count()
}

/// GET_DEVICE_SIDS questions in `log`.
pub fn sid_questions(log: &[Notification]) -> usize {
    log.iter()
        .filter(|n| matches!(n, Notification::DeviceSids { .. }))
        .count()
}

/// The serving thread and the state it shares.
#[derive(Debug)]
pub struct ChannelServer {
    state: Arc<Mutex<ChannelState>>,
    stream: UnixStream,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl ChannelServer {
    /// Serves `stream` (the frontend's end) on a new thread; MSI writes to guest RAM go to `mem`.
    pub fn spawn(
        stream: UnixStream,
        mem: GuestMemoryMmap<()>,
        state: Arc<Mutex<ChannelState>>,
    ) -> anyhow::Result<Self> {
        let ours = stream.try_clone().context("cloning the backend channel")?;
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("backend-channel".into())
            .spawn(move || serve(&FrontendChannel::new(stream), &mem, &shared))
            .context("starting the backend-channel thread")?;
        Ok(Self {
            state,
            stream: ours,
            thread: Some(thread),
        })
    }

    /// The shared state, locked.
    pub fn state(&self) -> MutexGuard<'_, ChannelState> {
        lock(&self.state)
    }

    /// Stops serving and returns how the thread ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let _ = self.stream.shutdown(Shutdown::Both);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(e).context("backend channel failed"),
            Some(Err(_)) => anyhow::bail!("the backend-channel thread panicked"),
        }
    }
}

impl Drop for ChannelServer {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Locks the state, recovering it from a panicked holder (the data stays consistent: every
/// update is a single insert or remove).
pub fn lock(state: &Mutex<ChannelState>) -> MutexGuard<'_, ChannelState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn serve(
    channel: &FrontendChannel,
    mem: &GuestMemoryMmap<()>,
    state: &Mutex<ChannelState>,
) -> Result<(), Error> {
    loop {
        let incoming = match channel.recv() {
            Ok(incoming) => incoming,
            Err(Error::Disconnected) => return Ok(()),
            Err(e) => return Err(e),
        };
        let reply = handle(incoming.request, mem, &mut lock(state));
        channel.reply(incoming.token, reply)?;
    }
}

fn handle(
    request: BackendRequest,
    mem: &GuestMemoryMmap<()>,
    state: &mut ChannelState,
) -> Result<BackendReply, ErrorReply> {
    Ok(match request {
        BackendRequest::SetAddressSpace { handle, space, sid } => {
            state.spaces.insert(handle, space);
            state.space_sids.insert(handle, sid);
            state
                .log
                .push(Notification::AddressSpace { handle, space, sid });
            BackendReply::Ack
        }
        BackendRequest::GetDeviceSids => {
            let devices: Vec<DeviceSid> = state
                .sids
                .iter()
                .map(|(&sid, &handle)| DeviceSid { handle, sid })
                .collect();
            state.log.push(Notification::DeviceSids {
                count: devices.len(),
            });
            BackendReply::DeviceSids(devices)
        }
        BackendRequest::IotlbInvalidate(inv) => {
            let dropped = state.cache.invalidate(&inv);
            state.log.push(Notification::Invalidate { inv, dropped });
            BackendReply::Ack
        }
        BackendRequest::ResolveSid { sid } => {
            let handle = state.sids.get(&sid).copied();
            state.log.push(Notification::ResolveSid { sid, handle });
            BackendReply::ResolveSid(handle)
        }
        BackendRequest::MsiWrite(msi) => {
            // A 32-bit write to the system address space: guest RAM, or a doorbell.
            let in_ram = mem
                .write_obj(msi.data.to_le(), GuestAddress(msi.address))
                .is_ok();
            state.log.push(Notification::MsiWrite {
                address: msi.address,
                data: msi.data,
                in_ram,
            });
            BackendReply::Ack
        }
        BackendRequest::HoldFds(held) => {
            let new = held.keys().filter(|k| !state.held.contains_key(k)).count();
            let total = state.held.len().saturating_add(new);
            if total > MAX_HELD_FDS {
                // The message's descriptors are closed with it: none is held.
                return Err(ErrorReply::new(
                    Status::NO_SPACE,
                    format!("{total} descriptors, more than {MAX_HELD_FDS}"),
                ));
            }
            let keys: Vec<u32> = held.keys().collect();
            state
                .log
                .extend(keys.into_iter().map(|key| Notification::Hold { key }));
            // One held under the same key before is closed.
            state.held.extend(held.fds);
            BackendReply::Ack
        }
        BackendRequest::ReleaseFds(keys) => {
            for key in keys {
                state.held.remove(&key);
                state.log.push(Notification::Release { key });
            }
            BackendReply::Ack
        }
    })
}
