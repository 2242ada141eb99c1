//! Coordinator benchmark: a 3-node coordinator cluster on loopback against a 3-member etcd on
//! loopback (the reference Raft-replicated store), driven by the same load tool.
//!
//! Cases:
//! - write, 1 client: sequential CreateVm (coordinator) vs Put of an equivalent VM record (etcd).
//! - write, C clients (each with its own HTTP/2 connection), for a fixed time.
//! - leader failover: SIGKILL the coordinator leader under a 16-client write load; time from
//!   the kill to the first acknowledgement of a write sent after it.
//! - heartbeats: N simulated agents (default 10,000; `NOVACRON_BENCH_AGENTS`), each with its own
//!   connection, heartbeating every 5 s, for `NOVACRON_BENCH_HB_SECS` (default 20 s). A heartbeat
//!   is in memory on the coordinator leader (no Raft write); the etcd reference writes each
//!   heartbeat as a key (a Put, the only way etcd can hold it).
//!
//! Clients talk to the leader in both systems (etcd's leader found with `etcdctl endpoint status`).
//! The coordinator is measured as deployed: every connection is TLS; writers send an admin
//! bearer token (checked on every call); each simulated agent presents its own certificate
//! (issued in memory by the cluster CA) naming its host. etcd runs without TLS or auth, as
//! before: the comparison favours etcd by that much.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_benches::etcdserverpb::kv_client::KvClient;
use novacron_benches::etcdserverpb::PutRequest;
use novacron_benches::{release_binary, report, Record};
use novacron_coordinator::testing::{
    free_port, AgentIssuer, Client, ClusterOptions, Creds, TestCluster,
};
use novacron_proto::coordinator::v1 as pb;
use tonic::transport::{Channel, Endpoint};

const ETCD: &str = "etcd";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn connect(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("address")
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// How the load tool authenticates to the coordinator: TLS with the cluster CA and an admin
/// token for writes; each simulated agent with its own certificate for heartbeats.
#[derive(Clone)]
struct Auth {
    admin: Creds,
    agents: AgentIssuer,
}

/// Same-shaped record for both systems.
fn vm_record(name: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{name}","name":"{name}","resources":{{"vcpus":1,"memory_mib":64}},"labels":{{}},"anti_affinity_group":"","desired":"Running","host_id":"bench-host","created_index":0,"migration_id":""}}"#
    )
    .into_bytes()
}

#[derive(Clone)]
enum Target {
    Coord(Client),
    Etcd(KvClient<Channel>),
}

impl Target {
    /// A connection to `addr`: etcd plain; the coordinator over TLS with `creds`.
    async fn new(kind: &str, addr: &str, creds: &Creds) -> Target {
        if kind == ETCD {
            Target::Etcd(KvClient::new(connect(addr).await))
        } else {
            Target::Coord(
                creds
                    .connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("connect {addr}: {e}")),
            )
        }
    }

    async fn write(&mut self, name: &str) -> Result<(), tonic::Status> {
        match self {
            Target::Coord(c) => c
                .create_vm(pb::CreateVmRequest {
                    name: name.into(),
                    resources: Some(pb::Resources {
                        vcpus: 1,
                        memory_mib: 64,
                    }),
                    start: true,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            Target::Etcd(c) => c
                .put(PutRequest {
                    key: format!("/novacron/vms/{name}").into_bytes(),
                    value: vm_record(name),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        }
    }

    async fn heartbeat(&mut self, host: &str) -> Result<(), tonic::Status> {
        match self {
            Target::Coord(c) => c
                .heartbeat(pb::HeartbeatRequest {
                    host_id: host.into(),
                    cpu_utilisation: 0.3,
                    memory_used_mib: 1024,
                    running_vms: vec![],
                    anomalies: vec![],
                    vms: vec![],
                })
                .await
                .map(|_| ()),
            Target::Etcd(c) => c
                .put(PutRequest {
                    key: format!("/novacron/heartbeats/{host}").into_bytes(),
                    value: br#"{"cpu_utilisation":0.3,"memory_used_mib":1024,"running_vms":[]}"#
                        .to_vec(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        }
    }
}

struct Stats {
    ops: usize,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// `clients` writers, each with its own connection, for `dur` (or `per_client` writes each).
async fn write_load(
    auth: &Auth,
    kind: &str,
    addr: &str,
    tag: &str,
    clients: usize,
    dur: Duration,
    per_client: Option<usize>,
) -> Stats {
    let mut targets = vec![];
    for _ in 0..clients {
        targets.push(Target::new(kind, addr, &auth.admin).await);
    }
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = vec![];
    for (c, mut t) in targets.into_iter().enumerate() {
        let (errors, tag) = (errors.clone(), tag.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            let mut i = 0;
            loop {
                if per_client.is_some_and(|n| i >= n)
                    || (per_client.is_none() && Instant::now() >= deadline)
                {
                    break;
                }
                let name = format!("{tag}-{c}-{i}");
                let t0 = Instant::now();
                match t.write(&name).await {
                    Ok(()) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first write error ({tag}): {e}");
                        }
                    }
                }
                i += 1;
            }
            lat
        }));
    }
    let mut lat = vec![];
    for t in tasks {
        lat.extend(t.await.expect("writer task"));
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Stats {
        ops: lat.len(),
        secs,
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// N agents, each with its own connection, heartbeating every `interval`, staggered.
async fn heartbeat_load(
    auth: &Auth,
    kind: &str,
    addr: &str,
    agents: usize,
    interval: Duration,
    dur: Duration,
) -> (Stats, usize) {
    // Connect everyone first (bounded concurrency so the listener's backlog keeps up).
    let targets = Arc::new(Mutex::new(Vec::with_capacity(agents)));
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = vec![];
    for i in 0..agents {
        let (sem, targets, kind, addr, auth) = (
            sem.clone(),
            targets.clone(),
            kind.to_string(),
            addr.to_string(),
            auth.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.expect("semaphore");
            // Each simulated agent presents its own certificate, naming its host.
            let creds = if kind == ETCD {
                auth.admin.clone()
            } else {
                auth.agents.creds(&format!("agent-{i}"))
            };
            let t = Target::new(&kind, &addr, &creds).await;
            targets.lock().expect("targets").push((i, t));
        }));
    }
    for t in tasks {
        t.await.expect("connect task");
    }
    let targets = std::mem::take(&mut *targets.lock().expect("targets"));
    let connected = targets.len();
    let errors = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let stop = start + dur;
    let mut tasks = vec![];
    for (i, mut t) in targets {
        let errors = errors.clone();
        let offset = interval.mul_f64(i as f64 / agents as f64);
        tasks.push(tokio::spawn(async move {
            let host = format!("agent-{i}");
            let mut lat = vec![];
            let mut next = start + offset;
            while next < stop {
                tokio::time::sleep_until(next).await;
                let t0 = Instant::now();
                match t.heartbeat(&host).await {
                    Ok(()) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first heartbeat error: {e}");
                        }
                    }
                }
                next += interval;
            }
            lat
        }));
    }
    let mut lat = vec![];
    for t in tasks {
        lat.extend(t.await.expect("agent task"));
    }
    lat.sort_unstable();
    (
        Stats {
            ops: lat.len(),
            secs: dur.as_secs_f64(),
            p50_ms: pct(&lat, 0.5),
            p99_ms: pct(&lat, 0.99),
            errors: errors.load(Ordering::Relaxed),
        },
        connected,
    )
}

/// A 3-member etcd on loopback.
struct Etcd {
    children: Vec<Child>,
    client_addrs: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let cluster = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = vec![];
        for i in 0..3 {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).expect("log");
            let c = Command::new("etcd")
                .args([
                    "--name",
                    &format!("m{i}"),
                    "--data-dir",
                    &dir.path().join(format!("m{i}")).display().to_string(),
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{}", clients[i]),
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{}", clients[i]),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[i]),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[i]),
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "novacron-bench",
                    "--quota-backend-bytes",
                    "8589934592",
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd (Debian package etcd-server; deploy/setup.sh installs it) must run");
            children.push(c);
        }
        Etcd {
            children,
            client_addrs: clients.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
            _dir: dir,
        }
    }

    /// The leader's client address, from `etcdctl endpoint status`.
    fn leader(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args([
                    "--endpoints",
                    &self.client_addrs.join(","),
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ])
                .output();
            if let Ok(out) = out {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    if let Some(arr) = v.as_array() {
                        for e in arr {
                            let s = &e["Status"];
                            if s["leader"].as_u64().is_some()
                                && s["leader"] == s["header"]["member_id"]
                            {
                                let ep = e["Endpoint"].as_str().unwrap_or_default();
                                return ep.trim_start_matches("http://").to_string();
                            }
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "etcd elected no leader in 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    raise_nofile();
    let agents = env_num("NOVACRON_BENCH_AGENTS", 10_000) as usize;
    let hb_secs = env_num("NOVACRON_BENCH_HB_SECS", 20);
    let conc = env_num("NOVACRON_BENCH_CLIENTS", 64) as usize;
    let single_n = env_num("NOVACRON_BENCH_SINGLE", 2000) as usize;
    let bin: PathBuf = release_binary("novacron-coordinator", "novacron-coordinator");
    assert!(
        Command::new("etcd").arg("--version").output().is_ok(),
        "etcd is not installed: the reference needs Debian's etcd-server (deploy/setup.sh)"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    // The bench host sends no heartbeats: keep it up for the whole run.
    let opts = ClusterOptions {
        down_after_secs: 3600,
        ..Default::default()
    };
    let mut cluster = TestCluster::start(Path::new(&bin), dir.path(), 3, opts);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let caddr = cluster.node(leader).addr.clone();
    let auth = Auth {
        admin: cluster.creds.clone(),
        agents: cluster.pki.agent_issuer(),
    };
    let mut c = cluster.client(&caddr);
    c.register_host(pb::RegisterHostRequest {
        id: "bench-host".into(),
        address: "bench-host:7300".into(),
        capacity: Some(pb::Resources {
            vcpus: u32::MAX / 2,
            memory_mib: 1 << 50,
        }),
        labels: Default::default(),
        vms: vec![],
    })
    .await
    .expect("register bench host");
    let etcd = Etcd::start();
    let eaddr = etcd.leader();
    eprintln!("coordinator leader {caddr}, etcd leader {eaddr}");

    let mut recs = vec![];
    let mut write_case = |case: &str, s: &Stats, r: &Stats| {
        recs.push(Record::num(
            case,
            "writes_per_s",
            "op/s",
            s.ops as f64 / s.secs,
            Some((ETCD, r.ops as f64 / r.secs)),
        ));
        recs.push(Record::num(
            case,
            "p50",
            "ms",
            s.p50_ms,
            Some((ETCD, r.p50_ms)),
        ));
        recs.push(Record::num(
            case,
            "p99",
            "ms",
            s.p99_ms,
            Some((ETCD, r.p99_ms)),
        ));
        recs.push(Record::num(
            case,
            "errors",
            "count",
            s.errors as f64,
            Some((ETCD, r.errors as f64)),
        ));
    };

    // Warm up both.
    write_load(
        &auth,
        "coord",
        &caddr,
        "warm",
        4,
        Duration::from_secs(1),
        None,
    )
    .await;
    write_load(&auth, ETCD, &eaddr, "warm", 4, Duration::from_secs(1), None).await;

    let s = write_load(
        &auth,
        "coord",
        &caddr,
        "s",
        1,
        Duration::ZERO,
        Some(single_n),
    )
    .await;
    let r = write_load(&auth, ETCD, &eaddr, "s", 1, Duration::ZERO, Some(single_n)).await;
    write_case("write, 1 client", &s, &r);
    for clients in [conc, 4 * conc] {
        let s = write_load(
            &auth,
            "coord",
            &caddr,
            &format!("c{clients}"),
            clients,
            Duration::from_secs(5),
            None,
        )
        .await;
        let r = write_load(
            &auth,
            ETCD,
            &eaddr,
            &format!("c{clients}"),
            clients,
            Duration::from_secs(5),
            None,
        )
        .await;
        write_case(&format!("write, {clients} clients"), &s, &r);
    }

    // Heartbeats: register the agents' hosts (through Raft), then hold them heartbeating.
    {
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = vec![];
        let admin = cluster.client(&caddr);
        for i in 0..agents {
            let mut c = admin.clone();
            let sem = sem.clone();
            tasks.push(tokio::spawn(async move {
                let _p = sem.acquire().await.expect("sem");
                // A loaded machine may cost the leader its quorum for a moment (UNAVAILABLE,
                // nothing applied): retry that, a bounded number of times.
                for attempt in 1.. {
                    let r = c
                        .register_host(pb::RegisterHostRequest {
                            id: format!("agent-{i}"),
                            address: format!("10.0.{}.{}:7300", i / 250, i % 250),
                            capacity: Some(pb::Resources {
                                vcpus: 64,
                                memory_mib: 262_144,
                            }),
                            labels: Default::default(),
                            vms: vec![],
                        })
                        .await;
                    match r {
                        Ok(_) => break,
                        Err(e) if e.code() == tonic::Code::Unavailable && attempt < 50 => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Err(e) => panic!("register agent host: {e}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("register");
        }
    }
    let interval = Duration::from_secs(5);
    let (s, held) = heartbeat_load(
        &auth,
        "coord",
        &caddr,
        agents,
        interval,
        Duration::from_secs(hb_secs),
    )
    .await;
    let (r, rheld) = heartbeat_load(
        &auth,
        ETCD,
        &eaddr,
        agents,
        interval,
        Duration::from_secs(hb_secs),
    )
    .await;
    let case = format!("{agents} agents, heartbeat 5 s");
    recs.push(Record::num(
        &case,
        "agents_held",
        "count",
        held as f64,
        Some((ETCD, rheld as f64)),
    ));
    recs.push(Record::num(
        &case,
        "heartbeats_per_s",
        "op/s",
        s.ops as f64 / s.secs,
        Some((ETCD, r.ops as f64 / r.secs)),
    ));
    recs.push(Record::num(
        &case,
        "p50",
        "ms",
        s.p50_ms,
        Some((ETCD, r.p50_ms)),
    ));
    recs.push(Record::num(
        &case,
        "p99",
        "ms",
        s.p99_ms,
        Some((ETCD, r.p99_ms)),
    ));
    recs.push(Record::num(
        &case,
        "errors",
        "count",
        s.errors as f64,
        Some((ETCD, r.errors as f64)),
    ));

    // Failover: SIGKILL the leader under 16 writers that try each node in turn.
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let last_ack = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
    let mut tasks = vec![];
    for w in 0..16usize {
        let (stop, acks, addrs) = (stop.clone(), last_ack.clone(), addrs.clone());
        let mut clients = vec![];
        for a in &addrs {
            clients.push(auth.admin.connect(a).await.expect("connect"));
        }
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            let mut k = w;
            while !stop.load(Ordering::Relaxed) {
                let c = &mut clients[k % 3];
                let sent = Instant::now();
                let r = c
                    .create_vm(pb::CreateVmRequest {
                        name: format!("f-{w}-{i}"),
                        resources: Some(pb::Resources {
                            vcpus: 1,
                            memory_mib: 64,
                        }),
                        start: true,
                        ..Default::default()
                    })
                    .await;
                match r {
                    // Only writes sent after the kill count: one in flight before it may be
                    // acknowledged just after it.
                    Ok(_) => acks.lock().expect("acks").push((sent, Instant::now())),
                    Err(_) => {
                        k += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    cluster.node(leader).kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    let failover = loop {
        if let Some(t) = last_ack
            .lock()
            .expect("acks")
            .iter()
            .rev()
            .find(|(sent, _)| *sent > killed)
        {
            break Some(t.1.duration_since(killed));
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    // The first ack of a write sent after the kill (not the latest one).
    let first_after = last_ack
        .lock()
        .expect("acks")
        .iter()
        .filter(|(sent, _)| *sent > killed)
        .map(|(_, acked)| *acked)
        .min()
        .map(|t| t.duration_since(killed));
    let fo = first_after
        .or(failover)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN);
    recs.push(Record::num(
        "leader SIGKILL, 16 writers",
        "failover",
        "ms",
        fo,
        None,
    ));

    report("coordinator", &recs);
    drop(etcd);
}
