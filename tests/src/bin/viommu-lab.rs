//! `viommu-lab`: the passthrough mode on a real kernel. It runs inside the arm64 lab guest
//! (`tests/lab/run.sh`), where `/dev/iommu` and the `edu` device's VFIO cdev are real, and plays
//! QEMU: it binds the device to the iommufd, maps memfd guest RAM into an IOAS, allocates the
//! stage-2 nesting parent, starts `viommu-backend` and hands it the fds over the real socket;
//! then a Linux-like guest driver programs the vSMMU and the `edu` device does DMA through the
//! nested translation. Ends with `N passed, M failed`.

// A test program: fixed small addresses and indices.
#![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use viommu_backend::host::iommufd::Iommufd;
use viommu_backend::host::rules::{self, HostCaps};
use viommu_backend::host::{HostError, HostIommu};
use viommu_backend::session::host_record::HostRecord;
use viommu_protocol::{ConfigFlags, Features, ModelConfig};
use viommu_tests::guest::cmd::{CmdEnt, Tlbi};
use viommu_tests::guest::event::id;
use viommu_tests::guest::mem::write_qwords;
use viommu_tests::guest::pgtable::{Granule, PageTable, prot};
use viommu_tests::guest::regs::{
    ARM_SMMU_CR0, ARM_SMMU_CR0ACK, CR0_CMDQEN, CR0_EVTQEN, CR0_SMMUEN, GBPA_ABORT,
};
use viommu_tests::guest::{BumpAllocator, Driver, DriverConfig};
use viommu_tests::lab::{Bar, Edu, LabIommufd, VfioCdev};
use viommu_tests::port::SocketPort;
use viommu_tests::ram::MemfdRam;
use viommu_tests::{BackendProcess, MockQemu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: 16 MiB at IPA 16 MiB, below edu's 28-bit DMA mask and clear of the SW_MSI window.
const RAM_GPA: u64 = 0x0100_0000;
const RAM_SIZE: u64 = 0x0100_0000;
/// The edu device at 00:01.0: requester ID 0x8, the guest's StreamID.
const VSID: u32 = 0x8;
/// Device addresses of the stage-1 mappings (below 2^28).
const IOVA_A: u64 = 0x0010_0000;
const IOVA_B: u64 = 0x0010_1000;
/// edu's internal buffer.
const EDU_BUF: u64 = 0x4_0000;
const ASID: u16 = 1;
/// Where the backend logs.
const BACKEND_LOG: &str = "/tmp/viommu-backend.log";

/// The backend's IOMMU_HWPT_INVALIDATE calls so far, with their command counts.
fn host_invalidations() -> anyhow::Result<Vec<usize>> {
    let log = std::fs::read_to_string(BACKEND_LOG).context("reading the backend's log")?;
    Ok(log
        .lines()
        .filter_map(|l| l.split(": ").last())
        .filter_map(|l| l.strip_suffix(" command(s) in one IOMMU_HWPT_INVALIDATE"))
        .filter_map(|n| n.trim().parse().ok())
        .collect())
}

type Guest = Driver<SocketPort, GuestMemoryMmap<()>>;

/// What QEMU holds: the iommufd, the device, the IOAS with guest RAM, the stage-2 parent.
struct Host {
    iommufd: LabIommufd,
    cdev: VfioCdev,
    dev_id: u32,
    s2: u32,
    bar: Bar,
    backend: PathBuf,
}

/// One connection to the backend with a booted guest.
struct Vm {
    qemu: MockQemu,
    d: Guest,
    mem: GuestMemoryMmap<()>,
    /// Stage-1 table of the edu domain, and the pages IOVA_A and IOVA_B map.
    pt: Option<PageTable>,
    page_a: u64,
    page_b: u64,
    _backend: BackendProcess,
}

fn config() -> ModelConfig {
    ModelConfig {
        flags: ConfigFlags::IDR_AUTO | ConfigFlags::STAGE1,
        oas_bits: 0,
        ssid_bits: 0,
        sid_bits: 16,
        cmdq_log2: 19,
        evtq_log2: 19,
    }
}

fn host(backend: PathBuf, cdev_path: &str) -> anyhow::Result<(Host, MemfdRam)> {
    let iommufd = LabIommufd::open().context("opening /dev/iommu")?;
    let cdev = VfioCdev::open(cdev_path).with_context(|| format!("opening {cdev_path}"))?;
    let dev_id = cdev.bind(&iommufd).context("VFIO_DEVICE_BIND_IOMMUFD")?;
    let ioas = iommufd.ioas_alloc().context("IOMMU_IOAS_ALLOC")?;
    let ram = MemfdRam::new(RAM_GPA, RAM_SIZE)?;
    let ram_fd = ram.fd()?;
    iommufd
        .ioas_map_file(ioas, ram_fd.as_fd(), 0, RAM_SIZE, RAM_GPA)
        .context("IOMMU_IOAS_MAP_FILE")?;
    let s2 = iommufd
        .hwpt_alloc_nest_parent(dev_id, ioas)
        .context("IOMMU_HWPT_ALLOC (nest parent)")?;
    cdev.attach(s2).context("attaching the stage-2 HWPT")?;
    cdev.enable_memory_and_bus_master()
        .context("enabling bus mastering")?;
    let bar = cdev.map_bar0().context("mapping BAR0")?;
    Ok((
        Host {
            iommufd,
            cdev,
            dev_id,
            s2,
            bar,
            backend,
        },
        ram,
    ))
}

/// Starts a backend and a session on it, attaches the device, boots the guest driver.
fn vm(host: &Host, ram: MemfdRam) -> anyhow::Result<Vm> {
    let socket = std::env::temp_dir().join(format!("vsmmu-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    // The backend's debug log names every IOMMU_HWPT_INVALIDATE (test 6 counts them).
    let log = std::fs::File::create(BACKEND_LOG).context("creating the backend's log")?;
    let backend = BackendProcess::spawn_logging(
        &host.backend,
        &socket,
        &["--log-level", "debug"],
        Some(log),
    )?;
    let mut qemu = MockQemu::connect(&socket, Duration::from_secs(20))?;
    qemu.negotiate()?;
    qemu.start_on(config(), ram)?;
    qemu.set_iommufd(host.iommufd.dup()?)?;
    qemu.attach_passthrough(1, VSID, host.dev_id, host.s2, host.cdev.dup()?)?;
    let mem = qemu.mem()?.clone();
    let mut d = Driver::probe(
        qemu.port(),
        mem.clone(),
        BumpAllocator::new(RAM_GPA + 0x10_0000, RAM_GPA + RAM_SIZE),
        DriverConfig::default(),
    )
    .map_err(|e| anyhow::anyhow!("probe: {e:?}"))?;
    d.reset().map_err(|e| anyhow::anyhow!("reset: {e:?}"))?;
    Ok(Vm {
        qemu,
        d,
        mem,
        pt: None,
        page_a: 0,
        page_b: 0,
        _backend: backend,
    })
}

fn drv<T>(r: Result<T, viommu_tests::guest::DriverError>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("guest driver: {e:?}"))
}

fn fill(mem: &GuestMemoryMmap<()>, gpa: u64, byte: u8) -> anyhow::Result<()> {
    mem.write_slice(&[byte; 64], GuestAddress(gpa))?;
    Ok(())
}

fn read64(mem: &GuestMemoryMmap<()>, gpa: u64) -> anyhow::Result<[u8; 64]> {
    let mut buf = [0u8; 64];
    mem.read_slice(&mut buf, GuestAddress(gpa))?;
    Ok(buf)
}

/// Copies 64 bytes by DMA: RAM at `src` into edu's buffer, then edu's buffer to RAM at `dst`.
fn dma_copy(bar: &Bar, src: u64, dst: u64) -> anyhow::Result<()> {
    let edu = Edu(bar);
    edu.dma(src, EDU_BUF, 64, false)
        .context("edu DMA to its buffer")?;
    edu.dma(EDU_BUF, dst, 64, true).context("edu DMA to RAM")?;
    Ok(())
}

/// Waits for the guest's event queue to show an event of type `want` for the edu device.
fn wait_event(d: &mut Guest, want: u8) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < Duration::from_secs(5) {
        let batch = drv(d.evtq_thread())?;
        if batch
            .events
            .iter()
            .any(|e| e.id() == want && e.sid() == VSID)
        {
            return Ok(());
        }
        seen.extend(batch.events);
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no event {want:#x} for SID {VSID:#x}; saw {seen:x?}")
}

/// 1. A vSMMU session over the real socket, with the iommufd and the vfio cdev passed as QEMU
///    passes them; the ID registers come from the real host SMMU.
fn t1_session(host: &Host, vm: &mut Vm) -> anyhow::Result<()> {
    let idr = vm.qemu.id_regs()?.idr;
    ensure!(idr[0] & 2 != 0, "IDR0.S1P clear: {:#x}", idr[0]);
    ensure!(idr[0] & 1 == 0, "the guest must not see stage 2");
    // The device aborts (Linux's disable_bypass): DMA to its IPAs does not land.
    fill(&vm.mem, RAM_GPA + 0x8000, 0x11)?;
    fill(&vm.mem, RAM_GPA + 0x9000, 0x22)?;
    let _ = dma_copy(&host.bar, RAM_GPA + 0x8000, RAM_GPA + 0x9000);
    ensure!(
        read64(&vm.mem, RAM_GPA + 0x9000)? == [0x22; 64],
        "DMA went through an aborting STE"
    );
    Ok(())
}

/// The edu domain: a stage-1 table in which IOVA_A maps a new page B and IOVA_B a new page A
/// (swapped, so that a DMA through the wrong stage shows), attached to edu's stream. Returns
/// the table and pages A and B.
fn swapped_domain(d: &mut Guest) -> anyhow::Result<(PageTable, u64, u64)> {
    let pt = drv(d.new_s1_pgtable(Granule::G4K))?;
    let page_a = drv(d.alloc_zeroed(0x1000, 0x1000))?;
    let page_b = drv(d.alloc_zeroed(0x1000, 0x1000))?;
    drv(d.map(&pt, IOVA_A, page_b, 0x1000, prot::RW))?;
    drv(d.map(&pt, IOVA_B, page_a, 0x1000, prot::RW))?;
    drv(d.attach_s1(VSID, pt.clone(), ASID))?;
    Ok((pt, page_a, page_b))
}

/// 2. The guest's stage 1 over the kernel's stage 2: edu DMA lands in the right pages (the
///    mapping swaps two pages, so a wrong stage shows).
fn t2_s1_dma(host: &Host, vm: &mut Vm) -> anyhow::Result<()> {
    let (pt, page_a, page_b) = swapped_domain(&mut vm.d)?;
    fill(&vm.mem, page_b, 0x5a)?;
    dma_copy(&host.bar, IOVA_A, IOVA_B)?;
    ensure!(
        read64(&vm.mem, page_a)? == [0x5a; 64],
        "the data did not land in the page IOVA_B maps"
    );
    vm.pt = Some(pt);
    vm.page_a = page_a;
    vm.page_b = page_b;
    Ok(())
}

/// 3. Unmap (PTE cleared, TLBI, CMD_SYNC): a DMA to the old IOVA faults, and the fault reaches
///    the guest's event queue through the vEVENTQ with the vSID.
fn t3_unmap_fault(host: &Host, vm: &mut Vm) -> anyhow::Result<()> {
    let pt = vm.pt.as_ref().context("no stage-1 table")?;
    drv(pt.unmap(&vm.mem, IOVA_B))?;
    drv(vm.d.issue_cmds_with_sync(&[CmdEnt::TlbiNhVa(Tlbi {
        asid: ASID,
        addr: IOVA_B,
        leaf: true,
        ..Tlbi::default()
    })]))?;
    drv(vm.d.evtq_thread())?;
    fill(&vm.mem, vm.page_b, 0x77)?;
    fill(&vm.mem, vm.page_a, 0x00)?;
    let _ = dma_copy(&host.bar, IOVA_A, IOVA_B);
    ensure!(
        read64(&vm.mem, vm.page_a)? == [0; 64],
        "DMA reached the unmapped page"
    );
    wait_event(&mut vm.d, id::F_TRANSLATION)
}

/// 4. A vSTE the kernel rejects (EATS = S1CHK) is C_BAD_STE in the guest's event queue, and the
///    device aborts; the guest's fixed STE brings translation back.
fn t4_rejected_vste(host: &Host, vm: &mut Vm) -> anyhow::Result<()> {
    let addr = drv(vm.d.ste_addr(VSID))?;
    let good = drv(vm.d.read_ste(VSID))?;
    let mut bad = good;
    bad[1] |= 2 << 28;
    drv(write_qwords(&vm.mem, addr, &bad))?;
    drv(vm.d.issue_cmd_with_sync(CmdEnt::CfgiSte {
        sid: VSID,
        leaf: true,
    }))?;
    wait_event(&mut vm.d, id::C_BAD_STE)?;
    fill(&vm.mem, vm.page_b, 0x33)?;
    fill(&vm.mem, RAM_GPA + 0x9000, 0x44)?;
    let _ = dma_copy(&host.bar, IOVA_A, RAM_GPA + 0x9000);
    ensure!(
        read64(&vm.mem, RAM_GPA + 0x9000)? == [0x44; 64],
        "DMA went through a refused STE"
    );
    drv(write_qwords(&vm.mem, addr, &good))?;
    drv(vm.d.issue_cmd_with_sync(CmdEnt::CfgiSte {
        sid: VSID,
        leaf: true,
    }))?;
    // IOVA_A still maps page_b: a DMA from it to edu and back to IOVA_A round-trips.
    fill(&vm.mem, vm.page_b, 0x66)?;
    Edu(&host.bar).dma(IOVA_A, EDU_BUF, 64, false)?;
    fill(&vm.mem, vm.page_b, 0x00)?;
    Edu(&host.bar).dma(EDU_BUF, IOVA_A, 64, true)?;
    ensure!(
        read64(&vm.mem, vm.page_b)? == [0x66; 64],
        "translation did not come back"
    );
    Ok(())
}

/// 5. SMMUEN and GBPA move the device between abort, bypass and translate, checked by DMA.
fn t5_gbpa_smmuen(host: &Host, vm: &mut Vm) -> anyhow::Result<()> {
    let d = &mut vm.d;
    let enables = CR0_CMDQEN | CR0_EVTQEN;
    // SMMUEN = 0 with GBPA bypassing: IOVA = IPA.
    drv(d.update_gbpa(0, GBPA_ABORT))?;
    drv(d.write_reg_sync(enables, ARM_SMMU_CR0, ARM_SMMU_CR0ACK))?;
    fill(&vm.mem, RAM_GPA + 0xa000, 0x12)?;
    fill(&vm.mem, RAM_GPA + 0xb000, 0)?;
    dma_copy(&host.bar, RAM_GPA + 0xa000, RAM_GPA + 0xb000)?;
    ensure!(
        read64(&vm.mem, RAM_GPA + 0xb000)? == [0x12; 64],
        "bypass: DMA to the IPA did not land"
    );
    // GBPA abort.
    drv(d.update_gbpa(GBPA_ABORT, 0))?;
    fill(&vm.mem, RAM_GPA + 0xb000, 0)?;
    let _ = dma_copy(&host.bar, RAM_GPA + 0xa000, RAM_GPA + 0xb000);
    ensure!(
        read64(&vm.mem, RAM_GPA + 0xb000)? == [0; 64],
        "GBPA abort: DMA landed"
    );
    // SMMUEN = 1: the STE translates again.
    drv(d.write_reg_sync(enables | CR0_SMMUEN, ARM_SMMU_CR0, ARM_SMMU_CR0ACK))?;
    fill(&vm.mem, vm.page_b, 0x21)?;
    Edu(&host.bar).dma(IOVA_A, EDU_BUF, 64, false)?;
    fill(&vm.mem, vm.page_b, 0)?;
    Edu(&host.bar).dma(EDU_BUF, IOVA_A, 64, true)?;
    ensure!(
        read64(&vm.mem, vm.page_b)? == [0x21; 64],
        "SMMUEN: no translation"
    );
    Ok(())
}

/// 6. A burst of TLBIs before one CMD_SYNC reaches the kernel in one IOMMU_HWPT_INVALIDATE (the
///    backend's log names each call) and every one takes effect.
fn t6_batched(host: &Host, vm: &mut Vm) -> anyhow::Result<()> {
    let pt = vm.pt.clone().context("no stage-1 table")?;
    let pages = 16u64;
    let base = 0x0020_0000;
    let mut old = Vec::new();
    let mut new = Vec::new();
    for i in 0..pages {
        let p = drv(vm.d.alloc_zeroed(0x1000, 0x1000))?;
        let q = drv(vm.d.alloc_zeroed(0x1000, 0x1000))?;
        drv(vm.d.map(&pt, base + i * 0x1000, p, 0x1000, prot::RW))?;
        old.push(p);
        new.push(q);
    }
    drv(vm.d.sync())?;
    let edu = Edu(&host.bar);
    fill(&vm.mem, vm.page_b, 0x01)?;
    edu.dma(IOVA_A, EDU_BUF, 64, false)?;
    // Warm the SMMU's TLB with the old mappings.
    for i in 0..pages {
        edu.dma(EDU_BUF, base + i * 0x1000, 64, true)?;
    }
    let mut cmds = Vec::new();
    for i in 0..pages {
        let leaf = pt.remap(&vm.mem, base + i * 0x1000, new[i as usize]);
        drv(leaf)?;
        cmds.push(CmdEnt::TlbiNhVa(Tlbi {
            asid: ASID,
            addr: base + i * 0x1000,
            leaf: true,
            ..Tlbi::default()
        }));
    }
    let before = host_invalidations()?.len();
    drv(vm.d.issue_cmds_with_sync(&cmds))?;
    let calls = host_invalidations()?;
    let new_calls = calls.get(before..).unwrap_or_default();
    ensure!(
        new_calls == [pages as usize],
        "the TLBI burst reached the kernel as {new_calls:?} (commands per IOMMU_HWPT_INVALIDATE)"
    );
    fill(&vm.mem, vm.page_b, 0x02)?;
    edu.dma(IOVA_A, EDU_BUF, 64, false)?;
    for i in 0..pages {
        edu.dma(EDU_BUF, base + i * 0x1000, 64, true)?;
    }
    for i in 0..pages as usize {
        ensure!(
            read64(&vm.mem, new[i])? == [0x02; 64],
            "page {i}: stale translation"
        );
        ensure!(
            read64(&vm.mem, old[i])? == [0x01; 64],
            "page {i}: old page written"
        );
    }
    Ok(())
}

/// 7. Detach leaves the device on its stage 2; after the session every object the backend made
///    is gone (a fresh vIOMMU + vDEVICE for the device succeeds); a second session works.
fn t7_detach_and_second_session(host: &Host, vm: Vm) -> anyhow::Result<Vm> {
    let Vm {
        mut qemu,
        mem,
        _backend: backend,
        ..
    } = vm;
    qemu.detach(1)?;
    fill(&mem, RAM_GPA + 0xc000, 0x3c)?;
    fill(&mem, RAM_GPA + 0xd000, 0)?;
    dma_copy(&host.bar, RAM_GPA + 0xc000, RAM_GPA + 0xd000)?;
    ensure!(
        read64(&mem, RAM_GPA + 0xd000)? == [0x3c; 64],
        "after DETACH the device is not on its stage 2"
    );
    let ram = qemu.take_ram().context("no RAM")?;
    drop(mem);
    end_session(qemu, backend)?;
    // Nothing of the backend's is left: the device takes a new vIOMMU and vDEVICE.
    let mut probe = Iommufd::new(host.iommufd.dup()?)?;
    let viommu = probe.alloc_viommu(host.dev_id, host.s2)?;
    let vdev = probe.alloc_vdevice(viommu, host.dev_id, u64::from(VSID))?;
    probe.destroy(vdev)?;
    probe.destroy(viommu)?;
    // A second session on the same fds.
    let mut vm = vm_again(host, ram)?;
    t2_s1_dma(host, &mut vm)?;
    Ok(vm)
}

fn vm_again(host: &Host, ram: MemfdRam) -> anyhow::Result<Vm> {
    vm(host, ram)
}

/// Ends a session the way QEMU does (closing the connection), waits until the backend has torn
/// it down (it answers the next connection only then), and stops the backend.
fn end_session(qemu: MockQemu, backend: BackendProcess) -> anyhow::Result<()> {
    qemu.close()?;
    let socket = backend.socket().to_owned();
    let mut next = MockQemu::connect(&socket, Duration::from_secs(20))?;
    next.negotiate()?;
    next.close()?;
    drop(backend);
    Ok(())
}

/// 8. The double's rules against the real kernel: vSTE bits and configs, opcodes and fields,
///    and `entry_num` on a refused command.
fn t8_rules(host: &Host) -> anyhow::Result<()> {
    let mut k = Iommufd::new(host.iommufd.dup()?)?;
    let hw = k.hw_info(host.dev_id)?;
    let caps = HostCaps::from_hw_info(&hw);
    let viommu = k.alloc_viommu(host.dev_id, host.s2)?;
    let vdev = k.alloc_vdevice(viommu, host.dev_id, u64::from(VSID))?;
    let mut mismatches = Vec::new();
    let stes: [[u64; 2]; 7] = [
        [1, 0],
        [9, 0],
        [
            0xb | (RAM_GPA & !0x3f),
            0x1 | (1 << 2) | (1 << 4) | (3 << 6),
        ],
        [0xd, 0],
        [9, 1 << 44],
        [0xb | (RAM_GPA & !0x3f), 2 << 28],
        [0xb | (1 << 55), 0],
    ];
    for ste in stes {
        let kernel = k.alloc_nested_hwpt(viommu, host.dev_id, ste);
        let ours = rules::validate_vste(ste);
        if let Ok(h) = &kernel {
            k.destroy(*h)?;
        }
        if kernel.is_ok() != ours.is_ok() {
            mismatches.push(format!("vSTE {ste:x?}: kernel {kernel:?}, rules {ours:?}"));
        }
    }
    let cmds: [[u64; 2]; 8] = [
        [0x10, 0],
        [0x30, 0],
        [0x06 | (u64::from(VSID) << 32), 0],
        [0x01, 0],
        [0x46, 0],
        [0x30 | (1 << 12), 0],
        [0x12 | (1 << 48), 0x1000 | (1 << 10) | (3 << 8) | 1],
        [0x12 | (1 << 48), 0x1000 | (1 << 10)],
    ];
    let known = |sid: u32| sid == VSID;
    for cmd in cmds {
        let kernel = k.invalidate(viommu, &[cmd]);
        let ours = rules::validate_cmd(&cmd, &caps, known);
        if kernel.is_ok() != ours.is_ok() {
            mismatches.push(format!(
                "command {cmd:x?}: kernel {kernel:?}, rules {ours:?}"
            ));
        }
    }
    // entry_num: three good commands, then a refused one.
    let batch = [[0x10, 0], [0x30, 0], [0x10, 0], [0x01, 0], [0x10, 0]];
    match k.invalidate(viommu, &batch) {
        Err(e) if e.done == 3 => {}
        other => mismatches.push(format!("entry_num after a refused 4th command: {other:?}")),
    }
    k.destroy(vdev)?;
    k.destroy(viommu)?;
    ensure!(mismatches.is_empty(), "{}", mismatches.join("; "));
    Ok(())
}

/// The iommufd objects the backend records in its host record (docs/protocol.md 10.11), which
/// the frontend holds under key 0: every object the backend made (not the S2 parent).
fn recorded_objects(qemu: &MockQemu) -> anyhow::Result<Vec<u32>> {
    let fd = {
        let state = qemu.channel_state();
        let record = state
            .held
            .get(&0)
            .context("the frontend holds no host record")?;
        record.try_clone()?
    };
    let state = HostRecord::adopt(fd)?.read()?;
    let mut ids = Vec::new();
    for v in &state.viommus {
        ids.extend([v.id, v.abort, v.bypass]);
        ids.extend(v.veventq);
    }
    for d in state.devices.values() {
        ids.extend(d.vdevice);
        ids.extend(d.nested);
    }
    Ok(ids)
}

/// 9. kill -9 of the backend while edu DMAs through the nested HWPT: the DMA goes on while no
///    backend is there; a new backend resumes from the region and the descriptors the frontend
///    held, adopting the objects (the same IDs, nothing made afresh); a fault raised while no
///    backend was there and one raised after the restart both reach the guest's event queue;
///    after the session no object either backend made is left in the iommufd.
fn t9_kill_during_dma(host: &Host, ram: MemfdRam) -> anyhow::Result<()> {
    let socket = std::env::temp_dir().join(format!("vsmmu-kill-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let spawn = |log: &str| -> anyhow::Result<BackendProcess> {
        let log = std::fs::File::create(log).context("creating a backend log")?;
        BackendProcess::spawn_logging(&host.backend, &socket, &["--log-level", "info"], Some(log))
    };
    let backend = spawn("/tmp/viommu-backend-killed.log")?;
    let mut qemu = MockQemu::connect(&socket, Duration::from_secs(20))?.with_shared_region(true);
    let features = qemu.negotiate()?;
    ensure!(
        features.contains(Features::RESUME | Features::HOLD_FDS),
        "the backend does not offer RESUME and HOLD_FDS: {features:?}"
    );
    qemu.start_on(config(), ram)?;
    qemu.set_iommufd(host.iommufd.dup()?)?;
    qemu.attach_passthrough(1, VSID, host.dev_id, host.s2, host.cdev.dup()?)?;
    let mem = qemu.mem()?.clone();
    let mut d = drv(Driver::probe(
        qemu.port(),
        mem.clone(),
        BumpAllocator::new(RAM_GPA + 0x10_0000, RAM_GPA + RAM_SIZE),
        DriverConfig::default(),
    ))?;
    drv(d.reset())?;
    let (pt, page_a, page_b) = swapped_domain(&mut d)?;
    let before = recorded_objects(&qemu)?;
    ensure!(
        before.len() == 6,
        "recorded objects {before:?}: a vIOMMU, abort and bypass HWPTs, a vEVENTQ, a vDEVICE, \
         a nested HWPT"
    );

    // DMA copies back to back (each takes edu's 100 ms); 300 ms in, the backend is killed.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(backend);
        Instant::now()
    });
    let mut landed = Vec::new();
    for round in 0..12u8 {
        let pattern = 0x80 | round;
        fill(&mem, page_b, pattern)?;
        fill(&mem, page_a, 0)?;
        dma_copy(&host.bar, IOVA_A, IOVA_B)?;
        ensure!(
            read64(&mem, page_a)? == [pattern; 64],
            "DMA round {round} did not land"
        );
        landed.push(Instant::now());
    }
    let killed = killer
        .join()
        .map_err(|_| anyhow::anyhow!("the killer panicked"))?;
    let after_kill = landed.iter().filter(|t| **t > killed).count();
    ensure!(
        after_kill >= 3,
        "only {after_kill} DMA rounds ran after the kill"
    );
    // Still no backend: the device faults, and the kernel queues the event in the vEVENTQ that
    // only the frontend holds open now.
    const IOVA_UNMAPPED: u64 = 0x0030_0000;
    let _ = Edu(&host.bar).dma(IOVA_UNMAPPED, EDU_BUF, 64, false);

    // A new backend, as systemd or reconnect-ms brings one.
    let restart = Instant::now();
    let backend = spawn("/tmp/viommu-backend-resumed.log")?;
    let mut qemu = qemu.resume_on(&socket)?;
    qemu.attach_passthrough(1, VSID, host.dev_id, host.s2, host.cdev.dup()?)?;
    println!(
        "     9: {after_kill} of 12 DMA rounds ran with no backend; new backend started to \
         device adopted in {} ms",
        restart.elapsed().as_millis()
    );
    d.port = qemu.port();
    wait_event(&mut d, id::F_TRANSLATION).context("the fault raised while no backend was there")?;
    let after = recorded_objects(&qemu)?;
    ensure!(
        after == before,
        "objects {before:?} became {after:?}: not adopted"
    );
    let log = std::fs::read_to_string("/tmp/viommu-backend-resumed.log")?;
    for want in [
        "adopted with the fd the frontend held",
        "passthrough device 1: adopted",
    ] {
        ensure!(log.contains(want), "the new backend's log lacks \"{want}\"");
    }

    // The guest goes on: DMA, then an unmap whose invalidation reaches the kernel through the
    // new backend, and the fault after it.
    fill(&mem, page_b, 0x3d)?;
    fill(&mem, page_a, 0)?;
    dma_copy(&host.bar, IOVA_A, IOVA_B)?;
    ensure!(
        read64(&mem, page_a)? == [0x3d; 64],
        "DMA after the resume did not land"
    );
    drv(pt.unmap(&mem, IOVA_B))?;
    drv(d.issue_cmds_with_sync(&[CmdEnt::TlbiNhVa(Tlbi {
        asid: ASID,
        addr: IOVA_B,
        leaf: true,
        ..Tlbi::default()
    })]))?;
    drv(d.evtq_thread())?;
    fill(&mem, page_a, 0)?;
    let _ = dma_copy(&host.bar, IOVA_A, IOVA_B);
    ensure!(
        read64(&mem, page_a)? == [0; 64],
        "DMA reached the unmapped page"
    );
    wait_event(&mut d, id::F_TRANSLATION).context("the fault raised after the restart")?;

    // The VM ends: every object of either backend is gone from the iommufd.
    let last = recorded_objects(&qemu)?;
    drop(d);
    drop(mem);
    end_session(qemu, backend)?;
    let mut probe = Iommufd::new(host.iommufd.dup()?)?;
    let mut left = Vec::new();
    for id in before.iter().chain(&last) {
        match probe.destroy(*id) {
            Err(HostError::Kernel { errno, .. }) if errno == rustix::io::Errno::NOENT => {}
            other => left.push(format!("{id}: {other:?}")),
        }
    }
    ensure!(left.is_empty(), "objects left behind: {}", left.join(", "));
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut backend = PathBuf::from("/lab/viommu-backend");
    let mut cdev = String::from("/dev/vfio/devices/vfio0");
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--backend", Some(v)) => backend = PathBuf::from(v),
            ("--cdev", Some(v)) => cdev = v,
            _ => {
                eprintln!("usage: viommu-lab [--backend PATH] [--cdev PATH]");
                return ExitCode::from(2);
            }
        }
    }
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut report = |name: &str, r: anyhow::Result<()>| match r {
        Ok(()) => {
            passed += 1;
            println!("ok   {name}");
        }
        Err(e) => {
            failed += 1;
            println!("FAIL {name}: {e:#}");
        }
    };
    match run(&backend, &cdev, &mut report) {
        Ok(()) => {}
        Err(e) => report("lab set-up", Err(e)),
    }
    if failed > 0
        && let Ok(log) = std::fs::read_to_string(BACKEND_LOG)
    {
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        println!("backend log (last lines):");
        for line in tail.iter().rev() {
            println!("  {line}");
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(
    backend: &std::path::Path,
    cdev: &str,
    report: &mut dyn FnMut(&str, anyhow::Result<()>),
) -> anyhow::Result<()> {
    let (host, ram) = host(backend.to_owned(), cdev)?;
    let mut vm = vm(&host, ram)?;
    report(
        "1 session with the iommufd and cdev over the socket",
        t1_session(&host, &mut vm),
    );
    report(
        "2 stage 1 over stage 2: edu DMA lands",
        t2_s1_dma(&host, &mut vm),
    );
    report(
        "3 unmap: fault through the vEVENTQ",
        t3_unmap_fault(&host, &mut vm),
    );
    report(
        "4 refused vSTE: C_BAD_STE, device safe",
        t4_rejected_vste(&host, &mut vm),
    );
    report(
        "5 GBPA and SMMUEN transitions",
        t5_gbpa_smmuen(&host, &mut vm),
    );
    report(
        "6 batched invalidations take effect",
        t6_batched(&host, &mut vm),
    );
    // Guest RAM is the memfd the IOAS maps: test 9 needs it back.
    let mut ram = None;
    match t7_detach_and_second_session(&host, vm) {
        Ok(vm) => {
            report("7 detach, cleanup, a second session", Ok(()));
            let Vm {
                mut qemu,
                d,
                mem,
                _backend: backend,
                ..
            } = vm;
            drop(d);
            drop(mem);
            ram = qemu.take_ram();
            end_session(qemu, backend)?;
        }
        Err(e) => report("7 detach, cleanup, a second session", Err(e)),
    }
    report(
        "8 the double's rules agree with the kernel",
        t8_rules(&host),
    );
    report(
        "9 kill -9 during DMA: resumed, objects adopted, no event lost",
        ram.context("no guest RAM left by test 7")
            .and_then(|ram| t9_kill_during_dma(&host, ram)),
    );
    Ok(())
}
