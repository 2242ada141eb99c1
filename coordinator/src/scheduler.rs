//! Placement: filters (state, capacity, labels, anti-affinity) then scores (bin-pack or spread).
//!
//! Pure and deterministic: every coordinator applies the same placement to the same state, so
//! placement runs inside the replicated state machine. Ties break on the host id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{Host, HostState, Resources, Vm};

/// How to score hosts that pass the filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Policy {
    /// Fill the fullest host that fits first (fewer hosts in use).
    #[default]
    BinPack,
    /// Put the VM on the emptiest host (even load).
    Spread,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "binpack" | "bin-pack" => Ok(Policy::BinPack),
            "spread" => Ok(Policy::Spread),
            other => Err(format!(
                "unknown placement policy {other:?}: expected \"binpack\" or \"spread\""
            )),
        }
    }
}

/// What a VM asks of its host.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Resources to reserve.
    pub resources: Resources,
    /// Labels the host must carry.
    pub selector: &'a BTreeMap<String, String>,
    /// No two VMs of this group on one host ("" = none).
    pub anti_affinity_group: &'a str,
    /// Hosts not to consider (e.g. a migration's source).
    pub exclude: Option<&'a str>,
}

/// Why no host fits, counted per filter (for a clear error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejections {
    /// Hosts that are down or draining.
    pub not_up: usize,
    /// Hosts without room.
    pub capacity: usize,
    /// Hosts missing a selected label.
    pub labels: usize,
    /// Hosts already running a VM of the anti-affinity group.
    pub anti_affinity: usize,
    /// Hosts excluded by the request.
    pub excluded: usize,
}

impl std::fmt::Display for Rejections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} not up, {} without capacity, {} without the selected labels, {} anti-affinity conflicts, {} excluded",
            self.not_up, self.capacity, self.labels, self.anti_affinity, self.excluded
        )
    }
}

/// Picks a host for `req`, or says why every host was rejected.
pub fn place(
    hosts: &BTreeMap<String, Host>,
    vms: &BTreeMap<String, Vm>,
    req: &Request<'_>,
    policy: Policy,
) -> Result<String, Rejections> {
    let mut rej = Rejections::default();
    let mut best: Option<(f64, &str)> = None;
    for (id, h) in hosts {
        if req.exclude == Some(id.as_str()) {
            rej.excluded += 1;
            continue;
        }
        if h.state != HostState::Up {
            rej.not_up += 1;
            continue;
        }
        if !fits(h, &req.resources) {
            rej.capacity += 1;
            continue;
        }
        if !req.selector.iter().all(|(k, v)| h.labels.get(k) == Some(v)) {
            rej.labels += 1;
            continue;
        }
        if !req.anti_affinity_group.is_empty()
            && h.vm_ids.iter().any(|v| {
                vms.get(v)
                    .is_some_and(|vm| vm.anti_affinity_group == req.anti_affinity_group)
            })
        {
            rej.anti_affinity += 1;
            continue;
        }
        let s = score(h, &req.resources, policy);
        // Strictly greater: ties keep the first (smallest) host id.
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, id));
        }
    }
    best.map(|(_, id)| id.to_string()).ok_or(rej)
}

fn fits(h: &Host, r: &Resources) -> bool {
    h.allocated.vcpus as u64 + r.vcpus as u64 <= h.capacity.vcpus as u64
        && h.allocated.memory_mib + r.memory_mib <= h.capacity.memory_mib
}

/// Utilisation after placing `r` (mean of CPU and memory fractions), as a score: bin-pack
/// prefers high, spread prefers low.
fn score(h: &Host, r: &Resources, policy: Policy) -> f64 {
    let frac = |used: u64, cap: u64| {
        if cap == 0 {
            1.0
        } else {
            used as f64 / cap as f64
        }
    };
    let after = (frac(
        h.allocated.vcpus as u64 + r.vcpus as u64,
        h.capacity.vcpus as u64,
    ) + frac(h.allocated.memory_mib + r.memory_mib, h.capacity.memory_mib))
        / 2.0;
    match policy {
        Policy::BinPack => after,
        Policy::Spread => -after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::VmDesired;

    fn host(id: &str, vcpus: u32, mem: u64, used_vcpus: u32, used_mem: u64) -> Host {
        Host {
            id: id.into(),
            address: format!("{id}:1"),
            capacity: Resources {
                vcpus,
                memory_mib: mem,
            },
            allocated: Resources {
                vcpus: used_vcpus,
                memory_mib: used_mem,
            },
            labels: BTreeMap::new(),
            state: HostState::Up,
            vm_ids: vec![],
        }
    }

    fn hosts(list: Vec<Host>) -> BTreeMap<String, Host> {
        list.into_iter().map(|h| (h.id.clone(), h)).collect()
    }

    fn req(vcpus: u32, mem: u64, sel: &BTreeMap<String, String>) -> Request<'_> {
        Request {
            resources: Resources {
                vcpus,
                memory_mib: mem,
            },
            selector: sel,
            anti_affinity_group: "",
            exclude: None,
        }
    }

    #[test]
    fn binpack_picks_fullest_host_that_fits_and_spread_the_emptiest() {
        let none = BTreeMap::new();
        let hs = hosts(vec![
            host("a", 8, 8192, 1, 1024),
            host("b", 8, 8192, 6, 6144),
            host("c", 8, 8192, 7, 7800),
        ]);
        let vms = BTreeMap::new();
        // c cannot fit 2 vCPUs; b is the fullest that fits.
        assert_eq!(
            place(&hs, &vms, &req(2, 1024, &none), Policy::BinPack).unwrap(),
            "b"
        );
        assert_eq!(
            place(&hs, &vms, &req(2, 1024, &none), Policy::Spread).unwrap(),
            "a"
        );
    }

    #[test]
    fn capacity_filter_rejects_and_counts() {
        let none = BTreeMap::new();
        let hs = hosts(vec![host("a", 2, 1024, 0, 0), host("b", 4, 512, 0, 0)]);
        let err = place(&hs, &BTreeMap::new(), &req(4, 1024, &none), Policy::BinPack).unwrap_err();
        assert_eq!(err.capacity, 2);
        assert!(err.to_string().contains("2 without capacity"));
    }

    #[test]
    fn label_selector_and_down_hosts_are_filtered() {
        let mut sel = BTreeMap::new();
        sel.insert("zone".to_string(), "b".to_string());
        let mut a = host("a", 8, 8192, 0, 0);
        a.labels.insert("zone".into(), "a".into());
        let mut b = host("b", 8, 8192, 0, 0);
        b.labels.insert("zone".into(), "b".into());
        let mut b2 = host("b2", 8, 8192, 0, 0);
        b2.labels.insert("zone".into(), "b".into());
        b2.state = HostState::Down;
        let hs = hosts(vec![a, b, b2]);
        assert_eq!(
            place(&hs, &BTreeMap::new(), &req(1, 128, &sel), Policy::Spread).unwrap(),
            "b"
        );
        let mut c = hs.clone();
        c.get_mut("b").unwrap().state = HostState::Draining;
        let err = place(&c, &BTreeMap::new(), &req(1, 128, &sel), Policy::Spread).unwrap_err();
        assert_eq!((err.labels, err.not_up), (1, 2));
    }

    #[test]
    fn anti_affinity_keeps_group_members_apart() {
        let none = BTreeMap::new();
        let mut a = host("a", 8, 8192, 1, 512);
        a.vm_ids.push("vm-1".into());
        let hs = hosts(vec![a, host("b", 8, 8192, 0, 0)]);
        let mut vms = BTreeMap::new();
        vms.insert(
            "vm-1".to_string(),
            Vm {
                id: "vm-1".into(),
                name: "web-1".into(),
                resources: Resources {
                    vcpus: 1,
                    memory_mib: 512,
                },
                labels: BTreeMap::new(),
                anti_affinity_group: "web".into(),
                desired: VmDesired::Running,
                host_id: "a".into(),
                created_index: 1,
                migration_id: String::new(),
                boot: Default::default(),
                placed_index: 1,
            },
        );
        let mut r = req(1, 512, &none);
        // Bin-pack alone would choose a (fuller).
        assert_eq!(place(&hs, &vms, &r, Policy::BinPack).unwrap(), "a");
        r.anti_affinity_group = "web";
        assert_eq!(place(&hs, &vms, &r, Policy::BinPack).unwrap(), "b");
        r.exclude = Some("b");
        let err = place(&hs, &vms, &r, Policy::BinPack).unwrap_err();
        assert_eq!((err.anti_affinity, err.excluded), (1, 1));
    }

    #[test]
    fn ties_break_on_host_id_and_policy_parses() {
        let none = BTreeMap::new();
        let hs = hosts(vec![host("z", 4, 4096, 0, 0), host("m", 4, 4096, 0, 0)]);
        assert_eq!(
            place(&hs, &BTreeMap::new(), &req(1, 1, &none), Policy::Spread).unwrap(),
            "m"
        );
        assert_eq!("spread".parse::<Policy>().unwrap(), Policy::Spread);
        assert!("best".parse::<Policy>().unwrap_err().contains("expected"));
    }
}
