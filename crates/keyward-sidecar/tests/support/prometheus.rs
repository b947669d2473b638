//! A real Prometheus (the Debian `prometheus` package) scraping a sidecar every second,
//! on a free loopback port, with its data in a temporary directory; killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{HttpClient, free_port, send, tempdir};

pub struct Prometheus {
    child: Child,
    pub url: String,
    _dir: tempdir::Dir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second (with `flags` added, e.g.
    /// `--enable-feature=exemplar-storage`) and waits until it is ready; fails, saying
    /// how to install it, when it is missing.
    pub async fn start(http: &HttpClient, target: std::net::SocketAddr, flags: &[&str]) -> Self {
        let found = Command::new("prometheus").arg("--version").output();
        assert!(
            found.is_ok_and(|out| out.status.success()),
            "prometheus is missing: install it with `apt-get install prometheus` (or run .ci/install-deps.sh)"
        );
        let dir = tempdir::Dir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: keyward\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                let ready =
                    send(http, "GET", &format!("{}/-/ready", prometheus.url), &[], "").await;
                if ready.status == 200 {
                    return prometheus;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("prometheus did not get ready within 10 s");
    }

    /// `GET` an API path (`/api/v1/...?`) with `query` URL-encoded as its `query`
    /// parameter and `rest` appended; the `data` of a successful answer.
    pub async fn api(&self, http: &HttpClient, path: &str, query: &str, rest: &str) -> Value {
        let url = format!("{}{path}?query={}{rest}", self.url, encode(query));
        let reply = send(http, "GET", &url, &[], "").await;
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["status"], "success", "{path} {query}: {body}");
        body["data"].clone()
    }

    /// An instant query's result series.
    pub async fn query(&self, http: &HttpClient, expr: &str) -> Vec<Value> {
        self.api(http, "/api/v1/query", expr, "").await["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
