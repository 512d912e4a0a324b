//! No error path leaks a file descriptor: the process's open-fd count is the same before and
//! after hundreds of refused messages that carried fds. One test in its own binary, so that no
//! other test opens fds meanwhile.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod common;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use viommu_protocol::frontend::code;
use viommu_protocol::{Backend, Error, Frontend, FrontendRequest};

use common::{header, memfd, message, open_fds, raw_send};

fn scenario(bytes: &[u8], fds: &[BorrowedFd<'_>], hang_up: bool) -> Result<(), Error> {
    let (a, b) = UnixStream::pair().unwrap();
    let backend = Backend::new(b);
    raw_send(&a, bytes, fds);
    if hang_up {
        drop(a);
    }
    backend.recv().map(drop)
}

#[test]
fn refused_messages_leak_no_fds() {
    let files: Vec<_> = (0..9).map(|i| memfd(&[i as u8; 16])).collect();
    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
    let emulated_attach: Vec<u8> = [1u32, 8, 0, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mem_table_one: Vec<u8> = [1u32.to_le_bytes().to_vec(), vec![0; 4], {
        let mut r = Vec::new();
        for v in [0u64, 0x1000, 0, 0] {
            r.extend_from_slice(&v.to_le_bytes());
        }
        r
    }]
    .concat();

    // Warm up allocations that open fds lazily, then count.
    let _ = scenario(&message(code::GET_FEATURES, false, &[]), &[], false);
    let before = open_fds();
    for _ in 0..50 {
        // Fds on a message that takes none.
        assert!(scenario(&message(code::GET_FEATURES, false, &[]), &fds[..3], false).is_err());
        // Emulated attach with an fd.
        assert!(
            scenario(
                &message(code::ATTACH_DEVICE, true, &emulated_attach),
                &fds[..1],
                false
            )
            .is_err()
        );
        // A memory table with more fds than regions.
        assert!(
            scenario(
                &message(code::SET_MEM_TABLE, true, &mem_table_one),
                &fds[..4],
                false
            )
            .is_err()
        );
        // Too many fds: the kernel truncates the control data.
        assert!(matches!(
            scenario(&message(code::GET_FEATURES, false, &[]), &fds, false),
            Err(Error::TooManyFds { .. })
        ));
        // A valid header with fds, then the peer hangs up mid-payload.
        assert!(matches!(
            scenario(&header(code::SET_CONFIG, 1, 16), &fds[..2], true),
            Err(Error::PartialMessage { .. })
        ));
        // Fds with an unknown request, a bad version, an oversize header.
        assert!(scenario(&message(77, true, &[0; 8]), &fds[..2], false).is_err());
        assert!(scenario(&header(code::SET_IOMMUFD, 2, 0), &fds[..1], false).is_err());
        assert!(scenario(&header(code::SET_IOMMUFD, 1, 5000), &fds[..1], false).is_err());
        // A non-socket as the backend channel.
        assert!(
            scenario(
                &message(code::SET_BACKEND_CHANNEL, true, &[]),
                &fds[..1],
                false
            )
            .is_err()
        );
        // Successfully decoded requests with fds, dropped by the receiver.
        assert!(scenario(&message(code::SET_IOMMUFD, true, &[]), &fds[..1], false).is_ok());
        assert!(
            scenario(
                &message(code::SET_MEM_TABLE, true, &mem_table_one),
                &fds[..1],
                false
            )
            .is_ok()
        );
    }
    // A frontend whose call fails on a torn reply leaks nothing either.
    for _ in 0..20 {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || Frontend::new(a).call(&FrontendRequest::GetState));
        let _req = viommu_protocol::socket::recv_message(&b).unwrap();
        raw_send(&b, &header(code::GET_STATE, 0x5, 16), &fds[..1]);
        drop(b);
        assert!(t.join().unwrap().is_err());
    }
    let after = open_fds();
    assert_eq!(before, after, "open fds before {before}, after {after}");
}
