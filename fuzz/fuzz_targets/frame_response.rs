//! Fuzzes frames of `ResponseEnvelope` (what the net-daemon reads) with `shoal_shared::fuzzing::check_worker_response_frame`; a single allocation over the
//! decoder's bound is a failure too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_shared::fuzzing::LimitedAllocator;

#[global_allocator]
static ALLOCATOR: LimitedAllocator = LimitedAllocator;

fuzz_target!(|input: &[u8]| shoal_shared::fuzzing::check_worker_response_frame(input));
