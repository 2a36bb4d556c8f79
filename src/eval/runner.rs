//! Running a suite: every (item, arm) through the engine with the selection judge, the
//! returned edit scored by the evaluation judge, each result stored as it finishes.
//!
//! Shared work is reused: a `random` arm is read from a best-of-N arm's candidate 0 (same
//! seed and schedule: the identical trajectory), and best-of-n for every n < N is read from
//! the same best-of-N run (the first n candidates, picked by the selection judge's VIE O).

use std::collections::HashMap;
use std::sync::Arc;

use image::RgbImage;

use super::item::{EvalItem, ItemSource};
use super::store::{ArmResult, EvalScore, ResultStore, Scores};
use super::suite::{Arm, Suite};
use crate::edit::EditContext;
use crate::engine::budget::BudgetPool;
use crate::engine::report::{EditReport, VieRecord};
use crate::engine::{EditJob, Engine, Silent, StrategyConfig, StrategyKind};
use crate::judge::{vie_pair, Judge};
use crate::models::testbed::{self, OutcomeLabel};
use crate::stop::StopSignal;

/// The name of the derived best-of-n arm read from best-of-N arm `source`.
pub fn prefix_arm_name(source: &str, n: usize) -> String {
    format!("{source}@{n}")
}

/// The `n` of the `best-of-N@n` arms read from an arm's run: best-of-n over its first n
/// candidates, for a best-of-N that does not refine (only its own pick is refined, so a
/// prefix's pick would be scored unrefined).
fn derived_prefixes(config: &StrategyConfig) -> std::ops::Range<usize> {
    match config.kind {
        StrategyKind::BestOfN if config.refine.is_none() => 2..config.candidate_count(),
        _ => 0..0,
    }
}

/// Every arm name the suite produces, derived prefixes included, in report order.
pub fn arm_names(suite: &Suite) -> Vec<String> {
    let mut names = Vec::new();
    for arm in &suite.arms {
        let config = suite.config(arm);
        names.extend(derived_prefixes(&config).map(|n| prefix_arm_name(&arm.name, n)));
        names.push(arm.name.clone());
    }
    names
}

/// What the runner needs besides the suite.
pub struct EvalContext {
    /// Engine over the generator and the selection judge.
    pub engine: Engine,
    /// The evaluation judge when it differs from the selection judge.
    pub eval_judge: Option<Arc<dyn Judge>>,
    /// Set to stop after the item in progress.
    pub stop: StopSignal,
    /// The testbed generator's difficulty (to classify testbed outcomes).
    pub testbed_difficulty: f32,
}

fn scores(v: &VieRecord) -> Scores {
    Scores {
        sc: v.sc as f64,
        pq: v.pq as f64,
        overall: v.overall as f64,
    }
}

struct Scorer<'a> {
    ctx: &'a EvalContext,
    edit: &'a EditContext,
    outcomes: Option<Vec<testbed::Outcome>>,
}

impl Scorer<'_> {
    /// Scores a returned image: (eval score, judge calls, failures, tokens, correct). A
    /// `refined` image (the pick after its hi-res refine) is scored afresh even where the
    /// selection judge also evaluates: it scored the pick before the refine.
    async fn score(
        &self,
        image: Option<&RgbImage>,
        selection: Option<Scores>,
        refined: bool,
    ) -> (Option<EvalScore>, u64, u64, u64, Option<bool>) {
        let correct = match (&self.outcomes, image) {
            // A refined image is classified at the outcomes' size (classify's own rule).
            (Some(o), Some(img)) => Some(testbed::classify(o, img) == OutcomeLabel::Correct),
            _ => None,
        };
        let Some(image) = image else {
            return (
                Some(EvalScore::Failed("no finished edit to score".into())),
                0,
                0,
                0,
                correct,
            );
        };
        let judge = match (&self.ctx.eval_judge, refined) {
            (Some(judge), _) => Some(judge),
            (None, true) => self.ctx.engine.judge(),
            (None, false) => None,
        };
        match judge {
            None if refined => (
                Some(EvalScore::Failed(
                    "no judge to score the refined edit".into(),
                )),
                0,
                0,
                0,
                correct,
            ),
            None => {
                let eval = match selection {
                    Some(s) => EvalScore::Ok(s),
                    None => {
                        EvalScore::Failed("the selection judge could not score the pick".into())
                    }
                };
                (Some(eval), 0, 0, 0, correct)
            }
            Some(judge) => {
                // Two calls; what both cost counts, a failed one's too.
                let pair = vie_pair(judge.as_ref(), self.edit, image).await;
                let tokens = pair
                    .usages()
                    .map(|u| u.prompt_tokens + u.completion_tokens)
                    .sum::<u64>();
                match pair.score() {
                    Ok(v) => (
                        Some(EvalScore::Ok(scores(&VieRecord::from(v)))),
                        2,
                        0,
                        tokens,
                        correct,
                    ),
                    Err(e) => (
                        Some(EvalScore::Failed(e.to_string())),
                        2,
                        1,
                        tokens,
                        correct,
                    ),
                }
            }
        }
    }
}

/// The failure records of an arm on an item: the arm's own and, for best-of-N, those of
/// the `best-of-N@n` arms derived from its candidates (every name the run counts).
fn arm_failed(item: &EvalItem, arm: &Arm, config: &StrategyConfig, reason: &str) -> Vec<ArmResult> {
    std::iter::once(arm.name.clone())
        .chain(derived_prefixes(config).map(|n| prefix_arm_name(&arm.name, n)))
        .map(|name| ArmResult {
            error: Some(reason.to_string()),
            ..base(item, &name)
        })
        .collect()
}

fn base(item: &EvalItem, arm: &str) -> ArmResult {
    ArmResult {
        item: item.id.clone(),
        arm: arm.to_string(),
        task: item.task.clone(),
        language: item.language.clone(),
        nfe: 0,
        full_forwards: Some(0),
        cached_forwards: 0,
        refine_edit_step_equivalents: 0.0,
        selection: None,
        eval: None,
        correct: None,
        judge_calls: 0,
        judge_failures: 0,
        judge_tokens: 0,
        wall_s: 0.0,
        derived_from: None,
        error: None,
        content: None,
    }
}

/// What a run spent (its forwards, the selection judge's calls, its wall time), as a
/// record of `arm` on `item` with nothing scored yet.
fn spent(item: &EvalItem, arm: &str, report: &EditReport) -> ArmResult {
    let t = &report.judge_totals;
    ArmResult {
        nfe: report.nfe.total,
        full_forwards: Some(report.forwards.full),
        cached_forwards: report.forwards.cached,
        refine_edit_step_equivalents: report.nfe.refine_edit_step_equivalents,
        judge_calls: t.calls,
        judge_failures: t.failures,
        judge_tokens: t.prompt_tokens + t.completion_tokens,
        wall_s: report.timings.total_s,
        ..base(item, arm)
    }
}

/// `spent` with the pick's selection scores and the eval judge's verdict on `image`, the
/// cost of its calls added.
async fn with_verdict(
    spent: ArmResult,
    image: Option<&RgbImage>,
    selection: Option<Scores>,
    scorer: &Scorer<'_>,
    refined: bool,
) -> ArmResult {
    let (eval, calls, failures, tokens, correct) = scorer.score(image, selection, refined).await;
    ArmResult {
        selection,
        eval,
        correct,
        judge_calls: spent.judge_calls + calls,
        judge_failures: spent.judge_failures + failures,
        judge_tokens: spent.judge_tokens + tokens,
        ..spent
    }
}

async fn from_report(
    item: &EvalItem,
    arm: &str,
    report: &EditReport,
    scorer: &Scorer<'_>,
) -> ArmResult {
    let picked = report.picked();
    let selection = picked
        .and_then(|c| c.vie.as_ref())
        .and_then(|v| v.ok())
        .map(scores);
    // What the arm returns: the pick after its hi-res refine when the arm refines (the
    // refine's cost is in `spent`), else the pick.
    let refined = report.strategy.refine.is_some() && picked.is_some();
    let image = match refined {
        true => report.refine.as_ref().and_then(|r| r.image.as_deref()),
        false => picked.and_then(|c| c.images.final_image.as_deref()),
    };
    with_verdict(spent(item, arm, report), image, selection, scorer, refined).await
}

/// best-of-n over the first `n` candidates of a best-of-N report (n = 1 is random).
async fn prefix(
    item: &EvalItem,
    name: &str,
    source: &str,
    report: &EditReport,
    n: usize,
    scorer: &Scorer<'_>,
) -> ArmResult {
    let candidates = &report.candidates[..n.min(report.candidates.len())];
    // Highest selection VIE O, ties to the lower index (the engine's own rule); unscored
    // candidates lose to scored ones. With none scored, n = 1 (random, which needs no
    // judge) returns candidate 0 and n >= 2 is a failure.
    let mut best = 0;
    for (i, c) in candidates.iter().enumerate() {
        let o = |c: &crate::engine::report::CandidateRecord| {
            c.vie.as_ref().and_then(|v| v.ok()).map(|v| v.overall)
        };
        if let Some(oi) = o(c) {
            if o(&candidates[best]).is_none_or(|ob| oi > ob) {
                best = i;
            }
        }
    }
    let chosen = &candidates[best];
    let selection = chosen.vie.as_ref().and_then(|v| v.ok()).map(scores);
    // The first n candidates' share of the run.
    let share = n as f64 / report.candidates.len().max(1) as f64;
    let t = &report.judge_totals;
    let spent = ArmResult {
        nfe: n * report.strategy.steps,
        full_forwards: Some(candidates.iter().map(|c| c.forwards.full).sum()),
        cached_forwards: candidates.iter().map(|c| c.forwards.cached).sum(),
        judge_calls: (t.calls as f64 * share).round() as u64,
        judge_failures: candidates
            .iter()
            .filter(|c| c.vie.as_ref().is_some_and(|v| v.ok().is_none()))
            .count() as u64,
        judge_tokens: ((t.prompt_tokens + t.completion_tokens) as f64 * share).round() as u64,
        wall_s: report.timings.total_s * share,
        derived_from: Some(source.to_string()),
        ..base(item, name)
    };
    if n >= 2 && selection.is_none() {
        // Candidate 0 would be a fallback, not best-of-n's pick: a failure, as the same
        // arm run on its own records it, with the compute it spent.
        return ArmResult {
            error: Some(format!(
                "no edit could be scored: the selection judge scored none of {source}'s first {n} candidates"
            )),
            ..spent
        };
    }
    with_verdict(
        spent,
        chosen.images.final_image.as_deref(),
        selection,
        scorer,
        false,
    )
    .await
}

/// Runs every pending (item, arm); `on_result` is called after each stored result. Each
/// record is stamped with its item's `fingerprints` entry (the items', in order, taken
/// when the stored results were checked against them, before any edit loads: a file
/// changed since makes the record stale, never passes a stale one as current).
pub async fn run_suite(
    suite: &Suite,
    items: &[EvalItem],
    fingerprints: &[String],
    ctx: &EvalContext,
    store: &mut ResultStore,
    mut on_result: impl FnMut(usize),
) -> anyhow::Result<()> {
    // Best-of-N arms first, so random and the prefixes can be read from them.
    let mut order: Vec<&Arm> = suite.arms.iter().collect();
    order.sort_by_key(|a| suite.config(a).kind != StrategyKind::BestOfN);
    // Under a mean budget each adaptive arm shares items x budget across its items: each
    // item to run is set aside one wave, each finished one counts what it spent, wherever
    // it lies in the item order.
    let mut pools: HashMap<&str, BudgetPool> = HashMap::new();
    if let Some(budget) = suite.budget_nfe_mean {
        for arm in &suite.arms {
            let config = suite.config(arm);
            if config.kind == StrategyKind::Adaptive {
                let pool = BudgetPool::new(budget);
                for item in items {
                    match store.result(&item.id, &arm.name) {
                        Some(done) => pool.add_finished(done.nfe),
                        None => pool.add_item(config.first_wave_nfe()),
                    }
                }
                pools.insert(arm.name.as_str(), pool);
            }
        }
    }
    for (item, content) in items.iter().zip(fingerprints) {
        if ctx.stop.is_set() {
            break;
        }
        let pending: Vec<&Arm> = order
            .iter()
            .copied()
            .filter(|arm| {
                let config = suite.config(arm);
                let derived_pending = derived_prefixes(&config)
                    .any(|n| !store.is_done(&item.id, &prefix_arm_name(&arm.name, n)));
                !store.is_done(&item.id, &arm.name) || derived_pending
            })
            .collect();
        if pending.is_empty() {
            continue;
        }
        let stamped = |mut records: Vec<ArmResult>| {
            for r in &mut records {
                r.content = Some(content.clone());
            }
            records
        };
        let edit = match item.to_edit(suite.width) {
            Ok(e) => e,
            Err(e) => {
                let failed = pending
                    .iter()
                    .flat_map(|a| arm_failed(item, a, &suite.config(a), &e.to_string()))
                    .collect::<Vec<_>>();
                // Counted as stored: a record of a unit done already is not a new result.
                let n = store.append(stamped(failed))?;
                on_result(n);
                continue;
            }
        };
        let outcomes = match item.source {
            ItemSource::Testbed(_) => testbed::outcome_set(&edit, ctx.testbed_difficulty).ok(),
            _ => None,
        };
        let scorer = Scorer {
            ctx,
            edit: &edit,
            outcomes,
        };
        let mut best_of_n: Option<(String, EditReport)> = None;
        for arm in pending {
            let config = suite.config(arm);
            let mut records = Vec::new();
            if let (Some(source), Some((name, report))) = (suite.random_source(arm), &best_of_n) {
                if &source.name == name {
                    let mut r = prefix(item, &arm.name, name, report, 1, &scorer).await;
                    r.arm = arm.name.clone();
                    records.push(r);
                }
            }
            if records.is_empty() {
                // An adaptive arm under a mean budget: this item's share, its N cut to fit.
                let allowance = pools
                    .get(arm.name.as_str())
                    .map(|p| p.start_item(config.first_wave_nfe(), config.planned_nfe()));
                let strategy = match allowance {
                    Some(a) => config
                        .held_to(a.nfe)
                        .map_err(|e| anyhow::anyhow!("arm `{}`: {e}", arm.name))?,
                    None => config.clone(),
                };
                let job = EditJob::new(edit.clone(), strategy);
                let outcome = ctx.engine.run(job, Arc::new(Silent)).await;
                if let (Some(pool), Some(a)) = (pools.get(arm.name.as_str()), allowance) {
                    pool.settle(a, outcome.as_ref().ok().map(|r| r.nfe.total));
                }
                // Random returns candidate 0 whatever the selection judge says: an unscored
                // pick is still its result (as the random read from best-of-N's run is), and
                // only a failed refine fails it.
                let incomplete = |report: &EditReport| match config.kind {
                    StrategyKind::Random => report.refine_failure(),
                    _ => report.incomplete_reason(),
                };
                match outcome {
                    // The selection judge was down (or the refine failed): the pick is a
                    // fallback, not this strategy's result. Recorded as failed, so it is
                    // left out of the means and retried by a rerun.
                    Ok(report) if let Some(reason) = incomplete(&report) => {
                        let mut failed = arm_failed(item, arm, &config, &reason);
                        // The arm's own record keeps the compute it spent: a failure is
                        // not free in the cost columns.
                        failed[0] = ArmResult {
                            error: failed[0].error.take(),
                            ..spent(item, &arm.name, &report)
                        };
                        records.extend(failed);
                    }
                    Ok(report) => {
                        records.push(from_report(item, &arm.name, &report, &scorer).await);
                        for n in derived_prefixes(&config) {
                            let name = prefix_arm_name(&arm.name, n);
                            if !store.is_done(&item.id, &name) {
                                records.push(
                                    prefix(item, &name, &arm.name, &report, n, &scorer).await,
                                );
                            }
                        }
                        if config.kind == StrategyKind::BestOfN {
                            best_of_n = Some((arm.name.clone(), report));
                        }
                    }
                    Err(e) => records.extend(arm_failed(item, arm, &config, &e.to_string())),
                }
            }
            // Counted as stored: an arm run again only for a derived prefix that failed
            // (`derived_pending`) is done already, and its record is not stored again.
            let n = store.append(stamped(records))?;
            on_result(n);
        }
    }
    Ok(())
}
