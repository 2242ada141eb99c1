//! The Numenta Anomaly Benchmark (NAB), implemented here: reading a NAB data folder
//! (`data/**.csv`, `labels/combined_windows.json`, `config/profiles.json`), writing results
//! CSVs (`timestamp,value,anomaly_score,label`), and NAB's scoring.
//!
//! Scoring follows NAB v1.x (`nab/sweeper.py`):
//! - the first `min(floor(0.15 * n), 0.15 * 5000)` records of a series are probationary and
//!   not scored;
//! - a detection (score ≥ threshold) at index `i` inside a window `[l, r]` of width
//!   `w = r - l + 1` is worth `tp * S(-(r - i + 1) / w) / S(-1)` where
//!   `S(x) = 2 / (1 + e^{5x}) - 1` (the scaled sigmoid; `S(x) = -1` for `x ≥ 3`); only the
//!   best (earliest) detection of a window counts; a window with no detection costs `-fn`;
//! - a detection outside windows costs `fp * S(|i - r_prev| / (w_prev - 1))` after a window
//!   (`-fp` when no window precedes it);
//! - one threshold per profile, chosen to maximise the total over all files;
//! - normalised score `100 * (raw - null) / (perfect - null)` with `null = -fn * windows`
//!   (never detects) and `perfect = tp * windows`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::timestamp::{parse_timestamp, TimestampError};

/// Errors reading or writing a NAB folder.
#[derive(Debug, thiserror::Error)]
pub enum NabError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file is not what NAB writes.
    #[error("{path}: expected NAB JSON ({what}): {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
        /// The cause.
        source: serde_json::Error,
    },
    /// A CSV line is not `timestamp,value`.
    #[error("{path}:{line}: expected `timestamp,value` with a number value, got {got:?}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending line.
        got: String,
    },
    /// A timestamp does not parse.
    #[error("{path}: {source}")]
    Timestamp {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: TimestampError,
    },
    /// A scoring profile is missing from profiles.json.
    #[error("{path}: expected profile {name:?} with tpWeight, fpWeight, fnWeight")]
    Profile {
        /// The file.
        path: PathBuf,
        /// The missing profile.
        name: String,
    },
    /// The data folder holds no series.
    #[error("{0}: no CSV series under data/")]
    Empty(PathBuf),
}

/// One scoring profile: the weights of true positives, false positives and false negatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Profile name as in NAB (`standard`, `reward_low_FP_rate`, `reward_low_FN_rate`).
    pub name: String,
    /// Weight of a true positive.
    pub tp: f64,
    /// Weight of a false positive.
    pub fp: f64,
    /// Weight of a false negative.
    pub fn_: f64,
}

impl Profile {
    /// NAB's three profiles with their published weights.
    pub fn nab_defaults() -> Vec<Profile> {
        vec![
            Profile::new("standard", 1.0, 0.11, 1.0),
            Profile::new("reward_low_FP_rate", 1.0, 0.22, 1.0),
            Profile::new("reward_low_FN_rate", 1.0, 0.11, 2.0),
        ]
    }

    /// A profile from its weights.
    pub fn new(name: &str, tp: f64, fp: f64, fn_: f64) -> Profile {
        Profile {
            name: name.into(),
            tp,
            fp,
            fn_,
        }
    }

    /// Reads the three profiles from NAB's `config/profiles.json`.
    pub fn load(path: &Path) -> Result<Vec<Profile>, NabError> {
        let text = read(path)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| NabError::Json {
                path: path.into(),
                what: "profiles",
                source,
            })?;
        let mut out = Vec::new();
        for name in ["standard", "reward_low_FP_rate", "reward_low_FN_rate"] {
            let m = &v[name]["CostMatrix"];
            let get = |k: &str| m[k].as_f64();
            match (get("tpWeight"), get("fpWeight"), get("fnWeight")) {
                (Some(tp), Some(fp), Some(fn_)) => out.push(Profile::new(name, tp, fp, fn_)),
                _ => {
                    return Err(NabError::Profile {
                        path: path.into(),
                        name: name.into(),
                    })
                }
            }
        }
        Ok(out)
    }
}

/// One NAB series with its labelled windows.
#[derive(Debug, Clone)]
pub struct Series {
    /// Path relative to `data/` (e.g. `realTweets/Twitter_volume_AAPL.csv`).
    pub name: String,
    /// Timestamps as written in the file.
    pub raw_timestamps: Vec<String>,
    /// Timestamps in seconds since the Unix epoch.
    pub timestamps: Vec<i64>,
    /// Values.
    pub values: Vec<f64>,
    /// Anomaly windows as inclusive record index ranges.
    pub windows: Vec<(usize, usize)>,
}

/// A NAB folder: series, windows and profiles.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The series, sorted by name.
    pub series: Vec<Series>,
    /// The scoring profiles.
    pub profiles: Vec<Profile>,
}

fn read(path: &Path) -> Result<String, NabError> {
    std::fs::read_to_string(path).map_err(|source| NabError::Io {
        path: path.into(),
        source,
    })
}

impl Corpus {
    /// Loads `root/data/**/*.csv`, `root/labels/combined_windows.json` and
    /// `root/config/profiles.json` (NAB's defaults when that file is absent).
    pub fn load(root: &Path) -> Result<Corpus, NabError> {
        let windows_path = root.join("labels/combined_windows.json");
        let windows: BTreeMap<String, Vec<(String, String)>> =
            serde_json::from_str(&read(&windows_path)?).map_err(|source| NabError::Json {
                path: windows_path.clone(),
                what: "{series: [[start, end], ...]}",
                source,
            })?;
        let profiles_path = root.join("config/profiles.json");
        let profiles = if profiles_path.exists() {
            Profile::load(&profiles_path)?
        } else {
            Profile::nab_defaults()
        };
        let data = root.join("data");
        let mut files = Vec::new();
        collect_csv(&data, &mut files)?;
        files.sort();
        let mut series = Vec::new();
        for file in files {
            let name = file
                .strip_prefix(&data)
                .unwrap_or(&file)
                .to_string_lossy()
                .replace('\\', "/");
            let mut s = read_series(&file, &name)?;
            let labels = windows.get(&name).cloned().unwrap_or_default();
            for (start, end) in labels {
                let ts = |t: &str| {
                    parse_timestamp(t).map_err(|source| NabError::Timestamp {
                        path: windows_path.clone(),
                        source,
                    })
                };
                let (a, b) = (ts(&start)?, ts(&end)?);
                let l = s.timestamps.iter().position(|&t| t >= a);
                let r = s.timestamps.iter().rposition(|&t| t <= b);
                if let (Some(l), Some(r)) = (l, r) {
                    if l <= r {
                        s.windows.push((l, r));
                    }
                }
            }
            series.push(s);
        }
        if series.is_empty() {
            return Err(NabError::Empty(root.into()));
        }
        Ok(Corpus { series, profiles })
    }
}

fn collect_csv(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), NabError> {
    let rd = std::fs::read_dir(dir).map_err(|source| NabError::Io {
        path: dir.into(),
        source,
    })?;
    for entry in rd {
        let entry = entry.map_err(|source| NabError::Io {
            path: dir.into(),
            source,
        })?;
        let p = entry.path();
        if p.is_dir() {
            collect_csv(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "csv") {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads one `timestamp,value` CSV (with a header line).
pub fn read_series(path: &Path, name: &str) -> Result<Series, NabError> {
    let text = read(path)?;
    let mut s = Series {
        name: name.into(),
        raw_timestamps: Vec::new(),
        timestamps: Vec::new(),
        values: Vec::new(),
        windows: Vec::new(),
    };
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || NabError::Csv {
            path: path.into(),
            line: i + 1,
            got: line.into(),
        };
        let (t, v) = line.split_once(',').ok_or_else(bad)?;
        let value: f64 = v.trim().parse().map_err(|_| bad())?;
        let ts = parse_timestamp(t.trim()).map_err(|source| NabError::Timestamp {
            path: path.into(),
            source,
        })?;
        s.raw_timestamps.push(t.trim().into());
        s.timestamps.push(ts);
        s.values.push(value);
    }
    Ok(s)
}

/// Writes a NAB results CSV: `timestamp,value,anomaly_score,label`.
pub fn write_results(path: &Path, series: &Series, scores: &[f64]) -> Result<(), NabError> {
    use std::fmt::Write as _;
    let mut label = vec![0u8; series.values.len()];
    for &(l, r) in &series.windows {
        for x in &mut label[l..=r] {
            *x = 1;
        }
    }
    let mut out = String::from("timestamp,value,anomaly_score,label\n");
    for i in 0..series.values.len() {
        let _ = writeln!(
            out,
            "{},{},{},{}",
            series.raw_timestamps[i], series.values[i], scores[i], label[i]
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| NabError::Io {
            path: dir.into(),
            source,
        })?;
    }
    std::fs::write(path, out).map_err(|source| NabError::Io {
        path: path.into(),
        source,
    })
}

/// NAB's scaled sigmoid of a relative position in (or after) a window.
pub fn scaled_sigmoid(x: f64) -> f64 {
    if x >= 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }
}

/// The probationary length of a series of `n` records.
pub fn probationary_length(n: usize) -> usize {
    ((0.15 * n as f64).floor()).min(0.15 * 5000.0) as usize
}

/// One scorable record: where it lies relative to the windows, before profile weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Place {
    /// Inside window number `window` (index into the file's windows); the value is the
    /// unweighted true-positive score (1.0 at the window's first record).
    Window {
        /// Window index in the file.
        window: usize,
        /// `S(position) / S(-1)`.
        value: f64,
    },
    /// Outside windows; the value is the unweighted (negative) false-positive score.
    Outside(f64),
}

/// The scorable records of one series (probationary records dropped), each with its place.
pub fn sweep(n: usize, windows: &[(usize, usize)]) -> Vec<(usize, Place)> {
    let max_tp = scaled_sigmoid(-1.0);
    let prob = probationary_length(n);
    let mut out = Vec::with_capacity(n.saturating_sub(prob));
    let mut prev: Option<(usize, f64)> = None; // (right index, width)
    let mut wi = 0;
    let mut cur: Option<(usize, usize, f64)> = None; // (window idx, right, width)
    for i in 0..n {
        if cur.is_none() && wi < windows.len() && windows[wi].0 == i {
            let (l, r) = windows[wi];
            cur = Some((wi, r, (r - l + 1) as f64));
            wi += 1;
        }
        let place = match cur {
            Some((w, r, width)) => {
                let pos = -((r as f64) - (i as f64) + 1.0) / width;
                Place::Window {
                    window: w,
                    value: scaled_sigmoid(pos) / max_tp,
                }
            }
            None => {
                let pos = match prev {
                    None => 3.0,
                    Some((r, width)) => (i as f64 - r as f64).abs() / (width - 1.0).max(1e-9),
                };
                Place::Outside(scaled_sigmoid(pos))
            }
        };
        if i >= prob {
            out.push((i, place));
        }
        if let Some((_, r, width)) = cur {
            if i == r {
                prev = Some((r, width));
                cur = None;
            }
        }
    }
    out
}

/// A series' scores with its windows, ready for scoring.
#[derive(Debug, Clone)]
pub struct ScoredSeries {
    /// Anomaly score per record.
    pub scores: Vec<f64>,
    /// Windows as inclusive index ranges.
    pub windows: Vec<(usize, usize)>,
}

/// The result of scoring at one threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileScore {
    /// Profile name.
    pub profile: String,
    /// The threshold (detections are records with score ≥ threshold).
    pub threshold: f64,
    /// The raw (unnormalised) total.
    pub raw: f64,
    /// The null detector's total.
    pub null: f64,
    /// The perfect detector's total.
    pub perfect: f64,
    /// `100 * (raw - null) / (perfect - null)`.
    pub normalised: f64,
    /// Windows detected.
    pub tp_windows: usize,
    /// Scorable windows.
    pub windows: usize,
    /// Detections outside windows.
    pub fp: usize,
}

/// Scores all series at one threshold.
pub fn score_at(series: &[ScoredSeries], profile: &Profile, threshold: f64) -> ProfileScore {
    let mut raw = 0.0;
    let mut windows = 0;
    let mut tp_windows = 0;
    let mut fp = 0;
    for s in series {
        let points = sweep(s.scores.len(), &s.windows);
        let mut best: BTreeMap<usize, f64> = BTreeMap::new();
        for &(i, place) in &points {
            match place {
                Place::Window { window, value } => {
                    let b = best.entry(window).or_insert(-profile.fn_);
                    if s.scores[i] >= threshold {
                        *b = b.max(value * profile.tp);
                    }
                }
                Place::Outside(v) => {
                    if s.scores[i] >= threshold {
                        raw += v * profile.fp;
                        fp += 1;
                    }
                }
            }
        }
        windows += best.len();
        tp_windows += best.values().filter(|&&b| b > -profile.fn_).count();
        raw += best.values().sum::<f64>();
    }
    finish(profile, threshold, raw, windows, tp_windows, fp)
}

fn finish(
    profile: &Profile,
    threshold: f64,
    raw: f64,
    windows: usize,
    tp_windows: usize,
    fp: usize,
) -> ProfileScore {
    let null = -profile.fn_ * windows as f64;
    let perfect = profile.tp * windows as f64;
    let normalised = if perfect > null {
        100.0 * (raw - null) / (perfect - null)
    } else {
        0.0
    };
    ProfileScore {
        profile: profile.name.clone(),
        threshold,
        raw,
        null,
        perfect,
        normalised,
        tp_windows,
        windows,
        fp,
    }
}

/// NAB's threshold optimiser: sweeps every distinct score over all series at once and returns
/// the best-scoring threshold for the profile (ties: the higher threshold).
pub fn optimise(series: &[ScoredSeries], profile: &Profile) -> ProfileScore {
    struct Pt {
        score: f64,
        window: Option<usize>, // global window id
        value: f64,
    }
    let mut pts = Vec::new();
    let mut n_windows = 0;
    for s in series {
        let points = sweep(s.scores.len(), &s.windows);
        let mut local: BTreeMap<usize, usize> = BTreeMap::new();
        for &(i, place) in &points {
            let score = if s.scores[i].is_finite() {
                s.scores[i]
            } else {
                0.0
            };
            match place {
                Place::Window { window, value } => {
                    let id = *local.entry(window).or_insert_with(|| {
                        n_windows += 1;
                        n_windows - 1
                    });
                    pts.push(Pt {
                        score,
                        window: Some(id),
                        value: value * profile.tp,
                    });
                }
                Place::Outside(v) => pts.push(Pt {
                    score,
                    window: None,
                    value: v * profile.fp,
                }),
            }
        }
    }
    pts.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut best_w = vec![-profile.fn_; n_windows];
    let mut total = -profile.fn_ * n_windows as f64;
    let mut fp = 0usize;
    let mut tp_windows = 0usize;
    let mut best = (f64::INFINITY, total, 0usize, 0usize);
    let mut i = 0;
    while i < pts.len() {
        let th = pts[i].score;
        while i < pts.len() && pts[i].score == th {
            let p = &pts[i];
            match p.window {
                Some(w) => {
                    if p.value > best_w[w] {
                        if best_w[w] == -profile.fn_ {
                            tp_windows += 1;
                        }
                        total += p.value - best_w[w];
                        best_w[w] = p.value;
                    }
                }
                None => {
                    total += p.value;
                    fp += 1;
                }
            }
            i += 1;
        }
        if total > best.1 {
            best = (th, total, tp_windows, fp);
        }
    }
    let threshold = if best.0.is_infinite() { 1.1 } else { best.0 };
    finish(profile, threshold, best.1, n_windows, best.2, best.3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_profile() -> Profile {
        Profile::new("standard", 1.0, 0.11, 1.0)
    }

    #[test]
    fn scaled_sigmoid_matches_nab_reference_points() {
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298_151_430_3).abs() < 1e-12);
        assert!((scaled_sigmoid(-0.5) - 0.848_283_639_957_512_8).abs() < 1e-12);
        assert_eq!(scaled_sigmoid(0.0), 0.0);
        assert!((scaled_sigmoid(1.0) + 0.986_614_298_151_430_3).abs() < 1e-12);
        assert_eq!(scaled_sigmoid(3.0), -1.0);
    }

    #[test]
    fn probationary_is_15_percent_capped_at_750() {
        assert_eq!(probationary_length(100), 15);
        assert_eq!(probationary_length(1000), 150);
        assert_eq!(probationary_length(10_000), 750);
        assert_eq!(probationary_length(3), 0);
    }

    #[test]
    fn detection_at_window_start_scores_tp_weight() {
        // 100 records, window [50, 59] (width 10), probation = 15.
        let s = ScoredSeries {
            scores: (0..100).map(|i| if i == 50 { 1.0 } else { 0.0 }).collect(),
            windows: vec![(50, 59)],
        };
        let r = score_at(std::slice::from_ref(&s), &std_profile(), 0.5);
        assert!((r.raw - 1.0).abs() < 1e-12, "{r:?}");
        assert!((r.normalised - 100.0).abs() < 1e-9);
        let best = optimise(&[s], &std_profile());
        assert_eq!(best.threshold, 1.0);
        assert!((best.normalised - 100.0).abs() < 1e-9);
    }

    #[test]
    fn late_detection_scores_the_scaled_sigmoid_of_its_position() {
        // Window [50, 59], width 10. Detection at 57: position -(59-57+1)/10 = -0.3.
        let s = ScoredSeries {
            scores: (0..100).map(|i| if i == 57 { 1.0 } else { 0.0 }).collect(),
            windows: vec![(50, 59)],
        };
        let r = score_at(&[s], &std_profile(), 0.5);
        let expect = scaled_sigmoid(-0.3) / scaled_sigmoid(-1.0);
        // 2/(1+e^-1.5)-1 = 0.635149... / 0.986614...
        assert!((expect - 0.643_766).abs() < 1e-5, "{expect}");
        assert!((r.raw - expect).abs() < 1e-12);
        // null = -1, perfect = 1: normalised = 100 * (raw + 1) / 2.
        assert!((r.normalised - 50.0 * (expect + 1.0)).abs() < 1e-9);
    }

    #[test]
    fn false_positives_cost_fp_weight_and_less_just_after_a_window() {
        // FP before any window: -1 * 0.11. FP 2 records after the window [50, 59]:
        // position |61 - 59| / (10 - 1) = 2/9 → S(2/9).
        let scores: Vec<f64> = (0..100)
            .map(|i| if i == 20 || i == 61 { 1.0 } else { 0.0 })
            .collect();
        let s = ScoredSeries {
            scores,
            windows: vec![(50, 59)],
        };
        let r = score_at(&[s], &std_profile(), 0.5);
        let expect = -1.0 /* missed window */ - 0.11 + 0.11 * scaled_sigmoid(2.0 / 9.0);
        assert!((r.raw - expect).abs() < 1e-12, "{} vs {expect}", r.raw);
        assert_eq!(r.fp, 2);
        assert_eq!(r.tp_windows, 0);
    }

    #[test]
    fn probationary_detections_do_not_count() {
        let s = ScoredSeries {
            scores: (0..100).map(|i| if i < 15 { 1.0 } else { 0.0 }).collect(),
            windows: vec![],
        };
        let r = score_at(&[s], &std_profile(), 0.5);
        assert_eq!(r.raw, 0.0);
        assert_eq!(r.fp, 0);
    }

    #[test]
    fn only_the_best_detection_in_a_window_counts() {
        let s = ScoredSeries {
            scores: (0..100)
                .map(|i| if (52..=58).contains(&i) { 1.0 } else { 0.0 })
                .collect(),
            windows: vec![(50, 59)],
        };
        let r = score_at(&[s], &std_profile(), 0.5);
        let expect = scaled_sigmoid(-0.8) / scaled_sigmoid(-1.0);
        assert!((r.raw - expect).abs() < 1e-12);
    }

    #[test]
    fn optimiser_matches_exhaustive_thresholds_across_files_and_profiles() {
        // Two files, deterministic pseudo-random scores: the optimiser's best equals the best
        // of score_at over every distinct score.
        let mut x = 12345u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1000) as f64 / 1000.0
        };
        let a = ScoredSeries {
            scores: (0..200).map(|_| rnd()).collect(),
            windows: vec![(40, 60), (120, 140)],
        };
        let b = ScoredSeries {
            scores: (0..150).map(|_| rnd()).collect(),
            windows: vec![(100, 110)],
        };
        let files = [a, b];
        for p in Profile::nab_defaults() {
            let best = optimise(&files, &p);
            let mut ths: Vec<f64> = files.iter().flat_map(|f| f.scores.clone()).collect();
            ths.push(1.1);
            let brute = ths
                .iter()
                .map(|&t| score_at(&files, &p, t).raw)
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                (best.raw - brute).abs() < 1e-9,
                "{}: {best:?} vs {brute}",
                p.name
            );
            let again = score_at(&files, &p, best.threshold);
            assert!((again.raw - best.raw).abs() < 1e-9);
        }
    }

    #[test]
    fn null_detector_scores_zero() {
        let s = ScoredSeries {
            scores: vec![0.0; 100],
            windows: vec![(50, 59)],
        };
        for p in Profile::nab_defaults() {
            let r = optimise(std::slice::from_ref(&s), &p);
            assert!(r.normalised.abs() < 1e-9, "{r:?}");
        }
    }
}
