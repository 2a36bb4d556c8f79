//! The generator a command runs with, chosen once: the generator flags are read into a
//! [`GeneratorSpec`] at the command boundary (devices and dtypes parsed, not opened) and
//! passed down by value. What `--download` fetches ([`GeneratorSpec::downloads`]), what the
//! memory plan counts ([`FluxSpec::plan_request`]) and what gets built
//! ([`GeneratorSpec::build`]) are methods of that one value.

use std::path::PathBuf;

use candle_core::DType;

use crate::cli::{GeneratorArgs, GeneratorKind};
use crate::device::{parse_dtype_on, DeviceName};
use crate::engine::StrategyConfig;
use crate::error::EditError;
use crate::generate::flux::{FluxGenerator, FluxOptions, PreviewDecoder};
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::generate::{Generator, StepCache};
use crate::hub::{self, HubSettings, RepoRequest};
use crate::models::flux::files::FILL_DEV_REPO;
use crate::models::flux::held_weight::WeightFormat;
use crate::models::flux::lora::ICEDIT_LORA_REPO;
use crate::models::flux::vae::VaeConfig;
use crate::models::flux::vae_tiling::VaeTiling;
use crate::models::flux::{FluxConfig, FluxPaths};
use crate::models::testbed::TestbedEdits;
use crate::models::weight_use::UnusedWeights;
use crate::plan::{self, JudgeFootprint, Placement, PlanRequest};

use super::download::{flux_fill_request, lora_request, released_lora};

/// A generator as chosen.
#[derive(Debug, Clone)]
pub enum GeneratorSpec {
    /// The built-in simulator.
    Testbed(TestbedConfig),
    /// FLUX.1 Fill [dev] + the ICEdit LoRA.
    Flux(Box<FluxSpec>),
}

/// FLUX as chosen: where its files are, how to hold and run them.
#[derive(Debug, Clone)]
pub struct FluxSpec {
    /// The files as named; all empty when FLUX.1 Fill comes from the Hugging Face cache
    /// (`fetch_fill`).
    pub paths: FluxPaths,
    /// No files were named: FLUX.1 Fill [dev] from the cache (fetched with `--download`).
    pub fetch_fill: bool,
    /// `--random-weights`: random weights at this configuration (`full`, `small`) instead
    /// of any file.
    pub random_size: Option<String>,
    /// The ICEdit LoRA, if any.
    pub lora: Option<LoraChoice>,
    /// LoRA strength (1 = as trained).
    pub lora_scale: f64,
    /// Where the transformer and VAE run.
    pub device: DeviceName,
    /// Where T5 and CLIP run.
    pub text_device: DeviceName,
    /// Compute dtype.
    pub dtype: DType,
    /// The format linear weights are held in; `None` = as the file stores them.
    pub hold_as: Option<WeightFormat>,
    /// Distilled guidance.
    pub guidance: f64,
    /// T5 tokens.
    pub t5_tokens: usize,
    /// Keep T5 and CLIP loaded between edits.
    pub keep_text_encoders: bool,
    /// Candidates per forward.
    pub max_batch: usize,
    /// TAEF1, if named.
    pub tiny_decoder: Option<PathBuf>,
    /// Which decoder the screened previews go through.
    pub preview_decoder: PreviewDecoder,
    /// `--memory-budget` in GB, else the device's free memory is read.
    pub memory_budget: Option<f64>,
    /// `--host-memory-budget` in GB, else the host's available memory is read: what T5 and
    /// CLIP on the CPU beside a GPU generator are checked against.
    pub host_memory_budget: Option<f64>,
    /// Tensors no model part reads: refused, or loaded and logged
    /// (`--allow-unused-weights`).
    pub unused_weights: UnusedWeights,
    /// `--vae-tiling`: whether VAE passes larger than a tile are tiled. The plan check
    /// ([`FluxSpec::check_plan`]) settles `auto` as on or off.
    pub vae_tiling: VaeTilingMode,
    /// `--vae-tile`: the tile side in pixels (default: the VAE config's `sample_size`).
    pub vae_tile: Option<usize>,
}

/// Whether the VAE passes (encoding the diptych, decoding a candidate, the refine's) are
/// tiled when their image exceeds the tile (diffusers' `enable_tiling()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTilingMode {
    /// Tiled when the memory plan says the untiled passes would not fit and the tiled ones
    /// change that; untiled (exactly FluxFillPipeline's passes) otherwise.
    #[default]
    Auto,
    /// Always tiled when larger than the tile.
    On,
    /// Never tiled.
    Off,
}

impl std::str::FromStr for VaeTilingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?}: expected auto, on or off")),
        }
    }
}

/// Where the ICEdit LoRA comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraChoice {
    /// A file or folder as named (the loader names it when it is not there).
    Path(PathBuf),
    /// A released LoRA by its Hub repository, found in (or fetched into) the cache.
    Released(&'static str),
}

/// What a command will run, as far as the memory plan needs it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Source panel `(width, height)` after resizing.
    pub panel: (usize, usize),
    /// More than one edit: later prompts are encoded while the judge is resident.
    pub many_edits: bool,
    /// `--refine WIDTH`: the widest refine of the strategies the command runs.
    pub refine: Option<u32>,
    /// The step cache of each strategy the command runs that has one, with the most
    /// candidates holding one at once; the plan counts the largest.
    pub step_caches: Vec<(StepCache, usize)>,
    /// The most candidates the strategies advance together (one forward takes at most
    /// `--batch-size` of them), the plan's forward batch; `None` where requests choose their
    /// own strategy (a batch's manifest lines, a server's requests): `--batch-size` itself.
    pub candidates_together: Option<usize>,
    /// The flag that sets `refine`, named in the plan's advice (`--refine`, or serve's
    /// `--max-refine`).
    pub refine_flag: &'static str,
}

impl Workload {
    /// The workload of running `strategies` (a command's one strategy, or a suite's arms) on
    /// `panel`: the widest refine they ask for and the step caches they hold.
    pub fn new<'a>(
        panel: (usize, usize),
        many_edits: bool,
        strategies: impl IntoIterator<Item = &'a StrategyConfig>,
    ) -> Self {
        let strategies: Vec<_> = strategies.into_iter().collect();
        Self {
            panel,
            many_edits,
            refine: strategies.iter().filter_map(|s| s.refine).max(),
            step_caches: strategies
                .iter()
                .filter(|s| s.cache.is_on())
                .map(|s| (s.cache, s.cached_candidates()))
                .collect(),
            candidates_together: strategies.iter().map(|s| s.candidates_together()).max(),
            refine_flag: "--refine",
        }
    }

    /// This workload with strategies the plan cannot know in advance (a manifest line's or
    /// a request's own seeds): its forwards are planned at `--batch-size`.
    pub fn with_any_candidates(self) -> Self {
        Self {
            candidates_together: None,
            ..self
        }
    }

    /// The workload with a refine of `width` set by `flag` (serve's `--max-refine`): the
    /// plan covers it and its advice names that flag.
    pub fn with_refine_by(self, width: u32, flag: &'static str) -> Self {
        Self {
            refine: Some(width),
            refine_flag: flag,
            ..self
        }
    }
}

/// How a run names FLUX weights, for the refusals of FLUX inputs given without them (the
/// run would be the testbed simulator).
pub const NAME_THE_WEIGHTS: &str = "name the weights (--model-dir DIR, --transformer FILE \
     with --vae and --text-encoders, --random-weights small|full, or --download)";

impl GeneratorSpec {
    /// What makes this generator's edits what they are, for a resumable run's
    /// `settings.json`: results made by another generator (other weights, LoRA, format,
    /// dtype; another testbed difficulty or contrast) are never reused under this one.
    /// Paths are compared as they resolve. The device is left out: moving a run to another
    /// device is not a change of settings.
    pub fn identity(&self) -> serde_json::Value {
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        };
        match self {
            Self::Testbed(c) => serde_json::json!({
                "testbed": { "difficulty": c.difficulty, "contrast": c.contrast },
            }),
            Self::Flux(f) => {
                let lora = f.lora.as_ref().map(|l| match l {
                    LoraChoice::Path(p) => path(&Some(p.clone()))
                        .expect("a path")
                        .display()
                        .to_string(),
                    LoraChoice::Released(repo) => (*repo).to_string(),
                });
                serde_json::json!({
                    "flux": {
                        "model_dir": path(&f.paths.model_dir),
                        "transformer": path(&f.paths.transformer),
                        "vae": path(&f.paths.vae),
                        "text_encoders": path(&f.paths.text_encoders),
                        "t5": path(&f.paths.t5),
                        "hub_fill": f.fetch_fill,
                        "random_weights": f.random_size,
                        "lora": lora,
                        "lora_scale": f.lora_scale,
                        "dtype": format!("{:?}", f.dtype),
                        "held_as": f.hold_as.map(|h| format!("{h:?}")),
                        "guidance": f.guidance,
                        "t5_tokens": f.t5_tokens,
                    }
                })
            }
        }
    }

    /// The generator the flags choose: `auto` is FLUX when weights are named (or are to be
    /// downloaded), else the testbed. Flags are checked here, before anything loads.
    pub fn from_args(args: &GeneratorArgs, download: bool) -> Result<Self, EditError> {
        let flux_files =
            args.model_dir.is_some() || args.transformer.is_some() || args.random_weights.is_some();
        let kind = match (args.generator, flux_files || download) {
            (GeneratorKind::Auto, true) => GeneratorKind::Flux,
            (GeneratorKind::Auto, false) => GeneratorKind::Testbed,
            (kind, _) => kind,
        };
        if kind == GeneratorKind::Testbed {
            let flux_only = args.flux_flags_given();
            if !flux_only.is_empty() {
                let flags = flux_only.join(", ");
                return Err(EditError::Invalid(match args.generator {
                    GeneratorKind::Testbed => format!(
                        "--generator testbed runs the built-in simulator, which takes no {flags}; drop {}",
                        if flux_only.len() == 1 { "it" } else { "them" }
                    ),
                    _ => format!(
                        "{flags} set{} up FLUX, and no FLUX weights are named, so this run would be \
                         the built-in testbed simulator: {NAME_THE_WEIGHTS}, or drop {flags}",
                        if flux_only.len() == 1 { "s" } else { "" }
                    ),
                }));
            }
            return Ok(Self::Testbed(TestbedConfig {
                difficulty: args.testbed_difficulty(),
                contrast: args.testbed_contrast(),
                max_batch: args.batch_size.max(1),
            }));
        }
        if let Some(flag) = args.testbed_flags_given().first() {
            return Err(EditError::Invalid(format!(
                "{flag} sets up the testbed generator, and this run is FLUX (weights named by \
                 --model-dir, --transformer, --random-weights or --download); drop {flag}"
            )));
        }
        let invalid = |flag: &str, e: String| EditError::Invalid(format!("{flag} {e}"));
        let device = DeviceName::parse(&args.device).map_err(|e| invalid("--device", e))?;
        let dtype = parse_dtype_on(args.dtype.as_deref(), device.is_gpu())
            .map_err(|e| invalid("--dtype", e))?;
        if dtype == DType::BF16 && !device.is_gpu() {
            // candle's CPU matmul has no bf16 kernel: the VAE's convolutions would fail at
            // the first edit, after the text encoders ran.
            return Err(invalid(
                "--dtype",
                "bf16: the CPU cannot run FLUX's VAE in bf16 (candle's CPU matmul has no bf16); use f32 (the CPU default) or f16, or bf16 on a GPU".into(),
            ));
        }
        let text_device = match &args.text_device {
            Some(name) => DeviceName::parse(name).map_err(|e| invalid("--text-device", e))?,
            None => device,
        };
        let preview_decoder = args
            .preview_decoder
            .parse()
            .map_err(|e: String| invalid("--preview-decoder:", e))?;
        if let Some(size) = &args.random_weights {
            // Random weights run no text encoders (random prompt states) and read no file:
            // these flags would be dropped unread.
            let unread = crate::cli::flags_given([
                ("--lora", args.lora.is_some()),
                ("--t5", args.t5.is_some()),
                ("--vae", args.vae.is_some()),
                ("--text-encoders", args.text_encoders.is_some()),
                ("--text-device", args.text_device.is_some()),
                ("--keep-text-encoders", args.keep_text_encoders),
            ]);
            if !unread.is_empty() {
                return Err(EditError::Invalid(format!(
                    "--random-weights {size} builds its own weights and random prompt states, \
                     so it reads no files and runs no text encoders: drop {}",
                    unread.join(", ")
                )));
            }
        }
        let lora = match &args.lora {
            Some(path) if path.exists() => Some(LoraChoice::Path(path.clone())),
            Some(name) => Some(match name.to_str().and_then(released_lora) {
                Some(repo) => LoraChoice::Released(repo),
                None => LoraChoice::Path(name.clone()),
            }),
            None if download && args.random_weights.is_none() => {
                tracing::info!(
                    "--download without --lora: using the ICEdit LoRA ({ICEDIT_LORA_REPO})"
                );
                Some(LoraChoice::Released(ICEDIT_LORA_REPO))
            }
            None => None,
        };
        let vae_tiling: VaeTilingMode = args
            .vae_tiling
            .parse()
            .map_err(|e: String| invalid("--vae-tiling", e))?;
        if let (VaeTilingMode::Off, Some(tile)) = (vae_tiling, args.vae_tile) {
            return Err(EditError::Invalid(format!(
                "--vae-tile {tile} sizes the tiles of a tiled VAE pass, and --vae-tiling off \
                 tiles none; drop one of them"
            )));
        }
        let hold_as = match (args.quantize, args.dequantize) {
            (Some(format), _) => Some(format),
            (None, true) => Some(WeightFormat::Dense),
            (None, false) => None,
        };
        Ok(Self::Flux(Box::new(FluxSpec {
            paths: FluxPaths {
                model_dir: args.model_dir.clone(),
                transformer: args.transformer.clone(),
                vae: args.vae.clone(),
                text_encoders: args.text_encoders.clone(),
                t5: args.t5.clone(),
            },
            fetch_fill: download && !flux_files,
            random_size: args.random_weights.clone(),
            lora,
            lora_scale: args.lora_scale,
            device,
            text_device,
            dtype,
            hold_as,
            guidance: args.guidance,
            t5_tokens: args.t5_tokens,
            keep_text_encoders: args.keep_text_encoders,
            max_batch: args.batch_size.max(1),
            tiny_decoder: args.tiny_decoder.clone(),
            preview_decoder,
            memory_budget: args.memory_budget,
            host_memory_budget: args.host_memory_budget,
            unused_weights: UnusedWeights::Refuse,
            vae_tiling,
            vae_tile: args.vae_tile,
        })))
    }

    /// Loads weight files holding tensors no model part reads (`--allow-unused-weights`),
    /// logging each, instead of refusing them.
    pub fn allow_unused_weights(&mut self) {
        if let Self::Flux(f) = self {
            f.unused_weights = UnusedWeights::Allow;
        }
    }

    /// The FLUX part, if it is FLUX.
    pub fn flux(&self) -> Option<&FluxSpec> {
        match self {
            Self::Flux(f) => Some(f),
            Self::Testbed(_) => None,
        }
    }

    /// The FLUX part, if it is FLUX, to change (the plan check settles its VAE tiling).
    pub fn flux_mut(&mut self) -> Option<&mut FluxSpec> {
        match self {
            Self::Flux(f) => Some(f),
            Self::Testbed(_) => None,
        }
    }

    /// The same generator on another device (`serve --devices`); the testbed runs on the
    /// CPU only.
    pub fn on_device(&self, name: &str) -> Result<Self, EditError> {
        let device =
            DeviceName::parse(name).map_err(|e| EditError::Invalid(format!("--devices {e}")))?;
        match self {
            Self::Testbed(_) if device.is_gpu() => Err(EditError::Invalid(format!(
                "--devices {name}: the testbed generator runs on the CPU; give cpu entries"
            ))),
            Self::Testbed(_) => Ok(self.clone()),
            Self::Flux(f) => {
                let mut f = f.clone();
                if f.text_device == f.device {
                    f.text_device = device;
                }
                f.device = device;
                Ok(Self::Flux(f))
            }
        }
    }

    /// What the generator needs from the Hugging Face Hub: FLUX.1 Fill when no files are
    /// named (and `--download` asked for it), a released LoRA named by its release name.
    pub fn downloads(&self) -> Vec<RepoRequest> {
        let Self::Flux(f) = self else {
            return Vec::new();
        };
        let mut requests = Vec::new();
        if f.fetch_fill {
            requests.push(flux_fill_request());
        }
        if let Some(LoraChoice::Released(repo)) = &f.lora {
            requests.push(lora_request(repo));
        }
        requests
    }

    /// Builds the generator (its device opened, its weights read). A testbed generator
    /// records its edits in `testbed` (for the testbed judges that may score them).
    pub fn build(&self, testbed: Option<TestbedEdits>) -> anyhow::Result<Box<dyn Generator>> {
        match self {
            Self::Testbed(config) => {
                tracing::info!("generator: built-in testbed (a simulator, not an image editor)");
                Ok(Box::new(TestbedGenerator::with_edits(
                    *config,
                    testbed.unwrap_or_default(),
                )))
            }
            Self::Flux(f) => Ok(Box::new(f.build()?)),
        }
    }
}

impl FluxSpec {
    /// The memory plan of this FLUX run, from configs and file headers only (no weight is
    /// read), and whether the transformer's files were found (when they were not, the plan
    /// is of FLUX.1 Fill [dev]'s published configuration).
    pub fn plan_request(
        &self,
        judge: Option<JudgeFootprint>,
        workload: &Workload,
    ) -> Result<(PlanRequest, bool), EditError> {
        let peeked = self.peek()?;
        let stored =
            plan::peek::transformer_format(&peeked.transformer).map_err(EditError::Invalid)?;
        // Weights already quantized (GGUF) or fp8 are held as the file holds them: a
        // --quantize to another format would not happen, and the plan would count it.
        if let Some(asked @ (WeightFormat::Quantized(_) | WeightFormat::Fp8)) = self.hold_as {
            if stored != WeightFormat::Dense && stored != asked {
                return Err(EditError::Invalid(format!(
                    "--quantize {}: the transformer ({}) already holds {} weights, which are not requantized; --quantize applies to dense (bf16/f16/f32) weights: drop it, or give a dense transformer",
                    asked.name(),
                    peeked
                        .transformer
                        .first()
                        .map_or_else(String::new, |p| p.display().to_string()),
                    stored.name()
                )));
            }
        }
        if self.hold_as == Some(WeightFormat::Dense) && stored == WeightFormat::Dense {
            let transformer = match (peeked.transformer.first(), &self.random_size) {
                (Some(path), _) => format!("the transformer ({})", path.display()),
                (None, Some(size)) => format!("--random-weights {size}"),
                (None, None) => "FLUX.1 Fill [dev] as published".into(),
            };
            return Err(EditError::Invalid(format!(
                "--dequantize: {transformer} holds dense weights already; --dequantize applies \
                 to a GGUF or fp8 transformer: drop it"
            )));
        }
        let placement = |other: DeviceName| {
            if other == self.device {
                Placement::Device
            } else {
                Placement::Elsewhere
            }
        };
        let lora_bytes = match &self.lora {
            Some(LoraChoice::Path(p)) => lora_file_bytes(p),
            Some(LoraChoice::Released(repo)) => {
                lora_file_bytes(&hub::cache_entry(&HubSettings::from_env(), repo))
            }
            None => 0,
        };
        let found = !peeked.transformer.is_empty() || self.random_size.is_some();
        let (transformer, vae) = self.configs(&peeked);
        // A tile that cannot be used is refused now, before anything loads.
        if self.vae_tiling != VaeTilingMode::Off {
            self.tiling_of(&vae).check(vae.downscale()).map_err(|e| {
                EditError::Invalid(format!(
                    "{}: {e}",
                    crate::models::flux::vae_tiling::tile_source(self.vae_tile)
                ))
            })?;
        }
        let vae_tiling = (self.vae_tiling == VaeTilingMode::On).then(|| self.tiling_of(&vae));
        let request = PlanRequest {
            transformer,
            vae,
            vae_tiling,
            format: self.hold_as.unwrap_or(stored),
            dtype: self.dtype,
            cuda: matches!(self.device, DeviceName::Cuda(_)),
            // A forward batches at most `--batch-size` of the candidates run together.
            batch: workload
                .candidates_together
                .map_or(self.max_batch, |n| n.clamp(1, self.max_batch)),
            panel: workload.panel,
            t5_tokens: self.t5_tokens,
            // A random-weights model runs no text encoders.
            text_parameters: match &self.random_size {
                Some(_) => 0,
                None => peeked
                    .text_parameters
                    .unwrap_or(plan::T5_XXL_PARAMETERS + plan::CLIP_L_PARAMETERS),
            },
            text_placement: placement(self.text_device),
            text_on_host: self.text_device == DeviceName::Cpu && self.device != DeviceName::Cpu,
            host_available: self.host_memory().map(|(bytes, _)| bytes),
            t5_file_bytes: self
                .paths
                .t5
                .as_deref()
                .filter(|f| plan::peek::is_gguf(f))
                .and_then(|f| std::fs::metadata(f).ok())
                .map(|m| m.len() as usize),
            lora_bytes,
            judge,
            text_with_judge: workload.many_edits || self.keep_text_encoders,
            transformer_after_prompt: self.text_device == self.device && !self.keep_text_encoders,
            text_kept: self.keep_text_encoders,
            requantizable: stored == WeightFormat::Dense,
            refine_flag: workload.refine_flag,
            refine_panel: workload.refine.and_then(|width| {
                let panel = (workload.panel.0 as u32, workload.panel.1 as u32);
                crate::edit::refine::refine_size(panel, width)
                    .ok()
                    .map(|(w, h)| (w as usize, h as usize))
            }),
            step_cache: StepCache::None,
            cached_candidates: 0,
        };
        // The largest of the strategies' step caches.
        let request = workload
            .step_caches
            .iter()
            .map(|&(step_cache, cached_candidates)| PlanRequest {
                step_cache,
                cached_candidates,
                ..request.clone()
            })
            .max_by_key(PlanRequest::step_cache_bytes)
            .unwrap_or(request);
        Ok((request, found || self.fetch_fill))
    }

    /// The configs and file headers of this run's weights, read without loading any weight.
    fn peek(&self) -> Result<plan::peek::PeekedFiles, EditError> {
        plan::peek::peek_flux(
            self.paths.model_dir.as_deref(),
            self.paths.transformer.as_deref(),
            self.paths.text_encoders.as_deref(),
        )
        .map_err(EditError::Invalid)
    }

    /// The transformer's and the VAE's configs of this run: the random model's, the
    /// weights' own, or FLUX.1 Fill [dev]'s published ones where the weights have none.
    fn configs(&self, peeked: &plan::peek::PeekedFiles) -> (FluxConfig, VaeConfig) {
        match self.random_size.as_deref() {
            Some(size) => random_configs(size),
            None => (
                peeked
                    .transformer_config
                    .clone()
                    .unwrap_or_else(FluxConfig::fill_dev),
                peeked.vae_config.clone().unwrap_or_else(VaeConfig::flux),
            ),
        }
    }

    /// How many pixels one latent cell spans, by the VAE config of this run's weights
    /// (8 for FLUX's autoencoder), read without loading: what an edit checks initial
    /// latents against before the weights load.
    pub fn vae_downscale(&self) -> Result<usize, EditError> {
        let peeked = self.peek()?;
        Ok(self.configs(&peeked).1.downscale())
    }

    /// The tiling `--vae-tile` names, or diffusers' default for `vae` (its `sample_size`).
    fn tiling_of(&self, vae: &VaeConfig) -> VaeTiling {
        self.vae_tile
            .map_or_else(|| VaeTiling::of_config(vae), VaeTiling::new)
    }

    /// With `--vae-tiling auto`, `request` with its VAE passes tiled when, untiled, it does
    /// not fit `available` bytes and tiling lowers its peak; as it is otherwise (and when
    /// the free memory is unknown).
    pub fn tiled_if_needed(&self, request: PlanRequest, available: Option<usize>) -> PlanRequest {
        let Some(available) = available else {
            return request;
        };
        if self.vae_tiling != VaeTilingMode::Auto || request.plan().peak_bytes <= available {
            return request;
        }
        let tiled = PlanRequest {
            vae_tiling: Some(self.tiling_of(&request.vae)),
            ..request.clone()
        };
        if tiled.plan().peak_bytes < request.plan().peak_bytes {
            tiled
        } else {
            request
        }
    }

    /// `--memory-budget` if given (no device is opened), else the device's free memory;
    /// `None` when that cannot be read.
    pub fn available_memory(&self) -> Result<Option<(usize, &'static str)>, EditError> {
        if let Some(budget) = self.memory_budget {
            return Ok(Some((
                (budget * 1e9) as usize,
                "allowed by --memory-budget",
            )));
        }
        let device = self
            .device
            .open()
            .map_err(|e| EditError::Invalid(format!("--device {e}")))?;
        Ok(plan::available::free_bytes(&device))
    }

    /// `--host-memory-budget` if given, else the host's available memory (`None` when it
    /// cannot be read): what T5 and CLIP on the CPU beside a GPU generator are checked
    /// against.
    pub fn host_memory(&self) -> Option<(usize, &'static str)> {
        match self.host_memory_budget {
            Some(budget) => Some(((budget * 1e9) as usize, "allowed by --host-memory-budget")),
            None => plan::available::free_bytes(&candle_core::Device::Cpu),
        }
    }

    /// Makes the memory plan and refuses it when its peak exceeds `--memory-budget` or the
    /// device's free memory, before any weight is read (or fetched). Without weight files
    /// (and nothing to fetch) there is nothing to plan: the loader then names what is
    /// missing.
    ///
    /// `--vae-tiling auto` is settled here, as on when the plan needs the VAE passes tiled
    /// ([`Self::tiled_if_needed`]) and off otherwise, so the generator built next runs what
    /// was planned.
    pub fn check_plan(
        &mut self,
        judge: Option<JudgeFootprint>,
        workload: &Workload,
    ) -> Result<(), EditError> {
        let (request, found) = self.plan_request(judge, workload)?;
        let auto = self.vae_tiling == VaeTilingMode::Auto;
        let available = if found {
            self.available_memory()?
        } else {
            None
        };
        // Under `auto` the request is untiled; tiled here only when it has to be.
        let request = self.tiled_if_needed(request, available.map(|(bytes, _)| bytes));
        if auto {
            self.vae_tiling = match &request.vae_tiling {
                Some(tiling) => {
                    tracing::info!(
                        tile = tiling.tile,
                        "memory plan: the untiled VAE passes would not fit; --vae-tiling auto tiles them"
                    );
                    VaeTilingMode::On
                }
                None => VaeTilingMode::Off,
            };
        }
        if !found {
            return Ok(());
        }
        if let Some((host, source)) = self.host_memory() {
            plan::check_host(&request, host, source).map_err(EditError::Invalid)?;
        }
        let Some((available, source)) = available else {
            tracing::warn!("memory plan: the device's free memory cannot be read; not checked");
            return Ok(());
        };
        let plan = plan::check(&request, available, source).map_err(EditError::Invalid)?;
        tracing::info!(
            peak_gb = plan::gb(plan.peak_bytes),
            available_gb = plan::gb(available),
            phase = %plan.peak_phase,
            "memory plan fits"
        );
        Ok(())
    }

    /// Opens the devices and loads FLUX (or builds it from random weights).
    fn build(&self) -> anyhow::Result<FluxGenerator> {
        let open = |flag: &str, d: DeviceName| {
            d.open()
                .map_err(|e| EditError::Invalid(format!("{flag} {e}")))
        };
        let mut paths = self.paths.clone();
        if self.fetch_fill {
            paths.model_dir = Some(cached(FILL_DEV_REPO, "FLUX.1 Fill", "flux-fill")?);
        }
        let lora = match &self.lora {
            Some(LoraChoice::Path(p)) => Some(p.clone()),
            Some(LoraChoice::Released(repo)) => {
                Some(cached(repo, "--lora", lora_download_name(repo))?)
            }
            None => None,
        };
        let mut options = FluxOptions::new(paths);
        options.device = open("--device", self.device)?;
        options.text_device = if self.text_device == self.device {
            options.device.clone()
        } else {
            open("--text-device", self.text_device)?
        };
        options.dtype = self.dtype;
        options.hold_as = self.hold_as;
        options.tiny_decoder = self.tiny_decoder.clone();
        options.preview_decoder = self.preview_decoder;
        options.lora = lora;
        options.lora_scale = self.lora_scale;
        options.guidance = self.guidance;
        options.t5_tokens = self.t5_tokens;
        options.keep_text_encoders = self.keep_text_encoders;
        options.max_batch = self.max_batch;
        options.unused_weights = self.unused_weights;
        // `auto` left unsettled (no plan check ran) is off: FluxFillPipeline's passes.
        options.vae_tiling = self.vae_tiling == VaeTilingMode::On;
        options.vae_tile = self.vae_tile;
        // T5 first, then the transformer, where they would share one device's memory.
        options.defer_transformer = self.text_device == self.device && !self.keep_text_encoders;
        if options.lora.is_none() {
            tracing::warn!("no --lora: running FLUX.1 Fill without the ICEdit LoRA");
        }
        tracing::info!(dtype = ?options.dtype, device = ?self.device, "generator: FLUX.1 Fill");
        if let Some(size) = &self.random_size {
            let (transformer, vae) = random_configs(size);
            return Ok(FluxGenerator::random(size, transformer, vae, options)?);
        }
        Ok(FluxGenerator::load(options)?)
    }
}

/// The `download` name of a released LoRA repository.
fn lora_download_name(repo: &str) -> &'static str {
    if repo == ICEDIT_LORA_REPO {
        "icedit-lora"
    } else {
        "icedit-moe-lora"
    }
}

/// A repository's Hugging Face cache entry, or the error (naming `what` needed it) that
/// says how to fetch it.
fn cached(repo: &str, what: &str, download_name: &str) -> Result<PathBuf, EditError> {
    let entry = hub::cache_entry(&HubSettings::from_env(), repo);
    if entry.is_dir() {
        return Ok(entry);
    }
    Err(EditError::Invalid(format!(
        "{what}: {repo} is not in the Hugging Face cache ({}); pass --download or run `icedit-scale download {download_name}`",
        entry.display()
    )))
}

/// The size of the LoRA file the loader would read for `path` (a file, a folder or a
/// Hugging Face cache entry, resolved as the loader resolves it); 0 when there is none yet
/// (the loader names what is missing).
fn lora_file_bytes(path: &std::path::Path) -> usize {
    crate::models::flux::lora::find_lora_file(path)
        .ok()
        .and_then(|f| std::fs::metadata(f).ok())
        .map_or(0, |m| m.len() as usize)
}

/// The transformer and autoencoder configurations `--random-weights` names.
fn random_configs(size: &str) -> (FluxConfig, VaeConfig) {
    match size {
        "small" => crate::models::flux::bench::small_configs(),
        _ => (FluxConfig::fill_dev(), VaeConfig::flux()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan counts the LoRA file the loader reads, wherever it is named from: a
    /// Hugging Face cache entry (its snapshot) once counted 0 bytes.
    #[test]
    fn a_lora_in_a_cache_entry_counts_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("models--org--lora/snapshots/abc");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(
            snapshot.join("pytorch_lora_weights.safetensors"),
            [0u8; 1000],
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("models--org--lora/refs")).unwrap();
        std::fs::write(dir.path().join("models--org--lora/refs/main"), "abc").unwrap();
        assert_eq!(lora_file_bytes(&dir.path().join("models--org--lora")), 1000);
        assert_eq!(lora_file_bytes(&snapshot), 1000);
        assert_eq!(
            lora_file_bytes(&snapshot.join("pytorch_lora_weights.safetensors")),
            1000
        );
        assert_eq!(lora_file_bytes(&dir.path().join("nothing")), 0);
    }
}
