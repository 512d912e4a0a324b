//! Passthrough devices: whole sessions through the daemon's event loop, the mock QEMU peer on
//! the other end of a real socket, and the host double standing in for Linux iommufd (a memfd
//! stands in for the iommufd and for each VFIO cdev).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use viommu_backend::daemon::{self, Options, Shutdown};
use viommu_backend::host::double::{HostDouble, NESTING_HW};
use viommu_backend::host::{
    HostDevice, HostError, HostIommu, HwInfo, InvalidateError, ObjectId, RawCmd, VEvent, VSte,
};
use viommu_backend::session::SessionOptions;
use viommu_backend::session::host_objects::{ABORT_VSTE, BYPASS_VSTE};
use viommu_protocol::{Access, AddressSpace, ConfigFlags, Error, ModelConfig, Status};
use viommu_tests::guest::cmd::{CmdEnt, Tlbi};
use viommu_tests::guest::event::id;
use viommu_tests::guest::pgtable::{Granule, prot};
use viommu_tests::guest::regs::{
    ARM_SMMU_CR0, ARM_SMMU_CR0ACK, CR0_CMDQEN, CR0_EVTQEN, CR0_SMMUEN, GBPA_ABORT,
};
use viommu_tests::guest::{BumpAllocator, Driver, DriverConfig};
use viommu_tests::port::SocketPort;
use viommu_tests::scenario::{ALLOC_START, RAM_SIZE};
use viommu_tests::{Dma, MockQemu};

/// The double, shared between the test and the daemon's session.
#[derive(Debug, Clone)]
struct Shared(Arc<Mutex<HostDouble>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HostDouble> {
        self.0.lock().unwrap()
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
        fd: BorrowedFd<'_>,
        out: &mut Vec<VEvent>,
    ) -> Result<usize, HostError> {
        self.lock().read_vevents(q, fd, out)
    }
    fn destroy(&mut self, id: ObjectId) -> Result<(), HostError> {
        self.lock().destroy(id)
    }
}

/// Devices the "frontend" bound: iommufd device IDs and their physical StreamIDs.
const DEV_A: u32 = 100;
const DEV_B: u32 = 101;
/// The guest's StreamIDs for them.
const SID_A: u32 = 0x10;
const SID_B: u32 = 0x18;

struct Rig {
    qemu: MockQemu,
    host: Shared,
    s2: ObjectId,
    daemon: Option<JoinHandle<()>>,
    _stop: OwnedFd,
}

fn auto_config() -> ModelConfig {
    ModelConfig {
        flags: ConfigFlags::IDR_AUTO | ConfigFlags::STAGE1 | ConfigFlags::MSI,
        oas_bits: 0,
        ssid_bits: 0,
        sid_bits: 16,
        cmdq_log2: 19,
        evtq_log2: 19,
    }
}

fn memfd() -> OwnedFd {
    rustix::fs::memfd_create("stand-in", rustix::fs::MemfdFlags::CLOEXEC).unwrap()
}

fn rig_with(config: ModelConfig) -> Rig {
    rig_within(config, viommu_tests::FRONTEND_FEATURES)
}

/// The daemon's event loop on a thread, serving one connection with `host` as its iommufd.
fn spawn_daemon(host: &Shared) -> (UnixStream, JoinHandle<()>, OwnedFd) {
    let factory_host = host.clone();
    let options = Options {
        busy_poll: Duration::ZERO,
        ring_poll: Duration::ZERO,
        session: SessionOptions {
            host: Arc::new(move |_fd| Ok(Box::new(factory_host.clone()) as Box<dyn HostIommu>)),
            ..SessionOptions::default()
        },
    };
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (shutdown, stop) = Shutdown::manual().unwrap();
    let daemon = std::thread::spawn(move || {
        daemon::serve_connection(theirs, &shutdown, &options).unwrap();
    });
    (ours, daemon, stop)
}

fn rig_within(config: ModelConfig, features: viommu_protocol::Features) -> Rig {
    rig_on(config, features, viommu_tests::shared::wanted_by_default())
}

/// A rig whose frontend sets up the shared region, so that a killed backend can be resumed.
fn resumable_rig() -> Rig {
    rig_on(auto_config(), viommu_tests::FRONTEND_FEATURES, true)
}

fn rig_on(config: ModelConfig, features: viommu_protocol::Features, shared: bool) -> Rig {
    let mut double = HostDouble::new(NESTING_HW);
    double.add_device(DEV_A, 0x500, None).unwrap();
    double.add_device(DEV_B, 0x501, None).unwrap();
    let s2 = double.alloc_s2_hwpt(0).unwrap();
    let host = Shared(Arc::new(Mutex::new(double)));
    let (ours, daemon, stop) = spawn_daemon(&host);
    let mut qemu = MockQemu::from_stream(ours).with_shared_region(shared);
    qemu.negotiate_within(features).unwrap();
    qemu.start(config, RAM_SIZE).unwrap();
    qemu.set_iommufd(memfd()).unwrap();
    Rig {
        qemu,
        host,
        s2,
        daemon: Some(daemon),
        _stop: stop,
    }
}

fn rig() -> Rig {
    rig_with(auto_config())
}

impl Rig {
    fn attach(&mut self, handle: u32, sid: u32, dev: u32) {
        self.qemu
            .attach_passthrough(handle, sid, dev, self.s2, memfd())
            .unwrap();
    }

    fn guest(&self) -> Driver<SocketPort, vm_memory::GuestMemoryMmap<()>> {
        Driver::probe(
            self.qemu.port(),
            self.qemu.mem().unwrap().clone(),
            BumpAllocator::new(ALLOC_START, RAM_SIZE),
            DriverConfig::default(),
        )
        .unwrap()
    }

    /// Device A attached, the guest booted, and a stage-1 domain (ASID 7) on device A's stream.
    fn booted(&mut self) -> Driver<SocketPort, vm_memory::GuestMemoryMmap<()>> {
        self.attach(1, SID_A, DEV_A);
        let mut d = self.guest();
        d.reset().unwrap();
        let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
        d.attach_s1(SID_A, pt, 7).unwrap();
        d
    }

    /// The vSTE of the HWPT `dev` is attached to.
    fn vste(&self, dev: u32) -> VSte {
        let host = self.host.lock();
        let hwpt = host.attached(dev).expect("attached");
        host.nested_ste(hwpt).expect("a nested HWPT")
    }

    /// Stops the backend as SIGTERM does (the VM goes on), waits for it, and starts a new
    /// backend on the same iommufd; the frontend connects to it as QEMU reconnects.
    fn restart(mut self) -> Rig {
        rustix::io::write(&self._stop, &[1]).unwrap();
        self.daemon.take().unwrap().join().unwrap();
        let (ours, daemon, stop) = spawn_daemon(&self.host);
        Rig {
            qemu: MockQemu::from_stream(ours),
            host: self.host.clone(),
            s2: self.s2,
            daemon: Some(daemon),
            _stop: stop,
        }
    }

    /// The backend dies: it stops without a word and its descriptors close, the objects stay
    /// in the iommufd and the region stays with the frontend (what SIGKILL leaves; the daemon's
    /// stop path lets go of the objects the same way). `meanwhile` runs while no backend is
    /// there. Then a new backend is resumed as QEMU resumes one (docs/protocol.md 10.10,
    /// 10.11), and the passthrough devices `devices` (handle, SID, device) are attached again.
    fn kill_and_resume(
        mut self,
        devices: &[(u32, u32, u32)],
        meanwhile: impl FnOnce(&Shared, &MockQemu),
    ) -> anyhow::Result<Rig> {
        rustix::io::write(&self._stop, &[1]).unwrap();
        self.daemon.take().unwrap().join().unwrap();
        meanwhile(&self.host, &self.qemu);
        let (ours, daemon, stop) = spawn_daemon(&self.host);
        let qemu = self.qemu.resume_into(MockQemu::from_stream(ours))?;
        let mut rig = Rig {
            qemu,
            host: self.host.clone(),
            s2: self.s2,
            daemon: Some(daemon),
            _stop: stop,
        };
        for &(handle, sid, dev) in devices {
            rig.qemu
                .attach_passthrough(handle, sid, dev, rig.s2, memfd())?;
        }
        Ok(rig)
    }

    /// Closes the connection and waits for the daemon's session to end.
    fn finish(mut self) -> Shared {
        self.qemu.close().unwrap();
        self.daemon.take().unwrap().join().unwrap();
        self.host.clone()
    }
}

/// Waits for the guest's event queue to show events (the daemon reads the vEVENTQ on its own).
fn wait_events(
    d: &mut Driver<SocketPort, vm_memory::GuestMemoryMmap<()>>,
) -> viommu_tests::guest::evtq::EvtqBatch {
    let start = Instant::now();
    loop {
        let batch = d.evtq_thread().unwrap();
        if !batch.events.is_empty() || batch.overflow {
            return batch;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no event arrived");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn every_ste_transition_moves_the_device_make_before_break() {
    let mut rig = rig();
    // QEMU attaches at machine creation: SMMUEN = 0 with GBPA bypassing.
    rig.attach(1, SID_A, DEV_A);
    assert_eq!(rig.vste(DEV_A), BYPASS_VSTE);
    assert_eq!(
        rig.qemu.channel_state().spaces.get(&1),
        Some(&AddressSpace::System)
    );

    // The guest boots: unused STEs abort (Linux's disable_bypass).
    let mut d = rig.guest();
    d.reset().unwrap();
    assert_eq!(rig.vste(DEV_A), ABORT_VSTE);

    // A stage-1 domain: the nested HWPT carries the guest's STE, masked.
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    d.attach_s1(SID_A, pt, 7).unwrap();
    let guest = d.read_ste(SID_A).unwrap();
    assert_eq!(
        rig.vste(DEV_A),
        viommu_backend::host::rules::mask_vste([guest[0], guest[1]])
    );
    assert_eq!((rig.vste(DEV_A)[0] >> 1) & 7, 5, "S1 translate");
    assert_eq!(
        rig.qemu.channel_state().spaces.get(&1),
        Some(&AddressSpace::Translated)
    );
    let objects = rig.host.lock().live_objects();

    // Another domain: a new HWPT, the old one destroyed (the count of objects stays). Linux
    // changes the CD in place and the STE not at all; a CFGI_STE then costs the host three
    // ioctls: the new nested HWPT, the attach (an atomic replace), the old HWPT's destroy.
    let before = rig.vste(DEV_A);
    let mut ste = d.read_ste(SID_A).unwrap();
    ste[0] ^= 1 << 59; // S1CDMax 0 -> 1: a different vSTE
    let addr = d.ste_addr(SID_A).unwrap();
    viommu_tests::guest::mem::write_qwords(&d.mem, addr, &ste).unwrap();
    let ioctls = rig.host.lock().ioctl_count();
    d.issue_cmd_with_sync(CmdEnt::CfgiSte {
        sid: SID_A,
        leaf: true,
    })
    .unwrap();
    assert_eq!(rig.host.lock().ioctl_count() - ioctls, 3, "an STE change");
    assert_ne!(rig.vste(DEV_A), before);
    assert_eq!(rig.host.lock().live_objects(), objects, "the old HWPT went");
    let pt = d.new_s1_pgtable(Granule::G64K).unwrap();
    d.attach_s1(SID_A, pt, 8).unwrap();
    assert_eq!(rig.host.lock().live_objects(), objects);

    // Linux's shutdown: GBPA abort, then SMMUEN = 0: the device aborts.
    d.update_gbpa(GBPA_ABORT, 0).unwrap();
    d.write_reg_sync(0, ARM_SMMU_CR0, ARM_SMMU_CR0ACK).unwrap();
    assert_eq!(rig.vste(DEV_A), ABORT_VSTE);
    // GBPA bypass with SMMUEN = 0: bypass.
    d.update_gbpa(0, GBPA_ABORT).unwrap();
    assert_eq!(rig.vste(DEV_A), BYPASS_VSTE);
    // SMMUEN again: the guest's STE governs.
    d.write_reg_sync(CR0_SMMUEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    assert_eq!((rig.vste(DEV_A)[0] >> 1) & 7, 5);
    assert!(d.port.take_error().is_none());
    let host = rig.finish();
    assert_eq!(
        host.lock().live_objects(),
        0,
        "nothing left after the session"
    );
}

#[test]
fn a_vste_the_kernel_refuses_is_c_bad_ste_and_the_device_aborts() {
    let mut rig = rig();
    let mut d = rig.booted();
    d.evtq_thread().unwrap();
    // EATS = 0b10 (S1CHK): the model has no ATS and ignores it; the kernel refuses it.
    let mut ste = d.read_ste(SID_A).unwrap();
    ste[1] |= 2 << 28;
    let addr = d.ste_addr(SID_A).unwrap();
    viommu_tests::guest::mem::write_qwords(&d.mem, addr, &ste).unwrap();
    d.issue_cmd_with_sync(CmdEnt::CfgiSte {
        sid: SID_A,
        leaf: true,
    })
    .unwrap();
    assert_eq!(rig.vste(DEV_A), ABORT_VSTE, "the device is safe");
    let batch = d.evtq_thread().unwrap();
    assert_eq!(batch.events.len(), 1, "{:x?}", batch.events);
    assert_eq!(batch.events[0].id(), id::C_BAD_STE);
    assert_eq!(batch.events[0].sid(), SID_A);
    rig.finish();
}

#[test]
fn invalidations_reach_the_host_in_one_ioctl_per_sync_in_order() {
    let mut rig = rig();
    let mut d = rig.booted();
    rig.host.lock().take_executed();
    let calls = rig.host.lock().invalidate_count();

    // A Linux-like unmap storm: 1000 page unmaps, each a TLBI_NH_VA, a CMD_SYNC per 64.
    let tlbi = |page: u64| {
        CmdEnt::TlbiNhVa(Tlbi {
            asid: 7,
            addr: 0x4000_0000 + (page << 12),
            leaf: true,
            ..Tlbi::default()
        })
    };
    let pages: Vec<u64> = (0..1000).collect();
    for chunk in pages.chunks(64) {
        let cmds: Vec<CmdEnt> = chunk.iter().map(|&p| tlbi(p)).collect();
        d.issue_cmds_with_sync(&cmds).unwrap();
    }
    let host = rig.host.lock();
    assert_eq!(
        host.invalidate_count() - calls,
        16,
        "one ioctl per CMD_SYNC (QEMU: one per command, 1000)"
    );
    let executed = host.executed();
    assert_eq!(executed.len(), 1000);
    for (i, cmd) in executed.iter().enumerate() {
        assert_eq!(cmd[0] & 0xff, 0x12, "TLBI_NH_VA");
        assert_eq!(
            cmd[1] & !0xfff,
            0x4000_0000 + ((i as u64) << 12),
            "in order"
        );
    }
    drop(host);
    rig.finish();
}

#[test]
fn a_host_invalidation_failure_fails_the_sync() {
    let mut rig = rig();
    let mut d = rig.booted();
    // One timeout: the backend issues the (idempotent) batch again and the sync completes.
    rig.host.lock().take_executed();
    rig.host
        .lock()
        .fail_next_invalidate(0, rustix::io::Errno::TIMEDOUT);
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 7 })
        .unwrap();
    assert_eq!(rig.host.lock().executed().len(), 1, "issued by the retry");
    // The host keeps timing out: the CMD_SYNC fails.
    rig.host
        .lock()
        .fail_next_invalidates(2, 0, rustix::io::Errno::TIMEDOUT);
    let err = d
        .issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 7 })
        .unwrap_err();
    assert!(
        matches!(
            err,
            viommu_tests::guest::DriverError::Command { error: 3, .. }
        ),
        "CERROR_ATC_INV_SYNC: {err:?}"
    );
    // Linux's GERROR handler acknowledges; the queue runs on.
    d.handle_gerror().unwrap();
    d.sync().unwrap();
    rig.finish();
}

#[test]
fn auto_id_registers_come_from_the_first_device_and_a_mismatch_is_refused() {
    let mut rig = rig();
    rig.attach(1, SID_A, DEV_A);
    let idr = rig.qemu.id_regs().unwrap().idr;
    assert_eq!(idr[5] & 7, 5, "OAS 48 bits from the host");
    assert_eq!((idr[1] >> 6) & 0x1f, 20, "SSIDSIZE from the host");
    assert_ne!(idr[3] & (1 << 10), 0, "RIL from the host");
    assert_eq!(idr[0] & 1, 0, "no stage 2 for the guest");

    // A device behind another SMMU without range invalidation does not fit.
    let objects = rig.host.lock().live_objects();
    let s2 = {
        let mut host = rig.host.lock();
        let mut hw = NESTING_HW;
        hw.idr[3] = 0;
        let smmu = host.add_device(102, 0x600, Some(hw)).unwrap();
        host.alloc_s2_hwpt(smmu).unwrap()
    };
    let err = rig
        .qemu
        .attach_passthrough(2, 0x20, 102, s2, memfd())
        .unwrap_err();
    match err.downcast_ref::<Error>() {
        Some(Error::Remote {
            status, message, ..
        }) => {
            assert_eq!(*status, Status::INCOMPATIBLE);
            assert!(message.contains("range invalidation"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rig.host.lock().live_objects(),
        objects,
        "nothing left behind"
    );
    rig.finish();
}

#[test]
fn host_events_reach_the_guest_queue_with_the_vsid_and_overflow_too() {
    let mut rig = rig();
    let mut d = rig.booted();
    d.evtq_thread().unwrap();
    // F_TRANSLATION from the physical SMMU, with the physical StreamID.
    let record = [0x10 | (0x500u64 << 32), 0, 0x4000_1000, 0];
    let injected = rig.host.lock().inject_event(DEV_A, record);
    assert!(
        matches!(
            injected,
            viommu_backend::host::double::Injection::Queued { .. }
        ),
        "{injected:?}"
    );
    let batch = wait_events(&mut d);
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].id(), id::F_TRANSLATION);
    assert_eq!(batch.events[0].sid(), SID_A, "vSID");
    assert_eq!(batch.events[0].input_addr(), 0x4000_1000);

    // More events than the guest's queue holds: the overflow flag.
    let entries = 1u32 << d.evtq.llq.shift;
    for _ in 0..entries + 8 {
        rig.host.lock().inject_event(DEV_A, record);
    }
    let batch = wait_events(&mut d);
    let mut overflow = batch.overflow;
    let start = Instant::now();
    while !overflow && start.elapsed() < Duration::from_secs(5) {
        overflow = d.evtq_thread().unwrap().overflow;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(overflow, "EVTQ overflow reported");
    rig.finish();
}

#[test]
fn detach_and_disconnect_leave_the_device_on_stage_2_and_nothing_behind() {
    let mut rig = rig();
    rig.attach(1, SID_A, DEV_A);
    rig.attach(2, SID_B, DEV_B);
    let mut d = rig.guest();
    d.reset().unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    d.attach_s1(SID_A, pt, 7).unwrap();
    rig.qemu.detach(1).unwrap();
    assert_eq!(rig.host.lock().attached(DEV_A), Some(rig.s2));
    assert!(
        rig.host.lock().live_objects() > 0,
        "device B still uses the vIOMMU"
    );
    rig.qemu.detach(2).unwrap();
    assert_eq!(rig.host.lock().attached(DEV_B), Some(rig.s2));
    assert_eq!(rig.host.lock().live_objects(), 0);

    // Disconnect with a device attached and translating.
    rig.attach(1, SID_A, DEV_A);
    d.issue_cmd_with_sync(CmdEnt::CfgiSte {
        sid: SID_A,
        leaf: true,
    })
    .unwrap();
    assert_eq!((rig.vste(DEV_A)[0] >> 1) & 7, 5);
    let s2 = rig.s2;
    let host = rig.finish();
    assert_eq!(host.lock().attached(DEV_A), Some(s2));
    assert_eq!(host.lock().live_objects(), 0);
}

#[test]
fn emulated_and_passthrough_devices_share_the_vsmmu_and_msis_translate() {
    let mut rig = rig();
    rig.attach(1, SID_A, DEV_A);
    rig.qemu.attach(3, 0x28).unwrap();
    let mut d = rig.guest();
    d.reset().unwrap();
    // The passthrough device's domain identity-maps the MSI window (the IORT RMR).
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    d.map(&pt, 0x800_0000, 0x800_0000, 0x1000, prot::RW | prot::MMIO)
        .unwrap();
    d.attach_s1(SID_A, pt, 7).unwrap();
    // The emulated device's domain maps a buffer.
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    let buf = d.alloc_zeroed(0x1000, 0x1000).unwrap();
    d.map(&pt, 0x9000_0000, buf, 0x1000, prot::RW).unwrap();
    d.attach_s1(0x28, pt, 9).unwrap();

    let spaces = rig.qemu.channel_state().spaces.clone();
    assert_eq!(spaces.get(&1), Some(&AddressSpace::Translated));
    assert_eq!(spaces.get(&3), Some(&AddressSpace::Translated));
    // KVM's MSI route for the passthrough device: its MSI gIOVA translates to the doorbell.
    assert_eq!(
        rig.qemu
            .translate(1, None, 0x800_0040, Access::WRITE)
            .unwrap(),
        Dma::Address {
            gpa: 0x800_0040,
            cached: false
        }
    );
    // The emulated device's DMA works beside it.
    assert_eq!(
        rig.qemu
            .dma_write(3, None, 0x9000_0010, &[1, 2, 3, 4])
            .unwrap(),
        Dma::Address {
            gpa: buf + 0x10,
            cached: false
        }
    );
    assert_eq!((rig.vste(DEV_A)[0] >> 1) & 7, 5);
    rig.finish();
}

#[test]
fn a_frontend_with_a_fixed_doorbell_needs_no_translate() {
    // QEMU's msi-gpa mode: MSIs go to a fixed doorbell, nothing is translated by the backend.
    let features = viommu_tests::FRONTEND_FEATURES.difference(viommu_protocol::Features::TRANSLATE);
    let mut rig = rig_within(auto_config(), features);
    rig.attach(1, SID_A, DEV_A);
    let mut d = rig.guest();
    d.reset().unwrap();
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    d.attach_s1(SID_A, pt, 7).unwrap();
    assert_eq!((rig.vste(DEV_A)[0] >> 1) & 7, 5);
    let err = rig
        .qemu
        .translate(1, None, 0x800_0040, Access::WRITE)
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::Remote {
                status: Status::NOT_NEGOTIATED,
                ..
            })
        ),
        "{err:#}"
    );
    // Emulated devices need TRANSLATE: refused.
    let err = rig.qemu.attach(3, 0x28).unwrap_err();
    assert!(format!("{err:#}").contains("TRANSLATE"), "{err:#}");
    rig.finish();
}

#[test]
fn a_restarted_backend_adopts_the_host_objects_and_the_device_keeps_translating() {
    let mut rig = rig();
    let mut d = rig.booted();
    let hwpt = rig.host.lock().attached(DEV_A);
    let vste = rig.vste(DEV_A);
    let state = rig.qemu.get_state().unwrap();
    let ram = rig.qemu.take_ram().unwrap();

    // The backend is upgraded: SIGTERM, not a VM shutdown. The device keeps its nested HWPT.
    let mut rig = rig.restart();
    assert_eq!(rig.host.lock().attached(DEV_A), hwpt, "DMA went on");
    assert!(rig.host.lock().live_objects() > 0);

    // QEMU reconnects: same RAM, the iommufd, the saved state, then its devices again.
    rig.qemu.negotiate().unwrap();
    rig.qemu.start_on(auto_config(), ram).unwrap();
    rig.qemu.set_iommufd(memfd()).unwrap();
    rig.qemu.set_state(&state).unwrap();
    let objects = rig.host.lock().live_objects();
    rig.attach(1, SID_A, DEV_A);
    assert_eq!(rig.host.lock().attached(DEV_A), hwpt, "adopted, not remade");
    assert_eq!(rig.vste(DEV_A), vste);
    // Only a new vEVENTQ (the old one's fd died with the old backend; SET_STATE destroyed it).
    assert_eq!(rig.host.lock().live_objects(), objects + 1);

    // The guest goes on with the new backend: invalidations, STE changes, events.
    d.port = rig.qemu.port();
    let calls = rig.host.lock().invalidate_count();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 7 })
        .unwrap();
    assert_eq!(rig.host.lock().invalidate_count(), calls + 1);
    let record = [0x10 | (0x500u64 << 32), 0, 0x4000_1000, 0];
    rig.host.lock().inject_event(DEV_A, record);
    let batch = wait_events(&mut d);
    assert_eq!(batch.events[0].sid(), SID_A);
    let pt = d.new_s1_pgtable(Granule::G16K).unwrap();
    d.attach_s1(SID_A, pt, 9).unwrap();
    assert_ne!(rig.vste(DEV_A), vste);
    assert!(d.port.take_error().is_none());
    let host = rig.finish();
    assert_eq!(
        host.lock().live_objects(),
        0,
        "the VM's end tears everything down"
    );
}

#[test]
fn kernel_refusals_at_attach_are_clear_errors_and_leave_nothing_behind() {
    let mut rig = rig();
    rig.attach(1, SID_A, DEV_A);
    let objects = rig.host.lock().live_objects();
    let status_of = |err: anyhow::Error| match err.downcast_ref::<Error>() {
        Some(Error::Remote {
            status, message, ..
        }) => (*status, message.clone()),
        other => panic!("{other:?}"),
    };
    // The same vSID twice in one vIOMMU: the kernel's EEXIST.
    let err = rig
        .qemu
        .attach_passthrough(2, SID_A, DEV_B, rig.s2, memfd())
        .unwrap_err();
    let (status, message) = status_of(err);
    assert_eq!(status, Status::HOST_ERROR);
    assert!(
        message.contains("IOMMU_VDEVICE_ALLOC") || message.contains("exists"),
        "{message}"
    );
    assert_eq!(rig.host.lock().live_objects(), objects);
    // A stage-2 HWPT that is not a nesting parent: EINVAL from IOMMU_VIOMMU_ALLOC.
    let paging = 900;
    rig.host.lock().add_paging_hwpt(paging, 0).unwrap();
    let err = rig
        .qemu
        .attach_passthrough(2, SID_B, DEV_B, paging, memfd())
        .unwrap_err();
    assert_eq!(status_of(err).0, Status::HOST_ERROR);
    assert_eq!(rig.host.lock().live_objects(), objects);
    // A device iommufd does not know: ENOENT from IOMMU_GET_HW_INFO.
    let err = rig
        .qemu
        .attach_passthrough(2, SID_B, 4242, rig.s2, memfd())
        .unwrap_err();
    assert_eq!(status_of(err).0, Status::HOST_ERROR);
    // After all that, the device attaches fine.
    rig.attach(2, SID_B, DEV_B);
    assert_eq!(rig.vste(DEV_B), BYPASS_VSTE);
    let host = rig.finish();
    assert_eq!(host.lock().live_objects(), 0);
}

/// Issue 12, defect 0, for a passthrough device: attached before the guest numbered its bus
/// (SID 0), it moves to SID 0x100. With STE(0) bypassing and STE(0x100) aborting, neither
/// SMMUEN nor CFGI_ALL may install the bypass for it; the vDEVICE follows it to its new SID,
/// and its own translating STE is what the host gets.
#[test]
fn a_renumbered_passthrough_device_gets_its_own_ste_not_its_old_sids() {
    let mut rig = rig();
    rig.attach(1, 0, DEV_A);
    let mut d = rig.guest();
    d.reset().unwrap();
    assert_eq!(rig.vste(DEV_A), ABORT_VSTE);
    // A translating STE to copy, built on a scratch SID.
    let pt = d.new_s1_pgtable(Granule::G4K).unwrap();
    d.attach_s1(0x300, pt, 9).unwrap();
    let translate = d.read_ste(0x300).unwrap();
    // The guest numbers the bus; then STE(0) bypasses, STE(0x100) aborts, with no per-SID
    // invalidation of the device's new SID.
    rig.qemu.set_sid(1, 0x100);
    let bypass = viommu_tests::guest::ste::make_bypass_ste(false);
    let abort = viommu_tests::guest::ste::make_abort_ste();
    let put = |d: &mut Driver<SocketPort, vm_memory::GuestMemoryMmap<()>>, sid, ste: &[u64; 8]| {
        let addr = d.ste_addr(sid).unwrap();
        viommu_tests::guest::mem::write_qwords(&d.mem, addr, ste).unwrap();
    };
    put(&mut d, 0, &bypass);
    put(&mut d, 0x100, &abort);
    d.issue_cmd_with_sync(CmdEnt::CfgiAll).unwrap();
    assert_eq!(rig.vste(DEV_A), ABORT_VSTE, "CFGI_ALL: STE(0x100) aborts");
    assert_eq!(
        rig.host.lock().vsid(DEV_A),
        Some(0x100),
        "the vDEVICE moved"
    );
    // SMMUEN off (GBPA aborting) and on again, the queues staying on: still STE(0x100).
    let queues = CR0_CMDQEN | CR0_EVTQEN;
    d.update_gbpa(GBPA_ABORT, 0).unwrap();
    d.write_reg_sync(queues, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    d.write_reg_sync(queues | CR0_SMMUEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK)
        .unwrap();
    assert_eq!(rig.vste(DEV_A), ABORT_VSTE, "SMMUEN: STE(0x100) aborts");
    // The device's own STE translating: that is what the host installs.
    put(&mut d, 0x100, &translate);
    d.issue_cmd_with_sync(CmdEnt::CfgiSte {
        sid: 0x100,
        leaf: true,
    })
    .unwrap();
    assert_eq!(
        rig.vste(DEV_A),
        viommu_backend::host::rules::mask_vste([translate[0], translate[1]])
    );
    assert!(d.port.take_error().is_none());
    rig.finish();
}

/// The keys of the descriptors the frontend holds.
fn held_keys(qemu: &MockQemu) -> Vec<u32> {
    qemu.channel_state().held.keys().copied().collect()
}

/// The host record the frontend holds (key 0), read as a resuming backend reads it.
fn recorded(qemu: &MockQemu) -> viommu_backend::session::host_objects::PassthroughState {
    let fd = qemu.channel_state().held[&0].try_clone().unwrap();
    viommu_backend::session::host_record::HostRecord::adopt(fd)
        .unwrap()
        .read()
        .unwrap()
}

/// The vEVENTQ's key among them (every key but the host record's, 0).
fn veventq_key(qemu: &MockQemu) -> u32 {
    let keys = held_keys(qemu);
    assert_eq!(keys.len(), 2, "the host record and one vEVENTQ: {keys:?}");
    assert_eq!(keys[0], 0, "the host record is key 0");
    keys[1]
}

#[test]
fn a_killed_backend_is_resumed_with_its_host_objects_and_what_the_host_reported_meanwhile() {
    let mut rig = resumable_rig();
    let mut d = rig.booted();
    let q = veventq_key(&rig.qemu);
    assert!(rig.host.lock().exists(q), "key {q} is the vEVENTQ's ID");
    let hwpt = rig.host.lock().attached(DEV_A);
    let vste = rig.vste(DEV_A);
    let objects = rig.host.lock().live_objects();

    // While no backend is there, the device faults: the host queues the event in the vEVENTQ
    // that only the frontend holds open now.
    let record = [0x10 | (0x500u64 << 32), 0, 0x4000_1000, 0];
    let rig = rig
        .kill_and_resume(&[(1, SID_A, DEV_A)], |host, _| {
            assert_eq!(host.lock().attached(DEV_A), hwpt, "DMA went on meanwhile");
            host.lock().inject_event(DEV_A, record);
        })
        .unwrap();

    // Adopted, not remade: the same nested HWPT, and no new object (not even a vEVENTQ).
    assert_eq!(rig.host.lock().attached(DEV_A), hwpt);
    assert_eq!(rig.vste(DEV_A), vste);
    assert_eq!(rig.host.lock().live_objects(), objects);
    assert_eq!(held_keys(&rig.qemu), vec![0, q]);
    // The new backend's record names what it adopted at once (it may die next).
    let recorded = recorded(&rig.qemu);
    assert_eq!(recorded.devices[&1].nested, hwpt);
    assert_eq!(recorded.viommus[0].veventq, Some(q));
    // The guest goes on, and the fault of the backend's absence is in its event queue.
    d.port = rig.qemu.port();
    let batch = wait_events(&mut d);
    assert!(!batch.overflow, "nothing was lost");
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].sid(), SID_A, "with the guest's StreamID");
    // Invalidations reach the host, STE changes move the device, new faults arrive.
    let calls = rig.host.lock().invalidate_count();
    d.issue_cmd_with_sync(CmdEnt::TlbiNhAsid { vmid: 0, asid: 7 })
        .unwrap();
    assert_eq!(rig.host.lock().invalidate_count(), calls + 1);
    rig.host.lock().inject_event(DEV_A, record);
    assert_eq!(wait_events(&mut d).events.len(), 1);
    let pt = d.new_s1_pgtable(Granule::G16K).unwrap();
    d.attach_s1(SID_A, pt, 9).unwrap();
    assert_ne!(rig.vste(DEV_A), vste);
    assert!(d.port.take_error().is_none());

    // A second death, after the STE change: the record followed it.
    let hwpt = rig.host.lock().attached(DEV_A);
    let rig = rig
        .kill_and_resume(&[(1, SID_A, DEV_A)], |_, _| {})
        .unwrap();
    assert_eq!(rig.host.lock().attached(DEV_A), hwpt);
    assert_eq!(rig.host.lock().live_objects(), objects);
    let host = rig.finish();
    assert_eq!(
        host.lock().live_objects(),
        0,
        "the VM's end tears it all down"
    );
}

#[test]
fn a_backend_that_died_holding_host_events_or_never_held_its_queue_shows_the_overflow() {
    // Died between reading the vEVENTQ and publishing the events: the record says so.
    let mut rig = resumable_rig();
    let mut d = rig.booted();
    let rig = rig
        .kill_and_resume(&[(1, SID_A, DEV_A)], |_, qemu| {
            let state = qemu.channel_state();
            let record = state.held.get(&0).expect("the host record");
            // `events_in_hand` at 0x14 (docs/protocol.md 10.11).
            rustix::io::pwrite(record, &1u32.to_le_bytes(), 0x14).unwrap();
        })
        .unwrap();
    d.port = rig.qemu.port();
    let batch = wait_events(&mut d);
    assert!(batch.overflow, "the guest learns that events may be lost");
    assert!(batch.events.is_empty());
    assert_eq!(rig.finish().lock().live_objects(), 0);

    // Died before the frontend held the vEVENTQ: the queue nobody can read is replaced, and
    // what the host queued in it is lost, which the guest learns from the overflow.
    let mut rig = resumable_rig();
    let mut d = rig.booted();
    let q = veventq_key(&rig.qemu);
    let objects = rig.host.lock().live_objects();
    let record = [0x10 | (0x500u64 << 32), 0, 0x4000_1000, 0];
    let rig = rig
        .kill_and_resume(&[(1, SID_A, DEV_A)], |host, qemu| {
            qemu.channel_state().held.remove(&q);
            host.lock().inject_event(DEV_A, record);
        })
        .unwrap();
    assert_eq!(
        rig.host.lock().live_objects(),
        objects,
        "one queue for another"
    );
    let new_q = veventq_key(&rig.qemu);
    assert_eq!(rig.host.lock().pending_events(new_q), Some(0));
    d.port = rig.qemu.port();
    let batch = wait_events(&mut d);
    assert!(batch.overflow);
    assert!(batch.events.is_empty(), "the event went with the old queue");
    rig.host.lock().inject_event(DEV_A, record);
    assert_eq!(wait_events(&mut d).events[0].sid(), SID_A);
    assert_eq!(rig.finish().lock().live_objects(), 0);
}

#[test]
fn a_damaged_host_record_refuses_the_resume_and_adopts_nothing() {
    let mut rig = resumable_rig();
    let _d = rig.booted();
    let objects = rig.host.lock().live_objects();
    let host = rig.host.clone();
    let Err(err) = rig.kill_and_resume(&[], |_, qemu| {
        let state = qemu.channel_state();
        let record = state.held.get(&0).expect("the host record");
        // Both slots claim more than a slot holds.
        for slot in [0x1000u64, 0x2_0000] {
            rustix::io::pwrite(record, &u32::MAX.to_le_bytes(), slot).unwrap();
        }
    }) else {
        panic!("a damaged host record was resumed from");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("SET_SHARED_REGION with RESUME") && text.contains("host record"),
        "{text}"
    );
    // Nothing adopted, nothing destroyed: the objects wait in the iommufd as the dead backend
    // left them, and the device still translates.
    assert_eq!(host.lock().live_objects(), objects);
    assert!(host.lock().attached(DEV_A).is_some());
}

#[test]
fn return_fds_is_refused_out_of_its_place() {
    use viommu_protocol::{FrontendRequest, HeldFds};
    let ret = |keys: &[u32]| {
        FrontendRequest::ReturnFds(HeldFds {
            fds: keys.iter().map(|&k| (k, memfd())).collect(),
        })
    };
    let status = |r: Result<viommu_protocol::FrontendReply, Error>| match r {
        Err(Error::Remote { status, .. }) => status,
        other => panic!("not refused: {other:?}"),
    };
    // Before the region, in CONFIGURED: accepted, and a key returned twice is refused.
    let (ours, _daemon, _stop) =
        spawn_daemon(&Shared(Arc::new(Mutex::new(HostDouble::new(NESTING_HW)))));
    let mut qemu = MockQemu::from_stream(ours).with_shared_region(true);
    qemu.negotiate().unwrap();
    assert_eq!(
        status(qemu.frontend().call(&ret(&[3]))),
        Status::BAD_STATE,
        "before SET_CONFIG"
    );
    qemu.start_leaving_region(auto_config(), RAM_SIZE).unwrap();
    qemu.frontend().call(&ret(&[3, 4])).unwrap();
    assert_eq!(
        status(qemu.frontend().call(&ret(&[4]))),
        Status::INVALID_ARGUMENT
    );
    // 64 in all at most: 2, then 7 x 8, then 6 more, and the 65th is refused.
    for base in (5..61).step_by(8) {
        let keys: Vec<u32> = (base..base + 8).collect();
        qemu.frontend().call(&ret(&keys)).unwrap();
    }
    qemu.frontend()
        .call(&ret(&[100, 101, 102, 103, 104, 105]))
        .unwrap();
    assert_eq!(status(qemu.frontend().call(&ret(&[106]))), Status::NO_SPACE);
    // After the region is set, RETURN_FDS is out of place.
    let region_qemu_status = {
        let mut other = resumable_rig();
        let _d = other.booted();
        status(other.qemu.frontend().call(&ret(&[1])))
    };
    assert_eq!(region_qemu_status, Status::BAD_STATE);

    // Without the feature.
    let (ours, _daemon2, _stop2) =
        spawn_daemon(&Shared(Arc::new(Mutex::new(HostDouble::new(NESTING_HW)))));
    let mut qemu = MockQemu::from_stream(ours).with_shared_region(true);
    qemu.negotiate_within(
        viommu_tests::FRONTEND_FEATURES.difference(viommu_protocol::Features::HOLD_FDS),
    )
    .unwrap();
    qemu.start_leaving_region(auto_config(), RAM_SIZE).unwrap();
    assert_eq!(
        status(qemu.frontend().call(&ret(&[1]))),
        Status::NOT_NEGOTIATED
    );
}
