//! GET_STATE and SET_STATE: the session's state as a sealed memfd blob (the model's
//! registers, the devices, the passthrough host objects), and its restore.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;

use log::info;
use rustix::fs::{MemfdFlags, SealFlags, fcntl_add_seals, memfd_create};
use serde::{Deserialize, Serialize};
use viommu_protocol::{ErrorReply, StateBlob, Status};
use viommu_smmuv3::snapshot::SmmuSnapshot;

use super::host_objects::{HostObjects, PassthroughState};
use super::{Session, model, model_ref, refuse};

/// The GET_STATE blob.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SessionState {
    /// Format version.
    version: u32,
    /// The model's registers.
    smmu: SmmuSnapshot,
    /// Attached devices by handle, for a consistency check on restore.
    devices: BTreeMap<u32, u32>,
    /// The host objects of passthrough devices, for a restarted backend to adopt.
    #[serde(default)]
    passthrough: Option<PassthroughState>,
}

pub(super) const STATE_VERSION: u32 = 1;

impl Session {
    pub(super) fn get_state(&self) -> Result<StateBlob, ErrorReply> {
        let smmu = model_ref(&self.smmu)?;
        let state = SessionState {
            version: STATE_VERSION,
            smmu: smmu.snapshot(),
            devices: self.devices.iter().map(|(&h, d)| (h, d.sid)).collect(),
            passthrough: self.passthrough.as_ref().map(HostObjects::snapshot),
        };
        let json = serde_json::to_vec(&state)
            .map_err(|e| refuse(Status::INTERNAL, format!("cannot encode the state: {e}")))?;
        let host =
            |what: &str, e: std::io::Error| refuse(Status::HOST_ERROR, format!("{what}: {e}"));
        let fd = memfd_create(
            "viommu-state",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| host("memfd_create", e.into()))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&json)
            .map_err(|e| host("writing the state", e))?;
        fcntl_add_seals(
            &file,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL,
        )
        .map_err(|e| host("sealing the state", e.into()))?;
        Ok(StateBlob {
            size: json.len() as u64,
            fd: file.into(),
        })
    }

    pub(super) fn set_state(&mut self, blob: StateBlob) -> Result<(), ErrorReply> {
        let size = usize::try_from(blob.size).unwrap_or(usize::MAX);
        let mut json = vec![0u8; size];
        let read = rustix::io::pread(blob.fd.as_fd(), &mut json, 0).map_err(|e| {
            refuse(
                Status::INVALID_ARGUMENT,
                format!("cannot read the state: {e}"),
            )
        })?;
        if read != size {
            return Err(refuse(
                Status::INVALID_ARGUMENT,
                format!("state is {read} bytes, not {size}"),
            ));
        }
        let state: SessionState = serde_json::from_slice(&json).map_err(|e| {
            refuse(
                Status::INVALID_ARGUMENT,
                format!("cannot parse the state: {e}"),
            )
        })?;
        if state.version != STATE_VERSION {
            return Err(refuse(
                Status::INCOMPATIBLE,
                format!("state version {}", state.version),
            ));
        }
        // Passthrough devices of the state are adopted when the frontend attaches them again,
        // after SET_STATE; every other device must be attached as it was.
        let host_state = state.passthrough.unwrap_or_default();
        // Devices match by handle: a SID is a hint (the guest may have renumbered its buses
        // since the state was taken), and every device's SID is confirmed again before the
        // restored STEs are applied to it.
        let expected: Vec<u32> = state
            .devices
            .keys()
            .filter(|h| !host_state.devices.contains_key(h))
            .copied()
            .collect();
        let attached: Vec<u32> = self.devices.keys().copied().collect();
        if expected != attached {
            return Err(refuse(
                Status::INCOMPATIBLE,
                format!(
                    "state has devices {expected:?} (besides passthrough ones to adopt), \
                     attached are {attached:?}"
                ),
            ));
        }
        let adopting = !host_state.viommus.is_empty() || !host_state.devices.is_empty();
        if adopting && self.passthrough.is_none() {
            return Err(refuse(
                Status::BAD_STATE,
                "the state has passthrough devices: SET_IOMMUFD first",
            ));
        }
        self.settle_idr_auto_from(&host_state, "the saved state")?;
        let smmu = model(&mut self.smmu)?;
        smmu.restore(&state.smmu)
            .map_err(|e| refuse(Status::INCOMPATIBLE, e.to_string()))?;
        if adopting && let Some(p) = self.passthrough.as_mut() {
            p.adopt(host_state)
                .map_err(|e| refuse(Status::INCOMPATIBLE, e.to_string()))?;
        }
        info!("state restored");
        self.run_effects()?;
        Ok(())
    }
}
