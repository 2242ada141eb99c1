//! The detector on two NAB series (the whole subset runs in the CLI and the bench), and the
//! results files in NAB's format.

use std::path::PathBuf;

use novacron_anomaly::eval::{evaluate, RunConfig};
use novacron_anomaly::nab::Corpus;

fn nab_root() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/nab");
    assert!(
        p.join("labels/combined_windows.json").exists(),
        "NAB subset missing at {} (expected ../shared/datasets/nab beside the repository)",
        p.display()
    );
    p
}

#[test]
fn detects_the_anomalies_of_two_series_and_writes_results() {
    let mut corpus = Corpus::load(&nab_root()).unwrap();
    assert_eq!(corpus.series.len(), 44);
    corpus.series.retain(|s| {
        s.name == "artificialWithAnomaly/art_daily_jumpsup.csv"
            || s.name == "realAWSCloudwatch/ec2_cpu_utilization_53ea38.csv"
    });
    assert_eq!(corpus.series.len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let ev = evaluate(
        &corpus,
        &RunConfig::default(),
        2,
        Some((dir.path(), "novacron")),
    )
    .unwrap();
    let std = &ev.profiles[0];
    assert_eq!(std.profile, "standard");
    assert_eq!(std.windows, 3);
    assert_eq!(std.tp_windows, 3, "{std:?}");
    assert!(std.normalised > 85.0, "{std:?}");
    let f = dir
        .path()
        .join("novacron/artificialWithAnomaly/novacron_art_daily_jumpsup.csv");
    let text = std::fs::read_to_string(&f).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("timestamp,value,anomaly_score,label"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), corpus.series[0].values.len());
    assert!(rows.iter().any(|r| r.ends_with(",1")));
    let first: Vec<&str> = rows[0].split(',').collect();
    assert_eq!(first.len(), 4);
    assert_eq!(first[0], corpus.series[0].raw_timestamps[0]);
}
