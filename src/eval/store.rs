//! The durable record of an eval: `results.jsonl`, one line per (item, arm), appended and
//! fsynced as each finishes, so an interrupted eval resumes without redoing or losing work.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EditError, EngineError};
use crate::fsio::OutputLock;

/// VIE scores of one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Semantic consistency.
    pub sc: f64,
    /// Perceptual quality.
    pub pq: f64,
    /// Overall `sqrt(SC * PQ)`.
    pub overall: f64,
}

/// The evaluation judge's verdict on a returned edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalScore {
    /// Scored.
    Ok(Scores),
    /// The judge failed or could not be parsed; never replaced by a score.
    Failed(String),
}

/// One arm's result on one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmResult {
    /// Item id.
    pub item: String,
    /// Arm name.
    pub arm: String,
    /// Task type.
    pub task: Option<String>,
    /// Instruction language.
    pub language: Option<String>,
    /// Model forwards spent.
    pub nfe: usize,
    /// Of `nfe`, the forwards run in full.
    #[serde(default)]
    pub full_forwards: usize,
    /// Of `nfe`, the forwards served from the step cache (`cache`); each counts as one NFE.
    #[serde(default)]
    pub cached_forwards: usize,
    /// The pick's VIE by the selection judge (None: the pick could not be scored).
    pub selection: Option<Scores>,
    /// The returned edit as the evaluation judge scores it; None when the item failed.
    pub eval: Option<EvalScore>,
    /// Testbed only: whether the returned edit is the correct outcome.
    pub correct: Option<bool>,
    /// Judge calls made by the strategy (selection) and for scoring (evaluation).
    pub judge_calls: u64,
    /// Failed judge results among them.
    pub judge_failures: u64,
    /// Prompt + completion tokens.
    pub judge_tokens: u64,
    /// Wall seconds (for a derived arm, its share of the source run).
    pub wall_s: f64,
    /// Read from another arm's run instead of run itself (e.g. random = best-of-N's
    /// candidate 0).
    pub derived_from: Option<String>,
    /// Why the item could not be run (unreadable image, generator error, a selection
    /// judge that scored no candidate).
    pub error: Option<String>,
}

impl ArmResult {
    /// Whether this result is final: it ran, and the eval judge scored it. A result that
    /// is not is kept in this run's report (as an error or an eval failure) and retried by
    /// the next run.
    pub fn finished(&self) -> bool {
        self.error.is_none() && !matches!(self.eval, Some(EvalScore::Failed(_)))
    }
}

/// `results.jsonl` under an eval's output folder, whose lock it holds: one eval writes a
/// folder at a time.
pub struct ResultStore {
    log: crate::fsio::jsonl::Log,
    results: Vec<ArmResult>,
    /// Finished (item, arm) pairs and where their result is in `results`.
    done: HashMap<(String, String), usize>,
    _lock: OutputLock,
}

impl ResultStore {
    /// Takes the folder's lock and opens (or starts) the store, dropping a torn last line
    /// left by a killed process. A folder another run holds is refused at once.
    pub fn open(out: &Path) -> Result<Self, EngineError> {
        crate::fsio::prepare_output_dir(out, "--out")
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        let lock = OutputLock::acquire(out).map_err(|e| EditError::Invalid(e.to_string()))?;
        let path = out.join("results.jsonl");
        let (mut results, log) =
            crate::fsio::jsonl::open::<ArmResult>(&path).map_err(|e| EngineError::Output {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let mut done = HashMap::new();
        // Failed items (the edit, or the eval judge's score) are retried on the next run;
        // finished ones are kept (the first record of a pair), `done` pointing at where
        // each lands after the retain.
        results.retain(|r: &ArmResult| {
            let key = (r.item.clone(), r.arm.clone());
            let keep = r.finished() && !done.contains_key(&key);
            if keep {
                done.insert(key, done.len());
            }
            keep
        });
        Ok(Self {
            log,
            results,
            done,
            _lock: lock,
        })
    }

    /// Whether (item, arm) is finished.
    pub fn is_done(&self, item: &str, arm: &str) -> bool {
        self.done.contains_key(&(item.to_string(), arm.to_string()))
    }

    /// The finished result of (item, arm), if any.
    pub fn result(&self, item: &str, arm: &str) -> Option<&ArmResult> {
        let at = *self.done.get(&(item.to_string(), arm.to_string()))?;
        Some(&self.results[at])
    }

    /// Appends records durably (fsync before they count); already-done ones are skipped.
    pub fn append(&mut self, records: Vec<ArmResult>) -> std::io::Result<()> {
        let fresh: Vec<ArmResult> = records
            .into_iter()
            .filter(|r| !self.is_done(&r.item, &r.arm))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        self.log.append(&fresh)?;
        // After the fsync: a watcher (the resume test) may act on the records being on disk.
        tracing::debug!(target: "icedit_scale::stored", records = fresh.len(), "results stored");
        for r in fresh {
            if r.finished() {
                self.done
                    .insert((r.item.clone(), r.arm.clone()), self.results.len());
            }
            self.results.push(r);
        }
        Ok(())
    }

    /// Every result so far (finished ones, then this run's failures).
    pub fn results(&self) -> &[ArmResult] {
        &self.results
    }
}

/// `arms.json` under an eval's output folder: each arm's settings (its effective strategy,
/// the panel width and the judges) when its results were stored.
pub const ARM_SETTINGS_FILE: &str = "arms.json";

/// Refuses to go on with results made under other settings: an arm whose settings differ
/// from those stored beside its results (its seeds or keep edited, a mean budget added, a
/// judge swapped) would otherwise reuse the old results under the new settings' name, and
/// the report would claim a comparison that never ran. New arms are added; with `record`,
/// the current settings are written for the next run.
pub fn check_arm_settings(
    out: &Path,
    current: &serde_json::Map<String, serde_json::Value>,
    record: bool,
) -> Result<(), EditError> {
    use crate::fsio::settings::{changed_settings, record_settings};
    let path = out.join(ARM_SETTINGS_FILE);
    let changed = changed_settings(&path, current)?;
    if !changed.is_empty() {
        return Err(EditError::Invalid(format!(
            "{}: the results there were made with other settings for arm(s) {}; give a new --out, or rename the changed arms",
            out.display(),
            changed
                .iter()
                .map(|(arm, _)| format!("`{arm}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if record {
        record_settings(&path, current)?;
    }
    Ok(())
}
