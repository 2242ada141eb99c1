//! Live migration between two VMMs over real QUIC with mutual TLS on loopback, with the test
//! guest writing memory throughout: the guest continues on the destination, its memory
//! verifies from inside and from the host, and every failure leaves it running on the source
//! with its memory intact.

use std::sync::Arc;
use std::time::Duration;

use novacron_migration::certs::ClusterDir;
use novacron_testguest::abi;
use novacron_tests::{host_checksum, require_kvm, test_guest_config, RunningVm};
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
    require_kvm();
    let cluster = Cluster::new();
    let token = [42u8; 16];
    let src = RunningVm::start(
        test_guest_config(cluster.dir.path(), "src", 64, cmdline),
        false,
    );
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
    // Mostly zero memory: far fewer bytes on the wire than the guest has.
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
fn an_unlimited_writer_converges_by_throttling() {
    let p = migrate_and_check("nc.mem=32 nc.rate=0 nc.pattern=hot nc.hot=4096", 20_000);
    assert!(p.pages_per_round.len() >= 2, "{p:?}");
}

#[test]
fn a_wrong_token_is_refused_and_the_vm_keeps_running_on_the_source() {
    require_kvm();
    let cluster = Cluster::new();
    let src = RunningVm::start(
        test_guest_config(cluster.dir.path(), "src", 64, "nc.mem=16 nc.rate=5000"),
        false,
    );
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
    let src = RunningVm::start(
        test_guest_config(cluster.dir.path(), "src", 64, "nc.mem=16 nc.rate=5000"),
        false,
    );
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
