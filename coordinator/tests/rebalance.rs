//! Anomaly-aware placement and the rebalancer on real coordinators (one node, and three for
//! forwarding), with heartbeats (CPU utilisation and anomalies) sent by the test in place of
//! agents.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_coordinator::testing::{Client, ClusterOptions, TestCluster};
use novacron_proto::coordinator::v1 as pb;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_novacron-coordinator"))
}

/// What each simulated agent reports: host → (CPU utilisation, anomalous VM id or "").
type Reports = Arc<Mutex<BTreeMap<String, (f64, String)>>>;

/// Starts one coordinator with the rebalancer in `mode` (rounds every 200 ms), two hosts of
/// 8 vCPU / 8 GiB, and a task heartbeating for both every 200 ms from `Reports`.
async fn start(mode: &str, dir: &Path) -> (TestCluster, Client, Reports) {
    let opts = ClusterOptions {
        extra_args: ["--rebalance", mode, "--rebalance-interval-ms", "200"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let cluster = TestCluster::start(bin(), dir, 1, opts);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c = cluster.nodes[0].client();
    let reports: Reports = Arc::default();
    for h in ["h1", "h2"] {
        c.register_host(pb::RegisterHostRequest {
            id: h.into(),
            address: format!("{h}.local:7300"),
            capacity: Some(pb::Resources {
                vcpus: 8,
                memory_mib: 8192,
            }),
            labels: Default::default(),
            vms: vec![],
        })
        .await
        .unwrap();
        reports
            .lock()
            .unwrap()
            .insert(h.into(), (0.1, String::new()));
    }
    let (mut hb, r) = (c.clone(), reports.clone());
    tokio::spawn(async move {
        loop {
            let now: Vec<_> = r.lock().unwrap().clone().into_iter().collect();
            for (host, (cpu, vm)) in now {
                let anomalies = if vm.is_empty() {
                    vec![]
                } else {
                    vec![pb::VmAnomaly {
                        vm_id: vm,
                        series: "runqueue_latency_mean_seconds".into(),
                        score: 0.9,
                        start_unix_ms: 1,
                        end_unix_ms: 2,
                    }]
                };
                hb.heartbeat(pb::HeartbeatRequest {
                    host_id: host,
                    cpu_utilisation: cpu,
                    memory_used_mib: 100,
                    running_vms: vec![],
                    anomalies,
                    vms: vec![],
                })
                .await
                .expect("heartbeat");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (cluster, c, reports)
}

fn report(r: &Reports, host: &str, cpu: f64, anomalous_vm: &str) {
    r.lock()
        .unwrap()
        .insert(host.into(), (cpu, anomalous_vm.to_string()));
}

/// Waits for `f` to return Some, up to 30 s; panics with `what` otherwise.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create(c: &mut Client, name: &str) -> pb::Vm {
    c.create_vm(pb::CreateVmRequest {
        name: name.into(),
        resources: Some(pb::Resources {
            vcpus: 2,
            memory_mib: 512,
        }),
        start: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .vm
    .unwrap()
}

async fn host_cpu(c: &mut Client, id: &str) -> f64 {
    c.get_host(pb::GetRequest {
        id: id.into(),
        consistent: false,
    })
    .await
    .unwrap()
    .into_inner()
    .host
    .unwrap()
    .cpu_utilisation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn act_places_away_from_an_anomaly_then_migrates_off_a_hot_host() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, mut c, reports) = start("act", dir.path()).await;

    // h1 reports a noisy-neighbour anomaly (on a VM the coordinator does not know: the agent's
    // word is enough). Without it h1 would win: equal reservations, ties go to the lower id,
    // and neither host is hot.
    // The host view shows CPU, not anomalies: 11% marks that the anomalous report arrived.
    report(&reports, "h2", 0.3, "");
    report(&reports, "h1", 0.11, "vm-stranger");
    eventually("h1 reports 11% CPU and h2 30%", || {
        let mut c = c.clone();
        async move {
            (host_cpu(&mut c, "h1").await == 0.11 && host_cpu(&mut c, "h2").await == 0.3)
                .then_some(())
        }
    })
    .await;
    let vm = create(&mut c, "placed").await;
    assert_eq!(vm.host_id, "h2", "the anomalous host is avoided");

    // Now h2 runs hot and h1 is quiet: the rebalancer moves the VM to h1 by itself.
    report(&reports, "h1", 0.1, "");
    report(&reports, "h2", 0.97, "");
    let op = eventually("a rebalancer migration", || {
        let mut c = c.clone();
        async move {
            c.list_migrations(pb::ListRequest::default())
                .await
                .unwrap()
                .into_inner()
                .operations
                .into_iter()
                .find(|o| o.metadata.as_ref().unwrap().requested_by == "rebalancer")
        }
    })
    .await;
    let m = op.metadata.unwrap();
    assert_eq!(
        (
            m.vm_id.as_str(),
            m.source_host.as_str(),
            m.target_host.as_str()
        ),
        (vm.id.as_str(), "h2", "h1")
    );
    let board = c
        .list_proposals(pb::ListProposalsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((board.mode.as_str(), board.leader_id), ("act", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_lists_and_announces_a_move_off_an_anomalous_host_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, mut c, reports) = start("propose", dir.path()).await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest { from_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let vm = create(&mut c, "victim").await;
    let (src, dst) = if vm.host_id == "h1" {
        ("h1", "h2")
    } else {
        ("h2", "h1")
    };
    report(&reports, src, 0.3, &vm.id);

    let p = eventually("a proposal", || {
        let mut c = c.clone();
        async move {
            let b = c
                .list_proposals(pb::ListProposalsRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(b.mode, "propose");
            b.proposals.into_iter().next()
        }
    })
    .await;
    assert_eq!(
        (
            p.vm_id.as_str(),
            p.source_host.as_str(),
            p.target_host.as_str()
        ),
        (vm.id.as_str(), src, dst)
    );
    assert!(p.reason.contains("noisy-neighbour"), "{}", p.reason);
    assert!(p.migration_id.is_empty());
    assert!(p.target_score > p.source_score);

    let announced = loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("a rebalancer.proposed event within 30 s")
            .unwrap()
            .unwrap();
        if e.kind == "rebalancer.proposed" {
            break e;
        }
    };
    assert_eq!(announced.object_id, vm.id);
    assert!(
        announced.message.contains(&format!("{src} -> {dst}")),
        "{}",
        announced.message
    );
    let ops = c
        .list_migrations(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert!(ops.is_empty(), "propose starts nothing: {ops:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_heartbeats_and_the_proposal_list_to_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ClusterOptions {
        extra_args: ["--rebalance", "propose", "--rebalance-interval-ms", "200"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let cluster = TestCluster::start(bin(), dir.path(), 3, opts);
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap();
    assert_eq!(
        follower
            .client()
            .list_proposals(pb::ListProposalsRequest {})
            .await
            .unwrap()
            .into_inner()
            .leader_id,
        leader,
        "a follower answers with the leader's list"
    );
    let mut c = follower.client();
    for h in ["h1", "h2"] {
        c.register_host(pb::RegisterHostRequest {
            id: h.into(),
            address: format!("{h}.local:7300"),
            capacity: Some(pb::Resources {
                vcpus: 8,
                memory_mib: 8192,
            }),
            labels: Default::default(),
            vms: vec![],
        })
        .await
        .unwrap();
    }
    let vm = create(&mut c, "busy").await;
    let other = if vm.host_id == "h1" { "h2" } else { "h1" };
    let p = eventually("a proposal listed through a follower", || {
        let mut c = c.clone();
        let (hot, cool) = (vm.host_id.clone(), other.to_string());
        async move {
            for (h, cpu) in [(hot, 0.99), (cool, 0.05)] {
                c.heartbeat(pb::HeartbeatRequest {
                    host_id: h,
                    cpu_utilisation: cpu,
                    memory_used_mib: 1,
                    running_vms: vec![],
                    anomalies: vec![],
                    vms: vec![],
                })
                .await
                .unwrap();
            }
            let b = c
                .list_proposals(pb::ListProposalsRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(b.mode, "propose");
            // The leader's list (a re-election under load may have moved it elsewhere).
            assert_ne!(b.leader_id, 0);
            b.proposals.into_iter().next()
        }
    })
    .await;
    assert_eq!(
        (
            p.vm_id.as_str(),
            p.source_host.as_str(),
            p.target_host.as_str()
        ),
        (vm.id.as_str(), vm.host_id.as_str(), other)
    );
    assert!(p.reason.contains("hot (CPU 99.0%)"), "{}", p.reason);
}
