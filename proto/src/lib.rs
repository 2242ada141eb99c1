//! Protobuf definitions of NovaCron's gRPC APIs.
//!
//! The `.proto` sources live in `proto/proto/`; `build.rs` compiles them with `protox`, so no
//! system `protoc` is needed.

/// The node agent's API.
pub mod agent {
    /// Version 1 of `novacron.agent.v1`.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("novacron.agent.v1");
    }
}

/// The site coordinator's API and its coordinator-to-coordinator Raft transport.
pub mod coordinator {
    /// Version 1 of `novacron.coordinator.v1`.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("novacron.coordinator.v1");
    }
}
