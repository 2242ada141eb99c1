//! NovaCron's site coordinator: the replicated state of hosts, VMs and migrations (openraft on a
//! durable `redb` store), placement, and the public gRPC API.
//!
//! Modules, from the inside out: [`state`] (the pure state machine), [`scheduler`] (placement),
//! [`rebalancer`] (moves away from hot or anomalous hosts), [`store`] and [`wal`] (durable Raft
//! log + state machine), [`network`] (Raft over gRPC), [`node`] (leader forwarding, read
//! freshness, host liveness), [`api`] (the public gRPC adapter), [`agents`] (what each agent is
//! told, pure) and [`session`] (the agents' command streams and the drain loop), [`server`]
//! (wiring it all up), [`tls`] and [`auth`] (who may call what).
#![deny(missing_docs)]

pub mod agents;
pub mod api;
pub mod auth;
pub mod network;
pub mod node;
pub mod rebalancer;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
pub mod testing;
pub mod tls;
pub mod wal;
