//! `KeySpec::parse_all` on any spec list, then `extract` (and `Scope::of_request`) on a
//! request built from the rest of the input. Input lines: specs (comma separated), URI,
//! header name, header value (raw bytes), route template. Nothing may panic.
#![no_main]

use std::net::SocketAddr;

use keyward_core::{KeyExtractor, KeySpec, PathParams, PathTemplate, PeerAddr, Scope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == b'\n');
    let Some(Ok(specs)) = parts.next().map(std::str::from_utf8) else {
        return;
    };
    let Ok(mut spec) = KeySpec::parse_all(specs.split(',')) else {
        return;
    };
    let uri = parts.next().unwrap_or_default();
    let name = parts.next().unwrap_or_default();
    let value = parts.next().unwrap_or_default();
    if let Some(Ok(template)) = parts.next().map(std::str::from_utf8) {
        if let Ok(template) = PathTemplate::new(template) {
            spec = spec.with_template(&template);
        }
    }
    let mut builder = http::Request::builder().uri(uri);
    if !name.is_empty() {
        builder = builder.header(name, value);
    }
    let Ok(mut req) = builder.body(()) else {
        return;
    };
    let peer: SocketAddr = ([127, 0, 0, 1], 4000).into();
    let _ = spec.extract(&req);
    let _ = Scope::of_request(Some(&spec), &req);
    req.extensions_mut().insert(PeerAddr(peer));
    req.extensions_mut().insert(PathParams(vec![(
        "id".to_owned(),
        String::from_utf8_lossy(value).into_owned(),
    )]));
    if let Ok(Some(key)) = spec.extract(&req) {
        // Hashing is total; the hash is what reaches logs.
        let _ = key.hash();
    }
});
