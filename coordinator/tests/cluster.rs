//! Reliability of the coordinator cluster with real processes on loopback: leader SIGKILL under
//! load, whole-cluster restart, minority loss, membership changes with snapshot install, and the
//! API's behaviour on one node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use novacron_coordinator::testing::{Client, ClusterOptions, TestCluster};
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
    clients: &[Client],
    start: usize,
    name: &str,
) -> Result<pb::Vm, tonic::Status> {
    let mut last = None;
    for k in 0..clients.len() {
        let mut c = clients[(start + k) % clients.len()].clone();
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
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        // One connection per writer and node, kept across writes (as a real client would).
        let clients: Vec<Client> = addrs.iter().map(|a| cluster.client(a)).collect();
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                match create_anywhere(&clients, w, &name).await {
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

fn heartbeat_of(host: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        host_id: host.into(),
        cpu_utilisation: 0.25,
        memory_used_mib: 100,
        running_vms: vec![],
        anomalies: vec![],
        vms: vec![],
    }
}

/// A host's replicated record: liveness (state, heartbeat age, utilisation) cleared, VM ids
/// sorted.
fn host_record(h: &pb::Host) -> pb::Host {
    let mut h = h.clone();
    h.state = 0;
    h.last_heartbeat_age_ms = 0;
    h.cpu_utilisation = 0.0;
    h.memory_used_mib = 0;
    h.vm_ids.sort();
    h
}

/// Every host as a linearizable read on `addr` sees it, retrying while the node catches up.
async fn consistent_hosts(mut c: Client) -> BTreeMap<String, pb::Host> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.list_hosts(pb::ListRequest { consistent: true }).await {
            Ok(r) => {
                let r = r.into_inner();
                assert!(r.read.as_ref().unwrap().linearizable);
                return r.hosts.into_iter().map(|h| (h.id.clone(), h)).collect();
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("consistent read not yet possible: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no consistent read within 20 s: {e}"),
        }
    }
}

/// SIGKILL of all three nodes right after an acknowledged write, then a restart: what an
/// operator relies on afterwards.
///
/// - The last acknowledged write before the kill (a drain of h2) and every earlier one are
///   seen by the first linearizable read on *every* node, not only eventually.
/// - VM, host and migration records are identical.
/// - The drain outlives liveness: the restarted leader hears no heartbeats and marks both hosts
///   down (`down_after` 2 s); h2 stays drained while down and is `DRAINING`, never `UP`, when it
///   heartbeats again, so no new VM lands on it.
/// - The cluster takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_sigkill_and_restart_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ClusterOptions {
        snapshot_every: 40,
        keep_after_snapshot: 10,
        down_after_secs: 2,
        ..Default::default()
    };
    let mut cluster = TestCluster::start(bin(), dir.path(), 3, opts);
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.clone()).collect();
    let mut c = cluster.node(leader).client();
    c.register_host(big_host("h1")).await.unwrap();
    c.register_host(big_host("h2")).await.unwrap();
    // Both hosts heartbeat until the kill, so that placement finds them up however slow the
    // machine is.
    let beats = {
        let mut c = cluster.client(&addrs[leader as usize - 1]);
        tokio::spawn(async move {
            loop {
                for h in ["h1", "h2"] {
                    let _ = c.heartbeat(heartbeat_of(h)).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
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
    let before_vms = all_vm_names(&mut c, true).await;
    let before_hosts: BTreeMap<String, pb::Host> = c
        .list_hosts(pb::ListRequest { consistent: true })
        .await
        .unwrap()
        .into_inner()
        .hosts
        .into_iter()
        .map(|h| (h.id.clone(), host_record(&h)))
        .collect();
    // The last acknowledged write: nothing is read after it before the kill.
    let drained = c
        .drain_host(pb::HostRef { id: "h2".into() })
        .await
        .unwrap()
        .into_inner()
        .host
        .unwrap();
    assert!(drained.draining);
    beats.abort();
    cluster.kill_all();
    cluster.start_all();

    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    for (i, addr) in addrs.iter().enumerate() {
        let hosts = consistent_hosts(cluster.client(addr)).await;
        assert_eq!(hosts.len(), 2, "node {}: {hosts:?}", i + 1);
        assert!(
            hosts["h2"].draining,
            "node {}: the drain, the last write acknowledged before the kill, is missing: {:?}",
            i + 1,
            hosts["h2"]
        );
        assert_ne!(hosts["h2"].state, pb::HostState::Up as i32);
        for (id, h) in &hosts {
            let mut want = before_hosts[id].clone();
            want.draining = id == "h2";
            assert_eq!(
                host_record(h),
                want,
                "node {}: host {id} changed across a full restart",
                i + 1
            );
        }
    }
    let mut c = cluster.node(leader).client();
    let after_vms = consistent_vms(&mut c).await;
    assert_eq!(
        after_vms, before_vms,
        "VM records changed across a full restart"
    );
    let op2 = c
        .get_migration(pb::GetRequest {
            id: op.name.clone(),
            consistent: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(op2.metadata, op.metadata);

    // Silent hosts go down; the drain stays.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = consistent_hosts(cluster.client(&addrs[leader as usize - 1])).await;
        if hosts
            .values()
            .all(|h| h.state == pb::HostState::Down as i32)
        {
            assert!(hosts["h2"].draining, "going down undid the drain");
            assert!(!hosts["h1"].draining);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "silent hosts not marked down within 20 s: {hosts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c.heartbeat(heartbeat_of("h2")).await.unwrap().into_inner();
    assert_eq!(
        r.state,
        pb::HostState::Draining as i32,
        "a drained host that comes back is draining, not up"
    );
    let r = c.heartbeat(heartbeat_of("h1")).await.unwrap().into_inner();
    assert_eq!(r.state, pb::HostState::Up as i32);
    // And it still takes writes, never on the drained host.
    let v = c
        .create_vm(vm("after-restart"))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(v.host_id, "h1");
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
    let st = cluster
        .client(&cluster.nodes[1].addr)
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

    // Health (over TLS, no token needed).
    let ch = cluster.creds.channel(&cluster.nodes[0].addr);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_vms_sends_a_snapshot_then_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(bin(), dir.path(), 1, ClusterOptions::default());
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let mut c = cluster.node(leader).client();
    c.register_host(big_host("h1")).await.unwrap();
    let a = c.create_vm(vm("a")).await.unwrap().into_inner().vm.unwrap();

    let err = c
        .watch_vms(pb::WatchVmsRequest { vm: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    let mut all = c
        .watch_vms(pb::WatchVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut only_a = c
        .watch_vms(pb::WatchVmsRequest { vm: "a".into() })
        .await
        .unwrap()
        .into_inner();
    async fn next(s: &mut tonic::Streaming<pb::VmChange>) -> (pb::VmChangeKind, Option<pb::Vm>) {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("a change within 10 s")
            .expect("stream ok")
            .expect("stream open");
        (m.kind(), m.vm)
    }
    for s in [&mut all, &mut only_a] {
        let (k, v) = next(s).await;
        assert_eq!(
            (k, v.unwrap().name),
            (pb::VmChangeKind::Existing, "a".into())
        );
        assert_eq!(next(s).await.0, pb::VmChangeKind::SnapshotEnd);
    }

    // A new VM reaches the watcher of all VMs, not the watcher of "a".
    c.register_host(big_host("h2")).await.unwrap();
    c.create_vm(vm("b")).await.unwrap();
    let (k, v) = next(&mut all).await;
    assert_eq!(
        (k, v.unwrap().name),
        (pb::VmChangeKind::Created, "b".into())
    );

    // A migration that moves "a" shows as updates to its record.
    let target = if a.host_id == "h1" { "h2" } else { "h1" };
    let op = c
        .start_migration(pb::StartMigrationRequest {
            vm_id: a.id.clone(),
            target_host: target.into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Changes are level-triggered (a change carries the record as it is when sent), so each
    // step is awaited before the next one is made.
    for s in [&mut all, &mut only_a] {
        let (k, v) = next(s).await;
        let v = v.unwrap();
        assert_eq!((k, v.name.as_str()), (pb::VmChangeKind::Updated, "a"));
        assert_eq!(v.migration_id, op.name.trim_start_matches("migrations/"));
    }
    c.report_migration(pb::ReportMigrationRequest {
        name: op.name.clone(),
        phase: pb::MigrationPhase::Succeeded as i32,
        bytes_done: 1,
        bytes_total: 1,
        error: String::new(),
    })
    .await
    .unwrap();
    for s in [&mut all, &mut only_a] {
        let (k, v) = next(s).await;
        let v = v.unwrap();
        assert_eq!((k, v.name.as_str()), (pb::VmChangeKind::Updated, "a"));
        assert_eq!(v.host_id, target, "the update carries the new host");
        assert!(v.migration_id.is_empty(), "{v:?}");
    }

    // Stop and delete "b": an update, then the deletion with the last record.
    let b = all_vm_names(&mut c, false).await["b"].clone();
    c.stop_vm(pb::VmRef { id: b.id.clone() }).await.unwrap();
    let (k, v) = next(&mut all).await;
    assert_eq!(
        (k, v.unwrap().desired()),
        (pb::VmChangeKind::Updated, pb::VmDesiredState::Stopped)
    );
    c.delete_vm(pb::VmRef { id: b.id.clone() }).await.unwrap();
    let (k, v) = next(&mut all).await;
    assert_eq!((k, v.unwrap().id), (pb::VmChangeKind::Deleted, b.id));
}
