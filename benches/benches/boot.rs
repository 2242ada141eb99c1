//! `cargo bench --bench boot`: how fast a VM starts, against QEMU started the same way in the
//! same run.
//!
//! - test guest: process start to the guest's first progress line on the debug console
//!   (port 0xe9, a file for both VMMs), NovaCron vs QEMU (`-machine pc`, SeaBIOS, PVH entry);
//! - Linux: process start to "Linux version" on the serial console, the same ELF vmlinux
//!   (entered through its PVH note) and initramfs for both;
//! - the VMM's memory overhead: resident memory outside guest RAM, once the guest runs.
//!
//! Runs alternate between the two VMMs so that noise on this shared machine hits both.
//! `NOVACRON_BENCH_RUNS` (default 5) sets the test-guest repetitions;
//! `NOVACRON_BENCH_LINUX=0` skips the slow Linux case.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_benches::{release_binary, report, rss_outside_guest_kib, workspace_root, Record};
use novacron_vmm::config::{EntryProtocol, VmConfig};
use novacron_vmm::control::{Client, Request, Response};
use novacron_vmm::devices::monotonic_ns;

const MEMORY_MIB: u64 = 256;
const GUEST_CMDLINE: &str = "nc.log_ms=1000 nc.rate=0";
const LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 nc.mem=32";

struct Run {
    /// Spawn to the watched console line.
    elapsed: Duration,
    /// Spawn to the first progress doorbell of the guest-agent device (NovaCron only).
    doorbell: Option<Duration>,
    overhead_kib: Option<u64>,
}

/// Polls the VMM's control socket until it reports the guest's first progress doorbell.
fn wait_for_doorbell(control: &Path, t0_ns: u64, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(mut client) = Client::connect(control, Duration::from_secs(1)) {
            if let Ok(Response::Info(info)) = client.call(&Request::Info) {
                if let Some(ns) = info.first_progress_monotonic_ns {
                    return Duration::from_nanos(ns - t0_ns);
                }
            }
        }
        assert!(
            start.elapsed() < timeout,
            "no progress doorbell within {timeout:?}"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn wait_for_line(
    child: &mut Child,
    file: &Path,
    needle: &str,
    timeout: Duration,
    t0: Instant,
) -> Duration {
    loop {
        if let Ok(text) = std::fs::read(file) {
            if text.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                return t0.elapsed();
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "VM process exited ({status}) before {needle:?} appeared in {}",
                file.display()
            );
        }
        assert!(
            t0.elapsed() < timeout,
            "{needle:?} did not appear in {} within {timeout:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[allow(clippy::too_many_arguments)]
fn novacron(
    agent: &Path,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    entry: EntryProtocol,
    log_is_console: bool,
    needle: &str,
    timeout: Duration,
) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = VmConfig {
        id: "bench".into(),
        name: "bench".into(),
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        hugepages: false,
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.map(Path::to_path_buf),
        cmdline: cmdline.into(),
        entry,
        console_log: dir.path().join("console.log"),
        debugcon_log: dir.path().join("debugcon.log"),
        console_log_max_bytes: 0,
        dirty_tracking: Default::default(),
        dirty_ring_entries: 0,
    };
    let cfg_path = dir.path().join("vm.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&config).unwrap()).unwrap();
    let watched = if log_is_console {
        config.console_log.clone()
    } else {
        config.debugcon_log.clone()
    };
    let t0_ns = monotonic_ns();
    let t0 = Instant::now();
    let mut child = Command::new(agent)
        .arg("vmm")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--control")
        .arg(dir.path().join("control.sock"))
        .arg("--exit-file")
        .arg(dir.path().join("exit.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn novacron-agent vmm");
    let doorbell = (entry == EntryProtocol::Long64)
        .then(|| wait_for_doorbell(&dir.path().join("control.sock"), t0_ns, timeout));
    let elapsed = wait_for_line(&mut child, &watched, needle, timeout, t0);
    let overhead_kib = rss_outside_guest_kib(child.id(), MEMORY_MIB << 20);
    stop(child);
    Run {
        elapsed,
        doorbell,
        overhead_kib,
    }
}

fn qemu(
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    log_is_console: bool,
    needle: &str,
    timeout: Duration,
) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let debugcon = dir.path().join("debugcon.log");
    let console = dir.path().join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-enable-kvm",
        "-machine",
        "pc",
        "-cpu",
        "host",
        "-m",
        &MEMORY_MIB.to_string(),
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", cmdline])
    .arg("-debugcon")
    .arg(format!("file:{}", debugcon.display()))
    .arg("-serial")
    .arg(format!("file:{}", console.display()));
    if let Some(initrd) = initramfs {
        cmd.arg("-initrd").arg(initrd);
    }
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (deploy/setup.sh installs it)");
    let watched = if log_is_console { console } else { debugcon };
    let elapsed = wait_for_line(&mut child, &watched, needle, timeout, t0);
    let overhead_kib = rss_outside_guest_kib(child.id(), MEMORY_MIB << 20);
    stop(child);
    Run {
        elapsed,
        doorbell: None,
        overhead_kib,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("the boot benchmark needs read-write /dev/kvm");
    let runs: usize = std::env::var("NOVACRON_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let agent = release_binary("novacron-agent", "novacron-agent");
    let guest = novacron_testguest::guest_elf_path();
    let needle = "novacron-guest: progress";
    let timeout = Duration::from_secs(120);

    let mut records = Vec::new();
    let (mut nc_report, mut nc_line, mut qm_line, mut nc_mem, mut qm_mem) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for i in 0..runs {
        let a = novacron(
            &agent,
            guest,
            None,
            GUEST_CMDLINE,
            EntryProtocol::Long64,
            false,
            needle,
            timeout,
        );
        let b = qemu(guest, None, GUEST_CMDLINE, false, needle, timeout);
        let doorbell = a
            .doorbell
            .expect("the test guest rings the progress doorbell");
        println!(
            "run {i}: novacron report {:.2} ms, line {:.2} ms; qemu line {:.2} ms",
            ms(doorbell),
            ms(a.elapsed),
            ms(b.elapsed)
        );
        nc_report.push(ms(doorbell));
        nc_line.push(ms(a.elapsed));
        qm_line.push(ms(b.elapsed));
        nc_mem.extend(a.overhead_kib.map(|k| k as f64 / 1024.0));
        qm_mem.extend(b.overhead_kib.map(|k| k as f64 / 1024.0));
    }
    let min = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
    // The first progress report: the guest-agent doorbell where there is one (NovaCron), the
    // debug-console line where there is not (QEMU has no such device).
    records.push(Record::num(
        "test-guest",
        "first_progress_report_p50",
        "ms",
        median(nc_report.clone()),
        Some(("qemu", median(qm_line.clone()))),
    ));
    records.push(Record::num(
        "test-guest",
        "first_progress_report_min",
        "ms",
        min(&nc_report),
        Some(("qemu", min(&qm_line))),
    ));
    // The same console line for both (each console byte is an exit, ~80 us on PVM).
    records.push(Record::num(
        "test-guest",
        "first_progress_line_p50",
        "ms",
        median(nc_line),
        Some(("qemu", median(qm_line))),
    ));
    if !nc_mem.is_empty() && !qm_mem.is_empty() {
        records.push(Record::num(
            "test-guest",
            "vmm_rss_outside_guest_ram",
            "MiB",
            median(nc_mem),
            Some(("qemu", median(qm_mem))),
        ));
    }

    if std::env::var("NOVACRON_BENCH_LINUX").as_deref() != Ok("0") {
        let dir = workspace_root().join("target/novacron-guest");
        let vmlinux = dir.join("vmlinux");
        let initramfs = dir.join("initramfs.cpio.gz");
        assert!(
            vmlinux.exists(),
            "{} is missing: run deploy/setup.sh first",
            vmlinux.display()
        );
        let linux_timeout = Duration::from_secs(400);
        let a = novacron(
            &agent,
            &vmlinux,
            Some(&initramfs),
            LINUX_CMDLINE,
            EntryProtocol::Auto,
            true,
            "Linux version",
            linux_timeout,
        );
        let b = qemu(
            &vmlinux,
            Some(&initramfs),
            LINUX_CMDLINE,
            true,
            "Linux version",
            linux_timeout,
        );
        records.push(Record::num(
            "linux-vmlinux-pvh",
            "time_to_linux_banner",
            "s",
            a.elapsed.as_secs_f64(),
            Some(("qemu", b.elapsed.as_secs_f64())),
        ));
    }
    report("boot", &records);
}
