//! What the operator lets a frontend configure: the daemon's model options.
//!
//! QEMU describes the vSMMU it wants in SET_CONFIG (from `arm-smmuv3`'s properties); the
//! management layer that starts the daemon decides what this host offers. A configuration
//! beyond these limits is refused with a message naming the option, not quietly shrunk: the
//! guest-visible ID registers must be what the VM's definition says.

use viommu_protocol::{ConfigFlags, ModelConfig};

/// The largest output address size the model implements (52-bit addresses are not).
pub const IMPLEMENTED_MAX_OAS_BITS: u8 = 48;

/// Optional model features an operator can withhold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModelFeature {
    /// Stage 1 translation (IDR0.S1P).
    Stage1,
    /// Stage 2 translation (IDR0.S2P), and with stage 1, nesting.
    Stage2,
    /// Range invalidation (IDR3.RIL).
    Ril,
    /// ATS (IDR0.ATS).
    Ats,
    /// MSI-signalled interrupts and CMD_SYNC completion (IDR0.MSI).
    Msi,
}

impl ModelFeature {
    /// Every feature, in flag order.
    pub const ALL: [Self; 5] = [Self::Stage1, Self::Stage2, Self::Ril, Self::Ats, Self::Msi];

    /// The option value naming it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stage1 => "stage1",
            Self::Stage2 => "stage2",
            Self::Ril => "ril",
            Self::Ats => "ats",
            Self::Msi => "msi",
        }
    }

    /// Parses an option value.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    fn flag(self) -> ConfigFlags {
        match self {
            Self::Stage1 => ConfigFlags::STAGE1,
            Self::Stage2 => ConfigFlags::STAGE2,
            Self::Ril => ConfigFlags::RIL,
            Self::Ats => ConfigFlags::ATS,
            Self::Msi => ConfigFlags::MSI,
        }
    }
}

/// Why a configuration is beyond the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A withheld feature was asked for.
    #[error("SET_CONFIG asks for {}, which this backend was started without (--disable-feature {})", .0.name(), .0.name())]
    Disabled(ModelFeature),
    /// A size beyond its maximum.
    #[error("SET_CONFIG asks for {what} {asked}, beyond this backend's maximum {max} ({option})")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// What was asked.
        asked: u8,
        /// The limit.
        max: u8,
        /// The option that sets it, or why it is fixed.
        option: &'static str,
    },
}

/// The limits (the defaults allow everything the model implements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Largest OAS in bits (IDR5.OAS).
    pub max_oas_bits: u8,
    /// Most substream ID bits (IDR1.SSIDSIZE).
    pub max_ssid_bits: u8,
    /// Most stream ID bits (IDR1.SIDSIZE).
    pub max_sid_bits: u8,
    /// Features withheld.
    pub disabled: ConfigFlags,
}

impl Default for ModelLimits {
    fn default() -> Self {
        Self {
            max_oas_bits: IMPLEMENTED_MAX_OAS_BITS,
            max_ssid_bits: 20,
            max_sid_bits: 32,
            disabled: ConfigFlags::empty(),
        }
    }
}

impl ModelLimits {
    /// Withholds `feature`.
    pub fn disable(&mut self, feature: ModelFeature) {
        self.disabled |= feature.flag();
    }

    /// Whether `feature` is offered.
    pub fn allows(&self, feature: ModelFeature) -> bool {
        !self.disabled.contains(feature.flag())
    }

    /// Checks a SET_CONFIG (already validated as well-formed) against the limits.
    pub fn check(&self, cfg: &ModelConfig) -> Result<(), LimitError> {
        for feature in ModelFeature::ALL {
            if cfg.flags.contains(feature.flag()) && !self.allows(feature) {
                return Err(LimitError::Disabled(feature));
            }
        }
        let too_large = |what, asked, max, option| {
            (asked > max).then_some(LimitError::TooLarge {
                what,
                asked,
                max,
                option,
            })
        };
        // IDR_AUTO configurations carry 0 for OAS and SSID size: the host decides them.
        let checks = [
            too_large(
                "OAS bits",
                cfg.oas_bits,
                IMPLEMENTED_MAX_OAS_BITS,
                "52-bit addresses are not implemented",
            ),
            too_large(
                "OAS bits",
                cfg.oas_bits,
                self.max_oas_bits,
                "--max-oas-bits",
            ),
            too_large(
                "SSID bits",
                cfg.ssid_bits,
                self.max_ssid_bits,
                "--max-ssid-bits",
            ),
            too_large(
                "SID bits",
                cfg.sid_bits,
                self.max_sid_bits,
                "--max-sid-bits",
            ),
        ];
        match checks.into_iter().flatten().next() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// The limits as JSON fields, for `--print-capabilities`.
    pub fn capabilities_json(&self) -> String {
        let features: Vec<String> = ModelFeature::ALL
            .into_iter()
            .filter(|f| self.allows(*f))
            .map(|f| format!("\"{}\"", f.name()))
            .collect();
        format!(
            "{{\"max-oas-bits\": {}, \"max-ssid-bits\": {}, \"max-sid-bits\": {}, \"features\": [{}]}}",
            self.max_oas_bits,
            self.max_ssid_bits,
            self.max_sid_bits,
            features.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_default() -> ModelConfig {
        ModelConfig {
            flags: ConfigFlags::STAGE1 | ConfigFlags::RIL,
            oas_bits: 44,
            ssid_bits: 16,
            sid_bits: 16,
            cmdq_log2: 19,
            evtq_log2: 19,
        }
    }

    #[test]
    fn defaults_allow_what_the_model_implements() {
        let limits = ModelLimits::default();
        assert_eq!(limits.check(&qemu_default()), Ok(()));
        let all = ModelConfig {
            flags: ConfigFlags::STAGE1
                | ConfigFlags::STAGE2
                | ConfigFlags::RIL
                | ConfigFlags::ATS
                | ConfigFlags::MSI,
            oas_bits: 48,
            ssid_bits: 20,
            sid_bits: 32,
            ..qemu_default()
        };
        assert_eq!(limits.check(&all), Ok(()));
        let wide = ModelConfig {
            oas_bits: 52,
            ..qemu_default()
        };
        assert!(matches!(
            limits.check(&wide),
            Err(LimitError::TooLarge { max: 48, .. })
        ));
    }

    #[test]
    fn each_limit_refuses_with_its_option() {
        let mut limits = ModelLimits {
            max_oas_bits: 40,
            max_ssid_bits: 8,
            max_sid_bits: 16,
            ..ModelLimits::default()
        };
        limits.disable(ModelFeature::Stage2);
        let err = limits.check(&qemu_default()).unwrap_err();
        assert!(err.to_string().contains("--max-oas-bits"), "{err}");
        let ok = ModelConfig {
            oas_bits: 40,
            ssid_bits: 8,
            ..qemu_default()
        };
        assert_eq!(limits.check(&ok), Ok(()));
        let s2 = ModelConfig {
            flags: ok.flags | ConfigFlags::STAGE2,
            ..ok
        };
        assert_eq!(
            limits.check(&s2),
            Err(LimitError::Disabled(ModelFeature::Stage2))
        );
        let ssid = ModelConfig { ssid_bits: 9, ..ok };
        assert!(
            limits
                .check(&ssid)
                .unwrap_err()
                .to_string()
                .contains("--max-ssid-bits")
        );
        let sid = ModelConfig { sid_bits: 17, ..ok };
        assert!(
            limits
                .check(&sid)
                .unwrap_err()
                .to_string()
                .contains("--max-sid-bits")
        );
    }

    #[test]
    fn feature_names_round_trip() {
        for f in ModelFeature::ALL {
            assert_eq!(ModelFeature::from_name(f.name()), Some(f));
        }
        assert_eq!(ModelFeature::from_name("pri"), None);
    }
}
