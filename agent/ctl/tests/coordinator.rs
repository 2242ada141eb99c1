//! `novacronctl hosts|vms|migrations|events|cluster` against a real single-node coordinator,
//! over TLS with the token and CA from a context file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use novacron_coordinator::auth::Role;
use novacron_coordinator::testing::{coordinator_binary, ClusterOptions, TestCluster};

/// How novacronctl is pointed at the coordinator: a context file, maybe `--coordinator`.
struct Target {
    context: PathBuf,
    endpoint: Option<String>,
}

/// `novacronctl` aimed at `t` (its context, and an endpoint override if any).
fn ctl_command(t: &Target) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_novacronctl"));
    cmd.env_remove("NOVACRON_CONTEXT")
        .env_remove("NOVACRON_COORDINATOR")
        .arg("--context")
        .arg(&t.context);
    if let Some(e) = &t.endpoint {
        cmd.arg("--coordinator").arg(e);
    }
    cmd
}

fn ctl(t: &Target, args: &[&str]) -> (bool, String, String) {
    let out = ctl_command(t).args(args).output().expect("run novacronctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok_json(t: &Target, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let (ok, out, err) = ctl(t, &a);
    assert!(ok, "novacronctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

fn binary() -> PathBuf {
    coordinator_binary().expect(
        "novacron-coordinator binary not found next to the test executable: build it with \
         `cargo build -p novacron-coordinator` (cargo test --workspace does) or set NOVACRON_COORDINATOR_BIN",
    )
}

fn context(cluster: &TestCluster, dir: &Path, role: Role) -> PathBuf {
    let path = dir.join(format!("{role}.toml"));
    cluster
        .pki
        .write_context(&path, &[cluster.nodes[0].addr.clone()], role);
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drives_hosts_vms_migrations_events_and_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&binary(), dir.path(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let target = Target {
        context: context(&cluster, dir.path(), Role::Admin),
        endpoint: Some(cluster.nodes[0].addr.clone()),
    };
    let a = &target;

    for h in ["h1", "h2"] {
        let addr_arg = format!("{h}:7300");
        let j = ok_json(
            a,
            &[
                "hosts",
                "register",
                h,
                "--address",
                &addr_arg,
                "--vcpus",
                "8",
                "--memory",
                "8192",
                "--label",
                "zone=a",
            ],
        );
        assert_eq!(j["state"], "up");
    }
    let vm = ok_json(
        a,
        &[
            "vms", "create", "web1", "--vcpus", "2", "--memory", "512", "--start",
        ],
    );
    assert_eq!(vm["desired"], "running");
    let id = vm["id"].as_str().unwrap().to_string();
    let from = vm["host_id"].as_str().unwrap().to_string();

    let list = ok_json(a, &["vms", "list"]);
    assert_eq!(list["vms"].as_array().unwrap().len(), 1);
    assert_eq!(list["read"]["served_by_leader"], true);
    let (ok, table, _) = ctl(a, &["hosts", "list"]);
    assert!(
        ok && table.starts_with("ID") && table.contains("h1") && table.contains("2/8"),
        "{table}"
    );

    let op = ok_json(a, &["migrations", "start", &id]);
    assert_eq!(op["phase"], "pending");
    assert_eq!(op["source_host"], from.as_str());
    let name = op["name"].as_str().unwrap().to_string();
    let (ok, t, _) = ctl(a, &["migrations", "list"]);
    assert!(ok && t.contains(&name), "{t}");
    let c = ok_json(a, &["migrations", "cancel", &name]);
    assert_eq!(
        (c["phase"].as_str(), c["done"].as_bool()),
        (Some("cancelled"), Some(true))
    );

    // A bad request: clear error naming the input, non-zero exit, nothing created.
    let (ok, _, err) = ctl(a, &["vms", "create", "bad name!"]);
    assert!(!ok);
    assert!(err.contains("invalid vm name"), "{err}");
    let (ok, _, err) = ctl(
        a,
        &[
            "hosts",
            "register",
            "h3",
            "--address",
            "x:1",
            "--vcpus",
            "1",
            "--memory",
            "1",
            "--label",
            "nokey",
        ],
    );
    assert!(!ok && err.contains("expected KEY=VALUE"), "{err}");
    assert_eq!(
        ok_json(a, &["vms", "list"])["vms"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let (ok, out, err) = ctl(a, &["events", "--limit", "5", "-o", "json"]);
    assert!(ok, "{err}");
    let kinds: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "host.registered",
            "host.registered",
            "vm.created",
            "migration.started",
            "migration.cancelled"
        ]
    );

    // `vms watch` prints the records, the end of the snapshot, then follows.
    let mut watch = ctl_command(a)
        .args(["vms", "watch", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run novacronctl vms watch");
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut kinds = Vec::new();
    while kinds.last().map(String::as_str) != Some("snapshot-end") {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("vms watch printed its snapshot within 20 s");
        let j: serde_json::Value = serde_json::from_str(&line).unwrap();
        if j["kind"] == "existing" {
            assert_eq!(j["vm"]["name"], "web1", "{line}");
        }
        kinds.push(j["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds, ["existing", "snapshot-end"]);
    watch.kill().unwrap();
    watch.wait().unwrap();

    let st = ok_json(a, &["cluster", "status"]);
    assert_eq!(
        (st["leader_id"].as_u64(), st["state"].as_str()),
        (Some(1), Some("Leader"))
    );
    let nowhere = Target {
        context: target.context.clone(),
        endpoint: Some("127.0.0.1:1".into()),
    };
    let (ok, _, err) = ctl(&nowhere, &["hosts", "list"]);
    assert!(
        !ok && err.contains("cannot connect to a coordinator") && err.contains("127.0.0.1:1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_context_file_gives_endpoint_ca_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(&binary(), dir.path(), 1, ClusterOptions::default());
    cluster.wait_leader(Duration::from_secs(20)).await;
    cluster
        .client(&cluster.nodes[0].addr)
        .register_host(novacron_proto::coordinator::v1::RegisterHostRequest {
            id: "h1".into(),
            address: "h1.local:7300".into(),
            capacity: Some(novacron_proto::coordinator::v1::Resources {
                vcpus: 8,
                memory_mib: 8192,
            }),
            labels: Default::default(),
            vms: vec![],
        })
        .await
        .unwrap();

    // The context alone (no --coordinator): a viewer lists hosts ...
    let viewer = Target {
        context: context(&cluster, dir.path(), Role::Viewer),
        endpoint: None,
    };
    let (ok, table, err) = ctl(&viewer, &["hosts", "list"]);
    assert!(ok, "{err}");
    assert!(table.starts_with("ID") && table.contains("h1"), "{table}");
    // ... but may not create a VM, and nothing is created.
    let (ok, _, err) = ctl(&viewer, &["vms", "create", "web1"]);
    assert!(!ok && err.contains("needs role operator"), "{err}");
    assert_eq!(
        ok_json(&viewer, &["vms", "list"])["vms"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // The default context file under $HOME, with a relative CA path; none there: a clear error.
    let home = dir.path().join("home");
    let cfg = home.join(".config/novacron");
    std::fs::create_dir_all(&cfg).unwrap();
    let run_home = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_novacronctl"))
            .env_remove("NOVACRON_CONTEXT")
            .env_remove("NOVACRON_COORDINATOR")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", &home)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run_home(&["hosts", "list"]);
    assert!(!ok && err.contains("no coordinator context"), "{err}");
    std::fs::copy(cluster.pki.dir.ca_cert_path(), cfg.join("ca.pem")).unwrap();
    let written = std::fs::read_to_string(&viewer.context).unwrap();
    let relative: String = written
        .lines()
        .map(|l| {
            if l.starts_with("ca = ") {
                "ca = \"ca.pem\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(cfg.join("context.toml"), relative).unwrap();
    let (ok, out, err) = run_home(&["hosts", "list", "-o", "json"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"h1\""), "{out}");

    // A broken context names what is wrong.
    std::fs::write(
        cfg.join("context.toml"),
        "endpoints = []\nca = \"ca.pem\"\n",
    )
    .unwrap();
    let (ok, _, err) = run_home(&["hosts", "list"]);
    assert!(!ok && err.contains("endpoints is empty"), "{err}");
}
