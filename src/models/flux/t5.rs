//! The T5 encoder as its weights come: dense safetensors (candle-transformers' `t5`), or a
//! GGUF file ([`QuantizedT5Encoder`], its linear layers kept quantized: a Q8_0 T5-XXL is
//! ~5 GB instead of 9.5 in bf16). GGUF files named the llama.cpp way (`enc.blk.N.attn_q`, as the
//! community's `t5-v1_1-xxl-encoder` GGUF files are) are renamed to transformers' names as
//! they are read ([`super::t5_quantized::transformers_name`]); files that already use
//! transformers' names are read as they are.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};

use super::t5_quantized::{QuantizedT5Encoder, T5EncoderConfig};
use super::weights::{is_gguf, var_builder, weights_error, KeyLayout, WeightSource};
use crate::error::ModelError;
use crate::fsio::read_json;

/// A loaded T5 encoder.
pub enum T5Encoder {
    /// Dense weights in the encoders' dtype.
    Dense(T5EncoderModel),
    /// GGUF weights, linear layers quantized; activations in f32.
    Quantized(QuantizedT5Encoder),
}

impl T5Encoder {
    /// Loads the weights in `weights` with the config at `config`: GGUF by its magic, else
    /// safetensors.
    pub fn load(
        weights: &[std::path::PathBuf],
        config: &Path,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self, ModelError> {
        match weights {
            [one] if is_gguf(one) => {
                let cfg: T5EncoderConfig = read_json(config)?;
                Ok(Self::Quantized(QuantizedT5Encoder::load(one, cfg, dev)?))
            }
            _ => {
                let cfg: T5Config = read_json(config)?;
                let vb = var_builder(
                    WeightSource::open(weights, KeyLayout::Diffusers)?,
                    dtype,
                    dev,
                );
                let model =
                    T5EncoderModel::load(vb, &cfg).map_err(|e| weights_error(&weights[0], e))?;
                Ok(Self::Dense(model))
            }
        }
    }

    /// Token states `[1, tokens, d_model]` in `dtype`.
    pub fn forward(&mut self, ids: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(m) => m.forward_dt(ids, Some(dtype)),
            Self::Quantized(m) => m.forward(ids)?.to_dtype(dtype),
        }
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Dense(m) => m.device(),
            Self::Quantized(m) => m.device(),
        }
    }
}
