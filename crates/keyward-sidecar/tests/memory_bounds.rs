//! Memory bounds, black box: the built `keyward` flooded with unique keys must stay
//! within the memory its `[store]` bounds promise. RSS is read from `/proc/PID/status`.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use http::StatusCode;
use support::{HttpClient, Sidecar, client, send};

/// RSS growth allowed beyond the bounds: allocator arenas and caches, connection
/// buffers, tokio's task slabs, the metrics registry. Stated in README ("Memory").
const RSS_CONSTANT: u64 = 8 << 20;

/// A small upstream answer, as the issue measured it: `{"ok":true}` and three headers.
async fn small_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        (
            [
                ("content-type", "application/json"),
                ("cache-control", "no-store"),
                ("x-request-id", "0123456789abcdef"),
            ],
            r#"{"ok":true}"#,
        )
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn rss_bytes(sidecar: &Sidecar) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.child.id())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .map(|n| n.trim().parse().unwrap())
        .unwrap();
    kib * 1024
}

/// Sends `count` requests from `workers` tasks; request `i` carries `headers(i)`.
/// Returns how many answers had each status.
async fn flood(
    http: &HttpClient,
    url: String,
    method: &'static str,
    count: usize,
    headers: fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<(StatusCode, usize)> {
    const WORKERS: usize = 32;
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return statuses;
                    }
                    let owned = headers(i);
                    let pairs: Vec<(&str, &str)> =
                        owned.iter().map(|(n, v)| (*n, v.as_str())).collect();
                    statuses.push(send(&http, method, &url, &pairs, "{}").await.status);
                }
            })
        })
        .collect();
    let mut counts: Vec<(StatusCode, usize)> = Vec::new();
    for task in tasks {
        for status in task.await.unwrap() {
            match counts.iter_mut().find(|(s, _)| *s == status) {
                Some((_, n)) => *n += 1,
                None => counts.push((status, 1)),
            }
        }
    }
    counts
}

fn count_of(counts: &[(StatusCode, usize)], status: StatusCode) -> usize {
    counts
        .iter()
        .find(|(s, _)| *s == status)
        .map_or(0, |(_, n)| *n)
}

const IDEMPOTENT_ROUTE: &str = r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments"

[routes.idempotency]
required = true
"#;

fn fresh_idempotency_key(i: usize) -> Vec<(&'static str, String)> {
    vec![("idempotency-key", format!("flood-{i:08}"))]
}

/// Floods an idempotency route with `count` fresh keys under `max_response_bytes`;
/// asserts RSS growth within 1.5x the bound plus [`RSS_CONSTANT`] and that keys still
/// work afterwards.
async fn idempotency_flood(max_response_bytes: &str, bound: u64, count: usize) {
    let upstream = small_upstream().await;
    let config =
        format!("[store]\nmax_response_bytes = \"{max_response_bytes}\"\n{IDEMPOTENT_ROUTE}");
    let sidecar = Sidecar::start(upstream, &config).await;
    let http = client();
    let url = sidecar.url("/payments");
    // Warm up: connection pools, tokio's worker threads, allocator arenas.
    let warm = flood(&http, url.clone(), "POST", 500, |i| {
        vec![("idempotency-key", format!("warm-{i}"))]
    })
    .await;
    assert_eq!(count_of(&warm, StatusCode::OK), 500, "{warm:?}");
    let before = rss_bytes(&sidecar);
    let started = Instant::now();
    let counts = flood(&http, url.clone(), "POST", count, fresh_idempotency_key).await;
    let after = rss_bytes(&sidecar);
    let growth = after.saturating_sub(before);
    eprintln!(
        "idempotency flood at {max_response_bytes}: {count} keys in {:?}, RSS {} -> {} KiB \
         (+{} KiB, {} B per request)",
        started.elapsed(),
        before / 1024,
        after / 1024,
        growth / 1024,
        growth / count as u64,
    );
    assert_eq!(count_of(&counts, StatusCode::OK), count, "{counts:?}");
    let allowed = bound * 3 / 2 + RSS_CONSTANT;
    assert!(
        growth <= allowed,
        "RSS grew by {growth} bytes, more than 1.5 x {bound} + {RSS_CONSTANT} = {allowed}"
    );
    // Keys still work: a new key runs and its retry is replayed.
    let key = [("idempotency-key", "after-the-flood")];
    let first = send(&http, "POST", &url, &key, "{}").await;
    let again = send(&http, "POST", &url, &key, "{}").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    sidecar.terminate().await;
}

/// At the issue's setting: 16 MiB of records is more than this flood stores, so what is
/// tested is that RSS grows by what the records hold (before the fix: ~5.5 KiB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_flood_at_16mib_stays_within_the_bound() {
    idempotency_flood("16MiB", 16 << 20, 15_000).await;
}

/// A small bound that the flood exceeds ~7 times over in records (~520 accounted bytes
/// each): completed records are evicted and RSS stays near the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_flood_past_a_small_bound_evicts_and_stays_within_it() {
    idempotency_flood("1MiB", 1 << 20, 15_000).await;
}

const QUOTA_ROUTE: &str = r#"
[[routes]]
name = "search"
methods = ["POST"]
path = "/search"

[routes.quota]
key = "header:X-Api-Key"
limit = 10
per = "1h"
"#;

/// Bytes the store accounts per quota key, whatever its length (README "Memory").
const QUOTA_KEY_BYTES: u64 = 57;

fn fresh_api_key(i: usize) -> Vec<(&'static str, String)> {
    vec![("x-api-key", format!("tenant-{i:08}"))]
}

/// Twice as many unique keys as the table holds: the first half fill it, the rest are
/// refused with 503 + `Retry-After` (active keys are never evicted), and RSS grows by
/// at most 1.5x the keys' bound plus the constant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_flood_past_max_quota_keys_refuses_new_keys_and_stays_within_the_bound() {
    const MAX_KEYS: usize = 10_000;
    let upstream = small_upstream().await;
    let config = format!("[store]\nmax_quota_keys = {MAX_KEYS}\n{QUOTA_ROUTE}");
    let sidecar = Sidecar::start(upstream, &config).await;
    let http = client();
    let url = sidecar.url("/search");
    let warm = flood(&http, url.clone(), "POST", 500, |i| {
        vec![("x-api-key", format!("warm-{i}"))]
    })
    .await;
    assert_eq!(count_of(&warm, StatusCode::OK), 500, "{warm:?}");
    let before = rss_bytes(&sidecar);
    let count = 2 * MAX_KEYS;
    let started = Instant::now();
    let counts = flood(&http, url.clone(), "POST", count, fresh_api_key).await;
    let after = rss_bytes(&sidecar);
    let growth = after.saturating_sub(before);
    eprintln!(
        "quota flood: {count} keys in {:?}, RSS {} -> {} KiB (+{} KiB), {counts:?}",
        started.elapsed(),
        before / 1024,
        after / 1024,
        growth / 1024,
    );
    let allowed = MAX_KEYS as u64 * QUOTA_KEY_BYTES * 3 / 2 + RSS_CONSTANT;
    assert!(
        growth <= allowed,
        "RSS grew by {growth} bytes, more than 1.5 x {MAX_KEYS} keys x {QUOTA_KEY_BYTES} B + \
         {RSS_CONSTANT} = {allowed}"
    );
    let ok = count_of(&counts, StatusCode::OK);
    let refused = count_of(&counts, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ok + refused, count, "{counts:?}");
    // 10 000 keys over 64 shards fill unevenly: some shards refuse before the others
    // are full, so a little under the bound is admitted.
    assert!(
        (MAX_KEYS * 8 / 10..=MAX_KEYS + 64).contains(&ok),
        "{ok} admitted"
    );
    // Known keys keep their quota; a new key is refused with Retry-After.
    let known = send(&http, "POST", &url, &[("x-api-key", "warm-1")], "{}").await;
    assert_eq!(known.status, StatusCode::OK);
    let new = send(
        &http,
        "POST",
        &url,
        &[("x-api-key", "after-the-flood")],
        "{}",
    )
    .await;
    assert_eq!(new.status, StatusCode::SERVICE_UNAVAILABLE, "{}", new.body);
    assert!(new.header("retry-after").is_some());
    sidecar.terminate().await;
}

const SERIAL_ROUTE: &str = r#"
[[routes]]
name = "accounts"
methods = ["POST"]
path = "/accounts/{id}"

[routes.serial]
key = "path:id"
"#;

/// A full table of live idempotency claims (or serial keys) refuses new keys with 503 +
/// `Retry-After`, never evicting a live one: held by slow upstream requests here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_live_tables_refuse_new_keys_with_503_and_retry_after() {
    let upstream = support::Upstream::start().await;
    let config =
        format!("[store]\nmax_claims = 64\nmax_serial_keys = 64\n{IDEMPOTENT_ROUTE}{SERIAL_ROUTE}");
    let sidecar = Sidecar::start(upstream.addr, &config).await;
    let http = client();
    for (path, header) in [
        ("/payments?delay_ms=1500", Some("idempotency-key")),
        ("", None),
    ] {
        let slow: Vec<_> = (0..200)
            .map(|i| {
                let http = http.clone();
                let (url, headers) = match header {
                    Some(name) => (sidecar.url(path), vec![(name, format!("slow-{i}"))]),
                    None => (
                        sidecar.url(&format!("/accounts/a{i}?delay_ms=1500")),
                        vec![],
                    ),
                };
                tokio::spawn(async move {
                    let pairs: Vec<(&str, &str)> =
                        headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                    send(&http, "POST", &url, &pairs, "{}").await
                })
            })
            .collect();
        let mut ok = 0;
        let mut refused = 0;
        for task in slow {
            let reply = task.await.unwrap();
            match reply.status {
                StatusCode::OK => ok += 1,
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert!(reply.header("retry-after").is_some(), "{reply:?}");
                    refused += 1;
                }
                other => panic!("{other}: {}", reply.body),
            }
        }
        assert!(
            (1..=64).contains(&ok),
            "{path}: {ok} admitted, {refused} refused"
        );
        assert_eq!(ok + refused, 200);
    }
    sidecar.terminate().await;
}
