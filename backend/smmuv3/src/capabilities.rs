//! What this vSMMU implements, and the ID registers that tell the guest.

use super::spec::regs::{Idr0, Idr1, Idr3, Idr5, address_size_encoding};

/// The identification registers as the guest reads them: SMMU_IDR0..5, SMMU_IIDR and
/// SMMU_AIDR (IHI 0070, 6.3.1 to 6.3.6, 6.3.7 and 6.3.8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IdRegisters {
    /// SMMU_IDR0..SMMU_IDR5, by index.
    pub idr: [u32; 6],
    /// SMMU_IIDR.
    pub iidr: u32,
    /// SMMU_AIDR.
    pub aidr: u32,
}

/// Decoded capabilities the model checks on its hot paths, and the ID registers it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Stage 1 (IDR0.S1P).
    pub s1p: bool,
    /// Stage 2 (IDR0.S2P).
    pub s2p: bool,
    /// Range invalidation (IDR3.RIL).
    pub ril: bool,
    /// ATS (IDR0.ATS).
    pub ats: bool,
    /// MSI completion and interrupts (IDR0.MSI).
    pub msi: bool,
    /// StreamID bits (IDR1.SIDSIZE).
    pub sid_bits: u8,
    /// SubstreamID bits (IDR1.SSIDSIZE).
    pub ssid_bits: u8,
    /// Output address size in bits (IDR5.OAS).
    pub oas_bits: u8,
    /// log2 of the largest command queue (IDR1.CMDQS).
    pub cmdqs: u8,
    /// log2 of the largest event queue (IDR1.EVENTQS).
    pub eventqs: u8,
}

impl Capabilities {
    /// QEMU's emulated SMMUv3 defaults (stage 1, 44-bit OAS, 16-bit SIDs, RIL, queues of 2^19),
    /// with 16-bit SSIDs.
    pub fn qemu_default() -> Self {
        Self {
            s1p: true,
            s2p: false,
            ril: true,
            ats: false,
            msi: false,
            sid_bits: 16,
            ssid_bits: 16,
            oas_bits: 44,
            cmdqs: 19,
            eventqs: 19,
        }
    }

    /// Mask of the physical address bits within the OAS, \[OAS-1:0\].
    pub fn oas_mask(&self) -> u64 {
        1u64.checked_shl(u32::from(self.oas_bits))
            .map_or(u64::MAX, |limit| limit.wrapping_sub(1))
    }

    /// Intermediate address size in bits (IHI 0070 3.4): MAX(IDR0.TTF\[0\] ? 40 : 0,
    /// IDR0.TTF\[1\] ? OAS : 0). This SMMU advertises AArch64 tables only (TTF = 0b10), so
    /// the IAS equals the OAS. It bounds every IPA the SMMU accepts, including a nested
    /// STE's S1ContextPtr.
    pub fn ias_bits(&self) -> u8 {
        self.oas_bits
    }

    /// SMMU_IDR3.XNX: with stage 2 the model implements the 2-bit stage-2 execute-never
    /// field (privileged and unprivileged execution told apart), as QEMU's SMMUv3 advertises.
    pub fn xnx(&self) -> bool {
        self.s2p
    }

    /// The ID registers the guest reads.
    pub fn id_regs(&self) -> IdRegisters {
        let idr0 = Idr0::new()
            .with_s2p(self.s2p)
            .with_s1p(self.s1p)
            .with_ttf(2)
            .with_cohacc(true)
            .with_ats(self.ats)
            .with_asid16(true)
            .with_msi(self.msi)
            .with_vmid16(true)
            .with_cd2l(true)
            .with_ttendian(2)
            .with_stall_model(1)
            .with_term_model(true)
            .with_st_level(1);
        let idr1 = Idr1::new()
            .with_sidsize(self.sid_bits.min(32))
            .with_ssidsize(self.ssid_bits.min(20))
            .with_eventqs(self.eventqs)
            .with_cmdqs(self.cmdqs);
        // IHI 0070, SMMU_IDR3: HAD is mandatory with stage 1 and 0 without; XNX is mandatory
        // with stage 2 from SMMUv3.1; RIL is 1, and BBML 1 or 2, in every SMMUv3.2. So the
        // model is an SMMUv3.2 with range invalidation and an SMMUv3.1 (BBML RES0) without.
        let v3_2 = self.ril;
        let idr3 = Idr3::new()
            .with_had(self.s1p)
            .with_xnx(self.xnx())
            .with_ril(self.ril)
            .with_bbml(if v3_2 { 2 } else { 0 });
        let idr5 = Idr5::new()
            .with_oas(address_size_encoding(self.oas_bits).unwrap_or(4))
            .with_gran4k(true)
            .with_gran16k(true)
            .with_gran64k(true);
        IdRegisters {
            idr: [
                idr0.into_bits(),
                idr1.into_bits(),
                0,
                idr3.into_bits(),
                0,
                idr5.into_bits(),
            ],
            iidr: 0,
            // AIDR.ArchMinorRev: SMMUv3.2 or SMMUv3.1, as IDR3 says.
            aidr: if v3_2 { 0x2 } else { 0x1 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's smmuv3_init_id_regs() values for the same configuration, bit for bit, except
    /// that we advertise 2-level CD tables (CD2L) and 16-bit SSIDs, which QEMU lacks.
    #[test]
    fn default_id_registers() {
        let regs = Capabilities::qemu_default().id_regs();
        // S1P, TTF=AArch64, COHACC, ASID16, VMID16, CD2L, TTENDIAN=LE, STALL_MODEL=1,
        // TERM_MODEL, ST_LEVEL=1.
        assert_eq!(regs.idr[0], 0x0d4c_101a);
        // SIDSIZE 16, SSIDSIZE 16, EVENTQS 19, CMDQS 19.
        assert_eq!(regs.idr[1], (19 << 21) | (19 << 16) | (16 << 6) | 16);
        // HAD, RIL, BBML=2.
        assert_eq!(regs.idr[3], 0x1404);
        // OAS=44 bits (4), GRAN4K, GRAN16K, GRAN64K.
        assert_eq!(regs.idr[5], 0x74);
    }

    /// IHI 0070, SMMU_IDR3 and SMMU_AIDR: without range invalidation the SMMU is an SMMUv3.1
    /// (RIL is 1 in every SMMUv3.2, BBML RES0 before it); HAD only with stage 1.
    #[test]
    fn architecture_revision_follows_the_features() {
        let v3_1 = Capabilities {
            ril: false,
            ..Capabilities::qemu_default()
        }
        .id_regs();
        assert_eq!((v3_1.idr[3], v3_1.aidr), (0x0004, 1), "HAD only");
        let s2_only = Capabilities {
            s1p: false,
            s2p: true,
            ..Capabilities::qemu_default()
        }
        .id_regs();
        assert_eq!(
            (s2_only.idr[3], s2_only.aidr),
            (0x1410, 2),
            "XNX, RIL, BBML=2"
        );
        assert_eq!(Capabilities::qemu_default().id_regs().aidr, 2);
    }

    /// With stage 2, IDR3 is QEMU's 0x1414 for the same configuration: HAD, XNX, RIL, BBML=2.
    #[test]
    fn stage_2_advertises_xnx() {
        let regs = Capabilities {
            s2p: true,
            ..Capabilities::qemu_default()
        }
        .id_regs();
        assert_eq!(regs.idr[3], 0x1414);
        assert_eq!(regs.idr[0] & 3, 3, "S1P and S2P");
    }

    /// The OAS mask never overflows, whatever size a configuration names.
    #[test]
    fn oas_mask_covers_the_output_address_size() {
        let mut f = Capabilities::qemu_default();
        assert_eq!(f.oas_mask(), (1 << 44) - 1);
        f.oas_bits = 64;
        assert_eq!(f.oas_mask(), u64::MAX);
        f.oas_bits = 255;
        assert_eq!(f.oas_mask(), u64::MAX);
        f.oas_bits = 0;
        assert_eq!(f.oas_mask(), 0);
    }
}
