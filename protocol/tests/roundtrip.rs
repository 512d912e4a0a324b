//! Every message of both channels survives encode, a real socketpair with real fds, and decode.

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
use viommu_protocol::message::Request as _;
use viommu_protocol::types::{
    Access, AccessSize, AddressSpace, ConfigFlags, Features, IdRegs, IotlbInvalidate, IrqIndex,
    MemRegion, MmioAccess, ModelConfig, MsiWrite, PassthroughIds, Perm, TranslateReply,
    TranslateRequest, VALID_OAS_BITS,
};
use viommu_protocol::{
    AttachDevice, Backend, BackendChannel, BackendReply, BackendRequest, Error, ErrorReply,
    Frontend, FrontendChannel, FrontendReply, FrontendRequest, Passthrough, StateBlob, Status,
};

use common::{identity, memfd};

/// A request without its fds: plain data proptest can generate and shrink.
#[derive(Debug, Clone)]
enum Spec {
    GetFeatures,
    SetFeatures(u64),
    SetConfig(ModelConfig),
    GetIdRegs,
    SetBackendChannel,
    SetMemTable(Vec<MemRegion>),
    GetMaxMemSlots,
    AddMemReg(MemRegion),
    RemMemReg(MemRegion),
    SetIrqFd(u32, bool),
    MmioRead(MmioAccess),
    MmioWrite(MmioAccess, u64),
    SetIommufd,
    AttachDevice(u32, u32, Option<(u32, u32)>),
    DetachDevice(u32),
    Translate(TranslateRequest),
    Reset,
    GetState,
    SetState(u64),
}

fn region() -> impl Strategy<Value = MemRegion> {
    (0u64..1 << 40, 1u64..1 << 20, 0u64..1 << 30).prop_map(|(gpa, pages, off)| MemRegion {
        gpa: gpa << 12 >> 12 & !0xfff,
        size: pages << 12,
        mmap_offset: off << 12,
    })
}

fn disjoint_regions() -> impl Strategy<Value = Vec<MemRegion>> {
    prop::collection::vec((1u64..64, 1u64..64, 0u64..1024), 0..=8).prop_map(|parts| {
        let mut gpa = 0u64;
        parts
            .into_iter()
            .map(|(gap, pages, off)| {
                gpa += gap << 12;
                let r = MemRegion {
                    gpa,
                    size: pages << 12,
                    mmap_offset: off << 12,
                };
                gpa += pages << 12;
                r
            })
            .collect()
    })
}

fn config() -> impl Strategy<Value = ModelConfig> {
    let fixed = (
        prop::sample::select(VALID_OAS_BITS.to_vec()),
        0u8..=20,
        1u8..=32,
        1u8..=19,
        1u8..=19,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_filter_map("a stage", |(oas, ssid, sid, cq, eq, s1, s2, ril, ats)| {
            let mut flags = ConfigFlags::empty();
            flags.set(ConfigFlags::STAGE1, s1);
            flags.set(ConfigFlags::STAGE2, s2);
            flags.set(ConfigFlags::RIL, ril);
            flags.set(ConfigFlags::ATS, ats);
            (s1 || s2).then_some(ModelConfig {
                flags,
                oas_bits: oas,
                ssid_bits: ssid,
                sid_bits: sid,
                cmdq_log2: cq,
                evtq_log2: eq,
            })
        });
    let auto = (1u8..=32, 1u8..=19, 1u8..=19, any::<bool>()).prop_map(|(sid, cq, eq, msi)| {
        let mut flags = ConfigFlags::IDR_AUTO | ConfigFlags::STAGE1;
        flags.set(ConfigFlags::MSI, msi);
        ModelConfig {
            flags,
            oas_bits: 0,
            ssid_bits: 0,
            sid_bits: sid,
            cmdq_log2: cq,
            evtq_log2: eq,
        }
    });
    prop_oneof![fixed, auto]
}

fn mmio() -> impl Strategy<Value = MmioAccess> {
    prop_oneof![
        (0u64..0x8000).prop_map(|i| MmioAccess {
            offset: i * 4,
            size: AccessSize::Dword
        }),
        (0u64..0x4000).prop_map(|i| MmioAccess {
            offset: i * 8,
            size: AccessSize::Qword
        }),
    ]
}

fn translate() -> impl Strategy<Value = TranslateRequest> {
    (
        any::<u32>(),
        prop::option::of(0u32..1 << 20),
        any::<u64>(),
        0u32..16,
    )
        .prop_map(|(sid, ssid, iova, access)| TranslateRequest {
            sid,
            ssid,
            iova,
            access: Access::from_bits_truncate(access),
        })
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        Just(Spec::GetFeatures),
        (0u64..64).prop_map(Spec::SetFeatures),
        config().prop_map(Spec::SetConfig),
        Just(Spec::GetIdRegs),
        Just(Spec::SetBackendChannel),
        disjoint_regions().prop_map(Spec::SetMemTable),
        Just(Spec::GetMaxMemSlots),
        region().prop_map(Spec::AddMemReg),
        region().prop_map(Spec::RemMemReg),
        (0u32..4, any::<bool>()).prop_map(|(i, fd)| Spec::SetIrqFd(i, fd)),
        mmio().prop_map(Spec::MmioRead),
        (mmio(), any::<u64>()).prop_map(|(a, v)| {
            let v = if a.size == AccessSize::Dword {
                v & 0xffff_ffff
            } else {
                v
            };
            Spec::MmioWrite(a, v)
        }),
        Just(Spec::SetIommufd),
        (
            any::<u32>(),
            any::<u32>(),
            prop::option::of((any::<u32>(), any::<u32>()))
        )
            .prop_map(|(h, s, p)| Spec::AttachDevice(h, s, p)),
        any::<u32>().prop_map(Spec::DetachDevice),
        translate().prop_map(Spec::Translate),
        Just(Spec::Reset),
        Just(Spec::GetState),
        (0u64..=16 << 20).prop_map(Spec::SetState),
    ]
}

/// Builds the request with fresh real fds: memfds for memory and state, an eventfd for IRQs,
/// a socket for the backend channel.
fn build(spec: &Spec) -> FrontendRequest {
    match spec.clone() {
        Spec::GetFeatures => FrontendRequest::GetFeatures,
        Spec::SetFeatures(f) => FrontendRequest::SetFeatures(Features::from_bits(f).unwrap()),
        Spec::SetConfig(c) => FrontendRequest::SetConfig(c),
        Spec::GetIdRegs => FrontendRequest::GetIdRegs,
        Spec::SetBackendChannel => {
            FrontendRequest::SetBackendChannel(UnixStream::pair().unwrap().0)
        }
        Spec::SetMemTable(rs) => {
            FrontendRequest::SetMemTable(rs.into_iter().map(|r| (r, memfd(b"ram"))).collect())
        }
        Spec::GetMaxMemSlots => FrontendRequest::GetMaxMemSlots,
        Spec::AddMemReg(r) => FrontendRequest::AddMemReg(r, memfd(b"ram")),
        Spec::RemMemReg(r) => FrontendRequest::RemMemReg(r),
        Spec::SetIrqFd(i, with_fd) => FrontendRequest::SetIrqFd {
            index: IrqIndex::ALL[i as usize],
            fd: with_fd.then(common::eventfd_new),
        },
        Spec::MmioRead(a) => FrontendRequest::MmioRead(a),
        Spec::MmioWrite(access, value) => FrontendRequest::MmioWrite { access, value },
        Spec::SetIommufd => FrontendRequest::SetIommufd(memfd(b"iommufd stand-in")),
        Spec::AttachDevice(handle, sid, pt) => FrontendRequest::AttachDevice(AttachDevice {
            handle,
            sid,
            passthrough: pt.map(|(devid, s2_hwpt_id)| Passthrough {
                ids: PassthroughIds { devid, s2_hwpt_id },
                cdev: memfd(b"cdev stand-in"),
            }),
        }),
        Spec::DetachDevice(handle) => FrontendRequest::DetachDevice { handle },
        Spec::Translate(t) => FrontendRequest::Translate(t),
        Spec::Reset => FrontendRequest::Reset,
        Spec::GetState => FrontendRequest::GetState,
        Spec::SetState(size) => FrontendRequest::SetState(StateBlob {
            size,
            fd: memfd(b"state"),
        }),
    }
}

/// The identities of the files a message carries.
fn fd_identities<R: viommu_protocol::Request>(req: &R) -> Vec<(u64, u64)> {
    req.encode()
        .fds
        .iter()
        .map(|fd| identity(fd.as_fd()))
        .collect()
}

/// A reply that fits the request, built from `seed`.
fn reply_for(req: &FrontendRequest, seed: u64) -> FrontendReply {
    match req {
        FrontendRequest::GetFeatures => FrontendReply::Features(Features::from_bits_retain(seed)),
        FrontendRequest::GetIdRegs => FrontendReply::IdRegs(IdRegs {
            idr: [seed as u32, (seed >> 8) as u32, 0, 0x1, 0, 0x75],
            iidr: 0x43b,
            aidr: 1,
        }),
        FrontendRequest::GetMaxMemSlots => FrontendReply::MaxMemSlots(seed),
        FrontendRequest::MmioRead(_) => FrontendReply::MmioValue(seed),
        FrontendRequest::Translate(_) => FrontendReply::Translate(if seed.is_multiple_of(3) {
            TranslateReply::Fault {
                event: (seed >> 8) as u8,
            }
        } else {
            let shift = 12 + (seed % 30) as u32;
            let mask = (1u64 << shift) - 1;
            TranslateReply::Translated {
                addr: seed & !mask,
                addr_mask: mask,
                perm: Perm::from_bits_truncate(1 + (seed % 3) as u32),
            }
        }),
        FrontendRequest::GetState => FrontendReply::State(StateBlob {
            size: seed % (16 << 20),
            fd: memfd(b"state"),
        }),
        _ => FrontendReply::Ack,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Requests: what the backend decodes is what the frontend sent, fds included.
    #[test]
    fn frontend_requests_round_trip(spec in spec()) {
        let (a, b) = UnixStream::pair().unwrap();
        let frontend = Frontend::new(a);
        let backend = Backend::new(b);
        let sent = build(&spec);
        frontend.post(&sent).or_else(|e| match e {
            // Always-replied requests cannot be posted; send them with call() from a thread.
            Error::Usage { .. } => Ok(()),
            e => Err(e),
        }).unwrap();
        let expects_reply = FrontendRequest::reply_policy(sent.code())
            == Some(viommu_protocol::ReplyPolicy::Always);
        let caller = expects_reply.then(|| {
            let clone = build_like(&sent);
            let stream = frontend.stream().try_clone().unwrap();
            thread::spawn(move || Frontend::new(stream).call(&clone).map(|_| ()))
        });
        let got = backend.recv().unwrap();
        prop_assert_eq!(got.request.code(), sent.code());
        prop_assert_eq!(got.request.encode().payload, sent.encode().payload);
        prop_assert_eq!(fd_identities(&got.request), fd_identities(&sent));
        prop_assert_eq!(got.token.expects_reply, expects_reply);
        if let Some(caller) = caller {
            backend.reply(got.token, Ok(reply_for(&got.request, 0))).unwrap();
            caller.join().unwrap().unwrap();
        }
    }

    /// Replies: each request's reply reaches the caller intact, fds included.
    #[test]
    fn frontend_replies_round_trip(spec in spec(), seed in any::<u64>()) {
        let (a, b) = UnixStream::pair().unwrap();
        let backend = Backend::new(b);
        let request = build(&spec);
        let caller = thread::spawn(move || {
            let frontend = Frontend::new(a);
            let reply = frontend.call(&request).unwrap();
            let ids = match &reply {
                FrontendReply::State(blob) => vec![identity(&blob.fd)],
                _ => vec![],
            };
            (format!("{:?}", strip_fd(&reply)), ids)
        });
        let got = backend.recv().unwrap();
        prop_assert!(got.token.expects_reply);
        let reply = reply_for(&got.request, seed);
        let sent_ids = match &reply {
            FrontendReply::State(blob) => vec![identity(&blob.fd)],
            _ => vec![],
        };
        let sent_text = format!("{:?}", strip_fd(&reply));
        backend.reply(got.token, Ok(reply)).unwrap();
        let (got_text, got_ids) = caller.join().unwrap();
        prop_assert_eq!(got_text, sent_text);
        prop_assert_eq!(got_ids, sent_ids);
    }

    /// Error replies carry status and text; the connection stays usable.
    #[test]
    fn error_replies_round_trip(status in 1u32..64, text in "\\PC{0,300}") {
        let (a, b) = UnixStream::pair().unwrap();
        let backend = Backend::new(b);
        let caller = thread::spawn(move || {
            let frontend = Frontend::new(a);
            let first = frontend.call(&FrontendRequest::Reset);
            let second = frontend.call(&FrontendRequest::GetFeatures);
            (first, second.map(|r| format!("{r:?}")))
        });
        let got = backend.recv().unwrap();
        backend.reply(got.token, Err(ErrorReply::new(Status(status), text.clone()))).unwrap();
        let got = backend.recv().unwrap();
        backend.reply(got.token, Ok(FrontendReply::Features(Features::all()))).unwrap();
        let (first, second) = caller.join().unwrap();
        match first {
            Err(Error::Remote { request, status: s, message }) => {
                prop_assert_eq!(request, "RESET");
                prop_assert_eq!(s, Status(status));
                prop_assert_eq!(message, text);
            }
            other => prop_assert!(false, "expected a remote error, got {:?}", other),
        }
        prop_assert!(second.is_ok());
    }

    /// The backend channel: requests and replies in the other direction.
    #[test]
    fn backend_channel_round_trip(
        which in 0u8..5,
        listed in prop::collection::btree_map(any::<u32>(), any::<u32>(), 0..40),
        handle in any::<u32>(),
        ssid in prop::option::of(0u32..1 << 20),
        range in (any::<u64>(), any::<u64>()),
        found in prop::option::of(any::<u32>()),
        msi in (any::<u64>(), any::<u32>()),
    ) {
        let (start, last) = if range.0 <= range.1 { range } else { (range.1, range.0) };
        let request = match which {
            0 => BackendRequest::SetAddressSpace {
                handle,
                space: if handle % 2 == 0 { AddressSpace::System } else { AddressSpace::Translated },
                sid: handle.rotate_left(7),
            },
            1 => BackendRequest::IotlbInvalidate(IotlbInvalidate {
                handle: (handle % 3 != 0).then_some(handle),
                ssid,
                start,
                last,
            }),
            2 => BackendRequest::ResolveSid { sid: handle },
            3 => BackendRequest::GetDeviceSids,
            _ => BackendRequest::MsiWrite(MsiWrite { address: msi.0 & !3, data: msi.1 }),
        };
        // Requests carry no fds here; their Debug form names every field.
        let expected = format!("{request:?}");
        let (a, b) = UnixStream::pair().unwrap();
        let channel = FrontendChannel::new(b);
        let caller = thread::spawn(move || BackendChannel::new(a).call(&request));
        let got = channel.recv().unwrap();
        prop_assert_eq!(format!("{:?}", got.request), expected);
        let reply = match got.request {
            BackendRequest::ResolveSid { .. } => BackendReply::ResolveSid(found),
            BackendRequest::GetDeviceSids => BackendReply::DeviceSids(
                listed.iter().map(|(&handle, &sid)| viommu_protocol::DeviceSid { handle, sid }).collect(),
            ),
            _ => BackendReply::Ack,
        };
        channel.reply(got.token, Ok(reply.clone())).unwrap();
        prop_assert_eq!(caller.join().unwrap().unwrap(), reply);
    }
}

/// A second request of the same kind and payload (fds duplicated), for sending twice.
fn build_like(req: &FrontendRequest) -> FrontendRequest {
    let enc = req.encode();
    let fds = enc
        .fds
        .iter()
        .map(|fd| fd.try_clone_to_owned().unwrap())
        .collect();
    FrontendRequest::decode(req.code(), &enc.payload, fds).unwrap()
}

/// Debug text of a reply with the fd number masked (it differs across a socket).
fn strip_fd(reply: &FrontendReply) -> String {
    match reply {
        FrontendReply::State(blob) => format!("State(size={})", blob.size),
        other => format!("{other:?}"),
    }
}

#[test]
fn call_of_an_ack_only_request_sets_need_reply_and_gets_an_ack() {
    let (a, b) = UnixStream::pair().unwrap();
    let backend = Backend::new(b);
    let caller = thread::spawn(move || {
        Frontend::new(a).call(&FrontendRequest::SetFeatures(Features::BACKEND_CHANNEL))
    });
    let got = backend.recv().unwrap();
    assert!(got.token.expects_reply, "call() must set NEED_REPLY");
    backend.reply(got.token, Ok(FrontendReply::Ack)).unwrap();
    assert!(matches!(caller.join().unwrap(), Ok(FrontendReply::Ack)));
}

#[test]
fn posting_an_always_replied_request_is_refused() {
    let (a, _b) = UnixStream::pair().unwrap();
    let err = Frontend::new(a)
        .post(&FrontendRequest::GetFeatures)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Usage {
                name: "GET_FEATURES",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_fatal());
}

#[test]
fn a_reply_of_the_wrong_kind_is_not_sent() {
    let (a, b) = UnixStream::pair().unwrap();
    let backend = Backend::new(b);
    let frontend = Frontend::new(a);
    frontend.stream().set_nonblocking(true).unwrap();
    let stream = frontend.stream().try_clone().unwrap();
    viommu_protocol::socket::send_message(
        &stream,
        &viommu_protocol::Header::request(1, 0, false),
        &[],
        &[],
    )
    .unwrap();
    let got = backend.recv().unwrap();
    let err = backend
        .reply(got.token, Ok(FrontendReply::MmioValue(1)))
        .unwrap_err();
    assert!(matches!(err, Error::Usage { .. }), "{err:?}");
    // Nothing reached the frontend.
    let mut buf = [0u8; 1];
    assert!(std::io::Read::read(&mut frontend.stream(), &mut buf).is_err());
}

#[test]
fn a_posted_message_gets_no_reply_even_when_the_handler_answers() {
    let (a, b) = UnixStream::pair().unwrap();
    let backend = Backend::new(b);
    let frontend = Frontend::new(a);
    let access = MmioAccess {
        offset: 0x98,
        size: AccessSize::Dword,
    };
    frontend
        .post(&FrontendRequest::MmioWrite { access, value: 1 })
        .unwrap();
    let got = backend.recv().unwrap();
    assert!(!got.token.expects_reply);
    backend.reply(got.token, Ok(FrontendReply::Ack)).unwrap();
    frontend.stream().set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let err = std::io::Read::read(&mut frontend.stream(), &mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
}
