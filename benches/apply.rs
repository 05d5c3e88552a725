//! Micro-benchmarks of the shard-worker's group commit, `Store::apply_batch`, on a
//! real LMDB environment in a temp dir preloaded with 100,000 keys of 100 bytes.
//!
//! - SET batches of 1, 16 and 256 requests on random keys with `async` durability:
//!   the apply and the LMDB commit, without a sync.
//! - The same batches with `fsync` durability: the commit's sync on top.
//! - GET batches of 16 and 256 requests: reads going through the worker.
//!
//! The requests of a batch are built outside the measurement. The commit log is not
//! trimmed while the benchmark runs, as with the default retention.
//!
//! Run with `cargo bench -p shoal-shard-worker --bench apply`.

// `criterion_group!` defines a public function without a doc comment.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use shoal_shard_worker::store::{Store, StoreOptions};
use shoal_shared::config::Durability;
use shoal_shared::frame::{Expiry, Key, SetCondition, SetReply, WorkerRequest, WorkerResponse};
use shoal_shared::partition::key_partition;
use std::path::Path;
use std::time::Duration;

/// Keys written before measuring; the benchmarked requests pick among them.
const PRELOADED_KEYS: usize = 100_000;
/// Requests per group commit while preloading.
const PRELOAD_BATCH: usize = 1000;
const VALUE_BYTES: usize = 100;
/// The default config's partition count.
const PARTITIONS: u16 = 256;
const SET_BATCH_SIZES: [usize; 3] = [1, 16, 256];
const GET_BATCH_SIZES: [usize; 2] = [16, 256];

fn options(durability: Durability) -> StoreOptions {
    StoreOptions {
        shard_id: 0,
        collections: 16,
        partitions: PARTITIONS,
        workers: Some(1),
        durability,
        map_size_bytes: 1 << 30,
        max_map_size_bytes: 1 << 40,
        max_value_bytes: 1 << 20,
    }
}

/// The preloaded keys, and a seeded generator that picks among them.
struct Keyspace {
    keys: Vec<Key>,
    state: u64,
}

impl Keyspace {
    fn new() -> Keyspace {
        let keys = (0..PRELOADED_KEYS)
            .map(|i| {
                let bytes = format!("key:{i:012}").into_bytes();
                Key {
                    partition: key_partition(&bytes, PARTITIONS),
                    bytes,
                }
            })
            .collect();
        Keyspace {
            keys,
            state: 0x5eed,
        }
    }

    /// A key picked at random (splitmix64).
    fn random_key(&mut self) -> Key {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        self.keys[(z % self.keys.len() as u64) as usize].clone()
    }

    fn random_sets(&mut self, count: usize) -> Vec<WorkerRequest> {
        (0..count).map(|_| set(self.random_key())).collect()
    }

    fn random_gets(&mut self, count: usize) -> Vec<WorkerRequest> {
        (0..count)
            .map(|_| WorkerRequest::Get {
                collection: 0,
                key: self.random_key(),
            })
            .collect()
    }
}

fn set(key: Key) -> WorkerRequest {
    WorkerRequest::Set {
        collection: 0,
        key,
        value: vec![b'v'; VALUE_BYTES],
        condition: SetCondition::Always,
        reply: SetReply::Status,
        expiry: Expiry::Clear,
    }
}

/// Applies `requests` as one group commit, as the worker does, and returns them with
/// their responses so that both are dropped outside the measurement.
fn apply(
    store: &mut Store,
    requests: Vec<WorkerRequest>,
) -> (Vec<WorkerRequest>, Vec<WorkerResponse>) {
    let batch: Vec<&WorkerRequest> = requests.iter().collect();
    let responses = store.apply_batch(&batch).expect("group commit failed");
    drop(batch);
    (requests, responses)
}

/// Writes every key of `keyspace` once, in large group commits.
fn preload(dir: &Path, keyspace: &Keyspace) {
    let mut store = Store::open(dir, &options(Durability::Async)).expect("opening the store");
    for chunk in keyspace.keys.chunks(PRELOAD_BATCH) {
        let requests = chunk.iter().cloned().map(set).collect();
        let (_, responses) = apply(&mut store, requests);
        assert!(responses.iter().all(|r| *r == WorkerResponse::Ok));
    }
    store.sync().expect("flushing the preload");
}

fn bench_sets(c: &mut Criterion, dir: &Path, keyspace: &mut Keyspace, durability: Durability) {
    let mut store = Store::open(dir, &options(durability)).expect("opening the store");
    let (_, responses) = apply(&mut store, keyspace.random_sets(16));
    assert!(responses.iter().all(|r| *r == WorkerResponse::Ok));

    let name = match durability {
        Durability::Async => "apply SET async",
        Durability::Fsync => "apply SET fsync",
    };
    let mut group = c.benchmark_group(name);
    match durability {
        Durability::Async => group
            .sample_size(30)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4)),
        Durability::Fsync => group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3)),
    };
    for size in SET_BATCH_SIZES {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_batched(
                || keyspace.random_sets(size),
                |requests| apply(&mut store, requests),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
    // Flush what the `async` runs left dirty, so that the next group's syncs do not pay
    // for it (the worker flushes every `flush_interval_ms` as well).
    store.sync().expect("flushing the store");
}

fn bench_gets(c: &mut Criterion, dir: &Path, keyspace: &mut Keyspace) {
    let mut store = Store::open(dir, &options(Durability::Async)).expect("opening the store");
    let (_, responses) = apply(&mut store, keyspace.random_gets(16));
    assert!(responses
        .iter()
        .all(|r| matches!(r, WorkerResponse::Value(Some(v)) if v.len() == VALUE_BYTES)));

    let mut group = c.benchmark_group("apply GET");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for size in GET_BATCH_SIZES {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_batched(
                || keyspace.random_gets(size),
                |requests| apply(&mut store, requests),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// One environment serves every group: an environment's durability is fixed when it is
/// opened, so each group opens it anew (LMDB allows one open per process at a time).
fn apply_batch(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let mut keyspace = Keyspace::new();
    preload(dir.path(), &keyspace);
    bench_sets(c, dir.path(), &mut keyspace, Durability::Async);
    bench_sets(c, dir.path(), &mut keyspace, Durability::Fsync);
    bench_gets(c, dir.path(), &mut keyspace);
}

criterion_group!(benches, apply_batch);
criterion_main!(benches);
