//! Building the generator and judge a command asked for, fetching their weights from the
//! Hugging Face Hub when asked (`download`, `--download`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;

use crate::cli::{GeneratorArgs, GeneratorKind, JudgeArgs};
use crate::device::{parse_device, parse_dtype, parse_dtype_on, DeviceName};
use crate::engine::{Engine, GeneratorWorker};
use crate::error::EditError;
use crate::generate::flux::{FluxGenerator, FluxOptions};
use crate::generate::testbed::{TestbedConfig, TestbedGenerator};
use crate::generate::Generator;
use crate::hub::{self, HubSettings, RepoRequest};
use crate::judge::composite::{CompositeJudge, CompositePreset};
use crate::judge::openai::OpenAiJudge;
use crate::judge::qwen_vl::{LocalJudgeConfig, Qwen2VlJudge};
use crate::judge::reward::{RewardJudge, RewardPreset};
use crate::judge::testbed::{TestbedJudge, TestbedJudgeConfig};
use crate::judge::JudgeError;
use crate::judge::{Judge, ScoreKind};
use crate::models::flux::files::{DIFFUSERS_FILES, FILL_DEV_REPO};
use crate::models::flux::lora::{ICEDIT_LORA_REPO, ICEDIT_MOE_LORA_REPO};
use crate::models::flux::vae::VaeConfig;
use crate::models::flux::FluxConfig;
use crate::models::flux::FluxPaths;
use crate::models::qwen_vl::files::CHECKPOINT_FILES;
use crate::models::testbed::TestbedEdits;
use crate::plan::footprint::WeightFormat;
use crate::plan::{self, JudgeFootprint, Placement, PlanRequest};

/// A judge with the number of calls it should have in flight at once.
pub struct JudgeHandle {
    /// The judge; `None` for `--judge none`.
    pub judge: Option<Arc<dyn Judge>>,
    /// Concurrency limit for the engine.
    pub concurrency: usize,
}

/// The generator the flags select: `auto` is FLUX when weights are named (or are to be
/// downloaded), else the testbed.
pub fn generator_kind(args: &GeneratorArgs, download: bool) -> GeneratorKind {
    let flux_files = args.model_dir.is_some()
        || args.transformer.is_some()
        || args.random_weights.is_some()
        || download;
    match (args.generator, flux_files) {
        (GeneratorKind::Auto, true) => GeneratorKind::Flux,
        (GeneratorKind::Auto, false) => GeneratorKind::Testbed,
        (kind, _) => kind,
    }
}

/// The engine an editing command asks for: the judge first (a bad preset fails before
/// minutes of weight loading), then the generator, with the testbed's edits shared between
/// a testbed generator and a testbed judge (which refuses any other generator).
pub fn build_engine(
    generator: &GeneratorArgs,
    judge: &JudgeArgs,
    download: bool,
    workload: &Workload,
) -> anyhow::Result<Engine> {
    let kind = generator_kind(generator, download);
    if kind == GeneratorKind::Flux {
        check_memory_plan(generator, judge, workload, download)?;
    }
    let testbed = (kind == GeneratorKind::Testbed).then(TestbedEdits::default);
    let judge = build_judge(judge, download, testbed.as_ref())?;
    if let Some(j) = &judge.judge {
        require_vie(j.as_ref(), "--judge")?;
    }
    let generator = build_generator(generator, download, testbed)?;
    Ok(engine(generator, judge))
}

/// One engine per generator device behind one judge (the server's workers): each device
/// gets its own generator (and model) with the memory plan checked for it; `wrap` may
/// decorate the judge (the server times its calls). Returns `(worker name, engine)`.
pub fn build_engines(
    generator: &GeneratorArgs,
    judge: &JudgeArgs,
    download: bool,
    workload: &Workload,
    devices: &[String],
    wrap: impl Fn(Arc<dyn Judge>) -> Arc<dyn Judge>,
) -> anyhow::Result<Vec<(String, Engine)>> {
    let kind = generator_kind(generator, download);
    let testbed = (kind == GeneratorKind::Testbed).then(TestbedEdits::default);
    let handle = build_judge(judge, download, testbed.as_ref())?;
    if let Some(j) = &handle.judge {
        require_vie(j.as_ref(), "--judge")?;
    }
    let shared = handle.judge.map(wrap);
    let mut engines = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        let mut args = generator.clone();
        args.device = device.clone();
        if kind == GeneratorKind::Flux {
            check_memory_plan(&args, judge, workload, download)?;
        }
        let g = build_generator(&args, download, testbed.clone())?;
        let name = if devices.iter().filter(|d| *d == device).count() > 1 {
            format!("{device}#{i}")
        } else {
            device.clone()
        };
        let worker = Arc::new(GeneratorWorker::spawn(g));
        let engine = match &shared {
            Some(j) => Engine::new(worker, j.clone(), handle.concurrency),
            None => Engine::without_judge(worker),
        };
        engines.push((name, engine));
    }
    Ok(engines)
}

/// Refuses a reward-model judge where VIE scores are needed (the final scoring of an edit),
/// before any work: its reward is not a VIE score and the report must not mix them.
pub fn require_vie(judge: &dyn Judge, flag: &str) -> Result<(), EditError> {
    if judge.score_kind() == ScoreKind::Reward {
        return Err(EditError::Invalid(format!(
            "{flag}: {} is a reward model and gives no VIE scores; use a composite preset \
             (kind = \"composite\") that screens or compares with it and scores with a VIE judge",
            judge.name()
        )));
    }
    Ok(())
}

/// What a command will run, as far as the memory plan needs it.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Source panel `(width, height)` after resizing.
    pub panel: (usize, usize),
    /// More than one edit: later prompts are encoded while the judge is resident.
    pub many_edits: bool,
}

/// The memory plan of a FLUX run with these flags, from configs and file headers only
/// (no weight is read).
pub fn flux_plan_request(
    args: &GeneratorArgs,
    judge: &JudgeArgs,
    workload: &Workload,
) -> anyhow::Result<PlanRequest> {
    Ok(flux_plan(args, judge, workload)?.0)
}

/// [`flux_plan_request`] and whether the transformer's files were found (when they were
/// not, the plan is of FLUX.1 Fill [dev]'s published configuration).
fn flux_plan(
    args: &GeneratorArgs,
    judge: &JudgeArgs,
    workload: &Workload,
) -> anyhow::Result<(PlanRequest, bool)> {
    let invalid = |flag: &str, e: String| EditError::Invalid(format!("{flag} {e}"));
    // Devices are compared by name: a plan for a GPU can be printed on a machine without one.
    let device = DeviceName::parse(&args.device).map_err(|e| invalid("--device", e))?;
    let dtype = parse_dtype_on(args.dtype.as_deref(), device.is_gpu())
        .map_err(|e| invalid("--dtype", e))?;
    let text_device = match &args.text_device {
        Some(name) => DeviceName::parse(name).map_err(|e| invalid("--text-device", e))?,
        None => device,
    };
    let peeked = plan::peek::peek_flux(
        args.model_dir.as_deref(),
        args.transformer.as_deref(),
        args.text_encoders.as_deref(),
    )
    .map_err(EditError::Invalid)?;
    let stored = plan::peek::transformer_format(&peeked.transformer).map_err(EditError::Invalid)?;
    let format = match (args.quantize, args.dequantize) {
        (Some(t), _) => WeightFormat::Quantized(t),
        (None, true) => WeightFormat::Dense,
        (None, false) => stored,
    };
    let same = |other: DeviceName| {
        if other == device {
            Placement::Device
        } else {
            Placement::Elsewhere
        }
    };
    let lora_bytes = args.lora.as_deref().filter(|p| p.exists()).map_or(0, |p| {
        plan::peek::safetensors_files(p)
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len() as usize)
            .sum()
    });
    let random = args.random_weights.as_deref().map(random_configs);
    let found = !peeked.transformer.is_empty() || random.is_some();
    let (transformer, vae) = match random {
        Some(configs) => configs,
        None => (
            peeked
                .transformer_config
                .unwrap_or_else(FluxConfig::fill_dev),
            peeked.vae_config.unwrap_or_else(VaeConfig::flux),
        ),
    };
    let request = PlanRequest {
        transformer,
        vae,
        format,
        dtype,
        cuda: matches!(device, DeviceName::Cuda(_)),
        batch: args.batch_size.max(1),
        panel: workload.panel,
        t5_tokens: args.t5_tokens,
        // A random-weights model runs no text encoders.
        text_parameters: match &args.random_weights {
            Some(_) => 0,
            None => peeked
                .text_parameters
                .unwrap_or(plan::T5_XXL_PARAMETERS + plan::CLIP_L_PARAMETERS),
        },
        text_placement: same(text_device),
        t5_file_bytes: args
            .t5
            .as_deref()
            .filter(|f| plan::peek::is_gguf(f))
            .and_then(|f| std::fs::metadata(f).ok())
            .map(|m| m.len() as usize),
        lora_bytes,
        judge: judge_footprint(judge, device)?,
        text_with_judge: workload.many_edits || args.keep_text_encoders,
        transformer_after_prompt: text_device == device && !args.keep_text_encoders,
    };
    Ok((request, found))
}

/// Parameters of the local judges' checkpoints (their Hub pages' safetensors totals), for
/// plans made before the checkpoint is on disk.
const JUDGE_PARAMETERS: &[(&str, f64)] = &[
    ("Qwen/Qwen2-VL-2B-Instruct", 2.21e9),
    ("Qwen/Qwen2-VL-7B-Instruct", 8.29e9),
    ("Qwen/Qwen2-VL-72B-Instruct", 73.4e9),
    ("Qwen/Qwen2.5-VL-3B-Instruct", 3.75e9),
    ("Qwen/Qwen2.5-VL-7B-Instruct", 8.29e9),
    ("Qwen/Qwen2.5-VL-32B-Instruct", 33.5e9),
    ("Qwen/Qwen2.5-VL-72B-Instruct", 73.4e9),
    ("Qwen/Qwen3-VL-2B-Instruct", 2.13e9),
    ("Qwen/Qwen3-VL-4B-Instruct", 4.44e9),
    ("Qwen/Qwen3-VL-8B-Instruct", 8.77e9),
    ("Qwen/Qwen3-VL-32B-Instruct", 33.4e9),
];

/// A local judge preset's size and placement; `None` for remote and testbed judges.
fn judge_footprint(
    args: &JudgeArgs,
    generator_device: DeviceName,
) -> anyhow::Result<Option<JudgeFootprint>> {
    let path = Path::new(&args.judge);
    if matches!(args.judge.as_str(), "testbed" | "none") || preset_head(path)?.kind != "qwen2vl" {
        return Ok(None);
    }
    let config = LocalJudgeConfig::from_file(path)?;
    let setup = |field: &str, e: String| {
        EditError::Invalid(format!("judge preset {}: {field} {e}", path.display()))
    };
    let device = DeviceName::parse(&config.device).map_err(|e| setup("device", e))?;
    let dtype =
        parse_dtype_on(config.dtype.as_deref(), device.is_gpu()).map_err(|e| setup("dtype", e))?;
    let stored = config
        .model_dir
        .as_deref()
        .and_then(plan::peek::stored_parameters);
    let known = config.model.as_deref().and_then(|m| {
        JUDGE_PARAMETERS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(m))
            .map(|(_, p)| *p as usize)
    });
    let name = config
        .model
        .clone()
        .unwrap_or_else(|| path.display().to_string());
    let Some(parameters) = stored.or(known) else {
        tracing::warn!("memory plan: the size of judge {name} is unknown; it is not counted");
        return Ok(None);
    };
    let e = dtype.size_in_bytes();
    Ok(Some(JudgeFootprint {
        name,
        parameters,
        bytes_per_parameter: e,
        // The presets' estimate: 1-2 GB in bf16 at max_batch 8 with 512-px previews.
        working_bytes: 750_000_000 * e,
        placement: if device == generator_device {
            Placement::Device
        } else {
            Placement::Elsewhere
        },
    }))
}

/// Makes the memory plan and refuses it when its peak exceeds `--memory-budget` or the
/// device's free memory, before any weight is read (and, with `download`, before any is
/// fetched). Without weight files and without `download` there is nothing to plan: the
/// loader then names what is missing.
pub fn check_memory_plan(
    args: &GeneratorArgs,
    judge: &JudgeArgs,
    workload: &Workload,
    download: bool,
) -> anyhow::Result<()> {
    let (request, found) = flux_plan(args, judge, workload)?;
    if !found && !download {
        return Ok(());
    }
    let Some((available, source)) = available_memory(args)? else {
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

/// `--memory-budget` if given (no device is opened), else the device's free memory; `None`
/// when that cannot be read.
pub fn available_memory(args: &GeneratorArgs) -> anyhow::Result<Option<(usize, &'static str)>> {
    if let Some(budget) = args.memory_budget {
        return Ok(Some((
            (budget * 1e9) as usize,
            "allowed by --memory-budget",
        )));
    }
    let device =
        parse_device(&args.device).map_err(|e| EditError::Invalid(format!("--device {e}")))?;
    Ok(plan::available::free_bytes(&device))
}

/// An engine over a built generator and judge.
pub fn engine(generator: Box<dyn Generator>, judge: JudgeHandle) -> Engine {
    let worker = Arc::new(GeneratorWorker::spawn(generator));
    match judge.judge {
        Some(j) => Engine::new(worker, j, judge.concurrency),
        None => Engine::without_judge(worker),
    }
}

/// The generator backend `args` select; with `download`, FLUX.1 Fill and the ICEdit LoRA
/// are fetched into the Hugging Face cache when the flags name none. A testbed generator
/// records its edits in `testbed` (for the testbed judges that may score them).
pub fn build_generator(
    args: &GeneratorArgs,
    download: bool,
    testbed: Option<TestbedEdits>,
) -> anyhow::Result<Box<dyn Generator>> {
    let mut args = args.clone();
    let kind = generator_kind(&args, download);
    let flux_files = args.model_dir.is_some() || args.transformer.is_some();
    if download && !flux_files && kind == GeneratorKind::Flux {
        args.model_dir = Some(fetch(&flux_fill_request())?);
    }
    if let Some(lora) = &args.lora {
        args.lora = Some(resolve_lora(lora, download)?);
    } else if download && kind == GeneratorKind::Flux {
        tracing::info!("--download without --lora: using the ICEdit LoRA ({ICEDIT_LORA_REPO})");
        args.lora = Some(fetch(
            &RepoRequest::new(ICEDIT_LORA_REPO).include(["*.safetensors"]),
        )?);
    }
    let args = &args;
    match kind {
        GeneratorKind::Testbed => {
            tracing::info!("generator: built-in testbed (a simulator, not an image editor)");
            Ok(Box::new(TestbedGenerator::with_edits(
                TestbedConfig {
                    difficulty: args.testbed_difficulty,
                    contrast: args.testbed_contrast,
                    max_batch: args.batch_size.max(1),
                },
                testbed.unwrap_or_default(),
            )))
        }
        GeneratorKind::Flux => Ok(Box::new(build_flux(args)?)),
        GeneratorKind::Auto => unreachable!("resolved above"),
    }
}

/// The transformer and autoencoder configurations `--random-weights` names.
fn random_configs(size: &str) -> (FluxConfig, VaeConfig) {
    match size {
        "small" => crate::models::flux::bench::small_configs(),
        _ => (FluxConfig::fill_dev(), VaeConfig::flux()),
    }
}

fn build_flux(args: &GeneratorArgs) -> anyhow::Result<FluxGenerator> {
    let device =
        parse_device(&args.device).map_err(|e| EditError::Invalid(format!("--device {e}")))?;
    let mut options = FluxOptions::new(FluxPaths {
        model_dir: args.model_dir.clone(),
        transformer: args.transformer.clone(),
        vae: args.vae.clone(),
        text_encoders: args.text_encoders.clone(),
        t5: args.t5.clone(),
    });
    options.dtype = parse_dtype(args.dtype.as_deref(), &device)
        .map_err(|e| EditError::Invalid(format!("--dtype {e}")))?;
    options.text_device = match &args.text_device {
        Some(name) => {
            parse_device(name).map_err(|e| EditError::Invalid(format!("--text-device {e}")))?
        }
        None => device.clone(),
    };
    options.device = device;
    options.quantize = args.quantize;
    options.dequantize = args.dequantize;
    options.tiny_decoder = args.tiny_decoder.clone();
    options.preview_decoder = args
        .preview_decoder
        .parse()
        .map_err(|e: String| EditError::Invalid(format!("--preview-decoder: {e}")))?;
    options.lora = args.lora.clone();
    options.lora_scale = args.lora_scale;
    options.guidance = args.guidance;
    options.t5_tokens = args.t5_tokens;
    options.keep_text_encoders = args.keep_text_encoders;
    options.max_batch = args.batch_size.max(1);
    // T5 first, then the transformer, where they would share one device's memory.
    options.defer_transformer =
        options.text_device.same_device(&options.device) && !args.keep_text_encoders;
    if options.lora.is_none() {
        tracing::warn!("no --lora: running FLUX.1 Fill without the ICEdit LoRA");
    }
    tracing::info!(dtype = ?options.dtype, device = %args.device, "generator: FLUX.1 Fill");
    if let Some(size) = &args.random_weights {
        if args.lora.is_some() || args.t5.is_some() {
            return Err(EditError::Invalid(
                "--random-weights builds its own weights; it takes no --lora or --t5".into(),
            )
            .into());
        }
        let (transformer, vae) = random_configs(size);
        return Ok(FluxGenerator::random(size, transformer, vae, options)?);
    }
    Ok(FluxGenerator::load(options)?)
}

/// The fields every judge preset has; the rest belongs to its backend.
#[derive(Debug, Deserialize)]
struct PresetHead {
    kind: String,
    #[serde(default)]
    max_concurrency: Option<usize>,
}

/// Reads a preset's `kind` and `max_concurrency`, naming the file on error.
fn preset_head(path: &Path) -> Result<PresetHead, JudgeError> {
    crate::judge::preset::read_preset(path)
}

/// Loads the judge a preset file describes, by its `kind`. A testbed preset knows the
/// testbed generator's edits when there are any; a composite's members are loaded the same
/// way (relative to its folder, each file once) but may not be composites themselves.
fn judge_from_preset(
    path: &Path,
    testbed: Option<&TestbedEdits>,
    allow_composite: bool,
) -> Result<Arc<dyn Judge>, JudgeError> {
    let kind = preset_head(path)?.kind;
    match kind.as_str() {
        "openai" => Ok(Arc::new(OpenAiJudge::from_preset(path)?)),
        "qwen2vl" => {
            let config = LocalJudgeConfig::from_file(path)?;
            let setup = |field: &str, e: String| {
                JudgeError::Config(format!("judge preset {}: {field} {e}", path.display()))
            };
            let device = parse_device(&config.device).map_err(|e| setup("device", e))?;
            let dtype =
                parse_dtype(config.dtype.as_deref(), &device).map_err(|e| setup("dtype", e))?;
            Ok(Arc::new(Qwen2VlJudge::new(config, device, dtype)?))
        }
        "reward" => Ok(Arc::new(RewardJudge::from_preset(path)?)),
        "testbed" => {
            let config = TestbedJudgeConfig::from_preset(path)?;
            Ok(Arc::new(match testbed {
                Some(edits) => TestbedJudge::knowing(config, edits.clone()),
                None => TestbedJudge::new(config),
            }))
        }
        "composite" if allow_composite => {
            let preset = CompositePreset::from_file(path)?;
            let base = path.parent().unwrap_or(Path::new("."));
            let mut loaded: Vec<(PathBuf, Arc<dyn Judge>)> = Vec::new();
            let mut load = |member: &str| -> Result<Arc<dyn Judge>, JudgeError> {
                let file = base.join(member);
                if let Some((_, j)) = loaded.iter().find(|(p, _)| *p == file) {
                    return Ok(j.clone());
                }
                let judge = judge_from_preset(&file, testbed, false).map_err(|e| {
                    JudgeError::Config(format!("composite {}: member {member}: {e}", path.display()))
                })?;
                loaded.push((file, judge.clone()));
                Ok(judge)
            };
            let screen = load(&preset.screen)?;
            let compare = preset.compare.as_deref().map(&mut load).transpose()?;
            let score = preset
                .score
                .iter()
                .map(|m| load(m))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Arc::new(CompositeJudge::new(preset.name, screen, compare, score)?))
        }
        "composite" => Err(JudgeError::Config(format!(
            "judge preset {}: a composite's member cannot be a composite",
            path.display()
        ))),
        other => Err(JudgeError::Config(format!(
            "judge preset {}: unknown kind {other:?} (known: \"openai\", \"qwen2vl\", \"reward\", \"testbed\", \"composite\"; or --judge testbed)",
            path.display()
        ))),
    }
}

/// The judge `args` select: `testbed`, `none` or a preset file; with `download`, a local
/// judge's checkpoint is fetched into the Hugging Face cache when it is not there. The
/// testbed judge needs the testbed generator's edits (`testbed`): with another generator it
/// is refused here, before any work.
pub fn build_judge(
    args: &JudgeArgs,
    download: bool,
    testbed: Option<&TestbedEdits>,
) -> anyhow::Result<JudgeHandle> {
    match args.judge.as_str() {
        "testbed" => {
            let Some(edits) = testbed else {
                return Err(EditError::Invalid(
                    "--judge testbed knows only the testbed generator's edits (their truth is simulated); \
                     with FLUX give a judge preset (judges/*.toml)"
                        .into(),
                )
                .into());
            };
            let config = TestbedJudgeConfig {
                seed: args.judge_seed,
                ..TestbedJudgeConfig::default()
            };
            return Ok(JudgeHandle {
                judge: Some(Arc::new(TestbedJudge::knowing(config, edits.clone()))),
                concurrency: args.judge_concurrency.unwrap_or(8),
            });
        }
        "none" => {
            return Ok(JudgeHandle {
                judge: None,
                concurrency: 1,
            })
        }
        _ => {}
    }
    let path = Path::new(&args.judge);
    let head = preset_head(path).with_context(|| format!("loading judge {}", args.judge))?;
    if download {
        fetch_judge_weights(path)?;
    }
    let judge = judge_from_preset(path, testbed, true)?;
    let default_concurrency = if head.kind == "testbed" { 8 } else { 4 };
    Ok(JudgeHandle {
        judge: Some(judge),
        concurrency: args
            .judge_concurrency
            .or(head.max_concurrency)
            .unwrap_or(default_concurrency),
    })
}

/// Fetches what a local judge preset (or the members of a composite) needs from the Hub
/// and the cache lacks: its checkpoint and its adapter.
fn fetch_judge_weights(path: &Path) -> anyhow::Result<()> {
    match preset_head(path)?.kind.as_str() {
        "qwen2vl" => {
            let config = LocalJudgeConfig::from_file(path)?;
            let settings = HubSettings::from_env();
            if let (None, Some(model)) = (&config.model_dir, &config.model) {
                if !hub::cache_entry(&settings, model).is_dir() {
                    fetch(&judge_request(model))?;
                }
            }
            if let Some(request) = adapter_request(&config) {
                if !hub::cache_entry(&settings, &request.repo_id).is_dir() {
                    fetch(&request)?;
                }
            }
        }
        "reward" => {
            for request in reward_requests(&RewardPreset::from_file(path)?) {
                if !hub::cache_entry(&HubSettings::from_env(), &request.repo_id).is_dir() {
                    fetch(&request)?;
                }
            }
        }
        "composite" => {
            let preset = CompositePreset::from_file(path)?;
            for member in composite_members(path, &preset) {
                fetch_judge_weights(&member)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A reward judge's base model (config, tokenizer) and checkpoint, where they are Hub ids.
fn reward_requests(preset: &RewardPreset) -> Vec<RepoRequest> {
    let mut requests = Vec::new();
    if let (None, Some(model)) = (&preset.model_dir, &preset.model) {
        requests.push(judge_request(model));
    }
    if hub::names_repo(&preset.weights) {
        requests.push(RepoRequest::new(&preset.weights).include(["*.safetensors", "*.json"]));
    }
    requests
}

/// A composite preset's member files, resolved against its folder, each once.
fn composite_members(path: &Path, preset: &CompositePreset) -> Vec<PathBuf> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut members: Vec<PathBuf> = Vec::new();
    for m in std::iter::once(&preset.screen)
        .chain(&preset.compare)
        .chain(&preset.score)
    {
        let p = base.join(m);
        if !members.contains(&p) {
            members.push(p);
        }
    }
    members
}

/// FLUX.1 Fill [dev] in the diffusers layout.
fn flux_fill_request() -> RepoRequest {
    RepoRequest::new(FILL_DEV_REPO).include(DIFFUSERS_FILES.iter().copied())
}

/// A local judge's checkpoint.
fn judge_request(model: &str) -> RepoRequest {
    RepoRequest::new(model).include(CHECKPOINT_FILES.iter().copied())
}

/// A local judge's adapter, when the preset names a Hub id that is not a folder.
fn adapter_request(config: &LocalJudgeConfig) -> Option<RepoRequest> {
    let adapter = config.adapter.as_deref()?;
    hub::names_repo(adapter).then(|| judge_request(adapter))
}

/// What `download NAME` fetches: `flux-fill`, `icedit-lora`, `icedit-moe-lora`, a local
/// judge preset (its `model` and its `adapter`), or a Hub id (every file).
pub fn hub_requests(name: &str) -> anyhow::Result<Vec<RepoRequest>> {
    if name.ends_with(".toml") {
        let path = Path::new(name);
        if preset_head(path)?.kind == "reward" {
            let requests = reward_requests(&RewardPreset::from_file(path)?);
            if requests.is_empty() {
                return Err(EditError::Invalid(format!(
                    "{name}: its model and weights are folders; nothing to download"
                ))
                .into());
            }
            return Ok(requests);
        }
        if preset_head(path)?.kind == "qwen2vl" {
            let config = LocalJudgeConfig::from_file(path)?;
            let mut requests = Vec::new();
            match &config.model {
                Some(model) if config.model_dir.is_none() => requests.push(judge_request(model)),
                _ => {}
            }
            requests.extend(adapter_request(&config));
            if requests.is_empty() {
                return Err(EditError::Invalid(format!(
                    "{name}: no `model` or `adapter` Hub id to download; its folders are used as they are"
                ))
                .into());
            }
            return Ok(requests);
        }
    }
    Ok(vec![hub_request(name)?])
}

/// One repository of [`hub_requests`].
fn hub_request(name: &str) -> anyhow::Result<RepoRequest> {
    Ok(match name {
        "flux-fill" => flux_fill_request(),
        "icedit-lora" => RepoRequest::new(ICEDIT_LORA_REPO).include(["*.safetensors"]),
        "icedit-moe-lora" => RepoRequest::new(ICEDIT_MOE_LORA_REPO).include(["*.safetensors"]),
        "taef1" => RepoRequest::new(crate::models::taef1::TAEF1_REPO)
            .include(crate::models::taef1::TAEF1_FILES.iter().copied()),
        preset if preset.ends_with(".toml") => {
            let path = Path::new(preset);
            let head = preset_head(path)?;
            if head.kind != "qwen2vl" {
                return Err(EditError::Invalid(format!(
                    "{preset}: a `{}` judge has no weights to download",
                    head.kind
                ))
                .into());
            }
            unreachable!("{preset}: local presets are read by hub_requests")
        }
        id if id.contains('/') => RepoRequest::new(id),
        other => {
            return Err(EditError::Invalid(format!(
                "{other}: expected flux-fill, icedit-lora, icedit-moe-lora, a judge preset (.toml) or a Hub id org/name"
            ))
            .into())
        }
    })
}

/// Downloads what `request` names that the cache lacks (with progress bars) and returns
/// the repository's cache entry.
pub fn fetch(request: &RepoRequest) -> Result<PathBuf, hub::HubError> {
    let settings = HubSettings::from_env();
    tracing::info!(repo = %request.repo_id, cache = %settings.cache_dir.display(), "fetching from the Hugging Face Hub");
    let done = hub::download(&settings, request, true)?;
    tracing::info!(
        repo = %request.repo_id,
        fetched = done.fetched,
        cached = done.already_cached,
        "in the cache at {}",
        done.cache_entry.display()
    );
    Ok(done.cache_entry)
}

/// `--lora`: a path as given, or the names `icedit` / `icedit-moe` looked up in (and with
/// `download` fetched into) the Hugging Face cache.
fn resolve_lora(lora: &Path, download: bool) -> anyhow::Result<PathBuf> {
    let repo = match lora.to_str() {
        _ if lora.exists() => return Ok(lora.to_path_buf()),
        Some("icedit") => ICEDIT_LORA_REPO,
        Some("icedit-moe") => ICEDIT_MOE_LORA_REPO,
        _ => return Ok(lora.to_path_buf()),
    };
    let entry = hub::cache_entry(&HubSettings::from_env(), repo);
    if entry.is_dir() {
        return Ok(entry);
    }
    if download {
        return Ok(fetch(&RepoRequest::new(repo).include(["*.safetensors"]))?);
    }
    Err(EditError::Invalid(format!(
        "--lora {}: {repo} is not in the Hugging Face cache ({}); pass --download or run `icedit-scale download {}-lora`",
        lora.display(),
        entry.display(),
        lora.display()
    ))
    .into())
}
