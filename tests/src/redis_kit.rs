//! A real `redis-server` per test: a free loopback port, a temporary directory, no
//! persistence, killed on drop. Tests that need it FAIL (never skip) when `redis-server`
//! is missing, with the command that installs it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "redis-server/redis-cli not found on PATH: install them with \
     `apt-get install -y redis-server` (or run .ci/install-deps.sh); the Redis tests need a \
     real server and do not skip";

/// A `redis-server` child process on `127.0.0.1:{port}`.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    tls: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server without persistence and waits until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--cluster-enabled", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for redis-server");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            tls: false,
            child: None,
        };
        server.spawn();
        server
    }

    /// Starts a server that only speaks TLS, with a self-signed certificate made by the
    /// `openssl` command line; connect with `rediss://127.0.0.1:{port}/#insecure`.
    pub fn start_tls() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for redis-server");
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl on PATH (apt-get install -y openssl)");
        assert!(made.success(), "openssl could not make a certificate");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            extra: Vec::new(),
            tls: true,
            child: None,
        };
        server.spawn();
        server
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain client for inspecting the server from tests.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("valid url")
    }

    /// A connection of the test's own, to inspect or poke the server.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis-server")
    }

    /// Kills the server with SIGKILL (no shutdown, no goodbye to clients) and leaves it
    /// stopped until [`RedisServer::start_again`].
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, the case
    /// only a timeout can catch. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("server running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts a killed server again on the same port and directory: empty, unless it was
    /// started with persistence (`start_with(&["--appendonly", "yes", ...])`), in which
    /// case it reloads what it had persisted.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "server still running");
        self.spawn();
    }

    /// `kill_9` then `start_again`.
    pub fn restart(&mut self) {
        self.kill_9();
        self.start_again();
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        if self.tls {
            command
                .args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .args(["--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"])
                .args(["--tls-ca-cert-file", "cert.pem", "--tls-auth-clients", "no"]);
        } else {
            command.arg("--port").arg(self.port.to_string());
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir(self.dir.path())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
            Err(error) => panic!("could not start redis-server: {error}"),
        };
        self.child = Some(child);
        wait_for_pong(self.port, self.tls, &mut self.child);
    }

    /// The temporary directory the server runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL also ends a paused (SIGSTOPped) server.
        self.kill_9();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// Startup of a child process, not coordination: a bounded readiness loop is fine here.
fn wait_for_pong(port: u16, tls: bool, child: &mut Option<Child>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
            panic!("redis-server exited at startup: {status}");
        }
        // A TLS listener is ready once it accepts; plain ones must answer PING.
        let ready = if tls {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        } else {
            ping(port)
        };
        if ready {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server on port {port} did not answer PING within 10 s");
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
}

/// Reads `INFO commandstats` over one connection of its own, so that connecting does not
/// show up between two snapshots.
#[derive(Debug)]
pub struct CommandStats {
    conn: redis::aio::MultiplexedConnection,
}

impl CommandStats {
    /// Connects to `server`.
    pub async fn connect(server: &RedisServer) -> Self {
        CommandStats {
            conn: server.connection().await,
        }
    }

    /// `(command, calls)` for every command Redis has run.
    pub async fn snapshot(&mut self) -> Vec<(String, u64)> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .expect("INFO commandstats");
        info.lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }
}

/// Commands run between two [`CommandStats::snapshot`]s, leaving out `info` itself and the
/// pub/sub hub's keep-alive `ping`.
pub fn command_delta(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    after
        .iter()
        .filter(|(name, _)| name != "info" && name != "ping")
        .filter_map(|(name, calls)| {
            let was = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, c)| *c);
            (*calls > was).then(|| (name.clone(), calls - was))
        })
        .collect()
}

/// A three-primary Redis Cluster on loopback (no replicas), each node a [`RedisServer`]
/// with its own data and cluster-bus ports; torn down on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes, assigns the slots, joins them with `CLUSTER MEET` and waits
    /// until every node knows all three and reports `cluster_state:ok`.
    pub fn start() -> Self {
        let nodes: Vec<(RedisServer, String)> = (0..3)
            .map(|_| {
                let bus = free_port().to_string();
                let node = RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "2000",
                ]);
                (node, bus)
            })
            .collect();
        // What `redis-cli --cluster create` does, minus its one-second polling: give each
        // node a third of the slots, introduce the nodes to each other, wait for `ok`.
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for ((node, _), (first, last)) in nodes.iter().zip(ranges) {
            let reply = command(
                node.port(),
                &format!("CLUSTER ADDSLOTSRANGE {first} {last}"),
            );
            assert!(reply.contains("OK"), "ADDSLOTSRANGE: {reply}");
        }
        for (node, bus) in &nodes[1..] {
            let reply = command(
                nodes[0].0.port(),
                &format!("CLUSTER MEET 127.0.0.1 {} {bus}", node.port()),
            );
            assert!(reply.contains("OK"), "CLUSTER MEET: {reply}");
        }
        let nodes: Vec<RedisServer> = nodes.into_iter().map(|(node, _)| node).collect();
        let cluster = RedisCluster { nodes };
        cluster.wait_until_ok();
        cluster
    }

    /// One cluster shared by every test of this test binary (a cluster takes ~2 s to
    /// converge; tests isolate themselves with distinct key prefixes). Statics are never
    /// dropped, so a watchdog process kills the nodes once this process has exited.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let cluster = RedisCluster::start();
            let pids: Vec<String> = cluster
                .nodes
                .iter()
                .filter_map(|n| n.child.as_ref().map(|c| c.id().to_string()))
                .collect();
            let dirs: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| n.dir().display().to_string())
                .collect();
            let script = format!(
                "while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill -9 {pids} 2>/dev/null; rm -rf {dirs}",
                parent = std::process::id(),
                pids = pids.join(" "),
                dirs = dirs.join(" "),
            );
            // Never waited for: it must outlive this process to clean up after it.
            #[allow(clippy::zombie_processes)]
            let _watchdog = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sh for the cluster watchdog");
            cluster
        })
    }

    /// `redis://127.0.0.1:{port}` of every node (the seed list).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &self.nodes {
            loop {
                let info = command(node.port(), "CLUSTER INFO");
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster not ok within 20 s: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Runs one command with `redis-cli` and returns its output.
fn command(port: u16, line: &str) -> String {
    Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(line.split(' '))
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_else(|error| match error.kind() {
            std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
            _ => panic!("could not run redis-cli: {error}"),
        })
}
