//! `cargo bench --bench telemetry`: what the eBPF telemetry costs a VM.
//!
//! An exit-heavy test guest (20 port writes, i.e. 20 exits to the VMM, per page written,
//! no rate limit) runs in this process; phases with the probes detached ("off") and
//! loaded, attached and watching the VM's vCPU thread, with its maps read every second like
//! the agent's sampler ("on"), alternate in one run so that noise on this shared machine
//! hits both. Reported: the guest's page throughput and exit rate (median of the phases,
//! on against off), its pages per CPU-second of its vCPU thread (the guest's work per unit
//! of CPU, which a loaded host's scheduling does not distort), the probes' own CPU share,
//! and each program's cost per event from the kernel's BPF stats.
//!
//! `NOVACRON_BENCH_ROUNDS` (default 6) sets the off/on pairs; `NOVACRON_BENCH_PHASE_MS`
//! (default 2000) the length of each phase. Needs root and /dev/kvm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_benches::{report, Record};
use novacron_telemetry::probes::{Probes, ProgramStats};
use novacron_vmm::config::{EntryProtocol, VmConfig};
use novacron_vmm::vm::Vm;

const GUEST: &str = "nc.mem=16 nc.rate=0 nc.exit_heavy=20 nc.log_ms=0";
/// The probes that fire once per exit: the target is under 500 ns per event.
const EXIT_PROBES: [&str; 3] = ["nc_userspace_exit", "nc_pio", "nc_emulate_insn"];

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rates {
    pages_per_s: f64,
    exits_per_s: f64,
    /// Pages per second of CPU time the vCPU thread got: the guest's work per unit of CPU,
    /// independent of how much CPU the loaded host's scheduler gave it.
    pages_per_cpu_s: f64,
}

/// CPU time of thread `tid` of this process, ns (schedstat).
fn thread_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("the vCPU thread's schedstat")
}

/// Pages written and exits of the guest over `len`, per second; `during` runs every second.
fn measure(vm: &Vm, len: Duration, mut during: impl FnMut()) -> Rates {
    let pages = || {
        vm.guest_status()
            .ok()
            .flatten()
            .map(|s| s.pages_written)
            .unwrap_or(0)
    };
    let tid = vm.vcpu_tids()[0];
    let (p0, e0, c0, t0) = (pages(), vm.exits(), thread_cpu_ns(tid), Instant::now());
    let mut next = t0 + Duration::from_secs(1);
    while t0.elapsed() < len {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() >= next {
            during();
            next += Duration::from_secs(1);
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    let cpu = (thread_cpu_ns(tid) - c0) as f64 / 1e9;
    let pages = (pages() - p0) as f64;
    Rates {
        pages_per_s: pages / dt,
        exits_per_s: (vm.exits() - e0) as f64 / dt,
        pages_per_cpu_s: pages / cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("the telemetry bench needs read-write /dev/kvm (run as root): {e}");
    }
    let rounds = env_num("NOVACRON_BENCH_ROUNDS", 6);
    let phase = Duration::from_millis(env_num("NOVACRON_BENCH_PHASE_MS", 2000));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = VmConfig {
        id: "bench-telemetry".into(),
        name: "bench-telemetry".into(),
        vcpus: 1,
        memory_mib: 64,
        hugepages: false,
        kernel: novacron_testguest::guest_elf_path().to_path_buf(),
        initramfs: None,
        cmdline: GUEST.into(),
        entry: EntryProtocol::Long64,
        console_log: dir.path().join("console.log"),
        debugcon_log: dir.path().join("debugcon.log"),
        console_log_max_bytes: 0,
        dirty_tracking: Default::default(),
        dirty_ring_entries: 0,
    };
    let (vm, vcpus) = Vm::create(config, false).expect("VM is created");
    let threads = vm.spawn_vcpus(vcpus).expect("vCPU threads start");
    vm.resume().expect("VM runs");
    let vm: Arc<Vm> = vm;
    let start = Instant::now();
    while vm
        .guest_status()
        .ok()
        .flatten()
        .is_none_or(|s| s.pages_written < 1000)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guest did not start writing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = std::process::id();
    let tids = vm.vcpu_tids();

    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut totals: Vec<ProgramStats> = Vec::new();
    for round in 0..rounds {
        let r = measure(&vm, phase, || {});
        eprintln!(
            "round {round} off: {:.0} pages/s, {:.0} exits/s",
            r.pages_per_s, r.exits_per_s
        );
        off.push(r);

        let mut probes = Probes::load().expect("the eBPF probes load (root, BTF, tracefs)");
        probes
            .watch(0, pid, &tids)
            .expect("watching the vCPU thread");
        std::thread::sleep(Duration::from_millis(200));
        let before = probes.program_stats();
        let r = measure(&vm, phase, || {
            let k = probes.read_slot(0).expect("reading the maps");
            std::hint::black_box(k);
            std::hint::black_box(probes.preemptors());
        });
        let after = probes.program_stats();
        let k = probes.read_slot(0).expect("reading the maps");
        assert!(
            k.exit_reasons.iter().sum::<u64>() > 0,
            "the probes counted the guest's exits"
        );
        for a in after {
            let b = before.iter().find(|b| b.name == a.name);
            let (dc, dt) = match b {
                Some(b) => (a.run_count - b.run_count, a.run_time_ns - b.run_time_ns),
                None => (a.run_count, a.run_time_ns),
            };
            match totals.iter_mut().find(|t| t.name == a.name) {
                Some(t) => {
                    t.run_count += dc;
                    t.run_time_ns += dt;
                }
                None => totals.push(ProgramStats {
                    name: a.name,
                    run_count: dc,
                    run_time_ns: dt,
                }),
            }
        }
        eprintln!(
            "round {round} on:  {:.0} pages/s, {:.0} exits/s",
            r.pages_per_s, r.exits_per_s
        );
        on.push(r);
        drop(probes);
    }
    vm.stop(true, Duration::ZERO);
    for t in threads {
        let _ = t.join();
    }

    let off_pages = median(off.iter().map(|r| r.pages_per_s).collect());
    let on_pages = median(on.iter().map(|r| r.pages_per_s).collect());
    let off_exits = median(off.iter().map(|r| r.exits_per_s).collect());
    let on_exits = median(on.iter().map(|r| r.exits_per_s).collect());
    let case = "exit-heavy test guest";
    let mut records = vec![
        Record::num(
            case,
            "pages_per_second",
            "1/s",
            on_pages,
            Some(("telemetry off", off_pages)),
        ),
        Record::num(
            case,
            "exits_per_second",
            "1/s",
            on_exits,
            Some(("telemetry off", off_exits)),
        ),
        Record::num(
            case,
            "slowdown_of_medians",
            "%",
            (1.0 - on_pages / off_pages) * 100.0,
            Some(("target", 2.0)),
        ),
        // Each "on" phase against the "off" phase just before it: less sensitive to drift.
        Record::num(
            case,
            "slowdown_paired_median",
            "%",
            median(
                off.iter()
                    .zip(&on)
                    .map(|(a, b)| (1.0 - b.pages_per_s / a.pages_per_s) * 100.0)
                    .collect(),
            ),
            Some(("target", 2.0)),
        ),
        Record::num(
            case,
            "pages_per_vcpu_cpu_second",
            "1/s",
            median(on.iter().map(|r| r.pages_per_cpu_s).collect()),
            Some((
                "telemetry off",
                median(off.iter().map(|r| r.pages_per_cpu_s).collect()),
            )),
        ),
        Record::num(
            case,
            "slowdown_per_vcpu_cpu",
            "%",
            median(
                off.iter()
                    .zip(&on)
                    .map(|(a, b)| (1.0 - b.pages_per_cpu_s / a.pages_per_cpu_s) * 100.0)
                    .collect(),
            ),
            Some(("target", 2.0)),
        ),
        // CPU the probes themselves used while on, as a share of one CPU (BPF stats).
        Record::num(
            "all probes",
            "cpu_share",
            "%",
            totals.iter().map(|t| t.run_time_ns).sum::<u64>() as f64
                / (phase.as_nanos() as f64 * rounds as f64)
                * 100.0,
            None,
        ),
    ];
    for t in &totals {
        if t.run_count == 0 {
            continue;
        }
        let ns = t.run_time_ns as f64 / t.run_count as f64;
        let target = EXIT_PROBES.contains(&t.name).then_some(("target", 500.0));
        records.push(Record::num(t.name, "ns_per_event", "ns", ns, target));
        records.push(Record::num(
            t.name,
            "events_per_second",
            "1/s",
            t.run_count as f64 / (phase.as_secs_f64() * rounds as f64),
            None,
        ));
    }
    report("telemetry", &records);
}
