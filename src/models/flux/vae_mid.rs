//! The autoencoder's mid block (diffusers `UNetMidBlock2D` with one attention layer:
//! resnet, self-attention over every latent position, resnet), with the attention's
//! scores computed a block of query rows at a time.
//!
//! One head attends over all `h * w` latent positions: 8192 at a 1024x512 diptych, 32768 at
//! 2048x1024 (a hi-res refine), where a full f32 score matrix with its softmax copies is
//! 17 GB. Each row's softmax needs only its own row, so blocks of rows are exact: the
//! result equals the one-pass attention, and memory stays near [`ATTENTION_CHUNK_ELEMENTS`]
//! scores.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{group_norm, GroupNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::resnet::{ResnetBlock2D, ResnetBlock2DConfig};

use super::blocks::ATTENTION_CHUNK_ELEMENTS;

/// Query rows per block of the mid-block attention over `positions` keys: as many as fit
/// [`ATTENTION_CHUNK_ELEMENTS`] scores, at least one.
pub fn rows_per_block(positions: usize) -> usize {
    (ATTENTION_CHUNK_ELEMENTS / positions.max(1)).clamp(1, positions.max(1))
}

/// A 1x1 projection that files store either as a linear `[c, c]` or a 1x1 convolution
/// `[c, c, 1, 1]` (the BFL autoencoder's `q`, `k`, `v`, `proj_out`).
fn projection(channels: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
}

/// Single-head self-attention over the latent positions, with a residual.
#[derive(Debug)]
struct SpatialAttention {
    norm: GroupNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    channels: usize,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let norm = group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?;
        // diffusers' names; older checkpoints' (`query`, ...) as candle's block reads them.
        let (q, k, v, o) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            norm,
            query: projection(channels, vb.pp(q))?,
            key: projection(channels, vb.pp(k))?,
            value: projection(channels, vb.pp(v))?,
            out: projection(channels, vb.pp(o))?,
            channels,
        })
    }

    /// `[B, C, H, W]` in, the same out: `x + out(softmax(q k^T / sqrt(C)) v)`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        self.forward_in_blocks(xs, rows_per_block(h * w))
    }

    /// [`Self::forward`] with the scores of `rows` queries at a time.
    fn forward_in_blocks(&self, xs: &Tensor, rows: usize) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let in_dtype = xs.dtype();
        // [B, HW, C]
        let normed = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        // The scale goes half on q and half on k, as diffusers and candle apply it.
        let scale = (self.channels as f64).powf(-0.25);
        let q = (f32(self.query.forward(&normed)?)? * scale)?;
        let k = (f32(self.key.forward(&normed)?)? * scale)?
            .t()?
            .contiguous()?;
        let v = f32(self.value.forward(&normed)?)?;
        let positions = h * w;
        let rows = rows.max(1);
        let mut blocks = Vec::with_capacity(positions.div_ceil(rows));
        let mut start = 0;
        while start < positions {
            let n = rows.min(positions - start);
            // [B, n, HW] scores for this block of queries only.
            let scores = q.narrow(1, start, n)?.contiguous()?.matmul(&k)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            drop(scores);
            blocks.push(probs.matmul(&v)?);
            start += n;
        }
        let attended = Tensor::cat(&blocks, 1)?.to_dtype(in_dtype)?;
        let projected = self
            .out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        projected + xs
    }
}

/// The mid block: resnet, attention, resnet.
#[derive(Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    attention: SpatialAttention,
    second: ResnetBlock2D,
}

impl MidBlock {
    /// Reads `resnets.0`, `attentions.0` and `resnets.1` under `vb`.
    pub fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        let config = ResnetBlock2DConfig {
            eps: 1e-6,
            groups,
            output_scale_factor: 1.0,
            temb_channels: None,
            ..Default::default()
        };
        Ok(Self {
            first: ResnetBlock2D::new(vb.pp("resnets.0"), channels, config)?,
            attention: SpatialAttention::new(vb.pp("attentions.0"), channels, groups)?,
            second: ResnetBlock2D::new(vb.pp("resnets.1"), channels, config)?,
        })
    }

    /// `[B, C, H, W]` in and out.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.first.forward(xs, None)?;
        let xs = self.attention.forward(&xs)?;
        self.second.forward(&xs, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Blocks of query rows give the one-pass attention: the same softmax per row.
    #[test]
    fn attention_in_blocks_equals_one_pass() {
        let dev = Device::Cpu;
        let (b, c, h, w) = (1, 8, 6, 10);
        let vb = VarBuilder::from_backend(
            Box::new(crate::models::bench::RandomWeights::default()),
            DType::F32,
            dev.clone(),
        );
        let attention = SpatialAttention::new(vb, c, 4).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
        // 60 positions in blocks of 7 rows (the last one 4).
        let blocked = attention.forward_in_blocks(&xs, 7).unwrap();
        // The same attention in one pass.
        let normed = attention
            .norm
            .forward(&xs)
            .unwrap()
            .reshape((b, c, h * w))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let q = attention.query.forward(&normed).unwrap();
        let k = attention.key.forward(&normed).unwrap();
        let v = attention.value.forward(&normed).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (c as f64).sqrt()).unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let whole = (attention
            .out
            .forward(&probs.matmul(&v).unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, c, h, w))
            .unwrap()
            + &xs)
            .unwrap();
        let err = (blocked - whole)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-5, "{err}");
        assert_eq!(rows_per_block(32768), 2048);
        assert_eq!(rows_per_block(60), 60);
    }
}
