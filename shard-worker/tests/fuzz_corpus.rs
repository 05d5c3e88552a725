//! Replays the committed fuzz corpus (`fuzz/corpus/`) of the storage layout's decoders
//! through the same checks as the fuzz targets. `SHOAL_WRITE_FUZZ_CORPUS=1`
//! regenerates the seed files.

use std::path::Path;

use shoal_shard_worker::fuzzing::{
    check_log_entry, check_meta, check_value, log_entry_seeds, meta_seeds, value_seeds,
};
use shoal_shared::fuzzing::{replay_corpus, LimitedAllocator};

#[global_allocator]
static ALLOCATOR: LimitedAllocator = LimitedAllocator;

fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn layout_value_corpus() {
    let checked = replay_corpus(repository(), "layout_value", &value_seeds(), check_value);
    assert!(checked >= 3);
}

#[test]
fn layout_log_entry_corpus() {
    let checked = replay_corpus(
        repository(),
        "layout_log_entry",
        &log_entry_seeds(),
        check_log_entry,
    );
    assert!(checked >= 3);
}

#[test]
fn layout_meta_corpus() {
    let checked = replay_corpus(repository(), "layout_meta", &meta_seeds(), check_meta);
    assert!(checked >= 3);
}
