//! FLUX's scheduler settings: the dynamic shift `mu`, linear in the number of image tokens
//! (diffusers `FluxFillPipeline.calculate_shift` with the values of FLUX.1's
//! `scheduler/scheduler_config.json`).

use serde::{Deserialize, Serialize};

/// The dynamic-shift line: `mu` goes from `base_shift` at `base_image_seq_len` tokens to
/// `max_shift` at `max_image_seq_len` tokens (field names as in `scheduler_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DynamicShift {
    /// Token count at which `mu = base_shift`.
    pub base_image_seq_len: f64,
    /// Token count at which `mu = max_shift`.
    pub max_image_seq_len: f64,
    /// `mu` at `base_image_seq_len`.
    pub base_shift: f64,
    /// `mu` at `max_image_seq_len`.
    pub max_shift: f64,
}

impl DynamicShift {
    /// FLUX.1 [dev] and Fill [dev]: 256 -> 0.5, 4096 -> 1.15.
    pub const FLUX: Self = Self {
        base_image_seq_len: 256.0,
        max_image_seq_len: 4096.0,
        base_shift: 0.5,
        max_shift: 1.15,
    };

    /// The shift `mu` for an image of `image_tokens` packed tokens.
    pub fn mu(&self, image_tokens: usize) -> f64 {
        let m =
            (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len);
        let b = self.base_shift - m * self.base_image_seq_len;
        image_tokens as f64 * m + b
    }
}

impl Default for DynamicShift {
    fn default() -> Self {
        Self::FLUX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mu_for_a_512_square_source() {
        // 1024x512 diptych -> 128x64 latent -> 64x32 = 2048 packed tokens.
        let mu = DynamicShift::FLUX.mu(2048);
        assert!((mu - 0.80333).abs() < 1e-4, "{mu}");
        assert!((DynamicShift::FLUX.mu(256) - 0.5).abs() < 1e-12);
        assert!((DynamicShift::FLUX.mu(4096) - 1.15).abs() < 1e-12);
    }
}
