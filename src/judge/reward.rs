//! A reward-model judge (`kind = "reward"`): EditReward's scalar reward used to screen and
//! compare edits. Its score is the model's own (unbounded, higher is better; EditReward's
//! are typically -3 to 2), not a 0-10 VIE score, so it never answers the VIE calls: reports
//! keep the two apart, and a run that needs VIE scores pairs it with a VIE judge in a
//! composite preset (`screen` / `compare` by reward, `score` by VIE).
//!
//! - screen: the preview's reward; it passes at `pass_reward` (set in the preset or read
//!   from a calibration file), or at the `pass_quantile` of its round's rewards (applied
//!   by the engine, which sees the round); without either every preview passes and the
//!   ranking by reward decides which survive.
//! - compare: the reward difference; within `tie_margin` it is a tie. P(first better) is
//!   the Bradley-Terry sigmoid of the difference.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use candle_core::{DType, Device};
use image::RgbImage;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::preset::{FieldCheck, MAX_CONCURRENCY};
use super::{
    CallUsage, Comparison, Judge, JudgeError, Preference, PreviewStage, RewardScore, ScoreKind,
    ScreenVerdict, SubScores,
};
use crate::edit::EditContext;
use crate::hub::{self, HubSettings};
use crate::models::qwen_vl::reward::reward_weights;
use crate::models::qwen_vl::{ChatFormat, EncodedPrompt, Qwen2VlFiles, RewardModel, REWARD_TOKEN};
use crate::models::weight_use::UnusedWeights;

/// EditReward's instruction-following prompt (head 0) and visual-quality prompt (head 1),
/// with its trailer (`EditReward/dataset/prompts.py`, `dataset/data_collator_qwen_edit.py`
/// at commit edb027e); `{instruction}` stands for its `{text_prompt}`.
const PROMPT_INSTRUCTION_FOLLOWING: &str =
    include_str!("../../judges/editreward/prompt_instruction_following.txt");
const PROMPT_VISUAL_QUALITY: &str =
    include_str!("../../judges/editreward/prompt_visual_quality.txt");

/// A `kind = "reward"` preset.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardPreset {
    /// Display name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// Calls in flight at once (read by the engine).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// The base model's Hub id (config, tokenizer, processor), found in the cache.
    #[serde(default)]
    pub model: Option<String>,
    /// Or its folder (relative to the preset).
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// The reward checkpoint: a Hub id found in the cache, or a folder (relative to the
    /// preset) holding its safetensors.
    pub weights: String,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `bf16`, `f16` or `f32` (default bf16 on GPUs, f32 on the CPU).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Pixels every image is resized to (EditReward: min = max = 200704, 256 tokens).
    #[serde(default = "default_image_pixels")]
    pub image_pixels: usize,
    /// A preview passes screening at this reward or above.
    #[serde(default)]
    pub pass_reward: Option<f32>,
    /// A JSON file `{"pass_reward": x}` (relative to the preset) setting the threshold.
    #[serde(default)]
    pub calibration: Option<PathBuf>,
    /// Or: a preview passes when its reward is at or above this quantile (0-1) of the
    /// rewards of its edit's previews in the same round.
    #[serde(default)]
    pub pass_quantile: Option<f32>,
    /// Reward differences within this are ties.
    #[serde(default)]
    pub tie_margin: f32,
    /// Load a reward checkpoint holding tensors the model never reads, logging them,
    /// instead of refusing it (`--allow-unused-weights`; for experiments).
    #[serde(default)]
    pub allow_unused_weights: bool,
}

fn default_device() -> String {
    "cuda".into()
}

fn default_image_pixels() -> usize {
    200_704
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Calibration {
    pass_reward: f32,
}

impl RewardPreset {
    /// The preset as read from the file at `path`, checked; folders resolve against the
    /// file's folder.
    pub fn resolve(self, path: &Path) -> Result<Self, JudgeError> {
        let mut p = self;
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in [&mut p.model_dir, &mut p.calibration].into_iter().flatten() {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        let local = base.join(&p.weights);
        if local.exists() {
            p.weights = local.to_string_lossy().into_owned();
        }
        let c = FieldCheck::new(path);
        c.within_opt(
            "max_concurrency",
            p.max_concurrency,
            1,
            MAX_CONCURRENCY,
            "calls in flight",
        )?;
        c.within(
            "image_pixels",
            p.image_pixels,
            28 * 28,
            16384 * 16384,
            "pixels per image",
        )?;
        c.within("tie_margin", p.tie_margin, 0.0, 1e6, "a reward difference")?;
        c.finite_opt("pass_reward", p.pass_reward)?;
        c.within_opt("pass_quantile", p.pass_quantile, 0.0, 1.0, "a quantile")?;
        let rules = [
            p.pass_reward.is_some() || p.calibration.is_some(),
            p.pass_quantile.is_some(),
        ];
        if rules.iter().all(|&r| r) {
            return Err(c.refuse(
                "pass_quantile",
                p.pass_quantile.unwrap_or_default(),
                "and a pass mark (`pass_reward` / `calibration`) both decide who passes; keep one",
            ));
        }
        if p.model.is_none() && p.model_dir.is_none() {
            return Err(JudgeError::Config(format!(
                "judge preset {}: give the base `model` (a Hub id) or `model_dir`",
                path.display()
            )));
        }
        if let Some(file) = &p.calibration {
            let cal: Calibration = crate::fsio::read_json(file)
                .map_err(|e| JudgeError::Config(format!("calibration {e}")))?;
            if p.pass_reward.is_some() {
                return Err(c.refuse(
                    "calibration",
                    file.display(),
                    "and `pass_reward` both set the threshold; keep one",
                ));
            }
            FieldCheck::new(file).finite_opt("pass_reward", Some(cal.pass_reward))?;
            p.pass_reward = Some(cal.pass_reward);
        }
        Ok(p)
    }

    /// A Hub id or folder, resolved to a folder.
    fn find_folder(what: &str, id_or_dir: &str) -> Result<PathBuf, JudgeError> {
        let settings = HubSettings::from_env();
        if let Some(dir) = hub::find_local(&settings, id_or_dir) {
            return hub::resolve_snapshot(&dir).map_err(|e| JudgeError::Config(e.to_string()));
        }
        Err(JudgeError::Config(format!(
            "{what} {id_or_dir} is neither a folder nor in the Hugging Face cache ({} not found); \
             fetch it with `icedit-scale download <this preset>` (or --download)",
            hub::cache_entry(&settings, id_or_dir).display()
        )))
    }
}

struct Job {
    instruction: String,
    source: RgbImage,
    edited: RgbImage,
    reply: oneshot::Sender<Result<RewardScore, JudgeError>>,
}

/// The reward judge: a worker thread owns the model (loaded on the first call).
pub struct RewardJudge {
    name: String,
    pass_reward: Option<f32>,
    pass_quantile: Option<f32>,
    tie_margin: f32,
    jobs: mpsc::UnboundedSender<Job>,
}

struct Worker {
    files: Qwen2VlFiles,
    chat: ChatFormat,
    reward_token: u32,
    weights: Vec<PathBuf>,
    device: Device,
    dtype: DType,
    unused: UnusedWeights,
    model: Option<Result<Arc<RewardModel>, String>>,
}

impl Worker {
    fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(job) = jobs.blocking_recv() {
            let started = Instant::now();
            let result = self.score(&job).map(|(output, tokens)| RewardScore {
                reward: output.reward(),
                log_sigma: output.log_sigma(),
                usage: CallUsage {
                    prompt_tokens: tokens,
                    attempts: 1,
                    latency_ms: started.elapsed().as_millis() as u64,
                    ..CallUsage::default()
                },
            });
            let _ = job.reply.send(result);
        }
    }

    fn score(
        &mut self,
        job: &Job,
    ) -> Result<(crate::models::qwen_vl::RewardOutput, u64), JudgeError> {
        let (files, weights, token, dtype, device, unused) = (
            &self.files,
            &self.weights,
            self.reward_token,
            self.dtype,
            &self.device,
            self.unused,
        );
        let model = self
            .model
            .get_or_insert_with(|| {
                tracing::info!(weights = ?weights, "loading the reward model");
                RewardModel::load(files, weights.clone(), token, dtype, device, unused)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(JudgeError::Config)?;
        let prompt = |template: &str| -> Result<EncodedPrompt, JudgeError> {
            let text = template.replace("{instruction}", &job.instruction);
            let rendered = self.chat.render(2, &text)?;
            let images = vec![
                self.files.image.preprocess(&job.source)?,
                self.files.image.preprocess(&job.edited)?,
            ];
            Ok(self.chat.encode(&rendered, images)?)
        };
        let (follow, quality) = (
            prompt(PROMPT_INSTRUCTION_FOLLOWING)?,
            prompt(PROMPT_VISUAL_QUALITY)?,
        );
        let tokens = (follow.ids.len() + quality.ids.len()) as u64;
        let output = model
            .score(&follow, &quality)
            .map_err(|e| JudgeError::Failed(format!("reward model: {e}")))?;
        Ok((output, tokens))
    }
}

impl RewardJudge {
    /// A judge from a preset read from `path` (named in errors): resolves the base model
    /// and the weights, adds the reward token to the tokenizer and starts the worker (the
    /// weights load on the first call).
    pub fn new(preset: RewardPreset, path: &Path) -> Result<Self, JudgeError> {
        let setup = |field: &str, e: String| {
            JudgeError::Config(format!("judge preset {}: {field} {e}", path.display()))
        };
        let device = crate::device::parse_device(&preset.device).map_err(|e| setup("device", e))?;
        let dtype = crate::device::parse_dtype(preset.dtype.as_deref(), &device)
            .map_err(|e| setup("dtype", e))?;
        let base = match (&preset.model_dir, &preset.model) {
            (Some(dir), _) => dir.clone(),
            (None, Some(id)) => RewardPreset::find_folder("model", id)?,
            (None, None) => unreachable!("checked when read"),
        };
        let mut files = Qwen2VlFiles::discover(&base)?;
        // EditReward resizes every image to exactly this many pixels.
        files.image.min_pixels = preset.image_pixels;
        files.image.max_pixels = preset.image_pixels;
        let weights = reward_weights(&RewardPreset::find_folder("weights", &preset.weights)?)?;
        let mut chat = files.chat_format()?;
        let reward_token = chat.add_special_token(REWARD_TOKEN);
        let name = preset
            .name
            .clone()
            .unwrap_or_else(|| format!("{} (reward model, {dtype:?})", preset.weights));
        let (jobs, queue) = mpsc::unbounded_channel();
        let worker = Worker {
            files,
            chat,
            reward_token,
            weights,
            device,
            dtype,
            unused: UnusedWeights::allow_if(preset.allow_unused_weights),
            model: None,
        };
        std::thread::Builder::new()
            .name("reward-judge".into())
            .spawn(move || worker.run(queue))
            .map_err(|e| JudgeError::Config(format!("cannot start the judge thread: {e}")))?;
        Ok(Self {
            name,
            pass_reward: preset.pass_reward,
            pass_quantile: preset.pass_quantile,
            tie_margin: preset.tie_margin,
            jobs,
        })
    }

    async fn ask(&self, edit: &EditContext, edited: &RgbImage) -> Result<RewardScore, JudgeError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                instruction: edit.instruction.clone(),
                source: (*edit.source).clone(),
                edited: edited.clone(),
                reply,
            })
            .map_err(|_| JudgeError::Failed("the reward worker has stopped".into()))?;
        answer
            .await
            .map_err(|_| JudgeError::Failed("the reward worker stopped mid-call".into()))?
    }

    fn no_vie(&self) -> JudgeError {
        JudgeError::Config(format!(
            "{} is a reward model: it gives a reward, not VIE sub-scores; score with a VIE \
             judge (a composite preset can screen or compare by reward and score by VIE)",
            self.name
        ))
    }
}

#[async_trait]
impl Judge for RewardJudge {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score_kind(&self) -> ScoreKind {
        ScoreKind::Reward
    }

    fn screen_quantile(&self) -> Option<f32> {
        self.pass_quantile
    }

    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError> {
        let r = self.ask(edit, preview).await?;
        let pass = self.pass_reward.is_none_or(|t| r.reward >= t);
        let rule = match (self.pass_reward, self.pass_quantile) {
            (Some(t), _) => format!("passes at {t}"),
            (None, Some(q)) => format!("passes at the {q} quantile of its round"),
            (None, None) => "no threshold: ranked by reward".into(),
        };
        Ok(ScreenVerdict {
            pass,
            score: r.reward,
            reasoning: format!(
                "step {}/{}: reward {:.4} (log sigma {:.3}; {rule})",
                stage.step, stage.steps, r.reward, r.log_sigma
            ),
            usage: r.usage,
        })
    }

    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError> {
        let (a, b) = (self.ask(edit, first).await?, self.ask(edit, second).await?);
        let diff = a.reward - b.reward;
        let preferred = if diff > self.tie_margin {
            Preference::First
        } else if diff < -self.tie_margin {
            Preference::Second
        } else {
            Preference::Tie
        };
        let usage = CallUsage {
            prompt_tokens: a.usage.prompt_tokens + b.usage.prompt_tokens,
            attempts: 2,
            latency_ms: a.usage.latency_ms + b.usage.latency_ms,
            ..CallUsage::default()
        };
        Ok(Comparison {
            preferred,
            p_first: Some(1.0 / (1.0 + (-diff).exp())),
            reasoning: format!("reward {:.4} (first) vs {:.4} (second)", a.reward, b.reward),
            usage,
        })
    }

    async fn semantic_consistency(
        &self,
        _edit: &EditContext,
        _edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        Err(self.no_vie())
    }

    async fn perceptual_quality(
        &self,
        _edit: &EditContext,
        _edited: &RgbImage,
    ) -> Result<SubScores, JudgeError> {
        Err(self.no_vie())
    }

    async fn reward(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<RewardScore, JudgeError> {
        self.ask(edit, edited).await
    }
}
