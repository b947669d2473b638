//! Parsing the `Idempotency-Key` header value.

/// Longest accepted key, in characters.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Why an `Idempotency-Key` value is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyKeyError {
    /// The value (or the quoted string) is empty.
    #[error("the key is empty")]
    Empty,
    /// Longer than [`MAX_IDEMPOTENCY_KEY_LEN`] characters.
    #[error("the key is longer than 255 characters")]
    TooLong,
    /// A character outside visible ASCII (or a space outside a quoted string).
    #[error("the key contains a character that is not visible ASCII")]
    BadCharacter,
    /// A quoted string that is not closed, has a bad escape or trailing text.
    #[error("the key is a malformed quoted string")]
    MalformedString,
    /// Several keys (a list) where one is expected.
    #[error("the header holds more than one key")]
    List,
}

/// Parses an `Idempotency-Key` value: an RFC 8941 sf-string (`"abc"`, with `\"` and `\\`
/// escapes) or a bare token of visible ASCII (UUIDs and similar, as clients send them
/// in practice, are accepted even where they are not strict sf-tokens). The key is 1 to
/// 255 characters.
///
/// ```
/// use keyward_core::parse_idempotency_key;
/// assert_eq!(parse_idempotency_key("\"8e03978e\"").unwrap(), "8e03978e");
/// assert_eq!(parse_idempotency_key("8e03978e-40d5-43e8").unwrap(), "8e03978e-40d5-43e8");
/// assert_eq!(parse_idempotency_key(r#""a \"b\"""#).unwrap(), "a \"b\"");
/// assert!(parse_idempotency_key("").is_err());
/// assert!(parse_idempotency_key("a b").is_err());
/// assert!(parse_idempotency_key(&"x".repeat(256)).is_err());
/// ```
pub fn parse_idempotency_key(value: &str) -> Result<String, IdempotencyKeyError> {
    let value = value.trim_matches(|c| c == ' ' || c == '\t');
    let key = match value.strip_prefix('"') {
        Some(quoted) => parse_sf_string(quoted)?,
        None => parse_token(value)?,
    };
    if key.is_empty() {
        return Err(IdempotencyKeyError::Empty);
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(IdempotencyKeyError::TooLong);
    }
    Ok(key)
}

/// The rest of an sf-string after its opening quote.
fn parse_sf_string(rest: &str) -> Result<String, IdempotencyKeyError> {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ ('"' | '\\')) => out.push(escaped),
                _ => return Err(IdempotencyKeyError::MalformedString),
            },
            '"' => {
                let trailing = chars.as_str();
                if trailing.trim_start().starts_with(',') {
                    return Err(IdempotencyKeyError::List);
                }
                if !trailing.is_empty() {
                    return Err(IdempotencyKeyError::MalformedString);
                }
                return Ok(out);
            }
            ' '..='~' => {
                if out.len() >= MAX_IDEMPOTENCY_KEY_LEN {
                    return Err(IdempotencyKeyError::TooLong);
                }
                out.push(c);
            }
            _ => return Err(IdempotencyKeyError::BadCharacter),
        }
    }
    Err(IdempotencyKeyError::MalformedString)
}

fn parse_token(value: &str) -> Result<String, IdempotencyKeyError> {
    if value.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(IdempotencyKeyError::TooLong);
    }
    for c in value.chars() {
        match c {
            ',' => return Err(IdempotencyKeyError::List),
            '"' | '\\' => return Err(IdempotencyKeyError::MalformedString),
            '!'..='~' => {}
            _ => return Err(IdempotencyKeyError::BadCharacter),
        }
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn boundaries() {
        assert!(parse_idempotency_key(&"k".repeat(255)).is_ok());
        assert_eq!(
            parse_idempotency_key(&"k".repeat(256)),
            Err(IdempotencyKeyError::TooLong)
        );
        let quoted = format!("\"{}\"", "k".repeat(256));
        assert_eq!(
            parse_idempotency_key(&quoted),
            Err(IdempotencyKeyError::TooLong)
        );
        assert_eq!(
            parse_idempotency_key("\"\""),
            Err(IdempotencyKeyError::Empty)
        );
        assert_eq!(
            parse_idempotency_key("\"abc"),
            Err(IdempotencyKeyError::MalformedString)
        );
        assert_eq!(
            parse_idempotency_key("\"a\\n\""),
            Err(IdempotencyKeyError::MalformedString)
        );
        assert_eq!(
            parse_idempotency_key("\"a\"x"),
            Err(IdempotencyKeyError::MalformedString)
        );
        assert_eq!(parse_idempotency_key("a,b"), Err(IdempotencyKeyError::List));
        assert_eq!(
            parse_idempotency_key("\"a\", \"b\""),
            Err(IdempotencyKeyError::List)
        );
        assert_eq!(
            parse_idempotency_key("caf\u{e9}"),
            Err(IdempotencyKeyError::BadCharacter)
        );
        assert_eq!(
            parse_idempotency_key("\"a\u{7f}\""),
            Err(IdempotencyKeyError::BadCharacter)
        );
        assert_eq!(parse_idempotency_key("  abc "), Ok("abc".to_owned()));
    }

    proptest! {
        #[test]
        fn quoting_any_visible_key_round_trips(key in "[ -~]{1,255}") {
            let quoted = format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""));
            prop_assert_eq!(parse_idempotency_key(&quoted), Ok(key));
        }

        #[test]
        fn never_panics_and_accepted_keys_are_bounded(value in "\\PC{0,300}") {
            if let Ok(key) = parse_idempotency_key(&value) {
                prop_assert!(!key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_LEN);
                prop_assert!(key.chars().all(|c| (' '..='~').contains(&c)));
            }
        }
    }
}
