//! Raft between coordinators over tonic gRPC: the client side (openraft's `RaftNetwork`) and
//! the server side (`RaftTransport`), plus forwarding of client requests to the leader.
//!
//! Payloads are openraft's serde types as JSON inside a protobuf `bytes` field; both ends run
//! the same build. Peers dial each other over TLS with their own `coord-<id>` certificates
//! (see [`crate::tls`]); the server side admits only members' certificates ([`crate::auth`]).

use std::sync::Arc;
use std::time::Duration;

use novacron_proto::coordinator::v1::raft_transport_client::RaftTransportClient;
use novacron_proto::coordinator::v1::raft_transport_server::RaftTransport;
use novacron_proto::coordinator::v1::RaftPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::node::{ForwardReply, ForwardRequest, Node};
use crate::store::{NodeId, TypeConfig};

/// Creates one client per peer, dialing with this node's certificate.
pub struct Network {
    /// This node's TLS material.
    pub tls: crate::tls::NodeTls,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            client: self
                .tls
                .peer_channel(target, &node.addr, Duration::from_secs(10))
                .ok()
                .map(RaftTransportClient::new),
            addr: node.addr.clone(),
        }
    }
}

/// The connection to one peer.
pub struct Peer {
    target: NodeId,
    addr: String,
    client: Option<RaftTransportClient<Channel>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl Peer {
    async fn call<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "bad peer address {:?}",
                self.addr
            )))));
        };
        let mut request = Request::new(RaftPayload {
            json: serde_json::to_vec(req).expect("raft request serializes"),
        });
        request.set_timeout(ttl);
        let res = match which {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let payload = res
            .map_err(|s| {
                RPCError::Unreachable(Unreachable::new(&Msg(format!(
                    "{which} to node {} at {}: {}",
                    self.target,
                    self.addr,
                    s.message()
                ))))
            })?
            .into_inner();
        let decoded: Result<Resp, E> = serde_json::from_slice(&payload.json)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}

fn decode<T: DeserializeOwned>(p: RaftPayload) -> Result<T, Status> {
    serde_json::from_slice(&p.json)
        .map_err(|e| Status::invalid_argument(format!("raft payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Response<RaftPayload> {
    Response::new(RaftPayload {
        json: serde_json::to_vec(v).expect("raft reply serializes"),
    })
}

/// The server side of the transport.
pub struct TransportService {
    /// The local node.
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.into_inner())?;
        Ok(encode(&self.node.raft.append_entries(rpc).await))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.into_inner())?;
        Ok(encode(&self.node.raft.vote(rpc).await))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.into_inner())?;
        Ok(encode(&self.node.raft.install_snapshot(rpc).await))
    }

    async fn forward(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let fwd: ForwardRequest = decode(req.into_inner())?;
        let reply: ForwardReply = self.node.handle_forwarded(fwd).await;
        Ok(encode(&reply))
    }
}
