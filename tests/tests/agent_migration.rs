//! Live migration between agents, end to end with nothing faked: real `novacron-agent`
//! daemons on one host (each with its own socket, state directory and migration port on
//! 127.0.0.1, certificates from a temporary cluster directory), real VMM processes on
//! /dev/kvm, and the NovaCron test guest writing its memory throughout.
//!
//! Every migration is checked from the outside: the VM is listed on exactly one agent, one
//! VMM process runs it, its guest keeps making progress, and its whole memory verifies from
//! inside the guest (`CMD_VERIFY`, no bad page).
//!
//! The binaries are `target/<profile>/novacron-agent` and `novacronctl` (built by
//! `cargo test --workspace`, or `$NOVACRON_AGENT_BIN`); a missing or stale binary fails the
//! tests with the command that fixes it. Nothing here is ever skipped. The tests take a
//! file-wide lock: each boots guests, and the host has few cores.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use novacron_agent::config::MigrationConfig;
use novacron_agent::testing::{agent_binary, TestAgent, TestAgentOptions};
use novacron_migration::certs::ClusterDir;
use novacron_proto::agent::v1 as pb;
use novacron_testguest::abi;
use tonic::Code;

mod common;
use common::{check_fresh, guest, run, vm_dirs, vm_ref, wait_pages_above, Client};

/// Generous bound for anything the tests wait for.
const WAIT: Duration = Duration::from_secs(30);
/// Guest memory of every VM here, MiB.
const MEMORY_MIB: u64 = 32;
/// An 8 MiB working set written at 5000 pages/s.
const GUEST: &str = "nc.mem=8 nc.rate=5000";

// ---------------------------------------------------------------------------------------
// Harness.

/// A binary next to this test executable (`target/<profile>/<name>`).
fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn require_agent_binary() -> PathBuf {
    novacron_tests::require_kvm();
    let bin = agent_binary().unwrap_or_else(|| {
        panic!(
            "the novacron-agent binary was not found next to this test executable: build it \
             with `cargo build -p novacron-agent` (`cargo test --workspace` does) or set \
             NOVACRON_AGENT_BIN"
        )
    });
    if std::env::var_os("NOVACRON_AGENT_BIN").is_none() {
        check_fresh(
            &bin,
            &[
                "agent/Cargo.toml",
                "agent/src",
                "agent/vmm/Cargo.toml",
                "agent/vmm/src",
                "agent/migration/src",
                "agent/guest/src",
                "proto",
            ],
        );
    }
    bin
}

/// A free UDP port on 127.0.0.1 (bound and released; the agents bind it right after).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// A cluster directory with certificates for agents a, b and c, and a migration port each.
struct Cluster {
    dir: tempfile::TempDir,
    ports: BTreeMap<&'static str, u16>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let certs = ClusterDir::new(dir.path().join("certs"));
        certs.init("test-cluster").expect("cluster CA");
        let mut ports = BTreeMap::new();
        for agent in ["a", "b", "c"] {
            certs.issue(agent).expect("agent certificate");
            ports.insert(agent, free_port());
        }
        Cluster { dir, ports }
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn addr(&self, agent: &str) -> String {
        format!("127.0.0.1:{}", self.ports[agent])
    }

    /// The `[migration]` table of `agent` with peers `(name, agent whose port it is)`.
    fn migration(&self, agent: &str, peers: &[(&str, &str)]) -> MigrationConfig {
        MigrationConfig {
            listen: Some(self.addr(agent).parse().unwrap()),
            agent_name: Some(agent.into()),
            cert_dir: Some(self.certs()),
            peers: peers
                .iter()
                .map(|(name, at)| (name.to_string(), self.addr(at)))
                .collect(),
            ..Default::default()
        }
    }

    async fn agent(
        &self,
        agent: &str,
        peers: &[(&str, &str)],
        max_memory_mib: Option<u64>,
    ) -> TestAgent {
        let bin = require_agent_binary();
        TestAgent::start_with(TestAgentOptions {
            migration: Some(self.migration(agent, peers)),
            max_memory_mib,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("starting agent {agent} ({}): {e}", bin.display()))
    }
}

async fn list(c: &mut Client) -> Vec<pb::Vm> {
    c.list_vms(pb::ListVmsRequest {})
        .await
        .expect("ListVms")
        .into_inner()
        .vms
}

/// Creates and starts a test-guest VM and waits for its guest to write.
async fn start_guest_vm(c: &mut Client, name: &str, cmdline: &str) -> pb::Vm {
    let vm = common::start_test_guest(c, name, MEMORY_MIB, cmdline).await;
    assert_eq!(vm.state, "running", "{vm:?}");
    wait_pages_above(c, name, 500, WAIT).await;
    vm
}

/// Asks the guest to verify its whole working set; asserts no bad page.
async fn verify_memory(c: &mut Client, vm: &str) -> pb::GuestStatus {
    let before = guest(c, vm).await.verify_count;
    c.guest_command(pb::GuestCommandRequest {
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
            return s;
        }
        assert!(Instant::now() < deadline, "no verification of {vm}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that VM `name` is listed (running) on exactly one of `agents`, has exactly one
/// live VMM among them, and that no other agent keeps anything of it. Returns the index of
/// the agent that runs it.
async fn assert_runs_once(agents: &[(&str, &TestAgent)], name: &str) -> usize {
    let mut holders = Vec::new();
    let mut vmms = 0;
    for (i, (label, agent)) in agents.iter().enumerate() {
        let mut c = agent.client().await.expect("client");
        let vms = list(&mut c).await;
        let mine: Vec<&pb::Vm> = vms.iter().filter(|v| v.name == name).collect();
        match mine.as_slice() {
            [] => assert!(
                vm_dirs(agent).is_empty(),
                "agent {label} does not list {name} but keeps {:?}",
                vm_dirs(agent)
            ),
            [vm] => {
                assert_eq!(vm.state, "running", "{name} on agent {label}: {vm:?}");
                assert_eq!(vm_dirs(agent), vec![vm.id.clone()], "agent {label}");
                holders.push(i);
            }
            more => panic!("agent {label} lists {name} {} times: {more:?}", more.len()),
        }
        vmms += agent.vmm_pids().len();
    }
    assert_eq!(holders.len(), 1, "{name} is listed on agents {holders:?}");
    assert_eq!(
        vmms, 1,
        "{name}: {vmms} live VMM processes across the agents"
    );
    holders[0]
}

fn request(vm: &str, to: &str) -> pb::MigrateVmRequest {
    pb::MigrateVmRequest {
        id_or_name: vm.into(),
        to_agent: to.into(),
        time_limit_s: 60,
        ..Default::default()
    }
}

/// Runs a migration to its end; returns every progress message (the last one final).
async fn migrate(
    c: &mut Client,
    req: pb::MigrateVmRequest,
) -> Result<Vec<pb::MigrationProgress>, tonic::Status> {
    let mut stream = c.migrate_vm(req).await?.into_inner();
    let mut all = Vec::new();
    while let Some(p) = stream.message().await? {
        all.push(p);
    }
    Ok(all)
}

/// Migrates `vm` from `src` to `dst` and checks everything that must hold afterwards.
async fn migrate_and_check(
    src: (&str, &TestAgent),
    dst: (&str, &TestAgent),
    vm: &str,
) -> pb::MigrationProgress {
    let mut sc = src.1.client().await.expect("client");
    let mut dc = dst.1.client().await.expect("client");
    let before = guest(&mut sc, vm).await;
    let id = list(&mut sc)
        .await
        .into_iter()
        .find(|v| v.name == vm)
        .unwrap_or_else(|| panic!("{vm} is not on agent {}", src.0))
        .id;
    let progress = migrate(&mut sc, request(vm, dst.0))
        .await
        .unwrap_or_else(|e| panic!("MigrateVm {vm} {} -> {}: {e}", src.0, dst.0));
    let last = progress
        .last()
        .cloned()
        .expect("at least the final message");
    assert!(last.done, "{last:?}");
    assert_eq!(last.phase, "completed", "{last:?}");
    assert!(
        progress.len() >= 2,
        "progress messages before the end: {progress:?}"
    );
    assert!(progress[..progress.len() - 1].iter().all(|p| !p.done));
    assert!(last.total_ms > 0.0, "{last:?}");
    assert!(last.downtime_ms.is_some_and(|d| d > 0.0), "{last:?}");
    assert!(last.wire_bytes > 0 && last.raw_bytes > 0, "{last:?}");
    assert!(!last.pages_per_round.is_empty(), "{last:?}");
    assert!(last.compression_ratio > 0.0, "{last:?}");
    assert!(last.error.is_empty(), "{last:?}");

    // Gone from the source, directory and all; running on the destination.
    assert!(
        list(&mut sc).await.iter().all(|v| v.name != vm),
        "{vm} still listed on {}",
        src.0
    );
    assert!(!src.1.vm_dir(&id).exists(), "the source kept {}", id);
    let on_dst = dc
        .get_vm(vm_ref(vm))
        .await
        .unwrap_or_else(|e| panic!("{vm} on {}: {e}", dst.0))
        .into_inner();
    assert_eq!(on_dst.state, "running", "{on_dst:?}");
    assert_eq!(on_dst.id, id);
    assert!(on_dst.pid != 0);
    // The guest goes on from where it was.
    let after = wait_pages_above(&mut dc, vm, before.pages_written + 500, WAIT).await;
    assert!(after > before.pages_written);
    verify_memory(&mut dc, vm).await;
    assert_runs_once(&[src, dst], vm).await;
    last
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn a_vm_migrates_to_another_agent() {
    run(async {
        let cluster = Cluster::new();
        let a = cluster.agent("a", &[("b", "b")], None).await;
        let b = cluster.agent("b", &[("a", "a")], None).await;
        let mut ac = a.client().await.unwrap();
        start_guest_vm(&mut ac, "mover", GUEST).await;
        let last = migrate_and_check(("a", &a), ("b", &b), "mover").await;
        eprintln!(
            "a -> b: {:.0} ms, downtime {:.1} ms, rounds {:?}, {} wire bytes, ratio {:.2}",
            last.total_ms,
            last.downtime_ms.unwrap_or(0.0),
            last.pages_per_round,
            last.wire_bytes,
            last.compression_ratio
        );
        // On b it is an ordinary VM: it pauses, resumes and stops like any other.
        let mut bc = b.client().await.unwrap();
        let v = bc.pause_vm(vm_ref("mover")).await.expect("PauseVm on b");
        assert_eq!(v.into_inner().state, "paused");
        let v = bc.resume_vm(vm_ref("mover")).await.expect("ResumeVm on b");
        assert_eq!(v.into_inner().state, "running");
        verify_memory(&mut bc, "mover").await;
        // And it is still b's after b restarts.
        drop(bc);
        let mut b = b;
        b.restart().await.expect("restarting b");
        let mut bc = b.client().await.unwrap();
        let v = bc
            .get_vm(vm_ref("mover"))
            .await
            .expect("GetVm after restart");
        assert_eq!(v.into_inner().state, "running");
        verify_memory(&mut bc, "mover").await;
        assert_runs_once(&[("a", &a), ("b", &b)], "mover").await;
    });
}

/// Needs a VMM that received a migration to be able to send one (see the report: the
/// VMM refuses a second migration while its incoming one is "completed").
#[test]
fn a_vm_migrates_back_and_forth_ten_times() {
    run(async {
        let cluster = Cluster::new();
        let a = cluster.agent("a", &[("b", "b")], None).await;
        let b = cluster.agent("b", &[("a", "a")], None).await;
        let mut ac = a.client().await.unwrap();
        start_guest_vm(&mut ac, "roamer", GUEST).await;
        let started = Instant::now();
        for i in 0..10 {
            let (src, dst) = if i % 2 == 0 {
                (("a", &a), ("b", &b))
            } else {
                (("b", &b), ("a", &a))
            };
            let last = migrate_and_check(src, dst, "roamer").await;
            eprintln!(
                "migration {} {} -> {}: {:.0} ms, downtime {:.1} ms, {} rounds, {} wire bytes",
                i + 1,
                src.0,
                dst.0,
                last.total_ms,
                last.downtime_ms.unwrap_or(0.0),
                last.pages_per_round.len(),
                last.wire_bytes
            );
        }
        eprintln!("10 migrations in {:?}", started.elapsed());
        // Back home on a, an ordinary VM: it stops like any other.
        ac.stop_vm(pb::StopVmRequest {
            id_or_name: "roamer".into(),
            force: true,
            timeout_ms: 0,
        })
        .await
        .expect("StopVm after the migrations");
    });
}

#[test]
fn a_destination_that_cannot_take_the_vm_refuses_and_nothing_moves() {
    run(async {
        let cluster = Cluster::new();
        let a = cluster.agent("a", &[("b", "b")], None).await;
        // b may give 16 MiB to VMs: less than the VM has.
        let b = cluster.agent("b", &[], Some(16)).await;
        let mut ac = a.client().await.unwrap();
        let mut bc = b.client().await.unwrap();
        start_guest_vm(&mut ac, "big", GUEST).await;
        let before = guest(&mut ac, "big").await;

        let e = migrate(&mut ac, request("big", "b")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("not enough memory"), "{e:?}");
        assert!(e.message().contains("agent b"), "{e:?}");
        assert!(list(&mut bc).await.is_empty());
        assert!(vm_dirs(&b).is_empty(), "{:?}", vm_dirs(&b));
        assert!(b.vmm_pids().is_empty());
        wait_pages_above(&mut ac, "big", before.pages_written + 500, WAIT).await;
        verify_memory(&mut ac, "big").await;
        assert_runs_once(&[("a", &a), ("b", &b)], "big").await;

        // A VM of the same name on the destination: refused as well.
        bc.create_vm(pb::CreateVmRequest {
            name: "twin".into(),
            memory_mib: 16,
            test_guest: true,
            ..Default::default()
        })
        .await
        .expect("CreateVm twin on b");
        start_guest_vm(&mut ac, "twin", GUEST).await;
        let e = migrate(&mut ac, request("twin", "b")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("already exists"), "{e:?}");
        let on_b: Vec<String> = list(&mut bc).await.into_iter().map(|v| v.state).collect();
        assert_eq!(on_b, ["created"]);
        assert_eq!(vm_dirs(&b).len(), 1);
        verify_memory(&mut ac, "twin").await;
        assert_eq!(a.vmm_pids().len(), 2);
    });
}

#[test]
fn unknown_peers_and_wrong_certificates_are_refused() {
    run(async {
        let cluster = Cluster::new();
        // a believes that "b" listens on c's port.
        let a = cluster.agent("a", &[("b", "c")], None).await;
        let c = cluster.agent("c", &[], None).await;
        let mut ac = a.client().await.unwrap();
        let mut cc = c.client().await.unwrap();
        start_guest_vm(&mut ac, "stay", GUEST).await;

        let e = migrate(&mut ac, request("stay", "nobody"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("to_agent"), "{e:?}");
        assert!(e.message().contains("nobody"), "{e:?}");

        let e = migrate(&mut ac, request("stay", "b")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("certificate"), "{e:?}");
        eprintln!("wrong certificate: {}", e.message());
        assert!(list(&mut cc).await.is_empty());
        assert!(vm_dirs(&c).is_empty());
        verify_memory(&mut ac, "stay").await;
        assert_runs_once(&[("a", &a), ("c", &c)], "stay").await;

        // A peer nobody listens for: Unavailable.
        drop(c);
        let e = migrate(&mut ac, request("stay", "b")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        verify_memory(&mut ac, "stay").await;
    });
}

#[test]
fn the_source_agent_killed_mid_migration_leaves_the_vm_running_once() {
    run(async {
        let cluster = Cluster::new();
        let mut a = cluster.agent("a", &[("b", "b")], None).await;
        let b = cluster.agent("b", &[("a", "a")], None).await;
        let mut ac = a.client().await.unwrap();
        // A busy guest and a slow link: the migration takes seconds.
        start_guest_vm(&mut ac, "survivor", "nc.mem=16 nc.rate=20000").await;
        let mut req = request("survivor", "b");
        req.bandwidth_limit = 3_000_000;
        req.time_limit_s = 20;
        req.force_at_time_limit = true;
        let mut stream = ac.migrate_vm(req).await.expect("MigrateVm").into_inner();
        let deadline = Instant::now() + WAIT;
        loop {
            let p = stream
                .message()
                .await
                .expect("progress")
                .expect("the migration is still running");
            assert!(
                !p.done,
                "the migration ended before the agent could be killed: {p:?}"
            );
            if p.phase == "pre-copy" {
                break;
            }
            assert!(Instant::now() < deadline);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.kill().expect("SIGKILL the source agent");
        // Whatever was in flight, the stream ends with the agent (without a final result).
        let drained = tokio::time::timeout(WAIT, async {
            while let Ok(Some(p)) = stream.message().await {
                assert!(!p.done, "final result from a killed agent: {p:?}");
            }
        })
        .await;
        assert!(drained.is_ok(), "the progress stream outlived the agent");
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.restart().await.expect("restarting the source agent");

        // It ends one way or the other; the VM then runs exactly once.
        let deadline = Instant::now() + Duration::from_secs(60);
        let holder = loop {
            let mut ac = a.client().await.unwrap();
            let mut bc = b.client().await.unwrap();
            let on_a = list(&mut ac).await;
            let on_b = list(&mut bc).await;
            let settled = on_a.len() + on_b.len() == 1
                && on_a.iter().chain(&on_b).all(|v| v.state == "running")
                && a.vmm_pids().len() + b.vmm_pids().len() == 1
                && (vm_dirs(&a).len() + vm_dirs(&b).len()) == 1;
            if settled {
                break if on_a.is_empty() { 1 } else { 0 };
            }
            assert!(
                Instant::now() < deadline,
                "not settled after 60 s: a lists {on_a:?} (dirs {:?}), b lists {on_b:?} (dirs {:?})\nagent a log:\n{}",
                vm_dirs(&a),
                vm_dirs(&b),
                a.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let agents = [("a", &a), ("b", &b)];
        eprintln!("after the restart the VM runs on {}", agents[holder].0);
        let mut hc = agents[holder].1.client().await.unwrap();
        let p = wait_pages_above(&mut hc, "survivor", 0, WAIT).await;
        wait_pages_above(&mut hc, "survivor", p + 500, WAIT).await;
        verify_memory(&mut hc, "survivor").await;
        assert_eq!(assert_runs_once(&agents, "survivor").await, holder);
    });
}

#[test]
fn novacronctl_migrates_a_vm_and_prints_statistics_as_json() {
    run(async {
        let ctl = sibling_binary("novacronctl").unwrap_or_else(|| {
            panic!(
                "the novacronctl binary was not found next to this test executable: build it \
                 with `cargo build -p novacron-ctl` (`cargo test --workspace` does)"
            )
        });
        check_fresh(&ctl, &["agent/ctl/src", "proto"]);
        let cluster = Cluster::new();
        let a = cluster.agent("a", &[("b", "b")], None).await;
        let b = cluster.agent("b", &[("a", "a")], None).await;
        let mut ac = a.client().await.unwrap();
        start_guest_vm(&mut ac, "cli", GUEST).await;
        let out = tokio::process::Command::new(&ctl)
            .arg("--socket")
            .arg(a.socket())
            .args([
                "--output",
                "json",
                "vm",
                "migrate",
                "cli",
                "--to",
                "b",
                "--downtime-ms",
                "100",
                "--time-limit-s",
                "60",
                "--streams",
                "2",
            ])
            .output()
            .await
            .expect("running novacronctl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "novacronctl failed: {stderr}\n{stdout}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
        assert_eq!(j["phase"], "completed", "{j}");
        assert!(j["total_ms"].as_f64().is_some_and(|t| t > 0.0), "{j}");
        assert!(j["downtime_ms"].as_f64().is_some_and(|t| t > 0.0), "{j}");
        assert!(j["wire_bytes"].as_u64().is_some_and(|b| b > 0), "{j}");
        assert!(j["compression_ratio"].as_f64().is_some(), "{j}");
        assert!(
            j["pages_per_round"]
                .as_array()
                .is_some_and(|r| !r.is_empty()),
            "{j}"
        );
        let mut bc = b.client().await.unwrap();
        verify_memory(&mut bc, "cli").await;
        assert_eq!(assert_runs_once(&[("a", &a), ("b", &b)], "cli").await, 1);

        // Errors are reported with the agent's message and a failure exit status.
        let out = tokio::process::Command::new(&ctl)
            .arg("--socket")
            .arg(b.socket())
            .args(["vm", "migrate", "cli", "--to", "nowhere"])
            .output()
            .await
            .expect("running novacronctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("to_agent") && stderr.contains("nowhere"),
            "{stderr}"
        );
        let out = tokio::process::Command::new(&ctl)
            .arg("--socket")
            .arg(b.socket())
            .args(["vm", "migrate-cancel", "cli"])
            .output()
            .await
            .expect("running novacronctl");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("no outgoing migration"), "{stderr}");
    });
}
