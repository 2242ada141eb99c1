//! Bad input never panics and always yields a score in [0, 1]: NaN and infinite values, gaps
//! in time, constant series, out-of-order and duplicate timestamps, series shorter than the
//! model's window.

use novacron_anomaly::detector::{DetectorConfig, SeriesState};
use novacron_anomaly::lstm::{LstmConfig, LstmModel};
use novacron_anomaly::node::{Detector, NodeDetector, Schedule};
use proptest::prelude::*;

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1e3f64..1e3,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(1e300),
        1 => Just(-1e300),
        1 => Just(f64::MIN_POSITIVE),
        2 => Just(7.0),
    ]
}

fn step() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => Just(60i64),
        1 => Just(0i64),
        1 => -600i64..0,
        1 => 1i64..100_000,
        1 => Just(i64::MAX / 4),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_input_scores_in_unit_interval(records in prop::collection::vec((step(), value()), 0..400)) {
        let trained = {
            let mut m = LstmModel::new(LstmConfig { steps: 2, ..Default::default() }, 1).unwrap();
            m.train(&[(0..40).map(|i| (i % 5) as f32 / 5.0).collect()]).unwrap();
            m.fast().unwrap()
        };
        let mut plain = SeriesState::new(DetectorConfig::default());
        let mut with_model = SeriesState::new(DetectorConfig::default());
        let mut node = NodeDetector::new(DetectorConfig::default());
        node.set_model(trained.clone());
        let mut ts = 0i64;
        for (dt, v) in records {
            ts = ts.saturating_add(dt);
            for s in [
                plain.push(ts, v, None),
                with_model.push(ts, v, Some(&trained)),
                node.push("vm/cpu", ts, v),
            ] {
                prop_assert!(s.is_finite() && (0.0..=1.0).contains(&s), "score {s}");
            }
            for f in with_model.forecast(3, Some(&trained)) {
                prop_assert!(!f.is_nan());
            }
        }
        if let Some(f) = node.forecast_next_hour("vm/cpu") {
            prop_assert!(!f.mean.is_nan());
        }
    }
}

#[test]
fn self_training_detector_survives_bad_input_across_retraining() {
    let sched = Schedule {
        first: 20,
        every: 30,
    };
    let lstm = LstmConfig {
        steps: 3,
        ..Default::default()
    };
    let mut d = Detector::new(DetectorConfig::default(), lstm, sched).unwrap();
    let mut ts = 0;
    for i in 0..200i64 {
        ts += if i % 50 == 0 { 86_400 } else { 60 };
        let v = match (i + 5) % 17 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => 1e300,
            _ => (i % 9) as f64,
        };
        let s = d.push(ts, v).unwrap();
        assert!((0.0..=1.0).contains(&s), "record {i}: {s}");
        // A stale record after each one (older than any accepted record): rejected, score 0.
        assert_eq!(d.push(ts - 200_000, 1.0).unwrap(), 0.0);
    }
    let c = d.state().counters();
    assert_eq!(c.out_of_order, 200);
    assert!(c.non_finite >= 20);
    assert_eq!(c.gaps, 3);
    assert!(d.trainings() >= 5);
    let f = d.forecast_next_hour();
    assert!(f.iter().all(|v| v.is_finite()), "{f:?}");
}

#[test]
fn series_shorter_than_the_window_is_scored_and_forecast() {
    let mut d = Detector::new(
        DetectorConfig::default(),
        LstmConfig::default(),
        Schedule { first: 3, every: 2 },
    )
    .unwrap();
    for i in 0..5 {
        let s = d.push(i * 60, i as f64).unwrap();
        assert!((0.0..=1.0).contains(&s));
    }
    // Too short to give one training window: no training ran, forecasts are persistence.
    assert_eq!(d.trainings(), 0);
    assert_eq!(d.forecast_next_hour(), vec![4.0; 60]);
}

#[test]
fn constant_series_never_flags() {
    let mut d = Detector::new(
        DetectorConfig::default(),
        LstmConfig {
            steps: 5,
            ..Default::default()
        },
        Schedule::default(),
    )
    .unwrap();
    for i in 0..3000 {
        assert_eq!(d.push(i * 60, 42.0).unwrap(), 0.0, "record {i}");
    }
}
