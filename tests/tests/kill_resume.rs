//! kill -9 of the daemon at points of a Linux-like session (docs/protocol.md, 10.10): a new
//! daemon on the same socket resumes the vSMMU from the shared region the mock QEMU kept, and
//! the session completes with the same results as the same session run without the kill.
//!
//! Each test runs its steps twice, on two daemons: once uninterrupted (the control), once with
//! the daemon killed at the test's point (SIGKILL, no clean-up) and a new one resumed. The
//! guest then runs the same tail on both (an unmap, translations of every page, the event
//! queue read), and what it observed must be equal.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};
use viommu_protocol::shared::Answer;
use viommu_protocol::types::{IrqIndex, TranslateReply, TranslateRequest};
use viommu_protocol::{Access, Perm};
use viommu_tests::guest::cmd::{CmdEnt, Tlbi};
use viommu_tests::guest::domain::S1Domain;
use viommu_tests::guest::event::Event;
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::scenario::{MockGuest, RAM_SIZE, default_config, probed_guest};
use viommu_tests::{Dma, MockQemu, PrivateDaemon};

const HANDLE: u32 = 3;
const SID: u32 = 0x18;
const IOVA: u64 = 0x4_0000_0000;
const PAGES: u64 = 8;

/// A guest with its SMMU probed and enabled, one device in a stage-1 domain with 8 pages
/// mapped, another device attached with no domain.
struct World {
    daemon: PrivateDaemon,
    qemu: MockQemu,
    d: MockGuest,
    domain: S1Domain,
    pages: Vec<u64>,
}

/// What the guest observed in the tail.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    translations: Vec<Dma>,
    events: Vec<Event>,
    overflow: bool,
}

fn world(name: &str) -> World {
    let daemon = PrivateDaemon::start(name).unwrap();
    let mut qemu = daemon.connect().unwrap().with_shared_region(true);
    qemu.negotiate().unwrap();
    qemu.start(default_config(), RAM_SIZE).unwrap();
    assert!(qemu.shared().is_some_and(|s| s.translates()));
    let mut d = probed_guest(&qemu, RAM_SIZE).unwrap();
    d.reset().unwrap();
    qemu.attach(HANDLE, SID).unwrap();
    qemu.attach(4, 0x20).unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    let mut pages = Vec::new();
    for i in 0..PAGES {
        let pa = d.alloc_zeroed(0x1000, 0x1000).unwrap();
        d.map(&pt, IOVA + i * 0x1000, pa, 0x1000, prot::RW).unwrap();
        pages.push(pa);
    }
    let domain = d.attach_s1(SID, pt, 7).unwrap();
    // Translations cached in the region (and prefetched around).
    assert!(matches!(
        qemu.translate(HANDLE, None, IOVA, Access::READ).unwrap(),
        Dma::Address { .. }
    ));
    World {
        daemon,
        qemu,
        d,
        domain,
        pages,
    }
}

fn pid(daemon: &mut PrivateDaemon) -> Pid {
    Pid::from_raw(i32::try_from(daemon.process().unwrap().pid()).unwrap()).unwrap()
}

impl World {
    /// Stops the daemon (SIGSTOP): what the guest does next waits in the region.
    fn freeze(&mut self) {
        kill_process(pid(&mut self.daemon), Signal::STOP).unwrap();
    }

    /// SIGKILL, a new daemon on the same socket, and the session resumed on it.
    fn kill_and_resume(&mut self) {
        self.daemon.kill_and_restart().unwrap();
        let old = std::mem::replace(
            &mut self.qemu,
            MockQemu::from_stream(std::os::unix::net::UnixStream::pair().unwrap().0),
        );
        self.qemu = old.resume_on(self.daemon.socket()).unwrap();
        self.d.port = self.qemu.port();
    }

    /// The tail every test ends with: page 2 unmapped with TLBI + CMD_SYNC, every page and
    /// one beyond translated, and the event queue read.
    fn tail(&mut self) -> Outcome {
        self.domain
            .pt
            .unmap(&self.d.mem, IOVA + 2 * 0x1000)
            .unwrap();
        self.d
            .issue_cmd_with_sync(CmdEnt::TlbiNhVa(Tlbi {
                asid: self.domain.asid,
                addr: IOVA + 2 * 0x1000,
                leaf: true,
                ..Tlbi::default()
            }))
            .unwrap();
        let translations = (0..=PAGES)
            .map(|i| {
                let dma = self
                    .qemu
                    .translate(HANDLE, None, IOVA + i * 0x1000 + 0x30, Access::READ)
                    .unwrap();
                // Where it came from (cache or request) is not part of the result.
                match dma {
                    Dma::Address { gpa, .. } => Dma::Address { gpa, cached: false },
                    other => other,
                }
            })
            .collect();
        let batch = self.d.evtq_thread().unwrap();
        assert!(self.d.port.take_error().is_none());
        Outcome {
            translations,
            events: batch.events,
            overflow: batch.overflow,
        }
    }
}

/// Runs `middle` on an uninterrupted world and on one where `kill` happens at its point, and
/// checks that both tails observe the same.
fn same_as_uninterrupted(name: &str, middle: impl Fn(&mut World, bool)) -> World {
    let mut control = world(&format!("{name}-control"));
    middle(&mut control, false);
    let expected = control.tail();
    let mut killed = world(&format!("{name}-killed"));
    middle(&mut killed, true);
    let got = killed.tail();
    assert_eq!(got, expected);
    // The tail's translations are the mapping's: the test saw the vSMMU work.
    assert_eq!(
        expected.translations[0],
        Dma::Address {
            gpa: killed.pages[0] + 0x30,
            cached: false
        }
    );
    assert!(matches!(expected.translations[2], Dma::Fault { .. }));
    killed
}

#[test]
fn killed_while_idle() {
    let w = same_as_uninterrupted("idle", |w, kill| {
        if kill {
            let blob = w.qemu.get_state().unwrap();
            w.kill_and_resume();
            // A resumed vSMMU takes no SET_STATE, even before the guest touched it again.
            let err = w.qemu.set_state(&blob).unwrap_err();
            assert!(
                matches!(
                    err.downcast_ref::<viommu_protocol::Error>(),
                    Some(viommu_protocol::Error::Remote { status, message, .. })
                        if *status == viommu_protocol::Status::BAD_STATE
                            && message.contains("resumed")
                ),
                "{err:#}"
            );
        }
    });
    assert!(w.qemu.shared().unwrap().sent().posted > 0);
}

/// Before a CMD_SYNC: a TLBI of an unmapped page posted in the ring while the daemon is stopped;
/// the new daemon applies it, and the guest's CMD_SYNC after it completes.
#[test]
fn killed_with_a_doorbell_in_the_ring() {
    same_as_uninterrupted("doorbell", |w, kill| {
        w.domain.pt.unmap(&w.d.mem, IOVA + 5 * 0x1000).unwrap();
        if kill {
            w.freeze();
        }
        w.d.issue_cmds(&[CmdEnt::TlbiNhVa(Tlbi {
            asid: w.domain.asid,
            addr: IOVA + 5 * 0x1000,
            leaf: true,
            ..Tlbi::default()
        })])
        .unwrap();
        if kill {
            w.kill_and_resume();
        }
        w.d.sync().unwrap();
        assert!(matches!(
            w.qemu
                .translate(HANDLE, None, IOVA + 5 * 0x1000, Access::READ)
                .unwrap(),
            Dma::Fault { .. }
        ));
    });
}

/// During a CMD_SYNC: the TLBI and its CMD_SYNC posted together (the sync's completion not yet
/// signalled when the daemon dies); the new daemon executes both, and the guest sees the sync
/// complete.
#[test]
fn killed_with_a_sync_in_flight() {
    same_as_uninterrupted("sync", |w, kill| {
        w.domain.pt.unmap(&w.d.mem, IOVA + 6 * 0x1000).unwrap();
        if kill {
            w.freeze();
        }
        // The CMD_SYNC signals by MSI into its own slot, as Linux's does; the guest waits for
        // a second one after the resume.
        w.d.issue_cmds(&[
            CmdEnt::TlbiNhVa(Tlbi {
                asid: w.domain.asid,
                addr: IOVA + 6 * 0x1000,
                leaf: true,
                ..Tlbi::default()
            }),
            CmdEnt::linux_sync(0),
        ])
        .unwrap();
        if kill {
            w.kill_and_resume();
        }
        w.d.sync().unwrap();
    });
}

/// During an ATTACH: the daemon dies before it answers; the frontend replays the devices it
/// had and attaches the new one on the resumed session.
#[test]
fn killed_during_an_attach() {
    same_as_uninterrupted("attach", |w, kill| {
        if kill {
            w.freeze();
            let pid = pid(&mut w.daemon);
            let killer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                kill_process(pid, Signal::KILL).unwrap();
            });
            assert!(w.qemu.attach(5, 0x28).is_err(), "the daemon died first");
            killer.join().unwrap();
            w.kill_and_resume();
        }
        w.qemu.attach(5, 0x28).unwrap();
    });
}

/// With events pending: a fault recorded in the guest's event queue that the guest has not
/// read when the daemon dies. The resumed daemon signals the event queue's interrupt again.
#[test]
fn killed_with_events_pending() {
    let w = same_as_uninterrupted("events", |w, kill| {
        // Page 8 is not mapped: F_TRANSLATION recorded.
        assert!(matches!(
            w.qemu
                .translate(HANDLE, None, IOVA + 8 * 0x1000, Access::WRITE)
                .unwrap(),
            Dma::Fault { event: 0x10 }
        ));
        if kill {
            w.kill_and_resume();
            assert!(
                w.qemu.take_irqs(IrqIndex::Evtq) > 0,
                "the event queue's interrupt signalled again"
            );
        }
    });
    let _ = w;
}

/// With a translation request outstanding: the daemon dies before it answers; the new daemon
/// answers it from the region.
#[test]
fn killed_with_a_translation_request_outstanding() {
    let expected = |w: &World| -> Answer {
        Ok(TranslateReply::Translated {
            addr: w.pages[3],
            addr_mask: 0xfff,
            perm: Perm::READ | Perm::WRITE,
        })
    };
    same_as_uninterrupted("request", |w, kill| {
        let shared = w.qemu.shared().unwrap().clone();
        if kill {
            w.freeze();
        }
        shared.post_request(&TranslateRequest {
            sid: SID,
            ssid: None,
            iova: IOVA + 3 * 0x1000,
            access: Access::READ,
        });
        if kill {
            assert_eq!(
                shared.answer_now().unwrap(),
                None,
                "a stopped daemon answered"
            );
            w.kill_and_resume();
        }
        assert_eq!(shared.wait_answer().unwrap(), expected(w));
    });
}

/// RESUME where 10.10 refuses it: without the feature, before SET_CONFIG, from a region no
/// backend published into (ID registers 0: another vSMMU), after the guest ran.
#[test]
fn resume_is_refused_where_the_protocol_says() {
    use viommu_protocol::{Features, FrontendRequest, Status};
    let daemon = PrivateDaemon::start("resume-refused").unwrap();
    let status = |qemu: &MockQemu, call: bool| {
        let (_, fds) = viommu_tests::shared::SharedFrontend::create(call).unwrap();
        match qemu.frontend().call(&FrontendRequest::SetSharedRegion {
            region: fds.region,
            kick: fds.kick,
            call: fds.call,
            resume: true,
        }) {
            Err(viommu_protocol::Error::Remote { status, .. }) => status,
            other => panic!("{other:?}"),
        }
    };
    // Without RESUME negotiated.
    let mut qemu = daemon
        .connect()
        .unwrap()
        .with_shared_region(true)
        .with_usable_features(viommu_tests::FRONTEND_FEATURES.difference(Features::RESUME));
    qemu.negotiate().unwrap();
    assert_eq!(status(&qemu, true), Status::NOT_NEGOTIATED);
    qemu.close().unwrap();
    // Before SET_CONFIG (NEGOTIATED).
    let mut qemu = daemon.connect().unwrap().with_shared_region(true);
    qemu.negotiate().unwrap();
    assert_eq!(status(&qemu, true), Status::BAD_STATE);
    qemu.close().unwrap();
    // A region nobody published into: its ID registers are not this vSMMU's.
    let mut qemu = daemon.connect().unwrap().with_shared_region(true);
    assert!(qemu.negotiate().unwrap().contains(Features::RESUME));
    qemu.start_leaving_region(default_config(), RAM_SIZE)
        .unwrap();
    assert_eq!(status(&qemu, true), Status::INCOMPATIBLE);
    // After the guest ran (an ID register read), no resume at all.
    qemu.id_regs().unwrap();
    assert_eq!(status(&qemu, true), Status::BAD_STATE);
    // The daemon is fine.
    qemu.close().unwrap();
    let mut qemu = daemon.connect().unwrap().with_shared_region(true);
    qemu.negotiate().unwrap();
    qemu.start(default_config(), RAM_SIZE).unwrap();
    assert_eq!(
        status(&qemu, true),
        Status::BAD_STATE,
        "a region is set already"
    );
    qemu.close().unwrap();
}
