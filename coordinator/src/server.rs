//! Starts a coordinator: opens the store, starts Raft, bootstraps the initial membership when the
//! store is fresh, and serves the public API, the Raft transport and `grpc.health.v1` on one
//! TLS port, with every API and transport call checked by [`crate::auth`] first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use novacron_proto::coordinator::v1::coordinator_server::CoordinatorServer;
use novacron_proto::coordinator::v1::raft_transport_server::RaftTransportServer;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};

use crate::api::Api;
use crate::auth::{Authorizer, Guard, TokenVerifier};
use crate::network::{Network, TransportService};
use crate::node::{Node, Options};
use crate::rebalancer::{self, Board};
use crate::scheduler::{Policy, Thresholds};
use crate::store::{self, NodeId};
use crate::tls::NodeTls;

/// Everything needed to run one coordinator.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This node's id (non-zero).
    pub id: NodeId,
    /// Listen address (also what peers and clients dial).
    pub listen: SocketAddr,
    /// Data directory (holds `raft.redb`).
    pub data_dir: PathBuf,
    /// Cluster directory: `ca.pem`, this node's `coord-<id>.pem`/`.key`, `token.pub`.
    pub cluster_dir: PathBuf,
    /// The initial voters (id → address) used only when the store is fresh. Empty: wait to be
    /// added to an existing cluster.
    pub initial_members: BTreeMap<NodeId, String>,
    /// Placement policy.
    pub policy: Policy,
    /// Build a snapshot (and compact the log) every this many applied entries.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (for slow followers).
    pub keep_after_snapshot: u64,
    /// Agents' heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Silence after which a host is Down.
    pub down_after: Duration,
    /// When a host counts as hot or anomalous (placement, and the rebalancer's enter thresholds).
    pub thresholds: Thresholds,
    /// The rebalancer.
    pub rebalance: rebalancer::Config,
}

impl ServerConfig {
    /// Defaults for a single node at `listen` with data in `data_dir`.
    pub fn single(id: NodeId, listen: SocketAddr, data_dir: PathBuf) -> ServerConfig {
        let mut initial_members = BTreeMap::new();
        initial_members.insert(id, listen.to_string());
        ServerConfig {
            id,
            listen,
            data_dir,
            cluster_dir: PathBuf::from("/etc/novacron/cluster"),
            initial_members,
            policy: Policy::BinPack,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            heartbeat_interval: Duration::from_secs(5),
            down_after: Duration::from_secs(15),
            thresholds: Thresholds::default(),
            rebalance: rebalancer::Config::default(),
        }
    }
}

/// Errors starting a coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// This node's certificate, the CA or the token key cannot be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The token verifying key cannot be loaded.
    #[error("token key: {0}")]
    Token(#[from] crate::auth::TokenError),
    /// The gRPC server's TLS configuration was refused.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] tonic::transport::Error),
    /// The data directory or store.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Raft could not start.
    #[error("raft: {0}")]
    Raft(String),
    /// The gRPC server failed.
    #[error("serve {addr}: {source}")]
    Serve {
        /// Listen address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if cfg.id == 0 {
        return Err(ServerError::Config("node id must be non-zero".into()));
    }
    if !cfg.initial_members.is_empty() && !cfg.initial_members.contains_key(&cfg.id) {
        return Err(ServerError::Config(format!(
            "initial members {:?} do not include this node's id {}",
            cfg.initial_members, cfg.id
        )));
    }
    let cluster_dir = novacron_migration::certs::ClusterDir::new(&cfg.cluster_dir);
    let tls = NodeTls::load(&cluster_dir, cfg.id)?;
    let verifier = TokenVerifier::load(&cfg.cluster_dir)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| ServerError::Config(format!("data dir {}: {e}", cfg.data_dir.display())))?;
    let (log, sm) = store::open(&cfg.data_dir)?;
    let election_min = 400;
    let raft_cfg = Config {
        cluster_name: "novacron".into(),
        heartbeat_interval: 100,
        election_timeout_min: election_min,
        election_timeout_max: 2 * election_min,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        max_in_snapshot_log_to_keep: cfg.keep_after_snapshot,
        purge_batch_size: (cfg.snapshot_every / 4).clamp(1, 256),
        max_payload_entries: 1024,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ServerError::Config(e.to_string()))?;
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_cfg),
        Network { tls: tls.clone() },
        log,
        sm.clone(),
    )
    .await
    .map_err(|e| ServerError::Raft(e.to_string()))?;

    let lowest = cfg.initial_members.keys().next().copied();
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    if !initialized && lowest == Some(cfg.id) {
        let members: BTreeMap<NodeId, BasicNode> = cfg
            .initial_members
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        tracing::info!(?members, "bootstrapping a new cluster");
        raft.initialize(members)
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
    }

    let node = Node::new(
        raft.clone(),
        sm,
        Options {
            id: cfg.id,
            addr: cfg.listen.to_string(),
            policy: cfg.policy,
            heartbeat_interval: cfg.heartbeat_interval,
            down_after: cfg.down_after,
            write_timeout: Duration::from_secs(5),
            election_timeout_ms: election_min,
            thresholds: cfg.thresholds,
            tls: tls.clone(),
        },
    );
    tokio::spawn(node.clone().liveness_loop());
    node.set_board(Board {
        mode: cfg.rebalance.mode,
        proposals: vec![],
    });
    let mut rebalance = cfg.rebalance.clone();
    rebalance.policy = cfg.policy;
    tokio::spawn(rebalancer::run(node.clone(), rebalance));
    tokio::spawn(crate::session::drain_loop(node.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<Api>>().await;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServerError::Config(format!("bind {}: {e}", cfg.listen)))?;
    tracing::info!(id = cfg.id, addr = %cfg.listen, "coordinator serving");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let metrics = raft.metrics();
    let auth = Authorizer::new(
        verifier,
        Arc::new(move || {
            let ids: std::collections::BTreeSet<NodeId> = metrics
                .borrow()
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect();
            (!ids.is_empty()).then_some(ids)
        }),
    );
    let res = tonic::transport::Server::builder()
        .tls_config(tls.server())
        .map_err(ServerError::TlsConfig)?
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(Guard::new(
            RaftTransportServer::new(TransportService { node: node.clone() }),
            auth.clone(),
        ))
        .add_service(Guard::new(
            CoordinatorServer::new(Api { node: node.clone() }),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = raft.shutdown().await;
    res.map_err(|source| ServerError::Serve {
        addr: cfg.listen,
        source,
    })
}
