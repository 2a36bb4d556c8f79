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

    /// The step an image-to-image run of this schedule starts at for `strength` in (0, 1],
    /// as diffusers' `FluxFillPipeline.get_timesteps` chooses it: `steps * strength` steps
    /// are run (at most all), so the start is `int(steps - steps * strength)`. A strength so
    /// small that `steps - steps * strength` rounds to `steps` would run no step (diffusers
    /// refuses it too): an error.
    pub fn start_for_strength(&self, strength: f64) -> Result<usize, String> {
        start_for_strength(self.steps, strength).map_err(|why| format!("strength {strength} {why}"))
    }
}

/// [`Schedule::start_for_strength`] for a schedule of `steps` steps, before it is built;
/// the error says what is wrong with the strength without naming it.
pub fn start_for_strength(steps: usize, strength: f64) -> Result<usize, String> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err("must be in (0, 1]".into());
    }
    let n = steps as f64;
    let run = (n * strength).min(n);
    let start = (n - run).max(0.0) as usize;
    if start >= steps {
        return Err(format!(
            "runs no step of {steps} (at least 1/{steps} is needed)"
        ));
    }
    Ok(start)
}

/// The flow-matching forward process: `image` noised to `sigma`, `sigma * noise + (1 -
/// sigma) * image` (diffusers' `FlowMatchEulerDiscreteScheduler.scale_noise`), the state an
/// image-to-image run starts from.
pub fn noised(
    image: &candle_core::Tensor,
    noise: &candle_core::Tensor,
    sigma: f64,
) -> candle_core::Result<candle_core::Tensor> {
    (noise * sigma)? + (image * (1.0 - sigma))?
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
    fn the_start_for_a_strength_is_diffusers_get_timesteps() {
        let s = Schedule::shifted(10, MU_2048);
        // diffusers: t_start = int(max(10 - min(10 * s, 10), 0)).
        assert_eq!(s.start_for_strength(1.0), Ok(0));
        assert_eq!(s.start_for_strength(0.35), Ok(6));
        assert_eq!(s.start_for_strength(0.6), Ok(4));
        assert_eq!(s.start_for_strength(0.1), Ok(9));
        // Any strength above 0 runs at least one step: int(10 - 0.5) = 9.
        assert_eq!(s.start_for_strength(0.05), Ok(9));
        assert!(s.start_for_strength(0.0).is_err());
        assert!(s.start_for_strength(1e-17).is_err());
        assert!(s.start_for_strength(f64::NAN).is_err());
        assert!(s.start_for_strength(1.5).is_err());
        let s28 = Schedule::shifted(28, MU_2048);
        // 28 * 0.35 = 9.8 steps: t_start = int(18.2) = 18, 10 steps run.
        assert_eq!(s28.start_for_strength(0.35), Ok(18));
    }

    #[test]
    fn single_step_schedule_is_one_to_zero() {
        let s = Schedule::shifted(1, MU_2048);
        assert_eq!(s.sigmas, vec![1.0, 0.0]);
    }
}
