//! The Redis protocol: parsing client requests and encoding replies.
//!
//! This is the only place that touches RESP bytes. [`parse_request`] tells
//! "need more bytes" (`Ok(None)`) apart from "invalid" (`Err`), never panics,
//! and never reads past the configured [`RequestLimits`]. [`Reply`] is what a
//! command answers; [`Reply::encode`] writes it as RESP2 or RESP3.

use bytes::{BufMut, Bytes, BytesMut};

/// The protocol version a connection speaks (switched with `HELLO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// RESP2, what every connection starts with.
    Resp2,
    /// RESP3, after `HELLO 3`: maps, doubles, nulls and verbatim strings have types of their own.
    Resp3,
}

/// Bounds that keep a client from making the parser allocate without limit.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Most arguments (the command name included) in one request.
    pub max_args: usize,
    /// Longest single bulk string, in bytes.
    pub max_bulk_bytes: usize,
    /// Most bytes of all bulk strings of one request together.
    pub max_request_bytes: usize,
    /// Longest inline command (a line without `*`), in bytes.
    pub max_inline_bytes: usize,
}

impl RequestLimits {
    /// Redis's limits for a client that has not authenticated yet: small requests only.
    pub const UNAUTHENTICATED: RequestLimits = RequestLimits {
        max_args: 10,
        max_bulk_bytes: 16 * 1024,
        max_request_bytes: 160 * 1024,
        max_inline_bytes: 16 * 1024,
    };
}

/// A request that can never become valid; the connection must be closed after replying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl ProtocolError {
    /// The error reply Redis sends before closing the connection.
    pub fn reply(&self) -> Reply {
        Reply::Error(format!("ERR Protocol error: {}", self.0))
    }
}

/// Parses one request from the front of `buf`, removing it.
///
/// Returns `Ok(None)` if more bytes are needed, `Ok(Some(args))` for a request
/// (an empty `args` for a blank line or `*0`, which callers skip), or an error.
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &RequestLimits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] == b'*' {
        parse_multibulk(buf, limits)
    } else {
        parse_inline(buf, limits)
    }
}

/// Where the header line that starts at `from` ends.
enum LineEnd {
    /// No `\n` yet.
    Incomplete,
    /// A `\n` without the `\r` before it.
    Bare,
    /// The index of the `\r` of the closing `\r\n`.
    At(usize),
}

fn find_line_end(buf: &[u8], from: usize) -> LineEnd {
    match buf
        .get(from..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
    {
        None => LineEnd::Incomplete,
        Some(offset) if offset > 0 && buf[from + offset - 1] == b'\r' => {
            LineEnd::At(from + offset - 1)
        }
        Some(_) => LineEnd::Bare,
    }
}

/// Parses a decimal number as Redis does for lengths: optional '-', digits only.
fn parse_length(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = digits
        .iter()
        .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
    Some(if negative { -value } else { value })
}

fn parse_multibulk(
    buf: &mut BytesMut,
    limits: &RequestLimits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    const MAX_HEADER_BYTES: usize = 64;
    let end = match find_line_end(buf, 1) {
        LineEnd::At(end) => end,
        LineEnd::Bare => return Err(ProtocolError("invalid multibulk length".into())),
        LineEnd::Incomplete if buf.len() > MAX_HEADER_BYTES => {
            return Err(ProtocolError("too big mbulk count string".into()))
        }
        LineEnd::Incomplete => return Ok(None),
    };
    let count = parse_length(&buf[1..end])
        .ok_or_else(|| ProtocolError("invalid multibulk length".into()))?;
    if count > limits.max_args as i64 {
        return Err(ProtocolError("invalid multibulk length".into()));
    }
    let mut pos = end + 2;
    let mut declared = 0usize;
    if count <= 0 {
        let _ = buf.split_to(pos);
        return Ok(Some(Vec::new()));
    }
    let mut spans = Vec::with_capacity((count as usize).min(64));
    for _ in 0..count {
        let Some(&first) = buf.get(pos) else {
            return Ok(None);
        };
        if first != b'$' {
            return Err(ProtocolError(format!(
                "expected '$', got '{}'",
                char::from(first).escape_default()
            )));
        }
        let end = match find_line_end(buf, pos + 1) {
            LineEnd::At(end) => end,
            LineEnd::Bare => return Err(ProtocolError("invalid bulk length".into())),
            LineEnd::Incomplete if buf.len() - pos > MAX_HEADER_BYTES => {
                return Err(ProtocolError("too big bulk count string".into()))
            }
            LineEnd::Incomplete => return Ok(None),
        };
        let len = parse_length(&buf[pos + 1..end])
            .ok_or_else(|| ProtocolError("invalid bulk length".into()))?;
        if len < 0 || len as usize > limits.max_bulk_bytes {
            return Err(ProtocolError("invalid bulk length".into()));
        }
        declared += len as usize;
        if declared > limits.max_request_bytes {
            return Err(ProtocolError(format!(
                "request is larger than {} bytes",
                limits.max_request_bytes
            )));
        }
        let start = end + 2;
        let stop = start + len as usize;
        if buf.len() < stop + 2 {
            return Ok(None);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(ProtocolError(
                "bulk string is not terminated by CRLF".into(),
            ));
        }
        spans.push((start, stop));
        pos = stop + 2;
    }
    let request = buf.split_to(pos).freeze();
    Ok(Some(
        spans
            .into_iter()
            .map(|(start, stop)| request.slice(start..stop))
            .collect(),
    ))
}

fn parse_inline(
    buf: &mut BytesMut,
    limits: &RequestLimits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline_bytes {
            return Err(ProtocolError("too big inline request".into()));
        }
        return Ok(None);
    };
    if newline > limits.max_inline_bytes {
        return Err(ProtocolError("too big inline request".into()));
    }
    let line = buf.split_to(newline + 1);
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = split_inline_args(line)
        .ok_or_else(|| ProtocolError("unbalanced quotes in request".into()))?;
    if args.len() > limits.max_args {
        return Err(ProtocolError("invalid multibulk length".into()));
    }
    Ok(Some(args.into_iter().map(Bytes::from).collect()))
}

/// Splits an inline request like Redis's `sdssplitargs`: spaces separate arguments,
/// "double quotes" take escapes (\n \r \t \b \a \\ \" \xHH), 'single quotes' take \'.
/// Returns `None` for unbalanced quotes.
pub(crate) fn split_inline_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            return Some(args);
        }
        let mut arg = Vec::new();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    match line.get(i)? {
                        b'\\'
                            if i + 3 < line.len()
                                && line[i + 1] == b'x'
                                && line[i + 2].is_ascii_hexdigit()
                                && line[i + 3].is_ascii_hexdigit() =>
                        {
                            let hex = std::str::from_utf8(&line[i + 2..i + 4]).ok()?;
                            arg.push(u8::from_str_radix(hex, 16).ok()?);
                            i += 4;
                        }
                        b'\\' if i + 1 < line.len() => {
                            arg.push(match line[i + 1] {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 8,
                                b'a' => 7,
                                other => other,
                            });
                            i += 2;
                        }
                        b'"' => {
                            i += 1;
                            // A closing quote must be followed by a space or the end.
                            if i < line.len() && !line[i].is_ascii_whitespace() {
                                return None;
                            }
                            break;
                        }
                        &byte => {
                            arg.push(byte);
                            i += 1;
                        }
                    }
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    match line.get(i)? {
                        b'\\' if line.get(i + 1) == Some(&b'\'') => {
                            arg.push(b'\'');
                            i += 2;
                        }
                        b'\'' => {
                            i += 1;
                            if i < line.len() && !line[i].is_ascii_whitespace() {
                                return None;
                            }
                            break;
                        }
                        &byte => {
                            arg.push(byte);
                            i += 1;
                        }
                    }
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    arg.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(arg);
    }
}

/// A reply to a client, independent of the protocol version.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`
    Ok,
    /// A status line such as `+PONG`.
    Simple(String),
    /// An error line; the text starts with its code (`ERR ...`, `WRONGTYPE ...`).
    Error(String),
    /// `:<n>`.
    Integer(i64),
    /// A binary-safe string: `$<len>` then the bytes.
    Bulk(Bytes),
    /// A missing value: `$-1` in RESP2, `_` in RESP3.
    Nil,
    /// A missing array: `*-1` in RESP2, `_` in RESP3.
    NilArray,
    /// `*<count>` then the elements.
    Array(Vec<Reply>),
    /// A map: a flat array in RESP2, `%` in RESP3.
    Map(Vec<(Reply, Reply)>),
    /// A double: a bulk string in RESP2, `,` in RESP3.
    Double(f64),
    /// Pairs such as members with scores: a flat array in RESP2, an array of 2-element
    /// arrays in RESP3.
    Pairs(Vec<(Reply, Reply)>),
    /// Text such as INFO's: a bulk string in RESP2, `=` (verbatim, "txt") in RESP3.
    Verbatim(String),
    /// Out-of-band data such as a pub/sub message: `>` in RESP3, an array in RESP2.
    Push(Vec<Reply>),
    /// Several replies to one request, one after the other (SUBSCRIBE of several
    /// channels answers one confirmation each).
    Sequence(Vec<Reply>),
}

impl Reply {
    /// A bulk string from anything byte-like.
    pub fn bulk(bytes: impl Into<Bytes>) -> Reply {
        Reply::Bulk(bytes.into())
    }

    /// An error reply; `text` must start with the error code.
    pub fn error(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }

    /// Whether this reply is an error.
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// Appends the encoding of this reply to `out`.
    pub fn encode(&self, protocol: Protocol, out: &mut BytesMut) {
        match self {
            Reply::Ok => out.put_slice(b"+OK\r\n"),
            Reply::Simple(text) => line(out, b'+', text.as_bytes()),
            Reply::Error(text) => line(out, b'-', text.as_bytes()),
            Reply::Integer(n) => {
                out.put_u8(b':');
                out.put_slice(n.to_string().as_bytes());
                out.put_slice(b"\r\n");
            }
            Reply::Bulk(bytes) => bulk(out, bytes),
            Reply::Nil => match protocol {
                Protocol::Resp2 => out.put_slice(b"$-1\r\n"),
                Protocol::Resp3 => out.put_slice(b"_\r\n"),
            },
            Reply::NilArray => match protocol {
                Protocol::Resp2 => out.put_slice(b"*-1\r\n"),
                Protocol::Resp3 => out.put_slice(b"_\r\n"),
            },
            Reply::Array(items) => {
                header(out, b'*', items.len());
                for item in items {
                    item.encode(protocol, out);
                }
            }
            Reply::Map(pairs) => {
                match protocol {
                    Protocol::Resp2 => header(out, b'*', pairs.len() * 2),
                    Protocol::Resp3 => header(out, b'%', pairs.len()),
                }
                for (key, value) in pairs {
                    key.encode(protocol, out);
                    value.encode(protocol, out);
                }
            }
            Reply::Pairs(pairs) => match protocol {
                Protocol::Resp2 => {
                    header(out, b'*', pairs.len() * 2);
                    for (first, second) in pairs {
                        first.encode(protocol, out);
                        second.encode(protocol, out);
                    }
                }
                Protocol::Resp3 => {
                    header(out, b'*', pairs.len());
                    for (first, second) in pairs {
                        header(out, b'*', 2);
                        first.encode(protocol, out);
                        second.encode(protocol, out);
                    }
                }
            },
            Reply::Double(value) => {
                let text = format_double(*value);
                match protocol {
                    Protocol::Resp2 => bulk(out, text.as_bytes()),
                    Protocol::Resp3 => line(out, b',', text.as_bytes()),
                }
            }
            Reply::Verbatim(text) => match protocol {
                Protocol::Resp2 => bulk(out, text.as_bytes()),
                Protocol::Resp3 => {
                    header(out, b'=', text.len() + 4);
                    out.put_slice(b"txt:");
                    out.put_slice(text.as_bytes());
                    out.put_slice(b"\r\n");
                }
            },
            Reply::Push(items) => {
                match protocol {
                    Protocol::Resp2 => header(out, b'*', items.len()),
                    Protocol::Resp3 => header(out, b'>', items.len()),
                }
                for item in items {
                    item.encode(protocol, out);
                }
            }
            Reply::Sequence(replies) => {
                for reply in replies {
                    reply.encode(protocol, out);
                }
            }
        }
    }
}

fn line(out: &mut BytesMut, prefix: u8, text: &[u8]) {
    out.reserve(text.len() + 3);
    out.put_u8(prefix);
    // A status or error line must not contain line breaks.
    out.extend(
        text.iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.put_slice(b"\r\n");
}

fn header(out: &mut BytesMut, prefix: u8, len: usize) {
    out.put_u8(prefix);
    out.put_slice(len.to_string().as_bytes());
    out.put_slice(b"\r\n");
}

fn bulk(out: &mut BytesMut, bytes: &[u8]) {
    out.reserve(bytes.len() + 16);
    header(out, b'$', bytes.len());
    out.put_slice(bytes);
    out.put_slice(b"\r\n");
}

/// Formats a double as Redis 7.0 replies with one (a sorted set's score): `%.17g`, and
/// `inf`/`-inf` for infinities.
pub fn format_double(value: f64) -> String {
    if value.is_infinite() {
        return if value > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    if value.is_nan() {
        return "nan".into();
    }
    let mut out = [0u8; 64];
    // SAFETY: the buffer is valid for its length, the format string is NUL-terminated
    // and takes one double; snprintf writes at most `out.len()` bytes with the NUL.
    let len =
        unsafe { libc::snprintf(out.as_mut_ptr().cast(), out.len(), c"%.17g".as_ptr(), value) };
    String::from_utf8_lossy(&out[..(len.max(0) as usize).min(out.len() - 1)]).into_owned()
}

/// Parses an integer argument or stored value as Redis does: optional '-', digits,
/// no leading zeros, no spaces, no '+', within i64.
pub fn parse_i64(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    if bytes == b"0" {
        return Some(0);
    }
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    match digits.first() {
        Some(b'1'..=b'9') if digits.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(bytes).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// Parses a float argument or stored value: no surrounding spaces, no NaN.
#[cfg(test)]
pub(crate) fn parse_f64(bytes: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(bytes).ok()?;
    if text.is_empty() || text.trim() != text {
        return None;
    }
    let value: f64 = text.parse().ok()?;
    (!value.is_nan()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_args: 16,
        max_bulk_bytes: 32,
        max_request_bytes: 80,
        max_inline_bytes: 64,
    };

    fn parse(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse_request(&mut BytesMut::from(input), &LIMITS)
    }

    fn args(list: &[&str]) -> Vec<Bytes> {
        list.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn multibulk_request() {
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*1\r\n$4\r\nPING\r\n"[..]);
        assert_eq!(
            parse_request(&mut buf, &LIMITS).unwrap(),
            Some(args(&["GET", "a"]))
        );
        assert_eq!(
            parse_request(&mut buf, &LIMITS).unwrap(),
            Some(args(&["PING"]))
        );
        assert_eq!(parse_request(&mut buf, &LIMITS).unwrap(), None);
    }

    #[test]
    fn every_prefix_of_a_request_is_incomplete() {
        let full = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(
                parse_request(&mut buf, &LIMITS).unwrap(),
                None,
                "prefix of {cut} bytes"
            );
            assert_eq!(buf.len(), cut, "an incomplete parse consumes nothing");
        }
        assert_eq!(parse(full).unwrap(), Some(args(&["SET", "key", "value"])));
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert_eq!(parse(b"*x\r\n").unwrap_err().0, "invalid multibulk length");
        assert_eq!(parse(b"*99\r\n").unwrap_err().0, "invalid multibulk length");
        assert_eq!(
            parse(b"*1\r\n+OK\r\n").unwrap_err().0,
            "expected '$', got '+'"
        );
        assert_eq!(
            parse(b"*1\r\n$-5\r\n").unwrap_err().0,
            "invalid bulk length"
        );
        assert_eq!(
            parse(b"*1\r\n$33\r\n").unwrap_err().0,
            "invalid bulk length"
        );
        assert_eq!(
            parse(b"*1\r\n$1\r\nabc\r\n").unwrap_err().0,
            "bulk string is not terminated by CRLF"
        );
        assert!(parse(b"*1\n").is_err());
        // Each bulk is within its limit, but together they pass the request limit.
        let mut big = b"*4\r\n".to_vec();
        for _ in 0..4 {
            big.extend_from_slice(b"$30\r\n");
            big.extend_from_slice(&[b'x'; 30]);
            big.extend_from_slice(b"\r\n");
        }
        assert_eq!(
            parse(&big).unwrap_err().0,
            "request is larger than 80 bytes"
        );
        assert!(parse(&[b'*'; 100]).is_err());
    }

    #[test]
    fn empty_multibulk_is_skipped() {
        assert_eq!(parse(b"*0\r\n").unwrap(), Some(vec![]));
        assert_eq!(parse(b"*-1\r\n").unwrap(), Some(vec![]));
    }

    #[test]
    fn inline_requests() {
        assert_eq!(parse(b"PING\r\n").unwrap(), Some(args(&["PING"])));
        assert_eq!(
            parse(b"set a \"b c\"\n").unwrap(),
            Some(args(&["set", "a", "b c"]))
        );
        assert_eq!(
            parse(b"set a 'it\\'s'\r\n").unwrap(),
            Some(args(&["set", "a", "it's"]))
        );
        assert_eq!(
            parse(b"echo \"\\x41\\n\"\r\n").unwrap(),
            Some(args(&["echo", "A\n"]))
        );
        assert_eq!(parse(b"\r\n").unwrap(), Some(vec![]));
        assert_eq!(parse(b"PING").unwrap(), None);
        assert_eq!(
            parse(b"set a \"b\r\n").unwrap_err().0,
            "unbalanced quotes in request"
        );
        assert_eq!(parse(&[b'a'; 100]).unwrap_err().0, "too big inline request");
    }

    fn encoded(reply: &Reply, protocol: Protocol) -> Vec<u8> {
        let mut out = BytesMut::new();
        reply.encode(protocol, &mut out);
        out.to_vec()
    }

    #[test]
    fn replies_in_both_protocols() {
        use Protocol::*;
        assert_eq!(encoded(&Reply::Nil, Resp2), b"$-1\r\n");
        assert_eq!(encoded(&Reply::Nil, Resp3), b"_\r\n");
        assert_eq!(encoded(&Reply::Integer(-3), Resp2), b":-3\r\n");
        assert_eq!(encoded(&Reply::bulk("ab"), Resp3), b"$2\r\nab\r\n");
        let map = Reply::Map(vec![(Reply::bulk("k"), Reply::Integer(1))]);
        assert_eq!(encoded(&map, Resp2), b"*2\r\n$1\r\nk\r\n:1\r\n");
        assert_eq!(encoded(&map, Resp3), b"%1\r\n$1\r\nk\r\n:1\r\n");
        assert_eq!(encoded(&Reply::Double(1.5), Resp2), b"$3\r\n1.5\r\n");
        assert_eq!(encoded(&Reply::Double(1.5), Resp3), b",1.5\r\n");
        assert_eq!(
            encoded(&Reply::Verbatim("a".into()), Resp3),
            b"=5\r\ntxt:a\r\n"
        );
        assert_eq!(
            encoded(&Reply::error("ERR a\r\nb"), Resp2),
            b"-ERR a  b\r\n"
        );
    }

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-42"), Some(-42));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"+1",
            b"01",
            b"-0",
            b" 1",
            b"1 ",
            b"1.0",
            b"9223372036854775808",
            b"abc",
            b"-",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse_f64(b"1.5"), Some(1.5));
        assert_eq!(parse_f64(b"1e3"), Some(1000.0));
        assert_eq!(parse_f64(b"nan"), None);
        assert_eq!(parse_f64(b" 1"), None);
    }

    #[test]
    fn doubles_print_like_redis() {
        assert_eq!(format_double(10.5), "10.5");
        assert_eq!(format_double(0.1), "0.10000000000000001");
        assert_eq!(format_double(3.0), "3");
        assert_eq!(format_double(1e300), "1.0000000000000001e+300");
        assert_eq!(format_double(f64::INFINITY), "inf");
        assert_eq!(format_double(f64::NEG_INFINITY), "-inf");
    }
}
