//! Tests of the agent daemon (the real `novacron-agent` binary) that the real VMM cannot
//! drive. Everything the real VMM can show — the VM lifecycle, agent restarts, guest and
//! VMM failures, the console, API errors — is tested with real VMM processes and the test
//! guest in `tests/tests/agent.rs` (package novacron-tests).
//!
//! What remains here:
//!
//! * A VMM that never answers on its control socket, so the agent's start timeout kills it.
//!   The real VMM always answers, so this one case uses a fake: the agent is configured with
//!   `vmm_binary = <a shell script>` that, started as `<script> vmm ...`, just sleeps.
//! * Checks of the daemon itself that involve no VM: configuration errors and the state
//!   directory lock.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use novacron_agent::testing::{TestAgent, TestAgentOptions};
use novacron_proto::agent::v1 as pb;
use tonic::Code;

/// The fake VMM: a script that never opens its control socket (a hung VMM).
fn silent_vmm(dir: &Path) -> PathBuf {
    let path = dir.join("silent-vmm");
    std::fs::write(&path, "#!/bin/sh\nexec sleep 3600\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_novacron-agent"))
}

#[tokio::test]
async fn start_timeout_kills_a_silent_vmm() {
    let scripts = tempfile::tempdir().unwrap();
    let agent = TestAgent::start_with(TestAgentOptions {
        agent_binary: Some(agent_bin()),
        vmm_binary: Some(silent_vmm(scripts.path())),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = agent.client().await.unwrap();
    // The fake never reads it, but the agent checks that the kernel is a readable file.
    let kernel = agent.scratch().join("kernel");
    std::fs::write(&kernel, vec![0u8; 4096]).unwrap();
    let e = c
        .create_vm(pb::CreateVmRequest {
            name: "mute".into(),
            memory_mib: 32,
            kernel: kernel.display().to_string(),
            start: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    // It waited the whole start timeout before giving up.
    let waited = format!(
        "did not answer on its control socket within {:.1} s",
        novacron_agent::manager::DEFAULT_START_TIMEOUT.as_secs_f64()
    );
    assert!(e.message().contains(&waited), "{}", e.message());
    let v = c
        .get_vm(pb::VmRef {
            id_or_name: "mute".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.state.as_str(), v.exit_reason.as_str(), v.pid),
        ("failed", "vmm_error", 0)
    );
    assert!(
        v.exit_detail.contains("did not answer"),
        "{}",
        v.exit_detail
    );
    assert!(agent.vmm_pids().is_empty(), "the silent VMM was not killed");
}

#[test]
fn bad_config_exits_2_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "socket = \"/tmp/x.sock\"\nstop_timeout = 5\n").unwrap();
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("stop_timeout"), "{err}");

    let out = std::process::Command::new(agent_bin())
        .arg("print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        novacron_agent::config::DEFAULT_CONFIG_TOML
    );
}

#[tokio::test]
async fn two_agents_cannot_share_a_state_dir() {
    let agent = TestAgent::start_with(TestAgentOptions {
        agent_binary: Some(agent_bin()),
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = agent.scratch().join("second.toml");
    std::fs::write(
        &cfg,
        format!(
            "socket = \"{}\"\nstate_dir = \"{}\"\n",
            agent.scratch().join("second.sock").display(),
            agent.state_dir().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another novacron-agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
