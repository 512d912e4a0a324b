//! Every way a peer can send something wrong, over a real socketpair: the receiver returns a
//! precise error, never panics, and keeps the stream usable exactly when the message boundary
//! is known.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;

use proptest::prelude::*;
use viommu_protocol::frontend::code;
use viommu_protocol::message::Request as _;
use viommu_protocol::{
    Backend, DecodeError, Error, Frontend, FrontendReply, FrontendRequest, Status,
};

use common::{header, memfd, message, raw_send};

fn pair() -> (UnixStream, Backend) {
    let (a, b) = UnixStream::pair().unwrap();
    (a, Backend::new(b))
}

fn invalid(err: Error) -> (u32, bool, DecodeError) {
    match err {
        Error::Invalid {
            request,
            expects_reply,
            source,
            ..
        } => (request, expects_reply, source),
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

#[test]
fn hang_up_between_messages_is_disconnected() {
    let (a, backend) = pair();
    drop(a);
    assert!(matches!(backend.recv(), Err(Error::Disconnected)));
}

#[test]
fn truncated_header_then_hang_up() {
    let (a, backend) = pair();
    raw_send(&a, &header(code::GET_FEATURES, 1, 0)[..7], &[]);
    drop(a);
    let err = backend.recv().unwrap_err();
    assert!(
        matches!(
            err,
            Error::PartialMessage {
                expected: 12,
                received: 7
            }
        ),
        "{err:?}"
    );
    assert!(err.is_fatal());
}

#[test]
fn header_split_over_several_writes_is_reassembled() {
    let (a, backend) = pair();
    let bytes = message(code::SET_FEATURES, false, &3u64.to_le_bytes());
    let writer = thread::spawn(move || {
        for chunk in bytes.chunks(3) {
            raw_send(&a, chunk, &[]);
            thread::sleep(std::time::Duration::from_millis(2));
        }
        a
    });
    let got = backend.recv().unwrap();
    assert_eq!(got.request.code(), code::SET_FEATURES);
    drop(writer.join().unwrap());
}

#[test]
fn payload_cut_short_by_hang_up() {
    let (a, backend) = pair();
    let mut bytes = header(code::SET_CONFIG, 1, 16);
    bytes.extend_from_slice(&[0u8; 10]);
    raw_send(&a, &bytes, &[]);
    drop(a);
    let err = backend.recv().unwrap_err();
    assert!(
        matches!(
            err,
            Error::PartialMessage {
                expected: 28,
                received: 22
            }
        ),
        "{err:?}"
    );
}

#[test]
fn oversize_payload_is_refused_before_reading_it() {
    let (a, backend) = pair();
    raw_send(&a, &header(code::SET_MEM_TABLE, 1, 4097), &[]);
    let err = backend.recv().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Oversize {
                size: 4097,
                max: 4096
            }
        ),
        "{err:?}"
    );
    assert!(err.is_fatal());
}

#[test]
fn bad_version_and_reserved_flags_are_fatal() {
    for (flags, check) in [
        (
            0x0u32,
            &(|e: &Error| matches!(e, Error::BadVersion(0))) as &dyn Fn(&Error) -> bool,
        ),
        (0x2, &|e: &Error| matches!(e, Error::BadVersion(2))),
        (0x3, &|e: &Error| matches!(e, Error::BadVersion(3))),
        (0x1 | 0x10, &|e: &Error| {
            matches!(e, Error::ReservedFlags(0x10))
        }),
        (0x1 | 0x8000_0000, &|e: &Error| {
            matches!(e, Error::ReservedFlags(0x8000_0000))
        }),
    ] {
        let (a, backend) = pair();
        raw_send(&a, &header(code::GET_FEATURES, flags, 0), &[]);
        let err = backend.recv().unwrap_err();
        assert!(check(&err), "flags {flags:#x}: {err:?}");
        assert!(err.is_fatal());
    }
}

#[test]
fn reply_flag_on_a_request_is_refused_with_a_reply() {
    let (a, backend) = pair();
    raw_send(&a, &header(code::GET_FEATURES, 0x1 | 0x4, 0), &[]);
    let err = backend.recv().unwrap_err();
    assert!(!err.is_fatal());
    let (request, expects_reply, source) = invalid(err);
    assert_eq!(request, code::GET_FEATURES);
    assert!(expects_reply);
    assert!(matches!(source, DecodeError::Flags { flags: 0x5, .. }));
}

/// An unknown request with NEED_REPLY gets UNKNOWN_REQUEST and the connection goes on.
#[test]
fn unknown_request_gets_an_error_reply_and_the_stream_stays_in_step() {
    let (a, backend) = pair();
    let frontend_stream = a.try_clone().unwrap();
    raw_send(&a, &message(99, true, &[1, 2, 3, 4, 5]), &[]);
    let err = backend.recv().unwrap_err();
    let token = err.reply_token().unwrap();
    assert!(token.expects_reply);
    assert_eq!(err.reply_status(), Status::UNKNOWN_REQUEST);
    assert_eq!(invalid(err).2, DecodeError::UnknownRequest(99));
    backend
        .reply_error(
            token,
            &viommu_protocol::ErrorReply::new(Status::UNKNOWN_REQUEST, "request 99"),
        )
        .unwrap();
    // The frontend reads the error reply as an ordinary message and the next request works.
    let raw = viommu_protocol::socket::recv_message(&frontend_stream).unwrap();
    assert_eq!(raw.header.request, 99);
    assert!(raw.header.is_reply());
    assert_eq!(&raw.payload[..4], &2u32.to_le_bytes());
    let caller = thread::spawn(move || Frontend::new(a).call(&FrontendRequest::GetFeatures));
    let got = backend.recv().unwrap();
    backend
        .reply(
            got.token,
            Ok(FrontendReply::Features(viommu_protocol::Features::empty())),
        )
        .unwrap();
    assert!(caller.join().unwrap().is_ok());
}

#[test]
fn unknown_request_without_need_reply_expects_no_reply() {
    let (a, backend) = pair();
    raw_send(&a, &message(1000, false, &[]), &[]);
    let err = backend.recv().unwrap_err();
    assert!(!err.reply_token().unwrap().expects_reply);
}

#[test]
fn wrong_payload_sizes() {
    for (req, len, expected) in [
        (code::GET_FEATURES, 8usize, 0usize),
        (code::SET_FEATURES, 4, 8),
        (code::SET_CONFIG, 15, 16),
        (code::MMIO_READ, 24, 16),
        (code::MMIO_WRITE, 16, 24),
        (code::TRANSLATE, 25, 24),
        (code::DETACH_DEVICE, 4, 8),
        (code::RESET, 1, 0),
    ] {
        let (a, backend) = pair();
        raw_send(&a, &message(req, false, &vec![0u8; len]), &[]);
        let (request, _, source) = invalid(backend.recv().unwrap_err());
        assert_eq!(request, req);
        assert_eq!(
            source,
            DecodeError::PayloadSize {
                expected,
                actual: len
            },
            "request {req}"
        );
    }
}

#[test]
fn wrong_fd_counts() {
    let m1 = memfd(b"x");
    let m2 = memfd(b"y");
    let ev = common::eventfd_new();
    let emulated_attach = {
        let mut p = Vec::new();
        for v in [1u32, 8, 0, 0, 0, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    };
    // size 0x10000, version 1, reserved 0
    let shared_payload = [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let cases: Vec<(Vec<u8>, Vec<std::os::fd::BorrowedFd<'_>>, usize, usize)> = vec![
        // SET_IOMMUFD takes one fd.
        (message(code::SET_IOMMUFD, true, &[]), vec![], 1, 0),
        (
            message(code::SET_IOMMUFD, true, &[]),
            vec![m1.as_fd(), m2.as_fd()],
            1,
            2,
        ),
        // An emulated ATTACH_DEVICE takes none.
        (
            message(code::ATTACH_DEVICE, false, &emulated_attach),
            vec![m1.as_fd()],
            0,
            1,
        ),
        // SET_SHARED_REGION takes two, or three with SHARED_TRANSLATE (10.9).
        (
            message(code::SET_SHARED_REGION, true, &shared_payload),
            vec![m1.as_fd()],
            2,
            1,
        ),
        (
            message(code::SET_SHARED_REGION, true, &shared_payload),
            vec![m1.as_fd(), ev.as_fd(), ev.as_fd(), ev.as_fd()],
            3,
            4,
        ),
        // GET_FEATURES takes none.
        (
            message(code::GET_FEATURES, false, &[]),
            vec![ev.as_fd()],
            0,
            1,
        ),
        // SET_IRQ_FD with NOFD takes none.
        (
            message(code::SET_IRQ_FD, true, &[0, 0, 0, 0, 1, 0, 0, 0]),
            vec![ev.as_fd()],
            0,
            1,
        ),
        // SET_IRQ_FD without NOFD takes one.
        (
            message(code::SET_IRQ_FD, true, &[2, 0, 0, 0, 0, 0, 0, 0]),
            vec![],
            1,
            0,
        ),
    ];
    for (bytes, fds, expected, actual) in cases {
        let (a, backend) = pair();
        raw_send(&a, &bytes, &fds);
        let (_, _, source) = invalid(backend.recv().unwrap_err());
        assert_eq!(source, DecodeError::FdCount { expected, actual });
    }
}

#[test]
fn more_than_eight_fds_is_fatal() {
    let files: Vec<_> = (0..9).map(|_| memfd(b"z")).collect();
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    let (a, backend) = pair();
    raw_send(&a, &message(code::GET_FEATURES, false, &[]), &fds);
    let err = backend.recv().unwrap_err();
    assert!(matches!(err, Error::TooManyFds { max: 8 }), "{err:?}");
    assert!(err.is_fatal());
}

#[test]
fn reserved_fields_and_ranges() {
    let le = |vals: &[u64], widths: &[usize]| {
        let mut p = Vec::new();
        for (v, w) in vals.iter().zip(widths) {
            p.extend_from_slice(&v.to_le_bytes()[..*w]);
        }
        p
    };
    let cases: Vec<(u32, Vec<u8>, DecodeError)> = vec![
        (
            code::SET_SHARED_REGION,
            le(&[0x8000, 1, 0], &[8, 4, 4]),
            DecodeError::Field {
                field: "shared.size",
                value: 0x8000,
                reason: "version 1's region is 0x10000 bytes",
            },
        ),
        (
            code::SET_SHARED_REGION,
            le(&[0x10000, 2, 0], &[8, 4, 4]),
            DecodeError::Field {
                field: "shared.version",
                value: 2,
                reason: "only version 1 is defined",
            },
        ),
        (
            code::SET_SHARED_REGION,
            le(&[0x10000, 1, 3], &[8, 4, 4]),
            DecodeError::Reserved {
                field: "shared.flags",
                value: 2,
            },
        ),
        (
            code::UPDATE_DEVICE,
            le(&[1, 8, 2, 0], &[4, 4, 4, 4]),
            DecodeError::Reserved {
                field: "update.flags",
                value: 2,
            },
        ),
        (
            code::UPDATE_DEVICE,
            le(&[1, 8, 1, 5], &[4, 4, 4, 4]),
            DecodeError::Reserved {
                field: "update.reserved",
                value: 5,
            },
        ),
        (
            code::MMIO_READ,
            le(&[0x20000, 4, 0], &[8, 4, 4]),
            DecodeError::Field {
                field: "mmio.offset",
                value: 0x20000,
                reason: "outside the 128 KiB register window",
            },
        ),
        (
            code::MMIO_READ,
            le(&[0x44, 8, 0], &[8, 4, 4]),
            DecodeError::Field {
                field: "mmio.offset",
                value: 0x44,
                reason: "not aligned to the access size",
            },
        ),
        (
            code::MMIO_READ,
            le(&[0x44, 2, 0], &[8, 4, 4]),
            DecodeError::Field {
                field: "mmio.size",
                value: 2,
                reason: "not 4 or 8",
            },
        ),
        (
            code::MMIO_READ,
            le(&[0x44, 4, 7], &[8, 4, 4]),
            DecodeError::Reserved {
                field: "mmio.reserved",
                value: 7,
            },
        ),
        (
            code::MMIO_WRITE,
            le(&[0x98, 4, 0, 0x1_0000_0001], &[8, 4, 4, 8]),
            DecodeError::Reserved {
                field: "mmio.value[63:32]",
                value: 1,
            },
        ),
        (
            code::ATTACH_DEVICE,
            le(&[1, 8, 0, 3, 0, 0], &[4, 4, 4, 4, 4, 4]),
            DecodeError::Reserved {
                field: "attach.devid",
                value: 3,
            },
        ),
        (
            code::ATTACH_DEVICE,
            le(&[1, 8, 2, 0, 0, 0], &[4, 4, 4, 4, 4, 4]),
            DecodeError::Reserved {
                field: "attach.flags",
                value: 2,
            },
        ),
        (
            code::SET_FEATURES,
            le(&[1 << 40], &[8]),
            DecodeError::Field {
                field: "features",
                value: 1 << 40,
                reason: "unknown feature bits",
            },
        ),
        (
            code::SET_IRQ_FD,
            le(&[4, 1], &[4, 4]),
            DecodeError::Field {
                field: "irq.index",
                value: 4,
                reason: "not 0..=3",
            },
        ),
        (
            code::TRANSLATE,
            le(&[8, 5, 0x1000, 1, 0], &[4, 4, 8, 4, 4]),
            DecodeError::Reserved {
                field: "translate.ssid",
                value: 5,
            },
        ),
        (
            code::TRANSLATE,
            le(&[8, 1 << 20, 0x1000, 0x11, 0], &[4, 4, 8, 4, 4]),
            DecodeError::Field {
                field: "translate.ssid",
                value: 1 << 20,
                reason: "wider than 20 bits",
            },
        ),
        (
            code::REM_MEM_REG,
            le(&[0x1000, 0x1800, 0, 0], &[8, 8, 8, 8]),
            DecodeError::Field {
                field: "region.size",
                value: 0x1800,
                reason: "not a multiple of 4 KiB",
            },
        ),
        (
            code::REM_MEM_REG,
            le(&[0xffff_ffff_ffff_f000, 0x2000, 0, 0], &[8, 8, 8, 8]),
            DecodeError::Field {
                field: "region.size",
                value: 0x2000,
                reason: "gpa + size overflows",
            },
        ),
        (
            code::SET_STATE,
            le(&[(16 << 20) + 1], &[8]),
            DecodeError::Field {
                field: "state.size",
                value: (16 << 20) + 1,
                reason: "more than 16 MiB",
            },
        ),
        (
            code::SET_CONFIG,
            // flags STAGE1, oas 45 (not encodable), ssid 0, sid 16, cmdq 19, evtq 19.
            le(
                &[2, 45, 0, 16, 0, 19, 19, 0, 0],
                &[4, 1, 1, 1, 1, 1, 1, 2, 4],
            ),
            DecodeError::Field {
                field: "config.oas_bits",
                value: 45,
                reason: "not one of 32, 36, 40, 42, 44, 48, 52",
            },
        ),
        (
            code::SET_CONFIG,
            le(
                &[2, 44, 21, 16, 0, 19, 19, 0, 0],
                &[4, 1, 1, 1, 1, 1, 1, 2, 4],
            ),
            DecodeError::Field {
                field: "config.ssid_bits",
                value: 21,
                reason: "more than 20",
            },
        ),
        (
            code::SET_CONFIG,
            le(
                &[2, 44, 0, 16, 0, 20, 19, 0, 0],
                &[4, 1, 1, 1, 1, 1, 1, 2, 4],
            ),
            DecodeError::Field {
                field: "config.cmdq_log2",
                value: 20,
                reason: "not in 1..=19",
            },
        ),
        (
            code::SET_CONFIG,
            le(
                &[0x40, 44, 0, 16, 0, 19, 19, 0, 0],
                &[4, 1, 1, 1, 1, 1, 1, 2, 4],
            ),
            DecodeError::Reserved {
                field: "config.flags",
                value: 0x40,
            },
        ),
    ];
    for (req, payload, expected) in cases {
        let (a, backend) = pair();
        raw_send(&a, &message(req, false, &payload), &[]);
        let (_, _, source) = invalid(backend.recv().unwrap_err());
        assert_eq!(source, expected, "request {req}");
    }
}

#[test]
fn mem_table_checks_count_overlap_and_fds() {
    let region = |gpa: u64, size: u64| {
        let mut p = Vec::new();
        for v in [gpa, size, 0, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    };
    let table = |regions: &[(u64, u64)], count: u32| {
        let mut p = Vec::new();
        p.extend_from_slice(&count.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for (g, s) in regions {
            p.extend(region(*g, *s));
        }
        p
    };
    let m = [memfd(b"a"), memfd(b"b")];
    let two = [m[0].as_fd(), m[1].as_fd()];

    let (a, backend) = pair();
    raw_send(
        &a,
        &message(
            code::SET_MEM_TABLE,
            false,
            &table(&[(0, 0x2000), (0x1000, 0x1000)], 2),
        ),
        &two,
    );
    let (_, _, source) = invalid(backend.recv().unwrap_err());
    assert_eq!(
        source,
        DecodeError::Field {
            field: "region.gpa",
            value: 0x1000,
            reason: "overlaps another region of the table"
        }
    );

    let (a, backend) = pair();
    raw_send(
        &a,
        &message(code::SET_MEM_TABLE, false, &table(&[], 9)),
        &[],
    );
    let (_, _, source) = invalid(backend.recv().unwrap_err());
    assert!(matches!(
        source,
        DecodeError::Field {
            field: "mem_table.nregions",
            value: 9,
            ..
        }
    ));

    let (a, backend) = pair();
    raw_send(
        &a,
        &message(code::SET_MEM_TABLE, false, &table(&[(0, 0x1000)], 2)),
        &two,
    );
    let (_, _, source) = invalid(backend.recv().unwrap_err());
    assert_eq!(
        source,
        DecodeError::PayloadSize {
            expected: 72,
            actual: 40
        }
    );

    let (a, backend) = pair();
    raw_send(
        &a,
        &message(code::SET_MEM_TABLE, false, &table(&[(0, 0x1000)], 1)),
        &two,
    );
    let (_, _, source) = invalid(backend.recv().unwrap_err());
    assert_eq!(
        source,
        DecodeError::FdCount {
            expected: 1,
            actual: 2
        }
    );
}

#[test]
fn backend_channel_fd_must_be_a_unix_stream_socket() {
    let not_socket = memfd(b"file");
    let (dgram, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
    for fd in [not_socket.as_fd(), dgram.as_fd()] {
        let (a, backend) = pair();
        raw_send(&a, &message(code::SET_BACKEND_CHANNEL, true, &[]), &[fd]);
        let (_, _, source) = invalid(backend.recv().unwrap_err());
        assert!(matches!(
            source,
            DecodeError::Field {
                field: "backend_channel.fd",
                ..
            }
        ));
    }
}

#[test]
fn a_request_where_a_reply_is_due_is_an_unexpected_reply() {
    let (a, b) = UnixStream::pair().unwrap();
    let caller = thread::spawn(move || Frontend::new(a).call(&FrontendRequest::GetIdRegs));
    let _request = viommu_protocol::socket::recv_message(&b).unwrap();
    // Answer with a request instead of a reply, then with a reply to another code.
    raw_send(&b, &message(code::GET_FEATURES, false, &[]), &[]);
    let err = caller.join().unwrap().unwrap_err();
    assert!(matches!(
        err,
        Error::UnexpectedReply {
            expected: "GET_ID_REGS",
            request: 1,
            ..
        }
    ));
    assert!(err.is_fatal());

    let (a, b) = UnixStream::pair().unwrap();
    let caller = thread::spawn(move || Frontend::new(a).call(&FrontendRequest::GetIdRegs));
    let _request = viommu_protocol::socket::recv_message(&b).unwrap();
    raw_send(
        &b,
        &[header(code::GET_FEATURES, 0x5, 8), vec![0; 8]].concat(),
        &[],
    );
    let err = caller.join().unwrap().unwrap_err();
    assert!(matches!(
        err,
        Error::UnexpectedReply {
            request: 1,
            flags: 0x5,
            ..
        }
    ));
}

#[test]
fn malformed_replies_are_refused() {
    // An ID-register reply one byte short, an error reply with a length past its text, a
    // success prefix with a detail length.
    let bad: [Vec<u8>; 3] = [
        [vec![0; 8], vec![0; 31]].concat(),
        [
            5u32.to_le_bytes().to_vec(),
            100u32.to_le_bytes().to_vec(),
            b"short".to_vec(),
        ]
        .concat(),
        [
            0u32.to_le_bytes().to_vec(),
            4u32.to_le_bytes().to_vec(),
            vec![0; 32],
        ]
        .concat(),
    ];
    for payload in bad {
        let (a, b) = UnixStream::pair().unwrap();
        let caller = thread::spawn(move || Frontend::new(a).call(&FrontendRequest::GetIdRegs));
        let _request = viommu_protocol::socket::recv_message(&b).unwrap();
        let mut bytes = header(code::GET_ID_REGS, 0x5, payload.len() as u32);
        bytes.extend_from_slice(&payload);
        raw_send(&b, &bytes, &[]);
        let err = caller.join().unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                Error::BadReply {
                    request: "GET_ID_REGS",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_fatal(), "the request's outcome is unknown");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any byte sequence on the socket gives a message or an error, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let (a, backend) = pair();
        if !bytes.is_empty() {
            raw_send(&a, &bytes, &[]);
        }
        drop(a);
        loop {
            match backend.recv() {
                Ok(_) => continue,
                Err(e) if e.is_fatal() => break,
                Err(_) => continue,
            }
        }
    }

    /// Any payload under any request code decodes or is refused, never panics.
    #[test]
    fn arbitrary_payloads_never_panic(
        request in 0u32..24,
        payload in prop::collection::vec(any::<u8>(), 0..400),
        nfds in 0usize..3,
    ) {
        let fds = (0..nfds).map(|_| memfd(b"f")).collect();
        let _ = FrontendRequest::decode(request, &payload, fds);
        let _ = viommu_protocol::BackendRequest::decode(request, &payload, vec![]);
        let _ = <FrontendReply as viommu_protocol::Reply>::decode(request, &payload, vec![]);
    }

    /// Valid headers with payloads shaped like the real layouts but random contents.
    #[test]
    fn random_fields_in_right_sized_payloads_never_panic(
        request in 1u32..20,
        words in prop::collection::vec(any::<u64>(), 0..34),
    ) {
        let payload: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let payload = &payload[..payload.len().min(4096)];
        let (a, backend) = pair();
        raw_send(&a, &message(request, true, payload), &[]);
        let _ = backend.recv();
    }
}
