//! rustls configurations for migration connections: TLS 1.3 only, ALPN
//! [`ALPN`], mutual authentication against the cluster CA.
//!
//! The destination (server) requires a client certificate chaining to the CA and learns the
//! source agent's name with [`peer_agent_name`]. The source (client) trusts only the CA and
//! connects with server name = the destination agent's name, so webpki's hostname
//! verification refuses a certificate issued to any other agent. See
//! `docs/design/migration.md`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol of migration connections.
pub const ALPN: &[u8] = b"novacron-migration/1";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input holds no certificate.
    #[error("no certificate found in the {0} PEM")]
    NoCertificate(&'static str),
    /// A PEM input cannot be parsed.
    #[error("cannot parse the {what} PEM: {source}")]
    Pem {
        /// Which input (`certificate`, `key`, `CA`).
        what: &'static str,
        /// The cause.
        source: rustls_pki_types::pem::Error,
    },
    /// Reading a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A CA certificate is not acceptable as a trust anchor.
    #[error("invalid CA certificate: {0}")]
    BadCa(rustls::Error),
    /// The client certificate verifier cannot be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// An agent's certificate chain (leaf first) and private key.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Parses a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, SEC1 or
    /// PKCS#1).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let certs = parse_certs(cert_pem).map_err(|e| match e {
            TlsError::NoCertificate(_) => TlsError::NoCertificate("certificate"),
            TlsError::Pem { source, .. } => TlsError::Pem {
                what: "certificate",
                source,
            },
            e => e,
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
            what: "key",
            source,
        })?;
        Ok(Self { certs, key })
    }

    /// Reads [`Identity::from_pem`]'s inputs from files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Io {
                path: path.to_owned(),
                source,
            })
        };
        Self::from_pem(&read(cert)?, &read(key)?)
    }

    /// The certificate chain, leaf first.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The agent named by the leaf certificate (its DNS SAN, else its CN).
    pub fn agent_name(&self) -> Option<String> {
        self.certs
            .first()
            .and_then(|c| crate::certs::der::agent_name(c))
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("agent", &self.agent_name())
            .field("certs", &self.certs.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// All certificates of a PEM input; at least one.
pub(crate) fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what: "CA", source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate("CA"));
    }
    Ok(certs)
}

fn roots(ca_pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert).map_err(TlsError::BadCa)?;
    }
    Ok(Arc::new(roots))
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The destination's configuration: presents `id`, requires a client certificate chaining
/// to `ca_pem` (the cluster CA, PEM), TLS 1.3, ALPN [`ALPN`].
pub fn server_config(id: &Identity, ca_pem: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider.clone()).build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The source's configuration: presents `id`, trusts only `ca_pem` (the cluster CA, PEM),
/// TLS 1.3, ALPN [`ALPN`]. Connect with server name = the destination agent's name.
pub fn client_config(id: &Identity, ca_pem: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg =
        client_builder(ca_pem)?.with_client_auth_cert(id.certs.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The client builder up to the client certificate (tests use it without one).
pub(crate) fn client_builder(
    ca_pem: &[u8],
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?))
}

/// The agent named by the peer's certificate (its DNS SAN, else its CN), once the handshake
/// verified it against the cluster CA. `None` if the peer sent no certificate or it names
/// nothing.
pub fn peer_agent_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    crate::certs::der::agent_name(certs.first()?)
}
