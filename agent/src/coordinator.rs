//! The agent's link to its site coordinator: it dials out (gRPC; mutual TLS when `[coordinator]
//! tls` is set), registers this host with its inventory, heartbeats, and runs the commands the
//! coordinator streams to it.
//!
//! The session, in steps:
//!
//! 1. Dial an endpoint (the leader last heard of first, then the configured ones in turn).
//! 2. `RegisterHost`: id = `[migration] agent_name`, address = `[migration] listen`, capacity,
//!    labels, and the inventory (every VM held, with its state).
//! 3. `Commands(host)`: the leader streams commands; a follower refuses with UNAVAILABLE
//!    "... leader N at ADDR" and the agent dials ADDR instead.
//! 4. While the stream lasts: a `Heartbeat` every interval (utilisation, inventory, active
//!    anomalies) and right after each command; each command runs in its own task. A migration
//!    reports its progress and outcome with `ReportMigration`.
//! 5. Any failure ends the session; the agent dials again after a backoff (0.2 s doubling to
//!    5 s, reset by a session that got its stream).
//!
//! The coordinator decides from the inventories; the agent never second-guesses a command
//! beyond refusing what its manager refuses (the next inventory shows the result).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, info, warn};

use novacron_proto::coordinator::v1 as pb;
use pb::coordinator_client::CoordinatorClient;
use pb::host_command::Command as Cmd;

use crate::config::AgentConfig;
use crate::manager::{CreateParams, ManagerError, VmInfo, VmManager};
use crate::migration::MigrateParams;

/// Longest wait between two dial attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a migration's progress goes to the coordinator.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// How long a migration's outcome is retried against the coordinator.
const REPORT_RETRY: Duration = Duration::from_secs(60);

type Client = CoordinatorClient<Channel>;

/// Why a coordinator session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The endpoint address or TLS material is unusable.
    #[error("coordinator endpoint {endpoint}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// The cluster CA or this agent's certificate could not be read.
    #[error("coordinator TLS: {0}")]
    Tls(String),
    /// A call failed.
    #[error("{call} at {endpoint}: {status}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The status.
        #[source]
        status: tonic::Status,
    },
    /// The command stream ended.
    #[error("the command stream from {0} ended")]
    StreamEnded(String),
}

/// The link: configuration, the manager it drives, and telemetry for anomalies.
#[derive(Clone)]
pub struct Link {
    mgr: VmManager,
    cfg: AgentConfig,
    host_id: String,
    address: String,
    telemetry: Option<Arc<novacron_telemetry::Telemetry>>,
    tls: Option<ClientTlsConfig>,
    client: Arc<Mutex<Option<Client>>>,
    migrations: Arc<Mutex<HashSet<String>>>,
    poke: Arc<Notify>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("host_id", &self.host_id)
            .field("endpoints", &self.cfg.coordinator.endpoints)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link for `cfg` (`None` when no coordinator endpoint is configured).
    pub fn new(
        cfg: &AgentConfig,
        mgr: VmManager,
        telemetry: Option<Arc<novacron_telemetry::Telemetry>>,
    ) -> Result<Option<Link>, LinkError> {
        let c = &cfg.coordinator;
        if c.endpoints.is_empty() {
            return Ok(None);
        }
        let (Some(host_id), Some(listen)) = (&cfg.migration.agent_name, cfg.migration.listen)
        else {
            return Err(LinkError::Tls(
                "[coordinator] endpoints need [migration] agent_name and listen".into(),
            ));
        };
        let tls = if c.tls {
            Some(tls_config(cfg, host_id)?)
        } else {
            None
        };
        Ok(Some(Link {
            mgr,
            cfg: cfg.clone(),
            host_id: host_id.clone(),
            address: listen.to_string(),
            telemetry,
            tls,
            client: Arc::new(Mutex::new(None)),
            migrations: Arc::new(Mutex::new(HashSet::new())),
            poke: Arc::new(Notify::new()),
        }))
    }

    /// Keeps a session with the coordinator, forever.
    pub async fn run(self) {
        let endpoints = self.cfg.coordinator.endpoints.clone();
        let mut next = 0usize;
        let mut redirect: Option<String> = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            let endpoint = redirect.take().unwrap_or_else(|| {
                let e = endpoints[next % endpoints.len()].clone();
                next += 1;
                e
            });
            let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let result = self.session(&endpoint, &opened).await;
            if opened.load(std::sync::atomic::Ordering::Relaxed) {
                backoff = Duration::from_millis(200);
            }
            match result {
                Ok(()) => {}
                Err(LinkError::Call { status, .. })
                    if status.code() == tonic::Code::Unavailable
                        && leader_address(status.message()).is_some() =>
                {
                    redirect = leader_address(status.message());
                    debug!(to = ?redirect, "following the coordinator leader");
                    continue;
                }
                Err(e) => warn!(error = %e, "coordinator session ended"),
            }
            *self.client.lock().expect("client lock") = None;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, LinkError> {
        channel(endpoint, self.tls.as_ref())
    }

    /// One session: register, open the command stream, heartbeat and run commands until
    /// something fails; `opened` is set once the command stream is open.
    async fn session(
        &self,
        endpoint: &str,
        opened: &std::sync::atomic::AtomicBool,
    ) -> Result<(), LinkError> {
        let call = |call: &'static str| {
            let endpoint = endpoint.to_string();
            move |status| LinkError::Call {
                call,
                endpoint,
                status,
            }
        };
        let mut client = CoordinatorClient::new(self.channel(endpoint)?);
        let (vcpus, memory_mib) = self.capacity();
        client
            .register_host(pb::RegisterHostRequest {
                id: self.host_id.clone(),
                address: self.address.clone(),
                capacity: Some(pb::Resources { vcpus, memory_mib }),
                labels: self.cfg.coordinator.labels.clone().into_iter().collect(),
                vms: self.inventory(),
            })
            .await
            .map_err(call("RegisterHost"))?;
        let mut stream = client
            .commands(pb::HostRef {
                id: self.host_id.clone(),
            })
            .await
            .map_err(call("Commands"))?
            .into_inner();
        info!(%endpoint, host = %self.host_id, "coordinator session open");
        opened.store(true, std::sync::atomic::Ordering::Relaxed);
        *self.client.lock().expect("client lock") = Some(client.clone());
        let mut interval = Duration::from_millis(self.cfg.coordinator.heartbeat_interval_ms);
        let mut cpu = CpuSampler::default();
        let mut beat = Box::pin(tokio::time::sleep(Duration::ZERO));
        loop {
            tokio::select! {
                msg = stream.message() => match msg.map_err(call("Commands"))? {
                    Some(cmd) => self.dispatch(cmd),
                    None => return Err(LinkError::StreamEnded(endpoint.to_string())),
                },
                _ = &mut beat => {
                    let reply = client
                        .heartbeat(self.heartbeat(cpu.sample()))
                        .await
                        .map_err(call("Heartbeat"))?
                        .into_inner();
                    if reply.interval_ms > 0 {
                        interval = Duration::from_millis(reply.interval_ms);
                    }
                    beat.as_mut().reset(tokio::time::Instant::now() + interval);
                }
                _ = self.poke.notified() => {
                    beat.as_mut().reset(tokio::time::Instant::now());
                }
            }
        }
    }

    fn capacity(&self) -> (u32, u64) {
        let c = &self.cfg.coordinator;
        let vcpus = if c.vcpus > 0 {
            c.vcpus
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        };
        let memory = if c.memory_mib > 0 {
            c.memory_mib
        } else if self.cfg.max_memory_mib > 0 {
            self.cfg.max_memory_mib
        } else {
            mem_total_mib().unwrap_or(1024)
        };
        (vcpus, memory)
    }

    /// Every VM held here, as the coordinator sees inventories.
    fn inventory(&self) -> Vec<pb::AgentVm> {
        let vms_dir = self.mgr.config().state_dir.join("vms");
        self.mgr
            .list()
            .into_iter()
            .map(|v| {
                let migrating = vms_dir.join(&v.id).join("migration.json").exists();
                agent_vm(v, migrating)
            })
            .collect()
    }

    fn heartbeat(&self, cpu_utilisation: f64) -> pb::HeartbeatRequest {
        let inventory = self.inventory();
        let memory_used_mib = inventory
            .iter()
            .filter(|v| {
                matches!(
                    v.state.as_str(),
                    "starting" | "running" | "paused" | "incoming"
                )
            })
            .map(|v| v.memory_mib)
            .sum();
        let anomalies = self
            .telemetry
            .as_ref()
            .filter(|t| t.config().anomaly.enabled)
            .map(|t| {
                t.anomalies(None, t.config().anomaly.threshold)
                    .into_iter()
                    .filter(|e| e.open)
                    .map(|e| pb::VmAnomaly {
                        vm_id: e.name,
                        series: e.series,
                        score: e.score,
                        start_unix_ms: e.start_ms as i64,
                        end_unix_ms: e.end_ms as i64,
                    })
                    .collect()
            })
            .unwrap_or_default();
        pb::HeartbeatRequest {
            host_id: self.host_id.clone(),
            cpu_utilisation,
            memory_used_mib,
            running_vms: inventory
                .iter()
                .filter(|v| v.state == "running")
                .map(|v| v.name.clone())
                .collect(),
            anomalies,
            vms: inventory,
        }
    }

    /// Runs one command in its own task; a heartbeat follows it.
    fn dispatch(&self, cmd: pb::HostCommand) {
        let Some(cmd) = cmd.command else {
            return;
        };
        let link = self.clone();
        tokio::spawn(async move {
            link.execute(cmd).await;
            link.poke.notify_one();
        });
    }

    async fn execute(&self, cmd: Cmd) {
        let (what, result) = match cmd {
            Cmd::Create(c) => {
                let boot = c.boot.unwrap_or_default();
                let res = c.resources.unwrap_or_default();
                let opt = |s: String| (!s.is_empty()).then(|| s.into());
                (
                    format!("create {}", c.name),
                    self.mgr
                        .create(CreateParams {
                            name: c.name,
                            vcpus: Some(res.vcpus),
                            memory_mib: res.memory_mib,
                            kernel: opt(boot.kernel),
                            initramfs: opt(boot.initramfs),
                            cmdline: boot.cmdline,
                            entry: boot.entry,
                            test_guest: boot.test_guest,
                            hugepages: false,
                            start: c.start,
                        })
                        .await
                        .map(drop),
                )
            }
            Cmd::Start(c) => (
                format!("start {}", c.name),
                self.mgr.start(&c.name).await.map(drop),
            ),
            Cmd::Stop(c) => (
                format!("stop {}", c.name),
                self.mgr.stop(&c.name, false, None).await.map(drop),
            ),
            Cmd::Delete(c) => (
                format!("delete {}", c.name),
                self.mgr.delete(&c.name, false).await.map(drop),
            ),
            Cmd::Migrate(m) => {
                self.migrate(m).await;
                return;
            }
        };
        match result {
            Ok(()) => info!(command = %what, "coordinator command done"),
            Err(e) => warn!(command = %what, error = %e, "coordinator command refused"),
        }
    }

    async fn migrate(&self, m: pb::MigrateVmCommand) {
        if !self
            .migrations
            .lock()
            .expect("migrations lock")
            .insert(m.migration_id.clone())
        {
            debug!(migration = %m.migration_id, "already under way here");
            return;
        }
        info!(vm = %m.name, migration = %m.migration_id, to = %m.target_host, at = %m.target_address, "migrating for the coordinator");
        let started = self
            .mgr
            .migrate(MigrateParams {
                id_or_name: m.name.clone(),
                to_agent: m.target_host.clone(),
                to_address: Some(m.target_address.clone()),
                ..Default::default()
            })
            .await;
        let mut rx = match started {
            Ok(rx) => rx,
            // Busy (a migration this process does not know of, e.g. from before a restart)
            // or gone: the coordinator settles it from the inventories.
            Err(ManagerError::NotFound(_)) => return self.forget(&m.migration_id),
            Err(ManagerError::WrongState(msg)) if msg.contains("busy") => {
                return self.forget(&m.migration_id)
            }
            Err(e) => {
                warn!(vm = %m.name, error = %e, "migration refused");
                self.report(
                    &m.migration_id,
                    pb::MigrationPhase::Failed,
                    0,
                    0,
                    e.to_string(),
                )
                .await;
                return self.forget(&m.migration_id);
            }
        };
        let mut last_report = tokio::time::Instant::now() - PROGRESS_INTERVAL;
        let mut last = None;
        while let Some(p) = rx.recv().await {
            let total = p.raw_bytes + p.pages_left * 4096;
            if !crate::migration::is_final_phase(&p.phase)
                && last_report.elapsed() >= PROGRESS_INTERVAL
            {
                last_report = tokio::time::Instant::now();
                let client = self.client.lock().expect("client lock").clone();
                if let Some(mut c) = client {
                    let _ = c
                        .report_migration(pb::ReportMigrationRequest {
                            name: m.migration_id.clone(),
                            phase: pb::MigrationPhase::Running as i32,
                            bytes_done: p.raw_bytes,
                            bytes_total: total,
                            error: String::new(),
                        })
                        .await;
                }
            }
            last = Some(p);
        }
        let Some(p) = last else {
            return self.forget(&m.migration_id);
        };
        let total = p.raw_bytes + p.pages_left * 4096;
        match p.phase.as_str() {
            "completed" => {
                self.report(
                    &m.migration_id,
                    pb::MigrationPhase::Succeeded,
                    p.raw_bytes,
                    total,
                    String::new(),
                )
                .await
            }
            "rolled-back" | "failed" => {
                self.report(
                    &m.migration_id,
                    pb::MigrationPhase::Failed,
                    p.raw_bytes,
                    total,
                    p.error.unwrap_or_else(|| p.phase.clone()),
                )
                .await
            }
            other => {
                warn!(vm = %m.name, phase = %other, "migration ended undecided; the coordinator settles it")
            }
        }
        self.forget(&m.migration_id);
    }

    fn forget(&self, migration: &str) {
        self.migrations
            .lock()
            .expect("migrations lock")
            .remove(migration);
    }

    /// Reports a migration's outcome, retrying across reconnects; gives up when the
    /// coordinator already knows it (or after [`REPORT_RETRY`]).
    async fn report(
        &self,
        migration: &str,
        phase: pb::MigrationPhase,
        bytes_done: u64,
        bytes_total: u64,
        error: String,
    ) {
        self.poke.notify_one();
        let deadline = tokio::time::Instant::now() + REPORT_RETRY;
        while tokio::time::Instant::now() < deadline {
            let client = self.client.lock().expect("client lock").clone();
            if let Some(mut c) = client {
                match c
                    .report_migration(pb::ReportMigrationRequest {
                        name: migration.to_string(),
                        phase: phase as i32,
                        bytes_done,
                        bytes_total,
                        error: error.clone(),
                    })
                    .await
                {
                    Ok(_) => {
                        info!(%migration, ?phase, "migration reported");
                        return;
                    }
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::FailedPrecondition | tonic::Code::NotFound
                        ) =>
                    {
                        info!(%migration, status = %s, "the coordinator already settled the migration");
                        return;
                    }
                    Err(s) => debug!(%migration, status = %s, "report failed; retrying"),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        warn!(%migration, "could not report the migration's outcome; the coordinator settles it from the inventories");
    }
}

/// A lazily connected channel to `endpoint`: TLS with `tls`, plain HTTP/2 without.
fn channel(endpoint: &str, tls: Option<&ClientTlsConfig>) -> Result<Channel, LinkError> {
    let bad = |reason: String| LinkError::Endpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(4));
    if let Some(tls) = tls {
        e = e.tls_config(tls.clone()).map_err(|e| bad(e.to_string()))?;
    }
    Ok(e.connect_lazy())
}

/// "not the leader; leader N at ADDR" → ADDR.
fn leader_address(message: &str) -> Option<String> {
    let rest = message.strip_prefix("not the leader; leader ")?;
    let (_, addr) = rest.split_once(" at ")?;
    let addr = addr.trim();
    (!addr.is_empty()).then(|| addr.to_string())
}

fn tls_config(cfg: &AgentConfig, agent: &str) -> Result<ClientTlsConfig, LinkError> {
    let dir = cfg
        .migration
        .cert_dir
        .as_ref()
        .ok_or_else(|| LinkError::Tls("[coordinator] tls needs [migration] cert_dir".into()))?;
    let dir = novacron_migration::certs::ClusterDir::new(dir);
    let read = |p: std::path::PathBuf| {
        std::fs::read(&p).map_err(|e| LinkError::Tls(format!("reading {}: {e}", p.display())))
    };
    let (cert, key) = dir
        .agent_paths(agent)
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(dir.ca_cert_path())?))
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .domain_name(cfg.coordinator.server_name.clone()))
}

fn agent_vm(v: VmInfo, migrating: bool) -> pb::AgentVm {
    pb::AgentVm {
        state: v.state.as_str().to_string(),
        vcpus: v.vcpus,
        memory_mib: v.memory_mib,
        boot: Some(pb::BootSpec {
            test_guest: v.test_guest,
            kernel: if v.test_guest {
                String::new()
            } else {
                v.kernel.display().to_string()
            },
            initramfs: v
                .initramfs
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cmdline: v.cmdline,
            entry: if v.test_guest {
                String::new()
            } else {
                v.entry.to_string()
            },
        }),
        name: v.name,
        migrating,
    }
}

fn mem_total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Host CPU utilisation from `/proc/stat` between two samples.
#[derive(Debug, Default)]
struct CpuSampler {
    last: Option<(u64, u64)>,
}

impl CpuSampler {
    fn sample(&mut self) -> f64 {
        let Some((busy, total)) = read_cpu() else {
            return 0.0;
        };
        let u = match self.last {
            Some((b0, t0)) if total > t0 => (busy.saturating_sub(b0)) as f64 / (total - t0) as f64,
            _ => 0.0,
        };
        self.last = Some((busy, total));
        u.clamp(0.0, 1.0)
    }
}

fn read_cpu() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_leader_address_in_a_refusal() {
        assert_eq!(
            leader_address("not the leader; leader 2 at 127.0.0.1:7401").as_deref(),
            Some("127.0.0.1:7401")
        );
        assert_eq!(leader_address("not the leader; no leader known"), None);
    }

    /// The TLS client against a real TLS server that demands a client certificate from the
    /// cluster CA (the health service stands in for the coordinator).
    #[tokio::test]
    async fn tls_presents_the_agent_certificate_and_verifies_the_coordinator() {
        use tonic::transport::{Server, ServerTlsConfig};
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;

        let dir = tempfile::tempdir().unwrap();
        let certs = novacron_migration::certs::ClusterDir::new(dir.path());
        certs.init("t").unwrap();
        certs.issue("a").unwrap();
        // Coordinator 1's certificate, which also names "coordinator".
        let files = certs.issue_coordinator(1).unwrap();
        let read = |p: &std::path::PathBuf| std::fs::read(p).unwrap();
        let (cert, key) = (&files[0], &files[1]);
        let server_tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(cert), read(key)))
            .client_ca_root(Certificate::from_pem(read(&certs.ca_cert_path())));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .tls_config(server_tls)
                .unwrap()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut cfg = AgentConfig::default();
        cfg.migration.cert_dir = Some(dir.path().to_path_buf());
        cfg.coordinator.tls = true;
        let check = |tls: ClientTlsConfig| {
            let addr = addr.clone();
            async move {
                HealthClient::new(channel(&addr, Some(&tls)).unwrap())
                    .check(HealthCheckRequest::default())
                    .await
            }
        };
        let ok = check(tls_config(&cfg, "a").unwrap()).await;
        assert!(ok.is_ok(), "{ok:?}");
        // Without a client certificate the server refuses the connection.
        let anonymous = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&certs.ca_cert_path())))
            .domain_name("coordinator");
        assert!(check(anonymous).await.is_err());
        // A server under another name is refused by the agent.
        cfg.coordinator.server_name = "elsewhere".into();
        assert!(check(tls_config(&cfg, "a").unwrap()).await.is_err());
        // Missing material is named.
        let err = tls_config(&cfg, "nobody").unwrap_err().to_string();
        assert!(err.contains("nobody"), "{err}");
    }

    #[test]
    fn cpu_utilisation_is_a_fraction() {
        let mut s = CpuSampler::default();
        let _ = s.sample();
        std::thread::sleep(Duration::from_millis(20));
        let u = s.sample();
        assert!((0.0..=1.0).contains(&u), "{u}");
    }
}
