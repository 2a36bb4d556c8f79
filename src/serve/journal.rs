//! The journal: every accepted edit, and how each ended, in an append-only JSONL file that
//! is fsynced before the client hears "accepted". After a crash (or `kill -9`) a restart
//! with the same `--out` reads it back: edits accepted but not ended run again (those the
//! last shutdown interrupted at its deadline included), ended ones are served from their
//! folders.
//!
//! Layout under `--out`:
//! ```text
//! journal.jsonl              accepted / ended records, in order
//! edits/<id>/source.<ext>    the uploaded image as it came (written before its record)
//! edits/<id>/...             the edit's outputs (report.json, final.png, previews/, ...)
//! edits/<id>/events.jsonl    the event stream of the edit, written when it ends
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::request::EditRequest;
use crate::fsio::jsonl;

/// How an edit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// It finished; its outputs are in its folder.
    Done,
    /// It failed; the record says why.
    Failed,
    /// A client cancelled it.
    Cancelled,
}

/// One line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// An edit was accepted.
    Accepted {
        /// The edit id.
        id: String,
        /// Unix seconds.
        created: u64,
        /// The upload's file name in the edit's folder.
        source: String,
        /// The checked request (boxed: it is most of the record's size).
        request: Box<EditRequest>,
    },
    /// An edit was running when the server stopped at its shutdown deadline: it has not
    /// ended and runs again at the next start.
    Interrupted {
        /// The edit id.
        id: String,
    },
    /// The server started again with edits that had not ended: each runs again, its events
    /// numbered after those of its earlier runs (see [`Accepted::earlier_runs`]).
    Resumed {},
    /// An edit ended.
    Ended {
        /// The edit id.
        id: String,
        /// How.
        ending: Ending,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// An accepted edit as read back from the journal.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The edit id.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The upload's file name in the edit's folder.
    pub source: String,
    /// The request.
    pub request: EditRequest,
    /// How it ended, if it did (with the failure's message).
    pub ended: Option<(Ending, Option<String>)>,
    /// For an edit that has not ended: how many server processes held it before this one
    /// (the one that accepted it, then one per [`Record::Resumed`] since). Its events in
    /// this process are numbered from `earlier_runs << 32`, so an event id a client kept
    /// from an earlier run never skips events of this one.
    pub earlier_runs: u32,
}

/// The open journal.
pub struct Journal {
    log: crate::fsio::jsonl::Log,
    path: PathBuf,
}

impl Journal {
    /// Opens (or creates) `out/journal.jsonl`, returning every accepted edit in order of
    /// acceptance with how it ended. A torn last line (a crash mid-append) is cut: its edit
    /// was never acknowledged.
    pub fn open(out: &Path) -> std::io::Result<(Self, Vec<Accepted>)> {
        let path = out.join("journal.jsonl");
        let (records, log) = jsonl::open::<Record>(&path)?;
        let mut order: Vec<Accepted> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        // Resumed records so far, and how many there were when each edit was accepted.
        let mut resumes = 0u32;
        let mut resumes_at_acceptance = Vec::new();
        for r in records {
            match r {
                Record::Accepted {
                    id,
                    created,
                    source,
                    request,
                } => {
                    index.insert(id.clone(), order.len());
                    resumes_at_acceptance.push(resumes);
                    order.push(Accepted {
                        id,
                        created,
                        source,
                        request: *request,
                        ended: None,
                        earlier_runs: 0,
                    });
                }
                Record::Resumed {} => resumes = resumes.saturating_add(1),
                Record::Ended { id, ending, error } => {
                    if let Some(&i) = index.get(&id) {
                        order[i].ended = Some((ending, error));
                    }
                }
                Record::Interrupted { .. } => {}
            }
        }
        for (a, at) in order.iter_mut().zip(resumes_at_acceptance) {
            if a.ended.is_none() {
                a.earlier_runs = 1 + (resumes - at);
            }
        }
        Ok((Self { log, path }, order))
    }

    /// Appends `record` and syncs it to disk before returning.
    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        self.log
            .append(std::slice::from_ref(record))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::StrategyConfig;
    use crate::serve::request::ResponseFormat;

    fn request() -> EditRequest {
        EditRequest {
            instruction: "x".into(),
            strategy: StrategyConfig::default(),
            n: 1,
            width: 256,
            size: None,
            size_height: None,
            response_format: ResponseFormat::B64Json,
            user: None,
            live_previews: false,
        }
    }

    #[test]
    fn accepted_edits_come_back_in_order_with_their_endings() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, old) = Journal::open(dir.path()).unwrap();
        assert!(old.is_empty());
        for id in ["a", "b", "c"] {
            j.append(&Record::Accepted {
                id: id.into(),
                created: 1,
                source: "source.png".into(),
                request: Box::new(request()),
            })
            .unwrap();
        }
        j.append(&Record::Ended {
            id: "b".into(),
            ending: Ending::Done,
            error: None,
        })
        .unwrap();
        drop(j);
        let (_, back) = Journal::open(dir.path()).unwrap();
        let ids: Vec<_> = back
            .iter()
            .map(|a| (a.id.as_str(), a.ended.is_some()))
            .collect();
        assert_eq!(ids, [("a", false), ("b", true), ("c", false)]);
        assert_eq!(back[0].request, request());
    }

    /// An edit that has not ended counts the server processes that held it: the one that
    /// accepted it and one per restart that resumed it since.
    #[test]
    fn an_unended_edit_counts_its_earlier_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let accept = |j: &mut Journal, id: &str| {
            j.append(&Record::Accepted {
                id: id.into(),
                created: 1,
                source: "source.png".into(),
                request: Box::new(request()),
            })
            .unwrap()
        };
        accept(&mut j, "old");
        accept(&mut j, "done");
        j.append(&Record::Resumed {}).unwrap();
        accept(&mut j, "new");
        j.append(&Record::Ended {
            id: "done".into(),
            ending: Ending::Done,
            error: None,
        })
        .unwrap();
        j.append(&Record::Resumed {}).unwrap();
        drop(j);
        let (_, back) = Journal::open(dir.path()).unwrap();
        let runs: Vec<_> = back
            .iter()
            .map(|a| (a.id.as_str(), a.earlier_runs))
            .collect();
        assert_eq!(runs, [("old", 3), ("done", 0), ("new", 2)]);
    }

    #[test]
    fn an_accepted_edit_whose_target_was_written_as_null_is_read_back() {
        // How a NaN target was journaled before the one number rule: the edit must come
        // back (and fail by name when it runs), not vanish as an unreadable line.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let mut nan = request();
        nan.strategy.target = f32::NAN;
        j.append(&Record::Accepted {
            id: "n".into(),
            created: 1,
            source: "source.png".into(),
            request: Box::new(nan),
        })
        .unwrap();
        drop(j);
        let text = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert!(text.contains("\"target\":null"), "{text}");
        let (_, back) = Journal::open(dir.path()).unwrap();
        assert_eq!(back.len(), 1);
        let e = back[0]
            .request
            .strategy
            .check(&crate::engine::ValueSource::Request)
            .unwrap_err();
        assert!(
            e.message.contains("target NaN must be a finite number"),
            "{e}"
        );
    }
}
