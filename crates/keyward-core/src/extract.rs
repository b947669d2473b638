//! Taking a [`Key`] from a request: the [`KeyExtractor`] trait and the built-in [`KeySpec`]s.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use http::Request;
use http::header::HeaderName;

use bytes::Bytes;

use crate::Key;
use crate::canon::{canonical_path, canonical_query, form_decode};
use crate::json::{JsonPointer, parse_strict};

/// Takes the coordination key from a request.
///
/// `Ok(None)` means the request carries no key (the layer then applies its policy for
/// keyless requests); `Err` means it carries one that is unusable (answered with 400).
///
/// Implemented by [`KeySpec`] and by every closure of the right shape:
///
/// ```
/// use keyward_core::{Key, KeyError, KeyExtractor};
/// let by_tenant = |req: &http::Request<()>| -> Result<Option<Key>, KeyError> {
///     Ok(req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).map(Key::from))
/// };
/// let req = http::Request::builder().header("x-tenant", "acme").body(()).unwrap();
/// assert_eq!(by_tenant.extract(&req).unwrap(), Some(Key::from("acme")));
/// ```
pub trait KeyExtractor<B> {
    /// Extracts the key of `req`.
    fn extract(&self, req: &Request<B>) -> Result<Option<Key>, KeyError>;
}

impl<B, F> KeyExtractor<B> for F
where
    F: Fn(&Request<B>) -> Result<Option<Key>, KeyError>,
{
    fn extract(&self, req: &Request<B>) -> Result<Option<Key>, KeyError> {
        self(req)
    }
}

/// A key the request carries but that cannot be used. Its message names the spec and the
/// reason, never the raw value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The value is not valid (not visible ASCII, too long, malformed).
    #[error("key from `{spec}` is invalid: {reason}")]
    Invalid {
        /// The spec that produced the value, e.g. `header:Idempotency-Key`.
        spec: String,
        /// Why the value was refused.
        reason: String,
    },
    /// A `json:` spec was used on a request whose body no layer has read: put
    /// `keyward::BufferedBodyLayer` (the sidecar does) in front of the layer.
    #[error(
        "key spec `json:{pointer}` needs the request body read first (a BufferedBody extension: keyward::BufferedBodyLayer)"
    )]
    NoBufferedBody {
        /// The pointer.
        pointer: String,
    },
    /// A `path:` spec was used without a route template and without [`PathParams`].
    #[error(
        "key spec `path:{param}` needs a route template (KeySpec::with_template) or a PathParams extension"
    )]
    NoPathParams {
        /// The parameter name.
        param: String,
    },
}

/// A key spec string that does not parse. The message names the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not one of the known forms.
    #[error(
        "unknown key spec {0:?}: expected header:NAME, path:PARAM, query:NAME, json:/POINTER, peer_ip or method_uri"
    )]
    Unknown(String),
    /// The form is known but its argument is not valid.
    #[error("key spec {spec:?}: {reason}")]
    BadArgument {
        /// The whole spec string.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A route template that matchit refuses.
    #[error("route template {template:?}: {reason}")]
    BadTemplate {
        /// The template.
        template: String,
        /// matchit's reason.
        reason: String,
    },
}

/// Route parameters of a request (`{id}` in `/payments/{id}` -> `id`), as a request
/// extension. The sidecar inserts it after routing; library users can insert it
/// themselves or give `path:` specs a template with [`KeySpec::with_template`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathParams(pub Vec<(String, String)>);

impl PathParams {
    /// The value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// The whole request body, read before the key is taken, as a request extension: what
/// `json:` specs look into. `keyward::BufferedBodyLayer` reads it (bounded by its
/// `max_body`) and inserts it; the request still carries the same bytes as its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferedBody(pub Bytes);

/// A compiled route template for `path:` specs.
#[derive(Clone)]
pub struct PathTemplate {
    template: Arc<str>,
    router: Arc<matchit::Router<()>>,
}

impl PathTemplate {
    /// Compiles a matchit template such as `/payments/{id}` or `/files/{*rest}`.
    ///
    /// At most 25 named parameters: matchit 0.8 panics on more, so they are refused here.
    pub fn new(template: &str) -> Result<Self, SpecError> {
        let params = named_params(template);
        if params > MAX_TEMPLATE_PARAMS {
            return Err(SpecError::BadTemplate {
                template: template.to_owned(),
                reason: format!(
                    "{params} route parameters (`{{`), at most {MAX_TEMPLATE_PARAMS} are supported"
                ),
            });
        }
        let mut router = matchit::Router::new();
        router
            .insert(template, ())
            .map_err(|err| SpecError::BadTemplate {
                template: template.to_owned(),
                reason: err.to_string(),
            })?;
        Ok(PathTemplate {
            template: template.into(),
            router: Arc::new(router),
        })
    }

    /// The parameters of `path`, or `None` if it does not match the template.
    pub fn params(&self, path: &str) -> Option<PathParams> {
        let matched = self.router.at(path).ok()?;
        Some(PathParams(
            matched
                .params
                .iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
        ))
    }
}

/// matchit 0.8 names parameters `a`..=`z` internally and panics past `z`.
const MAX_TEMPLATE_PARAMS: usize = 25;

/// An upper bound on the `{name}` parameters of a template: every `{` that does not
/// open a catch-all. Escaped braces (`{{`) count too, which is conservative: mimicking
/// matchit's escape handling exactly is what the fuzzer showed to be fragile.
fn named_params(template: &str) -> usize {
    let bytes = template.as_bytes();
    (0..bytes.len())
        .filter(|&i| bytes[i] == b'{' && bytes.get(i + 1) != Some(&b'*'))
        .count()
}

impl fmt::Debug for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PathTemplate").field(&self.template).finish()
    }
}

impl crate::Scope {
    /// The scope of `req`: the hash of what `principal` extracts from it,
    /// [`Scope::Anonymous`](crate::Scope::Anonymous) if it carries no principal, or
    /// [`Scope::Unscoped`](crate::Scope::Unscoped) if the route has no principal spec.
    ///
    /// ```
    /// use keyward_core::{KeySpec, Scope};
    /// let auth = KeySpec::parse("header:Authorization").unwrap();
    /// let alice = http::Request::get("/").header("authorization", "Bearer a").body(()).unwrap();
    /// let nobody = http::Request::get("/").body(()).unwrap();
    /// assert_eq!(Scope::of_request(Some(&auth), &alice).unwrap(), Scope::of(b"Bearer a"));
    /// assert_eq!(Scope::of_request(Some(&auth), &nobody).unwrap(), Scope::Anonymous);
    /// assert_eq!(Scope::of_request(None, &alice).unwrap(), Scope::Unscoped);
    /// ```
    pub fn of_request<B>(
        principal: Option<&KeySpec>,
        req: &Request<B>,
    ) -> Result<crate::Scope, KeyError> {
        let Some(spec) = principal else {
            return Ok(crate::Scope::Unscoped);
        };
        Ok(match spec.extract(req)? {
            Some(principal) => crate::Scope::of(principal.as_str().as_bytes()),
            None => crate::Scope::Anonymous,
        })
    }
}

/// The client address of a request, as a request extension, for the `peer_ip` spec.
/// A `std::net::SocketAddr` extension is accepted as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The client's address as a trusted proxy reported it (`X-Forwarded-For`, `Forwarded`),
/// as a request extension. `peer_ip` prefers it to [`PeerAddr`]. Insert it only for
/// requests whose connection comes from a proxy you trust (the sidecar's
/// `trusted_proxies`): anyone else can write any address into those headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// How many leading bits of an IPv6 address `peer_ip` keys on by default: one /64 is
/// one subnet, usually one host or one customer, who can choose among 2^64 addresses.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// A built-in key extractor, parsed from the spec strings the sidecar config uses.
///
/// | spec | key |
/// |---|---|
/// | `header:NAME` | the header's value (absent: no key; several values: invalid) |
/// | `path:PARAM` | a route parameter |
/// | `query:NAME` | a query parameter, form-decoded (`+` is a space); sent twice: invalid |
/// | `peer_ip` | the client IP ([`ClientIp`], else [`PeerAddr`] or `SocketAddr` extension); IPv6 cut to its /64 |
/// | `peer_ip/N` | the same, IPv6 cut to its first N bits (1..=128; 128 keys on the whole address) |
/// | `method_uri` | method, [canonical path](crate::canon) and the canonical query, pairs sorted |
/// | `json:/POINTER` | the string at an RFC 6901 pointer in the JSON body ([`BufferedBody`]); absent, not a string, or an empty body: no key; a body that is not I-JSON: invalid |
/// | a list | all of the above joined: a composite key |
///
/// ```
/// use keyward_core::{Key, KeyExtractor, KeySpec};
/// let spec: KeySpec = "query:page".parse().unwrap();
/// let req = http::Request::get("/items?page=2%20b").body(()).unwrap();
/// assert_eq!(spec.extract(&req).unwrap(), Some(Key::from("2 b")));
///
/// let bad = "cookie:session".parse::<KeySpec>().unwrap_err();
/// assert!(bad.to_string().contains("cookie:session"));
/// ```
#[derive(Clone, Debug)]
pub enum KeySpec {
    /// `header:NAME`
    Header(HeaderName),
    /// `path:PARAM`
    Path {
        /// Parameter name.
        param: String,
        /// Template to match the request path against when there is no [`PathParams`].
        template: Option<PathTemplate>,
    },
    /// `query:NAME`
    Query(String),
    /// `peer_ip`: IPv6 addresses cut to their [`DEFAULT_IPV6_PREFIX`].
    PeerIp,
    /// `peer_ip/N`: IPv6 addresses cut to their first `ipv6_prefix` bits.
    PeerIpPrefix {
        /// Leading bits of an IPv6 address that make the key (1..=128).
        ipv6_prefix: u8,
    },
    /// `method_uri`
    MethodUri,
    /// `json:/POINTER`: a string in the JSON body.
    Json(JsonPointer),
    /// A composite key made of every part.
    Composite(Vec<KeySpec>),
}

impl KeySpec {
    /// Parses one spec string such as `header:Idempotency-Key`.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let spec = spec.trim();
        let bad = |reason: &str| SpecError::BadArgument {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        match spec.split_once(':') {
            Some(("header", name)) => HeaderName::from_bytes(name.trim().as_bytes())
                .map(KeySpec::Header)
                .map_err(|_| bad("not a valid header name")),
            Some(("path", param)) if is_identifier(param) => Ok(KeySpec::Path {
                param: param.to_owned(),
                template: None,
            }),
            Some(("path", _)) => Err(bad("expected a route parameter name like path:id")),
            Some(("query", name)) if !name.is_empty() => Ok(KeySpec::Query(name.to_owned())),
            Some(("query", _)) => Err(bad("expected a query parameter name like query:page")),
            Some(("json", pointer)) if !pointer.is_empty() => JsonPointer::parse(pointer)
                .map(KeySpec::Json)
                .map_err(|error| SpecError::BadArgument {
                    spec: spec.to_owned(),
                    reason: format!("{} (RFC 6901, like json:/event/id)", error.reason),
                }),
            Some(("json", _)) => Err(bad("expected a JSON pointer like json:/event/id")),
            None if spec == "peer_ip" => Ok(KeySpec::PeerIp),
            None if spec.starts_with("peer_ip/") => match spec["peer_ip/".len()..].parse::<u8>() {
                Ok(bits) if (1..=128).contains(&bits) => {
                    Ok(KeySpec::PeerIpPrefix { ipv6_prefix: bits })
                }
                _ => Err(bad(
                    "expected an IPv6 prefix length from 1 to 128, like peer_ip/56",
                )),
            },
            None if spec == "method_uri" => Ok(KeySpec::MethodUri),
            _ => Err(SpecError::Unknown(spec.to_owned())),
        }
    }

    /// Parses a list of specs into one composite key (a single spec stays itself).
    pub fn parse_all<I, S>(specs: I) -> Result<Self, SpecError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut parts = specs
            .into_iter()
            .map(|spec| KeySpec::parse(spec.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        match parts.len() {
            0 => Err(SpecError::Unknown(String::new())),
            1 => Ok(parts.remove(0)),
            _ => Ok(KeySpec::Composite(parts)),
        }
    }

    /// Gives every `path:` part the route template to match the request path against.
    pub fn with_template(self, template: &PathTemplate) -> Self {
        match self {
            KeySpec::Path { param, .. } => KeySpec::Path {
                param,
                template: Some(template.clone()),
            },
            KeySpec::Composite(parts) => KeySpec::Composite(
                parts
                    .into_iter()
                    .map(|part| part.with_template(template))
                    .collect(),
            ),
            other => other,
        }
    }

    fn extract_str<B>(&self, req: &Request<B>) -> Result<Option<String>, KeyError> {
        match self {
            KeySpec::Header(name) => header_value(name, req),
            KeySpec::Path { param, template } => {
                if let Some(params) = req.extensions().get::<PathParams>() {
                    return Ok(params.get(param).map(str::to_owned));
                }
                let Some(template) = template else {
                    return Err(KeyError::NoPathParams {
                        param: param.clone(),
                    });
                };
                let path = canonical_path(req.uri().path()).map_err(|err| KeyError::Invalid {
                    spec: self.to_string(),
                    reason: err.to_string(),
                })?;
                Ok(template
                    .params(&path)
                    .and_then(|params| params.get(param).map(str::to_owned)))
            }
            KeySpec::Query(name) => query_value(req.uri().query().unwrap_or(""), name),
            KeySpec::PeerIp => Ok(peer_ip(req, DEFAULT_IPV6_PREFIX)),
            KeySpec::PeerIpPrefix { ipv6_prefix } => Ok(peer_ip(req, *ipv6_prefix)),
            KeySpec::MethodUri => method_uri(req).map(Some),
            KeySpec::Json(pointer) => json_value(pointer, req),
            KeySpec::Composite(parts) => {
                // Each part is length-prefixed so that ("a:b", "c") and ("a", "b:c") differ.
                let mut out = String::new();
                for part in parts {
                    let Some(value) = part.extract_str(req)? else {
                        return Ok(None);
                    };
                    if !out.is_empty() {
                        out.push('|');
                    }
                    out.push_str(&value.len().to_string());
                    out.push(':');
                    out.push_str(&value);
                }
                Ok(Some(out))
            }
        }
    }
}

impl FromStr for KeySpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        KeySpec::parse(spec)
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::Header(name) => write!(f, "header:{name}"),
            KeySpec::Path { param, .. } => write!(f, "path:{param}"),
            KeySpec::Query(name) => write!(f, "query:{name}"),
            KeySpec::PeerIp => f.write_str("peer_ip"),
            KeySpec::PeerIpPrefix { ipv6_prefix } => write!(f, "peer_ip/{ipv6_prefix}"),
            KeySpec::MethodUri => f.write_str("method_uri"),
            KeySpec::Json(pointer) => write!(f, "json:{pointer}"),
            KeySpec::Composite(parts) => {
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{part}")?;
                }
                Ok(())
            }
        }
    }
}

impl<B> KeyExtractor<B> for KeySpec {
    fn extract(&self, req: &Request<B>) -> Result<Option<Key>, KeyError> {
        Ok(self.extract_str(req)?.map(Key::from))
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn header_value<B>(name: &HeaderName, req: &Request<B>) -> Result<Option<String>, KeyError> {
    let mut values = req.headers().get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |reason: &str| KeyError::Invalid {
        spec: format!("header:{name}"),
        reason: reason.to_owned(),
    };
    if values.next().is_some() {
        return Err(invalid("the header is sent more than once"));
    }
    let value = value
        .to_str()
        .map_err(|_| invalid("the value is not visible ASCII"))?;
    Ok(Some(value.trim().to_owned()))
}

/// The client address of `req` as a key: IPv4 whole, IPv6 (not IPv4-mapped) cut to
/// its first `ipv6_prefix` bits and written as a network (`2001:db8::/64`).
fn peer_ip<B>(req: &Request<B>, ipv6_prefix: u8) -> Option<String> {
    let extensions = req.extensions();
    let ip = extensions
        .get::<ClientIp>()
        .map(|client| client.0)
        .or_else(|| extensions.get::<PeerAddr>().map(|peer| peer.0.ip()))
        .or_else(|| extensions.get::<SocketAddr>().map(SocketAddr::ip))?;
    Some(match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut key = String::with_capacity(15);
            crate::ip::push_ip(&mut key, IpAddr::V4(v4));
            key
        }
        IpAddr::V6(v6) if ipv6_prefix >= 128 => v6.to_string(),
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.max(1));
            let mask = u128::MAX << (128 - bits);
            let network = std::net::Ipv6Addr::from(u128::from(v6) & mask);
            format!("{network}/{bits}")
        }
    })
}

/// The string at `pointer` in the body an earlier layer read: like a header, absent
/// (or not a string, or no body at all) is no key; a body that is not I-JSON is invalid.
fn json_value<B>(pointer: &JsonPointer, req: &Request<B>) -> Result<Option<String>, KeyError> {
    let Some(BufferedBody(body)) = req.extensions().get::<BufferedBody>() else {
        return Err(KeyError::NoBufferedBody {
            pointer: pointer.to_string(),
        });
    };
    if body.is_empty() {
        return Ok(None);
    }
    let doc = parse_strict(body).map_err(|error| KeyError::Invalid {
        spec: format!("json:{pointer}"),
        reason: error.to_string(),
    })?;
    Ok(pointer
        .find(&doc)
        .and_then(|value| value.as_str())
        .map(str::to_owned))
}

fn method_uri<B>(req: &Request<B>) -> Result<String, KeyError> {
    let method = req.method().as_str();
    let path = canonical_path(req.uri().path()).map_err(|err| KeyError::Invalid {
        spec: "method_uri".to_owned(),
        reason: err.to_string(),
    })?;
    let query = canonical_query(req.uri().query().unwrap_or(""));
    let mut out = String::with_capacity(method.len() + path.len() + query.len() + 2);
    out.push_str(method);
    out.push(' ');
    out.push_str(&path);
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query);
    }
    Ok(out)
}

/// The value of query parameter `name`; names are compared decoded. A parameter sent
/// twice is refused: upstreams disagree on which one counts (first, last, a list).
fn query_value(query: &str, name: &str) -> Result<Option<String>, KeyError> {
    let invalid = |reason: &str| KeyError::Invalid {
        spec: format!("query:{name}"),
        reason: reason.to_owned(),
    };
    let mut found = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(key) != name.as_bytes() {
            continue;
        }
        if found.is_some() {
            return Err(invalid("the parameter is sent more than once"));
        }
        let value = String::from_utf8(form_decode(value))
            .map_err(|_| invalid("the value is not UTF-8 once decoded"))?;
        found = Some(value);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    /// Found by `fuzz/` (key_spec): matchit panicked ("Too many route parameters") on a
    /// template with 26 parameters instead of returning an error.
    #[test]
    fn template_with_too_many_params_is_an_error_not_a_panic() {
        let template = |n: usize| -> String { (0..n).map(|i| format!("/{{p{i}}}")).collect() };
        assert!(PathTemplate::new(&template(25)).is_ok());
        let err = PathTemplate::new(&template(26)).unwrap_err();
        assert!(err.to_string().contains("at most 25"), "{err}");
        assert!(PathTemplate::new(&format!("{}/{{*rest}}", template(25))).is_ok());
        let _ = PathTemplate::new(&"{a}{".repeat(40));
        // The fuzz input itself: its fifth line is the template (escaped braces galore).
        let input = include_bytes!("../tests/fuzz-regressions/key_spec-matchit-too-many-params");
        let template = input.split(|&b| b == b'\n').nth(4).unwrap();
        let template = std::str::from_utf8(template).unwrap();
        assert!(PathTemplate::new(template).is_err());
    }

    use super::*;

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn parses_every_builtin_and_names_bad_specs() {
        assert!(matches!(
            KeySpec::parse("header:X-Api-Key"),
            Ok(KeySpec::Header(_))
        ));
        assert!(matches!(
            KeySpec::parse("path:id"),
            Ok(KeySpec::Path { .. })
        ));
        assert!(matches!(KeySpec::parse("query:q"), Ok(KeySpec::Query(_))));
        assert!(matches!(KeySpec::parse("peer_ip"), Ok(KeySpec::PeerIp)));
        assert!(matches!(
            KeySpec::parse("method_uri"),
            Ok(KeySpec::MethodUri)
        ));
        for bad in [
            "header:bad name",
            "path:",
            "path:a/b",
            "query:",
            "cookie:x",
            "",
            "peer",
        ] {
            let err = KeySpec::parse(bad).unwrap_err();
            assert!(err.to_string().contains(bad.trim()), "{err}");
        }
    }

    #[test]
    fn header_absent_is_none_repeated_is_invalid() {
        let spec = KeySpec::parse("header:x-k").unwrap();
        assert_eq!(spec.extract(&get("/")).unwrap(), None);
        let req = Request::get("/")
            .header("x-k", "a")
            .header("x-k", "b")
            .body(())
            .unwrap();
        assert!(matches!(spec.extract(&req), Err(KeyError::Invalid { .. })));
    }

    #[test]
    fn json_keys_read_the_buffered_body() {
        let spec = KeySpec::parse("json:/data/id").unwrap();
        assert_eq!(spec.to_string(), "json:/data/id");
        let with = |body: &'static str| {
            let mut req = get("/");
            req.extensions_mut().insert(BufferedBody(Bytes::from(body)));
            spec.extract(&req)
        };
        assert_eq!(
            with(r#"{"data":{"id":"evt_1"}}"#).unwrap(),
            Some(Key::from("evt_1"))
        );
        // Absent, not a string, no body: no key, as for a missing header.
        for none in [
            r#"{"data":{}}"#,
            r#"{"data":{"id":7}}"#,
            r#"{"data":{"id":null}}"#,
            "[]",
            "",
        ] {
            assert_eq!(with(none).unwrap(), None, "{none}");
        }
        for invalid in ["{not json", r#"{"data":{"id":"a"},"data":{"id":"b"}}"#] {
            let error = with(invalid).unwrap_err();
            assert!(error.to_string().contains("json:/data/id"), "{error}");
            assert!(!error.to_string().contains("evt"), "{error}");
        }
        // Without a read body the spec says what is missing.
        assert!(matches!(
            spec.extract(&get("/")),
            Err(KeyError::NoBufferedBody { .. })
        ));
        for bad in ["json:", "json:data", "json:/a~2"] {
            let error = KeySpec::parse(bad).unwrap_err();
            assert!(error.to_string().contains(bad), "{error}");
        }
        // In a composite key, each part length-prefixed.
        let whole = KeySpec::parse_all(["json:/a", "query:x"]).unwrap();
        let mut req = get("/?x=1");
        req.extensions_mut()
            .insert(BufferedBody(Bytes::from(r#"{"a":"k"}"#)));
        assert_eq!(whole.extract(&req).unwrap(), Some(Key::from("1:k|1:1")));
    }

    #[test]
    fn method_uri_sorts_query_pairs() {
        let a = KeySpec::MethodUri.extract(&get("/x?b=2&a=1")).unwrap();
        let b = KeySpec::MethodUri.extract(&get("/x?a=1&b=2")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, Some(Key::from("GET /x?a=1&b=2")));
        let sparse = KeySpec::MethodUri.extract(&get("/x?&b=2&&a=1&")).unwrap();
        assert_eq!(sparse, a);
        let bare = KeySpec::MethodUri.extract(&get("/x?")).unwrap();
        assert_eq!(bare, Some(Key::from("GET /x")));
    }

    #[test]
    fn path_from_template_or_extension() {
        let template = PathTemplate::new("/payments/{id}").unwrap();
        let spec = KeySpec::parse("path:id").unwrap();
        assert!(matches!(
            spec.extract(&get("/payments/7")),
            Err(KeyError::NoPathParams { .. })
        ));
        let spec = spec.with_template(&template);
        assert_eq!(
            spec.extract(&get("/payments/7")).unwrap(),
            Some(Key::from("7"))
        );
        assert_eq!(spec.extract(&get("/other")).unwrap(), None);
        let mut req = get("/elsewhere");
        req.extensions_mut()
            .insert(PathParams(vec![("id".into(), "9".into())]));
        assert_eq!(spec.extract(&req).unwrap(), Some(Key::from("9")));
    }

    #[test]
    fn composite_keys_are_unambiguous() {
        let spec = KeySpec::parse_all(["query:a", "query:b"]).unwrap();
        let one = spec.extract(&get("/?a=x:y&b=z")).unwrap();
        let two = spec.extract(&get("/?a=x&b=y:z")).unwrap();
        assert_ne!(one, two);
        assert_eq!(spec.extract(&get("/?a=x")).unwrap(), None);
    }

    #[test]
    fn peer_ip_from_extensions() {
        let mut req = get("/");
        assert_eq!(KeySpec::PeerIp.extract(&req).unwrap(), None);
        req.extensions_mut()
            .insert(PeerAddr("127.0.0.1:9".parse().unwrap()));
        assert_eq!(
            KeySpec::PeerIp.extract(&req).unwrap(),
            Some(Key::from("127.0.0.1"))
        );
    }

    #[test]
    fn query_values_are_form_decoded_and_repeats_refused() {
        let spec = KeySpec::parse("query:q").unwrap();
        let value = |uri: &str| spec.extract(&get(uri));
        assert_eq!(value("/?q=a%2Fb+c").unwrap(), Some(Key::from("a/b c")));
        assert_eq!(value("/?q=100%").unwrap(), Some(Key::from("100%")));
        assert_eq!(value("/?q=a+b").unwrap(), value("/?q=a%20b").unwrap());
        assert_eq!(value("/?%71=1").unwrap(), Some(Key::from("1")));
        for bad in ["/?q=%ff", "/?q=1&q=2", "/?q=1&%71=1", "/?q&q"] {
            assert!(matches!(value(bad), Err(KeyError::Invalid { .. })), "{bad}");
        }
    }

    #[test]
    fn path_and_method_uri_keys_use_the_canonical_path() {
        let template = PathTemplate::new("/accounts/{id}").unwrap();
        let spec = KeySpec::parse("path:id").unwrap().with_template(&template);
        for spelling in ["/accounts/42", "/accounts/%34%32", "//accounts/./42/"] {
            assert_eq!(spec.extract(&get(spelling)).unwrap(), Some(Key::from("42")));
            assert_eq!(
                KeySpec::MethodUri.extract(&get(spelling)).unwrap(),
                Some(Key::from("GET /accounts/42"))
            );
        }
        assert!(matches!(
            spec.extract(&get("/accounts/4%2F2")),
            Err(KeyError::Invalid { .. })
        ));
        assert_eq!(
            KeySpec::MethodUri.extract(&get("/x?b=%32&a=1")).unwrap(),
            KeySpec::MethodUri.extract(&get("/x?a=1&b=2")).unwrap()
        );
    }

    #[test]
    fn peer_ip_prefers_the_vouched_client_and_cuts_ipv6_to_its_prefix() {
        let mut req = get("/");
        req.extensions_mut()
            .insert(PeerAddr("[2001:db8:0:1::7]:9".parse().unwrap()));
        assert_eq!(
            KeySpec::PeerIp.extract(&req).unwrap(),
            Some(Key::from("2001:db8:0:1::/64"))
        );
        let full = KeySpec::parse("peer_ip/128").unwrap();
        assert_eq!(
            full.extract(&req).unwrap(),
            Some(Key::from("2001:db8:0:1::7"))
        );
        let wide = KeySpec::parse("peer_ip/48").unwrap();
        assert_eq!(
            wide.extract(&req).unwrap(),
            Some(Key::from("2001:db8::/48"))
        );
        assert_eq!(wide.to_string(), "peer_ip/48");
        req.extensions_mut()
            .insert(ClientIp("::ffff:192.0.2.1".parse().unwrap()));
        assert_eq!(
            KeySpec::PeerIp.extract(&req).unwrap(),
            Some(Key::from("192.0.2.1"))
        );
        for bad in ["peer_ip/0", "peer_ip/129", "peer_ip/x"] {
            assert!(KeySpec::parse(bad).is_err(), "{bad}");
        }
    }
}
