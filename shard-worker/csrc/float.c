/* INCRBYFLOAT arithmetic in long double, parsed and printed exactly as Redis
 * does (string2ld and ld2string with LD_STR_HUMAN), so that results match
 * byte for byte. Rust has no long double, hence this file. */

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LONG_DOUBLE_CHARS (5 * 1024)

/* Returns 1 and sets *out if buf[0..len) is a whole, valid long double. */
static int parse_ld(const char *buf, size_t len, long double *out) {
    char text[MAX_LONG_DOUBLE_CHARS];
    char *end;
    long double value;
    if (len == 0 || len >= sizeof(text)) return 0;
    memcpy(text, buf, len);
    text[len] = '\0';
    errno = 0;
    value = strtold(text, &end);
    /* The whole buffer must be the number: an embedded NUL ends strtold early. */
    if (isspace((unsigned char)text[0]) || end[0] != '\0' || (size_t)(end - text) != len ||
        (errno == ERANGE && (value == HUGE_VALL || value == -HUGE_VALL || fpclassify(value) == FP_ZERO)) ||
        isnan(value))
        return 0;
    *out = value;
    return 1;
}

/* Adds incr to value (value_len 0 means a missing key: 0). Writes the result
 * to out. Returns 0 on success, 1 if the stored value is not a float, 2 if the
 * increment is not a float, 3 if the result is NaN or infinite, 4 if out is
 * too small. */
int shoal_incr_by_float(const char *value, size_t value_len, int has_value, const char *incr, size_t incr_len,
                        char *out, size_t out_cap, size_t *out_len) {
    long double current = 0, delta, result;
    int written;
    char *dot;
    if (!parse_ld(incr, incr_len, &delta)) return 2;
    if (has_value && !parse_ld(value, value_len, &current)) return 1;
    result = current + delta;
    if (isnan(result) || isinf(result)) return 3;
    written = snprintf(out, out_cap, "%.17Lf", result);
    if (written < 0 || (size_t)written + 1 > out_cap) return 4;
    dot = strchr(out, '.');
    if (dot != NULL) {
        char *p = out + written - 1;
        while (*p == '0') {
            p--;
            written--;
        }
        if (*p == '.') written--;
    }
    if (written == 2 && out[0] == '-' && out[1] == '0') {
        out[0] = '0';
        written = 1;
    }
    *out_len = (size_t)written;
    return 0;
}
