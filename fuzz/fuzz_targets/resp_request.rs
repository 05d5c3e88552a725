//! Fuzzes the RESP request parser with `shoal_shared::fuzzing::check_resp_request`; a single allocation over the
//! decoder's bound is a failure too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_shared::fuzzing::LimitedAllocator;

#[global_allocator]
static ALLOCATOR: LimitedAllocator = LimitedAllocator;

fuzz_target!(|input: &[u8]| shoal_shared::fuzzing::check_resp_request(input));
