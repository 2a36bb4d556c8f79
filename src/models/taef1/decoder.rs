//! The tiny decoder (diffusers `DecoderTiny`, as in TAESD / TAEF1): plain 3x3 convs, ReLU
//! residual blocks and nearest upsampling, with no normalisation and no attention. Its cost
//! is linear in the pixels: for TAEF1 about 141 GFLOP per 512x512 image against the FLUX
//! autoencoder decoder's 2,500 (an eighteenth; counted from the conv shapes), with 1.2 M
//! parameters against 50 M.
//!
//! Semantics follow diffusers 0.42.1: `DecoderTiny` in
//! `src/diffusers/models/autoencoders/vae.py`, `AutoencoderTinyBlock` in
//! `src/diffusers/models/unets/unet_2d_blocks.py`. The weights are `decoder.layers.N.*`, `N`
//! being the module's place in `DecoderTiny.layers` (an `nn.Sequential`): activations and
//! upsamplings take a number too, though they hold no weight.
//!
//! ```text
//! layers.0           conv 3x3 latent -> C (bias)
//! layers.1           act_fn
//! per stage s:       num_decoder_blocks[s] x AutoencoderTinyBlock (conv.0, conv.2, conv.4)
//!                    nn.Upsample(nearest)              (not after the last stage)
//!                    conv 3x3 C -> C, no bias          (last stage: C -> out, with bias)
//! ```
//!
//! For TAEF1 (3, 3, 3, 1 blocks) that is 0, 2-4, 6 (up 5), 7-9, 11 (up 10), 12-14, 16
//! (up 15), 17, 18.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{conv2d, conv2d_no_bias, Conv2d, Conv2dConfig, VarBuilder};

use super::config::TinyConfig;
use crate::models::activation::Activation;

fn conv3(vb: VarBuilder, i: usize, o: usize, bias: bool) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    if bias {
        conv2d(i, o, 3, cfg, vb)
    } else {
        conv2d_no_bias(i, o, 3, cfg, vb)
    }
}

/// `AutoencoderTinyBlock(C, C)`: `relu(conv(act(conv(act(conv(x))))) + x)`. In the decoder
/// its input and output widths are equal, so the skip is the identity (no weight).
#[derive(Debug)]
struct TinyBlock {
    convs: [Conv2d; 3],
    act: Activation,
}

impl TinyBlock {
    fn new(vb: VarBuilder, channels: usize, act: Activation) -> Result<Self> {
        // `conv` is an nn.Sequential(conv, act, conv, act, conv): the convs are 0, 2, 4.
        let vb = vb.pp("conv");
        Ok(Self {
            convs: [
                conv3(vb.pp("0"), channels, channels, true)?,
                conv3(vb.pp("2"), channels, channels, true)?,
                conv3(vb.pp("4"), channels, channels, true)?,
            ],
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.convs[0].forward(xs)?)?;
        let h = self.act.apply(&self.convs[1].forward(&h)?)?;
        let h = self.convs[2].forward(&h)?;
        // `fuse` is nn.ReLU whatever act_fn is.
        (h + xs)?.relu()
    }
}

/// One stage: its blocks, then (except after the last stage) a nearest upsampling, then a
/// conv.
#[derive(Debug)]
struct Stage {
    blocks: Vec<TinyBlock>,
    upsample: bool,
    conv: Conv2d,
}

/// The tiny decoder: latents `[B, latent_channels, h, w]` to images `[B, 3, 8h, 8w]`.
///
/// **Input space.** [`TinyDecoder::decode`] takes what diffusers' `AutoencoderTiny.decode`
/// takes. In a FLUX pipeline with this model as `pipe.vae` that is the transformer's latents
/// unscaled with *this model's* factors, `z / scaling_factor + shift_factor`; TAEF1's are
/// 1 and 0, so it decodes the transformer's latents as they are. It must not be given the
/// raw latents the FLUX autoencoder's decoder takes (`z / 0.3611 + 0.1159`, see
/// `models::flux::vae::Autoencoder::denormalize`): TAEF1 was distilled on the normalised
/// space. [`TinyDecoder::decode_model_latents`] takes the transformer's latents (the same
/// tensor the FLUX autoencoder path denormalizes) and applies the factors itself, so a
/// generator can swap one decoder for the other on the same input.
#[derive(Debug)]
pub struct TinyDecoder {
    config: TinyConfig,
    conv_in: Conv2d,
    act: Activation,
    stages: Vec<Stage>,
    dtype: DType,
}

impl TinyDecoder {
    /// Reads `decoder.layers.*` from `vb` (diffusers names; pass the `VarBuilder` of the whole
    /// `AutoencoderTiny` file) after checking `config` (a refused field is an error naming
    /// it).
    pub fn load(vb: VarBuilder, config: &TinyConfig) -> Result<Self> {
        config.check().map_err(candle_core::Error::msg)?;
        let act = config.activation().map_err(candle_core::Error::msg)?;
        let layers = vb.pp("decoder").pp("layers");
        let width = config.decoder_block_out_channels[0];
        let conv_in = conv3(layers.pp("0"), config.latent_channels, width, true)?;
        let last = config.num_decoder_blocks.len() - 1;
        // Index 1 is the activation after conv_in.
        let mut index = 2;
        let mut stages = Vec::with_capacity(last + 1);
        for (s, &blocks) in config.num_decoder_blocks.iter().enumerate() {
            let blocks = (0..blocks)
                .map(|_| {
                    let block = TinyBlock::new(layers.pp(index.to_string()), width, act);
                    index += 1;
                    block
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = s != last;
            if upsample {
                index += 1; // nn.Upsample has a number and no weights
            }
            let out = if upsample { width } else { config.out_channels };
            let conv = conv3(layers.pp(index.to_string()), width, out, !upsample)?;
            index += 1;
            stages.push(Stage {
                blocks,
                upsample,
                conv,
            });
        }
        Ok(Self {
            config: config.clone(),
            conv_in,
            act,
            stages,
            dtype: vb.dtype(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TinyConfig {
        &self.config
    }

    /// `AutoencoderTiny.decode`: latents `[B, latent_channels, h, w]` in the model's input
    /// space (see the type's documentation) to images `[B, out_channels, f h, f w]`
    /// (`f` = [`TinyConfig::upscale`], 8 for TAEF1) in about [-1, 1], unclamped like
    /// diffusers' (its image processor clamps later). Returned in the weights' dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let xs = latents.to_dtype(self.dtype)?;
        // Soft clamp to (-3, 3): TAESD-family decoders were trained on latents in that range.
        let xs = ((xs / 3.0)?.tanh()? * 3.0)?;
        let mut xs = self.act.apply(&self.conv_in.forward(&xs)?)?;
        for stage in &self.stages {
            for block in &stage.blocks {
                xs = block.forward(&xs)?;
            }
            if stage.upsample {
                let f = self.config.upsampling_scaling_factor;
                let (_, _, h, w) = xs.dims4()?;
                xs = xs.upsample_nearest2d(h * f, w * f)?;
            }
            xs = stage.conv.forward(&xs)?;
        }
        // The decoder is trained to output [0, 1]; diffusers maps that to its [-1, 1].
        (xs * 2.0)? - 1.0
    }

    /// The transformer's latents `[B, latent_channels, h, w]` (the FLUX pipeline's latents
    /// after unpacking, before any VAE scaling: what
    /// `models::flux::vae::Autoencoder::denormalize` takes) to images in about [-1, 1]:
    /// `decode(z / scaling_factor + shift_factor)`, as `FluxPipeline` does with this model as
    /// its `vae`.
    pub fn decode_model_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let z = if self.config.scaling_factor == 1.0 && self.config.shift_factor == 0.0 {
            z
        } else {
            ((z / self.config.scaling_factor)? + self.config.shift_factor)?
        };
        self.decode(&z)
    }
}
