//! Boots the guest ELF under `qemu-system-x86_64 -kernel` (the PVH 32-bit entry) with KVM
//! and checks its report lines on both consoles. Missing QEMU or /dev/kvm is a failure,
//! not a skip: this is the only end-to-end check of the boot path until the VMM exists.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{check_stop_run, seq_checksum};
use novacron_testguest::guest_elf_path;

const QEMU: &str = "qemu-system-x86_64";
/// SeaBIOS runs emulated first on this host (~6 s); leave plenty of room.
const TIMEOUT: Duration = Duration::from_secs(180);

fn require_qemu_and_kvm() {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(QEMU).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{QEMU} not found in PATH: install it (apt-get install qemu-system-x86) to run this test"
    );
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test needs KVM"
    );
}

struct Run {
    debugcon: String,
    serial: String,
}

fn boot(name: &str, mem_mib: u32, append: &str) -> Run {
    require_qemu_and_kvm();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dbg = dir.join(format!("qemu-{name}.debugcon.txt"));
    let serial = dir.join(format!("qemu-{name}.serial.txt"));
    let _ = std::fs::remove_file(&dbg);
    let _ = std::fs::remove_file(&serial);
    let mut child = Command::new(QEMU)
        .args(["-enable-kvm", "-machine", "pc", "-cpu", "host"])
        .args(["-m", &mem_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(guest_elf_path())
        .args(["-append", append])
        .arg("-debugcon")
        .arg(format!("file:{}", dbg.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{QEMU} did not exit within {TIMEOUT:?}; guest output so far:\n{}",
                std::fs::read_to_string(&dbg).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let run = Run {
        debugcon: std::fs::read_to_string(&dbg).unwrap_or_default(),
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
    };
    assert!(
        status.success(),
        "{QEMU} exited with {status}\nstderr:\n{}\ndebugcon:\n{}",
        String::from_utf8_lossy(&out.stderr),
        run.debugcon
    );
    run
}

/// The serial log starts with SeaBIOS output (and no newline before ours).
fn serial_guest_lines(serial: &str) -> String {
    // SeaBIOS writes to the UART first; the guest's lines start with its first one.
    let from = serial.find("novacron-guest: ").unwrap_or_else(|| {
        panic!("no guest line on the serial console:\n{serial}");
    });
    serial[from..].to_owned()
}

#[test]
fn qemu_seq_run_reports_and_verifies() {
    let stop = 20000;
    let run = boot(
        "seq",
        256,
        &format!("nc.stop_after_pages={stop} nc.log_ms=200"),
    );
    let (ws_pages, checksum) = check_stop_run(&run.debugcon, stop);
    let ready = common::line(&run.debugcon, "novacron-guest: ready ");
    assert!(
        ready.ends_with(" agent=0"),
        "QEMU has no agent device: {ready}"
    );
    assert_eq!(common::field(ready, "pattern"), Some("seq"));
    assert_eq!(checksum, seq_checksum(0, ws_pages, stop));
    assert_eq!(serial_guest_lines(&run.serial), run.debugcon);
}

#[test]
fn qemu_random_rate_exit_heavy_run_verifies() {
    let stop = 4000;
    let run = boot(
        "random",
        128,
        &format!(
            "nc.mem=32 nc.pattern=random nc.rate=20000 nc.exit_heavy=1 nc.seed=5 \
             nc.stop_after_pages={stop} nc.log_ms=0 unknown.key=1"
        ),
    );
    check_stop_run(&run.debugcon, stop);
    let ready = common::line(&run.debugcon, "novacron-guest: ready ");
    assert_eq!(common::field(ready, "ws_pages"), Some("8192"));
    assert_eq!(common::field(ready, "rate"), Some("20000"));
    assert_eq!(common::field(ready, "pattern"), Some("random"));
    assert_eq!(serial_guest_lines(&run.serial), run.debugcon);
}
