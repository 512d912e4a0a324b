//! Looks at seeds by hand: `VIOMMU_FUZZ_TRACE=1 cargo test --release --test trace -- --nocapture`.
use viommu_fuzz::codec::from_bytes;
use viommu_fuzz::session::{Harness, Input};

#[test]
fn trace_session_seeds() {
    let Ok(path) = std::env::var("VIOMMU_FUZZ_SEED") else {
        return;
    };
    let data = std::fs::read(path).expect("seed");
    let input: Input = from_bytes(&data).expect("decodes");
    let mut h = Harness::new();
    for m in &input.msgs {
        eprintln!(
            "-- {}",
            format!("{m:?}").chars().take(160).collect::<String>()
        );
        h.step(m);
    }
    h.finish();
}
