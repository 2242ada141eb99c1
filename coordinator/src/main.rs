//! `novacron-coordinator`: run a site coordinator (`run`), create the cluster CA, coordinator
//! certificates and token keys (`init`), mint bearer tokens (`token`) and print a novacronctl
//! context (`context`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use novacron_coordinator::auth::{self, Role};
use novacron_coordinator::rebalancer::Mode;
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
    /// Create the cluster CA and the token keys in DIR when there are none (existing files are
    /// kept), and issue coordinator certificates.
    Init {
        /// Cluster directory (CA and certificates).
        #[arg(long, default_value = "/etc/novacron/cluster")]
        cluster_dir: PathBuf,
        /// Cluster name written into the CA.
        #[arg(long, default_value = "novacron")]
        cluster: String,
        /// Issue (or re-issue) the certificate of coordinator ID, `coord-ID.pem`/`.key`
        /// (repeatable).
        #[arg(long = "issue", value_name = "ID")]
        issue: Vec<u64>,
    },
    /// Print a bearer token for the public API, signed with the cluster's token key.
    Token {
        /// Cluster directory (holds `token.key`).
        #[arg(long, default_value = "/etc/novacron/cluster")]
        cluster_dir: PathBuf,
        /// viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Who holds the token (a person or program).
        #[arg(long)]
        subject: String,
        /// Validity, e.g. 90s, 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Print a novacronctl context file (TOML) with a fresh token.
    Context {
        /// Cluster directory (holds `ca.pem` and `token.key`).
        #[arg(long, default_value = "/etc/novacron/cluster")]
        cluster_dir: PathBuf,
        /// Coordinator endpoint HOST:PORT (repeatable; tried in order).
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<String>,
        /// viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Who holds the token.
        #[arg(long)]
        subject: String,
        /// Validity, e.g. 24h.
        #[arg(long, default_value = "24h")]
        ttl: String,
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
        /// Cluster directory: `ca.pem`, `coord-<id>.pem`/`.key`, `token.pub`.
        #[arg(long, default_value = "/etc/novacron/cluster")]
        cluster_dir: PathBuf,
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
        #[command(flatten)]
        sched: SchedArgs,
        /// Heartbeat interval the agents are told, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        heartbeat_interval_ms: u64,
    },
}

/// Anomaly-aware scoring and the rebalancer.
#[derive(clap::Args)]
struct SchedArgs {
    /// CPU utilisation (percent) at or above which a host is hot: it scores lower, and the
    /// rebalancer moves VMs away from it.
    #[arg(long, default_value_t = 85.0)]
    hot_cpu_percent: f64,
    /// Score (0..1) at or above which a noisy-neighbour anomaly makes its host score lower, and
    /// the rebalancer moves VMs away from it.
    #[arg(long, default_value_t = 0.5)]
    anomaly_score: f64,
    /// Rebalancer: off, propose (list proposals, act on none) or act (start migrations).
    #[arg(long, default_value = "off")]
    rebalance: Mode,
    /// Milliseconds between rebalancer rounds.
    #[arg(long, default_value_t = 10_000)]
    rebalance_interval_ms: u64,
    /// A hot host stays hot until its CPU (percent) falls below this.
    #[arg(long, default_value_t = 70.0)]
    rebalance_exit_cpu_percent: f64,
    /// An anomalous host stays so until its anomaly score falls below this.
    #[arg(long, default_value_t = 0.25)]
    rebalance_exit_anomaly_score: f64,
    /// Seconds a VM stays on its host after a move before it may move again.
    #[arg(long, default_value_t = 600)]
    rebalance_dwell_secs: u64,
    /// Seconds a host that took part in a move is left alone.
    #[arg(long, default_value_t = 120)]
    rebalance_cooldown_secs: u64,
    /// Score points a target must beat the source by (1,000,000 = a full host's reservations;
    /// a hot host loses 4,000,000, an anomalous one 8,000,000).
    #[arg(long, default_value_t = 500_000)]
    rebalance_min_improvement: i64,
    /// Rebalancer migrations in flight at most.
    #[arg(long, default_value_t = 2)]
    rebalance_max_concurrent: usize,
}

fn permille(flag: &str, v: f64, max: f64) -> anyhow::Result<u32> {
    if !(0.0..=max).contains(&v) {
        bail!("invalid --{flag} {v}: expected a number in 0..={max}");
    }
    Ok((v / max * 1000.0).round() as u32)
}

impl SchedArgs {
    fn apply(&self, cfg: &mut ServerConfig) -> anyhow::Result<()> {
        cfg.thresholds.hot_cpu_permille = permille("hot-cpu-percent", self.hot_cpu_percent, 100.0)?;
        cfg.thresholds.anomaly_permille = permille("anomaly-score", self.anomaly_score, 1.0)?;
        let r = &mut cfg.rebalance;
        r.mode = self.rebalance;
        if self.rebalance_interval_ms == 0 {
            bail!("invalid --rebalance-interval-ms 0: expected at least 1");
        }
        r.interval = Duration::from_millis(self.rebalance_interval_ms);
        r.exit_cpu_permille = permille(
            "rebalance-exit-cpu-percent",
            self.rebalance_exit_cpu_percent,
            100.0,
        )?;
        r.exit_anomaly_permille = permille(
            "rebalance-exit-anomaly-score",
            self.rebalance_exit_anomaly_score,
            1.0,
        )?;
        if r.exit_cpu_permille > cfg.thresholds.hot_cpu_permille {
            bail!(
                "invalid --rebalance-exit-cpu-percent {}: expected at most --hot-cpu-percent {} (a host leaves the hot state below where it enters it)",
                self.rebalance_exit_cpu_percent,
                self.hot_cpu_percent
            );
        }
        if r.exit_anomaly_permille > cfg.thresholds.anomaly_permille {
            bail!(
                "invalid --rebalance-exit-anomaly-score {}: expected at most --anomaly-score {} (a host leaves the anomalous state below where it enters it)",
                self.rebalance_exit_anomaly_score,
                self.anomaly_score
            );
        }
        r.min_dwell = Duration::from_secs(self.rebalance_dwell_secs);
        r.host_cooldown = Duration::from_secs(self.rebalance_cooldown_secs);
        if self.rebalance_min_improvement < 0 {
            bail!(
                "invalid --rebalance-min-improvement {}: expected 0 or more",
                self.rebalance_min_improvement
            );
        }
        r.min_improvement = self.rebalance_min_improvement;
        r.max_concurrent = self.rebalance_max_concurrent;
        Ok(())
    }
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
            issue,
        } => {
            let dir = ClusterDir::new(&cluster_dir);
            if dir.ca_cert_path().exists() {
                println!("cluster CA exists: {}", dir.ca_cert_path().display());
            } else {
                for p in dir.init(&cluster)? {
                    println!("wrote {}", p.display());
                }
            }
            let keys = auth::init_keys(&cluster_dir)?;
            if keys.is_empty() {
                println!(
                    "token keys exist: {}",
                    auth::verify_key_path(&cluster_dir).display()
                );
            }
            if issue.contains(&0) {
                bail!("invalid --issue 0: expected a non-zero coordinator id");
            }
            for id in issue {
                for p in dir.issue_coordinator(id)? {
                    println!("wrote {}", p.display());
                }
            }
            for p in keys {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Token {
            cluster_dir,
            role,
            subject,
            ttl,
        } => {
            let signer = auth::TokenSigner::load(&cluster_dir)?;
            println!("{}", signer.mint(&subject, role, auth::parse_ttl(&ttl)?)?);
            Ok(())
        }
        Cmd::Context {
            cluster_dir,
            endpoints,
            role,
            subject,
            ttl,
        } => {
            for e in &endpoints {
                e.parse::<SocketAddr>()
                    .with_context(|| format!("invalid --endpoint {e:?}: expected HOST:PORT"))?;
            }
            let signer = auth::TokenSigner::load(&cluster_dir)?;
            let token = signer.mint(&subject, role, auth::parse_ttl(&ttl)?)?;
            let ca = std::fs::canonicalize(ClusterDir::new(&cluster_dir).ca_cert_path())
                .context("the cluster CA")?;
            let ctx = serde_json::json!({
                "endpoints": endpoints,
                "ca": ca,
                "token": token,
            });
            // TOML's basic strings and arrays are JSON's for these values.
            println!("# novacronctl context: {subject} ({role})");
            for k in ["endpoints", "ca", "token"] {
                println!("{k} = {}", ctx[k]);
            }
            Ok(())
        }
        Cmd::Run {
            id,
            listen,
            data_dir,
            cluster_dir,
            initial_members,
            join,
            policy,
            snapshot_every,
            keep_after_snapshot,
            down_after_secs,
            sched,
            heartbeat_interval_ms,
        } => {
            if heartbeat_interval_ms == 0 {
                bail!("invalid --heartbeat-interval-ms 0: expected a positive number");
            }
            let mut cfg = ServerConfig::single(id, listen, data_dir);
            cfg.cluster_dir = cluster_dir;
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
            sched.apply(&mut cfg)?;
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
