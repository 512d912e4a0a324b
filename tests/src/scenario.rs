//! The scripted Linux-like session: what QEMU and a Linux guest do with a vSMMU, from machine
//! creation to reset, driven over the real protocol. The demo prints its trace; the
//! integration tests check its report.

use anyhow::{Context, bail, ensure};
use viommu_protocol::{
    Access, AddressSpace, ConfigFlags, Features, IotlbInvalidate, IrqIndex, ModelConfig,
};
use vm_memory::{Bytes, GuestAddress};

use crate::channel::Notification;
use crate::guest::cmd::{CmdEnt, Tlbi, tlb_inv_range};
use crate::guest::event::{Event, id};
use crate::guest::pgtable::{Granule, prot};
use crate::guest::regs::{
    ARM_SMMU_EVTQ_IRQ_CFG0, ARM_SMMU_EVTQ_IRQ_CFG1, ARM_SMMU_EVTQ_IRQ_CFG2, ARM_SMMU_IRQ_CTRL,
    ARM_SMMU_IRQ_CTRLACK, IRQ_CTRL_EVTQ_IRQEN, IRQ_CTRL_GERROR_IRQEN,
};
use crate::guest::{BumpAllocator, Driver, DriverConfig};
use crate::port::SocketPort;
use crate::{Dma, MockQemu};

/// GITS_TRANSLATER of the ITS on QEMU's virt machine: where Linux points the vSMMU's MSIs.
pub const ITS_DOORBELL: u64 = 0x0809_0040;
/// The event ID Linux's platform-MSI domain gives the event-queue interrupt.
pub const EVTQ_MSI_DATA: u32 = 0x20;

/// Guest RAM of the scenario.
pub const RAM_SIZE: u64 = 64 << 20;
/// The guest driver allocates its tables and queues from here up.
pub const ALLOC_START: u64 = 1 << 20;

/// The model QEMU's `arm-smmuv3` asks for by default, with MSI completion.
pub fn default_config() -> ModelConfig {
    ModelConfig {
        flags: ConfigFlags::STAGE1 | ConfigFlags::RIL | ConfigFlags::MSI,
        oas_bits: 44,
        ssid_bits: 16,
        sid_bits: 16,
        cmdq_log2: 19,
        evtq_log2: 19,
    }
}

/// An emulated PCI device of the scenario.
#[derive(Debug, Clone, Copy)]
pub struct Device {
    /// Frontend handle.
    pub handle: u32,
    /// Requester ID (bus << 8 | devfn).
    pub sid: u32,
    /// The granule of its stage-1 domain.
    pub granule: Granule,
    /// The ASID Linux gives its domain.
    pub asid: u16,
    /// Where its DMA buffer is mapped.
    pub iova: u64,
}

/// The devices: virtio-net at 00:01.0, an NVMe at 00:02.0, a GPU at 01:00.0, each with a
/// different granule.
pub const DEVICES: [Device; 3] = [
    Device {
        handle: 1,
        sid: 0x0008,
        granule: Granule::G4K,
        asid: 1,
        iova: 0x1_0000_0000,
    },
    Device {
        handle: 2,
        sid: 0x0010,
        granule: Granule::G16K,
        asid: 2,
        iova: 0x2_0000_0000,
    },
    Device {
        handle: 3,
        sid: 0x0100,
        granule: Granule::G64K,
        asid: 3,
        iova: 0x3_0000_0000,
    },
];

/// What the session showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Features negotiated.
    pub features: Features,
    /// STEs installed by the guest.
    pub stes: usize,
    /// DMA accesses that went through the vSMMU and landed where the guest mapped them.
    pub translations: u64,
    /// Of those, answered from the frontend's cache.
    pub cache_hits: u64,
    /// IOTLB_INVALIDATE messages received.
    pub invalidations: usize,
    /// SET_ADDRESS_SPACE messages received.
    pub address_space_changes: usize,
    /// MSI_WRITE messages received (interrupts as MSIs to a doorbell outside RAM).
    pub msi_writes: usize,
    /// Events the guest read from its event queue.
    pub events: Vec<Event>,
    /// Event-queue interrupts signalled.
    pub evtq_irqs: u64,
    /// GET_DEVICE_SIDS questions answered (the backend confirms where the devices are before
    /// it applies changed STEs).
    pub sid_confirmations: usize,
}

type Guest<'a> = MockGuest;

/// A guest driver on a mock QEMU's register window and RAM.
pub type MockGuest = Driver<SocketPort, vm_memory::GuestMemoryMmap<()>>;

/// A guest driver probed (`arm_smmu_device_probe`, default configuration) on `qemu`, its tables
/// and queues allocated from [`ALLOC_START`] up to `ram_size`; not reset yet.
pub fn probed_guest(qemu: &MockQemu, ram_size: u64) -> anyhow::Result<MockGuest> {
    Driver::probe(
        qemu.port(),
        qemu.mem()?.clone(),
        BumpAllocator::new(ALLOC_START, ram_size),
        DriverConfig::default(),
    )
    .map_err(|e| anyhow::anyhow!("probe: {e:?}"))
}

/// Runs the whole scenario on a connected, fresh session. `trace` receives one line per step.
pub fn linux_session(qemu: &mut MockQemu, trace: &mut dyn FnMut(&str)) -> anyhow::Result<Report> {
    // Machine creation: negotiate, hand over RAM, IRQs and the channel, configure, attach the
    // devices behind the vSMMU (QEMU's realize order).
    let mut report = Report {
        features: qemu.negotiate().context("feature negotiation")?,
        stes: 0,
        translations: 0,
        cache_hits: 0,
        invalidations: 0,
        address_space_changes: 0,
        msi_writes: 0,
        events: Vec::new(),
        evtq_irqs: 0,
        sid_confirmations: 0,
    };
    trace(&format!("negotiated features: {:?}", report.features));
    qemu.start(default_config(), RAM_SIZE)
        .context("configuring the vSMMU")?;
    trace(&format!(
        "guest RAM {} MiB (memfd), 4 IRQ eventfds, backend channel, model configured",
        RAM_SIZE >> 20
    ));
    for dev in DEVICES {
        qemu.attach(dev.handle, dev.sid)?;
    }
    let spaces = qemu.channel_state().spaces.clone();
    for dev in DEVICES {
        ensure!(
            spaces.get(&dev.handle) == Some(&AddressSpace::System),
            "device {} should bypass the disabled vSMMU, frontend has {:?}",
            dev.handle,
            spaces.get(&dev.handle)
        );
    }
    trace("attached 3 emulated devices; with SMMUEN = 0 they bypass (address space: system)");

    // The guest boots: arm_smmu_device_probe.
    let mem = qemu.mem()?.clone();
    let mut d: Guest<'_> = probed_guest(qemu, RAM_SIZE)?;
    check_port(&mut d)?;
    trace(&format!(
        "guest probed IDR0 {:#010x} IDR1 {:#010x} IDR5 {:#010x}: {}-level stream table, {} SID bits, OAS {} bits",
        d.info.idr[0],
        d.info.idr[1],
        d.info.idr[5],
        if d.info.two_lvl_strtab { 2 } else { 1 },
        d.info.sid_bits,
        d.info.oas
    ));
    d.reset().map_err(|e| anyhow::anyhow!("reset: {e:?}"))?;
    check_port(&mut d)?;
    trace("guest enabled the vSMMU: queues, stream table, IRQs, SMMUEN = 1 (unused STEs abort)");
    for dev in DEVICES {
        let space = qemu.channel_state().spaces.get(&dev.handle).copied();
        ensure!(
            space == Some(AddressSpace::Translated),
            "device {} should be translated after SMMUEN, frontend has {space:?}",
            dev.handle
        );
    }
    trace("frontend told: every device now translated");

    // Per device: a stage-1 domain, a DMA buffer mapped at a non-identity IOVA.
    let mut domains = Vec::new();
    for dev in DEVICES {
        let pt = d
            .new_s1_pgtable(dev.granule)
            .map_err(|e| anyhow::anyhow!("page table: {e:?}"))?;
        let size = dev.granule.size();
        let buffer = d
            .alloc_zeroed(size, size)
            .map_err(|e| anyhow::anyhow!("buffer: {e:?}"))?;
        d.map(&pt, dev.iova, buffer, size, prot::RW)
            .map_err(|e| anyhow::anyhow!("map: {e:?}"))?;
        let domain = d
            .attach_s1(dev.sid, pt, dev.asid)
            .map_err(|e| anyhow::anyhow!("attach: {e:?}"))?;
        check_port(&mut d)?;
        report.stes = report.stes.saturating_add(1);
        trace(&format!(
            "SID {:#06x}: STE installed (S1, {} KiB granule, ASID {}), IOVA {:#x} -> PA {buffer:#x}",
            dev.sid,
            size >> 10,
            dev.asid,
            dev.iova
        ));
        domains.push((dev, domain, buffer));
    }

    // DMA through the vSMMU: each device writes a pattern and reads it back.
    for (dev, _, buffer) in &domains {
        let offset = 0x123 & !7;
        let pattern = u64::from(dev.handle).wrapping_mul(0x0101_0101_0101_0101);
        let iova = dev.iova.wrapping_add(offset);
        match qemu.dma_write(dev.handle, None, iova, &pattern.to_le_bytes())? {
            Dma::Address { gpa, .. } => ensure!(
                gpa == buffer.wrapping_add(offset),
                "device {} DMA to {iova:#x} went to {gpa:#x}, mapped at {:#x}",
                dev.handle,
                buffer.wrapping_add(offset)
            ),
            Dma::Fault { event } => bail!("device {} DMA faulted: event {event:#x}", dev.handle),
        }
        let landed: u64 = mem
            .read_obj(GuestAddress(buffer.wrapping_add(offset)))
            .context("reading the DMA buffer")?;
        ensure!(landed == pattern, "the DMA data did not land");
        let mut back = [0u8; 8];
        let dma = qemu.dma_read(dev.handle, None, iova, &mut back)?;
        ensure!(
            matches!(dma, Dma::Address { cached: true, .. }),
            "the second access should hit the frontend's cache: {dma:?}"
        );
        ensure!(u64::from_le_bytes(back) == pattern, "DMA read back differs");
        trace(&format!(
            "device {} DMA write+read at IOVA {iova:#x} -> PA {:#x} (TRANSLATE, then cache hit)",
            dev.handle,
            buffer.wrapping_add(offset)
        ));
    }

    // Unmap device 1's buffer the way iommu_unmap does: clear the PTE, TLBI by VA, CMD_SYNC.
    let (dev, domain, _) = domains.first().context("no device")?;
    let (dev, unmapped_iova) = (*dev, dev.iova);
    let size = domain
        .pt
        .unmap(&mem, unmapped_iova)
        .map_err(|e| anyhow::anyhow!("unmap: {e:?}"))?
        .context("nothing was mapped")?;
    let log_before = qemu.channel_state().log.len();
    let cmds = tlb_inv_range(
        CmdEnt::TlbiNhVa(Tlbi {
            asid: dev.asid,
            ..Tlbi::default()
        }),
        unmapped_iova,
        size,
        size,
        true,
        dev.granule.shift(),
        d.info.range_inv,
    );
    d.issue_cmds_with_sync(&cmds)
        .map_err(|e| anyhow::anyhow!("TLBI: {e:?}"))?;
    check_port(&mut d)?;
    let dropped: usize = qemu
        .channel_state()
        .log
        .iter()
        .skip(log_before)
        .filter_map(|n| match n {
            Notification::Invalidate { inv, dropped } if covers(inv, unmapped_iova) => {
                Some(*dropped)
            }
            _ => None,
        })
        .sum();
    // With the shared region the backend clears its cache itself and sends nothing; the
    // DMA below shows the stale translation is gone either way.
    if qemu.shared().is_some() {
        ensure!(
            dropped == 0,
            "IOTLB_INVALIDATE sent to a device that asked for no notifications"
        );
    } else {
        ensure!(
            dropped >= 1,
            "the TLBI did not invalidate the frontend's cached translation"
        );
    }
    trace(&format!(
        "guest unmapped IOVA {unmapped_iova:#x}: TLBI_NH_VA + CMD_SYNC; frontend told IOTLB_INVALIDATE, {dropped} cached translation dropped"
    ));

    // The device uses the stale IOVA: F_TRANSLATION, an event, an interrupt.
    qemu.take_irqs(IrqIndex::Evtq);
    match qemu.dma_write(dev.handle, None, unmapped_iova, &[0xff; 4])? {
        Dma::Fault { event } => ensure!(
            event == id::F_TRANSLATION,
            "expected F_TRANSLATION, got {event:#x}"
        ),
        Dma::Address { gpa, .. } => bail!("DMA to an unmapped IOVA went to {gpa:#x}"),
    }
    report.evtq_irqs = qemu.take_irqs(IrqIndex::Evtq);
    ensure!(report.evtq_irqs >= 1, "no event-queue interrupt");
    let batch = d
        .evtq_thread()
        .map_err(|e| anyhow::anyhow!("event queue: {e:?}"))?;
    check_port(&mut d)?;
    let event = batch.events.first().copied().context("no event recorded")?;
    ensure!(
        event.id() == id::F_TRANSLATION
            && event.sid() == dev.sid
            && event.input_addr() == unmapped_iova
            && !event.rnw(),
        "wrong event: {event:x?}"
    );
    trace(&format!(
        "DMA to the unmapped IOVA faulted; EVTQ IRQ; guest read F_TRANSLATION SID {:#06x} addr {:#x} (write)",
        event.sid(),
        event.input_addr()
    ));
    report.events = batch.events;

    // Linux with platform MSIs: the event interrupt becomes an MSI to the GIC ITS doorbell
    // (GITS_TRANSLATER of QEMU virt's ITS). A second fault arrives as MSI_WRITE.
    let irqen = IRQ_CTRL_EVTQ_IRQEN | IRQ_CTRL_GERROR_IRQEN;
    d.write_reg_sync(0, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .map_err(|e| anyhow::anyhow!("IRQ_CTRL: {e:?}"))?;
    d.write64(ARM_SMMU_EVTQ_IRQ_CFG0, ITS_DOORBELL);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG1, EVTQ_MSI_DATA);
    d.write32(ARM_SMMU_EVTQ_IRQ_CFG2, 1);
    d.write_reg_sync(irqen, ARM_SMMU_IRQ_CTRL, ARM_SMMU_IRQ_CTRLACK)
        .map_err(|e| anyhow::anyhow!("IRQ_CTRL: {e:?}"))?;
    check_port(&mut d)?;
    let second = DEVICES.get(1).copied().context("no second device")?;
    let stray = second
        .iova
        .wrapping_add(second.granule.size().wrapping_mul(4));
    let log_before = qemu.channel_state().log.len();
    let mut buf = [0u8; 4];
    match qemu.dma_read(second.handle, None, stray, &mut buf)? {
        Dma::Fault { event } => ensure!(event == id::F_TRANSLATION, "event {event:#x}"),
        Dma::Address { gpa, .. } => bail!("DMA to an unmapped IOVA went to {gpa:#x}"),
    }
    let doorbell = qemu.channel_state().log.iter().skip(log_before).any(|n| {
        matches!(n, Notification::MsiWrite { address, data, in_ram: false }
            if *address == ITS_DOORBELL && *data == EVTQ_MSI_DATA)
    });
    ensure!(doorbell, "the event MSI did not reach the ITS doorbell");
    let batch = d
        .evtq_thread()
        .map_err(|e| anyhow::anyhow!("event queue: {e:?}"))?;
    check_port(&mut d)?;
    let event = batch.events.first().copied().context("no event recorded")?;
    ensure!(
        event.id() == id::F_TRANSLATION && event.sid() == second.sid && event.rnw(),
        "wrong event: {event:x?}"
    );
    trace(&format!(
        "event IRQ switched to MSI: DMA read at {stray:#x} faulted, MSI_WRITE {EVTQ_MSI_DATA:#x} to ITS doorbell {ITS_DOORBELL:#x}, guest read F_TRANSLATION SID {:#06x} (read)",
        event.sid()
    ));
    report.events.extend(batch.events);

    // The guest renumbers bus 1 to bus 2: the GPU is at SID 0x200 now, which the backend has
    // never seen; it asks the frontend where every device is, then applies the STE.
    let gpu = DEVICES.get(2).copied().context("no GPU")?;
    let new_sid = 0x0200;
    qemu.set_sid(gpu.handle, new_sid);
    let log_before_move = qemu.channel_state().log.len();
    let (_, gpu_domain, _) = domains.get(2).context("no GPU domain")?;
    let ste = crate::guest::ste::make_cdtable_ste(
        &gpu_domain.table.ste_ptr(),
        crate::guest::ste::STRTAB_STE_1_S1DSS_SSID0,
        false,
        false,
    );
    d.write_ste(new_sid, &ste)
        .map_err(|e| anyhow::anyhow!("STE: {e:?}"))?;
    check_port(&mut d)?;
    report.stes = report.stes.saturating_add(1);
    let asked = qemu
        .channel_state()
        .log
        .iter()
        .skip(log_before_move)
        .any(|n| matches!(n, Notification::DeviceSids { count } if *count == DEVICES.len()));
    // Pulled SIDs are asked for on every STE change; pushed ones (the shared region) never.
    let pushed = qemu.shared().is_some();
    ensure!(
        asked != pushed,
        "the backend {} where the devices are after the STE of SID {new_sid:#x} changed",
        if pushed { "asked" } else { "did not ask" }
    );
    qemu.channel_state().cache = crate::channel::TranslationCache::default();
    match qemu.translate(gpu.handle, None, gpu.iova, Access::READ)? {
        Dma::Address { .. } => {}
        Dma::Fault { event } => bail!("the GPU at its new SID faulted: {event:#x}"),
    }
    trace(&format!(
        "guest moved the GPU to SID {new_sid:#06x}: backend asked GET_DEVICE_SIDS, frontend answered device {} there; DMA translates",
        gpu.handle
    ));

    // System reset: the vSMMU is disabled, devices bypass again.
    qemu.reset()?;
    let spaces = qemu.channel_state().spaces.clone();
    ensure!(
        spaces.values().all(|s| *s == AddressSpace::System),
        "after RESET every device should bypass: {spaces:?}"
    );
    trace("RESET: vSMMU disabled, every device back to the system address space");

    let state = qemu.channel_state();
    for n in &state.log {
        match n {
            Notification::Invalidate { .. } => {
                report.invalidations = report.invalidations.saturating_add(1)
            }
            Notification::AddressSpace { .. } => {
                report.address_space_changes = report.address_space_changes.saturating_add(1);
            }
            Notification::MsiWrite { .. } => {
                report.msi_writes = report.msi_writes.saturating_add(1)
            }
            Notification::DeviceSids { .. } => {
                report.sid_confirmations = report.sid_confirmations.saturating_add(1);
            }
            Notification::ResolveSid { .. }
            | Notification::Hold { .. }
            | Notification::Release { .. } => {}
        }
    }
    drop(state);
    report.translations = qemu.sent().translates;
    report.cache_hits = qemu.sent().cache_hits;
    Ok(report)
}

fn covers(inv: &IotlbInvalidate, iova: u64) -> bool {
    inv.start <= iova && iova <= inv.last
}

fn check_port(d: &mut Guest<'_>) -> anyhow::Result<()> {
    match d.port.take_error() {
        Some(e) => Err(e).context("a register access failed"),
        None => Ok(()),
    }
}
