//! Runs the static Linux build of the workload natively (iopl failing is expected here)
//! and checks its reports, and its memory through a dump, against `abi`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{check_stop_run, seq_checksum};
use novacron_testguest::{abi, linux_workload_path};

fn run(args: &[&str]) -> String {
    let out = Command::new(linux_workload_path())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", linux_workload_path().display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "workload {args:?} exited with {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn seq_run_verifies_and_memory_matches_abi() {
    let dump = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-workload-seq.dump");
    let _ = std::fs::remove_file(&dump);
    let seed = 12345u64;
    let stop = 2500u64;
    let out = run(&[
        "nc.mem=4",
        &format!("nc.stop_after_pages={stop}"),
        &format!("nc.seed={seed}"),
        "nc.log_ms=0",
        &format!("nc.dump={}", dump.display()),
    ]);
    let (ws_pages, checksum) = check_stop_run(&out, stop);
    assert_eq!(ws_pages, 4 * 1024 * 1024 / abi::PAGE_SIZE as u64);
    assert_eq!(checksum, seq_checksum(seed, ws_pages, stop));

    let mem = std::fs::read(&dump).unwrap();
    assert_eq!(mem.len() as u64, ws_pages * abi::PAGE_SIZE as u64);
    let mut sum = 0u64;
    for (i, page) in mem.chunks(abi::PAGE_SIZE).enumerate() {
        let i = i as u64;
        let g = abi::check_page(seed, i, page)
            .unwrap_or_else(|| panic!("page {i} does not match the abi pattern"));
        let want = stop / ws_pages + u64::from(i < stop % ws_pages);
        assert_eq!(g, want, "generation of page {i}");
        sum = sum.wrapping_add(abi::checksum_term_seeded(seed, i, g));
    }
    assert_eq!(sum, checksum);
    let _ = std::fs::remove_file(&dump);
}

#[test]
fn default_seed_matches_unseeded_helpers() {
    let out = run(&["nc.mem=2", "nc.stop_after_pages=700", "nc.log_ms=0"]);
    let (ws_pages, checksum) = check_stop_run(&out, 700);
    let want = (0..ws_pages)
        .map(|i| abi::checksum_term(i, 700 / ws_pages + u64::from(i < 700 % ws_pages)))
        .fold(0u64, u64::wrapping_add);
    assert_eq!(checksum, want);
}

#[test]
fn random_and_hot_patterns_verify() {
    for pattern in ["random", "hot"] {
        let out = run(&[
            "nc.mem=4 nc.hot=16",
            &format!("nc.pattern={pattern}"),
            "nc.stop_after_pages=30000",
            "nc.seed=99",
        ]);
        let ready = common::line(&out, "novacron-guest: ready ");
        assert_eq!(common::field(ready, "pattern"), Some(pattern));
        check_stop_run(&out, 30000);
    }
}

#[test]
fn rate_limit_is_respected() {
    let start = Instant::now();
    let out = run(&[
        "nc.mem=2",
        "nc.rate=10000",
        "nc.stop_after_pages=3000",
        "nc.log_ms=0",
    ]);
    let took = start.elapsed();
    check_stop_run(&out, 3000);
    let ready = common::line(&out, "novacron-guest: ready ");
    assert_eq!(common::field(ready, "rate"), Some("10000"));
    // 3000 pages at 10000/s take 0.3 s (TSC calibration adds 10 ms).
    assert!(took >= Duration::from_millis(280), "too fast: {took:?}");
    assert!(took < Duration::from_secs(5), "too slow: {took:?}");
}
