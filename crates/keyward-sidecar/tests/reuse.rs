//! `reuse_for` black-box: a burst of identical reads spread over time reaches the
//! upstream once per `reuse_for`, on one sidecar and across two sharing a Redis.
#![allow(clippy::unwrap_used)]

mod support;

use keyward_tests::redis_kit::RedisServer;
use support::{Sidecar, Upstream, client, send};

const ROUTE: &str = r#"
[[routes]]
name = "prices"
path = "/prices/{currency}"

[routes.single_flight]
scope = "none"
reuse_for = "30s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_a_landing_reuse_it_with_an_age() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTE).await;
    let http = client();
    let url = sidecar.url("/prices/eur");
    let first = send(&http, "GET", &url, &[], "").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("keyward-coalesced"), None);
    for _ in 0..3 {
        let again = send(&http, "GET", &url, &[], "").await;
        assert_eq!(again.header("keyward-coalesced"), Some("true"), "{again:?}");
        assert!(
            again.header("age").unwrap().parse::<u64>().unwrap() < 30,
            "{again:?}"
        );
        assert_eq!(again.body, first.body);
        // The leader's cookie is never handed to others.
        assert_eq!(again.header("set-cookie"), None, "{again:?}");
    }
    assert_eq!(upstream.hits(), 1);
    // Another representation or a failure is not reused.
    let csv = send(&http, "GET", &url, &[("accept", "text/csv")], "").await;
    assert_eq!(csv.header("keyward-coalesced"), None, "{csv:?}");
    let failing = sidecar.url("/prices/usd?status=503");
    send(&http, "GET", &failing, &[], "").await;
    let again = send(&http, "GET", &failing, &[], "").await;
    assert_eq!(again.header("keyward-coalesced"), None, "{again:?}");
    assert_eq!(upstream.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_landing_on_one_sidecar_serves_the_other_through_redis() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let routes = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\n{ROUTE}",
        redis.url()
    );
    let one = Sidecar::start(upstream.addr, &routes).await;
    let two = Sidecar::start(upstream.addr, &routes).await;
    let http = client();
    // One public name for both (the authority is part of the key: without it each
    // sidecar's own address would be).
    let host = [("host", "prices.example")];
    let first = send(&http, "GET", &one.url("/prices/eur"), &host, "").await;
    assert_eq!(first.status, 200, "{first:?}");
    let other = send(&http, "GET", &two.url("/prices/eur"), &host, "").await;
    assert_eq!(other.header("keyward-coalesced"), Some("true"), "{other:?}");
    assert!(other.header("age").is_some(), "{other:?}");
    assert_eq!(other.body, first.body);
    assert_eq!(upstream.hits(), 1);
}
