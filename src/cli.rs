//! Command-line definitions (clap only; the work is done in [`crate::commands`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::strategy::{StrategyField, MAX_STEPS};
use crate::engine::{
    Seeds, StrategyConfig, StrategyError, StrategyKind, StrategyOverrides, ValueSource,
};
use crate::generate::testbed::TestbedConfig;
use crate::judge::preset::MAX_CONCURRENCY;

/// Test-time scaling for instruction-based image editing with ICEdit (FLUX.1 Fill + LoRA).
///
/// Without a subcommand, the arguments are those of `edit`:
/// `icedit-scale --image in.png --instruction "make the sky night" --seeds 8 --probe-steps 4`.
#[derive(Debug, Parser)]
#[command(
    name = "icedit-scale",
    // The crate's version and what the binary was built for (written by build.rs from the
    // cargo features), e.g. `0.1.0 (cpu, cuda (kernels for sm_90))`. A literal: the same text as a String
    // kept for the process's life raised the 512-panel CPU peak by 250 MiB (tests/plan.rs),
    // the heap's layout being that sensitive with the allocator tuned (host_memory.rs).
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ICEDIT_BUILD_DESCRIPTION"), ")"),
    args_conflicts_with_subcommands = true,
    // A bare `icedit-scale` shows the help rather than `edit`'s missing --image.
    arg_required_else_help = true
)]
pub struct Cli {
    /// A subcommand; `edit` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The arguments of `edit`, for the bare form.
    #[command(flatten)]
    pub edit: EditArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Edit one image with a scaling strategy (the default command).
    Edit(Box<EditArgs>),
    /// Run the built-in testbed end to end: a generated scene, early filter, a summary.
    Demo(DemoArgs),
    /// Edit every item of a JSONL manifest, pipelined, resumable and shardable.
    Batch(Box<BatchArgs>),
    /// Combine the outputs of batch shards into one summary.
    Merge(MergeArgs),
    /// Measure strategies on many testbed edits against the known truth.
    Study(StudyArgs),
    /// Compare strategies on a benchmark suite at matched compute (resumable).
    Eval(Box<EvalArgs>),
    /// Measure a judge against human labels: pairwise accuracy, rank correlation, position
    /// bias, failures and cost (resumable).
    JudgeEval(JudgeEvalArgs),
    /// Fetch weights from the Hugging Face Hub into its cache (resumable).
    Download(DownloadArgs),
    /// Benchmarks (speed and memory).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print the memory plan of an edit (same flags as `edit`) without loading anything:
    /// weights and working memory per part, the peak, and whether it fits.
    Plan(Box<EditArgs>),
    /// Serve edits over HTTP (OpenAI-compatible /v1/images/edits, async jobs with live
    /// events, a web page at /): the model loaded once, shared by every client.
    Serve(Box<ServeArgs>),
}

/// `download`: Hub repositories into the Hugging Face cache.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// What to fetch: `flux-fill` (FLUX.1 Fill [dev], diffusers layout; gated: accept its
    /// licence on the Hub and set HF_TOKEN), `icedit-lora`, `icedit-moe-lora`, `taef1` (the
    /// tiny preview decoder), a local judge preset file (its `model`), or any Hub id
    /// `org/name` (every file).
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Generator busy fraction and makespan of a batch vs queue depth and judge latency.
    Pipeline(PipelineBenchArgs),
    /// Peak memory of a batch over a long manifest (run once per size: peak RSS is per process).
    Memory(MemoryBenchArgs),
    /// FLUX transformer step and VAE timings with random weights (any size, any device).
    Flux(FluxBenchArgs),
    /// Local judge: batched vs one-at-a-time prefill of screening prompts, random weights.
    Judge(JudgeBenchArgs),
    /// The server under load: C concurrent HTTP clients submitting testbed edits to
    /// generators with a cost model; throughput, latency percentiles, busy fraction, lost
    /// and duplicated edits.
    Serve(ServeBenchArgs),
}

/// `bench serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeBenchArgs {
    /// Concurrent client counts (each 1 to 1024).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = bounded(1, 1024))]
    pub clients: Vec<usize>,
    /// Edits per client count (1 to 100000).
    #[arg(long, default_value_t = 64, value_parser = bounded(1, 100_000))]
    pub edits: usize,
    /// Generator workers behind the one queue (1 to 64).
    #[arg(long, default_value_t = 1, value_parser = bounded(1, 64))]
    pub workers: usize,
    /// Edits each worker runs at once (1 to 64).
    #[arg(long, default_value_t = 2, value_parser = bounded(1, 64))]
    pub in_flight: usize,
    /// Generator seconds per candidate per step.
    #[arg(long, default_value_t = 0.15, value_parser = seconds)]
    pub step_s: f64,
    /// Generator seconds per VAE decode.
    #[arg(long, default_value_t = 0.1, value_parser = seconds)]
    pub decode_s: f64,
    /// Judge seconds per call.
    #[arg(long, default_value_t = 0.5, value_parser = seconds)]
    pub judge_latency_s: f64,
    /// Scales every time so the benchmark runs in seconds (ratios are unchanged).
    #[arg(long, default_value_t = 0.02, value_parser = time_scale)]
    pub time_scale: f64,
    /// Testbed panel width.
    #[arg(long, default_value_t = 64, value_parser = panel_width)]
    pub width: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub strategy: StrategyArgs,
    /// Output folder (serve.json, serve.md, each run's journal).
    #[arg(long, default_value = "out/bench-serve")]
    pub out: PathBuf,
}

/// `bench judge`.
#[derive(Debug, Clone, Args)]
pub struct JudgeBenchArgs {
    /// small (a CPU-sized stand-in), qwen2-vl-2b, qwen2-vl-7b, qwen2.5-vl-7b, qwen3-vl-8b, or
    /// a checkpoint's config.json.
    #[arg(long, default_value = "qwen2-vl-7b")]
    pub model: String,
    /// Side of both square images of a screening prompt, pixels (28 to 4096).
    #[arg(long, default_value_t = 512, value_parser = bounded(28, 4096))]
    pub image_side: usize,
    /// Text tokens around the images (8 to 32768).
    #[arg(long, default_value_t = 150, value_parser = bounded(8, 32768))]
    pub text_tokens: usize,
    /// Prompts per batched prefill (each 1 to 64).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8", value_parser = bounded(1, 64))]
    pub batch: Vec<usize>,
    /// Timed repetitions (after one warm-up), 1 to 1000.
    #[arg(long, default_value_t = 2, value_parser = bounded(1, 1000))]
    pub iters: usize,
    /// Weight dtype: f32, f16 or bf16 (bf16 default on GPU, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Device: cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// transformers' timing of the same prompt (the JSON scripts/bench_transformers_judge.py
    /// writes): adds an ours-vs-transformers table.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// A command that serves the same prefill (`python3 scripts/bench_transformers_judge.py
    /// --serve ...`, run under `sh -c`): both models stay loaded and one prefill of each is
    /// timed per round, the side going first alternating; adds a side-by-side table with
    /// the median ratio.
    #[arg(long)]
    pub versus: Option<String>,
    /// Side-by-side rounds with --versus (1 to 100).
    #[arg(long, default_value_t = 7, value_parser = bounded(1, 100))]
    pub rounds: usize,
    /// Output folder (judge.json, judge.md).
    #[arg(long, default_value = "out/bench-judge")]
    pub out: PathBuf,
}

/// `bench pipeline`.
#[derive(Debug, Clone, Args)]
pub struct PipelineBenchArgs {
    /// Edits per configuration (1 to 10000).
    #[arg(long, default_value_t = 16, value_parser = bounded(1, 10_000))]
    pub edits: usize,
    /// Queue depths (edits in flight, each 1 to 256).
    #[arg(long, value_delimiter = ',', default_value = "1,2,8", value_parser = bounded(1, 256))]
    pub queues: Vec<usize>,
    /// Judge latencies per call, seconds (each 0 to 3600).
    #[arg(long, value_delimiter = ',', default_value = "0.5,3", value_parser = seconds)]
    pub latencies: Vec<f64>,
    /// Generator seconds per candidate per step (FLUX Fill at 1024x512 on one H100 is of
    /// this order; measure yours with `bench flux`).
    #[arg(long, default_value_t = 0.15, value_parser = seconds)]
    pub step_s: f64,
    /// Generator seconds per VAE decode.
    #[arg(long, default_value_t = 0.1, value_parser = seconds)]
    pub decode_s: f64,
    /// Scales every time so the benchmark runs in seconds (ratios are unchanged); above 0, at
    /// most 1.
    #[arg(long, default_value_t = 0.02, value_parser = time_scale)]
    pub time_scale: f64,
    /// Testbed panel width (small: the cost model, not the simulator, should dominate).
    #[arg(long, default_value_t = 64, value_parser = panel_width)]
    pub width: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub strategy: StrategyArgs,
    /// Scratch folder.
    #[arg(long, default_value = "out/bench-pipeline")]
    pub out: PathBuf,
}

/// `bench flux`.
#[derive(Debug, Clone, Args)]
pub struct FluxBenchArgs {
    /// `full` (FLUX.1 Fill, 12B) or `small` (a CPU-sized stand-in).
    #[arg(long, default_value = "full")]
    pub size: String,
    /// Source panel width; the diptych is twice as wide.
    #[arg(long, default_value_t = 512, value_parser = panel_side)]
    pub width: usize,
    /// Source panel height.
    #[arg(long, default_value_t = 512, value_parser = panel_side)]
    pub height: usize,
    /// Candidate batch sizes (each 1 to 64).
    #[arg(long, value_delimiter = ',', default_value = "1,8", value_parser = bounded(1, 64))]
    pub batch: Vec<usize>,
    /// T5 tokens (1 to 512).
    #[arg(long, default_value_t = 512, value_parser = bounded(1, 512))]
    pub t5_tokens: usize,
    /// Steps of the full edit estimate (1 to 1000).
    #[arg(long, default_value_t = 50, value_parser = bounded(1, MAX_STEPS))]
    pub steps: usize,
    /// Untimed warm-up runs before the timed ones, 0 to 100 (0 puts one-time costs into the
    /// timings; the peak memory is the same).
    #[arg(long, default_value_t = 1, value_parser = bounded(0, 100))]
    pub warmup: usize,
    /// Timed repetitions (after the warm-up), 1 to 1000.
    #[arg(long, default_value_t = 3, value_parser = bounded(1, 1000))]
    pub iters: usize,
    /// Skip timing the tiny preview decoder (TAEF1's configuration).
    #[arg(long)]
    pub no_tiny: bool,
    /// Weight dtype: f32, f16 or bf16 (bf16 default on GPU, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Device: cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight formats of the transformer's linear layers, timed one after another in one
    /// run: `dense` (--dtype), `fp8` (e4m3, per-tensor scales; cuBLASLt's fp8 GEMM on
    /// sm89+) or a ggml type (q8_0, q4_k, ...), e.g. dense,fp8,q8_0,q4_k.
    #[arg(long, value_delimiter = ',', default_value = "dense", value_parser = weight_format)]
    pub formats: Vec<crate::models::flux::held_weight::WeightFormat>,
    /// Step caches to time the completion part of an edit with, each against `none` in the
    /// same run (e.g. fbc:0.12,taylorseer:interval=4,order=1): --keep candidates run
    /// --probe-steps exact steps, then each setting completes them to --steps (first format).
    #[arg(long, value_name = "SPEC[,SPEC...]", value_parser = step_caches)]
    pub cache: Option<StepCaches>,
    /// Time only the autoencoder (and the tiny decoder, unless --no-tiny): no transformer
    /// is built (the fused-kernel check still runs first). For comparing builds, e.g. one
    /// with the `cudnn` feature (conv2d through cuDNN) against the default (im2col + GEMM).
    #[arg(long, conflicts_with = "cache")]
    pub vae_only: bool,
    /// Also replay each batch's step from a CUDA graph (first format; CUDA only, elsewhere
    /// the table says so): launches per step, the replay's time beside the eager one, and
    /// the replay checked against the eager forward.
    #[arg(long, conflicts_with = "vae_only")]
    pub graph: bool,
    /// With --cache: candidates completed together (M), 1 to 64.
    #[arg(long, default_value_t = 2, value_parser = bounded(1, 64))]
    pub keep: usize,
    /// With --cache: exact steps before the completion (k), below --steps.
    #[arg(long, default_value_t = 4, value_parser = bounded(1, MAX_STEPS))]
    pub probe_steps: usize,
    /// Output folder (flux.json).
    #[arg(long, default_value = "out/bench-flux")]
    pub out: PathBuf,
}

/// `bench flux --cache`: step cache settings, `none` first (added when not given).
#[derive(Debug, Clone, PartialEq)]
pub struct StepCaches(pub Vec<crate::generate::StepCache>);

/// A `bench flux --cache` list.
fn step_caches(text: &str) -> Result<StepCaches, String> {
    let mut list = crate::generate::StepCache::parse_list(text)?;
    list.retain(|c| c.is_on());
    list.insert(0, crate::generate::StepCache::None);
    Ok(StepCaches(list))
}

/// `bench memory`.
#[derive(Debug, Clone, Args)]
pub struct MemoryBenchArgs {
    /// Manifest lines (1 to 10 million).
    #[arg(long, default_value_t = 100_000, value_parser = bounded(1, 10_000_000))]
    pub lines: usize,
    /// Items to edit, about (the shard split is by a hash of the ids, so it lands near
    /// this count, not on it; the rest belong to other shards but are still streamed,
    /// validated and hashed), 1 to 100000.
    #[arg(long, default_value_t = 500, value_parser = bounded(1, 100_000))]
    pub items: usize,
    /// Scratch folder.
    #[arg(long, default_value = "out/bench-memory")]
    pub out: PathBuf,
}

/// Strategy parameters shared by every command that edits. The defaults are
/// [`StrategyConfig::default`]'s, the one place they are written. A negative number is
/// read as a value, so its refusal names the flag (`--seeds -1`).
#[derive(Debug, Clone, Args)]
#[command(allow_negative_numbers = true)]
pub struct StrategyArgs {
    /// Scaling strategy.
    #[arg(long, value_enum, default_value_t = StrategyConfig::default().kind)]
    pub strategy: StrategyKind,
    /// N: seed candidates to spawn.
    #[arg(long, default_value_t = StrategyConfig::default().seeds)]
    pub seeds: usize,
    /// k: steps each candidate is probed before screening (tournament: short-run length).
    #[arg(long, default_value_t = StrategyConfig::default().probe_steps)]
    pub probe_steps: usize,
    /// M: survivors completed after screening (at most; only passing ones); adaptive:
    /// completions per wave [default: 2; adaptive: 1]
    #[arg(long)]
    pub keep: Option<usize>,
    /// Steps of the full schedule (50 as in the paper; ICEdit's scripts use 28).
    #[arg(long, default_value_t = StrategyConfig::default().steps)]
    pub steps: usize,
    /// Seed of candidate 0; candidate i uses seed + i.
    #[arg(long, default_value_t = StrategyConfig::default().base_seed)]
    pub seed: u64,
    /// Explicit comma-separated seeds (overrides --seed and --seeds).
    #[arg(long, value_delimiter = ',')]
    pub seed_list: Option<Vec<u64>>,
    /// Compute budget per edit in NFE (transformer forwards, a cached one counted as one;
    /// a hi-res refine's forwards are outside it): sets N to the largest that fits, keeping
    /// k, M and --steps (the budget rule in docs/commands.md); adaptive never spends more.
    #[arg(long, conflicts_with_all = ["seeds", "seed_list"], value_parser = bounded(1, 10_000_000))]
    pub budget_nfe: Option<usize>,
    /// Adaptive: seeds spawned per wave.
    #[arg(long, default_value_t = StrategyConfig::default().wave)]
    pub wave: usize,
    /// Adaptive: stop once a completed candidate's VIE O (0-10) reaches this.
    #[arg(long, default_value_t = StrategyConfig::default().target, allow_hyphen_values = true)]
    pub target: f32,
    /// Hi-res refine: the pick is upscaled to this panel width (a multiple of 16, wider
    /// than --width) and refined there by FLUX Fill image-to-image; its forwards are
    /// reported apart, outside --budget-nfe.
    #[arg(long, value_parser = panel_width)]
    pub refine: Option<u32>,
    /// How much of the schedule the refine re-runs (above 0, at most 1) [default: 0.35].
    #[arg(long, value_parser = strength)]
    pub refine_strength: Option<f64>,
    /// Blend the source back, at the refined size, where the edit changed nothing.
    #[arg(long)]
    pub refine_keep_unchanged: bool,
    /// Refine the N best finished candidates, not only the pick (needs --refine): the
    /// pick's refine is final.png, the others go to refined/ (one hi-res pass each)
    /// [default: 1].
    #[arg(long, value_name = "N")]
    pub refine_best: Option<usize>,
    /// Step cache of the completions: `none`, `fbc:<threshold>` (First-Block-Cache, e.g.
    /// fbc:0.12) or `taylorseer:interval=<n>,order=<n>[,warmup=<n>][,until=<n>]
    /// [,factors=bf16|f32][,lite]`. Probes always run in full; a cached forward still counts
    /// as one NFE, in the report and against --budget-nfe (docs/commands.md, "Step caching").
    #[arg(long, value_name = "SPEC", default_value_t = StrategyConfig::default().cache, value_parser = step_cache)]
    pub cache: crate::generate::StepCache,
}

/// A `--cache` value.
fn step_cache(text: &str) -> Result<crate::generate::StepCache, String> {
    text.parse()
}

impl StrategyArgs {
    /// The flags as overrides of the defaults.
    pub fn overrides(&self) -> StrategyOverrides {
        StrategyOverrides {
            strategy: Some(self.strategy),
            seeds: Some(match &self.seed_list {
                Some(list) => Seeds::List(list.clone()),
                None => Seeds::Count(self.seeds),
            }),
            probe_steps: Some(self.probe_steps),
            keep: self.keep,
            steps: Some(self.steps),
            seed: Some(self.seed),
            wave: Some(self.wave),
            target: Some(self.target),
            refine: self.refine,
            refine_strength: self.refine_strength,
            refine_keep_unchanged: self.refine_keep_unchanged.then_some(true),
            refine_best: self.refine_best,
            cache: Some(self.cache),
        }
    }

    /// The engine's strategy configuration, checked; errors name the flag.
    pub fn to_config(&self) -> Result<StrategyConfig, StrategyError> {
        // Zero counts are refused whichever strategy runs (`random` would read --seeds 0 as
        // its one candidate, early-filter alone would refuse --keep 0).
        let zero = [
            (
                StrategyField::Seeds,
                "--seeds",
                self.seeds == 0 && self.seed_list.is_none(),
            ),
            (
                StrategyField::ProbeSteps,
                "--probe-steps",
                self.probe_steps == 0,
            ),
            (StrategyField::Keep, "--keep", self.keep == Some(0)),
            (StrategyField::Wave, "--wave", self.wave == 0),
        ];
        if let Some((field, flag, _)) = zero.into_iter().find(|(_, _, zero)| *zero) {
            return Err(StrategyError {
                origin: ValueSource::Flags,
                field,
                message: format!("{flag} 0 must be at least 1"),
            });
        }
        let mut config = self.overrides().apply(&StrategyConfig::default());
        if let Some(budget) = self.budget_nfe {
            config = config
                .fit_to_budget(budget)
                .map_err(|message| StrategyError {
                    origin: ValueSource::Program,
                    field: StrategyField::Budget,
                    message: format!("--budget-nfe {budget}: {message}"),
                })?;
        }
        config.check(&ValueSource::Flags)?;
        Ok(config)
    }

    /// [`Self::to_config`] for a command that runs this one strategy (`edit`, `plan`,
    /// `demo`): the refine's own flags without `--refine` would change nothing there, so
    /// they are refused, naming the flag. (`batch`, `serve` and `eval` take them as the
    /// defaults of the items, requests and arms that ask for a refine.)
    pub fn to_single_config(&self) -> Result<StrategyConfig, StrategyError> {
        let config = self.to_config()?;
        if self.refine.is_none() {
            let given = [
                (
                    "--refine-strength",
                    StrategyField::RefineStrength,
                    self.refine_strength.is_some(),
                ),
                (
                    "--refine-keep-unchanged",
                    StrategyField::RefineKeepUnchanged,
                    self.refine_keep_unchanged,
                ),
                (
                    "--refine-best",
                    StrategyField::RefineBest,
                    self.refine_best.is_some(),
                ),
            ];
            if let Some((flag, field, _)) = given.into_iter().find(|(_, _, given)| *given) {
                return Err(StrategyError {
                    origin: ValueSource::Flags,
                    field,
                    message: format!(
                        "{flag} sets up the hi-res refine, which runs only with --refine WIDTH; \
                         add --refine (e.g. --refine 1024) or drop {flag}"
                    ),
                });
            }
        }
        Ok(config)
    }
}

/// Which generator backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GeneratorKind {
    /// FLUX.1 Fill when weights are named (--model-dir, --transformer, --random-weights)
    /// or --download is given, else the testbed.
    Auto,
    /// The built-in simulator (no weights; see docs/testbed.md).
    Testbed,
    /// FLUX.1 Fill [dev] + ICEdit LoRA in candle.
    Flux,
}

/// Generator selection and its options.
#[derive(Debug, Clone, Args)]
pub struct GeneratorArgs {
    /// Generator backend.
    #[arg(long, value_enum, default_value_t = GeneratorKind::Auto)]
    pub generator: GeneratorKind,
    /// FLUX.1 Fill weights: a diffusers folder, a Hugging Face cache snapshot, or a folder
    /// holding flux1-fill-dev.safetensors + ae.safetensors.
    #[arg(long, env = "ICEDIT_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// FLUX transformer file overriding the folder's (BFL flux1-fill-dev.safetensors or a
    /// diffusers file).
    #[arg(long)]
    pub transformer: Option<PathBuf>,
    /// Autoencoder file overriding the folder's (BFL ae.safetensors or a diffusers file).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ (default: the
    /// model folder); needed with BFL single files.
    #[arg(long)]
    pub text_encoders: Option<PathBuf>,
    /// T5 tokens the prompt is padded or truncated to (1 to 512, FLUX's T5 length).
    #[arg(long, default_value_t = 512, value_parser = bounded(1, 512))]
    pub t5_tokens: usize,
    /// Keep T5 and CLIP loaded between edits (faster batches, ~10 GB more memory in bf16).
    #[arg(long)]
    pub keep_text_encoders: bool,
    /// ICEdit LoRA: a file (plain or MoE, detected from its keys), a folder or Hugging Face
    /// cache entry holding one, or `icedit` / `icedit-moe` (the released LoRAs, from the
    /// Hugging Face cache).
    #[arg(long, env = "ICEDIT_LORA")]
    pub lora: Option<PathBuf>,
    /// LoRA strength (-4 to 4; 1 = as trained).
    #[arg(long, default_value_t = 1.0, value_parser = lora_scale)]
    pub lora_scale: f64,
    /// Weight dtype: f32, f16 or bf16 (bf16 default on GPU, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Device: cpu, cuda[:N] or metal (GPU devices need the matching cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Quantize the FLUX transformer's linear weights as they are read: a ggml type (q8_0,
    /// q5_1, q5_0, q4_1, q4_0, q6_k, q5_k, q4_k, q3_k, q2_k) or fp8 (e4m3, one scale per
    /// tensor); a plain LoRA is merged first. It applies to dense weights: a GGUF or fp8
    /// --transformer is held as stored, and --quantize to another format is refused there.
    #[arg(long, value_parser = quantized_format, conflicts_with = "dequantize")]
    pub quantize: Option<crate::models::flux::held_weight::WeightFormat>,
    /// Hold a GGUF or fp8 transformer dequantized to --dtype (more memory, faster steps,
    /// the LoRA merged instead of run beside the weights).
    #[arg(long)]
    pub dequantize: bool,
    /// Where T5 and CLIP encode the prompt (default: --device). `cpu` keeps T5-XXL (~9.5 GB
    /// in bf16) off the GPU; the states move to --device.
    #[arg(long)]
    pub text_device: Option<String>,
    /// Distilled guidance value (0 to 100; ICEdit uses 50).
    #[arg(long, default_value_t = 50.0, value_parser = guidance)]
    pub guidance: f64,
    /// Run FLUX with random weights at the `full` (FLUX.1 Fill, 12B) or `small`
    /// configuration instead of loading any (speed and memory runs without a download; the
    /// prompt's text states are random too, so the images mean nothing).
    #[arg(long, value_parser = ["full", "small"], conflicts_with_all = ["model_dir", "transformer"])]
    pub random_weights: Option<String>,
    /// A T5 encoder weight file instead of the folder's `text_encoder_2/` weights: a GGUF
    /// file (e.g. a quantized t5-v1_1-xxl encoder; llama.cpp or transformers tensor names) or
    /// safetensors. Config and tokenizer still come from the folder.
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// TAEF1, the tiny FLUX decoder (a file, a diffusers folder, a Hugging Face cache entry or
    /// `madebyollin/taef1` from the cache): decodes `serve`'s live per-step previews, and
    /// screening previews with --preview-decoder tiny. Final images always use the FLUX AE.
    #[arg(long)]
    pub tiny_decoder: Option<PathBuf>,
    /// Decoder of the previews the judge screens: `full` (the FLUX AE: what the final
    /// decode would show) or `tiny` (TAEF1: much cheaper; needs --tiny-decoder).
    #[arg(long, default_value = "full", value_parser = ["full", "tiny"], requires_if("tiny", "tiny_decoder"))]
    pub preview_decoder: String,
    /// Tile the VAE passes (diptych encode, decodes, the refine's) larger than --vae-tile,
    /// as diffusers' enable_tiling(): `auto` tiles them only when the memory plan says the
    /// untiled passes would not fit; `on`; `off` (FluxFillPipeline's untiled passes). Tiled
    /// passes approximate the whole-image pass near the tile seams.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub vae_tiling: String,
    /// VAE tile side in pixels, a multiple of 32 (default: the VAE config's sample_size,
    /// 1024 for FLUX); smaller tiles need less memory and blend more seams.
    #[arg(long, value_parser = bounded(32, 8192))]
    pub vae_tile: Option<usize>,
    /// Candidates per transformer forward (1 to 64; each adds its attention maps).
    #[arg(long, default_value_t = 4, value_parser = bounded(1, 64))]
    pub batch_size: usize,
    /// Memory the FLUX run may use, in GB (default: what the device has free now). The
    /// memory plan is checked against it before anything loads.
    #[arg(long, value_parser = memory_budget)]
    pub memory_budget: Option<f64>,
    /// Host memory T5 and CLIP may use when they encode on the CPU beside a GPU generator
    /// (`--text-device cpu`: f32, ~19.5 GB for FLUX's), in GB (default: what the host has
    /// available now, MemAvailable). Checked before anything loads.
    #[arg(long, value_parser = memory_budget)]
    pub host_memory_budget: Option<f64>,
    /// Testbed difficulty (0 = the correct outcome dominates, 1 = failures dominate)
    /// [default: 0.5].
    #[arg(long, value_parser = unit_interval)]
    pub testbed_difficulty: Option<f32>,
    /// Testbed outcome contrast: how early a seed's outcome is decided, so how often early
    /// previews name it. A preset (sharp, soft, loose) or a number in (0, 1]
    /// [default: sharp].
    #[arg(long, value_parser = outcome_contrast)]
    pub testbed_contrast: Option<f32>,
}

impl GeneratorArgs {
    /// `--testbed-difficulty`, or its default.
    pub fn testbed_difficulty(&self) -> f32 {
        self.testbed_difficulty
            .unwrap_or(TestbedConfig::default().difficulty)
    }

    /// `--testbed-contrast`, or its default (`sharp`).
    pub fn testbed_contrast(&self) -> f32 {
        self.testbed_contrast
            .unwrap_or(TestbedConfig::default().contrast)
    }

    /// The FLUX flags that were given (or, for those with a default, given another value),
    /// by name: the testbed refuses them, since they would change nothing there.
    pub fn flux_flags_given(&self) -> Vec<&'static str> {
        let defaults = Self::defaults();
        flags_given([
            ("--model-dir", self.model_dir.is_some()),
            ("--transformer", self.transformer.is_some()),
            ("--vae", self.vae.is_some()),
            ("--text-encoders", self.text_encoders.is_some()),
            ("--t5", self.t5.is_some()),
            (
                if std::env::var_os("ICEDIT_LORA").is_some() {
                    "--lora (ICEDIT_LORA)"
                } else {
                    "--lora"
                },
                self.lora.is_some(),
            ),
            ("--lora-scale", self.lora_scale != defaults.lora_scale),
            ("--dtype", self.dtype.is_some()),
            ("--device", self.device != defaults.device),
            ("--text-device", self.text_device.is_some()),
            ("--quantize", self.quantize.is_some()),
            ("--dequantize", self.dequantize),
            ("--random-weights", self.random_weights.is_some()),
            ("--t5-tokens", self.t5_tokens != defaults.t5_tokens),
            ("--keep-text-encoders", self.keep_text_encoders),
            ("--guidance", self.guidance != defaults.guidance),
            ("--tiny-decoder", self.tiny_decoder.is_some()),
            (
                "--preview-decoder",
                self.preview_decoder != defaults.preview_decoder,
            ),
            ("--vae-tiling", self.vae_tiling != defaults.vae_tiling),
            ("--vae-tile", self.vae_tile.is_some()),
            ("--memory-budget", self.memory_budget.is_some()),
            ("--host-memory-budget", self.host_memory_budget.is_some()),
        ])
    }

    /// The flags' defaults, as clap sets them.
    fn defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            generator: GeneratorArgs,
        }
        Only::parse_from(["icedit-scale"]).generator
    }

    /// The testbed's flags that were given, by name (a FLUX run refuses them: they would
    /// change nothing there).
    pub fn testbed_flags_given(&self) -> Vec<&'static str> {
        flags_given([
            ("--testbed-difficulty", self.testbed_difficulty.is_some()),
            ("--testbed-contrast", self.testbed_contrast.is_some()),
        ])
    }
}

/// The names of the flags whose `given` is true, in order: how a command lists the flags it
/// refuses in one message.
pub fn flags_given<const N: usize>(flags: [(&'static str, bool); N]) -> Vec<&'static str> {
    flags
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
}

/// Judge selection and its options.
#[derive(Debug, Clone, Args)]
pub struct JudgeArgs {
    /// `testbed` (the built-in oracle, the default), `none`, or a preset file from judges/
    /// (remote API, local Qwen-VL, reward model, composite).
    #[arg(long)]
    pub judge: Option<String>,
    /// Judge calls in flight at once, 1 to 256 (default: the preset's max_concurrency).
    #[arg(long, value_parser = bounded(1, MAX_CONCURRENCY))]
    pub judge_concurrency: Option<usize>,
    /// Seed of the built-in testbed judge's error model [default: 0].
    #[arg(long)]
    pub judge_seed: Option<u64>,
}

impl JudgeArgs {
    /// The judge when `--judge` is not given.
    pub const DEFAULT_JUDGE: &'static str = "testbed";
}

/// What every command that runs edits builds: a generator, a judge, and whether missing
/// weights are fetched first.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub generator: GeneratorArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub judge: JudgeArgs,
    /// Fetch what is missing from the Hugging Face Hub first: FLUX.1 Fill when no weights
    /// are named, the ICEdit LoRA when none is, a local judge's checkpoint.
    #[arg(long)]
    pub download: bool,
    /// Load weight files that hold tensors no model part reads (each is logged) instead of
    /// refusing them; for experiments with checkpoints of another layout.
    #[arg(long)]
    pub allow_unused_weights: bool,
}

/// `edit`: one image, one instruction.
#[derive(Debug, Clone, Args)]
pub struct EditArgs {
    /// Source image (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The edit instruction, e.g. "make the sky night".
    #[arg(long)]
    pub instruction: Option<String>,
    /// Panel width the source is resized to (multiple of 16).
    #[arg(long, default_value_t = crate::edit::DEFAULT_PANEL_WIDTH, value_parser = panel_width)]
    pub width: u32,
    /// Output folder.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Safetensors file whose `latents` tensor holds initial latents for the first
    /// candidates (reproduces another run exactly).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub strategy: StrategyArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub engine: EngineArgs,
}

/// `demo`: the testbed end to end.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Seed of the generated scene and instruction.
    #[arg(long, default_value_t = 1)]
    pub scene_seed: u64,
    /// Panel width of the scene.
    #[arg(long, default_value_t = crate::edit::DEFAULT_PANEL_WIDTH, value_parser = panel_width)]
    pub width: u32,
    /// Output folder.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub strategy: StrategyArgs,
    /// Testbed difficulty (0 = the correct outcome dominates, 1 = failures dominate).
    #[arg(long, alias = "testbed-difficulty", default_value_t = 0.5, value_parser = unit_interval)]
    pub difficulty: f32,
    /// Testbed outcome contrast: how early a seed's outcome is decided, so how often early
    /// previews name it. A preset (sharp, soft, loose) or a number in (0, 1].
    #[arg(long, alias = "testbed-contrast", default_value = "sharp", value_parser = outcome_contrast)]
    pub contrast: f32,
    /// Seed of the testbed judge's error model.
    #[arg(long, default_value_t = 0)]
    pub judge_seed: u64,
}

/// `serve`: the HTTP server.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (`127.0.0.1:0` picks a free port; the bound one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,
    /// Folder of the journal and every edit's outputs; restarting with the same folder
    /// runs again what was accepted and had not ended.
    #[arg(long, default_value = "serve-out")]
    pub out: PathBuf,
    /// Generator devices, comma-separated (`cuda:0,cuda:1`): one generator worker, each
    /// with its own model, per entry, all behind one queue (default: --device). The
    /// testbed takes `cpu` entries, one worker each.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// Edits waiting for a worker beyond which requests get 429 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = bounded(1, 100_000))]
    pub max_queue: usize,
    /// Edits each worker runs at once (2 lets the generator work while judges think).
    #[arg(long, default_value_t = 2, value_parser = bounded(1, 64))]
    pub in_flight: usize,
    /// Largest uploaded image in MB (413 beyond).
    #[arg(long, default_value_t = 20, value_parser = bounded(1, 1024))]
    pub max_upload_mb: usize,
    /// Largest decoded image in megapixels (413 beyond).
    #[arg(long, default_value_t = 50, value_parser = bounded(1, 1024))]
    pub max_megapixels: usize,
    /// Most seed candidates one request may ask for.
    #[arg(long, default_value_t = 32, value_parser = bounded(1, 1024))]
    pub max_seeds: usize,
    /// Most steps one request may ask for.
    #[arg(long, default_value_t = 100, value_parser = bounded(1, 10_000_000))]
    pub max_steps: usize,
    /// Longest instruction (`prompt`) in characters (400 beyond).
    #[arg(long, default_value_t = 2000, value_parser = bounded(1, 1_000_000))]
    pub max_prompt_chars: usize,
    /// Uploaded images decoded at once (each decode holds the image's pixels); more wait.
    #[arg(long, default_value_t = 2, value_parser = bounded(1, 64))]
    pub max_decodes: usize,
    /// Widest hi-res refine a request may ask for (`size` wider than 512, or `refine`),
    /// planned at start-up as a square panel of that width: the memory plan covers it (VAE
    /// tiling included) and a request whose refine has more pixels is refused; 0 refuses
    /// refines.
    #[arg(long, default_value_t = 1024, value_parser = max_refine)]
    pub max_refine: u32,
    /// Connections open at once; one more is answered 503.
    #[arg(long, default_value_t = 128, value_parser = bounded(1, 100_000))]
    pub max_connections: usize,
    /// Seconds a request head may take from its first byte (the connection is closed).
    #[arg(long, default_value_t = 10.0, value_parser = timeout_seconds)]
    pub header_timeout_s: f64,
    /// Seconds a request body may take from its head (408 and the connection is closed).
    #[arg(long, default_value_t = 120.0, value_parser = timeout_seconds)]
    pub body_timeout_s: f64,
    /// Seconds a connection may stay open with no request in flight.
    #[arg(long, default_value_t = 60.0, value_parser = timeout_seconds)]
    pub idle_timeout_s: f64,
    /// On SIGTERM / Ctrl-C, seconds the running edits are waited for; those still running
    /// then are journaled as interrupted and run again at the next start (0: at once).
    #[arg(long, default_value_t = 25.0, value_parser = deadline_seconds)]
    pub shutdown_deadline_s: f64,
    /// Environment variable holding the bearer token clients must send [default:
    /// ICEDIT_SERVE_TOKEN, optional]. A variable named here must be set and not blank, and
    /// ICEDIT_SERVE_TOKEN set blank is refused: the server never runs open by accident. The
    /// token is never logged.
    #[arg(long)]
    pub token_env: Option<String>,
    /// Serve an address other than loopback without a token (a private network, or a
    /// proxy that authenticates); refused otherwise.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// The address clients reach the server by (`https://edits.example.org`: the root of
    /// its host, docs/serve.md), for `url` answers [default: http:// and the address bound].
    #[arg(long)]
    pub public_url: Option<String>,
    /// Defaults of requests that do not set them.
    #[command(flatten)]
    #[allow(missing_docs)]
    pub strategy: StrategyArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub engine: EngineArgs,
}

/// `batch`: many edits from a manifest.
#[derive(Debug, Clone, Args)]
pub struct BatchArgs {
    /// JSONL manifest: one {"id", "image", "instruction", [seeds, strategy, probe_steps,
    /// keep, steps]} per line.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Folder image paths are relative to (default: the manifest's folder).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Output folder: items/<id>/, summary.jsonl, summary.md.
    #[arg(long)]
    pub out: PathBuf,
    /// `i/n` to run shard i of n, or `auto` (Slurm array / Kubernetes indexed Job).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Edits in flight at once (1 to 256); 2 or more lets the generator work while judges
    /// think.
    #[arg(long, default_value_t = 2, value_parser = bounded(1, 256))]
    pub queue: usize,
    /// Panel width the sources are resized to.
    #[arg(long, default_value_t = crate::edit::DEFAULT_PANEL_WIDTH, value_parser = panel_width)]
    pub width: u32,
    /// Mean compute budget per item in NFE (a cached forward counted as one; hi-res refine
    /// forwards outside it): the batch spends at most items x B; fixed strategies are sized
    /// to B, adaptive items spend less on easy edits and more on hard.
    #[arg(long, conflicts_with = "budget_nfe", value_parser = bounded(1, 10_000_000))]
    pub budget_nfe_mean: Option<usize>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub strategy: StrategyArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub engine: EngineArgs,
}

/// `merge`: combine shard outputs.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Output folder of the merged summary.
    #[arg(long)]
    pub out: PathBuf,
    /// The shards' output folders.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

/// `eval`: a suite of strategy arms over a dataset, with statistics.
#[derive(Debug, Clone, Args)]
// The suite names its judges: `--judge` and `--judge-seed` stay parsed so the refusal can
// name them, but are kept out of eval's help, whose `--judge-concurrency` default is eval's.
#[command(
    mut_arg("judge", |a| a.hide(true)),
    mut_arg("judge_seed", |a| a.hide(true)),
    mut_arg("judge_concurrency", |a| a.help(
        "Judge calls in flight at once for each of the suite's judges, 1 to 256 (default 8)"
    ))
)]
pub struct EvalArgs {
    /// Suite file (TOML), e.g. eval/testbed-small.toml.
    #[arg(long)]
    pub suite: PathBuf,
    /// Output folder: results.jsonl (durable, resumable), results.json, report.md, score_vs_nfe.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Only rebuild the report from the stored results.
    #[arg(long)]
    pub report_only: bool,
    /// Mean compute budget per item in NFE for every arm (replaces the suite's
    /// `budget_nfe_mean`; a cached forward counted as one, hi-res refine forwards outside
    /// it): fixed strategies sized to it, adaptive arms sharing items x B.
    #[arg(long, value_parser = bounded(1, 10_000_000))]
    pub budget_nfe_mean: Option<usize>,
    /// The generator, and how the suite's judges run: `--judge-concurrency` (default 8
    /// for eval) applies to both; `--judge` and `--judge-seed` are refused (the suite names
    /// its judges).
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `judge-eval`: a judge's agreement with human preferences and ratings.
#[derive(Debug, Clone, Args)]
// The shared `--judge` help offers `none`, which judge-eval refuses (it measures a judge).
#[command(mut_arg("judge", |arg| arg.help(
    "The judge to measure: `testbed` (the built-in oracle, the default) or a preset file from judges/ (remote API, local Qwen-VL, reward model, composite)"
)))]
pub struct JudgeEvalArgs {
    /// Labelled data, repeatable: a JSONL file of pairs (`source`, `instruction`, `edit_a`,
    /// `edit_b`, `preference` a|b|tie) and ratings (`source`, `instruction`, `edit`,
    /// `score`); `genai-bench:PATH`, `editreward-bench:PATH` (their parquet files or
    /// folders), `imagenhub:DIR` (rater TSVs with the images); or `testbed[:N]` (N synthetic
    /// pairs and N ratings with known truth; 100).
    #[arg(long, required = true)]
    pub data: Vec<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub judge: JudgeArgs,
    /// Output folder: judgements.jsonl (durable, resumable), results.json, report.md.
    #[arg(long, default_value = "out/judge-eval")]
    pub out: PathBuf,
    /// Panel width sources are resized to (edits are resized to their source's panel).
    #[arg(long, default_value_t = crate::edit::DEFAULT_PANEL_WIDTH, value_parser = panel_width)]
    pub width: u32,
    /// Judge at most this many items, the same subset on every machine (hash of the ids); a
    /// group of pairs (EditReward-Bench) is kept or left whole.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Bootstrap resamples behind each interval (100 to 100000).
    #[arg(long, default_value_t = 2000, value_parser = bounded(100, 100_000))]
    pub resamples: usize,
    /// Only rebuild the report from the stored judgements.
    #[arg(long)]
    pub report_only: bool,
    /// Fetch a local judge's checkpoint from the Hugging Face Hub first.
    #[arg(long)]
    pub download: bool,
    /// Load judge weights that hold tensors the model does not read (each is logged)
    /// instead of refusing them.
    #[arg(long)]
    pub allow_unused_weights: bool,
}

/// `study`: strategies compared on testbed edits with ground truth.
#[derive(Debug, Clone, Args)]
// The shared strategy flags that study refuses (it runs its own set) are kept out of its
// help; they stay parsed so the refusal can name them.
#[command(
    mut_arg("strategy", |a| a.hide(true)),
    mut_arg("seed_list", |a| a.hide(true)),
    mut_arg("budget_nfe", |a| a.hide(true)),
    mut_arg("refine", |a| a.hide(true)),
    mut_arg("refine_strength", |a| a.hide(true)),
    mut_arg("refine_keep_unchanged", |a| a.hide(true)),
    mut_arg("refine_best", |a| a.hide(true)),
    mut_arg("cache", |a| a.hide(true))
)]
pub struct StudyArgs {
    /// Number of testbed edits (1 to 100000).
    #[arg(long, default_value_t = 200, value_parser = bounded(1, 100_000))]
    pub edits: usize,
    /// First scene seed.
    #[arg(long, default_value_t = 1000)]
    pub first_scene: u64,
    /// Panel width.
    #[arg(long, default_value_t = crate::edit::DEFAULT_PANEL_WIDTH, value_parser = panel_width)]
    pub width: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub strategy: StrategyArgs,
    /// Testbed difficulty (0 to 1).
    #[arg(long, default_value_t = 0.5, value_parser = unit_interval)]
    pub difficulty: f32,
    /// Testbed outcome contrast: how early a seed's outcome is decided, so how often early
    /// previews name it. A preset (sharp, soft, loose) or a number in (0, 1].
    #[arg(long, default_value = "sharp", value_parser = outcome_contrast)]
    pub contrast: f32,
    /// Seed of the judge's error model.
    #[arg(long, default_value_t = 0)]
    pub judge_seed: u64,
    /// Where to write study.json and study.md.
    #[arg(long, default_value = "out/study")]
    pub out: PathBuf,
}

/// A count between `lo` and `hi`; clap names the flag and the value, the message the bound.
/// `--max-refine`: 0, or a refine width (a multiple of 16 above the 512 edit, at most 1536).
fn max_refine(text: &str) -> Result<u32, String> {
    let width: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a width in pixels"))?;
    let edit = crate::edit::DEFAULT_PANEL_WIDTH;
    if width == 0
        || (width > edit
            && width.is_multiple_of(16)
            && width <= crate::edit::diptych::MAX_PANEL_SIDE)
    {
        Ok(width)
    } else {
        Err(format!(
            "{width}: give 0 (no refines) or a multiple of 16 above {edit} and at most {}",
            crate::edit::diptych::MAX_PANEL_SIDE
        ))
    }
}

fn bounded(lo: usize, hi: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |text| {
        let n: usize = text
            .trim()
            .parse()
            .map_err(|_| format!("expected a whole number between {lo} and {hi}"))?;
        if (lo..=hi).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is not between {lo} and {hi}"))
        }
    }
}

/// A finite number in `lo..=hi`.
fn finite_in(text: &str, lo: f64, hi: f64, why: &str) -> Result<f64, String> {
    let x: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a number between {lo} and {hi}"))?;
    if x.is_finite() && (lo..=hi).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{x} is not between {lo} and {hi} ({why})"))
    }
}

/// A panel width: a multiple of 16 up to [`crate::edit::MAX_PANEL_SIDE`].
fn panel_width(text: &str) -> Result<u32, String> {
    let w: u32 = text
        .trim()
        .parse()
        .map_err(|_| "expected a whole number of pixels".to_string())?;
    match crate::edit::panel_width_error(w) {
        Some(reason) => Err(reason),
        None => Ok(w),
    }
}

/// A panel side for the FLUX bench (the same rule as a panel width).
fn panel_side(text: &str) -> Result<usize, String> {
    panel_width(text).map(|w| w as usize)
}

/// A transformer weight format for `bench flux`: dense, or quantized to a ggml type.
fn weight_format(text: &str) -> Result<crate::models::flux::held_weight::WeightFormat, String> {
    text.parse()
}

/// A `--quantize` value: fp8 or a ggml type (dense is `--dequantize`, or no flag).
fn quantized_format(text: &str) -> Result<crate::models::flux::held_weight::WeightFormat, String> {
    use crate::models::flux::held_weight::WeightFormat;
    if text.trim().eq_ignore_ascii_case("dense") {
        return Err("`dense` is not a quantization; leave --quantize out".into());
    }
    match text.parse::<WeightFormat>() {
        Ok(format) => Ok(format),
        // The format parser also knows `dense`; --quantize does not take it.
        Err(e) => Err(e.replace(" (or dense, fp8)", " (or fp8)")),
    }
}

fn unit_interval(text: &str) -> Result<f32, String> {
    finite_in(text, 0.0, 1.0, "0 and 1 are the extremes").map(|x| x as f32)
}

/// A testbed outcome contrast: a preset name or a number in (0, 1].
fn outcome_contrast(text: &str) -> Result<f32, String> {
    crate::generate::testbed::PreviewReliability::parse_contrast(text)
}

/// A refine strength: above 0, at most 1.
fn strength(text: &str) -> Result<f64, String> {
    let x = finite_in(text, 0.0, 1.0, "the share of the schedule re-run")?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err("0 would re-run nothing; give a strength above 0".into())
    }
}

/// A server timeout: above 0, at most a day.
fn timeout_seconds(text: &str) -> Result<f64, String> {
    let x = finite_in(text, 0.0, 86_400.0, "seconds")?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err("0 would close every connection at once; give seconds above 0".into())
    }
}

/// The shutdown deadline: 0 (interrupt at once) to a day.
fn deadline_seconds(text: &str) -> Result<f64, String> {
    finite_in(text, 0.0, 86_400.0, "seconds")
}

/// Seconds of a cost model or latency: 0 to an hour.
fn seconds(text: &str) -> Result<f64, String> {
    finite_in(text, 0.0, 3600.0, "seconds")
}

/// The bench time scale: above 0 (else nothing is timed), at most 1 (real time).
fn time_scale(text: &str) -> Result<f64, String> {
    let x = finite_in(text, 0.0, 1.0, "1 runs in real time")?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err("0 would time nothing; give a scale above 0".into())
    }
}

/// FLUX's distilled guidance: ICEdit uses 50; beyond 100 is far outside what FLUX.1 [dev]
/// was distilled on.
fn guidance(text: &str) -> Result<f64, String> {
    finite_in(
        text,
        0.0,
        100.0,
        "FLUX.1 [dev]'s distilled guidance range; ICEdit uses 50",
    )
}

/// LoRA strength: 1 is as trained; beyond 4 the adapter's change swamps the base model.
fn lora_scale(text: &str) -> Result<f64, String> {
    finite_in(text, -4.0, 4.0, "1 = as trained")
}

/// A memory budget in GB: positive and finite.
fn memory_budget(text: &str) -> Result<f64, String> {
    finite_in(text, 1e-6, 1e6, "gigabytes the run may use")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_strategy_knob_is_a_flag_of_the_commands_that_edit() {
        let cli = Cli::command();
        for name in ["edit", "batch", "serve", "demo", "study"] {
            let command = cli.find_subcommand(name).expect(name);
            let flags: Vec<String> = command
                .get_arguments()
                .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
                .collect();
            for field in StrategyField::ALL {
                assert!(
                    flags.iter().any(|f| f == field.flag()),
                    "{name} has no {}",
                    field.flag()
                );
            }
        }
    }

    /// study's help lists only the strategy flags it reads: those it refuses are hidden.
    #[test]
    fn study_help_hides_the_strategy_flags_it_refuses() {
        let cli = Cli::command();
        let study = cli.find_subcommand("study").unwrap();
        let shown: Vec<&str> = study
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .collect();
        for refused in ["strategy", "seed-list", "budget-nfe", "refine", "cache"] {
            assert!(!shown.contains(&refused), "--{refused} in {shown:?}");
        }
        for read in ["seeds", "probe-steps", "keep", "steps"] {
            assert!(shown.contains(&read), "--{read} not in {shown:?}");
        }
    }

    /// eval's suite names its judges: its help hides `--judge` and `--judge-seed` (which
    /// it refuses) and gives its own `--judge-concurrency` default.
    #[test]
    fn eval_help_hides_the_judge_flags_it_refuses() {
        let cli = Cli::command();
        let eval = cli.find_subcommand("eval").unwrap();
        let shown: Vec<&str> = eval
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .collect();
        for refused in ["judge", "judge-seed"] {
            assert!(!shown.contains(&refused), "--{refused} in {shown:?}");
        }
        let concurrency = eval
            .get_arguments()
            .find(|a| a.get_long() == Some("judge-concurrency"))
            .unwrap();
        let help = concurrency.get_help().unwrap().to_string();
        assert!(help.contains("default 8"), "{help}");
    }

    /// judge-eval measures a judge, so its help does not offer `--judge none` (which it
    /// refuses); the commands that edit still do.
    #[test]
    fn only_the_commands_that_edit_offer_judge_none() {
        let cli = Cli::command();
        let judge_help = |name: &str| {
            let command = cli.find_subcommand(name).expect(name);
            let judge = command
                .get_arguments()
                .find(|a| a.get_long() == Some("judge"))
                .expect("--judge");
            judge.get_help().expect("help").to_string()
        };
        assert!(!judge_help("judge-eval").contains("`none`"));
        assert!(judge_help("edit").contains("`none`"));
    }

    /// `--version` says what the binary was built for, so a report or a bug names it: the
    /// CPU always, CUDA with its kernels' target only in a `cuda` build.
    #[test]
    fn the_version_names_the_devices_the_build_has() {
        let text = Cli::command().render_version();
        let expected = format!("icedit-scale {} (cpu", env!("CARGO_PKG_VERSION"));
        assert!(text.starts_with(&expected), "{text}");
        assert_eq!(
            text.contains("cuda (kernels for sm_"),
            cfg!(feature = "cuda"),
            "{text}"
        );
        assert_eq!(text.contains("cudnn"), cfg!(feature = "cudnn"), "{text}");
    }
}
