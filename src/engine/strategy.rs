//! Scaling strategies as plain data, with their exact NFE (model forward) accounting.
//!
//! One NFE is one transformer forward for one candidate at one step.
//!
//! [`StrategyConfig::default`] is the one source of the defaults (N 8, k 4, M 2, 50
//! steps): the CLI's flags, suite arms and manifest lines are all [`StrategyOverrides`]
//! laid over it by [`StrategyOverrides::apply`], and [`StrategyConfig::check`] names the
//! field the way its source writes it (`--probe-steps`, `probe_steps` in arm `ef`, manifest
//! line 3).

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::generate::StepCache;

/// How candidates are spawned, pruned and completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// One seed, full schedule: the baseline.
    Random,
    /// N seeds, full schedule each, pick by VIE O.
    BestOfN,
    /// N seeds probed k steps, previews screened, up to M survivors completed, pick by VIE O.
    EarlyFilter,
    /// The paper's recipe: a short complete k-step run per seed, pairwise
    /// champion-vs-challenger comparisons, the winner re-run at full steps.
    Tournament,
    /// Probe k steps, keep the better half, probe k more, ... until M remain; complete them.
    SuccessiveHalving,
    /// Seeds in waves: each wave probed k steps and screened, the best M passing candidates
    /// (this wave's or pooled from earlier ones) completed and VIE-scored; stops once a
    /// completed candidate's O reaches the target, when N seeds are spent, or at the budget.
    Adaptive,
}

impl StrategyKind {
    /// The CLI / report name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::BestOfN => "best-of-n",
            Self::EarlyFilter => "early-filter",
            Self::Tournament => "tournament",
            Self::SuccessiveHalving => "successive-halving",
            Self::Adaptive => "adaptive",
        }
    }
}

/// A strategy with its parameters. Missing fields take their defaults when deserialized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StrategyConfig {
    /// Which strategy.
    #[serde(alias = "strategy")]
    pub kind: StrategyKind,
    /// N: number of seed candidates (ignored by `random`, which uses one).
    pub seeds: usize,
    /// k: probe steps (early-filter, successive-halving per round) or the short-run length
    /// (tournament).
    pub probe_steps: usize,
    /// M: survivors to complete (early-filter, successive-halving).
    pub keep: usize,
    /// Steps of the full schedule.
    pub steps: usize,
    /// Seed of candidate 0; candidate i uses `base_seed + i` unless `seed_list` is given.
    #[serde(alias = "seed")]
    pub base_seed: u64,
    /// Explicit seeds, overriding `base_seed` (its length sets N).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_list: Option<Vec<u64>>,
    /// Adaptive: seeds spawned per wave.
    pub wave: usize,
    /// Adaptive: stop once a completed candidate's VIE O (0-10) reaches this. Always
    /// finite once checked; a `null` (how JSON wrote a NaN before that) reads back as NaN,
    /// so a journaled request holding one is refused by name instead of unreadable.
    #[serde(deserialize_with = "float_or_null")]
    pub target: f32,
    /// A hard cap on this edit's NFE. Adaptive checks it before every wave and completion;
    /// the other strategies are sized to it by [`StrategyConfig::fit_to_budget`], their
    /// planned NFE being their most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_nfe: Option<usize>,
    /// Hi-res refine of the pick: the panel width it is refined at (`None`: the edit is
    /// returned at its own size). Its forwards are reported apart and are not part of
    /// `budget_nfe` (see [`StrategyConfig::planned_nfe`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<u32>,
    /// How much of the schedule the refine re-runs (diffusers' `strength`, in (0, 1]).
    pub refine_strength: f64,
    /// Blend the source back, at full resolution, where the edit changed nothing.
    pub refine_keep_unchanged: bool,
    /// How many of the best finished candidates are refined (1: the pick only). The pick's
    /// refine is the returned edit; the runner-ups' are written beside it, one after the
    /// other at batch 1 (the memory plan's refine phase holds for any count).
    pub refine_best: usize,
    /// The step cache of completions (`none`, `fbc:0.12`, `taylorseer:interval=4,order=1`):
    /// survivors' completions, the full runs of `random` and `best-of-n` and the
    /// tournament's re-run start each candidate's cache afresh and may skip work with it;
    /// probe steps and the tournament's short runs always run in full, so every preview a
    /// judge sees is exact. A cached forward is still one NFE, in the report and against
    /// every budget: budgets count forwards, whatever each one ran.
    pub cache: StepCache,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            kind: StrategyKind::EarlyFilter,
            seeds: 8,
            probe_steps: 4,
            keep: 2,
            steps: 50,
            base_seed: 0,
            seed_list: None,
            wave: DEFAULT_WAVE,
            target: DEFAULT_TARGET,
            budget_nfe: None,
            refine: None,
            refine_strength: DEFAULT_REFINE_STRENGTH,
            refine_keep_unchanged: false,
            refine_best: 1,
            cache: StepCache::None,
        }
    }
}

/// The refine's default strength: the last 35% of the schedule re-run (10 of 28 steps, 17
/// of 50). A hi-res pass must keep the picked edit's composition and redraw its texture;
/// at 0.35 the start sigma of a 1024-wide FLUX schedule is about 0.6, where layout is
/// settled and detail is not. Chosen, not measured on real weights here (see
/// docs/commands.md, `--refine`).
pub const DEFAULT_REFINE_STRENGTH: f64 = 0.35;

/// The most candidates one edit refines (`refine_best`): each is a full hi-res pass.
pub const MAX_REFINE_BEST: usize = 16;

/// An `f32` that JSON may hold as `null` (serde_json writes non-finite floats so): NaN.
fn float_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
}

/// Adaptive's default wave size. Measured on 200 testbed edits (docs/eval.md, "Which
/// strategy at which budget"): with k = 4 and M = 1, waves of 4 reach early-filter
/// (8, 4, 2)'s correct rate at 0.58x its NFE; waves of 2 or 3 spend more (a small wave
/// often holds no winner).
pub const DEFAULT_WAVE: usize = 4;

/// Adaptive's default M, completions per wave (other strategies default to 2): one
/// completion a wave reaches early-filter (8, 4, 2)'s correct rate at 0.58x its NFE on the
/// testbed, two spend 0.94x for no gain (docs/eval.md, "Which strategy at which budget").
pub const DEFAULT_ADAPTIVE_KEEP: usize = 1;

/// Adaptive's default target VIE O, on the testbed judge's scale: a target of 9 spent 10%
/// more NFE for no gain there (docs/eval.md, "Which strategy at which budget"). A real
/// judge's scale differs: set the O it gives a good edit.
pub const DEFAULT_TARGET: f32 = 8.0;

/// The most candidates one edit may spawn. Every candidate keeps its latent state (512 KiB
/// in f32 for a 512 px panel) and its previews and final (768 KiB each) in memory until the
/// edit's report is written, and costs judge calls: 1024 candidates already hold ~2 GB.
pub const MAX_SEEDS: usize = 1024;

/// The most steps a schedule may have. FLUX's flow-matching scheduler is trained on 1000
/// timesteps (`num_train_timesteps`); a finer schedule samples between them and buys nothing.
pub const MAX_STEPS: usize = 1000;

impl StrategyConfig {
    /// The seeds of the candidates, in candidate order (`base_seed + i`, wrapping past
    /// `u64::MAX`; [`StrategyConfig::check`] refuses such a configuration).
    pub fn candidate_seeds(&self) -> Vec<u64> {
        if let Some(list) = &self.seed_list {
            return list.iter().take(self.candidate_count()).copied().collect();
        }
        (0..self.candidate_count() as u64)
            .map(|i| self.base_seed.wrapping_add(i))
            .collect()
    }

    /// The most candidates this strategy advances together, which a forward batches up to
    /// `--batch-size` of: every candidate in the first phase (best-of-N's full runs,
    /// early-filter's and successive halving's probes, the tournament's short runs), one for
    /// `random`; for adaptive a wave's probes or the M completed after it, whichever is
    /// more. Later phases run fewer (survivors, the tournament's re-run), never more.
    pub fn candidates_together(&self) -> usize {
        let n = self.candidate_count();
        match self.kind {
            StrategyKind::Adaptive => self.wave.max(self.keep).min(n),
            _ => n,
        }
    }

    /// Number of candidates actually spawned (`random` spawns one).
    pub fn candidate_count(&self) -> usize {
        let n = self.seed_list.as_ref().map_or(self.seeds, Vec::len);
        if self.kind == StrategyKind::Random {
            n.min(1)
        } else {
            n
        }
    }

    /// Rejects parameter combinations that cannot run (the engine's own check; callers
    /// that know where the values came from use [`StrategyConfig::check`]).
    pub fn validate(&self) -> Result<(), StrategyError> {
        self.check(&ValueSource::Program)
    }

    /// Rejects parameter combinations that cannot run, naming the field as `origin` writes
    /// it and the bound it breaks.
    pub fn check(&self, origin: &ValueSource) -> Result<(), StrategyError> {
        let name = |f: StrategyField| origin.name(f);
        let bad = |field: StrategyField, message: String| {
            Err(StrategyError {
                origin: origin.clone(),
                field,
                message,
            })
        };
        let n = self.candidate_count();
        // One number rule: every float is finite, whether or not this strategy reads it (a
        // NaN is journaled as null and cannot be read back).
        if !self.target.is_finite() {
            return bad(
                StrategyField::Target,
                format!(
                    "{} {} must be a finite number (a VIE O between 0 and 10)",
                    name(StrategyField::Target),
                    self.target
                ),
            );
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return bad(
                StrategyField::Steps,
                format!(
                    "{} {} must be between 1 and {MAX_STEPS} (the scheduler's training timesteps)",
                    name(StrategyField::Steps),
                    self.steps
                ),
            );
        }
        let given = self.seed_list.as_ref().map_or(self.seeds, Vec::len);
        if n == 0 || given > MAX_SEEDS {
            return bad(
                StrategyField::Seeds,
                format!(
                    "{} {given} must be between 1 and {MAX_SEEDS} (every candidate is held in memory until the edit is written)",
                    name(StrategyField::Seeds)
                ),
            );
        }
        if let Some(list) = &self.seed_list {
            let mut seen = std::collections::HashSet::new();
            if let Some(repeat) = list.iter().find(|s| !seen.insert(**s)) {
                return bad(
                    StrategyField::Seeds,
                    format!(
                        "{} repeats seed {repeat}: each candidate needs its own seed (the same seed gives the same image)",
                        origin.seed_list_name()
                    ),
                );
            }
        } else if self.base_seed.checked_add(n as u64 - 1).is_none() {
            return bad(
                StrategyField::Seed,
                format!(
                    "{} {} + {} candidates passes the largest seed ({}): give a smaller seed",
                    name(StrategyField::Seed),
                    self.base_seed,
                    n,
                    u64::MAX
                ),
            );
        }
        if self.kind == StrategyKind::Adaptive && (self.wave == 0 || self.wave > n) {
            return bad(
                StrategyField::Wave,
                format!(
                    "{} {} must be between 1 and the number of seeds ({n})",
                    name(StrategyField::Wave),
                    self.wave
                ),
            );
        }
        // Checked whether or not the strategy reads it, like every bound: a value no
        // strategy could take is a mistake wherever it is written.
        if !(0.0..=10.0).contains(&self.target) {
            return bad(
                StrategyField::Target,
                format!(
                    "{} {} must be a VIE O between 0 and 10",
                    name(StrategyField::Target),
                    self.target
                ),
            );
        }
        if let Some(width) = self.refine {
            if let Some(reason) = crate::edit::panel_width_error(width) {
                return bad(
                    StrategyField::Refine,
                    format!("{} {width}: {reason}", name(StrategyField::Refine)),
                );
            }
        }
        if !(self.refine_strength > 0.0 && self.refine_strength <= 1.0) {
            return bad(
                StrategyField::RefineStrength,
                format!(
                    "{} {} must be above 0 and at most 1 (the share of the schedule re-run)",
                    name(StrategyField::RefineStrength),
                    self.refine_strength
                ),
            );
        }
        // diffusers' rule (`int(steps - steps * strength)`) starts a tiny strength at the
        // last step in floating point: no step would run.
        if let (Some(_), Err(why)) = (
            self.refine,
            crate::generate::schedule::start_for_strength(self.steps, self.refine_strength),
        ) {
            return bad(
                StrategyField::RefineStrength,
                format!(
                    "{} {} {why}",
                    name(StrategyField::RefineStrength),
                    self.refine_strength
                ),
            );
        }
        if self.refine_best == 0 || self.refine_best > MAX_REFINE_BEST {
            return bad(
                StrategyField::RefineBest,
                format!(
                    "{} {} must be between 1 and {MAX_REFINE_BEST} (how many of the best finished candidates are refined)",
                    name(StrategyField::RefineBest),
                    self.refine_best
                ),
            );
        }
        if self.refine_best > 1 && self.refine.is_none() {
            return bad(
                StrategyField::RefineBest,
                format!(
                    "{} {} refines candidates only with {} WIDTH",
                    name(StrategyField::RefineBest),
                    self.refine_best,
                    name(StrategyField::Refine)
                ),
            );
        }
        if let Some(budget) = self.budget_nfe {
            // Adaptive needs room for one wave of one seed and its completion; the others
            // must be sized to fit (their planned NFE is their most).
            let (least, what) = match self.kind {
                StrategyKind::Adaptive => (self.steps, "one seed probed and completed"),
                _ => (self.planned_nfe(), "this configuration's planned NFE"),
            };
            if budget < least {
                return bad(
                    StrategyField::Budget,
                    format!(
                        "{} {budget} is less than {what} ({least} NFE)",
                        name(StrategyField::Budget)
                    ),
                );
            }
        }
        if let Err(why) = self.cache.check() {
            return bad(
                StrategyField::Cache,
                format!("{} {}: {why}", name(StrategyField::Cache), self.cache),
            );
        }
        match self.kind {
            StrategyKind::Random | StrategyKind::BestOfN => Ok(()),
            StrategyKind::EarlyFilter
            | StrategyKind::SuccessiveHalving
            | StrategyKind::Adaptive => {
                if self.probe_steps == 0 || self.probe_steps >= self.steps {
                    return bad(
                        StrategyField::ProbeSteps,
                        format!(
                            "{} {} must be between 1 and {} - 1 ({})",
                            name(StrategyField::ProbeSteps),
                            self.probe_steps,
                            name(StrategyField::Steps),
                            self.steps - 1
                        ),
                    );
                }
                if self.keep == 0 || self.keep > n {
                    return bad(
                        StrategyField::Keep,
                        format!(
                            "{} {} must be between 1 and the number of seeds ({n})",
                            name(StrategyField::Keep),
                            self.keep
                        ),
                    );
                }
                Ok(())
            }
            StrategyKind::Tournament => {
                // The short run has a schedule of its own: bounded like `steps`, so one
                // request cannot ask for millions of forwards (or a schedule that does not
                // fit in memory).
                if self.probe_steps == 0 || self.probe_steps > MAX_STEPS {
                    return bad(
                        StrategyField::ProbeSteps,
                        format!(
                            "{} {} (the short-run length) must be between 1 and {MAX_STEPS}",
                            name(StrategyField::ProbeSteps),
                            self.probe_steps
                        ),
                    );
                }
                Ok(())
            }
        }
    }

    /// The most NFE this strategy spends: what it spends when every screen passes as
    /// planned, i.e. with exactly `keep` survivors. Early-filter: `N*k + M*(steps-k)`;
    /// tournament: `N*k + steps`; best-of-N: `N*steps`; random: `steps`; successive halving:
    /// the sum over its rounds; adaptive: every wave probed and M completed per wave,
    /// `N*k + min(ceil(N/W)*M, N)*(steps-k)`, or the budget when that is less (adaptive
    /// usually stops far earlier: the report has what it spent).
    pub fn planned_nfe(&self) -> usize {
        let n = self.candidate_count();
        let (k, m, steps) = (self.probe_steps, self.keep, self.steps);
        match self.kind {
            StrategyKind::Adaptive => {
                let most = n * k + (n.div_ceil(self.wave.max(1)) * m).min(n) * (steps - k);
                self.budget_nfe.map_or(most, |b| b.min(most))
            }
            StrategyKind::Random => steps,
            StrategyKind::BestOfN => n * steps,
            StrategyKind::EarlyFilter => n * k + m * (steps - k),
            StrategyKind::Tournament => n * k + steps,
            StrategyKind::SuccessiveHalving => {
                let mut nfe = 0;
                let mut alive = n;
                let mut at = 0;
                for round in halving_rounds(n, m, k, steps) {
                    nfe += alive * (round.to_step - at);
                    at = round.to_step;
                    alive = round.keep;
                }
                nfe + alive * (steps - at)
            }
        }
    }
}

impl StrategyConfig {
    /// The most candidates holding a step cache at once: those completed together (M
    /// survivors; every candidate of best-of-N; the tournament's one re-run; those alive
    /// after successive halving's last round, which can be more than M when the rounds
    /// run out of steps), 0 without a cache. A candidate's cache lives from its
    /// completion's first step to its last.
    pub fn cached_candidates(&self) -> usize {
        if !self.cache.is_on() {
            return 0;
        }
        let n = self.candidate_count();
        match self.kind {
            StrategyKind::Random | StrategyKind::Tournament => 1,
            StrategyKind::BestOfN => n,
            StrategyKind::SuccessiveHalving => {
                halving_rounds(n, self.keep, self.probe_steps, self.steps)
                    .last()
                    .map_or(n, |round| round.keep)
            }
            StrategyKind::EarlyFilter | StrategyKind::Adaptive => self.keep.min(n),
        }
    }

    /// The NFE of one adaptive wave and its completions (`wave` seeds, or M when more):
    /// the least an adaptive edit needs, so the floor of a budget shared per item.
    pub fn first_wave_nfe(&self) -> usize {
        StrategyConfig {
            kind: StrategyKind::Adaptive,
            seeds: self.wave.max(self.keep).max(1),
            seed_list: None,
            budget_nfe: None,
            ..self.clone()
        }
        .planned_nfe()
    }

    /// This strategy under a mean budget of `mean` NFE per edit (a batch's or a suite's):
    /// a fixed strategy sized to it, an adaptive one as it is (its items draw their shares
    /// from the pool as they run) once one wave and its completions fit. Errors say what
    /// the smallest valid configuration needs.
    pub fn under_mean_budget(&self, mean: usize) -> Result<StrategyConfig, String> {
        if self.kind == StrategyKind::Adaptive {
            let floor = self.first_wave_nfe();
            if mean < floor {
                return Err(format!(
                    "less than one wave and its completions need ({floor} NFE)"
                ));
            }
            return Ok(self.clone());
        }
        self.fit_to_budget(mean)
    }

    /// This strategy held to `nfe` (an item's share of a mean budget): sized down by
    /// [`StrategyConfig::fit_to_budget`] when its most is above `nfe`, else kept with its
    /// own N; either way with `nfe` as its cap.
    pub fn held_to(&self, nfe: usize) -> Result<StrategyConfig, String> {
        if nfe < self.planned_nfe() {
            self.fit_to_budget(nfe)
        } else {
            Ok(StrategyConfig {
                budget_nfe: Some(nfe),
                ..self.clone()
            })
        }
    }

    /// The strategy sized to a compute budget of `budget` NFE per edit: the largest N
    /// (1 to [`MAX_SEEDS`]) whose [`StrategyConfig::planned_nfe`] is at most `budget`, with
    /// k, M and the schedule as given. `random` spends `steps` NFE whatever N, so it fits
    /// when `steps <= budget`. Because the planned NFE is each strategy's most (screens that
    /// pass fewer than M complete fewer), a run never spends more than the budget; adaptive
    /// also keeps the budget as a cap it checks before every wave. The budget is recorded in
    /// `budget_nfe`. Errors say what the smallest valid configuration needs.
    pub fn fit_to_budget(&self, budget: usize) -> Result<StrategyConfig, String> {
        if self.seed_list.is_some() {
            return Err(
                "a budget sets the number of seeds: give a first seed, not a seed list".into(),
            );
        }
        let with = |n: usize| StrategyConfig {
            seeds: n,
            budget_nfe: None,
            ..self.clone()
        };
        let capped = |config: StrategyConfig| StrategyConfig {
            budget_nfe: Some(budget),
            ..config
        };
        if self.kind == StrategyKind::Random {
            return if self.steps <= budget {
                Ok(capped(with(1)))
            } else {
                Err(format!(
                    "budget {budget} NFE is less than one run of {} steps",
                    self.steps
                ))
            };
        }
        let valid = |n: usize| with(n).check(&ValueSource::Program).is_ok();
        let Some(smallest) = (1..=MAX_SEEDS).find(|&n| valid(n)) else {
            // Say which other value rules every N out (with the most seeds, a keep or a
            // wave that needs more seeds is not what is wrong).
            let why = with(MAX_SEEDS)
                .check(&ValueSource::Program)
                .err()
                .map_or_else(String::new, |e| format!(": {e}"));
            return Err(format!("no number of seeds makes this strategy valid{why}"));
        };
        // planned_nfe grows with N, so the fitting N form a prefix.
        let best = (smallest..=MAX_SEEDS)
            .take_while(|&n| with(n).planned_nfe() <= budget)
            .filter(|&n| valid(n))
            .last();
        best.map(|n| capped(with(n))).ok_or_else(|| {
            format!(
                "budget {budget} NFE is less than the smallest {} configuration needs ({} NFE with {smallest} seeds)",
                self.kind.name(),
                with(smallest).planned_nfe()
            )
        })
    }
}

/// A strategy parameter: the one list of the strategy knobs' names. The command line's
/// flags, the keys of suite arms, manifest lines and server requests, their error messages
/// and the web page's knob list all come from (or are checked against) [`Self::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyField {
    /// The strategy itself.
    Kind,
    /// N.
    Seeds,
    /// k.
    ProbeSteps,
    /// M.
    Keep,
    /// Steps of the full schedule.
    Steps,
    /// Seed of candidate 0.
    Seed,
    /// Adaptive: seeds per wave.
    Wave,
    /// Adaptive: the VIE O that stops the search.
    Target,
    /// The NFE cap per edit.
    Budget,
    /// The hi-res refine's width.
    Refine,
    /// The refine's strength.
    RefineStrength,
    /// The refine's blend of unchanged areas.
    RefineKeepUnchanged,
    /// How many of the best candidates are refined.
    RefineBest,
    /// The step cache of completions.
    Cache,
}

impl StrategyField {
    /// Every knob, in the order help and messages list them.
    pub const ALL: [Self; 14] = [
        Self::Kind,
        Self::Seeds,
        Self::ProbeSteps,
        Self::Keep,
        Self::Steps,
        Self::Seed,
        Self::Wave,
        Self::Target,
        Self::Budget,
        Self::Refine,
        Self::RefineStrength,
        Self::RefineKeepUnchanged,
        Self::RefineBest,
        Self::Cache,
    ];

    /// The knobs a suite arm or a manifest line may set ([`StrategyOverrides`]' fields):
    /// all but the budget, which is the run's.
    pub fn overridable() -> impl Iterator<Item = Self> {
        Self::ALL.into_iter().filter(|f| *f != Self::Budget)
    }

    /// `fields`' keys as a comma-separated list, for messages.
    pub fn key_list(fields: impl IntoIterator<Item = Self>) -> String {
        fields
            .into_iter()
            .map(Self::key)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The command-line flag.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Kind => "--strategy",
            Self::Seeds => "--seeds",
            Self::ProbeSteps => "--probe-steps",
            Self::Keep => "--keep",
            Self::Steps => "--steps",
            Self::Seed => "--seed",
            Self::Wave => "--wave",
            Self::Target => "--target",
            Self::Budget => "--budget-nfe",
            Self::Refine => "--refine",
            Self::RefineStrength => "--refine-strength",
            Self::RefineKeepUnchanged => "--refine-keep-unchanged",
            Self::RefineBest => "--refine-best",
            Self::Cache => "--cache",
        }
    }

    /// The key in suite and manifest files and server requests.
    pub fn key(self) -> &'static str {
        match self {
            Self::Kind => "strategy",
            Self::Seeds => "seeds",
            Self::ProbeSteps => "probe_steps",
            Self::Keep => "keep",
            Self::Steps => "steps",
            Self::Seed => "seed",
            Self::Wave => "wave",
            Self::Target => "target",
            Self::Budget => "budget_nfe",
            Self::Refine => "refine",
            Self::RefineStrength => "refine_strength",
            Self::RefineKeepUnchanged => "refine_keep_unchanged",
            Self::RefineBest => "refine_best",
            Self::Cache => "cache",
        }
    }
}

/// Where a strategy's values came from, so an error points at the place to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// Command-line flags (`--probe-steps`).
    Flags,
    /// An arm of an eval suite, by name.
    SuiteArm(String),
    /// A batch manifest line (1-based).
    ManifestLine(usize),
    /// A request to the server (form or JSON fields).
    Request,
    /// Built by code; the engine's own check.
    Program,
}

impl ValueSource {
    /// A field's name as this source writes it.
    pub fn name(&self, field: StrategyField) -> &'static str {
        match self {
            Self::Flags => field.flag(),
            _ => field.key(),
        }
    }

    /// The name of an explicit seed list as this source writes it.
    pub fn seed_list_name(&self) -> &'static str {
        match self {
            Self::Flags => "--seed-list",
            // A request gives a count as `seeds` and a list as `seed_list`.
            Self::Request => "seed_list",
            _ => "seeds",
        }
    }
}

impl std::fmt::Display for ValueSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Flags => write!(f, "command line"),
            Self::SuiteArm(arm) => write!(f, "arm `{arm}`"),
            Self::ManifestLine(line) => write!(f, "manifest line {line}"),
            Self::Request => write!(f, "request"),
            Self::Program => write!(f, "strategy"),
        }
    }
}

/// A strategy that cannot run: the field, where its value came from, and the bound it
/// breaks.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyError {
    /// Where the values came from.
    pub origin: ValueSource,
    /// The offending field.
    pub field: StrategyField,
    /// What is wrong, naming the field as the source writes it.
    pub message: String,
}

impl std::fmt::Display for StrategyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.origin {
            // A flag is named as typed; the engine's own check stands alone.
            ValueSource::Flags | ValueSource::Program => write!(f, "{}", self.message),
            origin => write!(f, "{origin}: {}", self.message),
        }
    }
}

impl std::error::Error for StrategyError {}

impl From<StrategyError> for EngineError {
    fn from(e: StrategyError) -> Self {
        EngineError::Strategy(e.to_string())
    }
}

/// N as a count (`seeds = 8`) or the candidates' seeds as a list (`seeds = [3, 7, 11]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "`seeds`: a count of seeds (e.g. 8) or a list of them (e.g. [3, 7, 11])"
)]
pub enum Seeds {
    /// Spawn this many candidates, seeded `seed, seed + 1, ...`.
    Count(usize),
    /// Exactly these seeds, one candidate each.
    List(Vec<u64>),
}

/// Strategy values as a flag set, a suite arm or a manifest line writes them: each one
/// optional, laid over a base configuration by [`StrategyOverrides::apply`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyOverrides {
    /// The strategy (`random`, `best-of-n`, `early-filter`, `tournament`,
    /// `successive-halving`, `adaptive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<StrategyKind>,
    /// N, or the explicit seeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Seeds>,
    /// k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_steps: Option<usize>,
    /// M.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
    /// Steps of the full schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Seed of candidate 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Adaptive: seeds per wave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<usize>,
    /// Adaptive: the VIE O that stops the search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f32>,
    /// The refine width; 0 switches a refine the base asks for off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<u32>,
    /// The refine's strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine_strength: Option<f64>,
    /// The refine's blend of unchanged areas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine_keep_unchanged: Option<bool>,
    /// How many of the best candidates are refined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine_best: Option<usize>,
    /// The step cache of completions (`none`, `fbc:0.12`, `taylorseer:interval=4,order=1`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "cache_key"
    )]
    pub cache: Option<StepCache>,
}

/// Reads `cache` in a suite arm or a manifest line; a bad value is refused naming the key.
fn cache_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<StepCache>, D::Error> {
    let text = String::deserialize(d)?;
    StepCache::parse_as(&text, StrategyField::Cache.key())
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl StrategyOverrides {
    /// `base` with every value given here replacing its own. A `random` strategy spawns one
    /// candidate, so its N is 1 unless a seed list says otherwise; switching to `adaptive`
    /// without an M takes [`DEFAULT_ADAPTIVE_KEEP`].
    pub fn apply(&self, base: &StrategyConfig) -> StrategyConfig {
        let mut s = base.clone();
        if let Some(kind) = self.strategy {
            s.kind = kind;
        }
        match &self.seeds {
            Some(Seeds::Count(n)) => {
                s.seeds = *n;
                s.seed_list = None;
            }
            Some(Seeds::List(list)) => {
                s.seeds = list.len();
                s.seed_list = Some(list.clone());
            }
            None => {}
        }
        s.probe_steps = self.probe_steps.unwrap_or(s.probe_steps);
        s.keep = self.keep.unwrap_or(s.keep);
        s.steps = self.steps.unwrap_or(s.steps);
        s.base_seed = self.seed.unwrap_or(s.base_seed);
        s.wave = self.wave.unwrap_or(s.wave);
        s.target = self.target.unwrap_or(s.target);
        match self.refine {
            Some(0) => s.refine = None,
            Some(width) => s.refine = Some(width),
            None => {}
        }
        s.refine_strength = self.refine_strength.unwrap_or(s.refine_strength);
        s.refine_keep_unchanged = self
            .refine_keep_unchanged
            .unwrap_or(s.refine_keep_unchanged);
        s.refine_best = self.refine_best.unwrap_or(s.refine_best);
        s.cache = self.cache.unwrap_or(s.cache);
        if s.kind == StrategyKind::Random && s.seed_list.is_none() {
            s.seeds = 1;
        }
        if s.kind == StrategyKind::Adaptive && self.keep.is_none() && base.kind != s.kind {
            s.keep = DEFAULT_ADAPTIVE_KEEP;
        }
        s
    }
}

/// One screening round of successive halving: probe to `to_step`, then keep `keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalvingRound {
    /// Step the survivors are advanced to before screening.
    pub to_step: usize,
    /// Candidates kept after screening.
    pub keep: usize,
}

/// The rounds of successive halving from `n` candidates down to `m`, probing `k` more steps
/// per round (never reaching the last step: the remainder is completion).
pub fn halving_rounds(n: usize, m: usize, k: usize, steps: usize) -> Vec<HalvingRound> {
    let mut rounds = Vec::new();
    let mut alive = n;
    let mut at = 0;
    while alive > m && at + k < steps {
        at += k;
        alive = m.max(alive.div_ceil(2));
        rounds.push(HalvingRound {
            to_step: at,
            keep: alive,
        });
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overridable_knobs_are_exactly_the_override_fields() {
        let all = StrategyOverrides {
            strategy: Some(StrategyKind::Adaptive),
            seeds: Some(Seeds::Count(4)),
            probe_steps: Some(2),
            keep: Some(1),
            steps: Some(10),
            seed: Some(3),
            wave: Some(2),
            target: Some(7.0),
            refine: Some(1024),
            refine_strength: Some(0.4),
            refine_keep_unchanged: Some(true),
            refine_best: Some(2),
            cache: Some(StepCache::FirstBlock { threshold: 0.1 }),
        };
        let json = serde_json::to_value(&all).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort();
        let mut expected: Vec<&str> = StrategyField::overridable()
            .map(StrategyField::key)
            .collect();
        expected.sort();
        assert_eq!(keys, expected);
    }

    /// The tournament's short run is bounded like any schedule: a huge `probe_steps` once
    /// reached the schedule's allocation (an abort) or overflowed the planned NFE.
    #[test]
    fn a_tournament_short_run_is_bounded_like_steps() {
        let mut c = cfg(StrategyKind::Tournament);
        for (k, ok) in [
            (1, true),
            (MAX_STEPS, true),
            (MAX_STEPS + 1, false),
            (usize::MAX, false),
        ] {
            c.probe_steps = k;
            let checked = c.check(&ValueSource::Flags);
            assert_eq!(checked.is_ok(), ok, "probe_steps {k}: {checked:?}");
            if let Err(e) = checked {
                assert_eq!(e.field, StrategyField::ProbeSteps);
            }
            // Sizing to a budget refuses it without overflowing.
            assert!(ok || c.fit_to_budget(1000).is_err());
        }
    }

    /// Successive halving completes those alive after its last round together: with 16
    /// seeds, k = 10 and 28 steps the rounds stop at 4 alive, more than M = 2.
    #[test]
    fn halving_caches_every_candidate_alive_after_the_last_round() {
        let c = StrategyConfig {
            kind: StrategyKind::SuccessiveHalving,
            seeds: 16,
            probe_steps: 10,
            steps: 28,
            keep: 2,
            cache: StepCache::FirstBlock { threshold: 0.1 },
            ..StrategyConfig::default()
        };
        assert_eq!(c.cached_candidates(), 4);
        let enough_steps = StrategyConfig {
            steps: 50,
            ..c.clone()
        };
        assert_eq!(enough_steps.cached_candidates(), 2);
    }

    /// A budget that no N can meet because another value is wrong says which.
    #[test]
    fn an_unfittable_budget_names_the_value_that_rules_every_n_out() {
        let mut c = cfg(StrategyKind::EarlyFilter);
        c.probe_steps = c.steps;
        let e = c.fit_to_budget(10_000).unwrap_err();
        assert!(e.contains("probe_steps"), "{e}");
    }

    #[test]
    fn a_budget_sets_the_largest_n_that_fits_for_each_strategy() {
        // Defaults: k = 4, M = 2, 50 steps.
        let fit = |kind, budget| cfg(kind).fit_to_budget(budget);
        // Early-filter N*4 + 2*46 <= 124 -> N = 8 (the paper's 124 NFE).
        assert_eq!(fit(StrategyKind::EarlyFilter, 124).unwrap().seeds, 8);
        assert_eq!(fit(StrategyKind::EarlyFilter, 127).unwrap().seeds, 8);
        assert_eq!(fit(StrategyKind::EarlyFilter, 128).unwrap().seeds, 9);
        // Best-of-N: N*50.
        assert_eq!(fit(StrategyKind::BestOfN, 400).unwrap().seeds, 8);
        assert_eq!(fit(StrategyKind::BestOfN, 449).unwrap().seeds, 8);
        // Tournament: N*4 + 50.
        assert_eq!(fit(StrategyKind::Tournament, 82).unwrap().seeds, 8);
        // Random spends the schedule whatever the budget above it.
        assert_eq!(fit(StrategyKind::Random, 1000).unwrap().planned_nfe(), 50);
        assert!(fit(StrategyKind::Random, 49)
            .unwrap_err()
            .contains("one run of 50 steps"));
        // Early-filter needs N >= M = 2: 2*4 + 2*46 = 100.
        let err = fit(StrategyKind::EarlyFilter, 99).unwrap_err();
        assert!(err.contains("100 NFE with 2 seeds"), "{err}");
        for kind in [
            StrategyKind::BestOfN,
            StrategyKind::EarlyFilter,
            StrategyKind::Tournament,
            StrategyKind::SuccessiveHalving,
            StrategyKind::Adaptive,
        ] {
            for budget in [100, 124, 300, 1000, 5000] {
                let Ok(c) = fit(kind, budget) else { continue };
                // Within the budget, and one more seed would not be.
                assert!(c.planned_nfe() <= budget, "{kind:?} {budget}");
                let more = StrategyConfig {
                    seeds: c.seeds + 1,
                    budget_nfe: None,
                    ..c.clone()
                };
                assert!(
                    c.seeds == MAX_SEEDS || more.planned_nfe() > budget,
                    "{kind:?} {budget}"
                );
            }
        }
        let listed = StrategyConfig {
            seed_list: Some(vec![1, 2]),
            ..cfg(StrategyKind::BestOfN)
        };
        assert!(listed.fit_to_budget(500).is_err());
        // Adaptive, waves of 4 with M = 1: N*4 + ceil(N/4)*46 <= 124 -> N = 8 (two waves).
        let adaptive = |budget| {
            StrategyConfig {
                keep: 1,
                ..cfg(StrategyKind::Adaptive)
            }
            .fit_to_budget(budget)
        };
        let a = adaptive(124).unwrap();
        assert_eq!((a.seeds, a.budget_nfe), (8, Some(124)));
        assert_eq!(a.planned_nfe(), 124);
        assert_eq!(adaptive(200).unwrap().seeds, 12);
        // The smallest: one wave of 4 and a completion, 62.
        let err = adaptive(61).unwrap_err();
        assert!(err.contains("62 NFE with 4 seeds"), "{err}");
        // Every fitted configuration records its budget and passes the check.
        let ef = fit(StrategyKind::EarlyFilter, 124).unwrap();
        assert_eq!(ef.budget_nfe, Some(124));
        ef.validate().unwrap();
    }

    #[test]
    fn adaptive_parameters_are_checked_by_name() {
        let a = |wave, target, budget_nfe| StrategyConfig {
            wave,
            target,
            budget_nfe,
            ..cfg(StrategyKind::Adaptive)
        };
        assert!(a(4, 8.0, None).check(&ValueSource::Flags).is_ok());
        let e = a(0, 8.0, None).check(&ValueSource::Flags).unwrap_err();
        assert!(e.message.contains("--wave 0"), "{e}");
        let e = a(9, 8.0, None).check(&ValueSource::Flags).unwrap_err();
        assert!(e.message.contains("number of seeds (8)"), "{e}");
        let e = a(4, 11.0, None).check(&ValueSource::Flags).unwrap_err();
        assert!(e.message.contains("--target 11"), "{e}");
        assert!(a(4, f32::NAN, None).check(&ValueSource::Flags).is_err());
        let e = a(4, 8.0, Some(40))
            .check(&ValueSource::SuiteArm("ad".into()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "arm `ad`: budget_nfe 40 is less than one seed probed and completed (50 NFE)"
        );
        // A fixed strategy must fit the budget it claims.
        let ef = StrategyConfig {
            budget_nfe: Some(100),
            ..cfg(StrategyKind::EarlyFilter)
        };
        let e = ef.check(&ValueSource::Flags).unwrap_err();
        assert!(e.message.contains("planned NFE (124 NFE)"), "{e}");
        // Without a budget, adaptive's most: 2 waves of 4 probed, M = 2 completed per wave.
        assert_eq!(a(4, 8.0, None).planned_nfe(), 8 * 4 + 4 * 46);
        assert_eq!(a(1, 8.0, None).planned_nfe(), 8 * 50);
        assert_eq!(a(4, 8.0, Some(100)).planned_nfe(), 100);
    }

    fn cfg(kind: StrategyKind) -> StrategyConfig {
        StrategyConfig {
            kind,
            ..StrategyConfig::default()
        }
    }

    #[test]
    fn a_non_finite_target_is_refused_whatever_the_strategy() {
        for kind in [
            StrategyKind::Random,
            StrategyKind::BestOfN,
            StrategyKind::EarlyFilter,
            StrategyKind::Tournament,
            StrategyKind::SuccessiveHalving,
            StrategyKind::Adaptive,
        ] {
            for target in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let c = StrategyConfig {
                    target,
                    ..cfg(kind)
                };
                let e = c.check(&ValueSource::Request).unwrap_err();
                assert_eq!(e.field, StrategyField::Target, "{kind:?} {target}");
                assert!(e.message.contains("finite"), "{e}");
                let e = c.check(&ValueSource::Flags).unwrap_err();
                assert!(e.message.starts_with(&format!("--target {target}")), "{e}");
            }
        }
        // Out of range is refused too, whether or not the strategy reads the target.
        let ef = StrategyConfig {
            target: 42.0,
            ..cfg(StrategyKind::EarlyFilter)
        };
        assert_eq!(ef.validate().unwrap_err().field, StrategyField::Target);
    }

    #[test]
    fn nfe_formulas() {
        // N=8, k=4, M=2, steps=50.
        assert_eq!(cfg(StrategyKind::EarlyFilter).planned_nfe(), 8 * 4 + 2 * 46);
        assert_eq!(cfg(StrategyKind::BestOfN).planned_nfe(), 400);
        assert_eq!(cfg(StrategyKind::Random).planned_nfe(), 50);
        assert_eq!(cfg(StrategyKind::Tournament).planned_nfe(), 8 * 4 + 50);
        // Paper: 6 seeds, 10-step previews, 50-step winner = 110.
        let paper = StrategyConfig {
            kind: StrategyKind::Tournament,
            seeds: 6,
            probe_steps: 10,
            ..StrategyConfig::default()
        };
        assert_eq!(paper.planned_nfe(), 110);
        // Halving 8 -> 4 (step 4) -> 2 (step 8): 8*4 + 4*4 + 2*42.
        assert_eq!(
            halving_rounds(8, 2, 4, 50),
            vec![
                HalvingRound {
                    to_step: 4,
                    keep: 4
                },
                HalvingRound {
                    to_step: 8,
                    keep: 2
                }
            ]
        );
        assert_eq!(
            cfg(StrategyKind::SuccessiveHalving).planned_nfe(),
            8 * 4 + 4 * 4 + 2 * 42
        );
    }

    #[test]
    fn seeds_and_validation() {
        assert_eq!(cfg(StrategyKind::Random).candidate_seeds(), vec![0]);
        let mut c = cfg(StrategyKind::EarlyFilter);
        c.base_seed = 10;
        assert_eq!(c.candidate_seeds(), (10..18).collect::<Vec<_>>());
        c.seed_list = Some(vec![5, 9]);
        assert_eq!(c.candidate_count(), 2);
        assert!(c.validate().is_ok());
        c.keep = 3;
        let err = c.check(&ValueSource::Flags).unwrap_err();
        assert_eq!(err.field, StrategyField::Keep);
        assert!(err.to_string().contains("--keep"), "{err}");
        let mut c = cfg(StrategyKind::EarlyFilter);
        c.probe_steps = 50;
        assert!(c
            .check(&ValueSource::Flags)
            .unwrap_err()
            .to_string()
            .starts_with("--probe-steps 50 must be between 1 and --steps - 1 (49)"));
    }

    #[test]
    fn seeds_are_bounded_distinct_and_never_wrap() {
        let at = |f: &dyn Fn(&mut StrategyConfig)| {
            let mut c = StrategyConfig::default();
            f(&mut c);
            c.check(&ValueSource::Flags).map_err(|e| e.to_string())
        };
        let err = at(&|c| c.seed_list = Some(vec![3, 3, 3])).unwrap_err();
        assert!(err.contains("--seed-list repeats seed 3"), "{err}");
        let err = at(&|c| c.base_seed = u64::MAX).unwrap_err();
        assert!(
            err.starts_with("--seed 18446744073709551615 + 8 candidates passes"),
            "{err}"
        );
        // The last seed may be u64::MAX itself.
        at(&|c| c.base_seed = u64::MAX - 7).unwrap();
        let err = at(&|c| c.seeds = 100_000_000).unwrap_err();
        assert!(
            err.starts_with("--seeds 100000000 must be between 1 and 1024"),
            "{err}"
        );
        let err = at(&|c| c.steps = 4_000_000_000).unwrap_err();
        assert!(
            err.starts_with("--steps 4000000000 must be between 1 and 1000"),
            "{err}"
        );
        // A random run of a huge N is one candidate, but N is still checked.
        let random = StrategyConfig {
            kind: StrategyKind::Random,
            base_seed: u64::MAX,
            ..StrategyConfig::default()
        };
        assert_eq!(random.candidate_seeds(), vec![u64::MAX]);
        random.check(&ValueSource::Flags).unwrap();
    }

    #[test]
    fn errors_name_the_field_as_its_source_writes_it() {
        let c = StrategyConfig {
            probe_steps: 50,
            ..StrategyConfig::default()
        };
        let arm = c.check(&ValueSource::SuiteArm("ef".into())).unwrap_err();
        assert_eq!(
            arm.to_string(),
            "arm `ef`: probe_steps 50 must be between 1 and steps - 1 (49)"
        );
        let line = c.check(&ValueSource::ManifestLine(3)).unwrap_err();
        assert!(line
            .to_string()
            .starts_with("manifest line 3: probe_steps 50"));
    }

    #[test]
    fn overrides_lay_over_the_defaults() {
        let base = StrategyConfig::default();
        let o: StrategyOverrides =
            serde_json::from_str(r#"{"strategy": "best-of-n", "seeds": [3, 7], "steps": 28}"#)
                .unwrap();
        let s = o.apply(&base);
        assert_eq!((s.kind, s.seeds, s.steps), (StrategyKind::BestOfN, 2, 28));
        assert_eq!(s.candidate_seeds(), vec![3, 7]);
        assert_eq!((s.probe_steps, s.keep), (base.probe_steps, base.keep));
        let o: StrategyOverrides = toml::from_str("seeds = 16\nseed = 5").unwrap();
        let s = o.apply(&base);
        assert_eq!(s.candidate_seeds(), (5..21).collect::<Vec<_>>());
        // Random spawns one candidate.
        let o = StrategyOverrides {
            strategy: Some(StrategyKind::Random),
            ..Default::default()
        };
        assert_eq!(o.apply(&base).seeds, 1);
        // A whole config deserializes with defaults for what is missing.
        let c: StrategyConfig = toml::from_str("strategy = \"tournament\"").unwrap();
        assert_eq!(c.kind, StrategyKind::Tournament);
        assert_eq!(c.steps, 50);
        assert_eq!(c.cache, StepCache::None);
    }

    #[test]
    fn the_cache_is_a_knob_read_as_its_string_and_refused_by_its_name() {
        let o: StrategyOverrides =
            toml::from_str("cache = \"taylorseer:interval=4,order=1\"").unwrap();
        let s = o.apply(&StrategyConfig::default());
        assert_eq!(
            s.cache.to_string(),
            "taylorseer:interval=4,order=1,warmup=3,factors=bf16"
        );
        // Other knobs leave it; an override of another knob keeps the base's cache.
        let cached = StrategyConfig {
            cache: StepCache::FirstBlock { threshold: 0.12 },
            ..StrategyConfig::default()
        };
        let o: StrategyOverrides = serde_json::from_str(r#"{"seeds": 4}"#).unwrap();
        assert_eq!(o.apply(&cached).cache, cached.cache);
        let o: StrategyOverrides = serde_json::from_str(r#"{"cache": "none"}"#).unwrap();
        assert_eq!(o.apply(&cached).cache, StepCache::None);
        // Written as the string in report.json and read back.
        let json = serde_json::to_value(&cached).unwrap();
        assert_eq!(json["cache"], "fbc:0.12");
        let back: StrategyConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, cached);
        // A bad value names the key.
        let e = serde_json::from_str::<StrategyOverrides>(r#"{"cache": "fbc:x"}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cache \"fbc:x\": threshold \"x\" is not a number"),
            "{e}"
        );
        let e = toml::from_str::<StrategyOverrides>("cache = \"lru\"").unwrap_err();
        assert!(e.to_string().contains("cache \"lru\": unknown kind"), "{e}");
        // A value made in code is checked like the others, named as its source writes it.
        let bad = StrategyConfig {
            cache: StepCache::FirstBlock { threshold: -1.0 },
            ..StrategyConfig::default()
        };
        let e = bad.check(&ValueSource::Flags).unwrap_err();
        assert_eq!(e.field, StrategyField::Cache);
        assert!(e.message.starts_with("--cache fbc:-1: threshold"), "{e}");
        let e = bad.check(&ValueSource::ManifestLine(2)).unwrap_err();
        assert!(
            e.to_string().starts_with("manifest line 2: cache fbc:-1"),
            "{e}"
        );
    }

    #[test]
    fn the_candidates_holding_a_cache_are_those_completed_together() {
        let with = |kind, cache| StrategyConfig {
            kind,
            cache,
            ..StrategyConfig::default()
        };
        let fbc = StepCache::FirstBlock { threshold: 0.1 };
        assert_eq!(
            with(StrategyKind::EarlyFilter, StepCache::None).cached_candidates(),
            0
        );
        assert_eq!(with(StrategyKind::EarlyFilter, fbc).cached_candidates(), 2);
        assert_eq!(
            with(StrategyKind::SuccessiveHalving, fbc).cached_candidates(),
            2
        );
        assert_eq!(with(StrategyKind::BestOfN, fbc).cached_candidates(), 8);
        assert_eq!(with(StrategyKind::Tournament, fbc).cached_candidates(), 1);
        assert_eq!(with(StrategyKind::Random, fbc).cached_candidates(), 1);
    }
}
