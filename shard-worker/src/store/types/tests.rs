//! Tests of typed keys (hashes, sets, sorted sets, lists) through the store's requests:
//! the log replayed on another store, reclaim of old versions, export and import of a
//! partition, RENAME/COPY through `Take`/`Read` and `PutTaken`, WRONGTYPE, and the
//! element length limit. Each opens real LMDB environments in temp dirs on a manual
//! clock, and looks at the element tables directly where the reads cannot tell.

use std::path::Path;

use serde_bytes::ByteBuf;
use shoal_shared::config::Durability;
use shoal_shared::frame::{
    Answer, ChangeType, Collection, ExpireCondition, Expiry, Key, LogEntry, Partition, RangeBy,
    Record, RecordTable, SetCondition, SetReply, TxAction, TxOp, TxOutcome, TypedOp, WorkerError,
    WorkerRequest, WorkerResponse, ZAddFlags, ZRange,
};
use shoal_shared::layout::typed::{self, ElementTable, Kind, LogTable, MAX_KEY_AND_ELEMENT_BYTES};

use crate::store::clock::ManualClock;
use crate::store::{Store, StoreOptions};

/// Where the manual clocks start: a fixed time, so that every run sees the same expiries.
const START_MS: u64 = 1_700_000_000_000;
const HOUR_MS: u64 = 3_600_000;
/// The collection every key of these tests is in.
const COLLECTION: Collection = 0;

// ---- Helpers ----

fn options() -> StoreOptions {
    StoreOptions {
        shard_id: 0,
        collections: 2,
        partitions: 4,
        workers: Some(1),
        durability: Durability::Fsync,
        map_size_bytes: 1 << 20,
        max_map_size_bytes: 1 << 30,
        max_value_bytes: 1 << 20,
    }
}

fn open_on(dir: &Path, clock: &ManualClock) -> Store {
    Store::open_with_clock(dir, &options(), clock.clone()).unwrap()
}

fn key(partition: Partition, bytes: &[u8]) -> Key {
    Key {
        partition,
        bytes: bytes.to_vec(),
    }
}

fn buf(bytes: &[u8]) -> ByteBuf {
    ByteBuf::from(bytes.to_vec())
}

fn bufs(items: &[&[u8]]) -> Vec<ByteBuf> {
    items.iter().map(|item| buf(item)).collect()
}

fn run(store: &mut Store, requests: &[WorkerRequest]) -> Vec<WorkerResponse> {
    store
        .apply_batch(&requests.iter().collect::<Vec<_>>())
        .unwrap()
}

fn one(store: &mut Store, request: WorkerRequest) -> WorkerResponse {
    run(store, &[request]).remove(0)
}

fn typed_request(k: &Key, op: TypedOp) -> WorkerRequest {
    WorkerRequest::Typed {
        collection: COLLECTION,
        key: k.clone(),
        op,
    }
}

/// Runs `op` on `k` and returns its answer; panics on an error.
fn answer(store: &mut Store, k: &Key, op: TypedOp) -> Answer {
    match one(store, typed_request(k, op)) {
        WorkerResponse::Answer(answer) => answer,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(&k.bytes)),
    }
}

/// Runs every op on `k` in one batch; panics if any fails.
fn write_all(store: &mut Store, k: &Key, ops: Vec<TypedOp>) {
    let requests: Vec<_> = ops.into_iter().map(|op| typed_request(k, op)).collect();
    for (response, request) in run(store, &requests).into_iter().zip(&requests) {
        assert!(
            matches!(response, WorkerResponse::Answer(_)),
            "{request:?}: {response:?}"
        );
    }
}

fn hset(pairs: &[(&[u8], &[u8])]) -> TypedOp {
    TypedOp::HSet {
        pairs: pairs.iter().map(|(f, v)| (buf(f), buf(v))).collect(),
        if_absent: false,
    }
}

fn hgetall() -> TypedOp {
    TypedOp::HGetAll {
        fields: true,
        values: true,
    }
}

fn zadd(pairs: &[(f64, &[u8])]) -> TypedOp {
    TypedOp::ZAdd {
        flags: ZAddFlags::default(),
        pairs: pairs.iter().map(|(s, m)| (*s, buf(m))).collect(),
    }
}

fn zrange_all(reverse: bool) -> TypedOp {
    TypedOp::ZRange {
        range: ZRange {
            by: RangeBy::Rank(0, -1),
            reverse,
            limit: None,
        },
        with_scores: true,
    }
}

fn push(left: bool, values: &[&[u8]]) -> TypedOp {
    TypedOp::Push {
        left,
        values: bufs(values),
        if_exists: false,
    }
}

fn lrange_all() -> TypedOp {
    TypedOp::LRange { start: 0, stop: -1 }
}

/// The answer of HGETALL (map pairs) for these field/value pairs.
fn hash_answer(pairs: &[(&[u8], &[u8])]) -> Answer {
    Answer::Pairs {
        pairs: pairs
            .iter()
            .map(|(f, v)| (Answer::bulk(*f), Answer::bulk(*v)))
            .collect(),
        map: true,
    }
}

/// The answer of ZRANGE WITHSCORES for these members with scores.
fn zset_answer(pairs: &[(&[u8], f64)]) -> Answer {
    Answer::Pairs {
        pairs: pairs
            .iter()
            .map(|(m, s)| (Answer::bulk(*m), Answer::Double(*s)))
            .collect(),
        map: false,
    }
}

fn array(items: &[&[u8]]) -> Answer {
    Answer::Array(items.iter().map(|item| Answer::bulk(*item)).collect())
}

fn type_of(store: &mut Store, k: &Key) -> String {
    match answer(store, k, TypedOp::Type) {
        Answer::Status(name) => name,
        other => panic!("{other:?}"),
    }
}

fn delete(k: &Key) -> WorkerRequest {
    WorkerRequest::Delete {
        collection: COLLECTION,
        keys: vec![k.clone()],
    }
}

fn set_string(k: &Key, value: &[u8]) -> WorkerRequest {
    WorkerRequest::Set {
        collection: COLLECTION,
        key: k.clone(),
        value: value.to_vec(),
        condition: SetCondition::Always,
        reply: SetReply::Status,
        expiry: Expiry::Clear,
    }
}

fn expire(k: &Key, at_ms: u64) -> WorkerRequest {
    WorkerRequest::Expire {
        collection: COLLECTION,
        key: k.clone(),
        at_ms,
        condition: ExpireCondition::Always,
    }
}

fn expire_time(store: &mut Store, k: &Key) -> WorkerResponse {
    one(
        store,
        WorkerRequest::ExpireTime {
            collection: COLLECTION,
            key: k.clone(),
        },
    )
}

/// Everything a client could read of `k`: its type and expiry, and every typed read (a
/// read of another type answers `WrongType`, which must match too).
fn reads_of(store: &mut Store, k: &Key) -> Vec<WorkerResponse> {
    let mut requests: Vec<WorkerRequest> = [
        TypedOp::Type,
        TypedOp::Len(Kind::Hash),
        hgetall(),
        TypedOp::Members(Kind::Set),
        zrange_all(false),
        zrange_all(true),
        lrange_all(),
    ]
    .into_iter()
    .map(|op| typed_request(k, op))
    .collect();
    requests.push(WorkerRequest::ExpireTime {
        collection: COLLECTION,
        key: k.clone(),
    });
    requests.push(WorkerRequest::Get {
        collection: COLLECTION,
        key: k.clone(),
    });
    run(store, &requests)
}

fn log_of(store: &mut Store, partition: Partition) -> Vec<LogEntry> {
    match one(
        store,
        WorkerRequest::ReadLog {
            partition,
            from_commit_id: 0,
            count: 100_000,
        },
    ) {
        WorkerResponse::Log(entries) => entries,
        other => panic!("{other:?}"),
    }
}

/// Every record of `partition`, through `ExportPartition` chunks of `max_bytes`.
fn export_chunks(store: &mut Store, partition: Partition, max_bytes: u32) -> Vec<Vec<Record>> {
    let mut chunks = Vec::new();
    let mut from = None;
    loop {
        let reply = one(
            store,
            WorkerRequest::ExportPartition {
                partition,
                from,
                max_bytes,
            },
        );
        let WorkerResponse::Records { records, next } = reply else {
            panic!("{reply:?}")
        };
        chunks.push(records);
        match next {
            Some(next) => from = Some(next),
            None => return chunks,
        }
    }
}

fn records_of(store: &mut Store, partition: Partition) -> Vec<Record> {
    export_chunks(store, partition, u32::MAX).concat()
}

/// `partition ++ key_len ++ key`: the start of every element key of `k`, any version.
fn key_prefix(k: &Key) -> Vec<u8> {
    let mut prefix = k.partition.to_be_bytes().to_vec();
    prefix.extend_from_slice(&(k.bytes.len() as u16).to_be_bytes());
    prefix.extend_from_slice(&k.bytes);
    prefix
}

/// The stored element keys of `k` in `table`, of every version.
fn stored_elements(store: &Store, table: ElementTable, k: &Key) -> Vec<Vec<u8>> {
    let txn = store.env.read_txn().unwrap();
    let prefix = key_prefix(k);
    let mut found = Vec::new();
    for item in store.element_db(table).prefix_iter(&txn, &prefix).unwrap() {
        // The key's length is in the prefix: every match is an element of `k`.
        let (stored, _) = item.unwrap();
        found.push(stored.to_vec());
    }
    found
}

/// How many elements of `k` are stored, over all its tables and versions.
fn stored_element_count(store: &Store, k: &Key) -> usize {
    ElementTable::ALL
        .iter()
        .map(|&table| stored_elements(store, table, k).len())
        .sum()
}

/// The versions of `k` that have elements stored in `table`.
fn stored_versions(store: &Store, table: ElementTable, k: &Key) -> Vec<u64> {
    let at = key_prefix(k).len();
    let mut versions: Vec<u64> = stored_elements(store, table, k)
        .iter()
        .map(|stored| u64::from_be_bytes(stored[at..at + 8].try_into().unwrap()))
        .collect();
    versions.dedup();
    versions
}

/// Every element record of every table (all partitions).
fn all_element_records(store: &Store) -> Vec<(ElementTable, Vec<u8>, Vec<u8>)> {
    let txn = store.env.read_txn().unwrap();
    let mut out = Vec::new();
    for table in ElementTable::ALL {
        for item in store.element_db(table).iter(&txn).unwrap() {
            let (k, v) = item.unwrap();
            out.push((table, k.to_vec(), v.to_vec()));
        }
    }
    out
}

/// The `reclaim` entries, decoded.
fn reclaim_entries(store: &Store) -> Vec<(Kind, Vec<u8>)> {
    let txn = store.env.read_txn().unwrap();
    let mut out = Vec::new();
    for item in store.reclaim.iter(&txn).unwrap() {
        let (raw, _) = item.unwrap();
        out.push(typed::decode_reclaim_key(raw).unwrap());
    }
    out
}

/// Calls `reclaim_due(limit)` until it removes nothing; returns what each call removed.
fn reclaim_until_done(store: &mut Store, limit: usize) -> Vec<usize> {
    let mut removed = Vec::new();
    loop {
        let n = store.reclaim_due(limit).unwrap();
        assert!(
            n <= limit,
            "a call removes at most its limit: {n} > {limit}"
        );
        if n == 0 {
            return removed;
        }
        removed.push(n);
        assert!(removed.len() < 10_000, "reclaim makes no progress");
    }
}

fn field(i: usize) -> Vec<u8> {
    format!("field{i:04}").into_bytes()
}

/// HSET of `count` fields `field0000..` with values `value<i>`.
fn many_fields(count: usize) -> TypedOp {
    TypedOp::HSet {
        pairs: (0..count)
            .map(|i| (ByteBuf::from(field(i)), ByteBuf::from(format!("value{i}"))))
            .collect(),
        if_absent: false,
    }
}

// ---- 1. Replaying the log ----

/// The keys the replay scenario writes, by partition.
fn scenario_keys() -> Vec<Key> {
    [
        (1, &b"h1"[..]),
        (1, b"s1"),
        (1, b"z1"),
        (1, b"l1"),
        (1, b"gone"),
        (1, b"big"),
        (1, b"over"),
        (1, b"exp"),
        (1, b"soon"),
        (2, b"z2"),
        (2, b"h2"),
    ]
    .into_iter()
    .map(|(p, k)| key(p, k))
    .collect()
}

/// Writes every kind of typed change over the scenario's keys on `store`, advancing the
/// clock once to expire one key.
fn write_scenario(store: &mut Store, clock: &ManualClock) {
    let [h1, s1, z1, l1, gone, big, over, exp, soon, z2, h2] = &scenario_keys()[..] else {
        unreachable!()
    };
    write_all(
        store,
        h1,
        vec![
            hset(&[(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]),
            TypedOp::HDel {
                fields: bufs(&[b"b", b"missing"]),
            },
            TypedOp::HIncrBy {
                field: buf(b"a"),
                delta: 10,
            },
            TypedOp::HIncrBy {
                field: buf(b"n"),
                delta: 5,
            },
        ],
    );
    write_all(
        store,
        s1,
        vec![
            TypedOp::SAdd {
                members: bufs(&[b"w", b"x", b"y", b"z"]),
            },
            TypedOp::SRem {
                members: bufs(&[b"y"]),
            },
            TypedOp::SPop { count: None },
        ],
    );
    write_all(
        store,
        z1,
        vec![
            zadd(&[(1.0, b"a"), (2.0, b"b"), (3.0, b"c"), (4.0, b"d")]),
            // A score update moves the member in both tables.
            zadd(&[(5.0, b"a")]),
            TypedOp::ZAdd {
                flags: ZAddFlags {
                    incr: true,
                    ..ZAddFlags::default()
                },
                pairs: vec![(2.5, buf(b"b"))],
            },
            TypedOp::ZRem {
                members: bufs(&[b"c"]),
            },
            TypedOp::ZPop {
                max: false,
                count: 1,
            },
        ],
    );
    write_all(
        store,
        l1,
        vec![
            push(false, &[b"a", b"b", b"c", b"d", b"e"]),
            push(true, &[b"z"]),
            TypedOp::Pop {
                left: true,
                count: None,
            },
            TypedOp::LSet {
                index: 1,
                value: buf(b"B"),
            },
            TypedOp::LInsert {
                before: true,
                pivot: buf(b"c"),
                value: buf(b"x"),
            },
            push(false, &[b"d", b"f"]),
            TypedOp::LRem {
                count: -1,
                value: buf(b"d"),
            },
            TypedOp::LTrim { start: 1, stop: -2 },
        ],
    );
    write_all(store, gone, vec![hset(&[(b"f", b"v")])]);
    assert_eq!(one(store, delete(gone)), WorkerResponse::Integer(1));
    // More than reclaim-at-once: deleted, then a new version of the key.
    write_all(store, big, vec![many_fields(100)]);
    assert_eq!(one(store, delete(big)), WorkerResponse::Integer(1));
    write_all(store, big, vec![hset(&[(b"new", b"1")])]);
    write_all(store, over, vec![hset(&[(b"f", b"v"), (b"g", b"w")])]);
    assert_eq!(one(store, set_string(over, b"plain")), WorkerResponse::Ok);
    write_all(store, exp, vec![push(false, &[b"a", b"b"])]);
    assert_eq!(
        one(store, expire(exp, START_MS + HOUR_MS)),
        WorkerResponse::Integer(1)
    );
    write_all(
        store,
        soon,
        vec![TypedOp::SAdd {
            members: bufs(&[b"m"]),
        }],
    );
    assert_eq!(
        one(store, expire(soon, START_MS + 30)),
        WorkerResponse::Integer(1)
    );
    write_all(
        store,
        z2,
        vec![zadd(&[
            (1.0, b"b"),
            (1.0, b"a"),
            (-2.5, b"neg"),
            (f64::INFINITY, b"top"),
            (f64::NEG_INFINITY, b"bottom"),
            (0.0, b"zero"),
        ])],
    );
    write_all(store, h2, vec![hset(&[(b"only", b"one")])]);
    clock.advance(30);
    assert_eq!(store.expire_due(100).unwrap(), 1, "soon expires");
}

#[test]
fn a_replayed_log_rebuilds_every_typed_key_and_a_second_replay_changes_no_read() {
    let clock = ManualClock::new(START_MS);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = open_on(dir_a.path(), &clock);
    let mut b = open_on(dir_b.path(), &clock);
    write_scenario(&mut a, &clock);
    let keys = scenario_keys();
    let [h1, s1, z1, l1, gone, big, over, exp, soon, z2, h2] = &keys[..] else {
        unreachable!()
    };

    // What A answers, spelled out, so that A and B cannot agree on a wrong state.
    assert_eq!(
        answer(&mut a, h1, hgetall()),
        hash_answer(&[(b"a", b"11"), (b"c", b"3"), (b"n", b"5")])
    );
    let Answer::Array(members) = answer(&mut a, s1, TypedOp::Members(Kind::Set)) else {
        panic!()
    };
    assert_eq!(members.len(), 2, "SPOP took one of w, x, z");
    assert_eq!(
        answer(&mut a, z1, zrange_all(false)),
        zset_answer(&[(b"b", 4.5), (b"a", 5.0)])
    );
    // a b c d e, z pushed and popped, B set at 1, x before c, d f pushed, the last d
    // removed, then trimmed of its first and last.
    assert_eq!(
        answer(&mut a, l1, lrange_all()),
        array(&[b"B", b"x", b"c", b"d", b"e"])
    );
    assert_eq!(type_of(&mut a, gone), "none");
    assert_eq!(
        answer(&mut a, big, hgetall()),
        hash_answer(&[(b"new", b"1")])
    );
    assert_eq!(type_of(&mut a, over), "string");
    assert_eq!(type_of(&mut a, exp), "list");
    assert_eq!(
        expire_time(&mut a, exp),
        WorkerResponse::Integer((START_MS + HOUR_MS) as i64)
    );
    assert_eq!(type_of(&mut a, soon), "none");
    assert_eq!(
        answer(&mut a, z2, zrange_all(false)),
        zset_answer(&[
            (b"bottom", f64::NEG_INFINITY),
            (b"neg", -2.5),
            (b"zero", 0.0),
            (b"a", 1.0),
            (b"b", 1.0),
            (b"top", f64::INFINITY),
        ])
    );
    assert_eq!(type_of(&mut a, h2), "hash");

    // The log carries element changes of every table, and they decode.
    let mut entries = log_of(&mut a, 1);
    entries.extend(log_of(&mut a, 2));
    let tables: Vec<LogTable> = entries
        .iter()
        .map(|e| LogTable::split(e.collection).unwrap().0)
        .collect();
    for table in ElementTable::ALL {
        assert!(
            tables.contains(&LogTable::Element(table)),
            "no log entry of {table:?}"
        );
    }
    assert!(tables.contains(&LogTable::Typed));
    assert!(entries
        .iter()
        .any(|e| e.change == ChangeType::Delete && e.key == b"soon"));

    assert_eq!(
        one(
            &mut b,
            WorkerRequest::ApplyLog {
                entries: entries.clone()
            }
        ),
        WorkerResponse::Ok
    );
    let expected: Vec<Vec<WorkerResponse>> = keys.iter().map(|k| reads_of(&mut a, k)).collect();
    let replayed: Vec<Vec<WorkerResponse>> = keys.iter().map(|k| reads_of(&mut b, k)).collect();
    for ((k, expected), replayed) in keys.iter().zip(&expected).zip(&replayed) {
        assert_eq!(
            expected,
            replayed,
            "{:?}",
            String::from_utf8_lossy(&k.bytes)
        );
    }
    // Byte for byte: keys, elements, reclaim entries, log and meta entry.
    for partition in [1, 2] {
        assert_eq!(
            records_of(&mut b, partition),
            records_of(&mut a, partition),
            "partition {partition}"
        );
    }
    assert_eq!(
        reclaim_entries(&b),
        reclaim_entries(&a),
        "the old version of big waits for reclaim on both"
    );
    assert_eq!(reclaim_entries(&b).len(), 1);

    // A second replay of the same entries changes no read, and no record of partition 2
    // (partition 1's records are the subject of
    // `an_overlapping_replay_leaves_no_elements_of_replaced_versions`).
    let partition_2 = records_of(&mut b, 2);
    assert_eq!(
        one(&mut b, WorkerRequest::ApplyLog { entries }),
        WorkerResponse::Ok
    );
    let again: Vec<Vec<WorkerResponse>> = keys.iter().map(|k| reads_of(&mut b, k)).collect();
    assert_eq!(again, expected);
    assert_eq!(records_of(&mut b, 2), partition_2);

    // B writes on from A's commit ids, under the replayed versions.
    write_all(&mut b, h1, vec![hset(&[(b"z", b"26")])]);
    assert_eq!(
        answer(&mut b, h1, TypedOp::Len(Kind::Hash)),
        Answer::Integer(4)
    );
}

/// A handoff copies the partition, then replays the log from where the copy started; the
/// replay overlaps the copy. A hash written and then overwritten by SET (or deleted and
/// created again) after that start must not leave elements of its old version behind on
/// the target, where nothing would ever reclaim them.
#[test]
fn an_overlapping_replay_leaves_no_elements_of_replaced_versions() {
    let clock = ManualClock::new(START_MS);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut source = open_on(dir_a.path(), &clock);
    let mut target = open_on(dir_b.path(), &clock);
    let over = key(1, b"over");
    let again = key(1, b"again");
    write_all(&mut source, &over, vec![hset(&[(b"f", b"v")])]);
    assert_eq!(
        one(&mut source, set_string(&over, b"plain")),
        WorkerResponse::Ok
    );
    write_all(&mut source, &again, vec![hset(&[(b"old", b"1")])]);
    assert_eq!(one(&mut source, delete(&again)), WorkerResponse::Integer(1));
    write_all(&mut source, &again, vec![hset(&[(b"new", b"2")])]);
    // The copy is taken after all of it, the replay starts before all of it.
    let copy = records_of(&mut source, 1);
    assert_eq!(
        one(
            &mut target,
            WorkerRequest::ImportRecords {
                records: copy.clone()
            }
        ),
        WorkerResponse::Ok
    );
    assert_eq!(records_of(&mut target, 1), copy);
    let entries = log_of(&mut source, 1);
    assert_eq!(
        one(&mut target, WorkerRequest::ApplyLog { entries }),
        WorkerResponse::Ok
    );
    assert_eq!(type_of(&mut target, &over), "string");
    assert_eq!(
        answer(&mut target, &again, hgetall()),
        hash_answer(&[(b"new", b"2")])
    );
    assert_eq!(
        stored_element_count(&target, &over),
        0,
        "elements of the hash SET replaced"
    );
    assert_eq!(
        stored_versions(&target, ElementTable::Hash, &again).len(),
        1,
        "elements of the deleted version of again"
    );
    assert_eq!(
        records_of(&mut target, 1),
        copy,
        "the target equals the source"
    );
}

// ---- 2. Reclaim ----

#[test]
fn a_deleted_large_hash_is_invisible_at_once_and_reclaimed_in_the_background() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let big = key(1, b"big");
    let neighbour = key(1, b"neighbour");
    write_all(&mut store, &big, vec![many_fields(500)]);
    write_all(&mut store, &neighbour, vec![many_fields(3)]);
    assert_eq!(
        answer(&mut store, &big, TypedOp::Len(Kind::Hash)),
        Answer::Integer(500)
    );
    let old_versions = stored_versions(&store, ElementTable::Hash, &big);
    assert_eq!(old_versions.len(), 1);

    assert_eq!(one(&mut store, delete(&big)), WorkerResponse::Integer(1));
    // Still stored, but waiting for reclaim, and invisible.
    assert_eq!(stored_elements(&store, ElementTable::Hash, &big).len(), 500);
    assert_eq!(
        reclaim_entries(&store),
        vec![(
            Kind::Hash,
            typed::element_prefix(1, b"big", old_versions[0])
        )]
    );
    assert_eq!(type_of(&mut store, &big), "none");
    assert_eq!(
        answer(&mut store, &big, TypedOp::Len(Kind::Hash)),
        Answer::Integer(0)
    );

    // A new hash under the same key starts empty.
    assert_eq!(
        answer(&mut store, &big, hset(&[(b"field0001", b"fresh")])),
        Answer::Integer(1),
        "field0001 of the old version does not count as existing"
    );
    assert_eq!(
        answer(&mut store, &big, TypedOp::Len(Kind::Hash)),
        Answer::Integer(1)
    );
    assert_eq!(
        answer(&mut store, &big, hgetall()),
        hash_answer(&[(b"field0001", b"fresh")])
    );
    let versions = stored_versions(&store, ElementTable::Hash, &big);
    assert_eq!(versions.len(), 2);
    let new_version = *versions.iter().find(|v| **v != old_versions[0]).unwrap();

    // Reclaim works in steps of its limit, and is not logged.
    let log_before = log_of(&mut store, 1);
    let steps = reclaim_until_done(&mut store, 64);
    assert_eq!(steps.iter().sum::<usize>(), 500);
    assert!(steps.len() >= 500 / 64, "{steps:?}");
    assert_eq!(log_of(&mut store, 1), log_before);
    assert!(reclaim_entries(&store).is_empty());
    assert_eq!(
        stored_versions(&store, ElementTable::Hash, &big),
        vec![new_version],
        "no element of the old version is left"
    );
    assert_eq!(stored_elements(&store, ElementTable::Hash, &big).len(), 1);
    assert_eq!(
        answer(&mut store, &big, hgetall()),
        hash_answer(&[(b"field0001", b"fresh")])
    );
    assert_eq!(
        answer(&mut store, &neighbour, TypedOp::Len(Kind::Hash)),
        Answer::Integer(3),
        "reclaim touches only the deleted version"
    );
    assert_eq!(
        stored_elements(&store, ElementTable::Hash, &neighbour).len(),
        3
    );
}

#[test]
fn small_typed_keys_lose_their_elements_with_the_delete_and_larger_ones_wait() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let small = key(1, b"small");
    let larger = key(1, b"larger");
    write_all(&mut store, &small, vec![many_fields(64)]);
    write_all(&mut store, &larger, vec![many_fields(65)]);
    assert_eq!(
        run(&mut store, &[delete(&small), delete(&larger)]),
        vec![WorkerResponse::Integer(1), WorkerResponse::Integer(1)]
    );
    assert_eq!(
        stored_element_count(&store, &small),
        0,
        "64 fields go in the delete's transaction"
    );
    assert_eq!(stored_element_count(&store, &larger), 65);
    let entries = reclaim_entries(&store);
    assert_eq!(entries.len(), 1);
    assert_eq!(typed::element_user_key(&entries[0].1), Some(&b"larger"[..]));
    assert_eq!(reclaim_until_done(&mut store, 1000), vec![65]);
    assert_eq!(stored_element_count(&store, &larger), 0);
}

#[test]
fn a_large_sorted_set_and_list_are_reclaimed_from_every_table() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let zset = key(2, b"zset");
    let list = key(2, b"list");
    let members: Vec<Vec<u8>> = (0..200).map(field).collect();
    write_all(
        &mut store,
        &zset,
        vec![TypedOp::ZAdd {
            flags: ZAddFlags::default(),
            pairs: members
                .iter()
                .enumerate()
                .map(|(i, m)| (i as f64, buf(m)))
                .collect(),
        }],
    );
    write_all(
        &mut store,
        &list,
        vec![TypedOp::Push {
            left: false,
            values: members.iter().map(|m| buf(m)).collect(),
            if_exists: false,
        }],
    );
    assert_eq!(
        stored_elements(&store, ElementTable::Zset, &zset).len(),
        200
    );
    assert_eq!(
        stored_elements(&store, ElementTable::Zscore, &zset).len(),
        200
    );
    assert_eq!(
        stored_elements(&store, ElementTable::List, &list).len(),
        200
    );
    // The list is overwritten by a string, the sorted set deleted.
    assert_eq!(
        run(&mut store, &[delete(&zset), set_string(&list, b"text")]),
        vec![WorkerResponse::Integer(1), WorkerResponse::Ok]
    );
    assert_eq!(reclaim_entries(&store).len(), 2);
    let steps = reclaim_until_done(&mut store, 50);
    assert_eq!(steps.iter().sum::<usize>(), 600);
    assert!(reclaim_entries(&store).is_empty());
    assert_eq!(stored_element_count(&store, &zset), 0);
    assert_eq!(stored_element_count(&store, &list), 0);
    assert_eq!(
        one(
            &mut store,
            WorkerRequest::Get {
                collection: COLLECTION,
                key: list.clone()
            }
        ),
        WorkerResponse::Value(Some(b"text".to_vec()))
    );
}

#[test]
fn an_expired_large_hash_is_reclaimed_once_purged() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let big = key(3, b"big");
    write_all(&mut store, &big, vec![many_fields(100)]);
    assert_eq!(
        one(&mut store, expire(&big, START_MS + 10)),
        WorkerResponse::Integer(1)
    );
    clock.advance(10);
    assert_eq!(type_of(&mut store, &big), "none");
    // A new hash over the expired one, before active expiry purged it.
    assert_eq!(
        answer(&mut store, &big, hset(&[(b"field0000", b"new")])),
        Answer::Integer(1)
    );
    assert_eq!(
        expire_time(&mut store, &big),
        WorkerResponse::Integer(-1),
        "the new hash has no expiry"
    );
    assert_eq!(reclaim_entries(&store).len(), 1);
    assert_eq!(
        reclaim_until_done(&mut store, 30).iter().sum::<usize>(),
        100
    );
    assert_eq!(
        answer(&mut store, &big, hgetall()),
        hash_answer(&[(b"field0000", b"new")])
    );
    assert_eq!(stored_element_count(&store, &big), 1);
}

// ---- 3. Export and import ----

#[test]
fn an_exported_partition_carries_typed_keys_their_elements_and_reclaim_entries() {
    let clock = ManualClock::new(START_MS);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut source = open_on(dir_a.path(), &clock);
    let mut target = open_on(dir_b.path(), &clock);
    let hash = key(1, b"hash");
    let set = key(1, b"set");
    let zset = key(1, b"zset");
    let list = key(1, b"list");
    let dead = key(1, b"dead");
    let elsewhere = key(2, b"elsewhere");
    write_all(
        &mut source,
        &hash,
        vec![hset(&[(b"f1", b"v1"), (b"f2", b"v2")])],
    );
    write_all(
        &mut source,
        &set,
        vec![TypedOp::SAdd {
            members: bufs(&[b"m1", b"m2", b"m3"]),
        }],
    );
    write_all(
        &mut source,
        &zset,
        vec![zadd(&[(2.0, b"two"), (-1.0, b"minus"), (2.0, b"also")])],
    );
    write_all(
        &mut source,
        &list,
        vec![push(false, &[b"x", b"y"]), push(true, &[b"w"])],
    );
    assert_eq!(
        one(&mut source, expire(&list, START_MS + HOUR_MS)),
        WorkerResponse::Integer(1)
    );
    write_all(&mut source, &dead, vec![many_fields(70)]);
    assert_eq!(one(&mut source, delete(&dead)), WorkerResponse::Integer(1));
    write_all(&mut source, &elsewhere, vec![hset(&[(b"f", b"v")])]);

    // Copied in small chunks, each imported on its own.
    let chunks = export_chunks(&mut source, 1, 64);
    assert!(chunks.len() > 10, "{} chunks", chunks.len());
    for records in &chunks {
        assert_eq!(
            one(
                &mut target,
                WorkerRequest::ImportRecords {
                    records: records.clone()
                }
            ),
            WorkerResponse::Ok
        );
    }
    let copied = chunks.concat();
    for table in ElementTable::ALL {
        assert!(
            copied
                .iter()
                .any(|r| r.table == RecordTable::Elements(table)),
            "no record of {table:?}"
        );
    }
    assert!(copied.iter().any(|r| r.table == RecordTable::Reclaim));
    assert_eq!(records_of(&mut target, 1), records_of(&mut source, 1));
    assert!(
        records_of(&mut target, 2).is_empty(),
        "only partition 1 moved"
    );

    for k in [&hash, &set, &zset, &list, &dead] {
        assert_eq!(
            reads_of(&mut target, k),
            reads_of(&mut source, k),
            "{:?}",
            String::from_utf8_lossy(&k.bytes)
        );
    }
    assert_eq!(
        answer(&mut target, &hash, hgetall()),
        hash_answer(&[(b"f1", b"v1"), (b"f2", b"v2")])
    );
    assert_eq!(
        answer(&mut target, &zset, zrange_all(false)),
        zset_answer(&[(b"minus", -1.0), (b"also", 2.0), (b"two", 2.0)])
    );
    assert_eq!(
        answer(&mut target, &list, lrange_all()),
        array(&[b"w", b"x", b"y"])
    );
    assert_eq!(
        expire_time(&mut target, &list),
        WorkerResponse::Integer((START_MS + HOUR_MS) as i64)
    );

    // The imported keys take further writes, and the imported reclaim entry is worked off.
    write_all(&mut target, &list, vec![push(false, &[b"z"])]);
    assert_eq!(
        answer(&mut target, &list, lrange_all()),
        array(&[b"w", b"x", b"y", b"z"])
    );
    assert_eq!(
        answer(
            &mut target,
            &set,
            TypedOp::SRem {
                members: bufs(&[b"m2"])
            }
        ),
        Answer::Integer(1)
    );
    assert_eq!(reclaim_until_done(&mut target, 1000), vec![70]);
    assert_eq!(stored_element_count(&target, &dead), 0);

    // The source clears its copy: every element and reclaim entry of partition 1 goes.
    assert_eq!(
        one(&mut source, WorkerRequest::ClearPartition { partition: 1 }),
        WorkerResponse::Ok
    );
    assert!(records_of(&mut source, 1).is_empty());
    assert!(reclaim_entries(&source).is_empty());
    assert!(all_element_records(&source)
        .iter()
        .all(|(_, stored, _)| stored.starts_with(&2u16.to_be_bytes())));
    assert_eq!(
        answer(&mut source, &elsewhere, hgetall()),
        hash_answer(&[(b"f", b"v")])
    );
}

// ---- 4. RENAME and COPY on one worker ----

#[test]
fn take_then_put_taken_moves_a_sorted_set_whole() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let source = key(1, b"source");
    let destination = key(1, b"destination");
    let pairs: [(f64, &[u8]); 7] = [
        (1.0, b"b"),
        (1.0, b"a"),
        (-2.5, b"neg"),
        (f64::INFINITY, b"top"),
        (f64::NEG_INFINITY, b"bottom"),
        (0.0, b"zero"),
        (1e-300, b"tiny"),
    ];
    write_all(&mut store, &source, vec![zadd(&pairs)]);
    assert_eq!(
        one(&mut store, expire(&source, START_MS + HOUR_MS)),
        WorkerResponse::Integer(1)
    );
    // The destination holds a hash, which the rename replaces.
    write_all(
        &mut store,
        &destination,
        vec![hset(&[(b"f", b"v"), (b"g", b"w")])],
    );
    let before = answer(&mut store, &source, zrange_all(false));
    assert_eq!(
        before,
        zset_answer(&[
            (b"bottom", f64::NEG_INFINITY),
            (b"neg", -2.5),
            (b"zero", 0.0),
            (b"tiny", 1e-300),
            (b"a", 1.0),
            (b"b", 1.0),
            (b"top", f64::INFINITY),
        ])
    );

    let reply = one(
        &mut store,
        WorkerRequest::Atomic {
            ops: vec![
                TxOp {
                    collection: COLLECTION,
                    key: source.clone(),
                    action: TxAction::Take,
                },
                TxOp {
                    collection: COLLECTION,
                    key: destination.clone(),
                    action: TxAction::PutTaken { if_absent: false },
                },
            ],
        },
    );
    let WorkerResponse::TxOutcomes(outcomes) = reply else {
        panic!("{reply:?}")
    };
    let [TxOutcome::Collection {
        snapshot,
        expires_at_ms,
    }, TxOutcome::Done] = &outcomes[..]
    else {
        panic!("{outcomes:?}")
    };
    assert_eq!(*expires_at_ms, Some(START_MS + HOUR_MS));
    let (kind, elements) = typed::decode_snapshot(snapshot).unwrap();
    assert_eq!(kind, Kind::SortedSet);
    assert_eq!(elements.len(), pairs.len());

    assert_eq!(type_of(&mut store, &source), "none");
    assert_eq!(type_of(&mut store, &destination), "zset");
    assert_eq!(answer(&mut store, &destination, zrange_all(false)), before);
    let Answer::Pairs { mut pairs, .. } = before else {
        unreachable!()
    };
    pairs.reverse();
    assert_eq!(
        answer(&mut store, &destination, zrange_all(true)),
        Answer::Pairs { pairs, map: false }
    );
    assert_eq!(
        answer(
            &mut store,
            &destination,
            TypedOp::ZRank {
                member: buf(b"a"),
                reverse: false
            }
        ),
        Answer::Integer(4)
    );
    assert_eq!(
        answer(
            &mut store,
            &destination,
            TypedOp::ZScore {
                members: bufs(&[b"neg", b"top", b"missing"])
            }
        ),
        Answer::Array(vec![
            Answer::Double(-2.5),
            Answer::Double(f64::INFINITY),
            Answer::Nil
        ])
    );
    assert_eq!(
        expire_time(&mut store, &destination),
        WorkerResponse::Integer((START_MS + HOUR_MS) as i64)
    );
    // Only the destination's new version has elements: the source's and the replaced
    // hash's are gone.
    assert_eq!(stored_element_count(&store, &source), 0);
    assert!(stored_elements(&store, ElementTable::Hash, &destination).is_empty());
    assert_eq!(
        stored_versions(&store, ElementTable::Zset, &destination).len(),
        1
    );
    assert_eq!(
        stored_elements(&store, ElementTable::Zscore, &destination).len(),
        7
    );
    // The moved set takes writes with its count right.
    assert_eq!(
        answer(
            &mut store,
            &destination,
            zadd(&[(3.0, b"new"), (1.0, b"a")])
        ),
        Answer::Integer(1)
    );
    assert_eq!(
        answer(&mut store, &destination, TypedOp::Len(Kind::SortedSet)),
        Answer::Integer(8)
    );
}

#[test]
fn read_then_put_taken_copies_a_sorted_set_that_then_lives_on_its_own() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let source = key(1, b"source");
    let copy = key(2, b"copy");
    write_all(&mut store, &source, vec![zadd(&[(1.0, b"a"), (2.0, b"b")])]);
    let reply = one(
        &mut store,
        WorkerRequest::Atomic {
            ops: vec![
                TxOp {
                    collection: COLLECTION,
                    key: source.clone(),
                    action: TxAction::Read,
                },
                TxOp {
                    collection: COLLECTION,
                    key: copy.clone(),
                    action: TxAction::PutTaken { if_absent: true },
                },
            ],
        },
    );
    assert!(
        matches!(&reply, WorkerResponse::TxOutcomes(o) if matches!(o[..], [TxOutcome::Collection { .. }, TxOutcome::Done])),
        "{reply:?}"
    );
    let both = zset_answer(&[(b"a", 1.0), (b"b", 2.0)]);
    assert_eq!(answer(&mut store, &copy, zrange_all(false)), both);
    assert_eq!(
        answer(
            &mut store,
            &copy,
            TypedOp::ZRem {
                members: bufs(&[b"a"])
            }
        ),
        Answer::Integer(1)
    );
    assert_eq!(answer(&mut store, &source, zrange_all(false)), both);
    assert_eq!(
        answer(&mut store, &copy, zrange_all(false)),
        zset_answer(&[(b"b", 2.0)])
    );
    // COPY without REPLACE onto an existing key is refused, and changes nothing.
    let log_before = log_of(&mut store, 2);
    let refused = one(
        &mut store,
        WorkerRequest::Atomic {
            ops: vec![
                TxOp {
                    collection: COLLECTION,
                    key: source.clone(),
                    action: TxAction::Read,
                },
                TxOp {
                    collection: COLLECTION,
                    key: copy.clone(),
                    action: TxAction::PutTaken { if_absent: true },
                },
            ],
        },
    );
    assert_eq!(refused, WorkerResponse::Error(WorkerError::TxKeyExists));
    assert_eq!(log_of(&mut store, 2), log_before);
}

// ---- 5. WRONGTYPE ----

#[test]
fn string_commands_on_a_hash_answer_wrongtype_and_set_replaces_it() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let hash = key(1, b"hash");
    let text = key(1, b"text");
    write_all(&mut store, &hash, vec![hset(&[(b"f", b"1"), (b"g", b"2")])]);
    assert_eq!(
        one(&mut store, set_string(&text, b"hello")),
        WorkerResponse::Ok
    );
    let log_before = log_of(&mut store, 1);

    let wrong = WorkerResponse::Error(WorkerError::WrongType);
    let refused = run(
        &mut store,
        &[
            WorkerRequest::Get {
                collection: COLLECTION,
                key: hash.clone(),
            },
            WorkerRequest::Append {
                collection: COLLECTION,
                key: hash.clone(),
                value: b"x".to_vec(),
            },
            WorkerRequest::IncrBy {
                collection: COLLECTION,
                key: hash.clone(),
                delta: 1,
            },
            // And the other way round: a hash command on a string.
            typed_request(&text, hset(&[(b"f", b"v")])),
            typed_request(&text, TypedOp::Len(Kind::Hash)),
        ],
    );
    assert_eq!(refused, vec![wrong.clone(); 5]);
    assert_eq!(log_of(&mut store, 1), log_before, "nothing was written");
    assert_eq!(
        answer(&mut store, &hash, hgetall()),
        hash_answer(&[(b"f", b"1"), (b"g", b"2")])
    );

    // MGET reads a hash as missing.
    assert_eq!(
        one(
            &mut store,
            WorkerRequest::MGet {
                collection: COLLECTION,
                keys: vec![hash.clone(), text.clone(), key(1, b"missing")],
            }
        ),
        WorkerResponse::Values(vec![None, Some(buf(b"hello")), None])
    );

    // SET replaces the hash, whose elements go with it.
    assert_eq!(stored_element_count(&store, &hash), 2);
    assert_eq!(
        one(&mut store, set_string(&hash, b"now text")),
        WorkerResponse::Ok
    );
    assert_eq!(type_of(&mut store, &hash), "string");
    assert_eq!(stored_element_count(&store, &hash), 0);
    assert!(reclaim_entries(&store).is_empty());
    assert_eq!(
        one(
            &mut store,
            WorkerRequest::Get {
                collection: COLLECTION,
                key: hash.clone()
            }
        ),
        WorkerResponse::Value(Some(b"now text".to_vec()))
    );
    assert_eq!(
        one(&mut store, typed_request(&hash, hgetall())),
        wrong,
        "the key is a string now"
    );
    assert_eq!(
        one(
            &mut store,
            WorkerRequest::Append {
                collection: COLLECTION,
                key: hash.clone(),
                value: b"!".to_vec(),
            }
        ),
        WorkerResponse::Integer(9)
    );
}

// ---- 6. The element length limit ----

fn is_length_refusal(response: &WorkerResponse) -> bool {
    matches!(
        response,
        WorkerResponse::Error(WorkerError::Command(text))
            if text.starts_with("ERR ") && text.contains(&MAX_KEY_AND_ELEMENT_BYTES.to_string())
    )
}

#[test]
fn an_element_too_long_for_its_key_is_refused_and_nothing_is_written() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let k = key(1, b"k");
    let longest = vec![b'f'; MAX_KEY_AND_ELEMENT_BYTES - k.bytes.len()];
    let too_long = vec![b'f'; longest.len() + 1];

    for op in [
        hset(&[(&too_long, b"v")]),
        TypedOp::SAdd {
            members: vec![buf(&too_long)],
        },
        zadd(&[(1.0, &too_long)]),
    ] {
        let response = one(&mut store, typed_request(&k, op.clone()));
        assert!(is_length_refusal(&response), "{response:?}");
        assert_eq!(type_of(&mut store, &k), "none", "{op:?}");
        assert!(log_of(&mut store, 1).is_empty(), "{op:?}");
        assert!(all_element_records(&store).is_empty(), "{op:?}");
    }

    // At the limit exactly, the field is taken.
    assert_eq!(
        answer(&mut store, &k, hset(&[(&longest, b"v")])),
        Answer::Integer(1)
    );
    assert_eq!(
        answer(
            &mut store,
            &k,
            TypedOp::HGet {
                fields: vec![buf(&longest)]
            }
        ),
        Answer::Array(vec![Answer::bulk(&b"v"[..])])
    );
}

#[test]
fn a_refused_element_after_a_good_one_writes_nothing() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let k = key(1, b"k");
    let too_long = vec![b'f'; MAX_KEY_AND_ELEMENT_BYTES];
    write_all(&mut store, &k, vec![hset(&[(b"a", b"1")])]);
    let log_before = log_of(&mut store, 1);
    let elements_before = all_element_records(&store);

    let response = one(
        &mut store,
        typed_request(&k, hset(&[(b"b", b"2"), (&too_long, b"3")])),
    );
    assert!(is_length_refusal(&response), "{response:?}");
    assert_eq!(
        answer(&mut store, &k, hgetall()),
        hash_answer(&[(b"a", b"1")]),
        "b must not be written"
    );
    assert_eq!(
        answer(&mut store, &k, TypedOp::Len(Kind::Hash)),
        Answer::Integer(1)
    );
    assert_eq!(log_of(&mut store, 1), log_before);
    assert_eq!(all_element_records(&store), elements_before);

    // The same with a value over `max_value_bytes` after a good one.
    let too_large = vec![b'v'; options().max_value_bytes + 1];
    let response = one(
        &mut store,
        typed_request(&k, hset(&[(b"c", b"3"), (b"d", &too_large)])),
    );
    assert!(
        matches!(
            response,
            WorkerResponse::Error(WorkerError::ValueTooLarge { .. })
        ),
        "{response:?}"
    );
    assert_eq!(
        answer(&mut store, &k, hgetall()),
        hash_answer(&[(b"a", b"1")]),
        "c must not be written"
    );
    assert_eq!(log_of(&mut store, 1), log_before);
}

#[test]
fn a_sorted_set_member_too_long_for_the_score_table_writes_nothing() {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &clock);
    let k = key(1, b"k");
    // key ++ member fits; key ++ score (8 bytes) ++ member does not.
    let member = vec![b'm'; MAX_KEY_AND_ELEMENT_BYTES - k.bytes.len()];
    let response = one(&mut store, typed_request(&k, zadd(&[(1.0, &member)])));
    assert!(is_length_refusal(&response), "{response:?}");
    assert_eq!(type_of(&mut store, &k), "none");
    assert!(log_of(&mut store, 1).is_empty());
    assert!(
        all_element_records(&store).is_empty(),
        "{:?}",
        all_element_records(&store)
            .iter()
            .map(|(table, _, _)| table)
            .collect::<Vec<_>>()
    );
}
