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
    paused: std::sync::atomic::AtomicBool,
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
            paused: Default::default(),
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
            paused: Default::default(),
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
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, the case
    /// only a timeout can catch. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the process runs and is not paused.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && !self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
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

/// A Redis Cluster of three primaries, each with one replica, on loopback: the setup in
/// which failover happens. Node `i` (0..3) starts as the primary of the `i`-th third of
/// the slots and node `i + 3` as its replica. Nodes can be killed, restarted, frozen and
/// failed over; torn down on drop.
#[derive(Debug)]
pub struct ReplicatedCluster {
    nodes: Vec<RedisServer>,
    ids: Vec<String>,
    node_timeout: Duration,
}

/// How a [`ReplicatedCluster`] is started.
#[derive(Debug, Clone, Copy)]
pub struct ClusterOptions {
    /// `cluster-node-timeout`: how long a primary may be unreachable before its replica
    /// is promoted.
    pub node_timeout: Duration,
    /// AOF with `appendfsync always` on every node.
    pub aof_always: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            node_timeout: Duration::from_millis(1000),
            aof_always: false,
        }
    }
}

impl ReplicatedCluster {
    /// Starts six nodes, three primaries with a third of the slots each and one replica
    /// per primary, and waits until every node reports `cluster_state:ok` and every
    /// replica is in sync.
    pub fn start(options: ClusterOptions) -> Self {
        let timeout = options.node_timeout.as_millis().to_string();
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                let bus = free_port().to_string();
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    &timeout,
                    // Replicas serve no stale reads and take over as soon as they can.
                    "--cluster-replica-validity-factor",
                    "0",
                    "--repl-diskless-sync",
                    "yes",
                    "--repl-diskless-sync-delay",
                    "0",
                ];
                if options.aof_always {
                    args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
                }
                RedisServer::start_with(&args)
            })
            .collect();
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| command(n.port(), "CLUSTER MYID").trim().to_owned())
            .collect();
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (node, (first, last)) in nodes.iter().zip(ranges) {
            let reply = command(
                node.port(),
                &format!("CLUSTER ADDSLOTSRANGE {first} {last}"),
            );
            assert!(reply.contains("OK"), "ADDSLOTSRANGE: {reply}");
        }
        for node in &nodes[1..] {
            let bus = bus_port(node);
            let reply = command(
                nodes[0].port(),
                &format!("CLUSTER MEET 127.0.0.1 {} {bus}", node.port()),
            );
            assert!(reply.contains("OK"), "CLUSTER MEET: {reply}");
        }
        let cluster = ReplicatedCluster {
            nodes,
            ids,
            node_timeout: options.node_timeout,
        };
        cluster.wait_for(
            Duration::from_secs(20),
            "every node knows the other five",
            |c| {
                c.nodes
                    .iter()
                    .all(|n| command(n.port(), "CLUSTER INFO").contains("cluster_known_nodes:6"))
            },
        );
        for replica in 3..6 {
            let primary = &cluster.ids[replica - 3];
            let reply = command(
                cluster.nodes[replica].port(),
                &format!("CLUSTER REPLICATE {primary}"),
            );
            assert!(reply.contains("OK"), "CLUSTER REPLICATE: {reply}");
        }
        cluster.wait_until_healthy(Duration::from_secs(20));
        cluster
    }

    /// The node timeout the cluster was started with.
    pub fn node_timeout(&self) -> Duration {
        self.node_timeout
    }

    /// `redis://127.0.0.1:{port}` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, in start order (0..3 the first primaries, 3..6 their replicas).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i` itself, e.g. to kill, restart, pause or resume it.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// Runs `line` on node `i` with `redis-cli` (given up after 2 s: a frozen node never
    /// answers) and returns the output.
    pub fn cli(&self, i: usize, line: &str) -> String {
        bounded_command(self.nodes[i].port(), line)
    }

    /// Whether node `i` answers and is a primary now.
    pub fn is_primary(&self, i: usize) -> bool {
        self.nodes[i].is_running() && self.cli(i, "ROLE").starts_with("master")
    }

    /// The node that serves `i`'s shard as primary now (`i` itself, or the other node of
    /// its pair after a failover).
    pub fn primary_of_pair(&self, i: usize) -> usize {
        let other = (i + 3) % 6;
        if self.is_primary(i) { i } else { other }
    }

    /// The other node of `i`'s primary/replica pair.
    pub fn partner(&self, i: usize) -> usize {
        (i + 3) % 6
    }

    /// `CLUSTER FAILOVER` on replica `i` (a manual failover: the primary stops accepting
    /// writes, the replica catches up and takes over; the old primary becomes its
    /// replica), and waits until `i` is primary. `force` skips the catch-up with the
    /// primary (`CLUSTER FAILOVER FORCE`, for a primary that does not answer).
    pub fn failover(&self, i: usize, force: bool) {
        let line = if force {
            "CLUSTER FAILOVER FORCE"
        } else {
            "CLUSTER FAILOVER"
        };
        let reply = self.cli(i, line);
        assert!(reply.contains("OK"), "{line} on node {i}: {reply}");
        self.wait_for(Duration::from_secs(10), "the replica is promoted", |c| {
            c.is_primary(i)
        });
    }

    /// Waits (bounded) until node `i` is a primary (e.g. promoted by an automatic
    /// failover after its primary died or froze).
    pub fn wait_for_primary(&self, i: usize, within: Duration) {
        self.wait_for(within, "the replica is promoted", |c| c.is_primary(i));
    }

    /// Waits (bounded) until every running node reports `cluster_state:ok`, every
    /// shard has exactly one primary, and every replica is linked to its primary.
    pub fn wait_until_healthy(&self, within: Duration) {
        self.wait_for(within, "the cluster is ok with every replica linked", |c| {
            c.is_healthy()
        });
    }

    /// Waits (bounded) until every running node reports `cluster_state:ok`.
    pub fn wait_until_ok(&self, within: Duration) {
        self.wait_for(within, "cluster_state:ok on every running node", |c| {
            c.running()
                .all(|i| c.cli(i, "CLUSTER INFO").contains("cluster_state:ok"))
        });
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_running())
    }

    fn is_healthy(&self) -> bool {
        let running: Vec<usize> = self.running().collect();
        if running.len() != self.nodes.len() {
            return false;
        }
        running.iter().all(|i| {
            let info = self.cli(*i, "CLUSTER INFO");
            let role = self.cli(*i, "INFO replication");
            info.contains("cluster_state:ok")
                && (role.contains("role:master") && role.contains("connected_slaves:1")
                    || role.contains("role:slave") && role.contains("master_link_status:up"))
        }) && (0..3).all(|pair| self.is_primary(pair) != self.is_primary(pair + 3))
    }

    fn wait_for(&self, within: Duration, what: &str, ready: impl Fn(&Self) -> bool) {
        // Cluster convergence, not coordination: a bounded readiness loop.
        let deadline = Instant::now() + within;
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "cluster: {what}: not within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn bus_port(node: &RedisServer) -> String {
    let at = node
        .extra
        .iter()
        .position(|a| a == "--cluster-port")
        .expect("a cluster node has a bus port");
    node.extra[at + 1].clone()
}

/// [`command`] given up after 2 s (`timeout(1)` from coreutils): `redis-cli` waits forever
/// for a frozen server.
fn bounded_command(port: u16, line: &str) -> String {
    Command::new("timeout")
        .args(["2", "redis-cli", "-p"])
        .arg(port.to_string())
        .args(line.split(' '))
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_else(|error| panic!("could not run timeout(1) + redis-cli: {error}"))
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
