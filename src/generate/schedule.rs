//! The flow-matching schedule of FLUX.1 (diffusers `FluxFillPipeline` +
//! `FlowMatchEulerDiscreteScheduler` with dynamic shifting).

use serde::{Deserialize, Serialize};

/// Token counts and shifts between which `mu` is interpolated (FLUX scheduler config).
pub const BASE_IMAGE_SEQ_LEN: f64 = 256.0;
/// See [`BASE_IMAGE_SEQ_LEN`].
pub const MAX_IMAGE_SEQ_LEN: f64 = 4096.0;
/// `mu` at [`BASE_IMAGE_SEQ_LEN`] tokens.
pub const BASE_SHIFT: f64 = 0.5;
/// `mu` at [`MAX_IMAGE_SEQ_LEN`] tokens.
pub const MAX_SHIFT: f64 = 1.15;

/// The shift parameter `mu`, linear in the number of image tokens.
pub fn flux_mu(image_tokens: usize) -> f64 {
    let m = (MAX_SHIFT - BASE_SHIFT) / (MAX_IMAGE_SEQ_LEN - BASE_IMAGE_SEQ_LEN);
    let b = BASE_SHIFT - m * BASE_IMAGE_SEQ_LEN;
    image_tokens as f64 * m + b
}

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
    /// The dynamic shift used.
    pub mu: f64,
    /// `steps + 1` values, strictly decreasing, last one 0.
    pub sigmas: Vec<f64>,
}

impl Schedule {
    /// The FLUX schedule for `steps` steps over an image of `image_tokens` packed tokens.
    ///
    /// sigmas = linspace(1, 1/steps, steps), shifted by [`time_shift`] with
    /// `mu = flux_mu(image_tokens)`, then a final 0.
    pub fn flux(steps: usize, image_tokens: usize) -> Self {
        assert!(steps > 0, "a schedule needs at least one step");
        let mu = flux_mu(image_tokens);
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

    #[test]
    fn mu_for_a_512_square_source() {
        // 1024x512 diptych -> 128x64 latent -> 64x32 = 2048 packed tokens.
        assert!((flux_mu(2048) - 0.80333).abs() < 1e-4, "{}", flux_mu(2048));
        assert!((flux_mu(256) - 0.5).abs() < 1e-12);
        assert!((flux_mu(4096) - 1.15).abs() < 1e-12);
    }

    #[test]
    fn schedule_matches_diffusers_values() {
        let s = Schedule::flux(50, 2048);
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
        let s28 = Schedule::flux(28, 2048);
        let lin = 1.0 + (1.0 / 28.0 - 1.0) / 27.0;
        assert!((s28.sigmas[1] - time_shift(flux_mu(2048), lin)).abs() < 1e-12);
        assert!((s28.sigmas[1] - 0.98368).abs() < 1e-4, "{}", s28.sigmas[1]);
    }

    #[test]
    fn single_step_schedule_is_one_to_zero() {
        let s = Schedule::flux(1, 2048);
        assert_eq!(s.sigmas, vec![1.0, 0.0]);
    }
}
