//! The gRPC harness shared by the agent-level test files (`agent.rs`, `agent_migration.rs`).
#![allow(dead_code)] // each test file uses its own subset

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use novacron_agent::testing::TestAgent;
use novacron_proto::agent::v1 as pb;

/// A gRPC client of one agent.
pub type Client = pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>;

/// Runs one test's body on its own runtime, holding a file-wide lock so that the tests of one
/// file never boot guests at the same time.
pub fn run(test: impl Future<Output = ()>) {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(test);
}

/// A reference to a VM by id or name.
pub fn vm_ref(vm: &str) -> pb::VmRef {
    pb::VmRef {
        id_or_name: vm.into(),
    }
}

/// The test guest's status through the agent.
pub async fn guest(c: &mut Client, vm: &str) -> pb::GuestStatus {
    c.get_guest_status(vm_ref(vm))
        .await
        .unwrap_or_else(|e| panic!("GetGuestStatus {vm}: {e}"))
        .into_inner()
}

/// Creates and starts a one-vCPU test-guest VM of `memory_mib` running `cmdline`.
pub async fn start_test_guest(
    c: &mut Client,
    name: &str,
    memory_mib: u64,
    cmdline: &str,
) -> pb::Vm {
    c.create_vm(pb::CreateVmRequest {
        name: name.into(),
        vcpus: Some(1),
        memory_mib,
        cmdline: cmdline.into(),
        test_guest: true,
        start: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("CreateVm {name}: {e}"))
    .into_inner()
}

/// Waits (at most `wait`) until the guest has registered and written more than `above`
/// pages; returns the count it reported.
pub async fn wait_pages_above(c: &mut Client, vm: &str, above: u64, wait: Duration) -> u64 {
    let deadline = Instant::now() + wait;
    loop {
        let s = guest(c, vm).await;
        if s.registered && s.pages_written > above {
            return s.pages_written;
        }
        assert!(
            Instant::now() < deadline,
            "guest of {vm} did not get past {above} pages within {wait:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The VM directories under an agent's state directory, sorted.
pub fn vm_dirs(agent: &TestAgent) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(agent.state_dir().join("vms"))
        .expect("the agent creates state_dir/vms")
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Fails if a source file under `dirs` (relative to the workspace) is newer than the binary
/// `bin`: a stale binary would test old code.
pub fn check_fresh(bin: &Path, dirs: &[&str]) {
    const SOURCE_EXTENSIONS: [&str; 7] = ["rs", "c", "h", "S", "ld", "proto", "toml"];
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace");
    let mut paths: Vec<PathBuf> = dirs.iter().map(|p| root.join(p)).collect();
    while let Some(path) = paths.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                paths.extend(entries.flatten().map(|e| e.path()));
            }
            continue;
        }
        let is_source = path
            .extension()
            .is_some_and(|e| SOURCE_EXTENSIONS.iter().any(|s| e == *s));
        if is_source && meta.modified().unwrap_or(SystemTime::UNIX_EPOCH) > built {
            panic!(
                "{} is newer than {}: rebuild with `cargo build -p novacron-agent -p \
                 novacron-ctl` (`cargo test --workspace` does)",
                path.display(),
                bin.display()
            );
        }
    }
}
