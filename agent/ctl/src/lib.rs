//! novacronctl, the command line for people: output formatting and the connection to the
//! agent's unix socket (the binary is `src/main.rs`).
#![deny(missing_docs)]

pub mod coordinator;

use std::path::Path;

use hyper_util::rt::TokioIo;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use novacron_proto::agent::v1 as pb;
use pb::agent_service_client::AgentServiceClient;

/// Failure to reach the agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be dialled.
    #[error("cannot connect to the agent at {path}: {source}")]
    Transport {
        /// The socket.
        path: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to an agent's unix socket.
pub async fn connect(socket: &Path) -> Result<AgentServiceClient<Channel>, ConnectError> {
    let path = socket.to_path_buf();
    // tonic needs a URI; the connector ignores it and dials the unix socket.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|source| ConnectError::Transport {
            path: socket.display().to_string(),
            source,
        })?;
    Ok(AgentServiceClient::new(channel))
}

/// A VM as `--output json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmJson {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Kernel path.
    pub kernel: String,
    /// Initramfs path (empty if none).
    pub initramfs: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Entry protocol.
    pub entry: String,
    /// Huge pages.
    pub hugepages: bool,
    /// VMM pid (null when no VMM runs).
    pub pid: Option<u32>,
    /// vCPU thread ids.
    pub vcpu_tids: Vec<i32>,
    /// Console log path.
    pub console_log: String,
    /// Creation time (seconds since the epoch).
    pub created_at_unix: i64,
    /// Why the last run ended (null if it did not).
    pub exit_reason: Option<String>,
    /// Detail of the last exit.
    pub exit_detail: String,
}

impl From<pb::Vm> for VmJson {
    fn from(v: pb::Vm) -> Self {
        VmJson {
            id: v.id,
            name: v.name,
            state: v.state,
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            kernel: v.kernel,
            initramfs: v.initramfs,
            cmdline: v.cmdline,
            entry: v.entry,
            hugepages: v.hugepages,
            pid: (v.pid != 0).then_some(v.pid),
            vcpu_tids: v.vcpu_tids,
            console_log: v.console_log,
            created_at_unix: v.created_at_unix,
            exit_reason: (!v.exit_reason.is_empty()).then_some(v.exit_reason),
            exit_detail: v.exit_detail,
        }
    }
}

/// The final statistics of a migration as `--output json` prints them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationJson {
    /// The VM.
    pub vm: String,
    /// The destination agent.
    pub to_agent: String,
    /// "completed", "rolled-back", "in-doubt" or "failed".
    pub phase: String,
    /// Total time, ms.
    pub total_ms: f64,
    /// Downtime, ms (null unless it completed).
    pub downtime_ms: Option<f64>,
    /// Bytes of page frames on the wire.
    pub wire_bytes: u64,
    /// Bytes of page data before compression.
    pub raw_bytes: u64,
    /// raw / wire.
    pub compression_ratio: f64,
    /// Pre-copy rounds plus the switch-over.
    pub rounds: usize,
    /// Pages sent per round.
    pub pages_per_round: Vec<u64>,
    /// Why it failed (null if it did not).
    pub error: Option<String>,
}

impl MigrationJson {
    /// From the last progress message.
    pub fn new(vm: &str, to_agent: &str, p: &pb::MigrationProgress) -> Self {
        MigrationJson {
            vm: vm.into(),
            to_agent: to_agent.into(),
            phase: p.phase.clone(),
            total_ms: p.total_ms,
            downtime_ms: p.downtime_ms,
            wire_bytes: p.wire_bytes,
            raw_bytes: p.raw_bytes,
            compression_ratio: p.compression_ratio,
            rounds: p.pages_per_round.len(),
            pages_per_round: p.pages_per_round.clone(),
            error: (!p.error.is_empty()).then(|| p.error.clone()),
        }
    }
}

/// Bytes in a human unit (KiB, MiB, GiB).
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// The one-line progress display of a running migration.
pub fn migration_progress_line(p: &pb::MigrationProgress) -> String {
    let mut line = format!(
        "{:<11} round {:>3}  pages left {:>8}  dirty {:>8.0} pages/s  throughput {:>10}/s  \
         predicted downtime {:>8.1} ms",
        p.phase,
        p.round,
        p.pages_left,
        p.dirty_rate,
        human_bytes(p.throughput),
        p.predicted_downtime_ms
    );
    if p.throttle > 0 {
        line.push_str(&format!("  throttle {}%", p.throttle));
    }
    line
}

/// Key/value lines with the final statistics of a migration.
pub fn migration_summary(m: &MigrationJson) -> String {
    let pages = m
        .pages_per_round
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut rows = vec![
        ("VM", m.vm.clone()),
        ("TO", m.to_agent.clone()),
        ("RESULT", m.phase.clone()),
        ("TOTAL_TIME", format!("{:.0} ms", m.total_ms)),
        (
            "DOWNTIME",
            m.downtime_ms
                .map(|d| format!("{d:.1} ms"))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "WIRE_BYTES",
            format!("{} ({})", human_bytes(m.wire_bytes as f64), m.wire_bytes),
        ),
        (
            "RAW_BYTES",
            format!("{} ({})", human_bytes(m.raw_bytes as f64), m.raw_bytes),
        ),
        ("COMPRESSION", format!("{:.2}x", m.compression_ratio)),
        ("ROUNDS", m.rounds.to_string()),
        ("PAGES_PER_ROUND", pages),
    ];
    if let Some(e) = &m.error {
        rows.push(("ERROR", e.clone()));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, val)| format!("{k:<w$}  {val}\n"))
        .collect()
}

/// Plain aligned columns: a header row, then one row per VM.
pub fn vm_table(vms: &[pb::Vm]) -> String {
    let header = ["ID", "NAME", "STATE", "VCPUS", "MEMORY", "PID"];
    let rows: Vec<[String; 6]> = vms
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.name.clone(),
                v.state.clone(),
                v.vcpus.to_string(),
                format!("{}MiB", v.memory_mib),
                if v.pid == 0 {
                    "-".to_string()
                } else {
                    v.pid.to_string()
                },
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Formats rows as plain columns separated by two spaces (last column not padded).
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = header.map(str::len);
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  ", w = width[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Key/value lines describing one VM in detail.
pub fn vm_details(v: &pb::Vm) -> String {
    let tids = v
        .vcpu_tids
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut rows = vec![
        ("ID", v.id.clone()),
        ("NAME", v.name.clone()),
        ("STATE", v.state.clone()),
        ("VCPUS", v.vcpus.to_string()),
        ("MEMORY", format!("{}MiB", v.memory_mib)),
        ("KERNEL", v.kernel.clone()),
        ("ENTRY", v.entry.clone()),
    ];
    if !v.initramfs.is_empty() {
        rows.push(("INITRAMFS", v.initramfs.clone()));
    }
    rows.push(("CMDLINE", v.cmdline.clone()));
    rows.push(("HUGEPAGES", v.hugepages.to_string()));
    rows.push((
        "PID",
        if v.pid == 0 {
            "-".into()
        } else {
            v.pid.to_string()
        },
    ));
    if !tids.is_empty() {
        rows.push(("VCPU_TIDS", tids));
    }
    rows.push(("CONSOLE_LOG", v.console_log.clone()));
    rows.push(("CREATED_AT", v.created_at_unix.to_string()));
    if !v.exit_reason.is_empty() {
        rows.push(("EXIT_REASON", v.exit_reason.clone()));
    }
    if !v.exit_detail.is_empty() {
        rows.push(("EXIT_DETAIL", v.exit_detail.clone()));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, val)| format!("{k:<w$}  {val}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, name: &str, pid: u32) -> pb::Vm {
        pb::Vm {
            id: id.into(),
            name: name.into(),
            state: "running".into(),
            vcpus: 2,
            memory_mib: 256,
            pid,
            ..Default::default()
        }
    }

    #[test]
    fn migration_output() {
        let p = pb::MigrationProgress {
            phase: "completed".into(),
            done: true,
            total_ms: 1234.4,
            downtime_ms: Some(12.25),
            wire_bytes: 3 << 20,
            raw_bytes: 12 << 20,
            compression_ratio: 4.0,
            pages_per_round: vec![3000, 200, 10],
            ..Default::default()
        };
        let m = MigrationJson::new("vm1", "b", &p);
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["total_ms"], 1234.4);
        assert_eq!(j["downtime_ms"], 12.25);
        assert_eq!(j["rounds"], 3);
        assert_eq!(j["error"], serde_json::Value::Null);
        let s = migration_summary(&m);
        assert!(s.contains("TOTAL_TIME       1234 ms"), "{s}");
        assert!(
            s.contains("DOWNTIME         12.2 ms") || s.contains("DOWNTIME         12.3 ms"),
            "{s}"
        );
        assert!(s.contains("WIRE_BYTES       3.0 MiB (3145728)"), "{s}");
        assert!(s.contains("COMPRESSION      4.00x"), "{s}");
        assert!(s.contains("PAGES_PER_ROUND  3000, 200, 10"), "{s}");
        let line = migration_progress_line(&pb::MigrationProgress {
            phase: "pre-copy".into(),
            round: 2,
            pages_left: 512,
            dirty_rate: 5000.0,
            throughput: 100.0 * 1024.0 * 1024.0,
            predicted_downtime_ms: 20.0,
            ..Default::default()
        });
        assert!(line.contains("round   2"), "{line}");
        assert!(line.contains("pages left      512"), "{line}");
        assert!(line.contains("100.0 MiB/s"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn table_aligns_columns() {
        let t = vm_table(&[vm("abc", "a-long-name", 42), vm("d", "b", 0)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "ID   NAME         STATE    VCPUS  MEMORY  PID");
        assert_eq!(lines[1], "abc  a-long-name  running  2      256MiB  42");
        assert_eq!(lines[2], "d    b            running  2      256MiB  -");
    }

    #[test]
    fn json_uses_nulls_for_absent_values() {
        let j = serde_json::to_value(VmJson::from(vm("abc", "x", 0))).unwrap();
        assert_eq!(j["id"], "abc");
        assert_eq!(j["pid"], serde_json::Value::Null);
        assert_eq!(j["exit_reason"], serde_json::Value::Null);
        assert_eq!(j["memory_mib"], 256);
    }

    #[test]
    fn details_list_exit_information() {
        let mut v = vm("abc", "x", 0);
        v.exit_reason = "triple_fault".into();
        v.exit_detail = "rip=0".into();
        let d = vm_details(&v);
        assert!(d.contains("EXIT_REASON  triple_fault"), "{d}");
        assert!(d.contains("EXIT_DETAIL  rip=0"), "{d}");
        assert!(d.contains("PID          -"), "{d}");
    }
}
