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
use super::weights::{shared_var_builder, weights_error, KeyLayout, WeightSource};
use crate::error::ModelError;
use crate::fsio::read_json;
use crate::models::file_kind::is_gguf;
use crate::models::weight_use::{KnownUnused, UnusedWeights};

/// Tensors a T5 checkpoint may hold that the encoder does not read, because transformers'
/// `T5EncoderModel` (what FLUX pipelines load as `text_encoder_2`) does not either.
pub const UNUSED_TENSORS: &[KnownUnused] = &[
    KnownUnused::new(
        "encoder.embed_tokens.weight",
        "tied to `shared.weight`: T5EncoderModel._tied_weights_keys \
         (transformers models/t5/modeling_t5.py) makes the encoder's embedding the shared one",
    ),
    KnownUnused::new(
        "decoder.*",
        "a whole T5's decoder: T5EncoderModel._keys_to_ignore_on_load_unexpected = \
         [r\"decoder\"] (transformers models/t5/modeling_t5.py)",
    ),
    KnownUnused::new(
        "dec.*",
        "the same decoder in llama.cpp's GGUF names (gguf-py MODEL_ARCH.T5: `dec.blk.N.*`, \
         `dec.output_norm`)",
    ),
];

/// A loaded T5 encoder.
pub enum T5Encoder {
    /// Dense weights in the encoders' dtype.
    Dense(T5EncoderModel),
    /// GGUF weights, linear layers quantized; activations in f32.
    Quantized(QuantizedT5Encoder),
}

impl T5Encoder {
    /// Loads the weights in `weights` with the config at `config`: GGUF by its magic, else
    /// safetensors. A tensor of the files that the encoder does not read is refused unless
    /// [`UNUSED_TENSORS`] lists it or `unused` allows it.
    pub fn load(
        weights: &[std::path::PathBuf],
        config: &Path,
        dtype: DType,
        dev: &Device,
        unused: UnusedWeights,
    ) -> Result<Self, ModelError> {
        match weights {
            [one] if is_gguf(one) => {
                let cfg: T5EncoderConfig = read_json(config)?;
                Ok(Self::Quantized(QuantizedT5Encoder::load(
                    one,
                    cfg,
                    dev,
                    UNUSED_TENSORS,
                    unused,
                )?))
            }
            _ => {
                let cfg: T5Config = read_json(config)?;
                let source =
                    std::sync::Arc::new(WeightSource::open(weights, KeyLayout::Diffusers)?);
                let vb = shared_var_builder(source.clone(), dtype, dev);
                let model =
                    T5EncoderModel::load(vb, &cfg).map_err(|e| weights_error(&weights[0], e))?;
                source.check_unused("the T5 encoder", UNUSED_TENSORS, unused)?;
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
