//! The properties every decoder of untrusted bytes must keep, as check functions.
//!
//! The fuzz targets (`fuzz/`) and the corpus replay tests (`shared/tests/`,
//! `shard-worker/tests/`) call the same functions, so a property is written once.
//! Each check feeds one input to a decoder and panics if the decoder panics,
//! answers something inconsistent, or makes a single allocation larger than the
//! bound stated for that decoder. The allocation bound needs [`LimitedAllocator`]
//! as the binary's global allocator.
//!
//! This module is for tests and fuzzing only, and is not used by the processes.
//! Its only I/O is [`replay_corpus`], which reads (and on request writes) the
//! committed seed corpus.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::frame::{decode_frame, encode_frame, FrameError, MAX_FRAME_BYTES};
use crate::limits::{BULK_SLACK_BYTES, MAX_INLINE_BYTES, MAX_REQUEST_ARGS, MAX_VALUE_BYTES_LIMIT};
use crate::resp::{parse_request, RequestLimits};

// ---------------------------------------------------------------------------
// The allocation guard.

thread_local! {
    /// Largest single allocation allowed on this thread (`usize::MAX`: unchecked).
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Largest allocation over `LIMIT` seen since the guard was armed (0: none).
    static OVER: Cell<usize> = const { Cell::new(0) };
}

/// Set once the first allocation went through [`LimitedAllocator`].
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Allocations above this size, when over the limit, abort at once: the system might
/// not be able to serve them, and the report would be lost to an allocation failure.
const ABORT_ABOVE_BYTES: usize = 256 * 1024 * 1024;

/// The system allocator, with a per-thread bound on the size of one allocation that
/// [`with_allocation_limit`] arms. Install it with
/// `#[global_allocator] static ALLOCATOR: LimitedAllocator = LimitedAllocator;`.
pub struct LimitedAllocator;

fn note_allocation(size: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    // `try_with`: during thread teardown the slots may be gone; nothing is armed then.
    let Ok(limit) = LIMIT.try_with(Cell::get) else {
        return;
    };
    if size <= limit {
        return;
    }
    if size > ABORT_ABOVE_BYTES {
        let _ = LIMIT.try_with(|limit| limit.set(usize::MAX));
        let _ = writeln!(
            std::io::stderr(),
            "decoder asked for one allocation of {size} bytes; the bound is {limit} bytes"
        );
        std::process::abort();
    }
    let _ = OVER.try_with(|over| over.set(over.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`; only the sizes are looked at.
unsafe impl GlobalAlloc for LimitedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// Runs `decode` and panics if it made one allocation larger than `max_bytes`.
///
/// Panics too if [`LimitedAllocator`] is not the global allocator, since then nothing
/// would be checked.
pub fn with_allocation_limit<R>(max_bytes: usize, decode: impl FnOnce() -> R) -> R {
    assert!(
        INSTALLED.load(Ordering::Relaxed),
        "LimitedAllocator is not the global allocator of this binary"
    );
    OVER.with(|over| over.set(0));
    LIMIT.with(|limit| limit.set(max_bytes));
    let result = decode();
    LIMIT.with(|limit| limit.set(usize::MAX));
    let over = OVER.with(Cell::get);
    assert!(
        over == 0,
        "decoder made one allocation of {over} bytes; the bound is {max_bytes} bytes"
    );
    result
}

/// The cut points at which a prefix of an `len`-byte encoding is tried: all of them
/// for short encodings, else the first and last 32 and 16 in between.
pub(crate) fn prefix_cuts(len: usize) -> Vec<usize> {
    if len <= 96 {
        return (0..len).collect();
    }
    let mut cuts: Vec<usize> = (0..32).chain(len - 32..len).collect();
    cuts.extend((1..16).map(|step| 32 + step * (len - 64) / 16));
    cuts
}

// ---------------------------------------------------------------------------
// RESP requests.

/// Small limits, so that short fuzz inputs reach every limit check of the parser.
pub(crate) const SMALL_REQUEST_LIMITS: RequestLimits = RequestLimits {
    max_args: 16,
    max_bulk_bytes: 32,
    max_request_bytes: 80,
    max_inline_bytes: 64,
};

/// The largest limits the config allows.
pub const LARGEST_REQUEST_LIMITS: RequestLimits = RequestLimits {
    max_args: MAX_REQUEST_ARGS,
    max_bulk_bytes: MAX_VALUE_BYTES_LIMIT + BULK_SLACK_BYTES,
    max_request_bytes: 2 * (MAX_VALUE_BYTES_LIMIT + BULK_SLACK_BYTES),
    max_inline_bytes: MAX_INLINE_BYTES,
};

/// The request parser allocates only for what is in the buffer: argument lists and
/// the inline arguments' bytes, each at most a small multiple of the input.
pub(crate) fn resp_allocation_bound(input_bytes: usize) -> usize {
    32 * input_bytes + 4096
}

/// Most bytes a buffer can hold and still be an incomplete request under `limits`:
/// the count line, every bulk header (at most 22 bytes once complete, 64 while not),
/// and the bulk bytes the request may declare.
pub(crate) fn resp_incomplete_bound(limits: &RequestLimits) -> usize {
    let multibulk = 64 + limits.max_args.saturating_mul(24) + limits.max_request_bytes + 64;
    multibulk.max(limits.max_inline_bytes)
}

/// `args` as a RESP multibulk request.
pub fn encode_request(args: &[impl AsRef<[u8]>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses `input` under `limits` with the allocation bound armed.
fn parse_bounded(
    input: &[u8],
    limits: &RequestLimits,
) -> (
    BytesMut,
    Result<Option<Vec<Bytes>>, crate::resp::ProtocolError>,
) {
    let mut buf = BytesMut::from(input);
    let result = with_allocation_limit(resp_allocation_bound(input.len()), || {
        parse_request(&mut buf, limits)
    });
    (buf, result)
}

/// Checks [`parse_request`] on `input` under small and under the largest limits.
pub fn check_resp_request(input: &[u8]) {
    for limits in [&SMALL_REQUEST_LIMITS, &LARGEST_REQUEST_LIMITS] {
        check_resp_request_with(input, limits);
    }
}

fn check_resp_request_with(input: &[u8], limits: &RequestLimits) {
    let (rest, result) = parse_bounded(input, limits);
    let multibulk = input.first() == Some(&b'*');
    match result {
        Err(error) => {
            // The reply is sent before the connection closes; it must be one line.
            let mut out = BytesMut::new();
            error.reply().encode(crate::resp::Protocol::Resp2, &mut out);
            assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        }
        Ok(None) => {
            assert_eq!(&rest[..], input, "an incomplete parse consumes nothing");
            assert!(
                input.len() <= resp_incomplete_bound(limits),
                "{} bytes held as incomplete, over what the limits allow",
                input.len()
            );
        }
        Ok(Some(args)) => {
            let used = input.len() - rest.len();
            assert!(used > 0, "a request consumes bytes");
            assert_eq!(&rest[..], &input[used..], "only the request is consumed");
            assert!(args.len() <= limits.max_args, "too many arguments");
            if multibulk {
                assert!(args.iter().all(|arg| arg.len() <= limits.max_bulk_bytes));
                let total: usize = args.iter().map(Bytes::len).sum();
                assert!(total <= limits.max_request_bytes, "request over its limit");
            } else {
                assert!(
                    used - 1 <= limits.max_inline_bytes,
                    "inline line over its limit"
                );
            }
            // The arguments survive a trip through the canonical encoding.
            let encoded = encode_request(&args);
            let (rest, again) = parse_bounded(&encoded, &LARGEST_REQUEST_LIMITS);
            assert_eq!(again, Ok(Some(args)), "re-encoded request differs");
            assert!(rest.is_empty());
            // Every prefix of the request only needs more bytes.
            for cut in prefix_cuts(used) {
                let (_, prefix) = parse_bounded(&input[..cut], limits);
                assert_eq!(
                    prefix,
                    Ok(None),
                    "a {cut}-byte prefix of a {used}-byte request"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Frames of the net-daemon ↔ shard-worker link.

/// Most bytes one decoded message element takes in memory per byte of frame: a
/// sequence preallocates at most one element per input byte, and no element type
/// of the link is larger than this (checked below).
pub(crate) const FRAME_BYTES_PER_INPUT_BYTE: usize = 256;

const _: () = {
    use crate::frame::{Answer, Key, LogEntry, TxOp, TxOutcome, WorkerRequest, WorkerResponse};
    // An EXEC carries requests, and its answer responses.
    assert!(std::mem::size_of::<WorkerRequest>() <= FRAME_BYTES_PER_INPUT_BYTE);
    assert!(std::mem::size_of::<WorkerResponse>() <= FRAME_BYTES_PER_INPUT_BYTE);
    assert!(std::mem::size_of::<Answer>() <= FRAME_BYTES_PER_INPUT_BYTE);
    assert!(std::mem::size_of::<Key>() <= FRAME_BYTES_PER_INPUT_BYTE);
    assert!(std::mem::size_of::<TxOp>() <= FRAME_BYTES_PER_INPUT_BYTE);
    assert!(std::mem::size_of::<TxOutcome>() <= FRAME_BYTES_PER_INPUT_BYTE);
    assert!(std::mem::size_of::<LogEntry>() <= FRAME_BYTES_PER_INPUT_BYTE);
};

/// A frame decoder must not allocate from a declared length, only from the bytes present.
pub fn frame_allocation_bound(input_bytes: usize) -> usize {
    FRAME_BYTES_PER_INPUT_BYTE * input_bytes + 4096
}

/// Checks [`decode_frame`] for `T` on `input` as it is, and on `input` as the payload
/// of a frame whose length prefix is right (so that the fuzzer reaches the payload).
pub(crate) fn check_frame<T>(input: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    check_frame_bytes::<T>(input);
    if input.len() <= MAX_FRAME_BYTES {
        let mut framed = (input.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(input);
        check_frame_bytes::<T>(&framed);
    }
}

fn decode_bounded<T: DeserializeOwned>(input: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    with_allocation_limit(frame_allocation_bound(input.len()), || decode_frame(input))
}

fn check_frame_bytes<T>(input: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let declared = input
        .get(..4)
        .map(|header| u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize);
    match decode_bounded::<T>(input) {
        Ok(None) => {
            let complete = declared.is_some_and(|len| input.len() >= 4 + len);
            assert!(!complete, "a complete frame reported as incomplete");
        }
        Err(FrameError::TooLarge(len)) => {
            assert_eq!(Some(len), declared);
            assert!(len > MAX_FRAME_BYTES);
        }
        Err(FrameError::Encode(error)) => panic!("decoding reported an encode error: {error}"),
        Err(_) => {}
        Ok(Some((message, used))) => {
            assert_eq!(Some(used - 4), declared, "a frame uses its declared length");
            let mut encoded = Vec::new();
            encode_frame(&message, &mut encoded).expect("a decoded message encodes");
            let (again, again_used) = decode_bounded::<T>(&encoded)
                .expect("a re-encoded message decodes")
                .expect("a re-encoded message is complete");
            // Compared by their bytes: a score may be NaN, which equals nothing.
            let mut encoded_again = Vec::new();
            encode_frame(&again, &mut encoded_again).expect("a decoded message encodes");
            assert_eq!(encoded_again, encoded, "re-encoded message differs");
            assert_eq!(again_used, encoded.len());
            for cut in prefix_cuts(used) {
                assert!(
                    matches!(decode_bounded::<T>(&input[..cut]), Ok(None)),
                    "a {cut}-byte prefix of a {used}-byte frame"
                );
            }
        }
    }
}

/// Checks the decoding of `RequestEnvelope` frames (what a shard-worker reads).
pub fn check_worker_request_frame(input: &[u8]) {
    check_frame::<crate::frame::RequestEnvelope>(input);
}

/// Checks the decoding of `ResponseEnvelope` frames (what the net-daemon reads).
pub fn check_worker_response_frame(input: &[u8]) {
    check_frame::<crate::frame::ResponseEnvelope>(input);
}

// ---------------------------------------------------------------------------
// Seed inputs: real encodings, written to `fuzz/corpus/<target>/` by the corpus test.

/// Seeds for `resp_request`: requests as clients send them.
pub fn resp_request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("get", encode_request(&["GET", "key"])),
        (
            "set-options",
            encode_request(&["SET", "k", "v", "NX", "PX", "1500", "GET"]),
        ),
        (
            "mset",
            encode_request(&["MSET", "{user}a", "1", "{user}b", "\0\r\n\u{ff}"]),
        ),
        (
            "incrbyfloat",
            encode_request(&["INCRBYFLOAT", "f", "-0.5e3"]),
        ),
        (
            "hello",
            encode_request(&["HELLO", "3", "AUTH", "default", "secret"]),
        ),
        (
            "scan",
            encode_request(&["SCAN", "0", "MATCH", "a*[bc]?", "COUNT", "100"]),
        ),
        ("empty-arg", encode_request(&["ECHO", ""])),
        ("empty-multibulk", b"*0\r\n".to_vec()),
        ("negative-multibulk", b"*-1\r\n".to_vec()),
        (
            "pipeline",
            [encode_request(&["PING"]), encode_request(&["DBSIZE"])].concat(),
        ),
        ("inline-ping", b"PING\r\n".to_vec()),
        (
            "inline-quotes",
            b"set a \"b \\x41\\n\" 'it\\'s'\r\n".to_vec(),
        ),
        ("inline-bare-newline", b"get key\n".to_vec()),
        ("blank-line", b"\r\n".to_vec()),
    ]
}

fn envelope(id: u64, request: crate::frame::WorkerRequest) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&crate::frame::RequestEnvelope { id, request }, &mut out)
        .expect("seed requests encode");
    out
}

fn response(id: u64, response: crate::frame::WorkerResponse) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&crate::frame::ResponseEnvelope { id, response }, &mut out)
        .expect("seed responses encode");
    out
}

/// Seeds for `frame_request`: one frame for most kinds of [`crate::frame::WorkerRequest`].
pub fn frame_request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::frame::{
        ExpireCondition, Expiry, Key, SetCondition, SetReply, TxAction, TxOp, WorkerRequest::*,
    };
    let key = |bytes: &[u8]| Key {
        partition: 17,
        bytes: bytes.to_vec(),
    };
    let put = TxOp {
        collection: 0,
        key: key(b"{t}a"),
        action: TxAction::Put {
            value: b"1".to_vec(),
            expires_at_ms: Some(1_700_000_000_000),
            if_absent: true,
        },
    };
    let take = TxOp {
        collection: 0,
        key: key(b"{t}b"),
        action: TxAction::Take,
    };
    let put_taken = TxOp {
        collection: 1,
        key: key(b"{t}c"),
        action: TxAction::PutTaken { if_absent: false },
    };
    vec![
        (
            "get",
            envelope(
                1,
                Get {
                    collection: 0,
                    key: key(b"k"),
                },
            ),
        ),
        (
            "mget",
            envelope(
                2,
                MGet {
                    collection: 3,
                    keys: vec![key(b"a"), key(b""), key(b"\xff")],
                },
            ),
        ),
        (
            "set",
            envelope(
                u64::MAX,
                Set {
                    collection: 0,
                    key: key(b"k"),
                    value: b"value\r\n\0".to_vec(),
                    condition: SetCondition::IfAbsent,
                    reply: SetReply::OldValue,
                    expiry: Expiry::At(1_700_000_000_000),
                },
            ),
        ),
        (
            "getex",
            envelope(
                4,
                GetEx {
                    collection: 0,
                    key: key(b"k"),
                    expiry: Expiry::Clear,
                },
            ),
        ),
        (
            "delete",
            envelope(
                5,
                Delete {
                    collection: 0,
                    keys: vec![key(b"a"), key(b"b")],
                },
            ),
        ),
        (
            "incrby",
            envelope(
                6,
                IncrBy {
                    collection: 0,
                    key: key(b"n"),
                    delta: i64::MIN,
                },
            ),
        ),
        (
            "incrbyfloat",
            envelope(
                7,
                IncrByFloat {
                    collection: 0,
                    key: key(b"f"),
                    increment: b"1e3".to_vec(),
                },
            ),
        ),
        (
            "setrange",
            envelope(
                8,
                SetRange {
                    collection: 0,
                    key: key(b"s"),
                    offset: 1 << 20,
                    value: b"xy".to_vec(),
                },
            ),
        ),
        (
            "getrange",
            envelope(
                9,
                GetRange {
                    collection: 0,
                    key: key(b"s"),
                    start: -3,
                    end: -1,
                },
            ),
        ),
        (
            "expire",
            envelope(
                10,
                Expire {
                    collection: 2,
                    key: key(b"k"),
                    at_ms: 5,
                    condition: ExpireCondition::IfGreater,
                },
            ),
        ),
        (
            "scan",
            envelope(
                11,
                Scan {
                    collection: 0,
                    after: Some(b"\x00\x11k".to_vec()),
                    count: 10,
                    pattern: Some(b"k*".to_vec()),
                    partition: Some(0),
                    of_type: Some("hash".into()),
                },
            ),
        ),
        (
            "keys",
            envelope(
                12,
                Keys {
                    collection: 0,
                    pattern: None,
                },
            ),
        ),
        (
            "flush",
            envelope(
                13,
                Flush {
                    collection: None,
                    partition: None,
                },
            ),
        ),
        (
            "atomic",
            envelope(
                14,
                Atomic {
                    ops: vec![take, put_taken],
                },
            ),
        ),
        (
            "prepare",
            envelope(
                15,
                Prepare {
                    txid: 99,
                    decider: 1,
                    ops: vec![put],
                },
            ),
        ),
        (
            "decide",
            envelope(
                16,
                Decide {
                    txid: 99,
                    older_than_ms: 5000,
                },
            ),
        ),
        (
            "readfeed",
            envelope(
                17,
                ReadFeed {
                    positions: vec![(0, 0), (255, u64::MAX)],
                    count: 100,
                },
            ),
        ),
        (
            "readlog",
            envelope(
                18,
                ReadLog {
                    partition: 4,
                    from_commit_id: 1,
                    count: 10,
                },
            ),
        ),
        (
            "reserveids",
            envelope(
                19,
                ReserveIds {
                    high_water: 1 << 40,
                },
            ),
        ),
        (
            "backup",
            envelope(
                20,
                Backup {
                    dir: "/var/backups/shoal/2026".into(),
                },
            ),
        ),
        ("transactions", envelope(21, Transactions)),
        (
            "typed-zadd",
            envelope(
                22,
                Typed {
                    collection: 0,
                    key: key(b"board"),
                    op: crate::frame::TypedOp::ZAdd {
                        flags: crate::frame::ZAddFlags {
                            ch: true,
                            ..Default::default()
                        },
                        pairs: vec![(1.5, serde_bytes::ByteBuf::from(b"alice".to_vec()))],
                    },
                },
            ),
        ),
        (
            "bitfield",
            envelope(
                24,
                BitField {
                    collection: 0,
                    key: key(b"bits"),
                    ops: vec![
                        crate::frame::BitFieldOp::IncrBy {
                            field: crate::frame::BitFieldType {
                                signed: true,
                                bits: 8,
                                offset: 16,
                            },
                            increment: -3,
                            overflow: crate::frame::BitFieldOverflow::Sat,
                        },
                        crate::frame::BitFieldOp::Get {
                            field: crate::frame::BitFieldType {
                                signed: false,
                                bits: 63,
                                offset: 0,
                            },
                        },
                    ],
                },
            ),
        ),
        (
            "exec",
            envelope(
                23,
                Exec {
                    watched: vec![(0, key(b"{t}a"), 7)],
                    requests: vec![
                        Typed {
                            collection: 0,
                            key: key(b"{t}h"),
                            op: crate::frame::TypedOp::HSet {
                                pairs: vec![(
                                    serde_bytes::ByteBuf::from(b"f".to_vec()),
                                    serde_bytes::ByteBuf::from(b"v".to_vec()),
                                )],
                                if_absent: false,
                            },
                        },
                        Get {
                            collection: 0,
                            key: key(b"{t}a"),
                        },
                    ],
                },
            ),
        ),
    ]
}

/// Seeds for `frame_response`: one frame for each kind of [`crate::frame::WorkerResponse`].
pub fn frame_response_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::frame::{ChangeType, LogEntry, TxOutcome, WorkerError, WorkerResponse::*};
    let entry = LogEntry {
        partition: 3,
        commit_id: 7,
        timestamp_ms: 1_700_000_000_000,
        change: ChangeType::Update,
        collection: 0,
        expires_at_ms: Some(1_700_000_100_000),
        key: b"k".to_vec(),
        data: b"data".to_vec(),
    };
    let backup = crate::backup::ShardBackup {
        shard: 1,
        format_version: 2,
        partitions: 256,
        workers: 2,
        bytes: 1 << 20,
        sha256: "ab".repeat(32),
        positions: vec![(1, 10), (3, 0)],
    };
    vec![
        ("ok", response(1, Ok)),
        ("integer", response(2, Integer(-1))),
        ("value", response(3, Value(Some(b"hello".to_vec())))),
        ("nil", response(4, Value(None))),
        (
            "values",
            response(
                5,
                Values(vec![Some(serde_bytes::ByteBuf::from(b"a".to_vec())), None]),
            ),
        ),
        (
            "scanned",
            response(
                6,
                Scanned {
                    keys: vec![serde_bytes::ByteBuf::from(b"k1".to_vec())],
                    next: Some(b"\x00\x01k1".to_vec()),
                },
            ),
        ),
        (
            "tx-outcomes",
            response(
                7,
                TxOutcomes(vec![
                    TxOutcome::Done,
                    TxOutcome::Existed(true),
                    TxOutcome::Value {
                        value: b"v".to_vec(),
                        expires_at_ms: None,
                    },
                ]),
            ),
        ),
        ("in-doubt", response(8, InDoubt(vec![(99, 1)]))),
        (
            "positions",
            response(9, Positions(vec![(0, 5), (7, 1 << 33)])),
        ),
        (
            "log",
            response(
                10,
                Log(vec![
                    entry.clone(),
                    LogEntry {
                        change: ChangeType::Delete,
                        data: Vec::new(),
                        ..entry
                    },
                ]),
            ),
        ),
        ("backup", response(11, Backup(backup))),
        (
            "error-value-too-large",
            response(
                12,
                Error(WorkerError::ValueTooLarge {
                    max_value_bytes: 1 << 26,
                }),
            ),
        ),
        (
            "error-log-trimmed",
            response(
                13,
                Error(WorkerError::LogTrimmed {
                    partition: 2,
                    trimmed_through: 40,
                }),
            ),
        ),
        (
            "error-storage",
            response(14, Error(WorkerError::Storage("MDB_MAP_FULL".into()))),
        ),
    ]
}

/// Frames that made a decoder allocate from a declared length before it read the
/// bytes: a string, a byte string and a sequence each claiming far more than the
/// frame holds. Kept in the corpus and in the tests as regressions.
pub fn frame_preallocation_regressions() -> Vec<(&'static str, Vec<u8>)> {
    use crate::frame::{Key, WorkerRequest};
    // Replaces the encoding's last `tail` bytes with `declared` (varint 252 ++ u32 LE) and
    // fixes the length prefix: the frame then claims far more bytes than it has.
    let lie = |mut frame: Vec<u8>, tail: usize| {
        frame.truncate(frame.len() - tail);
        frame.push(252);
        frame.extend_from_slice(&100_000_000u32.to_le_bytes());
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        frame
    };
    let key = Key {
        partition: 0,
        bytes: Vec::new(),
    };
    vec![
        (
            "regression-string-length",
            lie(envelope(1, WorkerRequest::Backup { dir: "x".into() }), 2),
        ),
        (
            "regression-bytes-length",
            lie(
                envelope(
                    1,
                    WorkerRequest::Append {
                        collection: 0,
                        key: key.clone(),
                        value: b"v".to_vec(),
                    },
                ),
                2,
            ),
        ),
        (
            "regression-sequence-length",
            lie(
                envelope(
                    1,
                    WorkerRequest::MGet {
                        collection: 0,
                        keys: Vec::new(),
                    },
                ),
                1,
            ),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Replaying a committed corpus.

/// Runs `check` on every file of `fuzz/corpus/<target>/` under `repository` and on
/// every seed; returns how many inputs were checked. With `SHOAL_WRITE_FUZZ_CORPUS=1`
/// it first writes the seeds there as `seed-<name>` (how the corpus is generated).
pub fn replay_corpus(
    repository: &std::path::Path,
    target: &str,
    seeds: &[(&str, Vec<u8>)],
    check: fn(&[u8]),
) -> usize {
    let dir = repository.join("fuzz/corpus").join(target);
    if std::env::var_os("SHOAL_WRITE_FUZZ_CORPUS").is_some_and(|value| value == "1") {
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("writing a seed");
        }
    }
    let mut inputs: Vec<(String, Vec<u8>)> = seeds
        .iter()
        .map(|(name, bytes)| (format!("seed {name}"), bytes.clone()))
        .collect();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("reading {}: {error}", dir.display()))
        .map(|entry| entry.expect("listing the corpus").path())
        .collect();
    files.sort();
    for path in files {
        let bytes = std::fs::read(&path).expect("reading a corpus file");
        inputs.push((path.display().to_string(), bytes));
    }
    for (name, bytes) in &inputs {
        let outcome = std::panic::catch_unwind(|| check(bytes));
        assert!(outcome.is_ok(), "{target}: {name} fails its check");
    }
    inputs.len()
}
