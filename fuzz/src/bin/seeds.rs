//! Writes the seed corpora: `cargo run --release --bin seeds -- <fuzz dir>`.
//!
//! - protocol targets: every request and reply of both channels as the protocol crate encodes
//!   the values its round-trip and wire-layout tests use, each with the descriptors it
//!   carries, plain and through a socket; plus every hex dump of `docs/protocol.md`'s
//!   Appendix A, byte for byte;
//! - model targets: worlds the guest driver builds (each granule, linear and 2-level stream
//!   and CD tables, stage 1, stage 2, nested) with the steps the model suites take;
//! - session: the scripted Linux-like session of the mock QEMU peer, and variants.
//!
//! Structure-aware seeds are written with `codec::roundtrip`, which checks that they decode to
//! what was meant.

use std::path::{Path, PathBuf};

use viommu_fuzz::codec::roundtrip;
use viommu_fuzz::proto::{MODE_REPLY, MODE_SOCKET, encode_input, message};
use viommu_fuzz::session::{ChannelMode, GpaSel, Msg, RecordSrc, StateSrc};
use viommu_fuzz::world::{
    Addr, CdFmtSel, Cmd, GranuleSel, IovaSel, MapSpec, ModelSel, Reg, S1Sel, SsidSel, StreamKind,
    StreamSpec, TableSel, TlbiSel, Txn, WorldSpec,
};
use viommu_protocol::header::{FLAG_NEED_REPLY, FLAG_REPLY, VERSION};
use viommu_protocol::message::{Reply, Request};
use viommu_protocol::types::{
    Access, AccessSize, AddressSpace, ConfigFlags, Features, IdRegs, IotlbInvalidate, IrqIndex,
    MemRegion, MmioAccess, ModelConfig, MsiWrite, PassthroughIds, Perm, TranslateReply,
    TranslateRequest,
};
use viommu_protocol::{
    AttachDevice, BackendReply, BackendRequest, DeviceSid, FrontendReply, FrontendRequest,
    Passthrough, StateBlob,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn memfd() -> std::os::fd::OwnedFd {
    viommu_fuzz::fds::make_fd(1).fd
}

fn eventfd() -> std::os::fd::OwnedFd {
    viommu_fuzz::fds::make_fd(0).fd
}

/// The fd kind bytes for a message's descriptors (by what the message expects).
fn kinds_of(code: u32, count: usize, frontend: bool) -> Vec<u8> {
    use viommu_protocol::frontend::code as c;
    let kind = if !frontend {
        0
    } else {
        match code {
            c::SET_BACKEND_CHANNEL => 2,
            c::SET_MEM_TABLE | c::ADD_MEM_REG | c::SET_STATE | c::GET_STATE => 1,
            _ => 0,
        }
    };
    vec![kind; count]
}

fn ok_reply_payload(body: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p.extend_from_slice(body);
    p
}

fn frontend_requests() -> Vec<FrontendRequest> {
    let region = |gpa, size, off| MemRegion {
        gpa,
        size,
        mmap_offset: off,
    };
    let (chan, _) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    vec![
        FrontendRequest::GetFeatures,
        FrontendRequest::SetFeatures(Features::all()),
        FrontendRequest::SetConfig(ModelConfig {
            flags: ConfigFlags::STAGE1 | ConfigFlags::STAGE2 | ConfigFlags::RIL,
            oas_bits: 44,
            ssid_bits: 16,
            sid_bits: 16,
            cmdq_log2: 19,
            evtq_log2: 19,
        }),
        FrontendRequest::SetConfig(ModelConfig {
            flags: ConfigFlags::IDR_AUTO | ConfigFlags::STAGE1 | ConfigFlags::MSI,
            oas_bits: 0,
            ssid_bits: 0,
            sid_bits: 16,
            cmdq_log2: 19,
            evtq_log2: 19,
        }),
        FrontendRequest::GetIdRegs,
        FrontendRequest::SetBackendChannel(chan),
        FrontendRequest::SetMemTable(vec![
            (region(0, 0x4000_0000, 0), memfd()),
            (region(0x1_0000_0000, 0x1000, 0x1000), memfd()),
        ]),
        FrontendRequest::SetMemTable(Vec::new()),
        FrontendRequest::GetMaxMemSlots,
        FrontendRequest::AddMemReg(region(0x8000_0000, 0x20_0000, 0), memfd()),
        FrontendRequest::RemMemReg(region(0x8000_0000, 0x20_0000, 0)),
        FrontendRequest::SetIrqFd {
            index: IrqIndex::Gerror,
            fd: Some(eventfd()),
        },
        FrontendRequest::SetIrqFd {
            index: IrqIndex::CmdSync,
            fd: None,
        },
        FrontendRequest::MmioRead(MmioAccess {
            offset: 0x9c,
            size: AccessSize::Dword,
        }),
        FrontendRequest::MmioWrite {
            access: MmioAccess {
                offset: 0x98,
                size: AccessSize::Dword,
            },
            value: 1,
        },
        FrontendRequest::MmioWrite {
            access: MmioAccess {
                offset: 0x90,
                size: AccessSize::Qword,
            },
            value: 0x4000_0000_0012_0008,
        },
        FrontendRequest::SetIommufd(eventfd()),
        FrontendRequest::AttachDevice(AttachDevice {
            handle: 1,
            sid: 8,
            passthrough: Some(Passthrough {
                ids: PassthroughIds {
                    devid: 3,
                    s2_hwpt_id: 2,
                },
                cdev: eventfd(),
            }),
        }),
        FrontendRequest::AttachDevice(AttachDevice {
            handle: 2,
            sid: 0x10,
            passthrough: None,
        }),
        FrontendRequest::DetachDevice { handle: 2 },
        FrontendRequest::Translate(TranslateRequest {
            sid: 0x10,
            ssid: Some(3),
            iova: 0x4000_1000,
            access: Access::READ | Access::WRITE,
        }),
        FrontendRequest::Translate(TranslateRequest {
            sid: 8,
            ssid: None,
            iova: 0x1000,
            access: Access::empty(),
        }),
        FrontendRequest::Reset,
        FrontendRequest::GetState,
        FrontendRequest::SetState(StateBlob {
            size: 300,
            fd: memfd(),
        }),
    ]
}

fn frontend_replies() -> Vec<(u32, FrontendReply)> {
    use viommu_protocol::frontend::code as c;
    vec![
        (c::GET_FEATURES, FrontendReply::Features(Features::all())),
        (
            c::GET_ID_REGS,
            FrontendReply::IdRegs(IdRegs {
                idr: [0x0800_2a0e, 0x00e7_3c10, 0, 0x404, 0, 0x74],
                iidr: 0,
                aidr: 1,
            }),
        ),
        (c::GET_MAX_MEM_SLOTS, FrontendReply::MaxMemSlots(256)),
        (c::MMIO_READ, FrontendReply::MmioValue(0x8000_0001)),
        (
            c::TRANSLATE,
            FrontendReply::Translate(TranslateReply::Translated {
                addr: 0x60_0000,
                addr_mask: 0xfff,
                perm: Perm::READ | Perm::WRITE,
            }),
        ),
        (
            c::TRANSLATE,
            FrontendReply::Translate(TranslateReply::Fault { event: 0x10 }),
        ),
        (
            c::GET_STATE,
            FrontendReply::State(StateBlob {
                size: 512,
                fd: memfd(),
            }),
        ),
        (c::SET_CONFIG, FrontendReply::Ack),
        (c::ATTACH_DEVICE, FrontendReply::Ack),
        (c::MMIO_WRITE, FrontendReply::Ack),
    ]
}

fn backend_requests() -> Vec<BackendRequest> {
    vec![
        BackendRequest::SetAddressSpace {
            handle: 1,
            space: AddressSpace::System,
            sid: 8,
        },
        BackendRequest::SetAddressSpace {
            handle: 2,
            space: AddressSpace::Translated,
            sid: 0x10,
        },
        BackendRequest::IotlbInvalidate(IotlbInvalidate {
            handle: Some(1),
            ssid: Some(3),
            start: 0x1000,
            last: 0x1fff,
        }),
        BackendRequest::IotlbInvalidate(IotlbInvalidate {
            handle: None,
            ssid: None,
            start: 0,
            last: u64::MAX,
        }),
        BackendRequest::ResolveSid { sid: 0x10 },
        BackendRequest::MsiWrite(MsiWrite {
            address: 0x0809_0040,
            data: 0x20,
        }),
        BackendRequest::GetDeviceSids,
    ]
}

fn backend_replies() -> Vec<(u32, BackendReply)> {
    use viommu_protocol::backend::code as c;
    vec![
        (c::RESOLVE_SID, BackendReply::ResolveSid(Some(2))),
        (c::RESOLVE_SID, BackendReply::ResolveSid(None)),
        (
            c::GET_DEVICE_SIDS,
            BackendReply::DeviceSids(vec![
                DeviceSid { handle: 1, sid: 8 },
                DeviceSid {
                    handle: 2,
                    sid: 0x10,
                },
            ]),
        ),
        (c::SET_ADDRESS_SPACE, BackendReply::Ack),
        (c::MSI_WRITE, BackendReply::Ack),
    ]
}

/// The hex dumps of `docs/protocol.md` Appendix A, one message each.
fn appendix_a(doc: &str) -> Vec<Vec<u8>> {
    let Some(start) = doc.find("## Appendix A") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    for line in doc[start..].lines() {
        if line.starts_with("```") {
            match current.take() {
                Some(bytes) if !bytes.is_empty() => out.push(bytes),
                Some(_) => {}
                None => current = Some(Vec::new()),
            }
            continue;
        }
        if let Some(bytes) = current.as_mut() {
            let mut words = line.split_whitespace();
            if words.next().is_some_and(|o| o.len() == 4) {
                bytes.extend(words.filter_map(|w| u8::from_str_radix(w, 16).ok()));
            }
        }
    }
    out
}

fn protocol_seeds(root: &Path) {
    let fe = root.join("corpus/protocol_frontend");
    let be = root.join("corpus/protocol_backend");
    let mut n = 0;
    let mut put = |dir: &Path, bytes: Vec<u8>| {
        n += 1;
        write(dir, &format!("seed-{n:03}"), &bytes);
    };
    for req in frontend_requests() {
        let enc = req.encode();
        let kinds = kinds_of(req.code(), enc.fds.len(), true);
        let need = FrontendRequest::reply_policy(req.code())
            == Some(viommu_protocol::ReplyPolicy::OnNeedReply);
        let flags = VERSION | if need { FLAG_NEED_REPLY } else { 0 };
        let msg = message(req.code(), flags, &enc.payload);
        put(&fe, encode_input(0, &kinds, &msg));
        put(&fe, encode_input(MODE_SOCKET, &kinds, &msg));
    }
    for (code, reply) in frontend_replies() {
        let enc = reply.encode();
        let kinds = kinds_of(code, enc.fds.len(), true);
        put(
            &fe,
            encode_input(
                MODE_REPLY,
                &kinds,
                &message(code, VERSION | FLAG_REPLY, &enc.payload),
            ),
        );
        let payload = ok_reply_payload(&enc.payload);
        put(
            &fe,
            encode_input(
                MODE_REPLY | MODE_SOCKET,
                &kinds,
                &message(code, VERSION | FLAG_REPLY, &payload),
            ),
        );
    }
    for req in backend_requests() {
        let enc = req.encode();
        let msg = message(req.code(), VERSION | FLAG_NEED_REPLY, &enc.payload);
        put(&be, encode_input(0, &[], &msg));
        put(&be, encode_input(MODE_SOCKET, &[], &msg));
    }
    for (code, reply) in backend_replies() {
        let enc = reply.encode();
        put(
            &be,
            encode_input(
                MODE_REPLY,
                &[],
                &message(code, VERSION | FLAG_REPLY, &enc.payload),
            ),
        );
        let payload = ok_reply_payload(&enc.payload);
        put(
            &be,
            encode_input(
                MODE_REPLY | MODE_SOCKET,
                &[],
                &message(code, VERSION | FLAG_REPLY, &payload),
            ),
        );
    }
    // Appendix A: exact bytes; a request with a descriptor gets an eventfd.
    let doc = std::fs::read_to_string(root.join("../docs/protocol.md")).unwrap_or_default();
    for msg in appendix_a(&doc) {
        if msg.len() < 12 {
            continue;
        }
        let flags = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
        let code = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let reply = flags & FLAG_REPLY != 0;
        let kinds: Vec<u8> = if !reply && code == 14 {
            vec![0]
        } else {
            vec![]
        };
        let mode = MODE_SOCKET | if reply { MODE_REPLY } else { 0 };
        put(&fe, encode_input(mode, &kinds, &msg));
    }
}

fn model(s2: bool, sid_bits: u8) -> ModelSel {
    ModelSel {
        stage1: true,
        stage2: s2,
        ril: true,
        ats: false,
        msi: true,
        oas: 4,
        sid_bits: sid_bits - 1,
        ssid_bits: 16,
        cmdq_log2: 18,
        evtq_log2: 18,
    }
}

fn s1(fmt: CdFmtSel, s1cdmax: u8, ssids: Vec<u32>) -> S1Sel {
    S1Sel {
        fmt,
        s1cdmax,
        s1dss: 2,
        ssids,
        ttb1: false,
        tbi: false,
    }
}

/// The worlds the seeds use: one per granule and table layout.
fn worlds() -> Vec<WorldSpec> {
    let streams = |nested: bool| {
        let mut v = vec![
            StreamSpec {
                sid: 1,
                kind: StreamKind::Bypass,
            },
            StreamSpec {
                sid: 2,
                kind: StreamKind::Abort,
            },
            StreamSpec {
                sid: 8,
                kind: StreamKind::S1 {
                    s1: s1(CdFmtSel::Linear, 0, vec![]),
                },
            },
            StreamSpec {
                sid: 0x10,
                kind: StreamKind::S1 {
                    s1: s1(CdFmtSel::TwoLevel64K, 8, vec![3, 200]),
                },
            },
        ];
        if nested {
            v.push(StreamSpec {
                sid: 0x18,
                kind: StreamKind::S2,
            });
            v.push(StreamSpec {
                sid: 0x20,
                kind: StreamKind::Nested {
                    s1: s1(CdFmtSel::TwoLevel4K, 6, vec![1, 9]),
                },
            });
        }
        v
    };
    let maps = vec![
        MapSpec {
            stage2: false,
            index: 0x100,
            level: 0,
            out: 0x600,
            prot: 3,
        },
        MapSpec {
            stage2: false,
            index: 3,
            level: 1,
            out: 1,
            prot: 1,
        },
    ];
    let mut out = Vec::new();
    for (i, (g1, g2)) in [
        (GranuleSel::G4K, GranuleSel::G4K),
        (GranuleSel::G16K, GranuleSel::G64K),
        (GranuleSel::G64K, GranuleSel::G16K),
    ]
    .into_iter()
    .enumerate()
    {
        for nested in [false, true] {
            out.push(WorldSpec {
                model: model(nested, if nested { 16 } else { 8 }),
                s1: TableSel {
                    granule: g1.clone(),
                    ias: 16 - i as u8,
                },
                s2: TableSel {
                    granule: g2.clone(),
                    ias: 8,
                },
                two_level: nested,
                streams: streams(nested),
                maps: maps.clone(),
            });
        }
    }
    out
}

fn txn(stream: u8, ssid: SsidSel, iova: IovaSel, access: u8) -> Txn {
    Txn {
        stream,
        raw_sid: None,
        ssid,
        iova,
        access,
    }
}

fn sync() -> Cmd {
    Cmd::Sync {
        cs: 1,
        msiaddr: Addr::Raw { addr: 0 },
        msidata: 0,
    }
}

fn cmdq_seeds(root: &Path) {
    use viommu_fuzz::cmdq::{BaseSel, Input, Op};
    let tlbi = TlbiSel {
        vmid: 0,
        asid: 1,
        addr: 0x4000_0000,
        leaf: true,
        num: 3,
        scale: 0,
        ttl: 3,
        tg: 1,
    };
    let scripts: Vec<Vec<Op>> = vec![
        vec![
            Op::Translate {
                txn: txn(
                    2,
                    SsidSel::None,
                    IovaSel::Mapped {
                        index: 0,
                        offset: 0x10,
                    },
                    1,
                ),
            },
            Op::Cmds {
                cmds: vec![
                    Cmd::CfgiSte { sid: 8, leaf: true },
                    Cmd::CfgiCd {
                        sid: 8,
                        ssid: 0,
                        leaf: true,
                    },
                    Cmd::TlbiNhVa { t: tlbi.clone() },
                    Cmd::TlbiNhAsid { vmid: 0, asid: 1 },
                    Cmd::TlbiS12Vmall { vmid: 1 },
                    Cmd::TlbiNsnhAll,
                    Cmd::CfgiAll,
                    Cmd::Sync {
                        cs: 1,
                        msiaddr: Addr::Ram0 { off: 0x70_0000 },
                        msidata: 7,
                    },
                ],
                publish: true,
            },
            Op::Translate {
                txn: txn(
                    2,
                    SsidSel::None,
                    IovaSel::Mapped {
                        index: 0,
                        offset: 0x10,
                    },
                    2,
                ),
            },
        ],
        vec![
            Op::Translate {
                txn: txn(
                    3,
                    SsidSel::Raw { ssid: 77 },
                    IovaSel::Raw { iova: 0x1234_5000 },
                    3,
                ),
            },
            Op::Translate {
                txn: txn(1, SsidSel::None, IovaSel::Raw { iova: 0x1000 }, 1),
            },
            Op::ConsumeEvents,
            Op::Cmds {
                cmds: vec![Cmd::Raw { d0: 0xff, d1: 0 }, sync()],
                publish: true,
            },
            Op::Read { reg: Reg::Gerrorn },
            Op::AckErrors,
            Op::Write {
                reg: Reg::CmdqCons,
                value: 1,
            },
        ],
        vec![
            Op::Write {
                reg: Reg::Gbpa,
                value: 1 << 31 | 1 << 20,
            },
            Op::Write {
                reg: Reg::Cr0,
                value: 0,
            },
            Op::Base {
                which: BaseSel::Eventq,
                addr: Addr::Raw { addr: 0x2000_0000 },
                log2: 4,
            },
            Op::Write {
                reg: Reg::IrqCtrl,
                value: 7,
            },
            Op::Write {
                reg: Reg::EventqIrqCfg0,
                value: 0x0809_0040,
            },
            Op::Write {
                reg: Reg::Cr0,
                value: 0xd,
            },
            Op::Translate {
                txn: txn(
                    3,
                    SsidSel::Context { index: 1 },
                    IovaSel::Raw { iova: 0xdead_0000 },
                    1,
                ),
            },
            Op::Reset,
        ],
        vec![
            Op::Fill {
                addr: Addr::Ram0 { off: 0x30_0000 },
                count: 300,
                cmd: Cmd::PrefetchCfg { sid: 8 },
            },
            Op::Base {
                which: BaseSel::Cmdq,
                addr: Addr::Ram0 { off: 0x30_0000 },
                log2: 9,
            },
            Op::Write {
                reg: Reg::CmdqProd,
                value: 300,
            },
            Op::CmdAt {
                slot: 300,
                cmd: Cmd::AtcInv {
                    sid: 8,
                    ssid: None,
                    addr: 0,
                    size: 52,
                    global: false,
                },
            },
            Op::Write {
                reg: Reg::CmdqProd,
                value: 301,
            },
        ],
    ];
    let dir = root.join("corpus/cmdq");
    let mut n = 0;
    for world in worlds() {
        for ops in &scripts {
            n += 1;
            let input = Input {
                world: world.clone(),
                ops: ops.clone(),
            };
            write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
        }
    }
}

fn walk_seeds(root: &Path) {
    use viommu_fuzz::walk::{Input, MutOp, Step, Target};
    let t = |stream, ssid, iova, access| Step::Translate {
        txn: txn(stream, ssid, iova, access),
    };
    let mapped = |index, offset| IovaSel::Mapped { index, offset };
    let scripts: Vec<Vec<Step>> = vec![
        // Every stream, every mapping.
        (0..6u8)
            .flat_map(|s| {
                (0..4u8).map(move |m| t(s, SsidSel::Context { index: m }, mapped(m, 0x123), 1))
            })
            .collect(),
        // A table that points at itself, then a walk through it.
        vec![
            t(2, SsidSel::None, mapped(0, 8), 1),
            Step::Mutate {
                target: Target::Pte {
                    stage2: false,
                    map: 0,
                    offset: 0,
                    level: 0,
                },
                op: MutOp::PointTo {
                    target: Target::Pte {
                        stage2: false,
                        map: 0,
                        offset: 0,
                        level: 0,
                    },
                    fine: false,
                },
            },
            Step::Invalidate,
            t(2, SsidSel::None, mapped(0, 8), 1),
            t(2, SsidSel::None, mapped(0, 0x8000_0000), 2),
        ],
        // An STE whose CD pointer is the STE, a CD L1 descriptor pointing at its own table.
        vec![
            Step::Mutate {
                target: Target::Ste { stream: 2, word: 0 },
                op: MutOp::PointTo {
                    target: Target::Ste { stream: 2, word: 0 },
                    fine: true,
                },
            },
            Step::Mutate {
                target: Target::CdL1 {
                    stream: 3,
                    context: 1,
                },
                op: MutOp::PointTo {
                    target: Target::CdL1 {
                        stream: 3,
                        context: 0,
                    },
                    fine: false,
                },
            },
            Step::InvalidateStream { stream: 2 },
            Step::InvalidateStream { stream: 3 },
            t(2, SsidSel::None, mapped(0, 0), 1),
            t(3, SsidSel::Context { index: 1 }, mapped(0, 0), 1),
        ],
        // Stage 2 and nested: a level-1 STE descriptor and S2 entries rewritten.
        vec![
            t(4, SsidSel::None, mapped(2, 0x1000), 3),
            t(5, SsidSel::Context { index: 1 }, mapped(0, 0x10), 1),
            Step::Mutate {
                target: Target::Pte {
                    stage2: true,
                    map: 0,
                    offset: 0x1_0000,
                    level: 1,
                },
                op: MutOp::FlipBit { bit: 1 },
            },
            Step::Mutate {
                target: Target::StrtabL1 { stream: 5 },
                op: MutOp::Xor { value: 0x1f },
            },
            Step::Invalidate,
            t(5, SsidSel::Context { index: 1 }, mapped(0, 0x10), 1),
            t(4, SsidSel::None, mapped(2, 0x1000), 3),
        ],
    ];
    let dir = root.join("corpus/walk");
    let mut n = 0;
    for world in worlds() {
        for steps in &scripts {
            n += 1;
            let input = Input {
                world: world.clone(),
                steps: steps.clone(),
            };
            write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
        }
    }
}

fn session_seeds(root: &Path) {
    let dir = root.join("corpus/session");
    let mut n = 0;
    for (i, world) in worlds().into_iter().enumerate() {
        let sids: Vec<u32> = world.streams.iter().map(|s| s.sid).collect();
        let passthrough = i % 2 == 1;
        let mut msgs = vec![
            Msg::GetFeatures,
            Msg::SetFeatures { bits: 0x3f },
            Msg::SetConfig {
                model: world.model.clone(),
                idr_auto: false,
            },
            Msg::SetBackendChannel {
                mode: ChannelMode::Answered { fail_every: 0 },
            },
            Msg::SetMemTable {
                regions: vec![GpaSel::Ram0, GpaSel::Ram1],
            },
            Msg::SetIrqFd {
                index: 0,
                fd: Some(0),
            },
            Msg::SetIrqFd {
                index: 2,
                fd: Some(0),
            },
            Msg::SetIrqFd {
                index: 3,
                fd: Some(0),
            },
            Msg::GetIdRegs,
        ];
        if passthrough {
            msgs.push(Msg::SetIommufd);
            msgs.push(Msg::Attach {
                handle: 5,
                sid: sids[2],
                passthrough: Some([0, 0]),
            });
        }
        for (h, sid) in sids.iter().enumerate().take(4) {
            msgs.push(Msg::Attach {
                handle: h as u8,
                sid: *sid,
                passthrough: None,
            });
        }
        msgs.extend([
            Msg::Guest {
                world: world.clone(),
            },
            Msg::Translate {
                sid: sids[2],
                ssid: None,
                iova: 0x4000_0010,
                access: 1,
            },
            Msg::Translate {
                sid: sids[3],
                ssid: Some(3),
                iova: 0x4000_0010,
                access: 3,
            },
            Msg::Translate {
                sid: 0x77,
                ssid: None,
                iova: 0x1000,
                access: 1,
            },
            Msg::Cmds {
                cmds: vec![
                    Cmd::CfgiSte {
                        sid: sids[2],
                        leaf: true,
                    },
                    Cmd::TlbiNhAsid { vmid: 0, asid: 1 },
                    Cmd::Sync {
                        cs: 1,
                        msiaddr: Addr::Raw { addr: 0x0809_0040 },
                        msidata: 0x20,
                    },
                ],
            },
            Msg::ConsumeEvents,
            Msg::Renumber {
                handle: 2,
                sid: 0x30,
            },
            Msg::Cmds {
                cmds: vec![Cmd::CfgiAll, sync()],
            },
            Msg::GetState,
            Msg::MmioWrite {
                reg: Reg::Gbpa,
                value: 1 << 31 | 1 << 20,
            },
            Msg::Reset,
            Msg::Detach { handle: 1 },
        ]);
        if passthrough {
            msgs.push(Msg::HostEvent {
                device: 0,
                record: [0x10 | (u64::from(sids[2]) << 32), 0, 0x1000, 0],
            });
        }
        n += 1;
        let input = viommu_fuzz::session::Input { msgs: msgs.clone() };
        write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
        // Restore into a fresh session: the devices again, then SET_STATE.
        let mut restore: Vec<Msg> = msgs[..9].to_vec();
        restore.push(Msg::GetState);
        restore.push(Msg::SetState {
            src: StateSrc::Last {
                edits: vec![],
                cut: 0,
            },
        });
        restore.push(Msg::SetState {
            src: StateSrc::Raw {
                bytes: b"{\"version\":1}".to_vec(),
            },
        });
        restore.push(Msg::MmioRead { reg: Reg::Cr0 });
        n += 1;
        let input = viommu_fuzz::session::Input { msgs: restore };
        write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
    }
    // A broken backend channel.
    let msgs = vec![
        Msg::SetFeatures { bits: 0x3f },
        Msg::SetConfig {
            model: model(false, 8),
            idr_auto: false,
        },
        Msg::SetBackendChannel {
            mode: ChannelMode::Closed,
        },
        Msg::Attach {
            handle: 1,
            sid: 8,
            passthrough: None,
        },
        Msg::MmioWrite {
            reg: Reg::Cr0,
            value: 1,
        },
        Msg::Translate {
            sid: 8,
            ssid: None,
            iova: 0,
            access: 1,
        },
    ];
    n += 1;
    let input = viommu_fuzz::session::Input { msgs };
    write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
    // The shared region: a world driven through posted writes, translations that fill the
    // cache, a pushed SID, then a ring the frontend breaks.
    let world = worlds().into_iter().next().expect("a world");
    let sid = world.streams.first().map_or(8, |s| s.sid);
    let msgs = vec![
        Msg::SetFeatures { bits: 0x7f },
        Msg::SetConfig {
            model: world.model.clone(),
            idr_auto: false,
        },
        Msg::SetSharedRegion,
        Msg::SetBackendChannel {
            mode: ChannelMode::Answered { fail_every: 0 },
        },
        Msg::SetMemTable {
            regions: vec![GpaSel::Ram0, GpaSel::Ram1],
        },
        Msg::Attach {
            handle: 1,
            sid,
            passthrough: None,
        },
        Msg::Guest {
            world: world.clone(),
        },
        // SMMU_GERRORN, SMMU_IRQ_CTRL, SMMU_CR0 (SMMUEN, EVTQEN, CMDQEN), posted.
        Msg::Posted {
            entries: vec![
                [0x3c | 4 << 32, 0],
                [0x50 | 4 << 32, 0],
                [0x20 | 4 << 32, 0xd],
            ],
            extra: 0,
        },
        Msg::Translate {
            sid,
            ssid: None,
            iova: 0x1000,
            access: 1,
        },
        Msg::UpdateDevice {
            handle: 1,
            sid: sid ^ 8,
            flags: 1,
        },
        Msg::Cmds {
            cmds: vec![Cmd::CfgiAll, sync()],
        },
        Msg::Posted {
            entries: vec![[0x22 | 4 << 32, 1]],
            extra: 300,
        },
        Msg::GetIdRegs,
    ];
    n += 1;
    let input = viommu_fuzz::session::Input { msgs };
    write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
    // Translation requests through the region (SHARED_TRANSLATE): a good one before and after
    // the vSMMU is enabled, then malformed ones (a reserved flag, a 21-bit SSID, the reserved
    // word), each of which must get an error answer.
    let msgs = vec![
        Msg::SetFeatures { bits: 0xff },
        Msg::SetConfig {
            model: world.model.clone(),
            idr_auto: false,
        },
        Msg::SetSharedRegion,
        Msg::SetBackendChannel {
            mode: ChannelMode::Answered { fail_every: 0 },
        },
        Msg::SetMemTable {
            regions: vec![GpaSel::Ram0, GpaSel::Ram1],
        },
        Msg::Attach {
            handle: 1,
            sid,
            passthrough: None,
        },
        Msg::RegionTranslate {
            sid,
            ssid: 0,
            iova: 0x1000,
            flags: 1,
            reserved: 0,
        },
        Msg::Guest {
            world: world.clone(),
        },
        Msg::Posted {
            entries: vec![
                [0x3c | 4 << 32, 0],
                [0x50 | 4 << 32, 0],
                [0x20 | 4 << 32, 0xd],
            ],
            extra: 0,
        },
        Msg::RegionTranslate {
            sid,
            ssid: 0,
            iova: 0x1000,
            flags: 2,
            reserved: 0,
        },
        Msg::RegionTranslate {
            sid,
            ssid: 0,
            iova: 0x2000,
            flags: 1 << 5,
            reserved: 0,
        },
        Msg::RegionTranslate {
            sid,
            ssid: 1 << 20,
            iova: 0x2000,
            flags: 1 | 1 << 4,
            reserved: 0,
        },
        Msg::RegionTranslate {
            sid,
            ssid: 0,
            iova: 0x2000,
            flags: 1,
            reserved: 7,
        },
    ];
    n += 1;
    let input = viommu_fuzz::session::Input { msgs };
    write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
    // A resume (RESUME) from a region a dead backend left: CR0 with the queues on, command
    // and event queue bases and pointers (CONS ahead of PROD, a pointer wider than the queue),
    // GERROR unacknowledged, with writes still in the ring; then the same with the copy torn
    // (the mirror taken) and a ring that breaks the rules.
    for torn in [false, true] {
        let msgs = vec![
            Msg::SetFeatures { bits: 0xff },
            Msg::SetConfig {
                model: world.model.clone(),
                idr_auto: false,
            },
            Msg::SetBackendChannel {
                mode: ChannelMode::Answered { fail_every: 0 },
            },
            Msg::SetMemTable {
                regions: vec![GpaSel::Ram0, GpaSel::Ram1],
            },
            Msg::Attach {
                handle: 1,
                sid,
                passthrough: None,
            },
            Msg::ResumeRegion {
                regs: vec![
                    [8, 0xd],        // CR0: SMMUEN, EVENTQEN, CMDQEN
                    [20, 0x50],      // IRQ_CTRL
                    [24, 1],         // GERROR
                    [36, 0x10_0008], // CMDQ_BASE low
                    [38, 0x40],      // CMDQ_PROD
                    [39, 0x1ff],     // CMDQ_CONS
                    [40, 0x20_0007], // EVENTQ_BASE low
                    [130, 3],        // EVENTQ_PROD
                ],
                torn,
                // The torn one's ring ends with a misaligned write: the session ends there.
                pending: if torn {
                    vec![
                        [0x3c | 4 << 32, 1],
                        [0x98 | 4 << 32, 0x41],
                        [0x22 | 4 << 32, 1],
                    ]
                } else {
                    vec![[0x3c | 4 << 32, 1], [0x98 | 4 << 32, 0x41]]
                },
            },
            Msg::RegionTranslate {
                sid,
                ssid: 0,
                iova: 0x1000,
                flags: 1,
                reserved: 0,
            },
            Msg::GetIdRegs,
        ];
        n += 1;
        let input = viommu_fuzz::session::Input { msgs };
        write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
    }
    // A resume with a host record returned (HOLD_FDS, 10.11) that names objects the iommufd
    // does not have, a vEVENTQ whose fd is a memfd, events in hand; then a passthrough attach
    // that the record claims, and a host event.
    let record = br#"{"viommus":[{"id":10,"s2_hwpt":1,"abort":11,"bypass":12,"veventq":13,"veventq_log2":3,"idr":[0,0,0,0,0,0]}],"devices":{"2":{"dev_id":100,"viommu":10,"vsid":16,"vdevice":14,"nested":null,"target":{"Translate":[1,0]}}}}"#;
    let msgs = vec![
        Msg::SetFeatures { bits: 0xff },
        Msg::SetConfig {
            model: world.model.clone(),
            idr_auto: true,
        },
        Msg::SetBackendChannel {
            mode: ChannelMode::Answered { fail_every: 0 },
        },
        Msg::SetMemTable {
            regions: vec![GpaSel::Ram0, GpaSel::Ram1],
        },
        Msg::SetIommufd,
        Msg::ReturnFds {
            record: Some(RecordSrc::Raw {
                bytes: record.to_vec(),
                generation: 1,
                in_hand: true,
            }),
            extra: vec![13, 99],
        },
        Msg::ResumeRegion {
            regs: vec![[8, 0xd]],
            torn: false,
            pending: vec![],
        },
        Msg::Attach {
            handle: 2,
            sid: 16,
            passthrough: Some([0, 0]),
        },
        Msg::HostEvent {
            device: 0,
            record: [0x10 | 16 << 32, 0, 0x1000, 0],
        },
        Msg::GetIdRegs,
    ];
    n += 1;
    let input = viommu_fuzz::session::Input { msgs };
    write(&dir, &format!("seed-{n:03}"), &roundtrip(&input));
}

fn main() {
    let root: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for t in [
        "protocol_frontend",
        "protocol_backend",
        "cmdq",
        "walk",
        "session",
    ] {
        let _ = std::fs::remove_dir_all(root.join("corpus").join(t));
    }
    protocol_seeds(&root);
    cmdq_seeds(&root);
    walk_seeds(&root);
    session_seeds(&root);
    println!("seeds written under {}", root.join("corpus").display());
}
