//! FLUX.1 Fill [dev] + the ICEdit LoRA as a [`Generator`]: the adapter over the model code
//! in [`crate::models::flux`] (what diffusers' `FluxFillPipeline` does around the models).
//!
//! One edit: the prompt is encoded once by T5 and CLIP (then the encoders are dropped
//! unless kept), the diptych with its right half masked is encoded by the VAE, and the
//! masked-image latents and the mask tokens are concatenated to every candidate's noisy
//! latents (64 + 64 + 256 = 384 channels per token). Each velocity call is one transformer
//! forward for a batch of candidates (each row with its own step cache, see
//! [`crate::models::flux::step_cache`]); decoding unpacks, runs the VAE decoder and crops the
//! right panel. With a tiny decoder (TAEF1) loaded, live previews (and the judge's previews
//! when asked) are decoded by it instead: see [`PreviewDecoder`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::noise::seeded_noise;
use super::{
    CandidateCache, DecodePurpose, Generator, GeneratorInfo, PreparedEdit, PreparedSet, RowWork,
};
use crate::edit::{crop_right_panel, make_diptych, EditContext};
use crate::error::GenerateError;
use crate::models::bench::RandomWeights;
use crate::models::flux::files::{fill_mismatch, EncoderFiles};
use crate::models::flux::flops::ForwardFlops;
use crate::models::flux::graph_step::StepGraphs;
use crate::models::flux::held_weight::WeightFormat;
use crate::models::flux::linear::Linears;
use crate::models::flux::lora::{find_lora_file, LoraReport, LoraSet};
use crate::models::flux::scheduler::DynamicShift;
use crate::models::flux::text::TextEncoders;
use crate::models::flux::transformer::{self, FluxTransformer, StepInputs, TextConditioning};
use crate::models::flux::vae::Autoencoder;
use crate::models::flux::vae::VaeConfig;
use crate::models::flux::vae_tiling::VaeTiling;
use crate::models::flux::weights::KeyLayout;
use crate::models::flux::weights::{shared_var_builder, weights_error, WeightSource};
use crate::models::flux::{embeddings, latents, FluxConfig, FluxFiles, FluxPaths};
use crate::models::taef1::{TinyDecoder, TinyDecoderFiles};
use crate::models::weight_use::UnusedWeights;

/// RoPE base frequency.
const ROPE_THETA: f64 = 10000.0;

/// Which decoder the screening judge's x0 previews ([`DecodePurpose::Preview`]) go through.
/// Live previews use the tiny decoder whenever one is loaded; final images always use the
/// FLUX autoencoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreviewDecoder {
    /// The FLUX autoencoder: the judge screens what the final decode would show.
    #[default]
    Full,
    /// The tiny decoder (TAEF1): much cheaper, but the judge sees its blur and colour
    /// shifts, which may move screening verdicts. Needs [`FluxOptions::tiny_decoder`].
    Tiny,
}

impl FromStr for PreviewDecoder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(Self::Full),
            "tiny" => Ok(Self::Tiny),
            other => Err(format!("preview decoder {other:?}: expected full or tiny")),
        }
    }
}

/// How to run FLUX.
#[derive(Debug, Clone)]
pub struct FluxOptions {
    /// Where the weights are.
    pub paths: FluxPaths,
    /// The ICEdit LoRA (plain or MoE), if any.
    pub lora: Option<PathBuf>,
    /// LoRA strength (1 = as trained).
    pub lora_scale: f64,
    /// Compute dtype of the transformer, VAE and text encoders.
    pub dtype: DType,
    /// Where the transformer and the VAE run.
    pub device: Device,
    /// Where T5 and CLIP run (the prompt's states then move to `device`).
    pub text_device: Device,
    /// Distilled guidance (50 for ICEdit).
    pub guidance: f64,
    /// T5 sequence length (512 for FLUX.1 [dev]).
    pub t5_tokens: usize,
    /// Keep T5 and CLIP loaded between edits instead of dropping them after encoding.
    pub keep_text_encoders: bool,
    /// Candidates per transformer forward.
    pub max_batch: usize,
    /// The format the transformer's linear weights are held in; `None` holds them as the
    /// file stores them. [`WeightFormat::Quantized`] quantizes dense weights as they are
    /// read (a plain LoRA merged first); [`WeightFormat::Dense`] holds a GGUF or fp8 file
    /// dequantized to the model dtype (more memory, faster steps, the LoRA merged).
    pub hold_as: Option<WeightFormat>,
    /// Load the transformer only once the first prompt is encoded and T5 and CLIP are
    /// dropped, so that T5 and the transformer are never resident together on one device
    /// (the peak is the larger of the two, not their sum). Its files are still opened and
    /// checked at load.
    pub defer_transformer: bool,
    /// A tiny decoder (TAEF1): a diffusers folder, a safetensors file, or a Hub id in the
    /// Hugging Face cache (`madebyollin/taef1`). When given, live previews are decoded by it.
    pub tiny_decoder: Option<PathBuf>,
    /// Which decoder the judge's previews use ([`PreviewDecoder::Tiny`] needs
    /// `tiny_decoder`).
    pub preview_decoder: PreviewDecoder,
    /// What every loader does with tensors of its files the model never reads (and with
    /// LoRA keys that match no layer): refuse by default; `--allow-unused-weights` allows.
    pub unused_weights: UnusedWeights,
    /// Tile the VAE passes (encoding a diptych, decoding a candidate) whose image exceeds
    /// the tile on a side, as diffusers' `enable_tiling()` does; off, like FluxFillPipeline,
    /// by default. The memory plan turns it on (`--vae-tiling auto`) when the untiled
    /// passes would not fit.
    pub vae_tiling: bool,
    /// The tile side in pixels; `None`: the VAE config's `sample_size` (1024 for FLUX).
    pub vae_tile: Option<usize>,
}

impl FluxOptions {
    /// Defaults for a model folder: f32 on the CPU, guidance 50, 512 T5 tokens.
    pub fn new(paths: FluxPaths) -> Self {
        Self {
            paths,
            lora: None,
            lora_scale: 1.0,
            dtype: DType::F32,
            device: Device::Cpu,
            text_device: Device::Cpu,
            guidance: 50.0,
            t5_tokens: 512,
            keep_text_encoders: false,
            max_batch: 4,
            hold_as: None,
            defer_transformer: false,
            tiny_decoder: None,
            preview_decoder: PreviewDecoder::Full,
            unused_weights: UnusedWeights::Refuse,
            vae_tiling: false,
            vae_tile: None,
        }
    }
}

impl FluxOptions {
    /// The tiling of the VAE passes for this autoencoder, checked; `None` when off.
    fn vae_tiling_for(&self, vae: &VaeConfig) -> Result<Option<VaeTiling>, GenerateError> {
        if !self.vae_tiling {
            return Ok(None);
        }
        let tiling = self
            .vae_tile
            .map_or_else(|| VaeTiling::of_config(vae), VaeTiling::new);
        tiling.check(vae.downscale()).map_err(|e| {
            GenerateError::Config(format!(
                "{}: {e}",
                crate::models::flux::vae_tiling::tile_source(self.vae_tile)
            ))
        })?;
        tracing::info!(
            tile = tiling.tile,
            "VAE passes larger than the tile run tile by tile"
        );
        Ok(Some(tiling))
    }

    /// The ggml type dense weights are quantized to as they are read, if any.
    fn quantize_on_load(&self) -> Result<Option<GgmlDType>, GenerateError> {
        match self.hold_as {
            Some(WeightFormat::Quantized(t)) => Ok(Some(t)),
            // fp8 is not a ggml type: `Linears::fp8` holds it.
            Some(WeightFormat::Fp8) => Ok(None),
            Some(WeightFormat::Dense) | None => Ok(None),
        }
    }
}

/// The tiny decoder `options` ask for, checked against the autoencoder's latent channels
/// (a tiny decoder for another latent space would decode noise, not fail).
fn load_tiny_decoder(
    options: &FluxOptions,
    latent_channels: usize,
) -> Result<Option<TinyDecoder>, GenerateError> {
    let Some(path) = &options.tiny_decoder else {
        if options.preview_decoder == PreviewDecoder::Tiny {
            return Err(GenerateError::Config(
                "the tiny preview decoder needs a tiny decoder (TAEF1) to be given".into(),
            ));
        }
        return Ok(None);
    };
    let files = TinyDecoderFiles::discover(path)?;
    if files.config.latent_channels != latent_channels {
        return Err(GenerateError::Weights {
            path: files.config_path.unwrap_or(files.weights),
            reason: format!(
                "a tiny decoder for {} latent channels; the FLUX autoencoder has {latent_channels}",
                files.config.latent_channels
            ),
        });
    }
    let decoder = files.load(options.dtype, &options.device, options.unused_weights)?;
    tracing::info!(
        file = %files.weights.display(),
        previews = ?options.preview_decoder,
        "tiny decoder loaded for live previews"
    );
    Ok(Some(decoder))
}

/// The conditioning of one prepared edit.
struct PreparedFlux {
    text: TextConditioning,
    /// Masked-image latents ++ mask tokens, `[1, S, in_channels - 64]`.
    image_cond: Tensor,
    rope: (Tensor, Tensor),
    /// Latent grid (h, w) of the diptych.
    latent_hw: (usize, usize),
    /// The source panel (the left half of an image-to-image start's diptych).
    source: Arc<RgbImage>,
}

/// How many recent prompts keep their text states: a refine (or another arm of the same
/// item) prepares the same prompt again, and with the text encoders dropped after each
/// prompt, encoding it again would read T5 back from disk.
const PROMPT_STATES_KEPT: usize = 4;

/// FLUX.1 Fill as a [`Generator`].
pub struct FluxGenerator {
    options: FluxOptions,
    files: FluxFiles,
    /// `None` until loaded when [`FluxOptions::defer_transformer`] is set.
    transformer: Option<FluxTransformer>,
    vae: Autoencoder,
    /// How VAE passes larger than a tile are tiled; `None`: never.
    vae_tiling: Option<VaeTiling>,
    /// The tiny decoder for previews, if one was given.
    tiny: Option<TinyDecoder>,
    text: Option<TextEncoders>,
    lora_report: Option<LoraReport>,
    /// The LoRA read at load, until the transformer is built with it.
    lora: Option<Arc<LoraSet>>,
    edits: PreparedSet<PreparedFlux>,
    /// The text states of the most recent prompts, newest last.
    prompt_states: Vec<(String, TextConditioning)>,
    /// Set for a model built with random weights: its name, and no text encoders (each
    /// prompt's conditioning is random, seeded by the prompt).
    random: Option<String>,
    /// Steps replayed from a CUDA graph (`ICEDIT_CUDA_GRAPH=on`); the graph is dropped
    /// before any other model part runs (VAE, a new edit), which may need its memory.
    graphs: StepGraphs,
}

impl FluxGenerator {
    /// Finds and loads every model; the LoRA is merged (or its experts attached) now. With
    /// [`FluxOptions::defer_transformer`] the transformer's files are opened and checked
    /// now and its weights read after the first prompt is encoded.
    pub fn load(options: FluxOptions) -> Result<Self, GenerateError> {
        let files = FluxFiles::discover(&options.paths)?;
        // Read once here: a bad LoRA fails before any weight is loaded, deferred or not.
        let lora = match &options.lora {
            Some(path) => Some(Arc::new(LoraSet::load(
                &find_lora_file(path)?,
                options.lora_scale,
            )?)),
            None => None,
        };
        let vae = Autoencoder::load(
            &files.vae,
            files.vae_layout,
            &files.vae_config,
            options.dtype,
            &options.device,
            options.unused_weights,
        )?;
        let tiny = load_tiny_decoder(&options, files.vae_config.latent_channels)?;
        let vae_tiling = options.vae_tiling_for(&files.vae_config)?;
        if let Some(reason) = fill_mismatch(&files.transformer_config, &files.vae_config) {
            return Err(GenerateError::Weights {
                path: files.transformer[0].clone(),
                reason,
            });
        }
        let mut generator = Self {
            options,
            files,
            transformer: None,
            vae,
            vae_tiling,
            tiny,
            text: None,
            lora_report: None,
            lora,
            edits: PreparedSet::default(),
            prompt_states: Vec::new(),
            random: None,
            graphs: StepGraphs::from_env().map_err(GenerateError::Config)?,
        };
        if generator.options.defer_transformer {
            // Fail now, not after T5, on a file that cannot be opened (the LoRA was read above).
            WeightSource::open(
                &generator.files.transformer,
                generator.files.transformer_layout,
            )?;
            tracing::info!("the transformer loads after the first prompt is encoded (T5 and CLIP first, then dropped)");
        } else {
            generator.load_transformer()?;
        }
        Ok(generator)
    }

    /// FLUX.1 Fill with random weights at these configurations, for speed and memory runs
    /// without a download (random weights cost what trained ones cost). The transformer
    /// and VAE are built as the loader builds them (`--quantize` included: as in `bench
    /// flux`, each weight's first rows are quantized and repeated, which holds and times
    /// the same); T5 and CLIP are not run: each prompt's states are random, drawn on the
    /// CPU from a seed hashed from the prompt. The weights repeat from run to run (seeded
    /// by name on the CPU, by device seed elsewhere). `name` says which configuration it is.
    pub fn random(
        name: &str,
        transformer: FluxConfig,
        vae: VaeConfig,
        options: FluxOptions,
    ) -> Result<Self, GenerateError> {
        let (dtype, dev) = (options.dtype, &options.device);
        crate::models::bench::seed_device(dev)?;
        let random_vb =
            || VarBuilder::from_backend(Box::new(RandomWeights::default()), dtype, dev.clone());
        let quantize = options.quantize_on_load()?;
        let linears = Linears {
            quantize,
            fp8: options.hold_as == Some(WeightFormat::Fp8),
            sample_rows: quantize.map(|_| 64),
            ..Linears::default()
        };
        let model = FluxTransformer::new(random_vb(), &transformer, &linears)?;
        let autoencoder = Autoencoder::new(random_vb(), &vae)?;
        let tiny = load_tiny_decoder(&options, vae.latent_channels)?;
        let vae_tiling = options.vae_tiling_for(&vae)?;
        let none = EncoderFiles {
            config: PathBuf::new(),
            weights: Vec::new(),
            tokenizer_dir: PathBuf::new(),
        };
        tracing::info!(
            name,
            "FLUX.1 Fill with random weights (no text encoders: random prompt states)"
        );
        Ok(Self {
            options,
            files: FluxFiles {
                transformer: Vec::new(),
                transformer_layout: KeyLayout::Diffusers,
                transformer_config: transformer,
                vae: Vec::new(),
                vae_layout: KeyLayout::Diffusers,
                vae_config: vae,
                schedule_shift: DynamicShift::FLUX,
                clip: none.clone(),
                t5: none,
            },
            transformer: Some(model),
            vae: autoencoder,
            vae_tiling,
            tiny,
            text: None,
            lora_report: None,
            lora: None,
            edits: PreparedSet::default(),
            prompt_states: Vec::new(),
            random: Some(name.to_string()),
            graphs: StepGraphs::from_env().map_err(GenerateError::Config)?,
        })
    }

    /// Random prompt states `[1, t5_tokens, joint_dim]` and pooled `[1, pooled_dim]`, seeded
    /// by the prompt (a random-weights model has no text encoders).
    fn random_text(&self, prompt: &str) -> Result<(Tensor, Tensor), GenerateError> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        prompt.hash(&mut hasher);
        let seed = hasher.finish();
        let c = &self.files.transformer_config;
        let t5 = seeded_noise(
            seed,
            &[1, self.options.t5_tokens, c.joint_attention_dim],
            &Device::Cpu,
        )?;
        let pooled = seeded_noise(seed ^ 1, &[1, c.pooled_projection_dim], &Device::Cpu)?;
        Ok((t5, pooled))
    }

    /// Reads the transformer (and applies the LoRA) if it is not resident yet.
    fn load_transformer(&mut self) -> Result<(), GenerateError> {
        if self.transformer.is_some() {
            return Ok(());
        }
        // Kept until the build succeeds, so a retry after a failed load still has it.
        let lora = self.lora.clone();
        let (options, files) = (&self.options, &self.files);
        let (dtype, dev) = (options.dtype, &options.device);
        tracing::info!(files = ?files.transformer, layout = ?files.transformer_layout, "loading the FLUX transformer");
        let source = Arc::new(
            WeightSource::open(&files.transformer, files.transformer_layout)?
                .with_lora(lora.clone()),
        );
        let linears = Linears {
            lora: lora.as_deref(),
            source: (options.hold_as != Some(WeightFormat::Dense)).then_some(&*source),
            quantize: options.quantize_on_load()?,
            fp8: options.hold_as == Some(WeightFormat::Fp8),
            sample_rows: None,
        };
        let transformer = FluxTransformer::new(
            shared_var_builder(source.clone(), dtype, dev),
            &files.transformer_config,
            &linears,
        )
        .map_err(|e| weights_error(&files.transformer[0], e))?;
        source.check_unused(
            "the FLUX transformer",
            transformer::UNUSED_TENSORS,
            options.unused_weights,
        )?;
        let lora_report = match &lora {
            Some(l) => {
                let report = l.report(options.unused_weights)?;
                tracing::info!(
                    merged = report.merged,
                    side_branches = report.side_branches,
                    moe_layers = report.moe_layers,
                    "LoRA applied"
                );
                Some(report)
            }
            None => None,
        };
        let (bytes, _) = transformer.linear_weight_bytes();
        tracing::info!(
            linear_weights_gb = bytes as f64 / 1e9,
            text_encoders = self.text.is_some(),
            "resident: transformer and VAE{}",
            if self.text.is_some() {
                ", T5 and CLIP"
            } else {
                ""
            }
        );
        self.transformer = Some(transformer);
        self.lora_report = lora_report;
        self.lora = None;
        Ok(())
    }

    /// What the LoRA loading did.
    pub fn lora_report(&self) -> Option<&LoraReport> {
        self.lora_report.as_ref()
    }

    /// The transformer (for tests and benchmarks).
    ///
    /// # Panics
    /// If it was deferred and no edit has been prepared yet.
    pub fn transformer(&self) -> &FluxTransformer {
        self.transformer
            .as_ref()
            .expect("the transformer loads with the generator unless deferred to the first edit")
    }

    /// The autoencoder (for tests).
    pub fn vae(&self) -> &Autoencoder {
        &self.vae
    }

    /// T5 and CLIP, loaded on first use.
    pub fn text_encoders(&mut self) -> Result<&mut TextEncoders, GenerateError> {
        if self.text.is_none() {
            let dev = &self.options.text_device;
            // Candle's CPU kernels want f32; a GPU keeps the model dtype.
            let dtype = if dev.is_cpu() {
                DType::F32
            } else {
                self.options.dtype
            };
            tracing::info!(
                device = ?dev.location(),
                ?dtype,
                "loading the T5 and CLIP text encoders (resident with the VAE{} until dropped)",
                if self.transformer.is_some() { " and the transformer" } else { "" }
            );
            self.text = Some(TextEncoders::load(
                &self.files.clip,
                &self.files.t5,
                dtype,
                dev,
                self.options.unused_weights,
            )?);
        }
        Ok(self.text.as_mut().expect("just loaded"))
    }

    /// Decodes packed latents `[S, 64]` to the whole diptych as floats in [0, 1], `[H, 2W, 3]`.
    pub fn decode_unit(
        &self,
        edit: &PreparedEdit,
        latents: &Tensor,
    ) -> Result<Tensor, GenerateError> {
        let p = self.edits.get(edit)?;
        let (h, w) = p.latent_hw;
        let z = latents::unpack(&latents.unsqueeze(0)?.to_dtype(self.options.dtype)?, h, w)?;
        let image = self
            .vae
            .decode_with(&self.vae.denormalize(&z)?, self.vae_tiling.as_ref())?;
        Ok(latents::tensor_to_unit(&image)?)
    }

    /// The tiny decoder, if one was loaded (for tests).
    pub fn tiny_decoder(&self) -> Option<&TinyDecoder> {
        self.tiny.as_ref()
    }

    /// The decoder a decode for `purpose` goes through: the tiny one for live previews when
    /// loaded, and for the judge's previews when [`PreviewDecoder::Tiny`] asks; else the
    /// FLUX autoencoder (always for final images).
    fn tiny_for(&self, purpose: DecodePurpose) -> Option<&TinyDecoder> {
        match purpose {
            DecodePurpose::Live => self.tiny.as_ref(),
            DecodePurpose::Preview if self.options.preview_decoder == PreviewDecoder::Tiny => {
                self.tiny.as_ref()
            }
            DecodePurpose::Preview | DecodePurpose::Final => None,
        }
    }

    /// [`Self::decode_unit`] through the decoder `purpose` selects. The tiny decoder takes
    /// the transformer's latents as they are (it applies its own factors, 1 and 0 for
    /// TAEF1), where the autoencoder takes them denormalized.
    pub fn decode_unit_for(
        &self,
        edit: &PreparedEdit,
        latents: &Tensor,
        purpose: DecodePurpose,
    ) -> Result<Tensor, GenerateError> {
        let Some(tiny) = self.tiny_for(purpose) else {
            return self.decode_unit(edit, latents);
        };
        let p = self.edits.get(edit)?;
        let (h, w) = p.latent_hw;
        let z = latents::unpack(&latents.unsqueeze(0)?.to_dtype(self.options.dtype)?, h, w)?;
        // The whole diptych, then cropped like the autoencoder's: decoding the right half
        // alone would be twice as cheap, but TAEF1's receptive field reaches about 18 latent
        // cells (its 3x3 convs at each scale), so a band of the panel's left edge ~145 px
        // wide would differ from a decode of the whole.
        let image = tiny.decode_model_latents(&z)?;
        Ok(latents::tensor_to_unit(&image)?)
    }

    /// Reads initial latents from a safetensors file (key `latents`, or its only tensor),
    /// unpacked `[1, 16, h, w]` / `[16, h, w]` or packed `[1, S, 64]` / `[S, 64]`.
    pub fn read_init_latents(
        &self,
        path: &Path,
        edit: &PreparedEdit,
    ) -> Result<Tensor, GenerateError> {
        let p = self.edits.get(edit)?;
        let err = |reason: String| GenerateError::Weights {
            path: path.to_path_buf(),
            reason,
        };
        let mut all =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| err(e.to_string()))?;
        let t = match all.remove("latents") {
            Some(t) => t,
            None if all.len() == 1 => all.into_values().next().expect("one tensor"),
            None => return Err(err("no `latents` tensor".into())),
        };
        let t = t.to_dtype(DType::F32)?;
        let (h, w) = p.latent_hw;
        let packed = match t.rank() {
            4 | 3 if t.dims()[t.rank() - 2..] == [h, w] => {
                let t = if t.rank() == 3 { t.unsqueeze(0)? } else { t };
                latents::pack(&t)?.squeeze(0)?
            }
            3 => t.squeeze(0)?,
            _ => t,
        };
        if packed.dims() != edit.latent_shape.as_slice() {
            return Err(err(format!(
                "latents of shape {:?} do not fit this edit (packed {:?} or unpacked [16, {h}, {w}])",
                packed.dims(),
                edit.latent_shape
            )));
        }
        Ok(packed)
    }
}

impl Generator for FluxGenerator {
    fn info(&self) -> GeneratorInfo {
        let lora = match &self.lora_report {
            Some(r) => format!(
                ", LoRA {} ({} merged, {} side branches, {} MoE layers)",
                r.path.display(),
                r.merged,
                r.side_branches,
                r.moe_layers
            ),
            None => match (&self.options.lora, &self.transformer) {
                (Some(path), None) => match find_lora_file(path) {
                    Ok(file) => format!(
                        ", LoRA {} (applied as the transformer loads)",
                        file.display()
                    ),
                    Err(_) => format!(", LoRA {}", path.display()),
                },
                _ => String::new(),
            },
        };
        let held = match &self.transformer {
            Some(t) => {
                let (bytes, _) = t.linear_weight_bytes();
                let formats: Vec<String> = t
                    .linear_formats()
                    .iter()
                    .map(|(format, n)| format!("{n} {format}"))
                    .collect();
                format!(
                    "linear layers {}, {:.2} GB of linear weights",
                    formats.join(" + "),
                    bytes as f64 / 1e9
                )
            }
            None => "loads after the first prompt is encoded".into(),
        };
        let source = match (&self.random, self.files.transformer.first()) {
            (Some(name), _) => format!("random weights, {name} configuration"),
            (None, Some(file)) => {
                format!("{} ({:?})", file.display(), self.files.transformer_layout)
            }
            (None, None) => "no files".into(),
        };
        let tiny = match (&self.tiny, self.options.preview_decoder) {
            (None, _) => "",
            (Some(_), PreviewDecoder::Full) => ", tiny decoder for live previews",
            (Some(_), PreviewDecoder::Tiny) => ", tiny decoder for live and judged previews",
        };
        let tiled = match &self.vae_tiling {
            Some(t) => format!(", VAE passes above {} px tiled", t.tile),
            None => String::new(),
        };
        let formats = self.transformer.as_ref().map(|t| t.linear_formats());
        GeneratorInfo {
            settings: serde_json::json!({
                "guidance": self.options.guidance,
                "lora_scale": self.options.lora.as_ref().map(|_| self.options.lora_scale),
                "t5_tokens": self.options.t5_tokens,
                "dtype": self.options.dtype.as_str(),
                "linear_formats": formats,
                "vae_tile": self.vae_tiling.as_ref().map(|t| t.tile),
                "preview_decoder": match self.options.preview_decoder {
                    PreviewDecoder::Full => "full",
                    PreviewDecoder::Tiny => "tiny",
                },
            }),
            name: "flux-fill".into(),
            detail: format!(
                "{source} ({held}), {} on {}{lora}{tiny}{tiled}",
                self.options.dtype.as_str(),
                crate::device::DeviceName::of(&self.options.device)
            ),
            max_batch: self.options.max_batch,
        }
    }

    fn device(&self) -> Device {
        self.options.device.clone()
    }

    fn prepare(&mut self, edit: &EditContext) -> Result<PreparedEdit, GenerateError> {
        self.graphs.release();
        let (w, h) = edit.panel_size();
        let f = self.files.vae_config.downscale();
        if w % (2 * f) as u32 != 0 || h % (2 * f) as u32 != 0 {
            return Err(GenerateError::Input(format!(
                "panel {w}x{h}: both sides must be multiples of {}",
                2 * f
            )));
        }
        let (dtype, dev) = (self.options.dtype, self.options.device.clone());
        let t5_tokens = self.options.t5_tokens;
        let prompt = edit.prompt();
        let known = self.prompt_states.iter().position(|(p, _)| *p == prompt);
        let text = match known {
            Some(i) => self.prompt_states.remove(i).1,
            None => {
                let (t5, pooled) = match self.random {
                    Some(_) => self.random_text(&prompt)?,
                    None => self.text_encoders()?.encode(&prompt, t5_tokens)?,
                };
                TextConditioning {
                    t5: t5.to_device(&dev)?.to_dtype(dtype)?,
                    pooled: pooled.to_device(&dev)?.to_dtype(dtype)?,
                }
            }
        };
        self.prompt_states.push((prompt, text.clone()));
        if self.prompt_states.len() > PROMPT_STATES_KEPT {
            self.prompt_states.remove(0);
        }
        let TextConditioning { t5, pooled } = text;
        if !self.options.keep_text_encoders && self.text.is_some() {
            self.text = None; // frees T5 (~9.5 GB in bf16) before the denoising loop
            tracing::info!("dropped the T5 and CLIP text encoders");
        }
        self.load_transformer()?;

        let diptych = make_diptych(&edit.source);
        let image = latents::image_to_tensor(&diptych.image, &dev)?;
        let keep: Vec<f32> = diptych
            .mask
            .pixels()
            .map(|p| if p.0[0] >= 128 { 0.0 } else { 1.0 })
            .collect();
        let keep = Tensor::from_vec(keep, (1, 1, h as usize, 2 * w as usize), &dev)?;
        let masked = image.broadcast_mul(&keep)?.to_dtype(dtype)?;
        let z = self.vae.normalize(
            &self
                .vae
                .encode_mean_with(&masked, self.vae_tiling.as_ref())?,
        )?;
        let (lh, lw) = (z.dim(2)?, z.dim(3)?);
        let masked_tokens = latents::pack(&z)?;
        let mask_tokens = latents::pack_mask(&diptych.mask, f, &dev)?.to_dtype(dtype)?;
        let image_cond = Tensor::cat(&[masked_tokens, mask_tokens], D::Minus1)?;
        let tokens = image_cond.dim(1)?;
        let ids = latents::joint_ids(t5.dim(1)?, lh / 2, lw / 2);
        let rope = embeddings::rope_tables(
            &ids,
            &self.files.transformer_config.axes_dims_rope,
            ROPE_THETA,
            &dev,
        )?;

        let key = self.edits.insert(PreparedFlux {
            text: TextConditioning { t5, pooled },
            image_cond,
            rope,
            latent_hw: (lh, lw),
            source: edit.source.clone(),
        });
        Ok(PreparedEdit {
            key,
            image_tokens: tokens,
            latent_shape: vec![tokens, 4 * self.files.vae_config.latent_channels],
            mu: self.files.schedule_shift.mu(tokens),
        })
    }

    fn velocity(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
    ) -> Result<Tensor, GenerateError> {
        let mut off = vec![CandidateCache::default(); latents.dim(0)?];
        Ok(self.velocity_cached(edit, latents, sigma, &mut off)?.0)
    }

    fn velocity_cached(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        sigma: f64,
        caches: &mut [CandidateCache],
    ) -> Result<(Tensor, Vec<RowWork>), GenerateError> {
        let p = self.edits.get(edit)?;
        let b = latents.dim(0)?;
        let img = Tensor::cat(
            &[
                latents.to_dtype(self.options.dtype)?,
                p.image_cond.repeat((b, 1, 1))?,
            ],
            D::Minus1,
        )?;
        let transformer = self
            .transformer
            .as_ref()
            .ok_or_else(|| GenerateError::Config("velocity before any edit was prepared".into()))?;
        let (v, work) = self
            .graphs
            .forward_cached(
                transformer,
                &StepInputs {
                    img: &img,
                    text: &p.text,
                    sigma,
                    guidance: self.options.guidance,
                    rope: &p.rope,
                },
                caches,
            )
            .and_then(|(v, work)| Ok((v.to_dtype(DType::F32)?, work)))
            .map_err(GenerateError::from_forward)?;
        Ok((v, work))
    }

    fn decode(
        &mut self,
        edit: &PreparedEdit,
        latents: &Tensor,
        purpose: DecodePurpose,
    ) -> Result<RgbImage, GenerateError> {
        self.graphs.release();
        let unit = self.decode_unit_for(edit, latents, purpose)?;
        Ok(crop_right_panel(&latents::unit_to_image(&unit)?))
    }

    fn encode_start(
        &mut self,
        edit: &PreparedEdit,
        init: &RgbImage,
    ) -> Result<Tensor, GenerateError> {
        self.graphs.release();
        let p = self.edits.get(edit)?;
        if init.dimensions() != p.source.dimensions() {
            return Err(GenerateError::Input(format!(
                "start image {:?}: this edit's panel is {:?}",
                init.dimensions(),
                p.source.dimensions()
            )));
        }
        let (dtype, dev) = (self.options.dtype, self.options.device.clone());
        // The whole diptych, unmasked: diffusers' FluxFillPipeline encodes `image` itself as
        // the start (its masked copy is the conditioning, already in `image_cond`).
        let mut diptych = make_diptych(&p.source).image;
        image::imageops::replace(&mut diptych, init, p.source.width() as i64, 0);
        let image = latents::image_to_tensor(&diptych, &dev)?.to_dtype(dtype)?;
        let z = self.vae.normalize(
            &self
                .vae
                .encode_mean_with(&image, self.vae_tiling.as_ref())?,
        )?;
        Ok(latents::pack(&z)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    fn relative_step_cost(&self, image_tokens: usize, base_tokens: usize) -> f64 {
        let c = &self.files.transformer_config;
        let flops = |tokens| ForwardFlops::new(c, tokens, self.options.t5_tokens).full() as f64;
        flops(image_tokens) / flops(base_tokens.max(1))
    }

    fn release(&mut self, edit: &PreparedEdit) {
        self.graphs.release();
        self.edits.remove(edit);
    }

    fn limit_batch(&mut self, max_batch: usize) {
        self.options.max_batch = max_batch.max(1);
    }
}
