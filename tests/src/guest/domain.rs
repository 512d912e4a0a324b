//! Domains as Linux attaches them: `arm_smmu_attach_dev` for a stage-1 domain.

use super::cd::{CdFmt, CdTable, make_s1_cd};
use super::entry::Entry;
use super::mem::GuestRam;
use super::pgtable::PageTable;
use super::ste::{STRTAB_STE_1_S1DSS_SSID0, make_cdtable_ste};
use super::{Driver, Result, SmmuPort};

/// A stage-1 domain attached to one stream: page table, CD, CD table.
#[derive(Debug)]
pub struct S1Domain {
    /// The stage-1 page table.
    pub pt: PageTable,
    /// The context descriptor.
    pub cd: Entry,
    /// The single-CD table the STE points at.
    pub table: CdTable,
    /// The domain's ASID.
    pub asid: u16,
}

impl<P: SmmuPort, M: GuestRam> Driver<P, M> {
    /// Attaches a stage-1 domain on `pt` to `sid` the way `arm_smmu_attach_dev` does: CD first
    /// (a single-CD table), then the CD-table STE with S1DSS = SSID0.
    pub fn attach_s1(&mut self, sid: u32, pt: PageTable, asid: u16) -> Result<S1Domain> {
        let mut table = self.new_cd_table(CdFmt::Linear, 0, 0)?;
        let cd = make_s1_cd(&pt.s1_tcr(), asid, false);
        self.write_cd(&mut table, &[sid], 0, &cd)?;
        let ste = make_cdtable_ste(&table.ste_ptr(), STRTAB_STE_1_S1DSS_SSID0, false, false);
        self.write_ste(sid, &ste)?;
        Ok(S1Domain {
            pt,
            cd,
            table,
            asid,
        })
    }
}
