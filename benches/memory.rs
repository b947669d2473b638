//! Bytes per stored record: what the memory store really holds for each completed
//! idempotency record and each quota key, counted by dhat's allocator (heap bytes the
//! program asked for, and blocks; glibc adds 8 to 23 bytes per block on top).
//!
//! ```text
//! cargo bench -p keyward-benches --bench memory
//! DHAT_PROFILE=dhat-heap.json cargo bench -p keyward-benches --bench memory   # + a profile
//! ```
//!
//! The record goes through the real path: `IdempotencyLayer` over `MemoryStore`, with the
//! small answer of issue 17 (`{"ok":true}` and three headers). Two shapes of the same
//! answer: built by the handler (fresh allocations), and parsed the way hyper's HTTP/1
//! client parses an upstream's answer, where header values are slices of the
//! connection's 8 KiB read buffer (what the sidecar stores).

use std::convert::Infallible;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use keyward::{IdempotencyLayer, MemoryStore};
use keyward_core::gcra::Quota;
use keyward_core::store::QuotaStore;
use keyward_core::{Key, Scope, ScopedKey};
use tower::{Service, ServiceBuilder, ServiceExt};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const RECORDS: usize = 20_000;
const QUOTA_KEYS: usize = 100_000;

const BODY: &[u8] = br#"{"ok":true}"#;
const HEADERS: [(&str, &str); 3] = [
    ("content-type", "application/json"),
    ("cache-control", "no-store"),
    ("x-request-id", "0123456789abcdef"),
];

/// The answer as a handler builds it.
fn built_response() -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(BODY)));
    for (name, value) in HEADERS {
        res.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    res
}

/// The answer as hyper's HTTP/1 client hands it over: one read buffer of 8 KiB per read
/// (hyper's initial read size); the head is split off and every header value is a slice
/// of it (`hyper::proto::h1::role`), the body a slice of the rest.
fn hyper_parsed_response() -> Response<Full<Bytes>> {
    let mut wire = String::from("HTTP/1.1 200 OK\r\n");
    for (name, value) in HEADERS {
        wire.push_str(&format!("{name}: {value}\r\n"));
    }
    wire.push_str(&format!("content-length: {}\r\n\r\n", BODY.len()));
    let mut buf = BytesMut::with_capacity(8192);
    buf.extend_from_slice(wire.as_bytes());
    buf.extend_from_slice(BODY);
    let head = buf.split_to(wire.len()).freeze();
    let body = buf.split_to(BODY.len()).freeze();
    let mut res = Response::new(Full::new(body));
    let mut offset = "HTTP/1.1 200 OK\r\n".len();
    for (name, value) in HEADERS {
        let start = offset + name.len() + 2;
        let slice = head.slice(start..start + value.len());
        let parsed = HeaderValue::from_maybe_shared(slice).expect("valid value");
        res.headers_mut()
            .insert(HeaderName::from_static(name), parsed);
        offset = start + value.len() + 2;
    }
    res
}

fn request(key: &str) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("valid request")
}

fn heap() -> (usize, usize) {
    let stats = dhat::HeapStats::get();
    (stats.curr_bytes, stats.curr_blocks)
}

/// One line: heap bytes and blocks per entry, what the store accounts per entry, and
/// the goal (`goal(payload)` bytes per entry).
fn report(
    what: &str,
    count: usize,
    (before, after): ((usize, usize), (usize, usize)),
    accounted: u64,
    payload: usize,
    goal: f64,
) {
    let bytes = after.0.saturating_sub(before.0) as f64 / count as f64;
    let blocks = after.1.saturating_sub(before.1) as f64 / count as f64;
    let verdict = if bytes <= goal { "met" } else { "NOT met" };
    println!(
        "{what:<40} {bytes:>6.0} B in {blocks:>4.1} blocks (+{:.0} B allocator headers), \
         accounted {:.0} B, payload {payload} B; goal <= {goal:.0} B: {verdict}",
        blocks * 16.0,
        accounted as f64 / count as f64,
    );
}

/// Stores `RECORDS` records through the layer; bytes held per record.
async fn records(what: &str, respond: fn() -> Response<Full<Bytes>>) {
    let store = MemoryStore::builder().max_response_bytes(1 << 40).build();
    let mut svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()).route("payments"))
        .service_fn(
            move |_req: Request<Full<Bytes>>| async move { Ok::<_, Infallible>(respond()) },
        );
    let keys: Vec<String> = (0..RECORDS).map(|i| format!("k-{i:08}")).collect();
    // One record first, so that lazily built parts of the store are not counted.
    let warm = svc
        .ready()
        .await
        .expect("ready")
        .call(request("warm"))
        .await;
    drop(warm.expect("call").into_body().collect().await);
    let before = heap();
    for key in &keys {
        let res = svc.ready().await.expect("ready").call(request(key)).await;
        let body = res
            .expect("call")
            .into_body()
            .collect()
            .await
            .expect("body");
        assert_eq!(body.to_bytes(), BODY);
    }
    let after = heap();
    let storage_key = ScopedKey::new(
        "idempotency",
        "payments",
        Scope::Unscoped,
        Key::from(keys[0].as_str()),
    );
    let payload = storage_key.storage_key().len()
        + BODY.len()
        + HEADERS
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>();
    let sizes = store.table_sizes().idempotency_records;
    assert_eq!(sizes.entries, RECORDS + 1);
    let accounted = sizes.bytes * RECORDS as u64 / (RECORDS as u64 + 1);
    let goal = 1.3 * payload as f64 + 200.0;
    report(what, RECORDS, (before, after), accounted, payload, goal);
    keep_for_profile(store);
}

/// Holds `QUOTA_KEYS` quota keys, each used once as a request would (its key built,
/// checked and dropped); bytes the table keeps per key.
fn quota_keys() {
    let store = MemoryStore::builder().max_quota_keys(1 << 21).build();
    let quota = Quota::per_minute(10).expect("quota");
    let key = |i: usize| {
        ScopedKey::new(
            "quota",
            "search",
            Scope::Unscoped,
            Key::from(format!("api-key-{i:08}")),
        )
    };
    let payload = key(0).storage_key().len();
    let before = heap();
    for i in 0..QUOTA_KEYS {
        let decision = store
            .check(&key(i), &quota, 1)
            .into_inner()
            .expect("decided");
        assert!(decision.is_allowed());
    }
    let after = heap();
    assert_eq!(store.quota_entry_count(), QUOTA_KEYS);
    let accounted = store.table_sizes().quota_keys.bytes;
    report(
        "quota key",
        QUOTA_KEYS,
        (before, after),
        accounted,
        payload,
        100.0,
    );
    keep_for_profile(store);
}

/// With `DHAT_PROFILE`, stores stay alive to the end, so that the profile's "at exit"
/// view shows what they hold, by allocation site.
fn keep_for_profile(store: MemoryStore) {
    if std::env::var_os("DHAT_PROFILE").is_some() {
        std::mem::forget(store);
    }
}

fn main() {
    let _profiler = match std::env::var_os("DHAT_PROFILE") {
        Some(path) => dhat::Profiler::builder().file_name(path).build(),
        None => dhat::Profiler::builder().testing().build(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("heap held per entry ({RECORDS} records, {QUOTA_KEYS} quota keys; dhat):");
    rt.block_on(records(
        "idempotency record, handler-built answer",
        built_response,
    ));
    rt.block_on(records(
        "idempotency record, hyper-parsed answer",
        hyper_parsed_response,
    ));
    quota_keys();
}
