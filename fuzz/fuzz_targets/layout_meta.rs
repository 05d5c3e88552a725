//! Fuzzes the expiry-index key and partition meta decoders with `shoal_shard_worker::fuzzing::check_meta`; a single allocation over the
//! decoder's bound is a failure too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_shared::fuzzing::LimitedAllocator;

#[global_allocator]
static ALLOCATOR: LimitedAllocator = LimitedAllocator;

fuzz_target!(|input: &[u8]| shoal_shard_worker::fuzzing::check_meta(input));
