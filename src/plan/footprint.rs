//! What each part of an edit occupies, computed from the model configurations alone: the
//! parameter counts of the FLUX transformer and autoencoder as this crate builds them, the
//! bytes a weight format holds them in, and the working memory of one transformer forward
//! and one VAE pass as this crate's kernels allocate it.
//!
//! The activation formulas follow the code: attention materialises `[S, S]` score matrices
//! for a chunk of (candidate, head) pairs at a time (see `models::flux::blocks::attention`),
//! the VAE's mid-block attention
//! does so in f32 over every latent position, and CUDA convolutions unfold their input
//! (im2col, nine times the input for a 3x3 kernel). Their constant factors were fitted to
//! measured peak resident memory on the CPU (see the tests in `plan`).

use candle_core::DType;

use crate::models::cuda::switch::{self, Kernel};
use crate::models::cuda::{attention as flash, dequant};
use crate::models::flux::blocks::ATTENTION_CHUNK_ELEMENTS;
pub use crate::models::flux::held_weight::WeightFormat;
use crate::models::flux::vae::VaeConfig;
use crate::models::flux::vae_tiling::VaeTiling;
use crate::models::flux::FluxConfig;

/// One linear layer's shape, `(out, in)`; every one has a bias of `out`.
pub type LinearShape = (usize, usize);

/// The transformer's linear layers (diffusers `FluxTransformer2DModel` as built in
/// `models::flux::transformer`), and the parameters outside them (biases, norm scales).
pub fn transformer_linears(c: &FluxConfig) -> (Vec<LinearShape>, usize) {
    let d = c.hidden();
    let mlp = 4 * d;
    let head = c.attention_head_dim;
    let mut linears = vec![(d, c.in_channels), (d, c.joint_attention_dim)];
    // Time, guidance and pooled-text embedders: 256 sinusoidal features in.
    linears.extend([(d, 256), (d, d)]);
    if c.guidance_embeds {
        linears.extend([(d, 256), (d, d)]);
    }
    linears.extend([(d, c.pooled_projection_dim), (d, d)]);
    let mut norms = 0;
    for _ in 0..c.num_layers {
        // Image and text streams: modulation, q/k/v, output projection, MLP.
        for _ in 0..2 {
            linears.extend([
                (6 * d, d),
                (d, d),
                (d, d),
                (d, d),
                (d, d),
                (mlp, d),
                (d, mlp),
            ]);
        }
        norms += 4 * head;
    }
    for _ in 0..c.num_single_layers {
        linears.extend([(3 * d, d), (d, d), (d, d), (d, d), (mlp, d), (d, d + mlp)]);
        norms += 2 * head;
    }
    let patch = c.patch_size * c.patch_size;
    linears.extend([(2 * d, d), (patch * c.out_channels(), d)]);
    let biases: usize = linears.iter().map(|(o, _)| o).sum();
    (linears, biases + norms)
}

/// Parameters of the transformer.
pub fn transformer_parameters(c: &FluxConfig) -> usize {
    let (linears, other) = transformer_linears(c);
    linears.iter().map(|(o, i)| o * i).sum::<usize>() + other
}

/// Bytes of the transformer's weights held in `format`, with the other parameters in
/// `dtype`.
pub fn transformer_weight_bytes(c: &FluxConfig, format: WeightFormat, dtype: DType) -> usize {
    let e = dtype.size_in_bytes();
    let (linears, other) = transformer_linears(c);
    let held: usize = linears
        .iter()
        .map(|&(o, i)| match format {
            WeightFormat::Dense => o * i * e,
            WeightFormat::Fp8 => o * i,
            WeightFormat::Quantized(t) if i % t.block_size() == 0 => {
                o * i / t.block_size() * t.type_size()
            }
            WeightFormat::Quantized(_) => o * i * e,
        })
        .sum();
    held + other * e
}

/// Working memory of one transformer forward over `batch` candidates of `image_tokens`
/// plus `text_tokens` tokens, on a CUDA device or not (quantized layers multiply
/// differently there: [`QuantizedMatmul`]).
pub fn transformer_activation_bytes(
    c: &FluxConfig,
    format: WeightFormat,
    dtype: DType,
    batch: usize,
    image_tokens: usize,
    text_tokens: usize,
    cuda: bool,
) -> usize {
    let e = dtype.size_in_bytes();
    let s = image_tokens + text_tokens;
    let d = c.hidden();
    // Scores in the compute dtype, their f32 softmax, and its cast back: 8 bytes an element
    // in f32 (the casts are no-ops), 12 in half precision.
    let per_score = if e == 4 { 8 } else { 2 * e + 8 };
    // Attention runs a few (candidate, head) pairs at a time (models::flux::blocks); on
    // CUDA in half precision our flash attention keeps no scores at all (its q, k, v and
    // output are streams, counted below).
    let pairs = batch * c.num_attention_heads;
    let pairs_at_once = (ATTENTION_CHUNK_ELEMENTS / (s * s)).clamp(1, pairs);
    let attention = if flash_attention(c, dtype, cuda) {
        0
    } else {
        pairs_at_once * s * s * per_score
    };
    // Residual streams, normalised and modulated copies, q/k/v, the MLP's 4x-wide hidden
    // layer and the single blocks' concatenation, alive around the attention.
    let streams = batch * s * d * e * STREAM_COPIES;
    // Quantized kernels take f32 activations; on CUDA the token-wise layers dequantize
    // their weight instead (one layer at a time; other types than the three below go
    // through f32 unless the model is f16); fp8
    // weights are up-cast one layer at a time, or (the fp8 GEMM) the activations held as
    // e4m3: the widest input (the single blocks' 5 x hidden) beside a modulated input's
    // rows (hidden), a byte an element.
    let (linears, _) = transformer_linears(c);
    let widest = linears.iter().map(|(o, i)| o * i).max().unwrap_or(0);
    let conversion = match format {
        WeightFormat::Dense => 0,
        // Q8_0 / Q4_0 / Q4_K dequantize straight into the model dtype (one pass of ours).
        WeightFormat::Quantized(t) if cuda && (dtype == DType::F16 || dequant::has_kernel(t)) => {
            widest * e
        }
        WeightFormat::Quantized(_) if cuda => widest * (4 + e),
        WeightFormat::Quantized(_) => batch * s * 5 * d * 4,
        WeightFormat::Fp8 => (widest * e).max(batch * s * 6 * d),
    };
    attention + streams + conversion
}

/// Whether the transformer's attention runs as the flash attention (no score matrices):
/// on CUDA, in bf16 / f16, at a head size it takes, unless `ICEDIT_CUDA_FUSED` turns it
/// off (the test `models::flux::blocks` makes per forward).
fn flash_attention(c: &FluxConfig, dtype: DType, cuda: bool) -> bool {
    cuda && switch::enabled().contains(Kernel::Attention)
        && flash::supports(c.hidden(), c.num_attention_heads, dtype)
}

/// Copies of one `[B, S, hidden]` stream alive at the forward's peak (fitted, see above).
const STREAM_COPIES: usize = 8;

/// Parameters of the autoencoder (encoder and decoder, as `models::flux::vae` builds it).
pub fn vae_parameters(v: &VaeConfig) -> usize {
    let conv = |i: usize, o: usize, k: usize| o * i * k * k + o;
    let norm = |c: usize| 2 * c;
    let resnet = |i: usize, o: usize| {
        norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + if i != o { conv(i, o, 1) } else { 0 }
    };
    let ch = &v.block_out_channels;
    let last = *ch.last().expect("a VAE has levels");
    let mid = 2 * resnet(last, last) + norm(last) + 4 * (last * last + last);
    let mut encoder = conv(v.in_channels, ch[0], 3) + mid + norm(last);
    encoder += conv(last, 2 * v.latent_channels, 3);
    let mut input = ch[0];
    for (level, &out) in ch.iter().enumerate() {
        for r in 0..v.layers_per_block {
            encoder += resnet(if r == 0 { input } else { out }, out);
        }
        if level + 1 < ch.len() {
            encoder += conv(out, out, 3);
        }
        input = out;
    }
    let mut decoder = conv(v.latent_channels, last, 3) + mid + norm(ch[0]);
    decoder += conv(ch[0], v.in_channels, 3);
    let mut input = last;
    for (level, &out) in ch.iter().enumerate().rev() {
        for r in 0..v.layers_per_block + 1 {
            decoder += resnet(if r == 0 { input } else { out }, out);
        }
        if level > 0 {
            decoder += conv(out, out, 3);
        }
        input = out;
    }
    encoder + decoder
}

/// Working memory of one VAE pass (encoding the diptych, or decoding one candidate's
/// diptych) of `pixels` pixels, with the latent grid `downscale` times smaller per side.
/// The mid-block attention runs at the latent resolution and the widest convolutions at
/// full resolution, never both at once, so the pass needs the larger of the two.
pub fn vae_activation_bytes(v: &VaeConfig, dtype: DType, pixels: usize, cuda: bool) -> usize {
    let e = dtype.size_in_bytes();
    let positions = pixels / v.downscale().pow(2);
    // Mid-block attention in f32, a block of query rows at a time: the softmax keeps the
    // scores, their shifted copy, the exponentials and the result, 16 bytes a pair.
    let rows = crate::models::flux::vae_mid::rows_per_block(positions);
    let attention = rows * positions * 16;
    // The widest full-resolution activation: the decoder's last upsampling keeps level 1's
    // channels at full resolution.
    let wide = v.block_out_channels[1.min(v.block_out_channels.len() - 1)];
    let mut conv = pixels * wide * e * CONV_COPIES;
    if cuda {
        // candle's CUDA conv2d unfolds the input (im2col) for a 3x3 kernel.
        conv += pixels * wide * e * 9;
    }
    attention.max(conv)
}

/// Full-resolution activations alive around the VAE's widest convolution (fitted, see
/// above).
const CONV_COPIES: usize = 6;

/// Working memory of one VAE pass over a `height` x `width` image run tile by tile
/// (`models::flux::vae_tiling`): one tile's pass (a tile cut short by the image is smaller),
/// and the image-sized buffers the tiles are assembled in (the previous row of tiles, the
/// kept parts, the result; in image channels, so small beside a pass).
pub fn tiled_vae_activation_bytes(
    v: &VaeConfig,
    dtype: DType,
    (height, width): (usize, usize),
    cuda: bool,
    tiling: &VaeTiling,
) -> usize {
    let tile = tiling.tile.min(height) * tiling.tile.min(width);
    let assembly = height * width * v.in_channels * dtype.size_in_bytes() * ASSEMBLY_COPIES;
    vae_activation_bytes(v, dtype, tile, cuda) + assembly
}

/// Image-sized copies a tiled pass holds beside its tile (the assembled result; the
/// previous row of tiles was below what the fit could see). Fitted with the constants
/// above on a 1024x512 pass with 512 px tiles (+5%); at 256 px tiles the estimate runs 14%
/// over, conservatively.
const ASSEMBLY_COPIES: usize = 1;

/// The dimensions of a Qwen-VL judge (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) that its working
/// memory depends on: the language model's, the vision tower's and its patching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlJudgeDims {
    /// Language model width.
    pub hidden: usize,
    /// Decoder layers (each keeps its keys and values).
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP width of the language model.
    pub intermediate: usize,
    /// Vision tower width.
    pub vision_hidden: usize,
    /// Vision tower MLP width.
    pub vision_intermediate: usize,
    /// Pixels per patch side.
    pub patch: usize,
    /// Patches merged per side into one language-model token.
    pub merge: usize,
}

impl VlJudgeDims {
    /// The dimensions a checkpoint's `config.json` states.
    pub fn of_config(c: &crate::models::qwen_vl::config::Qwen2VlConfig) -> Self {
        Self {
            hidden: c.text.hidden_size,
            layers: c.text.num_hidden_layers,
            heads: c.text.num_attention_heads,
            kv_heads: c.text.num_key_value_heads,
            head_dim: c.text.head_dim,
            intermediate: c.text.intermediate_size,
            vision_hidden: c.vision.embed_dim,
            vision_intermediate: c.vision.mlp_hidden,
            patch: c.vision.patch_size,
            merge: c.vision.spatial_merge_size,
        }
    }
}

/// Text tokens of a judge prompt beside its images: the template, the instruction, the
/// rubric and the answer's start (our prompts run 150-300 tokens; the larger is counted).
pub const JUDGE_TEXT_TOKENS: usize = 300;

/// Working memory of one batched call of a Qwen-VL judge: `batch` prompts of `images`
/// images of at most `image_pixels` pixels each, activations of `e` bytes.
///
/// Derivation, following `models::qwen_vl`:
/// - an image is `P = pixels / patch^2` patches, and `P / merge^2` tokens of the language
///   model, so a prompt is `T = images * P / merge^2 + JUDGE_TEXT_TOKENS` tokens;
/// - the vision tower runs first, over the `n = batch * images * P` patches of the call:
///   its residual stream and the normalised, q/k/v and output copies of it (4 x `n x
///   vision_hidden`), its MLP's hidden rows (`n x vision_intermediate`), and its attention,
///   run a few heads of one image at a time under 16 MiB (`vision::CHUNK_BYTES`, or one
///   head's `P x P` f32 scores when larger);
/// - then the prefill of the language model, one layer at a time: its KV cache, complete at
///   the last layer (`batch * layers * 2 * kv_heads * head_dim * T * e`), beside either
///   that layer's attention, whose scores and softmax are f32 over every head
///   (`batch * heads * T^2 * 8`, `text::masked_attention`), or its MLP (gate, up and their
///   product: `3 x batch * T * intermediate * e`), whichever is larger, and four residual
///   copies (`4 x batch * T * hidden * e`). Logits are taken at the last position only
///   (`text::last_position`): `batch x vocabulary` in f32, a few MB, not counted.
///
/// The two do not overlap (the image embeddings handed on are a stream of the second), so
/// the call needs the larger. Not yet measured against a run; an estimate from the shapes.
pub fn vl_judge_working_bytes(
    d: &VlJudgeDims,
    batch: usize,
    image_pixels: usize,
    images: usize,
    e: usize,
) -> usize {
    let patches = image_pixels / (d.patch * d.patch).max(1);
    let tokens = images * patches / (d.merge * d.merge).max(1) + JUDGE_TEXT_TOKENS;
    let rows = batch * images * patches;
    let vision_attention = (16usize << 20).max(patches * patches * 4);
    let vision = rows * (4 * d.vision_hidden + d.vision_intermediate) * e + vision_attention;
    let kv_cache = batch * d.layers * 2 * d.kv_heads * d.head_dim * tokens * e;
    let scores = batch * d.heads * tokens * tokens * 8;
    let mlp = 3 * batch * tokens * d.intermediate * e;
    let streams = 4 * batch * tokens * d.hidden * e;
    vision.max(kv_cache + scores.max(mlp) + streams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::bench::RandomWeights;
    use crate::models::flux::transformer::FluxTransformer;
    use crate::models::flux::vae::Autoencoder;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;
    use candle_nn::VarBuilder;
    use std::sync::atomic::Ordering;

    fn small() -> (FluxConfig, VaeConfig) {
        crate::models::flux::bench::small_configs()
    }

    /// Counts the parameters a model really asks its VarBuilder for.
    fn built<T>(build: impl FnOnce(VarBuilder) -> candle_core::Result<T>) -> usize {
        let random = RandomWeights::default();
        let counter = random.elements.clone();
        let vb = VarBuilder::from_backend(Box::new(random), DType::F32, Device::Cpu);
        build(vb).unwrap();
        counter.load(Ordering::Relaxed)
    }

    #[test]
    fn counts_the_parameters_the_models_are_built_with() {
        let (t, v) = small();
        let linears = crate::models::flux::linear::Linears::default();
        assert_eq!(
            transformer_parameters(&t),
            built(|vb| FluxTransformer::new(vb, &t, &linears))
        );
        assert_eq!(vae_parameters(&v), built(|vb| Autoencoder::new(vb, &v)));
    }

    #[test]
    fn the_full_models_have_their_published_sizes() {
        // FLUX.1 Fill [dev]: 11.9B parameters (its model card); the FLUX AE: 83.8M
        // (diffusers' AutoencoderKL with FLUX.1's vae/config.json).
        let p = transformer_parameters(&FluxConfig::fill_dev()) as f64;
        assert!((p / 1e9 - 11.9).abs() < 0.05, "{p}");
        let v = vae_parameters(&VaeConfig::flux()) as f64;
        assert!((v / 1e6 - 83.8).abs() < 0.5, "{v}");
    }

    #[test]
    fn quantized_formats_hold_fewer_bytes_in_the_published_ratios() {
        let c = FluxConfig::fill_dev();
        let gb = |f| transformer_weight_bytes(&c, f, DType::BF16) as f64 / 1e9;
        // The community's GGUF conversions of FLUX.1 Fill [dev] as issue 15 quotes them:
        // F16 23.8 GB, Q8_0 ~12.8 GB, Q4_0 ~6.9 GB; ours hold the same layers.
        assert!((gb(WeightFormat::Dense) - 23.8).abs() < 0.2);
        assert!((gb(WeightFormat::Quantized(GgmlDType::Q8_0)) - 12.8).abs() < 0.3);
        assert!((gb(WeightFormat::Quantized(GgmlDType::Q4_0)) - 6.9).abs() < 0.3);
        assert!((gb(WeightFormat::Fp8) - 11.9).abs() < 0.2);
    }

    /// A Qwen-VL judge's working memory follows its dimensions, its batch and its images
    /// (it was a flat 0.75 GB x dtype bytes for any of them).
    #[test]
    fn a_judges_working_memory_follows_its_model_batch_and_images() {
        // Qwen2.5-VL-3B's config.json.
        let qwen25_3b = VlJudgeDims {
            hidden: 2048,
            layers: 36,
            heads: 16,
            kv_heads: 2,
            head_dim: 128,
            intermediate: 11008,
            vision_hidden: 1280,
            vision_intermediate: 3420,
            patch: 14,
            merge: 2,
        };
        let bytes = |d: &VlJudgeDims, batch, pixels| vl_judge_working_bytes(d, batch, pixels, 2, 2);
        // Two 512 px images a prompt: 2 x 334 image tokens + 300 = 968 tokens. At batch 8
        // the f32 scores of one layer (8 x 16 x 968^2 x 8 bytes = 0.96 GB) lead, beside the
        // KV cache (0.29 GB) and the streams (0.13 GB): the presets' "1-2 GB".
        let at_8 = bytes(&qwen25_3b, 8, 512 * 512);
        assert_eq!(at_8, 959_512_576 + 285_474_816 + 126_877_696);
        // Eight times the prompts: eight times the memory.
        assert_eq!(bytes(&qwen25_3b, 64, 512 * 512), 8 * at_8);
        // Smaller images, less.
        assert!(bytes(&qwen25_3b, 8, 256 * 256) < at_8 / 2);
        // A wider model with more layers and heads, more.
        let qwen25_7b = VlJudgeDims {
            hidden: 3584,
            layers: 28,
            heads: 28,
            kv_heads: 4,
            intermediate: 18944,
            ..qwen25_3b
        };
        assert!(bytes(&qwen25_7b, 8, 512 * 512) > at_8);
    }

    #[test]
    fn a_cuda_forward_in_half_precision_plans_no_attention_scores() {
        // 1024x512 diptych (2048 image tokens) and 512 T5 tokens: s = 2560.
        let c = FluxConfig::fill_dev();
        let forward = |dtype, cuda| {
            transformer_activation_bytes(&c, WeightFormat::Dense, dtype, 4, 2048, 512, cuda)
        };
        let s = 2560;
        let pairs_at_once = ATTENTION_CHUNK_ELEMENTS / (s * s);
        let scores = pairs_at_once * s * s * (2 * 2 + 8);
        // The flash kernel may be turned off in this process (ICEDIT_CUDA_FUSED, or a
        // kernel check that failed); then the scores are planned as on the CPU.
        let flash = switch::enabled().contains(Kernel::Attention);
        let cuda = forward(DType::BF16, true);
        let cpu = forward(DType::BF16, false);
        assert_eq!(cpu - cuda, if flash { scores } else { 0 });
        // f32 has no flash kernel: its scores are planned on CUDA too.
        assert_eq!(forward(DType::F32, true), forward(DType::F32, false));
    }
}
