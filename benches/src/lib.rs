//! Shared parts of NovaCron's benchmarks: the record format every bench writes to
//! `target/novacron-bench/NAME.json`, the printed table, and locating the built binaries.

pub mod relay;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// One measured value, with the reference measured beside it in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// What ran (e.g. "test-guest first progress").
    pub case: String,
    /// What was measured (e.g. "time_to_first_progress").
    pub metric: String,
    /// Unit of `value`.
    pub unit: String,
    /// The value (a number, or a boolean such as converged).
    pub value: serde_json::Value,
    /// What ran beside it (e.g. "qemu"), if anything.
    pub reference: Option<String>,
    /// The reference's value in the same run.
    pub reference_value: Option<serde_json::Value>,
}

impl Record {
    /// A numeric record with an optional reference.
    pub fn num(
        case: &str,
        metric: &str,
        unit: &str,
        value: f64,
        reference: Option<(&str, f64)>,
    ) -> Record {
        Record {
            case: case.into(),
            metric: metric.into(),
            unit: unit.into(),
            value: serde_json::json!(round3(value)),
            reference: reference.map(|r| r.0.to_string()),
            reference_value: reference.map(|r| serde_json::json!(round3(r.1))),
        }
    }
}

impl Record {
    /// A boolean record (e.g. converged) with an optional reference.
    pub fn flag(case: &str, metric: &str, value: bool, reference: Option<(&str, bool)>) -> Record {
        Record {
            case: case.into(),
            metric: metric.into(),
            unit: "bool".into(),
            value: serde_json::json!(value),
            reference: reference.map(|r| r.0.to_string()),
            reference_value: reference.map(|r| serde_json::json!(r.1)),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// The workspace's target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Prints the records as a table and writes `target/novacron-bench/NAME.json`.
pub fn report(name: &str, records: &[Record]) {
    println!(
        "\n{:<34} {:<26} {:>12} {:<6} {:>12} {:<12} {:>7}",
        "case", "metric", "value", "unit", "reference", "ref. value", "ratio"
    );
    for r in records {
        let v = r.value.as_f64();
        let rv = r.reference_value.as_ref().and_then(|v| v.as_f64());
        let ratio = match (v, rv) {
            (Some(v), Some(rv)) if rv != 0.0 => format!("{:.3}", v / rv),
            _ => "-".into(),
        };
        println!(
            "{:<34} {:<26} {:>12} {:<6} {:>12} {:<12} {:>7}",
            r.case,
            r.metric,
            r.value.to_string(),
            r.unit,
            r.reference.clone().unwrap_or_else(|| "-".into()),
            r.reference_value
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            ratio
        );
    }
    let dir = target_dir().join("novacron-bench");
    std::fs::create_dir_all(&dir).expect("create target/novacron-bench");
    let path = dir.join(format!("{name}.json"));
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(records).expect("records serialize"),
    )
    .expect("write bench json");
    println!("\nwrote {}", path.display());
}

/// Builds `package` in release mode and returns the path of its binary `bin`.
pub fn release_binary(package: &str, bin: &str) -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "-p", package, "--bin", bin])
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "cargo build --release -p {package} failed"
    );
    target_dir().join("release").join(bin)
}

/// Resident memory of a process outside its largest mapping of at least `guest_bytes`
/// (the guest's RAM), in KiB, from /proc/PID/smaps.
pub fn rss_outside_guest_kib(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0u64;
    let mut guest = 0u64;
    let mut current_size = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut it = first.split('-');
            let start = u64::from_str_radix(it.next()?, 16).ok()?;
            let end = u64::from_str_radix(it.next()?, 16).ok()?;
            current_size = end - start;
        } else if first == "Rss:" {
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            total += kib;
            if current_size >= guest_bytes {
                guest = guest.max(kib);
            }
        }
    }
    Some(total - guest)
}

/// The etcd v3 KV client (`etcdserverpb.KV/Put` only): the coordinator benchmark's reference.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
