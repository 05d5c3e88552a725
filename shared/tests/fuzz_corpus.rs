//! Replays the committed fuzz corpus (`fuzz/corpus/`) of the RESP and frame decoders
//! through the same checks as the fuzz targets, so that CI catches a regression
//! without cargo-fuzz. `SHOAL_WRITE_FUZZ_CORPUS=1` regenerates the seed files.

use std::path::Path;

use shoal_shared::fuzzing::{
    check_resp_request, check_worker_request_frame, check_worker_response_frame,
    frame_preallocation_regressions, frame_request_seeds, frame_response_seeds, replay_corpus,
    resp_request_seeds, LimitedAllocator,
};

#[global_allocator]
static ALLOCATOR: LimitedAllocator = LimitedAllocator;

fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn resp_request_corpus() {
    let checked = replay_corpus(
        repository(),
        "resp_request",
        &resp_request_seeds(),
        check_resp_request,
    );
    assert!(checked > 10);
}

#[test]
fn frame_request_corpus() {
    let seeds = [frame_request_seeds(), frame_preallocation_regressions()].concat();
    let checked = replay_corpus(
        repository(),
        "frame_request",
        &seeds,
        check_worker_request_frame,
    );
    assert!(checked > 10);
}

#[test]
fn frame_response_corpus() {
    let checked = replay_corpus(
        repository(),
        "frame_response",
        &frame_response_seeds(),
        check_worker_response_frame,
    );
    assert!(checked > 10);
}

/// A frame that declares a 100 MB string, byte string or sequence but holds a few bytes
/// must fail without allocating for the declared length.
#[test]
fn declared_lengths_do_not_allocate() {
    for (name, frame) in frame_preallocation_regressions() {
        let bound = shoal_shared::fuzzing::frame_allocation_bound(frame.len());
        let result = shoal_shared::fuzzing::with_allocation_limit(bound, || {
            shoal_shared::frame::decode_frame::<shoal_shared::frame::RequestEnvelope>(&frame)
        });
        assert!(result.is_err(), "{name}: {result:?}");
    }
}

/// The guard itself: an allocation over the bound is reported.
#[test]
#[should_panic(expected = "the bound is 100 bytes")]
fn the_allocation_guard_catches_large_allocations() {
    shoal_shared::fuzzing::with_allocation_limit(100, || std::hint::black_box(vec![0u8; 1000]));
}
