//! Surviving a frontend that shrinks guest RAM under the backend.
//!
//! Guest RAM is the frontend's file, mapped shared. A frontend can truncate that file at any
//! time (an unsealed memfd; hugetlbfs and disk files cannot be sealed at all), and the next
//! access to a page past the new end raises SIGBUS, which would kill the daemon and every
//! session it would serve after this one.
//!
//! [`install`] puts a SIGBUS handler in place. A fault at an address inside watched guest RAM
//! ([`Watch`]) replaces that whole region with anonymous zero pages (`MAP_FIXED`), so the
//! access that faulted completes, reading zeros, and marks the region lost. The session checks
//! [`Watch::lost`] after each message and ends itself with an error that names the region; the
//! daemon goes on to serve the next frontend. A SIGBUS anywhere else is handed to the
//! disposition that was in place before, so a genuine bug still ends the process.
//!
//! What the handler does is async-signal-safe: atomic loads and stores, and `mmap`, a system
//! call (which the sandbox allows when it does not ask for executable memory).

use std::io;
use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// How many guest RAM regions all live sessions together can have watched.
pub const MAX_WATCHED: usize = 1024;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const READY: u8 = 2;

/// One watched mapping. `state` guards the rest: the handler reads `start` and `len` only
/// after an acquire load of READY, and the owner writes them only while the slot is BUSY.
struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    lost: AtomicBool,
}

static SLOTS: [Slot; MAX_WATCHED] = [const {
    Slot {
        state: AtomicU8::new(FREE),
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        lost: AtomicBool::new(false),
    }
}; MAX_WATCHED];

/// The SIGBUS disposition before ours, for faults outside guest RAM.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();

/// Installs the SIGBUS handler once per process. The daemon calls it before it enters its
/// sandbox (which does not allow `rt_sigaction`); mapping guest RAM calls it too, for
/// programs that embed sessions.
pub fn install() -> io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| result = install_now());
    result
}

fn install_now() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (no handler, empty mask, no flags), and
    // is overwritten below before use.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
    // SA_ONSTACK: std gives every thread an alternate signal stack, so a fault on a thread
    // whose stack is nearly used up is still handled. SA_NODEFER is not set: a second SIGBUS
    // inside the handler would be a bug and waits.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa_mask` is a valid sigset_t owned by `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: an all-zero sigaction is a valid value, filled in by the kernel below.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; the handler is an `extern "C"` function
    // with the SA_SIGINFO signature, and it touches only async-signal-safe state.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = PREVIOUS.set(previous);
    Ok(())
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; for SIGBUS
    // `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS {
        if slot.state.load(Ordering::Acquire) != READY {
            continue;
        }
        let start = slot.start.load(Ordering::Relaxed);
        let len = slot.len.load(Ordering::Relaxed);
        if addr.checked_sub(start).is_none_or(|offset| offset >= len) {
            continue;
        }
        // SAFETY: [start, start + len) is guest RAM that this process mapped and still owns
        // (the slot is READY until its owner drops the mapping); replacing it with private
        // anonymous memory of the same size changes what it reads, not who owns it, and the
        // owner's munmap of the range stays valid.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            slot.lost.store(true, Ordering::Release);
            return;
        }
        break;
    }
    previous_disposition(signal, info, context);
}

/// Hands a SIGBUS that is not ours to what was there before: the previous handler, or the
/// default action (the process dies when the faulting access is retried).
fn previous_disposition(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let previous = PREVIOUS.get();
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: an all-zero sigaction is SIG_DFL with an empty mask; resetting SIGBUS to its
        // default is async-signal-safe.
        unsafe {
            let default: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
        }
        return;
    }
    let siginfo = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    if siginfo {
        // SAFETY: the previous disposition was installed with SA_SIGINFO, so its handler has
        // this signature; the arguments are the kernel's own.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(signal, info, context);
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(signal);
    }
}

/// Why guest RAM cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// Every slot is in use.
    #[error("more than {MAX_WATCHED} guest RAM mappings are watched in this process")]
    Full,
    /// The handler could not be installed.
    #[error("cannot install the SIGBUS handler")]
    Install(#[source] io::Error),
}

/// Mappings of one session's guest RAM, watched for lost pages while this lives.
#[derive(Debug, Default)]
pub struct Watch {
    slots: Vec<usize>,
}

impl Watch {
    /// Watches the mappings `[start, start + len)`.
    pub fn new(mappings: impl IntoIterator<Item = (usize, usize)>) -> Result<Self, WatchError> {
        install().map_err(WatchError::Install)?;
        let mut watch = Self::default();
        for (start, len) in mappings {
            let index = SLOTS
                .iter()
                .position(|s| {
                    s.state
                        .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                })
                .ok_or(WatchError::Full)?;
            let Some(slot) = SLOTS.get(index) else {
                return Err(WatchError::Full);
            };
            slot.start.store(start, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
            slot.lost.store(false, Ordering::Relaxed);
            slot.state.store(READY, Ordering::Release);
            watch.slots.push(index);
        }
        Ok(watch)
    }

    /// The first watched mapping whose pages were lost, as `(start, len)`.
    pub fn lost(&self) -> Option<(usize, usize)> {
        self.slots
            .iter()
            .filter_map(|&i| SLOTS.get(i))
            .find(|s| s.lost.load(Ordering::Acquire))
            .map(|s| {
                (
                    s.start.load(Ordering::Relaxed),
                    s.len.load(Ordering::Relaxed),
                )
            })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for slot in self.slots.iter().filter_map(|&i| SLOTS.get(i)) {
            slot.state.store(BUSY, Ordering::Release);
            slot.lost.store(false, Ordering::Relaxed);
            slot.state.store(FREE, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use vm_memory::{
        Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
    };

    /// A memfd mapped as guest RAM, truncated by "the frontend": the access completes (reading
    /// zeros), the region reads as lost, and the process lives.
    #[test]
    fn a_truncated_region_is_lost_not_fatal() {
        let fd = rustix::fs::memfd_create("ram", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 0x4000).unwrap();
        let file = File::from(fd);
        let region =
            MmapRegion::<()>::from_file(FileOffset::new(file.try_clone().unwrap(), 0), 0x4000)
                .unwrap();
        let start = region.as_ptr() as usize;
        let ram = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(region, GuestAddress(0)).unwrap(),
        ])
        .unwrap();
        let watch = Watch::new([(start, 0x4000)]).unwrap();
        ram.write_obj(0x1234_5678u32, GuestAddress(0x2000)).unwrap();
        assert_eq!(watch.lost(), None);
        rustix::fs::ftruncate(&file, 0).unwrap();
        let value: u32 = ram.read_obj(GuestAddress(0x2000)).unwrap();
        assert_eq!(value, 0, "the lost page reads as zero");
        assert_eq!(watch.lost(), Some((start, 0x4000)));
        drop(watch);
        // A new watch of other memory starts clean.
        let other = Watch::new([(start + 0x10_0000, 0x1000)]).unwrap();
        assert_eq!(other.lost(), None);
    }
}
