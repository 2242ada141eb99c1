//! The public gRPC API (`novacron.coordinator.v1.Coordinator`): a thin adapter between protobuf
//! messages and the [`Node`] core. Errors map to gRPC status codes in one place ([`status`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use novacron_proto::coordinator::v1 as pb;
use novacron_proto::coordinator::v1::coordinator_server::Coordinator;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::agents::{AgentCommand, AgentVm};
use crate::auth::Caller;
use crate::node::{CoreError, Freshness, Heartbeat, Node};
use crate::state::{
    BootSpec, Command, Host, HostState, Migration, Phase, Reply, Resources, StateError, Vm,
    VmDesired,
};
use crate::store::NodeId;

/// Maps a core error to a gRPC status. The codes:
/// INVALID_ARGUMENT (bad input), NOT_FOUND, ALREADY_EXISTS, RESOURCE_EXHAUSTED (no host fits),
/// FAILED_PRECONDITION (state forbids it), UNAVAILABLE (no quorum / leader unreachable; retry),
/// DEADLINE_EXCEEDED (write not confirmed; outcome unknown), INTERNAL.
pub fn status(e: CoreError) -> Status {
    let msg = e.to_string();
    match e {
        CoreError::State(s) => match s {
            StateError::Invalid { .. } => Status::invalid_argument(msg),
            StateError::NotFound { .. } => Status::not_found(msg),
            StateError::AlreadyExists { .. } => Status::already_exists(msg),
            StateError::NoCapacity(_) => Status::resource_exhausted(msg),
            StateError::FailedPrecondition(_) => Status::failed_precondition(msg),
        },
        CoreError::NoQuorum(_) | CoreError::LeaderUnreachable { .. } => Status::unavailable(msg),
        CoreError::Uncertain(_) => Status::deadline_exceeded(msg),
        CoreError::Membership(_) => Status::failed_precondition(msg),
        CoreError::Raft(_) => Status::internal(msg),
    }
}

fn read_meta(f: Freshness) -> pb::ReadMeta {
    pb::ReadMeta {
        applied_index: f.applied_index,
        served_by_leader: f.served_by_leader,
        leader_id: f.leader_id,
        node_id: f.node_id,
        linearizable: f.linearizable,
    }
}

fn write_meta(index: u64, leader: NodeId) -> pb::WriteMeta {
    pb::WriteMeta {
        log_index: index,
        leader_id: leader,
    }
}

fn res_pb(r: Resources) -> pb::Resources {
    pb::Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
    }
}

fn res_from(r: Option<pb::Resources>) -> Resources {
    let r = r.unwrap_or_default();
    Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
    }
}

fn boot_pb(b: &BootSpec) -> pb::BootSpec {
    pb::BootSpec {
        test_guest: b.test_guest,
        kernel: b.kernel.clone(),
        initramfs: b.initramfs.clone(),
        cmdline: b.cmdline.clone(),
        entry: b.entry.clone(),
    }
}

fn boot_from(b: Option<pb::BootSpec>) -> BootSpec {
    let b = b.unwrap_or_default();
    BootSpec {
        test_guest: b.test_guest,
        kernel: b.kernel,
        initramfs: b.initramfs,
        cmdline: b.cmdline,
        entry: b.entry,
    }
}

fn agent_vms_from(vms: Vec<pb::AgentVm>) -> Vec<AgentVm> {
    vms.into_iter()
        .map(|v| AgentVm {
            name: v.name,
            state: v.state,
            resources: Resources {
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
            },
            boot: boot_from(v.boot),
            migrating: v.migrating,
        })
        .collect()
}

fn command_pb(c: AgentCommand) -> pb::HostCommand {
    use pb::host_command::Command as C;
    let name = |name| pb::VmNameCommand { name };
    pb::HostCommand {
        command: Some(match c {
            AgentCommand::Create {
                name,
                resources,
                boot,
                start,
            } => C::Create(pb::CreateVmCommand {
                name,
                resources: Some(res_pb(resources)),
                boot: Some(boot_pb(&boot)),
                start,
            }),
            AgentCommand::Start(n) => C::Start(name(n)),
            AgentCommand::Stop(n) => C::Stop(name(n)),
            AgentCommand::Delete(n) => C::Delete(name(n)),
            AgentCommand::Migrate {
                name,
                migration_id,
                target_host,
                target_address,
            } => C::Migrate(pb::MigrateVmCommand {
                name,
                migration_id,
                target_host,
                target_address,
            }),
        }),
    }
}

fn host_state_pb(s: HostState) -> i32 {
    (match s {
        HostState::Up => pb::HostState::Up,
        HostState::Draining => pb::HostState::Draining,
        HostState::Down => pb::HostState::Down,
    }) as i32
}

fn phase_pb(p: Phase) -> i32 {
    (match p {
        Phase::Pending => pb::MigrationPhase::Pending,
        Phase::Running => pb::MigrationPhase::Running,
        Phase::Succeeded => pb::MigrationPhase::Succeeded,
        Phase::Failed => pb::MigrationPhase::Failed,
        Phase::Cancelled => pb::MigrationPhase::Cancelled,
    }) as i32
}

fn host_pb(node: &Node, h: &Host) -> pb::Host {
    let live = node.liveness(&h.id);
    let last = live
        .as_ref()
        .and_then(|l| l.last.clone())
        .unwrap_or_default();
    pb::Host {
        id: h.id.clone(),
        address: h.address.clone(),
        capacity: Some(res_pb(h.capacity)),
        allocated: Some(res_pb(h.allocated)),
        labels: h.labels.clone().into_iter().collect(),
        state: host_state_pb(h.state),
        vm_ids: h.vm_ids.clone(),
        last_heartbeat_age_ms: live
            .map(|l| l.last_seen.elapsed().as_millis() as u64)
            .unwrap_or(0),
        cpu_utilisation: last.cpu_utilisation,
        memory_used_mib: last.memory_used_mib,
        draining: h.draining,
    }
}

fn vm_pb(v: &Vm) -> pb::Vm {
    pb::Vm {
        id: v.id.clone(),
        name: v.name.clone(),
        resources: Some(res_pb(v.resources)),
        labels: v.labels.clone().into_iter().collect(),
        anti_affinity_group: v.anti_affinity_group.clone(),
        desired: (match v.desired {
            VmDesired::Running => pb::VmDesiredState::Running,
            VmDesired::Stopped => pb::VmDesiredState::Stopped,
        }) as i32,
        host_id: v.host_id.clone(),
        created_index: v.created_index,
        migration_id: v.migration_id.clone(),
        boot: Some(boot_pb(&v.boot)),
    }
}

fn op_pb(m: &Migration) -> pb::Operation {
    pb::Operation {
        name: format!("migrations/{}", m.id),
        metadata: Some(pb::MigrationMetadata {
            vm_id: m.vm_id.clone(),
            source_host: m.source_host.clone(),
            target_host: m.target_host.clone(),
            phase: phase_pb(m.phase),
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
            requested_by: m.requested_by.clone(),
            created_index: m.created_index,
            updated_index: m.updated_index,
        }),
        done: m.phase.done(),
        error: match m.phase {
            Phase::Failed => m.error.clone(),
            Phase::Cancelled => "cancelled".into(),
            _ => String::new(),
        },
        read: None,
        write: None,
    }
}

fn op_id(name: &str) -> Result<String, Status> {
    let id = name.strip_prefix("migrations/").unwrap_or(name);
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "invalid name: expected \"migrations/<id>\" or \"<id>\"",
        ));
    }
    Ok(id.to_string())
}

fn not_found(kind: &str, id: &str) -> Status {
    status(CoreError::State(StateError::NotFound {
        kind: kind.into(),
        id: id.into(),
    }))
}

/// The public service.
pub struct Api {
    /// The core.
    pub node: Arc<Node>,
}

impl Api {
    async fn write(&self, cmd: Command) -> Result<(Reply, pb::WriteMeta), Status> {
        let (r, i, l) = self.node.write(cmd).await.map_err(status)?;
        Ok((r, write_meta(i, l)))
    }

    async fn write_vm(&self, cmd: Command) -> Result<Response<pb::VmReply>, Status> {
        let (r, w) = self.write(cmd).await?;
        let Reply::Vm(v) = r else {
            return Err(Status::internal("unexpected reply kind"));
        };
        Ok(Response::new(pb::VmReply {
            vm: Some(vm_pb(&v)),
            read: None,
            write: Some(w),
        }))
    }

    async fn write_host(&self, cmd: Command) -> Result<Response<pb::HostReply>, Status> {
        let (r, w) = self.write(cmd).await?;
        let Reply::Host(h) = r else {
            return Err(Status::internal("unexpected reply kind"));
        };
        Ok(Response::new(pb::HostReply {
            host: Some(host_pb(&self.node, &h)),
            read: None,
            write: Some(w),
        }))
    }

    async fn write_op(&self, cmd: Command) -> Result<Response<pb::Operation>, Status> {
        let (r, w) = self.write(cmd).await?;
        let Reply::Migration(m) = r else {
            return Err(Status::internal("unexpected reply kind"));
        };
        let mut op = op_pb(&m);
        op.write = Some(w);
        Ok(Response::new(op))
    }

    async fn get_op(&self, id: &str, consistent: bool) -> Result<pb::Operation, Status> {
        let (m, f) = self
            .node
            .read(consistent, |a| a.state.migrations.get(id).cloned())
            .await
            .map_err(status)?;
        let m = m.ok_or_else(|| not_found("migration", id))?;
        let mut op = op_pb(&m);
        op.read = Some(read_meta(f));
        Ok(op)
    }

    fn status_reply(&self) -> pb::ClusterStatusReply {
        let m = self.node.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: Vec<NodeId> = mem.voter_ids().collect();
        pb::ClusterStatusReply {
            node_id: self.node.opts.id,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            members: mem
                .nodes()
                .map(|(id, n)| pb::Member {
                    id: *id,
                    address: n.addr.clone(),
                    voter: voters.contains(id),
                })
                .collect(),
            state: format!("{:?}", m.state),
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;
type VmChangeStream = Pin<Box<dyn Stream<Item = Result<pb::VmChange, Status>> + Send>>;
type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::HostCommand, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Api {
    async fn register_host(
        &self,
        req: Request<pb::RegisterHostRequest>,
    ) -> Result<Response<pb::HostReply>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        caller.may_speak_for(&r.id, "RegisterHost")?;
        let reply = self
            .write_host(Command::RegisterHost {
                id: r.id.clone(),
                address: r.address,
                capacity: res_from(r.capacity),
                labels: r.labels.into_iter().collect(),
            })
            .await?;
        // The inventory is the first heartbeat: reconciliation starts from it.
        self.node
            .heartbeat(Heartbeat {
                host_id: r.id,
                vms: agent_vms_from(r.vms),
                ..Default::default()
            })
            .await
            .map_err(status)?;
        Ok(reply)
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        caller.may_speak_for(&r.host_id, "Heartbeat")?;
        if !(0.0..=1.0).contains(&r.cpu_utilisation) {
            return Err(Status::invalid_argument(format!(
                "invalid cpu_utilisation {}: expected a fraction in 0..=1",
                r.cpu_utilisation
            )));
        }
        let (state, leader) = self
            .node
            .heartbeat(Heartbeat {
                host_id: r.host_id,
                cpu_utilisation: r.cpu_utilisation,
                memory_used_mib: r.memory_used_mib,
                running_vms: r.running_vms,
                anomalies: r
                    .anomalies
                    .into_iter()
                    .map(|a| crate::node::VmAnomaly {
                        vm_id: a.vm_id,
                        series: a.series,
                        score: a.score,
                        start_unix_ms: a.start_unix_ms,
                        end_unix_ms: a.end_unix_ms,
                    })
                    .collect(),
                vms: agent_vms_from(r.vms),
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatReply {
            leader_id: leader,
            interval_ms: self.node.opts.heartbeat_interval.as_millis() as u64,
            state: host_state_pb(state),
        }))
    }

    async fn drain_host(
        &self,
        req: Request<pb::HostRef>,
    ) -> Result<Response<pb::HostReply>, Status> {
        self.write_host(Command::DrainHost {
            id: req.into_inner().id,
        })
        .await
    }

    async fn get_host(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::HostReply>, Status> {
        let r = req.into_inner();
        let (h, f) = self
            .node
            .read(r.consistent, |a| a.state.hosts.get(&r.id).cloned())
            .await
            .map_err(status)?;
        let h = h.ok_or_else(|| not_found("host", &r.id))?;
        Ok(Response::new(pb::HostReply {
            host: Some(host_pb(&self.node, &h)),
            read: Some(read_meta(f)),
            write: None,
        }))
    }

    async fn list_hosts(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListHostsReply>, Status> {
        let (hs, f) = self
            .node
            .read(req.into_inner().consistent, |a| {
                a.state.hosts.values().cloned().collect::<Vec<_>>()
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListHostsReply {
            hosts: hs.iter().map(|h| host_pb(&self.node, h)).collect(),
            read: Some(read_meta(f)),
        }))
    }

    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::VmReply>, Status> {
        let r = req.into_inner();
        self.write_vm(Command::CreateVm {
            name: r.name,
            resources: res_from(r.resources),
            labels: r.labels.into_iter().collect(),
            host_selector: r.host_selector.into_iter().collect::<BTreeMap<_, _>>(),
            anti_affinity_group: r.anti_affinity_group,
            start: r.start,
            policy: self.node.opts.policy,
            loads: Default::default(), // the leader fills in what it scores with
            boot: boot_from(r.boot),
        })
        .await
    }

    async fn get_vm(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::VmReply>, Status> {
        let r = req.into_inner();
        let (v, f) = self
            .node
            .read(r.consistent, |a| {
                a.state
                    .vms
                    .get(&r.id)
                    .or_else(|| {
                        a.state
                            .vm_names
                            .get(&r.id)
                            .and_then(|id| a.state.vms.get(id))
                    })
                    .cloned()
            })
            .await
            .map_err(status)?;
        let v = v.ok_or_else(|| not_found("vm", &r.id))?;
        Ok(Response::new(pb::VmReply {
            vm: Some(vm_pb(&v)),
            read: Some(read_meta(f)),
            write: None,
        }))
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListVmsReply>, Status> {
        let (vms, f) = self
            .node
            .read(req.into_inner().consistent, |a| {
                a.state.vms.values().map(vm_pb).collect::<Vec<_>>()
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListVmsReply {
            vms,
            read: Some(read_meta(f)),
        }))
    }

    async fn start_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmReply>, Status> {
        self.write_vm(Command::SetVmDesired {
            id: req.into_inner().id,
            desired: VmDesired::Running,
        })
        .await
    }

    async fn stop_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmReply>, Status> {
        self.write_vm(Command::SetVmDesired {
            id: req.into_inner().id,
            desired: VmDesired::Stopped,
        })
        .await
    }

    async fn delete_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::VmReply>, Status> {
        self.write_vm(Command::DeleteVm {
            id: req.into_inner().id,
        })
        .await
    }

    async fn start_migration(
        &self,
        req: Request<pb::StartMigrationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.into_inner();
        self.write_op(Command::StartMigration {
            vm_id: r.vm_id,
            target_host: r.target_host,
            requested_by: "user".into(),
            policy: self.node.opts.policy,
            loads: Default::default(), // the leader fills in what it scores with
        })
        .await
    }

    async fn get_migration(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.into_inner();
        let id = op_id(&r.id)?;
        Ok(Response::new(self.get_op(&id, r.consistent).await?))
    }

    async fn list_migrations(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListMigrationsReply>, Status> {
        let (ops, f) = self
            .node
            .read(req.into_inner().consistent, |a| {
                a.state.migrations.values().map(op_pb).collect::<Vec<_>>()
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListMigrationsReply {
            operations: ops,
            read: Some(read_meta(f)),
        }))
    }

    async fn cancel_migration(
        &self,
        req: Request<pb::OperationRef>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = op_id(&req.into_inner().name)?;
        self.write_op(Command::CancelMigration { id }).await
    }

    async fn wait_migration(
        &self,
        req: Request<pb::WaitRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = req.into_inner();
        let id = op_id(&r.name)?;
        let timeout = Duration::from_millis(r.timeout_ms.clamp(1, 600_000));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.node.sm.applied_tx.subscribe();
        loop {
            let op = self.get_op(&id, false).await?;
            if op.done {
                return Ok(Response::new(op));
            }
            // Wake on every applied entry; return the current state on timeout (like
            // google.longrunning WaitOperation).
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Ok(Response::new(op));
            }
        }
    }

    async fn report_migration(
        &self,
        req: Request<pb::ReportMigrationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = op_id(&r.name)?;
        if !caller.is_admin() {
            // An agent reports only migrations its host takes part in.
            let (m, _) = self
                .node
                .read(false, |a| a.state.migrations.get(&id).cloned())
                .await
                .map_err(status)?;
            let m = m.ok_or_else(|| not_found("migration", &id))?;
            if caller
                .may_speak_for(&m.source_host, "ReportMigration")
                .is_err()
            {
                caller.may_speak_for(&m.target_host, "ReportMigration")?;
            }
        }
        let phase = match pb::MigrationPhase::try_from(r.phase) {
            Ok(pb::MigrationPhase::Running) => Phase::Running,
            Ok(pb::MigrationPhase::Succeeded) => Phase::Succeeded,
            Ok(pb::MigrationPhase::Failed) => Phase::Failed,
            Ok(pb::MigrationPhase::Cancelled) => Phase::Cancelled,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "invalid phase {}: expected RUNNING, SUCCEEDED, FAILED or CANCELLED",
                    r.phase
                )))
            }
        };
        self.write_op(Command::ReportMigration {
            id,
            phase,
            bytes_done: r.bytes_done,
            bytes_total: r.bytes_total,
            error: r.error,
        })
        .await
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let from = req.into_inner().from_seq;
        // Subscribe before copying the backlog so that nothing falls between the two.
        let mut live = self.node.sm.events.subscribe();
        let backlog: Vec<_> = {
            let g = self.node.sm.shared.read().expect("state lock");
            if let Some(first) = g.recent.front() {
                if from != 0 && from < first.seq {
                    return Err(Status::out_of_range(format!(
                        "from_seq {from} is older than the oldest event kept ({})",
                        first.seq
                    )));
                }
            }
            g.recent.iter().filter(|e| e.seq >= from).cloned().collect()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut last = 0;
            for e in backlog {
                last = e.seq;
                if tx.send(Ok(event_pb(e))).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(e) if e.seq <= last || e.seq < from => continue,
                    Ok(e) => {
                        last = e.seq;
                        if tx.send(Ok(event_pb(e))).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell {n} events behind; resume with from_seq {}",
                                last + 1
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type WatchVmsStream = VmChangeStream;

    async fn watch_vms(
        &self,
        req: Request<pb::WatchVmsRequest>,
    ) -> Result<Response<VmChangeStream>, Status> {
        let want = req.into_inner().vm;
        // Subscribe before the snapshot so that no change falls between the two.
        let mut live = self.node.sm.events.subscribe();
        let snapshot: BTreeMap<String, Vm> = {
            let g = self.node.sm.shared.read().expect("state lock");
            if !want.is_empty()
                && !g.state.vms.contains_key(&want)
                && !g.state.vm_names.contains_key(&want)
            {
                return Err(not_found("vm", &want));
            }
            g.state
                .vms
                .values()
                .filter(|v| want.is_empty() || v.id == want || v.name == want)
                .map(|v| (v.id.clone(), v.clone()))
                .collect()
        };
        let matches = move |v: &Vm| want.is_empty() || v.id == want || v.name == want;
        let node = self.node.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let change = |kind: pb::VmChangeKind, vm: Option<&Vm>, seq| pb::VmChange {
                kind: kind as i32,
                vm: vm.map(vm_pb),
                event_seq: seq,
            };
            for v in snapshot.values() {
                if tx
                    .send(Ok(change(pb::VmChangeKind::Existing, Some(v), 0)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if tx
                .send(Ok(change(pb::VmChangeKind::SnapshotEnd, None, 0)))
                .await
                .is_err()
            {
                return;
            }
            let mut sent = snapshot;
            loop {
                let e = match live.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell {n} changes behind; watch again for a new snapshot"
                            ))))
                            .await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                };
                // The VM an event is about: its own id, or the VM a migration moves.
                let (current, vm_id) = {
                    let g = node.sm.shared.read().expect("state lock");
                    let vm_id = if e.kind.starts_with("vm.") {
                        Some(e.object_id.clone())
                    } else if e.kind.starts_with("migration.") {
                        g.state
                            .migrations
                            .get(&e.object_id)
                            .map(|m| m.vm_id.clone())
                    } else {
                        None
                    };
                    let Some(vm_id) = vm_id else { continue };
                    (g.state.vms.get(&vm_id).cloned(), vm_id)
                };
                let out = match (current, sent.get(&vm_id)) {
                    (Some(v), _) if !matches(&v) => continue,
                    (Some(v), Some(old)) if *old == v => continue,
                    (Some(v), old) => {
                        let kind = if old.is_some() {
                            pb::VmChangeKind::Updated
                        } else {
                            pb::VmChangeKind::Created
                        };
                        let c = change(kind, Some(&v), e.seq);
                        sent.insert(vm_id, v);
                        c
                    }
                    (None, Some(_)) => {
                        let old = sent.remove(&vm_id).expect("present");
                        change(pb::VmChangeKind::Deleted, Some(&old), e.seq)
                    }
                    (None, None) => continue,
                };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type CommandsStream = CommandStream;

    async fn commands(&self, req: Request<pb::HostRef>) -> Result<Response<CommandStream>, Status> {
        let caller = Caller::of(&req);
        let host = req.into_inner().id;
        caller.may_speak_for(&host, "Commands")?;
        if !self.node.is_leader() {
            return Err(Status::unavailable(match self.node.leader() {
                Some((id, addr)) => format!("not the leader; leader {id} at {addr}"),
                None => "not the leader; no leader known".to_string(),
            }));
        }
        let known = {
            let g = self.node.sm.shared.read().expect("state lock");
            g.state.hosts.contains_key(&host)
        };
        if !known {
            return Err(not_found("host", &host));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<AgentCommand>(64);
        tokio::spawn(crate::session::drive(self.node.clone(), host, tx));
        let stream =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |c| {
                Ok(command_pb(c))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        Ok(Response::new(self.status_reply()))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let r = req.into_inner();
        if r.id == 0 || r.address.is_empty() {
            return Err(Status::invalid_argument(
                "invalid member: expected a non-zero id and its host:port",
            ));
        }
        self.node
            .add_member(r.id, r.address)
            .await
            .map_err(status)?;
        Ok(Response::new(self.status_reply()))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.node
            .remove_member(req.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(self.status_reply()))
    }

    async fn list_proposals(
        &self,
        _req: Request<pb::ListProposalsRequest>,
    ) -> Result<Response<pb::ListProposalsReply>, Status> {
        let (board, leader) = self.node.proposals().await.map_err(status)?;
        Ok(Response::new(pb::ListProposalsReply {
            mode: board.mode.to_string(),
            proposals: board
                .proposals
                .into_iter()
                .map(|p| pb::Proposal {
                    vm_id: p.vm_id,
                    vm_name: p.vm_name,
                    source_host: p.source_host,
                    target_host: p.target_host,
                    reason: p.reason,
                    source_score: p.source_score,
                    target_score: p.target_score,
                    migration_id: p.migration_id,
                })
                .collect(),
            leader_id: leader,
        }))
    }
}

fn event_pb(e: crate::state::Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        log_index: e.log_index,
        kind: e.kind,
        object_id: e.object_id,
        message: e.message,
    }
}
