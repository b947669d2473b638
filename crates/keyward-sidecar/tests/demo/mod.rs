//! The examples as a newcomer runs them: the demo upstream (`examples::upstream`, the
//! code of `cargo run -p examples --example upstream`) and `keyward serve` on an example
//! config file, both on free loopback ports instead of the files' 9000/8080/9901.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use examples::upstream::Upstream;

use crate::support::Sidecar;

/// The demo upstream, in this process; stopped on drop.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    pub state: Upstream,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DemoUpstream {
    pub async fn start() -> DemoUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Upstream::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = state.clone();
        tokio::spawn(async move {
            examples::upstream::serve(listener, served, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        DemoUpstream {
            addr,
            state,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `examples/sidecar/NAME`.
pub fn example_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/sidecar")
        .join(name)
}

/// Replaces `from` (which must occur exactly once) by `to`: a config whose addresses
/// moved fails here, loudly, instead of serving on the wrong port.
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "expected {from:?} exactly once in:\n{text}"
    );
    text.replacen(from, to, 1)
}

/// A running `keyward serve` on an example config; killed on drop.
pub type Served = Sidecar;

/// Serves `text` (an example config with the README addresses) with its listen and
/// admin addresses on free ports and its upstream at `upstream`. `extra` rewrites the
/// text further (e.g. the Redis URL).
pub async fn serve(text: &str, upstream: SocketAddr, extra: &[(&str, String)]) -> Served {
    let config = |addr: SocketAddr, admin: SocketAddr| {
        let mut config = replace_once(
            text,
            "upstream = \"http://127.0.0.1:9000\"",
            &format!("upstream = \"http://{upstream}\""),
        );
        config = replace_once(
            &config,
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"{addr}\""),
        );
        config = if config.contains("admin = \"127.0.0.1:9901\"") {
            replace_once(
                &config,
                "admin = \"127.0.0.1:9901\"",
                &format!("admin = \"{admin}\""),
            )
        } else {
            // Without an admin line the default 127.0.0.1:9901 would be used.
            replace_once(
                &config,
                "[server]\n",
                &format!("[server]\nadmin = \"{admin}\"\n"),
            )
        };
        for (from, to) in extra {
            config = replace_once(&config, from, to);
        }
        config
    };
    Sidecar::serve(config, |_| {}).await
}

/// Fails, naming the install command, when `tool` is not on PATH: a test that needs it
/// never passes by skipping.
pub fn require_tool(tool: &str, package: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is not installed; install it with: apt-get install -y {package} (bash .ci/install-deps.sh does)"
    );
}
