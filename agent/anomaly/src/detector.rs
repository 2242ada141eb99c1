//! The streaming detector of one series: `push(timestamp, value) -> score in [0, 1]`,
//! computed from the records before it and this one (never a later one).
//!
//! Per record:
//! 1. bad input is filtered (see [`Rejected`]): a non-finite value, or a timestamp not after
//!    the previous one, gets score 0 and changes nothing; a gap in time (more than
//!    [`DetectorConfig::gap_factor`] typical intervals) clears the model's input context and
//!    the likelihoods' short-term means, so records before the gap are not used as context;
//! 2. the value is normalised by the running min/max of the series (constant series map to
//!    0.5 and score 0);
//! 3. signals, each turned into a log likelihood score by its own [`Likelihood`]:
//!    the LSTM forecaster's absolute error on this record (the forecast was made from the
//!    previous `window` records), and a robust statistical signal (the absolute deviation of
//!    the value from an exponentially weighted mean, in units of the EW mean absolute
//!    deviation);
//! 4. a spatial check: a value outside the range seen so far by more than
//!    [`DetectorConfig::spatial_tolerance`] of that range scores 1;
//! 5. the score is the maximum of the enabled parts; after a score of at least
//!    [`DetectorConfig::fire`], the next [`DetectorConfig::suppress`] records are damped
//!    (NAB rewards only the first detection in a window and charges every false positive).
//!
//! Memory per series is bounded by [`DetectorConfig::history`] (the values kept for
//! retraining) plus a few hundred bytes of state.

use std::collections::VecDeque;

use crate::likelihood::{Likelihood, LikelihoodConfig};
use crate::lstm::FastLstm;

/// Which parts of the detector are on (the NAB command reports several).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// LSTM forecast error, statistical signal and the spatial check.
    Full,
    /// The LSTM forecast error alone (its likelihood), nothing else.
    LstmOnly,
    /// Everything except the LSTM.
    NoLstm,
}

/// Global detector parameters (the same for every series).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    /// Which parts score.
    pub parts: Parts,
    /// Values kept per series for retraining (bounded memory).
    pub history: usize,
    /// Likelihood of the LSTM error.
    pub lstm_likelihood: LikelihoodConfig,
    /// Likelihood of the statistical signal.
    pub stat_likelihood: LikelihoodConfig,
    /// Half-life of the statistical signal's EW mean and deviation, in records.
    pub stat_half_life: f64,
    /// Relative range tolerance of the spatial check (0 disables it).
    pub spatial_tolerance: f64,
    /// Records before the spatial check is armed.
    pub spatial_learning: usize,
    /// Records of the local range check (0 disables it): a value outside the range of the
    /// last this-many records by more than `local_tolerance` of the whole range.
    pub local_window: usize,
    /// Tolerance of the local range check, relative to the whole range.
    pub local_tolerance: f64,
    /// Score of a local range violation.
    pub local_score: f64,
    /// A score at least this high is a detection that starts suppression.
    pub fire: f64,
    /// Records damped after a detection.
    pub suppress: usize,
    /// Factor applied to scores while suppressed.
    pub suppress_factor: f64,
    /// A time step over this many typical intervals is a gap.
    pub gap_factor: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            parts: Parts::Full,
            history: 3000,
            lstm_likelihood: LikelihoodConfig::default(),
            stat_likelihood: LikelihoodConfig::default(),
            stat_half_life: 100.0,
            spatial_tolerance: 0.02,
            spatial_learning: 300,
            local_window: 2000,
            local_tolerance: 0.1,
            local_score: 1.0,
            fire: 0.5,
            suppress: 150,
            suppress_factor: 0.0,
            gap_factor: 10.0,
        }
    }
}

/// Why a record was not used (it scored 0 and changed no state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The value was NaN or infinite.
    NonFinite,
    /// The timestamp was not after the previous record's.
    OutOfOrder,
}

/// Counters of what the detector saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Records used.
    pub accepted: u64,
    /// Records with a NaN or infinite value.
    pub non_finite: u64,
    /// Records whose timestamp was not after the previous one.
    pub out_of_order: u64,
    /// Gaps in time seen.
    pub gaps: u64,
}

/// The per-series streaming state (model weights are held elsewhere and passed in, so many
/// series can share one node model).
#[derive(Debug, Clone)]
pub struct SeriesState {
    cfg: DetectorConfig,
    history: VecDeque<f64>,
    /// Records since the last gap (the model's usable context).
    context: usize,
    last_ts: Option<i64>,
    interval: f64,
    min: f64,
    max: f64,
    lstm_lik: Likelihood,
    stat_lik: Likelihood,
    ew_mean: f64,
    ew_dev: f64,
    suppress_left: usize,
    counters: Counters,
    /// The forecast of the next normalised value, made after the previous record.
    pending: Option<f32>,
}

impl SeriesState {
    /// A fresh series.
    pub fn new(cfg: DetectorConfig) -> Self {
        SeriesState {
            cfg,
            history: VecDeque::with_capacity(cfg.history.min(4096)),
            context: 0,
            last_ts: None,
            interval: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            lstm_lik: Likelihood::new(cfg.lstm_likelihood),
            stat_lik: Likelihood::new(cfg.stat_likelihood),
            ew_mean: 0.0,
            ew_dev: 0.0,
            suppress_left: 0,
            counters: Counters::default(),
            pending: None,
        }
    }

    /// The parameters.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// What the detector saw so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Records accepted so far.
    pub fn len(&self) -> u64 {
        self.counters.accepted
    }

    /// True before the first accepted record.
    pub fn is_empty(&self) -> bool {
        self.counters.accepted == 0
    }

    /// The typical sampling interval in seconds (0 before two records).
    pub fn interval(&self) -> f64 {
        self.interval
    }

    fn normalise(&self, v: f64) -> f32 {
        let range = self.max - self.min;
        if range.is_finite() && range > 0.0 {
            ((v - self.min) / range) as f32
        } else {
            0.5
        }
    }

    fn denormalise(&self, x: f32) -> f64 {
        let range = self.max - self.min;
        if range.is_finite() && range > 0.0 {
            self.min + x as f64 * range
        } else if self.min.is_finite() {
            self.min
        } else {
            0.0
        }
    }

    /// The normalised recent context (at most `window` values, none from before a gap).
    fn context_window(&self, window: usize) -> Vec<f32> {
        let k = window.min(self.context).min(self.history.len());
        self.history
            .iter()
            .skip(self.history.len() - k)
            .map(|&v| self.normalise(v))
            .collect()
    }

    /// The recent history normalised with the current range, for retraining.
    pub fn training_series(&self) -> Vec<f32> {
        self.history.iter().map(|&v| self.normalise(v)).collect()
    }

    /// Scores one record. `model` is the forecaster (`None`: persistence forecast, i.e. the
    /// previous value, until a model is trained). Never panics; see [`Rejected`].
    pub fn push(&mut self, ts: i64, value: f64, model: Option<&FastLstm>) -> f64 {
        match self.check(ts, value) {
            Err(_) => 0.0,
            Ok(gap) => self.score(ts, value, gap, model),
        }
    }

    fn check(&mut self, ts: i64, value: f64) -> Result<bool, Rejected> {
        if !value.is_finite() {
            self.counters.non_finite += 1;
            return Err(Rejected::NonFinite);
        }
        let mut gap = false;
        if let Some(last) = self.last_ts {
            if ts <= last {
                self.counters.out_of_order += 1;
                return Err(Rejected::OutOfOrder);
            }
            let dt = (ts as f64) - (last as f64);
            if self.interval > 0.0 && dt > self.cfg.gap_factor * self.interval {
                gap = true;
                self.counters.gaps += 1;
            } else if self.interval == 0.0 {
                self.interval = dt;
            } else {
                self.interval += 0.05 * (dt - self.interval);
            }
        }
        Ok(gap)
    }

    fn score(&mut self, ts: i64, value: f64, gap: bool, model: Option<&FastLstm>) -> f64 {
        self.last_ts = Some(ts);
        self.counters.accepted += 1;
        let n = self.counters.accepted as usize;
        if gap {
            self.context = 0;
            self.pending = None;
            self.lstm_lik.reset_short_term();
            self.stat_lik.reset_short_term();
        }
        // Spatial check against the range before this value.
        let mut spatial = 0.0;
        if self.cfg.spatial_tolerance > 0.0 && n > self.cfg.spatial_learning {
            let range = self.max - self.min;
            if range > 0.0 {
                let tol = range * self.cfg.spatial_tolerance;
                if value > self.max + tol || value < self.min - tol {
                    spatial = 1.0;
                }
            }
        }
        // Local range check against the last `local_window` records (same learning period).
        if self.cfg.local_window > 0 && n > self.cfg.spatial_learning && spatial == 0.0 {
            let range = self.max - self.min;
            let k = self
                .cfg
                .local_window
                .min(self.history.len())
                .min(self.context);
            if range > 0.0 && k > 0 {
                let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
                for &v in self.history.iter().skip(self.history.len() - k) {
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
                let tol = range * self.cfg.local_tolerance;
                if value > hi + tol || value < lo - tol {
                    spatial = self.cfg.local_score;
                }
            }
        }
        // LSTM error of the forecast made before this record (in the range known then).
        // (0 while the series has been constant: there is no scale to judge an error by.)
        let lstm_raw = match self.pending {
            Some(p) if self.max > self.min || value != self.max => {
                (self.normalise(value) - p).abs() as f64
            }
            _ => 0.0,
        };
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Robust statistical signal: deviation from the EW mean in EW mean-absolute-deviations.
        let stat_raw = if n == 1 {
            self.ew_mean = value;
            0.0
        } else {
            let dev = (value - self.ew_mean).abs();
            let scale = self.ew_dev.max((self.max - self.min) * 1e-3).max(1e-12);
            let z = (dev / scale).min(50.0);
            let a = std::f64::consts::LN_2 / self.cfg.stat_half_life;
            self.ew_mean += a * (value - self.ew_mean);
            self.ew_dev += a * (dev - self.ew_dev);
            if self.max > self.min {
                z
            } else {
                0.0
            }
        };
        let lstm_score = self.lstm_lik.update(lstm_raw);
        let stat_score = self.stat_lik.update(stat_raw / 50.0);
        // Remember the value, then forecast the next one.
        if self.history.len() == self.cfg.history.max(1) {
            self.history.pop_front();
        }
        self.history.push_back(value);
        self.context = (self.context + 1).min(self.cfg.history);
        let w = model.map(|m| m.window()).unwrap_or(1);
        let ctx = self.context_window(w);
        self.pending = match model {
            Some(m) if !ctx.is_empty() => Some(m.predict(&ctx)).filter(|p| p.is_finite()),
            _ => None,
        }
        .or_else(|| ctx.last().copied());
        let mut score = match self.cfg.parts {
            Parts::LstmOnly => lstm_score,
            Parts::Full => lstm_score.max(stat_score).max(spatial),
            Parts::NoLstm => stat_score.max(spatial),
        };
        if self.suppress_left > 0 {
            self.suppress_left -= 1;
            score *= self.cfg.suppress_factor;
        } else if score >= self.cfg.fire {
            self.suppress_left = self.cfg.suppress;
        }
        score.clamp(0.0, 1.0)
    }

    /// Forecasts the next `steps` values by rolling the model forward on its own output
    /// (persistence without a model). Empty before the first record.
    pub fn forecast(&self, steps: usize, model: Option<&FastLstm>) -> Vec<f64> {
        if self.history.is_empty() || steps == 0 {
            return Vec::new();
        }
        let w = model.map(|m| m.window()).unwrap_or(1);
        let mut ctx = self.context_window(w.max(1));
        if ctx.is_empty() {
            ctx.push(self.normalise(*self.history.back().unwrap_or(&0.0)));
        }
        let mut out = Vec::with_capacity(steps);
        for _ in 0..steps {
            let next = match model {
                Some(m) => {
                    let p = m.predict(&ctx);
                    if p.is_finite() {
                        p.clamp(-1.0, 2.0)
                    } else {
                        *ctx.last().unwrap_or(&0.5)
                    }
                }
                None => *ctx.last().unwrap_or(&0.5),
            };
            out.push(self.denormalise(next));
            ctx.push(next);
            if ctx.len() > w {
                ctx.remove(0);
            }
        }
        out
    }

    /// Number of records in one hour at the observed interval (at least 1).
    pub fn steps_per_hour(&self) -> usize {
        if self.interval > 0.0 {
            ((3600.0 / self.interval).round() as usize).clamp(1, 10_000)
        } else {
            1
        }
    }

    /// Bytes held by this series (history plus state).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.history.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_series_scores_zero_then_a_change_scores_high() {
        let mut s = SeriesState::new(DetectorConfig::default());
        for i in 0..1000 {
            assert_eq!(s.push(i * 60, 5.0, None), 0.0);
        }
        let hit = (0..5)
            .map(|k| s.push((1000 + k) * 60, 50.0, None))
            .fold(0.0, f64::max);
        assert!(hit >= 0.5, "{hit}");
    }

    #[test]
    fn rejected_records_score_zero_and_change_nothing() {
        let mut s = SeriesState::new(DetectorConfig::default());
        for i in 0..100 {
            s.push(i * 60, (i % 7) as f64, None);
        }
        let before = s.clone();
        assert_eq!(s.push(100 * 60, f64::NAN, None), 0.0);
        assert_eq!(s.push(100 * 60, f64::INFINITY, None), 0.0);
        assert_eq!(s.push(50 * 60, 1.0, None), 0.0);
        assert_eq!(s.push(99 * 60, 1.0, None), 0.0);
        let c = s.counters();
        assert_eq!((c.accepted, c.non_finite, c.out_of_order), (100, 2, 2));
        // Apart from the counters, the state is exactly what it was.
        let mut same = s.clone();
        same.counters = before.counters;
        assert_eq!(format!("{same:?}"), format!("{before:?}"));
    }

    #[test]
    fn a_gap_clears_the_context() {
        let mut s = SeriesState::new(DetectorConfig::default());
        for i in 0..100 {
            s.push(i * 60, i as f64, None);
        }
        s.push(100 * 60 + 3600 * 24, 1.0, None);
        assert_eq!(s.counters().gaps, 1);
        assert_eq!(s.context_window(16).len(), 1);
    }

    #[test]
    fn forecast_is_persistence_without_a_model_and_hourly_steps_follow_the_interval() {
        let mut s = SeriesState::new(DetectorConfig::default());
        assert!(s.forecast(3, None).is_empty());
        for i in 0..10 {
            s.push(i * 300, 10.0 + i as f64, None);
        }
        assert_eq!(s.forecast(3, None), vec![19.0, 19.0, 19.0]);
        assert_eq!(s.steps_per_hour(), 12);
    }
}
