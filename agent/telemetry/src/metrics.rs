//! The Prometheus exposition of a [`Snapshot`] (prometheus-client, OpenMetrics text).
//!
//! Names carry the `novacron_` prefix, base units (`_seconds`, `_bytes`) and `_total` on
//! counters; labels are the VM (`vm` = name, `vm_id`) and bounded enums only.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::layout::{self, counter};
use crate::procfs::CPU_MODES;
use crate::{Snapshot, VmSample, METRIC_GROUPS};

type Labels = Vec<(&'static str, String)>;

/// The lowest bucket bound exported: log2 buckets below 2^10 ns (about 1 µs) are merged.
const FIRST_BUCKET: usize = 10;

fn vm_labels(v: &VmSample) -> Labels {
    vec![
        ("vm", v.target.name.clone()),
        ("vm_id", v.target.id.clone()),
    ]
}

fn with(mut l: Labels, k: &'static str, v: &str) -> Labels {
    l.push((k, v.to_string()));
    l
}

/// Renders a snapshot as OpenMetrics text.
pub fn render(snap: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("novacron");
    registry.register_collector(Box::new(Collector(snap.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}

#[derive(Debug)]
struct Collector(Snapshot);

struct Fam<'a, 'b> {
    enc: &'a mut DescriptorEncoder<'b>,
}

impl Fam<'_, '_> {
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        rows: &[(Labels, f64)],
    ) -> std::fmt::Result {
        self.scalar(name, help, unit, MetricType::Counter, rows)
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        rows: &[(Labels, f64)],
    ) -> std::fmt::Result {
        self.scalar(name, help, unit, MetricType::Gauge, rows)
    }

    /// One family of counters or gauges; nothing at all when there are no rows.
    fn scalar(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        kind: MetricType,
        rows: &[(Labels, f64)],
    ) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let counter = matches!(kind, MetricType::Counter);
        let mut m = self
            .enc
            .encode_descriptor(name, help, unit.as_ref(), kind)?;
        for (l, v) in rows {
            let e = m.encode_family(l)?;
            if counter {
                ConstCounter::new(*v).encode(e)?;
            } else {
                ConstGauge::new(*v).encode(e)?;
            }
        }
        Ok(())
    }

    /// A histogram from log2(ns) buckets, in seconds.
    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Labels, &[u64], u64)],
    ) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let mut m =
            self.enc
                .encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (l, hist, sum_ns) in rows {
            let mut buckets = Vec::with_capacity(hist.len());
            let below: u64 = hist.iter().take(FIRST_BUCKET + 1).sum();
            buckets.push(((1u64 << (FIRST_BUCKET + 1)) as f64 / 1e9, below));
            for (i, c) in hist.iter().enumerate().skip(FIRST_BUCKET + 1) {
                let bound = if i + 1 == hist.len() {
                    f64::MAX
                } else {
                    (1u64 << (i + 1)) as f64 / 1e9
                };
                buckets.push((bound, *c));
            }
            let count: u64 = hist.iter().sum();
            m.encode_family(l)?.encode_histogram::<Labels>(
                *sum_ns as f64 / 1e9,
                count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let mut f = Fam { enc: &mut enc };
        f.gauge(
            "telemetry_ebpf_available",
            "1 if the eBPF probes run, 0 if telemetry falls back to /proc.",
            None,
            &[(vec![], if s.ebpf_available { 1.0 } else { 0.0 })],
        )?;
        let groups: Vec<(Labels, f64)> = METRIC_GROUPS
            .iter()
            .map(|g| {
                (
                    vec![("metric", g.to_string())],
                    if s.unavailable.contains_key(g) {
                        0.0
                    } else {
                        1.0
                    },
                )
            })
            .collect();
        f.gauge(
            "telemetry_metric_available",
            "1 if the metric group is collected on this host (the agent log says why not).",
            None,
            &groups,
        )?;
        if let Some(src) = s.exit_source {
            f.gauge(
                "telemetry_exit_source",
                "How VM exits are counted: kvm_exit (VT-x/AMD-V) or userspace_exits (PVM).",
                None,
                &[(vec![("source", src.as_str().to_string())], 1.0)],
            )?;
        }
        if s.ebpf_available {
            f.counter(
                "telemetry_map_update_failures",
                "eBPF map updates that failed (a full map).",
                None,
                &[(vec![], s.map_update_failures as f64)],
            )?;
            f.counter(
                "telemetry_events_dropped",
                "Events the eBPF probes could not record.",
                None,
                &[(vec![], s.events_dropped as f64)],
            )?;
            let runs: Vec<_> = s
                .programs
                .iter()
                .map(|p| (vec![("program", p.name.to_string())], p.run_count as f64))
                .collect();
            f.counter(
                "telemetry_program_runs",
                "Runs of each eBPF program (kernel BPF stats).",
                None,
                &runs,
            )?;
            let time: Vec<_> = s
                .programs
                .iter()
                .map(|p| {
                    (
                        vec![("program", p.name.to_string())],
                        p.run_time_ns as f64 / 1e9,
                    )
                })
                .collect();
            f.counter(
                "telemetry_program_run",
                "Time spent in each eBPF program (kernel BPF stats).",
                Some(Unit::Seconds),
                &time,
            )?;
        }

        // VM state and the VMM's own numbers.
        let state: Vec<_> = s
            .vms
            .iter()
            .map(|v| (with(vm_labels(v), "state", v.target.state), 1.0))
            .collect();
        f.gauge(
            "vm_state",
            "The VM's lifecycle state (1 for the current state).",
            None,
            &state,
        )?;
        let vmm_exits: Vec<_> = s
            .vms
            .iter()
            .filter_map(|v| Some((vm_labels(v), v.target.vmm_exits? as f64)))
            .collect();
        f.counter(
            "vm_vmm_exits",
            "Exits the VMM handled in user space, by its own count (since the VMM started).",
            None,
            &vmm_exits,
        )?;

        // The VMM's migration statistics (current or last migration).
        let migs: Vec<(&VmSample, &crate::MigrationSample)> = s
            .vms
            .iter()
            .filter_map(|v| Some((v, v.target.migration.as_ref()?)))
            .collect();
        if !migs.is_empty() {
            let rows = |f: &dyn Fn(&crate::MigrationSample) -> Option<f64>| -> Vec<(Labels, f64)> {
                migs.iter()
                    .filter_map(|(v, m)| Some((vm_labels(v), f(m)?)))
                    .collect()
            };
            let phase: Vec<_> = migs
                .iter()
                .map(|(v, m)| (with(vm_labels(v), "phase", &m.phase), 1.0))
                .collect();
            f.gauge(
                "vm_migration_phase",
                "Phase of the VM's current or last live migration (1 for that phase).",
                None,
                &phase,
            )?;
            f.gauge(
                "vm_migration_round",
                "Pre-copy round of the current or last migration.",
                None,
                &rows(&|m| Some(m.round as f64)),
            )?;
            f.gauge(
                "vm_migration_pages_left",
                "Pages still to send in the current or last migration.",
                None,
                &rows(&|m| Some(m.pages_left as f64)),
            )?;
            f.gauge(
                "vm_migration_dirty_pages_per_second",
                "The guest's dirty rate in the last pre-copy round, pages per second.",
                None,
                &rows(&|m| Some(m.dirty_pages_per_second)),
            )?;
            f.gauge(
                "vm_migration_throughput_bytes_per_second",
                "Link throughput in the last pre-copy round.",
                None,
                &rows(&|m| Some(m.throughput_bytes_per_second)),
            )?;
            f.gauge(
                "vm_migration_wire",
                "Bytes on the wire of the current or last migration.",
                Some(Unit::Bytes),
                &rows(&|m| Some(m.wire_bytes as f64)),
            )?;
            f.gauge(
                "vm_migration_raw",
                "Page bytes before compression of the current or last migration.",
                Some(Unit::Bytes),
                &rows(&|m| Some(m.raw_bytes as f64)),
            )?;
            f.gauge(
                "vm_migration_duration",
                "Duration so far of the current or last migration.",
                Some(Unit::Seconds),
                &rows(&|m| Some(m.total_seconds)),
            )?;
            f.gauge(
                "vm_migration_downtime",
                "Downtime of the last migration.",
                Some(Unit::Seconds),
                &rows(&|m| m.downtime_seconds),
            )?;
        }

        let running: Vec<&VmSample> = s.vms.iter().filter(|v| v.target.pid.is_some()).collect();
        let rss: Vec<_> = running
            .iter()
            .filter_map(|v| Some((vm_labels(v), v.rss_bytes? as f64)))
            .collect();
        f.gauge(
            "vm_memory_resident",
            "Resident memory of the VMM process (guest memory it touched).",
            Some(Unit::Bytes),
            &rss,
        )?;
        let faults: Vec<_> = running
            .iter()
            .filter_map(|v| v.faults.map(|(mi, ma)| (v, mi, ma)))
            .flat_map(|(v, mi, ma)| {
                [
                    (with(vm_labels(v), "kind", "minor"), mi as f64),
                    (with(vm_labels(v), "kind", "major"), ma as f64),
                ]
            })
            .collect();
        f.counter(
            "vm_vmm_page_faults",
            "Page faults of the VMM process (host side, since it started).",
            None,
            &faults,
        )?;
        let cpu: Vec<_> = running
            .iter()
            .map(|v| (vm_labels(v), v.sched.cpu_ns as f64 / 1e9))
            .collect();
        f.counter(
            "vm_vcpu_cpu",
            "Time the vCPU threads ran on a CPU (schedstat).",
            Some(Unit::Seconds),
            &cpu,
        )?;
        let wait: Vec<_> = running
            .iter()
            .map(|v| (vm_labels(v), v.sched.wait_ns as f64 / 1e9))
            .collect();
        f.counter(
            "vm_vcpu_runqueue_wait",
            "Time the vCPU threads were runnable but waited for a CPU (schedstat).",
            Some(Unit::Seconds),
            &wait,
        )?;
        let invol: Vec<_> = running
            .iter()
            .map(|v| (vm_labels(v), v.sched.involuntary as f64))
            .collect();
        f.counter(
            "vm_vcpu_involuntary_switches",
            "Involuntary context switches of the vCPU threads.",
            None,
            &invol,
        )?;

        // eBPF.
        let with_k: Vec<(&VmSample, &crate::probes::KernelStats)> = running
            .iter()
            .filter_map(|v| Some((*v, v.kernel.as_ref()?)))
            .collect();
        if !with_k.is_empty() {
            let mut exits = Vec::new();
            for (v, k) in &with_k {
                for (code, n) in k.exit_reasons.iter().enumerate() {
                    if *n > 0 || code == 2 {
                        let name = if code + 1 == layout::EXIT_REASONS as usize {
                            "other"
                        } else {
                            layout::exit_reason_name(code)
                        };
                        exits.push((with(vm_labels(v), "reason", name), *n as f64));
                    }
                }
            }
            f.counter(
                "vm_exits",
                "VM exits that reached user space (kvm_userspace_exit), by KVM_EXIT reason.",
                None,
                &exits,
            )?;
            let mut events = Vec::new();
            for (v, k) in &with_k {
                for (ev, idx) in [
                    ("pio", counter::PIO),
                    ("mmio", counter::MMIO),
                    ("emulate_insn", counter::EMULATE),
                    ("kvm_exit", counter::KVM_EXIT),
                ] {
                    events.push((with(vm_labels(v), "event", ev), k.counter(idx) as f64));
                }
            }
            f.counter("vm_kvm_events", "KVM tracepoint events of the vCPU threads (pio, mmio, emulate_insn; kvm_exit on VT-x/AMD-V).", None, &events)?;
            let halts: Vec<_> = with_k
                .iter()
                .map(|(v, k)| (vm_labels(v), k.counter(counter::HALT_WAKEUP) as f64))
                .collect();
            f.counter(
                "vm_halt_wakeups",
                "Halted vCPUs woken up (kvm_vcpu_wakeup).",
                None,
                &halts,
            )?;
            let halt_ns: Vec<_> = with_k
                .iter()
                .map(|(v, k)| (vm_labels(v), k.counter(counter::HALT_WAIT_NS) as f64 / 1e9))
                .collect();
            f.counter(
                "vm_halted",
                "Time halted vCPUs polled or blocked before waking (kvm_vcpu_wakeup).",
                Some(Unit::Seconds),
                &halt_ns,
            )?;
            let pf: Vec<_> = with_k
                .iter()
                .map(|(v, k)| (vm_labels(v), k.counter(counter::PAGE_FAULT) as f64))
                .collect();
            f.counter(
                "vm_guest_page_faults",
                "Guest page faults handled by the host (kvm_page_fault).",
                None,
                &pf,
            )?;
            let mut pre = Vec::new();
            for (v, _) in &with_k {
                for (c, n) in &v.preemptions {
                    pre.push((with(vm_labels(v), "preemptor", c.as_str()), *n as f64));
                }
            }
            f.counter(
                "vm_vcpu_preemptions",
                "Involuntary preemptions of vCPU threads, by who preempted them.",
                None,
                &pre,
            )?;
            let runq: Vec<_> = with_k
                .iter()
                .map(|(v, k)| (vm_labels(v), k.runq_hist.as_slice(), k.runq_sum_ns))
                .collect();
            f.histogram(
                "vm_vcpu_runqueue_latency",
                "Time from a vCPU thread becoming runnable to running.",
                &runq,
            )?;
            let blk: Vec<_> = with_k
                .iter()
                .map(|(v, k)| (vm_labels(v), k.blk_hist.as_slice(), k.blk_sum_ns))
                .collect();
            f.histogram(
                "vm_block_io_latency",
                "Block request latency (issue to completion) of I/O issued by the VM.",
                &blk,
            )?;
            let bytes: Vec<_> = with_k
                .iter()
                .map(|(v, k)| (vm_labels(v), k.counter(counter::BLK_BYTES) as f64))
                .collect();
            f.counter(
                "vm_block_io",
                "Bytes of block requests completed for the VM.",
                Some(Unit::Bytes),
                &bytes,
            )?;
        }

        // Host.
        let modes: Vec<_> = CPU_MODES
            .iter()
            .zip(s.host.cpu_seconds)
            .map(|(m, v)| (vec![("mode", m.to_string())], v))
            .collect();
        f.counter(
            "host_cpu",
            "Host CPU time by mode, all CPUs.",
            Some(Unit::Seconds),
            &modes,
        )?;
        f.gauge(
            "host_cpus",
            "Online CPUs of the host.",
            None,
            &[(vec![], s.host.cpus as f64)],
        )?;
        f.gauge(
            "host_memory_total",
            "Host memory (MemTotal).",
            Some(Unit::Bytes),
            &[(vec![], s.host.mem_total_bytes as f64)],
        )?;
        f.gauge(
            "host_memory_available",
            "Host memory available (MemAvailable).",
            Some(Unit::Bytes),
            &[(vec![], s.host.mem_available_bytes as f64)],
        )?;

        // Anomaly scores and next-hour forecasts.
        let host = crate::series::HOST;
        let scope_labels = |scope: &str, name: &str| -> Labels {
            if scope == host {
                vec![]
            } else {
                vec![("vm", name.to_string()), ("vm_id", scope.to_string())]
            }
        };
        let (vm_scores, host_scores): (Vec<_>, Vec<_>) =
            s.anomaly_scores.iter().partition(|a| a.scope != host);
        let rows = |list: &[&crate::anomaly::AnomalyScore]| -> Vec<(Labels, f64)> {
            list.iter()
                .map(|a| {
                    (
                        with(scope_labels(&a.scope, &a.name), "series", &a.series),
                        a.score,
                    )
                })
                .collect()
        };
        f.gauge(
            "vm_anomaly_score",
            "Latest anomaly score in [0, 1] of a VM's series (novacron-anomaly).",
            None,
            &rows(&vm_scores),
        )?;
        f.gauge(
            "host_anomaly_score",
            "Latest anomaly score in [0, 1] of a host series (novacron-anomaly).",
            None,
            &rows(&host_scores),
        )?;
        for (series, name, help, unit) in [
            (
                "vcpu_cpu_ratio",
                "vm_forecast_cpu_seconds_per_second",
                "Next-hour forecast of the VM's vCPU CPU time per second (stat: mean or max).",
                None,
            ),
            (
                "memory_resident_bytes",
                "vm_forecast_memory_resident",
                "Next-hour forecast of the VMM's resident memory (stat: mean or max).",
                Some(Unit::Bytes),
            ),
            (
                "cpu_busy_ratio",
                "host_forecast_cpu_busy_ratio",
                "Next-hour forecast of the host's busy CPU fraction (stat: mean or max).",
                None,
            ),
            (
                "memory_available_bytes",
                "host_forecast_memory_available",
                "Next-hour forecast of the host's available memory (stat: mean or max).",
                Some(Unit::Bytes),
            ),
        ] {
            let rows: Vec<(Labels, f64)> = s
                .forecasts
                .iter()
                .filter(|fc| fc.series == series)
                .flat_map(|fc| {
                    let l = scope_labels(&fc.scope, &fc.name);
                    [
                        (with(l.clone(), "stat", "mean"), fc.mean),
                        (with(l, "stat", "max"), fc.max),
                    ]
                })
                .collect();
            f.gauge(name, help, unit, &rows)?;
        }
        Ok(())
    }
}

/// Converts prometheus-client's OpenMetrics text to the Prometheus text format 0.0.4 (what
/// `promtool check metrics` and older scrapers read): counter families are named with
/// their `_total` suffix, `# UNIT` and `# EOF` lines are dropped, empty label sets removed.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            pending_help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let full = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(help) = pending_help.take() {
                let text = help.split_once(' ').map(|x| x.1).unwrap_or("");
                out.push_str(&format!("# HELP {full} {text}\n"));
            }
            out.push_str(&format!("# TYPE {full} {kind}\n"));
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(&line.replacen("{} ", " ", 1));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_prometheus_text() {
        let om = "# HELP novacron_x_seconds Time.\n# TYPE novacron_x_seconds counter\n\
                  # UNIT novacron_x_seconds seconds\nnovacron_x_seconds_total{} 1.5\n\
                  # HELP novacron_g A gauge.\n# TYPE novacron_g gauge\nnovacron_g{vm=\"a\"} 2.0\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP novacron_x_seconds_total Time.\n# TYPE novacron_x_seconds_total counter\n\
             novacron_x_seconds_total 1.5\n# HELP novacron_g A gauge.\n# TYPE novacron_g gauge\n\
             novacron_g{vm=\"a\"} 2.0\n"
        );
    }
}
