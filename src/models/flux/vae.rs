//! The FLUX autoencoder (diffusers `AutoencoderKL`, 16 latent channels, no quant convs),
//! composed from candle-transformers' UNet building blocks so that encoding can return the
//! distribution mean (the deterministic latent) rather than a random sample.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UpDecoderBlock2D, UpDecoderBlock2DConfig,
};
use serde::Deserialize;

use super::vae_mid::MidBlock;
use super::weights::{weights_error, KeyLayout, WeightSource};
use crate::error::ModelError;
use crate::models::config_keys::ConfigKeys;
use crate::models::weight_use::{KnownUnused, UnusedWeights};

/// Tensors an autoencoder checkpoint may hold that the model does not read. None: FLUX
/// encodes the masked diptych and decodes outputs, so encoder and decoder are both read in
/// full, and a FLUX AE has no quant convs (a file that holds them is refused, as its config
/// would be).
pub const UNUSED_TENSORS: &[KnownUnused] = &[];

/// The autoencoder's configuration (diffusers `vae/config.json` field names).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// Latent channels (16 for FLUX).
    pub latent_channels: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Latent scale: model latents are `(z - shift) * scale`.
    pub scaling_factor: f64,
    /// Latent shift.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Image channels.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// FLUX has no quant convs; configs that ask for them are rejected.
    #[serde(default)]
    pub use_quant_conv: bool,
    /// See `use_quant_conv`.
    #[serde(default)]
    pub use_post_quant_conv: bool,
    /// Activation of the resnets; the FLUX AE's is SiLU, the only one built here.
    #[serde(default = "silu")]
    pub act_fn: String,
    /// Output image channels (must equal `in_channels`).
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Encoder block types; only `DownEncoderBlock2D` is built.
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    /// Decoder block types; only `UpDecoderBlock2D` is built.
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    /// Whether the mid block has attention (the FLUX AE's does; it is always built).
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Per-channel latent statistics (SD3-style); the FLUX AE uses `scaling_factor` and
    /// `shift_factor` only.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// See `latents_mean`.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// The image side the autoencoder was trained at, in pixels: diffusers' default tile of
    /// tiled passes (`enable_tiling`'s `tile_sample_min_size`; 1024 for the FLUX AE). A list
    /// (`[h, w]`) counts by its first entry, as diffusers' tile arithmetic does.
    #[serde(default = "flux_sample_size", deserialize_with = "side_or_first")]
    pub sample_size: usize,
}

/// How every key of diffusers' `AutoencoderKL` config is treated (see
/// [`crate::models::config_keys`]).
pub const CONFIG_KEYS: &[ConfigKeys] = &[ConfigKeys {
    section: "",
    inert: &[(
        "force_upcast",
        "whether pipelines run the VAE in f32; the dtype is the caller's choice here",
    )],
    refused: &[
        ("act_fn", "\"gelu\""),
        ("use_quant_conv", "true"),
        ("use_post_quant_conv", "true"),
        ("out_channels", "4"),
        ("down_block_types", "[\"DownBlock2D\"]"),
        ("up_block_types", "[\"UpBlock2D\"]"),
        ("mid_block_add_attention", "false"),
        ("latents_mean", "[0.0]"),
        ("latents_std", "[1.0]"),
    ],
}];

fn silu() -> String {
    "silu".into()
}

fn yes() -> bool {
    true
}

fn three() -> usize {
    3
}

/// The FLUX AE's `sample_size` (FLUX.1's `vae/config.json`; a BFL `ae.safetensors` comes
/// without a config). diffusers' class default is 32, which no FLUX config relies on.
fn flux_sample_size() -> usize {
    1024
}

/// `sample_size` as a number, or a list's first entry.
fn side_or_first<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Side {
        One(usize),
        Many(Vec<usize>),
    }
    match Side::deserialize(d)? {
        Side::One(side) => Ok(side),
        Side::Many(sides) => sides
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("`sample_size` is an empty list")),
    }
}

impl VaeConfig {
    /// The FLUX.1 AE (`ae.safetensors`).
    pub fn flux() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            in_channels: 3,
            use_quant_conv: false,
            use_post_quant_conv: false,
            act_fn: silu(),
            out_channels: None,
            down_block_types: None,
            up_block_types: None,
            mid_block_add_attention: true,
            latents_mean: None,
            latents_std: None,
            sample_size: flux_sample_size(),
        }
    }

    /// Refuses settings that change the computation and are not built here, naming the
    /// field and value.
    pub fn check(&self) -> std::result::Result<(), String> {
        let refuse = |field: &str, value: String, why: &str| {
            Err(format!("`{field}` = {value} is not supported ({why})"))
        };
        if self.act_fn != "silu" {
            return refuse(
                "act_fn",
                format!("{:?}", self.act_fn),
                "the FLUX AE uses silu",
            );
        }
        for (field, on) in [
            ("use_quant_conv", self.use_quant_conv),
            ("use_post_quant_conv", self.use_post_quant_conv),
        ] {
            if on {
                return refuse(field, "true".into(), "the FLUX AE has no quant convs");
            }
        }
        if let Some(out) = self.out_channels.filter(|&c| c != self.in_channels) {
            return refuse(
                "out_channels",
                out.to_string(),
                &format!(
                    "must equal in_channels ({}): the AE decodes to the channels it encodes",
                    self.in_channels
                ),
            );
        }
        for (field, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(t) = types.as_ref().filter(|t| t.iter().any(|b| b != want)) {
                return refuse(field, format!("{t:?}"), &format!("only {want} is built"));
            }
        }
        if !self.mid_block_add_attention {
            return refuse(
                "mid_block_add_attention",
                "false".into(),
                "the FLUX AE's mid block has attention",
            );
        }
        for (field, stats) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if stats.is_some() {
                return refuse(
                    field,
                    "(a list)".into(),
                    "the FLUX AE normalises with scaling_factor and shift_factor",
                );
            }
        }
        if self.block_out_channels.is_empty() || self.norm_num_groups == 0 {
            return refuse(
                "block_out_channels",
                format!("{:?}", self.block_out_channels),
                "needs at least one level and norm groups",
            );
        }
        Ok(())
    }

    /// Pixels per latent cell along each side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn conv3(vb: VarBuilder, i: usize, o: usize) -> Result<Conv2d> {
    conv2d(
        i,
        o,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb,
    )
}

/// Encoder and decoder with the latent normalisation.
#[derive(Debug)]
pub struct Autoencoder {
    config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_down: Vec<DownEncoderBlock2D>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_up: Vec<UpDecoderBlock2D>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl Autoencoder {
    /// Reads the autoencoder from `files` (in `layout`) in `dtype` on `dev`; a tensor of the
    /// files that the model does not read is refused unless `unused` allows it.
    pub fn load(
        files: &[std::path::PathBuf],
        layout: KeyLayout,
        config: &VaeConfig,
        dtype: candle_core::DType,
        dev: &candle_core::Device,
        unused: UnusedWeights,
    ) -> std::result::Result<Self, ModelError> {
        let source = std::sync::Arc::new(WeightSource::open(files, layout)?);
        let vae = Self::new(
            super::weights::shared_var_builder(source.clone(), dtype, dev),
            config,
        )
        .map_err(|e| weights_error(&files[0], e))?;
        source.check_unused("the autoencoder", UNUSED_TENSORS, unused)?;
        Ok(vae)
    }

    /// Loads `encoder.*` and `decoder.*` (diffusers names).
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        if config.use_quant_conv || config.use_post_quant_conv {
            candle_core::bail!("VAE configs with quant convs are not FLUX autoencoders");
        }
        let ch = &config.block_out_channels;
        let (groups, levels) = (config.norm_num_groups, ch.len());
        let last = *ch.last().expect("at least one level");
        let enc = vb.pp("encoder");
        let enc_down = (0..levels)
            .map(|i| {
                let cfg = DownEncoderBlock2DConfig {
                    num_layers: config.layers_per_block,
                    resnet_eps: 1e-6,
                    resnet_groups: groups,
                    add_downsample: i + 1 < levels,
                    downsample_padding: 0,
                    ..Default::default()
                };
                let input = if i == 0 { ch[0] } else { ch[i - 1] };
                DownEncoderBlock2D::new(enc.pp(format!("down_blocks.{i}")), input, ch[i], cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let dec = vb.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let dec_up = (0..levels)
            .map(|i| {
                let cfg = UpDecoderBlock2DConfig {
                    num_layers: config.layers_per_block + 1,
                    resnet_eps: 1e-6,
                    resnet_groups: groups,
                    add_upsample: i + 1 < levels,
                    ..Default::default()
                };
                let input = if i == 0 { rev[0] } else { rev[i - 1] };
                UpDecoderBlock2D::new(dec.pp(format!("up_blocks.{i}")), input, rev[i], cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            enc_conv_in: conv3(enc.pp("conv_in"), config.in_channels, ch[0])?,
            enc_down,
            enc_mid: MidBlock::new(enc.pp("mid_block"), last, groups)?,
            enc_norm_out: group_norm(groups, last, 1e-6, enc.pp("conv_norm_out"))?,
            enc_conv_out: conv3(enc.pp("conv_out"), last, 2 * config.latent_channels)?,
            dec_conv_in: conv3(dec.pp("conv_in"), config.latent_channels, last)?,
            dec_mid: MidBlock::new(dec.pp("mid_block"), last, groups)?,
            dec_up,
            dec_norm_out: group_norm(groups, ch[0], 1e-6, dec.pp("conv_norm_out"))?,
            dec_conv_out: conv3(dec.pp("conv_out"), ch[0], config.in_channels)?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The latent distribution's mean for images `[B, 3, H, W]` in [-1, 1]: `[B, 16, H/8, W/8]`
    /// (raw, before shift and scale).
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let mut xs = self.enc_conv_in.forward(image)?;
        for block in &self.enc_down {
            xs = block.forward(&xs)?;
        }
        let xs = self
            .enc_mid
            .forward(&xs)?
            .apply(&self.enc_norm_out)?
            .silu()?;
        let moments = self.enc_conv_out.forward(&xs)?;
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// Raw latents `[B, 16, h, w]` to images `[B, 3, 8h, 8w]` in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = self.dec_mid.forward(&self.dec_conv_in.forward(latents)?)?;
        for block in &self.dec_up {
            xs = block.forward(&xs)?;
        }
        xs.apply(&self.dec_norm_out)?
            .silu()?
            .apply(&self.dec_conv_out)
    }

    /// Raw latents to the model's normalised latents: `(z - shift) * scale`.
    pub fn normalize(&self, z: &Tensor) -> Result<Tensor> {
        (z - self.config.shift_factor.unwrap_or(0.0))? * self.config.scaling_factor
    }

    /// The inverse of [`Self::normalize`].
    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        (z / self.config.scaling_factor)? + self.config.shift_factor.unwrap_or(0.0)
    }
}
