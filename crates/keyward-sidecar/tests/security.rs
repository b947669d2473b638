//! Security properties of the sidecar, black box: replays are scoped by principal, the
//! admin listener is loopback unless configured otherwise, raw keys and bodies never
//! reach the logs, and a Redis password works without ever being printed.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Stdio;

use keyward_tests::redis_kit::RedisServer;
use support::{Sidecar, Upstream, client, send, tempdir};

const ROUTE: &str = r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]
key = "header:Idempotency-Key"
scope = "header:Authorization"

[routes.serial]
key = "path:id"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principal_b_cannot_read_a_stored_response_with_a_key() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTE).await;
    let http = client();
    let url = sidecar.url("/payments/1");
    let alice = [
        ("authorization", "Bearer alice"),
        ("idempotency-key", "k-1"),
    ];
    let bob = [("authorization", "Bearer bob"), ("idempotency-key", "k-1")];

    let first = send(&http, "POST", &url, &alice, "amount=10").await;
    assert_eq!(first.status, 200);
    // Bob sends Alice's key with Alice's body: he gets an execution of his own, never
    // Alice's stored response.
    let stolen = send(&http, "POST", &url, &bob, "amount=10").await;
    assert_eq!(stolen.status, 200);
    assert!(stolen.header("idempotent-replayed").is_none());
    assert_ne!(stolen.body, first.body);
    // Alice's retry is still her own replay.
    let retry = send(&http, "POST", &url, &alice, "amount=10").await;
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.hits(), 2);
}

#[test]
fn admin_listener_is_loopback_unless_configured() {
    let dir = tempdir::Dir::new("admin-default");
    let path = dir.path().join("keyward.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:18080\"\nupstream = \"http://127.0.0.1:9000\"\n",
    )
    .unwrap();
    let (code, out) = support::check_file(&path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("admin 127.0.0.1:9901"), "{out}");
}

/// Reads a log file written by a sidecar that has exited.
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_keys_bodies_and_redis_passwords_never_reach_the_logs() {
    const KEY: &str = "RAWKEY-7f3a9c";
    const BODY: &str = "BODYSECRET-51e2";
    const PASSWORD: &str = "hunter2-redis-pw";
    let redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let upstream = Upstream::start().await;
    let dir = tempdir::Dir::new("logs");
    let log = dir.path().join("keyward.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"redis://:{PASSWORD}@127.0.0.1:{}\"\n\n[telemetry]\nlog_format = \"json\"\n",
        redis.port()
    );
    let sidecar = Sidecar::start_configured(upstream.addr, "", &format!("{store}{ROUTE}"), |cmd| {
        // Everything the sidecar can log, to one file.
        cmd.env("KEYWARD_LOG", "trace")
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file.try_clone().unwrap()));
    })
    .await;
    let http = client();
    let url = sidecar.url("/payments/1");
    let headers = [("authorization", "Bearer alice"), ("idempotency-key", KEY)];
    let first = send(&http, "POST", &url, &headers, BODY).await;
    assert_eq!(first.status, 200, "the store authenticated: {}", first.body);
    let replay = send(&http, "POST", &url, &headers, BODY).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let mismatch = send(&http, "POST", &url, &headers, "other body").await;
    assert_eq!(mismatch.status, 422);
    let invalid = format!("{KEY} with spaces");
    let bad = send(
        &http,
        "POST",
        &url,
        &[("idempotency-key", invalid.as_str())],
        BODY,
    )
    .await;
    assert_eq!(bad.status, 400);
    let ready = sidecar.admin_get(&http, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let status = sidecar.terminate().await;
    assert!(status.success(), "{status:?}");

    let logged = read_log(&log);
    assert!(
        logged.contains("\"request\""),
        "no access log lines: {logged}"
    );
    for secret in [KEY, BODY, PASSWORD, "Bearer alice"] {
        assert!(
            !logged.contains(secret),
            "{secret:?} in the logs:\n{logged}"
        );
    }
}
