//! Feeds the agent's VMs to `novacron-telemetry` (which does the collecting and serving).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use novacron_telemetry::{MigrationSample, VmSource, VmTarget};
use novacron_vmm::control::{Request, Response};

use crate::manager::{control_call, VmManager, VmState};

/// How long a sample waits for a VMM's Info (its exit counter) before leaving it out.
const INFO_TIMEOUT: Duration = Duration::from_millis(500);

/// The VM manager as the telemetry sampler's source of VMs.
#[derive(Debug, Clone)]
pub struct ManagerSource(pub VmManager);

impl VmSource for ManagerSource {
    fn targets(&self) -> Pin<Box<dyn Future<Output = Vec<VmTarget>> + Send + '_>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for vm in self.0.list() {
                let running = matches!(vm.state, VmState::Running | VmState::Paused);
                let (mut vmm_exits, mut migration) = (None, None);
                if running && vm.pid.is_some() {
                    let control = self
                        .0
                        .config()
                        .state_dir
                        .join("vms")
                        .join(&vm.id)
                        .join("control.sock");
                    if let Ok(Response::Info(info)) =
                        control_call(control.clone(), Request::Info, INFO_TIMEOUT).await
                    {
                        if info.id == vm.id {
                            vmm_exits = Some(info.exits);
                            if let Ok(Response::Migration { progress: Some(p) }) =
                                control_call(control, Request::MigrationStatus, INFO_TIMEOUT).await
                            {
                                migration = Some(MigrationSample {
                                    phase: p.phase,
                                    round: p.round,
                                    pages_left: p.pages_left,
                                    dirty_pages_per_second: p.dirty_rate,
                                    throughput_bytes_per_second: p.throughput,
                                    wire_bytes: p.wire_bytes,
                                    raw_bytes: p.raw_bytes,
                                    total_seconds: p.total_ms / 1e3,
                                    downtime_seconds: p.downtime_ms.map(|d| d / 1e3),
                                });
                            }
                        }
                    }
                }
                out.push(VmTarget {
                    state: vm.state.as_str(),
                    pid: if vm.state.is_active() { vm.pid } else { None },
                    vcpu_tids: if vm.state.is_active() {
                        vm.vcpu_tids
                    } else {
                        Vec::new()
                    },
                    id: vm.id,
                    name: vm.name,
                    vmm_exits,
                    migration,
                });
            }
            out
        })
    }
}

/// The `GetVmMetrics` answer for VM `id` from the latest sample and the series windows
/// (`last` samples per series, 0 = all).
pub fn vm_metrics(
    t: &novacron_telemetry::Telemetry,
    id: &str,
    name: &str,
    last: usize,
) -> novacron_proto::agent::v1::VmMetrics {
    use novacron_proto::agent::v1 as pb;
    let snap = t.snapshot();
    let sample = snap.vms.iter().find(|v| v.target.id == id);
    let series = t
        .series()
        .series_of(id)
        .into_iter()
        .map(|name| {
            let mut w = t.series().window(id, &name);
            if last > 0 && w.len() > last {
                w.drain(..w.len() - last);
            }
            pb::MetricSeries {
                name,
                ts_unix_ms: w.iter().map(|p| p.0).collect(),
                values: w.iter().map(|p| p.1).collect(),
            }
        })
        .collect();
    pb::VmMetrics {
        vm_id: id.to_string(),
        name: name.to_string(),
        ebpf_available: snap.ebpf_available,
        exit_source: snap
            .exit_source
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        ts_unix_ms: snap.ts_ms,
        values: sample
            .map(|s| s.values().into_iter().collect())
            .unwrap_or_default(),
        series,
        top_preemptors: sample
            .map(|s| {
                s.top_preemptors
                    .iter()
                    .map(|p| pb::Preemptor {
                        pid: p.tgid,
                        comm: p.comm.clone(),
                        cgroup_id: p.cgroup_id,
                        count: p.count,
                        class: p.class.as_str().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
