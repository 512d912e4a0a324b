//! Byte-exact wire layouts, written by hand from the tables in `docs/protocol.md` (not produced
//! by our encoder): what a sender puts on the socket, and what a receiver makes of those bytes.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;

use viommu_protocol::message::Request as _;
use viommu_protocol::types::{
    Access, AccessSize, AddressSpace, ConfigFlags, DeviceFlags, Features, IotlbInvalidate,
    IrqIndex, MemRegion, MmioAccess, ModelConfig, MsiWrite, PassthroughIds, Perm, TranslateReply,
    TranslateRequest,
};
use viommu_protocol::{
    AttachDevice, Backend, BackendChannel, BackendReply, BackendRequest, DeviceSid, Error,
    ErrorReply, Frontend, FrontendChannel, FrontendReply, FrontendRequest, Passthrough,
    ReplyPolicy, Status,
};

use common::{memfd, raw_send};

/// Parses "01 00 ff ..." into bytes.
fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// Everything readable on a stream right now.
fn drain(stream: &UnixStream) -> Vec<u8> {
    stream.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    stream.set_nonblocking(false).unwrap();
    out
}

/// Checks a posted request: its bytes on the wire, and the request decoded from those bytes.
fn check_request(req: FrontendRequest, wire: &str) {
    let expected = hex(wire);
    let (a, b) = UnixStream::pair().unwrap();
    let fds: Vec<_> = req
        .encode()
        .fds
        .iter()
        .map(|f| f.try_clone_to_owned().unwrap())
        .collect();
    let name = req.name();
    let wire = if FrontendRequest::reply_policy(req.code()) == Some(ReplyPolicy::Always) {
        // Always-replied requests go out through call(); read them raw and hang up.
        let (c, d) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || Frontend::new(c).call(&req).map(drop));
        let raw = viommu_protocol::socket::recv_message(&d).unwrap();
        drop(d);
        assert!(t.join().unwrap().is_err());
        [raw.header.to_bytes().to_vec(), raw.payload].concat()
    } else {
        Frontend::new(a.try_clone().unwrap()).post(&req).unwrap();
        drain(&b)
    };
    assert_eq!(wire, expected, "{name} on the wire");
    // And the hand-written bytes decode to the same request.
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    raw_send(&a, &expected, &borrowed);
    let got = Backend::new(b).recv().unwrap();
    assert_eq!(got.request.encode().payload, expected[12..]);
}

/// Checks the bytes of a reply to a request whose header the test sends by hand.
fn check_reply(request_header: &str, reply: Result<FrontendReply, ErrorReply>, wire: &str) {
    let (a, b) = UnixStream::pair().unwrap();
    raw_send(&a, &hex(request_header), &[]);
    let backend = Backend::new(b);
    let got = backend.recv().unwrap();
    backend.reply(got.token, reply).unwrap();
    assert_eq!(drain(&a), hex(wire));
}

#[test]
fn get_features_and_its_reply() {
    check_request(
        FrontendRequest::GetFeatures,
        "01 00 00 00  01 00 00 00  00 00 00 00",
    );
    check_reply(
        "01 00 00 00  01 00 00 00  00 00 00 00",
        Ok(FrontendReply::Features(Features::all())),
        "01 00 00 00  05 00 00 00  10 00 00 00
         00 00 00 00  00 00 00 00
         ff 03 00 00 00 00 00 00",
    );
}

#[test]
fn set_features_posted() {
    check_request(
        FrontendRequest::SetFeatures(Features::BACKEND_CHANNEL | Features::TRANSLATE),
        "02 00 00 00  01 00 00 00  08 00 00 00  09 00 00 00 00 00 00 00",
    );
}

#[test]
fn set_config() {
    let cfg = ModelConfig {
        flags: ConfigFlags::STAGE1 | ConfigFlags::RIL,
        oas_bits: 44,
        ssid_bits: 16,
        sid_bits: 16,
        cmdq_log2: 19,
        evtq_log2: 19,
    };
    // SET_CONFIG is always replied, so it is sent with call(); capture it from a thread.
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || Frontend::new(a).call(&FrontendRequest::SetConfig(cfg)));
    let raw = viommu_protocol::socket::recv_message(&b).unwrap();
    let mut wire = raw.header.to_bytes().to_vec();
    wire.extend_from_slice(&raw.payload);
    assert_eq!(
        wire,
        hex("03 00 00 00  01 00 00 00  10 00 00 00
             0a 00 00 00  2c 10 10 00  13 13 00 00  00 00 00 00")
    );
    // The acknowledgement is the 8 zero bytes of a vhost-user REPLY_ACK.
    raw_send(
        &b,
        &hex("03 00 00 00  05 00 00 00  08 00 00 00  00 00 00 00 00 00 00 00"),
        &[],
    );
    assert!(matches!(t.join().unwrap(), Ok(FrontendReply::Ack)));
}

#[test]
fn mmio_write_of_cmdq_prod_and_a_read_reply() {
    check_request(
        FrontendRequest::MmioWrite {
            access: MmioAccess {
                offset: 0x98,
                size: AccessSize::Dword,
            },
            value: 1,
        },
        "0c 00 00 00  01 00 00 00  18 00 00 00
         98 00 00 00 00 00 00 00  04 00 00 00  00 00 00 00
         01 00 00 00 00 00 00 00",
    );
    check_reply(
        "0b 00 00 00  01 00 00 00  10 00 00 00  a0 00 00 00 00 00 00 00  08 00 00 00  00 00 00 00",
        Ok(FrontendReply::MmioValue(0x8000_0000_4000_1013)),
        "0b 00 00 00  05 00 00 00  10 00 00 00  00 00 00 00 00 00 00 00
         13 10 00 40 00 00 00 80",
    );
}

#[test]
fn attach_of_a_passthrough_and_an_emulated_device() {
    check_request(
        FrontendRequest::AttachDevice(AttachDevice {
            handle: 1,
            sid: 0x0008,
            passthrough: Some(Passthrough {
                ids: PassthroughIds {
                    devid: 3,
                    s2_hwpt_id: 2,
                },
                cdev: memfd(b"cdev"),
            }),
        }),
        "0e 00 00 00  01 00 00 00  18 00 00 00
         01 00 00 00  08 00 00 00  01 00 00 00  03 00 00 00  02 00 00 00  00 00 00 00",
    );
    check_request(
        FrontendRequest::AttachDevice(AttachDevice {
            handle: 2,
            sid: 0x0110,
            passthrough: None,
        }),
        "0e 00 00 00  01 00 00 00  18 00 00 00
         02 00 00 00  10 01 00 00  00 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00",
    );
}

#[test]
fn error_reply_layout() {
    let text = "SET_CONFIG not allowed in state CONNECTED";
    assert_eq!(text.len(), 41);
    let mut wire = String::from("03 00 00 00  05 00 00 00  31 00 00 00  03 00 00 00  29 00 00 00");
    for b in text.bytes() {
        wire.push_str(&format!(" {b:02x}"));
    }
    check_reply(
        "03 00 00 00  01 00 00 00  10 00 00 00  02 00 00 00 2c 10 10 00 13 13 00 00 00 00 00 00",
        Err(ErrorReply::new(Status::BAD_STATE, text)),
        &wire,
    );
    // And a frontend reads those bytes as a remote BAD_STATE.
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || Frontend::new(a).call(&FrontendRequest::GetFeatures));
    let _ = viommu_protocol::socket::recv_message(&b).unwrap();
    let reply = hex(&wire.replacen("03 00 00 00", "01 00 00 00", 1));
    raw_send(&b, &reply, &[]);
    match t.join().unwrap() {
        Err(Error::Remote {
            status, message, ..
        }) => {
            assert_eq!(status, Status::BAD_STATE);
            assert_eq!(message, text);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn memory_messages() {
    check_request(
        FrontendRequest::SetMemTable(vec![(
            MemRegion {
                gpa: 0x4000_0000,
                size: 0x4000_0000,
                mmap_offset: 0x20_0000,
            },
            memfd(b"ram"),
        )]),
        "06 00 00 00  01 00 00 00  28 00 00 00
         01 00 00 00  00 00 00 00
         00 00 00 40 00 00 00 00  00 00 00 40 00 00 00 00  00 00 20 00 00 00 00 00
         00 00 00 00 00 00 00 00",
    );
    check_request(
        FrontendRequest::RemMemReg(MemRegion {
            gpa: 0x1_0000_0000,
            size: 0x1000,
            mmap_offset: 0,
        }),
        "09 00 00 00  01 00 00 00  20 00 00 00
         00 00 00 00 01 00 00 00  00 10 00 00 00 00 00 00  00 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00",
    );
}

#[test]
fn irq_fds() {
    check_request(
        FrontendRequest::SetIrqFd {
            index: IrqIndex::Gerror,
            fd: Some(common::eventfd_new()),
        },
        "0a 00 00 00  01 00 00 00  08 00 00 00  03 00 00 00  00 00 00 00",
    );
    check_request(
        FrontendRequest::SetIrqFd {
            index: IrqIndex::Evtq,
            fd: None,
        },
        "0a 00 00 00  01 00 00 00  08 00 00 00  00 00 00 00  01 00 00 00",
    );
}

#[test]
fn shared_region_messages() {
    // SET_SHARED_REGION (20): size 0x10000, version 1, reserved; the memfd, then the kick.
    let region = viommu_protocol::shared::Region::create().unwrap();
    check_request(
        FrontendRequest::SetSharedRegion {
            region: region.fd().try_clone_to_owned().unwrap(),
            kick: common::eventfd_new(),
            call: None,
            resume: false,
        },
        "14 00 00 00  01 00 00 00  10 00 00 00
         00 00 01 00 00 00 00 00  01 00 00 00  00 00 00 00",
    );
    // With SHARED_TRANSLATE (10.9) the same payload, and the call as a third fd.
    check_request(
        FrontendRequest::SetSharedRegion {
            region: region.fd().try_clone_to_owned().unwrap(),
            kick: common::eventfd_new(),
            call: Some(common::eventfd_new()),
            resume: false,
        },
        "14 00 00 00  01 00 00 00  10 00 00 00
         00 00 01 00 00 00 00 00  01 00 00 00  00 00 00 00",
    );
    // With RESUME (10.10): flags bit 0.
    check_request(
        FrontendRequest::SetSharedRegion {
            region: region.fd().try_clone_to_owned().unwrap(),
            kick: common::eventfd_new(),
            call: None,
            resume: true,
        },
        "14 00 00 00  01 00 00 00  10 00 00 00
         00 00 01 00 00 00 00 00  01 00 00 00  01 00 00 00",
    );
    // UPDATE_DEVICE (21): handle 7, SID 0x0108, UNMAP_NOTIFY.
    check_request(
        FrontendRequest::UpdateDevice {
            handle: 7,
            sid: 0x108,
            flags: DeviceFlags::UNMAP_NOTIFY,
        },
        "15 00 00 00  01 00 00 00  10 00 00 00
         07 00 00 00  08 01 00 00  01 00 00 00  00 00 00 00",
    );
}

#[test]
fn translate_and_its_replies() {
    let req = TranslateRequest {
        sid: 8,
        ssid: Some(3),
        iova: 0x8000_1234,
        access: Access::READ | Access::WRITE,
    };
    let header = "10 00 00 00  01 00 00 00  18 00 00 00
                  08 00 00 00  03 00 00 00  34 12 00 80 00 00 00 00  13 00 00 00  00 00 00 00";
    let (a, b) = UnixStream::pair().unwrap();
    raw_send(&a, &hex(header), &[]);
    let got = Backend::new(b).recv().unwrap();
    assert!(matches!(got.request, FrontendRequest::Translate(t) if t == req));
    check_reply(
        header,
        Ok(FrontendReply::Translate(TranslateReply::Translated {
            addr: 0x4000_0000,
            addr_mask: 0xfff,
            perm: Perm::READ | Perm::WRITE,
        })),
        "10 00 00 00  05 00 00 00  28 00 00 00  00 00 00 00 00 00 00 00
         00 00 00 40 00 00 00 00  ff 0f 00 00 00 00 00 00  03 00 00 00  00 00 00 00
         00 00 00 00  00 00 00 00",
    );
    check_reply(
        header,
        Ok(FrontendReply::Translate(TranslateReply::Fault {
            event: 0x10,
        })),
        "10 00 00 00  05 00 00 00  28 00 00 00  00 00 00 00 00 00 00 00
         00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  01 00 00 00
         10 00 00 00  00 00 00 00",
    );
}

/// Sends a backend-channel request and returns its wire bytes.
fn backend_wire(req: BackendRequest) -> Vec<u8> {
    let (a, b) = UnixStream::pair().unwrap();
    BackendChannel::new(a).post(&req).unwrap();
    drain(&b)
}

/// Sends a backend-channel request that always has a reply, and returns its wire bytes.
fn backend_wire_call(req: BackendRequest) -> Vec<u8> {
    let (a, b) = UnixStream::pair().unwrap();
    a.shutdown(std::net::Shutdown::Read).unwrap();
    // The reply never comes: the call fails once the request is on the wire.
    let _ = BackendChannel::new(a).call(&req);
    drain(&b)
}

#[test]
fn backend_channel_layouts() {
    assert_eq!(
        backend_wire(BackendRequest::SetAddressSpace {
            handle: 1,
            space: AddressSpace::Translated,
            sid: 0x0100,
        }),
        hex("01 00 00 00  01 00 00 00  10 00 00 00
             01 00 00 00  01 00 00 00  00 01 00 00  00 00 00 00")
    );
    // GET_DEVICE_SIDS has no payload and always a reply.
    assert_eq!(
        backend_wire_call(BackendRequest::GetDeviceSids),
        hex("05 00 00 00  01 00 00 00  00 00 00 00")
    );
    assert_eq!(
        backend_wire(BackendRequest::IotlbInvalidate(IotlbInvalidate {
            handle: Some(2),
            ssid: None,
            start: 0x1000,
            last: 0x1fff,
        })),
        hex("02 00 00 00  01 00 00 00  20 00 00 00
             02 00 00 00  00 00 00 00  01 00 00 00  00 00 00 00
             00 10 00 00 00 00 00 00  ff 1f 00 00 00 00 00 00")
    );
    assert_eq!(
        backend_wire(BackendRequest::MsiWrite(MsiWrite {
            address: 0x0809_0040,
            data: 0x1f
        })),
        hex(
            "04 00 00 00  01 00 00 00  10 00 00 00  40 00 09 08 00 00 00 00  1f 00 00 00  00 00 00 00"
        )
    );
    // RESOLVE_SID always has a reply: found handle 7.
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        BackendChannel::new(a).call(&BackendRequest::ResolveSid { sid: 0x10 })
    });
    let channel = FrontendChannel::new(b.try_clone().unwrap());
    let got = channel.recv().unwrap();
    assert!(matches!(
        got.request,
        BackendRequest::ResolveSid { sid: 0x10 }
    ));
    channel
        .reply(got.token, Ok(BackendReply::ResolveSid(Some(7))))
        .unwrap();
    assert_eq!(
        t.join().unwrap().unwrap(),
        BackendReply::ResolveSid(Some(7))
    );
    // A not-found reply in raw bytes.
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || {
        BackendChannel::new(a).call(&BackendRequest::ResolveSid { sid: 0x10 })
    });
    let raw = viommu_protocol::socket::recv_message(&b).unwrap();
    assert_eq!(raw.payload, hex("10 00 00 00  00 00 00 00"));
    raw_send(
        &b,
        &hex(
            "03 00 00 00  05 00 00 00  10 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  00 00 00 00",
        ),
        &[],
    );
    assert_eq!(t.join().unwrap().unwrap(), BackendReply::ResolveSid(None));

    // GET_DEVICE_SIDS's reply in raw bytes: status OK, count 2, then (handle 1, SID 0x0100)
    // and (handle 2, SID 0x0008).
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || BackendChannel::new(a).call(&BackendRequest::GetDeviceSids));
    let raw = viommu_protocol::socket::recv_message(&b).unwrap();
    assert!(raw.payload.is_empty());
    raw_send(
        &b,
        &hex(
            "05 00 00 00  05 00 00 00  20 00 00 00  00 00 00 00 00 00 00 00
              02 00 00 00  00 00 00 00  01 00 00 00  00 01 00 00  02 00 00 00  08 00 00 00",
        ),
        &[],
    );
    assert_eq!(
        t.join().unwrap().unwrap(),
        BackendReply::DeviceSids(vec![
            DeviceSid {
                handle: 1,
                sid: 0x0100
            },
            DeviceSid { handle: 2, sid: 8 },
        ])
    );

    // A handle listed twice, a count the body does not hold, and a reserved word are refused.
    for body in [
        "02 00 00 00  00 00 00 00  01 00 00 00  00 01 00 00  01 00 00 00  08 00 00 00",
        "03 00 00 00  00 00 00 00  01 00 00 00  00 01 00 00  02 00 00 00  08 00 00 00",
        "01 00 00 00  01 00 00 00  01 00 00 00  00 01 00 00",
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || BackendChannel::new(a).call(&BackendRequest::GetDeviceSids));
        let _ = viommu_protocol::socket::recv_message(&b).unwrap();
        let body = hex(body);
        let mut msg = hex("05 00 00 00  05 00 00 00");
        msg.extend_from_slice(&u32::try_from(body.len() + 8).unwrap().to_le_bytes());
        msg.extend_from_slice(&[0; 8]);
        msg.extend_from_slice(&body);
        raw_send(&b, &msg, &[]);
        let err = t.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::BadReply { .. }), "{err:?}");
    }
}

/// HOLD_FDS, RELEASE_FDS and RETURN_FDS (docs/protocol.md 10.11): `count`, reserved, keys; the
/// fds in the keys' order.
#[test]
fn held_descriptor_messages() {
    use viommu_protocol::HeldFds;
    let hold = BackendRequest::HoldFds(HeldFds {
        fds: vec![(0, memfd(b"held")), (9, memfd(b"held"))],
    });
    assert_eq!(hold.encode().fds.len(), 2);
    assert_eq!(
        backend_wire_call(hold),
        hex("06 00 00 00  01 00 00 00  10 00 00 00
             02 00 00 00  00 00 00 00  00 00 00 00  09 00 00 00")
    );
    assert_eq!(
        backend_wire_call(BackendRequest::ReleaseFds(vec![9])),
        hex("07 00 00 00  01 00 00 00  0c 00 00 00  01 00 00 00  00 00 00 00  09 00 00 00")
    );
    check_request(
        FrontendRequest::ReturnFds(HeldFds {
            fds: vec![(0, memfd(b"held"))],
        }),
        "16 00 00 00  01 00 00 00  0c 00 00 00  01 00 00 00  00 00 00 00  00 00 00 00",
    );

    // Hostile lists: each is refused as undecodable, and its fds are closed with it.
    let refused = |code: u8, payload: &str, nfds: usize| {
        let body = hex(payload);
        let mut msg = vec![code, 0, 0, 0, 1, 0, 0, 0, body.len() as u8, 0, 0, 0];
        msg.extend(&body);
        let files: Vec<_> = (0..nfds).map(|_| memfd(b"held")).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let (a, b) = UnixStream::pair().unwrap();
        raw_send(&a, &msg, &borrowed);
        match FrontendChannel::new(b).recv() {
            Err(e) => assert_eq!(e.reply_status(), Status::INVALID_MESSAGE, "{payload}: {e}"),
            Ok(got) => panic!("{payload} decoded as {:?}", got.request),
        }
    };
    // No keys; nine keys (more than a message's fds); fewer fds than keys; a key twice; a
    // reserved field set.
    refused(6, "00 00 00 00  00 00 00 00", 0);
    refused(
        6,
        "09 00 00 00  00 00 00 00  01 00 00 00 02 00 00 00 03 00 00 00 04 00 00 00
         05 00 00 00 06 00 00 00 07 00 00 00 08 00 00 00 0a 00 00 00",
        8,
    );
    refused(6, "02 00 00 00  00 00 00 00  00 00 00 00  09 00 00 00", 1);
    refused(6, "02 00 00 00  00 00 00 00  09 00 00 00  09 00 00 00", 2);
    refused(6, "01 00 00 00  01 00 00 00  09 00 00 00", 1);
    // RELEASE_FDS with a descriptor, a count beyond its payload, or 65 keys.
    refused(7, "01 00 00 00  00 00 00 00  09 00 00 00", 1);
    refused(7, "02 00 00 00  00 00 00 00  09 00 00 00", 0);
    let mut many = String::from("41 00 00 00  00 00 00 00");
    for k in 0..65u8 {
        many.push_str(&format!(" {k:02x} 00 00 00"));
    }
    refused(7, &many, 0);
}
