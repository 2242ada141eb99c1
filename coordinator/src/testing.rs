//! Real coordinator processes on loopback for tests and benchmarks: start, SIGKILL, SIGTERM,
//! restart, and find the leader. Each node logs to `<data dir>/node.log`.
//!
//! Everything runs over TLS with tokens: a [`TestCluster`] makes a cluster directory
//! ([`TestPki`]: CA, coordinator certificates, token keys) under its base directory, and its
//! clients present an admin token unless made otherwise ([`TestPki::creds`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_migration::certs::ClusterDir;
use novacron_proto::coordinator::v1 as pb;
use novacron_proto::coordinator::v1::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::{self, Bearer, Role, TokenSigner};
use crate::tls::{self, ClientTls};

/// A gRPC client of the public API (TLS, and a bearer token if its [`Creds`] have one).
pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// What a client presents: the CA it trusts, maybe a client certificate, maybe a token.
#[derive(Clone)]
pub struct Creds {
    tls: ClientTls,
    bearer: Bearer,
}

impl Creds {
    /// Credentials from parts.
    pub fn new(tls: ClientTls, token: Option<&str>) -> Creds {
        Creds {
            tls,
            bearer: Bearer::new(token).expect("token is valid metadata"),
        }
    }

    /// A lazily connected channel to `addr`.
    pub fn channel(&self, addr: &str) -> Channel {
        self.tls
            .channel(addr, Duration::from_secs(10))
            .expect("valid address")
    }

    /// A client of `addr` (lazily connected; the first call connects).
    pub fn client(&self, addr: &str) -> Client {
        CoordinatorClient::with_interceptor(self.channel(addr), self.bearer.clone())
    }

    /// A client of `addr`, connected now.
    pub async fn connect(&self, addr: &str) -> Result<Client, tonic::transport::Error> {
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(self.tls.config())?
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        Ok(CoordinatorClient::with_interceptor(ch, self.bearer.clone()))
    }

    /// The bearer interceptor (for callers that build their own clients).
    pub fn bearer(&self) -> Bearer {
        self.bearer.clone()
    }
}

/// Makes agents' credentials with certificates issued in memory by the cluster CA.
#[derive(Clone)]
pub struct AgentIssuer {
    ca: novacron_migration::certs::Pem,
}

impl AgentIssuer {
    /// Credentials of agent `host`: its own certificate, no token.
    pub fn creds(&self, host: &str) -> Creds {
        let pem = novacron_migration::certs::issue_agent(&self.ca, host)
            .expect("issue an agent certificate");
        let identity = tonic::transport::Identity::from_pem(pem.cert, pem.key);
        let ca = tonic::transport::Certificate::from_pem(&self.ca.cert);
        Creds::new(
            ClientTls::new(
                ca,
                Some(identity),
                novacron_migration::certs::COORDINATOR_NAME,
            ),
            None,
        )
    }
}

/// A test cluster directory: the cluster CA, the token keys, coordinator and agent
/// certificates, all made with the same code as `novacron-coordinator init`.
pub struct TestPki {
    /// The cluster directory.
    pub dir: ClusterDir,
}

impl TestPki {
    /// Creates the CA and the token keys in `dir`.
    pub fn create(dir: &Path) -> TestPki {
        let cd = ClusterDir::new(dir);
        cd.init("test").expect("create the test cluster CA");
        auth::init_keys(dir).expect("create the test token keys");
        TestPki { dir: cd }
    }

    /// Issues coordinator `id`'s certificate.
    pub fn issue_coordinator(&self, id: u64) {
        self.dir
            .issue_coordinator(id)
            .expect("issue a coordinator certificate");
    }

    /// Issues an agent certificate for `host`; returns its (cert, key) files.
    pub fn issue_agent(&self, host: &str) -> (PathBuf, PathBuf) {
        self.dir.issue(host).expect("issue an agent certificate");
        self.dir.agent_paths(host).expect("agent name")
    }

    /// The token signer.
    pub fn signer(&self) -> TokenSigner {
        TokenSigner::load(self.dir.path()).expect("load the test token key")
    }

    /// A token for `subject` with `role`, valid for a day.
    pub fn token(&self, role: Role, subject: &str) -> String {
        self.signer()
            .mint(subject, role, Duration::from_secs(86_400))
            .expect("mint a token")
    }

    /// Client credentials: trusting the cluster CA, with `token` and with the agent
    /// certificate of `agent` (issued on first use) if given.
    pub fn creds(&self, token: Option<&str>, agent: Option<&str>) -> Creds {
        let ca = tls::load_ca(&self.dir.ca_cert_path()).expect("load the test CA");
        let identity = agent.map(|a| {
            let (cert, key) = self.dir.agent_paths(a).expect("agent name");
            if !cert.exists() {
                self.issue_agent(a);
            }
            tls::load_identity(&cert, &key).expect("load an agent identity")
        });
        Creds::new(
            ClientTls::new(ca, identity, novacron_migration::certs::COORDINATOR_NAME),
            token,
        )
    }

    /// Issues agent certificates in memory (no files): for load tools with many agents.
    pub fn agent_issuer(&self) -> AgentIssuer {
        let read = |p: PathBuf| std::fs::read_to_string(p).expect("read the test CA");
        AgentIssuer {
            ca: novacron_migration::certs::Pem {
                cert: read(self.dir.ca_cert_path()),
                key: read(self.dir.ca_key_path()),
            },
        }
    }

    /// Credentials with an admin token and no certificate.
    pub fn admin(&self) -> Creds {
        self.creds(Some(&self.token(Role::Admin, "test-admin")), None)
    }

    /// Writes a novacronctl context file for `endpoints` with a token of `role`.
    pub fn write_context(&self, path: &Path, endpoints: &[String], role: Role) {
        let ctx = serde_json::json!({
            "endpoints": endpoints,
            "ca": self.dir.ca_cert_path(),
            "token": self.token(role, "test-ctl"),
        });
        let body: String = ["endpoints", "ca", "token"]
            .iter()
            .map(|k| format!("{k} = {}\n", ctx[*k]))
            .collect();
        std::fs::write(path, body).expect("write a context file");
    }
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
    creds: Creds,
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

    /// A client of this node (admin token).
    pub fn client(&self) -> Client {
        self.creds.client(&self.addr)
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
    /// More `run` flags (e.g. the rebalancer's).
    pub extra_args: Vec<String>,
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
            extra_args: vec![],
            heartbeat_interval_ms: 5000,
        }
    }
}

/// A cluster of coordinator processes.
pub struct TestCluster {
    /// The nodes, index = id - 1.
    pub nodes: Vec<TestNode>,
    /// The cluster directory (`<base>/cluster`).
    pub pki: TestPki,
    /// Admin credentials.
    pub creds: Creds,
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
        let pki = TestPki::create(&base.join("cluster"));
        let creds = pki.admin();
        let mut c = TestCluster {
            nodes: vec![],
            pki,
            creds,
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
        self.pki.issue_coordinator(id);
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
            "--cluster-dir".into(),
            self.pki.dir.path().display().to_string(),
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
        args.extend(self.opts.extra_args.iter().cloned());
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
            creds: self.creds.clone(),
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

    /// An admin client of `addr`.
    pub fn client(&self, addr: &str) -> Client {
        self.creds.client(addr)
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
