//! The rebalancer: on the leader, proposes migrations away from hot or anomalous hosts to hosts
//! that score better, and by policy only lists them (`propose`) or starts them (`act`).
//!
//! The decision is a pure function, [`decide`], of the replicated state, the leader's load
//! snapshot, a [`History`] and a monotonic `now` in milliseconds: no clocks, no I/O. [`run`] is
//! the thin loop that drives it. Hysteresis, so that VMs never ping-pong:
//!
//! 1. A host becomes *pressured* when its CPU reaches `enter` (the scheduler's hot threshold) or
//!    a contention anomaly reaches the anomaly threshold, and stays pressured until it falls
//!    below the lower `exit` thresholds.
//! 2. A VM that moved (or whose move was attempted) stays put for `min_dwell`; a host that was
//!    the source or target of a move is left alone for `host_cooldown`. A new leader counts
//!    every migration it finds done as if it had just ended.
//! 3. Each round examines at most [`MAX_SOURCES_PER_ROUND`] pressured hosts and
//!    [`MAX_VMS_PER_SOURCE`] VMs of each, so its work stays bounded on a large fleet.
//! 4. A move is proposed only when the target's score with the VM beats the source's score by
//!    `min_improvement` points, the target is not pressured, and at most
//!    `max_concurrent` rebalancer migrations run at once; each host takes part in at most one
//!    proposal per round.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::scheduler::{self, Loads, Policy};
use crate::state::{ClusterState, Command, HostState, Reply, Resources};

/// Pressured hosts examined per round, the worst first (bounds a round's work on a large fleet).
pub const MAX_SOURCES_PER_ROUND: usize = 16;
/// VMs of one source tried per round (the starved one, then the largest).
pub const MAX_VMS_PER_SOURCE: usize = 4;

/// What the rebalancer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Mode {
    /// Nothing.
    #[default]
    Off,
    /// Lists proposals (API and events), starts nothing.
    Propose,
    /// Starts the proposed migrations (`requested_by = "rebalancer"`).
    Act,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "off" => Ok(Mode::Off),
            "propose" => Ok(Mode::Propose),
            "act" => Ok(Mode::Act),
            other => Err(format!(
                "unknown rebalance mode {other:?}: expected \"off\", \"propose\" or \"act\""
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::Propose => "propose",
            Mode::Act => "act",
        })
    }
}

/// Tunables. The enter thresholds are the scheduler's ([`scheduler::Thresholds`], in the loads).
#[derive(Debug, Clone)]
pub struct Config {
    /// Off, propose or act.
    pub mode: Mode,
    /// Time between rounds.
    pub interval: Duration,
    /// A pressured host's CPU (per mille) must fall below this to stop being pressured.
    pub exit_cpu_permille: u32,
    /// A pressured host's anomaly score (per mille) must fall below this.
    pub exit_anomaly_permille: u32,
    /// A VM stays at least this long after a move.
    pub min_dwell: Duration,
    /// A host that took part in a move is left alone this long.
    pub host_cooldown: Duration,
    /// Score points (see [`scheduler::score`]) the target must beat the source by.
    pub min_improvement: i64,
    /// Rebalancer migrations in flight at most.
    pub max_concurrent: usize,
    /// Placement policy for scoring.
    pub policy: Policy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::Off,
            interval: Duration::from_secs(10),
            exit_cpu_permille: 700,
            exit_anomaly_permille: 250,
            min_dwell: Duration::from_secs(600),
            host_cooldown: Duration::from_secs(120),
            min_improvement: 500_000,
            max_concurrent: 2,
            policy: Policy::BinPack,
        }
    }
}

/// Why a host is pressured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Pressure {
    hot: bool,
    anomalous: bool,
}

/// What the rebalancer remembers between rounds (in memory on the leader).
#[derive(Debug, Clone, Default)]
pub struct History {
    pressure: BTreeMap<String, Pressure>,
    vm_moved_ms: BTreeMap<String, u64>,
    host_moved_ms: BTreeMap<String, u64>,
    seen_done: BTreeSet<String>,
}

impl History {
    /// Notes a migration the rebalancer just started (or tried to), at `now_ms`.
    pub fn started(&mut self, p: &Proposal, now_ms: u64) {
        self.vm_moved_ms.insert(p.vm_id.clone(), now_ms);
        self.host_moved_ms.insert(p.source_host.clone(), now_ms);
        self.host_moved_ms.insert(p.target_host.clone(), now_ms);
    }

    /// Every migration that ended since the last look (by anyone) restarts its VM's dwell and
    /// its hosts' cool-down.
    fn observe(&mut self, state: &ClusterState, now_ms: u64) {
        for m in state.migrations.values() {
            if m.phase.done() && self.seen_done.insert(m.id.clone()) {
                self.vm_moved_ms.insert(m.vm_id.clone(), now_ms);
                self.host_moved_ms.insert(m.source_host.clone(), now_ms);
                self.host_moved_ms.insert(m.target_host.clone(), now_ms);
            }
        }
        self.seen_done
            .retain(|id| state.migrations.contains_key(id));
    }

    fn update_pressure(&mut self, cfg: &Config, state: &ClusterState, loads: &Loads) {
        let t = loads.thresholds;
        let mut next = BTreeMap::new();
        for id in state.hosts.keys() {
            let Some(l) = loads.hosts.get(id) else {
                continue;
            };
            let was = self.pressure.get(id).copied().unwrap_or_default();
            let hot_at = if was.hot {
                cfg.exit_cpu_permille
            } else {
                t.hot_cpu_permille
            };
            let anomaly_at = if was.anomalous {
                cfg.exit_anomaly_permille
            } else {
                t.anomaly_permille
            };
            let p = Pressure {
                hot: l.cpu_permille >= hot_at,
                anomalous: l.anomaly_permille > 0 && l.anomaly_permille >= anomaly_at,
            };
            if p.hot || p.anomalous {
                next.insert(id.clone(), p);
            }
        }
        self.pressure = next;
    }

    fn pressured(&self, host: &str) -> Option<Pressure> {
        self.pressure.get(host).copied()
    }

    fn within(map: &BTreeMap<String, u64>, key: &str, span: Duration, now_ms: u64) -> bool {
        map.get(key)
            .is_some_and(|t| now_ms.saturating_sub(*t) < span.as_millis() as u64)
    }
}

/// A proposed move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The VM.
    pub vm_id: String,
    /// Its name.
    pub vm_name: String,
    /// From.
    pub source_host: String,
    /// To.
    pub target_host: String,
    /// Why (the source's pressure).
    pub reason: String,
    /// The source's score now.
    pub source_score: i64,
    /// The target's score with the VM.
    pub target_score: i64,
    /// The migration started for it (`act`), else "".
    pub migration_id: String,
}

/// The current proposals, as the leader's rebalancer last computed them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Board {
    /// The mode they were computed in.
    pub mode: Mode,
    /// The proposals of the last round.
    pub proposals: Vec<Proposal>,
}

/// One round: the moves to make now. Updates `history` (pressure, observed migrations).
pub fn decide(
    cfg: &Config,
    state: &ClusterState,
    loads: &Loads,
    history: &mut History,
    now_ms: u64,
) -> Vec<Proposal> {
    history.observe(state, now_ms);
    history.update_pressure(cfg, state, loads);
    let in_flight: Vec<_> = state
        .migrations
        .values()
        .filter(|m| !m.phase.done())
        .collect();
    let ours = in_flight
        .iter()
        .filter(|m| m.requested_by == "rebalancer")
        .count();
    let mut budget = cfg.max_concurrent.saturating_sub(ours);
    // Hosts whose load is in flux or that took part in a move lately sit this round out.
    let mut busy: BTreeSet<String> = in_flight
        .iter()
        .flat_map(|m| [m.source_host.clone(), m.target_host.clone()])
        .collect();
    for id in state.hosts.keys() {
        if History::within(&history.host_moved_ms, id, cfg.host_cooldown, now_ms) {
            busy.insert(id.clone());
        }
    }

    // Sources: anomalous before hot, then the busiest CPU, then host id.
    let mut sources: Vec<(&String, Pressure)> = state
        .hosts
        .values()
        .filter(|h| h.state == HostState::Up && !busy.contains(&h.id))
        .filter_map(|h| history.pressured(&h.id).map(|p| (&h.id, p)))
        .collect();
    sources.sort_by_key(|(id, p)| {
        (
            !p.anomalous,
            std::cmp::Reverse(loads.of(id).cpu_permille),
            (*id).clone(),
        )
    });
    // Targets: up, not pressured, not busy at the start of the round (ascending id).
    let targets: Vec<_> = state
        .hosts
        .values()
        .filter(|h| h.state == HostState::Up && !busy.contains(&h.id))
        .filter(|h| history.pressured(&h.id).is_none())
        .collect();
    if targets.is_empty() {
        return vec![];
    }

    let mut out = Vec::new();
    for (src, pressure) in sources.into_iter().take(MAX_SOURCES_PER_ROUND) {
        if budget == 0 {
            break;
        }
        if busy.contains(src) {
            continue;
        }
        let host = &state.hosts[src];
        let source_score = scheduler::score(host, Resources::default(), cfg.policy, loads);
        let load = loads.of(src);
        // The VM the anomaly names first (it is the one starved), then the largest.
        let victim = load.anomaly.split('/').next().unwrap_or_default();
        let mut candidates: Vec<_> = host
            .vm_ids
            .iter()
            .filter_map(|id| state.vms.get(id))
            .filter(|vm| vm.migration_id.is_empty())
            .filter(|vm| !History::within(&history.vm_moved_ms, &vm.id, cfg.min_dwell, now_ms))
            .collect();
        candidates.sort_by_key(|vm| {
            (
                !(pressure.anomalous && vm.id == victim),
                std::cmp::Reverse((vm.resources.vcpus, vm.resources.memory_mib)),
                vm.id.clone(),
            )
        });
        let reason = match (pressure.anomalous, pressure.hot) {
            (true, _) => format!(
                "{src} has a noisy-neighbour anomaly ({} score {:.2})",
                load.anomaly,
                load.anomaly_permille as f64 / 1000.0
            ),
            (false, _) => format!("{src} is hot (CPU {:.1}%)", load.cpu_permille as f64 / 10.0),
        };
        'vms: for vm in candidates.into_iter().take(MAX_VMS_PER_SOURCE) {
            let req = scheduler::Request {
                resources: vm.resources,
                selector: &BTreeMap::new(),
                anti_affinity_group: &vm.anti_affinity_group,
                exclude: Some(src),
            };
            let Ok(ranked) =
                scheduler::rank_among(targets.iter().copied(), &state.vms, &req, cfg.policy, loads)
            else {
                continue;
            };
            for (target, target_score) in ranked {
                if target_score < source_score.saturating_add(cfg.min_improvement) {
                    // Ranked best first: no later target does better.
                    break;
                }
                if busy.contains(&target) {
                    continue;
                }
                busy.insert(src.clone());
                busy.insert(target.clone());
                budget -= 1;
                out.push(Proposal {
                    vm_id: vm.id.clone(),
                    vm_name: vm.name.clone(),
                    source_host: src.clone(),
                    target_host: target,
                    reason: reason.clone(),
                    source_score,
                    target_score,
                    migration_id: String::new(),
                });
                break 'vms;
            }
        }
    }
    out
}

/// Drives [`decide`] every `cfg.interval` while this node leads; publishes the proposals on the
/// node's board, announces new ones as `rebalancer.proposed` events (`propose`) or starts them
/// (`act`). Runs forever; does nothing when the mode is `off`.
pub async fn run(node: Arc<Node>, cfg: Config) {
    if cfg.mode == Mode::Off {
        return;
    }
    let epoch = Instant::now();
    let mut history: Option<History> = None;
    let mut announced: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut tick = tokio::time::interval(cfg.interval);
    loop {
        tick.tick().await;
        if !node.is_leader() {
            // A new leader starts afresh (and counts every done migration as just ended).
            history = None;
            announced.clear();
            node.set_board(Board {
                mode: cfg.mode,
                proposals: vec![],
            });
            continue;
        }
        let state = node.sm.shared.read().expect("state lock").state.clone();
        let loads = node.loads();
        let now_ms = epoch.elapsed().as_millis() as u64;
        let h = history.get_or_insert_with(History::default);
        let mut proposals = decide(&cfg, &state, &loads, h, now_ms);
        for p in &mut proposals {
            match cfg.mode {
                Mode::Act => {
                    h.started(p, now_ms);
                    let cmd = Command::StartMigration {
                        vm_id: p.vm_id.clone(),
                        target_host: p.target_host.clone(),
                        requested_by: "rebalancer".into(),
                        policy: cfg.policy,
                        loads: Loads::default(),
                    };
                    match node.write(cmd).await {
                        Ok((Reply::Migration(m), _, _)) => {
                            tracing::info!(vm = %p.vm_id, from = %p.source_host, to = %p.target_host, migration = %m.id, reason = %p.reason, "rebalancer started a migration");
                            p.migration_id = m.id;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(vm = %p.vm_id, error = %e, "rebalancer could not start a migration")
                        }
                    }
                }
                Mode::Propose => {
                    let key = (
                        p.vm_id.clone(),
                        p.source_host.clone(),
                        p.target_host.clone(),
                    );
                    if announced.contains(&key) {
                        continue;
                    }
                    let cmd = Command::Notice {
                        kind: "rebalancer.proposed".into(),
                        object_id: p.vm_id.clone(),
                        message: format!(
                            "move {} ({}) {} -> {}: {} (score {} -> {})",
                            p.vm_id,
                            p.vm_name,
                            p.source_host,
                            p.target_host,
                            p.reason,
                            p.source_score,
                            p.target_score
                        ),
                    };
                    match node.write(cmd).await {
                        Ok(_) => {
                            announced.insert(key);
                        }
                        Err(e) => tracing::warn!(error = %e, "rebalancer could not announce"),
                    }
                }
                Mode::Off => {}
            }
        }
        // Forget announcements no longer proposed, so a proposal that comes back is announced.
        announced.retain(|(vm, s, t)| {
            proposals
                .iter()
                .any(|p| &p.vm_id == vm && &p.source_host == s && &p.target_host == t)
        });
        node.set_board(Board {
            mode: cfg.mode,
            proposals,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::{HostLoad, Thresholds};
    use crate::state::{Command, Phase};

    const SEC: u64 = 1000;

    fn cfg() -> Config {
        Config {
            mode: Mode::Act,
            min_dwell: Duration::from_secs(600),
            host_cooldown: Duration::from_secs(60),
            ..Config::default()
        }
    }

    /// Hosts h1..hn (8 vCPU, 8 GiB) and one VM per (name, host, vcpus).
    fn cluster(hosts: usize, vms: &[(&str, &str, u32)]) -> ClusterState {
        let mut s = ClusterState::default();
        let mut index = 0;
        let mut next = || {
            index += 1;
            index
        };
        for i in 1..=hosts {
            s.apply(
                next(),
                &Command::RegisterHost {
                    id: format!("h{i}"),
                    address: format!("h{i}:1"),
                    capacity: Resources {
                        vcpus: 8,
                        memory_mib: 8192,
                    },
                    labels: BTreeMap::new(),
                },
            )
            .unwrap();
        }
        for (name, host, vcpus) in vms {
            // Place by selector-free loads: everyone else anomalous, so the VM lands on `host`.
            let loads = Loads {
                thresholds: Thresholds::default(),
                hosts: (1..=hosts)
                    .map(|i| format!("h{i}"))
                    .filter(|h| h != host)
                    .map(|h| {
                        (
                            h,
                            HostLoad {
                                cpu_permille: 0,
                                anomaly_permille: 1000,
                                anomaly: "x/runqueue_latency_mean_seconds".into(),
                            },
                        )
                    })
                    .collect(),
            };
            let (Reply::Vm(vm), _, _) = s
                .apply(
                    next(),
                    &Command::CreateVm {
                        name: name.to_string(),
                        resources: Resources {
                            vcpus: *vcpus,
                            memory_mib: 512,
                        },
                        labels: BTreeMap::new(),
                        host_selector: BTreeMap::new(),
                        anti_affinity_group: String::new(),
                        start: true,
                        policy: Policy::BinPack,
                        boot: Default::default(),
                        loads,
                    },
                )
                .unwrap()
            else {
                panic!("vm reply")
            };
            assert_eq!(&vm.host_id, host);
        }
        s
    }

    fn vm_id(s: &ClusterState, name: &str) -> String {
        s.vm_names[name].clone()
    }

    /// Loads: (host, cpu per mille, anomaly per mille, anomalous VM name).
    fn loads(s: &ClusterState, list: &[(&str, u32, u32, &str)]) -> Loads {
        Loads {
            thresholds: Thresholds::default(),
            hosts: list
                .iter()
                .map(|(h, cpu, a, vm)| {
                    let anomaly = if vm.is_empty() {
                        String::new()
                    } else {
                        format!("{}/runqueue_latency_mean_seconds", vm_id(s, vm))
                    };
                    (
                        h.to_string(),
                        HostLoad {
                            cpu_permille: *cpu,
                            anomaly_permille: *a,
                            anomaly,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Applies a proposal as a migration that succeeds.
    fn migrate(s: &mut ClusterState, index: u64, p: &Proposal) {
        s.apply(
            index,
            &Command::StartMigration {
                vm_id: p.vm_id.clone(),
                target_host: p.target_host.clone(),
                requested_by: "rebalancer".into(),
                policy: Policy::BinPack,
                loads: Loads::default(),
            },
        )
        .unwrap();
        s.apply(
            index + 1,
            &Command::ReportMigration {
                id: format!("mig-{index}"),
                phase: Phase::Succeeded,
                bytes_done: 1,
                bytes_total: 1,
                error: String::new(),
            },
        )
        .unwrap();
    }

    #[test]
    fn a_hot_host_gets_a_proposal_for_its_largest_vm_to_a_cool_host() {
        let s = cluster(
            3,
            &[("small", "h1", 1), ("big", "h1", 4), ("other", "h2", 1)],
        );
        let l = loads(
            &s,
            &[("h1", 950, 0, ""), ("h2", 900, 0, ""), ("h3", 100, 0, "")],
        );
        let mut h = History::default();
        let p = decide(&cfg(), &s, &l, &mut h, 0);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (
                p[0].vm_name.as_str(),
                p[0].source_host.as_str(),
                p[0].target_host.as_str()
            ),
            ("big", "h1", "h3"),
            "the hottest host first, its largest VM, to the only cool host"
        );
        assert!(p[0].reason.contains("hot (CPU 95.0%)"), "{}", p[0].reason);
        assert!(p[0].target_score >= p[0].source_score + cfg().min_improvement);
    }

    #[test]
    fn an_anomalous_host_moves_the_starved_vm_first() {
        let s = cluster(2, &[("big", "h1", 4), ("victim", "h1", 1)]);
        let l = loads(&s, &[("h1", 300, 800, "victim"), ("h2", 300, 0, "")]);
        let p = decide(&cfg(), &s, &l, &mut History::default(), 0);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].vm_name.as_str(), p[0].target_host.as_str()),
            ("victim", "h2")
        );
        assert!(p[0].reason.contains("noisy-neighbour"), "{}", p[0].reason);
    }

    #[test]
    fn below_the_thresholds_nothing_is_proposed() {
        let s = cluster(2, &[("a", "h1", 4), ("b", "h1", 2)]);
        // Busy but not hot, an anomaly below its threshold, one on a series that does not
        // count (filtered before it gets here), and hosts without a heartbeat.
        let l = loads(&s, &[("h1", 840, 490, "a"), ("h2", 0, 0, "")]);
        assert!(decide(&cfg(), &s, &l, &mut History::default(), 0).is_empty());
        assert!(decide(&cfg(), &s, &Loads::default(), &mut History::default(), 0).is_empty());
        // Hot everywhere: no target beats the source by the margin.
        let l = loads(&s, &[("h1", 990, 0, ""), ("h2", 900, 0, "")]);
        assert!(decide(&cfg(), &s, &l, &mut History::default(), 0).is_empty());
    }

    #[test]
    fn hysteresis_keeps_a_host_pressured_until_it_falls_below_exit() {
        let s = cluster(2, &[("a", "h1", 1)]);
        let mut h = History::default();
        let c = Config {
            min_improvement: 0,
            ..cfg()
        };
        // h2 enters at 85%, then at 80% is still pressured (exit 70%): not a target.
        decide(
            &c,
            &s,
            &loads(&s, &[("h1", 100, 0, ""), ("h2", 860, 0, "")]),
            &mut h,
            0,
        );
        let l = loads(&s, &[("h1", 900, 0, ""), ("h2", 800, 0, "")]);
        assert!(decide(&c, &s, &l, &mut h, SEC).is_empty());
        // At 60% it has left; h1 (90%) is hot: h2 takes its VM.
        let l = loads(&s, &[("h1", 900, 0, ""), ("h2", 600, 0, "")]);
        let p = decide(&c, &s, &l, &mut h, 2 * SEC);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].target_host, "h2");
    }

    #[test]
    fn after_a_move_the_reverse_move_waits_for_the_dwell_time_even_if_loads_swap() {
        let mut s = cluster(2, &[("a", "h1", 2)]);
        let c = Config {
            host_cooldown: Duration::ZERO,
            ..cfg()
        };
        let mut h = History::default();
        let p = decide(
            &c,
            &s,
            &loads(&s, &[("h1", 950, 0, ""), ("h2", 100, 0, "")]),
            &mut h,
            0,
        );
        assert_eq!(p.len(), 1);
        h.started(&p[0], 0);
        migrate(&mut s, 100, &p[0]);
        assert_eq!(s.vms[&vm_id(&s, "a")].host_id, "h2");
        // Loads swap: h2 hot, h1 cool. Within the dwell time (counted from when the move was
        // seen to end, at 1 s) the VM stays.
        let swapped = loads(&s, &[("h1", 100, 0, ""), ("h2", 950, 900, "a")]);
        for t in [SEC, 60 * SEC, 600 * SEC] {
            assert!(decide(&c, &s, &swapped, &mut h, t).is_empty(), "at {t} ms");
        }
        // After it, the move back is proposed.
        let p = decide(&c, &s, &swapped, &mut h, 601 * SEC);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].source_host.as_str(), p[0].target_host.as_str()),
            ("h2", "h1")
        );
    }

    #[test]
    fn a_new_leader_counts_every_done_migration_as_just_ended() {
        let mut s = cluster(2, &[("a", "h1", 2)]);
        let mut h = History::default();
        let p = decide(
            &cfg(),
            &s,
            &loads(&s, &[("h1", 950, 0, ""), ("h2", 100, 0, "")]),
            &mut h,
            0,
        );
        migrate(&mut s, 100, &p[0]);
        // Fresh history (another leader), loads swapped: nothing within the dwell time.
        let swapped = loads(&s, &[("h1", 100, 0, ""), ("h2", 950, 0, "")]);
        let mut fresh = History::default();
        assert!(decide(&cfg(), &s, &swapped, &mut fresh, 5_000 * SEC).is_empty());
        assert_eq!(
            decide(&cfg(), &s, &swapped, &mut fresh, 5_600 * SEC).len(),
            1
        );
    }

    #[test]
    fn cooldown_and_the_concurrency_cap_limit_moves() {
        let s = cluster(
            6,
            &[
                ("a", "h1", 1),
                ("b", "h2", 1),
                ("c", "h3", 1),
                ("d", "h4", 1),
            ],
        );
        let hot = loads(
            &s,
            &[
                ("h1", 990, 0, ""),
                ("h2", 980, 0, ""),
                ("h3", 970, 0, ""),
                ("h4", 960, 0, ""),
                ("h5", 100, 0, ""),
                ("h6", 100, 0, ""),
            ],
        );
        let mut h = History::default();
        let c = Config {
            max_concurrent: 3,
            ..cfg()
        };
        // Two cool targets, each takes one VM per round: two proposals (cap 3 not reached).
        let p = decide(&c, &s, &hot, &mut h, 0);
        let moves: Vec<(&str, &str)> = p
            .iter()
            .map(|p| (p.source_host.as_str(), p.target_host.as_str()))
            .collect();
        assert_eq!(moves, [("h1", "h5"), ("h2", "h6")]);
        for x in &p {
            h.started(x, 0);
        }
        // The targets cool down: nothing more until the cool-down passes.
        assert!(decide(&c, &s, &hot, &mut h, 59 * SEC).is_empty());
        assert_eq!(decide(&c, &s, &hot, &mut h, 60 * SEC).len(), 2);
        // With a cap of 1 only one proposal per round.
        let one = Config {
            max_concurrent: 1,
            ..cfg()
        };
        assert_eq!(decide(&one, &s, &hot, &mut History::default(), 0).len(), 1);
    }

    #[test]
    fn in_flight_rebalancer_migrations_count_against_the_cap_and_block_their_hosts() {
        let mut s = cluster(4, &[("a", "h1", 1), ("b", "h2", 1)]);
        s.apply(
            100,
            &Command::StartMigration {
                vm_id: vm_id(&s, "a"),
                target_host: "h3".into(),
                requested_by: "rebalancer".into(),
                policy: Policy::BinPack,
                loads: Loads::default(),
            },
        )
        .unwrap();
        let l = loads(
            &s,
            &[
                ("h1", 990, 0, ""),
                ("h2", 990, 0, ""),
                ("h3", 0, 0, ""),
                ("h4", 0, 0, ""),
            ],
        );
        let one = Config {
            max_concurrent: 1,
            ..cfg()
        };
        assert!(decide(&one, &s, &l, &mut History::default(), 0).is_empty());
        let p = decide(&cfg(), &s, &l, &mut History::default(), 0);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].vm_name.as_str(), p[0].target_host.as_str()),
            ("b", "h4")
        );
    }

    #[test]
    fn a_round_examines_at_most_the_worst_sources() {
        // h1..h17 hot (h1 hottest); the VMs of h1..h16 fill a host and fit nowhere, only h17's
        // small VM would fit on h18. The round stops after the 16 worst sources.
        let names: Vec<String> = (1..=18).map(|i| format!("v{i}")).collect();
        let hosts: Vec<String> = (1..=18).map(|i| format!("h{i}")).collect();
        let vms: Vec<(&str, &str, u32)> = (0..18)
            .map(|i| {
                (
                    names[i].as_str(),
                    hosts[i].as_str(),
                    if i < 16 { 8 } else { 1 },
                )
            })
            .collect();
        let s = cluster(18, &vms);
        let list: Vec<(&str, u32, u32, &str)> = (0..18)
            .map(|i| {
                (
                    hosts[i].as_str(),
                    if i < 17 { 999 - i as u32 } else { 100 },
                    0,
                    "",
                )
            })
            .collect();
        let l = loads(&s, &list);
        assert_eq!(MAX_SOURCES_PER_ROUND, 16);
        assert!(decide(&cfg(), &s, &l, &mut History::default(), 0).is_empty());
        // Once h1 cools down below the exit threshold, h17 is among the 16 worst.
        let mut cooler = list.clone();
        cooler[0].1 = 100;
        let p = decide(&cfg(), &s, &loads(&s, &cooler), &mut History::default(), 0);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].source_host.as_str(), p[0].target_host.as_str()),
            ("h17", "h18")
        );
    }

    #[test]
    fn decisions_are_a_function_of_their_inputs() {
        let s = cluster(3, &[("a", "h1", 2), ("b", "h1", 2), ("c", "h2", 1)]);
        let l = loads(
            &s,
            &[
                ("h1", 950, 0, ""),
                ("h2", 200, 700, "c"),
                ("h3", 100, 0, ""),
            ],
        );
        let first = decide(&cfg(), &s, &l, &mut History::default(), 0);
        for _ in 0..3 {
            assert_eq!(decide(&cfg(), &s, &l, &mut History::default(), 0), first);
        }
        assert_eq!("act".parse::<Mode>().unwrap(), Mode::Act);
        assert!("auto".parse::<Mode>().unwrap_err().contains("expected"));
    }
}
