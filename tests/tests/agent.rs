//! The agent end to end with nothing faked: the real `novacron-agent` daemon (over its gRPC
//! unix socket), real VMM processes (`novacron-agent vmm`) on the real /dev/kvm, and the
//! NovaCron test guest inside them.
//!
//! The daemon binary is `target/<profile>/novacron-agent`, which `cargo test --workspace`
//! builds before running tests (or `$NOVACRON_AGENT_BIN`). A missing or out-of-date binary
//! fails the tests with the command that fixes it; nothing here is ever skipped.
//!
//! The tests take a file-wide lock, so they run one at a time even without
//! `--test-threads=1`: each boots guests, and the host has few cores.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_agent::testing::{agent_binary, TestAgent, TestAgentOptions};
use novacron_proto::agent::v1 as pb;
use novacron_testguest::abi;
use novacron_vmm::control::{Client as VmmClient, GuestStatusWire, Request, Response};
use tonic::Code;

mod common;
use common::{check_fresh, guest, run, vm_dirs, vm_ref, wait_pages_above, Client};

/// Generous bound for anything the tests wait for (boots take milliseconds).
const WAIT: Duration = Duration::from_secs(20);
/// Guest memory of every VM here, in MiB.
const MEMORY_MIB: u64 = 32;
/// A small, rate-limited working set with a progress line on the console every 100 ms.
const GUEST: &str = "nc.mem=8 nc.rate=4000 nc.log_ms=100";

// ---------------------------------------------------------------------------------------
// Harness.

/// Starts a real agent daemon with default options.
async fn start_agent() -> TestAgent {
    start_agent_with(TestAgentOptions::default()).await
}

/// Starts a real agent daemon; fails loudly if KVM or the daemon binary is missing, or if
/// the binary is older than the sources it is built from.
async fn start_agent_with(opts: TestAgentOptions) -> TestAgent {
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
                "agent/guest/Cargo.toml",
                "agent/guest/build.rs",
                "agent/guest/src",
                "proto",
            ],
        );
    }
    TestAgent::start_with(opts)
        .await
        .unwrap_or_else(|e| panic!("starting the agent {}: {e}", bin.display()))
}

fn guest_vm(name: &str, cmdline: &str, start: bool) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.into(),
        vcpus: Some(1),
        memory_mib: MEMORY_MIB,
        cmdline: cmdline.into(),
        test_guest: true,
        start,
        ..Default::default()
    }
}

async fn get(c: &mut Client, vm: &str) -> pb::Vm {
    c.get_vm(vm_ref(vm))
        .await
        .unwrap_or_else(|e| panic!("GetVm {vm}: {e}"))
        .into_inner()
}

async fn names(c: &mut Client) -> Vec<String> {
    c.list_vms(pb::ListVmsRequest {})
        .await
        .expect("ListVms")
        .into_inner()
        .vms
        .into_iter()
        .map(|v| v.name)
        .collect()
}

async fn wait_state(c: &mut Client, vm: &str, state: &str) -> pb::Vm {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = get(c, vm).await;
        if v.state == state {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "VM {vm} did not become {state} within {WAIT:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request straight to a VMM's control socket, bypassing the agent.
fn vmm_call(agent: &TestAgent, id: &str, req: &Request) -> Response {
    let socket = agent.vm_dir(id).join("control.sock");
    VmmClient::connect(&socket, Duration::from_secs(10))
        .and_then(|mut c| c.call(req))
        .unwrap_or_else(|e| panic!("{req:?} to {}: {e}", socket.display()))
}

fn vmm_guest_status(agent: &TestAgent, id: &str) -> GuestStatusWire {
    match vmm_call(agent, id, &Request::GuestStatus) {
        Response::GuestStatus {
            status: Some(status),
        } => status,
        other => panic!("guest status of {id} from its VMM: {other:?}"),
    }
}

/// Whether a process exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        !matches!(state, None | Some("Z") | Some("X"))
    })
}

async fn wait_pid_gone(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "VMM pid {pid} still alive after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole console log of a VM through StreamConsole (from the start, no follow).
async fn console_text(c: &mut Client, vm: &str) -> String {
    let mut s = c
        .stream_console(pb::ConsoleRequest {
            id_or_name: vm.into(),
            follow: false,
            from_start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("StreamConsole {vm}: {e}"))
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.expect("console chunk") {
        out.extend_from_slice(&chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until the console holds a complete line starting with `prefix`; returns that line
/// and the whole console text.
async fn wait_console_line(c: &mut Client, vm: &str, prefix: &str) -> (String, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = console_text(c, vm).await;
        // Only lines that end in a newline: the guest may be in the middle of one.
        let line = text
            .split_inclusive('\n')
            .find(|l| l.starts_with(prefix) && l.ends_with('\n'));
        if let Some(line) = line {
            return (line.trim_end().to_string(), text);
        }
        assert!(
            Instant::now() < deadline,
            "no complete {prefix:?} line on the console of {vm} within {WAIT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that samples of the guest's `pages_written` never go backwards.
#[derive(Default)]
struct Monotonic(Vec<(&'static str, u64)>);

impl Monotonic {
    fn push(&mut self, source: &'static str, pages: u64) -> u64 {
        if let Some(&(prev_source, prev)) = self.0.last() {
            assert!(
                pages >= prev,
                "pages_written went backwards: {prev} ({prev_source}) then {pages} ({source}); \
                 samples: {:?}",
                self.0
            );
        }
        self.0.push((source, pages));
        pages
    }
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn full_lifecycle_over_grpc() {
    run(async {
        let agent = start_agent().await;
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(agent.socket()).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "API socket mode {mode:o}");
        let mut c = agent.client().await.unwrap();

        let mut req = guest_vm("life", GUEST, false);
        req.vcpus = Some(2);
        let vm = c.create_vm(req).await.expect("CreateVm").into_inner();
        assert_eq!(vm.state, "created", "{vm:?}");
        assert_eq!((vm.vcpus, vm.memory_mib), (2, MEMORY_MIB));
        assert_eq!(vm.entry, "long64");
        assert_eq!(vm.pid, 0);
        assert!(vm.vcpu_tids.is_empty());
        assert!(vm.exit_reason.is_empty());
        let dir = agent.vm_dir(&vm.id);
        assert!(dir.join("spec.json").is_file());
        assert_eq!(get(&mut c, &vm.id).await.name, "life", "lookup by id");
        // Only a running VM can be paused, stopped or asked about its guest.
        for (what, e) in [
            ("PauseVm", c.pause_vm(vm_ref("life")).await.unwrap_err()),
            ("ResumeVm", c.resume_vm(vm_ref("life")).await.unwrap_err()),
            (
                "StopVm",
                c.stop_vm(pb::StopVmRequest {
                    id_or_name: "life".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            ),
            (
                "GetGuestStatus",
                c.get_guest_status(vm_ref("life")).await.unwrap_err(),
            ),
        ] {
            assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
            assert!(e.message().contains("created"), "{what}: {}", e.message());
        }

        // Start: a VMM process with one thread per vCPU, and the guest writing.
        let v = c
            .start_vm(vm_ref("life"))
            .await
            .expect("StartVm")
            .into_inner();
        assert_eq!(v.state, "running", "{v:?}");
        assert_ne!(v.pid, 0);
        assert!(pid_alive(v.pid));
        assert_eq!(v.vcpu_tids.len(), 2, "{v:?}");
        for tid in &v.vcpu_tids {
            assert!(
                Path::new(&format!("/proc/{}/task/{tid}", v.pid)).exists(),
                "vCPU tid {tid} is not a thread of VMM {}",
                v.pid
            );
        }
        assert_eq!(get(&mut c, "life").await.state, "running");
        let pid = v.pid;
        // The VMM runs in its own session, so it outlives the agent.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let session = stat.rsplit(')').next().unwrap().split_whitespace().nth(3);
        assert_eq!(session, Some(pid.to_string().as_str()), "{stat}");
        // A running VM cannot be started again, nor deleted without force.
        let e = c.start_vm(vm_ref("life")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let e = c
            .delete_vm(pb::DeleteVmRequest {
                id_or_name: "life".into(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let p1 = wait_pages_above(&mut c, "life", 0, WAIT).await;
        let p2 = wait_pages_above(&mut c, "life", p1, WAIT).await;

        // Pause: the guest's counters freeze.
        let v = c
            .pause_vm(vm_ref("life"))
            .await
            .expect("PauseVm")
            .into_inner();
        assert_eq!(v.state, "paused");
        assert_eq!(get(&mut c, "life").await.state, "paused");
        let frozen = guest(&mut c, "life").await;
        assert!(frozen.pages_written >= p2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let still = guest(&mut c, "life").await;
        assert_eq!(
            (still.pages_written, still.seq, still.checksum),
            (frozen.pages_written, frozen.seq, frozen.checksum),
            "a paused guest kept writing"
        );

        // Resume: it writes again.
        let v = c
            .resume_vm(vm_ref("life"))
            .await
            .expect("ResumeVm")
            .into_inner();
        assert_eq!(v.state, "running");
        assert_eq!(v.pid, pid);
        wait_pages_above(&mut c, "life", frozen.pages_written, WAIT).await;

        // Graceful stop: the guest is asked to power off, and does.
        let v = c
            .stop_vm(pb::StopVmRequest {
                id_or_name: "life".into(),
                force: false,
                timeout_ms: 10_000,
            })
            .await
            .expect("StopVm")
            .into_inner();
        assert_eq!(v.state, "stopped", "{v:?}");
        assert_eq!(v.exit_reason, "guest_poweroff", "{v:?}");
        assert_eq!(v.pid, 0);
        assert!(v.vcpu_tids.is_empty());
        assert!(!pid_alive(pid), "VMM {pid} outlived the stop");
        let console = console_text(&mut c, "life").await;
        assert!(console.contains("novacron-guest: poweroff"), "{console}");

        // Delete: gone from the API and from disk.
        let id = c
            .delete_vm(pb::DeleteVmRequest {
                id_or_name: "life".into(),
                force: false,
            })
            .await
            .expect("DeleteVm")
            .into_inner()
            .id;
        assert_eq!(id, vm.id);
        let e = c.get_vm(vm_ref(&id)).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(names(&mut c).await.is_empty());
        assert!(!dir.exists(), "{} survived the delete", dir.display());
        assert!(vm_dirs(&agent).is_empty(), "{:?}", vm_dirs(&agent));
    });
}

#[test]
fn the_guest_never_stops_while_the_agent_restarts() {
    run(async {
        let mut agent = start_agent().await;
        let mut c = agent.client().await.unwrap();
        let vm = c
            .create_vm(guest_vm("survivor", GUEST, true))
            .await
            .expect("CreateVm")
            .into_inner();
        assert_eq!(vm.state, "running", "{vm:?}");
        let (id, pid) = (vm.id.clone(), vm.pid);
        let mut seen = Monotonic::default();
        seen.push("agent", wait_pages_above(&mut c, "survivor", 0, WAIT).await);

        for crash in [true, false] {
            let how = if crash { "SIGKILL" } else { "SIGTERM" };
            seen.push("agent", guest(&mut c, "survivor").await.pages_written);
            // A console follower must not hold a clean shutdown up.
            let mut follower = c
                .stream_console(pb::ConsoleRequest {
                    id_or_name: "survivor".into(),
                    follow: true,
                    from_start: false,
                })
                .await
                .expect("StreamConsole follow")
                .into_inner();
            drop(c);
            if crash {
                agent.kill().expect("killing the agent");
            } else {
                let status = agent.shutdown().expect("stopping the agent");
                assert!(
                    status.success(),
                    "agent exit status after SIGTERM: {status}"
                );
                assert!(
                    !agent.log().contains("still in flight"),
                    "shutdown waited for requests:\n{}",
                    agent.log()
                );
                assert!(!agent.socket().exists(), "API socket left after shutdown");
            }
            let ended = tokio::time::timeout(WAIT, async {
                while let Ok(Some(_)) = follower.message().await {}
            })
            .await;
            assert!(ended.is_ok(), "console stream outlived the agent ({how})");

            // The agent is down; the guest keeps writing (asked straight from its VMM).
            assert!(pid_alive(pid), "VMM {pid} died with the agent ({how})");
            let down = seen.push("vmm", vmm_guest_status(&agent, &id).pages_written);
            let deadline = Instant::now() + WAIT;
            while seen.push("vmm", vmm_guest_status(&agent, &id).pages_written) <= down {
                assert!(
                    Instant::now() < deadline,
                    "the guest stopped writing while the agent was down ({how})"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }

            // The agent comes back and re-attaches to the same VMM.
            agent
                .restart()
                .await
                .unwrap_or_else(|e| panic!("restarting the agent after {how}: {e}"));
            c = agent.client().await.unwrap();
            let v = get(&mut c, "survivor").await;
            assert_eq!(v.state, "running", "after {how}: {v:?}");
            assert_eq!(v.pid, pid, "after {how}: a different VMM");
            assert_eq!(v.vcpu_tids, vm.vcpu_tids, "after {how}");
            assert!(v.exit_reason.is_empty(), "after {how}: {v:?}");
            let back = seen.push("agent", guest(&mut c, "survivor").await.pages_written);
            seen.push(
                "agent",
                wait_pages_above(&mut c, "survivor", back, WAIT).await,
            );
        }

        // The guest's memory is intact after all that.
        c.guest_command(pb::GuestCommandRequest {
            id_or_name: "survivor".into(),
            cmd: abi::CMD_VERIFY,
            arg: 0,
        })
        .await
        .expect("GuestCommand VERIFY");
        let deadline = Instant::now() + WAIT;
        let verified = loop {
            let s = guest(&mut c, "survivor").await;
            if s.verify_count >= 1 {
                break s;
            }
            assert!(Instant::now() < deadline, "no verification: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(verified.verify_bad_pages, 0, "{verified:?}");
        seen.push("agent", verified.pages_written);
        let (line, console) =
            wait_console_line(&mut c, "survivor", "novacron-guest: verify ").await;
        assert!(
            line.starts_with("novacron-guest: verify ok "),
            "verification failed:\n{console}"
        );
        assert_eq!(agent.vmm_pids(), vec![pid]);

        // A paused VM is re-attached as paused.
        c.pause_vm(vm_ref("survivor")).await.expect("PauseVm");
        drop(c);
        agent.restart().await.expect("restarting the agent");
        let mut c = agent.client().await.unwrap();
        let v = get(&mut c, "survivor").await;
        assert_eq!((v.state.as_str(), v.pid), ("paused", pid), "{v:?}");
        let v = c.resume_vm(vm_ref("survivor")).await.expect("ResumeVm");
        assert_eq!(v.into_inner().state, "running");
        let p = seen.push("agent", guest(&mut c, "survivor").await.pages_written);
        seen.push("agent", wait_pages_above(&mut c, "survivor", p, WAIT).await);

        // A VMM the agent did not start (re-attached) stops gracefully too.
        let v = c
            .stop_vm(pb::StopVmRequest {
                id_or_name: "survivor".into(),
                force: false,
                timeout_ms: 10_000,
            })
            .await
            .expect("StopVm")
            .into_inner();
        assert_eq!(
            (v.state.as_str(), v.exit_reason.as_str(), v.pid),
            ("stopped", "guest_poweroff", 0),
            "{v:?}"
        );
        wait_pid_gone(pid).await;
    });
}

#[test]
fn a_killed_vmm_fails_its_vm_and_the_agent_keeps_serving() {
    run(async {
        let mut agent = start_agent().await;
        let mut c = agent.client().await.unwrap();
        let vm = c
            .create_vm(guest_vm("victim", GUEST, true))
            .await
            .expect("CreateVm")
            .into_inner();
        wait_pages_above(&mut c, "victim", 0, WAIT).await;
        assert_eq!(agent.vmm_pids(), vec![vm.pid]);

        agent.kill_vmms();
        let v = wait_state(&mut c, "victim", "failed").await;
        assert_eq!(v.exit_reason, "vmm_lost", "{v:?}");
        assert!(
            v.exit_detail
                .contains("VMM process exited without an exit record"),
            "{}",
            v.exit_detail
        );
        assert!(v.exit_detail.contains("signal 9"), "{}", v.exit_detail);
        assert_eq!(v.pid, 0);
        assert!(v.vcpu_tids.is_empty());
        assert_eq!(names(&mut c).await, ["victim"]);
        // A restarted agent comes to the same verdict.
        drop(c);
        agent.restart().await.expect("restarting the agent");
        let mut c = agent.client().await.unwrap();
        let v = get(&mut c, "victim").await;
        assert_eq!(
            (v.state.as_str(), v.exit_reason.as_str()),
            ("failed", "vmm_lost")
        );
        assert!(
            v.exit_detail.contains("without an exit record"),
            "{}",
            v.exit_detail
        );

        // The VM can run again, and a force-delete stops it first.
        let v = c
            .start_vm(vm_ref("victim"))
            .await
            .expect("StartVm")
            .into_inner();
        assert_eq!(v.state, "running", "{v:?}");
        assert!(v.exit_reason.is_empty());
        assert_ne!(v.pid, vm.pid);
        wait_pages_above(&mut c, "victim", 0, WAIT).await;
        c.delete_vm(pb::DeleteVmRequest {
            id_or_name: "victim".into(),
            force: true,
        })
        .await
        .expect("DeleteVm force");
        wait_pid_gone(v.pid).await;
        assert!(names(&mut c).await.is_empty());
        assert!(vm_dirs(&agent).is_empty(), "{:?}", vm_dirs(&agent));
    });
}

#[test]
fn guest_triple_fault_and_panic_fail_the_vm_with_details() {
    run(async {
        let agent = start_agent().await;
        let mut c = agent.client().await.unwrap();
        // (name, cmdline, reason, detail)
        let cases = [
            (
                "faulty",
                "nc.mem=8 nc.rate=2000 nc.fault_after_pages=200",
                "triple_fault",
                "rip=",
            ),
            (
                "panicky",
                "nc.mem=8 nc.rate=2000 nc.panic_after_pages=200",
                "guest_panic",
                "requested by nc.panic_after_pages",
            ),
        ];
        for (name, cmdline, reason, detail) in cases {
            c.create_vm(guest_vm(name, cmdline, false))
                .await
                .expect("CreateVm");
            // The guest may fail before the start returns; then the start says so.
            if let Err(e) = c.start_vm(vm_ref(name)).await {
                assert_eq!(e.code(), Code::Internal, "{e:?}");
                assert!(e.message().contains(detail), "{}", e.message());
            }
            let v = wait_state(&mut c, name, "failed").await;
            assert_eq!(v.exit_reason, reason, "{v:?}");
            assert!(v.exit_detail.contains(detail), "{}", v.exit_detail);
            assert_eq!(v.pid, 0);
        }
        let v = get(&mut c, "faulty").await;
        assert!(v.exit_detail.contains("cr3="), "{}", v.exit_detail);
        let console = console_text(&mut c, "panicky").await;
        assert!(
            console.contains("novacron-guest: panic requested by nc.panic_after_pages"),
            "{console}"
        );
        assert!(agent.vmm_pids().is_empty());
        assert_eq!(names(&mut c).await, ["faulty", "panicky"]);
    });
}

#[test]
fn a_guest_that_powers_off_while_the_agent_is_down_is_stopped_after_restart() {
    run(async {
        let mut agent = start_agent().await;
        let mut c = agent.client().await.unwrap();
        let mut vms = Vec::new();
        for name in ["off-by-stop", "off-by-command"] {
            let v = c
                .create_vm(guest_vm(name, GUEST, true))
                .await
                .expect("CreateVm")
                .into_inner();
            wait_pages_above(&mut c, name, 0, WAIT).await;
            vms.push(v);
        }
        drop(c);
        agent.kill().expect("killing the agent");

        // While no agent runs: a graceful stop straight to one VMM, a guest power-off
        // command to the other.
        let stop = Request::Stop {
            force: false,
            timeout_ms: 10_000,
        };
        assert_eq!(vmm_call(&agent, &vms[0].id, &stop), Response::Ok);
        let poweroff = Request::GuestCommand {
            cmd: abi::CMD_POWEROFF,
            arg: 0,
        };
        assert_eq!(vmm_call(&agent, &vms[1].id, &poweroff), Response::Ok);
        for v in &vms {
            wait_pid_gone(v.pid).await;
        }

        agent.restart().await.expect("restarting the agent");
        let mut c = agent.client().await.unwrap();
        for v in &vms {
            let now = get(&mut c, &v.name).await;
            assert_eq!(now.state, "stopped", "{now:?}");
            assert_eq!(now.exit_reason, "guest_poweroff", "{now:?}");
            assert_eq!(now.pid, 0);
        }
        assert!(agent.vmm_pids().is_empty());
    });
}

#[test]
fn console_streams_the_guest_output_and_follows_it() {
    run(async {
        let agent = start_agent().await;
        let mut c = agent.client().await.unwrap();
        c.create_vm(guest_vm("talker", GUEST, true))
            .await
            .expect("CreateVm");

        let (ready, text) = wait_console_line(&mut c, "talker", "novacron-guest: ready ").await;
        assert!(
            ready.starts_with("novacron-guest: ready ws_pages=2048 rate=4000 "),
            "{text}"
        );
        let head: Vec<&str> = text.lines().take(3).collect();
        assert!(
            head.contains(&ready.as_str()),
            "the ready line is among the guest's first lines:\n{text}"
        );

        // Following from the end: only new output, and it keeps coming.
        let mut s = c
            .stream_console(pb::ConsoleRequest {
                id_or_name: "talker".into(),
                follow: true,
                from_start: false,
            })
            .await
            .expect("StreamConsole follow")
            .into_inner();
        // Page counts of the complete progress lines (the first and last chunks may hold
        // parts of lines).
        let progress = |text: &str| -> Vec<u64> {
            text.split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .filter_map(|l| l.strip_prefix("novacron-guest: progress pages="))
                .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
                .collect()
        };
        let mut text = String::new();
        while progress(&text).len() < 3 {
            let chunk = tokio::time::timeout(WAIT, s.message())
                .await
                .unwrap_or_else(|_| panic!("no console output for {WAIT:?}; so far:\n{text}"))
                .expect("console chunk")
                .expect("the stream ended while following");
            text.push_str(&String::from_utf8_lossy(&chunk.data));
        }
        assert!(!text.contains("novacron-guest: ready"), "{text}");
        let counts = progress(&text);
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "progress lines do not advance: {counts:?}\n{text}"
        );
    });
}

#[test]
fn bad_requests_are_refused_naming_the_field_and_leave_nothing() {
    run(async {
        let agent = start_agent().await;
        let mut c = agent.client().await.unwrap();
        let taken = c
            .create_vm(guest_vm("taken", GUEST, false))
            .await
            .expect("CreateVm")
            .into_inner();
        let bare = |name: &str, kernel: &str| pb::CreateVmRequest {
            name: name.into(),
            memory_mib: MEMORY_MIB,
            kernel: kernel.into(),
            ..Default::default()
        };
        let scratch = agent.scratch().display().to_string();
        let mut no_initramfs = guest_vm("v", GUEST, false);
        no_initramfs.initramfs = "/nonexistent/initrd.img".into();
        let mut huge = guest_vm("v", GUEST, true);
        huge.memory_mib = 10 << 20; // 10 TiB
        let mut many = guest_vm("v", GUEST, true);
        many.vcpus = Some(255);
        let mut bad_entry = guest_vm("v", GUEST, true);
        bad_entry.entry = "bios".into();
        // (what, request, code, text the message must hold)
        let cases: Vec<(&str, pb::CreateVmRequest, Code, &str)> = vec![
            (
                "no kernel",
                bare("v", ""),
                Code::InvalidArgument,
                "invalid kernel: ",
            ),
            (
                "missing kernel",
                bare("v", "/nonexistent/vmlinuz"),
                Code::InvalidArgument,
                "invalid kernel: /nonexistent/vmlinuz",
            ),
            (
                "kernel is a directory",
                bare("v", &scratch),
                Code::InvalidArgument,
                "invalid kernel: ",
            ),
            (
                "missing initramfs",
                no_initramfs,
                Code::InvalidArgument,
                "invalid initramfs: /nonexistent/initrd.img",
            ),
            (
                "10 TiB of memory",
                huge,
                Code::InvalidArgument,
                "invalid memory_mib: ",
            ),
            ("255 vCPUs", many, Code::InvalidArgument, "invalid vcpus: "),
            (
                "unknown entry",
                bad_entry,
                Code::InvalidArgument,
                "invalid entry: ",
            ),
            (
                "duplicate name",
                guest_vm("taken", GUEST, true),
                Code::AlreadyExists,
                "\"taken\"",
            ),
            (
                "name with a space",
                guest_vm("bad name", GUEST, true),
                Code::InvalidArgument,
                "invalid name: ",
            ),
            (
                "name with a slash",
                guest_vm("a/b", GUEST, true),
                Code::InvalidArgument,
                "invalid name: ",
            ),
            (
                "empty name",
                guest_vm("", GUEST, true),
                Code::InvalidArgument,
                "invalid name: ",
            ),
        ];
        for (what, req, code, text) in cases {
            let e = c
                .create_vm(req)
                .await
                .expect_err(&format!("{what} was accepted"));
            assert_eq!(e.code(), code, "{what}: {e:?}");
            assert!(e.message().contains(text), "{what}: {}", e.message());
        }
        assert_eq!(names(&mut c).await, ["taken"]);
        assert_eq!(vm_dirs(&agent), std::slice::from_ref(&taken.id));
        assert!(agent.vmm_pids().is_empty());

        // An unset vcpus is the default, 1; an explicit 0 is refused.
        let mut unset = guest_vm("default-vcpus", GUEST, false);
        unset.vcpus = None;
        let v = c.create_vm(unset).await.expect("CreateVm").into_inner();
        assert_eq!(v.vcpus, 1);
        c.delete_vm(pb::DeleteVmRequest {
            id_or_name: "default-vcpus".into(),
            force: false,
        })
        .await
        .expect("DeleteVm");
        let mut zero = guest_vm("zero-vcpus", GUEST, false);
        zero.vcpus = Some(0);
        let e = c.create_vm(zero).await.expect_err("0 vCPUs accepted");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("invalid vcpus: 0: expected 1 to 254"),
            "{}",
            e.message()
        );
        assert_eq!(names(&mut c).await, ["taken"]);

        // Unknown VMs, by every call that takes one.
        let nf = |what: &str, r: Result<(), tonic::Status>| {
            let e = r.expect_err(&format!("{what} of an unknown VM succeeded"));
            assert_eq!(e.code(), Code::NotFound, "{what}: {e:?}");
            assert!(
                e.message().contains("no-such-vm"),
                "{what}: {}",
                e.message()
            );
        };
        let unknown = || vm_ref("no-such-vm");
        nf("GetVm", c.get_vm(unknown()).await.map(drop));
        nf("StartVm", c.start_vm(unknown()).await.map(drop));
        nf(
            "StopVm",
            c.stop_vm(pb::StopVmRequest {
                id_or_name: "no-such-vm".into(),
                force: true,
                timeout_ms: 0,
            })
            .await
            .map(drop),
        );
        nf(
            "DeleteVm",
            c.delete_vm(pb::DeleteVmRequest {
                id_or_name: "no-such-vm".into(),
                force: true,
            })
            .await
            .map(drop),
        );
        nf("PauseVm", c.pause_vm(unknown()).await.map(drop));
        nf("ResumeVm", c.resume_vm(unknown()).await.map(drop));
        nf(
            "GetGuestStatus",
            c.get_guest_status(unknown()).await.map(drop),
        );
        nf(
            "GuestCommand",
            c.guest_command(pb::GuestCommandRequest {
                id_or_name: "no-such-vm".into(),
                cmd: abi::CMD_VERIFY,
                arg: 0,
            })
            .await
            .map(drop),
        );
        nf(
            "StreamConsole",
            c.stream_console(pb::ConsoleRequest {
                id_or_name: "no-such-vm".into(),
                follow: false,
                from_start: true,
            })
            .await
            .map(drop),
        );
        assert_eq!(names(&mut c).await, ["taken"]);
        assert_eq!(vm_dirs(&agent), [taken.id]);
    });
}

#[test]
fn a_kernel_the_vmm_cannot_boot_fails_the_start_with_its_reason() {
    run(async {
        let agent = start_agent().await;
        let mut c = agent.client().await.unwrap();
        // A file that passes the create checks but is no kernel.
        let junk = agent.scratch().join("junk-kernel");
        std::fs::write(&junk, vec![0u8; 4096]).unwrap();
        let req = pb::CreateVmRequest {
            name: "junk".into(),
            memory_mib: MEMORY_MIB,
            kernel: junk.display().to_string(),
            start: true,
            ..Default::default()
        };
        let e = c.create_vm(req).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e:?}");
        assert!(e.message().contains("failed to start"), "{}", e.message());
        assert!(e.message().contains("neither an ELF"), "{}", e.message());
        let v = get(&mut c, "junk").await;
        assert_eq!((v.state.as_str(), v.pid), ("failed", 0), "{v:?}");
        assert_eq!(v.exit_reason, "vmm_error", "{v:?}");
        assert!(v.exit_detail.contains("neither an ELF"), "{v:?}");
        assert!(agent.vmm_pids().is_empty());
        // The agent is unharmed; the VM can be retried (and fails the same way) and deleted.
        let e = c.start_vm(vm_ref("junk")).await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e:?}");
        c.delete_vm(pb::DeleteVmRequest {
            id_or_name: "junk".into(),
            force: false,
        })
        .await
        .expect("DeleteVm");
        assert!(vm_dirs(&agent).is_empty(), "{:?}", vm_dirs(&agent));
    });
}

#[test]
fn console_follow_loses_nothing_across_rotations() {
    run(async {
        const MAX: u64 = 4096;
        let agent = start_agent_with(TestAgentOptions {
            console_log_max_bytes: Some(MAX),
            ..Default::default()
        })
        .await;
        let mut c = agent.client().await.unwrap();
        // A progress line every 20 ms: the log rotates about every 1.5 s.
        let v = c
            .create_vm(guest_vm(
                "chatty",
                "nc.mem=8 nc.rate=4000 nc.log_ms=20",
                true,
            ))
            .await
            .expect("CreateVm")
            .into_inner();
        let mut s = c
            .stream_console(pb::ConsoleRequest {
                id_or_name: "chatty".into(),
                follow: true,
                from_start: true,
            })
            .await
            .expect("StreamConsole follow")
            .into_inner();
        let current = PathBuf::from(&v.console_log);
        let rotated = PathBuf::from(format!("{}.1", v.console_log));
        let deadline = Instant::now() + WAIT;
        while !rotated.exists() {
            assert!(Instant::now() < deadline, "the console log never rotated");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Freeze the output just after the first rotation: everything the guest wrote is
        // now console.log.1 followed by console.log.
        c.pause_vm(vm_ref("chatty")).await.expect("PauseVm");
        let mut want = std::fs::read(&rotated).unwrap();
        want.extend(std::fs::read(&current).unwrap());
        // The guest's first lines are still there, so the log rotated exactly once.
        let head = String::from_utf8_lossy(&want[..want.len().min(300)]).into_owned();
        assert!(
            head.contains("novacron-guest: ready "),
            "rotated more than once before the pause; cannot check:\n{head}"
        );
        let mut got = Vec::new();
        while got.len() < want.len() {
            let chunk = tokio::time::timeout(WAIT, s.message())
                .await
                .unwrap_or_else(|_| {
                    panic!("console stalled at {} of {} bytes", got.len(), want.len())
                })
                .expect("console chunk")
                .expect("the stream ended while following");
            got.extend_from_slice(&chunk.data);
        }
        assert!(
            got == want,
            "the followed console differs from console.log.1 + console.log \
             ({} vs {} bytes)",
            got.len(),
            want.len()
        );
        assert!(want.len() as u64 > MAX);
    });
}
