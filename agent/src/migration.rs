//! Live migration between agents.
//!
//! The migration itself runs inside the VMMs (`novacron_vmm::migrate`, QUIC with mutual
//! TLS, see `docs/design/migration.md`); the agents only arrange it:
//!
//! 1. The source agent asks the destination agent to **prepare** (a request on the
//!    destination's `[migration] listen` endpoint: QUIC, mutual TLS with the cluster CA,
//!    the source agent's certificate names it). The destination validates the VM (name and
//!    id free, memory available, kernel present), creates its directory, starts a VMM with
//!    `--incoming`, tells it to listen (`MigrateIn`) and answers with that VMM's address.
//! 2. The source agent sends `MigrateOut` to its own VMM and polls `MigrationStatus`,
//!    streaming progress, until the migration completed, rolled back or is in doubt.
//! 3. Completed: the source VMM exits with reason `migrated`, and the source agent removes
//!    the VM. Rolled back: the VM runs on here; the destination is told to **abort** a VM
//!    whose migration never connected. In doubt: the destination is asked for the VM's
//!    **status**, and the source either releases its paused copy (the destination runs the
//!    VM) or resumes it (the destination does not have it).
//!
//! One bidirectional QUIC stream per request: the request as JSON, end of stream; the
//! answer as JSON, end of stream.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedMutexGuard};
use tracing::{debug, info, warn};

use novacron_migration::certs::ClusterDir;
use novacron_migration::tls::Identity;
use novacron_migration::transport::{self, TransportError};
use novacron_vmm::config::{EntryProtocol, VmConfig};
use novacron_vmm::control::{ExitReason, ExitRecord, Request, Response};
use novacron_vmm::migrate::{IncomingParams, OutgoingParams, Progress};

use crate::config::MigrationConfig;
use crate::manager::{
    apply_info, control_call, is_outgoing_active, kill_and_wait, spawn_incoming_watch, unix_now,
    wait_for_end, write_json_atomic, Desired, ManagerError, SpecRecord, VmEntry, VmInfo, VmManager,
    VmState, CONTROL_TIMEOUT, MIGRATION_FILE,
};

/// Largest request or answer, bytes.
const MAX_MESSAGE: usize = 64 << 10;
/// How long one agent-to-agent request may take (a prepare starts a VMM).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the source agent polls its VMM's migration status.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How often progress goes to the client when nothing but counters changed.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// This agent's migration identity and peers, loaded at start.
pub struct MigrationContext {
    /// This agent's name (its certificate names it).
    pub agent_name: String,
    /// The cluster directory.
    pub cert_dir: PathBuf,
    /// Where this agent accepts migration requests, if it does.
    pub listen: Option<SocketAddr>,
    /// Other agents: name → "host:port".
    pub peers: BTreeMap<String, String>,
    identity: Identity,
    ca: Vec<u8>,
}

impl std::fmt::Debug for MigrationContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationContext")
            .field("agent_name", &self.agent_name)
            .field("cert_dir", &self.cert_dir)
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl MigrationContext {
    /// Loads the identity of a configured `[migration]` table (`None` if none is
    /// configured); the error names the files that are missing or unusable.
    pub fn load(cfg: &MigrationConfig) -> Result<Option<Self>, String> {
        if !cfg.is_configured() {
            return Ok(None);
        }
        let (Some(agent_name), Some(cert_dir)) = (&cfg.agent_name, &cfg.cert_dir) else {
            return Err("[migration] needs agent_name and cert_dir".into());
        };
        let dir = ClusterDir::new(cert_dir);
        let identity = dir.load_identity(agent_name).map_err(|e| {
            format!(
                "migration: loading the certificate of agent {agent_name} from {}: {e} \
                 (create it with `novacron-agent certs issue --dir {} --agent {agent_name}`)",
                cert_dir.display(),
                cert_dir.display()
            )
        })?;
        let ca = dir.load_ca().map_err(|e| {
            format!(
                "migration: loading the cluster CA from {}: {e}",
                cert_dir.display()
            )
        })?;
        Ok(Some(MigrationContext {
            agent_name: agent_name.clone(),
            cert_dir: cert_dir.clone(),
            listen: cfg.listen,
            peers: cfg.peers.clone(),
            identity,
            ca,
        }))
    }

    /// Binds the listener for other agents' requests (QUIC, mutual TLS).
    pub async fn bind(&self, addr: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
        transport::listen(addr, &self.identity, &self.ca).await
    }
}

/// The parts of a VM's spec that travel to the destination agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique name.
    pub name: String,
    /// Stable id (kept across migrations).
    pub id: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Kernel image (the same path must exist on the destination host).
    pub kernel: PathBuf,
    /// Initramfs (ditto).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Entry protocol.
    pub entry: EntryProtocol,
    /// Huge pages.
    pub hugepages: bool,
    /// The kernel is the built-in test guest.
    #[serde(default)]
    pub test_guest: bool,
}

/// A request from one agent to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PeerRequest {
    /// Prepare to receive a VM: answers [`PeerResponse::Prepared`] or
    /// [`PeerResponse::Refused`].
    Prepare {
        /// The VM.
        vm: VmSpec,
        /// The token the source VMM will present.
        token: [u8; 16],
    },
    /// Drop a prepared VM whose migration never started.
    Abort {
        /// The VM id.
        id: String,
    },
    /// The state of a VM on the destination (resolves an in-doubt source).
    Status {
        /// The VM id.
        id: String,
    },
}

/// An agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PeerResponse {
    /// Ready: the destination VMM listens at `address`.
    Prepared {
        /// The incoming VMM's QUIC address.
        address: String,
    },
    /// The request is refused, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// Abort handled.
    Aborted {
        /// What was done.
        detail: String,
    },
    /// Answer to [`PeerRequest::Status`].
    Status {
        /// The VM's state ("incoming", "running", ...), `None` if it is not here.
        state: Option<String>,
    },
}

// ---------------------------------------------------------------------------------------
// Destination: the listener.

/// Serves other agents' requests on `endpoint` until it is closed.
pub async fn serve(mgr: VmManager, endpoint: quinn::Endpoint) {
    while let Some(accepted) = transport::accept(&endpoint).await {
        match accepted {
            Ok((conn, peer)) => {
                debug!(%peer, remote = %conn.remote_address(), "agent connected");
                tokio::spawn(serve_connection(mgr.clone(), conn, peer));
            }
            Err(e) => warn!("refused a migration request connection: {e}"),
        }
    }
}

async fn serve_connection(mgr: VmManager, conn: quinn::Connection, peer: String) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let mgr = mgr.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let answer = match recv.read_to_end(MAX_MESSAGE).await {
                Ok(bytes) => match serde_json::from_slice::<PeerRequest>(&bytes) {
                    Ok(req) => mgr.handle_peer_request(&peer, req).await,
                    Err(e) => PeerResponse::Refused {
                        reason: format!("malformed request: {e}"),
                    },
                },
                Err(e) => {
                    warn!(%peer, "reading a request: {e}");
                    return;
                }
            };
            let bytes = serde_json::to_vec(&answer).expect("answers serialise");
            if let Err(e) = send.write_all(&bytes).await {
                warn!(%peer, "sending an answer: {e}");
                return;
            }
            let _ = send.finish();
            // Wait for the peer to read it (it closes the connection).
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        });
    }
}

impl VmManager {
    async fn handle_peer_request(&self, peer: &str, req: PeerRequest) -> PeerResponse {
        let Some(ctx) = self.inner.cfg.migration.clone() else {
            return PeerResponse::Refused {
                reason: "live migration is not configured".into(),
            };
        };
        match req {
            PeerRequest::Prepare { vm, token } => {
                info!(%peer, vm = %vm.id, name = %vm.name, "prepare request");
                match self.prepare_incoming(&ctx, vm, token, peer).await {
                    Ok(address) => PeerResponse::Prepared { address },
                    Err(reason) => {
                        warn!(%peer, "refused a migration: {reason}");
                        PeerResponse::Refused {
                            reason: format!("agent {}: {reason}", ctx.agent_name),
                        }
                    }
                }
            }
            PeerRequest::Abort { id } => {
                info!(%peer, vm = %id, "abort request");
                self.abort_incoming(&id).await
            }
            PeerRequest::Status { id } => PeerResponse::Status {
                state: self.peer_status(&id).await,
            },
        }
    }

    async fn prepare_incoming(
        &self,
        ctx: &MigrationContext,
        spec: VmSpec,
        token: [u8; 16],
        from: &str,
    ) -> Result<String, String> {
        let entry = {
            let _guard = self.inner.create_lock.lock().await;
            let id_ok = (1..=64).contains(&spec.id.len())
                && spec
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                return Err(format!("unusable VM id {:?}", spec.id));
            }
            {
                let vms = self.inner.vms.lock().unwrap();
                for e in vms.iter() {
                    let name = e.record.lock().unwrap().vm.name.clone();
                    if e.id == spec.id || name == spec.name || e.id == spec.name {
                        return Err(format!(
                            "a VM named {name:?} (id {}) already exists here",
                            e.id
                        ));
                    }
                }
            }
            self.check_memory_budget(&spec.id, spec.memory_mib)?;
            let dir = self.inner.vms_dir.join(&spec.id);
            let vm = VmConfig {
                id: spec.id.clone(),
                name: spec.name.clone(),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                hugepages: spec.hugepages,
                kernel: spec.kernel.clone(),
                initramfs: spec.initramfs.clone(),
                cmdline: spec.cmdline.clone(),
                entry: spec.entry,
                console_log: dir.join("console.log"),
                debugcon_log: dir.join("debugcon.log"),
                console_log_max_bytes: self.inner.cfg.console_log_max_bytes,
                dirty_tracking: self.inner.cfg.dirty_tracking,
                dirty_ring_entries: 0,
            };
            vm.validate(novacron_vmm::config::host_available_mib())
                .map_err(|e| e.to_string())?;
            if dir.exists() {
                return Err(format!("{} already exists", dir.display()));
            }
            let rec = SpecRecord {
                vm,
                created_at_unix: unix_now(),
                created_at_unix_ns: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
                test_guest: spec.test_guest,
                desired: Desired::Running,
                incoming: true,
            };
            let tmp = self.inner.vms_dir.join(format!(".creating-{}", spec.id));
            let made = (|| {
                std::fs::create_dir(&tmp)
                    .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
                write_json_atomic(&tmp.join("spec.json"), &rec).map_err(|e| e.to_string())?;
                std::fs::rename(&tmp, &dir).map_err(|e| format!("creating {}: {e}", dir.display()))
            })();
            if let Err(e) = made {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            let entry = Arc::new(VmEntry::new(spec.id.clone(), dir, rec));
            self.inner.vms.lock().unwrap().push(entry.clone());
            entry
        };
        info!(vm = %entry.id, name = %spec.name, %from, "prepared an incoming VM");
        let _op = entry.op.lock().await;
        if let Err(e) = self.start_locked(&entry, true).await {
            self.remove_entry(&entry, "its incoming VMM did not start");
            return Err(format!("starting the incoming VMM: {e}"));
        }
        let run = entry.status.borrow().run;
        let listen_ip = ctx
            .listen
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let params = IncomingParams {
            listen: SocketAddr::new(listen_ip, 0),
            token,
            cert_dir: ctx.cert_dir.clone(),
            agent: ctx.agent_name.clone(),
        };
        let answer = control_call(
            entry.control(),
            Request::MigrateIn { params },
            CONTROL_TIMEOUT,
        )
        .await;
        match answer {
            Ok(Response::MigrationListening { address }) => {
                spawn_incoming_watch(self.clone(), entry.clone(), run);
                Ok(address)
            }
            other => {
                let why = match other {
                    Ok(Response::Error { message }) => message,
                    Ok(other) => format!("unexpected answer {other:?}"),
                    Err(e) => e.to_string(),
                };
                let pid = entry.status.borrow().pid.unwrap_or(0);
                kill_and_wait(
                    &entry,
                    run,
                    pid,
                    ExitRecord {
                        reason: ExitReason::IncomingDiscarded,
                        detail: format!("the incoming VMM could not listen: {why}"),
                    },
                    Duration::from_secs(5),
                )
                .await;
                self.remove_entry(&entry, "its incoming VMM could not listen");
                Err(format!("the incoming VMM could not listen: {why}"))
            }
        }
    }

    /// Drops a prepared VM whose migration has not connected. A VM that is not an
    /// uncommitted incoming VM is never touched.
    async fn abort_incoming(&self, id: &str) -> PeerResponse {
        let Some(entry) = self.find_by_id(id) else {
            return PeerResponse::Aborted {
                detail: format!("no VM {id} here (already discarded)"),
            };
        };
        if !entry.record.lock().unwrap().incoming {
            return PeerResponse::Refused {
                reason: format!("VM {id} is not an incoming VM here; not aborting it"),
            };
        }
        let run = entry.status.borrow().run;
        let phase =
            match control_call(entry.control(), Request::MigrationStatus, CONTROL_TIMEOUT).await {
                Ok(Response::Migration { progress: Some(p) }) => p.phase,
                _ => String::new(),
            };
        if phase != "listening" {
            // Connected (or ending): the source's rollback ends it; never cut a migration
            // that may commit.
            return PeerResponse::Aborted {
                detail: format!("VM {id}: incoming migration is {phase:?}; left to end by itself"),
            };
        }
        let _ = control_call(entry.control(), Request::MigrationCancel, CONTROL_TIMEOUT).await;
        if wait_for_end(&entry, run, Duration::from_secs(5)).await {
            self.after_end(&entry, run);
        }
        PeerResponse::Aborted {
            detail: format!("VM {id}: prepared migration cancelled"),
        }
    }

    async fn peer_status(&self, id: &str) -> Option<String> {
        let entry = self.find_by_id(id)?;
        let (state, run) = {
            let st = entry.status.borrow();
            (st.state, st.run)
        };
        if state == VmState::Incoming {
            if let Ok(Response::Info(info)) =
                control_call(entry.control(), Request::Info, CONTROL_TIMEOUT).await
            {
                if info.id == entry.id {
                    apply_info(&entry, run, &info);
                }
            }
        }
        if entry.deleted.load(Ordering::SeqCst) {
            return None;
        }
        let state = entry.status.borrow().state;
        Some(state.as_str().to_string())
    }

    fn find_by_id(&self, id: &str) -> Option<Arc<VmEntry>> {
        self.inner
            .vms
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.id == id)
            .cloned()
    }
}

// ---------------------------------------------------------------------------------------
// Client side of the agent-to-agent protocol.

/// Resolves a peer's "host:port".
async fn resolve(agent: &str, addr: &str) -> Result<SocketAddr, ManagerError> {
    let unreachable = |message: String| ManagerError::Peer {
        agent: agent.to_string(),
        kind: PeerFailure::Unreachable,
        message,
    };
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| unreachable(format!("resolving {addr}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| unreachable(format!("{addr} resolves to no address")))
}

/// How talking to a peer agent failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFailure {
    /// The peer answered with a refusal.
    Refused,
    /// The peer could not be reached or the connection broke.
    Unreachable,
    /// TLS authentication failed (either side refused the other's certificate).
    Certificate,
}

/// Sends one request to agent `agent` at `addr` and waits for its answer.
async fn request(
    ctx: &MigrationContext,
    agent: &str,
    addr: SocketAddr,
    req: &PeerRequest,
) -> Result<PeerResponse, ManagerError> {
    let fail = |e: TransportError| ManagerError::Peer {
        agent: agent.to_string(),
        kind: if e.is_certificate_refusal() {
            PeerFailure::Certificate
        } else {
            PeerFailure::Unreachable
        },
        message: format!("agent {agent} at {addr}: {e}"),
    };
    let bind = SocketAddr::new(
        if addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        },
        0,
    );
    let endpoint = transport::client_endpoint(bind).map_err(fail)?;
    let work = async {
        let conn = transport::connect(&endpoint, addr, agent, &ctx.identity, &ctx.ca)
            .await
            .map_err(fail)?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| fail(TransportError::from(e)))?;
        let bytes = serde_json::to_vec(req).expect("requests serialise");
        send.write_all(&bytes)
            .await
            .map_err(|e| fail(TransportError::from(e)))?;
        let _ = send.finish();
        let answer = match recv.read_to_end(MAX_MESSAGE).await {
            Ok(a) => a,
            Err(quinn::ReadToEndError::Read(e)) => return Err(fail(TransportError::from(e))),
            Err(quinn::ReadToEndError::TooLong) => {
                return Err(fail(TransportError::Stream("answer too long".into())))
            }
        };
        conn.close(0u32.into(), b"done");
        serde_json::from_slice::<PeerResponse>(&answer).map_err(|e| ManagerError::Peer {
            agent: agent.to_string(),
            kind: PeerFailure::Unreachable,
            message: format!("agent {agent} at {addr}: malformed answer: {e}"),
        })
    };
    let result = match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(ManagerError::Peer {
            agent: agent.to_string(),
            kind: PeerFailure::Unreachable,
            message: format!("agent {agent} at {addr}: no answer within {REQUEST_TIMEOUT:?}"),
        }),
    };
    endpoint.close(0u32.into(), b"done");
    result
}

// ---------------------------------------------------------------------------------------
// Source side.

/// What a `MigrateVm` asks for. Zero values mean the defaults.
#[derive(Debug, Clone, Default)]
pub struct MigrateParams {
    /// The VM.
    pub id_or_name: String,
    /// The destination agent (a name in `[migration.peers]`, or any agent with `to_address`).
    pub to_agent: String,
    /// The destination agent's migration address ("host:port"), when it is not a peer
    /// (given by the coordinator).
    pub to_address: Option<String>,
    /// Longest acceptable downtime, ms (0 = 50).
    pub downtime_limit_ms: u64,
    /// Give up (or force) after this many seconds (0 = 300).
    pub time_limit_s: u64,
    /// At the time limit, switch over anyway instead of cancelling.
    pub force_at_time_limit: bool,
    /// Parallel data streams (0 = 4).
    pub streams: u32,
    /// Bytes per second on the wire (0 = no limit).
    pub bandwidth_limit: u64,
    /// Guest dirty-rate cap during the migration, pages/s (0 = none).
    pub dirty_rate_limit: u64,
}

/// The migration under way, persisted in the VM's directory so a restarted agent knows
/// where the VM is going.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MigrationRecord {
    to_agent: String,
    address: String,
    started_at_unix: i64,
}

/// Whether a progress phase ends a migration as far as the client is concerned.
pub fn is_final_phase(phase: &str) -> bool {
    matches!(phase, "completed" | "rolled-back" | "in-doubt" | "failed")
}

fn random_token() -> Result<[u8; 16], ManagerError> {
    use std::io::Read as _;
    let mut token = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut token))
        .map_err(|source| ManagerError::Io {
            context: "reading /dev/urandom for a migration token".into(),
            source,
        })?;
    Ok(token)
}

impl VmManager {
    /// Live-migrates a running VM to agent `to_agent`. Returns once the destination is
    /// prepared and the VMM started the migration; progress (and, last, the final
    /// statistics) arrives on the receiver. The migration goes on if the receiver is
    /// dropped.
    pub async fn migrate(
        &self,
        p: MigrateParams,
    ) -> Result<mpsc::Receiver<Progress>, ManagerError> {
        let ctx = self.inner.cfg.migration.clone().ok_or_else(|| {
            ManagerError::WrongState(
                "live migration is not configured on this agent (set [migration] agent_name \
                 and cert_dir)"
                    .into(),
            )
        })?;
        let invalid = |field: &str, reason: String| ManagerError::InvalidArgument {
            field: field.into(),
            reason,
        };
        if p.to_agent.is_empty() {
            return Err(invalid(
                "to_agent",
                "empty; expected a peer agent's name".into(),
            ));
        }
        if p.to_agent == ctx.agent_name {
            return Err(invalid(
                "to_agent",
                format!("{:?} is this agent; expected another agent", p.to_agent),
            ));
        }
        let Some(peer_addr) = p
            .to_address
            .clone()
            .or_else(|| ctx.peers.get(&p.to_agent).cloned())
        else {
            let known: Vec<&str> = ctx.peers.keys().map(String::as_str).collect();
            return Err(invalid(
                "to_agent",
                format!(
                    "{:?} is not a peer of this agent (known peers: {})",
                    p.to_agent,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        if p.streams > 64 {
            return Err(invalid(
                "streams",
                format!("{}: expected 1 to 64", p.streams),
            ));
        }
        let entry = self.lookup(&p.id_or_name)?;
        let name = entry.name();
        let guard = entry.op.clone().try_lock_owned().map_err(|_| {
            ManagerError::WrongState(format!(
                "VM {name} is busy with another operation or migration"
            ))
        })?;
        entry.check_live()?;
        let state = entry.status.borrow().state;
        if state != VmState::Running {
            return Err(ManagerError::WrongState(format!(
                "VM {name} is {state}; only a running VM can be migrated"
            )));
        }
        let addr = resolve(&p.to_agent, &peer_addr).await?;
        let token = random_token()?;
        let spec = {
            let rec = entry.record.lock().unwrap();
            VmSpec {
                name: rec.vm.name.clone(),
                id: rec.vm.id.clone(),
                vcpus: rec.vm.vcpus,
                memory_mib: rec.vm.memory_mib,
                kernel: rec.vm.kernel.clone(),
                initramfs: rec.vm.initramfs.clone(),
                cmdline: rec.vm.cmdline.clone(),
                entry: rec.vm.entry,
                hugepages: rec.vm.hugepages,
                test_guest: rec.test_guest,
            }
        };
        info!(vm = %entry.id, to = %p.to_agent, %addr, "preparing the destination");
        let answer = request(
            &ctx,
            &p.to_agent,
            addr,
            &PeerRequest::Prepare { vm: spec, token },
        )
        .await?;
        let address = match answer {
            PeerResponse::Prepared { address } => address,
            PeerResponse::Refused { reason } => {
                return Err(ManagerError::Peer {
                    agent: p.to_agent.clone(),
                    kind: PeerFailure::Refused,
                    message: format!("the destination refused VM {name}: {reason}"),
                })
            }
            other => {
                return Err(ManagerError::Peer {
                    agent: p.to_agent.clone(),
                    kind: PeerFailure::Refused,
                    message: format!("unexpected answer to prepare: {other:?}"),
                })
            }
        };
        let mut dest: SocketAddr = address.parse().map_err(|e| ManagerError::Peer {
            agent: p.to_agent.clone(),
            kind: PeerFailure::Refused,
            message: format!("the destination answered an unusable address {address:?}: {e}"),
        })?;
        if dest.ip().is_unspecified() {
            dest.set_ip(addr.ip());
        }
        let record = MigrationRecord {
            to_agent: p.to_agent.clone(),
            address: addr.to_string(),
            started_at_unix: unix_now(),
        };
        let record_path = entry.dir.join(MIGRATION_FILE);
        write_json_atomic(&record_path, &record)?;
        let params = OutgoingParams {
            address: dest,
            dest_agent: p.to_agent.clone(),
            token,
            cert_dir: ctx.cert_dir.clone(),
            agent: ctx.agent_name.clone(),
            streams: if p.streams == 0 {
                4
            } else {
                p.streams as usize
            },
            downtime_limit_ms: if p.downtime_limit_ms == 0 {
                50
            } else {
                p.downtime_limit_ms
            },
            time_limit_s: if p.time_limit_s == 0 {
                300
            } else {
                p.time_limit_s
            },
            force_at_time_limit: p.force_at_time_limit,
            auto_converge: true,
            dirty_rate_limit: p.dirty_rate_limit,
            bandwidth_limit: p.bandwidth_limit,
        };
        let started = control_call(
            entry.control(),
            Request::MigrateOut { params },
            CONTROL_TIMEOUT,
        )
        .await;
        let refused = match started {
            Ok(Response::Ok) => None,
            Ok(Response::Error { message }) => Some(ManagerError::VmmRefused {
                name: name.clone(),
                message,
            }),
            Ok(other) => Some(ManagerError::UnexpectedAnswer {
                name: name.clone(),
                answer: format!("{other:?}"),
            }),
            Err(source) => Some(ManagerError::Vmm {
                name: name.clone(),
                source,
            }),
        };
        if let Some(e) = refused {
            let _ = std::fs::remove_file(&record_path);
            let _ = request(
                &ctx,
                &p.to_agent,
                addr,
                &PeerRequest::Abort {
                    id: entry.id.clone(),
                },
            )
            .await;
            return Err(e);
        }
        info!(vm = %entry.id, to = %p.to_agent, %dest, "migration started");
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(follow(self.clone(), entry, Some(guard), Some(tx)));
        Ok(rx)
    }

    /// Cancels the VM's outgoing migration (honoured until its commit).
    pub async fn cancel_migration(&self, id_or_name: &str) -> Result<VmInfo, ManagerError> {
        let entry = self.lookup(id_or_name)?;
        let name = entry.name();
        match control_call(entry.control(), Request::MigrationStatus, CONTROL_TIMEOUT).await {
            Ok(Response::Migration { progress: Some(p) }) if is_outgoing_active(&p.phase) => {}
            Ok(Response::Migration { progress }) => {
                return Err(ManagerError::WrongState(format!(
                    "VM {name} has no outgoing migration under way{}",
                    progress
                        .map(|p| format!(" (last: {})", p.phase))
                        .unwrap_or_default()
                )))
            }
            Ok(other) => {
                return Err(ManagerError::UnexpectedAnswer {
                    name,
                    answer: format!("{other:?}"),
                })
            }
            Err(_) => {
                return Err(ManagerError::WrongState(format!(
                    "VM {name} has no VMM; no migration is under way"
                )))
            }
        }
        self.expect_ok(&entry, Request::MigrationCancel).await?;
        Ok(entry.snapshot())
    }
}

/// Parses the source VMM's exit detail "migrated to X in N ms, downtime D ms, R rounds".
fn parse_migrated_detail(detail: &str) -> (Option<f64>, Option<f64>) {
    let number_after = |marker: &str| -> Option<f64> {
        let (_, rest) = detail.split_once(marker)?;
        rest.split_once(" ms")?.0.trim().parse().ok()
    };
    (number_after(" in "), number_after("downtime "))
}

enum Outcome {
    Completed,
    RolledBack,
    InDoubt,
    Ended,
}

/// Follows the VM's outgoing migration to its end (polling the VMM), streaming progress to
/// `tx`, and does what the outcome requires. Used by [`VmManager::migrate`] and, after an
/// agent restart, for a migration the VMM ran meanwhile.
pub(crate) async fn follow(
    mgr: VmManager,
    entry: Arc<VmEntry>,
    guard: Option<OwnedMutexGuard<()>>,
    tx: Option<mpsc::Sender<Progress>>,
) {
    let _guard = match guard {
        Some(g) => g,
        None => entry.op.clone().lock_owned().await,
    };
    let record: Option<MigrationRecord> = std::fs::read(entry.dir.join(MIGRATION_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let ctx = mgr.inner.cfg.migration.clone();
    let run = entry.status.borrow().run;
    let send = |p: Progress| {
        if let Some(tx) = &tx {
            // A slow or vanished client never holds the migration up.
            let _ = tx.try_send(p);
        }
    };
    let mut last = Progress::default();
    let mut last_sent = Instant::now() - REPORT_INTERVAL;
    let outcome = loop {
        {
            let st = entry.status.borrow();
            if st.run != run || !st.state.is_active() {
                break Outcome::Ended;
            }
        }
        if let Ok(Response::Migration { progress: Some(p) }) = control_call(
            entry.control(),
            Request::MigrationStatus,
            Duration::from_secs(2),
        )
        .await
        {
            let changed = p.phase != last.phase || p.round != last.round;
            last = p;
            // The final message is sent once the outcome is handled, below.
            if !is_final_phase(&last.phase) && (changed || last_sent.elapsed() >= REPORT_INTERVAL) {
                send(last.clone());
                last_sent = Instant::now();
            }
            match last.phase.as_str() {
                "completed" => break Outcome::Completed,
                "rolled-back" => break Outcome::RolledBack,
                "in-doubt" => break Outcome::InDoubt,
                _ => {}
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let peer = match (&ctx, &record) {
        (Some(ctx), Some(rec)) => {
            let addr = match ctx.peers.get(&rec.to_agent) {
                Some(a) => resolve(&rec.to_agent, a).await.ok(),
                None => None,
            }
            .or_else(|| rec.address.parse().ok());
            addr.map(|a| (ctx.clone(), rec.to_agent.clone(), a))
        }
        _ => None,
    };
    let ask = |req: PeerRequest| {
        let peer = peer.clone();
        async move {
            match &peer {
                Some((ctx, agent, addr)) => request(ctx, agent, *addr, &req).await.ok(),
                None => None,
            }
        }
    };
    let mut fin = last.clone();
    match outcome {
        Outcome::Completed | Outcome::Ended => {
            if matches!(outcome, Outcome::Completed) {
                wait_for_end(&entry, run, Duration::from_secs(15)).await;
            }
            let st = entry.status.borrow().clone();
            if st.exit_reason.as_deref() == Some("migrated") {
                fin.phase = "completed".into();
                fin.pages_left = 0;
                fin.error = None;
                let (total, downtime) = parse_migrated_detail(&st.exit_detail);
                if let Some(t) = total {
                    fin.total_ms = t;
                }
                if fin.downtime_ms.is_none() {
                    fin.downtime_ms = downtime;
                }
                // The VM lives on the destination now.
                mgr.remove_entry(&entry, "migrated away");
                confirm_running(&ask, &entry.id).await;
            } else if st.state.is_active() {
                fin.phase = "in-doubt".into();
                fin.error = Some("the migration completed but the source VMM did not exit".into());
            } else {
                fin.phase = "failed".into();
                fin.error = Some(format!(
                    "the source VMM ended during the migration ({}): {}",
                    st.exit_reason.as_deref().unwrap_or("unknown"),
                    st.exit_detail
                ));
                ask(PeerRequest::Abort {
                    id: entry.id.clone(),
                })
                .await;
            }
        }
        Outcome::RolledBack => {
            if let Some(PeerResponse::Aborted { detail }) = ask(PeerRequest::Abort {
                id: entry.id.clone(),
            })
            .await
            {
                debug!(vm = %entry.id, "destination: {detail}");
            }
            refresh(&entry, run).await;
        }
        Outcome::InDoubt => {
            resolve_in_doubt(&mgr, &entry, run, &ask, &mut fin).await;
        }
    }
    if !entry.deleted.load(Ordering::SeqCst) {
        let _ = std::fs::remove_file(entry.dir.join(MIGRATION_FILE));
    }
    info!(vm = %entry.id, phase = %fin.phase, error = ?fin.error, "migration ended");
    if let Some(tx) = &tx {
        let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(fin)).await;
    }
}

/// Waits (briefly) until the destination reports the VM running, so that a finished
/// `MigrateVm` means the destination lists it as running.
async fn confirm_running<F, Fut>(ask: &F, id: &str)
where
    F: Fn(PeerRequest) -> Fut,
    Fut: std::future::Future<Output = Option<PeerResponse>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match ask(PeerRequest::Status { id: id.to_string() }).await {
            Some(PeerResponse::Status { state: Some(s) }) if s == "running" => return,
            None => return,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn refresh(entry: &VmEntry, run: u64) {
    if let Ok(Response::Info(info)) =
        control_call(entry.control(), Request::Info, CONTROL_TIMEOUT).await
    {
        if info.id == entry.id {
            apply_info(entry, run, &info);
        }
    }
}

/// The commit's answer was lost: the destination decides. Running there → release our
/// paused copy; not there → resume here; unreachable → stay paused and in doubt.
async fn resolve_in_doubt<F, Fut>(
    mgr: &VmManager,
    entry: &Arc<VmEntry>,
    run: u64,
    ask: &F,
    fin: &mut Progress,
) where
    F: Fn(PeerRequest) -> Fut,
    Fut: std::future::Future<Output = Option<PeerResponse>>,
{
    for _ in 0..20 {
        match ask(PeerRequest::Status {
            id: entry.id.clone(),
        })
        .await
        {
            Some(PeerResponse::Status { state: Some(s) }) if s == "running" || s == "paused" => {
                warn!(vm = %entry.id, "in doubt: the destination runs the VM; releasing ours");
                let pid = entry.status.borrow().pid.unwrap_or(0);
                kill_and_wait(
                    entry,
                    run,
                    pid,
                    ExitRecord {
                        reason: ExitReason::Migrated,
                        detail: "migration in doubt, resolved: the destination runs the VM".into(),
                    },
                    Duration::from_secs(5),
                )
                .await;
                mgr.remove_entry(entry, "migrated away (in doubt, resolved)");
                fin.phase = "completed".into();
                fin.error = None;
                return;
            }
            Some(PeerResponse::Status { state: Some(s) }) if s == "incoming" => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Some(PeerResponse::Status { state: _ }) => {
                warn!(vm = %entry.id, "in doubt: the destination does not have the VM; resuming it here");
                let _ = control_call(entry.control(), Request::Resume, CONTROL_TIMEOUT).await;
                refresh(entry, run).await;
                fin.phase = "rolled-back".into();
                fin.error = Some(format!(
                    "{}; in doubt, resolved: the destination does not have the VM, resumed here",
                    fin.error.clone().unwrap_or_default()
                ));
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    refresh(entry, run).await;
    fin.error = Some(format!(
        "{}; the destination could not be asked: the VM stays paused here until resolved",
        fin.error.clone().unwrap_or_default()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrated_detail_parses() {
        let (t, d) =
            parse_migrated_detail("migrated to beta in 1234 ms, downtime 12.5 ms, 4 rounds");
        assert_eq!(t, Some(1234.0));
        assert_eq!(d, Some(12.5));
        assert_eq!(parse_migrated_detail("something else"), (None, None));
    }

    #[test]
    fn peer_messages_round_trip() {
        let req = PeerRequest::Prepare {
            vm: VmSpec {
                name: "n".into(),
                id: "0123".into(),
                vcpus: 1,
                memory_mib: 32,
                kernel: "/k".into(),
                initramfs: None,
                cmdline: String::new(),
                entry: EntryProtocol::Long64,
                hugepages: false,
                test_guest: true,
            },
            token: [7; 16],
        };
        let j = serde_json::to_string(&req).unwrap();
        assert!(j.contains("\"op\":\"prepare\""), "{j}");
        assert_eq!(serde_json::from_str::<PeerRequest>(&j).unwrap(), req);
        let a = PeerResponse::Refused { reason: "x".into() };
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<PeerResponse>(&j).unwrap(), a);
    }
}
