//! Write-back: batches acknowledged from the journal, kept in one LMDB transaction
//! until the store settles, and made again after an abort, a crash or a power failure.

use super::*;
use crate::store::writeback::Touched;

/// A store in `dir` on `clock`, with write-back on.
fn open_writing_back(dir: &Path, clock: &ManualClock) -> Store {
    let mut store = open_on(dir, clock);
    store.set_write_back(true).unwrap();
    store
}

/// `k`'s value in collection 0 as a reader of the environment sees it (what the
/// net-daemon's direct reads would find).
fn committed_value(store: &Store, k: &[u8]) -> Option<Vec<u8>> {
    let txn = store.env.read_txn().unwrap();
    let raw = store.collections[0]
        .get(&txn, &layout::data_key(1, k))
        .unwrap()?;
    Some(layout::decode_value(raw).unwrap().bytes.to_vec())
}

#[test]
fn acknowledged_batches_are_seen_by_the_worker_at_once_and_by_readers_once_settled() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_writing_back(dir.path(), &clock);
    let txnid = store.env.info().last_txn_id;
    assert!(!store.is_unsettled());
    apply(&mut store, &[set(0, key(1, b"a"), b"1")]);
    apply(
        &mut store,
        &[set(0, key(1, b"b"), b"2"), set(0, key(1, b"a"), b"3")],
    );
    assert!(store.is_unsettled());
    assert_eq!(
        get(&mut store, 0, key(1, b"a")),
        WorkerResponse::Value(Some(b"3".to_vec()))
    );
    assert_eq!(logged(&mut store, 1, 0, 10), vec![1, 2, 3]);
    // LMDB has committed nothing yet: a reader of the environment sees neither key.
    assert_eq!(store.env.info().last_txn_id, txnid);
    assert_eq!(committed_value(&store, b"a"), None);
    store.settle().unwrap();
    assert!(!store.is_unsettled());
    assert_eq!(
        store.env.info().last_txn_id,
        txnid + 1,
        "one commit for both batches"
    );
    assert_eq!(committed_value(&store, b"a"), Some(b"3".to_vec()));
    assert_eq!(committed_value(&store, b"b"), Some(b"2".to_vec()));
    // A batch that changes nothing leaves nothing to settle.
    apply(
        &mut store,
        &[WorkerRequest::Get {
            collection: 0,
            key: key(1, b"a"),
        }],
    );
    assert!(!store.is_unsettled());
}

#[test]
fn a_process_that_dies_with_unsettled_batches_replays_them_when_it_restarts() {
    // The batches were acknowledged: unlike a commit LMDB never made, they are replayed
    // in the same boot.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_writing_back(dir.path(), &clock);
    let expected = write_history(&mut store, 1);
    let log = log_of(&mut store, 1);
    let highest = store.highest_commit_id();
    assert!(store.is_unsettled());
    drop(store);
    let mut store = open_on(dir.path(), &clock);
    assert!(!store.is_unsettled());
    assert_holds(&mut store, &expected);
    assert_eq!(
        log_of(&mut store, 1),
        log,
        "each entry once, with its commit id"
    );
    assert_eq!(store.highest_commit_id(), highest);
    // And once more after a second death: nothing is replayed twice.
    drop(store);
    let mut store = open_on(dir.path(), &clock);
    assert_eq!(log_of(&mut store, 1), log);
}

#[test]
fn after_a_power_failure_unsettled_batches_come_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("data.mdb");
    let clock = ManualClock::new(START_MS);
    let mut store = open_writing_back(dir.path(), &clock);
    write_history(&mut store, 1);
    // A checkpoint is of what LMDB committed: it settles first.
    store.checkpoint().unwrap();
    assert!(!store.is_unsettled());
    let on_disk = std::fs::read(&data_file).unwrap();
    write_history(&mut store, 2);
    store.settle().unwrap();
    let expected = write_history(&mut store, 3);
    let log = log_of(&mut store, 1);
    assert!(store.is_unsettled());
    drop(store);
    lose_pages_since(&data_file, &on_disk, &clock);
    let mut store = open_on(dir.path(), &clock);
    assert_holds(&mut store, &expected);
    assert_eq!(log_of(&mut store, 1), log);
}

/// A power failure: of the pages LMDB wrote to `data_file` since it held `on_disk`, the
/// disk lost one in three; then the machine boots again.
fn lose_pages_since(data_file: &Path, on_disk: &[u8], clock: &ManualClock) {
    let written = std::fs::read(data_file).unwrap();
    let mut torn = Vec::new();
    for (n, page) in pages(&written).into_iter().enumerate() {
        match pages(on_disk).get(n) {
            Some(old) if n >= 2 && n % 3 == 0 => torn.extend_from_slice(old),
            _ => torn.extend_from_slice(page),
        }
    }
    std::fs::write(data_file, &torn).unwrap();
    clock.reboot();
}

#[test]
fn after_a_power_failure_batches_of_both_kinds_come_back_when_write_back_paused_and_resumed() {
    // The worker pauses write-back when free space runs low, and resumes it: since the
    // checkpoint the journal holds acknowledged batches, commits, and batches again.
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("data.mdb");
    let clock = ManualClock::new(START_MS);
    // A map that never grows: growing takes a checkpoint, after which the pages lost
    // below would be of that checkpoint's snapshot.
    let map_size_bytes = 64 << 20;
    let big_map = StoreOptions {
        map_size_bytes,
        ..options()
    };
    let mut store = Store::open_with_clock(dir.path(), &big_map, clock.clone()).unwrap();
    store.set_write_back(true).unwrap();
    write_history(&mut store, 1);
    store.checkpoint().unwrap();
    let on_disk = std::fs::read(&data_file).unwrap();
    write_history(&mut store, 2);
    store.set_write_back(false).unwrap();
    assert!(!store.is_unsettled(), "a pause commits the batches first");
    write_history(&mut store, 3);
    store.set_write_back(true).unwrap();
    let expected = write_history(&mut store, 4);
    let log = log_of(&mut store, 1);
    assert!(store.is_unsettled());
    assert_eq!(store.map_size(), map_size_bytes);
    drop(store);
    lose_pages_since(&data_file, &on_disk, &clock);
    let mut store = Store::open_with_clock(dir.path(), &big_map, clock.clone()).unwrap();
    assert_holds(&mut store, &expected);
    assert_eq!(log_of(&mut store, 1), log);
}

#[test]
fn a_full_map_keeps_the_batches_acknowledged_before_it() {
    // The third batch fills the 1 MiB map: the transaction is aborted, the map grows,
    // and the two batches before it are made again from their records.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_writing_back(dir.path(), &clock);
    let before = store.map_size();
    let value = vec![7u8; 64 * 1024];
    let mut written = Vec::new();
    for round in 0..3u32 {
        let requests: Vec<_> = (0..8u32)
            .map(|i| {
                let k = key(1, format!("k{round}-{i}").as_bytes());
                written.push((k.clone(), Some(value.clone())));
                set(0, k, &value)
            })
            .collect();
        assert!(apply(&mut store, &requests)
            .iter()
            .all(|r| *r == WorkerResponse::Ok));
    }
    assert!(store.map_size() > before, "the map grew");
    assert!(store.is_unsettled());
    assert_holds(&mut store, &written);
    assert_eq!(log_of(&mut store, 1).len(), 24, "each write logged once");
    // The segments holding the first batches were kept by the checkpoint the resize
    // took: a power failure now loses none of them.
    drop(store);
    clock.reboot();
    let mut store = open_on(dir.path(), &clock);
    assert_holds(&mut store, &written);
    assert_eq!(log_of(&mut store, 1).len(), 24);
}

#[test]
fn at_the_map_limit_the_batch_is_refused_and_the_ones_before_it_stay() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let options = StoreOptions {
        max_map_size_bytes: 1 << 20,
        ..options()
    };
    let mut store = Store::open_with_clock(dir.path(), &options, clock.clone()).unwrap();
    store.set_write_back(true).unwrap();
    let value = vec![7u8; 64 * 1024];
    apply(&mut store, &[set(0, key(1, b"kept"), b"1")]);
    let mut refused = false;
    for i in 0..32u32 {
        let response = apply(&mut store, &[set(0, key(1, &i.to_be_bytes()), &value)]).remove(0);
        if matches!(response, WorkerResponse::Error(WorkerError::MapFull { .. })) {
            refused = true;
            break;
        }
        assert_eq!(response, WorkerResponse::Ok);
    }
    assert!(refused, "the map reached its limit");
    assert_eq!(
        get(&mut store, 0, key(1, b"kept")),
        WorkerResponse::Value(Some(b"1".to_vec()))
    );
    drop(store);
    let mut store = Store::open_with_clock(dir.path(), &options, clock).unwrap();
    assert_eq!(
        get(&mut store, 0, key(1, b"kept")),
        WorkerResponse::Value(Some(b"1".to_vec()))
    );
}

#[test]
fn a_checkpoint_while_batches_are_unsettled_keeps_their_journal() {
    let dir = tempfile::tempdir().unwrap();
    let data_file = dir.path().join("data.mdb");
    let clock = ManualClock::new(START_MS);
    let mut store = open_writing_back(dir.path(), &clock);
    let mut expected = write_history(&mut store, 1);
    store.settle().unwrap();
    apply(&mut store, &[set(0, key(1, b"held"), b"1")]);
    expected.push((key(1, b"held"), Some(b"1".to_vec())));
    // A checkpoint of what LMDB committed, taken while a batch waits: the segment that
    // batch was journaled in must stay.
    assert!(store.is_unsettled());
    store.checkpoint_committed().unwrap();
    let on_disk = std::fs::read(&data_file).unwrap();
    apply(&mut store, &[set(0, key(1, b"later"), b"2")]);
    expected.push((key(1, b"later"), Some(b"2".to_vec())));
    store.settle().unwrap();
    drop(store);
    // The power fails and the disk loses every page written since the checkpoint.
    let written = std::fs::read(&data_file).unwrap();
    let mut torn = Vec::new();
    for (n, page) in pages(&written).into_iter().enumerate() {
        torn.extend_from_slice(pages(&on_disk).get(n).copied().unwrap_or(page));
    }
    std::fs::write(&data_file, &torn).unwrap();
    clock.reboot();
    let mut store = open_on(dir.path(), &clock);
    assert_holds(&mut store, &expected);
}

#[test]
fn a_failed_commit_of_unsettled_batches_stops_every_write_and_the_next_open_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_writing_back(dir.path(), &clock);
    apply(&mut store, &[set(0, key(1, b"acked"), b"1")]);
    store.fail_next_settle = true;
    assert!(matches!(store.settle(), Err(StoreError::InDoubt(_))));
    // Nothing goes past the lost batches: no write, no settle, no checkpoint (which
    // would drop the journal that holds them).
    let write = [set(0, key(1, b"after"), b"2")];
    assert!(matches!(
        store.apply_batch(&write.iter().collect::<Vec<_>>()),
        Err(StoreError::InDoubt(_))
    ));
    assert!(matches!(store.settle(), Err(StoreError::InDoubt(_))));
    assert!(matches!(store.checkpoint(), Err(StoreError::InDoubt(_))));
    assert!(matches!(
        store.checkpoint_tick(),
        Err(StoreError::InDoubt(_))
    ));
    drop(store);
    let mut store = open_on(dir.path(), &clock);
    assert_eq!(
        get(&mut store, 0, key(1, b"acked")),
        WorkerResponse::Value(Some(b"1".to_vec()))
    );
    assert_eq!(
        get(&mut store, 0, key(1, b"after")),
        WorkerResponse::Value(None)
    );
}

/// The pending-key hash of `k` in collection 0 (partition 1).
fn pending_hash(k: &[u8]) -> u64 {
    shoal_shared::pending::key_hash(0, &[&layout::data_key(1, k)])
}

#[test]
fn the_keys_of_acknowledged_batches_are_touched_until_lmdb_commits_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_writing_back(dir.path(), &clock);
    apply(
        &mut store,
        &[set(0, key(1, b"a"), b"1"), set(0, key(1, b"b"), b"2")],
    );
    let touched = store.take_touched();
    assert!(!touched.shard, "plain writes name their keys");
    let mut keys = touched.keys;
    keys.sort_unstable();
    keys.dedup();
    let mut expected = vec![pending_hash(b"a"), pending_hash(b"b")];
    expected.sort_unstable();
    assert_eq!(
        keys, expected,
        "the written keys, and no counter or log entry"
    );
    assert_eq!(store.take_touched(), Touched::default(), "taken once");
    // A write that changes nothing touches nothing; one that LMDB commits before the
    // worker asks needs no mark.
    apply(&mut store, &[set(0, key(1, b"c"), b"3")]);
    store.settle().unwrap();
    assert_eq!(store.take_touched(), Touched::default());
    apply(
        &mut store,
        &[WorkerRequest::Delete {
            collection: 0,
            keys: vec![key(1, b"missing")],
        }],
    );
    assert_eq!(store.take_touched(), Touched::default());
    // A flush deletes keys it does not name: its keys, or the whole shard, are marked.
    apply(
        &mut store,
        &[WorkerRequest::Flush {
            collection: Some(0),
            partition: None,
        }],
    );
    let touched = store.take_touched();
    assert!(
        touched.shard
            || [b"a", b"b", b"c"]
                .iter()
                .all(|k| touched.keys.contains(&pending_hash(*k))),
        "{touched:?}"
    );
    // A prepared transaction locks its keys through a record readers check: the
    // whole shard is marked.
    apply(
        &mut store,
        &[WorkerRequest::Prepare {
            txid: 7,
            decider: 0,
            ops: vec![put_op(0, key(1, b"x"), b"7", false)],
        }],
    );
    assert!(store.take_touched().shard);
}

#[test]
fn with_write_back_log_entries_go_straight_to_log_after_what_recent_held() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let mut store = open_on(dir.path(), &clock);
    let recent_len = |store: &Store| {
        let txn = store.env.read_txn().unwrap();
        store.recent.len(&txn).unwrap()
    };
    // Without write-back: ids 1 and 2 of partition 1 wait in `recent`.
    apply(&mut store, &[set(0, key(1, b"a"), b"1")]);
    apply(&mut store, &[set(0, key(1, b"b"), b"2")]);
    assert_eq!(recent_len(&store), 2);
    store.set_write_back(true).unwrap();
    // The first write-back batch moves them into `log` before its own entry.
    apply(&mut store, &[set(0, key(1, b"c"), b"3")]);
    apply(
        &mut store,
        &[set(0, key(1, b"d"), b"4"), set(0, key(2, b"e"), b"5")],
    );
    assert_eq!(logged(&mut store, 1, 0, 10), vec![1, 2, 3, 4]);
    assert_eq!(logged(&mut store, 2, 0, 10), vec![1]);
    store.settle().unwrap();
    assert_eq!(recent_len(&store), 0, "no entry went to `recent`");
    // What the net-daemon's reader reads once LMDB committed them.
    let txn = store.env.read_txn().unwrap();
    let mut index = shoal_shared::lmdb::RecentIndex::default();
    let read = shoal_shared::lmdb::read_partition_log_indexed(
        &txn,
        *store.log,
        *store.recent,
        &mut index,
        1,
        1,
        4,
    )
    .unwrap();
    let ids: Vec<u64> = read.iter().map(|entry| entry.commit_id).collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    drop(txn);
    // After a restart the journal's replay puts them back where they were.
    drop(store);
    let mut store = open_writing_back(dir.path(), &clock);
    assert_eq!(logged(&mut store, 1, 0, 10), vec![1, 2, 3, 4]);
    assert_eq!(recent_len(&store), 0);
}
