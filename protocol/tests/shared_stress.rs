//! The shared region's memory-ordering rules (docs/protocol.md, section 10), checked by both
//! sides hammering one memfd from two threads through two mappings, as QEMU and the daemon do.
//! A broken rule shows as a torn register, a lost or reordered posted write, a lost wake-up, or
//! a translation read half-written or after its invalidation was published.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, eventfd, poll};
use viommu_protocol::Perm;
use viommu_protocol::shared::{BackendSide, CachedTranslation, FrontendSide, Posted, Region};
use viommu_protocol::types::{Access, TranslateReply, TranslateRequest};

fn pair() -> (FrontendSide, BackendSide) {
    let region = Region::create().unwrap();
    let fd: OwnedFd = region.fd().try_clone_to_owned().unwrap();
    let backend = BackendSide::new(Region::adopt(fd).unwrap(), true);
    (FrontendSide::new(region), backend)
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// The backend publishes register files in which every slot holds the same count; a reader
/// must never see two different counts in one 64-bit register, nor a count going back.
#[test]
fn register_reads_are_never_torn_and_never_go_back() {
    let (front, mut back) = pair();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                k = k.wrapping_add(1);
                back.publish(|_| k);
            }
            k
        })
    };
    let mut last = 0u32;
    let mut reads = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        // SMMU_CMDQ_BASE (0x90, 8 bytes), SMMU_EVENTQ_PROD in page 1, SMMU_STRTAB_BASE.
        for (offset, size) in [(0x90u64, 8u32), (0x100a8, 4), (0x80, 8)] {
            let v = front.read_register(offset, size, far()).unwrap().unwrap();
            let lo = v as u32;
            if size == 8 {
                assert_eq!(v >> 32, u64::from(lo), "torn 64-bit register {v:#x}");
            }
            assert!(lo >= last, "register went back from {last} to {lo}");
            last = lo;
            reads += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let published = writer.join().unwrap();
    assert!(reads > 1000 && last > 0 && published >= last);
    assert_eq!(front.read_register(0x200, 4, far()).unwrap(), None);
}

/// The frontend posts a numbered stream of writes, kicking only when the backend said it may
/// sleep; the backend sleeps on the kick for real. Every write arrives once, in order, and no
/// wake-up is lost (a lost one would leave the backend asleep past the poll timeout).
#[test]
fn posted_writes_arrive_in_order_and_no_wakeup_is_lost() {
    const WRITES: u64 = 200_000;
    let (mut front, mut back) = pair();
    let kick = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap());
    let sleeps = Arc::new(AtomicU64::new(0));
    let announced = Arc::new(AtomicU64::new(0));
    let consumer = {
        let kick = kick.clone();
        let sleeps = sleeps.clone();
        let announced = announced.clone();
        std::thread::spawn(move || {
            let mut expect = 0u64;
            while expect < WRITES {
                while let Some(w) = back.next_write().unwrap() {
                    assert_eq!(w.value, expect, "posted write out of order");
                    assert_eq!((w.offset, w.size), (0x98, 8));
                    expect += 1;
                    back.complete_write();
                }
                if expect == WRITES {
                    continue;
                }
                // Every announcement is a new sleep count the frontend may kick for once.
                announced.fetch_add(1, Ordering::Relaxed);
                if !back.prepare_to_sleep() {
                    continue;
                }
                sleeps.fetch_add(1, Ordering::Relaxed);
                let mut fds = [PollFd::new(&*kick, PollFlags::IN)];
                let timeout = rustix::event::Timespec {
                    tv_sec: 10,
                    tv_nsec: 0,
                };
                let ready = poll(&mut fds, Some(&timeout)).unwrap();
                assert_eq!(ready, 1, "lost wake-up: asleep with writes pending");
                let mut buf = [0u8; 8];
                let _ = rustix::io::read(&*kick, &mut buf);
                back.woke();
            }
        })
    };
    let mut kicks = 0u64;
    let mut i = 0u64;
    while i < WRITES {
        match front.post(0x98, 8, i).unwrap() {
            Posted::Quiet => i += 1,
            Posted::Kick => {
                rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
                kicks += 1;
                i += 1;
            }
            Posted::Full => {
                rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
                std::thread::yield_now();
            }
        }
    }
    consumer.join().unwrap();
    assert!(!front.writes_pending().unwrap());
    // Suppression works: writes posted while the backend was awake cost no kick, and the
    // backend did sleep (so the wake-up path was exercised).
    let sleeps = sleeps.load(Ordering::Relaxed);
    let announced = announced.load(Ordering::Relaxed);
    eprintln!("{WRITES} writes, {kicks} kicks, {announced} sleeps announced, {sleeps} slept");
    assert!(
        kicks <= announced,
        "{kicks} kicks for {announced} announced sleeps"
    );
    assert!(sleeps > 0);
}

/// The backend rewrites one cache slot with translations of several generations, each
/// self-consistent (SID = generation, output = generation << 32 | iova), and clears it before
/// it publishes that a generation is over (as it clears before completing a CMD_SYNC). A lookup
/// never returns a half-written entry, and a lookup that starts after the frontend saw
/// "generation g is over" never returns generation g or older.
#[test]
fn cache_lookups_see_whole_entries_and_nothing_after_its_invalidation() {
    const IOVA: u64 = 0x7_7000;
    let (front, mut back) = pair();
    let over = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (over, stop) = (over.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut g = 1u64;
            while !stop.load(Ordering::Relaxed) {
                // Same slot for every generation: the SID is constant, the output carries g.
                let t = CachedTranslation::for_page(
                    5,
                    None,
                    IOVA,
                    12,
                    g << 32 | IOVA,
                    true,
                    !g.is_multiple_of(3),
                )
                .unwrap();
                back.fill(IOVA, t);
                back.clear(|t| t.out >> 32 == g);
                over.store(g, Ordering::Release);
                g += 1;
            }
            g
        })
    };
    let (mut hits, mut misses) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let done = over.load(Ordering::Acquire);
        match front.lookup(5, None, IOVA | 0x123, false) {
            Some(out) => {
                assert_eq!(
                    out & 0xffff_ffff,
                    IOVA | 0x123,
                    "half-written entry: {out:#x}"
                );
                let g = out >> 32;
                assert!(
                    g > done,
                    "generation {g} used after generation {done} was over"
                );
                hits += 1;
            }
            None => misses += 1,
        }
        // Another SID or a substream never hits this slot's entries.
        assert_eq!(front.lookup(6, None, IOVA, false), None);
        assert_eq!(front.lookup(5, Some(0), IOVA, false), None);
    }
    stop.store(true, Ordering::Relaxed);
    let generations = writer.join().unwrap();
    assert!(generations > 100, "{generations} generations");
    assert!(hits + misses > 1000);
}

/// Translation requests through the region (10.9), both sides sleeping for real: the frontend
/// asks a numbered stream of requests, kicking when the backend announced a sleep, and sleeps on
/// the call when an answer is not there; the backend answers each with a value derived from the
/// request and sleeps on the kick. Every answer is to its own request, complete (never a
/// previous answer's fields), and neither side's wake-up is lost (a lost one leaves a side
/// asleep past its 10 s poll).
#[test]
fn translation_requests_get_their_own_answers_and_no_wakeup_is_lost() {
    const REQUESTS: u64 = 30_000;
    let (mut front, mut back) = pair();
    let new_eventfd =
        || Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap());
    let (kick, call) = (new_eventfd(), new_eventfd());
    let sleep_on = |fd: &OwnedFd, what: &str| {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let timeout = rustix::event::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        assert_eq!(
            poll(&mut fds, Some(&timeout)).unwrap(),
            1,
            "lost wake-up: {what}"
        );
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(fd, &mut buf);
    };
    let backend = {
        let (kick, call) = (kick.clone(), call.clone());
        std::thread::spawn(move || {
            let mut answered = 0u64;
            let mut backend_sleeps = 0u64;
            while answered < REQUESTS {
                if let Some((seq, request)) = back.next_request() {
                    let t = request.unwrap();
                    // Request n asks for IOVA n << 12 of SID n; the answer maps it to
                    // n << 20, so a stale or torn answer shows.
                    assert_eq!(u64::from(t.sid), t.iova >> 12);
                    back.answer(
                        seq,
                        &Ok(TranslateReply::Translated {
                            addr: (t.iova >> 12) << 20,
                            addr_mask: 0xfff,
                            perm: Perm::READ,
                        }),
                    );
                    if back.frontend_waits() {
                        rustix::io::write(&*call, &1u64.to_ne_bytes()).unwrap();
                    }
                    answered += 1;
                    continue;
                }
                if !back.prepare_to_sleep() {
                    continue;
                }
                backend_sleeps += 1;
                sleep_on(&kick, "the backend asleep with a request waiting");
                back.woke();
            }
            backend_sleeps
        })
    };
    let mut front_sleeps = 0u64;
    for n in 1..=REQUESTS {
        let t = TranslateRequest {
            sid: n as u32,
            ssid: None,
            iova: n << 12,
            access: Access::READ,
        };
        if front.request_translation(&t) == Posted::Kick {
            rustix::io::write(&*kick, &1u64.to_ne_bytes()).unwrap();
        }
        // Spin a little, as QEMU does, then sleep on the call.
        let mut spins = 0u32;
        let answer = loop {
            if let Some(a) = front.answer().unwrap() {
                break a;
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
                continue;
            }
            front.announce_wait();
            if let Some(a) = front.answer().unwrap() {
                front.end_wait();
                break a;
            }
            front_sleeps += 1;
            sleep_on(&call, "the frontend asleep with its answer there");
            front.end_wait();
        };
        assert_eq!(
            answer,
            Ok(TranslateReply::Translated {
                addr: n << 20,
                addr_mask: 0xfff,
                perm: Perm::READ
            }),
            "request {n}"
        );
    }
    let backend_sleeps = backend.join().unwrap();
    eprintln!("{REQUESTS} requests: frontend slept {front_sleeps} times, backend {backend_sleeps}");
    assert!(
        front_sleeps > 0 && backend_sleeps > 0,
        "both wake-up paths ran"
    );
}
