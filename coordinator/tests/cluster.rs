//! Reliability of the coordinator cluster with real processes on loopback: leader SIGKILL under
//! load, whole-cluster restart, minority loss, membership changes with snapshot install, and the
//! API's behaviour on one node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_coordinator::testing::{client, Client, ClusterOptions, TestCluster};
use novacron_proto::coordinator::v1 as pb;
use tonic::Code;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_novacron-coordinator"))
}

fn big_host(id: &str) -> pb::RegisterHostRequest {
    pb::RegisterHostRequest {
        id: id.into(),
        address: format!("{id}.local:7300"),
        capacity: Some(pb::Resources {
            vcpus: 1_000_000,
            memory_mib: 1 << 40,
        }),
        labels: Default::default(),
        vms: vec![],
    }
}

fn vm(name: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.into(),
        resources: Some(pb::Resources {
            vcpus: 1,
            memory_mib: 64,
        }),
        start: true,
        ..Default::default()
    }
}

/// Writes through any node, moving on to the next one when a node is down or has no quorum.
async fn create_anywhere(
    addrs: &[String],
    start: usize,
    name: &str,
) -> Result<pb::Vm, tonic::Status> {
    let mut last = None;
    for k in 0..addrs.len() {
        let mut c = client(&addrs[(start + k) % addrs.len()]);
        match c.create_vm(vm(name)).await {
            Ok(r) => return Ok(r.into_inner().vm.expect("vm in reply")),
            Err(s) => last = Some(s),
        }
    }
    Err(last.expect("at least one address"))
}

async fn all_vm_names(c: &mut Client, consistent: bool) -> BTreeMap<String, pb::Vm> {
    c.list_vms(pb::ListRequest { consistent })
        .await
        .expect("list vms")
        .into_inner()
        .vms
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect()
}

/// Waits until a node serves a linearizable read (it has caught up with the leader).
async fn consistent_vms(c: &mut Client) -> BTreeMap<String, pb::Vm> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.list_vms(pb::ListRequest { consistent: true }).await {
            Ok(r) => {
                let r = r.into_inner();
                assert!(r.read.as_ref().unwrap().linearizable);
                return r.vms.into_iter().map(|v| (v.name.clone(), v)).collect();
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("consistent read not yet possible: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no consistent read within 20 s: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    // Small snapshot interval: the load also exercises snapshots and log compaction.
    let opts = ClusterOptions {
        snapshot_every: 300,
        keep_after_snapshot: 50,
        ..Default::default()
    };
    let mut cluster = TestCluster::start(bin(), dir.path(), 3, opts);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    cluster
        .node(leader)
        .client()
        .register_host(big_host("h1"))
        .await
        .expect("register host");

    let acked: Arc<Mutex<Vec<pb::Vm>>> = Arc::default();
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = vec![];
    for w in 0..6usize {
        let (acked, failed, stop, addrs) =
            (acked.clone(), failed.clone(), stop.clone(), addrs.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                match create_anywhere(&addrs, w, &name).await {
                    Ok(v) => acked.lock().unwrap().push(v),
                    Err(s) => {
                        failed.lock().unwrap().push(format!("{name}: {s}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = acked.lock().unwrap().len();
    assert!(
        before_kill > 20,
        "only {before_kill} writes before the kill"
    );
    let killed_at = Instant::now();
    cluster.node(leader).kill();
    // Writes resume on a new leader.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = acked.lock().unwrap().len();
        if n > before_kill + 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume after the leader was killed; errors: {:?}",
            failed
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "writes resumed {:?} after SIGKILL of leader {leader}",
        killed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let new_leader = cluster.wait_leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);

    // The killed node comes back and catches up (by log or snapshot).
    cluster.node(leader).start();
    cluster.wait_leader(Duration::from_secs(20)).await;
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{} acknowledged writes, {} refused/uncertain during failover",
        acked.len(),
        failed.lock().unwrap().len()
    );
    for n in 1..=3u64 {
        let mut c = cluster.node(n).client();
        let present = consistent_vms(&mut c).await;
        for v in &acked {
            let got = present.get(&v.name).unwrap_or_else(|| {
                panic!(
                    "acknowledged write {} ({}) missing on node {n}",
                    v.name, v.id
                )
            });
            assert_eq!(got.id, v.id, "{} has a different id on node {n}", v.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_sigkill_and_restart_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ClusterOptions {
        snapshot_every: 40,
        keep_after_snapshot: 10,
        ..Default::default()
    };
    let mut cluster = TestCluster::start(bin(), dir.path(), 3, opts);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c = cluster.node(leader).client();
    c.register_host(big_host("h1")).await.unwrap();
    c.register_host(big_host("h2")).await.unwrap();
    for i in 0..100 {
        c.create_vm(vm(&format!("vm{i}"))).await.unwrap();
    }
    let v0 = c
        .get_vm(pb::GetRequest {
            id: "vm0".into(),
            consistent: true,
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let op = c
        .start_migration(pb::StartMigrationRequest {
            vm_id: v0.id.clone(),
            target_host: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    c.drain_host(pb::HostRef { id: "h2".into() }).await.unwrap();
    let before_vms = all_vm_names(&mut c, true).await;
    let before_hosts = c
        .list_hosts(pb::ListRequest { consistent: true })
        .await
        .unwrap()
        .into_inner()
        .hosts;
    cluster.kill_all();
    cluster.start_all();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c = cluster.node(leader).client();
    let after_vms = consistent_vms(&mut c).await;
    assert_eq!(
        after_vms, before_vms,
        "VM records changed across a full restart"
    );
    let after_hosts = c
        .list_hosts(pb::ListRequest { consistent: true })
        .await
        .unwrap()
        .into_inner()
        .hosts;
    let strip = |hs: Vec<pb::Host>| -> Vec<pb::Host> {
        hs.into_iter()
            .map(|mut h| {
                h.last_heartbeat_age_ms = 0;
                h
            })
            .collect()
    };
    let (after_s, before_s) = (strip(after_hosts.clone()), strip(before_hosts));
    for (a, b) in after_s.iter().zip(&before_s) {
        let ids = |h: &pb::Host| h.vm_ids.iter().cloned().collect::<BTreeSet<_>>();
        let (ia, ib) = (ids(a), ids(b));
        let mut a2 = a.clone();
        let mut b2 = b.clone();
        a2.vm_ids.clear();
        b2.vm_ids.clear();
        assert_eq!(a2, b2, "host {} changed across a full restart", a.id);
        assert_eq!(
            ia.symmetric_difference(&ib).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "host {} VM list changed",
            a.id
        );
    }
    assert_eq!(after_s.len(), before_s.len());
    assert_eq!(after_hosts[1].state, pb::HostState::Draining as i32);
    let op2 = c
        .get_migration(pb::GetRequest {
            id: op.name.clone(),
            consistent: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(op2.metadata, op.metadata);
    // And it still takes writes.
    c.create_vm(vm("after-restart")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_refuses_writes_majority_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(bin(), dir.path(), 3, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    cluster
        .node(leader)
        .client()
        .register_host(big_host("h1"))
        .await
        .unwrap();
    // Stop one follower: the other two go on, through the leader and through the follower.
    let followers: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    cluster.node(followers[0]).stop();
    for (i, n) in [leader, followers[1]].into_iter().enumerate() {
        let r = cluster
            .node(n)
            .client()
            .create_vm(vm(&format!("majority-{i}")))
            .await
            .unwrap_or_else(|e| panic!("majority write via node {n}: {e}"))
            .into_inner();
        assert_eq!(r.write.unwrap().leader_id, leader);
    }
    // Stop the other follower: the leader alone is a minority and refuses.
    cluster.node(followers[1]).stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut c = cluster.node(leader).client();
    let err = c.create_vm(vm("minority")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("no quorum"), "{}", err.message());
    // Reads still work and say they are not linearizable.
    let r = c
        .list_vms(pb::ListRequest { consistent: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.read.unwrap().linearizable);
    let err = c
        .list_vms(pb::ListRequest { consistent: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    // The majority returns: writes go on, and the refused write never happened.
    cluster.node(followers[1]).start();
    cluster.node(followers[0]).start();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c = cluster.node(leader).client();
    c.create_vm(vm("after")).await.unwrap();
    let names: BTreeSet<String> = consistent_vms(&mut c).await.into_keys().collect();
    assert_eq!(
        names,
        ["after", "majority-0", "majority-1"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_join_by_snapshot_and_the_first_leaves_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ClusterOptions {
        snapshot_every: 50,
        keep_after_snapshot: 5,
        ..Default::default()
    };
    let mut cluster = TestCluster::start(bin(), dir.path(), 1, opts);
    assert_eq!(cluster.wait_leader(Duration::from_secs(20)).await, 1);
    let mut c = cluster.node(1).client();
    c.register_host(big_host("h1")).await.unwrap();
    for i in 0..150 {
        c.create_vm(vm(&format!("vm{i}"))).await.unwrap();
    }
    // Two new nodes join; the log behind the snapshot is purged, so they get the snapshot.
    for _ in 0..2 {
        let idx = cluster.spawn_joiner();
        let (id, addr) = (cluster.nodes[idx].id, cluster.nodes[idx].addr.clone());
        let st = c
            .add_member(pb::AddMemberRequest { id, address: addr })
            .await
            .unwrap_or_else(|e| panic!("add member {id}: {e}"))
            .into_inner();
        assert!(st.members.iter().any(|m| m.id == id && m.voter));
    }
    for id in [2u64, 3] {
        let mut cn = cluster.node(id).client();
        let vms = consistent_vms(&mut cn).await;
        assert_eq!(vms.len(), 150, "node {id} caught up");
        let log = std::fs::read_to_string(cluster.node(id).data_dir.join("node.log")).unwrap();
        assert!(
            log.contains("snapshot installed"),
            "node {id} should have caught up from a snapshot; log:\n{log}"
        );
    }
    // Remove the first node (the leader) while serving; the other two elect a leader and go on.
    let st = client(&cluster.nodes[1].addr)
        .remove_member(pb::RemoveMemberRequest { id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(!st.members.iter().any(|m| m.id == 1 && m.voter));
    cluster.node(1).stop();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    assert_ne!(leader, 1);
    let mut c = cluster.node(2).client();
    c.create_vm(vm("after-removal")).await.unwrap();
    assert_eq!(consistent_vms(&mut c).await.len(), 151);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_on_one_node_validates_places_migrates_streams_and_tracks_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ClusterOptions {
        down_after_secs: 1,
        policy: "spread".into(),
        ..Default::default()
    };
    let mut cluster = TestCluster::start(bin(), dir.path(), 1, opts);
    cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c = cluster.node(1).client();
    let mut events = c
        .watch_events(pb::WatchEventsRequest { from_seq: 0 })
        .await
        .unwrap()
        .into_inner();

    // Bad input: a clear error naming the input, and nothing changes.
    let mut bad = big_host("bad host");
    let err = c.register_host(bad.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("host id"), "{}", err.message());
    bad.id = "h0".into();
    bad.capacity = None;
    let err = c.register_host(bad).await.unwrap_err();
    assert!(err.message().contains("capacity"), "{}", err.message());
    assert!(c
        .list_hosts(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts
        .is_empty());

    for h in ["h1", "h2"] {
        let mut r = big_host(h);
        r.capacity = Some(pb::Resources {
            vcpus: 4,
            memory_mib: 4096,
        });
        c.register_host(r).await.unwrap();
    }
    // Spread: two VMs land on different hosts; anti-affinity forbids a third of the group.
    let mut hosts = BTreeSet::new();
    for i in 0..2 {
        let mut r = vm(&format!("web{i}"));
        r.anti_affinity_group = "web".into();
        hosts.insert(
            c.create_vm(r)
                .await
                .unwrap()
                .into_inner()
                .vm
                .unwrap()
                .host_id,
        );
    }
    assert_eq!(hosts.len(), 2);
    let mut r = vm("web2");
    r.anti_affinity_group = "web".into();
    let err = c.create_vm(r).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("anti-affinity"), "{}", err.message());
    let err = c.create_vm(vm("web0")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // A migration as a long-running operation: progress, wait, done.
    let web0 = c
        .get_vm(pb::GetRequest {
            id: "web0".into(),
            consistent: false,
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let target = if web0.host_id == "h1" { "h2" } else { "h1" };
    let op = c
        .start_migration(pb::StartMigrationRequest {
            vm_id: web0.id.clone(),
            target_host: target.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!op.done);
    let waited = c
        .wait_migration(pb::WaitRequest {
            name: op.name.clone(),
            timeout_ms: 200,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!waited.done, "wait returns the current state on timeout");
    let mut c2 = c.clone();
    let name = op.name.clone();
    let waiter = tokio::spawn(async move {
        c2.wait_migration(pb::WaitRequest {
            name,
            timeout_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner()
    });
    for (phase, done) in [
        (pb::MigrationPhase::Running, 50u64),
        (pb::MigrationPhase::Succeeded, 100),
    ] {
        c.report_migration(pb::ReportMigrationRequest {
            name: op.name.clone(),
            phase: phase as i32,
            bytes_done: done,
            bytes_total: 100,
            error: String::new(),
        })
        .await
        .unwrap();
    }
    let done = waiter.await.unwrap();
    assert!(done.done && done.error.is_empty());
    assert_eq!(done.metadata.unwrap().bytes_done, 100);
    let moved = c
        .get_vm(pb::GetRequest {
            id: web0.id.clone(),
            consistent: true,
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(moved.host_id, target);
    let err = c
        .cancel_migration(pb::OperationRef {
            name: op.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Liveness: h1 heartbeats, h2 stays silent and goes down; its VM records stay.
    let hb = |h: &str| pb::HeartbeatRequest {
        host_id: h.into(),
        cpu_utilisation: 0.25,
        memory_used_mib: 100,
        running_vms: vec![],
        anomalies: vec![],
        vms: vec![],
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.heartbeat(hb("h1")).await.unwrap();
        let h2 = c
            .get_host(pb::GetRequest {
                id: "h2".into(),
                consistent: false,
            })
            .await
            .unwrap()
            .into_inner()
            .host
            .unwrap();
        if h2.state == pb::HostState::Down as i32 {
            assert!(!h2.vm_ids.is_empty(), "a down host keeps its VM records");
            break;
        }
        assert!(Instant::now() < deadline, "h2 never marked down");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let h1 = c
        .get_host(pb::GetRequest {
            id: "h1".into(),
            consistent: false,
        })
        .await
        .unwrap()
        .into_inner()
        .host
        .unwrap();
    assert_eq!(h1.state, pb::HostState::Up as i32);
    assert_eq!(h1.cpu_utilisation, 0.25);
    let r = c.heartbeat(hb("h2")).await.unwrap().into_inner();
    assert_eq!(
        r.state,
        pb::HostState::Up as i32,
        "a heartbeat brings it back"
    );
    let err = c.heartbeat(hb("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The event stream saw it all, in order.
    let mut kinds = vec![];
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(300), events.message())
        .await
        .map(|r| r.transpose())
    {
        kinds.push(e.kind);
    }
    for k in [
        "host.registered",
        "vm.created",
        "migration.started",
        "migration.succeeded",
        "host.down",
        "host.up",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event in {kinds:?}");
    }

    // Health.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.nodes[0].addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "novacron.coordinator.v1.Coordinator".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
