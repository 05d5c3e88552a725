//! Differential test: seeded random sequences of string and keyspace commands run
//! against Shoal and against a real `redis-server`, side by side, on one connection
//! each. Every reply must match, byte for byte (RESP2, errors by their full text),
//! except where docs/compatibility.md lists an intended difference; those few
//! replies are compared by the looser rule written next to the command below.
//!
//! - Both servers are started by the test, on free loopback ports.
//! - The key space is small (20 keys, some sharing a `{hash tag}`, so multi-key
//!   commands both stay on one worker and span workers) and two collections are
//!   used (SELECT 0/1), so commands keep running into each other's keys.
//! - Values are small: integers, floats, negative numbers, empty and binary strings.
//! - Expiry uses long TTLs (1000 s and more) or times in the past, so timing never
//!   decides a reply; TTL, PTTL, EXPIRETIME and PEXPIRETIME are compared within a
//!   tolerance.
//! - A SCAN is iterated from cursor 0 to the end on each server, and the two sets
//!   of keys are compared (the cursors themselves differ).
//! - Each command in [`specs`] can be switched off, and a command that Shoal answers
//!   with `ERR unknown command` (or "not supported") is left out automatically: the
//!   test probes each one once at startup and prints which it skipped.
//!
//! Environment:
//! - `SHOAL_DIFF_SEED=n`: the first seed (default: derived from the clock). The
//!   seed is printed, and a failure names the seed that reproduces it.
//! - `SHOAL_DIFF_SEEDS=n` (default 3) and `SHOAL_DIFF_COMMANDS=n` (default 2000):
//!   how many seeds, and how many commands per seed.
//! - `SHOAL_DIFF_HISTORY=n` (default 20): how many commands a failure report shows.
//!
//! Reproduce a failure: `SHOAL_DIFF_SEED=<seed> SHOAL_DIFF_SEEDS=1 cargo test --test differential -- --nocapture`.

mod common;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use common::{RawConn, RedisServer, Resp, Server};

/// How many commands before a mismatch the failure report shows (`SHOAL_DIFF_HISTORY`).
const HISTORY: usize = 20;

/// The key space. Keys `k0`..`k9` spread over the workers; `{user}*` and `{x}*`
/// each share a slot (so one worker holds them all); the rest are awkward names.
const KEYS: &[&[u8]] = &[
    b"k0",
    b"k1",
    b"k2",
    b"k3",
    b"k4",
    b"k5",
    b"k6",
    b"k7",
    b"k8",
    b"k9",
    b"{user}a",
    b"{user}b",
    b"{user}c",
    b"{x}1",
    b"{x}2",
    b"bin\x00\xff\r\nkey",
    b"key with spaces",
    b"{}k",
    b"a{b",
    b"",
];

/// SORT's own keys, which only SORT's specs write (and FLUSHDB/FLUSHALL empty): a list, a
/// set and a sorted set of numbers, a list of words, and a destination for STORE.
const SORT_KEYS: &[&[u8]] = &[b"{s}l", b"{s}s", b"zs", b"{s}w", b"{s}d"];

/// Where BITOP mostly stores its result; only BITOP's spec writes it.
const BITOP_DESTINATION: &[u8] = b"{b}dest";

/// Commands Shoal has had since its first version: the probe must never find them
/// missing, so that losing one fails the test instead of skipping it.
const ALWAYS_SUPPORTED: &[&str] = &[
    "PING",
    "ECHO",
    "SELECT",
    "DBSIZE",
    "GET",
    "SET",
    "SETNX",
    "GETSET",
    "GETDEL",
    "DEL",
    "UNLINK",
    "EXISTS",
    "MGET",
    "INCR",
    "DECR",
    "INCRBY",
    "DECRBY",
    "INCRBYFLOAT",
    "APPEND",
    "STRLEN",
];

/// Collections (Redis databases) the sequences use.
const COLLECTIONS: &[&str] = &["0", "1"];

/// Seconds and milliseconds of slack between the two servers' TTL and PTTL replies:
/// the same command reaches them a moment apart.
const TTL_TOLERANCE_SECS: i64 = 2;
const PTTL_TOLERANCE_MS: i64 = 2000;

// ---------------------------------------------------------------- the commands

/// How the two replies to a command are compared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Compare {
    /// Byte for byte.
    Exact,
    /// Nil against nil, an error against the same error, any bulk against any bulk and
    /// any integer against any integer (OBJECT ENCODING: Shoal always answers `raw`;
    /// DUMP, RANDOMKEY, MEMORY USAGE; docs/compatibility.md).
    Existence,
    /// Integers equal, or both non-negative and at most this far apart (TTL, PTTL).
    Within(i64),
    /// Arrays equal once sorted (KEYS, SMEMBERS: the order is unspecified).
    Unordered,
    /// Flat arrays of pairs equal once the pairs are sorted (HGETALL).
    UnorderedPairs,
    /// The same kind of reply, and arrays of the same length (random picks:
    /// SRANDMEMBER, HRANDFIELD, ZRANDMEMBER with repeats).
    SameShape,
    /// The command is a SCAN from cursor 0, and it is iterated to the end on each
    /// server: the sets of keys returned must be equal. Cursors are opaque and
    /// differ (Shoal's encode a position in each partition; docs/compatibility.md),
    /// and so does the order; an error reply must match exactly.
    FullScan,
    /// SORT ... BY nosort, which keeps a list's or sorted set's order (compared byte for
    /// byte) and a set's own order, which differs between the servers: for a set (asked
    /// of redis-server with TYPE first) the elements are compared as a set, or by count
    /// alone under a LIMIT (which takes different elements).
    StoredOrder,
}

/// Most SCAN calls one full iteration may take before the test calls it endless.
const MAX_SCAN_CALLS: usize = 1000;

/// One command (or one form of a command) the sequences may use.
struct Spec {
    /// What the skip list and the summary call it.
    label: &'static str,
    /// Switch a command off here while it is known to differ.
    enabled: bool,
    /// Relative frequency (FLUSHDB and FLUSHALL, at 1, empty the key space about once
    /// every 250 commands).
    weight: u32,
    /// Sent once to Shoal at startup: an `ERR unknown command` (or "not supported")
    /// answer leaves this command out.
    probe: &'static [&'static str],
    compare: Compare,
    generate: fn(&mut Gen) -> Vec<Vec<u8>>,
}

/// Every command the differential test knows, with its generator.
fn specs() -> Vec<Spec> {
    use Compare::*;
    let spec = |label, weight, probe, compare, generate| Spec {
        label,
        enabled: true,
        weight,
        probe,
        compare,
        generate,
    };
    vec![
        // Connection and server.
        spec("PING", 2, &["PING"], Exact, |g| match g.chance(2) {
            true => g.cmd("PING", &[]),
            false => {
                let message = g.value();
                g.cmd("PING", &[message])
            }
        }),
        spec("ECHO", 2, &["ECHO", "x"], Exact, |g| {
            let message = g.value();
            g.cmd("ECHO", &[message])
        }),
        spec("SELECT", 12, &["SELECT", "0"], Exact, |g| {
            let index = match g.below(20) {
                0 => g
                    .pick(&["16", "-1", "x", "1.0", "99999999999999999999"])
                    .as_bytes()
                    .to_vec(),
                _ => g.pick(COLLECTIONS).as_bytes().to_vec(),
            };
            g.cmd("SELECT", &[index])
        }),
        spec("DBSIZE", 6, &["DBSIZE"], Exact, |g| g.cmd("DBSIZE", &[])),
        spec("arity errors", 3, &["PING"], Exact, |g| {
            // A command with none of its required arguments. The name is one whose
            // command is enabled, so an unknown command never gets here.
            let name = g.pick_owned(&g.needs_args.clone());
            g.cmd(&name, &[])
        }),
        // Strings.
        spec("GET", 24, &["GET", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("GET", &[key])
        }),
        spec("SET", 40, &["SET", "k0", "v"], Exact, |g| {
            let (key, value) = (g.key(), g.value());
            let mut args = vec![key, value];
            args.extend(g.options(&[
                opt(&[b"NX"]),
                opt(&[b"XX"]),
                opt(&[b"GET"]),
                opt(&[b"KEEPTTL"]),
            ]));
            g.cmd("SET", &args)
        }),
        spec("SETNX", 10, &["SETNX", "k0", "v"], Exact, |g| {
            let (key, value) = (g.key(), g.value());
            g.cmd("SETNX", &[key, value])
        }),
        spec("GETSET", 10, &["GETSET", "k0", "v"], Exact, |g| {
            let (key, value) = (g.key(), g.value());
            g.cmd("GETSET", &[key, value])
        }),
        spec("GETDEL", 6, &["GETDEL", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("GETDEL", &[key])
        }),
        spec("DEL", 8, &["DEL", "k0"], Exact, |g| {
            let keys = g.keys(1, 4);
            g.cmd("DEL", &keys)
        }),
        spec("UNLINK", 4, &["UNLINK", "k0"], Exact, |g| {
            let keys = g.keys(1, 4);
            g.cmd("UNLINK", &keys)
        }),
        spec("EXISTS", 12, &["EXISTS", "k0"], Exact, |g| {
            let keys = g.keys(1, 4);
            g.cmd("EXISTS", &keys)
        }),
        spec("MGET", 12, &["MGET", "k0"], Exact, |g| {
            let keys = g.keys(1, 5);
            g.cmd("MGET", &keys)
        }),
        spec("INCR", 12, &["INCR", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("INCR", &[key])
        }),
        spec("DECR", 8, &["DECR", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("DECR", &[key])
        }),
        spec("INCRBY", 12, &["INCRBY", "k0", "1"], Exact, |g| {
            let (key, delta) = (g.key(), g.integer_arg());
            g.cmd("INCRBY", &[key, delta])
        }),
        spec("DECRBY", 8, &["DECRBY", "k0", "1"], Exact, |g| {
            let (key, delta) = (g.key(), g.integer_arg());
            g.cmd("DECRBY", &[key, delta])
        }),
        spec("INCRBYFLOAT", 12, &["INCRBYFLOAT", "k0", "1"], Exact, |g| {
            let (key, delta) = (g.key(), g.float_arg());
            g.cmd("INCRBYFLOAT", &[key, delta])
        }),
        spec("APPEND", 12, &["APPEND", "k0", "v"], Exact, |g| {
            let (key, value) = (g.key(), g.value());
            g.cmd("APPEND", &[key, value])
        }),
        spec("STRLEN", 8, &["STRLEN", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("STRLEN", &[key])
        }),
        // Being added (issue 3): skipped until Shoal knows them.
        spec("MSET", 16, &["MSET", "k0", "v"], Exact, |g| {
            let args = g.pairs();
            g.cmd("MSET", &args)
        }),
        spec("MSETNX", 8, &["MSETNX", "k0", "v"], Exact, |g| {
            let args = g.pairs();
            g.cmd("MSETNX", &args)
        }),
        spec("GETRANGE", 10, &["GETRANGE", "k0", "0", "-1"], Exact, |g| {
            let (key, start, end) = (g.key(), g.range_index(), g.range_index());
            g.cmd("GETRANGE", &[key, start, end])
        }),
        spec("SETRANGE", 10, &["SETRANGE", "k0", "0", "v"], Exact, |g| {
            let key = g.key();
            let offset = match g.below(15) {
                0 => g.pick(&["-1", "x", "1.5", "1000"]).as_bytes().to_vec(),
                _ => g.below(24).to_string().into_bytes(),
            };
            let value = g.value();
            g.cmd("SETRANGE", &[key, offset, value])
        }),
        spec("SUBSTR", 4, &["SUBSTR", "k0", "0", "-1"], Exact, |g| {
            let (key, start, end) = (g.key(), g.range_index(), g.range_index());
            g.cmd("SUBSTR", &[key, start, end])
        }),
        spec("SETEX", 6, &["SETEX", "k0", "1000", "v"], Exact, |g| {
            let (key, seconds, value) = (g.key(), g.seconds(), g.value());
            g.cmd("SETEX", &[key, seconds, value])
        }),
        spec("PSETEX", 4, &["PSETEX", "k0", "1000000", "v"], Exact, |g| {
            let (key, millis, value) = (g.key(), g.millis(), g.value());
            g.cmd("PSETEX", &[key, millis, value])
        }),
        spec("TOUCH", 4, &["TOUCH", "k0"], Exact, |g| {
            let keys = g.keys(1, 4);
            g.cmd("TOUCH", &keys)
        }),
        // Bits and LCS.
        spec("GETBIT", 8, &["GETBIT", "k0", "0"], Exact, |g| {
            let (key, offset) = (g.key(), g.bit_offset());
            g.cmd("GETBIT", &[key, offset])
        }),
        spec("SETBIT", 8, &["SETBIT", "k0", "0", "1"], Exact, |g| {
            let (key, offset) = (g.key(), g.bit_offset());
            let bit = match g.below(12) {
                0 => g.pick(&["2", "-1", "x", ""]).as_bytes().to_vec(),
                n => (n % 2).to_string().into_bytes(),
            };
            g.cmd("SETBIT", &[key, offset, bit])
        }),
        spec("BITCOUNT", 8, &["BITCOUNT", "k0"], Exact, |g| {
            let key = g.key();
            let mut args = vec![key];
            match g.below(6) {
                0 => {}
                1 => args.push(g.range_index()),
                _ => {
                    args.extend([g.range_index(), g.range_index()]);
                    if g.chance(2) {
                        args.push(
                            g.pick(&["BYTE", "BIT", "bit", "nibble"])
                                .as_bytes()
                                .to_vec(),
                        );
                    }
                }
            }
            g.cmd("BITCOUNT", &args)
        }),
        spec("BITPOS", 8, &["BITPOS", "k0", "1"], Exact, |g| {
            let key = g.key();
            let bit = g.pick(&["0", "1", "1", "0", "2", "x"]).as_bytes().to_vec();
            let mut args = vec![key, bit];
            let extra = g.below(5);
            if extra >= 1 {
                args.push(g.range_index());
            }
            if extra >= 2 {
                args.push(g.range_index());
            }
            if extra >= 3 {
                args.push(g.pick(&["BYTE", "BIT", "byte", "bits"]).as_bytes().to_vec());
            }
            g.cmd("BITPOS", &args)
        }),
        spec("LCS", 6, &["LCS", "k0", "k1"], Exact, |g| {
            let (a, b) = (g.key(), g.key());
            let mut args = vec![a, b];
            args.extend(g.options(&[
                opt(&[b"LEN"]),
                opt(&[b"IDX"]),
                opt(&[b"WITHMATCHLEN"]),
                opt(&[b"MINMATCHLEN", b"2"]),
                opt(&[b"MINMATCHLEN", b"x"]),
            ]));
            g.cmd("LCS", &args)
        }),
        // BITOP answers only the result's length: half of the time this spec reads its
        // own destination instead, so that the stored bytes are compared too.
        spec("BITOP", 10, &["BITOP", "AND", "k0", "k1"], Exact, |g| {
            if g.chance(2) {
                return g.cmd("GET", &[BITOP_DESTINATION.to_vec()]);
            }
            let op = g.pick(&["AND", "OR", "XOR", "NOT", "and", "Xor", "NOT", "nand"]);
            let destination = match g.chance(4) {
                true => g.key(),
                false => BITOP_DESTINATION.to_vec(),
            };
            let mut sources = match op.eq_ignore_ascii_case("not") && !g.chance(8) {
                true => vec![g.key()],
                false => g.keys(1, 3),
            };
            if g.chance(4) {
                sources.push(BITOP_DESTINATION.to_vec());
            }
            let mut args = vec![op.as_bytes().to_vec(), destination];
            args.extend(sources);
            g.cmd("BITOP", &args)
        }),
        spec(
            "BITFIELD",
            14,
            &["BITFIELD", "k0", "GET", "u8", "0"],
            Exact,
            |g| {
                let mut args = vec![g.key()];
                if g.chance(2) {
                    let mode = g.pick(&["WRAP", "SAT", "FAIL", "sat"]);
                    args.extend([b"OVERFLOW".to_vec(), mode.into()]);
                }
                for _ in 0..1 + g.below(4) {
                    match g.below(12) {
                        0..=2 => {
                            let (kind, offset) = (g.bitfield_type(), g.bitfield_offset());
                            args.extend([b"GET".to_vec(), kind, offset]);
                        }
                        3..=4 => {
                            let (kind, offset) = (g.bitfield_type(), g.bitfield_offset());
                            let value = g.bitfield_value();
                            args.extend([b"SET".to_vec(), kind, offset, value]);
                        }
                        5..=7 => {
                            let (kind, offset) = (g.bitfield_type(), g.bitfield_offset());
                            let value = g.bitfield_value();
                            args.extend([
                                g.pick(&["INCRBY", "incrby"]).into(),
                                kind,
                                offset,
                                value,
                            ]);
                        }
                        8..=10 => {
                            let mode = g.pick(&["WRAP", "SAT", "FAIL", "fail", "sat", "bounce"]);
                            args.extend([b"OVERFLOW".to_vec(), mode.into()]);
                        }
                        _ => args.push(g.pick(&["GET", "SET", "OVERFLOW", "DECRBY"]).into()),
                    }
                }
                g.cmd("BITFIELD", &args)
            },
        ),
        spec(
            "BITFIELD_RO",
            4,
            &["BITFIELD_RO", "k0", "GET", "u8", "0"],
            Exact,
            |g| {
                let mut args = vec![g.key()];
                for _ in 0..g.below(4) {
                    let (kind, offset) = (g.bitfield_type(), g.bitfield_offset());
                    args.extend([b"GET".to_vec(), kind, offset]);
                }
                if g.chance(6) {
                    let (kind, offset) = (g.bitfield_type(), g.bitfield_offset());
                    args.extend([b"SET".to_vec(), kind, offset, b"1".to_vec()]);
                }
                g.cmd("BITFIELD_RO", &args)
            },
        ),
        spec("MOVE", 6, &["MOVE", "k0", "1"], Exact, |g| {
            let key = g.key();
            let db = match g.below(10) {
                0 => g.pick(&["16", "-1", "x"]).as_bytes().to_vec(),
                _ => g.pick(COLLECTIONS).as_bytes().to_vec(),
            };
            g.cmd("MOVE", &[key, db])
        }),
        spec("SWAPDB", 3, &["SWAPDB", "0", "1"], Exact, |g| {
            let mut db = || match g.below(10) {
                0 => g.pick(&["16", "-1", "x"]).as_bytes().to_vec(),
                _ => g.pick(COLLECTIONS).as_bytes().to_vec(),
            };
            let (a, b) = (db(), db());
            g.cmd("SWAPDB", &[a, b])
        }),
        // The payloads differ by design (docs/compatibility.md): compared by existence.
        spec("DUMP", 3, &["DUMP", "k0"], Existence, |g| {
            let key = g.key();
            g.cmd("DUMP", &[key])
        }),
        spec("RANDOMKEY", 3, &["RANDOMKEY"], Existence, |g| {
            g.cmd("RANDOMKEY", &[])
        }),
        spec(
            "MEMORY USAGE",
            3,
            &["MEMORY", "USAGE", "k0"],
            Existence,
            |g| {
                let key = g.key();
                g.cmd("MEMORY", &[b"USAGE".to_vec(), key])
            },
        ),
        spec("OBJECT FREQ", 2, &["OBJECT", "FREQ", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("OBJECT", &[b"FREQ".to_vec(), key])
        }),
        spec("TYPE", 6, &["TYPE", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("TYPE", &[key])
        }),
        spec("RENAME", 10, &["RENAME", "k0", "k0"], Exact, |g| {
            let (from, to) = (g.key(), g.key());
            g.cmd("RENAME", &[from, to])
        }),
        spec("RENAMENX", 6, &["RENAMENX", "k0", "k0"], Exact, |g| {
            let (from, to) = (g.key(), g.key());
            g.cmd("RENAMENX", &[from, to])
        }),
        spec("COPY", 10, &["COPY", "k0", "k1"], Exact, |g| {
            let (from, to) = (g.key(), g.key());
            let mut args = vec![from, to];
            if g.chance(2) {
                args.push(b"REPLACE".to_vec());
            }
            g.cmd("COPY", &args)
        }),
        spec("COPY DB", 4, &["COPY", "k0", "k1", "DB", "1"], Exact, |g| {
            let (from, to) = (g.key(), g.key());
            let db = g.pick(COLLECTIONS).as_bytes().to_vec();
            let mut args = vec![from, to, b"DB".to_vec(), db];
            if g.chance(2) {
                args.push(b"REPLACE".to_vec());
            }
            g.cmd("COPY", &args)
        }),
        spec(
            "OBJECT ENCODING",
            3,
            &["OBJECT", "ENCODING", "k0"],
            Existence,
            |g| {
                let key = g.key();
                g.cmd("OBJECT", &[b"ENCODING".to_vec(), key])
            },
        ),
        spec(
            "SET EX|PX|EXAT|PXAT",
            20,
            &["SET", "k0", "v", "EX", "1000"],
            Exact,
            |g| {
                // No EXAT/PXAT in the past: Redis stores such a key and counts it in DBSIZE
                // until it reclaims it, Shoal never does (docs/compatibility.md).
                let (key, value) = (g.key(), g.value());
                let (ex, px, exat, pxat) = (
                    g.seconds(),
                    g.millis(),
                    g.unix_seconds(false),
                    g.unix_millis(false),
                );
                let mut args = vec![key, value];
                let expiry = [
                    opt(&[b"EX", &ex]),
                    opt(&[b"PX", &px]),
                    opt(&[b"EXAT", &exat]),
                    opt(&[b"PXAT", &pxat]),
                ];
                let mut pool = vec![opt(&[b"NX"]), opt(&[b"XX"]), opt(&[b"GET"])];
                if g.chance(8) {
                    pool.push(opt(&[b"KEEPTTL"])); // a syntax error with an expiry
                }
                pool.push(g.pick_owned(&expiry));
                // At least one expiry; now and then a second (a syntax error unless it is
                // the same kind).
                let mut options = g.options(&pool);
                let has_expiry = options
                    .iter()
                    .any(|o| matches!(o.as_slice(), b"EX" | b"PX" | b"EXAT" | b"PXAT"));
                if !has_expiry || g.chance(8) {
                    options.extend(g.pick_owned(&expiry));
                }
                args.extend(options);
                g.cmd("SET", &args)
            },
        ),
        spec("GETEX", 12, &["GETEX", "k0"], Exact, |g| {
            let key = g.key();
            let (ex, px, exat, pxat) = (
                g.seconds(),
                g.millis(),
                g.unix_seconds(true),
                g.unix_millis(true),
            );
            let mut args = vec![key];
            match g.below(7) {
                0 => {}
                1 => args.extend([b"EX".to_vec(), ex]),
                2 => args.extend([b"PX".to_vec(), px]),
                3 => args.extend([b"EXAT".to_vec(), exat]),
                4 => args.extend([b"PXAT".to_vec(), pxat]),
                5 => args.push(b"PERSIST".to_vec()),
                _ => args.extend([b"EX".to_vec(), ex, b"PERSIST".to_vec()]),
            }
            g.cmd("GETEX", &args)
        }),
        spec("EXPIRE", 16, &["EXPIRE", "k0", "1000"], Exact, |g| {
            let (key, seconds) = (g.key(), g.seconds());
            g.cmd("EXPIRE", &[key, seconds])
        }),
        spec("PEXPIRE", 8, &["PEXPIRE", "k0", "1000000"], Exact, |g| {
            let (key, millis) = (g.key(), g.millis());
            g.cmd("PEXPIRE", &[key, millis])
        }),
        spec("EXPIREAT", 8, &["EXPIREAT", "k0", "1"], Exact, |g| {
            let (key, at) = (g.key(), g.unix_seconds(true));
            g.cmd("EXPIREAT", &[key, at])
        }),
        spec("PEXPIREAT", 8, &["PEXPIREAT", "k0", "1"], Exact, |g| {
            let (key, at) = (g.key(), g.unix_millis(true));
            g.cmd("PEXPIREAT", &[key, at])
        }),
        spec("TTL", 16, &["TTL", "k0"], Within(TTL_TOLERANCE_SECS), |g| {
            let key = g.key();
            g.cmd("TTL", &[key])
        }),
        spec(
            "PTTL",
            10,
            &["PTTL", "k0"],
            Within(PTTL_TOLERANCE_MS),
            |g| {
                let key = g.key();
                g.cmd("PTTL", &[key])
            },
        ),
        spec("PERSIST", 8, &["PERSIST", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("PERSIST", &[key])
        }),
        spec(
            "KEYS",
            6,
            &["KEYS", "nothing-matches-this"],
            Unordered,
            |g| {
                let pattern = g.pick(&[
                    "*", "k*", "k?", "{user}*", "\\{x\\}*", "k[0-4]", "k[^0-4]", "*e*", "?", "",
                    "*\\**", "[a-k]*",
                ]);
                g.cmd("KEYS", &[pattern.as_bytes().to_vec()])
            },
        ),
        spec(
            "EXPIRETIME",
            6,
            &["EXPIRETIME", "k0"],
            Within(TTL_TOLERANCE_SECS),
            |g| {
                let key = g.key();
                g.cmd("EXPIRETIME", &[key])
            },
        ),
        spec(
            "PEXPIRETIME",
            4,
            &["PEXPIRETIME", "k0"],
            Within(PTTL_TOLERANCE_MS),
            |g| {
                let key = g.key();
                g.cmd("PEXPIRETIME", &[key])
            },
        ),
        spec("SCAN", 6, &["SCAN", "0"], FullScan, |g| {
            let mut args = vec![b"0".to_vec()];
            if g.chance(2) {
                let pattern = g.pick(&["*", "k*", "{user}*", "k[0-4]", "*e*", "?", "nothing*"]);
                args.extend([b"MATCH".to_vec(), pattern.as_bytes().to_vec()]);
            }
            if g.chance(2) {
                let count = g.pick(&["1", "3", "10", "1000", "0", "-1", "x"]);
                args.extend([b"COUNT".to_vec(), count.as_bytes().to_vec()]);
            }
            if g.chance(4) {
                let kind = g.pick(&["string", "STRING", "list", "hash"]);
                args.extend([b"TYPE".to_vec(), kind.as_bytes().to_vec()]);
            }
            g.cmd("SCAN", &args)
        }),
        // Hashes.
        spec("HSET", 20, &["HSET", "k0", "f", "v"], Exact, |g| {
            let mut args = vec![g.key()];
            for _ in 0..1 + g.below(3) {
                args.push(g.field());
                args.push(g.value());
            }
            if g.chance(25) {
                args.pop();
            }
            let name = g.pick(&["HSET", "HMSET"]);
            g.cmd(name, &args)
        }),
        spec("HSETNX", 4, &["HSETNX", "k0", "f", "v"], Exact, |g| {
            let (key, field, value) = (g.key(), g.field(), g.value());
            g.cmd("HSETNX", &[key, field, value])
        }),
        spec("HGET", 10, &["HGET", "k0", "f"], Exact, |g| {
            let (key, field) = (g.key(), g.field());
            g.cmd("HGET", &[key, field])
        }),
        spec("HMGET", 6, &["HMGET", "k0", "f"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 4));
            g.cmd("HMGET", &args)
        }),
        spec("HDEL", 8, &["HDEL", "k0", "f"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 3));
            g.cmd("HDEL", &args)
        }),
        spec("HEXISTS", 4, &["HEXISTS", "k0", "f"], Exact, |g| {
            let (key, field) = (g.key(), g.field());
            g.cmd("HEXISTS", &[key, field])
        }),
        spec("HLEN", 4, &["HLEN", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("HLEN", &[key])
        }),
        spec("HSTRLEN", 3, &["HSTRLEN", "k0", "f"], Exact, |g| {
            let (key, field) = (g.key(), g.field());
            g.cmd("HSTRLEN", &[key, field])
        }),
        spec("HGETALL", 6, &["HGETALL", "k0"], UnorderedPairs, |g| {
            let key = g.key();
            g.cmd("HGETALL", &[key])
        }),
        spec("HKEYS", 3, &["HKEYS", "k0"], Unordered, |g| {
            let key = g.key();
            g.cmd("HKEYS", &[key])
        }),
        spec("HVALS", 3, &["HVALS", "k0"], Unordered, |g| {
            let key = g.key();
            g.cmd("HVALS", &[key])
        }),
        spec("HINCRBY", 6, &["HINCRBY", "k0", "f", "1"], Exact, |g| {
            let (key, field, delta) = (g.key(), g.field(), g.integer_arg());
            g.cmd("HINCRBY", &[key, field, delta])
        }),
        spec(
            "HINCRBYFLOAT",
            6,
            &["HINCRBYFLOAT", "k0", "f", "1"],
            Exact,
            |g| {
                let (key, field, delta) = (g.key(), g.field(), g.float_arg());
                g.cmd("HINCRBYFLOAT", &[key, field, delta])
            },
        ),
        spec("HRANDFIELD", 3, &["HRANDFIELD", "k0"], SameShape, |g| {
            let mut args = vec![g.key()];
            if g.chance(2) {
                args.push(g.count());
                if g.chance(2) {
                    args.push(b"WITHVALUES".to_vec());
                }
            }
            g.cmd("HRANDFIELD", &args)
        }),
        // Lists.
        spec("LPUSH", 12, &["LPUSH", "k0", "v"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 3));
            let name = g.pick(&["LPUSH", "RPUSH", "LPUSHX", "RPUSHX", "RPUSH"]);
            g.cmd(name, &args)
        }),
        spec("LPOP", 8, &["LPOP", "k0"], Exact, |g| {
            let mut args = vec![g.key()];
            if g.chance(3) {
                args.push(g.count());
            }
            let name = g.pick(&["LPOP", "RPOP"]);
            g.cmd(name, &args)
        }),
        spec("LLEN", 4, &["LLEN", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("LLEN", &[key])
        }),
        spec("LINDEX", 6, &["LINDEX", "k0", "0"], Exact, |g| {
            let (key, index) = (g.key(), g.index());
            g.cmd("LINDEX", &[key, index])
        }),
        spec("LSET", 4, &["LSET", "k0", "0", "v"], Exact, |g| {
            let (key, index, value) = (g.key(), g.index(), g.field());
            g.cmd("LSET", &[key, index, value])
        }),
        spec("LRANGE", 8, &["LRANGE", "k0", "0", "-1"], Exact, |g| {
            let (key, start, stop) = (g.key(), g.index(), g.index());
            g.cmd("LRANGE", &[key, start, stop])
        }),
        spec("LTRIM", 3, &["LTRIM", "k0", "0", "-1"], Exact, |g| {
            let (key, start, stop) = (g.key(), g.index(), g.index());
            g.cmd("LTRIM", &[key, start, stop])
        }),
        spec("LREM", 4, &["LREM", "k0", "0", "v"], Exact, |g| {
            let (key, count, value) = (g.key(), g.index(), g.field());
            g.cmd("LREM", &[key, count, value])
        }),
        spec(
            "LINSERT",
            4,
            &["LINSERT", "k0", "BEFORE", "a", "v"],
            Exact,
            |g| {
                let key = g.key();
                let place = g
                    .pick(&["BEFORE", "AFTER", "after", "middle"])
                    .as_bytes()
                    .to_vec();
                let (pivot, value) = (g.field(), g.field());
                g.cmd("LINSERT", &[key, place, pivot, value])
            },
        ),
        spec("LPOS", 4, &["LPOS", "k0", "v"], Exact, |g| {
            let (key, value) = (g.key(), g.field());
            let mut args = vec![key, value];
            for (option, chance) in [("RANK", 3), ("COUNT", 3), ("MAXLEN", 5)] {
                if g.chance(chance) {
                    args.push(option.as_bytes().to_vec());
                    args.push(g.index());
                }
            }
            g.cmd("LPOS", &args)
        }),
        // Sets.
        spec("SADD", 14, &["SADD", "k0", "m"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 4));
            g.cmd("SADD", &args)
        }),
        spec("SREM", 6, &["SREM", "k0", "m"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 3));
            g.cmd("SREM", &args)
        }),
        spec("SISMEMBER", 4, &["SISMEMBER", "k0", "m"], Exact, |g| {
            let (key, member) = (g.key(), g.field());
            g.cmd("SISMEMBER", &[key, member])
        }),
        spec("SMISMEMBER", 3, &["SMISMEMBER", "k0", "m"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 3));
            g.cmd("SMISMEMBER", &args)
        }),
        spec("SCARD", 4, &["SCARD", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("SCARD", &[key])
        }),
        spec("SMEMBERS", 6, &["SMEMBERS", "k0"], Unordered, |g| {
            let key = g.key();
            g.cmd("SMEMBERS", &[key])
        }),
        // Random picks that take every member are deterministic; others only by shape.
        spec("SRANDMEMBER", 3, &["SRANDMEMBER", "k0"], SameShape, |g| {
            let mut args = vec![g.key()];
            if g.chance(2) {
                args.push(g.count());
            }
            g.cmd("SRANDMEMBER", &args)
        }),
        spec("SPOP all", 2, &["SPOP", "k0", "100"], Unordered, |g| {
            let key = g.key();
            g.cmd("SPOP", &[key, b"100".to_vec()])
        }),
        // Sorted sets.
        spec("ZADD", 16, &["ZADD", "k0", "1", "m"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.options(&[
                opt(&[b"NX"]),
                opt(&[b"XX"]),
                opt(&[b"GT"]),
                opt(&[b"LT"]),
                opt(&[b"CH"]),
                opt(&[b"INCR"]),
            ]));
            for _ in 0..1 + g.below(3) {
                args.push(g.score());
                args.push(g.field());
            }
            g.cmd("ZADD", &args)
        }),
        spec("ZINCRBY", 5, &["ZINCRBY", "k0", "1", "m"], Exact, |g| {
            let (key, score, member) = (g.key(), g.score(), g.field());
            g.cmd("ZINCRBY", &[key, score, member])
        }),
        spec("ZREM", 5, &["ZREM", "k0", "m"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 3));
            g.cmd("ZREM", &args)
        }),
        spec("ZSCORE", 5, &["ZSCORE", "k0", "m"], Exact, |g| {
            let (key, member) = (g.key(), g.field());
            g.cmd("ZSCORE", &[key, member])
        }),
        spec("ZMSCORE", 3, &["ZMSCORE", "k0", "m"], Exact, |g| {
            let mut args = vec![g.key()];
            args.extend(g.fields(1, 3));
            g.cmd("ZMSCORE", &args)
        }),
        spec("ZCARD", 3, &["ZCARD", "k0"], Exact, |g| {
            let key = g.key();
            g.cmd("ZCARD", &[key])
        }),
        spec("ZCOUNT", 4, &["ZCOUNT", "k0", "-inf", "+inf"], Exact, |g| {
            let (key, min, max) = (g.key(), g.score_bound(), g.score_bound());
            g.cmd("ZCOUNT", &[key, min, max])
        }),
        spec("ZLEXCOUNT", 3, &["ZLEXCOUNT", "k0", "-", "+"], Exact, |g| {
            let (key, min, max) = (g.key(), g.lex_bound(), g.lex_bound());
            g.cmd("ZLEXCOUNT", &[key, min, max])
        }),
        spec("ZRANK", 4, &["ZRANK", "k0", "m"], Exact, |g| {
            let (key, member) = (g.key(), g.field());
            let name = g.pick(&["ZRANK", "ZREVRANK"]);
            g.cmd(name, &[key, member])
        }),
        spec("ZRANGE", 10, &["ZRANGE", "k0", "0", "-1"], Exact, |g| {
            let key = g.key();
            let mut args = vec![key];
            match g.below(3) {
                0 => {
                    args.extend([g.index(), g.index()]);
                    args.extend(g.options(&[opt(&[b"REV"]), opt(&[b"WITHSCORES"])]));
                }
                1 => {
                    args.extend([g.score_bound(), g.score_bound(), b"BYSCORE".to_vec()]);
                    args.extend(g.options(&[
                        opt(&[b"REV"]),
                        opt(&[b"WITHSCORES"]),
                        opt(&[b"LIMIT", b"1", b"2"]),
                        opt(&[b"LIMIT", b"0", b"-1"]),
                    ]));
                }
                _ => {
                    args.extend([g.lex_bound(), g.lex_bound(), b"BYLEX".to_vec()]);
                    args.extend(g.options(&[opt(&[b"REV"]), opt(&[b"LIMIT", b"1", b"1"])]));
                }
            }
            g.cmd("ZRANGE", &args)
        }),
        spec(
            "ZRANGEBYSCORE",
            5,
            &["ZRANGEBYSCORE", "k0", "-inf", "+inf"],
            Exact,
            |g| {
                let (key, min, max) = (g.key(), g.score_bound(), g.score_bound());
                let mut args = vec![key, min, max];
                args.extend(g.options(&[opt(&[b"WITHSCORES"]), opt(&[b"LIMIT", b"1", b"3"])]));
                let name = g.pick(&["ZRANGEBYSCORE", "ZREVRANGEBYSCORE"]);
                g.cmd(name, &args)
            },
        ),
        spec(
            "ZRANGEBYLEX",
            3,
            &["ZRANGEBYLEX", "k0", "-", "+"],
            Exact,
            |g| {
                let (key, min, max) = (g.key(), g.lex_bound(), g.lex_bound());
                let name = g.pick(&["ZRANGEBYLEX", "ZREVRANGEBYLEX"]);
                g.cmd(name, &[key, min, max])
            },
        ),
        spec(
            "ZREVRANGE",
            3,
            &["ZREVRANGE", "k0", "0", "-1"],
            Exact,
            |g| {
                let (key, start, stop) = (g.key(), g.index(), g.index());
                let mut args = vec![key, start, stop];
                if g.chance(2) {
                    args.push(b"WITHSCORES".to_vec());
                }
                g.cmd("ZREVRANGE", &args)
            },
        ),
        spec(
            "ZREMRANGEBY*",
            3,
            &["ZREMRANGEBYRANK", "k0", "5", "6"],
            Exact,
            |g| {
                let key = g.key();
                match g.below(3) {
                    0 => {
                        let (start, stop) = (g.index(), g.index());
                        g.cmd("ZREMRANGEBYRANK", &[key, start, stop])
                    }
                    1 => {
                        let (min, max) = (g.score_bound(), g.score_bound());
                        g.cmd("ZREMRANGEBYSCORE", &[key, min, max])
                    }
                    _ => {
                        let (min, max) = (g.lex_bound(), g.lex_bound());
                        g.cmd("ZREMRANGEBYLEX", &[key, min, max])
                    }
                }
            },
        ),
        spec("ZPOPMIN", 4, &["ZPOPMIN", "k0"], Exact, |g| {
            let mut args = vec![g.key()];
            if g.chance(2) {
                args.push(g.count());
            }
            let name = g.pick(&["ZPOPMIN", "ZPOPMAX"]);
            g.cmd(name, &args)
        }),
        spec("ZRANDMEMBER", 2, &["ZRANDMEMBER", "k0"], SameShape, |g| {
            let mut args = vec![g.key()];
            if g.chance(2) {
                args.push(g.count());
                if g.chance(2) {
                    args.push(b"WITHSCORES".to_vec());
                }
            }
            g.cmd("ZRANDMEMBER", &args)
        }),
        // Commands over several typed keys.
        spec("SINTER", 4, &["SINTER", "k0"], Unordered, |g| {
            let keys = g.keys(1, 3);
            let name = g.pick(&["SINTER", "SUNION", "SDIFF"]);
            g.cmd(name, &keys)
        }),
        spec("SINTERSTORE", 3, &["SINTERSTORE", "k0", "k1"], Exact, |g| {
            let keys = g.keys(2, 4);
            let name = g.pick(&["SINTERSTORE", "SUNIONSTORE", "SDIFFSTORE"]);
            g.cmd(name, &keys)
        }),
        spec("SINTERCARD", 2, &["SINTERCARD", "1", "k0"], Exact, |g| {
            let keys = g.keys(1, 3);
            let mut args = vec![keys.len().to_string().into_bytes()];
            if g.chance(10) {
                args[0] = g.pick(&["0", "9", "x"]).as_bytes().to_vec();
            }
            args.extend(keys);
            if g.chance(2) {
                args.extend([b"LIMIT".to_vec(), g.count()]);
            }
            g.cmd("SINTERCARD", &args)
        }),
        // Moves between keys of one worker: the keys share a {hash tag}.
        spec(
            "SMOVE",
            4,
            &["SMOVE", "{user}a", "{user}b", "m"],
            Exact,
            |g| {
                let (from, to) = (g.tagged_key(), g.tagged_key());
                let member = g.field();
                g.cmd("SMOVE", &[from, to, member])
            },
        ),
        spec(
            "LMOVE",
            4,
            &["LMOVE", "{user}a", "{user}b", "LEFT", "LEFT"],
            Exact,
            |g| {
                let (from, to) = (g.tagged_key(), g.tagged_key());
                match g.chance(3) {
                    true => g.cmd("RPOPLPUSH", &[from, to]),
                    false => {
                        let a = g
                            .pick(&["LEFT", "RIGHT", "right", "up"])
                            .as_bytes()
                            .to_vec();
                        let b = g.pick(&["LEFT", "RIGHT", "left"]).as_bytes().to_vec();
                        g.cmd("LMOVE", &[from, to, a, b])
                    }
                }
            },
        ),
        spec(
            "BLMOVE",
            2,
            &["BLMOVE", "{user}a", "{user}b", "LEFT", "LEFT", "0.01"],
            Exact,
            |g| {
                let (from, to) = (g.tagged_key(), g.tagged_key());
                let timeout = g.pick(&["0.01", "0.01", "-1", "x"]).as_bytes().to_vec();
                match g.chance(2) {
                    true => g.cmd("BRPOPLPUSH", &[from, to, timeout]),
                    false => g.cmd(
                        "BLMOVE",
                        &[from, to, b"RIGHT".to_vec(), b"LEFT".to_vec(), timeout],
                    ),
                }
            },
        ),
        spec("LMPOP", 3, &["LMPOP", "1", "k0", "LEFT"], Exact, |g| {
            let keys = g.keys(1, 3);
            let zset = g.chance(2);
            let mut args = vec![keys.len().to_string().into_bytes()];
            args.extend(keys);
            let side = match zset {
                true => g.pick(&["MIN", "MAX", "LEFT"]),
                false => g.pick(&["LEFT", "RIGHT", "MIN"]),
            };
            args.push(side.as_bytes().to_vec());
            if g.chance(2) {
                args.extend([b"COUNT".to_vec(), g.count()]);
            }
            g.cmd(if zset { "ZMPOP" } else { "LMPOP" }, &args)
        }),
        spec("BLPOP", 3, &["BLPOP", "k0", "0.01"], Exact, |g| {
            let mut args = g.keys(1, 3);
            args.push(
                g.pick(&["0.01", "0.01", "0.01", "-1", "x"])
                    .as_bytes()
                    .to_vec(),
            );
            let name = g.pick(&["BLPOP", "BRPOP", "BZPOPMIN", "BZPOPMAX"]);
            g.cmd(name, &args)
        }),
        spec("ZUNION", 4, &["ZUNION", "1", "k0"], Exact, |g| {
            let keys = g.keys(1, 3);
            let name = g.pick(&["ZUNION", "ZINTER", "ZDIFF"]);
            let mut args = vec![keys.len().to_string().into_bytes()];
            let n = keys.len();
            args.extend(keys);
            if name != "ZDIFF" && g.chance(3) {
                args.push(b"WEIGHTS".to_vec());
                for _ in 0..n {
                    args.push(
                        g.pick(&["1", "2", "-1", "0.5", "0", "x"])
                            .as_bytes()
                            .to_vec(),
                    );
                }
            }
            if name != "ZDIFF" && g.chance(3) {
                args.push(b"AGGREGATE".to_vec());
                args.push(g.pick(&["SUM", "MIN", "MAX", "avg"]).as_bytes().to_vec());
            }
            if g.chance(2) {
                args.push(b"WITHSCORES".to_vec());
            }
            g.cmd(name, &args)
        }),
        spec(
            "ZUNIONSTORE",
            3,
            &["ZUNIONSTORE", "k0", "1", "k1"],
            Exact,
            |g| {
                let dest = g.key();
                let keys = g.keys(1, 3);
                let name = g.pick(&["ZUNIONSTORE", "ZINTERSTORE", "ZDIFFSTORE"]);
                let mut args = vec![dest, keys.len().to_string().into_bytes()];
                args.extend(keys);
                if name != "ZDIFFSTORE" && g.chance(3) {
                    args.push(b"AGGREGATE".to_vec());
                    args.push(g.pick(&["SUM", "MIN", "MAX"]).as_bytes().to_vec());
                }
                g.cmd(name, &args)
            },
        ),
        spec("ZINTERCARD", 2, &["ZINTERCARD", "1", "k0"], Exact, |g| {
            let keys = g.keys(1, 3);
            let mut args = vec![keys.len().to_string().into_bytes()];
            args.extend(keys);
            if g.chance(2) {
                args.extend([b"LIMIT".to_vec(), g.count()]);
            }
            g.cmd("ZINTERCARD", &args)
        }),
        spec(
            "ZRANGESTORE",
            2,
            &["ZRANGESTORE", "k0", "k1", "0", "-1"],
            Exact,
            |g| {
                let (dest, source) = (g.key(), g.key());
                let mut args = vec![dest, source];
                match g.chance(2) {
                    true => args.extend([g.index(), g.index()]),
                    false => args.extend([g.score_bound(), g.score_bound(), b"BYSCORE".to_vec()]),
                }
                if g.chance(3) {
                    args.push(b"REV".to_vec());
                }
                g.cmd("ZRANGESTORE", &args)
            },
        ),
        spec("SSCAN", 3, &["SSCAN", "k0", "0"], FullScan, |g| {
            let key = g.key();
            let mut args = vec![key, b"0".to_vec()];
            if g.chance(2) {
                args.extend([
                    b"MATCH".to_vec(),
                    g.pick(&["*", "a*", "?", "[a-c]"]).as_bytes().to_vec(),
                ]);
            }
            if g.chance(2) {
                args.extend([
                    b"COUNT".to_vec(),
                    g.pick(&["1", "2", "100"]).as_bytes().to_vec(),
                ]);
            }
            let name = g.pick(&["SSCAN", "HSCAN", "ZSCAN"]);
            g.cmd(name, &args)
        }),
        // SORT: its own keys ([`SORT_KEYS`]) hold lists, sets and sorted sets of numbers and
        // a list of words (this spec), so that most SORTs find something to sort; it also
        // sorts the key space's keys. BY and GET patterns with a `*` read other keys, which
        // Shoal does not support (net-daemon/src/commands/sort.rs): none is generated.
        spec("SORT numbers", 24, &["RPUSH", "{s}l", "1"], Exact, |g| {
            let roll = g.below(12);
            // Now and then a numeric key loses some elements, so that one that is not a
            // number does not stay for good.
            if roll == 0 {
                return match g.below(3) {
                    0 => g.cmd(
                        "LTRIM",
                        &[SORT_KEYS[0].to_vec(), b"-6".into(), b"-1".into()],
                    ),
                    1 => {
                        // SREM, not SPOP: which members SPOP takes is random.
                        let mut args = vec![SORT_KEYS[1].to_vec()];
                        args.extend(["nan", "4 ", "1e", "ten"].map(|m| m.as_bytes().to_vec()));
                        args.extend([g.sort_number(), g.sort_number()]);
                        g.cmd("SREM", &args)
                    }
                    _ => g.cmd("ZPOPMAX", &[SORT_KEYS[2].to_vec()]),
                };
            }
            let kind = roll % 4;
            let key = SORT_KEYS[kind as usize].to_vec();
            let elements: Vec<Vec<u8>> = (0..1 + g.below(4))
                .map(|_| match kind {
                    3 => g.field(),
                    _ => g.sort_number(),
                })
                .collect();
            match kind {
                0 | 3 => {
                    let name = g.pick(&["RPUSH", "LPUSH"]);
                    g.cmd(name, &[vec![key], elements].concat())
                }
                1 => g.cmd("SADD", &[vec![key], elements].concat()),
                _ => {
                    let mut args = vec![key];
                    for element in elements {
                        // Few scores, so that members often share one (BY nosort then
                        // orders them by their bytes).
                        args.push(g.below(4).to_string().into_bytes());
                        args.push(element);
                    }
                    g.cmd("ZADD", &args)
                }
            }
        }),
        spec("SORT", 10, &["SORT", "k0"], Exact, |g| {
            let mut args = vec![g.sort_source()];
            args.extend(g.sort_options());
            let name = g.pick(&["SORT", "SORT_RO"]);
            if name == "SORT_RO" && g.chance(8) {
                args.extend([b"STORE".to_vec(), g.key()]); // a syntax error
            }
            g.cmd(name, &args)
        }),
        // BY nosort keeps the stored order: compared as [`Compare::StoredOrder`] says.
        spec(
            "SORT BY nosort",
            6,
            &["SORT", "k0", "BY", "nosort"],
            StoredOrder,
            |g| {
                let by = g.pick(&["nosort", "x"]).into();
                let mut args = vec![g.sort_source(), b"BY".to_vec(), by];
                let (offset, count) = (g.index(), g.index());
                args.extend(g.options(&[
                    opt(&[b"DESC"]),
                    opt(&[b"ALPHA"]),
                    opt(&[b"GET", b"#"]),
                    vec![b"LIMIT".to_vec(), offset, count],
                ]));
                let name = g.pick(&["SORT", "SORT_RO"]);
                g.cmd(name, &args)
            },
        ),
        // STORE sorts a set by bytes even with BY nosort, so every stored list is the
        // same on both servers (and LRANGE and the others read it later).
        spec(
            "SORT STORE",
            6,
            &["SORT", "k0", "STORE", "k1"],
            Exact,
            |g| {
                let mut args = vec![g.sort_source()];
                let mut options = g.sort_options();
                if g.chance(3) {
                    options.extend([b"BY".to_vec(), b"nosort".to_vec()]);
                }
                args.extend(options);
                let destination = match g.chance(3) {
                    true => SORT_KEYS[4].to_vec(),
                    false => g.key(),
                };
                args.extend([b"STORE".to_vec(), destination]);
                g.cmd("SORT", &args)
            },
        ),
        spec("FLUSHDB", 1, &["FLUSHDB"], Exact, |g| match g.below(3) {
            0 => g.cmd("FLUSHDB", &[]),
            1 => g.cmd("FLUSHDB", &[b"SYNC".to_vec()]),
            _ => g.cmd("FLUSHDB", &[b"ASYNC".to_vec()]),
        }),
        spec("FLUSHALL", 1, &["FLUSHALL"], Exact, |g| match g.below(3) {
            0 => g.cmd("FLUSHALL", &[]),
            1 => g.cmd("FLUSHALL", &[b"SYNC".to_vec()]),
            _ => g.cmd("FLUSHALL", &[b"ASYNC".to_vec()]),
        }),
    ]
}

// ---------------------------------------------------------------- generation

/// One command option: its arguments.
fn opt(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    parts.iter().map(|p| p.to_vec()).collect()
}

/// SplitMix64: a small, seedable generator, so a seed replays the same sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The generators' state: the random stream, the clock for absolute expiry times,
/// and the enabled commands that take arguments (for arity errors).
struct Gen {
    rng: Rng,
    unix_seconds: u64,
    needs_args: Vec<String>,
}

impl Gen {
    fn below(&mut self, n: u64) -> u64 {
        self.rng.next() % n
    }

    /// True one time in `n`.
    fn chance(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn pick_owned<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }

    /// The command, its name in a random letter case, and its arguments.
    fn cmd(&mut self, name: &str, args: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let name = match self.below(4) {
            0 => name.to_ascii_lowercase(),
            1 => name
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_lowercase()
                    } else {
                        c
                    }
                })
                .collect(),
            _ => name.to_string(),
        };
        let mut command = vec![name.into_bytes()];
        command.extend(args.iter().cloned());
        command
    }

    fn key(&mut self) -> Vec<u8> {
        self.pick(KEYS).to_vec()
    }

    /// Between `min` and `max` keys, repeats allowed.
    fn keys(&mut self, min: u64, max: u64) -> Vec<Vec<u8>> {
        let n = min + self.below(max - min + 1);
        (0..n).map(|_| self.key()).collect()
    }

    /// Key-value pairs for MSET and MSETNX; now and then one value short.
    fn pairs(&mut self) -> Vec<Vec<u8>> {
        let mut args = Vec::new();
        for _ in 0..1 + self.below(4) {
            args.push(self.key());
            args.push(self.value());
        }
        if self.chance(25) {
            args.pop();
        }
        args
    }

    /// A small value: often a number (so the INCR family has work), sometimes
    /// empty, binary or text.
    fn value(&mut self) -> Vec<u8> {
        match self.below(10) {
            0..=2 => self
                .pick(&[
                    "0",
                    "1",
                    "-1",
                    "42",
                    "-17",
                    "100",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "9223372036854775806",
                ])
                .into(),
            3 => self
                .pick(&[
                    "007",
                    "+5",
                    " 3",
                    "3 ",
                    "1.0",
                    "-0",
                    "0x10",
                    "18446744073709551616",
                ])
                .into(),
            4 => self
                .pick(&[
                    "1.5", "-0.25", "3e3", "2.5e-3", "-7.75", "1024.125", "inf", "-inf", "nan",
                    "1e400",
                ])
                .into(),
            5 => Vec::new(),
            6 => {
                let len = self.below(12) as usize;
                (0..len).map(|_| self.rng.next() as u8).collect()
            }
            7 => b"\x00\xff\r\n\x00".to_vec(),
            8 => "x".repeat(1 + self.below(40) as usize).into_bytes(),
            _ => self
                .pick(&["hello", "a", "world", "{user}", "caf\u{e9}"])
                .into(),
        }
    }

    /// One of the keys that share the `{user}` tag (so one worker holds them all).
    fn tagged_key(&mut self) -> Vec<u8> {
        self.pick(&[&b"{user}a"[..], b"{user}b", b"{user}c"])
            .to_vec()
    }

    /// A hash field, set member or list element: a few names, so they collide.
    fn field(&mut self) -> Vec<u8> {
        self.pick(&[
            &b"a"[..],
            b"b",
            b"c",
            b"d",
            b"e",
            b"",
            b"f\x00g",
            b"10",
            b"2",
        ])
        .to_vec()
    }

    /// Between `min` and `max` fields.
    fn fields(&mut self, min: u64, max: u64) -> Vec<Vec<u8>> {
        let n = min + self.below(max - min + 1);
        (0..n).map(|_| self.field()).collect()
    }

    /// A score for ZADD: mostly exact binary fractions, now and then extreme or invalid.
    /// Never out of double's range (`1e400`): Redis 7.0's SORT reads errno without
    /// clearing it, so the ERANGE such a score leaves would fail a later SORT at random.
    fn score(&mut self) -> Vec<u8> {
        match self.below(8) {
            0 => self
                .pick(&["inf", "-inf", "+inf", "nan", "x", "1e", "(1", ""])
                .into(),
            _ => format!("{}", (self.below(41) as i64 - 20) as f64 / 4.0).into_bytes(),
        }
    }

    /// One end of a score range.
    fn score_bound(&mut self) -> Vec<u8> {
        let score = (self.below(21) as i64 - 10) as f64 / 2.0;
        match self.below(8) {
            0 => self
                .pick(&["-inf", "+inf", "(-inf", "x", "(", "inf"])
                .into(),
            1..=2 => format!("({score}").into_bytes(),
            _ => format!("{score}").into_bytes(),
        }
    }

    /// One end of a lexicographic range.
    fn lex_bound(&mut self) -> Vec<u8> {
        self.pick(&["-", "+", "[a", "(a", "[c", "(c", "[", "(", "[e", "x", "[10"])
            .into()
    }

    /// A list or rank index: mostly small, sometimes negative, extreme or invalid.
    fn index(&mut self) -> Vec<u8> {
        match self.below(12) {
            0 => self
                .pick(&["9223372036854775807", "-9223372036854775808", "x", "1.5"])
                .into(),
            _ => (self.below(15) as i64 - 7).to_string().into_bytes(),
        }
    }

    /// A count: small, sometimes zero, negative or invalid.
    fn count(&mut self) -> Vec<u8> {
        match self.below(10) {
            0 => self.pick(&["-1", "x", "0", "100"]).into(),
            _ => (1 + self.below(4)).to_string().into_bytes(),
        }
    }

    /// An INCRBY/DECRBY amount, now and then an invalid or extreme one.
    fn integer_arg(&mut self) -> Vec<u8> {
        match self.below(8) {
            0 => self
                .pick(&[
                    "9223372036854775807",
                    "-9223372036854775808",
                    "9223372036854775808",
                    "abc",
                    "1.5",
                    "",
                    "007",
                    " 1",
                ])
                .into(),
            _ => (self.below(201) as i64 - 100).to_string().into_bytes(),
        }
    }

    /// An INCRBYFLOAT amount: mostly values with short binary expansions, so that
    /// both servers' arithmetic is exact; now and then an invalid one.
    fn float_arg(&mut self) -> Vec<u8> {
        match self.below(8) {
            0 => self
                .pick(&["abc", "", " 1", "inf", "-inf", "nan", "1e400", "1.5.2"])
                .into(),
            1 => self
                .pick(&["0", "-0", "1e2", "3.0", "-2.5e1", "0.125"])
                .into(),
            _ => {
                let quarters = self.below(401) as i64 - 200;
                format!("{}", quarters as f64 / 4.0).into_bytes()
            }
        }
    }

    /// A GETRANGE index: mostly small, sometimes negative or extreme.
    fn range_index(&mut self) -> Vec<u8> {
        match self.below(10) {
            0 => self
                .pick(&["9223372036854775807", "-9223372036854775808", "x", "1.5"])
                .into(),
            _ => (self.below(41) as i64 - 20).to_string().into_bytes(),
        }
    }

    /// A relative expiry in seconds: long (so it never runs out during the test), in the
    /// past (deletes the key), or invalid.
    fn seconds(&mut self) -> Vec<u8> {
        match self.below(10) {
            0 => self
                .pick(&["0", "-1", "x", "1.5", "9223372036854775807", ""])
                .into(),
            _ => (1000 + self.below(3) * 1000).to_string().into_bytes(),
        }
    }

    /// A bit offset: mostly within the small values, now and then past them or invalid.
    fn bit_offset(&mut self) -> Vec<u8> {
        match self.below(12) {
            0 => self
                .pick(&["-1", "x", "1.5", "4294967296", "99999999999999999999"])
                .into(),
            1 => self.pick(&["100", "4095"]).into(),
            _ => self.below(40).to_string().into_bytes(),
        }
    }

    /// A BITFIELD type: mostly valid widths, now and then one Redis refuses.
    fn bitfield_type(&mut self) -> Vec<u8> {
        match self.below(12) {
            0 => self.pick(&["u64", "i65", "x8", "U8", "i0", "u"]).into(),
            _ => self
                .pick(&[
                    "u8", "i8", "u16", "i16", "u63", "i64", "u1", "i5", "u3", "i32",
                ])
                .into(),
        }
    }

    /// A BITFIELD offset: a bit offset within the small values or `#n`, now and then
    /// past them or invalid.
    fn bitfield_offset(&mut self) -> Vec<u8> {
        match self.below(12) {
            0 => self
                .pick(&["-1", "#-1", "x", "1.5", "##1", "4294967296"])
                .into(),
            1..=3 => format!("#{}", self.below(5)).into_bytes(),
            4 => self.pick(&["100", "#20"]).into(),
            _ => self.below(40).to_string().into_bytes(),
        }
    }

    /// A BITFIELD SET value or INCRBY increment: small, at the edges of the field
    /// widths, extreme or invalid.
    fn bitfield_value(&mut self) -> Vec<u8> {
        match self.below(12) {
            0..=3 => self
                .pick(&[
                    "127",
                    "128",
                    "255",
                    "256",
                    "-128",
                    "-129",
                    "65535",
                    "-32769",
                    "9223372036854775807",
                    "-9223372036854775808",
                ])
                .into(),
            4 => self.pick(&["x", "1.5", "", "9223372036854775808"]).into(),
            _ => (self.below(61) as i64 - 30).to_string().into_bytes(),
        }
    }

    /// An element for SORT to read as a number (now and then one it cannot read); many
    /// are equal as numbers but not as bytes, which SORT then orders by their bytes.
    fn sort_number(&mut self) -> Vec<u8> {
        match self.below(10) {
            // Not `1e400`: see [`Gen::score`].
            0 if self.chance(5) => self.pick(&["nan", "4 ", "1e", "ten"]).into(),
            0 => self
                .pick(&[
                    "1e2", "007", "-0", "inf", " 4", "0x10", "", "-inf", "1.5e-3",
                ])
                .into(),
            1..=4 => self
                .pick(&[
                    "0", "-0", "0.0", "", "00", "1", "1.0", "01", "1e0", "0x1", " 1",
                ])
                .into(),
            _ => format!("{}", (self.below(41) as i64 - 20) as f64 / 2.0).into_bytes(),
        }
    }

    /// The key a SORT reads: mostly one of [`SORT_KEYS`], sometimes one of the key space.
    fn sort_source(&mut self) -> Vec<u8> {
        match self.chance(4) {
            true => self.key(),
            false => self.pick(SORT_KEYS).to_vec(),
        }
    }

    /// SORT's options but BY and STORE: ASC/DESC, ALPHA, LIMIT, GET # and a GET of no
    /// key (a pattern without `*`); now and then a bad one.
    fn sort_options(&mut self) -> Vec<Vec<u8>> {
        let offset = self.index();
        let count = self.index();
        let mut pool = vec![
            opt(&[b"DESC"]),
            opt(&[b"ASC"]),
            opt(&[b"ALPHA"]),
            opt(&[b"alpha"]),
            vec![b"LIMIT".to_vec(), offset, count],
            opt(&[b"GET", b"#"]),
            opt(&[b"GET", b"nokey"]),
        ];
        if self.chance(8) {
            // Not a lone BY: it would take the next option as a pattern and keep a set's
            // own order.
            pool.push(opt(&[self.pick(&[&b"LIMIT"[..], b"GET", b"NOSORT"])]));
        }
        self.options(&pool)
    }

    /// A relative expiry in milliseconds.
    fn millis(&mut self) -> Vec<u8> {
        match self.below(10) {
            0 => self.pick(&["0", "-5", "x", "9223372036854775807"]).into(),
            _ => (1_000_000 + self.below(3) * 1_000_000)
                .to_string()
                .into_bytes(),
        }
    }

    /// An absolute expiry in Unix seconds: well in the future, or invalid, or (if
    /// `past`) in the past.
    fn unix_seconds(&mut self, past: bool) -> Vec<u8> {
        match self.below(8) {
            0 if past => self.pick(&["1", "0", "-1", "x"]).into(),
            0 => self.pick(&["0", "-1", "x"]).into(),
            _ => (self.unix_seconds + 1000 + self.below(3) * 1000)
                .to_string()
                .into_bytes(),
        }
    }

    /// An absolute expiry in Unix milliseconds, as [`Gen::unix_seconds`].
    fn unix_millis(&mut self, past: bool) -> Vec<u8> {
        match self.below(8) {
            0 if past => self.pick(&["1", "1000", "0", "x"]).into(),
            0 => self.pick(&["0", "-5", "x"]).into(),
            _ => ((self.unix_seconds + 1000 + self.below(3) * 1000) * 1000)
                .to_string()
                .into_bytes(),
        }
    }

    /// A random subset of `pool` (options, each one or more arguments) in random
    /// order; one option may come twice.
    fn options(&mut self, pool: &[Vec<Vec<u8>>]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for option in pool {
            if self.chance(3) {
                out.push(option.clone());
            }
        }
        if !out.is_empty() && self.chance(12) {
            let again = out[self.below(out.len() as u64) as usize].clone();
            out.push(again);
        }
        for i in (1..out.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            out.swap(i, j);
        }
        out.into_iter().flatten().collect()
    }
}

// ---------------------------------------------------------------- comparison

/// Whether two replies agree under `compare`.
fn replies_match(compare: Compare, shoal: &Resp, redis: &Resp) -> bool {
    match (compare, shoal, redis) {
        (Compare::Existence, Resp::Bulk(_), Resp::Bulk(_)) => true,
        (Compare::Existence, Resp::Int(_), Resp::Int(_)) => true,
        (Compare::Within(tolerance), Resp::Int(a), Resp::Int(b)) if *a >= 0 && *b >= 0 => {
            (a - b).abs() <= tolerance
        }
        (Compare::UnorderedPairs, Resp::Array(a), Resp::Array(b)) => {
            let sorted = |items: &[Resp]| {
                let mut pairs: Vec<String> = items.chunks(2).map(|p| format!("{p:?}")).collect();
                pairs.sort();
                pairs
            };
            sorted(a) == sorted(b)
        }
        (Compare::SameShape, Resp::Array(a), Resp::Array(b)) => a.len() == b.len(),
        (Compare::SameShape, Resp::Bulk(_), Resp::Bulk(_)) => true,
        (Compare::Unordered, Resp::Array(a), Resp::Array(b)) => {
            let sorted = |items: &[Resp]| {
                let mut bytes: Vec<Vec<u8>> = items
                    .iter()
                    .map(|r| format!("{r:?}").into_bytes())
                    .collect();
                bytes.sort();
                bytes
            };
            sorted(a) == sorted(b)
        }
        _ => shoal == redis,
    }
}

/// An argument as redis-cli would quote it.
fn quote(bytes: &[u8]) -> String {
    let plain = !bytes.is_empty()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\'' && b != b'\\');
    if plain {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut out = String::from("\"");
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b' '..=b'~' => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
    out
}

fn show_command(args: &[Vec<u8>]) -> String {
    args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

fn show_reply(reply: &Resp) -> String {
    match reply {
        Resp::Simple(s) => s.clone(),
        Resp::Error(e) => format!("(error) {e}"),
        Resp::Int(n) => format!("(integer) {n}"),
        Resp::Bulk(b) => quote_always(b),
        Resp::NilBulk | Resp::NilArray | Resp::Null => "(nil)".into(),
        Resp::Array(items) => format!(
            "[{}]",
            items.iter().map(show_reply).collect::<Vec<_>>().join(", ")
        ),
        other => format!("{other:?}"),
    }
}

fn quote_always(bytes: &[u8]) -> String {
    let quoted = quote(bytes);
    if quoted.starts_with('"') {
        quoted
    } else {
        format!("\"{quoted}\"")
    }
}

// ---------------------------------------------------------------- the run

/// A server's reply, or why there was none (connection closed, read timeout).
type Answer = Result<Resp, String>;

/// One command as run, kept for the failure report.
struct Step {
    number: usize,
    collection: String,
    command: Vec<Vec<u8>>,
    shoal: Answer,
    redis: Answer,
}

impl Step {
    fn show(&self) -> String {
        format!(
            "  #{:<5} [db {}] {}\n           shoal: {}\n           redis: {}",
            self.number,
            self.collection,
            show_command(&self.command),
            show_answer(&self.shoal),
            show_answer(&self.redis)
        )
    }
}

fn show_answer(answer: &Answer) -> String {
    match answer {
        Ok(reply) => show_reply(reply),
        Err(why) => format!("(no reply: {why})"),
    }
}

/// Sends one command and reads its reply.
fn ask(conn: &mut RawConn, command: &[Vec<u8>]) -> Answer {
    let args: Vec<&[u8]> = command.iter().map(|a| a.as_slice()).collect();
    conn.send(&common::encode_command(&args));
    conn.read_reply().map_err(|e| e.to_string())
}

/// Sends one command to both servers and returns both answers.
fn both(shoal: &mut RawConn, redis: &mut RawConn, command: &[Vec<u8>]) -> (Answer, Answer) {
    (ask(shoal, command), ask(redis, command))
}

/// Runs a SCAN (`command[1]` is the cursor) until the cursor comes back as 0, and
/// answers the keys it returned, sorted and without repeats. An error reply, or a
/// reply that is not a SCAN reply, is answered as it came.
fn scan_all(conn: &mut RawConn, command: &[Vec<u8>]) -> Answer {
    let mut command = command.to_vec();
    // SCAN cursor ...; HSCAN, SSCAN and ZSCAN key cursor ...
    let at = match command[0].eq_ignore_ascii_case(b"scan") {
        true => 1,
        false => 2,
    };
    let mut keys = std::collections::BTreeSet::new();
    for _ in 0..MAX_SCAN_CALLS {
        let reply = ask(conn, &command)?;
        let (cursor, batch) = match &reply {
            Resp::Array(parts) => match parts.as_slice() {
                [Resp::Bulk(cursor), Resp::Array(batch)] => (cursor.clone(), batch.clone()),
                _ => return Ok(reply),
            },
            _ => return Ok(reply),
        };
        for key in batch {
            match key {
                Resp::Bulk(key) => keys.insert(key),
                _ => return Ok(reply),
            };
        }
        if cursor == b"0" {
            return Ok(Resp::Array(keys.into_iter().map(Resp::Bulk).collect()));
        }
        command[at] = cursor;
    }
    Err(format!(
        "SCAN did not come back to cursor 0 within {MAX_SCAN_CALLS} calls"
    ))
}

/// How to compare a SORT ... BY nosort of `command[1]` ([`Compare::StoredOrder`]): by
/// the type the key holds on redis-server before the command.
fn stored_order(redis: &mut RawConn, command: &[Vec<u8>]) -> Compare {
    let holds_set = matches!(
        ask(redis, &[b"TYPE".to_vec(), command[1].clone()]),
        Ok(Resp::Simple(kind)) if kind == "set"
    );
    let limited = command.iter().any(|arg| arg.eq_ignore_ascii_case(b"LIMIT"));
    match (holds_set, limited) {
        (false, _) => Compare::Exact,
        (true, false) => Compare::Unordered,
        (true, true) => Compare::SameShape,
    }
}

/// Deletes every key of the key space, of [`SORT_KEYS`] and [`BITOP_DESTINATION`] in every
/// collection used, on both servers, and selects collection 0.
fn reset(shoal: &mut RawConn, redis: &mut RawConn) {
    for collection in COLLECTIONS.iter().rev() {
        let select = vec![b"SELECT".to_vec(), collection.as_bytes().to_vec()];
        let mut del = vec![b"DEL".to_vec()];
        let own = SORT_KEYS.iter().chain([&BITOP_DESTINATION]);
        del.extend(KEYS.iter().chain(own).map(|k| k.to_vec()));
        for command in [select, del] {
            let (a, b) = both(shoal, redis, &command);
            let fine = |answer: &Answer| matches!(answer, Ok(reply) if !reply.is_error());
            assert!(
                fine(&a) && fine(&b),
                "reset {}: shoal {a:?}, redis {b:?}",
                show_command(&command)
            );
        }
    }
}

/// How a seed's run ended badly.
struct Failure {
    report: String,
    /// A server stopped answering: the connections are of no further use.
    fatal: bool,
}

/// Runs `commands` random commands from `seed` on both servers, from an empty key
/// space. Returns the failure report at the first mismatch.
fn run_seed(
    seed: u64,
    commands: usize,
    specs: &[&Spec],
    needs_args: &[String],
    shoal: &mut RawConn,
    redis: &mut RawConn,
) -> Result<(), Failure> {
    let history_len = env_number("SHOAL_DIFF_HISTORY").map_or(HISTORY, |n| n as usize);
    reset(shoal, redis);
    let unix_seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let mut gen = Gen {
        rng: Rng(seed),
        unix_seconds,
        needs_args: needs_args.to_vec(),
    };
    let total_weight: u32 = specs.iter().map(|s| s.weight).sum();
    let mut history: VecDeque<Step> = VecDeque::with_capacity(history_len);
    let mut collection = String::from("0");
    for number in 1..=commands {
        let mut ticket = gen.below(u64::from(total_weight)) as u32;
        let spec = specs
            .iter()
            .find(|s| {
                if ticket < s.weight {
                    return true;
                }
                ticket -= s.weight;
                false
            })
            .expect("weights add up");
        let command = (spec.generate)(&mut gen);
        let compare = match spec.compare {
            Compare::StoredOrder => stored_order(redis, &command),
            other => other,
        };
        let (shoal_reply, redis_reply) = match spec.compare {
            Compare::FullScan => (scan_all(shoal, &command), scan_all(redis, &command)),
            _ => both(shoal, redis, &command),
        };
        let fatal = shoal_reply.is_err() || redis_reply.is_err();
        let matched = match (&shoal_reply, &redis_reply) {
            (Ok(a), Ok(b)) => replies_match(compare, a, b),
            _ => false,
        };
        if history.len() == history_len {
            history.pop_front();
        }
        history.push_back(Step {
            number,
            collection: collection.clone(),
            command: command.clone(),
            shoal: shoal_reply.clone(),
            redis: redis_reply.clone(),
        });
        if !matched {
            let mut report = format!(
                "seed {seed}: command #{number} of {commands} ({}) differs (compared {:?})\n  command: {}\n  shoal:   {}\n  redis:   {}\n  last {} commands (collection in brackets):\n",
                spec.label,
                spec.compare,
                show_command(&command),
                show_answer(&shoal_reply),
                show_answer(&redis_reply),
                history.len()
            );
            for step in &history {
                report.push_str(&step.show());
                report.push('\n');
            }
            if !fatal {
                report.push_str("  after it, the keys it names (GET, PTTL):\n");
                for key in KEYS
                    .iter()
                    .filter(|k| command[1..].iter().any(|a| a.as_slice() == **k))
                {
                    let state = |conn: &mut RawConn| {
                        let value = ask(conn, &[b"GET".to_vec(), key.to_vec()]);
                        let ttl = ask(conn, &[b"PTTL".to_vec(), key.to_vec()]);
                        format!("{}, {}", show_answer(&value), show_answer(&ttl))
                    };
                    let _ = writeln!(
                        report,
                        "    {}: shoal {}; redis {}",
                        quote_always(key),
                        state(shoal),
                        state(redis)
                    );
                }
            }
            let _ = write!(
                report,
                "  reproduce: SHOAL_DIFF_SEED={seed} SHOAL_DIFF_SEEDS=1 cargo test --test differential -- --nocapture"
            );
            return Err(Failure { report, fatal });
        }
        if command[0].eq_ignore_ascii_case(b"SELECT")
            && shoal_reply == Ok(Resp::Simple("OK".into()))
        {
            collection = String::from_utf8_lossy(&command[1]).into_owned();
        }
    }
    Ok(())
}

/// Whether Shoal's answer to a probe says it does not have the command (yet).
fn unsupported(reply: &Resp) -> bool {
    match reply {
        Resp::Error(text) => {
            text.starts_with("ERR unknown command")
                || text.starts_with("ERR unknown subcommand")
                || text.contains("not supported")
        }
        _ => false,
    }
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a non-negative integer, got {text:?}")),
    )
}

#[test]
fn random_command_sequences_match_redis() {
    let started = Instant::now();
    let shoal_server = Server::start("");
    let redis_server = RedisServer::start();
    let mut shoal = shoal_server.raw();
    let mut redis = redis_server.raw();

    // Probe each command once; leave out those Shoal does not know yet.
    let all = specs();
    let mut enabled = Vec::new();
    let mut skipped = Vec::new();
    let mut switched_off = Vec::new();
    for spec in &all {
        if !spec.enabled {
            switched_off.push(spec.label);
            continue;
        }
        let probe: Vec<&[u8]> = spec.probe.iter().map(|a| a.as_bytes()).collect();
        let reply = shoal.cmd_bytes(&probe);
        if unsupported(&reply) {
            skipped.push(spec.label);
        } else {
            enabled.push(spec);
        }
    }
    let lost: Vec<_> = skipped
        .iter()
        .filter(|label| ALWAYS_SUPPORTED.contains(label))
        .collect();
    assert!(lost.is_empty(), "Shoal no longer knows {lost:?}");
    // Enabled commands whose bare name is an arity error (not containers like OBJECT).
    // SCAN's probe has its cursor, so SCAN is among them.
    let needs_args: Vec<String> = enabled
        .iter()
        .filter(|s| s.probe.len() > 1 && s.probe[0] != "OBJECT")
        .map(|s| s.probe[0].to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();

    let first_seed = env_number("SHOAL_DIFF_SEED").unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
    });
    let seeds = env_number("SHOAL_DIFF_SEEDS").unwrap_or(3);
    let commands = env_number("SHOAL_DIFF_COMMANDS").unwrap_or(2000) as usize;

    println!(
        "differential: redis-server {} on port {}, shoal on port {}",
        redis_server.version(),
        redis_server.port,
        shoal_server.port
    );
    println!(
        "differential: comparing {}",
        enabled
            .iter()
            .map(|s| s.label)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !skipped.is_empty() {
        println!(
            "differential: skipped, Shoal answers `unknown command` or `not supported`: {}",
            skipped.join(", ")
        );
    }
    if !switched_off.is_empty() {
        println!(
            "differential: switched off in specs(): {}",
            switched_off.join(", ")
        );
    }

    let mut failures = Vec::new();
    for seed in (0..seeds).map(|i| first_seed.wrapping_add(i)) {
        println!("differential: seed {seed}, {commands} commands");
        if let Err(failure) = run_seed(
            seed,
            commands,
            &enabled,
            &needs_args,
            &mut shoal,
            &mut redis,
        ) {
            println!("differential: seed {seed} found a difference (reported below)");
            failures.push(failure.report);
            if failure.fatal {
                break;
            }
        }
    }
    println!(
        "differential: {seeds} seeds x {commands} commands in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "Shoal and redis-server disagree ({} of {seeds} seeds; intended differences are in docs/compatibility.md):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
