//! Agents: what each host's agent is told to do, decided from the replicated state (what should
//! run where) and the agents' reports (what runs where).
//!
//! Pure: [`plan`] and [`drain`] take the state and the observations and return commands for the
//! agent and writes for Raft; no sockets, no clocks. The leader's session driver (`api`) runs
//! [`plan`] for a host while its agent holds a `Commands` stream, and the leader's drain loop runs
//! [`drain`].
//!
//! Rules ([`plan`], for host H, its agent's latest inventory, and every host's inventory):
//!
//! 1. The coordinator is the truth for what *should* run. A VM recorded on H, not migrating:
//!    desired Running and absent on H → `Create` (start); held but not active → `Start`;
//!    desired Stopped and absent → `Create` (not started); desired Stopped and active → `Stop`.
//!    Nothing is created while another host's inventory shows the VM active (rule 2 adopts it).
//! 2. The agent is the truth for what *runs*. An active VM on H that no record names, or that
//!    the record puts on a host whose agent does not report it active, is adopted
//!    ([`Command::AdoptVm`], event `vm.adopted`). A VM that H holds inactive and that no
//!    record places on H (deleted, or recorded elsewhere) → `Delete`.
//! 3. A Pending migration from H not yet sent in this session → `Migrate` to the source.
//! 4. A migration from H that is not done and was not sent in this session (the agent or the
//!    leader restarted meanwhile) is settled from the inventories: the target runs the VM and
//!    the source no longer holds it → Succeeded; the source runs it (no outgoing migration
//!    under way) and the target does not hold it → Pending: sent again, Running: Failed (the
//!    VM stayed on the source); the VM on neither host → Failed. Otherwise it waits.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::scheduler::Policy;
use crate::state::{BootSpec, ClusterState, Command, HostState, Phase, Resources, VmDesired};

/// One VM as an agent reports it (kept in memory on the leader with the host's liveness).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentVm {
    /// The VM's name (the coordinator's VM name).
    pub name: String,
    /// The agent's state ("running", "stopped", "incoming", ...).
    pub state: String,
    /// What it uses.
    pub resources: Resources,
    /// What it boots.
    pub boot: BootSpec,
    /// An outgoing migration of it is under way on this agent.
    pub migrating: bool,
}

impl AgentVm {
    /// A VMM process exists for it (it runs, or is about to, or receives a migration).
    pub fn active(&self) -> bool {
        matches!(
            self.state.as_str(),
            "starting" | "running" | "paused" | "incoming"
        )
    }

    /// It runs (or is paused) as an ordinary VM.
    pub fn runs(&self) -> bool {
        matches!(self.state.as_str(), "starting" | "running" | "paused")
    }
}

/// A command for one agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentCommand {
    /// Create the VM (and start it when `start`).
    Create {
        /// Name.
        name: String,
        /// Resources.
        resources: Resources,
        /// Boot spec.
        boot: BootSpec,
        /// Start once created.
        start: bool,
    },
    /// Start a held VM.
    Start(String),
    /// Stop a running VM.
    Stop(String),
    /// Delete a held, inactive VM.
    Delete(String),
    /// Live-migrate the VM to another agent and report on migration `migration_id`.
    Migrate {
        /// VM name.
        name: String,
        /// Migration id.
        migration_id: String,
        /// Target host id (= agent name).
        target_host: String,
        /// Target agent's migration address.
        target_address: String,
    },
}

impl AgentCommand {
    /// A key for de-duplication: the same key is not sent twice within the driver's resend
    /// interval.
    pub fn key(&self) -> String {
        match self {
            AgentCommand::Create { name, .. } => format!("create/{name}"),
            AgentCommand::Start(n) => format!("start/{n}"),
            AgentCommand::Stop(n) => format!("stop/{n}"),
            AgentCommand::Delete(n) => format!("delete/{n}"),
            AgentCommand::Migrate { migration_id, .. } => format!("migrate/{migration_id}"),
        }
    }
}

/// One agent's latest inventory, stamped with the leader's applied log index when it arrived:
/// an inventory older than a record's last change says nothing about it yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// Applied index on the leader when the report arrived.
    pub index: u64,
    /// The VMs the agent holds.
    pub vms: Vec<AgentVm>,
}

/// Inventories by host id; a host missing here has not reported since this leader took over.
pub type Inventories = BTreeMap<String, Inventory>;

/// The log index of the last change of VM `id`'s placement (creation, adoption, move, or a
/// migration's last change).
fn last_change(state: &ClusterState, id: &str) -> u64 {
    let created = state
        .vms
        .get(id)
        .map(|v| v.created_index.max(v.placed_index))
        .unwrap_or(0);
    state
        .migrations
        .values()
        .filter(|m| m.vm_id == id)
        .map(|m| m.updated_index)
        .fold(created, u64::max)
}

/// Whether host `host`'s inventory arrived after the change at index `since` was applied.
fn fresh(inv: &Inventories, host: &str, since: u64) -> bool {
    inv.get(host).is_some_and(|i| i.index >= since)
}

/// What to do for one host now.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Commands for the host's agent.
    pub commands: Vec<AgentCommand>,
    /// Writes for Raft.
    pub writes: Vec<Command>,
}

fn find<'a>(inv: &'a Inventories, host: &str, name: &str) -> Option<&'a AgentVm> {
    inv.get(host)?.vms.iter().find(|v| v.name == name)
}

/// The commands for host `host` and the writes its inventory calls for (see the module docs).
/// `sent` holds the migrations already sent to this host in the current session. Returns an
/// empty plan while the host has not reported.
pub fn plan(state: &ClusterState, host: &str, inv: &Inventories, sent: &BTreeSet<String>) -> Plan {
    let mut p = Plan::default();
    let Some(mine) = inv.get(host).map(|i| &i.vms) else {
        return p;
    };
    if !state.hosts.contains_key(host) {
        return p;
    }
    // 1. What should run here.
    for vm in state.vms.values().filter(|v| v.host_id == host) {
        if !vm.migration_id.is_empty() || !fresh(inv, host, last_change(state, &vm.id)) {
            continue;
        }
        let held = mine.iter().find(|o| o.name == vm.name);
        // Never start a second copy: a VM active on another host is that host's to adopt.
        let elsewhere = inv
            .iter()
            .any(|(h, i)| h != host && i.vms.iter().any(|o| o.name == vm.name && o.active()));
        match (vm.desired, held) {
            (_, None) if elsewhere => {}
            (VmDesired::Running, None) => p.commands.push(AgentCommand::Create {
                name: vm.name.clone(),
                resources: vm.resources,
                boot: vm.boot.clone(),
                start: true,
            }),
            (VmDesired::Running, Some(o)) if !o.active() => {
                p.commands.push(AgentCommand::Start(vm.name.clone()))
            }
            (VmDesired::Stopped, None) => p.commands.push(AgentCommand::Create {
                name: vm.name.clone(),
                resources: vm.resources,
                boot: vm.boot.clone(),
                start: false,
            }),
            (VmDesired::Stopped, Some(o)) if o.runs() => {
                p.commands.push(AgentCommand::Stop(vm.name.clone()))
            }
            _ => {}
        }
    }
    // 2. What runs here.
    for o in mine {
        let rec = state.vm_names.get(&o.name).and_then(|id| state.vms.get(id));
        match rec {
            _ if o.migrating || o.state == "incoming" => {}
            None if o.runs() => p.writes.push(adopt(host, o)),
            None => p.commands.push(AgentCommand::Delete(o.name.clone())),
            Some(vm) if vm.host_id == host || !vm.migration_id.is_empty() => {}
            Some(vm) if o.runs() => {
                let since = last_change(state, &vm.id);
                let there = find(inv, &vm.host_id, &vm.name).is_some_and(AgentVm::active);
                if !there && fresh(inv, host, since) && fresh(inv, &vm.host_id, since) {
                    p.writes.push(adopt(host, o));
                }
            }
            Some(vm) if fresh(inv, host, last_change(state, &vm.id)) => {
                p.commands.push(AgentCommand::Delete(o.name.clone()))
            }
            Some(_) => {}
        }
    }
    // 3 and 4. Migrations from here.
    for m in state
        .migrations
        .values()
        .filter(|m| m.source_host == host && !m.phase.done())
    {
        if sent.contains(&m.id) {
            continue;
        }
        let Some(vm) = state.vms.get(&m.vm_id) else {
            continue;
        };
        if !fresh(inv, host, m.updated_index) {
            continue;
        }
        let src = find(inv, host, &vm.name);
        let tgt_reported = fresh(inv, &m.target_host, m.updated_index);
        let tgt = find(inv, &m.target_host, &vm.name);
        let target_down = state
            .hosts
            .get(&m.target_host)
            .is_none_or(|h| h.state == HostState::Down);
        let report = |phase: Phase, error: &str| Command::ReportMigration {
            id: m.id.clone(),
            phase,
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
            error: error.into(),
        };
        match (src, tgt) {
            (None, Some(t)) if t.runs() && tgt_reported => {
                p.writes.push(report(Phase::Succeeded, ""))
            }
            (Some(s), None) if s.runs() && !s.migrating && (tgt_reported || target_down) => {
                if m.phase == Phase::Pending && !target_down {
                    let address = state
                        .hosts
                        .get(&m.target_host)
                        .map(|h| h.address.clone())
                        .unwrap_or_default();
                    p.commands.push(AgentCommand::Migrate {
                        name: vm.name.clone(),
                        migration_id: m.id.clone(),
                        target_host: m.target_host.clone(),
                        target_address: address,
                    });
                } else {
                    p.writes.push(report(
                        Phase::Failed,
                        "the migration was interrupted (agent or coordinator restart); the VM stayed on the source",
                    ));
                }
            }
            (None, None) if tgt_reported => p.writes.push(report(
                Phase::Failed,
                "the VM is on neither the source nor the target",
            )),
            _ => {}
        }
    }
    p
}

fn adopt(host: &str, o: &AgentVm) -> Command {
    Command::AdoptVm {
        host_id: host.into(),
        name: o.name.clone(),
        resources: o.resources,
        boot: o.boot.clone(),
    }
}

/// What a drain does now: for every Draining host, migrations of its VMs desired running and
/// not migrating, oldest first, while fewer than `parallel` of its migrations are under way;
/// and a move of each VM desired stopped (the agents create it on the target, delete it here).
pub fn drain(state: &ClusterState, parallel: usize, policy: Policy) -> Vec<Command> {
    let mut out = Vec::new();
    for h in state
        .hosts
        .values()
        .filter(|h| h.state == HostState::Draining)
    {
        let busy = state
            .migrations
            .values()
            .filter(|m| m.source_host == h.id && !m.phase.done())
            .count();
        let mut vms: Vec<_> = state
            .vms
            .values()
            .filter(|v| v.host_id == h.id && v.migration_id.is_empty())
            .collect();
        for vm in vms.iter().filter(|v| v.desired == VmDesired::Stopped) {
            out.push(Command::MoveVm {
                vm_id: vm.id.clone(),
                policy,
                loads: Default::default(),
            });
        }
        vms.retain(|v| v.desired == VmDesired::Running);
        vms.sort_by_key(|v| v.created_index);
        for vm in vms.into_iter().take(parallel.saturating_sub(busy)) {
            out.push(Command::StartMigration {
                vm_id: vm.id.clone(),
                target_host: String::new(),
                requested_by: "drain".into(),
                policy,
                loads: Default::default(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> ClusterState {
        let mut s = ClusterState::default();
        for (i, h) in ["h1", "h2"].iter().enumerate() {
            s.apply(
                i as u64 + 1,
                &Command::RegisterHost {
                    id: (*h).into(),
                    address: format!("127.0.0.1:{}", 7100 + i),
                    capacity: Resources {
                        vcpus: 4,
                        memory_mib: 4096,
                    },
                    labels: BTreeMap::new(),
                },
            )
            .unwrap();
        }
        s.apply(
            3,
            &Command::CreateVm {
                name: "a".into(),
                resources: Resources {
                    vcpus: 1,
                    memory_mib: 64,
                },
                labels: BTreeMap::new(),
                host_selector: BTreeMap::new(),
                anti_affinity_group: String::new(),
                start: true,
                policy: Policy::BinPack,
                loads: Default::default(),
                boot: BootSpec {
                    test_guest: true,
                    ..Default::default()
                },
            },
        )
        .unwrap();
        s
    }

    fn inv(hosts: &[(&str, Vec<AgentVm>)]) -> Inventories {
        hosts
            .iter()
            .map(|(h, vms)| {
                (
                    h.to_string(),
                    Inventory {
                        index: 100,
                        vms: vms.clone(),
                    },
                )
            })
            .collect()
    }

    fn obs(name: &str, state: &str) -> AgentVm {
        AgentVm {
            name: name.into(),
            state: state.into(),
            resources: Resources {
                vcpus: 1,
                memory_mib: 64,
            },
            ..Default::default()
        }
    }

    #[test]
    fn desired_vs_observed() {
        let s = setup();
        let host = s.vms["vm-3"].host_id.clone();
        let h = host.as_str();
        let none = BTreeSet::new();
        assert_eq!(plan(&s, h, &Inventories::new(), &none), Plan::default());
        let p = plan(&s, h, &inv(&[(h, vec![])]), &none);
        assert!(
            matches!(&p.commands[..], [AgentCommand::Create { name, start: true, .. }] if name == "a"),
            "{p:?}"
        );
        // An inventory older than the record says nothing about it.
        let mut stale = inv(&[(h, vec![])]);
        stale.get_mut(h).unwrap().index = 2;
        assert_eq!(plan(&s, h, &stale, &none), Plan::default());
        assert_eq!(
            plan(&s, h, &inv(&[(h, vec![obs("a", "stopped")])]), &none).commands,
            vec![AgentCommand::Start("a".into())]
        );
        assert_eq!(
            plan(
                &s,
                h,
                &inv(&[(h, vec![obs("a", "running"), obs("old", "stopped")])]),
                &none
            )
            .commands,
            vec![AgentCommand::Delete("old".into())]
        );
    }

    #[test]
    fn agent_is_truth_for_what_runs() {
        let s = setup();
        let host = s.vms["vm-3"].host_id.clone();
        let h = host.as_str();
        let other = if h == "h1" { "h2" } else { "h1" };
        // "a" runs on the other host, not on its recorded one: the record follows.
        let i = inv(&[
            (h, vec![]),
            (other, vec![obs("a", "running"), obs("x", "running")]),
        ]);
        let p = plan(&s, other, &i, &BTreeSet::new());
        assert_eq!(p.writes.len(), 2, "{p:?}");
        assert!(p
            .writes
            .iter()
            .all(|w| matches!(w, Command::AdoptVm { host_id, .. } if host_id == other)));
        // Recorded here, running there: no second copy here (the other host adopts it).
        let i = inv(&[(h, vec![]), (other, vec![obs("a", "running")])]);
        assert!(plan(&s, h, &i, &BTreeSet::new()).commands.is_empty());
        // Running in both places: the record stays.
        let i = inv(&[
            (h, vec![obs("a", "running")]),
            (other, vec![obs("a", "running")]),
        ]);
        assert!(plan(&s, other, &i, &BTreeSet::new()).writes.is_empty());
    }

    #[test]
    fn interrupted_migrations_settle_from_inventories() {
        let mut s = setup();
        let src = s.vms["vm-3"].host_id.clone();
        let dst = if src == "h1" { "h2" } else { "h1" }.to_string();
        let (sh, dh) = (src.as_str(), dst.as_str());
        s.apply(
            4,
            &Command::StartMigration {
                vm_id: "vm-3".into(),
                target_host: dst.clone(),
                requested_by: "user".into(),
                policy: Policy::BinPack,
                loads: Default::default(),
            },
        )
        .unwrap();
        let none = BTreeSet::new();
        let run_src = inv(&[(sh, vec![obs("a", "running")]), (dh, vec![])]);
        // Pending, not sent in this session: sent.
        let p = plan(&s, sh, &run_src, &none);
        assert!(
            matches!(&p.commands[..], [AgentCommand::Migrate { migration_id, target_host, .. }] if migration_id == "mig-4" && *target_host == dst),
            "{p:?}"
        );
        // Already sent: nothing more.
        assert_eq!(
            plan(&s, sh, &run_src, &BTreeSet::from(["mig-4".to_string()])),
            Plan::default()
        );
        // Running, and the source still runs it (nothing under way): failed.
        s.apply(
            5,
            &Command::ReportMigration {
                id: "mig-4".into(),
                phase: Phase::Running,
                bytes_done: 1,
                bytes_total: 2,
                error: String::new(),
            },
        )
        .unwrap();
        let p = plan(&s, sh, &run_src, &none);
        assert!(
            matches!(
                &p.writes[..],
                [Command::ReportMigration {
                    phase: Phase::Failed,
                    ..
                }]
            ),
            "{p:?}"
        );
        // Still under way on the source: wait.
        let mut busy = obs("a", "running");
        busy.migrating = true;
        let under_way = inv(&[(sh, vec![busy]), (dh, vec![obs("a", "incoming")])]);
        assert_eq!(plan(&s, sh, &under_way, &none), Plan::default());
        // On the target only: succeeded.
        let moved = inv(&[(sh, vec![]), (dh, vec![obs("a", "running")])]);
        assert!(matches!(
            &plan(&s, sh, &moved, &none).writes[..],
            [Command::ReportMigration {
                phase: Phase::Succeeded,
                ..
            }]
        ));
    }

    #[test]
    fn drain_starts_a_bounded_number() {
        let mut s = setup();
        let host = s.vms["vm-3"].host_id.clone();
        for (i, n) in ["b", "c"].iter().enumerate() {
            s.apply(
                10 + i as u64,
                &Command::CreateVm {
                    name: (*n).into(),
                    resources: Resources {
                        vcpus: 1,
                        memory_mib: 64,
                    },
                    labels: BTreeMap::new(),
                    host_selector: BTreeMap::new(),
                    anti_affinity_group: String::new(),
                    start: true,
                    policy: Policy::BinPack,
                    loads: Default::default(),
                    boot: BootSpec::default(),
                },
            )
            .unwrap();
        }
        assert!(drain(&s, 2, Policy::BinPack).is_empty());
        s.apply(20, &Command::DrainHost { id: host.clone() })
            .unwrap();
        let d = drain(&s, 2, Policy::BinPack);
        assert_eq!(d.len(), 2);
        s.apply(21, &d[0]).unwrap();
        assert_eq!(drain(&s, 2, Policy::BinPack).len(), 1);
        // A stopped VM moves without a migration; the agents follow the record.
        s.apply(
            22,
            &Command::SetVmDesired {
                id: "vm-11".into(),
                desired: VmDesired::Stopped,
            },
        )
        .unwrap();
        let d = drain(&s, 2, Policy::BinPack);
        assert!(d.contains(&Command::MoveVm {
            vm_id: "vm-11".into(),
            policy: Policy::BinPack,
            loads: Default::default(),
        }));
        let mv = d
            .iter()
            .find(|c| matches!(c, Command::MoveVm { .. }))
            .unwrap();
        s.apply(23, mv).unwrap();
        let to = s.vms["vm-11"].host_id.clone();
        assert_ne!(to, host);
        assert_eq!(s.vms["vm-11"].placed_index, 23);
        let i = inv(&[(&host, vec![obs("c", "stopped")]), (&to, vec![])]);
        assert!(plan(&s, &host, &i, &BTreeSet::new())
            .commands
            .contains(&AgentCommand::Delete("c".into())));
        assert!(matches!(
            &plan(&s, &to, &i, &BTreeSet::new()).commands[..],
            [AgentCommand::Create { start: false, .. }]
        ));
    }
}
