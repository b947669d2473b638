//! One spelling per request path and query: what route matching and keys see.
//!
//! Upstream frameworks decode `/accounts/%34%32` to account 42, merge `//`, resolve
//! `/../` and often ignore a trailing slash. If keyward keyed on the raw spelling, every
//! such variant would be a separate key: a second serial holder, a second quota bucket,
//! an unmatched path that reaches the upstream uncoordinated. So keyward routes and keys
//! on [`canonical_path`], and the sidecar forwards that form (as Envoy does with
//! `normalize_path` + `merge_slashes`).
//!
//! The canonical path:
//!
//! - decodes every percent-escape and re-encodes each byte one way: unreserved
//!   characters, sub-delimiters, `:` and `@` raw, everything else `%XX` with upper-case
//!   hex (so `%34%32` is `42`, `%c3%a9` is `%C3%A9`, `%21` is `!`);
//! - merges repeated slashes, drops `.` segments, resolves `..` (never above the root)
//!   and drops a trailing slash (Express and many others route `/a/` as `/a`).
//!
//! Some spellings have no single meaning and are refused ([`PathError`]): an encoded
//! slash `%2F` (one segment to some frameworks, two to nginx), a backslash raw or encoded
//! (a separator to some servers), an encoded NUL, and a `%` not followed by two hex
//! digits.

use std::borrow::Cow;

/// A path keyward refuses because upstreams disagree about what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F` inside a segment.
    #[error("the path contains an encoded slash (%2F), which upstreams read differently")]
    EncodedSlash,
    /// `\` or `%5C`.
    #[error("the path contains a backslash, which some upstreams treat as a slash")]
    Backslash,
    /// A NUL byte, raw or `%00`.
    #[error("the path contains a NUL byte (%00)")]
    Nul,
    /// `%` not followed by two hex digits.
    #[error("the path contains a '%' that is not followed by two hex digits")]
    BadEscape,
    /// Neither `/...` nor `*`.
    #[error("the path does not start with '/'")]
    NotAbsolute,
}

/// The canonical form of `path` (see the [module docs](self)); borrowed when `path` is
/// already canonical. `*` (as in `OPTIONS *`) is its own canonical form.
///
/// ```
/// use keyward_core::canon::{PathError, canonical_path};
/// assert_eq!(canonical_path("/accounts/%34%32").unwrap(), "/accounts/42");
/// assert_eq!(canonical_path("//a/./b/../c/").unwrap(), "/a/c");
/// assert_eq!(canonical_path("/a/%c3%a9").unwrap(), "/a/%C3%A9");
/// assert_eq!(canonical_path("/a/4%2F2"), Err(PathError::EncodedSlash));
/// ```
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    // Nearly every path is canonical already: check that without allocating.
    if rest.is_empty() || rest.split('/').all(is_canonical_segment) {
        return Ok(Cow::Borrowed(path));
    }
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for raw in rest.split('/') {
        let decoded = decode_segment(raw)?;
        match decoded.as_slice() {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            _ => segments.push(decoded),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        encode(&mut out, segment, is_path_safe, false);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// The canonical form of a query string, for keys that cover the whole query
/// (`method_uri`): each `name=value` pair decoded as `application/x-www-form-urlencoded`
/// (`+` is a space), re-encoded one way, empty pairs dropped, pairs sorted. A `%` that
/// starts no escape is taken literally. The query the upstream receives is not changed.
///
/// ```
/// use keyward_core::canon::canonical_query;
/// assert_eq!(canonical_query("b=%32&a=x+y&&c"), "a=x+y&b=2&c=");
/// assert_eq!(canonical_query("a=x%20y"), canonical_query("a=x+y"));
/// ```
pub fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let mut out = String::with_capacity(pair.len() + 1);
            encode(&mut out, &form_decode(name), is_unreserved, true);
            out.push('=');
            encode(&mut out, &form_decode(value), is_unreserved, true);
            out
        })
        .collect();
    pairs.sort_unstable();
    pairs.join("&")
}

/// Decodes `application/x-www-form-urlencoded` text to bytes: `+` is a space, `%XX` a
/// byte, a `%` that starts no escape stays itself.
pub fn form_decode(input: &str) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], escape_at(bytes, i)) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn is_canonical_segment(segment: &str) -> bool {
    !matches!(segment, "" | "." | "..") && segment.bytes().all(is_path_safe)
}

fn decode_segment(raw: &str) -> Result<Vec<u8>, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = match bytes[i] {
            b'%' => {
                let byte = escape_at(bytes, i).ok_or(PathError::BadEscape)?;
                i += 3;
                if byte == b'/' {
                    return Err(PathError::EncodedSlash);
                }
                byte
            }
            byte => {
                i += 1;
                byte
            }
        };
        // Raw or encoded alike: a raw NUL would otherwise come out as `%00`, which is
        // refused, and the canonical form would not be canonical (found by fuzz/canon).
        match byte {
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::Nul),
            byte => out.push(byte),
        }
    }
    Ok(out)
}

/// The byte an escape `%XY` at `i` stands for.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    if bytes.get(i) != Some(&b'%') {
        return None;
    }
    let hi = hex(*bytes.get(i + 1)?)?;
    let lo = hex(*bytes.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` minus `%`: what a path segment may hold unencoded.
fn is_path_safe(byte: u8) -> bool {
    is_unreserved(byte)
        || matches!(
            byte,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn encode(out: &mut String, bytes: &[u8], safe: fn(u8) -> bool, space_as_plus: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in bytes {
        if safe(byte) {
            out.push(char::from(byte));
        } else if space_as_plus && byte == b' ' {
            out.push('+');
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_spelling_of_one_path_is_one_canonical_path() {
        for spelling in [
            "/accounts/42",
            "/accounts/%34%32",
            "/accounts/%34%32/",
            "//accounts//42//",
            "/accounts/./42",
            "/accounts/%2e/42",
            "/x/../accounts/42",
            "/x/%2E%2E/accounts/42",
            "/../../accounts/42",
        ] {
            assert_eq!(
                canonical_path(spelling).unwrap(),
                "/accounts/42",
                "{spelling}"
            );
        }
        assert_eq!(canonical_path("/").unwrap(), "/");
        assert_eq!(canonical_path("/..").unwrap(), "/");
        assert_eq!(canonical_path("*").unwrap(), "*");
        assert_eq!(canonical_path("/a%21b").unwrap(), "/a!b");
        assert_eq!(canonical_path("/a%20b").unwrap(), "/a%20b");
        assert_eq!(canonical_path("/a\"b").unwrap(), "/a%22b");
        assert_eq!(canonical_path("/%25").unwrap(), "/%25");
        assert!(matches!(canonical_path("/a/b"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (path, err) in [
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::Backslash),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::Nul),
            ("/a\0", PathError::Nul),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("a", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ] {
            assert_eq!(canonical_path(path), Err(err), "{path}");
        }
    }

    /// Found by `fuzz/` (canon) within seconds: a raw NUL byte was kept and came out as
    /// `%00`, which the second pass refused, so the canonical form was not canonical.
    #[test]
    fn a_raw_nul_is_refused_like_an_encoded_one() {
        let input = include_bytes!("../tests/fuzz-regressions/canon-raw-nul");
        let input = std::str::from_utf8(input).unwrap();
        let path = input.split_once('?').map_or(input, |(path, _)| path);
        assert_eq!(canonical_path(path), Err(PathError::Nul));
    }

    #[test]
    fn query_spellings_are_one_canonical_query() {
        assert_eq!(canonical_query(""), "");
        assert_eq!(canonical_query("&&"), "");
        assert_eq!(canonical_query("a"), canonical_query("a="));
        assert_eq!(canonical_query("a=%31&b=2"), canonical_query("b=2&a=1"));
        assert_eq!(canonical_query("q=100%"), "q=100%25");
        assert_eq!(canonical_query("q=%2B"), "q=%2B");
        assert_ne!(canonical_query("q=%2B"), canonical_query("q=+"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Canonical paths are fixed points, parse as URI paths, and a path and its
        /// canonical form route the same.
        #[test]
        fn canonical_path_is_idempotent(path in "/[a-zA-Z0-9%./\\\\!~_:@;+*-]{0,40}") {
            if let Ok(once) = canonical_path(&path) {
                let twice = canonical_path(&once).unwrap();
                prop_assert_eq!(&twice, &once);
                prop_assert!(once.parse::<http::uri::PathAndQuery>().is_ok(), "{}", once);
                prop_assert!(!once.contains("//") && !once.contains("/./"));
                prop_assert!(once.len() == 1 || !once.ends_with('/'));
            }
        }

        /// The allocation-free check agrees with the full canonicalization.
        #[test]
        fn the_fast_path_changes_nothing(path in "/[a-z0-9%./!;:@-]{0,20}") {
            let canonical = canonical_path(&path);
            if let Ok(Cow::Borrowed(same)) = &canonical {
                prop_assert_eq!(*same, path.as_str());
            }
            if let Ok(Cow::Owned(changed)) = &canonical {
                prop_assert_ne!(changed, &path);
            }
        }

        #[test]
        fn canonical_path_never_panics(path in any::<String>()) {
            if let Ok(once) = canonical_path(&path) {
                prop_assert_eq!(canonical_path(&once).unwrap(), once.clone());
            }
        }

        #[test]
        fn canonical_query_is_idempotent(query in "[a-z0-9%=&+ .]{0,40}") {
            let once = canonical_query(&query);
            prop_assert_eq!(canonical_query(&once), once.clone());
        }
    }
}
