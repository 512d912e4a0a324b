//! The shared region (docs/protocol.md, section 10) between the real `viommu-backend` and the
//! mock QEMU: registers read from the mirror, writes posted in the ring, translations found in
//! the backend's cache (prefetched around a miss) and gone before the CMD_SYNC that
//! invalidates them completes, without an IOTLB_INVALIDATE; SIDs pushed, never asked for.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use viommu_protocol::types::DeviceFlags;
use viommu_protocol::{Access, FrontendRequest, Status};
use viommu_tests::channel;
use viommu_tests::guest::cmd::{CmdEnt, Tlbi};
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::scenario::{self, MockGuest, RAM_SIZE, default_config, probed_guest};
use viommu_tests::{Dma, MockQemu, PrivateDaemon};

fn started(daemon: &PrivateDaemon) -> MockQemu {
    let mut qemu = daemon.connect().unwrap().with_shared_region(true);
    qemu.negotiate().unwrap();
    qemu.start(default_config(), RAM_SIZE).unwrap();
    assert!(qemu.shared().is_some(), "the backend offers SHARED_REGION");
    qemu
}

fn invalidations(qemu: &MockQemu) -> usize {
    channel::invalidations(&qemu.channel_state().log)
}

fn sid_questions(qemu: &MockQemu) -> usize {
    channel::sid_questions(&qemu.channel_state().log)
}

/// A guest driver probed and reset on `qemu`.
fn guest_on(qemu: &MockQemu) -> MockGuest {
    let mut d = probed_guest(qemu, RAM_SIZE).unwrap();
    d.reset().unwrap();
    d
}

/// Linux's boot and DMA session runs with every mirrored register read served by the mirror
/// and every register write posted in the ring, with far fewer kicks than writes.
#[test]
fn a_linux_session_reads_and_writes_registers_without_messages() {
    let daemon = PrivateDaemon::start("shared-linux").unwrap();
    let mut qemu = daemon.connect().unwrap().with_shared_region(true);
    let report = scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
    assert!(report.translations > 0);
    let sent = qemu.shared().unwrap().sent();
    assert!(sent.mirror_reads > 10, "{sent:?}");
    assert!(sent.posted > 20, "{sent:?}");
    assert!(sent.kicks <= sent.posted + sent.requests, "{sent:?}");
    // Every translation went through the region (10.9).
    assert_eq!(sent.requests, qemu.sent().translates, "{sent:?}");
    // Nothing was asked about SIDs: they are pushed.
    assert_eq!(sid_questions(&qemu), 0);
    qemu.close().unwrap();
}

/// A miss fills the cache with the page and its mapped neighbours (prefetch, both ways); hits
/// need no TRANSLATE; an unmap's TLBI + CMD_SYNC clears them before the sync completes, with no
/// IOTLB_INVALIDATE, so the next access asks again and faults.
#[test]
fn translations_are_cached_prefetched_and_cleared_before_the_sync_completes() {
    let daemon = PrivateDaemon::start("shared-cache").unwrap();
    let mut qemu = started(&daemon);
    let mut d = guest_on(&qemu);
    let (handle, sid) = (3, 0x18);
    qemu.attach(handle, sid).unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    // Eight pages mapped downwards from the top, as Linux's IOVA allocator hands them out.
    let iova = 0x4_0000_0000u64;
    let mut pages = Vec::new();
    for i in 0..8u64 {
        let pa = d.alloc_zeroed(0x1000, 0x1000).unwrap();
        d.map(&pt, iova + i * 0x1000, pa, 0x1000, prot::RW).unwrap();
        pages.push(pa);
    }
    let domain = d.attach_s1(sid, pt, 7).unwrap();
    let before = qemu.sent().translates;
    // A miss in the middle: TRANSLATE once.
    assert_eq!(
        qemu.translate(handle, None, iova + 4 * 0x1000 + 0x10, Access::READ)
            .unwrap(),
        Dma::Address {
            gpa: pages[4] + 0x10,
            cached: false
        }
    );
    assert_eq!(qemu.sent().translates, before + 1);
    // The backend prefetches after its reply: wait until it is done.
    let shared = qemu.shared().unwrap().clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while (0..8u64).any(|i| {
        shared
            .lookup(sid, None, iova + i * 0x1000, true, false)
            .is_none()
    }) {
        assert!(std::time::Instant::now() < deadline, "not prefetched");
        std::thread::yield_now();
    }
    // Every other mapped page, above and below, was prefetched: no TRANSLATE.
    for (i, &pa) in pages.iter().enumerate() {
        assert_eq!(
            qemu.translate(handle, None, iova + i as u64 * 0x1000 + 8, Access::WRITE)
                .unwrap(),
            Dma::Address {
                gpa: pa + 8,
                cached: true
            },
            "page {i}"
        );
    }
    assert_eq!(qemu.sent().translates, before + 1);
    // Pages beyond the mapping were not entered (the probe stopped there): TRANSLATE, fault.
    assert!(matches!(
        qemu.translate(handle, None, iova + 8 * 0x1000, Access::READ)
            .unwrap(),
        Dma::Fault { .. }
    ));
    // Another device at another SID never uses this device's entries.
    qemu.attach(4, 0x19).unwrap();
    assert!(matches!(
        qemu.translate(4, None, iova, Access::READ).unwrap(),
        Dma::Fault { .. } | Dma::Address { cached: false, .. }
    ));
    // Unmap page 2, TLBI by VA and CMD_SYNC: when the sync completes the entry is gone.
    domain.pt.unmap(&d.mem, iova + 2 * 0x1000).unwrap();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhVa(Tlbi {
        asid: domain.asid,
        addr: iova + 2 * 0x1000,
        leaf: true,
        ..Tlbi::default()
    }))
    .unwrap();
    let asked = qemu.sent().translates;
    assert!(matches!(
        qemu.translate(handle, None, iova + 2 * 0x1000, Access::READ)
            .unwrap(),
        Dma::Fault { .. }
    ));
    assert_eq!(
        qemu.sent().translates,
        asked + 1,
        "the cleared entry missed"
    );
    // Its neighbours stay cached.
    assert!(matches!(
        qemu.translate(handle, None, iova + 3 * 0x1000, Access::READ)
            .unwrap(),
        Dma::Address { cached: true, .. }
    ));
    // No message was needed for any of it.
    assert_eq!(invalidations(&qemu), 0);
    d.evtq_thread().unwrap();
    assert!(d.port.take_error().is_none());
    qemu.close().unwrap();
}

/// A device that asked for unmap notifications (vhost's device IOTLB) still hears of unmaps by
/// IOTLB_INVALIDATE; a SID pushed with UPDATE_DEVICE is used at once, and CFGI_STE of a SID no
/// device has asks nothing. Bad UPDATE_DEVICEs are refused and change nothing.
#[test]
fn notified_devices_hear_of_unmaps_and_sids_are_pushed() {
    let daemon = PrivateDaemon::start("shared-notify").unwrap();
    let mut qemu = started(&daemon);
    let mut d = guest_on(&qemu);
    let (handle, sid) = (9, 0x30);
    qemu.attach(handle, sid).unwrap();
    qemu.update_device(handle, DeviceFlags::UNMAP_NOTIFY)
        .unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    let iova = 0x8000_0000u64;
    let pa = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    d.map(&pt, iova, pa, 0x1000, prot::RW).unwrap();
    let domain = d.attach_s1(sid, pt, 11).unwrap();
    assert!(matches!(
        qemu.translate(handle, None, iova, Access::READ).unwrap(),
        Dma::Address { .. }
    ));
    domain.pt.unmap(&d.mem, iova).unwrap();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhVa(Tlbi {
        asid: domain.asid,
        addr: iova,
        leaf: true,
        ..Tlbi::default()
    }))
    .unwrap();
    assert_eq!(invalidations(&qemu), 1, "the notified device heard of it");
    // CFGI_STE of SIDs nobody has: no question on the backend channel.
    for s in 0x100..0x110 {
        d.issue_cmd_with_sync(CmdEnt::CfgiSte { sid: s, leaf: true })
            .unwrap();
    }
    assert_eq!(sid_questions(&qemu), 0);
    // Hostile or stale UPDATE_DEVICEs.
    let err = |req| match qemu.frontend().call(&req) {
        Err(viommu_protocol::Error::Remote { status, .. }) => status,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        err(FrontendRequest::UpdateDevice {
            handle: 77,
            sid: 1,
            flags: DeviceFlags::empty()
        }),
        Status::NOT_FOUND
    );
    assert_eq!(
        err(FrontendRequest::UpdateDevice {
            handle,
            sid: 1 << 20,
            flags: DeviceFlags::empty()
        }),
        Status::INVALID_ARGUMENT
    );
    // A second SET_SHARED_REGION is refused.
    let (_, fds) = viommu_tests::shared::SharedFrontend::create(true).unwrap();
    assert_eq!(
        err(FrontendRequest::SetSharedRegion {
            region: fds.region,
            kick: fds.kick,
            call: fds.call,
            resume: false,
        }),
        Status::BAD_STATE
    );
    d.evtq_thread().unwrap();
    assert!(d.port.take_error().is_none());
    qemu.close().unwrap();
}

/// A frontend that breaks the ring's rules (docs/protocol.md, 10.7) loses its session, after
/// the writes before the bad one were applied; the daemon serves the next frontend. Each case
/// scribbles on the region directly, as a hostile QEMU could.
#[test]
fn a_frontend_that_breaks_the_ring_loses_its_session_not_the_daemon() {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, VolatileMemory};

    const WRITE_PROD: usize = 0x40;
    const RING: usize = 0x1000;
    let mut daemon = PrivateDaemon::start("shared-hostile").unwrap();
    // (offset, size, value, prod ahead by): a bad size, an offset outside the window, a
    // misaligned one, a 4-byte write with upper bits, and write_prod beyond the ring.
    let cases: [(u32, u32, u64, u32); 5] = [
        (0x20, 3, 1, 1),
        (0x2_0000, 4, 1, 1),
        (0x22, 4, 1, 1),
        (0x20, 4, 1 << 32, 1),
        (0x20, 4, 1, 257),
    ];
    for (offset, size, value, ahead) in cases {
        let case = format!("offset {offset:#x} size {size} value {value:#x} ahead {ahead}");
        let qemu = started(&daemon);
        let shared = qemu.shared().unwrap().clone();
        // A good write first: it is applied before the session ends.
        let mut port = qemu.port();
        viommu_tests::guest::SmmuPort::write(&mut port, 0x3c, 4, 0x5);
        shared.wait_applied().unwrap();
        let file = std::fs::File::from(shared.region_fd().unwrap());
        let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), 0x10000).unwrap();
        let prod = map.get_atomic_ref::<AtomicU32>(WRITE_PROD).unwrap();
        let at = prod.load(Ordering::Relaxed);
        let entry = RING + (at % 256) as usize * 16;
        map.get_atomic_ref::<AtomicU32>(entry)
            .unwrap()
            .store(offset, Ordering::Relaxed);
        map.get_atomic_ref::<AtomicU32>(entry + 4)
            .unwrap()
            .store(size, Ordering::Relaxed);
        map.get_atomic_ref::<AtomicU64>(entry + 8)
            .unwrap()
            .store(value, Ordering::Relaxed);
        prod.store(at.wrapping_add(ahead), Ordering::Release);
        // A message makes the backend look at the ring first: the session ends.
        let err = qemu
            .frontend()
            .call(&FrontendRequest::GetIdRegs)
            .expect_err(&case);
        assert!(
            matches!(
                err,
                viommu_protocol::Error::Disconnected | viommu_protocol::Error::Io(_)
            ),
            "{case}: {err:?}"
        );
        assert!(daemon.is_running(), "{case}: the daemon died");
    }
    // The daemon serves the next frontend as usual.
    let mut qemu = daemon.connect().unwrap().with_shared_region(true);
    scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
}

/// With SHARED_TRANSLATE a miss goes through the region (10.9), and a frontend that sleeps
/// while it waits, for an answer or for its posted writes before a read, is woken by the call.
/// The daemon is stopped (SIGSTOP) while the frontend asks, and continued 50 ms later, so the
/// frontend must sleep; a backend that did not call would leave it asleep until the mock's 5 s
/// deadline, so each such wait must end well before it (2.5 s: 50 times the pause).
#[test]
fn a_sleeping_frontend_is_called_when_its_answer_or_its_writes_are_done() {
    use rustix::process::{Pid, Signal, kill_process};
    let mut daemon = PrivateDaemon::start("shared-call").unwrap();
    let pid = Pid::from_raw(i32::try_from(daemon.process().unwrap().pid()).unwrap()).unwrap();
    // Stops the daemon now and continues it 50 ms later.
    let woken_in_time = |since: std::time::Instant, what: &str| {
        let took = since.elapsed();
        assert!(
            took < std::time::Duration::from_millis(2500),
            "{what}: {took:?}, not woken by the call"
        );
    };
    let pause = || {
        kill_process(pid, Signal::STOP).unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            kill_process(pid, Signal::CONT).unwrap();
        })
    };
    let mut qemu = started(&daemon);
    let shared = qemu.shared().unwrap().clone();
    assert!(shared.translates(), "the backend offers SHARED_TRANSLATE");
    let mut d = guest_on(&qemu);
    let (handle, sid) = (3, 0x18);
    qemu.attach(handle, sid).unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    // Every other page mapped: each is a miss of its own (the prefetch stops at the gaps).
    let iova = 0x4_0000_0000u64;
    let mut pages = Vec::new();
    for i in 0..4u64 {
        let pa = d.alloc_zeroed(0x1000, 0x1000).unwrap();
        d.map(&pt, iova + 2 * i * 0x1000, pa, 0x1000, prot::RW)
            .unwrap();
        pages.push(pa);
    }
    let domain = d.attach_s1(sid, pt, 7).unwrap();
    let before = shared.sent();
    for (i, &pa) in pages.iter().enumerate() {
        let paused = (i % 2 == 1).then(pause);
        let asleep = shared.sent().sleeps;
        let since = std::time::Instant::now();
        assert_eq!(
            qemu.translate(
                handle,
                None,
                iova + 2 * i as u64 * 0x1000 + 0x24,
                Access::READ
            )
            .unwrap(),
            Dma::Address {
                gpa: pa + 0x24,
                cached: false
            },
            "page {i}"
        );
        if let Some(paused) = paused {
            woken_in_time(since, "a translation");
            paused.join().unwrap();
            assert!(
                shared.sent().sleeps > asleep,
                "page {i}: the frontend slept"
            );
        }
    }
    // An unmap while the daemon is stopped: the driver's TLBI and CMD_SYNC are posted, and its
    // read of CONS waits for them asleep.
    domain.pt.unmap(&d.mem, iova).unwrap();
    let paused = pause();
    let asleep = shared.sent().sleeps;
    let since = std::time::Instant::now();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhVa(Tlbi {
        asid: domain.asid,
        addr: iova,
        leaf: true,
        ..Tlbi::default()
    }))
    .unwrap();
    woken_in_time(since, "an unmap");
    paused.join().unwrap();
    assert!(shared.sent().sleeps > asleep, "the read slept");
    assert!(matches!(
        qemu.translate(handle, None, iova, Access::READ).unwrap(),
        Dma::Fault { .. }
    ));
    let sent = shared.sent();
    assert_eq!(sent.requests - before.requests, 5, "{sent:?}");
    assert_eq!(invalidations(&qemu), 0);
    d.evtq_thread().unwrap();
    assert!(d.port.take_error().is_none());
    qemu.close().unwrap();
}

/// A frontend without SHARED_TRANSLATE still uses the region for registers and the cache, and
/// sends TRANSLATE on a miss; SET_SHARED_REGION then takes two fds, not three.
#[test]
fn without_shared_translate_a_miss_is_a_message() {
    use viommu_protocol::Features;
    let daemon = PrivateDaemon::start("shared-no-xlate").unwrap();
    let mut qemu = daemon
        .connect()
        .unwrap()
        .with_shared_region(true)
        .with_usable_features(
            viommu_tests::FRONTEND_FEATURES.difference(Features::SHARED_TRANSLATE),
        );
    let report = scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
    assert!(report.features.contains(Features::SHARED_REGION));
    assert!(!report.features.contains(Features::SHARED_TRANSLATE));
    let shared = qemu.shared().unwrap().clone();
    assert!(!shared.translates());
    assert!(report.translations > 0);
    assert_eq!(shared.sent().requests, 0);
    assert!(shared.sent().mirror_reads > 10);
    qemu.close().unwrap();

    // SET_SHARED_REGION with the wrong number of fds for the features is refused.
    for (take, call) in [(true, false), (false, true)] {
        let mut qemu = daemon.connect().unwrap().with_shared_region(true);
        let mut usable = viommu_tests::FRONTEND_FEATURES;
        if !take {
            usable.remove(Features::SHARED_TRANSLATE);
        }
        qemu.negotiate_within(usable).unwrap();
        let (_, fds) = viommu_tests::shared::SharedFrontend::create(call).unwrap();
        let err = qemu
            .frontend()
            .call(&FrontendRequest::SetSharedRegion {
                region: fds.region,
                kick: fds.kick,
                call: fds.call,
                resume: false,
            })
            .unwrap_err();
        assert!(
            matches!(err, viommu_protocol::Error::Remote { status, .. } if status == Status::INVALID_MESSAGE),
            "SHARED_TRANSLATE {take}, call {call}: {err:?}"
        );
        qemu.close().unwrap();
    }
}

/// A malformed translation request in the region (10.7, 10.9) gets an answer with the status
/// an error reply to the TRANSLATE message would carry; the session goes on, and a good request
/// after it is answered.
#[test]
fn a_malformed_translation_request_gets_an_error_answer() {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, VolatileMemory};

    let daemon = PrivateDaemon::start("shared-bad-request").unwrap();
    let qemu = started(&daemon);
    let shared = qemu.shared().unwrap().clone();
    let file = std::fs::File::from(shared.region_fd().unwrap());
    let map = MmapRegion::<()>::from_file(FileOffset::new(file, 0), 0x10000).unwrap();
    let u32_at = |at: usize| map.get_atomic_ref::<AtomicU32>(at).unwrap();
    let seq = u32_at(0x400);
    let mut next = seq.load(Ordering::Relaxed);
    let mut ask = |flags: u32, ssid: u32, reserved: u32| {
        u32_at(0x408).store(0x18, Ordering::Relaxed);
        u32_at(0x40c).store(ssid, Ordering::Relaxed);
        map.get_atomic_ref::<AtomicU64>(0x410)
            .unwrap()
            .store(0x1000, Ordering::Relaxed);
        u32_at(0x418).store(flags, Ordering::Relaxed);
        u32_at(0x41c).store(reserved, Ordering::Relaxed);
        next = next.wrapping_add(1);
        seq.store(next, Ordering::Release);
        // The backend serves the region before any message.
        qemu.frontend().call(&FrontendRequest::GetIdRegs).unwrap();
        assert_eq!(u32_at(0x440).load(Ordering::Acquire), next);
        (
            u32_at(0x444).load(Ordering::Relaxed),
            u32_at(0x45c).load(Ordering::Relaxed),
        )
    };
    let invalid = Status::INVALID_MESSAGE.0;
    assert_eq!(ask(1 << 5, 0, 0).0, invalid, "a reserved flag");
    assert_eq!(ask(1 | 1 << 4, 1 << 20, 0).0, invalid, "a 21-bit SSID");
    assert_eq!(ask(1, 7, 0).0, invalid, "an SSID without SSID_VALID");
    assert_eq!(ask(1, 0, 9).0, invalid, "the reserved word");
    // A good read: the vSMMU is not enabled and GBPA does not abort, an identity translation.
    assert_eq!(ask(1, 0, 0), (0, 0));
    qemu.close().unwrap();
}
