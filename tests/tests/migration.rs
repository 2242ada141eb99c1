//! Live migration between two VMMs over real QUIC with mutual TLS on loopback, with the test
//! guest writing memory throughout: the guest continues on the destination, its memory
//! verifies from inside and from the host, and every failure leaves it running on the source
//! with its memory intact.

use std::sync::Arc;
use std::time::Duration;

use novacron_migration::certs::ClusterDir;
use novacron_testguest::abi;
use novacron_tests::{host_checksum, require_kvm, test_guest_config, RunningVm};
use novacron_vmm::config::DirtyTracking;
use novacron_vmm::control::{ExitReason, RunState};
use novacron_vmm::migrate::{self, Handle, IncomingParams, OutgoingParams};

const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = ClusterDir::new(dir.path().join("certs"));
        certs.init("test-cluster").unwrap();
        for agent in ["alpha", "beta"] {
            certs.issue(agent).unwrap();
        }
        Cluster { dir }
    }

    fn certs(&self) -> std::path::PathBuf {
        self.dir.path().join("certs")
    }
}

/// Starts the source VM (agent "alpha"'s side) running `cmdline`.
fn source(cluster: &Cluster, cmdline: &str) -> RunningVm {
    RunningVm::start(
        test_guest_config(cluster.dir.path(), "src", 64, cmdline),
        false,
    )
}

/// Starts an incoming VMM (agent "beta") and returns it, its handle and its address.
fn destination(
    cluster: &Cluster,
    name: &str,
    memory: u64,
    cmdline: &str,
    token: [u8; 16],
) -> (RunningVm, Arc<Handle>, std::net::SocketAddr) {
    let dst = RunningVm::start(
        test_guest_config(cluster.dir.path(), name, memory, cmdline),
        true,
    );
    let handle = Arc::new(Handle::default());
    let (addr, run) = migrate::migrate_in(
        dst.vm.clone(),
        IncomingParams {
            listen: "127.0.0.1:0".parse().unwrap(),
            token,
            cert_dir: cluster.certs(),
            agent: "beta".into(),
        },
        handle.clone(),
    )
    .expect("incoming migration listens");
    std::thread::spawn(run);
    (dst, handle, addr)
}

fn outgoing(cluster: &Cluster, addr: std::net::SocketAddr, token: [u8; 16]) -> OutgoingParams {
    OutgoingParams {
        address: addr,
        dest_agent: "beta".into(),
        token,
        cert_dir: cluster.certs(),
        agent: "alpha".into(),
        streams: 4,
        downtime_limit_ms: 50,
        time_limit_s: 60,
        force_at_time_limit: false,
        auto_converge: true,
        dirty_rate_limit: 0,
        bandwidth_limit: 0,
    }
}

/// Migrates a VM running `cmdline` and checks everything that must hold afterwards.
fn migrate_and_check(cmdline: &str, progress_pages: u64) -> migrate::Progress {
    migrate_and_check_tracking(cmdline, progress_pages, DirtyTracking::Log, 0)
}

/// [`migrate_and_check`] with the source tracking dirty pages by `mode`.
fn migrate_and_check_tracking(
    cmdline: &str,
    progress_pages: u64,
    mode: DirtyTracking,
    ring_entries: u32,
) -> migrate::Progress {
    require_kvm();
    let cluster = Cluster::new();
    let token = [42u8; 16];
    let mut config = test_guest_config(cluster.dir.path(), "src", 64, cmdline);
    config.dirty_tracking = mode;
    config.dirty_ring_entries = ring_entries;
    let src = RunningVm::start(config, false);
    let before = src.wait_status("progress on the source", WAIT, |s| {
        s.pages_written > progress_pages
    });
    let (dst, _dst_handle, addr) = destination(&cluster, "dst", 64, cmdline, token);

    let handle = Arc::new(Handle::default());
    migrate::migrate_out(
        src.vm.clone(),
        outgoing(&cluster, addr, token),
        handle.clone(),
    );
    let progress = handle.progress.lock().unwrap().clone();
    assert_eq!(progress.phase, "completed", "{progress:?}");
    let end = src.vm.wait_end();
    assert_eq!(end.reason, ExitReason::Migrated, "{end:?}");

    // The guest runs on the destination: its progress continues from where it was.
    assert_eq!(dst.vm.state(), RunState::Running);
    let after = dst.wait_status("progress on the destination", WAIT, |s| {
        s.pages_written > before.pages_written + progress_pages
    });
    assert_eq!(after.ws_pages, before.ws_pages);
    // Its whole memory verifies, from inside the guest and from the host.
    let seq = dst.vm.post_guest_command(abi::CMD_VERIFY, 0).unwrap();
    let v = dst.wait_status("verification on the destination", WAIT, |s| {
        s.cmd_ack >= seq
    });
    assert_eq!(
        v.verify_bad_pages, 0,
        "guest found bad pages after migration: {v:?}"
    );
    dst.vm.pause().unwrap();
    let paused = dst.vm.guest_status().unwrap().unwrap();
    let (sum, bad) = host_checksum(&dst.vm, &paused);
    assert_eq!(
        (sum, bad),
        (paused.checksum, 0),
        "destination memory does not match the guest's checksum"
    );
    dst.shutdown();
    src.shutdown();
    progress
}

#[test]
fn an_idle_guest_migrates() {
    let p = migrate_and_check("nc.mem=16 nc.rate=100", 50);
    assert!(p.downtime_ms.is_some());
    // Mostly untouched memory: round 0 skips pages the VMM never backed (they are zero on
    // both sides), and far fewer bytes go on the wire than the guest has.
    assert!(p.pages_per_round[0] < 64 * 256 / 2, "{p:?}");
    assert!(p.wire_bytes < 32 << 20, "{p:?}");
}

#[test]
fn a_busy_guest_migrates_with_sequential_writes() {
    migrate_and_check("nc.mem=32 nc.rate=20000 nc.pattern=seq", 20_000);
}

#[test]
fn a_busy_guest_migrates_with_random_writes() {
    migrate_and_check("nc.mem=32 nc.rate=20000 nc.pattern=random", 20_000);
}

#[test]
fn a_busy_guest_migrates_with_manual_protect() {
    migrate_and_check_tracking(
        "nc.mem=32 nc.rate=20000 nc.pattern=seq",
        20_000,
        DirtyTracking::ManualProtect,
        0,
    );
}

#[test]
fn an_unlimited_writer_converges_by_throttling() {
    let p = migrate_and_check("nc.mem=32 nc.rate=0 nc.pattern=hot nc.hot=4096", 20_000);
    assert!(p.pages_per_round.len() >= 2, "{p:?}");
}

#[test]
fn a_wrong_token_is_refused_and_the_vm_keeps_running_on_the_source() {
    require_kvm();
    let cluster = Cluster::new();
    let src = source(&cluster, "nc.mem=16 nc.rate=5000");
    let before = src.wait_status("progress", WAIT, |s| s.pages_written > 1000);
    let (dst, dst_handle, addr) = destination(&cluster, "dst", 64, "", [1; 16]);
    let handle = Arc::new(Handle::default());
    migrate::migrate_out(
        src.vm.clone(),
        outgoing(&cluster, addr, [2; 16]),
        handle.clone(),
    );
    let p = handle.progress.lock().unwrap().clone();
    assert_eq!(p.phase, "rolled-back");
    assert!(
        p.error
            .as_deref()
            .unwrap_or("")
            .contains("wrong migration token"),
        "{p:?}"
    );
    assert_eq!(src.vm.state(), RunState::Running);
    src.wait_status("progress after the refusal", WAIT, |s| {
        s.pages_written > before.pages_written + 1000
    });
    // The destination discarded everything.
    assert!(dst.vm.wait_end_timeout(WAIT));
    assert_eq!(dst.vm.wait_end().reason, ExitReason::IncomingDiscarded);
    assert_eq!(dst_handle.progress.lock().unwrap().phase, "discarded");
    src.shutdown();
    dst.shutdown();
}

#[test]
fn an_unreachable_destination_leaves_the_vm_running() {
    require_kvm();
    let cluster = Cluster::new();
    let src = source(&cluster, "nc.mem=16 nc.rate=5000");
    src.wait_status("progress", WAIT, |s| s.pages_written > 1000);
    // A port nothing listens on.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    drop(sock);
    let handle = Arc::new(Handle::default());
    migrate::migrate_out(
        src.vm.clone(),
        outgoing(&cluster, addr, [0; 16]),
        handle.clone(),
    );
    let p = handle.progress.lock().unwrap().clone();
    assert_eq!(p.phase, "rolled-back");
    assert_eq!(src.vm.state(), RunState::Running);
    src.vm.pause().unwrap();
    let s = src.vm.guest_status().unwrap().unwrap();
    assert_eq!(host_checksum(&src.vm, &s), (s.checksum, 0));
    src.shutdown();
}

/// Starts a migration on a thread; returns its handle and the thread.
fn start_out(vm: &RunningVm, params: OutgoingParams) -> (Arc<Handle>, std::thread::JoinHandle<()>) {
    let handle = Arc::new(Handle::default());
    let (h, vm) = (handle.clone(), vm.vm.clone());
    let t = std::thread::spawn(move || migrate::migrate_out(vm, params, h));
    (handle, t)
}

fn wait_wire_bytes(handle: &Handle, bytes: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    while handle.progress.lock().unwrap().wire_bytes < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "no progress: {:?}",
            handle.progress.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The source runs on with memory intact after a failed migration.
fn assert_intact_on_source(src: &RunningVm, handle: &Handle) {
    let p = handle.progress.lock().unwrap().clone();
    assert_eq!(p.phase, "rolled-back", "{p:?}");
    assert_eq!(src.vm.state(), RunState::Running);
    let before = src.vm.guest_status().unwrap().unwrap().pages_written;
    src.wait_status("progress after the rollback", WAIT, |s| {
        s.pages_written > before + 100
    });
    src.vm.pause().unwrap();
    let s = src.vm.guest_status().unwrap().unwrap();
    assert_eq!(
        host_checksum(&src.vm, &s),
        (s.checksum, 0),
        "source memory damaged"
    );
    src.vm.resume().unwrap();
}

#[test]
fn a_connection_cut_mid_way_rolls_back() {
    require_kvm();
    let cluster = Cluster::new();
    let token = [3u8; 16];
    let cmdline = "nc.mem=32 nc.rate=5000 nc.pattern=random";
    let src = source(&cluster, cmdline);
    src.wait_status("progress", WAIT, |s| s.pages_written > 10_000);
    let (dst, dst_handle, addr) = destination(&cluster, "dst", 64, cmdline, token);
    let relay = novacron_tests::Relay::start(addr);
    let mut params = outgoing(&cluster, relay.addr, token);
    params.bandwidth_limit = 8 << 20; // 8 MiB/s: round 0 takes seconds
    let (handle, t) = start_out(&src, params);
    wait_wire_bytes(&handle, 2 << 20);
    relay.cut();
    t.join().unwrap();
    assert!(
        handle
            .progress
            .lock()
            .unwrap()
            .error
            .as_deref()
            .unwrap_or("")
            .contains("timed out"),
        "{:?}",
        handle.progress.lock().unwrap()
    );
    assert_intact_on_source(&src, &handle);
    // The destination noticed too and discarded everything.
    assert!(dst.vm.wait_end_timeout(WAIT));
    assert_eq!(dst.vm.wait_end().reason, ExitReason::IncomingDiscarded);
    assert_eq!(dst_handle.progress.lock().unwrap().phase, "discarded");
    src.shutdown();
    dst.shutdown();
}

#[test]
fn a_cancelled_migration_rolls_back_and_the_destination_discards() {
    require_kvm();
    let cluster = Cluster::new();
    let token = [4u8; 16];
    let cmdline = "nc.mem=32 nc.rate=5000";
    let src = source(&cluster, cmdline);
    src.wait_status("progress", WAIT, |s| s.pages_written > 10_000);
    let (dst, _dh, addr) = destination(&cluster, "dst", 64, cmdline, token);
    let mut params = outgoing(&cluster, addr, token);
    params.bandwidth_limit = 8 << 20;
    let (handle, t) = start_out(&src, params);
    wait_wire_bytes(&handle, 1 << 20);
    handle.cancel();
    t.join().unwrap();
    assert!(handle
        .progress
        .lock()
        .unwrap()
        .error
        .as_deref()
        .unwrap_or("")
        .contains("cancelled"));
    assert_intact_on_source(&src, &handle);
    assert!(dst.vm.wait_end_timeout(WAIT));
    assert_eq!(dst.vm.wait_end().reason, ExitReason::IncomingDiscarded);
    src.shutdown();
    dst.shutdown();
}

#[test]
fn a_destination_with_another_agents_certificate_is_refused() {
    require_kvm();
    let cluster = Cluster::new();
    let token = [5u8; 16];
    let src = source(&cluster, "nc.mem=16 nc.rate=2000");
    src.wait_status("progress", WAIT, |s| s.pages_written > 1000);
    let (dst, _dh, addr) = destination(&cluster, "dst", 64, "", token);
    // The source asked for agent "alpha" but the listener presents "beta"'s certificate.
    let mut params = outgoing(&cluster, addr, token);
    params.dest_agent = "alpha".into();
    let handle = Arc::new(Handle::default());
    migrate::migrate_out(src.vm.clone(), params, handle.clone());
    let err = handle
        .progress
        .lock()
        .unwrap()
        .error
        .clone()
        .unwrap_or_default();
    assert!(err.contains("not valid for name \"alpha\""), "{err}");
    assert_intact_on_source(&src, &handle);
    src.shutdown();
    dst.shutdown();
}

#[test]
fn a_destination_process_killed_mid_way_leaves_the_vm_on_the_source() {
    require_kvm();
    let cluster = Cluster::new();
    let token = [6u8; 16];
    let cmdline = "nc.mem=32 nc.rate=5000 nc.pattern=random";
    let src = source(&cluster, cmdline);
    src.wait_status("progress", WAIT, |s| s.pages_written > 10_000);
    // The destination is a real VMM process, killed with SIGKILL during pre-copy.
    let dir = cluster.dir.path();
    let config = test_guest_config(dir, "dst", 64, cmdline);
    std::fs::write(dir.join("dst.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let agent =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/novacron-agent");
    assert!(
        agent.exists(),
        "{} is missing: cargo build -p novacron-agent (cargo test --workspace builds it)",
        agent.display()
    );
    let mut child = std::process::Command::new(&agent)
        .args(["vmm", "--incoming", "--config"])
        .arg(dir.join("dst.json"))
        .arg("--control")
        .arg(dir.join("dst.sock"))
        .arg("--exit-file")
        .arg(dir.join("dst.exit"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut client = loop {
        if let Ok(c) =
            novacron_vmm::control::Client::connect(&dir.join("dst.sock"), Duration::from_secs(5))
        {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "destination VMM did not come up"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let reply = client
        .call(&novacron_vmm::control::Request::MigrateIn {
            params: IncomingParams {
                listen: "127.0.0.1:0".parse().unwrap(),
                token,
                cert_dir: cluster.certs(),
                agent: "beta".into(),
            },
        })
        .unwrap();
    let novacron_vmm::control::Response::MigrationListening { address } = reply else {
        panic!("MigrateIn: {reply:?}");
    };
    let mut params = outgoing(&cluster, address.parse().unwrap(), token);
    params.bandwidth_limit = 8 << 20;
    let (handle, t) = start_out(&src, params);
    wait_wire_bytes(&handle, 2 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    t.join().unwrap();
    assert_intact_on_source(&src, &handle);
    src.shutdown();
}

#[test]
fn ten_migrations_back_and_forth() {
    require_kvm();
    let cluster = Cluster::new();
    let cmdline = "nc.mem=16 nc.rate=5000 nc.pattern=random";
    let mut vm = RunningVm::start(
        test_guest_config(cluster.dir.path(), "vm0", 64, cmdline),
        false,
    );
    let mut last = vm
        .wait_status("progress", WAIT, |s| s.pages_written > 2000)
        .pages_written;
    for i in 1..=10u8 {
        let token = [i; 16];
        let (dst, _dh, addr) = destination(&cluster, &format!("vm{i}"), 64, cmdline, token);
        let handle = Arc::new(Handle::default());
        migrate::migrate_out(
            vm.vm.clone(),
            outgoing(&cluster, addr, token),
            handle.clone(),
        );
        let p = handle.progress.lock().unwrap().clone();
        assert_eq!(p.phase, "completed", "migration {i}: {p:?}");
        assert_eq!(vm.vm.wait_end().reason, ExitReason::Migrated);
        vm.shutdown();
        let s = dst.wait_status("progress on the new host", WAIT, |s| {
            s.pages_written > last + 500
        });
        last = s.pages_written;
        vm = dst;
    }
    let seq = vm.vm.post_guest_command(abi::CMD_VERIFY, 0).unwrap();
    let v = vm.wait_status("verification after ten migrations", WAIT, |s| {
        s.cmd_ack >= seq
    });
    assert_eq!(v.verify_bad_pages, 0);
    vm.vm.pause().unwrap();
    let s = vm.vm.guest_status().unwrap().unwrap();
    assert_eq!(host_checksum(&vm.vm, &s), (s.checksum, 0));
    vm.shutdown();
}
