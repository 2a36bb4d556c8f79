//! Evaluation suites: TOML files under `eval/` naming a dataset, the strategies to compare
//! (each with its parameters), the judge that selects inside the strategies and a separate
//! judge that scores the returned edits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dataset::{DatasetSpec, Selection};
use crate::engine::strategy::{StrategyField, MAX_SEEDS, MAX_STEPS};
use crate::engine::{Seeds, StrategyConfig, StrategyKind, StrategyOverrides, ValueSource};
use crate::error::EditError;

/// One strategy arm of a suite: a name and the strategy values that differ from the
/// suite's (`strategy` is required; `seeds`, `probe_steps`, `keep`, `steps`, `seed` are
/// optional and default to the suite's, then to [`StrategyConfig::default`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Arm {
    /// Name in reports, e.g. `ef-8-4-2`.
    pub name: String,
    /// The strategy values of this arm.
    #[serde(flatten)]
    pub overrides: StrategyOverrides,
    /// Keys that are none of the above (refused by [`Suite::validate`]; serde cannot deny
    /// unknown fields next to a flattened struct).
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, toml::Value>,
}

fn default_width() -> u32 {
    512
}
fn default_resamples() -> usize {
    2000
}
fn testbed() -> String {
    "testbed".into()
}

/// A parameter grid: one arm per combination of the values listed (a key left out takes
/// the suite's default). Combinations the strategy refuses (M above N, a wave above N, k
/// not below the steps) are left out, and so are names an earlier arm already has. Arms are
/// named by family and the values they run: `best-of-N`, `early-filter-N-k-M`,
/// `tournament-N-k`, `successive-halving-N-k-M`, `adaptive-N-k-M-wW-tT`. Under a mean
/// budget a fixed strategy's N is the one the budget sizes it to, not the grid's, so grid
/// points that the budget makes one configuration are one arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// The strategy family.
    pub strategy: StrategyKind,
    /// Values of N.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<usize>,
    /// Values of k.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_steps: Vec<usize>,
    /// Values of M.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<usize>,
    /// Adaptive: wave sizes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wave: Vec<usize>,
    /// Adaptive: target VIE O values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target: Vec<f32>,
}

/// `values` as options, or one `None` (the default) when the list is empty.
fn each<T: Copy>(values: &[T]) -> Vec<Option<T>> {
    if values.is_empty() {
        vec![None]
    } else {
        values.iter().copied().map(Some).collect()
    }
}

impl Grid {
    /// Refuses a list this family does not read (its arms would differ in nothing but
    /// the name they could not have) and a value no combination could take (so it is not
    /// dropped as an invalid combination without a word).
    fn check_values(&self) -> Result<(), String> {
        let uses = |field: StrategyField| match self.strategy {
            StrategyKind::Random => false,
            StrategyKind::BestOfN => field == StrategyField::Seeds,
            StrategyKind::Tournament => {
                matches!(field, StrategyField::Seeds | StrategyField::ProbeSteps)
            }
            StrategyKind::EarlyFilter | StrategyKind::SuccessiveHalving => matches!(
                field,
                StrategyField::Seeds | StrategyField::ProbeSteps | StrategyField::Keep
            ),
            StrategyKind::Adaptive => true,
        };
        let lists = [
            (StrategyField::Seeds, self.seeds.is_empty()),
            (StrategyField::ProbeSteps, self.probe_steps.is_empty()),
            (StrategyField::Keep, self.keep.is_empty()),
            (StrategyField::Wave, self.wave.is_empty()),
            (StrategyField::Target, self.target.is_empty()),
        ];
        if let Some((field, _)) = lists.iter().find(|(f, empty)| !empty && !uses(*f)) {
            return Err(format!(
                "`{}`: {} does not use it; leave it out",
                field.key(),
                self.strategy.name()
            ));
        }
        let out_of = |field: StrategyField, values: &[usize], most: usize| {
            values
                .iter()
                .find(|&&v| v == 0 || v > most)
                .map(|v| format!("`{}` value {v} must be between 1 and {most}", field.key()))
        };
        let problem = out_of(StrategyField::Seeds, &self.seeds, MAX_SEEDS)
            .or_else(|| out_of(StrategyField::ProbeSteps, &self.probe_steps, MAX_STEPS))
            .or_else(|| out_of(StrategyField::Keep, &self.keep, MAX_SEEDS))
            .or_else(|| out_of(StrategyField::Wave, &self.wave, MAX_SEEDS));
        problem.map_or(Ok(()), Err)
    }

    /// Every combination as overrides, in the order the lists give them.
    fn combinations(&self) -> Vec<StrategyOverrides> {
        let mut out = Vec::new();
        for seeds in each(&self.seeds) {
            for probe_steps in each(&self.probe_steps) {
                for keep in each(&self.keep) {
                    for wave in each(&self.wave) {
                        for target in each(&self.target) {
                            out.push(StrategyOverrides {
                                strategy: Some(self.strategy),
                                seeds: seeds.map(Seeds::Count),
                                probe_steps,
                                keep,
                                wave,
                                target,
                                ..StrategyOverrides::default()
                            });
                        }
                    }
                }
            }
        }
        out
    }
}

/// The name a grid gives a strategy: its family and the parameters that family uses.
pub fn grid_arm_name(c: &StrategyConfig) -> String {
    let (n, k, m) = (c.candidate_count(), c.probe_steps, c.keep);
    match c.kind {
        StrategyKind::Random => "random".into(),
        StrategyKind::BestOfN => format!("best-of-{n}"),
        StrategyKind::EarlyFilter => format!("early-filter-{n}-{k}-{m}"),
        StrategyKind::Tournament => format!("tournament-{n}-{k}"),
        StrategyKind::SuccessiveHalving => format!("successive-halving-{n}-{k}-{m}"),
        StrategyKind::Adaptive => format!("adaptive-{n}-{k}-{m}-w{}-t{}", c.wave, c.target),
    }
}

/// The arm and key of a value serde refused inside an arm (flattening loses both), from
/// the suite's text; `None` when the error is elsewhere.
fn arm_value_error(text: &str) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    let arms = table.get("arms")?.as_array()?;
    for (i, arm) in arms.iter().enumerate() {
        let arm = arm.as_table()?;
        let name = match arm.get("name") {
            Some(toml::Value::String(name)) => format!("arm `{name}`"),
            Some(other) => return Some(format!("arm {}: `name` = {other}: expected text", i + 1)),
            None => format!("arm {}", i + 1),
        };
        for (key, value) in arm {
            if !StrategyField::overridable().any(|f| f.key() == key) {
                continue;
            }
            let single = toml::Table::from_iter([(key.clone(), value.clone())]);
            if let Err(e) = toml::Value::Table(single).try_into::<StrategyOverrides>() {
                let why = match key.as_str() {
                    "seeds" => "expected a count of seeds or a list of seeds".to_string(),
                    _ => e.to_string().trim().to_string(),
                };
                return Some(format!("{name}: `{key}` = {value}: {why}"));
            }
        }
    }
    None
}

/// A judge as a suite names it: `testbed` or a preset path (relative to the suite file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteJudge {
    /// `testbed` or a preset file.
    #[serde(default = "testbed")]
    pub judge: String,
    /// Seed of the testbed judge's error model.
    #[serde(default)]
    pub seed: u64,
}

/// A suite file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// Suite name.
    pub name: String,
    /// What this suite measures, for the report.
    #[serde(default)]
    pub description: String,
    /// The dataset.
    pub dataset: DatasetSpec,
    /// Task filter and sub-sampling.
    #[serde(default)]
    pub selection: Selection,
    /// Panel width items are resized to.
    #[serde(default = "default_width")]
    pub width: u32,
    /// Steps of the full schedule for every arm (default: [`StrategyConfig::default`]'s).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Seed of candidate 0 (candidate i uses base_seed + i) for every arm.
    #[serde(default)]
    pub base_seed: Option<u64>,
    /// The arms; the first `random` arm is the baseline of the paired comparisons.
    #[serde(default)]
    pub arms: Vec<Arm>,
    /// Parameter grids, each expanded into one arm per valid combination (after `arms`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grid: Vec<Grid>,
    /// A mean compute budget per item, in NFE, for every arm (`--budget-nfe-mean` replaces
    /// it): fixed strategies are sized to it per item ([`StrategyConfig::fit_to_budget`]);
    /// adaptive arms share `items x budget` across the items (see
    /// [`crate::engine::budget::BudgetPool`]), never more than their own N per item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_nfe_mean: Option<usize>,
    /// The judge used inside the strategies (screening, comparing, picking).
    pub selection_judge: SuiteJudge,
    /// The judge that scores the returned edits; defaults to the selection judge (biased:
    /// the report says so).
    #[serde(default)]
    pub eval_judge: Option<SuiteJudge>,
    /// Bootstrap resamples for the confidence intervals.
    #[serde(default = "default_resamples")]
    pub resamples: usize,
}

impl Suite {
    /// Reads and validates a suite; judge preset paths become relative to the file.
    pub fn load(path: &Path) -> Result<Self, EditError> {
        Self::load_with_budget(path, None)
    }

    /// Reads and validates a suite whose mean budget is `budget_nfe_mean` when given (the
    /// command line's `--budget-nfe-mean`, replacing the file's): set before the grids are
    /// expanded, since a grid arm is named by the N the budget sizes it to.
    pub fn load_with_budget(
        path: &Path,
        budget_nfe_mean: Option<usize>,
    ) -> Result<Self, EditError> {
        let bad = |what: String| EditError::Invalid(format!("suite {}: {what}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let mut suite: Suite = toml::from_str(&text).map_err(|e| {
            // serde loses the key of a bad value inside a flattened arm: find it again.
            bad(arm_value_error(&text).unwrap_or_else(|| e.to_string()))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        match &mut suite.dataset {
            DatasetSpec::Jsonl { path }
            | DatasetSpec::EmuEdit { path }
            | DatasetSpec::GeditBench { path, .. } => rebase(path),
            DatasetSpec::Testbed { .. } => {}
        }
        if budget_nfe_mean.is_some() {
            suite.budget_nfe_mean = budget_nfe_mean;
        }
        for judge in std::iter::once(&mut suite.selection_judge).chain(suite.eval_judge.as_mut()) {
            if judge.judge != "testbed" {
                let mut p = PathBuf::from(&judge.judge);
                rebase(&mut p);
                judge.judge = p.display().to_string();
            }
        }
        suite.expand_grids().map_err(bad)?;
        suite.validate().map_err(bad)?;
        Ok(suite)
    }

    /// Appends the arms of every grid (see [`Grid`]), named by what they run under the
    /// suite's mean budget (set it first).
    pub fn expand_grids(&mut self) -> Result<(), String> {
        for (g, grid) in self.grid.clone().iter().enumerate() {
            grid.check_values()
                .map_err(|e| format!("grid {} ({}): {e}", g + 1, grid.strategy.name()))?;
            let mut added = 0;
            for overrides in grid.combinations() {
                let config = overrides.apply(&self.base_strategy());
                // Named by what it runs: under a mean budget a fixed strategy's N is the
                // budget's. One that cannot fit keeps the grid's values, for `validate`
                // to refuse by that name.
                let sized = self
                    .budget_nfe_mean
                    .and_then(|budget| config.under_mean_budget(budget).ok());
                let runs = sized.as_ref().unwrap_or(&config);
                let name = grid_arm_name(runs);
                // The N a budget sizes to replaces the grid's (M above the grid's N is no
                // reason to leave a sized point out).
                match runs.validate() {
                    // A value no strategy takes is the grid's mistake, not a combination to
                    // leave out.
                    Err(e) if e.field == StrategyField::Target => {
                        return Err(format!("grid {} ({}): {}", g + 1, grid.strategy.name(), e))
                    }
                    Err(_) => continue,
                    Ok(()) if self.arms.iter().any(|a| a.name == name) => continue,
                    Ok(()) => {}
                }
                // The arm states the N it runs (the suite as reports show it), not the
                // grid's: the budget sizes it to the same N again.
                let overrides = match &sized {
                    Some(sized) if sized.kind != StrategyKind::Adaptive => StrategyOverrides {
                        seeds: Some(Seeds::Count(sized.seeds)),
                        ..overrides
                    },
                    _ => overrides,
                };
                self.arms.push(Arm {
                    name,
                    overrides,
                    unknown: BTreeMap::new(),
                });
                added += 1;
            }
            if added == 0 {
                return Err(format!(
                    "grid {} ({}): no combination is a valid new arm",
                    g + 1,
                    grid.strategy.name()
                ));
            }
        }
        Ok(())
    }

    /// Arm `arm`'s strategy under the suite's mean budget, when there is one: fixed
    /// strategies sized to it; adaptive left as it is (its budget is shared per item by the
    /// runner). Errors name the arm.
    pub fn budgeted_config(&self, arm: &Arm) -> Result<StrategyConfig, String> {
        let config = arm.overrides.apply(&self.base_strategy());
        match self.budget_nfe_mean {
            Some(budget) => config
                .under_mean_budget(budget)
                .map_err(|e| format!("arm `{}`: budget_nfe_mean {budget}: {e}", arm.name)),
            None => Ok(config),
        }
    }

    /// Checks arm names and parameters.
    pub fn validate(&self) -> Result<(), String> {
        if self.arms.is_empty() {
            return Err("no arms".into());
        }
        if let Some(reason) = crate::edit::panel_width_error(self.width) {
            return Err(format!("width: {reason}"));
        }
        if !(100..=1_000_000).contains(&self.resamples) {
            return Err(format!(
                "resamples {} must be between 100 and 1000000 (fewer make the bootstrap intervals noise; more only cost time)",
                self.resamples
            ));
        }
        if let DatasetSpec::Testbed {
            edits, first_scene, ..
        } = &self.dataset
        {
            if !(1..=100_000).contains(edits) {
                return Err(format!(
                    "dataset.edits {edits} must be between 1 and 100000"
                ));
            }
            if first_scene.checked_add(*edits as u64).is_none() {
                return Err(format!(
                    "dataset.first_scene {first_scene} + edits {edits} passes the largest scene seed"
                ));
            }
        }
        if self.selection.limit == Some(0) {
            return Err("selection.limit 0 would evaluate nothing".into());
        }
        let mut names = std::collections::HashSet::new();
        for arm in &self.arms {
            if !names.insert(&arm.name) {
                return Err(format!("arm name `{}` used twice", arm.name));
            }
            if let Some(key) = arm.unknown.keys().next() {
                return Err(format!(
                    "arm `{}`: unknown key `{key}` (expected name, {})",
                    arm.name,
                    StrategyField::key_list(StrategyField::overridable())
                ));
            }
            if arm.overrides.strategy.is_none() {
                return Err(format!(
                    "arm `{}`: missing `strategy` (random, best-of-n, early-filter, tournament, successive-halving or adaptive)",
                    arm.name
                ));
            }
            self.config(arm)
                .check(&ValueSource::SuiteArm(arm.name.clone()))
                .map_err(|e| e.to_string())?;
            self.budgeted_config(arm)?;
        }
        if self.budget_nfe_mean == Some(0) {
            return Err("budget_nfe_mean 0 would run nothing".into());
        }
        Ok(())
    }

    /// The strategy every arm starts from: the defaults with the suite's `steps` and
    /// `base_seed`.
    pub fn base_strategy(&self) -> StrategyConfig {
        StrategyOverrides {
            steps: self.steps,
            seed: self.base_seed,
            ..StrategyOverrides::default()
        }
        .apply(&StrategyConfig::default())
    }

    /// The engine configuration of an arm: its values over the suite's, and under a mean
    /// budget a fixed strategy sized to it (see [`Suite::budgeted_config`]).
    pub fn config(&self, arm: &Arm) -> StrategyConfig {
        self.budgeted_config(arm)
            .unwrap_or_else(|_| arm.overrides.apply(&self.base_strategy()))
    }

    /// The judge that scores returned edits.
    pub fn eval_judge(&self) -> &SuiteJudge {
        self.eval_judge.as_ref().unwrap_or(&self.selection_judge)
    }

    /// Whether scoring reuses the selection judge (and so is biased towards its picks).
    pub fn same_judge(&self) -> bool {
        self.eval_judge() == &self.selection_judge
    }

    /// The best-of-N arm a `random` arm can be read from: same seeds and schedule, so its
    /// candidate 0 is exactly the random run (its step cache too: caches are per candidate).
    pub fn random_source(&self, arm: &Arm) -> Option<&Arm> {
        let random = self.config(arm);
        let same_run = |c: &StrategyConfig| {
            c.steps == random.steps
                && c.cache == random.cache
                && c.candidate_seeds().first() == random.candidate_seeds().first()
        };
        // A random arm that refines runs itself: only a run's pick is refined.
        (random.kind == StrategyKind::Random && random.refine.is_none())
            .then(|| {
                self.arms.iter().find(|a| {
                    let c = self.config(a);
                    c.kind == StrategyKind::BestOfN && same_run(&c)
                })
            })
            .flatten()
    }
}
