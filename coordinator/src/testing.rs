//! Real coordinator processes on loopback for tests and benchmarks: start, SIGKILL, SIGTERM,
//! restart, and find the leader. Each node logs to `<data dir>/node.log`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_proto::coordinator::v1 as pb;
use novacron_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// A gRPC client of the public API.
pub type Client = CoordinatorClient<Channel>;

/// Connects a client to `addr` (lazily; the first call connects).
pub fn client(addr: &str) -> Client {
    let ch = crate::network::channel(addr, Duration::from_secs(10)).expect("valid address");
    CoordinatorClient::new(ch)
}

/// The `novacron-coordinator` binary for tests outside this crate: `$NOVACRON_COORDINATOR_BIN`,
/// else next to the running test executable's `deps/` directory
/// (`target/<profile>/novacron-coordinator`, built by `cargo test --workspace`).
pub fn coordinator_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NOVACRON_COORDINATOR_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("novacron-coordinator"))
        .find(|p| p.is_file())
}

/// A free loopback port (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// One coordinator process.
pub struct TestNode {
    /// Node id.
    pub id: u64,
    /// Its gRPC address.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    args: Vec<String>,
    bin: PathBuf,
    child: Option<Child>,
}

impl TestNode {
    /// Starts (or restarts) the process.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        std::fs::create_dir_all(&self.data_dir).expect("create node data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("node.log"))
            .expect("open node log");
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we own and have not yet reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    /// Whether the process runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// A client of this node.
    pub fn client(&self) -> Client {
        client(&self.addr)
    }

    /// The tail of this node's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.data_dir.join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options for a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Snapshot every N entries.
    pub snapshot_every: u64,
    /// Entries kept behind a snapshot.
    pub keep_after_snapshot: u64,
    /// Down-after seconds.
    pub down_after_secs: u64,
    /// Placement policy name.
    pub policy: String,
    /// Heartbeat interval told to agents, ms.
    pub heartbeat_interval_ms: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            down_after_secs: 15,
            policy: "binpack".into(),
            heartbeat_interval_ms: 5000,
        }
    }
}

/// A cluster of coordinator processes.
pub struct TestCluster {
    /// The nodes, index = id - 1.
    pub nodes: Vec<TestNode>,
    bin: PathBuf,
    base: PathBuf,
    opts: ClusterOptions,
}

impl TestCluster {
    /// Starts `n` voters with data under `base`.
    pub fn start(bin: &Path, base: &Path, n: usize, opts: ClusterOptions) -> TestCluster {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = TestCluster {
            nodes: vec![],
            bin: bin.to_path_buf(),
            base: base.to_path_buf(),
            opts,
        };
        for (i, p) in ports.iter().enumerate() {
            let node = c.make_node(i as u64 + 1, *p, Some(&members));
            c.nodes.push(node);
        }
        for node in &mut c.nodes {
            node.start();
        }
        c
    }

    fn make_node(&self, id: u64, port: u16, members: Option<&str>) -> TestNode {
        let addr = format!("127.0.0.1:{port}");
        let data_dir = self.base.join(format!("node{id}"));
        let mut args = vec![
            "run".to_string(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--snapshot-every".into(),
            self.opts.snapshot_every.to_string(),
            "--keep-after-snapshot".into(),
            self.opts.keep_after_snapshot.to_string(),
            "--down-after-secs".into(),
            self.opts.down_after_secs.to_string(),
            "--policy".into(),
            self.opts.policy.clone(),
            "--heartbeat-interval-ms".into(),
            self.opts.heartbeat_interval_ms.to_string(),
        ];
        match members {
            Some(m) => args.extend(["--initial-members".to_string(), m.to_string()]),
            None => args.push("--join".into()),
        }
        TestNode {
            id,
            addr,
            data_dir,
            args,
            bin: self.bin.clone(),
            child: None,
        }
    }

    /// Starts a new node that waits to be added (`AddMember`); returns its index.
    pub fn spawn_joiner(&mut self) -> usize {
        let id = self.nodes.len() as u64 + 1;
        let mut n = self.make_node(id, free_port(), None);
        n.start();
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// The node with `id`.
    pub fn node(&mut self, id: u64) -> &mut TestNode {
        &mut self.nodes[id as usize - 1]
    }

    /// Waits until every running node agrees on one leader that says it leads; returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = vec![];
            for n in self.nodes.iter().filter(|n| n.running()) {
                if let Ok(r) = n.client().cluster_status(pb::ClusterStatusRequest {}).await {
                    let r = r.into_inner();
                    seen.push((n.id, r.leader_id, r.state));
                }
            }
            let running = self.nodes.iter().filter(|n| n.running()).count();
            if seen.len() == running && !seen.is_empty() {
                let l = seen[0].1;
                if l != 0
                    && seen.iter().all(|s| s.1 == l)
                    && seen.iter().any(|s| s.0 == l && s.2 == "Leader")
                {
                    return l;
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- node {} ---\n{}", n.id, n.log_tail()))
                    .collect();
                panic!(
                    "no agreed leader within {timeout:?}: {seen:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills every node (SIGKILL).
    pub fn kill_all(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }

    /// Starts every stopped node.
    pub fn start_all(&mut self) {
        for n in &mut self.nodes {
            if !n.running() {
                n.start();
            }
        }
    }
}
