//! A T5 v1.1 encoder over weights held as [`Weight`]s (ggml-quantized or dense), for GGUF T5
//! files. It is our own rather than candle-transformers' `quantized_t5` (0.11.1), whose
//! relative-position buckets are not clamped to the last bucket: for tokens farther apart
//! than `relative_attention_max_distance` (128 in T5-XXL, so most pairs of FLUX's 512
//! tokens) it reads past its bias table and its states drift from transformers'.
//! `tests/flux.rs` matches this encoder against transformers through an F32 GGUF file.
//!
//! Per block, as transformers' `T5Block` computes it (no attention scaling, one relative
//! position bias computed by block 0 and shared by all):
//! `h += Wo(softmax(q k^T + bias) v)` on `rms_norm(h)`, then
//! `h += wo(gelu_tanh(wi_0 n) * wi_1 n)` on `n = rms_norm(h)`; a final RMS norm.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{Device, Module, Result, Tensor, D};

use super::held_weight::Weight;
use super::linear::BaseLinear;
use crate::error::ModelError;
use crate::models::weight_use::{check_unused, KnownUnused, ReadLog, StoredTensors, UnusedWeights};

/// transformers' name for a llama.cpp T5 encoder tensor (`enc.blk.3.ffn_gate.weight` ->
/// `encoder.block.3.layer.1.DenseReluDense.wi_0.weight`); names that are not llama.cpp's
/// are returned unchanged. The map is gguf-py's `MODEL_ARCH.T5ENCODER` tensor map, reversed
/// (`gguf.get_tensor_name_map`; tests/fixtures/flux/make_gguf_t5.py writes with it).
pub fn transformers_name(name: &str) -> std::result::Result<String, String> {
    let (base, suffix) = name.rsplit_once('.').unwrap_or((name, ""));
    let mapped = match base {
        "token_embd" => "shared".to_string(),
        "enc.output_norm" => "encoder.final_layer_norm".to_string(),
        _ => match base.strip_prefix("enc.blk.") {
            Some(rest) => {
                let (block, part) = rest
                    .split_once('.')
                    .ok_or_else(|| format!("tensor `{name}`: no part after the block"))?;
                let inner = match part {
                    "attn_q" => "layer.0.SelfAttention.q",
                    "attn_k" => "layer.0.SelfAttention.k",
                    "attn_v" => "layer.0.SelfAttention.v",
                    "attn_o" => "layer.0.SelfAttention.o",
                    "attn_rel_b" => "layer.0.SelfAttention.relative_attention_bias",
                    "attn_norm" => "layer.0.layer_norm",
                    "ffn_gate" => "layer.1.DenseReluDense.wi_0",
                    "ffn_up" => "layer.1.DenseReluDense.wi_1",
                    "ffn_down" => "layer.1.DenseReluDense.wo",
                    "ffn_norm" => "layer.1.layer_norm",
                    other => {
                        return Err(format!(
                            "tensor `{name}`: `{other}` is not a T5 encoder part"
                        ))
                    }
                };
                format!("encoder.block.{block}.{inner}")
            }
            None => return Ok(name.to_string()),
        },
    };
    Ok(if suffix.is_empty() {
        mapped
    } else {
        format!("{mapped}.{suffix}")
    })
}

/// The hyper-parameters read from T5's `config.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct T5EncoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Relative position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which positions share the last bucket.
    #[serde(default = "max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon.
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (T5 v1.1, the only one built here).
    #[serde(default)]
    pub feed_forward_proj: Option<String>,
}

fn max_distance() -> usize {
    128
}

struct Block {
    attn_norm: Tensor,
    q: BaseLinear,
    k: BaseLinear,
    v: BaseLinear,
    o: BaseLinear,
    ffn_norm: Tensor,
    gate: BaseLinear,
    up: BaseLinear,
    down: BaseLinear,
}

/// The encoder.
pub struct QuantizedT5Encoder {
    config: T5EncoderConfig,
    embed: Tensor,
    /// `[buckets, heads]`.
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    device: Device,
}

/// transformers' T5 RMS norm: in f32, no mean subtraction, then the scale.
fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
    xs.broadcast_div(&(variance + eps)?.sqrt()?)?
        .broadcast_mul(weight)
}

/// transformers' `_relative_position_bucket` (bidirectional) for `memory - query`.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // In f32, as torch computes it on a float tensor.
        let scaled = (n as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (half - max_exact) as f32;
        bucket += (max_exact + scaled as i64).min(half - 1);
    }
    bucket as u32
}

impl QuantizedT5Encoder {
    /// Reads a GGUF T5 encoder (names as `transformers_name` maps them) onto `dev`: 2-D
    /// quantized weights stay quantized, everything else is read as f32. A tensor of the
    /// file that the encoder does not read is refused unless `known` (T5's list of tensors
    /// the reference leaves unread) covers it or `unused` allows it.
    pub fn load(
        path: &Path,
        config: T5EncoderConfig,
        dev: &Device,
        known: &[KnownUnused],
        unused: UnusedWeights,
    ) -> std::result::Result<Self, ModelError> {
        let fail = |e: String| ModelError::files(path, e);
        if config.feed_forward_proj.as_deref().unwrap_or("gated-gelu") != "gated-gelu" {
            return Err(fail(format!(
                "feed_forward_proj {:?}: only T5 v1.1's gated-gelu is built for GGUF files",
                config.feed_forward_proj
            )));
        }
        let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
        let content =
            gguf_file::Content::read(&mut file).map_err(|e| fail(format!("GGUF header: {e}")))?;
        let mut by_name = HashMap::new();
        for name in content.tensor_infos.keys() {
            // A decoder's tensors (a whole T5 in one file) are left for the unread check.
            if name.starts_with("dec.") {
                continue;
            }
            by_name.insert(transformers_name(name).map_err(fail)?, name.clone());
        }
        let log = ReadLog::new();
        let mut read =
            |name: &str,
             shape: &[usize]|
             -> std::result::Result<candle_core::quantized::QTensor, ModelError> {
                let stored = by_name
                    .get(name)
                    .ok_or_else(|| fail(format!("missing tensor `{name}`")))?;
                let q = content
                    .tensor(&mut file, stored, dev)
                    .map_err(|e| fail(format!("tensor `{stored}`: {e}")))?;
                log.record(stored);
                if q.shape().dims() != shape {
                    return Err(fail(format!(
                        "tensor `{stored}` has shape {:?}, the config needs {shape:?}",
                        q.shape().dims()
                    )));
                }
                Ok(q)
            };
        let dense =
            |q: candle_core::quantized::QTensor| -> std::result::Result<Tensor, ModelError> {
                q.dequantize(dev).map_err(|e| fail(e.to_string()))
            };
        let c = &config;
        let inner = c.num_heads * c.d_kv;
        let d_ff = {
            let key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight";
            let stored = by_name
                .get(key)
                .ok_or_else(|| fail(format!("missing tensor `{key}`")))?;
            content.tensor_infos[stored].shape.dims()[0]
        };
        let held =
            |q: candle_core::quantized::QTensor| -> std::result::Result<BaseLinear, ModelError> {
                let weight = match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Weight::Dense(dense(q)?),
                    t => Weight::Quantized(
                        std::sync::Arc::new(
                            QMatMul::from_qtensor(q).map_err(|e| fail(e.to_string()))?,
                        ),
                        t,
                    ),
                };
                Ok(BaseLinear::new(weight, None))
            };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let attn = format!("{p}.0.SelfAttention");
            let ff = format!("{p}.1.DenseReluDense");
            blocks.push(Block {
                attn_norm: dense(read(&format!("{p}.0.layer_norm.weight"), &[c.d_model])?)?,
                q: held(read(&format!("{attn}.q.weight"), &[inner, c.d_model])?)?,
                k: held(read(&format!("{attn}.k.weight"), &[inner, c.d_model])?)?,
                v: held(read(&format!("{attn}.v.weight"), &[inner, c.d_model])?)?,
                o: held(read(&format!("{attn}.o.weight"), &[c.d_model, inner])?)?,
                ffn_norm: dense(read(&format!("{p}.1.layer_norm.weight"), &[c.d_model])?)?,
                gate: held(read(&format!("{ff}.wi_0.weight"), &[d_ff, c.d_model])?)?,
                up: held(read(&format!("{ff}.wi_1.weight"), &[d_ff, c.d_model])?)?,
                down: held(read(&format!("{ff}.wo.weight"), &[c.d_model, d_ff])?)?,
            });
        }
        let embed = dense(read("shared.weight", &[c.vocab_size, c.d_model])?)?;
        let relative_bias = dense(read(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[c.relative_attention_num_buckets, c.num_heads],
        )?)?;
        let final_norm = dense(read("encoder.final_layer_norm.weight", &[c.d_model])?)?;
        check_unused(
            "the T5 encoder",
            &StoredTensors::gguf(path, &content),
            &log,
            known,
            unused,
        )?;
        Ok(Self {
            config,
            embed,
            relative_bias,
            blocks,
            final_norm,
            device: dev.clone(),
        })
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// States `[1, tokens, d_model]` in f32 for token ids `[1, tokens]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let mut h = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c.d_model))?;
        // [1, heads, t, t]
        let buckets: Vec<u32> = (0..t as i64)
            .flat_map(|q| {
                (0..t as i64).map(move |m| {
                    relative_position_bucket(
                        m - q,
                        c.relative_attention_num_buckets,
                        c.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, t * t, &self.device)?;
        let bias = self
            .relative_bias
            .index_select(&buckets, 0)?
            .reshape((t, t, c.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        let heads = |x: Tensor| -> Result<Tensor> {
            x.reshape((b, t, c.num_heads, c.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        for block in &self.blocks {
            let n = rms_norm(&h, &block.attn_norm, c.layer_norm_epsilon)?;
            let (q, k, v) = (
                heads(block.q.forward(&n)?)?,
                heads(block.k.forward(&n)?)?,
                heads(block.v.forward(&n)?)?,
            );
            let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
            let weights = candle_nn::ops::softmax_last_dim(&scores)?;
            let attn =
                weights
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .reshape((b, t, c.num_heads * c.d_kv))?;
            h = (h + block.o.forward(&attn)?)?;
            let n = rms_norm(&h, &block.ffn_norm, c.layer_norm_epsilon)?;
            let ff = (block.gate.forward(&n)?.gelu()? * block.up.forward(&n)?)?;
            h = (h + block.down.forward(&ff)?)?;
        }
        rms_norm(&h, &self.final_norm, c.layer_norm_epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::{relative_position_bucket, transformers_name};

    #[test]
    fn llama_cpp_names_map_to_transformers_names() {
        for (llama, hf) in [
            ("token_embd.weight", "shared.weight"),
            ("enc.output_norm.weight", "encoder.final_layer_norm.weight"),
            (
                "enc.blk.0.attn_rel_b.weight",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            ),
            (
                "enc.blk.23.ffn_down.weight",
                "encoder.block.23.layer.1.DenseReluDense.wo.weight",
            ),
            ("shared.weight", "shared.weight"),
        ] {
            assert_eq!(transformers_name(llama).unwrap(), hf);
        }
        assert!(transformers_name("enc.blk.0.attn_x.weight")
            .unwrap_err()
            .contains("attn_x"));
    }

    #[test]
    fn buckets_as_transformers_computes_them() {
        // transformers' T5Attention._relative_position_bucket formula (bidirectional,
        // num_buckets=32, max_distance=128), evaluated with torch 2.15 in float32.
        let expected = [
            (-200, 15),
            (-128, 15),
            (-100, 15),
            (-20, 10),
            (-8, 8),
            (-7, 7),
            (-1, 1),
            (0, 0),
            (1, 17),
            (7, 23),
            (8, 24),
            (20, 26),
            (100, 31),
            (128, 31),
            (500, 31),
        ];
        for (relative, bucket) in expected {
            assert_eq!(
                relative_position_bucket(relative, 32, 128),
                bucket,
                "{relative}"
            );
        }
    }
}
