//! Conformance tests of the store: each drives requests through `apply_batch`
//! against a real LMDB environment in a temp dir.
//!
//! Tests of expiry, log retention by age and transaction ages open the store on a
//! `ManualClock` and advance it; none of them waits on the wall clock.

use super::clock::ManualClock;
use super::*;
use shoal_shared::frame::{
    ChangeType, ExpireCondition, Expiry, Key, LogEntry, SetCondition, SetReply, TxAction, TxOp,
    TxOutcome,
};

/// Where the manual clocks of these tests start: a fixed time, so that every run sees the
/// same expiry times and timestamps.
const START_MS: u64 = 1_700_000_000_000;

/// Opens the store in `dir` on `clock`.
fn open_on(dir: &Path, clock: &ManualClock) -> Store {
    Store::open_with_clock(dir, &options(), clock.clone()).unwrap()
}

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

fn key(partition: Partition, bytes: &[u8]) -> Key {
    Key {
        partition,
        bytes: bytes.to_vec(),
    }
}

fn set(collection: Collection, key: Key, value: &[u8]) -> WorkerRequest {
    WorkerRequest::Set {
        collection,
        key,
        value: value.to_vec(),
        condition: SetCondition::Always,
        reply: SetReply::Status,
        expiry: Expiry::Clear,
    }
}

fn apply(store: &mut Store, requests: &[WorkerRequest]) -> Vec<WorkerResponse> {
    store
        .apply_batch(&requests.iter().collect::<Vec<_>>())
        .unwrap()
}

/// The commit ids of `partition`'s entries from `from` on, at most `count`, by `ReadLog`.
fn logged(store: &mut Store, partition: Partition, from: u64, count: u32) -> Vec<u64> {
    let read = WorkerRequest::ReadLog {
        partition,
        from_commit_id: from,
        count,
    };
    match &apply(store, &[read])[0] {
        WorkerResponse::Log(entries) => entries.iter().map(|e| e.commit_id).collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_log_reads_the_same_whether_entries_are_still_in_recent_or_moved_into_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let write = |store: &mut Store, partition: Partition, i: usize| {
        apply(
            store,
            &[set(0, key(partition, format!("k{i}").as_bytes()), b"v")],
        );
    };
    let move_recent = |store: &mut Store| store.move_recent().unwrap();
    // Partition 1: ids 1-3 moved into `log`, 4-5 in `recent`; partition 2: 1-2 and 3.
    for i in 0..3 {
        write(&mut store, 1, i);
    }
    for i in 0..2 {
        write(&mut store, 2, i);
    }
    assert_eq!(move_recent(&mut store), 5);
    for i in 3..5 {
        write(&mut store, 1, i);
    }
    write(&mut store, 2, 2);
    let mut index = shoal_shared::lmdb::RecentIndex::default();
    // What the net-daemon's reader reads: a range of ids, across both, through its index.
    let mut indexed = |store: &Store, partition: Partition, first: u64, last: u64| {
        let txn = store.env.read_txn().unwrap();
        let read = shoal_shared::lmdb::read_partition_log_indexed(
            &txn,
            *store.log,
            *store.recent,
            &mut index,
            partition,
            first,
            last,
        )
        .unwrap();
        read.iter().map(|e| e.commit_id).collect::<Vec<u64>>()
    };
    let check = |store: &mut Store| {
        assert_eq!(logged(store, 1, 0, 10), vec![1, 2, 3, 4, 5]);
        assert_eq!(logged(store, 1, 3, 10), vec![3, 4, 5]);
        assert_eq!(logged(store, 1, 5, 10), vec![5]);
        assert_eq!(logged(store, 1, 2, 2), vec![2, 3]);
        assert_eq!(logged(store, 1, 6, 10), Vec::<u64>::new());
        assert_eq!(logged(store, 2, 0, 10), vec![1, 2, 3]);
        let feed = WorkerRequest::ReadFeed {
            positions: vec![(1, 3), (2, 0)],
            count: 10,
        };
        let WorkerResponse::Log(entries) = &apply(store, &[feed])[0] else {
            panic!("no feed")
        };
        let positions: Vec<(Partition, u64)> =
            entries.iter().map(|e| (e.partition, e.commit_id)).collect();
        assert_eq!(positions, vec![(1, 4), (1, 5), (2, 1), (2, 2), (2, 3)]);
        // What the net-daemon's reader reads: a range of ids, across both.
        let txn = store.env.read_txn().unwrap();
        let read = shoal_shared::lmdb::read_partition_log(
            &txn,
            *store.log,
            Some(*store.recent),
            1,
            2,
            4,
            usize::MAX,
            usize::MAX,
        )
        .unwrap();
        let ids: Vec<u64> = read.iter().map(|e| e.commit_id).collect();
        assert_eq!(ids, vec![2, 3, 4]);
    };
    check(&mut store);
    assert_eq!(indexed(&store, 1, 2, 5), vec![2, 3, 4, 5]);
    assert_eq!(indexed(&store, 2, 3, 3), vec![3]);
    // The next move takes what is left; a restart moves whatever `recent` holds.
    assert_eq!(move_recent(&mut store), 3);
    check(&mut store);
    assert_eq!(indexed(&store, 1, 4, 5), vec![4, 5]);
    write(&mut store, 1, 5);
    assert_eq!(indexed(&store, 1, 5, 6), vec![5, 6]);
    drop(store);
    let mut store = Store::open(dir.path(), &options()).unwrap();
    assert_eq!(move_recent(&mut store), 0);
    assert_eq!(logged(&mut store, 1, 5, 10), vec![5, 6]);
    // After the restart `recent` is numbered anew: the index starts over.
    write(&mut store, 2, 3);
    write(&mut store, 1, 6);
    assert_eq!(indexed(&store, 2, 4, 4), vec![4]);
    assert_eq!(indexed(&store, 1, 6, 7), vec![6, 7]);
    write(&mut store, 1, 7);
    assert_eq!(indexed(&store, 1, 7, 8), vec![7, 8]);
    // A replayed entry that this copy has already is written over, never held twice.
    let entry = |commit_id: u64, data: &[u8]| LogEntry {
        partition: 3,
        commit_id,
        timestamp_ms: START_MS,
        change: ChangeType::Create,
        collection: 0,
        expires_at_ms: None,
        key: format!("r{commit_id}").into_bytes(),
        data: data.to_vec(),
    };
    let entries = vec![entry(1, b"a"), entry(2, b"b")];
    apply(&mut store, &[WorkerRequest::ApplyLog { entries }]);
    let entries = vec![entry(2, b"c")];
    apply(&mut store, &[WorkerRequest::ApplyLog { entries }]);
    let read = WorkerRequest::ReadLog {
        partition: 3,
        from_commit_id: 0,
        count: 10,
    };
    let WorkerResponse::Log(entries) = &apply(&mut store, &[read])[0] else {
        panic!("no log")
    };
    let data: Vec<(u64, &[u8])> = entries.iter().map(|e| (e.commit_id, &e.data[..])).collect();
    assert_eq!(data, vec![(1, &b"a"[..]), (2, &b"c"[..])]);
    // Clearing a partition clears its entries wherever they are.
    write(&mut store, 1, 6);
    store.clear_partition(1).unwrap();
    assert_eq!(logged(&mut store, 1, 0, 10), Vec::<u64>::new());
    assert_eq!(logged(&mut store, 2, 0, 10), vec![1, 2, 3, 4]);
}

#[test]
fn writes_are_logged_with_change_types_and_increasing_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    apply(&mut store, &[set(0, key(1, b"k"), b"a")]);
    apply(
        &mut store,
        &[
            set(0, key(1, b"k"), b"b"),
            WorkerRequest::Delete {
                collection: 0,
                keys: vec![key(1, b"k")],
            },
        ],
    );
    let log = apply(
        &mut store,
        &[WorkerRequest::ReadLog {
            partition: 1,
            from_commit_id: 0,
            count: 10,
        }],
    );
    let WorkerResponse::Log(entries) = &log[0] else {
        panic!("{log:?}")
    };
    let changes: Vec<_> = entries
        .iter()
        .map(|e| (e.commit_id, e.change as u8, e.data.clone()))
        .collect();
    assert_eq!(
        changes,
        vec![
            (1, 0b00, b"a".to_vec()),
            (2, 0b10, b"b".to_vec()),
            (3, 0b01, vec![])
        ]
    );
    // Raw bytes on disk carry the same codes, once moved from `recent` into `log`.
    store.move_recent().unwrap();
    let txn = store.env.read_txn().unwrap();
    let raw = store
        .log
        .get(&txn, &layout::log_key(1, 2))
        .unwrap()
        .unwrap();
    assert_eq!(raw[8], 0b10);
    let meta = store
        .meta
        .get(&txn, &layout::partition_meta_key(1))
        .unwrap()
        .unwrap();
    assert_eq!(
        layout::decode_partition_meta(meta).unwrap().last_commit_id,
        3
    );
}

#[test]
fn commit_ids_are_per_partition_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = Store::open(dir.path(), &options()).unwrap();
        apply(
            &mut store,
            &[
                set(0, key(0, b"x"), b"1"),
                set(1, key(2, b"y"), b"1"),
                set(0, key(0, b"z"), b"1"),
            ],
        );
        assert_eq!(store.highest_commit_id(), 2);
    }
    let mut store = Store::open(dir.path(), &options()).unwrap();
    assert_eq!(store.highest_commit_id(), 2);
    apply(&mut store, &[set(0, key(2, b"w"), b"1")]);
    let log = apply(
        &mut store,
        &[WorkerRequest::ReadLog {
            partition: 2,
            from_commit_id: 2,
            count: 10,
        }],
    );
    let WorkerResponse::Log(entries) = &log[0] else {
        panic!()
    };
    assert_eq!(
        entries.iter().map(|e| e.commit_id).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(entries[0].key, b"w");
}

/// The data file's pages.
fn pages(file: &[u8]) -> Vec<&[u8]> {
    file.chunks(4096).collect()
}

/// Writes 300 keys over three partitions in 30 commits, overwrites every 7th and
/// deletes every 11th in further commits, and moves `recent` into `log` in between.
/// Returns each key's value at the end.
fn write_history(store: &mut Store, round: u8) -> Vec<(Key, Option<Vec<u8>>)> {
    let mut expected = Vec::new();
    for chunk in 0..30u32 {
        let requests: Vec<WorkerRequest> = (0..10u32)
            .map(|i| {
                let k = key((i % 3) as u16, format!("k{}", chunk * 10 + i).as_bytes());
                let value = vec![round; 100 + i as usize];
                expected.push((k.clone(), Some(value.clone())));
                set(0, k, &value)
            })
            .collect();
        apply(store, &requests);
        if chunk == 15 {
            store.move_recent().unwrap();
        }
    }
    for (i, (k, value)) in expected.iter_mut().enumerate() {
        if i % 11 == 0 {
            apply(
                store,
                &[WorkerRequest::Delete {
                    collection: 0,
                    keys: vec![k.clone()],
                }],
            );
            *value = None;
        } else if i % 7 == 0 {
            let new = format!("over-{round}-{i}").into_bytes();
            assert_eq!(
                apply(store, &[set(0, k.clone(), &new)]),
                vec![WorkerResponse::Ok]
            );
            *value = Some(new);
        }
    }
    expected
}

fn assert_holds(store: &mut Store, expected: &[(Key, Option<Vec<u8>>)]) {
    for (k, value) in expected {
        assert_eq!(
            get(store, 0, k.clone()),
            WorkerResponse::Value(value.clone()),
            "key {:?}",
            k.bytes
        );
    }
}

#[test]
fn after_a_power_failure_the_shard_is_rewound_to_its_checkpoint_and_the_journal_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("data.mdb");
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    let first = write_history(&mut store, 1);
    store.checkpoint().unwrap();
    let checkpoint_txnid = store.env.info().last_txn_id;
    // What the disk holds at the checkpoint: every page LMDB wrote until then.
    let on_disk = std::fs::read(&data_file).unwrap();
    let second = write_history(&mut store, 2);
    assert_holds(&mut store, &second);
    let last_txnid = store.env.info().last_txn_id;
    assert!(last_txnid > checkpoint_txnid + 30);
    let highest = store.highest_commit_id();
    let log = log_of(&mut store, 1);
    drop(store);
    // The power fails: of what LMDB wrote since the checkpoint, the disk kept both meta
    // pages (the newest commit's among them) and every other page but one in three.
    // Without a rewind LMDB would open at the newest commit with some of its pages
    // missing.
    let written = std::fs::read(&data_file).unwrap();
    let mut torn = Vec::new();
    for (n, page) in pages(&written).into_iter().enumerate() {
        let kept = n < 2 || n % 3 != 0;
        match pages(&on_disk).get(n) {
            Some(old) if !kept => torn.extend_from_slice(old),
            _ => torn.extend_from_slice(page),
        }
    }
    assert_ne!(
        torn, written,
        "some page written after the checkpoint is lost"
    );
    std::fs::write(&data_file, &torn).unwrap();

    clock.reboot();
    let mut store = open_on(dir.path(), &clock);
    assert_holds(&mut store, &second);
    assert!(first.len() == second.len());
    assert_eq!(store.highest_commit_id(), highest);
    assert_eq!(log_of(&mut store, 1), log, "the commit log is replayed too");
    // It goes on as before: writes, and another failure.
    let third = write_history(&mut store, 3);
    drop(store);
    clock.reboot();
    let mut store = open_on(dir.path(), &clock);
    assert_holds(&mut store, &third);
}

/// A store whose last commit (two SETs) was journaled but never made by LMDB: the data
/// file is put back as it was before it. Returns the store's directory.
fn journaled_but_not_committed(clock: &ManualClock) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("data.mdb");
    let mut store = open_on(dir.path(), clock);
    apply(&mut store, &[set(0, key(1, b"before"), b"1")]);
    store.checkpoint().unwrap();
    let before = std::fs::read(&data_file).unwrap();
    apply(
        &mut store,
        &[
            set(0, key(1, b"after"), b"2"),
            set(1, key(2, b"other"), b"3"),
        ],
    );
    drop(store);
    std::fs::write(&data_file, &before).unwrap();
    dir
}

#[test]
fn a_commit_journaled_but_not_made_by_lmdb_is_cut_off_when_the_process_restarts() {
    // The process died after the journal's append and before LMDB's commit, and the
    // machine did not restart: the write was never acknowledged, and a read while the
    // worker was down saw the shard without it. It stays unmade.
    let clock = ManualClock::new(START_MS);
    let dir = journaled_but_not_committed(&clock);
    let mut store = open_on(dir.path(), &clock);
    // The partition's log: the commit ids of the writes made.
    let absent = |store: &mut Store, log: Vec<u64>| {
        assert_eq!(get(store, 0, key(1, b"after")), WorkerResponse::Value(None));
        assert_eq!(get(store, 1, key(2, b"other")), WorkerResponse::Value(None));
        assert_eq!(logged(store, 1, 0, 10), log);
    };
    absent(&mut store, vec![1]);
    // Writes go on, and a power failure later replays them but not the cut-off one.
    apply(&mut store, &[set(0, key(1, b"later"), b"4")]);
    drop(store);
    clock.reboot();
    let mut store = open_on(dir.path(), &clock);
    absent(&mut store, vec![1, 2]);
    assert_eq!(
        get(&mut store, 0, key(1, b"later")),
        WorkerResponse::Value(Some(b"4".to_vec()))
    );
}

#[test]
fn a_commit_journaled_but_not_made_by_lmdb_is_replayed_after_a_power_failure() {
    // After a power failure the journal's records after the checkpoint are replayed:
    // LMDB may have made the commit and lost it with the page cache.
    let clock = ManualClock::new(START_MS);
    let dir = journaled_but_not_committed(&clock);
    clock.reboot();
    let mut store = open_on(dir.path(), &clock);
    assert_eq!(
        get(&mut store, 0, key(1, b"after")),
        WorkerResponse::Value(Some(b"2".to_vec()))
    );
    assert_eq!(
        get(&mut store, 1, key(2, b"other")),
        WorkerResponse::Value(Some(b"3".to_vec()))
    );
    assert_eq!(logged(&mut store, 1, 0, 10), vec![1, 2]);
}

#[test]
fn reopening_with_another_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), &options()).unwrap());
    let other = StoreOptions {
        partitions: 8,
        ..options()
    };
    assert!(matches!(
        Store::open(dir.path(), &other),
        Err(StoreError::Mismatch(_))
    ));
}

#[test]
fn a_full_map_grows_and_the_batch_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let before = store.map_size();
    let value = vec![7u8; 64 * 1024];
    let requests: Vec<_> = (0..64u32)
        .map(|i| set(0, key(0, &i.to_be_bytes()), &value))
        .collect();
    let responses = apply(&mut store, &requests);
    assert!(responses.iter().all(|r| *r == WorkerResponse::Ok));
    assert!(store.map_size() > before);
    let sizes = apply(&mut store, &[WorkerRequest::DbSize { collection: 0 }]);
    assert_eq!(sizes, vec![WorkerResponse::Integer(64)]);
    let log = apply(
        &mut store,
        &[WorkerRequest::ReadLog {
            partition: 0,
            from_commit_id: 0,
            count: 1000,
        }],
    );
    let WorkerResponse::Log(entries) = &log[0] else {
        panic!()
    };
    assert_eq!(entries.len(), 64, "a replayed batch logs each write once");
}

#[test]
fn string_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let k = || key(3, b"n");
    let responses = apply(
        &mut store,
        &[
            WorkerRequest::IncrBy {
                collection: 0,
                key: k(),
                delta: 5,
            },
            WorkerRequest::IncrBy {
                collection: 0,
                key: k(),
                delta: i64::MAX,
            },
            WorkerRequest::IncrByFloat {
                collection: 0,
                key: k(),
                increment: b"0.5".to_vec(),
            },
            WorkerRequest::Append {
                collection: 0,
                key: k(),
                value: b"x".to_vec(),
            },
            WorkerRequest::IncrBy {
                collection: 0,
                key: k(),
                delta: 1,
            },
            WorkerRequest::StrLen {
                collection: 0,
                key: k(),
            },
            WorkerRequest::Set {
                collection: 0,
                key: k(),
                value: b"v".to_vec(),
                condition: SetCondition::IfAbsent,
                reply: SetReply::WrittenFlag,
                expiry: Expiry::Clear,
            },
            WorkerRequest::GetDel {
                collection: 0,
                key: k(),
            },
            WorkerRequest::Exists {
                collection: 0,
                keys: vec![k(), k()],
            },
        ],
    );
    assert_eq!(
        responses,
        vec![
            WorkerResponse::Integer(5),
            WorkerResponse::Error(WorkerError::Overflow),
            WorkerResponse::Value(Some(b"5.5".to_vec())),
            WorkerResponse::Integer(4),
            WorkerResponse::Error(WorkerError::NotInteger),
            WorkerResponse::Integer(4),
            WorkerResponse::Integer(0),
            WorkerResponse::Value(Some(b"5.5x".to_vec())),
            WorkerResponse::Integer(0),
        ]
    );
}

#[test]
fn reads_alone_commit_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let before = store.env.info().last_txn_id;
    apply(
        &mut store,
        &[WorkerRequest::Get {
            collection: 0,
            key: key(0, b"a"),
        }],
    );
    apply(
        &mut store,
        &[WorkerRequest::Delete {
            collection: 0,
            keys: vec![key(0, b"a")],
        }],
    );
    assert_eq!(store.env.info().last_txn_id, before);
}

fn log_of(store: &mut Store, partition: Partition) -> Vec<LogEntry> {
    match &apply(
        store,
        &[WorkerRequest::ReadLog {
            partition,
            from_commit_id: 0,
            count: 10_000,
        }],
    )[0]
    {
        WorkerResponse::Log(entries) => entries.clone(),
        other => panic!("{other:?}"),
    }
}

fn get(store: &mut Store, collection: Collection, k: Key) -> WorkerResponse {
    apply(store, &[WorkerRequest::Get { collection, key: k }]).remove(0)
}

#[test]
fn expired_keys_are_hidden_then_purged_and_logged_as_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    let soon = START_MS + 50;
    let later = START_MS + 3_600_000;
    apply(
        &mut store,
        &[
            WorkerRequest::Set {
                collection: 0,
                key: key(2, b"soon"),
                value: b"v".to_vec(),
                condition: SetCondition::Always,
                reply: SetReply::Status,
                expiry: Expiry::At(soon),
            },
            WorkerRequest::Set {
                collection: 0,
                key: key(2, b"late"),
                value: b"v".to_vec(),
                condition: SetCondition::Always,
                reply: SetReply::Status,
                expiry: Expiry::At(later),
            },
        ],
    );
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::ExpireTime {
                collection: 0,
                key: key(2, b"late")
            }]
        ),
        vec![WorkerResponse::Integer(later as i64)]
    );
    clock.advance(49);
    assert_eq!(
        get(&mut store, 0, key(2, b"soon")),
        WorkerResponse::Value(Some(b"v".to_vec())),
        "a key lives until its expiry time"
    );
    assert_eq!(store.expire_due(100).unwrap(), 0);
    clock.advance(1);
    assert_eq!(
        get(&mut store, 0, key(2, b"soon")),
        WorkerResponse::Value(None),
        "an expired key is never returned"
    );
    assert_eq!(store.expire_due(100).unwrap(), 1);
    assert_eq!(store.expire_due(100).unwrap(), 0);
    let entries = log_of(&mut store, 2);
    let changes: Vec<_> = entries.iter().map(|e| (e.key.clone(), e.change)).collect();
    assert_eq!(
        changes,
        vec![
            (b"soon".to_vec(), ChangeType::Create),
            (b"late".to_vec(), ChangeType::Create),
            (b"soon".to_vec(), ChangeType::Delete),
        ]
    );
    assert_eq!(entries[1].expires_at_ms, Some(later));
    let timestamps: Vec<_> = entries.iter().map(|e| e.timestamp_ms).collect();
    assert_eq!(
        timestamps,
        vec![START_MS, START_MS, soon],
        "entries carry the store's clock"
    );
    assert_eq!(
        apply(&mut store, &[WorkerRequest::DbSize { collection: 0 }]),
        vec![WorkerResponse::Integer(1)]
    );
    // PERSIST removes the expiry; EXPIRE with NX then applies, GT only to a later time.
    let responses = apply(
        &mut store,
        &[
            WorkerRequest::Persist {
                collection: 0,
                key: key(2, b"late"),
            },
            WorkerRequest::ExpireTime {
                collection: 0,
                key: key(2, b"late"),
            },
            WorkerRequest::Expire {
                collection: 0,
                key: key(2, b"late"),
                at_ms: later,
                condition: ExpireCondition::IfNone,
            },
            WorkerRequest::Expire {
                collection: 0,
                key: key(2, b"late"),
                at_ms: later - 1,
                condition: ExpireCondition::IfGreater,
            },
            WorkerRequest::ExpireTime {
                collection: 0,
                key: key(2, b"gone"),
            },
        ],
    );
    assert_eq!(
        responses,
        vec![
            WorkerResponse::Integer(1),
            WorkerResponse::Integer(-1),
            WorkerResponse::Integer(1),
            WorkerResponse::Integer(0),
            WorkerResponse::Integer(-2),
        ]
    );
}

#[test]
fn a_write_over_an_expired_key_logs_its_deletion_first() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    apply(
        &mut store,
        &[WorkerRequest::Set {
            collection: 0,
            key: key(1, b"k"),
            value: b"old".to_vec(),
            condition: SetCondition::Always,
            reply: SetReply::Status,
            expiry: Expiry::At(START_MS + 20),
        }],
    );
    clock.advance(20);
    apply(&mut store, &[set(0, key(1, b"k"), b"new")]);
    let changes: Vec<_> = log_of(&mut store, 1).iter().map(|e| e.change).collect();
    assert_eq!(
        changes,
        vec![ChangeType::Create, ChangeType::Delete, ChangeType::Create]
    );
    assert_eq!(
        store.expire_due(100).unwrap(),
        0,
        "the index entry went with the old value"
    );
}

fn put_op(collection: Collection, k: Key, value: &[u8], if_absent: bool) -> TxOp {
    TxOp {
        collection,
        key: k,
        action: TxAction::Put {
            value: value.to_vec(),
            expires_at_ms: None,
            if_absent,
        },
    }
}

#[test]
fn atomic_writes_check_everything_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    apply(&mut store, &[set(0, key(0, b"b"), b"1")]);
    let refused = apply(
        &mut store,
        &[WorkerRequest::Atomic {
            ops: vec![
                put_op(0, key(0, b"a"), b"x", true),
                put_op(0, key(0, b"b"), b"x", true),
            ],
        }],
    );
    assert_eq!(
        refused,
        vec![WorkerResponse::Error(WorkerError::TxKeyExists)]
    );
    assert_eq!(
        get(&mut store, 0, key(0, b"a")),
        WorkerResponse::Value(None),
        "a refused MSETNX writes nothing"
    );
    // RENAME inside one worker: take the source, put it under the destination.
    let renamed = apply(
        &mut store,
        &[WorkerRequest::Atomic {
            ops: vec![
                TxOp {
                    collection: 0,
                    key: key(0, b"b"),
                    action: TxAction::Take,
                },
                TxOp {
                    collection: 1,
                    key: key(3, b"c"),
                    action: TxAction::PutTaken { if_absent: false },
                },
            ],
        }],
    );
    assert!(
        matches!(&renamed[0], WorkerResponse::TxOutcomes(o) if o.len() == 2),
        "{renamed:?}"
    );
    assert_eq!(
        get(&mut store, 0, key(0, b"b")),
        WorkerResponse::Value(None)
    );
    assert_eq!(
        get(&mut store, 1, key(3, b"c")),
        WorkerResponse::Value(Some(b"1".to_vec()))
    );
}

#[test]
fn prepared_transactions_lock_keys_survive_reopen_and_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    {
        let mut store = open_on(dir.path(), &clock);
        let prepared = apply(
            &mut store,
            &[WorkerRequest::Prepare {
                txid: 7,
                decider: 0,
                ops: vec![put_op(0, key(1, b"x"), b"7", false)],
            }],
        );
        assert_eq!(
            prepared,
            vec![WorkerResponse::TxOutcomes(vec![TxOutcome::Done])]
        );
        assert_eq!(store.locks().holder(0, &key(1, b"x")), Some(7));
        let conflict = apply(
            &mut store,
            &[WorkerRequest::Prepare {
                txid: 8,
                decider: 0,
                ops: vec![put_op(0, key(1, b"x"), b"8", false)],
            }],
        );
        assert_eq!(
            conflict,
            vec![WorkerResponse::Error(WorkerError::TxConflict)]
        );
        assert_eq!(
            get(&mut store, 0, key(1, b"x")),
            WorkerResponse::Value(None),
            "prepare writes no data"
        );
    }
    // A crash: the intent and its lock come back.
    let mut store = open_on(dir.path(), &clock);
    assert_eq!(store.locks().holder(0, &key(1, b"x")), Some(7));
    assert_eq!(
        apply(&mut store, &[WorkerRequest::InDoubt { older_than_ms: 0 }]),
        vec![WorkerResponse::InDoubt(vec![(7, 0)])]
    );
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::Decide {
                txid: 7,
                older_than_ms: 60_000
            }]
        ),
        vec![WorkerResponse::Error(WorkerError::TxInProgress)]
    );
    // The decider commits: data applied, a commit record kept until forgotten.
    assert_eq!(
        apply(&mut store, &[WorkerRequest::Commit { txid: 7 }]),
        vec![WorkerResponse::Ok]
    );
    assert!(store.locks().is_empty());
    assert_eq!(
        get(&mut store, 0, key(1, b"x")),
        WorkerResponse::Value(Some(b"7".to_vec()))
    );
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::Decide {
                txid: 7,
                older_than_ms: 0
            }]
        ),
        vec![WorkerResponse::Integer(1)]
    );
    assert_eq!(
        apply(&mut store, &[WorkerRequest::Abort { txid: 7 }]),
        vec![WorkerResponse::Error(WorkerError::TxCommitted)]
    );
    apply(&mut store, &[WorkerRequest::Forget { txid: 7 }]);
    assert_eq!(
        apply(&mut store, &[WorkerRequest::Transactions]),
        vec![WorkerResponse::Integer(0)]
    );
    // Presumed abort: an old undecided transaction is aborted by Decide; unknown ones read as aborted.
    apply(
        &mut store,
        &[WorkerRequest::Prepare {
            txid: 9,
            decider: 0,
            ops: vec![put_op(0, key(1, b"y"), b"9", false)],
        }],
    );
    let decide_after_a_minute = WorkerRequest::Decide {
        txid: 9,
        older_than_ms: 60_000,
    };
    clock.advance(59_999);
    assert_eq!(
        apply(&mut store, std::slice::from_ref(&decide_after_a_minute)),
        vec![WorkerResponse::Error(WorkerError::TxInProgress)]
    );
    clock.advance(1);
    assert_eq!(
        apply(&mut store, &[decide_after_a_minute]),
        vec![WorkerResponse::Integer(0)]
    );
    assert!(store.locks().is_empty());
    assert_eq!(
        apply(&mut store, &[WorkerRequest::Commit { txid: 9 }]),
        vec![WorkerResponse::Error(WorkerError::TxAborted)]
    );
    assert_eq!(
        get(&mut store, 0, key(1, b"y")),
        WorkerResponse::Value(None)
    );
}

fn versions(store: &mut Store, keys: &[Key]) -> Vec<u64> {
    let request = WorkerRequest::Versions {
        collection: 0,
        keys: keys.to_vec(),
        wait: false,
    };
    match apply(store, &[request]).remove(0) {
        WorkerResponse::Positions(found) => found.into_iter().map(|(_, v)| v).collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn versions_follow_every_change_and_show_locks_without_waiting() {
    use shoal_shared::frame::versions::{LOCKED, MISSING};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    let (a, b) = (key(1, b"a"), key(1, b"b"));
    apply(&mut store, &[set(0, a.clone(), b"1")]);
    let first = versions(&mut store, &[a.clone(), b.clone()]);
    assert_eq!(
        first[0],
        last_commit_id(&mut store, 1),
        "a live key: its commit id"
    );
    assert_eq!(
        first[1],
        MISSING | first[0],
        "a missing key: its partition's commit id"
    );
    // b created and deleted again: a missing key's version still moved.
    apply(&mut store, &[set(0, b.clone(), b"x")]);
    apply(
        &mut store,
        &[WorkerRequest::Delete {
            collection: 0,
            keys: vec![b.clone()],
        }],
    );
    let second = versions(&mut store, &[a.clone(), b.clone()]);
    assert_eq!(second[0], first[0], "a is unchanged");
    assert_ne!(second[1], first[1]);
    assert_eq!(second[1] & MISSING, MISSING);
    // A key past its expiry is missing.
    apply(
        &mut store,
        &[set_expiring(0, b.clone(), b"y", START_MS + 10)],
    );
    let live = versions(&mut store, std::slice::from_ref(&b))[0];
    assert_eq!(live & MISSING, 0);
    clock.advance(10);
    assert_eq!(
        versions(&mut store, std::slice::from_ref(&b))[0] & MISSING,
        MISSING
    );
    // A prepared transaction's keys are locked; the answer comes at once.
    apply(
        &mut store,
        &[WorkerRequest::Prepare {
            txid: 3,
            decider: 0,
            ops: vec![put_op(0, a.clone(), b"2", false)],
        }],
    );
    assert_eq!(versions(&mut store, &[a.clone(), b.clone()])[0], LOCKED);
    assert_ne!(versions(&mut store, std::slice::from_ref(&b))[0], LOCKED);
    apply(&mut store, &[WorkerRequest::Commit { txid: 3 }]);
    let after = versions(&mut store, std::slice::from_ref(&a))[0];
    assert!(
        after != LOCKED && after > first[0],
        "the commit gave a a new version"
    );
}

#[test]
fn scans_resume_after_the_last_stored_key_and_flush_logs_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let requests: Vec<_> = (0..50u32)
        .map(|i| set(0, key((i % 4) as u16, format!("k{i}").as_bytes()), b"v"))
        .collect();
    apply(&mut store, &requests);
    let mut seen = std::collections::BTreeSet::new();
    let mut after = None;
    loop {
        let response = apply(
            &mut store,
            &[WorkerRequest::Scan {
                collection: 0,
                after: after.clone(),
                count: 7,
                pattern: None,
                partition: None,
                of_type: None,
            }],
        )
        .remove(0);
        let WorkerResponse::Scanned { keys, next } = response else {
            panic!()
        };
        seen.extend(keys.into_iter().map(|k| k.into_vec()));
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 50);
    let matched = apply(
        &mut store,
        &[WorkerRequest::Keys {
            collection: 0,
            pattern: Some(b"k1*".to_vec()),
        }],
    )
    .remove(0);
    let WorkerResponse::Scanned { keys, next: None } = matched else {
        panic!()
    };
    assert_eq!(keys.len(), 11, "k1 and k10..k19");
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::Flush {
                collection: Some(0),
                partition: None
            }]
        ),
        vec![WorkerResponse::Integer(50)]
    );
    assert_eq!(
        apply(&mut store, &[WorkerRequest::DbSize { collection: 0 }]),
        vec![WorkerResponse::Integer(0)]
    );
    let deletes = log_of(&mut store, 0)
        .iter()
        .filter(|e| e.change == ChangeType::Delete)
        .count();
    assert_eq!(
        deletes, 13,
        "every flushed key of partition 0 is logged as a delete"
    );
}

#[test]
fn a_flush_of_many_chunks_empties_every_collection_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let keys = 25_000;
    let requests: Vec<_> = (0..keys)
        .map(|i| set(i % 2, key(i % 4, format!("k{i}").as_bytes()), b"v"))
        .collect();
    apply(&mut store, &requests);
    let commits_before = store.env.info().last_txn_id;
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::Flush {
                collection: None,
                partition: None
            }]
        ),
        vec![WorkerResponse::Integer(keys as i64)]
    );
    assert_eq!(store.env.info().last_txn_id, commits_before + 1);
    for collection in 0..2 {
        assert_eq!(
            apply(&mut store, &[WorkerRequest::DbSize { collection }]),
            vec![WorkerResponse::Integer(0)]
        );
    }
    // Each partition logged its creates, then one delete per key.
    let per_partition = u64::from(keys / 4);
    for partition in 0..4 {
        let after_creates = apply(
            &mut store,
            &[WorkerRequest::ReadLog {
                partition,
                from_commit_id: per_partition + 1,
                count: 10_000,
            }],
        )
        .remove(0);
        let WorkerResponse::Log(entries) = after_creates else {
            panic!("{after_creates:?}")
        };
        assert_eq!(entries.len() as u64, per_partition);
        assert!(entries.iter().all(|e| e.change == ChangeType::Delete));
    }
}

#[test]
fn the_feed_reads_after_positions_and_refuses_trimmed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let requests: Vec<_> = (0..10u32)
        .map(|i| set(0, key(1, format!("k{i}").as_bytes()), b"v"))
        .collect();
    apply(&mut store, &requests);
    let feed = apply(
        &mut store,
        &[WorkerRequest::ReadFeed {
            positions: vec![(1, 4), (2, 0)],
            count: 100,
        }],
    )
    .remove(0);
    let WorkerResponse::Log(entries) = feed else {
        panic!()
    };
    assert_eq!(
        entries.iter().map(|e| e.commit_id).collect::<Vec<_>>(),
        (5..=10).collect::<Vec<_>>()
    );
    assert_eq!(store.trim_log(3, None, 1000).unwrap(), 7);
    assert_eq!(log_of(&mut store, 1).len(), 3);
    let refused = apply(
        &mut store,
        &[WorkerRequest::ReadFeed {
            positions: vec![(1, 4)],
            count: 100,
        }],
    );
    assert_eq!(
        refused,
        vec![WorkerResponse::Error(WorkerError::LogTrimmed {
            partition: 1,
            trimmed_through: 7
        })]
    );
    assert_eq!(
        apply(&mut store, &[WorkerRequest::LastCommitIds]),
        vec![WorkerResponse::Positions(vec![(1, 10)])]
    );
}

#[test]
fn log_entries_older_than_the_retention_age_are_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    apply(
        &mut store,
        &[set(0, key(1, b"a"), b"v"), set(0, key(1, b"b"), b"v")],
    );
    clock.advance(1_000);
    apply(&mut store, &[set(0, key(1, b"c"), b"v")]);
    // Entries exactly as old as the limit are kept.
    assert_eq!(store.trim_log(u64::MAX, Some(1_000), 1000).unwrap(), 0);
    clock.advance(1);
    assert_eq!(store.trim_log(u64::MAX, Some(1_000), 1000).unwrap(), 2);
    let kept: Vec<_> = log_of(&mut store, 1)
        .iter()
        .map(|e| (e.commit_id, e.timestamp_ms))
        .collect();
    assert_eq!(kept, vec![(3, START_MS + 1_000)]);
    clock.advance(1_000);
    assert_eq!(
        store.trim_log(u64::MAX, Some(1_000), 1000).unwrap(),
        1,
        "a partition's log may be trimmed empty"
    );
    assert_eq!(last_commit_id(&mut store, 1), 3);
}

#[test]
fn the_id_high_water_mark_only_rises() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    apply(
        &mut store,
        &[
            WorkerRequest::ReserveIds { high_water: 1000 },
            WorkerRequest::ReserveIds { high_water: 10 },
        ],
    );
    drop(store);
    let mut store = Store::open(dir.path(), &options()).unwrap();
    assert_eq!(
        apply(&mut store, &[WorkerRequest::IdHighWater]),
        vec![WorkerResponse::Integer(1000)]
    );
}

#[test]
fn a_map_at_its_limit_refuses_writes_and_keeps_reads() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        max_map_size_bytes: 2 << 20,
        ..options()
    };
    let mut store = Store::open(dir.path(), &options).unwrap();
    apply(&mut store, &[set(0, key(0, b"first"), b"kept")]);
    let value = vec![1u8; 100 * 1024];
    let mut refused = None;
    for i in 0..64u32 {
        let response = apply(&mut store, &[set(0, key(0, &i.to_be_bytes()), &value)]).remove(0);
        if response != WorkerResponse::Ok {
            refused = Some(response);
            break;
        }
    }
    assert_eq!(
        refused,
        Some(WorkerResponse::Error(WorkerError::MapFull {
            max_map_size_bytes: 2 << 20
        }))
    );
    let mixed = apply(
        &mut store,
        &[
            WorkerRequest::Get {
                collection: 0,
                key: key(0, b"first"),
            },
            set(0, key(0, b"more"), &value),
        ],
    );
    assert_eq!(
        mixed[0],
        WorkerResponse::Value(Some(b"kept".to_vec())),
        "reads go on"
    );
    assert!(matches!(
        mixed[1],
        WorkerResponse::Error(WorkerError::MapFull { .. })
    ));
    drop(store);
    // The worker still opens at the limit, though the log's newest entries cannot be
    // moved, and its log reads whole.
    let mut store = Store::open(dir.path(), &options).unwrap();
    let before = logged(&mut store, 0, 0, 100);
    assert!(before.len() >= 2, "{before:?}");
    assert!(before.windows(2).all(|w| w[1] == w[0] + 1), "{before:?}");
    drop(store);
    // A raised limit lets writes through again.
    let mut store = Store::open(
        dir.path(),
        &StoreOptions {
            max_map_size_bytes: 64 << 20,
            ..options
        },
    )
    .unwrap();
    assert_eq!(
        apply(&mut store, &[set(0, key(0, b"more"), &value)]),
        vec![WorkerResponse::Ok]
    );
}

#[test]
fn a_shard_of_the_previous_format_is_upgraded_and_a_later_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let set_version = |store: &mut Store, version: u32| {
        let env = store.env.clone();
        let mut txn = WriteTxn::new(env.write_txn().unwrap());
        store
            .meta
            .put(
                &mut txn,
                layout::META_FORMAT_VERSION,
                &version.to_be_bytes(),
            )
            .unwrap();
        store.journal.commit(txn, true).unwrap();
    };
    let version = |store: &Store| {
        let txn = store.env.read_txn().unwrap();
        let raw = store.meta.get(&txn, layout::META_FORMAT_VERSION).unwrap();
        layout::decode_u32(raw.unwrap(), "format version").unwrap()
    };
    let mut store = Store::open(dir.path(), &options()).unwrap();
    apply(&mut store, &[set(0, key(1, b"k"), b"v")]);
    set_version(&mut store, layout::OLDEST_FORMAT_VERSION);
    drop(store);
    let mut store = Store::open(dir.path(), &options()).unwrap();
    assert_eq!(version(&store), layout::FORMAT_VERSION);
    assert_eq!(logged(&mut store, 1, 0, 10), vec![1]);
    set_version(&mut store, layout::FORMAT_VERSION + 1);
    drop(store);
    let refused = Store::open(dir.path(), &options()).err().expect("refused");
    assert!(refused.to_string().contains("format version"), "{refused}");
}

#[test]
fn backup_copies_report_the_commit_ids_of_the_copied_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("live"), &options()).unwrap();
    for round in 0..20u8 {
        apply(
            &mut store,
            &[set(0, key(u16::from(round % 4), &[round]), &[round; 100])],
        );
    }
    let source = store.backup_source();
    let copier = std::thread::spawn({
        let target = dir.path().join("copies");
        move || {
            std::fs::create_dir(&target).unwrap();
            (0..5)
                .map(|i| {
                    (
                        target.join(format!("c{i}")),
                        source.copy_to(&target.join(format!("c{i}"))).unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        }
    });
    // Writes go on while the copies run; big values make the map grow meanwhile.
    for round in 0..200u32 {
        let partition = (round % 4) as u16;
        apply(
            &mut store,
            &[set(
                0,
                key(partition, &round.to_be_bytes()),
                &vec![7u8; 20_000],
            )],
        );
    }
    for (copy_dir, report) in copier.join().unwrap() {
        assert_eq!((report.shard, report.partitions, report.workers), (0, 4, 1));
        assert_eq!(report.format_version, layout::FORMAT_VERSION);
        let file = copy_dir.join(shoal_shared::backup::SHARD_FILE);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), report.bytes);
        assert_eq!(report.sha256.len(), 64);
        assert_eq!(
            report.positions.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        // The copy opens as a store, and its log ends exactly at the reported commit ids.
        let mut copy = Store::open(&copy_dir, &options()).unwrap();
        for (partition, last) in report.positions {
            assert!(
                last >= 5,
                "partition {partition} had 5 commits before the copy began"
            );
            let log = apply(
                &mut copy,
                &[WorkerRequest::ReadLog {
                    partition,
                    from_commit_id: 0,
                    count: 10_000,
                }],
            );
            let WorkerResponse::Log(entries) = &log[0] else {
                panic!("{log:?}")
            };
            assert_eq!(entries.last().map(|e| e.commit_id), Some(last));
        }
    }
    assert!(store.map_size() > 1 << 20, "the map grew while copies ran");
}

#[test]
fn backup_refuses_an_existing_target() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("live"), &options()).unwrap();
    std::fs::create_dir(dir.path().join("taken")).unwrap();
    assert!(store
        .backup_source()
        .copy_to(&dir.path().join("taken"))
        .is_err());
}

#[test]
fn the_longest_key_can_have_an_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let longest = key(1, &[b'k'; shoal_shared::limits::MAX_KEY_BYTES]);
    let request = WorkerRequest::Set {
        collection: 0,
        key: longest.clone(),
        value: b"v".to_vec(),
        condition: SetCondition::Always,
        reply: SetReply::Status,
        expiry: Expiry::At(u64::MAX / 2),
    };
    let outcome = store.apply_batch(&[&request]);
    assert!(outcome.is_ok(), "{:?}", outcome.err());
}

// ---- Handoff: export, import, log replay, fences, clearing ----

use shoal_shared::frame::{Record, RecordTable};

/// Every record of `partition`, read through `ExportPartition` chunks of `max_bytes`.
fn export_all(store: &mut Store, partition: Partition, max_bytes: u32) -> Vec<Vec<Record>> {
    let mut chunks = Vec::new();
    let mut from = None;
    loop {
        let reply = apply(
            store,
            &[WorkerRequest::ExportPartition {
                partition,
                from,
                max_bytes,
            }],
        )
        .remove(0);
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
    export_all(store, partition, u32::MAX).concat()
}

fn set_expiring(collection: Collection, k: Key, value: &[u8], at_ms: u64) -> WorkerRequest {
    WorkerRequest::Set {
        collection,
        key: k,
        value: value.to_vec(),
        condition: SetCondition::Always,
        reply: SetReply::Status,
        expiry: Expiry::At(at_ms),
    }
}

fn last_commit_id(store: &mut Store, partition: Partition) -> u64 {
    match apply(store, &[WorkerRequest::LastCommitIds]).remove(0) {
        WorkerResponse::Positions(positions) => positions
            .into_iter()
            .find(|(p, _)| *p == partition)
            .map_or(0, |(_, id)| id),
        other => panic!("{other:?}"),
    }
}

fn fence(store: &mut Store, partition: Partition, fenced: bool) -> WorkerResponse {
    apply(store, &[WorkerRequest::SetFence { partition, fenced }]).remove(0)
}

fn fences(store: &mut Store) -> WorkerResponse {
    apply(store, &[WorkerRequest::Fences]).remove(0)
}

#[test]
fn a_partition_copied_then_caught_up_from_the_log_equals_the_source() {
    let source_dir = tempfile::tempdir().unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    // Both hosts read the same time.
    let clock = ManualClock::new(START_MS);
    let mut source = open_on(source_dir.path(), &clock);
    let mut target = open_on(target_dir.path(), &clock);
    let hour = START_MS + 3_600_000;
    apply(
        &mut source,
        &[
            set(0, key(1, b"a"), b"1"),
            set_expiring(0, key(1, b"b"), b"2", hour),
            set(0, key(1, b"c"), b"3"),
            set_expiring(1, key(1, b"d"), b"4", hour + 1),
            set_expiring(0, key(1, b"soon"), b"5", START_MS + 30),
            set(0, key(2, b"elsewhere"), b"6"),
        ],
    );
    // The handoff starts here: the log is replayed from this position.
    let start = last_commit_id(&mut source, 1);
    assert_eq!(fence(&mut target, 1, true), WorkerResponse::Ok);

    // The copy goes one record per chunk, with writes on the source in between.
    let mut from = None;
    let mut chunks = 0;
    loop {
        let reply = apply(
            &mut source,
            &[WorkerRequest::ExportPartition {
                partition: 1,
                from: from.clone(),
                max_bytes: 1,
            }],
        )
        .remove(0);
        let WorkerResponse::Records { records, next } = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(records.len(), 1, "a chunk always makes progress");
        assert_eq!(
            apply(&mut target, &[WorkerRequest::ImportRecords { records }]),
            vec![WorkerResponse::Ok]
        );
        chunks += 1;
        if chunks == 2 {
            // "a" is copied already, "b" and "c" not yet.
            apply(
                &mut source,
                &[
                    set(0, key(1, b"a"), b"1 again"),
                    WorkerRequest::Delete {
                        collection: 0,
                        keys: vec![key(1, b"c")],
                    },
                    WorkerRequest::Expire {
                        collection: 0,
                        key: key(1, b"b"),
                        at_ms: hour + 5,
                        condition: ExpireCondition::Always,
                    },
                    WorkerRequest::Persist {
                        collection: 1,
                        key: key(1, b"d"),
                    },
                    set_expiring(0, key(1, b"e"), b"new", hour + 7),
                ],
            );
        }
        match next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    // Writes after the copy, and a purge of an expired key (logged as a delete).
    clock.advance(30);
    assert_eq!(source.expire_due(100).unwrap(), 1);
    apply(
        &mut source,
        &[
            WorkerRequest::IncrBy {
                collection: 0,
                key: key(1, b"counter"),
                delta: 5,
            },
            set_expiring(0, key(1, b"e"), b"newer", hour + 9),
            WorkerRequest::Delete {
                collection: 0,
                keys: vec![key(1, b"a")],
            },
        ],
    );

    // The catch-up: every entry after the start, overlapping what the copy already had.
    let feed = apply(
        &mut source,
        &[WorkerRequest::ReadFeed {
            positions: vec![(1, start)],
            count: 1000,
        }],
    )
    .remove(0);
    let WorkerResponse::Log(entries) = feed else {
        panic!("{feed:?}")
    };
    assert!(entries.len() >= 9, "{entries:?}");
    assert!(entries
        .iter()
        .all(|e| e.partition == 1 && e.commit_id > start));
    assert_eq!(
        apply(
            &mut target,
            &[WorkerRequest::ApplyLog {
                entries: entries.clone()
            }]
        ),
        vec![WorkerResponse::Ok]
    );

    // Data, expiry index, log and meta entry: byte for byte the source's.
    let copied = records_of(&mut target, 1);
    assert_eq!(copied, records_of(&mut source, 1));
    assert!(copied
        .iter()
        .any(|r| r.table == RecordTable::Expiry && r.key.ends_with(b"e")));
    assert_eq!(
        last_commit_id(&mut target, 1),
        last_commit_id(&mut source, 1)
    );
    assert!(target.highest_commit_id() >= last_commit_id(&mut source, 1));
    assert!(
        records_of(&mut target, 2).is_empty(),
        "only partition 1 moved"
    );

    // A second replay of the same entries changes nothing.
    apply(&mut target, &[WorkerRequest::ApplyLog { entries }]);
    assert_eq!(records_of(&mut target, 1), copied);

    // Once the fence is lifted the target writes on from the source's last commit id.
    let last = last_commit_id(&mut source, 1);
    assert_eq!(fence(&mut target, 1, false), WorkerResponse::Ok);
    assert_eq!(
        get(&mut target, 0, key(1, b"a")),
        WorkerResponse::Value(None)
    );
    assert_eq!(
        get(&mut target, 0, key(1, b"e")),
        WorkerResponse::Value(Some(b"newer".to_vec()))
    );
    assert_eq!(
        apply(
            &mut target,
            &[WorkerRequest::ExpireTime {
                collection: 0,
                key: key(1, b"b")
            }]
        ),
        vec![WorkerResponse::Integer((hour + 5) as i64)]
    );
    apply(&mut target, &[set(0, key(1, b"f"), b"mine")]);
    assert_eq!(last_commit_id(&mut target, 1), last + 1);
}

#[test]
fn replayed_log_entries_keep_their_ids_and_bad_ones_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &ManualClock::new(START_MS));
    let entry = |commit_id: u64, change: ChangeType, data: &[u8], expires_at_ms| LogEntry {
        partition: 3,
        commit_id,
        timestamp_ms: 1_000 + commit_id,
        change,
        collection: 0,
        expires_at_ms,
        key: b"k".to_vec(),
        data: data.to_vec(),
    };
    let later = START_MS + 3_600_000;
    let entries = vec![
        entry(40, ChangeType::Create, b"v1", Some(later)),
        entry(41, ChangeType::Update, b"v2", None),
    ];
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::ApplyLog {
                entries: entries.clone()
            }]
        ),
        vec![WorkerResponse::Ok]
    );
    assert_eq!(log_of(&mut store, 3), entries);
    assert_eq!(
        get(&mut store, 0, key(3, b"k")),
        WorkerResponse::Value(Some(b"v2".to_vec()))
    );
    assert!(
        !records_of(&mut store, 3)
            .iter()
            .any(|r| r.table == RecordTable::Expiry),
        "the expiry of the first entry is gone with the second"
    );
    assert_eq!(store.highest_commit_id(), 41);
    let txn = store.env.read_txn().unwrap();
    let raw = store
        .meta
        .get(&txn, &layout::partition_meta_key(3))
        .unwrap()
        .unwrap();
    let meta = layout::decode_partition_meta(raw).unwrap();
    assert_eq!((meta.last_commit_id, meta.mtime_ms), (41, 1_041));
    drop(txn);

    // An older entry does not overwrite a newer value.
    apply(
        &mut store,
        &[WorkerRequest::ApplyLog {
            entries: vec![entry(40, ChangeType::Create, b"v1", Some(later))],
        }],
    );
    assert_eq!(
        get(&mut store, 0, key(3, b"k")),
        WorkerResponse::Value(Some(b"v2".to_vec()))
    );
    assert_eq!(last_commit_id(&mut store, 3), 41);

    // A request with one bad entry is refused whole.
    let before = records_of(&mut store, 3);
    let mut wrong_collection = entry(42, ChangeType::Delete, b"", None);
    wrong_collection.collection = 9;
    let too_long = LogEntry {
        key: vec![b'x'; shoal_shared::limits::MAX_STORED_KEY_BYTES + 1],
        ..entry(43, ChangeType::Create, b"v", None)
    };
    for bad in [wrong_collection, too_long] {
        let reply = apply(
            &mut store,
            &[WorkerRequest::ApplyLog {
                entries: vec![entry(42, ChangeType::Delete, b"", None), bad],
            }],
        );
        assert!(
            matches!(reply[..], [WorkerResponse::Error(WorkerError::Storage(_))]),
            "{reply:?}"
        );
        assert_eq!(records_of(&mut store, 3), before);
    }
    // Imports that would touch the shard's own entries of `meta` are refused too.
    let reply = apply(
        &mut store,
        &[WorkerRequest::ImportRecords {
            records: vec![Record {
                table: RecordTable::Meta,
                key: layout::META_SHARD_ID.to_vec(),
                value: 5u32.to_be_bytes().to_vec(),
            }],
        }],
    );
    assert!(
        matches!(reply[..], [WorkerResponse::Error(WorkerError::Storage(_))]),
        "{reply:?}"
    );
    drop(store);
    assert!(
        Store::open(dir.path(), &options()).is_ok(),
        "the shard id is intact"
    );
}

/// One client write of each kind, all on `k`.
fn client_writes(k: &Key) -> Vec<WorkerRequest> {
    let (collection, key) = (0, k.clone());
    vec![
        set(0, k.clone(), b"new"),
        WorkerRequest::GetDel {
            collection,
            key: key.clone(),
        },
        WorkerRequest::GetEx {
            collection,
            key: key.clone(),
            expiry: Expiry::Clear,
        },
        WorkerRequest::Delete {
            collection,
            keys: vec![key.clone()],
        },
        WorkerRequest::IncrBy {
            collection,
            key: key.clone(),
            delta: 1,
        },
        WorkerRequest::IncrByFloat {
            collection,
            key: key.clone(),
            increment: b"1.5".to_vec(),
        },
        WorkerRequest::Append {
            collection,
            key: key.clone(),
            value: b"x".to_vec(),
        },
        WorkerRequest::SetRange {
            collection,
            key: key.clone(),
            offset: 0,
            value: b"y".to_vec(),
        },
        WorkerRequest::Expire {
            collection,
            key: key.clone(),
            at_ms: START_MS + 60_000,
            condition: ExpireCondition::Always,
        },
        WorkerRequest::Persist {
            collection,
            key: key.clone(),
        },
        WorkerRequest::Atomic {
            ops: vec![put_op(0, key.clone(), b"tx", false)],
        },
        WorkerRequest::Prepare {
            txid: 99,
            decider: 0,
            ops: vec![put_op(0, key, b"tx", false)],
        },
    ]
}

#[test]
fn a_fenced_partition_refuses_client_requests() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    let soon = START_MS + 30;
    apply(
        &mut store,
        &[
            set(0, key(1, b"k"), b"10"),
            set(0, key(2, b"other"), b"20"),
            set(1, key(1, b"in c1"), b"30"),
            set_expiring(0, key(1, b"due"), b"x", soon),
            set_expiring(0, key(2, b"due"), b"x", soon),
        ],
    );
    assert_eq!(fences(&mut store), WorkerResponse::Partitions(vec![]));
    assert_eq!(fence(&mut store, 1, true), WorkerResponse::Ok);
    assert_eq!(
        fence(&mut store, 1, true),
        WorkerResponse::Ok,
        "fencing twice is harmless"
    );
    assert_eq!(fences(&mut store), WorkerResponse::Partitions(vec![1]));
    let records = records_of(&mut store, 1);
    let commit_id = last_commit_id(&mut store, 1);
    for write in client_writes(&key(1, b"k")) {
        assert_eq!(
            apply(&mut store, std::slice::from_ref(&write)),
            vec![WorkerResponse::Error(WorkerError::PartitionMoved {
                partition: 1
            })],
            "{write:?}"
        );
    }
    // A write touching a fenced partition among others is refused whole.
    let mixed = WorkerRequest::Delete {
        collection: 0,
        keys: vec![key(2, b"other"), key(1, b"k")],
    };
    assert_eq!(
        apply(&mut store, &[mixed]),
        vec![WorkerResponse::Error(WorkerError::PartitionMoved {
            partition: 1
        })]
    );
    assert_eq!(
        records_of(&mut store, 1),
        records,
        "nothing changed: data, log, meta"
    );
    assert_eq!(last_commit_id(&mut store, 1), commit_id);
    assert!(
        store.locks().is_empty(),
        "the refused prepare locks nothing"
    );
    // Reads are refused too (this host may no longer hold the latest data); other
    // partitions take writes.
    let moved = WorkerResponse::Error(WorkerError::PartitionMoved { partition: 1 });
    assert_eq!(get(&mut store, 0, key(1, b"k")), moved);
    assert_eq!(
        apply(
            &mut store,
            &[
                WorkerRequest::Exists {
                    collection: 0,
                    keys: vec![key(1, b"k")]
                },
                set(0, key(2, b"other"), b"21"),
            ]
        ),
        vec![moved.clone(), WorkerResponse::Ok]
    );

    // Background expiry leaves the fenced partition alone.
    clock.advance(30);
    assert_eq!(store.expire_due(100).unwrap(), 1);
    assert_eq!(records_of(&mut store, 1), records);
    assert_eq!(
        get(&mut store, 0, key(2, b"due")),
        WorkerResponse::Value(None)
    );

    // The fence is durable.
    drop(store);
    let mut store = open_on(dir.path(), &clock);
    assert_eq!(fences(&mut store), WorkerResponse::Partitions(vec![1]));
    assert_eq!(
        apply(&mut store, &[set(0, key(1, b"k"), b"11")]),
        vec![WorkerResponse::Error(WorkerError::PartitionMoved {
            partition: 1
        })]
    );

    // Lifted, it takes writes again; fenced in a batch, the batch's later writes are refused.
    assert_eq!(
        apply(
            &mut store,
            &[
                WorkerRequest::SetFence {
                    partition: 1,
                    fenced: false
                },
                set(0, key(1, b"k"), b"12"),
                WorkerRequest::SetFence {
                    partition: 2,
                    fenced: true
                },
                set(0, key(2, b"other"), b"22"),
                WorkerRequest::Fences,
            ]
        ),
        vec![
            WorkerResponse::Ok,
            WorkerResponse::Ok,
            WorkerResponse::Ok,
            WorkerResponse::Error(WorkerError::PartitionMoved { partition: 2 }),
            WorkerResponse::Partitions(vec![2]),
        ]
    );
    assert_eq!(
        get(&mut store, 0, key(1, b"k")),
        WorkerResponse::Value(Some(b"12".to_vec()))
    );
    assert_eq!(store.fences().iter().copied().collect::<Vec<_>>(), vec![2]);
}

#[test]
fn whole_collection_requests_skip_fenced_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let mut writes = Vec::new();
    for partition in 0..4 {
        for k in [b"a", b"b", b"c"] {
            writes.push(set(0, key(partition, k), b"v"));
        }
    }
    apply(&mut store, &writes);
    apply(
        &mut store,
        &[
            WorkerRequest::SetFence {
                partition: 1,
                fenced: true,
            },
            WorkerRequest::SetFence {
                partition: 3,
                fenced: true,
            },
        ],
    );
    assert_eq!(
        apply(&mut store, &[WorkerRequest::DbSize { collection: 0 }]),
        vec![WorkerResponse::Integer(6)]
    );
    let keys = apply(
        &mut store,
        &[WorkerRequest::Keys {
            collection: 0,
            pattern: None,
        }],
    );
    let WorkerResponse::Scanned { keys, next: None } = &keys[0] else {
        panic!("{keys:?}")
    };
    assert_eq!(keys.len(), 6);
    // A scan two keys at a time meets partitions 0 and 2 only, each key once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let reply = apply(
            &mut store,
            &[WorkerRequest::Scan {
                collection: 0,
                after: after.clone(),
                count: 2,
                pattern: None,
                partition: None,
                of_type: None,
            }],
        )
        .remove(0);
        let WorkerResponse::Scanned { keys, next } = reply else {
            panic!("{reply:?}")
        };
        seen.extend(keys);
        match next {
            Some(next) => {
                assert!(next[..2] == [0, 0] || next[..2] == [0, 2], "{next:?}");
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 6);
    // FLUSH deletes the other partitions' keys, and only theirs.
    let fenced = [records_of(&mut store, 1), records_of(&mut store, 3)];
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::Flush {
                collection: None,
                partition: None
            }]
        ),
        vec![WorkerResponse::Integer(6)]
    );
    assert_eq!(
        [records_of(&mut store, 1), records_of(&mut store, 3)],
        fenced
    );
    assert_eq!(
        get(&mut store, 0, key(0, b"a")),
        WorkerResponse::Value(None)
    );
    assert_eq!(
        get(&mut store, 0, key(3, b"c")),
        WorkerResponse::Error(WorkerError::PartitionMoved { partition: 3 })
    );
    // Once lifted, the keys count again.
    fence(&mut store, 3, false);
    assert_eq!(
        get(&mut store, 0, key(3, b"c")),
        WorkerResponse::Value(Some(b"v".to_vec()))
    );
    assert_eq!(
        apply(&mut store, &[WorkerRequest::DbSize { collection: 0 }]),
        vec![WorkerResponse::Integer(3)]
    );
}

#[test]
fn prepared_transactions_hold_off_fences_and_clearing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    let prepared = apply(
        &mut store,
        &[WorkerRequest::Prepare {
            txid: 7,
            decider: shoal_shared::frame::DECIDER_PARTITION | 3,
            ops: vec![put_op(0, key(3, b"x"), b"7", false)],
        }],
    );
    assert_eq!(
        prepared,
        vec![WorkerResponse::TxOutcomes(vec![TxOutcome::Done])]
    );
    assert_eq!(
        fence(&mut store, 3, true),
        WorkerResponse::Error(WorkerError::Locked)
    );
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::ClearPartition { partition: 3 }]
        ),
        vec![WorkerResponse::Error(WorkerError::Locked)]
    );
    assert_eq!(fences(&mut store), WorkerResponse::Partitions(vec![]));
    // A lock taken earlier in the same batch counts too.
    assert_eq!(
        apply(
            &mut store,
            &[
                WorkerRequest::Prepare {
                    txid: 8,
                    decider: 0,
                    ops: vec![put_op(0, key(2, b"y"), b"8", false)]
                },
                WorkerRequest::SetFence {
                    partition: 2,
                    fenced: true
                },
                WorkerRequest::SetFence {
                    partition: 1,
                    fenced: true
                },
            ]
        )[1..],
        [
            WorkerResponse::Error(WorkerError::Locked),
            WorkerResponse::Ok
        ]
    );
    // The commit itself is never refused. This store is the decider (it holds the ops of
    // partition 3, which the intent names): its first commit records the decision, the
    // second applies the ops, and the commit record holds the fence off until it is
    // forgotten, so recovery never asks a new owner about it.
    assert_eq!(
        apply(
            &mut store,
            &[
                WorkerRequest::Commit { txid: 7 },
                WorkerRequest::Commit { txid: 7 },
                WorkerRequest::SetFence {
                    partition: 3,
                    fenced: true
                },
                WorkerRequest::Forget { txid: 7 },
                WorkerRequest::SetFence {
                    partition: 3,
                    fenced: true
                },
            ]
        ),
        vec![
            WorkerResponse::Ok,
            WorkerResponse::Ok,
            WorkerResponse::Error(WorkerError::Locked),
            WorkerResponse::Ok,
            WorkerResponse::Ok
        ]
    );
    assert_eq!(fences(&mut store), WorkerResponse::Partitions(vec![1, 3]));
    fence(&mut store, 3, false);
    assert_eq!(
        get(&mut store, 0, key(3, b"x")),
        WorkerResponse::Value(Some(b"7".to_vec()))
    );
}

#[test]
fn a_flush_of_one_partition_deletes_only_its_keys_and_refuses_a_fenced_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    apply(
        &mut store,
        &[
            set(0, key(1, b"a"), b"1"),
            set(0, key(1, b"b"), b"2"),
            set(0, key(2, b"c"), b"3"),
            set(1, key(1, b"d"), b"4"),
        ],
    );
    let flush = |partition| WorkerRequest::Flush {
        collection: Some(0),
        partition: Some(partition),
    };
    assert_eq!(
        apply(&mut store, &[flush(1)]),
        vec![WorkerResponse::Integer(2)]
    );
    assert_eq!(
        get(&mut store, 0, key(1, b"a")),
        WorkerResponse::Value(None)
    );
    assert_eq!(
        get(&mut store, 0, key(2, b"c")),
        WorkerResponse::Value(Some(b"3".to_vec()))
    );
    assert_eq!(
        get(&mut store, 1, key(1, b"d")),
        WorkerResponse::Value(Some(b"4".to_vec()))
    );
    fence(&mut store, 2, true);
    assert_eq!(
        apply(&mut store, &[flush(2)]),
        vec![WorkerResponse::Error(WorkerError::PartitionMoved {
            partition: 2
        })]
    );
    fence(&mut store, 2, false);
    assert_eq!(
        get(&mut store, 0, key(2, b"c")),
        WorkerResponse::Value(Some(b"3".to_vec()))
    );
}

#[test]
fn decision_records_are_listed_until_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    let prepare = |txid| WorkerRequest::Prepare {
        txid,
        decider: 0,
        ops: vec![put_op(0, key(1, b"d"), b"v", false)],
    };
    apply(&mut store, &[prepare(5), WorkerRequest::Commit { txid: 5 }]);
    apply(&mut store, &[prepare(6)]);
    let decided = |store: &mut Store| apply(store, &[WorkerRequest::Decided { older_than_ms: 0 }]);
    // Only the decision record, not the transaction still prepared.
    assert_eq!(
        decided(&mut store),
        vec![WorkerResponse::InDoubt(vec![(5, 0)])]
    );
    let decided_a_minute_ago = |store: &mut Store| {
        apply(
            store,
            &[WorkerRequest::Decided {
                older_than_ms: 60_000,
            }],
        )
    };
    clock.advance(59_999);
    assert_eq!(
        decided_a_minute_ago(&mut store),
        vec![WorkerResponse::InDoubt(vec![])]
    );
    clock.advance(1);
    assert_eq!(
        decided_a_minute_ago(&mut store),
        vec![WorkerResponse::InDoubt(vec![(5, 0)])]
    );
    apply(&mut store, &[WorkerRequest::Forget { txid: 5 }]);
    assert_eq!(decided(&mut store), vec![WorkerResponse::InDoubt(vec![])]);
}

#[test]
fn clearing_a_partition_removes_all_of_it_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open_on(dir.path(), &ManualClock::new(START_MS));
    let later = START_MS + 3_600_000;
    let mut writes = Vec::new();
    for partition in [0, 1, 2] {
        writes.push(set(0, key(partition, b"plain"), b"v"));
        writes.push(set_expiring(0, key(partition, b"expiring"), b"v", later));
        writes.push(set_expiring(
            1,
            key(partition, b"other collection"),
            b"v",
            later + 1,
        ));
    }
    apply(&mut store, &writes);
    let kept = [records_of(&mut store, 0), records_of(&mut store, 2)];
    let cleared = records_of(&mut store, 1);
    for table in [
        RecordTable::Collection(0),
        RecordTable::Collection(1),
        RecordTable::Log,
        RecordTable::Meta,
        RecordTable::Expiry,
    ] {
        assert!(cleared.iter().any(|r| r.table == table), "{table:?}");
    }
    let highest = store.highest_commit_id();
    fence(&mut store, 1, true);
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::ClearPartition { partition: 1 }]
        ),
        vec![WorkerResponse::Ok]
    );
    assert!(records_of(&mut store, 1).is_empty());
    assert_eq!(last_commit_id(&mut store, 1), 0);
    assert_eq!([records_of(&mut store, 0), records_of(&mut store, 2)], kept);
    assert_eq!(
        fences(&mut store),
        WorkerResponse::Partitions(vec![1]),
        "the fence stays"
    );
    assert_eq!(store.highest_commit_id(), highest);
    // The expiry index holds the other partitions' entries only.
    let txn = store.env.read_txn().unwrap();
    let partitions: Vec<Partition> = store
        .expiry
        .iter(&txn)
        .unwrap()
        .map(|item| {
            layout::decode_expiry_key(item.unwrap().0)
                .unwrap()
                .partition
        })
        .collect();
    assert_eq!(partitions.len(), 4);
    assert!(!partitions.contains(&1));
}

fn read_log(store: &mut Store, partition: Partition) -> Vec<LogEntry> {
    let request = WorkerRequest::ReadLog {
        partition,
        from_commit_id: 0,
        count: 1000,
    };
    match apply(store, &[request]).remove(0) {
        WorkerResponse::Log(entries) => entries,
        other => panic!("{other:?}"),
    }
}

fn replica_state(store: &Store, partition: Partition) -> layout::ReplicaState {
    let txn = WriteTxn::new(store.env.write_txn().unwrap());
    let Ok(state) = store.replica_state(&txn, partition) else {
        panic!("the replication state of partition {partition} does not read")
    };
    state
}

#[test]
fn opening_a_term_writes_a_marker_and_records_the_term_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    apply(&mut store, &[set(0, key(1, b"k"), b"a")]);
    let open = |term| WorkerRequest::OpenTerm { partition: 1, term };
    assert_eq!(
        apply(&mut store, &[open(3)]),
        vec![WorkerResponse::Integer(2)]
    );
    let log = read_log(&mut store, 1);
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].change, ChangeType::Marker);
    assert!(log[1].key.is_empty() && log[1].data.is_empty());
    assert_eq!(
        get(&mut store, 0, key(1, b"k")),
        WorkerResponse::Value(Some(b"a".to_vec()))
    );
    let expected = layout::ReplicaState {
        fenced_term: 3,
        log_hold_from: 0,
        history: vec![(3, 2)],
    };
    assert_eq!(replica_state(&store, 1), expected);
    // The same term again (a restarted primary): another marker, the same history.
    assert_eq!(
        apply(&mut store, &[open(3)]),
        vec![WorkerResponse::Integer(3)]
    );
    assert_eq!(replica_state(&store, 1).history, vec![(3, 2)]);
    // The open term serves clients; promising it again changes nothing.
    let promise = |term| WorkerRequest::PromiseTerm { partition: 1, term };
    assert_eq!(apply(&mut store, &[promise(3)]), vec![WorkerResponse::Ok]);
    assert_eq!(fences(&mut store), WorkerResponse::Partitions(vec![]));
    // A promise of a higher term fences the old one off, clients included (as moved:
    // nothing is applied); promises never go down.
    assert_eq!(
        apply(&mut store, &[promise(5), promise(4)]),
        vec![WorkerResponse::Ok; 2]
    );
    assert_eq!(replica_state(&store, 1).fenced_term, 5);
    assert_eq!(fences(&mut store), WorkerResponse::Partitions(vec![1]));
    assert!(matches!(
        apply(&mut store, &[set(0, key(1, b"k"), b"late")]).remove(0),
        WorkerResponse::Error(WorkerError::PartitionMoved { partition: 1 })
    ));
    assert_eq!(
        apply(&mut store, &[open(4)]),
        vec![WorkerResponse::Error(WorkerError::TermFenced { fenced: 5 })]
    );
    assert_eq!(
        last_commit_id(&mut store, 1),
        3,
        "a refused term writes nothing"
    );
    // The state is durable, and it is not part of the partition's records.
    drop(store);
    let mut store = Store::open(dir.path(), &options()).unwrap();
    assert_eq!(replica_state(&store, 1).fenced_term, 5);
    let records = records_of(&mut store, 1);
    assert!(records
        .iter()
        .all(|r| r.key.as_slice() != layout::replica_state_key(1).as_slice()));
    assert!(replica_state(&store, 2) == layout::ReplicaState::default());
}

#[test]
fn replicated_entries_follow_on_and_store_the_history_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Store::open(dir.path().join("p").as_path(), &options()).unwrap();
    let mut follower = Store::open(dir.path().join("f").as_path(), &options()).unwrap();
    apply(&mut primary, &[set(0, key(1, b"a"), b"1")]);
    apply(
        &mut primary,
        &[WorkerRequest::OpenTerm {
            partition: 1,
            term: 2,
        }],
    );
    apply(
        &mut primary,
        &[
            set(0, key(1, b"b"), b"2"),
            WorkerRequest::Delete {
                collection: 0,
                keys: vec![key(1, b"a")],
            },
        ],
    );
    let log = read_log(&mut primary, 1);
    assert_eq!(log.len(), 4);
    let history = vec![(2, 2)];
    let replicate = |entries: &[LogEntry]| WorkerRequest::Replicate {
        partition: 1,
        entries: entries.to_vec(),
        history: history.clone(),
    };
    // A gap after the follower's last entry is refused, and nothing is written.
    let refused = apply(&mut follower, &[replicate(&log[1..])]).remove(0);
    assert!(
        matches!(refused, WorkerResponse::Error(WorkerError::Storage(_))),
        "{refused:?}"
    );
    assert_eq!(last_commit_id(&mut follower, 1), 0);
    assert_eq!(
        apply(&mut follower, &[replicate(&log[..2])]),
        vec![WorkerResponse::Integer(2)]
    );
    // Overlapping entries are harmless.
    assert_eq!(
        apply(&mut follower, &[replicate(&log[1..])]),
        vec![WorkerResponse::Integer(4)]
    );
    assert_eq!(records_of(&mut follower, 1), records_of(&mut primary, 1));
    assert_eq!(replica_state(&follower, 1).history, history);
    assert_eq!(
        get(&mut follower, 0, key(1, b"a")),
        WorkerResponse::Value(None)
    );
    // Entries of another partition, or a history that does not increase, are refused.
    let mut stray = log[3].clone();
    stray.partition = 2;
    stray.commit_id = 5;
    let refused = apply(&mut follower, &[replicate(&[stray])]).remove(0);
    assert!(
        matches!(refused, WorkerResponse::Error(WorkerError::Storage(_))),
        "{refused:?}"
    );
    let bad_history = WorkerRequest::Replicate {
        partition: 1,
        entries: Vec::new(),
        history: vec![(2, 2), (1, 3)],
    };
    let refused = apply(&mut follower, &[bad_history]).remove(0);
    assert!(
        matches!(refused, WorkerResponse::Error(WorkerError::Storage(_))),
        "{refused:?}"
    );
    assert_eq!(replica_state(&follower, 1).history, history);
}

#[test]
fn log_retention_keeps_what_the_followers_still_need() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    for i in 0..10 {
        apply(
            &mut store,
            &[set(0, key(1, format!("k{i}").as_bytes()), b"v")],
        );
    }
    let hold = |from| WorkerRequest::HoldLog { partition: 1, from };
    assert_eq!(apply(&mut store, &[hold(4)]), vec![WorkerResponse::Ok]);
    assert_eq!(replica_state(&store, 1).log_hold_from, 4);
    // Retention would keep 2 entries; the followers need entries from 4 on.
    assert_eq!(store.trim_log(2, None, 1000).unwrap(), 3);
    assert_eq!(
        read_log(&mut store, 1).first().map(|e| e.commit_id),
        Some(4)
    );
    // Once they have caught up, retention trims as usual; 0 lifts the hold.
    apply(&mut store, &[hold(0)]);
    assert_eq!(store.trim_log(2, None, 1000).unwrap(), 5);
    assert_eq!(
        read_log(&mut store, 1).first().map(|e| e.commit_id),
        Some(9)
    );
}

#[test]
fn a_new_promise_or_term_asks_its_commit_to_be_synced_and_a_repeated_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &options()).unwrap();
    let mut txn = WriteTxn::new(store.env.write_txn().unwrap());
    let mut batch = Batch::new(START_MS, 0);
    assert!(store.promise_term(&mut txn, &mut batch, 1, 4).is_ok());
    assert!(
        batch.sync,
        "a raised promise is synced even with async durability"
    );
    let mut again = Batch::new(START_MS, 0);
    assert!(store.promise_term(&mut txn, &mut again, 1, 4).is_ok());
    assert!(!again.sync, "a promise already made costs no sync");
    let mut opened = Batch::new(START_MS, 0);
    assert!(store.open_term(&mut txn, &mut opened, 1, 5).is_ok());
    assert!(opened.sync, "a new term is synced");
}

#[test]
fn a_copy_under_way_is_recorded_apart_from_the_partitions_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path(), &options()).unwrap();
    apply(&mut store, &[set(0, key(1, b"k"), b"v")]);
    let copying = |copying| WorkerRequest::SetCopying {
        partition: 1,
        copying,
    };
    let present = |store: &Store| {
        let txn = store.env.read_txn().unwrap();
        store
            .meta
            .get(&txn, &layout::copy_key(1))
            .unwrap()
            .is_some()
    };
    assert_eq!(
        apply(&mut store, &[copying(true)]),
        vec![WorkerResponse::Ok]
    );
    assert!(present(&store));
    // Clearing the partition for the copy keeps the mark; exporting it does not carry it.
    apply(
        &mut store,
        &[WorkerRequest::ClearPartition { partition: 1 }],
    );
    assert!(present(&store));
    assert!(records_of(&mut store, 1)
        .iter()
        .all(|r| r.key.as_slice() != layout::copy_key(1).as_slice()));
    assert_eq!(
        apply(&mut store, &[copying(false)]),
        vec![WorkerResponse::Ok]
    );
    assert!(!present(&store));
}

/// A prepare of `txid` decided by partition 1, with a put in partitions 1 and 2.
fn prepare_across(txid: u64) -> WorkerRequest {
    WorkerRequest::Prepare {
        txid,
        decider: shoal_shared::frame::DECIDER_PARTITION | 1,
        ops: vec![
            put_op(0, key(1, b"a"), b"A", false),
            put_op(0, key(2, b"b"), b"B", false),
        ],
    }
}

/// Replicates `primary`'s log of `partition` after what `follower` holds.
fn replicate_from(primary: &mut Store, follower: &mut Store, partition: Partition) {
    let held = last_commit_id(follower, partition);
    let entries: Vec<LogEntry> = read_log(primary, partition)
        .into_iter()
        .filter(|entry| entry.commit_id > held)
        .collect();
    let request = WorkerRequest::Replicate {
        partition,
        entries,
        history: vec![(1, 1)],
    };
    let last = last_commit_id(primary, partition);
    assert_eq!(
        apply(follower, &[request]),
        vec![WorkerResponse::Integer(last as i64)]
    );
}

fn txn_entries(store: &mut Store, partition: Partition) -> Vec<(u64, Option<layout::Intent>)> {
    read_log(store, partition)
        .into_iter()
        .filter(|entry| entry.change == ChangeType::Txn)
        .map(|entry| {
            let txid = u64::from_be_bytes(entry.key.as_slice().try_into().unwrap());
            let part =
                (!entry.data.is_empty()).then(|| layout::decode_intent(&entry.data).unwrap());
            (txid, part)
        })
        .collect()
}

fn in_doubt(store: &mut Store) -> WorkerResponse {
    apply(store, &[WorkerRequest::InDoubt { older_than_ms: 0 }]).remove(0)
}

#[test]
fn transaction_records_are_logged_per_partition_and_rebuilt_on_a_follower() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut primary = open_on(&dir.path().join("p"), &clock);
    let mut follower = open_on(&dir.path().join("f"), &clock);
    // The follower serves neither partition: both are fenced there, as its host does.
    for partition in [1, 2] {
        apply(
            &mut follower,
            &[WorkerRequest::PromiseTerm { partition, term: 1 }],
        );
        assert_eq!(fence(&mut follower, partition, true), WorkerResponse::Ok);
    }
    apply(&mut primary, &[prepare_across(7)]);
    // Each partition's log holds its own part of the intent, in the prepare's transaction.
    let logged1 = txn_entries(&mut primary, 1);
    let logged2 = txn_entries(&mut primary, 2);
    assert_eq!(logged1.len(), 1);
    assert_eq!(logged2.len(), 1);
    let part1 = logged1[0].1.clone().unwrap();
    assert_eq!(
        (logged1[0].0, part1.state),
        (7, layout::IntentState::Prepared)
    );
    assert_eq!(part1.ops, vec![put_op(0, key(1, b"a"), b"A", false)]);
    assert_eq!(
        logged2[0].1.as_ref().unwrap().ops,
        vec![put_op(0, key(2, b"b"), b"B", false)]
    );
    // A single-host record (decided by a worker) is not logged.
    apply(
        &mut primary,
        &[WorkerRequest::Prepare {
            txid: 8,
            decider: 0,
            ops: vec![put_op(0, key(3, b"c"), b"C", false)],
        }],
    );
    assert_eq!(txn_entries(&mut primary, 3), vec![]);
    apply(&mut primary, &[WorkerRequest::Abort { txid: 8 }]);

    replicate_from(&mut primary, &mut follower, 1);
    replicate_from(&mut primary, &mut follower, 2);
    assert_eq!(follower.locks().holder(0, &key(1, b"a")), Some(7));
    assert_eq!(follower.locks().holder(0, &key(2, b"b")), Some(7));
    for partition in [1, 2] {
        assert_eq!(
            records_of(&mut follower, partition),
            records_of(&mut primary, partition)
        );
    }
    // Fenced copies are not the follower's to resolve.
    assert_eq!(in_doubt(&mut follower), WorkerResponse::InDoubt(vec![]));
    assert_eq!(
        apply(&mut follower, &[WorkerRequest::Commit { txid: 7 }]),
        vec![WorkerResponse::Error(WorkerError::PartitionMoved {
            partition: 1
        })]
    );

    // The decider's first commit records the decision in partition 1's log, and nothing
    // else: no data changes before the decision is replicated.
    let (before1, before2) = (
        read_log(&mut primary, 1).len(),
        read_log(&mut primary, 2).len(),
    );
    apply(&mut primary, &[WorkerRequest::Commit { txid: 7 }]);
    let log1 = read_log(&mut primary, 1);
    assert_eq!(log1.len(), before1 + 1);
    let decision = txn_entries(&mut primary, 1)
        .last()
        .unwrap()
        .1
        .clone()
        .unwrap();
    assert_eq!(decision.state, layout::IntentState::Committed);
    assert_eq!(decision.ops, vec![put_op(0, key(1, b"a"), b"A", false)]);
    assert_eq!(read_log(&mut primary, 2).len(), before2);
    assert_eq!(
        get(&mut primary, 0, key(1, b"a")),
        WorkerResponse::Value(None)
    );
    // The second applies the ops: each partition logs its data, then its part's end.
    apply(&mut primary, &[WorkerRequest::Commit { txid: 7 }]);
    let log2 = read_log(&mut primary, 2);
    assert_eq!(
        log2[before2..].iter().map(|e| e.change).collect::<Vec<_>>(),
        vec![ChangeType::Create, ChangeType::Txn]
    );
    let decision = txn_entries(&mut primary, 1)
        .last()
        .unwrap()
        .1
        .clone()
        .unwrap();
    assert_eq!(
        (decision.state, decision.ops),
        (layout::IntentState::Committed, vec![])
    );
    assert_eq!(txn_entries(&mut primary, 2).last().unwrap().1, None);
    // The follower hears of partition 1 first: it has the decision, and partition 2's
    // key stays locked until that partition's entries come.
    replicate_from(&mut primary, &mut follower, 1);
    assert_eq!(follower.locks().holder(0, &key(1, b"a")), None);
    assert_eq!(follower.locks().holder(0, &key(2, b"b")), Some(7));
    drop(follower);
    // The locks come back with the records after a restart.
    let mut follower = open_on(&dir.path().join("f"), &clock);
    assert_eq!(follower.locks().holder(0, &key(2, b"b")), Some(7));

    // The primary is lost before partition 2's commit reached the follower, which is
    // promoted: it serves both partitions, finds the transaction in doubt, decides it
    // committed (it holds the decision) and applies the rest.
    for partition in [1, 2] {
        assert_eq!(fence(&mut follower, partition, false), WorkerResponse::Ok);
    }
    assert_eq!(
        in_doubt(&mut follower),
        WorkerResponse::InDoubt(vec![(7, shoal_shared::frame::DECIDER_PARTITION | 1)])
    );
    assert_eq!(
        apply(
            &mut follower,
            &[WorkerRequest::Decide {
                txid: 7,
                older_than_ms: 0
            }]
        ),
        vec![WorkerResponse::Integer(1)]
    );
    assert_eq!(
        apply(&mut follower, &[WorkerRequest::Commit { txid: 7 }]),
        vec![WorkerResponse::Ok]
    );
    assert!(follower.locks().is_empty());
    assert_eq!(
        get(&mut follower, 0, key(1, b"a")),
        WorkerResponse::Value(Some(b"A".to_vec()))
    );
    assert_eq!(
        get(&mut follower, 0, key(2, b"b")),
        WorkerResponse::Value(Some(b"B".to_vec()))
    );
    assert_eq!(txn_entries(&mut follower, 2).last().unwrap().1, None);
    assert_eq!(
        apply(
            &mut follower,
            &[WorkerRequest::Decided { older_than_ms: 0 }]
        ),
        vec![WorkerResponse::InDoubt(vec![(
            7,
            shoal_shared::frame::DECIDER_PARTITION | 1
        )])]
    );
    apply(&mut follower, &[WorkerRequest::Forget { txid: 7 }]);
    assert_eq!(txn_entries(&mut follower, 1).last().unwrap().1, None);
    assert_eq!(
        apply(
            &mut follower,
            &[WorkerRequest::Decided { older_than_ms: 0 }]
        ),
        vec![WorkerResponse::InDoubt(vec![])]
    );
    assert_eq!(
        apply(&mut follower, &[WorkerRequest::Transactions]),
        vec![WorkerResponse::Integer(0)]
    );
}

#[test]
fn a_worker_that_follows_one_part_of_a_transaction_prepares_its_own_beside_it() {
    // Host X follows partitions 1 and 2 (led elsewhere) and leads partition 3: one
    // transaction has parts in all three.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut primary = open_on(&dir.path().join("p"), &clock);
    let mut x = open_on(&dir.path().join("x"), &clock);
    for partition in [1, 2] {
        apply(&mut x, &[WorkerRequest::PromiseTerm { partition, term: 1 }]);
        assert_eq!(fence(&mut x, partition, true), WorkerResponse::Ok);
    }
    apply(&mut primary, &[prepare_across(11)]);
    replicate_from(&mut primary, &mut x, 1);
    replicate_from(&mut primary, &mut x, 2);
    let own = WorkerRequest::Prepare {
        txid: 11,
        decider: shoal_shared::frame::DECIDER_PARTITION | 1,
        ops: vec![put_op(0, key(3, b"c"), b"C", false)],
    };
    assert!(matches!(
        apply(&mut x, std::slice::from_ref(&own)).remove(0),
        WorkerResponse::TxOutcomes(_)
    ));
    // Its own part is logged in its own partition; the followed parts are untouched.
    let logged = txn_entries(&mut x, 3);
    assert_eq!(logged.len(), 1);
    assert_eq!(
        logged[0].1.as_ref().unwrap().ops,
        vec![put_op(0, key(3, b"c"), b"C", false)]
    );
    assert_eq!(txn_entries(&mut x, 1).len(), 1);
    assert_eq!(x.locks().holder(0, &key(3, b"c")), Some(11));
    assert_eq!(x.locks().holder(0, &key(1, b"a")), Some(11));
    // The same part twice is a duplicate.
    assert!(matches!(
        apply(&mut x, &[own]).remove(0),
        WorkerResponse::Error(WorkerError::Storage(_))
    ));
    // Its commit applies only what it serves, and keeps the followed parts.
    assert_eq!(
        apply(&mut x, &[WorkerRequest::Commit { txid: 11 }]),
        vec![WorkerResponse::Ok]
    );
    assert_eq!(
        get(&mut x, 0, key(3, b"c")),
        WorkerResponse::Value(Some(b"C".to_vec()))
    );
    assert_eq!(x.locks().holder(0, &key(3, b"c")), None);
    assert_eq!(x.locks().holder(0, &key(1, b"a")), Some(11));
}

#[test]
fn a_promoted_follower_serves_from_its_term_on_and_applies_a_decided_commit() {
    // The decision is replicated; the primary dies before applying anything.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut primary = open_on(&dir.path().join("p"), &clock);
    let mut follower = open_on(&dir.path().join("f"), &clock);
    for partition in [1, 2] {
        apply(
            &mut follower,
            &[WorkerRequest::PromiseTerm { partition, term: 1 }],
        );
        assert_eq!(fence(&mut follower, partition, true), WorkerResponse::Ok);
    }
    apply(&mut primary, &[prepare_across(12)]);
    assert_eq!(
        apply(&mut primary, &[WorkerRequest::Commit { txid: 12 }]),
        vec![WorkerResponse::Ok]
    );
    replicate_from(&mut primary, &mut follower, 1);
    replicate_from(&mut primary, &mut follower, 2);
    drop(primary);
    // Opening the term lifts the fence in the same transaction: the routing admits
    // requests from then on, and the commit must find the partitions served.
    for partition in [1, 2] {
        assert!(matches!(
            apply(
                &mut follower,
                &[WorkerRequest::OpenTerm { partition, term: 2 }]
            )
            .remove(0),
            WorkerResponse::Integer(_)
        ));
    }
    assert_eq!(fences(&mut follower), WorkerResponse::Partitions(vec![]));
    assert_eq!(
        apply(&mut follower, &[WorkerRequest::Commit { txid: 12 }]),
        vec![WorkerResponse::Ok]
    );
    assert_eq!(
        get(&mut follower, 0, key(1, b"a")),
        WorkerResponse::Value(Some(b"A".to_vec()))
    );
    assert_eq!(
        get(&mut follower, 0, key(2, b"b")),
        WorkerResponse::Value(Some(b"B".to_vec()))
    );
    assert!(follower.locks().is_empty());
}

#[test]
fn a_promoted_follower_aborts_an_undecided_intent_and_frees_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut primary = open_on(&dir.path().join("p"), &clock);
    let mut follower = open_on(&dir.path().join("f"), &clock);
    apply(&mut primary, &[prepare_across(9)]);
    replicate_from(&mut primary, &mut follower, 1);
    replicate_from(&mut primary, &mut follower, 2);
    drop(primary);
    // Too young to presume it aborted: its coordinator may still be at work.
    let decide = WorkerRequest::Decide {
        txid: 9,
        older_than_ms: 5_000,
    };
    assert_eq!(
        apply(&mut follower, std::slice::from_ref(&decide)),
        vec![WorkerResponse::Error(WorkerError::TxInProgress)]
    );
    clock.advance(5_000);
    assert_eq!(
        apply(&mut follower, &[decide]),
        vec![WorkerResponse::Integer(0)]
    );
    assert!(follower.locks().is_empty());
    assert_eq!(in_doubt(&mut follower), WorkerResponse::InDoubt(vec![]));
    assert_eq!(txn_entries(&mut follower, 1).last().unwrap().1, None);
    assert_eq!(txn_entries(&mut follower, 2).last().unwrap().1, None);
    apply(&mut follower, &[set(0, key(2, b"b"), b"later")]);
    assert_eq!(
        get(&mut follower, 0, key(2, b"b")),
        WorkerResponse::Value(Some(b"later".to_vec()))
    );
}

#[test]
fn a_commit_applies_only_the_parts_of_served_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    apply(&mut store, &[prepare_across(4)]);
    // Partition 2 now has another primary: its part is left to its log.
    apply(
        &mut store,
        &[WorkerRequest::PromiseTerm {
            partition: 2,
            term: 3,
        }],
    );
    assert_eq!(fence(&mut store, 2, true), WorkerResponse::Ok);
    let before2 = read_log(&mut store, 2).len();
    for _decide_then_apply in 0..2 {
        assert_eq!(
            apply(&mut store, &[WorkerRequest::Commit { txid: 4 }]),
            vec![WorkerResponse::Ok]
        );
    }
    assert_eq!(
        get(&mut store, 0, key(1, b"a")),
        WorkerResponse::Value(Some(b"A".to_vec()))
    );
    assert_eq!(read_log(&mut store, 2).len(), before2);
    assert_eq!(store.locks().holder(0, &key(2, b"b")), Some(4));
    assert_eq!(store.locks().holder(0, &key(1, b"a")), None);
    // The decision is here; the fenced part is nobody's to resolve on this copy.
    assert_eq!(in_doubt(&mut store), WorkerResponse::InDoubt(vec![]));
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::Decide {
                txid: 4,
                older_than_ms: 0
            }]
        ),
        vec![WorkerResponse::Integer(1)]
    );
    // Clearing the fenced copy (a full copy starts over) drops its part and its lock.
    assert_eq!(
        apply(
            &mut store,
            &[WorkerRequest::ClearPartition { partition: 2 }]
        ),
        vec![WorkerResponse::Ok]
    );
    assert!(store.locks().is_empty());
}

#[test]
fn a_full_copy_carries_the_partitions_parts_of_transaction_records() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut primary = open_on(&dir.path().join("p"), &clock);
    let mut copy = open_on(&dir.path().join("c"), &clock);
    apply(
        &mut primary,
        &[set(0, key(2, b"z"), b"1"), prepare_across(11)],
    );
    let records = records_of(&mut primary, 2);
    let txns: Vec<&Record> = records
        .iter()
        .filter(|record| record.table == RecordTable::Txns)
        .collect();
    assert_eq!(txns.len(), 1);
    let part = layout::decode_intent(&txns[0].value).unwrap();
    assert_eq!(
        part.partitions(),
        vec![2],
        "only partition 2's part is exported"
    );
    // Exported in small chunks, resuming in the middle of the tables.
    for chunk in export_all(&mut primary, 2, 1) {
        assert_eq!(
            apply(
                &mut copy,
                &[WorkerRequest::ImportRecords { records: chunk }]
            ),
            vec![WorkerResponse::Ok]
        );
    }
    assert_eq!(records_of(&mut copy, 2), records);
    assert_eq!(copy.locks().holder(0, &key(2, b"b")), Some(11));
    assert_eq!(copy.locks().holder(0, &key(1, b"a")), None);
    // A copy that is not replicated keeps refusing to drop a prepared transaction's keys;
    // a replicated one clears them with the partition.
    assert_eq!(
        apply(&mut copy, &[WorkerRequest::ClearPartition { partition: 2 }]),
        vec![WorkerResponse::Error(WorkerError::Locked)]
    );
    apply(
        &mut copy,
        &[WorkerRequest::PromiseTerm {
            partition: 2,
            term: 1,
        }],
    );
    assert_eq!(
        apply(&mut copy, &[WorkerRequest::ClearPartition { partition: 2 }]),
        vec![WorkerResponse::Ok]
    );
    assert!(copy.locks().is_empty());
    assert_eq!(records_of(&mut copy, 2), vec![]);
}

#[test]
fn a_follower_cut_off_after_the_decision_or_in_the_middle_of_an_apply_finishes_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut primary = open_on(&dir.path().join("p"), &clock);
    let mut follower = open_on(&dir.path().join("f"), &clock);
    apply(
        &mut primary,
        &[set(0, key(2, b"b"), b"old"), prepare_across(5)],
    );
    replicate_from(&mut primary, &mut follower, 1);
    replicate_from(&mut primary, &mut follower, 2);
    // The decision reaches the follower; then the apply, of which partition 2's log
    // carries only the data entry, not yet the end of the part.
    apply(&mut primary, &[WorkerRequest::Commit { txid: 5 }]);
    replicate_from(&mut primary, &mut follower, 1);
    apply(&mut primary, &[WorkerRequest::Commit { txid: 5 }]);
    let held = last_commit_id(&mut follower, 2);
    let cut: Vec<LogEntry> = read_log(&mut primary, 2)
        .into_iter()
        .filter(|entry| entry.commit_id > held)
        .take(1)
        .collect();
    assert_eq!(cut[0].change, ChangeType::Update);
    let request = WorkerRequest::Replicate {
        partition: 2,
        entries: cut,
        history: vec![(1, 1)],
    };
    apply(&mut follower, &[request]);
    drop(primary);
    // Promoted: the data of partition 2 is there, and so is its part, still locked.
    assert_eq!(follower.locks().holder(0, &key(2, b"b")), Some(5));
    assert_eq!(follower.locks().holder(0, &key(1, b"a")), Some(5));
    assert_eq!(
        in_doubt(&mut follower),
        WorkerResponse::InDoubt(vec![(5, shoal_shared::frame::DECIDER_PARTITION | 1)])
    );
    assert_eq!(
        apply(
            &mut follower,
            &[WorkerRequest::Decide {
                txid: 5,
                older_than_ms: 0
            }]
        ),
        vec![WorkerResponse::Integer(1)]
    );
    // Recovery's commit applies every op the record still holds, again where needed.
    assert_eq!(
        apply(&mut follower, &[WorkerRequest::Commit { txid: 5 }]),
        vec![WorkerResponse::Ok]
    );
    assert!(follower.locks().is_empty());
    assert_eq!(
        get(&mut follower, 0, key(1, b"a")),
        WorkerResponse::Value(Some(b"A".to_vec()))
    );
    assert_eq!(
        get(&mut follower, 0, key(2, b"b")),
        WorkerResponse::Value(Some(b"B".to_vec()))
    );
    assert_eq!(in_doubt(&mut follower), WorkerResponse::InDoubt(vec![]));
}

mod writeback;
