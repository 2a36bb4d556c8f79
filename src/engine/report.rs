//! The machine-readable record of one edit run (`report.json`).
//!
//! Everything needed to audit and reproduce a pick: seeds, schedule, every verdict and
//! score with the judge's reasoning (or its error), NFE per phase, judge calls and tokens,
//! timings. The schema is documented in docs/outputs.md ("report.json").

use std::sync::Arc;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::strategy::StrategyConfig;
use crate::generate::ForwardTally;
use crate::judge::{
    CallUsage, Comparison, JudgeError, ScoreKind, ScreenVerdict, SubScores, VieScore,
};

/// Version of the report schema; bumped on incompatible changes.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// A judge call's result as recorded: the answer, or the failure. Never a substitute score.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Judged<T> {
    /// The judge answered.
    Ok(T),
    /// The call failed or the reply could not be parsed.
    Failed(JudgeError),
}

impl<T> Judged<T> {
    /// The answer, if any.
    pub fn ok(&self) -> Option<&T> {
        match self {
            Self::Ok(t) => Some(t),
            Self::Failed(_) => None,
        }
    }
}

impl<T> From<Result<T, JudgeError>> for Judged<T> {
    fn from(r: Result<T, JudgeError>) -> Self {
        match r {
            Ok(t) => Self::Ok(t),
            Err(e) => Self::Failed(e),
        }
    }
}

/// A VIE score with its combined values spelled out for readers of the JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VieRecord {
    /// SC = min(semantic pair).
    pub sc: f32,
    /// PQ = min(perceptual pair).
    pub pq: f32,
    /// O = sqrt(SC * PQ).
    pub overall: f32,
    /// Instruction followed, not over-edited (on [source, edited]).
    pub semantic: SubScores,
    /// Naturalness, absence of artifacts (on [edited]).
    pub perceptual: SubScores,
}

impl From<VieScore> for VieRecord {
    fn from(s: VieScore) -> Self {
        Self {
            sc: s.sc(),
            pq: s.pq(),
            overall: s.overall(),
            semantic: s.semantic,
            perceptual: s.perceptual,
        }
    }
}

/// One screening of one candidate's preview.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScreenRecord {
    /// Steps run when the preview was predicted.
    pub step: usize,
    /// File of the preview, relative to the output folder (set when written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_file: Option<String>,
    /// The verdict or the failure.
    pub verdict: Judged<ScreenVerdict>,
}

/// What became of a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateStatus {
    /// Stopped after screening.
    Pruned,
    /// Ran the full schedule and was scored (or its scoring failed).
    Completed,
    /// Tournament: ran a short schedule and lost a comparison.
    Eliminated,
    /// Tournament: won the comparisons and was re-run at full steps.
    Champion,
    /// Adaptive: passed screening but was still waiting in the pool when the search stopped.
    Pooled,
}

/// One seed candidate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateRecord {
    /// Position in the candidate list.
    pub index: usize,
    /// Seed of its initial noise.
    pub seed: u64,
    /// `true` when its initial latents came from `--init-latents` instead of the seed.
    pub given_latents: bool,
    /// Model forwards spent on this candidate.
    pub nfe: usize,
    /// What became of it.
    pub status: CandidateStatus,
    /// Every screening, in order.
    pub screens: Vec<ScreenRecord>,
    /// Tournament: file of the short-run image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_run_file: Option<String>,
    /// File of the finished image (completed candidates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_file: Option<String>,
    /// VIE score of the finished image, or the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vie: Option<Judged<VieRecord>>,
    /// Its forwards by kind (`full + cached == nfe`) and the transformer FLOPs they ran.
    #[serde(default)]
    pub forwards: ForwardCounts,
    /// Images, kept in memory for writing; not part of the JSON.
    #[serde(skip)]
    pub images: CandidateImages,
}

impl CandidateRecord {
    /// VIE O if the candidate was scored.
    pub fn overall(&self) -> Option<f32> {
        self.vie.as_ref()?.ok().map(|v| v.overall)
    }

    /// Score of the latest successful screening.
    pub fn last_screen_score(&self) -> Option<f32> {
        self.screens
            .iter()
            .rev()
            .find_map(|s| s.verdict.ok().map(|v| v.score))
    }
}

/// A candidate's images (previews in screening order, tournament short run, final).
#[derive(Debug, Clone, Default)]
pub struct CandidateImages {
    /// One per screening.
    pub previews: Vec<Arc<RgbImage>>,
    /// Tournament short-run result.
    pub short_run: Option<Arc<RgbImage>>,
    /// The finished edit.
    pub final_image: Option<Arc<RgbImage>>,
}

/// One pairwise comparison of the tournament (asked twice, order swapped).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComparisonRecord {
    /// Candidate index of the champion going in.
    pub champion: usize,
    /// Candidate index of the challenger.
    pub challenger: usize,
    /// Asked with [champion, challenger, source].
    pub champion_first: Judged<Comparison>,
    /// Asked with [challenger, champion, source].
    pub challenger_first: Judged<Comparison>,
    /// Candidate index that goes on.
    pub winner: usize,
    /// How the winner was decided (agreement, tie kept the champion, failure, ...).
    pub decision: String,
}

/// The returned edit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pick {
    /// Candidate index.
    pub index: usize,
    /// Its seed.
    pub seed: u64,
    /// Its VIE O, when it was scored.
    pub overall: Option<f32>,
    /// Why it was picked.
    pub reason: String,
}

/// Why an adaptive search stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A completed candidate's VIE O reached the target.
    TargetReached,
    /// Every seed was probed and every candidate that passed screening was completed.
    SeedsExhausted,
    /// What is left of the NFE budget pays for neither another wave nor a completion.
    BudgetExhausted,
}

/// One round of an adaptive search: a wave probed and screened (unless no seeds or budget
/// were left for one), then the best passing candidates completed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveRound {
    /// Candidates spawned, probed and screened this round.
    pub probed: Vec<usize>,
    /// Candidates completed and scored this round, best screen score first.
    pub completed: Vec<usize>,
    /// Of `completed`, those that had waited in the pool since an earlier round.
    pub from_pool: Vec<usize>,
    /// NFE spent this round.
    pub nfe: usize,
}

/// How an adaptive search went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveRecord {
    /// Every round, in order.
    pub rounds: Vec<AdaptiveRound>,
    /// Why it stopped.
    pub stop: StopReason,
    /// The stop in words: which candidate reached which O, or what was left.
    pub stop_detail: String,
}

/// Transformer forwards by kind: run in full, or served (in part) from the candidate's step
/// cache (`--cache`), with the transformer FLOPs they ran against what the same forwards run
/// in full would have. Every forward of either kind is one NFE, in [`NfeLedger`] and against
/// budgets (`--budget-nfe`, `budget_nfe_mean`): budgets count forwards, not FLOPs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardCounts {
    /// Forwards run in full.
    pub full: usize,
    /// Forwards served from the step cache.
    pub cached: usize,
    /// Transformer FLOPs (matrix products) run; 0 when the generator does not count them
    /// (the testbed).
    pub flops: u64,
    /// Transformer FLOPs the same forwards run in full would have run (0 likewise).
    pub full_flops: u64,
}

impl ForwardCounts {
    /// Adds a tally of forwards.
    pub fn add(&mut self, t: &ForwardTally) {
        self.full += t.full;
        self.cached += t.cached;
        self.flops += t.flops;
        self.full_flops += t.full_flops;
    }

    /// The sum of two counts.
    pub fn plus(&self, other: &ForwardCounts) -> ForwardCounts {
        ForwardCounts {
            full: self.full + other.full,
            cached: self.cached + other.cached,
            flops: self.flops + other.flops,
            full_flops: self.full_flops + other.full_flops,
        }
    }

    /// Forwards of either kind (NFE).
    pub fn forwards(&self) -> usize {
        self.full + self.cached
    }

    /// The FLOPs run as a share of full forwards' (`None` when not counted).
    pub fn flops_share(&self) -> Option<f64> {
        (self.full_flops > 0).then(|| self.flops as f64 / self.full_flops as f64)
    }
}

/// Model forwards per phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NfeLedger {
    /// Probe steps (early filter, successive halving) or short runs (tournament).
    pub probe: usize,
    /// Completion of survivors (or full runs for random / best-of-N).
    pub complete: usize,
    /// Tournament: the winner's full re-run.
    pub rerun: usize,
    /// Sum of the above: the edit's NFE, what budgets count.
    pub total: usize,
    /// Forwards of the hi-res refines (the pick's and any runner-ups'), at the refine's
    /// size (not in `total`, and outside any budget: a refine forward is larger; see
    /// `refine_edit_step_equivalents`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refine: usize,
    /// The refine's forwards in forwards of the edit's size (by the generator's cost of a
    /// forward at each size: FLUX counts its FLOPs, so attention's growth is included).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub refine_edit_step_equivalents: f64,
    /// What the same N would cost as best-of-N (`N * steps`).
    pub best_of_n_equivalent: usize,
    /// One full run (`steps`), the random baseline.
    pub random_equivalent: usize,
}

/// For `skip_serializing_if`: a count of zero is left out of a record (here and in batch's
/// and eval's records).
pub(crate) fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// For `skip_serializing_if`: a zero cost is left out of a record.
pub(crate) fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

/// The hi-res refine of the pick: upscaled to the refine size and re-run image-to-image
/// from part-way down the schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefineRecord {
    /// The refined candidate (the pick, or a runner-up with `refine_best`).
    pub candidate: usize,
    /// Its seed, which also seeds the refine's noise.
    pub seed: u64,
    /// The refined panel's width and height.
    pub size: (u32, u32),
    /// diffusers' `strength`: the share of the schedule re-run.
    pub strength: f64,
    /// The step the refine started at, of `steps`.
    pub start_step: usize,
    /// Steps of the refine's schedule (the edit's).
    pub steps: usize,
    /// Image tokens of the refine's diptych.
    pub image_tokens: usize,
    /// Forwards run at the refine size (`steps - start_step`).
    pub nfe: usize,
    /// What one refine forward costs in forwards of the edit's size.
    pub step_cost: f64,
    /// `nfe * step_cost`.
    pub edit_step_equivalents: f64,
    /// Whether the source was blended back where the edit changed nothing.
    pub keep_unchanged: bool,
    /// Share of the refined panel's pixels taken from the source (with `keep_unchanged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_from_source: Option<f32>,
    /// Budgets (`budget_nfe`, mean budgets) do not include the refine.
    pub in_budget: bool,
    /// Wall time of the refine (steps, decode, blend; the pick's also preparing the
    /// refine's diptych, which every refine of the edit shares).
    pub seconds: f64,
    /// The refined image's file (`final.png` for the pick, `refined/<candidate>.png` for a
    /// runner-up), once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The refined image (in memory until written).
    #[serde(skip)]
    pub image: Option<Arc<RgbImage>>,
}

/// Judge traffic of this edit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeTotals {
    /// Calls made (including cached and failed ones).
    pub calls: u64,
    /// Judge results that failed (a failed VIE score, two calls, counts once).
    pub failures: u64,
    /// Calls served from the cache.
    pub cached: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

impl JudgeTotals {
    /// Adds one call's result: a call, its cost (a failed call's too, when it got a reply),
    /// and a failure if it failed.
    pub fn record<T>(&mut self, result: &Result<T, JudgeError>, usage: Option<&CallUsage>) {
        let usage = match result {
            Ok(_) => usage,
            Err(e) => {
                self.failures += 1;
                e.usage()
            }
        };
        self.add_calls(usage, 1);
    }

    /// Adds `calls` calls and what those of them with a known cost cost.
    pub fn add_calls<'a>(&mut self, usages: impl IntoIterator<Item = &'a CallUsage>, calls: u64) {
        self.calls += calls;
        for u in usages {
            self.cached += u.cached as u64;
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
        }
    }
}

/// Wall time per phase, in seconds. Phases overlap where the pipeline overlaps them
/// (previews are screened while later previews decode), so they need not sum to `total`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Encoding the prompt and masked diptych.
    pub prepare_s: f64,
    /// Probe steps / short runs.
    pub probe_s: f64,
    /// Preview decoding and screening (or tournament comparisons).
    pub screen_s: f64,
    /// Completing survivors.
    pub complete_s: f64,
    /// Final decoding and VIE scoring.
    pub score_s: f64,
    /// The whole edit.
    pub total_s: f64,
}

/// The schedule used, for reproduction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// Steps of the full schedule.
    pub steps: usize,
    /// Dynamic shift.
    pub mu: f64,
    /// Image tokens `mu` was computed from.
    pub image_tokens: usize,
    /// The `steps + 1` sigmas.
    pub sigmas: Vec<f64>,
}

/// The full record of one edit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EditReport {
    /// [`REPORT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// icedit-scale version.
    pub tool_version: String,
    /// Edit id.
    pub edit_id: String,
    /// The instruction.
    pub instruction: String,
    /// The exact prompt given to the generator.
    pub prompt: String,
    /// Panel width and height.
    pub panel: (u32, u32),
    /// Generator name and details.
    pub generator: String,
    /// The generator's settings beyond the strategy (FLUX: `guidance`, `lora_scale`,
    /// `t5_tokens`, `dtype`, `linear_formats`, ...; the testbed: `difficulty`, `contrast`).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub generator_settings: serde_json::Value,
    /// Judge name.
    pub judge: String,
    /// What the screening scores in `candidates[].screens` are: `vie` (0-10) or `reward`
    /// (a reward model's own scale, not comparable with VIE O). VIE scores are always VIE.
    #[serde(default = "ScoreKind::vie")]
    pub screen_scores: ScoreKind,
    /// The strategy and its parameters.
    pub strategy: StrategyConfig,
    /// The schedule.
    pub schedule: ScheduleRecord,
    /// Every candidate.
    pub candidates: Vec<CandidateRecord>,
    /// Tournament comparisons, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub comparisons: Vec<ComparisonRecord>,
    /// Adaptive: its rounds and why it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveRecord>,
    /// The returned edit (absent only when nothing finished).
    pub pick: Option<Pick>,
    /// The pick's hi-res refine, when one was asked for (then `pick_file` is the refined
    /// image and `edit_file` the pick at the edit's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<RefineRecord>,
    /// With `refine_best` above 1: the next best finished candidates' refines, in rank
    /// order (written to `refined/`; the pick's own is `refine`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runner_up_refines: Vec<RefineRecord>,
    /// Why a refine asked for did not finish (the pick's, or a runner-up's after it): the
    /// edit is returned at its own size (or with the refines that did finish), and `edit`
    /// and `batch` count it as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine_error: Option<String>,
    /// The pick at the edit's size, when a refine replaced it as `final.png`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit_file: Option<String>,
    /// File of the returned edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pick_file: Option<String>,
    /// Fallbacks and other events worth a reader's attention (all-fail, ties, ...).
    pub notes: Vec<String>,
    /// NFE per phase.
    pub nfe: NfeLedger,
    /// The edit's forwards by kind and their FLOPs, the sum over `candidates`
    /// (`full + cached == nfe.total`).
    #[serde(default)]
    pub forwards: ForwardCounts,
    /// Judge traffic.
    pub judge_totals: JudgeTotals,
    /// Wall times.
    pub timings: Timings,
}

impl EditReport {
    /// The picked candidate.
    pub fn picked(&self) -> Option<&CandidateRecord> {
        self.pick.as_ref().map(|p| &self.candidates[p.index])
    }

    /// Why the returned edit has no VIE score although a judge was there to give one
    /// (every scoring call failed, or nothing finished): `edit` exits with its own code and
    /// `batch` marks the item failed, both for a rerun to retry. `None` when the pick is
    /// scored, or when the edit ran without a judge (`--judge none`: nothing scores).
    pub fn unscored_reason(&self) -> Option<String> {
        let scored = self
            .picked()
            .and_then(|c| c.vie.as_ref())
            .is_some_and(|v| v.ok().is_some());
        let without_judge = self.judge == NO_JUDGE && self.judge_totals.calls == 0;
        if scored || (without_judge && self.pick.is_some()) {
            return None;
        }
        let why = self
            .candidates
            .iter()
            .find_map(|c| match &c.vie {
                Some(Judged::Failed(e)) => Some(e.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "nothing finished".into());
        Some(format!("no edit could be scored: {why}"))
    }

    /// Why this edit did not give all that was asked of it, for a rerun to retry: no
    /// scored pick ([`Self::unscored_reason`]) or a refine that failed.
    pub fn incomplete_reason(&self) -> Option<String> {
        self.unscored_reason().or_else(|| self.refine_failure())
    }

    /// Why the refine failed, when it did (the edit itself is kept at its own size).
    pub fn refine_failure(&self) -> Option<String> {
        self.refine_error
            .as_ref()
            .map(|e| format!("the refine failed (the edit is kept at its own size): {e}"))
    }
}

/// The `judge` of a report made without one.
pub const NO_JUDGE: &str = "none";
