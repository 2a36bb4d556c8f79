//! Statistics for comparing strategies over the same items: means with percentile bootstrap
//! confidence intervals, paired differences, a paired t-test, and win/tie/loss counts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// A mean with its confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Sample mean.
    pub mean: f64,
    /// Lower end of the interval.
    pub lo: f64,
    /// Upper end of the interval.
    pub hi: f64,
    /// Sample size.
    pub n: usize,
}

/// The arithmetic mean (0 for no values).
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Percentile bootstrap interval of the mean: `resamples` resamples with replacement,
/// seeded so a report is reproducible; `level` e.g. 0.95. `None` for no values.
pub fn bootstrap_mean(values: &[f64], resamples: usize, level: f64, seed: u64) -> Option<Estimate> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    let at = |q: f64| means[((q * means.len() as f64).floor() as usize).min(means.len() - 1)];
    Some(Estimate {
        mean: mean(values),
        lo: at(alpha),
        hi: at(1.0 - alpha),
        n,
    })
}

/// A paired t-test of `diffs` (a_i - b_i) against zero.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedTest {
    /// The t statistic.
    pub t: f64,
    /// Degrees of freedom (n - 1).
    pub df: f64,
    /// Two-sided p-value.
    pub p: f64,
}

/// Paired t-test; `None` with fewer than two pairs. All-equal differences give `t = ±inf`,
/// `p = 0` unless they are all zero (`t = 0`, `p = 1`).
pub fn paired_t_test(diffs: &[f64]) -> Option<PairedTest> {
    let n = diffs.len();
    if n < 2 {
        return None;
    }
    let m = mean(diffs);
    let var = diffs.iter().map(|d| (d - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    let df = (n - 1) as f64;
    if var == 0.0 {
        let (t, p) = if m == 0.0 {
            (0.0, 1.0)
        } else {
            (m.signum() * f64::INFINITY, 0.0)
        };
        return Some(PairedTest { t, df, p });
    }
    let t = m / (var / n as f64).sqrt();
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let p = (2.0 * (1.0 - dist.cdf(t.abs()))).clamp(0.0, 1.0);
    Some(PairedTest { t, df, p })
}

/// Wins, ties and losses of a over b.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinTieLoss {
    /// a > b.
    pub wins: usize,
    /// |a - b| <= tolerance.
    pub ties: usize,
    /// a < b.
    pub losses: usize,
}

/// Counts wins, ties (within `tolerance`) and losses over paired values.
pub fn win_tie_loss(pairs: &[(f64, f64)], tolerance: f64) -> WinTieLoss {
    let mut w = WinTieLoss::default();
    for &(a, b) in pairs {
        if (a - b).abs() <= tolerance {
            w.ties += 1;
        } else if a > b {
            w.wins += 1;
        } else {
            w.losses += 1;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time() {
        // 400 synthetic datasets of 40 draws from N(3, 2^2); the 95% percentile interval of
        // each should contain 3 in about 95% of them (the percentile bootstrap runs a little
        // narrow at n = 40, so accept 0.90..0.98).
        let normal = Normal::new(3.0, 2.0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let trials = 400;
        let covered = (0..trials)
            .filter(|&i| {
                let data: Vec<f64> = (0..40).map(|_| normal.sample(&mut rng)).collect();
                let e = bootstrap_mean(&data, 1000, 0.95, i as u64).unwrap();
                e.lo <= 3.0 && 3.0 <= e.hi
            })
            .count();
        let rate = covered as f64 / trials as f64;
        assert!((0.90..=0.98).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn bootstrap_interval_narrows_with_more_data_and_is_reproducible() {
        let normal = Normal::new(0.0, 1.0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let small: Vec<f64> = (0..20).map(|_| normal.sample(&mut rng)).collect();
        let large: Vec<f64> = (0..2000).map(|_| normal.sample(&mut rng)).collect();
        let (a, b) = (
            bootstrap_mean(&small, 2000, 0.95, 1).unwrap(),
            bootstrap_mean(&large, 2000, 0.95, 1).unwrap(),
        );
        assert!(b.hi - b.lo < (a.hi - a.lo) / 5.0);
        assert_eq!(bootstrap_mean(&small, 2000, 0.95, 1), Some(a));
        assert_eq!(bootstrap_mean(&[], 10, 0.95, 1), None);
    }

    #[test]
    fn paired_t_test_matches_a_hand_computed_case() {
        // d = 1..5: mean 3, sd sqrt(2.5), t = 3 / (sqrt(2.5) / sqrt(5)) = 4.2426, df 4.
        // Two-sided p = I_x(2, 1/2) with x = df / (df + t^2) = 4/22, and for a = 2, b = 1/2
        // I_x = 1 - sqrt(1 - x) (1 + x/2) = 1 - 0.904534 * 1.090909 = 0.013236.
        let r = paired_t_test(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert!((r.t - 4.242641).abs() < 1e-5, "t {}", r.t);
        assert_eq!(r.df, 4.0);
        assert!((r.p - 0.013236).abs() < 1e-5, "p {}", r.p);
        // Symmetric: negated differences give -t and the same p.
        let n = paired_t_test(&[-1.0, -2.0, -3.0, -4.0, -5.0]).unwrap();
        assert!((n.t + r.t).abs() < 1e-12 && (n.p - r.p).abs() < 1e-12);
        assert_eq!(paired_t_test(&[0.0, 0.0, 0.0]).unwrap().p, 1.0);
        assert_eq!(paired_t_test(&[1.0]), None);
    }

    #[test]
    fn wins_ties_losses() {
        let w = win_tie_loss(
            &[(2.0, 1.0), (1.0, 1.0), (0.5, 1.0), (3.0, 3.0 + 1e-9)],
            1e-6,
        );
        assert_eq!(
            w,
            WinTieLoss {
                wins: 1,
                ties: 2,
                losses: 1
            }
        );
    }
}
