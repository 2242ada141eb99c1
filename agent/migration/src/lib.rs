//! Live migration of NovaCron VMs: the wire format ([`frame`]), the pure protocol state
//! machines ([`protocol`]), and the QUIC transport with mutual TLS ([`tls`], [`certs`],
//! [`transport`]). See `docs/design/migration.md`.
#![deny(missing_docs)]

pub mod certs;
pub mod frame;
pub mod protocol;
pub mod tls;
pub mod transport;
