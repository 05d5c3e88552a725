//! Round-trip properties of the RESP codec and the worker frames: what the encoder
//! writes, the decoder reads back unchanged, and every strict prefix of an encoding
//! is "need more bytes" (never an error, never a panic, nothing consumed).

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_shared::backup::ShardBackup;
use shoal_shared::frame::{
    decode_frame, encode_frame, ChangeType, ExpireCondition, Expiry, Key, LogEntry, Record,
    RecordTable, RequestEnvelope, ResponseEnvelope, SetCondition, SetReply, TxAction, TxOp,
    TxOutcome, WorkerError, WorkerRequest, WorkerResponse,
};
use shoal_shared::fuzzing::{encode_request, LARGEST_REQUEST_LIMITS};
use shoal_shared::resp::{parse_request, Protocol, Reply};

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn key() -> impl Strategy<Value = Key> {
    (any::<u16>(), bytes(24)).prop_map(|(partition, bytes)| Key { partition, bytes })
}

fn keys() -> impl Strategy<Value = Vec<Key>> {
    vec(key(), 0..5)
}

fn expiry() -> impl Strategy<Value = Expiry> {
    prop_oneof![
        Just(Expiry::Keep),
        Just(Expiry::Clear),
        any::<u64>().prop_map(Expiry::At)
    ]
}

fn tx_op() -> impl Strategy<Value = TxOp> {
    let action = prop_oneof![
        (bytes(32), option::of(any::<u64>()), any::<bool>()).prop_map(
            |(value, expires_at_ms, if_absent)| TxAction::Put {
                value,
                expires_at_ms,
                if_absent
            }
        ),
        any::<bool>().prop_map(|if_absent| TxAction::PutTaken { if_absent }),
        Just(TxAction::Delete),
        Just(TxAction::Take),
        Just(TxAction::Read),
    ];
    (any::<u16>(), key(), action).prop_map(|(collection, key, action)| TxOp {
        collection,
        key,
        action,
    })
}

fn record_table() -> impl Strategy<Value = RecordTable> {
    prop_oneof![
        any::<u16>().prop_map(RecordTable::Collection),
        Just(RecordTable::Log),
        Just(RecordTable::Meta),
        Just(RecordTable::Expiry),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (record_table(), bytes(24), bytes(32)).prop_map(|(table, key, value)| Record {
        table,
        key,
        value,
    })
}

fn worker_request() -> impl Strategy<Value = WorkerRequest> {
    use WorkerRequest::*;
    let c = any::<u16>;
    let condition = prop_oneof![
        Just(SetCondition::Always),
        Just(SetCondition::IfAbsent),
        Just(SetCondition::IfPresent)
    ];
    let reply = prop_oneof![
        Just(SetReply::Status),
        Just(SetReply::OldValue),
        Just(SetReply::WrittenFlag)
    ];
    let expire_condition = prop_oneof![
        Just(ExpireCondition::Always),
        Just(ExpireCondition::IfNone),
        Just(ExpireCondition::IfSome),
        Just(ExpireCondition::IfGreater),
        Just(ExpireCondition::IfLess)
    ];
    prop_oneof![
        (c(), key()).prop_map(|(collection, key)| Get { collection, key }),
        (c(), keys()).prop_map(|(collection, keys)| MGet { collection, keys }),
        (c(), key(), bytes(64), condition, reply, expiry()).prop_map(
            |(collection, key, value, condition, reply, expiry)| Set {
                collection,
                key,
                value,
                condition,
                reply,
                expiry
            }
        ),
        (c(), key()).prop_map(|(collection, key)| GetDel { collection, key }),
        (c(), key(), expiry()).prop_map(|(collection, key, expiry)| GetEx {
            collection,
            key,
            expiry
        }),
        (c(), keys()).prop_map(|(collection, keys)| Delete { collection, keys }),
        (c(), keys()).prop_map(|(collection, keys)| Exists { collection, keys }),
        (c(), keys(), any::<bool>()).prop_map(|(collection, keys, wait)| Versions {
            collection,
            keys,
            wait
        }),
        (c(), key(), any::<i64>()).prop_map(|(collection, key, delta)| IncrBy {
            collection,
            key,
            delta
        }),
        (c(), key(), bytes(16)).prop_map(|(collection, key, increment)| IncrByFloat {
            collection,
            key,
            increment
        }),
        (c(), key(), bytes(32)).prop_map(|(collection, key, value)| Append {
            collection,
            key,
            value
        }),
        (c(), key()).prop_map(|(collection, key)| StrLen { collection, key }),
        (c(), key(), any::<i64>(), any::<i64>()).prop_map(|(collection, key, start, end)| {
            GetRange {
                collection,
                key,
                start,
                end,
            }
        }),
        (c(), key(), any::<u64>(), bytes(32)).prop_map(|(collection, key, offset, value)| {
            SetRange {
                collection,
                key,
                offset,
                value,
            }
        }),
        (c(), key(), any::<u64>(), expire_condition).prop_map(
            |(collection, key, at_ms, condition)| Expire {
                collection,
                key,
                at_ms,
                condition
            }
        ),
        (c(), key()).prop_map(|(collection, key)| Persist { collection, key }),
        (c(), key()).prop_map(|(collection, key)| ExpireTime { collection, key }),
        c().prop_map(|collection| DbSize { collection }),
        (
            c(),
            option::of(bytes(16)),
            any::<u32>(),
            option::of(bytes(16)),
            option::of(any::<u16>())
        )
            .prop_map(|(collection, after, count, pattern, partition)| Scan {
                collection,
                after,
                count,
                pattern,
                partition,
                of_type: None,
            }),
        (c(), option::of(bytes(16))).prop_map(|(collection, pattern)| Keys {
            collection,
            pattern
        }),
        (option::of(c()), option::of(any::<u16>())).prop_map(|(collection, partition)| Flush {
            collection,
            partition
        }),
        vec(tx_op(), 0..4).prop_map(|ops| Atomic { ops }),
        (any::<u64>(), any::<u16>(), vec(tx_op(), 0..4))
            .prop_map(|(txid, decider, ops)| { Prepare { txid, decider, ops } }),
        any::<u64>().prop_map(|txid| Commit { txid }),
        any::<u64>().prop_map(|txid| Abort { txid }),
        (any::<u64>(), any::<u64>()).prop_map(|(txid, older_than_ms)| Decide {
            txid,
            older_than_ms
        }),
        any::<u64>().prop_map(|older_than_ms| InDoubt { older_than_ms }),
        any::<u64>().prop_map(|older_than_ms| Decided { older_than_ms }),
        any::<u64>().prop_map(|txid| Forget { txid }),
        Just(Transactions),
        (any::<u16>(), any::<u64>(), any::<u32>()).prop_map(
            |(partition, from_commit_id, count)| ReadLog {
                partition,
                from_commit_id,
                count
            }
        ),
        (vec((any::<u16>(), any::<u64>()), 0..6), any::<u32>())
            .prop_map(|(positions, count)| ReadFeed { positions, count }),
        Just(LastCommitIds),
        Just(Settle),
        any::<u64>().prop_map(|high_water| ReserveIds { high_water }),
        Just(IdHighWater),
        ".{0,40}".prop_map(|dir| Backup { dir }),
        (
            any::<u16>(),
            option::of((record_table(), bytes(24))),
            any::<u32>()
        )
            .prop_map(|(partition, from, max_bytes)| ExportPartition {
                partition,
                from,
                max_bytes
            }),
        vec(record(), 0..4).prop_map(|records| ImportRecords { records }),
        vec(log_entry(), 0..3).prop_map(|entries| ApplyLog { entries }),
        any::<u16>().prop_map(|partition| ClearPartition { partition }),
        (any::<u16>(), any::<bool>())
            .prop_map(|(partition, fenced)| SetFence { partition, fenced }),
        Just(Fences),
    ]
}

fn log_entry() -> impl Strategy<Value = LogEntry> {
    let change = prop_oneof![
        Just(ChangeType::Create),
        Just(ChangeType::Delete),
        Just(ChangeType::Update),
        Just(ChangeType::Marker)
    ];
    (
        (any::<u16>(), any::<u64>(), any::<u64>(), change),
        (any::<u16>(), option::of(any::<u64>()), bytes(24), bytes(32)),
    )
        .prop_map(
            |(
                (partition, commit_id, timestamp_ms, change),
                (collection, expires_at_ms, key, data),
            )| {
                LogEntry {
                    partition,
                    commit_id,
                    timestamp_ms,
                    change,
                    collection,
                    expires_at_ms,
                    key,
                    data,
                }
            },
        )
}

fn worker_error() -> impl Strategy<Value = WorkerError> {
    use WorkerError::*;
    prop_oneof![
        Just(NotInteger),
        Just(Overflow),
        Just(NotFloat),
        Just(NanOrInfinity),
        any::<usize>().prop_map(|max_value_bytes| ValueTooLarge { max_value_bytes }),
        Just(Locked),
        Just(TxKeyExists),
        Just(TxNoSuchKey),
        Just(TxConflict),
        Just(TxAborted),
        Just(TxCommitted),
        Just(TxInProgress),
        any::<usize>().prop_map(|max_map_size_bytes| MapFull { max_map_size_bytes }),
        Just(DiskFull),
        Just(ReplyTooLarge),
        (any::<u16>(), any::<u64>()).prop_map(|(partition, trimmed_through)| LogTrimmed {
            partition,
            trimmed_through
        }),
        ".{0,40}".prop_map(Storage),
        any::<u16>().prop_map(|partition| PartitionMoved { partition }),
    ]
}

fn worker_response() -> impl Strategy<Value = WorkerResponse> {
    use WorkerResponse::*;
    let byte_buf = || bytes(16).prop_map(serde_bytes::ByteBuf::from);
    let outcome = prop_oneof![
        Just(TxOutcome::Done),
        any::<bool>().prop_map(TxOutcome::Existed),
        (bytes(16), option::of(any::<u64>())).prop_map(|(value, expires_at_ms)| {
            TxOutcome::Value {
                value,
                expires_at_ms,
            }
        }),
    ];
    let backup = (
        (any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>()),
        (
            any::<u64>(),
            "[0-9a-f]{0,64}",
            vec((any::<u16>(), any::<u64>()), 0..4),
        ),
    )
        .prop_map(
            |((shard, format_version, partitions, workers), (bytes, sha256, positions))| {
                ShardBackup {
                    shard,
                    format_version,
                    partitions,
                    workers,
                    bytes,
                    sha256,
                    positions,
                }
            },
        );
    prop_oneof![
        Just(Ok),
        any::<i64>().prop_map(Integer),
        option::of(bytes(32)).prop_map(Value),
        vec(option::of(byte_buf()), 0..5).prop_map(Values),
        (vec(byte_buf(), 0..5), option::of(bytes(16)))
            .prop_map(|(keys, next)| Scanned { keys, next }),
        vec(outcome, 0..4).prop_map(TxOutcomes),
        vec((any::<u64>(), any::<u16>()), 0..4).prop_map(InDoubt),
        vec((any::<u16>(), any::<u64>()), 0..4).prop_map(Positions),
        vec(log_entry(), 0..3).prop_map(Log),
        backup.prop_map(Backup),
        (vec(record(), 0..4), option::of((record_table(), bytes(24))))
            .prop_map(|(records, next)| Records { records, next }),
        vec(any::<u16>(), 0..5).prop_map(Partitions),
        worker_error().prop_map(Error),
    ]
}

/// `message` survives a frame round trip, and every strict prefix needs more bytes.
fn frame_round_trip<T>(message: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut encoded = Vec::new();
    encode_frame(message, &mut encoded).expect("encodes");
    let (decoded, used) = decode_frame::<T>(&encoded)
        .expect("decodes")
        .expect("complete");
    prop_assert_eq!(&decoded, message);
    prop_assert_eq!(used, encoded.len());
    for cut in 0..encoded.len() {
        prop_assert!(
            matches!(decode_frame::<T>(&encoded[..cut]), Ok(None)),
            "a {}-byte prefix of a {}-byte frame",
            cut,
            encoded.len()
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn request_frames_round_trip(id in any::<u64>(), request in worker_request()) {
        frame_round_trip(&RequestEnvelope { id, request })?;
    }

    #[test]
    fn response_frames_round_trip(id in any::<u64>(), response in worker_response()) {
        frame_round_trip(&ResponseEnvelope { id, response })?;
    }

    /// Frames written back to back are read back one by one.
    #[test]
    fn frames_decode_in_sequence(requests in vec(worker_request(), 1..6)) {
        let mut stream = Vec::new();
        for (id, request) in requests.iter().enumerate() {
            encode_frame(&RequestEnvelope { id: id as u64, request: request.clone() }, &mut stream)
                .expect("encodes");
        }
        let mut at = 0;
        for (id, request) in requests.iter().enumerate() {
            let (envelope, used) = decode_frame::<RequestEnvelope>(&stream[at..])
                .expect("decodes")
                .expect("complete");
            prop_assert_eq!(envelope.id, id as u64);
            prop_assert_eq!(&envelope.request, request);
            at += used;
        }
        prop_assert_eq!(at, stream.len());
    }

    /// A multibulk request parses back to its arguments; its prefixes need more bytes.
    #[test]
    fn multibulk_requests_round_trip(args in vec(bytes(40), 1..10), trailing in bytes(8)) {
        let encoded = encode_request(&args);
        let mut input = encoded.clone();
        input.extend_from_slice(&trailing);
        let mut buf = BytesMut::from(&input[..]);
        let parsed = parse_request(&mut buf, &LARGEST_REQUEST_LIMITS).expect("parses");
        let expected: Vec<Bytes> = args.iter().cloned().map(Bytes::from).collect();
        prop_assert_eq!(parsed, Some(expected));
        prop_assert_eq!(&buf[..], &trailing[..]);
        for cut in 0..encoded.len() {
            let mut buf = BytesMut::from(&encoded[..cut]);
            prop_assert_eq!(parse_request(&mut buf, &LARGEST_REQUEST_LIMITS), Ok(None));
            prop_assert_eq!(buf.len(), cut, "an incomplete parse consumes nothing");
        }
    }

    /// Inline requests of plain words parse to the words.
    #[test]
    fn inline_requests_round_trip(words in vec("[a-zA-Z0-9_:.-]{1,12}", 1..8), crlf in any::<bool>()) {
        let mut line = words.join(" ").into_bytes();
        line.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        let mut buf = BytesMut::from(&line[..]);
        let parsed = parse_request(&mut buf, &LARGEST_REQUEST_LIMITS).expect("parses");
        let expected: Vec<Bytes> = words.iter().map(|word| Bytes::from(word.clone())).collect();
        prop_assert_eq!(parsed, Some(expected));
        prop_assert!(buf.is_empty());
        for cut in 0..line.len() {
            let mut buf = BytesMut::from(&line[..cut]);
            prop_assert_eq!(parse_request(&mut buf, &LARGEST_REQUEST_LIMITS), Ok(None));
        }
    }

    /// An array of bulk strings encoded as a reply, in either protocol, is the same
    /// bytes a client sends as a request: the reply encoder and the request parser agree.
    #[test]
    fn bulk_array_replies_parse_as_requests(args in vec(bytes(40), 1..10), resp3 in any::<bool>()) {
        let reply = Reply::Array(args.iter().cloned().map(Reply::bulk).collect());
        let mut out = BytesMut::new();
        reply.encode(if resp3 { Protocol::Resp3 } else { Protocol::Resp2 }, &mut out);
        prop_assert_eq!(&out[..], &encode_request(&args)[..]);
        let parsed = parse_request(&mut out, &LARGEST_REQUEST_LIMITS).expect("parses");
        prop_assert_eq!(parsed, Some(args.into_iter().map(Bytes::from).collect::<Vec<_>>()));
        prop_assert!(out.is_empty());
    }
}
