//! The two FLUX block kinds: double-stream (separate text and image weights, joint
//! attention) and single-stream (one fused stream with a parallel MLP).

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{RmsNorm, VarBuilder};

use super::linear::{AdaptedLinear, LinearInput, Linears};
use crate::models::cuda::cudnn_attention::{self as cudnn, AttentionRoute};
use crate::models::cuda::switch::{use_kernel, Kernel};
use crate::models::cuda::{attention as flash, glue};

/// Layer norm without affine parameters (eps 1e-6), as every FLUX modulation uses.
fn plain_layer_norm(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(candle_core::DType::F32)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centred = xs.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + 1e-6)?.sqrt()?)?
        .to_dtype(dtype)
}

/// `norm(x) * (1 + scale) + shift` with `[B, hidden]` modulation vectors (one fused pass on
/// CUDA, [`glue::modulated_layer_norm`]).
pub(crate) fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if use_kernel(Kernel::Modulate, xs) {
        return glue::modulated_layer_norm(xs, shift, scale);
    }
    plain_layer_norm(xs)?
        .broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// [`modulate`] as the input of linear layers; with `fp8_rows` (the layers take fp8 rows)
/// the modulate kernel writes the fp8 rows in the same pass
/// ([`glue::modulated_layer_norm_fp8`]).
pub(crate) fn modulate_input(
    xs: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    fp8_rows: bool,
) -> Result<LinearInput> {
    if fp8_rows && use_kernel(Kernel::Modulate, xs) {
        let (dense, rows) = glue::modulated_layer_norm_fp8(xs, shift, scale)?;
        return Ok(LinearInput::with_fp8_rows(dense, rows));
    }
    Ok(LinearInput::new(modulate(xs, shift, scale)?))
}

/// `xs + gate * ys` with a `[B, hidden]` gate (one fused pass on CUDA,
/// [`glue::gated_residual`]).
pub(crate) fn gated_residual(xs: &Tensor, ys: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if use_kernel(Kernel::GatedResidual, xs) {
        return glue::gated_residual(xs, ys, gate);
    }
    xs + ys.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// Whether the fused attention path (flash attention, q/k norm + RoPE in the `[B, S, H * D]`
/// layout) runs for `xs` `[B, S, hidden]` split into `heads`.
fn fused_attention(xs: &Tensor, heads: usize) -> Result<bool> {
    Ok(use_kernel(Kernel::Attention, xs) && flash::supports(xs.dim(D::Minus1)?, heads, xs.dtype()))
}

/// The fused path's attention of q, k, v `[B, S, H * D]`: our flash kernel, or on CUDA
/// cuDNN's fused SDPA where `ICEDIT_CUDA_ATTENTION=cudnn` asks for it (a `cudnn` build).
fn fused_attention_of(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if q.device().is_cuda() && cudnn::route() == AttentionRoute::Cudnn {
        return cudnn::cudnn_attention(q, k, v, heads);
    }
    flash::flash_attention(q, k, v, heads)
}

/// A linear layer built as `linears` says (weight form, LoRA).
pub fn adapted_linear(
    vb: VarBuilder,
    input: usize,
    output: usize,
    linears: &Linears,
) -> Result<AdaptedLinear> {
    linears.build(vb, input, output)
}

/// Splits a `[B, n * hidden]` modulation vector into `n` chunks.
fn chunks(xs: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    xs.chunk(n, D::Minus1)
}

/// Query/key/value projections with per-head RMS norms for one stream.
#[derive(Debug, Clone)]
struct Qkv {
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl Qkv {
    fn linears(&self) -> [&AdaptedLinear; 3] {
        [&self.q, &self.k, &self.v]
    }

    fn new(
        vb: &VarBuilder,
        names: [&str; 5],
        hidden: usize,
        head_dim: usize,
        linears: &Linears,
    ) -> Result<Self> {
        Ok(Self {
            q: adapted_linear(vb.pp(names[0]), hidden, hidden, linears)?,
            k: adapted_linear(vb.pp(names[1]), hidden, hidden, linears)?,
            v: adapted_linear(vb.pp(names[2]), hidden, hidden, linears)?,
            norm_q: candle_nn::rms_norm(head_dim, 1e-6, vb.pp(names[3]))?,
            norm_k: candle_nn::rms_norm(head_dim, 1e-6, vb.pp(names[4]))?,
        })
    }

    /// Whether the projections read their input as fp8 rows.
    fn takes_fp8_rows(&self, xs: &Tensor) -> bool {
        self.q.takes_fp8_rows(xs)
    }

    /// `[B, S, hidden]` -> three `[B, heads, S, head_dim]` tensors, q and k normalised.
    fn forward(&self, xs: &LinearInput, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = xs.dense().dims3()?;
        let split = |t: Tensor| t.reshape((b, s, heads, ()))?.transpose(1, 2)?.contiguous();
        let q = split(self.q.forward_input(xs)?)?.apply(&self.norm_q)?;
        let k = split(self.k.forward_input(xs)?)?.apply(&self.norm_k)?;
        let v = split(self.v.forward_input(xs)?)?;
        Ok((q, k, v))
    }

    /// The fused path's projections: `[B, S, hidden]` -> three `[B, S, hidden]` tensors
    /// (heads side by side, as the flash attention reads them), q and k normalised and
    /// rotated with `cos`, `sin` `[S, head_dim / 2]`.
    fn forward_fused(
        &self,
        xs: &LinearInput,
        heads: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let norm_rope = |t: Tensor, norm: &RmsNorm| {
            if use_kernel(Kernel::QkNormRope, &t) {
                glue::qk_norm_rope(&t, norm.weight(), cos, sin, heads)
            } else {
                glue::unfused::qk_norm_rope(&t, norm.weight(), cos, sin, heads)
            }
        };
        let q = norm_rope(self.q.forward_input(xs)?, &self.norm_q)?;
        let k = norm_rope(self.k.forward_input(xs)?, &self.norm_k)?;
        Ok((q, k, self.v.forward_input(xs)?))
    }
}

/// Score-matrix elements one attention chunk may hold (2^26: 0.8 GB in bf16 with the f32
/// softmax beside it). Full-size FLUX at a 512 panel has 6.5M scores per head, so a batch
/// of 8 candidates (192 heads) runs as 20 chunks instead of holding 15 GB of scores.
pub const ATTENTION_CHUNK_ELEMENTS: usize = 1 << 26;

/// Rotary embedding over `[B, H, S, D]` with `[S, D/2]` tables, then scaled dot-product
/// attention; returns `[B, S, H * D]`. The `[S, S]` score matrices are materialised a few
/// (batch, head) pairs at a time, at most [`ATTENTION_CHUNK_ELEMENTS`] scores at once, so
/// memory does not grow with the batch; every pair is computed exactly as in one pass.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &(Tensor, Tensor)) -> Result<Tensor> {
    attention_in_chunks(q, k, v, rope, ATTENTION_CHUNK_ELEMENTS)
}

/// [`attention`] with at most `max_scores` score elements per chunk (at least one pair).
fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &(Tensor, Tensor),
    max_scores: usize,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (cos, sin) = (rope.0.to_dtype(dtype)?, rope.1.to_dtype(dtype)?);
    let q = candle_nn::rotary_emb::rope_i(&q.contiguous()?, &cos, &sin)?;
    let k = candle_nn::rotary_emb::rope_i(&k.contiguous()?, &cos, &sin)?;
    let (b, h, s, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    // [B * H, S, D]
    let (q, k, v) = (
        q.reshape((b * h, s, d))?,
        k.reshape((b * h, s, d))?,
        v.contiguous()?.reshape((b * h, s, d))?,
    );
    let pairs_per_chunk = (max_scores / (s * s)).clamp(1, b * h);
    let mut outs = Vec::with_capacity((b * h).div_ceil(pairs_per_chunk));
    for start in (0..b * h).step_by(pairs_per_chunk) {
        let n = pairs_per_chunk.min(b * h - start);
        let (q, k, v) = (
            q.narrow(0, start, n)?,
            k.narrow(0, start, n)?,
            v.narrow(0, start, n)?,
        );
        // Scale and softmax in f32 in one pass on a GPU (models::cuda), in the model dtype out.
        let weights = crate::models::cuda::scaled_softmax_last_dim(q.matmul(&k.t()?)?, scale)?;
        outs.push(weights.matmul(&v)?);
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 0)?
    };
    out.reshape((b, h, s, d))?
        .transpose(1, 2)?
        .reshape((b, s, h * d))
}

/// GELU(tanh) MLP: `net.0.proj` (hidden -> 4 hidden) and `net.2` (4 hidden -> hidden).
#[derive(Debug, Clone)]
struct FeedForward {
    up: AdaptedLinear,
    down: AdaptedLinear,
}

impl FeedForward {
    fn new(vb: VarBuilder, hidden: usize, mlp: usize, linears: &Linears) -> Result<Self> {
        Ok(Self {
            up: adapted_linear(vb.pp("net.0.proj"), hidden, mlp, linears)?,
            down: adapted_linear(vb.pp("net.2"), mlp, hidden, linears)?,
        })
    }
}

impl FeedForward {
    /// On CUDA the GELU is the first GEMM's epilogue ([`AdaptedLinear::forward_gelu`]).
    fn forward(&self, xs: &LinearInput) -> Result<Tensor> {
        self.down.forward(&self.up.forward_gelu_input(xs)?)
    }
}

/// A double-stream block (`transformer_blocks.N`).
#[derive(Debug, Clone)]
pub struct DoubleBlock {
    img_mod: AdaptedLinear,
    txt_mod: AdaptedLinear,
    img_qkv: Qkv,
    txt_qkv: Qkv,
    img_out: AdaptedLinear,
    txt_out: AdaptedLinear,
    img_ff: FeedForward,
    txt_ff: FeedForward,
    heads: usize,
}

impl DoubleBlock {
    /// Every linear layer of the block.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut all = vec![
            &self.img_mod,
            &self.txt_mod,
            &self.img_out,
            &self.txt_out,
            &self.img_ff.up,
            &self.img_ff.down,
            &self.txt_ff.up,
            &self.txt_ff.down,
        ];
        all.extend(self.img_qkv.linears());
        all.extend(self.txt_qkv.linears());
        all
    }

    /// Loads one block from `vb` (diffusers names).
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        heads: usize,
        mlp: usize,
        linears: &Linears,
    ) -> Result<Self> {
        let head_dim = hidden / heads;
        let attn = vb.pp("attn");
        Ok(Self {
            img_mod: adapted_linear(vb.pp("norm1.linear"), hidden, 6 * hidden, linears)?,
            txt_mod: adapted_linear(vb.pp("norm1_context.linear"), hidden, 6 * hidden, linears)?,
            img_qkv: Qkv::new(
                &attn,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                hidden,
                head_dim,
                linears,
            )?,
            txt_qkv: Qkv::new(
                &attn,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                hidden,
                head_dim,
                linears,
            )?,
            img_out: adapted_linear(attn.pp("to_out.0"), hidden, hidden, linears)?,
            txt_out: adapted_linear(attn.pp("to_add_out"), hidden, hidden, linears)?,
            img_ff: FeedForward::new(vb.pp("ff"), hidden, mlp, linears)?,
            txt_ff: FeedForward::new(vb.pp("ff_context"), hidden, mlp, linears)?,
            heads,
        })
    }

    /// `img` `[B, S_img, hidden]`, `txt` `[B, S_txt, hidden]`, `temb` `[B, hidden]`;
    /// `rope` covers the joint `[txt; img]` sequence.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor)> {
        self.forward_with(img, txt, temb, |img_in, txt_in| {
            self.attention(img_in, txt_in, rope)
        })
    }

    /// The block's attention (diffusers' `transformer_blocks.N.attn`): q/k/v of both
    /// modulated streams, joint attention, and the output projections. Returns
    /// `(img_attn [B, S_img, hidden], txt_attn [B, S_txt, hidden])`.
    pub fn attention(
        &self,
        img_in: &LinearInput,
        txt_in: &LinearInput,
        rope: &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor)> {
        if fused_attention(img_in.dense(), self.heads)? {
            return self.attention_fused(img_in, txt_in, rope);
        }
        let (iq, ik, iv) = self.img_qkv.forward(img_in, self.heads)?;
        let (tq, tk, tv) = self.txt_qkv.forward(txt_in, self.heads)?;
        let q = Tensor::cat(&[tq, iq], 2)?;
        let k = Tensor::cat(&[tk, ik], 2)?;
        let v = Tensor::cat(&[tv, iv], 2)?;
        let joint = attention(&q, &k, &v, rope)?;
        let n_txt = txt_in.dense().dim(1)?;
        let txt_attn = self.txt_out.forward(&joint.narrow(1, 0, n_txt)?)?;
        let img_attn = self
            .img_out
            .forward(&joint.narrow(1, n_txt, img_in.dense().dim(1)?)?)?;
        Ok((img_attn, txt_attn))
    }

    /// [`Self::attention`] on CUDA: q/k norm + RoPE per stream in the `[B, S, hidden]`
    /// layout, the streams joined along the sequence, flash attention; no transposes.
    fn attention_fused(
        &self,
        img_in: &LinearInput,
        txt_in: &LinearInput,
        rope: &(Tensor, Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (n_txt, n_img) = (txt_in.dense().dim(1)?, img_in.dense().dim(1)?);
        let part = |start: usize, len: usize| -> Result<(Tensor, Tensor)> {
            Ok((rope.0.narrow(0, start, len)?, rope.1.narrow(0, start, len)?))
        };
        let ((tc, ts), (ic, is)) = (part(0, n_txt)?, part(n_txt, n_img)?);
        let (tq, tk, tv) = self.txt_qkv.forward_fused(txt_in, self.heads, &tc, &ts)?;
        let (iq, ik, iv) = self.img_qkv.forward_fused(img_in, self.heads, &ic, &is)?;
        let q = Tensor::cat(&[tq, iq], 1)?;
        let k = Tensor::cat(&[tk, ik], 1)?;
        let v = Tensor::cat(&[tv, iv], 1)?;
        let joint = fused_attention_of(&q, &k, &v, self.heads)?;
        let txt_attn = self.txt_out.forward(&joint.narrow(1, 0, n_txt)?)?;
        let img_attn = self.img_out.forward(&joint.narrow(1, n_txt, n_img)?)?;
        Ok((img_attn, txt_attn))
    }

    /// [`Self::forward`] with the attention outputs supplied by `attend`, which receives
    /// the modulated image and text streams (a step cache computes or predicts them).
    pub fn forward_with(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        attend: impl FnOnce(&LinearInput, &LinearInput) -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let act = temb.silu()?;
        let im = chunks(&self.img_mod.forward(&act)?, 6)?;
        let tm = chunks(&self.txt_mod.forward(&act)?, 6)?;
        let img_in = modulate_input(img, &im[0], &im[1], self.img_qkv.takes_fp8_rows(img))?;
        let txt_in = modulate_input(txt, &tm[0], &tm[1], self.txt_qkv.takes_fp8_rows(txt))?;
        let (img_attn, txt_attn) = attend(&img_in, &txt_in)?;
        drop((img_in, txt_in));

        let img = gated_residual(img, &img_attn, &im[2])?;
        let fp8 = self.img_ff.up.takes_fp8_rows(&img);
        let img_ff = self
            .img_ff
            .forward(&modulate_input(&img, &im[3], &im[4], fp8)?)?;
        let img = gated_residual(&img, &img_ff, &im[5])?;

        let txt = gated_residual(txt, &txt_attn, &tm[2])?;
        let fp8 = self.txt_ff.up.takes_fp8_rows(&txt);
        let txt_ff = self
            .txt_ff
            .forward(&modulate_input(&txt, &tm[3], &tm[4], fp8)?)?;
        let txt = gated_residual(&txt, &txt_ff, &tm[5])?;
        Ok((img, txt))
    }
}

/// A single-stream block (`single_transformer_blocks.N`) over the joint `[txt; img]` stream.
#[derive(Debug, Clone)]
pub struct SingleBlock {
    modulation: AdaptedLinear,
    qkv: Qkv,
    proj_mlp: AdaptedLinear,
    proj_out: AdaptedLinear,
    heads: usize,
}

impl SingleBlock {
    /// Every linear layer of the block.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut all = vec![&self.modulation, &self.proj_mlp, &self.proj_out];
        all.extend(self.qkv.linears());
        all
    }

    /// Loads one block from `vb` (diffusers names).
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        heads: usize,
        mlp: usize,
        linears: &Linears,
    ) -> Result<Self> {
        Ok(Self {
            modulation: adapted_linear(vb.pp("norm.linear"), hidden, 3 * hidden, linears)?,
            qkv: Qkv::new(
                &vb.pp("attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                hidden,
                hidden / heads,
                linears,
            )?,
            proj_mlp: adapted_linear(vb.pp("proj_mlp"), hidden, mlp, linears)?,
            proj_out: adapted_linear(vb.pp("proj_out"), hidden + mlp, hidden, linears)?,
            heads,
        })
    }

    /// `xs` is the joint stream `[B, S_txt + S_img, hidden]`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, rope: &(Tensor, Tensor)) -> Result<Tensor> {
        self.forward_with(xs, temb, |normed| self.attention(normed, rope))
    }

    /// The block's attention (diffusers' `single_transformer_blocks.N.attn`): q/k/v of the
    /// modulated joint stream and attention, before the block's `proj_out`;
    /// `[B, S_txt + S_img, hidden]`.
    pub fn attention(&self, normed: &LinearInput, rope: &(Tensor, Tensor)) -> Result<Tensor> {
        if fused_attention(normed.dense(), self.heads)? {
            let (q, k, v) = self
                .qkv
                .forward_fused(normed, self.heads, &rope.0, &rope.1)?;
            return fused_attention_of(&q, &k, &v, self.heads);
        }
        let (q, k, v) = self.qkv.forward(normed, self.heads)?;
        attention(&q, &k, &v, rope)
    }

    /// [`Self::forward`] with the attention output supplied by `attend`, which receives the
    /// modulated joint stream (a step cache computes or predicts it).
    pub fn forward_with(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        attend: impl FnOnce(&LinearInput) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let m = chunks(&self.modulation.forward(&temb.silu()?)?, 3)?;
        let fp8 = self.proj_mlp.takes_fp8_rows(xs);
        let normed = modulate_input(xs, &m[0], &m[1], fp8)?;
        let mlp = self.proj_mlp.forward_gelu_input(&normed)?;
        let attn = attend(&normed)?;
        drop(normed);
        let out = self
            .proj_out
            .forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        gated_residual(xs, &out, &m[2])
    }
}

/// The final `AdaLayerNormContinuous` + projection to output channels.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    modulation: AdaptedLinear,
    proj: AdaptedLinear,
}

impl FinalLayer {
    /// Both linear layers.
    pub fn linears(&self) -> [&AdaptedLinear; 2] {
        [&self.modulation, &self.proj]
    }

    /// Loads `norm_out.linear` (scale, shift) and `proj_out`.
    pub fn new(vb: &VarBuilder, hidden: usize, out: usize, linears: &Linears) -> Result<Self> {
        Ok(Self {
            modulation: linears.build(vb.pp("norm_out.linear"), hidden, 2 * hidden)?,
            proj: linears.build(vb.pp("proj_out"), hidden, out)?,
        })
    }

    /// `xs` `[B, S, hidden]` -> `[B, S, out]`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = chunks(&self.modulation.forward(&temb.silu()?)?, 2)?;
        // diffusers order: (scale, shift).
        self.proj.forward(&modulate(xs, &m[1], &m[0])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn attention_in_chunks_equals_one_pass() {
        let dev = Device::Cpu;
        let (b, h, s, d) = (3, 2, 10, 8);
        let r = |seed: f32| -> Tensor {
            Tensor::arange(0f32, (b * h * s * d) as f32, &dev)
                .unwrap()
                .affine(0.37, seed as f64)
                .unwrap()
                .sin()
                .unwrap()
                .reshape((b, h, s, d))
                .unwrap()
        };
        let (q, k, v) = (r(0.1), r(0.7), r(1.3));
        let angles = Tensor::arange(0f32, (s * d / 2) as f32, &dev)
            .unwrap()
            .affine(0.01, 0.0)
            .unwrap()
            .reshape((s, d / 2))
            .unwrap();
        let rope = (angles.cos().unwrap(), angles.sin().unwrap());
        let whole = attention_in_chunks(&q, &k, &v, &rope, usize::MAX).unwrap();
        for pairs in [1, 2, 4] {
            let chunked = attention_in_chunks(&q, &k, &v, &rope, pairs * s * s).unwrap();
            let diff = (&whole - &chunked)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(D::Minus1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{pairs} pairs a chunk: {diff}");
        }
        assert_eq!(whole.dims(), &[b, s, h * d]);
    }
}
