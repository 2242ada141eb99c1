//! The agent's configuration file (TOML).
//!
//! Every key is optional; [`DEFAULT_CONFIG_TOML`] documents each one with its default (it is
//! what `novacron-agent print-default-config` prints and what `deploy/agent.toml` holds).
//! Unknown keys are errors, so a typo cannot silently fall back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The documented default configuration, as TOML.
pub const DEFAULT_CONFIG_TOML: &str = r#"# NovaCron node agent configuration.
# Every key is optional; the values below are the defaults.
# Several agents can run on one host as long as each has its own socket and state_dir.

# Unix socket the gRPC API is served on (mode 0600; a stale file is removed at start).
socket = "/run/novacron/agent.sock"

# Where VMs live: <state_dir>/vms/<id>/{spec.json,console.log,vmm.log,control.sock,...}.
state_dir = "/var/lib/novacron"

# Program started for each VM as `<vmm_binary> vmm --config ... --control ... --exit-file ...`.
# Default: the running novacron-agent executable itself.
# vmm_binary = "/usr/bin/novacron-agent"

# The VMM rotates a VM's console.log to console.log.1 when it grows past this many bytes
# (0 = never rotate). Default: 4 MiB.
console_log_max_bytes = 4194304

# tracing filter directive (e.g. "info", "debug", "novacron_agent=debug,info").
# The RUST_LOG environment variable overrides it.
log_level = "info"

# Grace period of a non-forced stop before the guest is forced off, in milliseconds, when a
# request does not give its own.
stop_timeout_ms = 5000

# Memory this agent may give to running VMs in total, in MiB (VMs starting, running, paused
# or receiving a migration count). Starts and incoming migrations beyond it are refused.
# 0 = no limit of its own (the host's MemAvailable still applies).
max_memory_mib = 0

# Live migration between agents (QUIC, mutual TLS with the cluster CA). Without `listen`
# this agent accepts no migrations; without `agent_name` and `cert_dir` it can neither send
# nor receive one.
[migration]
# Address (IP:port, UDP) the agent listens on for other agents' migration requests.
# listen = "127.0.0.1:7100"
# This agent's name: its certificate `<cert_dir>/<agent_name>.pem` names it.
# agent_name = "node-1"
# The cluster directory made by `novacron-agent certs init` / `certs issue` (ca.pem and
# this agent's certificate and key).
# cert_dir = "/etc/novacron/cluster"
# How VMs started here track the pages their guests dirty, fixed when a VM starts:
# "log" (KVM_GET_DIRTY_LOG), "manual-protect" (KVM_GET_DIRTY_LOG plus KVM_CLEAR_DIRTY_LOG)
# or "ring" (the per-vCPU dirty ring, which enforces a migration's dirty-rate limit page by
# page; experimental: a missed page was seen in testing on PVM; hosts without it fall back
# to the log).
# dirty_tracking = "log"

# Other agents' migration listeners by name ("host:port"); `novacronctl vm migrate VM
# --to NAME` picks one.
[migration.peers]
# node-2 = "10.0.0.2:7100"

# Per-VM kernel telemetry (eBPF probes, with a /proc fallback) and the Prometheus endpoint.
[telemetry]
# Collect and serve telemetry at all.
enabled = true
# Sampling interval of the probes' maps and /proc, in milliseconds.
interval_ms = 1000
# Address (IP:port, TCP) of the HTTP endpoint serving GET /metrics.
listen = "127.0.0.1:9464"
# Skip eBPF and collect only what /proc gives (as on hosts without BTF, tracefs or CAP_BPF).
force_fallback = false
# Samples kept in memory per series (the anomaly detector's window).
window = 3600

# Anomaly scoring of every series (novacron-anomaly) and next-hour forecasts.
[telemetry.anomaly]
# Score at all (novacron_vm_anomaly_score, forecasts, the ListAnomalies call).
enabled = true
# Records of a series before its scores count (0 until then).
warmup = 300
# A record scoring at least this (0 to 1) is an anomaly event.
threshold = 0.5
# Retrain the shared LSTM (at low priority) every this many samples.
retrain_every = 600
# Recompute the next-hour forecasts every this many samples.
forecast_every = 60
# Where the LSTM weights are kept (default: anomaly.safetensors in state_dir).
# weights = "/var/lib/novacron/anomaly.safetensors"

# The site coordinator this agent dials (outbound gRPC): it registers this host with its
# inventory, heartbeats, and runs the commands the coordinator streams to it. Needs
# [migration] agent_name (the host id) and listen (the address other agents migrate to).
# Without endpoints the agent runs on its own.
[coordinator]
# Coordinator addresses ("host:port"); the agent follows the leader among them.
endpoints = []
# Heartbeat interval until the coordinator names its own, in milliseconds.
heartbeat_interval_ms = 5000
# Dial with mutual TLS: the cluster CA and this agent's certificate from [migration] cert_dir,
# the coordinator verified under `server_name`. false: plain HTTP/2 (loopback tests only).
tls = false
server_name = "coordinator"
# Capacity offered to the coordinator (0 = this host's CPUs / max_memory_mib or MemTotal).
vcpus = 0
memory_mib = 0

# Labels of this host for placement selectors.
[coordinator.labels]
# rack = "r1"
"#;

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Unix socket of the gRPC API. Default `/run/novacron/agent.sock`.
    pub socket: PathBuf,
    /// State directory. Default `/var/lib/novacron`.
    pub state_dir: PathBuf,
    /// VMM program; `None` (the default) means the running executable.
    pub vmm_binary: Option<PathBuf>,
    /// Console log rotation threshold in bytes (0 = never). Default 4 MiB.
    pub console_log_max_bytes: u64,
    /// tracing filter directive. Default `info`.
    pub log_level: String,
    /// Default grace period of a non-forced stop, in milliseconds. Default 5000.
    pub stop_timeout_ms: u64,
    /// Memory this agent may give to active VMs in total, MiB (0 = no limit of its own).
    pub max_memory_mib: u64,
    /// Live migration between agents.
    pub migration: MigrationConfig,
    /// Per-VM telemetry and the `/metrics` endpoint.
    pub telemetry: novacron_telemetry::TelemetryConfig,
    /// The site coordinator this agent dials.
    pub coordinator: CoordinatorConfig,
}

/// The `[coordinator]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Coordinator addresses ("host:port"); empty = none.
    pub endpoints: Vec<String>,
    /// Heartbeat interval until the coordinator names its own, ms.
    pub heartbeat_interval_ms: u64,
    /// Mutual TLS with the cluster CA and this agent's certificate.
    pub tls: bool,
    /// The name the coordinators' certificates carry.
    pub server_name: String,
    /// vCPUs offered (0 = this host's CPUs).
    pub vcpus: u32,
    /// Memory offered, MiB (0 = `max_memory_mib`, else MemTotal).
    pub memory_mib: u64,
    /// Host labels.
    pub labels: BTreeMap<String, String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            endpoints: Vec::new(),
            heartbeat_interval_ms: 5000,
            tls: false,
            server_name: "coordinator".into(),
            vcpus: 0,
            memory_mib: 0,
            labels: BTreeMap::new(),
        }
    }
}

/// The `[migration]` table.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// Where to accept other agents' migration requests (UDP); `None` = accept none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// This agent's certificate name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_name: Option<String>,
    /// The cluster directory (`ca.pem`, `<agent_name>.pem`, `<agent_name>.key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_dir: Option<PathBuf>,
    /// Other agents' migration listeners: name → "host:port".
    pub peers: BTreeMap<String, String>,
    /// How VMs started by this agent track dirty pages: `log`, `manual-protect` or `ring`.
    pub dirty_tracking: novacron_vmm::config::DirtyTracking,
}

impl MigrationConfig {
    /// Whether any migration key is set.
    pub fn is_configured(&self) -> bool {
        self.listen.is_some()
            || self.agent_name.is_some()
            || self.cert_dir.is_some()
            || !self.peers.is_empty()
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: PathBuf::from("/run/novacron/agent.sock"),
            state_dir: PathBuf::from("/var/lib/novacron"),
            vmm_binary: None,
            console_log_max_bytes: 4 << 20,
            log_level: "info".to_string(),
            stop_timeout_ms: 5000,
            max_memory_mib: 0,
            migration: MigrationConfig::default(),
            telemetry: novacron_telemetry::TelemetryConfig::default(),
            coordinator: CoordinatorConfig::default(),
        }
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("config file {path}, line {line}{}: {message}", field.as_deref().map(|f| format!(", field `{f}`")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error (0 when unknown).
        line: usize,
        /// The key at fault, when known.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value is syntactically fine but unusable.
    #[error("config file {path}: invalid {field}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key at fault.
        field: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
}

impl AgentConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| {
            let (line, field) = match e.span() {
                Some(span) => locate(text, span.start),
                None => (0, None),
            };
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                field,
                message: e.message().trim().to_string(),
            }
        })?;
        let invalid = |field, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            reason,
        };
        if cfg.socket.as_os_str().is_empty() {
            return Err(invalid("socket", "empty; expected a socket path".into()));
        }
        if cfg.state_dir.as_os_str().is_empty() {
            return Err(invalid(
                "state_dir",
                "empty; expected a directory path".into(),
            ));
        }
        if cfg.stop_timeout_ms == 0 {
            return Err(invalid(
                "stop_timeout_ms",
                "0; expected a positive number of milliseconds".into(),
            ));
        }
        if let Some(vmm) = &cfg.vmm_binary {
            if vmm.as_os_str().is_empty() {
                return Err(invalid(
                    "vmm_binary",
                    "empty; expected a program path".into(),
                ));
            }
        }
        cfg.check_migration()
            .map_err(|(field, reason)| invalid(field, reason))?;
        cfg.check_coordinator()
            .map_err(|(field, reason)| invalid(field, reason))?;
        cfg.telemetry
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        Ok(cfg)
    }

    fn check_migration(&self) -> Result<(), (&'static str, String)> {
        use novacron_migration::certs::validate_agent_name;
        let m = &self.migration;
        if !m.is_configured() {
            return Ok(());
        }
        let Some(name) = &m.agent_name else {
            return Err((
                "migration.agent_name",
                "missing; expected this agent's certificate name when [migration] is used".into(),
            ));
        };
        validate_agent_name(name).map_err(|e| ("migration.agent_name", e.to_string()))?;
        match &m.cert_dir {
            None => {
                return Err((
                    "migration.cert_dir",
                    "missing; expected the cluster directory when [migration] is used".into(),
                ))
            }
            Some(d) if d.as_os_str().is_empty() => {
                return Err(("migration.cert_dir", "empty; expected a directory".into()))
            }
            Some(_) => {}
        }
        for (peer, addr) in &m.peers {
            validate_agent_name(peer).map_err(|e| ("migration.peers", e.to_string()))?;
            if !addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
            {
                return Err((
                    "migration.peers",
                    format!("{peer} = {addr:?}: expected \"host:port\""),
                ));
            }
        }
        Ok(())
    }

    fn check_coordinator(&self) -> Result<(), (&'static str, String)> {
        let c = &self.coordinator;
        if c.heartbeat_interval_ms == 0 {
            return Err((
                "coordinator.heartbeat_interval_ms",
                "0; expected a positive number of milliseconds".into(),
            ));
        }
        if c.endpoints.is_empty() {
            return Ok(());
        }
        for e in &c.endpoints {
            if !e
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
            {
                return Err((
                    "coordinator.endpoints",
                    format!("{e:?}: expected \"host:port\""),
                ));
            }
        }
        if self.migration.agent_name.is_none() || self.migration.listen.is_none() {
            return Err((
                "coordinator.endpoints",
                "set, but [migration] agent_name and listen are not; expected both (the host id \
                 and the address other agents migrate to)"
                    .into(),
            ));
        }
        if c.tls && c.server_name.is_empty() {
            return Err((
                "coordinator.server_name",
                "empty; expected the name in the coordinators' certificates".into(),
            ));
        }
        Ok(())
    }

    /// The VMM program: `vmm_binary` or the running executable.
    pub fn vmm_program(&self) -> std::io::Result<PathBuf> {
        match &self.vmm_binary {
            Some(p) => Ok(p.clone()),
            None => std::env::current_exe(),
        }
    }
}

/// 1-based line of byte `offset` in `text`, and the key of that line (`key = value`).
fn locate(text: &str, offset: usize) -> (usize, Option<String>) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].bytes().filter(|&b| b == b'\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let field = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['));
    (line_no, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("/etc/novacron/agent.toml"))
    }

    #[test]
    fn coordinator_needs_a_host_identity_and_valid_endpoints() {
        let err = parse("[coordinator]\nendpoints = [\"127.0.0.1:7400\"]\n").unwrap_err();
        assert!(
            err.to_string().contains("invalid coordinator.endpoints")
                && err.to_string().contains("agent_name and listen"),
            "{err}"
        );
        let ok = "[migration]\nlisten = \"127.0.0.1:7100\"\nagent_name = \"a\"\n\
                  cert_dir = \"/c\"\n[coordinator]\nendpoints = [\"127.0.0.1:7400\"]\n";
        let cfg = parse(ok).unwrap();
        assert_eq!(
            cfg.coordinator.endpoints,
            vec!["127.0.0.1:7400".to_string()]
        );
        let err = parse(&ok.replace("127.0.0.1:7400", "nope")).unwrap_err();
        assert!(
            err.to_string().contains("\"nope\": expected \"host:port\""),
            "{err}"
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg, AgentConfig::default());
        assert_eq!(cfg.socket, PathBuf::from("/run/novacron/agent.sock"));
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/novacron"));
        assert_eq!(cfg.vmm_binary, None);
        assert_eq!(cfg.console_log_max_bytes, 4 * 1024 * 1024);
        assert_eq!(cfg.log_level, "info");
        assert_eq!(cfg.stop_timeout_ms, 5000);
        assert_eq!(cfg.max_memory_mib, 0);
        assert!(!cfg.migration.is_configured());
    }

    #[test]
    fn documented_migration_example_parses() {
        // The commented examples of the [migration] section, uncommented.
        let text: String = DEFAULT_CONFIG_TOML
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if ["listen", "agent_name", "cert_dir", "node-2"]
                        .iter()
                        .any(|k| rest.starts_with(&format!("{k} ="))) =>
                {
                    rest.to_string()
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = parse(&text).unwrap();
        let m = &cfg.migration;
        assert_eq!(m.listen, Some("127.0.0.1:7100".parse().unwrap()));
        assert_eq!(m.agent_name.as_deref(), Some("node-1"));
        assert_eq!(m.cert_dir, Some(PathBuf::from("/etc/novacron/cluster")));
        assert_eq!(m.peers["node-2"], "10.0.0.2:7100");
        // And it survives a round trip through TOML (as the test harness writes it).
        let again = parse(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn incomplete_migration_settings_are_refused() {
        for (text, field) in [
            ("[migration]\nlisten = \"127.0.0.1:7100\"\n", "migration.agent_name"),
            (
                "[migration]\nagent_name = \"a\"\n",
                "migration.cert_dir",
            ),
            (
                "[migration]\nagent_name = \"Bad_Name\"\ncert_dir = \"/c\"\n",
                "migration.agent_name",
            ),
            (
                "[migration]\nagent_name = \"a\"\ncert_dir = \"/c\"\n[migration.peers]\nb = \"nohost\"\n",
                "migration.peers",
            ),
        ] {
            match parse(text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let err = parse("[migration]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{err}");
    }

    #[test]
    fn documented_default_matches_defaults() {
        assert_eq!(parse(DEFAULT_CONFIG_TOML).unwrap(), AgentConfig::default());
        let deployed = include_str!("../../deploy/agent.toml");
        assert_eq!(parse(deployed).unwrap(), AgentConfig::default());
    }

    #[test]
    fn values_override_defaults() {
        let cfg = parse(
            "socket = \"/tmp/a.sock\"\nstate_dir = \"/tmp/st\"\nvmm_binary = \"/bin/vmm\"\n\
             console_log_max_bytes = 0\nlog_level = \"debug\"\nstop_timeout_ms = 10\n",
        )
        .unwrap();
        assert_eq!(cfg.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(cfg.state_dir, PathBuf::from("/tmp/st"));
        assert_eq!(cfg.vmm_binary, Some(PathBuf::from("/bin/vmm")));
        assert_eq!(cfg.vmm_program().unwrap(), PathBuf::from("/bin/vmm"));
        assert_eq!(cfg.console_log_max_bytes, 0);
        assert_eq!(cfg.log_level, "debug");
        assert_eq!(cfg.stop_timeout_ms, 10);
    }

    #[test]
    fn unknown_key_names_file_line_and_field() {
        let err = parse("socket = \"/tmp/a.sock\"\nstate_dri = \"/tmp\"\n").unwrap_err();
        match &err {
            ConfigError::Parse {
                line,
                field,
                message,
                ..
            } => {
                assert_eq!(*line, 2);
                assert_eq!(field.as_deref(), Some("state_dri"));
                assert!(message.contains("unknown field"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("/etc/novacron/agent.toml"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("state_dri"), "{text}");
    }

    #[test]
    fn wrong_type_names_field_and_line() {
        let err = parse("\n\nstop_timeout_ms = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, ConfigError::Parse { line: 3, field: Some(f), .. } if f == "stop_timeout_ms"),
            "{text}"
        );
        assert!(text.contains("line 3"), "{text}");
    }

    #[test]
    fn malformed_toml_is_an_error_with_line() {
        let err = parse("socket = \"/tmp/a.sock\"\nstate_dir = \n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 2, .. }), "{err}");
        let err = parse("[[[").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: 1, .. }), "{err}");
    }

    #[test]
    fn unusable_values_are_rejected() {
        let err = parse("stop_timeout_ms = 0").unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "stop_timeout_ms",
                    ..
                }
            ),
            "{err}"
        );
        let err = parse("socket = \"\"").unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "socket",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_file_names_it() {
        let err = AgentConfig::load(Path::new("/nonexistent/novacron.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/novacron.toml"));
    }
}
