//! Conditioning embeddings: sinusoidal timestep features, the timestep/guidance/pooled-text
//! MLPs, and the rotary position tables over the token grid.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::linear::{AdaptedLinear, Linears};

/// Width of the sinusoidal timestep features.
const TIME_FEATURES: usize = 256;

/// The frequencies of [`timestep_features`], `[1, 128]` in f32 on `dev`. The exponent in
/// f32 step by step as torch computes it, the exp correctly rounded: with guidance 50 the
/// arguments reach 5e4, so one ulp of a frequency moves an angle ~3e-3 rad.
pub fn timestep_frequencies(dev: &Device) -> Result<Tensor> {
    let half = TIME_FEATURES / 2;
    let log_period = -(10000f64.ln()) as f32;
    let exponent: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32 / half as f32) as f64).exp() as f32)
        .collect();
    Tensor::from_vec(exponent, (1, half), dev)
}

/// Sinusoidal features of `t` (already scaled by 1000), `[B] -> [B, 256]` in f32, laid out
/// `[cos | sin]` (diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`).
pub fn timestep_features(t: &Tensor) -> Result<Tensor> {
    timestep_features_with(t, &timestep_frequencies(t.device())?)
}

/// [`timestep_features`] with the frequencies already on `t`'s device: a forward made on a
/// GPU then copies nothing from the host (a copy from pageable memory waits for the device).
fn timestep_features_with(t: &Tensor, freqs: &Tensor) -> Result<Tensor> {
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// `linear_1 -> SiLU -> linear_2`, the shape of every conditioning MLP in FLUX.
#[derive(Debug, Clone)]
pub struct MlpEmbedder {
    linear_1: AdaptedLinear,
    linear_2: AdaptedLinear,
}

impl MlpEmbedder {
    /// Loads `linear_1` (in -> hidden) and `linear_2` (hidden -> hidden).
    pub fn new(vb: VarBuilder, input: usize, hidden: usize, linears: &Linears) -> Result<Self> {
        Ok(Self {
            linear_1: linears.build(vb.pp("linear_1"), input, hidden)?,
            linear_2: linears.build(vb.pp("linear_2"), hidden, hidden)?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// The block-conditioning vector `temb = time(t) + guidance(g) + text(pooled)`.
#[derive(Debug, Clone)]
pub struct TimeTextEmbedding {
    timestep: MlpEmbedder,
    guidance: Option<MlpEmbedder>,
    text: MlpEmbedder,
    /// [`timestep_frequencies`] on the model's device, made once.
    frequencies: Tensor,
}

impl TimeTextEmbedding {
    /// Every linear layer of the embedders.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut all = vec![
            &self.timestep.linear_1,
            &self.timestep.linear_2,
            &self.text.linear_1,
            &self.text.linear_2,
        ];
        if let Some(g) = &self.guidance {
            all.extend([&g.linear_1, &g.linear_2]);
        }
        all
    }

    /// Loads `time_text_embed.{timestep,guidance,text}_embedder`.
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        pooled_dim: usize,
        guidance: bool,
        linears: &Linears,
    ) -> Result<Self> {
        Ok(Self {
            timestep: MlpEmbedder::new(vb.pp("timestep_embedder"), TIME_FEATURES, hidden, linears)?,
            guidance: if guidance {
                Some(MlpEmbedder::new(
                    vb.pp("guidance_embedder"),
                    TIME_FEATURES,
                    hidden,
                    linears,
                )?)
            } else {
                None
            },
            text: MlpEmbedder::new(vb.pp("text_embedder"), pooled_dim, hidden, linears)?,
            frequencies: timestep_frequencies(vb.device())?,
        })
    }

    /// `sigma` and `guidance` are `[B]` (unscaled), `pooled` is `[B, pooled_dim]`.
    pub fn forward(&self, sigma: &Tensor, guidance: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let freqs = &self.frequencies;
        let t = timestep_features_with(&(sigma * 1000.0)?, freqs)?.to_dtype(dtype)?;
        let mut emb = self.timestep.forward(&t)?;
        if let Some(g_embedder) = &self.guidance {
            let g = timestep_features_with(&(guidance * 1000.0)?, freqs)?.to_dtype(dtype)?;
            emb = (emb + g_embedder.forward(&g)?)?;
        }
        emb + self.text.forward(pooled)?
    }
}

/// Rotary tables for a joint `[text; image]` sequence: `(cos, sin)`, each
/// `[seq, head_dim / 2]` in f32, for interleaved-pair rotation (`candle_nn::rotary_emb::rope_i`).
///
/// `ids` is `[seq, 3]` (f32) of (index, row, column) positions; axis `i` uses
/// `axes[i] / 2` frequencies `theta^(-2k / axes[i])`, computed in f64 as diffusers does.
pub fn rope_tables(
    ids: &[[f32; 3]],
    axes: &[usize],
    theta: f64,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half: usize = axes.iter().sum::<usize>() / 2;
    let mut cos = Vec::with_capacity(ids.len() * half);
    let mut sin = Vec::with_capacity(ids.len() * half);
    for pos in ids {
        for (axis, &dim) in axes.iter().enumerate() {
            for k in 0..dim / 2 {
                let freq = 1.0 / theta.powf((2 * k) as f64 / dim as f64);
                let angle = pos[axis] as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (ids.len(), half), dev)?,
        Tensor::from_vec(sin, (ids.len(), half), dev)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_features_are_cos_then_sin() {
        let t = Tensor::new(&[0f32, 500.0], &Device::Cpu).unwrap();
        let f: Vec<Vec<f32>> = timestep_features(&t).unwrap().to_vec2().unwrap();
        assert_eq!(f[0][0], 1.0); // cos(0)
        assert_eq!(f[0][128], 0.0); // sin(0)
        assert!((f[1][0] - 500f32.cos()).abs() < 1e-4);
        assert!((f[1][128] - 500f32.sin()).abs() < 1e-4);
    }

    #[test]
    fn rope_tables_start_at_angle_zero() {
        let (cos, sin) = rope_tables(
            &[[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]],
            &[4, 6, 6],
            10000.0,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(cos.dims(), &[2, 8]);
        let c: Vec<Vec<f32>> = cos.to_vec2().unwrap();
        let s: Vec<Vec<f32>> = sin.to_vec2().unwrap();
        assert!(c[0].iter().all(|&v| v == 1.0));
        // Row axis starts at column 2 of the half table; its first frequency is 1.
        assert!((s[1][2] - 1f32.sin()).abs() < 1e-6);
        assert!((s[1][5] - 2f32.sin()).abs() < 1e-6);
    }
}
