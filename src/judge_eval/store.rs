//! `judgements.jsonl`: one record per labelled item, appended and fsynced as each item
//! finishes, so an interrupted `judge-eval` resumes where it stopped. A judge's failure is
//! a measurement (it is kept and counted); an item whose images could not be read is
//! retried on the next run, its new record taking the old one's place. Each record carries
//! the fingerprint of what the judge was shown, so a rerun judges again an item whose
//! content changed under the same id; its human label, task and group are the data's at
//! the time, and the report takes them from the current data instead ([`Judgement::relabel`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::data::{Case, HumanLabel};
use super::stats::Label;
use crate::error::{EditError, EngineError};
use crate::fsio::unit_log::UnitLog;
use crate::fsio::OutputLock;
use crate::judge::{CallUsage, Preference};

/// One judge call: its answer or its failure, never both.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Called<T> {
    /// What the judge answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<T>,
    /// Why it gave no answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The judge's explanation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reasoning: String,
    /// What the call cost (also when it failed, where the judge knows).
    pub usage: CallUsage,
}

/// The judge's calls on one item, with the human label they are measured against.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ItemCalls {
    /// A preference pair, asked in both orders.
    Pair {
        /// The human preference.
        human: Label,
        /// The call that showed A first.
        a_first: Called<Preference>,
        /// The call that showed B first.
        b_first: Called<Preference>,
    },
    /// A rated edit, scored by a reward model.
    Reward {
        /// The human score.
        human: f64,
        /// The model's reward (its own scale).
        reward: Called<f32>,
    },
    /// A rated edit, scored by the VIE rubric.
    Rating {
        /// The human score.
        human: f64,
        /// Semantic consistency (instruction followed, not over-edited), 0-10 each.
        semantic: Called<[f32; 2]>,
        /// Perceptual quality (naturalness, no artifacts), 0-10 each.
        perceptual: Called<[f32; 2]>,
        /// VIE O of the two, when both answered (the mean of each pass's O for a judge
        /// that answers several passes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        overall: Option<f32>,
    },
}

impl ItemCalls {
    /// The calls made, as (failed, usage).
    pub fn calls(&self) -> Vec<(bool, &CallUsage)> {
        match self {
            ItemCalls::Reward { reward, .. } => vec![(reward.answer.is_none(), &reward.usage)],
            ItemCalls::Pair {
                a_first, b_first, ..
            } => vec![
                (a_first.answer.is_none(), &a_first.usage),
                (b_first.answer.is_none(), &b_first.usage),
            ],
            ItemCalls::Rating {
                semantic,
                perceptual,
                ..
            } => vec![
                (semantic.answer.is_none(), &semantic.usage),
                (perceptual.answer.is_none(), &perceptual.usage),
            ],
        }
    }
}

/// One line of `judgements.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Judgement {
    /// The item's id.
    pub id: String,
    /// Its task type, when the data has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Its group of pairs, when the data has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The fingerprint of what the judge was shown ([`Case::content_fingerprint`]); `None`
    /// in lines written before fingerprints were stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The calls, when the item's images could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged: Option<ItemCalls>,
    /// Why the item could not be judged (an unreadable image, or a judge that could not be
    /// reached for any of its calls): not the judge's answer, so a rerun retries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Judgement {
    /// Takes the human label, task and group from `case` (the current data), leaving the
    /// judge's calls as they are: the label is never shown to the judge, so a corrected
    /// label needs no new judgement. Returns whether anything changed.
    pub fn relabel(&mut self, case: &Case) -> bool {
        let mut changed = self.task != case.item.task || self.group != case.group;
        self.task.clone_from(&case.item.task);
        self.group.clone_from(&case.group);
        match (&mut self.judged, &case.human) {
            (Some(ItemCalls::Pair { human, .. }), HumanLabel::Preference { preferred, .. }) => {
                changed |= human != preferred;
                *human = *preferred;
            }
            (
                Some(ItemCalls::Rating { human, .. } | ItemCalls::Reward { human, .. }),
                HumanLabel::Rating { score, .. },
            ) => {
                // Compared as stored (JSON round-trips an f64 exactly).
                changed |= human.to_bits() != score.to_bits();
                *human = *score;
            }
            // Another kind of item has another fingerprint: never relabelled, judged again.
            _ => {}
        }
        changed
    }
}

impl crate::fsio::unit_log::UnitResult for Judgement {
    type Key = String;
    fn key(&self) -> String {
        self.id.clone()
    }
    /// A judge's failure is a finished measurement; an unreadable item is retried.
    fn finished(&self) -> bool {
        self.error.is_none()
    }
}

/// `judgements.jsonl` under the output folder, whose lock it holds. One record per item:
/// a judged one is final, an unreadable one stands until a rerun retries it (see
/// [`crate::fsio::unit_log`]).
pub struct JudgementStore {
    log: UnitLog<Judgement>,
    /// Settings to record beside the judgements before the first one is appended.
    settings: Option<serde_json::Map<String, serde_json::Value>>,
    out: std::path::PathBuf,
    _lock: OutputLock,
}

impl JudgementStore {
    /// Takes the folder's lock and opens (or starts) the store, cutting a torn last line
    /// left by a killed process.
    pub fn open(out: &Path) -> Result<Self, EngineError> {
        crate::fsio::prepare_output_dir(out, "--out")
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        let lock = OutputLock::acquire(out).map_err(|e| EditError::Invalid(e.to_string()))?;
        let path = out.join("judgements.jsonl");
        let log = UnitLog::open(&path).map_err(|e| EngineError::Output {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            log,
            settings: None,
            out: out.to_path_buf(),
            _lock: lock,
        })
    }

    /// Whether the item is finished.
    pub fn is_done(&self, id: &str) -> bool {
        self.log.is_done(&id.to_string())
    }

    /// The item's finished judgement, if any.
    pub fn finished(&self, id: &str) -> Option<&Judgement> {
        self.log.finished(&id.to_string())
    }

    /// Sets the item's judgement aside (its content changed): it is judged again, and its
    /// line is superseded by the new one (see [`UnitLog::supersede`]).
    pub fn supersede(&mut self, id: &str) {
        self.log.supersede(&id.to_string());
    }

    /// Has `settings` recorded in the folder's settings file (see [`crate::fsio::settings`])
    /// just before the next judgement is appended, so no judgement is ever on disk without
    /// the settings it was made with.
    pub fn record_settings_with_first_judgement(
        &mut self,
        settings: serde_json::Map<String, serde_json::Value>,
    ) {
        self.settings = Some(settings);
    }

    /// Appends one record durably (fsynced before it counts); returns whether it was
    /// stored (a record of an item already judged is not).
    pub fn append(&mut self, record: Judgement) -> std::io::Result<bool> {
        if let Some(settings) = self.settings.take() {
            let path = self.out.join(crate::fsio::settings::SETTINGS_FILE);
            crate::fsio::settings::record_settings(&path, &settings)
                .map_err(std::io::Error::other)?;
        }
        Ok(self.log.append(vec![record])? > 0)
    }

    /// Rewrites `judgements.jsonl` atomically with one line per item, without the lines
    /// of items this run judged again (see [`UnitLog::compact`]).
    pub fn compact(&mut self) -> std::io::Result<()> {
        self.log.compact()
    }

    /// How many items this run recorded a judgement (or a failure to judge) for.
    pub fn handled_this_run(&self) -> usize {
        self.log.recorded_since_open()
    }

    /// One record per item so far (the judged ones, and the unreadable ones not retried
    /// since).
    pub fn records(&self) -> &[Judgement] {
        self.log.results()
    }

    /// How many items this run could not judge (unreadable, or the judge unreachable).
    pub fn not_judged_this_run(&self) -> usize {
        self.log.failed_since_open()
    }
}
