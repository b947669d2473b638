//! The sidecar's config parser and checker (`keyward check`) on any UTF-8 text.
//! Nothing may panic; a rejected config names a field in every error; an accepted one
//! builds the route table the server builds (a config `check` accepts must serve), and
//! its `Debug` form (what logs show) never carries a Redis password.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;

// The checker lives in the sidecar binary crate; it is self-contained, so the target
// compiles the module itself rather than turning the binary into a library.
#[allow(dead_code, unreachable_pub)]
#[path = "../../crates/keyward-sidecar/src/config/mod.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::Config::from_toml(text) {
        Err(config::ConfigError::Invalid { errors, .. }) => {
            assert!(!errors.is_empty(), "Invalid without errors");
            for error in &errors {
                assert!(!error.field.is_empty(), "error without a field: {error:?}");
                assert!(!error.message.is_empty(), "error without a message: {error:?}");
            }
        }
        Err(_) => {}
        Ok(config) => {
            let mut router = matchit::Router::new();
            let mut seen = HashSet::new();
            for route in &config.routes {
                if seen.insert(route.path.as_str()) {
                    if let Err(err) = router.insert(route.path.as_str(), ()) {
                        panic!("check accepted {:?}, the server refuses it: {err}", route.path);
                    }
                }
            }
            if let config::Backend::Redis { url, .. } = &config.store.backend {
                if let Some(password) = password_of(url) {
                    let shown = format!("{config:?}");
                    assert!(
                        !shown.contains(&format!(":{password}@")),
                        "password shown in {shown}"
                    );
                }
            }
        }
    }
});

/// The password of `scheme://user:password@host`, if any and non-empty.
fn password_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let (userinfo, _) = rest.split_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty() && password != "***").then_some(password)
}
