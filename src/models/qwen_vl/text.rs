//! The Qwen2 language model with multimodal RoPE (M-RoPE).
//!
//! Each token has three position ids (temporal, height, width). M-RoPE gives the first
//! `mrope_section[0]` rotary frequencies to the temporal id, the next `mrope_section[1]` to
//! the height id and the rest to the width id; text tokens have three equal ids, so for text
//! this is plain RoPE. The model is stateless: the caller owns the [`KvCache`], which lets a
//! batched prefill be split into one cache per prompt.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{
    embedding, linear_b, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder,
};

use super::config::TextConfig;
use crate::models::activation::Activation;
use crate::models::bench::{lap, StageClock};
use crate::models::cuda::attention as flash;
use crate::models::cuda::switch::Kernel;
use crate::models::linear as biased_linear;
use crate::models::{cpu, cuda};

/// Position ids of a batch: `ids[b][s]` = (temporal, height, width).
pub type Positions = Vec<Vec<[i64; 3]>>;

/// Qwen3-VL's DeepStack: vision features added to the hidden states at the image tokens
/// after decoder layer `i` for each `layers[i]`.
pub struct Deepstack {
    /// Positions of the image tokens in the flattened `[b * s]` sequence.
    pub rows: Tensor,
    /// `[image tokens, hidden]` per decoder layer, from the first.
    pub layers: Vec<Tensor>,
}

/// Computes M-RoPE cos/sin tables.
#[derive(Debug, Clone)]
pub struct MultimodalRope {
    inv_freq: Vec<f32>,
    /// Which of the three position ids drives each frequency.
    axis_of: Vec<usize>,
}

impl MultimodalRope {
    /// Frequencies as transformers computes them (float32 `base ** (2i / dim)`).
    pub fn new(cfg: &TextConfig) -> Self {
        let dim = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / dim as f32))
            .collect();
        let section = &cfg.mrope_section;
        let axis_of = if cfg.mrope_interleaved {
            // Qwen3-VL: frequency j goes to h if j % 3 == 1 and j < 3 * section[1], to w if
            // j % 3 == 2 and j < 3 * section[2], else to t.
            (0..inv_freq.len())
                .map(|j| match j % 3 {
                    1 if j < 3 * section.get(1).copied().unwrap_or(0) => 1,
                    2 if j < 3 * section.get(2).copied().unwrap_or(0) => 2,
                    _ => 0,
                })
                .collect()
        } else {
            section
                .iter()
                .enumerate()
                .flat_map(|(axis, &n)| std::iter::repeat_n(axis % 3, n))
                .collect()
        };
        Self { inv_freq, axis_of }
    }

    /// (cos, sin), each `[batch, seq, head_dim / 2]` in f32.
    pub fn cos_sin(&self, positions: &Positions, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let batch = positions.len();
        let seq = positions.first().map_or(0, Vec::len);
        let mut cos = Vec::with_capacity(batch * seq * half);
        let mut sin = Vec::with_capacity(batch * seq * half);
        for row in positions {
            if row.len() != seq {
                candle_core::bail!("M-RoPE: ragged batch ({} vs {seq} positions)", row.len());
            }
            for ids in row {
                for (f, &inv) in self.inv_freq.iter().enumerate() {
                    // float32 product as in transformers; sin/cos of it in f32.
                    let angle = ids[self.axis_of[f]] as f32 * inv;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (batch, seq, half), device)?,
            Tensor::from_vec(sin, (batch, seq, half), device)?,
        ))
    }
}

/// Keys and values of every layer, `[batch, kv_heads, seq, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Tokens already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache of one prompt of a batch.
    pub fn select(&self, index: usize) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| Ok((k.narrow(0, index, 1)?, v.narrow(0, index, 1)?)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3: RMSNorm over each head of q and k, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d, bias) = (cfg.hidden_size, cfg.head_dim(), cfg.qkv_bias);
        let qk_norm = if cfg.qk_norm {
            Some((
                rms_norm(d, cfg.rms_norm_eps, vb.pp("q_norm"))?,
                rms_norm(d, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            q_proj: linear_b(h, cfg.num_attention_heads * d, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(h, cfg.num_key_value_heads * d, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(h, cfg.num_key_value_heads * d, bias, vb.pp("v_proj"))?,
            o_proj: linear_b(cfg.num_attention_heads * d, h, cfg.o_bias, vb.pp("o_proj"))?,
            qk_norm,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    /// `xs`: `[b, s, hidden]`; `rope`: cos/sin `[b, s, head_dim/2]`; `mask`: `[s, past + s]`,
    /// the causal mask (the fused CPU path and the GPU's flash prefill apply causality
    /// themselves and ignore it).
    /// `clock` is charged qkv, rotary, attention and proj.
    fn forward(
        &self,
        xs: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        layer: usize,
        clock: &mut Option<&mut StageClock>,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let heads = |t: Tensor, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, s, n, self.head_dim))?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            t.transpose(1, 2)?.contiguous()
        };
        let (q_norm, k_norm) = match &self.qk_norm {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        let q = heads(
            biased_linear::forward(&self.q_proj, xs)?,
            self.num_heads,
            q_norm,
        )?;
        let k = heads(
            biased_linear::forward(&self.k_proj, xs)?,
            self.num_kv_heads,
            k_norm,
        )?;
        let v = heads(
            biased_linear::forward(&self.v_proj, xs)?,
            self.num_kv_heads,
            None,
        )?;
        lap(clock, "qkv")?;
        let q = apply_rope(&q, rope)?;
        let k = apply_rope(&k, rope)?;
        lap(clock, "rotary")?;
        let (k, v) = cache.append(layer, k, v)?;
        if s > 1
            && cuda::switch::use_kernel(Kernel::JudgeAttention, &q)
            && flash::judge_supports(self.head_dim, q.dtype())
        {
            // A prefill on the GPU: flash attention, causal after the cached prefix, grouped
            // heads read in place, out already [b, s, heads * hd]. (A decode step's one row
            // per prompt keeps the tensor path.)
            let visibility = flash::Visibility {
                segments: None,
                causal: true,
            };
            let out = flash::judge_attention(&q, &k, &v, visibility)?;
            lap(clock, "attention")?;
            let out = self.o_proj.forward(&out)?;
            lap(clock, "proj")?;
            return Ok(out);
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = if [&q, &k, &v].iter().all(|t| cpu::is_dense_cpu_f32(t)) {
            // On the CPU in f32 the fused kernel: only the keys each row may see are
            // scored (the mask `forward_embeds` builds is exactly that causal one), and
            // grouped key/value heads are read in place.
            cpu::attention::causal_attention(&(q * scale)?, &k, &v)?
        } else {
            self.masked_attention(&q, &k, &v, mask, scale)?
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.num_heads * self.head_dim))?;
        lap(clock, "attention")?;
        let out = self.o_proj.forward(&out)?;
        lap(clock, "proj")?;
        Ok(out)
    }

    /// Softmax attention through tensor operations (any device and dtype): q `[b, heads, s,
    /// d]`, k and v `[b, kv_heads, past + s, d]` repeated to every head, scores in f32 with
    /// `mask` added; returns `[b, heads, s, d]` in q's dtype.
    fn masked_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        let groups = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, groups)?;
        let v = repeat_kv(v, groups)?;

        // Scores in f32: bf16 softmax over thousands of image tokens loses the small ones.
        let dtype = q.dtype();
        let scores = (q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

/// Rotates `x` `[b, heads, s, d]` in f32 (as transformers does) and casts back.
fn apply_rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::rotary_emb::rope(&x.to_dtype(DType::F32)?.contiguous()?, cos, sin)?.to_dtype(dtype)
}

fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kv, groups, s, d))?
        .reshape((b, kv * groups, s, d))
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = self
            .act
            .apply_gated(&self.gate_proj.forward(xs)?, &self.up_proj.forward(xs)?)?;
        self.down_proj.forward(&hidden)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }
}

/// The decoder: token embedding, layers, final norm and LM head.
pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: MultimodalRope,
}

impl TextModel {
    /// Loads from `model` (the decoder's prefix) and `lm_head` (the head's own prefix).
    pub fn new(cfg: &TextConfig, model: VarBuilder, lm_head: VarBuilder) -> Result<Self> {
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, model.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, model.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, model.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, lm_head)?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: MultimodalRope::new(cfg),
        })
    }

    /// Token embeddings `[b, s, hidden]` for ids `[b, s]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// Runs the decoder over new embeddings `[b, s, hidden]` after whatever `cache` holds,
    /// and returns the final hidden states `[b, s, hidden]` (before the head).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        positions: &Positions,
        cache: &mut KvCache,
        deepstack: Option<&Deepstack>,
    ) -> Result<Tensor> {
        self.forward_embeds_timed(embeds, positions, cache, deepstack, None)
    }

    /// [`forward_embeds`](Self::forward_embeds), charging each stage's time to `clock` when
    /// one is given (`bench judge`'s decoder profile): norms, qkv, rotary, attention, proj,
    /// mlp, and other (rotary tables, mask, residual adds, DeepStack).
    pub fn forward_embeds_timed(
        &self,
        embeds: &Tensor,
        positions: &Positions,
        cache: &mut KvCache,
        deepstack: Option<&Deepstack>,
        clock: Option<&mut StageClock>,
    ) -> Result<Tensor> {
        cpu::on_pool(embeds.device(), || {
            self.run(embeds, positions, cache, deepstack, clock)
        })
    }

    fn run(
        &self,
        embeds: &Tensor,
        positions: &Positions,
        cache: &mut KvCache,
        deepstack: Option<&Deepstack>,
        mut clock: Option<&mut StageClock>,
    ) -> Result<Tensor> {
        let clock = &mut clock;
        let (b, s, hidden) = embeds.dims3()?;
        let rope = self.rope.cos_sin(positions, embeds.device())?;
        let past = cache.len();
        let mask = if s > 1 {
            Some(causal_mask(s, past, embeds.device())?)
        } else {
            None
        };
        let mut xs = embeds.clone();
        lap(clock, "other")?;
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = xs.clone();
            let h = layer.input_layernorm.forward(&xs)?;
            lap(clock, "norms")?;
            let h = layer
                .self_attn
                .forward(&h, &rope, mask.as_ref(), cache, i, clock)?;
            xs = (residual + h)?;
            let residual = xs.clone();
            lap(clock, "other")?;
            let h = layer.post_attention_layernorm.forward(&xs)?;
            lap(clock, "norms")?;
            let h = layer.mlp.forward(&h)?;
            lap(clock, "mlp")?;
            xs = (residual + h)?;
            if let Some((rows, feature)) =
                deepstack.and_then(|d| d.layers.get(i).map(|f| (&d.rows, f)))
            {
                // hidden[image rows] += this layer's DeepStack features
                xs = xs
                    .reshape((b * s, hidden))?
                    .index_add(rows, &feature.to_dtype(xs.dtype())?, 0)?
                    .reshape((b, s, hidden))?;
            }
            lap(clock, "other")?;
        }
        let out = self.norm.forward(&xs)?;
        lap(clock, "norms")?;
        Ok(out)
    }

    /// Logits in f32 for hidden states `[b, s, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }
}

/// `[s, past + s]`: 0 where a query may look, -inf at later keys.
fn causal_mask(s: usize, past: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..past + s).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(mask, (s, past + s), device)
}

/// The last position of `[b, s, v]` as `[b, v]`, copied out: for `b > 1` the view's rows
/// lie `s * v` apart, which CUDA's matmul refuses (a batched screening prefill failed so on
/// the GPU acceptance run of 2026-12-04).
pub fn last_position(xs: &Tensor) -> Result<Tensor> {
    let s = xs.dim(1)?;
    xs.narrow(1, s - 1, 1)?.squeeze(1)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_position_is_a_contiguous_copy_of_each_prompts_last_row() -> Result<()> {
        // [2 prompts, 3 positions, 4 values]
        let xs = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        let last = last_position(&xs)?;
        assert!(
            last.is_contiguous(),
            "rows must be packed for every matmul backend"
        );
        assert_eq!(
            last.to_vec2::<f32>()?,
            vec![vec![8.0, 9.0, 10.0, 11.0], vec![20.0, 21.0, 22.0, 23.0]]
        );
        Ok(())
    }
}
