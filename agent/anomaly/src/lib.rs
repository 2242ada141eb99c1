//! On-node anomaly detection and load forecasting for NovaCron (see
//! `docs/design/anomaly.md`).
//!
//! - [`detector`]: the per-series streaming detector (`push(timestamp, value) -> [0, 1]`);
//! - [`lstm`]: the candle LSTM forecaster, its training and its safetensors weights;
//! - [`likelihood`]: Numenta-style anomaly likelihood of a raw score;
//! - [`node`]: the agent-facing API (self-training [`node::Detector`], a node's series sharing
//!   one model in [`node::NodeDetector`], background retraining in [`node::Retrainer`]);
//! - [`nab`]: the Numenta Anomaly Benchmark (data, results files, scoring), and [`eval`]
//!   running the detector over a NAB folder.
#![deny(missing_docs)]

pub mod detector;
pub mod eval;
pub mod likelihood;
pub mod lstm;
pub mod nab;
pub mod node;
pub mod timestamp;
