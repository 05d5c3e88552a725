//! SORT and SORT_RO: the elements of a list, set or sorted set, sorted here in the
//! net-daemon as Redis 7.0 sorts them, answered or (SORT ... STORE) stored as a list.
//!
//! - The key is read through its worker: its type first (`TypedOp::Type`), then its
//!   elements in stored order (`LRange`, `Members(Set)`, `ZRange` by rank). When the
//!   key changes type between the two reads, the read starts again (a few times).
//! - Sorting is pure ([`sorted`]): numeric by default (each element read as C's `strtod`
//!   reads it; one that is not a number fails the whole command), byte order with ALPHA,
//!   reversed with DESC, then the LIMIT window. `BY` with a pattern that has no `*`
//!   (`BY nosort`) keeps the stored order (a list's or sorted set's; a set's is Shoal's
//!   own, as a set's is Redis's own), except that a set sorted into a STORE is sorted by
//!   bytes so the stored list is deterministic, as Redis does. `GET #` answers the
//!   element, and a GET pattern with no `*` answers nil (an empty element in a STORE).
//! - BY and GET patterns with a `*` read *other keys*, which may live on other workers
//!   or hosts: Shoal does not support them, and answers
//!   "ERR SORT BY and GET patterns that read other keys are not supported" once the
//!   options have parsed (Redis Cluster refuses them too).
//! - STORE replaces the destination with a list of the result (a delete when the result
//!   is empty) and answers its length; the read and the write are one atomic change
//!   (`collections::store`: the write expects the key unchanged since the read).
//!   SORT_RO refuses STORE (a syntax error, as in Redis).

use std::cmp::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::frame::{Kind, RangeBy, TypedOp, ZRange};
use shoal_shared::resp::{parse_i64, Reply};

use super::collections::{store, Stored};
use super::types::{run, Shape};
use super::{Pending, Session};
use crate::errors;
use crate::state::Shared;

/// How many times SORT reads a key whose type changed between its two reads.
const READ_ATTEMPTS: usize = 3;

/// Runs SORT or SORT_RO; `None` for any other command. Arity is already checked.
pub async fn dispatch(
    shared: &Arc<Shared>,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let read_only = match name {
        "sort" => false,
        "sort_ro" => true,
        _ => return None,
    };
    let options = match Options::parse(&args[2..], read_only) {
        Ok(options) => options,
        Err(reply) => return Some(Pending::Ready(reply)),
    };
    if options.reads_other_keys() {
        return Some(Pending::Ready(Reply::error(
            "ERR SORT BY and GET patterns that read other keys are not supported",
        )));
    }
    let (shared, key, collection) = (Arc::clone(shared), args[1].clone(), session.collection);
    Some(Pending::barrier(async move {
        sort(&shared, collection, &key, options).await
    }))
}

/// What one `GET pattern` answers for each element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Get {
    /// `GET #`: the element itself.
    Element,
    /// A pattern with no `*`: names no key, so nil (Redis looks nothing up either).
    Nothing,
    /// A pattern with a `*`: another key's value (not supported).
    OtherKey,
}

/// SORT's options, parsed as Redis parses them: left to right, a later ASC/DESC, BY or
/// LIMIT replacing an earlier one.
#[derive(Debug, Clone, PartialEq)]
struct Options {
    descending: bool,
    alpha: bool,
    /// `LIMIT offset count` (a negative count: every element from the offset).
    limit: (i64, i64),
    /// A BY pattern with no `*` was given: the stored order is kept.
    no_sort: bool,
    /// The last BY pattern, if any.
    by: Option<Bytes>,
    gets: Vec<Get>,
    store: Option<Bytes>,
}

/// `bytes` as C sees a string: up to its first NUL byte.
fn c_string(bytes: &[u8]) -> &[u8] {
    bytes
        .iter()
        .position(|&b| b == 0)
        .map_or(bytes, |end| &bytes[..end])
}

impl Options {
    /// The options after the key; STORE only when not `read_only`.
    fn parse(args: &[Bytes], read_only: bool) -> Result<Options, Reply> {
        let mut options = Options {
            descending: false,
            alpha: false,
            limit: (0, -1),
            no_sort: false,
            by: None,
            gets: Vec::new(),
            store: None,
        };
        let mut i = 0;
        while i < args.len() {
            let left = args.len() - i - 1;
            match args[i].to_ascii_lowercase().as_slice() {
                b"asc" => options.descending = false,
                b"desc" => options.descending = true,
                b"alpha" => options.alpha = true,
                b"limit" if left >= 2 => {
                    let offset = parse_i64(&args[i + 1]).ok_or_else(errors::not_integer)?;
                    let count = parse_i64(&args[i + 2]).ok_or_else(errors::not_integer)?;
                    options.limit = (offset, count);
                    i += 2;
                }
                b"store" if !read_only && left >= 1 => {
                    options.store = Some(args[i + 1].clone());
                    i += 1;
                }
                b"by" if left >= 1 => {
                    let pattern = &args[i + 1];
                    if !c_string(pattern).contains(&b'*') {
                        options.no_sort = true;
                    }
                    options.by = Some(pattern.clone());
                    i += 1;
                }
                b"get" if left >= 1 => {
                    let pattern = c_string(&args[i + 1]);
                    options.gets.push(match pattern {
                        b"#" => Get::Element,
                        _ if pattern.contains(&b'*') => Get::OtherKey,
                        _ => Get::Nothing,
                    });
                    i += 1;
                }
                _ => return Err(errors::syntax()),
            }
            i += 1;
        }
        Ok(options)
    }

    /// Whether answering needs the values of other keys: a BY pattern that sorts (every
    /// BY given had a `*`), or a GET pattern with a `*`.
    fn reads_other_keys(&self) -> bool {
        (!self.no_sort && self.by.is_some()) || self.gets.contains(&Get::OtherKey)
    }
}

/// What SORT found under the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// No key: no elements (Redis sorts an empty list).
    Missing,
    List,
    Set,
    SortedSet,
}

/// Reads the key's elements in stored order, then sorts and answers or stores them (one
/// atomic change: the destination is written only if the key is unchanged since the read).
async fn sort(shared: &Shared, collection: u16, key: &Bytes, options: Options) -> Reply {
    let Some(destination) = &options.store else {
        let items = match read(shared, collection, key).await {
            Ok((source, elements)) => sorted(source, elements, &options),
            Err(reply) => return reply,
        };
        return match items {
            Ok(items) => Reply::Array(
                items
                    .into_iter()
                    .map(|item| item.map_or(Reply::Nil, Reply::Bulk))
                    .collect(),
            ),
            Err(reply) => reply,
        };
    };
    let compute = |(source, elements)| {
        let items = sorted(source, elements, &options)?;
        let elements = items
            .into_iter()
            .map(|item| {
                (
                    Vec::new(),
                    item.map_or_else(Vec::new, |value| value.to_vec()),
                )
            })
            .collect();
        Ok(Stored::Collection(Kind::List, elements))
    };
    let read = || read(shared, collection, key);
    store(
        shared,
        collection,
        std::slice::from_ref(key),
        destination,
        read,
        compute,
    )
    .await
}

/// The key's type and its elements in stored order; WRONGTYPE for a string or hash.
async fn read(
    shared: &Shared,
    collection: u16,
    key: &Bytes,
) -> Result<(Source, Vec<Bytes>), Reply> {
    let mut session = Session::new(0, true);
    session.collection = collection;
    let mut last = errors::wrong_type();
    for _ in 0..READ_ATTEMPTS {
        let probe = run(shared, &session, key, TypedOp::Type, Shape::Plain).await;
        let (source, op) = match probe.resolve().await {
            Reply::Simple(kind) => match kind.as_str() {
                "none" => return Ok((Source::Missing, Vec::new())),
                "list" => (Source::List, TypedOp::LRange { start: 0, stop: -1 }),
                "set" => (Source::Set, TypedOp::Members(Kind::Set)),
                "zset" => (
                    Source::SortedSet,
                    TypedOp::ZRange {
                        range: ZRange {
                            by: RangeBy::Rank(0, -1),
                            reverse: false,
                            limit: None,
                        },
                        with_scores: false,
                    },
                ),
                _ => return Err(errors::wrong_type()),
            },
            other => return Err(other),
        };
        match run(shared, &session, key, op, Shape::Plain)
            .await
            .resolve()
            .await
        {
            Reply::Array(items) => {
                let elements = items
                    .into_iter()
                    .filter_map(|item| match item {
                        Reply::Bulk(element) => Some(element),
                        _ => None,
                    })
                    .collect();
                return Ok((source, elements));
            }
            // The key changed type since the probe: look again.
            Reply::Error(text) if text.starts_with("WRONGTYPE") => {
                last = Reply::Error(text);
            }
            other => return Err(other),
        }
    }
    Err(last)
}

/// An element as SORT sorts it by number: C's `strtod` of the element (up to a NUL byte),
/// which must read all of it, not overflow and not be NaN. An empty element is 0.
fn sort_score(element: &[u8]) -> Option<f64> {
    let text = std::ffi::CString::new(c_string(element)).ok()?;
    let mut end: *mut libc::c_char = std::ptr::null_mut();
    // SAFETY: `text` is NUL-terminated and outlives the call; `end` receives a pointer
    // into it; errno is this thread's.
    let (value, errno) = unsafe {
        *libc::__errno_location() = 0;
        let value = libc::strtod(text.as_ptr(), &mut end);
        (value, *libc::__errno_location())
    };
    let read = end as usize - text.as_ptr() as usize;
    (read == text.as_bytes().len() && errno != libc::ERANGE && !value.is_nan()).then_some(value)
}

/// The reply's items (`None`: nil) for the stored `elements` of `source`, as Redis's
/// SORT makes them; the error when a number is wanted and an element is not one.
fn sorted(
    source: Source,
    mut elements: Vec<Bytes>,
    options: &Options,
) -> Result<Vec<Option<Bytes>>, Reply> {
    let (mut no_sort, mut alpha) = (options.no_sort, options.alpha);
    // A set has no order of its own: one sorted into a STORE is sorted by bytes, so
    // that the stored list does not depend on how the set is kept.
    if no_sort && source == Source::Set && options.store.is_some() {
        no_sort = false;
        alpha = true;
    }
    if no_sort {
        // A list or sorted set keeps its order, read from the other end with DESC; a
        // set's order is its own either way.
        if options.descending && source != Source::Set {
            elements.reverse();
        }
    } else if alpha {
        // Redis compares with strcoll (up to a NUL byte; byte order in the C and
        // C.UTF-8 locales) when it answers, and byte by byte when it stores.
        let binary = options.store.is_some();
        elements.sort_by(|a, b| {
            let order = match binary {
                true => a.cmp(b),
                false => c_string(a).cmp(c_string(b)),
            };
            directed(order, options.descending)
        });
    } else {
        let mut scored = Vec::with_capacity(elements.len());
        for element in elements {
            let Some(score) = sort_score(&element) else {
                return Err(Reply::error(
                    "ERR One or more scores can't be converted into double",
                ));
            };
            scored.push((score, element));
        }
        // Equal scores are ordered by bytes, so that the order is always the same.
        scored.sort_by(|(a, a_element), (b, b_element)| {
            let order = a
                .partial_cmp(b)
                .unwrap_or(Ordering::Equal)
                .then_with(|| a_element.cmp(b_element));
            directed(order, options.descending)
        });
        elements = scored.into_iter().map(|(_, element)| element).collect();
    }
    let window = limit_window(elements.len(), options.limit);
    let mut items = Vec::new();
    for element in &elements[window] {
        if options.gets.is_empty() {
            items.push(Some(element.clone()));
        }
        for get in &options.gets {
            items.push(match get {
                Get::Element => Some(element.clone()),
                Get::Nothing | Get::OtherKey => None,
            });
        }
    }
    Ok(items)
}

fn directed(order: Ordering, descending: bool) -> Ordering {
    match descending {
        true => order.reverse(),
        false => order,
    }
}

/// The elements `LIMIT offset count` keeps of `len`, as Redis clamps them: a negative
/// offset is 0, a negative count means to the end.
fn limit_window(len: usize, (offset, count): (i64, i64)) -> std::ops::Range<usize> {
    let len = len as i64;
    let mut start = offset.max(0);
    let mut end = match count {
        count if count < 0 => len - 1,
        count => start.saturating_add(count) - 1,
    };
    if start >= len {
        start = len - 1;
        end = len - 2;
    }
    end = end.min(len - 1);
    if start > end {
        return 0..0;
    }
    start as usize..end as usize + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words.iter().map(|w| Bytes::from(w.to_string())).collect()
    }

    fn sort_words(source: Source, words: &[&str], options: &[&str]) -> Result<Vec<String>, Reply> {
        let options = Options::parse(&args(options), false)?;
        let items = sorted(source, args(words), &options)?;
        Ok(items
            .into_iter()
            .map(|item| item.map_or("(nil)".to_string(), |b| String::from_utf8_lossy(&b).into()))
            .collect())
    }

    #[test]
    fn numbers_sort_as_strtod_reads_them() {
        // Replies taken from redis-server 7.0.15 (RPUSH L 3 1 2 10 "" " 4" 0x10 inf).
        let list = ["3", "1", "2", "10", "", " 4", "0x10", "inf"];
        assert_eq!(
            sort_words(Source::List, &list, &[]).unwrap(),
            ["", "1", "2", "3", " 4", "10", "0x10", "inf"]
        );
        assert_eq!(
            sort_words(Source::List, &list, &["desc", "LIMIT", "1", "3"]).unwrap(),
            ["0x10", "10", " 4"]
        );
        assert_eq!(
            sort_words(
                Source::List,
                &list,
                &["BY", "nosort", "DESC", "LIMIT", "1", "2"]
            )
            .unwrap(),
            ["0x10", " 4"]
        );
        // Equal numbers are ordered by bytes.
        assert_eq!(
            sort_words(Source::Set, &["1.0", "1", "-0", "0"], &[]).unwrap(),
            ["-0", "0", "1", "1.0"]
        );
        for bad in ["3 ", "a", "nan", "1e400", "1e-400"] {
            assert_eq!(
                sort_words(Source::List, &["1", bad], &[]),
                Err(Reply::error(
                    "ERR One or more scores can't be converted into double"
                )),
                "{bad}"
            );
        }
        assert_eq!(
            sort_words(Source::List, &["1", "a"], &["ALPHA"]).unwrap(),
            ["1", "a"]
        );
    }

    #[test]
    fn alpha_limit_get_and_nosort() {
        let words = ["pear", "apple", "fig", "banana"];
        assert_eq!(
            sort_words(Source::Set, &words, &["ALPHA"]).unwrap(),
            ["apple", "banana", "fig", "pear"]
        );
        assert_eq!(
            sort_words(Source::Set, &words, &["ALPHA", "DESC", "LIMIT", "-5", "2"]).unwrap(),
            ["pear", "fig"]
        );
        assert_eq!(
            sort_words(Source::List, &words, &["ALPHA", "LIMIT", "3", "10"]).unwrap(),
            ["pear"]
        );
        assert!(
            sort_words(Source::List, &words, &["ALPHA", "LIMIT", "4", "1"])
                .unwrap()
                .is_empty()
        );
        assert!(
            sort_words(Source::List, &words, &["ALPHA", "LIMIT", "0", "0"])
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            sort_words(
                Source::List,
                &words,
                &["BY", "nosort", "GET", "#", "GET", "x"]
            )
            .unwrap(),
            ["pear", "(nil)", "apple", "(nil)", "fig", "(nil)", "banana", "(nil)"]
        );
        // A set sorted into a STORE is sorted by bytes even with BY nosort (DESC applies).
        assert_eq!(
            sort_words(Source::Set, &words, &["BY", "nosort", "STORE", "d", "DESC"]).unwrap(),
            ["pear", "fig", "banana", "apple"]
        );
        // A set's own order ignores DESC.
        assert_eq!(
            sort_words(Source::Set, &words, &["BY", "nosort", "DESC"]).unwrap(),
            words
        );
    }

    #[test]
    fn options_parse_as_redis_parses_them() {
        let parse = |words: &[&str], read_only| Options::parse(&args(words), read_only);
        assert_eq!(parse(&["LIMIT", "1"], false), Err(errors::syntax()));
        assert_eq!(
            parse(&["LIMIT", "x", "1"], false),
            Err(errors::not_integer())
        );
        assert_eq!(parse(&["STORE", "d"], true), Err(errors::syntax()));
        assert_eq!(parse(&["BY"], false), Err(errors::syntax()));
        assert_eq!(parse(&["nope"], false), Err(errors::syntax()));
        let options = parse(
            &["desc", "ASC", "by", "w_*", "BY", "nosort", "get", "#"],
            false,
        )
        .unwrap();
        assert!(!options.descending && options.no_sort && !options.reads_other_keys());
        assert!(parse(&["BY", "w_*"], false).unwrap().reads_other_keys());
        assert!(parse(&["GET", "h_*->f"], false).unwrap().reads_other_keys());
        assert!(!parse(&["GET", "h_\0*"], false).unwrap().reads_other_keys());
        assert_eq!(parse(&["GET", "#\0x"], false).unwrap().gets, [Get::Element]);
    }

    #[test]
    fn limit_windows_clamp_as_redis_does() {
        assert_eq!(limit_window(5, (0, -1)), 0..5);
        assert_eq!(limit_window(5, (-3, 2)), 0..2);
        assert_eq!(limit_window(5, (3, 100)), 3..5);
        assert_eq!(limit_window(5, (5, 1)), 0..0);
        assert_eq!(limit_window(5, (2, 0)), 0..0);
        assert_eq!(limit_window(5, (1, i64::MAX)), 1..5);
        assert_eq!(limit_window(0, (0, -1)), 0..0);
    }
}
