//! The edge between the wire and the model: what a SET_CONFIG asks of the model, and the ID
//! registers the model reports, in the protocol's types.

use viommu_protocol::types::{ConfigFlags, IdRegs, ModelConfig};
use viommu_smmuv3::{Capabilities, IdRegisters};

/// The capabilities a SET_CONFIG asks for. IDR_AUTO configurations start from QEMU's defaults
/// until the host's values are known (the passthrough policy narrows them later).
pub fn capabilities(cfg: &ModelConfig) -> Capabilities {
    let defaults = Capabilities::qemu_default();
    let auto = cfg.flags.contains(ConfigFlags::IDR_AUTO);
    Capabilities {
        s1p: cfg.flags.contains(ConfigFlags::STAGE1),
        s2p: !auto && cfg.flags.contains(ConfigFlags::STAGE2),
        ril: if auto {
            defaults.ril
        } else {
            cfg.flags.contains(ConfigFlags::RIL)
        },
        ats: cfg.flags.contains(ConfigFlags::ATS),
        msi: cfg.flags.contains(ConfigFlags::MSI),
        sid_bits: cfg.sid_bits.min(32),
        ssid_bits: if auto {
            defaults.ssid_bits
        } else {
            cfg.ssid_bits.min(20)
        },
        oas_bits: if auto {
            defaults.oas_bits
        } else {
            cfg.oas_bits
        },
        cmdqs: cfg.cmdq_log2.min(19),
        eventqs: cfg.evtq_log2.min(19),
    }
}

/// The model's ID registers as GET_ID_REGS carries them.
pub fn id_regs(regs: IdRegisters) -> IdRegs {
    IdRegs {
        idr: regs.idr,
        iidr: regs.iidr,
        aidr: regs.aidr,
    }
}
