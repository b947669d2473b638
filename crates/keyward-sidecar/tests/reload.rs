//! Live reload: `SIGHUP` and `POST /reload` swap routes and limits while a client loop
//! runs (no request fails), a bad file leaves the old config serving with the same
//! field-named errors `keyward check` prints, a change only a restart can apply is
//! refused, saying so, and a request in flight during a reload finishes under the
//! settings it started with.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::{HttpClient, Sidecar, Upstream, client, send};

fn routes(limit: u32) -> String {
    format!(
        r#"
[[routes]]
name = "api"
path = "/api/{{*rest}}"

[routes.quota]
key = "header:X-Api-Key"
limit = {limit}
per = "1h"

[[routes]]
name = "slow"
path = "/slow"

[routes.serial]
key = "method_uri"
max_wait = "10s"
"#
    )
}

fn server(sidecar: &Sidecar, upstream: &Upstream) -> String {
    format!(
        "[server]\nlisten = \"{}\"\nupstream = \"http://{}\"\nadmin = \"{}\"\nrequest_timeout = \"2s\"\nshutdown_grace = \"5s\"\n",
        sidecar.addr, upstream.addr, sidecar.admin
    )
}

async fn admin(http: &HttpClient, sidecar: &Sidecar, method: &str, path: &str) -> (u16, Value) {
    let url = format!("http://{}{path}", sidecar.admin);
    let reply = send(http, method, &url, &[], "").await;
    (
        reply.status.as_u16(),
        serde_json::from_str(&reply.body).unwrap(),
    )
}

/// Requests in a loop (quick ones on a quota route with a key of their own, slow ones
/// through a serial route) until `stop`: counts the sent and the failed.
fn client_loop(
    http: HttpClient,
    sidecar: &Sidecar,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    slow: bool,
    id: usize,
) -> tokio::task::JoinHandle<Vec<String>> {
    let base = sidecar.url("");
    tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let (url, key) = if slow {
                (format!("{base}/slow?delay_ms=150"), String::new())
            } else {
                // A fresh key per request: no quota runs out, whatever the limit.
                (format!("{base}/api/x"), format!("loop-{id}-{n}"))
            };
            let mut builder = http::Request::get(&url);
            if !key.is_empty() {
                builder = builder.header("x-api-key", key);
            }
            let req = builder
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            sent.fetch_add(1, Ordering::SeqCst);
            match http.request(req).await {
                Ok(res) if res.status() == 200 => {
                    http_body_util::BodyExt::collect(res.into_body())
                        .await
                        .unwrap();
                }
                Ok(res) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    failures.push(format!("{url}: {}", res.status()));
                }
                Err(err) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    failures.push(format!("{url}: {err}"));
                }
            }
        }
        failures
    })
}

/// Sends requests with `key` until one is refused: how many were allowed (bounded).
async fn allowed_for(http: &HttpClient, sidecar: &Sidecar, key: &str) -> u32 {
    for n in 0..100 {
        let res = send(
            http,
            "GET",
            &sidecar.url("/api/x"),
            &[("x-api-key", key)],
            "",
        )
        .await;
        if res.status == 429 {
            return n;
        }
        assert_eq!(res.status, 200, "{}", res.body);
    }
    panic!("no limit in force for {key}");
}

/// Waits (bounded: 5 s) until the admin listener reports `limit` for the api route.
async fn wait_for_limit(http: &HttpClient, sidecar: &Sidecar, limit: u32) {
    for _ in 0..500 {
        let (_, peek) = admin(http, sidecar, "GET", "/quota/api/probe").await;
        if peek["limit"].as_u64() == Some(u64::from(limit)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the reload to limit {limit} did not apply within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_a_client_loop_fail_no_request_and_apply_each_limit() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, &routes(1)).await;
    let http = client();
    let header = server(&sidecar, &upstream);
    let (stop, sent, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let loops: Vec<_> = [false, false, true, true]
        .into_iter()
        .enumerate()
        .map(|(id, slow)| {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            client_loop(http.clone(), &sidecar, stop, sent, failed, slow, id)
        })
        .collect();
    assert_eq!(allowed_for(&http, &sidecar, "before").await, 1);
    for round in 1..=10u32 {
        let limit = round + 1;
        std::fs::write(sidecar.config_path(), format!("{header}{}", routes(limit))).unwrap();
        if round % 2 == 0 {
            let (status, answer) = admin(&http, &sidecar, "POST", "/reload").await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["reloaded"], true);
        } else {
            let pid = sidecar.child.id().to_string();
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap();
            wait_for_limit(&http, &sidecar, limit).await;
        }
        assert_eq!(
            allowed_for(&http, &sidecar, &format!("round-{round}")).await,
            limit
        );
    }

    // A bad file: refused with check's field-named errors; the old config keeps serving.
    let bad = format!(
        "{header}{}",
        routes(11).replace("per = \"1h\"", "per = \"5 minutes\"")
    );
    std::fs::write(sidecar.config_path(), bad).unwrap();
    let (status, answer) = admin(&http, &sidecar, "POST", "/reload").await;
    assert_eq!(status, 422, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("routes[0].quota.per: \"5 minutes\" is not a duration"),
        "{error}"
    );
    let (code, checked) = support::check_file(&sidecar.config_path());
    assert_eq!(code, 64);
    assert!(
        checked.contains("routes[0].quota.per: \"5 minutes\""),
        "{checked}"
    );
    assert_eq!(allowed_for(&http, &sidecar, "after-bad").await, 11);
    // SIGHUP with the bad file: still serving, still the old limit.
    let pid = sidecar.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let (_, peek) = admin(&http, &sidecar, "GET", "/quota/api/probe").await;
    assert_eq!(peek["limit"], 11);

    // A change only a restart applies: refused, naming the field.
    let moved = format!("{header}{}", routes(20)).replace(&sidecar.addr.to_string(), "127.0.0.1:1");
    std::fs::write(sidecar.config_path(), moved).unwrap();
    let (status, answer) = admin(&http, &sidecar, "POST", "/reload").await;
    assert_eq!(status, 409, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("server.listen") && error.contains("restart"),
        "{error}"
    );
    assert_eq!(
        allowed_for(&http, &sidecar, "after-restart-needed").await,
        11
    );

    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for task in loops {
        failures.extend(task.await.unwrap());
    }
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent > 40, "the client loops ran: {sent} requests");
    assert_eq!(failed.load(Ordering::SeqCst), 0, "{failures:?} of {sent}");
    assert!(sidecar.child.id() > 0);
}

/// A payments route whose quota limit and idempotency record ttl a reload changes.
fn held_routes(limit: u32, ttl: &str) -> String {
    format!(
        r#"
[[routes]]
name = "pay"
methods = ["POST"]
path = "/pay/{{id}}"

[routes.quota]
key = "header:X-Api-Key"
limit = {limit}
per = "1h"

[routes.idempotency]
ttl = "{ttl}"
"#
    )
}

/// How long the record of idempotency key `key` on the `pay` route has left.
async fn expires_in(http: &HttpClient, sidecar: &Sidecar, key: &str) -> f64 {
    let (status, record) = admin(http, sidecar, "GET", &format!("/keys/pay/{key}")).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["state"], "completed", "{record}");
    record["expires_in_seconds"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_across_a_reload_finishes_under_the_settings_it_started_with() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, &held_routes(5, "1h")).await;
    let http = client();
    let gate = upstream.gate("reload");

    // Admitted under limit 5 and ttl 1h, then held inside the upstream.
    let held = {
        let (http, url) = (http.clone(), sidecar.url("/pay/1?hold=reload"));
        tokio::spawn(async move {
            send(
                &http,
                "POST",
                &url,
                &[("x-api-key", "tenant"), ("idempotency-key", "held")],
                "{}",
            )
            .await
        })
    };
    gate.arrived(1).await;

    std::fs::write(
        sidecar.config_path(),
        format!("{}{}", server(&sidecar, &upstream), held_routes(50, "24h")),
    )
    .unwrap();
    let (status, answer) = admin(&http, &sidecar, "POST", "/reload").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["reloaded"], true);

    // A request after the reload: the new limit and the new ttl.
    let after = send(
        &http,
        "POST",
        &sidecar.url("/pay/2"),
        &[("x-api-key", "tenant"), ("idempotency-key", "after")],
        "{}",
    )
    .await;
    assert_eq!(after.status, 200, "{}", after.body);
    let policy = after.header("ratelimit-policy").unwrap().to_owned();
    assert!(policy.contains("q=50;"), "{policy}");
    assert!(!held.is_finished(), "the held request is still in flight");

    // The held request ends now: its answer and its record are the old config's.
    gate.release();
    let held = held.await.unwrap();
    assert_eq!(held.status, 200, "{}", held.body);
    let policy = held.header("ratelimit-policy").unwrap().to_owned();
    assert!(
        policy.contains("q=5;"),
        "old limit on the in-flight answer: {policy}"
    );
    let old_ttl = expires_in(&http, &sidecar, "held").await;
    assert!(
        old_ttl <= 3600.0 && old_ttl > 3000.0,
        "the in-flight request's record keeps the old ttl (1h): {old_ttl}"
    );
    let new_ttl = expires_in(&http, &sidecar, "after").await;
    assert!(
        new_ttl > 3600.0 && new_ttl <= 86400.0,
        "the new request's record has the new ttl (24h): {new_ttl}"
    );
    // Its retry is a replay: the record stored under the old config serves on.
    let retry = send(
        &http,
        "POST",
        &sidecar.url("/pay/1?hold=reload"),
        &[("x-api-key", "tenant"), ("idempotency-key", "held")],
        "{}",
    )
    .await;
    assert_eq!(
        retry.header("idempotent-replayed"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(upstream.hits(), 2);
}
