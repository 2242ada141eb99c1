//! The replicated state of a site — hosts, VMs, migrations — and the commands that change it.
//!
//! A pure, deterministic state machine: no clocks, no I/O, no randomness. Every coordinator applies
//! the same committed commands in the same order and reaches the same state. Identifiers of new
//! records derive from the Raft log index of the command that created them. A command that is
//! invalid for the current state returns an error and changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scheduler::{self, Loads, Policy};

/// CPU and memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl Resources {
    fn add(&mut self, o: Resources) {
        self.vcpus += o.vcpus;
        self.memory_mib += o.memory_mib;
    }
    fn sub(&mut self, o: Resources) {
        self.vcpus = self.vcpus.saturating_sub(o.vcpus);
        self.memory_mib = self.memory_mib.saturating_sub(o.memory_mib);
    }
}

/// A host's replicated state. Liveness (last heartbeat, utilisation) is not here: it stays in
/// memory on the leader; only its transitions (up/down) are replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostState {
    /// Heartbeating; takes new VMs.
    Up,
    /// Heartbeating; takes no new VMs, its VMs are to move away.
    Draining,
    /// Missed heartbeats. Its VM records are kept.
    Down,
}

/// A hypervisor host.
///
/// Liveness and drain are separate facts: `draining` is set only by an operator's drain and is
/// never undone by liveness; `state` is the combined view (`Down` when silent, else `Draining`
/// when draining, else `Up`), so a drained host that goes down and comes back is draining again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// Unique id (the agent's name).
    pub id: String,
    /// Where its agent listens.
    pub address: String,
    /// What it offers.
    pub capacity: Resources,
    /// What its VMs (and incoming migrations) reserve.
    pub allocated: Resources,
    /// Labels for selectors.
    pub labels: BTreeMap<String, String>,
    /// Up, draining or down (the combined view of liveness and `draining`).
    pub state: HostState,
    /// VMs placed here (sorted).
    pub vm_ids: Vec<String>,
    /// An operator drained this host; liveness transitions never clear it.
    #[serde(default)]
    pub draining: bool,
}

impl Host {
    /// The state a live (heartbeating) host has: `Draining` once drained, else `Up`.
    fn live_state(&self) -> HostState {
        if self.draining {
            HostState::Draining
        } else {
            HostState::Up
        }
    }
}

/// What an agent boots for a VM (carried to the agent in its create command).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// The agent's built-in test guest.
    pub test_guest: bool,
    /// Absolute kernel path on the host ("" with the test guest).
    pub kernel: String,
    /// Absolute initramfs path ("" = none).
    pub initramfs: String,
    /// Kernel command line (the test guest's workload settings).
    pub cmdline: String,
    /// Entry protocol ("" = auto).
    pub entry: String,
}

/// What should happen to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmDesired {
    /// It should run.
    Running,
    /// It should not run.
    Stopped,
}

/// A VM record: what should run where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    /// `vm-<log index>`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Reserved on its host.
    pub resources: Resources,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Anti-affinity group ("" = none).
    pub anti_affinity_group: String,
    /// Running or stopped.
    pub desired: VmDesired,
    /// Where it is placed.
    pub host_id: String,
    /// Log index of its creation.
    pub created_index: u64,
    /// The migration moving it ("" = none).
    pub migration_id: String,
    /// What the agent boots.
    #[serde(default)]
    pub boot: BootSpec,
    /// Log index of its last placement (creation, adoption, move or migration).
    #[serde(default)]
    pub placed_index: u64,
}

/// Phase of a migration operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Recorded; no agent has started it yet.
    Pending,
    /// Copying.
    Running,
    /// The VM runs on the target.
    Succeeded,
    /// The VM stays on the source.
    Failed,
    /// Cancelled before it finished; the VM stays on the source.
    Cancelled,
}

impl Phase {
    /// Whether the operation is over.
    pub fn done(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

/// A migration operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    /// `mig-<log index>`.
    pub id: String,
    /// The VM moved.
    pub vm_id: String,
    /// From.
    pub source_host: String,
    /// To (its resources are reserved there while the migration runs).
    pub target_host: String,
    /// Where it is.
    pub phase: Phase,
    /// Progress.
    pub bytes_done: u64,
    /// Progress total (0 = unknown).
    pub bytes_total: u64,
    /// "user" or "rebalancer".
    pub requested_by: String,
    /// Why it failed.
    pub error: String,
    /// Log index of its creation.
    pub created_index: u64,
    /// Log index of its last change.
    pub updated_index: u64,
}

/// A change to the replicated state. Serialized into the Raft log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Add a host or update its address, capacity and labels (a re-registering host is Up).
    RegisterHost {
        /// Host id.
        id: String,
        /// Agent address.
        address: String,
        /// Capacity.
        capacity: Resources,
        /// Labels.
        labels: BTreeMap<String, String>,
    },
    /// Liveness transition decided by the leader (Up <-> Down).
    SetHostState {
        /// Host id.
        id: String,
        /// New state.
        state: HostState,
    },
    /// Take no new VMs; VMs are to move away.
    DrainHost {
        /// Host id.
        id: String,
    },
    /// Place and record a VM.
    CreateVm {
        /// Unique name.
        name: String,
        /// Resources.
        resources: Resources,
        /// Labels.
        labels: BTreeMap<String, String>,
        /// Host labels required.
        host_selector: BTreeMap<String, String>,
        /// Anti-affinity group.
        anti_affinity_group: String,
        /// Desired running.
        start: bool,
        /// Placement policy of the proposing leader.
        policy: Policy,
        /// The load inputs the leader scored with (filled in by the leader when it proposes).
        #[serde(default)]
        loads: Loads,
        /// What the agent boots.
        #[serde(default)]
        boot: BootSpec,
    },
    /// Set what should happen to a VM.
    SetVmDesired {
        /// VM id.
        id: String,
        /// Desired state.
        desired: VmDesired,
    },
    /// Remove a VM record (it must be stopped and not migrating).
    DeleteVm {
        /// VM id.
        id: String,
    },
    /// Start a migration operation.
    StartMigration {
        /// VM id.
        vm_id: String,
        /// Target ("" = scheduler picks).
        target_host: String,
        /// "user" or "rebalancer".
        requested_by: String,
        /// Placement policy when the scheduler picks.
        policy: Policy,
        /// The load inputs the leader scored with when the scheduler picks.
        #[serde(default)]
        loads: Loads,
    },
    /// Progress from an agent.
    ReportMigration {
        /// Migration id.
        id: String,
        /// New phase.
        phase: Phase,
        /// Bytes copied.
        bytes_done: u64,
        /// Bytes to copy.
        bytes_total: u64,
        /// Error text when failed.
        error: String,
    },
    /// Cancel a migration that is not done.
    CancelMigration {
        /// Migration id.
        id: String,
    },
    /// Raise an event and change nothing else (e.g. a rebalancer proposal), so that it is in
    /// every replica's event sequence.
    Notice {
        /// Event kind, `rebalancer.` followed by [a-z_.].
        kind: String,
        /// The record it is about.
        object_id: String,
        /// Human text.
        message: String,
    },
    /// Move a stopped VM's record to another host (placed by the scheduler); the agents then
    /// create it there and delete it here.
    MoveVm {
        /// VM id.
        vm_id: String,
        /// Placement policy.
        policy: Policy,
        /// The load inputs the leader scored with (filled in by the leader when it proposes).
        #[serde(default)]
        loads: Loads,
    },
    /// An agent runs a VM the record puts elsewhere or nowhere: the agent is the truth for what
    /// runs, so the record follows it (created when unknown, moved when placed elsewhere).
    AdoptVm {
        /// The host that runs it.
        host_id: String,
        /// The VM's name.
        name: String,
        /// What it uses there.
        resources: Resources,
        /// What it boots.
        boot: BootSpec,
    },
}

/// What an applied command returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// A host after the change.
    Host(Host),
    /// A VM after the change (or as it was, when deleted).
    Vm(Vm),
    /// A migration after the change.
    Migration(Migration),
    /// A membership change or blank entry.
    Empty,
}

/// Why a command was refused. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StateError {
    /// A field is malformed.
    #[error("invalid {field}: {expected}")]
    Invalid {
        /// Which input.
        field: String,
        /// What was expected.
        expected: String,
    },
    /// No such record.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// Record kind.
        kind: String,
        /// Its id.
        id: String,
    },
    /// A record with this name exists.
    #[error("{kind} {name:?} already exists as {id}")]
    AlreadyExists {
        /// Record kind.
        kind: String,
        /// Requested name.
        name: String,
        /// The existing record.
        id: String,
    },
    /// No host passes the filters.
    #[error("no host can take the VM: {0}")]
    NoCapacity(String),
    /// The record is in a state that does not allow this.
    #[error("{0}")]
    FailedPrecondition(String),
}

/// A notification of an applied change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event sequence (consecutive, from 1).
    pub seq: u64,
    /// Log index of the command.
    pub log_index: u64,
    /// e.g. "host.registered", "vm.created", "migration.succeeded".
    pub kind: String,
    /// The record.
    pub object_id: String,
    /// Human text.
    pub message: String,
}

/// Records touched by a command, to persist.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// hosts table.
    Host(String),
    /// vms table.
    Vm(String),
    /// migrations table.
    Migration(String),
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Hosts by id.
    pub hosts: BTreeMap<String, Host>,
    /// VMs by id.
    pub vms: BTreeMap<String, Vm>,
    /// Migrations by id.
    pub migrations: BTreeMap<String, Migration>,
    /// Last event sequence number.
    pub event_seq: u64,
    /// VM name → id: derived from `vms`, not stored; [`ClusterState::rebuild_index`] after loading.
    #[serde(skip)]
    pub vm_names: BTreeMap<String, String>,
}

/// Checks fields that need no state. Runs before proposing and again when applying.
pub fn validate(cmd: &Command) -> Result<(), StateError> {
    let invalid = |field: &str, expected: &str| {
        Err(StateError::Invalid {
            field: field.into(),
            expected: expected.into(),
        })
    };
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match cmd {
        Command::RegisterHost {
            id,
            address,
            capacity,
            ..
        } => {
            if !name_ok(id) {
                return invalid("host id", "1-128 characters of [A-Za-z0-9._-]");
            }
            if address.is_empty() {
                return invalid("address", "the agent's host:port");
            }
            if capacity.vcpus == 0 || capacity.memory_mib == 0 {
                return invalid("capacity", "at least 1 vCPU and 1 MiB of memory");
            }
        }
        Command::CreateVm {
            name, resources, ..
        } => {
            if !name_ok(name) {
                return invalid("vm name", "1-128 characters of [A-Za-z0-9._-]");
            }
            if resources.vcpus == 0 || resources.memory_mib == 0 {
                return invalid("resources", "at least 1 vCPU and 1 MiB of memory");
            }
        }
        Command::Notice { kind, .. }
            if !kind.strip_prefix("rebalancer.").is_some_and(|k| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || matches!(c, '_' | '.'))
            }) =>
        {
            return invalid("notice kind", "\"rebalancer.\" followed by [a-z_.]");
        }
        Command::AdoptVm { name, .. } if !name_ok(name) => {
            return invalid("vm name", "1-128 characters of [A-Za-z0-9._-]");
        }
        Command::ReportMigration { phase, .. } if *phase == Phase::Pending => {
            return invalid("phase", "RUNNING, SUCCEEDED, FAILED or CANCELLED");
        }
        _ => {}
    }
    Ok(())
}

impl ClusterState {
    /// Rebuilds the derived name index after loading `vms`.
    ///
    /// Also rebuilds every host's `vm_ids` from the VMs' `host_id` (the store keeps host rows
    /// without that list; a host's `vm_ids` are exactly the VMs whose `host_id` it is).
    pub fn rebuild_index(&mut self) {
        self.vm_names = self
            .vms
            .values()
            .map(|v| (v.name.clone(), v.id.clone()))
            .collect();
        for h in self.hosts.values_mut() {
            h.vm_ids.clear();
        }
        for v in self.vms.values() {
            if let Some(h) = self.hosts.get_mut(&v.host_id) {
                h.vm_ids.push(v.id.clone());
            }
        }
        for h in self.hosts.values_mut() {
            h.vm_ids.sort();
        }
    }

    /// Applies `cmd` committed at `index`. On error nothing changed. Returns the reply, the
    /// records touched and the events raised.
    pub fn apply(
        &mut self,
        index: u64,
        cmd: &Command,
    ) -> Result<(Reply, Vec<Key>, Vec<Event>), StateError> {
        self.apply_at(index, 0, cmd)
    }

    /// Applies `cmd`, the `sub`-th command of the batch committed at `index` (one log entry
    /// carries a batch of client writes). New records are named `vm-<index>` / `mig-<index>`
    /// for the first command of an entry and `vm-<index>-<sub>` for later ones, so ids stay
    /// unique and deterministic. On error nothing changed.
    pub fn apply_at(
        &mut self,
        index: u64,
        sub: usize,
        cmd: &Command,
    ) -> Result<(Reply, Vec<Key>, Vec<Event>), StateError> {
        validate(cmd)?;
        let mut keys = Vec::new();
        let mut events = Vec::new();
        let reply = self.apply_inner(index, sub, cmd, &mut keys, &mut events)?;
        for e in &mut events {
            self.event_seq += 1;
            e.seq = self.event_seq;
            e.log_index = index;
        }
        Ok((reply, keys, events))
    }

    fn host(&self, id: &str) -> Result<&Host, StateError> {
        self.hosts.get(id).ok_or_else(|| StateError::NotFound {
            kind: "host".into(),
            id: id.into(),
        })
    }

    fn vm(&self, id: &str) -> Result<&Vm, StateError> {
        self.vms.get(id).ok_or_else(|| StateError::NotFound {
            kind: "vm".into(),
            id: id.into(),
        })
    }

    fn migration(&self, id: &str) -> Result<&Migration, StateError> {
        self.migrations.get(id).ok_or_else(|| StateError::NotFound {
            kind: "migration".into(),
            id: id.into(),
        })
    }

    fn apply_inner(
        &mut self,
        index: u64,
        sub: usize,
        cmd: &Command,
        keys: &mut Vec<Key>,
        events: &mut Vec<Event>,
    ) -> Result<Reply, StateError> {
        let ev = |kind: &str, id: &str, msg: String| Event {
            seq: 0,
            log_index: 0,
            kind: kind.into(),
            object_id: id.into(),
            message: msg,
        };
        match cmd {
            Command::RegisterHost {
                id,
                address,
                capacity,
                labels,
            } => {
                let h = self.hosts.entry(id.clone()).or_insert_with(|| Host {
                    id: id.clone(),
                    address: String::new(),
                    capacity: *capacity,
                    allocated: Resources::default(),
                    labels: BTreeMap::new(),
                    state: HostState::Up,
                    vm_ids: vec![],
                    draining: false,
                });
                h.address = address.clone();
                h.capacity = *capacity;
                h.labels = labels.clone();
                if h.state == HostState::Down {
                    h.state = h.live_state();
                }
                keys.push(Key::Host(id.clone()));
                events.push(ev(
                    "host.registered",
                    id,
                    format!(
                        "{id} at {address}: {} vCPU, {} MiB",
                        capacity.vcpus, capacity.memory_mib
                    ),
                ));
                Ok(Reply::Host(h.clone()))
            }
            Command::SetHostState { id, state } => {
                let cur = self.host(id)?.state;
                let h = self.hosts.get_mut(id).expect("checked");
                // Liveness only says down or alive; whether an alive host is draining is
                // `draining`'s business, which liveness never touches.
                let new = match state {
                    HostState::Down => HostState::Down,
                    HostState::Up | HostState::Draining => h.live_state(),
                };
                if new != cur {
                    h.state = new;
                    keys.push(Key::Host(id.clone()));
                    events.push(ev(
                        match new {
                            HostState::Up => "host.up",
                            HostState::Down => "host.down",
                            HostState::Draining => "host.draining",
                        },
                        id,
                        format!("{id}: {cur:?} -> {new:?}"),
                    ));
                }
                Ok(Reply::Host(h.clone()))
            }
            Command::DrainHost { id } => {
                self.host(id)?;
                let h = self.hosts.get_mut(id).expect("checked");
                if !h.draining {
                    h.draining = true;
                    if h.state != HostState::Down {
                        h.state = HostState::Draining;
                    }
                    keys.push(Key::Host(id.clone()));
                    events.push(ev(
                        "host.draining",
                        id,
                        format!("{id} draining, {} VMs to move", h.vm_ids.len()),
                    ));
                }
                Ok(Reply::Host(h.clone()))
            }
            Command::CreateVm {
                name,
                resources,
                labels,
                host_selector,
                anti_affinity_group,
                start,
                policy,
                loads,
                boot,
            } => {
                if let Some(id) = self.vm_names.get(name) {
                    return Err(StateError::AlreadyExists {
                        kind: "vm".into(),
                        name: name.clone(),
                        id: id.clone(),
                    });
                }
                let req = scheduler::Request {
                    resources: *resources,
                    selector: host_selector,
                    anti_affinity_group,
                    exclude: None,
                };
                let host_id = scheduler::place(&self.hosts, &self.vms, &req, *policy, loads)
                    .map_err(|r| {
                        StateError::NoCapacity(format!("{} hosts: {r}", self.hosts.len()))
                    })?;
                let id = record_id("vm", index, sub);
                let vm = Vm {
                    id: id.clone(),
                    name: name.clone(),
                    resources: *resources,
                    labels: labels.clone(),
                    anti_affinity_group: anti_affinity_group.clone(),
                    desired: if *start {
                        VmDesired::Running
                    } else {
                        VmDesired::Stopped
                    },
                    host_id: host_id.clone(),
                    created_index: index,
                    migration_id: String::new(),
                    boot: boot.clone(),
                    placed_index: index,
                };
                let h = self
                    .hosts
                    .get_mut(&host_id)
                    .expect("placed on a known host");
                h.allocated.add(*resources);
                insert_sorted(&mut h.vm_ids, &id);
                self.vms.insert(id.clone(), vm.clone());
                self.vm_names.insert(name.clone(), id.clone());
                keys.push(Key::Vm(id.clone()));
                keys.push(Key::Host(host_id.clone()));
                events.push(ev("vm.created", &id, format!("{name} placed on {host_id}")));
                Ok(Reply::Vm(vm))
            }
            Command::SetVmDesired { id, desired } => {
                self.vm(id)?;
                let vm = self.vms.get_mut(id).expect("checked");
                if vm.desired != *desired {
                    vm.desired = *desired;
                    keys.push(Key::Vm(id.clone()));
                    events.push(ev(
                        match desired {
                            VmDesired::Running => "vm.started",
                            VmDesired::Stopped => "vm.stopped",
                        },
                        id,
                        format!("{} desired {desired:?}", vm.name),
                    ));
                }
                Ok(Reply::Vm(vm.clone()))
            }
            Command::DeleteVm { id } => {
                let vm = self.vm(id)?.clone();
                if vm.desired != VmDesired::Stopped {
                    return Err(StateError::FailedPrecondition(format!(
                        "vm {id} is desired running: stop it before deleting"
                    )));
                }
                if !vm.migration_id.is_empty() {
                    return Err(StateError::FailedPrecondition(format!(
                        "vm {id} is migrating ({}): cancel or wait first",
                        vm.migration_id
                    )));
                }
                if let Some(h) = self.hosts.get_mut(&vm.host_id) {
                    h.allocated.sub(vm.resources);
                    h.vm_ids.retain(|v| v != id);
                    keys.push(Key::Host(vm.host_id.clone()));
                }
                self.vms.remove(id);
                self.vm_names.remove(&vm.name);
                keys.push(Key::Vm(id.clone()));
                events.push(ev("vm.deleted", id, format!("{} deleted", vm.name)));
                Ok(Reply::Vm(vm))
            }
            Command::StartMigration {
                vm_id,
                target_host,
                requested_by,
                policy,
                loads,
            } => {
                let vm = self.vm(vm_id)?.clone();
                if !vm.migration_id.is_empty() {
                    return Err(StateError::FailedPrecondition(format!(
                        "vm {vm_id} is already migrating ({})",
                        vm.migration_id
                    )));
                }
                let target = if target_host.is_empty() {
                    let req = scheduler::Request {
                        resources: vm.resources,
                        selector: &BTreeMap::new(),
                        anti_affinity_group: &vm.anti_affinity_group,
                        exclude: Some(&vm.host_id),
                    };
                    scheduler::place(&self.hosts, &self.vms, &req, *policy, loads)
                        .map_err(|r| StateError::NoCapacity(format!("migration target: {r}")))?
                } else {
                    let t = self.host(target_host)?;
                    if *target_host == vm.host_id {
                        return Err(StateError::Invalid {
                            field: "target_host".into(),
                            expected: format!("a host other than the VM's host {}", vm.host_id),
                        });
                    }
                    if t.state != HostState::Up {
                        return Err(StateError::FailedPrecondition(format!(
                            "target host {target_host} is {:?}",
                            t.state
                        )));
                    }
                    if t.allocated.vcpus + vm.resources.vcpus > t.capacity.vcpus
                        || t.allocated.memory_mib + vm.resources.memory_mib > t.capacity.memory_mib
                    {
                        return Err(StateError::NoCapacity(format!(
                            "target host {target_host} lacks room for {} vCPU / {} MiB",
                            vm.resources.vcpus, vm.resources.memory_mib
                        )));
                    }
                    target_host.clone()
                };
                let id = record_id("mig", index, sub);
                let m = Migration {
                    id: id.clone(),
                    vm_id: vm_id.clone(),
                    source_host: vm.host_id.clone(),
                    target_host: target.clone(),
                    phase: Phase::Pending,
                    bytes_done: 0,
                    bytes_total: 0,
                    requested_by: requested_by.clone(),
                    error: String::new(),
                    created_index: index,
                    updated_index: index,
                };
                // Reserve the target while the migration runs.
                self.hosts
                    .get_mut(&target)
                    .expect("known target")
                    .allocated
                    .add(vm.resources);
                self.vms.get_mut(vm_id).expect("checked").migration_id = id.clone();
                self.migrations.insert(id.clone(), m.clone());
                keys.extend([
                    Key::Migration(id.clone()),
                    Key::Vm(vm_id.clone()),
                    Key::Host(target.clone()),
                ]);
                events.push(ev(
                    "migration.started",
                    &id,
                    format!("{vm_id}: {} -> {target} ({requested_by})", vm.host_id),
                ));
                Ok(Reply::Migration(m))
            }
            Command::ReportMigration {
                id,
                phase,
                bytes_done,
                bytes_total,
                error,
            } => {
                let m = self.migration(id)?.clone();
                if m.phase.done() {
                    return Err(StateError::FailedPrecondition(format!(
                        "migration {id} is already {:?}",
                        m.phase
                    )));
                }
                self.finish_or_update(index, &m, *phase, *bytes_done, *bytes_total, error, keys);
                let m = self.migrations[id].clone();
                if phase.done() {
                    events.push(ev(
                        &format!("migration.{}", format!("{phase:?}").to_lowercase()),
                        id,
                        format!(
                            "{}: {} -> {} {phase:?}{}",
                            m.vm_id,
                            m.source_host,
                            m.target_host,
                            if error.is_empty() {
                                String::new()
                            } else {
                                format!(": {error}")
                            }
                        ),
                    ));
                }
                Ok(Reply::Migration(m))
            }
            Command::CancelMigration { id } => {
                let m = self.migration(id)?.clone();
                if m.phase.done() {
                    return Err(StateError::FailedPrecondition(format!(
                        "migration {id} is already {:?}",
                        m.phase
                    )));
                }
                self.finish_or_update(
                    index,
                    &m,
                    Phase::Cancelled,
                    m.bytes_done,
                    m.bytes_total,
                    "",
                    keys,
                );
                events.push(ev(
                    "migration.cancelled",
                    id,
                    format!("{}: stays on {}", m.vm_id, m.source_host),
                ));
                Ok(Reply::Migration(self.migrations[id].clone()))
            }
            Command::Notice {
                kind,
                object_id,
                message,
            } => {
                events.push(ev(kind, object_id, message.clone()));
                Ok(Reply::Empty)
            }
            Command::MoveVm {
                vm_id,
                policy,
                loads,
            } => {
                let vm = self.vm(vm_id)?.clone();
                if vm.desired != VmDesired::Stopped || !vm.migration_id.is_empty() {
                    return Err(StateError::FailedPrecondition(format!(
                        "vm {vm_id} is desired {:?}{}: only a stopped VM moves without a migration",
                        vm.desired,
                        if vm.migration_id.is_empty() {
                            ""
                        } else {
                            " and migrating"
                        }
                    )));
                }
                let req = scheduler::Request {
                    resources: vm.resources,
                    selector: &BTreeMap::new(),
                    anti_affinity_group: &vm.anti_affinity_group,
                    exclude: Some(&vm.host_id),
                };
                let target = scheduler::place(&self.hosts, &self.vms, &req, *policy, loads)
                    .map_err(|r| StateError::NoCapacity(format!("move target: {r}")))?;
                if let Some(h) = self.hosts.get_mut(&vm.host_id) {
                    h.allocated.sub(vm.resources);
                    h.vm_ids.retain(|v| v != vm_id);
                    keys.push(Key::Host(vm.host_id.clone()));
                }
                let h = self.hosts.get_mut(&target).expect("placed on a known host");
                h.allocated.add(vm.resources);
                insert_sorted(&mut h.vm_ids, vm_id);
                let v = self.vms.get_mut(vm_id).expect("checked");
                v.host_id = target.clone();
                v.placed_index = index;
                keys.extend([Key::Vm(vm_id.clone()), Key::Host(target.clone())]);
                events.push(ev(
                    "vm.moved",
                    vm_id,
                    format!("{} (stopped): {} -> {target}", vm.name, vm.host_id),
                ));
                Ok(Reply::Vm(v.clone()))
            }
            Command::AdoptVm {
                host_id,
                name,
                resources,
                boot,
            } => {
                self.host(host_id)?;
                let Some(id) = self.vm_names.get(name).cloned() else {
                    let id = format!("vm-{index}");
                    let vm = Vm {
                        id: id.clone(),
                        name: name.clone(),
                        resources: *resources,
                        labels: BTreeMap::new(),
                        anti_affinity_group: String::new(),
                        desired: VmDesired::Running,
                        host_id: host_id.clone(),
                        created_index: index,
                        migration_id: String::new(),
                        boot: boot.clone(),
                        placed_index: index,
                    };
                    let h = self.hosts.get_mut(host_id).expect("checked");
                    h.allocated.add(*resources);
                    insert_sorted(&mut h.vm_ids, &id);
                    self.vms.insert(id.clone(), vm.clone());
                    self.vm_names.insert(name.clone(), id.clone());
                    keys.extend([Key::Vm(id.clone()), Key::Host(host_id.clone())]);
                    events.push(ev(
                        "vm.adopted",
                        &id,
                        format!("{name} runs on {host_id} and had no record: recorded there"),
                    ));
                    return Ok(Reply::Vm(vm));
                };
                let vm = self.vms[&id].clone();
                if !vm.migration_id.is_empty() {
                    return Err(StateError::FailedPrecondition(format!(
                        "vm {id} is migrating ({}): its outcome decides where it runs",
                        vm.migration_id
                    )));
                }
                if vm.host_id == *host_id {
                    return Ok(Reply::Vm(vm));
                }
                if let Some(h) = self.hosts.get_mut(&vm.host_id) {
                    h.allocated.sub(vm.resources);
                    h.vm_ids.retain(|v| v != &id);
                    keys.push(Key::Host(vm.host_id.clone()));
                }
                let h = self.hosts.get_mut(host_id).expect("checked");
                h.allocated.add(vm.resources);
                insert_sorted(&mut h.vm_ids, &id);
                let v = self.vms.get_mut(&id).expect("present");
                v.host_id = host_id.clone();
                v.placed_index = index;
                keys.extend([Key::Vm(id.clone()), Key::Host(host_id.clone())]);
                events.push(ev(
                    "vm.adopted",
                    &id,
                    format!(
                        "{name} runs on {host_id}, recorded on {}: record moved",
                        vm.host_id
                    ),
                ));
                Ok(Reply::Vm(v.clone()))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_or_update(
        &mut self,
        index: u64,
        m: &Migration,
        phase: Phase,
        bytes_done: u64,
        bytes_total: u64,
        error: &str,
        keys: &mut Vec<Key>,
    ) {
        let res = self.vms.get(&m.vm_id).map(|v| v.resources);
        if phase.done() {
            if let Some(res) = res {
                let (release, keep) = if phase == Phase::Succeeded {
                    (&m.source_host, &m.target_host)
                } else {
                    (&m.target_host, &m.source_host)
                };
                if let Some(h) = self.hosts.get_mut(release) {
                    h.allocated.sub(res);
                    h.vm_ids.retain(|v| v != &m.vm_id);
                }
                if let Some(h) = self.hosts.get_mut(keep) {
                    insert_sorted(&mut h.vm_ids, &m.vm_id);
                }
                let vm = self.vms.get_mut(&m.vm_id).expect("present");
                vm.host_id = keep.clone();
                vm.placed_index = index;
                vm.migration_id.clear();
                keys.extend([
                    Key::Host(m.source_host.clone()),
                    Key::Host(m.target_host.clone()),
                    Key::Vm(m.vm_id.clone()),
                ]);
            }
        }
        let mm = self.migrations.get_mut(&m.id).expect("present");
        mm.phase = phase;
        mm.bytes_done = bytes_done;
        mm.bytes_total = bytes_total;
        mm.error = error.to_string();
        mm.updated_index = index;
        keys.push(Key::Migration(m.id.clone()));
    }
}

/// `PREFIX-INDEX` for the first command of a log entry, `PREFIX-INDEX-SUB` for later ones.
fn record_id(prefix: &str, index: u64, sub: usize) -> String {
    if sub == 0 {
        format!("{prefix}-{index}")
    } else {
        format!("{prefix}-{index}-{sub}")
    }
}

fn insert_sorted(v: &mut Vec<String>, id: &str) {
    if let Err(pos) = v.binary_search_by(|x| x.as_str().cmp(id)) {
        v.insert(pos, id.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str, vcpus: u32, mem: u64) -> Command {
        Command::RegisterHost {
            id: id.into(),
            address: format!("{id}:7000"),
            capacity: Resources {
                vcpus,
                memory_mib: mem,
            },
            labels: BTreeMap::new(),
        }
    }

    fn create(name: &str, vcpus: u32, mem: u64) -> Command {
        Command::CreateVm {
            name: name.into(),
            resources: Resources {
                vcpus,
                memory_mib: mem,
            },
            labels: BTreeMap::new(),
            host_selector: BTreeMap::new(),
            anti_affinity_group: String::new(),
            start: true,
            policy: Policy::BinPack,
            loads: Loads::default(),
            boot: BootSpec::default(),
        }
    }

    #[test]
    fn adopt_records_unknown_and_moves_misplaced() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("h1", 4, 4096)).unwrap();
        s.apply(2, &reg("h2", 4, 4096)).unwrap();
        s.apply(3, &create("a", 1, 512)).unwrap();
        let adopt = |host: &str, name: &str| Command::AdoptVm {
            host_id: host.into(),
            name: name.into(),
            resources: Resources {
                vcpus: 1,
                memory_mib: 256,
            },
            boot: BootSpec::default(),
        };
        let (Reply::Vm(v), _, ev) = s.apply(4, &adopt("h2", "stray")).unwrap() else {
            panic!()
        };
        assert_eq!((v.id.as_str(), v.host_id.as_str()), ("vm-4", "h2"));
        assert_eq!(v.desired, VmDesired::Running);
        assert_eq!(ev[0].kind, "vm.adopted");
        let placed = s.vms["vm-3"].host_id.clone();
        let other = if placed == "h1" { "h2" } else { "h1" };
        s.apply(5, &adopt(other, "a")).unwrap();
        assert_eq!(s.vms["vm-3"].host_id, other);
        assert!(
            s.hosts[&placed].vm_ids.is_empty()
                || !s.hosts[&placed].vm_ids.contains(&"vm-3".to_string())
        );
        assert_eq!(s.hosts[&placed].allocated.vcpus, 0);
        let before = s.clone();
        assert!(s.apply(6, &adopt("nope", "a")).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn create_places_reserves_and_names_are_unique() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("h1", 4, 4096)).unwrap();
        let (r, keys, ev) = s.apply(2, &create("a", 2, 1024)).unwrap();
        let Reply::Vm(vm) = r else { panic!() };
        assert_eq!((vm.id.as_str(), vm.host_id.as_str()), ("vm-2", "h1"));
        assert_eq!(s.hosts["h1"].allocated.vcpus, 2);
        assert!(keys.contains(&Key::Host("h1".into())));
        assert_eq!((ev[0].seq, ev[0].kind.as_str()), (2, "vm.created"));
        let before = s.clone();
        let err = s.apply(3, &create("a", 1, 1)).unwrap_err();
        assert!(matches!(err, StateError::AlreadyExists { .. }));
        let err = s.apply(3, &create("b", 3, 1)).unwrap_err();
        assert!(err.to_string().contains("1 without capacity"), "{err}");
        assert_eq!(s, before, "refused commands change nothing");
    }

    #[test]
    fn bad_input_is_named() {
        let mut s = ClusterState::default();
        let err = s.apply(1, &reg("bad id!", 4, 4096)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid host id: 1-128 characters of [A-Za-z0-9._-]"
        );
        let err = s.apply(1, &create("x", 0, 1)).unwrap_err();
        assert!(err.to_string().starts_with("invalid resources"));
        assert_eq!(s, ClusterState::default());
    }

    #[test]
    fn delete_requires_stopped_and_releases() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("h1", 4, 4096)).unwrap();
        s.apply(2, &create("a", 2, 1024)).unwrap();
        let del = Command::DeleteVm { id: "vm-2".into() };
        assert!(matches!(
            s.apply(3, &del),
            Err(StateError::FailedPrecondition(_))
        ));
        s.apply(
            4,
            &Command::SetVmDesired {
                id: "vm-2".into(),
                desired: VmDesired::Stopped,
            },
        )
        .unwrap();
        s.apply(5, &del).unwrap();
        assert!(s.vms.is_empty());
        assert_eq!(s.hosts["h1"].allocated, Resources::default());
        assert!(s.hosts["h1"].vm_ids.is_empty());
    }

    #[test]
    fn migration_reserves_target_and_moves_or_stays() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("h1", 4, 4096)).unwrap();
        s.apply(2, &create("a", 2, 1024)).unwrap();
        s.apply(3, &reg("h2", 4, 4096)).unwrap();
        let start = Command::StartMigration {
            vm_id: "vm-2".into(),
            target_host: String::new(),
            requested_by: "user".into(),
            policy: Policy::BinPack,
            loads: Loads::default(),
        };
        let (Reply::Migration(m), _, _) = s.apply(4, &start).unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.source_host.as_str(), m.target_host.as_str()),
            ("h1", "h2")
        );
        assert_eq!(s.hosts["h2"].allocated.vcpus, 2, "target reserved");
        assert!(s.apply(5, &start).is_err(), "one migration per VM");
        let report = |phase, done| Command::ReportMigration {
            id: "mig-4".into(),
            phase,
            bytes_done: done,
            bytes_total: 100,
            error: String::new(),
        };
        s.apply(6, &report(Phase::Running, 50)).unwrap();
        s.apply(7, &report(Phase::Succeeded, 100)).unwrap();
        assert_eq!(s.vms["vm-2"].host_id, "h2");
        assert_eq!(s.hosts["h1"].allocated.vcpus, 0);
        assert_eq!(s.hosts["h2"].vm_ids, vec!["vm-2".to_string()]);
        assert!(
            s.apply(8, &report(Phase::Failed, 0)).is_err(),
            "done is final"
        );

        // Back again, then cancel: the VM stays and the target is released.
        s.apply(9, &start).unwrap();
        assert_eq!(s.hosts["h1"].allocated.vcpus, 2);
        s.apply(10, &Command::CancelMigration { id: "mig-9".into() })
            .unwrap();
        assert_eq!(s.vms["vm-2"].host_id, "h2");
        assert_eq!(s.hosts["h1"].allocated.vcpus, 0);
        assert_eq!(s.migrations["mig-9"].phase, Phase::Cancelled);
        assert!(s.vms["vm-2"].migration_id.is_empty());
    }

    #[test]
    fn batched_commands_get_distinct_ids() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("h1", 8, 8192)).unwrap();
        // Three writes in the entry at index 2.
        let ids: Vec<String> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(
                |(sub, n)| match s.apply_at(2, sub, &create(n, 1, 64)).unwrap() {
                    (Reply::Vm(v), _, _) => v.id,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(ids, ["vm-2", "vm-2-1", "vm-2-2"]);
        // A refused command inside a batch changes nothing.
        let before = s.clone();
        assert!(s.apply_at(2, 3, &create("a", 1, 64)).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn down_host_keeps_vms_and_drain_sticks() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("h1", 4, 4096)).unwrap();
        s.apply(2, &create("a", 1, 1)).unwrap();
        let set = |state| Command::SetHostState {
            id: "h1".into(),
            state,
        };
        s.apply(3, &set(HostState::Down)).unwrap();
        assert_eq!(s.hosts["h1"].vm_ids, vec!["vm-2".to_string()]);
        assert_eq!(s.vms.len(), 1);
        s.apply(4, &set(HostState::Up)).unwrap();
        s.apply(5, &Command::DrainHost { id: "h1".into() }).unwrap();
        s.apply(6, &set(HostState::Up)).unwrap();
        assert_eq!(s.hosts["h1"].state, HostState::Draining);
        assert!(matches!(
            s.apply(7, &create("b", 1, 1)),
            Err(StateError::NoCapacity(_))
        ));
        // Liveness never undoes a drain: a drained host that goes silent is Down and still
        // draining; when it heartbeats (or re-registers) again it is Draining, not Up.
        s.apply(8, &set(HostState::Down)).unwrap();
        assert_eq!(s.hosts["h1"].state, HostState::Down);
        assert!(s.hosts["h1"].draining);
        s.apply(9, &set(HostState::Up)).unwrap();
        assert_eq!(s.hosts["h1"].state, HostState::Draining);
        s.apply(10, &set(HostState::Down)).unwrap();
        s.apply(11, &reg("h1", 4, 4096)).unwrap();
        assert_eq!(s.hosts["h1"].state, HostState::Draining);
        assert!(s.hosts["h1"].draining);
        // A drain of a down host is recorded and shows once it is alive again.
        s.apply(12, &reg("h2", 4, 4096)).unwrap();
        s.apply(
            13,
            &Command::SetHostState {
                id: "h2".into(),
                state: HostState::Down,
            },
        )
        .unwrap();
        s.apply(14, &Command::DrainHost { id: "h2".into() })
            .unwrap();
        assert_eq!(s.hosts["h2"].state, HostState::Down);
        s.apply(
            15,
            &Command::SetHostState {
                id: "h2".into(),
                state: HostState::Up,
            },
        )
        .unwrap();
        assert_eq!(s.hosts["h2"].state, HostState::Draining);
    }

    #[test]
    fn a_notice_raises_an_event_and_changes_nothing_else() {
        let mut s = ClusterState::default();
        s.apply(1, &reg("h1", 4, 4096)).unwrap();
        let before = s.clone();
        let notice = |kind: &str| Command::Notice {
            kind: kind.into(),
            object_id: "vm-2".into(),
            message: "move vm-2 h1 -> h2".into(),
        };
        let (r, keys, ev) = s.apply(2, &notice("rebalancer.proposed")).unwrap();
        assert_eq!((r, keys.len()), (Reply::Empty, 0));
        assert_eq!((ev[0].seq, ev[0].kind.as_str()), (2, "rebalancer.proposed"));
        assert_eq!(
            ClusterState {
                event_seq: before.event_seq,
                ..s.clone()
            },
            before
        );
        let err = s.apply(3, &notice("vm.created")).unwrap_err();
        assert!(err.to_string().starts_with("invalid notice kind"), "{err}");
    }
}
