//! Whole vSMMU sessions: the real `viommu-backend` binary and the mock QEMU peer over a real
//! Unix socket, with memfd guest RAM, eventfds and the backend channel.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use viommu_protocol::types::DeviceFlags;
use viommu_protocol::{
    Access, AddressSpace, Error, FrontendReply, FrontendRequest, IrqIndex, MemRegion, Status,
};
use viommu_tests::channel::{Notification, invalidations};
use viommu_tests::guest::cmd::CmdEnt;
use viommu_tests::guest::event::id;
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::guest::regs::{ARM_SMMU_CMDQ_CONS, ARM_SMMU_GERROR, ARM_SMMU_GERRORN};
use viommu_tests::guest::{BumpAllocator, Driver, DriverConfig, DriverError};
use viommu_tests::port::SocketPort;
use viommu_tests::ram::MemfdRam;
use viommu_tests::scenario::{self, ALLOC_START, DEVICES, Device, RAM_SIZE, default_config};
use viommu_tests::{BackendProcess, Dma, MockQemu, PrivateDaemon, backend_binary_built};

/// The daemon of these tests, with what they look at.
struct Daemon(PrivateDaemon);

impl Daemon {
    fn start(name: &str) -> Self {
        Self(PrivateDaemon::start(&format!("session-{name}")).unwrap())
    }

    fn connect(&self) -> MockQemu {
        self.0.connect().unwrap()
    }

    fn raw(&self) -> UnixStream {
        self.0.raw().unwrap()
    }

    fn process(&mut self) -> &mut BackendProcess {
        self.0.process().unwrap()
    }

    /// Open fds of the daemon.
    fn fds(&mut self) -> usize {
        let pid = self.process().pid();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }

    fn assert_alive(&mut self) {
        assert!(self.0.is_running(), "the daemon died");
    }
}

type Guest = Driver<SocketPort, vm_memory::GuestMemoryMmap<()>>;

/// A session started and a guest driver probed on it (not yet reset).
fn guest_on(qemu: &mut MockQemu) -> Guest {
    let mem = qemu.mem().unwrap().clone();
    Driver::probe(
        qemu.port(),
        mem,
        BumpAllocator::new(ALLOC_START, RAM_SIZE),
        DriverConfig::default(),
    )
    .unwrap()
}

fn started(daemon: &Daemon) -> MockQemu {
    let mut qemu = daemon.connect();
    qemu.negotiate().unwrap();
    qemu.start(default_config(), RAM_SIZE).unwrap();
    qemu
}

fn remote_status(err: &anyhow::Error) -> Option<Status> {
    match err.downcast_ref::<Error>() {
        Some(Error::Remote { status, .. }) => Some(*status),
        _ => None,
    }
}

#[test]
fn linux_boot_session_and_a_second_session_from_reset() {
    let daemon = Daemon::start("boot");
    for round in 0..2 {
        let mut qemu = daemon.connect();
        let report = scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
        assert_eq!(report.stes, 4, "round {round}");
        assert_eq!(report.cache_hits, 3, "one cache hit per device");
        // 3 devices x (write, read-back hit) + the fault + the MSI fault + the GPU's new SID.
        assert_eq!(report.translations, 6);
        assert_eq!(report.events.len(), 2);
        assert_eq!(report.events[0].id(), id::F_TRANSLATION);
        assert_eq!(report.evtq_irqs, 1);
        assert_eq!(report.msi_writes, 1);
        if qemu.shared().is_some() {
            // SIDs are pushed (UPDATE_DEVICE), never asked for; no device asked for unmap
            // notifications, so the backend's own cache clearing needed no message.
            assert_eq!(report.sid_confirmations, 0);
            assert_eq!(report.invalidations, 0);
        } else {
            assert!(report.sid_confirmations >= 1);
            assert!(report.invalidations >= 1);
        }
        // Attach (3 x system), SMMUEN (3 x translated), RESET (3 x system).
        assert_eq!(report.address_space_changes, 9);
        qemu.close().unwrap();
    }
}

#[test]
fn translations_for_every_granule_and_invalidation_notifications() {
    let daemon = Daemon::start("granules");
    let mut qemu = started(&daemon);
    let shared = qemu.shared().is_some();
    let mut d = guest_on(&mut qemu);
    d.reset().unwrap();
    for (i, granule) in [Granule::G4K, Granule::G16K, Granule::G64K]
        .into_iter()
        .enumerate()
    {
        let handle = 10 + i as u32;
        let sid = 0x20 + 8 * i as u32;
        qemu.attach(handle, sid).unwrap();
        let pt = d.new_s1_pgtable(granule).unwrap();
        let size = granule.size();
        // Two pages, mapped in reverse order, so a wrong index shows.
        let a = d.alloc_zeroed(size, size).unwrap();
        let b = d.alloc_zeroed(size, size).unwrap();
        let iova = 0x40_0000_0000 + (i as u64) * 0x1_0000_0000;
        d.map(&pt, iova, b, size, prot::RW).unwrap();
        d.map(&pt, iova + size, a, size, prot::READ | prot::CACHE)
            .unwrap();
        let domain = d.attach_s1(sid, pt, 40 + i as u16).unwrap();
        assert_eq!(
            qemu.translate(handle, None, iova + 8, Access::WRITE)
                .unwrap(),
            Dma::Address {
                gpa: b + 8,
                cached: false
            }
        );
        // The backend's shared cache may have prefetched the mapped page above the miss.
        let dma = qemu
            .translate(handle, None, iova + size + 16, Access::READ)
            .unwrap();
        assert!(
            matches!(dma, Dma::Address { gpa, cached } if gpa == a + 16 && (shared || !cached)),
            "{granule:?}: {dma:?}"
        );
        // Writing a read-only page: F_PERMISSION.
        qemu.channel_state().cache = Default::default();
        assert_eq!(
            qemu.translate(handle, None, iova + size, Access::WRITE)
                .unwrap(),
            Dma::Fault {
                event: id::F_PERMISSION
            }
        );
        // TLBI_NH_ASID drops everything the frontend cached for this device: by
        // IOTLB_INVALIDATE, or, with the shared region, by the backend clearing its cache
        // before the CMD_SYNC completes, without a message.
        qemu.translate(handle, None, iova, Access::READ).unwrap();
        assert!(qemu.holds_translation(handle, None, iova, Access::READ));
        let log = qemu.channel_state().log.len();
        d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid {
            vmid: 0,
            asid: domain.asid,
        })
        .unwrap();
        for page in [iova, iova + size] {
            assert!(
                !qemu.holds_translation(handle, None, page, Access::READ),
                "{granule:?}: {page:#x} not invalidated"
            );
        }
        assert!(qemu.channel_state().cache.is_empty());
        let messages = invalidations(&qemu.channel_state().log[log..]);
        assert_eq!(messages, usize::from(!shared), "{granule:?}");
        // The next access asks again, and finds the mapping still there.
        assert_eq!(
            qemu.translate(handle, None, iova + 8, Access::WRITE)
                .unwrap(),
            Dma::Address {
                gpa: b + 8,
                cached: false
            }
        );
        d.evtq_thread().unwrap();
    }
    assert!(d.port.take_error().is_none());
    qemu.close().unwrap();
}

#[test]
fn gerror_for_an_illegal_command_reaches_the_guest_with_an_irq() {
    let daemon = Daemon::start("gerror");
    let mut qemu = started(&daemon);
    let mut d = guest_on(&mut qemu);
    d.reset().unwrap();
    qemu.take_irqs(IrqIndex::Gerror);
    // Opcode 0x7f does not exist: CERROR_ILL.
    let bad = viommu_tests::guest::cmd::Command([0x7f, 0]);
    let err = d.issue_raw_with_sync(&[bad]).unwrap_err();
    assert!(matches!(err, DriverError::Command { .. }), "{err:?}");
    assert_eq!(qemu.take_irqs(IrqIndex::Gerror), 1, "one GERROR interrupt");
    let active = d.read32(ARM_SMMU_GERROR) ^ d.read32(ARM_SMMU_GERRORN);
    assert_eq!(active & 1, 1, "GERROR.CMDQ_ERR active");
    assert_eq!((d.read32(ARM_SMMU_CMDQ_CONS) >> 24) & 0x7f, 1, "CERROR_ILL");
    // Linux's handler skips the command and acknowledges; the queue runs again.
    d.handle_gerror().unwrap();
    d.sync().unwrap();
    assert_eq!(d.read32(ARM_SMMU_GERROR) ^ d.read32(ARM_SMMU_GERRORN), 0);
    qemu.close().unwrap();
}

#[test]
fn state_survives_a_reconnect_with_set_state() {
    let daemon = Daemon::start("state");
    let dev = DEVICES[0];
    let mut qemu = started(&daemon);
    qemu.attach(dev.handle, dev.sid).unwrap();
    let mut d = guest_on(&mut qemu);
    d.reset().unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    let buf = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    d.map(&pt, dev.iova, buf, 0x1000, prot::RW).unwrap();
    d.attach_s1(dev.sid, pt, dev.asid).unwrap();
    let expected = Dma::Address {
        gpa: buf + 0x10,
        cached: false,
    };
    assert_eq!(
        qemu.translate(dev.handle, None, dev.iova + 0x10, Access::READ)
            .unwrap(),
        expected
    );
    let state = qemu.get_state().unwrap();
    let ram = qemu.take_ram().unwrap();
    qemu.close().unwrap();

    // The backend listens again; a new session starts from reset state...
    let mut fresh = daemon.connect();
    fresh.negotiate().unwrap();
    fresh
        .start_on(default_config(), MemfdRam::new(0, RAM_SIZE).unwrap())
        .unwrap();
    fresh.attach(dev.handle, dev.sid).unwrap();
    assert_eq!(
        fresh.channel_state().spaces.get(&dev.handle),
        Some(&AddressSpace::System),
        "a new session starts with SMMUEN = 0"
    );
    fresh.close().unwrap();

    // ... unless SET_STATE restores one: same RAM, same devices, and the guest's STEs apply.
    let mut qemu = daemon.connect();
    qemu.negotiate().unwrap();
    qemu.start_on(default_config(), ram).unwrap();
    qemu.attach(dev.handle, dev.sid).unwrap();
    qemu.set_state(&state).unwrap();
    assert_eq!(
        qemu.channel_state().spaces.get(&dev.handle),
        Some(&AddressSpace::Translated)
    );
    assert_eq!(
        qemu.translate(dev.handle, None, dev.iova + 0x10, Access::READ)
            .unwrap(),
        expected
    );
    assert_eq!(qemu.get_state().unwrap(), state, "the state round-trips");
    qemu.close().unwrap();
}

#[test]
fn set_state_refuses_garbage_and_mismatches_and_the_session_goes_on() {
    let daemon = Daemon::start("badstate");
    let mut qemu = started(&daemon);
    qemu.attach(1, 8).unwrap();
    let good = qemu.get_state().unwrap();
    for (what, blob) in [
        ("not JSON", b"\xff\x00garbage".to_vec()),
        ("empty", Vec::new()),
        (
            "another version",
            String::from_utf8(good.clone())
                .unwrap()
                .replacen("\"version\":1", "\"version\":99", 1)
                .into_bytes(),
        ),
    ] {
        let err = qemu.set_state(&blob).unwrap_err();
        let status = remote_status(&err);
        assert!(
            matches!(
                status,
                Some(Status::INVALID_ARGUMENT | Status::INCOMPATIBLE)
            ),
            "{what}: {err:#}"
        );
    }
    // Other devices attached than in the state: INCOMPATIBLE.
    qemu.attach(2, 0x10).unwrap();
    let err = qemu.set_state(&good).unwrap_err();
    assert_eq!(remote_status(&err), Some(Status::INCOMPATIBLE), "{err:#}");
    qemu.detach(2).unwrap();
    // The same handle at another SID matches: a SID is a hint (the guest may have renumbered
    // its buses), confirmed again before the restored STEs apply (docs/protocol.md, SET_STATE).
    qemu.detach(1).unwrap();
    qemu.attach(1, 0x108).unwrap();
    qemu.set_state(&good).unwrap();
    // After the guest ran, SET_STATE is refused.
    qemu.id_regs().unwrap();
    let err = qemu.set_state(&good).unwrap_err();
    assert_eq!(remote_status(&err), Some(Status::BAD_STATE), "{err:#}");
    qemu.close().unwrap();
}

#[test]
fn hostile_frontends_get_errors_and_the_daemon_serves_the_next() {
    let mut daemon = Daemon::start("hostile");
    let qemu = daemon.connect();
    // Out of order: MMIO before SET_CONFIG.
    let err = qemu
        .frontend()
        .call(&FrontendRequest::MmioRead(viommu_protocol::MmioAccess {
            offset: 0,
            size: viommu_protocol::AccessSize::Dword,
        }))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Remote {
                status: Status::BAD_STATE,
                ..
            }
        ),
        "{err:?}"
    );
    qemu.close().unwrap();

    let mut qemu = daemon.connect();
    qemu.negotiate().unwrap();
    // An "iommufd" that is not one: HOST_ERROR from the real iommufd layer, and the session
    // goes on.
    let not_iommufd = MemfdRam::new(0, 0x1000).unwrap().fd().unwrap();
    let err = qemu.set_iommufd(not_iommufd).unwrap_err();
    assert_eq!(remote_status(&err), Some(Status::HOST_ERROR), "{err:#}");
    assert!(
        format!("{err:#}").contains("not a usable iommufd"),
        "{err:#}"
    );
    // A memory region whose fd is a socket, not a file: a descriptor of the wrong kind is
    // INVALID_MESSAGE (docs/protocol.md, sections 2.7 and 3), nothing mapped.
    let (a, _b) = UnixStream::pair().unwrap();
    let err = qemu
        .frontend()
        .call(&FrontendRequest::AddMemReg(
            MemRegion {
                gpa: 0,
                size: 0x1000,
                mmap_offset: 0,
            },
            a.into(),
        ))
        .unwrap_err();
    assert_eq!(
        remote_status_of(&err),
        Some(Status::INVALID_MESSAGE),
        "{err:?}"
    );
    // The same with an eventfd, in SET_MEM_TABLE.
    let err = qemu
        .frontend()
        .call(&FrontendRequest::SetMemTable(vec![(
            MemRegion {
                gpa: 0,
                size: 0x1000,
                mmap_offset: 0,
            },
            eventfd(),
        )]))
        .unwrap_err();
    assert_eq!(
        remote_status_of(&err),
        Some(Status::INVALID_MESSAGE),
        "{err:?}"
    );
    assert!(format!("{err}").contains("eventfd"), "{err}");
    // A region larger than its memfd cannot be mapped: HOST_ERROR.
    let small = MemfdRam::new(0, 0x1000).unwrap();
    let err = qemu
        .frontend()
        .call(&FrontendRequest::AddMemReg(
            MemRegion {
                gpa: 0,
                size: 0x10_0000,
                mmap_offset: 0,
            },
            small.fd().unwrap(),
        ))
        .unwrap_err();
    assert_eq!(remote_status_of(&err), Some(Status::HOST_ERROR), "{err:?}");
    // An interrupt "eventfd" that is a memfd: INVALID_MESSAGE, and nothing is written to it.
    let not_eventfd = MemfdRam::new(0, 0x1000).unwrap();
    let err = qemu
        .frontend()
        .call(&FrontendRequest::SetIrqFd {
            index: IrqIndex::Gerror,
            fd: Some(not_eventfd.fd().unwrap()),
        })
        .unwrap_err();
    assert_eq!(
        remote_status_of(&err),
        Some(Status::INVALID_MESSAGE),
        "{err:?}"
    );
    qemu.frontend()
        .call(&FrontendRequest::SetIrqFd {
            index: IrqIndex::Gerror,
            fd: Some(eventfd()),
        })
        .expect("a real eventfd is accepted");
    // Overlapping regions: the second is refused.
    let r = MemfdRam::new(0, 0x2000).unwrap();
    qemu.frontend()
        .call(&FrontendRequest::AddMemReg(r.region(), r.fd().unwrap()))
        .unwrap();
    let err = qemu
        .frontend()
        .call(&FrontendRequest::AddMemReg(
            MemRegion {
                gpa: 0x1000,
                size: 0x1000,
                mmap_offset: 0,
            },
            r.fd().unwrap(),
        ))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Remote {
                status: Status::INVALID_ARGUMENT,
                ..
            }
        ),
        "{err:?}"
    );
    // REM_MEM_REG must match gpa, size and mmap_offset: the region added at offset 0 is not
    // removed by a description with offset 0x1000 (section 8.2), and stays usable.
    let err = qemu
        .frontend()
        .call(&FrontendRequest::RemMemReg(MemRegion {
            gpa: 0,
            size: 0x2000,
            mmap_offset: 0x1000,
        }))
        .unwrap_err();
    assert_eq!(remote_status_of(&err), Some(Status::NOT_FOUND), "{err:?}");
    let err = qemu
        .frontend()
        .call(&FrontendRequest::AddMemReg(r.region(), r.fd().unwrap()))
        .unwrap_err();
    assert_eq!(
        remote_status_of(&err),
        Some(Status::INVALID_ARGUMENT),
        "the region is still mapped: {err:?}"
    );
    // Removing a region that is not there: NOT_FOUND.
    let err = qemu
        .frontend()
        .call(&FrontendRequest::RemMemReg(MemRegion {
            gpa: 0x10_0000,
            size: 0x1000,
            mmap_offset: 0,
        }))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Remote {
                status: Status::NOT_FOUND,
                ..
            }
        ),
        "{err:?}"
    );
    // More devices than the backend serves: NO_SPACE, and the session goes on.
    qemu.frontend()
        .call(&FrontendRequest::SetConfig(default_config()))
        .unwrap();
    for handle in 0..256u32 {
        qemu.attach(1000 + handle, handle).unwrap();
    }
    let err = qemu.attach(2000, 0x300).unwrap_err();
    assert_eq!(remote_status(&err), Some(Status::NO_SPACE), "{err:#}");
    for handle in 0..256u32 {
        qemu.detach(1000 + handle).unwrap();
    }
    // The same handle twice: EXISTS.
    qemu.attach(1, 8).unwrap();
    let err = qemu.attach(1, 9).unwrap_err();
    assert_eq!(remote_status(&err), Some(Status::EXISTS), "{err:#}");
    // TRANSLATE for a SID no STE covers (beyond SIDSIZE with SMMUEN = 0 bypasses; the answer
    // is architectural, not a protocol error).
    let reply = qemu
        .frontend()
        .call(&FrontendRequest::Translate(
            viommu_protocol::TranslateRequest {
                sid: u32::MAX,
                ssid: None,
                iova: 0x1000,
                access: Access::READ,
            },
        ))
        .unwrap();
    assert!(matches!(reply, FrontendReply::Translate(_)), "{reply:?}");
    qemu.close().unwrap();

    // A peer that stops in the middle of a message.
    let mut s = daemon.raw();
    s.write_all(&[5, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0, 1, 2])
        .unwrap();
    drop(s);
    // A payload size past the cap.
    let mut s = daemon.raw();
    s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])
        .unwrap();
    drop(s);

    daemon.assert_alive();
    let mut qemu = daemon.connect();
    let report = scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
    assert_eq!(report.events.len(), 2);
    qemu.close().unwrap();
    daemon.assert_alive();
}

#[test]
fn no_fd_leak_in_the_daemon_after_many_sessions() {
    let mut daemon = Daemon::start("leak");
    // One session first: the daemon's steady state (logger, epoll) is set up.
    let mut qemu = daemon.connect();
    scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
    qemu.close().unwrap();
    let settle = |daemon: &mut Daemon| {
        // The daemon releases a session's fds when it sees the hang-up; give it a moment.
        let mut last = daemon.fds();
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(10));
            let now = daemon.fds();
            if now == last {
                break;
            }
            last = now;
        }
        last
    };
    let baseline = settle(&mut daemon);
    for _ in 0..20 {
        let mut qemu = daemon.connect();
        scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
        qemu.close().unwrap();
        // And a broken one, with fds in flight.
        let mut broken = daemon.connect();
        broken.negotiate().unwrap();
        broken.start(default_config(), 0x10_0000).unwrap();
        drop(broken);
    }
    // Wait until the daemon accepted again (its listening state).
    let probe = daemon.connect();
    probe.close().unwrap();
    assert_eq!(
        settle(&mut daemon),
        baseline,
        "fds leaked across 40 sessions"
    );
}

/// With the shared region, a second device, with UNMAP_NOTIFY, on `dev`'s STE (copied to its
/// own SID): the frontend keeps its translations and hears of their invalidation by message.
/// Returns the device whose translations the frontend keeps (`dev` itself without the region)
/// and the one whose translations only the backend's shared cache holds (none without).
fn keeper_of(qemu: &mut MockQemu, d: &mut Guest, dev: Device) -> (u32, Option<u32>) {
    if qemu.shared().is_none() {
        return (dev.handle, None);
    }
    let twin = DEVICES[1];
    assert_ne!(twin.handle, dev.handle);
    qemu.attach(twin.handle, twin.sid).unwrap();
    qemu.update_device(twin.handle, DeviceFlags::UNMAP_NOTIFY)
        .unwrap();
    let ste = d.read_ste(dev.sid).unwrap();
    d.write_ste(twin.sid, &ste).unwrap();
    (twin.handle, Some(dev.handle))
}

/// IOTLB_INVALIDATE goes only where the frontend may have cached a TRANSLATE answer,
/// coalesced, each page whole. With the shared region the device without UNMAP_NOTIFY needs
/// none: the same TLBIs clear its entries in the backend's cache.
#[test]
fn invalidations_reach_the_frontend_only_for_what_it_may_have_cached() {
    let daemon = Daemon::start("handedout");
    let mut qemu = started(&daemon);
    let dev = DEVICES[0];
    qemu.attach(dev.handle, dev.sid).unwrap();
    let mut d = guest_on(&mut qemu);
    d.reset().unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    let buf = d.alloc_zeroed(0x40000, 0x1000).unwrap();
    d.map_range(&pt, dev.iova, buf, 0x40000, prot::RW).unwrap();
    let domain = d.attach_s1(dev.sid, pt, dev.asid).unwrap();
    let (keeper, other) = keeper_of(&mut qemu, &mut d, dev);
    let handles: Vec<u32> = std::iter::once(keeper).chain(other).collect();
    let page = |i: u64| dev.iova + i * 0x1000;
    let held = |q: &MockQemu, i: u64| {
        handles
            .iter()
            .filter(|&&h| q.holds_translation(h, None, page(i), Access::READ))
            .count()
    };
    let messages = |q: &MockQemu| invalidations(&q.channel_state().log);
    let before = messages(&qemu);
    // Nothing translated yet: a TLBI of everything needs no message.
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAll { vmid: 0 })
        .unwrap();
    assert_eq!(messages(&qemu), before);
    // Two pages translated by each device (and cached).
    for i in [0u64, 5] {
        for &h in &handles {
            qemu.translate(h, None, page(i), Access::READ).unwrap();
        }
        assert_eq!(held(&qemu, i), handles.len(), "page {i}");
    }
    assert_eq!(qemu.channel_state().cache.len(), 2, "the keeper's");
    // Unmapping 64 pages of which the frontend cached two: the 64 TLBIs reach it as one
    // message, and both cached pages go.
    let cmds: Vec<CmdEnt> = (0..64u64)
        .map(|i| {
            CmdEnt::TlbiNhVa(viommu_tests::guest::cmd::Tlbi {
                asid: domain.asid,
                addr: page(i),
                leaf: true,
                ..Default::default()
            })
        })
        .collect();
    d.issue_cmds_with_sync(&cmds).unwrap();
    assert_eq!(
        messages(&qemu),
        before + 1,
        "one coalesced message: {:x?}",
        qemu.channel_state().log
    );
    assert!(qemu.channel_state().cache.is_empty());
    for i in 0..64u64 {
        assert_eq!(held(&qemu, i), 0, "page {i} still cached");
    }
    // The message covers the 64 pages the guest invalidated, each whole (issue 12: not the
    // one byte at each TLBI's address).
    let last_inv = qemu.channel_state().log.iter().rev().find_map(|n| match n {
        Notification::Invalidate { inv, .. } => Some(*inv),
        _ => None,
    });
    let inv = last_inv.unwrap();
    assert_eq!((inv.start, inv.last), (page(0), page(64) - 1));
    // The same again: nothing is cached any more, so no message.
    d.issue_cmds_with_sync(&cmds).unwrap();
    assert_eq!(messages(&qemu), before + 1);
    // A page outside the invalidated range stays cached through an unrelated TLBI.
    for &h in &handles {
        qemu.translate(h, None, page(0x3f), Access::READ).unwrap();
    }
    d.issue_cmds_with_sync(&cmds[..8]).unwrap();
    assert_eq!(messages(&qemu), before + 1);
    assert_eq!(qemu.channel_state().cache.len(), 1);
    assert_eq!(held(&qemu, 0x3f), handles.len());
    assert!(d.port.take_error().is_none());
    qemu.close().unwrap();
}

#[test]
fn model_options_bound_what_a_frontend_may_configure() {
    let dir = std::env::temp_dir().join(format!("viommu-session-{}-limits", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vsmmu.sock");
    let process = BackendProcess::spawn_with(
        &backend_binary_built().unwrap(),
        &socket,
        &[
            "--log-level",
            "error",
            "--max-oas-bits",
            "40",
            "--disable-feature",
            "stage2,ats",
        ],
    )
    .unwrap();
    let mut qemu = MockQemu::connect(&socket, Duration::from_secs(10)).unwrap();
    qemu.negotiate().unwrap();
    let refused = |cfg: viommu_protocol::ModelConfig| match qemu
        .frontend()
        .call(&FrontendRequest::SetConfig(cfg))
    {
        Err(Error::Remote {
            status: Status::INVALID_ARGUMENT,
            message,
            ..
        }) => message,
        other => panic!("{other:?}"),
    };
    let wide = refused(default_config());
    assert!(wide.contains("--max-oas-bits"), "{wide}");
    let s2 = refused(viommu_protocol::ModelConfig {
        oas_bits: 40,
        flags: default_config().flags | viommu_protocol::ConfigFlags::STAGE2,
        ..default_config()
    });
    assert!(s2.contains("--disable-feature stage2"), "{s2}");
    // Within the limits: accepted, and the guest sees a 40-bit OAS (IDR5.OAS = 2).
    qemu.frontend()
        .call(&FrontendRequest::SetConfig(viommu_protocol::ModelConfig {
            oas_bits: 40,
            ..default_config()
        }))
        .unwrap();
    let idr5 = qemu.id_regs().unwrap().idr[5];
    assert_eq!(idr5 & 7, 2, "IDR5 {idr5:#x}");
    qemu.close().unwrap();
    drop(process);
    let _ = std::fs::remove_dir_all(&dir);
}

/// libvirt's way of starting a helper (as for vhost-user-gpu): a socketpair, the daemon gets
/// one end as `--fd N`, QEMU the other. The whole Linux-like session runs over it, under the
/// sandbox, and the daemon exits when its frontend goes.
#[test]
fn launched_the_libvirt_way_with_an_inherited_socketpair() {
    use std::os::fd::AsRawFd;
    let (ours, theirs) = UnixStream::pair().unwrap();
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty()).unwrap();
    let mut child = std::process::Command::new(backend_binary_built().unwrap())
        .args([
            "--fd",
            &theirs.as_raw_fd().to_string(),
            "--log-level",
            "error",
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(theirs);
    let mut qemu = MockQemu::from_stream(ours);
    let report = scenario::linux_session(&mut qemu, &mut |_| {}).unwrap();
    assert_eq!(report.events.len(), 2);
    qemu.close().unwrap();
    assert!(
        child.wait().unwrap().success(),
        "exits cleanly after its frontend"
    );
}

fn remote_status_of(err: &Error) -> Option<Status> {
    match err {
        Error::Remote { status, .. } => Some(*status),
        _ => None,
    }
}

fn eventfd() -> std::os::fd::OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
}

/// Issue 12, defect 1: a frontend that shrinks its (unsealable) guest RAM file under the
/// daemon, which then reads the stream table there, loses its session; the daemon, under its
/// default seccomp sandbox, lives and serves the next frontend.
#[test]
fn a_frontend_that_truncates_guest_ram_loses_its_session_not_the_daemon() {
    let mut daemon = Daemon::start("truncate");
    let mut qemu = daemon.connect();
    qemu.negotiate().unwrap();
    let ram = MemfdRam::unsealed(0, RAM_SIZE).unwrap();
    let file = ram.fd().unwrap();
    qemu.start_on(default_config(), ram).unwrap();
    qemu.attach(1, 8).unwrap();
    let mut d = guest_on(&mut qemu);
    d.reset().unwrap();
    drop(d);
    rustix::fs::ftruncate(&file, 0).unwrap();
    // The daemon fetches STE(8) from the lost pages: the session ends without an answer.
    let err = qemu
        .frontend()
        .call(&FrontendRequest::Translate(
            viommu_protocol::TranslateRequest {
                sid: 8,
                ssid: None,
                iova: 0x1000,
                access: Access::READ,
            },
        ))
        .unwrap_err();
    assert!(err.is_fatal(), "the connection is closed: {err:?}");
    daemon.assert_alive();
    // The next frontend gets a whole Linux session.
    let mut next = daemon.connect();
    scenario::linux_session(&mut next, &mut |_| {}).unwrap();
    next.close().unwrap();
    daemon.assert_alive();
}

/// Issue 12, defect 2: a frontend that does not acknowledge the SET_ADDRESS_SPACE of an
/// ATTACH_DEVICE within the peer timeout gets INTERNAL for the attach, and the session ends
/// (the backend channel is out of step: the frontend may hold an address space the backend
/// no longer stands by). Nothing of the device is left; the next frontend is served.
#[test]
fn an_attach_whose_announcement_goes_unanswered_fails_and_leaves_nothing() {
    let mut daemon = Daemon::start("attach-timeout");
    let raw = daemon.connect();
    let main = raw.frontend();
    main.call(&FrontendRequest::GetFeatures).unwrap();
    main.call(&FrontendRequest::SetFeatures(
        viommu_protocol::Features::BACKEND_CHANNEL | viommu_protocol::Features::TRANSLATE,
    ))
    .unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    main.call(&FrontendRequest::SetBackendChannel(theirs))
        .unwrap();
    main.call(&FrontendRequest::SetConfig(viommu_protocol::ModelConfig {
        flags: default_config().flags - viommu_protocol::ConfigFlags::MSI,
        ..default_config()
    }))
    .unwrap();
    let err = main
        .call(&FrontendRequest::AttachDevice(
            viommu_protocol::AttachDevice {
                handle: 1,
                sid: 8,
                passthrough: None,
            },
        ))
        .unwrap_err();
    assert_eq!(remote_status_of(&err), Some(Status::INTERNAL), "{err:?}");
    // The announcement was sent, and never answered.
    let raw = viommu_protocol::socket::recv_message(&ours).unwrap();
    assert_eq!(raw.header.request, 1, "SET_ADDRESS_SPACE");
    // The session is over.
    let err = main.call(&FrontendRequest::GetFeatures).unwrap_err();
    assert!(err.is_fatal(), "{err:?}");
    daemon.assert_alive();
    let mut next = started(&daemon);
    next.attach(1, 8).unwrap();
    next.close().unwrap();
}

/// A TLBI by address without a range (TG = 0) invalidates the translation that contains the
/// address, whatever its size: with a 64 KiB granule the frontend hears of the whole 64 KiB
/// page (issue 12), so an IOMMU notifier that unmaps exactly `[start, last]` drops all of it.
/// With the shared region, the backend's cache loses every page of it too.
#[test]
fn a_tlbi_by_address_invalidates_the_whole_translation_around_it() {
    let daemon = Daemon::start("tlbi-va-64k");
    let mut qemu = started(&daemon);
    let dev = DEVICES[0];
    qemu.attach(dev.handle, dev.sid).unwrap();
    let mut d = guest_on(&mut qemu);
    d.reset().unwrap();
    let pt = d.new_s1_pgtable(Granule::G64K).unwrap();
    let buf = d.alloc_zeroed(0x10000, 0x10000).unwrap();
    let iova = 0x8000_0000u64;
    d.map(&pt, iova, buf, 0x10000, prot::RW).unwrap();
    let domain = d.attach_s1(dev.sid, pt, dev.asid).unwrap();
    let (keeper, other) = keeper_of(&mut qemu, &mut d, dev);
    let handles: Vec<u32> = std::iter::once(keeper).chain(other).collect();
    for &h in &handles {
        qemu.translate(h, None, iova + 0x4321, Access::READ)
            .unwrap();
    }
    // Each device's translation is cached: the shared cache enters it in the slot of the page
    // asked for (and maybe of others, prefetched). The TLBI's address is in another page.
    for &h in &handles {
        assert!(qemu.holds_translation(h, None, iova + 0x4000, Access::READ));
    }
    let held = |q: &MockQemu| {
        (0..16u64)
            .flat_map(|p| handles.iter().map(move |&h| (h, iova + p * 0x1000)))
            .filter(|&(h, a)| q.holds_translation(h, None, a, Access::READ))
            .count()
    };
    let before = qemu.channel_state().log.len();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhVa(viommu_tests::guest::cmd::Tlbi {
        asid: domain.asid,
        addr: iova + 0x3000,
        leaf: true,
        ..Default::default()
    }))
    .unwrap();
    let invs: Vec<_> = qemu.channel_state().log[before..]
        .iter()
        .filter_map(|n| match n {
            Notification::Invalidate { inv, dropped } => Some((inv.start, inv.last, *dropped)),
            _ => None,
        })
        .collect();
    assert_eq!(invs, vec![(iova, iova + 0xffff, 1)]);
    assert_eq!(held(&qemu), 0, "a page of the block is still cached");
    assert!(d.port.take_error().is_none());
    qemu.close().unwrap();
}

/// An unknown request code: with NEED_REPLY it gets UNKNOWN_REQUEST and the session goes on;
/// without, the daemon cannot know whether the sender waits for a reply, and closes the
/// connection (docs/protocol.md, section 3). The daemon serves the next frontend either way.
#[test]
fn an_unknown_request_is_answered_only_with_need_reply() {
    let mut daemon = Daemon::start("unknown");
    let first = daemon.connect();
    let raw = first.frontend().stream();
    // Request 99, NEED_REPLY (flags 0x9), no payload.
    (&*raw)
        .write_all(&[99, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let reply = viommu_protocol::socket::recv_message(raw).unwrap();
    assert_eq!(reply.header.request, 99);
    assert_eq!(
        reply.payload.get(..4).unwrap(),
        &2u32.to_le_bytes(),
        "UNKNOWN_REQUEST"
    );
    first
        .frontend()
        .call(&FrontendRequest::GetFeatures)
        .expect("the session goes on");
    // Request 99 without NEED_REPLY: the connection closes.
    (&*raw)
        .write_all(&[99, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    let err = viommu_protocol::socket::recv_message(raw).unwrap_err();
    assert!(err.is_fatal(), "{err:?}");
    daemon.assert_alive();
    started(&daemon).close().unwrap();
}
