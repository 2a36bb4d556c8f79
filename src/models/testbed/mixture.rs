//! The testbed's flow model: the exact rectified-flow velocity of a mixture of outcomes.
//!
//! With `x_t = (1 - s) x0 + s * eps` and `x0` drawn from the outcome latents `mu_k` with
//! priors `pi_k`, the posterior over outcomes given `x_t` has weights
//! `w_k ∝ pi_k * exp(-|x_t - (1 - s) mu_k|^2 / (2 s^2))`, `E[x0 | x_t] = sum_k w_k mu_k`,
//! and the velocity `E[eps - x0 | x_t] = (x_t - E[x0 | x_t]) / s`. Integrated by the shared
//! Euler sampler like any model's, each seed's noise lands on one outcome, early steps
//! already lean towards it, and the landing rates follow the priors.
//!
//! ## How early the outcome is decided: the outcome contrast
//!
//! Which outcome a seed lands on is fixed by its noise, but a preview can only name it
//! once the posterior has left the priors, which takes until `(1 - s) |mu_j - mu_k| / s` is
//! well above 1. With the outcomes' latents as their images give them, step-4 previews name
//! the final outcome for ~96% of seeds: far more reliable than previews of real flow models.
//! The `contrast` knob (0 to 1] moves every outcome latent towards their mean,
//! `mu_k <- mean + contrast * (mu_k - mean)`, so outcomes are told apart later in the
//! schedule and early previews stay blends nearer the likeliest outcome. Decoding solves for
//! blend weights against the same moved latents, so a committed final still renders as its
//! outcome's image; one that has not fully committed by the last step renders as a blend,
//! as a real model's half-made edit would. The flow stays exact for the moved mixture.

use candle_core::{DType, Device, Tensor, D};
use image::{Rgb, RgbImage};

use super::latent::{token_grid, LatentMap, CELL};
use super::outcomes::{outcome_set, Outcome};
use crate::edit::{make_diptych, EditContext};
use crate::error::ModelError;

/// One edit's mixture: its outcomes and their latents.
pub struct Mixture {
    outcomes: Vec<Outcome>,
    /// `[K, D]` outcome latents.
    mu: Tensor,
    /// `[K]` log priors.
    log_prior: Tensor,
    /// `[K]` squared norms of `mu`.
    mu_sq: Tensor,
    /// Token columns of the diptych grid.
    token_cols: usize,
    /// Panel size.
    panel: (u32, u32),
}

impl Mixture {
    /// The outcomes of `edit` at `difficulty`, encoded with `map`, their latents at
    /// `contrast` (see the module docs; 1 = as the images give them).
    pub fn new(
        edit: &EditContext,
        difficulty: f32,
        contrast: f32,
        map: &LatentMap,
    ) -> Result<Self, ModelError> {
        if !(contrast > 0.0 && contrast <= 1.0) {
            return Err(ModelError::Input(format!(
                "outcome contrast {contrast}: expected a number in (0, 1]"
            )));
        }
        let (w, h) = edit.panel_size();
        if w % 16 != 0 || h % 16 != 0 {
            return Err(ModelError::Input(format!(
                "panel {w}x{h}: both sides must be multiples of 16"
            )));
        }
        let outcomes = outcome_set(edit, difficulty).map_err(ModelError::Input)?;
        let diptych = make_diptych(&edit.source).image;
        let mut rows = Vec::new();
        for o in &outcomes {
            let mut d = diptych.clone();
            image::imageops::replace(&mut d, o.image.as_ref(), w as i64, 0);
            rows.extend(map.encode(&d));
        }
        let k = outcomes.len();
        let dims = rows.len() / k;
        if contrast < 1.0 {
            let mean: Vec<f32> = (0..dims)
                .map(|d| (0..k).map(|i| rows[i * dims + d]).sum::<f32>() / k as f32)
                .collect();
            for (i, v) in rows.iter_mut().enumerate() {
                let m = mean[i % dims];
                *v = m + contrast * (*v - m);
            }
        }
        let mu = Tensor::from_vec(rows, (k, dims), &Device::Cpu)?;
        let mu_sq = mu.sqr()?.sum(D::Minus1)?;
        let priors: Vec<f32> = outcomes.iter().map(|o| o.prior.ln()).collect();
        let log_prior = Tensor::new(priors, &Device::Cpu)?;
        let (_, tw) = token_grid(2 * w, h);
        Ok(Self {
            outcomes,
            mu,
            log_prior,
            mu_sq,
            token_cols: tw,
            panel: (w, h),
        })
    }

    /// Packed image tokens of the diptych and the shape of one latent state.
    pub fn latent_shape(&self) -> Vec<usize> {
        let (w, h) = self.panel;
        let (th, tw) = token_grid(2 * w, h);
        vec![th * tw, 64]
    }

    /// Posterior weights `[B, K]` over outcomes for latents `[B, D]` at `sigma`.
    fn posterior(&self, x: &Tensor, sigma: f64) -> candle_core::Result<Tensor> {
        // -|x - a mu|^2 / (2 s^2) up to a per-row constant: (a x.mu - a^2 |mu|^2 / 2) / s^2.
        let a = 1.0 - sigma;
        let xm = x.matmul(&self.mu.t()?)?; // [B, K]
        let quad = (self.mu_sq.unsqueeze(0)? * (0.5 * a * a))?;
        let logits = ((xm * a)?.broadcast_sub(&quad)? / (sigma * sigma))?
            .broadcast_add(&self.log_prior.unsqueeze(0)?)?;
        candle_nn::ops::softmax_last_dim(&logits)
    }

    /// The exact velocity for latents `[B, ..latent_shape]` at `sigma`.
    pub fn velocity(&self, latents: &Tensor, sigma: f64) -> Result<Tensor, ModelError> {
        let shape = latents.dims().to_vec();
        let x = latents.flatten_from(1)?.to_dtype(DType::F32)?; // [B, D]
        let w = self.posterior(&x, sigma)?; // [B, K]
        let x0 = w.matmul(&self.mu)?; // [B, D]
        Ok(((x - x0)? / sigma)?.reshape(shape)?)
    }

    /// Renders latents as the right panel.
    pub fn decode(&self, latents: &Tensor, map: &LatentMap) -> Result<RgbImage, ModelError> {
        let z = latents.flatten_all()?.to_dtype(DType::F32)?;
        // Express z as a blend of outcome latents (ridge least squares on the simplex),
        // render that blend at full resolution, and add what the blend does not explain
        // (remaining noise) at latent resolution.
        let weights = blend_weights(self, &z)?;
        let blend_latent = Tensor::new(weights.as_slice(), &Device::Cpu)?
            .unsqueeze(0)?
            .matmul(&self.mu)?
            .squeeze(0)?;
        let residual: Vec<f32> = (z - blend_latent)?.to_vec1()?;
        let (w, h) = self.panel;
        let mut panel = RgbImage::new(w, h);
        let images: Vec<&RgbImage> = self.outcomes.iter().map(|o| o.image.as_ref()).collect();
        for y in 0..h {
            for x in 0..w {
                let mut rgb = [0f32; 3];
                for (img, &wk) in images.iter().zip(&weights) {
                    let px = img.get_pixel(x, y);
                    for c in 0..3 {
                        rgb[c] += wk * px[c] as f32;
                    }
                }
                let (cx, cy) = (((x + w) / CELL) as usize, (y / CELL) as usize);
                let r = map.cell_rgb(&residual, self.token_cols, cx, cy);
                panel.put_pixel(
                    x,
                    y,
                    Rgb(std::array::from_fn(|c| {
                        (rgb[c] + r[c] * 127.5).round().clamp(0.0, 255.0) as u8
                    })),
                );
            }
        }
        // Only the right half is decoded: the output is the right panel, as with FLUX.
        Ok(panel)
    }
}

/// Non-negative weights summing to 1 whose blend of outcome latents is closest to `z`.
///
/// Solved in differences from outcome 0 (`z - mu_0 = sum_k w_k (mu_k - mu_0)`): outcomes
/// share most of their content, and the raw Gram matrix would lose it to cancellation.
fn blend_weights(p: &Mixture, z: &Tensor) -> Result<Vec<f32>, ModelError> {
    let k = p.outcomes.len();
    let base = p.mu.get(0)?;
    let delta =
        p.mu.narrow(0, 1, k - 1)?
            .broadcast_sub(&base.unsqueeze(0)?)?; // [K-1, D]
    let gram: Vec<Vec<f32>> = delta.matmul(&delta.t()?)?.to_vec2()?;
    let b: Vec<f32> = delta
        .matmul(&(z - &base)?.unsqueeze(1)?)?
        .squeeze(1)?
        .to_vec1()?;
    let trace: f64 = (0..k - 1).map(|i| gram[i][i] as f64).sum::<f64>() / (k - 1) as f64;
    let a: Vec<Vec<f64>> = (0..k - 1)
        .map(|i| {
            (0..k - 1)
                .map(|j| gram[i][j] as f64 + if i == j { 1e-6 * trace } else { 0.0 })
                .collect()
        })
        .collect();
    let rest = solve(a, b.iter().map(|&v| v as f64).collect());
    let mut w: Vec<f64> = std::iter::once(1.0 - rest.iter().sum::<f64>())
        .chain(rest)
        .map(|v| v.max(0.0))
        .collect();
    let total: f64 = w.iter().sum();
    if total <= 0.0 {
        w = vec![1.0; k];
    }
    let total: f64 = w.iter().sum();
    Ok(w.into_iter().map(|v| (v / total) as f32).collect())
}

/// Gaussian elimination with partial pivoting (K is tiny).
#[allow(clippy::needless_range_loop)]
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("non-empty");
        a.swap(col, pivot);
        b.swap(col, pivot);
        let d = a[col][col];
        if d.abs() < 1e-12 {
            continue;
        }
        for row in 0..n {
            if row != col {
                let f = a[row][col] / d;
                for c in col..n {
                    a[row][c] -= f * a[col][c];
                }
                b[row] -= f * b[col];
            }
        }
    }
    (0..n)
        .map(|i| {
            if a[i][i].abs() < 1e-12 {
                0.0
            } else {
                b[i] / a[i][i]
            }
        })
        .collect()
}
