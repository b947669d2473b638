//! The dashboard, proven on a real Prometheus: a `prometheus` process scrapes a running
//! sidecar every second while traffic runs through every layer, and every panel query
//! of `deploy/grafana/keyward.json` (with `$route` and `$__rate_interval` substituted)
//! is evaluated through Prometheus' HTTP API. A query that returns nothing fails.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::prometheus::Prometheus;
use support::{HttpClient, Sidecar, Upstream, client, send};

/// One route per layer; a quota route with a 1 s window on a table of one key per shard
/// makes store errors (let through: `on_error = "open"`).
const ALL_LAYERS: &str = r#"
[store]
max_quota_keys = 1
on_error = "open"

[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]

[[routes]]
name = "search"
path = "/search"

[routes.quota]
key = "header:X-Api-Key"
limit = 1
per = "1h"

[[routes]]
name = "flood"
path = "/flood"

[routes.quota]
key = "header:X-Api-Key"
limit = 1
per = "1s"

[[routes]]
name = "accounts"
methods = ["POST"]
path = "/accounts/{id}"

[routes.serial]
key = "path:id"
max_wait = "5s"

[[routes]]
name = "catalog"
path = "/catalog/{*rest}"

[routes.single_flight]
key = "method_uri"
scope = "none"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data_on_a_real_prometheus() {
    let upstream = Upstream::start().await;
    let sidecar =
        Sidecar::start_with_server(upstream.addr, "request_timeout = \"300ms\"", ALL_LAYERS).await;
    let http = client();
    let prometheus = Prometheus::start(&http, sidecar.admin, &[]).await;

    // Traffic runs while Prometheus scrapes and while the panels are evaluated.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (http, stop) = (http.clone(), stop.clone());
        let sidecar_url = sidecar.url("");
        let admin = sidecar.admin;
        tokio::spawn(async move {
            let sidecar = SidecarUrls {
                base: sidecar_url,
                _admin: admin,
            };
            let mut round = 0;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                traffic_at(&http, &sidecar, round).await;
                // An upstream timeout (504, error.type timeout) every few rounds.
                if round % 3 == 0 {
                    send(
                        &http,
                        "GET",
                        &format!("{}/slow?delay_ms=500", sidecar.base),
                        &[],
                        "",
                    )
                    .await;
                }
            }
        })
    };

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/keyward.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap().to_owned();
            let expr = target["expr"].as_str().unwrap();
            // What Grafana sends with route "All" (allValue ".*") and a 1 s scrape.
            let expr = expr
                .replace("$route", ".*")
                .replace("$__rate_interval", "5s");
            queries.push((title, expr));
        }
    }
    assert!(queries.len() >= 19, "{queries:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending = queries.clone();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (title, expr) in pending {
            let result = prometheus.query(&http, &expr).await;
            // NaN is what a ratio or quantile gives over a window without events: no data.
            let has_data = result
                .iter()
                .any(|series| series["value"][1].as_str().is_some_and(|v| v != "NaN"));
            if !has_data {
                still.push((title, expr));
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    background.await.unwrap();
    assert!(
        pending.is_empty(),
        "panels without data after 30 s: {pending:#?}"
    );
    let routes = prometheus
        .query(&http, "count by (route) (keyward_decisions_total)")
        .await;
    assert!(
        routes.len() >= 4,
        "the $route variable's values: {routes:?}"
    );
}

/// The sidecar's address, for the background task (the `Sidecar` stays with the test).
struct SidecarUrls {
    base: String,
    _admin: std::net::SocketAddr,
}

async fn traffic_at(http: &HttpClient, sidecar: &SidecarUrls, round: usize) {
    let url = |path: &str| format!("{}{path}", sidecar.base);
    let key = format!("order-{round}");
    let idem = [("idempotency-key", key.as_str())];
    for _ in 0..2 {
        send(http, "POST", &url("/payments/1"), &idem, "a").await;
    }
    for n in 0..3 {
        let tenant = format!("t-{}", n.min(1));
        send(
            http,
            "GET",
            &url("/search"),
            &[("x-api-key", tenant.as_str())],
            "",
        )
        .await;
    }
    // Store errors: the quota table holds one key per shard; 80 fresh keys overflow it
    // (they idle out after their 1 s window, and the next round overflows it again).
    for n in 0..80 {
        let tenant = format!("flood-{round}-{n}");
        send(
            http,
            "GET",
            &url("/flood"),
            &[("x-api-key", tenant.as_str())],
            "",
        )
        .await;
    }
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (method, target) = if i < 2 {
            ("POST", url("/accounts/1?delay_ms=100"))
        } else {
            ("GET", url(&format!("/catalog/r{round}?delay_ms=100")))
        };
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            send(&http, method, &target, &[], "x").await
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}
