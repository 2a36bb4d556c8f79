//! The batch's durable record: `summary.jsonl`, one line per finished (or failed) item,
//! appended with fsync, read back on restart so finished items are skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EditError, EngineError};
use crate::fsio::OutputLock;

/// Outcome class of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemStatus {
    /// Edited and scored.
    Ok,
    /// Could not be finished (unreadable image, judge outage, generator error); retried on
    /// the next run.
    Failed,
    /// A manifest line that cannot be used; not retried until the manifest changes.
    Invalid,
}

/// One line of `summary.jsonl`. Deliberately free of timings, so reruns and shards give
/// byte-identical records for identical work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// Item id (or `#line-N` for a manifest line that is not a valid item).
    pub id: String,
    /// 1-based manifest line.
    pub line: usize,
    /// Outcome class.
    pub status: ItemStatus,
    /// Why the item failed or was invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Strategy name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Seed of the returned edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pick_seed: Option<u64>,
    /// VIE O of the returned edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overall: Option<f32>,
    /// VIE SC of the returned edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sc: Option<f32>,
    /// VIE PQ of the returned edit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pq: Option<f32>,
    /// Model forwards spent.
    #[serde(default)]
    pub nfe: usize,
    /// Of `nfe`, the forwards run in full; `None` in records written before step caching
    /// existed, when every forward ran in full (read it through `full_forwards()`).
    #[serde(default)]
    pub full_forwards: Option<usize>,
    /// Of `nfe`, the forwards served from the step cache (`--cache`); each counts as one NFE.
    #[serde(default)]
    pub cached_forwards: usize,
    /// Forwards of the item's hi-res refine (`--refine` or the line's `refine`), at the
    /// refine's size: not in `nfe`, and outside budgets.
    #[serde(default, skip_serializing_if = "crate::engine::report::is_zero")]
    pub refine_nfe: usize,
    /// The refine's forwards in forwards of the edit's size (FLOPs; a 1024 refine forward
    /// is 4.39 of a 512 edit's).
    #[serde(default, skip_serializing_if = "crate::engine::report::is_zero_f64")]
    pub refine_edit_step_equivalents: f64,
    /// Judge calls made.
    #[serde(default)]
    pub judge_calls: u64,
    /// Judge results that failed.
    #[serde(default)]
    pub judge_failures: u64,
    /// Folder of the item's outputs, relative to the batch output folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
    /// The fingerprint of the manifest line it was run from ([`super::manifest::Item::fingerprint`]: image
    /// content, instruction, strategy); `None` for invalid lines and in records written
    /// before fingerprints were stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl ItemResult {
    /// Of `nfe`, the forwards run in full (all of them in records older than step caching).
    pub fn full_forwards(&self) -> usize {
        self.full_forwards
            .unwrap_or(self.nfe.saturating_sub(self.cached_forwards))
    }
}

/// The append-only summary log plus the latest record per id. It holds the output
/// folder's lock: one batch writes a folder at a time.
pub struct SummaryLog {
    path: PathBuf,
    log: crate::fsio::jsonl::Log,
    latest: BTreeMap<String, ItemResult>,
    _lock: OutputLock,
}

impl SummaryLog {
    /// Takes the lock of `dir`, opens (or creates) `DIR/summary.jsonl` and reads what
    /// earlier runs recorded. A torn last line (a crash mid-write) is cut: that item simply
    /// runs again. A folder another run holds is refused at once (bad input).
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let err = |p: &Path, e: std::io::Error| EngineError::Output {
            path: p.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
        let lock = OutputLock::acquire(dir).map_err(|e| EditError::Invalid(e.to_string()))?;
        let path = dir.join("summary.jsonl");
        let (records, log) =
            crate::fsio::jsonl::open::<ItemResult>(&path).map_err(|e| err(&path, e))?;
        let latest = latest_per_id(records);
        Ok(Self {
            path,
            log,
            latest,
            _lock: lock,
        })
    }

    /// The latest record of `id`, if any.
    pub fn get(&self, id: &str) -> Option<&ItemResult> {
        self.latest.get(id)
    }

    /// Appends a record and syncs it to disk before returning.
    pub fn append(&mut self, result: ItemResult) -> Result<(), EngineError> {
        self.log
            .append(std::slice::from_ref(&result))
            .map_err(|e| EngineError::Output {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        // After the fsync: a watcher (the kill test) may act on the record being on disk.
        tracing::debug!(target: "icedit_scale::stored", id = %result.id, "results stored");
        self.latest.insert(result.id.clone(), result);
        Ok(())
    }

    /// Keeps only the items whose latest record passes `keep`; the file follows at the
    /// next [`Self::compact`]. Returns how many were left out.
    pub fn retain(&mut self, mut keep: impl FnMut(&ItemResult) -> bool) -> usize {
        let before = self.latest.len();
        self.latest.retain(|_, r| keep(r));
        before - self.latest.len()
    }

    /// Records that `id` is now on manifest line `line` (lines above it were added or
    /// removed), so the table orders and names it by its line; the file follows at the
    /// next [`Self::compact`].
    pub fn renumber(&mut self, id: &str, line: usize) {
        if let Some(r) = self.latest.get_mut(id) {
            r.line = line;
        }
    }

    /// Latest records, ordered by manifest line then id.
    pub fn results(&self) -> Vec<ItemResult> {
        let mut v: Vec<ItemResult> = self.latest.values().cloned().collect();
        v.sort_by(|a, b| (a.line, &a.id).cmp(&(b.line, &b.id)));
        v
    }

    /// Rewrites the log with one line per item (atomically), dropping superseded records.
    pub fn compact(&mut self) -> Result<(), EngineError> {
        write_jsonl(&self.path, &self.results())?;
        self.log =
            crate::fsio::jsonl::Log::reopen(&self.path).map_err(|e| EngineError::Output {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(())
    }
}

/// Reads the latest record per id from a summary file (missing file = empty).
pub fn read_latest(path: &Path) -> Result<BTreeMap<String, ItemResult>, EngineError> {
    let records =
        crate::fsio::jsonl::read::<ItemResult>(path).map_err(|e| EngineError::Output {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(latest_per_id(records))
}

/// Later records of an id supersede earlier ones.
fn latest_per_id(records: Vec<ItemResult>) -> BTreeMap<String, ItemResult> {
    records.into_iter().map(|r| (r.id.clone(), r)).collect()
}

/// Writes records as JSONL atomically.
pub fn write_jsonl(path: &Path, results: &[ItemResult]) -> Result<(), EngineError> {
    Ok(crate::fsio::jsonl::write(path, results)?)
}

/// The final table: counts, mean score, NFE, and each failure with its reason.
pub fn table(results: &[ItemResult]) -> String {
    let count = |s| results.iter().filter(|r| r.status == s).count();
    let scored: Vec<f32> = results.iter().filter_map(|r| r.overall).collect();
    let mean = if scored.is_empty() {
        "n/a".to_string()
    } else {
        format!("{:.3}", scored.iter().sum::<f32>() / scored.len() as f32)
    };
    let mut out = String::new();
    out.push_str("| items | ok | failed | invalid | mean VIE O | total NFE | full forwards | cached forwards | refine (edit-step equivalents) | judge calls | judge failures |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    out.push_str(&format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {} |\n",
        results.len(),
        count(ItemStatus::Ok),
        count(ItemStatus::Failed),
        count(ItemStatus::Invalid),
        mean,
        results.iter().map(|r| r.nfe).sum::<usize>(),
        results.iter().map(|r| r.full_forwards()).sum::<usize>(),
        results.iter().map(|r| r.cached_forwards).sum::<usize>(),
        results
            .iter()
            .map(|r| r.refine_edit_step_equivalents)
            .sum::<f64>(),
        results.iter().map(|r| r.judge_calls).sum::<u64>(),
        results.iter().map(|r| r.judge_failures).sum::<u64>(),
    ));
    let failures: Vec<&ItemResult> = results
        .iter()
        .filter(|r| r.status != ItemStatus::Ok)
        .collect();
    if !failures.is_empty() {
        out.push_str("\n| id | line | status | reason |\n|---|---|---|---|\n");
        for r in failures {
            out.push_str(&format!(
                "| {} | {} | {:?} | {} |\n",
                r.id,
                r.line,
                r.status,
                r.reason.as_deref().unwrap_or("").replace('|', "/")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(id: &str, line: usize) -> ItemResult {
        ItemResult {
            id: id.into(),
            line,
            status: ItemStatus::Ok,
            reason: None,
            strategy: Some("early-filter".into()),
            pick_seed: Some(1),
            overall: Some(5.0),
            sc: Some(5.0),
            pq: Some(5.0),
            nfe: 124,
            full_forwards: Some(100),
            cached_forwards: 24,
            refine_nfe: 0,
            refine_edit_step_equivalents: 0.0,
            judge_calls: 12,
            judge_failures: 0,
            output_dir: Some(format!("items/{id}")),
            content: None,
        }
    }

    /// Records written before step caching existed carry no forward counts: every one of
    /// their forwards ran in full (they once read as 0 full forwards).
    #[test]
    fn records_older_than_step_caching_count_every_forward_as_full() {
        let mut old = serde_json::to_value(ok("a", 1)).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("full_forwards");
        fields.remove("cached_forwards");
        let old: ItemResult = serde_json::from_value(old).unwrap();
        assert_eq!((old.full_forwards(), old.cached_forwards), (124, 0));
        assert_eq!(ok("a", 1).full_forwards(), 100);
        let eval_line = r#"{"item":"s","arm":"best-of-2","task":null,"language":null,"nfe":100,"selection":null,"eval":null,"correct":null,"judge_calls":4,"judge_failures":0,"judge_tokens":0,"wall_s":0.1,"derived_from":null,"error":null}"#;
        let old: crate::eval::store::ArmResult = serde_json::from_str(eval_line).unwrap();
        assert_eq!((old.full_forwards(), old.cached_forwards), (100, 0));
    }

    #[test]
    fn survives_torn_lines_keeps_latest_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = SummaryLog::open(dir.path()).unwrap();
            let mut failed = ok("b", 2);
            failed.status = ItemStatus::Failed;
            log.append(failed).unwrap();
            log.append(ok("a", 1)).unwrap();
            log.append(ok("b", 2)).unwrap();
        }
        // A crash mid-write leaves a torn line.
        let path = dir.path().join("summary.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"id\": \"c\", \"li");
        std::fs::write(&path, text).unwrap();
        let mut log = SummaryLog::open(dir.path()).unwrap();
        let second = SummaryLog::open(dir.path()).map(|_| ()).unwrap_err();
        assert!(
            second
                .to_string()
                .contains("in use by another icedit-scale run"),
            "{second}"
        );
        assert_eq!(log.get("b").unwrap().status, ItemStatus::Ok);
        assert!(log.get("c").is_none());
        log.compact().unwrap();
        let lines = std::fs::read_to_string(&path).unwrap();
        assert_eq!(lines.lines().count(), 2);
        assert!(table(&log.results()).contains("| 2 | 2 | 0 | 0 | 5.000 | 248 | 200 | 48 |"));

        // Torn again, then reopened: the next record lands on a line of its own instead of
        // being glued to the torn fragment (and lost).
        std::fs::write(&path, format!("{lines}{{\"id\": \"e")).unwrap();
        drop(log);
        let mut log = SummaryLog::open(dir.path()).unwrap();
        log.append(ok("d", 3)).unwrap();
        let ids: Vec<String> = read_latest(&path).unwrap().into_keys().collect();
        assert_eq!(ids, ["a", "b", "d"]);
    }
}
