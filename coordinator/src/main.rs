//! `novacron-coordinator`: run a site coordinator (`run`) or create the cluster CA (`init`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use novacron_coordinator::scheduler::Policy;
use novacron_coordinator::server::{self, ServerConfig};
use novacron_migration::certs::ClusterDir;

#[derive(Parser)]
#[command(name = "novacron-coordinator", about = "NovaCron site coordinator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA in DIR when there is none (existing files are kept).
    Init {
        /// Cluster directory (CA and certificates).
        #[arg(long, default_value = "/etc/novacron/cluster")]
        cluster_dir: PathBuf,
        /// Cluster name written into the CA.
        #[arg(long, default_value = "novacron")]
        cluster: String,
    },
    /// Run a coordinator node.
    Run {
        /// Node id (non-zero, unique in the cluster).
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// gRPC listen address (public API, Raft transport and health).
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// Data directory.
        #[arg(long, default_value = "/var/lib/novacron/coordinator")]
        data_dir: PathBuf,
        /// Initial voters "1=host:port,2=host:port,..." for a fresh cluster (default: this node
        /// alone). The lowest id bootstraps.
        #[arg(long)]
        initial_members: Option<String>,
        /// Start without bootstrapping: wait to be added to an existing cluster (AddMember).
        #[arg(long)]
        join: bool,
        /// Placement policy: binpack or spread.
        #[arg(long, default_value = "binpack")]
        policy: Policy,
        /// Snapshot (and compact the log) every N applied entries.
        #[arg(long, default_value_t = 10_000)]
        snapshot_every: u64,
        /// Log entries kept behind a snapshot.
        #[arg(long, default_value_t = 1_000)]
        keep_after_snapshot: u64,
        /// Seconds of heartbeat silence after which a host is marked down.
        #[arg(long, default_value_t = 15)]
        down_after_secs: u64,
        /// Heartbeat interval the agents are told, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        heartbeat_interval_ms: u64,
    },
}

fn parse_members(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let Some((id, addr)) = part.split_once('=') else {
            bail!("invalid --initial-members entry {part:?}: expected ID=HOST:PORT");
        };
        let id: u64 = id.parse().with_context(|| {
            format!("invalid node id {id:?} in --initial-members: expected a number")
        })?;
        addr.parse::<SocketAddr>().with_context(|| {
            format!("invalid address {addr:?} in --initial-members: expected HOST:PORT")
        })?;
        out.insert(id, addr.to_string());
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().cmd {
        Cmd::Init {
            cluster_dir,
            cluster,
        } => {
            let dir = ClusterDir::new(cluster_dir);
            if dir.ca_cert_path().exists() {
                println!("cluster CA exists: {}", dir.ca_cert_path().display());
            } else {
                for p in dir.init(&cluster)? {
                    println!("wrote {}", p.display());
                }
            }
            Ok(())
        }
        Cmd::Run {
            id,
            listen,
            data_dir,
            initial_members,
            join,
            policy,
            snapshot_every,
            keep_after_snapshot,
            down_after_secs,
            heartbeat_interval_ms,
        } => {
            if heartbeat_interval_ms == 0 {
                bail!("invalid --heartbeat-interval-ms 0: expected a positive number");
            }
            let mut cfg = ServerConfig::single(id, listen, data_dir);
            if let Some(m) = initial_members {
                cfg.initial_members = parse_members(&m)?;
            }
            if join {
                cfg.initial_members.clear();
            }
            cfg.policy = policy;
            cfg.snapshot_every = snapshot_every;
            cfg.keep_after_snapshot = keep_after_snapshot;
            cfg.down_after = Duration::from_secs(down_after_secs);
            cfg.heartbeat_interval = Duration::from_millis(heartbeat_interval_ms);
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            };
            server::run(cfg, shutdown).await?;
            Ok(())
        }
    }
}
