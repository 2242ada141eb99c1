//! On-node anomaly scoring and load forecasts over the sampler's series, with
//! `novacron-anomaly`: every derived series of every VM (and of the host) is fed, record by
//! record, to one [`NodeDetector`] sharing an LSTM that a low-priority [`Retrainer`] thread
//! retrains periodically on the node's own recent history (weights saved as safetensors and
//! restored at start).
//!
//! Records whose score is at least the threshold form [`AnomalyEvent`]s (consecutive flagged
//! records of one series merge into one event with its time window), kept in a bounded list
//! for the gRPC API.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use novacron_anomaly::detector::DetectorConfig;
use novacron_anomaly::lstm::LstmConfig;
use novacron_anomaly::node::{NodeDetector, Retrainer};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Events kept for the gRPC API (the oldest are dropped beyond this).
pub const MAX_EVENTS: usize = 1024;

/// The `[telemetry.anomaly]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Score the series at all. Default true.
    pub enabled: bool,
    /// Records of a series before its score distribution is trusted (scores are 0 until
    /// then). Default 300 (5 minutes at the default 1 s interval).
    pub warmup: usize,
    /// A record scoring at least this is anomalous (an event). Default 0.5.
    pub threshold: f64,
    /// Retrain the shared model every this many samples. Default 600.
    pub retrain_every: u64,
    /// Recompute the next-hour forecasts every this many samples. Default 60.
    pub forecast_every: u64,
    /// Where the model's weights are saved and restored from; empty (the default) means
    /// `anomaly.safetensors` in the agent's state directory.
    pub weights: Option<PathBuf>,
}

// The threshold is validated finite, so equality is reflexive.
impl Eq for AnomalyConfig {}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            enabled: true,
            warmup: 300,
            threshold: 0.5,
            retrain_every: 600,
            forecast_every: 60,
            weights: None,
        }
    }
}

impl AnomalyConfig {
    /// Checks values a schema cannot; returns (field, what is wrong and expected).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err((
                "telemetry.anomaly.threshold",
                format!("{}; expected a score in (0, 1]", self.threshold),
            ));
        }
        if !(10..=1_000_000).contains(&self.warmup) {
            return Err((
                "telemetry.anomaly.warmup",
                format!("{}; expected 10 to 1000000 records", self.warmup),
            ));
        }
        if self.retrain_every == 0 || self.forecast_every == 0 {
            return Err((
                "telemetry.anomaly.retrain_every/forecast_every",
                "0; expected at least 1 sample".into(),
            ));
        }
        Ok(())
    }

    /// The detector parameters: the global defaults with this warm-up.
    pub fn detector(&self) -> DetectorConfig {
        let mut d = DetectorConfig::default();
        d.lstm_likelihood.learning = self.warmup;
        d.stat_likelihood.learning = self.warmup;
        d.spatial_learning = self.warmup;
        d.local_window = d.local_window.min(self.warmup.max(10) * 4);
        d
    }
}

/// The latest score of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyScore {
    /// VM id, or [`crate::series::HOST`].
    pub scope: String,
    /// VM name (the scope for the host).
    pub name: String,
    /// Series name (as in the series store).
    pub series: String,
    /// Score in [0, 1].
    pub score: f64,
}

/// A next-hour forecast of one scope's CPU or memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    /// VM id, or [`crate::series::HOST`].
    pub scope: String,
    /// VM name (the scope for the host).
    pub name: String,
    /// The forecast series (e.g. `vcpu_cpu_ratio`).
    pub series: String,
    /// Mean over the next hour.
    pub mean: f64,
    /// Maximum over the next hour.
    pub max: f64,
}

/// Consecutive records of one series at or above the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyEvent {
    /// VM id, or [`crate::series::HOST`].
    pub scope: String,
    /// VM name.
    pub name: String,
    /// Series name.
    pub series: String,
    /// Highest score in the window.
    pub score: f64,
    /// First flagged record, unix ms.
    pub start_ms: u64,
    /// Last flagged record, unix ms.
    pub end_ms: u64,
    /// Flagged records.
    pub records: u64,
    /// Still going (the latest record of the series was flagged).
    pub open: bool,
}

/// The bounded event list shared with the API.
#[derive(Debug, Default)]
pub struct Events(Mutex<VecDeque<AnomalyEvent>>);

impl Events {
    /// Events whose score is at least `min_score`, oldest first, optionally of one scope.
    pub fn list(&self, scope: Option<&str>, min_score: f64) -> Vec<AnomalyEvent> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.score >= min_score && scope.is_none_or(|s| s == e.scope))
            .cloned()
            .collect()
    }

    fn record(&self, scope: &str, name: &str, series: &str, ts: u64, score: f64, flagged: bool) {
        let mut g = self.0.lock().unwrap();
        let open = g
            .iter_mut()
            .rev()
            .find(|e| e.open && e.scope == scope && e.series == series);
        match (open, flagged) {
            (Some(e), true) => {
                e.end_ms = ts;
                e.records += 1;
                e.score = e.score.max(score);
            }
            (Some(e), false) => e.open = false,
            (None, true) => {
                if g.len() == MAX_EVENTS {
                    g.pop_front();
                }
                g.push_back(AnomalyEvent {
                    scope: scope.into(),
                    name: name.into(),
                    series: series.into(),
                    score,
                    start_ms: ts,
                    end_ms: ts,
                    records: 1,
                    open: true,
                });
            }
            (None, false) => {}
        }
    }
}

/// The series forecast per VM and for the host: (scope kind, series).
const FORECAST_VM: [&str; 2] = ["vcpu_cpu_ratio", "memory_resident_bytes"];
const FORECAST_HOST: [&str; 2] = ["cpu_busy_ratio", "memory_available_bytes"];

/// The sampler's detector state.
pub(crate) struct Engine {
    cfg: AnomalyConfig,
    node: NodeDetector,
    retrainer: Option<Retrainer>,
    samples: u64,
    scores: BTreeMap<(String, String), (String, f64)>,
    forecasts: Vec<Forecast>,
}

impl Engine {
    /// A detector; restores the weights (a failure is logged and starts from a fresh model).
    pub(crate) fn new(cfg: AnomalyConfig) -> Engine {
        let node = NodeDetector::new(cfg.detector());
        let retrainer = match &cfg.weights {
            Some(p) => match Retrainer::restore_or_new(LstmConfig::default(), p, node.slot()) {
                Ok(r) => {
                    info!(weights = %p.display(), "anomaly: detector started");
                    Some(r)
                }
                Err(e) => {
                    warn!(weights = %p.display(), "anomaly: cannot restore weights ({e}); starting a fresh model");
                    let _ = std::fs::remove_file(p);
                    Retrainer::restore_or_new(LstmConfig::default(), p, node.slot()).ok()
                }
            },
            None => Some(Retrainer::spawn(
                novacron_anomaly::lstm::LstmModel::new(LstmConfig::default(), 0x5eed)
                    .expect("a fresh LSTM on the CPU"),
                node.slot(),
                None,
            )),
        };
        Engine {
            cfg,
            node,
            retrainer,
            samples: 0,
            scores: BTreeMap::new(),
            forecasts: Vec::new(),
        }
    }

    /// Scores one record of `scope/series`.
    pub(crate) fn push(
        &mut self,
        events: &Events,
        scope: &str,
        name: &str,
        series: &str,
        ts_ms: u64,
        value: f64,
    ) {
        let score = self
            .node
            .push(&format!("{scope}/{series}"), ts_ms as i64, value);
        events.record(
            scope,
            name,
            series,
            ts_ms,
            score,
            score >= self.cfg.threshold,
        );
        self.scores.insert(
            (scope.to_string(), series.to_string()),
            (name.into(), score),
        );
    }

    /// Forgets a VM that is gone.
    pub(crate) fn remove_scope(&mut self, scope: &str) {
        let gone: Vec<(String, String)> = self
            .scores
            .keys()
            .filter(|(s, _)| s == scope)
            .cloned()
            .collect();
        for k in gone {
            self.node.remove(&format!("{}/{}", k.0, k.1));
            self.scores.remove(&k);
        }
    }

    /// Ends a sample: retrains and re-forecasts on schedule; returns the latest scores and
    /// forecasts for the snapshot.
    pub(crate) fn end_sample(&mut self) -> (Vec<AnomalyScore>, Vec<Forecast>) {
        self.samples += 1;
        if self.samples % self.cfg.retrain_every == 0 {
            if let Some(r) = &self.retrainer {
                r.submit(self.node.training_set(10_000));
            }
        }
        if self.samples % self.cfg.forecast_every == 0 || self.samples == 2 {
            let mut scopes: BTreeMap<&str, &str> = BTreeMap::new();
            for ((scope, _), (name, _)) in &self.scores {
                scopes.insert(scope, name);
            }
            let node = &self.node;
            let mut out = Vec::new();
            for (scope, name) in scopes {
                let list: &[&str] = if scope == crate::series::HOST {
                    &FORECAST_HOST
                } else {
                    &FORECAST_VM
                };
                for series in list {
                    if let Some(f) = node.forecast_next_hour(&format!("{scope}/{series}")) {
                        out.push(Forecast {
                            scope: scope.to_string(),
                            name: name.to_string(),
                            series: series.to_string(),
                            mean: f.mean,
                            max: f.max,
                        });
                    }
                }
            }
            self.forecasts = out;
        }
        let scores = self
            .scores
            .iter()
            .map(|((scope, series), (name, score))| AnomalyScore {
                scope: scope.clone(),
                name: name.clone(),
                series: series.clone(),
                score: *score,
            })
            .collect();
        (scores, self.forecasts.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_in_one_series_is_an_event_and_a_steady_one_is_not() {
        let cfg = AnomalyConfig {
            warmup: 30,
            weights: None,
            ..Default::default()
        };
        let mut e = Engine::new(cfg);
        let ev = Events::default();
        for i in 0..200u64 {
            let ts = 1_000_000 + i * 100;
            let noise = ((i * 7919) % 13) as f64 * 0.001;
            e.push(&ev, "a", "vm-a", "x", ts, 0.1 + noise);
            let v = if i >= 150 { 0.9 } else { 0.1 + noise };
            e.push(&ev, "b", "vm-b", "x", ts, v);
            e.end_sample();
        }
        assert!(
            ev.list(Some("a"), 0.0).is_empty(),
            "{:?}",
            ev.list(None, 0.0)
        );
        let b = ev.list(Some("b"), 0.0);
        assert!(!b.is_empty());
        assert!(b[0].start_ms >= 1_000_000 + 150 * 100);
        let (scores, forecasts) = e.end_sample();
        assert_eq!(scores.len(), 2);
        assert!(forecasts.is_empty() || forecasts.iter().all(|f| f.mean.is_finite()));
    }

    #[test]
    fn config_limits_name_the_field() {
        let c = AnomalyConfig {
            threshold: f64::NAN,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "telemetry.anomaly.threshold");
        assert!(AnomalyConfig::default().validate().is_ok());
    }
}
