//! Request bodies as JSON: strict parsing (I-JSON, RFC 7493: no duplicate member names),
//! JSON Pointers (RFC 6901) and the canonical form of RFC 8785 (JCS), so that two
//! spellings of one JSON document are recognised as one request.
//!
//! ```
//! use keyward_core::json::{JsonIdentity, JsonPointer};
//!
//! let identity = JsonIdentity::canonical().exclude(JsonPointer::parse("/sent_at").unwrap());
//! let first = identity.identity(br#"{"amount": 10.0, "to": "bob", "sent_at": 1}"#).unwrap();
//! let retry = identity.identity(br#"{"to":"bob","amount":1E1,"sent_at":2}"#).unwrap();
//! assert_eq!(first, retry);
//! assert_eq!(first, br#"{"amount":10,"to":"bob"}"#);
//! ```

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a body is not usable as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON, or JSON that is not I-JSON (a member name twice, a number out of the
    /// range of an IEEE 754 double, a lone surrogate).
    #[error("the body is not I-JSON: {0}")]
    Invalid(String),
}

/// A JSON Pointer (RFC 6901), such as `/order/id` or `/items/0`; `""` is the whole
/// document.
///
/// ```
/// use keyward_core::json::JsonPointer;
/// let pointer = JsonPointer::parse("/a~1b/m~0n").unwrap();
/// let doc = serde_json::json!({"a/b": {"m~n": "found"}});
/// assert_eq!(pointer.find(&doc), Some(&serde_json::json!("found")));
/// assert!(JsonPointer::parse("no-slash").is_err());
/// assert!(JsonPointer::parse("/bad~2escape").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonPointer {
    text: String,
    tokens: Vec<String>,
}

/// A JSON Pointer that does not parse; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON pointer {pointer:?}: {reason}")]
pub struct PointerError {
    /// The pointer as given.
    pub pointer: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl JsonPointer {
    /// Parses an RFC 6901 pointer: empty, or `/`-separated reference tokens in which `~1`
    /// stands for `/` and `~0` for `~`.
    pub fn parse(text: &str) -> Result<Self, PointerError> {
        let bad = |reason| PointerError {
            pointer: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Ok(JsonPointer {
                text: String::new(),
                tokens: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(bad("must be empty or start with '/'"));
        };
        let tokens = rest
            .split('/')
            .map(|token| unescape(token).ok_or_else(|| bad("'~' must be followed by 0 or 1")))
            .collect::<Result<_, _>>()?;
        Ok(JsonPointer {
            text: text.to_owned(),
            tokens,
        })
    }

    /// The pointer as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value the pointer names in `doc`, if any. An array index is a decimal number
    /// without leading zeros (`-`, the element after the last, names nothing).
    pub fn find<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        self.tokens
            .iter()
            .try_fold(doc, |value, token| match value {
                Value::Object(members) => members.get(token),
                Value::Array(items) => items.get(index(token)?),
                _ => None,
            })
    }

    /// Removes the member the pointer names from its object, if there is one. Pointers to
    /// array elements and to the whole document remove nothing: removing an element
    /// would renumber the ones after it.
    fn remove(&self, doc: &mut Value) {
        let Some((last, parents)) = self.tokens.split_last() else {
            return;
        };
        let parent = parents.iter().try_fold(doc, |value, token| match value {
            Value::Object(members) => members.get_mut(token),
            Value::Array(items) => items.get_mut(index(token)?),
            _ => None,
        });
        if let Some(Value::Object(members)) = parent {
            members.remove(last);
        }
    }
}

impl fmt::Debug for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonPointer({:?})", self.text)
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for JsonPointer {
    type Err = PointerError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        JsonPointer::parse(text)
    }
}

fn unescape(token: &str) -> Option<String> {
    if !token.contains('~') {
        return Some(token.to_owned());
    }
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        if c != '~' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => out.push('~'),
            Some('1') => out.push('/'),
            _ => return None,
        }
    }
    Some(out)
}

fn index(token: &str) -> Option<usize> {
    let digits = token.bytes().all(|b| b.is_ascii_digit());
    if token.is_empty() || !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// Parses `bytes` as I-JSON (RFC 7493): JSON in UTF-8 with no member name twice in an
/// object and every number within an IEEE 754 double. A duplicate is refused rather than
/// resolved: parsers disagree on which of two `"amount"` members counts, so a body with
/// both could mean one thing to keyward and another to the service. Nesting is bounded
/// (128 levels, serde_json's limit).
///
/// ```
/// use keyward_core::json::parse_strict;
/// assert!(parse_strict(br#"{"a": 1, "b": [true, null]}"#).is_ok());
/// assert!(parse_strict(br#"{"amount": 1, "amount": 1000}"#).is_err());
/// assert!(parse_strict(b"1e400").is_err());
/// ```
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonError> {
    serde_json::from_slice::<Strict>(bytes)
        .map(|strict| strict.0)
        .map_err(|error| JsonError::Invalid(error.to_string()))
}

/// A value parsed with duplicate member names refused.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number out of the range of a double"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if members.insert(name, value).is_some() {
                return Err(de::Error::custom(
                    "a member name appears twice in one object",
                ));
            }
        }
        Ok(Value::Object(members))
    }
}

/// The canonical form of `value` (RFC 8785): members sorted by their UTF-16 code units,
/// no whitespace, strings with the minimal escapes, numbers as ECMAScript writes a
/// double (`1E1` and `10.0` are `10`, `1e21` is `1e+21`).
///
/// Written here rather than through a serializer: this runs on every request of a route
/// that fingerprints JSON, and sorting names by comparing their UTF-16 units in place
/// (no copy, no re-parse) is several times cheaper. The tests check it against the RFC's
/// examples and, on random documents, against `serde_json_canonicalizer`.
pub fn canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_number(number, out),
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (name, member)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(name, out);
                out.push(b':');
                write_canonical(member, out);
            }
            out.push(b'}');
        }
    }
}

/// Every number is an IEEE 754 double, written as ECMAScript's `Number::toString`
/// (integers beyond 2^53 included: the value an ECMAScript peer would send back).
fn write_number(number: &Number, out: &mut Vec<u8>) {
    // Without `arbitrary_precision` every `Number` converts; `Number` holds no NaN or
    // infinity.
    let value = number.as_f64().unwrap_or(0.0);
    if value == 0.0 {
        // `-0` too.
        out.push(b'0');
        return;
    }
    let mut buffer = ryu_js::Buffer::new();
    out.extend_from_slice(buffer.format_finite(value).as_bytes());
}

/// A string with RFC 8785's escapes: `"` and `\`, the short forms of backspace, tab,
/// line feed, form feed and carriage return, `\u00xx` (lowercase) for the other control
/// characters, everything else as it is.
fn write_string(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0x0f)]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

/// Which part of a JSON body identifies a request, and in which form: the canonical
/// JSON of the whole document ([`JsonIdentity::canonical`]), without some members
/// ([`JsonIdentity::exclude`]: a client timestamp, a trace id), or only some of them
/// ([`JsonIdentity::include`]). Excludes apply first, then includes select.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JsonIdentity {
    include: Vec<JsonPointer>,
    exclude: Vec<JsonPointer>,
}

impl JsonIdentity {
    /// The whole document, in canonical form.
    pub fn canonical() -> Self {
        Self::default()
    }

    /// Leaves the member at `pointer` out (a pointer to an array element or to nothing
    /// leaves the document as it is).
    pub fn exclude(mut self, pointer: JsonPointer) -> Self {
        self.exclude.push(pointer);
        self
    }

    /// Identifies the request by the value at `pointer` (and every other included
    /// pointer) only; a missing value and `null` differ.
    pub fn include(mut self, pointer: JsonPointer) -> Self {
        self.include.push(pointer);
        self
    }

    /// The pointers included, in order.
    pub fn included(&self) -> &[JsonPointer] {
        &self.include
    }

    /// The pointers excluded, in order.
    pub fn excluded(&self) -> &[JsonPointer] {
        &self.exclude
    }

    /// The bytes that identify `body`: the canonical JSON of what is selected. With
    /// includes, an array holding for each included pointer `[value]`, or `[]` where it
    /// names nothing.
    pub fn identity(&self, body: &[u8]) -> Result<Vec<u8>, JsonError> {
        let mut doc = parse_strict(body)?;
        for pointer in &self.exclude {
            pointer.remove(&mut doc);
        }
        if self.include.is_empty() {
            return Ok(canonical(&doc));
        }
        let selected = self
            .include
            .iter()
            .map(|pointer| Value::Array(pointer.find(&doc).cloned().into_iter().collect()))
            .collect();
        Ok(canonical(&Value::Array(selected)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn jcs(text: &str) -> String {
        String::from_utf8(canonical(&parse_strict(text.as_bytes()).unwrap())).unwrap()
    }

    /// RFC 8785 section 3.2.2 (the sample input) and 3.2.3 (its canonical output).
    #[test]
    fn rfc_8785_sample() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50,
                      2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        assert_eq!(
            jcs(input),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    /// RFC 8785 section 3.2.3: members sorted by UTF-16 code units, not by UTF-8 bytes or
    /// code points (the sample of the RFC's "Sorting of Object Properties").
    #[test]
    fn rfc_8785_sorting() {
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let expected = concat!(
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",",
            "\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",",
            "\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        assert_eq!(jcs(input), expected);
    }

    /// RFC 8785 appendix B: IEEE 754 doubles and their ECMAScript spelling.
    #[test]
    fn rfc_8785_numbers() {
        let cases: [(u64, &str); 24] = [
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, expected) in cases {
            let value = Value::Number(Number::from_f64(f64::from_bits(bits)).unwrap());
            assert_eq!(
                String::from_utf8(canonical(&value)).unwrap(),
                expected,
                "{bits:#x}"
            );
            // And the same number read back from its own spelling.
            assert_eq!(jcs(expected), expected);
        }
        // Integers beyond 2^53 are doubles too: the spelling an ECMAScript peer sends back.
        assert_eq!(jcs("10000000000000000001"), "10000000000000000000");
        assert_eq!(jcs("-0"), "0");
        assert_eq!(jcs("[1.0, 1E0, 10e-1, 0.1e1]"), "[1,1,1,1]");
    }

    #[test]
    fn spellings_of_one_document_are_one_identity() {
        let identity = JsonIdentity::canonical();
        let a = identity.identity(br#"{"b": [1, 2], "a": {"y": "\u0041", "x": 1.50}}"#);
        let b = identity.identity(b"{\"a\":{\"x\":1.5,\"y\":\"A\"},\n\t\"b\":[1,2]}");
        assert_eq!(a.unwrap(), b.unwrap());
        let other = identity.identity(br#"{"a":{"x":1.5,"y":"A"},"b":[2,1]}"#);
        assert_ne!(
            other.unwrap(),
            identity
                .identity(br#"{"a":{"x":1.5,"y":"A"},"b":[1,2]}"#)
                .unwrap()
        );
    }

    #[test]
    fn excludes_then_includes() {
        let p = |s| JsonPointer::parse(s).unwrap();
        let identity = JsonIdentity::canonical().exclude(p("/meta/sent_at"));
        let a = identity.identity(br#"{"amount":1,"meta":{"sent_at":1,"trace":"x"}}"#);
        let b = identity.identity(br#"{"meta":{"trace":"x","sent_at":99},"amount":1}"#);
        assert_eq!(a.unwrap(), b.unwrap());
        let only = JsonIdentity::canonical()
            .include(p("/amount"))
            .include(p("/to"));
        assert_eq!(
            only.identity(br#"{"amount":1,"note":"a"}"#).unwrap(),
            b"[[1],[]]"
        );
        assert_eq!(
            only.identity(br#"{"amount":1,"note":"b"}"#).unwrap(),
            only.identity(br#"{"note":"c","amount":1.0}"#).unwrap()
        );
        // Absent and null differ.
        assert_ne!(
            only.identity(br#"{"amount":1}"#).unwrap(),
            only.identity(br#"{"amount":1,"to":null}"#).unwrap()
        );
        // Array elements are never removed (that would renumber the rest).
        let items = JsonIdentity::canonical().exclude(p("/items/0"));
        assert_eq!(
            items.identity(br#"{"items":[1,2]}"#).unwrap(),
            br#"{"items":[1,2]}"#
        );
    }

    #[test]
    fn not_i_json_is_refused() {
        for bad in [
            &b"not json"[..],
            b"",
            b"{\"a\":1,\"a\":1}",
            b"[{\"x\":{\"k\":1,\"k\":2}}]",
            b"1e999",
            b"\"\\ud800\"",
            b"{\"a\":1} trailing",
            b"\xff",
        ] {
            assert!(
                parse_strict(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse_strict(deep.as_bytes()).is_err());
    }

    fn arbitrary_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<u64>().prop_map(|n| Value::Number(n.into())),
            any::<f64>()
                .prop_filter_map("finite", Number::from_f64)
                .prop_map(Value::Number),
            any::<String>().prop_map(Value::String),
            "[\\x00-\\x20\"\\\\\u{7f}-\u{a0}\u{fffd}-\u{ffff}\u{10000}-\u{10ffff}]{0,6}"
                .prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The writer agrees with `serde_json_canonicalizer`, the reference RFC 8785
        /// implementation, on random documents (every string, number and nesting).
        #[test]
        fn agrees_with_the_reference_writer(doc in arbitrary_json()) {
            let reference = serde_json_canonicalizer::to_vec(&doc).unwrap();
            proptest::prop_assert_eq!(
                String::from_utf8(canonical(&doc)).unwrap(),
                String::from_utf8(reference).unwrap()
            );
        }
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        let doc: Value = serde_json::from_str(
            r#"{"foo":["bar","baz"],"":0,"a/b":1,"c%d":2,"e^f":3,"g|h":4,"i\\j":5,"k\"l":6," ":7,"m~n":8}"#,
        )
        .unwrap();
        let at = |p: &str| JsonPointer::parse(p).unwrap().find(&doc).cloned();
        assert_eq!(at(""), Some(doc.clone()));
        assert_eq!(at("/foo"), Some(serde_json::json!(["bar", "baz"])));
        assert_eq!(at("/foo/0"), Some(serde_json::json!("bar")));
        for (pointer, n) in [
            ("/", 0),
            ("/a~1b", 1),
            ("/c%d", 2),
            ("/e^f", 3),
            ("/g|h", 4),
            ("/i\\j", 5),
            ("/k\"l", 6),
            ("/ ", 7),
            ("/m~0n", 8),
        ] {
            assert_eq!(at(pointer), Some(serde_json::json!(n)), "{pointer}");
        }
        assert_eq!(at("/foo/01"), None);
        assert_eq!(at("/foo/-"), None);
        assert_eq!(at("/foo/2"), None);
        assert_eq!(at("/missing/x"), None);
        for bad in ["foo", "/~", "/~2", "/a~"] {
            let error = JsonPointer::parse(bad).unwrap_err();
            assert!(error.to_string().contains(bad), "{error}");
        }
    }
}
