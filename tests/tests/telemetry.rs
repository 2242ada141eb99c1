//! Per-VM telemetry end to end, nothing faked: the real agent loads the C eBPF probes into
//! this kernel, runs real test-guest VMs under KVM, serves `/metrics`, which the real
//! `promtool` checks and a real Prometheus server scrapes.
//!
//! Needs root, /dev/kvm, BTF, and Debian's `prometheus` package (`deploy/setup.sh`).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_agent::testing::{agent_binary, TestAgent, TestAgentOptions};
use novacron_proto::agent::v1 as pb;
use novacron_telemetry::TelemetryConfig;
use tonic::Code;

mod common;
use common::{check_fresh, run, wait_pages_above, Client};

const WAIT: Duration = Duration::from_secs(20);
/// An exit-heavy guest: 20 port writes (exits to the VMM) per page, 1000 pages/s.
const NOISY: &str = "nc.mem=8 nc.rate=1000 nc.exit_heavy=20 nc.log_ms=0";
/// A quiet guest: few pages, no extra exits, no console output.
const QUIET: &str = "nc.mem=8 nc.rate=50 nc.exit_heavy=0 nc.log_ms=0";

fn telemetry(force_fallback: bool) -> TelemetryConfig {
    TelemetryConfig {
        enabled: true,
        interval_ms: 200,
        listen: "127.0.0.1:0".parse().unwrap(),
        force_fallback,
        window: 600,
        anomaly: Default::default(),
    }
}

async fn start_agent(telemetry: Option<TelemetryConfig>) -> TestAgent {
    novacron_tests::require_kvm();
    let bin = agent_binary().unwrap_or_else(|| {
        panic!(
            "the novacron-agent binary was not found: build it with `cargo build -p \
             novacron-agent` (`cargo test --workspace` does) or set NOVACRON_AGENT_BIN"
        )
    });
    if std::env::var_os("NOVACRON_AGENT_BIN").is_none() {
        check_fresh(
            &bin,
            &[
                "agent/Cargo.toml",
                "agent/src",
                "agent/telemetry",
                "ebpf",
                "agent/vmm/src",
                "proto",
            ],
        );
    }
    TestAgent::start_with(TestAgentOptions {
        telemetry,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("starting the agent {}: {e}", bin.display()))
}

async fn create(c: &mut Client, name: &str, cmdline: &str) -> pb::Vm {
    common::start_test_guest(c, name, 32, cmdline).await
}

async fn metrics(c: &mut Client, vm: &str) -> pb::VmMetrics {
    c.get_vm_metrics(pb::GetVmMetricsRequest {
        id_or_name: vm.into(),
        last: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("GetVmMetrics {vm}: {e}"))
    .into_inner()
}

fn val(m: &pb::VmMetrics, key: &str) -> f64 {
    *m.values
        .get(key)
        .unwrap_or_else(|| panic!("{} has no value {key}: {:?}", m.name, m.values))
}

/// Waits until a sample is newer than `after_ms` and has the VM's eBPF/proc numbers.
async fn fresh_metrics(c: &mut Client, vm: &str, after_ms: u64, key: &str) -> pb::VmMetrics {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics(c, vm).await;
        if m.ts_unix_ms > after_ms && m.values.contains_key(key) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "no sample of {vm} with {key} after {after_ms}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP/1.1 GET on loopback; returns (status line, headers and body).
fn http_get(addr: SocketAddr, target: &str, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reading {addr}{target}: {e}"));
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.to_string(), body.to_string())
}

/// Parses the Prometheus text format into `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sample(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| {
        let mut keys: Vec<_> = s.keys().filter(|k| k.starts_with("novacron_vm")).collect();
        keys.sort();
        panic!("/metrics has no {key}; it has {keys:#?}")
    })
}

#[test]
fn probes_attach_and_attribute_exits_and_scheduling_to_each_vm() {
    run(async {
        let agent = start_agent(Some(telemetry(false))).await;
        let mut c = agent.client().await.unwrap();
        create(&mut c, "noisy", NOISY).await;
        create(&mut c, "quiet", QUIET).await;
        wait_pages_above(&mut c, "noisy", 100, WAIT).await;
        wait_pages_above(&mut c, "quiet", 5, WAIT).await;

        let log = agent.log();
        assert!(log.contains("eBPF probes loaded"), "{log}");
        assert!(log.contains("PVM host: kvm_exit never fires here"), "{log}");

        // Two samples about 3 s apart: increments of the eBPF count and of the VMM's own
        // count of exits it handled, in the same samples.
        let n1 = fresh_metrics(&mut c, "noisy", 0, "exits_total").await;
        let q1 = fresh_metrics(&mut c, "quiet", 0, "exits_total").await;
        assert!(
            n1.ebpf_available && n1.exit_source == "userspace_exits",
            "{n1:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let n2 = fresh_metrics(&mut c, "noisy", n1.ts_unix_ms, "exits_total").await;
        let q2 = fresh_metrics(&mut c, "quiet", q1.ts_unix_ms, "exits_total").await;
        let d = |a: &pb::VmMetrics, b: &pb::VmMetrics, k: &str| val(b, k) - val(a, k);
        let noisy_ebpf = d(&n1, &n2, "exits_total");
        let noisy_vmm = d(&n1, &n2, "vmm_exits_total");
        let quiet_ebpf = d(&q1, &q2, "exits_total");
        let quiet_vmm = d(&q1, &q2, "vmm_exits_total");
        eprintln!(
            "noisy: ebpf {noisy_ebpf} vmm {noisy_vmm}; quiet: ebpf {quiet_ebpf} vmm {quiet_vmm}"
        );
        assert!(
            noisy_vmm > 5_000.0,
            "the noisy guest exits a lot: {noisy_vmm}"
        );
        let ratio = noisy_ebpf / noisy_vmm;
        assert!(
            (0.9..=1.1).contains(&ratio),
            "the noisy VM's eBPF exit count follows its VMM's own count: {noisy_ebpf} vs {noisy_vmm}"
        );
        assert!(
            quiet_ebpf <= quiet_vmm * 1.1 + 50.0,
            "the quiet VM is not charged the noisy one's exits: {quiet_ebpf} vs its VMM's {quiet_vmm}"
        );
        assert!(
            noisy_ebpf > 20.0 * quiet_ebpf.max(1.0),
            "exits are attributed per VM: noisy {noisy_ebpf}, quiet {quiet_ebpf}"
        );
        // The noisy guest's exits are port I/O. A reason appears in a sample only once it has
        // counted something, so the earlier sample (possibly the VM's first) may lack it: 0.
        let since = |a: &pb::VmMetrics, b: &pb::VmMetrics, k: &str| {
            val(b, k) - a.values.get(k).copied().unwrap_or(0.0)
        };
        assert!(
            since(&n1, &n2, "exits_total.io") > 0.9 * noisy_ebpf,
            "{n2:?}"
        );
        assert!(since(&n1, &n2, "kvm_events_total.pio") >= since(&n1, &n2, "exits_total.io") * 0.9);

        // Scheduling: both VMs' vCPU threads ran and were enqueued; the histograms count.
        for m in [&n2, &q2] {
            assert!(val(m, "vcpu_runqueue_latency_seconds_count") > 0.0, "{m:?}");
            assert!(val(m, "vcpu_oncpu_seconds_total") > 0.0, "{m:?}");
            assert!(val(m, "vcpu_cpu_seconds_total") > 0.0, "{m:?}");
            assert!(val(m, "memory_resident_bytes") > 1e6, "{m:?}");
            // Every involuntary preemption is classed by who preempted (in the kernel).
            let classes: f64 = ["same_vm", "other_vm", "kernel", "host"]
                .iter()
                .map(|c| val(m, &format!("vcpu_preemptions_total.{c}")))
                .sum();
            let all = val(m, "vcpu_preemptions_total");
            assert!(
                (classes - all).abs() <= 5.0 + all * 0.05,
                "preemptions by class {classes} vs all {all}: {m:?}"
            );
        }
        // The probes' scheduling numbers agree with the kernel's own per-thread schedstat
        // over the same interval, VM by VM.
        for (a, b) in [(&n1, &n2), (&q1, &q2)] {
            let oncpu = d(a, b, "vcpu_oncpu_seconds_total");
            let cpu = d(a, b, "vcpu_cpu_seconds_total");
            assert!(
                cpu > 0.1 && (0.7..=1.3).contains(&(oncpu / cpu)),
                "{}: eBPF on-CPU {oncpu} s vs schedstat {cpu} s",
                b.name
            );
            let runq = d(a, b, "vcpu_runqueue_latency_seconds_sum");
            let wait = d(a, b, "vcpu_runqueue_wait_seconds_total");
            // Both are sums of milliseconds-long waits over a few seconds: allow half of the
            // kernel's figure, plus 25 ms for the waits that straddle a sample.
            assert!(
                wait > 0.0 && (runq - wait).abs() <= 0.5 * wait + 0.025,
                "{}: eBPF run-queue latency sum {runq} s vs schedstat wait {wait} s",
                b.name
            );
        }

        // The series window for the anomaly detector has the per-second exit rate.
        let series = n2
            .series
            .iter()
            .find(|s| s.name == "exits_per_second")
            .unwrap_or_else(|| panic!("no exits_per_second series: {:?}", n2.series));
        assert!(series.values.len() >= 5, "{series:?}");
        assert!(
            series.values.iter().rev().take(3).all(|v| *v > 1000.0),
            "{series:?}"
        );

        // /metrics: the per-VM exit counters, the histograms and the probes' own stats.
        let addr = agent.metrics_addr().expect("the agent wrote metrics.addr");
        let (head, body) = http_get(addr, "/metrics", None);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let s = samples(&body);
        let noisy_id = &n2.vm_id;
        let io = sample(
            &s,
            &format!("novacron_vm_exits_total{{vm=\"noisy\",vm_id=\"{noisy_id}\",reason=\"io\"}}"),
        );
        assert!(io > 1000.0, "{io}");
        assert!(body.contains("# TYPE novacron_vm_vcpu_runqueue_latency_seconds histogram"));
        let quiet_buckets: Vec<&str> = body
            .lines()
            .filter(|l| {
                l.starts_with("novacron_vm_vcpu_runqueue_latency_seconds_bucket{")
                    && l.contains("vm=\"quiet\"")
            })
            .collect();
        assert!(quiet_buckets.len() > 10, "{body}");
        assert!(
            quiet_buckets.last().unwrap().contains("le=\"+Inf\""),
            "{quiet_buckets:?}"
        );
        assert!(sample(&s, "novacron_telemetry_ebpf_available") == 1.0);
        let runs = sample(
            &s,
            "novacron_telemetry_program_runs_total{program=\"nc_userspace_exit\"}",
        );
        assert!(
            runs >= io,
            "the exit probe ran for every counted exit: {runs} < {io}"
        );
        assert!(
            sample(
                &s,
                "novacron_telemetry_program_run_seconds_total{program=\"nc_userspace_exit\"}"
            ) > 0.0
        );
    });
}

/// Kills and reaps a child process when dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn require_tool(name: &str) {
    let ok = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{name}` is not installed: run deploy/setup.sh (it installs Debian's prometheus package)"
    );
}

#[test]
fn metrics_pass_promtool_and_a_real_prometheus_scrapes_a_vm_series() {
    require_tool("promtool");
    require_tool("prometheus");
    run(async {
        let agent = start_agent(Some(telemetry(false))).await;
        let mut c = agent.client().await.unwrap();
        create(&mut c, "scraped", NOISY).await;
        wait_pages_above(&mut c, "scraped", 50, WAIT).await;
        fresh_metrics(&mut c, "scraped", 0, "exits_total").await;
        let addr = agent.metrics_addr().expect("metrics.addr");

        // promtool on the exact bytes of the endpoint.
        let (head, body) = http_get(addr, "/metrics", None);
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool starts");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed: {}{}\n{body}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // OpenMetrics for clients that ask for it.
        let (head, body) = http_get(
            addr,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0"),
        );
        assert!(head.contains("application/openmetrics-text"), "{head}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (head, _) = http_get(addr, "/nope", None);
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");

        // A real Prometheus scraping the agent every second.
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
                 - job_name: novacron-agent\n    static_configs:\n      - targets: ['{addr}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let prom = Reaper(
            Command::new("prometheus")
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("prometheus starts"),
        );
        let prom_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let query = "/api/v1/query?query=novacron_vm_exits_total%7Bvm%3D%22scraped%22%2Creason%3D%22io%22%7D";
        let deadline = Instant::now() + Duration::from_secs(60);
        let value = loop {
            let answer = TcpStream::connect(prom_addr)
                .ok()
                .map(|_| http_get(prom_addr, query, None).1)
                .unwrap_or_default();
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&answer) {
                if let Some(r) = json["data"]["result"].as_array().and_then(|r| r.first()) {
                    assert_eq!(r["metric"]["job"], "novacron-agent", "{json}");
                    assert_eq!(r["metric"]["vm"], "scraped", "{json}");
                    break r["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus did not return the scraped VM's series within 60 s; last answer \
                 {answer}; its log:\n{}",
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert!(value > 100.0, "Prometheus has the VM's exits: {value}");
        // And the scrape target is healthy.
        let (_, targets) = http_get(prom_addr, "/api/v1/targets", None);
        assert!(targets.contains("\"health\":\"up\""), "{targets}");
        drop(prom);
        drop(agent);
    });
}

#[test]
fn fallback_forced_by_config_serves_proc_metrics_and_says_what_is_missing() {
    run(async {
        let agent = start_agent(Some(telemetry(true))).await;
        let mut c = agent.client().await.unwrap();
        let vm = create(&mut c, "plain", QUIET).await;
        wait_pages_above(&mut c, "plain", 5, WAIT).await;
        let m = fresh_metrics(&mut c, "plain", 0, "vcpu_cpu_seconds_total").await;
        assert!(!m.ebpf_available, "{m:?}");
        assert!(m.exit_source.is_empty(), "{m:?}");
        assert!(
            !m.values.contains_key("exits_total"),
            "no eBPF numbers: {m:?}"
        );
        // /proc still gives CPU time, RSS and the VMM's own exits.
        let m = {
            tokio::time::sleep(Duration::from_millis(600)).await;
            metrics(&mut c, "plain").await
        };
        assert!(val(&m, "vcpu_cpu_seconds_total") > 0.0, "{m:?}");
        assert!(val(&m, "memory_resident_bytes") > 1e6, "{m:?}");
        assert!(val(&m, "vmm_exits_total") > 0.0, "{m:?}");

        let log = agent.log();
        assert_eq!(
            log.matches("telemetry runs WITHOUT eBPF").count(),
            1,
            "logged once: {log}"
        );
        assert!(
            log.contains(
                "exits, guest_page_faults, halts, kvm_events, preemptions, \
                          program_stats, runqueue_latency (eBPF disabled by \
                          telemetry.force_fallback)"
            ),
            "{log}"
        );
        assert!(!log.contains("eBPF probes loaded"), "{log}");

        let addr = agent.metrics_addr().unwrap();
        let s = samples(&http_get(addr, "/metrics", None).1);
        assert_eq!(sample(&s, "novacron_telemetry_ebpf_available"), 0.0);
        assert_eq!(
            sample(&s, "novacron_telemetry_metric_available{metric=\"exits\"}"),
            0.0
        );
        assert_eq!(
            sample(
                &s,
                "novacron_telemetry_metric_available{metric=\"vcpu_sched\"}"
            ),
            1.0
        );
        let id = &vm.id;
        assert!(
            sample(
                &s,
                &format!("novacron_vm_vcpu_cpu_seconds_total{{vm=\"plain\",vm_id=\"{id}\"}}")
            ) > 0.0
        );
        assert_eq!(
            sample(
                &s,
                &format!("novacron_vm_state{{vm=\"plain\",vm_id=\"{id}\",state=\"running\"}}")
            ),
            1.0
        );
        assert!(
            !s.keys().any(|k| k.starts_with("novacron_vm_exits_total")),
            "{s:?}"
        );
    });
}

#[test]
fn metrics_call_names_unknown_vms_and_disabled_telemetry() {
    run(async {
        let agent = start_agent(None).await;
        let mut c = agent.client().await.unwrap();
        let err = c
            .get_vm_metrics(pb::GetVmMetricsRequest {
                id_or_name: "ghost".into(),
                last: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err}");
        assert!(err.message().contains("ghost"), "{err}");
        c.create_vm(pb::CreateVmRequest {
            name: "idle".into(),
            test_guest: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let err = c
            .get_vm_metrics(pb::GetVmMetricsRequest {
                id_or_name: "idle".into(),
                last: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.message().contains("telemetry is disabled"), "{err}");
        assert!(agent.metrics_addr().is_none());
    });
}

#[test]
fn a_migrated_vm_is_watched_on_its_new_host_with_its_migration_statistics() {
    use novacron_agent::config::MigrationConfig;
    use novacron_migration::certs::ClusterDir;
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let certs = ClusterDir::new(dir.path().join("certs"));
        certs.init("telemetry-test").expect("cluster CA");
        let port = |_: &str| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .unwrap()
                .port()
        };
        let ports = [("a", port("a")), ("b", port("b"))];
        let mut agents = Vec::new();
        for (name, p) in ports {
            certs.issue(name).expect("agent certificate");
            let peers = ports
                .iter()
                .filter(|(n, _)| *n != name)
                .map(|(n, p)| (n.to_string(), format!("127.0.0.1:{p}")))
                .collect();
            novacron_tests::require_kvm();
            let agent = TestAgent::start_with(TestAgentOptions {
                telemetry: Some(telemetry(false)),
                migration: Some(MigrationConfig {
                    listen: Some(format!("127.0.0.1:{p}").parse().unwrap()),
                    agent_name: Some(name.into()),
                    cert_dir: Some(dir.path().join("certs")),
                    peers,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("starting agent {name}: {e}"));
            agents.push(agent);
        }
        let mut a = agents[0].client().await.unwrap();
        let mut b = agents[1].client().await.unwrap();
        create(&mut a, "mover", NOISY).await;
        wait_pages_above(&mut a, "mover", 100, WAIT).await;
        let mut stream = a
            .migrate_vm(pb::MigrateVmRequest {
                id_or_name: "mover".into(),
                to_agent: "b".into(),
                time_limit_s: 60,
                ..Default::default()
            })
            .await
            .expect("MigrateVm")
            .into_inner();
        let mut last = None;
        while let Some(p) = stream.message().await.expect("progress") {
            last = Some(p);
        }
        let last = last.expect("progress messages");
        assert_eq!(last.phase, "completed", "{last:?}");

        // On b, the VM's new VMM and vCPU threads are watched: its exits count there.
        let m1 = fresh_metrics(&mut b, "mover", 0, "exits_total").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m2 = fresh_metrics(&mut b, "mover", m1.ts_unix_ms, "exits_total").await;
        assert!(
            val(&m2, "exits_total") - val(&m1, "exits_total") > 1000.0,
            "exits of the migrated VM are counted on its new host: {m1:?} {m2:?}"
        );
        // And b's /metrics carries the VMM's statistics of the migration that brought it.
        let addr = agents[1].metrics_addr().expect("metrics.addr of b");
        let (_, body) = http_get(addr, "/metrics", None);
        let s = samples(&body);
        let id = &m2.vm_id;
        assert_eq!(
            sample(
                &s,
                &format!("novacron_vm_migration_phase{{vm=\"mover\",vm_id=\"{id}\",phase=\"completed\"}}")
            ),
            1.0,
            "{body}"
        );
        // a no longer lists or watches it.
        let (_, body_a) = http_get(agents[0].metrics_addr().unwrap(), "/metrics", None);
        assert!(!body_a.contains("vm=\"mover\""), "{body_a}");
    });
}

#[test]
fn without_cap_bpf_the_agent_falls_back_and_says_why() {
    run(async {
        novacron_tests::require_kvm();
        let bin = agent_binary().expect("the novacron-agent binary");
        // The agent (and its VMMs) without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN, as an
        // unprivileged or locked-down host would run it.
        let dir = tempfile::tempdir().unwrap();
        let wrapper = dir.path().join("agent-without-bpf");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec setpriv --bounding-set -bpf,-perfmon,-sys_admin --inh-caps=-all -- {} \"$@\"\n",
                bin.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let agent = TestAgent::start_with(TestAgentOptions {
            agent_binary: Some(wrapper.clone()),
            vmm_binary: Some(bin.clone()),
            telemetry: Some(telemetry(false)),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("starting the agent without CAP_BPF: {e}"));
        let mut c = agent.client().await.unwrap();
        create(&mut c, "unprivileged", QUIET).await;
        wait_pages_above(&mut c, "unprivileged", 5, WAIT).await;
        let m = fresh_metrics(&mut c, "unprivileged", 0, "vcpu_cpu_seconds_total").await;
        assert!(!m.ebpf_available, "{m:?}");
        let log = agent.log();
        let line = log
            .lines()
            .find(|l| l.contains("telemetry runs WITHOUT eBPF"))
            .unwrap_or_else(|| panic!("no fallback warning: {log}"));
        assert!(
            line.contains("Operation not permitted") || line.contains("permission"),
            "the warning says why: {line}"
        );
        assert_eq!(
            log.matches("telemetry runs WITHOUT eBPF").count(),
            1,
            "{log}"
        );
        let s = samples(&http_get(agent.metrics_addr().unwrap(), "/metrics", None).1);
        assert_eq!(sample(&s, "novacron_telemetry_ebpf_available"), 0.0);
    });
}
