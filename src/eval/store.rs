//! The durable record of an eval: `results.jsonl`, one line per (item, arm), appended and
//! fsynced as each finishes, so an interrupted eval resumes without redoing or losing work.
//! Each line carries the fingerprint of its item's content, so an item whose image or
//! instruction changed under the same id is run again ([`ResultStore::set_aside_changed`]).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::item::EvalItem;
use crate::error::{EditError, EngineError};
use crate::fsio::unit_log::UnitLog;
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
    /// Of `nfe`, the forwards run in full; `None` in records written before step caching
    /// existed, when every forward ran in full (read it through `full_forwards()`).
    #[serde(default)]
    pub full_forwards: Option<usize>,
    /// Of `nfe`, the forwards served from the step cache (`cache`); each counts as one NFE.
    #[serde(default)]
    pub cached_forwards: usize,
    /// The hi-res refine's forwards in forwards of the edit's size (an arm with `refine`;
    /// not in `nfe`, which budgets count).
    #[serde(default, skip_serializing_if = "crate::engine::report::is_zero_f64")]
    pub refine_edit_step_equivalents: f64,
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
    /// The fingerprint of the item's content it was run on ([`EvalItem::fingerprint`]);
    /// `None` in lines written before fingerprints were stored.
    #[serde(default)]
    pub content: Option<String>,
}

impl ArmResult {
    /// Of `nfe`, the forwards run in full (all of them in records older than step caching).
    pub fn full_forwards(&self) -> usize {
        self.full_forwards
            .unwrap_or(self.nfe.saturating_sub(self.cached_forwards))
    }

    /// Whether this result is final: it ran, and the eval judge scored it. A result that
    /// is not is kept in this run's report (as an error or an eval failure) and retried by
    /// the next run.
    pub fn finished(&self) -> bool {
        self.error.is_none() && !matches!(self.eval, Some(EvalScore::Failed(_)))
    }
}

impl crate::fsio::unit_log::UnitResult for ArmResult {
    type Key = (String, String);
    fn key(&self) -> Self::Key {
        (self.item.clone(), self.arm.clone())
    }
    fn finished(&self) -> bool {
        ArmResult::finished(self)
    }
}

/// `results.jsonl` under an eval's output folder, whose lock it holds: one eval writes a
/// folder at a time. One result per (item, arm): a finished one is final, a failure stands
/// until a rerun retries it (see [`crate::fsio::unit_log`]).
pub struct ResultStore {
    log: UnitLog<ArmResult>,
    _lock: OutputLock,
}

impl ResultStore {
    /// Takes the folder's lock (made if new), before anything in it is read or written. A
    /// folder another run holds is refused at once.
    pub fn lock(out: &Path) -> Result<OutputLock, EngineError> {
        crate::fsio::prepare_output_dir(out, "--out")
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        Ok(OutputLock::acquire(out).map_err(|e| EditError::Invalid(e.to_string()))?)
    }

    /// Opens (or starts) the store of the folder `lock` holds, dropping a torn last line
    /// left by a killed process and the lines of units run again since.
    pub fn open(out: &Path, lock: OutputLock) -> Result<Self, EngineError> {
        let path = out.join("results.jsonl");
        let log = UnitLog::open(&path).map_err(|e| EngineError::Output {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self { log, _lock: lock })
    }

    /// Whether (item, arm) is finished.
    pub fn is_done(&self, item: &str, arm: &str) -> bool {
        self.log.is_done(&(item.to_string(), arm.to_string()))
    }

    /// The finished result of (item, arm), if any.
    pub fn result(&self, item: &str, arm: &str) -> Option<&ArmResult> {
        self.log.finished(&(item.to_string(), arm.to_string()))
    }

    /// Appends records durably (fsync before they count) and returns how many it stored;
    /// already-done ones are skipped, and a retried (item, arm)'s record replaces its
    /// earlier failure.
    pub fn append(&mut self, records: Vec<ArmResult>) -> std::io::Result<usize> {
        self.log.append(records)
    }

    /// Rewrites `results.jsonl` atomically with one line per (item, arm), without the
    /// lines of units this run retried or redid (see [`UnitLog::compact`]).
    pub fn compact(&mut self) -> std::io::Result<()> {
        self.log.compact()
    }

    /// Sets aside the results of `items` made on other content than the items have now (`fingerprints`, in the items' order): they are run again, each new line
    /// superseding the old, and reports leave them out until then. Results without a
    /// fingerprint (older versions' lines) cannot be checked and are kept: rerunning them
    /// would redo every edit of a folder the version before made (the committed results
    /// among them), and are counted for a warning.
    pub fn set_aside_changed(&mut self, items: &[EvalItem], fingerprints: &[String]) -> Changed {
        let now: HashMap<&str, &String> = items
            .iter()
            .map(|i| i.id.as_str())
            .zip(fingerprints)
            .collect();
        let mut changed = Changed::default();
        let mut changed_items = HashSet::new();
        let mut unchecked_items = HashSet::new();
        let mut stale = Vec::new();
        for r in self.log.results() {
            let Some(&fingerprint) = now.get(r.item.as_str()) else {
                continue;
            };
            match &r.content {
                None => {
                    changed.unchecked_results += 1;
                    unchecked_items.insert(r.item.clone());
                }
                Some(c) if c != fingerprint => {
                    changed_items.insert(r.item.clone());
                    stale.push((r.item.clone(), r.arm.clone()));
                }
                Some(_) => {}
            }
        }
        changed.results = stale.len();
        changed.items = changed_items.len();
        changed.unchecked_items = unchecked_items.len();
        for key in stale {
            self.log.supersede(&key);
        }
        changed
    }

    /// One result per (item, arm) run so far: the finished ones and the failures that
    /// stand (not retried since they failed).
    pub fn results(&self) -> &[ArmResult] {
        self.log.results()
    }

    /// How many (item, arm) results this run recorded as failed.
    pub fn failed_this_run(&self) -> usize {
        self.log.failed_since_open()
    }

    /// How many (item, arm) results this run recorded, finished or failed.
    pub fn handled_this_run(&self) -> usize {
        self.log.recorded_since_open()
    }
}

/// What [`ResultStore::set_aside_changed`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// Results set aside: their item's content changed.
    pub results: usize,
    /// The items they are of.
    pub items: usize,
    /// Results kept without a check: stored without a fingerprint.
    pub unchecked_results: usize,
    /// The items they are of.
    pub unchecked_items: usize,
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
                .map(|(arm, then)| format!("`{arm}` ({})", differing_keys(then, &current[arm])))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if record {
        record_settings(&path, current)?;
    }
    Ok(())
}

/// The keys whose values differ between two stored settings objects, for a refusal to
/// name what changed (`selection_judge`, `strategy`, ...).
fn differing_keys(then: &serde_json::Value, now: &serde_json::Value) -> String {
    let (Some(then), Some(now)) = (then.as_object(), now.as_object()) else {
        return "its settings".into();
    };
    let keys: Vec<&str> = now
        .iter()
        .filter(|(key, value)| then.get(*key) != Some(value))
        .map(|(key, _)| key.as_str())
        .chain(
            then.keys()
                .filter(|key| !now.contains_key(*key))
                .map(String::as_str),
        )
        .collect();
    if keys.is_empty() {
        "its settings".into()
    } else {
        keys.join(", ")
    }
}
