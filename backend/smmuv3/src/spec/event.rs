//! Event records (32 bytes) written to the event queue.

use open_enum::open_enum;

/// Event type, bits \[7:0\] of an event record.
#[open_enum]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventId {
    F_UUT = 0x01,
    C_BAD_STREAMID = 0x02,
    F_STE_FETCH = 0x03,
    C_BAD_STE = 0x04,
    F_BAD_ATS_TREQ = 0x05,
    F_STREAM_DISABLED = 0x06,
    F_TRANSL_FORBIDDEN = 0x07,
    C_BAD_SUBSTREAMID = 0x08,
    F_CD_FETCH = 0x09,
    C_BAD_CD = 0x0a,
    F_WALK_EABT = 0x0b,
    F_TRANSLATION = 0x10,
    F_ADDR_SIZE = 0x11,
    F_ACCESS = 0x12,
    F_PERMISSION = 0x13,
    F_TLB_CONFLICT = 0x20,
    F_CFG_CONFLICT = 0x21,
    E_PAGE_REQUEST = 0x24,
    F_VMS_FETCH = 0x25,
}

/// CLASS of a stage-2 fault (bits \[105:104\]): what stage 2 was translating.
pub mod class {
    /// A CD fetch.
    pub const CD: u8 = 0;
    /// A stage-1 translation table fetch.
    pub const TT: u8 = 1;
    /// The input address's IPA.
    pub const IN: u8 = 2;
}

/// An event record under construction. Fields not set are zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Event {
    /// The four little-endian qwords.
    pub words: [u64; 4],
}

impl Event {
    /// Size in bytes.
    pub const SIZE: u64 = 32;

    /// A record of type `id` for stream `sid`: \[7:0\] type, \[63:32\] StreamID.
    pub fn new(id: EventId, sid: u32) -> Self {
        let mut ev = Self::default();
        ev.words[0] = u64::from(id.0) | (u64::from(sid) << 32);
        ev
    }

    /// The event type.
    pub fn id(&self) -> EventId {
        EventId((self.words[0] & 0xff) as u8)
    }

    /// The StreamID.
    pub fn sid(&self) -> u32 {
        (self.words[0] >> 32) as u32
    }

    /// \[11\] SSV and \[31:12\] SubstreamID.
    pub fn with_ssid(mut self, ssid: Option<u32>) -> Self {
        if let Some(ssid) = ssid {
            self.words[0] |= (1 << 11) | (u64::from(ssid & 0xf_ffff) << 12);
        }
        self
    }

    /// \[99\] RnW (1 read), \[97\] PnU (1 privileged), \[98\] InD (1 instruction; 0 for writes).
    pub fn with_access(mut self, write: bool, privileged: bool, instruction: bool) -> Self {
        self.words[1] |= (u64::from(!write) << 35)
            | (u64::from(privileged) << 33)
            | (u64::from(instruction && !write) << 34);
        self
    }

    /// \[103\] S2 and \[105:104\] CLASS: the stage that faulted and what it was translating
    /// (stage-1 faults: CLASS = IN, or TT for F_WALK_EABT).
    pub fn with_fault_stage(mut self, stage2: bool, class: u8) -> Self {
        self.words[1] |= (u64::from(stage2) << 39) | (u64::from(class & 3) << 40);
        self
    }

    /// \[108\] TTRnW of an F_PERMISSION record with CLASS = TT: the stage-1 translation table
    /// access that stage 2 refused was a read (1) or a write (0, an HTTU update). RES0 for
    /// any other CLASS and in the other fault records.
    pub fn with_tt_read(mut self, read: bool) -> Self {
        self.words[1] |= u64::from(read) << 44;
        self
    }

    /// \[31:12\] SubstreamID with no SSV qualifier (C_BAD_SUBSTREAMID: always valid).
    pub fn with_substream(mut self, ssid: u32) -> Self {
        self.words[0] |= u64::from(ssid & 0xf_ffff) << 12;
        self
    }

    /// \[191:128\] InputAddr.
    pub fn with_input_addr(mut self, addr: u64) -> Self {
        self.words[2] = addr;
        self
    }

    /// \[243:204\] IPA bits \[51:12\] (stage-2 faults).
    pub fn with_ipa(mut self, ipa: u64) -> Self {
        self.words[3] = ipa & 0x000f_ffff_ffff_f000;
        self
    }

    /// \[243:195\] FetchAddr bits \[51:3\] (F_STE_FETCH, F_CD_FETCH, F_WALK_EABT).
    pub fn with_fetch_addr(mut self, addr: u64) -> Self {
        self.words[3] = addr & 0x000f_ffff_ffff_fff8;
        self
    }

    /// The record as the event queue holds it (32 bytes, little-endian qwords).
    pub fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (chunk, word) in out.chunks_exact_mut(8).zip(self.words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields read back as Linux's arm_smmu_decode_event() reads them (EVTQ_0_ID,
    /// EVTQ_0_SID, EVTQ_0_SSV, EVTQ_0_SSID, EVTQ_1_RnW, EVTQ_1_S2, EVTQ_1_CLASS, EVTQ_2_ADDR,
    /// EVTQ_3_IPA).
    #[test]
    fn translation_fault_record_layout() {
        let ev = Event::new(EventId::F_TRANSLATION, 0x10)
            .with_ssid(Some(3))
            .with_access(true, false, false)
            .with_fault_stage(true, class::IN)
            .with_input_addr(0xdead_b000)
            .with_ipa(0x8_0000_1234);
        assert_eq!(ev.words[0] & 0xff, 0x10);
        assert_eq!(ev.words[0] >> 32, 0x10);
        assert_eq!((ev.words[0] >> 11) & 1, 1);
        assert_eq!((ev.words[0] >> 12) & 0xf_ffff, 3);
        assert_eq!((ev.words[1] >> 35) & 1, 0, "RnW = 0 for a write");
        assert_eq!((ev.words[1] >> 39) & 1, 1);
        assert_eq!((ev.words[1] >> 40) & 3, 2);
        assert_eq!(ev.words[2], 0xdead_b000);
        assert_eq!(ev.words[3], 0x8_0000_1000);
        assert_eq!(&ev.bytes()[..8], &[0x10, 0x08 | 0x30, 0, 0, 0x10, 0, 0, 0]);
    }

    /// TTRnW is EVTQ_1_TT_READ (dword 1 bit 44, record bit 108), beside RnW (bit 35).
    #[test]
    fn permission_fault_ttrnw_layout() {
        let ev = Event::new(EventId::F_PERMISSION, 4)
            .with_access(false, false, false)
            .with_fault_stage(true, class::TT)
            .with_tt_read(true);
        assert_eq!(ev.words[1], (1 << 44) | (1 << 40) | (1 << 39) | (1 << 35));
        let ev = Event::new(EventId::F_PERMISSION, 4).with_tt_read(false);
        assert_eq!(ev.words[1], 0);
    }
}
