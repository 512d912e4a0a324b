//! Real memfds and eventfds cross a real socketpair: the receiver gets the same open files,
//! close-on-exec, and can use them.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;

use viommu_protocol::types::{IrqIndex, MemRegion};
use viommu_protocol::{Backend, Frontend, FrontendReply, FrontendRequest, StateBlob};

use common::{identity, is_cloexec, memfd, read_at0};

#[test]
fn memfds_of_a_memory_table_arrive_readable_and_cloexec() {
    let (a, b) = UnixStream::pair().unwrap();
    let frontend = Frontend::new(a);
    let backend = Backend::new(b);
    let contents: Vec<Vec<u8>> = (0..8u8)
        .map(|i| vec![i.wrapping_mul(37).wrapping_add(1); 4096])
        .collect();
    let regions: Vec<(MemRegion, _)> = contents
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let i = i as u64;
            (
                MemRegion {
                    gpa: i << 30,
                    size: 0x1000,
                    mmap_offset: 0,
                },
                memfd(c),
            )
        })
        .collect();
    let sent_ids: Vec<_> = regions.iter().map(|(_, fd)| identity(fd)).collect();
    frontend
        .post(&FrontendRequest::SetMemTable(regions))
        .unwrap();

    let got = backend.recv().unwrap();
    let FrontendRequest::SetMemTable(received) = got.request else {
        panic!("wrong message")
    };
    assert_eq!(received.len(), 8);
    for (i, (region, fd)) in received.iter().enumerate() {
        assert_eq!(region.gpa, (i as u64) << 30);
        assert_eq!(identity(fd), sent_ids[i]);
        assert!(is_cloexec(fd), "received fd {i} is not close-on-exec");
        assert_eq!(read_at0(fd, 4096), contents[i]);
    }
}

#[test]
fn an_irq_eventfd_signals_the_sender() {
    let (a, b) = UnixStream::pair().unwrap();
    let frontend = Frontend::new(a);
    let backend = Backend::new(b);
    let ev = common::eventfd_new();
    let dup = ev.try_clone().unwrap();
    frontend
        .post(&FrontendRequest::SetIrqFd {
            index: IrqIndex::Gerror,
            fd: Some(dup),
        })
        .unwrap();
    let got = backend.recv().unwrap();
    let FrontendRequest::SetIrqFd {
        index,
        fd: Some(fd),
    } = got.request
    else {
        panic!()
    };
    assert_eq!(index, IrqIndex::Gerror);
    assert!(is_cloexec(&fd));
    // The backend signals twice; the frontend sees the counter at 2.
    rustix::io::write(&fd, &1u64.to_le_bytes()).unwrap();
    rustix::io::write(&fd, &1u64.to_le_bytes()).unwrap();
    let mut buf = [0u8; 8];
    rustix::io::read(&ev, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 2);
}

#[test]
fn a_state_memfd_travels_in_a_reply() {
    let (a, b) = UnixStream::pair().unwrap();
    let backend = Backend::new(b);
    let blob = br#"{"version":1}"#;
    let caller = thread::spawn(move || Frontend::new(a).call(&FrontendRequest::GetState));
    let got = backend.recv().unwrap();
    let state = memfd(blob);
    backend
        .reply(
            got.token,
            Ok(FrontendReply::State(StateBlob {
                size: blob.len() as u64,
                fd: state,
            })),
        )
        .unwrap();
    let FrontendReply::State(received) = caller.join().unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(received.size, blob.len() as u64);
    assert!(is_cloexec(&received.fd));
    assert_eq!(read_at0(&received.fd, blob.len()), blob);
}

#[test]
fn the_backend_channel_socket_is_usable_after_passing() {
    let (a, b) = UnixStream::pair().unwrap();
    let frontend = Frontend::new(a);
    let backend = Backend::new(b);
    let (ours, theirs) = UnixStream::pair().unwrap();
    frontend
        .post(&FrontendRequest::SetBackendChannel(theirs))
        .unwrap();
    let got = backend.recv().unwrap();
    let FrontendRequest::SetBackendChannel(channel) = got.request else {
        panic!()
    };
    assert!(is_cloexec(channel.as_fd()));
    let requester = viommu_protocol::BackendChannel::new(channel);
    let responder = viommu_protocol::FrontendChannel::new(ours);
    let t = thread::spawn(move || {
        requester.call(&viommu_protocol::BackendRequest::ResolveSid { sid: 8 })
    });
    let req = responder.recv().unwrap();
    assert!(matches!(
        req.request,
        viommu_protocol::BackendRequest::ResolveSid { sid: 8 }
    ));
    responder
        .reply(
            req.token,
            Ok(viommu_protocol::BackendReply::ResolveSid(Some(3))),
        )
        .unwrap();
    assert_eq!(
        t.join().unwrap().unwrap(),
        viommu_protocol::BackendReply::ResolveSid(Some(3))
    );
}
