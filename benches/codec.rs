//! Micro-benchmarks of the hot codec paths: RESP request parsing, reply
//! encoding, key routing, and worker frame encode/decode.
//!
//! Run with `cargo bench -p shoal-shared`.

// `criterion_group!` defines a public function without a doc comment.
#![allow(missing_docs)]

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shoal_shared::frame::{
    decode_frame, encode_frame, Expiry, Key, RequestEnvelope, SetCondition, SetReply, WorkerRequest,
};
use shoal_shared::limits::{MAX_INLINE_BYTES, MAX_REQUEST_ARGS};
use shoal_shared::partition::key_partition;
use shoal_shared::resp::{parse_request, Protocol, Reply, RequestLimits};
use std::hint::black_box;

const LIMITS: RequestLimits = RequestLimits {
    max_args: MAX_REQUEST_ARGS,
    max_bulk_bytes: 1 << 20,
    max_request_bytes: 1 << 30,
    max_inline_bytes: MAX_INLINE_BYTES,
};

fn resp(c: &mut Criterion) {
    let mut pipeline = Vec::new();
    for i in 0..16 {
        let key = format!("key:{i:012}");
        pipeline.extend_from_slice(
            format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$100\r\n", key.len()).as_bytes(),
        );
        pipeline.extend_from_slice(&[b'x'; 100]);
        pipeline.extend_from_slice(b"\r\n");
    }
    let mut group = c.benchmark_group("resp");
    group.throughput(Throughput::Elements(16));
    group.bench_function("parse 16 pipelined SETs", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&pipeline[..]);
            while let Some(args) = parse_request(&mut buf, &LIMITS).unwrap() {
                black_box(args);
            }
        })
    });
    let reply = Reply::Bulk(Bytes::from(vec![b'y'; 100]));
    group.bench_function("encode 16 bulk replies", |b| {
        let mut out = BytesMut::with_capacity(4096);
        b.iter(|| {
            out.clear();
            for _ in 0..16 {
                reply.encode(Protocol::Resp2, &mut out);
            }
            black_box(&out);
        })
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|i| format!("user:{i}:profile")).collect();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("key → partition", |b| {
        b.iter(|| {
            keys.iter()
                .map(|k| u32::from(key_partition(k.as_bytes(), 256)))
                .sum::<u32>()
        })
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    let envelope = RequestEnvelope {
        id: 42,
        request: WorkerRequest::Set {
            collection: 0,
            key: Key {
                partition: 17,
                bytes: b"key:000000000001".to_vec(),
            },
            value: vec![b'x'; 100],
            condition: SetCondition::Always,
            reply: SetReply::Status,
            expiry: Expiry::Clear,
        },
    };
    let mut encoded = Vec::new();
    encode_frame(&envelope, &mut encoded).unwrap();
    let mut group = c.benchmark_group("frame");
    group.bench_function("encode SET", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            encode_frame(black_box(&envelope), &mut out).unwrap();
        })
    });
    group.bench_function("decode SET", |b| {
        b.iter(|| black_box(decode_frame::<RequestEnvelope>(black_box(&encoded)).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, resp, routing, frames);
criterion_main!(benches);
