//! The VMM against the real /dev/kvm, in this process: the test guest boots, writes, verifies;
//! pause stops it; state saved from one VM restores into another with memory intact; dirty
//! logging sees the guest's writes and the VMM's own.

use std::time::Duration;

use novacron_testguest::abi;
use novacron_tests::{
    host_checksum, require_kvm, test_guest_config, wait_file_contains, RunningVm,
};
use novacron_vmm::config::DirtyTracking;
use novacron_vmm::control::ExitReason;

const BOOT: Duration = Duration::from_secs(60);

#[test]
fn test_guest_boots_writes_and_verifies_its_memory() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(
        test_guest_config(dir.path(), "boot", 64, "nc.mem=16 nc.log_ms=100"),
        false,
    );
    let s = vm.wait_status("the guest to write 20000 pages", BOOT, |s| {
        s.pages_written >= 20_000
    });
    assert_eq!(s.ws_pages, 16 * 256, "nc.mem=16 gives a 16 MiB working set");

    vm.vm.post_guest_command(abi::CMD_VERIFY, 0).unwrap();
    let after = vm.wait_status("a verification", BOOT, |v| v.verify_count >= 1);
    assert_eq!(
        after.verify_bad_pages, 0,
        "guest found corrupted pages: {after:?}"
    );

    // Independently of the guest: pause it and check every page and the checksum from the host.
    vm.vm.pause().unwrap();
    let paused = vm.vm.guest_status().unwrap().unwrap();
    let (sum, bad) = host_checksum(&vm.vm, &paused);
    assert_eq!(
        bad, 0,
        "host found pages whose content does not match their generation"
    );
    assert_eq!(
        sum, paused.checksum,
        "host checksum differs from the guest's running checksum"
    );
    vm.vm.resume().unwrap();

    let debugcon = wait_file_contains(
        &dir.path().join("boot.debugcon.log"),
        "novacron-guest: verify ok",
        BOOT,
    );
    assert!(
        debugcon.contains("novacron-guest: ready"),
        "debug console: {debugcon}"
    );
    assert!(!debugcon.contains("FAIL"), "debug console: {debugcon}");
    wait_file_contains(
        &dir.path().join("boot.console.log"),
        "novacron-guest: verify ok",
        BOOT,
    );
    vm.shutdown();
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(
        test_guest_config(dir.path(), "pause", 64, "nc.mem=8"),
        false,
    );
    vm.wait_status("progress", BOOT, |s| s.pages_written > 1000);
    vm.vm.pause().unwrap();
    assert_eq!(vm.vm.state(), novacron_vmm::control::RunState::Paused);
    let a = vm.vm.guest_status().unwrap().unwrap().pages_written;
    std::thread::sleep(Duration::from_millis(300));
    let b = vm.vm.guest_status().unwrap().unwrap().pages_written;
    assert_eq!(a, b, "a paused guest must not write");
    vm.vm.resume().unwrap();
    vm.wait_status("progress after resume", BOOT, |s| {
        s.pages_written > b + 1000
    });
    vm.shutdown();
}

#[test]
fn guest_rate_and_poweroff_commands_take_effect() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(
        test_guest_config(dir.path(), "cmd", 64, "nc.mem=8 nc.rate=1000"),
        false,
    );
    let s = vm.wait_status("ready", BOOT, |s| s.seq > 0);
    assert_eq!(s.rate, 1000);
    let seq = vm.vm.post_guest_command(abi::CMD_SET_RATE, 5000).unwrap();
    let s = vm.wait_status("the rate command's ack", BOOT, |s| s.cmd_ack >= seq);
    assert_eq!(s.rate, 5000);
    for (cmd, arg) in [
        (abi::CMD_SET_PATTERN, u64::from(abi::PATTERN_HOT)),
        (abi::CMD_SET_HOT_PAGES, 32),
        (abi::CMD_SET_EXIT_HEAVY, 3),
    ] {
        let seq = vm.vm.post_guest_command(cmd, arg).unwrap();
        vm.wait_status("a command's ack", BOOT, |s| s.cmd_ack >= seq);
    }
    let s = vm.wait_status("exit-heavy NOP writes", BOOT, |s| s.nop_outs >= 300);
    assert_eq!(
        (s.pattern, s.hot_pages, s.exit_heavy),
        (abi::PATTERN_HOT, 32, 3)
    );
    vm.vm.stop(false, Duration::from_secs(10));
    let end = vm.vm.wait_end();
    assert_eq!(
        end.reason,
        ExitReason::GuestPoweroff,
        "graceful stop is a guest power-off: {end:?}"
    );
    vm.shutdown();
}

#[test]
fn saved_state_restores_into_a_new_vm_with_memory_intact() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let config = test_guest_config(dir.path(), "src", 64, "nc.mem=16 nc.pattern=random");
    let src = RunningVm::start(config.clone(), false);
    src.wait_status("progress", BOOT, |s| s.pages_written > 50_000);
    src.vm.pause().unwrap();
    let before = src.vm.guest_status().unwrap().unwrap();
    let snap = dir.path().join("snap");
    novacron_vmm::state::save(&src.vm, &snap).unwrap();
    src.shutdown();

    let dst = RunningVm::start(config, true);
    assert_eq!(dst.vm.state(), novacron_vmm::control::RunState::Incoming);
    novacron_vmm::state::restore(&dst.vm, &snap).unwrap();
    let restored = dst
        .vm
        .guest_status()
        .unwrap()
        .expect("status page address restored");
    assert_eq!(restored, before, "restored status page differs");
    let (sum, bad) = host_checksum(&dst.vm, &restored);
    assert_eq!(
        (sum, bad),
        (before.checksum, 0),
        "restored memory does not match the checksum"
    );
    dst.vm.resume().unwrap();
    dst.wait_status("progress after restore", BOOT, |s| {
        s.pages_written > before.pages_written + 10_000
    });
    let seq = dst.vm.post_guest_command(abi::CMD_VERIFY, 0).unwrap();
    let v = dst.wait_status("verify after restore", BOOT, |s| s.cmd_ack >= seq);
    assert_eq!(v.verify_bad_pages, 0);
    dst.shutdown();
}

#[test]
fn corrupted_state_is_refused_and_changes_nothing() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let config = test_guest_config(dir.path(), "c", 32, "nc.mem=4");
    let src = RunningVm::start(config.clone(), false);
    src.wait_status("progress", BOOT, |s| s.pages_written > 100);
    src.vm.pause().unwrap();
    let snap = dir.path().join("snap");
    novacron_vmm::state::save(&src.vm, &snap).unwrap();
    src.shutdown();
    let state = snap.join("state.bin");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&state, bytes).unwrap();
    let dst = RunningVm::start(config, true);
    let err = novacron_vmm::state::restore(&dst.vm, &snap)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum"), "{err}");
    assert_eq!(
        dst.vm.state(),
        novacron_vmm::control::RunState::Incoming,
        "a refused restore leaves the VM waiting"
    );
    dst.shutdown();
}

/// Dirty tracking with `mode` counts the guest's writes and the VMM's own, and nothing else.
fn dirty_tracking_counts_guest_and_vmm_writes(mode: DirtyTracking, ring_entries: u32) {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_guest_config(
        dir.path(),
        "dirty",
        64,
        "nc.mem=16 nc.rate=0 nc.pattern=hot nc.hot=64",
    );
    config.dirty_tracking = mode;
    config.dirty_ring_entries = ring_entries;
    let vm = RunningVm::start(config, false);
    vm.wait_status("progress", BOOT, |s| s.pages_written > 1000);
    assert!(
        vm.vm.fetch_dirty().is_err(),
        "fetching before enabling is refused"
    );
    vm.vm.set_dirty_log(true).unwrap();
    vm.vm.fetch_dirty().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vm.vm.pause().unwrap();
    let dirty = vm.vm.fetch_dirty().unwrap();
    // The hot set (64 pages) plus the status page and stack at least; far from all of RAM.
    assert!(dirty >= 64, "dirty pages {dirty}");
    assert!(
        dirty < 64 * 256 / 4,
        "dirty pages {dirty} for a 64-page hot set"
    );
    // Paused: nothing dirties memory but the VMM itself, whose writes are counted too.
    assert_eq!(vm.vm.fetch_dirty().unwrap(), 0);
    vm.vm.post_guest_command(abi::CMD_SET_RATE, 10).unwrap();
    assert_eq!(
        vm.vm.fetch_dirty().unwrap(),
        1,
        "the VMM's write into the status page is tracked"
    );
    vm.shutdown();
}

#[test]
fn dirty_log_counts_guest_and_vmm_writes() {
    dirty_tracking_counts_guest_and_vmm_writes(DirtyTracking::Log, 0);
}

#[test]
fn manual_protect_dirty_log_counts_guest_and_vmm_writes() {
    dirty_tracking_counts_guest_and_vmm_writes(DirtyTracking::ManualProtect, 0);
}

#[test]
fn dirty_ring_counts_guest_and_vmm_writes() {
    // A small ring, so that it fills many times between harvests.
    dirty_tracking_counts_guest_and_vmm_writes(DirtyTracking::Ring, 256);
}

#[test]
fn a_dirty_ring_holds_the_guest_to_its_dirty_rate_limit() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_guest_config(
        dir.path(),
        "limit",
        64,
        "nc.mem=32 nc.rate=0 nc.pattern=seq",
    );
    config.dirty_tracking = DirtyTracking::Ring;
    config.dirty_ring_entries = 256;
    let vm = RunningVm::start(config, false);
    vm.wait_status("progress", BOOT, |s| s.pages_written > 1000);
    vm.vm.set_dirty_log(true).unwrap();
    assert!(vm.vm.set_dirty_rate_limit(2000));
    // Let the limit take hold (the first ring-full exit starts the budget), then measure.
    std::thread::sleep(Duration::from_millis(300));
    let a = vm.vm.guest_status().unwrap().unwrap();
    let t = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let b = vm.vm.guest_status().unwrap().unwrap();
    let rate = (b.pages_written - a.pages_written) as f64 / t.elapsed().as_secs_f64();
    // An unlimited sequential writer dirties well over 10x this here; the limit allows 2,000
    // pages/s plus at most one ring of slack.
    assert!(
        rate < 2000.0 * 1.5 + 256.0,
        "guest wrote {rate:.0} pages/s under a 2,000 limit"
    );
    assert!(
        vm.vm
            .dirty_stats()
            .ring_full_exits
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Turning tracking off lifts the limit.
    vm.vm.set_dirty_log(false).unwrap();
    let c = vm.vm.guest_status().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let d = vm.vm.guest_status().unwrap().unwrap();
    assert!(d.pages_written - c.pages_written > 2000, "{c:?} {d:?}");
    vm.shutdown();
}

#[test]
fn a_bad_kernel_is_refused_with_a_clear_error() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let mut config = test_guest_config(dir.path(), "bad", 32, "");
    config.kernel = junk;
    let err = match novacron_vmm::vm::Vm::create(config, false) {
        Ok(_) => panic!("a junk kernel was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("junk") && err.contains("neither an ELF"),
        "{err}"
    );
}

#[test]
fn a_triple_fault_is_reported_with_registers() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(
        test_guest_config(dir.path(), "tf", 32, "nc.mem=4 nc.fault_after_pages=100"),
        false,
    );
    assert!(
        vm.vm.wait_end_timeout(BOOT),
        "the faulting guest did not end"
    );
    let end = vm.vm.wait_end();
    assert_eq!(end.reason, ExitReason::TripleFault, "{end:?}");
    assert!(
        end.detail.contains("rip=0x") && end.detail.contains("cr3="),
        "no registers: {end:?}"
    );
    vm.shutdown();
}

#[test]
fn a_guest_panic_is_reported_with_its_message() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = RunningVm::start(
        test_guest_config(dir.path(), "panic", 32, "nc.mem=4 nc.panic_after_pages=100"),
        false,
    );
    assert!(
        vm.vm.wait_end_timeout(BOOT),
        "the panicking guest did not end"
    );
    let end = vm.vm.wait_end();
    assert_eq!(end.reason, ExitReason::GuestPanic, "{end:?}");
    assert!(
        end.detail.contains("requested by nc.panic_after_pages"),
        "{end:?}"
    );
    vm.shutdown();
}
