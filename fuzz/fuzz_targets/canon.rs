//! The canonicalizer routes and keys rely on (`keyward_core::canon`), on any string:
//! never panics; a canonical path is a fixed point (`canon(canon(x)) == canon(x)`), a
//! valid URI path, and free of `//`, dot segments and a trailing slash; the canonical
//! query is a fixed point too; and the route/key view of a path (`PathTemplate` on the
//! canonical form) agrees with the extractor's.
#![no_main]

use keyward_core::canon::{canonical_path, canonical_query};
use keyward_core::{KeyExtractor, KeySpec, PathTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = input.split_once('?').unwrap_or((input, ""));
    let query_once = canonical_query(query);
    assert_eq!(canonical_query(&query_once), query_once, "query {query:?}");

    let Ok(once) = canonical_path(path) else {
        return;
    };
    let twice = canonical_path(&once).expect("a canonical path is accepted");
    assert_eq!(twice, once, "path {path:?}");
    if once != "*" {
        assert!(once.starts_with('/'));
        assert!(once.parse::<http::uri::PathAndQuery>().is_ok(), "{once:?}");
        assert!(!once.contains("//"), "{once:?}");
        assert!(once.len() == 1 || !once.ends_with('/'), "{once:?}");
        assert!(once.split('/').all(|s| s != "." && s != ".."), "{once:?}");
    }
    // A key from the raw spelling equals the key from the canonical one.
    let Ok(uri) = format!("{path}?{query}").parse::<http::Uri>() else {
        return;
    };
    // Only where `http` took the path as written (it cuts a `#fragment`, for one).
    if uri.path() != path || uri.query().unwrap_or("") != query {
        return;
    }
    let Ok(canonical_uri) = format!("{once}?{query_once}").parse::<http::Uri>() else {
        return;
    };
    let raw = http::Request::get(uri).body(()).unwrap();
    let canonical = http::Request::get(canonical_uri).body(()).unwrap();
    let method_uri = KeySpec::MethodUri;
    if let (Ok(a), Ok(b)) = (method_uri.extract(&raw), method_uri.extract(&canonical)) {
        assert_eq!(a, b, "{path:?}?{query:?}");
    }
    let template = PathTemplate::new("/{a}/{*rest}").unwrap();
    let spec = KeySpec::parse("path:a").unwrap().with_template(&template);
    if let (Ok(a), Ok(b)) = (spec.extract(&raw), spec.extract(&canonical)) {
        assert_eq!(a, b, "{path:?}");
    }
});
