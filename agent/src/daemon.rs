//! The daemon: serves the gRPC API on a unix socket until asked to shut down.
//!
//! Shutting down stops serving and returns; it never stops VMs (their VMM processes run in
//! their own sessions and a restarted agent re-attaches to them).

use std::future::Future;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

/// How long shutdown waits for in-flight requests (e.g. a graceful stop) to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

use novacron_proto::agent::v1::agent_service_server::AgentServiceServer;

use std::sync::Arc;

use crate::config::AgentConfig;
use crate::manager::{ManagerConfig, ManagerError, VmManager, DEFAULT_START_TIMEOUT};
use crate::migration::MigrationContext;
use crate::service::AgentServiceImpl;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory is locked by another agent.
    #[error("state directory {0} is in use by another novacron-agent")]
    StateDirLocked(PathBuf),
    /// Another agent answers on the socket.
    #[error("socket {0} is in use by a running agent")]
    SocketInUse(PathBuf),
    /// Setting up files or the socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM manager could not load the state directory.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    /// The migration identity or listener could not be set up.
    #[error("{0}")]
    Migration(String),
    /// Telemetry could not start (its `/metrics` address is unusable).
    #[error("{0}")]
    Telemetry(String),
    /// The coordinator link could not be set up (its TLS material is unusable).
    #[error("{0}")]
    Coordinator(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let context = context.into();
    move |source| DaemonError::Io { context, source }
}

/// Takes an exclusive, non-blocking lock on `<state_dir>/agent.lock` for the life of the
/// returned file, so two agents never share a state directory.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, DaemonError> {
    std::fs::create_dir_all(state_dir).map_err(io(format!(
        "creating state directory {}",
        state_dir.display()
    )))?;
    let path = state_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    // SAFETY: flock(2) on a file descriptor we own for the duration of the call; no memory
    // is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DaemonError::StateDirLocked(state_dir.to_path_buf()));
        }
        return Err(io(format!("locking {}", path.display()))(e));
    }
    Ok(file)
}

/// Binds the API socket: removes a stale socket file, refuses one a live agent answers on,
/// and sets mode 0600.
async fn bind(socket: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = socket.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(socket).await.is_ok() {
                return Err(DaemonError::SocketInUse(socket.to_path_buf()));
            }
            info!("removing stale socket {}", socket.display());
            std::fs::remove_file(socket)
                .map_err(io(format!("removing stale socket {}", socket.display())))?;
        }
        Ok(_) => {
            return Err(io(format!("binding {}", socket.display()))(
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ),
            ))
        }
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(socket).map_err(io(format!("binding {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod 0600 {}", socket.display())))?;
    Ok(listener)
}

/// Runs the daemon until `shutdown` resolves. Must be called within a tokio runtime.
pub async fn serve(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    let _lock = lock_state_dir(&cfg.state_dir)?;
    let vmm_binary = cfg
        .vmm_program()
        .map_err(io("finding the running executable for vmm_binary"))?;
    let migration = MigrationContext::load(&cfg.migration)
        .map_err(DaemonError::Migration)?
        .map(Arc::new);
    // Bind the migration listener before loading VMs, so that a port in use fails the
    // start before anything is touched.
    let endpoint =
        match (&migration, cfg.migration.listen) {
            (Some(ctx), Some(addr)) => Some(ctx.bind(addr).await.map_err(|e| {
                DaemonError::Migration(format!("migration: listening on {addr}: {e}"))
            })?),
            _ => None,
        };
    let mgr = VmManager::open(ManagerConfig {
        state_dir: cfg.state_dir.clone(),
        vmm_binary,
        console_log_max_bytes: cfg.console_log_max_bytes,
        stop_timeout_ms: cfg.stop_timeout_ms,
        start_timeout: DEFAULT_START_TIMEOUT,
        max_memory_mib: cfg.max_memory_mib,
        dirty_tracking: cfg.migration.dirty_tracking,
        migration: migration.clone(),
    })
    .await?;
    if let Some(ctx) = &migration {
        info!(agent = %ctx.agent_name, listen = ?cfg.migration.listen, peers = ctx.peers.len(), "live migration configured");
    }
    if let Some(endpoint) = endpoint.clone() {
        tokio::spawn(crate::migration::serve(mgr.clone(), endpoint));
    }
    info!(
        vms = mgr.list().len(),
        state_dir = %cfg.state_dir.display(),
        "loaded VMs"
    );
    let telemetry = if cfg.telemetry.enabled {
        let mut tcfg = cfg.telemetry.clone();
        if tcfg.anomaly.weights.is_none() {
            tcfg.anomaly.weights = Some(cfg.state_dir.join("anomaly.safetensors"));
        }
        let t = novacron_telemetry::Telemetry::start(
            tcfg,
            Arc::new(crate::telemetry::ManagerSource(mgr.clone())),
        )
        .await
        .map_err(|e| DaemonError::Telemetry(e.to_string()))?;
        // Tests (and operators with `listen = "...:0"`) find the bound port here.
        let addr_file = cfg.state_dir.join("metrics.addr");
        std::fs::write(&addr_file, t.local_addr().to_string())
            .map_err(io(format!("writing {}", addr_file.display())))?;
        Some(Arc::new(t))
    } else {
        None
    };
    if let Some(link) = crate::coordinator::Link::new(&cfg, mgr.clone(), telemetry.clone())
        .map_err(|e| DaemonError::Coordinator(e.to_string()))?
    {
        info!(endpoints = ?cfg.coordinator.endpoints, "dialing the coordinator");
        tokio::spawn(link.run());
    }
    let listener = bind(&cfg.socket).await?;
    info!(socket = %cfg.socket.display(), "serving");
    let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
    let mgr2 = mgr.clone();
    let server = tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(
            AgentServiceImpl::new(mgr).with_telemetry(telemetry),
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            shutdown.await;
            // End console streams so that graceful shutdown does not wait on followers.
            mgr2.shutdown();
            let _ = down_tx.send(());
        });
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            if down_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            warn!("requests still in flight after {SHUTDOWN_GRACE:?}; exiting anyway");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(endpoint) = endpoint {
        endpoint.close(0u32.into(), b"agent shutting down");
    }
    info!("stopped serving; VMs keep running");
    result.map_err(DaemonError::from)
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}
