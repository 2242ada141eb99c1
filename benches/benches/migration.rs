//! `cargo bench --bench migration`: live migration of the test guest between two NovaCron VMM
//! processes, against QEMU migrating the same guest ELF in the same run.
//!
//! - NovaCron: two `novacron-agent vmm` processes (the destination `--incoming`), driven over
//!   their control sockets: `MigrateIn` on the destination, `MigrateOut` on the source (QUIC,
//!   mutual TLS, 4 streams, 50 ms downtime limit, auto-converge), `MigrationStatus` polled
//!   every 10 ms. Afterwards the guest must keep writing on the destination and verify its
//!   whole memory from inside (`integrity_ok`).
//! - QEMU: two `qemu-system-x86_64` processes (PVH entry through `-kernel`, SeaBIOS), the
//!   destination `-incoming defer`, both driven over QMP: "qemu-default" leaves QEMU's
//!   migration parameters alone (bandwidth cap, 300 ms downtime limit), "qemu-tuned" sets
//!   max-bandwidth 10 GB/s, downtime-limit 50 ms and multifd with 4 channels (xbzrle off).
//!
//! Workload: `nc.rate=R nc.pattern=seq` with R = 1 (idle), 2000, 20000, 100000 pages/s, 1 GiB;
//! 4 GiB at the idle rate and 20000 unless `NOVACRON_BENCH_4GIB=0`. Migrations start once the
//! guest has run for 1 s (NovaCron: its status page, with a few thousand pages written; QEMU:
//! 1 s after its ready line). `NOVACRON_BENCH_CASES`
//! (comma-separated case names such as `1GiB-rate20000`) runs a subset. Every migration has a
//! 120 s time limit; one that has not finished by then is cancelled and recorded as
//! `converged = false`. The order of the three runs alternates per case so that noise on this
//! shared machine hits every tool.
//!
//! Shaped link: the `shaped-*` cases run the same migrations through a user-space relay
//! (`novacron_benches::relay`, no netem on this kernel) applying the same shaping to both
//! tools: 1 Gbit/s token bucket (64 KiB bucket) and 10 ms delay each way (20 ms round trip),
//! a 50 ms queue bound. NovaCron's QUIC datagrams go through a UDP relay (the source's
//! `OutgoingParams.address` is the relay), QEMU's TCP stream (and multifd channels) through a
//! TCP relay whose bucket all connections share. `NOVACRON_BENCH_SHAPED`: unset or `1` runs
//! `shaped-1GiB-idle`, `shaped-1GiB-rate2000`, `shaped-1GiB-rate20000`; `all` adds
//! `shaped-1GiB-rate100000` and (unless `NOVACRON_BENCH_4GIB=0`) `shaped-4GiB-idle`,
//! `shaped-4GiB-rate20000`; `0` runs none.
//! `NOVACRON_BENCH_AGENT=PATH` uses an already built `novacron-agent` instead of building one;
//! `NOVACRON_BENCH_VERBOSE=1` prints the VMMs' logs after each NovaCron migration.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novacron_benches::relay::{Shape, TcpRelay, UdpRelay};
use novacron_benches::{release_binary, report, Record};
use novacron_migration::certs::ClusterDir;
use novacron_testguest::abi::CMD_VERIFY;
use novacron_vmm::config::{EntryProtocol, VmConfig};
use novacron_vmm::control::{Client, ExitReason, ExitRecord, GuestStatusWire, Request, Response};
use novacron_vmm::migrate::{IncomingParams, OutgoingParams, Progress};
use serde_json::{json, Value};

const TIME_LIMIT_S: u64 = 120;
const POLL: Duration = Duration::from_millis(10);
const TOKEN: [u8; 16] = *b"novacron-bench!!";
const MIB: f64 = 1024.0 * 1024.0;

/// A child process that is killed and reaped when the guard goes, also on panic.
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &str) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        Proc {
            child,
            what: what.into(),
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to end by itself.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        if let Err(e) = self.child.wait() {
            eprintln!("reaping {}: {e}", self.what);
        }
    }
}

/// One migration's result, as the tool reported it.
#[derive(Debug, Clone)]
struct Outcome {
    total_ms: f64,
    downtime_ms: f64,
    wire_mib: f64,
    converged: bool,
    /// NovaCron only: the guest kept writing and verified all its memory afterwards.
    integrity_ok: Option<bool>,
}

impl Outcome {
    fn failed() -> Outcome {
        Outcome {
            total_ms: f64::NAN,
            downtime_ms: f64::NAN,
            wire_mib: f64::NAN,
            converged: false,
            integrity_ok: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tool {
    NovaCron,
    QemuDefault,
    QemuTuned,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::NovaCron => "novacron",
            Tool::QemuDefault => "qemu-default",
            Tool::QemuTuned => "qemu-tuned",
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    memory_mib: u64,
    rate: u64,
    /// Through the shaped relay ([`Shape::GBIT_20MS_RTT`]) instead of plain loopback.
    shaped: bool,
}

impl Case {
    fn new(memory_mib: u64, rate: u64) -> Case {
        let load = if rate <= 1 {
            "idle".to_string()
        } else {
            format!("rate{rate}")
        };
        Case {
            name: format!("{}GiB-{load}", memory_mib / 1024),
            memory_mib,
            rate,
            shaped: false,
        }
    }

    /// The same case on the shaped link.
    fn shaped(memory_mib: u64, rate: u64) -> Case {
        let plain = Case::new(memory_mib, rate);
        Case {
            name: format!("shaped-{}", plain.name),
            shaped: true,
            ..plain
        }
    }

    fn cmdline(&self) -> String {
        format!(
            "nc.rate={} nc.pattern=seq nc.log_ms=0 nc.report_ms=100",
            self.rate.max(1)
        )
    }

    /// Pages the guest must have written before the migration starts ("a few thousand", or
    /// one for the idle guest).
    fn warm_pages(&self) -> u64 {
        self.rate.clamp(1, 4000)
    }

    /// Guest run time before the migration starts, so that the guest has dirtied as much
    /// memory as under QEMU, which migrates 1 s after the guest's ready line.
    const WARM_MS: u64 = 1000;
}

fn file_contains(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|t| t.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// NovaCron

fn connect_control(path: &Path, proc: &mut Proc, timeout: Duration) -> Client {
    let t0 = Instant::now();
    loop {
        if let Ok(c) = Client::connect(path, Duration::from_secs(5)) {
            return c;
        }
        if let Some(s) = proc.exited() {
            panic!(
                "{} exited ({s}) before its control socket came up",
                proc.what
            );
        }
        assert!(
            t0.elapsed() < timeout,
            "{}: no control socket within {timeout:?}",
            proc.what
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn guest_status(client: &mut Client) -> Result<Option<GuestStatusWire>, String> {
    match client.call(&Request::GuestStatus) {
        Ok(Response::GuestStatus { status }) => Ok(status),
        Ok(other) => Err(format!("GuestStatus answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn wait_status(
    client: &mut Client,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&GuestStatusWire) -> bool,
) -> Result<GuestStatusWire, String> {
    let t0 = Instant::now();
    let mut last = None;
    loop {
        if let Some(s) = guest_status(client)? {
            if ok(&s) {
                return Ok(s);
            }
            last = Some(s);
        }
        if t0.elapsed() > timeout {
            return Err(format!(
                "{what}: not within {timeout:?}; last status {last:?}"
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn novacron_vmm(agent: &Path, dir: &Path, config: &VmConfig, incoming: bool, what: &str) -> Proc {
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, serde_json::to_vec(config).unwrap()).unwrap();
    let mut cmd = Command::new(agent);
    cmd.arg("vmm")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--control")
        .arg(dir.join("ctl.sock"))
        .arg("--exit-file")
        .arg(dir.join("exit.json"));
    if incoming {
        cmd.arg("--incoming");
    }
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("vmm.stderr")).expect("create vmm.stderr"));
    Proc::spawn(&mut cmd, what)
}

/// `migrated to beta in 1234 ms, downtime 12.3 ms, 5 rounds` → (1234, 12.3).
fn parse_exit_detail(detail: &str) -> (Option<f64>, Option<f64>) {
    let number_after = |key: &str| {
        detail
            .split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let total = detail
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok());
    (total, number_after("downtime "))
}

/// Makes the guest verify all its memory; true iff it found no bad page and its running
/// checksum matched (the `verify ok` line on its debug console).
fn verify(client: &mut Client, debugcon: &Path, what: &str) -> Result<(), String> {
    let before = wait_status(client, what, Duration::from_secs(10), |_| true)?;
    match client.call(&Request::GuestCommand {
        cmd: CMD_VERIFY,
        arg: 0,
    }) {
        Ok(Response::Ok) => {}
        other => return Err(format!("{what}: VERIFY command answered {other:?}")),
    }
    let v = wait_status(client, what, Duration::from_secs(60), |s| {
        s.verify_count > before.verify_count
    })?;
    if v.verify_bad_pages != 0 {
        return Err(format!(
            "{what}: the guest found {} bad pages: {v:?}",
            v.verify_bad_pages
        ));
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if file_contains(debugcon, "novacron-guest: verify ok") {
            return Ok(());
        }
        if file_contains(debugcon, "novacron-guest: verify FAIL") {
            return Err(format!(
                "{what}: {}",
                tail(debugcon, 3).replace('\n', " | ")
            ));
        }
        std::thread::sleep(POLL);
    }
    Err(format!(
        "{what}: no verify line on the debug console; status {v:?}"
    ))
}

/// The guest keeps writing (pages_written grows) and its memory verifies.
fn check_guest(client: &mut Client, debugcon: &Path, what: &str) -> Result<(), String> {
    let s0 = wait_status(client, what, Duration::from_secs(10), |_| true)?;
    let s1 = wait_status(
        client,
        &format!("{what}: pages_written grows"),
        Duration::from_secs(15),
        |s| s.pages_written > s0.pages_written && s.elapsed_ms >= s0.elapsed_ms + 500,
    )?;
    println!("  {what}: the guest writes {:.0} pages/s", rate(&s0, &s1));
    verify(client, debugcon, what)
}

/// Pages per second of guest time between two status reads.
fn rate(a: &GuestStatusWire, b: &GuestStatusWire) -> f64 {
    (b.pages_written - a.pages_written) as f64 * 1e3 / (b.elapsed_ms - a.elapsed_ms).max(1) as f64
}

fn novacron(agent: &Path, certs: &Path, case: &Case, failures: &mut Vec<String>) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let config = |d: &Path| VmConfig {
        id: "bench-migration".into(),
        name: "bench-migration".into(),
        vcpus: 1,
        memory_mib: case.memory_mib,
        hugepages: false,
        kernel: novacron_testguest::guest_elf_path().to_path_buf(),
        initramfs: None,
        cmdline: case.cmdline(),
        entry: EntryProtocol::Long64,
        console_log: d.join("console.log"),
        debugcon_log: d.join("debugcon.log"),
        console_log_max_bytes: 0,
        dirty_tracking: Default::default(),
        dirty_ring_entries: 0,
    };
    let (src_cfg, dst_cfg) = (config(&src_dir), config(&dst_dir));
    let fail = |failures: &mut Vec<String>, msg: String| {
        let msg = format!(
            "novacron {}: {msg}\n  source stderr (tail):\n{}\n  destination stderr (tail):\n{}",
            case.name,
            tail(&src_dir.join("vmm.stderr"), 8),
            tail(&dst_dir.join("vmm.stderr"), 8)
        );
        println!("  FAILURE {msg}");
        failures.push(msg);
    };

    let mut src = novacron_vmm(agent, &src_dir, &src_cfg, false, "source VMM");
    let mut src_ctl = connect_control(&src_dir.join("ctl.sock"), &mut src, Duration::from_secs(10));
    let warm = case.warm_pages();
    let before = match wait_status(
        &mut src_ctl,
        "source warm-up",
        Duration::from_secs(60),
        |s| s.pages_written >= warm && s.elapsed_ms >= Case::WARM_MS,
    ) {
        Ok(s) => s,
        Err(e) => {
            fail(failures, e);
            return Outcome::failed();
        }
    };

    println!(
        "  novacron: the guest wrote {} pages in its first {} ms ({:.0} pages/s)",
        before.pages_written,
        before.elapsed_ms,
        before.pages_written as f64 * 1e3 / before.elapsed_ms.max(1) as f64
    );
    let mut dst = novacron_vmm(agent, &dst_dir, &dst_cfg, true, "destination VMM");
    let mut dst_ctl = connect_control(&dst_dir.join("ctl.sock"), &mut dst, Duration::from_secs(10));
    let address: SocketAddr = match dst_ctl.call(&Request::MigrateIn {
        params: IncomingParams {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: TOKEN,
            cert_dir: certs.to_path_buf(),
            agent: "beta".into(),
        },
    }) {
        Ok(Response::MigrationListening { address }) => address.parse().expect("an address"),
        other => {
            fail(failures, format!("MigrateIn answered {other:?}"));
            return Outcome::failed();
        }
    };

    // The shaped link: the source sends to the relay, which forwards to the destination.
    let relay = if case.shaped {
        match UdpRelay::start(address, Shape::GBIT_20MS_RTT) {
            Ok(r) => {
                println!(
                    "  novacron: through the UDP relay {} -> {address} ({})",
                    r.addr(),
                    Shape::GBIT_20MS_RTT
                );
                Some(r)
            }
            Err(e) => {
                fail(failures, format!("starting the UDP relay: {e}"));
                return Outcome::failed();
            }
        }
    } else {
        None
    };
    let address = relay.as_ref().map_or(address, UdpRelay::addr);

    let t0 = Instant::now();
    match src_ctl.call(&Request::MigrateOut {
        params: OutgoingParams {
            address,
            dest_agent: "beta".into(),
            token: TOKEN,
            cert_dir: certs.to_path_buf(),
            agent: "alpha".into(),
            streams: 4,
            downtime_limit_ms: 50,
            time_limit_s: TIME_LIMIT_S,
            force_at_time_limit: false,
            auto_converge: true,
            dirty_rate_limit: 0,
            bandwidth_limit: 0,
        },
    }) {
        Ok(Response::Ok) => {}
        other => {
            fail(failures, format!("MigrateOut answered {other:?}"));
            return Outcome::failed();
        }
    }

    // Poll fast and keep the last progress: the source exits shortly after "completed".
    let mut last: Option<Progress> = None;
    let mut cancelled = false;
    let mut poll_error = None;
    loop {
        match src_ctl.call(&Request::MigrationStatus) {
            Ok(Response::Migration { progress: Some(p) }) => {
                let done = matches!(p.phase.as_str(), "completed" | "rolled-back" | "in-doubt");
                last = Some(p);
                if done {
                    break;
                }
            }
            Ok(other) => {
                poll_error = Some(format!("MigrationStatus answered {other:?}"));
                break;
            }
            Err(e) => {
                poll_error = Some(format!("source control channel: {e}"));
                break;
            }
        }
        let elapsed = t0.elapsed();
        if !cancelled && elapsed > Duration::from_secs(TIME_LIMIT_S + 15) {
            // The VMM's own time limit should have ended it; make sure.
            let _ = src_ctl.call(&Request::MigrationCancel);
            cancelled = true;
        }
        if elapsed > Duration::from_secs(TIME_LIMIT_S + 60) {
            poll_error = Some(format!("still not ended after {elapsed:?}"));
            break;
        }
        std::thread::sleep(POLL);
    }
    let last = last.unwrap_or_default();
    let phase = last.phase.clone();

    // A migrated source exits by itself and leaves its exit record.
    let mut exit: Option<ExitRecord> = None;
    if phase == "completed" || poll_error.is_some() {
        src.wait_exit(Duration::from_secs(5));
        exit = std::fs::read(src_dir.join("exit.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    }
    let migrated = exit
        .as_ref()
        .is_some_and(|e| e.reason == ExitReason::Migrated);
    let converged = phase == "completed" || migrated;
    let (exit_total, exit_downtime) = exit
        .as_ref()
        .map(|e| parse_exit_detail(&e.detail))
        .unwrap_or((None, None));
    let total_ms = if phase == "completed" || !converged {
        last.total_ms
    } else {
        exit_total.unwrap_or(f64::NAN)
    };
    let downtime_ms = last.downtime_ms.or(exit_downtime).unwrap_or(f64::NAN);
    if let Some(r) = &relay {
        println!("  novacron: relay {}", r.stats());
    }
    println!(
        "  novacron: phase {phase:?}, total {total_ms:.1} ms, downtime {downtime_ms:.2} ms, \
         wire {:.1} MiB (raw {:.1} MiB, ratio {:.2}), rounds {:?}, throttle {}%",
        last.wire_bytes as f64 / MIB,
        last.raw_bytes as f64 / MIB,
        last.compression_ratio(),
        last.pages_per_round,
        last.throttle
    );
    if std::env::var_os("NOVACRON_BENCH_VERBOSE").is_some() {
        println!(
            "  source stderr:\n{}\n  destination stderr:\n{}",
            tail(&src_dir.join("vmm.stderr"), 40),
            tail(&dst_dir.join("vmm.stderr"), 40)
        );
    }
    if !converged {
        let dst_progress = dst_ctl.call(&Request::MigrationStatus);
        fail(
            failures,
            format!(
                "migration did not complete: source progress {last:?}; poll error {poll_error:?}; \
                 source exit {exit:?}; destination {dst_progress:?}"
            ),
        );
    } else if let Some(e) = &poll_error {
        if phase != "completed" {
            println!("  (source gone before \"completed\" was read: {e}; exit record {exit:?})");
        }
    }

    // Integrity: the guest keeps running and verifies on the side that owns it.
    let integrity = if converged {
        check_guest(
            &mut dst_ctl,
            &dst_cfg.debugcon_log,
            "destination after the migration",
        )
    } else if phase == "rolled-back" {
        check_guest(
            &mut src_ctl,
            &src_cfg.debugcon_log,
            "source after the roll-back",
        )
    } else {
        Err(format!("no side owns the VM (phase {phase:?})"))
    };
    let integrity_ok = match integrity {
        Ok(()) => true,
        Err(e) => {
            fail(
                failures,
                format!("integrity: {e} (written before: {})", before.pages_written),
            );
            false
        }
    };
    for (ctl, proc) in [(&mut dst_ctl, &mut dst), (&mut src_ctl, &mut src)] {
        if proc.exited().is_none() {
            let _ = ctl.call(&Request::Stop {
                force: true,
                timeout_ms: 0,
            });
            proc.wait_exit(Duration::from_secs(2));
        }
    }
    Outcome {
        total_ms,
        downtime_ms,
        wire_mib: last.wire_bytes as f64 / MIB,
        converged,
        integrity_ok: Some(integrity_ok),
    }
}

// ---------------------------------------------------------------------------------------------
// QEMU

/// A QMP connection (capabilities negotiated).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, proc: &mut Proc) -> Qmp {
        let t0 = Instant::now();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            if let Some(s) = proc.exited() {
                panic!("{} exited ({s}) before its QMP socket came up", proc.what);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{}: no QMP socket",
                proc.what
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting).expect("QMP greeting");
        assert!(greeting.contains("QMP"), "not a QMP greeting: {greeting}");
        qmp.cmd("qmp_capabilities", None).expect("qmp_capabilities");
        qmp
    }

    fn cmd(&mut self, execute: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut req = json!({ "execute": execute });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&req).unwrap();
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| format!("{execute}: {e}"))?;
        loop {
            let mut answer = String::new();
            match self.reader.read_line(&mut answer) {
                Ok(0) => return Err(format!("{execute}: QMP closed")),
                Ok(_) => {}
                Err(e) => return Err(format!("{execute}: {e}")),
            }
            let v: Value =
                serde_json::from_str(&answer).map_err(|e| format!("{execute}: {e}: {answer}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{execute}: {e}"));
            }
            // An event: skip it.
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn qemu_vm(dir: &Path, name: &str, case: &Case, incoming: bool) -> Proc {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "pc",
        "-cpu",
        "host",
        "-enable-kvm",
        "-m",
        &case.memory_mib.to_string(),
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none"])
    .arg("-kernel")
    .arg(novacron_testguest::guest_elf_path())
    .args(["-append", &case.cmdline()])
    .arg("-debugcon")
    .arg(format!(
        "file:{}",
        dir.join(format!("{name}.debugcon.log")).display()
    ))
    .arg("-serial")
    .arg(format!(
        "file:{}",
        dir.join(format!("{name}.console.log")).display()
    ))
    .arg("-qmp")
    .arg(format!(
        "unix:{},server,nowait",
        dir.join(format!("{name}.qmp")).display()
    ));
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    cmd.stdout(Stdio::null()).stderr(
        std::fs::File::create(dir.join(format!("{name}.stderr"))).expect("create qemu stderr"),
    );
    Proc::spawn(&mut cmd, &format!("qemu {name}"))
}

fn qemu(case: &Case, tuned: bool, failures: &mut Vec<String>) -> Outcome {
    let tool = if tuned {
        Tool::QemuTuned
    } else {
        Tool::QemuDefault
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let fail = |failures: &mut Vec<String>, msg: String| {
        let msg = format!(
            "{} {}: {msg}\n  source stderr: {}\n  destination stderr: {}",
            tool.name(),
            case.name,
            tail(&dir.path().join("src.stderr"), 4),
            tail(&dir.path().join("dst.stderr"), 4)
        );
        println!("  FAILURE {msg}");
        failures.push(msg);
    };
    let mut src = qemu_vm(dir.path(), "src", case, false);
    let mut dst = qemu_vm(dir.path(), "dst", case, true);

    // SeaBIOS is emulated and slow here; the guest then clears its working set.
    let src_log = dir.path().join("src.debugcon.log");
    let ready_timeout = Duration::from_secs(60 + 15 * (case.memory_mib / 1024));
    let t0 = Instant::now();
    while !file_contains(&src_log, "novacron-guest: ready") {
        if let Some(s) = src.exited() {
            fail(
                failures,
                format!("source exited ({s}) before the guest was ready"),
            );
            return Outcome::failed();
        }
        if t0.elapsed() > ready_timeout {
            fail(
                failures,
                format!(
                    "guest not ready within {ready_timeout:?}: {}",
                    tail(&src_log, 2)
                ),
            );
            return Outcome::failed();
        }
        std::thread::sleep(POLL);
    }
    let ready_after = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));

    let mut sq = Qmp::connect(&dir.path().join("src.qmp"), &mut src);
    let mut dq = Qmp::connect(&dir.path().join("dst.qmp"), &mut dst);
    let setup = |q: &mut Qmp, source: bool| -> Result<(), String> {
        if !tuned {
            return Ok(());
        }
        q.cmd(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "multifd", "state": true },
                { "capability": "xbzrle", "state": false },
            ]})),
        )?;
        let mut params = json!({ "multifd-channels": 4 });
        if source {
            params["max-bandwidth"] = json!(10_000_000_000u64);
            params["downtime-limit"] = json!(50);
        }
        q.cmd("migrate-set-parameters", Some(params))?;
        Ok(())
    };
    if let Err(e) = setup(&mut sq, true).and_then(|()| setup(&mut dq, false)) {
        fail(failures, e);
        return Outcome::failed();
    }
    if let Ok(p) = sq.cmd("query-migrate-parameters", None) {
        println!(
            "  {}: guest ready after {:.1} s; max-bandwidth {} B/s, downtime-limit {} ms, multifd-channels {}",
            tool.name(),
            ready_after.as_secs_f64(),
            p["max-bandwidth"],
            p["downtime-limit"],
            p["multifd-channels"]
        );
    }
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    // The shaped link: the source connects to the relay, which connects to the destination.
    let relay = if case.shaped {
        match TcpRelay::start(([127, 0, 0, 1], port).into(), Shape::GBIT_20MS_RTT) {
            Ok(r) => {
                println!(
                    "  {}: through the TCP relay {} -> 127.0.0.1:{port} ({})",
                    tool.name(),
                    r.addr(),
                    Shape::GBIT_20MS_RTT
                );
                Some(r)
            }
            Err(e) => {
                fail(failures, format!("starting the TCP relay: {e}"));
                return Outcome::failed();
            }
        }
    } else {
        None
    };
    let src_uri = relay
        .as_ref()
        .map_or(uri.clone(), |r| format!("tcp:{}", r.addr()));
    if let Err(e) = dq
        .cmd("migrate-incoming", Some(json!({ "uri": uri })))
        .and_then(|_| sq.cmd("migrate", Some(json!({ "uri": src_uri }))))
    {
        fail(failures, e);
        return Outcome::failed();
    }
    let t0 = Instant::now();
    let mut cancelled = false;
    let mut last_transferred = f64::NAN;
    let mut max_dirty_rate = 0f64;
    let last = loop {
        let info = match sq.cmd("query-migrate", None) {
            Ok(v) => v,
            Err(e) => {
                fail(failures, e);
                return Outcome::failed();
            }
        };
        if let Some(t) = info["ram"]["transferred"].as_f64() {
            last_transferred = t;
        }
        if let Some(r) = info["ram"]["dirty-pages-rate"].as_f64() {
            max_dirty_rate = max_dirty_rate.max(r);
        }
        let status = info["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break info;
        }
        let elapsed = t0.elapsed();
        if !cancelled && elapsed > Duration::from_secs(TIME_LIMIT_S) {
            if let Err(e) = sq.cmd("migrate_cancel", None) {
                fail(failures, e);
            }
            cancelled = true;
        }
        if elapsed > Duration::from_secs(TIME_LIMIT_S + 60) {
            fail(
                failures,
                format!("still {status:?} after {elapsed:?}: {info}"),
            );
            return Outcome::failed();
        }
        std::thread::sleep(POLL);
    };
    let status = last["status"].as_str().unwrap_or("");
    // A cancelled migration's answer has no ram section: the last count seen is the result.
    let transferred = last["ram"]["transferred"]
        .as_f64()
        .unwrap_or(last_transferred);
    let outcome = if status == "completed" {
        // The destination may still be loading (multifd) when the source reports completed.
        let t1 = Instant::now();
        let mut dst_state = Value::Null;
        while t1.elapsed() < Duration::from_secs(10) {
            dst_state = dq.cmd("query-status", None).unwrap_or_default();
            if dst_state["status"] == "running" {
                break;
            }
            std::thread::sleep(POLL);
        }
        if dst_state["status"] != "running" {
            fail(
                failures,
                format!("destination is not running after the migration: {dst_state}"),
            );
        }
        Outcome {
            total_ms: last["total-time"].as_f64().unwrap_or(f64::NAN),
            downtime_ms: last["downtime"].as_f64().unwrap_or(f64::NAN),
            wire_mib: transferred / MIB,
            converged: true,
            integrity_ok: None,
        }
    } else {
        if status == "failed" {
            fail(failures, format!("migration failed: {last}"));
        }
        Outcome {
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            downtime_ms: f64::NAN,
            wire_mib: transferred / MIB,
            converged: false,
            integrity_ok: None,
        }
    };
    println!(
        "  {}: status {status:?}, total {:.1} ms, downtime {:.2} ms, transferred {:.1} MiB, \
         dirty-sync-count {}, highest dirty-pages-rate {max_dirty_rate} pages/s",
        tool.name(),
        outcome.total_ms,
        outcome.downtime_ms,
        outcome.wire_mib,
        last["ram"]["dirty-sync-count"],
    );
    if let Some(r) = &relay {
        println!("  {}: relay {}", tool.name(), r.stats());
    }
    let _ = sq.cmd("quit", None);
    let _ = dq.cmd("quit", None);
    src.wait_exit(Duration::from_secs(2));
    dst.wait_exit(Duration::from_secs(2));
    outcome
}

// ---------------------------------------------------------------------------------------------

fn records(case: &Case, nc: &Outcome, reference: Tool, q: &Outcome) -> Vec<Record> {
    let r = reference.name();
    vec![
        Record::num(
            &case.name,
            "total_time",
            "ms",
            nc.total_ms,
            Some((r, q.total_ms)),
        ),
        Record::num(
            &case.name,
            "downtime",
            "ms",
            nc.downtime_ms,
            Some((r, q.downtime_ms)),
        ),
        Record::num(
            &case.name,
            "wire_bytes",
            "MiB",
            nc.wire_mib,
            Some((r, q.wire_mib)),
        ),
        Record::flag(
            &case.name,
            "converged",
            nc.converged,
            Some((r, q.converged)),
        ),
    ]
}

fn main() {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("the migration benchmark needs read-write /dev/kvm");
    // NOVACRON_BENCH_AGENT: an already built agent binary (for when the tree does not build).
    let agent = match std::env::var_os("NOVACRON_BENCH_AGENT") {
        Some(path) => {
            println!("using the agent binary {path:?} (NOVACRON_BENCH_AGENT)");
            PathBuf::from(path)
        }
        None => release_binary("novacron-agent", "novacron-agent"),
    };
    let cluster = tempfile::tempdir().expect("tempdir");
    let certs: PathBuf = cluster.path().join("certs");
    let dir = ClusterDir::new(&certs);
    dir.init("bench").expect("cluster CA");
    dir.issue("alpha").expect("alpha certificate");
    dir.issue("beta").expect("beta certificate");

    let four_gib = std::env::var("NOVACRON_BENCH_4GIB").as_deref() != Ok("0");
    let mut cases: Vec<Case> = [1, 2000, 20000, 100_000]
        .into_iter()
        .map(|r| Case::new(1024, r))
        .collect();
    if four_gib {
        cases.extend([1, 20000].into_iter().map(|r| Case::new(4096, r)));
    }
    match std::env::var("NOVACRON_BENCH_SHAPED").as_deref() {
        Ok("0") => {}
        Ok("all") => {
            cases.extend(
                [1, 2000, 20000, 100_000]
                    .into_iter()
                    .map(|r| Case::shaped(1024, r)),
            );
            if four_gib {
                cases.extend([1, 20000].into_iter().map(|r| Case::shaped(4096, r)));
            }
        }
        _ => cases.extend([1, 2000, 20000].into_iter().map(|r| Case::shaped(1024, r))),
    }
    if let Ok(only) = std::env::var("NOVACRON_BENCH_CASES") {
        let only: Vec<&str> = only.split(',').map(str::trim).collect();
        cases.retain(|c| only.contains(&c.name.as_str()));
    }

    let mut all = Vec::new();
    let mut integrity = Vec::new();
    let mut failures = Vec::new();
    let mut novacron_failed = false;
    for (i, case) in cases.iter().enumerate() {
        println!("case {} (cmdline {:?})", case.name, case.cmdline());
        let mut order = [Tool::NovaCron, Tool::QemuDefault, Tool::QemuTuned];
        if i % 2 == 1 {
            order.reverse();
        }
        let (mut nc, mut qd, mut qt) = (None, None, None);
        for tool in order {
            let started = Instant::now();
            let out = match tool {
                Tool::NovaCron => {
                    let o = novacron(&agent, &certs, case, &mut failures);
                    novacron_failed |= !o.converged || o.integrity_ok != Some(true);
                    nc = Some(o.clone());
                    o
                }
                Tool::QemuDefault => {
                    let o = qemu(case, false, &mut failures);
                    qd = Some(o.clone());
                    o
                }
                Tool::QemuTuned => {
                    let o = qemu(case, true, &mut failures);
                    qt = Some(o.clone());
                    o
                }
            };
            println!(
                "  -> {}: converged {}, total {:.1} ms, downtime {:.2} ms, wire {:.1} MiB{} \
                 (run took {:.1} s)",
                tool.name(),
                out.converged,
                out.total_ms,
                out.downtime_ms,
                out.wire_mib,
                out.integrity_ok
                    .map(|ok| format!(", integrity_ok {ok}"))
                    .unwrap_or_default(),
                started.elapsed().as_secs_f64()
            );
        }
        let (nc, qd, qt) = (nc.unwrap(), qd.unwrap(), qt.unwrap());
        all.extend(records(case, &nc, Tool::QemuDefault, &qd));
        all.extend(records(case, &nc, Tool::QemuTuned, &qt));
        integrity.push(Record::flag(
            &case.name,
            "integrity_ok",
            nc.integrity_ok == Some(true),
            None,
        ));
    }
    all.extend(integrity);
    report("migration", &all);
    if cases.iter().any(|c| c.shaped) {
        println!(
            "\nshaped-* cases: through a user-space relay ({}); QEMU's TCP is split at the \
             relay, so its slow start does not see the 20 ms",
            Shape::GBIT_20MS_RTT
        );
    }
    if !failures.is_empty() {
        println!("\nFAILURES ({}):", failures.len());
        for f in &failures {
            println!("- {f}");
        }
    }
    if novacron_failed {
        eprintln!("a NovaCron migration failed or lost integrity (see above)");
        std::process::exit(1);
    }
}
