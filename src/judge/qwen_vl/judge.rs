//! The local judge: a Qwen2-VL / Qwen2.5-VL checkpoint behind the engine's [`Judge`] trait.
//!
//! By default no free text is generated. The reply is primed with the start of the JSON the
//! prompt asks for and the answer is read off the next-token distribution:
//!
//! | call | primed with | read |
//! |---|---|---|
//! | screen | `{"score": ` | expected 0-10 score, then `<best>, "pass":` → P(` true`) |
//! | compare | `{"better": ` | P(`1`), P(`2`), P(`0`) |
//! | VIE pair | `{"score": [` | expected first score, then `<best>, ` → expected second |
//!
//! With `reasoning = true` the model instead writes its whole JSON reply greedily (KV
//! cache), which is parsed like a remote judge's.
//!
//! The model lives on one worker thread, loaded on the first call (so a run that encodes
//! its prompts first has dropped the generator's text encoders by then). Calls that arrive
//! together and tokenize to the same length (the previews of one edit) share one batched
//! prefill.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::answer::{choose, score_summary, Choice};
use crate::edit::EditContext;
use crate::hub::{self, HubSettings};
use crate::judge::parse;
use crate::judge::preset::{FieldCheck, MAX_CONCURRENCY};
use crate::judge::prompts::PromptSet;
use crate::judge::{
    CallUsage, Comparison, Judge, JudgeError, Preference, PreviewStage, ScreenVerdict, SubScores,
};
use crate::models::qwen_vl::model::{EncodedPrompt, PromptState, Qwen2Vl, Sampling};
use crate::models::qwen_vl::ChatFormat;
use crate::models::qwen_vl::{PeftAdapter, Qwen2VlFiles};
use crate::models::weight_use::UnusedWeights;

/// A preset file (`judges/qwen2-vl-*-local.toml`) for this backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalJudgeConfig {
    /// Display name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// Calls in flight at once (read by the engine); also bounds a batch.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// Hub id (`Qwen/Qwen2-VL-7B-Instruct`), looked up in the Hugging Face cache when
    /// `model_dir` is not given.
    #[serde(default)]
    pub model: Option<String>,
    /// A checkpoint folder or a cache entry; relative to the preset file.
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N` or `metal` (read by the caller).
    #[serde(default = "defaults::device")]
    pub device: String,
    /// `bf16`, `f16` or `f32`; default bf16 on GPUs and f32 on the CPU (read by the caller).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Prompts per batched prefill.
    #[serde(default = "defaults::max_batch")]
    pub max_batch: usize,
    /// How long the worker waits for more calls to batch with the first, milliseconds.
    #[serde(default = "defaults::batch_window_ms")]
    pub batch_window_ms: u64,
    /// Generate the JSON reply with reasoning instead of reading probabilities.
    #[serde(default)]
    pub reasoning: bool,
    /// Token limit of a generated reply.
    #[serde(default = "defaults::max_new_tokens")]
    pub max_new_tokens: usize,
    /// Caps the pixels per image (below the checkpoint's `max_pixels`) to bound memory.
    #[serde(default)]
    pub max_pixels: Option<usize>,
    /// A screened preview passes when P(pass) is at least this.
    #[serde(default = "defaults::pass_threshold")]
    pub pass_threshold: f32,
    /// The least probability the answer tokens must carry together; below it the model is
    /// not answering the question and the call fails rather than guess.
    #[serde(default = "defaults::min_answer_mass")]
    pub min_answer_mass: f32,
    /// Folder overriding the embedded prompts; relative to the preset file.
    #[serde(default)]
    pub prompts_dir: Option<PathBuf>,
    /// A peft LoRA adapter merged into the weights at load: a folder (relative to the
    /// preset file; a Hugging Face cache entry works too) or a Hub id found in the cache.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Multiplies the adapter's merge scale (1 = as trained, 0 = the base model).
    #[serde(default = "defaults::adapter_scale")]
    pub adapter_scale: f32,
    /// A Jinja chat template (file, relative to the preset) used instead of the
    /// checkpoint's: for judges trained on a hand-written prompt layout (EditScore).
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// The top of the scale the VIE prompts ask for (10; EditScore asks for 0-25). Scores
    /// are mapped to 0-10 by dividing by `score_range / 10`, as EditScore does.
    #[serde(default = "defaults::score_range")]
    pub score_range: u32,
    /// The reply's opening up to the first VIE score, when scores are read from
    /// probabilities (`reasoning = false`).
    #[serde(default = "defaults::score_prime")]
    pub score_prime: String,
    /// How a preview is screened: `"prompt"` (the screening prompt) or
    /// `"semantic_consistency"` (the VIE SC prompt; passes when SC >= `screen_pass_score`),
    /// for judges trained only on the VIE prompts.
    #[serde(default)]
    pub screen_by: ScreenBy,
    /// The SC (0-10) a preview needs to pass with `screen_by = "semantic_consistency"`.
    #[serde(default = "defaults::screen_pass_score")]
    pub screen_pass_score: f32,
    /// How two edits are compared: `"prompt"` (the comparison prompt) or `"overall"` (VIE
    /// O of each; the higher wins, equal is a tie).
    #[serde(default)]
    pub compare_by: CompareBy,
    /// Answers per VIE call, averaged (a self-ensemble; EditScore's `num_pass`): needs
    /// sampled generation (`reasoning = true`, `temperature` > 0), pass i seeded `seed + i`.
    #[serde(default = "defaults::passes")]
    pub passes: usize,
    /// Sampling temperature of generated replies; 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[serde(default = "defaults::top_p")]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[serde(default)]
    pub top_k: usize,
    /// Seed of pass 0's sampling.
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Load a checkpoint (or adapter) holding tensors the model never reads, logging them,
    /// instead of refusing it (`--allow-unused-weights`; for experiments).
    #[serde(default)]
    pub allow_unused_weights: bool,
}

/// How the local judge screens a preview.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScreenBy {
    /// The screening prompt (score and pass verdict).
    #[default]
    Prompt,
    /// The VIE semantic-consistency prompt on [source, preview].
    SemanticConsistency,
}

/// How the local judge compares two edits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompareBy {
    /// The comparison prompt (both edits and the source in one call).
    #[default]
    Prompt,
    /// VIE O of each edit (four calls).
    Overall,
}

mod defaults {
    pub fn device() -> String {
        "cuda".into()
    }
    pub fn max_batch() -> usize {
        8
    }
    pub fn batch_window_ms() -> u64 {
        20
    }
    pub fn max_new_tokens() -> usize {
        256
    }
    pub fn pass_threshold() -> f32 {
        0.5
    }
    pub fn min_answer_mass() -> f32 {
        0.5
    }
    pub fn adapter_scale() -> f32 {
        1.0
    }
    pub fn score_range() -> u32 {
        10
    }
    pub fn score_prime() -> String {
        "{\"score\": [".into()
    }
    pub fn screen_pass_score() -> f32 {
        5.0
    }
    pub fn passes() -> usize {
        1
    }
    pub fn top_p() -> f32 {
        1.0
    }
    pub fn seed() -> u64 {
        42
    }
}

impl LocalJudgeConfig {
    /// The preset as read from the file at `path`, its relative folders resolved against
    /// the file's folder and its fields checked.
    pub fn resolve(self, path: &Path) -> Result<Self, JudgeError> {
        let mut config = self;
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in [
            &mut config.model_dir,
            &mut config.prompts_dir,
            &mut config.chat_template,
        ]
        .into_iter()
        .flatten()
        {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        if let Some(adapter) = &mut config.adapter {
            let local = base.join(&*adapter);
            if local.exists() {
                *adapter = local.to_string_lossy().into_owned();
            }
        }
        if config.model_dir.is_none() && config.model.is_none() {
            return Err(JudgeError::Config(format!(
                "judge preset {}: give `model` (a Hub id) or `model_dir`",
                path.display()
            )));
        }
        config.check(path)?;
        Ok(config)
    }

    /// Refuses values that cannot work, naming the field and the bound.
    pub fn check(&self, path: &Path) -> Result<(), JudgeError> {
        let c = FieldCheck::new(path);
        c.within_opt(
            "max_concurrency",
            self.max_concurrency,
            1,
            MAX_CONCURRENCY,
            "calls in flight; 0 would never call",
        )?;
        c.within(
            "max_batch",
            self.max_batch,
            1,
            64,
            "prompts per prefill; each holds its KV cache",
        )?;
        c.within(
            "batch_window_ms",
            self.batch_window_ms,
            0,
            10_000,
            "how long a call waits for company",
        )?;
        c.within(
            "max_new_tokens",
            self.max_new_tokens,
            1,
            4096,
            "tokens of a generated reply; the reply is a short JSON object",
        )?;
        // Qwen-VL's processor needs at least one merged 28x28 patch per image.
        c.within_opt(
            "max_pixels",
            self.max_pixels,
            28 * 28,
            16384 * 16384,
            "pixels per image, at least one 28x28 merged patch",
        )?;
        c.within(
            "pass_threshold",
            self.pass_threshold,
            0.0,
            1.0,
            "a probability",
        )?;
        c.within(
            "min_answer_mass",
            self.min_answer_mass,
            0.0,
            1.0,
            "a probability",
        )?;
        c.within(
            "adapter_scale",
            self.adapter_scale,
            0.0,
            10.0,
            "a multiple of the trained LoRA strength",
        )?;
        c.within(
            "score_range",
            self.score_range,
            1,
            100,
            "the top score the prompts ask for",
        )?;
        c.within(
            "screen_pass_score",
            self.screen_pass_score,
            0.0,
            10.0,
            "an SC on 0-10",
        )?;
        c.within(
            "passes",
            self.passes,
            1,
            16,
            "answers averaged per VIE call",
        )?;
        c.within("temperature", self.temperature, 0.0, 5.0, "0 is greedy")?;
        c.within("top_p", self.top_p, 1e-6, 1.0, "a probability mass")?;
        if self.passes > 1 && !(self.reasoning && self.temperature > 0.0) {
            return Err(c.refuse(
                "passes",
                self.passes,
                "needs sampled answers that differ: set reasoning = true and temperature > 0 \
                 (readings of the next-token distribution are the same every pass)",
            ));
        }
        Ok(())
    }

    /// The adapter's folder: `adapter` as a path (resolved against the preset when read),
    /// or a Hub id's entry in the Hugging Face cache. `None` without an adapter.
    pub fn adapter_dir(&self) -> Result<Option<PathBuf>, JudgeError> {
        let Some(adapter) = &self.adapter else {
            return Ok(None);
        };
        let settings = HubSettings::from_env();
        if let Some(dir) = hub::find_local(&settings, adapter) {
            return Ok(Some(
                hub::resolve_snapshot(&dir).map_err(|e| JudgeError::Config(e.to_string()))?,
            ));
        }
        let entry = hub::cache_entry(&settings, adapter);
        Err(JudgeError::Config(if hub::names_repo(adapter) {
            format!(
                "adapter {adapter} is neither a folder nor in the Hugging Face cache ({} not found); \
                 fetch it with `icedit-scale download {adapter}` (or --download)",
                entry.display()
            )
        } else {
            format!("adapter {adapter}: no such folder")
        }))
    }

    /// The checkpoint folder: `model_dir`, or the Hub id's entry in the Hugging Face cache
    /// (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    pub fn checkpoint_dir(&self) -> Result<PathBuf, JudgeError> {
        if let Some(dir) = &self.model_dir {
            return Ok(dir.clone());
        }
        let id = self.model.as_deref().unwrap_or_default();
        let entry = hub::cache_entry(&HubSettings::from_env(), id);
        if !entry.is_dir() {
            return Err(JudgeError::Config(format!(
                "{id} is not in the Hugging Face cache ({} not found); fetch it with \
                 `icedit-scale download <this preset>` (or --download, or \
                 `huggingface-cli download {id}`), or set model_dir in the preset",
                entry.display()
            )));
        }
        Ok(entry)
    }
}

/// What a call wants read from the model.
#[derive(Debug, Clone, Copy)]
enum Question {
    /// Expected score, then P(pass).
    Screen,
    /// P(1), P(2), P(0).
    Compare,
    /// Two expected scores.
    Pair,
}

impl Question {
    fn prime(self) -> &'static str {
        match self {
            Self::Screen => "{\"score\": ",
            Self::Compare => "{\"better\": ",
            Self::Pair => "{\"score\": [",
        }
    }
}

/// What the worker hands back.
#[derive(Debug)]
enum Reading {
    Screen {
        score: f32,
        p_pass: f32,
    },
    Compare {
        p: [f32; 3],
    },
    Pair {
        scores: [f32; 2],
    },
    /// Generated replies, one per pass.
    Text(Vec<String>),
}

struct Job {
    text: String,
    images: Vec<RgbImage>,
    question: Question,
    reply: oneshot::Sender<Result<(Reading, CallUsage), JudgeError>>,
}

/// The local Qwen2-VL judge.
pub struct Qwen2VlJudge {
    name: String,
    prompts: PromptSet,
    pass_threshold: f32,
    score_range: u32,
    screen_by: ScreenBy,
    screen_pass_score: f32,
    compare_by: CompareBy,
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for Qwen2VlJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qwen2VlJudge")
            .field("name", &self.name)
            .finish()
    }
}

impl Qwen2VlJudge {
    /// Finds the checkpoint and starts the worker; the weights load on the first call.
    pub fn new(config: LocalJudgeConfig, device: Device, dtype: DType) -> Result<Self, JudgeError> {
        let files = Qwen2VlFiles::discover(&config.checkpoint_dir()?)?;
        let adapter = config.adapter_dir()?;
        if let Some(dir) = &adapter {
            // Refuse a folder that holds no adapter now, not at the first call.
            let config_path = dir.join("adapter_config.json");
            if !config_path.is_file() {
                PeftAdapter::load(dir, 1.0)?;
            }
        }
        let format = match &config.chat_template {
            Some(path) => {
                let template = std::fs::read_to_string(path).map_err(|e| {
                    JudgeError::Config(format!("chat_template {}: {e}", path.display()))
                })?;
                ChatFormat::new(&files.tokenizer, Some(template), &files.config)?
            }
            None => files.chat_format()?,
        };
        let prompts = PromptSet::load(config.prompts_dir.as_deref())?;
        let name = config.name.clone().unwrap_or_else(|| {
            let model = config.model.clone().unwrap_or_else(|| {
                files
                    .root
                    .file_name()
                    .map_or("qwen2-vl".into(), |n| n.to_string_lossy().into_owned())
            });
            match &config.adapter {
                Some(adapter) => format!("{model} + {adapter} (local, {dtype:?})"),
                None => format!("{model} (local, {dtype:?})"),
            }
        });
        let (jobs, queue) = mpsc::unbounded_channel();
        let worker = Worker {
            files,
            format,
            device,
            dtype,
            model: None,
            config: config.clone(),
            adapter,
        };
        std::thread::Builder::new()
            .name("qwen2vl-judge".into())
            .spawn(move || worker.run(queue))
            .map_err(|e| JudgeError::Config(format!("cannot start the judge thread: {e}")))?;
        Ok(Self {
            name,
            prompts,
            pass_threshold: config.pass_threshold,
            score_range: config.score_range,
            screen_by: config.screen_by,
            screen_pass_score: config.screen_pass_score,
            compare_by: config.compare_by,
            jobs,
        })
    }

    async fn ask(
        &self,
        text: String,
        images: Vec<RgbImage>,
        question: Question,
    ) -> Result<(Reading, CallUsage), JudgeError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                text,
                images,
                question,
                reply,
            })
            .map_err(|_| JudgeError::Failed("the judge worker has stopped".into()))?;
        answer
            .await
            .map_err(|_| JudgeError::Failed("the judge worker stopped mid-call".into()))?
    }
}

fn unexpected(reading: Reading) -> JudgeError {
    JudgeError::Failed(format!("internal: unexpected reading {reading:?}"))
}

#[async_trait]
impl Judge for Qwen2VlJudge {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        if self.screen_by == ScreenBy::SemanticConsistency {
            return self.screen_by_sc(edit, preview, stage).await;
        }
        let text = self.prompts.screen_for(&edit.instruction, stage);
        let images = vec![(*edit.source).clone(), preview.clone()];
        let (reading, usage) = self.ask(text, images, Question::Screen).await?;
        match reading {
            Reading::Screen { score, p_pass } => Ok(ScreenVerdict {
                pass: p_pass >= self.pass_threshold,
                score,
                reasoning: format!(
                    "P(pass) = {p_pass:.3}, expected score {score:.2} (next-token probabilities)"
                ),
                usage,
            }),
            Reading::Text(replies) => with_cost(usage, |usage| {
                let reply = first_reply(&replies)?;
                let map = parse::reply_object(reply)?;
                Ok(ScreenVerdict {
                    pass: parse::verdict(&map, "pass", reply)?,
                    score: parse::scores(&map, 1, reply)?[0],
                    reasoning: parse::reasoning(&map),
                    usage,
                })
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        if self.compare_by == CompareBy::Overall {
            return self.compare_by_overall(edit, first, second).await;
        }
        let text = self.prompts.compare_for(&edit.instruction);
        let images = vec![first.clone(), second.clone(), (*edit.source).clone()];
        let (reading, usage) = self.ask(text, images, Question::Compare).await?;
        match reading {
            Reading::Compare { p: [p1, p2, p0] } => {
                let preferred = if p0 > p1 && p0 > p2 {
                    Preference::Tie
                } else if p1 >= p2 {
                    Preference::First
                } else {
                    Preference::Second
                };
                Ok(Comparison {
                    preferred,
                    p_first: Some(p1 / (p1 + p2).max(f32::MIN_POSITIVE)),
                    reasoning: format!(
                        "P(1) = {p1:.3}, P(2) = {p2:.3}, P(tie) = {p0:.3} (next-token probabilities)"
                    ),
                    usage,
                })
            }
            Reading::Text(replies) => with_cost(usage, |usage| {
                let reply = first_reply(&replies)?;
                let map = parse::reply_object(reply)?;
                Ok(Comparison {
                    preferred: parse::preference(&map, reply)?,
                    p_first: None,
                    reasoning: parse::reasoning(&map),
                    usage,
                })
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        let text = self.prompts.vie_sc_for(&edit.instruction);
        let images = vec![(*edit.source).clone(), edited.clone()];
        self.pair(text, images).await
    }

    async fn perceptual_quality(
        &self,
        _edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        self.pair(self.prompts.vie_pq.clone(), vec![edited.clone()])
            .await
    }
}

impl Qwen2VlJudge {
    async fn pair(&self, text: String, images: Vec<RgbImage>) -> Result<SubScores, JudgeError> {
        let (reading, usage) = self.ask(text, images, Question::Pair).await?;
        // Scores on 0..=score_range map to 0-10 as EditScore maps them: / (range / 10).
        let per_ten = self.score_range as f32 / 10.0;
        match reading {
            // The probability reading is already on 0-10.
            Reading::Pair { scores } => Ok(SubScores::new(
                scores,
                format!(
                    "expected scores {:.2}, {:.2} (next-token probabilities)",
                    scores[0], scores[1]
                ),
                usage,
            )),
            Reading::Text(replies) => with_cost(usage, |usage| {
                let mut passes = Vec::with_capacity(replies.len());
                let mut reasoning = Vec::with_capacity(replies.len());
                for reply in &replies {
                    // One pass that cannot be read fails the call: no pass is filled in.
                    let map = parse::reply_object(reply)?;
                    let s = parse::scores_in(&map, 2, reply, self.score_range as f64)?;
                    passes.push([s[0] / per_ten, s[1] / per_ten]);
                    reasoning.push(parse::reasoning(&map));
                }
                let n = passes.len().max(1) as f32;
                let mean = |k: usize| passes.iter().map(|p| p[k]).sum::<f32>() / n;
                let mut scores = SubScores::new([mean(0), mean(1)], reasoning.join(" | "), usage);
                if passes.len() > 1 {
                    scores.passes = passes;
                }
                Ok(scores)
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Screening by the VIE semantic-consistency prompt on [source, preview].
    async fn screen_by_sc(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        let sc = self.semantic_consistency(edit, preview).await?;
        let score = sc.min();
        Ok(ScreenVerdict {
            pass: score >= self.screen_pass_score,
            score,
            reasoning: format!(
                "step {}/{}: SC {score:.2} (semantic-consistency prompt; pass at {}): {}",
                stage.step, stage.steps, self.screen_pass_score, sc.reasoning
            ),
            usage: sc.usage,
        })
    }

    /// Comparison by VIE O of each edit.
    async fn compare_by_overall(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        let (a, b) = futures::join!(
            crate::judge::vie_score(self, edit, first),
            crate::judge::vie_score(self, edit, second)
        );
        let (a, b) = (a?, b?);
        let (oa, ob) = (a.overall(), b.overall());
        let preferred = match oa.total_cmp(&ob) {
            std::cmp::Ordering::Greater => Preference::First,
            std::cmp::Ordering::Less => Preference::Second,
            std::cmp::Ordering::Equal => Preference::Tie,
        };
        let mut usage = CallUsage::default();
        for u in [
            &a.semantic.usage,
            &a.perceptual.usage,
            &b.semantic.usage,
            &b.perceptual.usage,
        ] {
            usage.prompt_tokens += u.prompt_tokens;
            usage.completion_tokens += u.completion_tokens;
            usage.attempts += u.attempts;
            usage.latency_ms = usage.latency_ms.max(u.latency_ms);
        }
        Ok(Comparison {
            preferred,
            p_first: None,
            reasoning: format!("VIE O {oa:.2} (first) vs {ob:.2} (second)"),
            usage,
        })
    }
}

/// The first generated reply (prompts other than VIE's are asked once).
fn first_reply(replies: &[String]) -> Result<&String, JudgeError> {
    replies
        .first()
        .ok_or_else(|| JudgeError::Failed("internal: no reply generated".into()))
}

/// Reads a generated reply with `read`; a reply that cannot be read keeps the call's cost.
fn with_cost<T>(
    usage: CallUsage,
    read: impl FnOnce(CallUsage) -> Result<T, JudgeError>,
) -> Result<T, JudgeError> {
    let spent = usage.clone();
    read(usage).map_err(|e| e.with_usage(spent))
}

/// Owns the model on its own thread.
struct Worker {
    files: Qwen2VlFiles,
    format: ChatFormat,
    device: Device,
    dtype: DType,
    model: Option<Result<Arc<Qwen2Vl>, String>>,
    config: LocalJudgeConfig,
    /// The peft adapter merged at load, if any.
    adapter: Option<PathBuf>,
}

/// A job after tokenizing, waiting for its batch.
struct Ready {
    prompt: EncodedPrompt,
    question: Question,
    reply: oneshot::Sender<Result<(Reading, CallUsage), JudgeError>>,
    started: Instant,
}

impl Worker {
    fn run(mut self, mut queue: mpsc::UnboundedReceiver<Job>) {
        let window = Duration::from_millis(self.config.batch_window_ms);
        let max_batch = self.config.max_batch.max(1);
        while let Some(first) = queue.blocking_recv() {
            let mut jobs = vec![first];
            let deadline = Instant::now() + window;
            while jobs.len() < max_batch {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(mpsc::error::TryRecvError::Empty) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => break,
                }
            }
            self.serve(jobs);
        }
    }

    /// The model, loaded on first use; a failed load is remembered (its message) so every
    /// later call fails the same way without retrying a multi-GB read.
    fn model(&mut self) -> Result<Arc<Qwen2Vl>, String> {
        let files = &self.files;
        let (dtype, device) = (self.dtype, &self.device);
        let (adapter, strength) = (&self.adapter, self.config.adapter_scale);
        let unused = UnusedWeights::allow_if(self.config.allow_unused_weights);
        let loaded = self.model.get_or_insert_with(|| {
            tracing::info!(root = %files.root.display(), ?dtype, adapter = ?adapter, "loading the Qwen2-VL judge");
            let t = Instant::now();
            let adapter = match adapter {
                Some(dir) => match PeftAdapter::load(dir, strength as f64) {
                    Ok(a) => Some(Arc::new(a)),
                    Err(e) => return Err(e.to_string()),
                },
                None => None,
            };
            match files.load_adapted(dtype, device, adapter, unused) {
                Ok(model) => {
                    tracing::info!(seconds = t.elapsed().as_secs_f32(), "judge loaded");
                    Ok(Arc::new(model))
                }
                Err(e) => Err(e.to_string()),
            }
        });
        loaded.clone()
    }

    fn serve(&mut self, jobs: Vec<Job>) {
        let model = match self.model() {
            Ok(m) => m,
            Err(message) => {
                tracing::error!("the local judge could not be loaded: {message}");
                for job in jobs {
                    let _ = job.reply.send(Err(JudgeError::Config(message.clone())));
                }
                return;
            }
        };
        let mut ready: Vec<Ready> = Vec::with_capacity(jobs.len());
        for job in jobs {
            match self.encode(&job) {
                Ok(prompt) => ready.push(Ready {
                    prompt,
                    question: job.question,
                    reply: job.reply,
                    started: Instant::now(),
                }),
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        // Equal lengths share a prefill (the previews of one edit tokenize alike).
        ready.sort_by_key(|r| r.prompt.ids.len());
        let mut rest = ready.into_iter().peekable();
        while let Some(head) = rest.next() {
            let len = head.prompt.ids.len();
            let mut group = vec![head];
            while let Some(next) = rest.next_if(|r| r.prompt.ids.len() == len) {
                group.push(next);
            }
            self.run_batch(&model, group);
        }
    }

    fn encode(&self, job: &Job) -> Result<EncodedPrompt, JudgeError> {
        let mut image_cfg = self.files.image.clone();
        if let Some(cap) = self.config.max_pixels {
            image_cfg.max_pixels = image_cfg.max_pixels.min(cap).max(image_cfg.min_pixels);
        }
        let images = job
            .images
            .iter()
            .map(|i| image_cfg.preprocess(i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rendered = self.format.render(images.len(), &job.text)?;
        if !self.config.reasoning {
            rendered.push_str(match job.question {
                Question::Pair => &self.config.score_prime,
                other => other.prime(),
            });
        }
        Ok(self.format.encode(&rendered, images)?)
    }

    fn run_batch(&self, model: &Qwen2Vl, group: Vec<Ready>) {
        let prompts: Vec<EncodedPrompt> = group.iter().map(|r| r.prompt.clone()).collect();
        let prefill = model.prefill(&prompts);
        let (logits, sessions) = match prefill {
            Ok(x) => x,
            Err(e) => {
                for r in group {
                    let _ = r
                        .reply
                        .send(Err(JudgeError::Failed(format!("local model: {e}"))));
                }
                return;
            }
        };
        for (i, (ready, session)) in group.into_iter().zip(sessions).enumerate() {
            let usage = |completion_tokens| CallUsage {
                prompt_tokens: ready.prompt.ids.len() as u64,
                completion_tokens,
                cached: false,
                attempts: 1,
                latency_ms: ready.started.elapsed().as_millis() as u64,
                retry_wait_ms: 0,
            };
            // An answer the model did not give (too little mass on the answers) still ran
            // the prompt: its cost is kept on the failure.
            let result = logits
                .i(i)
                .map_err(|e| JudgeError::Failed(format!("local model: {e}")))
                .and_then(|row| self.read(model, session, row, ready.question))
                .map(|(reading, completion_tokens)| (reading, usage(completion_tokens)))
                .map_err(|e| e.with_usage(usage(0)));
            let _ = ready.reply.send(result);
        }
    }

    /// Reads the answer of one prompt from its next-token logits; returns it and the tokens
    /// fed after the prompt.
    fn read(
        &self,
        model: &Qwen2Vl,
        session: PromptState,
        logits: Tensor,
        question: Question,
    ) -> Result<(Reading, u64), JudgeError> {
        let failed = |e: candle_core::Error| JudgeError::Failed(format!("local model: {e}"));
        if self.config.reasoning {
            // VIE calls are answered `passes` times (pass i seeded seed + i); the others once.
            let passes = match question {
                Question::Pair => self.config.passes,
                _ => 1,
            };
            let mut replies = Vec::with_capacity(passes);
            let mut fed = 0;
            for pass in 0..passes {
                let (text, n) = self
                    .generate(model, session.clone(), logits.clone(), pass as u64)
                    .map_err(failed)?;
                replies.push(text);
                fed += n;
            }
            return Ok((Reading::Text(replies), fed));
        }
        let digits = self.candidates(&(0..=10).map(|v| v.to_string()).collect::<Vec<_>>())?;
        let range = self.config.score_range;
        let scale = range as f32 / 10.0;
        let range_digits =
            self.candidates(&(0..=range).map(|v| v.to_string()).collect::<Vec<_>>())?;
        match question {
            Question::Screen => {
                let score = choose(model, &session, &logits, &digits).map_err(failed)?;
                self.check_mass(&score, "score")?;
                let (expected, best) = score_summary(&score);
                let mut session = session;
                let after = self.format.ids(&format!("{best}, \"pass\":"))?;
                let logits = model.extend(&mut session, &after).map_err(failed)?;
                let verdict = self.candidates(&[" true".into(), " false".into()])?;
                let pass = choose(model, &session, &logits, &verdict).map_err(failed)?;
                self.check_mass(&pass, "pass")?;
                let fed = score.tokens_fed + after.len() as u64 + pass.tokens_fed;
                Ok((
                    Reading::Screen {
                        score: expected,
                        p_pass: pass.normalised()[0],
                    },
                    fed,
                ))
            }
            Question::Compare => {
                let options = self.candidates(&["1".into(), "2".into(), "0".into()])?;
                let choice = choose(model, &session, &logits, &options).map_err(failed)?;
                self.check_mass(&choice, "better")?;
                let p = choice.normalised();
                Ok((
                    Reading::Compare {
                        p: [p[0], p[1], p[2]],
                    },
                    choice.tokens_fed,
                ))
            }
            Question::Pair => {
                let first = choose(model, &session, &logits, &range_digits).map_err(failed)?;
                self.check_mass(&first, "score[0]")?;
                let (e1, best) = score_summary(&first);
                let mut session = session;
                let after = self.format.ids(&format!("{best}, "))?;
                let logits = model.extend(&mut session, &after).map_err(failed)?;
                let second = choose(model, &session, &logits, &range_digits).map_err(failed)?;
                self.check_mass(&second, "score[1]")?;
                let (e2, _) = score_summary(&second);
                let fed = first.tokens_fed + after.len() as u64 + second.tokens_fed;
                Ok((
                    Reading::Pair {
                        scores: [e1 / scale, e2 / scale],
                    },
                    fed,
                ))
            }
        }
    }

    fn candidates(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, JudgeError> {
        texts
            .iter()
            .map(|t| self.format.ids(t).map_err(JudgeError::from))
            .collect()
    }

    /// A model that puts little mass on every answer is not answering; that is a failure,
    /// not a score.
    fn check_mass(&self, choice: &Choice, field: &str) -> Result<(), JudgeError> {
        let mass = choice.mass();
        if mass < self.config.min_answer_mass {
            return Err(JudgeError::parse(
                format!(
                    "the model puts only {mass:.3} probability on any `{field}` answer (min_answer_mass {})",
                    self.config.min_answer_mass
                ),
                "",
            ));
        }
        Ok(())
    }

    /// Generates a reply (greedily, or sampled with the preset's settings and seed
    /// `seed + pass`) and decodes it.
    fn generate(
        &self,
        model: &Qwen2Vl,
        mut session: PromptState,
        logits: Tensor,
        pass: u64,
    ) -> candle_core::Result<(String, u64)> {
        let c = &self.config;
        let sampling = Sampling {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            seed: c.seed.wrapping_add(pass),
        };
        let out = model.generate(&mut session, logits, c.max_new_tokens, Some(&sampling))?;
        let text = self
            .format
            .decode(&out)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((text, out.len() as u64))
    }
}
