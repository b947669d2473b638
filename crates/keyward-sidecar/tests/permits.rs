//! Black-box: `[routes.serial] permits = N` lets N requests per key into the upstream at
//! once, queues the rest in order, and keeps other keys apart.

#![allow(clippy::unwrap_used)]

mod support;

use http::StatusCode;
use support::{Sidecar, Upstream, client, send_concurrently};

const ROUTES: &str = r#"
[[routes]]
name = "tenants"
path = "/tenants/{id}/work"

[routes.serial]
key = "path:id"
permits = 2
max_wait = "10s"
"#;

#[tokio::test]
async fn at_most_permits_requests_per_key_reach_the_upstream_at_once() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTES).await;
    let http = client();
    let url = sidecar.url("/tenants/t1/work?delay_ms=150");
    let replies = send_concurrently(&http, 6, "POST", &url, &[], "").await;
    assert!(
        replies.iter().all(|r| r.status == StatusCode::OK),
        "{replies:?}"
    );
    let most = upstream.seen.max_in_flight.lock().unwrap()["/tenants/t1/work"];
    assert_eq!(most, 2, "requests of one key inside the upstream at once");
    // Every holder got its own fencing token.
    let mut tokens: Vec<u64> = upstream
        .seen
        .headers
        .lock()
        .unwrap()
        .iter()
        .map(|h| {
            h["keyward-fencing-token"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 6);
    sidecar.terminate().await;
}

#[test]
fn zero_permits_is_a_config_error_naming_the_field() {
    let (code, out) = support::check(
        "[server]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.serial]\npermits = 0\n",
    );
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("routes[0].serial.permits: 0"), "{out}");
}
