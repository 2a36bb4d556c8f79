//! The flow-matching schedule every generator samples with (diffusers
//! `FlowMatchEulerDiscreteScheduler` with a time shift): the generator picks the shift `mu`
//! for an edit (FLUX: from its image-token count), the schedule follows from it.

use serde::{Deserialize, Serialize};

/// The exponential time shift: `e^mu / (e^mu + 1/sigma - 1)`.
pub fn time_shift(mu: f64, sigma: f64) -> f64 {
    mu.exp() / (mu.exp() + (1.0 / sigma - 1.0))
}

/// A complete sampling schedule: `steps + 1` sigmas from ~1 down to a final 0.
///
/// Step `i` (0-based) moves a state from `sigmas[i]` to `sigmas[i + 1]` with one model
/// forward at `t = sigmas[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Number of Euler steps (model forwards) in the full run.
    pub steps: usize,
    /// The time shift used.
    pub mu: f64,
    /// `steps + 1` values, strictly decreasing, last one 0.
    pub sigmas: Vec<f64>,
}

impl Schedule {
    /// The shifted schedule of `steps` steps: sigmas = linspace(1, 1/steps, steps), each
    /// shifted by [`time_shift`] with `mu`, then a final 0.
    pub fn shifted(steps: usize, mu: f64) -> Self {
        assert!(steps > 0, "a schedule needs at least one step");
        let n = steps as f64;
        let mut sigmas: Vec<f64> = (0..steps)
            .map(|i| {
                let linear = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / n - 1.0) * i as f64 / (n - 1.0)
                };
                time_shift(mu, linear)
            })
            .collect();
        sigmas.push(0.0);
        Self { steps, mu, sigmas }
    }

    /// Sigma (= the model's timestep input) at step `i`.
    pub fn sigma(&self, i: usize) -> f64 {
        self.sigmas[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FLUX's `mu` for a 1024x512 diptych (2048 image tokens).
    const MU_2048: f64 = 0.8033333333333332;

    #[test]
    fn schedule_matches_diffusers_values() {
        let s = Schedule::shifted(50, MU_2048);
        assert_eq!(s.sigmas.len(), 51);
        assert_eq!(s.sigmas[0], 1.0);
        assert_eq!(s.sigmas[50], 0.0);
        // Last non-zero sigma: time_shift(mu, 1/50).
        let e = 0.80333f64.exp();
        let expected = e / (e + 49.0);
        assert!((s.sigmas[49] - expected).abs() < 1e-5);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        // Spot value computed with diffusers' FlowMatchEulerDiscreteScheduler (28 steps, mu for
        // 2048 tokens): sigmas[1] = 0.98368...
        let s28 = Schedule::shifted(28, MU_2048);
        let lin = 1.0 + (1.0 / 28.0 - 1.0) / 27.0;
        assert!((s28.sigmas[1] - time_shift(MU_2048, lin)).abs() < 1e-12);
        assert!((s28.sigmas[1] - 0.98368).abs() < 1e-4, "{}", s28.sigmas[1]);
    }

    #[test]
    fn single_step_schedule_is_one_to_zero() {
        let s = Schedule::shifted(1, MU_2048);
        assert_eq!(s.sigmas, vec![1.0, 0.0]);
    }
}
