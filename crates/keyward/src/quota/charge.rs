//! What a response costs, for quotas priced after the call ([`QuotaLayer::charge_after`]).
//!
//! [`QuotaLayer::charge_after`]: super::QuotaLayer::charge_after

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, StatusCode};

type CostFn = Arc<dyn Fn(StatusCode, &HeaderMap) -> u32 + Send + Sync>;

/// How many units a response takes from its key's quota, known only once the inner
/// service has answered: a fixed number per response, an upstream's header or trailer
/// (`x-tokens-used`), or a closure on the status and headers; optionally only for chosen
/// statuses ([`ResponseCost::only`]).
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use keyward::quota::{ResponseCost, StatusSet};
///
/// let tokens = ResponseCost::header("x-tokens-used").missing(1);
/// let mut headers = HeaderMap::new();
/// headers.insert("x-tokens-used", "1200".parse().unwrap());
/// assert_eq!(tokens.of_head(StatusCode::OK, &headers), Some(1200));
/// assert_eq!(tokens.of_head(StatusCode::OK, &HeaderMap::new()), Some(1));
///
/// // Login brute force: only refused logins count.
/// let failures = ResponseCost::per_response(1).only(StatusSet::parse("401,403").unwrap());
/// assert_eq!(failures.of_head(StatusCode::UNAUTHORIZED, &HeaderMap::new()), Some(1));
/// assert_eq!(failures.of_head(StatusCode::OK, &HeaderMap::new()), None);
/// ```
#[derive(Clone)]
pub struct ResponseCost {
    source: Source,
    only: Option<StatusSet>,
    missing: u32,
}

#[derive(Clone)]
enum Source {
    Each(u32),
    Header(HeaderName),
    Fn(CostFn),
}

impl ResponseCost {
    /// Every response takes `units`.
    pub fn per_response(units: u32) -> Self {
        ResponseCost {
            source: Source::Each(units),
            only: None,
            missing: 0,
        }
    }

    /// The response's header `name`, a whole number of units (an upstream's
    /// `x-tokens-used`). A trailer of the same name, if the body ends with one, replaces
    /// the header's value: streamed answers often know their count only at the end.
    /// Absent or unreadable (not a whole number up to `u32::MAX`): [`ResponseCost::missing`]
    /// units (default 0).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name; use [`ResponseCost::header_name`] with a
    /// parsed one to handle that.
    pub fn header(name: &'static str) -> Self {
        Self::header_name(HeaderName::from_static(name))
    }

    /// [`ResponseCost::header`] with a parsed name.
    pub fn header_name(name: HeaderName) -> Self {
        ResponseCost {
            source: Source::Header(name),
            only: None,
            missing: 0,
        }
    }

    /// Units computed from the response's status and headers. Runs once per response:
    /// keep it cheap.
    pub fn from_fn<F>(cost: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> u32 + Send + Sync + 'static,
    {
        ResponseCost {
            source: Source::Fn(Arc::new(cost)),
            only: None,
            missing: 0,
        }
    }

    /// Only responses with a status in `statuses` are charged; the others take nothing
    /// (e.g. `401,403` for failed logins, `2xx` for paid calls).
    pub fn only(mut self, statuses: StatusSet) -> Self {
        self.only = Some(statuses);
        self
    }

    /// Units charged when the cost header is absent or unreadable (default 0).
    pub fn missing(mut self, units: u32) -> Self {
        self.missing = units;
        self
    }

    /// The units a response with `status` and `headers` takes, `None` if its status is
    /// not counted. For a header cost, a trailer may still replace it
    /// ([`ResponseCost::trailer`]).
    pub fn of_head(&self, status: StatusCode, headers: &HeaderMap) -> Option<u32> {
        if self
            .only
            .as_ref()
            .is_some_and(|only| !only.contains(status))
        {
            return None;
        }
        Some(match &self.source {
            Source::Each(units) => *units,
            Source::Header(name) => units_in(headers, name).unwrap_or(self.missing),
            Source::Fn(cost) => cost(status, headers),
        })
    }

    /// The header whose trailer replaces the cost, for header costs.
    pub(crate) fn trailer(&self) -> Option<&HeaderName> {
        match &self.source {
            Source::Header(name) => Some(name),
            Source::Each(_) | Source::Fn(_) => None,
        }
    }
}

/// The units in header `name` of `headers`, if it holds a whole number that fits.
pub(crate) fn units_in(headers: &HeaderMap, name: &HeaderName) -> Option<u32> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl fmt::Debug for ResponseCost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("ResponseCost");
        match &self.source {
            Source::Each(units) => out.field("per_response", units),
            Source::Header(name) => out.field("header", name),
            Source::Fn(_) => out.field("from_fn", &"closure"),
        };
        out.field("only", &self.only)
            .field("missing", &self.missing)
            .finish()
    }
}

/// What is charged, in words: `x-tokens-used header (or trailer; 1 if absent) for 2xx`.
impl fmt::Display for ResponseCost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Each(units) => write!(f, "{units} per response")?,
            Source::Header(name) => {
                write!(f, "{name} header (or trailer; {} if absent)", self.missing)?
            }
            Source::Fn(_) => f.write_str("a closure on the response")?,
        }
        match &self.only {
            Some(only) => write!(f, " for {only}"),
            None => Ok(()),
        }
    }
}

/// A set of HTTP statuses: single codes (`401`) and classes (`2xx`).
///
/// ```
/// use http::StatusCode;
/// use keyward::quota::StatusSet;
///
/// let set = StatusSet::parse("2xx, 404").unwrap();
/// assert!(set.contains(StatusCode::CREATED));
/// assert!(set.contains(StatusCode::NOT_FOUND));
/// assert!(!set.contains(StatusCode::UNAUTHORIZED));
/// let err = StatusSet::parse("2xx,99").unwrap_err();
/// assert_eq!(err.to_string(), "\"99\" is not a status (100 to 599) or a class (\"2xx\")");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusSet {
    /// One bit per status code 0..640.
    bits: [u64; 10],
}

/// A status in a [`StatusSet`] that is neither a code nor a class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a status (100 to 599) or a class (\"2xx\")")]
pub struct StatusSetError(pub String);

impl StatusSet {
    /// The empty set.
    pub fn new() -> Self {
        StatusSet::default()
    }

    /// Adds one status.
    pub fn with(mut self, status: StatusCode) -> Self {
        let code = usize::from(status.as_u16());
        if let Some(word) = self.bits.get_mut(code / 64) {
            *word |= 1 << (code % 64);
        }
        self
    }

    /// Adds a class: `2` for every `2xx`. Classes other than 1 to 5 add nothing.
    pub fn with_class(mut self, class: u16) -> Self {
        if (1..=5).contains(&class) {
            for code in class * 100..class * 100 + 100 {
                if let Ok(status) = StatusCode::from_u16(code) {
                    self = self.with(status);
                }
            }
        }
        self
    }

    /// Parses a comma-separated list of codes and classes: `"401,403"`, `"2xx"`.
    pub fn parse(list: &str) -> Result<Self, StatusSetError> {
        list.split(',')
            .try_fold(StatusSet::new(), |set, item| set.with_item(item.trim()))
    }

    /// Adds one item of a list: `"401"` or `"2xx"`.
    pub fn with_item(self, item: &str) -> Result<Self, StatusSetError> {
        let bad = || StatusSetError(item.to_owned());
        let bytes = item.as_bytes();
        if bytes.len() == 3 && bytes[1..].eq_ignore_ascii_case(b"xx") {
            let class = u16::from(bytes[0].wrapping_sub(b'0'));
            return if (1..=5).contains(&class) {
                Ok(self.with_class(class))
            } else {
                Err(bad())
            };
        }
        let code: u16 = item.parse().map_err(|_| bad())?;
        match StatusCode::from_u16(code) {
            Ok(status) if (100..=599).contains(&code) => Ok(self.with(status)),
            _ => Err(bad()),
        }
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: StatusCode) -> bool {
        let code = usize::from(status.as_u16());
        self.bits
            .get(code / 64)
            .is_some_and(|word| word & (1 << (code % 64)) != 0)
    }
}

/// The set as [`StatusSet::parse`] reads it: whole classes as `2xx`, then codes.
impl fmt::Display for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = Vec::new();
        for class in 1..=5u16 {
            let codes: Vec<u16> = (class * 100..class * 100 + 100)
                .filter(|code| {
                    StatusCode::from_u16(*code).is_ok_and(|status| self.contains(status))
                })
                .collect();
            if codes.len() == 100 {
                items.push(format!("{class}xx"));
            } else {
                items.extend(codes.iter().map(u16::to_string));
            }
        }
        f.write_str(&items.join(","))
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let codes = (100u16..600)
            .filter(|code| StatusCode::from_u16(*code).is_ok_and(|status| self.contains(status)));
        f.debug_list().entries(codes).finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_codes_and_classes_and_names_the_bad_item() {
        let set = StatusSet::parse("401, 403").unwrap();
        assert!(set.contains(StatusCode::UNAUTHORIZED));
        assert!(set.contains(StatusCode::FORBIDDEN));
        assert!(!set.contains(StatusCode::OK));
        let all_5 = StatusSet::parse("5XX").unwrap();
        assert!(all_5.contains(StatusCode::from_u16(599).unwrap()));
        assert!(!all_5.contains(StatusCode::from_u16(499).unwrap()));
        assert_eq!(
            StatusSet::parse("403,2xx,401").unwrap().to_string(),
            "2xx,401,403"
        );
        for bad in ["6xx", "0xx", "abc", "", "600", "2x", "99"] {
            assert_eq!(StatusSet::parse(bad), Err(StatusSetError(bad.to_owned())));
        }
    }

    #[test]
    fn header_costs_read_whole_numbers_only() {
        let cost = ResponseCost::header("x-tokens-used").missing(7);
        let head = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-tokens-used", value.parse().unwrap());
            cost.of_head(StatusCode::OK, &headers)
        };
        assert_eq!(head(" 42 "), Some(42));
        assert_eq!(head("-1"), Some(7));
        assert_eq!(head("1.5"), Some(7));
        assert_eq!(head("99999999999"), Some(7));
        let by_fn = ResponseCost::from_fn(|status, _| u32::from(status.as_u16() / 100));
        assert_eq!(by_fn.of_head(StatusCode::OK, &HeaderMap::new()), Some(2));
    }
}
