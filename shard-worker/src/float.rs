//! INCRBYFLOAT arithmetic, in long double through `csrc/float.c`, so that
//! parsing, overflow and formatting match Redis exactly.

use std::os::raw::{c_char, c_int};

use shoal_shared::frame::WorkerError;

extern "C" {
    fn shoal_incr_by_float(
        value: *const c_char,
        value_len: usize,
        has_value: c_int,
        incr: *const c_char,
        incr_len: usize,
        out: *mut c_char,
        out_cap: usize,
        out_len: *mut usize,
    ) -> c_int;
}

/// Longest result text: a long double printed with 17 decimals.
const OUT_BYTES: usize = 5 * 1024;

/// `value + increment`, both as Redis float text; `None` for a missing key (0).
pub(crate) fn incr_by_float(
    value: Option<&[u8]>,
    increment: &[u8],
) -> Result<Vec<u8>, WorkerError> {
    let mut out = vec![0u8; OUT_BYTES];
    let mut out_len = 0usize;
    let (value_ptr, value_len) = value.map_or((std::ptr::null(), 0), |v| (v.as_ptr(), v.len()));
    // SAFETY: every pointer is valid for the length passed with it; the C function writes
    // at most `out.len()` bytes to `out` and stores the length it wrote in `out_len`.
    let code = unsafe {
        shoal_incr_by_float(
            value_ptr.cast(),
            value_len,
            c_int::from(value.is_some()),
            increment.as_ptr().cast(),
            increment.len(),
            out.as_mut_ptr().cast(),
            out.len(),
            &mut out_len,
        )
    };
    match code {
        0 => {
            out.truncate(out_len.min(OUT_BYTES));
            Ok(out)
        }
        3 => Err(WorkerError::NanOrInfinity),
        _ => Err(WorkerError::NotFloat),
    }
}

#[cfg(test)]
mod tests {
    use super::incr_by_float;
    use shoal_shared::frame::WorkerError;

    fn incr(value: Option<&str>, by: &str) -> Result<String, WorkerError> {
        incr_by_float(value.map(str::as_bytes), by.as_bytes())
            .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn matches_redis() {
        // Results of the same commands on redis-server 7.
        assert_eq!(incr(Some("0.1"), "0.2").unwrap(), "0.3");
        assert_eq!(incr(Some("10.50"), "0.1").unwrap(), "10.6");
        assert_eq!(
            incr(Some("10.6"), "-5e3").unwrap(),
            "-4989.39999999999999991"
        );
        assert_eq!(incr(Some("5.0e3"), "2.0e2").unwrap(), "5200");
        assert_eq!(incr(None, "0x10").unwrap(), "16");
        assert_eq!(incr(Some("1"), "-1").unwrap(), "0");
        assert!(incr(None, "1e400")
            .unwrap()
            .starts_with("100000000000000000002818806839475865"));
        assert_eq!(incr(None, "1e5000"), Err(WorkerError::NotFloat));
        assert_eq!(incr(Some("abc"), "1"), Err(WorkerError::NotFloat));
        assert_eq!(incr(Some(" 1"), "1"), Err(WorkerError::NotFloat));
        assert_eq!(incr(Some("\0\u{ff}"), "1"), Err(WorkerError::NotFloat));
        assert_eq!(incr(Some(""), "1"), Err(WorkerError::NotFloat));
        assert_eq!(incr(None, "nan"), Err(WorkerError::NotFloat));
        assert_eq!(incr(Some("inf"), "1"), Err(WorkerError::NanOrInfinity));
    }
}
