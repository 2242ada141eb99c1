//! TLS on the coordinator's one gRPC port: what a coordinator presents and trusts, and how
//! clients (peers, agents, novacronctl, tests) dial it.
//!
//! Every certificate comes from the cluster CA (`ca.pem` in the cluster directory, made by
//! `novacron-coordinator init`). Coordinator `N` presents `coord-N.pem`, whose DNS names are
//! `coord-N` and `coordinator`. A coordinator dials a peer with its own certificate and checks
//! the peer's name `coord-<target id>`; other clients check the generic name `coordinator`.
//! The server asks every client for a certificate but does not require one: people and
//! programs authenticate with a bearer token instead (see [`crate::auth`]), and what a
//! certificate allows is decided per RPC there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_migration::certs::{coordinator_name, ClusterDir, COORDINATOR_NAME};
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use crate::store::NodeId;

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("{path}: {source}{hint}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What to do about it.
        hint: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

fn read(path: &Path, hint: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        hint: hint.to_owned(),
        source,
    })
}

fn read_pem(path: &Path, hint: &str, kind: &str) -> Result<Vec<u8>, TlsError> {
    let b = read(path, hint)?;
    if !String::from_utf8_lossy(&b).contains(&format!("-----BEGIN {kind}")) {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            what: format!("expected a PEM {kind}"),
        });
    }
    Ok(b)
}

/// Reads a CA certificate (PEM).
pub fn load_ca(path: &Path) -> Result<Certificate, TlsError> {
    Ok(Certificate::from_pem(read_pem(
        path,
        " (the cluster CA; `novacron-coordinator init` creates it)",
        "CERTIFICATE",
    )?))
}

/// Reads a certificate and its key (PEM).
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(
        read_pem(cert, "", "CERTIFICATE")?,
        read_pem(key, "", "PRIVATE KEY")?,
    ))
}

/// A coordinator's own TLS material: the cluster CA and its `coord-<id>` certificate.
#[derive(Clone)]
pub struct NodeTls {
    id: NodeId,
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("id", &self.id).finish()
    }
}

impl NodeTls {
    /// Loads `ca.pem` and `coord-<id>.pem`/`.key` from the cluster directory.
    pub fn load(dir: &ClusterDir, id: NodeId) -> Result<NodeTls, TlsError> {
        let name = coordinator_name(id);
        let (cert, key) = (
            dir.path().join(format!("{name}.pem")),
            dir.path().join(format!("{name}.key")),
        );
        let hint = format!(
            " (the certificate of coordinator {id}: run `novacron-coordinator init --cluster-dir {} --issue {id}`)",
            dir.path().display()
        );
        Ok(NodeTls {
            id,
            ca: load_ca(&dir.ca_cert_path())?,
            identity: Identity::from_pem(
                read_pem(&cert, &hint, "CERTIFICATE")?,
                read_pem(&key, &hint, "PRIVATE KEY")?,
            ),
        })
    }

    /// The server side: present `coord-<id>`, ask clients for a certificate from the cluster
    /// CA (optional: a client without one is judged by its token).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(true)
    }

    /// A lazily connected channel to peer coordinator `target` at `addr`, presenting this
    /// coordinator's certificate and accepting only `coord-<target>`.
    pub fn peer_channel(
        &self,
        target: NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<Channel, tonic::transport::Error> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(coordinator_name(target));
        channel(addr, tls, timeout)
    }
}

/// How a client (agent, novacronctl, test, bench) dials coordinators.
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: ClientTlsConfig,
}

impl ClientTls {
    /// Trusts `ca` and checks the server name `server_name` (normally [`COORDINATOR_NAME`]),
    /// presenting `identity` if given.
    pub fn new(ca: Certificate, identity: Option<Identity>, server_name: &str) -> ClientTls {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name(server_name);
        if let Some(id) = identity {
            config = config.identity(id);
        }
        ClientTls { config }
    }

    /// Trusts `ca` and checks [`COORDINATOR_NAME`]; no client certificate.
    pub fn anonymous(ca: Certificate) -> ClientTls {
        ClientTls::new(ca, None, COORDINATOR_NAME)
    }

    /// A lazily connected channel to `addr` ("host:port").
    pub fn channel(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<Channel, tonic::transport::Error> {
        channel(addr, self.config.clone(), timeout)
    }

    /// The TLS configuration (for callers that build their own `Endpoint`).
    pub fn config(&self) -> ClientTlsConfig {
        self.config.clone()
    }
}

/// A lazily connected TLS channel to `addr` ("host:port").
fn channel(
    addr: &str,
    tls: ClientTlsConfig,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .connect_lazy())
}
