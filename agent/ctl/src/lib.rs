//! novacronctl, the command line for people: output formatting and the connection to the
//! agent's unix socket (the binary is `src/main.rs`).
#![deny(missing_docs)]

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
