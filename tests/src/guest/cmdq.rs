//! The command queue producer: Linux's `arm_smmu_cmdq_issue_cmdlist()` for a single CPU.

use std::time::{Duration, Instant};

use super::bits::get32;
use super::cmd::{CMDQ_SYNC_0_CS, CMDQ_SYNC_0_CS_NONE, CmdEnt, Command};
use super::mem::{GuestRam, read_u32, write_qwords};
use super::port::SmmuPort;
use super::queue::LlQueue;
use super::regs::{
    ARM_SMMU_CMDQ_CONS, ARM_SMMU_CMDQ_PROD, ARM_SMMU_GERROR, ARM_SMMU_GERRORN, CMDQ_CONS_ERR,
    CMDQ_ENT_DWORDS, GERROR_CMDQ_ERR,
};
use super::{DriverError, Result};

/// How many times a poll loop reads before giving up (`ARM_SMMU_POLL_TIMEOUT_US`).
pub const POLL_LIMIT: u32 = 100_000;

/// How long an MSI-polled CMD_SYNC is waited for (Linux's ARM_SMMU_POLL_TIMEOUT_US).
pub const MSI_POLL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an MSI poll waits between two looks at GERROR (standing in for its interrupt).
pub const GERROR_CHECK_PERIOD: Duration = Duration::from_micros(500);

/// How a CMD_SYNC's completion is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncWait {
    /// CS = SEV; poll CONS until it passes the sync (`arm_smmu_cmdq_poll_until_consumed`).
    Sev,
    /// CS = IRQ with MSIADDR = the sync's own slot; poll its first word for 0
    /// (`arm_smmu_cmdq_poll_until_msi`, ARM_SMMU_OPT_MSIPOLL).
    MsiPoll,
    /// CS = NONE (`arm_smmu_cmdq_needs_busy_polling`); poll CONS.
    None,
}

/// The command queue as the driver tracks it.
#[derive(Debug, Clone)]
pub struct Cmdq {
    /// Guest physical address of entry 0.
    pub base: u64,
    /// Shadow PROD/CONS.
    pub llq: LlQueue,
}

impl Cmdq {
    /// A queue of `2^shift` 16-byte commands at `base`.
    pub fn new(base: u64, shift: u8) -> Self {
        Self {
            base,
            llq: LlQueue::new(shift),
        }
    }

    /// The CMDQ_BASE value Linux writes.
    pub fn q_base(&self) -> u64 {
        self.llq.q_base(self.base)
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.llq.bytes(CMDQ_ENT_DWORDS)
    }

    /// `Q_ENT`: the address of the slot a PROD/CONS value points at.
    pub fn entry_addr(&self, p: u32) -> Result<u64> {
        self.llq
            .entry_addr(self.base, p, CMDQ_ENT_DWORDS)
            .ok_or(DriverError::Overflow)
    }

    /// The command error, if GERROR.CMDQ_ERR is active (the interrupt Linux would take).
    fn check_error<P: SmmuPort>(port: &mut P) -> Result<()> {
        let active = (port.read(ARM_SMMU_GERROR, 4) ^ port.read(ARM_SMMU_GERRORN, 4)) as u32;
        if active & GERROR_CMDQ_ERR != 0 {
            let cons = port.read(ARM_SMMU_CMDQ_CONS, 4) as u32;
            return Err(DriverError::Command {
                cons,
                error: get32(CMDQ_CONS_ERR, cons),
            });
        }
        Ok(())
    }

    /// Re-reads CONS (`queue_sync_cons_in`).
    pub fn sync_cons_in<P: SmmuPort>(&mut self, port: &mut P) {
        self.llq.cons = port.read(ARM_SMMU_CMDQ_CONS, 4) as u32;
    }

    /// `arm_smmu_cmdq_poll_until_not_full`, for room for `n` entries.
    fn wait_for_space<P: SmmuPort>(&mut self, port: &mut P, n: u32) -> Result<()> {
        for _ in 0..POLL_LIMIT {
            if self.llq.has_space(n) {
                return Ok(());
            }
            self.sync_cons_in(port);
            Self::check_error(port)?;
        }
        Err(DriverError::Timeout("command queue full"))
    }

    /// Writes `cmds` (and a CMD_SYNC when `sync` is set) at PROD, publishes them with one
    /// PROD write and, for a sync, waits for its completion.
    pub fn issue<P: SmmuPort, M: GuestRam>(
        &mut self,
        port: &mut P,
        mem: &M,
        cmds: &[Command],
        sync: Option<SyncWait>,
    ) -> Result<()> {
        let capacity = self.llq.entries().saturating_sub(1).max(1) as usize;
        let mut chunks: Vec<&[Command]> = cmds.chunks(capacity).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let with_sync = if i == last { sync } else { None };
            self.issue_batch(port, mem, chunk, with_sync)?;
        }
        Ok(())
    }

    fn issue_batch<P: SmmuPort, M: GuestRam>(
        &mut self,
        port: &mut P,
        mem: &M,
        cmds: &[Command],
        sync: Option<SyncWait>,
    ) -> Result<()> {
        let n = u32::try_from(cmds.len())
            .map_err(|_| DriverError::Overflow)?
            .saturating_add(u32::from(sync.is_some()));
        if n == 0 {
            return Ok(());
        }
        self.wait_for_space(port, n)?;
        let mut prod = self.llq.prod;
        for cmd in cmds {
            write_qwords(mem, self.entry_addr(prod)?, &cmd.0)?;
            prod = self.llq.inc(prod);
        }
        let sync_at = prod;
        if let Some(wait) = sync {
            let slot = self.entry_addr(sync_at)?;
            let mut cmd =
                CmdEnt::linux_sync(if wait == SyncWait::MsiPoll { slot } else { 0 }).build();
            if wait == SyncWait::None {
                cmd.0[0] = super::bits::replace(cmd.0[0], CMDQ_SYNC_0_CS, CMDQ_SYNC_0_CS_NONE);
            }
            write_qwords(mem, slot, &cmd.0)?;
            prod = self.llq.inc(prod);
        }
        self.llq.prod = prod;
        port.write(ARM_SMMU_CMDQ_PROD, 4, u64::from(prod));
        match sync {
            None => Ok(()),
            Some(SyncWait::MsiPoll) => self.poll_until_msi(port, mem, sync_at),
            Some(_) => self.poll_until_consumed(port, sync_at),
        }
    }

    /// `arm_smmu_cmdq_poll_until_msi`: the SMMU writes MSIDATA (0) over the sync's first word.
    /// Like Linux, the wait reads only that word of memory and then knows CONS passed the sync,
    /// without an MMIO read, and gives up after [`MSI_POLL_TIMEOUT`] (ARM_SMMU_POLL_TIMEOUT_US).
    /// A command error would reach Linux as the GERROR interrupt, which skips the bad command;
    /// here GERROR is read every [`GERROR_CHECK_PERIOD`] of waiting.
    fn poll_until_msi<P: SmmuPort, M: GuestRam>(
        &mut self,
        port: &mut P,
        mem: &M,
        sync_at: u32,
    ) -> Result<()> {
        let slot = self.entry_addr(sync_at)?;
        let start = Instant::now();
        let mut next_check = GERROR_CHECK_PERIOD;
        loop {
            if read_u32(mem, slot)? == 0 {
                self.llq.cons = self.llq.inc(sync_at);
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= next_check {
                Self::check_error(port)?;
                next_check = waited.saturating_add(GERROR_CHECK_PERIOD);
            }
            if waited >= MSI_POLL_TIMEOUT {
                Self::check_error(port)?;
                return Err(DriverError::Timeout("CMD_SYNC MSI never arrived"));
            }
            std::hint::spin_loop();
        }
    }

    /// `arm_smmu_cmdq_poll_until_consumed`: CONS passes the sync.
    fn poll_until_consumed<P: SmmuPort>(&mut self, port: &mut P, sync_at: u32) -> Result<()> {
        for _ in 0..POLL_LIMIT {
            self.sync_cons_in(port);
            if self.llq.consumed(sync_at) {
                return Ok(());
            }
            Self::check_error(port)?;
        }
        Err(DriverError::Timeout("CMD_SYNC never consumed"))
    }
}
