//! Placement: filters (state, capacity, labels, anti-affinity) then scores (bin-pack or spread).
//!
//! Pure and deterministic: every coordinator applies the same placement to the same state, so
//! placement runs inside the replicated state machine. Measured load (CPU utilisation and
//! noisy-neighbour anomalies from heartbeats) lives only in the leader's memory, so the leader
//! puts the [`Loads`] it used into the command; replicas score with those, in integer
//! arithmetic. Ties break on the host id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::node::VmAnomaly;
use crate::state::{Host, HostState, Resources, Vm};

/// How to score hosts that pass the filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Policy {
    /// Fill the fullest host that fits first (fewer hosts in use).
    #[default]
    BinPack,
    /// Put the VM on the emptiest host (even load).
    Spread,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "binpack" | "bin-pack" => Ok(Policy::BinPack),
            "spread" => Ok(Policy::Spread),
            other => Err(format!(
                "unknown placement policy {other:?}: expected \"binpack\" or \"spread\""
            )),
        }
    }
}

/// What a VM asks of its host.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Resources to reserve.
    pub resources: Resources,
    /// Labels the host must carry.
    pub selector: &'a BTreeMap<String, String>,
    /// No two VMs of this group on one host ("" = none).
    pub anti_affinity_group: &'a str,
    /// Hosts not to consider (e.g. a migration's source).
    pub exclude: Option<&'a str>,
}

/// Why no host fits, counted per filter (for a clear error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejections {
    /// Hosts that are down or draining.
    pub not_up: usize,
    /// Hosts without room.
    pub capacity: usize,
    /// Hosts missing a selected label.
    pub labels: usize,
    /// Hosts already running a VM of the anti-affinity group.
    pub anti_affinity: usize,
    /// Hosts excluded by the request.
    pub excluded: usize,
}

impl std::fmt::Display for Rejections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} not up, {} without capacity, {} without the selected labels, {} anti-affinity conflicts, {} excluded",
            self.not_up, self.capacity, self.labels, self.anti_affinity, self.excluded
        )
    }
}

/// Telemetry series (the agent's names, `docs/design/telemetry.md`) whose anomalies mean a VM is
/// starved by its neighbours: it waits for a CPU, or other threads take its CPU. An anomaly on
/// any other series (exits, page faults, memory, ...) is the VM's own behaviour and does not
/// make its host less attractive.
pub const CONTENTION_SERIES: [&str; 4] = [
    "runqueue_latency_mean_seconds",
    "vcpu_runqueue_wait_ratio",
    "preemptions_per_second",
    "vcpu_involuntary_switches_per_second",
];

/// Score points of a full host (utilisation is scored in parts per million).
pub const FULL: i64 = 1_000_000;
/// Points a hot host loses per per-mille of measured CPU utilisation, on top of
/// [`HOT_PENALTY`] (the hotter, the lower): at most a quarter of a full host.
pub const CPU_WEIGHT: i64 = 250;
/// Points a hot host loses: more than the whole range of reservation and CPU points, so a hot
/// host is chosen only when no cool one fits.
pub const HOT_PENALTY: i64 = 4 * FULL;
/// Points a host with an active contention anomaly loses (plus 1,000 per per-mille of the
/// anomaly score): below every hot host, so such a host is chosen only when no other fits.
pub const ANOMALY_PENALTY: i64 = 8 * FULL;

/// When a host counts as hot or anomalous. Carried in the command with the loads, so a change
/// of configuration never makes replicas disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    /// CPU utilisation (per mille) at or above which a host is hot.
    pub hot_cpu_permille: u32,
    /// Contention anomaly score (per mille) at or above which a host is anomalous.
    pub anomaly_permille: u32,
}

impl Thresholds {
    /// Whether `l` is at or above the hot CPU threshold.
    pub fn hot(&self, l: &HostLoad) -> bool {
        l.cpu_permille >= self.hot_cpu_permille
    }

    /// Whether `l` has an active contention anomaly at or above the threshold.
    pub fn anomalous(&self, l: &HostLoad) -> bool {
        l.anomaly_permille > 0 && l.anomaly_permille >= self.anomaly_permille
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            hot_cpu_permille: 850,
            anomaly_permille: 500,
        }
    }
}

/// What the leader knew of one host's load when it proposed a command. Integers, so that
/// scoring is exact arithmetic on every replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLoad {
    /// Measured CPU utilisation, per mille (0..=1000).
    pub cpu_permille: u32,
    /// Highest score of an active anomaly on a [`CONTENTION_SERIES`] among the host's VMs, per
    /// mille (0 = none).
    pub anomaly_permille: u32,
    /// The VM and series of that anomaly (for reasons shown to people).
    pub anomaly: String,
}

impl HostLoad {
    /// The load a heartbeat reports: CPU utilisation (a fraction, clamped to 0..=1) and the
    /// strongest anomaly on a contention series.
    pub fn from_report(cpu_utilisation: f64, anomalies: &[VmAnomaly]) -> HostLoad {
        let permille = |x: f64| (x.clamp(0.0, 1.0) * 1000.0).round() as u32;
        let mut load = HostLoad {
            cpu_permille: permille(cpu_utilisation),
            ..Default::default()
        };
        for a in anomalies {
            if !CONTENTION_SERIES.contains(&a.series.as_str()) || !a.score.is_finite() {
                continue;
            }
            let s = permille(a.score);
            if s > load.anomaly_permille {
                load.anomaly_permille = s;
                load.anomaly = format!("{}/{}", a.vm_id, a.series);
            }
        }
        load
    }
}

/// The load inputs of one placement: thresholds and each host's load as the proposing leader
/// saw it. A host without an entry (no heartbeat yet, or neither hot nor anomalous) counts as
/// healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loads {
    /// When a host is hot or anomalous.
    pub thresholds: Thresholds,
    /// Load per host id.
    pub hosts: BTreeMap<String, HostLoad>,
}

impl Loads {
    /// The load of `host` (idle when unknown).
    pub fn of(&self, host: &str) -> HostLoad {
        self.hosts.get(host).cloned().unwrap_or_default()
    }

    /// Whether `host` is at or above the hot CPU threshold.
    pub fn hot(&self, host: &str) -> bool {
        self.hosts.get(host).is_some_and(|l| self.thresholds.hot(l))
    }

    /// Whether `host` has an active contention anomaly at or above the threshold.
    pub fn anomalous(&self, host: &str) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|l| self.thresholds.anomalous(l))
    }

    /// Only the hosts that are hot or anomalous: the rest score the same without an entry. What
    /// a command carries, so that its size grows with the hosts in trouble, not with the fleet.
    pub fn pressured(mut self) -> Loads {
        let t = self.thresholds;
        self.hosts.retain(|_, l| t.hot(l) || t.anomalous(l));
        self
    }
}

/// Picks a host for `req`, or says why every host was rejected.
pub fn place(
    hosts: &BTreeMap<String, Host>,
    vms: &BTreeMap<String, Vm>,
    req: &Request<'_>,
    policy: Policy,
    loads: &Loads,
) -> Result<String, Rejections> {
    let ranked = rank(hosts, vms, req, policy, loads)?;
    Ok(ranked
        .into_iter()
        .next()
        .expect("rank returns at least one host")
        .0)
}

/// Every host that passes the filters with its score, best first; ties keep host id order.
/// Fails, counting the rejections per filter, when no host passes.
pub fn rank(
    hosts: &BTreeMap<String, Host>,
    vms: &BTreeMap<String, Vm>,
    req: &Request<'_>,
    policy: Policy,
    loads: &Loads,
) -> Result<Vec<(String, i64)>, Rejections> {
    rank_among(hosts.values(), vms, req, policy, loads)
}

/// [`rank`] over some of the hosts, given in ascending id order.
pub fn rank_among<'a>(
    hosts: impl IntoIterator<Item = &'a Host>,
    vms: &BTreeMap<String, Vm>,
    req: &Request<'_>,
    policy: Policy,
    loads: &Loads,
) -> Result<Vec<(String, i64)>, Rejections> {
    let mut rej = Rejections::default();
    let mut out = Vec::new();
    for h in hosts {
        let id = &h.id;
        if req.exclude == Some(id.as_str()) {
            rej.excluded += 1;
            continue;
        }
        if h.state != HostState::Up {
            rej.not_up += 1;
            continue;
        }
        if !fits(h, &req.resources) {
            rej.capacity += 1;
            continue;
        }
        if !req.selector.iter().all(|(k, v)| h.labels.get(k) == Some(v)) {
            rej.labels += 1;
            continue;
        }
        if !req.anti_affinity_group.is_empty()
            && h.vm_ids.iter().any(|v| {
                vms.get(v)
                    .is_some_and(|vm| vm.anti_affinity_group == req.anti_affinity_group)
            })
        {
            rej.anti_affinity += 1;
            continue;
        }
        out.push((id.clone(), score(h, req.resources, policy, loads)));
    }
    if out.is_empty() {
        return Err(rej);
    }
    // Stable: equal scores keep the (ascending) host id order.
    out.sort_by_key(|h| std::cmp::Reverse(h.1));
    Ok(out)
}

fn fits(h: &Host, r: &Resources) -> bool {
    h.allocated.vcpus as u64 + r.vcpus as u64 <= h.capacity.vcpus as u64
        && h.allocated.memory_mib + r.memory_mib <= h.capacity.memory_mib
}

/// A host's score with `add` placed on it (higher is better), in integer points:
/// - reservations after placing `add` (mean of the CPU and memory fractions, 1,000,000 = full):
///   added for bin-pack (fill the fullest), subtracted for spread (the emptiest);
/// - when hot, minus [`HOT_PENALTY`] and [`CPU_WEIGHT`] per per-mille of measured CPU;
/// - minus [`ANOMALY_PENALTY`] plus 1,000 per per-mille of score when anomalous.
///
/// So a healthy host beats a hot one, which beats an anomalous one, whatever the policy.
pub fn score(h: &Host, add: Resources, policy: Policy, loads: &Loads) -> i64 {
    let ppm = |used: u64, cap: u64| -> i64 {
        if cap == 0 {
            FULL
        } else {
            (used as u128 * FULL as u128 / cap as u128).min(u64::MAX as u128) as i64
        }
    };
    let after = (ppm(
        h.allocated.vcpus as u64 + add.vcpus as u64,
        h.capacity.vcpus as u64,
    ) + ppm(
        h.allocated.memory_mib + add.memory_mib,
        h.capacity.memory_mib,
    ))
    .min(2 * FULL)
        / 2;
    let load = loads.of(&h.id);
    let mut s = match policy {
        Policy::BinPack => after,
        Policy::Spread => -after,
    };
    if loads.hot(&h.id) {
        s -= HOT_PENALTY + CPU_WEIGHT * load.cpu_permille as i64;
    }
    if loads.anomalous(&h.id) {
        s -= ANOMALY_PENALTY + 1000 * load.anomaly_permille as i64;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::VmDesired;

    fn host(id: &str, vcpus: u32, mem: u64, used_vcpus: u32, used_mem: u64) -> Host {
        Host {
            id: id.into(),
            address: format!("{id}:1"),
            capacity: Resources {
                vcpus,
                memory_mib: mem,
            },
            allocated: Resources {
                vcpus: used_vcpus,
                memory_mib: used_mem,
            },
            labels: BTreeMap::new(),
            state: HostState::Up,
            vm_ids: vec![],
            draining: false,
        }
    }

    fn hosts(list: Vec<Host>) -> BTreeMap<String, Host> {
        list.into_iter().map(|h| (h.id.clone(), h)).collect()
    }

    fn req(vcpus: u32, mem: u64, sel: &BTreeMap<String, String>) -> Request<'_> {
        Request {
            resources: Resources {
                vcpus,
                memory_mib: mem,
            },
            selector: sel,
            anti_affinity_group: "",
            exclude: None,
        }
    }

    #[test]
    fn binpack_picks_fullest_host_that_fits_and_spread_the_emptiest() {
        let none = BTreeMap::new();
        let hs = hosts(vec![
            host("a", 8, 8192, 1, 1024),
            host("b", 8, 8192, 6, 6144),
            host("c", 8, 8192, 7, 7800),
        ]);
        let vms = BTreeMap::new();
        // c cannot fit 2 vCPUs; b is the fullest that fits.
        assert_eq!(
            place(
                &hs,
                &vms,
                &req(2, 1024, &none),
                Policy::BinPack,
                &Loads::default()
            )
            .unwrap(),
            "b"
        );
        assert_eq!(
            place(
                &hs,
                &vms,
                &req(2, 1024, &none),
                Policy::Spread,
                &Loads::default()
            )
            .unwrap(),
            "a"
        );
    }

    #[test]
    fn capacity_filter_rejects_and_counts() {
        let none = BTreeMap::new();
        let hs = hosts(vec![host("a", 2, 1024, 0, 0), host("b", 4, 512, 0, 0)]);
        let err = place(
            &hs,
            &BTreeMap::new(),
            &req(4, 1024, &none),
            Policy::BinPack,
            &Loads::default(),
        )
        .unwrap_err();
        assert_eq!(err.capacity, 2);
        assert!(err.to_string().contains("2 without capacity"));
    }

    #[test]
    fn label_selector_and_down_hosts_are_filtered() {
        let mut sel = BTreeMap::new();
        sel.insert("zone".to_string(), "b".to_string());
        let mut a = host("a", 8, 8192, 0, 0);
        a.labels.insert("zone".into(), "a".into());
        let mut b = host("b", 8, 8192, 0, 0);
        b.labels.insert("zone".into(), "b".into());
        let mut b2 = host("b2", 8, 8192, 0, 0);
        b2.labels.insert("zone".into(), "b".into());
        b2.state = HostState::Down;
        let hs = hosts(vec![a, b, b2]);
        assert_eq!(
            place(
                &hs,
                &BTreeMap::new(),
                &req(1, 128, &sel),
                Policy::Spread,
                &Loads::default()
            )
            .unwrap(),
            "b"
        );
        let mut c = hs.clone();
        c.get_mut("b").unwrap().state = HostState::Draining;
        let err = place(
            &c,
            &BTreeMap::new(),
            &req(1, 128, &sel),
            Policy::Spread,
            &Loads::default(),
        )
        .unwrap_err();
        assert_eq!((err.labels, err.not_up), (1, 2));
    }

    #[test]
    fn anti_affinity_keeps_group_members_apart() {
        let none = BTreeMap::new();
        let mut a = host("a", 8, 8192, 1, 512);
        a.vm_ids.push("vm-1".into());
        let hs = hosts(vec![a, host("b", 8, 8192, 0, 0)]);
        let mut vms = BTreeMap::new();
        vms.insert(
            "vm-1".to_string(),
            Vm {
                id: "vm-1".into(),
                name: "web-1".into(),
                resources: Resources {
                    vcpus: 1,
                    memory_mib: 512,
                },
                labels: BTreeMap::new(),
                anti_affinity_group: "web".into(),
                desired: VmDesired::Running,
                host_id: "a".into(),
                created_index: 1,
                migration_id: String::new(),
                boot: Default::default(),
                placed_index: 1,
            },
        );
        let mut r = req(1, 512, &none);
        // Bin-pack alone would choose a (fuller).
        assert_eq!(
            place(&hs, &vms, &r, Policy::BinPack, &Loads::default()).unwrap(),
            "a"
        );
        r.anti_affinity_group = "web";
        assert_eq!(
            place(&hs, &vms, &r, Policy::BinPack, &Loads::default()).unwrap(),
            "b"
        );
        r.exclude = Some("b");
        let err = place(&hs, &vms, &r, Policy::BinPack, &Loads::default()).unwrap_err();
        assert_eq!((err.anti_affinity, err.excluded), (1, 1));
    }

    #[test]
    fn ties_break_on_host_id_and_policy_parses() {
        let none = BTreeMap::new();
        let hs = hosts(vec![host("z", 4, 4096, 0, 0), host("m", 4, 4096, 0, 0)]);
        assert_eq!(
            place(
                &hs,
                &BTreeMap::new(),
                &req(1, 1, &none),
                Policy::Spread,
                &Loads::default()
            )
            .unwrap(),
            "m"
        );
        assert_eq!("spread".parse::<Policy>().unwrap(), Policy::Spread);
        assert!("best".parse::<Policy>().unwrap_err().contains("expected"));
    }

    fn loads(list: &[(&str, u32, u32)]) -> Loads {
        Loads {
            thresholds: Thresholds::default(),
            hosts: list
                .iter()
                .map(|(h, cpu, anomaly)| {
                    (
                        h.to_string(),
                        HostLoad {
                            cpu_permille: *cpu,
                            anomaly_permille: *anomaly,
                            anomaly: if *anomaly > 0 {
                                "vm-1/runqueue_latency_mean_seconds".into()
                            } else {
                                String::new()
                            },
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_host_with_an_active_anomaly_is_avoided_when_another_fits() {
        let none = BTreeMap::new();
        let vms = BTreeMap::new();
        // Bin-pack alone picks b (fuller); with an anomaly on b, a; spread alone picks a.
        let hs = hosts(vec![
            host("a", 8, 8192, 1, 1024),
            host("b", 8, 8192, 6, 6144),
        ]);
        let r = req(1, 512, &none);
        assert_eq!(
            place(&hs, &vms, &r, Policy::BinPack, &Loads::default()).unwrap(),
            "b"
        );
        let l = loads(&[("b", 100, 900)]);
        assert_eq!(place(&hs, &vms, &r, Policy::BinPack, &l).unwrap(), "a");
        let l = loads(&[("a", 100, 600)]);
        assert_eq!(place(&hs, &vms, &r, Policy::Spread, &l).unwrap(), "b");
        // Below the anomaly threshold a score changes nothing.
        let l = loads(&[("b", 100, 400)]);
        assert_eq!(place(&hs, &vms, &r, Policy::BinPack, &l).unwrap(), "b");
        // When the anomalous host is the only one that fits, it is still used.
        let big = req(3, 512, &none);
        let l = loads(&[("a", 0, 900)]);
        assert_eq!(place(&hs, &vms, &big, Policy::BinPack, &l).unwrap(), "a");
    }

    #[test]
    fn hot_hosts_rank_below_cool_ones_and_above_anomalous_ones() {
        let none = BTreeMap::new();
        let vms = BTreeMap::new();
        let hs = hosts(vec![
            host("a", 8, 8192, 7, 7000),
            host("b", 8, 8192, 0, 0),
            host("c", 8, 8192, 4, 4096),
        ]);
        let l = loads(&[("a", 950, 0), ("b", 100, 700), ("c", 860, 0)]);
        let ranked = rank(&hs, &vms, &req(1, 64, &none), Policy::BinPack, &l).unwrap();
        let order: Vec<&str> = ranked.iter().map(|(h, _)| h.as_str()).collect();
        // a and c are hot (a fuller, bin-pack prefers it); b is anomalous: last.
        assert_eq!(order, ["a", "c", "b"]);
        // Among hot hosts with equal reservations the less hot one wins, under either
        // policy; below the threshold measured CPU changes nothing (ties keep id order).
        let hs = hosts(vec![
            host("a", 8, 8192, 2, 2048),
            host("b", 8, 8192, 2, 2048),
        ]);
        let l = loads(&[("a", 990, 0), ("b", 900, 0)]);
        for p in [Policy::BinPack, Policy::Spread] {
            assert_eq!(place(&hs, &vms, &req(1, 64, &none), p, &l).unwrap(), "b");
        }
        let l = loads(&[("a", 700, 0), ("b", 200, 0)]);
        assert_eq!(
            place(&hs, &vms, &req(1, 64, &none), Policy::Spread, &l).unwrap(),
            "a"
        );
    }

    #[test]
    fn a_command_carries_only_the_hosts_in_trouble() {
        let l = loads(&[
            ("a", 700, 600),
            ("b", 900, 0),
            ("c", 10, 0),
            ("d", 849, 499),
        ]);
        let kept: Vec<String> = l.clone().pressured().hosts.into_keys().collect();
        assert_eq!(kept, ["a", "b"]);
        // Scores are the same with the full loads and with the carried ones.
        let hs = hosts(vec![
            host("a", 8, 8192, 1, 100),
            host("b", 8, 8192, 2, 200),
            host("c", 8, 8192, 3, 300),
            host("d", 8, 8192, 4, 400),
        ]);
        let none = BTreeMap::new();
        for p in [Policy::BinPack, Policy::Spread] {
            assert_eq!(
                rank(&hs, &BTreeMap::new(), &req(1, 64, &none), p, &l),
                rank(
                    &hs,
                    &BTreeMap::new(),
                    &req(1, 64, &none),
                    p,
                    &l.clone().pressured()
                )
            );
        }
    }

    #[test]
    fn ties_stay_stable_with_loads() {
        let none = BTreeMap::new();
        let vms = BTreeMap::new();
        let hs = hosts(vec![
            host("c", 4, 4096, 0, 0),
            host("a", 4, 4096, 0, 0),
            host("b", 4, 4096, 0, 0),
        ]);
        let l = loads(&[("a", 300, 0), ("b", 300, 0), ("c", 300, 0)]);
        for _ in 0..3 {
            let ranked = rank(&hs, &vms, &req(1, 1, &none), Policy::Spread, &l).unwrap();
            let order: Vec<&str> = ranked.iter().map(|(h, _)| h.as_str()).collect();
            assert_eq!(order, ["a", "b", "c"]);
        }
    }

    #[test]
    fn only_contention_series_count_and_the_strongest_wins() {
        let a = |vm: &str, series: &str, score: f64| VmAnomaly {
            vm_id: vm.into(),
            series: series.into(),
            score,
            start_unix_ms: 1,
            end_unix_ms: 2,
        };
        let l = HostLoad::from_report(
            0.4567,
            &[
                a("vm-1", "page_faults_per_second", 0.99),
                a("vm-2", "preemptions_per_second", 0.7),
                a("vm-3", "runqueue_latency_mean_seconds", 0.8),
                a("vm-4", "vcpu_runqueue_wait_ratio", f64::NAN),
            ],
        );
        assert_eq!(
            l,
            HostLoad {
                cpu_permille: 457,
                anomaly_permille: 800,
                anomaly: "vm-3/runqueue_latency_mean_seconds".into(),
            }
        );
        let l = HostLoad::from_report(7.0, &[a("vm-1", "exits_per_second", 1.0)]);
        assert_eq!((l.cpu_permille, l.anomaly_permille), (1000, 0));
    }

    #[test]
    fn every_replica_places_a_create_with_its_carried_loads_on_the_same_host() {
        use crate::state::{ClusterState, Command, Reply};
        // Two hosts; the leader saw an anomaly on h2, which bin-pack would otherwise prefer.
        let mut base = ClusterState::default();
        for (i, id) in ["h1", "h2"].into_iter().enumerate() {
            base.apply(
                i as u64 + 1,
                &Command::RegisterHost {
                    id: id.into(),
                    address: format!("{id}:1"),
                    capacity: Resources {
                        vcpus: 8,
                        memory_mib: 8192,
                    },
                    labels: BTreeMap::new(),
                },
            )
            .unwrap();
        }
        base.hosts.get_mut("h2").unwrap().allocated = Resources {
            vcpus: 4,
            memory_mib: 4096,
        };
        let cmd = Command::CreateVm {
            name: "x".into(),
            resources: Resources {
                vcpus: 1,
                memory_mib: 64,
            },
            labels: BTreeMap::new(),
            host_selector: BTreeMap::new(),
            anti_affinity_group: String::new(),
            start: true,
            policy: Policy::BinPack,
            boot: Default::default(),
            loads: loads(&[("h1", 200, 0), ("h2", 300, 950)]),
        };
        // Each replica decodes the log entry's bytes and applies it to its own copy.
        let bytes = serde_json::to_vec(&cmd).unwrap();
        let placed: Vec<String> = (0..3)
            .map(|_| {
                let mut replica = base.clone();
                let cmd: Command = serde_json::from_slice(&bytes).unwrap();
                let (Reply::Vm(vm), _, _) = replica.apply(10, &cmd).unwrap() else {
                    panic!("a vm reply")
                };
                vm.host_id
            })
            .collect();
        assert_eq!(placed, ["h1", "h1", "h1"]);
        // The same command without loads (an entry written before loads existed) still
        // decodes, and places by reservations alone.
        let mut old: serde_json::Value = serde_json::to_value(&cmd).unwrap();
        old["CreateVm"].as_object_mut().unwrap().remove("loads");
        let old: Command = serde_json::from_value(old).unwrap();
        let (Reply::Vm(vm), _, _) = base.clone().apply(10, &old).unwrap() else {
            panic!("a vm reply")
        };
        assert_eq!(vm.host_id, "h2");
    }
}
