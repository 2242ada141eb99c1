//! Who may call what on the coordinator's port: the one table of RPC → what it needs
//! ([`need`]), bearer tokens with roles (Ed25519-signed JWTs), and the [`Guard`] that checks
//! both before a request reaches the service.
//!
//! - `grpc.health.v1`: open.
//! - `RaftTransport`: the caller's TLS certificate must name a coordinator of this cluster
//!   (`coord-<id>` with `id` a member; any `coord-*` while this node has no membership yet).
//! - `Coordinator`: a bearer token (`authorization: Bearer <JWT>`) with the role the RPC needs
//!   (viewer < operator < admin). The agent calls (RegisterHost, Heartbeat, ReportMigration)
//!   instead take the agent's certificate, which must name the very host in the request (the
//!   handler checks that with [`Caller::may_speak_for`]); an admin token may act for any host.
//!
//! A refused request changes nothing: the check runs before the service sees the request.
//! Missing, malformed, forged or expired tokens give UNAUTHENTICATED naming what was wrong;
//! too little role gives PERMISSION_DENIED naming the role needed.
//!
//! Token format: `base64url(header).base64url(claims).base64url(signature)` with header
//! `{"alg":"EdDSA","typ":"JWT"}`, claims `{"sub","role","iat","exp"}` (seconds since the Unix
//! epoch) and an Ed25519 signature over the first two parts. The signing key (`token.key`,
//! PKCS#8, mode 0600) is only needed to mint tokens; coordinators verify with the public key
//! (`token.pub`), so a coordinator's disk holds nothing that mints a token.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use novacron_migration::certs::{cert_name, is_coordinator_name};
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::server::NamedService;
use tonic::service::Interceptor;
use tonic::Status;

use crate::store::NodeId;

/// A role carried by a token; each includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: get, list, watch, wait, cluster status.
    Viewer,
    /// Viewer + VM lifecycle, migrations, drain.
    Operator,
    /// Operator + membership changes; may also act for any host on agent calls.
    Admin,
}

impl Role {
    /// The role's name as in tokens and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!(
                "invalid role {s:?}: expected viewer, operator or admin"
            )),
        }
    }
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing (health checks).
    Open,
    /// A token with at least this role.
    Role(Role),
    /// The agent's certificate naming the host in the request, or an admin token.
    Agent,
    /// The certificate of a coordinator of this cluster.
    Peer,
}

/// Every RPC of `novacron.coordinator.v1.Coordinator` and what it needs. A method missing
/// here needs admin (closed by default); a unit test checks that every RPC of the proto is
/// listed.
pub const COORDINATOR_RPCS: &[(&str, Need)] = &[
    ("RegisterHost", Need::Agent),
    ("Heartbeat", Need::Agent),
    ("ReportMigration", Need::Agent),
    ("Commands", Need::Agent),
    ("GetHost", Need::Role(Role::Viewer)),
    ("ListHosts", Need::Role(Role::Viewer)),
    ("GetVm", Need::Role(Role::Viewer)),
    ("ListVms", Need::Role(Role::Viewer)),
    ("GetMigration", Need::Role(Role::Viewer)),
    ("ListMigrations", Need::Role(Role::Viewer)),
    ("WaitMigration", Need::Role(Role::Viewer)),
    ("WatchEvents", Need::Role(Role::Viewer)),
    ("WatchVms", Need::Role(Role::Viewer)),
    ("ListProposals", Need::Role(Role::Viewer)),
    ("ClusterStatus", Need::Role(Role::Viewer)),
    ("DrainHost", Need::Role(Role::Operator)),
    ("CreateVm", Need::Role(Role::Operator)),
    ("StartVm", Need::Role(Role::Operator)),
    ("StopVm", Need::Role(Role::Operator)),
    ("DeleteVm", Need::Role(Role::Operator)),
    ("StartMigration", Need::Role(Role::Operator)),
    ("CancelMigration", Need::Role(Role::Operator)),
    ("AddMember", Need::Role(Role::Admin)),
    ("RemoveMember", Need::Role(Role::Admin)),
];

const COORDINATOR_SERVICE: &str = "novacron.coordinator.v1.Coordinator";
const RAFT_SERVICE: &str = "novacron.coordinator.v1.RaftTransport";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// What the gRPC path `/<service>/<method>` needs. Unknown services and methods need admin.
pub fn need(path: &str) -> Need {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match service {
        HEALTH_SERVICE => Need::Open,
        RAFT_SERVICE => Need::Peer,
        COORDINATOR_SERVICE => COORDINATOR_RPCS
            .iter()
            .find(|(m, _)| *m == method)
            .map(|(_, n)| *n)
            .unwrap_or(Need::Role(Role::Admin)),
        _ => Need::Role(Role::Admin),
    }
}

/// Errors of tokens and their keys.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No `authorization` metadata.
    #[error("missing bearer token: send metadata \"authorization: Bearer <token>\" (`novacron-coordinator token` makes one)")]
    Missing,
    /// The metadata is not `Bearer <token>`.
    #[error("invalid authorization metadata: expected \"Bearer <token>\"")]
    NotBearer,
    /// The token is not three base64url parts with JSON header and claims.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names another algorithm.
    #[error("token algorithm {0:?} is not accepted: expected \"EdDSA\"")]
    Algorithm(String),
    /// The signature does not verify with this cluster's key.
    #[error("token signature is invalid: not signed by this cluster's token key")]
    Signature,
    /// The token has expired.
    #[error("token of {subject:?} expired at {exp} (now {now}, seconds since the Unix epoch)")]
    Expired {
        /// Its subject.
        subject: String,
        /// Its expiry.
        exp: u64,
        /// Now.
        now: u64,
    },
    /// A TTL out of range.
    #[error("invalid ttl {0:?}: expected a positive number with a unit s, m, h or d (e.g. 24h), at most 3650d")]
    Ttl(String),
    /// A subject that is empty or too long.
    #[error("invalid subject {0:?}: expected 1 to 128 printable characters")]
    Subject(String),
    /// The clock is before 1970.
    #[error("the system clock is before 1970")]
    Clock,
    /// A key file is missing or unreadable.
    #[error("{path}: {source}{hint}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a key file failed.
    #[error("{path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key file does not hold a key.
    #[error("{path}: not a token key ({what})")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who holds it.
    pub sub: String,
    /// What it allows.
    pub role: Role,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
}

/// Now in Unix seconds.
pub fn unix_now() -> Result<u64, TokenError> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| TokenError::Clock)
}

/// Parses a TTL like `90s`, `30m`, `24h`, `7d`.
pub fn parse_ttl(s: &str) -> Result<Duration, TokenError> {
    let bad = || TokenError::Ttl(s.to_owned());
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let secs = match unit {
        's' => n,
        'm' => n.checked_mul(60).ok_or_else(bad)?,
        'h' => n.checked_mul(3600).ok_or_else(bad)?,
        'd' => n.checked_mul(86_400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if secs == 0 || secs > 3650 * 86_400 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

/// The signing key file in a cluster directory.
pub fn signing_key_path(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("token.key")
}

/// The verifying (public) key file in a cluster directory.
pub fn verify_key_path(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("token.pub")
}

/// Creates the token key pair in `cluster_dir` unless both files exist; returns the files
/// written. A lone `token.pub` without its key is an error (never silently replaced: tokens
/// minted with the old key would stop working).
pub fn init_keys(cluster_dir: &Path) -> Result<Vec<PathBuf>, TokenError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (key_path, pub_path) = (signing_key_path(cluster_dir), verify_key_path(cluster_dir));
    if key_path.exists() && pub_path.exists() {
        return Ok(vec![]);
    }
    if key_path.exists() != pub_path.exists() {
        let missing = if key_path.exists() {
            &pub_path
        } else {
            &key_path
        };
        return Err(TokenError::BadKey {
            path: missing.clone(),
            what: "missing while its pair exists; restore it or remove both to make new ones (old tokens then stop working)".into(),
        });
    }
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| TokenError::BadKey {
        path: key_path.clone(),
        what: "key generation failed".into(),
    })?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| TokenError::BadKey {
        path: key_path.clone(),
        what: e.to_string(),
    })?;
    let write = |path: &Path, data: &[u8], mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| {
                f.write_all(data)?;
                f.sync_all()
            })
            .map_err(|source| TokenError::Write {
                path: path.to_owned(),
                source,
            })
    };
    write(&key_path, B64.encode(pkcs8.as_ref()).as_bytes(), 0o600)?;
    write(
        &pub_path,
        B64.encode(pair.public_key().as_ref()).as_bytes(),
        0o644,
    )?;
    Ok(vec![key_path, pub_path])
}

fn read_b64(path: &Path, hint: &'static str) -> Result<Vec<u8>, TokenError> {
    let s = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_owned(),
        hint,
        source,
    })?;
    B64.decode(s.trim()).map_err(|e| TokenError::BadKey {
        path: path.to_owned(),
        what: format!("expected base64url: {e}"),
    })
}

const KEY_HINT: &str = " (`novacron-coordinator init` creates the token keys)";

/// Mints tokens (needs the private key).
pub struct TokenSigner {
    pair: Ed25519KeyPair,
}

impl TokenSigner {
    /// Loads `token.key` from `cluster_dir`.
    pub fn load(cluster_dir: &Path) -> Result<TokenSigner, TokenError> {
        let path = signing_key_path(cluster_dir);
        let pkcs8 = read_b64(&path, KEY_HINT)?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| TokenError::BadKey {
            path,
            what: e.to_string(),
        })?;
        Ok(TokenSigner { pair })
    }

    /// A token for `subject` with `role`, valid for `ttl` from now.
    pub fn mint(&self, subject: &str, role: Role, ttl: Duration) -> Result<String, TokenError> {
        let now = unix_now()?;
        self.mint_claims(&Claims {
            sub: subject.to_owned(),
            role,
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
        })
    }

    /// A token with exactly these claims (tests use it for expired tokens).
    pub fn mint_claims(&self, claims: &Claims) -> Result<String, TokenError> {
        if claims.sub.is_empty()
            || claims.sub.len() > 128
            || claims.sub.chars().any(|c| c.is_control())
        {
            return Err(TokenError::Subject(claims.sub.clone()));
        }
        let header = Header {
            alg: "EdDSA".into(),
            typ: "JWT".into(),
        };
        let mut t = B64.encode(serde_json::to_vec(&header).expect("header serializes"));
        t.push('.');
        t.push_str(&B64.encode(serde_json::to_vec(claims).expect("claims serialize")));
        let sig = self.pair.sign(t.as_bytes());
        t.push('.');
        t.push_str(&B64.encode(sig.as_ref()));
        Ok(t)
    }
}

/// Verifies tokens (needs only the public key).
#[derive(Clone)]
pub struct TokenVerifier {
    public: Arc<Vec<u8>>,
}

impl TokenVerifier {
    /// Loads `token.pub` from `cluster_dir`.
    pub fn load(cluster_dir: &Path) -> Result<TokenVerifier, TokenError> {
        let path = verify_key_path(cluster_dir);
        let public = read_b64(&path, KEY_HINT)?;
        if public.len() != 32 {
            return Err(TokenError::BadKey {
                path,
                what: format!(
                    "expected a 32-byte Ed25519 public key, got {} bytes",
                    public.len()
                ),
            });
        }
        Ok(TokenVerifier {
            public: Arc::new(public),
        })
    }

    /// Checks a token's form, algorithm, signature and expiry at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "expected three dot-separated base64url parts".into(),
            ));
        };
        let dec = |what: &str, p: &str| {
            B64.decode(p)
                .map_err(|e| TokenError::Malformed(format!("{what} is not base64url: {e}")))
        };
        let header: Header = serde_json::from_slice(&dec("header", h)?)
            .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
        if header.alg != "EdDSA" {
            return Err(TokenError::Algorithm(header.alg));
        }
        let sig = dec("signature", s)?;
        let signed = &token[..h.len() + 1 + c.len()];
        UnparsedPublicKey::new(&ED25519, self.public.as_slice())
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| TokenError::Signature)?;
        let claims: Claims = serde_json::from_slice(&dec("claims", c)?)
            .map_err(|e| TokenError::Malformed(format!("claims: {e}")))?;
        if now >= claims.exp {
            return Err(TokenError::Expired {
                subject: claims.sub,
                exp: claims.exp,
                now,
            });
        }
        Ok(claims)
    }

    /// The claims of an `authorization` metadata value `Bearer <token>`.
    pub fn verify_header(&self, value: Option<&str>, now: u64) -> Result<Claims, TokenError> {
        let v = value.ok_or(TokenError::Missing)?;
        let t = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .ok_or(TokenError::NotBearer)?;
        self.verify(t.trim(), now)
    }
}

/// Who is calling, as the [`Guard`] established it; handlers find it in the request's
/// extensions.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The valid token's claims, if one was sent.
    pub token: Option<Claims>,
    /// The name in the client certificate (verified against the cluster CA), if one was sent.
    pub cert: Option<String>,
}

impl Caller {
    /// Whether this caller may make an agent call for `host`: an admin token, or a
    /// certificate naming exactly `host` (and not a coordinator's).
    pub fn may_speak_for(&self, host: &str, rpc: &str) -> Result<(), Status> {
        if self.is_admin() {
            return Ok(());
        }
        match &self.cert {
            Some(name) if name == host && !is_coordinator_name(name) => Ok(()),
            Some(name) => Err(Status::permission_denied(format!(
                "{rpc}: the client certificate names {name:?}; an agent may only speak for its own host, not {host:?}"
            ))),
            None => Err(Status::permission_denied(format!(
                "{rpc} is an agent call: it needs the agent's client certificate naming host {host:?}, or an admin token"
            ))),
        }
    }

    /// Whether the caller holds a valid admin token.
    pub fn is_admin(&self) -> bool {
        self.token.as_ref().is_some_and(|c| c.role >= Role::Admin)
    }

    /// The caller of a request that went through the [`Guard`].
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default()
    }
}

/// The membership a peer certificate is checked against: `None` while this node has none.
pub type Members = Arc<dyn Fn() -> Option<BTreeSet<NodeId>> + Send + Sync>;

/// Decides each request: the token verifier and the current membership.
#[derive(Clone)]
pub struct Authorizer {
    verifier: TokenVerifier,
    members: Members,
}

impl Authorizer {
    /// An authorizer with `verifier` and the membership function `members`.
    pub fn new(verifier: TokenVerifier, members: Members) -> Authorizer {
        Authorizer { verifier, members }
    }

    /// Decides a call to `path` with the `authorization` value and the peer's certificate
    /// name; `Ok` carries who is calling.
    pub fn check(
        &self,
        path: &str,
        authorization: Option<&str>,
        cert: Option<String>,
    ) -> Result<Caller, Status> {
        let method = path.rsplit('/').next().unwrap_or(path);
        match need(path) {
            Need::Open => Ok(Caller { token: None, cert }),
            Need::Peer => {
                let Some(name) = cert else {
                    return Err(Status::unauthenticated(format!(
                        "{path}: the Raft transport needs a coordinator's client certificate; none was sent"
                    )));
                };
                let id = name
                    .strip_prefix("coord-")
                    .and_then(|i| i.parse::<NodeId>().ok());
                let ok = match (id, (self.members)()) {
                    (Some(id), Some(m)) => m.contains(&id),
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if ok {
                    Ok(Caller {
                        token: None,
                        cert: Some(name),
                    })
                } else {
                    Err(Status::permission_denied(format!(
                        "{path}: the client certificate names {name:?}, not a coordinator of this cluster (expected coord-<member id>)"
                    )))
                }
            }
            Need::Agent => {
                let token = match authorization {
                    None => None,
                    Some(_) => Some(self.token(authorization)?),
                };
                if token.is_none() && cert.is_none() {
                    return Err(Status::unauthenticated(format!(
                        "{method} is an agent call: it needs the agent's client certificate (or an admin token); neither was sent"
                    )));
                }
                Ok(Caller { token, cert })
            }
            Need::Role(role) => {
                let claims = self.token(authorization)?;
                if claims.role < role {
                    return Err(Status::permission_denied(format!(
                        "{method} needs role {role}; the token of {:?} has role {}",
                        claims.sub, claims.role
                    )));
                }
                Ok(Caller {
                    token: Some(claims),
                    cert,
                })
            }
        }
    }

    fn token(&self, authorization: Option<&str>) -> Result<Claims, Status> {
        let now = unix_now().map_err(|e| Status::internal(e.to_string()))?;
        self.verifier
            .verify_header(authorization, now)
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }
}

/// Wraps a gRPC service: every request is decided by the [`Authorizer`] before the service
/// sees it; a refused one is answered with its status, an accepted one carries its
/// [`Caller`] in the extensions.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    auth: Authorizer,
}

impl<S> Guard<S> {
    /// Guards `inner`.
    pub fn new(inner: S, auth: Authorizer) -> Guard<S> {
        Guard { inner, auth }
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

fn peer_cert_name(ext: &http::Extensions) -> Option<String> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = ext
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())?;
    cert_name(certs.first()?)
}

impl<S> Service<http::Request<Body>> for Guard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let authorization = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("\u{fffd}"));
        let cert = peer_cert_name(req.extensions());
        match self.auth.check(req.uri().path(), authorization, cert) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                let fut = self.inner.call(req);
                Box::pin(fut)
            }
            Err(status) => {
                tracing::debug!(path = req.uri().path(), %status, "refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A client-side interceptor that sends `authorization: Bearer <token>` (or nothing).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `token`; `None` sends no token.
    pub fn new(token: Option<&str>) -> Result<Bearer, TokenError> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        TokenError::Malformed(
                            "the token holds characters not allowed in metadata".into(),
                        )
                    })
            })
            .transpose()
            .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (tempfile::TempDir, TokenSigner, TokenVerifier) {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(init_keys(d.path()).unwrap().len(), 2);
        assert!(
            init_keys(d.path()).unwrap().is_empty(),
            "existing keys kept"
        );
        let s = TokenSigner::load(d.path()).unwrap();
        let v = TokenVerifier::load(d.path()).unwrap();
        (d, s, v)
    }

    #[test]
    fn every_rpc_of_the_proto_is_in_the_table() {
        let proto = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proto/proto/novacron/coordinator/v1/coordinator.proto"
        ))
        .unwrap();
        let service = proto
            .split("service Coordinator {")
            .nth(1)
            .and_then(|s| s.split("\n}").next())
            .unwrap();
        let rpcs: Vec<&str> = service
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap().trim())
            .collect();
        assert!(rpcs.len() >= 20, "{rpcs:?}");
        for rpc in rpcs {
            assert!(
                COORDINATOR_RPCS.iter().any(|(m, _)| *m == rpc),
                "RPC {rpc} is not in auth::COORDINATOR_RPCS: say which role it needs"
            );
        }
    }

    #[test]
    fn table_paths() {
        assert_eq!(need("/grpc.health.v1.Health/Check"), Need::Open);
        assert_eq!(
            need("/novacron.coordinator.v1.RaftTransport/Vote"),
            Need::Peer
        );
        assert_eq!(
            need("/novacron.coordinator.v1.Coordinator/ListVms"),
            Need::Role(Role::Viewer)
        );
        assert_eq!(
            need("/novacron.coordinator.v1.Coordinator/Unknown"),
            Need::Role(Role::Admin)
        );
        assert_eq!(need("/other.Svc/X"), Need::Role(Role::Admin));
    }

    #[test]
    fn tokens_round_trip_and_refuse_forgery_and_expiry() {
        let (_d, s, v) = keys();
        let t = s
            .mint("alice", Role::Operator, Duration::from_secs(60))
            .unwrap();
        let now = unix_now().unwrap();
        let c = v.verify(&t, now).unwrap();
        assert_eq!((c.sub.as_str(), c.role), ("alice", Role::Operator));
        assert!(matches!(
            v.verify(&t, c.exp),
            Err(TokenError::Expired { .. })
        ));
        // Raise the role in the claims and keep the signature: forged.
        let parts: Vec<&str> = t.split('.').collect();
        let forged_claims = B64.encode(
            serde_json::to_vec(&Claims {
                role: Role::Admin,
                ..c.clone()
            })
            .unwrap(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert!(matches!(v.verify(&forged, now), Err(TokenError::Signature)));
        // Another cluster's key.
        let (_d2, s2, _) = keys();
        let other = s2
            .mint("alice", Role::Admin, Duration::from_secs(60))
            .unwrap();
        assert!(matches!(v.verify(&other, now), Err(TokenError::Signature)));
        // alg none.
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(matches!(
            v.verify(&none, now),
            Err(TokenError::Algorithm(_))
        ));
        assert!(matches!(
            v.verify("abc", now),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            v.verify_header(None, now),
            Err(TokenError::Missing)
        ));
        assert!(matches!(
            v.verify_header(Some(&t), now),
            Err(TokenError::NotBearer)
        ));
    }

    #[test]
    fn roles_and_agents() {
        let (_d, s, v) = keys();
        let auth = Authorizer::new(v, Arc::new(|| Some([1, 2].into_iter().collect())));
        let tok = |r| {
            format!(
                "Bearer {}",
                s.mint("bob", r, Duration::from_secs(60)).unwrap()
            )
        };
        let create = "/novacron.coordinator.v1.Coordinator/CreateVm";
        let e = auth.check(create, None, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = auth
            .check(create, Some(&tok(Role::Viewer)), None)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("needs role operator"),
            "{}",
            e.message()
        );
        auth.check(create, Some(&tok(Role::Operator)), None)
            .unwrap();
        let add = "/novacron.coordinator.v1.Coordinator/AddMember";
        assert_eq!(
            auth.check(add, Some(&tok(Role::Operator)), None)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        auth.check(add, Some(&tok(Role::Admin)), None).unwrap();

        let hb = "/novacron.coordinator.v1.Coordinator/Heartbeat";
        let c = auth.check(hb, None, Some("h1".into())).unwrap();
        c.may_speak_for("h1", "Heartbeat").unwrap();
        let e = c.may_speak_for("h2", "Heartbeat").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            auth.check(hb, None, None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let c = auth.check(hb, Some(&tok(Role::Operator)), None).unwrap();
        assert!(c.may_speak_for("h1", "Heartbeat").is_err());
        let c = auth.check(hb, Some(&tok(Role::Admin)), None).unwrap();
        c.may_speak_for("h9", "Heartbeat").unwrap();
        let c = auth.check(hb, None, Some("coord-1".into())).unwrap();
        assert!(c.may_speak_for("coord-1", "Heartbeat").is_err());

        let vote = "/novacron.coordinator.v1.RaftTransport/Vote";
        auth.check(vote, None, Some("coord-2".into())).unwrap();
        for bad in ["coord-3", "h1", "coordinator"] {
            assert_eq!(
                auth.check(vote, None, Some(bad.into())).unwrap_err().code(),
                tonic::Code::PermissionDenied,
                "{bad}"
            );
        }
        assert_eq!(
            auth.check(vote, Some(&tok(Role::Admin)), None)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        for bad in ["", "h", "0h", "5", "5w", "-1h", "99999d", "5ä"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
