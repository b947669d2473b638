//! Sidecar processes that can be killed with SIGKILL and started again on the same ports.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use crate::support::{binary, free_port, tempdir};

/// Idempotency lease and serial lease: short, so that leases run out within the run.
pub const LEASE: Duration = Duration::from_millis(2000);
/// The sidecar's `request_timeout`: a stuck upstream is cut off (504) after it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
/// Serial `max_wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(3);

/// One `keyward serve` with a fixed config file and fixed ports.
pub struct ChaosSidecar {
    pub addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempdir::Dir,
}

/// Where the sidecars keep their state, and their leases.
#[derive(Clone, Debug)]
pub struct StoreSetup {
    /// One Redis URL, or a cluster's seed nodes.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Idempotency lease and serial lease.
    pub lease: Duration,
}

impl StoreSetup {
    /// One standalone Redis with the group's short lease.
    pub fn standalone(url: &str) -> StoreSetup {
        StoreSetup {
            urls: vec![url.to_owned()],
            cluster: false,
            lease: LEASE,
        }
    }

    fn toml(&self) -> String {
        if self.cluster {
            let urls: Vec<String> = self.urls.iter().map(|u| format!("{u:?}")).collect();
            format!("urls = [{}]\ncluster = true", urls.join(", "))
        } else {
            format!("url = {:?}", self.urls[0])
        }
    }
}

fn config(addr: SocketAddr, admin: SocketAddr, upstream: SocketAddr, store: &StoreSetup) -> String {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    format!(
        r#"[server]
listen = "{addr}"
upstream = "http://{upstream}"
admin = "{admin}"
request_timeout = "{timeout}"
shutdown_grace = "1s"

[store]
backend = "redis"
{store}
timeout = "300ms"
on_error = "closed"
serial_lease = "{lease}"

[[routes]]
name = "chaos"
methods = ["POST"]
path = "/accounts/{{account}}/ops"

[routes.idempotency]
key = "header:Idempotency-Key"
required = true
scope = "none"
ttl = "10m"
lease = "{lease}"
on_in_flight = "reject"

[routes.serial]
key = "path:account"
max_wait = "{max_wait}"
max_queue = 64
"#,
        timeout = ms(REQUEST_TIMEOUT),
        store = store.toml(),
        lease = ms(store.lease),
        max_wait = ms(MAX_WAIT),
    )
}

impl ChaosSidecar {
    pub async fn start(index: usize, upstream: SocketAddr, redis_url: &str) -> ChaosSidecar {
        Self::start_on(index, upstream, &StoreSetup::standalone(redis_url)).await
    }

    pub async fn start_on(index: usize, upstream: SocketAddr, store: &StoreSetup) -> ChaosSidecar {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = tempdir::Dir::new(&format!("chaos{index}"));
        let path = dir.path().join("keyward.toml");
        std::fs::write(&path, config(addr, admin, upstream, store)).unwrap();
        let mut sidecar = ChaosSidecar {
            addr,
            config: path,
            log: dir.path().join("keyward.log"),
            child: None,
            _dir: dir,
        };
        sidecar.start_again().await;
        sidecar
    }

    /// SIGKILL: no drain, no release, claims and locks stay in Redis until their leases end.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same ports and waits (bounded) until it listens.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "sidecar still running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(binary())
            .args(["serve", "-c"])
            .arg(&self.config)
            .env("KEYWARD_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("keyward did not listen on {} within 10 s", self.addr);
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): a holder stalled like a long GC pause;
    /// its connections stay open, its lease renewals stop.
    pub fn freeze(&self, frozen: bool) {
        let Some(child) = &self.child else { return };
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// The last `n` lines the process logged (warnings and errors), for a failure report.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for ChaosSidecar {
    fn drop(&mut self) {
        self.kill_9();
    }
}
