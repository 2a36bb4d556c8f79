//! Evaluation suites: TOML files under `eval/` naming a dataset, the strategies to compare
//! (each with its parameters), the judge that selects inside the strategies and a separate
//! judge that scores the returned edits.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dataset::{DatasetSpec, Selection};
use crate::engine::{StrategyConfig, StrategyKind};
use crate::error::EditError;

/// One strategy arm of a suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    /// Name in reports, e.g. `ef-8-4-2`.
    pub name: String,
    /// Strategy kind (`random`, `best-of-n`, `early-filter`, `tournament`, `successive-halving`).
    pub strategy: StrategyKind,
    /// N (ignored by `random`).
    #[serde(default = "default_seeds")]
    pub seeds: usize,
    /// k.
    #[serde(default = "default_probe")]
    pub probe_steps: usize,
    /// M.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_seeds() -> usize {
    8
}
fn default_probe() -> usize {
    4
}
fn default_keep() -> usize {
    2
}
fn default_steps() -> usize {
    50
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
    /// Steps of the full schedule for every arm.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Seed of candidate 0 (candidate i uses base_seed + i) for every arm.
    #[serde(default)]
    pub base_seed: u64,
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
        let mut names = std::collections::HashSet::new();
        for arm in &self.arms {
            if !names.insert(&arm.name) {
                return Err(format!("arm name `{}` used twice", arm.name));
            }
            self.config(arm)
                .validate()
                .map_err(|e| format!("arm `{}`: {e}", arm.name))?;
        }
        Ok(())
    }

    /// The engine configuration of an arm.
    pub fn config(&self, arm: &Arm) -> StrategyConfig {
        StrategyConfig {
            kind: arm.strategy,
            seeds: if arm.strategy == StrategyKind::Random {
                1
            } else {
                arm.seeds
            },
            probe_steps: arm.probe_steps,
            keep: arm.keep,
            steps: self.steps,
            base_seed: self.base_seed,
            seed_list: None,
        }
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
        (arm.strategy == StrategyKind::Random)
            .then(|| {
                self.arms
                    .iter()
                    .find(|a| a.strategy == StrategyKind::BestOfN)
            })
            .flatten()
    }
}
