//! Evaluation suites: TOML files under `eval/` naming a dataset, the strategies to compare
//! (each with its parameters), the judge that selects inside the strategies and a separate
//! judge that scores the returned edits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dataset::{DatasetSpec, Selection};
use crate::engine::{StrategyConfig, StrategyKind, StrategyOverrides, ValueSource};
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

/// A judge as a suite names it: `testbed` or a preset path (relative to the suite file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
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
    pub arms: Vec<Arm>,
    /// The judge used inside the strategies (screening, comparing, picking).
    pub selection_judge: JudgeSpec,
    /// The judge that scores the returned edits; defaults to the selection judge (biased:
    /// the report says so).
    #[serde(default)]
    pub eval_judge: Option<JudgeSpec>,
    /// Bootstrap resamples for the confidence intervals.
    #[serde(default = "default_resamples")]
    pub resamples: usize,
}

impl Suite {
    /// Reads and validates a suite; judge preset paths become relative to the file.
    pub fn load(path: &Path) -> Result<Self, EditError> {
        let bad = |what: String| EditError::Invalid(format!("suite {}: {what}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let mut suite: Suite = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
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
        for judge in std::iter::once(&mut suite.selection_judge).chain(suite.eval_judge.as_mut()) {
            if judge.judge != "testbed" {
                let mut p = PathBuf::from(&judge.judge);
                rebase(&mut p);
                judge.judge = p.display().to_string();
            }
        }
        suite.validate().map_err(bad)?;
        Ok(suite)
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
        if let DatasetSpec::Testbed { edits, first_scene } = &self.dataset {
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
                    "arm `{}`: unknown key `{key}` (expected name, strategy, seeds, probe_steps, keep, steps, seed)",
                    arm.name
                ));
            }
            if arm.overrides.strategy.is_none() {
                return Err(format!(
                    "arm `{}`: missing `strategy` (random, best-of-n, early-filter, tournament or successive-halving)",
                    arm.name
                ));
            }
            self.config(arm)
                .check(&ValueSource::SuiteArm(arm.name.clone()))
                .map_err(|e| e.to_string())?;
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

    /// The engine configuration of an arm.
    pub fn config(&self, arm: &Arm) -> StrategyConfig {
        arm.overrides.apply(&self.base_strategy())
    }

    /// The judge that scores returned edits.
    pub fn eval_judge(&self) -> &JudgeSpec {
        self.eval_judge.as_ref().unwrap_or(&self.selection_judge)
    }

    /// Whether scoring reuses the selection judge (and so is biased towards its picks).
    pub fn same_judge(&self) -> bool {
        self.eval_judge() == &self.selection_judge
    }

    /// The best-of-N arm a `random` arm can be read from: same seeds and schedule, so its
    /// candidate 0 is exactly the random run.
    pub fn random_source(&self, arm: &Arm) -> Option<&Arm> {
        (self.config(arm).kind == StrategyKind::Random)
            .then(|| {
                self.arms
                    .iter()
                    .find(|a| self.config(a).kind == StrategyKind::BestOfN)
            })
            .flatten()
    }
}
