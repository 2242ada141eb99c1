//! The cluster CA and agent certificates (ECDSA P-256, made with rcgen), and the on-disk
//! cluster directory (`ca.pem`, `ca.key`, `<agent>.pem`, `<agent>.key`).
//!
//! An agent certificate names its agent in the subject CN and in its only DNS SAN, and is
//! usable for TLS server and client authentication, so one certificate serves both ends of
//! a migration. See `docs/design/migration.md`.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use crate::tls::{Identity, TlsError};

/// How long an agent certificate is valid.
pub const AGENT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the cluster CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are valid from this long before their creation (clock skew between hosts).
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// An agent name is not 1..=63 characters of `[a-z0-9-]`.
    #[error("invalid agent name {0:?}: expected 1 to 63 characters of [a-z0-9-]")]
    InvalidAgentName(String),
    /// An agent name is reserved for coordinators.
    #[error(
        "invalid agent name {0:?}: \"coordinator\" and \"coord-*\" are reserved for coordinators"
    )]
    ReservedName(String),
    /// A cluster name is not 1..=63 characters of `[a-z0-9-]`.
    #[error("invalid cluster name {0:?}: expected 1 to 63 characters of [a-z0-9-]")]
    InvalidClusterName(String),
    /// rcgen refused to generate a key or certificate.
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA certificate or key given to [`issue_agent`] cannot be used.
    #[error("unusable CA: {0}")]
    BadCa(String),
    /// The system clock is before 1970.
    #[error("the system clock is before 1970; cannot date a certificate")]
    Clock,
    /// `init` would overwrite an existing CA.
    #[error("{0} already exists: refusing to overwrite the cluster CA")]
    CaExists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file does not hold a usable certificate or key.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    /// The certificate (PEM `CERTIFICATE`).
    pub cert: String,
    /// The private key (PEM `PRIVATE KEY`, PKCS#8).
    pub key: String,
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Checks an agent name: 1..=63 characters of `[a-z0-9-]` (a DNS label, lower case).
pub fn validate_agent_name(agent: &str) -> Result<(), CertError> {
    if is_label(agent) {
        Ok(())
    } else {
        Err(CertError::InvalidAgentName(agent.to_owned()))
    }
}

fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Validity from [`BACKDATE`] ago until `valid_for` from now.
fn validity(params: &mut CertificateParams, valid_for: Duration) -> Result<(), CertError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CertError::Clock)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + (now + valid_for);
    Ok(())
}

/// The CA's parameters for `cluster`. Rebuilt by [`issue_agent`] to sign with a loaded CA,
/// so it must depend on `cluster` only (validity aside).
fn ca_params(cluster: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "NovaCron");
    p.distinguished_name
        .push(DnType::CommonName, format!("novacron cluster CA {cluster}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Creates a new cluster CA (self-signed, ECDSA P-256, valid for [`CA_VALIDITY`]).
/// `cluster` must be 1..=63 characters of `[a-z0-9-]`.
pub fn generate_ca(cluster: &str) -> Result<Pem, CertError> {
    if !is_label(cluster) {
        return Err(CertError::InvalidClusterName(cluster.to_owned()));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(cluster);
    validity(&mut params, CA_VALIDITY)?;
    let cert = params.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The DNS name every coordinator certificate carries besides its own `coord-<id>`: clients
/// that know a coordinator only by address verify the server under this name.
pub const COORDINATOR_NAME: &str = "coordinator";

/// A coordinator's own name, `coord-<id>`.
pub fn coordinator_name(id: u64) -> String {
    format!("coord-{id}")
}

/// Whether `name` is reserved for coordinators ([`COORDINATOR_NAME`] or `coord-*`), so that no
/// agent certificate can pass for a coordinator.
pub fn is_coordinator_name(name: &str) -> bool {
    name == COORDINATOR_NAME || name.starts_with("coord-")
}

/// Issues a certificate for `agent` signed by `ca` (made by [`generate_ca`]): ECDSA P-256,
/// subject CN and only DNS SAN = `agent`, EKU serverAuth + clientAuth, valid for
/// [`AGENT_VALIDITY`]. Coordinator names are refused ([`is_coordinator_name`]).
pub fn issue_agent(ca: &Pem, agent: &str) -> Result<Pem, CertError> {
    validate_agent_name(agent)?;
    if is_coordinator_name(agent) {
        return Err(CertError::ReservedName(agent.to_owned()));
    }
    issue_named(ca, &[agent.to_owned()])
}

/// Issues the certificate of coordinator `id`: like [`issue_agent`], with the DNS SANs
/// `coord-<id>` (first, also the CN) and [`COORDINATOR_NAME`].
pub fn issue_coordinator(ca: &Pem, id: u64) -> Result<Pem, CertError> {
    issue_named(ca, &[coordinator_name(id), COORDINATOR_NAME.to_owned()])
}

/// The name a DER certificate gives its holder: its first DNS SAN, else its CN.
pub fn cert_name(der: &[u8]) -> Option<String> {
    der::agent_name(der)
}

fn issue_named(ca: &Pem, names: &[String]) -> Result<Pem, CertError> {
    let agent = names[0].as_str();
    let ca_key =
        KeyPair::from_pem(&ca.key).map_err(|e| CertError::BadCa(format!("CA key: {e}")))?;
    let ca_der = crate::tls::parse_certs(ca.cert.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::BadCa("no certificate in the CA PEM".into()))?;
    let ca_parts = der::cert_parts(&ca_der)
        .ok_or_else(|| CertError::BadCa("cannot parse the CA certificate".into()))?;
    // rcgen (without x509-parser) cannot load a certificate; rebuild the CA from its name and
    // key and check that it has the same subject and public key as the stored one, so the
    // issued certificate's issuer and authority key identifier match it.
    let cluster = ca_parts
        .common_name
        .as_deref()
        .and_then(|cn| cn.strip_prefix("novacron cluster CA "))
        .ok_or_else(|| CertError::BadCa("not a novacron cluster CA (subject CN)".into()))?;
    let rebuilt = ca_params(cluster).self_signed(&ca_key)?;
    let rebuilt_parts = der::cert_parts(rebuilt.der())
        .ok_or_else(|| CertError::BadCa("cannot parse the rebuilt CA certificate".into()))?;
    if rebuilt_parts.spki != ca_parts.spki {
        return Err(CertError::BadCa(
            "the CA key does not belong to the CA certificate".into(),
        ));
    }
    if rebuilt_parts.subject != ca_parts.subject {
        return Err(CertError::BadCa(
            "not a novacron cluster CA (subject encoding)".into(),
        ));
    }

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, agent);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, AGENT_VALIDITY)?;
    let cert = params.signed_by(&key, &rebuilt, &ca_key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A cluster directory: `ca.pem`, `ca.key` (mode 0600), `<agent>.pem`, `<agent>.key`
/// (mode 0600).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDir(pub PathBuf);

impl ClusterDir {
    /// The directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The CA certificate file, `ca.pem`.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.0.join("ca.pem")
    }

    /// The CA key file, `ca.key`.
    pub fn ca_key_path(&self) -> PathBuf {
        self.0.join("ca.key")
    }

    /// `<agent>.pem` and `<agent>.key`.
    pub fn agent_paths(&self, agent: &str) -> Result<(PathBuf, PathBuf), CertError> {
        validate_agent_name(agent)?;
        Ok((
            self.0.join(format!("{agent}.pem")),
            self.0.join(format!("{agent}.key")),
        ))
    }

    /// Creates the directory (mode 0700) if needed and a new cluster CA in it. Refuses to
    /// overwrite an existing `ca.pem` or `ca.key`. Returns the files written.
    pub fn init(&self, cluster: &str) -> Result<Vec<PathBuf>, CertError> {
        let pem = generate_ca(cluster)?;
        create_dir(&self.0)?;
        let (cert_path, key_path) = (self.ca_cert_path(), self.ca_key_path());
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CertError::CaExists(p.clone()));
            }
        }
        write_new(&key_path, pem.key.as_bytes(), 0o600)?;
        if let Err(e) = write_new(&cert_path, pem.cert.as_bytes(), 0o644) {
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        Ok(vec![cert_path, key_path])
    }

    /// Issues a certificate for `agent` with the directory's CA and writes `<agent>.pem` and
    /// `<agent>.key` (replacing older ones atomically). Returns the files written.
    pub fn issue(&self, agent: &str) -> Result<Vec<PathBuf>, CertError> {
        let (cert_path, key_path) = self.agent_paths(agent)?;
        let ca = Pem {
            cert: read_string(&self.ca_cert_path())?,
            key: read_string(&self.ca_key_path())?,
        };
        let pem = issue_agent(&ca, agent)?;
        write_replace(&key_path, pem.key.as_bytes(), 0o600)?;
        write_replace(&cert_path, pem.cert.as_bytes(), 0o644)?;
        Ok(vec![cert_path, key_path])
    }

    /// Issues the certificate of coordinator `id` ([`issue_coordinator`]) and writes
    /// `coord-<id>.pem` and `coord-<id>.key`. Returns the files written.
    pub fn issue_coordinator(&self, id: u64) -> Result<Vec<PathBuf>, CertError> {
        let (cert_path, key_path) = self.agent_paths(&coordinator_name(id))?;
        let ca = Pem {
            cert: read_string(&self.ca_cert_path())?,
            key: read_string(&self.ca_key_path())?,
        };
        let pem = issue_coordinator(&ca, id)?;
        write_replace(&key_path, pem.key.as_bytes(), 0o600)?;
        write_replace(&cert_path, pem.cert.as_bytes(), 0o644)?;
        Ok(vec![cert_path, key_path])
    }

    /// Loads `<agent>.pem` and `<agent>.key`.
    pub fn load_identity(&self, agent: &str) -> Result<Identity, CertError> {
        let (cert_path, key_path) = self.agent_paths(agent)?;
        let cert = read(&cert_path)?;
        let key = read(&key_path)?;
        Ok(Identity::from_pem(&cert, &key)?)
    }

    /// Loads `ca.pem` (PEM bytes, as [`crate::tls::server_config`] and
    /// [`crate::tls::client_config`] take them).
    pub fn load_ca(&self) -> Result<Vec<u8>, CertError> {
        let path = self.ca_cert_path();
        let ca = read(&path)?;
        crate::tls::parse_certs(&ca)?;
        Ok(ca)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(io_err(path))
}

fn read_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Writes a file that must not exist yet.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::CaExists(path.to_owned())
            } else {
                io_err(path)(e)
            }
        })?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io_err(path))
}

/// Writes a file through a temporary file and a rename, so the key never exists with
/// wider permissions and readers never see half a file.
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let result = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    Ok(())
}

/// A minimal DER walk over X.509 certificates: just enough to find the subject, the public
/// key, the DNS SANs and the CN.
pub(crate) mod der {
    /// One TLV: (tag, contents, whole TLV, rest of the input).
    type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

    /// The first TLV of `input`.
    fn tlv(input: &[u8]) -> Option<Tlv<'_>> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let header = input.len() - rest.len();
        Some((tag, &rest[..len], &input[..header + len], &rest[len..]))
    }

    /// The contents of a TLV that must have `tag`, and the rest.
    fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (t, contents, _, rest) = tlv(input)?;
        (t == tag).then_some((contents, rest))
    }

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

    /// The parts of a certificate this crate needs.
    pub(crate) struct CertParts<'a> {
        /// The subject Name (whole TLV).
        pub(crate) subject: &'a [u8],
        /// The SubjectPublicKeyInfo (whole TLV).
        pub(crate) spki: &'a [u8],
        /// The subject's first CN, if it is a string.
        pub(crate) common_name: Option<String>,
        /// The dNSName SANs.
        pub(crate) dns_names: Vec<String>,
    }

    /// Parses `cert` (DER X.509).
    pub(crate) fn cert_parts(cert: &[u8]) -> Option<CertParts<'_>> {
        let (certificate, _) = expect(cert, SEQUENCE)?;
        let (tbs, _) = expect(certificate, SEQUENCE)?;
        let mut rest = tbs;
        // [0] EXPLICIT version, optional.
        if rest.first() == Some(&0xa0) {
            rest = tlv(rest)?.3;
        }
        let rest = tlv(rest)?.3; // serialNumber
        let rest = tlv(rest)?.3; // signature
        let rest = tlv(rest)?.3; // issuer
        let rest = tlv(rest)?.3; // validity
        let (tag, subject_contents, subject, rest) = tlv(rest)?;
        let (spki_tag, _, spki, mut rest) = tlv(rest)?;
        if tag != SEQUENCE || spki_tag != SEQUENCE {
            return None;
        }
        let common_name = common_name(subject_contents);
        let mut dns_names = Vec::new();
        while let Some((tag, contents, _, next)) = tlv(rest) {
            rest = next;
            if tag != 0xa3 {
                continue; // issuerUniqueID, subjectUniqueID
            }
            let (mut exts, _) = expect(contents, SEQUENCE)?;
            while !exts.is_empty() {
                let (ext, next) = expect(exts, SEQUENCE)?;
                exts = next;
                let (oid, mut ext_rest) = expect(ext, 0x06)?;
                if oid != OID_SAN {
                    continue;
                }
                if ext_rest.first() == Some(&0x01) {
                    ext_rest = tlv(ext_rest)?.3; // critical
                }
                let (value, _) = expect(ext_rest, 0x04)?;
                let (mut names, _) = expect(value, SEQUENCE)?;
                while !names.is_empty() {
                    let (tag, name, _, next) = tlv(names)?;
                    names = next;
                    if tag == 0x82 {
                        dns_names.push(String::from_utf8(name.to_vec()).ok()?);
                    }
                }
            }
        }
        Some(CertParts {
            subject,
            spki,
            common_name,
            dns_names,
        })
    }

    /// The first CN of a Name's contents (UTF8String, PrintableString or IA5String).
    fn common_name(mut rdns: &[u8]) -> Option<String> {
        while !rdns.is_empty() {
            let (mut set, next) = expect(rdns, SET)?;
            rdns = next;
            while !set.is_empty() {
                let (atv, next) = expect(set, SEQUENCE)?;
                set = next;
                let (oid, value) = expect(atv, 0x06)?;
                if oid == OID_CN {
                    let (tag, s, _, _) = tlv(value)?;
                    return matches!(tag, 0x0c | 0x13 | 0x16)
                        .then(|| String::from_utf8(s.to_vec()).ok())
                        .flatten();
                }
            }
        }
        None
    }

    /// The agent a certificate names: its first DNS SAN, else its CN.
    pub(crate) fn agent_name(cert: &[u8]) -> Option<String> {
        let parts = cert_parts(cert)?;
        parts.dns_names.into_iter().next().or(parts.common_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names() {
        for ok in ["a", "node-1", &"x".repeat(63)] {
            validate_agent_name(ok).unwrap();
        }
        for bad in ["", "Node1", "a.b", "a_b", "ä", &"x".repeat(64)] {
            let e = validate_agent_name(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("[a-z0-9-]"),
                "{e}"
            );
        }
    }

    #[test]
    fn issued_cert_names_the_agent() {
        let ca = generate_ca("prod").unwrap();
        let pem = issue_agent(&ca, "node-7").unwrap();
        let der = crate::tls::parse_certs(pem.cert.as_bytes()).unwrap();
        let parts = der::cert_parts(&der[0]).unwrap();
        assert_eq!(parts.dns_names, vec!["node-7".to_owned()]);
        assert_eq!(parts.common_name.as_deref(), Some("node-7"));
        assert_eq!(der::agent_name(&der[0]).as_deref(), Some("node-7"));
    }

    #[test]
    fn coordinator_certs_carry_both_names_and_agents_cannot_take_them() {
        let ca = generate_ca("prod").unwrap();
        let pem = issue_coordinator(&ca, 3).unwrap();
        let der = crate::tls::parse_certs(pem.cert.as_bytes()).unwrap();
        let parts = der::cert_parts(&der[0]).unwrap();
        assert_eq!(
            parts.dns_names,
            vec!["coord-3".to_owned(), "coordinator".to_owned()]
        );
        assert_eq!(cert_name(&der[0]).as_deref(), Some("coord-3"));
        for reserved in ["coordinator", "coord-1"] {
            let e = issue_agent(&ca, reserved).unwrap_err().to_string();
            assert!(e.contains("reserved for coordinators"), "{e}");
        }
    }

    #[test]
    fn issue_refuses_mismatched_ca_key() {
        let a = generate_ca("a").unwrap();
        let b = generate_ca("a").unwrap();
        let mixed = Pem {
            cert: a.cert,
            key: b.key,
        };
        let e = issue_agent(&mixed, "n1").unwrap_err().to_string();
        assert!(e.contains("does not belong"), "{e}");
    }

    #[test]
    fn cluster_dir() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = ClusterDir::new(tmp.path().join("cluster"));
        assert_eq!(dir.init("prod").unwrap().len(), 2);
        let mode = fs::metadata(dir.ca_key_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(dir.init("prod"), Err(CertError::CaExists(_))));
        dir.issue("node-1").unwrap();
        let mode = fs::metadata(dir.path().join("node-1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        dir.issue("node-1").unwrap(); // re-issue replaces
        dir.load_identity("node-1").unwrap();
        dir.load_ca().unwrap();
        assert!(matches!(
            dir.issue("../x"),
            Err(CertError::InvalidAgentName(_))
        ));
    }
}
