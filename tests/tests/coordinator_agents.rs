//! Agents driven by a coordinator, end to end with nothing faked: one real
//! `novacron-coordinator` process (Raft on disk) and two real `novacron-agent` daemons on
//! loopback that dial it, run VMs on /dev/kvm with the NovaCron test guest, and migrate them
//! to each other over QUIC with certificates from a temporary cluster directory.
//!
//! Every VM placement is checked from the outside: the VM is listed running on exactly one
//! agent with one VMM process, the coordinator's record names that agent, its guest keeps
//! making progress, and after a migration its whole memory verifies from inside the guest.
//!
//! Binaries: `target/<profile>/novacron-agent` and `novacron-coordinator` (built by
//! `cargo test --workspace`, or `$NOVACRON_AGENT_BIN` / `$NOVACRON_COORDINATOR_BIN`); a
//! missing or stale binary fails the tests with the command that fixes it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use novacron_agent::config::{CoordinatorConfig, MigrationConfig};
use novacron_agent::testing::{agent_binary, TestAgent, TestAgentOptions};
use novacron_coordinator::testing::{coordinator_binary, ClusterOptions, TestCluster};
use novacron_migration::certs::ClusterDir;
use novacron_proto::agent::v1 as apb;
use novacron_proto::coordinator::v1 as cpb;
use novacron_testguest::abi;

mod common;
use common::{check_fresh, guest, run, vm_dirs, wait_pages_above, Client};

/// Generous bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(60);
/// Bound for a VM to settle: a source agent SIGKILLed between preparing the target and starting
/// the copy leaves a prepared (incoming, never running) VM on the target until the target agent
/// discards it after its 60 s prepare timeout.
const SETTLE: Duration = Duration::from_secs(130);
/// Guest memory, MiB.
const MEMORY_MIB: u64 = 64;
/// A 24 MiB working set written at 20,000 pages/s: enough that a migration takes a while.
const GUEST: &str = "nc.mem=24 nc.rate=20000";

type Coord = novacron_coordinator::testing::Client;

fn binaries() -> (PathBuf, PathBuf) {
    novacron_tests::require_kvm();
    let agent = agent_binary().unwrap_or_else(|| {
        panic!(
            "the novacron-agent binary was not found next to this test executable: build it \
             with `cargo build -p novacron-agent` or set NOVACRON_AGENT_BIN"
        )
    });
    let coord = coordinator_binary().unwrap_or_else(|| {
        panic!(
            "the novacron-coordinator binary was not found next to this test executable: build \
             it with `cargo build -p novacron-coordinator` or set NOVACRON_COORDINATOR_BIN"
        )
    });
    if std::env::var_os("NOVACRON_AGENT_BIN").is_none() {
        check_fresh(
            &agent,
            &["agent/src", "agent/vmm/src", "agent/migration/src", "proto"],
        );
    }
    if std::env::var_os("NOVACRON_COORDINATOR_BIN").is_none() {
        check_fresh(&coord, &["coordinator/src", "proto"]);
    }
    (agent, coord)
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// One coordinator and agents "a" and "b" dialing it.
struct Site {
    _dir: tempfile::TempDir,
    _coordinator: TestCluster,
    coord: Coord,
    agents: Vec<(&'static str, TestAgent)>,
}

impl Site {
    async fn start() -> Site {
        Site::start_with(1).await
    }

    /// `coordinators` coordinators; the agents know only one that is not the leader (when
    /// there are several), so they must follow the leader.
    async fn start_with(coordinators: usize) -> Site {
        let (_, coord_bin) = binaries();
        let dir = tempfile::tempdir().expect("temporary directory");
        let opts = ClusterOptions {
            heartbeat_interval_ms: 300,
            down_after_secs: 5,
            ..Default::default()
        };
        let coordinator =
            TestCluster::start(&coord_bin, &dir.path().join("coord"), coordinators, opts);
        let leader = coordinator.wait_leader(WAIT).await;
        let endpoint = coordinator
            .nodes
            .iter()
            .find(|n| n.id != leader || coordinators == 1)
            .unwrap()
            .addr
            .clone();
        // One cluster CA for both: the coordinator's, which also issues the agents' certificates
        // (mTLS to the coordinator, and between agents for migrations).
        let certs = ClusterDir::new(coordinator.pki.dir.path());
        let mut agents = Vec::new();
        for name in ["a", "b"] {
            certs.issue(name).expect("agent certificate");
            let agent = TestAgent::start_with(TestAgentOptions {
                migration: Some(MigrationConfig {
                    listen: Some(format!("127.0.0.1:{}", free_udp_port()).parse().unwrap()),
                    agent_name: Some(name.into()),
                    cert_dir: Some(certs.path().to_path_buf()),
                    ..Default::default()
                }),
                coordinator: Some(CoordinatorConfig {
                    endpoints: vec![endpoint.clone()],
                    heartbeat_interval_ms: 300,
                    tls: true,
                    vcpus: 4,
                    memory_mib: 1024,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("starting agent {name}: {e}"));
            agents.push((name, agent));
        }
        let coord = coordinator.nodes[leader as usize - 1].client();
        let site = Site {
            _dir: dir,
            coord,
            _coordinator: coordinator,
            agents,
        };
        site.wait("both agents registered and up", || {
            let mut c = site.coord.clone();
            async move {
                let hosts = c
                    .list_hosts(cpb::ListRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .hosts;
                (hosts.len() == 2
                    && hosts.iter().all(|h| {
                        h.state == cpb::HostState::Up as i32 && h.last_heartbeat_age_ms > 0
                    }))
                .then_some(())
            }
        })
        .await;
        site
    }

    fn agent(&self, name: &str) -> &TestAgent {
        &self.agents.iter().find(|(n, _)| *n == name).unwrap().1
    }

    fn agent_mut(&mut self, name: &str) -> &mut TestAgent {
        &mut self.agents.iter_mut().find(|(n, _)| *n == name).unwrap().1
    }

    fn other(name: &str) -> &'static str {
        if name == "a" {
            "b"
        } else {
            "a"
        }
    }

    /// Polls `f` until it returns Some (at most [`WAIT`]); fails with `what` and the logs.
    async fn wait<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        self.wait_at_most(WAIT, what, f).await
    }

    /// [`Site::wait`] with another bound.
    async fn wait_at_most<T, F, Fut>(&self, bound: Duration, what: &str, f: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .agents
                    .iter()
                    .map(|(n, a)| format!("--- agent {n} ---\n{}", tail(&a.log(), 40)))
                    .collect();
                panic!(
                    "not within {bound:?}: {what}\n--- coordinator ---\n{}\n{}",
                    self._coordinator
                        .nodes
                        .iter()
                        .map(|n| format!("node {}: {}", n.id, n.log_tail()))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn vm(&self, name: &str) -> cpb::Vm {
        self.coord
            .clone()
            .get_vm(cpb::GetRequest {
                id: name.into(),
                consistent: false,
            })
            .await
            .unwrap_or_else(|e| panic!("GetVm {name}: {e}"))
            .into_inner()
            .vm
            .expect("a VM")
    }

    async fn wait_done(&self, op: &str) -> cpb::Operation {
        self.wait(&format!("migration {op} done"), || {
            let mut c = self.coord.clone();
            let op = op.to_string();
            async move {
                let o = c
                    .get_migration(cpb::GetRequest {
                        id: op,
                        consistent: false,
                    })
                    .await
                    .ok()?
                    .into_inner();
                o.done.then_some(o)
            }
        })
        .await
    }

    /// Waits until `vm` runs on exactly one agent, with its VMM (and no agent has a VMM more than
    /// its active VMs), and the record names it;
    /// returns that agent.
    async fn settled(&self, vm: &str) -> &'static str {
        self.wait_at_most(
            SETTLE,
            &format!("{vm} running once, where its record says"),
            || {
                let vm = vm.to_string();
                let s = self;
                async move {
                    let rec = s.vm(&vm).await;
                    if !rec.migration_id.is_empty() {
                        return None;
                    }
                    let mut holders = Vec::new();
                    for (name, agent) in &s.agents {
                        let mut c = agent.client().await.ok()?;
                        let vms = c
                            .list_vms(apb::ListVmsRequest {})
                            .await
                            .ok()?
                            .into_inner()
                            .vms;
                        match vms.iter().filter(|v| v.name == vm).collect::<Vec<_>>()[..] {
                            [] => {}
                            [v] if v.state == "running"
                                && vm_dirs(agent).contains(&v.id)
                                && agent.vmm_pids().contains(&v.pid) =>
                            {
                                holders.push(*name)
                            }
                            _ => return None,
                        }
                        // One VMM per active VM, none left over.
                        let active = vms
                            .iter()
                            .filter(|v| {
                                matches!(v.state.as_str(), "running" | "paused" | "starting")
                            })
                            .count();
                        if agent.vmm_pids().len() != active {
                            return None;
                        }
                    }
                    (holders.len() == 1 && rec.host_id == holders[0]).then(|| holders[0])
                }
            },
        )
        .await
    }

    async fn client(&self, agent: &str) -> Client {
        self.agent(agent).client().await.expect("agent client")
    }

    async fn create(&self, name: &str) -> cpb::Vm {
        self.create_with(name, true).await
    }

    async fn create_with(&self, name: &str, start: bool) -> cpb::Vm {
        self.coord
            .clone()
            .create_vm(cpb::CreateVmRequest {
                name: name.into(),
                resources: Some(cpb::Resources {
                    vcpus: 1,
                    memory_mib: MEMORY_MIB,
                }),
                start,
                boot: Some(cpb::BootSpec {
                    test_guest: true,
                    cmdline: GUEST.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateVm {name}: {e}"))
            .into_inner()
            .vm
            .expect("a VM")
    }

    async fn migrate(&self, vm_id: &str, to: &str) -> String {
        self.coord
            .clone()
            .start_migration(cpb::StartMigrationRequest {
                vm_id: vm_id.into(),
                target_host: to.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartMigration {vm_id} -> {to}: {e}"))
            .into_inner()
            .name
    }
}

/// The last `n` lines of the agent's own log (without the HTTP/2 chatter).
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| l.contains("novacron")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Asks the guest to verify its whole working set; asserts no bad page.
async fn verify_memory(c: &mut Client, vm: &str) {
    let before = guest(c, vm).await.verify_count;
    c.guest_command(apb::GuestCommandRequest {
        id_or_name: vm.into(),
        cmd: abi::CMD_VERIFY,
        arg: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("GuestCommand VERIFY {vm}: {e}"));
    let deadline = Instant::now() + WAIT;
    loop {
        let s = guest(c, vm).await;
        if s.verify_count > before {
            assert_eq!(
                s.verify_bad_pages, 0,
                "the guest of {vm} found bad pages: {s:?}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "no verification of {vm}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The guest of `vm` on `agent` makes progress past what it had written; verifies memory.
async fn progresses(site: &Site, agent: &str, vm: &str) -> u64 {
    let mut c = site.client(agent).await;
    let now = guest(&mut c, vm).await.pages_written;
    let after = wait_pages_above(&mut c, vm, now + 500, WAIT).await;
    verify_memory(&mut c, vm).await;
    after
}

/// Whether the agent's VM directory holds an outgoing migration record (the migration is
/// under way at the source).
fn migrating(agent: &TestAgent) -> bool {
    vm_dirs(agent)
        .iter()
        .any(|d| agent.vm_dir(d).join("migration.json").exists())
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[test]
fn the_coordinator_places_migrates_and_drains() {
    run(async {
        let site = Site::start().await;
        // Create: it runs on the agent the scheduler placed it on.
        let vm = site.create("web").await;
        let placed = site.settled("web").await;
        assert_eq!(vm.host_id, placed, "{vm:?}");
        progresses(&site, placed, "web").await;

        // Migrate through the coordinator: it runs on the other agent, memory intact, record moved.
        let to = Site::other(placed);
        let op = site.migrate(&vm.id, to).await;
        let done = site.wait_done(&op).await;
        let meta = done.metadata.clone().unwrap();
        assert_eq!(
            meta.phase,
            cpb::MigrationPhase::Succeeded as i32,
            "{done:?}"
        );
        assert!(meta.bytes_done > 0, "{done:?}");
        assert_eq!(site.settled("web").await, to);
        assert_eq!(site.vm("web").await.host_id, to);
        progresses(&site, to, "web").await;

        // A stopped VM, placed (bin-pack) on the same host: the agent holds it created.
        let cold = site.create_with("cold", false).await;
        assert_eq!(cold.host_id, to, "{cold:?}");
        agent_state(&site, to, "cold", "created").await;

        // Drain the host: the running VM migrates back, the stopped one moves (created on the
        // other agent, deleted here), and the drained host is left empty.
        site.coord
            .clone()
            .drain_host(cpb::HostRef { id: to.into() })
            .await
            .expect("DrainHost");
        site.wait("the drained host empty", || {
            let mut c = site.coord.clone();
            async move {
                let h = c
                    .get_host(cpb::GetRequest {
                        id: to.into(),
                        consistent: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .host?;
                h.vm_ids.is_empty().then_some(())
            }
        })
        .await;
        assert_eq!(site.settled("web").await, placed);
        agent_state(&site, placed, "cold", "created").await;
        assert_eq!(site.vm("cold").await.host_id, placed);
        site.wait("the drained agent empty", || async {
            vm_dirs(site.agent(to)).is_empty().then_some(())
        })
        .await;
        let ops = site
            .coord
            .clone()
            .list_migrations(cpb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .operations;
        let drained: Vec<_> = ops
            .iter()
            .filter(|o| o.metadata.as_ref().unwrap().requested_by == "drain")
            .collect();
        assert_eq!(drained.len(), 1, "{ops:?}");
        assert_eq!(
            drained[0].metadata.as_ref().unwrap().phase,
            cpb::MigrationPhase::Succeeded as i32
        );
        progresses(&site, placed, "web").await;
    });
}

#[test]
fn an_agent_restart_during_a_migration_ends_it_cleanly() {
    run(async {
        let mut site = Site::start().await;
        let vm = site.create("db").await;
        let mut at = site.settled("db").await;
        progresses(&site, at, "db").await;
        // First the source agent is SIGKILLed mid-migration, then (migrating again) the target.
        for victim_is_source in [true, false] {
            let to = Site::other(at);
            let victim = if victim_is_source { at } else { to };
            let op = site.migrate(&vm.id, to).await;
            if victim_is_source {
                let src = site.agent(at);
                wait_for("the source's migration under way", || migrating(src)).await;
            } else {
                let dst = site.agent(to);
                wait_for("the VM arriving at the target", || !vm_dirs(dst).is_empty()).await;
            }
            let agent = site.agent_mut(victim);
            agent.kill().expect("SIGKILL the agent");
            agent.restart().await.expect("restarting the agent");
            let done = site.wait_done(&op).await;
            let phase = done.metadata.as_ref().unwrap().phase;
            assert!(
                phase == cpb::MigrationPhase::Succeeded as i32
                    || phase == cpb::MigrationPhase::Failed as i32,
                "{done:?}"
            );
            let now = site.settled("db").await;
            eprintln!(
                "agent {victim} restarted during {op} ({at} -> {to}): {}, the VM runs on {now}",
                if phase == cpb::MigrationPhase::Succeeded as i32 {
                    "succeeded".to_string()
                } else {
                    format!("failed ({})", done.error)
                }
            );
            if phase == cpb::MigrationPhase::Succeeded as i32 {
                assert_eq!(now, to);
            } else {
                assert_eq!(now, at);
            }
            progresses(&site, now, "db").await;
            at = now;
        }
    });
}

/// Waits until agent `agent` holds `vm` in state `want`.
async fn agent_state(site: &Site, agent: &str, vm: &str, want: &str) {
    site.wait(&format!("{vm} {want} on agent {agent}"), || async {
        let mut c = site.client(agent).await;
        let v = c.get_vm(common::vm_ref(vm)).await.ok()?.into_inner();
        (v.state == want).then_some(())
    })
    .await
}

#[test]
fn reconcile_adopts_what_runs_and_applies_what_should() {
    run(async {
        let mut site = Site::start().await;
        // A VM started on agent a behind the coordinator's back: the agent is the truth for
        // what runs, so the coordinator records it there.
        let mut ac = site.client("a").await;
        common::start_test_guest(&mut ac, "stray", 32, "nc.mem=4 nc.rate=1000").await;
        let rec = site
            .wait("the stray VM adopted", || {
                let mut c = site.coord.clone();
                async move {
                    c.get_vm(cpb::GetRequest {
                        id: "stray".into(),
                        consistent: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .vm
                }
            })
            .await;
        assert_eq!(rec.host_id, "a", "{rec:?}");
        assert_eq!(rec.desired, cpb::VmDesiredState::Running as i32);
        assert!(rec.boot.as_ref().is_some_and(|b| b.test_guest), "{rec:?}");
        let events = site
            .coord
            .clone()
            .watch_events(cpb::WatchEventsRequest { from_seq: 0 })
            .await
            .unwrap()
            .into_inner();
        let mut events = std::pin::pin!(events);
        let adopted = loop {
            let e = tokio::time::timeout(WAIT, events.message())
                .await
                .expect("events")
                .expect("event stream")
                .expect("an event");
            if e.kind == "vm.adopted" {
                break e;
            }
        };
        assert_eq!(adopted.object_id, rec.id);

        // The coordinator is the truth for what should run: stop, start, delete.
        let mut c = site.coord.clone();
        c.stop_vm(cpb::VmRef { id: rec.id.clone() }).await.unwrap();
        agent_state(&site, "a", "stray", "stopped").await;
        c.start_vm(cpb::VmRef { id: rec.id.clone() }).await.unwrap();
        agent_state(&site, "a", "stray", "running").await;

        // An agent that stops heartbeating is Down, its records kept; back, it is Up and its
        // VM still runs where recorded.
        site.agent_mut("a").kill().expect("SIGKILL agent a");
        site.wait("host a down", || {
            let mut c = site.coord.clone();
            async move {
                let h = c
                    .get_host(cpb::GetRequest {
                        id: "a".into(),
                        consistent: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .host?;
                (h.state == cpb::HostState::Down as i32).then_some(h)
            }
        })
        .await;
        assert_eq!(site.vm("stray").await.host_id, "a");
        site.agent_mut("a")
            .restart()
            .await
            .expect("restarting agent a");
        site.wait("host a up", || {
            let mut c = site.coord.clone();
            async move {
                let h = c
                    .get_host(cpb::GetRequest {
                        id: "a".into(),
                        consistent: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .host?;
                (h.state == cpb::HostState::Up as i32).then_some(())
            }
        })
        .await;
        assert_eq!(site.settled("stray").await, "a");

        c.stop_vm(cpb::VmRef { id: rec.id.clone() }).await.unwrap();
        agent_state(&site, "a", "stray", "stopped").await;
        c.delete_vm(cpb::VmRef { id: rec.id.clone() })
            .await
            .unwrap();
        site.wait("stray deleted on agent a", || async {
            vm_dirs(site.agent("a")).is_empty().then_some(())
        })
        .await;
        assert!(site.agent("a").vmm_pids().is_empty());
    });
}

#[test]
fn agents_follow_the_leader_across_a_failover() {
    run(async {
        let mut site = Site::start_with(3).await;
        site.create("first").await;
        let on = site.settled("first").await;
        progresses(&site, on, "first").await;
        // SIGKILL the leader: the agents find the new one and it drives them.
        let old = site._coordinator.wait_leader(WAIT).await;
        site._coordinator.node(old).kill();
        let new = site._coordinator.wait_leader(WAIT).await;
        assert_ne!(new, old);
        site.coord = site._coordinator.node(new).client();
        site.wait("both agents heartbeating to the new leader", || {
            let mut c = site.coord.clone();
            async move {
                let hosts = c
                    .list_hosts(cpb::ListRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .hosts;
                hosts
                    .iter()
                    .all(|h| {
                        h.state == cpb::HostState::Up as i32
                            && h.last_heartbeat_age_ms > 0
                            && h.last_heartbeat_age_ms < 2000
                    })
                    .then_some(())
            }
        })
        .await;
        site.create("second").await;
        let at = site.settled("second").await;
        progresses(&site, at, "second").await;
        assert_eq!(site.settled("first").await, on);
    });
}
