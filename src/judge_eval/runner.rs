//! Runs a judge over labelled cases: a pair is asked in both orders (A first, then B
//! first), a rating gets the two VIE calls. Items run `concurrency` at a time and are
//! stored in dataset order as they finish; a stop request lets the items in flight finish.
//! A stored judgement counts as done only for the content it was made on: an item whose
//! images or instruction changed under the same id is judged again.

use std::sync::Arc;

use futures::StreamExt;

use super::data::{Case, HumanLabel};
use super::store::{Called, ItemCalls, Judgement, JudgementStore};
use crate::error::{EditError, EngineError};
use crate::judge::{CallUsage, Judge, JudgeError, ScoreKind, VieScore};
use crate::stop::StopSignal;

/// How the judge is run.
#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    /// Panel width sources are resized to (edits are resized to the source's panel).
    pub width: u32,
    /// Items judged at once.
    pub concurrency: usize,
}

fn called<T, A>(
    result: Result<A, JudgeError>,
    answer: impl FnOnce(&A) -> T,
    explain: impl FnOnce(&A) -> (String, CallUsage),
) -> Result<Called<T>, JudgeError> {
    match result {
        Ok(a) => {
            let (reasoning, usage) = explain(&a);
            Ok(Called {
                answer: Some(answer(&a)),
                failure: None,
                reasoning,
                usage,
            })
        }
        // A broken configuration is not a measurement of the judge: stop the run.
        Err(e @ JudgeError::Config(_)) => Err(e),
        Err(e) => Ok(Called {
            answer: None,
            failure: Some(e.to_string()),
            reasoning: String::new(),
            usage: e.usage().cloned().unwrap_or_default(),
        }),
    }
}

/// How the reason of an item stored as not judged because of an outage begins (the
/// report counts those apart from unreadable items).
pub const JUDGE_UNREACHED: &str = "the judge could not be reached";

/// When every call of an item failed without reaching the judge, why: such an item is an
/// outage, not a measurement of the judge, so it is stored as not judged and a rerun
/// retries it (an endpoint that was down read as a 100% failure rate for good).
fn outage(errors: &[Option<&JudgeError>]) -> Option<String> {
    let all_unreached = errors.iter().all(|e| e.is_some_and(JudgeError::unreached));
    all_unreached.then(|| {
        format!(
            "{JUDGE_UNREACHED} ({}); a rerun retries this item",
            errors[0].expect("an error")
        )
    })
}

/// Stored judgements set aside because their item changed since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed {
    /// Finished judgements whose item's content (images, instruction) differs now: to be
    /// judged again.
    pub content: usize,
    /// Of `content`, lines written before fingerprints were stored, whose content cannot
    /// be compared (judged again: the same id may hold another item, as `testbed:N` with
    /// another N does).
    pub unfingerprinted: usize,
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Items judged (stored) this run.
    pub judged: usize,
    /// Stored judgements set aside because their item changed (see [`Changed`]).
    pub changed: Changed,
}

/// Each case's [`Case::content_fingerprint`], in order.
pub fn fingerprints(cases: &[Case]) -> Vec<String> {
    cases.iter().map(Case::content_fingerprint).collect()
}

/// Sets aside the finished judgements of `cases` made on other content than
/// `fingerprints` (the cases', in order), so they are judged again and left out of a
/// report until they are.
pub fn set_aside_changed(
    cases: &[Case],
    fingerprints: &[String],
    store: &mut JudgementStore,
) -> Changed {
    let mut changed = Changed::default();
    for (case, fingerprint) in cases.iter().zip(fingerprints) {
        let id = &case.item.id;
        let Some(stored) = store.finished(id) else {
            continue;
        };
        if stored.content.as_ref() == Some(fingerprint) {
            continue;
        }
        changed.content += 1;
        changed.unfingerprinted += stored.content.is_none() as usize;
        store.supersede(id);
    }
    changed
}

/// Judges one case. `Err` only for a judge whose configuration cannot work.
async fn judge_case(
    case: &Case,
    fingerprint: &str,
    judge: &dyn Judge,
    width: u32,
) -> Result<Judgement, JudgeError> {
    let mut record = Judgement {
        id: case.item.id.clone(),
        task: case.item.task.clone(),
        group: case.group.clone(),
        content: Some(fingerprint.to_string()),
        judged: None,
        error: None,
    };
    let edit = match case.item.to_edit(width) {
        Ok(e) => e,
        Err(e) => {
            record.error = Some(e.to_string());
            return Ok(record);
        }
    };
    let load = |image: &super::data::EditedImage| image.load(&edit);
    record.judged = match &case.human {
        HumanLabel::Preference { a, b, preferred } => {
            let (a, b) = match (load(a), load(b)) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => {
                    record.error = Some(e.to_string());
                    return Ok(record);
                }
            };
            let (ab, ba) =
                futures::join!(judge.compare(&edit, &a, &b), judge.compare(&edit, &b, &a));
            if let Some(why) = outage(&[ab.as_ref().err(), ba.as_ref().err()]) {
                record.error = Some(why);
                return Ok(record);
            }
            let pick = |c: &crate::judge::Comparison| c.preferred;
            let explain = |c: &crate::judge::Comparison| (c.reasoning.clone(), c.usage.clone());
            Some(ItemCalls::Pair {
                human: *preferred,
                a_first: called(ab, pick, explain)?,
                b_first: called(ba, pick, explain)?,
            })
        }
        HumanLabel::Rating { edit: image, score } => {
            let image = match load(image) {
                Ok(i) => i,
                Err(e) => {
                    record.error = Some(e.to_string());
                    return Ok(record);
                }
            };
            if judge.score_kind() == ScoreKind::Reward {
                let r = judge.reward(&edit, &image).await;
                if let Some(why) = outage(&[r.as_ref().err()]) {
                    record.error = Some(why);
                    return Ok(record);
                }
                record.judged = Some(ItemCalls::Reward {
                    human: *score,
                    reward: called(
                        r,
                        |r| r.reward,
                        |r| (format!("log sigma {:.3}", r.log_sigma), r.usage.clone()),
                    )?,
                });
                return Ok(record);
            }
            let (sc, pq) = futures::join!(
                judge.semantic_consistency(&edit, &image),
                judge.perceptual_quality(&edit, &image)
            );
            if let Some(why) = outage(&[sc.as_ref().err(), pq.as_ref().err()]) {
                record.error = Some(why);
                return Ok(record);
            }
            let pick = |s: &crate::judge::SubScores| s.scores;
            let explain = |s: &crate::judge::SubScores| (s.reasoning.clone(), s.usage.clone());
            // O as the rubric computes it (a judge with several passes averages per pass).
            let overall = match (&sc, &pq) {
                (Ok(semantic), Ok(perceptual)) => Some(
                    VieScore {
                        semantic: semantic.clone(),
                        perceptual: perceptual.clone(),
                    }
                    .overall(),
                ),
                _ => None,
            };
            Some(ItemCalls::Rating {
                human: *score,
                semantic: called(sc, pick, explain)?,
                perceptual: called(pq, pick, explain)?,
                overall,
            })
        }
    };
    Ok(record)
}

/// Judges every case not yet in `store` (or stored for other content: see
/// [`set_aside_changed`]), storing each as it finishes (in dataset order). `progress` is
/// told how many items are stored.
pub async fn run(
    cases: &[Case],
    judge: Arc<dyn Judge>,
    store: &mut JudgementStore,
    config: RunConfig,
    stop: &StopSignal,
    mut progress: impl FnMut(usize),
) -> Result<RunCounts, EngineError> {
    let fingerprints = fingerprints(cases);
    let changed = set_aside_changed(cases, &fingerprints, store);
    let pending: Vec<(&Case, &String)> = cases
        .iter()
        .zip(&fingerprints)
        .filter(|(c, _)| !store.is_done(&c.item.id))
        .collect();
    let mut stored = cases.len() - pending.len();
    progress(stored);
    let mut judged = 0;
    let mut results = futures::stream::iter(pending)
        .map(|(case, fingerprint)| {
            let judge = judge.clone();
            async move {
                if stop.is_set() {
                    return None;
                }
                Some(judge_case(case, fingerprint, judge.as_ref(), config.width).await)
            }
        })
        .buffered(config.concurrency.max(1));
    while let Some(result) = results.next().await {
        let Some(result) = result else { continue };
        let record = result.map_err(|e| EngineError::Edit(EditError::Invalid(format!("{e}"))))?;
        store.append(record).map_err(|e| EngineError::Output {
            path: "judgements.jsonl".into(),
            reason: e.to_string(),
        })?;
        judged += 1;
        stored += 1;
        progress(stored);
    }
    Ok(RunCounts { judged, changed })
}
