//! quinn endpoints for migrations (mutual TLS from [`crate::tls`]), with a transport tuned
//! for bulk transfer, and frame I/O over quinn streams.
//!
//! The frame helpers know only the 16-byte header layout of `docs/design/migration.md`
//! (the payload length, little-endian u32 at offset 8); checking and decoding a frame is
//! [`crate::frame`]'s job.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, IdleTimeout, TransportConfig, VarInt};

use crate::certs::{validate_agent_name, CertError};
use crate::tls::{self, Identity, TlsError};

/// How long [`connect`] and [`accept`] wait for the handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive interval: keeps an idle control stream's connection alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A connection that heard nothing from its peer for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive window per stream (flow control).
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Receive (and send) window per connection (flow control).
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 16;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TLS configuration could not be built from the identity and CA.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The agent name asked for is not valid.
    #[error(transparent)]
    Agent(#[from] CertError),
    /// The rustls configuration is not usable for QUIC.
    #[error("TLS configuration not usable for QUIC: {0}")]
    Quic(String),
    /// Binding the UDP socket failed.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// quinn refused to start the connection (e.g. endpoint closing, bad address).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// No handshake within the timeout: the peer is unreachable, not listening or not
    /// answering.
    #[error("no QUIC handshake with {addr} within {after:?}: peer unreachable or not listening")]
    Unreachable {
        /// The peer.
        addr: SocketAddr,
        /// How long we waited.
        after: Duration,
    },
    /// We refused the peer's certificate (unknown issuer, wrong agent name, expired, none,
    /// ...); the reason is rustls's.
    #[error("TLS handshake failed: refusing the peer's certificate: {0}")]
    PeerCertificate(String),
    /// The peer refused our certificate (or the handshake) with a TLS alert.
    #[error("TLS handshake failed: the peer refused our certificate: TLS alert {alert} ({alert_name}){}", reason_suffix(.reason))]
    RefusedByPeer {
        /// The TLS alert number.
        alert: u8,
        /// Its name.
        alert_name: &'static str,
        /// The peer's reason, if it sent one.
        reason: String,
    },
    /// The connection was lost or closed (peer gone, idle timeout, application close).
    #[error("connection lost: {0}")]
    ConnectionLost(ConnectionError),
    /// The peer reset the stream.
    #[error("stream reset by the peer (code {0})")]
    Reset(VarInt),
    /// The peer stopped reading the stream.
    #[error("stream stopped by the peer (code {0})")]
    Stopped(VarInt),
    /// Another stream error.
    #[error("stream error: {0}")]
    Stream(String),
    /// A frame header announces a payload larger than allowed; nothing was allocated.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {got} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the frame needed.
        expected: usize,
    },
    /// [`write_frame`] was given bytes whose header length does not match.
    #[error("not a frame: {0}")]
    NotAFrame(String),
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl TransportError {
    /// Whether this is a certificate refusal (by us or by the peer).
    pub fn is_certificate_refusal(&self) -> bool {
        matches!(self, Self::PeerCertificate(_) | Self::RefusedByPeer { .. })
    }
}

fn alert_name(alert: u8) -> &'static str {
    match alert {
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        48 => "unknown_ca",
        49 => "access_denied",
        51 => "decrypt_error",
        80 => "internal_error",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => "other",
    }
}

/// The TLS alert carried by a QUIC CRYPTO_ERROR code (0x100..=0x1ff).
fn crypto_alert(code: u64) -> Option<u8> {
    (0x100..=0x1ff)
        .contains(&code)
        .then(|| u8::try_from(code - 0x100).ok())
        .flatten()
}

impl From<ConnectionError> for TransportError {
    fn from(e: ConnectionError) -> Self {
        match &e {
            // Our own TLS stack refused the handshake.
            ConnectionError::TransportError(te) if crypto_alert(u64::from(te.code)).is_some() => {
                Self::PeerCertificate(te.reason.clone())
            }
            // The peer closed the connection with a TLS alert.
            ConnectionError::ConnectionClosed(close) => {
                match crypto_alert(u64::from(close.error_code)) {
                    Some(alert) => Self::RefusedByPeer {
                        alert,
                        alert_name: alert_name(alert),
                        reason: String::from_utf8_lossy(&close.reason).into_owned(),
                    },
                    None => Self::ConnectionLost(e),
                }
            }
            _ => Self::ConnectionLost(e),
        }
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => c.into(),
            quinn::ReadError::Reset(code) => Self::Reset(code),
            e => Self::Stream(e.to_string()),
        }
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => c.into(),
            quinn::WriteError::Stopped(code) => Self::Stopped(code),
            e => Self::Stream(e.to_string()),
        }
    }
}

/// Bytes in flight a sender may have unacknowledged (about twice the bandwidth-delay
/// product of 1 Gbit/s × 20 ms).
pub const SEND_WINDOW: u32 = 8 << 20;
/// Largest UDP payload path MTU discovery may try.
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// The transport configuration of both ends: flow-control windows for bulk transfer at
/// 1 Gbit/s × 20 ms RTT and on loopback ([`STREAM_WINDOW`], [`CONNECTION_WINDOW`]),
/// keep-alive [`KEEP_ALIVE`], idle timeout [`IDLE_TIMEOUT`].
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    // Path MTU discovery up to the largest UDP payload: loopback and jumbo-frame networks
    // then carry a few large packets instead of many 1.4 KB ones (per-packet work, not
    // bandwidth, is what limits QUIC on a host); ordinary paths settle at their MTU.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        // A send window near the bandwidth-delay product, not the whole receive window:
        // writes then complete at the pace the peer acknowledges, so a pre-copy round's
        // duration measures the link, not a buffer.
        .send_window(u64::from(SEND_WINDOW))
        .max_concurrent_uni_streams(VarInt::from_u32(64))
        .max_concurrent_bidi_streams(VarInt::from_u32(16))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            u32::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX),
        ))));
    t
}

/// A server (destination) endpoint on `addr` presenting `id` and requiring client
/// certificates chaining to `ca_pem`. The endpoint can also [`connect`].
pub async fn listen(
    addr: SocketAddr,
    id: &Identity,
    ca_pem: &[u8],
) -> Result<Endpoint, TransportError> {
    let tls = tls::server_config(id, ca_pem)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    endpoint(addr, Some(cfg))
}

/// A client-only endpoint bound to `bind` (e.g. `0.0.0.0:0`).
pub fn client_endpoint(bind: SocketAddr) -> Result<Endpoint, TransportError> {
    endpoint(bind, None)
}

/// Socket buffers asked for on migration sockets: a burst of a fast sender must not overflow
/// the kernel's default (about 208 KB) while the receiving process is busy, because every
/// datagram lost there shrinks QUIC's congestion window.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// An endpoint on a socket with [`SOCKET_BUFFER`]-sized buffers (must run inside tokio).
fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TransportError> {
    let bind = |source| TransportError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    enlarge_buffers(&socket);
    Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind)
}

/// Raises the socket's receive and send buffers to [`SOCKET_BUFFER`]: past the sysctl limits
/// when privileged (SO_*BUFFORCE), else as far as they allow. Best effort: failure leaves the
/// defaults.
fn enlarge_buffers(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for option in [forced, plain] {
            // SAFETY: the fd is a live socket owned by `socket` for the duration of the call;
            // the option value points at a c_int on the stack with its exact length.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    std::ptr::addr_of!(size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

/// Connects from `local` (from [`listen`] or [`client_endpoint`]) to the agent `agent` at
/// `addr`, presenting `id` and trusting only `ca_pem`. The destination's certificate must
/// chain to the CA and name `agent`.
///
/// Errors: [`TransportError::Unreachable`] after [`CONNECT_TIMEOUT`] without a handshake;
/// [`TransportError::PeerCertificate`] if we refuse the destination's certificate;
/// [`TransportError::RefusedByPeer`] if the destination refuses ours. With TLS 1.3 the
/// client finishes its handshake before the server has checked the client certificate, so
/// that refusal may instead surface on the first stream operation or
/// [`Connection::closed`] (convert it with `TransportError::from`).
pub async fn connect(
    local: &Endpoint,
    addr: SocketAddr,
    agent: &str,
    id: &Identity,
    ca_pem: &[u8],
) -> Result<Connection, TransportError> {
    validate_agent_name(agent)?;
    let tls = tls::client_config(id, ca_pem)?;
    connect_with(local, addr, agent, tls, CONNECT_TIMEOUT).await
}

/// [`connect`] with a given rustls configuration and timeout.
pub(crate) async fn connect_with(
    local: &Endpoint,
    addr: SocketAddr,
    agent: &str,
    tls: rustls::ClientConfig,
    timeout: Duration,
) -> Result<Connection, TransportError> {
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    let connecting = local.connect_with(cfg, addr, agent)?;
    handshake(connecting, addr, timeout).await
}

async fn handshake(
    connecting: quinn::Connecting,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Connection, TransportError> {
    let unreachable = TransportError::Unreachable {
        addr,
        after: timeout,
    };
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) | Ok(Err(ConnectionError::TimedOut)) => Err(unreachable),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// Waits for the next incoming connection on `endpoint` (from [`listen`]) and its
/// handshake (at most [`CONNECT_TIMEOUT`]). Returns the connection and the name of the
/// agent that connected (from its verified certificate), an error for a refused or failed
/// handshake, or `None` once the endpoint is closed.
pub async fn accept(endpoint: &Endpoint) -> Option<Result<(Connection, String), TransportError>> {
    let incoming = endpoint.accept().await?;
    let addr = incoming.remote_address();
    Some(
        match incoming.accept() {
            Ok(connecting) => handshake(connecting, addr, CONNECT_TIMEOUT).await,
            Err(e) => Err(e.into()),
        }
        .and_then(|conn| match tls::peer_agent_name(&conn) {
            Some(name) => Ok((conn, name)),
            None => Err(TransportError::PeerCertificate(
                "the client certificate names no agent".into(),
            )),
        }),
    )
}

/// Reads one frame (header and payload) from `recv`. Returns `None` on a clean end of the
/// stream before a frame starts. A header announcing more than `max_payload` bytes is
/// refused before anything is allocated for the payload.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max_payload: usize,
) -> Result<Option<Vec<u8>>, TransportError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        match recv.read(&mut header[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => {
                return Err(TransportError::Truncated {
                    got,
                    expected: FRAME_HEADER_LEN,
                })
            }
        }
    }
    let len = payload_len(&header);
    if len > max_payload {
        return Err(TransportError::FrameTooLarge {
            len,
            max: max_payload,
        });
    }
    let mut frame = vec![0u8; FRAME_HEADER_LEN + len];
    frame[..FRAME_HEADER_LEN].copy_from_slice(&header);
    match recv.read_exact(&mut frame[FRAME_HEADER_LEN..]).await {
        Ok(()) => Ok(Some(frame)),
        Err(quinn::ReadExactError::FinishedEarly(n)) => Err(TransportError::Truncated {
            got: FRAME_HEADER_LEN + n,
            expected: FRAME_HEADER_LEN + len,
        }),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Writes one encoded frame to `send`. Checks only that the header's length field matches
/// the bytes given.
pub async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), TransportError> {
    let Some(header) = bytes.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(TransportError::NotAFrame(format!(
            "{} bytes, shorter than a header",
            bytes.len()
        )));
    };
    let len = payload_len(header);
    if len != bytes.len() - FRAME_HEADER_LEN {
        return Err(TransportError::NotAFrame(format!(
            "header announces {len} payload bytes, {} given",
            bytes.len() - FRAME_HEADER_LEN
        )));
    }
    send.write_all(bytes).await?;
    Ok(())
}

/// The payload length field: u32 little-endian at offset 8.
fn payload_len(header: &[u8; FRAME_HEADER_LEN]) -> usize {
    let field = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    usize::try_from(field).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, UdpSocket};
    use std::time::Instant;

    use super::*;
    use crate::certs::{generate_ca, issue_agent, Pem};

    const LOCALHOST: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    fn identity(ca: &Pem, agent: &str) -> Identity {
        let pem = issue_agent(ca, agent).unwrap();
        Identity::from_pem(pem.cert.as_bytes(), pem.key.as_bytes()).unwrap()
    }

    /// A frame with a 16-byte header (only the length field filled in) and `payload`.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; FRAME_HEADER_LEN];
        f[..4].copy_from_slice(b"NCMF");
        f[4] = 1;
        f[8..12].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    fn fill(buf: &mut [u8], seed: u64) {
        let mut x = seed | 1;
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }

    struct Pair {
        server: Endpoint,
        client: Endpoint,
        addr: SocketAddr,
    }

    async fn pair(server_id: &Identity, server_ca: &Pem) -> Pair {
        let server = listen(LOCALHOST, server_id, server_ca.cert.as_bytes())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let client = client_endpoint(LOCALHOST).unwrap();
        Pair {
            server,
            client,
            addr,
        }
    }

    #[tokio::test]
    async fn handshake_both_ways_and_bulk_transfer() {
        let ca = generate_ca("test").unwrap();
        let a = identity(&ca, "node-a");
        let b = identity(&ca, "node-b");
        let ca_pem = ca.cert.as_bytes();

        // node-a connects to node-b.
        let p = pair(&b, &ca).await;
        let server = tokio::spawn({
            let ep = p.server.clone();
            async move { accept(&ep).await.unwrap() }
        });
        let conn = connect(&p.client, p.addr, "node-b", &a, ca_pem)
            .await
            .unwrap();
        let (server_conn, who) = server.await.unwrap().unwrap();
        assert_eq!(who, "node-a");
        assert_eq!(tls::peer_agent_name(&conn).as_deref(), Some("node-b"));
        assert_eq!(
            conn.handshake_data()
                .unwrap()
                .downcast::<quinn::crypto::rustls::HandshakeData>()
                .unwrap()
                .protocol
                .as_deref(),
            Some(tls::ALPN)
        );

        // A control exchange both ways on a bidi stream.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &frame(b"hello")).await.unwrap();
        let (mut s_send, mut s_recv) = server_conn.accept_bi().await.unwrap();
        let got = read_frame(&mut s_recv, 1024).await.unwrap().unwrap();
        assert_eq!(&got[FRAME_HEADER_LEN..], b"hello");
        write_frame(&mut s_send, &frame(b"welcome")).await.unwrap();
        s_send.finish().unwrap();
        let got = read_frame(&mut recv, 1024).await.unwrap().unwrap();
        assert_eq!(&got[FRAME_HEADER_LEN..], b"welcome");
        assert!(read_frame(&mut recv, 1024).await.unwrap().is_none());

        // 64 MiB over 4 parallel uni streams, 1 MiB frames.
        const STREAMS: u64 = 4;
        const PER_STREAM: usize = 16 << 20;
        const CHUNK: usize = 1 << 20;
        let receiver = tokio::spawn({
            let conn = server_conn.clone();
            async move {
                let mut tasks = Vec::new();
                for _ in 0..STREAMS {
                    let mut recv = conn.accept_uni().await.unwrap();
                    tasks.push(tokio::spawn(async move {
                        let mut crc = 0u32;
                        let mut total = 0usize;
                        let first = read_frame(&mut recv, 8).await.unwrap().unwrap();
                        let stream_no = first[FRAME_HEADER_LEN];
                        while let Some(f) = read_frame(&mut recv, CHUNK).await.unwrap() {
                            crc = crc32c::crc32c_append(crc, &f[FRAME_HEADER_LEN..]);
                            total += f.len() - FRAME_HEADER_LEN;
                        }
                        (stream_no, total, crc)
                    }));
                }
                let mut out = Vec::new();
                for t in tasks {
                    out.push(t.await.unwrap());
                }
                out.sort_unstable();
                out
            }
        });
        let mut senders = Vec::new();
        for s in 0..STREAMS {
            let conn = conn.clone();
            senders.push(tokio::spawn(async move {
                let mut send = conn.open_uni().await.unwrap();
                write_frame(&mut send, &frame(&[u8::try_from(s).unwrap()]))
                    .await
                    .unwrap();
                let mut crc = 0u32;
                let mut payload = vec![0u8; CHUNK];
                for i in 0..PER_STREAM / CHUNK {
                    fill(&mut payload, s << 32 | i as u64);
                    crc = crc32c::crc32c_append(crc, &payload);
                    write_frame(&mut send, &frame(&payload)).await.unwrap();
                }
                send.finish().unwrap();
                send.stopped().await.unwrap();
                (u8::try_from(s).unwrap(), PER_STREAM, crc)
            }));
        }
        let mut sent = Vec::new();
        for t in senders {
            sent.push(t.await.unwrap());
        }
        sent.sort_unstable();
        assert_eq!(receiver.await.unwrap(), sent);
        conn.close(0u32.into(), b"done");
        p.server.wait_idle().await;

        // And the other way round: node-b connects to node-a.
        let p = pair(&a, &ca).await;
        let server = tokio::spawn({
            let ep = p.server.clone();
            async move { accept(&ep).await.unwrap() }
        });
        let conn = connect(&p.client, p.addr, "node-a", &b, ca_pem)
            .await
            .unwrap();
        let (_server_conn, who) = server.await.unwrap().unwrap();
        assert_eq!(who, "node-b");
        assert_eq!(tls::peer_agent_name(&conn).as_deref(), Some("node-a"));
    }

    fn assert_mentions(e: &TransportError, words: &[&str]) {
        let msg = e.to_string();
        assert!(
            e.is_certificate_refusal(),
            "not a certificate refusal: {msg}"
        );
        assert!(msg.contains("certificate"), "{msg}");
        assert!(
            words
                .iter()
                .any(|w| msg.to_lowercase().contains(&w.to_lowercase())),
            "{msg} mentions none of {words:?}"
        );
    }

    /// The client's view of a refusal by the server: at connect, or when the connection
    /// closes right after (TLS 1.3 finishes the client side first).
    async fn client_refused(r: Result<Connection, TransportError>) -> TransportError {
        match r {
            Err(e) => e,
            Ok(conn) => TransportError::from(conn.closed().await),
        }
    }

    #[tokio::test]
    async fn refuses_server_cert_from_another_ca() {
        let ca = generate_ca("test").unwrap();
        let a = identity(&ca, "node-a");
        // Another cluster's CA; with the same cluster name webpki finds a CA with the
        // issuer's name and refuses the signature instead.
        for (cluster, cause) in [("other", "UnknownIssuer"), ("test", "BadSignature")] {
            let other = generate_ca(cluster).unwrap();
            let b = identity(&other, "node-b");
            let p = pair(&b, &other).await;
            let server = tokio::spawn({
                let ep = p.server.clone();
                async move { accept(&ep).await.unwrap() }
            });
            let e = connect(&p.client, p.addr, "node-b", &a, ca.cert.as_bytes())
                .await
                .unwrap_err();
            assert!(matches!(e, TransportError::PeerCertificate(_)), "{e}");
            assert_mentions(&e, &[cause]);
            let e = server.await.unwrap().unwrap_err();
            assert!(matches!(e, TransportError::RefusedByPeer { .. }), "{e}");
            assert_mentions(&e, &["unknown_ca", "bad_certificate", "decrypt_error"]);
        }
    }

    #[tokio::test]
    async fn refuses_server_cert_naming_another_agent() {
        let ca = generate_ca("test").unwrap();
        let a = identity(&ca, "node-a");
        let c = identity(&ca, "node-c");
        let p = pair(&c, &ca).await;
        let server = tokio::spawn({
            let ep = p.server.clone();
            async move { accept(&ep).await.unwrap() }
        });
        let e = connect(&p.client, p.addr, "node-b", &a, ca.cert.as_bytes())
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::PeerCertificate(_)), "{e}");
        assert_mentions(&e, &["not valid for name", "NotValidForName"]);
        assert!(e.to_string().contains("node-b"), "{e}");
        let e = server.await.unwrap().unwrap_err();
        assert!(matches!(e, TransportError::RefusedByPeer { .. }), "{e}");
    }

    #[tokio::test]
    async fn refuses_client_cert_from_another_ca() {
        let ca = generate_ca("test").unwrap();
        let other = generate_ca("other").unwrap();
        let intruder = identity(&other, "node-a");
        let b = identity(&ca, "node-b");
        let p = pair(&b, &ca).await;
        let server = tokio::spawn({
            let ep = p.server.clone();
            async move { accept(&ep).await.unwrap() }
        });
        // The intruder trusts the real CA, so it accepts node-b; node-b refuses it.
        let r = connect(&p.client, p.addr, "node-b", &intruder, ca.cert.as_bytes()).await;
        let e = server.await.unwrap().unwrap_err();
        assert!(matches!(e, TransportError::PeerCertificate(_)), "{e}");
        assert_mentions(&e, &["UnknownIssuer", "unknown issuer"]);
        let e = client_refused(r).await;
        assert!(matches!(e, TransportError::RefusedByPeer { .. }), "{e}");
        assert_mentions(&e, &["unknown_ca", "bad_certificate"]);
    }

    #[tokio::test]
    async fn refuses_client_without_certificate() {
        let ca = generate_ca("test").unwrap();
        let b = identity(&ca, "node-b");
        let p = pair(&b, &ca).await;
        let server = tokio::spawn({
            let ep = p.server.clone();
            async move { accept(&ep).await.unwrap() }
        });
        let mut tls = tls::client_builder(ca.cert.as_bytes())
            .unwrap()
            .with_no_client_auth();
        tls.alpn_protocols = vec![tls::ALPN.to_vec()];
        let r = connect_with(&p.client, p.addr, "node-b", tls, CONNECT_TIMEOUT).await;
        let e = server.await.unwrap().unwrap_err();
        assert!(matches!(e, TransportError::PeerCertificate(_)), "{e}");
        assert_mentions(&e, &["NoCertificatesPresented", "no certificate"]);
        let e = client_refused(r).await;
        assert!(matches!(e, TransportError::RefusedByPeer { .. }), "{e}");
        assert_mentions(&e, &["certificate_required"]);
    }

    #[tokio::test]
    async fn unreachable_port_times_out() {
        let ca = generate_ca("test").unwrap();
        let a = identity(&ca, "node-a");
        // A port nobody listens on: bind one, then release it.
        let addr = UdpSocket::bind(LOCALHOST).unwrap().local_addr().unwrap();
        let client = client_endpoint(LOCALHOST).unwrap();
        let start = Instant::now();
        let e = connect(&client, addr, "node-b", &a, ca.cert.as_bytes())
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert!(matches!(e, TransportError::Unreachable { .. }), "{e}");
        assert!(!e.is_certificate_refusal());
        assert!(e.to_string().contains("unreachable"), "{e}");
        assert!(took < CONNECT_TIMEOUT + Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn read_frame_refuses_oversized_and_truncated() {
        let ca = generate_ca("test").unwrap();
        let a = identity(&ca, "node-a");
        let b = identity(&ca, "node-b");
        let p = pair(&b, &ca).await;
        let server = tokio::spawn({
            let ep = p.server.clone();
            async move { accept(&ep).await.unwrap().unwrap().0 }
        });
        let conn = connect(&p.client, p.addr, "node-b", &a, ca.cert.as_bytes())
            .await
            .unwrap();
        let server_conn = server.await.unwrap();

        let mut send = conn.open_uni().await.unwrap();
        let mut big = frame(&[]);
        big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        send.write_all(&big).await.unwrap();
        send.finish().unwrap();
        let mut recv = server_conn.accept_uni().await.unwrap();
        let e = read_frame(&mut recv, 16 << 20).await.unwrap_err();
        assert!(matches!(e, TransportError::FrameTooLarge { .. }), "{e}");

        let mut send = conn.open_uni().await.unwrap();
        send.write_all(&frame(b"abcdef")[..20]).await.unwrap();
        send.finish().unwrap();
        let mut recv = server_conn.accept_uni().await.unwrap();
        let e = read_frame(&mut recv, 1024).await.unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::Truncated {
                    got: 20,
                    expected: 22
                }
            ),
            "{e}"
        );

        let mut send = conn.open_uni().await.unwrap();
        let e = write_frame(&mut send, &frame(b"abc")[..18])
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::NotAFrame(_)), "{e}");
    }
}
