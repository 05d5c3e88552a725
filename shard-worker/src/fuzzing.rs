//! The properties of the storage layout's decoders, as check functions for the
//! fuzz targets (`fuzz/`) and the corpus replay test (`tests/fuzz_corpus.rs`).
//!
//! Stored bytes are untrusted too (a torn page, a foreign file): each decoder must
//! return a value or a [`CorruptError`](shoal_shared::layout::CorruptError), never panic,
//! and allocate at most a copy of what it read. Each check panics otherwise. For
//! tests and fuzzing only.

use shoal_shared::fuzzing::with_allocation_limit;

use shoal_shared::layout::{
    decode_expiry_key, decode_log_entry, decode_partition_meta, decode_replica_state, decode_value,
    encode_log_value, encode_partition_meta, encode_record, encode_replica_state, expiry_key,
    typed, LogRecord,
};

/// The layout decoders copy at most their input, plus an error message.
pub(crate) fn layout_allocation_bound(input_bytes: usize) -> usize {
    input_bytes + 1024
}

/// Checks [`decode_value`]: a decoded value re-encodes to the same bytes; a typed key's
/// metadata bytes, when they decode, re-encode too.
pub fn check_value(input: &[u8]) {
    let bound = layout_allocation_bound(input.len());
    let decoded = with_allocation_limit(bound, || {
        decode_value(input).map(|value| {
            (
                value.commit_id,
                value.expires_at_ms,
                value.typed,
                value.bytes,
            )
        })
    });
    if let Ok((commit_id, expires_at_ms, is_typed, bytes)) = decoded {
        assert_eq!(
            encode_record(commit_id, expires_at_ms, is_typed, bytes),
            input
        );
        if let Ok(meta) = with_allocation_limit(bound, || typed::decode_type_meta(bytes)) {
            assert_eq!(typed::encode_type_meta(&meta), bytes);
        }
    }
}

/// Checks [`decode_log_entry`]. The first input byte (mod 16) is the length of the log
/// key, the next bytes are the key, and the rest is the value.
pub fn check_log_entry(input: &[u8]) {
    let Some((&first, rest)) = input.split_first() else {
        return;
    };
    let key_len = usize::from(first % 16).min(rest.len());
    let (raw_key, raw_value) = rest.split_at(key_len);
    let decoded = with_allocation_limit(layout_allocation_bound(input.len()), || {
        decode_log_entry(raw_key, raw_value)
    });
    let Ok(entry) = decoded else {
        return;
    };
    assert_eq!(
        shoal_shared::layout::log_key(entry.partition, entry.commit_id),
        raw_key
    );
    // An expiry of 0 is stored as "none", so the value re-encodes to the same bytes.
    let encoded = encode_log_value(&LogRecord::from(&entry));
    assert_eq!(encoded, raw_value);
}

/// Checks [`decode_expiry_key`], [`decode_partition_meta`] and [`decode_replica_state`]
/// on the same input.
pub fn check_meta(input: &[u8]) {
    let bound = layout_allocation_bound(input.len());
    let expiry = with_allocation_limit(bound, || {
        decode_expiry_key(input).map(|entry| {
            (
                entry.expires_at_ms,
                entry.collection,
                entry.partition,
                entry.key,
            )
        })
    });
    if let Ok((expires_at_ms, collection, partition, key)) = expiry {
        assert_eq!(expiry_key(expires_at_ms, collection, partition, key), input);
    }
    if let Ok(meta) = with_allocation_limit(bound, || decode_partition_meta(input)) {
        assert_eq!(&encode_partition_meta(meta)[..], input);
    }
    if let Ok(state) = with_allocation_limit(bound, || decode_replica_state(input)) {
        assert_eq!(encode_replica_state(&state), input);
    }
    // Snapshots copy their elements: at most twice the input with the vectors' headers.
    let snapshot_bound = 2 * bound + 64 * input.len();
    if let Ok((kind, elements)) =
        with_allocation_limit(snapshot_bound, || typed::decode_snapshot(input))
    {
        assert_eq!(typed::encode_snapshot(kind, &elements), input);
    }
    if let Ok((kind, prefix)) = with_allocation_limit(bound, || typed::decode_reclaim_key(input)) {
        let (key, version) = typed::element_owner(&prefix).expect("a decoded prefix names its key");
        let partition = u16::from_be_bytes([prefix[0], prefix[1]]);
        assert_eq!(typed::reclaim_key(partition, kind, key, version), input);
    }
}

/// Seeds for `layout_value`: stored values with and without an expiry, and typed keys'
/// metadata records.
pub fn value_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut list = typed::TypeMeta::new(typed::Kind::List, 7);
    list.head -= 3;
    list.count = 3;
    let hash = typed::TypeMeta::new(typed::Kind::Hash, 9);
    vec![
        ("plain", encode_record(42, None, false, b"hello")),
        ("empty", encode_record(1, None, false, b"")),
        (
            "expiring",
            encode_record(u64::MAX, Some(1_700_000_000_000), false, b"\0\xff\r\n"),
        ),
        (
            "typed-list",
            encode_record(5, Some(9), true, &typed::encode_type_meta(&list)),
        ),
        (
            "typed-hash",
            encode_record(6, None, true, &typed::encode_type_meta(&hash)),
        ),
    ]
}

/// `check_log_entry`'s input: the key length byte, the key, then the value.
fn log_input(partition: u16, commit_id: u64, record: &LogRecord<'_>) -> Vec<u8> {
    let mut out = vec![10];
    out.extend_from_slice(&shoal_shared::layout::log_key(partition, commit_id));
    out.extend_from_slice(&encode_log_value(record));
    out
}

/// Seeds for `layout_log_entry`: a create, an update with an expiry, a delete, and a
/// transaction record's part.
pub fn log_entry_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use shoal_shared::frame::{ChangeType, Key, TxAction, TxOp, DECIDER_PARTITION};
    use shoal_shared::layout::{encode_intent, Intent, IntentState};
    let txn_part = encode_intent(&Intent {
        decider: DECIDER_PARTITION | 2,
        created_ms: 1_700_000_000_000,
        state: IntentState::Prepared,
        ops: vec![TxOp {
            collection: 0,
            key: Key {
                partition: 2,
                bytes: b"key".to_vec(),
            },
            action: TxAction::Delete,
        }],
    })
    .unwrap_or_default();
    let create = LogRecord {
        timestamp_ms: 1_700_000_000_000,
        change: ChangeType::Create,
        collection: 0,
        expires_at_ms: None,
        key: b"key",
        data: b"value",
    };
    vec![
        ("create", log_input(3, 1, &create)),
        (
            "update-expiring",
            log_input(
                255,
                u64::MAX,
                &LogRecord {
                    change: ChangeType::Update,
                    collection: 15,
                    expires_at_ms: Some(1_700_000_100_000),
                    ..create
                },
            ),
        ),
        (
            "delete",
            log_input(
                0,
                7,
                &LogRecord {
                    change: ChangeType::Delete,
                    data: b"",
                    ..create
                },
            ),
        ),
        (
            "txn",
            log_input(
                2,
                9,
                &LogRecord {
                    change: ChangeType::Txn,
                    key: &42u64.to_be_bytes(),
                    data: &txn_part,
                    ..create
                },
            ),
        ),
    ]
}

/// Seeds for `layout_meta`: expiry-index keys and a partition's meta entry.
pub fn meta_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use shoal_shared::layout::PartitionMeta;
    vec![
        (
            "snapshot",
            typed::encode_snapshot(
                typed::Kind::SortedSet,
                &[(b"m".to_vec(), typed::score_bytes(1.5).to_vec())],
            ),
        ),
        (
            "reclaim-key",
            typed::reclaim_key(3, typed::Kind::Set, b"user:1", 77),
        ),
        (
            "expiry-key",
            expiry_key(1_700_000_000_000, 1, 17, b"session:1"),
        ),
        ("expiry-key-empty", expiry_key(0, 0, 0, b"")),
        (
            "partition-meta",
            encode_partition_meta(PartitionMeta {
                last_commit_id: 9,
                mtime_ms: 1_700_000_000_000,
                trimmed_through: 3,
            })
            .to_vec(),
        ),
        (
            "replica-state",
            encode_replica_state(&shoal_shared::layout::ReplicaState {
                fenced_term: 7,
                log_hold_from: 120,
                history: vec![(1, 1), (4, 90), (7, 200)],
            }),
        ),
    ]
}
