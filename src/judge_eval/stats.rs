//! Agreement statistics between a judge and human labels: pairwise accuracy (both orders
//! asked, combined into one verdict), position bias, rank correlations against ratings,
//! and bootstrap confidence intervals over items.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use crate::eval::stats::Estimate;
use crate::judge::Preference;

/// A preference between two edits, named by edit (A, B), not by the position it was shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// Edit A is better.
    A,
    /// Edit B is better.
    B,
    /// Neither (the benchmark's tie, or a judge whose two orders disagree).
    Tie,
}

impl Label {
    fn vote(self) -> i32 {
        match self {
            Label::A => 1,
            Label::B => -1,
            Label::Tie => 0,
        }
    }
}

/// The answer of the call that showed A first, as a label.
pub fn label_a_first(p: Preference) -> Label {
    match p {
        Preference::First => Label::A,
        Preference::Second => Label::B,
        Preference::Tie => Label::Tie,
    }
}

/// The answer of the call that showed B first, as a label.
pub fn label_b_first(p: Preference) -> Label {
    match p {
        Preference::First => Label::B,
        Preference::Second => Label::A,
        Preference::Tie => Label::Tie,
    }
}

/// The judge's verdict on a pair from its two calls (A shown first, then B shown first):
/// the sum of their votes (+1 A, -1 B, 0 tie). Two orders that contradict each other give a
/// tie: a judge that only follows position has no preference.
pub fn verdict(a_first: Preference, b_first: Preference) -> Label {
    match label_a_first(a_first).vote() + label_b_first(b_first).vote() {
        v if v > 0 => Label::A,
        v if v < 0 => Label::B,
        _ => Label::Tie,
    }
}

/// Whether the two calls chose the same position (first both times, or second both times):
/// the answer followed where an edit was shown, not which edit it was.
pub fn follows_position(a_first: Preference, b_first: Preference) -> bool {
    a_first == b_first && a_first != Preference::Tie
}

/// Average ranks (1-based; tied values share the mean of their ranks).
pub fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) hold equal values: ranks start+1..=end.
        let shared = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = shared;
        }
        start = end;
    }
    ranks
}

/// Pearson correlation; `None` with fewer than two points or a constant side.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 || y.len() != n {
        return None;
    }
    let (mx, my) = (
        x.iter().sum::<f64>() / n as f64,
        y.iter().sum::<f64>() / n as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Spearman's rank correlation (Pearson on average ranks, so ties are handled).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    pearson(&ranks(x), &ranks(y))
}

/// Kendall's tau-b: (concordant - discordant) / sqrt((n0 - tx)(n0 - ty)), where tx and ty
/// count the pairs tied on one side. `None` with fewer than two points or a constant side.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 || y.len() != n {
        return None;
    }
    let (mut concordant, mut discordant, mut tied_x, mut tied_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let dx = x[i].total_cmp(&x[j]) as i64;
            let dy = y[i].total_cmp(&y[j]) as i64;
            match (dx, dy) {
                (0, 0) => {}
                (0, _) => tied_x += 1,
                (_, 0) => tied_y += 1,
                _ if dx == dy => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let left = (concordant + discordant + tied_x) as f64;
    let right = (concordant + discordant + tied_y) as f64;
    (left > 0.0 && right > 0.0).then(|| (concordant - discordant) as f64 / (left * right).sqrt())
}

/// A statistic of `n` items with a percentile bootstrap interval: `statistic` is given the
/// indices of a resample (with replacement) and may decline one (`None`, e.g. a constant
/// resample for a correlation); the point estimate is the statistic of all items. Seeded,
/// so a report is reproducible. `None` when the statistic of all items is undefined.
pub fn bootstrap(
    n: usize,
    resamples: usize,
    level: f64,
    seed: u64,
    statistic: impl Fn(&[usize]) -> Option<f64>,
) -> Option<Estimate> {
    let all: Vec<usize> = (0..n).collect();
    let point = statistic(&all)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draws: Vec<f64> = (0..resamples.max(1))
        .filter_map(|_| {
            let pick: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            statistic(&pick)
        })
        .collect();
    if draws.is_empty() {
        return Some(Estimate {
            mean: point,
            lo: point,
            hi: point,
            n,
        });
    }
    draws.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    let at = |q: f64| draws[((q * draws.len() as f64).floor() as usize).min(draws.len() - 1)];
    Some(Estimate {
        mean: point,
        lo: at(alpha),
        hi: at(1.0 - alpha),
        n,
    })
}

/// The mean of 0/1 outcomes (a rate) with its bootstrap interval.
pub fn rate(hits: &[bool], resamples: usize, seed: u64) -> Option<Estimate> {
    let values: Vec<f64> = hits.iter().map(|&h| f64::from(u8::from(h))).collect();
    crate::eval::stats::bootstrap_mean(&values, resamples, 0.95, seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Preference::{First, Second, Tie};

    #[test]
    fn two_orders_combine_into_one_verdict() {
        // A first: "first" = A; B first: "second" = A.
        assert_eq!(verdict(First, Second), Label::A);
        assert_eq!(verdict(Second, First), Label::B);
        // Position only: the two orders cancel.
        assert_eq!(verdict(First, First), Label::Tie);
        assert_eq!(verdict(Second, Second), Label::Tie);
        // One tie and one vote: the vote stands.
        assert_eq!(verdict(Tie, Second), Label::A);
        assert_eq!(verdict(Tie, First), Label::B);
        assert_eq!(verdict(Tie, Tie), Label::Tie);
        assert!(follows_position(First, First) && follows_position(Second, Second));
        assert!(!follows_position(First, Second) && !follows_position(Tie, Tie));
    }

    #[test]
    fn ranks_share_ties() {
        assert_eq!(ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
        assert_eq!(ranks(&[1.0, 1.0, 1.0]), vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn correlations_match_hand_computed_values() {
        // Hand computed: x = 1..5, y = (2, 1, 4, 3, 5). Rank differences d = (-1, 1, -1, 1, 0),
        // sum d^2 = 4, rho = 1 - 6*4 / (5*24) = 0.8. Pairs: 10, discordant (1,2) and (3,4),
        // so tau = (8 - 2) / 10 = 0.6.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 1.0, 4.0, 3.0, 5.0];
        assert!((spearman(&x, &y).unwrap() - 0.8).abs() < 1e-12);
        assert!((kendall_tau_b(&x, &y).unwrap() - 0.6).abs() < 1e-12);
        let reversed: Vec<f64> = x.iter().rev().copied().collect();
        assert!((spearman(&x, &reversed).unwrap() + 1.0).abs() < 1e-12);
        assert!((kendall_tau_b(&x, &reversed).unwrap() + 1.0).abs() < 1e-12);
        // Ties: x = (1, 2, 2, 3), y = (1, 2, 3, 3). Pairs: (0,1) c, (0,2) c, (0,3) c,
        // (1,2) tied in x, (1,3) c, (2,3) tied in y: C = 4, D = 0, tx = 1, ty = 1,
        // tau_b = 4 / sqrt(5 * 5) = 0.8.
        let tx = [1.0, 2.0, 2.0, 3.0];
        let ty = [1.0, 2.0, 3.0, 3.0];
        assert!((kendall_tau_b(&tx, &ty).unwrap() - 0.8).abs() < 1e-12);
        // Spearman with ties: ranks (1, 2.5, 2.5, 4) and (1, 2, 3.5, 3.5); Pearson of those:
        // centred (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 1, 1): sxy = 2.25 + 1.5 = 3.75,
        // sxx = 4.5, syy = 2.25 + 0.25 + 1 + 1 = 4.5, rho = 3.75 / 4.5.
        assert!((spearman(&tx, &ty).unwrap() - 3.75 / 4.5).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(kendall_tau_b(&[1.0], &[1.0]), None);
    }

    #[test]
    fn bootstrap_brackets_the_point_estimate_and_is_reproducible() {
        let x: Vec<f64> = (0..50).map(f64::from).collect();
        let y: Vec<f64> = x.iter().map(|v| v + 10.0 * ((v * 7.0) % 3.0)).collect();
        let stat = |idx: &[usize]| {
            let (a, b): (Vec<f64>, Vec<f64>) = idx.iter().map(|&i| (x[i], y[i])).unzip();
            spearman(&a, &b)
        };
        let e = bootstrap(50, 500, 0.95, 7, stat).unwrap();
        assert_eq!(e, bootstrap(50, 500, 0.95, 7, stat).unwrap());
        assert!(e.lo <= e.mean && e.mean <= e.hi && e.lo < e.hi, "{e:?}");
        assert_eq!(e.mean, spearman(&x, &y).unwrap());
        let r = rate(&[true, true, false, true], 200, 1).unwrap();
        assert_eq!(r.mean, 0.75);
        assert_eq!(r.n, 4);
    }
}
