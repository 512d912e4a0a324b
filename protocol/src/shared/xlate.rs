//! Translation requests through the region (docs/protocol.md, section 10.9): where the fields of
//! `xlate_req` and `xlate_resp` are, and how they map to a TRANSLATE payload and reply, so that
//! both are checked exactly as the messages are.

use crate::codec::{Reader, Writer};
use crate::error::DecodeError;
use crate::status::Status;
use crate::types::{TranslateReply, TranslateRequest};

use super::layout::off;
use super::{Ordering, Region};

/// `xlate_req` fields, as offsets in the region.
pub(crate) mod req {
    use super::off;
    pub const SEQ: usize = off::XLATE_REQ;
    pub const SID: usize = off::XLATE_REQ + 0x08;
    pub const SSID: usize = off::XLATE_REQ + 0x0c;
    pub const IOVA: usize = off::XLATE_REQ + 0x10;
    pub const FLAGS: usize = off::XLATE_REQ + 0x18;
    pub const RESERVED: usize = off::XLATE_REQ + 0x1c;
}

/// `xlate_resp` fields, as offsets in the region.
pub(crate) mod resp {
    use super::off;
    pub const SEQ: usize = off::XLATE_RESP;
    pub const STATUS: usize = off::XLATE_RESP + 0x04;
    pub const ADDR: usize = off::XLATE_RESP + 0x08;
    pub const ADDR_MASK: usize = off::XLATE_RESP + 0x10;
    pub const PERM: usize = off::XLATE_RESP + 0x18;
    pub const RESULT: usize = off::XLATE_RESP + 0x1c;
    pub const EVENT: usize = off::XLATE_RESP + 0x20;
    pub const RESERVED: usize = off::XLATE_RESP + 0x24;
}

/// What the backend answers to a request.
pub type Answer = Result<TranslateReply, Status>;

/// Stores a request's payload fields (relaxed; the caller publishes `seq` after them).
pub(crate) fn store_request(region: &Region, t: &TranslateRequest) {
    let mut w = Writer::with_capacity(TranslateRequest::SIZE);
    t.encode(&mut w);
    let bytes = w.into_vec();
    let mut r = Reader::new(&bytes);
    // The encoding is TranslateRequest::SIZE bytes: sid, ssid, iova, flags, reserved.
    let next32 = |at: usize, r: &mut Reader<'_>| {
        region
            .u32_at(at)
            .store(r.u32().unwrap_or(0), Ordering::Relaxed);
    };
    next32(req::SID, &mut r);
    next32(req::SSID, &mut r);
    region
        .u64_at(req::IOVA)
        .store(r.u64().unwrap_or(0), Ordering::Relaxed);
    next32(req::FLAGS, &mut r);
    next32(req::RESERVED, &mut r);
}

/// Loads a request's payload fields (relaxed; after an acquire load of `seq`) and decodes them
/// as a TRANSLATE payload.
pub(crate) fn load_request(region: &Region) -> Result<TranslateRequest, DecodeError> {
    let mut w = Writer::with_capacity(TranslateRequest::SIZE);
    w.u32(region.u32_at(req::SID).load(Ordering::Relaxed))
        .u32(region.u32_at(req::SSID).load(Ordering::Relaxed))
        .u64(region.u64_at(req::IOVA).load(Ordering::Relaxed))
        .u32(region.u32_at(req::FLAGS).load(Ordering::Relaxed))
        .u32(region.u32_at(req::RESERVED).load(Ordering::Relaxed));
    let bytes = w.into_vec();
    let mut r = Reader::new(&bytes);
    let t = TranslateRequest::decode(&mut r)?;
    r.finish()?;
    Ok(t)
}

/// Stores an answer's fields (relaxed; the caller publishes `seq` after them): a reply body
/// when the status is OK, zeros otherwise.
pub(crate) fn store_answer(region: &Region, answer: &Answer) {
    let (status, bytes) = match answer {
        Ok(reply) => {
            let mut w = Writer::with_capacity(TranslateReply::SIZE);
            reply.encode(&mut w);
            (Status::OK, w.into_vec())
        }
        Err(status) => (*status, vec![0; TranslateReply::SIZE]),
    };
    region
        .u32_at(resp::STATUS)
        .store(status.0, Ordering::Relaxed);
    let mut r = Reader::new(&bytes);
    let u64_to = |at: usize, r: &mut Reader<'_>| {
        region
            .u64_at(at)
            .store(r.u64().unwrap_or(0), Ordering::Relaxed);
    };
    u64_to(resp::ADDR, &mut r);
    u64_to(resp::ADDR_MASK, &mut r);
    for at in [resp::PERM, resp::RESULT, resp::EVENT, resp::RESERVED] {
        region
            .u32_at(at)
            .store(r.u32().unwrap_or(0), Ordering::Relaxed);
    }
}

/// Loads an answer's fields (relaxed; after an acquire load of `seq`) and checks them as a
/// TRANSLATE reply (or an error reply: a status that is not OK, with the body all zero).
pub(crate) fn load_answer(region: &Region) -> Result<Answer, DecodeError> {
    let status = region.u32_at(resp::STATUS).load(Ordering::Relaxed);
    let mut w = Writer::with_capacity(TranslateReply::SIZE);
    w.u64(region.u64_at(resp::ADDR).load(Ordering::Relaxed))
        .u64(region.u64_at(resp::ADDR_MASK).load(Ordering::Relaxed));
    for at in [resp::PERM, resp::RESULT, resp::EVENT, resp::RESERVED] {
        w.u32(region.u32_at(at).load(Ordering::Relaxed));
    }
    let bytes = w.into_vec();
    if status == Status::OK.0 {
        let mut r = Reader::new(&bytes);
        let reply = TranslateReply::decode(&mut r)?;
        r.finish()?;
        return Ok(Ok(reply));
    }
    if status >= 12 {
        return Err(DecodeError::Field {
            field: "xlate_resp.status",
            value: u64::from(status),
            reason: "not a status code of section 2.7",
        });
    }
    if bytes.iter().any(|&b| b != 0) {
        return Err(DecodeError::Reserved {
            field: "xlate_resp (an error answer's body)",
            value: 1,
        });
    }
    Ok(Err(Status(status)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::shared::{BackendSide, FrontendSide, Posted};
    use crate::types::{Access, Perm};

    /// Bytes of the region at `offset`, read through the memfd (not the mapping).
    fn bytes_at(region: &Region, offset: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        rustix::io::pread(region.fd(), &mut buf, offset as u64).unwrap();
        buf
    }

    fn write_at(region: &Region, offset: usize, bytes: &[u8]) {
        rustix::io::pwrite(region.fd(), bytes, offset as u64).unwrap();
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn sides() -> (FrontendSide, BackendSide, Region) {
        let region = Region::create().unwrap();
        let fd = region.fd().try_clone_to_owned().unwrap();
        let backend = BackendSide::new(Region::adopt(fd).unwrap(), true);
        let raw = Region::adopt(region.fd().try_clone_to_owned().unwrap()).unwrap();
        (FrontendSide::new(region), backend, raw)
    }

    /// A request lands at 0x400 as section 10.9 lays it out: seq, 4 bytes unused, then the
    /// TRANSLATE payload (SID 0x18, SSID 5 valid, IOVA 0x8080_1234, READ|WRITE).
    #[test]
    fn a_request_is_laid_out_as_specified() {
        let (mut front, back, raw) = sides();
        let t = TranslateRequest {
            sid: 0x18,
            ssid: Some(5),
            iova: 0x8080_1234,
            access: Access::READ | Access::WRITE,
        };
        assert!(!back.translation_requested());
        // The backend is awake (backend_idle 0): no kick.
        assert_eq!(front.request_translation(&t), Posted::Quiet);
        assert_eq!(
            bytes_at(&raw, 0x400, 0x20),
            hex("01 00 00 00  00 00 00 00  18 00 00 00  05 00 00 00
                 34 12 80 80 00 00 00 00  13 00 00 00  00 00 00 00")
        );
        assert!(back.translation_requested());
        let (seq, got) = back.next_request().unwrap();
        assert_eq!(seq, 1);
        assert_eq!(got.unwrap(), t);
    }

    /// Hand-written answers at 0x440 decode as TRANSLATE replies do, and only for the
    /// outstanding request's number.
    #[test]
    fn answers_are_read_as_specified() {
        let (mut front, _back, raw) = sides();
        let t = TranslateRequest {
            sid: 1,
            ssid: None,
            iova: 0x5000,
            access: Access::READ,
        };
        front.request_translation(&t);
        // Not answered yet: seq 0.
        assert!(front.answer().unwrap().is_none());
        // TRANSLATED: addr 0x4000_0000, mask 0xfff, perm READ|WRITE.
        write_at(
            &raw,
            0x444,
            &hex(
                "00 00 00 00  00 00 00 40 00 00 00 00  ff 0f 00 00 00 00 00 00
                  03 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
            ),
        );
        write_at(&raw, 0x440, &hex("02 00 00 00"));
        assert!(front.answer().unwrap().is_none(), "an answer to request 2");
        write_at(&raw, 0x440, &hex("01 00 00 00"));
        assert_eq!(
            front.answer().unwrap(),
            Some(Ok(TranslateReply::Translated {
                addr: 0x4000_0000,
                addr_mask: 0xfff,
                perm: Perm::READ | Perm::WRITE
            }))
        );
        // FAULT with event 0x10 (F_TRANSLATION).
        write_at(
            &raw,
            0x444,
            &hex(
                "00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
                  00 00 00 00  01 00 00 00  10 00 00 00  00 00 00 00",
            ),
        );
        assert_eq!(
            front.answer().unwrap(),
            Some(Ok(TranslateReply::Fault { event: 0x10 }))
        );
        // An error answer: status BAD_STATE, body zero.
        write_at(
            &raw,
            0x444,
            &hex(
                "03 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00
                  00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
            ),
        );
        assert_eq!(front.answer().unwrap(), Some(Err(Status::BAD_STATE)));
    }

    /// What a hostile backend may write is refused as a bad TRANSLATE reply would be.
    #[test]
    fn hostile_answers_are_refused() {
        let cases = [
            // OK with a misaligned address, with an empty perm, with a mask not 2^n - 1, with
            // a result of 2, with an event on a translation.
            "00 00 00 00  00 01 00 00 00 00 00 00  ff 0f 00 00 00 00 00 00  01 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
            "00 00 00 00  00 00 00 40 00 00 00 00  ff 0f 00 00 00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
            "00 00 00 00  00 00 00 40 00 00 00 00  fe 0f 00 00 00 00 00 00  01 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
            "00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  02 00 00 00  00 00 00 00  00 00 00 00",
            "00 00 00 00  00 00 00 40 00 00 00 00  ff 0f 00 00 00 00 00 00  01 00 00 00  00 00 00 00  10 00 00 00  00 00 00 00",
            // A fault with an event wider than 8 bits; a non-zero reserved word.
            "00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  01 00 00 00  00 01 00 00  00 00 00 00",
            "00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  01 00 00 00  10 00 00 00  01 00 00 00",
            // An error status with a body; a status beyond section 2.7's.
            "05 00 00 00  00 00 00 40 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
            "0c 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
        ];
        for case in cases {
            let (mut front, _back, raw) = sides();
            front.request_translation(&TranslateRequest {
                sid: 1,
                ssid: None,
                iova: 0,
                access: Access::READ,
            });
            write_at(&raw, 0x444, &hex(case));
            write_at(&raw, 0x440, &hex("01 00 00 00"));
            assert!(front.answer().is_err(), "{case}");
        }
    }

    /// A malformed request is reported, not guessed at: the backend answers it with an error.
    #[test]
    fn malformed_requests_decode_to_errors() {
        let (_front, back, raw) = sides();
        let cases = [
            // A reserved flag bit; SSID_VALID with a 21-bit SSID; an SSID without SSID_VALID;
            // a non-zero reserved word.
            "18 00 00 00  00 00 00 00  00 10 00 00 00 00 00 00  21 00 00 00  00 00 00 00",
            "18 00 00 00  00 00 10 00  00 10 00 00 00 00 00 00  11 00 00 00  00 00 00 00",
            "18 00 00 00  05 00 00 00  00 10 00 00 00 00 00 00  01 00 00 00  00 00 00 00",
            "18 00 00 00  00 00 00 00  00 10 00 00 00 00 00 00  01 00 00 00  01 00 00 00",
        ];
        for (n, case) in cases.iter().enumerate() {
            write_at(&raw, 0x408, &hex(case));
            write_at(&raw, 0x400, &(n as u32 + 1).to_le_bytes());
            let (seq, got) = back.next_request().unwrap();
            assert_eq!(seq, n as u32 + 1);
            assert!(got.is_err(), "{case}");
        }
    }

    /// The call rule (10.9): called once per announced wait, never while none is announced.
    #[test]
    fn the_backend_calls_once_per_announced_wait() {
        let (mut front, mut back, _raw) = sides();
        assert!(!back.frontend_waits());
        front.announce_wait();
        assert!(back.frontend_waits());
        assert!(!back.frontend_waits(), "the same wait is called once");
        front.end_wait();
        assert!(!back.frontend_waits());
        front.announce_wait();
        assert!(back.frontend_waits(), "a new wait is called again");
    }
}
