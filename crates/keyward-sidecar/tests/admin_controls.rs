//! Key controls on the admin listener: `DELETE /keys/{route}/{key}` (forget a record or
//! free a stuck claim, fenced, audited), `GET /quota/{route}/{key}` (what a quota key has
//! left, without taking anything), and the optional `admin_token`.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;

use serde_json::Value;
use support::{HttpClient, Sidecar, Upstream, check, client, send};

const ROUTES: &str = r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]
key = "header:Idempotency-Key"
scope = "header:Authorization"

[[routes]]
name = "api"
path = "/api/{*rest}"

[routes.quota]
key = "header:X-Api-Key"
limit = 5
per = "1h"

[[routes.quota.overrides]]
key = "key_bigcorp"
limit = 100

[[routes]]
name = "by-ip"
path = "/open"

[routes.quota]
limit = 3
per = "1h"
"#;

async fn admin(
    http: &HttpClient,
    sidecar: &Sidecar,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let url = format!("http://{}{path}", sidecar.admin);
    let reply = send(http, method, &url, headers, "").await;
    let body = serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body));
    (reply.status.as_u16(), body)
}

const ALICE: [(&str, &str); 1] = [("authorization", "Bearer alice")];

async fn pay(http: &HttpClient, sidecar: &Sidecar, key: &str, query: &str) -> support::Reply {
    let headers = [("authorization", "Bearer alice"), ("idempotency-key", key)];
    let url = sidecar.url(&format!("/payments/1{query}"));
    send(http, "POST", &url, &headers, "amount=5").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_key_runs_again_and_a_stale_holder_cannot_complete() {
    let upstream = Upstream::start().await;
    let log = support::tempdir::Dir::new("audit");
    let log_path = log.path().join("keyward.log");
    let sidecar = Sidecar::start_configured(upstream.addr, "", ROUTES, |command| {
        let file = std::fs::File::create(&log_path).unwrap();
        command.env("KEYWARD_LOG", "warn").stdout(Stdio::from(file));
    })
    .await;
    let http = client();

    // A completed record: forgotten, so the retry executes again.
    assert_eq!(pay(&http, &sidecar, "order-1", "").await.status, 200);
    assert!(
        pay(&http, &sidecar, "order-1", "")
            .await
            .header("idempotent-replayed")
            .is_some()
    );
    let (status, bob) = admin(
        &http,
        &sidecar,
        "DELETE",
        "/keys/payments/order-1",
        &[("authorization", "Bearer bob")],
    )
    .await;
    assert_eq!(
        (status, &bob["forgotten"]),
        (200, &Value::Bool(false)),
        "scoped: Bob's key is another key: {bob}"
    );
    let headers = [ALICE[0], ("keyward-operator", "support-jane")];
    let (status, gone) = admin(
        &http,
        &sidecar,
        "DELETE",
        "/keys/payments/order-1",
        &headers,
    )
    .await;
    assert_eq!(status, 200, "{gone}");
    assert_eq!(gone["forgotten"], true, "{gone}");
    assert_eq!(gone["was"]["state"], "completed", "{gone}");
    assert!(!gone.to_string().contains("order-1"), "raw key in {gone}");
    let again = pay(&http, &sidecar, "order-1", "").await;
    assert_eq!(again.status, 200);
    assert!(again.header("idempotent-replayed").is_none(), "ran again");
    assert_eq!(upstream.hits(), 2);

    // A stuck claim: freed and fenced. The retry runs while the stuck request still does,
    // and the stuck request, finishing first, cannot store its response.
    let stuck = {
        let (http, url) = (http.clone(), sidecar.url("/payments/1?delay_ms=1500"));
        tokio::spawn(async move {
            let headers = [
                ("authorization", "Bearer alice"),
                ("idempotency-key", "order-2"),
            ];
            send(&http, "POST", &url, &headers, "amount=5").await
        })
    };
    upstream.wait_for_hits(3).await;
    let (_, held) = admin(&http, &sidecar, "GET", "/keys/payments/order-2", &ALICE).await;
    assert_eq!(held["state"], "in_flight", "{held}");
    let (status, freed) = admin(&http, &sidecar, "DELETE", "/keys/payments/order-2", &ALICE).await;
    assert_eq!(status, 200, "{freed}");
    assert_eq!(freed["was"]["state"], "in_flight", "{freed}");
    let retry = pay(&http, &sidecar, "order-2", "?delay_ms=1500").await;
    let stuck = stuck.await.unwrap();
    assert_eq!((stuck.status.as_u16(), retry.status.as_u16()), (200, 200));
    assert_ne!(
        stuck.body, retry.body,
        "two runs: {} / {}",
        stuck.body, retry.body
    );
    let replay = pay(&http, &sidecar, "order-2", "?delay_ms=1500").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        replay.body, retry.body,
        "the retry's response is stored, not the stale holder's"
    );
    assert_eq!(upstream.hits(), 4);

    let (status, _) = admin(&http, &sidecar, "DELETE", "/keys/nope/k", &ALICE).await;
    assert_eq!(status, 404);
    drop(sidecar);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let audits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("admin: idempotency key forgotten"))
        .collect();
    assert_eq!(
        audits.len(),
        3,
        "one audit line per forget that found the route:\n{log}"
    );
    let key_hash = gone["key_hash"].as_str().unwrap();
    assert!(
        audits.iter().any(|l| l.contains(key_hash)
            && l.contains("127.0.0.1:")
            && l.contains("support-jane")),
        "{audits:?}"
    );
    assert!(
        !log.contains("order-1") && !log.contains("order-2"),
        "raw keys in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_lookup_reports_remaining_and_reset_without_consuming() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTES).await;
    let http = client();
    let (status, fresh) = admin(&http, &sidecar, "GET", "/quota/api/key_small", &[]).await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(
        (fresh["limit"].as_u64(), fresh["remaining"].as_u64()),
        (Some(5), Some(5)),
        "{fresh}"
    );
    assert_eq!(fresh["reset_seconds"].as_f64(), Some(0.0));
    for _ in 0..2 {
        let res = send(
            &http,
            "GET",
            &sidecar.url("/api/x"),
            &[("x-api-key", "key_small")],
            "",
        )
        .await;
        assert_eq!(res.status, 200);
    }
    for _ in 0..3 {
        let (_, seen) = admin(&http, &sidecar, "GET", "/quota/api/key_small", &[]).await;
        assert_eq!(
            seen["remaining"].as_u64(),
            Some(3),
            "look-ups take nothing: {seen}"
        );
        let reset = seen["reset_seconds"].as_f64().unwrap();
        assert!(reset > 1400.0 && reset <= 1440.0, "two of 5/h used: {seen}");
    }
    // The request path agrees with the look-up.
    let res = send(
        &http,
        "GET",
        &sidecar.url("/api/x"),
        &[("x-api-key", "key_small")],
        "",
    )
    .await;
    assert_eq!(res.header("ratelimit"), Some("\"api\";r=2;t=2160"));
    // A per-key override from the file.
    let (_, big) = admin(&http, &sidecar, "GET", "/quota/api/key_bigcorp", &[]).await;
    assert_eq!(
        (big["limit"].as_u64(), big["remaining"].as_u64()),
        (Some(100), Some(100)),
        "{big}"
    );
    // peer_ip keys: by IP address.
    send(&http, "GET", &sidecar.url("/open"), &[], "").await;
    let (status, ip) = admin(&http, &sidecar, "GET", "/quota/by-ip/127.0.0.1", &[]).await;
    assert_eq!((status, ip["remaining"].as_u64()), (200, Some(2)), "{ip}");
    let (status, bad) = admin(&http, &sidecar, "GET", "/quota/by-ip/not-an-ip", &[]).await;
    assert_eq!(status, 400, "{bad}");
    let (status, _) = admin(&http, &sidecar, "GET", "/quota/payments/k", &[]).await;
    assert_eq!(status, 404, "payments has no quota");
    assert_eq!(upstream.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_everything_but_the_probes() {
    let upstream = Upstream::start().await;
    let sidecar =
        Sidecar::start_with_server(upstream.addr, "admin_token = \"s3cret-t0ken\"", ROUTES).await;
    let http = client();
    for path in ["/metrics", "/hotkeys", "/keys/payments/k", "/quota/api/k"] {
        let (status, body) = admin(&http, &sidecar, "GET", path, &[]).await;
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = admin(
            &http,
            &sidecar,
            "GET",
            path,
            &[("authorization", "Bearer wrong")],
        )
        .await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = admin(&http, &sidecar, "DELETE", "/keys/payments/k", &ALICE).await;
    assert_eq!(
        status, 401,
        "a customer's Authorization is not the admin token"
    );
    let (status, _) = admin(&http, &sidecar, "POST", "/reload", &[]).await;
    assert_eq!(status, 401);
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(
            admin(&http, &sidecar, "GET", probe, &[]).await.0,
            200,
            "{probe}"
        );
    }
    let bearer = [("authorization", "Bearer s3cret-t0ken")];
    let (status, metrics) = admin(&http, &sidecar, "GET", "/metrics", &bearer).await;
    assert_eq!(status, 200, "{metrics}");
    // Keyward-Admin-Token leaves Authorization to the customer's principal.
    assert_eq!(pay(&http, &sidecar, "order-9", "").await.status, 200);
    let headers = [("keyward-admin-token", "s3cret-t0ken"), ALICE[0]];
    let (status, state) = admin(&http, &sidecar, "GET", "/keys/payments/order-9", &headers).await;
    assert_eq!(
        (status, state["state"].as_str()),
        (200, Some("completed")),
        "{state}"
    );
    // With the token in Authorization, the look-up has no principal of Alice's.
    let (_, anonymous) = admin(&http, &sidecar, "GET", "/keys/payments/order-9", &bearer).await;
    assert_eq!(anonymous["state"], "absent", "{anonymous}");
}

#[test]
fn check_warns_about_an_open_admin_listener_without_a_token() {
    let base = "[server]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n";
    let (code, out) = check(&format!("{base}admin = \"0.0.0.0:9901\"\n"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: server.admin 0.0.0.0:9901 is reachable beyond loopback and server.admin_token is not set"), "{out}");
    let (code, out) = check(&format!(
        "{base}admin = \"0.0.0.0:9901\"\nadmin_token = \"t0ken\"\n"
    ));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let (_, out) = check(base);
    assert!(!out.contains("warning"), "loopback needs no token: {out}");
    let (code, out) = check(&format!("{base}admin_token = \"has space\"\n"));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("server.admin_token") && !out.contains("has space"),
        "{out}"
    );
}
