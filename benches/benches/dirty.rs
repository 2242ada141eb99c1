//! Dirty tracking on this host: KVM's dirty log (`KVM_GET_DIRTY_LOG`), the log with manual
//! protect (`KVM_CLEAR_DIRTY_LOG`) and the per-vCPU dirty ring, measured on the same test
//! guest at the migration benchmark's memory sizes and dirty rates, in one run.
//!
//! Per mechanism and case: the cost of switching tracking on, of a harvest every 100 ms while
//! the guest runs (p50 and max), of the final harvest with the vCPUs paused (which a
//! migration's downtime includes), and the rate the guest keeps writing at while tracked
//! (faults on write-protected pages and ring-full exits slow it). The dirty log is the
//! reference the other two are compared with.
//!
//! `cargo bench --bench dirty` (as root, on a host with /dev/kvm).

use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_benches::{report, Record};
use novacron_vmm::config::{DirtyTracking, EntryProtocol, VmConfig};
use novacron_vmm::vm::Vm;

const HARVESTS: usize = 15;
const INTERVAL: Duration = Duration::from_millis(100);

struct Measured {
    enable_ms: f64,
    harvest_p50_ms: f64,
    harvest_max_ms: f64,
    final_ms: f64,
    final_pages: usize,
    rate_untracked: f64,
    rate_tracked: f64,
}

/// What each case reports: metric, unit, and how to read it from a measurement.
type Metric = (&'static str, &'static str, fn(&Measured) -> f64);
const METRICS: [Metric; 7] = [
    ("enable", "ms", |m| m.enable_ms),
    ("harvest_p50", "ms", |m| m.harvest_p50_ms),
    ("harvest_max", "ms", |m| m.harvest_max_ms),
    ("final_harvest_paused", "ms", |m| m.final_ms),
    ("final_harvest_pages", "pages", |m| m.final_pages as f64),
    ("guest_rate_untracked", "pages/s", |m| m.rate_untracked),
    ("guest_rate_tracked", "pages/s", |m| m.rate_tracked),
];

fn config(dir: &std::path::Path, memory_mib: u64, rate: u64, mode: DirtyTracking) -> VmConfig {
    VmConfig {
        id: "dirty".into(),
        name: "dirty".into(),
        vcpus: 1,
        memory_mib,
        hugepages: false,
        kernel: novacron_testguest::guest_elf_path().to_path_buf(),
        initramfs: None,
        cmdline: format!("nc.rate={rate} nc.pattern=seq nc.log_ms=0 nc.report_ms=100"),
        entry: EntryProtocol::Long64,
        console_log: dir.join("console.log"),
        debugcon_log: dir.join("debugcon.log"),
        console_log_max_bytes: 0,
        dirty_tracking: mode,
        dirty_ring_entries: 0,
    }
}

fn pages_written(vm: &Vm) -> u64 {
    vm.guest_status()
        .ok()
        .flatten()
        .map(|s| s.pages_written)
        .unwrap_or(0)
}

/// The guest's write rate over `d`, pages/s.
fn rate_over(vm: &Vm, d: Duration) -> f64 {
    let (a, t) = (pages_written(vm), Instant::now());
    std::thread::sleep(d);
    (pages_written(vm) - a) as f64 / t.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn measure(memory_mib: u64, rate: u64, mode: DirtyTracking) -> Result<Measured, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (vm, vcpus) =
        Vm::create(config(dir.path(), memory_mib, rate, mode), false).map_err(|e| e.to_string())?;
    let threads = vm.spawn_vcpus(vcpus).map_err(|e| e.to_string())?;
    vm.resume().map_err(|e| e.to_string())?;
    let result = run(&vm);
    vm.stop(true, Duration::ZERO);
    for t in threads {
        let _ = t.join();
    }
    result
}

fn run(vm: &Arc<Vm>) -> Result<Measured, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while pages_written(vm) == 0 {
        if Instant::now() > deadline {
            return Err("the guest made no progress in 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Warm up as the migration benchmark does, then the untracked rate.
    std::thread::sleep(Duration::from_millis(700));
    let rate_untracked = rate_over(vm, Duration::from_millis(500));

    let t = Instant::now();
    vm.set_dirty_log(true).map_err(|e| e.to_string())?;
    vm.take_dirty_pages().map_err(|e| e.to_string())?;
    let enable_ms = ms(t.elapsed());

    let (p0, t0) = (pages_written(vm), Instant::now());
    let mut harvests = Vec::with_capacity(HARVESTS);
    for _ in 0..HARVESTS {
        std::thread::sleep(INTERVAL);
        let t = Instant::now();
        vm.take_dirty_pages().map_err(|e| e.to_string())?;
        harvests.push(ms(t.elapsed()));
    }
    let rate_tracked = (pages_written(vm) - p0) as f64 / t0.elapsed().as_secs_f64();

    std::thread::sleep(INTERVAL);
    vm.pause().map_err(|e| e.to_string())?;
    let t = Instant::now();
    let last = vm.take_dirty_pages().map_err(|e| e.to_string())?;
    let final_ms = ms(t.elapsed());
    vm.set_dirty_log(false).map_err(|e| e.to_string())?;

    harvests.sort_by(f64::total_cmp);
    Ok(Measured {
        enable_ms,
        harvest_p50_ms: harvests[harvests.len() / 2],
        harvest_max_ms: *harvests.last().expect("harvests"),
        final_ms,
        final_pages: last.len(),
        rate_untracked,
        rate_tracked,
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let modes = [
        (DirtyTracking::Log, "dirty-log"),
        (DirtyTracking::ManualProtect, "manual-protect"),
        (DirtyTracking::Ring, "dirty-ring"),
    ];
    let mut records = Vec::new();
    let mut failures = Vec::new();
    for memory_mib in [1024u64, 4096] {
        // 0 is the guest's "unlimited": it writes as fast as it can.
        for rate in [1u64, 2_000, 20_000, 100_000, 0] {
            let load = match rate {
                1 => "idle".to_string(),
                0 => "unlimited".to_string(),
                r => format!("rate{r}"),
            };
            let case = format!("{}GiB-{load}", memory_mib / 1024);
            let mut reference: Option<Measured> = None;
            for (mode, name) in modes {
                let m = match measure(memory_mib, rate, mode) {
                    Ok(m) => m,
                    Err(e) => {
                        failures.push(format!("{case} {name}: {e}"));
                        continue;
                    }
                };
                let c = format!("{case} {name}");
                for (metric, unit, f) in METRICS {
                    let reference = reference
                        .as_ref()
                        .filter(|_| mode != DirtyTracking::Log)
                        .map(|r| ("dirty-log", f(r)));
                    records.push(Record::num(&c, metric, unit, f(&m), reference));
                }
                if mode == DirtyTracking::Log {
                    reference = Some(m);
                }
            }
        }
    }
    report("dirty", &records);
    if !failures.is_empty() {
        eprintln!("\nfailed cases:");
        for f in &failures {
            eprintln!("  {f}");
        }
        std::process::exit(1);
    }
}
