//! Whole sessions without a socket: structure-aware message sequences through
//! `Session::handle_request` (SET_FEATURES, SET_CONFIG, the memory table with real memfds,
//! interrupt eventfds, the backend channel answered by a mock frontend or with its peer
//! closed, MMIO, guest RAM contents and a guest that builds valid tables, devices emulated and
//! passthrough on the in-memory host double, TRANSLATE, RESET, GET_STATE / SET_STATE, host
//! events).
//!
//! Invariants: no panic; every request crosses the codec; a successful reply is the kind its
//! request takes and encodes and decodes; an error reply never says OK; when the session is
//! dropped, every descriptor it held is closed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viommu_fuzz::codec::from_bytes;
use viommu_fuzz::fds::lowest_free_fd;
use viommu_fuzz::session::{Harness, Input};

fuzz_target!(|data: &[u8]| {
    let Some(input) = from_bytes::<Input>(data) else {
        return;
    };
    let before = lowest_free_fd();
    let mut h = Harness::new();
    for msg in input.msgs.iter().take(64) {
        h.step(msg);
    }
    h.finish();
    assert_eq!(lowest_free_fd(), before, "the session leaked a descriptor");
});
