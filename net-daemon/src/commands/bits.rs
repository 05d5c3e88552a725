//! Commands that read a string value and compute on it (GETBIT, BITCOUNT, BITPOS, LCS),
//! and SETBIT, which changes one bit in the key's worker. The computations are pure
//! functions of the value, with Redis 7.0's argument checks and replies, in the order
//! Redis makes them (a missing key answers before some of the arguments are checked).

use bytes::Bytes;
use shoal_shared::frame::WorkerRequest;
use shoal_shared::resp::{parse_i64, Reply};

use super::strings::{on_value, single};
use super::{Pending, Session};
use crate::errors;
use crate::state::Shared;

/// Redis's `proto-max-bulk-len`: a bit offset must address a byte below it.
const MAX_BULK_BYTES: u64 = 512 * 1024 * 1024;
/// Most cells of the LCS table (each 4 bytes): two strings of about 4,000 bytes each.
const MAX_LCS_CELLS: u64 = 16 * 1024 * 1024;

/// Runs `name` if it is a bit or LCS command; `None` otherwise. Arity is already checked.
pub async fn dispatch(
    shared: &Shared,
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
            let options = args[3..].to_vec();
            let mut reads = Vec::with_capacity(2);
            for key in &args[1..3] {
                reads.push(single(shared, key, |key| WorkerRequest::Get { collection, key }).await);
            }
            Pending::barrier(async move {
                let mut values = Vec::with_capacity(2);
                for read in reads {
                    match read.resolve().await {
                        Reply::Bulk(bytes) => values.push(bytes.to_vec()),
                        Reply::Nil => values.push(Vec::new()),
                        Reply::Error(text) if text.starts_with("WRONGTYPE") => {
                            return Reply::error(
                                "ERR The specified keys must contain string values",
                            )
                        }
                        other => return other,
                    }
                }
                lcs(&values[0], &values[1], &options)
            })
        }
        _ => return None,
    };
    Some(pending)
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
