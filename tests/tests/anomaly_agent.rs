//! On-node anomaly detection on real telemetry: a real agent samples two real test-guest
//! VMs every 100 ms, scores every series with `novacron-anomaly`, and flags the VM whose
//! guest gets a dirty-rate burst (CMD_SET_RATE), not the quiet one; the scores and
//! forecasts are on `/metrics` and the events come through `ListAnomalies`.
//!
//! Needs root and /dev/kvm (the warm-up is shortened through `[telemetry.anomaly]`).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use novacron_agent::testing::{agent_binary, TestAgent, TestAgentOptions};
use novacron_proto::agent::v1 as pb;
use novacron_telemetry::anomaly::AnomalyConfig;
use novacron_telemetry::TelemetryConfig;
use novacron_testguest::abi;
use tonic::Code;

mod common;
use common::{check_fresh, run, Client};

const INTERVAL_MS: u64 = 100;
const WARMUP: usize = 100;
/// The burst must be flagged within this many records.
const FLAG_WITHIN: u64 = 100;
const QUIET: &str = "nc.mem=8 nc.rate=50 nc.exit_heavy=0 nc.log_ms=0";

async fn create(c: &mut Client, name: &str) {
    c.create_vm(pb::CreateVmRequest {
        name: name.into(),
        vcpus: Some(1),
        memory_mib: 32,
        cmdline: QUIET.into(),
        test_guest: true,
        start: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("CreateVm {name}: {e}"));
}

async fn anomalies(c: &mut Client, vm: &str) -> Vec<pb::AnomalyEvent> {
    c.list_anomalies(pb::ListAnomaliesRequest {
        id_or_name: vm.into(),
        min_score: 0.0,
    })
    .await
    .unwrap_or_else(|e| panic!("ListAnomalies {vm}: {e}"))
    .into_inner()
    .events
}

fn scrape(agent: &TestAgent) -> String {
    let addr = agent.metrics_addr().expect("the agent wrote metrics.addr");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_dirty_rate_burst_is_flagged_on_that_vm_only() {
    run(async {
        novacron_tests::require_kvm();
        let bin =
            agent_binary().expect("build novacron-agent first (cargo build -p novacron-agent)");
        if std::env::var_os("NOVACRON_AGENT_BIN").is_none() {
            check_fresh(
                &bin,
                &["agent/Cargo.toml", "agent/src", "agent/telemetry", "proto"],
            );
        }
        let agent = TestAgent::start_with(TestAgentOptions {
            telemetry: Some(TelemetryConfig {
                enabled: true,
                interval_ms: INTERVAL_MS,
                listen: "127.0.0.1:0".parse().unwrap(),
                force_fallback: false,
                window: 600,
                anomaly: AnomalyConfig {
                    warmup: WARMUP,
                    retrain_every: 150,
                    forecast_every: 50,
                    ..Default::default()
                },
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("starting the agent: {e}"));
        let mut c = agent.client().await.unwrap();
        create(&mut c, "steady").await;
        create(&mut c, "burst").await;

        // Bad requests change nothing and say what is wrong.
        let e = c
            .list_anomalies(pb::ListAnomaliesRequest {
                id_or_name: "no-such-vm".into(),
                min_score: 0.0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e}");
        let e = c
            .list_anomalies(pb::ListAnomaliesRequest {
                id_or_name: String::new(),
                min_score: 2.0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains("min_score"), "{e}");

        // Warm-up, then a settled baseline: twice the warm-up in records.
        tokio::time::sleep(Duration::from_millis(
            INTERVAL_MS * 2 * WARMUP as u64 + 2000,
        ))
        .await;
        let text = scrape(&agent);
        assert!(
            text.contains("novacron_vm_anomaly_score{vm=\"steady\""),
            "no anomaly score on /metrics:\n{text}"
        );
        assert!(
            text.contains("novacron_vm_forecast_cpu_seconds_per_second{vm=\"burst\""),
            "no forecast on /metrics:\n{text}"
        );
        assert!(
            text.contains("novacron_host_forecast_memory_available_bytes"),
            "{text}"
        );

        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        c.guest_command(pb::GuestCommandRequest {
            id_or_name: "burst".into(),
            cmd: abi::CMD_SET_RATE,
            arg: 20_000,
        })
        .await
        .expect("GuestCommand SET_RATE");
        let deadline = Instant::now() + Duration::from_millis(FLAG_WITHIN * INTERVAL_MS + 2000);
        let flagged = loop {
            let ev: Vec<_> = anomalies(&mut c, "burst")
                .await
                .into_iter()
                .filter(|e| e.start_unix_ms >= t0)
                .collect();
            if !ev.is_empty() {
                break ev;
            }
            assert!(
                Instant::now() < deadline,
                "the burst was not flagged within {FLAG_WITHIN} records; all events: {:?}\n{}",
                anomalies(&mut c, "").await,
                scrape(&agent)
                    .lines()
                    .filter(|l| l.contains("anomaly_score"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(INTERVAL_MS)).await;
        };
        let first = &flagged[0];
        assert_eq!(first.vm, "burst");
        assert!(first.score >= 0.5 && first.score <= 1.0, "{first:?}");
        assert!(first.end_unix_ms >= first.start_unix_ms);
        let records = (first.start_unix_ms - t0) / INTERVAL_MS;
        eprintln!("flagged after ~{records} records: {flagged:?}");
        // Let the burst go on for as long again: the steady VM stays unflagged.
        tokio::time::sleep(Duration::from_millis(FLAG_WITHIN * INTERVAL_MS / 2)).await;
        let quiet: Vec<_> = anomalies(&mut c, "steady")
            .await
            .into_iter()
            .filter(|e| e.end_unix_ms >= t0)
            .collect();
        assert!(quiet.is_empty(), "the steady VM was flagged: {quiet:?}");
        // The weights of the background retraining are on disk for the next start.
        assert!(agent.state_dir().join("anomaly.safetensors").exists());
    });
}
