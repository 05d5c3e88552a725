//! Commands that read a string value and compute on it (GETBIT, BITCOUNT, BITPOS, LCS),
//! SETBIT and BITFIELD, which change bits in the key's worker, and BITOP, which combines
//! values into another key. The computations are pure functions of the values, with
//! Redis 7.0's argument checks and replies, in the order Redis makes them (a missing key
//! answers before some of the arguments are checked).
//!
//! - BITFIELD and BITFIELD_RO are parsed and checked here and sent to the key's worker
//!   as one `BitField` request: its ops run there in one transaction (a read-modify-write
//!   as atomic as SETBIT), with the integer arithmetic in the worker's `bitfield`
//!   module. With GETs only, the request is a read.
//! - BITOP reads its source keys as of one instant, computes here, and stores the result
//!   under the destination (a string, or a delete when the result is empty) as one
//!   atomic change with the read (`collections::store`).

use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::frame::{BitFieldOp, BitFieldOverflow, BitFieldType, WorkerRequest};
use shoal_shared::resp::{parse_i64, Reply};

use super::collections::{store, Stored};
use super::strings::{on_value, single, string_values, values_whole};
use super::{Pending, Session};
use crate::errors;
use crate::state::Shared;

/// Redis's `proto-max-bulk-len`: a bit offset must address a byte below it.
const MAX_BULK_BYTES: u64 = 512 * 1024 * 1024;
/// Most cells of the LCS table (each 4 bytes): two strings of about 4,000 bytes each.
const MAX_LCS_CELLS: u64 = 16 * 1024 * 1024;

/// Runs `name` if it is a bit or LCS command; `None` otherwise. Arity is already checked.
pub async fn dispatch(
    shared: &Arc<Shared>,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let collection = session.collection;
    let pending = match name {
        "getbit" => match bit_offset(&args[2]) {
            Ok(offset) => {
                on_value(shared, collection, &args[1], move |value| {
                    Reply::Integer(i64::from(get_bit(value, offset)))
                })
                .await
            }
            Err(reply) => Pending::Ready(reply),
        },
        "setbit" => match (bit_offset(&args[2]), bit_value(&args[3])) {
            (Err(reply), _) | (_, Err(reply)) => Pending::Ready(reply),
            (Ok(offset), Ok(_)) if offset / 8 >= shared.config.client.max_value_bytes as u64 => {
                Pending::Ready(errors::value_too_large(
                    shared.config.client.max_value_bytes,
                ))
            }
            (Ok(offset), Ok(bit)) => {
                single(shared, &args[1], |key| WorkerRequest::SetBit {
                    collection,
                    key,
                    offset,
                    bit,
                })
                .await
            }
        },
        "bitcount" => {
            let options = args[2..].to_vec();
            on_value(shared, collection, &args[1], move |value| match value {
                // A missing key counts 0 whatever the arguments (Redis 7.0 looks it up first).
                None => Reply::Integer(0),
                Some(value) => bit_count(value, &options),
            })
            .await
        }
        "bitpos" => match parse_i64(&args[2]) {
            None => Pending::Ready(errors::not_integer()),
            Some(bit) if bit != 0 && bit != 1 => {
                Pending::Ready(Reply::error("ERR The bit argument must be 1 or 0."))
            }
            Some(bit) => {
                let options = args[3..].to_vec();
                on_value(shared, collection, &args[1], move |value| match value {
                    // A missing key is an endless run of 0 bits.
                    None => Reply::Integer(if bit == 1 { -1 } else { 0 }),
                    Some(value) => bit_pos(value, bit == 1, &options),
                })
                .await
            }
        },
        "lcs" => {
            let (shared, args) = (Arc::clone(shared), args.to_vec());
            Pending::barrier(async move {
                match values_whole(&shared, collection, &args[1..3]).await {
                    Ok(values) => {
                        let value = |i: usize| values[i].clone().unwrap_or_default();
                        lcs(&value(0), &value(1), &args[3..])
                    }
                    Err(Reply::Error(text)) if text.starts_with("WRONGTYPE") => {
                        Reply::error("ERR The specified keys must contain string values")
                    }
                    Err(other) => other,
                }
            })
        }
        "bitfield" | "bitfield_ro" => {
            let ops = match bitfield_ops(&args[2..], name == "bitfield_ro") {
                Ok(ops) => ops,
                Err(reply) => return Some(Pending::Ready(reply)),
            };
            let max = shared.config.client.max_value_bytes as u64;
            if bitfield_write_bytes(&ops).is_some_and(|bytes| bytes > max) {
                return Some(Pending::Ready(errors::value_too_large(max as usize)));
            }
            single(shared, &args[1], |key| WorkerRequest::BitField {
                collection,
                key,
                ops,
            })
            .await
        }
        "bitop" => match bit_op(&args[1], args.len() - 3) {
            Ok(op) => {
                let (shared, args) = (Arc::clone(shared), args.to_vec());
                Pending::barrier(async move { bit_op_store(&shared, collection, op, &args).await })
            }
            Err(reply) => Pending::Ready(reply),
        },
        _ => return None,
    };
    Some(pending)
}

/// The operation of BITOP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BitOp {
    And,
    Or,
    Xor,
    Not,
}

/// BITOP's operation from its name (any case); NOT takes exactly one source.
fn bit_op(name: &[u8], sources: usize) -> Result<BitOp, Reply> {
    let op = match name.to_ascii_lowercase().as_slice() {
        b"and" => BitOp::And,
        b"or" => BitOp::Or,
        b"xor" => BitOp::Xor,
        b"not" => BitOp::Not,
        _ => return Err(errors::syntax()),
    };
    if op == BitOp::Not && sources != 1 {
        return Err(Reply::error(
            "ERR BITOP NOT must be called with a single source key.",
        ));
    }
    Ok(op)
}

/// `BITOP op destkey key [key ...]`: reads the sources (a missing key is empty; the first
/// that is not a string answers WRONGTYPE), stores the result under `destkey` (deletes it
/// when the result is empty) as one atomic change, and answers the result's length.
async fn bit_op_store(shared: &Shared, collection: u16, op: BitOp, args: &[Bytes]) -> Reply {
    let read = || string_values(shared, collection, &args[3..]);
    let compute = |values: Vec<Option<Bytes>>| {
        let values: Vec<Bytes> = values.into_iter().map(Option::unwrap_or_default).collect();
        Ok(Stored::String(bit_op_apply(op, &values)))
    };
    store(shared, collection, &args[3..], &args[2], read, compute).await
}

/// BITOP's result: as long as the longest value, a shorter value read as zero bytes
/// past its end.
fn bit_op_apply(op: BitOp, values: &[Bytes]) -> Vec<u8> {
    let len = values.iter().map(Bytes::len).max().unwrap_or(0);
    let byte = |value: &Bytes, at: usize| value.get(at).copied().unwrap_or(0);
    (0..len)
        .map(|at| {
            let first = byte(&values[0], at);
            let rest = values[1..].iter().map(|value| byte(value, at));
            match op {
                BitOp::Not => !first,
                BitOp::And => rest.fold(first, |acc, b| acc & b),
                BitOp::Or => rest.fold(first, |acc, b| acc | b),
                BitOp::Xor => rest.fold(first, |acc, b| acc ^ b),
            }
        })
        .collect()
}

/// The ops of `BITFIELD key [GET type offset] [SET type offset value] [INCRBY type
/// offset increment] [OVERFLOW WRAP|SAT|FAIL] ...` (`args` after the key), checked in
/// Redis's order; BITFIELD_RO (`read_only`) then refuses any SET or INCRBY.
fn bitfield_ops(args: &[Bytes], read_only: bool) -> Result<Vec<BitFieldOp>, Reply> {
    let mut ops = Vec::new();
    let mut overflow = BitFieldOverflow::Wrap;
    let mut i = 0;
    while i < args.len() {
        let left = args.len() - i - 1;
        let subcommand = args[i].to_ascii_lowercase();
        let (takes_value, operands) = match subcommand.as_slice() {
            b"get" if left >= 2 => (false, 2),
            b"set" | b"incrby" if left >= 3 => (true, 3),
            b"overflow" if left >= 1 => {
                overflow = match args[i + 1].to_ascii_lowercase().as_slice() {
                    b"wrap" => BitFieldOverflow::Wrap,
                    b"sat" => BitFieldOverflow::Sat,
                    b"fail" => BitFieldOverflow::Fail,
                    _ => return Err(Reply::error("ERR Invalid OVERFLOW type specified")),
                };
                i += 2;
                continue;
            }
            _ => return Err(errors::syntax()),
        };
        let (signed, bits) = bitfield_type(&args[i + 1])?;
        let offset = bitfield_offset(&args[i + 2], bits)?;
        let field = BitFieldType {
            signed,
            bits,
            offset,
        };
        ops.push(match (takes_value, subcommand.as_slice()) {
            (false, _) => BitFieldOp::Get { field },
            (true, name) => {
                let number = parse_i64(&args[i + 3]).ok_or_else(errors::not_integer)?;
                match name {
                    b"set" => BitFieldOp::Set {
                        field,
                        value: number,
                        overflow,
                    },
                    _ => BitFieldOp::IncrBy {
                        field,
                        increment: number,
                        overflow,
                    },
                }
            }
        });
        i += 1 + operands;
    }
    if read_only && ops.iter().any(BitFieldOp::is_write) {
        return Err(Reply::error(
            "ERR BITFIELD_RO only supports the GET subcommand",
        ));
    }
    Ok(ops)
}

/// A BITFIELD type: `i1`..`i64` or `u1`..`u63` (the letter in lower case only).
fn bitfield_type(text: &[u8]) -> Result<(bool, u8), Reply> {
    let invalid = || {
        Reply::error(
            "ERR Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is.",
        )
    };
    let signed = match text.first() {
        Some(b'i') => true,
        Some(b'u') => false,
        _ => return Err(invalid()),
    };
    let widest = if signed { 64 } else { 63 };
    match parse_i64(&text[1..]) {
        Some(bits) if (1..=widest).contains(&bits) => Ok((signed, bits as u8)),
        _ => Err(invalid()),
    }
}

/// A BITFIELD offset: a bit offset, or `#n` for the `n`th field of `bits` bits (Redis
/// multiplies in 64 bits, wrapping); in either form below the bits of `MAX_BULK_BYTES`.
fn bitfield_offset(text: &[u8], bits: u8) -> Result<u64, Reply> {
    let invalid = || Reply::error("ERR bit offset is not an integer or out of range");
    let (digits, fields) = match text.strip_prefix(b"#") {
        Some(digits) => (digits, true),
        None => (text, false),
    };
    let mut offset = parse_i64(digits).ok_or_else(invalid)?;
    if fields {
        offset = offset.wrapping_mul(i64::from(bits));
    }
    if offset < 0 || (offset as u64 >> 3) >= MAX_BULK_BYTES {
        return Err(invalid());
    }
    Ok(offset as u64)
}

/// The bytes the value must hold for the fields `ops` write (`None`: no op writes).
fn bitfield_write_bytes(ops: &[BitFieldOp]) -> Option<u64> {
    ops.iter()
        .filter(|op| op.is_write())
        .map(|op| {
            let field = op.field();
            (field.offset + u64::from(field.bits) - 1) / 8 + 1
        })
        .max()
}

/// A bit offset as GETBIT and SETBIT take it: 0 up to the bits of `MAX_BULK_BYTES`.
fn bit_offset(text: &[u8]) -> Result<u64, Reply> {
    match parse_i64(text) {
        Some(offset) if offset >= 0 && (offset as u64 >> 3) < MAX_BULK_BYTES => Ok(offset as u64),
        _ => Err(Reply::error(
            "ERR bit offset is not an integer or out of range",
        )),
    }
}

/// SETBIT's value: 0 or 1.
fn bit_value(text: &[u8]) -> Result<bool, Reply> {
    match parse_i64(text) {
        Some(0) => Ok(false),
        Some(1) => Ok(true),
        _ => Err(Reply::error("ERR bit is not an integer or out of range")),
    }
}

/// The bit at `offset` (the most significant bit of a byte first); 0 past the end.
fn get_bit(value: Option<&[u8]>, offset: u64) -> u8 {
    let byte = value
        .and_then(|value| value.get((offset / 8) as usize))
        .copied()
        .unwrap_or(0);
    (byte >> (7 - (offset % 8))) & 1
}

/// A `start end [BYTE|BIT]` range of a value of `len` bytes, as the inclusive bit range
/// it covers (`None` when empty). Negative indexes count from the end; the range is
/// clamped to the value.
fn bit_range(len: u64, start: i64, end: i64, in_bits: bool) -> Option<(u64, u64)> {
    let total = if in_bits { len * 8 } else { len } as i64;
    let start = if start < 0 { start + total } else { start }.max(0);
    let end = if end < 0 { end + total } else { end }
        .max(0)
        .min(total - 1);
    if start > end {
        return None;
    }
    let (start, end) = (start as u64, end as u64);
    Some(if in_bits {
        (start, end)
    } else {
        (start * 8, end * 8 + 7)
    })
}

/// `BYTE` or `BIT` (any case); anything else is a syntax error.
fn unit(text: &[u8]) -> Result<bool, Reply> {
    match text.to_ascii_uppercase().as_slice() {
        b"BIT" => Ok(true),
        b"BYTE" => Ok(false),
        _ => Err(errors::syntax()),
    }
}

/// BITCOUNT of an existing value with `options` (`[start end [BYTE|BIT]]`).
fn bit_count(value: &[u8], options: &[Bytes]) -> Reply {
    let range = match options {
        [] => bit_range(value.len() as u64, 0, -1, false),
        [start, end, rest @ ..] if rest.len() <= 1 => {
            let (Some(start), Some(end)) = (parse_i64(start), parse_i64(end)) else {
                return errors::not_integer();
            };
            // Redis 7.0 answers an empty negative range before it reads the unit.
            if start < 0 && end < 0 && start > end {
                return Reply::Integer(0);
            }
            let in_bits = match rest.first().map(|text| unit(text)) {
                None => false,
                Some(Ok(in_bits)) => in_bits,
                Some(Err(reply)) => return reply,
            };
            bit_range(value.len() as u64, start, end, in_bits)
        }
        _ => return errors::syntax(),
    };
    let count = range.map_or(0, |(first, last)| {
        bytes_in(value, first, last)
            .map(|(byte, mask)| (byte & mask).count_ones() as u64)
            .sum::<u64>()
    });
    Reply::Integer(count as i64)
}

/// The bytes of `value` that hold the inclusive bit range `first..=last`, each with the
/// mask of its bits in the range (the most significant bit of a byte first).
fn bytes_in(value: &[u8], first: u64, last: u64) -> impl Iterator<Item = (u8, u8)> + '_ {
    let (first_byte, last_byte) = ((first / 8) as usize, (last / 8) as usize);
    value[first_byte..=last_byte]
        .iter()
        .enumerate()
        .map(move |(i, &byte)| {
            let at = first_byte + i;
            let mut mask = 0xffu8;
            if at == first_byte {
                mask &= 0xff >> (first % 8);
            }
            if at == last_byte {
                mask &= 0xff << (7 - last % 8);
            }
            (byte, mask)
        })
}

/// BITPOS of an existing value: the first `bit` in the range of `options` (`[start
/// [end [BYTE|BIT]]]`), or -1. Looking for a 0 with no end given, a value of all ones
/// answers the first bit past it.
fn bit_pos(value: &[u8], bit: bool, options: &[Bytes]) -> Reply {
    let len = value.len() as u64;
    let (range, end_given) = match options {
        [] => (bit_range(len, 0, -1, false), false),
        [start, rest @ ..] if rest.len() <= 2 => {
            let Some(start) = parse_i64(start) else {
                return errors::not_integer();
            };
            let in_bits = match rest.get(1).map(|text| unit(text)) {
                None => false,
                Some(Ok(in_bits)) => in_bits,
                Some(Err(reply)) => return reply,
            };
            let end = match rest.first() {
                Some(end) => match parse_i64(end) {
                    Some(end) => end,
                    None => return errors::not_integer(),
                },
                None => -1,
            };
            (bit_range(len, start, end, in_bits), !rest.is_empty())
        }
        _ => return errors::syntax(),
    };
    let Some((first, last)) = range else {
        return Reply::Integer(-1);
    };
    // The first byte with a wanted bit in range, then the bit in it.
    let found = bytes_in(value, first, last)
        .enumerate()
        .find_map(|(i, (byte, mask))| {
            let hits = if bit { byte & mask } else { !byte & mask };
            (hits != 0).then(|| (first / 8 + i as u64) * 8 + u64::from(hits.leading_zeros()))
        });
    match found {
        Some(at) => Reply::Integer(at as i64),
        None if !bit && !end_given => Reply::Integer(last as i64 + 1),
        None => Reply::Integer(-1),
    }
}

/// LCS of `a` and `b` (missing keys are empty) with `options`: `[LEN] [IDX]
/// [MINMATCHLEN n] [WITHMATCHLEN]`.
fn lcs(a: &[u8], b: &[u8], options: &[Bytes]) -> Reply {
    let (mut want_len, mut want_idx, mut with_match_len, mut min_match_len) =
        (false, false, false, 0u64);
    let mut i = 0;
    while i < options.len() {
        match options[i].to_ascii_uppercase().as_slice() {
            b"LEN" => want_len = true,
            b"IDX" => want_idx = true,
            b"WITHMATCHLEN" => with_match_len = true,
            b"MINMATCHLEN" if i + 1 < options.len() => {
                let Some(n) = parse_i64(&options[i + 1]) else {
                    return errors::not_integer();
                };
                min_match_len = n.max(0) as u64;
                i += 1;
            }
            _ => return errors::syntax(),
        }
        i += 1;
    }
    if want_len && want_idx {
        return Reply::error("ERR If you want both the length and indexes, please just use IDX.");
    }
    let cells = (a.len() as u64 + 1) * (b.len() as u64 + 1);
    if cells > MAX_LCS_CELLS {
        return Reply::error(
            "ERR Insufficient memory, transient memory for LCS exceeds proto-max-bulk-len",
        );
    }
    // table[i][j]: the LCS length of a[..i] and b[..j].
    let width = b.len() + 1;
    let mut table = vec![0u32; (a.len() + 1) * width];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            table[i * width + j] = if a[i - 1] == b[j - 1] {
                table[(i - 1) * width + j - 1] + 1
            } else {
                table[(i - 1) * width + j].max(table[i * width + j - 1])
            };
        }
    }
    let length = table[a.len() * width + b.len()] as usize;
    if want_len {
        return Reply::Integer(length as i64);
    }
    // Walk back from the end, as Redis does, collecting the common bytes and the ranges
    // of consecutive matches (last ones first).
    let mut common = vec![0u8; length];
    let mut matches = Vec::new();
    let (mut i, mut j, mut at) = (a.len(), b.len(), length);
    // The match being grown backward: (a start, a end, b start, b end).
    let mut current: Option<(usize, usize, usize, usize)> = None;
    while i > 0 && j > 0 {
        let mut emit = false;
        if a[i - 1] == b[j - 1] {
            common[at - 1] = a[i - 1];
            current = Some(match current {
                Some((a_start, a_end, b_start, b_end)) if a_start == i && b_start == j => {
                    (a_start - 1, a_end, b_start - 1, b_end)
                }
                _ => (i - 1, i - 1, j - 1, j - 1),
            });
            if current.is_some_and(|(a_start, _, b_start, _)| a_start == 0 || b_start == 0) {
                emit = true;
            }
            at -= 1;
            i -= 1;
            j -= 1;
        } else {
            if table[(i - 1) * width + j] > table[i * width + j - 1] {
                i -= 1;
            } else {
                j -= 1;
            }
            emit = current.is_some();
        }
        if emit {
            if let Some((a_start, a_end, b_start, b_end)) = current.take() {
                let match_len = (a_end - a_start + 1) as u64;
                if min_match_len == 0 || match_len >= min_match_len {
                    let range = |start: usize, end: usize| {
                        Reply::Array(vec![
                            Reply::Integer(start as i64),
                            Reply::Integer(end as i64),
                        ])
                    };
                    let mut entry = vec![range(a_start, a_end), range(b_start, b_end)];
                    if with_match_len {
                        entry.push(Reply::Integer(match_len as i64));
                    }
                    matches.push(Reply::Array(entry));
                }
            }
        }
    }
    if !want_idx {
        return Reply::Bulk(common.into());
    }
    Reply::Map(vec![
        (Reply::bulk("matches"), Reply::Array(matches)),
        (Reply::bulk("len"), Reply::Integer(length as i64)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words.iter().map(|w| Bytes::from(w.to_string())).collect()
    }

    #[test]
    fn bits_are_read_most_significant_first() {
        // 'a' is 0110 0001.
        let value = Some(&b"a"[..]);
        let bits: Vec<u8> = (0..8).map(|at| get_bit(value, at)).collect();
        assert_eq!(bits, [0, 1, 1, 0, 0, 0, 0, 1]);
        assert_eq!(get_bit(value, 8), 0);
        assert_eq!(get_bit(None, 3), 0);
    }

    #[test]
    fn bitcount_and_bitpos_follow_redis_ranges() {
        // "foobar": Redis's documented examples.
        let value = b"foobar";
        assert_eq!(bit_count(value, &[]), Reply::Integer(26));
        assert_eq!(bit_count(value, &args(&["0", "0"])), Reply::Integer(4));
        assert_eq!(bit_count(value, &args(&["1", "1"])), Reply::Integer(6));
        assert_eq!(
            bit_count(value, &args(&["1", "1", "BYTE"])),
            Reply::Integer(6)
        );
        assert_eq!(
            bit_count(value, &args(&["5", "30", "BIT"])),
            Reply::Integer(17)
        );
        assert_eq!(bit_count(value, &args(&["-1", "-3"])), Reply::Integer(0));
        assert_eq!(bit_count(value, &args(&["1"])), errors::syntax());
        assert_eq!(bit_count(value, &args(&["1", "2", "X"])), errors::syntax());
        // "\xff\xf0\x00"
        let value = b"\xff\xf0\x00";
        assert_eq!(bit_pos(value, false, &[]), Reply::Integer(12));
        let value = b"\x00\xff\xf0";
        assert_eq!(bit_pos(value, true, &args(&["0"])), Reply::Integer(8));
        assert_eq!(bit_pos(value, true, &args(&["2"])), Reply::Integer(16));
        assert_eq!(
            bit_pos(value, true, &args(&["2", "-1", "BYTE"])),
            Reply::Integer(16)
        );
        assert_eq!(
            bit_pos(value, true, &args(&["7", "15", "BIT"])),
            Reply::Integer(8)
        );
        assert_eq!(
            bit_pos(value, true, &args(&["7", "-3", "BIT"])),
            Reply::Integer(8)
        );
        // All ones: a 0 is past the end unless an end was given.
        assert_eq!(bit_pos(b"\xff", false, &[]), Reply::Integer(8));
        assert_eq!(
            bit_pos(b"\xff", false, &args(&["0", "-1"])),
            Reply::Integer(-1)
        );
        assert_eq!(bit_pos(b"", true, &[]), Reply::Integer(-1));
    }

    #[test]
    fn bitfield_arguments_are_checked_in_redis_order() {
        let ops = |words: &[&str], read_only| bitfield_ops(&args(words), read_only);
        let invalid_type = Reply::error(
            "ERR Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is.",
        );
        let bad_offset = Reply::error("ERR bit offset is not an integer or out of range");
        for bad in ["u64", "i65", "I8", "u0", "i", "x8", "i08", "u+8", ""] {
            assert_eq!(
                ops(&["GET", bad, "0"], false),
                Err(invalid_type.clone()),
                "{bad}"
            );
        }
        for bad in ["-1", "#-1", "x", "##1", "4294967296", "#536870912"] {
            assert_eq!(
                ops(&["GET", "u8", bad], false),
                Err(bad_offset.clone()),
                "{bad}"
            );
        }
        assert_eq!(ops(&["GET", "u8"], false), Err(errors::syntax()));
        assert_eq!(ops(&["OVERFLOW"], false), Err(errors::syntax()));
        assert_eq!(ops(&["NOPE", "u8", "0"], false), Err(errors::syntax()));
        assert_eq!(
            ops(&["OVERFLOW", "maybe", "GET", "u8", "0"], false),
            Err(Reply::error("ERR Invalid OVERFLOW type specified"))
        );
        assert_eq!(
            ops(&["SET", "u8", "0", "1.5"], false),
            Err(errors::not_integer())
        );
        // The type is checked before the offset, and both before the value.
        assert_eq!(ops(&["SET", "u99", "x", "y"], false), Err(invalid_type));
        assert_eq!(ops(&["SET", "u8", "x", "y"], true), Err(bad_offset));
        assert_eq!(
            ops(&["GET", "u8", "0", "SET", "u8", "0", "1"], true),
            Err(Reply::error(
                "ERR BITFIELD_RO only supports the GET subcommand"
            ))
        );
        let field = |signed, bits, offset| BitFieldType {
            signed,
            bits,
            offset,
        };
        assert_eq!(
            ops(
                &[
                    "get", "i5", "#3", "overflow", "SAT", "incrby", "u63", "7", "-2", "OVERFLOW",
                    "fail", "set", "u2", "1", "9"
                ],
                false
            ),
            Ok(vec![
                BitFieldOp::Get {
                    field: field(true, 5, 15)
                },
                BitFieldOp::IncrBy {
                    field: field(false, 63, 7),
                    increment: -2,
                    overflow: BitFieldOverflow::Sat
                },
                BitFieldOp::Set {
                    field: field(false, 2, 1),
                    value: 9,
                    overflow: BitFieldOverflow::Fail
                },
            ])
        );
        let written = ops(&["GET", "u8", "#1000", "SET", "i16", "#2", "1"], false).unwrap();
        assert_eq!(bitfield_write_bytes(&written), Some(6));
        assert_eq!(ops(&[], true), Ok(Vec::new()));
    }

    #[test]
    fn bitop_combines_values_as_long_as_the_longest() {
        let values = [
            Bytes::from_static(&[0x0f, 0xff]),
            Bytes::from_static(&[0xf0]),
        ];
        assert_eq!(bit_op_apply(BitOp::And, &values), [0x00, 0x00]);
        assert_eq!(bit_op_apply(BitOp::Or, &values), [0xff, 0xff]);
        assert_eq!(bit_op_apply(BitOp::Xor, &values), [0xff, 0xff]);
        assert_eq!(bit_op_apply(BitOp::Not, &values[..1]), [0xf0, 0x00]);
        assert!(bit_op_apply(BitOp::Or, &[Bytes::new(), Bytes::new()]).is_empty());
        assert_eq!(bit_op(b"xOr", 3), Ok(BitOp::Xor));
        assert_eq!(bit_op(b"nand", 1), Err(errors::syntax()));
        assert_eq!(
            bit_op(b"NOT", 2),
            Err(Reply::error(
                "ERR BITOP NOT must be called with a single source key."
            ))
        );
    }

    #[test]
    fn lcs_answers_the_string_its_length_and_the_matches() {
        let (a, b) = (b"ohmytext", b"mynewtext");
        assert_eq!(lcs(a, b, &[]), Reply::Bulk(Bytes::from("mytext")));
        assert_eq!(lcs(a, b, &args(&["LEN"])), Reply::Integer(6));
        let range = |s: i64, e: i64| Reply::Array(vec![Reply::Integer(s), Reply::Integer(e)]);
        let expected = Reply::Map(vec![
            (
                Reply::bulk("matches"),
                Reply::Array(vec![
                    Reply::Array(vec![range(4, 7), range(5, 8), Reply::Integer(4)]),
                    Reply::Array(vec![range(2, 3), range(0, 1), Reply::Integer(2)]),
                ]),
            ),
            (Reply::bulk("len"), Reply::Integer(6)),
        ]);
        assert_eq!(lcs(a, b, &args(&["IDX", "WITHMATCHLEN"])), expected);
        let longer = lcs(a, b, &args(&["IDX", "MINMATCHLEN", "4"]));
        let Reply::Map(fields) = longer else {
            panic!("{longer:?}")
        };
        assert_eq!(
            fields[0].1,
            Reply::Array(vec![Reply::Array(vec![range(4, 7), range(5, 8)])])
        );
        assert!(matches!(lcs(a, b, &args(&["LEN", "IDX"])), Reply::Error(_)));
        assert_eq!(lcs(a, b, &args(&["NOPE"])), errors::syntax());
    }
}
