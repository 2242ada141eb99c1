//! Anomaly detection cost and quality: inference per record per series (one core), one
//! retraining on 10,000 records, memory for 1,000 series, and the NAB scores of the shipped
//! subset (full detector, LSTM part alone, without the LSTM).

use std::time::Instant;

use novacron_anomaly::detector::{DetectorConfig, Parts};
use novacron_anomaly::eval::{evaluate, RunConfig};
use novacron_anomaly::lstm::{LstmConfig, LstmModel};
use novacron_anomaly::nab::Corpus;
use novacron_anomaly::node::NodeDetector;
use novacron_benches::{report, workspace_root, Record};

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm resident field");
    pages * 4
}

fn value(series: usize, i: usize) -> f64 {
    let s = series as f64;
    50.0 + 30.0 * ((i as f64) * 0.05 + s).sin() + ((i * 7919 + series * 104_729) % 97) as f64 / 10.0
}

fn main() {
    let mut records = Vec::new();

    // A model trained on a few series, then 1,000 series fed round-robin.
    let cfg = DetectorConfig::default();
    let lstm = LstmConfig::default();
    let rss0 = rss_kib();
    let mut node = NodeDetector::new(cfg);
    let warm = cfg.history;
    for i in 0..warm {
        for s in 0..1000 {
            node.push(&format!("vm{s}/cpu"), (i * 60) as i64, value(s, i));
        }
    }
    let mut model = LstmModel::new(lstm, 1).expect("model");
    let set = node.training_set(10_000);
    let total: usize = set.iter().map(|s| s.len()).sum();
    let t = Instant::now();
    model.train(&set).expect("train");
    let train_s = t.elapsed().as_secs_f64();
    node.set_model(model.fast().expect("weights"));
    let rss1 = rss_kib();
    let heap = node.heap_bytes();
    records.push(Record::num(
        &format!("retrain on {total} records"),
        "retrain_time",
        "s",
        train_s,
        Some(("target", 10.0)),
    ));
    records.push(Record::num(
        "1000 series (full history)",
        "state_bytes",
        "MiB",
        heap as f64 / 1048576.0,
        Some(("target", 64.0)),
    ));
    records.push(Record::num(
        "1000 series (full history)",
        "rss_growth",
        "MiB",
        rss1.saturating_sub(rss0) as f64 / 1024.0,
        Some(("target", 64.0)),
    ));

    // Inference: every series, 20 more records each, one thread.
    let names: Vec<String> = (0..1000).map(|s| format!("vm{s}/cpu")).collect();
    let rounds = 20;
    let t = Instant::now();
    let mut acc = 0.0;
    for r in 0..rounds {
        let i = warm + r;
        for (s, n) in names.iter().enumerate() {
            acc += node.push(n, (i * 60) as i64, value(s, i));
        }
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / (rounds * 1000) as f64;
    assert!(acc.is_finite());
    records.push(Record::num(
        "1000 series, model loaded",
        "inference_per_record",
        "us",
        per,
        Some(("target", 50.0)),
    ));
    let t = Instant::now();
    let f = node.forecast_next_hour("vm0/cpu").expect("forecast");
    records.push(Record::num(
        "next-hour forecast (60 steps)",
        "forecast_time",
        "us",
        t.elapsed().as_secs_f64() * 1e6,
        None,
    ));
    assert!(f.mean.is_finite());

    // NAB on the shipped subset.
    let root = workspace_root().join("../shared/datasets/nab");
    let corpus = Corpus::load(&root).unwrap_or_else(|e| panic!("NAB subset: {e}"));
    let published = [
        ("standard", 70.5),
        ("reward_low_FP_rate", 62.6),
        ("reward_low_FN_rate", 75.2),
    ];
    for (name, parts) in [
        ("full", Parts::Full),
        ("lstm only", Parts::LstmOnly),
        ("without lstm", Parts::NoLstm),
    ] {
        let t = Instant::now();
        let ev = evaluate(&corpus, &RunConfig::default().with_parts(parts), 2, None)
            .unwrap_or_else(|e| panic!("NAB run: {e}"));
        let secs = t.elapsed().as_secs_f64();
        for p in &ev.profiles {
            let reference = published
                .iter()
                .find(|r| r.0 == p.profile)
                .map(|r| ("numenta HTM (full NAB)", r.1));
            records.push(Record::num(
                &format!("NAB subset, {name}"),
                &format!("nab_{}", p.profile),
                "score",
                p.normalised,
                reference,
            ));
        }
        records.push(Record::num(
            &format!("NAB subset, {name}"),
            "nab_run_time",
            "s",
            secs,
            None,
        ));
    }
    report("anomaly", &records);
}
