//! Per-VM kernel telemetry for novacron-agent.
//!
//! * [`probes`]: the C eBPF programs of `ebpf/` (CO-RE, compiled by build.rs with clang-19,
//!   loaded with aya), filtered in the kernel to the agent's VMs through the `watched` map.
//! * [`procfs`]: what `/proc` gives (the fallback when eBPF is not available, and RSS, page
//!   faults and host CPU/memory in every mode).
//! * [`series`]: bounded per-VM time-series windows for the anomaly detector.
//! * [`metrics`]: the Prometheus exposition (prometheus-client).
//! * [`http`]: the `/metrics` endpoint.
//! * [`anomaly`]: anomaly scores, events and next-hour forecasts of the series
//!   (`novacron-anomaly`).
//!
//! [`Telemetry::start`] ties them together: a sampler reads the maps every interval into a
//! [`Snapshot`] and the [`series::SeriesStore`].
#![deny(missing_docs)]

pub mod anomaly;
pub mod http;
pub mod layout;
pub mod metrics;
pub mod probes;
pub mod procfs;
pub mod series;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use probes::{ExitSource, KernelStats, Probes, ProgramStats};
use procfs::{HostStats, ThreadSched};
use series::SeriesStore;

/// The `[telemetry]` table of the agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Collect and serve telemetry at all. Default true.
    pub enabled: bool,
    /// Sampling interval, ms. Default 1000.
    pub interval_ms: u64,
    /// Address of the HTTP `/metrics` endpoint. Default `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// Skip eBPF and use only `/proc` (as on hosts without BTF, tracefs or CAP_BPF).
    pub force_fallback: bool,
    /// Samples kept per series (the anomaly detector's window). Default 3600.
    pub window: usize,
    /// Anomaly scoring and forecasts of the series.
    pub anomaly: anomaly::AnomalyConfig,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: true,
            interval_ms: 1000,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            force_fallback: false,
            window: 3600,
            anomaly: anomaly::AnomalyConfig::default(),
        }
    }
}

impl TelemetryConfig {
    /// Checks values a schema cannot; returns (field, what is wrong and expected).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(10..=3_600_000).contains(&self.interval_ms) {
            return Err((
                "telemetry.interval_ms",
                format!("{}; expected 10 to 3600000 milliseconds", self.interval_ms),
            ));
        }
        if self.window == 0 || self.window > 1_000_000 {
            return Err((
                "telemetry.window",
                format!("{}; expected 1 to 1000000 samples", self.window),
            ));
        }
        self.anomaly.validate()
    }
}

/// The VMM's statistics of its current (or last) live migration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MigrationSample {
    /// Phase (a bounded set: connecting, pre-copy, switch-over, committing, completed,
    /// rolled-back, in-doubt, listening, receiving, discarded, failed).
    pub phase: String,
    /// Current pre-copy round.
    pub round: u32,
    /// Pages still to send.
    pub pages_left: u64,
    /// The guest's dirty rate in the last round, pages/s.
    pub dirty_pages_per_second: f64,
    /// Link throughput in the last round, bytes/s.
    pub throughput_bytes_per_second: f64,
    /// Bytes on the wire so far.
    pub wire_bytes: u64,
    /// Page bytes before compression so far.
    pub raw_bytes: u64,
    /// Time so far, s.
    pub total_seconds: f64,
    /// Downtime, s (once known).
    pub downtime_seconds: Option<f64>,
}

/// One VM as the agent knows it, handed to the sampler each interval.
#[derive(Debug, Clone, PartialEq)]
pub struct VmTarget {
    /// Stable id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Lifecycle state (a bounded set of lower-case names).
    pub state: &'static str,
    /// VMM process id while one runs.
    pub pid: Option<u32>,
    /// vCPU thread ids while a VMM runs.
    pub vcpu_tids: Vec<i32>,
    /// Exits the VMM handled in user space (its own counter), when it answered.
    pub vmm_exits: Option<u64>,
    /// The VMM's current or last migration, if it ever migrated.
    pub migration: Option<MigrationSample>,
}

/// Where the sampler gets the VMs from (the agent's VM manager).
pub trait VmSource: Send + Sync + 'static {
    /// The VMs now.
    fn targets(&self) -> Pin<Box<dyn Future<Output = Vec<VmTarget>> + Send + '_>>;
}

/// Who preempted a vCPU thread, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PreemptorClass {
    /// Another thread of the same VMM (self-throttling).
    SameVm,
    /// Another VM of this agent (a noisy neighbour VM).
    OtherVm,
    /// A kernel thread.
    Kernel,
    /// Any other host process (a noisy neighbour on the host).
    Host,
}

impl PreemptorClass {
    /// All classes.
    pub const ALL: [PreemptorClass; 4] = [Self::SameVm, Self::OtherVm, Self::Kernel, Self::Host];
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SameVm => "same_vm",
            Self::OtherVm => "other_vm",
            Self::Kernel => "kernel",
            Self::Host => "host",
        }
    }
}

/// One process that preempted a VM's vCPU threads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preemptor {
    /// Its process id.
    pub tgid: u32,
    /// Its command name.
    pub comm: String,
    /// Its cgroup v2 id.
    pub cgroup_id: u64,
    /// Preemptions.
    pub count: u64,
    /// Class.
    pub class: PreemptorClass,
}

/// The numbers of one VM at one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSample {
    /// The VM.
    pub target: VmTarget,
    /// eBPF numbers since the VMM was first watched (None in fallback or without a VMM).
    pub kernel: Option<KernelStats>,
    /// Involuntary preemptions by class (eBPF).
    pub preemptions: BTreeMap<PreemptorClass, u64>,
    /// The top preempting processes (eBPF), most first.
    pub top_preemptors: Vec<Preemptor>,
    /// vCPU thread scheduler numbers (/proc).
    pub sched: ThreadSched,
    /// VMM resident size, bytes.
    pub rss_bytes: Option<u64>,
    /// VMM minor and major page faults.
    pub faults: Option<(u64, u64)>,
}

impl VmSample {
    /// The sample's totals by Prometheus-style name (without the `novacron_vm_` prefix).
    pub fn values(&self) -> BTreeMap<String, f64> {
        use layout::counter as c;
        let mut m = BTreeMap::new();
        if let Some(n) = self.target.vmm_exits {
            m.insert("vmm_exits_total".into(), n as f64);
        }
        if self.target.pid.is_none() {
            return m;
        }
        m.insert(
            "vcpu_cpu_seconds_total".into(),
            self.sched.cpu_ns as f64 / 1e9,
        );
        m.insert(
            "vcpu_runqueue_wait_seconds_total".into(),
            self.sched.wait_ns as f64 / 1e9,
        );
        m.insert(
            "vcpu_involuntary_switches_total".into(),
            self.sched.involuntary as f64,
        );
        if let Some(r) = self.rss_bytes {
            m.insert("memory_resident_bytes".into(), r as f64);
        }
        if let Some((mi, ma)) = self.faults {
            m.insert("vmm_page_faults_total".into(), (mi + ma) as f64);
        }
        if let Some(k) = &self.kernel {
            m.insert(
                "exits_total".into(),
                k.exit_reasons.iter().sum::<u64>() as f64,
            );
            for (code, n) in k.exit_reasons.iter().enumerate() {
                if *n > 0 {
                    m.insert(
                        format!("exits_total.{}", layout::exit_reason_name(code)),
                        *n as f64,
                    );
                }
            }
            for (name, idx) in [
                ("kvm_events_total.pio", c::PIO),
                ("kvm_events_total.mmio", c::MMIO),
                ("kvm_events_total.emulate_insn", c::EMULATE),
                ("kvm_events_total.kvm_exit", c::KVM_EXIT),
                ("halt_wakeups_total", c::HALT_WAKEUP),
                ("guest_page_faults_total", c::PAGE_FAULT),
                ("vcpu_switch_outs_total", c::SWITCH_OUT),
                ("vcpu_preemptions_total", c::PREEMPT_INVOL),
                ("vcpu_wakeups_total", c::WAKEUPS),
                ("block_io_requests_total", c::BLK_RQ),
                ("block_io_bytes_total", c::BLK_BYTES),
            ] {
                m.insert(name.into(), k.counter(idx) as f64);
            }
            m.insert(
                "vcpu_oncpu_seconds_total".into(),
                k.counter(c::ONCPU_NS) as f64 / 1e9,
            );
            m.insert(
                "halted_seconds_total".into(),
                k.counter(c::HALT_WAIT_NS) as f64 / 1e9,
            );
            m.insert(
                "vcpu_runqueue_latency_seconds_count".into(),
                k.runq_hist.iter().sum::<u64>() as f64,
            );
            m.insert(
                "vcpu_runqueue_latency_seconds_sum".into(),
                k.runq_sum_ns as f64 / 1e9,
            );
            for (class, n) in &self.preemptions {
                m.insert(
                    format!("vcpu_preemptions_total.{}", class.as_str()),
                    *n as f64,
                );
            }
        }
        m
    }
}

/// Everything one sample saw.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// When (unix ms).
    pub ts_ms: u64,
    /// Whether the eBPF probes run.
    pub ebpf_available: bool,
    /// How exits are counted (eBPF only).
    pub exit_source: Option<ExitSource>,
    /// Metric groups that are not available, with why (see [`METRIC_GROUPS`]).
    pub unavailable: BTreeMap<&'static str, String>,
    /// The VMs.
    pub vms: Vec<VmSample>,
    /// Host CPU and memory.
    pub host: HostStats,
    /// Per-program BPF stats.
    pub programs: Vec<ProgramStats>,
    /// Map updates failed in the probes.
    pub map_update_failures: u64,
    /// Events the probes dropped (a full map).
    pub events_dropped: u64,
    /// The latest anomaly score of each series (empty with anomaly scoring off).
    pub anomaly_scores: Vec<anomaly::AnomalyScore>,
    /// Next-hour CPU and memory forecasts per VM and for the host.
    pub forecasts: Vec<anomaly::Forecast>,
}

/// The metric groups whose availability is reported (`novacron_telemetry_metric_available`).
pub const METRIC_GROUPS: [&str; 9] = [
    "exits",
    "kvm_events",
    "runqueue_latency",
    "preemptions",
    "halts",
    "guest_page_faults",
    "block_io_latency",
    "program_stats",
    "vcpu_sched",
];

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The `/metrics` listener could not bind.
    #[error("telemetry: listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

struct Shared {
    cfg: TelemetryConfig,
    snapshot: RwLock<Arc<Snapshot>>,
    series: SeriesStore,
    events: anomaly::Events,
}

/// Running telemetry: the sampler and the `/metrics` endpoint. Dropping it stops both.
pub struct Telemetry {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Telemetry {
    /// Loads the probes (unless `force_fallback`; a failure falls back to /proc and is
    /// logged once with the metrics it costs), binds `/metrics`, takes a first sample and
    /// starts sampling every `interval_ms`. Must be called within a tokio runtime.
    pub async fn start(
        cfg: TelemetryConfig,
        source: Arc<dyn VmSource>,
    ) -> Result<Telemetry, TelemetryError> {
        let mut unavailable = BTreeMap::new();
        let probes = if cfg.force_fallback {
            let why = "eBPF disabled by telemetry.force_fallback".to_string();
            for g in METRIC_GROUPS {
                if g != "vcpu_sched" {
                    unavailable.insert(g, why.clone());
                }
            }
            None
        } else {
            match tokio::task::spawn_blocking(Probes::load).await {
                Ok(Ok(p)) => {
                    for (tp, why) in p.missing() {
                        let group = match *tp {
                            "kvm_vcpu_wakeup" => "halts",
                            "kvm_page_fault" => "guest_page_faults",
                            "block_rq_issue" | "block_rq_complete" => "block_io_latency",
                            "bpf_stats" => "program_stats",
                            _ => continue,
                        };
                        unavailable.insert(group, format!("{tp}: {why}"));
                    }
                    Some(p)
                }
                Ok(Err(e)) => {
                    let why = e.to_string();
                    for g in METRIC_GROUPS {
                        if g != "vcpu_sched" {
                            unavailable.insert(g, why.clone());
                        }
                    }
                    None
                }
                Err(e) => {
                    let why = format!("loading the probes panicked: {e}");
                    for g in METRIC_GROUPS {
                        if g != "vcpu_sched" {
                            unavailable.insert(g, why.clone());
                        }
                    }
                    None
                }
            }
        };
        // Once, grouped by cause: which metric groups are missing and why.
        let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (group, why) in &unavailable {
            by_reason.entry(why.as_str()).or_default().push(group);
        }
        let missing = by_reason
            .iter()
            .map(|(why, groups)| format!("{} ({why})", groups.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        if probes.is_none() {
            warn!(
                "telemetry runs WITHOUT eBPF, from /proc only (vCPU CPU and run-queue wait time, \
                 involuntary switches, RSS, page faults, host CPU/memory); missing: {missing}"
            );
        } else if !unavailable.is_empty() {
            warn!("telemetry: some eBPF metrics are missing: {missing}");
        }
        let shared = Arc::new(Shared {
            series: SeriesStore::new(cfg.window),
            events: anomaly::Events::default(),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            cfg: cfg.clone(),
        });
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| TelemetryError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TelemetryError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let mut sampler = Sampler {
            shared: shared.clone(),
            probes: probes.map(Mutex::new),
            unavailable,
            slots: HashMap::new(),
            prev: None,
            anomaly: if cfg.anomaly.enabled {
                let acfg = cfg.anomaly.clone();
                tokio::task::spawn_blocking(move || anomaly::Engine::new(acfg))
                    .await
                    .ok()
            } else {
                None
            },
        };
        sampler.sample(&source.targets().await);
        let interval = Duration::from_millis(cfg.interval_ms);
        let t1 = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let targets = source.targets().await;
                sampler.sample(&targets);
            }
        });
        let render_shared = shared.clone();
        let t2 = tokio::spawn(http::serve(
            listener,
            Arc::new(move || metrics::render(&render_shared.snapshot.read().unwrap())),
        ));
        info!(listen = %local_addr, interval_ms = cfg.interval_ms, "telemetry: serving /metrics");
        Ok(Telemetry {
            shared,
            local_addr,
            tasks: vec![t1, t2],
        })
    }

    /// Where `/metrics` is served.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The latest sample.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.read().unwrap().clone()
    }

    /// The time series (per VM id and [`series::HOST`]).
    pub fn series(&self) -> &SeriesStore {
        &self.shared.series
    }

    /// Anomaly events (oldest first) of one scope (a VM id) or all, scoring at least
    /// `min_score`.
    pub fn anomalies(&self, scope: Option<&str>, min_score: f64) -> Vec<anomaly::AnomalyEvent> {
        self.shared.events.list(scope, min_score)
    }

    /// The `/metrics` text now.
    pub fn render(&self) -> String {
        metrics::render(&self.snapshot())
    }

    /// The configuration.
    pub fn config(&self) -> &TelemetryConfig {
        &self.shared.cfg
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    slot: u32,
    pid: u32,
    tids: Vec<i32>,
}

struct Sampler {
    shared: Arc<Shared>,
    probes: Option<Mutex<Probes>>,
    unavailable: BTreeMap<&'static str, String>,
    /// VM id → its slot in the maps.
    slots: HashMap<String, Slot>,
    prev: Option<Arc<Snapshot>>,
    anomaly: Option<anomaly::Engine>,
}

impl Sampler {
    /// Keeps `watched` in step with the running VMs.
    fn sync_slots(&mut self, probes: &mut Probes, targets: &[VmTarget]) {
        let want: HashMap<&str, (u32, &[i32])> = targets
            .iter()
            .filter_map(|t| Some((t.id.as_str(), (t.pid?, t.vcpu_tids.as_slice()))))
            .collect();
        let stale: Vec<String> = self
            .slots
            .iter()
            .filter(|(id, s)| {
                want.get(id.as_str())
                    .is_none_or(|(pid, tids)| *pid != s.pid || *tids != s.tids.as_slice())
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            let s = self.slots.remove(&id).expect("present");
            probes.unwatch(s.slot, s.pid, &s.tids);
            debug!(vm = %id, slot = s.slot, "telemetry: stopped watching");
        }
        for (id, (pid, tids)) in want {
            if self.slots.contains_key(id) || tids.is_empty() {
                continue;
            }
            let used: std::collections::HashSet<u32> =
                self.slots.values().map(|s| s.slot).collect();
            let Some(slot) = (0..layout::MAX_VMS).find(|s| !used.contains(s)) else {
                warn!(vm = %id, "telemetry: more than {} VMs; not watching this one", layout::MAX_VMS);
                continue;
            };
            match probes.watch(slot, pid, tids) {
                Ok(()) => {
                    debug!(vm = %id, slot, pid, ?tids, "telemetry: watching");
                    self.slots.insert(
                        id.to_string(),
                        Slot {
                            slot,
                            pid,
                            tids: tids.to_vec(),
                        },
                    );
                }
                Err(e) => warn!(vm = %id, "telemetry: cannot watch: {e}"),
            }
        }
    }

    fn sample(&mut self, targets: &[VmTarget]) {
        let ts_ms = now_ms();
        let mut snap = Snapshot {
            ts_ms,
            ebpf_available: self.probes.is_some(),
            unavailable: self.unavailable.clone(),
            host: procfs::host(),
            ..Default::default()
        };
        let mut kernel: HashMap<String, KernelStats> = HashMap::new();
        let mut preempt: HashMap<String, Vec<Preemptor>> = HashMap::new();
        if let Some(p) = self.probes.take() {
            {
                let mut probes = p.lock().unwrap();
                self.sync_slots(&mut probes, targets);
                snap.exit_source = Some(probes.exit_source());
                snap.programs = probes.program_stats();
                if let Ok((failed, dropped, _unknown)) = probes.health() {
                    snap.map_update_failures = failed;
                    snap.events_dropped = dropped;
                }
                let vm_pids: HashMap<u32, &str> = self
                    .slots
                    .iter()
                    .map(|(id, s)| (s.pid, id.as_str()))
                    .collect();
                let by_slot = probes.preemptors();
                for (id, s) in &self.slots {
                    match probes.read_slot(s.slot) {
                        Ok(k) => {
                            kernel.insert(id.clone(), k);
                        }
                        Err(e) => warn!(vm = %id, "telemetry: reading maps: {e}"),
                    }
                    // The top ten only: /proc is read for these, not for every entry.
                    let mut raw: Vec<(u32, layout::PreemptVal)> =
                        by_slot.get(&s.slot).cloned().unwrap_or_default();
                    raw.sort_by_key(|(_, v)| std::cmp::Reverse(v.count));
                    let list: Vec<Preemptor> = raw
                        .into_iter()
                        .take(10)
                        .map(|(tgid, val)| Preemptor {
                            tgid,
                            comm: procfs::comm(tgid),
                            cgroup_id: val.cgroup_id,
                            count: val.count,
                            class: if tgid == s.pid {
                                PreemptorClass::SameVm
                            } else if vm_pids.contains_key(&tgid) {
                                PreemptorClass::OtherVm
                            } else if procfs::is_kernel_thread(tgid) {
                                PreemptorClass::Kernel
                            } else {
                                PreemptorClass::Host
                            },
                        })
                        .collect();
                    preempt.insert(id.clone(), list);
                }
            }
            self.probes = Some(p);
        }
        for t in targets {
            let (sched, rss, faults) = match t.pid {
                Some(pid) => (
                    procfs::vcpu_sched(pid, &t.vcpu_tids),
                    procfs::rss_bytes(pid),
                    procfs::process_faults(pid),
                ),
                None => (ThreadSched::default(), None, None),
            };
            let all = preempt.remove(&t.id).unwrap_or_default();
            let kernel = kernel.remove(&t.id);
            // Classified in the kernel at each preemption (complete even when the
            // per-process map is full).
            let preemptions: BTreeMap<PreemptorClass, u64> = match &kernel {
                Some(k) => [
                    (PreemptorClass::SameVm, layout::counter::PRE_SAME_VM),
                    (PreemptorClass::OtherVm, layout::counter::PRE_OTHER_VM),
                    (PreemptorClass::Kernel, layout::counter::PRE_KERNEL),
                    (PreemptorClass::Host, layout::counter::PRE_HOST),
                ]
                .into_iter()
                .map(|(c, idx)| (c, k.counter(idx)))
                .collect(),
                None => BTreeMap::new(),
            };
            snap.vms.push(VmSample {
                target: t.clone(),
                kernel,
                preemptions,
                top_preemptors: all,
                sched,
                rss_bytes: rss,
                faults,
            });
        }
        self.push_series(&snap);
        if let Some(engine) = &mut self.anomaly {
            (snap.anomaly_scores, snap.forecasts) = engine.end_sample();
        }
        let snap = Arc::new(snap);
        *self.shared.snapshot.write().unwrap() = snap.clone();
        self.prev = Some(snap);
    }

    /// Appends the derived per-second series of this sample to the store.
    fn push_series(&mut self, snap: &Snapshot) {
        let store = &self.shared.series;
        let ts = snap.ts_ms;
        let Some(prev) = &self.prev else {
            return;
        };
        let dt = (snap.ts_ms.saturating_sub(prev.ts_ms)) as f64 / 1000.0;
        if dt <= 0.0 {
            return;
        }
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
        let known: std::collections::HashSet<&str> =
            snap.vms.iter().map(|v| v.target.id.as_str()).collect();
        for v in &prev.vms {
            if !known.contains(v.target.id.as_str()) {
                store.remove_scope(&v.target.id);
                if let Some(e) = &mut self.anomaly {
                    e.remove_scope(&v.target.id);
                }
            }
        }
        for v in &snap.vms {
            let Some(p) = prev.vms.iter().find(|p| p.target.id == v.target.id) else {
                continue;
            };
            if v.target.pid.is_none() || v.target.pid != p.target.pid {
                continue;
            }
            let id = &v.target.id;
            store.push(
                id,
                "vcpu_cpu_ratio",
                ts,
                rate(v.sched.cpu_ns, p.sched.cpu_ns) / 1e9,
            );
            store.push(
                id,
                "vcpu_runqueue_wait_ratio",
                ts,
                rate(v.sched.wait_ns, p.sched.wait_ns) / 1e9,
            );
            store.push(
                id,
                "vcpu_involuntary_switches_per_second",
                ts,
                rate(v.sched.involuntary, p.sched.involuntary),
            );
            if let Some(rss) = v.rss_bytes {
                store.push(id, "memory_resident_bytes", ts, rss as f64);
            }
            if let (Some(a), Some(b)) = (v.faults, p.faults) {
                store.push(id, "page_faults_per_second", ts, rate(a.0 + a.1, b.0 + b.1));
            }
            if let (Some(a), Some(b)) = (v.target.vmm_exits, p.target.vmm_exits) {
                store.push(id, "vmm_exits_per_second", ts, rate(a, b));
            }
            if let (Some(k), Some(pk)) = (&v.kernel, &p.kernel) {
                let exits: u64 = k.exit_reasons.iter().sum();
                let pexits: u64 = pk.exit_reasons.iter().sum();
                store.push(id, "exits_per_second", ts, rate(exits, pexits));
                store.push(
                    id,
                    "pio_per_second",
                    ts,
                    rate(
                        k.counter(layout::counter::PIO),
                        pk.counter(layout::counter::PIO),
                    ),
                );
                let n: u64 = k
                    .runq_hist
                    .iter()
                    .sum::<u64>()
                    .saturating_sub(pk.runq_hist.iter().sum());
                if n > 0 {
                    store.push(
                        id,
                        "runqueue_latency_mean_seconds",
                        ts,
                        k.runq_sum_ns.saturating_sub(pk.runq_sum_ns) as f64 / n as f64 / 1e9,
                    );
                }
                let pre: u64 = v.preemptions.values().sum();
                let ppre: u64 = p.preemptions.values().sum();
                store.push(id, "preemptions_per_second", ts, rate(pre, ppre));
            }
        }
        let busy =
            |h: &HostStats| h.cpu_seconds.iter().sum::<f64>() - h.cpu_seconds[3] - h.cpu_seconds[4];
        let total =
            snap.host.cpu_seconds.iter().sum::<f64>() - prev.host.cpu_seconds.iter().sum::<f64>();
        if total > 0.0 {
            store.push(
                series::HOST,
                "cpu_busy_ratio",
                ts,
                (busy(&snap.host) - busy(&prev.host)) / total,
            );
        }
        store.push(
            series::HOST,
            "memory_available_bytes",
            ts,
            snap.host.mem_available_bytes as f64,
        );
        // This sample's records, in series order, to the detector.
        if let Some(engine) = &mut self.anomaly {
            let scopes = snap
                .vms
                .iter()
                .map(|v| (v.target.id.as_str(), v.target.name.as_str()))
                .chain([(series::HOST, series::HOST)]);
            for (scope, name) in scopes {
                for s in store.series_of(scope) {
                    if let Some((t, v)) = store.last(scope, &s) {
                        if t == ts {
                            engine.push(&self.shared.events, scope, name, &s, ts, v);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_limits_name_the_field() {
        assert!(TelemetryConfig::default().validate().is_ok());
        let bad = TelemetryConfig {
            interval_ms: 5,
            ..Default::default()
        };
        let (field, why) = bad.validate().unwrap_err();
        assert_eq!(field, "telemetry.interval_ms");
        assert!(why.contains("expected 10 to 3600000"), "{why}");
        let bad = TelemetryConfig {
            window: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "telemetry.window");
    }

    #[test]
    fn a_vm_sample_renders_with_prometheus_names() {
        let mut k = KernelStats {
            exit_reasons: vec![0; layout::EXIT_REASONS as usize],
            counters: vec![0; layout::COUNTERS as usize],
            runq_hist: vec![0; layout::HIST_BUCKETS as usize],
            runq_sum_ns: 3_000,
            blk_hist: vec![0; layout::HIST_BUCKETS as usize],
            blk_sum_ns: 0,
        };
        k.exit_reasons[2] = 7;
        k.runq_hist[11] = 2; // [2048, 4096) ns
        k.runq_hist[39] = 1; // the open bucket
        let snap = Snapshot {
            ts_ms: 1,
            ebpf_available: true,
            exit_source: Some(ExitSource::UserspaceExits),
            vms: vec![VmSample {
                target: VmTarget {
                    id: "abc".into(),
                    name: "web".into(),
                    state: "running",
                    pid: Some(1),
                    vcpu_tids: vec![1],
                    vmm_exits: Some(9),
                    migration: Some(MigrationSample {
                        phase: "pre-copy".into(),
                        round: 2,
                        dirty_pages_per_second: 1500.0,
                        ..Default::default()
                    }),
                },
                kernel: Some(k),
                preemptions: PreemptorClass::ALL.iter().map(|c| (*c, 1)).collect(),
                top_preemptors: vec![],
                sched: ThreadSched::default(),
                rss_bytes: Some(4096),
                faults: Some((1, 0)),
            }],
            ..Default::default()
        };
        let text = metrics::to_prometheus_text(&metrics::render(&snap));
        for line in [
            "novacron_vm_exits_total{vm=\"web\",vm_id=\"abc\",reason=\"io\"} 7.0",
            "# TYPE novacron_vm_vcpu_runqueue_latency_seconds histogram",
            "novacron_vm_vcpu_runqueue_latency_seconds_count{vm=\"web\",vm_id=\"abc\"} 3",
            "novacron_vm_vmm_exits_total{vm=\"web\",vm_id=\"abc\"} 9.0",
            "novacron_vm_vcpu_preemptions_total{vm=\"web\",vm_id=\"abc\",preemptor=\"other_vm\"} 1.0",
            "novacron_vm_memory_resident_bytes{vm=\"web\",vm_id=\"abc\"} 4096.0",
            "novacron_vm_state{vm=\"web\",vm_id=\"abc\",state=\"running\"} 1.0",
            "novacron_telemetry_ebpf_available 1.0",
            "novacron_vm_migration_dirty_pages_per_second{vm=\"web\",vm_id=\"abc\"} 1500.0",
            "novacron_vm_migration_phase{vm=\"web\",vm_id=\"abc\",phase=\"pre-copy\"} 1.0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // Cumulative buckets: 2 at 4.096 µs, 3 at +Inf.
        assert!(
            text.contains("_bucket{le=\"0.000004096\",vm=\"web\",vm_id=\"abc\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("_bucket{le=\"+Inf\",vm=\"web\",vm_id=\"abc\"} 3\n"),
            "{text}"
        );
    }
}
