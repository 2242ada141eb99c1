//! Runs the detector over a NAB corpus and scores it.

use std::path::Path;

use crate::detector::{DetectorConfig, Parts};
use crate::lstm::{LstmConfig, LstmError};
use crate::nab::{self, Corpus, NabError, ProfileScore, ScoredSeries};
use crate::node::{Detector, Schedule};

/// Errors of an evaluation run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The NAB folder or a results file.
    #[error(transparent)]
    Nab(#[from] NabError),
    /// The model.
    #[error(transparent)]
    Lstm(#[from] LstmError),
}

/// Everything global that defines a detector run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunConfig {
    /// Detector parameters.
    pub detector: DetectorConfig,
    /// LSTM shape and training.
    pub lstm: LstmConfig,
    /// Retraining schedule.
    pub schedule: Schedule,
}

impl RunConfig {
    /// The same run with other parts enabled.
    pub fn with_parts(mut self, parts: Parts) -> Self {
        self.detector.parts = parts;
        self
    }
}

/// Scores of one evaluated configuration.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Per-series scores, in corpus order.
    pub series: Vec<ScoredSeries>,
    /// Per-profile optimised results, in the corpus' profile order.
    pub profiles: Vec<ProfileScore>,
    /// Records scored.
    pub records: usize,
}

/// Runs a fresh detector over one series' values.
pub fn run_series(cfg: &RunConfig, ts: &[i64], values: &[f64]) -> Result<Vec<f64>, LstmError> {
    let mut d = Detector::new(cfg.detector, cfg.lstm, cfg.schedule)?;
    ts.iter().zip(values).map(|(&t, &v)| d.push(t, v)).collect()
}

/// Runs the detector over every series of the corpus (on `jobs` threads; each series is
/// independent), optimises one threshold per profile over all series, and optionally writes
/// NAB results CSVs under `results/<detector name>/<category>/<detector name>_<file>`.
pub fn evaluate(
    corpus: &Corpus,
    cfg: &RunConfig,
    jobs: usize,
    results: Option<(&Path, &str)>,
) -> Result<Evaluation, EvalError> {
    let n = corpus.series.len();
    let mut out: Vec<Option<Result<Vec<f64>, LstmError>>> = (0..n).map(|_| None).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots = std::sync::Mutex::new(&mut out);
    std::thread::scope(|sc| {
        for _ in 0..jobs.max(1) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let s = &corpus.series[i];
                let r = run_series(cfg, &s.timestamps, &s.values);
                slots.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    let mut series = Vec::with_capacity(n);
    let mut records = 0;
    for (s, r) in corpus.series.iter().zip(out) {
        let scores = r.expect("every series ran")?;
        records += scores.len();
        if let Some((dir, name)) = results {
            let (cat, file) = s.name.rsplit_once('/').unwrap_or(("", &s.name));
            let path = dir.join(name).join(cat).join(format!("{name}_{file}"));
            nab::write_results(&path, s, &scores)?;
        }
        series.push(ScoredSeries {
            scores,
            windows: s.windows.clone(),
        });
    }
    let profiles = corpus
        .profiles
        .iter()
        .map(|p| nab::optimise(&series, p))
        .collect();
    Ok(Evaluation {
        series,
        profiles,
        records,
    })
}

impl RunConfig {
    /// Overrides one parameter by name (`suppress=150`, `fire=0.6`, ...): for exploring the
    /// method from the command line. Unknown names and bad values are errors.
    pub fn set(&mut self, kv: &str) -> Result<(), String> {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{kv:?}: expected NAME=VALUE"))?;
        let f: f64 = v
            .parse()
            .map_err(|_| format!("{kv:?}: expected a number after '='"))?;
        let d = &mut self.detector;
        match k {
            "suppress" => d.suppress = f as usize,
            "suppress_factor" => d.suppress_factor = f,
            "fire" => d.fire = f,
            "spatial_tolerance" => d.spatial_tolerance = f,
            "spatial_learning" => d.spatial_learning = f as usize,
            "local_window" => d.local_window = f as usize,
            "local_tolerance" => d.local_tolerance = f,
            "local_score" => d.local_score = f,
            "stat_half_life" => d.stat_half_life = f,
            "history" => d.history = f as usize,
            "lik_average" => {
                d.lstm_likelihood.average = f as usize;
                d.stat_likelihood.average = f as usize;
            }
            "lik_learning" => {
                d.lstm_likelihood.learning = f as usize;
                d.stat_likelihood.learning = f as usize;
            }
            "lik_half_life" => {
                d.lstm_likelihood.half_life = f;
                d.stat_likelihood.half_life = f;
            }
            "lstm_std_floor" => d.lstm_likelihood.std_floor = f,
            "stat_std_floor" => d.stat_likelihood.std_floor = f,
            "stat_average" => d.stat_likelihood.average = f as usize,
            "lstm_average" => d.lstm_likelihood.average = f as usize,
            "lstm_steps" => self.lstm.steps = f as usize,
            "lstm_window" => self.lstm.window = f as usize,
            "lstm_hidden" => self.lstm.hidden = f as usize,
            "lstm_lr" => self.lstm.lr = f,
            "train_first" => self.schedule.first = f as usize,
            "train_every" => self.schedule.every = f as usize,
            _ => return Err(format!("{k:?}: unknown parameter")),
        }
        Ok(())
    }
}
