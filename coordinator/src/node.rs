//! One coordinator: the Raft node, leader forwarding, freshness of reads, and host liveness.
//!
//! Knows nothing of the public gRPC API (`api` adapts it). Writes go to the leader: a follower
//! forwards them over the Raft transport. A leader that has not heard from a quorum within
//! `2 × election timeout` (and cannot confirm it with one heartbeat round) refuses writes
//! before proposing anything, so a minority never takes a write it cannot commit.
//!
//! Host liveness is in memory on the leader: a heartbeat updates `last seen` and utilisation
//! there and writes nothing to Raft. Only transitions go through Raft: a host not seen for
//! `down_after` becomes Down (its VM records stay), and a heartbeat from a Down host brings it Up.
//! A new leader starts every host's clock afresh, so a failover never marks hosts down.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_proto::coordinator::v1::raft_transport_client::RaftTransportClient;
use novacron_proto::coordinator::v1::RaftPayload;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::rebalancer::Board;
use crate::scheduler::{HostLoad, Loads, Policy, Thresholds};
use crate::state::{Command, HostState, Reply, StateError};
use crate::store::{Applying, NodeId, Proposal, StateMachineStore, TypeConfig};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Errors of the coordinator core; mapped to gRPC status codes in `api::status`.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum CoreError {
    /// The state machine refused the command (nothing changed).
    #[error(transparent)]
    State(#[from] StateError),
    /// No leader is known, or the leader has lost its quorum.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The leader could not be reached to forward the request.
    #[error("leader {leader} at {addr} unreachable: {reason}")]
    LeaderUnreachable {
        /// Leader id.
        leader: NodeId,
        /// Its address.
        addr: String,
        /// Transport error.
        reason: String,
    },
    /// The write was proposed but not known to be committed in time; it may still commit.
    #[error("write not confirmed within {0:?}; it may or may not have been applied")]
    Uncertain(Duration),
    /// A membership change failed.
    #[error("membership change: {0}")]
    Membership(String),
    /// Raft is shutting down or failed.
    #[error("raft: {0}")]
    Raft(String),
}

/// Requests a follower hands to the leader.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// A write.
    Write(Command),
    /// A host heartbeat (in memory on the leader).
    Heartbeat(Heartbeat),
    /// Confirm leadership and return the index a linearizable read must wait for.
    ReadIndex,
    /// Add a voter.
    AddMember(NodeId, String),
    /// Remove a voter.
    RemoveMember(NodeId),
    /// The rebalancer's current proposals.
    Proposals,
}

/// The leader's answer.
// Short-lived (serialized at once); boxing the reply would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardReply {
    /// Write applied at this index.
    Written(Reply, u64, NodeId),
    /// Heartbeat taken.
    Heartbeat(HostState, NodeId),
    /// Read index.
    ReadIndex(u64, NodeId),
    /// Membership changed.
    Members,
    /// The rebalancer's proposals.
    Proposals(Board, NodeId),
    /// Failed.
    Error(CoreError),
}

/// What a host reports every few seconds; kept in memory on the leader.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Heartbeat {
    /// Host id.
    pub host_id: String,
    /// CPU utilisation 0..1.
    pub cpu_utilisation: f64,
    /// Memory used.
    pub memory_used_mib: u64,
    /// VMs the agent runs (for reconciliation).
    pub running_vms: Vec<String>,
    /// Active anomalies the agent's detector reports on its VMs.
    #[serde(default)]
    pub anomalies: Vec<VmAnomaly>,
    /// Every VM the agent holds, with its state (for reconciliation).
    #[serde(default)]
    pub vms: Vec<crate::agents::AgentVm>,
}

/// One active anomaly on a VM, as its host's agent reports it (kept in memory with the heartbeat).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct VmAnomaly {
    /// The VM.
    pub vm_id: String,
    /// The telemetry series that is abnormal.
    pub series: String,
    /// Score in [0, 1].
    pub score: f64,
    /// Window start, Unix milliseconds.
    pub start_unix_ms: i64,
    /// Window end, Unix milliseconds.
    pub end_unix_ms: i64,
}

/// In-memory liveness of one host on the leader.
#[derive(Debug, Clone)]
pub struct Liveness {
    /// Last heartbeat (or when this node became leader).
    pub last_seen: Instant,
    /// Last report, if any since this node became leader.
    pub last: Option<Heartbeat>,
    /// Applied log index when the last report arrived.
    pub applied_at: u64,
}

/// Tunables.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node.
    pub id: NodeId,
    /// gRPC address peers and clients use.
    pub addr: String,
    /// Placement policy.
    pub policy: Policy,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval: Duration,
    /// Silence after which a host is Down.
    pub down_after: Duration,
    /// How long a write may wait for its commit.
    pub write_timeout: Duration,
    /// Election timeout minimum (ms).
    pub election_timeout_ms: u64,
    /// When a host counts as hot or anomalous for placement.
    pub thresholds: Thresholds,
    /// This node's certificate and the cluster CA, for dialing peers.
    pub tls: crate::tls::NodeTls,
}

/// How fresh a read is.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// Applied index when read.
    pub applied_index: u64,
    /// Served by the leader.
    pub served_by_leader: bool,
    /// Known leader.
    pub leader_id: NodeId,
    /// This node.
    pub node_id: NodeId,
    /// Confirmed with a quorum.
    pub linearizable: bool,
}

/// One coordinator node.
pub struct Node {
    /// The Raft handle.
    pub raft: Raft<TypeConfig>,
    /// The state machine (shared state, events, applied index).
    pub sm: StateMachineStore,
    /// Tunables.
    pub opts: Options,
    liveness: Mutex<HashMap<String, Liveness>>,
    /// The agents' command sessions on this node.
    pub sessions: crate::session::Sessions,
    peers: Mutex<HashMap<String, RaftTransportClient<Channel>>>,
    quorum_ok_at: Mutex<Option<Instant>>,
    board: Mutex<Board>,
    quorum_check: tokio::sync::Mutex<()>,
    batcher: mpsc::UnboundedSender<Pending>,
    /// Entries in flight (shared with the batcher, which holds one while it waits).
    slots: Arc<Semaphore>,
}

/// A client write waiting for the batcher.
type Pending = (Command, oneshot::Sender<Result<(Reply, u64), CoreError>>);

/// Most commands in one log entry.
const MAX_BATCH: usize = 512;
/// Entries proposed and not yet committed at a time. While they are in flight, new writes
/// queue up and go out together in the next entry (group commit).
const IN_FLIGHT: usize = 4;

/// Packs queued client writes into one [`Proposal`] per log entry and hands each writer its
/// own result. A lone write goes out at once, alone; under load the writes that arrive while
/// [`IN_FLIGHT`] entries are being committed share the next one. Runs until the node is dropped.
async fn batcher(
    raft: Raft<TypeConfig>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    write_timeout: Duration,
    slots: Arc<Semaphore>,
) {
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            propose(&raft, batch, write_timeout).await;
        });
    }
}

/// Proposes `batch` as one entry and answers each writer.
async fn propose(raft: &Raft<TypeConfig>, batch: Vec<Pending>, write_timeout: Duration) {
    let (cmds, waiters): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
    let n = cmds.len();
    let res = tokio::time::timeout(write_timeout, raft.client_write(Proposal(cmds))).await;
    let fail = |e: CoreError, waiters: Vec<oneshot::Sender<_>>| {
        for w in waiters {
            let _ = w.send(Err(e.clone()));
        }
    };
    match res {
        Err(_) => fail(CoreError::Uncertain(write_timeout), waiters),
        Ok(Ok(resp)) => {
            let index = resp.log_id.index;
            if resp.data.0.len() != n {
                let e = CoreError::Raft(format!(
                    "entry {index} carried {n} commands but applied {}",
                    resp.data.0.len()
                ));
                return fail(e, waiters);
            }
            for (w, r) in waiters.into_iter().zip(resp.data.0) {
                let _ = w.send(r.map(|reply| (reply, index)).map_err(CoreError::from));
            }
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => fail(
            CoreError::NoQuorum(format!(
                "leadership moved to {:?} while writing; retry",
                f.leader_id
            )),
            waiters,
        ),
        Ok(Err(e)) => fail(CoreError::Raft(e.to_string()), waiters),
    }
}

impl Node {
    /// Wraps a started Raft node.
    pub fn new(raft: Raft<TypeConfig>, sm: StateMachineStore, opts: Options) -> Arc<Node> {
        let (tx, rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(batcher(raft.clone(), rx, opts.write_timeout, slots.clone()));
        Arc::new(Node {
            batcher: tx,
            slots,
            raft,
            sm,
            opts,
            liveness: Mutex::new(HashMap::new()),
            sessions: Default::default(),
            peers: Mutex::new(HashMap::new()),
            quorum_ok_at: Mutex::new(None),
            board: Mutex::new(Board::default()),
            quorum_check: tokio::sync::Mutex::new(()),
        })
    }

    /// The leader as this node knows it, with its address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.opts.id)
    }

    /// Refuses, before proposing anything, when this leader cannot confirm within
    /// `2 × election timeout` that a majority still follows it. Under load every commit
    /// confirms it, so the check costs nothing; an idle leader confirms with one heartbeat round.
    async fn check_quorum(&self) -> Result<(), CoreError> {
        let voters = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count();
        if voters <= 1 {
            return Ok(());
        }
        let limit = Duration::from_millis(2 * self.opts.election_timeout_ms.max(1));
        let fresh = || {
            self.quorum_ok_at
                .lock()
                .expect("quorum lock")
                .is_some_and(|t| t.elapsed() < limit)
        };
        if fresh() {
            return Ok(());
        }
        // One check at a time: a burst of writes after an idle spell waits for one heartbeat
        // round instead of starting one each (hundreds of rounds at once overloaded the
        // followers and failed some checks).
        let _one = self.quorum_check.lock().await;
        if fresh() {
            return Ok(());
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = match tokio::time::timeout(left, self.raft.ensure_linearizable()).await {
                Ok(Ok(_)) => {
                    self.confirm_quorum();
                    return Ok(());
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    return Err(CoreError::NoQuorum(format!(
                        "node {} is no longer the leader (now {:?})",
                        self.opts.id, f.leader_id
                    )));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".to_string(),
            };
            // A round that missed a majority (followers slow under load, or gone): try again
            // until the limit, then refuse.
            if Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(CoreError::NoQuorum(format!(
                    "leader {} could not confirm its leadership with a majority of the {voters} voters within {} ms: {e}",
                    self.opts.id,
                    limit.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn confirm_quorum(&self) {
        *self.quorum_ok_at.lock().expect("quorum lock") = Some(Instant::now());
    }

    fn no_leader(&self) -> CoreError {
        let m = self.raft.metrics().borrow().clone();
        let voters = m.membership_config.membership().voter_ids().count();
        CoreError::NoQuorum(format!(
            "node {} knows no leader ({:?}, term {}); a majority of the {voters} voters is not reachable or an election is under way",
            self.opts.id, m.state, m.current_term
        ))
    }

    fn peer(&self, id: NodeId, addr: &str) -> Result<RaftTransportClient<Channel>, CoreError> {
        let mut peers = self.peers.lock().expect("peers lock");
        let key = format!("{id}@{addr}");
        if let Some(c) = peers.get(&key) {
            return Ok(c.clone());
        }
        let ch = self
            .opts
            .tls
            .peer_channel(id, addr, self.opts.write_timeout + Duration::from_secs(1))
            .map_err(|e| CoreError::Raft(format!("peer address {addr:?}: {e}")))?;
        let c = RaftTransportClient::new(ch);
        peers.insert(key, c.clone());
        Ok(c)
    }

    async fn forward(&self, req: ForwardRequest) -> Result<ForwardReply, CoreError> {
        let Some((leader, addr)) = self.leader() else {
            return Err(self.no_leader());
        };
        if leader == self.opts.id {
            return Ok(self.handle_forwarded(req).await);
        }
        let mut client = self.peer(leader, &addr)?;
        let payload = RaftPayload {
            json: serde_json::to_vec(&req).expect("forward request serializes"),
        };
        let reply = client
            .forward(payload)
            .await
            .map_err(|s| CoreError::LeaderUnreachable {
                leader,
                addr: addr.clone(),
                reason: s.message().to_string(),
            })?
            .into_inner();
        let r: ForwardReply = serde_json::from_slice(&reply.json)
            .map_err(|e| CoreError::Raft(format!("undecodable reply from leader {leader}: {e}")))?;
        match r {
            ForwardReply::Error(e) => Err(e),
            r => Ok(r),
        }
    }

    /// Serves a request forwarded by a follower (or by this node to itself).
    pub async fn handle_forwarded(&self, req: ForwardRequest) -> ForwardReply {
        let r = match req {
            ForwardRequest::Write(cmd) => self
                .write_local(cmd)
                .await
                .map(|(r, i)| ForwardReply::Written(r, i, self.opts.id)),
            ForwardRequest::Heartbeat(hb) => self
                .heartbeat_local(hb)
                .await
                .map(|s| ForwardReply::Heartbeat(s, self.opts.id)),
            ForwardRequest::ReadIndex => self
                .read_index_local()
                .await
                .map(|i| ForwardReply::ReadIndex(i, self.opts.id)),
            ForwardRequest::AddMember(id, addr) => self
                .add_member_local(id, addr)
                .await
                .map(|_| ForwardReply::Members),
            ForwardRequest::RemoveMember(id) => self
                .remove_member_local(id)
                .await
                .map(|_| ForwardReply::Members),
            ForwardRequest::Proposals => Ok(ForwardReply::Proposals(self.board(), self.opts.id)),
        };
        r.unwrap_or_else(ForwardReply::Error)
    }

    /// Commits `cmd` through Raft (forwarding to the leader) and returns the reply and index.
    pub async fn write(&self, cmd: Command) -> Result<(Reply, u64, NodeId), CoreError> {
        crate::state::validate(&cmd)?;
        if self.is_leader() {
            let (r, i) = self.write_local(cmd).await?;
            return Ok((r, i, self.opts.id));
        }
        match self.forward(ForwardRequest::Write(cmd)).await? {
            ForwardReply::Written(r, i, l) => Ok((r, i, l)),
            other => Err(CoreError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    async fn write_local(&self, cmd: Command) -> Result<(Reply, u64), CoreError> {
        if !self.is_leader() {
            return Err(CoreError::NoQuorum(format!(
                "node {} is no longer the leader",
                self.opts.id
            )));
        }
        self.check_quorum().await?;
        let (tx, rx) = oneshot::channel();
        // Nothing in flight (the idle batcher holds one slot): a lone write is proposed right
        // here, sparing it the hand-offs to the batcher and its task. Otherwise it queues and
        // shares the next entry.
        let inline = if self.slots.available_permits() == IN_FLIGHT - 1 {
            self.slots.clone().try_acquire_owned().ok()
        } else {
            None
        };
        match inline {
            Some(_permit) => {
                propose(
                    &self.raft,
                    vec![(self.with_loads(cmd), tx)],
                    self.opts.write_timeout,
                )
                .await
            }
            None => self
                .batcher
                .send((self.with_loads(cmd), tx))
                .map_err(|_| CoreError::Raft("the write batcher stopped".into()))?,
        }
        let res = tokio::time::timeout(self.opts.write_timeout, rx)
            .await
            .map_err(|_| CoreError::Uncertain(self.opts.write_timeout))?
            .map_err(|_| CoreError::Raft("the write batcher dropped a write".into()))?;
        match res {
            // Committed (even if the state machine refused it): a majority follows us.
            Ok(_) | Err(CoreError::State(_)) => self.confirm_quorum(),
            Err(_) => {}
        }
        res
    }

    /// Puts the load inputs this leader scores with (the hosts that are hot or anomalous) into a
    /// command that places a VM, so that every replica computes the same placement.
    fn with_loads(&self, mut cmd: Command) -> Command {
        match &mut cmd {
            Command::CreateVm { loads, .. } | Command::MoveVm { loads, .. } => {
                *loads = self.placement_loads()
            }
            Command::StartMigration {
                loads, target_host, ..
            } if target_host.is_empty() => *loads = self.placement_loads(),
            _ => {}
        }
        cmd
    }

    /// The load inputs of placement: this node's thresholds and the load of every host that
    /// heartbeated since this node became leader (in-memory liveness).
    pub fn loads(&self) -> Loads {
        self.loads_where(|_, _| true)
    }

    fn loads_where(&self, keep: impl Fn(&Thresholds, &HostLoad) -> bool) -> Loads {
        let t = self.opts.thresholds;
        let l = self.liveness.lock().expect("liveness lock");
        Loads {
            thresholds: t,
            hosts: l
                .iter()
                .filter_map(|(id, live)| {
                    let hb = live.last.as_ref()?;
                    let load = HostLoad::from_report(hb.cpu_utilisation, &hb.anomalies);
                    keep(&t, &load).then(|| (id.clone(), load))
                })
                .collect(),
        }
    }

    /// [`Node::loads`] of the hosts that are hot or anomalous only (what a command carries),
    /// without building the whole fleet's map first.
    fn placement_loads(&self) -> Loads {
        self.loads_where(|t, l| t.hot(l) || t.anomalous(l))
    }

    /// The rebalancer's proposals on this node.
    pub fn board(&self) -> Board {
        self.board.lock().expect("board lock").clone()
    }

    /// Publishes the rebalancer's proposals.
    pub fn set_board(&self, b: Board) {
        *self.board.lock().expect("board lock") = b;
    }

    /// The leader's rebalancer proposals (forwarded to the leader).
    pub async fn proposals(&self) -> Result<(Board, NodeId), CoreError> {
        if self.is_leader() {
            return Ok((self.board(), self.opts.id));
        }
        match self.forward(ForwardRequest::Proposals).await? {
            ForwardReply::Proposals(b, l) => Ok((b, l)),
            other => Err(CoreError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Reads the state with freshness metadata; `consistent` waits for a linearizable point.
    pub async fn read<T>(
        &self,
        consistent: bool,
        f: impl FnOnce(&Applying) -> T,
    ) -> Result<(T, Freshness), CoreError> {
        let mut linearizable = false;
        if consistent {
            let (index, _) = if self.is_leader() {
                (self.read_index_local().await?, self.opts.id)
            } else {
                match self.forward(ForwardRequest::ReadIndex).await? {
                    ForwardReply::ReadIndex(i, l) => (i, l),
                    other => return Err(CoreError::Raft(format!("unexpected reply {other:?}"))),
                }
            };
            let mut rx = self.sm.applied_tx.subscribe();
            tokio::time::timeout(self.opts.write_timeout, rx.wait_for(|a| *a >= index))
                .await
                .map_err(|_| {
                    CoreError::NoQuorum(format!(
                        "node {} did not catch up to index {index} in time",
                        self.opts.id
                    ))
                })?
                .map_err(|e| CoreError::Raft(e.to_string()))?;
            linearizable = true;
        }
        let g = self.sm.shared.read().expect("state lock");
        let leader = self.leader().map(|l| l.0).unwrap_or(0);
        let fresh = Freshness {
            applied_index: g.applied.map(|l| l.index).unwrap_or(0),
            served_by_leader: leader == self.opts.id,
            leader_id: leader,
            node_id: self.opts.id,
            linearizable,
        };
        Ok((f(&g), fresh))
    }

    /// The index a linearizable read must wait for: every entry in the leader's log when the
    /// read arrived, once its leadership is confirmed by a quorum.
    ///
    /// openraft's own read index (`max(noop, committed)`) is not enough after a restart: a
    /// leader that restarts keeps its term and vote, proposes no new blank entry, and reloads a
    /// `committed` that may be behind the last write it acknowledged before it died (committed
    /// is not fsynced). Its read index would then miss that acknowledged write until the next
    /// commit. Every acknowledged write is in the leader's log (Raft's leader completeness), so
    /// waiting until the last entry in the log is applied covers them all; the cost is that a
    /// read also waits for writes still in flight when it arrived.
    async fn read_index_local(&self) -> Result<u64, CoreError> {
        self.check_quorum().await?;
        let last = self
            .sm
            .log_last_index
            .load(std::sync::atomic::Ordering::SeqCst);
        let r = tokio::time::timeout(self.opts.write_timeout, self.raft.get_read_log_id())
            .await
            .map_err(|_| CoreError::NoQuorum("leadership not confirmed in time".into()))?;
        match r {
            Ok((read, _applied)) => Ok(read.map(|l| l.index).unwrap_or(0).max(last)),
            Err(e) => Err(CoreError::NoQuorum(e.to_string())),
        }
    }

    /// Takes a heartbeat (forwarded to the leader; in memory there).
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<(HostState, NodeId), CoreError> {
        if self.is_leader() {
            return Ok((self.heartbeat_local(hb).await?, self.opts.id));
        }
        match self.forward(ForwardRequest::Heartbeat(hb)).await? {
            ForwardReply::Heartbeat(s, l) => Ok((s, l)),
            other => Err(CoreError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    async fn heartbeat_local(&self, hb: Heartbeat) -> Result<HostState, CoreError> {
        let (state, applied_at) = {
            let g = self.sm.shared.read().expect("state lock");
            (
                g.state.hosts.get(&hb.host_id).map(|h| h.state),
                g.applied.map(|l| l.index).unwrap_or(0),
            )
        };
        let Some(state) = state else {
            return Err(StateError::NotFound {
                kind: "host".into(),
                id: hb.host_id,
            }
            .into());
        };
        let id = hb.host_id.clone();
        self.liveness.lock().expect("liveness lock").insert(
            id.clone(),
            Liveness {
                last_seen: Instant::now(),
                last: Some(hb),
                applied_at,
            },
        );
        if state == HostState::Down {
            let (r, _) = self
                .write_local(Command::SetHostState {
                    id,
                    state: HostState::Up,
                })
                .await?;
            if let Reply::Host(h) = r {
                return Ok(h.state);
            }
        }
        Ok(state)
    }

    /// The agents' latest inventories (in memory on the leader), by host.
    pub fn inventories(&self) -> crate::agents::Inventories {
        self.liveness
            .lock()
            .expect("liveness lock")
            .iter()
            .filter_map(|(id, l)| {
                let hb = l.last.as_ref()?;
                Some((
                    id.clone(),
                    crate::agents::Inventory {
                        index: l.applied_at,
                        vms: hb.vms.clone(),
                    },
                ))
            })
            .collect()
    }

    /// The leader's in-memory view of a host's liveness.
    pub fn liveness(&self, host: &str) -> Option<Liveness> {
        self.liveness
            .lock()
            .expect("liveness lock")
            .get(host)
            .cloned()
    }

    /// Marks silent hosts Down while this node leads. Runs forever.
    pub async fn liveness_loop(self: Arc<Self>) {
        let mut was_leader = false;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let leader = self.is_leader();
            if leader && !was_leader {
                // A new leader gives every host a full period before judging it.
                let now = Instant::now();
                let mut l = self.liveness.lock().expect("liveness lock");
                l.clear();
                let g = self.sm.shared.read().expect("state lock");
                for id in g.state.hosts.keys() {
                    l.insert(
                        id.clone(),
                        Liveness {
                            last_seen: now,
                            last: None,
                            applied_at: 0,
                        },
                    );
                }
            }
            was_leader = leader;
            if !leader {
                continue;
            }
            let silent: Vec<String> = {
                let now = Instant::now();
                let mut l = self.liveness.lock().expect("liveness lock");
                let g = self.sm.shared.read().expect("state lock");
                g.state
                    .hosts
                    .values()
                    .filter(|h| h.state != HostState::Down)
                    .filter(|h| {
                        let e = l.entry(h.id.clone()).or_insert(Liveness {
                            last_seen: now,
                            last: None,
                            applied_at: 0,
                        });
                        now.duration_since(e.last_seen) > self.opts.down_after
                    })
                    .map(|h| h.id.clone())
                    .collect()
            };
            for id in silent {
                tracing::warn!(host = %id, "missed heartbeats: marking down");
                if let Err(e) = self
                    .write_local(Command::SetHostState {
                        id: id.clone(),
                        state: HostState::Down,
                    })
                    .await
                {
                    tracing::warn!(host = %id, error = %e, "could not mark host down");
                }
            }
        }
    }

    /// Adds a voter (learner first, then promotion), forwarding to the leader.
    pub async fn add_member(&self, id: NodeId, addr: String) -> Result<(), CoreError> {
        if self.is_leader() {
            return self.add_member_local(id, addr).await;
        }
        self.forward(ForwardRequest::AddMember(id, addr))
            .await
            .map(|_| ())
    }

    async fn add_member_local(&self, id: NodeId, addr: String) -> Result<(), CoreError> {
        self.check_quorum().await?;
        self.raft
            .add_learner(id, BasicNode { addr }, true)
            .await
            .map_err(|e| CoreError::Membership(e.to_string()))?;
        let mut voters: BTreeSet<NodeId> = self.voters().into_keys().collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| CoreError::Membership(e.to_string()))?;
        Ok(())
    }

    /// Removes a voter, forwarding to the leader.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), CoreError> {
        if self.is_leader() {
            return self.remove_member_local(id).await;
        }
        self.forward(ForwardRequest::RemoveMember(id))
            .await
            .map(|_| ())
    }

    async fn remove_member_local(&self, id: NodeId) -> Result<(), CoreError> {
        self.check_quorum().await?;
        let mut voters: BTreeSet<NodeId> = self.voters().into_keys().collect();
        if !voters.remove(&id) {
            return Err(CoreError::Membership(format!("node {id} is not a voter")));
        }
        if voters.is_empty() {
            return Err(CoreError::Membership(
                "cannot remove the last voter".to_string(),
            ));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| CoreError::Membership(e.to_string()))?;
        Ok(())
    }

    /// Current voters and their addresses.
    pub fn voters(&self) -> BTreeMap<NodeId, String> {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        mem.voter_ids()
            .filter_map(|id| mem.get_node(&id).map(|n| (id, n.addr.clone())))
            .collect()
    }
}
