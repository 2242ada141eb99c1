//! The gRPC service: a thin adapter from `novacron.agent.v1.AgentService` to [`VmManager`].
//!
//! Manager errors become tonic statuses in exactly one place, [`status_of`].

use std::path::PathBuf;
use std::pin::Pin;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use novacron_proto::agent::v1 as pb;
use pb::agent_service_server::AgentService;

use crate::manager::{CreateParams, ManagerError, VmInfo, VmManager};
use crate::migration::{is_final_phase, MigrateParams, PeerFailure};

/// Maps a manager error to a gRPC status (the only place this happens).
pub fn status_of(e: ManagerError) -> Status {
    let msg = e.to_string();
    match e {
        ManagerError::InvalidArgument { .. } => Status::invalid_argument(msg),
        ManagerError::NotFound(_) => Status::not_found(msg),
        ManagerError::AlreadyExists(_) => Status::already_exists(msg),
        ManagerError::WrongState(_) | ManagerError::VmmRefused { .. } => {
            Status::failed_precondition(msg)
        }
        ManagerError::Peer { kind, .. } => match kind {
            PeerFailure::Refused | PeerFailure::Certificate => Status::failed_precondition(msg),
            PeerFailure::Unreachable => Status::unavailable(msg),
        },
        ManagerError::StartFailed { .. }
        | ManagerError::Vmm { .. }
        | ManagerError::UnexpectedAnswer { .. }
        | ManagerError::Io { .. } => Status::internal(msg),
    }
}

/// Converts a manager snapshot to the wire message.
pub fn vm_to_proto(v: VmInfo) -> pb::Vm {
    pb::Vm {
        id: v.id,
        name: v.name,
        state: v.state.as_str().to_string(),
        vcpus: v.vcpus,
        memory_mib: v.memory_mib,
        kernel: v.kernel.display().to_string(),
        cmdline: v.cmdline,
        pid: v.pid.unwrap_or(0),
        vcpu_tids: v.vcpu_tids,
        console_log: v.console_log.display().to_string(),
        created_at_unix: v.created_at_unix,
        exit_reason: v.exit_reason.unwrap_or_default(),
        exit_detail: v.exit_detail,
        entry: v.entry.to_string(),
        initramfs: v
            .initramfs
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        hugepages: v.hugepages,
    }
}

/// Converts a VMM's migration progress to the wire message.
pub fn progress_to_proto(p: novacron_vmm::migrate::Progress) -> pb::MigrationProgress {
    pb::MigrationProgress {
        done: is_final_phase(&p.phase),
        compression_ratio: p.compression_ratio(),
        phase: p.phase,
        round: p.round,
        pages_left: p.pages_left,
        dirty_rate: p.dirty_rate,
        throughput: p.throughput,
        predicted_downtime_ms: p.predicted_downtime_ms,
        throttle: u32::from(p.throttle),
        total_ms: p.total_ms,
        downtime_ms: p.downtime_ms,
        wire_bytes: p.wire_bytes,
        raw_bytes: p.raw_bytes,
        pages_per_round: p.pages_per_round,
        error: p.error.unwrap_or_default(),
    }
}

fn opt_path(s: String) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentServiceImpl {
    mgr: VmManager,
    telemetry: Option<std::sync::Arc<novacron_telemetry::Telemetry>>,
}

impl AgentServiceImpl {
    /// Wraps a manager.
    pub fn new(mgr: VmManager) -> Self {
        AgentServiceImpl {
            mgr,
            telemetry: None,
        }
    }

    /// Serves `GetVmMetrics` from this telemetry (without it the call is Unavailable).
    pub fn with_telemetry(
        mut self,
        telemetry: Option<std::sync::Arc<novacron_telemetry::Telemetry>>,
    ) -> Self {
        self.telemetry = telemetry;
        self
    }
}

type VmResult = Result<Response<pb::Vm>, Status>;

fn vm_reply(r: Result<VmInfo, ManagerError>) -> VmResult {
    r.map(|v| Response::new(vm_to_proto(v))).map_err(status_of)
}

#[tonic::async_trait]
impl AgentService for AgentServiceImpl {
    async fn create_vm(&self, req: Request<pb::CreateVmRequest>) -> VmResult {
        let r = req.into_inner();
        vm_reply(
            self.mgr
                .create(CreateParams {
                    name: r.name,
                    vcpus: r.vcpus,
                    memory_mib: r.memory_mib,
                    kernel: opt_path(r.kernel),
                    initramfs: opt_path(r.initramfs),
                    cmdline: r.cmdline,
                    entry: r.entry,
                    test_guest: r.test_guest,
                    hugepages: r.hugepages,
                    start: r.start,
                })
                .await,
        )
    }

    async fn list_vms(
        &self,
        _req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        Ok(Response::new(pb::ListVmsResponse {
            vms: self.mgr.list().into_iter().map(vm_to_proto).collect(),
        }))
    }

    async fn get_vm(&self, req: Request<pb::VmRef>) -> VmResult {
        vm_reply(self.mgr.get(&req.into_inner().id_or_name))
    }

    async fn start_vm(&self, req: Request<pb::VmRef>) -> VmResult {
        vm_reply(self.mgr.start(&req.into_inner().id_or_name).await)
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> VmResult {
        let r = req.into_inner();
        let timeout = (r.timeout_ms > 0).then_some(r.timeout_ms);
        vm_reply(self.mgr.stop(&r.id_or_name, r.force, timeout).await)
    }

    async fn pause_vm(&self, req: Request<pb::VmRef>) -> VmResult {
        vm_reply(self.mgr.pause(&req.into_inner().id_or_name).await)
    }

    async fn resume_vm(&self, req: Request<pb::VmRef>) -> VmResult {
        vm_reply(self.mgr.resume(&req.into_inner().id_or_name).await)
    }

    async fn delete_vm(
        &self,
        req: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let r = req.into_inner();
        let id = self
            .mgr
            .delete(&r.id_or_name, r.force)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::DeleteVmResponse { id }))
    }

    type StreamConsoleStream =
        Pin<Box<dyn Stream<Item = Result<pb::ConsoleChunk, Status>> + Send + 'static>>;

    async fn stream_console(
        &self,
        req: Request<pb::ConsoleRequest>,
    ) -> Result<Response<Self::StreamConsoleStream>, Status> {
        let r = req.into_inner();
        let rx = self
            .mgr
            .console(&r.id_or_name, r.follow, r.from_start)
            .map_err(status_of)?;
        let stream = ReceiverStream::new(rx).map(|chunk| {
            chunk
                .map(|data| pb::ConsoleChunk { data })
                .map_err(|e| Status::internal(format!("reading the console log: {e}")))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn guest_command(&self, req: Request<pb::GuestCommandRequest>) -> VmResult {
        let r = req.into_inner();
        vm_reply(self.mgr.guest_command(&r.id_or_name, r.cmd, r.arg).await)
    }

    async fn get_guest_status(
        &self,
        req: Request<pb::VmRef>,
    ) -> Result<Response<pb::GuestStatus>, Status> {
        let status = self
            .mgr
            .guest_status(&req.into_inner().id_or_name)
            .await
            .map_err(status_of)?;
        Ok(Response::new(match status {
            None => pb::GuestStatus::default(),
            Some(s) => pb::GuestStatus {
                registered: true,
                seq: s.seq,
                pages_written: s.pages_written,
                checksum: s.checksum,
                ws_pages: s.ws_pages,
                rate: s.rate,
                pattern: s.pattern,
                verify_count: s.verify_count,
                verify_bad_pages: s.verify_bad_pages,
                verify_checksum: s.verify_checksum,
                elapsed_ms: s.elapsed_ms,
                cmd_ack: s.cmd_ack,
            },
        }))
    }

    type MigrateVmStream =
        Pin<Box<dyn Stream<Item = Result<pb::MigrationProgress, Status>> + Send + 'static>>;

    async fn migrate_vm(
        &self,
        req: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<Self::MigrateVmStream>, Status> {
        let r = req.into_inner();
        let rx = self
            .mgr
            .migrate(MigrateParams {
                id_or_name: r.id_or_name,
                to_agent: r.to_agent,
                to_address: None,
                downtime_limit_ms: r.downtime_limit_ms,
                time_limit_s: r.time_limit_s,
                force_at_time_limit: r.force_at_time_limit,
                streams: r.streams,
                bandwidth_limit: r.bandwidth_limit,
                dirty_rate_limit: r.dirty_rate_limit,
            })
            .await
            .map_err(status_of)?;
        let stream = ReceiverStream::new(rx).map(|p| Ok(progress_to_proto(p)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_vm_metrics(
        &self,
        req: Request<pb::GetVmMetricsRequest>,
    ) -> Result<Response<pb::VmMetrics>, Status> {
        let req = req.into_inner();
        let vm = self.mgr.get(&req.id_or_name).map_err(status_of)?;
        let Some(t) = &self.telemetry else {
            return Err(Status::unavailable(
                "telemetry is disabled on this agent ([telemetry] enabled = false)",
            ));
        };
        Ok(Response::new(crate::telemetry::vm_metrics(
            t,
            &vm.id,
            &vm.name,
            req.last as usize,
        )))
    }

    async fn list_anomalies(
        &self,
        req: Request<pb::ListAnomaliesRequest>,
    ) -> Result<Response<pb::ListAnomaliesResponse>, Status> {
        let req = req.into_inner();
        if !(0.0..=1.0).contains(&req.min_score) {
            return Err(Status::invalid_argument(format!(
                "min_score {}: expected a score in [0, 1]",
                req.min_score
            )));
        }
        let scope = if req.id_or_name.is_empty() {
            None
        } else {
            Some(self.mgr.get(&req.id_or_name).map_err(status_of)?.id)
        };
        let Some(t) = &self.telemetry else {
            return Err(Status::unavailable(
                "telemetry is disabled on this agent ([telemetry] enabled = false)",
            ));
        };
        let acfg = &t.config().anomaly;
        if !acfg.enabled {
            return Err(Status::unavailable(
                "anomaly scoring is disabled on this agent ([telemetry.anomaly] enabled = false)",
            ));
        }
        let min = if req.min_score > 0.0 {
            req.min_score
        } else {
            acfg.threshold
        };
        let events = t
            .anomalies(scope.as_deref(), min)
            .into_iter()
            .map(|e| pb::AnomalyEvent {
                vm_id: e.scope,
                vm: e.name,
                series: e.series,
                score: e.score,
                start_unix_ms: e.start_ms,
                end_unix_ms: e.end_ms,
                records: e.records,
                open: e.open,
            })
            .collect();
        Ok(Response::new(pb::ListAnomaliesResponse { events }))
    }

    async fn cancel_migration(&self, req: Request<pb::VmRef>) -> VmResult {
        vm_reply(
            self.mgr
                .cancel_migration(&req.into_inner().id_or_name)
                .await,
        )
    }
}
