//! Anomaly likelihood (after Numenta's `AnomalyLikelihood`): the short-term mean of a raw
//! score is compared with the long-term distribution of that mean (an exponentially weighted
//! mean and variance, so memory is constant); the output is the Gaussian upper-tail
//! probability `q` mapped to a log score in [0, 1] (`ln(2q + 1e-10) / ln(1e-10)`: 0 at or
//! below the mean, 0.5 for a tail of 5e-6, 1.0 for a tail below 5e-11).

/// Parameters of the likelihood (global).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LikelihoodConfig {
    /// Records of the short-term mean.
    pub average: usize,
    /// Records before the distribution is trusted (output 0 until then).
    pub learning: usize,
    /// Half-life of the long-term mean and variance, in records.
    pub half_life: f64,
    /// Floor of the long-term standard deviation (raw score units).
    pub std_floor: f64,
}

impl Default for LikelihoodConfig {
    fn default() -> Self {
        LikelihoodConfig {
            average: 10,
            learning: 300,
            half_life: 3000.0,
            std_floor: 0.005,
        }
    }
}

/// Maximum short-term averaging window.
pub const MAX_AVERAGE: usize = 32;

/// Streaming likelihood state of one raw score (about 200 bytes).
#[derive(Debug, Clone)]
pub struct Likelihood {
    cfg: LikelihoodConfig,
    ring: [f32; MAX_AVERAGE],
    pos: usize,
    filled: usize,
    sum: f64,
    n: u64,
    mean: f64,
    var: f64,
}

/// The standard normal upper tail `Q(z) = erfc(z / sqrt 2) / 2`.
pub fn normal_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// Maps a tail probability to the log score in [0, 1].
pub fn log_score(tail: f64) -> f64 {
    let v = (tail.max(0.0) + 1e-10).ln() / (1e-10f64).ln();
    v.clamp(0.0, 1.0)
}

impl Likelihood {
    /// A fresh state.
    pub fn new(cfg: LikelihoodConfig) -> Self {
        Likelihood {
            cfg,
            ring: [0.0; MAX_AVERAGE],
            pos: 0,
            filled: 0,
            sum: 0.0,
            n: 0,
            mean: 0.0,
            var: 0.0,
        }
    }

    /// Forgets the short-term window (after a gap in time); keeps the long-term distribution.
    pub fn reset_short_term(&mut self) {
        self.ring = [0.0; MAX_AVERAGE];
        self.pos = 0;
        self.filled = 0;
        self.sum = 0.0;
    }

    /// Adds one raw score (non-finite counts as 0) and returns the log score of the
    /// short-term mean against the distribution seen before it.
    pub fn update(&mut self, raw: f64) -> f64 {
        let raw = if raw.is_finite() { raw } else { 0.0 };
        let k = self.cfg.average.clamp(1, MAX_AVERAGE);
        if self.filled == k {
            self.sum -= self.ring[self.pos] as f64;
        } else {
            self.filled += 1;
        }
        self.ring[self.pos] = raw as f32;
        self.sum += raw;
        self.pos = (self.pos + 1) % k;
        let avg = self.sum / self.filled as f64;
        let out = if (self.n as usize) < self.cfg.learning {
            0.0
        } else {
            let std = self.var.sqrt().max(self.cfg.std_floor);
            // Twice the upper tail: 1 (score 0) at or below the mean.
            log_score((2.0 * normal_tail((avg - self.mean) / std)).min(1.0))
        };
        // Long-term statistics: a plain mean until one half-life has passed, then EW.
        self.n += 1;
        let alpha = (1.0 / self.n as f64).max(std::f64::consts::LN_2 / self.cfg.half_life);
        let d = avg - self.mean;
        self.mean += alpha * d;
        self.var = (1.0 - alpha) * (self.var + alpha * d * d);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        assert!((erfc(1.0) - 0.157_299_207).abs() < 1e-7);
        assert!((erfc(-1.0) - 1.842_700_793).abs() < 1e-7);
        assert!((normal_tail(3.0) - 0.001_349_898).abs() < 1e-8);
    }

    #[test]
    fn log_score_maps_tails() {
        assert!(log_score(1.0) < 1e-9);
        assert!((log_score(1e-5) - 0.5).abs() < 1e-4);
        assert!((log_score(0.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_jump_in_raw_scores_is_unlikely_and_steady_noise_is_not() {
        let mut l = Likelihood::new(LikelihoodConfig::default());
        let mut x = 1u64;
        let mut last = 0.0;
        for _ in 0..1000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let noise = (x >> 40) as f64 / (1u64 << 24) as f64;
            last = l.update(0.05 + 0.02 * noise);
        }
        assert!(last < 0.3, "steady noise scored {last}");
        let mut peak: f64 = 0.0;
        for _ in 0..5 {
            peak = peak.max(l.update(0.6));
        }
        assert!(peak > 0.9, "jump scored {peak}");
    }
}
