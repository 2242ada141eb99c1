//! The API the agent uses: a [`Detector`] for one self-training series (what NAB runs), and a
//! [`NodeDetector`] for all series of a node sharing one LSTM that a [`Retrainer`] thread
//! retrains at low priority on the node's recent history, saving the weights as safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use crate::detector::{DetectorConfig, SeriesState};
use crate::lstm::{FastLstm, LstmConfig, LstmError, LstmModel};

/// When a self-training detector (re)trains its LSTM, in accepted records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// First training after this many records.
    pub first: usize,
    /// Then every this many records.
    pub every: usize,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            first: 300,
            every: 2000,
        }
    }
}

/// One series with its own LSTM, retrained in line on its own history on a fixed schedule
/// (the score of a record only ever uses weights trained on earlier records).
#[derive(Debug)]
pub struct Detector {
    state: SeriesState,
    model: LstmModel,
    fast: Option<FastLstm>,
    schedule: Schedule,
    next_train: usize,
    trainings: usize,
}

impl Detector {
    /// A fresh detector (untrained: persistence forecasts until the first training).
    pub fn new(
        cfg: DetectorConfig,
        lstm: LstmConfig,
        schedule: Schedule,
    ) -> Result<Self, LstmError> {
        Ok(Detector {
            state: SeriesState::new(cfg),
            model: LstmModel::new(lstm, 0x5eed)?,
            fast: None,
            schedule,
            next_train: schedule.first.max(1),
            trainings: 0,
        })
    }

    /// Scores one record (see [`SeriesState::push`]), then retrains if the schedule says so.
    pub fn push(&mut self, ts: i64, value: f64) -> Result<f64, LstmError> {
        let s = self.state.push(ts, value, self.fast.as_ref());
        let lstm_used = self.state_parts() != crate::detector::Parts::NoLstm;
        if lstm_used && self.state.len() as usize >= self.next_train {
            self.next_train += self.schedule.every.max(1);
            if self.model.train(&[self.state.training_series()])?.is_some() {
                self.fast = Some(self.model.fast()?);
                self.trainings += 1;
            }
        }
        Ok(s)
    }

    fn state_parts(&self) -> crate::detector::Parts {
        self.state.config().parts
    }

    /// How many trainings ran.
    pub fn trainings(&self) -> usize {
        self.trainings
    }

    /// The series state.
    pub fn state(&self) -> &SeriesState {
        &self.state
    }

    /// Forecast of the next hour of values (one per record interval).
    pub fn forecast_next_hour(&self) -> Vec<f64> {
        self.state
            .forecast(self.state.steps_per_hour(), self.fast.as_ref())
    }
}

/// The shared, swappable model of a node.
pub type ModelSlot = Arc<RwLock<Option<Arc<FastLstm>>>>;

/// All series of a node (per VM and per host: e.g. `vm42/cpu`, `vm42/mem`, `host/cpu`),
/// sharing one model.
#[derive(Debug)]
pub struct NodeDetector {
    cfg: DetectorConfig,
    series: HashMap<String, SeriesState>,
    slot: ModelSlot,
}

/// A forecast summary for capacity planning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HourForecast {
    /// Mean forecast over the next hour.
    pub mean: f64,
    /// Maximum forecast over the next hour.
    pub max: f64,
    /// Records in the hour at the observed interval.
    pub steps: usize,
}

impl NodeDetector {
    /// An empty node with no model yet (persistence forecasts until one is set).
    pub fn new(cfg: DetectorConfig) -> Self {
        NodeDetector {
            cfg,
            series: HashMap::new(),
            slot: Arc::new(RwLock::new(None)),
        }
    }

    /// The model slot a [`Retrainer`] writes into.
    pub fn slot(&self) -> ModelSlot {
        self.slot.clone()
    }

    /// Installs weights (e.g. restored from disk at start).
    pub fn set_model(&self, m: FastLstm) {
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(m));
    }

    fn model(&self) -> Option<Arc<FastLstm>> {
        self.slot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Scores one record of `series` (created on first use).
    pub fn push(&mut self, series: &str, ts: i64, value: f64) -> f64 {
        let model = self.model();
        let cfg = self.cfg;
        let s = match self.series.get_mut(series) {
            Some(s) => s,
            None => self
                .series
                .entry(series.to_string())
                .or_insert_with(|| SeriesState::new(cfg)),
        };
        s.push(ts, value, model.as_deref())
    }

    /// Drops a series (a VM went away).
    pub fn remove(&mut self, series: &str) {
        self.series.remove(series);
    }

    /// Number of series.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// True with no series.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// The recent history of the node's series, normalised, for a retraining job: about
    /// `max_records` values in all, at least 256 recent values from each chosen series (so
    /// each gives whole training windows), the series chosen evenly over all of them.
    pub fn training_set(&self, max_records: usize) -> Vec<Vec<f32>> {
        let mut names: Vec<&String> = self.series.keys().collect();
        names.sort();
        let n = names.len().max(1);
        let per = (max_records / n).max(256);
        let chosen = (max_records / per).clamp(1, n);
        let stride = n as f64 / chosen as f64;
        (0..chosen)
            .map(|k| names[((k as f64 * stride) as usize).min(n - 1)])
            .map(|name| {
                let s = self.series[name].training_series();
                s[s.len().saturating_sub(per)..].to_vec()
            })
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// The next hour's forecast of one series; `None` for an unknown or empty series.
    pub fn forecast_next_hour(&self, series: &str) -> Option<HourForecast> {
        let s = self.series.get(series)?;
        let steps = s.steps_per_hour();
        let model = self.model();
        let f = s.forecast(steps, model.as_deref());
        if f.is_empty() {
            return None;
        }
        Some(HourForecast {
            mean: f.iter().sum::<f64>() / f.len() as f64,
            max: f.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            steps,
        })
    }

    /// The next hour's forecast of a sum of series (e.g. a host's CPU as the sum of its VMs'),
    /// summing the per-series means and maxima; unknown series count as 0.
    pub fn forecast_sum_next_hour(&self, series: &[&str]) -> HourForecast {
        let mut out = HourForecast {
            mean: 0.0,
            max: 0.0,
            steps: 0,
        };
        for s in series {
            if let Some(f) = self.forecast_next_hour(s) {
                out.mean += f.mean;
                out.max += f.max;
                out.steps = out.steps.max(f.steps);
            }
        }
        out
    }

    /// Bytes held by the series states (the model is shared and counted once elsewhere).
    pub fn heap_bytes(&self) -> usize {
        self.series
            .iter()
            .map(|(k, s)| k.capacity() + s.heap_bytes() + 16)
            .sum()
    }
}

/// A background retraining thread at low CPU priority (nice 19).
#[derive(Debug)]
pub struct Retrainer {
    tx: Option<mpsc::SyncSender<Vec<Vec<f32>>>>,
    done: mpsc::Receiver<Result<Option<f32>, String>>,
    handle: Option<JoinHandle<()>>,
}

/// Lowers the calling thread's CPU priority to nice 19 (Linux: per-thread).
pub fn lower_thread_priority() -> std::io::Result<()> {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: setpriority with PRIO_PROCESS and a thread id only changes that thread's nice
    // value; all arguments are plain integers.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Retrainer {
    /// Starts the thread: each submitted training set trains `model` further, installs the
    /// new weights into `slot`, and saves them to `weights` (if given).
    pub fn spawn(mut model: LstmModel, slot: ModelSlot, weights: Option<PathBuf>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Vec<Vec<f32>>>(1);
        let (dtx, done) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("anomaly-retrain".into())
            .spawn(move || {
                if let Err(e) = lower_thread_priority() {
                    tracing::warn!("anomaly retrainer: cannot lower priority: {e}");
                }
                for set in rx {
                    let r = (|| -> Result<Option<f32>, LstmError> {
                        let loss = model.train(&set)?;
                        if loss.is_some() {
                            let fast = model.fast()?;
                            *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fast));
                            if let Some(p) = &weights {
                                model.save(p)?;
                            }
                        }
                        Ok(loss)
                    })();
                    if dtx.send(r.map_err(|e| e.to_string())).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn anomaly-retrain thread");
        Retrainer {
            tx: Some(tx),
            done,
            handle: Some(handle),
        }
    }

    /// Restores saved weights if `path` exists (else a fresh model), installs them into the
    /// slot, and starts the thread.
    pub fn restore_or_new(
        cfg: LstmConfig,
        path: &Path,
        slot: ModelSlot,
    ) -> Result<Self, LstmError> {
        let model = if path.exists() {
            let m = LstmModel::load(cfg, path)?;
            *slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(m.fast()?));
            m
        } else {
            LstmModel::new(cfg, 0x5eed)?
        };
        Ok(Retrainer::spawn(model, slot, Some(path.to_path_buf())))
    }

    /// Submits a training set; returns false if a job is already queued (the set is dropped:
    /// the next period brings a fresher one).
    pub fn submit(&self, set: Vec<Vec<f32>>) -> bool {
        match &self.tx {
            Some(tx) => tx.try_send(set).is_ok(),
            None => false,
        }
    }

    /// Waits for the next finished job: its final loss (`None`: nothing to train on).
    pub fn wait(&self) -> Result<Option<f32>, String> {
        self.done
            .recv()
            .map_err(|_| "retrainer thread stopped".to_string())?
    }
}

impl Drop for Retrainer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_retrains_in_background_saves_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.safetensors");
        let mut node = NodeDetector::new(DetectorConfig::default());
        for i in 0..400i64 {
            let t = i * 60;
            node.push("vm1/cpu", t, 50.0 + 20.0 * ((i as f64) * 0.2).sin());
            node.push("vm1/mem", t, 1000.0 + (i % 10) as f64);
        }
        let cfg = LstmConfig {
            steps: 20,
            ..Default::default()
        };
        let r = Retrainer::restore_or_new(cfg, &path, node.slot()).unwrap();
        assert!(node.model().is_none());
        assert!(r.submit(node.training_set(10_000)));
        assert!(r.wait().unwrap().is_some());
        let trained = node.model().expect("model installed");
        assert!(path.exists());
        drop(r);
        let node2 = NodeDetector::new(DetectorConfig::default());
        let _r2 = Retrainer::restore_or_new(cfg, &path, node2.slot()).unwrap();
        assert_eq!(*node2.model().unwrap(), *trained);
        let set = node.training_set(300);
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].len(), 256);
        let f = node.forecast_next_hour("vm1/cpu").unwrap();
        assert_eq!(f.steps, 60);
        assert!(f.mean.is_finite() && f.max >= f.mean);
        let host = node.forecast_sum_next_hour(&["vm1/cpu", "vm1/mem", "nope"]);
        assert!(host.mean > 1000.0);
        assert!(node.forecast_next_hour("nope").is_none());
    }

    #[test]
    fn self_training_detector_trains_on_schedule() {
        let lstm = LstmConfig {
            steps: 5,
            ..Default::default()
        };
        let sched = Schedule {
            first: 50,
            every: 100,
        };
        let mut d = Detector::new(DetectorConfig::default(), lstm, sched).unwrap();
        for i in 0..260i64 {
            let s = d.push(i * 60, (i % 12) as f64).unwrap();
            assert!((0.0..=1.0).contains(&s));
        }
        assert_eq!(d.trainings(), 3);
        assert_eq!(d.forecast_next_hour().len(), 60);
    }
}
