//! The demo upstream for the sidecar configs in `examples/sidecar/`: a tiny
//! orders/payments API that counts every effect, so that what keyward guarantees can be
//! seen ("charged once", "never two at a time"). See [`examples::upstream`].
//!
//! ```sh
//! cargo run -p examples --example upstream                # listens on 127.0.0.1:9000
//! cargo run -p examples --example upstream -- --port 9100 # or PORT=9100
//! curl -s 127.0.0.1:9000/effects                           # what it has done
//! ```

use std::process::ExitCode;

use examples::upstream::{Upstream, loopback, port_from, serve};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match port_from(&args, std::env::var("PORT").ok().as_deref()) {
        Ok(port) => port,
        Err(err) => {
            eprintln!("upstream: --port/PORT: {err}");
            return ExitCode::from(64);
        }
    };
    let addr = loopback(port);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("upstream: cannot listen on {addr}: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("demo upstream listening on http://{addr} (GET /effects shows what it did)");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match serve(listener, Upstream::default(), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("upstream: {err}");
            ExitCode::FAILURE
        }
    }
}
