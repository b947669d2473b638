//! CPU time per request of the single-flight leader path against a bare `service_fn`,
//! for machines too loaded for wall-clock benches: run it under `perf stat -e task-clock`
//! with two iteration counts and divide the difference (see
//! `benches/results/single_flight.md`).
//!
//! `single_flight_cpu <bare|layered> <iterations>`
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use keyward::{MemoryStore, SingleFlightLayer};
use std::convert::Infallible;
use tower::{Layer, ServiceExt, service_fn};

fn main() {
    let variant = std::env::args().nth(1).unwrap();
    let n: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            b"{\"items\":[1,2,3],\"next\":null}",
        ))))
    });
    let layered = SingleFlightLayer::new(MemoryStore::new()).layer(bare);
    rt.block_on(async {
        for _ in 0..n {
            let req = Request::get("/items?page=2&size=50").body(()).unwrap();
            let bytes = if variant == "bare" {
                round_trip(bare, req).await
            } else {
                round_trip(layered.clone(), req).await
            };
            std::hint::black_box(bytes);
        }
    });
}

async fn round_trip<S, B>(svc: S, req: Request<()>) -> Bytes
where
    S: tower::Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = svc.oneshot(req).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}
