//! The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers), formatted
//! and parsed as RFC 9651 structured fields.
//!
//! ```text
//! RateLimit-Policy: "NAME";q=LIMIT;w=WINDOW_SECONDS
//! RateLimit: "NAME";r=REMAINING;t=SECONDS_TO_RESET
//! ```
//!
//! The policy name is an sf-string: printable ASCII, with `"` and `\` escaped. Other
//! characters cannot be carried and are replaced by `?` when formatting, so
//! [`parse_item`] gives back exactly what [`format_policy`]/[`format_ratelimit`] were
//! given for every printable-ASCII name.
//!
//! ```
//! use keyward_core::ratelimit::{format_policy, format_ratelimit, parse_item};
//! assert_eq!(format_policy("payments", 100, 60), r#""payments";q=100;w=60"#);
//! assert_eq!(format_ratelimit("payments", 99, 1), r#""payments";r=99;t=1"#);
//!
//! let item = parse_item(&format_policy(r#"a "quoted" \ name"#, 5, 1)).unwrap();
//! assert_eq!(item.name, r#"a "quoted" \ name"#);
//! assert_eq!(item.params, vec![("q".to_owned(), 5), ("w".to_owned(), 1)]);
//! ```

use http::HeaderValue;
use http::header::HeaderName;

/// `RateLimit-Policy`: the quota policies that apply to the request.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what is left of each policy's quota.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// `"NAME";q=LIMIT;w=WINDOW_SECONDS`.
pub fn format_policy(name: &str, limit: u32, window_seconds: u64) -> String {
    item(name, [(";q=", u64::from(limit)), (";w=", window_seconds)])
}

/// `"NAME";r=REMAINING;t=SECONDS_TO_RESET`.
pub fn format_ratelimit(name: &str, remaining: u32, reset_seconds: u64) -> String {
    item(
        name,
        [(";r=", u64::from(remaining)), (";t=", reset_seconds)],
    )
}

/// An sf-string with integer parameters. Written on every quota decision: integers by
/// `itoa`, not the formatting machinery.
fn item<const N: usize>(name: &str, params: [(&str, u64); N]) -> String {
    let mut out = sf_string(name);
    let mut digits = itoa::Buffer::new();
    for (key, value) in params {
        out.push_str(key);
        out.push_str(digits.format(value));
    }
    out
}

/// A formatted field as a header value. The formatters only produce printable ASCII,
/// which is always a valid header value.
pub fn to_header_value(field: String) -> HeaderValue {
    HeaderValue::try_from(field).unwrap_or_else(|_| HeaderValue::from_static("\"?\""))
}

/// An sf-string: printable ASCII in double quotes, `"` and `\` escaped; any other
/// character becomes `?`.
pub fn sf_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 16);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

/// One parsed list item: `"name";key=integer;...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The unescaped sf-string.
    pub name: String,
    /// Integer parameters in order.
    pub params: Vec<(String, u64)>,
}

impl Item {
    /// The value of parameter `key`.
    pub fn param(&self, key: &str) -> Option<u64> {
        self.params
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| *value)
    }
}

/// Parses one item as produced by the formatters: an sf-string followed by
/// `;key=non-negative-integer` parameters. `None` if it is anything else (this is not a
/// general structured-field parser: it accepts what keyward emits).
pub fn parse_item(field: &str) -> Option<Item> {
    let rest = field.trim().strip_prefix('"')?;
    let mut name = String::new();
    let mut chars = rest.char_indices();
    let end = loop {
        let (i, c) = chars.next()?;
        match c {
            '\\' => match chars.next()? {
                (_, e @ ('"' | '\\')) => name.push(e),
                _ => return None,
            },
            '"' => break i + 1,
            ' '..='~' => name.push(c),
            _ => return None,
        }
    };
    let mut params = Vec::new();
    let tail = &rest[end..];
    if !tail.is_empty() {
        for param in tail.strip_prefix(';')?.split(';') {
            let (key, value) = param.split_once('=')?;
            let valid_key = key.starts_with(|c: char| c.is_ascii_lowercase() || c == '*')
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.*".contains(c));
            if !valid_key || value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            params.push((key.to_owned(), value.parse().ok()?));
        }
    }
    Some(Item { name, params })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn non_ascii_is_replaced() {
        assert_eq!(sf_string("café\n"), "\"caf??\"");
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_item("payments;q=1"), None);
        assert_eq!(parse_item("\"open"), None);
        assert_eq!(parse_item("\"a\";q=-1"), None);
        assert_eq!(parse_item("\"a\";Q=1"), None);
        assert_eq!(parse_item("\"a\"q=1"), None);
        assert_eq!(parse_item("\"a\\n\""), None);
    }

    #[test]
    fn header_values_are_valid() {
        let value = to_header_value(format_ratelimit("x\"y", 0, 1));
        assert_eq!(value, r#""x\"y";r=0;t=1"#);
    }

    proptest! {
        #[test]
        fn policy_round_trips(name in "[ -~]{0,40}", q: u32, w: u64) {
            let item = parse_item(&format_policy(&name, q, w)).unwrap();
            prop_assert_eq!(&item.name, &name);
            prop_assert_eq!(item.param("q"), Some(u64::from(q)));
            prop_assert_eq!(item.param("w"), Some(w));
        }

        #[test]
        fn ratelimit_round_trips(name in "[ -~]{0,40}", r: u32, t: u64) {
            let field = format_ratelimit(&name, r, t);
            prop_assert!(HeaderValue::from_str(&field).is_ok());
            let item = parse_item(&field).unwrap();
            prop_assert_eq!(&item.name, &name);
            prop_assert_eq!(item.param("r"), Some(u64::from(r)));
            prop_assert_eq!(item.param("t"), Some(t));
        }

        #[test]
        fn any_name_gives_a_valid_header(name in ".{0,40}") {
            prop_assert!(HeaderValue::from_str(&format_policy(&name, 1, 1)).is_ok());
        }
    }
}
