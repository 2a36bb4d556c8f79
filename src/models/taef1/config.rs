//! The configuration of a tiny autoencoder: diffusers' `AutoencoderTiny` `config.json`.
//!
//! Field names and meanings are those of `AutoencoderTiny.__init__` in diffusers
//! `src/diffusers/models/autoencoders/autoencoder_tiny.py` (read at diffusers 0.42.1). Only
//! the decoder is built here, so the encoder's fields (`in_channels`,
//! `encoder_block_out_channels`, `num_encoder_blocks`) are not read.

use serde::Deserialize;

use crate::models::activation::Activation;
use crate::models::config_keys::ConfigKeys;

/// How every key of diffusers' `AutoencoderTiny` config is treated (see
/// [`crate::models::config_keys`]).
pub const CONFIG_KEYS: &[ConfigKeys] = &[ConfigKeys {
    section: "",
    inert: &[
        ("in_channels", "the encoder's input channels; only the decoder is built (diffusers' decode runs without the encoder)"),
        ("encoder_block_out_channels", "the encoder's widths; only the decoder is built"),
        ("num_encoder_blocks", "the encoder's depth; only the decoder is built"),
    ],
    refused: &[
        ("_class_name", "\"AutoencoderKL\""),
        ("upsample_fn", "\"bilinear\""),
        ("act_fn", "\"mish\""),
        ("decoder_block_out_channels", "[64, 64, 32, 32]"),
        ("scaling_factor", "0.0"),
    ],
}];

/// The Hub repository of TAEF1, the tiny autoencoder for FLUX.1 latents (diffusers layout:
/// `config.json` + `diffusion_pytorch_model.safetensors`, beside the original taesd.py files
/// `taef1_encoder.*` / `taef1_decoder.*`).
pub const TAEF1_REPO: &str = "madebyollin/taef1";

/// The files of the diffusers layout in that repository, all the decoder needs.
pub const TAEF1_FILES: &[&str] = &["config.json", "diffusion_pytorch_model.safetensors"];

/// `AutoencoderTiny`'s configuration, decoder side.
///
/// A field missing from a `config.json` takes TAEF1's published value (`madebyollin/taef1`'s
/// `config.json`), which is also diffusers' default for every field but `latent_channels`
/// (4 in diffusers, for SD's TAESD; 16 for FLUX). A wrong guess cannot go unnoticed: every
/// width is checked against the weights' shapes as they are read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TinyConfig {
    /// `AutoencoderTiny` for this model; checked when present, so that a folder holding
    /// another autoencoder's config is refused by name rather than misread.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Channels of each decoder stage (`(64, 64, 64, 64)`). `DecoderTiny` feeds one stage's
    /// output straight into the next stage's blocks, so all must be equal.
    #[serde(default = "taef1_widths")]
    pub decoder_block_out_channels: Vec<usize>,
    /// `AutoencoderTinyBlock`s per decoder stage (`(3, 3, 3, 1)`).
    #[serde(default = "taef1_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    /// Upsampling factor between stages (2): `stages - 1` upsamplings give the 8x of FLUX's
    /// autoencoder.
    #[serde(default = "two")]
    pub upsampling_scaling_factor: usize,
    /// `nn.Upsample` mode; only `nearest` is built (TAEF1's).
    #[serde(default = "nearest")]
    pub upsample_fn: String,
    /// Latent channels (16 for FLUX.1).
    #[serde(default = "sixteen")]
    pub latent_channels: usize,
    /// Image channels out (3).
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Activation after the first conv and inside the blocks (diffusers `get_activation`
    /// names: `relu`, `silu`/`swish`, `gelu`; `mish` is not built). The blocks' `fuse` is a
    /// ReLU whatever this says.
    #[serde(default = "relu")]
    pub act_fn: String,
    /// Encoder side only: `scale_latents` maps latents to [0, 1] for storage as 8-bit
    /// images as `x / (2 * latent_magnitude) + latent_shift`. Decoding does not use it.
    #[serde(default = "latent_magnitude")]
    pub latent_magnitude: f64,
    /// See `latent_magnitude`.
    #[serde(default = "latent_shift")]
    pub latent_shift: f64,
    /// The pipeline's latent scale: FLUX pipelines hand `vae.decode` the transformer's
    /// latents as `z / scaling_factor + shift_factor`. TAEF1's is 1.0 (it decodes the
    /// transformer's latent space itself).
    #[serde(default = "one")]
    pub scaling_factor: f64,
    /// See `scaling_factor`; TAEF1's is 0.0.
    #[serde(default)]
    pub shift_factor: f64,
    /// Whether pipelines run this model in f32 (false for TAEF1; recorded, not used: the
    /// dtype is the caller's choice).
    #[serde(default)]
    pub force_upcast: bool,
}

fn taef1_widths() -> Vec<usize> {
    vec![64; 4]
}

fn taef1_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}

fn two() -> usize {
    2
}

fn three() -> usize {
    3
}

fn sixteen() -> usize {
    16
}

fn nearest() -> String {
    "nearest".into()
}

fn relu() -> String {
    "relu".into()
}

fn latent_magnitude() -> f64 {
    3.0
}

fn latent_shift() -> f64 {
    0.5
}

fn one() -> f64 {
    1.0
}

impl Default for TinyConfig {
    /// TAEF1's published configuration.
    fn default() -> Self {
        Self::taef1()
    }
}

impl TinyConfig {
    /// TAEF1's published configuration (`madebyollin/taef1/config.json`): four stages of 64
    /// channels with 3, 3, 3, 1 blocks, nearest 2x upsampling, ReLU, 16 latent channels, no
    /// latent scale or shift.
    pub fn taef1() -> Self {
        Self {
            class_name: Some("AutoencoderTiny".into()),
            decoder_block_out_channels: taef1_widths(),
            num_decoder_blocks: taef1_blocks(),
            upsampling_scaling_factor: 2,
            upsample_fn: nearest(),
            latent_channels: 16,
            out_channels: 3,
            act_fn: relu(),
            latent_magnitude: latent_magnitude(),
            latent_shift: latent_shift(),
            scaling_factor: 1.0,
            shift_factor: 0.0,
            force_upcast: false,
        }
    }

    /// The activation `act_fn` names, as diffusers' `get_activation` reads it (lower-cased;
    /// `nn.GELU` is the exact erf GELU).
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.act_fn.to_lowercase().as_str() {
            "relu" => Ok(Activation::Relu),
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(format!(
                "`act_fn` = {other:?} is not supported (built here: relu, silu, swish, gelu)"
            )),
        }
    }

    /// Pixels per latent cell along each side: `upsampling_scaling_factor ^ (stages - 1)`.
    pub fn upscale(&self) -> usize {
        let stages = self.num_decoder_blocks.len().max(1);
        self.upsampling_scaling_factor.pow(stages as u32 - 1)
    }

    /// Refuses settings that change the computation and are not built here, or that
    /// diffusers itself would fail on, naming the field and value.
    pub fn check(&self) -> std::result::Result<(), String> {
        let refuse = |field: &str, value: String, why: &str| {
            Err(format!("`{field}` = {value} is not supported ({why})"))
        };
        if let Some(class) = self
            .class_name
            .as_deref()
            .filter(|c| *c != "AutoencoderTiny")
        {
            return refuse(
                "_class_name",
                format!("{class:?}"),
                "not a tiny autoencoder (AutoencoderTiny)",
            );
        }
        let widths = &self.decoder_block_out_channels;
        if widths.is_empty() || widths.len() != self.num_decoder_blocks.len() {
            // diffusers raises the same ValueError in AutoencoderTiny.__init__.
            return refuse(
                "decoder_block_out_channels",
                format!("{widths:?}"),
                &format!(
                    "needs one entry per stage of num_decoder_blocks {:?}",
                    self.num_decoder_blocks
                ),
            );
        }
        if widths.iter().any(|&w| w != widths[0] || w == 0) {
            // Each stage's last conv keeps its width and the next stage's blocks take it as
            // theirs, so unequal widths fail in diffusers' forward too.
            return refuse(
                "decoder_block_out_channels",
                format!("{widths:?}"),
                "DecoderTiny needs every stage equally wide",
            );
        }
        if self.upsample_fn != "nearest" {
            return refuse(
                "upsample_fn",
                format!("{:?}", self.upsample_fn),
                "only nearest upsampling is built",
            );
        }
        if self.upsampling_scaling_factor == 0 {
            return refuse(
                "upsampling_scaling_factor",
                "0".into(),
                "must be at least 1",
            );
        }
        if self.latent_channels == 0 || self.out_channels == 0 {
            return refuse(
                "latent_channels",
                format!(
                    "{} (out_channels {})",
                    self.latent_channels, self.out_channels
                ),
                "channel counts must be positive",
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return refuse(
                "scaling_factor",
                self.scaling_factor.to_string(),
                "latents are divided by it",
            );
        }
        if !self.shift_factor.is_finite() {
            return refuse(
                "shift_factor",
                self.shift_factor.to_string(),
                "must be finite",
            );
        }
        self.activation().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_is_taef1_and_fields_that_change_the_math_are_refused_by_name() {
        let empty: TinyConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(
            empty,
            TinyConfig {
                class_name: None,
                ..TinyConfig::taef1()
            }
        );
        assert_eq!(TinyConfig::taef1().upscale(), 8);
        assert!(TinyConfig::taef1().check().is_ok());
        let refused = |json: &str, field: &str| {
            let c: TinyConfig = serde_json::from_str(json).unwrap();
            let err = c.check().unwrap_err();
            assert!(err.contains(field), "{json}: {err}");
        };
        refused(r#"{"_class_name": "AutoencoderKL"}"#, "_class_name");
        refused(r#"{"upsample_fn": "bilinear"}"#, "upsample_fn");
        refused(r#"{"act_fn": "mish"}"#, "act_fn");
        refused(
            r#"{"decoder_block_out_channels": [64, 64, 64]}"#,
            "decoder_block_out_channels",
        );
        refused(
            r#"{"decoder_block_out_channels": [64, 64, 32, 32]}"#,
            "decoder_block_out_channels",
        );
        refused(r#"{"scaling_factor": 0.0}"#, "scaling_factor");
        // diffusers lower-cases activation names.
        let c: TinyConfig = serde_json::from_str(r#"{"act_fn": "SiLU"}"#).unwrap();
        assert_eq!(c.activation(), Ok(Activation::Silu));
    }
}
