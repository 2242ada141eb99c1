//! The eBPF probes: loading `ebpf/telemetry.bpf.c` (compiled by build.rs) with aya,
//! attaching its programs, keeping the `watched` map in step with the agent's VMs, and
//! reading the per-VM counters and histograms.

use std::collections::HashMap as StdHashMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};
use tracing::{info, warn};

use crate::layout::{self, PreemptKey, PreemptVal, Watch};

/// The compiled, stripped object (DWARF removed, `.BTF`/`.BTF.ext` kept).
pub static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/telemetry.bpf.o"));

/// Why the probes are not available.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel exposes no BTF (CO-RE and `tp_btf` need it).
    #[error("kernel BTF (/sys/kernel/btf/vmlinux) is not available: {0}")]
    NoBtf(String),
    /// The object or its maps could not be loaded (no CAP_BPF, verifier refusal, ...).
    #[error("loading the eBPF object: {0}")]
    Load(String),
    /// A required program would not load or attach.
    #[error("program {program} ({tracepoint}): {reason}")]
    Program {
        /// Program name.
        program: &'static str,
        /// Its tracepoint.
        tracepoint: &'static str,
        /// Cause.
        reason: String,
    },
    /// A map access failed.
    #[error("map {map}: {reason}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Cause.
        reason: String,
    },
}

/// How VM exits are counted on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitSource {
    /// `kvm:kvm_exit` (VT-x / AMD-V hosts: every exit, with its hardware reason).
    KvmExit,
    /// PVM hosts, where `kvm_exit` never fires: the exits that reach user space
    /// (`kvm_userspace_exit`, by KVM_EXIT reason) and `kvm_pio`/`kvm_mmio`/`kvm_emulate_insn`.
    UserspaceExits,
}

impl ExitSource {
    /// Detects the host's KVM flavour from the loaded modules.
    pub fn detect() -> ExitSource {
        let m = |n: &str| Path::new("/sys/module").join(n).exists();
        if m("kvm_pvm") && !m("kvm_intel") && !m("kvm_amd") {
            ExitSource::UserspaceExits
        } else if m("kvm_intel") || m("kvm_amd") {
            ExitSource::KvmExit
        } else {
            ExitSource::UserspaceExits
        }
    }

    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitSource::KvmExit => "kvm_exit",
            ExitSource::UserspaceExits => "userspace_exits",
        }
    }
}

/// One program of the object.
#[derive(Debug, Clone, Copy)]
struct ProgSpec {
    name: &'static str,
    /// "category/name" for tracepoints, the BTF name for `tp_btf`.
    tracepoint: &'static str,
    btf: bool,
    /// Whether the probes are unusable without it.
    required: bool,
}

const PROGRAMS: &[ProgSpec] = &[
    ProgSpec {
        name: "nc_userspace_exit",
        tracepoint: "kvm_userspace_exit",
        btf: true,
        required: true,
    },
    ProgSpec {
        name: "nc_pio",
        tracepoint: "kvm_pio",
        btf: true,
        required: true,
    },
    ProgSpec {
        name: "nc_mmio",
        tracepoint: "kvm_mmio",
        btf: true,
        required: false,
    },
    ProgSpec {
        name: "nc_emulate_insn",
        tracepoint: "kvm_emulate_insn",
        btf: true,
        required: false,
    },
    ProgSpec {
        name: "nc_kvm_exit",
        tracepoint: "kvm_exit",
        btf: true,
        required: false,
    },
    ProgSpec {
        name: "nc_page_fault",
        tracepoint: "kvm_page_fault",
        btf: true,
        required: false,
    },
    ProgSpec {
        name: "nc_vcpu_wakeup",
        tracepoint: "kvm_vcpu_wakeup",
        btf: true,
        required: false,
    },
    ProgSpec {
        name: "nc_sched_wakeup",
        tracepoint: "sched_wakeup",
        btf: true,
        required: true,
    },
    ProgSpec {
        name: "nc_sched_wakeup_new",
        tracepoint: "sched_wakeup_new",
        btf: true,
        required: true,
    },
    ProgSpec {
        name: "nc_sched_switch",
        tracepoint: "sched_switch",
        btf: true,
        required: true,
    },
    ProgSpec {
        name: "nc_block_rq_issue",
        tracepoint: "block_rq_issue",
        btf: true,
        required: false,
    },
    ProgSpec {
        name: "nc_block_rq_complete",
        tracepoint: "block_rq_complete",
        btf: true,
        required: false,
    },
];

/// Run statistics of one program (kernel BPF stats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    /// Program name.
    pub name: &'static str,
    /// Runs since load.
    pub run_count: u64,
    /// Time spent running, ns.
    pub run_time_ns: u64,
}

/// Raw per-VM numbers read from the maps (since the slot was assigned).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// `kvm_userspace_exit` counts by KVM_EXIT code.
    pub exit_reasons: Vec<u64>,
    /// The per-VM counters (see [`layout::counter`]).
    pub counters: Vec<u64>,
    /// Run-queue latency, log2(ns) buckets.
    pub runq_hist: Vec<u64>,
    /// Sum of run-queue latencies, ns.
    pub runq_sum_ns: u64,
    /// Block request latency, log2(ns) buckets.
    pub blk_hist: Vec<u64>,
    /// Sum of block latencies, ns.
    pub blk_sum_ns: u64,
}

impl KernelStats {
    /// Counter `idx` of [`layout::counter`].
    pub fn counter(&self, idx: u32) -> u64 {
        self.counters.get(idx as usize).copied().unwrap_or(0)
    }
}

/// The loaded and attached probes.
pub struct Probes {
    ebpf: Ebpf,
    attached: Vec<&'static str>,
    missing: Vec<(&'static str, String)>,
    _stats_fd: Option<OwnedFd>,
    exit_source: ExitSource,
    ncpus: usize,
    watched: HashMap<MapData, u32, Watch>,
    counters: PerCpuArray<MapData, u64>,
    exit_reasons: PerCpuArray<MapData, u64>,
    runq_hist: PerCpuArray<MapData, u64>,
    runq_sum: PerCpuArray<MapData, u64>,
    blk_hist: PerCpuArray<MapData, u64>,
    blk_sum: PerCpuArray<MapData, u64>,
    health: PerCpuArray<MapData, u64>,
    preemptors: HashMap<MapData, PreemptKey, PreemptVal>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("attached", &self.attached)
            .field("missing", &self.missing)
            .field("exit_source", &self.exit_source)
            .finish_non_exhaustive()
    }
}

/// Mounts tracefs at /sys/kernel/tracing when it is not mounted.
pub fn ensure_tracefs() -> Result<(), std::io::Error> {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").is_dir() {
        return Ok(());
    }
    let src = c"nodev";
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: mount(2) with valid NUL-terminated strings and no data pointer.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

fn take_percpu(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, u64>, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Map {
        map: name,
        reason: "missing from the object".into(),
    })?;
    PerCpuArray::try_from(map).map_err(|e| ProbeError::Map {
        map: name,
        reason: e.to_string(),
    })
}

/// An error with its causes, "a: b: c" (aya's errors keep the errno in their sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

fn zeros(ncpus: usize) -> PerCpuValues<u64> {
    PerCpuValues::try_from(vec![0u64; ncpus]).expect("one value per possible CPU")
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |e| ProbeError::Map {
        map,
        reason: e.to_string(),
    }
}

impl Probes {
    /// Loads the object, attaches every program whose tracepoint exists, and turns on BPF
    /// run-time statistics. Fails if a required program cannot attach.
    pub fn load() -> Result<Probes, ProbeError> {
        let btf = Btf::from_sys_fs().map_err(|e| ProbeError::NoBtf(e.to_string()))?;
        // Every program is a BTF tracepoint and needs no tracefs, but operators' tools (and
        // classic tracepoints on other builds) do: mount it when missing.
        if let Err(e) = ensure_tracefs() {
            warn!("tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {e}");
        }
        let exit_source = ExitSource::detect();
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .load(OBJECT)
            .map_err(|e| ProbeError::Load(chain(&e)))?;
        let mut attached = Vec::new();
        let mut missing = Vec::new();
        for spec in PROGRAMS {
            let r = attach(&mut ebpf, spec, &btf);
            match r {
                Ok(()) => attached.push(spec.name),
                Err(reason) if !spec.required => {
                    missing.push((spec.tracepoint, reason));
                }
                Err(reason) => {
                    return Err(ProbeError::Program {
                        program: spec.name,
                        tracepoint: spec.tracepoint,
                        reason,
                    })
                }
            }
        }
        let stats_fd = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                missing.push(("bpf_stats", e.to_string()));
                None
            }
        };
        let ncpus =
            aya::util::nr_cpus().map_err(|(what, e)| ProbeError::Load(format!("{what}: {e}")))?;
        let watched = HashMap::try_from(ebpf.take_map("watched").ok_or(ProbeError::Map {
            map: "watched",
            reason: "missing".into(),
        })?)
        .map_err(map_err("watched"))?;
        let preemptors = HashMap::try_from(ebpf.take_map("preemptors").ok_or(ProbeError::Map {
            map: "preemptors",
            reason: "missing".into(),
        })?)
        .map_err(map_err("preemptors"))?;
        let probes = Probes {
            counters: take_percpu(&mut ebpf, "counters")?,
            exit_reasons: take_percpu(&mut ebpf, "exit_reasons")?,
            runq_hist: take_percpu(&mut ebpf, "runq_hist")?,
            runq_sum: take_percpu(&mut ebpf, "runq_sum_ns")?,
            blk_hist: take_percpu(&mut ebpf, "blk_hist")?,
            blk_sum: take_percpu(&mut ebpf, "blk_sum_ns")?,
            health: take_percpu(&mut ebpf, "health")?,
            watched,
            preemptors,
            ebpf,
            attached,
            missing,
            _stats_fd: stats_fd,
            exit_source,
            ncpus,
        };
        info!(
            exit_source = exit_source.as_str(),
            attached = ?probes.attached,
            "eBPF probes loaded ({})",
            match exit_source {
                ExitSource::KvmExit => "VT-x/AMD-V host: counting kvm:kvm_exit",
                ExitSource::UserspaceExits =>
                    "PVM host: kvm_exit never fires here; counting kvm_userspace_exit, kvm_pio, kvm_mmio, kvm_emulate_insn",
            }
        );
        for (tp, why) in &probes.missing {
            warn!("eBPF probe {tp} not attached: {why}");
        }
        Ok(probes)
    }

    /// How exits are counted.
    pub fn exit_source(&self) -> ExitSource {
        self.exit_source
    }

    /// Programs attached.
    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// Optional probes that are not attached, with why.
    pub fn missing(&self) -> &[(&'static str, String)] {
        &self.missing
    }

    /// Starts attributing `pid` (the VMM) and `vcpu_tids` to `slot`, after zeroing the slot.
    pub fn watch(&mut self, slot: u32, pid: u32, vcpu_tids: &[i32]) -> Result<(), ProbeError> {
        self.clear_slot(slot)?;
        self.watched
            .insert(
                pid,
                Watch {
                    slot,
                    kind: layout::KIND_VMM,
                },
                0,
            )
            .map_err(map_err("watched"))?;
        for &tid in vcpu_tids {
            let tid = tid as u32;
            self.watched
                .insert(
                    tid,
                    Watch {
                        slot,
                        kind: layout::KIND_VCPU,
                    },
                    0,
                )
                .map_err(map_err("watched"))?;
        }
        Ok(())
    }

    /// Stops attributing `pid` and `vcpu_tids`, and drops the slot's preemptor entries.
    pub fn unwatch(&mut self, slot: u32, pid: u32, vcpu_tids: &[i32]) {
        let _ = self.watched.remove(&pid);
        for &tid in vcpu_tids {
            let _ = self.watched.remove(&(tid as u32));
        }
        let keys: Vec<PreemptKey> = self
            .preemptors
            .keys()
            .flatten()
            .filter(|k| k.slot == slot)
            .collect();
        for k in keys {
            let _ = self.preemptors.remove(&k);
        }
    }

    fn clear_slot(&mut self, slot: u32) -> Result<(), ProbeError> {
        let ncpus = self.ncpus;
        for (map, name, per) in [
            (&mut self.counters, "counters", layout::COUNTERS),
            (&mut self.exit_reasons, "exit_reasons", layout::EXIT_REASONS),
            (&mut self.runq_hist, "runq_hist", layout::HIST_BUCKETS),
            (&mut self.blk_hist, "blk_hist", layout::HIST_BUCKETS),
            (&mut self.runq_sum, "runq_sum_ns", 1),
            (&mut self.blk_sum, "blk_sum_ns", 1),
        ] {
            for i in 0..per {
                map.set(slot * per + i, zeros(ncpus), 0)
                    .map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    fn sum_range(
        map: &PerCpuArray<MapData, u64>,
        name: &'static str,
        start: u32,
        n: u32,
    ) -> Result<Vec<u64>, ProbeError> {
        (start..start + n)
            .map(|i| {
                map.get(&i, 0)
                    .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                    .map_err(map_err(name))
            })
            .collect()
    }

    /// Reads the numbers of `slot`.
    pub fn read_slot(&self, slot: u32) -> Result<KernelStats, ProbeError> {
        Ok(KernelStats {
            exit_reasons: Self::sum_range(
                &self.exit_reasons,
                "exit_reasons",
                slot * layout::EXIT_REASONS,
                layout::EXIT_REASONS,
            )?,
            counters: Self::sum_range(
                &self.counters,
                "counters",
                slot * layout::COUNTERS,
                layout::COUNTERS,
            )?,
            runq_hist: Self::sum_range(
                &self.runq_hist,
                "runq_hist",
                slot * layout::HIST_BUCKETS,
                layout::HIST_BUCKETS,
            )?,
            runq_sum_ns: Self::sum_range(&self.runq_sum, "runq_sum_ns", slot, 1)?[0],
            blk_hist: Self::sum_range(
                &self.blk_hist,
                "blk_hist",
                slot * layout::HIST_BUCKETS,
                layout::HIST_BUCKETS,
            )?,
            blk_sum_ns: Self::sum_range(&self.blk_sum, "blk_sum_ns", slot, 1)?[0],
        })
    }

    /// The preempting processes of every slot: slot → (tgid → value).
    pub fn preemptors(&self) -> StdHashMap<u32, Vec<(u32, PreemptVal)>> {
        let mut out: StdHashMap<u32, Vec<(u32, PreemptVal)>> = StdHashMap::new();
        for (k, v) in self.preemptors.iter().flatten() {
            out.entry(k.slot).or_default().push((k.tgid, v));
        }
        out
    }

    /// The global health counters: (map updates failed, events dropped, unknown slot).
    pub fn health(&self) -> Result<(u64, u64, u64), ProbeError> {
        let v = Self::sum_range(&self.health, "health", 0, layout::health::COUNT)?;
        Ok((
            v[layout::health::MAP_UPDATE_FAILED as usize],
            v[layout::health::EVENTS_DROPPED as usize],
            v[layout::health::UNKNOWN_SLOT as usize],
        ))
    }

    /// Kernel run statistics of every attached program.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.attached
            .iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some(ProgramStats {
                    name,
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }
}

fn attach(ebpf: &mut Ebpf, spec: &ProgSpec, btf: &Btf) -> Result<(), String> {
    let prog = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| "not in the object".to_string())?;
    if spec.btf {
        let p: &mut BtfTracePoint = prog.try_into().map_err(|e| format!("{e}"))?;
        p.load(spec.tracepoint, btf)
            .map_err(|e| format!("load: {}", chain(&e)))?;
        p.attach().map_err(|e| format!("attach: {}", chain(&e)))?;
        Ok(())
    } else {
        let (cat, name) = spec.tracepoint.split_once('/').expect("category/name");
        if !Path::new("/sys/kernel/tracing/events")
            .join(cat)
            .join(name)
            .exists()
        {
            return Err(format!(
                "tracepoint {cat}:{name} does not exist on this kernel"
            ));
        }
        let p: &mut TracePoint = prog.try_into().map_err(|e| format!("{e}"))?;
        p.load().map_err(|e| format!("load: {}", chain(&e)))?;
        p.attach(cat, name)
            .map_err(|e| format!("attach: {}", chain(&e)))?;
        Ok(())
    }
}
