//! The leader's I/O around [`crate::agents`]: one driver per agent `Commands` stream, and the
//! drain loop. The decisions themselves are the pure functions of `agents`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::agents::{self, AgentCommand};
use crate::node::Node;

/// How often a driver re-plans when nothing was applied meanwhile (inventories change with
/// heartbeats, which write nothing).
const TICK: Duration = Duration::from_millis(200);
/// A command (or write) planned again is sent again only after this long: the agent answers
/// through its inventory, which lags a little.
const RESEND: Duration = Duration::from_secs(10);
/// Migrations a drain keeps under way per host.
const DRAIN_PARALLEL: usize = 2;

/// The agents' command sessions on one node: the newest session of a host wins, an older one
/// ends at its next step.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    current: Mutex<HashMap<String, u64>>,
}

impl Sessions {
    fn open(&self, host: &str) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.current
            .lock()
            .expect("sessions lock")
            .insert(host.to_string(), id);
        id
    }

    fn is_current(&self, host: &str, id: u64) -> bool {
        self.current.lock().expect("sessions lock").get(host) == Some(&id)
    }
}

/// Drives host `host`'s agent while it holds its command stream (`tx`) and this node leads.
pub async fn drive(node: Arc<Node>, host: String, tx: mpsc::Sender<AgentCommand>) {
    let session = node.sessions.open(&host);
    tracing::info!(%host, session, "agent session opened");
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut migrations = BTreeSet::new();
    let mut applied = node.sm.applied_tx.subscribe();
    loop {
        if tx.is_closed() || !node.is_leader() || !node.sessions.is_current(&host, session) {
            break;
        }
        let inv = node.inventories();
        let plan = {
            let g = node.sm.shared.read().expect("state lock");
            agents::plan(&g.state, &host, &inv, &migrations)
        };
        for w in plan.writes {
            let key = format!("{w:?}");
            if sent.get(&key).is_some_and(|t| t.elapsed() < RESEND) {
                continue;
            }
            sent.insert(key, Instant::now());
            tracing::info!(%host, write = ?w, "reconciling");
            if let Err(e) = node.write(w).await {
                tracing::warn!(%host, error = %e, "reconcile write refused");
            }
        }
        for c in plan.commands {
            if let AgentCommand::Migrate { migration_id, .. } = &c {
                migrations.insert(migration_id.clone());
            }
            let key = c.key();
            if sent.get(&key).is_some_and(|t| t.elapsed() < RESEND) {
                continue;
            }
            sent.insert(key, Instant::now());
            tracing::info!(%host, command = ?c, "to agent");
            if tx.send(c).await.is_err() {
                break;
            }
        }
        sent.retain(|_, t| t.elapsed() < RESEND);
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = tx.closed() => {}
        }
    }
    tracing::info!(%host, session, "agent session closed");
}

/// Starts migrations away from draining hosts while this node leads. Runs forever.
pub async fn drain_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut refused: HashMap<String, Instant> = HashMap::new();
    loop {
        tick.tick().await;
        if !node.is_leader() {
            continue;
        }
        let starts = {
            let g = node.sm.shared.read().expect("state lock");
            agents::drain(&g.state, DRAIN_PARALLEL, node.opts.policy)
        };
        refused.retain(|_, t| t.elapsed() < RESEND);
        for cmd in starts {
            let key = format!("{cmd:?}");
            if refused.contains_key(&key) {
                continue;
            }
            match node.write(cmd).await {
                Ok((r, _, _)) => tracing::info!(reply = ?r, "drain: migration started"),
                Err(e) => {
                    tracing::warn!(error = %e, "drain: cannot start a migration yet");
                    refused.insert(key, Instant::now());
                }
            }
        }
    }
}
