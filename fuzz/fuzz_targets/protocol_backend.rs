//! Main-channel decoding: every BackendRequest and BackendReply from raw bytes and real
//! descriptors, directly and through a socket pair (framing, SCM_RIGHTS, the reply prefix).
//!
//! Invariants: no panic; a request or reply that decodes re-encodes to the same bytes
//! (decoding is strict, so only canonical encodings are accepted) and the same files in the
//! same order, and decodes again; the socket path agrees with direct decoding; nothing
//! leaks a descriptor.

#![no_main]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use viommu_fuzz::fds::{MadeFd, borrow_all, dup_all, identity, lowest_free_fd, make_fds};
use viommu_fuzz::proto::{ProtoInput, raw_send};
use viommu_protocol::header::{Header, MAX_FDS};
use viommu_protocol::message::{Reply, Request};
use viommu_protocol::types::{AddressSpace, IotlbInvalidate, MsiWrite};
use viommu_protocol::{BackendChannel, BackendReply, BackendRequest, FrontendChannel};

/// A valid request with request code `code`, for the reply path.
fn canonical_request(code: u32) -> Option<BackendRequest> {
    use viommu_protocol::backend::code as c;
    Some(match code {
        c::SET_ADDRESS_SPACE => BackendRequest::SetAddressSpace {
            handle: 1,
            space: AddressSpace::Translated,
            sid: 8,
        },
        c::IOTLB_INVALIDATE => BackendRequest::IotlbInvalidate(IotlbInvalidate {
            handle: Some(1),
            ssid: None,
            start: 0x1000,
            last: 0x1fff,
        }),
        c::RESOLVE_SID => BackendRequest::ResolveSid { sid: 8 },
        c::MSI_WRITE => BackendRequest::MsiWrite(MsiWrite {
            address: 0x0809_0040,
            data: 0x20,
        }),
        c::GET_DEVICE_SIDS => BackendRequest::GetDeviceSids,
        _ => return None,
    })
}

/// A decoded request re-encodes to the input and decodes again.
fn check_request(req: &BackendRequest, code: u32, payload: &[u8], fds: &[MadeFd]) {
    assert_eq!(req.code(), code, "decoded to another request");
    assert!(BackendRequest::reply_policy(code).is_some());
    assert_ne!(BackendRequest::name_of(code), "unknown");
    let enc = req.encode();
    assert_eq!(
        enc.payload,
        payload,
        "{}: accepted a non-canonical encoding",
        req.name()
    );
    assert_eq!(enc.fds.len(), fds.len(), "{}: descriptor count", req.name());
    for (got, sent) in enc.fds.iter().zip(fds) {
        assert_eq!(
            identity(*got),
            identity(sent.fd.as_fd()),
            "{}: descriptors out of order",
            req.name()
        );
    }
    let dups = enc
        .fds
        .iter()
        .map(|f| f.try_clone_to_owned().expect("dup"))
        .collect();
    let again = BackendRequest::decode(code, &enc.payload, dups).expect("re-decoding");
    assert_eq!(again.encode().payload, enc.payload);
}

/// A decoded reply body answers its request and re-encodes to the input.
fn check_reply(reply: &BackendReply, code: u32, body: &[u8], fds: &[MadeFd]) {
    assert!(
        reply.answers(code),
        "{reply:?} does not answer request {code}"
    );
    let enc = reply.encode();
    assert_eq!(
        enc.payload, body,
        "reply to {code}: accepted a non-canonical encoding"
    );
    assert_eq!(enc.fds.len(), fds.len());
    for (got, sent) in enc.fds.iter().zip(fds) {
        assert_eq!(identity(*got), identity(sent.fd.as_fd()));
    }
    let dups = enc
        .fds
        .iter()
        .map(|f| f.try_clone_to_owned().expect("dup"))
        .collect();
    let again = BackendReply::decode(code, &enc.payload, dups).expect("re-decoding a reply");
    assert_eq!(again.encode().payload, enc.payload);
}

fn run(input: &ProtoInput<'_>) {
    let header = Header::from_bytes(&input.header);
    let code = input.code();
    let fds = make_fds(input.fds);
    let mut bytes = input.header.to_vec();
    bytes.extend_from_slice(input.payload);
    // What a receiver reads as the payload: `size` bytes, when that many arrived with a
    // valid header and no more descriptors than a message may carry.
    let framed: Option<&[u8]> = header
        .as_ref()
        .ok()
        .and_then(|h| input.payload.get(..h.size as usize))
        .filter(|_| fds.len() <= MAX_FDS);

    if !input.is_reply() {
        let direct = BackendRequest::decode(code, input.payload, dup_all(&fds));
        if let Ok(req) = &direct {
            check_request(req, code, input.payload, &fds);
        }
        if input.via_socket() {
            let (a, b) = UnixStream::pair().expect("socketpair");
            raw_send(&a, &bytes, &borrow_all(&fds), true);
            let got = FrontendChannel::new(b).recv();
            let is_request = header.as_ref().is_ok_and(|h| !h.is_reply());
            let expected = framed
                .filter(|_| is_request)
                .map(|p| BackendRequest::decode(code, p, dup_all(&fds)));
            if let Some(expected) = &expected {
                assert_eq!(
                    got.is_ok(),
                    expected.is_ok(),
                    "socket {:?} vs direct {:?}",
                    got.as_ref().err(),
                    expected.as_ref().err()
                );
            }
            match &got {
                Ok(incoming) => {
                    let Some(Ok(expected)) = &expected else {
                        panic!("accepted a bad frame");
                    };
                    assert_eq!(incoming.token.request, code);
                    check_request(&incoming.request, code, framed.unwrap_or_default(), &fds);
                    assert_eq!(incoming.request.encode().payload, expected.encode().payload);
                    // Requests may own fds: the same code, payload and number of fds.
                    assert_eq!(incoming.request.code(), expected.code());
                    assert_eq!(
                        incoming.request.encode().fds.len(),
                        expected.encode().fds.len()
                    );
                }
                Err(e) => {
                    let _ = e.reply_status();
                    let _ = e.reply_token();
                    let _ = e.is_fatal();
                    let _ = viommu_backend::error_chain(e);
                }
            }
        }
    } else {
        let direct = BackendReply::decode(code, input.payload, dup_all(&fds));
        if let Ok(reply) = &direct {
            check_reply(reply, code, input.payload, &fds);
        }
        if input.via_socket()
            && let Some(req) = canonical_request(code)
        {
            let (a, b) = UnixStream::pair().expect("socketpair");
            raw_send(&b, &bytes, &borrow_all(&fds), true);
            let got = BackendChannel::new(a).call(&req);
            let payload = framed.unwrap_or_default();
            let body = payload.get(8..).unwrap_or_default();
            let prefix_ok = payload.get(..8) == Some(&[0u8; 8][..]);
            let sane = framed.is_some()
                && header
                    .as_ref()
                    .is_ok_and(|h| h.is_reply() && !h.need_reply() && h.request == code);
            match &got {
                Ok(reply) => {
                    assert!(sane && prefix_ok, "accepted a bad reply frame");
                    check_reply(reply, code, body, &fds);
                }
                Err(e) => {
                    let _ = viommu_backend::error_chain(e);
                    if sane && prefix_ok {
                        let body_ok = BackendReply::decode(code, body, dup_all(&fds)).is_ok();
                        assert!(!body_ok, "socket refused a good reply: {e:?}");
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = ProtoInput::parse(data) else {
        return;
    };
    let before = lowest_free_fd();
    run(&input);
    assert_eq!(lowest_free_fd(), before, "a descriptor leaked");
});
