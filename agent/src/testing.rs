//! Test support: a real `novacron-agent` daemon in a temporary directory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use novacron_agent::testing::TestAgent;
//! use novacron_proto::agent::v1::ListVmsRequest;
//! let agent = TestAgent::start().await?;
//! let mut client = agent.client().await?;
//! let vms = client.list_vms(ListVmsRequest {}).await?.into_inner().vms;
//! assert!(vms.is_empty());
//! # Ok(()) }
//! ```
//!
//! The daemon runs as a child process (the real binary, found by [`agent_binary`]) with its
//! own socket and state directory, so tests may run in parallel. Dropping a [`TestAgent`]
//! kills the daemon and every VMM it started.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use novacron_proto::agent::v1::agent_service_client::AgentServiceClient;

/// Failure to set up a test agent.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The agent binary is not where it was expected.
    #[error(
        "novacron-agent binary not found (set NOVACRON_AGENT_BIN or build it with \
         `cargo build -p novacron-agent`)"
    )]
    NoBinary,
    /// Files or processes could not be set up.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon exited or did not listen in time.
    #[error("agent did not come up: {0}")]
    NotReady(String),
    /// Connecting to the socket failed.
    #[error("connecting to the agent: {0}")]
    Connect(#[from] tonic::transport::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestError {
    let context = context.into();
    move |source| TestError::Io { context, source }
}

/// Connects a gRPC client to an agent's unix socket.
pub async fn connect(
    socket: &Path,
) -> Result<AgentServiceClient<Channel>, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the unix socket.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(AgentServiceClient::new(channel))
}

/// The `novacron-agent` binary for tests: `$NOVACRON_AGENT_BIN`, else next to the running
/// test executable's `deps/` directory (`target/<profile>/novacron-agent`).
pub fn agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NOVACRON_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_novacron-agent") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("novacron-agent"))
        .find(|p| p.is_file())
}

/// Knobs of a [`TestAgent`].
#[derive(Debug, Clone, Default)]
pub struct TestAgentOptions {
    /// Agent binary (default: [`agent_binary`]).
    pub agent_binary: Option<PathBuf>,
    /// `vmm_binary` of the config (default: the agent binary).
    pub vmm_binary: Option<PathBuf>,
    /// `stop_timeout_ms` of the config (default 5000).
    pub stop_timeout_ms: Option<u64>,
    /// `console_log_max_bytes` of the config (default 4 MiB).
    pub console_log_max_bytes: Option<u64>,
    /// `max_memory_mib` of the config (default 0, no limit of the agent's own).
    pub max_memory_mib: Option<u64>,
    /// The `[migration]` table (default: none).
    pub migration: Option<crate::config::MigrationConfig>,
    /// The `[telemetry]` table (default: telemetry disabled, so that agents of other tests
    /// load no probes and bind no port).
    pub telemetry: Option<novacron_telemetry::TelemetryConfig>,
    /// The `[coordinator]` table (default: none).
    pub coordinator: Option<crate::config::CoordinatorConfig>,
}

/// A `novacron-agent` daemon with a temporary socket and state directory.
#[derive(Debug)]
pub struct TestAgent {
    dir: tempfile::TempDir,
    binary: PathBuf,
    child: Option<Child>,
}

impl TestAgent {
    /// Starts an agent with default options and waits until it serves.
    pub async fn start() -> Result<Self, TestError> {
        Self::start_with(TestAgentOptions::default()).await
    }

    /// Starts an agent with the given options and waits until it serves.
    pub async fn start_with(opts: TestAgentOptions) -> Result<Self, TestError> {
        let binary = opts
            .agent_binary
            .clone()
            .or_else(agent_binary)
            .ok_or(TestError::NoBinary)?;
        let dir = tempfile::Builder::new()
            .prefix("novacron-agent-test-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        let mut cfg = crate::config::AgentConfig {
            socket: dir.path().join("agent.sock"),
            state_dir: dir.path().join("state"),
            vmm_binary: Some(opts.vmm_binary.clone().unwrap_or_else(|| binary.clone())),
            log_level: "debug".into(),
            ..Default::default()
        };
        if let Some(t) = opts.stop_timeout_ms {
            cfg.stop_timeout_ms = t;
        }
        if let Some(m) = opts.console_log_max_bytes {
            cfg.console_log_max_bytes = m;
        }
        if let Some(m) = opts.max_memory_mib {
            cfg.max_memory_mib = m;
        }
        if let Some(m) = &opts.migration {
            cfg.migration = m.clone();
        }
        if let Some(c) = &opts.coordinator {
            cfg.coordinator = c.clone();
        }
        cfg.telemetry = opts
            .telemetry
            .clone()
            .unwrap_or(novacron_telemetry::TelemetryConfig {
                enabled: false,
                ..Default::default()
            });
        let text = toml::to_string(&cfg).map_err(|e| TestError::Io {
            context: "serialising the test config".into(),
            source: std::io::Error::other(e),
        })?;
        let cfg_path = dir.path().join("agent.toml");
        std::fs::write(&cfg_path, text).map_err(io("writing the test config"))?;
        let mut agent = TestAgent {
            dir,
            binary,
            child: None,
        };
        agent.spawn().await?;
        Ok(agent)
    }

    async fn spawn(&mut self) -> Result<(), TestError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("opening the agent log"))?;
        let log2 = log.try_clone().map_err(io("duplicating the agent log"))?;
        let mut child = Command::new(&self.binary)
            .arg("run")
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for the agent"))? {
                return Err(TestError::NotReady(format!(
                    "agent exited ({status}); log:\n{}",
                    self.log()
                )));
            }
            if tokio::net::UnixStream::connect(self.socket()).await.is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestError::NotReady(format!(
                    "no socket after 20 s; log:\n{}",
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new client connected to the agent.
    pub async fn client(&self) -> Result<AgentServiceClient<Channel>, TestError> {
        Ok(connect(&self.socket()).await?)
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The directory of VM `id`.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.state_dir().join("vms").join(id)
    }

    /// Where the agent serves `/metrics` (written by the daemon at start when telemetry is on).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        std::fs::read_to_string(self.state_dir().join("metrics.addr"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The agent config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// A scratch directory that lives as long as the agent.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The agent's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the daemon with SIGTERM (VMs keep running) and waits for it to exit; returns its
    /// exit status.
    pub fn shutdown(&mut self) -> Result<std::process::ExitStatus, TestError> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| TestError::NotReady("agent is not running".into()))?;
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for the agent"))? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().map_err(io("waiting for the agent"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL (as a crash would; VMs keep running) and reaps it.
    /// [`TestAgent::restart`] then starts it again on the same socket and state.
    pub fn kill(&mut self) -> Result<std::process::ExitStatus, TestError> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| TestError::NotReady("agent is not running".into()))?;
        child.kill().map_err(io("killing the agent"))?;
        child.wait().map_err(io("waiting for the agent"))
    }

    /// Stops the daemon with SIGTERM (unless it is already down, e.g. after
    /// [`TestAgent::kill`]) and starts it again on the same socket and state.
    pub async fn restart(&mut self) -> Result<(), TestError> {
        if self.child.is_some() {
            self.shutdown()?;
        }
        self.spawn().await
    }

    /// Pids of the VMM processes of this agent's VMs that are alive.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let Ok(dirs) = std::fs::read_dir(self.state_dir().join("vms")) else {
            return Vec::new();
        };
        dirs.flatten()
            .filter_map(|d| {
                let pid: u32 = std::fs::read_to_string(d.path().join("vmm.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let control = d.path().join("control.sock");
                (crate::manager::pid_alive(pid) && crate::manager::is_vmm_of(pid, &control))
                    .then_some(pid)
            })
            .collect()
    }

    /// SIGKILLs every VMM process of this agent's VMs.
    pub fn kill_vmms(&self) {
        for pid in self.vmm_pids() {
            signal(pid, libc::SIGKILL);
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_vmms();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        if pid > 0 {
            // SAFETY: kill(2) has no memory-safety preconditions; pid is a positive process
            // id of a process this test harness started.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }
}
