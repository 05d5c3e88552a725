//! Redis-style glob patterns (`*`, `?`, `[abc]`, `[^a-z]`, `\x`), as used by
//! CONFIG GET, KEYS and SCAN MATCH. Matching is iterative with one backtrack
//! point, so a hostile pattern costs O(pattern × text), never exponential time.

/// Whether `text` matches `pattern`.
pub fn glob_match(pattern: &[u8], text: &[u8], nocase: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    while p < pattern.len() && pattern[p] == b'*' {
                        p += 1;
                    }
                    if p == pattern.len() {
                        return true;
                    }
                    backtrack = Some((p, t + 1));
                    continue;
                }
                b'?' => {
                    p += 1;
                    t += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_class(pattern, p, text[t], nocase) {
                        if matched {
                            p = next;
                            t += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if eq(pattern[p + 1], text[t]) {
                        p += 2;
                        t += 1;
                        continue;
                    }
                }
                c => {
                    if eq(c, text[t]) {
                        p += 1;
                        t += 1;
                        continue;
                    }
                }
            }
        }
        match backtrack {
            Some((star_p, star_t)) => {
                p = star_p;
                t = star_t;
                backtrack = Some((star_p, star_t + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches one byte against the class starting at `pattern[start] == b'['`.
/// Returns whether it matched and the index after the class.
fn match_class(pattern: &[u8], start: usize, byte: u8, nocase: bool) -> Option<(bool, usize)> {
    let fold = |c: u8| if nocase { c.to_ascii_lowercase() } else { c };
    let byte = fold(byte);
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        match *pattern.get(i)? {
            b']' => return Some((matched != negate, i + 1)),
            b'\\' => {
                i += 1;
                matched |= fold(*pattern.get(i)?) == byte;
                i += 1;
            }
            low if pattern.get(i + 1) == Some(&b'-')
                && pattern.get(i + 2).is_some_and(|&c| c != b']') =>
            {
                let (a, b) = (fold(low), fold(pattern[i + 2]));
                let (a, b) = if a <= b { (a, b) } else { (b, a) };
                matched |= (a..=b).contains(&byte);
                i += 3;
            }
            c => {
                matched |= fold(c) == byte;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    fn m(p: &str, t: &str) -> bool {
        glob_match(p.as_bytes(), t.as_bytes(), false)
    }

    #[test]
    fn patterns() {
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h*llo", "heeeello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("*max*", "maxclients"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(!m("[abc", "a"));
        assert!(glob_match(b"MAX*", b"maxclients", true));
    }

    #[test]
    fn hostile_patterns_finish() {
        let text = "a".repeat(2000);
        assert!(!m(&"*a".repeat(500).replace("*a*a", "*a*b"), &text));
    }
}
