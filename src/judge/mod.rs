//! Judges: the vision-language side of an edit.
//!
//! A backend implements [`Judge`]: screen a preview, compare two candidates, and give the
//! two VIE sub-score pairs (semantic consistency on [source, edited], perceptual quality
//! on [edited]). [`vie::vie_score`] combines them by the VIEScore rubric. A failed or
//! unparseable call is a [`JudgeError`]; no backend ever makes a score up.

pub mod cache;
pub mod composite;
pub mod error;
pub mod openai;
pub mod parse;
pub mod preset;
pub mod prompts;
pub mod qwen_vl;
pub mod reward;
pub mod score_logprobs;
pub mod testbed;
pub mod vie;

use async_trait::async_trait;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::edit::EditContext;
pub use error::JudgeError;
pub use vie::{vie_pair, vie_score, SubScores, ViePair, VieScore};

/// Cost and provenance of one judge call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallUsage {
    /// Prompt tokens billed (0 when unknown or cached).
    pub prompt_tokens: u64,
    /// Completion tokens billed.
    pub completion_tokens: u64,
    /// Served from the on-disk reply cache.
    pub cached: bool,
    /// HTTP attempts or generation tries made.
    pub attempts: u32,
    /// Wall time of the call.
    pub latency_ms: u64,
    /// Of that, the time spent waiting between attempts (backoff, or the server's
    /// `Retry-After`): what rate limits and outages cost.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retry_wait_ms: u64,
}

fn is_zero(ms: &u64) -> bool {
    *ms == 0
}

/// Where a preview stands in its schedule, so the judge can calibrate its expectations.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct PreviewStage {
    /// Steps run before the preview was predicted.
    pub step: usize,
    /// Steps in the full schedule.
    pub steps: usize,
}

/// The screening verdict on one preview.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScreenVerdict {
    /// Whether the candidate is worth completing.
    pub pass: bool,
    /// Higher is more promising: 0-10 for VIE judges (an expected value when logprobs are
    /// known), the reward for reward models ([`Judge::score_kind`]).
    pub score: f32,
    /// The judge's explanation.
    pub reasoning: String,
    /// Cost of the call.
    pub usage: CallUsage,
}

/// Which of two candidates a comparison preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preference {
    /// The first image shown.
    First,
    /// The second image shown.
    Second,
    /// Neither.
    Tie,
}

/// The outcome of one pairwise comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// Which candidate follows the instruction better.
    pub preferred: Preference,
    /// P(first is better) when the judge exposes a distribution.
    pub p_first: Option<f32>,
    /// The judge's explanation.
    pub reasoning: String,
    /// Cost of the call.
    pub usage: CallUsage,
}

/// What a judge's scores are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreKind {
    /// VIE sub-scores on 0-10 (SC, PQ, O = sqrt(SC * PQ)); screening scores on 0-10.
    Vie,
    /// A reward model's scalar, on the model's own unbounded scale (higher is better); it
    /// gives no VIE sub-scores.
    Reward,
}

impl ScoreKind {
    /// `Vie` (the serde default of older reports).
    pub fn vie() -> Self {
        Self::Vie
    }
}

/// A reward model's verdict on one edit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardScore {
    /// The reward (the model's own scale; not 0-10).
    pub reward: f32,
    /// The model's log-scale uncertainty, where it has one (uncalibrated).
    pub log_sigma: f32,
    /// Cost of the call.
    pub usage: CallUsage,
}

/// A vision-language judge. Calls are async and may run concurrently.
#[async_trait]
pub trait Judge: Send + Sync {
    /// Name and model for reports (never includes secrets).
    fn name(&self) -> String;

    /// What its scores are: VIE sub-scores (most judges) or a reward.
    fn score_kind(&self) -> ScoreKind {
        ScoreKind::Vie
    }

    /// What its screening scores are (a composite may screen with a reward model).
    fn screen_score_kind(&self) -> ScoreKind {
        self.score_kind()
    }

    /// Screen by rank instead of a pass mark: the engine passes the previews of one round
    /// whose score is at or above this quantile of the round's scores (`None`: the judge's
    /// own verdicts).
    fn screen_quantile(&self) -> Option<f32> {
        None
    }

    /// A reward model's scalar for a finished edit; judges that are not reward models
    /// refuse.
    async fn reward(
        &self,
        _edit: &EditContext,
        _edited: &RgbImage,
    ) -> Result<RewardScore, JudgeError> {
        Err(JudgeError::Config(format!(
            "{} gives VIE scores, not a reward",
            self.name()
        )))
    }

    /// Looks at source + instruction + an early preview and decides whether the
    /// candidate is heading towards a correct edit.
    async fn screen(
        &self,
        edit: &EditContext,
        preview: &RgbImage,
        stage: PreviewStage,
    ) -> Result<ScreenVerdict, JudgeError>;

    /// Which of two edited results follows the instruction better (images shown in the
    /// order `first`, `second`, then the source).
    async fn compare(
        &self,
        edit: &EditContext,
        first: &RgbImage,
        second: &RgbImage,
    ) -> Result<Comparison, JudgeError>;

    /// VIE semantic consistency on [source, edited]: (instruction followed, not over-edited),
    /// each 0-10.
    async fn semantic_consistency(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError>;

    /// VIE perceptual quality on [edited] alone: (naturalness, absence of artifacts),
    /// each 0-10. `edit` is given for context and caching; the rubric ignores the source.
    async fn perceptual_quality(
        &self,
        edit: &EditContext,
        edited: &RgbImage,
    ) -> Result<SubScores, JudgeError>;
}
