//! The FLUX MM-DiT: embeddings, 19 double + 38 single blocks (at full size), final layer.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{adapted_linear, DoubleBlock, FinalLayer, SingleBlock};
use super::config::FluxConfig;
use super::embeddings::TimeTextEmbedding;
use super::linear::{AdaptedLinear, Linears};
use crate::models::weight_use::KnownUnused;

/// Tensors a FLUX transformer checkpoint may hold that the model reads in no layout or
/// format, because the reference computes without them too (every other unread tensor is
/// refused: see [`crate::models::weight_use`]).
pub const UNUSED_TENSORS: &[KnownUnused] = &[
    KnownUnused::new(
        "*.scale_input",
        "ComfyUI scaled fp8: the activation scale of an fp8 x fp8 matmul; its reference \
         forward (comfy/ops.py scaled_fp8_ops, forward_comfy_cast_weights) up-casts the \
         weight times `scale_weight` and never reads it (1.0 placeholders in the files)",
    ),
    KnownUnused::new(
        "*.input_scale",
        "ComfyUI mixed-precision fp8 (comfy/utils.py convert_old_quants): the new spelling of \
         `scale_input`, likewise unread when the weight is up-cast",
    ),
    KnownUnused::new(
        "*scaled_fp8",
        "ComfyUI scaled fp8 marker: an empty tensor whose dtype names the fp8 format; \
         comfy/model_detection.py model_config_from_unet pops it before loading",
    ),
];

/// Per-edit conditioning shared by every candidate of the edit.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// T5 hidden states `[1, S_txt, joint_attention_dim]`, model dtype.
    pub t5: Tensor,
    /// Pooled CLIP embedding `[1, pooled_projection_dim]`, model dtype.
    pub pooled: Tensor,
}

/// FLUX transformer (diffusers `FluxTransformer2DModel`).
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    config: FluxConfig,
    x_embedder: AdaptedLinear,
    context_embedder: AdaptedLinear,
    time_text: TimeTextEmbedding,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    final_layer: FinalLayer,
}

impl FluxTransformer {
    /// Every linear layer of the model.
    pub fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut all = vec![&self.x_embedder, &self.context_embedder];
        all.extend(self.time_text.linears());
        for b in &self.double_blocks {
            all.extend(b.linears());
        }
        for b in &self.single_blocks {
            all.extend(b.linears());
        }
        all.extend(self.final_layer.linears());
        all
    }

    /// Bytes the linear layers' weights occupy as held (quantized weights at their ggml
    /// size), and how many of the layers are held quantized (ggml types or fp8).
    pub fn linear_weight_bytes(&self) -> (usize, usize) {
        let linears = self.linears();
        let bytes = linears.iter().map(|l| l.base().weight().bytes()).sum();
        // Held in a format other than the compute dtype: ggml-quantized or fp8.
        let quantized = linears
            .iter()
            .filter(|l| l.base().weight().format() != super::held_weight::WeightFormat::Dense)
            .count();
        (bytes, quantized)
    }

    /// How many linear layers are held in each format (`dense`, `fp8`, `q8_0`, ...), in
    /// the order [`super::held_weight::WeightFormat::name`] sorts.
    pub fn linear_formats(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for l in self.linears() {
            *counts.entry(l.base().weight().format().name()).or_insert(0) += 1;
        }
        counts
    }

    /// Loads the model from diffusers-named weights; `lora` supplies MoE experts (plain LoRA
    /// is merged by the weight source before it reaches here).
    pub fn new(vb: VarBuilder, config: &FluxConfig, linears: &Linears) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let hidden = config.hidden();
        let heads = config.num_attention_heads;
        let mlp = config.mlp_hidden();
        let double_blocks = (0..config.num_layers)
            .map(|i| {
                DoubleBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    hidden,
                    heads,
                    mlp,
                    linears,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| {
                SingleBlock::new(
                    vb.pp(format!("single_transformer_blocks.{i}")),
                    hidden,
                    heads,
                    mlp,
                    linears,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            x_embedder: adapted_linear(vb.pp("x_embedder"), config.in_channels, hidden, linears)?,
            context_embedder: adapted_linear(
                vb.pp("context_embedder"),
                config.joint_attention_dim,
                hidden,
                linears,
            )?,
            time_text: TimeTextEmbedding::new(
                vb.pp("time_text_embed"),
                hidden,
                config.pooled_projection_dim,
                config.guidance_embeds,
                linears,
            )?,
            double_blocks,
            single_blocks,
            final_layer: FinalLayer::new(&vb, hidden, config.out_channels(), linears)?,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// One forward for a batch of candidates sharing the edit's text conditioning (see
    /// [`StepInputs`] for the shapes). Returns the velocity `[B, S_img, out_channels]`. With
    /// step caches per candidate: [`Self::forward_cached`] (in [`super::step_cache`]).
    pub fn forward(&self, step: &StepInputs) -> Result<Tensor> {
        // `embed` drops its sigma / guidance tensors before the blocks run: small buffers
        // kept alive across the forward pin the CPU heap's top above the freed activations
        // (the 512-panel bench peak grew by 250 MB when they were).
        let (img, txt, temb) = self.embed(step)?;
        self.blocks_and_final(img, txt, &temb, step.rope)
    }

    /// [`Self::forward`] with `sigma` and `guidance` given as `[B]` f32 tensors on the
    /// device: a captured CUDA graph reads them from buffers it rewrites between replays
    /// ([`super::graph_step`]), where a scalar would be baked into the graph.
    pub fn forward_at(
        &self,
        img: &Tensor,
        text: &TextConditioning,
        sigma: &Tensor,
        guidance: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (img, txt, temb) = self.embed_at(img, text, sigma, guidance)?;
        self.blocks_and_final(img, txt, &temb, rope)
    }

    /// Every block, then the final layer, on the embeddings.
    fn blocks_and_final(
        &self,
        img: Tensor,
        txt: Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let img = self.run_blocks(&self.double_blocks, img, txt, temb, rope)?;
        self.final_layer.forward(&img, temb)
    }

    /// The embeddings: `(img [B, S_img, hidden], txt [B, S_txt, hidden], temb [B, hidden])`.
    pub(super) fn embed(&self, step: &StepInputs) -> Result<(Tensor, Tensor, Tensor)> {
        let (sigma, guidance) = step_scalars(step.img, step.sigma, step.guidance)?;
        self.embed_at(step.img, step.text, &sigma, &guidance)
    }

    /// [`Self::embed`] with `sigma` and `guidance` as `[B]` f32 tensors.
    fn embed_at(
        &self,
        img: &Tensor,
        text: &TextConditioning,
        sigma: &Tensor,
        guidance: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let b = img.dim(0)?;
        let dtype = img.dtype();
        // Text conditioning is shared by the batch ([1, ..]) or given per row ([B, ..]).
        let per_batch = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(dtype)?;
            if t.dim(0)? == b {
                Ok(t)
            } else {
                let mut reps = vec![1; t.rank()];
                reps[0] = b;
                t.repeat(reps)
            }
        };
        let pooled = per_batch(&text.pooled)?;
        let temb = self.time_text.forward(sigma, guidance, &pooled)?;

        let img = self.x_embedder.forward(img)?;
        let t5 = per_batch(&text.t5)?;
        let txt = self.context_embedder.forward(&t5)?;
        Ok((img, txt, temb))
    }

    /// Runs `doubles` (all of the model's double blocks or a tail of them) and then every
    /// single block; returns the image stream `[B, S_img, hidden]`.
    pub(super) fn run_blocks(
        &self,
        doubles: &[DoubleBlock],
        mut img: Tensor,
        mut txt: Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        for block in doubles {
            (img, txt) = block.forward(&img, &txt, temb, rope)?;
        }
        let n_txt = txt.dim(1)?;
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            joint = block.forward(&joint, temb, rope)?;
        }
        joint.narrow(1, n_txt, joint.dim(1)? - n_txt)
    }

    /// The double-stream blocks.
    pub(super) fn double_blocks(&self) -> &[DoubleBlock] {
        &self.double_blocks
    }

    /// The single-stream blocks.
    pub(super) fn single_blocks(&self) -> &[SingleBlock] {
        &self.single_blocks
    }

    /// The final norm and projection.
    pub(super) fn final_layer(&self) -> &FinalLayer {
        &self.final_layer
    }
}

/// What one transformer forward reads: a batch of B candidates at one step of one edit.
#[derive(Clone, Copy)]
pub struct StepInputs<'a> {
    /// `[B, S_img, in_channels]`: noisy latents ++ masked-image latents ++ mask.
    pub img: &'a Tensor,
    /// The edit's text conditioning, batch 1 (shared by the candidates) or B.
    pub text: &'a TextConditioning,
    /// The step's sigma (the model multiplies it by 1000 itself).
    pub sigma: f64,
    /// The guidance the model is distilled for (also multiplied by 1000 inside).
    pub guidance: f64,
    /// RoPE tables `[S_txt + S_img, head_dim / 2]` for the joint sequence.
    pub rope: &'a (Tensor, Tensor),
}

/// `sigma` and `guidance` as the `[B]` f32 tensors the time embedding reads, B = `img`'s
/// batch.
pub fn step_scalars(img: &Tensor, sigma: f64, guidance: f64) -> Result<(Tensor, Tensor)> {
    let (b, dev) = (img.dim(0)?, img.device());
    Ok((
        Tensor::full(sigma as f32, b, dev)?,
        Tensor::full(guidance as f32, b, dev)?,
    ))
}
