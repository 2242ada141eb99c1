//! Per-VM (and host) time series kept in memory: a bounded window per series, for the
//! anomaly detector and the gRPC API.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// The scope name of the host's own series.
pub const HOST: &str = "host";

/// One series' samples, oldest first.
type Window = VecDeque<(u64, f64)>;

/// Bounded windows of `(unix time ms, value)` samples, keyed by (scope, series); the scope
/// is a VM id or [`HOST`].
#[derive(Debug)]
pub struct SeriesStore {
    cap: usize,
    inner: Mutex<BTreeMap<(String, String), Window>>,
}

impl SeriesStore {
    /// A store keeping the last `cap` samples of each series (at least 1).
    pub fn new(cap: usize) -> Self {
        SeriesStore {
            cap: cap.max(1),
            inner: Mutex::new(BTreeMap::new()),
        }
    }

    /// Appends a sample, dropping the oldest beyond the window.
    pub fn push(&self, scope: &str, series: &str, ts_ms: u64, value: f64) {
        let mut g = self.inner.lock().unwrap();
        let w = g
            .entry((scope.to_string(), series.to_string()))
            .or_default();
        if w.len() == self.cap {
            w.pop_front();
        }
        w.push_back((ts_ms, value));
    }

    /// The window of one series, oldest first (empty if unknown).
    pub fn window(&self, scope: &str, series: &str) -> Vec<(u64, f64)> {
        let g = self.inner.lock().unwrap();
        g.get(&(scope.to_string(), series.to_string()))
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The newest sample of one series.
    pub fn last(&self, scope: &str, series: &str) -> Option<(u64, f64)> {
        let g = self.inner.lock().unwrap();
        g.get(&(scope.to_string(), series.to_string()))?
            .back()
            .copied()
    }

    /// Names of the series of `scope`.
    pub fn series_of(&self, scope: &str) -> Vec<String> {
        let g = self.inner.lock().unwrap();
        g.keys()
            .filter(|(s, _)| s == scope)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Forgets every series of `scope` (a VM that is gone).
    pub fn remove_scope(&self, scope: &str) {
        self.inner.lock().unwrap().retain(|(s, _), _| s != scope);
    }

    /// The window length.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_bounded_and_ordered() {
        let s = SeriesStore::new(3);
        for i in 0..5u64 {
            s.push("vm1", "x", i, i as f64);
        }
        s.push("vm2", "x", 9, 9.0);
        assert_eq!(s.window("vm1", "x"), vec![(2, 2.0), (3, 3.0), (4, 4.0)]);
        assert_eq!(s.window("vm1", "y"), vec![]);
        assert_eq!(s.series_of("vm2"), vec!["x".to_string()]);
        s.remove_scope("vm1");
        assert!(s.window("vm1", "x").is_empty());
        assert_eq!(s.window("vm2", "x").len(), 1);
    }
}
