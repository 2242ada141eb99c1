//! The LSTM forecaster: a one-layer `candle_nn` LSTM over a window of normalised values with a
//! linear head that predicts the next value's change. Trained with candle (autograd, AdamW,
//! CPU); weights saved and restored as safetensors. Per-record inference runs the same
//! equations on a flat copy of the weights ([`FastLstm`]): candle's per-op dispatch costs
//! more than the arithmetic of a 16-unit cell, and a test checks both give the same output.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer, VarBuilder, VarMap, RNN};

/// Errors of the LSTM model.
#[derive(Debug, thiserror::Error)]
pub enum LstmError {
    /// candle failed (shape, allocation, file format).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A weights file is not ours or is damaged.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: String,
        /// What was expected.
        what: String,
    },
    /// A weights file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Shape and training parameters (global, never per series).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LstmConfig {
    /// Input window (records).
    pub window: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Optimiser steps per (re)training.
    pub steps: usize,
    /// Windows per step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
}

impl Default for LstmConfig {
    fn default() -> Self {
        LstmConfig {
            window: 16,
            hidden: 16,
            steps: 120,
            batch: 32,
            lr: 0.01,
        }
    }
}

/// The weights in flat arrays, for fast single-window inference (same equations as
/// `candle_nn::LSTM::step`, gate order i, f, g, o).
#[derive(Debug, Clone, PartialEq)]
pub struct FastLstm {
    hidden: usize,
    window: usize,
    w_ih: Vec<f32>, // 4H (input dim 1)
    w_hh: Vec<f32>, // 4H x H, row-major
    bias: Vec<f32>, // 4H (b_ih + b_hh)
    head_w: Vec<f32>,
    head_b: f32,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl FastLstm {
    /// The input window length.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Predicts the next normalised value after `xs` (any length; the last `window` values
    /// are used, fewer if shorter). Returns the last value plus the predicted change.
    pub fn predict(&self, xs: &[f32]) -> f32 {
        let xs = &xs[xs.len().saturating_sub(self.window)..];
        let Some(&last) = xs.last() else {
            return 0.0;
        };
        let h_n = self.hidden;
        let mut h = [0f32; 64];
        let mut c = [0f32; 64];
        let mut gates = [0f32; 256];
        let h_n = h_n.min(64);
        for &x in xs {
            for (g, gate) in gates.iter_mut().enumerate().take(4 * h_n) {
                let row = &self.w_hh[g * h_n..(g + 1) * h_n];
                let mut acc = self.bias[g] + self.w_ih[g] * x;
                for k in 0..h_n {
                    acc += row[k] * h[k];
                }
                *gate = acc;
            }
            for k in 0..h_n {
                let i = sigmoid(gates[k]);
                let f = sigmoid(gates[h_n + k]);
                let g = gates[2 * h_n + k].tanh();
                let o = sigmoid(gates[3 * h_n + k]);
                c[k] = f * c[k] + i * g;
                h[k] = o * c[k].tanh();
            }
        }
        let mut out = self.head_b;
        for (w, hk) in self.head_w.iter().zip(&h[..h_n]) {
            out += w * hk;
        }
        last + out
    }

    /// Bytes held by the weights.
    pub fn heap_bytes(&self) -> usize {
        4 * (self.w_ih.len() + self.w_hh.len() + self.bias.len() + self.head_w.len())
    }
}

/// A deterministic xorshift generator (training batches and initial weights).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The trainable model: candle variables plus the configuration.
pub struct LstmModel {
    cfg: LstmConfig,
    varmap: VarMap,
    lstm: candle_nn::LSTM,
    head: candle_nn::Linear,
    opt: candle_nn::AdamW,
    rng: XorShift,
}

impl std::fmt::Debug for LstmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LstmModel").field("cfg", &self.cfg).finish()
    }
}

const FORMAT_KEY: &str = "novacron.format";
const CRC_KEY: &str = "novacron.crc32";
/// Magic ("NCAN") and version of the weights file, stored as the `novacron.format` tensor.
const MAGIC: u32 = 0x4E43_414E;
const VERSION: u32 = 1;

impl LstmModel {
    /// A fresh model with deterministic initial weights (uniform ±1/sqrt(hidden), seeded).
    pub fn new(cfg: LstmConfig, seed: u64) -> Result<Self, LstmError> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let lstm = candle_nn::lstm(1, cfg.hidden, Default::default(), vb.pp("lstm"))?;
        let head = candle_nn::linear(cfg.hidden, 1, vb.pp("head"))?;
        let mut rng = XorShift::new(seed);
        let bound = 1.0 / (cfg.hidden as f64).sqrt();
        {
            let data = varmap.data().lock().expect("varmap lock");
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for name in names {
                let var = &data[name];
                let n = var.elem_count();
                let vals: Vec<f32> = (0..n)
                    .map(|_| {
                        if name.contains("bias") || name.ends_with(".b") {
                            0.0
                        } else {
                            ((rng.unit() * 2.0 - 1.0) * bound) as f32
                        }
                    })
                    .collect();
                var.set(&Tensor::from_vec(vals, var.shape(), &dev)?)?;
            }
        }
        let opt = candle_nn::AdamW::new(
            varmap.all_vars(),
            candle_nn::ParamsAdamW {
                lr: cfg.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        Ok(LstmModel {
            cfg,
            varmap,
            lstm,
            head,
            opt,
            rng,
        })
    }

    /// The configuration.
    pub fn config(&self) -> LstmConfig {
        self.cfg
    }

    /// Runs candle's forward pass on a batch of windows `[batch][window]`: predicted next
    /// values (last value plus predicted change).
    pub fn forward(&self, windows: &[Vec<f32>]) -> Result<Vec<f32>, LstmError> {
        let (x, last) = self.batch_tensor(windows)?;
        let pred = self.forward_tensor(&x, &last)?;
        Ok(pred.flatten_all()?.to_vec1::<f32>()?)
    }

    fn batch_tensor(&self, windows: &[Vec<f32>]) -> Result<(Tensor, Tensor), LstmError> {
        let w = windows.first().map(|w| w.len()).unwrap_or(1).max(1);
        let mut flat = Vec::with_capacity(windows.len() * w);
        let mut last = Vec::with_capacity(windows.len());
        for win in windows {
            flat.extend_from_slice(win);
            last.push(*win.last().unwrap_or(&0.0));
        }
        let x = Tensor::from_vec(flat, (windows.len(), w, 1), &Device::Cpu)?;
        let last = Tensor::from_vec(last, (windows.len(), 1), &Device::Cpu)?;
        Ok((x, last))
    }

    fn forward_tensor(&self, x: &Tensor, last: &Tensor) -> Result<Tensor, LstmError> {
        let states = self.lstm.seq(x)?;
        let h = &states.last().expect("window is not empty").h;
        Ok((self.head.forward(h)? + last)?)
    }

    /// Trains for `cfg.steps` AdamW steps on random windows of `series` (each a normalised
    /// series; windows never cross series). Returns the final batch's mean squared error, or
    /// `None` when no series is long enough to give one window and its target.
    pub fn train(&mut self, series: &[Vec<f32>]) -> Result<Option<f32>, LstmError> {
        let w = self.cfg.window;
        let usable: Vec<&Vec<f32>> = series.iter().filter(|s| s.len() > w).collect();
        let total: usize = usable.iter().map(|s| s.len() - w).sum();
        if total == 0 {
            return Ok(None);
        }
        let mut loss_v = None;
        for _ in 0..self.cfg.steps {
            let mut wins = Vec::with_capacity(self.cfg.batch);
            let mut ys = Vec::with_capacity(self.cfg.batch);
            for _ in 0..self.cfg.batch {
                let mut k = (self.rng.next_u64() % total as u64) as usize;
                for s in &usable {
                    let n = s.len() - w;
                    if k < n {
                        wins.push(s[k..k + w].to_vec());
                        ys.push(s[k + w]);
                        break;
                    }
                    k -= n;
                }
            }
            let (x, last) = self.batch_tensor(&wins)?;
            let y = Tensor::from_vec(ys, (wins.len(), 1), &Device::Cpu)?;
            let pred = self.forward_tensor(&x, &last)?;
            let loss = (pred - y)?.sqr()?.mean_all()?;
            self.opt.backward_step(&loss)?;
            loss_v = Some(loss.to_scalar::<f32>()?);
        }
        Ok(loss_v)
    }

    /// A flat copy of the weights for [`FastLstm::predict`].
    pub fn fast(&self) -> Result<FastLstm, LstmError> {
        let t = self.tensors()?;
        let get =
            |k: &str| -> Result<Vec<f32>, LstmError> { Ok(t[k].flatten_all()?.to_vec1::<f32>()?) };
        let b_ih = get("lstm.bias_ih_l0")?;
        let b_hh = get("lstm.bias_hh_l0")?;
        Ok(FastLstm {
            hidden: self.cfg.hidden,
            window: self.cfg.window,
            w_ih: get("lstm.weight_ih_l0")?,
            w_hh: get("lstm.weight_hh_l0")?,
            bias: b_ih.iter().zip(&b_hh).map(|(a, b)| a + b).collect(),
            head_w: get("head.weight")?,
            head_b: get("head.bias")?[0],
        })
    }

    fn tensors(&self) -> Result<HashMap<String, Tensor>, LstmError> {
        let data = self.varmap.data().lock().expect("varmap lock");
        Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect())
    }

    /// Saves the weights as safetensors, with a format tensor (magic, version, window,
    /// hidden) and a CRC-32 of the weights.
    pub fn save(&self, path: &Path) -> Result<(), LstmError> {
        let mut t = self.tensors()?;
        let crc = weights_crc(&t)?;
        t.insert(
            FORMAT_KEY.into(),
            Tensor::new(
                &[
                    MAGIC,
                    VERSION,
                    self.cfg.window as u32,
                    self.cfg.hidden as u32,
                ],
                &Device::Cpu,
            )?,
        );
        t.insert(CRC_KEY.into(), Tensor::new(&[crc], &Device::Cpu)?);
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&t, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|source| LstmError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Restores weights saved by [`LstmModel::save`] into a model with the same shape.
    pub fn load(cfg: LstmConfig, path: &Path) -> Result<Self, LstmError> {
        let p = path.display().to_string();
        let fmt = |what: &str| LstmError::Format {
            path: p.clone(),
            what: what.into(),
        };
        let mut t = candle_core::safetensors::load(path, &Device::Cpu)?;
        let format = t
            .remove(FORMAT_KEY)
            .ok_or_else(|| fmt("expected a novacron.format tensor (not a NovaCron weights file)"))?
            .to_vec1::<u32>()?;
        if format.len() != 4 || format[0] != MAGIC {
            return Err(fmt("bad magic in novacron.format"));
        }
        if format[1] != VERSION {
            return Err(fmt(&format!(
                "weights format version {}, expected {VERSION}",
                format[1]
            )));
        }
        if format[2] as usize != cfg.window || format[3] as usize != cfg.hidden {
            return Err(fmt(&format!(
                "weights for window {} hidden {}, expected window {} hidden {}",
                format[2], format[3], cfg.window, cfg.hidden
            )));
        }
        let crc = t
            .remove(CRC_KEY)
            .ok_or_else(|| fmt("expected a novacron.crc32 tensor"))?
            .to_vec1::<u32>()?;
        if crc.first() != Some(&weights_crc(&t)?) {
            return Err(fmt("weights checksum mismatch (damaged file)"));
        }
        let m = LstmModel::new(cfg, 1)?;
        {
            let data = m.varmap.data().lock().expect("varmap lock");
            if data.len() != t.len() {
                return Err(fmt(&format!(
                    "expected {} weight tensors, found {}",
                    data.len(),
                    t.len()
                )));
            }
            for (name, var) in data.iter() {
                let src = t
                    .get(name)
                    .ok_or_else(|| fmt(&format!("missing tensor {name}")))?;
                if src.shape() != var.shape() {
                    return Err(fmt(&format!("tensor {name} has the wrong shape")));
                }
                var.set(src)?;
            }
        }
        Ok(m)
    }
}

fn weights_crc(t: &HashMap<String, Tensor>) -> Result<u32, LstmError> {
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    let mut h = crc32fast::Hasher::new();
    for n in names {
        h.update(n.as_bytes());
        for v in t[n].flatten_all()?.to_vec1::<f32>()? {
            h.update(&v.to_le_bytes());
        }
    }
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(n: usize, phase: f32) -> Vec<f32> {
        (0..n)
            .map(|i| 0.5 + 0.4 * ((i as f32 + phase) * 0.3).sin())
            .collect()
    }

    #[test]
    fn fast_inference_matches_candle_forward() {
        let mut m = LstmModel::new(LstmConfig::default(), 7).unwrap();
        m.train(&[sine(200, 0.0)]).unwrap();
        let fast = m.fast().unwrap();
        let wins: Vec<Vec<f32>> = (0..5).map(|k| sine(16, k as f32)).collect();
        let slow = m.forward(&wins).unwrap();
        for (w, s) in wins.iter().zip(slow) {
            let f = fast.predict(w);
            assert!((f - s).abs() < 1e-5, "fast {f} candle {s}");
        }
    }

    #[test]
    fn training_reduces_error_on_a_sine() {
        let cfg = LstmConfig {
            steps: 150,
            ..Default::default()
        };
        let mut m = LstmModel::new(cfg, 3).unwrap();
        let data = sine(600, 0.0);
        let err = |m: &LstmModel| {
            let f = m.fast().unwrap();
            (16..600)
                .map(|i| (f.predict(&data[i - 16..i]) - data[i]).abs())
                .sum::<f32>()
                / 584.0
        };
        let before = err(&m);
        m.train(std::slice::from_ref(&data)).unwrap();
        let after = err(&m);
        assert!(after < before * 0.7, "before {before} after {after}");
    }

    #[test]
    fn weights_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let mut m = LstmModel::new(LstmConfig::default(), 5).unwrap();
        m.train(&[sine(100, 0.0)]).unwrap();
        m.save(&path).unwrap();
        let back = LstmModel::load(LstmConfig::default(), &path).unwrap();
        assert_eq!(m.fast().unwrap(), back.fast().unwrap());
        let other = LstmConfig {
            hidden: 8,
            ..Default::default()
        };
        let e = LstmModel::load(other, &path).unwrap_err().to_string();
        assert!(e.contains("hidden 16"), "{e}");
        // Flip a byte near the end (inside the weight data): the checksum catches it, or
        // the safetensors parser rejects the file; never a silent load.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert!(LstmModel::load(LstmConfig::default(), &path).is_err());
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(LstmModel::load(LstmConfig::default(), &path).is_err());
    }

    #[test]
    fn training_on_too_short_series_is_a_no_op() {
        let mut m = LstmModel::new(LstmConfig::default(), 5).unwrap();
        let before = m.fast().unwrap();
        assert_eq!(m.train(&[vec![0.5; 10], vec![]]).unwrap(), None);
        assert_eq!(before, m.fast().unwrap());
    }
}
