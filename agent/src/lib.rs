//! novacron-agent, the per-host daemon that runs one VMM process per VM.
//!
//! * [`config`]: the agent's TOML configuration.
//! * [`manager`]: the core — VMs, their VMM processes and their state on disk.
//! * [`service`]: the gRPC adapter (`novacron.agent.v1.AgentService`).
//! * [`migration`]: live migration between agents (the agent-to-agent requests, following
//!   a VMM's outgoing migration).
//! * [`daemon`]: serving the API on a unix socket.
//! * [`coordinator`]: the link to the site coordinator (register, heartbeat, commands).
//! * [`telemetry`]: the VMs handed to `novacron-telemetry` (eBPF probes, `/metrics`).
//! * [`testing`]: [`testing::TestAgent`], a real daemon in a temporary directory for tests.
#![deny(missing_docs)]

pub mod config;
pub mod coordinator;
pub mod daemon;
pub mod manager;
pub mod migration;
pub mod service;
pub mod telemetry;
pub mod testing;

pub use config::AgentConfig;
pub use manager::{CreateParams, ManagerError, VmInfo, VmManager, VmState};
pub use testing::TestAgent;
