//! A resumable run's results, one per unit of work (an eval's (item, arm), a judge-eval's
//! item), kept in a crash-safe JSONL log ([`super::jsonl`]).
//!
//! A finished result is final: a rerun skips its unit, unless the caller supersedes it (its
//! input changed under the same key). A failed one stands (reports show it) until a rerun
//! retries the unit, whose new record then takes its place. The file keeps one line per
//! unit: a run that retried or redid units leaves their superseded lines behind while it
//! appends (each append is one durable write), and [`UnitLog::compact`] at its end (or the
//! next open, after a crash) rewrites the file atomically without them, so whoever reads
//! the file after a run finds each unit once.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::jsonl;

/// A record of one unit's result.
pub trait UnitResult: Serialize + DeserializeOwned {
    /// What identifies the unit.
    type Key: Eq + Hash + Clone;
    /// The unit this result is for.
    fn key(&self) -> Self::Key;
    /// Whether the result is final (a rerun does not retry it).
    fn finished(&self) -> bool;
}

/// The log and its current results (see the module doc). Callers hold the folder's lock.
#[derive(Debug)]
pub struct UnitLog<T: UnitResult> {
    path: PathBuf,
    log: jsonl::Log,
    /// One result per unit, in the order the units first appeared.
    results: Vec<T>,
    /// Where each unit's result is in `results`.
    index: HashMap<T::Key, usize>,
    /// Failures recorded since the log was opened.
    failed_since_open: usize,
    /// Records stored since the log was opened (finished or failed).
    recorded_since_open: usize,
}

impl<T: UnitResult> UnitLog<T> {
    /// Opens (or creates) the log at `path`, cutting a torn last line. Of each unit's
    /// lines, its last is kept: a line follows a unit's finished one only when the unit
    /// was superseded and run again, so the last is the current one (a retried failure's
    /// too). When that leaves lines out, the file is rewritten (atomically) with the kept
    /// ones.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let (records, mut log) = jsonl::open::<T>(path)?;
        let lines = records.len();
        let (results, index) = last_per_unit(records.into_iter());
        if results.len() < lines {
            tracing::info!(
                "{}: dropping {} superseded line(s) of units run again",
                path.display(),
                lines - results.len()
            );
            jsonl::write(path, &results).map_err(std::io::Error::other)?;
            log = jsonl::Log::reopen(path)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            log,
            results,
            index,
            failed_since_open: 0,
            recorded_since_open: 0,
        })
    }

    /// Rewrites the file (atomically: a crash leaves the old file or the new one) with the
    /// last line of each unit, in the order the units first appear in it, when it holds
    /// superseded lines; what [`Self::open`] would read is unchanged. A unit set aside
    /// ([`Self::supersede`]) and not run again keeps its line. Call it at the end of a
    /// run, so the file holds one line per unit for whoever reads it next.
    pub fn compact(&mut self) -> std::io::Result<()> {
        let lines = jsonl::read::<T>(&self.path)?;
        let count = lines.len();
        let (kept, _) = last_per_unit(lines.into_iter());
        if kept.len() < count {
            tracing::info!(
                "{}: dropping {} superseded line(s) of units run again",
                self.path.display(),
                count - kept.len()
            );
            jsonl::write(&self.path, &kept).map_err(std::io::Error::other)?;
            self.log = jsonl::Log::reopen(&self.path)?;
        }
        Ok(())
    }

    /// The log's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the unit has a finished result.
    pub fn is_done(&self, key: &T::Key) -> bool {
        self.finished(key).is_some()
    }

    /// The unit's finished result, if any.
    pub fn finished(&self, key: &T::Key) -> Option<&T> {
        let r = &self.results[*self.index.get(key)?];
        r.finished().then_some(r)
    }

    /// Appends records durably (fsynced before they count) and returns how many it
    /// stored. Records of units already finished are skipped; a record of a unit that
    /// failed before takes its place.
    pub fn append(&mut self, records: Vec<T>) -> std::io::Result<usize> {
        let fresh: Vec<T> = records
            .into_iter()
            .filter(|r| !self.is_done(&r.key()))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let stored = fresh.len();
        self.recorded_since_open += stored;
        self.log.append(&fresh)?;
        // After the fsync: a watcher (the resume tests) may act on the records being on disk.
        tracing::debug!(target: "icedit_scale::stored", records = fresh.len(), "results stored");
        for r in fresh {
            if !r.finished() {
                self.failed_since_open += 1;
            }
            let key = r.key();
            match self.index.get(&key) {
                Some(&at) => self.results[at] = r,
                None => {
                    self.index.insert(key, self.results.len());
                    self.results.push(r);
                }
            }
        }
        Ok(stored)
    }

    /// Sets the unit's result aside (its input changed): it is no longer done nor among
    /// [`Self::results`], and the next record appended for it takes its place. Its line
    /// stays on file until then, and is dropped by the [`Self::compact`] (or open) after
    /// the new line is written.
    /// Returns the result set aside, if the unit had one.
    pub fn supersede(&mut self, key: &T::Key) -> Option<T> {
        let at = self.index.remove(key)?;
        let old = self.results.remove(at);
        for i in self.index.values_mut() {
            if *i > at {
                *i -= 1;
            }
        }
        Some(old)
    }

    /// One result per unit: the finished ones and the failures that stand.
    pub fn results(&self) -> &[T] {
        &self.results
    }

    /// How many failures this run (since the log was opened) recorded.
    pub fn failed_since_open(&self) -> usize {
        self.failed_since_open
    }

    /// How many results this run (since the log was opened) recorded, finished or failed:
    /// the units it handled.
    pub fn recorded_since_open(&self) -> usize {
        self.recorded_since_open
    }
}

/// The last record of each unit, in the order the units first appear, and where each
/// unit's is.
#[allow(clippy::type_complexity)]
fn last_per_unit<T: UnitResult>(
    records: impl Iterator<Item = T>,
) -> (Vec<T>, HashMap<T::Key, usize>) {
    let mut results: Vec<T> = Vec::new();
    let mut index = HashMap::new();
    for r in records {
        let key = r.key();
        match index.get(&key) {
            None => {
                index.insert(key, results.len());
                results.push(r);
            }
            Some(&at) => results[at] = r,
        }
    }
    (results, index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Outcome {
        unit: u32,
        ok: bool,
        run: u32,
    }

    impl UnitResult for Outcome {
        type Key = u32;
        fn key(&self) -> u32 {
            self.unit
        }
        fn finished(&self) -> bool {
            self.ok
        }
    }

    fn outcome(unit: u32, ok: bool, run: u32) -> Outcome {
        Outcome { unit, ok, run }
    }

    #[test]
    fn a_failure_stands_until_retried_and_a_finished_result_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        log.append(vec![outcome(1, true, 1), outcome(2, false, 1)])
            .unwrap();
        assert!(log.is_done(&1) && !log.is_done(&2));
        assert_eq!(log.failed_since_open(), 1);
        drop(log);

        // The next run still reports unit 2's failure until it retries it.
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(log.results(), [outcome(1, true, 1), outcome(2, false, 1)]);
        assert_eq!(log.failed_since_open(), 0);
        // A retry of a finished unit is ignored; unit 2's retry fails again, in its place.
        log.append(vec![outcome(1, false, 2), outcome(2, false, 2)])
            .unwrap();
        assert_eq!(log.results(), [outcome(1, true, 1), outcome(2, false, 2)]);
        assert_eq!(log.failed_since_open(), 1);
        drop(log);

        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        log.append(vec![outcome(2, true, 3)]).unwrap();
        assert_eq!(log.finished(&2), Some(&outcome(2, true, 3)));
        drop(log);
        let log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(log.results(), [outcome(1, true, 1), outcome(2, true, 3)]);
    }

    #[test]
    fn reruns_do_not_grow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        // A unit that fails on every run (a deterministic failure), beside a finished one.
        for run in 0..5 {
            let mut log = UnitLog::<Outcome>::open(&path).unwrap();
            log.append(vec![outcome(7, true, run), outcome(8, false, run)])
                .unwrap();
        }
        let lines = jsonl::read::<Outcome>(&path).unwrap();
        // Without a compaction at its end, the last run's retry is on the file beside the
        // previous failure until the next open drops it.
        assert_eq!(
            lines,
            [
                outcome(7, true, 0),
                outcome(8, false, 3),
                outcome(8, false, 4)
            ]
        );
        let log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(log.results(), [outcome(7, true, 0), outcome(8, false, 4)]);
        assert_eq!(
            jsonl::read::<Outcome>(&path).unwrap(),
            [outcome(7, true, 0), outcome(8, false, 4)]
        );
    }

    #[test]
    fn a_run_that_compacts_at_its_end_leaves_one_line_per_unit_and_counts_what_it_handled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(
            log.append(vec![
                outcome(1, true, 0),
                outcome(2, false, 0),
                outcome(3, true, 0)
            ])
            .unwrap(),
            3
        );
        log.compact().unwrap();
        drop(log);

        // The retry run: unit 2 retried, unit 3 redone (its input changed), unit 1's
        // record skipped (finished). Its end leaves each unit once on file, as the log
        // reads it.
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        log.supersede(&3);
        let stored = log
            .append(vec![
                outcome(1, true, 1),
                outcome(2, true, 1),
                outcome(3, true, 1),
            ])
            .unwrap();
        assert_eq!(stored, 2);
        assert_eq!(log.recorded_since_open(), 2);
        assert_eq!(jsonl::read::<Outcome>(&path).unwrap().len(), 5);
        log.compact().unwrap();
        let on_file = jsonl::read::<Outcome>(&path).unwrap();
        assert_eq!(
            on_file,
            [
                outcome(1, true, 0),
                outcome(2, true, 1),
                outcome(3, true, 1)
            ]
        );
        // Appends go on after a compaction, to the rewritten file.
        log.supersede(&1);
        log.append(vec![outcome(1, true, 2)]).unwrap();
        log.compact().unwrap();
        drop(log);
        let log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(
            log.results(),
            [
                outcome(1, true, 2),
                outcome(2, true, 1),
                outcome(3, true, 1)
            ]
        );
        assert_eq!(jsonl::read::<Outcome>(&path).unwrap().len(), 3);
    }

    #[test]
    fn a_superseded_unit_is_run_again_and_its_new_line_is_the_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        log.append(vec![outcome(1, true, 0), outcome(2, true, 0)])
            .unwrap();
        drop(log);

        // Unit 1's input changed: set aside, it is pending and out of the results, while
        // its line stays on file until a new one is written.
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(log.supersede(&1), Some(outcome(1, true, 0)));
        assert_eq!(log.supersede(&3), None);
        assert!(!log.is_done(&1) && log.is_done(&2));
        assert_eq!(log.results(), [outcome(2, true, 0)]);
        drop(log);
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(log.results(), [outcome(1, true, 0), outcome(2, true, 0)]);

        // Redone: the new line follows the old one, and is the one the next open keeps.
        log.supersede(&1);
        log.append(vec![outcome(1, true, 1)]).unwrap();
        assert_eq!(log.results(), [outcome(2, true, 0), outcome(1, true, 1)]);
        assert_eq!(log.finished(&2), Some(&outcome(2, true, 0)));
        drop(log);
        let log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(log.results(), [outcome(1, true, 1), outcome(2, true, 0)]);
        assert_eq!(
            jsonl::read::<Outcome>(&path).unwrap(),
            [outcome(1, true, 1), outcome(2, true, 0)]
        );

        // A redo that fails stands in the old result's place too.
        let mut log = UnitLog::<Outcome>::open(&path).unwrap();
        log.supersede(&2);
        log.append(vec![outcome(2, false, 2)]).unwrap();
        drop(log);
        let log = UnitLog::<Outcome>::open(&path).unwrap();
        assert_eq!(log.results(), [outcome(1, true, 1), outcome(2, false, 2)]);
    }
}
