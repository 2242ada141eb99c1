//! `novacronctl` against an in-process agent daemon (no VM is started, so no KVM needed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use novacron_agent::config::AgentConfig;

struct Daemon {
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = AgentConfig {
            socket: dir.path().join("agent.sock"),
            state_dir: dir.path().join("state"),
            vmm_binary: Some(PathBuf::from("/nonexistent/vmm")),
            ..Default::default()
        };
        // Any free port for /metrics: tests run side by side, and an agent may run on the host.
        cfg.telemetry.listen = "127.0.0.1:0".parse().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(novacron_agent::daemon::serve(cfg, async {
                let _ = rx.await;
            }))
            .unwrap();
        });
        let d = Daemon {
            dir,
            stop: Some(tx),
            thread: Some(thread),
        };
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(d.socket()).is_ok() {
                return d;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("daemon did not listen");
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_in(self.dir.path(), args)
    }

    fn ctl_in(&self, cwd: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_novacronctl"))
            .current_dir(cwd)
            .env("NOVACRON_SOCKET", self.socket())
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn create_list_get_console_delete() {
    let d = Daemon::start();
    std::fs::write(d.dir.path().join("vmlinux"), [1u8; 1024]).unwrap();

    // A relative kernel path is made absolute against the caller's working directory.
    let o = d.ctl(&[
        "vm", "create", "web", "--kernel", "vmlinux", "--vcpus", "2", "--memory", "64",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("NAME         web"), "{out}");
    assert!(out.contains("STATE        created"), "{out}");
    assert!(
        out.contains(&format!(
            "KERNEL       {}",
            d.dir.path().join("vmlinux").display()
        )),
        "{out}"
    );

    let o = d.ctl(&["vm", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("ID "), "{out}");
    let cols: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(cols, ["ID", "NAME", "STATE", "VCPUS", "MEMORY", "PID"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[1..], ["web", "created", "2", "64MiB", "-"]);
    let id = row[0].to_string();
    // Columns are aligned: NAME starts at the same offset in both lines.
    assert_eq!(lines[0].find("NAME"), lines[1].find("web"));

    let o = d.ctl(&["--output", "json", "vm", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["id"], id.as_str());
    assert_eq!(v[0]["name"], "web");
    assert_eq!(v[0]["state"], "created");
    assert_eq!(v[0]["memory_mib"], 64);
    assert_eq!(v[0]["pid"], serde_json::Value::Null);

    let o = d.ctl(&["vm", "get", &id, "-o", "json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "web");

    let console = v["console_log"].as_str().unwrap().to_string();
    std::fs::write(&console, b"\x1b[0mboot ok\r\n").unwrap();
    let o = d.ctl(&["vm", "console", "web", "--from-start"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"\x1b[0mboot ok\r\n");

    let o = d.ctl(&["vm", "delete", "web"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), format!("deleted {id}"));
    let o = d.ctl(&["vm", "list"]);
    assert_eq!(stdout(&o).lines().count(), 1);
}

#[test]
fn errors_print_the_status_message_and_exit_1() {
    let d = Daemon::start();
    std::fs::write(d.dir.path().join("vmlinux"), [1u8; 1024]).unwrap();
    let o = d.ctl(&["vm", "get", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).trim(), "error: no VM with id or name \"nope\"");

    let o = d.ctl(&["vm", "create", "a", "--kernel", "vmlinux"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.ctl(&["vm", "create", "a", "--kernel", "vmlinux"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));

    let o = d.ctl(&["vm", "create", "b", "--kernel", "vmlinux", "--vcpus", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        "error: invalid vcpus: 0: expected 1 to 254"
    );
    let o = d.ctl(&["vm", "create", "c", "--kernel", "vmlinux", "--memory", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: invalid memory_mib"),
        "{}",
        stderr(&o)
    );

    let o = d.ctl(&["vm", "pause", "a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is created"), "{}", stderr(&o));

    // Usage errors are clap's: exit code 2.
    let o = d.ctl(&["vm", "create", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = d.ctl(&["vm", "create", "x", "--kernel", "k", "--test-guest"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = d.ctl(&["vm", "create", "x", "--kernel", "k", "--entry", "bios"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // No agent at the socket.
    let o = Command::new(env!("CARGO_BIN_EXE_novacronctl"))
        .args(["--socket", "/nonexistent/agent.sock", "vm", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot connect"), "{}", stderr(&o));
}

#[test]
fn help_is_available_everywhere() {
    for args in [
        vec!["--help"],
        vec!["vm", "--help"],
        vec!["vm", "create", "--help"],
        vec!["vm", "console", "--help"],
        vec!["vm", "guest-command", "--help"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_novacronctl"))
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}");
        assert!(stdout(&o).contains("Usage:"), "{args:?}");
    }
}
